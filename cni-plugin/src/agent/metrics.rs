//! The node agent's metrics (served with readiness on `--stats-addr`): pods enrolled now,
//! enrolment outcomes, releases, ADD handling time, connected ztunnels, pods not adopted
//! because their IP was found in more than one network namespace.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `captured`, `skipped` (not ambient), `undecided` (pod or namespace never listed in
    /// time: refused) or `failed`.
    pub result: &'static str,
}

#[derive(Clone)]
pub struct AgentMetrics {
    pub enrolled: Gauge,
    pub enrolments: Family<Outcome, Counter>,
    pub releases: Counter,
    pub add_seconds: Histogram,
    pub ztunnels: Gauge,
    /// Scans that found a pod's IP in more than one network namespace, not one of them alone
    /// holding a process in the pod's cgroup, and adopted none.
    pub ambiguous: Counter,
    /// Known pods whose enrolment or release failed (or waits for a ztunnel), or whose
    /// snapshot Add ztunnel rejected, at the last reconciliation: retried when a ztunnel
    /// connects, or after a back-off.
    pub pending: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            enrolled: Gauge::default(),
            enrolments: Family::default(),
            releases: Counter::default(),
            add_seconds: Histogram::new([0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0].into_iter()),
            ztunnels: Gauge::default(),
            ambiguous: Counter::default(),
            pending: Gauge::default(),
        }
    }
}

impl AgentMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("pods_enrolled", "Pods captured on this node now", self.enrolled.clone());
        registry.register("enrolments", "CNI ADD outcomes", self.enrolments.clone());
        registry.register(
            "releases",
            "Pods released (namespace unlabelled or pod deleted)",
            self.releases.clone(),
        );
        registry.register_with_unit(
            "add_duration",
            "Time to handle a CNI ADD (rules, probe SNAT, hand-off to ztunnel)",
            prometheus_client::registry::Unit::Seconds,
            self.add_seconds.clone(),
        );
        registry.register(
            "ztunnels_connected",
            "ztunnels connected over ZDS",
            self.ztunnels.clone(),
        );
        registry.register(
            "adoptions_ambiguous",
            "Pods that never came through CNI left unadopted, their IP being held by more than one network namespace and the pod's cgroup not in exactly one of them (counted per scan)",
            self.ambiguous.clone(),
        );
        registry.register(
            "reconciliations_pending",
            "Pods whose capture or release failed or waits at the last reconciliation (no ztunnel, rules not removable, hand-off rejected, also in a snapshot); retried when a ztunnel connects or after a back-off of 5 s doubling to 5 min",
            self.pending.clone(),
        );
    }

    pub fn outcome(&self, result: &'static str) {
        self.enrolments.get_or_create(&Outcome { result }).inc();
    }
}
