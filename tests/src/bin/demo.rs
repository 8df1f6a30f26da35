//! The local demo (the README's first command runs it through scripts/demo.sh): the brief's
//! shop from `examples/demo/` on a two-node mesh made of network namespaces (see
//! `mesh_e2e::cluster`): the controller in local mode reading the example manifests, a node
//! agent and an in-pod ztunnel per node, pods created through the real CNI chain, the waypoint
//! the controller asked for, and a real Prometheus scraping all of them. It drives traffic with
//! visible progress and prints what the mesh did: identities, the canary split, allowed and
//! denied calls, latency, where metrics and logs are.
//!
//! `--hold` keeps everything up until Ctrl-C or SIGTERM (`meshctl demo down`); `--state-file`
//! writes where things are for `meshctl demo status|traffic`. Everything is torn down on exit.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_e2e::apps::{named_server, HttpConn};
use mesh_e2e::cluster::{Cluster, Pod, PodSpec, CNI_BIN};
use mesh_e2e::privileged;
use mesh_e2e::prometheus::Prometheus;
use mesh_e2e::waypoint::{identity, Waypoint};
use serde::Deserialize as _;

const ID: u8 = 200;
const WAIT: Duration = Duration::from_secs(20);

struct Args {
    hold: bool,
    state_file: Option<PathBuf>,
    requests: usize,
    examples: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        hold: false,
        state_file: None,
        requests: 1000,
        examples: PathBuf::from("examples/demo"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--hold" => a.hold = true,
            "--state-file" => a.state_file = Some(it.next().context("--state-file FILE")?.into()),
            "--requests" => a.requests = it.next().context("--requests N")?.parse()?,
            "--examples" => a.examples = it.next().context("--examples DIR")?.into(),
            "-h" | "--help" => {
                println!("usage: demo [--hold] [--state-file FILE] [--requests N] [--examples DIR]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; try --help"),
        }
    }
    Ok(a)
}

fn section(title: &str) {
    println!("\n== {title} ==");
}

/// A pod of `pods.yaml`: where it runs and what it is.
struct PodDoc {
    name: String,
    namespace: String,
    service_account: String,
    node: u8,
    labels: Vec<(String, String)>,
}

fn pod_docs(path: &Path) -> Result<Vec<PodDoc>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let v = serde_yaml::Value::deserialize(doc)
            .map_err(anyhow::Error::from)
            .and_then(|y| Ok(serde_json::to_value(y)?))
            .with_context(|| format!("{} document {i}", path.display()))?;
        let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).map(str::to_owned);
        let name = s("/metadata/name").with_context(|| format!("{} document {i}: metadata.name", path.display()))?;
        let node = match s("/spec/nodeName").as_deref() {
            Some("node-0") => 0,
            Some("node-1") => 1,
            other => bail!(
                "{} document {i}: spec.nodeName {other:?} is not node-0 or node-1",
                path.display()
            ),
        };
        let labels = v
            .pointer("/metadata/labels")
            .and_then(|l| l.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(PodDoc {
            service_account: s("/spec/serviceAccountName").unwrap_or_else(|| name.clone()),
            namespace: s("/metadata/namespace").unwrap_or_else(|| "default".to_owned()),
            name,
            node,
            labels,
        });
    }
    Ok(out)
}

/// A progress bar on a terminal; a single line when done otherwise (logs stay readable).
fn progress(what: &str, done: usize, total: usize) {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        if done == total {
            eprintln!("  {what:<28} {done}/{total} done");
        }
        return;
    }
    let width = 30;
    let filled = done * width / total.max(1);
    eprint!(
        "\r  {what:<28} [{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    if done == total {
        eprintln!();
    }
    let _ = std::io::stderr().flush();
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

