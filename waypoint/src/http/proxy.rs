//! The per-request pipeline: authenticate (JWT), authorize, route, inject faults, then send
//! to a backend endpoint with the route's rewrites, timeouts, retries and mirrors, and
//! record the outcome (metrics, access log). Every refusal is an HTTP answer with a reason,
//! never a dropped connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use mesh_core::identity::Identity;
use mesh_core::state::model::{Service, Workload};
use mesh_proto::waypoint as wp;
use rand::Rng;
use tracing::{debug, info};

use super::rewrite::{self, UpgradeRequest};
use super::route::RequestView;
use crate::policy::authz::{self, Decision, RequestAttrs};
use crate::store::Snapshot;
use crate::telemetry::metrics::RequestLabels;
use crate::telemetry::trace;
use crate::upstream::{self, Body};
use crate::Waypoint;

/// Bodies up to this size are buffered so that retries and mirrors can resend them; larger
/// or streaming bodies are passed through once.
const REPLAYABLE_BODY: usize = 64 * 1024;

/// The tunnel a request arrived on.
pub struct Downstream {
    /// The original client's identity (the HBONE peer's certificate).
    pub peer_identity: Identity,
    pub client_addr: SocketAddr,
    /// The CONNECT authority: a service VIP or workload address, and port.
    pub dst: SocketAddr,
    pub service: Arc<Service>,
    /// `service.key()`, computed once per tunnel rather than per request.
    pub service_key: String,
}

