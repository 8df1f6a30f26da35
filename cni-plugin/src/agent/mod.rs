//! The node agent.
//!
//! - [`enrol`]: which pods are captured.
//! - [`scan`]: finding the namespace of a pod that never came through CNI.
//! - [`netns`]: which network namespace a path reaches (compared, never the path).
//! - [`serial`]: one operation at a time per container.
//! - [`rules`]: the redirection written inside each enrolled pod's network namespace.
//! - [`netlink`]: the pod's return path (policy rule, route) over rtnetlink.
//! - [`nft`]: nftables through libnftables, in-process.
//! - [`host`]: probe SNAT in the node's namespace.
//! - [`metrics`]: what the agent counts.
//! - [`pods`]: the pods and namespaces enrolment is decided on, and the local manifest directory.
//! - [`inventory`]: where they come from: the manifest directory or the cluster.
//! - [`k8s`]: cluster mode: pod and namespace watches, pod annotations.
//! - [`report`]: telling the mesh which pods are enrolled.
//! - [`server`]: the HTTP API the CNI plugin calls.
//! - [`zds`]: the ZDS server that hands pod namespaces to ztunnel.

pub mod dir;
pub mod enrol;
pub mod host;
pub mod inventory;
pub mod k8s;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod pods;
pub mod report;
pub mod rules;
pub mod scan;
pub mod serial;
pub mod server;
#[cfg(test)]
pub(crate) mod test_ns;
pub mod zds;
