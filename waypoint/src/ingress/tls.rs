//! TLS termination at the ingress gateway: one [`SniResolver`] per port picks the certificate
//! of the listener whose hostname matches the client's SNI, preferring a certificate that
//! names the host exactly, then by wildcard. An SNI no listener serves gets no certificate, so
//! the handshake fails; a client without SNI is answered only by a listener without hostname. A Secret's rotation swaps the resolver's entries
//! atomically: handshakes after it get the new certificate, established connections go on.

use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_proto::waypoint as wp;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::host_matches;

/// Why a listener's certificate cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate of Secret {secret}: {reason}")]
    Invalid { secret: String, reason: String },
}

/// A certificate and the names it may serve.
#[derive(Debug)]
pub struct Entry {
    /// The listener's hostname (empty: any SNI).
    pub listener_host: String,
    /// DNS SANs of the leaf, lowercase (`*.example.com` kept as is).
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

/// Parses and checks a listener certificate (PEM chain, PEM key that belongs to the leaf).
pub fn entry(listener_host: &str, c: &wp::TlsCertificate) -> Result<Entry, CertError> {
    let bad = |reason: String| CertError::Invalid {
        secret: c.secret.clone(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(c.cert_chain.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("chain: {e}")))?;
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    let names = dns_names(leaf).map_err(bad)?;
    let key = PrivateKeyDer::from_pem_slice(c.private_key.as_bytes()).map_err(|e| bad(format!("key: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad(format!("key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| bad(format!("key does not match: {e}")))?;
    Ok(Entry {
        listener_host: listener_host.to_ascii_lowercase(),
        names,
        key: Arc::new(certified),
    })
}

fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("leaf: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// The certificate for `sni` among `entries`: of the listeners whose hostname matches (the
/// most specific first), one naming `sni` exactly, else by wildcard, else the listener's first.
pub fn pick<'a>(entries: &'a [Entry], sni: &str) -> Option<&'a Entry> {
    let sni = sni.to_ascii_lowercase();
    let serving = entries
        .iter()
        .filter(|e| e.listener_host.is_empty() || host_matches(&e.listener_host, &sni));
    let best_listener = serving
        .clone()
        .max_by_key(|e| super::specificity(&e.listener_host))?
        .listener_host
        .clone();
    let mine: Vec<&Entry> = serving.filter(|e| e.listener_host == best_listener).collect();
    mine.iter()
        .find(|e| e.names.contains(&sni))
        .or_else(|| mine.iter().find(|e| e.names.iter().any(|n| host_matches(n, &sni))))
        .or_else(|| mine.first())
        .copied()
}

/// A port's certificates, swapped whole on every configuration change.
#[derive(Debug, Default)]
pub struct SniResolver {
    entries: ArcSwap<Vec<Entry>>,
}

impl SniResolver {
    pub fn replace(&self, entries: Vec<Entry>) {
        self.entries.store(Arc::new(entries));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.load().is_empty()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.load();
        match hello.server_name() {
            Some(sni) => pick(&entries, sni).map(|e| e.key.clone()),
            // Without SNI only a listener without hostname (it serves any host) can answer.
            None => entries
                .iter()
                .find(|e| e.listener_host.is_empty())
                .map(|e| e.key.clone()),
        }
    }
}

/// The rustls server configuration of a TLS port: TLS 1.2 and 1.3, ALPN h2 and http/1.1,
/// certificates from `resolver`.
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> wp::TlsCertificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        wp::TlsCertificate {
            secret: "ns/s".into(),
            cert_chain: c.pem(),
            private_key: key.serialize_pem(),
        }
    }

    #[test]
    fn certificates_are_chosen_by_sni() {
        let entries = vec![
            entry("*.example.com", &cert(&["*.example.com"])).unwrap(),
            entry("*.example.com", &cert(&["api.example.com"])).unwrap(),
            entry("*.other.org", &cert(&["*.other.org"])).unwrap(),
        ];
        let names = |sni: &str| pick(&entries, sni).map(|e| e.names.clone());
        assert_eq!(names("app.example.com"), Some(vec!["*.example.com".to_owned()]));
        assert_eq!(
            names("API.example.com"),
            Some(vec!["api.example.com".to_owned()]),
            "exact wins"
        );
        assert_eq!(names("x.other.org"), Some(vec!["*.other.org".to_owned()]));
        assert!(names("unknown.net").is_none(), "an unknown SNI gets no certificate");
        let any = entry("", &cert(&["fallback.test"])).unwrap();
        let with_default = [entry("*.example.com", &cert(&["*.example.com"])).unwrap(), any];
        assert_eq!(
            pick(&with_default, "unknown.net").map(|e| e.names.clone()),
            Some(vec!["fallback.test".to_owned()]),
            "a listener without hostname serves any SNI"
        );
        assert!(names("example.com").is_none());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let a = cert(&["a.example.com"]);
        let b = cert(&["b.example.com"]);
        let mixed = wp::TlsCertificate {
            private_key: b.private_key,
            ..a
        };
        assert!(entry("", &mixed).is_err());
        let garbage = wp::TlsCertificate {
            cert_chain: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            ..cert(&["c"])
        };
        assert!(entry("", &garbage).is_err());
    }
}
