//! What a hostile peer can make an HBONE server hold, over loopback with real TLS and HTTP/2:
//! idle sockets that never start TLS (memory per connection, cap per source), a peer that
//! finishes TLS but never sends the HTTP/2 preface (closed at the deadline, and held on its
//! identity's allowance rather than its source address's), a peer opening more connections or streams
//! than its identity may hold, a peer holding connections without streams, and a peer
//! resetting every stream before its answer (rapid reset).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use mesh_core::hbone::{serve_connection, Limit, LimitConfig, LimitObserver, ServerLimits, Settings};
use mesh_core::identity::ca::new_csr;
use mesh_core::identity::{DevCa, Identity, WorkloadCertificate};
use mesh_core::tls;
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).unwrap()
}

fn cert(ca: &DevCa, identity: &Identity) -> WorkloadCertificate {
    let now = OffsetDateTime::now_utc();
    let (key, csr) = new_csr(identity).unwrap();
    let leaf = ca
        .issue_at(
            identity,
            &csr,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        )
        .unwrap();
    WorkloadCertificate::from_chain(identity, key.serialize_der(), &[leaf, ca.root_pem().to_owned()], &[]).unwrap()
}

/// A server whose handler waits for `gate` (never opened unless a test opens it) before it
/// connects upstream, and counts how handlers ended.
struct Server {
    addr: SocketAddr,
    ca: DevCa,
    limits: Arc<ServerLimits>,
    hits: Arc<Mutex<Vec<Limit>>>,
    /// Handlers whose work was abandoned because the client reset the stream.
    abandoned: Arc<AtomicUsize>,
    /// Handlers that got past the gate (and would have opened an upstream connection).
    connected: Arc<AtomicUsize>,
    /// Connections whose `serve_connection` has returned.
    finished: Arc<AtomicUsize>,
}

async fn server(config: LimitConfig, handshake_timeout: Duration) -> Server {
    let settings = Settings {
        handshake_timeout,
        ..Default::default()
    };
    server_with(config, settings).await
}

