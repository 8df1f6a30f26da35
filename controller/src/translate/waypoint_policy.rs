//! The L7 policies waypoints enforce: AuthorizationPolicy and RequestAuthentication attached
//! with `targetRefs` to a waypoint Gateway or to a Service, as `mesh.waypoint.v1.Policy`
//! resources. An AuthorizationPolicy that cannot be read is left to `authz.rs`, which makes it
//! allow nothing in its namespace.

use std::collections::BTreeMap;

use mesh_proto::waypoint as wp;

use super::Report;
use crate::model::gateway::{PolicyTargetReference, WAYPOINT_CLASS};
use crate::model::istio;
use crate::model::{Inputs, Kind, ObjectKey};

fn targets(
    refs: impl Iterator<Item = PolicyTargetReference>,
    key: &ObjectKey,
    kind: Kind,
    inputs: &Inputs,
    report: &mut Report,
) -> Vec<wp::Target> {
    let mut out = Vec::new();
    for t in refs {
        let ns = t.namespace.clone().unwrap_or_else(|| key.namespace.clone());
        let target_key = ObjectKey::new(ns.clone(), t.name.clone());
        match (t.group.as_str(), t.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") => {
                let gateway = inputs.gateways.get(&target_key);
                let enforced = gateway
                    .is_some_and(|g| g.spec.gateway_class_name == WAYPOINT_CLASS || super::ingress::is_ingress(g));
                if !enforced {
                    report.add(
                        kind,
                        key,
                        format!(
                            "targetRef Gateway {target_key} is not a waypoint or ingress gateway; nothing enforces \
                             this policy there"
                        ),
                    );
                }
            }
            ("" | "core", "Service") => {
                if !inputs.services.contains_key(&target_key) {
                    report.add(kind, key, format!("targetRef Service {target_key} does not exist"));
                }
            }
            ("networking.istio.io", "ServiceEntry") => {
                // The waypoint knows an entry's hosts as services named after the entry, so the
                // target is that service (a Kubernetes Service of the same name in the namespace
                // would be targeted too).
                if !inputs.service_entries.contains_key(&target_key) {
                    report.add(kind, key, format!("targetRef ServiceEntry {target_key} does not exist"));
                }
                out.push(wp::Target {
                    kind: "Service".to_owned(),
                    namespace: ns,
                    name: t.name.clone(),
                });
                continue;
            }
            (group, k) => {
                report.add(
                    kind,
                    key,
                    format!("targetRef {group}/{k} is not supported (Gateway, Service or ServiceEntry)"),
                );
                continue;
            }
        }
        out.push(wp::Target {
            kind: t.kind.clone(),
            namespace: ns,
            name: t.name.clone(),
        });
    }
    out
}

/// Every AuthorizationPolicy and RequestAuthentication with `targetRefs`, keyed by
/// `<Kind>/<namespace>/<name>`.
pub(crate) fn policies(inputs: &Inputs, report: &mut Report) -> BTreeMap<String, wp::Policy> {
    let mut out = BTreeMap::new();
    for (key, ap) in &inputs.authorization_policies {
        if ap.spec.targets().next().is_none() || ap.invalid.is_some() {
            continue;
        }
        let policy = authorization(inputs, key, ap, report);
        out.insert(format!("AuthorizationPolicy/{key}"), policy);
    }
    for (key, ra) in &inputs.request_authentications {
        if ra.spec.targets().next().is_none() {
            report.add(
                Kind::RequestAuthentication,
                key,
                "JWT authentication is enforced by waypoints: add targetRefs to a waypoint Gateway or Service",
            );
            continue;
        }
        let policy = jwt_authentication(inputs, key, ra, report);
        out.insert(format!("RequestAuthentication/{key}"), policy);
    }
    out
}

fn authorization(inputs: &Inputs, key: &ObjectKey, ap: &istio::AuthorizationPolicy, report: &mut Report) -> wp::Policy {
    let kind = Kind::AuthorizationPolicy;
    let action = match ap.spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => wp::Action::Allow,
        "DENY" => wp::Action::Deny,
        "AUDIT" => wp::Action::Audit,
        other => {
            report.add(
                kind,
                key,
                format!("action {other} is not supported at waypoints; enforced as DENY"),
            );
            wp::Action::Deny
        }
    };
    let rules = ap
        .spec
        .rules
        .iter()
        .flatten()
        .map(|r| wp::Rule {
            from: r
                .from
                .iter()
                .map(|f| {
                    let s = &f.source;
                    wp::Source {
                        principals: s.principals.clone(),
                        not_principals: s.not_principals.clone(),
                        request_principals: s.request_principals.clone(),
                        not_request_principals: s.not_request_principals.clone(),
                        namespaces: s.namespaces.clone(),
                        not_namespaces: s.not_namespaces.clone(),
                        ip_blocks: s.ip_blocks.clone(),
                        not_ip_blocks: s.not_ip_blocks.clone(),
                        remote_ip_blocks: s.remote_ip_blocks.clone(),
                        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                    }
                })
                .collect(),
            to: r
                .to
                .iter()
                .map(|t| {
                    let o = &t.operation;
                    let ports = |v: &[String]| v.iter().filter_map(|p| p.parse().ok()).collect();
                    wp::Operation {
                        hosts: o.hosts.clone(),
                        not_hosts: o.not_hosts.clone(),
                        ports: ports(&o.ports),
                        not_ports: ports(&o.not_ports),
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                    }
                })
                .collect(),
            when: r
                .when
                .iter()
                .map(|c| wp::Condition {
                    key: c.key.clone(),
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                })
                .collect(),
        })
        .collect();
    wp::Policy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        targets: targets(ap.spec.targets().cloned(), key, kind, inputs, report),
        kind: Some(wp::policy::Kind::Authorization(wp::Authorization {
            action: action as i32,
            rules,
            dry_run: super::authz::dry_run(ap),
        })),
    }
}

fn jwt_authentication(
    inputs: &Inputs,
    key: &ObjectKey,
    ra: &istio::RequestAuthentication,
    report: &mut Report,
) -> wp::Policy {
    let kind = Kind::RequestAuthentication;
    let rules = ra
        .spec
        .jwt_rules
        .iter()
        .map(|r| wp::JwtRule {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks_uri: r.jwks_uri.clone().unwrap_or_default(),
            jwks: r.jwks.clone().unwrap_or_default(),
            from_headers: r
                .from_headers
                .iter()
                .map(|h| wp::JwtHeader {
                    name: h.name.clone(),
                    prefix: h.prefix.clone(),
                })
                .collect(),
            from_params: r.from_params.clone(),
            forward_original_token: r.forward_original_token,
            output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|c| wp::ClaimToHeader {
                    header: c.header.clone(),
                    claim: c.claim.clone(),
                })
                .collect(),
        })
        .collect();
    wp::Policy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        targets: targets(ra.spec.targets().cloned(), key, kind, inputs, report),
        kind: Some(wp::policy::Kind::Jwt(wp::JwtAuthentication { rules })),
    }
}
