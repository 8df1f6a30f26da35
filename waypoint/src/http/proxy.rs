//! The per-request pipeline: authenticate (JWT), authorize, route, inject faults, then send
//! to a backend endpoint with the route's rewrites, timeouts, retries and mirrors, and
//! record the outcome (metrics, access log). Every refusal is an HTTP answer with a reason,
//! never a dropped connection.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use mesh_core::identity::Identity;
use mesh_core::state::model::{AppProtocol, Service, Workload};
use mesh_proto::waypoint as wp;
use rand::Rng;
use tracing::{debug, info};

mod mirror;

use super::admission::{self, Backend};
use super::local_reply::{full, BadRequest, LocalReply, ResponseFlag};
use super::retry::{self, to_duration, Attempt, RetryPolicy};
use super::rewrite::{self, UpgradeRequest};
use crate::idle;
use crate::store::Snapshot;
use crate::telemetry::access_log::Record;
use crate::telemetry::metrics::{IdleConnection, LabelSource, RequestLabels, SeriesLabels, StandardLabels};
use crate::telemetry::{apply, effective, trace};
use crate::upstream::cluster::{Admission, Cluster};
use crate::upstream::pool::PooledBody;
use crate::upstream::{self, Body};
use crate::Waypoint;

/// Bodies up to this size are buffered so that retries and mirrors can resend them; larger
/// or streaming bodies are passed through once.
const REPLAYABLE_BODY: usize = 64 * 1024;

/// The tunnel a request arrived on.
pub struct Downstream {
    /// The original client's identity (the HBONE peer's certificate); `None` at an ingress
    /// gateway, whose clients are outside the mesh.
    pub peer_identity: Option<Identity>,
    pub client_addr: SocketAddr,
    /// The original client's address as policy sees it (`remoteIpBlocks`): the peer's, or at
    /// an ingress gateway the X-Forwarded-For entry before the trusted proxies.
    pub remote_ip: std::net::IpAddr,
    /// `x-forwarded-proto` sent upstream: `https` where the gateway terminated TLS.
    pub forwarded_proto: &'static str,
    pub upstream_protocol: UpstreamProtocol,
    /// The CONNECT authority: a service VIP or workload address, and port.
    pub dst: SocketAddr,
    pub service: Arc<Service>,
    /// `service.key()`, computed once per tunnel rather than per request.
    pub service_key: String,
}

/// Which HTTP version goes upstream when the backend's port declares none (appProtocol or
/// port name): see [`upstream_http2`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// The client's (a waypoint: the mesh client speaks what the application speaks).
    AsClient,
    /// HTTP/2 for gRPC, HTTP/1.1 otherwise (an ingress gateway: a browser's ALPN h2 says
    /// nothing about the backend).
    Http2ForGrpc,
}

/// Whether a request goes upstream over HTTP/2. The backend port's declared protocol decides
/// first, as Istio's clusters do: `http2`, `h2c` and `grpc` ports get HTTP/2 whatever the client
/// spoke, `http` ports HTTP/1.1 — except gRPC, which HTTP/1.1 cannot carry (trailers): Istio
/// would send it and fail, we send it as HTTP/2. An undeclared port, or one declared with a
/// protocol this version does not know, follows the role. A
/// WebSocket upgrade is an HTTP/1.1 mechanism and stays on HTTP/1.1.
pub fn upstream_http2(
    role: UpstreamProtocol,
    declared: AppProtocol,
    client: Version,
    grpc: bool,
    websocket: bool,
) -> bool {
    if websocket {
        return false;
    }
    match declared {
        AppProtocol::Http2 | AppProtocol::Grpc => true,
        AppProtocol::Http11 => grpc,
        AppProtocol::Unknown | AppProtocol::OtherHttp => match role {
            UpstreamProtocol::AsClient => client == Version::HTTP_2,
            UpstreamProtocol::Http2ForGrpc => grpc,
        },
    }
}

/// gRPC proper (`application/grpc`, `+proto`, `;...`), not gRPC-Web, which HTTP/1.1 carries.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let rest = v.as_bytes().strip_prefix(b"application/grpc");
        rest.is_some_and(|r| r.is_empty() || r.starts_with(b"+") || r.starts_with(b";"))
    })
}

/// What the access log and metrics say about a request beyond its status.
#[derive(Default)]
struct Outcome {
    flags: ResponseFlag,
    /// Set when the waypoint answered itself (a gRPC client sees this status).
    grpc_status: Option<u8>,
    route: String,
    upstream: Option<Arc<Workload>>,
    /// The service the route sent to (an ingress gateway reports it as the destination).
    backend: Option<Arc<Service>>,
    attempts: u32,
    reason: String,
    /// The path and host as authorization, routing and the backend see them (canonical), so
    /// that telemetry reports what was served; as they arrived when sanitizing refused them.
    path: String,
    host: String,
}

/// Serves one request; never fails (errors become responses).
pub async fn handle(
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let seen = Arrival::new(&wp, &down, &mut req);
    let mut outcome = Outcome::default();
    // Boxed: an HTTP/1.1 connection keeps a slot the size of this future for its whole life,
    // idle or not; the box (~6 KB) lives only while a request does.
    let resp = Box::pin(process(&wp, &down, req, &mut outcome)).await;
    seen.record(&wp, &down, &resp, &outcome);
    Ok(resp)
}

/// What telemetry keeps of a request as it arrived (its path and host are the [`Outcome`]'s:
/// the canonical ones, known only once sanitized).
struct Arrival {
    start: Instant,
    started_at: std::time::SystemTime,
    trace: Option<trace::TraceContext>,
    grpc: bool,
    method: Method,
    request_size: f64,
    /// A Telemetry's custom span tags, read from the request as it arrived.
    custom_tags: Vec<(String, String)>,
    no_spans: bool,
    /// Kept only when a Telemetry's expressions read request headers.
    headers: Option<http::HeaderMap>,
}

fn content_length(headers: &http::HeaderMap) -> Option<f64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
}

impl Arrival {
    fn new(wp: &Waypoint, down: &Downstream, req: &mut Request<Incoming>) -> Self {
        let snapshot = wp.config.load();
        let gateway = (wp.gateway.0.as_str(), wp.gateway.1.as_str());
        let effective = effective::effective(&snapshot, gateway, (&down.service.namespace, &down.service.name));
        // Without a collector the waypoint leaves trace headers as the client sent them.
        let trace = wp.tracer.enabled().then(|| {
            let ctx = trace::extract(req.headers(), apply::sampling(&effective, wp.tracer.sampling));
            trace::inject(&ctx, req.headers_mut());
            ctx
        });
        Arrival {
            start: Instant::now(),
            started_at: std::time::SystemTime::now(),
            trace,
            grpc: req
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            method: req.method().clone(),
            request_size: content_length(req.headers()).unwrap_or(0.0),
            custom_tags: apply::custom_tags(&effective, req.headers()),
            no_spans: effective.tracing.is_some_and(|t| t.disable_span_reporting),
            headers: apply::needs_headers(&effective).then(|| req.headers().clone()),
        }
    }

