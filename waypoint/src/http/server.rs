//! The HTTP server every downstream connection is served by, in both roles (a tunnel's HTTP at
//! a waypoint, a client's TLS or plaintext connection at an ingress gateway), and the bounds
//! on what one connection can make the proxy hold. hyper's defaults differ by version: an
//! HTTP/1.1 request head could fill ~400 KiB of read buffer where HTTP/2 stopped its header
//! list at 16 KiB, and an HTTP/2 client could open 200 streams that each queue 400 KiB of
//! answer. One request-head limit now holds for both versions (Envoy's default is 60 KiB), and
//! the rest is sized so one connection holds at most about
//! `CONNECTION_WINDOW + MAX_STREAMS * (2 * MAX_HEAD + MAX_SEND_BUFFER)` (~20 MiB: a head, the
//! queued answer and one more body chunk read from upstream per stream) however its client
//! behaves, and about 40 KiB when idle (`waypointbench --scale`).
//!
//! A head over the limit is answered 431 on HTTP/1.1 (hyper, then the connection closes) and
//! on HTTP/2 (the h2 crate, per stream); the first is counted as `header_too_large` in
//! `waypoint_rejected_requests_total`.
//!
//! Time is bounded too where the clients are anonymous (the ingress): the connection is
//! watched by [`crate::idle`], which ends one left silent.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

/// A request's head (request line and headers) on HTTP/1.1, its header list on HTTP/2; also
/// the read buffer of an upstream HTTP/1.1 connection (an answer's head, a body chunk).
pub const MAX_HEAD: u32 = 64 * 1024;
/// Concurrent HTTP/2 requests on one connection (nginx allows 128, Go's server 250).
pub const MAX_STREAMS: u32 = 100;
/// Answer bytes HTTP/2 queues per stream ahead of the client's reading; beyond it the answer's
/// body is not read from upstream until the client reads (four 16 KiB frames in flight).
pub const MAX_SEND_BUFFER: u32 = 64 * 1024;
/// Request body bytes an HTTP/2 client may send ahead of the proxy's reading, per connection
/// (and per stream): hyper's default.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The builder for one downstream connection. `header_read_timeout` closes an HTTP/1.1
/// connection whose next request head is not complete in time (slowloris). hyper's timer
/// runs from the end of the previous answer, so it also closes a keep-alive connection left
/// idle that long, as nginx's `keepalive_timeout` does: right for an ingress gateway facing
/// anonymous clients, not for a waypoint, whose mesh clients keep pooled connections idle for
/// minutes and are bounded per identity instead (`--max-streams-per-peer`).
pub fn builder(header_read_timeout: Option<Duration>) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    let mut h1 = b.http1();
    h1.max_buf_size(MAX_HEAD as usize);
    if let Some(t) = header_read_timeout {
        h1.timer(TokioTimer::new()).header_read_timeout(t);
    }
    b.http2()
        .max_header_list_size(MAX_HEAD)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buf_size(MAX_SEND_BUFFER as usize)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_stream_window_size(CONNECTION_WINDOW);
    b
}

