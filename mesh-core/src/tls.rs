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
    #[error(transparent)]
    Bundle(#[from] crate::identity::cert::TrustBundleError),
}

/// The peer's certificate is valid but proves a different identity than expected.
#[derive(Debug, thiserror::Error)]
#[error("peer identity {got} is not one of the expected identities [{expected}]")]
pub struct IdentityMismatch {
    pub got: String,
    pub expected: String,
}

/// The process-wide crypto provider: ring, with the same TLS 1.3 suites as its default but
/// AES-128-GCM first (ring's default puts AES-256-GCM first; Istio's ztunnel offers AES-128-GCM
/// first too): 10 AES rounds instead of 14, measured 5-6 % less CPU per byte encrypted and
/// decrypted. Our servers choose by this order ([`tls13_server`]), so every HBONE hop to us
/// uses it. ring, not aws-lc-rs: aws-lc's AES-GCM was 3-10 % cheaper still, but it adds a C
/// build of over a minute and a second provider that breaks `ClientConfig::builder()` users
/// (kube, hyper-rustls) unless every binary installs a default.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        Arc::new(p)
    })
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
    // Our suite order, not the client's: a client preferring AES-256-GCM gets AES-128-GCM.
    cfg.ignore_client_order = true;
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
        &verifier.current(),
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(pki_error)?;
    identity_of(leaf).map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))
}

