//! Real-world Istio resources (`examples/istio-real/`, validated against our CRDs by
//! `scripts/validate-manifests.sh`) through the controller's model and translation: every
//! field is kept (what the model reads re-serializes to what was written; the rest is listed
//! as not implemented), and each field we do not implement is reported exactly once, naming
//! its path, on the object that has it. External authorization (CUSTOM) fails closed and is
//! reported once per policy.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::Path;

use controller::model::{Inputs, Object};
use controller::source::manifest_dir::{parse_text, Loaded};
use controller::translate::{render, translate, Options};
use serde_json::Value;

/// The namespace and Services the examples refer to, so that only their fields are reported.
const CONTEXT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.30, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {clusterIP: 10.96.0.31, selector: {app: ratings}, ports: [{name: http, port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

fn examples() -> Loaded {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/istio-real");
    let mut loaded = Loaded::default();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/istio-real exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable example");
        parse_text(&file, &text, &mut loaded);
    }
    loaded
}

/// The raw spec of each example document, by `<Kind> <ns>/<name>`.
fn raw_specs() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/istio-real");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/istio-real exists") {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue; // the README
        }
        let text = std::fs::read_to_string(&path).expect("readable example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
            let name = format!(
                "{} {}/{}",
                v["kind"].as_str().unwrap_or_default(),
                v["metadata"]["namespace"].as_str().unwrap_or_default(),
                v["metadata"]["name"].as_str().unwrap_or_default()
            );
            out.push((name, v["spec"].clone()));
        }
    }
    out
}

/// The spec as the model holds it, re-serialized, and the paths it does not implement.
fn typed(o: &Object) -> Option<(Value, Vec<String>)> {
    let to = |v: Result<Value, serde_json::Error>| v.expect("the model serializes");
    Some(match o {
        Object::AuthorizationPolicy(o) => (to(serde_json::to_value(&o.spec)), o.unimplemented.clone()),
        Object::PeerAuthentication(o) => (to(serde_json::to_value(&o.spec)), o.unimplemented.clone()),
        Object::RequestAuthentication(o) => (to(serde_json::to_value(&o.spec)), o.unimplemented.clone()),
        Object::VirtualService(o) => (to(serde_json::to_value(&o.spec)), o.unimplemented.clone()),
        Object::DestinationRule(o) => (to(serde_json::to_value(&o.spec)), o.unimplemented.clone()),
        Object::ServiceEntry(o) => (to(serde_json::to_value(&o.spec)), o.unimplemented.clone()),
        Object::WorkloadEntry(o) => (to(serde_json::to_value(&o.spec)), o.unimplemented.clone()),
        Object::Telemetry(o) => (to(serde_json::to_value(&o.spec)), o.unimplemented.clone()),
        _ => return None,
    })
}

/// Every leaf of `raw` is either in `typed` with the same value or under an unimplemented path.
fn lost(raw: &Value, typed: &Value, path: &str, unimplemented: &[String], out: &mut Vec<String>) {
    if unimplemented.iter().any(|u| u == path) {
        return;
    }
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            for (k, v) in r {
                lost(
                    v,
                    t.get(k).unwrap_or(&Value::Null),
                    &format!("{path}.{k}"),
                    unimplemented,
                    out,
                );
            }
        }
        (Value::Array(r), Value::Array(t)) if r.len() == t.len() => {
            for (i, (rv, tv)) in r.iter().zip(t).enumerate() {
                lost(rv, tv, &format!("{path}[{i}]"), unimplemented, out);
            }
        }
        (Value::Number(r), Value::Number(t)) if r.as_f64() == t.as_f64() => {}
        _ if raw == typed => {}
        _ => out.push(format!("{path}: written {raw}, the model holds {typed}")),
    }
}

#[test]
fn every_field_is_kept_either_read_or_listed_as_not_implemented() {
    let loaded = examples();
    let raw = raw_specs();
    let mut checked = 0;
    for o in &loaded.objects {
        let Some((spec, unimplemented)) = typed(o) else {
            continue;
        };
        let name = format!("{} {}", o.kind().name(), o.key());
        let (_, raw_spec) = raw
            .iter()
            .find(|(n, _)| *n == name)
            .expect("the document of the object");
        let mut out = Vec::new();
        lost(raw_spec, &spec, "spec", &unimplemented, &mut out);
        assert!(out.is_empty(), "{name} loses what was written: {out:#?}");
        checked += 1;
    }
    assert_eq!(checked, 9, "every Istio kind the controller reads is in the examples");
}

