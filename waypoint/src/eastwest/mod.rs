//! The east-west gateway role (`--role east-west`): the entry to this network for clients on
//! other networks, which reach its endpoints with double HBONE (issue 17).
//!
//! It listens for HBONE (mutual TLS with its own SPIFFE identity, HTTP/2 CONNECT), accepts
//! only peers with an identity of the mesh's trust domain, and relays each CONNECT stream's
//! bytes to the HBONE port of an endpoint of this network chosen by the outer authority
//! ([`route`]). Those bytes are the client's inner TLS with the destination: the gateway
//! never terminates it, holds no certificate the inner handshake would accept, and so never
//! sees the plaintext or any key of the client's identity.
//!
//! A separate, small start-up rather than the waypoint's: no routes, policies, HTTP or
//! upstream pools, only workload state, a certificate and the HBONE server with mesh-core's
//! bounds (pending handshakes, admitted at accept before the certificate is awaited, streams
//! per peer identity, reset floods), counted in
//! `eastwest_hbone_limits_total`, and its own on relays still in their inner handshake per
//! client identity ([`handshake`]), counted in `eastwest_streams_total`. For development and tests it can run from a workload file
//! and a development root (`--local-xds-path`, `--ca-root-cert`) like ztunnel.

pub mod handshake;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_core::hbone::{
    serve_admitted, HboneError, InboundConnect, Limit, LimitConfig, LimitObserver, PendingGuard, ServerLimits, Settings,
};
use mesh_core::identity::cert::{certs_from_pem, read_trust_bundle};
use mesh_core::identity::{CaClient, CertManager, CertManagerConfig, CertificateSigner, DevCa, Identity, TokenSource};
use mesh_core::log_limit::LogLimiter;
use mesh_core::state::StateStore;
use mesh_core::xds::{XdsClient, XdsConfig, XdsMetrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::app::control_plane_tls;
use crate::config::Config;
use crate::idle;
use crate::upstream::cluster::TCP_IDLE_TIMEOUT;
use route::{Refused, Scope};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

/// What the gateway counts.
#[derive(Clone)]
struct Metrics {
    streams: Family<OutcomeLabels, Counter>,
    limits: Family<LimitLabels, Counter>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            streams: Family::default(),
            limits: Family::default(),
        };
        registry.register(
            "eastwest_streams",
            "CONNECT streams by outcome (forwarded, or why refused)",
            m.streams.clone(),
        );
        registry.register(
            "eastwest_hbone_limits",
            "HBONE bounds that bit (pending handshakes, streams per peer, resets, relays idle for an hour)",
            m.limits.clone(),
        );
        m
    }

    fn outcome(&self, outcome: &'static str) {
        self.streams.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// What every stream shares.
struct Gateway {
    identity: Identity,
    network: String,
    hbone_port: u16,
    state: Arc<StateStore>,
    certs: Arc<CertManager>,
    settings: Settings,
    metrics: Metrics,
    drain: CancellationToken,
    /// Refusal log lines, at most one per reason per second: any mesh peer can make streams
    /// fail as fast as it can open them (they are counted in `eastwest_streams_total`).
    refusals: LogLimiter,
    /// Relays in their inner handshake, per client identity.
    handshakes: Arc<handshake::Handshakes>,
}

/// Refusal lines per reason: one per this interval, with the count suppressed meanwhile.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the gateway until SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    mesh_core::log_sink::LogSink::stdout().register_dropped(&mut registry, crate::app::LOG_LINES_DROPPED);
    mesh_core::admin_http::register(&mut registry, "waypoint_admin_connections_refused");
    let metrics = Metrics::register(&mut registry);
    let certs = cert_manager(&cfg)?;
    let ready = workload_state(&cfg, &mut registry)?;
    let limit_metrics = metrics.clone();
    let observer: LimitObserver = Arc::new(move |l: Limit| {
        limit_metrics
            .limits
            .get_or_create(&LimitLabels { limit: l.as_str() })
            .inc();
    });
    let gw = Arc::new(Gateway {
        identity: cfg.identity.clone(),
        network: cfg.network.clone(),
        hbone_port: cfg.hbone_port,
        state: ready.1,
        certs,
        settings: Settings {
            limits: Arc::new(ServerLimits::new(LimitConfig::default(), Some(observer))),
            hostname_authority: true,
            ..Default::default()
        },
        metrics,
        drain: CancellationToken::new(),
        refusals: LogLimiter::new(REFUSAL_LOG_INTERVAL),
        handshakes: Arc::default(),
    });
    spawn_certificate(gw.clone());
    serve_stats(&cfg, gw.clone(), Arc::new(registry), ready.0).await?;
    let listener = TcpListener::bind(cfg.hbone_addr)
        .await
        .with_context(|| format!("binding --hbone-addr {}", cfg.hbone_addr))?;
    info!(identity = %cfg.identity, network = %cfg.network, addr = %cfg.hbone_addr, "east-west gateway started");
    tokio::select! {
        _ = accept(gw.clone(), listener) => {}
        _ = mesh_core::shutdown::shutdown_signal() => {}
    }
    info!("east-west gateway draining");
    gw.drain.cancel();
    tokio::time::sleep(cfg.drain()).await;
    Ok(())
}

