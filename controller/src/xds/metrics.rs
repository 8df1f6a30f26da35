//! xDS server metrics: connected clients, pushes and pushed resources by type, NACKs, and
//! the latency from a change being seen to its push being queued for a client.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    type_url: String,
}

#[derive(Clone)]
pub struct XdsMetrics {
    connected: Gauge,
    pushes: Family<TypeLabel, Counter>,
    resources: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
    refused: Counter,
    limited: Family<ReasonLabel, Counter>,
    latency: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl Default for XdsMetrics {
    fn default() -> Self {
        XdsMetrics {
            connected: Gauge::default(),
            pushes: Family::default(),
            resources: Family::default(),
            nacks: Family::default(),
            refused: Counter::default(),
            limited: Family::default(),
            latency: Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0].into_iter()),
        }
    }
}

fn label(type_url: &str) -> TypeLabel {
    TypeLabel {
        type_url: type_url.rsplit('/').next().unwrap_or(type_url).to_owned(),
    }
}

impl XdsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = XdsMetrics::default();
        registry.register("xds_connected_clients", "Connected xDS streams", m.connected.clone());
        registry.register("xds_pushes", "Delta responses sent, by type", m.pushes.clone());
        registry.register(
            "xds_pushed_resources",
            "Resources sent or removed, by type",
            m.resources.clone(),
        );
        registry.register("xds_nacks", "Responses clients rejected, by type", m.nacks.clone());
        registry.register(
            "xds_refused_streams",
            "Streams refused for missing or bad credentials",
            m.refused.clone(),
        );
        registry.register(
            "xds_limited_streams",
            "Streams ended for exceeding a bound, by reason (too_many_names, slow_client)",
            m.limited.clone(),
        );
        registry.register_with_unit(
            "xds_push_latency",
            "From a change being read to its push being queued for a client",
            prometheus_client::registry::Unit::Seconds,
            m.latency.clone(),
        );
        m
    }

    pub(crate) fn connected(&self, delta: i64) {
        self.connected.inc_by(delta);
    }

    pub(crate) fn pushed(&self, type_url: &str, count: usize, since: Option<Instant>) {
        self.pushes.get_or_create(&label(type_url)).inc();
        self.resources.get_or_create(&label(type_url)).inc_by(count as u64);
        if let Some(t) = since {
            self.latency.observe(t.elapsed().as_secs_f64());
        }
    }

    pub(crate) fn nack(&self, type_url: &str) {
        self.nacks.get_or_create(&label(type_url)).inc();
    }

    pub(crate) fn refused(&self) {
        self.refused.inc();
    }

    pub(crate) fn limited(&self, reason: &'static str) {
        self.limited.get_or_create(&ReasonLabel { reason }).inc();
    }
}
