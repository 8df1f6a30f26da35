//! Start-up and shutdown: certificate, xDS subscription (workloads plus the waypoint's own
//! routes and policies), the HBONE listener and the admin, stats and readiness ports;
//! SIGTERM drains.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_core::hbone::{HbonePool, Settings};
use mesh_core::identity::cert::read_trust_bundle;
use mesh_core::identity::{CaClient, CertManager, CertManagerConfig, Identity, TokenSource};
use mesh_core::log_sink::LogSink;
use mesh_core::socket::PlainSockets;
use mesh_core::state::StateStore;
use mesh_core::xds::{XdsClient, XdsConfig, XdsMetrics};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, Role};
use crate::store::{ConfigStore, PolicySink, RoutesSink};
use crate::telemetry::{metrics, trace};
use crate::upstream::connector::{Connector, Dial};
use crate::upstream::Upstreams;
use crate::{admin, ingress, listener, policy, Waypoint};

/// The log sink's lost-lines counter, in every role.
pub const LOG_LINES_DROPPED: &str = "waypoint_log_lines_dropped";

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    if cfg.role == Role::EastWest {
        return crate::eastwest::run(cfg).await;
    }
    let mut registry = Registry::default();
    LogSink::stdout().register_dropped(&mut registry, LOG_LINES_DROPPED);
    mesh_core::admin_http::register(&mut registry, "waypoint_admin_connections_refused");
    let (waypoint, ready) = build(&cfg, &mut registry)?;
    spawn_certificate(waypoint.certs.clone(), cfg.identity.clone());

    // An ingress gateway serves its Gateway's listeners, not HBONE.
    let hbone = match cfg.role {
        Role::Waypoint => Some(
            TcpListener::bind(cfg.hbone_addr)
                .await
                .with_context(|| format!("binding --hbone-addr {}", cfg.hbone_addr))?,
        ),
        Role::Ingress | Role::EastWest => None,
    };
    let admin = Arc::new(admin::Admin {
        waypoint: waypoint.clone(),
        registry,
        ready,
    });
    for (port, flag, addr) in [
        (admin::Port::Admin, "--admin-addr", cfg.admin_addr),
        (admin::Port::Stats, "--stats-addr", cfg.stats_addr),
        (admin::Port::Readiness, "--readiness-addr", cfg.readiness_addr),
    ] {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {flag} {addr}"))?;
        tokio::spawn(admin::serve(admin.clone(), port, listener));
    }
    let serving = match (hbone, &waypoint.ingress) {
        (Some(hbone), _) => tokio::spawn(listener::serve(waypoint.clone(), hbone, cfg.peer_limits.config())),
        (None, Some(ingress)) => {
            let listen = ingress::server::Listen {
                bind: cfg.ingress_bind,
                max_connections: cfg.ingress_max_connections as usize,
            };
            tokio::spawn(ingress::server::run(waypoint.clone(), ingress.clone(), listen))
        }
        (None, None) => anyhow::bail!("an ingress gateway without its configuration"),
    };
    info!(identity = %cfg.identity, gateway = ?cfg.gateway(), role = ?cfg.role, "waypoint started");

    mesh_core::shutdown::shutdown_signal().await;
    info!(accepting_for = ?cfg.drain_accept(), "draining");
    waypoint.drain.cancel();
    // Still accepting (answers say Connection: close) while ztunnels learn we are leaving.
    tokio::time::sleep(cfg.drain_accept()).await;
    waypoint.closing.cancel();
    waypoint.tasks.close();
    let _ = serving.await;
    if tokio::time::timeout(cfg.drain(), waypoint.tasks.wait()).await.is_err() {
        warn!("drain timed out; closing remaining connections");
    }
    info!("waypoint stopped");
    Ok(())
}

