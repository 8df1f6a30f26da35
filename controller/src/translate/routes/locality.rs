//! DestinationRule `trafficPolicy.loadBalancer.localityLbSetting` for the waypoint, as Istio
//! applies it to its proxies: failover only when the rule also has `outlierDetection` (Envoy
//! fails over on ejection; Istio ignores the setting without it), `enabled: false` turns it
//! off, `failoverPriority` of topology labels (network, region, zone, subzone, node name,
//! cluster) becomes the scopes the waypoint ranks endpoints by, and without it the locality
//! itself (region, zone, subzone). Not implemented, and reported: `distribute` weights, the
//! `failover` from/to region order, and `failoverPriority` on other labels or `label=value`
//! (the whole setting is then ignored rather than half applied). Istio's ztunnel ignores
//! DestinationRules, so this reaches only the waypoint.

use mesh_proto::waypoint as wp;
use mesh_proto::workload::load_balancing::Scope;

use crate::model::istio::LocalityLbSetting;
use crate::model::{Kind, ObjectKey};
use crate::translate::Report;

/// The scope a well-known topology label stands for.
fn scope(label: &str) -> Option<Scope> {
    Some(match label {
        "topology.istio.io/network" => Scope::Network,
        "topology.kubernetes.io/region" => Scope::Region,
        "topology.kubernetes.io/zone" => Scope::Zone,
        "topology.istio.io/subzone" => Scope::Subzone,
        "kubernetes.io/hostname" => Scope::Node,
        "topology.istio.io/cluster" => Scope::Cluster,
        _ => return None,
    })
}

/// The waypoint's locality failover for a rule with `setting` (and `outlier` detection).
pub(super) fn failover(
    setting: Option<&LocalityLbSetting>,
    outlier: bool,
    key: &ObjectKey,
    report: &mut Report,
) -> Option<wp::LocalityFailover> {
    let s = setting.filter(|s| s.enabled != Some(false))?;
    let mut note = |m: &str| {
        report.add(
            Kind::DestinationRule,
            key,
            format!("loadBalancer.localityLbSetting: {m}"),
        )
    };
    if !s.distribute.is_empty() {
        note("distribute is not implemented at the waypoint; ignored");
    }
    if !outlier {
        note("failover needs outlierDetection (as in Istio); ignored");
        return None;
    }
    let scopes = if s.failover_priority.is_empty() {
        if !s.failover.is_empty() {
            note("failover from/to regions is not implemented; the same region, zone, subzone are preferred");
        }
        vec![Scope::Region, Scope::Zone, Scope::Subzone]
    } else {
        let mapped: Option<Vec<Scope>> = s.failover_priority.iter().map(|l| scope(l.trim())).collect();
        let Some(mapped) = mapped else {
            note("failoverPriority on labels other than the topology ones is not implemented; ignored");
            return None;
        };
        mapped
    };
    Some(wp::LocalityFailover {
        routing_preference: scopes.into_iter().map(|s| s as i32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(yaml: &str) -> LocalityLbSetting {
        serde_yaml::from_str(yaml).expect("setting")
    }

    /// (setting, outlier detection) -> scopes sent, and whether a problem is reported.
    #[test]
    fn istio_locality_lb_table() {
        use Scope::*;
        let rows: Vec<(&str, bool, Option<Vec<Scope>>, bool)> = vec![
            ("{}", true, Some(vec![Region, Zone, Subzone]), false),
            ("{enabled: true}", true, Some(vec![Region, Zone, Subzone]), false),
            ("{enabled: false, failoverPriority: [topology.kubernetes.io/zone]}", true, None, false),
            ("{}", false, None, true),
            (
                "{failoverPriority: [topology.istio.io/network, topology.kubernetes.io/region, topology.kubernetes.io/zone]}",
                true,
                Some(vec![Network, Region, Zone]),
                false,
            ),
            (
                "{failoverPriority: [kubernetes.io/hostname, topology.istio.io/cluster]}",
                true,
                Some(vec![Node, Cluster]),
                false,
            ),
            ("{failoverPriority: [version]}", true, None, true),
            ("{failoverPriority: [topology.kubernetes.io/zone=a]}", true, None, true),
            (
                "{failover: [{from: r1, to: r2}]}",
                true,
                Some(vec![Region, Zone, Subzone]),
                true,
            ),
            (
                "{distribute: [{from: r1/*, to: {r1/*: 80, r2/*: 20}}]}",
                true,
                Some(vec![Region, Zone, Subzone]),
                true,
            ),
        ];
        let key = ObjectKey::new("shop", "dr");
        for (i, (yaml, outlier, want, problem)) in rows.into_iter().enumerate() {
            let mut report = Report::default();
            let got = failover(Some(&setting(yaml)), outlier, &key, &mut report).map(|f| {
                f.routing_preference
                    .iter()
                    .map(|s| Scope::try_from(*s).expect("scope"))
                    .collect()
            });
            assert_eq!(got, want, "row {i}: {yaml}");
            assert_eq!(!report.0.is_empty(), problem, "row {i}");
        }
        assert!(failover(None, true, &key, &mut Report::default()).is_none());
    }
}
