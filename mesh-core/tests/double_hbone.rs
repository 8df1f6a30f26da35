//! Double HBONE over loopback with real TLS: a client tunnel through a gateway that only
//! relays bytes to the destination's HBONE server. The destination sees the client's
//! identity; the gateway never sees the plaintext; wrong identities on either layer fail.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use mesh_core::hbone::{
    serve_connection, DoubleTunnelRequest, HboneError, HbonePool, PoolKey, Settings, TunnelRequest,
};
use mesh_core::identity::ca::new_csr;
use mesh_core::identity::{CertManager, CertManagerConfig, DevCa, Identity, WorkloadCertificate};
use mesh_core::socket::PlainSockets;
use mesh_core::tls;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const HOST: &str = "echo.default.svc.cluster.local";
const MARKER: &[u8] = b"plaintext-only-the-endpoints-may-read";

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
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

fn settings() -> Settings {
    Settings {
        hostname_authority: true,
        ..Default::default()
    }
}

/// What each server saw: (peer identity, hostname of the authority).
type Seen = Arc<Mutex<Vec<(Identity, Option<String>)>>>;

/// The destination: an HBONE server that sends `HOST:80` to `echo`.
async fn destination(cert: WorkloadCertificate, echo: SocketAddr, seen: Seen) -> SocketAddr {
    let config = tls::server_config(&cert).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (config, seen) = (config.clone(), seen.clone());
            tokio::spawn(async move {
                let _ = serve_connection(tcp, config, &settings(), CancellationToken::new(), move |req| {
                    seen.lock()
                        .unwrap()
                        .push((req.peer_identity.clone(), req.hostname.clone()));
                    async move {
                        if req.hostname.as_deref() != Some(HOST) || req.dst.port() != 80 {
                            return req.reject(StatusCode::BAD_REQUEST);
                        }
                        let mut up = TcpStream::connect(echo).await.unwrap();
                        if let Ok(s) = req.accept() {
                            let _ = s.splice_tcp(&mut up).await;
                        }
                    }
                })
                .await;
            });
        }
    });
    addr
}

/// The gateway: answers every CONNECT by relaying its bytes to `next`, keeping a copy.
async fn gateway(cert: WorkloadCertificate, next: SocketAddr, seen: Seen, relayed: Arc<Mutex<Vec<u8>>>) -> SocketAddr {
    let config = tls::server_config(&cert).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (config, seen, relayed) = (config.clone(), seen.clone(), relayed.clone());
            tokio::spawn(async move {
                let _ = serve_connection(tcp, config, &settings(), CancellationToken::new(), move |req| {
                    seen.lock()
                        .unwrap()
                        .push((req.peer_identity.clone(), req.hostname.clone()));
                    let relayed = relayed.clone();
                    async move {
                        let up = TcpStream::connect(next).await.unwrap();
                        let Ok(s) = req.accept() else { return };
                        let (mut cr, mut cw) = tokio::io::split(s.into_io());
                        let (mut ur, mut uw) = up.into_split();
                        let r2 = relayed.clone();
                        let down = async move {
                            let mut buf = vec![0u8; 16384];
                            while let Ok(n @ 1..) = cr.read(&mut buf).await {
                                r2.lock().unwrap().extend_from_slice(&buf[..n]);
                                if uw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = uw.shutdown().await;
                        };
                        let back = async move {
                            let mut buf = vec![0u8; 16384];
                            while let Ok(n @ 1..) = ur.read(&mut buf).await {
                                relayed.lock().unwrap().extend_from_slice(&buf[..n]);
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = cw.shutdown().await;
                        };
                        tokio::join!(down, back);
                    }
                })
                .await;
            });
        }
    });
    addr
}

struct Rig {
    pool: Arc<HbonePool>,
    gateway: SocketAddr,
    gateway_seen: Seen,
    destination_seen: Seen,
    relayed: Arc<Mutex<Vec<u8>>>,
}

async fn rig() -> Rig {
    let ca = DevCa::generate("cluster.local").unwrap();
    let echo = echo_server().await;
    let destination_seen = Seen::default();
    let gateway_seen = Seen::default();
    let relayed = Arc::new(Mutex::new(Vec::new()));
    let dst = destination(cert(&ca, &id("default", "echo")), echo, destination_seen.clone()).await;
    let gw = gateway(
        cert(&ca, &id("istio-system", "eastwest")),
        dst,
        gateway_seen.clone(),
        relayed.clone(),
    )
    .await;
    let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
    let pool = HbonePool::new(Settings::default(), certs, Arc::new(PlainSockets::default()));
    Rig {
        pool,
        gateway: gw,
        gateway_seen,
        destination_seen,
        relayed,
    }
}

fn request(gateway: SocketAddr, gateway_id: Identity, inner_id: Identity) -> DoubleTunnelRequest {
    DoubleTunnelRequest {
        outer: TunnelRequest {
            key: PoolKey {
                src_identity: id("default", "client"),
                dst_identities: vec![gateway_id],
                src_ip: None,
                dst: gateway,
            },
            authority: format!("{HOST}:80"),
            forwarded_for: None,
            baggage: None,
            traceparent: None,
        },
        inner_identities: vec![inner_id],
        inner_authority: format!("{HOST}:80"),
    }
}

#[tokio::test]
async fn inner_tls_is_end_to_end_and_the_gateway_relays_ciphertext() {
    let rig = rig().await;
    for round in 0..2 {
        let req = request(rig.gateway, id("istio-system", "eastwest"), id("default", "echo"));
        let stream = rig.pool.connect_double(&req).await.expect("double HBONE tunnel");
        let mut io = stream.into_io();
        io.write_all(MARKER).await.unwrap();
        let mut back = vec![0u8; MARKER.len()];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(back, MARKER, "round {round}");
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    // The outer connection is pooled: two tunnels, one TLS connection to the gateway.
    assert_eq!(rig.pool.stats().opened_total, 1);
    let client = id("default", "client");
    let dst_seen = rig.destination_seen.lock().unwrap().clone();
    assert_eq!(
        dst_seen,
        vec![(client.clone(), Some(HOST.to_owned())); 2],
        "destination saw the client's identity"
    );
    let gw_seen = rig.gateway_seen.lock().unwrap().clone();
    assert_eq!(
        gw_seen,
        vec![(client, Some(HOST.to_owned())); 2],
        "the gateway routed by the service hostname"
    );
    let relayed = rig.relayed.lock().unwrap().clone();
    assert!(
        relayed.len() > 1000,
        "the gateway relayed the inner handshake ({} bytes)",
        relayed.len()
    );
    assert!(
        !relayed.windows(MARKER.len()).any(|w| w == MARKER),
        "the gateway saw the plaintext"
    );
}

#[tokio::test]
async fn wrong_identities_on_either_layer_fail_closed() {
    let rig = rig().await;
    // The gateway does not prove the identity the client expects of it.
    let req = request(rig.gateway, id("istio-system", "other"), id("default", "echo"));
    let err = rig
        .pool
        .connect_double(&req)
        .await
        .err()
        .expect("gateway identity mismatch");
    assert!(matches!(err, HboneError::Tls(_)), "{err}");
    // The destination (behind a genuine gateway) is not who the client expects.
    let req = request(rig.gateway, id("istio-system", "eastwest"), id("default", "impostor"));
    let err = rig
        .pool
        .connect_double(&req)
        .await
        .err()
        .expect("destination identity mismatch");
    assert!(matches!(err, HboneError::Tls(_)), "{err}");
    assert!(
        rig.destination_seen.lock().unwrap().is_empty(),
        "no inner CONNECT was sent"
    );
}
