//! Istio's HTTP metrics as a waypoint reports them (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`) and
//! the per-request access log.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use mesh_core::identity::Identity;
use mesh_core::state::model::{Service, Workload};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::idle::Meter;

/// Who a series is about, as Istio's standard labels name them: the source and destination
/// workloads and the destination service; `app`/`version` are the canonical service and
/// revision, as Istio's ambient metrics fill them. A value not known is `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Peers {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
}

/// Labels of every request series: the 25 an Istio waypoint (Envoy's stats filter) reports,
/// named as Istio names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    // Last: the derive hands its encoder to a flattened field for good.
    #[prometheus(flatten)]
    pub peers: Peers,
}

/// The labels of one series: Istio's standard set, or that set as a Telemetry's tag
/// overrides changed it (labels removed or added), which only requests under such a
/// Telemetry pay for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum SeriesLabels {
    Standard(Arc<StandardLabels>),
    Custom(Vec<(String, String)>),
}

impl EncodeLabelSet for SeriesLabels {
    fn encode(&self, encoder: prometheus_client::encoding::LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match self {
            SeriesLabels::Standard(l) => l.labels.encode(encoder),
            SeriesLabels::Custom(v) => v.encode(encoder),
        }
    }
}

/// Istio's standard label set with its hash computed once: each of a request's four series
/// lookups hashes one `u64` instead of 25 strings (profiled: SipHash over the labels was a
/// third of the metrics' cost), and a set shared through [`LabelCache`] compares equal by
/// pointer first (`Arc`'s `Eq`).
#[derive(Debug)]
pub struct StandardLabels {
    labels: RequestLabels,
    hash: u64,
}

impl StandardLabels {
    pub fn new(labels: RequestLabels) -> Arc<StandardLabels> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        labels.hash(&mut h);
        Arc::new(StandardLabels {
            labels,
            hash: h.finish(),
        })
    }

    pub fn labels(&self) -> &RequestLabels {
        &self.labels
    }
}

impl Hash for StandardLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for StandardLabels {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.labels == other.labels
    }
}

impl Eq for StandardLabels {}

/// Most standard label sets kept by [`LabelCache`]; past it the cache starts over.
pub const MAX_CACHED_LABELS: usize = 1024;

/// Standard label sets by what they depend on: the source (at a waypoint, the workload at the
/// client's address and the tunnel's peer identity; an ingress gateway's source labels are its
/// own, fixed), the endpoint, the service and the response's code and flags. A request with a
/// known combination takes an `Arc` instead of building ~25 strings. Entries hold the
/// workloads and service they were built from, so a pointer in a key is never reused by
/// another while its entry lives; a new workload or service (a state update) makes a new
/// entry, and the cache starts over past [`MAX_CACHED_LABELS`] (stale entries go then).
#[derive(Default)]
pub struct LabelCache {
    map: Mutex<HashMap<LabelKey, CachedLabels>>,
}

/// Who sent a request, as its labels name it.
#[derive(Clone, Copy, Default)]
pub struct LabelSource<'a> {
    pub workload: Option<&'a Arc<Workload>>,
    pub peer: Option<&'a Identity>,
}

#[derive(Hash, PartialEq, Eq)]
struct LabelKey {
    src: usize,
    /// The peer identity's hash; the entry keeps the identity to compare on a hit.
    peer: u64,
    dst: usize,
    service: usize,
    code: u16,
    flags: &'static str,
}

struct CachedLabels {
    _pinned: (Option<Arc<Workload>>, Option<Arc<Workload>>, Arc<Service>),
    peer: Option<Identity>,
    labels: Arc<StandardLabels>,
}

fn ptr<T>(a: Option<&Arc<T>>) -> usize {
    a.map_or(0, |a| Arc::as_ptr(a) as usize)
}

impl LabelCache {
    /// The label set for a response `(code, flags)` from `dst` for `service` to `src`,
    /// `build` making it the first time.
    pub fn get(
        &self,
        src: LabelSource<'_>,
        (dst, service): (Option<&Arc<Workload>>, &Arc<Service>),
        (code, flags): (u16, &'static str),
        build: impl FnOnce() -> RequestLabels,
    ) -> Arc<StandardLabels> {
        let key = LabelKey {
            src: ptr(src.workload),
            peer: src.peer.map_or(0, |p| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                p.hash(&mut h);
                h.finish()
            }),
            dst: ptr(dst),
            service: Arc::as_ptr(service) as usize,
            code,
            flags,
        };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key) {
            Some(c) if c.peer.as_ref() == src.peer => return c.labels.clone(),
            // Two identities with one hash: the later one is not cached.
            Some(_) => return StandardLabels::new(build()),
            None => {}
        }
        if map.len() >= MAX_CACHED_LABELS {
            map.clear();
        }
        let labels = StandardLabels::new(build());
        let cached = CachedLabels {
            _pinned: (src.workload.cloned(), dst.cloned(), service.clone()),
            peer: src.peer.cloned(),
            labels: labels.clone(),
        };
        map.insert(key, cached);
        labels
    }

    /// How many label sets are kept.
    pub fn cached(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".to_owned()
    } else {
        s.to_owned()
    }
}

