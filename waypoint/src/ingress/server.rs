//! The ingress gateway's listeners: ports bound and released as the configuration changes,
//! TLS terminated on HTTPS ports (handshake deadline), HTTP/1.1 and HTTP/2 served by hyper,
//! and each request handed to the waypoint's pipeline with its listener's route table.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{HeaderValue, Request};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::hbone::{Limit, LimitConfig, LimitObserver, ServerLimits};
use mesh_core::socket::AcceptBackoff;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Ingress;
use crate::http::authority;
use crate::http::local_reply::{BadRequest, LocalReply};
use crate::http::proxy::{self, Downstream};
use crate::http::server;
use crate::idle;
use crate::telemetry::metrics::IdleConnection;
use crate::upstream::Body;
use crate::Waypoint;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the listeners bind and how many connections they hold together.
pub struct Listen {
    pub bind: std::net::IpAddr,
    pub max_connections: usize,
}

/// Keeps the bound ports equal to the configured ones until drained. Every port shares one
/// bound on connections still in their TLS handshake (all sources, and per source address),
/// as the HBONE listeners do, and one on all connections held; a refused connection is
/// closed and counted by limit.
pub async fn run(wp: Arc<Waypoint>, ingress: Arc<Ingress>, listen: Listen) {
    let metrics = wp.metrics.clone();
    let observer: LimitObserver = Arc::new(move |limit: Limit| metrics.reject(limit.as_str()));
    let limits = Arc::new(ServerLimits::new(LimitConfig::default(), Some(observer)));
    let slots = Arc::new(Semaphore::new(listen.max_connections));
    let bind = listen.bind;
    let mut changed = ingress.subscribe();
    let mut bound: HashMap<u16, CancellationToken> = HashMap::new();
    loop {
        let wanted: Vec<u16> = ingress.current.load().ports.keys().copied().collect();
        bound.retain(|port, stop| {
            let keep = wanted.contains(port);
            if !keep {
                info!(port, "ingress port released");
                stop.cancel();
            }
            keep
        });
        let fresh: Vec<u16> = wanted.into_iter().filter(|p| !bound.contains_key(p)).collect();
        for port in fresh {
            let addr = SocketAddr::new(bind, port);
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    let stop = wp.drain.child_token();
                    bound.insert(port, stop.clone());
                    info!(%addr, "ingress port listening");
                    let port = Port {
                        number: port,
                        stop,
                        limits: limits.clone(),
                        slots: slots.clone(),
                    };
                    tokio::spawn(accept(wp.clone(), ingress.clone(), l, port));
                }
                // Retried on the next change.
                Err(e) => warn!(%addr, error = %e, "cannot bind ingress port"),
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = wp.drain.cancelled() => return,
        }
    }
}

/// One bound port.
struct Port {
    number: u16,
    stop: CancellationToken,
    limits: Arc<ServerLimits>,
    /// One per connection held, shared by every port.
    slots: Arc<Semaphore>,
}

/// Runs `serve` holding the connection's slot. Not an `async fn`: its state would hold
/// `serve` twice (argument and awaitee), doubling every connection's task.
fn holding<F: Future<Output = ()>>(slot: OwnedSemaphorePermit, serve: F) -> impl Future<Output = ()> {
    serve.map(move |()| drop(slot))
}

async fn accept(wp: Arc<Waypoint>, ingress: Arc<Ingress>, listener: TcpListener, port: Port) {
    let Port {
        number: port,
        stop,
        limits,
        slots,
    } = port;
    let mut backoff = AcceptBackoff::default();
    let tls = tokio_rustls::TlsAcceptor::from(match super::tls::server_config(ingress.resolver(port)) {
        Ok(c) => c,
        Err(e) => {
            warn!(port, error = %e, "TLS configuration");
            return;
        }
    });
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    backoff.failed("ingress", &e).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        backoff.succeeded();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            wp.metrics.reject("connections_limit");
            debug!(%peer, "connection refused: the ingress holds --ingress-max-connections");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (is_tls, is_tcp, is_passthrough) = ingress
            .current
            .load()
            .ports
            .get(&port)
            .map_or((false, false, false), |p| (p.tls, p.tcp, p.passthrough));
        let inbound = super::tcp::Inbound { tcp, peer, port };
        if is_tcp {
            wp.tasks
                .spawn(holding(slot, super::tcp::serve(wp.clone(), ingress.clone(), inbound)));
            continue;
        }
        // Until TLS completes (or its ClientHello is read) the connection holds a pending
        // slot; over the bound it is closed.
        let pending = match (is_tls || is_passthrough).then(|| limits.admit(peer.ip())).transpose() {
            Ok(p) => p,
            Err(_) => continue,
        };
        if is_passthrough {
            let serve = super::passthrough::serve(wp.clone(), ingress.clone(), inbound, pending);
            wp.tasks.spawn(holding(slot, serve));
            continue;
        }
        let super::tcp::Inbound { tcp, .. } = inbound;
        let (wp2, ingress, tls) = (wp.clone(), ingress.clone(), tls.clone());
        wp.tasks.spawn(async move {
            if is_tls {
                serve_tls(wp2, ingress, tcp, peer, port, (tls, pending), slot).await;
            } else {
                let conn = Conn {
                    peer,
                    port,
                    tls: false,
                    sni: None,
                };
                serve(wp2, ingress, TokioIo::new(tcp), conn, slot).await;
            }
        });
    }
}

