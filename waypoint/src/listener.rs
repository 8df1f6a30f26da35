//! The HBONE side: accepts mutual TLS connections on 15008, and for each CONNECT stream finds
//! the target service from the authority, detects the protocol from the first bytes, and
//! serves HTTP/1.1 or HTTP/2 (with upgrades) through the request pipeline, or proxies
//! anything else as TCP under L4 policy. A CONNECT to a service on a port the service does
//! not declare is refused (`undeclared_port`): the waypoint exposes, under its own identity,
//! only what the service exposes. A CONNECT from this waypoint's own identity is refused
//! (`loop`): an upstream that leads back here must not amplify itself.
//!
//! Opaque TCP skips every HTTP decision, so it is allowed only where nothing needs HTTP: a
//! service port declared HTTP (appProtocol or port name), a service with HTTP or gRPC routes,
//! or one with a policy that reads HTTP ([`authz::needs_http`]) is parsed as HTTP or refused,
//! and a silent client there waits for its request (bounded) instead of becoming TCP.
//!
//! A workload-addressed stream (a waypoint for workloads) has no service, and the HTTP
//! pipeline serves only a service's requests (routes, backends and telemetry are per
//! service), so it is carried as TCP under the Gateway's L4 policy. It fails closed instead
//! when the Gateway's own policies need HTTP (the same [`http_only`] predicate, applied to the
//! policies targeting the Gateway): a LocalRateLimitPolicy, RequestAuthentication or L7
//! authorization rule there would otherwise not apply to it, so it is refused
//! (`workload_needs_http`). Istio would serve it through L7; that needs a workload backend in
//! the pipeline.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use hyper_util::rt::TokioIo;
use mesh_core::hbone::{
    serve_connection, H2Io, InboundConnect, Limit, LimitConfig, LimitObserver, ServerLimits, Settings,
};
use mesh_core::identity::Identity;
use mesh_core::log_limit::LogLimiter;
use mesh_core::socket::AcceptBackoff;
use mesh_core::state::model::{GatewayAddress, GatewayDestination, Service};
use mesh_core::state::{AppProtocol, Destination};
use mesh_proto::waypoint as wp;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::http::proxy::{self, Downstream};
use crate::policy::authz::{self, ConnectionAttrs, Decision};
use crate::telemetry::metrics::{RequestLabels, TcpLabels};
use crate::upstream::cluster::TCP_IDLE_TIMEOUT;
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

/// Longest method accepted before the first space on a port that must be HTTP.
const MAX_METHOD: usize = 32;

/// Whether a stream's first bytes can start an HTTP/1 request (any method token, extension
/// methods included, then a space) or the HTTP/2 preface. Used where the stream must be HTTP:
/// anything else is refused rather than handed to the parser.
pub fn plausible_http(first: &[u8]) -> bool {
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    match first.iter().position(|b| *b == b' ') {
        Some(n) => n > 0 && n <= MAX_METHOD && first[..n].iter().all(tchar),
        None => !first.is_empty() && first.len() <= MAX_METHOD && first.iter().all(tchar),
    }
}

/// Why a service's traffic must be HTTP and may never be proxied as opaque TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpOnly {
    /// The port declares HTTP, HTTP/2 or gRPC.
    DeclaredPort,
    /// HTTP or gRPC routes are attached to the service.
    Routes,
    /// A RequestAuthentication, or an authorization rule with HTTP-only fields, applies.
    Policy,
}

/// Whether traffic to a service port may be proxied as opaque TCP (`None`) or must be HTTP.
pub fn http_only<'a>(
    declared: AppProtocol,
    http_routes: bool,
    policies: impl IntoIterator<Item = &'a wp::Policy>,
) -> Option<HttpOnly> {
    if declared.is_http() {
        Some(HttpOnly::DeclaredPort)
    } else if http_routes {
        Some(HttpOnly::Routes)
    } else if policies.into_iter().any(authz::needs_http) {
        Some(HttpOnly::Policy)
    } else {
        None
    }
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
            if self.prefix.is_empty() {
                // Frees the detection buffer rather than keep it for the connection's life.
                self.prefix = Bytes::new();
            }
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

/// Accepts HBONE connections until closing (`--drain-accept-ms` after SIGTERM: a leaving
/// replica keeps taking connections until ztunnels stop sending them). Every connection
/// shares one set of HBONE limits, `limits`
/// (pending handshakes per source, streams per peer identity, reset floods), counted in
/// `waypoint_rejected_requests_total` by limit.
pub async fn serve(wp: Arc<Waypoint>, listener: TcpListener, limits: LimitConfig) {
    let metrics = wp.metrics.clone();
    let observer: LimitObserver = Arc::new(move |limit: Limit| metrics.reject(limit.as_str()));
    let settings = Arc::new(Settings {
        limits: Arc::new(ServerLimits::new(limits, Some(observer))),
        // Double HBONE through an east-west gateway names the service `hostname:port`.
        hostname_authority: true,
        ..Default::default()
    });
    let mut backoff = AcceptBackoff::default();
    let refusals = LogLimiter::new(Duration::from_secs(10));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    backoff.failed("HBONE", &e).await;
                    continue;
                }
            },
            _ = wp.closing.cancelled() => return,
        };
        backoff.succeeded();
        let _ = tcp.set_nodelay(true);
        let Some(cert) = wp.certs.get_ready(&wp.identity) else {
            // Fail closed: without our certificate we cannot prove who we are.
            if let Some(suppressed) = refusals.check("no certificate") {
                warn!(%peer, suppressed, "no certificate yet; refusing HBONE connection");
            }
            continue;
        };
        let tls = match mesh_core::tls::cached_server_config(&cert) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "TLS configuration");
                continue;
            }
        };
        let (wp2, settings) = (wp.clone(), settings.clone());
        wp.tasks.spawn(async move {
            // GOAWAY once closing: streams in flight finish, new ones go to a fresh connection.
            let drain = wp2.closing.clone();
            let handler = move |c: InboundConnect| tunnel(wp2.clone(), c);
            if let Err(e) = serve_connection(tcp, tls, &settings, drain, handler).await {
                debug!(%peer, error = %e, "HBONE connection ended");
            }
        });
    }
}

