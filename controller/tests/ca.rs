//! The CA over the wire: a real tonic server on 127.0.0.1 over TLS (serving certificate from
//! the CA's own root), called by the node proxies' client (`CaClient`) with bootstrap tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use controller::ca::vm_token::{Claims, VmTokenAuth, VmTokenKey, VmTokenMetrics};
use controller::ca::{
    Authenticator, BootstrapTokens, CaMetrics, CaOptions, CaRoot, CaServer, PodLocator, RefusalReason, ROOT_CERT_FILE,
};
use mesh_core::identity::ca::{new_csr, CaClient, CaError, CertificateSigner, TokenSource};
use mesh_core::identity::cert::{certs_from_pem, leaf_info, WorkloadCertificate};
use mesh_core::identity::Identity;
use prometheus_client::registry::Registry;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const TD: &str = "cluster.local";
const CONTROLLER: &str = "spiffe://cluster.local/ns/istio-system/sa/controller";
const ZTUNNEL: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const HTTPBIN: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
const DAY: Duration = Duration::from_secs(24 * 3600);

const TOKENS: &str = "
- token: ztunnel-node-a-secret-0001
  identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel
  node: node-a
- token: ztunnel-no-node-secret-0002
  identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel
- token: sleep-token-secret-0003
  identity: spiffe://cluster.local/ns/default/sa/sleep
  node: node-a
";

fn id(s: &str) -> Identity {
    s.parse().expect("identity")
}

/// A running CA and what a client needs to reach it.
struct Ca {
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    root_pem: String,
    metrics: CaMetrics,
    registry: Registry,
    _dir: tempfile::TempDir,
}

impl Ca {
    async fn start(options: CaOptions) -> Ca {
        Ca::start_with(options, |tokens| tokens).await
    }

    /// As `start`, the bootstrap-token authenticator wrapped by `auth`.
    async fn start_with(options: CaOptions, auth: impl FnOnce(Arc<dyn Authenticator>) -> Arc<dyn Authenticator>) -> Ca {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Arc::new(CaRoot::load_or_generate(dir.path(), TD).expect("root"));
        assert!(dir.path().join(ROOT_CERT_FILE).exists());
        let serving = root.serving_certificate(&id(CONTROLLER), DAY).expect("serving cert");
        let tls = mesh_core::tls::control_plane_server_config(&serving).expect("server TLS");
        let tokens = BootstrapTokens::from_yaml(TOKENS, "tokens.yaml").expect("tokens");
        // httpbin runs on node-a; only other pods run elsewhere.
        let pods: Vec<(String, String, String)> = vec![
            ("node-a".into(), "default".into(), "httpbin".into()),
            ("node-b".into(), "default".into(), "reviews".into()),
        ];
        let mut registry = Registry::default();
        let metrics = CaMetrics::register(&mut registry);
        let server = CaServer::new(
            root.clone(),
            auth(Arc::new(tokens)),
            Arc::new(pods) as Arc<dyn PodLocator>,
            options,
            metrics.clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = controller::serve::tls_incoming(listener, tls);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server.into_service())
                .serve_with_incoming(incoming),
        );
        Ca {
            addr,
            roots: certs_from_pem(root.trust_bundle()).expect("roots"),
            root_pem: root.trust_bundle().to_owned(),
            metrics,
            registry,
            _dir: dir,
        }
    }

    async fn default() -> Ca {
        Ca::start(CaOptions::new(TD).expect("options")).await
    }

    /// A client as a node proxy builds it: TLS verifying the controller's identity.
    async fn client(&self, token: TokenSource, impersonate: bool) -> CaClient {
        let tls = mesh_core::tls::control_plane_client_config(&self.roots, vec![id(CONTROLLER)]).expect("client TLS");
        let channel = mesh_core::grpc::endpoint(&format!("https://{}", self.addr), Some(tls))
            .expect("endpoint")
            .connect()
            .await
            .expect("TLS connection to the CA");
        CaClient::new(channel, token, impersonate)
    }

    async fn sign(
        &self,
        token: Option<&str>,
        impersonate: bool,
        identity: &str,
        validity: Duration,
    ) -> Result<(Vec<String>, Vec<u8>), CaError> {
        let token = token.map_or(TokenSource::None, |t| TokenSource::Static(t.into()));
        let identity = id(identity);
        let (key, csr) = new_csr(&identity).expect("csr");
        let chain = self
            .client(token, impersonate)
            .await
            .sign(&identity, csr, validity)
            .await?;
        Ok((chain, key.serialize_der()))
    }

    fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode");
        out
    }
}

