//! The HBONE side: accepts mutual TLS connections on 15008, and for each CONNECT stream finds
//! the target service from the authority, detects the protocol from the first bytes, and
//! serves HTTP/1.1 or HTTP/2 (with upgrades) through the request pipeline, or proxies
//! anything else as TCP under L4 policy.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_core::hbone::{serve_connection, H2Io, InboundConnect};
use mesh_core::state::model::{Service, Workload};
use mesh_core::state::Destination;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::http::proxy::{self, Downstream};
use crate::policy::authz::{self, Decision, RequestAttrs};
use crate::Waypoint;

/// How long a silent client may wait before its stream is treated as a server-first TCP
/// protocol rather than HTTP.
const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

const HTTP_STARTS: [&[u8]; 10] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PRI * HTTP/2",
];

/// Whether a stream's first bytes look like an HTTP/1 request line or the HTTP/2 preface.
pub fn looks_like_http(first: &[u8]) -> bool {
    HTTP_STARTS
        .iter()
        .any(|m| first.starts_with(m) || (first.len() < m.len() && m.starts_with(first) && !first.is_empty()))
}

/// A stream with bytes already read put back in front.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = buf.remaining().min(self.prefix.len());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts HBONE connections until drained.
pub async fn serve(wp: Arc<Waypoint>, listener: TcpListener) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = wp.drain.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let Some(cert) = wp.certs.get_ready(&wp.identity) else {
            // Fail closed: without our certificate we cannot prove who we are.
            warn!(%peer, "no certificate yet; refusing HBONE connection");
            continue;
        };
        let tls = match mesh_core::tls::cached_server_config(&cert) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "TLS configuration");
                continue;
            }
        };
        let wp2 = wp.clone();
        wp.tasks.spawn(async move {
            let settings = mesh_core::hbone::Settings::default();
            let drain = wp2.drain.clone();
            let handler = move |c: InboundConnect| tunnel(wp2.clone(), c);
            if let Err(e) = serve_connection(tcp, tls, &settings, drain, handler).await {
                debug!(%peer, error = %e, "HBONE connection ended");
            }
        });
    }
}

/// One CONNECT stream.
async fn tunnel(wp: Arc<Waypoint>, c: InboundConnect) {
    let state = wp.state.load();
    let client_addr = c.forwarded_for().unwrap_or(c.peer_addr);
    let dst = c.dst;
    let target = state.lookup(&wp.network, dst.ip());
    let service = match target {
        Some(Destination::Service(s)) => s,
        Some(Destination::Workload(_)) | None => {
            // Workload-addressed traffic is served as TCP straight to that address.
            let peer = c.peer_identity.clone();
            let Ok(stream) = accept_l4(&wp, c, client_addr, None) else {
                return;
            };
            tcp_to(&wp, stream, dst, &peer.to_string()).await;
            return;
        }
    };
    let peer_identity = c.peer_identity.clone();
    let stream = match c.accept() {
        Ok(s) => s.into_io(),
        Err(e) => {
            debug!(error = %e, "could not accept CONNECT");
            return;
        }
    };
    let (io, http) = match detect(stream).await {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "stream ended before its protocol was known");
            return;
        }
    };
    if !http {
        let spiffe = peer_identity.to_string();
        if !l4_allowed(&wp, &spiffe, &peer_identity.namespace, client_addr, dst, Some(&service)) {
            info!(target: "access", src_identity = %spiffe, dst_service = %service.hostname, "TCP connection denied by policy");
            return;
        }
        let Some((cluster, w, target)) = tcp_backend(&wp, &service, dst) else {
            info!(target: "access", src_identity = %spiffe, dst_service = %service.hostname, "no healthy TCP backend");
            return;
        };
        tcp_to(&wp, io, target, &spiffe).await;
        cluster.record(&w.uid, Some(StatusCode::OK));
        return;
    }
    let (metrics, peer_identity_text) = (wp.metrics.clone(), peer_identity.to_string());
    let down = Arc::new(Downstream {
        peer_identity,
        client_addr,
        dst,
        service_key: service.key(),
        service,
    });
    let svc = hyper::service::service_fn(move |req| proxy::handle(wp.clone(), down.clone(), req));
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(io), svc).await {
        // hyper has already answered a malformed request with 400 where it could.
        if e.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_parse()) {
            info!(peer = %peer_identity_text, error = %e, "malformed HTTP request in tunnel");
            metrics.reject("malformed_http");
        } else {
            debug!(error = %e, "HTTP connection in tunnel ended with an error");
        }
    }
}