impl Peers {
    fn new((src, src_principal): (Option<&Workload>, &str), dst: Option<&Workload>, service: Option<&Service>) -> Self {
        Peers {
            source_workload: or_unknown(src.map_or("", |w| w.workload_name.as_str())),
            source_workload_namespace: or_unknown(src.map_or("", |w| w.namespace.as_str())),
            source_principal: or_unknown(src_principal),
            source_canonical_service: or_unknown(src.map_or("", |w| w.canonical_name.as_str())),
            source_canonical_revision: or_unknown(src.map_or("", |w| w.canonical_revision.as_str())),
            source_app: or_unknown(src.map_or("", |w| w.canonical_name.as_str())),
            source_version: or_unknown(src.map_or("", |w| w.canonical_revision.as_str())),
            source_cluster: or_unknown(src.map_or("", |w| w.cluster_id.as_str())),
            destination_workload: or_unknown(dst.map_or("", |w| w.workload_name.as_str())),
            destination_workload_namespace: or_unknown(dst.map_or("", |w| w.namespace.as_str())),
            destination_principal: dst.map_or_else(|| "unknown".to_owned(), |w| w.identity.to_string()),
            destination_canonical_service: or_unknown(dst.map_or("", |w| w.canonical_name.as_str())),
            destination_canonical_revision: or_unknown(dst.map_or("", |w| w.canonical_revision.as_str())),
            destination_app: or_unknown(dst.map_or("", |w| w.canonical_name.as_str())),
            destination_version: or_unknown(dst.map_or("", |w| w.canonical_revision.as_str())),
            destination_cluster: or_unknown(dst.map_or("", |w| w.cluster_id.as_str())),
            destination_service: or_unknown(service.map_or("", |s| s.hostname.as_str())),
            destination_service_namespace: or_unknown(service.map_or("", |s| s.namespace.as_str())),
            destination_service_name: or_unknown(service.map_or("", |s| s.name.as_str())),
        }
    }

    /// The labels as name/value pairs, in the order they are exported.
    fn pairs(&self) -> Vec<(String, String)> {
        [
            ("source_workload", &self.source_workload),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_canonical_service", &self.source_canonical_service),
            ("source_canonical_revision", &self.source_canonical_revision),
            ("source_app", &self.source_app),
            ("source_version", &self.source_version),
            ("source_cluster", &self.source_cluster),
            ("destination_workload", &self.destination_workload),
            ("destination_workload_namespace", &self.destination_workload_namespace),
            ("destination_principal", &self.destination_principal),
            ("destination_canonical_service", &self.destination_canonical_service),
            ("destination_canonical_revision", &self.destination_canonical_revision),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_cluster", &self.destination_cluster),
            ("destination_service", &self.destination_service),
            ("destination_service_namespace", &self.destination_service_namespace),
            ("destination_service_name", &self.destination_service_name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect()
    }
}

impl RequestLabels {
    /// The labels as name/value pairs, in the order they are exported.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let mut pairs = vec![
            p("reporter", self.reporter),
            p("request_protocol", self.request_protocol),
            (String::from("response_code"), self.response_code.to_string()),
            p("grpc_response_status", &self.grpc_response_status),
            p("response_flags", self.response_flags),
            p("connection_security_policy", self.connection_security_policy),
        ];
        pairs.extend(self.peers.pairs());
        pairs
    }

