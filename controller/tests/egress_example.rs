//! `examples/egress/egress.yaml` stays what it says: translated without problems, the external
//! host gets an auto-allocated VIP and the egress waypoint, the policy targets its service,
//! and the mesh config there is REGISTRY_ONLY.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::Path;

use controller::mesh_config::{self, OutboundMode};
use controller::model::Inputs;
use controller::source::manifest_dir::{parse_text, Loaded};
use controller::translate::{render, translate, Options};

#[test]
fn the_egress_example_translates_cleanly() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/egress/egress.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut loaded = Loaded::default();
    parse_text(&path, &text, &mut loaded);
    assert!(
        loaded.errors.is_empty(),
        "{:?}",
        loaded.errors.iter().map(|e| &e.reason).collect::<Vec<_>>()
    );
    let mut inputs = Inputs::default();
    for o in loaded.objects {
        inputs.apply(o);
    }
    // The ConfigMap's `mesh` key is the file the controller mounts (--mesh-config).
    let cm = std::fs::read_to_string(path.with_file_name("istio-configmap.yaml")).unwrap();
    let cm: serde_json::Value = serde_yaml::from_str(&cm).unwrap();
    inputs.mesh = mesh_config::parse(cm["data"]["mesh"].as_str().unwrap()).unwrap();
    assert_eq!(inputs.mesh.outbound_traffic_policy.mode, OutboundMode::RegistryOnly);
    let out = translate(&inputs, &Options::default());
    let json = render::to_json(&out);
    assert_eq!(json["problems"], serde_json::json!([]), "{:#}", json["problems"]);
    let svc = &json["addresses"]["egress/api.example.com"]["service"];
    let vip = svc["addresses"][0].as_str().unwrap();
    assert!(vip.starts_with("240.240."), "{svc:#}");
    assert!(!svc["waypoint"].is_null(), "through the egress waypoint: {svc:#}");
    let policy = &json["waypointPolicies"]["AuthorizationPolicy/egress/example-api-read-only"];
    assert!(policy.to_string().contains("example-api"), "{policy:#}");
}
