//! The ambient CNI plugin and node agent.
//!
//! - [`plugin`]: the CNI plugin run by the container runtime, chained after the primary
//!   plugin; it asks the node agent to enrol each pod and fails closed when it cannot.
//! - [`agent`]: the node agent: enrolment, redirection rules inside pod namespaces, and the ZDS
//!   server that hands pod namespaces to ztunnel.

pub mod agent;
pub mod plugin;
