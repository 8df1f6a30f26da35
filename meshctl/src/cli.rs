//! Command-line definitions (clap derive) and dispatch to the library modules. Exit codes:
//! 0 ok, 1 findings or failures, 2 usage errors (clap's own code for bad arguments).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshctl::analyze;
use meshctl::check::{self, KernelProbe};
use meshctl::demo::{self, Down};
use meshctl::install::{self, Manifests, Overrides};
use meshctl::style::Style;
use meshctl::waypoint::{self, WaypointFor};
use meshctl::ztunnel_config::{self, Format, Section};

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "Command line for the ambient mesh",
    after_help = "Exit status: 0 ok, 1 findings or failures, 2 usage errors.\n\
                  Colour is used only when stdout is a terminal and NO_COLOR is unset."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Render the Kubernetes manifests (default) or apply them with kubectl.
    Install(InstallArgs),
    /// Pre-flight checks for a node: kernel features, nft, CNI config, control plane and ztunnel readiness.
    Check(CheckArgs),
    /// Show ztunnel's configuration (from its admin /config_dump).
    #[command(name = "ztunnel-config")]
    ZtunnelConfig(ZtunnelConfigArgs),
    /// The clusters the controller serves: its own and the remote ones, with their sync state.
    Clusters(ClustersArgs),
    /// Create, list and delete waypoints (Gateways of class istio-waypoint).
    Waypoint {
        #[command(subcommand)]
        action: WaypointAction,
    },
    /// Find mistakes in manifests: everything the controller would report, and more.
    Analyze(AnalyzeArgs),
    /// Explain what the mesh does with one call: capture, waypoint, route, and the policy rule that decides.
    Explain(ExplainArgs),
    /// Drive the local network-namespace demo (needs root).
    Demo(DemoArgs),
    /// Virtual machines (WorkloadEntries with their own ztunnel).
    Vm {
        #[command(subcommand)]
        action: VmAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmAction {
    /// Print a bootstrap token for a VM's ztunnel, bound to one WorkloadGroup's service
    /// account (from the controller's loopback debug listener).
    Token(VmTokenArgs),
}

#[derive(clap::Args, Debug)]
pub struct VmTokenArgs {
    /// The WorkloadGroup, as <namespace>/<name>.
    #[arg(long)]
    pub group: String,
    /// Lifetime in seconds (default: the controller's --vm-token-ttl).
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u64>,
    /// The controller's debug address (localhost only).
    #[arg(
        long,
        env = "CONTROLLER_DEBUG",
        value_name = "URL",
        default_value = "http://127.0.0.1:15015"
    )]
    pub admin: String,
    /// Seconds to wait for the controller.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Write the manifests to stdout as one multi-document YAML stream (the default).
    #[arg(long, conflicts_with = "apply")]
    pub print: bool,
    /// Pipe the stream to `kubectl apply --server-side -f -`.
    #[arg(long)]
    pub apply: bool,
    /// Registry (and path) for the mesh images, e.g. registry.example/mesh.
    #[arg(long, env = "MESH_HUB", value_name = "REGISTRY")]
    pub hub: Option<String>,
    /// Tag for the mesh images (default: the kustomization's, 0.1.0).
    #[arg(long, env = "MESH_TAG")]
    pub tag: Option<String>,
    /// Read the manifests from this kustomize directory instead of the built-in copy.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Controller monitoring address; GET <URL>/ready must answer 200.
    #[arg(
        long,
        env = "MESH_CONTROLLER",
        value_name = "URL",
        default_value = "http://127.0.0.1:15014"
    )]
    pub controller: String,
    /// ztunnel readiness address(es); GET <URL>/healthz/ready must answer 200. Repeatable.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:15021")]
    pub ztunnel: Vec<String>,
    /// CNI configuration directory that must hold the primary CNI's *.conflist.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_dir: PathBuf,
    /// Root of the node's file system (/proc, /sys, /lib/modules), e.g. /host in a container.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub host_root: PathBuf,
    /// Seconds to wait for each HTTP endpoint.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct ZtunnelConfigArgs {
    /// What to show.
    #[arg(value_enum)]
    pub section: Section,
    /// ztunnel admin address (serves /config_dump; localhost only).
    #[arg(
        long,
        env = "ZTUNNEL_ADMIN",
        value_name = "URL",
        default_value = "http://127.0.0.1:15000"
    )]
    pub admin: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Format,
    /// Seconds to wait for the admin endpoint.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct ClustersArgs {
    /// The controller's debug address (serves /debug/clusters; localhost only: run it where
    /// the controller runs, or through `kubectl port-forward`).
    #[arg(
        long,
        env = "CONTROLLER_DEBUG",
        value_name = "URL",
        default_value = "http://127.0.0.1:15015"
    )]
    pub admin: String,
    /// Print the controller's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the controller.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct WaypointArgs {
    /// Namespace of the waypoint.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// Name of the waypoint Gateway.
    #[arg(long, default_value = "waypoint")]
    pub name: String,
    /// The controller's local manifest directory; without it, kubectl is used.
    #[arg(long, env = "MESH_MANIFEST_DIR", value_name = "DIR")]
    pub manifest_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum WaypointAction {
    /// Create or update a waypoint Gateway (class istio-waypoint, listener mesh HBONE 15008).
    Apply {
        #[command(flatten)]
        common: WaypointArgs,
        /// Which traffic it handles (label istio.io/waypoint-for): service, workload, all or none.
        #[arg(long = "for", value_parser = parse_waypoint_for, default_value = "service")]
        for_: WaypointFor,
        /// Send the namespace's traffic through it (label istio.io/use-waypoint=<name>).
        #[arg(long)]
        enroll_namespace: bool,
    },
    /// List waypoints: NAMESPACE NAME FOR.
    List {
        /// Only this namespace (default: all).
        #[arg(short, long)]
        namespace: Option<String>,
        /// The controller's local manifest directory; without it, kubectl is used.
        #[arg(long, env = "MESH_MANIFEST_DIR", value_name = "DIR")]
        manifest_dir: Option<PathBuf>,
    },
    /// Delete a waypoint Gateway.
    Delete {
        #[command(flatten)]
        common: WaypointArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// Manifest files or directories (searched recursively for .yaml, .yml, .json).
    #[arg(default_value = ".")]
    pub paths: Vec<PathBuf>,
    /// A remote cluster's manifests, `<cluster-id>=<path>` (repeatable): analyzed together
    /// with PATHS as the controller merges clusters.
    #[arg(long = "remote", value_name = "ID=PATH")]
    pub remotes: Vec<String>,
    /// The cluster id of PATHS (the controller's --cluster-id).
    #[arg(long, default_value = "Kubernetes")]
    pub cluster_id: String,
}

#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// Manifest files or directories the controller reads (in local mode, the live state).
    #[arg(short = 'f', long = "file", value_name = "PATH", default_value = ".")]
    pub paths: Vec<PathBuf>,
    /// The caller: namespace/pod, or an IP address.
    #[arg(long)]
    pub from: String,
    /// What it dials: a service (name.namespace[:port]), a pod (namespace/pod[:port]) or ip[:port].
    #[arg(long)]
    pub to: String,
    /// HTTP method of the request.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// HTTP path of the request (with an optional ?query).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// A request header, "name: value". Repeatable.
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The demo's state file (written by `demo --hold --state-file`).
    #[arg(long, global = true, env = "MESH_DEMO_STATE", value_name = "FILE", default_value = demo::DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    #[command(subcommand)]
    pub action: DemoAction,
}

