//! The mesh CA client against an in-process `IstioCertificateService` backed by a development
//! CA: impersonation, token and requested lifetime on the wire, refusals, and the CA reached
//! over TLS with the control plane client configuration (server identity checked, no client
//! certificate).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::grpc;
use mesh_core::identity::ca::{new_csr, IMPERSONATED_IDENTITY};
use mesh_core::identity::cert::certs_from_pem;
use mesh_core::identity::{
    CaClient, CaError, CertManager, CertManagerConfig, CertState, CertificateSigner, DevCa, FetchError, Identity,
    TokenSource, WorkloadCertificate,
};
use mesh_proto::ca::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

/// Identities in this namespace are refused: the node may not ask for them.
const FORBIDDEN_NS: &str = "forbidden";
const CONTROLLER: &str = "spiffe://cluster.local/ns/istio-system/sa/mesh-controller";

/// What the server saw of one accepted request.
#[derive(Clone, Debug)]
struct Seen {
    authorization: String,
    impersonated: String,
    validity_duration: i64,
}

/// A CA service that signs with a [`DevCa`] for the impersonated identity, after checking
/// the bearer token.
struct TestCa {
    ca: Arc<DevCa>,
    tokens: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl IstioCertificateService for TestCa {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let accepted = self
            .tokens
            .lock()
            .unwrap()
            .iter()
            .any(|t| authorization == format!("Bearer {t}"));
        if !accepted {
            return Err(tonic::Status::unauthenticated("bearer token not accepted"));
        }
        let req = request.into_inner();
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| tonic::Status::invalid_argument("no ImpersonatedIdentity"))?;
        let identity: Identity = impersonated
            .parse()
            .map_err(|e| tonic::Status::invalid_argument(format!("ImpersonatedIdentity: {e}")))?;
        if identity.namespace == FORBIDDEN_NS {
            return Err(tonic::Status::permission_denied(format!(
                "node may not impersonate {identity}: no pod of it runs on this node"
            )));
        }
        self.seen.lock().unwrap().push(Seen {
            authorization,
            impersonated,
            validity_duration: req.validity_duration,
        });
        let validity = Duration::from_secs(req.validity_duration.max(1) as u64);
        let leaf = self
            .ca
            .issue(&identity, &req.csr, validity)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf, self.ca.root_pem().to_owned()],
        }))
    }
}

struct Fixture {
    ca: Arc<DevCa>,
    tokens: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fixture {
    fn new(tokens: &[&str]) -> Fixture {
        Fixture {
            ca: Arc::new(DevCa::generate("cluster.local").expect("ca")),
            tokens: Arc::new(Mutex::new(tokens.iter().map(|t| t.to_string()).collect())),
            seen: Arc::default(),
        }
    }

    fn service(&self) -> IstioCertificateServiceServer<TestCa> {
        IstioCertificateServiceServer::new(TestCa {
            ca: self.ca.clone(),
            tokens: self.tokens.clone(),
            seen: self.seen.clone(),
        })
    }

    /// Serves plaintext gRPC on a loopback port.
    async fn serve_plaintext(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = TcpIncoming::from_listener(listener, true, None).expect("incoming");
        tokio::spawn(
            Server::builder()
                .add_service(self.service())
                .serve_with_incoming(incoming),
        );
        addr
    }

    /// Serves gRPC over TLS with a certificate for `server_identity` from this CA; returns the
    /// address and a record of whether each client presented a certificate.
    async fn serve_tls(&self, server_identity: &str) -> (SocketAddr, Arc<Mutex<Vec<bool>>>) {
        let cert = self.certificate(server_identity);
        let acceptor =
            tokio_rustls::TlsAcceptor::from(mesh_core::tls::control_plane_server_config(&cert).expect("tls"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client_certs = Arc::new(Mutex::new(Vec::new()));
        let record = client_certs.clone();
        // tonic's server cannot take rustls streams without its TLS feature: bridge each
        // handshaken connection through an in-memory duplex pipe.
        let incoming = futures_util::stream::unfold(
            (listener, acceptor, record),
            |(listener, acceptor, record)| async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return None;
                    };
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        continue;
                    };
                    record
                        .lock()
                        .unwrap()
                        .push(tls.get_ref().1.peer_certificates().is_some());
                    let (near, mut far) = tokio::io::duplex(64 << 10);
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut far).await;
                    });
                    return Some((Ok::<_, std::io::Error>(near), (listener, acceptor, record)));
                }
            },
        );
        tokio::spawn(
            Server::builder()
                .add_service(self.service())
                .serve_with_incoming(incoming),
        );
        (addr, client_certs)
    }

    fn certificate(&self, identity: &str) -> WorkloadCertificate {
        let id: Identity = identity.parse().expect("identity");
        let (key, csr) = new_csr(&id).expect("csr");
        let leaf = self.ca.issue(&id, &csr, Duration::from_secs(3600)).expect("issue");
        WorkloadCertificate::from_chain(&id, key.serialize_der(), &[leaf, self.ca.root_pem().to_owned()], &[])
            .expect("certificate")
    }

    fn roots(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        certs_from_pem(self.ca.root_pem()).expect("root")
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).expect("identity")
}

