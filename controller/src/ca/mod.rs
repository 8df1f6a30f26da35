//! The mesh CA: signs workload certificates for ztunnels and waypoints over
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! - [`root`]: the signing CA (a self-signed root, loaded or generated, or a plug-in
//!   intermediate) with its trust bundle, and the controller's own serving certificate.
//! - [`plugin`]: Istio's plug-in CA layout (`cacerts`), checked, and watched for rotations.
//! - [`auth`]: who the caller is, from its bearer token; [`review_bound`] bounds the
//!   TokenReviews that asks for, and [`issuer_keys`] refuses forged tokens before any.
//! - [`server`]: the gRPC service and its authorization rules (own identity, or a node proxy
//!   asking for the pods of its node).
//! - [`vm_token`]: controller-issued bootstrap tokens for VMs, bound to one WorkloadGroup.

pub mod auth;
pub mod issuer_keys;
pub mod plugin;
pub mod review_bound;
pub mod root;
pub mod server;
pub mod vm_token;

pub use auth::{
    bearer_token, random_token, AuthError, Authenticator, BootstrapError, BootstrapTokens, Caller, MIN_TOKEN_BYTES,
};
pub use plugin::{PluginError, PluginFiles, DEFAULT_CACERTS_DIR};
pub use root::{
    publish_trust_bundle, CaRoot, CaRootError, ServingNames, ROOT_CERT_FILE, ROOT_KEY_FILE, TRUST_BUNDLE_FILE,
};
pub use server::{CaMetrics, CaOptions, CaServer, PodLocator, RefusalReason, DEFAULT_TTL};
pub use vm_token::{IssueError, VmTokenAuth, VmTokenIssuer, VmTokenKey, VmTokenMetrics, DEFAULT_VM_TOKEN_TTL};