/// Checks a returned chain: [leaf, root], the root is ours, the leaf chains to it (webpki),
/// carries exactly `want` as its only SAN, and fits the key we generated.
fn check_chain(ca: &Ca, chain: &[String], key: Vec<u8>, want: &str) {
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], ca.root_pem, "root last");
    let leaf = certs_from_pem(&chain[0]).expect("leaf PEM").remove(0);
    let verifier = mesh_core::tls::SpiffeServerVerifier::new(&ca.roots, vec![id(want)]).expect("verifier");
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &mesh_core::tls::placeholder_server_name(),
            &[],
            UnixTime::now(),
        )
        .expect("leaf chains to the root and proves the identity");
    let (_, cert) = X509Certificate::from_der(&leaf).expect("x509");
    let san = cert.subject_alternative_name().expect("SAN").expect("SAN present");
    assert_eq!(san.value.general_names, vec![GeneralName::URI(want)]);
    // The leaf is for our key: a WorkloadCertificate builds and serves TLS.
    let wc = WorkloadCertificate::from_chain(&id(want), key, chain, &[]).expect("workload cert");
    mesh_core::tls::server_config(&wc).expect("leaf and key fit together");
}

fn refused(result: Result<(Vec<String>, Vec<u8>), CaError>) -> String {
    match result {
        Err(CaError::Refused(text)) => text,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a certificate"),
    }
}

#[tokio::test]
async fn signs_own_identity_with_a_valid_chain() {
    let ca = Ca::default().await;
    let (chain, key) = ca
        .sign(Some("sleep-token-secret-0003"), false, SLEEP, DAY)
        .await
        .expect("signed");
    check_chain(&ca, &chain, key, SLEEP);
    assert_eq!(ca.metrics.signed(), 1);
    let text = ca.metrics_text();
    assert!(text.contains("certificates_signed_total 1"), "{text}");
}

#[tokio::test]
async fn csr_for_another_identity_is_refused() {
    let ca = Ca::default().await;
    let text = refused(ca.sign(Some("sleep-token-secret-0003"), false, HTTPBIN, DAY).await);
    assert!(text.starts_with("PermissionDenied"), "{text}");
    assert!(
        text.contains(&format!(
            "CSR identity {HTTPBIN} differs from authenticated identity {SLEEP}"
        )),
        "{text}"
    );
    assert_eq!(ca.metrics.refused(RefusalReason::IdentityMismatch), 1);
    assert_eq!(ca.metrics.signed(), 0);
}

/// A proxy asking for its own identity through `ImpersonatedIdentity` (ztunnel on a VM, with
/// the VM's token) is signed: that is not impersonation. Another identity still is refused.
#[tokio::test]
async fn own_identity_through_the_impersonation_metadata_is_signed() {
    let ca = Ca::default().await;
    let (chain, key) = ca
        .sign(Some("sleep-token-secret-0003"), true, SLEEP, DAY)
        .await
        .expect("signed for itself");
    check_chain(&ca, &chain, key, SLEEP);
    let text = refused(ca.sign(Some("sleep-token-secret-0003"), true, HTTPBIN, DAY).await);
    assert!(text.contains(&format!("{SLEEP} is not a trusted node proxy")), "{text}");
}

