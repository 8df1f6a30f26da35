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

/// An HTTP/1.1 server with keep-alive named `name`, for routing tests: the body is `<name>`
/// on the first line, then one `h <header>: <value>` line per request header; the answer
/// carries `x-served-by: <name>`. `/status/<code>` answers with that status.
pub async fn named_server(listener: TcpListener, name: &'static str) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                let mut body = format!("{name}\n");
                for (k, v) in req.headers() {
                    body.push_str(&format!("h {k}: {}\n", v.to_str().unwrap_or("?")));
                }
                let status = req
                    .uri()
                    .path()
                    .strip_prefix("/status/")
                    .and_then(|c| c.parse::<u16>().ok())
                    .unwrap_or(200);
                hyper::Response::builder()
                    .status(status)
                    .header("x-served-by", name)
                    .body(Full::new(Bytes::from(body)))
            });
            let io = hyper_util::rt::TokioIo::new(s);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
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
        tokio::spawn(conn);
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
}
