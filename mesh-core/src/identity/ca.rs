//! Certificate signers: the interface the certificate manager uses, a development CA that signs
//! locally from a root key on disk, and the gRPC client for the mesh CA (`CreateCertificate`).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_proto::ca::IstioCertificateRequest;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::spiffe::Identity;

/// A boxed future, so signers can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Metadata key a node proxy uses to ask for a certificate on behalf of a pod.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate signing request is invalid: {0}")]
    Csr(String),
    #[error("development CA: {0}")]
    DevCa(String),
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("CA refused the request: {0}")]
    Refused(String),
    #[error("CA unreachable: {0}")]
    Transport(String),
    #[error("CA returned an empty certificate chain")]
    EmptyResponse,
}

/// Anything that turns a CSR into a signed chain (PEM, leaf first, root last).
pub trait CertificateSigner: Send + Sync + 'static {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: String,
        validity: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaError>>;
}

/// A root certificate and key held in memory, for standalone runs and tests.
pub struct DevCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    root_pem: String,
}

fn dev(e: impl std::fmt::Display) -> CaError {
    CaError::DevCa(e.to_string())
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // keep the serial positive
    SerialNumber::from_slice(&bytes)
}

impl DevCa {
    /// Creates a fresh self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(dev)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh development root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let issuer = params.self_signed(&key).map_err(dev)?;
        let root_pem = issuer.pem();
        Ok(DevCa { issuer, key, root_pem })
    }

    /// Loads a root from PEM texts (certificate and PKCS#8 key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| dev(format!("root key: {e}")))?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(|e| dev(format!("root certificate: {e}")))?;
        // Re-signing the parsed parameters with the same key reproduces the issuer name and
        // key identifier that leaves must chain to.
        let issuer = params.self_signed(&key).map_err(dev)?;
        Ok(DevCa {
            issuer,
            key,
            root_pem: cert_pem.to_owned(),
        })
    }

    /// Loads a root from files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(cert_path)?, &read(key_path)?)
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a leaf for `identity` with the public key of `csr_pem`, valid for `validity`
    /// (backdated slightly for clock skew). The CSR's own subject and SANs are ignored: the identity is ours to set.
    pub fn issue(&self, identity: &Identity, csr_pem: &str, validity: Duration) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        // Backdate a little for clock skew, but not so much that short test lifetimes double.
        let skew = (validity / 4).min(Duration::from_secs(60));
        self.issue_at(identity, csr_pem, now - skew, now + validity)
    }

    /// Issues a leaf with an explicit validity window (tests use this for expired certificates).
    pub fn issue_at(
        &self,
        identity: &Identity,
        csr_pem: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Csr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(dev)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer, &self.key)
            .map_err(dev)?;
        Ok(cert.pem())
    }
}

impl CertificateSigner for DevCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: String,
        validity: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaError>> {
        Box::pin(async move { Ok(vec![self.issue(identity, &csr_pem, validity)?, self.root_pem.clone()]) })
    }
}

/// Where the bearer token presented to the CA comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    None,
    Static(Arc<str>),
    /// Re-read on every request: projected service account tokens rotate.
    File(std::path::PathBuf),
}

impl TokenSource {
    fn token(&self) -> Result<Option<String>, CaError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Static(t) => Ok(Some(t.to_string())),
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|source| CaError::Io {
                    path: p.display().to_string(),
                    source,
                }),
        }
    }
}

/// Client of `istio.v1.auth.IstioCertificateService/CreateCertificate`.
///
/// The channel comes from [`crate::grpc`] (plaintext, or TLS with
/// [`crate::tls::control_plane_client_config`]: a node proxy has no certificate of its own
/// before the CA gives it one, and authenticates with its bearer token). Every request
/// carries `authorization: Bearer <token>` (a token file is re-read each time: projected
/// tokens rotate), the requested lifetime in `validity_duration` (seconds) and, when
/// impersonating, the identity asked for in the `ImpersonatedIdentity` metadata field.
pub struct CaClient {
    client: IstioCertificateServiceClient<tonic::transport::Channel>,
    token: TokenSource,
    /// A node proxy asks on behalf of the pods it serves.
    impersonate: bool,
}

impl CaClient {
    pub fn new(channel: tonic::transport::Channel, token: TokenSource, impersonate: bool) -> Self {
        CaClient {
            client: IstioCertificateServiceClient::new(channel),
            token,
            impersonate,
        }
    }
}

/// Sorts a failed call: the CA could not be reached (retry) or it said no (its reason kept).
fn ca_error(status: &tonic::Status) -> CaError {
    let text = crate::grpc::status_text(status);
    match status.code() {
        // Unknown is what tonic reports for connection failures (refused, TLS handshake).
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => CaError::Transport(text),
        _ => CaError::Refused(text),
    }
}

impl CertificateSigner for CaClient {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: String,
        validity: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaError>> {
        Box::pin(async move {
            let metadata = self.impersonate.then(|| prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                    },
                )]
                .into(),
            });
            let mut req = tonic::Request::new(IstioCertificateRequest {
                csr: csr_pem,
                validity_duration: validity.as_secs() as i64,
                metadata,
            });
            if let Some(token) = self.token.token()? {
                let mut value: tonic::metadata::AsciiMetadataValue = format!("Bearer {token}")
                    .parse()
                    .map_err(|_| CaError::Refused("token contains characters not allowed in a header".into()))?;
                value.set_sensitive(true);
                req.metadata_mut().insert("authorization", value);
            }
            let resp = self
                .client
                .clone()
                .create_certificate(req)
                .await
                .map_err(|s| ca_error(&s))?;
            let chain = resp.into_inner().cert_chain;
            if chain.is_empty() {
                return Err(CaError::EmptyResponse);
            }
            Ok(chain)
        })
    }
}

/// A new ECDSA P-256 key and a CSR carrying `identity` as its URI SAN.
pub fn new_csr(identity: &Identity) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Csr(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Csr(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CaError::Csr(e.to_string()))?;
    let pem = csr.pem().map_err(|e| CaError::Csr(e.to_string()))?;
    Ok((key, pem))
}
