//! Outbound: a captured application connection is resolved against the mesh state and sent
//! over HBONE to the destination's ztunnel (or its waypoint), as plain TCP to a workload that
//! does not speak HBONE, or passed through untouched when the destination is unknown.
//! An endpoint known by name only is resolved per connection, and only a routable address
//! it resolves to is dialled: a name resolving to loopback, link-local (the metadata server),
//! unspecified or multicast addresses only is refused ([`Refusal::UnroutableEndpoint`]), as
//! the controller refuses those addresses written in an entry.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::hbone::stream::H2Stream;
use mesh_core::hbone::{PendingGuard, PoolKey, TunnelRequest};
use mesh_core::identity::Identity;
use mesh_core::socket::original_dst;
use mesh_core::state::{Destination, GatewayAddress, GatewayDestination, Service, State, Tunnel, Workload};
use mesh_core::unroutable::Unroutable;
use rand::seq::SliceRandom;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::refusal::{ConnError, Refusal};
use super::Proxy;
use crate::metrics::{ConnBytes, ConnRecord, CountedClient, Metrics, Reporter, TcpLabels};

/// Where a connection goes.
#[derive(Debug)]
pub enum Route {
    Hbone {
        /// `ip:15008` of the destination ztunnel or waypoint.
        endpoint: SocketAddr,
        /// CONNECT authority.
        authority: SocketAddr,
        identities: Vec<Identity>,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
    Plain {
        addr: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
    Passthrough(SocketAddr),
    /// Double HBONE through the east-west gateway of the endpoint's network (see
    /// [`super::double_hbone`]).
    DoubleHbone {
        /// `ip:port` of the gateway's HBONE listener.
        gateway: SocketAddr,
        /// Identities the gateway may prove (outer mutual TLS).
        gateway_identities: Vec<Identity>,
        /// Outer and inner CONNECT authority: the service's `hostname:port`.
        authority: String,
        /// Identities the destination must prove (inner mutual TLS).
        identities: Vec<Identity>,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
    /// Plain TCP to an endpoint known by name only (ServiceEntry `resolution: DNS`), resolved
    /// by ztunnel for each connection, so never staler than the record's TTL.
    Resolve {
        host: String,
        port: u16,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
}

/// Why a connection could not be routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("service {0} does not expose port {1}")]
    NoPort(String, u16),
    #[error("service {0} has no healthy endpoint")]
    NoEndpoint(String),
    /// The destination must go through a waypoint that cannot be reached now (missing, not
    /// ready): refused, never sent directly past the waypoint's policy.
    #[error("waypoint {waypoint} is unavailable ({why}); refused rather than bypassing the waypoint")]
    Waypoint { waypoint: String, why: WaypointUnavailable },
    #[error("workload {0} has no address of the right family")]
    NoAddress(String),
    /// REGISTRY_ONLY: the destination is not a workload, service or ServiceEntry address.
    #[error("{0} is not in the mesh registry and the outbound policy is REGISTRY_ONLY")]
    NotRegistered(SocketAddr),
    /// The endpoint is on another network and its east-west gateway cannot be used.
    #[error("workload {workload} is on another network and its network gateway is unavailable: {why}")]
    NetworkGateway { workload: String, why: String },
    /// STRICT locality load balancing and no endpoint in the client's scope.
    #[error("service {0} has no endpoint in the client's locality scope (strict)")]
    OutOfLocality(String),
}

/// Why a waypoint cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointUnavailable {
    /// No service or workload of that name or address (the waypoint does not exist, or the
    /// controller names it without being able to place it).
    Unknown,
    /// It exists but none of its endpoints is healthy (not ready, scaled to zero).
    NoHealthyEndpoint,
}

impl std::fmt::Display for WaypointUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WaypointUnavailable::Unknown => "no such service or workload",
            WaypointUnavailable::NoHealthyEndpoint => "no healthy endpoint",
        })
    }
}

impl RouteError {
    pub fn refusal(&self) -> Refusal {
        match self {
            RouteError::NoPort(..) => Refusal::NoServicePort,
            RouteError::NoEndpoint(_) => Refusal::NoHealthyEndpoint,
            RouteError::Waypoint { .. } => Refusal::WaypointUnavailable,
            RouteError::NoAddress(_) => Refusal::NoAddress,
            RouteError::NotRegistered(_) => Refusal::NotRegistered,
            RouteError::NetworkGateway { .. } => Refusal::NetworkGatewayUnavailable,
            RouteError::OutOfLocality(_) => Refusal::NoLocalEndpoint,
        }
    }
}

