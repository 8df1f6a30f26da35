//! Status of ingress gateways (class `istio`) and of the routes attached to them, as written
//! to the API server while this replica leads. Translation computes both
//! ([`crate::translate::ingress`]); this module turns them into the Gateway API's shapes:
//!
//! - the Gateway's `status` ([`gateway_status`]): `addresses` (the Service's load balancer or
//!   cluster IPs), `conditions` (Accepted, Programmed) and per listener `supportedKinds`,
//!   `attachedRoutes` and conditions, written by [`super::writer::apply_waypoint`] with the
//!   Deployment and Service;
//! - each HTTPRoute/TLSRoute/TCPRoute's `status.parents` entries for its ingress Gateway
//!   parentRefs ([`route_parents`]), Accepted/ResolvedRefs with their reasons, under
//!   [`INGRESS_CONTROLLER`]: entries of other controllers (the waypoint's, for Service
//!   parents) are kept, and the merge patch is guarded by the resourceVersion read.
//!
//! `lastTransitionTime`s are kept where a condition did not change, so an unchanged status
//! rebuilds identically and is not written again. On taking the lead, a replica also clears
//! our entries from routes that were detached while no replica led ([`stale_routes`]).

use std::collections::BTreeMap;
use std::time::Duration;

use ::kube::api::{DynamicObject, ListParams};
use ::kube::{Api, Client};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::resources::api_resource;
use super::writer::{conditions, Reported};
use super::KubeError;
use crate::model::reference_grant::GATEWAY_GROUP;
use crate::model::{Kind, ObjectKey};
use crate::translate::ingress::RouteParentStatus;
use crate::waypoint::WaypointDeployment;

/// The controller name of Istio's `istio` GatewayClass, which ingress routes' status names.
pub const INGRESS_CONTROLLER: &str = "istio.io/gateway-controller";

