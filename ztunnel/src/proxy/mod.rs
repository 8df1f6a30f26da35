//! The three proxy paths and what they share.
//!
//! - [`outbound`]: captured app connections (15001) -> HBONE, plain TCP or passthrough.
//! - [`inbound`]: HBONE (15008) -> authorize -> the local application.
//! - [`inbound_plain`]: plaintext redirected to 15006 -> authorize (no identity) -> the app.
//! - [`deliver`]: the inbound paths' shared authorize -> connect -> track -> splice.
//! - [`tracker`]: live connections, re-authorized whenever policy changes.
//! - [`local_addrs`]: which addresses belong to this proxy's network namespace.
//! - [`refusal`]: typed outcomes (why a connection was refused or ended), with their labels.
//! - [`source`]: which client address an inbound stream is attributed to (`forwarded`).

pub mod deliver;
pub mod double_hbone;
pub mod inbound;
pub mod inbound_plain;
pub mod local_addrs;
pub mod outbound;
pub mod owner;
pub mod refusal;
pub mod source;
pub mod tracker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::capture;
use mesh_core::hbone::{HbonePool, Settings};
use mesh_core::identity::CertManager;
use mesh_core::socket::SocketFactory;
use mesh_core::state::{StateStore, Workload};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use refusal::Refusal;

/// Everything a connection handler needs.
pub struct Proxy {
    pub network: String,
    /// Every port ztunnel listens on in this namespace (0 = unused): the loop guard's list.
    pub own_ports: [u16; 7],
    pub hbone_port: u16,
    pub state: Arc<StateStore>,
    pub certs: Arc<CertManager>,
    pub pool: Arc<HbonePool>,
    pub sockets: Arc<dyn SocketFactory>,
    pub settings: Settings,
    pub metrics: Metrics,
    pub local: local_addrs::LocalAddrs,
    /// Whose traffic this proxy carries: the local workload must be it.
    pub owner: owner::Owner,
    /// The addresses of ztunnel's own namespace (the node's in in-pod mode).
    pub node: local_addrs::LocalAddrs,
    pub tracker: tracker::ConnTracker,
    /// Cancelled on SIGTERM: stop accepting, GOAWAY HBONE connections.
    pub drain: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Connect to applications from the client's address.
    pub original_source: bool,
}

/// Ports the proxy listens on in each namespace it serves.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// The capture listeners the redirection rules send traffic to (the DNS proxy only in
    /// in-pod mode).
    pub capture: capture::Ports,
    pub ipv6: bool,
    /// Admin, metrics and readiness in dedicated mode, where they share the workloads'
    /// namespace. 0 = none.
    pub others: [u16; 3],
}

impl Ports {
    /// Every port ztunnel listens on in a served namespace (0 = unused slot).
    pub fn all(&self) -> [u16; 7] {
        let c = self.capture;
        let [a, b, d] = self.others;
        [c.outbound, c.inbound_plaintext, c.inbound, c.dns.unwrap_or(0), a, b, d]
    }
}

/// What every proxy instance shares: one in dedicated mode, one per pod in in-pod mode.
#[derive(Clone)]
pub struct Shared {
    pub network: String,
    pub ports: Ports,
    pub hbone_port: u16,
    pub state: Arc<StateStore>,
    pub certs: Arc<CertManager>,
    pub settings: Settings,
    pub metrics: Metrics,
    pub tracker: tracker::ConnTracker,
    /// The addresses of ztunnel's own namespace.
    pub node: local_addrs::LocalAddrs,
    /// Cancelled on SIGTERM; each proxy's own drain token is a child of it.
    pub drain: CancellationToken,
    pub tasks: TaskTracker,
    /// In-pod DNS proxy settings; `None` when it is off.
    pub dns: Option<Arc<DnsSettings>>,
    /// Connect to applications from the client's address (see `Config::enable_original_source`).
    pub original_source: bool,
}

/// The workloads one proxy serves: its namespace's addresses and whose they must be.
pub struct Served {
    pub addrs: local_addrs::LocalAddrs,
    pub owner: owner::Owner,
}

impl From<local_addrs::LocalAddrs> for Served {
    /// Every workload at these addresses (dedicated mode).
    fn from(addrs: local_addrs::LocalAddrs) -> Served {
        Served {
            addrs,
            owner: owner::Owner::Namespace,
        }
    }
}

/// What each pod's DNS proxy needs.
pub struct DnsSettings {
    pub port: u16,
    pub domain: String,
    pub upstreams: Arc<Vec<SocketAddr>>,
}