async fn run(a: &Args) -> Result<()> {
    let mesh = std::fs::read_to_string(a.examples.join("mesh.yaml"))
        .with_context(|| format!("reading {}/mesh.yaml", a.examples.display()))?;
    let pods = pod_docs(&a.examples.join("pods.yaml"))?;

    section("a two-node cluster: controller (local mode), node agents, ztunnels");
    let t = Instant::now();
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(ID, 2, &mesh, &[&wp_id])
        .await
        .context("cluster")?;
    println!(
        "ready in {:.1} s: controller {}:15012, manifests from {}",
        t.elapsed().as_secs_f64(),
        cluster.controller_ip(),
        a.examples.display()
    );

    section("pods through the CNI chain (bridge + host-local + ambient-cni)");
    let by_name = add_pods(&cluster, &pods)?;
    let waypoint = Waypoint::start(&cluster, 1, "shop", "waypoint").await?;
    println!(
        "shop/waypoint (the Gateway's waypoint) on node-1 at {}",
        waypoint.pod.ip
    );
    for pod in by_name.values() {
        cluster.wait_workload(pod, true, WAIT).await?;
    }
    let targets: Vec<(&str, SocketAddr)> = vec![
        ("controller", SocketAddr::new(cluster.controller_ip(), 15014)),
        ("ztunnel", SocketAddr::new(Cluster::underlay_ip(ID, 0), 15020)),
        ("ztunnel", SocketAddr::new(Cluster::underlay_ip(ID, 1), 15020)),
        ("waypoint", SocketAddr::new(waypoint.pod.ip, 15020)),
    ];
    let prom_addr = SocketAddr::new(cluster.controller_ip(), 9090);
    let prom = Prometheus::start(cluster.controller.ns, prom_addr, &targets).await?;
    println!("Prometheus scraping controller, 2 ztunnels and the waypoint at {prom_addr}");

    section("traffic");
    let mut seen = traffic(&by_name, a.requests).await?;
    section("summary");
    summary(&mut seen, &prom).await?;
    let demo = Demo {
        cluster: &cluster,
        waypoint: &waypoint,
        pods: &by_name,
        prom_addr,
    };
    demo.print_pointers();
    if a.hold {
        if let Some(path) = &a.state_file {
            demo.write_state(path)?;
        }
        hold(a).await?;
    } else {
        println!("\nrun `sudo scripts/demo.sh --hold` to keep it up and explore; tearing down now");
    }
    println!("tearing down pods, nodes, processes");
    drop(prom);
    drop(waypoint);
    for pod in by_name.values() {
        cluster.delete_pod(pod)?;
    }
    Ok(())
}

/// Starts every pod of pods.yaml through the CNI chain; those with an `app` label serve
/// their name on 8080.
fn add_pods(cluster: &Cluster, pods: &[PodDoc]) -> Result<BTreeMap<String, Pod>> {
    let mut by_name: BTreeMap<String, Pod> = BTreeMap::new();
    for p in pods {
        let labels: Vec<(&str, &str)> = p.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let spec = PodSpec {
            name: &p.name,
            namespace: &p.namespace,
            service_account: &p.service_account,
            labels: &labels,
        };
        let pod = cluster.add_pod(p.node, spec)?;
        println!(
            "{}/{} on node-{} at {}: captured={}, ambient-cni ADD {:.1} ms",
            p.namespace,
            p.name,
            p.node,
            pod.ip,
            pod.captured(),
            pod.plugin_add.as_secs_f64() * 1e3
        );
        if p.labels.iter().any(|(k, _)| k == "app") {
            let name: &'static str = Box::leak(p.name.clone().into_boxed_str());
            tokio::spawn(named_server(pod.ns.listen(SocketAddr::new(pod.ip, 8080))?, name));
        }
        by_name.insert(p.name.clone(), pod);
    }
    Ok(by_name)
}

/// A service VIP of the demo's cluster, port 80.
fn vip(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, ID, n)), 80)
}

/// What the traffic saw: who answered reviews, the canary header's share, each payments
/// call's statuses, keep-alive latencies.
struct Seen {
    served: BTreeMap<String, usize>,
    latencies: Vec<Duration>,
    canary_v2: usize,
    canary_n: usize,
    outcomes: BTreeMap<&'static str, BTreeMap<u16, usize>>,
}