/// What a request's connection tells the pipeline.
#[derive(Clone)]
struct Conn {
    peer: SocketAddr,
    port: u16,
    tls: bool,
    /// The TLS server name the client sent, if any.
    sni: Option<String>,
}

async fn serve_tls(
    wp: Arc<Waypoint>,
    ingress: Arc<Ingress>,
    tcp: TcpStream,
    peer: SocketAddr,
    port: u16,
    (tls, pending): (
        tokio_rustls::TlsAcceptor,
        Option<mesh_core::hbone::limits::PendingGuard>,
    ),
    slot: OwnedSemaphorePermit,
) {
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await;
    drop(pending);
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            wp.metrics.reject("tls_handshake");
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            wp.metrics.reject("tls_handshake_timeout");
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let sni = stream.get_ref().1.server_name().map(str::to_ascii_lowercase);
    let conn = Conn {
        peer,
        port,
        tls: true,
        sni,
    };
    serve(wp, ingress, TokioIo::new(stream), conn, slot).await;
}

/// Serves HTTP on one client connection; `slot` goes with the socket (through a WebSocket
/// upgrade too).
async fn serve<T>(wp: Arc<Waypoint>, ingress: Arc<Ingress>, io: TokioIo<T>, conn: Conn, slot: OwnedSemaphorePermit)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let metrics = wp.metrics.clone();
    let header_read_timeout = wp.header_read_timeout;
    // Ends a connection left silent (HTTP/2 between requests, or one that never began).
    let activity = idle::Activity::default();
    let counted = activity.clone();
    let svc = hyper::service::service_fn(move |req| {
        let answering = counted.request();
        handle(wp.clone(), ingress.clone(), (conn.clone(), answering), req)
    });
    let builder = server::builder(Some(header_read_timeout));
    let io = TokioIo::new(idle::Watched::new(io.into_inner(), activity.clone()).holding(slot));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let served = idle::until_idle(conn.as_mut(), &activity, header_read_timeout, |c| {
        metrics.idle_timeout(IdleConnection::Http);
        c.graceful_shutdown()
    });
    if let Some(Err(e)) = served.await {
        if let Some(reason) = e.downcast_ref::<hyper::Error>().and_then(server::refusal) {
            metrics.reject(reason);
        }
        debug!(error = %e, "ingress connection ended with an error");
    }
}

/// Finds the request's route table and runs the waypoint's pipeline on it.
/// `_answering` counts the request as being answered (for the idle watchdog) until it returns.
async fn handle(
    wp: Arc<Waypoint>,
    ingress: Arc<Ingress>,
    (conn, _answering): (Conn, idle::InFlight),
    mut req: Request<Incoming>,
) -> Result<http::Response<Body>, std::convert::Infallible> {
    let state = ingress.current.load_full();
    // The canonical host, as admission writes it back for authorization and the backend.
    let host = match authority::of_request(req.uri(), req.headers()) {
        Ok(named) => named.map(|h| h.host().to_owned()).unwrap_or_default(),
        Err(e) => return Ok(refuse(&wp, LocalReply::BadRequest(BadRequest::Authority(e)))),
    };
    let port = state.ports.get(&conn.port).ok_or(LocalReply::NoRoute);
    let listener = match port.and_then(|p| p.serving(conn.tls, conn.sni.as_deref(), &host)) {
        Ok(l) => l,
        Err(reply) => {
            debug!(%host, sni = conn.sni.as_deref(), port = conn.port, "no listener serves this host here");
            return Ok(refuse(&wp, reply));
        }
    };
    let Some(table) = listener.table(&host) else {
        debug!(%host, port = conn.port, "no listener host matches");
        return Ok(refuse(&wp, LocalReply::NoRoute));
    };
    let remote_ip = super::remote_ip(req.headers(), conn.peer.ip(), state.num_trusted_proxies);
    append_forwarded_for(req.headers_mut(), conn.peer.ip());
    let down = Arc::new(Downstream {
        peer_identity: None,
        client_addr: conn.peer,
        remote_ip,
        forwarded_proto: if conn.tls { "https" } else { "http" },
        upstream_protocol: proxy::UpstreamProtocol::Http2ForGrpc,
        dst: SocketAddr::new(conn.peer.ip(), conn.port),
        service: state.service.clone(),
        service_key: table.to_owned(),
    });
    proxy::handle(wp, down, req).await
}

/// Answers before the pipeline: counted as a refusal when the reply says so.
fn refuse(wp: &Waypoint, reply: LocalReply) -> http::Response<Body> {
    if let Some(reason) = reply.reject_reason() {
        wp.metrics.reject(reason);
    }
    reply.into_response()
}

/// Adds the peer to X-Forwarded-For, as a proxy does for the next hop.
fn append_forwarded_for(headers: &mut http::HeaderMap, peer: std::net::IpAddr) {
    // The common case: the client sent none.
    if !headers.contains_key("x-forwarded-for") {
        if let Ok(v) = HeaderValue::from_str(&peer.to_string()) {
            headers.insert("x-forwarded-for", v);
        }
        return;
    }
    let mut entries: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .map(str::to_owned)
        .collect();
    entries.push(peer.to_string());
    let joined = entries.join(", ");
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.remove("x-forwarded-for");
        headers.insert("x-forwarded-for", v);
    }
}
