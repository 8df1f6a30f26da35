//! Distributed tracing: the trace context of a request is taken from W3C `traceparent` or B3
//! headers (a new trace is started when there is none, sampled at the configured percentage;
//! an incoming sampling decision is kept), the waypoint's span becomes the parent of the
//! upstream request (both header families are written), and sampled spans are exported in
//! batches to Zipkin (v2 JSON) and/or OTLP collectors through [`super::export`]: OTLP/gRPC
//! (`grpc://host:port`, `TraceService/Export`) or OTLP/HTTP (`http://host:port/path`), both
//! protobuf `ExportTraceServiceRequest` as Envoy's OpenTelemetry tracer sends them
//! (shared with the access log). Export never blocks a request: spans go through a bounded
//! queue and are dropped (and counted) when it is full or the collector fails.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use rand::Rng;

use mesh_proto::otlp::collector::trace::v1::ExportTraceServiceRequest;
use mesh_proto::otlp::common::v1 as otlp_common;
use mesh_proto::otlp::trace::v1 as otlp_trace;
use prost::Message;

use super::export::{Endpoint, Exporter, Transport};

/// The gRPC method spans are sent to.
pub const TRACES_METHOD: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// One request's place in a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The caller's span, if the request carried one.
    pub parent: Option<u64>,
    /// The waypoint's span for this request.
    pub span_id: u64,
    pub sampled: bool,
}

fn hex_u128(s: &str) -> Option<u128> {
    // B3 allows 64-bit trace ids; they are left-padded.
    (matches!(s.len(), 16 | 32))
        .then(|| u128::from_str_radix(s, 16).ok())
        .flatten()
        .filter(|v| *v != 0)
}

