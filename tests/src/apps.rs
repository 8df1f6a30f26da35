//! Sample applications for the test bed: an HTTP server and an echo server that both report
//! the peer address they saw, so tests can check source-address preservation.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::Netns;

/// An HTTP server that answers every request with the peer address it saw.
pub async fn http_server(listener: TcpListener) {
    while let Ok((mut s, peer)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("peer={}\n", peer.ip());
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Writes "peer=<ip>\n" on accept, then echoes until EOF.
pub async fn echo_server(listener: TcpListener) {
    while let Ok((mut s, peer)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = s.write_all(format!("peer={}\n", peer.ip()).as_bytes()).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// A connection to the echo server: returns the peer line and the stream.
pub async fn echo_connect(ns: &Netns, dst: SocketAddr) -> std::io::Result<(String, BufReader<tokio::net::TcpStream>)> {
    let s = ns.connect(dst).await?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .map_err(std::io::Error::other)??;
    if n == 0 {
        // The local ztunnel accepted, then closed: the tunnel was refused.
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "closed before the app answered",
        ));
    }
    Ok((line.trim().to_owned(), r))
}

pub async fn ping(conn: &mut BufReader<tokio::net::TcpStream>, msg: &str) -> std::io::Result<String> {
    conn.get_mut().write_all(format!("{msg}\n").as_bytes()).await?;
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut line))
        .await
        .map_err(std::io::Error::other)??;
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(line.trim().to_owned())
}

/// Resolves `name` (type A) with one UDP query sent from `ns` to `server` port 53, the way a
/// pod's stub resolver would; returns the addresses answered (empty for NXDOMAIN/NODATA).
pub fn resolve_a(ns: &Netns, server: std::net::IpAddr, name: &str) -> std::io::Result<Vec<std::net::Ipv4Addr>> {
    use std::io::{Error, ErrorKind};
    let bad = |what: &str| Error::new(ErrorKind::InvalidData, format!("DNS reply: {what}"));
    let socket = ns.enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    let id: u16 = 0x5a17;
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).map_err(|_| bad("label too long"))?);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    socket.send_to(&q, SocketAddr::new(server, 53))?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    let r = &buf[..n];
    if n < 12 || r[..2] != id.to_be_bytes() {
        return Err(bad("short or wrong id"));
    }
    let answers = u16::from_be_bytes([r[6], r[7]]);
    // Skip the echoed question: the same bytes we sent after the header.
    let mut at = q.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        // Name: a compression pointer (2 bytes) or labels.
        while at < n && r[at] != 0 && r[at] & 0xc0 != 0xc0 {
            at += usize::from(r[at]) + 1;
        }
        at += if at < n && r[at] & 0xc0 == 0xc0 { 2 } else { 1 };
        let fixed = r.get(at..at + 10).ok_or_else(|| bad("truncated record"))?;
        let (kind, len) = (
            u16::from_be_bytes([fixed[0], fixed[1]]),
            usize::from(u16::from_be_bytes([fixed[8], fixed[9]])),
        );
        at += 10;
        let data = r.get(at..at + len).ok_or_else(|| bad("truncated data"))?;
        if kind == 1 && len == 4 {
            out.push(std::net::Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += len;
    }
    Ok(out)
}