#[test]
fn each_unimplemented_field_is_reported_once_by_path() {
    let mut loaded = examples();
    parse_text(Path::new("context.yaml"), CONTEXT, &mut loaded);
    // Every kind of the examples is read now (Telemetry was the last).
    assert!(loaded.errors.is_empty(), "skipped documents: {:?}", loaded.errors);
    let mut inputs = Inputs::default();
    for o in loaded.objects {
        inputs.apply(o);
    }
    let out = translate(&inputs, &Options::default());
    let problems = render::to_json(&out)["problems"].clone();
    let problems: Vec<&str> = problems
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let ignored = |kind: &str, path: &str| format!("{kind} shop/{path} is not implemented; ignored");
    let mut expected = vec![
        "AuthorizationPolicy shop/ext-authz: action CUSTOM is not supported at waypoints; enforced as DENY".to_owned(),
        "AuthorizationPolicy shop/ext-authz-workload: CUSTOM (external authorization) needs a waypoint; ztunnel enforces it as a DENY of its L4 part".to_owned(),
        ignored("DestinationRule", "reviews: spec.subsets[1].trafficPolicy.loadBalancer.consistentHash"),
        ignored("DestinationRule", "reviews: spec.trafficPolicy.connectionPool.http.h2UpgradePolicy"),
        ignored("DestinationRule", "reviews: spec.trafficPolicy.connectionPool.http.idleTimeout"),
        // trafficPolicy.tls and portLevelSettings[].tls are applied (TLS origination); a
        // port's load balancer is not.
        ignored("DestinationRule", "reviews: spec.trafficPolicy.portLevelSettings[0].loadBalancer"),
        ignored("RequestAuthentication", "reviews-jwt: spec.jwtRules[0].fromCookies"),
        ignored("RequestAuthentication", "reviews-jwt: spec.jwtRules[0].timeout"),
        ignored("VirtualService", "reviews: spec.exportTo"),
        ignored("VirtualService", "reviews: spec.http[0].corsPolicy"),
        ignored("VirtualService", "reviews: spec.http[0].headers"),
        ignored("VirtualService", "reviews: spec.http[0].match[0].ignoreUriCase"),
        ignored("VirtualService", "reviews: spec.http[0].rewrite"),
        ignored("VirtualService", "reviews: spec.http[1].mirror"),
        ignored("VirtualService", "reviews: spec.http[1].mirrorPercentage"),
    ];
    expected.sort();
    let mut actual: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    actual.sort();
    assert_eq!(actual, expected);
}

#[test]
fn an_unimplemented_field_in_an_authorization_policy_fails_closed_and_is_reported_once() {
    let text = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admins, namespace: shop}
spec:
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/admin"]
            serviceAccounts: ["shop/admin"]
"#;
    let mut loaded = Loaded::default();
    parse_text(Path::new("ap.yaml"), text, &mut loaded);
    let mut inputs = Inputs::default();
    for o in loaded.objects {
        inputs.apply(o);
    }
    let out = translate(&inputs, &Options::default());
    let naming: Vec<_> = out
        .problems
        .iter()
        .filter(|p| p.message.contains("serviceAccounts"))
        .collect();
    assert_eq!(naming.len(), 1, "{:#?}", out.problems);
    assert_eq!(
        naming[0].message,
        "spec.rules[0].from[0].source.serviceAccounts is not implemented; the policy fails closed until it is removed"
    );
    // Fails closed: an ALLOW with no rules (allows nothing) in the namespace, not the rule
    // without its constraint.
    let policy = out.authorizations.get("shop/admins").expect("the policy is published");
    assert!(policy.groups.is_empty(), "{policy:?}");
    assert_eq!(policy.action, mesh_proto::security::Action::Allow as i32);
}

/// Issue 20 item 7: whichever path an object took, a rule with a field we do not enforce
/// fails closed. An ALLOW with an unknown source field never matches (above); a DENY with one
/// denies what it would govern: the connection it names is refused at ztunnel's evaluation.
#[test]
fn a_deny_with_an_unimplemented_field_still_denies() {
    let text = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-intruder, namespace: shop}
spec:
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/intruder"]
            newerSourceField: ["anything"]
---
# A valid ALLOW beside it that admits the intruder: an ALLOW-nothing stand-in for the
# broken DENY would not outweigh it.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: shop}
spec:
  action: ALLOW
  rules: [{from: [{source: {namespaces: [shop]}}]}]
"#;
    let mut loaded = Loaded::default();
    parse_text(Path::new("deny.yaml"), text, &mut loaded);
    let mut inputs = Inputs::default();
    for o in loaded.objects {
        inputs.apply(o);
    }
    let out = translate(&inputs, &Options::default());
    assert!(
        out.problems.iter().any(|p| p.message.contains("newerSourceField")),
        "{:#?}",
        out.problems
    );
    let policies: Vec<mesh_core::rbac::Policy> = out
        .authorizations
        .values()
        .map(|a| mesh_core::rbac::Policy::try_from(a).expect("valid policy"))
        .collect();
    let from = |sa: &str| mesh_core::rbac::ConnectionInfo {
        src_identity: Some(
            format!("spiffe://cluster.local/ns/shop/sa/{sa}")
                .parse()
                .expect("identity"),
        ),
        src_ip: "10.0.0.9".parse().expect("ip"),
        dst: "10.0.0.1:8080".parse().expect("addr"),
    };
    for sa in ["intruder", "someone-else"] {
        assert!(
            matches!(
                mesh_core::rbac::evaluate(&policies, &from(sa)),
                mesh_core::rbac::Decision::Deny(_)
            ),
            "{sa}: a DENY with an unenforced field must not let the connection through"
        );
    }
}