fn hex_u64(s: &str) -> Option<u64> {
    (s.len() == 16)
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
        .filter(|v| *v != 0)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// `traceparent: 00-<trace>-<span>-<flags>`.
fn from_traceparent(h: &HeaderMap) -> Option<(u128, u64, bool)> {
    let mut parts = header(h, "traceparent")?.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((hex_u128(trace)?, hex_u64(span)?, flags & 1 == 1))
}

/// Multi-header B3, or the single `b3: <trace>-<span>[-<sampled>[-<parent>]]` header.
fn from_b3(h: &HeaderMap) -> Option<(u128, u64, Option<bool>)> {
    let sampled = |v: &str| match v {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    };
    if let Some(single) = header(h, "b3") {
        let mut parts = single.split('-');
        let (trace, span) = (parts.next()?, parts.next()?);
        return Some((hex_u128(trace)?, hex_u64(span)?, parts.next().and_then(sampled)));
    }
    let trace = hex_u128(header(h, "x-b3-traceid")?)?;
    let span = hex_u64(header(h, "x-b3-spanid")?)?;
    let s = header(h, "x-b3-flags")
        .filter(|f| *f == "1")
        .map(|_| true)
        .or_else(|| header(h, "x-b3-sampled").and_then(sampled));
    Some((trace, span, s))
}

fn nonzero_u64(rng: &mut impl Rng) -> u64 {
    rng.gen_range(1..=u64::MAX)
}

/// The context for a request with headers `h`: continues the caller's trace if any.
pub fn extract(h: &HeaderMap, sampling_percent: f64) -> TraceContext {
    let mut rng = rand::thread_rng();
    let fresh_sample = || sampling_percent >= 100.0 || rand::thread_rng().gen_range(0.0..100.0) < sampling_percent;
    let (trace_id, parent, sampled) = match from_traceparent(h) {
        Some((t, p, s)) => (t, Some(p), s),
        None => match from_b3(h) {
            Some((t, p, s)) => (t, Some(p), s.unwrap_or_else(fresh_sample)),
            None => (rng.gen_range(1..=u128::MAX), None, fresh_sample()),
        },
    };
    TraceContext {
        trace_id,
        parent,
        span_id: nonzero_u64(&mut rng),
        sampled,
    }
}

/// The headers [`inject`] writes or removes: the mesh vouches for them once injected, so a
/// client's `Connection` list does not remove them.
pub const HEADERS: [&str; 6] = [
    "traceparent",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "x-b3-parentspanid",
    "b3",
];

/// Writes the context for the upstream request: our span is its parent.
pub fn inject(ctx: &TraceContext, h: &mut HeaderMap) {
    let flag = if ctx.sampled { "01" } else { "00" };
    let tp = format!("00-{:032x}-{:016x}-{flag}", ctx.trace_id, ctx.span_id);
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    put("traceparent", tp);
    put("x-b3-traceid", format!("{:032x}", ctx.trace_id));
    put("x-b3-spanid", format!("{:016x}", ctx.span_id));
    put("x-b3-sampled", if ctx.sampled { "1" } else { "0" }.to_owned());
    match ctx.parent {
        Some(p) => put("x-b3-parentspanid", format!("{p:016x}")),
        None => {
            h.remove("x-b3-parentspanid");
        }
    }
    // One encoding per family: the single-header form would now disagree.
    h.remove("b3");
}

/// A finished span.
pub struct Span {
    pub ctx: TraceContext,
    pub name: String,
    pub start: SystemTime,
    pub duration: Duration,
    pub tags: Vec<(std::borrow::Cow<'static, str>, String)>,
}

/// Where spans go, and how many.
#[derive(Clone, Debug, Default)]
pub struct TraceConfig {
    /// Zipkin v2 endpoint, e.g. `http://zipkin:9411/api/v2/spans`.
    pub zipkin: Option<String>,
    /// OTLP traces endpoint: `grpc://collector:4317` or `http://collector:4318/v1/traces`.
    pub otlp: Option<String>,
    /// Percentage of new traces sampled (0-100).
    pub sampling: f64,
    /// Tags added to every span.
    pub tags: Vec<(String, String)>,
    /// `localEndpoint.serviceName` / `service.name`.
    pub service: String,
    /// Where lost spans are counted (`waypoint_trace_spans_dropped_total`).
    pub dropped: Counter,
}

/// The counter of spans lost, registered as `waypoint_trace_spans_dropped`.
pub fn register_dropped(registry: &mut prometheus_client::registry::Registry) -> Counter {
    let c = Counter::default();
    registry.register(
        "waypoint_trace_spans_dropped",
        "Sampled spans not delivered to the trace collectors (queue full or collector failing; requests never wait)",
        c.clone(),
    );
    c
}

pub struct Tracer {
    pub sampling: f64,
    exporter: Option<Exporter<Span>>,
    /// Spans lost: queue full or collector failing.
    pub dropped: Counter,
}

impl Tracer {
    /// Starts the exporter when an endpoint is configured.
    pub fn start(cfg: TraceConfig) -> Arc<Tracer> {
        let dropped = cfg.dropped.clone();
        let mut endpoints = Vec::new();
        if let Some(url) = &cfg.zipkin {
            let c = cfg.clone();
            endpoints.push(Endpoint {
                transport: Transport::Http {
                    url: url.clone(),
                    content_type: "application/json",
                },
                encode: Box::new(move |spans: &[Span]| zipkin_json(spans, &c).into_bytes()),
            });
        }
        if let Some(url) = &cfg.otlp {
            let c = cfg.clone();
            match Transport::from_address(url, TRACES_METHOD, "application/x-protobuf") {
                Ok(transport) => endpoints.push(Endpoint {
                    transport,
                    encode: Box::new(move |spans: &[Span]| otlp_traces_request(spans, &c).encode_to_vec()),
                }),
                Err(e) => tracing::warn!(error = %e, "OTLP trace collector address unusable; no spans sent there"),
            }
        }
        let exporter = (!endpoints.is_empty()).then(|| {
            let d = dropped.clone();
            Exporter::start(
                "spans",
                endpoints,
                Arc::new(move |_, n| {
                    d.inc_by(n);
                }),
            )
        });
        Arc::new(Tracer {
            sampling: if exporter.is_some() {
                cfg.sampling.clamp(0.0, 100.0)
            } else {
                0.0
            },
            exporter,
            dropped,
        })
    }

    pub fn enabled(&self) -> bool {
        self.exporter.is_some()
    }

    pub fn finish(&self, span: Span) {
        if let Some(e) = &self.exporter {
            e.send(span);
        }
    }
}

fn micros(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0)
}

/// Zipkin v2 JSON for a batch.
pub fn zipkin_json(spans: &[Span], cfg: &TraceConfig) -> String {
    let list: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut tags: serde_json::Map<String, serde_json::Value> =
                s.tags.iter().map(|(k, v)| (k.to_string(), v.clone().into())).collect();
            tags.extend(cfg.tags.iter().map(|(k, v)| (k.clone(), v.clone().into())));
            let mut span = serde_json::json!({
                "traceId": format!("{:032x}", s.ctx.trace_id),
                "id": format!("{:016x}", s.ctx.span_id),
                "name": s.name,
                "kind": "SERVER",
                "timestamp": micros(s.start) as u64,
                "duration": (s.duration.as_micros() as u64).max(1),
                "localEndpoint": {"serviceName": cfg.service},
                "tags": tags,
            });
            if let Some(p) = s.ctx.parent {
                span["parentId"] = format!("{p:016x}").into();
            }
            span
        })
        .collect();
    serde_json::Value::Array(list).to_string()
}