/// Where a TCP connection to `service` goes: a TCPRoute's weighted backend if one is attached,
/// else the service itself; then an endpoint chosen by that backend's cluster.
fn tcp_backend(
    wp: &Waypoint,
    service: &Arc<Service>,
    dst: SocketAddr,
) -> Option<(Arc<crate::upstream::cluster::Cluster>, Arc<Workload>, SocketAddr)> {
    let snapshot = wp.config.load();
    let state = wp.state.load();
    let route = snapshot.routes.get(&service.key()).and_then(|r| r.tcp.as_ref());
    let (backend, port) = match route.and_then(|r| crate::http::proxy::pick_backend(&r.backends)) {
        Some(b) => {
            let svc = state.service(&b.service)?.clone();
            let port = u16::try_from(b.port).ok().filter(|p| *p != 0).unwrap_or(dst.port());
            (svc, port)
        }
        None => (service.clone(), dst.port()),
    };
    let routes = snapshot.routes.get(&backend.key()).map(|r| &r.config);
    let cluster = wp
        .upstreams
        .cluster(&backend.key(), "", crate::upstream::effective_policy(routes, None));
    let eps = crate::upstream::candidates(&state, &backend, None);
    let w = cluster.pick(&eps)?;
    let ep = crate::upstream::target(&w, &backend, port, dst.ip())?;
    Some((cluster, w, ep.target))
}

/// Reads the first bytes (or waits briefly) to tell HTTP from other TCP protocols.
async fn detect(mut io: H2Io) -> io::Result<(Rewind<H2Io>, bool)> {
    let mut buf = BytesMut::with_capacity(1024);
    let http = match tokio::time::timeout(DETECT_TIMEOUT, io.read_buf(&mut buf)).await {
        Ok(Ok(0)) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "empty stream")),
        Ok(Ok(_)) => looks_like_http(&buf),
        Ok(Err(e)) => return Err(e),
        Err(_) => false,
    };
    Ok((
        Rewind {
            prefix: buf.freeze(),
            inner: io,
        },
        http,
    ))
}

fn l4_allowed(
    wp: &Waypoint,
    principal: &str,
    namespace: &str,
    client: SocketAddr,
    dst: SocketAddr,
    service: Option<&mesh_core::state::model::Service>,
) -> bool {
    let snapshot = wp.config.load();
    let gateway = (wp.gateway.0.as_str(), wp.gateway.1.as_str());
    let svc = service
        .map(|s| (s.namespace.as_str(), s.name.as_str()))
        .unwrap_or(("", ""));
    let headers = HeaderMap::new();
    let attrs = RequestAttrs {
        source_principal: principal.strip_prefix("spiffe://").unwrap_or(principal),
        source_namespace: namespace,
        source_ip: client.ip(),
        request_principal: None,
        host: "",
        port: dst.port(),
        method: "",
        path: "",
        headers: &headers,
    };
    authz::evaluate(snapshot.policies_for(gateway, svc), &attrs) == Decision::Allow
}

fn accept_l4(
    wp: &Waypoint,
    c: InboundConnect,
    client: SocketAddr,
    service: Option<&mesh_core::state::model::Service>,
) -> Result<Rewind<H2Io>, ()> {
    let spiffe = c.peer_identity.to_string();
    if !l4_allowed(wp, &spiffe, &c.peer_identity.namespace, client, c.dst, service) {
        c.reject(StatusCode::UNAUTHORIZED);
        return Err(());
    }
    let io = c.accept().map_err(|_| ())?.into_io();
    Ok(Rewind {
        prefix: Bytes::new(),
        inner: io,
    })
}

async fn tcp_to(wp: &Waypoint, mut down: Rewind<H2Io>, target: SocketAddr, who: &str) {
    match wp.upstreams.connector.open(target).await {
        Ok(mut up) => match tokio::io::copy_bidirectional(&mut down, &mut up).await {
            Ok((sent, received)) => {
                info!(target: "access", src_identity = %who, dst_addr = %target, sent, received, "TCP connection")
            }
            Err(e) => debug!(error = %e, %target, "TCP proxy ended"),
        },
        Err(e) => warn!(error = %e, %target, "TCP upstream connect failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    #[test]
    fn detection() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(looks_like_http(b"POS"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
    }
}
