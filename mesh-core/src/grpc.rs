//! gRPC channels to the control plane (xDS, CA).
//!
//! An address is `http://host:port` (plaintext) or `https://host:port`. TLS is done by our own
//! rustls connector, without SNI (the server is verified by identity, not by name; see
//! [`crate::tls::control_plane_client_config`]); tonic itself only ever sees a plaintext
//! `http://` endpoint, so it never tries TLS of its own. An `https` address without a TLS
//! configuration is an error rather than a silent downgrade to plaintext.
//!
//! Every channel sets TCP_NODELAY, bounds connect plus handshake by [`CONNECT_TIMEOUT`], and
//! sends HTTP/2 PINGs, so a control plane that vanished without closing the connection (node
//! failure, dropped NAT entry) is noticed instead of waited for forever. Sockets can come from
//! a [`SocketFactory`] (see [`Dial::sockets`]): a node proxy marks its own sockets so its
//! capture rules let them through.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::either::Either;
use tonic::transport::{Channel, Endpoint};

use crate::socket::SocketFactory;

mod stream_channel;
pub use stream_channel::{StreamChannel, MAX_FRAME_SIZE};

/// Bound on TCP connect plus TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of HTTP/2 PINGs, sent also while no call is in flight.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is considered dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("invalid gRPC address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("connecting to {address}: {}", ErrorChain(.source))]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to {address}: {reason}")]
    Handshake { address: String, reason: String },
}

/// Displays an error with its sources: tonic's transport error alone only says "transport
/// error", hyper's client error "client error (Connect)".
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            // Wrappers often repeat their source's text: say it once.
            let text = s.to_string();
            if text != last {
                write!(f, ": {text}")?;
            }
            last = text;
            source = s.source();
        }
        Ok(())
    }
}

/// A gRPC status as one readable line: code, message, and the chain of its source (where a
/// connection failure says what went wrong, e.g. which certificate check failed).
pub fn status_text(status: &tonic::Status) -> String {
    let mut out = format!("{:?}", status.code());
    if !status.message().is_empty() {
        out.push_str(": ");
        out.push_str(status.message());
    }
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        let text = s.to_string();
        // tonic puts the source's own text into the message too: do not say it twice.
        if text != status.message() {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Where to dial, parsed from an address.
#[derive(Debug)]
struct Target {
    /// Host without IPv6 brackets, for the TCP dial.
    host: String,
    port: u16,
    /// Always `http://`: TLS is done by our own connector, and tonic must never try its own
    /// (it refuses `https` URIs when built without its TLS feature, or would redo TLS with it).
    dial: Uri,
    /// The URI requests carry (`:scheme`, `:authority`), `https` when TLS is used.
    origin: Uri,
}

impl Target {
    fn parse(address: &str, tls: bool) -> Result<Target, GrpcError> {
        let bad = |reason: &str| GrpcError::Address {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = address
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        if https && !tls {
            return Err(bad("an https address needs a TLS client configuration"));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad("a gRPC address has no path: use scheme://host:port"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let host = authority.host();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let scheme = if tls { "https" } else { "http" };
        let dial = format!("http://{host}:{port}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let origin = format!("{scheme}://{host}:{port}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        Ok(Target {
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port,
            dial,
            origin,
        })
    }
}

/// A plaintext or TLS connection.
type Conn = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// tower connector for tonic: resolve, TCP dial (from the socket factory when one is set),
/// TCP_NODELAY, then a rustls handshake without SNI when TLS is configured.
#[derive(Clone)]
struct Connector {
    host: Arc<str>,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    sockets: Option<Arc<dyn SocketFactory>>,
}

impl Connector {
    async fn tcp(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match &self.sockets {
            Some(f) => f.tcp_socket(addr)?,
            None if addr.is_ipv4() => TcpSocket::new_v4()?,
            None => TcpSocket::new_v6()?,
        };
        socket.set_nodelay(true)?;
        let tcp = socket.connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    async fn dial(self) -> io::Result<TokioIo<Conn>> {
        let mut last = None;
        for addr in tokio::net::lookup_host((&*self.host, self.port)).await? {
            match self.tcp(addr).await {
                Ok(tcp) => {
                    let conn = match &self.tls {
                        None => Either::Left(tcp),
                        Some(tls) => Either::Right(
                            tls.connect(crate::tls::placeholder_server_name(), tcp)
                                .await
                                .map_err(|e| handshake_error(addr, e))?,
                        ),
                    };
                    return Ok(TokioIo::new(conn));
                }
                Err(e) => last = Some(io::Error::new(e.kind(), format!("{addr}: {e}"))),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{} resolves to no address", self.host))
        }))
    }
}

/// A failed TLS handshake, said plainly: rustls prints a verifier's own error with `Debug`.
fn handshake_error(addr: SocketAddr, e: io::Error) -> io::Error {
    use rustls::{CertificateError, Error as TlsError};
    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
        Some(TlsError::InvalidCertificate(CertificateError::Other(other))) => {
            format!("invalid server certificate: {}", other.0)
        }
        Some(TlsError::InvalidCertificate(c)) => format!("invalid server certificate: {c:?}"),
        Some(other) => other.to_string(),
        None => e.to_string(),
    };
    io::Error::new(e.kind(), format!("TLS handshake with {addr}: {reason}"))
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        Box::pin(self.clone().dial())
    }
}

/// A parsed address with its connector, ready to connect. Made by [`endpoint`].
#[derive(Clone)]
pub struct Dial {
    address: String,
    /// `:scheme` and `:authority` of the requests.
    origin: Uri,
    endpoint: Endpoint,
    connector: Connector,
}

impl fmt::Debug for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dial")
            .field("address", &self.address)
            .field("tls", &self.connector.tls.is_some())
            .field("sockets", &self.connector.sockets.is_some())
            .finish()
    }
}