fn manager(client: CaClient, roots: Vec<rustls::pki_types::CertificateDer<'static>>) -> Arc<CertManager> {
    CertManager::new(
        Arc::new(client),
        roots,
        CertManagerConfig {
            validity: Duration::from_secs(3600),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            fetch_timeout: Duration::from_secs(10),
        },
    )
}

#[tokio::test]
async fn manager_gets_a_certificate_for_the_impersonated_identity() {
    let f = Fixture::new(&["s3cret"]);
    let addr = f.serve_plaintext().await;
    let channel = grpc::connect_lazy(&format!("http://{addr}"), None).expect("channel");
    let client = CaClient::new(channel, TokenSource::Static("s3cret".into()), true);
    let certs = manager(client, vec![]);

    let pod = id("default", "reviews");
    let cert = certs.fetch(&pod).await.expect("certificate");
    assert_eq!(cert.identity, pod);
    assert_eq!(
        cert.roots,
        f.roots(),
        "the CA's root is trusted when no bundle is configured"
    );
    let lifetime = cert.not_after.duration_since(cert.not_before).expect("ordered");
    assert!(
        lifetime >= Duration::from_secs(3600) && lifetime <= Duration::from_secs(3600 + 120),
        "lifetime {lifetime:?}"
    );
    assert!(certs.get_ready(&pod).is_some());

    let seen = f.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authorization, "Bearer s3cret");
    assert_eq!(seen[0].impersonated, pod.to_string());
    assert_eq!(seen[0].validity_duration, 3600);
}

