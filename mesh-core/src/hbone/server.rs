//! The HBONE server: accepts mutual TLS (TLS 1.3, ALPN h2), requires a peer certificate with a
//! SPIFFE identity, and hands every HTTP/2 CONNECT stream to a handler that decides its fate.
//! Requests that are not CONNECT get 405; an authority that is not `ip:port` gets 400, unless
//! the server takes `hostname:port` ([`Settings::hostname_authority`]: double HBONE names the
//! destination service by hostname, as Istio's ztunnel does).
//!
//! What an unauthenticated or hostile peer can hold is bounded ([`super::limits`]): connections
//! still in TLS (count per source and in total, no read buffer until authenticated), then
//! awaiting the HTTP/2 preface (count per peer identity; one deadline for both phases),
//! authenticated connections per peer identity and how long one may stay without a stream
//! ([`Settings::server_idle_timeout`], then GOAWAY), header block size, per-stream send
//! buffers, streams per peer identity, and streams reset before their answer (the connection
//! gets GOAWAY).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::buffer::{LazyBuffered, AUTHENTICATED_READ_BUFFER};
use super::limits::{Limit, PeerSlot, PendingGuard, ResetWindow, ServerLimits};
use super::stream::H2Stream;
use super::{HboneError, Settings};
use crate::identity::{identity_of, Identity};

/// Largest header block a peer may send on one request (HBONE needs a few hundred bytes).
pub(crate) const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Data h2 may queue per stream towards a peer that does not read: all a stalled stream holds.
/// One full read of the splice (one DATA frame): a stream gets room for its next chunk only
/// once h2 has taken the previous one whole, so chunks are not cut into frames that do not fill
/// TLS records (a buffer a few bytes larger than the chunk handed out those few bytes as room).
pub(crate) const MAX_SEND_BUFFER: usize = super::splice::READ_LIMIT;

/// What the streams of one connection share: the reset count that can end it, and how many
/// are open (and since when none is) for the idle timeout.
struct ConnShared {
    resets: Mutex<ResetWindow>,
    flooded: CancellationToken,
    limits: Arc<ServerLimits>,
    /// Whether `hostname:port` authorities reach the handler.
    hostnames: bool,
    open: AtomicU32,
    idle_since: Mutex<tokio::time::Instant>,
}

impl ConnShared {
    /// When the connection, idle since `idle_since`, has been idle for `timeout`; `None`
    /// while a stream is open.
    fn idle_deadline(&self, timeout: std::time::Duration) -> Option<tokio::time::Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|p| p.into_inner()) + timeout)
    }

    fn record_reset(&self) {
        let over = self
            .resets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&self.limits.config);
        if over && !self.flooded.is_cancelled() {
            self.limits.hit(Limit::ResetFlood);
            self.flooded.cancel();
        }
    }
}

/// An open stream's place in its peer's count and in its connection's: released when the
/// handler is done with it (rejected, or the splice ended).
struct StreamSlot {
    _peer: PeerSlot,
    conn: Arc<ConnShared>,
}

impl StreamSlot {
    fn new(peer: PeerSlot, conn: &Arc<ConnShared>) -> Self {
        conn.open.fetch_add(1, Ordering::AcqRel);
        StreamSlot {
            _peer: peer,
            conn: conn.clone(),
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        // The time first, then the count: the idle check that sees no stream open also sees
        // this end (not a stale start of an earlier idle period, which would close a
        // connection whose last stream just ended).
        *self.conn.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        self.conn.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl super::stream::StreamGuard for StreamSlot {}

/// A CONNECT request waiting for an answer.
pub struct InboundConnect {
    /// The target `ip:port` from `:authority`; for a `hostname:port` authority, the local
    /// address the connection arrived on with that port, until the handler resolves it.
    pub dst: SocketAddr,
    /// The service hostname of a `hostname:port` authority (lowercase), if that was the form.
    pub hostname: Option<String>,
    pub headers: HeaderMap,
    /// Identity proven by the peer's certificate.
    pub peer_identity: Identity,
    /// TCP peer of the TLS connection.
    pub peer_addr: SocketAddr,
    /// Local address the TLS connection arrived on.
    pub local_addr: SocketAddr,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
    slot: StreamSlot,
}

impl InboundConnect {
    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let resp = Response::builder().status(status).body(()).unwrap_or_default();
        if let Err(e) = self.respond.send_response(resp, true) {
            debug!(error = %e, "could not send HBONE rejection");
        }
    }

    /// Answers 200 and returns the stream to splice.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(H2Stream {
            send,
            recv: self.recv,
            _guard: Some(Box::new(self.slot)),
        })
    }

    /// Runs `work` (say, connecting to the application) unless the client resets the stream
    /// first; then `work` is dropped unfinished and `None` returned. A stream the client
    /// abandoned never gets an upstream connection, and its reset counts towards the
    /// connection's reset limit.
    pub async fn unless_reset<F: Future>(&mut self, work: F) -> Option<F::Output> {
        let respond = &mut self.respond;
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        tokio::select! {
            biased;
            _ = reset => {
                self.slot.conn.record_reset();
                None
            }
            done = work => Some(done),
        }
    }

    /// The client address from the `forwarded: for=` header, if present and well formed.
    pub fn forwarded_for(&self) -> Option<SocketAddr> {
        parse_forwarded(self.headers.get("forwarded")?.to_str().ok()?)
    }
}

