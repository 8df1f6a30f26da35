//! Who the application sees as the client of an inbound HBONE stream.
//!
//! A CONNECT may carry `forwarded: for=<addr>`, the original client's address. Believing it
//! from anyone would let any mesh workload make the application see `127.0.0.1` or another
//! pod's address, so (as Istio's ztunnel does) it is honoured only from a waypoint of the
//! destination: the peer's certificate must name the identity of a workload that owns the
//! peer's address and that the destination (or a service it belongs to) uses as its waypoint.
//! Even then, an address that can never be a remote client (loopback, unspecified, multicast,
//! broadcast, or one of this namespace's own) is refused. Everyone else is seen as the peer.
//! Both decisions are pure functions so the rules are tested as tables.

use std::net::{IpAddr, SocketAddr};

use mesh_core::identity::Identity;
use mesh_core::state::{GatewayAddress, GatewayDestination, State, Workload};

/// Why a `forwarded` address was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// The peer is not a waypoint of the destination.
    UntrustedPeer,
    /// The address can never be a remote client's.
    InvalidAddress,
}

impl Ignored {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Ignored::UntrustedPeer => "untrusted_peer",
            Ignored::InvalidAddress => "invalid_address",
        }
    }
}

/// The client address to connect from and to report, and whether a `forwarded` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientSource {
    pub addr: SocketAddr,
    pub ignored: Option<Ignored>,
}

/// Decides the client address of a stream from `peer` (the TLS connection's address), the
/// `forwarded` address it claims, whether the peer is trusted to forward (see
/// [`is_waypoint_for`]) and which addresses are this namespace's own.
pub fn client_source(
    peer: SocketAddr,
    forwarded: Option<SocketAddr>,
    peer_trusted: bool,
    is_own: impl Fn(IpAddr) -> bool,
) -> ClientSource {
    let as_peer = |ignored| ClientSource { addr: peer, ignored };
    let Some(fwd) = forwarded else { return as_peer(None) };
    let ip = canonical(fwd.ip());
    if ip == canonical(peer.ip()) {
        // The peer's own address (a ztunnel forwarding its pod's port): nothing new is claimed.
        return ClientSource {
            addr: SocketAddr::new(ip, fwd.port()),
            ignored: None,
        };
    }
    if !peer_trusted {
        return as_peer(Some(Ignored::UntrustedPeer));
    }
    if !valid_remote(ip) || is_own(ip) {
        return as_peer(Some(Ignored::InvalidAddress));
    }
    ClientSource {
        addr: SocketAddr::new(ip, fwd.port()),
        ignored: None,
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_canonical(),
        v4 => v4,
    }
}

/// False for addresses no remote client can have.
fn valid_remote(ip: IpAddr) -> bool {
    let never = ip.is_loopback() || ip.is_unspecified() || ip.is_multicast();
    match ip {
        IpAddr::V4(v4) => !(never || v4.is_broadcast()),
        IpAddr::V6(_) => !never,
    }
}

/// True when the peer (`identity` proven by its certificate, connecting from `ip`) is a
/// waypoint of `dst`: a known workload owning `ip` with that identity, which `dst` itself or
/// one of the services `dst` belongs to names as its waypoint.
pub fn is_waypoint_for(state: &State, network: &str, dst: &Workload, identity: &Identity, ip: IpAddr) -> bool {
    let Some(peer) = state.workload_by_ip(network, canonical(ip)) else {
        return false;
    };
    if peer.identity != *identity {
        return false;
    }
    let service_waypoints = dst
        .services
        .iter()
        .filter_map(|(key, _)| state.service(key))
        .filter_map(|s| s.waypoint.as_ref());
    dst.waypoint
        .iter()
        .chain(service_waypoints)
        .any(|w| waypoint_includes(state, w, peer))
}