    /// What a Telemetry's expressions can read of the answered request.
    fn facts<'a>(
        &'a self,
        down: &'a Downstream,
        resp: &Response<Body>,
        out: &'a Outcome,
        principal: &'a str,
    ) -> apply::Facts<'a> {
        apply::Facts {
            status: resp.status().as_u16(),
            method: self.method.as_str(),
            path: &out.path,
            host: &out.host,
            protocol: if self.grpc { "grpc" } else { "http" },
            headers: self.headers.as_ref(),
            source_principal: principal,
            source_namespace: down.peer_identity.as_ref().map_or("", |i| i.namespace.as_str()),
            source_workload: "",
            service_name: &down.service.name,
            service_host: &down.service.hostname,
            service_namespace: &down.service.namespace,
            destination_workload: out.upstream.as_ref().map_or("", |w| w.workload_name.as_str()),
            port: down.dst.port(),
        }
    }

    /// Metrics, the access log line and the trace span of a finished request.
    fn record(self, wp: &Waypoint, down: &Downstream, resp: &Response<Body>, out: &Outcome) {
        let elapsed = self.start.elapsed();
        let snapshot = wp.config.load();
        let gateway = (wp.gateway.0.as_str(), wp.gateway.1.as_str());
        let effective = effective::effective(&snapshot, gateway, (&down.service.namespace, &down.service.name));
        let principal = down.peer_identity.as_ref().map(|i| i.principal()).unwrap_or_default();
        let facts = self.facts(down, resp, out, &principal);
        self.metrics(wp, down, resp, out, elapsed, (&effective, &facts));
        if apply::log_wanted(&effective, &facts) {
            let log = effective.access_log;
            if !log.is_some_and(|a| a.no_stdout) {
                self.log(down, resp, out, elapsed);
            }
            if let Some(a) = log.filter(|a| !a.otlp.is_empty()) {
                wp.access_log.send(&a.otlp, self.log_record(down, resp, out, elapsed));
            }
        }
        self.span(wp, down, resp, out, elapsed);
    }

    fn log(&self, down: &Downstream, resp: &Response<Body>, out: &Outcome, elapsed: Duration) {
        let src_identity = down.peer_identity.as_ref().map(ToString::to_string);
        // Strings go in as `&str`, not `%` (Display): the JSON formatter then writes them
        // without first formatting each into a String of its own.
        info!(
            target: "access",
            src_addr = %down.client_addr,
            src_identity = src_identity.as_deref().unwrap_or("-"),
            dst_service = down.service.hostname.as_str(),
            dst_workload = out.upstream.as_ref().map(|w| w.name.as_str()).unwrap_or("-"),
            method = self.method.as_str(),
            path = out.path.as_str(),
            status = resp.status().as_u16(),
            flags = out.flags.as_str(),
            route = out.route.as_str(),
            attempts = out.attempts,
            reason = out.reason.as_str(),
            trace = %self.trace.as_ref().map(trace::describe).unwrap_or_default(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }

    /// The access-log line's fields as an OTLP log record (Telemetry access-log providers).
    fn log_record(&self, down: &Downstream, resp: &Response<Body>, out: &Outcome, elapsed: Duration) -> Record {
        let src_identity = down.peer_identity.as_ref().map(ToString::to_string);
        let mut r = Record::new("request")
            .str("src_addr", down.client_addr.to_string())
            .str("src_identity", src_identity.unwrap_or_else(|| "-".into()))
            .str("dst_service", down.service.hostname.as_str())
            .str("dst_workload", out.upstream.as_ref().map_or("-", |w| w.name.as_str()))
            .str("method", self.method.as_str())
            .str("path", out.path.as_str())
            .int("status", i64::from(resp.status().as_u16()))
            .str("flags", out.flags.as_str())
            .str("route", out.route.as_str())
            .int("attempts", i64::from(out.attempts))
            .str("reason", out.reason.as_str())
            .double("duration_ms", elapsed.as_secs_f64() * 1000.0);
        r.time = self.started_at;
        r.trace = self.trace.as_ref().map(|t| (t.trace_id, t.span_id));
        r
    }

    fn metrics(
        &self,
        wp: &Waypoint,
        down: &Downstream,
        resp: &Response<Body>,
        out: &Outcome,
        elapsed: Duration,
        (effective, facts): (&effective::Effective<'_>, &apply::Facts<'_>),
    ) {
        let code = resp.status().as_u16();
        let state = wp.state.load();
        // An ingress gateway reports itself as the source; a waypoint the client.
        let (service, src) = match &wp.ingress {
            Some(_) => (out.backend.as_ref().unwrap_or(&down.service), LabelSource::default()),
            None => (
                &down.service,
                LabelSource {
                    workload: state.workload_by_ip(&wp.network, down.client_addr.ip()),
                    peer: down.peer_identity.as_ref(),
                },
            ),
        };
        let build = || self.labels(wp, down, resp, out, src.workload.map(|w| &**w));
        let labels = if self.grpc {
            // gRPC responses carry their own status label: built per request.
            StandardLabels::new(build())
        } else {
            let key = (out.upstream.as_ref(), service);
            wp.metrics.labels.get(src, key, (code, out.flags.as_str()), build)
        };
        // One standard label set, its hash computed once, that each family looks up by
        // reference (from the cache but for gRPC); a Telemetry's overrides build their own.
        let standard = SeriesLabels::Standard(labels.clone());
        let series = |metric| -> Option<Cow<'_, SeriesLabels>> {
            if effective::overrides_for(effective, metric).next().is_none() {
                return Some(Cow::Borrowed(&standard));
            }
            let l = apply::series(effective, metric, &labels, facts)?;
            Some(Cow::Owned(wp.metrics.admit(l, || labels.clone())))
        };
        if let Some(l) = series("REQUEST_COUNT") {
            wp.metrics.requests.get_or_create(&l).inc();
        }
        if let Some(l) = series("REQUEST_DURATION") {
            wp.metrics
                .duration
                .get_or_create(&l)
                .observe(elapsed.as_secs_f64() * 1000.0);
        }
        if let Some(l) = series("REQUEST_SIZE") {
            wp.metrics.request_bytes.get_or_create(&l).observe(self.request_size);
        }
        if let (Some(len), Some(l)) = (content_length(resp.headers()), series("RESPONSE_SIZE")) {
            wp.metrics.response_bytes.get_or_create(&l).observe(len);
        }
    }

    /// Istio's standard labels of this request's series; `src` is the workload at the client's
    /// address (a waypoint's source; an ingress gateway reports itself).
    fn labels(
        &self,
        wp: &Waypoint,
        down: &Downstream,
        resp: &Response<Body>,
        out: &Outcome,
        src: Option<&Workload>,
    ) -> RequestLabels {
        let protocol = if self.grpc { "grpc" } else { "http" };
        let dst = out.upstream.as_deref();
        let mut labels = if wp.ingress.is_some() {
            // Istio's gateway reports as the source of the request it sends into the mesh.
            let service = out.backend.as_deref().unwrap_or(&down.service);
            RequestLabels::from_gateway((&wp.identity, &wp.gateway), dst, service, protocol)
        } else {
            let principal = down.peer_identity.as_ref().map(ToString::to_string).unwrap_or_default();
            RequestLabels::new(src, &principal, dst, Some(&down.service), protocol)
        };
        labels.response_code = resp.status().as_u16();
        labels.response_flags = out.flags.as_str();
        if self.grpc {
            let header = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok());
            labels.grpc_response_status = match (header, out.grpc_status) {
                (Some(s), _) => s.to_owned(),
                (None, Some(local)) => local.to_string(),
                (None, None) => "0".to_owned(),
            };
        }
        labels
    }

    fn span(self, wp: &Waypoint, down: &Downstream, resp: &Response<Body>, out: &Outcome, elapsed: Duration) {
        let Some(ctx) = self.trace.filter(|c| c.sampled && !self.no_spans) else {
            return;
        };
        let mut tags = vec![
            (Cow::Borrowed("http.method"), self.method.to_string()),
            (Cow::Borrowed("http.url"), out.path.clone()),
            (Cow::Borrowed("http.status_code"), resp.status().as_u16().to_string()),
            (Cow::Borrowed("response_flags"), out.flags.as_str().to_owned()),
            (
                Cow::Borrowed("istio.destination_service"),
                down.service.hostname.clone(),
            ),
            (
                Cow::Borrowed("peer.identity"),
                down.peer_identity.as_ref().map(ToString::to_string).unwrap_or_default(),
            ),
            (
                Cow::Borrowed("upstream_cluster"),
                out.upstream.as_ref().map(|w| w.name.clone()).unwrap_or_default(),
            ),
        ];
        tags.extend(self.custom_tags.into_iter().map(|(k, v)| (Cow::Owned(k), v)));
        wp.tracer.finish(trace::Span {
            ctx,
            name: format!("{}:{}{}", down.service.hostname, down.dst.port(), out.path),
            start: self.started_at,
            duration: elapsed,
            tags,
        });
    }
}

