//! The `istio.v1.auth.IstioCertificateService` gRPC service: authenticates the caller, checks
//! the CSR and what identity it may have, and signs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::ca::{CaError, IMPERSONATED_IDENTITY};
use mesh_core::identity::Identity;
use mesh_core::log_limit::LogLimiter;
use mesh_proto::ca::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::{Code, Status};
use tracing::{debug, warn};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::auth::{bearer_token, AuthError, Authenticator, Caller};
use super::root::{CaRoot, CaRootError};

/// Lifetime of a certificate when the request names none, and the default cap.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Answers whether a pod runs on a node; the controller implements it from its pod inventory.
pub trait PodLocator: Send + Sync {
    /// True when a pod of `namespace`/`service_account` is scheduled on `node`.
    fn has_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool;
}

/// A fixed list of `(node, namespace, service account)`, for tests and static setups.
impl PodLocator for Vec<(String, String, String)> {
    fn has_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.iter()
            .any(|(n, ns, sa)| n == node && ns == namespace && sa == service_account)
    }
}

/// What the CA signs and for whom.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// Only identities of this trust domain are signed.
    pub trust_domain: String,
    /// Lifetime when the request asks for none (`validity_duration` <= 0).
    pub default_ttl: Duration,
    /// Upper bound on any lifetime, asked for or default.
    pub max_ttl: Duration,
    /// Identities allowed to ask on behalf of the pods of their node.
    pub node_proxies: HashSet<Identity>,
}

impl CaOptions {
    /// Defaults for `trust_domain`: 24 h lifetimes, and ztunnel
    /// (`spiffe://<td>/ns/istio-system/sa/ztunnel`) as the only node proxy.
    pub fn new(trust_domain: &str) -> Result<Self, mesh_core::identity::IdentityError> {
        let ztunnel = Identity::new(trust_domain, "istio-system", "ztunnel")?;
        Ok(CaOptions {
            trust_domain: ztunnel.trust_domain.clone(),
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_TTL,
            node_proxies: HashSet::from([ztunnel]),
        })
    }
}

/// Why a request was refused, as counted in `certificates_refused_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// No valid bearer token.
    Unauthenticated,
    /// The CSR (or the request around it) is malformed, badly signed or uses another key type.
    BadCsr,
    /// The identity asked for is not the caller's, or not of this trust domain.
    IdentityMismatch,
    /// A request on behalf of another identity that the caller may not make.
    ImpersonationDenied,
    /// Our own failure (signing, authentication backend).
    Internal,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Unauthenticated => "unauthenticated",
            RefusalReason::BadCsr => "bad_csr",
            RefusalReason::IdentityMismatch => "identity_mismatch",
            RefusalReason::ImpersonationDenied => "impersonation_denied",
            RefusalReason::Internal => "internal",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Counters of the CA. `Default` gives unregistered counters (tests).
#[derive(Clone, Debug, Default)]
pub struct CaMetrics {
    signed: Counter,
    refused: Family<ReasonLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
}

impl CaMetrics {
    /// Creates the counters and registers them as `certificates_signed_total` and
    /// `certificates_refused_total{reason}`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = CaMetrics::default();
        // prometheus-client appends `_total` to counters.
        registry.register("certificates_signed", "Certificates signed by the CA", m.signed.clone());
        registry.register(
            "certificates_refused",
            "Certificate requests refused by the CA, by reason",
            m.refused.clone(),
        );
        registry.register(
            "ca_reloads",
            "Changes of the plug-in CA files: applied, or refused (the previous CA keeps signing)",
            m.reloads.clone(),
        );
        m
    }

    /// Counts a change of the plug-in CA files, applied or refused.
    pub fn reloaded(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Plug-in CA changes applied (`true`) or refused (`false`) so far.
    pub fn reloads(&self, applied: bool) -> u64 {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).get()
    }

    pub fn signed(&self) -> u64 {
        self.signed.get()
    }

    pub fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .get()
    }
}

