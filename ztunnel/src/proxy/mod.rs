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
//!
//! Every listener admits a connection at accept, before any work for it: HBONE against
//! mesh-core's handshake bounds (held across the certificate fetch), outbound and plaintext
//! against [`ListenerLimits`] (per source address and in total, node-wide, for the
//! connection's whole life). One over a bound is closed at once and counted in
//! `ztunnel_connections_refused_total{reason}`, never queued.

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
use mesh_core::hbone::{HbonePool, Limit, LimitConfig, LimitObserver, PendingGuard, ServerLimits, Settings};
use mesh_core::identity::CertManager;
use mesh_core::log_limit::LogLimiter;
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
    /// Bounds on the connections the outbound and plaintext listeners hold (node-wide).
    pub limits: ListenerLimits,
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
    /// Bounds on the connections the outbound and plaintext listeners hold, for every pod.
    pub limits: ListenerLimits,
}

/// A capture listener whose connections [`ListenerLimits`] bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// 15001: connections a local workload makes.
    Outbound,
    /// 15006: plaintext connections to a local workload.
    Plaintext,
}

/// One listener's bound: connections held from one source address, and in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnBound {
    pub per_source: u32,
    pub total: u32,
}

/// What the outbound and plaintext listeners may hold, with mesh-core's [`ServerLimits`]
/// (its admission counts, per source address and in total; each connection keeps its slot
/// until it ends). One set for the whole ztunnel, so the bound is what the node can afford.
#[derive(Clone, Debug)]
pub struct ListenerLimits {
    pub outbound: Arc<ServerLimits>,
    pub plaintext: Arc<ServerLimits>,
}

impl ListenerLimits {
    /// The bounds, each bite counted in `metrics` as [`Refusal::Connections`].
    pub fn new(outbound: ConnBound, plaintext: ConnBound, metrics: &Metrics) -> Self {
        let make = |listener: Listener, bound: ConnBound| {
            let m = metrics.clone();
            let observer: LimitObserver = Arc::new(move |limit: Limit| {
                let per_source = limit == Limit::PendingPerSource;
                m.refuse(Refusal::Connections { listener, per_source })
            });
            let config = LimitConfig {
                max_pending: bound.total,
                max_pending_per_source: bound.per_source,
                ..LimitConfig::default()
            };
            Arc::new(ServerLimits::new(config, Some(observer)))
        };
        ListenerLimits {
            outbound: make(Listener::Outbound, outbound),
            plaintext: make(Listener::Plaintext, plaintext),
        }
    }
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
            limits: shared.limits.clone(),
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

/// Refused admissions are logged at most once a second: any client can make them happen.
static ADMISSION_REFUSED: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(std::time::Duration::from_secs(1)));

/// Accepts on `listener` until drain. Each connection is first admitted by `limits` (counted
/// per source address and in total; refused ones are closed at once, the observer counts
/// them), then handed with its slot to `handle` as a tracked task.
pub async fn accept_loop<F, Fut>(
    px: Arc<Proxy>,
    listener: TcpListener,
    what: &'static str,
    limits: Arc<ServerLimits>,
    handle: F,
) where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr, PendingGuard) -> Fut,
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
                backoff.succeeded();
                let slot = match limits.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(limit) => {
                        if let Some(suppressed) = ADMISSION_REFUSED.check(what) {
                            tracing::info!(%peer, listener = what, %limit, suppressed, "connection refused: over the bound");
                        }
                        continue; // `tcp` dropped: closed at once.
                    }
                };
                // Small writes (TLS records, HTTP/2 frames, request/response) must not wait for
                // Nagle and the peer's delayed ACK.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
                px.tasks.spawn(handle(px.clone(), tcp, peer, slot));
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
    fn future_size<A, B, C, D, R>(_: &impl Fn(A, B, C, D) -> R) -> usize {
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
    /// joined async splice and a cancellation token's wait). The outbound task also holds its
    /// place in the listener's bound (a 32-byte guard; 728 bytes in all in a debug build), which
    /// takes it to a 896-byte task. A debug build's futures are slightly larger, hence the slack.
    #[test]
    fn connection_tasks_stay_small() {
        let slack = if cfg!(debug_assertions) { 32 } else { 0 };
        let outbound = future_size(&outbound::handle);
        let inbound = future_size2(&inbound::stream);
        assert!(outbound <= 896 - 112 + slack, "outbound task {outbound} bytes");
        assert!(inbound <= 896 - 112 + slack, "inbound stream task {inbound} bytes");
    }
}