/// The `for=` address of a `forwarded` header value, if present and an `ip:port`.
/// Public so the fuzz tests can drive it with hostile input.
pub fn parse_forwarded(value: &str) -> Option<SocketAddr> {
    value.split(';').find_map(|p| {
        let p = p.trim();
        let val = p.strip_prefix("for=").or_else(|| p.strip_prefix("For="))?;
        val.trim_matches('"').parse().ok()
    })
}

/// What a CONNECT names: an address, or a service hostname and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectTarget {
    Addr(SocketAddr),
    Host(String, u16),
}

/// Why an incoming request could not even reach the handler.
fn precheck(req: &Request<RecvStream>, hostnames: bool) -> Result<ConnectTarget, StatusCode> {
    match connect_target(req.method(), req.uri()) {
        Ok(dst) => Ok(ConnectTarget::Addr(dst)),
        Err(StatusCode::BAD_REQUEST) if hostnames => connect_host(req.uri()).map(|(h, p)| ConnectTarget::Host(h, p)),
        Err(status) => Err(status),
    }
}

/// The `hostname:port` of a CONNECT authority that is not an address: a DNS name (letters,
/// digits, `-`, `.`; at most 253 bytes), returned lowercase, and a plain non-zero port.
/// Public so the fuzz tests can drive it with hostile input.
pub fn connect_host(uri: &Uri) -> Result<(String, u16), StatusCode> {
    let authority = uri.authority().ok_or(StatusCode::BAD_REQUEST)?.as_str();
    let (host, port) = authority.rsplit_once(':').ok_or(StatusCode::BAD_REQUEST)?;
    let port_ok = !port.is_empty() && !port.starts_with('0') && port.bytes().all(|b| b.is_ascii_digit());
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| port_ok && *p != 0)
        .ok_or(StatusCode::BAD_REQUEST)?;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// The `ip:port` a CONNECT request targets, or the status that refuses it.
/// Public so the fuzz tests can drive it with hostile input.
pub fn connect_target(method: &Method, uri: &Uri) -> Result<SocketAddr, StatusCode> {
    if method != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let authority = uri.authority().ok_or(StatusCode::BAD_REQUEST)?.as_str();
    let dst = authority.parse::<SocketAddr>().map_err(|_| StatusCode::BAD_REQUEST)?;
    // Port 0 is never a destination, and no client writes `:080`: refuse both rather than
    // connect somewhere the request did not plainly name.
    if dst.port() == 0 || !authority.ends_with(&format!(":{}", dst.port())) {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(dst)
}

/// Serves one inbound HBONE connection: TLS handshake, identity, then every stream.
/// `drain` asks the connection to stop taking new streams (GOAWAY) and finish the rest.
pub async fn serve_connection<F, Fut>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    settings: &Settings,
    drain: CancellationToken,
    handler: F,
) -> Result<(), HboneError>
where
    F: Fn(InboundConnect) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let pending = settings
        .limits
        .admit(tcp.peer_addr()?.ip())
        .map_err(HboneError::Limited)?;
    serve_admitted(tcp, pending, tls, settings, drain, handler).await
}