    pub fn new(
        src: Option<&Workload>,
        src_principal: &str,
        dst: Option<&Workload>,
        service: Option<&Service>,
        protocol: &'static str,
    ) -> Self {
        RequestLabels {
            reporter: "waypoint",
            peers: Peers::new((src, src_principal), dst, service),
            request_protocol: protocol,
            response_code: 0,
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }

    /// As an ingress gateway labels what it sends into the mesh: it reports as the source,
    /// with its own identity and its Gateway's name.
    pub fn from_gateway(
        (identity, gateway): (&Identity, &(String, String)),
        dst: Option<&Workload>,
        service: &Service,
        protocol: &'static str,
    ) -> Self {
        let mut l = RequestLabels::new(None, &identity.to_string(), dst, Some(service), protocol);
        l.reporter = "source";
        l.peers.source_workload = gateway.1.clone();
        l.peers.source_workload_namespace = gateway.0.clone();
        // Istio: a source reporter cannot tell the security policy in force.
        l.connection_security_policy = "unknown";
        l
    }
}

/// What kind of connection an idle timeout closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleConnection {
    /// A TCPRoute, TLS passthrough, or TCP through a waypoint.
    Tcp,
    /// An upgraded WebSocket.
    WebSocket,
    /// An ingress client's HTTP connection.
    Http,
    /// A stream on which nothing moved either way for the stream idle timeout: a request
    /// body that stopped arriving, or a backend's answer body.
    Stream,
}