/// OTLP protobuf (`ExportTraceServiceRequest`) for a batch.
pub fn otlp_traces_request(spans: &[Span], cfg: &TraceConfig) -> ExportTraceServiceRequest {
    use super::access_log::kv;
    let text = |v: &str| otlp_common::any_value::Value::StringValue(v.to_owned());
    let spans = spans
        .iter()
        .map(|s| {
            let start = s
                .start
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let mut attributes: Vec<_> = s.tags.iter().map(|(k, v)| kv(k, text(v))).collect();
            attributes.extend(cfg.tags.iter().map(|(k, v)| kv(k, text(v))));
            otlp_trace::Span {
                trace_id: s.ctx.trace_id.to_be_bytes().to_vec(),
                span_id: s.ctx.span_id.to_be_bytes().to_vec(),
                parent_span_id: s.ctx.parent.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
                name: s.name.clone(),
                kind: 2,
                start_time_unix_nano: start,
                end_time_unix_nano: start + s.duration.as_nanos() as u64,
                attributes,
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![otlp_trace::ResourceSpans {
            resource: Some(super::access_log::resource(&cfg.service)),
            scope_spans: vec![otlp_trace::ScopeSpans {
                scope: Some(otlp_common::InstrumentationScope {
                    name: "mesh-waypoint".to_owned(),
                    ..Default::default()
                }),
                spans,
            }],
        }],
    }
}

/// `key=value` of a `--trace-tag` flag.
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: expected key=value")),
    }
}