/// Resolves a waypoint to its HBONE endpoint and identity. A service's port it does not
/// declare is refused as [`service_route`] refuses it: the waypoint would refuse it too.
fn waypoint_route(
    state: &State,
    src: &Workload,
    network: &str,
    wp: &GatewayAddress,
    authority: SocketAddr,
    service: Option<Arc<Service>>,
) -> Result<Route, RouteError> {
    if let Some(svc) = service.as_ref() {
        if !svc.ports.iter().any(|p| p.service_port == authority.port()) {
            return Err(RouteError::NoPort(svc.key(), authority.port()));
        }
    }
    let unavailable = |why| RouteError::Waypoint {
        waypoint: match &wp.destination {
            GatewayDestination::Address { ip, .. } => ip.to_string(),
            GatewayDestination::Hostname { namespace, hostname } => format!("{namespace}/{hostname}"),
        },
        why,
    };
    let pick = |svc: &Service| {
        // The waypoint's own service may prefer close instances (Istio sends FAILOVER).
        let eps = state.closest(svc, src, state.endpoints(svc)).unwrap_or_default();
        eps.choose(&mut rand::thread_rng())
            .cloned()
            .ok_or_else(|| unavailable(WaypointUnavailable::NoHealthyEndpoint))
    };
    let wl = match &wp.destination {
        GatewayDestination::Address { network: n, ip } => {
            let n = if n.is_empty() { network } else { n.as_str() };
            match state.lookup(n, *ip) {
                Some(Destination::Workload(w)) if w.healthy => w,
                Some(Destination::Workload(_)) => return Err(unavailable(WaypointUnavailable::NoHealthyEndpoint)),
                Some(Destination::Service(s)) => pick(&s)?,
                None => return Err(unavailable(WaypointUnavailable::Unknown)),
            }
        }
        GatewayDestination::Hostname { namespace, hostname } => {
            let svc = state
                .service(&format!("{namespace}/{hostname}"))
                .ok_or_else(|| unavailable(WaypointUnavailable::Unknown))?;
            pick(svc)?
        }
    };
    let ip = wl
        .address_like(authority.ip())
        .ok_or_else(|| RouteError::NoAddress(wl.uid.clone()))?;
    Ok(Route::Hbone {
        endpoint: SocketAddr::new(ip, wp.hbone_port),
        authority,
        identities: vec![wl.identity.clone()],
        workload: Some(wl),
        service,
    })
}

/// Decides the route for a connection from `src` to `dst`.
pub fn resolve(
    state: &State,
    network: &str,
    hbone_port: u16,
    src: &Workload,
    dst: SocketAddr,
) -> Result<Route, RouteError> {
    let is_waypoint_of_self = |wp: &GatewayAddress| match &wp.destination {
        GatewayDestination::Address { ip, .. } => src.addresses.contains(ip),
        GatewayDestination::Hostname { .. } => false,
    };
    match state.lookup(network, dst.ip()) {
        None if state.registry_only(&src.uid) => Err(RouteError::NotRegistered(dst)),
        None => Ok(Route::Passthrough(dst)),
        Some(Destination::Service(svc)) => {
            if let Some(wp) = svc.waypoint.as_ref().filter(|wp| !is_waypoint_of_self(wp)) {
                return waypoint_route(state, src, network, wp, dst, Some(svc.clone()));
            }
            service_route(state, src, hbone_port, svc, dst)
        }
        Some(Destination::Workload(wl)) => {
            if let Some(wp) = wl.waypoint.as_ref().filter(|wp| !is_waypoint_of_self(wp)) {
                return waypoint_route(state, src, network, wp, dst, None);
            }
            Ok(match wl.tunnel {
                Tunnel::Hbone => Route::Hbone {
                    endpoint: SocketAddr::new(dst.ip(), hbone_port),
                    authority: dst,
                    identities: vec![wl.identity.clone()],
                    workload: Some(wl),
                    service: None,
                },
                Tunnel::None => Route::Plain {
                    addr: dst,
                    workload: Some(wl),
                    service: None,
                },
            })
        }
    }
}

