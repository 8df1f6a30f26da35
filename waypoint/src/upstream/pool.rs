//! The upstream connection pool, per endpoint `ip:port`: HTTP/1.1 connections carry one
//! request at a time and are reused, an HTTP/2 connection is shared by every request.
//!
//! - An HTTP/1.1 connection goes back to the pool when its answer's body ends; an answer
//!   dropped half-read takes its connection with it (it cannot carry another request).
//! - A request that a reused connection closed before sending it (the race with a backend
//!   closing an idle keep-alive connection) is sent again on another; one that failed on a
//!   fresh connection is an error.
//! - Idle connections close after [`IDLE_TIMEOUT`]. A sweep, started with the first idle
//!   connection and ending with the pool, closes those never asked for again.
//!
//! It replaces hyper_util's `legacy::Client`, which spawned a task per HTTP/1.1 request to
//! return its connection, hashed a `(scheme, authority)` key with SipHash and needed the
//! endpoint as an absolute URI parsed from text: about 7 % of the ingress gateway's CPU.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;
use tracing::debug;

use super::cluster::Admission;
use super::connector::{BoxError, Connector};
use super::Body;

/// How long a connection may sit unused in the pool.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often the sweep looks for connections idle past [`IDLE_TIMEOUT`].
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Why a request got no answer from its endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection: the endpoint refused or timed out, or its tunnel or TLS failed.
    #[error("connect: {0}")]
    Connect(#[source] BoxError),
    /// The endpoint's address and the request's path make no URI (not expected: both are
    /// parsed already).
    #[error("no URI for the endpoint: {0}")]
    Uri(#[from] http::uri::InvalidUriParts),
    /// The connection opened but HTTP did not start on it.
    #[error("handshake: {0}")]
    Handshake(#[source] hyper::Error),
    /// A fresh connection closed before the request went out.
    #[error("closed before sending: {0}")]
    Unsent(#[source] hyper::Error),
    /// The request went out (or may have) and the exchange failed.
    #[error("{0}")]
    Exchange(#[source] hyper::Error),
}

impl Error {
    /// Whether the endpoint may have seen the request (what retry policies must know).
    pub fn maybe_sent(&self) -> bool {
        matches!(self, Error::Exchange(_))
    }
}

/// HTTP/1.1 or HTTP/2 connections to endpoints, opened by one [`Connector`].
pub struct Pool {
    connector: Connector,
    http2: bool,
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    sweeping: AtomicBool,
}

enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// A request a connection could not take, and whether it was sent anyway.
struct Refused {
    error: hyper::Error,
    /// The request back, when it never went out.
    unsent: Option<Request<Body>>,
}

impl Pool {
    pub fn new(connector: Connector, http2: bool) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            http2,
            idle: Mutex::new(HashMap::new()),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `req` (its URI's path and query are kept) to the endpoint at `target`.
    pub async fn send(
        self: &Arc<Self>,
        target: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, Error> {
        *req.uri_mut() = self.uri(target, &req)?;
        while let Some(sender) = self.checkout(target, Instant::now()) {
            match self.try_send(target, sender, req).await {
                Ok(resp) => return Ok(resp),
                Err(Refused { unsent: Some(r), error }) => {
                    debug!(%target, %error, "pooled connection closed before sending; trying another");
                    req = r;
                }
                Err(Refused { error, unsent: None }) => return Err(Error::Exchange(error)),
            }
        }
        // Boxed: connecting (TLS, HBONE) is rare next to a pooled send, and inline its state
        // would make every request's future ~5 KB larger, copied each time it moves.
        let sender = Box::pin(self.connect(target)).await?;
        self.try_send(target, sender, req).await.map_err(|r| match r.unsent {
            Some(_) => Error::Unsent(r.error),
            None => Error::Exchange(r.error),
        })
    }

    /// HTTP/1.1 sends the path alone (origin form). HTTP/2 sends the request's `Host` as
    /// `:authority` (RFC 9113: the two must agree, and a next hop routes and authorizes on it),
    /// the endpoint only for a request without one.
    fn uri(&self, target: SocketAddr, req: &Request<Body>) -> Result<Uri, Error> {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if !self.http2 {
            return Ok(Uri::from(path));
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        let host = req.headers().get(http::header::HOST);
        parts.authority = host
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .or_else(|| Authority::try_from(target.to_string()).ok());
        parts.path_and_query = Some(path);
        Ok(Uri::from_parts(parts)?)
    }

    /// An idle connection to `target` (the most recently used first), if one is left open.
    fn checkout(&self, target: SocketAddr, now: Instant) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&target)?;
        let found = loop {
            let Some(entry) = list.last_mut() else { break None };
            if entry.sender.is_closed() || now.duration_since(entry.since) >= IDLE_TIMEOUT {
                list.pop();
                continue;
            }
            break match &entry.sender {
                // Shared: it stays in the pool, in use as of now.
                Sender::Http2(s) => {
                    let s = s.clone();
                    entry.since = now;
                    Some(Sender::Http2(s))
                }
                Sender::Http1(_) => list.pop().map(|e| e.sender),
            };
        };
        if list.is_empty() {
            idle.remove(&target);
        }
        found
    }

    /// A new connection to `target`, its HTTP driven by a task of its own.
    async fn connect(self: &Arc<Self>, target: SocketAddr) -> Result<Sender, Error> {
        let conn = TokioIo::new(self.connector.connect(target).await.map_err(Error::Connect)?);
        if self.http2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(conn)
                .await
                .map_err(Error::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%target, error = %e, "upstream HTTP/2 connection ended");
                }
            });
            self.put(target, Sender::Http2(sender.clone()));
            return Ok(Sender::Http2(sender));
        }
        // Bounded as the downstream servers are: an answer's head and each body chunk.
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(crate::http::server::MAX_HEAD as usize)
            .handshake(conn)
            .await
            .map_err(Error::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%target, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(Sender::Http1(sender))
    }

    /// Sends on one connection; an HTTP/1.1 one is lent to the answer's body.
    async fn try_send(
        self: &Arc<Self>,
        target: SocketAddr,
        sender: Sender,
        req: Request<Body>,
    ) -> Result<Response<PooledBody>, Refused> {
        match sender {
            Sender::Http2(mut s) => match s.try_send_request(req).await {
                Ok(resp) => Ok(resp.map(|body| PooledBody {
                    body,
                    lent: None,
                    admission: None,
                })),
                Err(mut e) => Err(Refused {
                    unsent: e.take_message(),
                    error: e.into_error(),
                }),
            },
            Sender::Http1(mut s) => {
                if let Err(error) = s.ready().await {
                    return Err(Refused {
                        error,
                        unsent: Some(req),
                    });
                }
                match s.try_send_request(req).await {
                    Ok(resp) => Ok(self.lend(target, s, resp)),
                    Err(mut e) => Err(Refused {
                        unsent: e.take_message(),
                        error: e.into_error(),
                    }),
                }
            }
        }
    }

    /// The answer, with its connection to give back when the body ends (at once when it has
    /// none). An upgraded connection belongs to the upgrade.
    fn lend(
        self: &Arc<Self>,
        target: SocketAddr,
        sender: http1::SendRequest<Body>,
        resp: Response<Incoming>,
    ) -> Response<PooledBody> {
        let mut lent = (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Lent {
            pool: self.clone(),
            target,
            sender,
        });
        if resp.body().is_end_stream() {
            if let Some(l) = lent.take() {
                l.give_back();
            }
        }
        resp.map(|body| PooledBody {
            body,
            lent,
            admission: None,
        })
    }

    fn put(self: &Arc<Self>, target: SocketAddr, sender: Sender) {
        let entry = Idle {
            sender,
            since: Instant::now(),
        };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(target).or_default();
        if matches!(entry.sender, Sender::Http2(_)) {
            // One shared connection per endpoint: the newest replaces a closed or racing one.
            list.clear();
        }
        list.push(entry);
        drop(idle);
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Closes connections idle past [`IDLE_TIMEOUT`] (an HTTP/2 one is idle since it was
    /// last handed out).
    fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            list.retain(|e| !e.sender.is_closed() && now.duration_since(e.since) < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.values().map(Vec::len).sum()).unwrap_or(0)
    }
}

async fn sweep(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep(Instant::now());
    }
}

/// An HTTP/1.1 connection lent to the answer it carries.
struct Lent {
    pool: Arc<Pool>,
    target: SocketAddr,
    sender: http1::SendRequest<Body>,
}

impl Lent {
    /// Back to the pool once hyper is ready for the next request on it: at once in the
    /// usual case, else when its connection task gets there (or closes it).
    fn give_back(mut self) {
        if self.sender.is_ready() {
            return self.pool.put(self.target, Sender::Http1(self.sender));
        }
        tokio::spawn(async move {
            if self.sender.ready().await.is_ok() {
                self.pool.put(self.target, Sender::Http1(self.sender));
            }
        });
    }
}

/// An answer's body from the pool: the connection goes back when it ends, and the request's
/// place in its cluster ([`Admission`], when held) is given back then too, so an answer
/// still streaming counts against `http2MaxRequests` and `maxConnections`, as in Envoy.
pub struct PooledBody {
    body: Incoming,
    lent: Option<Lent>,
    admission: Option<Admission>,
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            Some(Err(_)) => {
                self.lent = None;
                self.admission = None;
            }
            None => self.give_back(),
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some(l) = self.lent.take() {
            l.give_back();
        }
        self.admission = None;
    }

    /// Keeps the request's cluster admission until the answer ends (or is dropped).
    pub fn hold(&mut self, admission: Admission) {
        if !self.body.is_end_stream() {
            self.admission = Some(admission);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Empty, StreamBody};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::connector::test_connector;

    /// A backend counting the connections it accepted: `/big` streams 1 MiB, the rest "ok".
    async fn backend(http2: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let body: Body = if req.uri().path() == "/authority" {
                        let authority = req.uri().authority().map(ToString::to_string).unwrap_or_default();
                        http_body_util::Full::new(Bytes::from(authority))
                            .map_err(|e| match e {})
                            .boxed()
                    } else if req.uri().path() == "/big" {
                        let chunks = (0..256).map(|_| Ok(Frame::data(Bytes::from(vec![b'x'; 4096]))));
                        StreamBody::new(futures_util::stream::iter(chunks)).boxed()
                    } else {
                        http_body_util::Full::new(Bytes::from_static(b"ok"))
                            .map_err(|e| match e {})
                            .boxed()
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                let io = TokioIo::new(tcp);
                tokio::spawn(async move {
                    if http2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get(path: &str) -> Request<Body> {
        let body = Empty::new().map_err(|e| match e {}).boxed();
        let mut req = Request::get(path).body(body).unwrap();
        req.headers_mut().insert(http::header::HOST, "backend".parse().unwrap());
        req
    }

    async fn read(pool: &Arc<Pool>, target: SocketAddr, path: &str) -> Bytes {
        let resp = pool.send(target, get(path)).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn an_http1_connection_is_reused_once_its_answer_is_read() {
        let (addr, accepted) = backend(false).await;
        let pool = Pool::new(test_connector(), false);
        for _ in 0..3 {
            assert_eq!(read(&pool, addr, "/").await, "ok");
            assert_eq!(pool.idle_count(), 1, "given back when the body ended");
        }
        assert_eq!(read(&pool, addr, "/big").await.len(), 1 << 20);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_dropped_half_read_takes_its_connection() {
        let (addr, accepted) = backend(false).await;
        let pool = Pool::new(test_connector(), false);
        let mut body = pool.send(addr, get("/big")).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(read(&pool, addr, "/").await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a second connection");
    }

    #[tokio::test]
    async fn concurrent_http1_requests_get_a_connection_each_and_all_come_back() {
        let (addr, accepted) = backend(false).await;
        let pool = Pool::new(test_connector(), false);
        let resps = futures_util::future::join_all((0..4).map(|_| pool.send(addr, get("/")))).await;
        for r in resps {
            r.unwrap().into_body().collect().await.unwrap();
        }
        assert_eq!((accepted.load(Ordering::SeqCst), pool.idle_count()), (4, 4));
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_replaced_without_failing_the_request() {
        // A backend that closes each connection right after its answer, without saying so
        // (as one whose keep-alive timeout is shorter than ours).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
            }
        });
        let pool = Pool::new(test_connector(), false);
        for _ in 0..5 {
            assert_eq!(read(&pool, addr, "/").await, "ok");
        }
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let (addr, accepted) = backend(true).await;
        let pool = Pool::new(test_connector(), true);
        assert_eq!(read(&pool, addr, "/").await, "ok");
        assert_eq!(
            read(&pool, addr, "/authority").await,
            "backend",
            "the Host, not the endpoint"
        );
        let all = futures_util::future::join_all((0..8).map(|_| read(&pool, addr, "/big"))).await;
        assert!(all.iter().all(|b| b.len() == 1 << 20));
        assert_eq!((accepted.load(Ordering::SeqCst), pool.idle_count()), (1, 1));
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (addr, accepted) = backend(false).await;
        let pool = Pool::new(test_connector(), false);
        read(&pool, addr, "/").await;
        read(&pool, addr, "/").await;
        assert_eq!(pool.idle_count(), 1);
        let later = Instant::now() + IDLE_TIMEOUT;
        assert!(pool.checkout(addr, later).is_none(), "not handed out past the timeout");
        read(&pool, addr, "/").await;
        pool.sweep(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(pool.idle_count(), 0, "swept");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_never_sent() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let pool = Pool::new(test_connector(), false);
        let Err(e) = pool.send(closed, get("/")).await else {
            panic!("a closed port answered");
        };
        assert!(matches!(e, Error::Connect(_)), "{e}");
        assert!(!e.maybe_sent());
    }
}
