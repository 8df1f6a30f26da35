//! The node agent: serves the CNI plugin on a unix socket, enrols ambient pods (redirection
//! rules inside their namespace, namespace handed to ztunnel over ZDS) and releases them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cni_plugin::agent::dir::ManifestDir;
use cni_plugin::agent::inventory::InventorySource;
use cni_plugin::agent::k8s::{AnnotationReporter, ClusterInventory};
use cni_plugin::agent::report::EnrolmentReporter;
use cni_plugin::agent::server::{Agent, AgentPaths};
use cni_plugin::agent::zds::ZdsServer;
use mesh_core::zds::ZdsListener;

/// Ambient node agent.
#[derive(Debug, Parser)]
#[command(name = "cni-agent", version, about)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["manifest_dir", "kubernetes"])))]
struct Config {
    /// Socket the CNI plugin talks to.
    #[arg(long, env = "CNI_SOCKET", default_value = "/var/run/ambient/cni.sock")]
    cni_socket: PathBuf,
    /// Socket ztunnel connects to (ZDS).
    #[arg(long, env = "ZDS_SOCKET", default_value = "/var/run/ztunnel/ztunnel.sock")]
    zds_socket: PathBuf,
    /// Local mode: the controller's manifest directory (Namespaces and Pods).
    #[arg(long, env = "MANIFEST_DIR")]
    manifest_dir: Option<PathBuf>,
    /// Cluster mode: watch namespaces and this node's pods in the API server (in-cluster
    /// config or KUBECONFIG) and annotate captured pods. Needs --node-name.
    #[arg(long)]
    kubernetes: bool,
    /// Cluster id used in workload uids (`<cluster>//Pod/<ns>/<name>`).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Where the agent keeps the pods it knows across restarts.
    /// Local mode: keep the list of captured pods in this file (JSON `{"enrolled": ["ns/name"]}`)
    /// for the controller's `--enrolment-dir`.
    #[arg(long, env = "ENROLMENT_REPORT")]
    enrolment_report: Option<PathBuf>,
    /// This node's name: ambient pods scheduled here that never came through the CNI plugin
    /// (started before the mesh) are found by IP and enrolled. Cluster mode watches only the
    /// pods of this node.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Metrics (`/metrics`) and readiness (`/healthz/ready`): `ip:port`, `[ipv6]:port`, or
    /// `[ip]:port` for either family, so a manifest can write `[$(HOST_IP)]:15022` whatever
    /// the node's address family (a bare IPv6 address before `:port` would be ambiguous).
    /// Spelled as ztunnel's and the waypoint's; formerly `--metrics-addr` (still accepted) and
    /// `METRICS_ADDR` (still read when neither the flag nor `STATS_ADDR` is set).
    #[arg(long, alias = "metrics-addr", env = "STATS_ADDR", default_value = "127.0.0.1:15022")]
    stats_addr: ListenAddr,
    #[arg(long, env = "STATE_FILE", default_value = "/var/run/ambient/pods.json")]
    state_file: PathBuf,
    /// The sysctl tree each pod's net.ipv4.tcp_migrate_req is written through, from a thread
    /// in the pod's network namespace. Unprivileged containers get a read-only /proc/sys: mount
    /// the node's read-write elsewhere (a hostPath of /proc/sys/net at <dir>/net) and name it here.
    #[arg(long, env = "PROC_SYS_DIR", default_value = cni_plugin::agent::rules::PROC_SYS)]
    proc_sys_dir: PathBuf,
    /// Log filter.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::load(|k| std::env::var_os(k))?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cfg.log))
        .json()
        .init();
    let mode = mode(&cfg)?;
    for p in [&cfg.cni_socket, &cfg.zds_socket] {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    cni_plugin::agent::rules::check_proc_sys(&cfg.proc_sys_dir).with_context(|| {
        format!(
            "--proc-sys-dir {} cannot take the pods' sysctls: mount the node's /proc/sys (or its \
             net/) read-write there",
            cfg.proc_sys_dir.display()
        )
    })?;
    // Probe SNAT for enrolled pods, in the node namespace the agent runs in.
    cni_plugin::agent::host::install().context("installing the host probe SNAT table")?;
    let (source, reporter): (_, Option<Arc<dyn EnrolmentReporter>>) = match mode {
        Mode::Dir(dir) => (InventorySource::Dir(ManifestDir::new(dir)), None),
        Mode::Kubernetes { node } => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API server (in-cluster config or KUBECONFIG)")?;
            let cluster = ClusterInventory::new(client.clone());
            tokio::spawn(cluster.clone().run(node));
            (
                InventorySource::Kubernetes(cluster),
                Some(AnnotationReporter::start(client)),
            )
        }
    };
    let zds = ZdsServer::new();
    let agent = Agent::new(
        zds.clone(),
        source,
        cfg.cluster_id.clone(),
        AgentPaths {
            state_file: Some(cfg.state_file.clone()),
            report_file: cfg.enrolment_report.clone(),
            proc_sys: cfg.proc_sys_dir.clone(),
        },
        reporter,
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
    tokio::spawn(agent.clone().watch_source(std::time::Duration::from_secs(1)));
    tokio::spawn(agent.clone().retry_pending());
    let mut registry = prometheus_client::registry::Registry::with_prefix("cni_agent");
    agent.metrics.register(&mut registry);
    mesh_core::admin_http::register(&mut registry, "admin_connections_refused");
    let metrics = tokio::net::TcpListener::bind(cfg.stats_addr.0)
        .await
        .with_context(|| format!("binding --stats-addr {}", cfg.stats_addr.0))?;
    tokio::spawn(cni_plugin::agent::server::serve_metrics(
        agent.clone(),
        Arc::new(registry),
        metrics,
    ));
    tokio::select! {
        _ = agent.serve(cni) => {}
        _ = mesh_core::shutdown::shutdown_signal() => {}
    }
    Ok(())
}

impl Config {
    /// The configuration from the command line and environment, with the former variable
    /// `METRICS_ADDR` read through `lookup` where neither the flag nor `STATS_ADDR` was given.
    fn load(lookup: impl Fn(&str) -> Option<std::ffi::OsString>) -> anyhow::Result<Config> {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Config::command().get_matches();
        let mut cfg = Config::from_arg_matches(&matches)?;
        if matches.value_source("stats_addr") == Some(clap::parser::ValueSource::DefaultValue) {
            if let Some(addr) = mesh_core::former_env::read("METRICS_ADDR", "STATS_ADDR", lookup)? {
                cfg.stats_addr = addr;
            }
        }
        Ok(cfg)
    }
}

/// Where the agent reads pods and namespaces from.
#[derive(Debug, PartialEq)]
enum Mode {
    Dir(PathBuf),
    Kubernetes { node: String },
}

/// Checks what clap cannot: cluster mode needs the node name, local mode a real directory.
fn mode(cfg: &Config) -> anyhow::Result<Mode> {
    if cfg.kubernetes {
        let node = cfg.node_name.clone().filter(|n| !n.is_empty()).context(
            "--kubernetes needs --node-name (or NODE_NAME, from the downward API's spec.nodeName): \
             the agent watches only this node's pods",
        )?;
        return Ok(Mode::Kubernetes { node });
    }
    // clap's group makes one of the two required.
    let dir = cfg
        .manifest_dir
        .clone()
        .context("--manifest-dir or --kubernetes is required")?;
    anyhow::ensure!(
        dir.is_dir(),
        "--manifest-dir {} is not a directory (point it at the controller's manifest directory)",
        dir.display()
    );
    Ok(Mode::Dir(dir))
}

/// A listen address as [`listen_addr`] reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ListenAddr(std::net::SocketAddr);

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        listen_addr(text).map(ListenAddr)
    }
}

