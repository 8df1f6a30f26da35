//! `istio.io/ingress-use-waypoint`: an ingress gateway sends a labelled service's requests to
//! the service's waypoint instead of its pods, so the waypoint's routes and L7 policy apply.
//! The request is addressed to the service VIP; the connector opens an HBONE tunnel to a
//! waypoint endpoint with the VIP as authority (what a client's ztunnel would send), expecting
//! that endpoint's identity. A waypoint that is missing or has no healthy endpoint fails the
//! connection: never a quiet fallback straight to the pods, past the waypoint's policy. A
//! waypoint whose upstream is a VIP its own Gateway serves (a ServiceEntry whose endpoint is
//! its own VIP) is refused as a loop rather than dial itself.

use std::net::SocketAddr;

use mesh_core::identity::Identity;
use mesh_core::state::model::{GatewayDestination, Service};
use mesh_core::state::{Destination, State};
use rand::seq::SliceRandom;

/// Why a service's waypoint cannot be reached.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaypointError {
    #[error("service {0} names no waypoint")]
    None(String),
    #[error("waypoint {0} is unknown")]
    Unknown(String),
    #[error("waypoint {0} has no healthy endpoint")]
    NoEndpoint(String),
    /// The waypoint is the caller itself (its own identity): dialling it would loop.
    #[error("waypoint {0} is this proxy itself")]
    Loop(String),
}

/// The HBONE endpoint (`ip:hbone port`) and identity of a waypoint of `service`, for traffic
/// addressed to `authority`, sent by the proxy of identity `own`; a waypoint of that identity
/// (the proxy itself, or a replica of it) is a loop.
pub fn endpoint(
    state: &State,
    (network, own): (&str, &Identity),
    service: &Service,
    authority: SocketAddr,
) -> Result<(SocketAddr, Identity), WaypointError> {
    let wp = service
        .waypoint
        .as_ref()
        .ok_or_else(|| WaypointError::None(service.hostname.clone()))?;
    let name = match &wp.destination {
        GatewayDestination::Address { ip, .. } => ip.to_string(),
        GatewayDestination::Hostname { namespace, hostname } => format!("{namespace}/{hostname}"),
    };
    let pick = |svc: &Service| {
        state
            .endpoints(svc)
            .choose(&mut rand::thread_rng())
            .cloned()
            .ok_or_else(|| WaypointError::NoEndpoint(name.clone()))
    };
    let workload = match &wp.destination {
        GatewayDestination::Address { network: n, ip } => {
            let n = if n.is_empty() { network } else { n.as_str() };
            match state.lookup(n, *ip) {
                Some(Destination::Workload(w)) if w.healthy => w,
                Some(Destination::Workload(_)) => return Err(WaypointError::NoEndpoint(name)),
                Some(Destination::Service(s)) => pick(&s)?,
                None => return Err(WaypointError::Unknown(name)),
            }
        }
        GatewayDestination::Hostname { namespace, hostname } => {
            let svc = state
                .service(&format!("{namespace}/{hostname}"))
                .ok_or_else(|| WaypointError::Unknown(name.clone()))?;
            pick(svc)?
        }
    };
    if workload.identity == *own {
        return Err(WaypointError::Loop(name));
    }
    let ip = workload
        .address_like(authority.ip())
        .ok_or_else(|| WaypointError::NoEndpoint(name.clone()))?;
    Ok((SocketAddr::new(ip, wp.hbone_port), workload.identity.clone()))
}
