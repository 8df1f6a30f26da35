//! Where the east-west gateway sends a CONNECT stream, decided from the outer authority alone
//! (the inner bytes are TLS it cannot read): a service `hostname:port` (Istio's ztunnel's
//! form) or an `ip:port` (a service VIP or a workload address) of this gateway's network.
//! The answer is the HBONE port of a healthy endpoint in this network (its ztunnel), or of
//! the waypoint of the service or workload addressed when it has one; never an address of
//! another network.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use mesh_core::state::{Destination, GatewayAddress, GatewayDestination, Service, State, Tunnel, Workload};
use rand::seq::SliceRandom;

/// Why a stream is refused (the label of `eastwest_streams_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The outer peer is not an identity of this mesh's trust domain.
    ForeignTrustDomain,
    /// The authority names nothing of this gateway's network (or a port it does not expose).
    NotInNetwork,
    /// The service exists here but has no healthy HBONE endpoint in this network.
    NoLocalEndpoint,
    /// The chosen endpoint did not accept the connection.
    Unreachable,
    /// The client already holds its maximum of relays still in their inner handshake
    /// (see [`super::handshake`]).
    HandshakesPerPeer,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::ForeignTrustDomain => "foreign_trust_domain",
            Refused::NotInNetwork => "not_in_network",
            Refused::NoLocalEndpoint => "no_local_endpoint",
            Refused::Unreachable => "upstream_unreachable",
            Refused::HandshakesPerPeer => "handshakes_per_peer_limit",
        }
    }

    /// What the client is answered.
    pub fn status(self) -> StatusCode {
        match self {
            Refused::ForeignTrustDomain => StatusCode::UNAUTHORIZED,
            Refused::NotInNetwork => StatusCode::BAD_REQUEST,
            Refused::NoLocalEndpoint | Refused::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
            Refused::HandshakesPerPeer => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// What the gateway routes in: its network and the HBONE port of its network's ztunnels.
pub struct Scope<'a> {
    pub network: &'a str,
    pub hbone_port: u16,
}

/// The HBONE address to relay a stream for `hostname:port` (or, without a hostname, for
/// `dst`) to; `like` picks the address family of dual-stack endpoints.
pub fn target(
    state: &State,
    scope: &Scope<'_>,
    hostname: Option<&str>,
    dst: SocketAddr,
    like: IpAddr,
) -> Result<SocketAddr, Refused> {
    match hostname {
        Some(host) => {
            let mut services: Vec<&Arc<Service>> = state.services_by_hostname(host).collect();
            if services.is_empty() {
                return Err(Refused::NotInNetwork);
            }
            // One hostname is one service per namespace. A Kubernetes name (`name.ns.svc...`)
            // is first its own namespace's Service: a ServiceEntry elsewhere claiming that
            // host must not get the Service's cross-network traffic. Then by key.
            let own = svc_namespace(host);
            services.sort_by_key(|s| (Some(s.namespace.as_str()) != own, s.key()));
            let mut last = Refused::NotInNetwork;
            for svc in services {
                match service_target(state, scope, svc, dst.port(), like) {
                    Ok(t) => return Ok(t),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        None => match state.lookup(scope.network, dst.ip()) {
            Some(Destination::Service(svc)) => service_target(state, scope, &svc, dst.port(), like),
            Some(Destination::Workload(w)) => workload_target(state, scope, &w, dst, like),
            None => Err(Refused::NotInNetwork),
        },
    }
}

/// A workload address: the workload's waypoint when it has one (the client's inner TLS
/// expects the waypoint's identity, and its policy applies there), else its own ztunnel.
fn workload_target(
    state: &State,
    scope: &Scope<'_>,
    w: &Workload,
    dst: SocketAddr,
    like: IpAddr,
) -> Result<SocketAddr, Refused> {
    if let Some(wp) = &w.waypoint {
        return pick(scope, &waypoint_endpoints(state, scope, wp), like, wp.hbone_port);
    }
    if w.tunnel == Tunnel::Hbone && w.healthy {
        Ok(SocketAddr::new(dst.ip(), scope.hbone_port))
    } else {
        Err(Refused::NoLocalEndpoint)
    }
}

/// The endpoints of a waypoint: the workload at its address, or its service's endpoints.
fn waypoint_endpoints(state: &State, scope: &Scope<'_>, wp: &GatewayAddress) -> Vec<Arc<Workload>> {
    match &wp.destination {
        GatewayDestination::Address { ip, .. } => match state.lookup(scope.network, *ip) {
            Some(Destination::Workload(w)) => vec![w],
            Some(Destination::Service(s)) => state.endpoints(&s),
            None => vec![],
        },
        GatewayDestination::Hostname { namespace, hostname } => state
            .service(&format!("{namespace}/{hostname}"))
            .map(|s| state.endpoints(s))
            .unwrap_or_default(),
    }
}

/// The namespace in a Kubernetes service hostname (`name.ns.svc.<domain>`).
fn svc_namespace(host: &str) -> Option<&str> {
    let mut labels = host.split('.');
    let (_, ns, svc) = (labels.next()?, labels.next()?, labels.next()?);
    (svc == "svc").then_some(ns)
}

fn service_target(
    state: &State,
    scope: &Scope<'_>,
    svc: &Service,
    port: u16,
    like: IpAddr,
) -> Result<SocketAddr, Refused> {
    if !svc.ports.iter().any(|p| p.service_port == port) {
        return Err(Refused::NotInNetwork);
    }
    if let Some(wp) = &svc.waypoint {
        // The client's inner TLS expects the waypoint's identity: send it there.
        return pick(scope, &waypoint_endpoints(state, scope, wp), like, wp.hbone_port);
    }
    pick(scope, &state.endpoints(svc), like, scope.hbone_port)
}

/// A random healthy HBONE endpoint of this network, at `port`.
fn pick(scope: &Scope<'_>, endpoints: &[Arc<Workload>], like: IpAddr, port: u16) -> Result<SocketAddr, Refused> {
    let local: Vec<IpAddr> = endpoints
        .iter()
        .filter(|w| w.network == scope.network && w.tunnel == Tunnel::Hbone && w.healthy)
        .filter_map(|w| w.address_like(like))
        .collect();
    local
        .choose(&mut rand::thread_rng())
        .map(|ip| SocketAddr::new(*ip, port))
        .ok_or(Refused::NoLocalEndpoint)
}

#[cfg(test)]
mod tests {
    use mesh_core::identity::Identity;
    use mesh_core::state::PortMapping;

    use super::*;

    const SVC: &str = "default/web.default.svc.cluster.local";

    fn workload(name: &str, ip: &str, network: &str) -> Workload {
        Workload {
            uid: format!("c//Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            addresses: vec![ip.parse().unwrap()],
            network: network.into(),
            tunnel: Tunnel::Hbone,
            identity: Identity::new("", "default", name).unwrap(),
            waypoint: None,
            node: "n".into(),
            canonical_name: name.into(),
            canonical_revision: "v1".into(),
            workload_name: name.into(),
            services: vec![(
                SVC.to_owned(),
                vec![PortMapping {
                    service_port: 80,
                    target_port: 8080,
                }],
            )],
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
        }
    }

    fn service(waypoint: Option<GatewayAddress>) -> Service {
        Service {
            name: "web".into(),
            namespace: "default".into(),
            hostname: "web.default.svc.cluster.local".into(),
            vips: vec![("net2".into(), "10.96.2.1".parse().unwrap())],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
            subject_alt_names: vec![],
            waypoint,
            only_healthy: true,
        }
    }

    const SCOPE: Scope<'static> = Scope {
        network: "net2",
        hbone_port: 15008,
    };

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn any() -> IpAddr {
        "10.2.0.100".parse().unwrap()
    }

    /// web has an endpoint in this network and one in another.
    fn state() -> State {
        let mut s = State::default();
        s.upsert_workload(workload("web-here", "10.2.0.2", "net2"));
        let mut there = workload("web-there", "10.1.0.2", "net1");
        there.uid = "c//Pod/default/web-there".into();
        s.upsert_workload(there);
        s.upsert_service(service(None));
        s
    }

    #[test]
    fn hostnames_go_to_an_endpoint_of_this_network_only() {
        let s = state();
        let host = Some("web.default.svc.cluster.local");
        for _ in 0..20 {
            assert_eq!(
                target(&s, &SCOPE, host, sa("10.2.0.100:80"), any()),
                Ok(sa("10.2.0.2:15008"))
            );
        }
        // By VIP and by workload address, too.
        assert_eq!(
            target(&s, &SCOPE, None, sa("10.96.2.1:80"), any()),
            Ok(sa("10.2.0.2:15008"))
        );
        assert_eq!(
            target(&s, &SCOPE, None, sa("10.2.0.2:8080"), any()),
            Ok(sa("10.2.0.2:15008"))
        );
    }

    #[test]
    fn authorities_outside_the_network_are_refused() {
        let s = state();
        let refused = |host: Option<&str>, dst: &str| target(&s, &SCOPE, host, sa(dst), any());
        assert_eq!(
            refused(Some("nope.default.svc.cluster.local"), "10.2.0.100:80"),
            Err(Refused::NotInNetwork)
        );
        assert_eq!(
            refused(Some("web.default.svc.cluster.local"), "10.2.0.100:81"),
            Err(Refused::NotInNetwork)
        );
        // A workload of another network (its address is not one of this network's).
        assert_eq!(refused(None, "10.1.0.2:8080"), Err(Refused::NotInNetwork));
        assert_eq!(refused(None, "192.0.2.1:443"), Err(Refused::NotInNetwork));
        assert_eq!(Refused::NotInNetwork.status(), StatusCode::BAD_REQUEST);
        // Only the other network's endpoint left: nothing to send it to here.
        let mut s = state();
        s.remove_workload("c//Pod/default/web-here");
        assert_eq!(
            target(
                &s,
                &SCOPE,
                Some("web.default.svc.cluster.local"),
                sa("10.2.0.100:80"),
                any()
            ),
            Err(Refused::NoLocalEndpoint)
        );
    }

    /// A ServiceEntry in another namespace (sorting before `default`) claiming the Service's
    /// hostname, with its own endpoint here, does not get the Service's streams.
    #[test]
    fn a_service_hostname_is_its_own_namespaces_service() {
        let mut s = state();
        let mut impostor = workload("impostor", "10.2.0.66", "net2");
        impostor.namespace = "aaa".into();
        impostor.services = vec![(
            "aaa/web.default.svc.cluster.local".to_owned(),
            vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
        )];
        s.upsert_workload(impostor);
        s.upsert_service(Service {
            namespace: "aaa".into(),
            vips: vec![],
            ..service(None)
        });
        for _ in 0..20 {
            assert_eq!(
                target(
                    &s,
                    &SCOPE,
                    Some("web.default.svc.cluster.local"),
                    sa("10.2.0.100:80"),
                    any()
                ),
                Ok(sa("10.2.0.2:15008"))
            );
        }
    }

    /// A workload address of a workload with a waypoint goes to that waypoint, as a service's
    /// does: never straight to the workload's ztunnel, past the waypoint's policy.
    #[test]
    fn a_workload_with_a_waypoint_goes_to_the_waypoint() {
        let mut s = state();
        let mut wp = workload("waypoint", "10.2.0.9", "net2");
        wp.services.clear();
        s.upsert_workload(wp);
        let mut here = workload("web-here", "10.2.0.2", "net2");
        here.waypoint = Some(GatewayAddress {
            destination: GatewayDestination::Address {
                network: "net2".into(),
                ip: "10.2.0.9".parse().unwrap(),
            },
            hbone_port: 15008,
        });
        s.upsert_workload(here);
        assert_eq!(
            target(&s, &SCOPE, None, sa("10.2.0.2:8080"), any()),
            Ok(sa("10.2.0.9:15008"))
        );
        // A waypoint with no healthy endpoint here: refused, not the workload directly.
        s.remove_workload("c//Pod/default/waypoint");
        assert_eq!(
            target(&s, &SCOPE, None, sa("10.2.0.2:8080"), any()),
            Err(Refused::NoLocalEndpoint)
        );
    }

    #[test]
    fn a_service_with_a_waypoint_goes_to_the_waypoint() {
        let mut s = state();
        let mut wp = workload("waypoint", "10.2.0.9", "net2");
        wp.services.clear();
        s.upsert_workload(wp);
        s.upsert_service(service(Some(GatewayAddress {
            destination: GatewayDestination::Address {
                network: "net2".into(),
                ip: "10.2.0.9".parse().unwrap(),
            },
            hbone_port: 15008,
        })));
        assert_eq!(
            target(
                &s,
                &SCOPE,
                Some("web.default.svc.cluster.local"),
                sa("10.2.0.100:80"),
                any()
            ),
            Ok(sa("10.2.0.9:15008"))
        );
    }
}