impl IdleConnection {
    fn as_str(self) -> &'static str {
        match self {
            IdleConnection::Tcp => "tcp",
            IdleConnection::WebSocket => "websocket",
            IdleConnection::Http => "http",
            IdleConnection::Stream => "stream",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdleLabels {
    connection: &'static str,
}

/// Why a request mirror was dropped (`waypoint_mirror_dropped_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorDrop {
    /// The process already had its maximum of mirrors in flight.
    Overflow,
    /// The mirror's cluster refused it (a connection-pool limit was full).
    CircuitOpen,
    /// The mirror's answer did not end within its timeout.
    Timeout,
}

impl MirrorDrop {
    fn as_str(self) -> &'static str {
        match self {
            MirrorDrop::Overflow => "overflow",
            MirrorDrop::CircuitOpen => "circuit_open",
            MirrorDrop::Timeout => "timeout",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorDropLabels {
    reason: &'static str,
}

/// Request mirrors dropped, by reason; cloned into each mirror's task.
#[derive(Clone, Debug, Default)]
pub struct MirrorDrops(Family<MirrorDropLabels, Counter>);

impl MirrorDrops {
    pub fn count(&self, reason: MirrorDrop) {
        self.0
            .get_or_create(&MirrorDropLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The mirrors dropped for `reason` so far.
    pub fn get(&self, reason: MirrorDrop) -> u64 {
        self.0
            .get_or_create(&MirrorDropLabels {
                reason: reason.as_str(),
            })
            .get()
    }
}

/// One TCP connection's series, resolved when it opens.
pub struct TcpSeries {
    pub bytes: Meter,
    pub closed: Counter,
}

/// Labels of the `istio_tcp_*` series a waypoint or gateway reports: the request labels
/// without `response_code` and `grpc_response_status`, as Envoy's stats filter labels TCP.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    #[prometheus(flatten)]
    pub peers: Peers,
}

impl From<RequestLabels> for TcpLabels {
    fn from(l: RequestLabels) -> Self {
        TcpLabels {
            reporter: l.reporter,
            peers: l.peers,
            request_protocol: "tcp",
            response_flags: l.response_flags,
            connection_security_policy: l.connection_security_policy,
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<SeriesLabels, Counter>,
    pub duration: Family<SeriesLabels, Histogram>,
    pub request_bytes: Family<SeriesLabels, Histogram>,
    pub response_bytes: Family<SeriesLabels, Histogram>,
    /// Resources or requests refused as malformed, by reason.
    pub rejected: Family<Vec<(String, String)>, Counter>,
    /// Requests an AUDIT policy matched, by policy.
    pub audited: Family<Vec<(String, String)>, Counter>,
    /// Requests evaluated under dry-run policies, by what those alone would decide.
    pub dry_run: Family<Vec<(String, String)>, Counter>,
    /// Requests from sources past a rate limit's per-source bound, sharing its overflow bucket.
    pub rate_limit_overflow: Counter,
    /// Label sets a Telemetry's tag overrides created; bounded, since UPSERT values may come
    /// from what clients send (`request.headers[...]`).
    custom_series: Arc<Mutex<std::collections::HashSet<u64>>>,
    /// Requests recorded with the standard labels because the overridden series were at the bound.
    pub custom_series_overflow: Counter,
    /// Request mirrors dropped, by reason.
    pub mirror_drops: MirrorDrops,
    /// Connections closed for idleness, by kind.
    idle_timeouts: Family<IdleLabels, Counter>,
    /// Its `stream` series, resolved once: every request with a body or answer carries it.
    pub stream_idle_timeouts: Counter,
    /// Istio's `istio_tcp_*` series of the TCP connections proxied.
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    /// Standard label sets, built once per source, endpoint and response.
    pub labels: Arc<LabelCache>,
}

/// Distinct overridden label sets kept; beyond it requests keep the standard labels.
pub const MAX_CUSTOM_SERIES: usize = 10_000;
/// Longest value an UPSERTed tag keeps (longer ones are cut).
pub const MAX_TAG_VALUE: usize = 128;

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let ms = || {
            Histogram::new(
                [
                    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                ]
                .into_iter(),
            )
        };
        let bytes = || Histogram::new(exponential_buckets(1.0, 10.0, 9));
        let idle_timeouts = Family::<IdleLabels, Counter>::default();
        let stream = IdleLabels {
            connection: IdleConnection::Stream.as_str(),
        };
        let stream_idle_timeouts = idle_timeouts.get_or_create(&stream).clone();
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(ms),
            request_bytes: Family::new_with_constructor(bytes),
            response_bytes: Family::new_with_constructor(bytes),
            rejected: Family::default(),
            audited: Family::default(),
            dry_run: Family::default(),
            rate_limit_overflow: Counter::default(),
            custom_series: Default::default(),
            custom_series_overflow: Counter::default(),
            mirror_drops: MirrorDrops::default(),
            idle_timeouts,
            stream_idle_timeouts,
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            labels: Default::default(),
        };
        registry.register("istio_requests", "Requests handled by the waypoint", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes in bytes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes in bytes",
            m.response_bytes.clone(),
        );
        registry.register(
            "waypoint_authz_audit",
            "Requests an AUDIT authorization policy matched, by policy (never enforced)",
            m.audited.clone(),
        );
        registry.register(
            "waypoint_authz_dry_run",
            "Requests evaluated under dry-run authorization policies, by the decision those alone would make (never enforced)",
            m.dry_run.clone(),
        );
        registry.register(
            "waypoint_rate_limit_overflow",
            "Requests counted in a rate limit's shared overflow bucket because the policy already tracks its maximum of sources",
            m.rate_limit_overflow.clone(),
        );
        registry.register(
            "waypoint_telemetry_series_overflow",
            "Requests recorded with the standard labels because Telemetry tag overrides already made the maximum of series",
            m.custom_series_overflow.clone(),
        );
        registry.register(
            "waypoint_mirror_dropped",
            "Request mirrors not sent or not finished, by reason: overflow (the process's bound on mirrors in flight), circuit_open (the mirror's cluster refused it), timeout",
            m.mirror_drops.0.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent back to the client (the response direction)",
            m.tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (the request direction)",
            m.tcp_received.clone(),
        );
        registry.register(
            "waypoint_idle_timeouts",
            "Connections closed for idleness: tcp and websocket when no byte moved either way for the backend's connectionPool.tcp.idleTimeout, http (ingress clients) when nothing moved and no request was answered for the header read timeout; stream: requests failed because their body sent nothing for the stream idle timeout",
            m.idle_timeouts.clone(),
        );
        registry.register(
            "waypoint_rejected_requests",
            "Requests refused before routing (malformed or unroutable), by reason",
            m.rejected.clone(),
        );
        m
    }

    /// The label set to record: an overridden set while fewer than [`MAX_CUSTOM_SERIES`]
    /// exist (or it is one of them), else `standard` (counted): clients cannot grow the
    /// metrics without bound through a tag that reads their headers.
    pub fn admit(&self, labels: SeriesLabels, standard: impl FnOnce() -> Arc<StandardLabels>) -> SeriesLabels {
        let SeriesLabels::Custom(pairs) = &labels else {
            return labels;
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        pairs.hash(&mut h);
        let key = h.finish();
        let mut seen = self.custom_series.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&key) || seen.len() < MAX_CUSTOM_SERIES {
            seen.insert(key);
            return labels;
        }
        self.custom_series_overflow.inc();
        SeriesLabels::Standard(standard())
    }

    /// Counts what AUDIT and dry-run policies saw of one request.
    pub fn observed(&self, o: &crate::policy::authz::Observed) {
        for (policy, _) in &o.audits {
            self.audited
                .get_or_create(&vec![("policy".to_owned(), policy.clone())])
                .inc();
        }
        if let Some(d) = &o.dry_run {
            let decision = match d {
                crate::policy::authz::Decision::Allow => "allow",
                crate::policy::authz::Decision::Deny(_) => "deny",
            };
            self.dry_run
                .get_or_create(&vec![("decision".to_owned(), decision.to_owned())])
                .inc();
        }
    }

    /// Counts a TCP connection opened with `labels`, and hands out its other series: its
    /// bytes are added as they move, `closed` when it ends.
    pub fn tcp_opened(&self, labels: &TcpLabels) -> TcpSeries {
        self.tcp_opened.get_or_create(labels).inc();
        TcpSeries {
            bytes: Meter {
                to_destination: self.tcp_received.get_or_create(labels).clone(),
                to_client: self.tcp_sent.get_or_create(labels).clone(),
            },
            closed: self.tcp_closed.get_or_create(labels).clone(),
        }
    }

    /// Counts a connection closed for idleness.
    pub fn idle_timeout(&self, connection: IdleConnection) {
        let labels = IdleLabels {
            connection: connection.as_str(),
        };
        self.idle_timeouts.get_or_create(&labels).inc();
    }

    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: format!("{name}.shop.svc.cluster.local"),
            vips: vec![],
            ports: vec![],
            subject_alt_names: vec![],
            waypoint: None,
            only_healthy: true,
        })
    }

