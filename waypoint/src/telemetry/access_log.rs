//! Access-log records sent to OpenTelemetry collectors: when the effective Telemetry's access
//! logging names providers that are `envoyOtelAls` or `opentelemetry` extension providers, each
//! logged request becomes an OTLP `LogRecord`, sent in batches (`ExportLogsServiceRequest`)
//! through [`super::export`], the exporter spans use. The controller writes the endpoint as
//! `grpc://host:port` for `envoyOtelAls` (OTLP/gRPC `LogsService/Export`, protobuf, as Envoy's
//! OpenTelemetry access logger sends it) and as `http://host:port/path` for an `opentelemetry`
//! provider with an `http` block (OTLP/HTTP JSON). A request never waits for a collector: a full
//! queue or a failed batch drops records, counted in `waypoint_access_log_dropped_total{reason}`.
//! Endpoints come from the control plane, not from peers; still, at most [`MAX_COLLECTORS`]
//! exporters are kept (records for another are dropped, `too_many_collectors`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use mesh_proto::otlp::collector::logs::v1::ExportLogsServiceRequest;
use mesh_proto::otlp::common::v1 as otlp_common;
use mesh_proto::otlp::logs::v1 as otlp_logs;
use mesh_proto::otlp::resource::v1::Resource;
use prost::Message;

use super::export::{Endpoint, Exporter, Transport};

/// The gRPC method access-log batches are sent to.
pub const LOGS_METHOD: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/// Distinct collector endpoints with an exporter of their own.
pub const MAX_COLLECTORS: usize = 16;

/// One attribute value of a record.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
}

/// One access-log line as an OTLP log record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub time: SystemTime,
    /// The log message (`request`).
    pub body: String,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// The request's trace and span, when traced: collectors correlate the two.
    pub trace: Option<(u128, u64)>,
}

impl Record {
    pub fn new(body: &str) -> Record {
        Record {
            time: SystemTime::now(),
            body: body.to_owned(),
            attributes: Vec::new(),
            trace: None,
        }
    }

    pub fn str(mut self, key: &'static str, value: impl Into<String>) -> Record {
        self.attributes.push((key, AttrValue::Str(value.into())));
        self
    }

    pub fn int(mut self, key: &'static str, value: i64) -> Record {
        self.attributes.push((key, AttrValue::Int(value)));
        self
    }

    pub fn double(mut self, key: &'static str, value: f64) -> Record {
        self.attributes.push((key, AttrValue::Double(value)));
        self
    }
}

fn any_value(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => json!({"stringValue": s}),
        // OTLP JSON writes 64-bit integers as strings.
        AttrValue::Int(i) => json!({"intValue": i.to_string()}),
        AttrValue::Double(d) => json!({"doubleValue": d}),
    }
}

/// OTLP/HTTP JSON (`ExportLogsServiceRequest`) for a batch, `service` as `service.name`.
pub fn otlp_logs_json(records: &[Record], service: &str) -> String {
    let list: Vec<Value> = records
        .iter()
        .map(|r| {
            let nanos = r.time.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let attributes: Vec<Value> = r
                .attributes
                .iter()
                .map(|(k, v)| json!({"key": k, "value": any_value(v)}))
                .collect();
            let mut rec = json!({
                "timeUnixNano": nanos.to_string(),
                "observedTimeUnixNano": nanos.to_string(),
                "severityNumber": 9,
                "severityText": "INFO",
                "body": {"stringValue": r.body},
                "attributes": attributes,
            });
            if let Some((trace, span)) = r.trace {
                rec["traceId"] = format!("{trace:032x}").into();
                rec["spanId"] = format!("{span:016x}").into();
            }
            rec
        })
        .collect();
    json!({
        "resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeLogs": [{"scope": {"name": "mesh-waypoint"}, "logRecords": list}],
        }]
    })
    .to_string()
}

/// A string attribute in OTLP's protobuf form.
pub(crate) fn kv(key: &str, value: otlp_common::any_value::Value) -> otlp_common::KeyValue {
    otlp_common::KeyValue {
        key: key.to_owned(),
        value: Some(otlp_common::AnyValue { value: Some(value) }),
    }
}

/// The resource naming the waypoint (`service.name`).
pub(crate) fn resource(service: &str) -> Resource {
    Resource {
        attributes: vec![kv(
            "service.name",
            otlp_common::any_value::Value::StringValue(service.to_owned()),
        )],
    }
}