/// As [`serve_connection`], for a connection already admitted (`pending`, from
/// `settings.limits.admit`): a server that must wait for something before its handshake (its
/// certificate) admits at accept, so a socket is counted from the start, not once that is ready.
pub async fn serve_admitted<F, Fut>(
    tcp: TcpStream,
    pending: PendingGuard,
    tls: Arc<rustls::ServerConfig>,
    settings: &Settings,
    drain: CancellationToken,
    handler: F,
) -> Result<(), HboneError>
where
    F: Fn(InboundConnect) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let peer_addr = tcp.peer_addr()?;
    let local_addr = tcp.local_addr()?;
    let limits = settings.limits.clone();
    let (conn, peer_identity) = {
        // Until the peer sends its first bytes it costs this small future and its socket; the
        // TLS state (several KiB) is allocated only then.
        let authenticate = async {
            // `readable` may wake without data (a spurious readiness); peeking waits for a byte.
            tcp.peek(&mut [0u8; 1]).await?;
            Box::pin(authenticate(tcp, tls, settings, pending)).await
        };
        match tokio::time::timeout(settings.handshake_timeout, authenticate).await {
            Ok(done) => done?,
            Err(_) => {
                limits.hit(Limit::HandshakeTimeout);
                return Err(HboneError::Timeout(
                    "TLS handshake and HTTP/2 preface",
                    settings.handshake_timeout,
                ));
            }
        }
    };
    // Each identity holds a bounded number of authenticated connections: a peer with a
    // valid certificate must not pin TLS and HTTP/2 state without limit.
    let Some(_held) = limits.connection(&peer_identity) else {
        return Err(HboneError::Limited(Limit::ConnectionsPerPeer));
    };
    let shared = Arc::new(ConnShared {
        resets: Mutex::new(ResetWindow::new()),
        flooded: CancellationToken::new(),
        limits,
        hostnames: settings.hostname_authority,
        open: AtomicU32::new(0),
        idle_since: Mutex::new(tokio::time::Instant::now()),
    });
    let peer = Peer {
        identity: peer_identity,
        addr: peer_addr,
        local: local_addr,
    };
    // Boxed: the stream loop's state (h2 and TLS, several KiB) exists only once authenticated.
    let streams = Streams {
        peer: &peer,
        shared: &shared,
        idle_timeout: settings.server_idle_timeout,
        goaway_grace: settings.handshake_timeout,
    };
    Box::pin(streams.serve(conn, drain, handler)).await
}

type ServerConn = h2::server::Connection<tokio_rustls::server::TlsStream<LazyBuffered<TcpStream>>, Bytes>;

/// TLS with a SPIFFE identity, then the HTTP/2 preface: everything a peer must do before it
/// holds more than a socket. The read buffer appears only once TLS proved who the peer is.
///
/// The source address's share of the pending slot is given back once TLS proved the peer:
/// the HTTP/2 preface is then awaited on the identity's own (smaller) allowance, so that
/// connections relayed by an east-west gateway (one source address for many clients) that
/// finish TLS and stall cannot use up the gateway's allowance for everyone. The slot stays in
/// the total until the preface: each such connection already holds its read buffer, and
/// identities are many.
async fn authenticate(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    settings: &Settings,
    mut pending: PendingGuard,
) -> Result<(ServerConn, Identity), HboneError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut tls = acceptor.accept(LazyBuffered::new(tcp)).await.map_err(HboneError::Tls)?;
    let peer_identity = {
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(HboneError::NoPeerIdentity)?;
        identity_of(leaf).map_err(|_| HboneError::NoPeerIdentity)?
    };
    pending.release_source();
    let _preface = settings
        .limits
        .preface(&peer_identity)
        .ok_or(HboneError::Limited(Limit::PrefacePerPeer))?;
    tls.get_mut().0.grow(AUTHENTICATED_READ_BUFFER);
    let conn = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.server_max_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake(tls)
        .await?;
    drop(pending);
    Ok((conn, peer_identity))
}

/// Who is on the other end of a connection.
struct Peer {
    identity: Identity,
    addr: SocketAddr,
    local: SocketAddr,
}

/// One authenticated connection's stream loop: who the peer is and what bounds it.
struct Streams<'a> {
    peer: &'a Peer,
    shared: &'a Arc<ConnShared>,
    idle_timeout: std::time::Duration,
    /// How long a peer sent GOAWAY for idleness has to close before it is dropped.
    goaway_grace: std::time::Duration,
}

