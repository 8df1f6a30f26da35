//! TLS passthrough listeners (`protocol: TLS`, `tls.mode: Passthrough`) with TLSRoutes: the
//! gateway never terminates TLS. It reads the client's ClientHello (at most
//! [`MAX_CLIENT_HELLO`] bytes within [`HELLO_TIMEOUT`], the connection counted as a pending
//! handshake meanwhile), takes its SNI, picks the listener and then the TLSRoute table whose
//! hostname matches it, and forwards the bytes read and everything after them unchanged to
//! the route's backend ([`super::tcp::forward`]: Gateway L4 policy, then HBONE with the
//! gateway's identity to mesh endpoints). The client therefore sees the backend's certificate.
//!
//! What cannot be routed is refused with a TLS alert and counted
//! (`waypoint_rejected_requests_total{reason}`): a malformed hello (`decode_error`), one
//! without SNI or with an SNI no route serves (`unrecognized_name`), one larger than the bound
//! or slower than the deadline (closed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::tcp::Inbound;
use super::Ingress;
use crate::Waypoint;

/// The most a ClientHello may take, record headers included (browsers send under 2 KiB, and a
/// post-quantum key share under 4 KiB).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// How long a client may take to send its ClientHello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest TLS plaintext record (RFC 8446 5.1).
const MAX_RECORD: usize = 16 * 1024;
const HANDSHAKE_RECORD: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME_EXTENSION: u16 = 0;
const HOST_NAME: u8 = 0;
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_UNRECOGNIZED_NAME: u8 = 112;

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The ClientHello is not complete yet.
    Incomplete,
    /// A complete ClientHello and its SNI, lowercase (`None`: the client sent none).
    Complete(Option<String>),
}

/// Why a ClientHello is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("connection closed before the ClientHello was complete")]
    Closed,
    #[error("no ClientHello within {HELLO_TIMEOUT:?}")]
    Timeout,
    #[error("ClientHello without SNI")]
    NoSni,
    #[error("no listener or TLSRoute serves SNI {0:?}")]
    UnknownSni(String),
    #[error("reading: {0}")]
    Io(String),
}

impl HelloError {
    /// The `reason` label it is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::Malformed(_) => "tls_client_hello_malformed",
            HelloError::TooLarge => "tls_client_hello_too_large",
            HelloError::Closed | HelloError::Io(_) => "tls_client_hello_truncated",
            HelloError::Timeout => "tls_client_hello_timeout",
            HelloError::NoSni => "tls_no_sni",
            HelloError::UnknownSni(_) => "tls_unknown_sni",
        }
    }

    /// The fatal alert the client gets, if any (a slow or vanished client gets none).
    fn alert(&self) -> Option<u8> {
        match self {
            HelloError::Malformed(_) => Some(ALERT_DECODE_ERROR),
            HelloError::NoSni | HelloError::UnknownSni(_) => Some(ALERT_UNRECOGNIZED_NAME),
            _ => None,
        }
    }
}

/// A cursor over bytes that fails instead of reading past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed("a length runs past its container"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HelloError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HelloError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize) -> Result<Reader<'a>, HelloError> {
        let len = match width {
            1 => usize::from(self.u8()?),
            _ => usize::from(self.u16()?),
        };
        Ok(Reader(self.take(len)?))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses the start of a TLS connection: handshake records (the ClientHello may span several)