/// Our certificate's signer and the roots peers are checked against: a development root
/// (`--ca-root-cert`) or the mesh CA with the trust bundle.
fn cert_manager(cfg: &Config) -> anyhow::Result<Arc<CertManager>> {
    let (signer, roots): (Arc<dyn CertificateSigner>, _) = match (&cfg.ca_root_cert, &cfg.ca_root_key) {
        (Some(cert), Some(key)) => {
            let ca = DevCa::load(cert, key).context("loading the development CA")?;
            let roots = certs_from_pem(ca.root_pem())?;
            (Arc::new(ca), roots)
        }
        _ => {
            let bundle = cfg.trust_bundle()?;
            let roots = read_trust_bundle(bundle).context("--trust-bundle")?;
            let addr = cfg.ca_address()?;
            let channel = mesh_core::grpc::endpoint(addr, control_plane_tls(cfg, addr)?)
                .with_context(|| format!("--ca-address {addr}"))?
                .connect_lazy();
            (Arc::new(CaClient::new(channel, token(cfg), false)), roots)
        }
    };
    Ok(CertManager::new(signer, roots, CertManagerConfig::default()))
}

fn token(cfg: &Config) -> TokenSource {
    cfg.control_plane
        .token_file
        .clone()
        .map_or(TokenSource::None, TokenSource::File)
}

/// The workload state (a file, or xDS) and the signal that it is loaded.
fn workload_state(cfg: &Config, registry: &mut Registry) -> anyhow::Result<(watch::Receiver<bool>, Arc<StateStore>)> {
    let state = StateStore::new();
    if let Some(path) = &cfg.local_xds_path {
        let mut source = mesh_core::xds::LocalSource::new(path.clone(), state.clone());
        source
            .reload()
            .with_context(|| format!("loading workload state from {}", path.display()))?;
        tokio::spawn(mesh_core::xds::workload_file::watch(
            path.clone(),
            state.clone(),
            Duration::from_secs(1),
        ));
        return Ok((watch::channel(true).1, state));
    }
    let addr = cfg.xds_address()?;
    let mut xds = XdsConfig::new(addr.to_owned(), format!("east-west~{}", cfg.identity));
    xds.tls = control_plane_tls(cfg, addr)?;
    xds.token = token(cfg);
    let client = XdsClient::new(xds, state.clone(), XdsMetrics::register(registry));
    let ready = client.ready();
    tokio::spawn(client.run());
    Ok((ready, state))
}

/// Our certificate: retried until issued; the manager renews it after that.
fn spawn_certificate(gw: Arc<Gateway>) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        while let Err(e) = gw.certs.fetch(&gw.identity).await {
            warn!(error = %e, retry_in = ?delay, "cannot get the east-west gateway certificate");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        info!(identity = %gw.identity, "certificate issued");
    });
}