/// The client address policy sees: the HBONE peer's own. A `forwarded` header is a claim;
/// from a client's ztunnel it carries the peer's own address (and the original port), which
/// is kept. Any other address is ignored: nothing upstream of a waypoint may vouch for one.
fn client_addr(forwarded: Option<SocketAddr>, peer: SocketAddr) -> SocketAddr {
    match forwarded {
        Some(f) if f.ip() == peer.ip() => f,
        _ => peer,
    }
}

/// Whether the destination uses this waypoint: a service's or workload's `waypoint` names it.
/// Anything else is refused, an address nothing owns included. Otherwise any mesh client could
/// borrow this waypoint's identity, which its destinations' policies trust, to reach anything
/// it reaches; Istio's waypoint has filter chains only for what is bound to it.
fn bound_here(gateway: (&str, &str), state: &mesh_core::state::State, target: Option<&Destination>) -> bool {
    let gw = match target {
        Some(Destination::Service(s)) => s.waypoint.as_ref(),
        Some(Destination::Workload(w)) => w.waypoint.as_ref(),
        None => None,
    };
    gw.is_some_and(|gw| names_gateway(gateway, gw, |network, ip| state.lookup(network, ip)))
}

/// Whether `gw` is the Gateway `(namespace, name)`: its Service's hostname
/// (`<name>.<namespace>.svc.<domain>`), or an address `lookup` finds that Service at.
fn names_gateway(
    (namespace, name): (&str, &str),
    gw: &GatewayAddress,
    lookup: impl Fn(&str, std::net::IpAddr) -> Option<Destination>,
) -> bool {
    match &gw.destination {
        GatewayDestination::Hostname {
            namespace: ns,
            hostname,
        } => {
            let rest = hostname.strip_prefix(name).and_then(|h| h.strip_prefix('.'));
            let rest = rest.and_then(|h| h.strip_prefix(namespace));
            ns == namespace && rest.is_some_and(|h| h.starts_with(".svc."))
        }
        GatewayDestination::Address { network, ip } => matches!(
            lookup(network, *ip),
            Some(Destination::Service(s)) if s.name == name && s.namespace == namespace
        ),
    }
}

/// What a CONNECT names: for an `ip:port` authority, that address and what is there; for a
/// `hostname:port` one (double HBONE: Istio's ztunnel names a service that has a waypoint so
/// through the east-west gateway), the service of that hostname at its VIP on `network` (else
/// its first) and the port; `None` for a hostname of no service.
fn connect_target(
    state: &mesh_core::state::State,
    (network, gateway): (&str, (&str, &str)),
    dst: SocketAddr,
    hostname: Option<&str>,
) -> Option<(SocketAddr, Option<Destination>)> {
    let Some(host) = hostname else {
        return Some((dst, state.lookup(network, dst.ip())));
    };
    let services: Vec<&Arc<Service>> = state.services_by_hostname(host).collect();
    // One per namespace at most: the one that names this waypoint first (another namespace's
    // service of the same host would be refused), then any with a waypoint.
    let ours = |s: &&&Arc<Service>| {
        let gw = s.waypoint.as_ref();
        gw.is_some_and(|gw| names_gateway(gateway, gw, |n, ip| state.lookup(n, ip)))
    };
    let svc = services
        .iter()
        .find(ours)
        .or_else(|| services.iter().find(|s| s.waypoint.is_some()))
        .or(services.first())?;
    let ip = svc
        .vips
        .iter()
        .find(|(n, _)| n == network)
        .or(svc.vips.first())
        .map_or(dst.ip(), |(_, ip)| *ip);
    Some((
        SocketAddr::new(ip, dst.port()),
        Some(Destination::Service((*svc).clone())),
    ))
}

/// Why a CONNECT stream is refused before anything is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TunnelRefusal {
    /// A `hostname:port` authority of no service: never the listener's own address.
    UnknownHostname,
    /// The destination does not use this waypoint.
    NotBound,
    /// A service port the service does not declare: Istio's waypoint has listeners only for
    /// declared ports, and the pods' other ports are not the service's to expose.
    UndeclaredPort,
    /// The peer is this waypoint itself (its own identity, a replica's included): a service
    /// whose upstream leads back here would loop until the stream limits trip.
    Loop,
    /// A workload-addressed stream, which is served only as TCP, while the Gateway's own
    /// policies (a rate limit, a RequestAuthentication, an L7 authorization rule) need HTTP.
    WorkloadNeedsHttp,
}

impl TunnelRefusal {
    /// The `reason` label of `waypoint_rejected_requests_total`.
    fn reason(self) -> &'static str {
        match self {
            TunnelRefusal::UnknownHostname => "unknown_hostname",
            TunnelRefusal::NotBound => "not_bound_to_waypoint",
            TunnelRefusal::UndeclaredPort => "undeclared_port",
            TunnelRefusal::Loop => "loop",
            TunnelRefusal::WorkloadNeedsHttp => "workload_needs_http",
        }
    }

    /// What the CONNECT is answered.
    fn status(self) -> StatusCode {
        match self {
            TunnelRefusal::UnknownHostname | TunnelRefusal::UndeclaredPort => StatusCode::BAD_REQUEST,
            TunnelRefusal::NotBound | TunnelRefusal::Loop | TunnelRefusal::WorkloadNeedsHttp => StatusCode::FORBIDDEN,
        }
    }
}

/// Whether `service` declares `port`. A service without ports declares none: a Kubernetes
/// Service and an Istio ServiceEntry always list theirs, and Istio's waypoint would have no
/// listener for such a service.
pub fn declares_port(service: &Service, port: u16) -> bool {
    service.ports.iter().any(|p| p.service_port == port)
}