/// Sends the demo's traffic: reviews (canary split and header), payments (L7 policy), and a
/// direct call to the payments pod that bypasses its waypoint.
async fn traffic(by_name: &BTreeMap<String, Pod>, requests: usize) -> Result<Seen> {
    let client = by_name.get("order-service").context("pods.yaml needs order-service")?;
    let mut reviews = HttpConn::open(&client.ns, vip(10), "reviews.shop.svc.cluster.local").await?;
    let mut seen = Seen {
        served: BTreeMap::new(),
        latencies: Vec::with_capacity(requests),
        canary_v2: 0,
        canary_n: 100,
        outcomes: BTreeMap::new(),
    };
    for i in 1..=requests {
        let start = Instant::now();
        let answer = reviews.send("GET", "/reviews/1", &[]).await?;
        seen.latencies.push(start.elapsed());
        let who = answer.body.lines().next().unwrap_or("?").to_owned();
        *seen.served.entry(format!("{who} ({})", answer.status)).or_default() += 1;
        if i % 50 == 0 || i == requests {
            progress("GET reviews (90/10 canary)", i, requests);
        }
    }
    for i in 1..=seen.canary_n {
        let answer = reviews.send("GET", "/reviews/1", &[("x-canary", "true")]).await?;
        seen.canary_v2 += usize::from(answer.body.starts_with("reviews-v2\n"));
        if i % 25 == 0 {
            progress("GET reviews, x-canary: true", i, seen.canary_n);
        }
    }
    payments(by_name, &mut seen.outcomes).await?;
    Ok(seen)
}

/// Payments calls from order-service (allowed POST, denied GET) and frontend (denied), then
/// frontend dialling the payments pod by IP.
async fn payments(
    by_name: &BTreeMap<String, Pod>,
    outcomes: &mut BTreeMap<&'static str, BTreeMap<u16, usize>>,
) -> Result<()> {
    let client = by_name.get("order-service").context("pods.yaml needs order-service")?;
    let frontend = by_name.get("frontend").context("pods.yaml needs frontend")?;
    let mut pay = HttpConn::open(&client.ns, vip(13), "payments.shop.svc.cluster.local").await?;
    let mut other = HttpConn::open(&frontend.ns, vip(13), "payments.shop.svc.cluster.local").await?;
    let calls = 50;
    for i in 1..=calls {
        for (what, from_frontend, method) in [
            ("order-service POST /api/v1/payments", false, "POST"),
            ("order-service GET /api/v1/payments", false, "GET"),
            ("frontend POST /api/v1/payments", true, "POST"),
        ] {
            let conn = if from_frontend { &mut other } else { &mut pay };
            let status = conn.send(method, "/api/v1/payments", &[]).await?.status;
            *outcomes.entry(what).or_default().entry(status).or_default() += 1;
        }
        if i % 10 == 0 {
            progress("payments (policy)", i, calls);
        }
    }
    // Dialling the payments pod by IP skips the service's waypoint (and its L7 policy); the
    // L4 rule at the pod's ztunnel (payments-via-waypoint) admits only the waypoint.
    let payments = by_name.get("payments").context("pods.yaml needs payments")?;
    let direct = SocketAddr::new(payments.ip, 8080);
    let bypass = "frontend POST payments pod directly (bypassing the waypoint)";
    for _ in 0..5 {
        let attempt = async {
            let mut conn = HttpConn::open(&frontend.ns, direct, "payments").await?;
            conn.send("POST", "/api/v1/payments", &[]).await
        };
        // A refused connection is closed at once; the bound only keeps a hang from blocking.
        let status = match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(answer)) => answer.status,
            _ => 0,
        };
        *outcomes.entry(bypass).or_default().entry(status).or_default() += 1;
    }
    Ok(())
}

