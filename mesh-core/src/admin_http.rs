//! Plain HTTP/1.1 for the small admin, metrics and readiness endpoints every binary serves:
//! one accept loop, each connection on its own task, until `stop` is cancelled.
//!
//! These ports are reachable by every pod that can reach the binary's pod (metrics and
//! readiness bind all addresses), so what a client can make them hold is bounded ([`Bounds`]):
//! connections per source address and in all, per listener (a flood of the metrics port
//! cannot starve readiness probes); a request head must arrive within a few seconds and fit
//! in 16 KiB (hyper's defaults are no timeout without a timer, and 400 KiB); a connection
//! lives a few minutes at most, then closes once its current answer is sent. Refused
//! connections are counted in `<binary>_admin_connections_refused_total{reason}` once the
//! binary [`register`]s it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::hbone::{Limit, LimitConfig, ServerLimits};

/// What one admin listener lets clients hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Open connections from one source address.
    pub per_source: u32,
    /// Open connections, all sources together.
    pub total: u32,
    /// How long a request head may take to arrive (from the connection's start, or the end
    /// of the previous answer).
    pub header_read_timeout: Duration,
    /// The most a request head may take (hyper's minimum is 8 KiB).
    pub max_head_bytes: usize,
    /// How long a connection is kept; then it closes after its current answer.
    pub max_age: Duration,
}

impl Default for Bounds {
    /// A scraper or a probe holds one or two connections; a browser on the admin port a few.
    fn default() -> Self {
        Bounds {
            per_source: 32,
            total: 512,
            header_read_timeout: Duration::from_secs(5),
            max_head_bytes: 16 * 1024,
            max_age: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The process's refusals, whichever listener refused.
static REFUSED: LazyLock<Family<ReasonLabels, Counter>> = LazyLock::new(Family::default);

/// Registers the refusals as `name` (e.g. `ztunnel_admin_connections_refused`; `_total` is
/// added) with label `reason` (`pending_per_source_limit`, `pending_connections_limit`).
pub fn register(registry: &mut Registry, name: &str) {
    registry.register(
        name,
        "Connections to the admin, metrics and readiness ports closed at once because a bound was full",
        REFUSED.clone(),
    );
}

/// Connections refused for `reason` so far.
pub fn refused(reason: &'static str) -> u64 {
    REFUSED.get_or_create(&ReasonLabels { reason }).get()
}

/// Serves `handle` on `listener` until `stop` is cancelled.
pub async fn serve<F, Fut>(listener: TcpListener, stop: CancellationToken, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve_within(listener, stop, handle, Bounds::default()).await
}

/// [`serve`] with explicit bounds.
pub async fn serve_within<F, Fut>(listener: TcpListener, stop: CancellationToken, handle: F, bounds: Bounds)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let observer = Arc::new(|limit: Limit| {
        REFUSED.get_or_create(&ReasonLabels { reason: limit.as_str() }).inc();
    });
    let config = LimitConfig {
        max_pending: bounds.total,
        max_pending_per_source: bounds.per_source,
        ..LimitConfig::default()
    };
    let limits = Arc::new(ServerLimits::new(config, Some(observer)));
    let mut backoff = crate::socket::AcceptBackoff::default();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.succeeded();
                    a
                }
                Err(e) => {
                    backoff.failed("admin", &e).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        // Over a bound: closed at once (dropping the socket), counted by the observer.
        let Ok(slot) = limits.admit(peer.ip()) else { continue };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(tcp, handle, bounds).await;
        });
    }
}

/// One connection, within `bounds`.
async fn serve_connection<F, Fut>(tcp: tokio::net::TcpStream, handle: F, bounds: Bounds)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let response = handle(req);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_read_timeout)
        .max_buf_size(bounds.max_head_bytes)
        .serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(bounds.max_age) => {}
    }
    conn.as_mut().graceful_shutdown();
    // The answer under way gets as long as a head does; then the connection goes.
    let _ = tokio::time::timeout(bounds.header_read_timeout, conn).await;
}

/// [`serve`] for the life of the process.
pub async fn serve_forever<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    serve(listener, CancellationToken::new(), handle).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    const SHORT: Bounds = Bounds {
        per_source: 3,
        total: 5,
        header_read_timeout: Duration::from_secs(5),
        max_head_bytes: 8 * 1024,
        max_age: Duration::from_secs(60),
    };

    async fn server(bounds: Bounds) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let handle = |_req: Request<Incoming>| async { Response::new(Full::new(Bytes::from_static(b"ok"))) };
        tokio::spawn(serve_within(listener, stop.clone(), handle, bounds));
        (addr, stop)
    }

    /// Reads until the peer closes (within ten minutes, paused or not); what it sent.
    async fn until_closed(c: &mut TcpStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(600), c.read_to_end(&mut got))
            .await
            .expect("the connection is still open")
            .ok();
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn get(c: &mut TcpStream) -> String {
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = [0; 256];
        let n = c.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn connections_are_bounded_per_source_and_counted() {
        let (addr, stop) = server(SHORT).await;
        let before = refused("pending_per_source_limit");
        let mut held = Vec::new();
        for _ in 0..SHORT.per_source {
            let mut c = TcpStream::connect(addr).await.unwrap();
            assert!(get(&mut c).await.starts_with("HTTP/1.1 200"));
            held.push(c);
        }
        let mut over = TcpStream::connect(addr).await.unwrap();
        assert_eq!(until_closed(&mut over).await, "", "closed unanswered");
        assert_eq!(refused("pending_per_source_limit"), before + 1);
        // A slot given back is used again (once the closed connection's task has ended).
        drop(held.pop());
        let mut answered = false;
        for _ in 0..1000 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let _ = c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let mut buf = [0; 64];
            if matches!(c.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"HTTP/1.1 200")) {
                answered = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(answered, "the freed slot was never used again");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_or_slow_client_is_closed_at_the_header_timeout() {
        let (addr, stop) = server(SHORT).await;
        let started = tokio::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert_eq!(until_closed(&mut silent).await, "");
        let waited = started.elapsed();
        assert!(
            waited >= SHORT.header_read_timeout && waited < SHORT.header_read_timeout * 2,
            "{waited:?}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let (addr, stop) = server(SHORT).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let head = format!("GET / HTTP/1.1\r\nx-pad: {}\r\n\r\n", "a".repeat(64 * 1024));
        let _ = c.write_all(head.as_bytes()).await;
        let answer = until_closed(&mut c).await;
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_is_closed_at_its_age() {
        let (addr, stop) = server(Bounds {
            header_read_timeout: Duration::from_secs(600),
            ..SHORT
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut c).await.starts_with("HTTP/1.1 200"));
        let started = tokio::time::Instant::now();
        assert_eq!(until_closed(&mut c).await, "");
        assert!(started.elapsed() <= SHORT.max_age, "{:?}", started.elapsed());
        stop.cancel();
    }
}
