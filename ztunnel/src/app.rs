//! Start-up and shutdown: builds the state source, certificate manager, HBONE pool and
//! listeners from the configuration, serves until SIGTERM, then drains.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_core::hbone::{Limit, LimitObserver, ServerLimits, Settings};
use mesh_core::identity::cert::{certs_from_pem, read_trust_bundle};
use mesh_core::identity::{CaClient, CertManager, CertManagerConfig, CertificateSigner, DevCa, TokenSource};
use mesh_core::log_json::JsonLines;
use mesh_core::log_sink::LogSink;
use mesh_core::socket::{PlainSockets, SocketFactory};
use mesh_core::state::StateStore;
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter};

use crate::admin::{self, Admin, LogReload};
use crate::config::{Config, LogFormat};
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy};

/// Installs the tracing subscriber and returns a handle that swaps the filter at runtime.
pub fn init_logging(cfg: &Config) -> LogReload {
    let filter = EnvFilter::try_new(&cfg.log).unwrap_or_else(|e| {
        eprintln!("warning: invalid log filter {:?} ({e}); using info", cfg.log);
        EnvFilter::new("info")
    });
    let (filter, handle) = reload::Layer::new(filter);
    // Access-log lines batched off the connection path, JSON written without detours.
    let sink = LogSink::stdout().clone();
    let registry = tracing_subscriber::registry().with(filter);
    match cfg.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .event_format(JsonLines::default())
                    .with_writer(sink),
            )
            .init(),
        LogFormat::Plain => registry.with(tracing_subscriber::fmt::layer().with_writer(sink)).init(),
    }
    Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

/// `--gen-dev-ca DIR`: writes a fresh development root.
pub fn write_dev_ca(dir: &Path) -> anyhow::Result<()> {
    let ca = DevCa::generate("cluster.local")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("root-cert.pem"), ca.root_pem())?;
    std::fs::write(dir.join("root-key.pem"), ca.key_pem())?;
    println!("wrote {0}/root-cert.pem and {0}/root-key.pem", dir.display());
    Ok(())
}

/// Reads the `--trust-bundle` PEM file; it must hold at least one certificate.
/// TLS for a control plane address: none for http://; for https:// a client configuration
/// that trusts the trust bundle, expects `--control-plane-identity` and sends no client
/// certificate (the bearer token authenticates this proxy).
fn control_plane_tls(
    cfg: &Config,
    flag: &str,
    address: &str,
    bundle: Option<&[CertificateDer<'static>]>,
) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    if !mesh_core::control_plane_args::uses_tls(address) {
        return Ok(None);
    }
    let roots = bundle.with_context(|| {
        format!("{flag} {address} uses TLS: pass --trust-bundle <PEM file> with the roots the control plane's certificate chains to")
    })?;
    let expected = vec![cfg.control_plane.control_plane_identity.clone()];
    let tls = match &cfg.control_plane.trust_bundle {
        // Re-read when it changes: after a root rotation the controller's certificate chains
        // to the new root.
        Some(path) => mesh_core::tls::control_plane_client_config_following(path, expected),
        None => mesh_core::tls::control_plane_client_config(roots, expected),
    }
    .with_context(|| format!("TLS configuration for {flag} {address}"))?;
    Ok(Some(tls))
}

fn token_source(cfg: &Config) -> TokenSource {
    match &cfg.control_plane.token_file {
        Some(p) => TokenSource::File(p.clone()),
        None => TokenSource::None,
    }
}

/// Runs ztunnel until SIGTERM/SIGINT, then drains: [`start`], the signal, [`Running::drain`].
pub async fn run(cfg: Config, reload: LogReload) -> anyhow::Result<()> {
    let running = start(&cfg, reload).await?;
    mesh_core::shutdown::shutdown_signal().await;
    running.drain(cfg.drain_timeout()).await;
    Ok(())
}

/// A started ztunnel: its shared proxy state (for draining) and the admin listeners' stop.
pub struct Running {
    shared: proxy::Shared,
    stop_admin: CancellationToken,
}

impl Running {
    /// Stops accepting, lets live connections finish for up to `timeout`, then closes the
    /// rest and the admin listeners.
    pub async fn drain(self, timeout: Duration) {
        info!(?timeout, active = self.shared.tracker.len(), "draining");
        self.shared.drain.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(timeout, self.shared.tasks.wait()).await.is_err() {
            warn!("drain timed out; closing remaining connections");
        }
        self.stop_admin.cancel();
        info!("ztunnel stopped");
    }
}