/// A client opening a new connection to an echo server every `interval` until stopped, each
/// one reading the peer line and echoing a message: the load under which upgrades must not
/// fail a single connection.
pub struct LoadClient {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LoadClient {
    /// Starts connecting from namespace `ns` (by name) to `dst`.
    pub fn start(ns: String, dst: SocketAddr, interval: Duration) -> LoadClient {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let started = std::time::Instant::now();
                let result = async {
                    let sock = crate::netns::socket_in(&ns, dst)?;
                    let mut r = BufReader::new(sock.connect(dst).await?);
                    let mut line = String::new();
                    let n = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
                        .await
                        .map_err(std::io::Error::other)??;
                    if n == 0 {
                        return Err(std::io::Error::other("closed before the app answered"));
                    }
                    ping(&mut r, "x").await.map(|_| ())
                }
                .await;
                match result {
                    Ok(()) => o.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("load client: connection failed: {e}");
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
            }
        });
        LoadClient { stop, ok, failed, task }
    }

    /// Stops and returns (succeeded, failed) connections.
    pub async fn finish(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// Requests served per server name (mirrors are counted here too).
static SERVED: std::sync::Mutex<Option<std::collections::HashMap<String, usize>>> = std::sync::Mutex::new(None);
/// Per-key counters of `/fail/<n>/<key>`.
static FAILS: std::sync::Mutex<Option<std::collections::HashMap<String, u32>>> = std::sync::Mutex::new(None);

/// Connections accepted per server name.
static ACCEPTED: std::sync::Mutex<Option<std::collections::HashMap<String, usize>>> = std::sync::Mutex::new(None);

/// How many connections the named server accepted so far.
pub fn accepted(name: &str) -> usize {
    let map = ACCEPTED.lock().unwrap_or_else(|e| e.into_inner());
    map.as_ref().and_then(|m| m.get(name).copied()).unwrap_or(0)
}

fn count_accept(name: &str) {
    let mut map = ACCEPTED.lock().unwrap_or_else(|e| e.into_inner());
    *map.get_or_insert_with(Default::default)
        .entry(name.to_owned())
        .or_insert(0) += 1;
}

/// Writes its name on accept, then echoes until EOF (a server-first TCP protocol).
pub async fn named_echo_server(listener: TcpListener, name: &'static str) {
    while let Ok((mut s, _)) = listener.accept().await {
        count_accept(name);
        tokio::spawn(async move {
            let _ = s.write_all(format!("{name}\n").as_bytes()).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

/// How many requests the named server answered so far.
pub fn served(name: &str) -> usize {
    let map = SERVED.lock().unwrap_or_else(|e| e.into_inner());
    map.as_ref().and_then(|m| m.get(name).copied()).unwrap_or(0)
}

/// What a [`named_server`] answers for a path: `/status/<code>`, `/fail/<n>/<key>` (503 for
/// the first n requests with that key, then 200), `/delay/<ms>`, anything else 200; a server
/// whose name contains `broken` answers 500 to everything.
async fn behaviour(name: &str, path: &str) -> u16 {
    if name.contains("broken") {
        return 500;
    }
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("status"), Some(code), _) => code.parse().unwrap_or(400),
        (Some("fail"), Some(n), Some(key)) => {
            let n: u32 = n.parse().unwrap_or(0);
            let mut map = FAILS.lock().unwrap_or_else(|e| e.into_inner());
            let count = map
                .get_or_insert_with(Default::default)
                .entry(key.to_owned())
                .or_insert(0);
            *count += 1;
            if *count <= n {
                503
            } else {
                200
            }
        }
        (Some("delay"), Some(ms), _) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            200
        }
        _ => 200,
    }
}

/// An HTTP/1.1 server with keep-alive named `name`, for routing tests: the body is `<name>`
/// on the first line, `path <method> <path>` on the second, then one `h <header>: <value>`
/// line per request header; the answer carries `x-served-by: <name>`. See [`behaviour`] for
/// the paths that fail or wait. WebSocket-style upgrades (`Upgrade` header) are answered
/// with 101 and the upgraded stream is echoed.
pub async fn named_server(listener: TcpListener, name: &'static str) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    while let Ok((s, _)) = listener.accept().await {
        count_accept(name);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| async move {
                {
                    let mut map = SERVED.lock().unwrap_or_else(|e| e.into_inner());
                    *map.get_or_insert_with(Default::default)
                        .entry(name.to_owned())
                        .or_insert(0) += 1;
                }
                if req.headers().contains_key(hyper::header::UPGRADE) {
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = upgrade.await {
                            let (mut r, mut w) = tokio::io::split(hyper_util::rt::TokioIo::new(up));
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                    return hyper::Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "websocket")
                        .body(Full::new(Bytes::new()));
                }
                let mut body = format!("{name}\npath {} {}\n", req.method(), req.uri());
                for (k, v) in req.headers() {
                    body.push_str(&format!("h {k}: {}\n", v.to_str().unwrap_or("?")));
                }
                let status = behaviour(name, req.uri().path()).await;
                hyper::Response::builder()
                    .status(status)
                    .header("x-served-by", name)
                    .body(Full::new(Bytes::from(body)))
            });
            let io = hyper_util::rt::TokioIo::new(s);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .with_upgrades()
                .await;
        });
    }
}