/// A refused request: the metric reason and what the caller is told (a `Status` only at the
/// end: it is large to pass around).
struct Refusal {
    reason: RefusalReason,
    code: Code,
    message: String,
}

impl Refusal {
    fn new(reason: RefusalReason, code: Code, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            code,
            message: message.into(),
        }
    }
}

fn bad_csr(message: impl Into<String>) -> Refusal {
    Refusal::new(RefusalReason::BadCsr, Code::InvalidArgument, message)
}

/// The CA service. Cheap to clone.
#[derive(Clone)]
pub struct CaServer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Swapped when the plug-in CA files change (a root rotation); each request signs with
    /// the CA current when it arrives.
    root: arc_swap::ArcSwap<CaRoot>,
    auth: Arc<dyn Authenticator>,
    pods: Arc<dyn PodLocator>,
    options: CaOptions,
    metrics: CaMetrics,
    /// Refusals are logged at most once per interval per reason (and caller): an
    /// unauthenticated client must not be able to flood the log.
    log_limit: LogLimiter<(RefusalReason, Option<Identity>)>,
}

/// How often a repeated refusal (same reason, same caller) is logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The largest certificate request decoded. A CSR is well under 2 KiB; nothing bigger is
/// read (or buffered) for a caller that may not even be authenticated yet.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

impl CaServer {
    pub fn new(
        root: Arc<CaRoot>,
        auth: Arc<dyn Authenticator>,
        pods: Arc<dyn PodLocator>,
        options: CaOptions,
        metrics: CaMetrics,
    ) -> Self {
        CaServer {
            inner: Arc::new(Inner {
                root: arc_swap::ArcSwap::new(root),
                auth,
                pods,
                options,
                metrics,
                log_limit: LogLimiter::new(REFUSAL_LOG_INTERVAL),
            }),
        }
    }

    /// Signs with `root` from now on (requests in flight finish with the previous one).
    pub fn replace_root(&self, root: Arc<CaRoot>) {
        self.inner.root.store(root);
    }

    /// The CA signing now.
    pub fn root(&self) -> Arc<CaRoot> {
        self.inner.root.load_full()
    }

    /// The tonic service, to add to a `tonic::transport::Server`.
    pub fn into_service(self) -> IstioCertificateServiceServer<CaServer> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<Caller, Refusal> {
        let unauthenticated =
            |e: AuthError| Refusal::new(RefusalReason::Unauthenticated, Code::Unauthenticated, e.to_string());
        let token = bearer_token(request.metadata()).map_err(unauthenticated)?;
        let source = request.remote_addr().map(|a| a.ip());
        self.inner
            .auth
            .authenticate_from(token, source)
            .await
            .map_err(|e| match e {
                // Not the caller's fault: let it retry.
                AuthError::Unavailable(_) => Refusal::new(RefusalReason::Internal, Code::Unavailable, e.to_string()),
                e => unauthenticated(e),
            })
    }

