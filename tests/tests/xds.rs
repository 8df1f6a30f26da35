//! ztunnel end to end with its workload state from a Delta ADS server instead of a file: two
//! captured pod namespaces with their own ztunnel, and a test-only ADS server in the plain pod
//! `c` (uncaptured) that the ztunnels reach over the bridge. The server pushes the workloads,
//! the service and later a policy; readiness waits for xDS, traffic flows by pod IP and VIP,
//! a DENY pushed over xDS cuts a live connection, and a corrupt resource is NACKed while the
//! valid change of the same response applies.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::Stream;
use mesh_e2e::apps::{echo_connect, echo_server, ping};
use mesh_e2e::ztunnel::http_request;
use mesh_e2e::{Bed, Netns, Ztunnel};
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use mesh_proto::{security as secpb, workload as pb, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};

/// Subnet of this test bed (10.77.40.0/24); the ADS server listens on pod `c`.
const N: u8 = 40;
const DEADLINE: Duration = Duration::from_secs(15);
const CLIENT_UID: &str = "cluster1//Pod/default/client";
const SERVER_UID: &str = "cluster1//Pod/default/server";
const SERVICE: &str = "default/server.default.svc.cluster.local";

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

/// A request as the server received it, with the node id of its stream.
struct Received {
    node: String,
    request: DeltaDiscoveryRequest,
}

/// What the ADS server holds, shared by its streams and the test.
struct AdsState {
    /// Current resources per type URL, by name: what a new stream receives first.
    resources: Mutex<BTreeMap<&'static str, BTreeMap<String, Resource>>>,
    /// Pushes to every open stream (sent while `resources` is locked, so a stream that
    /// subscribes under the same lock misses nothing and sees nothing twice).
    pushes: broadcast::Sender<DeltaDiscoveryResponse>,
    /// Every request of every stream, in arrival order.
    requests: mpsc::UnboundedSender<Received>,
    /// New streams get nothing until this is true: lets the test observe a ztunnel that is
    /// connected but not yet ready.
    open: watch::Sender<bool>,
    nonce: AtomicU64,
}

impl AdsState {
    fn nonce(&self) -> String {
        format!("n{}", self.nonce.fetch_add(1, Ordering::Relaxed))
    }