#[derive(Subcommand, Debug)]
pub enum DemoAction {
    /// Start the demo in the background and wait until it is up.
    Up {
        /// The demo binary (default: target/release/demo, else next to meshctl).
        #[arg(long, env = "MESH_DEMO_BINARY", value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Seconds to wait for the state file.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
    },
    /// Send requests from the client pod and count answers per status and server.
    Traffic {
        /// Number of requests.
        #[arg(short = 'n', long, default_value_t = 200)]
        requests: usize,
        /// Extra request header, e.g. 'x-canary: true'. Repeatable.
        #[arg(short = 'H', long = "header", value_name = "HEADER")]
        headers: Vec<String>,
        /// URL to call instead of the state file's client URL.
        #[arg(long)]
        url: Option<String>,
        /// Reuse one connection (default: a new connection per request).
        #[arg(long)]
        keep_alive: bool,
    },
    /// Is the demo running, and does every endpoint answer?
    Status,
    /// Stop the demo and check that its network namespaces are gone.
    Down {
        /// Seconds to wait for the demo to exit.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Install(a) => run_install(a),
        Command::Check(a) => Ok(run_check(a)),
        Command::ZtunnelConfig(a) => {
            let out = ztunnel_config::run(&a.admin, a.section, a.output, Duration::from_secs(a.timeout))?;
            print!("{out}");
            Ok(0)
        }
        Command::Clusters(a) => {
            // Exit status 1 while a remote cluster is not synced.
            let (out, synced) = meshctl::clusters::run(&a.admin, a.json, Duration::from_secs(a.timeout))?;
            print!("{out}");
            Ok(if synced { 0 } else { 1 })
        }
        Command::Waypoint { action } => run_waypoint(action),
        Command::Analyze(a) => run_analyze(a),
        Command::Explain(a) => run_explain(a),
        Command::Demo(a) => run_demo(a),
        Command::Vm {
            action: VmAction::Token(a),
        } => {
            let token = meshctl::vm::token(&a.admin, &a.group, a.ttl, Duration::from_secs(a.timeout))?;
            println!("{token}");
            Ok(0)
        }
    }
}