/// Text for logs: `<trace>/<span>`.
pub fn describe(ctx: &TraceContext) -> String {
    let mut s = String::with_capacity(49);
    let _ = write!(s, "{:032x}/{:016x}", ctx.trace_id, ctx.span_id);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn traceparent_is_continued_and_rewritten_with_our_span() {
        let h = headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]);
        let ctx = extract(&h, 0.0);
        assert_eq!(ctx.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(ctx.parent, Some(0x00f067aa0ba902b7));
        assert!(ctx.sampled, "the caller's decision wins over 0 %");
        let mut out = HeaderMap::new();
        inject(&ctx, &mut out);
        let tp = out["traceparent"].to_str().unwrap();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"));
        assert!(!tp.contains("00f067aa0ba902b7"), "our span is the new parent");
        assert_eq!(out["x-b3-parentspanid"], "00f067aa0ba902b7");
        // What `HEADERS` declares is all that `inject` writes.
        assert!(out.keys().all(|k| HEADERS.contains(&k.as_str())), "{out:?}");
    }

    #[test]
    fn b3_single_and_multi() {
        let ctx = extract(
            &headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]),
            100.0,
        );
        assert_eq!(ctx.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert!(!ctx.sampled, "b3 said not sampled");
        let ctx = extract(
            &headers(&[
                ("x-b3-traceid", "463ac35c9f6413ad"),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
                ("x-b3-sampled", "1"),
            ]),
            0.0,
        );
        assert_eq!(ctx.trace_id, 0x463ac35c9f6413ad);
        assert!(ctx.sampled);
    }

    #[test]
    fn garbage_starts_a_new_trace() {
        let ctx = extract(&headers(&[("traceparent", "00-zz-yy-01")]), 0.0);
        assert_eq!(ctx.parent, None);
        assert!(!ctx.sampled);
        assert!(extract(&HeaderMap::new(), 100.0).sampled);
    }

    #[test]
    fn zipkin_json_and_otlp_protobuf_carry_the_tags() {
        let span = Span {
            ctx: extract(&HeaderMap::new(), 100.0),
            name: "GET /x".into(),
            start: SystemTime::now(),
            duration: Duration::from_millis(3),
            tags: vec![("http.status_code".into(), "200".into())],
        };
        let cfg = TraceConfig {
            service: "waypoint.shop".into(),
            tags: vec![("cluster".into(), "local".into())],
            ..Default::default()
        };
        let z: serde_json::Value = serde_json::from_str(&zipkin_json(std::slice::from_ref(&span), &cfg)).unwrap();
        assert_eq!(z[0]["tags"]["cluster"], "local");
        assert_eq!(z[0]["localEndpoint"]["serviceName"], "waypoint.shop");
        let bytes = otlp_traces_request(std::slice::from_ref(&span), &cfg).encode_to_vec();
        let o = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let rs = &o.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().unwrap().attributes[0].value,
            Some(otlp_common::AnyValue {
                value: Some(otlp_common::any_value::Value::StringValue("waypoint.shop".into()))
            })
        );
        let got = &rs.scope_spans[0].spans[0];
        assert_eq!(got.name, "GET /x");
        assert_eq!(got.trace_id, span.ctx.trace_id.to_be_bytes());
        assert_eq!(got.end_time_unix_nano - got.start_time_unix_nano, 3_000_000);
        let keys: Vec<_> = got.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["http.status_code", "cluster"]);
    }

    struct Collector(tokio::sync::mpsc::UnboundedSender<ExportTraceServiceRequest>);

    #[tonic::async_trait]
    impl mesh_proto::otlp::collector::trace::v1::trace_service_server::TraceService for Collector {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<mesh_proto::otlp::collector::trace::v1::ExportTraceServiceResponse>, tonic::Status>
        {
            let _ = self.0.send(req.into_inner());
            Ok(tonic::Response::new(Default::default()))
        }
    }

    /// `--otlp-address grpc://...` (an `opentelemetry` provider without `http`): sampled
    /// spans reach a gRPC TraceService (tonic) as `Export` calls.
    #[tokio::test]
    async fn spans_reach_an_otlp_grpc_collector() {
        use mesh_proto::otlp::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Collector(tx)))
                .serve_with_incoming(incoming),
        );
        let tracer = Tracer::start(TraceConfig {
            otlp: Some(format!("grpc://{addr}")),
            sampling: 100.0,
            service: "waypoint.shop".into(),
            ..Default::default()
        });
        let ctx = extract(&HeaderMap::new(), 100.0);
        tracer.finish(Span {
            ctx,
            name: "GET /grpc".into(),
            start: SystemTime::now(),
            duration: Duration::from_millis(1),
            tags: Vec::new(),
        });
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the collector got a call")
            .unwrap();
        let span = &got.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!((span.name.as_str(), span.kind), ("GET /grpc", 2));
        assert_eq!(span.span_id, ctx.span_id.to_be_bytes());
        assert_eq!(tracer.dropped.get(), 0);
    }

    /// Spans past the exporter's queue are dropped and counted, without waiting.
    #[tokio::test]
    async fn spans_beyond_the_queue_are_counted_as_dropped() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tracer = Tracer::start(TraceConfig {
            otlp: Some(format!("http://{}/v1/traces", listener.local_addr().unwrap())),
            sampling: 100.0,
            ..Default::default()
        });
        let span = || Span {
            ctx: extract(&HeaderMap::new(), 100.0),
            name: "GET /".into(),
            start: SystemTime::now(),
            duration: Duration::from_millis(1),
            tags: Vec::new(),
        };
        for _ in 0..super::super::export::QUEUE + 50 {
            tracer.finish(span());
        }
        assert!(tracer.dropped.get() >= 49, "{}", tracer.dropped.get());
    }
}