#[cfg(test)]
mod limit_tests {
    use std::collections::HashSet;
    use std::net::IpAddr;
    use std::time::Duration;

    use mesh_core::identity::ca::BoxFuture;
    use mesh_core::identity::{CaError, CertManagerConfig, CertificateSigner, Identity};
    use mesh_core::socket::PlainSockets;
    use mesh_core::state::Tunnel;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;
    use tokio::sync::mpsc;

    use super::*;
    use crate::metrics::ReasonLabels;

    /// A CA that never answers: certificates stay pending.
    struct SilentCa;

    impl CertificateSigner for SilentCa {
        fn sign<'a>(&'a self, _: &'a Identity, _: String, _: Duration) -> BoxFuture<'a, Result<Vec<String>, CaError>> {
            Box::pin(std::future::pending())
        }
    }

    fn workload(ip: &str) -> Workload {
        Workload {
            uid: "c//Pod/default/server".into(),
            name: "server".into(),
            namespace: "default".into(),
            addresses: vec![ip.parse().unwrap()],
            network: String::new(),
            tunnel: Tunnel::Hbone,
            identity: Identity::new("", "default", "server").unwrap(),
            waypoint: None,
            node: "n".into(),
            canonical_name: "server".into(),
            canonical_revision: "v1".into(),
            workload_name: "server".into(),
            services: vec![],
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
        }
    }

    /// A proxy serving a workload at 127.0.0.1 whose certificate never comes, with these
    /// listener bounds and HBONE handshake bounds.
    fn proxy(outbound: ConnBound, plaintext: ConnBound, hbone: LimitConfig) -> Arc<Proxy> {
        let metrics = Metrics::default();
        let state = StateStore::new();
        state.update(|s| s.upsert_workload(workload("127.0.0.1")));
        let shared = Shared {
            network: String::new(),
            ports: Ports {
                capture: capture::Ports::default(),
                ipv6: false,
                others: [0; 3],
            },
            hbone_port: 15008,
            state,
            certs: CertManager::new(Arc::new(SilentCa), vec![], CertManagerConfig::default()),
            settings: Settings {
                limits: Arc::new(ServerLimits::new(hbone, Some(hbone_observer(&metrics)))),
                ..Default::default()
            },
            limits: ListenerLimits::new(outbound, plaintext, &metrics),
            metrics,
            tracker: Default::default(),
            node: local_addrs::LocalAddrs::fixed(HashSet::new()),
            drain: CancellationToken::new(),
            tasks: TaskTracker::new(),
            dns: None,
            original_source: false,
        };
        let served = local_addrs::LocalAddrs::fixed(["127.0.0.1".parse().unwrap()].into());
        Proxy::new(&shared, Arc::new(PlainSockets::default()), served.into())
    }

    fn hbone_observer(metrics: &Metrics) -> LimitObserver {
        let m = metrics.clone();
        Arc::new(move |limit| m.refuse(Refusal::Limit(limit)))
    }

    fn refused(px: &Proxy, reason: &'static str) -> u64 {
        px.metrics.refused.get_or_create(&ReasonLabels { reason }).get()
    }

    /// A client from `src` to `addr`.
    async fn connect(src: &str, addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(src.parse().unwrap(), 0)).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// True when the proxy kept the connection (its handler said hello), false when it closed
    /// it at once (EOF or reset, no hello).
    async fn admitted(tcp: &mut TcpStream) -> bool {
        matches!(tcp.read(&mut [0u8; 1]).await, Ok(1))
    }

