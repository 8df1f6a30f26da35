//! Istio-compatible TCP metrics (`istio_tcp_*`) and the per-connection access log.

use mesh_core::identity::Identity;
use mesh_core::state::{Service, Workload};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

/// Labels of every `istio_tcp_*` series, named as Istio names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_owned()
    } else {
        s.to_owned()
    }
}

impl TcpLabels {
    pub fn new(
        reporter: Reporter,
        src: Option<&Workload>,
        src_identity: Option<&Identity>,
        dst: Option<&Workload>,
        svc: Option<&Service>,
        mtls: bool,
    ) -> Self {
        let wl_name = |w: Option<&Workload>| {
            w.map(|w| {
                or_unknown(if w.workload_name.is_empty() {
                    &w.name
                } else {
                    &w.workload_name
                })
            })
            .unwrap_or_else(|| UNKNOWN.into())
        };
        let field = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            w.map(|w| or_unknown(f(w))).unwrap_or_else(|| UNKNOWN.into())
        };
        TcpLabels {
            reporter,
            source_workload: wl_name(src),
            source_workload_namespace: field(src, |w| &w.namespace),
            source_principal: src_identity.map(|i| i.to_string()).unwrap_or_else(|| UNKNOWN.into()),
            source_canonical_service: field(src, |w| &w.canonical_name),
            source_canonical_revision: field(src, |w| &w.canonical_revision),
            destination_workload: wl_name(dst),
            destination_workload_namespace: field(dst, |w| &w.namespace),
            destination_principal: dst.map(|w| w.identity.to_string()).unwrap_or_else(|| UNKNOWN.into()),
            destination_canonical_service: field(dst, |w| &w.canonical_name),
            destination_canonical_revision: field(dst, |w| &w.canonical_revision),
            destination_service: svc.map(|s| s.hostname.clone()).unwrap_or_else(|| UNKNOWN.into()),
            destination_service_namespace: svc.map(|s| s.namespace.clone()).unwrap_or_else(|| UNKNOWN.into()),
            destination_service_name: svc.map(|s| s.name.clone()).unwrap_or_else(|| UNKNOWN.into()),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: if mtls {
                SecurityPolicy::mutual_tls
            } else {
                SecurityPolicy::unknown
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Every metric ztunnel exports.
#[derive(Clone, Default)]
pub struct Metrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent: Family<TcpLabels, Counter>,
    pub received: Family<TcpLabels, Counter>,
    /// Connections refused before any byte moved, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// Inbound streams whose `forwarded: for=` address was not used, by reason.
    pub forwarded_ignored: Family<ReasonLabels, Counter>,
    pub active: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the destination", m.sent.clone());
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the destination",
            m.received.clone(),
        );
        registry.register(
            "ztunnel_connections_refused",
            "Connections refused by ztunnel, by reason",
            m.refused.clone(),
        );
        registry.register(
            "ztunnel_forwarded_ignored",
            "Inbound streams whose forwarded client address was not believed (the peer's own address was used), by reason",
            m.forwarded_ignored.clone(),
        );
        registry.register(
            "ztunnel_active_connections",
            "Connections being proxied now",
            m.active.clone(),
        );
        m
    }

    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Records a closed connection; `sent` flows client -> destination.
    pub fn close(&self, labels: &TcpLabels, sent: u64, received: u64) {
        self.closed.get_or_create(labels).inc();
        self.sent.get_or_create(labels).inc_by(sent);
        self.received.get_or_create(labels).inc_by(received);
    }
}

/// One proxied connection's telemetry: counted as opened when created; `finish` counts it
/// closed with its bytes and writes the access log line.
pub struct ConnRecord<'a> {
    metrics: &'a Metrics,
    labels: TcpLabels,
    direction: &'static str,
    src_addr: std::net::SocketAddr,
    dst_addr: std::net::SocketAddr,
    hbone_addr: Option<std::net::SocketAddr>,
    start: std::time::Instant,
}

impl<'a> ConnRecord<'a> {
    pub fn open(
        metrics: &'a Metrics,
        labels: TcpLabels,
        direction: &'static str,
        src_addr: std::net::SocketAddr,
        dst_addr: std::net::SocketAddr,
        hbone_addr: Option<std::net::SocketAddr>,
    ) -> Self {
        metrics.opened.get_or_create(&labels).inc();
        metrics.active.inc();
        ConnRecord {
            metrics,
            labels,
            direction,
            src_addr,
            dst_addr,
            hbone_addr,
            start: std::time::Instant::now(),
        }
    }

    /// `result` carries (bytes client -> destination, bytes destination -> client).
    pub fn finish(self, result: Result<(u64, u64), String>) {
        let (sent, received, error) = match result {
            Ok((s, r)) => (s, r, None),
            Err(e) => (0, 0, Some(e)),
        };
        self.metrics.close(&self.labels, sent, received);
        let l = &self.labels;
        tracing::info!(
            target: "access",
            direction = self.direction,
            src.addr = %self.src_addr,
            src.workload = %l.source_workload,
            src.namespace = %l.source_workload_namespace,
            src.identity = %l.source_principal,
            dst.addr = %self.dst_addr,
            dst.hbone_addr = %self.hbone_addr.map(|a| a.to_string()).unwrap_or_default(),
            dst.service = %l.destination_service,
            dst.workload = %l.destination_workload,
            dst.namespace = %l.destination_workload_namespace,
            dst.identity = %l.destination_principal,
            bytes_sent = sent,
            bytes_recv = received,
            duration_ms = self.start.elapsed().as_millis() as u64,
            error = error.as_deref().unwrap_or(""),
            "connection complete"
        );
    }
}

impl Drop for ConnRecord<'_> {
    fn drop(&mut self) {
        self.metrics.active.dec();
    }
}
