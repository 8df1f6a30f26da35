//! A TCP connection both roles proxy once it is decided (a waypoint's TCP to a service or a
//! workload, an ingress TCPRoute or TLS passthrough): its bytes spliced to the upstream until
//! both ends are done or it idles past the backend's timeout ([`crate::idle::splice`]), its
//! `istio_tcp_*` series as Istio's waypoint and gateway report them (opened; bytes while they
//! move; closed; a connection whose upstream could not be reached with `UF`, as Envoy counts
//! it), and its access line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::state::model::{Service, Workload};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use crate::http::local_reply::ResponseFlag;
use crate::idle::{self, SpliceEnd, Spliced};
use crate::telemetry::metrics::{IdleConnection, TcpLabels, TcpSeries};
use crate::upstream::cluster::Cluster;
use crate::Waypoint;

/// Where a decided connection goes: the backend service, its cluster, the endpoint picked
/// and the address to dial (the endpoint, or the service's waypoint).
pub struct Backend {
    pub cluster: Arc<Cluster>,
    pub workload: Arc<Workload>,
    pub service: Arc<Service>,
    pub target: SocketAddr,
}

/// One proxied connection, as its metrics and access line name it.
pub struct Flow<'a> {
    pub labels: TcpLabels,
    /// The backend's TCP idle timeout (`None`: none).
    pub idle: Option<Duration>,
    pub src_addr: SocketAddr,
    /// The client's identity at a waypoint; `-` at an ingress (clients outside the mesh).
    pub src_identity: &'a str,
    pub dst_addr: SocketAddr,
    /// Bytes already sent upstream before the splice (a ClientHello read for its SNI).
    pub already_sent: u64,
}

/// How a proxied connection ended, as its access line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Closed,
    IdleTimeout,
    Error,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Closed => "-",
            Ended::IdleTimeout => "idle_timeout",
            Ended::Error => "error",
        }
    }
}

/// Splices `down` to `up`, counted and logged as `flow`.
pub async fn proxy<D, U>(wp: &Waypoint, down: D, up: &mut U, flow: Flow<'_>)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Flow {
        labels,
        idle,
        src_addr,
        src_identity,
        dst_addr,
        already_sent,
    } = flow;
    // The series' handles and the one name the access line needs: a connection holds those
    // while it lives, not its two dozen label strings.
    let TcpSeries { bytes, closed } = wp.metrics.tcp_opened(&labels);
    let dst_service = labels.peers.destination_service;
    bytes.to_destination.inc_by(already_sent);
    let Spliced { sent, received, end } = idle::splice(down, up, idle, Some(bytes)).await;
    closed.inc();
    let sent = sent + already_sent;
    let ended = match end {
        SpliceEnd::Done(Ok(())) => Ended::Closed,
        SpliceEnd::Idle => {
            wp.metrics.idle_timeout(IdleConnection::Tcp);
            Ended::IdleTimeout
        }
        SpliceEnd::Done(Err(e)) => {
            debug!(error = %e, %dst_addr, "TCP proxy ended with an error");
            Ended::Error
        }
    };
    let reason = ended.as_str();
    info!(target: "access", %src_addr, src_identity, %dst_service, %dst_addr, sent, received, reason, "TCP connection");
}

/// Counts a connection whose upstream could not be reached: opened and closed with `UF`.
pub fn connect_failed(wp: &Waypoint, mut labels: TcpLabels) {
    labels.response_flags = ResponseFlag::UpstreamFailure.as_str();
    wp.metrics.tcp_opened(&labels).closed.inc();
}
