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

use mesh_core::state::{Service, State, Workload};

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
}