/// The route to a service without a waypoint (or whose waypoint is the client itself): the
/// dialled address for a passthrough ServiceEntry, else one of its closest healthy reachable
/// endpoints, over HBONE when that endpoint speaks it (through its network's gateway when on
/// another network).
fn service_route(
    state: &State,
    src: &Workload,
    hbone_port: u16,
    svc: Arc<Service>,
    dst: SocketAddr,
) -> Result<Route, RouteError> {
    if !svc.ports.iter().any(|p| p.service_port == dst.port()) {
        return Err(RouteError::NoPort(svc.key(), dst.port()));
    }
    if state.passthrough(&svc) {
        // ServiceEntry `resolution: NONE`: the dialled address is the endpoint.
        return Ok(Route::Plain {
            addr: dst,
            workload: None,
            service: Some(svc),
        });
    }
    let mut endpoints = state.endpoints(&svc);
    endpoints.retain(|w| super::double_hbone::reachable(state, &src.network, w));
    // Locality (`load_balancing`): the closest healthy endpoints, as Istio's ztunnel.
    let endpoints = state
        .closest(&svc, src, endpoints)
        .map_err(|_| RouteError::OutOfLocality(svc.key()))?;
    let wl = endpoints
        .choose(&mut rand::thread_rng())
        .ok_or_else(|| RouteError::NoEndpoint(svc.key()))?;
    if super::double_hbone::needs_gateway(state, &src.network, wl) {
        return super::double_hbone::route(state, wl, &svc, dst);
    }
    let target = wl
        .target_port(&svc, dst.port())
        .ok_or_else(|| RouteError::NoPort(svc.key(), dst.port()))?;
    if let (true, Tunnel::None, Some(host)) = (wl.addresses.is_empty(), wl.tunnel, state.workload_hostname(&wl.uid)) {
        return Ok(Route::Resolve {
            host: host.to_owned(),
            port: target,
            workload: Some(wl.clone()),
            service: Some(svc),
        });
    }
    let ip = wl
        .address_like(dst.ip())
        .ok_or_else(|| RouteError::NoAddress(wl.uid.clone()))?;
    let target = SocketAddr::new(ip, target);
    Ok(match wl.tunnel {
        Tunnel::Hbone => {
            let mut identities = vec![wl.identity.clone()];
            identities.extend(svc.subject_alt_names.iter().cloned());
            Route::Hbone {
                endpoint: SocketAddr::new(ip, hbone_port),
                authority: target,
                identities,
                workload: Some(wl.clone()),
                service: Some(svc),
            }
        }
        Tunnel::None => Route::Plain {
            addr: target,
            workload: Some(wl.clone()),
            service: Some(svc),
        },
    })
}

/// Accepts captured connections until drained, at most as many as the outbound bound allows
/// (per source workload address and in total, see [`super::ListenerLimits`]).
pub async fn serve(px: Arc<Proxy>, listener: TcpListener) {
    let limits = px.limits.outbound.clone();
    super::accept_loop(px, listener, "outbound", limits, handle).await
}

fn baggage(w: &Workload) -> String {
    format!(
        "k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        w.namespace, w.name, w.canonical_name, w.canonical_revision
    )
}

/// `_slot` is the connection's place in the outbound bound, held until it ends.
pub(super) async fn handle(px: Arc<Proxy>, mut tcp: TcpStream, peer: SocketAddr, _slot: PendingGuard) {
    let Some((src, dst, route)) = admit(&px, &tcp, peer) else {
        return;
    };
    let (labels, hbone_addr) = labels(&src, &route);
    let record = ConnRecord::open(&px.metrics, labels, "outbound", peer, dst, hbone_addr);
    let ends = Ends { peer, dst, src: &src };
    // Set-up is boxed and freed once done: the task then holds only what the splice needs (a
    // task's size is fixed by its largest wait, and thousands of idle connections hold one).
    let stream = match Box::pin(forward(&px, &mut tcp, ends, route, &record)).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return record.finish(Ok(())),
        Err(e) => return record.finish(Err(e)),
    };
    let result = stream
        .splice_tcp_observed(&mut tcp, record.bytes().tunnel_to_destination())
        .await;
    record.finish(result.map(drop).map_err(ConnError::from));
}

/// Where a captured connection goes, or None (logged and counted) when it must be refused:
/// not redirected, to ztunnel itself, from an unknown workload, or with no route.
fn admit(px: &Proxy, tcp: &TcpStream, peer: SocketAddr) -> Option<(Arc<Workload>, SocketAddr, Route)> {
    let dst = match original_dst(tcp) {
        Ok(d) => d,
        Err(e) => {
            debug!(error = %e, "no original destination; connection was not redirected");
            px.metrics.refuse(Refusal::NoOriginalDst);
            return None;
        }
    };
    if px.is_loop(dst) {
        warn!(%peer, %dst, "refusing connection to ztunnel's own port");
        px.metrics.refuse(Refusal::Loop);
        return None;
    }
    let src = match px.local_workload(peer, Refusal::UnknownSource) {
        Ok(src) => src,
        Err(refusal) => {
            // Without a known source there is no identity to present: fail closed.
            warn!(%peer, %dst, %refusal, "outbound connection refused");
            px.metrics.refuse(refusal);
            return None;
        }
    };
    let state = px.state.load();
    match resolve(&state, &px.network, px.hbone_port, &src, dst) {
        Ok(route) => Some((src, dst, route)),
        Err(e) => {
            warn!(%peer, %dst, error = %e, "no route");
            px.metrics.refuse(e.refusal());
            None
        }
    }
}

