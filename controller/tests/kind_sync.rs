//! Issue 20, item 1: a kind the controller cannot list. The controller loop is driven with the
//! same changes the Kubernetes watches send (`Change::KindState` for each kind's state), and
//! the published policies are evaluated with ztunnel's own RBAC code, so "denied" means what
//! the data plane would do.
//!
//! Must show: AuthorizationPolicy list forbidden → ready, other kinds served, the affected
//! workloads deny by default, the problem reported; access granted later (the watch lists
//! it) → normal service, no restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::collections::BTreeMap;
use std::time::Duration;

use controller::core::{self, Debounce, Published};
use controller::model::{Kind, Object};
use controller::source::{Change, KindSync};
use controller::translate::{translate_synced, Options, Outputs};
use mesh_core::identity::Identity;
use mesh_core::rbac::{self, ConnectionInfo, Decision};
use mesh_proto::security as pb;
use serde_json::json;
use tokio::sync::{mpsc, watch};

const POD_IP: &str = "10.0.0.5";

fn objects() -> Vec<Object> {
    let docs = [
        json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "app", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "app", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
                "conditions": [{"type": "Ready", "status": "True"}]}}),
    ];
    docs.into_iter()
        .map(|d| Object::parse(d).expect("valid object"))
        .collect()
}

fn forbidden(listed: bool) -> KindSync {
    KindSync::Failing {
        reason: "ApiError: authorizationpolicies.security.istio.io is forbidden (403)".into(),
        listed,
    }
}

/// What ztunnel decides for a mutual-TLS connection to the pod from `client` in `app`.
fn decide(out: &Outputs, client_sa: &str, plaintext: bool) -> Decision {
    let policies: Vec<rbac::Policy> = out
        .authorizations
        .values()
        .filter(|a| {
            a.scope == pb::Scope::Global as i32 || (a.scope == pb::Scope::Namespace as i32 && a.namespace == "app")
        })
        .map(|a| rbac::Policy::try_from(a).expect("the controller's policies decode"))
        .collect();
    let conn = ConnectionInfo {
        src_identity: (!plaintext).then(|| Identity {
            trust_domain: "cluster.local".into(),
            namespace: "app".into(),
            service_account: client_sa.into(),
        }),
        src_ip: "10.0.0.9".parse().expect("ip"),
        dst: format!("{POD_IP}:8080").parse().expect("addr"),
    };
    rbac::evaluate(&policies, &conn)
}

fn has_workload(out: &Outputs) -> bool {
    out.addresses.keys().any(|k| k.contains("app/web"))
}

fn kind_problems(out: &Outputs, kind: Kind) -> Vec<String> {
    out.problems
        .iter()
        .filter(|p| p.kind == kind && p.object.name == "*")
        .map(|p| p.message.clone())
        .collect()
}

/// The pure decision: (inputs, per-kind state) → outputs.
#[test]
fn unreadable_security_kinds_fail_closed_others_keep_serving() {
    let mut inputs = controller::model::Inputs::default();
    objects().into_iter().for_each(|o| inputs.apply(o));
    let options = Options::default();
    let synced: BTreeMap<Kind, KindSync> = Kind::ALL.iter().map(|&k| (k, KindSync::Synced)).collect();

    let normal = translate_synced(&inputs, &synced, &options);
    assert!(has_workload(&normal));
    assert_eq!(decide(&normal, "client", false), Decision::Allow);
    assert!(kind_problems(&normal, Kind::AuthorizationPolicy).is_empty());

    // AuthorizationPolicy never listed: everything is denied, reported.
    let mut states = synced.clone();
    states.insert(Kind::AuthorizationPolicy, forbidden(false));
    let out = translate_synced(&inputs, &states, &options);
    assert!(has_workload(&out), "other kinds are served");
    assert!(matches!(decide(&out, "client", false), Decision::Deny(_)));
    let problems = kind_problems(&out, Kind::AuthorizationPolicy);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("unreadable") && problems[0].contains("403"),
        "{problems:?}"
    );

    // Failing after a good list: the last good state is served (no stand-in), reported.
    states.insert(Kind::AuthorizationPolicy, forbidden(true));
    let out = translate_synced(&inputs, &states, &options);
    assert_eq!(decide(&out, "client", false), Decision::Allow);
    assert!(kind_problems(&out, Kind::AuthorizationPolicy)[0].contains("last good state"));

    // PeerAuthentication unreadable: STRICT everywhere (mTLS allowed, plaintext denied).
    let mut states = synced.clone();
    states.insert(Kind::PeerAuthentication, forbidden(false));
    let out = translate_synced(&inputs, &states, &options);
    assert_eq!(decide(&out, "client", false), Decision::Allow);
    assert!(matches!(decide(&out, "client", true), Decision::Deny(_)));

    // RequestAuthentication unreadable: allows nothing.
    let mut states = synced.clone();
    states.insert(Kind::RequestAuthentication, forbidden(false));
    assert!(matches!(
        decide(&translate_synced(&inputs, &states, &options), "client", false),
        Decision::Deny(_)
    ));

    // A non-security kind failing: reported, no policy change.
    let mut states = synced.clone();
    states.insert(Kind::HttpRoute, forbidden(false));
    let out = translate_synced(&inputs, &states, &options);
    assert_eq!(decide(&out, "client", false), Decision::Allow);
    assert_eq!(kind_problems(&out, Kind::HttpRoute).len(), 1);

    // A kind that is simply not served (no CRD): empty, nothing fails closed.
    let mut states = synced;
    states.insert(Kind::AuthorizationPolicy, KindSync::NotServed);
    let out = translate_synced(&inputs, &states, &options);
    assert_eq!(decide(&out, "client", false), Decision::Allow);
    assert!(kind_problems(&out, Kind::AuthorizationPolicy).is_empty());
}

