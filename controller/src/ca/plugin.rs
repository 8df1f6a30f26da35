//! The plug-in CA: an organisation's own intermediate, in Istio's `cacerts` layout
//! (`ca-cert.pem` the intermediate that signs, `ca-key.pem` its key, `cert-chain.pem` the
//! intermediate up to the root, `root-cert.pem` the trust bundle, which may hold several
//! roots). Files in local mode (`--cacerts-dir`, Istio's default `/etc/cacerts`); in a cluster
//! the `cacerts` Secret mounted there.
//!
//! The files are checked before use, each error naming its file: the key must belong to
//! `ca-cert.pem`, and a certificate the intermediate signs must chain to a root of
//! `root-cert.pem` through `cert-chain.pem` (a probe leaf is issued and verified, so a bundle
//! that would not trust the CA's own certificates is refused). [`watch`] re-reads the
//! directory: a usable change replaces the signer and the published bundle, an unusable one is
//! refused and the previous CA keeps signing (a root rotation never passes through a state
//! where the CA issues certificates its own bundle does not trust).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::cert::certs_from_pem;
use mesh_core::identity::Identity;
use tracing::{info, warn};

use super::root::{CaRoot, ROOT_CERT_FILE};

/// The intermediate's certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The intermediate's private key (PKCS#8 PEM).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The intermediate up to the root (Istio's `cert-chain.pem`).
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Where Istio mounts the `cacerts` Secret.
pub const DEFAULT_CACERTS_DIR: &str = "/etc/cacerts";

/// Why the plug-in CA files cannot be used. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "{dir}: {present} exists but {missing} does not (a plug-in CA needs {CA_CERT_FILE}, {CA_KEY_FILE} and \
         {ROOT_CERT_FILE}; {CERT_CHAIN_FILE} when the intermediate is not signed by the root directly)"
    )]
    Incomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{key} does not hold the private key of the certificate in {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("a certificate signed by {cert} does not chain to any root of {roots} through {chain}: {reason}")]
    Untrusted {
        cert: PathBuf,
        chain: PathBuf,
        roots: PathBuf,
        reason: String,
    },
}

/// The texts of a plug-in CA directory, as read. Equality is how [`watch`] notices a change.
#[derive(Clone, PartialEq, Eq)]
pub struct PluginFiles {
    pub dir: PathBuf,
    pub ca_cert: String,
    pub ca_key: String,
    /// Empty when the directory has no `cert-chain.pem`.
    pub cert_chain: String,
    pub root_cert: String,
}