    /// Everything after authentication; returns the identity signed, its lifetime and the chain.
    fn sign(
        &self,
        caller: &Caller,
        req: &IstioCertificateRequest,
    ) -> Result<(Identity, Duration, Vec<String>), Refusal> {
        let opts = &self.inner.options;
        let csr_identity = csr_identity(&req.csr).map_err(|e| bad_csr(format!("CSR: {e}")))?;
        let impersonated = impersonated_identity(req)?;
        let requested = impersonated.as_ref().unwrap_or(&csr_identity);
        if requested.trust_domain != opts.trust_domain {
            return Err(Refusal::new(
                RefusalReason::IdentityMismatch,
                Code::PermissionDenied,
                format!(
                    "identity {requested} is not in this CA's trust domain {}",
                    opts.trust_domain
                ),
            ));
        }
        match &impersonated {
            None if csr_identity != caller.identity => {
                return Err(Refusal::new(
                    RefusalReason::IdentityMismatch,
                    Code::PermissionDenied,
                    format!(
                        "CSR identity {csr_identity} differs from authenticated identity {}",
                        caller.identity
                    ),
                ));
            }
            None => {}
            Some(target) => {
                // The CSR must ask for what the metadata says, or the two could be played
                // against each other.
                if csr_identity != *target {
                    return Err(Refusal::new(
                        RefusalReason::IdentityMismatch,
                        Code::InvalidArgument,
                        format!("CSR identity {csr_identity} differs from {IMPERSONATED_IDENTITY} {target}"),
                    ));
                }
                self.authorize_impersonation(caller, target)?;
            }
        }
        let ttl = self.lifetime(req.validity_duration);
        let chain = self
            .inner
            .root
            .load()
            .sign(requested, &req.csr, ttl)
            .map_err(|e| match e {
                // The CSR passed our checks but not the signer's (an extension it rejects).
                CaRootError::Sign(CaError::Csr(m)) => bad_csr(format!("CSR: {m}")),
                e => Refusal::new(RefusalReason::Internal, Code::Internal, format!("signing failed: {e}")),
            })?;
        Ok((requested.clone(), ttl, chain))
    }

    fn authorize_impersonation(&self, caller: &Caller, target: &Identity) -> Result<(), Refusal> {
        // Asking for one's own identity through the metadata is no impersonation: a ztunnel on
        // a VM (WorkloadEntry), authenticated as the VM's service account, always sends it.
        if caller.identity == *target {
            return Ok(());
        }
        let denied =
            |message: String| Refusal::new(RefusalReason::ImpersonationDenied, Code::PermissionDenied, message);
        if !self.inner.options.node_proxies.contains(&caller.identity) {
            return Err(denied(format!(
                "{} is not a trusted node proxy, so it may not request certificates for {target}",
                caller.identity
            )));
        }
        let Some(node) = &caller.node else {
            return Err(denied(format!(
                "node proxy {} presented credentials bound to no node, so it may not request certificates \
                 for {target}",
                caller.identity
            )));
        };
        if !self
            .inner
            .pods
            .has_pod(node, &target.namespace, &target.service_account)
        {
            return Err(denied(format!(
                "no pod with service account {}/{} is scheduled on node {node} of node proxy {}",
                target.namespace, target.service_account, caller.identity
            )));
        }
        Ok(())
    }

    /// The lifetime to sign for: the request's (seconds; <= 0 means the default), capped.
    fn lifetime(&self, requested_secs: i64) -> Duration {
        let opts = &self.inner.options;
        let asked = u64::try_from(requested_secs)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .unwrap_or(opts.default_ttl);
        asked.min(opts.max_ttl)
    }