/// OTLP protobuf (`ExportLogsServiceRequest`) for a batch, `service` as `service.name`.
pub fn otlp_logs_request(records: &[Record], service: &str) -> ExportLogsServiceRequest {
    use otlp_common::any_value::Value as V;
    let log_records = records
        .iter()
        .map(|r| {
            let nanos = r
                .time
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let attributes = r
                .attributes
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        AttrValue::Str(s) => V::StringValue(s.clone()),
                        AttrValue::Int(i) => V::IntValue(*i),
                        AttrValue::Double(d) => V::DoubleValue(*d),
                    };
                    kv(k, v)
                })
                .collect();
            let (trace_id, span_id) = match r.trace {
                Some((t, s)) => (t.to_be_bytes().to_vec(), s.to_be_bytes().to_vec()),
                None => (Vec::new(), Vec::new()),
            };
            otlp_logs::LogRecord {
                time_unix_nano: nanos,
                observed_time_unix_nano: nanos,
                severity_number: 9,
                severity_text: "INFO".to_owned(),
                body: Some(otlp_common::AnyValue {
                    value: Some(V::StringValue(r.body.clone())),
                }),
                attributes,
                trace_id,
                span_id,
            }
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![otlp_logs::ResourceLogs {
            resource: Some(resource(service)),
            scope_logs: vec![otlp_logs::ScopeLogs {
                scope: Some(otlp_common::InstrumentationScope {
                    name: "mesh-waypoint".to_owned(),
                    ..Default::default()
                }),
                log_records,
            }],
        }],
    }
}

/// The exporters of the collectors the access log has been sent to, by endpoint URL.
pub struct Sinks {
    service: String,
    exporters: Mutex<HashMap<String, Exporter<Record>>>,
    /// Records lost, by reason (`queue_full`, `export_failed`, `too_many_collectors`,
    /// `bad_address`).
    pub dropped: Family<Vec<(String, String)>, Counter>,
}

impl Sinks {
    /// `service` names the waypoint in the records' resource (`service.name`).
    pub fn register(registry: &mut Registry, service: String) -> Arc<Sinks> {
        let sinks = Sinks {
            service,
            exporters: Mutex::new(HashMap::new()),
            dropped: Family::default(),
        };
        registry.register(
            "waypoint_access_log_dropped",
            "Access-log records not delivered to an OpenTelemetry collector, by reason (requests never wait for a collector)",
            sinks.dropped.clone(),
        );
        Arc::new(sinks)
    }

    fn drop_count(&self, reason: &str, n: u64) {
        self.dropped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc_by(n);
    }