/// Whether a CONNECT from `peer` to `dst` (what [`connect_target`] found there) may be served
/// by the waypoint `own` (its identity and Gateway): not from itself, to something bound to
/// it, and for a service only on a port it declares. Workload-addressed streams have no service ports and go on as addressed.
fn admit(
    state: &mesh_core::state::State,
    (identity, gateway): (&Identity, (&str, &str)),
    peer: &Identity,
    dst: SocketAddr,
    target: Option<&Destination>,
) -> Result<(), TunnelRefusal> {
    if peer == identity {
        return Err(TunnelRefusal::Loop);
    }
    if !bound_here(gateway, state, target) {
        return Err(TunnelRefusal::NotBound);
    }
    match target {
        Some(Destination::Service(s)) if !declares_port(s, dst.port()) => Err(TunnelRefusal::UndeclaredPort),
        _ => Ok(()),
    }
}

/// Refuses a CONNECT stream: counted, logged, answered.
fn refuse(wp: &Waypoint, c: InboundConnect, dst: SocketAddr, refusal: TunnelRefusal) {
    let reason = refusal.reason();
    wp.metrics.reject(reason);
    info!(
        target: "access",
        src_identity = %c.peer_identity,
        dst = %dst,
        reason,
        "tunnel refused"
    );
    c.reject(refusal.status());
}

