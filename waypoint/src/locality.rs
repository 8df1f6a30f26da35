//! Locality-aware endpoint choice at the waypoint: a service's endpoints are narrowed, before
//! the cluster balances among them, to those its `load_balancing` prefers for the waypoint's
//! own place (its network, region/zone/subzone, node and cluster), with mesh-core's ranking
//! ([`mesh_core::state::locality`]). So `trafficDistribution: PreferClose` keeps requests in
//! the waypoint's zone while it has a healthy endpoint and fails over outward when it has
//! none, as Istio's waypoint does for that setting; STRICT with nothing in scope leaves no
//! candidate (answered "no healthy upstream").
//!
//! The waypoint finds itself as the workload at its pod address (`POD_IP`, set by its
//! Deployment); without one (local runs) there is no preference.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use mesh_core::state::locality::{LoadPolicy, Mode, Scope};
use mesh_core::state::{Service, State, Workload};
use mesh_proto::waypoint as wp;

/// This pod's address, read once.
fn pod_ip() -> Option<IpAddr> {
    static POD_IP: OnceLock<Option<IpAddr>> = OnceLock::new();
    *POD_IP.get_or_init(|| std::env::var("POD_IP").ok()?.trim().parse().ok())
}

/// The waypoint's own workload, if the control plane knows it.
fn me(state: &State) -> Option<&Arc<Workload>> {
    state.workloads_at(pod_ip()?).next()
}

/// `endpoints` of `service` narrowed to those closest to this waypoint.
pub fn closest(state: &State, service: &Service, endpoints: Vec<Arc<Workload>>) -> Vec<Arc<Workload>> {
    closest_to(state, me(state).map(Arc::as_ref), service, endpoints)
}

/// As [`closest`] for a waypoint at `me` (none: every endpoint).
pub fn closest_to(
    state: &State,
    me: Option<&Workload>,
    service: &Service,
    endpoints: Vec<Arc<Workload>>,
) -> Vec<Arc<Workload>> {
    let Some(me) = me else { return endpoints };
    // STRICT and nothing in scope: no candidate rather than one out of scope.
    state.closest(service, me, endpoints).unwrap_or_default()
}

/// A backend's candidates: as [`crate::upstream::candidates`], except that a DestinationRule's
/// locality failover (`loadBalancer.locality`) replaces the service's preference, as Istio
/// lets `localityLbSetting` override the traffic distribution.
pub fn candidates(
    state: &State,
    service: &Service,
    subset: Option<&wp::Subset>,
    policy: &wp::TrafficPolicy,
) -> Vec<Arc<Workload>> {
    candidates_at(state, me(state).map(Arc::as_ref), service, subset, policy)
}