/// The connection's metric labels (source side) and the HBONE address it is tunnelled to.
fn labels(src: &Workload, route: &Route) -> (TcpLabels, Option<SocketAddr>) {
    let (workload, service, mtls) = match route {
        Route::Hbone { workload, service, .. } | Route::DoubleHbone { workload, service, .. } => {
            (workload.as_deref(), service.as_deref(), true)
        }
        Route::Plain { workload, service, .. } | Route::Resolve { workload, service, .. } => {
            (workload.as_deref(), service.as_deref(), false)
        }
        Route::Passthrough(_) => (None, None, false),
    };
    let labels = TcpLabels::new(
        Reporter::source,
        Some(src),
        Some(&src.identity),
        workload,
        service,
        mtls,
    );
    let hbone_addr = match route {
        Route::Hbone { endpoint, .. } => Some(*endpoint),
        Route::DoubleHbone { gateway, .. } => Some(*gateway),
        _ => None,
    };
    (labels, hbone_addr)
}

/// A captured connection's ends: the client's address, where it was going, and its workload.
struct Ends<'a> {
    peer: SocketAddr,
    dst: SocketAddr,
    src: &'a Workload,
}

/// The tunnel the connection's route takes, or `None` once a plain route has carried it until
/// either side closed.
async fn forward(
    px: &Proxy,
    tcp: &mut TcpStream,
    Ends { peer, dst, src }: Ends<'_>,
    route: Route,
    record: &ConnRecord<'_>,
) -> Result<Option<H2Stream>, ConnError> {
    let tunnel = match route {
        Route::Hbone {
            endpoint,
            authority,
            mut identities,
            ..
        } => {
            identities.sort();
            identities.dedup();
            let req = TunnelRequest {
                key: PoolKey {
                    src_identity: src.identity.clone(),
                    dst_identities: identities,
                    src_ip: Some(peer.ip()),
                    dst: endpoint,
                },
                authority: authority.to_string(),
                forwarded_for: Some(peer),
                baggage: Some(baggage(src)),
                traceparent: None,
            };
            Box::pin(px.pool.connect(&req)).await
        }
        Route::DoubleHbone {
            gateway,
            gateway_identities,
            authority,
            identities,
            ..
        } => {
            let req = double_request(src, peer, gateway, gateway_identities, authority, identities);
            Box::pin(px.pool.connect_double(&req)).await
        }
        Route::Plain { addr, .. } | Route::Passthrough(addr) => {
            return Box::pin(plain(px, tcp, addr, record.bytes())).await.map(|()| None);
        }
        Route::Resolve { host, port, .. } => {
            let addr = resolve_host(&px.metrics, &host, port, dst, px.settings.connect_timeout).await?;
            return Box::pin(plain(px, tcp, addr, record.bytes())).await.map(|()| None);
        }
    };
    tunnel.map(Some).map_err(ConnError::from)
}

/// The double-HBONE tunnel for a connection from `peer` (workload `src`): outer to `gateway`
/// (pooled per source and gateway), inner to the destination, both naming `authority`.
fn double_request(
    src: &Workload,
    peer: SocketAddr,
    gateway: SocketAddr,
    mut gateway_identities: Vec<Identity>,
    authority: String,
    mut identities: Vec<Identity>,
) -> mesh_core::hbone::DoubleTunnelRequest {
    gateway_identities.sort();
    gateway_identities.dedup();
    identities.sort();
    identities.dedup();
    mesh_core::hbone::DoubleTunnelRequest {
        outer: TunnelRequest {
            key: PoolKey {
                src_identity: src.identity.clone(),
                dst_identities: gateway_identities,
                src_ip: Some(peer.ip()),
                dst: gateway,
            },
            authority: authority.clone(),
            forwarded_for: Some(peer),
            baggage: Some(baggage(src)),
            traceparent: None,
        },
        inner_identities: identities,
        inner_authority: authority,
    }
}

/// `host:port` through the system resolver, a routable address of `dst`'s family first
/// ([`pick_routable`]); a name resolving to unroutable addresses only is refused, counted in
/// `metrics` as [`Refusal::UnroutableEndpoint`].
async fn resolve_host(
    metrics: &Metrics,
    host: &str,
    port: u16,
    dst: SocketAddr,
    timeout: std::time::Duration,
) -> Result<SocketAddr, ConnError> {
    let err = |e: std::io::Error| ConnError::Resolve(host.to_owned(), e);
    let found: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
        .map_err(err)?
        .collect();
    let picked = pick_routable(host, &found, dst);
    if let Err(ConnError::Unroutable { addr, class, .. }) = &picked {
        warn!(host, %addr, %class, "{}", Refusal::UnroutableEndpoint);
        metrics.refuse(Refusal::UnroutableEndpoint);
    }
    picked
}