async fn process(wp: &Arc<Waypoint>, down: &Downstream, req: Request<Incoming>, out: &mut Outcome) -> Response<Body> {
    match pipeline(wp, down, req, out).await {
        Ok(resp) => resp,
        Err(reply) => local_reply(wp, reply, out),
    }
}

/// The host telemetry reports: `Host` (which sanitizing writes from the URI's authority), else
/// the URI's host.
fn logged_host(parts: &Parts) -> &str {
    let host = parts.headers.get(header::HOST).and_then(|v| v.to_str().ok());
    host.or_else(|| parts.uri.host()).unwrap_or_default()
}

/// Answers locally: the reply decides the status, flag, body and counters.
fn local_reply(wp: &Waypoint, reply: LocalReply, out: &mut Outcome) -> Response<Body> {
    out.flags = reply.flag();
    out.grpc_status = Some(reply.grpc_status());
    if let Some(why) = reply.log_reason() {
        out.reason = why;
    }
    if let Some(reason) = reply.reject_reason() {
        wp.metrics.reject(reason);
    }
    reply.into_response()
}

/// The stages in order; the first that answers locally ends the request.
async fn pipeline(
    wp: &Arc<Waypoint>,
    down: &Downstream,
    req: Request<Incoming>,
    out: &mut Outcome,
) -> Result<Response<Body>, LocalReply> {
    let snapshot = wp.config.load();
    let target = admission::Target::new(wp, &down.service);
    let (mut parts, body) = req.into_parts();
    let sanitized = admission::sanitize(&mut parts, wp.path_normalization);
    // Telemetry reports the request that is served, not its spelling (a Telemetry filter on
    // `/admin` missed `/public/../admin`); one refused here has no canonical form.
    out.path = parts.uri.path().to_owned();
    out.host = logged_host(&parts).to_owned();
    if let Some(note) = sanitized? {
        out.reason = note;
    }
    let principal = admission::authenticate(wp, &snapshot, &target, &mut parts).await?;
    let host = admission::request_host(&parts, &down.service);
    admission::authorize(&snapshot, &target, down, principal.as_ref(), &parts, &host)?;
    let routed = admission::select_route(&snapshot, down, &parts)?;
    out.route = routed.route.name.clone();
    admission::rate_limit(wp, &snapshot, &target, down, &routed.route.name)?;
    let host = admission::apply_route(&routed, &mut parts, host, down).await?;
    let rt = &routed.route;

    let forward = async {
        let request = Forward {
            snapshot: &snapshot,
            rt,
            parts,
            body,
            host,
        };
        let answer = forward(wp, down, request, out).await;
        answer.unwrap_or_else(|reply| local_reply(wp, reply, out))
    };
    let mut resp = match to_duration(rt.timeout.as_ref()) {
        Some(t) => match tokio::time::timeout(t, forward).await {
            Ok(r) => r,
            Err(_) => local_reply(wp, LocalReply::UpstreamTimeout, out),
        },
        None => forward.await,
    };
    // Also on the waypoint's own answers from forwarding (Envoy's route-level response headers).
    if let Some(rw) = &rt.response_headers {
        rewrite::headers(resp.headers_mut(), rw);
    }
    Ok(resp)
}

/// A routed request, ready to go to its backend.
struct Forward<'a> {
    snapshot: &'a Snapshot,
    rt: &'a wp::Route,
    parts: Parts,
    body: Incoming,
    /// The host to send (after the route's rewrite).
    host: String,
}

