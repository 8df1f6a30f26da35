//! The controller binary: wires a source (local directory or Kubernetes), the translation
//! loop, the Delta ADS server and CA on one TLS port, the admin endpoint, and the waypoint
//! writer (records in local mode, owned objects in a cluster).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use controller::ca::issuer_keys::KeySource;
use controller::ca::{Authenticator, BootstrapTokens, CaMetrics, CaOptions, CaRoot, CaServer};
use controller::config::Config;
use controller::core::{self, Debounce, Published};
use controller::translate::Options;
use controller::waypoint::WaypointDeployment;
use controller::xds::{AdsServer, XdsMetrics};
use controller::{admin, serve, source};
use mesh_core::identity::Identity;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};

/// Keeps one `<ns>.<name>.json` per waypoint in `dir`, removing those no longer wanted.
async fn write_records(dir: PathBuf, mut published: watch::Receiver<Published>) {
    let write = |dir: &Path, records: &[WaypointDeployment]| -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut wanted = HashSet::new();
        for r in records {
            let name = format!("{}.{}.json", r.gateway.namespace, r.gateway.name);
            let body = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
            let path = dir.join(&name);
            if std::fs::read(&path).ok().as_deref() != Some(&body[..]) {
                let tmp = dir.join(format!(".{name}.tmp"));
                std::fs::write(&tmp, &body)?;
                std::fs::rename(&tmp, &path)?;
            }
            wanted.insert(name);
        }
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") && !wanted.contains(&name) {
                std::fs::remove_file(dir.join(&name))?;
            }
        }
        Ok(())
    };
    loop {
        let records = published.borrow_and_update().waypoints.clone();
        if let Err(e) = write(&dir, &records) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write waypoint records");
        }
        if published.changed().await.is_err() {
            return;
        }
    }
}

/// The CA: the plug-in CA of --cacerts-dir when it holds one (returned too, for the watch),
/// else the self-signed root of --ca-dir.
fn ca_root(config: &Config) -> anyhow::Result<(Arc<CaRoot>, Option<controller::ca::PluginFiles>)> {
    let dir = &config.cacerts_dir;
    match controller::ca::PluginFiles::read(dir).context("--cacerts-dir")? {
        Some(files) => {
            let root = CaRoot::from_plugin(&files, &config.trust_domain).context("plug-in CA (--cacerts-dir)")?;
            tracing::info!(dir = %dir.display(), roots = root.root_count(), "signing with the plug-in CA");
            Ok((Arc::new(root), Some(files)))
        }
        None => {
            let root = CaRoot::load_or_generate(&config.ca_dir, &config.trust_domain).context("CA root")?;
            Ok((Arc::new(root), None))
        }
    }
}

/// The controller's TLS configuration on 15012, with a serving certificate from `root`.
fn serving_tls(
    root: &CaRoot,
    identity: &Identity,
    names: &controller::ca::ServingNames,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let serving = root.serving_certificate_for(identity, names, Duration::from_secs(365 * 24 * 3600))?;
    Ok(mesh_core::tls::control_plane_server_config(&serving)?)
}

/// The serving certificate's names and the live TLS configuration carrying it.
struct Serving {
    identity: Identity,
    names: controller::ca::ServingNames,
    tls: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
}

/// What a plug-in CA change does: the CA signs with the new intermediate and sends the new
/// bundle with every certificate from now on, the bundle file proxies read is rewritten, and
/// the controller's own serving certificate is re-issued by the new CA (so it chains to a root
/// the bundle still holds once the old one is retired).
fn rotate(
    ca: CaServer,
    ca_dir: PathBuf,
    serving: Serving,
    bundle: tokio::sync::watch::Sender<String>,
) -> impl Fn(Arc<CaRoot>) + Send + 'static {
    move |root| {
        if let Err(e) = controller::ca::publish_trust_bundle(&ca_dir, root.trust_bundle()) {
            tracing::warn!(error = %e, "cannot publish the new trust bundle");
        }
        // The waypoint namespaces' istio-ca-root-cert ConfigMaps follow (cluster mode).
        bundle.send_replace(root.trust_bundle().to_owned());
        match serving_tls(&root, &serving.identity, &serving.names) {
            Ok(tls) => serving.tls.store(tls),
            Err(e) => tracing::warn!(error = %e, "cannot re-issue the serving certificate; keeping the previous one"),
        }
        ca.replace_root(root);
    }
}