/// `/metrics` and `/healthz/ready` on the stats address, `/healthz/ready` on the readiness one.
async fn serve_stats(
    cfg: &Config,
    gw: Arc<Gateway>,
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    for (addr, metrics) in [(cfg.stats_addr, true), (cfg.readiness_addr, false)] {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let (gw, registry, ready) = (gw.clone(), registry.clone(), ready.clone());
        tokio::spawn(mesh_core::admin_http::serve_forever(listener, move |req| {
            let (gw, registry, ready) = (gw.clone(), registry.clone(), ready.clone());
            async move {
                let text = |status: http::StatusCode, body: &str| {
                    let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body.to_owned())));
                    *r.status_mut() = status;
                    r
                };
                match req.uri().path() {
                    "/metrics" if metrics => mesh_core::prometheus::response(&registry, req.headers()),
                    "/healthz/ready" => {
                        let ok =
                            *ready.borrow() && gw.certs.get_ready(&gw.identity).is_some() && !gw.drain.is_cancelled();
                        if ok {
                            text(http::StatusCode::OK, "ready\n")
                        } else {
                            text(http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                        }
                    }
                    _ => text(http::StatusCode::NOT_FOUND, "try /metrics or /healthz/ready\n"),
                }
            }
        }));
    }
    Ok(())
}

async fn accept(gw: Arc<Gateway>, listener: TcpListener) {
    let mut backoff = mesh_core::socket::AcceptBackoff::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                backoff.failed("east-west HBONE", &e).await;
                continue;
            }
        };
        backoff.succeeded();
        // Admitted before anything is awaited for it (the certificate): a socket waiting for
        // one counts against the handshake bounds. Refused: closed at once, counted.
        let Ok(pending) = gw.settings.limits.admit(peer.ip()) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(gw.clone(), tcp, peer, pending));
    }
}

async fn connection(gw: Arc<Gateway>, tcp: TcpStream, peer: SocketAddr, pending: PendingGuard) {
    let config = match gw
        .certs
        .fetch(&gw.identity)
        .await
        .map(|c| mesh_core::tls::cached_server_config(&c))
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return warn!(error = %e, "cannot build the TLS server configuration"),
        Err(e) => return warn!(error = %e, "no certificate yet; connection refused"),
    };
    let gw2 = gw.clone();
    let result = serve_admitted(tcp, pending, config, &gw.settings, gw.drain.clone(), move |req| {
        let gw = gw2.clone();
        async move { stream(gw, req).await }
    })
    .await;
    match result {
        Ok(()) | Err(HboneError::Limited(_)) => {}
        Err(e) => debug!(%peer, error = %e, "east-west HBONE connection ended with error"),
    }
}