    /// A handler that says hello, holds the connection until the client closes, then gives
    /// back its slot and reports that it has.
    fn holding(
        done: mpsc::UnboundedSender<IpAddr>,
    ) -> impl Fn(Arc<Proxy>, TcpStream, SocketAddr, PendingGuard) -> BoxFuture<'static, ()> {
        move |_, mut tcp, peer, slot| {
            let done = done.clone();
            Box::pin(async move {
                let _ = tcp.write_all(b"+").await;
                let _ = tcp.read(&mut [0u8; 1]).await;
                drop(slot);
                let _ = done.send(peer.ip());
            })
        }
    }

    /// Connections held are bounded per source address and in total; one over a bound is
    /// closed at once and counted under its listener's reason, a freed slot is usable again.
    #[tokio::test]
    async fn connections_held_are_bounded_per_source_and_in_total() {
        let bound = ConnBound {
            per_source: 2,
            total: 3,
        };
        let px = proxy(bound, bound, LimitConfig::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (done, mut freed) = mpsc::unbounded_channel();
        let limits = px.limits.plaintext.clone();
        let serving = tokio::spawn(accept_loop(px.clone(), listener, "plaintext", limits, holding(done)));

        let mut a1 = connect("127.0.0.1", addr).await;
        let mut a2 = connect("127.0.0.1", addr).await;
        assert!(admitted(&mut a1).await && admitted(&mut a2).await);
        let mut a3 = connect("127.0.0.1", addr).await;
        assert!(!admitted(&mut a3).await, "a third from one source");
        assert_eq!(refused(&px, "plaintext_per_source_limit"), 1);

        let mut b1 = connect("127.0.0.2", addr).await;
        assert!(admitted(&mut b1).await, "another source has its own share");
        let mut c1 = connect("127.0.0.3", addr).await;
        assert!(!admitted(&mut c1).await, "the total is reached");
        assert_eq!(refused(&px, "plaintext_connections_limit"), 1);

        drop(a1);
        assert_eq!(freed.recv().await, Some("127.0.0.1".parse().unwrap()));
        let mut c2 = connect("127.0.0.3", addr).await;
        assert!(admitted(&mut c2).await, "a freed slot is used again");
        assert_eq!(
            refused(&px, "outbound_connections_limit"),
            0,
            "counted under its own listener"
        );

        px.drain.cancel();
        serving.await.unwrap();
        drop((a2, b1, c2));
    }

    /// The outbound and plaintext listeners admit against their own bounds before any other
    /// check: with no room, a connection is refused as over the bound, not examined.
    #[tokio::test]
    async fn each_capture_listener_is_bounded() {
        let none = ConnBound {
            per_source: 1,
            total: 0,
        };
        let px = proxy(none, none, LimitConfig::default());
        let cases = [
            ("outbound_connections_limit", true),
            ("plaintext_connections_limit", false),
        ];
        for (reason, outbound) in cases {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let serving = if outbound {
                tokio::spawn(outbound::serve(px.clone(), listener))
            } else {
                tokio::spawn(inbound_plain::serve(px.clone(), listener))
            };
            let mut tcp = connect("127.0.0.1", addr).await;
            assert!(!admitted(&mut tcp).await);
            assert_eq!(refused(&px, reason), 1, "{reason}");
            serving.abort();
        }
        assert_eq!(refused(&px, "no_original_dst"), 0, "refused before being examined");
        px.drain.cancel();
    }

    /// While the local workload's certificate is pending, the HBONE sockets waiting for it
    /// count against the handshake bounds: with one allowed per source, a second is closed at
    /// once (and counted) while the first still waits, instead of both waiting uncounted.
    #[tokio::test]
    async fn hbone_sockets_waiting_for_a_certificate_are_counted() {
        let unbounded = ConnBound {
            per_source: 100,
            total: 100,
        };
        let hbone = LimitConfig {
            max_pending_per_source: 1,
            ..LimitConfig::default()
        };
        let px = proxy(unbounded, unbounded, hbone);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(inbound::serve(px.clone(), listener));
        let first = connect("127.0.0.1", addr).await;
        let mut second = connect("127.0.0.1", addr).await;
        // EOF or reset: closed by the bound, not after the certificate fetch's timeout.
        let _ = second.read(&mut [0u8; 1]).await;
        assert_eq!(refused(&px, "pending_per_source_limit"), 1);
        assert_eq!(refused(&px, "no_certificate"), 0, "refused by the bound, not the fetch");
        assert_eq!(
            px.settings.limits.pending_from(addr.ip()),
            1,
            "the first holds its slot"
        );
        px.drain.cancel();
        serving.await.unwrap();
        drop(first);
    }
}
