//! TCP listeners of an ingress Gateway: each connection is decided by the Gateway's L4
//! authorization (no peer identity: the client is outside the mesh; `ipBlocks` and
//! `remoteIpBlocks` are its address), then sent to a weighted backend of the attached TCPRoute
//! (an endpoint picked by its cluster) through the connector — HBONE with the gateway's
//! identity to mesh endpoints — and the bytes are copied both ways.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::state::model::Workload;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::Ingress;
use crate::http::admission::pick_backend;
use crate::policy::authz::{self, ConnectionAttrs, Decision};
use crate::upstream::cluster::Cluster;
use crate::Waypoint;

/// Why a TCP connection was not forwarded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("denied by policy: {0}")]
    Denied(String),
    #[error("no TCPRoute attached to the listener")]
    NoRoute,
    #[error("no healthy backend")]
    NoBackend,
}

impl Refused {
    fn reason(&self) -> &'static str {
        match self {
            Refused::Denied(_) => "tcp_denied",
            Refused::NoRoute => "tcp_no_route",
            Refused::NoBackend => "tcp_no_backend",
        }
    }
}

/// Serves one TCP connection accepted on `port`.
pub async fn serve(wp: Arc<Waypoint>, ingress: Arc<Ingress>, mut tcp: TcpStream, peer: SocketAddr, port: u16) {
    let (cluster, workload, target) = match decide(&wp, &ingress, peer, port) {
        Ok(t) => t,
        Err(refused) => {
            wp.metrics.reject(refused.reason());
            info!(target: "access", src_addr = %peer, port, reason = %refused, "TCP connection refused");
            return;
        }
    };
    match wp.upstreams.connector.open(target).await {
        Ok(mut up) => {
            cluster.record(&workload.uid, Some(http::StatusCode::OK));
            match tokio::io::copy_bidirectional(&mut tcp, &mut up).await {
                Ok((sent, received)) => {
                    info!(target: "access", src_addr = %peer, dst_addr = %target, sent, received, "TCP connection")
                }
                Err(e) => debug!(error = %e, %target, "TCP proxy ended"),
            }
        }
        Err(e) => {
            cluster.record(&workload.uid, None);
            warn!(error = %e, %target, "TCP upstream connect failed");
        }
    }
}

/// The decision for a connection: policy, then the TCPRoute's backend and endpoint.
fn decide(
    wp: &Waypoint,
    ingress: &Ingress,
    peer: SocketAddr,
    port: u16,
) -> Result<(Arc<Cluster>, Arc<Workload>, SocketAddr), Refused> {
    let current = ingress.current.load();
    let snapshot = wp.config.load();
    let gateway = (ingress.gateway.0.as_str(), ingress.gateway.1.as_str());
    let attrs = ConnectionAttrs {
        source_principal: "",
        source_namespace: "",
        source_ip: peer.ip(),
        port,
    };
    if let Decision::Deny(why) = authz::evaluate_tcp(snapshot.policies_for(gateway, gateway), &attrs) {
        return Err(Refused::Denied(why));
    }
    let table = current
        .ports
        .get(&port)
        .and_then(|p| p.listeners.first())
        .and_then(|l| l.hosts.first())
        .map(|(_, t)| t.clone())
        .ok_or(Refused::NoRoute)?;
    let route = snapshot
        .routes
        .get(&table)
        .and_then(|r| r.tcp.as_ref())
        .ok_or(Refused::NoRoute)?;
    let backend = pick_backend(&route.backends).ok_or(Refused::NoBackend)?;
    let state = wp.state.load();
    let service = state.service(&backend.service).ok_or(Refused::NoBackend)?.clone();
    let to_port = u16::try_from(backend.port).ok().filter(|p| *p != 0).unwrap_or(port);
    let routes = snapshot.routes.get(&backend.service).map(|r| &r.config);
    let cluster = wp
        .upstreams
        .cluster(&backend.service, "", crate::upstream::effective_policy(routes, None));
    let endpoints = crate::upstream::candidates(&state, &service, None);
    let workload = cluster.pick(&endpoints).ok_or(Refused::NoBackend)?;
    let ep = crate::upstream::target(&workload, &service, to_port, peer.ip()).ok_or(Refused::NoBackend)?;
    Ok((cluster, workload, ep.target))
}
