//! Locality-aware endpoint choice, as Istio's ztunnel makes it from a service's
//! `load_balancing`: each endpoint is ranked by how many of the service's routing-preference
//! scopes (network, region, zone, subzone, node, cluster), taken in order, it shares with the
//! client; the first scope that differs ends the count. FAILOVER keeps the endpoints of the
//! best rank present, so when every same-zone endpoint is unhealthy (already filtered out by
//! the health policy) the next rank serves; STRICT keeps only endpoints matching every scope
//! and otherwise refuses ([`OutOfScope`]). No policy, or mode UNSPECIFIED, keeps them all.
//!
//! Kept beside the model (the state's side tables hold each workload's [`Locality`] and each
//! service's [`LoadPolicy`]) so the many places that build model structs field by field are
//! untouched.

use mesh_proto::workload as pb;

/// Where a workload runs (the workload API's `Locality`); empty parts are "unknown", and two
/// unknowns are equal, as Istio compares them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl From<&pb::Locality> for Locality {
    fn from(l: &pb::Locality) -> Self {
        Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }
    }
}

/// One routing-preference scope. `Unknown` (a value this build does not know, or
/// UNSPECIFIED) never matches: under STRICT it refuses rather than widening the scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Scope {
    Network,
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Unknown,
}

impl From<i32> for Scope {
    fn from(v: i32) -> Self {
        use pb::load_balancing::Scope as S;
        match S::try_from(v) {
            Ok(S::Network) => Scope::Network,
            Ok(S::Region) => Scope::Region,
            Ok(S::Zone) => Scope::Zone,
            Ok(S::Subzone) => Scope::Subzone,
            Ok(S::Node) => Scope::Node,
            Ok(S::Cluster) => Scope::Cluster,
            _ => Scope::Unknown,
        }
    }
}

/// How the preference is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    /// Only endpoints matching every scope.
    Strict,
    /// The endpoints matching the most scopes present.
    Failover,
}

/// A service's locality preference; services without one (or with mode UNSPECIFIED or
/// PASSTHROUGH) have none and use every endpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LoadPolicy {
    pub routing_preference: Vec<Scope>,
    pub mode: Mode,
}

impl LoadPolicy {
    pub fn from_proto(lb: &pb::LoadBalancing) -> Option<Self> {
        use pb::load_balancing::Mode as M;
        let mode = match M::try_from(lb.mode) {
            Ok(M::Strict) => Mode::Strict,
            Ok(M::Failover) => Mode::Failover,
            // UNSPECIFIED: Istio's ztunnel ignores the scopes; PASSTHROUGH picks no endpoint.
            _ => return None,
        };
        Some(LoadPolicy {
            routing_preference: lb.routing_preference.iter().copied().map(Scope::from).collect(),
            mode,
        })
    }
}

/// What a scope compares: the facts of the client or of an endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    pub network: &'a str,
    pub locality: &'a Locality,
    pub node: &'a str,
    pub cluster_id: &'a str,
}

impl Peer<'_> {
    fn shares(&self, other: &Peer<'_>, scope: Scope) -> bool {
        match scope {
            Scope::Network => self.network == other.network,
            Scope::Region => self.locality.region == other.locality.region,
            Scope::Zone => self.locality.zone == other.locality.zone,
            Scope::Subzone => self.locality.subzone == other.locality.subzone,
            Scope::Node => self.node == other.node,
            Scope::Cluster => self.cluster_id == other.cluster_id,
            Scope::Unknown => false,
        }
    }
}

/// How many of `policy`'s scopes, in order, `ep` shares with `client`.
pub fn rank(policy: &LoadPolicy, client: &Peer<'_>, ep: &Peer<'_>) -> usize {
    policy
        .routing_preference
        .iter()
        .take_while(|s| client.shares(ep, **s))
        .count()
}

/// STRICT locality and no endpoint in scope: the connection is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no endpoint matches the service's strict locality scope")]
pub struct OutOfScope;

