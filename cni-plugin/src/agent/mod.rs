//! The node agent.
//!
//! - [`rules`]: the redirection written inside each enrolled pod's network namespace.
//! - [`zds`]: the ZDS server that hands pod namespaces to ztunnel.

pub mod rules;
pub mod zds;
