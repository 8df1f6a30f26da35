//! Dedicated-mode ztunnel inside the test process, on loopback: no root, no namespaces.
//!
//! The inbound HBONE listener of the library's [`Proxy`] serves a workload on 127.0.0.2 with a
//! development CA; its state comes from a local workload file (rewritten and reloaded to change
//! policy); mesh-core's [`HbonePool`] is the client, from 127.0.0.1 with the `client` identity.
//! These pin what the namespace suites test as root, but in milliseconds: a CONNECT naming
//! another workload gets 400, a denied client 401, and a policy update closes a live stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::capture;
use mesh_core::hbone::{HboneError, HbonePool, PoolKey, Settings, TunnelRequest};
use mesh_core::identity::{CertManager, CertManagerConfig, DevCa, Identity};
use mesh_core::socket::PlainSockets;
use mesh_core::state::StateStore;
use mesh_core::xds::workload_file::Reload;
use mesh_core::xds::LocalSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ztunnel::metrics::{Metrics, ReasonLabels};
use ztunnel::proxy::local_addrs::LocalAddrs;
use ztunnel::proxy::{inbound, ConnBound, ListenerLimits, Ports, Proxy, Shared};

const SERVER_IP: &str = "127.0.0.2";
const CLIENT_IP: &str = "127.0.0.1";

const WORKLOADS: &str = "
workloads:
- uid: test//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  addresses: [127.0.0.1]
  protocol: HBONE
  node: local
- uid: test//Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  addresses: [127.0.0.2]
  protocol: HBONE
  node: local
- uid: test//Pod/default/other
  name: other
  namespace: default
  serviceAccount: other
  addresses: [127.0.0.3]
  protocol: HBONE
  node: local
";

/// Denies the `client` identity everything on the server's namespace.
const DENY_CLIENT: &str = "
policies:
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  groups:
  - rules:
    - matches:
      - principals: [{exact: cluster.local/ns/default/sa/client}]
";

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).expect("valid identity")
}

/// One ztunnel serving 127.0.0.2, an echo application behind it, and a client pool.
struct Node {
    file: PathBuf,
    source: LocalSource,
    metrics: Metrics,
    hbone: SocketAddr,
    app: SocketAddr,
    pool: Arc<HbonePool>,
    drain: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.drain.cancel();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// The capture listeners' bounds (unused here).
const BOUND: ConnBound = ConnBound {
    per_source: 1024,
    total: 1024,
};

impl Node {
    async fn start(name: &str) -> Node {
        let file = std::env::temp_dir().join(format!("ztunnel-in-process-{}-{name}.yaml", std::process::id()));
        std::fs::write(&file, WORKLOADS).expect("write the workload file");
        let state = StateStore::new();
        let mut source = LocalSource::new(file.clone(), state.clone());
        assert!(matches!(source.reload(), Ok(Reload::Applied { ref skipped, .. }) if skipped.is_empty()));

        let ca = DevCa::generate("cluster.local").expect("development CA");
        let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
        let sockets = Arc::new(PlainSockets::default());
        let server_ip: IpAddr = SERVER_IP.parse().expect("ip");
        let listener = TcpListener::bind((server_ip, 0)).await.expect("bind HBONE on loopback");
        let hbone = listener.local_addr().expect("local addr");
        let app = echo_app(server_ip).await;
        let metrics = Metrics::default();
        let shared = Shared {
            network: String::new(),
            // Only the HBONE listener is served; the loop guard knows its port.
            ports: Ports {
                capture: capture::Ports {
                    outbound: 0,
                    inbound_plaintext: 0,
                    inbound: hbone.port(),
                    dns: None,
                },
                ipv6: false,
                others: [0; 3],
            },
            hbone_port: hbone.port(),
            state: state.clone(),
            certs: certs.clone(),
            settings: Settings::default(),
            metrics: metrics.clone(),
            tracker: Default::default(),
            node: LocalAddrs::fixed(HashSet::from([CLIENT_IP.parse().expect("ip")])),
            drain: CancellationToken::new(),
            tasks: TaskTracker::new(),
            dns: None,
            original_source: true,
            // Only HBONE is served: the capture listeners' bounds are never consulted.
            limits: ListenerLimits::new(BOUND, BOUND, &metrics),
        };
        tokio::spawn(shared.tracker.clone().enforce(state));
        let px = Proxy::new(
            &shared,
            sockets.clone(),
            LocalAddrs::fixed(HashSet::from([server_ip])).into(),
        );
        tokio::spawn(inbound::serve(px, listener));
        Node {
            file,
            source,
            metrics,
            hbone,
            app,
            pool: HbonePool::new(Settings::default(), certs, sockets),
            drain: shared.drain,
        }
    }