/// Builds everything from the configuration and starts serving: workload state, certificates,
/// the proxy listeners (dedicated mode) or the ZDS client (in-pod mode), admin listeners.
pub async fn start(cfg: &Config, reload: LogReload) -> anyhow::Result<Running> {
    let state = StateStore::new();
    let mut registry = Registry::default();
    LogSink::stdout().register_dropped(&mut registry, "ztunnel_log_lines_dropped");
    mesh_core::admin_http::register(&mut registry, "ztunnel_admin_connections_refused");
    let metrics = Metrics::register(&mut registry);

    // Proxy sockets carry the mesh mark; so do the control plane connections, which the
    // capture rules of a captured namespace must let through as well.
    let sockets: Arc<dyn SocketFactory> = Arc::new(PlainSockets {
        mark: (cfg.socket_mark != 0).then_some(cfg.socket_mark),
    });
    let bundle = match &cfg.control_plane.trust_bundle {
        Some(path) => Some(read_trust_bundle(path)?),
        None => None,
    };
    let certs = cert_manager(cfg, &sockets, bundle.as_deref())?;
    let source_ready = start_source(cfg, state.clone(), &mut registry, &sockets, bundle.as_deref())?;
    // ztunnel's own namespace: in dedicated mode also the workloads'.
    let node_addrs = proxy::local_addrs::LocalAddrs::discover().context("reading the node's interface addresses")?;
    tokio::spawn(node_addrs.clone().refresh(Duration::from_secs(2)));
    let shared = shared_state(cfg, state.clone(), certs.clone(), metrics, node_addrs.clone());
    tokio::spawn(shared.tracker.clone().enforce(state.clone()));
    tokio::spawn(release_memory_after_updates(state.clone()));

    let ready = match &cfg.zds_socket {
        // In-pod mode: the node agent hands over each pod's namespace; listeners live there.
        Some(path) => {
            let (inpod_ready, pod_addrs) = crate::inpod::start(shared.clone(), path.clone(), cfg.socket_mark);
            tokio::spawn(forget_unused_certificates(
                state.clone(),
                certs.clone(),
                pod_addrs,
                cfg.network.clone(),
            ));
            both(source_ready, inpod_ready)
        }
        // Dedicated mode: serve the workloads of this namespace on ordinary sockets.
        None => {
            tokio::spawn(forget_unused_certificates(
                state.clone(),
                certs.clone(),
                node_addrs.clone(),
                cfg.network.clone(),
            ));
            Proxy::new(&shared, sockets.clone(), node_addrs.into()).start(shared.ports)?;
            source_ready
        }
    };

    let admin = Arc::new(Admin {
        state,
        certs,
        registry,
        ready,
        log_filter: std::sync::Mutex::new(cfg.log.clone()),
        reload,
    });
    let stop_admin = serve_admin(cfg, admin).await?;
    info!(node = %cfg.node_name, "ztunnel started");
    Ok(Running { shared, stop_admin })
}

