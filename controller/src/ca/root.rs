//! The CA's root of trust: loads or creates the root certificate and key, signs leaves with
//! it, and issues the controller's own TLS serving certificate from it.
//!
//! The serving certificate carries the controller's SPIFFE id (what our ztunnel and waypoint
//! verify) and, for clients that verify the control plane by hostname as Istio's ztunnel
//! does (the URL's host or `ALT_XDS_HOSTNAME`, in a cluster `istiod.istio-system.svc`), DNS
//! and IP SANs: see [`ServingNames`].

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_core::identity::ca::{new_csr, CaError, DevCa};
use mesh_core::identity::cert::{CertError, WorkloadCertificate};
use mesh_core::identity::Identity;
use tracing::info;

use super::plugin::{self, PluginError, PluginFiles};

/// File name of the root certificate inside the CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the root private key (PKCS#8 PEM) inside the CA directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Why the root could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum CaRootError {
    #[error(
        "{present} exists but {missing} does not: restore the missing file, or remove both to generate a new root"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA root: {0}")]
    Root(#[source] CaError),
    #[error("CA root: the private key does not belong to the root certificate")]
    KeyMismatch,
    #[error("signing: {0}")]
    Sign(#[source] CaError),
    #[error("serving certificate: {0}")]
    Serving(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaRootError + 'a {
    move |source| CaRootError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The names besides its SPIFFE id that the controller's serving certificate carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServingNames {
    /// DNS SANs (say `istiod.istio-system.svc`).
    pub dns: Vec<String>,
    /// IP SANs: the addresses clients dial when they verify by address.
    pub ips: Vec<IpAddr>,
}

/// The CA the controller signs with: its own self-signed root, or a plug-in intermediate
/// with the chain up to its roots ([`super::plugin`]).
pub struct CaRoot {
    /// The signing certificate and key (the root itself, or the plug-in intermediate).
    ca: DevCa,
    /// Certificates sent between the leaf and the roots (empty when the root signs).
    intermediates: Vec<String>,
    /// The trust bundle: every root clients must trust (PEM, one or several).
    bundle: String,
}

impl std::fmt::Debug for CaRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CaRoot").finish_non_exhaustive()
    }
}

impl CaRoot {
    /// Loads `dir/root-cert.pem` and `dir/root-key.pem`, or, when neither exists, generates a
    /// root for `trust_domain` and persists it there (creating `dir`). Exactly one of the two
    /// present is an error: silently replacing a half-lost root would invalidate every
    /// certificate already issued.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Self, CaRootError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let has_cert = exists(&cert_path)?;
        let has_key = exists(&key_path)?;
        match (has_cert, has_key) {
            (true, true) => {
                let root = Self::from_files(&cert_path, &key_path)?;
                info!(dir = %dir.display(), "loaded CA root");
                Ok(root)
            }
            (true, false) => Err(CaRootError::Incomplete {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaRootError::Incomplete {
                present: key_path,
                missing: cert_path,
            }),
            (false, false) => {
                let ca = DevCa::generate(trust_domain).map_err(CaRootError::Root)?;
                create_private_dir(dir)?;
                // Key first: a crash between the two renames leaves only the key, which the
                // next start reports instead of overwriting.
                write_atomic(&key_path, ca.key_pem().as_bytes(), 0o600)?;
                write_atomic(&cert_path, ca.root_pem().as_bytes(), 0o644)?;
                info!(dir = %dir.display(), trust_domain, "generated a new CA root and saved it");
                Ok(Self::self_signed(ca))
            }
        }
    }

    /// Loads a root from a certificate file and a PKCS#8 key file.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, CaRootError> {
        let cert_pem = std::fs::read_to_string(cert).map_err(io("reading", cert))?;
        let key_pem = std::fs::read_to_string(key).map_err(io("reading", key))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Loads a root from PEM texts (say, the data of a Kubernetes Secret).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaRootError> {
        let ca = DevCa::from_pem(cert_pem, key_pem).map_err(CaRootError::Root)?;
        // DevCa re-signs the certificate with whatever key it is given, so a mismatched pair
        // would load fine and then issue leaves that chain to nothing clients trust.
        check_key_matches(cert_pem, key_pem)?;
        Ok(Self::self_signed(ca))
    }

