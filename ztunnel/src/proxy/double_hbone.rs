//! Double HBONE, as Istio's ztunnel speaks it, for workloads on another network.
//!
//! Outbound: a service endpoint on a network other than the client's is reached through the
//! east-west gateway named by its `network_gateway`: an outer HBONE CONNECT to the gateway's
//! HBONE port (mutual TLS, the gateway's identity checked), whose authority is the service's
//! `hostname:port` (the service port) so the gateway can route without decrypting anything;
//! inside it, a second mutual TLS with the destination and an inner CONNECT with the same
//! authority. The gateway only ever holds the inner TLS records. Since the gateway picks the
//! endpoint, the inner peer must prove an identity of one of the service's endpoints on that
//! network or one of the service's SANs (Istio's ztunnel accepts only the SANs, which istiod
//! fills with the endpoints' identities for such services).
//!
//! Inbound: the inner CONNECT arrives at the destination's ztunnel naming the service by
//! hostname; [`hostname_target`] turns that into the local workload's address and target
//! port (the service port translated as for a VIP), after which authorization and delivery
//! are those of any HBONE stream.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::identity::Identity;
use mesh_core::state::{Destination, GatewayDestination, Service, State, Workload};
use rand::seq::SliceRandom;

use super::outbound::{Route, RouteError};

/// Whether `wl` can be reached from a client on `network`: on the same network directly, on
/// another only through a network gateway.
pub fn reachable(state: &State, network: &str, wl: &Workload) -> bool {
    wl.network == network || state.network_gateway(&wl.uid).is_some()
}

/// Whether a connection from a client on `network` to `wl` must go through its gateway.
pub fn needs_gateway(state: &State, network: &str, wl: &Workload) -> bool {
    wl.network != network && state.network_gateway(&wl.uid).is_some()
}

/// The double-HBONE route to endpoint `wl` of `svc` for a connection to `dst` (the service
/// VIP and port the client dialled).
pub fn route(state: &State, wl: &Arc<Workload>, svc: &Arc<Service>, dst: SocketAddr) -> Result<Route, RouteError> {
    let unavailable = |why: &str| RouteError::NetworkGateway {
        workload: wl.uid.clone(),
        why: why.to_owned(),
    };
    let gw = state
        .network_gateway(&wl.uid)
        .ok_or_else(|| unavailable("the workload has no network gateway"))?;
    let healthy = |s: &Service| -> Vec<Arc<Workload>> { state.endpoints(s) };
    let (gateway, gateway_identities) = match &gw.destination {
        GatewayDestination::Address { network, ip } => {
            let network = if network.is_empty() { &wl.network } else { network };
            // The address is what the other network exposes: dial it as given. Its identity
            // comes from what the address is in the mesh state, never from the peer.
            let identities = match state.lookup(network, *ip) {
                Some(Destination::Workload(w)) => vec![w.identity.clone()],
                Some(Destination::Service(s)) => {
                    let mut ids: Vec<Identity> = healthy(&s).iter().map(|w| w.identity.clone()).collect();
                    ids.extend(s.subject_alt_names.iter().cloned());
                    ids
                }
                None => {
                    return Err(unavailable(&format!(
                        "gateway {ip} on network {network:?} is not known"
                    )))
                }
            };
            (SocketAddr::new(*ip, gw.hbone_port), identities)
        }
        GatewayDestination::Hostname { namespace, hostname } => {
            let s = state
                .service(&format!("{namespace}/{hostname}"))
                .ok_or_else(|| unavailable(&format!("gateway service {namespace}/{hostname} is not known")))?;
            let picked = healthy(s).choose(&mut rand::thread_rng()).cloned().ok_or_else(|| {
                unavailable(&format!(
                    "gateway service {namespace}/{hostname} has no healthy endpoint"
                ))
            })?;
            let ip = picked
                .address_like(dst.ip())
                .ok_or_else(|| unavailable("the gateway endpoint has no address"))?;
            let mut ids = vec![picked.identity.clone()];
            ids.extend(s.subject_alt_names.iter().cloned());
            (SocketAddr::new(ip, gw.hbone_port), ids)
        }
    };
    if gateway_identities.is_empty() {
        return Err(unavailable("no identity is known for the gateway"));
    }
    // The gateway picks the endpoint, so the inner handshake may meet any endpoint of the
    // service on that network; Istio's ztunnel accepts only the service's SANs here.
    let mut identities: Vec<Identity> = state
        .endpoints(svc)
        .iter()
        .filter(|w| w.network == wl.network)
        .map(|w| w.identity.clone())
        .collect();
    identities.extend(svc.subject_alt_names.iter().cloned());
    Ok(Route::DoubleHbone {
        gateway,
        gateway_identities,
        authority: format!("{}:{}", svc.hostname, dst.port()),
        identities,
        workload: Some(wl.clone()),
        service: Some(svc.clone()),
    })
}