/// As [`server`], with other transport settings (`limits` is replaced).
async fn server_with(config: LimitConfig, mut settings: Settings) -> Server {
    let ca = DevCa::generate("cluster.local").unwrap();
    let tls = tls::server_config(&cert(&ca, &id("server"))).unwrap();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let h = hits.clone();
    let observer: LimitObserver = Arc::new(move |l| h.lock().unwrap().push(l));
    let limits = Arc::new(ServerLimits::new(config, Some(observer)));
    settings.limits = limits.clone();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counter = || Arc::new(AtomicUsize::new(0));
    let (abandoned, connected, finished) = (counter(), counter(), counter());
    let (ab, co, fi) = (abandoned.clone(), connected.clone(), finished.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (tls, settings) = (tls.clone(), settings.clone());
            let (ab, co, fi) = (ab.clone(), co.clone(), fi.clone());
            tokio::spawn(async move {
                let handler = move |mut req: mesh_core::hbone::InboundConnect| {
                    let (ab, co) = (ab.clone(), co.clone());
                    async move {
                        // Work that never finishes: only a reset ends it.
                        match req.unless_reset(std::future::pending::<()>()).await {
                            None => ab.fetch_add(1, Ordering::SeqCst),
                            Some(()) => co.fetch_add(1, Ordering::SeqCst),
                        };
                    }
                };
                let _ = serve_connection(tcp, tls, &settings, CancellationToken::new(), handler).await;
                fi.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Server {
        addr,
        ca,
        limits,
        hits,
        abandoned,
        connected,
        finished,
    }
}

/// Mutual TLS as `who`, then the HTTP/2 handshake; the connection task runs in the background.
async fn h2_client(
    srv: &Server,
    who: &str,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let config = tls::client_config(&cert(&srv.ca, &id(who)), vec![id("server")]).unwrap();
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::placeholder_server_name(), tcp)
        .await
        .unwrap();
    let (sender, conn) = h2::client::handshake(tls).await.unwrap();
    (sender, tokio::spawn(conn))
}

fn connect_request() -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri("127.0.0.1:9")
        .body(())
        .unwrap()
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_unauthenticated_connections_are_cheap_and_capped_per_source() {
    let per_source = 1000u32.min(((open_files_limit().saturating_sub(200)) / 2) as u32);
    let srv = server(
        LimitConfig {
            max_pending_per_source: per_source,
            ..Default::default()
        },
        Duration::from_secs(30),
    )
    .await;
    // Clients are plain std sockets (no heap of their own), so the growth measured is the
    // server's. Warm the allocator and the runtime with a few connections first.
    let connect = || std::net::TcpStream::connect(srv.addr).unwrap();
    let warm: Vec<_> = (0..20).map(|_| connect()).collect();
    until("warm-up connections pending", || srv.limits.usage(&id("x")).0 == 20).await;
    let before = rss_kib();
    let idle: Vec<_> = (20..per_source).map(|_| connect()).collect();
    until("every idle connection pending", || {
        srv.limits.usage(&id("x")).0 == per_source
    })
    .await;
    let per_conn = (rss_kib() - before) as f64 / f64::from(per_source - 20);
    println!("{per_source} idle connections: {per_conn:.1} KiB each");
    assert!(
        per_conn <= 8.0,
        "an unauthenticated connection costs {per_conn:.1} KiB (limit 8)"
    );

    // One more from the same source is refused at once: the server closes it.
    let mut extra = TcpStream::connect(srv.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut byte))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the connection over the limit is closed");
    assert!(srv.hits.lock().unwrap().contains(&Limit::PendingPerSource));
    drop((warm, idle));
    until("slots released", || srv.limits.usage(&id("x")).0 == 0).await;
}

#[tokio::test]
async fn a_peer_that_never_sends_the_preface_is_closed_at_the_deadline() {
    let srv = server(LimitConfig::default(), Duration::from_millis(300)).await;
    // TLS completes, but no HTTP/2 preface follows.
    let config = tls::client_config(&cert(&srv.ca, &id("slow")), vec![id("server")]).unwrap();
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::placeholder_server_name(), tcp)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
    until("the connection to end", || srv.finished.load(Ordering::SeqCst) == 1).await;
    assert_eq!(*srv.hits.lock().unwrap(), vec![Limit::HandshakeTimeout]);
    assert_eq!(srv.limits.usage(&id("slow")).0, 0, "the pending slot is released");
}

#[tokio::test]
async fn streams_per_peer_identity_are_bounded_across_connections() {
    let srv = server(
        LimitConfig {
            max_streams_per_peer: 3,
            ..Default::default()
        },
        Duration::from_secs(10),
    )
    .await;
    let (a, _ca) = h2_client(&srv, "greedy").await;
    let (b, _cb) = h2_client(&srv, "greedy").await;
    let mut held = Vec::new();
    for sender in [&a, &a, &b] {
        let mut s = sender.clone().ready().await.unwrap();
        held.push(s.send_request(connect_request(), false).unwrap());
    }
    until("three streams held", || srv.limits.usage(&id("greedy")).1 == 3).await;
    // A fourth, on either connection, is refused; another identity is not affected.
    let mut s = b.clone().ready().await.unwrap();
    let (refused, _) = s.send_request(connect_request(), false).unwrap();
    let err = refused.await.expect_err("the fourth stream is refused");
    assert_eq!(err.reason(), Some(h2::Reason::REFUSED_STREAM));
    assert!(srv.hits.lock().unwrap().contains(&Limit::StreamsPerPeer));
    let (other, _co) = h2_client(&srv, "other").await;
    let mut s = other.ready().await.unwrap();
    let _other_stream = s.send_request(connect_request(), false).unwrap();
    until("the other identity's stream", || srv.limits.usage(&id("other")).1 == 1).await;
    // Resetting a held stream frees its slot.
    let (_, mut send) = held.pop().unwrap();
    send.send_reset(h2::Reason::CANCEL);
    until("the slot to be released", || srv.limits.usage(&id("greedy")).1 == 2).await;
}

