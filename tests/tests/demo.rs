//! The README's first command, minus the build: the demo binary against `examples/demo/`
//! must finish and print a summary showing mTLS identities, a canary split near 90/10 and the
//! denied payment calls; `meshctl explain` on the same manifests names the policy rule behind
//! each payment outcome the real traffic got (waypoint L7 deny, allow, L4 deny of a bypass).

use std::process::Command;

#[test]
fn demo_prints_identities_split_and_denials() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(mesh_e2e::binary("demo"))
        .args(["--requests", "1000"])
        .current_dir(&root)
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let split = text
        .lines()
        .find(|l| l.starts_with("canary split:"))
        .unwrap_or_else(|| panic!("no split line:\n{text}"));
    let v2: f64 = split
        .split("-> v2 ")
        .nth(1)
        .and_then(|r| r.split('%').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unreadable split line {split:?}"));
    assert!((7.0..=13.0).contains(&v2), "{split}");
    assert!(split.contains("x-canary: true -> v2 100/100"), "{split}");
    assert!(
        text.contains("order-service POST /api/v1/payments: 50× 200 allowed"),
        "{text}"
    );
    assert!(
        text.contains("order-service GET /api/v1/payments: 50× 403 denied"),
        "{text}"
    );
    assert!(
        text.contains("frontend POST /api/v1/payments: 50× 403 denied"),
        "{text}"
    );
    assert!(
        text.contains("frontend POST payments pod directly (bypassing the waypoint): 5× refused"),
        "{text}"
    );
    // `meshctl explain` on the same manifests says what the traffic above got, and why.
    let explain = |args: &[&str]| {
        let out = Command::new(mesh_e2e::binary("meshctl"))
            .args([
                "explain",
                "-f",
                "examples/demo",
                "--method",
                "POST",
                "--path",
                "/api/v1/payments",
            ])
            .args(args)
            .current_dir(&root)
            .output()
            .expect("run meshctl explain");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let frontend = explain(&["--from", "shop/frontend", "--to", "payments.shop"]);
    assert!(
        frontend.contains("ALLOW shop/payments: no rule matches")
            && frontend.contains("DENIED by the waypoint (HTTP 403): no ALLOW policy matched"),
        "{frontend}"
    );
    let order = explain(&["--from", "shop/order-service", "--to", "payments.shop"]);
    assert!(
        order.contains("ALLOW shop/payments: rule 0 matches")
            && order.contains("ALLOW shop/payments-via-waypoint: rule 0 matches")
            && order.contains("ALLOWED: reaches pod shop/payments"),
        "{order}"
    );
    let bypass = explain(&["--from", "shop/frontend", "--to", "shop/payments:8080"]);
    assert!(
        bypass.contains("its service's waypoint is bypassed")
            && bypass.contains("ALLOW shop/payments-via-waypoint: no rule matches")
            && bypass.contains(
                "DENIED by the destination's ztunnel (connection refused): no rule of an ALLOW policy matched"
            ),
        "{bypass}"
    );
    assert!(
        text.contains("spiffe://cluster.local/ns/shop/sa/order-service -> reviews-v1"),
        "identities from Prometheus:\n{text}"
    );
    assert!(text.contains("spiffe://cluster.local/ns/shop/sa/waypoint -> spiffe://cluster.local/ns/shop/sa/reviews"));
}
