//! `meshctl explain` on the demo's manifests: each payment call is explained by the policy rule
//! that decides it — the waypoint's L7 ALLOW, the L4 rule at the pod's ztunnel for a call that
//! bypasses the waypoint, STRICT mutual TLS for a plaintext client — and the canary header
//! picks its route. The demo's end-to-end test checks the same verdicts against real traffic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::PathBuf;

use meshctl::explain::{call, run, Call, Enforcer, Verdict};

fn demo() -> Vec<PathBuf> {
    vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo")]
}

fn ask(from: &str, to: &str, method: &str, headers: &[&str]) -> (Verdict, String) {
    let (to, port) = call::parse_target(to, 80).unwrap();
    let c = Call {
        from: call::parse_source(from).unwrap(),
        to,
        port,
        method: method.to_owned(),
        path: "/api/v1/payments".to_owned(),
        headers: headers.iter().map(|h| call::parse_header(h).unwrap()).collect(),
    };
    let ex = run(&demo(), &c).unwrap();
    (ex.verdict.clone(), ex.render())
}

#[test]
fn payment_calls_are_explained_by_the_rule_that_decides() {
    let (v, text) = ask("shop/frontend", "payments.shop", "POST", &[]);
    assert_eq!(
        v,
        Verdict::Denied {
            by: Enforcer::Waypoint,
            reason: "no ALLOW policy matched".into()
        },
        "{text}"
    );
    assert!(text.contains("ALLOW shop/payments: no rule matches"), "{text}");

    let (v, text) = ask("shop/order-service", "payments.shop.svc.cluster.local", "POST", &[]);
    assert!(
        matches!(v, Verdict::Allowed { ref backend } if backend.starts_with("pod shop/payments ")),
        "{text}"
    );
    assert!(text.contains("ALLOW shop/payments: rule 0 matches"), "{text}");
    assert!(
        text.contains("peer spiffe://cluster.local/ns/shop/sa/waypoint"),
        "{text}"
    );

    let (v, text) = ask("shop/order-service", "payments.shop", "GET", &[]);
    assert!(
        matches!(
            v,
            Verdict::Denied {
                by: Enforcer::Waypoint,
                ..
            }
        ),
        "{text}"
    );

    let (v, text) = ask("shop/frontend", "shop/payments:8080", "POST", &[]);
    assert_eq!(
        v,
        Verdict::Denied {
            by: Enforcer::DestinationZtunnel,
            reason: "no rule of an ALLOW policy matched".into()
        },
        "{text}"
    );
    assert!(text.contains("waypoint is bypassed"), "{text}");
}

#[test]
fn plaintext_clients_meet_strict_and_headers_pick_routes() {
    let (v, text) = ask("10.99.0.1", "reviews.shop", "GET", &[]);
    assert_eq!(
        v,
        Verdict::Denied {
            by: Enforcer::DestinationZtunnel,
            reason: "DENY policy shop/istio_peer_authentication_strict rule 0 matched".into()
        },
        "{text}"
    );
    let (v, text) = ask("shop/order-service", "reviews.shop", "GET", &["x-canary: true"]);
    assert!(
        matches!(v, Verdict::Allowed { ref backend } if backend.starts_with("pod shop/reviews-v2 ")),
        "{text}"
    );
    assert!(text.contains("route HTTPRoute/shop/reviews-canary/rules[0]"), "{text}");
    let (_, text) = ask("shop/order-service", "reviews.shop", "GET", &[]);
    assert!(
        text.contains("reviews-v1.shop.svc.cluster.local:80 (weight 90)"),
        "{text}"
    );
}

#[test]
fn unknown_callers_and_services_are_errors() {
    let c = Call {
        from: call::parse_source("shop/nobody").unwrap(),
        to: call::Target::Host("payments.shop".into()),
        port: 80,
        method: "GET".into(),
        path: "/".into(),
        headers: Vec::new(),
    };
    let err = run(&demo(), &c).unwrap_err().to_string();
    assert!(err.contains("pod shop/nobody is not in the manifests"), "{err}");
}