/// One CONNECT stream.
async fn tunnel(wp: Arc<Waypoint>, c: InboundConnect) {
    let state = wp.state.load();
    let client_addr = client_addr(c.forwarded_for(), c.peer_addr);
    let gateway = (wp.gateway.0.as_str(), wp.gateway.1.as_str());
    let Some((dst, target)) = connect_target(&state, (&wp.network, gateway), c.dst, c.hostname.as_deref()) else {
        let dst = c.dst;
        return refuse(&wp, c, dst, TunnelRefusal::UnknownHostname);
    };
    if let Err(refusal) = admit(&state, (&wp.identity, gateway), &c.peer_identity, dst, target.as_ref()) {
        return refuse(&wp, c, dst, refusal);
    }
    let service = match target {
        Some(Destination::Service(s)) => s,
        Some(Destination::Workload(_)) | None => {
            let Some((stream, to, spiffe)) = workload_stream(&wp, c, &state, client_addr, dst) else {
                return;
            };
            drop(state);
            // Boxed, as below: inline, the TCP path's state would double every HTTP tunnel's.
            let _ = Box::pin(tcp_to(&wp, stream, (client_addr, &spiffe), to)).await;
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
    let spiffe = peer_identity.to_string();
    let must = must_be_http(&wp, &state, &service, dst.port());
    // Not held for the connection's life: every state published meanwhile would stay in
    // memory until the last connection that began under it closed.
    drop(state);
    let io = match detect(stream, must, wp.header_read_timeout).await {
        Ok(Sniffed::Http(io)) => io,
        Ok(Sniffed::Tcp(io)) => {
            let from = (client_addr, &peer_identity);
            return Box::pin(tcp_to_service(&wp, io, from, dst, &service)).await;
        }
        Err(DetectError::Io(e)) => {
            debug!(error = %e, "stream ended before its protocol was known");
            return;
        }
        Err(refused) => {
            let reason = refused.reason();
            wp.metrics.reject(reason);
            info!(
                target: "access",
                src_addr = %client_addr,
                src_identity = %spiffe,
                dst_service = %service.hostname,
                http_only = ?must,
                reason,
                "connection refused: this port only carries HTTP"
            );
            return;
        }
    };
    let down = Arc::new(Downstream {
        peer_identity: Some(peer_identity),
        client_addr,
        remote_ip: client_addr.ip(),
        forwarded_proto: "http",
        upstream_protocol: proxy::UpstreamProtocol::AsClient,
        dst,
        service_key: service.key(),
        service,
    });
    serve_http(wp, down, io, &spiffe).await;
}

/// Whether the waypoint may serve a workload-addressed stream, which it carries only as TCP
/// straight to the address: not when the gateway's own policies make traffic HTTP-only (the
/// predicate of the service path, [`http_only`], over the policies targeting the Gateway):
/// a rate limit or RequestAuthentication there would otherwise silently not apply to it.
fn admit_workload(snapshot: &crate::store::Snapshot, gateway: (&str, &str)) -> Result<(), TunnelRefusal> {
    match http_only(AppProtocol::Unknown, false, snapshot.policies_for(gateway, ("", ""))) {
        Some(_) => Err(TunnelRefusal::WorkloadNeedsHttp),
        None => Ok(()),
    }
}

/// A workload-addressed stream, admitted ([`admit_workload`], then the gateway's L4 policy)
/// and accepted, with where it goes and the peer's SPIFFE identity; `None` once refused.
fn workload_stream(
    wp: &Waypoint,
    c: InboundConnect,
    state: &mesh_core::state::State,
    client_addr: SocketAddr,
    dst: SocketAddr,
) -> Option<(Rewind<H2Io>, TcpTo, String)> {
    let gateway = (wp.gateway.0.as_str(), wp.gateway.1.as_str());
    if let Err(refusal) = admit_workload(&wp.config.load(), gateway) {
        refuse(wp, c, dst, refusal);
        return None;
    }
    let spiffe = c.peer_identity.to_string();
    let labels = RequestLabels::new(
        state.workload_by_ip(&wp.network, client_addr.ip()).map(|w| &**w),
        &spiffe,
        state.workload_by_ip(&wp.network, dst.ip()).map(|w| &**w),
        None,
        "tcp",
    );
    let stream = accept_l4(wp, c, client_addr, None).ok()?;
    let to = TcpTo {
        target: dst,
        labels: labels.into(),
        idle: Some(TCP_IDLE_TIMEOUT),
    };
    Some((stream, to, spiffe))
}

/// Serves the HTTP inside one tunnel until it ends; once the waypoint is closing, idle
/// HTTP/1.1 connections close and HTTP/2 ones get GOAWAY while requests in flight finish.
async fn serve_http(wp: Arc<Waypoint>, down: Arc<Downstream>, io: Rewind<H2Io>, peer: &str) {
    let (metrics, closing) = (wp.metrics.clone(), wp.closing.clone());
    let svc = hyper::service::service_fn(move |req| draining_close(wp.clone(), down.clone(), req));
    // No header timeout: it would also close idle pooled connections (see the module).
    let builder = crate::http::server::builder(None);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let served = tokio::select! {
        r = conn.as_mut() => r,
        _ = closing.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        // hyper has already answered a malformed request (400) or a head too large (431)
        // where it could.
        if let Some(reason) = e.downcast_ref::<hyper::Error>().and_then(crate::http::server::refusal) {
            info!(target: "access", src_identity = %peer, error = %e, reason, "request refused by the HTTP server");
            metrics.reject(reason);
        } else {
            debug!(error = %e, "HTTP connection in tunnel ended with an error");
        }
    }
}

/// A stream to `service` that is TCP (declared, or no HTTP seen): the service's L4 policy,
/// then its TCPRoute's backend (or its own endpoints).
async fn tcp_to_service(
    wp: &Waypoint,
    io: Rewind<H2Io>,
    (client_addr, peer): (SocketAddr, &Identity),
    dst: SocketAddr,
    service: &Arc<Service>,
) {
    let spiffe = peer.to_string();
    if let Decision::Deny(reason) = l4_decision(wp, &spiffe, &peer.namespace, client_addr, dst, Some(service)) {
        wp.metrics.reject("tcp_denied");
        info!(target: "access", src_addr = %client_addr, src_identity = %spiffe, dst_service = %service.hostname, %reason, "TCP connection refused");
        return;
    }
    let Some(b) = tcp_backend(wp, service, dst) else {
        info!(target: "access", src_identity = %spiffe, dst_service = %service.hostname, "no healthy TCP backend");
        return;
    };
    let labels = {
        let state = wp.state.load();
        let src = state.workload_by_ip(&wp.network, client_addr.ip());
        RequestLabels::new(src.map(|w| &**w), &spiffe, Some(&b.workload), Some(&b.service), "tcp")
    };
    let to = TcpTo {
        target: b.target,
        labels: labels.into(),
        idle: b.cluster.tcp_idle_timeout(),
    };
    let reached = tcp_to(wp, io, (client_addr, &spiffe), to).await.is_ok();
    b.cluster.record(&b.workload.uid, reached.then_some(StatusCode::OK));
}

/// Where a TCP connection to `service` goes: a TCPRoute's weighted backend if one is attached,
/// else the service itself; then an endpoint chosen by that backend's cluster.
fn tcp_backend(wp: &Waypoint, service: &Arc<Service>, dst: SocketAddr) -> Option<crate::tcp::Backend> {
    let snapshot = wp.config.load();
    let state = wp.state.load();
    let route = snapshot.routes.get(&service.key()).and_then(|r| r.tcp.as_ref());
    let (backend, port) = match route.and_then(|r| crate::http::admission::pick_backend(&r.backends)) {
        Some(b) => {
            let svc = state.service(&b.service)?.clone();
            let port = crate::upstream::backend_port(&svc, b.port, dst.port());
            (svc, port)
        }
        None => (service.clone(), dst.port()),
    };
    let routes = snapshot.routes.get(&backend.key()).map(|r| &r.config);
    let policy = crate::upstream::effective_policy(routes, None);
    let eps = crate::locality::candidates(&state, &backend, None, &policy);
    let cluster = wp.upstreams.cluster(&backend.key(), "", policy);
    let workload = cluster.pick(&eps)?;
    let target = crate::upstream::target(&workload, &backend, port, dst.ip())?.target;
    Some(crate::tcp::Backend {
        cluster,
        workload,
        service: backend,
        target,
    })
}

/// Whether traffic to `service` on `port` must be HTTP, from the declared port protocol, the
/// attached routes and the policies in force.
fn must_be_http(wp: &Waypoint, state: &mesh_core::state::State, service: &Service, port: u16) -> Option<HttpOnly> {
    let snapshot = wp.config.load();
    let gateway = (wp.gateway.0.as_str(), wp.gateway.1.as_str());
    let key = service.key();
    let http_routes = snapshot.routes.get(&key).is_some_and(|r| !r.is_empty());
    let policies = snapshot.policies_for(gateway, (service.namespace.as_str(), service.name.as_str()));
    http_only(state.port_protocol(&key, port), http_routes, policies)
}

/// What a stream turned out to carry.
enum Sniffed {
    Http(Rewind<H2Io>),
    Tcp(Rewind<H2Io>),
}

/// Why a stream is not served.
#[derive(Debug, thiserror::Error)]
enum DetectError {
    #[error("reading the first bytes: {0}")]
    Io(#[from] io::Error),
    /// An HTTP-only port, and the client sent nothing within the header-read timeout.
    #[error("no request within the header-read timeout")]
    Silent,
    /// An HTTP-only port, and the first bytes cannot start an HTTP request.
    #[error("the first bytes are not HTTP")]
    NotHttp,
}

impl DetectError {
    /// The `reason` label of `waypoint_rejected_requests_total`.
    fn reason(&self) -> &'static str {
        match self {
            DetectError::Io(_) => "stream_error",
            DetectError::Silent => "header_timeout",
            DetectError::NotHttp => "not_http",
        }
    }
}

/// Reads the first bytes to tell HTTP from other TCP protocols. Where the port may carry
/// TCP, a client silent for [`DETECT_TIMEOUT`] is a server-first protocol; where it must be
/// HTTP (`must` is set), the client gets `header_timeout` to start its request, and bytes
/// that cannot start one are refused.
async fn detect(mut io: H2Io, must: Option<HttpOnly>, header_timeout: Duration) -> Result<Sniffed, DetectError> {
    let mut buf = BytesMut::with_capacity(1024);
    let wait = if must.is_some() { header_timeout } else { DETECT_TIMEOUT };
    let http = match tokio::time::timeout(wait, io.read_buf(&mut buf)).await {
        Ok(Ok(0)) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "empty stream").into()),
        Ok(Ok(_)) if must.is_some() => {
            if !plausible_http(&buf) {
                return Err(DetectError::NotHttp);
            }
            true
        }
        Ok(Ok(_)) => looks_like_http(&buf),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) if must.is_some() => return Err(DetectError::Silent),
        Err(_) => false,
    };
    let io = Rewind {
        prefix: buf.freeze(),
        inner: io,
    };
    Ok(if http { Sniffed::Http(io) } else { Sniffed::Tcp(io) })
}