impl Dial {
    /// The address as given.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Makes the TCP sockets with `sockets` (say, with the mesh mark so capture skips them).
    pub fn sockets(mut self, sockets: Arc<dyn SocketFactory>) -> Self {
        self.connector.sockets = Some(sockets);
        self
    }

    /// Adjusts the tonic endpoint (timeouts, window sizes). Its URI stays `http://`: TLS is
    /// the connector's business.
    pub fn map_endpoint(mut self, f: impl FnOnce(Endpoint) -> Endpoint) -> Self {
        self.endpoint = f(self.endpoint);
        self
    }

    /// Connects now; fails if the server cannot be reached or the TLS handshake fails.
    pub async fn connect(&self) -> Result<Channel, GrpcError> {
        self.endpoint
            .connect_with_connector(self.connector.clone())
            .await
            .map_err(|source| GrpcError::Connect {
                address: self.address.clone(),
                source,
            })
    }

    /// A channel that connects on first use and reconnects after failures; connection errors
    /// surface as the status of the calls.
    pub fn connect_lazy(&self) -> Channel {
        self.endpoint.connect_with_connector_lazy(self.connector.clone())
    }
}

/// Parses `address` and prepares its connector. `tls` is required for `https` addresses and
/// makes the connection TLS whatever the scheme; ALPN `h2` is added when it has no ALPN.
pub fn endpoint(address: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Dial, GrpcError> {
    let target = Target::parse(address, tls.is_some())?;
    let tls = tls.map(|cfg| {
        // gRPC servers may refuse TLS without ALPN h2.
        let cfg = if cfg.alpn_protocols.is_empty() {
            let mut c = rustls::ClientConfig::clone(&cfg);
            c.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
            Arc::new(c)
        } else {
            cfg
        };
        tokio_rustls::TlsConnector::from(cfg)
    });
    let endpoint = Endpoint::from(target.dial)
        .origin(target.origin.clone())
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(Dial {
        address: address.to_owned(),
        origin: target.origin,
        endpoint,
        connector: Connector {
            host: target.host.into(),
            port: target.port,
            tls,
            sockets: None,
        },
    })
}

/// [`endpoint`] then [`Dial::connect`].
pub async fn connect(address: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Channel, GrpcError> {
    endpoint(address, tls)?.connect().await
}

/// [`endpoint`] then [`Dial::connect_lazy`]. Must be called inside a tokio runtime.
pub fn connect_lazy(address: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Channel, GrpcError> {
    Ok(endpoint(address, tls)?.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parsing() {
        let t = Target::parse("https://[::1]:15012", true).expect("parse");
        assert_eq!((t.host.as_str(), t.port), ("::1", 15012));
        assert_eq!(t.dial.scheme_str(), Some("http"));
        assert_eq!(t.origin.scheme_str(), Some("https"));
        let t = Target::parse("http://controller.istio-system", false).expect("parse");
        assert_eq!((t.host.as_str(), t.port), ("controller.istio-system", 80));
        assert_eq!(t.origin.scheme_str(), Some("http"));
        // TLS over an http address is still TLS: the configuration decides.
        let t = Target::parse("http://controller:15012", true).expect("parse");
        assert_eq!(t.origin.scheme_str(), Some("https"));
        for bad in [
            "https://controller:15012", // https without TLS configuration
            "controller:15012",
            "ftp://controller:15012",
            "http://controller:15012/some/path",
            "http://",
        ] {
            match Target::parse(bad, false) {
                Err(GrpcError::Address { address, .. }) => assert_eq!(address, bad),
                other => panic!("{bad}: expected an address error, got {other:?}"),
            }
        }
    }

    #[test]
    fn https_without_tls_names_the_address_and_the_fix() {
        let err = endpoint("https://controller:15012", None).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("https://controller:15012"), "{text}");
        assert!(text.contains("TLS client configuration"), "{text}");
    }

    #[tokio::test]
    async fn connect_failure_names_the_address_and_the_reason() {
        // Reserve a port and close it: nothing listens there.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let address = format!("http://{addr}");
        let err = connect(&address, None).await.expect_err("nothing listens");
        let text = err.to_string();
        assert!(matches!(err, GrpcError::Connect { .. }));
        assert!(text.contains(&address), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[tokio::test]
    async fn lazy_channel_does_not_connect_up_front() {
        // A lazy channel to nowhere is fine until it is used.
        connect_lazy("http://127.0.0.1:1", None).expect("lazy channel");
        assert!(connect_lazy("https://127.0.0.1:1", None).is_err());
    }
}
