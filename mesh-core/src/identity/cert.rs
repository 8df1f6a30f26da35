//! A signed workload certificate: key, chain, validity window and the roots it chains to.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::spiffe::{Identity, IdentityError};

/// Why a certificate or chain could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("PEM block {index} could not be parsed: {reason}")]
    Pem { index: usize, reason: String },
    #[error("certificate could not be parsed as X.509: {0}")]
    X509(String),
    #[error("certificate carries no spiffe:// URI SAN")]
    NoSpiffeSan,
    #[error("certificate carries {0} URI SANs; exactly one is expected")]
    ManySans(usize),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("certificate is for {got}, but {want} was requested")]
    WrongIdentity { want: String, got: String },
    #[error("private key is not valid PKCS#8: {0}")]
    Key(String),
}

/// Why a trust bundle file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TrustBundleError {
    #[error("reading trust bundle {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing trust bundle {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: CertError,
    },
    #[error("trust bundle {path} holds no certificate")]
    Empty { path: String },
}

/// Reads a PEM file of root certificates; it must hold at least one.
pub fn read_trust_bundle(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TrustBundleError> {
    let shown = || path.display().to_string();
    let pem = std::fs::read_to_string(path).map_err(|source| TrustBundleError::Read { path: shown(), source })?;
    let roots = certs_from_pem(&pem).map_err(|source| TrustBundleError::Parse { path: shown(), source })?;
    if roots.is_empty() {
        return Err(TrustBundleError::Empty { path: shown() });
    }
    Ok(roots)
}

/// Parses every `CERTIFICATE` block of a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut out = Vec::new();
    for (index, block) in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).enumerate() {
        let block = block.map_err(|e| CertError::Pem {
            index,
            reason: e.to_string(),
        })?;
        if block.label == "CERTIFICATE" {
            out.push(CertificateDer::from(block.contents));
        }
    }
    Ok(out)
}

/// Validity window and identity read from a leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafInfo {
    pub identity: Option<Identity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn to_system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Reads the SPIFFE identity (if any) and the validity of a DER certificate.
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::X509(e.to_string()))?;
    let validity = cert.validity();
    Ok(LeafInfo {
        identity: spiffe_san(&cert)?,
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
    })
}

fn spiffe_san(cert: &X509Certificate<'_>) -> Result<Option<Identity>, CertError> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Ok(None);
    };
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.parse()?)),
        many => Err(CertError::ManySans(many.len())),
    }
}

/// The SPIFFE identity a peer certificate proves.
pub fn identity_of(der: &[u8]) -> Result<Identity, CertError> {
    leaf_info(der)?.identity.ok_or(CertError::NoSpiffeSan)
}