    fn build(svc: &Service, code: u16) -> RequestLabels {
        let mut l = RequestLabels::new(None, "gw", None, Some(svc), "http");
        l.response_code = code;
        l
    }

    #[test]
    fn cached_labels_are_shared_per_endpoint_and_response() {
        let cache = LabelCache::default();
        let a = service("a");
        let first = cache.get(LabelSource::default(), (None, &a), (200, "-"), || build(&a, 200));
        let again = cache.get(LabelSource::default(), (None, &a), (200, "-"), || panic!("built twice"));
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.labels(), &build(&a, 200));
        // Another response code, or the service as a state update replaced it: a set of its own.
        let other = cache.get(LabelSource::default(), (None, &a), (503, "UF"), || build(&a, 503));
        assert_eq!(other.labels().response_code, 503);
        let replaced = service("a");
        let mut built = false;
        cache.get(LabelSource::default(), (None, &replaced), (200, "-"), || {
            built = true;
            build(&replaced, 200)
        });
        assert!(built);
        // Equal sets are one series whether shared or not.
        assert_eq!(first, StandardLabels::new(build(&a, 200)));
    }

    #[test]
    fn a_waypoints_sets_are_shared_per_source_workload_and_peer() {
        let cache = LabelCache::default();
        let a = service("a");
        let (alice, bob): (Identity, Identity) = (
            "spiffe://cluster.local/ns/shop/sa/alice".parse().unwrap(),
            "spiffe://cluster.local/ns/shop/sa/bob".parse().unwrap(),
        );
        let client = crate::upstream::cluster::tests::workload("client");
        let from = |workload, peer| LabelSource { workload, peer };
        let build_for = |peer: &Identity| {
            let mut l = RequestLabels::new(None, &peer.to_string(), None, Some(&a), "http");
            l.response_code = 200;
            l
        };
        let first = cache.get(from(Some(&client), Some(&alice)), (None, &a), (200, "-"), || {
            build_for(&alice)
        });
        let again = cache.get(from(Some(&client), Some(&alice)), (None, &a), (200, "-"), || {
            panic!("built twice")
        });
        assert!(Arc::ptr_eq(&first, &again));
        // Another peer on the same client workload, or the workload replaced by a state
        // update: sets of their own, never another source's.
        let other = cache.get(from(Some(&client), Some(&bob)), (None, &a), (200, "-"), || {
            build_for(&bob)
        });
        assert_eq!(other.labels().peers.source_principal, bob.to_string());
        let replaced = crate::upstream::cluster::tests::workload("client");
        let mut built = false;
        cache.get(from(Some(&replaced), Some(&alice)), (None, &a), (200, "-"), || {
            built = true;
            build_for(&alice)
        });
        assert!(built, "a replaced source workload must not reuse the old entry");
        assert_eq!(cache.cached(), 3);
    }

    #[test]
    fn the_label_cache_is_bounded() {
        let cache = LabelCache::default();
        let services: Vec<_> = (0..MAX_CACHED_LABELS + 10).map(|i| service(&format!("s{i}"))).collect();
        for s in &services {
            cache.get(LabelSource::default(), (None, s), (200, "-"), || build(s, 200));
        }
        assert!(cache.cached() <= MAX_CACHED_LABELS, "{}", cache.cached());
    }
}
