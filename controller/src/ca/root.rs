//! The CA's root of trust: loads or creates the root certificate and key, signs leaves with
//! it, and issues the controller's own TLS serving certificate from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::identity::ca::{new_csr, CaError, DevCa};
use mesh_core::identity::cert::{CertError, WorkloadCertificate};
use mesh_core::identity::Identity;
use tracing::info;

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

/// The root certificate and key the CA signs with.
pub struct CaRoot {
    ca: DevCa,
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
                Ok(CaRoot { ca })
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
        Ok(CaRoot { ca })
    }

    /// The root certificate (PEM) clients must trust.
    pub fn trust_bundle(&self) -> &str {
        self.ca.root_pem()
    }

    /// Signs `csr_pem` for `identity`, valid for `ttl`; returns the chain as the CA service
    /// sends it: leaf PEM first, root PEM last. The leaf carries exactly `identity` as its
    /// URI SAN whatever the CSR asked for, so callers must have checked the CSR already.
    pub fn sign(&self, identity: &Identity, csr_pem: &str, ttl: Duration) -> Result<Vec<String>, CaRootError> {
        let leaf = self.ca.issue(identity, csr_pem, ttl).map_err(CaRootError::Sign)?;
        Ok(vec![leaf, self.ca.root_pem().to_owned()])
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
}