/// The CA root, the bundle's watch and the controller's own serving TLS.
struct Identities {
    identity: Identity,
    root: Arc<CaRoot>,
    plugin: Option<controller::ca::PluginFiles>,
    bundle_tx: watch::Sender<String>,
    bundle_rx: watch::Receiver<String>,
    names: controller::ca::ServingNames,
    tls: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
}

impl Identities {
    /// Loads (or creates) the CA, publishes its trust bundle and issues the serving certificate.
    fn load(config: &Config) -> anyhow::Result<Self> {
        let identity: Identity = config
            .identity
            .parse()
            .map_err(|e| anyhow::anyhow!("--identity: {e}"))?;
        let (root, plugin) = ca_root(config)?;
        let (bundle_tx, bundle_rx) = watch::channel(root.trust_bundle().to_owned());
        controller::ca::publish_trust_bundle(&config.ca_dir, root.trust_bundle())
            .with_context(|| format!("publishing the trust bundle in {}", config.ca_dir.display()))?;
        let names = config.serving_names();
        let tls = serving_tls(&root, &identity, &names)
            .context("serving certificate (--serving-dns-names, --serving-ips)")?;
        tracing::info!(dns = ?names.dns, ips = ?names.ips, "serving certificate names");
        Ok(Identities {
            identity,
            root,
            plugin,
            bundle_tx,
            bundle_rx,
            names,
            tls: Arc::new(arc_swap::ArcSwap::new(tls)),
        })
    }
}

/// The translation loop, fed the mesh config first when there is one (so the first push
/// already has its mode), and the sender every source uses.
async fn start_core(config: &Config) -> anyhow::Result<(core::Core, mpsc::Sender<source::Change>)> {
    let options = Options {
        cluster_id: config.cluster_id.clone(),
        network: config.network.clone(),
        trust_domain: config.trust_domain.clone(),
        domain_suffix: config.cluster_domain.clone(),
        root_namespace: config.root_namespace.clone(),
    };
    let (changes_tx, changes_rx) = mpsc::channel(1024);
    let core = core::start(changes_rx, options, Debounce::default());
    if let Some(path) = config.mesh_config.clone() {
        let initial = controller::mesh_config::read(&path).context("--mesh-config")?;
        changes_tx
            .send(source::Change::MeshConfig(initial))
            .await
            .context("controller loop")?;
        let interval = Duration::from_millis(config.poll_ms);
        tokio::spawn(controller::mesh_config::watch(path, interval, changes_tx.clone()));
    }
    Ok((core, changes_tx))
}

/// Local mode: manifests, enrolment and remote clusters from directories, waypoint records
/// written to a directory, bootstrap tokens for authentication.
fn local_source(
    config: &Config,
    dir: &Path,
    core: &core::Core,
    changes_tx: mpsc::Sender<source::Change>,
    skipped_tx: watch::Sender<Vec<source::manifest_dir::DocumentError>>,
) -> anyhow::Result<Arc<dyn Authenticator>> {
    let tokens = config.bootstrap_tokens.as_ref().context("--bootstrap-tokens")?;
    let auth = Arc::new(BootstrapTokens::load(tokens).context("bootstrap tokens")?);
    let interval = Duration::from_millis(config.poll_ms);
    let (dir, manifest_tx) = (dir.to_owned(), changes_tx.clone());
    tokio::spawn(async move {
        if let Err(e) = source::manifest_dir::watch(dir, interval, manifest_tx, skipped_tx).await {
            tracing::error!(error = %e, "local source stopped");
            std::process::exit(1);
        }
    });
    if let Some(dir) = config.enrolment_dir.clone() {
        tokio::spawn(source::manifest_dir::watch_enrolment(dir, interval, changes_tx.clone()));
    }
    if let Some(dir) = config.waypoint_records.clone() {
        tokio::spawn(write_records(dir, core.published.clone()));
    }
    for remote in config.remote_manifests.clone() {
        let enrolment = config.remote_enrolment.iter().find(|e| e.cluster == remote.cluster);
        tokio::spawn(source::remote::watch_dir(
            remote,
            enrolment.map(|e| e.dir.clone()),
            interval,
            config.remote_grace,
            changes_tx.clone(),
        ));
    }
    Ok(auth)
}