/// The address to dial among those `host` resolved to: the first routable one of `dst`'s
/// family, else the first routable one; never an [`Unroutable`] one, even beside routable
/// ones ([`ConnError::Unroutable`] when there is no other).
fn pick_routable(host: &str, found: &[SocketAddr], dst: SocketAddr) -> Result<SocketAddr, ConnError> {
    let routable = || found.iter().filter(|a| Unroutable::of(a.ip()).is_none());
    if let Some(addr) = routable()
        .find(|a| a.is_ipv4() == dst.is_ipv4())
        .or_else(|| routable().next())
    {
        return Ok(*addr);
    }
    match found
        .iter()
        .find_map(|a| Unroutable::of(a.ip()).map(|class| (a.ip(), class)))
    {
        Some((addr, class)) => Err(ConnError::Unroutable {
            host: host.to_owned(),
            addr,
            class,
        }),
        None => Err(ConnError::Resolve(
            host.to_owned(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        )),
    }
}

async fn plain(px: &Proxy, tcp: &mut TcpStream, addr: SocketAddr, bytes: &ConnBytes) -> Result<(), ConnError> {
    let sock = px.sockets.tcp_socket(addr)?;
    let mut upstream = tokio::time::timeout(px.settings.connect_timeout, sock.connect(addr))
        .await
        .map_err(|_| ConnError::ConnectTimeout(addr))?
        .map_err(|e| ConnError::Connect(addr, e))?;
    let mut client = CountedClient { inner: tcp, bytes };
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 64 * 1024, 64 * 1024)
        .await
        .map(drop)
        .map_err(ConnError::from)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use mesh_core::state::{PortMapping, Service, State, Tunnel, Workload};

    use super::*;

    fn workload(name: &str, ip: &str, tunnel: Tunnel, svc: Option<(&str, u16, u16)>) -> Workload {
        Workload {
            uid: format!("c//Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            addresses: vec![ip.parse().unwrap()],
            network: String::new(),
            tunnel,
            identity: Identity::new("", "default", name).unwrap(),
            waypoint: None,
            node: "n".into(),
            canonical_name: name.into(),
            canonical_revision: "v1".into(),
            workload_name: name.into(),
            services: svc
                .map(|(k, sp, tp)| {
                    vec![(
                        k.to_owned(),
                        vec![PortMapping {
                            service_port: sp,
                            target_port: tp,
                        }],
                    )]
                })
                .unwrap_or_default(),
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
        }
    }

    fn service(vip: &str, waypoint: Option<GatewayAddress>) -> Service {
        Service {
            name: "web".into(),
            namespace: "default".into(),
            hostname: "web.default.svc.cluster.local".into(),
            vips: vec![(String::new(), vip.parse().unwrap())],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
            subject_alt_names: vec![],
            waypoint,
            only_healthy: true,
        }
    }

    const SVC: &str = "default/web.default.svc.cluster.local";

    fn state() -> (State, Workload) {
        let mut s = State::default();
        let client = workload("client", "10.0.0.1", Tunnel::Hbone, None);
        s.upsert_workload(client.clone());
        s.upsert_workload(workload("web", "10.0.0.2", Tunnel::Hbone, Some((SVC, 80, 9090))));
        s.upsert_workload(workload("legacy", "10.0.0.3", Tunnel::None, None));
        s.upsert_service(service("10.96.0.1", None));
        (s, client)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn vip_goes_to_an_endpoint_on_its_target_port() {
        let (s, client) = state();
        match resolve(&s, "", 15008, &client, sa("10.96.0.1:80")).unwrap() {
            Route::Hbone {
                endpoint,
                authority,
                identities,
                ..
            } => {
                assert_eq!(endpoint, sa("10.0.0.2:15008"));
                // The workload's own mapping (9090) wins over the service's (8080).
                assert_eq!(authority, sa("10.0.0.2:9090"));
                assert_eq!(identities[0].service_account, "web");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            resolve(&s, "", 15008, &client, sa("10.96.0.1:81")),
            Err(RouteError::NoPort(..))
        ));
    }

    #[test]
    fn workloads_unknown_and_plain_destinations() {
        let (s, client) = state();
        assert!(matches!(
            resolve(&s, "", 15008, &client, sa("10.0.0.2:7000")).unwrap(),
            Route::Hbone { endpoint, authority, .. } if endpoint == sa("10.0.0.2:15008") && authority == sa("10.0.0.2:7000")
        ));
        assert!(
            matches!(resolve(&s, "", 15008, &client, sa("10.0.0.3:80")).unwrap(), Route::Plain { addr, .. } if addr == sa("10.0.0.3:80"))
        );
        assert!(
            matches!(resolve(&s, "", 15008, &client, sa("192.0.2.1:443")).unwrap(), Route::Passthrough(a) if a == sa("192.0.2.1:443"))
        );
    }

    /// REGISTRY_ONLY (the source workload's extension): an address nobody registered is
    /// refused, registered ones (workloads, service VIPs) still route; ALLOW_ANY passes through.
    #[test]
    fn registry_only_refuses_unregistered_destinations() {
        use mesh_proto::workload as pb;
        let (mut s, client) = state();
        let unknown = sa("192.0.2.1:443");
        assert!(matches!(
            resolve(&s, "", 15008, &client, unknown).unwrap(),
            Route::Passthrough(_)
        ));
        let marked = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: client.uid.clone(),
                name: client.name.clone(),
                namespace: client.namespace.clone(),
                addresses: vec![vec![10, 0, 0, 1]],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                extensions: vec![mesh_core::state::registry_only_extension()],
                ..Default::default()
            })),
        };
        s.apply_address(&marked).unwrap();
        let err = resolve(&s, "", 15008, &client, unknown).expect_err("not registered");
        assert!(matches!(err, RouteError::NotRegistered(a) if a == unknown), "{err}");
        assert_eq!(err.refusal().as_str(), "not_registered");
        assert!(err.to_string().contains("REGISTRY_ONLY"), "{err}");
        assert!(matches!(
            resolve(&s, "", 15008, &client, sa("10.96.0.1:80")).unwrap(),
            Route::Hbone { .. }
        ));
        assert!(matches!(
            resolve(&s, "", 15008, &client, sa("10.0.0.3:80")).unwrap(),
            Route::Plain { .. }
        ));
        // Another workload without the extension is not affected.
        let legacy = s.workload_by_ip("", "10.0.0.3".parse().unwrap()).unwrap().clone();
        assert!(matches!(
            resolve(&s, "", 15008, &legacy, unknown).unwrap(),
            Route::Passthrough(_)
        ));
    }

    /// A DNS ServiceEntry's endpoint known by name: ztunnel resolves it per connection.
    #[test]
    fn endpoints_known_by_name_are_resolved_by_ztunnel() {
        use mesh_proto::workload as pb;
        let (mut s, client) = state();
        let key = "default/api.example.com";
        let entry = pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "ext".into(),
                namespace: "default".into(),
                hostname: "api.example.com".into(),
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vec![240, 240, 1, 1],
                }],
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
                ..Default::default()
            })),
        };
        let endpoint = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: "c/networking.istio.io/ServiceEntry/default/ext/api.example.com".into(),
                name: "ext".into(),
                namespace: "default".into(),
                hostname: "api.example.com".into(),
                services: [(
                    key.to_owned(),
                    pb::PortList {
                        ports: vec![pb::Port {
                            service_port: 80,
                            target_port: 8080,
                            app_protocol: 0,
                        }],
                    },
                )]
                .into(),
                ..Default::default()
            })),
        };
        s.apply_address(&entry).unwrap();
        s.apply_address(&endpoint).unwrap();
        match resolve(&s, "", 15008, &client, sa("240.240.1.1:80")).unwrap() {
            Route::Resolve { host, port, .. } => assert_eq!((host.as_str(), port), ("api.example.com", 8080)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn names_resolve_to_the_destination_family() {
        let timeout = std::time::Duration::from_secs(5);
        let metrics = Metrics::default();
        let got = resolve_host(&metrics, "192.0.2.10", 8080, sa("240.240.1.1:80"), timeout).await;
        assert_eq!(got.ok(), Some(sa("192.0.2.10:8080")));
        let err = resolve_host(&metrics, "no-such-host.invalid", 80, sa("240.240.1.1:80"), timeout)
            .await
            .expect_err("does not resolve");
        assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
        assert_eq!(refused(&metrics, "unroutable_endpoint"), 0);
        let found = [sa("[2001:db8::1]:80"), sa("192.0.2.10:80")];
        assert_eq!(pick_routable("h", &found, sa("10.0.0.1:80")).ok(), Some(found[1]));
        assert_eq!(pick_routable("h", &found, sa("[fd00::1]:80")).ok(), Some(found[0]));
    }

    fn refused(metrics: &Metrics, reason: &'static str) -> u64 {
        let labels = crate::metrics::ReasonLabels { reason };
        metrics.refused.get_or_create(&labels).get()
    }

    /// A name-only endpoint resolving to loopback (`localhost`: ztunnel's own host) is refused
    /// before any dial and counted; beside a routable address, that one is dialled instead,
    /// whatever the family; the metadata server and mapped loopback are refused too.
    #[tokio::test]
    async fn names_resolving_to_unroutable_addresses_are_refused() {
        let timeout = std::time::Duration::from_secs(5);
        let metrics = Metrics::default();
        let err = resolve_host(&metrics, "localhost", 15000, sa("240.240.1.1:80"), timeout)
            .await
            .expect_err("localhost is loopback");
        assert!(
            matches!(
                err,
                ConnError::Unroutable {
                    class: Unroutable::Loopback,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("localhost resolved to "), "{err}");
        assert_eq!(refused(&metrics, "unroutable_endpoint"), 1);

        let mixed = [sa("127.0.0.1:80"), sa("[::1]:80"), sa("198.51.100.7:80")];
        assert_eq!(pick_routable("h", &mixed, sa("[fd00::1]:80")).ok(), Some(mixed[2]));
        for only in [
            "169.254.169.254:80",
            "[::ffff:127.0.0.1]:80",
            "0.0.0.0:80",
            "[fe80::1]:80",
        ] {
            let got = pick_routable("h", &[sa(only)], sa("10.0.0.1:80"));
            assert!(matches!(got, Err(ConnError::Unroutable { .. })), "{only}: {got:?}");
        }
    }

    /// A ServiceEntry with `resolution: NONE` (load balancing PASSTHROUGH): its address is
    /// registered, and the connection goes to the dialled address itself, on a declared port.
    #[test]
    fn passthrough_services_connect_to_the_dialled_address() {
        use mesh_proto::workload as pb;
        let (mut s, client) = state();
        let entry = pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "ext".into(),
                namespace: "default".into(),
                hostname: "api.example.com".into(),
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vec![198, 51, 100, 7],
                }],
                ports: vec![pb::Port {
                    service_port: 443,
                    target_port: 443,
                    app_protocol: 0,
                }],
                load_balancing: Some(pb::LoadBalancing {
                    mode: pb::load_balancing::Mode::Passthrough as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        s.apply_address(&entry).unwrap();
        match resolve(&s, "", 15008, &client, sa("198.51.100.7:443")).unwrap() {
            Route::Plain { addr, service, .. } => {
                assert_eq!(addr, sa("198.51.100.7:443"));
                assert_eq!(service.unwrap().hostname, "api.example.com");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            resolve(&s, "", 15008, &client, sa("198.51.100.7:80")),
            Err(RouteError::NoPort(..))
        ));
    }

    #[test]
    fn waypoint_gets_the_original_vip_as_authority() {
        let (mut s, client) = state();
        s.upsert_workload(workload("waypoint", "10.0.0.9", Tunnel::Hbone, None));
        let wp = GatewayAddress {
            destination: GatewayDestination::Address {
                network: String::new(),
                ip: "10.0.0.9".parse::<IpAddr>().unwrap(),
            },
            hbone_port: 15008,
        };
        s.upsert_service(service("10.96.0.1", Some(wp)));
        match resolve(&s, "", 15008, &client, sa("10.96.0.1:80")).unwrap() {
            Route::Hbone {
                endpoint,
                authority,
                identities,
                ..
            } => {
                assert_eq!(endpoint, sa("10.0.0.9:15008"));
                assert_eq!(authority, sa("10.96.0.1:80"));
                assert_eq!(identities[0].service_account, "waypoint");
            }
            other => panic!("{other:?}"),
        }
        // A port the service does not declare is refused here, not sent to the waypoint.
        for vip in ["10.96.0.1:8080", "10.96.0.1:9090"] {
            assert!(matches!(
                resolve(&s, "", 15008, &client, sa(vip)),
                Err(RouteError::NoPort(..))
            ));
        }
        // The waypoint itself is not sent back to itself.
        let waypoint = s.workload_by_ip("", "10.0.0.9".parse().unwrap()).unwrap().clone();
        assert!(matches!(
            resolve(&s, "", 15008, &waypoint, sa("10.96.0.1:80")).unwrap(),
            Route::Hbone { endpoint, .. } if endpoint == sa("10.0.0.2:15008")
        ));
    }

    #[test]
    fn unhealthy_endpoints_and_missing_waypoints_fail_closed() {
        let (mut s, client) = state();
        let mut sick = workload("web", "10.0.0.2", Tunnel::Hbone, Some((SVC, 80, 9090)));
        sick.healthy = false;
        s.upsert_workload(sick);
        assert!(matches!(
            resolve(&s, "", 15008, &client, sa("10.96.0.1:80")),
            Err(RouteError::NoEndpoint(_))
        ));
        let gone = GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "default".into(),
                hostname: "missing".into(),
            },
            hbone_port: 15008,
        };
        s.upsert_service(service("10.96.0.1", Some(gone)));
        let err = resolve(&s, "", 15008, &client, sa("10.96.0.1:80")).expect_err("missing waypoint");
        assert!(
            matches!(
                &err,
                RouteError::Waypoint {
                    why: WaypointUnavailable::Unknown,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.refusal().as_str(), "waypoint_unavailable");
        assert!(err.to_string().contains("default/missing"), "{err}");
    }

    #[test]
    fn waypoints_without_a_healthy_endpoint_fail_closed() {
        let (mut s, client) = state();
        // By address: the waypoint's own (unhealthy) workload.
        let mut sick = workload("waypoint", "10.0.0.9", Tunnel::Hbone, None);
        sick.healthy = false;
        s.upsert_workload(sick);
        let by_ip = GatewayAddress {
            destination: GatewayDestination::Address {
                network: String::new(),
                ip: "10.0.0.9".parse::<IpAddr>().unwrap(),
            },
            hbone_port: 15008,
        };
        s.upsert_service(service("10.96.0.1", Some(by_ip)));
        assert!(matches!(
            resolve(&s, "", 15008, &client, sa("10.96.0.1:80")),
            Err(RouteError::Waypoint {
                why: WaypointUnavailable::NoHealthyEndpoint,
                ..
            })
        ));
        // By hostname: a waypoint Service with no endpoint yet (its pods not ready).
        let mut wp_svc = service("10.96.0.50", None);
        wp_svc.name = "wp".into();
        wp_svc.hostname = "wp.default.svc.cluster.local".into();
        let key = wp_svc.key();
        s.upsert_service(wp_svc);
        let by_name = GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "default".into(),
                hostname: "wp.default.svc.cluster.local".into(),
            },
            hbone_port: 15008,
        };
        s.upsert_service(service("10.96.0.1", Some(by_name)));
        let err = resolve(&s, "", 15008, &client, sa("10.96.0.1:80")).expect_err("no endpoint");
        assert!(
            matches!(
                err,
                RouteError::Waypoint {
                    why: WaypointUnavailable::NoHealthyEndpoint,
                    ..
                }
            ),
            "{err} ({key})"
        );
    }

    /// `load_balancing` FAILOVER (PreferClose): the endpoint in the client's zone while it is
    /// healthy, the other zone when it is not; STRICT with no endpoint in scope is refused
    /// with its own reason rather than sent elsewhere.
    #[test]
    fn locality_prefers_the_clients_zone_and_strict_refuses() {
        use mesh_proto::workload as pb;
        use pb::load_balancing::{Mode, Scope};
        let svc = |mode: Mode| pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "web".into(),
                namespace: "default".into(),
                hostname: "web.default.svc.cluster.local".into(),
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 1],
                }],
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
                load_balancing: Some(pb::LoadBalancing {
                    routing_preference: [Scope::Network, Scope::Region, Scope::Zone].map(|s| s as i32).to_vec(),
                    mode: mode as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let wl = |uid: &str, ip: u8, zone: &str, healthy: bool| pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "default".into(),
                addresses: vec![vec![10, 0, 1, ip]],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                locality: Some(pb::Locality {
                    region: "r".into(),
                    zone: zone.into(),
                    subzone: String::new(),
                }),
                status: if healthy { 0 } else { 1 },
                services: [(SVC.to_owned(), pb::PortList::default())].into(),
                ..Default::default()
            })),
        };
        let mut s = State::default();
        for a in [svc(Mode::Failover), wl("near", 2, "a", true), wl("far", 3, "b", true)] {
            s.apply_address(&a).unwrap();
        }
        let mut client = wl("client", 1, "a", true);
        if let Some(pb::address::Type::Workload(w)) = client.r#type.as_mut() {
            w.services.clear(); // the client is no endpoint of the service
        }
        s.apply_address(&client).unwrap();
        let client = s.workload("client").unwrap().as_ref().clone();
        let chosen = |s: &State| match resolve(s, "", 15008, &client, sa("10.96.0.1:80")) {
            Ok(Route::Hbone { endpoint, .. }) => Ok(endpoint),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.refusal()),
        };
        // Never the far one while the near one is healthy.
        for _ in 0..32 {
            assert_eq!(chosen(&s), Ok(sa("10.0.1.2:15008")));
        }
        s.apply_address(&wl("near", 2, "a", false)).unwrap();
        assert_eq!(chosen(&s), Ok(sa("10.0.1.3:15008")), "fails over to the other zone");
        s.apply_address(&svc(Mode::Strict)).unwrap();
        assert_eq!(chosen(&s), Err(Refusal::NoLocalEndpoint));
        s.apply_address(&wl("near", 2, "a", true)).unwrap();
        assert_eq!(chosen(&s), Ok(sa("10.0.1.2:15008")));
    }
}