/// Inbound: the address a `hostname:port` CONNECT arriving on `local` means, if `hostname` is
/// a service of the workload at `local` that exposes `port`: that workload's address and its
/// target port for the service port.
pub fn hostname_target(
    state: &State,
    network: &str,
    local: SocketAddr,
    hostname: &str,
    port: u16,
) -> Option<SocketAddr> {
    let wl = state.workload_by_ip(network, local.ip())?;
    let svc = wl
        .services
        .iter()
        .filter_map(|(key, _)| state.service(key))
        .find(|s| s.hostname.eq_ignore_ascii_case(hostname))?;
    let target = wl.target_port(svc, port)?;
    Some(SocketAddr::new(local.ip(), target))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use mesh_core::state::{GatewayAddress, PortMapping, Tunnel};

    use super::*;
    use crate::proxy::outbound::resolve;

    const SVC: &str = "default/web.default.svc.cluster.local";

    fn workload(name: &str, ip: &str, network: &str, svc: bool) -> Workload {
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
            services: if svc {
                vec![(
                    SVC.to_owned(),
                    vec![PortMapping {
                        service_port: 80,
                        target_port: 9090,
                    }],
                )]
            } else {
                vec![]
            },
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
        }
    }

    fn gateway_at(ip: &str, network: &str) -> GatewayAddress {
        GatewayAddress {
            destination: GatewayDestination::Address {
                network: network.into(),
                ip: ip.parse::<IpAddr>().unwrap(),
            },
            hbone_port: 15008,
        }
    }

    /// Client on net1; service `web` (VIP on net1) with one endpoint on net2 behind the
    /// east-west gateway 192.0.2.10 (a workload of net2 with its own identity).
    fn state() -> (State, Workload) {
        let mut s = State::default();
        let client = workload("client", "10.1.0.1", "net1", false);
        s.upsert_workload(client.clone());
        s.upsert_workload(workload("web", "10.2.0.2", "net2", true));
        let mut gw = workload("eastwest", "192.0.2.10", "net2", false);
        gw.namespace = "istio-system".into();
        gw.identity = Identity::new("", "istio-system", "eastwest").unwrap();
        s.upsert_workload(gw);
        s.set_network_gateway("c//Pod/default/web", Some(gateway_at("192.0.2.10", "net2")));
        s.upsert_service(Service {
            name: "web".into(),
            namespace: "default".into(),
            hostname: "web.default.svc.cluster.local".into(),
            vips: vec![("net1".into(), "10.96.0.1".parse().unwrap())],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            only_healthy: true,
        });
        (s, client)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_endpoint_on_another_network_goes_through_its_gateway() {
        let (s, client) = state();
        match resolve(&s, "net1", 15008, &client, sa("10.96.0.1:80")).unwrap() {
            Route::DoubleHbone {
                gateway,
                gateway_identities,
                authority,
                identities,
                ..
            } => {
                assert_eq!(gateway, sa("192.0.2.10:15008"));
                assert_eq!(
                    gateway_identities[0].to_string(),
                    "spiffe://cluster.local/ns/istio-system/sa/eastwest"
                );
                // Istio's form: the service hostname and the service port, on both layers.
                assert_eq!(authority, "web.default.svc.cluster.local:80");
                assert_eq!(identities.len(), 1);
                assert_eq!(identities[0].service_account, "web");
            }
            other => panic!("{other:?}"),
        }
    }

    /// The gateway, not the client, picks the endpoint: the inner handshake accepts any
    /// endpoint of the service on that network (and the service's SANs), no other.
    #[test]
    fn the_inner_identity_is_any_endpoint_of_the_service_on_that_network() {
        let (mut s, client) = state();
        let mut other = workload("web-v2", "10.2.0.3", "net2", true);
        other.identity = Identity::new("", "default", "web-v2").unwrap();
        s.upsert_workload(other);
        s.set_network_gateway("c//Pod/default/web-v2", Some(gateway_at("192.0.2.10", "net2")));
        let mut elsewhere = workload("web-net3", "10.3.0.3", "net3", true);
        elsewhere.identity = Identity::new("", "default", "web-net3").unwrap();
        s.upsert_workload(elsewhere);
        s.set_network_gateway("c//Pod/default/web-net3", Some(gateway_at("192.0.2.10", "net2")));
        for _ in 0..20 {
            let Route::DoubleHbone { identities, .. } =
                resolve(&s, "net1", 15008, &client, sa("10.96.0.1:80")).unwrap()
            else {
                panic!("double HBONE expected")
            };
            let mut names: Vec<&str> = identities.iter().map(|i| i.service_account.as_str()).collect();
            names.sort();
            assert!(names == ["web", "web-v2"] || names == ["web-net3"], "{names:?}");
        }
    }

    #[test]
    fn same_network_endpoints_stay_direct_and_unreachable_ones_are_skipped() {
        let (mut s, client) = state();
        // A network gateway on a same-network endpoint is never used (WDS is client-agnostic).
        let mut local = workload("web", "10.2.0.2", "net1", true);
        local.uid = "c//Pod/default/web-local".into();
        s.upsert_workload(local);
        s.set_network_gateway("c//Pod/default/web-local", Some(gateway_at("192.0.2.10", "net2")));
        s.remove_workload("c//Pod/default/web");
        assert!(matches!(
            resolve(&s, "net1", 15008, &client, sa("10.96.0.1:80")).unwrap(),
            Route::Hbone { endpoint, .. } if endpoint == sa("10.2.0.2:15008")
        ));
        // An endpoint on another network without a gateway cannot be reached: not chosen.
        let (mut s, client) = state();
        s.set_network_gateway("c//Pod/default/web", None);
        assert!(matches!(
            resolve(&s, "net1", 15008, &client, sa("10.96.0.1:80")),
            Err(RouteError::NoEndpoint(_))
        ));
    }

    /// Fails closed: without the gateway's identity in the mesh state there is nothing to
    /// check its certificate against, so the connection is refused, never sent in the clear.
    #[test]
    fn an_unknown_gateway_is_refused() {
        let (mut s, client) = state();
        s.set_network_gateway("c//Pod/default/web", Some(gateway_at("198.51.100.1", "net2")));
        let err = resolve(&s, "net1", 15008, &client, sa("10.96.0.1:80")).expect_err("unknown gateway");
        assert!(matches!(err, RouteError::NetworkGateway { .. }), "{err}");
        assert_eq!(err.refusal().as_str(), "network_gateway_unavailable");
        assert!(err.to_string().contains("198.51.100.1"), "{err}");
    }

    #[test]
    fn inbound_hostnames_resolve_to_the_local_target_port() {
        let (s, _) = state();
        let local = sa("10.2.0.2:15008");
        assert_eq!(
            hostname_target(&s, "net2", local, "web.default.svc.cluster.local", 80),
            Some(sa("10.2.0.2:9090"))
        );
        assert_eq!(
            hostname_target(&s, "net2", local, "web.default.svc.cluster.local", 81),
            None
        );
        assert_eq!(
            hostname_target(&s, "net2", local, "other.default.svc.cluster.local", 80),
            None
        );
        // Only a service of the workload the connection arrived at.
        assert_eq!(
            hostname_target(&s, "net2", sa("192.0.2.10:15008"), "web.default.svc.cluster.local", 80),
            None
        );
    }
}