/// `ip:port` or `[ip]:port` (IPv4 in brackets too: what `[$(HOST_IP)]:port` expands to).
fn listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let bad = || format!("{text:?} is not ip:port or [ip]:port");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .ok_or_else(bad)?
        .parse::<std::net::IpAddr>()
        .map_err(|_| bad())?;
    Ok(std::net::SocketAddr::new(ip, port.parse().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_takes_either_family_in_brackets() {
        let addr = |s: &str| listen_addr(s).map(|a| a.to_string());
        assert_eq!(addr("10.0.0.1:15022").as_deref(), Ok("10.0.0.1:15022"));
        assert_eq!(addr("[10.0.0.1]:15022").as_deref(), Ok("10.0.0.1:15022"));
        assert_eq!(addr("[fd00::1]:15022").as_deref(), Ok("[fd00::1]:15022"));
        // What `$(HOST_IP):15022` gave on an IPv6 node: refused, not misread.
        assert!(listen_addr("fd00::1:15022").is_err());
        assert!(listen_addr("[fd00::1]").is_err());
        assert!(listen_addr("[node]:15022").is_err());
    }

    #[test]
    fn stats_addr_is_the_one_spelling_and_the_former_still_works() {
        if std::env::var_os("STATS_ADDR").is_some() {
            return;
        }
        let cfg = parse(&["--kubernetes", "--stats-addr", "[10.0.0.1]:9022"]).expect("parses");
        assert_eq!(cfg.stats_addr.0.to_string(), "10.0.0.1:9022");
        let cfg = parse(&["--kubernetes", "--metrics-addr", "10.0.0.2:9022"]).expect("former flag");
        assert_eq!(cfg.stats_addr.0.to_string(), "10.0.0.2:9022");
        assert!(parse(&["--kubernetes", "--stats-addr", "fd00::1:15022"]).is_err());
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("cni-agent").chain(args.iter().copied()))
    }

    #[test]
    fn exactly_one_source_and_cluster_mode_needs_the_node() {
        // Environment variables would leak into the parse.
        for var in ["MANIFEST_DIR", "NODE_NAME", "PROC_SYS_DIR"] {
            if std::env::var_os(var).is_some() {
                return;
            }
        }
        assert!(parse(&[]).is_err(), "a source is required");
        assert!(parse(&["--kubernetes", "--manifest-dir", "/tmp"]).is_err());

        let cfg = parse(&["--kubernetes"]).expect("parses");
        let err = mode(&cfg).expect_err("no node name");
        assert!(err.to_string().contains("--node-name"), "{err}");
        assert_eq!(cfg.proc_sys_dir, PathBuf::from("/proc/sys"));
        let cfg = parse(&["--kubernetes", "--node-name", "node-1", "--proc-sys-dir=/host/proc/sys"]).expect("parses");
        assert_eq!(cfg.proc_sys_dir, PathBuf::from("/host/proc/sys"));
        assert_eq!(
            mode(&cfg).expect("cluster mode"),
            Mode::Kubernetes { node: "node-1".into() }
        );

        let dir = std::env::temp_dir();
        let cfg = parse(&["--manifest-dir", dir.to_str().expect("utf-8")]).expect("parses");
        assert_eq!(mode(&cfg).expect("local mode"), Mode::Dir(dir));
        let cfg = parse(&["--manifest-dir", "/nonexistent/manifests"]).expect("parses");
        assert!(mode(&cfg).is_err());
    }
}