#[tokio::test]
async fn streams_reset_before_their_answer_cancel_the_work_and_a_flood_gets_goaway() {
    let srv = server(
        LimitConfig {
            max_resets: 10,
            ..Default::default()
        },
        Duration::from_secs(10),
    )
    .await;
    let (sender, conn) = h2_client(&srv, "resetter").await;
    let mut sent = 0;
    for _ in 0..40 {
        until("the previous stream's slot", || {
            srv.limits.usage(&id("resetter")).1 == 0
        })
        .await;
        let Ok(mut s) = sender.clone().ready().await else { break };
        let Ok((_, mut send)) = s.send_request(connect_request(), false) else {
            break;
        };
        sent += 1;
        // Wait until the server accepted the stream, then reset: its work has started.
        let before = srv.abandoned.load(Ordering::SeqCst);
        until("the stream to be accepted", || srv.limits.usage(&id("resetter")).1 == 1).await;
        send.send_reset(h2::Reason::CANCEL);
        until("the work to be abandoned", || {
            srv.abandoned.load(Ordering::SeqCst) > before
        })
        .await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection is closed");
    let reason = closed.unwrap().expect_err("closed by GOAWAY").reason();
    assert_eq!(reason, Some(h2::Reason::ENHANCE_YOUR_CALM));
    assert!(
        sent <= 12,
        "the connection should close right after the limit, took {sent} streams"
    );
    assert_eq!(
        srv.connected.load(Ordering::SeqCst),
        0,
        "no reset stream got past its work"
    );
    assert!(srv.hits.lock().unwrap().contains(&Limit::ResetFlood));
}

#[tokio::test]
async fn authenticated_connections_per_peer_identity_are_bounded() {
    let srv = server(
        LimitConfig {
            max_connections_per_peer: 2,
            ..Default::default()
        },
        Duration::from_secs(10),
    )
    .await;
    let (a, conn_a) = h2_client(&srv, "hoarder").await;
    let (_b, _conn_b) = h2_client(&srv, "hoarder").await;
    until("two connections held", || {
        srv.limits.held(&id("hoarder")).connections == 2
    })
    .await;
    // The third authenticates, then the server closes it: the HTTP/2 handshake or the
    // connection fails, and the bound is counted.
    let config = tls::client_config(&cert(&srv.ca, &id("hoarder")), vec![id("server")]).unwrap();
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::placeholder_server_name(), tcp)
        .await
        .unwrap();
    let third = tokio::time::timeout(Duration::from_secs(5), async {
        let (sender, conn) = h2::client::handshake(tls).await?;
        let _conn = tokio::spawn(conn);
        let mut s = sender.ready().await?;
        let (answer, _) = s.send_request(connect_request(), false)?;
        answer.await.map(|_| ())
    })
    .await
    .expect("the third connection ends promptly");
    assert!(third.is_err(), "a third connection of the same identity is refused");
    assert!(srv.hits.lock().unwrap().contains(&Limit::ConnectionsPerPeer));
    // Another identity is not affected; closing one connection frees its slot.
    let (_other, _conn_o) = h2_client(&srv, "other").await;
    until("the other identity's connection", || {
        srv.limits.held(&id("other")).connections == 1
    })
    .await;
    drop(a);
    conn_a.abort();
    until("the slot to be released", || {
        srv.limits.held(&id("hoarder")).connections == 1
    })
    .await;
    let (_again, _conn_again) = h2_client(&srv, "hoarder").await;
    until("a new connection in the freed slot", || {
        srv.limits.held(&id("hoarder")).connections == 2
    })
    .await;
}

