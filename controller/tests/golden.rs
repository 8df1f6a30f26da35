//! Golden tests of translation: each directory under `tests/golden/` holds `input.yaml`
//! (manifests as a user writes them) and `expected.json` (the workload xDS, authorization,
//! waypoint configuration and problems the controller must produce). Run with
//! `UPDATE_GOLDEN=1` to rewrite the expectations after an intended change, then review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::Path;

use controller::model::Inputs;
use controller::source::manifest_dir::{parse_text, Loaded};
use controller::translate::{render, translate, Options};

fn check(case: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(case);
    let input = dir.join("input.yaml");
    let text = std::fs::read_to_string(&input).unwrap_or_else(|e| panic!("reading {}: {e}", input.display()));
    let mut loaded = Loaded::default();
    parse_text(&input, &text, &mut loaded);
    let mut inputs = Inputs::default();
    for o in loaded.objects {
        inputs.apply(o);
    }
    let out = translate(&inputs, &Options::default());
    let mut actual = render::to_json(&out);
    actual["skippedDocuments"] = loaded
        .errors
        .iter()
        .map(|e| format!("document {}: {}", e.index, e.reason))
        .collect();
    let actual = serde_json::to_string_pretty(&actual).expect("JSON values serialize") + "\n";
    let expected_path = dir.join("expected.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            expected_path.display()
        )
    });
    if expected != actual {
        panic!(
            "{case}: translation differs from {} (- expected, + actual)\n{}",
            expected_path.display(),
            unified_diff(&expected, &actual)
        );
    }
}

/// A unified line diff, aligned across inserted and removed lines, cut to a readable length.
fn unified_diff(expected: &str, actual: &str) -> String {
    const MAX_LINES: usize = 200;
    let diff = similar::TextDiff::from_lines(expected, actual)
        .unified_diff()
        .context_radius(3)
        .header("expected.json", "actual")
        .to_string();
    let total = diff.lines().count();
    let mut shown: Vec<&str> = diff.lines().take(MAX_LINES).collect();
    let more = format!("... {} more diff lines", total.saturating_sub(MAX_LINES));
    if total > MAX_LINES {
        shown.push(&more);
    }
    shown.join("\n")
}

#[test]
fn diff_aligns_after_an_inserted_line() {
    let expected = "{\n  \"a\": 1,\n  \"b\": 2,\n  \"c\": 3\n}\n";
    let actual = "{\n  \"a\": 1,\n  \"new\": 0,\n  \"b\": 2,\n  \"c\": 3\n}\n";
    let diff = unified_diff(expected, actual);
    let changed: Vec<&str> = diff
        .lines()
        .filter(|l| (l.starts_with('+') || l.starts_with('-')) && !l.starts_with("+++") && !l.starts_with("---"))
        .collect();
    // One inserted line is one change, not every line after it.
    assert_eq!(changed, ["+  \"new\": 0,"], "{diff}");
}

#[test]
fn workloads() {
    check("workloads");
}

#[test]
fn waypoints() {
    check("waypoints");
}

#[test]
fn authorization() {
    check("authorization");
}

#[test]
fn peer_authentication() {
    check("peer-authentication");
}

#[test]
fn routes() {
    check("routes");
}

/// Cross-namespace backendRefs and parentRefs: accepted with a ReferenceGrant in the target
/// namespace, refused (RefNotPermitted) without one.
#[test]
fn reference_grants() {
    check("reference-grants");
}

/// ServiceEntries: services per host, auto-allocated VIPs, endpoints as workloads, selectors,
/// the egress waypoint, and each field ztunnel cannot honour reported.
#[test]
fn service_entries() {
    check("service-entries");
}

/// TLS origination at an egress waypoint: DestinationRule `tls` (SIMPLE, MUTUAL, port-level
/// DISABLE), credentialName Secrets in the waypoint's credentials (no key material shown),
/// file paths and ISTIO_MUTUAL to an external host reported.
#[test]
fn egress_tls() {
    check("egress-tls");
}