/// Cluster mode: watches (and remote clusters' Secrets), leader election, and while leading
/// the owned waypoint and gateway objects and every status; TokenReview for authentication.
async fn cluster_source(
    config: &Config,
    core: &core::Core,
    changes_tx: mpsc::Sender<source::Change>,
    ids: &Identities,
) -> anyhow::Result<controller::k8s::tokenreview::TokenReviewAuthenticator> {
    let client = controller::k8s::client().await.context("Kubernetes client")?;
    if config.remote_secrets {
        tokio::spawn(source::remote::watch_secrets(
            client.clone(),
            config.pod_namespace.clone(),
            config.remote_grace,
            changes_tx.clone(),
        ));
    }
    let watch_client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = controller::k8s::watch::run(watch_client, changes_tx).await {
            tracing::error!(error = %e, "Kubernetes watches stopped");
            std::process::exit(1);
        }
    });
    let leader = controller::k8s::leader::spawn(
        client.clone(),
        controller::k8s::leader::LeaderConfig {
            namespace: config.pod_namespace.clone(),
            name: "mesh-controller".to_owned(),
            identity: config.pod_name.clone(),
            lease_duration: Duration::from_secs(15),
        },
    );
    let writer = controller::k8s::writer::WriterConfig {
        image: config.waypoint_image.clone(),
        xds_address: format!("https://mesh-controller.{}.svc:15012", config.pod_namespace),
        root_cert: ids.root.trust_bundle().to_owned(),
        retry: Duration::from_secs(5),
        trust_bundle: Some(ids.bundle_rx.clone()),
    };
    spawn_writers(&client, writer, leader, core.published.clone());
    Ok(controller::k8s::tokenreview::TokenReviewAuthenticator::new(
        client,
        config.trust_domain.clone(),
        config.token_audiences.clone(),
    ))
}

/// Splits what is published into what each cluster writer follows (records, problems,
/// ingress route statuses), and starts the writers.
fn spawn_writers(
    client: &::kube::Client,
    writer: controller::k8s::writer::WriterConfig,
    leader: watch::Receiver<bool>,
    mut published: watch::Receiver<Published>,
) {
    let (records_tx, records_rx) = watch::channel(Vec::new());
    let (problems_tx, problems_rx) = watch::channel(Vec::new());
    let (ingress_tx, ingress_rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        while published.changed().await.is_ok() {
            let p = published.borrow_and_update().clone();
            // Waypoints and ingress gateways are deployed (and their status written) alike.
            let mut records = p.waypoints;
            records.extend(p.outputs.ingress.deployments.values().cloned());
            records_tx.send_if_modified(|w| std::mem::replace(w, records) != *w);
            let routes = p.outputs.ingress.route_parents.clone();
            ingress_tx.send_if_modified(|old| std::mem::replace(old, routes) != *old);
            problems_tx.send_if_modified(|old| std::mem::replace(old, p.problems) != *old);
        }
    });
    let retry = Duration::from_secs(5);
    tokio::spawn(controller::k8s::writer::run_status(
        client.clone(),
        retry,
        leader.clone(),
        problems_rx,
    ));
    tokio::spawn(controller::k8s::ingress_status::run(
        client.clone(),
        retry,
        leader.clone(),
        ingress_rx,
    ));
    tokio::spawn(controller::k8s::writer::run(client.clone(), writer, leader, records_rx));
}

/// VM tokens are accepted (and issued on the debug listener) only with a key.
fn with_vm_tokens(
    config: &Config,
    auth: Arc<dyn Authenticator>,
    registry: &mut Registry,
) -> anyhow::Result<(Arc<dyn Authenticator>, Option<controller::ca::VmTokenIssuer>)> {
    let Some(path) = &config.vm_token_key else {
        return Ok((auth, None));
    };
    let key = Arc::new(controller::ca::VmTokenKey::load_or_create(path).context("--vm-token-key")?);
    let clock = controller::ca::vm_token::system_clock();
    let auth: Arc<dyn Authenticator> = Arc::new(controller::ca::VmTokenAuth {
        key: key.clone(),
        trust_domain: config.trust_domain.clone(),
        clock: clock.clone(),
        metrics: controller::ca::VmTokenMetrics::register(registry),
        inner: auth,
    });
    let issuer = controller::ca::VmTokenIssuer {
        key,
        ttl: config.vm_token_ttl,
        clock,
    };
    Ok((auth, Some(issuer)))
}