/// Sends a routed request to its backend: resolves it, prepares the request, sends mirrors,
/// takes a slot in the cluster, then tries endpoints under the route's retry policy.
async fn forward(
    wp: &Arc<Waypoint>,
    down: &Downstream,
    f: Forward<'_>,
    out: &mut Outcome,
) -> Result<Response<Body>, LocalReply> {
    let state = wp.state.load();
    let backend = Backend::resolve(wp, f.snapshot, &state, down, f.rt)?;
    out.backend = Some(backend.service.clone());
    let mut parts = f.parts;
    // Checked again: a route's header rewrite runs after the first check.
    let websocket = rewrite::upgrade_requested(parts.version, &parts.headers) == UpgradeRequest::WebSocket;
    let client_http2 = parts.version == Version::HTTP_2;
    let (client, grpc) = (parts.version, is_grpc(&parts.headers));
    let version_for = |declared| upstream_http2(down.upstream_protocol, declared, client, grpc, websocket);
    let http2 = version_for(backend.declared);
    if client_http2 && !http2 {
        rewrite::join_cookies(&mut parts.headers);
    }
    rewrite::strip_hop_by_hop(&mut parts.headers, websocket);
    if let Ok(v) = HeaderValue::from_str(&f.host) {
        parts.headers.insert(header::HOST, v);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static(down.forwarded_proto));
    let upgrade = websocket.then(|| {
        let mut fake = Request::new(());
        *fake.extensions_mut() = std::mem::take(&mut parts.extensions);
        hyper::upgrade::on(fake)
    });
    let body = RequestBody::read(wp, f.body, &parts, client_http2, websocket).await?;
    // Mirrors get a copy; their answers are dropped.
    if let RequestBody::Replayable(bytes) = &body {
        let timeout = to_duration(f.rt.timeout.as_ref()).unwrap_or(mirror::MIRROR_TIMEOUT);
        for m in &f.rt.mirrors {
            let copy = MirrorCopy {
                parts: &parts,
                body: bytes.clone(),
                default_port: down.dst.port(),
                timeout,
            };
            spawn_mirror(wp, m, copy, version_for);
        }
    }
    let admission = backend.cluster.admit().await.map_err(LocalReply::Overflow)?;
    let exchange = Exchange {
        down,
        retry: RetryPolicy::new(f.rt, &parts.method, matches!(body, RequestBody::Replayable(_))),
        backend: &backend,
        parts,
        body,
        http2,
        upgrade,
        admission: Some(admission),
    };
    exchange.run(wp, out).await
}

/// A request body: buffered when small enough, so a retry or a mirror can send it again.
/// A body the client announces fails the request once its stream moves nothing either way
/// for the stream idle timeout ([`idle::IdleBody`]).
enum RequestBody {
    Replayable(Bytes),
    /// Passed through once; `None` after it was sent. The clock its answer shares, and which
    /// says whether the stream timed out.
    Streaming(Option<Body>, idle::StreamClock),
}

impl RequestBody {
    /// `http2`: an HTTP/2 request (which may carry a body without announcing it);
    /// `upgrade`: the body belongs to the upgraded connection and is never buffered.
    async fn read(
        wp: &Waypoint,
        body: Incoming,
        parts: &Parts,
        http2: bool,
        upgrade: bool,
    ) -> Result<Self, LocalReply> {
        let headers = &parts.headers;
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0")
            || (http2 && !matches!(parts.method, Method::GET | Method::HEAD));
        let small = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n <= REPLAYABLE_BODY);
        if !has_body {
            return Ok(RequestBody::Replayable(Bytes::new()));
        }
        let period = wp.stream_idle_timeout;
        let clock = idle::StreamClock::start(period, wp.metrics.stream_idle_timeouts.clone());
        let body = idle::IdleBody::new(body, &clock);
        if !small || upgrade {
            return Ok(RequestBody::Streaming(Some(body.boxed()), clock));
        }
        match Limited::new(body, REPLAYABLE_BODY).collect().await {
            Ok(c) => Ok(RequestBody::Replayable(c.to_bytes())),
            Err(_) if clock.stalled() => Err(LocalReply::StreamIdleTimeout(period)),
            Err(e) => Err(LocalReply::BadRequest(BadRequest::Body(e.to_string()))),
        }
    }

    /// The body for the next attempt; `None` when a streamed body was already sent.
    fn next(&mut self) -> Option<Body> {
        match self {
            RequestBody::Replayable(b) => Some(full(b.clone())),
            RequestBody::Streaming(s, _) => s.take(),
        }
    }

    /// Whether the client stopped sending the body (the stream idle timeout).
    fn stalled(&self) -> bool {
        matches!(self, RequestBody::Streaming(_, clock) if clock.stalled())
    }

    /// The backend's answer body, failed once its stream moves nothing either way for the
    /// stream idle timeout: a backend that stops its answer halfway would otherwise hold the
    /// client's stream and the upstream connection for ever (the failed answer is dropped
    /// half-read, which closes that connection). A streamed request shares its clock with
    /// its answer, so frames either way keep both open; an answer already ended is not watched.
    fn watch_answer(&self, wp: &Waypoint, body: PooledBody) -> Body {
        if hyper::body::Body::is_end_stream(&body) {
            return body.map_err(|e| Box::new(e) as _).boxed();
        }
        let clock = match self {
            RequestBody::Streaming(_, clock) => clock.clone(),
            RequestBody::Replayable(_) => {
                idle::StreamClock::start(wp.stream_idle_timeout, wp.metrics.stream_idle_timeouts.clone())
            }
        };
        idle::IdleBody::new(body, &clock).boxed()
    }
}

/// The attempts of one request at one backend.
struct Exchange<'a> {
    down: &'a Downstream,
    backend: &'a Backend,
    parts: Parts,
    body: RequestBody,
    http2: bool,
    /// The client's side of a WebSocket upgrade it asked for.
    upgrade: Option<OnUpgrade>,
    retry: RetryPolicy,
    /// The request's place in its cluster: given to the answer's body, which holds it until
    /// the answer ends; dropped with the exchange when there is no answer.
    admission: Option<Admission>,
}