impl std::fmt::Debug for PluginFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("PluginFiles")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl PluginFiles {
    /// Reads `dir`. `Ok(None)` when it holds no plug-in CA (no directory, or none of the
    /// files): the controller then runs its own self-signed CA.
    pub fn read(dir: &Path) -> Result<Option<Self>, PluginError> {
        let ca_cert = read_optional(&dir.join(CA_CERT_FILE))?;
        let ca_key = read_optional(&dir.join(CA_KEY_FILE))?;
        let root_cert = read_optional(&dir.join(ROOT_CERT_FILE))?;
        let cert_chain = read_optional(&dir.join(CERT_CHAIN_FILE))?;
        let incomplete = |present, missing| PluginError::Incomplete {
            dir: dir.to_owned(),
            present,
            missing,
        };
        match (ca_cert, ca_key, root_cert) {
            (None, None, None) if cert_chain.is_none() => Ok(None),
            (Some(ca_cert), Some(ca_key), Some(root_cert)) => Ok(Some(PluginFiles {
                dir: dir.to_owned(),
                ca_cert,
                ca_key,
                cert_chain: cert_chain.unwrap_or_default(),
                root_cert,
            })),
            (None, _, _) => Err(incomplete(present_one(dir), CA_CERT_FILE)),
            (Some(_), None, _) => Err(incomplete(CA_CERT_FILE, CA_KEY_FILE)),
            (Some(_), Some(_), None) => Err(incomplete(CA_CERT_FILE, ROOT_CERT_FILE)),
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// The name of a plug-in file that exists in `dir` (for the error when `ca-cert.pem` does not).
fn present_one(dir: &Path) -> &'static str {
    [CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE]
        .into_iter()
        .find(|f| dir.join(f).exists())
        .unwrap_or(CERT_CHAIN_FILE)
}

fn read_optional(path: &Path) -> Result<Option<String>, PluginError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PluginError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The checked parts of a plug-in CA, ready for [`CaRoot`].
pub(crate) struct Checked {
    /// Intermediates sent between the leaf and the roots (`ca-cert.pem` first).
    pub intermediates: Vec<String>,
    /// The roots of `root-cert.pem`, one PEM text.
    pub bundle: String,
}

/// Checks what can be checked without signing: PEM and X.509 of every file, a CA
/// certificate in `ca-cert.pem`, the key belonging to it, at least one root. Returns the
/// intermediates to send (those of `cert-chain.pem` that are not roots, `ca-cert.pem` first).
pub(crate) fn check(files: &PluginFiles) -> Result<Checked, PluginError> {
    let invalid = |file: &str, reason: String| PluginError::Invalid {
        path: files.path(file),
        reason,
    };
    let ca = single_cert(&files.ca_cert).map_err(|r| invalid(CA_CERT_FILE, r))?;
    check_is_ca(&ca).map_err(|r| invalid(CA_CERT_FILE, r))?;
    let key = rcgen::KeyPair::from_pem(&files.ca_key)
        .map_err(|e| invalid(CA_KEY_FILE, format!("not a PKCS#8 PEM private key: {e}")))?;
    if public_key_of(&ca).map_err(|r| invalid(CA_CERT_FILE, r))? != key.public_key_raw() {
        return Err(PluginError::KeyMismatch {
            key: files.path(CA_KEY_FILE),
            cert: files.path(CA_CERT_FILE),
        });
    }
    let roots = certs_from_pem(&files.root_cert).map_err(|e| invalid(ROOT_CERT_FILE, e.to_string()))?;
    if roots.is_empty() {
        return Err(invalid(ROOT_CERT_FILE, "holds no certificate".into()));
    }
    for r in &roots {
        x509_parser::parse_x509_certificate(r).map_err(|e| invalid(ROOT_CERT_FILE, format!("X.509: {e}")))?;
    }
    let chain = certs_from_pem(&files.cert_chain).map_err(|e| invalid(CERT_CHAIN_FILE, e.to_string()))?;
    let mut intermediates = vec![ca.clone()];
    for c in chain {
        x509_parser::parse_x509_certificate(&c).map_err(|e| invalid(CERT_CHAIN_FILE, format!("X.509: {e}")))?;
        // Roots travel once, at the end, as the bundle; the intermediate is already first.
        if c != ca && !roots.contains(&c) && !intermediates.contains(&c) {
            intermediates.push(c);
        }
    }
    // ca-cert.pem may itself be a root of the bundle (the root signs directly).
    if roots.contains(&ca) {
        intermediates.remove(0);
    }
    Ok(Checked {
        intermediates: intermediates.iter().map(|c| pem_lf(c)).collect(),
        bundle: roots.iter().map(|c| pem_lf(c)).collect(),
    })
}

/// PEM with Unix line endings, as the files operators write (and `cat` joins) have.
fn pem_lf(der: &[u8]) -> String {
    mesh_core::identity::cert::der_to_pem(der).replace("\r\n", "\n")
}

/// Issues a probe leaf with `root` and verifies it against `root`'s own bundle: the CA must
/// trust what it signs.
pub(crate) fn check_chains(root: &CaRoot, files: &PluginFiles, trust_domain: &str) -> Result<(), PluginError> {
    let untrusted = |reason: String| PluginError::Untrusted {
        cert: files.path(CA_CERT_FILE),
        chain: files.path(CERT_CHAIN_FILE),
        roots: files.path(ROOT_CERT_FILE),
        reason,
    };
    let probe = Identity::new(trust_domain, "istio-system", "ca-probe").map_err(|e| untrusted(e.to_string()))?;
    let (_, csr) = mesh_core::identity::ca::new_csr(&probe).map_err(|e| untrusted(e.to_string()))?;
    let pems = root
        .sign(&probe, &csr, Duration::from_secs(60))
        .map_err(|e| untrusted(format!("signing a probe certificate: {e}")))?;
    let (bundle, chain) = pems.split_last().ok_or_else(|| untrusted("nothing signed".into()))?;
    let mut ders = Vec::new();
    for pem in chain {
        ders.extend(certs_from_pem(pem).map_err(|e| untrusted(e.to_string()))?);
    }
    let roots = certs_from_pem(bundle).map_err(|e| untrusted(e.to_string()))?;
    mesh_core::tls::verify_workload_chain(&ders, &roots).map_err(|e| untrusted(e.to_string()))?;
    Ok(())
}

fn single_cert(pem: &str) -> Result<rustls::pki_types::CertificateDer<'static>, String> {
    let mut certs = certs_from_pem(pem).map_err(|e| e.to_string())?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        0 => Err("holds no certificate".into()),
        n => Err(format!(
            "holds {n} certificates; exactly one (the signing CA) is expected"
        )),
    }
}