impl Proxy {
    /// A proxy for one network namespace, making its sockets with `sockets`, serving the
    /// workloads of `served` (its addresses and owner).
    pub fn new(shared: &Shared, sockets: Arc<dyn SocketFactory>, served: Served) -> Arc<Proxy> {
        let p = shared.ports;
        Arc::new(Proxy {
            network: shared.network.clone(),
            own_ports: p.all(),
            hbone_port: shared.hbone_port,
            state: shared.state.clone(),
            certs: shared.certs.clone(),
            pool: HbonePool::new(shared.settings.clone(), shared.certs.clone(), sockets.clone()),
            sockets,
            settings: shared.settings.clone(),
            metrics: shared.metrics.clone(),
            local: served.addrs,
            owner: served.owner,
            node: shared.node.clone(),
            tracker: shared.tracker.clone(),
            drain: shared.drain.child_token(),
            tasks: shared.tasks.clone(),
            original_source: shared.original_source,
        })
    }

    /// Binds the outbound, plaintext and HBONE listeners (IPv4, and IPv6 when enabled and
    /// available) and serves them until this proxy's drain token is cancelled.
    pub fn start(self: &Arc<Self>, ports: Ports) -> anyhow::Result<()> {
        use anyhow::Context;
        let bind = |port: u16, what: &str| -> anyhow::Result<Vec<TcpListener>> {
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
            let mut out = vec![self
                .sockets
                .tcp_listener(v4)
                .with_context(|| format!("binding {what} port {port}"))?];
            if ports.ipv6 {
                match self
                    .sockets
                    .tcp_listener(SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port))
                {
                    Ok(l) => out.push(l),
                    Err(e) => tracing::warn!(port, error = %e, "IPv6 {what} listener unavailable"),
                }
            }
            Ok(out)
        };
        // Bind everything before serving anything: a namespace is served fully or not at all.
        let outbound = bind(ports.capture.outbound, "outbound")?;
        let plaintext = bind(ports.capture.inbound_plaintext, "inbound plaintext")?;
        let hbone = bind(ports.capture.inbound, "inbound HBONE")?;
        for l in outbound {
            tokio::spawn(outbound::serve(self.clone(), l));
        }
        for l in plaintext {
            tokio::spawn(inbound_plain::serve(self.clone(), l));
        }
        for l in hbone {
            tokio::spawn(inbound::serve(self.clone(), l));
        }
        Ok(())
    }

    /// The local workload owning `addr`: `missing` when the address is not this namespace's
    /// or no workload holds it, [`Refusal::NotThisPod`] when the workload there is not the
    /// one this proxy serves ([`owner`]).
    pub fn local_workload(&self, addr: SocketAddr, missing: Refusal) -> Result<Arc<Workload>, Refusal> {
        if !self.local.contains(addr.ip()) {
            return Err(missing);
        }
        let state = self.state.load();
        let w = state.workload_by_ip(&self.network, addr.ip()).ok_or(missing)?;
        if !self.owner.owns(w) {
            return Err(Refusal::NotThisPod);
        }
        Ok(w.clone())
    }

    /// True when `dst` would loop back into one of our own listeners (proxy, DNS, and in
    /// dedicated mode admin, metrics and readiness): nobody reaches those through the mesh.
    pub fn is_loop(&self, dst: SocketAddr) -> bool {
        dst.port() != 0
            && self.own_ports.contains(&dst.port())
            && (self.local.contains(dst.ip()) || dst.ip().is_loopback())
    }

    /// True for an address of this namespace or of ztunnel's own (never a remote client's).
    pub fn is_own_address(&self, ip: std::net::IpAddr) -> bool {
        self.local.contains(ip) || self.node.contains(ip)
    }
}

/// Accepts on `listener` until drain, handing each connection to `handle` as a tracked task.
pub async fn accept_loop<F, Fut>(px: Arc<Proxy>, listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = mesh_core::socket::AcceptBackoff::default();
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
                backoff.succeeded();
                px.tasks.spawn(handle(px.clone(), tcp, peer));
            }
            Err(e) => {
                px.metrics.refuse(Refusal::AcceptError);
                tokio::select! {
                    _ = backoff.failed(what, &e) => {}
                    _ = px.drain.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod task_size_tests {
    use super::*;

    /// Size of the future `f` returns (what its task holds for the connection's life), without
    /// calling it.
    fn future_size<A, B, C, R>(_: &impl Fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    fn future_size2<A, B, R>(_: &impl Fn(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Each proxied connection is one task per side; an idle one holds its whole future, sized
    /// by its largest wait. Connection set-up (pool connect, dial, checks) is boxed and freed
    /// once done so the task holds only what the splice needs. tokio allocates a task as the
    /// future plus 112 bytes of header and trailer, rounded up to 128: release builds' futures
    /// of 648 and 776 bytes make 768- and 896-byte tasks, with tracking (they were 1,152 and 1,280 with the
    /// joined async splice and a cancellation token's wait). A debug build's futures are
    /// slightly larger, hence the slack.
    #[test]
    fn connection_tasks_stay_small() {
        let slack = if cfg!(debug_assertions) { 32 } else { 0 };
        let outbound = future_size(&outbound::handle);
        let inbound = future_size2(&inbound::stream);
        assert!(outbound <= 768 - 112 + slack, "outbound task {outbound} bytes");
        assert!(inbound <= 896 - 112 + slack, "inbound stream task {inbound} bytes");
    }
}
