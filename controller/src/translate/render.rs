//! Outputs as readable JSON (addresses as text, enums by name), for golden tests and the
//! admin endpoint.

use mesh_core::state::model::ip_from_bytes;
use mesh_proto::security as sec;
use mesh_proto::workload as pb;
use serde_json::{json, Map, Value};

use super::Outputs;

fn ip(bytes: &[u8]) -> Value {
    match ip_from_bytes(bytes) {
        Some(ip) => json!(ip.to_string()),
        None => json!(format!("<{} bytes>", bytes.len())),
    }
}

fn gateway(g: &Option<pb::GatewayAddress>) -> Value {
    let Some(g) = g else { return Value::Null };
    let dest = match &g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => ip(&a.address),
        Some(pb::gateway_address::Destination::Hostname(h)) => json!(format!("{}/{}", h.namespace, h.hostname)),
        None => Value::Null,
    };
    json!({"destination": dest, "hboneMtlsPort": g.hbone_mtls_port})
}

fn ports(ports: &[pb::Port]) -> Value {
    let proto = |p: i32| pb::AppProtocol::try_from(p).map(|p| p.as_str_name()).unwrap_or("?");
    ports
        .iter()
        .map(|p| {
            let mut s = format!("{}->{}", p.service_port, p.target_port);
            if p.app_protocol != 0 {
                s.push_str(&format!(" {}", proto(p.app_protocol)));
            }
            json!(s)
        })
        .collect()
}

fn locality(l: &Option<pb::Locality>) -> Value {
    match l {
        Some(l) => json!(format!("{}/{}/{}", l.region, l.zone, l.subzone)),
        None => Value::Null,
    }
}

fn load_balancing(lb: &Option<pb::LoadBalancing>) -> Value {
    use pb::load_balancing::{HealthPolicy, Mode, Scope};
    let Some(lb) = lb else { return Value::Null };
    let scope = |s: &i32| Scope::try_from(*s).map(|s| s.as_str_name()).unwrap_or("?");
    json!({
        "routingPreference": lb.routing_preference.iter().map(scope).collect::<Vec<_>>(),
        "mode": Mode::try_from(lb.mode).map(|m| m.as_str_name()).unwrap_or("?"),
        "healthPolicy": HealthPolicy::try_from(lb.health_policy).map(|h| h.as_str_name()).unwrap_or("?"),
    })
}

fn workload(w: &pb::Workload) -> Value {
    let enum_name = |v: &str| json!(v);
    let mut out = json!({
        "workload": {
            "uid": w.uid,
            "name": w.name,
            "namespace": w.namespace,
            "addresses": w.addresses.iter().map(|a| ip(a)).collect::<Vec<_>>(),
            "network": w.network,
            "node": w.node,
            "tunnelProtocol": enum_name(pb::TunnelProtocol::try_from(w.tunnel_protocol).map(|t| t.as_str_name()).unwrap_or("?")),
            "serviceAccount": w.service_account,
            "trustDomain": w.trust_domain,
            "waypoint": gateway(&w.waypoint),
            "canonicalName": w.canonical_name,
            "canonicalRevision": w.canonical_revision,
            "workloadName": w.workload_name,
            "workloadType": enum_name(pb::WorkloadType::try_from(w.workload_type).map(|t| t.as_str_name()).unwrap_or("?")),
            "services": w.services.iter().map(|(k, v)| (k.clone(), ports(&v.ports))).collect::<Map<_, _>>(),
            "authorizationPolicies": w.authorization_policies,
            "status": enum_name(pb::WorkloadStatus::try_from(w.status).map(|t| t.as_str_name()).unwrap_or("?")),
            "networkMode": enum_name(pb::NetworkMode::try_from(w.network_mode).map(|t| t.as_str_name()).unwrap_or("?")),
            "clusterId": w.cluster_id,
            "locality": locality(&w.locality),
        }
    });
    // Only ServiceEntry endpoints have these: absent otherwise, so other goldens stay as they are.
    if !w.hostname.is_empty() {
        out["workload"]["hostname"] = json!(w.hostname);
    }
    if let Some(c) = w.capacity {
        out["workload"]["capacity"] = json!(c);
    }
    out
}

fn service(s: &pb::Service) -> Value {
    let mut out = json!({
        "service": {
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname,
            "addresses": s.addresses.iter().map(|a| ip(&a.address)).collect::<Vec<_>>(),
            "ports": ports(&s.ports),
            "waypoint": gateway(&s.waypoint),
            "canonical": s.canonical,
            "ingressUseWaypoint": s.ingress_use_waypoint,
            "loadBalancing": load_balancing(&s.load_balancing),
        }
    });
    if !s.subject_alt_names.is_empty() {
        out["service"]["subjectAltNames"] = json!(s.subject_alt_names);
    }
    out
}

fn service_accounts(ms: &[sec::ServiceAccountMatch]) -> Value {
    ms.iter()
        .map(|m| json!(format!("{}/{}", m.namespace, m.service_account)))
        .collect()
}

