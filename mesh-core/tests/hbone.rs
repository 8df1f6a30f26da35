//! HBONE over loopback with real TLS and HTTP/2: round trips, pooling, eviction of broken
//! connections, negative TLS cases and malformed CONNECT requests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Method, Request, StatusCode};
use mesh_core::hbone::{serve_connection, HboneError, HbonePool, PoolKey, Settings, TunnelRequest};
use mesh_core::identity::ca::new_csr;
use mesh_core::identity::{CertManager, CertManagerConfig, DevCa, Identity, WorkloadCertificate};
use mesh_core::socket::PlainSockets;
use mesh_core::tls;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

fn cert_from(ca: &DevCa, identity: &Identity, nb: OffsetDateTime, na: OffsetDateTime) -> WorkloadCertificate {
    let (key, csr) = new_csr(identity).unwrap();
    let leaf = ca.issue_at(identity, &csr, nb, na).unwrap();
    WorkloadCertificate::from_chain(identity, key.serialize_der(), &[leaf, ca.root_pem().to_owned()], &[]).unwrap()
}

fn valid_cert(ca: &DevCa, identity: &Identity) -> WorkloadCertificate {
    let now = OffsetDateTime::now_utc();
    cert_from(
        ca,
        identity,
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    )
}

/// An echo server: writes back everything, then closes its side after the client's EOF.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Cancelling drops the server connections accepted so far (a peer that went away).
    kill: Arc<std::sync::Mutex<CancellationToken>>,
}

impl Server {
    fn kill_connections(&self) {
        let mut k = self.kill.lock().unwrap();
        k.cancel();
        *k = CancellationToken::new();
    }
}

/// An HBONE server presenting `cert`, forwarding each CONNECT to its authority.
async fn hbone_server(cert: WorkloadCertificate) -> Server {
    let config = tls::server_config(&cert).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let kill = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
    let (acc, k) = (accepted.clone(), kill.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            let config = config.clone();
            let k = k.lock().unwrap().clone();
            tokio::spawn(async move {
                let settings = Settings::default();
                let serve = serve_connection(tcp, config, &settings, CancellationToken::new(), |req| async move {
                    match TcpStream::connect(req.dst).await {
                        Ok(mut up) => {
                            if let Ok(s) = req.accept() {
                                let _ = s.splice_tcp(&mut up).await;
                            }
                        }
                        Err(_) => req.reject(StatusCode::SERVICE_UNAVAILABLE),
                    }
                });
                tokio::select! { _ = serve => {}, _ = k.cancelled() => {} }
            });
        }
    });
    Server { addr, accepted, kill }
}

fn pool(ca: DevCa) -> Arc<HbonePool> {
    let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
    HbonePool::new(Settings::default(), certs, Arc::new(PlainSockets::default()))
}

fn request(server: SocketAddr, expect: Identity, target: SocketAddr) -> TunnelRequest {
    TunnelRequest {
        key: PoolKey {
            src_identity: id("default", "client"),
            dst_identities: vec![expect],
            src_ip: None,
            dst: server,
        },
        authority: target.to_string(),
        forwarded_for: None,
        baggage: None,
        traceparent: None,
    }
}

/// Sends `data` through a tunnel via a local socket pair and returns what came back.
async fn round_trip(pool: &Arc<HbonePool>, req: &TunnelRequest, data: Vec<u8>) -> Result<Vec<u8>, HboneError> {
    let stream = pool.connect(req).await?;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (mut side, _) = l.accept().await.unwrap();
    let splice = tokio::spawn(async move { stream.splice_tcp(&mut side).await });
    let writer = async {
        let (mut r, mut w) = app.split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = r.read_to_end(&mut back);
        let (_, n) = tokio::join!(send, recv);
        n.unwrap();
        back
    };
    let back = writer.await;
    splice.await.unwrap().unwrap();
    Ok(back)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

#[tokio::test]
async fn round_trip_small_and_large_transfer() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let server_id = id("default", "server");
    let srv = hbone_server(valid_cert(&ca, &server_id)).await;
    let echo = echo_server().await;
    let pool = pool(ca);
    let req = request(srv.addr, server_id, echo);

    assert_eq!(
        round_trip(&pool, &req, b"hello hbone".to_vec()).await.unwrap(),
        b"hello hbone"
    );
    let big = pattern(32 * 1024 * 1024);
    let back = round_trip(&pool, &req, big.clone()).await.unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "32 MiB transfer corrupted");
}

#[tokio::test]
async fn streams_share_one_connection_and_broken_connection_is_replaced() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let server_id = id("default", "server");
    let srv = hbone_server(valid_cert(&ca, &server_id)).await;
    let echo = echo_server().await;
    let pool = pool(ca);
    let req = request(srv.addr, server_id.clone(), echo);

    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(pool.connect(&req).await.unwrap());
    }
    assert_eq!(
        srv.accepted.load(Ordering::SeqCst),
        1,
        "5 streams should share one TLS connection"
    );
    assert_eq!(pool.stats().connections, 1);
    assert_eq!(pool.stats().streams, 5);
    drop(streams);

    // The server side goes away: the next tunnel must succeed on a fresh connection.
    srv.kill_connections();
    let back = round_trip(&pool, &req, b"after failure".to_vec()).await.unwrap();
    assert_eq!(back, b"after failure");
    assert_eq!(
        srv.accepted.load(Ordering::SeqCst),
        2,
        "a new TLS connection replaces the broken one"
    );
}

