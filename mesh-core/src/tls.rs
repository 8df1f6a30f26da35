//! rustls configuration for HBONE: TLS 1.3 only, ALPN `h2`, no SNI, mutual authentication
//! against the mesh roots, and SPIFFE-identity checks of the server certificate.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::identity::{identity_of, Identity, WorkloadCertificate};

/// ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle is empty or contains no usable root")]
    NoRoots,
    #[error("invalid trust root: {0}")]
    Root(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The peer's certificate is valid but proves a different identity than expected.
#[derive(Debug, thiserror::Error)]
#[error("peer identity {got} is not one of the expected identities [{expected}]")]
pub struct IdentityMismatch {
    pub got: String,
    pub expected: String,
}

/// The process-wide crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| TlsError::Root(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(Arc::new(store))
}

/// Server side of HBONE for one workload certificate: requires a client certificate chaining
/// to the mesh roots; who may connect is left to authorization.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    tls13_server(cert, true)
}

/// TLS 1.3 + ALPN h2 server presenting `cert`; client certificates must chain to the mesh
/// roots, and are required when `require_client`.
fn tls13_server(cert: &WorkloadCertificate, require_client: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(root_store(&cert.roots)?, provider());
    let builder = if require_client {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder.build().map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.private_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// [`server_config`], built once per certificate.
pub fn cached_server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    if let Some(c) = cert.server_tls.get() {
        return Ok(c.clone());
    }
    let c = server_config(cert)?;
    Ok(cert.server_tls.get_or_init(|| c).clone())
}

/// Client side of HBONE: presents `cert` and accepts only a server proving one of `expected`.
pub fn client_config(cert: &WorkloadCertificate, expected: Vec<Identity>) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = SpiffeServerVerifier::new(&cert.roots, expected)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.private_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// Client side of a control plane connection (xDS, CA) from a node proxy: TLS 1.3, ALPN `h2`,
/// no SNI, the server's chain verified against `roots` and its SPIFFE identity required to be
/// one of `expected` ([`SpiffeServerVerifier`]). No client certificate is presented: a node
/// proxy has none before the CA gives it one, and authenticates with its bearer token.
pub fn control_plane_client_config(
    roots: &[CertificateDer<'static>],
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = SpiffeServerVerifier::new(roots, expected)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// Server side of a control plane endpoint (xDS, CA): TLS 1.3, ALPN `h2`, presents `cert`.
/// Clients need not present a certificate (node proxies authenticate with a bearer token);
/// one that does must chain to the mesh roots.
pub fn control_plane_server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    tls13_server(cert, false)
}

/// The name passed to rustls for a no-SNI connection (ignored by our verifier).
pub fn placeholder_server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// Checks that `chain` (leaf first, then intermediates) chains to one of `roots` now, for
/// mutual TLS use, and returns the leaf's SPIFFE identity: what an HBONE peer checks of the
/// other. Used where a chain is judged outside a handshake (the CA validating its plug-in
/// certificates; tests of a retired root).
pub fn verify_workload_chain(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<Identity, rustls::Error> {
    let (leaf, intermediates) = chain.split_first().ok_or(rustls::Error::NoCertificatesPresented)?;
    let verifier = SpiffeServerVerifier::new(roots, Vec::new()).map_err(|e| rustls::Error::General(e.to_string()))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(pki_error)?;
    ee.verify_for_usage(
        verifier.provider.signature_verification_algorithms.all,
        &verifier.anchors,
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(pki_error)?;
    identity_of(leaf).map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))
}

/// Verifies the server chain against the mesh roots, then checks its SPIFFE URI SAN.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(roots: &[CertificateDer<'static>], expected: Vec<Identity>) -> Result<Self, TlsError> {
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::Root(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if anchors.is_empty() {
            return Err(TlsError::NoRoots);
        }
        Ok(SpiffeServerVerifier {
            anchors,
            expected,
            provider: provider(),
        })
    }
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let got = identity_of(end_entity)
            .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
        if !self.expected.contains(&got) {
            let expected = self
                .expected
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let mismatch = IdentityMismatch {
                got: got.to_string(),
                expected,
            };
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(mismatch),
            ))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
