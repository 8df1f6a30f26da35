//! The README's first command, minus the build: the demo binary against `examples/demo/`
//! must finish and print a summary showing mTLS identities, a canary split near 90/10 and the
//! denied payment calls.

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
        text.contains("spiffe://cluster.local/ns/shop/sa/order-service -> reviews-v1"),
        "identities from Prometheus:\n{text}"
    );
    assert!(text.contains("spiffe://cluster.local/ns/shop/sa/waypoint -> spiffe://cluster.local/ns/shop/sa/reviews"));
}