#[tokio::test]
async fn stream_limit_opens_another_connection() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let server_id = id("default", "server");
    let srv = hbone_server(valid_cert(&ca, &server_id)).await;
    let echo = echo_server().await;
    let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
    let settings = Settings {
        client_max_streams: 2,
        ..Default::default()
    };
    let pool = HbonePool::new(settings, certs, Arc::new(PlainSockets::default()));
    let req = request(srv.addr, server_id, echo);
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(pool.connect(&req).await.unwrap());
    }
    assert_eq!(pool.stats().connections, 3);
    assert_eq!(srv.accepted.load(Ordering::SeqCst), 3);
}

fn expect_tls_error(e: HboneError, needle: &str) {
    let msg = e.to_string();
    assert!(matches!(e, HboneError::Tls(_)), "expected a TLS error, got {msg}");
    assert!(
        msg.to_lowercase().contains(needle),
        "error {msg:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn server_with_wrong_identity_is_refused() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let srv = hbone_server(valid_cert(&ca, &id("default", "impostor"))).await;
    let echo = echo_server().await;
    let pool = pool(ca);
    let e = pool
        .connect(&request(srv.addr, id("default", "server"), echo))
        .await
        .err()
        .unwrap();
    expect_tls_error(e, "not one of the expected identities");
}

#[tokio::test]
async fn server_from_another_root_is_refused() {
    let ours = DevCa::generate("cluster.local").unwrap();
    let theirs = DevCa::generate("cluster.local").unwrap();
    let server_id = id("default", "server");
    let srv = hbone_server(valid_cert(&theirs, &server_id)).await;
    let echo = echo_server().await;
    let e = pool(ours)
        .connect(&request(srv.addr, server_id, echo))
        .await
        .err()
        .unwrap();
    // Same issuer name, other key: webpki reports a bad signature (or an unknown issuer).
    let msg = e.to_string().to_lowercase();
    assert!(msg.contains("badsignature") || msg.contains("unknownissuer"), "{msg}");
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let server_id = id("default", "server");
    let now = OffsetDateTime::now_utc();
    let expired = cert_from(
        &ca,
        &server_id,
        now - time::Duration::hours(2),
        now - time::Duration::hours(1),
    );
    let srv = hbone_server(expired).await;
    let echo = echo_server().await;
    let e = pool(ca)
        .connect(&request(srv.addr, server_id, echo))
        .await
        .err()
        .unwrap();
    expect_tls_error(e, "expired");
}

/// A client presenting `cert` to a server of `server_ca`: the server must refuse the handshake.
async fn client_refused(server_ca: &DevCa, client: WorkloadCertificate) {
    let server_id = id("default", "server");
    let srv = hbone_server(valid_cert(server_ca, &server_id)).await;
    // Trust the server's root so only the client side can fail.
    let mut client = client;
    client.roots = mesh_core::identity::cert::certs_from_pem(server_ca.root_pem()).unwrap();
    let config = tls::client_config(&client, vec![server_id]).unwrap();
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    // TLS 1.3 clients learn of a rejected certificate on their first read.
    let outcome = async {
        let tls = connector.connect(tls::placeholder_server_name(), tcp).await?;
        let (mut sender, conn) = h2::client::handshake(tls).await.map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("127.0.0.1:1")
            .body(())
            .unwrap();
        let (resp, _) = sender.send_request(req, false).map_err(std::io::Error::other)?;
        resp.await.map_err(std::io::Error::other)
    }
    .await;
    assert!(outcome.is_err(), "server accepted a client certificate it must refuse");
}

#[tokio::test]
async fn client_certificate_from_another_root_is_refused() {
    let server_ca = DevCa::generate("cluster.local").unwrap();
    let other = DevCa::generate("cluster.local").unwrap();
    client_refused(&server_ca, valid_cert(&other, &id("default", "client"))).await;
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let now = OffsetDateTime::now_utc();
    let expired = cert_from(
        &ca,
        &id("default", "client"),
        now - time::Duration::hours(2),
        now - time::Duration::hours(1),
    );
    client_refused(&ca, expired).await;
}

/// Sends a raw request over mutual TLS and returns the status.
async fn raw_status(srv: SocketAddr, ca: &DevCa, server_id: Identity, req: Request<()>) -> StatusCode {
    let client = valid_cert(ca, &id("default", "client"));
    let config = tls::client_config(&client, vec![server_id]).unwrap();
    let tcp = TcpStream::connect(srv).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::placeholder_server_name(), tcp)
        .await
        .unwrap();
    let (sender, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut sender = sender.ready().await.unwrap();
    let (resp, _) = sender.send_request(req, true).unwrap();
    resp.await.unwrap().status()
}

#[tokio::test]
async fn malformed_requests_get_precise_statuses() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let server_id = id("default", "server");
    let srv = hbone_server(valid_cert(&ca, &server_id)).await;

    let get = Request::builder()
        .method(Method::GET)
        .uri("https://127.0.0.1:80/")
        .body(())
        .unwrap();
    assert_eq!(
        raw_status(srv.addr, &ca, server_id.clone(), get).await,
        StatusCode::METHOD_NOT_ALLOWED
    );

    let bad_authority = Request::builder()
        .method(Method::CONNECT)
        .uri("not-an-ip:80")
        .body(())
        .unwrap();
    assert_eq!(
        raw_status(srv.addr, &ca, server_id.clone(), bad_authority).await,
        StatusCode::BAD_REQUEST
    );

    // Nothing listens on port 1: the upstream is unreachable.
    let unreachable = Request::builder()
        .method(Method::CONNECT)
        .uri("127.0.0.1:1")
        .body(())
        .unwrap();
    assert_eq!(
        raw_status(srv.addr, &ca, server_id.clone(), unreachable).await,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The server keeps working after all of that.
    let echo = echo_server().await;
    let back = round_trip(&pool(ca), &request(srv.addr, server_id, echo), b"still alive".to_vec())
        .await
        .unwrap();
    assert_eq!(back, b"still alive");
}