    fn self_signed(ca: DevCa) -> Self {
        let bundle = ca.root_pem().to_owned();
        CaRoot {
            ca,
            intermediates: Vec::new(),
            bundle,
        }
    }

    /// The plug-in CA of `files` (Istio's `cacerts` layout), checked: each file parses, the
    /// key belongs to `ca-cert.pem`, and what it signs chains to a root of `root-cert.pem`.
    pub fn from_plugin(files: &PluginFiles, trust_domain: &str) -> Result<Self, PluginError> {
        let checked = plugin::check(files)?;
        let ca = DevCa::from_pem(&files.ca_cert, &files.ca_key).map_err(|e| PluginError::Invalid {
            path: files.path(plugin::CA_CERT_FILE),
            reason: e.to_string(),
        })?;
        let root = CaRoot {
            ca,
            intermediates: checked.intermediates,
            bundle: checked.bundle,
        };
        plugin::check_chains(&root, files, trust_domain)?;
        Ok(root)
    }

    /// The roots (PEM) clients must trust: one, or several during a root rotation.
    pub fn trust_bundle(&self) -> &str {
        &self.bundle
    }

    /// How many roots the trust bundle holds.
    pub fn root_count(&self) -> usize {
        mesh_core::identity::cert::certs_from_pem(&self.bundle).map_or(0, |c| c.len())
    }

    /// Signs `csr_pem` for `identity`, valid for `ttl`; returns the chain as the CA service
    /// sends it, as Istio's does: leaf PEM first, then the intermediates, then the trust
    /// bundle (every root, in one element). The leaf carries exactly `identity` as its URI SAN
    /// whatever the CSR asked for, so callers must have checked the CSR already.
    pub fn sign(&self, identity: &Identity, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaRootError> {
        let leaf = self.ca.issue(identity, csr_pem, ttl).map_err(CaRootError::Sign)?;
        Ok(self.chain_with(leaf))
    }

    fn chain_with(&self, leaf: String) -> Vec<String> {
        let mut chain = Vec::with_capacity(self.intermediates.len() + 2);
        chain.push(leaf);
        chain.extend(self.intermediates.iter().cloned());
        chain.push(self.bundle.clone());
        chain
    }

    /// Issues the controller's own TLS serving certificate for `identity`, valid for `ttl`,
    /// ready for `mesh_core::tls::control_plane_server_config`. Renewing it before it expires
    /// is the caller's business.
    pub fn serving_certificate(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCertificate, CaRootError> {
        let (key, csr) = new_csr(identity).map_err(CaRootError::Sign)?;
        let chain = self.sign(identity, &csr, ttl)?;
        // Empty roots: the last PEM of the chain (our root) becomes the trust anchor.
        WorkloadCertificate::from_chain(identity, key.serialize_der(), &chain, &[])
            .map_err(|e: CertError| CaRootError::Serving(e.to_string()))
    }

    /// As [`CaRoot::serving_certificate`], with `names` as DNS and IP SANs beside the SPIFFE
    /// URI. Without names it is the same certificate shape.
    pub fn serving_certificate_for(
        &self,
        identity: &Identity,
        names: &ServingNames,
        ttl: Duration,
    ) -> Result<WorkloadCertificate, CaRootError> {
        if names.dns.is_empty() && names.ips.is_empty() {
            return self.serving_certificate(identity, ttl);
        }
        let serving = |e: &dyn std::fmt::Display| CaRootError::Serving(e.to_string());
        let ca_key = rcgen::KeyPair::from_pem(&self.ca.key_pem()).map_err(|e| serving(&e))?;
        // Re-signing the root's parameters with its key reproduces the issuer name and key
        // identifier the leaf must chain to (as the CA's own signer does).
        let issuer = rcgen::CertificateParams::from_ca_cert_pem(self.ca.root_pem())
            .and_then(|p| p.self_signed(&ca_key))
            .map_err(|e| serving(&e))?;
        let key = rcgen::KeyPair::generate().map_err(|e| serving(&e))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let mut sans = vec![rcgen::SanType::URI(
            identity.to_string().try_into().map_err(|e| serving(&e))?,
        )];
        for dns in &names.dns {
            let name = dns
                .as_str()
                .try_into()
                .map_err(|e| CaRootError::Serving(format!("DNS name {dns:?}: {e}")))?;
            sans.push(rcgen::SanType::DnsName(name));
        }
        sans.extend(names.ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + ttl).into();
        let leaf = params.signed_by(&key, &issuer, &ca_key).map_err(|e| serving(&e))?;
        let chain = self.chain_with(leaf.pem());
        WorkloadCertificate::from_chain(identity, key.serialize_der(), &chain, &[])
            .map_err(|e: CertError| CaRootError::Serving(e.to_string()))
    }
}

/// Writes the trust bundle (`dir/trust-bundle.pem`, readable by all) for proxies that read
/// their roots from a file; replaced atomically, so a reader never sees half a bundle.
pub fn publish_trust_bundle(dir: &Path, bundle: &str) -> Result<PathBuf, CaRootError> {
    if !exists(dir)? {
        create_private_dir(dir)?;
    }
    let path = dir.join(TRUST_BUNDLE_FILE);
    write_atomic(&path, bundle.as_bytes(), 0o644)?;
    Ok(path)
}

/// The published trust bundle's file name in the CA directory.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

/// A positive 127-bit serial from the system's CSPRNG.
fn random_serial() -> Result<rcgen::SerialNumber, CaRootError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaRootError::Serving("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

fn check_key_matches(cert_pem: &str, key_pem: &str) -> Result<(), CaRootError> {
    let bad = |what: &str| CaRootError::Root(CaError::DevCa(what.to_owned()));
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| bad(&format!("root key: {e}")))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| bad(&format!("root certificate PEM: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| bad(&format!("root certificate: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaRootError::KeyMismatch);
    }
    Ok(())
}

fn exists(path: &Path) -> Result<bool, CaRootError> {
    // try_exists, not exists: a permission error must not look like "absent" and trigger
    // generating a new root over an existing one.
    path.try_exists().map_err(io("checking", path))
}

fn create_private_dir(dir: &Path) -> Result<(), CaRootError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("creating directory", dir))
}