/// [`proxy::handle`], and while draining every HTTP/1.x answer says `Connection: close`, so a
/// client opens its next connection (to a replica that stays) instead of racing the close.
async fn draining_close(
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<crate::upstream::Body>, std::convert::Infallible> {
    let http1 = req.version() < http::Version::HTTP_2;
    let drain = wp.drain.clone();
    let mut resp = proxy::handle(wp, down, req).await?;
    if http1 && drain.is_cancelled() && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// The decision on a connection proxied as opaque TCP; a denial names the policy and rule.
fn l4_decision(
    wp: &Waypoint,
    principal: &str,
    namespace: &str,
    client: SocketAddr,
    dst: SocketAddr,
    service: Option<&mesh_core::state::model::Service>,
) -> Decision {
    let snapshot = wp.config.load();
    let gateway = (wp.gateway.0.as_str(), wp.gateway.1.as_str());
    let svc = service
        .map(|s| (s.namespace.as_str(), s.name.as_str()))
        .unwrap_or(("", ""));
    let attrs = ConnectionAttrs {
        source_principal: principal.strip_prefix("spiffe://").unwrap_or(principal),
        source_namespace: namespace,
        source_ip: client.ip(),
        port: dst.port(),
    };
    authz::evaluate_tcp(snapshot.policies_for(gateway, svc), &attrs)
}

fn accept_l4(
    wp: &Waypoint,
    c: InboundConnect,
    client: SocketAddr,
    service: Option<&mesh_core::state::model::Service>,
) -> Result<Rewind<H2Io>, ()> {
    let spiffe = c.peer_identity.to_string();
    if let Decision::Deny(reason) = l4_decision(wp, &spiffe, &c.peer_identity.namespace, client, c.dst, service) {
        info!(target: "access", src_addr = %client, src_identity = %spiffe, dst = %c.dst, %reason, "TCP connection refused");
        c.reject(StatusCode::UNAUTHORIZED);
        return Err(());
    }
    let io = c.accept().map_err(|_| ())?.into_io();
    Ok(Rewind {
        prefix: Bytes::new(),
        inner: io,
    })
}

/// Where a waypoint sends a TCP stream, and how it is counted.
struct TcpTo {
    target: SocketAddr,
    labels: TcpLabels,
    /// The backend's TCP idle timeout.
    idle: Option<Duration>,
}

/// Proxies a TCP stream from `(client address, identity)` as `to` says; an error when its
/// upstream could not be reached.
async fn tcp_to(
    wp: &Waypoint,
    down: Rewind<H2Io>,
    (src_addr, src_identity): (SocketAddr, &str),
    to: TcpTo,
) -> io::Result<()> {
    let mut up = match wp.upstreams.connector.open(to.target).await {
        Ok(up) => up,
        Err(e) => {
            warn!(error = %e, target = %to.target, "TCP upstream connect failed");
            crate::tcp::connect_failed(wp, to.labels);
            return Err(e);
        }
    };
    let flow = crate::tcp::Flow {
        labels: to.labels,
        idle: to.idle,
        src_addr,
        src_identity,
        dst_addr: to.target,
        already_sent: 0,
    };
    crate::tcp::proxy(wp, down, &mut up, flow).await;
    Ok(())
}

#[cfg(test)]
mod client_addr_tests {
    use super::client_addr;

    #[test]
    fn only_the_peers_own_address_is_taken_from_forwarded() {
        let peer = "10.0.0.5:40000".parse().unwrap();
        let cases = [
            (None, "10.0.0.5:40000"),
            (Some("10.0.0.5:1234"), "10.0.0.5:1234"),
            (Some("127.0.0.1:1234"), "10.0.0.5:40000"),
            (Some("10.0.0.9:1234"), "10.0.0.5:40000"),
            (Some("0.0.0.0:1"), "10.0.0.5:40000"),
        ];
        for (forwarded, want) in cases {
            let got = client_addr(forwarded.map(|f| f.parse().unwrap()), peer);
            assert_eq!(got, want.parse().unwrap(), "forwarded {forwarded:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waypoint serves what names it, by its Service's hostname or address, and nothing
    /// else: not another namespace's waypoint of the same name, not a longer name.
    #[test]
    fn a_destination_is_bound_here_only_when_it_names_this_waypoint() {
        let service = |namespace: &str| {
            Arc::new(Service {
                name: "waypoint".into(),
                namespace: namespace.into(),
                hostname: format!("waypoint.{namespace}.svc.cluster.local"),
                vips: vec![],
                ports: vec![],
                subject_alt_names: vec![],
                waypoint: None,
                only_healthy: true,
            })
        };
        let (own, other) = (service("shop"), service("evil"));
        let (vip, evil_vip): (std::net::IpAddr, std::net::IpAddr) =
            ("10.96.0.50".parse().unwrap(), "10.96.9.50".parse().unwrap());
        let lookup = |_: &str, ip: std::net::IpAddr| {
            (ip == vip)
                .then(|| Destination::Service(own.clone()))
                .or_else(|| (ip == evil_vip).then(|| Destination::Service(other.clone())))
        };
        let host = |ns: &str, h: &str| GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: ns.into(),
                hostname: h.into(),
            },
            hbone_port: 15008,
        };
        let addr = |ip| GatewayAddress {
            destination: GatewayDestination::Address {
                network: String::new(),
                ip,
            },
            hbone_port: 15008,
        };
        let table = [
            (host("shop", "waypoint.shop.svc.cluster.local"), true),
            (host("evil", "waypoint.evil.svc.cluster.local"), false),
            (host("shop", "waypoint.evil.svc.cluster.local"), false),
            (host("shop", "waypoint-2.shop.svc.cluster.local"), false),
            (host("shop", "waypoint.shop"), false),
            (addr(vip), true),
            (addr(evil_vip), false),
            (addr("10.1.2.3".parse().unwrap()), false),
        ];
        for (gw, want) in table {
            assert_eq!(names_gateway(("shop", "waypoint"), &gw, lookup), want, "{gw:?}");
        }
    }

    /// A tunnel's task lives as long as its connection: the rarer TCP paths are boxed so
    /// that their state does not double every HTTP tunnel's.
    #[test]
    fn a_tunnel_future_stays_small() {
        let size = crate::future_size(|(wp, c)| tunnel(wp, c));
        assert!(size <= 4 * 1024, "a tunnel's future grew to {size} bytes");
    }

    #[test]
    fn detection() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(looks_like_http(b"POS"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
    }

    #[test]
    fn plausible_http_accepts_any_method_token() {
        assert!(plausible_http(b"FOO / HTTP/1.1\r\n"));
        assert!(plausible_http(b"GET"));
        assert!(plausible_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!plausible_http(b"\x16\x03\x01\x02\x00"));
        assert!(!plausible_http(b" GET /"));
        assert!(
            !plausible_http(b"SSH-2.0-OpenSSH_9.6\r\n"),
            "no space within a method's length"
        );
        assert!(!plausible_http(&[b'A'; MAX_METHOD + 1]));
    }

    #[test]
    fn opaque_tcp_only_where_nothing_needs_http() {
        let rule_with = |paths: Vec<String>| wp::Rule {
            to: vec![wp::Operation {
                paths,
                ..Default::default()
            }],
            ..Default::default()
        };
        let authz = |rule: wp::Rule| wp::Policy {
            kind: Some(wp::policy::Kind::Authorization(wp::Authorization {
                action: wp::Action::Deny as i32,
                rules: vec![rule],
                dry_run: false,
            })),
            ..Default::default()
        };
        let l7 = authz(rule_with(vec!["/admin*".into()]));
        let l4 = authz(rule_with(vec![]));
        let jwt = wp::Policy {
            kind: Some(wp::policy::Kind::Jwt(wp::JwtAuthentication::default())),
            ..Default::default()
        };
        let none: [&wp::Policy; 0] = [];
        assert_eq!(http_only(AppProtocol::Unknown, false, none), None);
        assert_eq!(http_only(AppProtocol::Unknown, false, [&l4]), None);
        assert_eq!(
            http_only(AppProtocol::Http11, false, none),
            Some(HttpOnly::DeclaredPort)
        );
        assert_eq!(http_only(AppProtocol::Grpc, false, none), Some(HttpOnly::DeclaredPort));
        assert_eq!(http_only(AppProtocol::Unknown, true, none), Some(HttpOnly::Routes));
        assert_eq!(
            http_only(AppProtocol::Unknown, false, [&l4, &l7]),
            Some(HttpOnly::Policy)
        );
        assert_eq!(http_only(AppProtocol::Unknown, false, [&jwt]), Some(HttpOnly::Policy));
    }
}

#[cfg(test)]
mod connect_target_tests {
    use super::*;
    use mesh_proto::workload as pb;

    /// `ip:port` authorities look the address up; a `hostname:port` one (double HBONE) is the
    /// service of that name at its VIP on our network, and an unknown name is nothing, never
    /// the listener's own address (which stands in `dst` for hostname authorities).
    #[test]
    fn hostname_authorities_name_the_service() {
        let mut s = mesh_core::state::State::default();
        s.apply_address(&pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                addresses: vec![
                    pb::NetworkAddress {
                        network: "other".into(),
                        address: vec![10, 96, 1, 1],
                    },
                    pb::NetworkAddress {
                        network: "net1".into(),
                        address: vec![10, 96, 0, 1],
                    },
                ],
                ..Default::default()
            })),
        })
        .expect("valid");
        let own: SocketAddr = "10.0.0.9:80".parse().unwrap();
        let (dst, target) = connect_target(
            &s,
            ("net1", ("shop", "waypoint")),
            own,
            Some("web.shop.svc.cluster.local"),
        )
        .expect("known");
        assert_eq!(dst, "10.96.0.1:80".parse().unwrap());
        assert!(matches!(target, Some(Destination::Service(svc)) if svc.name == "web"));
        assert!(connect_target(
            &s,
            ("net1", ("shop", "waypoint")),
            own,
            Some("nope.shop.svc.cluster.local")
        )
        .is_none());
        let (dst, target) = connect_target(
            &s,
            ("net1", ("shop", "waypoint")),
            "10.96.0.1:80".parse().unwrap(),
            None,
        )
        .expect("address");
        assert_eq!(dst, "10.96.0.1:80".parse().unwrap());
        assert!(matches!(target, Some(Destination::Service(_))));
    }
}