/// As [`candidates`] for a waypoint at `me`.
fn candidates_at(
    state: &State,
    me: Option<&Workload>,
    service: &Service,
    subset: Option<&wp::Subset>,
    policy: &wp::TrafficPolicy,
) -> Vec<Arc<Workload>> {
    let mut eps = state.endpoints(service);
    if let Some(s) = subset {
        eps.retain(|w| s.workloads.iter().any(|u| *u == w.uid));
    }
    let Some(me) = me else { return eps };
    match policy.load_balancer.as_ref().and_then(|l| l.locality.as_ref()) {
        Some(failover) => {
            let rule = LoadPolicy {
                routing_preference: failover.routing_preference.iter().copied().map(Scope::from).collect(),
                mode: Mode::Failover,
            };
            state.closest_by(Some(&rule), me, eps).unwrap_or_default()
        }
        None => state.closest(service, me, eps).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::workload as pb;
    use pb::load_balancing::{Mode, Scope};

    const KEY: &str = "shop/web.shop.svc.cluster.local";

    fn svc(mode: Mode, scopes: &[Scope]) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                load_balancing: Some(pb::LoadBalancing {
                    routing_preference: scopes.iter().map(|s| *s as i32).collect(),
                    mode: mode as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    fn wl(uid: &str, ip: u8, zone: &str, healthy: bool, endpoint: bool) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "shop".into(),
                addresses: vec![vec![10, 0, 0, ip]],
                locality: Some(pb::Locality {
                    region: "r".into(),
                    zone: zone.into(),
                    subzone: String::new(),
                }),
                status: if healthy { 0 } else { 1 },
                services: if endpoint {
                    [(KEY.to_owned(), pb::PortList::default())].into()
                } else {
                    Default::default()
                },
                ..Default::default()
            })),
        }
    }

    fn uids(v: Vec<Arc<Workload>>) -> Vec<String> {
        let mut u: Vec<String> = v.iter().map(|w| w.uid.clone()).collect();
        u.sort();
        u
    }

    /// The waypoint in zone a: a's endpoint while healthy, b's when not; no preference when
    /// it does not know itself or the service asks none; STRICT leaves no candidate.
    #[test]
    fn the_waypoint_prefers_its_own_zone() {
        let close = [Scope::Network, Scope::Region, Scope::Zone];
        let mut s = State::default();
        for a in [
            svc(Mode::Failover, &close),
            wl("waypoint", 1, "a", true, false),
            wl("near", 2, "a", true, true),
            wl("far", 3, "b", true, true),
        ] {
            s.apply_address(&a).expect("valid");
        }
        let run = |s: &State, me: Option<&str>| {
            let service = s.service(KEY).expect("service").clone();
            let me = me.and_then(|u| s.workload(u)).map(|w| w.as_ref().clone());
            uids(closest_to(s, me.as_ref(), &service, s.endpoints(&service)))
        };
        assert_eq!(run(&s, Some("waypoint")), ["near"]);
        assert_eq!(run(&s, None), ["far", "near"], "a waypoint that does not know itself");
        s.apply_address(&wl("near", 2, "a", false, true)).expect("valid");
        assert_eq!(run(&s, Some("waypoint")), ["far"], "fails over to the other zone");
        s.apply_address(&svc(Mode::Strict, &close)).expect("valid");
        assert!(run(&s, Some("waypoint")).is_empty(), "strict: nothing out of scope");
        s.apply_address(&svc(Mode::UnspecifiedMode, &close)).expect("valid");
        s.apply_address(&wl("near", 2, "a", true, true)).expect("valid");
        assert_eq!(run(&s, Some("waypoint")), ["far", "near"], "no preference asked");
    }

    /// A DestinationRule's locality failover replaces the service's preference: by zone when
    /// the service asks none, and by node over the service's zone preference.
    #[test]
    fn a_destination_rule_failover_replaces_the_services_preference() {
        let mut s = State::default();
        for a in [
            svc(Mode::UnspecifiedMode, &[]),
            wl("waypoint", 1, "a", true, false),
            wl("near", 2, "a", true, true),
            wl("far", 3, "b", true, true),
        ] {
            s.apply_address(&a).expect("valid");
        }
        let rule = |scopes: &[Scope]| wp::TrafficPolicy {
            load_balancer: Some(wp::LoadBalancer {
                simple: String::new(),
                locality: Some(wp::LocalityFailover {
                    routing_preference: scopes.iter().map(|s| *s as i32).collect(),
                }),
            }),
            ..Default::default()
        };
        let run = |s: &State, policy: &wp::TrafficPolicy| {
            let service = s.service(KEY).expect("service").clone();
            let me = s.workload("waypoint").map(|w| w.as_ref().clone());
            uids(candidates_at(s, me.as_ref(), &service, None, policy))
        };
        let none = wp::TrafficPolicy::default();
        assert_eq!(run(&s, &none), ["far", "near"]);
        let by_zone = rule(&[Scope::Region, Scope::Zone, Scope::Subzone]);
        assert_eq!(run(&s, &by_zone), ["near"]);
        s.apply_address(&wl("near", 2, "a", false, true)).expect("valid");
        assert_eq!(run(&s, &by_zone), ["far"], "fails over when the zone has none healthy");
        s.apply_address(&wl("near", 2, "a", true, true)).expect("valid");
        // The service prefers the zone; the rule ranks by cluster only (all equal): both.
        s.apply_address(&svc(Mode::Failover, &[Scope::Zone])).expect("valid");
        assert_eq!(run(&s, &none), ["near"]);
        assert_eq!(run(&s, &rule(&[Scope::Cluster])), ["far", "near"]);
    }
}