/// Writes `data` to `path` through a temporary file in the same directory and a rename, so
/// readers see the old content or the new, never a partial file. The temporary file is
/// created with `mode` already set: the key is never readable by others, even briefly.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaRootError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    // A leftover from a crashed run could have other permissions; start afresh.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing", &tmp)(e)),
    }
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        file.write_all(data).map_err(io("writing", &tmp))?;
        file.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // Make the rename itself durable.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const TD: &str = "cluster.local";

    #[test]
    fn generates_once_then_loads_the_same_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ca");
        let first = CaRoot::load_or_generate(&dir, TD).expect("generate");
        let key_mode = std::fs::metadata(dir.join(ROOT_KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600, "key file mode {key_mode:o}");
        let second = CaRoot::load_or_generate(&dir, TD).expect("load");
        assert_eq!(first.trust_bundle(), second.trust_bundle());
        assert_eq!(first.ca.key_pem(), second.ca.key_pem());
        // No temporary files left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn one_file_alone_is_an_error_naming_the_missing_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        CaRoot::load_or_generate(tmp.path(), TD).expect("generate");
        for (remove, keep) in [(ROOT_KEY_FILE, ROOT_CERT_FILE), (ROOT_CERT_FILE, ROOT_KEY_FILE)] {
            let dir = tmp.path().join(format!("only-{keep}"));
            std::fs::create_dir(&dir).expect("mkdir");
            std::fs::copy(tmp.path().join(keep), dir.join(keep)).expect("copy");
            let err = CaRoot::load_or_generate(&dir, TD).expect_err("one file missing");
            assert!(
                matches!(&err, CaRootError::Incomplete { missing, .. } if missing == &dir.join(remove)),
                "{err:?}"
            );
            assert!(err.to_string().contains(remove), "{err}");
            // Nothing was generated over the remaining file.
            assert!(!dir.join(remove).exists());
        }
    }

    #[test]
    fn corrupt_files_are_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join(ROOT_CERT_FILE), "not a certificate").expect("write");
        std::fs::write(tmp.path().join(ROOT_KEY_FILE), "not a key").expect("write");
        let err = CaRoot::load_or_generate(tmp.path(), TD).expect_err("corrupt");
        assert!(matches!(err, CaRootError::Root(_)), "{err:?}");
    }

    #[test]
    fn certificate_and_key_must_belong_together() {
        let a = DevCa::generate(TD).expect("generate");
        let b = DevCa::generate(TD).expect("generate");
        CaRoot::from_pem(a.root_pem(), &a.key_pem()).expect("matching pair");
        let err = CaRoot::from_pem(a.root_pem(), &b.key_pem()).expect_err("mismatched pair");
        assert!(matches!(err, CaRootError::KeyMismatch), "{err:?}");
    }

    #[test]
    fn serving_certificate_chains_to_the_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = CaRoot::load_or_generate(tmp.path(), TD).expect("generate");
        let id: Identity = "spiffe://cluster.local/ns/istio-system/sa/controller"
            .parse()
            .expect("id");
        let cert = root
            .serving_certificate(&id, Duration::from_secs(3600))
            .expect("serving certificate");
        assert_eq!(cert.identity, id);
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.roots.len(), 1);
        mesh_core::tls::control_plane_server_config(&cert).expect("server config");
    }

    #[test]
    fn serving_certificate_carries_dns_and_ip_names_beside_the_spiffe_id() {
        use x509_parser::extensions::GeneralName;
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = CaRoot::load_or_generate(tmp.path(), TD).expect("generate");
        let id: Identity = "spiffe://cluster.local/ns/istio-system/sa/controller"
            .parse()
            .expect("id");
        let names = ServingNames {
            dns: vec![
                "istiod.istio-system.svc".into(),
                "mesh-controller.istio-system.svc".into(),
            ],
            ips: vec!["10.1.2.3".parse().expect("ip"), "fd00::1".parse().expect("ip")],
        };
        let cert = root
            .serving_certificate_for(&id, &names, Duration::from_secs(3600))
            .expect("serving certificate");
        // Our own clients still find exactly the SPIFFE id.
        assert_eq!(cert.identity, id);
        mesh_core::tls::control_plane_server_config(&cert).expect("server config");
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.chain[0]).expect("parse");
        let san = x509.subject_alternative_name().expect("san ext").expect("san");
        let mut got: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(b) => format!("ip:{}", b.len()),
                other => format!("{other:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "dns:istiod.istio-system.svc",
                "dns:mesh-controller.istio-system.svc",
                "ip:16",
                "ip:4",
                "uri:spiffe://cluster.local/ns/istio-system/sa/controller",
            ]
        );
        // A hostname verifier (what Istio's ztunnel uses) accepts the names and no other.
        let ee = rustls::pki_types::CertificateDer::from(cert.chain[0].to_vec());
        let mut store = rustls::RootCertStore::empty();
        store.add(cert.roots[0].clone()).expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(store),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        use rustls::client::danger::ServerCertVerifier;
        let check = |name: &str| {
            let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
            verifier.verify_server_cert(&ee, &[], &name, &[], rustls::pki_types::UnixTime::now())
        };
        check("istiod.istio-system.svc").expect("DNS SAN");
        check("10.1.2.3").expect("IP SAN");
        check("istiod.other.svc").expect_err("not a SAN");
        check("10.1.2.4").expect_err("not a SAN");
    }

    #[test]
    fn a_bad_dns_name_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = CaRoot::load_or_generate(tmp.path(), TD).expect("generate");
        let id: Identity = "spiffe://cluster.local/ns/istio-system/sa/controller"
            .parse()
            .expect("id");
        let names = ServingNames {
            dns: vec!["bad name\u{e9}".into()],
            ips: Vec::new(),
        };
        let err = root
            .serving_certificate_for(&id, &names, Duration::from_secs(3600))
            .expect_err("non-IA5 name");
        assert!(err.to_string().contains("bad name"), "{err}");
    }
}
