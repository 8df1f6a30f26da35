//! TLS origination to a backend (DestinationRule `tls` at the waypoint, as Istio's egress
//! waypoint does): the client speaks plain HTTP to the waypoint, which opens TLS to the
//! endpoint with the configured SNI, verifies the server certificate against the CA of the
//! `credentialName` Secret (else the public web roots) and the expected names
//! (`subjectAltNames`, else the service's hostname), and presents the Secret's client
//! certificate under MUTUAL. Secrets arrive in the waypoint's own `WaypointCredentials`
//! (served to its identity only); a change there builds new clusters, so rotation needs no
//! restart. Settings that cannot be applied and failed handshakes fail the request
//! (`TLS_error`): nothing is ever sent in plaintext instead.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::xds::ResourceSink;
use mesh_proto::waypoint as wp;
use prost::Message;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tracing::warn;

/// Why TLS to an upstream failed; Envoy's upstream transport failure reason is `TLS_error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsFailure {
    /// The DestinationRule's settings or credential cannot be applied.
    #[error("TLS_error: settings cannot be applied: {0}")]
    Config(String),
    /// The server's certificate did not verify (CA or name).
    #[error("TLS_error: CERTIFICATE_VERIFY_FAILED: {0}")]
    Verify(String),
    /// Any other handshake failure.
    #[error("TLS_error: handshake failed: {0}")]
    Handshake(String),
}

impl TlsFailure {
    /// The `reason` label of `waypoint_upstream_tls_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsFailure::Config(_) => "config",
            TlsFailure::Verify(_) => "verify",
            TlsFailure::Handshake(_) => "handshake",
        }
    }

    /// The TLS failure in an upstream error's chain, if that is what it was.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsFailure> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(t) = err.downcast_ref::<TlsFailure>() {
                return Some(t);
            }
            // io::Error's `source` skips the error it wraps.
            if let Some(t) = err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<TlsFailure>())
            {
                return Some(t);
            }
            cur = err.source();
        }
        None
    }
}

/// The waypoint's credentials (by Secret `<ns>/<name>`), from its own `WaypointCredentials`.
pub struct CredentialStore {
    /// `<ns>/<service account>`: the only resource name accepted.
    own: String,
    current: ArcSwap<HashMap<String, Arc<wp::UpstreamCredential>>>,
}

impl CredentialStore {
    pub fn new(own: String) -> Arc<Self> {
        Arc::new(CredentialStore {
            own,
            current: ArcSwap::default(),
        })
    }

    pub fn get(&self, secret: &str) -> Option<Arc<wp::UpstreamCredential>> {
        self.current.load().get(secret).cloned()
    }

    fn apply(&self, upserts: &[(String, &[u8])], removed: &[String]) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        if removed.contains(&self.own) {
            self.current.store(Arc::default());
        }
        for (name, body) in upserts {
            if *name != self.own {
                rejected.push((name.clone(), format!("not this waypoint's ({})", self.own)));
                continue;
            }
            match wp::WaypointCredentials::decode(*body) {
                Ok(c) => {
                    let map = c
                        .credentials
                        .into_iter()
                        .map(|c| (c.secret.clone(), Arc::new(c)))
                        .collect();
                    self.current.store(Arc::new(map));
                }
                Err(e) => rejected.push((name.clone(), format!("cannot decode: {e}"))),
            }
        }
        rejected
    }
}

/// The xDS subscription for the waypoint's `WaypointCredentials`.
pub struct CredentialsSink(pub Arc<CredentialStore>);

impl ResourceSink for CredentialsSink {
    fn type_url(&self) -> &'static str {
        mesh_proto::WAYPOINT_CREDENTIALS_TYPE_URL
    }

    fn apply(&self, upserts: &[(String, &[u8])], removed: &[String]) -> Vec<(String, String)> {
        self.0.apply(upserts, removed)
    }
}

/// How a cluster's connections are opened, once its TLS settings are read.
#[derive(Clone)]
pub enum Originate {
    /// TLS with this configuration to this server name.
    Tls(Arc<Origination>),
    /// The settings cannot be applied: every connection fails with this.
    Refuse(TlsFailure),
}

pub struct Origination {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl Origination {
    /// The origination for `tls` to a service named `hostname`: `None` for DISABLE.
    pub fn build(
        tls: &wp::UpstreamTls,
        hostname: &str,
        credential: Option<&wp::UpstreamCredential>,
    ) -> Option<Originate> {
        match tls.mode.as_str() {
            "DISABLE" => None,
            "SIMPLE" | "MUTUAL" => Some(match Self::config(tls, hostname, credential) {
                Ok(o) => Originate::Tls(Arc::new(o)),
                Err(e) => Originate::Refuse(TlsFailure::Config(e)),
            }),
            other => Some(Originate::Refuse(TlsFailure::Config(format!("mode {other:?}")))),
        }
    }