/// The CA server, switching to a plug-in CA when its files appear or change (no restart).
fn start_ca(
    config: &Config,
    ids: Identities,
    auth: Arc<dyn Authenticator>,
    pods: Arc<core::NodePods>,
    metrics: CaMetrics,
) -> anyhow::Result<CaServer> {
    let mut ca_options = CaOptions::new(&config.trust_domain).map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
    ca_options.max_ttl = Duration::from_secs(config.max_cert_ttl_seconds);
    ca_options.default_ttl = ca_options.default_ttl.min(ca_options.max_ttl);
    let ca = CaServer::new(ids.root.clone(), auth, pods, ca_options, metrics.clone());
    tokio::spawn(controller::ca::plugin::watch(
        config.cacerts_dir.clone(),
        ids.plugin,
        config.trust_domain.clone(),
        Duration::from_secs(1),
        metrics,
        rotate(
            ca.clone(),
            config.ca_dir.clone(),
            Serving {
                identity: ids.identity,
                names: ids.names,
                tls: ids.tls,
            },
            ids.bundle_tx,
        ),
    ));
    Ok(ca)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load()?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = config.validate() {
        bail!("{e}");
    }
    let ids = Identities::load(&config)?;
    let (identity, tls) = (ids.identity.clone(), ids.tls.clone());
    let (core, changes_tx) = start_core(&config).await?;
    let (skipped_tx, skipped_rx) = watch::channel(Vec::new());

    let mut registry = Registry::with_prefix("controller");
    mesh_core::admin_http::register(&mut registry, "admin_connections_refused");
    let xds_metrics = XdsMetrics::register(&mut registry);
    let ca_metrics = CaMetrics::register(&mut registry);
    core.kind_metrics.register(&mut registry);

    let auth = match &config.manifest_dir {
        Some(dir) => local_source(&config, dir, &core, changes_tx, skipped_tx)?,
        None => {
            let review = cluster_source(&config, &core, changes_tx, &ids).await?;
            let metrics = controller::ca::review_bound::ReviewMetrics::register(&mut registry);
            let keys = controller::k8s::tokenreview::PublishedKeys::new(review.client());
            let keys = controller::ca::issuer_keys::IssuerKeys::new(Box::new(keys) as Box<dyn KeySource>);
            Arc::new(controller::ca::review_bound::ReviewBound::new(review, metrics).with_issuer_keys(keys))
        }
    };
    let (auth, vm_tokens) = with_vm_tokens(&config, auth, &mut registry)?;
    let ca = start_ca(&config, ids, auth.clone(), core.pods.clone(), ca_metrics)?;
    let ads = AdsServer::new(core.snapshots.clone(), auth, xds_metrics);
    let handshakes = serve::registered_handshake_limits(&mut registry);

    let admin = Arc::new(admin::Admin {
        registry,
        published: core.published.clone(),
        skipped: skipped_rx,
        vm_tokens,
    });
    for (flag, addr, role) in [
        ("--admin", config.admin, admin::Role::Monitoring),
        ("--debug-addr", config.debug_addr, admin::Role::Debug),
    ] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {flag} {addr}"))?;
        tokio::spawn(admin::serve(admin.clone(), role, listener));
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    tracing::info!(listen = %config.listen, admin = %config.admin, identity = %identity, "controller serving xDS and CA");
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // A proxy uses one stream per connection (xDS) or a few (CA calls); a client may not
        // open thousands on one connection.
        .max_concurrent_streams(Some(128))
        .add_service(ads.into_service())
        .add_service(ca.into_service())
        .serve_with_incoming_shutdown(
            serve::tls_incoming_live(listener, tls, handshakes),
            mesh_core::shutdown::shutdown_signal(),
        );
    server.await.context("gRPC server")?;
    tracing::info!("controller stopped");
    Ok(())
}