/// As [`control_plane_client_config`], with the roots of the trust bundle file at `path`,
/// re-read when the file changes (checked at each handshake): after a root rotation the
/// controller's serving certificate chains to the new root, and a proxy reconnecting must
/// trust it without a restart. A bundle that cannot be read keeps the last good roots.
pub fn control_plane_client_config_following(
    path: &std::path::Path,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = SpiffeServerVerifier::following(path, expected)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

type Anchors = Vec<rustls::pki_types::TrustAnchor<'static>>;

/// Verifies the server chain against the mesh roots, then checks its SPIFFE URI SAN.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: arc_swap::ArcSwap<Anchors>,
    /// The trust bundle file the roots follow, if any.
    file: Option<BundleFile>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

/// A trust bundle file and the version of it loaded (modification time and length).
#[derive(Debug)]
struct BundleFile {
    path: std::path::PathBuf,
    loaded: std::sync::Mutex<Option<(std::time::SystemTime, u64)>>,
}

fn anchors_of(roots: &[CertificateDer<'static>]) -> Result<Anchors, TlsError> {
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
    Ok(anchors)
}

fn stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl SpiffeServerVerifier {
    pub fn new(roots: &[CertificateDer<'static>], expected: Vec<Identity>) -> Result<Self, TlsError> {
        Ok(SpiffeServerVerifier {
            anchors: arc_swap::ArcSwap::from_pointee(anchors_of(roots)?),
            file: None,
            expected,
            provider: provider(),
        })
    }

    /// Roots from the trust bundle file at `path`, which must be usable now, and are
    /// re-read whenever it changes.
    pub fn following(path: &std::path::Path, expected: Vec<Identity>) -> Result<Self, TlsError> {
        let loaded = stamp(path);
        let roots = crate::identity::cert::read_trust_bundle(path)?;
        let mut verifier = Self::new(&roots, expected)?;
        verifier.file = Some(BundleFile {
            path: path.to_owned(),
            loaded: std::sync::Mutex::new(loaded),
        });
        Ok(verifier)
    }

    /// The roots to verify with now: the file's current ones when it changed and is usable.
    fn current(&self) -> Arc<Anchors> {
        if let Some(file) = &self.file {
            let now = stamp(&file.path);
            let mut loaded = file.loaded.lock().unwrap_or_else(|p| p.into_inner());
            if now.is_some() && now != *loaded {
                let fresh = crate::identity::cert::read_trust_bundle(&file.path)
                    .map_err(TlsError::from)
                    .and_then(|roots| anchors_of(&roots));
                match fresh {
                    Ok(anchors) => {
                        tracing::info!(path = %file.path.display(), roots = anchors.len(), "trust bundle reloaded");
                        self.anchors.store(Arc::new(anchors));
                        *loaded = now;
                    }
                    Err(e) => {
                        tracing::warn!(path = %file.path.display(), error = %e, "trust bundle changed but is unusable; keeping the previous roots");
                    }
                }
            }
        }
        self.anchors.load_full()
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
            &self.current(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::new_csr;
    use crate::identity::cert::certs_from_pem;
    use crate::identity::DevCa;

    fn controller() -> Identity {
        "spiffe://cluster.local/ns/istio-system/sa/mesh-controller"
            .parse()
            .expect("id")
    }

    /// A serving certificate for the controller from `ca`.
    fn serving(ca: &DevCa) -> CertificateDer<'static> {
        let (_, csr) = new_csr(&controller()).expect("csr");
        let pem = ca
            .issue(&controller(), &csr, std::time::Duration::from_secs(600))
            .expect("issue");
        certs_from_pem(&pem).expect("pem").remove(0)
    }

    /// Writes `text` to `path` by rename, as a kubelet or the controller replaces the file.
    fn replace(path: &std::path::Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }

    #[test]
    fn the_control_plane_verifier_follows_the_trust_bundle_file() {
        let (a, b) = (
            DevCa::generate("cluster.local").expect("a"),
            DevCa::generate("cluster.local").expect("b"),
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("root-cert.pem");
        replace(&path, a.root_pem());
        let verifier = SpiffeServerVerifier::following(&path, vec![controller()]).expect("verifier");
        let check = |cert: &CertificateDer<'static>| {
            verifier.verify_server_cert(cert, &[], &placeholder_server_name(), &[], UnixTime::now())
        };
        let (from_a, from_b) = (serving(&a), serving(&b));
        check(&from_a).expect("root A trusted");
        check(&from_b).expect_err("root B not yet published");
        // Root B published beside A, then A retired: no new verifier needed.
        replace(&path, &format!("{}{}", a.root_pem(), b.root_pem()));
        check(&from_b).expect("root B trusted once published");
        check(&from_a).expect("root A still trusted");
        replace(&path, b.root_pem());
        check(&from_a).expect_err("root A retired");
        // An unusable bundle keeps the last good roots.
        replace(&path, "not a certificate bundle, and longer than before so it differs");
        check(&from_b).expect("the last good roots");
        check(&from_a).expect_err("still retired");
    }

    fn workload(ca: &DevCa, sa: &str) -> (Identity, WorkloadCertificate) {
        let id: Identity = format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .expect("id");
        let (key, csr) = new_csr(&id).expect("csr");
        let leaf = ca.issue(&id, &csr, std::time::Duration::from_secs(600)).expect("issue");
        let cert = WorkloadCertificate::from_chain(&id, key.serialize_der(), &[leaf, ca.root_pem().to_owned()], &[])
            .expect("certificate");
        (id, cert)
    }

    /// Runs a handshake in memory; returns the suite both ends agreed on.
    fn negotiate(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> rustls::CipherSuite {
        let mut c = rustls::ClientConnection::new(client, placeholder_server_name()).expect("client");
        let mut s = rustls::ServerConnection::new(server).expect("server");
        while c.is_handshaking() || s.is_handshaking() {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).expect("client writes");
            }
            s.read_tls(&mut wire.as_slice()).expect("server reads");
            s.process_new_packets().expect("server accepts");
            wire.clear();
            while s.wants_write() {
                s.write_tls(&mut wire).expect("server writes");
            }
            c.read_tls(&mut wire.as_slice()).expect("client reads");
            c.process_new_packets().expect("client accepts");
        }
        let suite = c.negotiated_cipher_suite().expect("suite").suite();
        assert_eq!(Some(suite), s.negotiated_cipher_suite().map(|s| s.suite()));
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        suite
    }

    #[test]
    fn hbone_prefers_aes_128_gcm_and_still_accepts_the_other_suites() {
        use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
        let ca = DevCa::generate("cluster.local").expect("ca");
        let (server_id, server_cert) = workload(&ca, "server");
        let (_, client_cert) = workload(&ca, "client");
        let server = server_config(&server_cert).expect("server config");
        let ours = client_config(&client_cert, vec![server_id.clone()]).expect("client config");
        assert_eq!(negotiate(ours, server.clone()), TLS13_AES_128_GCM_SHA256);
        // The same three TLS 1.3 suites as ring's default, ours first (TLS 1.2 suites follow
        // when another crate of the build turns on rustls' tls12 feature; HBONE never offers
        // TLS 1.2).
        let suites: Vec<_> = provider()
            .cipher_suites
            .iter()
            .filter(|s| s.tls13().is_some())
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            suites,
            [
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        // A client preferring AES-256-GCM gets our order; a client offering one other suite
        // only still connects with it.
        let client_with = |order: &[rustls::CipherSuite]| {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = order
                .iter()
                .filter_map(|want| p.cipher_suites.iter().find(|s| s.suite() == *want).copied())
                .collect();
            let verifier = SpiffeServerVerifier::new(&client_cert.roots, vec![server_id.clone()]).expect("verifier");
            let mut cfg = ClientConfig::builder_with_provider(Arc::new(p))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_auth_cert(client_cert.chain.clone(), client_cert.private_key())
                .expect("client auth");
            cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
            Arc::new(cfg)
        };
        let aes256_first = client_with(&[TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256]);
        assert_eq!(negotiate(aes256_first, server.clone()), TLS13_AES_128_GCM_SHA256);
        for only in [TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256] {
            assert_eq!(negotiate(client_with(&[only]), server.clone()), only);
        }
    }
}
