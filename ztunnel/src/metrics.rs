//! Istio-compatible TCP metrics (`istio_tcp_*`) and the per-connection access log.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use mesh_core::hbone::stream::SpliceObserver;
use mesh_core::identity::Identity;
use mesh_core::rbac::Observed;
use mesh_core::state::{Service, Workload};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::refusal::{ConnError, Refusal};

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

/// Labels of every `istio_tcp_*` series: Istio's ztunnel's 27, named and ordered as it names
/// them. A value not known is `unknown` (Istio's rule for an empty one); region and zone are
/// not in our workload model, so they are always `unknown`, as Istio reports a workload
/// without locality.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_owned()
    } else {
        s.to_owned()
    }
}

/// One side's workload labels, in Istio's terms (`app`/`version` are the canonical ones).
struct Side {
    workload: String,
    namespace: String,
    canonical_service: String,
    canonical_revision: String,
    cluster: String,
}

impl Side {
    fn of(w: Option<&Workload>) -> Side {
        let f = |get: fn(&Workload) -> &str| w.map_or_else(|| UNKNOWN.to_owned(), |w| or_unknown(get(w)));
        Side {
            // Our local files may leave the workload name out; the pod name stands in.
            workload: f(|w| {
                if w.workload_name.is_empty() {
                    &w.name
                } else {
                    &w.workload_name
                }
            }),
            namespace: f(|w| &w.namespace),
            canonical_service: f(|w| &w.canonical_name),
            canonical_revision: f(|w| &w.canonical_revision),
            cluster: f(|w| &w.cluster_id),
        }
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
        let (s, d) = (Side::of(src), Side::of(dst));
        let svc_field = |get: fn(&Service) -> &str| svc.map_or_else(|| UNKNOWN.to_owned(), |v| or_unknown(get(v)));
        TcpLabels {
            reporter,
            source_app: s.canonical_service.clone(),
            source_version: s.canonical_revision.clone(),
            source_workload: s.workload,
            source_canonical_service: s.canonical_service,
            source_canonical_revision: s.canonical_revision,
            source_workload_namespace: s.namespace,
            source_principal: src_identity.map_or_else(|| UNKNOWN.into(), |i| i.to_string()),
            source_cluster: s.cluster,
            destination_service: svc_field(|v| &v.hostname),
            destination_service_namespace: svc_field(|v| &v.namespace),
            destination_service_name: svc_field(|v| &v.name),
            destination_app: d.canonical_service.clone(),
            destination_version: d.canonical_revision.clone(),
            destination_workload: d.workload,
            destination_canonical_service: d.canonical_service,
            destination_canonical_revision: d.canonical_revision,
            destination_workload_namespace: d.namespace,
            destination_principal: dst.map_or_else(|| UNKNOWN.into(), |w| w.identity.to_string()),
            destination_cluster: d.cluster,
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: if mtls {
                SecurityPolicy::mutual_tls
            } else {
                SecurityPolicy::unknown
            },
            source_region: UNKNOWN.into(),
            source_zone: UNKNOWN.into(),
            destination_region: UNKNOWN.into(),
            destination_zone: UNKNOWN.into(),
        }
    }
}

/// Labels of `istio_tcp_sockets_open`, as Istio's ztunnel labels it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReporterLabels {
    pub reporter: Reporter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Labels of the AUDIT and dry-run counters. Policies come from the control plane, so the
/// set is bounded by the configuration, not by peers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `namespace/name`; for a dry-run verdict no rule decided, `none`.
    pub policy: String,
    /// `audit`, or the dry-run verdict: `allow` / `deny`.
    pub decision: &'static str,
}

/// Every metric ztunnel exports.
#[derive(Clone, Default)]
pub struct Metrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes`: the response direction, destination -> client.
    pub sent: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes`: the request direction, client -> destination.
    pub received: Family<TcpLabels, Counter>,
    /// Connections refused before any byte moved, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// Inbound streams whose `forwarded: for=` address was not used, by reason.
    pub forwarded_ignored: Family<ReasonLabels, Counter>,
    pub active: Gauge,
    /// Connections being proxied now, by reporter (Istio's `istio_tcp_sockets_open`).
    pub sockets_open: Family<ReporterLabels, Gauge>,
    /// Inbound connections an AUDIT policy matched, by policy.
    pub audited: Family<PolicyLabels, Counter>,
    /// Inbound connections evaluated under dry-run policies, by what they alone would decide.
    pub dry_run: Family<PolicyLabels, Counter>,
    /// One shared copy of each connection label set, held by every open connection that has
    /// it: an idle connection then holds a pointer, not two dozen strings (~1.4 KiB). Never
    /// shrinks, like the label families themselves, so it is no larger than they are.
    label_sets: Arc<Mutex<HashSet<Arc<TcpLabels>>>>,
}