/// A keep-alive HTTP/1.1 connection from inside a namespace.
pub struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>,
    host: String,
}

/// One answer: status, headers and body text.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl HttpConn {
    pub async fn open(ns: &Netns, addr: SocketAddr, host: &str) -> anyhow::Result<HttpConn> {
        let tcp = ns.connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn.with_upgrades());
        Ok(HttpConn {
            sender,
            host: host.to_owned(),
        })
    }

    pub async fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
        use http_body_util::BodyExt;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(http_body_util::Full::new(hyper::body::Bytes::new()))?;
        self.sender.ready().await?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req)).await??;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// A WebSocket-style upgrade of this connection: sends `message` on the upgraded stream
    /// and returns what came back (the test server echoes).
    pub async fn upgrade_echo(mut self, path: &str, message: &[u8]) -> anyhow::Result<Vec<u8>> {
        let req = hyper::Request::builder()
            .uri(path)
            .header("host", &self.host)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(http_body_util::Full::new(hyper::body::Bytes::new()))?;
        self.sender.ready().await?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req)).await??;
        anyhow::ensure!(resp.status() == 101, "upgrade answered {}", resp.status());
        let up = hyper::upgrade::on(resp).await?;
        let mut io = hyper_util::rt::TokioIo::new(up);
        io.write_all(message).await?;
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut back)).await??;
        Ok(back)
    }
}

/// A Zipkin-compatible collector: every POST (path, body) is handed to the returned channel
/// and answered 202, as Zipkin does.
pub fn span_collector(listener: TcpListener) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
    use http_body_util::{BodyExt, Full};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let _ = tx.send((path, String::from_utf8_lossy(&body).into_owned()));
                        hyper::Response::builder()
                            .status(202)
                            .body(Full::new(hyper::body::Bytes::new()))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(s);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    rx
}

/// Answers every request with `body` as JSON (a JWKS endpoint, say).
pub async fn json_server(listener: TcpListener, body: String) {
    use http_body_util::Full;
    let body = hyper::body::Bytes::from(body);
    while let Ok((s, _)) = listener.accept().await {
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    hyper::Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(body))
                }
            });
            let io = hyper_util::rt::TokioIo::new(s);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// An HTTP/1.1 server that answers every upgrade request with 101 and `Upgrade: <protocol>`,
/// whatever protocol was asked for, then echoes the upgraded stream; other requests get 200
/// `<name>` and their headers as [`named_server`] lists them. A backend that switches to a
/// protocol the client did not request, for the waypoint's upgrade checks.
pub async fn upgrade_server(listener: TcpListener, name: &'static str, protocol: &'static str) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    while let Ok((s, _)) = listener.accept().await {
        count_accept(name);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| async move {
                if !req.headers().contains_key(hyper::header::UPGRADE) {
                    let mut body = format!("{name}\npath {} {}\n", req.method(), req.uri());
                    for (k, v) in req.headers() {
                        body.push_str(&format!("h {k}: {}\n", v.to_str().unwrap_or("?")));
                    }
                    return hyper::Response::builder().body(Full::new(Bytes::from(body)));
                }
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(up) = upgrade.await {
                        let (mut r, mut w) = tokio::io::split(hyper_util::rt::TokioIo::new(up));
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
                hyper::Response::builder()
                    .status(101)
                    .header("connection", "upgrade")
                    .header("upgrade", protocol)
                    .body(Full::new(Bytes::new()))
            });
            let io = hyper_util::rt::TokioIo::new(s);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .with_upgrades()
                .await;
        });
    }
}