    /// Applies a change to the held resources and pushes it to every stream; returns the nonce.
    fn push(&self, type_url: &'static str, resources: Vec<Resource>, removed: &[&str]) -> String {
        let nonce = self.nonce();
        let mut held = self.resources.lock().unwrap();
        let of_type = held.entry(type_url).or_default();
        for name in removed {
            of_type.remove(*name);
        }
        for r in &resources {
            of_type.insert(r.name.clone(), r.clone());
        }
        // No stream open is fine: new ones get the held state.
        let _ = self.pushes.send(DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            nonce: nonce.clone(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        nonce
    }

    /// The held state, one response per type (an empty one too: readiness needs both types),
    /// and a subscription to what is pushed after it.
    fn snapshot(&self) -> (Vec<DeltaDiscoveryResponse>, broadcast::Receiver<DeltaDiscoveryResponse>) {
        let held = self.resources.lock().unwrap();
        let rx = self.pushes.subscribe();
        let initial = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]
            .into_iter()
            .map(|type_url| DeltaDiscoveryResponse {
                type_url: type_url.to_owned(),
                nonce: self.nonce(),
                resources: held
                    .get(type_url)
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        (initial, rx)
    }
}

#[derive(Clone)]
struct Ads(Arc<AdsState>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<ResponseStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let requests = self.0.requests.clone();
        tokio::spawn(async move {
            let mut node = String::new();
            while let Ok(Some(request)) = inbound.message().await {
                if let Some(n) = &request.node {
                    node.clone_from(&n.id);
                }
                let node = node.clone();
                if requests.send(Received { node, request }).is_err() {
                    break;
                }
            }
        });
        // The held state once the server is open, then every push.
        let (tx, rx) = mpsc::channel(16);
        let state = self.0.clone();
        tokio::spawn(async move {
            let mut open = state.open.subscribe();
            if open.wait_for(|o| *o).await.is_err() {
                return;
            }
            let (initial, mut pushes) = state.snapshot();
            for r in initial {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            loop {
                match pushes.recv().await {
                    Ok(r) => {
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => panic!("test ADS stream lagged by {n} pushes"),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let out = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

/// The test's side of the server: pushes, and the requests the streams sent.
struct AdsHandle {
    state: Arc<AdsState>,
    requests: mpsc::UnboundedReceiver<Received>,
    /// Requests read while looking for something else, kept for later lookups.
    backlog: VecDeque<Received>,
}

impl AdsHandle {
    /// Serves ADS (plaintext gRPC) on `addr` inside `ns`, holding back responses until
    /// [`AdsHandle::open`].
    fn serve(ns: &Netns, addr: SocketAddr) -> AdsHandle {
        Self::serve_on(ns, addr, None)
    }

    /// Like [`AdsHandle::serve`], over TLS with `acceptor`.
    fn serve_on(ns: &Netns, addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> AdsHandle {
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let state = Arc::new(AdsState {
            resources: Mutex::default(),
            pushes: broadcast::channel(64).0,
            requests: requests_tx,
            open: watch::Sender::new(false),
            nonce: AtomicU64::new(1),
        });
        let listener = ns.listen(addr).expect("ADS listener in the server namespace");
        let server =
            tonic::transport::Server::builder().add_service(AggregatedDiscoveryServiceServer::new(Ads(state.clone())));
        match tls {
            None => {
                tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
            }
            Some(acceptor) => {
                tokio::spawn(server.serve_with_incoming(tls_incoming(listener, acceptor)));
            }
        }
        AdsHandle {
            state,
            requests,
            backlog: VecDeque::new(),
        }
    }

    fn open(&self) {
        self.state.open.send_replace(true);
    }

    fn push(&self, type_url: &'static str, resources: Vec<Resource>, removed: &[&str]) -> String {
        self.state.push(type_url, resources, removed)
    }

    /// Waits for the first request matching `want`, keeping the others for later calls.
    async fn request(&mut self, what: &str, want: impl Fn(&Received) -> bool) -> Received {
        if let Some(i) = self.backlog.iter().position(&want) {
            return self.backlog.remove(i).expect("present");
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let r = tokio::time::timeout_at(deadline, self.requests.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("ADS server gone");
            if want(&r) {
                return r;
            }
            self.backlog.push_back(r);
        }
    }

    /// The replies (ACK or NACK) of every node in `nodes` to the response `nonce`.
    async fn replies(&mut self, nonce: &str, nodes: &[&str]) -> Vec<Received> {
        let mut out = Vec::new();
        for node in nodes {
            let what = format!("the reply of {node} to {nonce}");
            out.push(
                self.request(&what, |r| r.node == *node && r.request.response_nonce == nonce)
                    .await,
            );
        }
        out
    }
}

/// TLS connections for tonic's server, which cannot take rustls streams without its own TLS
/// feature: each handshaken connection is bridged through an in-memory duplex pipe. Failed
/// handshakes are skipped.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl Stream<Item = std::io::Result<tokio::io::DuplexStream>> {
    futures_util::stream::unfold((listener, acceptor), |(listener, acceptor)| async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return None;
            };
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (near, mut far) = tokio::io::duplex(64 << 10);
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut far).await;
            });
            return Some((Ok(near), (listener, acceptor)));
        }
    })
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn resource(type_url: &str, name: &str, version: &str, value: Vec<u8>) -> Resource {
    Resource {
        name: name.to_owned(),
        version: version.to_owned(),
        resource: Some(prost_types::Any {
            type_url: type_url.to_owned(),
            value,
        }),
        ..Default::default()
    }
}

fn port(service_port: u32, target_port: u32) -> pb::Port {
    pb::Port {
        service_port,
        target_port,
        app_protocol: 0,
    }
}

/// Workload `name` (host 1 = client, 2 = server) as `Bed::write_state` has it.
fn workload(bed: &Bed, uid: &str, name: &str, host: u8, node: &str, services: &[&str]) -> Resource {
    let w = pb::Workload {
        uid: uid.to_owned(),
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service_account: name.to_owned(),
        addresses: vec![ip_bytes(bed.ip(host)), ip_bytes(bed.ip6(host))],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        node: node.to_owned(),
        canonical_name: name.to_owned(),
        canonical_revision: "v1".to_owned(),
        services: services
            .iter()
            .map(|s| {
                let ports = pb::PortList {
                    ports: vec![port(80, 8080)],
                };
                (s.to_string(), ports)
            })
            .collect(),
        ..Default::default()
    };
    let a = pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    };
    resource(ADDRESS_TYPE_URL, uid, "1", a.encode_to_vec())
}

/// Service `server` on `vips`, port 80 -> 8080.
fn service(vips: &[IpAddr], version: &str) -> Resource {
    let s = pb::Service {
        name: "server".to_owned(),
        namespace: "default".to_owned(),
        hostname: "server.default.svc.cluster.local".to_owned(),
        addresses: vips
            .iter()
            .map(|ip| pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(*ip),
            })
            .collect(),
        ports: vec![port(80, 8080)],
        ..Default::default()
    };
    let a = pb::Address {
        r#type: Some(pb::address::Type::Service(s)),
    };
    resource(ADDRESS_TYPE_URL, SERVICE, version, a.encode_to_vec())
}

/// DENY for the client's principal on port 9000 only.
fn deny_client_on_9000() -> Resource {
    let exact = |s: &str| secpb::StringMatch {
        match_type: Some(secpb::string_match::MatchType::Exact(s.to_owned())),
    };
    let policy = secpb::Authorization {
        name: "deny-client".to_owned(),
        namespace: "default".to_owned(),
        scope: secpb::Scope::Namespace as i32,
        action: secpb::Action::Deny as i32,
        groups: vec![secpb::Group {
            rules: vec![secpb::Rules {
                matches: vec![secpb::Match {
                    principals: vec![exact("cluster.local/ns/default/sa/client")],
                    destination_ports: vec![9000],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    resource(
        AUTHORIZATION_TYPE_URL,
        "default/deny-client",
        "1",
        policy.encode_to_vec(),
    )
}

/// The status of ztunnel's readiness endpoint in `ns`, once it answers at all (it is bound
/// a moment after the process starts).
async fn readiness(ns: &Netns) -> u16 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match http_request(ns, "127.0.0.1:15021".parse().unwrap(), "GET", "/healthz/ready").await {
            Ok((status, _)) if status != 0 => return status,
            _ => assert!(
                Instant::now() < deadline,
                "readiness endpoint in {} never answered",
                ns.name
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects a -> `dst` until the echo server answers (state may take a moment to apply on
/// both sides); returns the peer line.
async fn eventually_reaches(bed: &Bed, dst: SocketAddr) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match echo_connect(&bed.a, dst).await {
            Ok((peer, mut conn)) => {
                assert_eq!(ping(&mut conn, "hello").await.expect("echo"), "hello");
                return peer;
            }
            Err(e) => assert!(Instant::now() < deadline, "{dst} not reachable from a: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_state_from_delta_ads() {
    let Some(bed) = Bed::new(N) else { return };
    let ads_addr = SocketAddr::new(bed.ip(3), 15012);
    let mut ads = AdsHandle::serve(&bed.c, ads_addr);
    let xds = format!("http://{ads_addr}");
    let args = ["--xds-address", xds.as_str()];
    let (node_a, node_b) = (format!("ztunnel~{}", bed.a.name), format!("ztunnel~{}", bed.b.name));
    let nodes = [node_a.as_str(), node_b.as_str()];

    ads.push(
        ADDRESS_TYPE_URL,
        vec![
            workload(&bed, CLIENT_UID, "client", 1, "node-a", &[]),
            workload(&bed, SERVER_UID, "server", 2, "node-b", &[SERVICE]),
            service(&[bed.vip()], "1"),
        ],
        &[],
    );

    // ztunnel a connects (through its own capture rules: its control plane socket carries
    // the mesh mark) but is not ready while the server holds the state back.
    let files = bed.files();
    let start_a = Ztunnel::start_with(&bed.a, &files, &args);
    let held_back = async {
        let first = ads.request("ztunnel a's first request", |r| r.node == node_a).await;
        assert!(first.request.response_nonce.is_empty(), "a subscription, not a reply");
        assert_eq!(readiness(&bed.a).await, 503, "ready before any xDS response arrived");
        ads.open();
        first.request.type_url
    };
    let (za, first_type) = tokio::join!(start_a, held_back);
    let za = za.expect("ztunnel a ready once the xDS state arrived");
    let zb = Ztunnel::start_with(&bed.b, &files, &args)
        .await
        .expect("ztunnel b ready");
    // Both streams subscribed to both types as wildcards, carrying their node.
    for node in nodes {
        let mut types = HashSet::new();
        if node == node_a {
            types.insert(first_type.clone());
        }
        while types.len() < 2 {
            let r = ads
                .request("the initial subscriptions", |r| {
                    r.node == node && r.request.node.is_some()
                })
                .await;
            assert!(r.request.resource_names_subscribe.is_empty(), "wildcard");
            types.insert(r.request.type_url);
        }
    }
    // ztunnel's own control plane connection bypasses its capture rules (mesh mark): one
    // connection, not a captured one plus ztunnel's passthrough of it.
    let ads_conns = bed
        .a
        .exec(&["ss", "-Htn", "state", "established", "dst", &ads_addr.to_string()])
        .expect("ss");
    assert_eq!(
        ads_conns.lines().count(),
        1,
        "connections to the ADS server from a:\n{ads_conns}"
    );
    let dump = za.config_dump().await.expect("config dump");
    assert_eq!(dump["workloads"].as_array().map(Vec::len), Some(2), "{dump}");
    assert_eq!(dump["services"][0]["hostname"], "server.default.svc.cluster.local");

    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));

    // Traffic by pod IP and by VIP; the server sees the client pod's address.
    let client = format!("peer={}", bed.ip(1));
    assert_eq!(eventually_reaches(&bed, SocketAddr::new(bed.ip(2), 8080)).await, client);
    assert_eq!(eventually_reaches(&bed, SocketAddr::new(bed.vip(), 80)).await, client);

    // A DENY pushed over xDS cuts a live connection and refuses new ones.
    let dst = SocketAddr::new(bed.ip(2), 9000);
    let (peer, mut live) = echo_connect(&bed.a, dst).await.expect("connect before the policy");
    assert_eq!(peer, client);
    assert_eq!(ping(&mut live, "before").await.unwrap(), "before");
    let nonce = ads.push(AUTHORIZATION_TYPE_URL, vec![deny_client_on_9000()], &[]);
    for r in ads.replies(&nonce, &nodes).await {
        assert!(
            r.request.error_detail.is_none(),
            "policy NACKed by {}: {:?}",
            r.node,
            r.request.error_detail
        );
    }
    let deadline = Instant::now() + DEADLINE;
    while ping(&mut live, "still there?").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "live connection survived the DENY pushed over xDS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        echo_connect(&bed.a, dst).await.is_err(),
        "denied connection reached the app"
    );
    // Port 8080 is not covered by the policy.
    assert_eq!(eventually_reaches(&bed, SocketAddr::new(bed.ip(2), 8080)).await, client);

    // A corrupt resource next to a valid change: NACKed, and the valid change applies.
    let new_vip: IpAddr = format!("10.96.{N}.11").parse().unwrap();
    let nonce = ads.push(
        ADDRESS_TYPE_URL,
        vec![
            resource(ADDRESS_TYPE_URL, "corrupt", "2", b"definitely not protobuf".to_vec()),
            service(&[bed.vip(), new_vip], "2"),
        ],
        &[],
    );
    for r in ads.replies(&nonce, &nodes).await {
        let detail = r
            .request
            .error_detail
            .unwrap_or_else(|| panic!("{} ACKed a corrupt resource", r.node));
        assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
        assert!(detail.message.contains("corrupt: cannot decode"), "{}", detail.message);
        assert!(!detail.message.contains(SERVICE), "{}", detail.message);
    }
    assert_eq!(eventually_reaches(&bed, SocketAddr::new(new_vip, 80)).await, client);
    assert_eq!(eventually_reaches(&bed, SocketAddr::new(bed.vip(), 80)).await, client);
    for z in [&za, &zb] {
        let m = z.metrics().await.expect("metrics");
        assert!(
            m.lines().any(|l| l.starts_with("xds_rejected_resources_total")
                && l.contains("istio.workload.Address")
                && l.ends_with(" 1")),
            "rejection not counted in {}:\n{m}",
            z.ns.name
        );
        assert!(m.lines().any(|l| l == "xds_connected 1"), "{m}");
    }
}

/// The control plane over TLS: ztunnel verifies the server against --trust-bundle and
/// --control-plane-identity (and presents no certificate of its own); with the wrong expected
/// identity it does not become ready and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_state_over_tls_checks_the_control_plane_identity() {
    let Some(bed) = Bed::new(N + 1) else { return };
    let controller = "spiffe://cluster.local/ns/istio-system/sa/mesh-controller";
    let ca = mesh_core::identity::DevCa::load(&bed.root_cert, &bed.root_key).expect("bed CA");
    let id: mesh_core::identity::Identity = controller.parse().unwrap();
    let (key, csr) = mesh_core::identity::ca::new_csr(&id).expect("csr");
    let leaf = ca.issue(&id, &csr, Duration::from_secs(3600)).expect("issue");
    let cert = mesh_core::identity::WorkloadCertificate::from_chain(
        &id,
        key.serialize_der(),
        &[leaf, ca.root_pem().to_owned()],
        &[],
    )
    .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(mesh_core::tls::control_plane_server_config(&cert).expect("tls"));
    let ads_addr = SocketAddr::new(bed.ip(3), 15012);
    let ads = AdsHandle::serve_on(&bed.c, ads_addr, Some(acceptor));
    ads.push(
        ADDRESS_TYPE_URL,
        vec![workload(&bed, CLIENT_UID, "client", 1, "node-a", &[])],
        &[],
    );
    ads.open();
    let xds = format!("https://{ads_addr}");
    let bundle = bed.root_cert.to_string_lossy().into_owned();
    let files = bed.files();

    // The expected identity (the default): ready, with the state from the server.
    let za = Ztunnel::start_with(&bed.a, &files, &["--xds-address", &xds, "--trust-bundle", &bundle])
        .await
        .expect("ztunnel ready over TLS");
    let dump = za.config_dump().await.expect("config dump");
    assert_eq!(dump["workloads"][0]["uid"], CLIENT_UID, "{dump}");
    drop(za);

    // Another expected identity: never ready, and the log says which identity was presented.
    let log = std::env::temp_dir().join(format!("{}-ztunnel-wrong-id.log", bed.b.name));
    let out = std::fs::File::create(&log).expect("log file");
    let mut child = bed
        .b
        .command(&mesh_e2e::binary("ztunnel"))
        .args(["--xds-address", &xds, "--trust-bundle", &bundle])
        .args([
            "--control-plane-identity",
            "spiffe://cluster.local/ns/istio-system/sa/someone-else",
        ])
        .arg("--ca-root-cert")
        .arg(&bed.root_cert)
        .arg("--ca-root-key")
        .arg(&bed.root_key)
        .args(["--log-format", "json"])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .spawn()
        .expect("spawn ztunnel");
    let deadline = Instant::now() + DEADLINE;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("is not one of the expected identities") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ready = readiness(&bed.b).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log);
    assert!(
        text.contains(&format!(
            "peer identity {controller} is not one of the expected identities"
        )),
        "no clear TLS error in the log:\n{text}"
    );
    assert_eq!(ready, 503, "ready without xDS");
}