#[cfg(test)]
mod admit_tests {
    use super::*;
    use mesh_core::state::model::PortMapping;

    const GATEWAY: (&str, &str) = ("shop", "waypoint");

    fn own() -> Identity {
        "spiffe://cluster.local/ns/shop/sa/waypoint".parse().unwrap()
    }

    fn ours() -> Option<GatewayAddress> {
        Some(GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "shop".into(),
                hostname: "waypoint.shop.svc.cluster.local".into(),
            },
            hbone_port: 15008,
        })
    }

    /// `web` (VIP 10.96.0.1) declares 80 -> 8080 and uses this waypoint; so does the workload
    /// `db` at 10.0.0.7.
    fn state() -> mesh_core::state::State {
        let mut s = mesh_core::state::State::default();
        s.upsert_service(Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            vips: vec![(String::new(), "10.96.0.1".parse().unwrap())],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
            subject_alt_names: vec![],
            waypoint: ours(),
            only_healthy: true,
        });
        let mut db = (*crate::upstream::cluster::tests::workload("db")).clone();
        db.namespace = "shop".into();
        db.addresses = vec!["10.0.0.7".parse().unwrap()];
        db.waypoint = ours();
        s.upsert_workload(db);
        s
    }

    /// What the waypoint decides on a CONNECT to `authority` (a `hostname:port` when `host`).
    fn decide(s: &mesh_core::state::State, authority: &str, host: Option<&str>) -> Result<(), TunnelRefusal> {
        let (dst, target) = connect_target(s, ("", GATEWAY), authority.parse().unwrap(), host).expect("known");
        let client: Identity = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
        admit(s, (&own(), GATEWAY), &client, dst, target.as_ref())
    }

    /// A service is served only on the ports it declares, by VIP and by hostname: never the
    /// pod's target port or another port of the pod (an admin listener) under the waypoint's
    /// identity. A workload-addressed stream has no service ports and goes on as addressed.
    #[test]
    fn a_service_is_served_only_on_its_declared_ports() {
        let s = state();
        let host = Some("web.shop.svc.cluster.local");
        assert_eq!(decide(&s, "10.96.0.1:80", None), Ok(()));
        assert_eq!(decide(&s, "10.0.0.9:80", host), Ok(()));
        for port in [8080, 9090] {
            let vip = format!("10.96.0.1:{port}");
            assert_eq!(decide(&s, &vip, None), Err(TunnelRefusal::UndeclaredPort), "{vip}");
            let own = format!("10.0.0.9:{port}");
            assert_eq!(decide(&s, &own, host), Err(TunnelRefusal::UndeclaredPort), "{port}");
        }
        assert_eq!(TunnelRefusal::UndeclaredPort.reason(), "undeclared_port");
        assert_eq!(TunnelRefusal::UndeclaredPort.status(), StatusCode::BAD_REQUEST);
        assert_eq!(decide(&s, "10.0.0.7:9090", None), Ok(()));
        // A service without ports declares none.
        let mut s = s;
        let web = (**s
            .services_by_hostname("web.shop.svc.cluster.local")
            .next()
            .expect("web"))
        .clone();
        s.upsert_service(Service { ports: vec![], ..web });
        assert_eq!(decide(&s, "10.96.0.1:80", None), Err(TunnelRefusal::UndeclaredPort));
    }

    /// A CONNECT whose peer is this waypoint (a service whose upstream leads back here, or a
    /// replica of it) is refused as a loop, whatever it names; another peer is served.
    #[test]
    fn a_connect_from_this_waypoint_itself_is_a_loop() {
        let s = state();
        let (dst, target) = connect_target(&s, ("", GATEWAY), "10.96.0.1:80".parse().unwrap(), None).expect("known");
        let from = |peer: &Identity| admit(&s, (&own(), GATEWAY), peer, dst, target.as_ref());
        assert_eq!(from(&own()), Err(TunnelRefusal::Loop));
        assert_eq!(TunnelRefusal::Loop.reason(), "loop");
        let other: Identity = "spiffe://cluster.local/ns/other/sa/waypoint".parse().unwrap();
        assert_eq!(from(&other), Ok(()));
    }
}

