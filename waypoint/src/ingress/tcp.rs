//! TCP listeners of an ingress Gateway: each connection is decided by the Gateway's L4
//! authorization (no peer identity: the client is outside the mesh; `ipBlocks` and
//! `remoteIpBlocks` are its address), then sent to a weighted backend of the attached TCPRoute
//! (an endpoint picked by its cluster) through the connector — HBONE with the gateway's
//! identity to mesh endpoints — and the bytes are copied both ways until both ends are done or
//! the backend's TCP idle timeout passes without a byte ([`crate::tcp`]). TLS passthrough
//! ([`super::passthrough`]) forwards the same way once the SNI chose the TLSRoute.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::Ingress;
use crate::http::admission::pick_backend;
use crate::policy::authz::{self, ConnectionAttrs, Decision};
use crate::tcp::{Backend, Flow};
use crate::telemetry::metrics::RequestLabels;
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

/// A connection accepted on an ingress port.
pub struct Inbound {
    pub tcp: TcpStream,
    pub peer: SocketAddr,
    pub port: u16,
}

/// Serves one connection accepted on TCP listener `port`: its TCPRoute's table.
pub async fn serve(wp: Arc<Waypoint>, ingress: Arc<Ingress>, inbound: Inbound) {
    let table = ingress
        .current
        .load()
        .ports
        .get(&inbound.port)
        .and_then(|p| p.listeners.first())
        .and_then(|l| l.hosts.first())
        .map(|(_, t)| t.clone())
        .unwrap_or_default();
    forward(wp, ingress, inbound, &table, Vec::new()).await;
}

/// Forwards a connection by the L4 route of `table` (a TCPRoute's, or a TLSRoute's chosen by
/// SNI): `prefix` (bytes already read from the client) is sent first, then both directions
/// are copied.
pub async fn forward(wp: Arc<Waypoint>, ingress: Arc<Ingress>, inbound: Inbound, table: &str, prefix: Vec<u8>) {
    let Inbound { tcp, peer, port } = inbound;
    let to = match decide(&wp, &ingress, peer, port, table) {
        Ok(t) => t,
        Err(refused) => {
            wp.metrics.reject(refused.reason());
            info!(target: "access", src_addr = %peer, port, table, reason = %refused, "TCP connection refused");
            return;
        }
    };
    let labels = RequestLabels::from_gateway((&wp.identity, &wp.gateway), Some(&to.workload), &to.service, "tcp");
    let mut up = match wp.upstreams.connector.open(to.target).await {
        Ok(up) => up,
        Err(e) => {
            to.cluster.record(&to.workload.uid, None);
            crate::tcp::connect_failed(&wp, labels.into());
            warn!(error = %e, target = %to.target, "TCP upstream connect failed");
            return;
        }
    };
    to.cluster.record(&to.workload.uid, Some(http::StatusCode::OK));
    if let Err(e) = up.write_all(&prefix).await {
        debug!(error = %e, target = %to.target, "TCP upstream write failed");
        return;
    }
    let flow = Flow {
        labels: labels.into(),
        idle: to.cluster.tcp_idle_timeout(),
        src_addr: peer,
        src_identity: "-",
        dst_addr: to.target,
        already_sent: prefix.len() as u64,
    };
    // The ClientHello is upstream now: not held for the connection's life.
    drop(prefix);
    crate::tcp::proxy(&wp, tcp, &mut up, flow).await;
}

/// The decision for a connection: policy, then the backend and endpoint of `table`'s route.
fn decide(wp: &Waypoint, ingress: &Ingress, peer: SocketAddr, port: u16, table: &str) -> Result<Backend, Refused> {
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
    let route = snapshot
        .routes
        .get(table)
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
    // `istio.io/ingress-use-waypoint`: through the service's waypoint, as HTTP routes go.
    let target = ingress
        .waypoint_vip(&backend.service, &service, &wp.network, to_port)
        .unwrap_or(ep.target);
    Ok(Backend {
        cluster,
        workload,
        service,
        target,
    })
}
