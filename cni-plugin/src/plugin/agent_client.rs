//! A tiny synchronous HTTP/1.1 client for the node agent's unix socket.
//!
//! The plugin is a short-lived process that makes one request, so this is deliberately
//! minimal: one request per connection (`Connection: close`), a single deadline covering
//! connect, write and read, and responses framed by `Content-Length`, chunked encoding or EOF.

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Responses bigger than this are refused (the agent answers with tiny JSON documents).
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// While the agent's accept backlog is full, retry the connect this often.
const CONNECT_RETRY: Duration = Duration::from_millis(2);

/// Why a request to the agent did not produce an HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentError {
    /// The socket is missing, refuses connections, or the connection broke.
    Unreachable(String),
    /// The deadline passed before a complete response arrived.
    Timeout(String),
    /// The agent answered something that is not HTTP/1.x.
    Protocol(String),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Unreachable(m) => write!(f, "unreachable: {m}"),
            AgentError::Timeout(m) => write!(f, "timed out: {m}"),
            AgentError::Protocol(m) => write!(f, "bad response: {m}"),
        }
    }
}

/// An HTTP response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The node agent's HTTP API on a unix socket.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        AgentClient {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<Response, AgentError> {
        let body = serde_json::to_vec(body).map_err(|e| AgentError::Protocol(format!("encoding request: {e}")))?;
        self.request("POST", path, Some(&body))
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Response, AgentError> {
        self.request("GET", path, None)
    }

    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, AgentError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = connect(&self.socket, deadline)?;

        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: ambient-agent\r\nUser-Agent: ambient-cni/{}\r\nAccept: \
             application/json\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes();
        if let Some(body) = body {
            req.extend_from_slice(
                format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()).as_bytes(),
            );
        }
        req.extend_from_slice(b"\r\n");
        if let Some(body) = body {
            req.extend_from_slice(body);
        }

        stream
            .set_write_timeout(Some(remaining(deadline, "sending the request")?))
            .map_err(|e| AgentError::Unreachable(format!("configuring socket: {e}")))?;
        stream.write_all(&req).map_err(|e| io_error(e, "sending the request"))?;

        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(resp) = parse_response(&buf, false)? {
                return Ok(resp);
            }
            stream
                .set_read_timeout(Some(remaining(deadline, "waiting for the response")?))
                .map_err(|e| AgentError::Unreachable(format!("configuring socket: {e}")))?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e, "reading the response")),
            };
            if n == 0 {
                return match parse_response(&buf, true)? {
                    Some(resp) => Ok(resp),
                    None if buf.is_empty() => Err(AgentError::Unreachable(
                        "the agent closed the connection without answering".to_string(),
                    )),
                    None => Err(AgentError::Protocol(
                        "connection closed in the middle of the response".to_string(),
                    )),
                };
            }
            if buf.len() + n > MAX_RESPONSE_BYTES {
                return Err(AgentError::Protocol(format!(
                    "response larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn remaining(deadline: Instant, what: &str) -> Result<Duration, AgentError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(AgentError::Timeout(what.to_string()))
    } else {
        Ok(left)
    }
}

fn io_error(e: io::Error, what: &str) -> AgentError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AgentError::Timeout(what.to_string()),
        _ => AgentError::Unreachable(format!("{what}: {e}")),
    }
}

/// Connect without ever blocking past `deadline`: a non-blocking unix connect fails with
/// EAGAIN when the listener's backlog is full (a hung agent), so retry until the deadline.
fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, AgentError> {
    let shown = path.display();
    let addr = UnixAddr::new(path).map_err(|e| AgentError::Unreachable(format!("bad socket path {shown}: {e}")))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| AgentError::Unreachable(format!("creating a unix socket: {e}")))?;
    loop {
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => {
                if Instant::now() >= deadline {
                    return Err(AgentError::Timeout(format!("connecting to {shown} (backlog full)")));
                }
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => return Err(AgentError::Unreachable(format!("connect: {}", e.desc()))),
        }
    }
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|e| AgentError::Unreachable(format!("configuring socket: {e}")))?;
    Ok(stream)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parse a complete response from `buf`: `Ok(None)` while more bytes are needed. `eof` says
