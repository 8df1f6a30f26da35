//! The HBONE client pool. Connections are keyed by (source identity, destination identities,
//! source IP, destination address); each carries up to `client_max_streams` CONNECT streams
//! before another is opened, so load spreads over several connections (and receiver cores).
//! Broken connections are evicted as soon as they fail; idle ones after `idle_timeout`;
//! PINGs detect peers that vanished, such as a pod whose IP was reused.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tracing::{debug, warn};

use super::buffer::{LazyBuffered, AUTHENTICATED_READ_BUFFER};
use super::stream::{H2Stream, StreamGuard};
use super::{HboneError, Settings};
use crate::identity::{CertManager, Identity};
use crate::socket::SocketFactory;
use crate::tls;

/// Connections are shared only between requests with equal keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: Identity,
    /// Sorted; the server must prove one of these.
    pub dst_identities: Vec<Identity>,
    pub src_ip: Option<IpAddr>,
    /// The HBONE endpoint (`ip:15008`).
    pub dst: SocketAddr,
}

/// One tunnel to open.
pub struct TunnelRequest {
    pub key: PoolKey,
    /// `:authority`: the target `ip:port` behind the HBONE endpoint.
    pub authority: String,
    /// Original client address, sent as `forwarded: for=`.
    pub forwarded_for: Option<SocketAddr>,
    pub baggage: Option<String>,
    pub traceparent: Option<String>,
}

struct PooledConn {
    id: u64,
    sender: SendRequest<Bytes>,
    active: AtomicUsize,
    dead: AtomicBool,
    /// Milliseconds since the pool's epoch when the last stream ended.
    idle_since: AtomicU64,
}

struct ActiveStream {
    conn: Arc<PooledConn>,
    epoch: Instant,
}

impl StreamGuard for ActiveStream {}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.conn
            .idle_since
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Pool statistics for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub connections: usize,
    pub streams: usize,
    pub opened_total: u64,
}

