//! `meshctl analyze --remote`: two clusters' manifests analyzed as the controller merges them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::PathBuf;

use meshctl::analyze;

const DIR: &str = "tests/fixtures/multicluster";

/// A service whose ports differ between clusters and a network without an east-west gateway
/// are findings, each with its fix; the local cluster alone is clean.
#[test]
fn differing_ports_and_a_network_without_gateway_are_findings() {
    let local = [PathBuf::from(DIR).join("c68")];
    let alone = analyze::run_multicluster(&local, "c68", &[]).expect("load");
    assert!(alone.findings.is_empty(), "{:?}", alone.findings);
    let remotes = [("c69".to_owned(), PathBuf::from(DIR).join("c69"))];
    let report = analyze::run_multicluster(&local, "c68", &remotes).expect("load");
    let ports = report
        .findings
        .iter()
        .find(|f| f.kind == "Service" && f.object == "shop/echo")
        .expect("ports finding");
    assert!(
        ports
            .message
            .contains("ports differ between clusters: [80->9090] in cluster c69, [80->8080] here"),
        "{}",
        ports.message
    );
    assert!(ports.fix.contains("same ports"), "{}", ports.fix);
    let network = report
        .findings
        .iter()
        .find(|f| f.message.contains("no east-west gateway"))
        .expect("network finding");
    assert!(
        network.message.contains("\"net-b\" (cluster c69)"),
        "{}",
        network.message
    );
    assert!(network.fix.contains("istio-east-west"), "{}", network.fix);
    assert_eq!(report.findings.len(), 2, "{:?}", report.findings);
}