/// until the ClientHello is complete.
pub fn parse(buf: &[u8]) -> Result<Parsed, HelloError> {
    let mut handshake = Vec::new();
    let mut records = Reader(buf);
    loop {
        if records.0.len() < 5 {
            return Ok(Parsed::Incomplete);
        }
        let header = &records.0[..5];
        if header[0] != HANDSHAKE_RECORD || header[1] != 3 {
            return Err(HelloError::Malformed("not a TLS handshake record"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(HelloError::Malformed("record length out of range"));
        }
        if records.0.len() < 5 + len {
            return Ok(Parsed::Incomplete);
        }
        records.take(5)?;
        handshake.extend_from_slice(records.take(len)?);
        if handshake.len() < 4 {
            continue;
        }
        if handshake[0] != CLIENT_HELLO {
            return Err(HelloError::Malformed(
                "the first handshake message is not a ClientHello",
            ));
        }
        let body_len = usize::from(handshake[1]) << 16 | usize::from(handshake[2]) << 8 | usize::from(handshake[3]);
        if body_len > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
        if let Some(body) = handshake.get(4..4 + body_len) {
            return server_name(body).map(Parsed::Complete);
        }
    }
}

/// The SNI of a ClientHello body (RFC 8446 4.1.2, RFC 6066 3).
fn server_name(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec(1)?; // legacy_session_id
    r.vec(2)?; // cipher_suites
    r.vec(1)?; // legacy_compression_methods
    if r.is_empty() {
        return Ok(None); // TLS 1.2 without extensions
    }
    let mut extensions = r.vec(2)?;
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut sni = None;
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec(2)?;
        if kind != SERVER_NAME_EXTENSION {
            continue;
        }
        if sni.is_some() {
            return Err(HelloError::Malformed("two server_name extensions"));
        }
        sni = Some(host_name(data)?);
    }
    Ok(sni)
}

/// The one host_name of a server_name extension, checked to be a DNS name.
fn host_name(mut data: Reader<'_>) -> Result<String, HelloError> {
    let mut list = data.vec(2)?;
    if !data.is_empty() {
        return Err(HelloError::Malformed("bytes after the server name list"));
    }
    let mut name = None;
    while !list.is_empty() {
        let kind = list.u8()?;
        let value = list.vec(2)?;
        if kind != HOST_NAME {
            continue;
        }
        if name.is_some() {
            return Err(HelloError::Malformed("two host names"));
        }
        name = Some(value.0);
    }
    let name = name.ok_or(HelloError::Malformed("server_name without a host name"))?;
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && name
            .split(|b| *b == b'.')
            .all(|label| !label.is_empty() && label.len() <= 63);
    if !valid {
        return Err(HelloError::Malformed("the host name is not a DNS name"));
    }
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// Reads until the ClientHello is complete: everything read (to forward) and its SNI.
pub async fn read_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Vec<u8>, Option<String>), HelloError> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let room = MAX_CLIENT_HELLO - buf.len();
        if room == 0 {
            return Err(HelloError::TooLarge);
        }
        let n = stream
            .read(&mut chunk[..room.min(4096)])
            .await
            .map_err(|e| HelloError::Io(e.to_string()))?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Parsed::Complete(sni) = parse(&buf)? {
            return Ok((buf, sni));
        }
    }
}

/// Serves one connection on a passthrough port; `pending` holds its pending-handshake slot
/// until the ClientHello is read.
pub async fn serve(
    wp: Arc<Waypoint>,
    ingress: Arc<Ingress>,
    mut inbound: Inbound,
    pending: Option<mesh_core::hbone::limits::PendingGuard>,
) {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut inbound.tcp)).await;
    drop(pending);
    let routed = hello.unwrap_or(Err(HelloError::Timeout)).and_then(|(prefix, sni)| {
        let sni = sni.ok_or(HelloError::NoSni)?;
        let table = route_table(&ingress, inbound.port, &sni).ok_or(HelloError::UnknownSni(sni))?;
        Ok((prefix, table))
    });
    match routed {
        Ok((prefix, table)) => super::tcp::forward(wp, ingress, inbound, &table, prefix).await,
        Err(e) => refuse(&wp, inbound.tcp, inbound.peer, e).await,
    }
}

/// The TLSRoute table for `sni` on `port`: the listener whose hostname matches, then its most
/// specific host.
fn route_table(ingress: &Ingress, port: u16, sni: &str) -> Option<String> {
    let state = ingress.current.load();
    let listener = state.ports.get(&port)?.listener(sni)?;
    listener.table(sni).map(str::to_owned)
}