#[tokio::test]
async fn impersonation_needs_a_node_proxy_with_the_pod_on_its_node() {
    // The default node proxy is ztunnel.
    let options = CaOptions::new(TD).expect("options");
    assert_eq!(options.node_proxies.iter().collect::<Vec<_>>(), vec![&id(ZTUNNEL)]);
    let ca = Ca::start(options).await;

    // ztunnel on node-a, httpbin on node-a: signed, for httpbin.
    let (chain, key) = ca
        .sign(Some("ztunnel-node-a-secret-0001"), true, HTTPBIN, DAY)
        .await
        .expect("signed for a pod of the node");
    check_chain(&ca, &chain, key, HTTPBIN);

    // reviews runs on node-b only.
    let text = refused(
        ca.sign(
            Some("ztunnel-node-a-secret-0001"),
            true,
            "spiffe://cluster.local/ns/default/sa/reviews",
            DAY,
        )
        .await,
    );
    assert!(text.starts_with("PermissionDenied"), "{text}");
    assert!(
        text.contains("no pod with service account default/reviews is scheduled on node node-a"),
        "{text}"
    );

    // sleep is not a node proxy, even with a node and the pod there.
    let text = refused(ca.sign(Some("sleep-token-secret-0003"), true, HTTPBIN, DAY).await);
    assert!(text.starts_with("PermissionDenied"), "{text}");
    assert!(text.contains(&format!("{SLEEP} is not a trusted node proxy")), "{text}");

    // A node proxy identity whose credentials name no node.
    let text = refused(ca.sign(Some("ztunnel-no-node-secret-0002"), true, HTTPBIN, DAY).await);
    assert!(text.contains("bound to no node"), "{text}");

    assert_eq!(ca.metrics.signed(), 1);
    assert_eq!(ca.metrics.refused(RefusalReason::ImpersonationDenied), 3);
    let text = ca.metrics_text();
    assert!(
        text.contains("certificates_refused_total{reason=\"impersonation_denied\"} 3"),
        "{text}"
    );
}

/// A VM token for group A (service account sleep) gets sleep's certificate and nothing else;
/// an expired or tampered one is unauthenticated and counted with its reason.
#[tokio::test]
async fn a_vm_token_gets_only_its_groups_identity() {
    let key = Arc::new(VmTokenKey::from_bytes(&[3; 32]));
    let vm_metrics = VmTokenMetrics::default();
    let m = vm_metrics.clone();
    let k = key.clone();
    let ca = Ca::start_with(CaOptions::new(TD).expect("options"), move |inner| {
        Arc::new(VmTokenAuth {
            key: k,
            trust_domain: TD.into(),
            clock: Arc::new(|| 1_000),
            metrics: m,
            inner,
        })
    })
    .await;
    let claims = |expires| Claims {
        namespace: "default".into(),
        group: "group-a".into(),
        service_account: "sleep".into(),
        expires,
    };
    let token = key.issue(&claims(2_000)).expect("issue");
    let (chain, der) = ca.sign(Some(&token), false, SLEEP, DAY).await.expect("signed");
    check_chain(&ca, &chain, der, SLEEP);
    // Group A's token asking for B's identity, directly or as impersonation.
    for impersonate in [false, true] {
        let text = refused(ca.sign(Some(&token), impersonate, HTTPBIN, DAY).await);
        assert!(text.starts_with("PermissionDenied"), "{text}");
    }
    let expired = key.issue(&claims(1_000)).expect("issue");
    let text = refused(ca.sign(Some(&expired), false, SLEEP, DAY).await);
    assert!(
        text.starts_with("Unauthenticated") && text.contains("expired"),
        "{text}"
    );
    let tampered = format!("{token}00");
    let text = refused(ca.sign(Some(&tampered), false, SLEEP, DAY).await);
    assert!(text.starts_with("Unauthenticated"), "{text}");
    assert_eq!(vm_metrics.refused("expired"), 1);
    assert_eq!(vm_metrics.refused("bad_signature"), 1);
    assert_eq!(ca.metrics.signed(), 1);
}