/// Certificates: the development CA signs locally; otherwise the mesh CA does. The trust
/// bundle, when given, replaces the development root as the roots peers are checked against.
fn cert_manager(
    cfg: &Config,
    sockets: &Arc<dyn SocketFactory>,
    bundle: Option<&[CertificateDer<'static>]>,
) -> anyhow::Result<Arc<CertManager>> {
    let (signer, mut roots): (Arc<dyn CertificateSigner>, _) = match (&cfg.ca_root_cert, &cfg.ca_root_key) {
        (Some(cert), Some(key)) => {
            let ca = DevCa::load(cert, key).context("loading the development CA")?;
            let roots = certs_from_pem(ca.root_pem())?;
            (Arc::new(ca), roots)
        }
        _ => {
            let addr = cfg.control_plane.ca_address.clone().unwrap_or_default();
            let tls = control_plane_tls(cfg, "--ca-address", &addr, bundle)?;
            let channel = mesh_core::grpc::endpoint(&addr, tls)
                .with_context(|| format!("--ca-address {addr}"))?
                .sockets(sockets.clone())
                .connect_lazy();
            (Arc::new(CaClient::new(channel, token_source(cfg), true)), Vec::new())
        }
    };
    if let Some(bundle) = bundle {
        roots = bundle.to_vec();
    }
    Ok(CertManager::new(
        signer,
        roots,
        CertManagerConfig {
            validity: Duration::from_secs(cfg.cert_ttl_seconds),
            ..Default::default()
        },
    ))
}

/// What every listener shares: state, certificates, HBONE settings and limits, ports, drain.
fn shared_state(
    cfg: &Config,
    state: Arc<StateStore>,
    certs: Arc<CertManager>,
    metrics: Metrics,
    node: proxy::local_addrs::LocalAddrs,
) -> proxy::Shared {
    // Bounds on what HBONE peers may hold, shared by every pod's listener; each refusal is
    // counted as ztunnel_connections_refused_total{reason=<limit>}.
    let limits_metrics = metrics.clone();
    let observer: LimitObserver =
        Arc::new(move |limit: Limit| limits_metrics.refuse(crate::proxy::refusal::Refusal::Limit(limit)));
    let settings = Settings {
        idle_timeout: Duration::from_secs(cfg.pool_idle_seconds),
        server_idle_timeout: Duration::from_secs(cfg.inbound_idle_seconds),
        // Double HBONE's inner CONNECT names the service by hostname (Istio's form).
        hostname_authority: true,
        limits: Arc::new(ServerLimits::new(cfg.peer_limits.config(), Some(observer))),
        ..Default::default()
    };
    // Connections the outbound and plaintext listeners hold, node-wide; bites counted as
    // ztunnel_connections_refused_total{reason=<listener>_per_source_limit|_connections_limit}.
    let (outbound, plaintext) = cfg.listener_bounds();
    let limits = proxy::ListenerLimits::new(outbound, plaintext, &metrics);
    proxy::Shared {
        network: cfg.network.clone(),
        ports: proxy::Ports {
            capture: cfg.capture_ports(),
            ipv6: cfg.ipv6,
            others: cfg.other_listener_ports(),
        },
        hbone_port: cfg.hbone_port,
        state,
        certs,
        settings,
        metrics,
        tracker: Default::default(),
        node,
        drain: CancellationToken::new(),
        tasks: TaskTracker::new(),
        dns: dns_settings(cfg),
        original_source: cfg.enable_original_source,
        limits,
    }
}

/// The DNS proxy's settings when `--dns-port` is set; upstreams default to resolv.conf's.
fn dns_settings(cfg: &Config) -> Option<Arc<proxy::DnsSettings>> {
    if cfg.dns_port == 0 {
        return None;
    }
    let upstreams = if cfg.dns_upstream.is_empty() {
        resolv_conf_upstreams(std::path::Path::new("/etc/resolv.conf"))
    } else {
        cfg.dns_upstream.clone()
    };
    info!(port = cfg.dns_port, ?upstreams, "DNS proxy enabled for pods");
    Some(Arc::new(proxy::DnsSettings {
        port: cfg.dns_port,
        domain: cfg.cluster_domain.clone(),
        upstreams: Arc::new(upstreams),
    }))
}

/// The upstream resolvers of resolv.conf at `path`. Without any, DNS proxying still runs
/// (mesh names resolve; refusing it would leave the pods' redirected DNS unanswered) and
/// every other name is answered SERVFAIL: said loudly, with the fix.
fn resolv_conf_upstreams(path: &std::path::Path) -> Vec<std::net::SocketAddr> {
    let why = match crate::dns::read_resolv_conf(path) {
        crate::dns::ResolvConf::Nameservers(v) => return v,
        crate::dns::ResolvConf::NoNameserver => "it has no usable nameserver line".to_owned(),
        crate::dns::ResolvConf::Unreadable(e) => format!("it cannot be read: {e}"),
    };
    tracing::warn!(
        path = %path.display(),
        "no upstream DNS resolver: {why}; the DNS proxy answers mesh names only and SERVFAIL \
         for every other name (set --dns-upstream)"
    );
    Vec::new()
}

/// Binds the admin (loopback), stats and readiness listeners; the token stops them.
async fn serve_admin(cfg: &Config, admin: Arc<Admin>) -> anyhow::Result<CancellationToken> {
    let stop = CancellationToken::new();
    for (addr, role) in [
        (cfg.admin_addr, admin::Role::Admin),
        (cfg.stats_addr, admin::Role::Stats),
        (cfg.readiness_addr, admin::Role::Readiness),
    ] {
        let l = admin::bind(addr, role).await?;
        tokio::spawn(admin::serve(admin.clone(), role, l, stop.clone()));
    }
    Ok(stop)
}

/// Starts the configured workload source; the receiver turns true once state is loaded.
fn start_source(
    cfg: &Config,
    store: Arc<StateStore>,
    registry: &mut Registry,
    sockets: &Arc<dyn SocketFactory>,
    bundle: Option<&[CertificateDer<'static>]>,
) -> anyhow::Result<watch::Receiver<bool>> {
    if let Some(path) = &cfg.local_xds_path {
        // Load once before serving so a missing or unreadable file stops start-up with a clear
        // error; afterwards the watcher applies changes (and keeps the last good state).
        let mut source = mesh_core::xds::LocalSource::new(path.clone(), store.clone());
        match source
            .reload()
            .with_context(|| format!("loading workload state from {}", path.display()))?
        {
            mesh_core::xds::workload_file::Reload::Applied { skipped, .. } => {
                for e in skipped {
                    warn!(error = %e, "skipped invalid entry");
                }
            }
            mesh_core::xds::workload_file::Reload::Unchanged => {}
        }
        tokio::spawn(mesh_core::xds::workload_file::watch(
            path.clone(),
            store,
            Duration::from_secs(1),
        ));
        return Ok(watch::channel(true).1);
    }
    let address = cfg.control_plane.xds_address.clone().unwrap_or_default();
    let tls = control_plane_tls(cfg, "--xds-address", &address, bundle)?;
    // Check the address now: a typo should stop start-up, not retry forever.
    mesh_core::grpc::endpoint(&address, tls.clone()).with_context(|| format!("--xds-address {address}"))?;
    let xds_metrics = mesh_core::xds::XdsMetrics::register(registry);
    let config = mesh_core::xds::XdsConfig {
        address,
        node_id: format!("ztunnel~{}", cfg.node_name),
        node_metadata: [("NODE_NAME".to_owned(), cfg.node_name.clone())].into(),
        tls,
        sockets: Some(sockets.clone()),
        token: token_source(cfg),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(15),
        extra_types: Vec::new(),
    };
    let client = mesh_core::xds::XdsClient::new(config, store, xds_metrics);
    let ready = client.ready();
    tokio::spawn(client.run());
    Ok(ready)
}

/// After state updates settle, hands freed heap pages back to the system. glibc keeps what a
/// large config push freed (parse buffers, the previous snapshot) otherwise, and a node proxy
/// should not hold on to a peak it no longer uses.
async fn release_memory_after_updates(store: Arc<StateStore>) {
    let mut changes = store.subscribe();
    loop {
        // Debounce bursts of updates (and let the initial load settle).
        tokio::time::sleep(Duration::from_secs(1)).await;
        changes.borrow_and_update();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim has no preconditions; it only returns free pages to the kernel.
        let _ = tokio::task::spawn_blocking(|| unsafe { nix::libc::malloc_trim(0) }).await;
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Stops renewing certificates of identities no local workload has any more (a pod left).
async fn forget_unused_certificates(
    store: Arc<StateStore>,
    certs: Arc<CertManager>,
    local: proxy::local_addrs::LocalAddrs,
    network: String,
) {
    let mut changes = store.subscribe();
    while changes.changed().await.is_ok() {
        let state = store.load();
        let in_use: std::collections::HashSet<_> = state
            .workloads()
            .filter(|w| w.network == network && w.addresses.iter().any(|ip| local.contains(*ip)))
            .map(|w| w.identity.clone())
            .collect();
        for (identity, _) in certs.snapshot() {
            if !in_use.contains(&identity) {
                info!(%identity, "no local workload uses this identity any more; dropping its certificate");
                certs.forget(&identity);
            }
        }
    }
}

/// Ready only when both inputs are. An input whose sender is gone keeps its last value.
fn both(a: watch::Receiver<bool>, b: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow() && *b.borrow());
    tokio::spawn(async move {
        let (mut a, mut b) = (a, b);
        let (mut a_open, mut b_open) = (true, true);
        loop {
            tokio::select! {
                r = a.changed(), if a_open => a_open = r.is_ok(),
                r = b.changed(), if b_open => b_open = r.is_ok(),
                else => return,
            }
            tx.send_replace(*a.borrow() && *b.borrow());
        }
    });
    rx
}