    /// Replaces the workload file's policies and applies it (the watcher's work, done now).
    fn set_policies(&mut self, policies: &str) {
        std::fs::write(&self.file, format!("{WORKLOADS}{policies}")).expect("rewrite the workload file");
        assert!(matches!(self.source.reload(), Ok(Reload::Applied { ref skipped, .. }) if skipped.is_empty()));
    }

    fn request(&self, authority: SocketAddr) -> TunnelRequest {
        TunnelRequest {
            key: PoolKey {
                src_identity: id("client"),
                dst_identities: vec![id("server")],
                src_ip: Some(CLIENT_IP.parse().expect("ip")),
                dst: self.hbone,
            },
            authority: authority.to_string(),
            forwarded_for: None,
            baggage: None,
            traceparent: None,
        }
    }

    fn refused(&self, reason: &'static str) -> u64 {
        self.metrics.refused.get_or_create(&ReasonLabels { reason }).get()
    }
}

/// An application that echoes every connection.
async fn echo_app(ip: IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.expect("bind the echo app");
    let addr = l.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn status(r: Result<mesh_core::hbone::H2Stream, HboneError>) -> Option<http::StatusCode> {
    match r {
        Err(HboneError::Status(s)) => Some(s),
        Err(e) => panic!("expected a status, got {e}"),
        Ok(_) => None,
    }
}

#[tokio::test]
async fn tunnel_reaches_the_application_and_echoes() {
    let node = Node::start("echo").await;
    let stream = node
        .pool
        .connect(&node.request(node.app))
        .await
        .expect("CONNECT accepted");
    let mut io = stream.into_io();
    io.write_all(b"hello in-process").await.expect("write");
    let mut back = [0u8; 16];
    io.read_exact(&mut back).await.expect("echo");
    assert_eq!(&back, b"hello in-process");
}

#[tokio::test]
async fn authority_of_another_workload_gets_400() {
    let node = Node::start("authority").await;
    // 127.0.0.3 is a workload, but not the one this HBONE listener serves.
    let other = SocketAddr::new("127.0.0.3".parse().expect("ip"), node.app.port());
    let got = status(node.pool.connect(&node.request(other)).await);
    assert_eq!(got, Some(http::StatusCode::BAD_REQUEST));
    assert_eq!(node.refused("bad_authority"), 1);
    // The loop guard: the workload's own address, but ztunnel's own port.
    let got = status(node.pool.connect(&node.request(node.hbone)).await);
    assert_eq!(got, Some(http::StatusCode::BAD_REQUEST));
    assert_eq!(node.refused("loop"), 1);
}

#[tokio::test]
async fn denied_client_gets_401() {
    let mut node = Node::start("deny").await;
    node.set_policies(DENY_CLIENT);
    let got = status(node.pool.connect(&node.request(node.app)).await);
    assert_eq!(got, Some(http::StatusCode::UNAUTHORIZED));
    assert_eq!(node.refused("policy_denied"), 1);
}

#[tokio::test]
async fn policy_update_closes_a_live_stream() {
    let mut node = Node::start("update").await;
    let stream = node
        .pool
        .connect(&node.request(node.app))
        .await
        .expect("CONNECT accepted");
    let mut io = stream.into_io();
    io.write_all(b"before").await.expect("write");
    let mut back = [0u8; 6];
    io.read_exact(&mut back).await.expect("echo before the update");
    assert_eq!(&back, b"before");

    node.set_policies(DENY_CLIENT);
    // The tracker re-evaluates on the state change and cuts the stream: the client's read
    // ends (EOF or reset) instead of waiting for data that will never come.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the stream was not closed after the policy update");
    assert!(rest.is_empty(), "no data after the cut: {rest:?}");
    // New streams are refused as well.
    let got = status(node.pool.connect(&node.request(node.app)).await);
    assert_eq!(got, Some(http::StatusCode::UNAUTHORIZED));
}