/// What the access log and metrics say about a request beyond its status.
#[derive(Default)]
struct Outcome {
    flags: &'static str,
    route: String,
    upstream: Option<Arc<Workload>>,
    attempts: u32,
    reason: String,
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

fn reply(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn to_duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
        .filter(|d| !d.is_zero())
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn percent_hit(p: f64) -> bool {
    p >= 100.0 || (p > 0.0 && rand::thread_rng().gen_range(0.0..100.0) < p)
}

/// Serves one request; never fails (errors become responses).
pub async fn handle(
    wp: Arc<Waypoint>,
    down: Arc<Downstream>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let started_at = std::time::SystemTime::now();
    // Without a collector the waypoint leaves trace headers as the client sent them.
    let trace_ctx = wp.tracer.enabled().then(|| {
        let ctx = trace::extract(req.headers(), wp.tracer.sampling);
        trace::inject(&ctx, req.headers_mut());
        ctx
    });
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let protocol = if grpc { "grpc" } else { "http" };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_size = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let mut outcome = Outcome {
        flags: "-",
        ..Default::default()
    };
    let resp = process(&wp, &down, req, &mut outcome).await;

    let state = wp.state.load();
    let src = state.workload_by_ip(&wp.network, down.client_addr.ip()).cloned();
    let principal = down.peer_identity.to_string();
    let mut labels = RequestLabels::new(
        src.as_deref(),
        &principal,
        outcome.upstream.as_deref(),
        &down.service,
        protocol,
    );
    labels.response_code = resp.status().as_u16();
    labels.response_flags = outcome.flags;
    if grpc {
        labels.grpc_response_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
            .to_owned();
    }
    let elapsed = start.elapsed();
    wp.metrics.requests.get_or_create(&labels).inc();
    wp.metrics
        .duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64() * 1000.0);
    wp.metrics.request_bytes.get_or_create(&labels).observe(request_size);
    if let Some(len) = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
    {
        wp.metrics.response_bytes.get_or_create(&labels).observe(len);
    }
    info!(
        target: "access",
        src_addr = %down.client_addr,
        src_identity = %down.peer_identity,
        dst_service = %down.service.hostname,
        dst_workload = outcome.upstream.as_ref().map(|w| w.name.as_str()).unwrap_or("-"),
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        flags = outcome.flags,
        route = %outcome.route,
        attempts = outcome.attempts,
        reason = %outcome.reason,
        trace = %trace_ctx.as_ref().map(trace::describe).unwrap_or_default(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    if let Some(trace_ctx) = trace_ctx.filter(|c| c.sampled) {
        let tags = vec![
            ("http.method", method.to_string()),
            ("http.url", path.clone()),
            ("http.status_code", resp.status().as_u16().to_string()),
            ("response_flags", outcome.flags.to_owned()),
            ("istio.destination_service", down.service.hostname.clone()),
            ("peer.identity", principal.clone()),
            (
                "upstream_cluster",
                outcome.upstream.as_ref().map(|w| w.name.clone()).unwrap_or_default(),
            ),
        ];
        wp.tracer.finish(trace::Span {
            ctx: trace_ctx,
            name: format!("{}:{}{path}", down.service.hostname, down.dst.port()),
            start: started_at,
            duration: elapsed,
            tags,
        });
    }
    Ok(resp)
}

async fn process(wp: &Arc<Waypoint>, down: &Downstream, req: Request<Incoming>, out: &mut Outcome) -> Response<Body> {
    let snapshot = wp.config.load();
    let svc = &down.service;
    let gateway = (wp.gateway.0.as_str(), wp.gateway.1.as_str());
    let target = (svc.namespace.as_str(), svc.name.as_str());

    let (mut parts, body) = req.into_parts();

    // What only the proxy decides, before anything reads the headers: hop-by-hop headers
    // (a client's `Connection` list cannot remove what the mesh writes later), headers the
    // mesh vouches for, and upgrades other than WebSocket.
    let upgrade = rewrite::upgrade_requested(parts.version, &parts.headers);
    rewrite::strip_hop_by_hop(&mut parts.headers, upgrade == UpgradeRequest::WebSocket);
    rewrite::strip_vouched(&mut parts.headers);
    if let UpgradeRequest::Refused(protocol) = upgrade {
        out.reason = format!("upgrade to {protocol:?} not forwarded");
    }
    if parts.method == Method::CONNECT {
        // A tunnel inside the tunnel would carry bytes no policy sees.
        wp.metrics.reject("connect_method");
        out.reason = "CONNECT is not proxied".to_owned();
        return reply(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
    }

    // Authentication: a token that is present must be valid.
    let principal = match snapshot.authenticator(gateway, target, &wp.jwks) {
        None => None,
        Some(authenticator) => match authenticator.authenticate(&mut parts).await {
            Ok(p) => p,
            Err(e) => {
                out.flags = "UAEX";
                out.reason = e.to_string();
                return reply(StatusCode::UNAUTHORIZED, "Jwt verification fails");
            }
        },
    };

    // Authorization against the original client's identity.
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| svc.hostname.clone());
    let spiffe = down.peer_identity.to_string();
    let attrs = RequestAttrs {
        source_principal: spiffe.strip_prefix("spiffe://").unwrap_or(&spiffe),
        source_namespace: &down.peer_identity.namespace,
        source_ip: down.client_addr.ip(),
        request_principal: principal.as_ref(),
        host: &host,
        port: down.dst.port(),
        method: parts.method.as_str(),
        path: parts.uri.path(),
        headers: &parts.headers,
    };
    if let Decision::Deny(why) = authz::evaluate(snapshot.policies_for(gateway, target), &attrs) {
        out.flags = "RBAC";
        out.reason = why;
        return reply(StatusCode::FORBIDDEN, "RBAC: access denied");
    }

    // Routing.
    let routes = snapshot.routes.get(&down.service_key);
    let view = RequestView {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let chosen = routes.filter(|r| !r.is_empty()).map(|r| r.select(&view));
    let route = match chosen {
        Some(None) => {
            out.flags = "NR";
            wp.metrics.reject("no_route");
            return reply(StatusCode::NOT_FOUND, "no route matched");
        }
        Some(Some(r)) => Some(r),
        None => None,
    };
    let matched_prefix = route.and_then(|r| r.matched_prefix(&view)).map(str::to_owned);
    let default_route = wp::Route::default();
    let rt = route.map(|r| &r.route).unwrap_or(&default_route);
    out.route = rt.name.clone();

    if let Some(r) = &rt.redirect {
        let (status, location) = rewrite::redirect(r, &parts.uri, &host, matched_prefix.as_deref());
        let mut resp = reply(status, "redirect");
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return resp;
    }
    if let Some(f) = &rt.fault {
        if let Some(d) = to_duration(f.delay.as_ref()).filter(|_| percent_hit(f.delay_percent)) {
            tokio::time::sleep(d).await;
        }
        if f.abort_status != 0 && percent_hit(f.abort_percent) {
            out.flags = "FI";
            let status = u16::try_from(f.abort_status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return reply(status, "fault filter abort");
        }
    }
    if let Some(rw) = &rt.rewrite {
        if !rw.path.is_empty() || rw.replace_prefix {
            let p = rewrite::path(parts.uri.path(), &rw.path, rw.replace_prefix, matched_prefix.as_deref());
            let pq = rewrite::with_query(&p, parts.uri.query());
            match pq.parse() {
                Ok(u) => parts.uri = u,
                Err(_) => {
                    wp.metrics.reject("bad_rewrite");
                    return reply(StatusCode::BAD_REQUEST, "rewritten path is not a valid URI");
                }
            }
        }
    }
    let host = match &rt.rewrite {
        Some(rw) if !rw.host.is_empty() => rw.host.clone(),
        _ => host,
    };
    if let Some(rw) = &rt.request_headers {
        rewrite::headers(&mut parts.headers, rw);
    }

    let overall = to_duration(rt.timeout.as_ref());
    let forward = forward(wp, &snapshot, down, parts, body, rt, host, out);
    let mut resp = match overall {
        Some(t) => match tokio::time::timeout(t, forward).await {
            Ok(r) => r,
            Err(_) => {
                out.flags = "UT";
                reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
        },
        None => forward.await,
    };
    if let Some(rw) = &rt.response_headers {
        rewrite::headers(resp.headers_mut(), rw);
    }
    resp
}

/// Picks a backend by weight.
pub(crate) fn pick_backend(backends: &[wp::WeightedBackend]) -> Option<&wp::WeightedBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return backends.first();
    }
    let mut n = rand::thread_rng().gen_range(0..total);
    backends.iter().find(|b| {
        let w = u64::from(b.weight);
        if n < w {
            true
        } else {
            n -= w;
            false
        }
    })
}

/// Whether an answer (`None`: no answer at all) should be retried under `retry`.
fn retriable(retry: &wp::Retry, status: Option<StatusCode>, sent: bool) -> bool {
    let on = |k: &str| retry.retry_on.iter().any(|r| r == k);
    match status {
        None if !sent => true,
        None => on("5xx") || on("reset") || on("gateway-error") || !retry.codes.is_empty(),
        Some(s) => {
            let code = u32::from(s.as_u16());
            retry.codes.contains(&code)
                || (on("5xx") && s.is_server_error())
                || (on("gateway-error") && matches!(code, 502..=504))
                || (on("unavailable") && code == 503)
                || (on("retriable-4xx") && code == 409)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    wp: &Arc<Waypoint>,
    snapshot: &Snapshot,
    down: &Downstream,
    mut parts: http::request::Parts,
    body: Incoming,
    rt: &wp::Route,
    host: String,
    out: &mut Outcome,
) -> Response<Body> {
    let state = wp.state.load();
    let default_backend;
    let backend = if rt.backends.is_empty() {
        default_backend = wp::WeightedBackend {
            service: down.service_key.clone(),
            port: u32::from(down.dst.port()),
            weight: 1,
            subset: String::new(),
        };
        &default_backend
    } else {
        match pick_backend(&rt.backends) {
            Some(b) => b,
            None => return reply(StatusCode::SERVICE_UNAVAILABLE, "no backend"),
        }
    };
    let Some(service) = state.service(&backend.service).cloned() else {
        out.flags = "NR";
        out.reason = format!("backend service {} unknown", backend.service);
        return reply(StatusCode::SERVICE_UNAVAILABLE, "backend service not found");
    };
    let port = u16::try_from(backend.port)
        .ok()
        .filter(|p| *p != 0)
        .unwrap_or(down.dst.port());
    // Subsets and traffic policy come from the backend's own DestinationRule.
    let backend_routes = snapshot.routes.get(&backend.service).map(|r| &r.config);
    let subset = (!backend.subset.is_empty())
        .then(|| backend_routes.and_then(|r| r.subsets.iter().find(|s| s.name == backend.subset)))
        .flatten();
    if !backend.subset.is_empty() && subset.is_none() {
        out.flags = "NR";
        out.reason = format!("subset {} of {} unknown", backend.subset, backend.service);
        return reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    }
    let cluster = wp.upstreams.cluster(
        &backend.service,
        &backend.subset,
        upstream::effective_policy(backend_routes, subset),
    );
    let candidates = upstream::candidates(&state, &service, subset);

    // Checked again: a route's header rewrite runs after the first check.
    let upgrade = rewrite::upgrade_requested(parts.version, &parts.headers) == UpgradeRequest::WebSocket;
    let http2 = parts.version == Version::HTTP_2;
    rewrite::strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Ok(v) = HeaderValue::from_str(&host) {
        parts.headers.insert(header::HOST, v);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));

    // Bodies small enough are buffered so a retry or a mirror can send them again.
    let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
        || (http2 && !matches!(parts.method, Method::GET | Method::HEAD));
    let small = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n <= REPLAYABLE_BODY);
    let downstream_upgrade = if upgrade {
        let mut fake = Request::new(());
        *fake.extensions_mut() = std::mem::take(&mut parts.extensions);
        Some(hyper::upgrade::on(fake))
    } else {
        None
    };
    let mut streaming: Option<Incoming> = None;
    let buffered: Option<Bytes> = if !has_body {
        Some(Bytes::new())
    } else if small && !upgrade {
        match Limited::new(body, REPLAYABLE_BODY).collect().await {
            Ok(c) => Some(c.to_bytes()),
            Err(e) => {
                out.reason = format!("reading request body: {e}");
                wp.metrics.reject("bad_body");
                return reply(StatusCode::BAD_REQUEST, "could not read the request body");
            }
        }
    } else {
        streaming = Some(body);
        None
    };

    // Mirrors get a copy; their answers are dropped.
    if let Some(bytes) = &buffered {
        for m in &rt.mirrors {
            spawn_mirror(wp, m, &parts, bytes.clone(), down.dst.port(), http2);
        }
    }

    let admission = match cluster.admit().await {
        Ok(a) => a,
        Err(e) => {
            out.flags = "UO";
            out.reason = e.to_string();
            let mut r = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            );
            r.headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            return r;
        }
    };

    let retry = rt.retry.clone().unwrap_or_default();
    let configured = rt.retry.is_some();
    let may_retry_sent = idempotent(&parts.method) || retry.retry_on.iter().any(|r| r == "non-idempotent");
    let attempts = if configured { retry.attempts.max(1) } else { 2 };
    let per_try = to_duration(retry.per_try_timeout.as_ref()).or(to_duration(rt.backend_timeout.as_ref()));
    let backoff = to_duration(retry.backoff.as_ref()).unwrap_or(Duration::from_millis(25));
    let mut last: Option<Response<Body>> = None;
    for attempt in 1..=attempts {
        out.attempts = attempt;
        let Some(workload) = cluster.pick(&candidates) else {
            out.flags = "UH";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let Some(ep) = upstream::target(&workload, &service, port, down.dst.ip()) else {
            cluster.record(&workload.uid, None);
            out.flags = "UH";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        out.upstream = Some(workload.clone());
        let body = match (&buffered, streaming.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s.map_err(|e| Box::new(e) as _).boxed(),
            (None, None) => break,
        };
        let mut req = Request::from_parts(parts.clone(), body);
        *req.version_mut() = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
        if !http2 && !upgrade && cluster.close_after_this() {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
        *req.uri_mut() = match format!("http://{}{pq}", ep.target).parse() {
            Ok(u) => u,
            Err(_) => {
                wp.metrics.reject("bad_path");
                return reply(StatusCode::BAD_REQUEST, "bad request path");
            }
        };
        let send = wp.upstreams.client(http2).request(req);
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, send).await.map_err(|_| ()),
            None => Ok(send.await),
        };
        let retry_left = attempt < attempts && buffered.is_some();
        match result {
            Ok(Ok(mut resp)) => {
                cluster.record(&workload.uid, Some(resp.status()));
                // An earlier failed attempt's flag does not describe this answer.
                out.flags = "-";
                if configured && retry_left && may_retry_sent && retriable(&retry, Some(resp.status()), true) {
                    if let Some(_budget) = cluster.retry_budget() {
                        debug!(status = %resp.status(), attempt, "retrying");
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    && !(downstream_upgrade.is_some() && rewrite::upgrade_confirmed(resp.headers()))
                {
                    if let Some(down_up) = downstream_upgrade {
                        close_gracefully(down_up);
                    }
                    return refuse_switch(wp, &resp, out);
                }
                if let (Some(down_up), StatusCode::SWITCHING_PROTOCOLS) = (downstream_upgrade, resp.status()) {
                    let up = hyper::upgrade::on(&mut resp);
                    tokio::spawn(async move {
                        match tokio::try_join!(down_up, up) {
                            Ok((d, u)) => {
                                let (mut d, mut u) = (hyper_util::rt::TokioIo::new(d), hyper_util::rt::TokioIo::new(u));
                                let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                            }
                            Err(e) => debug!(error = %e, "upgrade failed"),
                        }
                    });
                }
                let (mut rp, rb) = resp.into_parts();
                rewrite::strip_hop_by_hop(&mut rp.headers, rp.status == StatusCode::SWITCHING_PROTOCOLS);
                drop(admission);
                return Response::from_parts(rp, rb.map_err(|e| Box::new(e) as _).boxed());
            }
            Ok(Err(e)) => {
                cluster.record(&workload.uid, None);
                let sent = !e.is_connect();
                out.reason = format!("upstream {}: {e}", ep.target);
                out.flags = "UF";
                let allowed = if configured {
                    retriable(&retry, None, sent) && (!sent || may_retry_sent)
                } else {
                    !sent
                };
                if retry_left && allowed && cluster.retry_budget().is_some() {
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                last = Some(reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                ));
                break;
            }
            Err(()) => {
                cluster.record(&workload.uid, None);
                out.flags = "UT";
                out.reason = format!("upstream {} per-try timeout", ep.target);
                if configured && retry_left && may_retry_sent && cluster.retry_budget().is_some() {
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                last = Some(reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"));
                break;
            }
        }
    }
    last.unwrap_or_else(|| reply(StatusCode::SERVICE_UNAVAILABLE, "upstream request failed"))
}

/// A 101 the client did not ask for (another protocol, or no upgrade at all): 502, and the
/// client's connection closes so nothing is sent after it.
fn refuse_switch(wp: &Waypoint, resp: &Response<Incoming>, out: &mut Outcome) -> Response<Body> {
    let to = resp
        .headers()
        .get(header::UPGRADE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    wp.metrics.reject("bad_upgrade");
    out.flags = "UPE";
    out.reason = format!("upstream switched protocols to {to:?}, which was not requested");
    let mut r = reply(
        StatusCode::BAD_GATEWAY,
        "upstream switched to a protocol that was not requested",
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
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

/// Sends a copy of a request to a mirror backend and drops the answer.
fn spawn_mirror(
    wp: &Arc<Waypoint>,
    m: &wp::WeightedBackend,
    parts: &http::request::Parts,
    body: Bytes,
    default_port: u16,
    http2: bool,
) {
    let state = wp.state.load();
    let Some(service) = state.service(&m.service).cloned() else {
        debug!(mirror = %m.service, "mirror service unknown");
        return;
    };
    let port = u16::try_from(m.port).ok().filter(|p| *p != 0).unwrap_or(default_port);
    let eps = upstream::candidates(&state, &service, None);
    let Some(ep) = eps
        .get(rand::thread_rng().gen_range(0..eps.len().max(1)))
        .and_then(|w| upstream::target(w, &service, port, w.addresses.first().copied()?))
    else {
        return;
    };
    let mut req = Request::from_parts(parts.clone(), full(body));
    *req.version_mut() = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let Ok(uri) = format!("http://{}{pq}", ep.target).parse() else {
        return;
    };
    *req.uri_mut() = uri;
    // Envoy's convention: the mirror sees the host with a "-shadow" suffix.
    if let Some(h) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        let shadow = match h.rsplit_once(':') {
            Some((name, port)) => format!("{name}-shadow:{port}"),
            None => format!("{h}-shadow"),
        };
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let wp = wp.clone();
    tokio::spawn(async move {
        match wp.upstreams.client(http2).request(req).await {
            Ok(resp) => {
                let _ = resp.into_body().collect().await;
            }
            Err(e) => debug!(error = %e, "mirror request failed"),
        }
    });
}