    /// The exporter for `url`, started on first use (needs a runtime); `Err`: the reason
    /// its records are dropped.
    fn exporter(&self, url: &str) -> Result<Exporter<Record>, &'static str> {
        let mut map = self.exporters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(url) {
            return Ok(e.clone());
        }
        if map.len() >= MAX_COLLECTORS {
            return Err("too_many_collectors");
        }
        let service = self.service.clone();
        let dropped = self.dropped.clone();
        let transport = match Transport::from_address(url, LOGS_METHOD, "application/json") {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "access-log collector address unusable");
                return Err("bad_address");
            }
        };
        let encode: super::export::Encode<Record> = match transport {
            Transport::Grpc { .. } => {
                Box::new(move |records: &[Record]| otlp_logs_request(records, &service).encode_to_vec())
            }
            Transport::Http { .. } => {
                Box::new(move |records: &[Record]| otlp_logs_json(records, &service).into_bytes())
            }
        };
        let endpoint = Endpoint { transport, encode };
        let on_drop = Arc::new(move |why: super::export::Dropped, n: u64| {
            dropped
                .get_or_create(&vec![("reason".to_owned(), why.as_str().to_owned())])
                .inc_by(n);
        });
        let e = Exporter::start("access-log records", vec![endpoint], on_drop);
        map.insert(url.to_owned(), e.clone());
        Ok(e)
    }

    /// Queues `record` for every collector in `urls`; never waits.
    pub fn send(&self, urls: &[String], record: Record) {
        for url in urls {
            match self.exporter(url) {
                Ok(e) => e.send(record.clone()),
                Err(reason) => self.drop_count(reason, 1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn records_encode_as_otlp_logs() {
        let r = Record {
            trace: Some((0xabc, 0x12)),
            ..Record::new("request")
                .str("path", "/x")
                .int("status", 503)
                .double("duration_ms", 1.5)
        };
        let v: Value = serde_json::from_str(&otlp_logs_json(&[r], "waypoint.shop")).unwrap();
        let rl = &v["resourceLogs"][0];
        assert_eq!(rl["resource"]["attributes"][0]["value"]["stringValue"], "waypoint.shop");
        let rec = &rl["scopeLogs"][0]["logRecords"][0];
        assert_eq!(rec["body"]["stringValue"], "request");
        assert_eq!(
            rec["attributes"][1],
            json!({"key": "status", "value": {"intValue": "503"}})
        );
        assert_eq!(rec["attributes"][2]["value"]["doubleValue"], 1.5);
        assert_eq!(rec["traceId"], format!("{:032x}", 0xabc));
        assert!(rec["timeUnixNano"].as_str().unwrap().parse::<u128>().unwrap() > 0);
    }

    fn dropped(s: &Sinks, reason: &str) -> u64 {
        s.dropped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .get()
    }

    /// A collector that accepts connections and never answers: sending never waits, the
    /// queue's bound drops (and counts) what does not fit, and the stuck batch is counted too.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_collector_never_blocks_and_drops_are_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/logs", listener.local_addr().unwrap());
        let sinks = Sinks::register(&mut Registry::default(), "w".into());
        let n = super::super::export::QUEUE + 2 * super::super::export::BATCH + 100;
        let started = std::time::Instant::now();
        for i in 0..n {
            sinks.send(std::slice::from_ref(&url), Record::new("request").int("i", i as i64));
            if i == 0 {
                // Let the exporter take the first record and wait for more.
                tokio::task::yield_now().await;
            }
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "send waited");
        assert!(
            dropped(&sinks, "queue_full") >= 100,
            "{}",
            dropped(&sinks, "queue_full")
        );
        // The first batch's POST is never answered: given up after its timeout and counted.
        tokio::time::sleep(std::time::Duration::from_secs(7)).await;
        assert!(dropped(&sinks, "export_failed") >= 1);
        drop(listener);
    }

    /// An OTLP/gRPC collector in the test: every `Export` is passed on, or refused with
    /// UNAVAILABLE when `refuse`.
    struct Collector {
        tx: tokio::sync::mpsc::UnboundedSender<ExportLogsServiceRequest>,
        refuse: bool,
    }

    #[tonic::async_trait]
    impl mesh_proto::otlp::collector::logs::v1::logs_service_server::LogsService for Collector {
        async fn export(
            &self,
            req: tonic::Request<ExportLogsServiceRequest>,
        ) -> Result<tonic::Response<mesh_proto::otlp::collector::logs::v1::ExportLogsServiceResponse>, tonic::Status>
        {
            if self.refuse {
                return Err(tonic::Status::unavailable("collector down"));
            }
            let _ = self.tx.send(req.into_inner());
            Ok(tonic::Response::new(Default::default()))
        }
    }

    async fn grpc_collector(refuse: bool) -> (String, tokio::sync::mpsc::UnboundedReceiver<ExportLogsServiceRequest>) {
        use mesh_proto::otlp::collector::logs::v1::logs_service_server::LogsServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None).unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let svc = LogsServiceServer::new(Collector { tx, refuse });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming),
        );
        (format!("grpc://{addr}"), rx)
    }

    /// `grpc://` endpoints (envoyOtelAls) get `LogsService/Export` calls with protobuf records
    /// that a real gRPC server (tonic) decodes.
    #[tokio::test]
    async fn records_reach_an_otlp_grpc_collector() {
        let (url, mut rx) = grpc_collector(false).await;
        let sinks = Sinks::register(&mut Registry::default(), "waypoint.shop".into());
        let r = Record {
            trace: Some((0xabc, 0x12)),
            ..Record::new("request").str("path", "/x").int("status", 503)
        };
        sinks.send(std::slice::from_ref(&url), r);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("the collector got a call")
            .unwrap();
        let rl = &got.resource_logs[0];
        assert_eq!(rl.resource, Some(resource("waypoint.shop")));
        let rec = &rl.scope_logs[0].log_records[0];
        use otlp_common::any_value::Value as V;
        assert_eq!(rec.body.as_ref().unwrap().value, Some(V::StringValue("request".into())));
        assert_eq!(rec.attributes[0], kv("path", V::StringValue("/x".into())));
        assert_eq!(rec.attributes[1], kv("status", V::IntValue(503)));
        assert_eq!(rec.trace_id, 0xabc_u128.to_be_bytes());
        assert_eq!(rec.span_id, 0x12_u64.to_be_bytes());
        assert!(rec.time_unix_nano > 0 && rec.severity_number == 9);
        assert_eq!(dropped(&sinks, "export_failed"), 0);
    }

    /// A gRPC error status (HTTP 200 with grpc-status UNAVAILABLE) is a failed export.
    #[tokio::test]
    async fn a_grpc_error_status_counts_the_batch_as_lost() {
        let (url, _rx) = grpc_collector(true).await;
        let sinks = Sinks::register(&mut Registry::default(), "w".into());
        sinks.send(std::slice::from_ref(&url), Record::new("request"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while dropped(&sinks, "export_failed") == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the refused batch was not counted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        sinks.send(&["ftp://x".to_owned()], Record::new("request"));
        assert_eq!(dropped(&sinks, "bad_address"), 1);
    }

    #[tokio::test]
    async fn collectors_beyond_the_bound_are_refused() {
        let sinks = Sinks::register(&mut Registry::default(), "w".into());
        let urls: Vec<String> = (0..MAX_COLLECTORS + 3)
            .map(|i| format!("http://127.0.0.1:{}/v1/logs", 1 + i))
            .collect();
        sinks.send(&urls, Record::new("request"));
        assert_eq!(dropped(&sinks, "too_many_collectors"), 3);
    }
}