fn existing_conditions(v: Option<&Value>) -> &[Value] {
    v.and_then(|v| v.get("conditions"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

/// The `status` of ingress gateway `record` (`None` for a waypoint); `existing` is the
/// Gateway's current status.
pub fn gateway_status(
    record: &WaypointDeployment,
    generation: Option<i64>,
    existing: &Value,
    now: Timestamp,
) -> Option<Value> {
    let ingress = record.ingress.as_ref()?;
    let previous_listeners = existing
        .get("listeners")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let listeners: Vec<Value> = ingress
        .listeners
        .iter()
        .map(|l| {
            let previous = previous_listeners
                .iter()
                .find(|p| p.get("name") == Some(&json!(l.name)));
            let kinds: Vec<Value> = l
                .supported_kinds
                .iter()
                .map(|k| json!({"group": GATEWAY_GROUP, "kind": k}))
                .collect();
            json!({
                "name": l.name,
                "supportedKinds": kinds,
                "attachedRoutes": l.attached_routes,
                "conditions": conditions(&l.conditions, existing_conditions(previous), generation, now),
            })
        })
        .collect();
    Some(json!({
        "addresses": ingress.addresses,
        "conditions": conditions(&record.conditions, existing_conditions(Some(existing)), generation, now),
        "listeners": listeners,
    }))
}

/// Whether `parent` (a route's parentRef, as written) is the parent a status names.
fn same_parent(parent: &Value, route_ns: &str, status: &RouteParentStatus) -> bool {
    let text = |f: &str| parent.get(f).and_then(Value::as_str);
    let is_gateway = text("group").is_none_or(|g| g == GATEWAY_GROUP) && text("kind").is_none_or(|k| k == "Gateway");
    is_gateway
        && text("name") == Some(status.parent.name.as_str())
        && text("namespace").unwrap_or(route_ns) == status.parent.namespace
        && text("sectionName") == status.section_name.as_deref()
        && parent.get("port").and_then(Value::as_u64) == status.port.map(u64::from)
}

/// The `status.parents` to write on `route` (the object as read): one entry of ours per
/// parentRef a status is for, other controllers' entries kept as they are.
pub fn route_parents(route: &Value, statuses: &[RouteParentStatus], generation: Option<i64>, now: Timestamp) -> Value {
    let route_ns = route
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let existing = route
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let ours = |e: &&Value| e.get("controllerName").and_then(Value::as_str) == Some(INGRESS_CONTROLLER);
    let mut parents: Vec<Value> = existing.iter().filter(|e| !ours(e)).cloned().collect();
    let refs = route.pointer("/spec/parentRefs").and_then(Value::as_array);
    for parent in refs.into_iter().flatten() {
        let Some(status) = statuses.iter().find(|s| same_parent(parent, route_ns, s)) else {
            continue;
        };
        let previous = existing
            .iter()
            .filter(ours)
            .find(|e| e.get("parentRef") == Some(parent));
        parents.push(json!({
            "parentRef": parent,
            "controllerName": INGRESS_CONTROLLER,
            "conditions": conditions(&status.conditions, existing_conditions(previous), generation, now),
        }));
    }
    Value::Array(parents)
}

/// Writes [`route_parents`] on route `kind`/`key` when it changed (guarded by the
/// resourceVersion read: a concurrent writer makes it fail and be retried).
pub async fn report_route(
    client: &Client,
    kind: Kind,
    key: &ObjectKey,
    statuses: &[RouteParentStatus],
) -> Result<(), KubeError> {
    super::route_status::patch_parents(client, kind, key, |route, generation, now| {
        route_parents(route, statuses, generation, now)
    })
    .await
}

/// Route statuses grouped by route.
pub fn by_route(statuses: &[RouteParentStatus]) -> BTreeMap<(Kind, ObjectKey), Vec<RouteParentStatus>> {
    let mut out: BTreeMap<(Kind, ObjectKey), Vec<RouteParentStatus>> = BTreeMap::new();
    for s in statuses {
        let kind = match s.kind.as_str() {
            "HTTPRoute" => Kind::HttpRoute,
            "TCPRoute" => Kind::TcpRoute,
            "TLSRoute" => Kind::TlsRoute,
            "GRPCRoute" => Kind::GrpcRoute,
            _ => continue,
        };
        out.entry((kind, s.route.clone())).or_default().push(s.clone());
    }
    out
}

/// Route kinds an ingress Gateway takes.
const ROUTE_KINDS: [Kind; 4] = [Kind::HttpRoute, Kind::GrpcRoute, Kind::TlsRoute, Kind::TcpRoute];

/// The routes among `listed` (objects of `kind` as read) that hold an entry of ours in
/// `status.parents` although translation has no status for them: detached (or attached
/// elsewhere) while no replica led, so no write ever cleared it.
pub fn stale_routes(
    kind: Kind,
    listed: &[Value],
    now: &BTreeMap<(Kind, ObjectKey), Vec<RouteParentStatus>>,
) -> Vec<(Kind, ObjectKey)> {
    let ours = |e: &Value| e.get("controllerName").and_then(Value::as_str) == Some(INGRESS_CONTROLLER);
    listed
        .iter()
        .filter(|route| {
            let parents = route.pointer("/status/parents").and_then(Value::as_array);
            parents.into_iter().flatten().any(ours)
        })
        .filter_map(|route| {
            let text = |p: &str| route.pointer(p).and_then(Value::as_str);
            let key = ObjectKey::new(text("/metadata/namespace")?, text("/metadata/name")?);
            (!now.contains_key(&(kind, key.clone()))).then_some((kind, key))
        })
        .collect()
}

/// Lists every route kind and clears our stale entries ([`stale_routes`]). A kind the API
/// server does not serve is skipped.
async fn sweep(client: &Client, now: &BTreeMap<(Kind, ObjectKey), Vec<RouteParentStatus>>) -> Result<(), KubeError> {
    for kind in ROUTE_KINDS {
        let api = Api::<DynamicObject>::all_with(client.clone(), &api_resource(kind));
        let listed = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(::kube::Error::Api(e)) if e.code == 404 => {
                debug!(?kind, "route kind not served; nothing to sweep");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let listed: Vec<Value> = listed.iter().filter_map(|o| serde_json::to_value(o).ok()).collect();
        for (kind, key) in stale_routes(kind, &listed, now) {
            report_route(client, kind, &key, &[]).await?;
        }
    }
    Ok(())
}

/// Keeps the ingress routes' `status.parents` equal to `statuses` while leading; a route no
/// longer attached to an ingress Gateway loses our entries, also one detached while no
/// replica led (swept once per lead). A failed write is retried after `retry`.
pub async fn run(
    client: Client,
    retry: Duration,
    mut leader: watch::Receiver<bool>,
    mut statuses: watch::Receiver<Vec<RouteParentStatus>>,
) {
    let mut written = Reported::default();
    let mut swept = false;
    loop {
        let mut failed = false;
        if *leader.borrow_and_update() {
            let now = by_route(&statuses.borrow_and_update());
            if !swept {
                match sweep(&client, &now).await {
                    Ok(()) => swept = true,
                    Err(e) => {
                        warn!(error = %e, "cannot clear stale ingress route status");
                        failed = true;
                    }
                }
            }
            for ((kind, key), wanted) in written.pending(&now) {
                match report_route(&client, kind, &key, &wanted).await {
                    Ok(()) => written.written((kind, key), wanted),
                    Err(e) => {
                        warn!(%key, error = %e, "cannot write ingress route status");
                        failed = true;
                    }
                }
            }
        } else {
            written = Reported::default();
            swept = false;
        }
        tokio::select! {
            r = leader.changed() => if r.is_err() { return },
            r = statuses.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(retry), if failed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Inputs, Object};
    use crate::translate::{ingress, Options, Report};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid time")
    }

    fn tls_secret(name: &str, host: &str) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let indent = |pem: String| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: istio-system}}\ntype: kubernetes.io/tls\n\
             stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
            indent(cert.pem()),
            indent(key.serialize_pem())
        )
    }

    const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: istio-ingressgateway, namespace: istio-system, uid: gw-uid, generation: 3}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    hostname: "*.example.com"
    port: 443
    protocol: HTTPS
    tls: {mode: Terminate, certificateRefs: [{name: example-com-cert}]}
    allowedRoutes: {namespaces: {from: All}}
  - name: other
    hostname: "*.other.org"
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: missing-cert}]}
  - name: passthrough
    hostname: "*.passthrough.test"
    port: 8443
    protocol: TLS
    tls: {mode: Passthrough}
    allowedRoutes: {namespaces: {from: All}}
  - name: http
    port: 80
    protocol: HTTP