/// What a refusal by the server itself (not the pipeline) is counted as. A header timeout is
/// not: hyper reports an idle keep-alive connection's close the same way.
pub fn refusal(e: &hyper::Error) -> Option<&'static str> {
    if e.is_parse_too_large() {
        Some("header_too_large")
    } else if e.is_parse() {
        Some("malformed_http")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::idle::{until_idle, Activity, Watched};

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Serves one in-memory connection with [`builder`], answering 200; returns the client end
    /// and what the connection ended with.
    fn serve() -> (DuplexStream, tokio::task::JoinHandle<Option<&'static str>>) {
        serve_with(None)
    }

    fn serve_with(timeout: Option<Duration>) -> (DuplexStream, tokio::task::JoinHandle<Option<&'static str>>) {
        serve_as(timeout, false)
    }

    /// Answers "ok", `/slow` after three timeouts.
    async fn answer(req: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(TIMEOUT * 3).await;
        }
        Ok(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
    }

    /// As the ingress serves: with the header timeout, and `watched` by [`until_idle`].
    fn serve_as(
        timeout: Option<Duration>,
        watched: bool,
    ) -> (DuplexStream, tokio::task::JoinHandle<Option<&'static str>>) {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let activity = Activity::default();
        let counted = activity.clone();
        let svc = hyper::service::service_fn(move |req| {
            let guard = counted.request();
            async move {
                let r = answer(req).await;
                drop(guard);
                r
            }
        });
        let task = tokio::spawn(async move {
            let b = builder(timeout);
            let conn = b.serve_connection_with_upgrades(TokioIo::new(Watched::new(server, activity.clone())), svc);
            tokio::pin!(conn);
            let r = match watched {
                true => until_idle(conn.as_mut(), &activity, TIMEOUT, |c| c.graceful_shutdown()).await,
                false => Some(conn.await),
            };
            r.and_then(Result::err)
                .and_then(|e| e.downcast::<hyper::Error>().ok())
                .and_then(|e| refusal(&e))
        });
        (client, task)
    }

    fn head(header_bytes: usize) -> Vec<u8> {
        let mut h = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: ".to_vec();
        h.resize(h.len() + header_bytes, b'x');
        h.extend_from_slice(b"\r\n\r\n");
        h
    }

    async fn status_line(c: &mut DuplexStream) -> String {
        let mut buf = vec![0; 64 * 1024];
        let n = c.read(&mut buf).await.unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[tokio::test]
    async fn an_http1_head_over_the_limit_gets_431_and_one_under_it_200() {
        let (mut c, _task) = serve();
        c.write_all(&head(MAX_HEAD as usize - 1024)).await.unwrap();
        assert_eq!(status_line(&mut c).await, "HTTP/1.1 200 OK");

        let (mut c, task) = serve();
        c.write_all(&head(MAX_HEAD as usize)).await.unwrap();
        assert_eq!(
            status_line(&mut c).await,
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        assert_eq!(task.await.unwrap(), Some("header_too_large"));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_an_idle_connection_stays() {
        let (mut c, _task) = serve();
        c.write_all(&head(10)).await.unwrap();
        assert_eq!(status_line(&mut c).await, "HTTP/1.1 200 OK");
        tokio::time::sleep(TIMEOUT * 30).await;
        c.write_all(&head(10)).await.unwrap();
        assert_eq!(status_line(&mut c).await, "HTTP/1.1 200 OK");
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_timeout_an_unfinished_head_and_an_idle_connection_are_closed() {
        let (mut c, task) = serve_with(Some(TIMEOUT));
        c.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n").await.unwrap();
        tokio::time::sleep(TIMEOUT - Duration::from_secs(1)).await;
        assert!(!task.is_finished(), "closed before its timeout");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(task.is_finished(), "an unfinished head outlived its timeout");
        assert_eq!(task.await.unwrap(), None, "not counted");

        let (mut c, task) = serve_with(Some(TIMEOUT));
        c.write_all(&head(10)).await.unwrap();
        assert_eq!(status_line(&mut c).await, "HTTP/1.1 200 OK");
        tokio::time::sleep(TIMEOUT - Duration::from_secs(1)).await;
        assert!(!task.is_finished(), "closed before its timeout");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(task.is_finished(), "an idle connection outlived the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_and_an_idle_http2_connection_are_closed_a_slow_answer_is_not() {
        let (_silent, task) = serve_as(Some(TIMEOUT), true);
        tokio::time::sleep(TIMEOUT * 2 + Duration::from_secs(1)).await;
        assert!(task.is_finished(), "a client that never sent a byte is still held");

        let (c, task) = serve_as(Some(TIMEOUT), true);
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(c))
            .await
            .unwrap();
        let client = tokio::spawn(conn);
        let slow = hyper::Request::get("http://a/slow")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(slow).await.unwrap();
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "ok",
            "cut while in flight"
        );
        assert!(!task.is_finished());
        tokio::time::sleep(TIMEOUT * 2 + Duration::from_secs(1)).await;
        assert!(task.is_finished(), "an idle HTTP/2 connection is still held");
        assert!(client.await.unwrap().is_ok(), "closed with GOAWAY, not reset");
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_client_that_never_answers_the_goaway_ping_is_dropped() {
        let (mut raw, task) = serve_as(Some(TIMEOUT), true);
        // The preface and an empty SETTINGS frame; then nothing is read or answered.
        raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        tokio::time::sleep(TIMEOUT * 5).await;
        assert!(task.is_finished(), "held after its GOAWAY went unanswered");
    }

    async fn h2_client(c: DuplexStream) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(c))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    fn h2_get(header_bytes: usize) -> hyper::Request<Empty<Bytes>> {
        hyper::Request::builder()
            .uri("http://a/")
            .header("x-big", "x".repeat(header_bytes))
            .body(Empty::new())
            .unwrap()
    }

    #[tokio::test]
    async fn http2_takes_the_same_head_limit_and_announces_its_bounds() {
        let (c, _task) = serve();
        let mut raw = c;
        // The server's SETTINGS frame comes right after the client's preface.
        raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut frame = [0u8; 9];
        raw.read_exact(&mut frame).await.unwrap();
        assert_eq!(frame[3], 4, "a SETTINGS frame");
        let mut payload = vec![0; usize::from(frame[2]) | usize::from(frame[1]) << 8];
        raw.read_exact(&mut payload).await.unwrap();
        let settings: Vec<(u16, u32)> = payload
            .chunks(6)
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect();
        assert!(settings.contains(&(0x3, MAX_STREAMS)), "{settings:?}");
        assert!(settings.contains(&(0x4, CONNECTION_WINDOW)), "{settings:?}");
        assert!(settings.contains(&(0x6, MAX_HEAD)), "{settings:?}");

        let (c, _task) = serve();
        let mut send = h2_client(c).await;
        let ok = send.send_request(h2_get(MAX_HEAD as usize - 1024)).await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.into_body().collect().await.unwrap().to_bytes(), "ok");
        let refused = send.send_request(h2_get(MAX_HEAD as usize)).await;
        assert!(
            refused.as_ref().is_err() || refused.as_ref().is_ok_and(|r| r.status() == 431),
            "{refused:?}"
        );
    }
}
