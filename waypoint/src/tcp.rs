//! A TCP connection both roles proxy once it is decided (a waypoint's TCP to a service or a
//! workload, an ingress TCPRoute or TLS passthrough): its bytes spliced to the upstream until
//! both ends are done or it idles past the backend's timeout ([`crate::idle::splice`]), its
//! `istio_tcp_*` series as Istio's waypoint and gateway report them (opened, bytes while
//! they move, closed), and its access line.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use crate::idle::{self, SpliceEnd, Spliced};
use crate::telemetry::metrics::TcpLabels;
use crate::Waypoint;

/// One proxied connection, as its metrics and access line name it.
pub struct Flow<'a> {
    pub labels: TcpLabels,
    /// The backend's TCP idle timeout (`None`: none).
    pub idle: Option<Duration>,
    pub src_addr: SocketAddr,
    /// The client's identity at a waypoint; `-` at an ingress (clients outside the mesh).
    pub src_identity: &'a str,
    pub dst_addr: SocketAddr,
    /// What already went upstream before the splice (a ClientHello read for its SNI).
    pub already_sent: &'a [u8],
}

/// Splices `down` to `up`, counted and logged as `flow`.
pub async fn proxy<D, U>(wp: &Waypoint, down: D, up: &mut U, flow: Flow<'_>)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let meter = wp.metrics.tcp_opened(&flow.labels);
    meter.sent.inc_by(flow.already_sent.len() as u64);
    let Spliced { sent, received, end } = idle::splice(down, up, flow.idle, Some(meter)).await;
    wp.metrics.tcp_closed(&flow.labels);
    let sent = sent + flow.already_sent.len() as u64;
    let (src_addr, src_identity, dst_addr) = (flow.src_addr, flow.src_identity, flow.dst_addr);
    let dst_service = flow.labels.destination_service.as_str();
    let reason = match end {
        SpliceEnd::Done(Ok(())) => "-",
        SpliceEnd::Idle => {
            wp.metrics.tcp_idle_timeouts.inc();
            "idle_timeout"
        }
        SpliceEnd::Done(Err(e)) => {
            debug!(error = %e, %dst_addr, "TCP proxy ended with an error");
            "error"
        }
    };
    info!(target: "access", %src_addr, src_identity, dst_service, %dst_addr, sent, received, reason, "TCP connection");
}