"#;

    const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app-routes, namespace: production, generation: 7}
spec:
  parentRefs:
  - {name: istio-ingressgateway, namespace: istio-system, sectionName: https}
  - {name: istio-ingressgateway, namespace: istio-system, sectionName: http}
  - {name: istio-ingressgateway, namespace: istio-system, port: 8443}
  - {group: "", kind: Service, name: app-v1}
  hostnames: ["app.example.com"]
  rules: [{backendRefs: [{name: app-v1, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: no-grant, namespace: istio-system}
spec:
  parentRefs: [{name: istio-ingressgateway, sectionName: http}]
  rules: [{backendRefs: [{name: app-v1, namespace: production, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: db, namespace: production}
spec:
  parentRefs: [{name: istio-ingressgateway, namespace: istio-system}]
  hostnames: [db.passthrough.test]
  rules: [{backendRefs: [{name: app-v1, port: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: app-v1, namespace: production}
spec: {ports: [{port: 8080}]}
"#;

    /// The gateway's Service as the API server shows it, with the load balancer's addresses.
    const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec: {type: LoadBalancer, clusterIP: 10.96.0.40, ports: [{port: 443}]}
status: {loadBalancer: {ingress: [{ip: 203.0.113.10}, {hostname: lb.example.net}]}}
"#;

    fn translate(docs: &[&str]) -> ingress::Ingress {
        let mut inputs = Inputs::default();
        for text in docs {
            for doc in serde_yaml::Deserializer::from_str(text) {
                let value = serde_json::Value::deserialize(doc).expect("yaml");
                inputs.apply(Object::parse(value).expect("object"));
            }
        }
        ingress::translate(&inputs, &Options::default(), &mut Report::default())
    }

    use serde::Deserialize;

    fn condition<'a>(conditions: &'a Value, kind: &str) -> &'a Value {
        conditions
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == kind))
            .expect("condition present")
    }

    fn route_value(name: &str, status: Value) -> Value {
        let doc = ROUTES
            .split("---")
            .find(|d| d.contains(&format!("name: {name},")))
            .expect("route");
        let mut v: Value = serde_yaml::from_str(doc).expect("yaml");
        v["status"] = status;
        v
    }

    /// A replica taking the lead clears our entries only from routes translation has no
    /// status for: attached routes keep theirs, other controllers' entries are not ours.
    #[test]
    fn stale_routes_are_those_with_our_entry_and_no_status() {
        let secret = tls_secret("example-com-cert", "*.example.com");
        let out = translate(&[GATEWAY, ROUTES, SERVICE, &secret]);
        let now = by_route(&out.route_parents);
        let entry = |controller: &str| json!({"parents": [{"controllerName": controller, "parentRef": {"name": "x"}}]});
        let detached = |name: &str, status: Value| json!({"metadata": {"name": name, "namespace": "production"}, "status": status});
        let listed = vec![
            route_value("app-routes", entry(INGRESS_CONTROLLER)),
            detached("gone-from-gateway", entry(INGRESS_CONTROLLER)),
            detached("waypoints-only", entry(super::super::writer::WAYPOINT_CONTROLLER)),
            detached("no-status", Value::Null),
        ];
        assert!(now.contains_key(&(Kind::HttpRoute, ObjectKey::new("production", "app-routes"))));
        assert_eq!(
            stale_routes(Kind::HttpRoute, &listed, &now),
            vec![(Kind::HttpRoute, ObjectKey::new("production", "gone-from-gateway"))]
        );
        // The same names under another kind have no status at all: ours there are stale.
        assert_eq!(stale_routes(Kind::TcpRoute, &listed[..1], &now).len(), 1);
        // Clearing writes no entry of ours and keeps the others'.
        let cleared = route_parents(&listed[1], &[], None, at(0));
        assert_eq!(cleared, json!([]));
    }

    /// The Gateway's status and each route's parents from the real translation, pinned in
    /// `controller/tests/golden/ingress-status/` (UPDATE_GOLDEN=1 rewrites it).
    #[test]
    fn statuses_from_a_translated_gateway() {
        let secret = tls_secret("example-com-cert", "*.example.com");
        let out = translate(&[GATEWAY, ROUTES, SERVICE, &secret]);
        let key = ObjectKey::new("istio-system", "istio-ingressgateway");
        let record = &out.deployments[&key];
        assert_eq!(record.gateway_uid, "gw-uid");
        let status = gateway_status(record, Some(3), &Value::Null, at(0)).expect("an ingress record");
        assert_eq!(
            status["addresses"],
            json!([{"type": "IPAddress", "value": "203.0.113.10"}, {"type": "Hostname", "value": "lb.example.net"}])
        );
        assert_eq!(condition(&status["conditions"], "Programmed")["status"], "True");
        assert_eq!(condition(&status["conditions"], "Accepted")["observedGeneration"], 3);
        let listener = |name: &str| {
            status["listeners"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["name"] == name))
                .expect("listener")
                .clone()
        };
        assert_eq!(listener("https")["attachedRoutes"], 1);
        assert_eq!(
            listener("https")["supportedKinds"],
            json!([{"group": GATEWAY_GROUP, "kind": "HTTPRoute"}, {"group": GATEWAY_GROUP, "kind": "GRPCRoute"}])
        );
        assert_eq!(listener("passthrough")["attachedRoutes"], 1);
        assert_eq!(
            listener("passthrough")["supportedKinds"],
            json!([{"group": GATEWAY_GROUP, "kind": "TLSRoute"}])
        );
        let other = listener("other");
        let refs = condition(&other["conditions"], "ResolvedRefs");
        assert_eq!(
            (refs["status"].as_str(), refs["reason"].as_str()),
            (Some("False"), Some("InvalidCertificateRef"))
        );
        assert!(refs["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing-cert does not exist")));
        assert_eq!(condition(&other["conditions"], "Programmed")["status"], "False");
        assert!(!status.to_string().contains("PRIVATE KEY"), "statuses never carry keys");
        // Rebuilt from what was written, later: identical (no write loop).
        assert_eq!(gateway_status(record, Some(3), &status, at(60)), Some(status.clone()));

        // Routes: ours per ingress parentRef, the waypoint controller's Service entry kept.
        let foreign = json!({"parentRef": {"group": "", "kind": "Service", "name": "app-v1"},
            "controllerName": super::super::writer::WAYPOINT_CONTROLLER,
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]});
        let by = by_route(&out.route_parents);
        let statuses = |kind, ns: &str, name: &str| by[&(kind, ObjectKey::new(ns, name))].clone();
        let app = route_value("app-routes", json!({"parents": [foreign]}));
        let app_parents = route_parents(
            &app,
            &statuses(Kind::HttpRoute, "production", "app-routes"),
            Some(7),
            at(0),
        );
        let list = app_parents.as_array().expect("parents");
        assert_eq!(list.len(), 4);
        assert_eq!(list[0], foreign);
        assert_eq!(list[1]["parentRef"]["sectionName"], "https");
        assert_eq!(list[1]["controllerName"], INGRESS_CONTROLLER);
        assert_eq!(condition(&list[1]["conditions"], "Accepted")["reason"], "Accepted");
        assert_eq!(condition(&list[1]["conditions"], "Accepted")["observedGeneration"], 7);
        let refused = condition(&list[2]["conditions"], "Accepted");
        assert_eq!(
            (refused["status"].as_str(), refused["reason"].as_str()),
            (Some("False"), Some("NotAllowedByListeners"))
        );
        // By port: the passthrough listener on 8443 takes no HTTPRoute.
        assert_eq!(list[3]["parentRef"]["port"], 8443);
        assert_eq!(
            condition(&list[3]["conditions"], "Accepted")["reason"],
            "NotAllowedByListeners"
        );
        let again = route_value("app-routes", json!({"parents": app_parents}));
        assert_eq!(
            route_parents(
                &again,
                &statuses(Kind::HttpRoute, "production", "app-routes"),
                Some(7),
                at(60)
            ),
            app_parents
        );
        let no_grant = route_value("no-grant", Value::Null);
        let no_grant = route_parents(
            &no_grant,
            &statuses(Kind::HttpRoute, "istio-system", "no-grant"),
            None,
            at(0),
        );
        assert_eq!(
            condition(&no_grant[0]["conditions"], "ResolvedRefs")["reason"],
            "RefNotPermitted"
        );
        let db = route_value("db", Value::Null);
        let db = route_parents(&db, &statuses(Kind::TlsRoute, "production", "db"), None, at(0));
        assert_eq!(condition(&db[0]["conditions"], "Accepted")["reason"], "Accepted");
        // A route no longer attached to an ingress Gateway loses our entries only.
        assert_eq!(route_parents(&again, &[], Some(7), at(60)), json!([foreign]));

        let golden = json!({
            "gateway": status,
            "routes": {"production/app-routes": app_parents, "istio-system/no-grant": no_grant, "production/db": db},
        });
        let text = format!(
            "# Generated by controller/src/k8s/ingress_status.rs (UPDATE_GOLDEN=1 cargo test -p controller ingress_status).\n{}",
            serde_yaml::to_string(&golden).expect("yaml")
        );
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/ingress-status/status.yaml");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
            std::fs::write(&path, &text).expect("write golden");
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            want == text,
            "{} differs (UPDATE_GOLDEN=1 to rewrite):\n{text}",
            path.display()
        );
    }

    /// Until the load balancer has an address, the gateway is not Programmed, with the reason.
    #[test]
    fn a_gateway_without_an_address_is_not_programmed() {
        let secret = tls_secret("example-com-cert", "*.example.com");
        let pending = SERVICE.replace(
            "status: {loadBalancer: {ingress: [{ip: 203.0.113.10}, {hostname: lb.example.net}]}}",
            "",
        );
        for docs in [vec![GATEWAY, &secret], vec![GATEWAY, &secret, &pending]] {
            let out = translate(&docs);
            let record = &out.deployments[&ObjectKey::new("istio-system", "istio-ingressgateway")];
            let status = gateway_status(record, None, &Value::Null, at(0)).expect("ingress");
            assert_eq!(status["addresses"], json!([]));
            let programmed = condition(&status["conditions"], "Programmed");
            assert_eq!(
                (programmed["status"].as_str(), programmed["reason"].as_str()),
                (Some("False"), Some("AddressNotAssigned"))
            );
        }
        // A ClusterIP gateway (Istio's annotation) is reached at its cluster IP.
        let cluster_ip = GATEWAY.replace(
            "uid: gw-uid,",
            "uid: gw-uid, annotations: {networking.istio.io/service-type: ClusterIP},",
        );
        let out = translate(&[&cluster_ip, &secret, SERVICE]);
        let record = &out.deployments[&ObjectKey::new("istio-system", "istio-ingressgateway")];
        assert_eq!(
            record.ingress.as_ref().map(|i| i.service_type.as_str()),
            Some("ClusterIP")
        );
        let status = gateway_status(record, None, &Value::Null, at(0)).expect("ingress");
        assert_eq!(
            status["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.40"}])
        );
        // A waypoint's record has no ingress status: the waypoint path writes it.
        assert!(gateway_status(&crate::k8s::manifests::tests::record(), None, &Value::Null, at(0)).is_none());
    }
}