/// Whether `waypoint` (an address of a workload or service, or a service hostname) is served
/// by `peer`.
fn waypoint_includes(state: &State, waypoint: &GatewayAddress, peer: &Workload) -> bool {
    let in_service = |s: &mesh_core::state::Service| state.endpoints(s).iter().any(|w| w.uid == peer.uid);
    match &waypoint.destination {
        GatewayDestination::Address { network, ip } => match state.service_by_vip(network, *ip) {
            Some(s) => in_service(s),
            None => state.workload_by_ip(network, *ip).is_some_and(|w| w.uid == peer.uid),
        },
        GatewayDestination::Hostname { namespace, hostname } => state
            .service(&format!("{namespace}/{hostname}"))
            .is_some_and(|s| in_service(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn client_source_table() {
        use Ignored::*;
        let peer = a("10.0.0.3:40000");
        let own = |ip: IpAddr| ip == "10.0.0.2".parse::<IpAddr>().unwrap();
        // (forwarded, trusted peer, expected address, expected refusal)
        let cases: &[(Option<&str>, bool, &str, Option<Ignored>)] = &[
            (None, false, "10.0.0.3:40000", None),
            (None, true, "10.0.0.3:40000", None),
            // The peer's own address: its port is the original one, nothing else changes.
            (Some("10.0.0.3:1234"), false, "10.0.0.3:1234", None),
            (Some("[::ffff:10.0.0.3]:1234"), false, "10.0.0.3:1234", None),
            // A foreign identity's claims are never believed.
            (Some("10.0.0.1:1234"), false, "10.0.0.3:40000", Some(UntrustedPeer)),
            (Some("127.0.0.1:1234"), false, "10.0.0.3:40000", Some(UntrustedPeer)),
            // A waypoint's are, for addresses a remote client can have.
            (Some("10.0.0.1:1234"), true, "10.0.0.1:1234", None),
            (Some("[fd00::1]:1234"), true, "[fd00::1]:1234", None),
            (Some("[::ffff:10.0.0.1]:1234"), true, "10.0.0.1:1234", None),
            (Some("127.0.0.1:1234"), true, "10.0.0.3:40000", Some(InvalidAddress)),
            (Some("[::1]:1234"), true, "10.0.0.3:40000", Some(InvalidAddress)),
            (
                Some("[::ffff:127.0.0.1]:1234"),
                true,
                "10.0.0.3:40000",
                Some(InvalidAddress),
            ),
            (Some("0.0.0.0:1234"), true, "10.0.0.3:40000", Some(InvalidAddress)),
            (Some("[::]:1234"), true, "10.0.0.3:40000", Some(InvalidAddress)),
            (Some("224.0.0.1:1234"), true, "10.0.0.3:40000", Some(InvalidAddress)),
            (Some("[ff02::1]:1234"), true, "10.0.0.3:40000", Some(InvalidAddress)),
            (
                Some("255.255.255.255:1234"),
                true,
                "10.0.0.3:40000",
                Some(InvalidAddress),
            ),
            // This namespace's own address (the destination pod, the node).
            (Some("10.0.0.2:1234"), true, "10.0.0.3:40000", Some(InvalidAddress)),
        ];
        for (fwd, trusted, want, ignored) in cases {
            let got = client_source(peer, fwd.map(a), *trusted, own);
            assert_eq!(
                got,
                ClientSource {
                    addr: a(want),
                    ignored: *ignored
                },
                "forwarded {fwd:?}, trusted {trusted}"
            );
        }
    }

    mod waypoints {
        use mesh_core::state::{PortMapping, Service, Tunnel};

        use super::*;

        fn id(sa: &str) -> Identity {
            Identity::new("cluster.local", "shop", sa).unwrap()
        }

        fn workload(name: &str, ip: &str, waypoint: Option<GatewayDestination>, svc: Option<&str>) -> Workload {
            Workload {
                uid: format!("c//Pod/shop/{name}"),
                name: name.into(),
                namespace: "shop".into(),
                addresses: vec![ip.parse().unwrap()],
                network: String::new(),
                tunnel: Tunnel::Hbone,
                identity: id(name),
                waypoint: waypoint.map(|destination| GatewayAddress {
                    destination,
                    hbone_port: 15008,
                }),
                node: "n".into(),
                canonical_name: name.into(),
                canonical_revision: "v1".into(),
                workload_name: name.into(),
                services: svc
                    .map(|k| {
                        vec![(
                            k.to_owned(),
                            vec![PortMapping {
                                service_port: 80,
                                target_port: 8080,
                            }],
                        )]
                    })
                    .unwrap_or_default(),
                authorization_policies: vec![],
                healthy: true,
                cluster_id: String::new(),
            }
        }

        fn service(name: &str, vip: &str, waypoint: Option<GatewayDestination>) -> Service {
            Service {
                name: name.into(),
                namespace: "shop".into(),
                hostname: format!("{name}.shop.svc.cluster.local"),
                vips: vec![(String::new(), vip.parse().unwrap())],
                ports: vec![PortMapping {
                    service_port: 80,
                    target_port: 8080,
                }],
                subject_alt_names: vec![],
                waypoint: waypoint.map(|destination| GatewayAddress {
                    destination,
                    hbone_port: 15008,
                }),
                only_healthy: true,
            }
        }

        fn addr(ip: &str) -> GatewayDestination {
            GatewayDestination::Address {
                network: String::new(),
                ip: ip.parse().unwrap(),
            }
        }

        #[test]
        fn only_the_destinations_waypoint_is_trusted() {
            let mut st = State::default();
            // wp (10.0.0.9) is the waypoint of "direct" by address and of service "reviews"
            // (by its VIP 10.96.0.9, whose endpoint it is); "byname" names the waypoint
            // service by hostname; "plain" has none; "other" is another waypoint.
            st.upsert_workload(workload("wp", "10.0.0.9", None, Some("shop/wp.shop.svc.cluster.local")));
            st.upsert_workload(workload("other", "10.0.0.8", None, None));
            st.upsert_service(service("wp", "10.96.0.9", None));
            st.upsert_service(service("reviews", "10.96.0.1", Some(addr("10.96.0.9"))));
            st.upsert_workload(workload("direct", "10.0.0.1", Some(addr("10.0.0.9")), None));
            st.upsert_workload(workload(
                "viasvc",
                "10.0.0.2",
                None,
                Some("shop/reviews.shop.svc.cluster.local"),
            ));
            let hostname = GatewayDestination::Hostname {
                namespace: "shop".into(),
                hostname: "wp.shop.svc.cluster.local".into(),
            };
            st.upsert_workload(workload("byname", "10.0.0.3", Some(hostname), None));
            st.upsert_workload(workload("plain", "10.0.0.4", None, None));
            st.upsert_workload(workload("toother", "10.0.0.5", Some(addr("10.0.0.8")), None));

            let dst = |name: &str| {
                st.workloads()
                    .find(|w| w.name == name)
                    .cloned()
                    .unwrap_or_else(|| panic!("{name}"))
            };
            let ip = |s: &str| s.parse::<IpAddr>().unwrap();
            // (destination, peer identity, peer address, trusted)
            let cases = [
                ("direct", id("wp"), ip("10.0.0.9"), true),
                ("viasvc", id("wp"), ip("10.0.0.9"), true),
                ("byname", id("wp"), ip("10.0.0.9"), true),
                ("direct", id("wp"), ip("::ffff:10.0.0.9"), true),
                // The waypoint's identity from another address (a stolen certificate).
                ("direct", id("wp"), ip("10.0.0.8"), false),
                ("direct", id("wp"), ip("10.0.0.77"), false),
                // The waypoint's address with another identity.
                ("direct", id("attacker"), ip("10.0.0.9"), false),
                // A waypoint, but not this destination's.
                ("direct", id("other"), ip("10.0.0.8"), false),
                ("toother", id("wp"), ip("10.0.0.9"), false),
                ("plain", id("wp"), ip("10.0.0.9"), false),
            ];
            for (d, identity, peer_ip, want) in cases {
                assert_eq!(
                    is_waypoint_for(&st, "", &dst(d), &identity, peer_ip),
                    want,
                    "destination {d}, peer {identity} at {peer_ip}"
                );
            }
        }
    }
}
