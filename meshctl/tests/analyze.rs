//! `meshctl analyze` on fixture manifests: one directory per mistake under
//! tests/fixtures/analyze/<case>/ with `expected.txt` holding every finding and fix line
//! (empty for a clean case), and the valid examples of examples/brief/ finding nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use meshctl::analyze::{self, Severity};
use meshctl::style::Style;

fn fixture(case: &str) -> PathBuf {
    Path::new("tests/fixtures/analyze").join(case)
}

fn rendered(paths: &[PathBuf]) -> (analyze::Report, String) {
    let report = analyze::run(paths).expect("fixtures load");
    let text: String = report
        .findings
        .iter()
        .map(|f| f.render(Style::plain()) + "\n")
        .collect();
    (report, text)
}

#[test]
fn every_fixture_produces_exactly_its_expected_findings() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir("tests/fixtures/analyze")
        .expect("fixture dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 7, "{cases:?}");
    for case in cases {
        let expected = std::fs::read_to_string(case.join("expected.txt")).expect("expected.txt");
        let (_, got) = rendered(std::slice::from_ref(&case));
        assert_eq!(got, expected, "case {}", case.display());
    }
}

fn assert_finding(case: &str, head: &str, fix: &str) {
    let (_, text) = rendered(&[fixture(case)]);
    let lines: Vec<&str> = text.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with(head))
        .unwrap_or_else(|| panic!("{case}: no line starting {head:?} in\n{text}"));
    assert_eq!(
        lines.get(i + 1).copied(),
        Some(format!("  fix: {fix}").as_str()),
        "{case}:\n{text}"
    );
}

#[test]
fn l7_fields_in_a_selector_policy_are_one_finding() {
    assert_finding(
        "l7-selector",
        "ERROR AuthorizationPolicy shop/payments-post-only: uses a selector with L7 fields (to.operation.methods, to.operation.paths, when request.headers[x-tier]): only ztunnel sees it and ztunnel cannot enforce L7 fields",
        "attach it to a waypoint with targetRefs (kind Gateway or Service) and deploy a waypoint",
    );
    // The controller reports the same cause; it is folded into meshctl's finding.
    let corpus = analyze::load(&[fixture("l7-selector")]).unwrap();
    let raw = controller::translate::translate(&corpus.inputs, &Default::default()).problems;
    assert!(
        raw.iter()
            .any(|p| p.object.name == "payments-post-only" && p.message.contains("cannot be enforced by ztunnel")),
        "{raw:?}"
    );
    let report = analyze::analyze(&corpus);
    assert_eq!(report.findings.len(), 1, "{:?}", report.findings);
}

#[test]
fn use_waypoint_naming_a_missing_gateway() {
    assert_finding(
        "missing-waypoint",
        "ERROR Namespace shop: istio.io/use-waypoint names Gateway shop/shop-waypoint, which does not exist",
        "create it: meshctl waypoint apply -n shop --name shop-waypoint",
    );
    assert_finding(
        "missing-waypoint",
        "ERROR Service shop/payments: istio.io/use-waypoint names Gateway infra/payments-waypoint, which does not exist",
        "create it: meshctl waypoint apply -n infra --name payments-waypoint",
    );
    // The pod inheriting the namespace label is covered by the namespace's finding.
    let (report, _) = rendered(&[fixture("missing-waypoint")]);
    assert!(report.findings.iter().all(|f| f.kind != "Pod"), "{:?}", report.findings);
}

#[test]
fn ambient_pods_on_a_node_without_ztunnel() {
    assert_finding(
        "node-without-ztunnel",
        "ERROR Namespace shop: ambient pods shop/web-2 run on node node-b, where no ztunnel pod runs",
        "the ztunnel DaemonSet must run on node node-b (check its tolerations/nodeSelector)",
    );
    let (report, _) = rendered(&[fixture("nodes-unknown")]);
    assert!(report.findings.is_empty(), "no ztunnel pods and no nodes: skipped");
    assert_eq!(report.ignored, [("Deployment".to_owned(), 1)]);
}

#[test]
fn strict_mtls_with_plaintext_clients() {
    let fix =
        "enrol the clients' namespace (istio.io/dataplane-mode=ambient) or use PERMISSIVE for the ports they call";
    assert_finding(
        "strict-plaintext-clients",
        "WARN PeerAuthentication shop/default: mode STRICT while pods run outside the mesh: plaintext clients such as pod legacy/client cannot reach pods in namespace shop",
        fix,
    );
    assert_finding(
        "mesh-wide-strict",
        "WARN PeerAuthentication istio-system/default: mode STRICT while pods run outside the mesh: plaintext clients such as pod shop/batch-job",
        fix,
    );
}

#[test]
fn unparsable_documents_are_findings_with_file_and_index() {
    let (report, _) = rendered(&[fixture("parse-error")]);
    let docs: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.kind == "Document")
        .map(|f| f.object.as_str())
        .collect();
    assert_eq!(
        docs,
        [
            "tests/fixtures/analyze/parse-error/manifests.yaml document 1",
            "tests/fixtures/analyze/parse-error/manifests.yaml document 2"
        ]
    );
    assert!(report.findings.iter().all(|f| f.severity == Severity::Error));
}

fn brief_examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/brief");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/brief")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_brief_examples_are_clean() {
    let files = brief_examples();
    assert!(files.len() >= 8, "{files:?}");
    let (report, text) = rendered(&files);
    assert!(report.findings.is_empty(), "{text}");
    assert!(report.objects >= 10);
}

fn meshctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    c.env("NO_COLOR", "1");
    c
}

#[test]
fn exit_codes_zero_clean_one_findings_two_usage() {
    let clean = meshctl().arg("analyze").args(brief_examples()).output().unwrap();
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).starts_with("no findings"));

    let bad = meshctl()
        .args(["analyze"])
        .arg(fixture("l7-selector"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(!out.contains('\x1b'), "no colour when piped");
    assert!(out.lines().last().unwrap_or("").starts_with("1 finding(s)"), "{out}");

    let usage = meshctl().args(["analyze", "--no-such-flag"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let missing = meshctl().args(["analyze", "/no/such/path"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/path"));
}
