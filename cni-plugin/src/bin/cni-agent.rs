//! The node agent: serves the CNI plugin on a unix socket, enrols ambient pods (redirection
//! rules inside their namespace, namespace handed to ztunnel over ZDS) and releases them.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cni_plugin::agent::server::Agent;
use cni_plugin::agent::zds::ZdsServer;
use mesh_core::zds::ZdsListener;

/// Ambient node agent.
#[derive(Debug, Parser)]
#[command(name = "cni-agent", version, about)]
struct Config {
    /// Socket the CNI plugin talks to.
    #[arg(long, env = "CNI_SOCKET", default_value = "/var/run/ambient/cni.sock")]
    cni_socket: PathBuf,
    /// Socket ztunnel connects to (ZDS).
    #[arg(long, env = "ZDS_SOCKET", default_value = "/var/run/ztunnel/ztunnel.sock")]
    zds_socket: PathBuf,
    /// Local mode: the controller's manifest directory (Namespaces and Pods).
    #[arg(long, env = "MANIFEST_DIR")]
    manifest_dir: PathBuf,
    /// Cluster id used in workload uids (`<cluster>//Pod/<ns>/<name>`).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Where the agent keeps the pods it knows across restarts.
    /// Local mode: keep the list of captured pods in this file (JSON `{"enrolled": ["ns/name"]}`)
    /// for the controller's `--enrolment-dir`.
    #[arg(long, env = "ENROLMENT_REPORT")]
    enrolment_report: Option<PathBuf>,
    /// This node's name: ambient pods scheduled here that never came through the CNI plugin
    /// (started before the mesh) are found by IP and enrolled.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Metrics (`/metrics`) and readiness (`/healthz/ready`).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:15022")]
    metrics_addr: std::net::SocketAddr,
    #[arg(long, env = "STATE_FILE", default_value = "/var/run/ambient/pods.json")]
    state_file: PathBuf,
    /// Log filter.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cfg.log))
        .json()
        .init();
    anyhow::ensure!(
        cfg.manifest_dir.is_dir(),
        "--manifest-dir {} is not a directory (point it at the controller's manifest directory)",
        cfg.manifest_dir.display()
    );
    for p in [&cfg.cni_socket, &cfg.zds_socket] {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    // Probe SNAT for enrolled pods, in the node namespace the agent runs in.
    cni_plugin::agent::host::install().context("installing the host probe SNAT table")?;
    let zds = ZdsServer::new();
    let agent = Agent::new(
        zds.clone(),
        cfg.manifest_dir.clone(),
        cfg.cluster_id.clone(),
        Some(cfg.state_file.clone()),
        cfg.enrolment_report.clone(),
        cfg.node_name.clone(),
    );
    // Pods from before a restart go into the snapshot of the first ztunnel to connect.
    let restored = agent.restore().await.context("restoring agent state")?;
    tracing::info!(pods = restored, "restored agent state");
    // Labels may have changed while the agent was down.
    agent.reconcile().await;
    tokio::spawn(zds.serve(ZdsListener::bind(&cfg.zds_socket)?));
    let _ = std::fs::remove_file(&cfg.cni_socket);
    let cni = tokio::net::UnixListener::bind(&cfg.cni_socket)
        .with_context(|| format!("binding the CNI socket {}", cfg.cni_socket.display()))?;
    tracing::info!(cni = %cfg.cni_socket.display(), zds = %cfg.zds_socket.display(), "node agent ready");
    tokio::spawn(agent.clone().watch_manifests(std::time::Duration::from_secs(1)));
    let mut registry = prometheus_client::registry::Registry::with_prefix("cni_agent");
    agent.metrics.register(&mut registry);
    let metrics = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {}", cfg.metrics_addr))?;
    tokio::spawn(cni_plugin::agent::server::serve_metrics(
        agent.clone(),
        std::sync::Arc::new(registry),
        metrics,
    ));
    tokio::select! {
        _ = agent.serve(cni) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