fn string_matches(ms: &[sec::StringMatch]) -> Value {
    use sec::string_match::MatchType;
    ms.iter()
        .map(|m| match &m.match_type {
            Some(MatchType::Exact(s)) => json!({"exact": s}),
            Some(MatchType::Prefix(s)) => json!({"prefix": s}),
            Some(MatchType::Suffix(s)) => json!({"suffix": s}),
            Some(MatchType::Presence(())) => json!("presence"),
            None => Value::Null,
        })
        .collect()
}

fn cidrs(a: &[sec::Address]) -> Value {
    a.iter()
        .map(|a| json!(format!("{}/{}", ip(&a.address).as_str().unwrap_or("?"), a.length)))
        .collect()
}

fn matcher(m: &sec::Match) -> Value {
    let mut out = Map::new();
    let mut put = |k: &str, v: Value, empty: bool| {
        if !empty {
            out.insert(k.to_owned(), v);
        }
    };
    put("namespaces", string_matches(&m.namespaces), m.namespaces.is_empty());
    put(
        "notNamespaces",
        string_matches(&m.not_namespaces),
        m.not_namespaces.is_empty(),
    );
    put(
        "serviceAccounts",
        service_accounts(&m.service_accounts),
        m.service_accounts.is_empty(),
    );
    put(
        "notServiceAccounts",
        service_accounts(&m.not_service_accounts),
        m.not_service_accounts.is_empty(),
    );
    put("principals", string_matches(&m.principals), m.principals.is_empty());
    put(
        "notPrincipals",
        string_matches(&m.not_principals),
        m.not_principals.is_empty(),
    );
    put("sourceIps", cidrs(&m.source_ips), m.source_ips.is_empty());
    put("notSourceIps", cidrs(&m.not_source_ips), m.not_source_ips.is_empty());
    put(
        "destinationIps",
        cidrs(&m.destination_ips),
        m.destination_ips.is_empty(),
    );
    put(
        "notDestinationIps",
        cidrs(&m.not_destination_ips),
        m.not_destination_ips.is_empty(),
    );
    put(
        "destinationPorts",
        json!(m.destination_ports),
        m.destination_ports.is_empty(),
    );
    put(
        "notDestinationPorts",
        json!(m.not_destination_ports),
        m.not_destination_ports.is_empty(),
    );
    Value::Object(out)
}

fn authorization(a: &sec::Authorization) -> Value {
    let mut v = authorization_fields(a);
    if let (Some(audit), Value::Object(o)) = (&a.audit, &mut v) {
        o.insert("audit".into(), groups(&audit.groups));
    }
    v
}

fn groups(gs: &[sec::Group]) -> Value {
    json!(gs
        .iter()
        .map(|g| g
            .rules
            .iter()
            .map(|r| r.matches.iter().map(matcher).collect::<Vec<_>>())
            .collect::<Vec<_>>())
        .collect::<Vec<_>>())
}

fn authorization_fields(a: &sec::Authorization) -> Value {
    json!({
        "name": a.name,
        "namespace": a.namespace,
        "scope": sec::Scope::try_from(a.scope).map(|s| s.as_str_name()).unwrap_or("?"),
        "action": sec::Action::try_from(a.action).map(|s| s.as_str_name()).unwrap_or("?"),
        "groups": groups(&a.groups),
        "dryRun": a.dry_run,
    })
}

/// The whole output as JSON.
pub fn to_json(out: &Outputs) -> Value {
    let addresses: Map<String, Value> = out
        .addresses
        .iter()
        .map(|(k, a)| {
            let v = match &a.r#type {
                Some(pb::address::Type::Workload(w)) => workload(w),
                Some(pb::address::Type::Service(s)) => service(s),
                None => Value::Null,
            };
            (k.clone(), v)
        })
        .collect();
    let mut v = json!({
        "addresses": addresses,
        "authorizations": out.authorizations.iter().map(|(k, a)| (k.clone(), authorization(a))).collect::<Map<_, _>>(),
        "serviceRoutes": out.service_routes.iter().map(|(k, r)| (k.clone(), json!(format!("{r:?}")))).collect::<Map<_, _>>(),
        "waypointPolicies": out.waypoint_policies.iter().map(|(k, p)| (k.clone(), json!(format!("{p:?}")))).collect::<Map<_, _>>(),
        "waypoints": out.waypoints.values().collect::<Vec<_>>(),
        "problems": out.problems.iter().map(|p| json!(format!("{} {}: {}", p.kind.name(), p.object, p.message))).collect::<Vec<_>>(),
    });
    // What each waypoint's credentials hold, never the key material; only when any exist,
    // so outputs without TLS origination are unchanged.
    if let (false, Value::Object(o)) = (out.waypoint_credentials.is_empty(), &mut v) {
        o.insert("waypointCredentials".into(), waypoint_credentials(out));
    }
    v
}

fn waypoint_credentials(out: &Outputs) -> Value {
    let held = |c: &mesh_proto::waypoint::UpstreamCredential| {
        json!({
            "secret": c.secret,
            "certificate": !c.cert_chain.is_empty(),
            "key": !c.private_key.is_empty(),
            "ca": !c.ca_certificates.is_empty(),
        })
    };
    out.waypoint_credentials
        .iter()
        .map(|(k, w)| (k.clone(), json!(w.credentials.iter().map(held).collect::<Vec<_>>())))
        .collect::<Map<_, _>>()
        .into()
}