async fn refuse(wp: &Waypoint, mut tcp: TcpStream, peer: SocketAddr, e: HelloError) {
    wp.metrics.reject(e.reason());
    debug!(%peer, error = %e, "TLS passthrough connection refused");
    if let Some(alert) = e.alert() {
        // A fatal alert record, so the client reports why instead of a reset.
        let _ = tcp.write_all(&[0x15, 3, 3, 0, 2, 2, alert]).await;
        let _ = tcp.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ClientHello rustls sends for `name` (a DNS name, or an IP address: no SNI).
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// The same handshake bytes cut into records of at most `size` bytes.
    fn fragment(hello: &[u8], size: usize) -> Vec<u8> {
        let body = &hello[5..];
        let mut out = Vec::new();
        for piece in body.chunks(size) {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn the_sni_of_a_real_client_hello() {
        let hello = client_hello("DB.Passthrough.test");
        assert_eq!(parse(&hello), Ok(Parsed::Complete(Some("db.passthrough.test".into()))));
        // Any prefix is incomplete, never an error or a guess.
        for cut in [0, 1, 4, 5, 9, hello.len() / 2, hello.len() - 1] {
            assert_eq!(parse(&hello[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
        }
        // Split over records of 7 bytes: still found.
        let split = fragment(&hello, 7);
        assert_eq!(parse(&split), Ok(Parsed::Complete(Some("db.passthrough.test".into()))));
        assert_eq!(parse(&split[..split.len() - 3]), Ok(Parsed::Incomplete));
    }

    #[test]
    fn a_hello_without_sni_is_complete_without_a_name() {
        assert_eq!(parse(&client_hello("10.0.0.1")), Ok(Parsed::Complete(None)));
    }

    #[test]
    fn malformed_hellos_are_refused() {
        let hello = client_hello("db.passthrough.test");
        let malformed = |b: &[u8]| matches!(parse(b), Err(HelloError::Malformed(_)));
        assert!(malformed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "plaintext HTTP");
        let mut not_hello = hello.clone();
        not_hello[5] = 2; // a ServerHello
        assert!(malformed(&not_hello));
        let mut empty_record = hello.clone();
        empty_record[3..5].copy_from_slice(&[0, 0]);
        assert!(malformed(&empty_record));
        let mut huge_record = hello.clone();
        huge_record[3..5].copy_from_slice(&[0x48, 0x01]);
        assert!(malformed(&huge_record));
        // The name's length made larger than the extension: runs past its container.
        let name_at = hello.windows(19).position(|w| w == b"db.passthrough.test").unwrap();
        let mut overrun = hello.clone();
        overrun[name_at - 1] += 1;
        assert!(malformed(&overrun));
        // Not a DNS name.
        let mut bad_name = hello.clone();
        bad_name[name_at] = b'/';
        assert!(malformed(&bad_name));
        // A handshake message claiming more than the bound.
        let mut big = hello;
        big[6..9].copy_from_slice(&[0x01, 0, 0]);
        assert_eq!(parse(&big), Err(HelloError::TooLarge));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let hello = client_hello("db.passthrough.test");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut b = hello.clone();
            let at = (seed as usize) % b.len();
            b[at] = (seed >> 32) as u8;
            let cut = ((seed >> 40) as usize) % (b.len() + 1);
            let _ = parse(&b[..cut]);
        }
    }

    #[tokio::test]
    async fn reading_is_bounded() {
        // A ClientHello claiming 16,000 bytes, sent in 100-byte records: with their headers it
        // passes the bound before it completes, and is refused there, not buffered on.
        let mut handshake = vec![CLIENT_HELLO, 0, 0x3e, 0x80];
        handshake.resize(4 + 16_000, 0);
        let mut endless = Vec::new();
        for piece in handshake.chunks(100) {
            endless.extend_from_slice(&[0x16, 3, 1, 0, piece.len() as u8]);
            endless.extend_from_slice(piece);
        }
        let mut stream = &endless[..];
        assert_eq!(read_hello(&mut stream).await, Err(HelloError::TooLarge));
        let hello = client_hello("db.passthrough.test");
        let mut stream = &hello[..hello.len() - 1];
        assert_eq!(read_hello(&mut stream).await, Err(HelloError::Closed));
        let mut with_more = hello.clone();
        with_more.extend_from_slice(b"early");
        let mut stream = &with_more[..];
        let (read, sni) = read_hello(&mut stream).await.unwrap();
        assert_eq!(sni.as_deref(), Some("db.passthrough.test"));
        assert_eq!(read, with_more, "everything read is forwarded");
    }
}