impl Streams<'_> {
    /// Accepts the streams of an authenticated connection until it closes. A connection
    /// without a stream for the idle timeout is sent GOAWAY (counted as a bound that bit);
    /// still without one a grace period later, it is dropped: h2 closes a gracefully shut
    /// connection only once the peer answered its PING, which a hostile peer never does (nor
    /// need it read at all).
    async fn serve<F, Fut>(self, mut conn: ServerConn, drain: CancellationToken, handler: F) -> Result<(), HboneError>
    where
        F: Fn(InboundConnect) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Streams { peer, shared, .. } = self;
        let mut closing = false;
        let mut flooded = false;
        let mut idle_goaway = false;
        let idle = tokio::time::sleep(self.idle_timeout);
        tokio::pin!(idle);
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                _ = drain.cancelled(), if !closing => {
                    closing = true;
                    conn.graceful_shutdown();
                    continue;
                }
                _ = shared.flooded.cancelled(), if !flooded => {
                    flooded = true;
                    debug!(peer = %peer.addr, "too many streams reset before their answer; closing the connection");
                    conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    continue;
                }
                _ = &mut idle => {
                    let now = tokio::time::Instant::now();
                    match shared.idle_deadline(self.idle_timeout) {
                        Some(at) if at <= now && idle_goaway => {
                            debug!(peer = %peer.addr, "still open without a stream after GOAWAY; dropping the connection");
                            return Ok(());
                        }
                        Some(at) if at <= now => {
                            idle_goaway = true;
                            shared.limits.hit(Limit::IdleConnection);
                            debug!(peer = %peer.addr, "no stream for the idle timeout; closing the connection");
                            if !closing {
                                closing = true;
                                conn.graceful_shutdown();
                            }
                            idle.as_mut().reset(now + self.goaway_grace);
                        }
                        Some(at) => idle.as_mut().reset(at),
                        None => idle.as_mut().reset(now + self.idle_timeout),
                    }
                    continue;
                }
            };
            let Some(next) = next else { return Ok(()) };
            let (req, respond) = match next {
                Ok(r) => r,
                Err(e) if e.is_go_away() || e.is_io() => return Ok(()),
                Err(e) => return Err(HboneError::H2(e)),
            };
            if let Some(connect) = self.admit(req, respond) {
                tokio::spawn(handler(connect));
            }
        }
    }

    /// A new stream checked and given its slots, or `None` when it was answered already.
    fn admit(&self, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) -> Option<InboundConnect> {
        let Streams { peer, shared, .. } = self;
        let target = match precheck(&req, shared.hostnames) {
            Ok(d) => d,
            Err(status) => {
                debug!(peer = %peer.addr, method = %req.method(), uri = %req.uri(), %status, "malformed HBONE request");
                let resp = Response::builder().status(status).body(()).unwrap_or_default();
                let _ = respond.send_response(resp, true);
                return None;
            }
        };
        let Some(slot) = shared.limits.stream(&peer.identity) else {
            debug!(peer = %peer.addr, identity = %peer.identity, "peer holds its maximum of streams; refusing another");
            respond.send_reset(Reason::REFUSED_STREAM);
            return None;
        };
        let (parts, recv) = req.into_parts();
        let (dst, hostname) = match target {
            ConnectTarget::Addr(a) => (a, None),
            ConnectTarget::Host(h, port) => (SocketAddr::new(peer.local.ip(), port), Some(h)),
        };
        Some(InboundConnect {
            dst,
            hostname,
            headers: parts.headers,
            peer_identity: peer.identity.clone(),
            peer_addr: peer.addr,
            local_addr: peer.local,
            respond,
            recv,
            slot: StreamSlot::new(slot, shared),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(authority: &str) -> Result<SocketAddr, StatusCode> {
        connect_target(&Method::CONNECT, &authority.parse().unwrap())
    }

    /// Found by tests/fuzz.rs: `0.0.0.0:00` was accepted as port 0.
    #[test]
    fn port_zero_and_padded_ports_are_refused() {
        assert_eq!(target("0.0.0.0:00"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(target("10.0.0.1:0"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(target("10.0.0.1:080"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(target("[::1]:0080"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(target("10.0.0.1:80"), Ok("10.0.0.1:80".parse().unwrap()));
        assert_eq!(target("[::1]:8080"), Ok("[::1]:8080".parse().unwrap()));
    }

    #[test]
    fn hostname_authorities_are_dns_names_with_plain_ports() {
        let host = |a: &str| connect_host(&a.parse().unwrap());
        assert_eq!(
            host("Server.default.svc.cluster.local:80"),
            Ok(("server.default.svc.cluster.local".to_owned(), 80))
        );
        for bad in [
            "server:0",
            "server:080",
            "server:",
            "-x.local:80",
            "a..b:80",
            "a_b:80",
            "x:65536",
        ] {
            assert_eq!(host(bad), Err(StatusCode::BAD_REQUEST), "{bad}");
        }
        assert_eq!(host(&format!("{}:80", "a".repeat(64))), Err(StatusCode::BAD_REQUEST));
    }
}
