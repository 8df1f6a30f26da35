//! Access-log records sent to OpenTelemetry collectors: when the effective Telemetry's access
//! logging names providers that are `envoyOtelAls` or `opentelemetry` extension providers (the
//! controller resolves them to `http://host:port/v1/logs`), each logged request becomes an OTLP
//! `LogRecord`, posted as OTLP/HTTP JSON (`ExportLogsServiceRequest`) in batches through
//! [`super::export`], the transport spans use. A request never waits for a collector: a full
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

use super::export::{Endpoint, Exporter};

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

/// The exporters of the collectors the access log has been sent to, by endpoint URL.
pub struct Sinks {
    service: String,
    exporters: Mutex<HashMap<String, Exporter<Record>>>,
    /// Records lost, by reason (`queue_full`, `export_failed`, `too_many_collectors`).
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

    /// The exporter for `url`, started on first use (needs a runtime).
    fn exporter(&self, url: &str) -> Option<Exporter<Record>> {
        let mut map = self.exporters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(url) {
            return Some(e.clone());
        }
        if map.len() >= MAX_COLLECTORS {
            return None;
        }
        let service = self.service.clone();
        let dropped = self.dropped.clone();
        let endpoint = Endpoint {
            url: url.to_owned(),
            content_type: "application/json",
            encode: Box::new(move |records: &[Record]| otlp_logs_json(records, &service).into_bytes()),
        };
        let on_drop = Arc::new(move |why: super::export::Dropped, n: u64| {
            dropped
                .get_or_create(&vec![("reason".to_owned(), why.as_str().to_owned())])
                .inc_by(n);
        });
        let e = Exporter::start("access-log records", vec![endpoint], on_drop);
        map.insert(url.to_owned(), e.clone());
        Some(e)
    }

    /// Queues `record` for every collector in `urls`; never waits.
    pub fn send(&self, urls: &[String], record: Record) {
        for url in urls {
            match self.exporter(url) {
                Some(e) => e.send(record.clone()),
                None => self.drop_count("too_many_collectors", 1),
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
