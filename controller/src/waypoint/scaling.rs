//! How a waypoint runs in production, read from its Gateway: replicas or an autoscaler, the
//! container's resources, a PodDisruptionBudget and topology spread, plus the labels and
//! annotations of `spec.infrastructure` (Gateway API) for the generated objects.
//!
//! Settings are annotations (`spec.infrastructure.annotations` over the Gateway's own, so the
//! Gateway API field wins), one per fact:
//! - `waypoint.ambient-mesh.io/replicas` — fixed replicas (unset: not managed, so
//!   `kubectl scale` and other tools keep the count they set);
//! - `waypoint.ambient-mesh.io/max-replicas` (+ `min-replicas`, default 1;
//!   `target-cpu-utilization`, default 80) — a HorizontalPodAutoscaler owns the replica count;
//! - `waypoint.ambient-mesh.io/cpu-request`, `memory-request`, `cpu-limit`, `memory-limit`;
//! - `waypoint.ambient-mesh.io/min-available` — the PodDisruptionBudget (default 1 whenever
//!   more than one replica may run, so a node drain never takes every replica at once);
//! - `waypoint.ambient-mesh.io/topology-spread` — `hostname` (default with more than one
//!   replica), `zone` or `none`.
//!
//! A value that cannot be read is reported on the Gateway and its default used: a typo must
//! not take a waypoint down.

use std::collections::BTreeMap;

/// The annotation prefix of the settings.
pub const PREFIX: &str = "waypoint.ambient-mesh.io/";

/// Container resources, as Kubernetes quantities.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

/// Scaling by a HorizontalPodAutoscaler on CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Autoscale {
    pub min: i32,
    pub max: i32,
    pub target_cpu: i32,
}

/// Which topology key replicas spread over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Spread {
    None,
    Hostname,
    Zone,
}

impl Spread {
    pub fn topology_key(self) -> Option<&'static str> {
        match self {
            Spread::None => None,
            Spread::Hostname => Some("kubernetes.io/hostname"),
            Spread::Zone => Some("topology.kubernetes.io/zone"),
        }
    }
}

/// Everything about how the waypoint's pods run.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scaling {
    /// Fixed replicas; `None` when not set or when an autoscaler owns the count.
    pub replicas: Option<i32>,
    pub autoscale: Option<Autoscale>,
    pub resources: Resources,
    /// `minAvailable` of the PodDisruptionBudget; `None`: no budget.
    pub min_available: Option<i32>,
    pub spread: Spread,
    /// `spec.infrastructure.labels` and `.annotations`, put on the generated objects.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Scaling {
    pub fn is_default(&self) -> bool {
        *self == Scaling::default()
    }
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            replicas: None,
            autoscale: None,
            resources: Resources::default(),
            min_available: None,
            spread: Spread::None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// A Kubernetes quantity: digits with an optional fraction and a known suffix.
fn quantity(v: &str) -> bool {
    let number_end = v.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(v.len());
    let (number, suffix) = v.split_at(number_end);
    let suffixes = ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"];
    !number.is_empty() && number.parse::<f64>().is_ok_and(|n| n > 0.0) && suffixes.contains(&suffix)
}

/// Reads the settings; `problems` gets one line per value that could not be used.
pub fn read(
    annotations: &BTreeMap<String, String>,
    infrastructure: Option<&crate::model::gateway::Infrastructure>,
    problems: &mut Vec<String>,
) -> Scaling {
    let mut all = annotations.clone();
    let mut out = Scaling::default();
    if let Some(infra) = infrastructure {
        all.extend(infra.annotations.clone());
        out.labels = infra.labels.clone();
        out.annotations = infra.annotations.clone();
    }
    let s = Settings(&all);
    (out.replicas, out.autoscale) = s.counts(problems);
    out.resources = Resources {
        cpu_request: s.quantity("cpu-request", problems),
        memory_request: s.quantity("memory-request", problems),
        cpu_limit: s.quantity("cpu-limit", problems),
        memory_limit: s.quantity("memory-limit", problems),
    };
    let most = out.autoscale.map_or(out.replicas.unwrap_or(1), |a| a.max);
    let fewest = out.autoscale.map_or(out.replicas.unwrap_or(1), |a| a.min);
    out.min_available = s.budget(most > 1, fewest, problems);
    out.spread = s.spread(most > 1, problems);
    out
}

/// The annotations, read by setting name.
struct Settings<'a>(&'a BTreeMap<String, String>);