    fn refused(&self, caller: Option<&Caller>, refusal: Refusal) -> Status {
        self.inner
            .metrics
            .refused
            .get_or_create(&ReasonLabels {
                reason: refusal.reason.as_str(),
            })
            .inc();
        let key = (refusal.reason, caller.map(|c| c.identity.clone()));
        if let Some(suppressed) = self.inner.log_limit.check(key) {
            let caller = caller.map_or_else(|| "unauthenticated caller".to_owned(), |c| c.to_string());
            warn!(
                %caller,
                reason = refusal.reason.as_str(),
                message = %refusal.message,
                suppressed,
                "certificate request refused (repeats within {}s are counted in `suppressed`)",
                REFUSAL_LOG_INTERVAL.as_secs()
            );
        }
        Status::new(refusal.code, refusal.message)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaServer {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, Status> {
        let caller = match self.authenticate(&request).await {
            Ok(c) => c,
            Err(r) => return Err(self.refused(None, r)),
        };
        match self.sign(&caller, request.get_ref()) {
            Ok((identity, ttl, cert_chain)) => {
                self.inner.metrics.signed.inc();
                debug!(%caller, %identity, ttl_secs = ttl.as_secs(), "certificate signed");
                Ok(tonic::Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(r) => Err(self.refused(Some(&caller), r)),
        }
    }
}

/// The identity asked for in the `ImpersonatedIdentity` metadata, if any. An empty string
/// counts as absent, as in Istio (where a missing field reads as "").
fn impersonated_identity(req: &IstioCertificateRequest) -> Result<Option<Identity>, Refusal> {
    use prost_types::value::Kind;
    let Some(value) = req.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) => s
            .parse()
            .map(Some)
            .map_err(|e| bad_csr(format!("metadata {IMPERSONATED_IDENTITY}: {e}"))),
        _ => Err(bad_csr(format!(
            "metadata {IMPERSONATED_IDENTITY} must be a string (a spiffe:// identity)"
        ))),
    }
}

/// Parses a PEM CSR, checks its key type and signature, and returns the single SPIFFE id it
/// asks for. Errors are messages for the caller.
fn csr_identity(pem: &str) -> Result<Identity, String> {
    if pem.trim().is_empty() {
        return Err("empty".into());
    }
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM-encoded certificate signing request: {e}"))?;
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err(format!(
            "PEM block is {:?}, expected \"CERTIFICATE REQUEST\"",
            block.label
        ));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&block.contents)
        .map_err(|e| format!("not a PKCS#10 certificate signing request: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes of trailing data after the request", rest.len()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    if !is_p256(spki) {
        return Err(format!(
            "key is {}; only ECDSA P-256 keys are accepted",
            describe_key(spki)
        ));
    }
    // Proof of possession: the requester holds the private key of the key being certified.
    // (rcgen's CSR parser checks this too, but only reports it as an opaque ring error.)
    csr.verify_signature().map_err(|e| match e {
        X509Error::SignatureVerificationError => {
            "signature does not verify with the request's own public key (altered, or signed with another key)"
                .to_owned()
        }
        X509Error::SignatureUnsupportedAlgorithm => "unsupported signature algorithm".to_owned(),
        e => format!("signature check failed: {e}"),
    })?;
    let mut uris = Vec::new();
    let mut others = 0usize;
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push(*u),
                        _ => others += 1,
                    }
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(format!("a requested extension could not be parsed: {error}"));
            }
            _ => {}
        }
    }
    // The leaf carries only the SPIFFE id; refusing extra names beats silently dropping them.
    if others > 0 {
        return Err(format!(
            "requests {others} subject alternative name(s) that are not URIs; only one spiffe:// URI is allowed"
        ));
    }
    match uris.as_slice() {
        [one] => one.parse().map_err(|e| format!("URI SAN: {e}")),
        [] => Err("no URI subject alternative name: exactly one spiffe:// identity is required".into()),
        many => Err(format!(
            "{} URI subject alternative names: exactly one spiffe:// identity is required",
            many.len()
        )),
    }
}

fn is_p256(spki: &SubjectPublicKeyInfo<'_>) -> bool {
    spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && ec_curve_is(spki, &OID_EC_P256)
}

fn ec_curve_is(spki: &SubjectPublicKeyInfo<'_>, curve: &x509_parser::der_parser::oid::Oid<'_>) -> bool {
    spki.algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|oid| oid == *curve)
}

fn describe_key(spki: &SubjectPublicKeyInfo<'_>) -> String {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        if ec_curve_is(spki, &OID_NIST_EC_P384) {
            return "ECDSA P-384".into();
        }
        return "ECDSA on a curve other than P-256".into();
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return "RSA".into();
    }
    if *alg == OID_SIG_ED25519 {
        return "Ed25519".into();
    }
    format!("of algorithm {}", alg.to_id_string())
}