#[tokio::test]
async fn token_is_read_from_a_file_on_every_request() {
    let f = Fixture::new(&["first-token"]);
    let addr = f.serve_plaintext().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    std::fs::write(&path, "first-token\n").expect("write token");
    let client = CaClient::new(
        grpc::connect(&format!("http://{addr}"), None).await.expect("connect"),
        TokenSource::File(path.clone()),
        true,
    );
    let pod = id("default", "ratings");
    let sign = |validity: u64| {
        let (_, csr) = new_csr(&pod).expect("csr");
        client.sign(&pod, csr, Duration::from_secs(validity))
    };
    let chain = sign(600).await.expect("signed");
    assert_eq!(chain.len(), 2);

    // The token rotates: the next request carries the new one, without a restart.
    f.tokens.lock().unwrap().push("second-token".into());
    std::fs::write(&path, "second-token").expect("rotate token");
    sign(1200).await.expect("signed with the rotated token");
    let seen = f.seen();
    assert_eq!(
        seen.iter()
            .map(|s| (s.authorization.as_str(), s.validity_duration))
            .collect::<Vec<_>>(),
        vec![("Bearer first-token", 600), ("Bearer second-token", 1200)]
    );

    // A token the server does not accept is a refusal, naming the reason.
    std::fs::write(&path, "stale-token").expect("write token");
    match sign(600).await {
        Err(CaError::Refused(msg)) => assert!(msg.contains("bearer token not accepted"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A missing token file says which file.
    std::fs::remove_file(&path).expect("remove");
    match sign(600).await {
        Err(CaError::Io { path: p, .. }) => assert_eq!(p, path.display().to_string()),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[tokio::test]
async fn refusal_surfaces_with_the_servers_message_and_no_certificate_is_served() {
    let f = Fixture::new(&["s3cret"]);
    let addr = f.serve_plaintext().await;
    let channel = grpc::connect_lazy(&format!("http://{addr}"), None).expect("channel");
    let client = CaClient::new(channel.clone(), TokenSource::Static("s3cret".into()), true);
    let pod = id(FORBIDDEN_NS, "intruder");

    let (_, csr) = new_csr(&pod).expect("csr");
    match client.sign(&pod, csr, Duration::from_secs(600)).await {
        Err(e @ CaError::Refused(_)) => {
            let text = e.to_string();
            assert!(text.contains("PermissionDenied"), "{text}");
            assert!(
                text.contains(&format!("node may not impersonate {pod}")),
                "the server's message is kept: {text}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let certs = manager(
        CaClient::new(channel, TokenSource::Static("s3cret".into()), true),
        vec![],
    );
    match certs.fetch(&pod).await {
        Err(FetchError::Unavailable { identity, reason }) => {
            assert_eq!(identity, pod.to_string());
            assert!(reason.contains("node may not impersonate"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(certs.get_ready(&pod).is_none(), "no certificate is served");
    let snapshot = certs.snapshot();
    assert!(
        matches!(snapshot.as_slice(), [(i, CertState::Failed(r))] if *i == pod && r.contains("PermissionDenied")),
        "{snapshot:?}"
    );
    assert!(f.seen().is_empty(), "nothing was signed");
}

#[tokio::test]
async fn ca_over_tls_verifies_the_server_identity_without_a_client_certificate() {
    let f = Fixture::new(&["s3cret"]);
    let (addr, client_certs) = f.serve_tls(CONTROLLER).await;
    let tls = mesh_core::tls::control_plane_client_config(&f.roots(), vec![CONTROLLER.parse().expect("identity")])
        .expect("client tls");
    assert!(!tls.client_auth_cert_resolver.has_certs(), "no client certificate");
    let channel = grpc::connect(&format!("https://{addr}"), Some(tls))
        .await
        .expect("TLS connect");
    let certs = manager(
        CaClient::new(channel, TokenSource::Static("s3cret".into()), true),
        f.roots(),
    );
    let pod = id("default", "productpage");
    let cert = certs.fetch(&pod).await.expect("certificate over TLS");
    assert_eq!(cert.identity, pod);
    assert_eq!(f.seen().len(), 1);
    assert_eq!(
        *client_certs.lock().unwrap(),
        vec![false],
        "the client presented no certificate"
    );
}

#[tokio::test]
async fn ca_over_tls_fails_clearly_when_the_server_is_someone_else() {
    let f = Fixture::new(&["s3cret"]);
    let impostor = "spiffe://cluster.local/ns/default/sa/impostor";
    let (addr, _) = f.serve_tls(impostor).await;
    let address = format!("https://{addr}");
    let tls = || {
        mesh_core::tls::control_plane_client_config(&f.roots(), vec![CONTROLLER.parse().expect("identity")])
            .expect("client tls")
    };

    // Connecting eagerly: the error names the address and both identities.
    let err = grpc::connect(&address, Some(tls())).await.expect_err("wrong identity");
    let text = err.to_string();
    assert!(text.contains(&address), "{text}");
    assert!(
        text.contains(&format!(
            "peer identity {impostor} is not one of the expected identities [{CONTROLLER}]"
        )),
        "{text}"
    );

    // Lazily, through the CA client: a transport error with the same explanation, and no
    // certificate (and no token) ever reached the impostor.
    let channel = grpc::connect_lazy(&address, Some(tls())).expect("channel");
    let client = CaClient::new(channel, TokenSource::Static("s3cret".into()), true);
    let pod = id("default", "details");
    let (_, csr) = new_csr(&pod).expect("csr");
    match client.sign(&pod, csr, Duration::from_secs(600)).await {
        Err(CaError::Transport(msg)) => {
            assert!(msg.contains("is not one of the expected identities"), "{msg}");
            assert!(msg.contains(impostor), "{msg}");
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert!(f.seen().is_empty());

    // A server whose certificate comes from another root (of the same name, so the signature
    // check is what fails) is refused as well.
    let other = Fixture::new(&["s3cret"]);
    let (addr, _) = other.serve_tls(CONTROLLER).await;
    let err = grpc::connect(&format!("https://{addr}"), Some(tls()))
        .await
        .expect_err("another root");
    assert!(err.to_string().contains("invalid server certificate"), "{err}");
}