#[tokio::test]
async fn bad_and_missing_tokens_are_unauthenticated() {
    let ca = Ca::default().await;
    let text = refused(ca.sign(Some("not-a-token"), false, SLEEP, DAY).await);
    assert!(text.starts_with("Unauthenticated"), "{text}");
    assert!(text.contains("unknown bearer token"), "{text}");
    let text = refused(ca.sign(None, false, SLEEP, DAY).await);
    assert!(text.starts_with("Unauthenticated"), "{text}");
    assert!(text.contains("no authorization header"), "{text}");
    assert_eq!(ca.metrics.refused(RefusalReason::Unauthenticated), 2);
}

#[tokio::test]
async fn oversized_requests_are_not_read() {
    let ca = Ca::default().await;
    // A CSR is under 2 KiB; 100 KiB is refused by the decoder, before any authentication or
    // parsing work (so not counted as an unauthenticated or bad request).
    let client = ca.client(TokenSource::None, false).await;
    let err = client
        .sign(&id(SLEEP), "A".repeat(100 * 1024), DAY)
        .await
        .expect_err("oversized");
    let text = err.to_string();
    assert!(text.contains("OutOfRange") || text.contains("too large"), "{text}");
    assert_eq!(ca.metrics.refused(RefusalReason::Unauthenticated), 0);
    assert_eq!(ca.metrics.refused(RefusalReason::BadCsr), 0);
}

#[tokio::test]
async fn garbage_csr_is_invalid_argument() {
    let ca = Ca::default().await;
    let client = ca
        .client(TokenSource::Static("sleep-token-secret-0003".into()), false)
        .await;
    let err = client
        .sign(&id(SLEEP), "this is not a CSR".into(), DAY)
        .await
        .expect_err("garbage");
    let text = match err {
        CaError::Refused(text) => text,
        other => panic!("expected a refusal, got {other}"),
    };
    assert!(text.starts_with("InvalidArgument"), "{text}");
    assert!(
        text.contains("CSR: not a PEM-encoded certificate signing request"),
        "{text}"
    );
    assert_eq!(ca.metrics.refused(RefusalReason::BadCsr), 1);
}

#[tokio::test]
async fn lifetime_is_capped_and_defaulted() {
    let mut options = CaOptions::new(TD).expect("options");
    options.default_ttl = Duration::from_secs(1800);
    options.max_ttl = Duration::from_secs(3600);
    let ca = Ca::start(options).await;
    let lifetime = |chain: &[String]| {
        let leaf = certs_from_pem(&chain[0]).expect("leaf").remove(0);
        let info = leaf_info(&leaf).expect("leaf info");
        info.not_after
            .duration_since(SystemTime::now())
            .expect("valid in the future")
    };
    let near = |got: Duration, want: u64| {
        got <= Duration::from_secs(want) && got + Duration::from_secs(60) >= Duration::from_secs(want)
    };

    let (chain, _) = ca
        .sign(Some("sleep-token-secret-0003"), false, SLEEP, 2 * DAY)
        .await
        .expect("signed");
    let got = lifetime(&chain);
    assert!(near(got, 3600), "asked two days, max one hour: got {got:?}");

    let (chain, _) = ca
        .sign(Some("sleep-token-secret-0003"), false, SLEEP, Duration::ZERO)
        .await
        .expect("signed");
    let got = lifetime(&chain);
    assert!(near(got, 1800), "asked nothing, default 30 min: got {got:?}");

    let (chain, _) = ca
        .sign(Some("sleep-token-secret-0003"), false, SLEEP, Duration::from_secs(600))
        .await
        .expect("signed");
    let got = lifetime(&chain);
    assert!(near(got, 600), "asked 10 min: got {got:?}");
}

#[tokio::test]
async fn other_trust_domain_is_refused() {
    let mut options = CaOptions::new(TD).expect("options");
    options.trust_domain = "other.domain".into();
    let ca = Ca::start(options).await;
    let text = refused(ca.sign(Some("sleep-token-secret-0003"), false, SLEEP, DAY).await);
    assert!(text.starts_with("PermissionDenied"), "{text}");
    assert!(text.contains("not in this CA's trust domain other.domain"), "{text}");
}