/// Prints what the traffic saw and what Prometheus says about identities and tunnels.
async fn summary(seen: &mut Seen, prom: &Prometheus<'_>) -> Result<()> {
    let total: usize = seen.served.values().sum();
    let v2 = seen
        .served
        .iter()
        .filter(|(k, _)| k.starts_with("reviews-v2 (200)"))
        .map(|(_, n)| n)
        .sum::<usize>();
    println!(
        "canary split: {} -> v2 {:.1}% (target 10%), x-canary: true -> v2 {}/{}",
        seen.served
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        100.0 * v2 as f64 / total.max(1) as f64,
        seen.canary_v2,
        seen.canary_n
    );
    for (what, by_status) in &seen.outcomes {
        let text: Vec<String> = by_status
            .iter()
            .map(|(s, n)| match s {
                0 => format!("{n}× refused"),
                200 => format!("{n}× {s} allowed"),
                _ => format!("{n}× {s} denied"),
            })
            .collect();
        println!("{what}: {}", text.join(", "));
    }
    println!(
        "latency through ztunnel -> waypoint -> ztunnel (keep-alive): p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut seen.latencies, 0.5),
        pct(&mut seen.latencies, 0.99)
    );
    let identities = prom
        .wait_for(
            r#"sum by (source_principal, destination_workload) (istio_requests_total{reporter="waypoint"})"#,
            WAIT,
        )
        .await?;
    println!("identities the waypoint saw (from Prometheus, istio_requests_total):");
    for s in identities {
        println!(
            "  {} -> {}: {} requests",
            s["metric"]["source_principal"].as_str().unwrap_or("?"),
            s["metric"]["destination_workload"].as_str().unwrap_or("?"),
            s["value"][1].as_str().unwrap_or("?")
        );
    }
    let tunnels = prom
        .wait_for(
            r#"sum by (reporter, source_principal, destination_principal) (istio_tcp_connections_opened_total)"#,
            WAIT,
        )
        .await?;
    println!("mutual TLS connections through ztunnels (istio_tcp_connections_opened_total):");
    for s in tunnels {
        println!(
            "  {} -> {} (reported by the {} ztunnel)",
            s["metric"]["source_principal"].as_str().unwrap_or("?"),
            s["metric"]["destination_principal"].as_str().unwrap_or("?"),
            s["metric"]["reporter"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// What `--hold` leaves running, for the pointers printed and the state file.
struct Demo<'a> {
    cluster: &'a Cluster,
    waypoint: &'a Waypoint,
    pods: &'a BTreeMap<String, Pod>,
    prom_addr: SocketAddr,
}

impl Demo<'_> {
    /// Where to look: metrics, dashboard, logs.
    fn print_pointers(&self) {
        let (cluster, waypoint, prom_addr) = (self.cluster, self.waypoint, self.prom_addr);
        let cp = &cluster.controller.ns.name;
        println!("\nmetrics:  ip netns exec {cp} curl -s 'http://{prom_addr}/api/v1/query?query=istio_requests_total'");
        println!("          Grafana dashboard: dashboards/mesh.json (Prometheus data source http://{prom_addr})");
        println!("logs:     controller {}", cluster.controller.log.display());
        println!("          waypoint   {}", waypoint.log.display());
        for n in &cluster.nodes {
            println!(
                "          ztunnel    {}",
                std::env::temp_dir().join(format!("{}-ztunnel.log", n.name())).display()
            );
        }
    }

    /// The state file `meshctl demo` reads: namespaces, endpoints, the client.
    fn write_state(&self, path: &Path) -> Result<()> {
        let (cluster, waypoint, prom_addr) = (self.cluster, self.waypoint, self.prom_addr);
        let cp = &cluster.controller.ns.name;
        let client = self
            .pods
            .get("order-service")
            .context("pods.yaml needs order-service")?;
        let mut namespaces: Vec<String> = cluster.nodes.iter().map(|n| n.name().to_owned()).collect();
        namespaces.push(cp.clone());
        namespaces.push(cluster.hub().name.clone());
        namespaces.extend(self.pods.values().map(|p| p.ns.name.clone()));
        namespaces.push(waypoint.pod.ns.name.clone());
        let mut endpoints = vec![
            serde_json::json!({"name": "controller", "netns": cp, "url": format!("http://{}:15014/metrics", cluster.controller_ip())}),
        ];
        for n in &cluster.nodes {
            endpoints.push(serde_json::json!({"name": format!("ztunnel {}", n.name()), "netns": cp,
                    "url": format!("http://{}:15020/metrics", Cluster::underlay_ip(ID, n.index))}));
        }
        endpoints.push(serde_json::json!({"name": "waypoint", "netns": cp, "url": format!("http://{}:15020/metrics", waypoint.pod.ip)}));
        let state = serde_json::json!({
            "pid": std::process::id(),
            "logs_dir": std::env::temp_dir(),
            "namespaces": namespaces,
            "client": {"netns": client.ns.name, "url": format!("http://{}/", vip(10))},
            "endpoints": endpoints,
            "prometheus": {"netns": cp, "url": format!("http://{prom_addr}/")},
        });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
        std::fs::rename(&tmp, path)?;
        println!("state:    {}", path.display());
        Ok(())
    }
}

/// Keeps everything up until Ctrl-C or SIGTERM; the state file goes with it.
async fn hold(a: &Args) -> Result<()> {
    println!("\nholding: Ctrl-C (or `meshctl demo down`) tears everything down");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if let Some(path) = &a.state_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    if !privileged() || !Path::new(CNI_BIN).join("bridge").exists() {
        bail!("the demo builds network namespaces with the reference CNI plugins: run `sudo scripts/demo.sh`");
    }
    run(&a).await
}