    fn config(
        tls: &wp::UpstreamTls,
        hostname: &str,
        credential: Option<&wp::UpstreamCredential>,
    ) -> Result<Self, String> {
        if !tls.credential.is_empty() && credential.is_none() {
            return Err(format!("credential {} not received", tls.credential));
        }
        let provider = mesh_core::tls::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
            Arc::new(NoVerify(provider))
        } else {
            let roots = roots(credential.map(|c| c.ca_certificates.as_str()).unwrap_or_default())?;
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| e.to_string())?;
            let wanted: Vec<&str> = match tls.subject_alt_names.is_empty() {
                true => vec![hostname],
                false => tls.subject_alt_names.iter().map(String::as_str).collect(),
            };
            let names = wanted
                .into_iter()
                .map(|n| ServerName::try_from(n.to_owned()).map_err(|_| format!("{n:?} is not a DNS name or IP")))
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(NamesVerifier { inner, names })
        };
        let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
        let config = match (tls.mode.as_str(), credential) {
            ("MUTUAL", Some(c)) if !c.cert_chain.is_empty() => {
                let (chain, key) = client_pair(c)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
            }
            ("MUTUAL", _) => return Err("MUTUAL without a client certificate".to_owned()),
            _ => builder.with_no_client_auth(),
        };
        let sni = if tls.sni.is_empty() { hostname } else { tls.sni.as_str() };
        let server_name = ServerName::try_from(sni.to_owned()).map_err(|_| format!("sni {sni:?} is not a DNS name"))?;
        Ok(Origination {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The TLS handshake over `io`.
    pub async fn handshake<IO>(&self, io: IO) -> Result<tokio_rustls::client::TlsStream<IO>, TlsFailure>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        connector.connect(self.server_name.clone(), io).await.map_err(|e| {
            match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::InvalidCertificate(c)) => TlsFailure::Verify(format!("{c:?}")),
                _ => TlsFailure::Handshake(e.to_string()),
            }
        })
    }
}

fn roots(pem: &str) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    if pem.is_empty() {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(Arc::new(store));
    }
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("CA: {e}"))?;
        store.add(cert).map_err(|e| format!("CA: {e}"))?;
    }
    if store.is_empty() {
        return Err("CA holds no certificate".to_owned());
    }
    Ok(Arc::new(store))
}

fn client_pair(c: &wp::UpstreamCredential) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = CertificateDer::pem_slice_iter(c.cert_chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(c.private_key.as_bytes()).map_err(|e| format!("client key: {e}"))?;
    Ok((chain, key))
}