impl Settings<'_> {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(&format!("{PREFIX}{k}")).map(String::as_str)
    }

    fn int(&self, k: &str, min: i32, max: i32, problems: &mut Vec<String>) -> Option<i32> {
        let v = self.get(k)?;
        match v.trim().parse::<i32>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                problems.push(format!(
                    "{PREFIX}{k} {v:?} is not a whole number from {min} to {max}; ignored"
                ));
                None
            }
        }
    }

    fn quantity(&self, k: &str, problems: &mut Vec<String>) -> Option<String> {
        let v = self.get(k)?;
        if quantity(v.trim()) {
            Some(v.trim().to_owned())
        } else {
            problems.push(format!(
                "{PREFIX}{k} {v:?} is not a quantity such as 100m, 0.5 or 256Mi; ignored"
            ));
            None
        }
    }

    /// Fixed replicas, or an autoscaler that owns the count.
    fn counts(&self, problems: &mut Vec<String>) -> (Option<i32>, Option<Autoscale>) {
        let replicas = self.int("replicas", 1, 1000, problems);
        let max = self.int("max-replicas", 1, 1000, problems);
        let min = self.int("min-replicas", 1, 1000, problems).unwrap_or(1);
        let target_cpu = self.int("target-cpu-utilization", 1, 100, problems).unwrap_or(80);
        let Some(max) = max else {
            return (replicas, None);
        };
        if min > max {
            problems.push(format!(
                "{PREFIX}min-replicas {min} is above max-replicas {max}; autoscaling ignored"
            ));
            return (replicas, None);
        }
        if replicas.is_some() {
            problems.push(format!(
                "{PREFIX}replicas is ignored: the autoscaler owns the replica count"
            ));
        }
        (None, Some(Autoscale { min, max, target_cpu }))
    }

    /// `minAvailable`: 1 by default when several replicas may run; never all of them.
    fn budget(&self, several: bool, fewest: i32, problems: &mut Vec<String>) -> Option<i32> {
        match self.int("min-available", 0, 1000, problems) {
            Some(0) => None,
            Some(n) if n >= fewest && fewest > 0 && several => {
                problems.push(format!(
                    "{PREFIX}min-available {n} would block every eviction with {fewest} replica(s); using {}",
                    fewest - 1
                ));
                (fewest > 1).then_some(fewest - 1)
            }
            Some(n) => Some(n),
            None => (several && fewest > 1).then_some(1),
        }
    }

    fn spread(&self, several: bool, problems: &mut Vec<String>) -> Spread {
        match self.get("topology-spread") {
            None if several => Spread::Hostname,
            None => Spread::None,
            Some("hostname") => Spread::Hostname,
            Some("zone") => Spread::Zone,
            Some("none") => Spread::None,
            Some(other) => {
                problems.push(format!(
                    "{PREFIX}topology-spread {other:?} is not hostname, zone or none; using hostname"
                ));
                Spread::Hostname
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gateway::Infrastructure;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_fixed_replicas_and_autoscaling() {
        let mut p = Vec::new();
        assert_eq!(read(&BTreeMap::new(), None, &mut p), Scaling::default());

        let s = read(
            &annotations(&[("replicas", "3"), ("cpu-request", "100m"), ("memory-limit", "256Mi")]),
            None,
            &mut p,
        );
        assert_eq!(s.replicas, Some(3));
        assert_eq!(s.min_available, Some(1), "several replicas: a budget keeps one");
        assert_eq!(s.spread, Spread::Hostname);
        assert_eq!(s.resources.cpu_request.as_deref(), Some("100m"));
        assert_eq!(s.resources.memory_limit.as_deref(), Some("256Mi"));

        let s = read(
            &annotations(&[
                ("min-replicas", "2"),
                ("max-replicas", "10"),
                ("target-cpu-utilization", "60"),
            ]),
            None,
            &mut p,
        );
        assert_eq!(s.replicas, None);
        assert_eq!(
            s.autoscale,
            Some(Autoscale {
                min: 2,
                max: 10,
                target_cpu: 60
            })
        );
        assert_eq!(s.min_available, Some(1));
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn infrastructure_wins_and_bad_values_are_reported() {
        let infra = Infrastructure {
            labels: [("team".to_owned(), "payments".to_owned())].into(),
            annotations: annotations(&[("replicas", "2"), ("topology-spread", "zone")]),
        };
        let mut p = Vec::new();
        let s = read(&annotations(&[("replicas", "5")]), Some(&infra), &mut p);
        assert_eq!((s.replicas, s.spread), (Some(2), Spread::Zone));
        assert_eq!(s.labels["team"], "payments");

        let bad = annotations(&[
            ("replicas", "two"),
            ("cpu-request", "lots"),
            ("min-replicas", "5"),
            ("max-replicas", "2"),
            ("topology-spread", "rack"),
        ]);
        let s = read(&bad, None, &mut p);
        assert_eq!(s.replicas, None);
        assert_eq!(s.autoscale, None);
        assert_eq!(s.resources, Resources::default());
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].contains("replicas \"two\""), "{p:?}");

        // A budget that would block every eviction is lowered.
        let mut p = Vec::new();
        let s = read(&annotations(&[("replicas", "2"), ("min-available", "2")]), None, &mut p);
        assert_eq!(s.min_available, Some(1));
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "0.5", "1", "256Mi", "1Gi", "2G"] {
            assert!(quantity(ok), "{ok}");
        }
        for bad in ["", "m", "-1", "1.5.2", "10Xi", "0"] {
            assert!(!quantity(bad), "{bad}");
        }
    }
}
