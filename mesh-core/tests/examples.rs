//! The shipped example files stay valid.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::Path;

#[test]
fn example_workload_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/workloads.yaml");
    let cfg = mesh_core::xds::workload_file::load(&path).unwrap();
    let (state, errors) = cfg.to_state();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(state.workloads().count(), 2);
    assert_eq!(state.services().count(), 1);
    assert_eq!(state.policies().count(), 1);
}