/// Verifies the chain with webpki and that the certificate is valid for one of `names`,
/// whatever name the handshake was for (the SNI may differ from the names expected).
#[derive(Debug)]
struct NamesVerifier {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for NamesVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no name to verify".to_owned());
        for name in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecureSkipVerify: true`: any certificate is accepted (the handshake's signatures are
/// still checked, so the peer holds the key of the certificate it sent).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Logs a failed origination: one line per reason per 10 s (an external server could
/// otherwise make every request write one), saying how many were left out; the metric
/// counts them all.
pub fn log_failure(target: std::net::SocketAddr, failure: &TlsFailure) {
    static LIMIT: std::sync::OnceLock<mesh_core::log_limit::LogLimiter> = std::sync::OnceLock::new();
    let limit = LIMIT.get_or_init(|| mesh_core::log_limit::LogLimiter::new(std::time::Duration::from_secs(10)));
    if let Some(suppressed) = limit.check(failure.reason()) {
        warn!(upstream = %target, error = %failure, suppressed, "TLS origination failed; request not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        ca: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    fn ca(name: &str) -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Pki {
            ca: p.self_signed(&key).unwrap(),
            key,
        }
    }

    fn leaf(pki: &Pki, names: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        (p.signed_by(&key, &pki.ca, &pki.key).unwrap(), key)
    }

    fn settings(mode: &str) -> wp::UpstreamTls {
        wp::UpstreamTls {
            mode: mode.into(),
            credential: "egress/cred".into(),
            ..Default::default()
        }
    }

    fn credential(ca: &Pki, client: Option<&(rcgen::Certificate, rcgen::KeyPair)>) -> wp::UpstreamCredential {
        wp::UpstreamCredential {
            secret: "egress/cred".into(),
            cert_chain: client.map(|c| c.0.pem()).unwrap_or_default(),
            private_key: client.map(|c| c.1.serialize_pem()).unwrap_or_default(),
            ca_certificates: ca.ca.pem(),
        }
    }

    /// A handshake against an in-memory server presenting `server`; `client_ca` makes it
    /// require a client certificate. Returns the SNI it saw with the client's outcome.
    async fn handshake(
        how: Originate,
        server: &(rcgen::Certificate, rcgen::KeyPair),
        client_ca: Option<&Pki>,
    ) -> (Option<String>, Result<(), TlsFailure>) {
        let provider = mesh_core::tls::provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(pki) => {
                let mut roots = RootCertStore::empty();
                roots.add(pki.ca.der().clone()).unwrap();
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::try_from(server.1.serialize_der()).unwrap();
        let config = Arc::new(builder.with_single_cert(vec![server.0.der().clone()], key).unwrap());
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let tls = tokio_rustls::TlsAcceptor::from(config).accept(b).await;
            tls.ok().and_then(|s| s.get_ref().1.server_name().map(str::to_owned))
        });
        // The client's stream stays open until the server has read its Finished.
        let (outcome, _stream) = match how {
            Originate::Refuse(f) => {
                drop(a);
                (Err(f), None)
            }
            Originate::Tls(o) => match o.handshake(a).await {
                Ok(s) => (Ok(()), Some(s)),
                Err(e) => (Err(e), None),
            },
        };
        (server.await.unwrap(), outcome)
    }

    #[tokio::test]
    async fn verification_names_sni_and_client_certificates() {
        let internet = ca("internet");
        let other = ca("other");
        let clients = ca("clients");
        let server = leaf(&internet, &["api.external.test"]);
        let client = leaf(&clients, &["client"]);
        let with_sans = |sans: &[&str]| wp::UpstreamTls {
            subject_alt_names: sans.iter().map(|s| s.to_string()).collect(),
            ..settings("SIMPLE")
        };
        let insecure = wp::UpstreamTls {
            insecure_skip_verify: true,
            ..settings("SIMPLE")
        };
        let sni = wp::UpstreamTls {
            sni: "front.example".into(),
            ..settings("SIMPLE")
        };
        // (settings, CA given to the waypoint, client pair in the Secret, server wants a
        // client cert, expected outcome reason (None: ok), expected SNI)
        type Case<'a> = (wp::UpstreamTls, &'a Pki, bool, bool, Option<&'static str>, &'static str);
        let cases: Vec<Case<'_>> = vec![
            (settings("SIMPLE"), &internet, false, false, None, "api.external.test"),
            (sni, &internet, false, false, None, "front.example"),
            (settings("SIMPLE"), &other, false, false, Some("verify"), ""),
            (
                with_sans(&["api.external.test"]),
                &internet,
                false,
                false,
                None,
                "api.external.test",
            ),
            (
                with_sans(&["elsewhere.test"]),
                &internet,
                false,
                false,
                Some("verify"),
                "",
            ),
            (
                with_sans(&["elsewhere.test", "api.external.test"]),
                &internet,
                false,
                false,
                None,
                "api.external.test",
            ),
            (insecure, &other, false, false, None, "api.external.test"),
            (settings("MUTUAL"), &internet, true, true, None, "api.external.test"),
            (settings("MUTUAL"), &internet, false, true, Some("config"), ""),
        ];
        for (i, (tls, ca, with_client, require, want, want_sni)) in cases.into_iter().enumerate() {
            let cred = credential(ca, with_client.then_some(&client));
            let how = Origination::build(&tls, "api.external.test", Some(&cred)).expect("TLS");
            let (seen_sni, outcome) = handshake(how, &server, require.then_some(&clients)).await;
            assert_eq!(
                outcome.as_ref().err().map(TlsFailure::reason),
                want,
                "case {i}: {outcome:?}"
            );
            if want.is_none() {
                assert_eq!(seen_sni.as_deref(), Some(want_sni), "case {i}");
            }
        }
    }

    #[test]
    fn settings_that_cannot_apply_refuse_and_disable_is_plain() {
        let internet = ca("internet");
        let cred = credential(&internet, None);
        assert!(Origination::build(&settings("DISABLE"), "h", Some(&cred)).is_none());
        for (tls, cred) in [
            (settings("ISTIO_MUTUAL"), Some(&cred)),
            (settings("SIMPLE"), None),
            (settings("MUTUAL"), Some(&cred)),
        ] {
            match Origination::build(&tls, "h", cred) {
                Some(Originate::Refuse(TlsFailure::Config(_))) => {}
                _ => panic!("{tls:?} with {:?} must refuse", cred.map(|c| &c.secret)),
            }
        }
    }

    #[test]
    fn a_tls_failure_is_found_inside_io_errors() {
        let io = std::io::Error::other(TlsFailure::Verify("UnknownIssuer".into()));
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(io);
        assert_eq!(TlsFailure::find(boxed.as_ref()).map(TlsFailure::reason), Some("verify"));
        let other = std::io::Error::other("refused");
        assert!(TlsFailure::find(&other).is_none());
    }

    #[test]
    fn only_the_own_resource_is_applied() {
        let store = CredentialStore::new("egress/waypoint".into());
        let creds = |secret: &str| {
            wp::WaypointCredentials {
                credentials: vec![wp::UpstreamCredential {
                    secret: secret.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec()
        };
        let (own, foreign) = (creds("egress/a"), creds("other/b"));
        let rejected = store.apply(
            &[
                ("other/waypoint".into(), foreign.as_slice()),
                ("egress/waypoint".into(), own.as_slice()),
            ],
            &[],
        );
        assert_eq!(rejected.len(), 1);
        assert!(store.get("egress/a").is_some() && store.get("other/b").is_none());
        store.apply(&[], &["egress/waypoint".into()]);
        assert!(store.get("egress/a").is_none(), "removed with the resource");
    }
}