impl Metrics {
    /// The shared copy of `labels`.
    fn intern(&self, labels: TcpLabels) -> Arc<TcpLabels> {
        let mut sets = self.label_sets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = sets.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        sets.insert(shared.clone());
        shared
    }
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
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent back to the client (the response direction)",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (the request direction)",
            m.received.clone(),
        );
        registry.register(
            "istio_tcp_sockets_open",
            "The current number of open TCP connections proxied, by reporter",
            m.sockets_open.clone(),
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
            "ztunnel_authz_audit",
            "Inbound connections an AUDIT authorization policy matched, by policy (never enforced)",
            m.audited.clone(),
        );
        registry.register(
            "ztunnel_authz_dry_run",
            "Inbound connections evaluated under dry-run authorization policies, by the decision those alone would make and the policy that decided it (never enforced)",
            m.dry_run.clone(),
        );
        registry.register(
            "ztunnel_active_connections",
            "Connections being proxied now",
            m.active.clone(),
        );
        m
    }

    /// Counts what AUDIT and dry-run policies saw of one connection.
    pub fn observed(&self, o: &Observed) {
        for (policy, _) in &o.audits {
            let labels = PolicyLabels {
                policy: policy.clone(),
                decision: "audit",
            };
            self.audited.get_or_create(&labels).inc();
        }
        if let Some(d) = &o.dry_run {
            let labels = PolicyLabels {
                policy: d.by.clone().unwrap_or_else(|| "none".to_owned()),
                decision: d.verdict(),
            };
            self.dry_run.get_or_create(&labels).inc();
        }
    }

    pub fn refuse(&self, reason: Refusal) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }
}

/// A connection's byte counters, resolved once when it opens: the data path adds to them per
/// chunk with no label lookup, so a scrape during a long transfer sees them grow and a
/// connection that ends in error has counted what moved. As Istio counts them (its ztunnel
/// and Envoy alike): `istio_tcp_received_bytes` is the request direction (client ->
/// destination), `istio_tcp_sent_bytes` the response (destination -> client).
pub struct ConnBytes {
    to_destination: Counter,
    to_client: Counter,
    to_destination_total: AtomicU64,
    to_client_total: AtomicU64,
}

impl ConnBytes {
    /// `n` bytes moved from the client towards the destination.
    pub fn to_destination(&self, n: u64) {
        self.to_destination.inc_by(n);
        self.to_destination_total.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes moved from the destination back to the client.
    pub fn to_client(&self, n: u64) {
        self.to_client.inc_by(n);
        self.to_client_total.fetch_add(n, Ordering::Relaxed);
    }

    fn totals(&self) -> (u64, u64) {
        (
            self.to_destination_total.load(Ordering::Relaxed),
            self.to_client_total.load(Ordering::Relaxed),
        )
    }

    /// Observer for a splice whose tunnel leads to the destination (outbound).
    pub fn tunnel_to_destination(&self) -> TunnelSide<'_> {
        TunnelSide {
            bytes: self,
            tunnel_is_destination: true,
        }
    }

    /// Observer for a splice whose tunnel leads to the client (inbound).
    pub fn tunnel_to_client(&self) -> TunnelSide<'_> {
        TunnelSide {
            bytes: self,
            tunnel_is_destination: false,
        }
    }
}

/// Maps a splice's directions onto sent/received.
pub struct TunnelSide<'a> {
    bytes: &'a ConnBytes,
    tunnel_is_destination: bool,
}

impl SpliceObserver for TunnelSide<'_> {
    fn moved_to_tunnel(&self, chunk: &[u8]) {
        let n = chunk.len() as u64;
        if self.tunnel_is_destination {
            self.bytes.to_destination(n)
        } else {
            self.bytes.to_client(n)
        }
    }

    fn moved_from_tunnel(&self, chunk: &[u8]) {
        let n = chunk.len() as u64;
        if self.tunnel_is_destination {
            self.bytes.to_client(n)
        } else {
            self.bytes.to_destination(n)
        }
    }
}

/// The client's socket, counting as it goes: bytes read from it are sent towards the
/// destination, bytes written to it were received from there. For plain copies
/// (`copy_bidirectional`), which report nothing until they end.
pub struct CountedClient<'a, S> {
    pub inner: &'a mut S,
    pub bytes: &'a ConnBytes,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedClient<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            this.bytes.to_destination(n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedClient<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.bytes.to_client(*n as u64);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One proxied connection's telemetry: counted as opened when created, its bytes as they