#[tokio::test]
async fn a_connection_without_streams_gets_goaway_after_the_idle_timeout() {
    let idle = Duration::from_millis(300);
    let settings = Settings {
        server_idle_timeout: idle,
        ..Default::default()
    };
    let srv = server_with(LimitConfig::default(), settings).await;
    // One connection never opens a stream; the other holds one open.
    let started = std::time::Instant::now();
    let (_idle_sender, idle_conn) = h2_client(&srv, "idler").await;
    let (busy, busy_conn) = h2_client(&srv, "busy").await;
    let mut s = busy.ready().await.unwrap();
    let (_answer, mut held) = s.send_request(connect_request(), false).unwrap();
    until("the busy stream is held", || srv.limits.usage(&id("busy")).1 == 1).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), idle_conn)
        .await
        .expect("the idle connection is closed");
    assert!(closed.unwrap().is_ok(), "closed gracefully (GOAWAY NO_ERROR)");
    assert!(started.elapsed() >= idle, "not before the idle timeout");
    assert!(srv.hits.lock().unwrap().contains(&Limit::IdleConnection));
    // The busy connection outlives several idle timeouts while its stream is open...
    tokio::time::sleep(idle * 3).await;
    assert!(!busy_conn.is_finished(), "a connection with an open stream stays");
    assert_eq!(srv.finished.load(Ordering::SeqCst), 1);
    // ...and is closed one idle timeout after its last stream ended.
    held.send_reset(h2::Reason::CANCEL);
    until("the busy stream's slot to be released", || {
        srv.limits.usage(&id("busy")).1 == 0
    })
    .await;
    let closed = tokio::time::timeout(Duration::from_secs(5), busy_conn)
        .await
        .expect("the busy connection is closed once idle");
    assert!(closed.unwrap().is_ok());
    until("both connections to end", || srv.finished.load(Ordering::SeqCst) == 2).await;
    assert_eq!(srv.limits.held(&id("busy")).connections, 0, "connection slots released");
}