#[cfg(test)]
mod workload_tests {
    use super::*;
    use mesh_core::hbone::{HbonePool, PoolKey, TunnelRequest};
    use mesh_core::identity::{CertManager, CertificateSigner, DevCa};
    use mesh_core::socket::PlainSockets;
    use mesh_core::state::model::Workload;
    use prost::Message;
    use tokio::io::AsyncWriteExt;

    const GATEWAY: (&str, &str) = ("ns", "waypoint");
    const WAIT: Duration = Duration::from_secs(10);

    /// A policy of `kind` in `ns` targeting the `(target kind, name)`.
    fn policy(kind: wp::policy::Kind, (target, name): (&str, &str)) -> wp::Policy {
        wp::Policy {
            name: "p".into(),
            namespace: "ns".into(),
            targets: vec![wp::Target {
                kind: target.into(),
                namespace: String::new(),
                name: name.into(),
            }],
            kind: Some(kind),
        }
    }

    fn rate_limit() -> wp::policy::Kind {
        wp::policy::Kind::RateLimit(wp::RateLimit {
            max_tokens: 1,
            tokens_per_fill: 1,
            fill_interval: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
            per_source: false,
        })
    }

    /// `policies` applied to a fresh store, by name.
    fn store_with(policies: &[wp::Policy]) -> Arc<crate::store::ConfigStore> {
        let store = crate::store::ConfigStore::new();
        let encoded: Vec<(String, Vec<u8>)> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("Policy/ns/p{i}"), p.encode_to_vec()))
            .collect();
        let upserts: Vec<(String, &[u8])> = encoded.iter().map(|(n, b)| (n.clone(), b.as_slice())).collect();
        assert!(store.apply_policies(&upserts, &[]).is_empty());
        store
    }

    /// What the Gateway's policies need decides a workload-addressed stream: a rate limit, a
    /// RequestAuthentication or an L7 rule on the Gateway refuse it; L4 rules, and policies of
    /// a service or another gateway, do not.
    #[test]
    fn gateway_policies_that_need_http_refuse_workload_streams() {
        let jwt = wp::policy::Kind::Jwt(wp::JwtAuthentication::default());
        let authz = |paths: Vec<String>| {
            wp::policy::Kind::Authorization(wp::Authorization {
                action: wp::Action::Deny as i32,
                rules: vec![wp::Rule {
                    to: vec![wp::Operation {
                        paths,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                dry_run: false,
            })
        };
        let refused = Err(TunnelRefusal::WorkloadNeedsHttp);
        let cases = [
            (vec![], Ok(())),
            (vec![policy(rate_limit(), ("Gateway", "waypoint"))], refused),
            (vec![policy(jwt.clone(), ("Gateway", "waypoint"))], refused),
            (
                vec![policy(authz(vec!["/admin".into()]), ("Gateway", "waypoint"))],
                refused,
            ),
            (vec![policy(authz(vec![]), ("Gateway", "waypoint"))], Ok(())),
            (vec![policy(rate_limit(), ("Service", "web"))], Ok(())),
            (vec![policy(jwt, ("Gateway", "other"))], Ok(())),
        ];
        for (policies, want) in cases {
            let store = store_with(&policies);
            assert_eq!(admit_workload(&store.load(), GATEWAY), want, "{policies:?}");
        }
        assert_eq!(TunnelRefusal::WorkloadNeedsHttp.reason(), "workload_needs_http");
        assert_eq!(TunnelRefusal::WorkloadNeedsHttp.status(), StatusCode::FORBIDDEN);
    }

    /// A waypoint `ns/waypoint` for workloads: the workload `db` at 127.0.0.1 uses it.
    fn waypoint_for_workloads(ca: Arc<dyn CertificateSigner>) -> Arc<Waypoint> {
        let mut registry = prometheus_client::registry::Registry::default();
        let state = mesh_core::state::StateStore::new();
        let mut db: Workload = (*crate::upstream::cluster::tests::workload("db")).clone();
        db.addresses = vec!["127.0.0.1".parse().unwrap()];
        db.waypoint = Some(GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "ns".into(),
                hostname: "waypoint.ns.svc.cluster.local".into(),
            },
            hbone_port: 15008,
        });
        state.update(|s| s.upsert_workload(db));
        let trace = crate::telemetry::trace::TraceConfig {
            zipkin: None,
            otlp: None,
            sampling: 0.0,
            tags: vec![],
            service: "waypoint.ns".into(),
            dropped: crate::telemetry::trace::register_dropped(&mut registry),
        };
        Arc::new(Waypoint {
            gateway: ("ns".into(), "waypoint".into()),
            identity: "spiffe://cluster.local/ns/ns/sa/waypoint".parse().unwrap(),
            network: String::new(),
            state,
            config: crate::store::ConfigStore::new(),
            certs: CertManager::new(ca, vec![], Default::default()),
            upstreams: crate::upstream::Upstreams::new(
                crate::upstream::connector::test_connector(),
                crate::upstream::tls::CredentialStore::new("ns/waypoint".into()),
            ),
            jwks: crate::policy::jwt::JwksCache::new(Duration::from_secs(60), Duration::from_secs(5)),
            metrics: crate::telemetry::metrics::Metrics::register(&mut registry),
            tracer: crate::telemetry::trace::Tracer::start(trace),
            access_log: crate::telemetry::access_log::Sinks::register(&mut registry, "waypoint.ns".into()),
            header_read_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(300),
            path_normalization: Default::default(),
            drain: Default::default(),
            closing: Default::default(),
            tasks: Default::default(),
            rate_limits: Default::default(),
            ingress: None,
        })
    }

    /// An echo server: what it reads, it writes back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// A pod-address CONNECT through a waypoint for workloads flows as TCP while nothing on
    /// the Gateway needs HTTP; once a LocalRateLimitPolicy targets the Gateway it is refused
    /// and counted, never carried past the rate limit as raw TCP.
    #[tokio::test]
    async fn a_gateway_rate_limit_refuses_workload_addressed_tcp() {
        let ca: Arc<dyn CertificateSigner> = Arc::new(DevCa::generate("cluster.local").unwrap());
        let wp = waypoint_for_workloads(ca.clone());
        wp.certs.fetch(&wp.identity).await.expect("waypoint certificate");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hbone = listener.local_addr().unwrap();
        tokio::spawn(serve(wp.clone(), listener, LimitConfig::default()));
        let pool = HbonePool::new(
            Settings::default(),
            CertManager::new(ca, vec![], Default::default()),
            Arc::new(PlainSockets::default()),
        );
        let db = echo().await;
        let req = TunnelRequest {
            key: PoolKey {
                src_identity: "spiffe://cluster.local/ns/ns/sa/client".parse().unwrap(),
                dst_identities: vec![wp.identity.clone()],
                src_ip: None,
                dst: hbone,
            },
            authority: db.to_string(),
            forwarded_for: None,
            baggage: None,
            traceparent: None,
        };

        let mut io = pool.connect(&req).await.expect("no policy needs HTTP").into_io();
        let hello = b"\x16\x03\x01 not http";
        io.write_all(hello).await.unwrap();
        let mut back = [0u8; 12];
        tokio::time::timeout(WAIT, io.read_exact(&mut back))
            .await
            .expect("echoed in time")
            .expect("echoed");
        assert_eq!(&back, hello);

        let limit = policy(rate_limit(), ("Gateway", "waypoint")).encode_to_vec();
        assert!(wp
            .config
            .apply_policies(&[("Policy/ns/rl".into(), limit.as_slice())], &[])
            .is_empty());
        let refused = pool.connect(&req).await;
        assert!(
            refused.is_err(),
            "a workload-addressed stream bypassed the gateway's rate limit"
        );
        let reason = vec![("reason".to_owned(), "workload_needs_http".to_owned())];
        assert_eq!(wp.metrics.rejected.get_or_create(&reason).get(), 1);
    }
}