impl Exchange<'_> {
    /// Tries endpoints until one answers, the retry policy stops, or the retry budget is spent.
    async fn run(mut self, wp: &Waypoint, out: &mut Outcome) -> Result<Response<Body>, LocalReply> {
        let cluster = &self.backend.cluster;
        for attempt in 1..=self.retry.attempts {
            out.attempts = attempt;
            let (workload, ep) = self.backend.pick(self.down)?;
            out.upstream = Some(workload.clone());
            let Some(body) = self.body.next() else {
                break;
            };
            let req = self.request(body, cluster);
            let pool = wp.upstreams.pool_for(cluster, self.http2);
            let sent = self.retry.attempt(pool.send(ep.target, req)).await;
            let (outcome, answer) = match sent {
                Some(Ok(resp)) => (Attempt::Answered(resp.status()), Ok(resp)),
                // The client stopped sending the body: its fault, not the backend's.
                Some(Err(_)) if self.body.stalled() => {
                    return Err(LocalReply::StreamIdleTimeout(wp.stream_idle_timeout));
                }
                Some(Err(e)) => {
                    out.reason = format!("upstream {}: {e}", ep.target);
                    let sent = e.maybe_sent();
                    let reply = match upstream::tls::TlsFailure::find(&e) {
                        Some(tls) => LocalReply::UpstreamTls(tls.clone()),
                        None => LocalReply::UpstreamFailure,
                    };
                    (Attempt::Failed { sent }, Err(reply))
                }
                None => {
                    out.reason = format!("upstream {} per-try timeout", ep.target);
                    (Attempt::TimedOut, Err(LocalReply::UpstreamTimeout))
                }
            };
            let status = answer.as_ref().ok().map(Response::status);
            cluster.record(&workload.uid, status);
            if self.retry.decide(outcome, attempt) == retry::Decision::Retry {
                if let Some(_budget) = cluster.retry_budget() {
                    debug!(?outcome, attempt, "retrying");
                    self.retry.back_off().await;
                    continue;
                }
            }
            return match answer {
                Ok(resp) => {
                    let idle = cluster.tcp_idle_timeout();
                    let mut resp = finish(resp, self.upgrade.map(|down| Upgrade { down, wp, idle }))?;
                    if let Some(admission) = self.admission.take() {
                        resp.body_mut().hold(admission);
                    }
                    Ok(resp.map(|body| self.body.watch_answer(wp, body)))
                }
                Err(reply) => Err(reply),
            };
        }
        Err(LocalReply::UpstreamFailure)
    }

    /// The request for one attempt (the pool sets its URI's form for the endpoint).
    fn request(&self, body: Body, cluster: &Cluster) -> Request<Body> {
        let mut req = Request::from_parts(self.parts.clone(), body);
        *req.version_mut() = if self.http2 { Version::HTTP_2 } else { Version::HTTP_11 };
        if !self.http2 && self.upgrade.is_none() && cluster.close_after_this() {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        req
    }
}

/// The backend's answer on its way to the client: a 101 joins the two upgraded connections
/// (until both are done, or idle for the backend's TCP idle timeout) when the client asked
/// for that upgrade, and is refused otherwise.
fn finish(mut resp: Response<PooledBody>, upgrade: Option<Upgrade<'_>>) -> Result<Response<PooledBody>, LocalReply> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let confirmed = upgrade.is_some() && rewrite::upgrade_confirmed(resp.headers());
        match upgrade {
            Some(u) if confirmed => splice_upgrade(u, hyper::upgrade::on(&mut resp)),
            // A 101 the client did not ask for (another protocol, or no upgrade at all).
            other => {
                if let Some(u) = other {
                    close_gracefully(u.down);
                }
                let protocol = resp
                    .headers()
                    .get(header::UPGRADE)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                return Err(LocalReply::UnrequestedUpgrade { protocol });
            }
        }
    }
    let status = resp.status();
    rewrite::strip_hop_by_hop(resp.headers_mut(), status == StatusCode::SWITCHING_PROTOCOLS);
    Ok(resp)
}

/// A client's side of an upgrade it asked for, and what joining it to the backend's needs.
struct Upgrade<'a> {
    down: OnUpgrade,
    wp: &'a Waypoint,
    /// The backend's TCP idle timeout.
    idle: Option<Duration>,
}

