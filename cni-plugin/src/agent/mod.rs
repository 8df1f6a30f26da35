//! The node agent.
//!
//! - [`enrol`]: which pods are captured.
//! - [`scan`]: finding the namespace of a pod that never came through CNI.
//! - [`rules`]: the redirection written inside each enrolled pod's network namespace.
//! - [`host`]: probe SNAT in the node's namespace.
//! - [`metrics`]: what the agent counts.
//! - [`pods`]: pods and namespaces from the local manifest directory.
//! - [`server`]: the HTTP API the CNI plugin calls.
//! - [`zds`]: the ZDS server that hands pod namespaces to ztunnel.

pub mod enrol;
pub mod host;
pub mod metrics;
pub mod pods;
pub mod rules;
pub mod scan;
pub mod server;
pub mod zds;
