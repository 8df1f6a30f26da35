//! The HBONE server: accepts mutual TLS (TLS 1.3, ALPN h2), requires a peer certificate with a
//! SPIFFE identity, and hands every HTTP/2 CONNECT stream to a handler that decides its fate.
//! Requests that are not CONNECT get 405; an authority that is not `ip:port` gets 400.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::stream::H2Stream;
use super::{HboneError, Settings};
use crate::identity::{identity_of, Identity};

/// A CONNECT request waiting for an answer.
pub struct InboundConnect {
    /// The target `ip:port` from `:authority`.
    pub dst: SocketAddr,
    pub headers: HeaderMap,
    /// Identity proven by the peer's certificate.
    pub peer_identity: Identity,
    /// TCP peer of the TLS connection.
    pub peer_addr: SocketAddr,
    /// Local address the TLS connection arrived on.
    pub local_addr: SocketAddr,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
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
            _guard: None,
        })
    }

    /// The client address from the `forwarded: for=` header, if present and well formed.
    pub fn forwarded_for(&self) -> Option<SocketAddr> {
        let v = self.headers.get("forwarded")?.to_str().ok()?;
        v.split(';').find_map(|p| {
            let p = p.trim();
            let val = p.strip_prefix("for=").or_else(|| p.strip_prefix("For="))?;
            val.trim_matches('"').parse().ok()
        })
    }
}

/// Why an incoming request could not even reach the handler.
fn precheck(req: &Request<RecvStream>) -> Result<SocketAddr, StatusCode> {
    if req.method() != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let authority = req.uri().authority().ok_or(StatusCode::BAD_REQUEST)?;
    authority
        .as_str()
        .parse::<SocketAddr>()
        .map_err(|_| StatusCode::BAD_REQUEST)
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
    let peer_addr = tcp.peer_addr()?;
    let local_addr = tcp.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tls = tokio::time::timeout(settings.handshake_timeout, acceptor.accept(super::buffered(tcp)))
        .await
        .map_err(|_| HboneError::Timeout("TLS handshake", settings.handshake_timeout))?
        .map_err(HboneError::Tls)?;
    let peer_identity = {
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(HboneError::NoPeerIdentity)?;
        identity_of(leaf).map_err(|_| HboneError::NoPeerIdentity)?
    };
    let mut conn = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.server_max_streams)
        .handshake(tls)
        .await?;
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = drain.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { return Ok(()) };
        let (req, mut respond) = match next {
            Ok(r) => r,
            Err(e) if e.is_go_away() || e.is_io() => return Ok(()),
            Err(e) => {
                warn!(peer = %peer_addr, error = %e, "HBONE stream error");
                continue;
            }
        };
        let dst = match precheck(&req) {
            Ok(d) => d,
            Err(status) => {
                debug!(peer = %peer_addr, method = %req.method(), uri = %req.uri(), %status, "malformed HBONE request");
                let resp = Response::builder().status(status).body(()).unwrap_or_default();
                let _ = respond.send_response(resp, true);
                continue;
            }
        };
        let (parts, recv) = req.into_parts();
        let connect = InboundConnect {
            dst,
            headers: parts.headers,
            peer_identity: peer_identity.clone(),
            peer_addr,
            local_addr,
            respond,
            recv,
        };
        tokio::spawn(handler(connect));
    }
}
