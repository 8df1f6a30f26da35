//! The mesh CA: signs workload certificates for ztunnels and waypoints over
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! - [`root`]: the root certificate and key (loaded or generated), and the controller's own
//!   serving certificate.
//! - [`auth`]: who the caller is, from its bearer token.
//! - [`server`]: the gRPC service and its authorization rules (own identity, or a node proxy
//!   asking for the pods of its node).

pub mod auth;
pub mod root;
pub mod server;

pub use auth::{
    bearer_token, random_token, AuthError, Authenticator, BootstrapError, BootstrapTokens, Caller, MIN_TOKEN_BYTES,
};
pub use root::{CaRoot, CaRootError, ServingNames, ROOT_CERT_FILE, ROOT_KEY_FILE};
pub use server::{CaMetrics, CaOptions, CaServer, PodLocator, RefusalReason, DEFAULT_TTL};
