//! Property-based fuzzing of the controller's manifest input: arbitrary text, mutated copies
//! of the golden manifests, and documents of every known kind with arbitrary specs go through
//! `parse_text`, translation and rendering. A bad document must be a reported error, never a
//! panic (one file must not take the control plane down). Case count: `PROPTEST_CASES`
//! (default 256); a long run is `PROPTEST_CASES=100000 cargo test --release -p controller --test fuzz`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::Path;

use controller::model::{Inputs, Kind};
use controller::source::manifest_dir::{parse_text, Loaded};
use controller::translate::{render, translate, Options};
use proptest::prelude::*;
use serde_json::{Map, Value};

const GOLDEN: &[&str] = &[
    include_str!("golden/authorization/input.yaml"),
    include_str!("golden/peer-authentication/input.yaml"),
    include_str!("golden/routes/input.yaml"),
    include_str!("golden/waypoints/input.yaml"),
    include_str!("golden/workloads/input.yaml"),
];

/// Parses, translates and renders `text`; returns how many documents were skipped.
fn run(text: &str) -> usize {
    let mut loaded = Loaded::default();
    parse_text(Path::new("fuzz.yaml"), text, &mut loaded);
    let mut inputs = Inputs::default();
    for o in loaded.objects {
        inputs.apply(o);
    }
    let out = translate(&inputs, &Options::default());
    let _ = render::to_json(&out);
    loaded.errors.len()
}

/// One edit to a manifest's lines.
#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    /// Replaces what follows the line's first `: ` (or the whole line) with a scalar.
    Value(usize, String),
    Swap(usize, usize),
    Insert(usize, String),
    Truncate(usize),
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"\"".to_owned()),
        Just("null".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("-1".to_owned()),
        Just("65536".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("10.0.0.0/33".to_owned()),
        Just("::1".to_owned()),
        Just("\"*\"".to_owned()),
        Just("&a [*a]".to_owned()),
        "[a-zA-Z0-9/*.:_-]{0,12}",
        any::<String>().prop_map(|s| format!("{s:?}")),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = any::<usize>();
    prop_oneof![
        i.prop_map(Mutation::Delete),
        i.prop_map(Mutation::Duplicate),
        (i, scalar()).prop_map(|(i, s)| Mutation::Value(i, s)),
        (i, any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (i, "[ ]{0,8}[a-zA-Z-]{0,10}: ?[a-z0-9{}\\[\\]]{0,6}").prop_map(|(i, s)| Mutation::Insert(i, s)),
        i.prop_map(Mutation::Truncate),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for m in mutations {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        let at = |i: usize| i % n;
        match m {
            Mutation::Delete(i) => {
                lines.remove(at(*i));
            }
            Mutation::Duplicate(i) => {
                let l = lines[at(*i)].clone();
                lines.insert(at(*i), l);
            }
            Mutation::Value(i, v) => {
                let l = &mut lines[at(*i)];
                *l = match l.split_once(": ") {
                    Some((k, _)) => format!("{k}: {v}"),
                    None => v.clone(),
                };
            }
            Mutation::Swap(a, b) => {
                let (a, b) = (at(*a), at(*b));
                lines.swap(a, b);
            }
            Mutation::Insert(i, s) => lines.insert(at(*i), s.clone()),
            Mutation::Truncate(i) => lines.truncate(at(*i) + 1),
        }
    }
    lines.join("\n")
}

/// A JSON value shaped like Kubernetes specs: keys the translators read, values of every type.
fn spec_value() -> impl Strategy<Value = Value> {
    let key = proptest::sample::select(
        &[
            "selector",
            "matchLabels",
            "ports",
            "port",
            "targetPort",
            "appProtocol",
            "name",
            "protocol",
            "podIP",
            "podIPs",
            "ip",
            "hostNetwork",
            "serviceAccountName",
            "nodeName",
            "labels",
            "action",
            "rules",
            "from",
            "to",
            "when",
            "source",
            "principals",
            "namespaces",
            "ipBlocks",
            "notPrincipals",
            "operation",
            "methods",
            "paths",
            "hosts",
            "parentRefs",
            "hostnames",
            "matches",
            "path",
            "type",
            "value",
            "backendRefs",
            "weight",
            "gatewayClassName",
            "listeners",
            "jwtRules",
            "issuer",
            "jwksUri",
            "targetRef",
            "targetRefs",
            "mtls",
            "mode",
            "portLevelMtls",
            "clusterIP",
            "clusterIPs",
            "addresses",
            "endpoints",
            "conditions",
            "status",
            "phase",
            "containers",
            "spec",
            "metadata",
            "namespace",
            "kind",
            "group",
            "key",
            "values",
            "filters",
            "requestHeaderModifier",
            "set",
            "add",
            "remove",
            "timeouts",
            "request",
            "outputClaimToHeaders",
            "header",
            "claim",
            "fromHeaders",
            "audiences",
            "provider",
            "headers",
            "exact",
            "prefix",
            "regex",
            "sectionName",
            "allowedRoutes",
            "hostname",
            "ownerReferences",
        ][..],
    );
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (0u64..70000).prop_map(Value::from),
        scalar().prop_map(Value::String),
        proptest::sample::select(
            &[
                "10.0.0.1",
                "10.0.0.0/8",
                "::1",
                "TCP",
                "HTTP",
                "http",
                "ALLOW",
                "DENY",
                "AUDIT",
                "CUSTOM",
                "STRICT",
                "PERMISSIVE",
                "DISABLE",
                "PathPrefix",
                "Exact",
                "RegularExpression",
                "Running",
                "istio-waypoint",
                "Service",
                "Gateway",
                "istio.io/use-waypoint",
                "/admin*",
                "*",
                "GET",
            ][..]
        )
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<Map<_, _>>())),
        ]
    })
}

