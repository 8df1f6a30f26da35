//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams inside mutual TLS.
//!
//! - [`server`]: accepts mTLS connections and hands each CONNECT stream to a handler.
//! - [`pool`]: the client side, a connection pool that opens CONNECT streams to a destination.
//! - [`stream`]: the stream type and the zero-extra-copy splice to a TCP socket.
//! - [`nested`]: double HBONE, a tunnel inside a tunnel through an east-west gateway.

pub mod buffer;
pub mod limits;
pub mod nested;
pub mod pool;
pub mod server;
mod splice;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

pub use limits::{Limit, LimitConfig, LimitObserver, PeerUsage, PendingGuard, ServerLimits};
pub use nested::DoubleTunnelRequest;
pub use pool::{HbonePool, PoolKey, TunnelRequest};
pub use server::{serve_admitted, serve_connection, ConnectTarget, InboundConnect};
pub use stream::{H2Io, H2Stream, Transferred};

pub use crate::capture::HBONE_PORT;

/// Transport settings shared by client and server.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Per-stream HTTP/2 window.
    pub stream_window: u32,
    /// Per-connection HTTP/2 window.
    pub connection_window: u32,
    /// Largest frame we accept.
    pub max_frame_size: u32,
    /// Streams the server allows per connection.
    pub server_max_streams: u32,
    /// Streams the client opens per pooled connection before opening another.
    pub client_max_streams: usize,
    /// Pooled connections without streams are closed after this long.
    pub idle_timeout: Duration,
    /// Server: an authenticated connection without a stream for this long gets GOAWAY. Longer
    /// than clients' pool idle timeout, so that well-behaved clients close theirs first.
    pub server_idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Server: TLS handshake and HTTP/2 preface together. Client: TLS handshake.
    pub handshake_timeout: Duration,
    /// PING interval on pooled connections; a PING unanswered for as long evicts it.
    pub keepalive: Duration,
    /// Server: what peers may hold, shared by every connection served with these settings.
    pub limits: Arc<ServerLimits>,
    /// Server: whether a CONNECT may name `hostname:port` (double HBONE names the service so;
    /// see [`InboundConnect::hostname`]). Off, such requests get 400.
    pub hostname_authority: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            // About 4 and 16 MiB, as whole splice chunks: a peer splicing as we do then gets room
            // for whole chunks while the window is what holds it back, instead of a part that
            // splits a chunk into two frames (and records) for as long as the transfer runs.
            stream_window: 32 * splice::READ_LIMIT as u32,
            connection_window: 128 * splice::READ_LIMIT as u32,
            max_frame_size: 1024 * 1024,
            server_max_streams: 200,
            client_max_streams: 100,
            idle_timeout: Duration::from_secs(300),
            server_idle_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(10),
            limits: Arc::default(),
            hostname_authority: false,
        }
    }
}

/// What went wrong opening or serving a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {}", describe_tls(.0))]
    Tls(std::io::Error),
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] crate::tls::TlsError),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("refused: {0}")]
    Limited(Limit),
    #[error("{0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    #[error("peer presented no certificate with a SPIFFE identity")]
    NoPeerIdentity,
    #[error("tunnel refused with HTTP status {0}")]
    Status(http::StatusCode),
    #[error("no certificate for the source identity: {0}")]
    Certificate(#[from] crate::identity::FetchError),
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
}

/// Names the certificate problem inside a TLS handshake error instead of debug-printing it.
fn describe_tls(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Other(o))) => format!("invalid peer certificate: {}", o.0),
        Some(Error::InvalidCertificate(c)) => format!("invalid peer certificate: {c:?}"),
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}