/// Copies bytes both ways between the client's and the backend's upgraded connections, as a
/// task the drain knows of.
fn splice_upgrade(Upgrade { down, wp, idle }: Upgrade<'_>, up: OnUpgrade) {
    let metrics = wp.metrics.clone();
    wp.tasks.spawn(async move {
        match tokio::try_join!(down, up) {
            Ok((d, u)) => {
                let spliced = idle::splice(TokioIo::new(d), &mut TokioIo::new(u), idle, None).await;
                if matches!(spliced.end, idle::SpliceEnd::Idle) {
                    metrics.idle_timeout(IdleConnection::WebSocket);
                }
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
}

/// hyper hands a connection whose request asked for an upgrade to its `OnUpgrade` when it
/// closes, even when the answer was not 101; this ends it with a clean shutdown, so the
/// answer already written reaches the client rather than being reset away.
fn close_gracefully(down: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        if let Ok(io) = down.await {
            use tokio::io::AsyncWriteExt;
            let _ = hyper_util::rt::TokioIo::new(io).shutdown().await;
        }
    });
}

/// What a mirror copies of its request.
struct MirrorCopy<'a> {
    parts: &'a Parts,
    body: Bytes,
    /// The port a mirror that names none goes to (the request's).
    default_port: u16,
    /// The route's timeout, or the mirrors' default.
    timeout: Duration,
}

/// Sends a copy of a request to a mirror backend and drops the answer, if a mirror slot is
/// free and the backend's cluster admits it (see [`mirror`]).
fn spawn_mirror(
    wp: &Arc<Waypoint>,
    m: &wp::WeightedBackend,
    copy: MirrorCopy<'_>,
    version_for: impl Fn(AppProtocol) -> bool,
) {
    let Some(slot) = mirror::Mirrors::shared().slot(&wp.metrics.mirror_drops) else {
        return;
    };
    let state = wp.state.load();
    let Some(service) = state.service(&m.service).cloned() else {
        debug!(mirror = %m.service, "mirror service unknown");
        return;
    };
    let port = upstream::backend_port(&service, m.port, copy.default_port);
    // The mirror's own port decides its version, as the primary's does.
    let http2 = version_for(state.port_protocol(&m.service, port));
    let eps = upstream::candidates(&state, &service, None);
    let Some(ep) = eps
        .get(rand::thread_rng().gen_range(0..eps.len().max(1)))
        .and_then(|w| upstream::target(w, &service, port, w.addresses.first().copied()?))
    else {
        return;
    };
    let parts = copy.parts;
    let mut req = Request::from_parts(parts.clone(), full(copy.body));
    *req.version_mut() = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
    // Envoy's convention: the mirror sees the host with a "-shadow" suffix.
    if let Some(h) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        if let Ok(v) = HeaderValue::from_str(&mirror::shadow_host(h)) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    // A mirror to a host whose DestinationRule originates TLS gets TLS too (never plaintext).
    let config = wp.config.load();
    let routes = config.routes.get(&m.service).map(|r| &r.config);
    let policy = upstream::effective_policy(routes, None);
    let cluster = wp
        .upstreams
        .http_cluster((&m.service, &service.hostname), "", port, policy);
    let pool = wp.upstreams.pool_for(&cluster, http2).clone();
    let exchange = async move {
        match pool.send(ep.target, req).await {
            Ok(resp) => {
                let _ = resp.into_body().collect().await;
            }
            Err(e) => debug!(error = %e, "mirror request failed"),
        }
    };
    slot.spawn(cluster, copy.timeout, wp.metrics.mirror_drops.clone(), exchange);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const STREAM_IDLE: Duration = Duration::from_secs(300);

    /// A waypoint without a control plane whose state holds `service`, served by one plain
    /// TCP workload at `backend`.
    fn test_waypoint(service: &Service, backend: SocketAddr) -> Arc<Waypoint> {
        let mut registry = prometheus_client::registry::Registry::default();
        let ca = mesh_core::identity::DevCa::generate("cluster.local").unwrap();
        let certs = mesh_core::identity::CertManager::new(Arc::new(ca), vec![], Default::default());
        let state = mesh_core::state::StateStore::new();
        let mut workload = (*crate::upstream::cluster::tests::workload("backend")).clone();
        workload.addresses = vec![backend.ip()];
        workload.tunnel = mesh_core::state::model::Tunnel::None;
        workload.services = vec![(service.key(), vec![])];
        state.update(|s| {
            s.upsert_service(service.clone());
            s.upsert_workload(workload);
        });
        Arc::new(Waypoint {
            gateway: ("ns".into(), "waypoint".into()),
            identity: "spiffe://cluster.local/ns/ns/sa/waypoint".parse().unwrap(),
            network: String::new(),
            state,
            config: crate::store::ConfigStore::new(),
            certs,
            upstreams: upstream::Upstreams::new(
                upstream::connector::test_connector(),
                upstream::tls::CredentialStore::new("ns/waypoint".into()),
            ),
            jwks: crate::policy::jwt::JwksCache::new(Duration::from_secs(60), Duration::from_secs(5)),
            metrics: crate::telemetry::metrics::Metrics::register(&mut registry),
            tracer: trace::Tracer::start(trace::TraceConfig {
                zipkin: None,
                otlp: None,
                sampling: 0.0,
                tags: vec![],
                service: "waypoint.ns".into(),
                dropped: trace::register_dropped(&mut registry),
            }),
            access_log: crate::telemetry::access_log::Sinks::register(&mut registry, "waypoint.ns".into()),
            header_read_timeout: Duration::from_secs(10),
            stream_idle_timeout: STREAM_IDLE,
            path_normalization: Default::default(),
            drain: Default::default(),
            closing: Default::default(),
            tasks: Default::default(),
            rate_limits: Default::default(),
            ingress: None,
        })
    }

    /// A test backend's address and what it reports: a request head arrived, a connection
    /// to it closed.
    struct ScriptedBackend {
        addr: SocketAddr,
        heads: tokio::sync::mpsc::UnboundedReceiver<()>,
        closed: tokio::sync::mpsc::UnboundedReceiver<()>,
    }

    /// A backend that reads what comes and answers each request head with `answer` (none:
    /// never answers; a head announcing more body than it sends: stalls mid-answer).
    async fn scripted_backend(answer: Option<&'static [u8]>) -> ScriptedBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (heads_tx, heads) = tokio::sync::mpsc::unbounded_channel();
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (heads, closed) = (heads_tx.clone(), closed_tx.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0; 4096];
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        if !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        seen.clear();
                        let _ = heads.send(());
                        if let Some(answer) = answer {
                            if conn.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                    }
                    let _ = closed.send(());
                });
            }
        });
        ScriptedBackend { addr, heads, closed }
    }

    /// A waypoint serving one downstream HTTP/1.1 connection (the test's end returned) in
    /// front of a silent backend, whose request heads `heads` reports, and its cluster.
    async fn in_front_of_a_silent_backend() -> (
        tokio::io::DuplexStream,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        Arc<Cluster>,
    ) {
        let ScriptedBackend {
            addr: backend, heads, ..
        } = scripted_backend(None).await;
        let (wp, down) = waypoint_for(backend);
        let cluster = wp
            .upstreams
            .cluster(&down.service_key, "", wp::TrafficPolicy::default());
        (connect(&wp, &down), heads, cluster)
    }

    /// A waypoint for the service `svc`, served by one workload at `backend`, and a plain
    /// tunnel to it.
    fn waypoint_for(backend: SocketAddr) -> (Arc<Waypoint>, Arc<Downstream>) {
        let service = Service {
            name: "svc".into(),
            namespace: "ns".into(),
            hostname: "svc.ns.svc.cluster.local".into(),
            vips: vec![],
            ports: vec![mesh_core::state::model::PortMapping {
                service_port: backend.port(),
                target_port: backend.port(),
            }],
            subject_alt_names: vec![],
            waypoint: None,
            only_healthy: true,
        };
        let wp = test_waypoint(&service, backend);
        let down = Arc::new(Downstream {
            peer_identity: None,
            client_addr: "10.0.0.1:40000".parse().unwrap(),
            remote_ip: "10.0.0.1".parse().unwrap(),
            forwarded_proto: "http",
            upstream_protocol: UpstreamProtocol::AsClient,
            dst: backend,
            service_key: service.key(),
            service: Arc::new(service),
        });
        (wp, down)
    }

    /// One downstream HTTP/1.1 connection served by [`handle`]; the test's end.
    fn connect(wp: &Arc<Waypoint>, down: &Arc<Downstream>) -> tokio::io::DuplexStream {
        connect_tracked(wp, down).0
    }

    /// [`connect`], and the server side's task: once it ends, every request on the
    /// connection is finished and logged.
    fn connect_tracked(
        wp: &Arc<Waypoint>,
        down: &Arc<Downstream>,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (wp, down) = (wp.clone(), down.clone());
        let (client, server) = tokio::io::duplex(64 * 1024);
        let serve = hyper::service::service_fn(move |req| handle(wp.clone(), down.clone(), req));
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), serve);
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        (client, task)
    }

    /// Sends `head` on a new connection and returns the answer once the waypoint is done
    /// with the connection (so its access log is written).
    async fn exchange(wp: &Arc<Waypoint>, down: &Arc<Downstream>, head: &[u8]) -> String {
        let (mut client, served) = connect_tracked(wp, down);
        client.write_all(head).await.unwrap();
        let (answer, _) = answer(&mut client).await;
        drop(client);
        served.await.expect("the connection task ends");
        answer
    }

    /// What tracing writes while a test holds [`capture_logs`]'s guard.
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Captures this thread's log lines (a current-thread runtime's tasks included).
    fn capture_logs() -> (Lines, tracing::subscriber::DefaultGuard) {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .finish();
        (lines, tracing::subscriber::set_default(subscriber))
    }

    /// An address nothing listens at (its listener is closed at once): every request to it
    /// is answered at once, 503, and logged.
    fn unreachable_backend() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[tokio::test]
    async fn the_access_log_reports_the_canonical_path_or_a_refused_one_as_it_arrived() {
        let (lines, _guard) = capture_logs();
        // Nothing listens at the backend: each request is answered at once, and logged.
        let closed = unreachable_backend();
        let (wp, down) = waypoint_for(closed);
        // (path, host) sent -> status, path logged; the refused (400) as they arrived.
        let cases = [
            (("/x/../admin", "svc"), "503", "/admin"),
            (("/x/../%zz", "svc"), "400", "/x/../%zz"),
            (("/x/../admin", "u@svc"), "400", "/x/../admin"),
        ];
        for ((sent, host), status, logged) in cases {
            let head = format!("GET {sent} HTTP/1.1\r\nhost: {host}\r\n\r\n");
            let answer = exchange(&wp, &down, head.as_bytes()).await;
            assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{sent}: {answer}");
            let text = String::from_utf8_lossy(&lines.0.lock().unwrap()).into_owned();
            let line = text
                .lines()
                .rfind(|l| l.contains(" request "))
                .unwrap_or_default()
                .to_owned();
            assert!(line.contains(&format!("path=\"{logged}\"")), "{sent}: {line}");
        }
    }

    /// Sends a POST head announcing `len` bytes of body, and none of them.
    async fn stalled_upload(client: &mut tokio::io::DuplexStream, len: usize) {
        let head = format!("POST /upload HTTP/1.1\r\nhost: svc\r\ncontent-length: {len}\r\n\r\n");
        client.write_all(head.as_bytes()).await.unwrap();
    }

    /// The waypoint's answer, and how long it took.
    async fn answer(client: &mut tokio::io::DuplexStream) -> (String, Duration) {
        let start = Instant::now();
        let mut answer = vec![0; 1024];
        let n = tokio::time::timeout(STREAM_IDLE * 2, client.read(&mut answer))
            .await
            .expect("a request whose body never came is held past the stream idle timeout")
            .unwrap();
        (String::from_utf8_lossy(&answer[..n]).into_owned(), start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_request_body_that_never_arrives_gets_408_and_frees_its_cluster_slot() {
        let (mut client, mut heads, cluster) = in_front_of_a_silent_backend().await;
        // Too large to buffer: streamed, so the cluster's slot is taken before any byte.
        stalled_upload(&mut client, 1_000_000).await;
        heads.recv().await.expect("the request head reached the backend");
        assert_eq!(cluster.requests_in_flight(), 1);
        let (answer, took) = answer(&mut client).await;
        assert!(took >= STREAM_IDLE - Duration::from_secs(1), "{took:?}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert_eq!(
            cluster.requests_in_flight(),
            0,
            "the stalled request kept its cluster slot"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_buffered_request_body_that_never_arrives_gets_408() {
        let (mut client, _heads, cluster) = in_front_of_a_silent_backend().await;
        stalled_upload(&mut client, 1_000).await;
        let (answer, took) = answer(&mut client).await;
        assert!(took >= STREAM_IDLE, "{took:?}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert_eq!(cluster.requests_in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_stops_halfway_is_cut_at_the_stream_idle_timeout_with_its_connection() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nhalf";
        let ScriptedBackend {
            addr: backend,
            mut closed,
            ..
        } = scripted_backend(Some(head)).await;
        let (wp, down) = waypoint_for(backend);
        let mut client = connect(&wp, &down);
        client.write_all(b"GET /x HTTP/1.1\r\nhost: svc\r\n\r\n").await.unwrap();
        // The head and the first bytes of the body reach the client.
        let mut got = Vec::new();
        while !got.ends_with(b"half") {
            let mut buf = [0; 1024];
            let n = client.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before the answer began: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
        let cluster = wp
            .upstreams
            .cluster(&down.service_key, "", wp::TrafficPolicy::default());
        assert_eq!(
            cluster.requests_in_flight(),
            1,
            "an answer still streaming is in flight"
        );
        let early = tokio::time::timeout(STREAM_IDLE - Duration::from_secs(1), client.read(&mut [0; 64])).await;
        assert!(
            early.is_err(),
            "the answer was cut before the stream idle timeout: {early:?}"
        );
        assert_eq!(wp.metrics.stream_idle_timeouts.get(), 0);
        // Cut: the client's connection ends before the announced body is complete.
        let cut = tokio::time::timeout(Duration::from_secs(2), client.read(&mut [0; 64]))
            .await
            .expect("an answer silent past the stream idle timeout is still held");
        assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
        assert_eq!(wp.metrics.stream_idle_timeouts.get(), 1);
        assert_eq!(cluster.requests_in_flight(), 0, "the cut answer kept its cluster slot");
        // The upstream connection, mid-answer, is closed rather than pooled.
        tokio::time::timeout(Duration::from_secs(5), closed.recv())
            .await
            .expect("the stalled upstream connection is still open")
            .expect("the backend reports its connections");
    }

    /// A Telemetry access-log filter reads the path and host that were served, not their
    /// spelling (here the URI's authority, which wins over `Host`, as HTTP/2's does).
    #[tokio::test]
    async fn a_telemetry_filter_sees_the_canonical_path_and_host() {
        let (lines, _guard) = capture_logs();
        let closed = unreachable_backend();
        let (wp, down) = waypoint_for(closed);
        log_only_when(
            &wp,
            "request.url_path == '/admin' || request.host == 'admin.example.com'",
        );
        let sent = [
            ("/public/../admin", true),
            ("http://admin.example.com/x", true),
            ("/x", false),
        ];
        for (target, logged) in sent {
            let before = lines.0.lock().unwrap().len();
            let head = format!("GET {target} HTTP/1.1\r\nhost: www.example.com\r\n\r\n");
            let answer = exchange(&wp, &down, head.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 503"), "{target}: {answer}");
            let text = String::from_utf8_lossy(&lines.0.lock().unwrap()[before..]).into_owned();
            assert_eq!(text.contains(" request "), logged, "{target}: {text}");
        }
    }

    /// A mesh-wide Telemetry that writes the access log only when `filter` holds.
    fn log_only_when(wp: &Waypoint, filter: &str) {
        let telemetry = wp::Policy {
            name: "mesh".into(),
            namespace: "istio-system".into(),
            kind: Some(wp::policy::Kind::Telemetry(wp::Telemetry {
                scope: wp::telemetry::Scope::Mesh as i32,
                access_log: Some(wp::TelemetryAccessLog {
                    filter: filter.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let encoded = prost::Message::encode_to_vec(&telemetry);
        let rejected = wp
            .config
            .apply_policies(&[("Telemetry/istio-system/mesh".into(), &encoded)], &[]);
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    /// `--path-normalization` reaches the pipeline: `//admin` is `/admin` to what reads the
    /// request (here a Telemetry filter) with merged slashes, and stays `//admin` under BASE.
    #[tokio::test]
    async fn the_configured_path_normalization_is_the_one_requests_get() {
        use crate::http::path::Normalization;
        let (lines, _guard) = capture_logs();
        let closed = unreachable_backend();
        for (mode, logged) in [(Normalization::Base, false), (Normalization::MergeSlashes, true)] {
            let (mut wp, down) = waypoint_for(closed);
            Arc::get_mut(&mut wp).expect("not shared yet").path_normalization = mode;
            log_only_when(&wp, "request.url_path == '/admin'");
            let before = lines.0.lock().unwrap().len();
            let answer = exchange(&wp, &down, b"GET //admin HTTP/1.1\r\nhost: svc\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.1 503"), "{mode:?}: {answer}");
            let text = String::from_utf8_lossy(&lines.0.lock().unwrap()[before..]).into_owned();
            assert_eq!(text.contains(" request "), logged, "{mode:?}: {text}");
        }
    }

    /// Mirrors sent by requests through [`handle`] take the process's mirror slots and give
    /// them back at their timeout, the backend never answering (the bound itself, and what
    /// happens when it is reached, are `mirror`'s tests).
    #[tokio::test]
    async fn mirrors_sent_through_the_pipeline_hold_a_slot_until_their_timeout() {
        use crate::telemetry::metrics::MirrorDrop;
        const REQUESTS: usize = 3;
        let ScriptedBackend {
            addr: backend,
            mut heads,
            ..
        } = scripted_backend(None).await;
        let (wp, down) = waypoint_for(backend);
        // The one route mirrors every request to the (silent) service itself.
        let mirror = wp::WeightedBackend {
            service: down.service_key.clone(),
            ..Default::default()
        };
        let route = wp::Route {
            name: "HTTPRoute/ns/r/rules[0]".into(),
            mirrors: vec![mirror],
            ..Default::default()
        };
        let table = wp::ServiceRoutes {
            service: down.service_key.clone(),
            routes: vec![route],
            ..Default::default()
        };
        let compiled = Arc::new(super::super::route::CompiledRoutes::compile(table));
        wp.config.replace_tables("", vec![(down.service_key.clone(), compiled)]);
        let before = mirror::Mirrors::shared().in_flight();
        let mut clients = Vec::new();
        for _ in 0..REQUESTS {
            let mut client = connect(&wp, &down);
            client.write_all(b"GET /x HTTP/1.1\r\nhost: svc\r\n\r\n").await.unwrap();
            clients.push(client);
        }
        // Each request's primary and its mirror reach the backend.
        for _ in 0..2 * REQUESTS {
            heads.recv().await.expect("a request head reached the backend");
        }
        let mirrors = mirror::Mirrors::shared();
        assert_eq!(mirrors.in_flight() - before, REQUESTS, "a mirror took no slot");
        // Only from here is time the test's: the mirrors' deadlines are under a second old.
        tokio::time::pause();
        tokio::time::sleep(mirror::MIRROR_TIMEOUT - Duration::from_secs(1)).await;
        assert_eq!(mirrors.in_flight() - before, REQUESTS);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(mirrors.in_flight(), before, "a mirror past its timeout kept its slot");
        assert_eq!(wp.metrics.mirror_drops.get(MirrorDrop::Timeout), REQUESTS as u64);
    }

    /// Every downstream HTTP/1.1 connection holds a slot for its request's future for its whole
    /// life (hyper keeps it), and each request moves the future: once 16.6 KB.
    #[test]
    fn a_request_future_stays_small() {
        let size = crate::future_size(|(wp, down, req)| handle(wp, down, req));
        assert!(size <= 1024, "a request's future grew to {size} bytes");
        // What the box holds: connecting upstream (boxed) and a retry's attempt once made it 15 KB.
        let size = crate::future_size(|(wp, down, req, out)| async move { process(&wp, &down, req, out).await });
        assert!(size <= 7 * 1024, "a request's boxed future grew to {size} bytes");
    }

    #[test]
    fn the_declared_port_protocol_decides_the_upstream_version_then_the_role() {
        use AppProtocol::*;
        use UpstreamProtocol::*;
        let (h1, h2) = (Version::HTTP_11, Version::HTTP_2);
        // (role, declared, client, grpc, websocket) -> HTTP/2 upstream
        let table = [
            (AsClient, Unknown, h1, false, false, false),
            (AsClient, Unknown, h2, false, false, true),
            (AsClient, Http11, h2, false, false, false),
            (AsClient, Http11, h2, true, false, true),
            (AsClient, Http2, h1, false, false, true),
            (AsClient, Grpc, h1, false, false, true),
            (AsClient, Http2, h1, false, true, false),
            (Http2ForGrpc, Unknown, h2, false, false, false),
            (Http2ForGrpc, Unknown, h2, true, false, true),
            (Http2ForGrpc, Unknown, h1, true, false, true),
            (Http2ForGrpc, Http11, h2, false, false, false),
            (Http2ForGrpc, Http2, h1, false, false, true),
            // A protocol from a newer control plane: HTTP, but the role decides the version.
            (AsClient, OtherHttp, h1, false, false, false),
            (AsClient, OtherHttp, h2, false, false, true),
            (Http2ForGrpc, OtherHttp, h2, false, false, false),
            (Http2ForGrpc, OtherHttp, h1, true, false, true),
        ];
        for (role, declared, client, grpc, ws, want) in table {
            assert_eq!(
                upstream_http2(role, declared, client, grpc, ws),
                want,
                "{role:?} {declared:?} {client:?} grpc={grpc} websocket={ws}"
            );
        }
    }
}