/// A document of a known kind (right apiVersion most of the time) with an arbitrary spec.
fn known_document() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(Kind::ALL),
        any::<bool>(),
        "[a-z0-9-]{0,10}",
        proptest::option::of("[a-z0-9-]{0,10}"),
        proptest::collection::btree_map("[a-z./-]{1,20}", "[a-z0-9.-]{0,10}", 0..3),
        spec_value(),
        spec_value(),
    )
        .prop_map(|(kind, right_version, name, namespace, labels, spec, status)| {
            let version = if right_version { kind.versions()[0] } else { "v9" };
            let api_version = if kind.group().is_empty() {
                version.to_owned()
            } else {
                format!("{}/{version}", kind.group())
            };
            serde_json::json!({
                "apiVersion": api_version,
                "kind": kind.name(),
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": spec,
                "status": status,
            })
        })
}

proptest! {
    #[test]
    fn manifest_text_never_panics(text in prop_oneof![
        any::<String>(),
        "(---\n|kind: List\n|items:\n|  - |apiVersion: v1\n|kind: Pod\n|[a-z]{1,6}: [a-z0-9]{0,6}\n|&a |\\*a|\\{|\\[){0,24}",
    ]) {
        run(&text);
    }

    #[test]
    fn mutated_golden_manifests(
        golden in proptest::sample::select(GOLDEN),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        run(&mutate(golden, &mutations));
    }

    #[test]
    fn known_kinds_with_arbitrary_specs(
        docs in proptest::collection::vec(known_document(), 1..6),
        as_list in any::<bool>(),
    ) {
        let text = if as_list {
            serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs}).to_string()
        } else {
            docs.iter().map(Value::to_string).collect::<Vec<_>>().join("\n---\n")
        };
        run(&text);
    }
}

/// Unmutated golden manifests parse without a skipped document (the mutations start from
/// valid input).
#[test]
fn golden_manifests_parse_cleanly() {
    for g in GOLDEN {
        assert_eq!(run(g), 0);
    }
}