/// A certificate issued to one identity, ready to use for TLS.
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Leaf first, then intermediates (roots are kept apart in `roots`).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Trust anchors of the mesh.
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The HBONE server configuration for this certificate, built on first use.
    pub(crate) server_tls: std::sync::OnceLock<std::sync::Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    /// Builds from a CA response (`chain_pem`, leaf first, root last) and the PKCS#8 key.
    /// When `roots` is empty the roots come from the response: with two or more elements,
    /// every certificate of the last one (Istio's CA sends its whole trust bundle there, so
    /// during a root rotation it holds the old and the new root); a single element's last
    /// certificate otherwise.
    pub fn from_chain(
        want: &Identity,
        key_der: Vec<u8>,
        chain_pem: &[String],
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, CertError> {
        if roots.is_empty() {
            if let [leaf_and_chain @ .., bundle] = chain_pem {
                if !leaf_and_chain.is_empty() {
                    let bundle = certs_from_pem(bundle)?;
                    if !bundle.is_empty() {
                        return Self::from_chain(want, key_der, leaf_and_chain, &bundle);
                    }
                }
            }
        }
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(certs_from_pem(pem)?);
        }
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        let info = leaf_info(leaf)?;
        let got = info.identity.ok_or(CertError::NoSpiffeSan)?;
        if &got != want {
            return Err(CertError::WrongIdentity {
                want: want.to_string(),
                got: got.to_string(),
            });
        }
        let roots = if roots.is_empty() {
            if chain.len() < 2 {
                // A lone self-signed leaf is its own root.
                chain.clone()
            } else {
                vec![chain.pop().ok_or(CertError::EmptyChain)?]
            }
        } else {
            // Do not send the root itself on the wire when the CA included it.
            if chain.len() > 1 && roots.iter().any(|r| Some(r) == chain.last()) {
                chain.pop();
            }
            roots.to_vec()
        };
        Ok(WorkloadCertificate {
            identity: got,
            chain,
            key: PrivatePkcs8KeyDer::from(key_der),
            roots,
            not_before: info.not_before,
            not_after: info.not_after,
            server_tls: Default::default(),
        })
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// True when `now` is inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }

    /// The moment renewal is due: half-way through the lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life / 2
    }

    /// Builds from a CA response as [`WorkloadCertificate::from_chain`], preferring the roots
    /// the CA sent: a response of two or more elements ends with the CA's trust bundle, which
    /// is how roots added or retired by a rotation reach a running proxy. `fallback` (the
    /// configured trust bundle) is used only when the response carries no root.
    pub fn from_ca_response(
        want: &Identity,
        key_der: Vec<u8>,
        chain_pem: &[String],
        fallback: &[CertificateDer<'static>],
    ) -> Result<Self, CertError> {
        let roots = if chain_pem.len() >= 2 { &[][..] } else { fallback };
        Self::from_chain(want, key_der, chain_pem, roots)
    }

    pub fn leaf_pem(&self) -> String {
        self.chain.first().map(|c| der_to_pem(c)).unwrap_or_default()
    }
}

/// Encodes a DER certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::new_csr;
    use crate::identity::DevCa;

    fn sleep_id() -> Identity {
        "spiffe://cluster.local/ns/default/sa/sleep".parse().expect("id")
    }

    /// A leaf from `ca` with the key it was issued for.
    fn leaf(ca: &DevCa) -> (Vec<u8>, String) {
        let (key, csr) = new_csr(&sleep_id()).expect("csr");
        let pem = ca.issue(&sleep_id(), &csr, Duration::from_secs(3600)).expect("issue");
        (key.serialize_der(), pem)
    }

    #[test]
    fn the_last_element_of_a_response_is_the_whole_trust_bundle() {
        let (a, b) = (
            DevCa::generate("cluster.local").expect("a"),
            DevCa::generate("cluster.local").expect("b"),
        );
        let (key, pem) = leaf(&a);
        let bundle = format!("{}{}", a.root_pem(), b.root_pem());
        let cert = WorkloadCertificate::from_chain(&sleep_id(), key, &[pem, bundle], &[]).expect("cert");
        assert_eq!(cert.chain.len(), 1, "no root goes on the wire");
        assert_eq!(cert.roots.len(), 2, "both roots trusted");
    }

    #[test]
    fn roots_the_ca_sends_win_over_the_configured_bundle() {
        let (a, b) = (
            DevCa::generate("cluster.local").expect("a"),
            DevCa::generate("cluster.local").expect("b"),
        );
        let configured = certs_from_pem(b.root_pem()).expect("b");
        let (key, pem) = leaf(&a);
        let cert = WorkloadCertificate::from_ca_response(
            &sleep_id(),
            key.clone(),
            &[pem.clone(), a.root_pem().into()],
            &configured,
        )
        .expect("cert");
        assert_eq!(cert.roots, certs_from_pem(a.root_pem()).expect("a"), "the CA's roots");
        // A response without a root falls back to the configured bundle.
        let cert = WorkloadCertificate::from_ca_response(&sleep_id(), key, &[pem], &configured).expect("cert");
        assert_eq!(cert.roots, configured);
    }
}