/// the peer closed the connection (which completes a body without framing).
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, AgentError> {
    let mut start = 0;
    loop {
        let rest = &buf[start..];
        let Some(head_len) = find(rest, b"\r\n\r\n") else {
            if rest.len() > 64 * 1024 {
                return Err(AgentError::Protocol("response headers too long".to_string()));
            }
            return Ok(None);
        };
        let head = std::str::from_utf8(&rest[..head_len])
            .map_err(|_| AgentError::Protocol("response headers are not UTF-8".to_string()))?;
        let body = &rest[head_len + 4..];
        let Head {
            status,
            content_length,
            chunked,
        } = parse_head(head)?;

        // Interim responses (100 Continue, ...) carry no body: skip them.
        if (100..200).contains(&status) {
            start += head_len + 4;
            continue;
        }
        // 204 and 304 never have a body.
        if status == 204 || status == 304 {
            return Ok(Some(Response {
                status,
                body: Vec::new(),
            }));
        }
        if chunked {
            return match decode_chunked(body)? {
                Some(body) => Ok(Some(Response { status, body })),
                None if eof => Err(AgentError::Protocol(
                    "connection closed inside a chunked body".to_string(),
                )),
                None => Ok(None),
            };
        }
        if let Some(len) = content_length {
            if body.len() >= len {
                return Ok(Some(Response {
                    status,
                    body: body[..len].to_vec(),
                }));
            }
            if eof {
                return Err(AgentError::Protocol(format!(
                    "connection closed after {} of {len} body bytes",
                    body.len()
                )));
            }
            return Ok(None);
        }
        // No framing: the body runs to the end of the connection.
        return Ok(eof.then(|| Response {
            status,
            body: body.to_vec(),
        }));
    }
}

/// What a response head says: its status and how its body is framed.
struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
}

/// The status line and the framing headers of a response head (without its blank line).
fn parse_head(head: &str) -> Result<Head, AgentError> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(AgentError::Protocol(format!(
            "not an HTTP/1.x status line: {status_line:?}"
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| AgentError::Protocol(format!("bad status line: {status_line:?}")))?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(AgentError::Protocol(format!("bad header line: {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse()
                    .map_err(|_| AgentError::Protocol(format!("bad Content-Length: {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().split(',').any(|t| t.trim() == "chunked");
        }
    }
    Ok(Head {
        status,
        content_length,
        chunked,
    })
}

/// Decode a chunked body: `Ok(None)` while incomplete.
fn decode_chunked(mut data: &[u8]) -> Result<Option<Vec<u8>>, AgentError> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&data[..line_end])
            .map_err(|_| AgentError::Protocol("bad chunk size line".to_string()))?;
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| AgentError::Protocol(format!("bad chunk size {size_str:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = find(data, b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(out));
                }
                data = &data[end + 2..];
            }
        }
        if size > MAX_RESPONSE_BYTES {
            return Err(AgentError::Protocol(format!("chunk of {size} bytes is too large")));
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        if &data[size..size + 2] != b"\r\n" {
            return Err(AgentError::Protocol("chunk not terminated by CRLF".to_string()));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 17\r\n\r\n{\"captured\":true}";
        assert_eq!(parse_response(&raw[..raw.len() - 1], false).unwrap(), None);
        let resp = parse_response(raw, false).unwrap().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"{\"captured\":true}");
    }

    #[test]
    fn chunked_and_interim() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\n{\"er\r\n5\r\nror\":\r\n5\r\n\"x\"}\n\r\n0\r\n\r\n";
        let resp = parse_response(raw, false).unwrap().unwrap();
        assert_eq!(resp.status, 500);
        assert_eq!(resp.body, b"{\"error\":\"x\"}\n");
        assert_eq!(parse_response(&raw[..raw.len() - 2], false).unwrap(), None);
        assert!(parse_response(&raw[..raw.len() - 2], true).is_err());
    }

    #[test]
    fn eof_framing_and_garbage() {
        let raw = b"HTTP/1.0 404 Not Found\r\n\r\nnope";
        assert_eq!(parse_response(raw, false).unwrap(), None);
        assert_eq!(parse_response(raw, true).unwrap().unwrap().body, b"nope");
        assert!(matches!(
            parse_response(b"SSH-2.0-x\r\n\r\n", false),
            Err(AgentError::Protocol(_))
        ));
        let no_body = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse_response(no_body, false).unwrap().unwrap().status, 204);
    }

    #[test]
    fn missing_socket_is_unreachable() {
        let client = AgentClient::new("/nonexistent/ambient/cni.sock", Duration::from_millis(200));
        assert!(matches!(client.get("/v1/ready"), Err(AgentError::Unreachable(_))));
    }
}