/// Connections past TLS wait for the HTTP/2 preface on their identity's allowance: one
/// identity stalling there (say, through an east-west gateway, one source address for every
/// client) does not use up the source address's allowance for another identity.
#[tokio::test]
async fn a_peer_stalling_after_tls_holds_its_own_allowance_not_its_source_addresses() {
    let srv = server(
        LimitConfig {
            max_pending_per_source: 2,
            max_preface_per_peer: 2,
            ..Default::default()
        },
        Duration::from_secs(30),
    )
    .await;
    let tls_only = || async {
        let config = tls::client_config(&cert(&srv.ca, &id("staller")), vec![id("server")]).unwrap();
        let tcp = TcpStream::connect(srv.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(tls::placeholder_server_name(), tcp)
            .await
            .unwrap()
    };
    let _stalled = [tls_only().await, tls_only().await];
    until("both stalled connections past TLS", || {
        srv.limits.held(&id("staller")).preface == 2 && srv.limits.pending_from(srv.addr.ip()) == 0
    })
    .await;
    // A third from the same identity is closed once TLS proved who it is, and counted.
    let mut third = tls_only().await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .expect("the third stalled connection is closed");
    assert!(srv.hits.lock().unwrap().contains(&Limit::PrefacePerPeer));
    // Another identity from the same address still gets through TLS and the preface.
    let (honest, _conn) = h2_client(&srv, "honest").await;
    let mut s = honest.ready().await.unwrap();
    let _stream = s.send_request(connect_request(), false).unwrap();
    until("the honest identity's stream", || {
        srv.limits.usage(&id("honest")).1 == 1
    })
    .await;
    assert!(!srv.hits.lock().unwrap().contains(&Limit::PendingPerSource));
}

/// A peer that sends the HTTP/2 preface and then never answers the GOAWAY's PING (nor reads
/// at all) cannot keep an idle connection: h2 alone waits for that PING's answer forever
/// before it closes, so the server drops the connection one grace period (the handshake
/// timeout) after its idle GOAWAY.
#[tokio::test]
async fn a_peer_ignoring_the_idle_goaway_is_dropped_after_a_grace_period() {
    use tokio::io::AsyncWriteExt;
    let settings = Settings {
        server_idle_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let srv = server_with(LimitConfig::default(), settings).await;
    let config = tls::client_config(&cert(&srv.ca, &id("mute")), vec![id("server")]).unwrap();
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::placeholder_server_name(), tcp)
        .await
        .unwrap();
    // The client preface and an empty SETTINGS frame; then nothing is read or answered.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    until("the connection to be counted", || {
        srv.limits.held(&id("mute")).connections == 1
    })
    .await;
    until("the mute connection to be dropped", || {
        srv.finished.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(srv.hits.lock().unwrap().contains(&Limit::IdleConnection));
    assert_eq!(srv.limits.held(&id("mute")).connections, 0, "its slot is released");
    drop(tls);
}

/// Connections past TLS but not yet past the HTTP/2 preface (each holding its read buffer)
/// stay in the server's total of pending connections, whatever identities they prove: the
/// per-identity allowance alone would let many identities hold them without bound (they left
/// the total as well as their source address's count).
#[tokio::test]
async fn connections_stalling_before_the_preface_stay_in_the_total() {
    let srv = server(
        LimitConfig {
            max_pending: 2,
            ..Default::default()
        },
        Duration::from_secs(30),
    )
    .await;
    let tls_only = |who: &'static str| {
        let config = tls::client_config(&cert(&srv.ca, &id(who)), vec![id("server")]).unwrap();
        async move {
            let tcp = TcpStream::connect(srv.addr).await?;
            tokio_rustls::TlsConnector::from(config)
                .connect(tls::placeholder_server_name(), tcp)
                .await
        }
    };
    let _stalled = [tls_only("a").await.unwrap(), tls_only("b").await.unwrap()];
    until("both stalled connections past TLS", || {
        srv.limits.held(&id("a")).preface == 1 && srv.limits.held(&id("b")).preface == 1
    })
    .await;
    assert_eq!(
        srv.limits.pending_from(srv.addr.ip()),
        0,
        "the source's share is given back"
    );
    assert_eq!(srv.limits.usage(&id("a")).0, 2, "both still in the total");
    // A third identity finds the total used up: refused before TLS, and counted.
    let third = tokio::time::timeout(Duration::from_secs(5), async {
        let mut tls = tls_only("c").await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map(|_| ())
    })
    .await
    .expect("the third connection ends promptly");
    assert!(third.is_err(), "the third connection is refused");
    assert!(srv.hits.lock().unwrap().contains(&Limit::PendingConnections));
}

/// Streams the server answers before any handler sees them (not CONNECT, a bad authority)
/// are no activity: a peer sending them without pause still gets its idle GOAWAY.
#[tokio::test]
async fn malformed_streams_do_not_keep_a_connection_from_its_idle_goaway() {
    let idle = Duration::from_millis(300);
    let settings = Settings {
        server_idle_timeout: idle,
        ..Default::default()
    };
    let srv = server_with(LimitConfig::default(), settings).await;
    let (sender, conn) = h2_client(&srv, "chatty").await;
    let started = std::time::Instant::now();
    let chatter = tokio::spawn(async move {
        for (i, uri) in ["127.0.0.1:9", "not-an-authority"].iter().cycle().enumerate() {
            let method = if i % 2 == 0 { Method::GET } else { Method::CONNECT };
            let req = Request::builder().method(method).uri(*uri).body(()).unwrap();
            let Ok(mut s) = sender.clone().ready().await else {
                return;
            };
            let Ok((answer, _)) = s.send_request(req, true) else {
                return;
            };
            if let Ok(resp) = answer.await {
                assert!(resp.status().is_client_error(), "{}", resp.status());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection is closed although the peer kept sending requests");
    assert!(closed.unwrap().is_ok(), "closed gracefully (GOAWAY NO_ERROR)");
    assert!(started.elapsed() >= idle);
    assert!(srv.hits.lock().unwrap().contains(&Limit::IdleConnection));
    chatter.abort();
}
