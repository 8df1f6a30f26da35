//! The L7 policies waypoints enforce: AuthorizationPolicy and RequestAuthentication attached
//! with `targetRefs` to a waypoint Gateway or to a Service, as `mesh.waypoint.v1.Policy`
//! resources. An AuthorizationPolicy that is invalid (a spec that does not parse, a field we
//! do not implement) fails closed here too: it is sent as a DENY of every request at its targets (`authz.rs` makes it allow nothing at ztunnel, which neither an
//! ingress gateway nor a waypoint serving other namespaces enforces). Targets in another
//! namespace than the policy's are dropped and reported ([`super::policy_target`]); a policy
//! left with none applies to nothing.

use std::collections::BTreeMap;

use mesh_core::path_template;
use mesh_proto::waypoint as wp;

use super::{policy_target, Report};
use crate::model::gateway::{PolicyTargetReference, WAYPOINT_CLASS};
use crate::model::istio;
use crate::model::{Inputs, Kind, ObjectKey};

/// The waypoint targets of a policy's `targetRef` and `targetRefs`: only those in its own
/// namespace ([`policy_target::own_namespace`]). A policy whose targets were all dropped
/// keeps none and so applies to nothing (it is not namespace-wide: `authz.rs` leaves every
/// policy written with targets to waypoints).
fn targets(
    target_ref: Option<&PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    key: &ObjectKey,
    kind: Kind,
    inputs: &Inputs,
    report: &mut Report,
) -> Vec<wp::Target> {
    let written = usize::from(target_ref.is_some()) + target_refs.len();
    let own = policy_target::own_namespace(target_ref, target_refs, kind, key, report);
    if own.is_empty() && written > 0 {
        report.add(
            kind,
            key,
            "spec.targetRefs: no target is in the policy's namespace; the policy applies to nothing",
        );
    }
    let mut out = Vec::new();
    for (_, t) in own {
        let ns = key.namespace.clone();
        let target_key = ObjectKey::new(ns.clone(), t.name.clone());
        match (t.group.as_str(), t.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") => {
                let gateway = inputs.gateways.get(&target_key);
                let enforced = gateway.is_some_and(enforces_policy);
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
        if ap.spec.targets().next().is_none() && !ap.targets_unknown {
            continue;
        }
        let invalid = ap.invalid.clone().or_else(|| invalid_path_templates(key, ap, report));
        let policy = match &invalid {
            Some(why) => allow_nothing(inputs, key, ap, why, report),
            None => authorization(inputs, key, ap, report),
        };
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

/// Reports each invalid path template (`/{**}/x/{*}`, `/a/{*}.txt`) in `paths` and
/// `notPaths` by field; with one, the reason the policy is invalid. Istio refuses such a
/// policy; here it is invalid like an unreadable one, so it denies at its targets.
fn invalid_path_templates(key: &ObjectKey, ap: &istio::AuthorizationPolicy, report: &mut Report) -> Option<String> {
    let operations = ap.spec.rules.iter().flatten().enumerate().flat_map(|(i, rule)| {
        let to = rule.to.iter().enumerate();
        to.map(move |(j, t)| (format!("spec.rules[{i}].to[{j}].operation"), &t.operation))
    });
    let mut found = false;
    for (path, o) in operations {
        for (field, values) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
            for (k, p) in values.iter().enumerate() {
                let checked = if path_template::is_template(p) {
                    path_template::check(p)
                } else {
                    Ok(())
                };
                if let Err(e) = checked {
                    found = true;
                    report.add(
                        Kind::AuthorizationPolicy,
                        key,
                        format!("{path}.{field}[{k}] {p:?}: {e}"),
                    );
                }
            }
        }
    }
    found.then(|| "spec has invalid path templates (reported by field)".to_owned())
}

/// An invalid policy with targets: it may have been a DENY, so at its targets it denies
/// every request until it is fixed: a DENY whose one empty rule matches everything (an ALLOW
/// without rules would not do: a valid ALLOW beside it that matches would still allow). Targets that cannot be read at all
/// stand for every waypoint and ingress Gateway, Service and ServiceEntry in its namespace.
fn allow_nothing(
    inputs: &Inputs,
    key: &ObjectKey,
    ap: &istio::AuthorizationPolicy,
    why: &str,
    report: &mut Report,
) -> wp::Policy {
    let kind = Kind::AuthorizationPolicy;
    let targets = if ap.targets_unknown {
        everything_in_namespace(inputs, &key.namespace)
    } else {
        targets(
            ap.spec.target_ref.as_ref(),
            &ap.spec.target_refs,
            key,
            kind,
            inputs,
            report,
        )
    };
    let named: Vec<String> = targets
        .iter()
        .map(|t| format!("{} {}/{}", t.kind, t.namespace, t.name))
        .collect();
    let at = if ap.targets_unknown {
        format!(
            "every waypoint, ingress gateway and service in namespace {} (spec.targetRefs unreadable)",
            key.namespace
        )
    } else {
        format!("its targets ({})", named.join(", "))
    };
    report.add(
        kind,
        key,
        format!("{why}; until it is fixed the policy denies every request at {at}"),
    );
    wp::Policy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        targets,
        kind: Some(wp::policy::Kind::Authorization(wp::Authorization {
            action: wp::Action::Deny as i32,
            rules: vec![wp::Rule::default()],
            dry_run: super::authz::dry_run(ap),
        })),
    }
}

/// Every waypoint and ingress Gateway, Service and ServiceEntry in `namespace`: what a
/// policy there could have targeted.
fn everything_in_namespace(inputs: &Inputs, namespace: &str) -> Vec<wp::Target> {
    let target = |kind: &str, name: &str| wp::Target {
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let gateways = inputs
        .gateways
        .iter()
        .filter(|(k, g)| k.namespace == namespace && enforces_policy(g))
        .map(|(k, _)| target("Gateway", &k.name));
    let services = inputs.services.keys().filter(|k| k.namespace == namespace);
    let entries = inputs.service_entries.keys().filter(|k| k.namespace == namespace);
    gateways
        .chain(services.chain(entries).map(|k| target("Service", &k.name)))
        .collect()
}

/// Whether a Gateway enforces the policies targeting it: a waypoint or an ingress gateway.
fn enforces_policy(g: &crate::model::gateway::Gateway) -> bool {
    g.spec.gateway_class_name == WAYPOINT_CLASS || super::ingress::is_ingress(g)
}

/// Kind-level fail-closed at waypoints and ingress gateways, as `authz::unreadable_kinds` is
/// at ztunnel: while AuthorizationPolicy or RequestAuthentication cannot be listed (failing,
/// never listed, so their policies are unknown) every waypoint and ingress gateway denies
/// every request. Keyed like the object policies, under a name no object can have. The
/// problem is reported by `authz::unreadable_kinds`.
pub(crate) fn unreadable_kinds(
    inputs: &Inputs,
    states: &BTreeMap<Kind, crate::source::KindSync>,
    options: &super::Options,
) -> BTreeMap<String, wp::Policy> {
    let gateways: Vec<wp::Target> = inputs
        .gateways
        .iter()
        .filter(|(_, g)| enforces_policy(g))
        .map(|(k, _)| wp::Target {
            kind: "Gateway".to_owned(),
            namespace: k.namespace.clone(),
            name: k.name.clone(),
        })
        .collect();
    let mut out = BTreeMap::new();
    for (&kind, state) in states {
        let governed = matches!(kind, Kind::AuthorizationPolicy | Kind::RequestAuthentication);
        if !governed || state.unreadable().is_none() {
            continue;
        }
        let name = format!("kind-unreadable:{}", kind.name());
        let policy = wp::Policy {
            name: name.clone(),
            namespace: options.root_namespace.clone(),
            targets: gateways.clone(),
            kind: Some(wp::policy::Kind::Authorization(wp::Authorization {
                action: wp::Action::Deny as i32,
                rules: vec![wp::Rule::default()],
                dry_run: false,
            })),
        };
        out.insert(format!("AuthorizationPolicy/{}/{name}", options.root_namespace), policy);
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
        targets: targets(
            ap.spec.target_ref.as_ref(),
            &ap.spec.target_refs,
            key,
            kind,
            inputs,
            report,
        ),
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
        targets: targets(
            ra.spec.target_ref.as_ref(),
            &ra.spec.target_refs,
            key,
            kind,
            inputs,
            report,
        ),
        kind: Some(wp::policy::Kind::Jwt(wp::JwtAuthentication { rules })),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a failed test

    use super::*;
    use crate::source::manifest_dir::{parse_text, Loaded};

    fn inputs(yaml: &str) -> Inputs {
        let mut loaded = Loaded::default();
        parse_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut inputs = Inputs::default();
        for o in loaded.objects {
            inputs.apply(o);
        }
        inputs
    }

    fn translated(yaml: &str) -> (BTreeMap<String, wp::Policy>, Vec<String>) {
        let mut report = Report::default();
        let out = policies(&inputs(yaml), &mut report);
        (out, report.0.into_iter().map(|p| p.message).collect())
    }

    /// Services `evil/web` and `shop/payments`, and a waypoint in each namespace.
    const WORLD: &str = r#"apiVersion: v1
kind: Service
metadata: {name: payments, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: payments}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: evil}
spec: {clusterIP: 10.96.0.11, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: evil}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

    fn targets_of(p: &wp::Policy) -> Vec<(String, String, String)> {
        p.targets
            .iter()
            .map(|t| (t.kind.clone(), t.namespace.clone(), t.name.clone()))
            .collect()
    }

    /// A policy in `evil` naming shop's Service and waypoint: those targets are dropped and
    /// reported by field, its own-namespace target is kept.
    #[test]
    fn foreign_namespace_targets_are_dropped() {
        let (out, problems) = translated(&format!(
            r#"{WORLD}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: grab, namespace: evil}}
spec:
  targetRefs:
  - {{kind: Service, group: "", name: web}}
  - {{kind: Service, group: "", name: payments, namespace: shop}}
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: shop}}
  - {{kind: Service, group: "", name: web, namespace: evil}}
  action: ALLOW
  rules: [{{from: [{{source: {{namespaces: [evil]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: grab-jwt, namespace: evil}}
spec:
  targetRef: {{kind: Service, group: "", name: payments, namespace: shop}}
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  jwtRules: [{{issuer: https://evil.example}}]
"#
        ));
        let ap = &out["AuthorizationPolicy/evil/grab"];
        assert_eq!(
            targets_of(ap),
            [
                ("Service".into(), "evil".into(), "web".into()),
                ("Service".into(), "evil".into(), "web".into())
            ]
        );
        let ra = &out["RequestAuthentication/evil/grab-jwt"];
        assert_eq!(targets_of(ra), [("Gateway".into(), "evil".into(), "waypoint".into())]);
        for (path, policy) in [
            ("spec.targetRefs[1]", &out["AuthorizationPolicy/evil/grab"]),
            ("spec.targetRefs[2]", &out["AuthorizationPolicy/evil/grab"]),
            ("spec.targetRef", &out["RequestAuthentication/evil/grab-jwt"]),
        ] {
            assert!(policy.targets.iter().all(|t| t.namespace != "shop"));
            let expected = format!(
                "{path}.namespace \"shop\": a policy applies only in its own namespace (evil); this target is ignored"
            );
            assert!(problems.contains(&expected), "{expected} not in {problems:?}");
        }
        assert_eq!(problems.iter().filter(|p| p.contains("namespace \"shop\"")).count(), 3);
        assert!(
            !problems.iter().any(|p| p.contains("spec.targetRefs[3]")),
            "{problems:?}"
        );
    }

    /// An AuthorizationPolicy (and a RequestAuthentication) whose only targets are in another
    /// namespace applies to nothing: at the waypoint it targets nothing, and ztunnel does not
    /// take it for a namespace-wide policy.
    #[test]
    fn only_foreign_targets_apply_to_nothing() {
        let inputs = inputs(&format!(
            r#"{WORLD}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-shop, namespace: evil}}
spec:
  targetRefs: [{{kind: Service, group: "", name: payments, namespace: shop}}]
  action: DENY
  rules: [{{}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-evil, namespace: evil}}
spec:
  targetRef: {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: shop}}
  rules: [{{from: [{{source: {{namespaces: [evil]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: grab-jwt, namespace: evil}}
spec:
  targetRefs: [{{kind: Service, group: "", name: payments, namespace: shop}}]
  jwtRules: [{{issuer: https://evil.example}}]
"#
        ));
        let out = crate::translate::translate(&inputs, &crate::translate::Options::default());
        for key in [
            "AuthorizationPolicy/evil/deny-shop",
            "AuthorizationPolicy/evil/allow-evil",
            "RequestAuthentication/evil/grab-jwt",
        ] {
            if let Some(p) = out.waypoint_policies.get(key) {
                assert!(p.targets.is_empty(), "{key}: {:?}", p.targets);
            }
        }
        assert!(
            !out.authorizations.keys().any(|k| k.starts_with("evil/")),
            "no ztunnel (namespace-wide) policy: {:?}",
            out.authorizations.keys()
        );
        let messages: Vec<&str> = out.problems.iter().map(|p| p.message.as_str()).collect();
        for (name, path) in [
            ("deny-shop", "spec.targetRefs[0]"),
            ("allow-evil", "spec.targetRef"),
            ("grab-jwt", "spec.targetRefs[0]"),
        ] {
            assert!(
                out.problems
                    .iter()
                    .any(|p| p.object.name == name && p.message.starts_with(&format!("{path}.namespace \"shop\": "))),
                "{name}: {messages:?}"
            );
        }
    }

    /// An ingress Gateway in `shop` beside WORLD's waypoints.
    const INGRESS: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
"#;

    /// The authorization a policy is sent as: (action, whether its rules are one that
    /// matches everything, targets).
    fn sent(p: &wp::Policy) -> (i32, bool, Vec<(String, String, String)>) {
        match &p.kind {
            Some(wp::policy::Kind::Authorization(a)) => (a.action, a.rules == [wp::Rule::default()], targets_of(p)),
            other => panic!("not an authorization: {other:?}"),
        }
    }

    /// Invalid policies on the ingress Gateway and the waypoint (a misspelt field the CRD
    /// keeps, a spec that does not parse) are sent as a DENY of every request at their
    /// targets, and reported so.
    #[test]
    fn invalid_policies_deny_everything_at_their_targets() {
        let (out, problems) = translated(&format!(
            r#"{WORLD}{INGRESS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-bad-ips, namespace: shop}}
spec:
  targetRefs:
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: public}}
  - {{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}
  action: DENY
  rules: [{{from: [{{source: {{remoteIPBlocks: [203.0.113.0/24]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: unparsable, namespace: shop}}
spec:
  targetRef: {{kind: Gateway, group: gateway.networking.k8s.io, name: public}}
  action: DENY
  rules: not-a-list
"#
        ));
        let gateway = |name: &str| ("Gateway".to_owned(), "shop".to_owned(), name.to_owned());
        let deny = wp::Action::Deny as i32;
        assert_eq!(
            sent(&out["AuthorizationPolicy/shop/deny-bad-ips"]),
            (deny, true, vec![gateway("public"), gateway("waypoint")])
        );
        assert_eq!(
            sent(&out["AuthorizationPolicy/shop/unparsable"]),
            (deny, true, vec![gateway("public")])
        );
        for (name, at) in [
            (
                "deny-bad-ips",
                "its targets (Gateway shop/public, Gateway shop/waypoint)",
            ),
            ("unparsable", "its targets (Gateway shop/public)"),
        ] {
            let expected = format!("the policy denies every request at {at}");
            assert!(
                problems.iter().any(|p| p.ends_with(&expected)),
                "{name}: {expected} not in {problems:?}"
            );
        }
    }

    /// A spec that does not parse and whose targets cannot be read either denies at every
    /// waypoint, ingress gateway and service of its namespace, and nowhere else.
    #[test]
    fn unreadable_targets_deny_everything_in_the_namespace() {
        let (out, problems) = translated(&format!(
            r#"{WORLD}{INGRESS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: broken, namespace: shop}}
spec:
  targetRefs: {{kind: Gateway, name: public}}
  action: DENY
"#
        ));
        let target = |kind: &str, name: &str| (kind.to_owned(), "shop".to_owned(), name.to_owned());
        assert_eq!(
            sent(&out["AuthorizationPolicy/shop/broken"]),
            (
                wp::Action::Deny as i32,
                true,
                vec![
                    target("Gateway", "public"),
                    target("Gateway", "waypoint"),
                    target("Service", "payments")
                ]
            )
        );
        assert!(
            problems
                .iter()
                .any(|p| p
                    .contains("denies every request at every waypoint, ingress gateway and service in namespace shop")),
            "{problems:?}"
        );
    }

    /// While AuthorizationPolicy cannot be listed, every waypoint and ingress gateway denies
    /// everything (ztunnel's stand-in does not reach them); once listed, no stand-in.
    #[test]
    fn an_unreadable_kind_denies_everything_at_every_gateway() {
        use crate::source::KindSync;
        let inputs = inputs(&format!("{WORLD}{INGRESS}"));
        let options = crate::translate::Options::default();
        let failing = |listed| KindSync::Failing {
            reason: "403 forbidden".to_owned(),
            listed,
        };
        let states = BTreeMap::from([(Kind::AuthorizationPolicy, failing(false))]);
        let out = crate::translate::translate_synced(&inputs, &states, &options);
        let name = format!(
            "AuthorizationPolicy/{}/kind-unreadable:AuthorizationPolicy",
            options.root_namespace
        );
        let gateway = |ns: &str, name: &str| ("Gateway".to_owned(), ns.to_owned(), name.to_owned());
        assert_eq!(
            sent(&out.waypoint_policies[&name]),
            (
                wp::Action::Deny as i32,
                true,
                vec![
                    gateway("evil", "waypoint"),
                    gateway("shop", "public"),
                    gateway("shop", "waypoint")
                ]
            )
        );
        let states = BTreeMap::from([(Kind::AuthorizationPolicy, failing(true))]);
        let out = crate::translate::translate_synced(&inputs, &states, &options);
        assert!(!out.waypoint_policies.contains_key(&name));
    }

    /// A DENY with an invalid path template (`{**}` not last) on the ingress Gateway is
    /// refused like an invalid policy: the field is reported and the policy denies every
    /// request there. Valid templates and Istio's `*` forms are sent as written.
    #[test]
    fn invalid_path_templates_make_the_policy_deny_everything() {
        let (out, problems) = translated(&format!(
            r#"{WORLD}{INGRESS}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: shop}}
spec:
  targetRef: {{kind: Gateway, group: gateway.networking.k8s.io, name: public}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/admin*"]}}}}]
  - to: [{{operation: {{paths: ["/ok/{{*}}"]}}}}, {{operation: {{notPaths: ["/x/{{*}}", "/{{**}}/a/{{*}}"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-valid, namespace: shop}}
spec:
  targetRef: {{kind: Gateway, group: gateway.networking.k8s.io, name: public}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin/{{**}}", "/api/{{*}}/secret", "*.php"]}}}}]}}]
"#
        ));
        let public = vec![("Gateway".to_owned(), "shop".to_owned(), "public".to_owned())];
        assert_eq!(
            sent(&out["AuthorizationPolicy/shop/deny-admin"]),
            (wp::Action::Deny as i32, true, public)
        );
        let expected = "spec.rules[1].to[1].operation.notPaths[1] \"/{**}/a/{*}\": {**} must be the last operator of \
                        a path template";
        assert!(problems.iter().any(|p| p == expected), "{problems:?}");
        let denies = "spec has invalid path templates (reported by field); until it is fixed the policy denies";
        assert!(problems.iter().any(|p| p.starts_with(denies)), "{problems:?}");
        let Some(wp::policy::Kind::Authorization(valid)) = &out["AuthorizationPolicy/shop/deny-valid"].kind else {
            panic!("not an authorization");
        };
        assert_eq!(valid.rules[0].to[0].paths, ["/admin/{**}", "/api/{*}/secret", "*.php"]);
        assert_eq!(
            problems.iter().filter(|p| p.contains(".operation.")).count(),
            1,
            "only the invalid template is reported: {problems:?}"
        );
    }
}