fn check_is_ca(der: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("X.509: {e}"))?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => Ok(()),
        Ok(_) => Err("is not a CA certificate (basicConstraints CA:TRUE is required to sign)".into()),
        Err(e) => Err(format!("basicConstraints: {e}")),
    }
}

fn public_key_of(der: &[u8]) -> Result<Vec<u8>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("X.509: {e}"))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Re-reads the plug-in directory `dir` every `interval`. A usable change is handed to `apply`
/// (which swaps the signer and publishes the bundle); an unusable one is logged once and
/// counted as refused, and the previous CA keeps signing. `last` is what the CA signs with
/// now: `None` for the self-signed root, whose directory may stay empty for good (not a
/// refusal); files appearing there switch the CA to the plug-in without a restart, as a
/// rotation does. For no connection to fail across that switch, the plug-in's
/// `root-cert.pem` must carry the self-signed root beside its own until every workload has a
/// certificate from the new CA (Istio's migration to a plug-in CA asks the same).
pub async fn watch(
    dir: PathBuf,
    mut last: Option<PluginFiles>,
    trust_domain: String,
    interval: Duration,
    metrics: super::CaMetrics,
    apply: impl Fn(Arc<CaRoot>) + Send + 'static,
) {
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(interval).await;
        let files = match PluginFiles::read(&dir) {
            Ok(Some(files)) => files,
            Ok(None) if last.is_none() => continue,
            Ok(None) => {
                note_refusal(&mut last_error, &metrics, "the plug-in CA files were removed".into());
                continue;
            }
            Err(e) => {
                note_refusal(&mut last_error, &metrics, e.to_string());
                continue;
            }
        };
        if last.as_ref() == Some(&files) {
            continue;
        }
        match CaRoot::from_plugin(&files, &trust_domain) {
            Ok(root) => {
                let what = if last.is_some() {
                    "changed"
                } else {
                    "appeared; leaving the self-signed root"
                };
                info!(dir = %dir.display(), roots = root.root_count(), "plug-in CA {what}; signing with it now");
                apply(Arc::new(root));
                metrics.reloaded(true);
                last_error.clear();
            }
            Err(e) => note_refusal(&mut last_error, &metrics, e.to_string()),
        }
        last = Some(files);
    }
}