/// move (through [`ConnRecord::bytes`]); `finish` counts it closed and writes the access log.
pub struct ConnRecord<'a> {
    metrics: &'a Metrics,
    /// Shared ([`Metrics::intern`]): a connection's task holds its record for as long as the
    /// connection lives.
    labels: Arc<TcpLabels>,
    bytes: ConnBytes,
    direction: &'static str,
    src_addr: std::net::SocketAddr,
    dst_addr: std::net::SocketAddr,
    hbone_addr: Option<std::net::SocketAddr>,
    start: std::time::Instant,
    /// What AUDIT and dry-run policies saw (inbound), for the access log; boxed, and only when
    /// any did, as most connections see none and each idle one holds its record.
    observed: Option<Box<Observed>>,
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
        metrics
            .sockets_open
            .get_or_create(&ReporterLabels {
                reporter: labels.reporter,
            })
            .inc();
        let bytes = ConnBytes {
            to_destination: metrics.received.get_or_create(&labels).clone(),
            to_client: metrics.sent.get_or_create(&labels).clone(),
            to_destination_total: AtomicU64::new(0),
            to_client_total: AtomicU64::new(0),
        };
        ConnRecord {
            metrics,
            labels: metrics.intern(labels),
            bytes,
            direction,
            src_addr,
            dst_addr,
            hbone_addr,
            start: std::time::Instant::now(),
            observed: None,
        }
    }

    /// Names in the access log what AUDIT and dry-run policies saw of the connection.
    pub fn with_observed(mut self, observed: Observed) -> Self {
        self.observed = (!observed.is_empty()).then(|| Box::new(observed));
        self
    }

    /// The counters the data path adds to.
    pub fn bytes(&self) -> &ConnBytes {
        &self.bytes
    }

    /// Counts the connection closed and logs it with the bytes that moved, whatever the
    /// outcome.
    pub fn finish(self, result: Result<(), ConnError>) {
        self.metrics.closed.get_or_create(&self.labels).inc();
        let (sent, received) = self.bytes.totals();
        let l = &self.labels;
        let error = result.err().map(|e| e.to_string()).unwrap_or_default();
        let none = Observed::default();
        let observed = self.observed.as_deref().unwrap_or(&none);
        // Strings go in as `&str`, not `%` (Display): the JSON formatter then writes them
        // without first formatting each into a String of its own (~0.7 µs less per line).
        tracing::info!(
            target: "access",
            direction = self.direction,
            src.addr = %self.src_addr,
            src.workload = l.source_workload.as_str(),
            src.namespace = l.source_workload_namespace.as_str(),
            src.identity = l.source_principal.as_str(),
            dst.addr = %self.dst_addr,
            dst.hbone_addr = %self.hbone_addr.map(|a| a.to_string()).unwrap_or_default(),
            dst.service = l.destination_service.as_str(),
            dst.workload = l.destination_workload.as_str(),
            dst.namespace = l.destination_workload_namespace.as_str(),
            dst.identity = l.destination_principal.as_str(),
            bytes_sent = sent,
            bytes_recv = received,
            duration_ms = self.start.elapsed().as_millis() as u64,
            error = error.as_str(),
            authz.audit = %observed.audit_names(),
            authz.dry_run = %observed.dry_run.as_ref().map(ToString::to_string).unwrap_or_default(),
            "connection complete"
        );
    }
}

impl Drop for ConnRecord<'_> {
    fn drop(&mut self) {
        self.metrics.active.dec();
        self.metrics
            .sockets_open
            .get_or_create(&ReporterLabels {
                reporter: self.labels.reporter,
            })
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(reporter: Reporter) -> TcpLabels {
        TcpLabels::new(reporter, None, None, None, None, true)
    }

    #[test]
    fn open_connections_share_one_copy_of_their_labels() {
        let metrics = Metrics::default();
        let addr: std::net::SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let open = |r| ConnRecord::open(&metrics, labels(r), "outbound", addr, addr, None);
        let (a, b, other) = (
            open(Reporter::source),
            open(Reporter::source),
            open(Reporter::destination),
        );
        assert!(Arc::ptr_eq(&a.labels, &b.labels), "equal label sets are shared");
        assert!(!Arc::ptr_eq(&a.labels, &other.labels));
        assert_eq!(*other.labels, labels(Reporter::destination));
        a.finish(Ok(()));
        assert_eq!(metrics.closed.get_or_create(&labels(Reporter::source)).get(), 1);
    }
}