/// The candidates to choose among: all of them without a policy; under FAILOVER those of the
/// best rank; under STRICT those matching every scope (`OutOfScope` when there were
/// candidates but none matched). An empty input gives an empty output.
pub fn select<T>(
    policy: Option<&LoadPolicy>,
    client: &Peer<'_>,
    candidates: Vec<(Peer<'_>, T)>,
) -> Result<Vec<T>, OutOfScope> {
    let Some(policy) = policy else {
        return Ok(candidates.into_iter().map(|(_, t)| t).collect());
    };
    let any = !candidates.is_empty();
    let full = policy.routing_preference.len();
    let ranked: Vec<(usize, T)> = candidates
        .into_iter()
        .map(|(p, t)| (rank(policy, client, &p), t))
        .filter(|(r, _)| policy.mode == Mode::Failover || *r == full)
        .collect();
    if any && ranked.is_empty() {
        return Err(OutOfScope);
    }
    let best = ranked.iter().map(|(r, _)| *r).max().unwrap_or(0);
    Ok(ranked.into_iter().filter(|(r, _)| *r == best).map(|(_, t)| t).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(region: &str, zone: &str, subzone: &str) -> Locality {
        Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: subzone.into(),
        }
    }

    fn lb(mode: pb::load_balancing::Mode, scopes: &[pb::load_balancing::Scope]) -> pb::LoadBalancing {
        pb::LoadBalancing {
            routing_preference: scopes.iter().map(|s| *s as i32).collect(),
            mode: mode as i32,
            ..Default::default()
        }
    }

    /// Each row: policy, then the endpoints left for a client in network n1, region r1, zone
    /// z1, subzone s1, node a, cluster c1.
    #[test]
    fn selection_table() {
        use pb::load_balancing::{Mode as M, Scope as S};
        let close = [S::Network, S::Region, S::Zone];
        let eps = [
            ("same-zone", "n1", loc("r1", "z1", "s2"), "b", "c1"),
            ("same-region", "n1", loc("r1", "z2", "s1"), "a", "c1"),
            ("other-region", "n1", loc("r2", "z1", "s1"), "a", "c2"),
            ("other-network", "n2", loc("r1", "z1", "s1"), "a", "c1"),
        ];
        let client_loc = loc("r1", "z1", "s1");
        let client = Peer {
            network: "n1",
            locality: &client_loc,
            node: "a",
            cluster_id: "c1",
        };
        let run = |policy: Option<pb::LoadBalancing>, skip: &[&str]| {
            let policy = policy.as_ref().and_then(LoadPolicy::from_proto);
            let candidates = eps
                .iter()
                .filter(|e| !skip.contains(&e.0))
                .map(|(name, network, locality, node, cluster_id)| {
                    let p = Peer {
                        network,
                        locality,
                        node,
                        cluster_id,
                    };
                    (p, *name)
                })
                .collect();
            select(policy.as_ref(), &client, candidates)
        };
        type Row<'a> = (
            Option<pb::LoadBalancing>,
            &'a [&'a str],
            Result<Vec<&'a str>, OutOfScope>,
        );
        let rows: Vec<Row> = vec![
            // No policy, or UNSPECIFIED mode: everything.
            (
                None,
                &[],
                Ok(vec!["same-zone", "same-region", "other-region", "other-network"]),
            ),
            (
                Some(lb(M::UnspecifiedMode, &close)),
                &[],
                Ok(vec!["same-zone", "same-region", "other-region", "other-network"]),
            ),
            // PreferClose: the same zone while it has an endpoint, then the region, then the
            // network; another network only when nothing on ours is left.
            (Some(lb(M::Failover, &close)), &[], Ok(vec!["same-zone"])),
            (Some(lb(M::Failover, &close)), &["same-zone"], Ok(vec!["same-region"])),
            (
                Some(lb(M::Failover, &close)),
                &["same-zone", "same-region"],
                Ok(vec!["other-region"]),
            ),
            (
                Some(lb(M::Failover, &close)),
                &["same-zone", "same-region", "other-region"],
                Ok(vec!["other-network"]),
            ),
            // Order matters: a zone match after a region mismatch does not count.
            (
                Some(lb(M::Failover, &[S::Region, S::Zone])),
                &["same-zone", "other-network"],
                Ok(vec!["same-region"]),
            ),
            // Node and cluster scopes.
            (
                Some(lb(M::Failover, &[S::Node])),
                &[],
                Ok(vec!["same-region", "other-region", "other-network"]),
            ),
            (
                Some(lb(M::Failover, &[S::Cluster, S::Subzone])),
                &[],
                Ok(vec!["same-region", "other-network"]),
            ),
            // STRICT: only full matches; none left is a refusal, not "anything".
            (
                Some(lb(M::Strict, &[S::Node])),
                &[],
                Ok(vec!["same-region", "other-region", "other-network"]),
            ),
            (Some(lb(M::Strict, &close)), &[], Ok(vec!["same-zone"])),
            (Some(lb(M::Strict, &close)), &["same-zone"], Err(OutOfScope)),
            // An unknown scope never matches: STRICT refuses instead of widening.
            (Some(lb(M::Strict, &[S::UnspecifiedScope])), &[], Err(OutOfScope)),
            // Nothing to choose from is not a scope refusal.
            (
                Some(lb(M::Strict, &close)),
                &["same-zone", "same-region", "other-region", "other-network"],
                Ok(vec![]),
            ),
            // PASSTHROUGH carries no preference.
            (
                Some(lb(M::Passthrough, &close)),
                &["other-network"],
                Ok(vec!["same-zone", "same-region", "other-region"]),
            ),
        ];
        for (i, (policy, skip, want)) in rows.into_iter().enumerate() {
            assert_eq!(run(policy, skip), want, "row {i}");
        }
    }

    /// The state keeps each workload's locality and each service's policy with the resource
    /// (replaced and removed with it), and `closest` ranks a service's endpoints by them.
    #[test]
    fn state_follows_the_resources() {
        use crate::state::State;
        use pb::load_balancing::{Mode as M, Scope as S};
        let svc = |mode: M| pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                load_balancing: Some(lb(mode, &[S::Network, S::Region, S::Zone])),
                ..Default::default()
            })),
        };
        let wl = |uid: &str, zone: &str, ip: u8| pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "shop".into(),
                addresses: vec![vec![10, 0, 0, ip]],
                locality: Some(pb::Locality {
                    region: "r1".into(),
                    zone: zone.into(),
                    subzone: String::new(),
                }),
                services: [("shop/web.shop.svc.cluster.local".to_owned(), pb::PortList::default())].into(),
                ..Default::default()
            })),
        };
        let key = "shop/web.shop.svc.cluster.local";
        let mut s = State::default();
        for a in [
            svc(M::Failover),
            wl("client", "z1", 1),
            wl("near", "z1", 2),
            wl("far", "z2", 3),
        ] {
            s.apply_address(&a).expect("valid");
        }
        assert_eq!(s.locality("far").zone, "z2");
        let service = s.service(key).expect("service").clone();
        let client = s.workload("client").expect("client").clone();
        let uids = |r: Result<Vec<std::sync::Arc<crate::state::Workload>>, OutOfScope>| {
            r.map(|v| {
                let mut u: Vec<String> = v.iter().map(|w| w.uid.clone()).collect();
                u.sort();
                u
            })
        };
        let eps = || {
            s.endpoints(&service)
                .into_iter()
                .filter(|w| w.uid != "client")
                .collect()
        };
        assert_eq!(uids(s.closest(&service, &client, eps())), Ok(vec!["near".to_owned()]));
        let far_only: Vec<_> = s.endpoints(&service).into_iter().filter(|w| w.uid == "far").collect();
        assert_eq!(
            uids(s.closest(&service, &client, far_only.clone())),
            Ok(vec!["far".to_owned()])
        );
        s.apply_address(&svc(M::Strict)).expect("valid");
        assert_eq!(uids(s.closest(&service, &client, far_only.clone())), Err(OutOfScope));
        // The workload moved zone: its locality is replaced with it.
        s.apply_address(&wl("far", "z1", 3)).expect("valid");
        let far_only: Vec<_> = s.endpoints(&service).into_iter().filter(|w| w.uid == "far").collect();
        assert_eq!(uids(s.closest(&service, &client, far_only)), Ok(vec!["far".to_owned()]));
        assert!(s.remove_address("far"));
        assert_eq!(s.locality("far"), &Locality::default());
        assert!(s.remove_address(key));
        assert!(s.load_policy(key).is_none());
    }
}