fn note_refusal(last_error: &mut String, metrics: &super::CaMetrics, error: String) {
    if *last_error != error {
        warn!(%error, "plug-in CA change refused; still signing with the previous CA");
        metrics.reloaded(false);
        *last_error = error;
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use mesh_core::identity::ca::new_csr;
    use mesh_core::identity::WorkloadCertificate;
    use rustls::pki_types::CertificateDer;

    use super::*;

    const TD: &str = "cluster.local";

    /// A CA certificate and its key, made with rcgen.
    struct Authority {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    fn ca_params(name: &str) -> rcgen::CertificateParams {
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "Example Corp");
        dn.push(rcgen::DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
    }

    fn root(name: &str) -> Authority {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = ca_params(name).self_signed(&key).expect("root");
        Authority { cert, key }
    }

    fn intermediate(name: &str, parent: &Authority) -> Authority {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = ca_params(name)
            .signed_by(&key, &parent.cert, &parent.key)
            .expect("intermediate");
        Authority { cert, key }
    }

    /// Writes Istio's layout: `ca` signs, `chain` is what cert-chain.pem holds after `ca`,
    /// `roots` the bundle.
    fn write(dir: &Path, ca: &Authority, chain: &[&Authority], roots: &[&Authority]) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join(CA_CERT_FILE), ca.cert.pem()).expect("write");
        std::fs::write(dir.join(CA_KEY_FILE), ca.key.serialize_pem()).expect("write");
        let chain_pem: String = std::iter::once(ca)
            .chain(chain.iter().copied())
            .map(|a| a.cert.pem())
            .collect();
        std::fs::write(dir.join(CERT_CHAIN_FILE), chain_pem).expect("write");
        let roots_pem: String = roots.iter().map(|a| a.cert.pem()).collect();
        std::fs::write(dir.join(ROOT_CERT_FILE), roots_pem).expect("write");
    }

    fn load(dir: &Path) -> Result<CaRoot, PluginError> {
        let files = PluginFiles::read(dir)?.expect("plug-in files present");
        CaRoot::from_plugin(&files, TD)
    }

    fn sleep_id() -> Identity {
        "spiffe://cluster.local/ns/default/sa/sleep".parse().expect("id")
    }

    /// Signs a fresh CSR for `sleep`: the CA's response.
    fn issue(ca: &CaRoot) -> Vec<String> {
        let (_, csr) = new_csr(&sleep_id()).expect("csr");
        ca.sign(&sleep_id(), &csr, Duration::from_secs(3600)).expect("sign")
    }

    /// The response as a proxy holds it: chain (leaf, intermediates) and the roots it trusts.
    fn as_proxy(response: &[String]) -> WorkloadCertificate {
        let key = rcgen::KeyPair::generate().expect("key").serialize_der();
        WorkloadCertificate::from_ca_response(&sleep_id(), key, response, &[]).expect("usable response")
    }

    fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
        certs_from_pem(pem).expect("pem")
    }

    #[test]
    fn workload_certificates_chain_through_the_intermediate_and_end_with_the_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ra, ia) = {
            let ra = root("root A");
            let ia = intermediate("intermediate A", &ra);
            (ra, ia)
        };
        write(tmp.path(), &ia, &[&ra], &[&ra]);
        let ca = load(tmp.path()).expect("plug-in CA");
        assert_eq!(ca.trust_bundle(), ra.cert.pem());
        let response = issue(&ca);
        // leaf, intermediate, root: as Istio's CA answers (the root sent once, not twice).
        assert_eq!(response.len(), 3, "{response:?}");
        assert_eq!(response[1], ia.cert.pem());
        assert_eq!(response[2], ra.cert.pem());
        let cert = as_proxy(&response);
        assert_eq!(cert.chain.len(), 2, "leaf and intermediate go on the wire");
        assert_eq!(cert.roots, ders(&ra.cert.pem()));
        let identity = mesh_core::tls::verify_workload_chain(&cert.chain, &cert.roots).expect("chains to root A");
        assert_eq!(identity, sleep_id());
        // Without the intermediate the leaf does not chain: the intermediate really signed it.
        mesh_core::tls::verify_workload_chain(&cert.chain[..1], &cert.roots).expect_err("needs the intermediate");
    }

    #[test]
    fn a_deeper_chain_is_sent_whole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ra = root("root A");
        let mid = intermediate("policy CA", &ra);
        let issuing = intermediate("issuing CA", &mid);
        write(tmp.path(), &issuing, &[&mid, &ra], &[&ra]);
        let cert = as_proxy(&issue(&load(tmp.path()).expect("plug-in CA")));
        assert_eq!(cert.chain.len(), 3, "leaf, issuing, policy");
        mesh_core::tls::verify_workload_chain(&cert.chain, &cert.roots).expect("chains to root A");
    }

    #[test]
    fn the_key_is_checked_against_the_certificate_naming_both_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ra = root("root A");
        let ia = intermediate("intermediate A", &ra);
        write(tmp.path(), &ia, &[&ra], &[&ra]);
        std::fs::write(tmp.path().join(CA_KEY_FILE), ra.key.serialize_pem()).expect("write");
        let err = load(tmp.path()).expect_err("key of another certificate");
        assert!(matches!(err, PluginError::KeyMismatch { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("ca-key.pem") && text.contains("ca-cert.pem"), "{text}");
        std::fs::write(tmp.path().join(CA_KEY_FILE), "not a key").expect("write");
        let text = load(tmp.path()).expect_err("garbage key").to_string();
        assert!(text.contains("ca-key.pem"), "{text}");
    }

    #[test]
    fn missing_files_and_a_leaf_as_ca_are_reported_by_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(PluginFiles::read(&tmp.path().join("absent")).expect("no dir").is_none());
        assert!(PluginFiles::read(tmp.path()).expect("empty dir").is_none());
        let ra = root("root A");
        let ia = intermediate("intermediate A", &ra);
        write(tmp.path(), &ia, &[&ra], &[&ra]);
        for (remove, named) in [(ROOT_CERT_FILE, ROOT_CERT_FILE), (CA_KEY_FILE, CA_KEY_FILE)] {
            let dir = tmp.path().join(format!("without-{remove}"));
            write(&dir, &ia, &[&ra], &[&ra]);
            std::fs::remove_file(dir.join(remove)).expect("rm");
            let err = PluginFiles::read(&dir).expect_err("incomplete");
            assert!(err.to_string().contains(named), "{err}");
        }
        // cert-chain.pem may be absent when the root signs the intermediate directly.
        std::fs::remove_file(tmp.path().join(CERT_CHAIN_FILE)).expect("rm");
        load(tmp.path()).expect("no cert-chain.pem");
        // A leaf cannot sign.
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["x.example".to_owned()])
            .expect("params")
            .signed_by(&key, &ia.cert, &ia.key)
            .expect("leaf");
        std::fs::write(tmp.path().join(CA_CERT_FILE), leaf.pem()).expect("write");
        std::fs::write(tmp.path().join(CA_KEY_FILE), key.serialize_pem()).expect("write");
        let err = load(tmp.path()).expect_err("leaf as CA");
        assert!(
            err.to_string().contains("ca-cert.pem") && err.to_string().contains("not a CA"),
            "{err}"
        );
    }

    #[test]
    fn a_bundle_that_does_not_trust_the_intermediate_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ra, rb) = (root("root A"), root("root B"));
        let ia = intermediate("intermediate A", &ra);
        write(tmp.path(), &ia, &[&ra], &[&rb]);
        let err = load(tmp.path()).expect_err("root A is not in the bundle");
        assert!(matches!(err, PluginError::Untrusted { .. }), "{err:?}");
        assert!(err.to_string().contains("root-cert.pem"), "{err}");
    }

    #[test]
    fn every_root_of_the_bundle_reaches_the_proxy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ra, rb) = (root("root A"), root("root B"));
        let ia = intermediate("intermediate A", &ra);
        let ib = intermediate("intermediate B", &rb);
        write(tmp.path(), &ia, &[&ra], &[&ra, &rb]);
        let ca = load(tmp.path()).expect("old intermediate, both roots");
        assert_eq!(ca.root_count(), 2);
        let response = issue(&ca);
        assert_eq!(
            ders(response.last().expect("bundle")).len(),
            2,
            "one element, both roots"
        );
        let proxy = as_proxy(&response);
        assert_eq!(proxy.roots.len(), 2);
        // A peer already on the new intermediate is trusted, and so is one still on the old.
        write(tmp.path(), &ib, &[&rb], &[&ra, &rb]);
        let peer_b = as_proxy(&issue(&load(tmp.path()).expect("new intermediate")));
        mesh_core::tls::verify_workload_chain(&peer_b.chain, &proxy.roots).expect("B trusted by a proxy of step 1");
        mesh_core::tls::verify_workload_chain(&proxy.chain, &peer_b.roots).expect("A trusted by a proxy of step 2");
    }

    /// Revocation of a compromised intermediate by re-rooting: once the bundle no longer holds
    /// the root above it, a chain through it is refused, while the new chain is accepted.
    #[test]
    fn a_chain_through_a_retired_intermediate_is_refused_once_its_root_leaves_the_bundle() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ra, rb) = (root("root A"), root("root B"));
        let compromised = intermediate("intermediate A", &ra);
        let ib = intermediate("intermediate B", &rb);
        write(tmp.path(), &compromised, &[&ra], &[&ra]);
        let stolen = as_proxy(&issue(&load(tmp.path()).expect("before")));
        // Publish the new root beside the old, re-issue from the new intermediate, retire.
        write(tmp.path(), &compromised, &[&ra], &[&ra, &rb]);
        let during = as_proxy(&issue(&load(tmp.path()).expect("step 1")));
        mesh_core::tls::verify_workload_chain(&stolen.chain, &during.roots).expect("still trusted during rotation");
        write(tmp.path(), &ib, &[&rb], &[&rb]);
        let after = as_proxy(&issue(&load(tmp.path()).expect("retired")));
        assert_eq!(after.roots, ders(&rb.cert.pem()));
        let err = mesh_core::tls::verify_workload_chain(&stolen.chain, &after.roots).expect_err("retired root");
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        mesh_core::tls::verify_workload_chain(&after.chain, &after.roots).expect("the new chain");
        // A certificate the compromised intermediate signs after the retirement (the attacker
        // holds its key) is refused just the same.
        write(&tmp.path().join("attacker"), &compromised, &[&ra], &[&ra]);
        let forged = as_proxy(&issue(&load(&tmp.path().join("attacker")).expect("attacker's CA")));
        mesh_core::tls::verify_workload_chain(&forged.chain, &after.roots).expect_err("forged after retirement");
    }

    /// Runs openssl, failing the test with its output when it fails.
    fn openssl(dir: &Path, args: &[&str]) -> std::process::Output {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        out
    }

    fn openssl_ok(dir: &Path, args: &[&str]) {
        let out = openssl(dir, args);
        assert!(
            out.status.success(),
            "openssl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A root and an intermediate made by openssl, as Istio's `tools/certs` Makefile does, in
    /// the `cacerts` layout.
    fn openssl_hierarchy(dir: &Path) {
        std::fs::write(
            dir.join("ext.cnf"),
            "[req]\ndistinguished_name = dn\n[dn]\n\
             [root]\nbasicConstraints = critical, CA:true\nkeyUsage = critical, keyCertSign, cRLSign, digitalSignature\n\
             subjectKeyIdentifier = hash\n\
             [inter]\nbasicConstraints = critical, CA:true, pathlen:0\n\
             keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n\
             subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n\
             subjectAltName = URI:spiffe://cluster.local/ns/istio-system/sa/citadel\n",
        )
        .expect("ext.cnf");
        for key in ["root-key.pem", CA_KEY_FILE] {
            openssl_ok(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    key,
                ],
            );
        }
        openssl_ok(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "root-key.pem",
                "-subj",
                "/O=Istio/CN=Root CA",
                "-days",
                "3650",
                "-config",
                "ext.cnf",
                "-extensions",
                "root",
                "-out",
                ROOT_CERT_FILE,
            ],
        );
        openssl_ok(
            dir,
            &[
                "req",
                "-new",
                "-key",
                CA_KEY_FILE,
                "-subj",
                "/O=Istio/CN=Intermediate CA/L=cluster1",
                "-config",
                "ext.cnf",
                "-out",
                "ca.csr",
            ],
        );
        openssl_ok(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "ca.csr",
                "-CA",
                ROOT_CERT_FILE,
                "-CAkey",
                "root-key.pem",
                "-CAcreateserial",
                "-days",
                "730",
                "-extfile",
                "ext.cnf",
                "-extensions",
                "inter",
                "-out",
                CA_CERT_FILE,
            ],
        );
        let chain = format!(
            "{}{}",
            std::fs::read_to_string(dir.join(CA_CERT_FILE)).expect("ca-cert"),
            std::fs::read_to_string(dir.join(ROOT_CERT_FILE)).expect("root-cert")
        );
        std::fs::write(dir.join(CERT_CHAIN_FILE), chain).expect("cert-chain");
    }

    #[test]
    fn openssl_verifies_a_workload_chain_against_the_published_bundle() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cacerts = tmp.path().join("cacerts");
        std::fs::create_dir(&cacerts).expect("mkdir");
        openssl_hierarchy(&cacerts);
        let ca = load(&cacerts).expect("openssl-made plug-in CA");
        let published =
            super::super::root::publish_trust_bundle(&tmp.path().join("ca"), ca.trust_bundle()).expect("publish");
        let response = issue(&ca);
        let (bundle, chain) = response.split_last().expect("response");
        assert_eq!(bundle, &std::fs::read_to_string(&published).expect("published"));
        std::fs::write(tmp.path().join("leaf.pem"), &chain[0]).expect("leaf");
        std::fs::write(tmp.path().join("chain.pem"), chain[1..].concat()).expect("chain");
        let verify = |bundle: &Path| {
            openssl(
                tmp.path(),
                &[
                    "verify",
                    "-CAfile",
                    &bundle.display().to_string(),
                    "-untrusted",
                    "chain.pem",
                    "-purpose",
                    "sslclient",
                    "leaf.pem",
                ],
            )
        };
        let out = verify(&published);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("leaf.pem: OK"),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The control: against another root, openssl refuses the same chain.
        let other = root("root B");
        std::fs::write(tmp.path().join("other.pem"), other.cert.pem()).expect("other");
        assert!(!verify(&tmp.path().join("other.pem")).status.success());
    }

    #[tokio::test]
    async fn changes_are_applied_and_unusable_ones_refused_while_the_old_ca_signs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ra, rb) = (root("root A"), root("root B"));
        let ia = intermediate("intermediate A", &ra);
        let ib = intermediate("intermediate B", &rb);
        write(tmp.path(), &ia, &[&ra], &[&ra]);
        let files = PluginFiles::read(tmp.path()).expect("read").expect("present");
        let metrics = super::super::CaMetrics::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(watch(
            tmp.path().to_owned(),
            Some(files),
            TD.to_owned(),
            Duration::from_millis(20),
            metrics.clone(),
            move |root: Arc<CaRoot>| {
                let _ = tx.send(root);
            },
        ));
        // The new intermediate before its root is published: refused, nothing applied.
        write(tmp.path(), &ib, &[&rb], &[&ra]);
        mesh_e2e_free_wait(|| metrics.reloads(false) == 1).await;
        assert!(rx.try_recv().is_err(), "an untrusted intermediate must not be applied");
        // Published beside the old root: applied.
        write(tmp.path(), &ib, &[&rb], &[&ra, &rb]);
        let applied = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("applied in time")
            .expect("root");
        assert_eq!(applied.root_count(), 2);
        assert_eq!(metrics.reloads(true), 1);
        task.abort();
    }

    /// A controller started with its self-signed root (no plug-in files) switches to the
    /// plug-in CA once the files appear, without a restart; incomplete files are refused and
    /// the self-signed root keeps signing meanwhile.
    #[tokio::test]
    async fn plug_in_files_appearing_replace_the_self_signed_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("cacerts");
        let metrics = super::super::CaMetrics::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(watch(
            dir.clone(),
            None,
            TD.to_owned(),
            Duration::from_millis(20),
            metrics.clone(),
            move |root: Arc<CaRoot>| {
                let _ = tx.send(root);
            },
        ));
        // No directory: the self-signed root stays, nothing is refused.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!((metrics.reloads(false), metrics.reloads(true)), (0, 0));
        // Half written: refused.
        std::fs::create_dir(&dir).expect("mkdir");
        let (ra, ia) = {
            let ra = root("plug-in root");
            let ia = intermediate("plug-in intermediate", &ra);
            (ra, ia)
        };
        std::fs::write(dir.join(CA_CERT_FILE), ia.cert.pem()).expect("write");
        mesh_e2e_free_wait(|| metrics.reloads(false) == 1).await;
        assert!(rx.try_recv().is_err());
        // Complete: applied; what it signs chains through the intermediate to its root.
        write(&dir, &ia, &[&ra], &[&ra]);
        let applied = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("applied in time")
            .expect("root");
        assert_eq!(applied.root_count(), 1);
        assert_eq!(ders(applied.trust_bundle()), [ra.cert.der().clone()]);
        assert_eq!(issue(&applied).len(), 3, "leaf, intermediate, bundle");
        task.abort();
    }

    /// Polls `f` every 10 ms for up to 5 s (the watcher has no signal for a refusal but its
    /// counter).
    async fn mesh_e2e_free_wait(f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached within 5 s");
    }
}