/// One CONNECT: authenticate the peer, pick the endpoint, relay the (encrypted) bytes.
async fn stream(gw: Arc<Gateway>, mut req: InboundConnect) {
    let refuse = |req: InboundConnect, why: Refused| {
        gw.metrics.outcome(why.as_str());
        req.reject(why.status());
    };
    let logs = |why: Refused| gw.refusals.check(why.as_str());
    if req.peer_identity.trust_domain != gw.identity.trust_domain {
        if let Some(suppressed) = logs(Refused::ForeignTrustDomain) {
            info!(peer = %req.peer_addr, identity = %req.peer_identity, suppressed, "refused: not an identity of this mesh's trust domain");
        }
        return refuse(req, Refused::ForeignTrustDomain);
    }
    let authority = match &req.hostname {
        Some(h) => format!("{h}:{}", req.dst.port()),
        None => req.dst.to_string(),
    };
    let state = gw.state.load();
    let scope = Scope {
        network: &gw.network,
        hbone_port: gw.hbone_port,
    };
    let target = match route::target(&state, &scope, req.hostname.as_deref(), req.dst, req.local_addr.ip()) {
        Ok(t) => t,
        Err(why) => {
            if let Some(suppressed) = logs(why) {
                info!(%authority, identity = %req.peer_identity, reason = why.as_str(), suppressed, "refused");
            }
            return refuse(req, why);
        }
    };
    drop(state);
    // Taken before connecting: the destination counts the relay from the moment it connects.
    let Some(slot) = gw.handshakes.take(&req.peer_identity) else {
        if let Some(suppressed) = logs(Refused::HandshakesPerPeer) {
            info!(%authority, identity = %req.peer_identity, suppressed, "refused: too many relays still in their handshake");
        }
        return refuse(req, Refused::HandshakesPerPeer);
    };
    let connect = tokio::time::timeout(gw.settings.connect_timeout, TcpStream::connect(target));
    let mut upstream = match req.unless_reset(connect).await {
        Some(Ok(Ok(s))) => s,
        Some(_) => {
            if let Some(suppressed) = logs(Refused::Unreachable) {
                info!(%authority, %target, suppressed, "refused: endpoint unreachable");
            }
            return refuse(req, Refused::Unreachable);
        }
        None => return,
    };
    let _ = upstream.set_nodelay(true);
    info!(%authority, %target, identity = %req.peer_identity, "relaying the inner tunnel (not terminated)");
    gw.metrics.outcome("forwarded");
    match req.accept() {
        Ok(s) => {
            let watch = handshake::Watch::new(slot);
            let activity = idle::Activity::default();
            let relay = s.splice_tcp_observed(&mut upstream, (&watch, &activity));
            // As Envoy's TCP proxy at Istio's east-west gateway: an hour without a byte ends it.
            tokio::select! {
                biased;
                r = relay => if let Err(e) = r {
                    debug!(%authority, error = %e, "relay ended with error");
                },
                () = activity.silence(TCP_IDLE_TIMEOUT) => {
                    gw.metrics.limits.get_or_create(&LimitLabels { limit: "idle_timeout" }).inc();
                    debug!(%authority, "relay idle for {TCP_IDLE_TIMEOUT:?}: closed");
                }
            }
        }
        Err(e) => debug!(error = %e, "could not answer the CONNECT"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use mesh_core::hbone::{serve_connection, HbonePool, PoolKey, TunnelRequest};
    use mesh_core::socket::PlainSockets;
    use mesh_core::state::{Tunnel, Workload};

    use super::*;
    use crate::config::Role;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    /// A gateway on loopback whose network has one HBONE endpoint, 127.0.0.1, served by a
    /// listener that holds every connection; streams per peer capped at `max_streams`.
    async fn gateway(ca: &DevCa, max_streams: u32) -> (Arc<Gateway>, SocketAddr) {
        let endpoint = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hbone_port = endpoint.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = endpoint.accept().await {
                held.push(s);
            }
        });
        gateway_to(ca, max_streams, hbone_port).await
    }

    /// As [`gateway`], the endpoint's HBONE port being `hbone_port` on 127.0.0.1.
    async fn gateway_to(ca: &DevCa, max_streams: u32, hbone_port: u16) -> (Arc<Gateway>, SocketAddr) {
        let signer: Arc<dyn CertificateSigner> = Arc::new(DevCa::from_pem(ca.root_pem(), &ca.key_pem()).unwrap());
        let limits = LimitConfig {
            max_streams_per_peer: max_streams,
            ..LimitConfig::default()
        };
        gateway_with(signer, limits, hbone_port).await
    }

    /// A gateway certified by `signer`, bounded by `limits`, listening on loopback.
    async fn gateway_with(
        signer: Arc<dyn CertificateSigner>,
        limits: LimitConfig,
        hbone_port: u16,
    ) -> (Arc<Gateway>, SocketAddr) {
        let state = StateStore::new();
        state.update(|s| {
            s.upsert_workload(Workload {
                uid: "c//Pod/default/server".into(),
                name: "server".into(),
                namespace: "default".into(),
                addresses: vec!["127.0.0.1".parse().unwrap()],
                network: "net2".into(),
                tunnel: Tunnel::Hbone,
                identity: id("default", "server"),
                waypoint: None,
                node: "n".into(),
                canonical_name: "server".into(),
                canonical_revision: "v1".into(),
                workload_name: "server".into(),
                services: vec![],
                authorization_policies: vec![],
                healthy: true,
                cluster_id: String::new(),
            })
        });
        let registry = &mut Registry::default();
        let metrics = Metrics::register(registry);
        let m = metrics.clone();
        let observer: LimitObserver = Arc::new(move |l: Limit| {
            m.limits.get_or_create(&LimitLabels { limit: l.as_str() }).inc();
        });
        let gw = Arc::new(Gateway {
            identity: id("istio-system", "eastwest"),
            network: "net2".into(),
            hbone_port,
            state,
            certs: CertManager::new(signer, vec![], CertManagerConfig::default()),
            settings: Settings {
                limits: Arc::new(ServerLimits::new(limits, Some(observer))),
                hostname_authority: true,
                ..Default::default()
            },
            metrics,
            drain: CancellationToken::new(),
            refusals: LogLimiter::new(REFUSAL_LOG_INTERVAL),
            handshakes: Arc::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(accept(gw.clone(), listener));
        (gw, addr)
    }

    /// Clients' HBONE pool, with certificates from `ca`.
    fn client_pool(ca: DevCa) -> Arc<HbonePool> {
        let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
        HbonePool::new(Settings::default(), certs, Arc::new(PlainSockets::default()))
    }

    /// An outer CONNECT from `who` to the gateway at `gateway` for `authority`.
    fn outer(who: Identity, gateway: SocketAddr, authority: &str) -> TunnelRequest {
        TunnelRequest {
            key: PoolKey {
                src_identity: who,
                dst_identities: vec![id("istio-system", "eastwest")],
                src_ip: None,
                dst: gateway,
            },
            authority: authority.into(),
            forwarded_for: None,
            baggage: None,
            traceparent: None,
        }
    }

    /// A CA that never answers: certificates stay pending.
    struct SilentCa;

    impl CertificateSigner for SilentCa {
        fn sign<'a>(
            &'a self,
            _: &'a Identity,
            _: String,
            _: Duration,
        ) -> mesh_core::identity::ca::BoxFuture<'a, Result<Vec<String>, mesh_core::identity::CaError>> {
            Box::pin(std::future::pending())
        }
    }

    /// While the gateway's certificate is pending, the sockets waiting for it count against
    /// the handshake bounds: with one allowed per source, a second is closed at once (and
    /// counted) while the first still waits, instead of both waiting for the certificate.
    #[tokio::test]
    async fn sockets_waiting_for_the_certificate_are_admitted_first() {
        use tokio::io::AsyncReadExt;
        let limits = LimitConfig {
            max_pending_per_source: 1,
            ..LimitConfig::default()
        };
        let (gw, addr) = gateway_with(Arc::new(SilentCa), limits, 1).await;
        let first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        // EOF (or a reset) is the gateway closing it; without admission first it would wait
        // with the first for the certificate (fetch timeout) and not be counted.
        let _ = second.read(&mut [0u8; 1]).await;
        let counted = gw
            .metrics
            .limits
            .get_or_create(&LimitLabels {
                limit: Limit::PendingPerSource.as_str(),
            })
            .get();
        assert_eq!(counted, 1, "the second socket was not refused by the per-source bound");
        assert_eq!(
            gw.settings.limits.pending_from(addr.ip()),
            1,
            "the first still holds its slot"
        );
        drop(first);
    }

    /// A peer holding its maximum of streams gets the next one refused, and the bound is
    /// counted; another identity is not affected.
    #[tokio::test]
    async fn streams_per_peer_are_bounded_and_counted() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let (gw, addr) = gateway(&ca, 2).await;
        let pool = client_pool(ca);
        let request = |who: Identity| outer(who, addr, "127.0.0.1:8080");
        let a = request(id("default", "client"));
        let held = [pool.connect(&a).await.unwrap(), pool.connect(&a).await.unwrap()];
        assert!(pool.connect(&a).await.is_err(), "a third stream of the same peer");
        let counted = gw
            .metrics
            .limits
            .get_or_create(&LimitLabels {
                limit: Limit::StreamsPerPeer.as_str(),
            })
            .get();
        assert!(counted >= 1, "the bound bit without a count");
        pool.connect(&request(id("default", "other")))
            .await
            .expect("another identity");
        drop(held);
    }

    /// Relays whose destination never answers stay in their handshake: a client holds at most
    /// [`handshake::MAX_HANDSHAKES_PER_PEER`] of them, the next is refused (429) and counted,
    /// and another identity is not affected.
    #[tokio::test]
    async fn relays_in_handshake_are_bounded_per_client() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let (gw, addr) = gateway(&ca, 1000).await;
        let pool = client_pool(ca);
        let request = |who: Identity| outer(who, addr, "127.0.0.1:8080");
        let staller = request(id("default", "staller"));
        let mut held = Vec::new();
        for _ in 0..handshake::MAX_HANDSHAKES_PER_PEER {
            held.push(pool.connect(&staller).await.expect("a relay within the allowance"));
        }
        assert_eq!(
            gw.handshakes.held(&id("default", "staller")),
            handshake::MAX_HANDSHAKES_PER_PEER
        );
        let refused = pool.connect(&staller).await.err().expect("one relay too many");
        assert!(refused.to_string().contains("429"), "{refused}");
        let counted = gw
            .metrics
            .streams
            .get_or_create(&OutcomeLabels {
                outcome: Refused::HandshakesPerPeer.as_str(),
            })
            .get();
        assert_eq!(counted, 1);
        let other = pool
            .connect(&request(id("default", "other")))
            .await
            .expect("another identity");
        // Ending relays gives their slots back.
        drop(held);
        drop(other);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while gw.handshakes.held(&id("default", "staller")) > 0 {
            assert!(std::time::Instant::now() < deadline, "slots never given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A real inner handshake (rustls and h2, as double HBONE does) through the gateway to a
    /// real HBONE destination leaves the handshake state while the relay stays open: the
    /// record rule of [`handshake`] matches what the mesh's own TLS sends.
    #[tokio::test]
    async fn a_real_inner_handshake_leaves_the_handshake_count() {
        use mesh_core::hbone::DoubleTunnelRequest;
        let ca = DevCa::generate("cluster.local").unwrap();
        let signer: Arc<dyn CertificateSigner> = Arc::new(DevCa::from_pem(ca.root_pem(), &ca.key_pem()).unwrap());
        let dest_certs = CertManager::new(signer, vec![], CertManagerConfig::default());
        let dest_cert = dest_certs.fetch(&id("default", "server")).await.unwrap();
        let dest_tls = mesh_core::tls::server_config(&dest_cert).unwrap();
        let dest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest_port = dest.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = dest.accept().await {
                let tls = dest_tls.clone();
                tokio::spawn(async move {
                    let settings = Settings::default();
                    let hold = |req: InboundConnect| async move {
                        if let Ok(stream) = req.accept() {
                            let mut sink = tokio::io::sink();
                            let mut io = stream.into_io();
                            let _ = tokio::io::copy(&mut io, &mut sink).await;
                        }
                    };
                    let _ = serve_connection(tcp, tls, &settings, CancellationToken::new(), hold).await;
                });
            }
        });
        let (gw, addr) = gateway_to(&ca, 1000, dest_port).await;
        let pool = client_pool(ca);
        let client = id("default", "client");
        let req = DoubleTunnelRequest {
            outer: outer(client.clone(), addr, &format!("127.0.0.1:{dest_port}")),
            inner_identities: vec![id("default", "server")],
            inner_authority: "127.0.0.1:8080".into(),
        };
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(
                pool.connect_double(&req)
                    .await
                    .expect("double HBONE through the gateway"),
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while gw.handshakes.held(&client) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} open relays still counted in their handshake",
                gw.handshakes.held(&client)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(open);
    }

    /// A peer opening refused streams in a loop cannot flood the log: one line per reason per
    /// second, every stream still counted (each of 50 was logged before).
    #[tokio::test]
    async fn refused_streams_do_not_flood_the_log() {
        use std::sync::Mutex;
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let ca = DevCa::generate("cluster.local").unwrap();
        let (gw, addr) = gateway(&ca, 1024).await;
        let pool = client_pool(ca);
        // Not an address of the gateway's network.
        let request = outer(id("default", "client"), addr, "192.0.2.1:15000");
        for _ in 0..50 {
            assert!(pool.connect(&request).await.is_err());
        }
        let refused = gw
            .metrics
            .streams
            .get_or_create(&OutcomeLabels {
                outcome: Refused::NotInNetwork.as_str(),
            })
            .get();
        assert_eq!(refused, 50);
        let text = String::from_utf8_lossy(&lines.0.lock().unwrap()).to_string();
        let logged = text.lines().filter(|l| l.contains("refused")).count();
        assert!(logged <= 2, "{logged} refusal lines for 50 streams");
    }

    #[test]
    fn development_mode_needs_no_control_plane_and_only_for_this_role() {
        let local = [
            "waypoint",
            "--identity",
            "spiffe://cluster.local/ns/istio-system/sa/eastwest",
            "--local-xds-path",
            "/state.yaml",
            "--ca-root-cert",
            "/root-cert.pem",
            "--ca-root-key",
            "/root-key.pem",
        ];
        let cfg = Config::try_parse_from(local.iter().chain(&["--role", "east-west"])).expect("parses");
        assert_eq!(cfg.role, Role::EastWest);
        cfg.validate().expect("east-west in development mode");
        let cfg = Config::try_parse_from(local).expect("parses");
        let err = cfg
            .validate()
            .expect_err("a waypoint needs its control plane")
            .to_string();
        assert!(err.contains("east-west"), "{err}");
    }
}
