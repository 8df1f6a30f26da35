//! The node agent.
//!
//! - [`enrol`]: which pods are captured.
//! - [`rules`]: the redirection written inside each enrolled pod's network namespace.
//! - [`zds`]: the ZDS server that hands pod namespaces to ztunnel.

pub mod enrol;
pub mod rules;
pub mod zds;