/// Opens HBONE tunnels, reusing TLS connections.
pub struct HbonePool {
    pub(super) settings: Settings,
    pub(super) certs: Arc<CertManager>,
    sockets: Arc<dyn SocketFactory>,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

impl HbonePool {
    /// Creates the pool and its reaper task (must run inside a Tokio runtime).
    pub fn new(settings: Settings, certs: Arc<CertManager>, sockets: Arc<dyn SocketFactory>) -> Arc<Self> {
        let pool = Arc::new(HbonePool {
            settings,
            certs,
            sockets,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Arc<PooledConn>>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> PoolStats {
        let conns = self.conns();
        PoolStats {
            connections: conns.values().map(Vec::len).sum(),
            streams: conns.values().flatten().map(|c| c.active.load(Ordering::Relaxed)).sum(),
            opened_total: self.next_id.load(Ordering::Relaxed),
        }
    }

    /// Takes a stream slot on a live pooled connection, if one has room.
    fn checkout(&self, key: &PoolKey) -> Option<Arc<PooledConn>> {
        let mut conns = self.conns();
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.dead.load(Ordering::Acquire));
        let c = list
            .iter()
            .find(|c| c.active.load(Ordering::Acquire) < self.settings.client_max_streams)?;
        c.active.fetch_add(1, Ordering::AcqRel);
        Some(c.clone())
    }

    fn evict(&self, key: &PoolKey, id: u64) {
        let mut conns = self.conns();
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }

    /// Opens a CONNECT stream; answers only after the far side replied 200.
    pub async fn connect(self: &Arc<Self>, req: &TunnelRequest) -> Result<H2Stream, HboneError> {
        // A pooled connection may have died since it was last used: retry once on a fresh one.
        let mut fresh_tried = false;
        loop {
            let (conn, fresh) = match self.checkout(&req.key) {
                Some(c) => (c, false),
                None => (self.open(&req.key).await?, true),
            };
            let guard = ActiveStream {
                conn: conn.clone(),
                epoch: self.epoch,
            };
            match self.send(&conn, req).await {
                Ok((send, recv)) => {
                    return Ok(H2Stream {
                        send,
                        recv,
                        _guard: Some(Box::new(guard)),
                    })
                }
                // A local failure, a GOAWAY (the peer is draining) or a refused stream means
                // the request never reached an application: safe to retry on a fresh connection.
                Err(HboneError::H2(e))
                    if !fresh
                        && !fresh_tried
                        && (!e.is_remote() || e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)) =>
                {
                    debug!(error = %e, dst = %req.key.dst, "pooled HBONE connection failed; replacing it");
                    conn.dead.store(true, Ordering::Release);
                    self.evict(&req.key, conn.id);
                    fresh_tried = true;
                }
                Err(e) => {
                    if matches!(&e, HboneError::H2(h) if h.is_io() || h.is_go_away()) {
                        conn.dead.store(true, Ordering::Release);
                        self.evict(&req.key, conn.id);
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn send(
        &self,
        conn: &PooledConn,
        req: &TunnelRequest,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), HboneError> {
        send_connect(&conn.sender, &req.authority, req, self.settings.connect_timeout).await
    }

    /// Dials, handshakes and registers a new connection with one stream slot taken.
    async fn open(self: &Arc<Self>, key: &PoolKey) -> Result<Arc<PooledConn>, HboneError> {
        let s = &self.settings;
        let cert = self.certs.fetch(&key.src_identity).await?;
        let config = tls::client_config(&cert, key.dst_identities.clone())?;
        let sock = self.sockets.tcp_socket(key.dst)?;
        if let Some(ip) = key.src_ip {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
        let tcp = tokio::time::timeout(s.connect_timeout, sock.connect(key.dst))
            .await
            .map_err(|_| HboneError::Timeout("TCP connect", s.connect_timeout))??;
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut tls = tokio::time::timeout(
            s.handshake_timeout,
            connector.connect(tls::placeholder_server_name(), LazyBuffered::new(tcp)),
        )
        .await
        .map_err(|_| HboneError::Timeout("TLS handshake", s.handshake_timeout))?
        .map_err(HboneError::Tls)?;
        tls.get_mut().0.grow(AUTHENTICATED_READ_BUFFER);
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .max_header_list_size(super::server::MAX_HEADER_LIST)
            .max_send_buffer_size(super::server::MAX_SEND_BUFFER)
            .handshake(tls)
            .await?;
        let ping = connection.ping_pong();
        let conn = Arc::new(PooledConn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            sender,
            active: AtomicUsize::new(1),
            dead: AtomicBool::new(false),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
        });
        let weak = Arc::downgrade(&conn);
        let dst = key.dst;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%dst, error = %e, "HBONE connection closed with error");
            }
            if let Some(c) = weak.upgrade() {
                c.dead.store(true, Ordering::Release);
            }
        });
        if let Some(ping) = ping {
            tokio::spawn(keepalive(ping, Arc::downgrade(&conn), s.keepalive));
        }
        self.conns().entry(key.clone()).or_default().push(conn.clone());
        Ok(conn)
    }
}

/// Sends a CONNECT to `authority` with `req`'s headers on `sender`; the stream once the far
/// side answered 200 within `timeout`.
pub(super) async fn send_connect(
    sender: &SendRequest<Bytes>,
    authority: &str,
    req: &TunnelRequest,
    timeout: Duration,
) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), HboneError> {
    let mut builder = Request::builder().method(Method::CONNECT).uri(authority);
    if let Some(f) = req.forwarded_for {
        builder = builder.header("forwarded", format!("for=\"{f}\""));
    }
    if let Some(b) = &req.baggage {
        builder = builder.header("baggage", b.as_str());
    }
    if let Some(t) = &req.traceparent {
        builder = builder.header("traceparent", t.as_str());
    }
    let request = builder.body(())?;
    let mut sender = sender.clone().ready().await?;
    let (resp, send) = sender.send_request(request, false)?;
    let resp = tokio::time::timeout(timeout, resp)
        .await
        .map_err(|_| HboneError::Timeout("CONNECT response", timeout))??;
    if resp.status() != StatusCode::OK {
        return Err(HboneError::Status(resp.status()));
    }
    Ok((send, resp.into_body()))
}

async fn keepalive(mut ping: h2::PingPong, conn: Weak<PooledConn>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = conn.upgrade() else { return };
        if c.dead.load(Ordering::Acquire) {
            return;
        }
        drop(c);
        let ok = matches!(
            tokio::time::timeout(every, ping.ping(h2::Ping::opaque())).await,
            Ok(Ok(_))
        );
        if !ok {
            if let Some(c) = conn.upgrade() {
                warn!(conn = c.id, "HBONE keepalive failed; evicting connection");
                c.dead.store(true, Ordering::Release);
            }
            return;
        }
    }
}

/// Drops dead connections and those idle past the timeout.
async fn reap(pool: Weak<HbonePool>) {
    let period = match pool.upgrade() {
        Some(p) => (p.settings.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(p) = pool.upgrade() else { return };
        let now = p.epoch.elapsed().as_millis() as u64;
        let idle_ms = p.settings.idle_timeout.as_millis() as u64;
        p.conns().retain(|_, list| {
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.saturating_sub(c.idle_since.load(Ordering::Relaxed)) >= idle_ms;
                !c.dead.load(Ordering::Acquire) && !idle
            });
            !list.is_empty()
        });
    }
}
