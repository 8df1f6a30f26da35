//! The three proxy paths and what they share.
//!
//! - [`outbound`]: captured app connections (15001) -> HBONE, plain TCP or passthrough.
//! - [`inbound`]: HBONE (15008) -> authorize -> the local application.
//! - [`inbound_plain`]: plaintext redirected to 15006 -> authorize (no identity) -> the app.
//! - [`tracker`]: live connections, re-authorized whenever policy changes.
//! - [`local`]: which addresses belong to this proxy's network namespace.

pub mod inbound;
pub mod inbound_plain;
pub mod local;
pub mod outbound;
pub mod tracker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::hbone::{HbonePool, Settings};
use mesh_core::identity::CertManager;
use mesh_core::socket::SocketFactory;
use mesh_core::state::{StateStore, Workload};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Everything a connection handler needs.
pub struct Proxy {
    pub network: String,
    pub own_ports: [u16; 3],
    pub hbone_port: u16,
    pub state: Arc<StateStore>,
    pub certs: Arc<CertManager>,
    pub pool: Arc<HbonePool>,
    pub sockets: Arc<dyn SocketFactory>,
    pub settings: Settings,
    pub metrics: Metrics,
    pub local: local::LocalAddrs,
    pub tracker: tracker::ConnTracker,
    /// Cancelled on SIGTERM: stop accepting, GOAWAY HBONE connections.
    pub drain: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl Proxy {
    /// The local workload owning `addr`, if the address is one of this namespace's.
    pub fn local_workload(&self, addr: SocketAddr) -> Option<Arc<Workload>> {
        if !self.local.contains(addr.ip()) {
            return None;
        }
        self.state.load().workload_by_ip(&self.network, addr.ip()).cloned()
    }

    /// True when `dst` would loop back into one of our own listeners.
    pub fn is_loop(&self, dst: SocketAddr) -> bool {
        self.own_ports.contains(&dst.port()) && (self.local.contains(dst.ip()) || dst.ip().is_loopback())
    }
}

/// Accepts on `listener` until drain, handing each connection to `handle` as a tracked task.
pub async fn accept_loop<F, Fut>(px: Arc<Proxy>, listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = px.drain.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // Small writes (TLS records, HTTP/2 frames, request/response) must not wait for
                // Nagle and the peer's delayed ACK.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
                px.tasks.spawn(handle(px.clone(), tcp, peer));
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                px.metrics.refuse("accept_error");
            }
        }
    }
}
