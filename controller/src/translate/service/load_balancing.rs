//! A Kubernetes Service's `load_balancing` as Istio's control plane sends it to ztunnel:
//! `internalTrafficPolicy: Local` is node-only (NODE, STRICT); otherwise the traffic
//! distribution, from `spec.trafficDistribution` (PreferClose or PreferSameZone: NETWORK,
//! REGION, ZONE; PreferSameNode: those then SUBZONE and NODE; both FAILOVER) or, when the
//! field has no value Istio knows, Istio's `networking.istio.io/traffic-distribution`
//! annotation on the Service, else on its namespace (same values, any case).
//! `publishNotReadyAddresses` adds the ALLOW_ALL health policy.

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_proto::workload as pb;
use pb::load_balancing::{HealthPolicy, Mode, Scope};

use crate::model::Service;

/// Istio's annotation for a traffic distribution (older than the Service field).
pub(crate) const TRAFFIC_DISTRIBUTION_ANNOTATION: &str = "networking.istio.io/traffic-distribution";

/// The distributions Istio distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Distribution {
    Any,
    SameZone,
    SameNode,
}

fn parse(v: &str) -> Option<Distribution> {
    match v.trim().to_ascii_lowercase().as_str() {
        "preferclose" | "prefersamezone" => Some(Distribution::SameZone),
        "prefersamenode" => Some(Distribution::SameNode),
        _ => None,
    }
}

fn annotation(meta: &ObjectMeta) -> Option<&str> {
    let v = meta.annotations.as_ref()?.get(TRAFFIC_DISTRIBUTION_ANNOTATION)?;
    (!v.trim().is_empty()).then_some(v.as_str())
}

/// The field when Istio knows its value; else the Service's annotation (an unknown value means
/// "any"); else the namespace's.
fn distribution(svc: &Service, ns: Option<&Namespace>) -> Distribution {
    let spec = svc.spec.as_ref().and_then(|s| s.traffic_distribution.as_deref());
    if let Some(d) = spec.and_then(parse) {
        return d;
    }
    annotation(&svc.metadata)
        .or_else(|| ns.and_then(|n| annotation(&n.metadata)))
        .map_or(Distribution::Any, |v| parse(v).unwrap_or(Distribution::Any))
}

fn failover(scopes: &[Scope]) -> pb::LoadBalancing {
    pb::LoadBalancing {
        routing_preference: scopes.iter().map(|s| *s as i32).collect(),
        mode: Mode::Failover as i32,
        ..Default::default()
    }
}

/// The Service's `load_balancing`, `None` when nothing asks for one.
pub(crate) fn for_service(svc: &Service, ns: Option<&Namespace>) -> Option<pb::LoadBalancing> {
    let spec = svc.spec.as_ref()?;
    let mut lb = if spec.internal_traffic_policy.as_deref() == Some("Local") {
        Some(pb::LoadBalancing {
            routing_preference: vec![Scope::Node as i32],
            mode: Mode::Strict as i32,
            ..Default::default()
        })
    } else {
        match distribution(svc, ns) {
            Distribution::Any => None,
            Distribution::SameZone => Some(failover(&[Scope::Network, Scope::Region, Scope::Zone])),
            Distribution::SameNode => Some(failover(&[
                Scope::Network,
                Scope::Region,
                Scope::Zone,
                Scope::Subzone,
                Scope::Node,
            ])),
        }
    };
    if spec.publish_not_ready_addresses == Some(true) {
        lb.get_or_insert_with(Default::default).health_policy = HealthPolicy::AllowAll as i32;
    }
    lb
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;

    fn svc(spec: ServiceSpec, ann: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                annotations: ann.map(|v| [(TRAFFIC_DISTRIBUTION_ANNOTATION.to_owned(), v.to_owned())].into()),
                ..Default::default()
            },
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn ns(ann: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                annotations: Some([(TRAFFIC_DISTRIBUTION_ANNOTATION.to_owned(), ann.to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// (spec.trafficDistribution, internalTrafficPolicy, publishNotReadyAddresses, Service
    /// annotation, namespace annotation) -> (scopes, mode, health policy), as Istio sends them.
    #[test]
    fn istio_translation_table() {
        use Scope::*;
        let zone = vec![Network, Region, Zone];
        let node = vec![Network, Region, Zone, Subzone, Node];
        type Row<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            bool,
            Option<&'a str>,
            Option<&'a str>,
            Option<(Vec<Scope>, Mode, HealthPolicy)>,
        );
        let rows: Vec<Row> = vec![
            (None, None, false, None, None, None),
            (
                Some("PreferClose"),
                None,
                false,
                None,
                None,
                Some((zone.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            (
                Some("PreferSameZone"),
                None,
                false,
                None,
                None,
                Some((zone.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            (
                Some("PreferSameNode"),
                None,
                false,
                None,
                None,
                Some((node.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            // The annotation, any case; the field wins when Istio knows its value.
            (
                None,
                None,
                false,
                Some("preferclose"),
                None,
                Some((zone.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            (
                None,
                None,
                false,
                Some("PreferSameNode"),
                None,
                Some((node.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            (
                Some("PreferClose"),
                None,
                false,
                Some("PreferSameNode"),
                None,
                Some((zone.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            (
                Some("Unknown"),
                None,
                false,
                Some("PreferSameNode"),
                None,
                Some((node.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            (None, None, false, Some("Nearby"), None, None),
            // The namespace's annotation when the Service has none.
            (
                None,
                None,
                false,
                None,
                Some("PreferClose"),
                Some((zone.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            (
                None,
                None,
                false,
                Some("PreferSameNode"),
                Some("PreferClose"),
                Some((node.clone(), Mode::Failover, HealthPolicy::OnlyHealthy)),
            ),
            // internalTrafficPolicy: Local wins: this node only.
            (
                Some("PreferClose"),
                Some("Local"),
                false,
                None,
                None,
                Some((vec![Node], Mode::Strict, HealthPolicy::OnlyHealthy)),
            ),
            (None, Some("Cluster"), false, None, None, None),
            // publishNotReadyAddresses adds ALLOW_ALL, with or without a preference.
            (
                None,
                None,
                true,
                None,
                None,
                Some((vec![], Mode::UnspecifiedMode, HealthPolicy::AllowAll)),
            ),
            (
                Some("PreferClose"),
                None,
                true,
                None,
                None,
                Some((zone.clone(), Mode::Failover, HealthPolicy::AllowAll)),
            ),
        ];
        for (i, (td, itp, pnr, ann, ns_ann, want)) in rows.into_iter().enumerate() {
            let spec = ServiceSpec {
                traffic_distribution: td.map(str::to_owned),
                internal_traffic_policy: itp.map(str::to_owned),
                publish_not_ready_addresses: pnr.then_some(true),
                ..Default::default()
            };
            let namespace = ns_ann.map(ns);
            let got = for_service(&svc(spec, ann), namespace.as_ref()).map(|lb| {
                (
                    lb.routing_preference
                        .iter()
                        .map(|s| Scope::try_from(*s).expect("scope"))
                        .collect(),
                    Mode::try_from(lb.mode).expect("mode"),
                    HealthPolicy::try_from(lb.health_policy).expect("health"),
                )
            });
            assert_eq!(got, want, "row {i}");
        }
    }
}
