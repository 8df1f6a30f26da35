//! Workload identity: SPIFFE ids, certificates, signers (development CA and the mesh CA
//! client) and the certificate manager that keeps one certificate per identity fresh.

pub mod ca;
pub mod cert;
pub mod manager;
pub mod spiffe;

pub use ca::{CaClient, CaError, CertificateSigner, DevCa, TokenSource};
pub use cert::{identity_of, CertError, WorkloadCertificate};
pub use manager::{CertManager, CertManagerConfig, CertState, FetchError};
pub use spiffe::{Identity, IdentityError, DEFAULT_TRUST_DOMAIN};