async fn next(published: &mut watch::Receiver<Published>) -> Published {
    tokio::time::timeout(Duration::from_secs(10), published.changed())
        .await
        .expect("published in time")
        .expect("core running");
    published.borrow_and_update().clone()
}

/// The same through the controller loop, as the watches would drive it.
#[tokio::test]
async fn forbidden_authorization_policies_then_granted() {
    let (tx, rx) = mpsc::channel(64);
    let core = core::start(rx, Options::default(), Debounce::default());
    let mut published = core.published.clone();
    for &kind in Kind::ALL.iter().filter(|&&k| k != Kind::AuthorizationPolicy) {
        let objects = match kind {
            Kind::Namespace | Kind::Pod => objects().into_iter().filter(|o| o.kind() == kind).collect(),
            _ => Vec::new(),
        };
        tx.send(Change::Replace(kind, objects)).await.expect("send");
        tx.send(Change::KindState(kind, KindSync::Synced)).await.expect("send");
    }
    tx.send(Change::KindState(Kind::AuthorizationPolicy, forbidden(false)))
        .await
        .expect("send");
    tx.send(Change::Synced).await.expect("send");

    let p = next(&mut published).await;
    assert!(p.synced, "ready although a kind cannot be listed");
    let mut registry = prometheus_client::registry::Registry::default();
    core.kind_metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains(r#"kind_state{kind="AuthorizationPolicy",state="unreadable"} 1"#),
        "{text}"
    );
    assert_eq!(p.kinds.get(&Kind::AuthorizationPolicy), Some(&forbidden(false)));
    assert!(has_workload(&p.outputs), "other kinds served");
    assert!(matches!(decide(&p.outputs, "client", false), Decision::Deny(_)));
    assert!(p
        .problems
        .iter()
        .any(|x| x.kind == Kind::AuthorizationPolicy && x.message.contains("unreadable")));

    // Access granted: the watch lists the kind (one ALLOW for "client") and reports it synced.
    let allow = Object::parse(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-client", "namespace": "app"},
        "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {
            "principals": ["cluster.local/ns/app/sa/client"]}}]}]}
    }))
    .expect("policy");
    tx.send(Change::Replace(Kind::AuthorizationPolicy, vec![allow]))
        .await
        .expect("send");
    tx.send(Change::KindState(Kind::AuthorizationPolicy, KindSync::Synced))
        .await
        .expect("send");
    let p = next(&mut published).await;
    assert_eq!(p.kinds.get(&Kind::AuthorizationPolicy), Some(&KindSync::Synced));
    assert_eq!(decide(&p.outputs, "client", false), Decision::Allow);
    assert!(matches!(decide(&p.outputs, "other", false), Decision::Deny(_)));
    assert!(!p.problems.iter().any(|x| x.object.name == "*"), "{:?}", p.problems);
}