#[cfg(test)]
mod tests {
    use mesh_core::identity::ca::new_csr;

    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().expect("identity")
    }

    fn csr_pem_for(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()))
    }

    fn der_of(pem: &str) -> Vec<u8> {
        pem::parse(pem).expect("pem").into_contents()
    }

    #[test]
    fn valid_csr_yields_its_identity() {
        let want = id("spiffe://cluster.local/ns/default/sa/sleep");
        let (_, csr) = new_csr(&want).expect("csr");
        assert_eq!(csr_identity(&csr).expect("valid"), want);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        for (csr, expect) in [
            ("", "empty"),
            ("garbage", "not a PEM-encoded"),
            (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "not a PKCS#10",
            ),
        ] {
            let err = csr_identity(csr).expect_err("garbage");
            assert!(err.contains(expect), "{csr:?}: {err}");
        }
    }

    #[test]
    fn altered_csr_fails_the_signature_check() {
        let (_, csr) = new_csr(&id("spiffe://cluster.local/ns/default/sa/sleep")).expect("csr");
        let mut der = der_of(&csr);
        // Rewrite the identity inside the signed part: still parseable, no longer signed.
        let at = der.windows(5).position(|w| w == b"sleep").expect("SAN in the DER");
        der[at + 4] = b'q';
        let err = csr_identity(&csr_pem_for(&der)).expect_err("altered");
        assert!(err.contains("signature does not verify"), "{err}");
    }

    #[test]
    fn other_key_types_are_refused() {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/default/sa/sleep".try_into().expect("uri"),
        )];
        for (alg, name) in [
            (&rcgen::PKCS_ECDSA_P384_SHA384, "ECDSA P-384"),
            (&rcgen::PKCS_ED25519, "Ed25519"),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).expect("key");
            let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
            let err = csr_identity(&csr).expect_err("refused");
            assert!(err.contains(name) && err.contains("only ECDSA P-256"), "{err}");
        }
    }

    #[test]
    fn san_count_and_kind_are_checked() {
        let key = rcgen::KeyPair::generate().expect("key");
        let csr_with = |sans: Vec<rcgen::SanType>| {
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            params.serialize_request(&key).expect("csr").pem().expect("pem")
        };
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().expect("uri"));
        let err = csr_identity(&csr_with(vec![])).expect_err("no SAN");
        assert!(err.contains("no URI subject alternative name"), "{err}");
        let two = vec![
            uri("spiffe://cluster.local/ns/a/sa/b"),
            uri("spiffe://cluster.local/ns/c/sa/d"),
        ];
        let err = csr_identity(&csr_with(two)).expect_err("two SANs");
        assert!(err.contains("2 URI subject alternative names"), "{err}");
        let dns = vec![
            uri("spiffe://cluster.local/ns/a/sa/b"),
            rcgen::SanType::DnsName("a.example".try_into().expect("dns")),
        ];
        let err = csr_identity(&csr_with(dns)).expect_err("DNS SAN");
        assert!(err.contains("not URIs"), "{err}");
        let err = csr_identity(&csr_with(vec![uri("https://example.com/x")])).expect_err("not spiffe");
        assert!(err.contains("URI SAN"), "{err}");
    }

    #[test]
    fn lifetime_defaults_and_caps() {
        let mut options = CaOptions::new("cluster.local").expect("options");
        options.default_ttl = Duration::from_secs(7200);
        options.max_ttl = Duration::from_secs(3600 * 10);
        let server = CaServer::new(
            Arc::new(test_root()),
            Arc::new(super::super::auth::BootstrapTokens::from_yaml("", "t").expect("tokens")),
            Arc::new(Vec::new()),
            options,
            CaMetrics::default(),
        );
        assert_eq!(server.lifetime(0), Duration::from_secs(7200));
        assert_eq!(server.lifetime(-5), Duration::from_secs(7200));
        assert_eq!(server.lifetime(60), Duration::from_secs(60));
        assert_eq!(server.lifetime(i64::MAX), Duration::from_secs(36000));
    }

    fn test_root() -> CaRoot {
        let ca = mesh_core::identity::DevCa::generate("cluster.local").expect("root");
        CaRoot::from_pem(ca.root_pem(), &ca.key_pem()).expect("root")
    }
}