/// Exit status 0 when the call is allowed (or answered by the waypoint), 1 when refused;
/// usage errors (an unreadable --from/--to/--header) are 2, as clap's.
fn run_explain(a: ExplainArgs) -> anyhow::Result<i32> {
    use meshctl::explain::{self, call, Verdict};
    let parsed = (|| {
        let from = call::parse_source(&a.from)?;
        let (to, port) = call::parse_target(&a.to, 80)?;
        let headers = a
            .headers
            .iter()
            .map(|h| call::parse_header(h))
            .collect::<Result<_, _>>()?;
        Ok::<_, call::CallError>(explain::Call {
            from,
            to,
            port,
            method: a.method.to_ascii_uppercase(),
            path: a.path.clone(),
            headers,
        })
    })();
    let c = match parsed {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    let ex = explain::run(&a.paths, &c)?;
    print!("{}", ex.render());
    Ok(match ex.verdict {
        Verdict::Denied { .. } => 1,
        _ => 0,
    })
}

fn run_install(a: InstallArgs) -> anyhow::Result<i32> {
    let manifests = match &a.manifests {
        Some(dir) => Manifests::from_dir(dir)?,
        None => Manifests::embedded(),
    };
    let stream = install::render(&manifests, &Overrides { hub: a.hub, tag: a.tag })?;
    if a.apply {
        let out = meshctl::kubectl::run(
            &["apply", "--server-side", "-f", "-"],
            Some(&stream),
            "meshctl install --print > mesh.yaml",
        )?;
        print!("{out}");
    } else {
        print!("{stream}");
    }
    Ok(0)
}

fn run_check(a: CheckArgs) -> i32 {
    let style = Style::detect();
    let timeout = Duration::from_secs(a.timeout);
    let mut results = check::kernel(&KernelProbe::new(&a.host_root));
    results.push(check::nft_binary());
    results.push(check::cni_dir(&a.cni_dir));
    results.push(check::readiness("controller", &a.controller, "/ready", timeout));
    results.push(check::kind_sync(&a.controller, timeout));
    for z in &a.ztunnel {
        results.push(check::readiness("ztunnel", z, "/healthz/ready", timeout));
    }
    for r in &results {
        println!("{}", r.render(style));
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    if failed == 0 {
        println!("all {} checks passed", results.len());
        0
    } else {
        println!("{failed} of {} checks failed", results.len());
        1
    }
}

fn run_waypoint(action: WaypointAction) -> anyhow::Result<i32> {
    match action {
        WaypointAction::Apply {
            common,
            for_,
            enroll_namespace,
        } => {
            let (ns, name) = (&common.namespace, &common.name);
            match &common.manifest_dir {
                Some(dir) => {
                    let path = waypoint::apply_local(dir, ns, name, for_)?;
                    println!("waypoint {ns}/{name} written to {}", path.display());
                    if enroll_namespace {
                        println!("{}", waypoint::enroll_hint(ns, name));
                    }
                }
                None => print!("{}", waypoint::apply_kubectl(ns, name, for_, enroll_namespace)?),
            }
        }
        WaypointAction::List {
            namespace,
            manifest_dir,
        } => {
            let mut list = match &manifest_dir {
                Some(dir) => waypoint::list_local(dir)?,
                None => waypoint::list_kubectl()?,
            };
            if let Some(ns) = namespace {
                list.retain(|l| l.namespace == ns);
            }
            print!("{}", waypoint::table(&list));
        }
        WaypointAction::Delete { common } => {
            let (ns, name) = (&common.namespace, &common.name);
            match &common.manifest_dir {
                Some(dir) => {
                    let path = waypoint::delete_local(dir, ns, name)?;
                    println!("waypoint {ns}/{name} deleted ({} removed)", path.display());
                }
                None => print!("{}", waypoint::delete_kubectl(ns, name)?),
            }
        }
    }
    Ok(0)
}

fn run_analyze(a: AnalyzeArgs) -> anyhow::Result<i32> {
    let style = Style::detect();
    let mut remotes = Vec::new();
    for r in &a.remotes {
        let Some((id, path)) = r.split_once('=') else {
            anyhow::bail!("--remote {r:?}: expected <cluster-id>=<path>");
        };
        remotes.push((id.to_owned(), PathBuf::from(path)));
    }
    let report = analyze::run_multicluster(&a.paths, &a.cluster_id, &remotes)?;
    for f in &report.findings {
        println!("{}", f.render(style));
    }
    println!("{}", report.summary());
    Ok(if report.findings.is_empty() { 0 } else { 1 })
}

fn run_demo(a: DemoArgs) -> anyhow::Result<i32> {
    let style = Style::detect();
    let state = a.state_file.as_path();
    match a.action {
        DemoAction::Up { binary, timeout } => {
            let bin = demo::find_binary(binary.as_deref())?;
            print!("{}", demo::up(&bin, state, Duration::from_secs(timeout))?);
            Ok(0)
        }
        DemoAction::Traffic {
            requests,
            headers,
            url,
            keep_alive,
        } => {
            let summary = demo::traffic(state, requests, &headers, url.as_deref(), keep_alive)?;
            print!("{}", summary.render());
            let answered = summary.by_status.keys().any(|k| !k.starts_with("000"));
            Ok(if answered { 0 } else { 1 })
        }
        DemoAction::Status => {
            let (ok, text) = demo::status(state, style)?;
            print!("{text}");
            Ok(if ok { 0 } else { 1 })
        }
        DemoAction::Down { timeout } => match demo::down(state, Duration::from_secs(timeout))? {
            Down::NothingToDo => {
                println!("nothing to tear down (no state file at {})", state.display());
                Ok(0)
            }
            Down::Stopped { pid } => {
                println!("demo (pid {pid}) stopped; its network namespaces are gone");
                Ok(0)
            }
            Down::StillRunning { pid, secs } => {
                println!(
                    "{} demo (pid {pid}) still running after {secs}s; state file kept. Try again, or kill -KILL {pid}",
                    style.fail()
                );
                Ok(1)
            }
            Down::Leftovers { pid, namespaces } => {
                println!(
                    "{} demo (pid {pid}) exited but left network namespaces behind: {}\n    fix: ip netns delete <name> for each",
                    style.fail(),
                    namespaces.join(" ")
                );
                Ok(1)
            }
        },
    }
}

fn parse_waypoint_for(s: &str) -> Result<WaypointFor, String> {
    WaypointFor::parse(Some(s))
}