/// The waypoint's shared state, wired to the control plane (CA and xDS, whose client starts
/// here), and the xDS readiness signal.
fn build(cfg: &Config, registry: &mut Registry) -> anyhow::Result<(Arc<Waypoint>, watch::Receiver<bool>)> {
    let roots = read_trust_bundle(cfg.trust_bundle()?).context("--trust-bundle")?;
    let token = cfg
        .control_plane
        .token_file
        .clone()
        .map_or(TokenSource::None, TokenSource::File);
    let cp_tls = |addr: &str| control_plane_tls(cfg, addr);

    let ca_address = cfg.ca_address()?;
    let channel = mesh_core::grpc::endpoint(ca_address, cp_tls(ca_address)?)
        .with_context(|| format!("--ca-address {ca_address}"))?
        .connect_lazy();
    let certs = CertManager::new(
        Arc::new(CaClient::new(channel, token.clone(), false)),
        roots.clone(),
        CertManagerConfig::default(),
    );

    let state = StateStore::new();
    let config = ConfigStore::new();
    let xds_address = cfg.xds_address()?;
    let mut xds = XdsConfig::new(xds_address.to_owned(), format!("waypoint~{}", cfg.identity));
    xds.tls = cp_tls(xds_address)?;
    xds.token = token;
    xds.extra_types = vec![
        Arc::new(RoutesSink(config.clone())),
        Arc::new(PolicySink(config.clone())),
    ];
    // TLS origination credentials: only this waypoint's own resource is accepted.
    let credentials = crate::upstream::tls::CredentialStore::new(format!(
        "{}/{}",
        cfg.identity.namespace, cfg.identity.service_account
    ));
    xds.extra_types
        .push(Arc::new(crate::upstream::tls::CredentialsSink(credentials.clone())));
    let ingress = (cfg.role == Role::Ingress).then(|| ingress::Ingress::new(cfg.gateway(), config.clone()));
    if let Some(ingress) = &ingress {
        xds.extra_types.push(Arc::new(ingress::IngressSink(ingress.clone())));
    }
    let client = XdsClient::new(xds, state.clone(), XdsMetrics::register(registry));
    let ready = client.ready();
    tokio::spawn(client.run());

    let metrics = metrics::Metrics::register(registry);
    let connector = connector(cfg, &state, &certs, registry, &metrics);
    let waypoint = Arc::new(Waypoint {
        gateway: cfg.gateway(),
        identity: cfg.identity.clone(),
        network: cfg.network.clone(),
        state,
        config,
        certs,
        upstreams: Upstreams::new(connector, credentials),
        jwks: policy::jwt::JwksCache::new(Duration::from_secs(cfg.jwks_refresh_seconds), Duration::from_secs(5)),
        metrics,
        tracer: trace::Tracer::start(trace::TraceConfig {
            zipkin: cfg.zipkin_address.clone(),
            otlp: cfg.otlp_address.clone(),
            sampling: cfg.trace_sampling,
            tags: cfg.trace_tags.clone(),
            service: format!("{}.{}", cfg.gateway().1, cfg.gateway().0),
            dropped: trace::register_dropped(registry),
        }),
        access_log: crate::telemetry::access_log::Sinks::register(
            registry,
            format!("{}.{}", cfg.gateway().1, cfg.gateway().0),
        ),
        header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
        stream_idle_timeout: Duration::from_millis(cfg.stream_idle_timeout_ms),
        path_normalization: cfg.path_normalization,
        drain: CancellationToken::new(),
        closing: CancellationToken::new(),
        tasks: TaskTracker::new(),
        rate_limits: Default::default(),
        ingress,
    });
    Ok((waypoint, ready))
}

/// TLS to the control plane at `addr` when it uses TLS; re-read when the bundle changes, since
/// after a root rotation the controller's certificate chains to the new root.
pub(crate) fn control_plane_tls(cfg: &Config, addr: &str) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    if !mesh_core::control_plane_args::uses_tls(addr) {
        return Ok(None);
    }
    Ok(Some(mesh_core::tls::control_plane_client_config_following(
        cfg.trust_bundle()?,
        vec![cfg.control_plane.control_plane_identity.clone()],
    )?))
}

/// The upstream connector: HBONE with our certificate; TLS-origination failures counted, and
/// dials refused as a loop in `metrics`' rejections.
fn connector(
    cfg: &Config,
    state: &Arc<StateStore>,
    certs: &Arc<CertManager>,
    registry: &mut Registry,
    metrics: &metrics::Metrics,
) -> Connector {
    let hbone = HbonePool::new(
        Settings::default(),
        certs.clone(),
        Arc::new(PlainSockets { mark: None }),
    );
    let connector = Connector::from(Dial {
        state: state.clone(),
        hbone,
        identity: cfg.identity.clone(),
        network: cfg.network.clone(),
        hbone_port: cfg.hbone_port,
        connect_timeout: Duration::from_secs(10),
        originate: None,
        tls_failures: Default::default(),
        rejected: metrics.rejected.clone(),
    });
    registry.register(
        "waypoint_upstream_tls_failures",
        "Upstream connections whose TLS origination failed (no request was sent), by reason",
        connector.tls_failures.clone(),
    );
    connector
}

/// Our certificate: retried until the CA issues it; the manager renews it after that.
fn spawn_certificate(certs: Arc<CertManager>, id: Identity) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        while let Err(e) = certs.fetch(&id).await {
            warn!(error = %e, retry_in = ?delay, "cannot get the waypoint certificate");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        info!(identity = %id, "certificate issued");
    });
}
