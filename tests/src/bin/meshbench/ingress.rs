//! `meshbench --scenario ingress` (issue 14): HTTPS keep-alive requests through our ingress
//! gateway into the mesh against Debian's nginx terminating the same certificate in front of
//! the same backend, in the same run, on the two-node namespace cluster:
//!
//! - gateway: client -> `waypoint --role ingress` (TLS with the Gateway's Secret, HTTPRoute)
//!   -> HBONE -> the backend's ztunnel -> backend;
//! - nginx: client -> nginx (`worker_processes auto`, the same certificate and key,
//!   `proxy_pass` to a keep-alive upstream) -> plaintext -> the backend's ztunnel -> backend;
//! - plain: client -> backend over plain HTTP, what both proxies add to.
//!
//! The backend is nginx answering "ok" in a meshed pod on node 1; gateway, nginx and client
//! (outside the mesh) are pods on node 0. Per path and round: `wrk -t2 -c16` HTTPS keep-alive
//! requests/s, with the proxy's RSS read halfway through; p50/p99 at about 1,000 requests/s
//! (`wrk -t1 -c12` with a random 5-15 ms pause per connection between requests: wrk2 is not packaged,
//! so a request queued behind a slow one is timed from when it was sent, not when it was due).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_e2e::bench::{
    clock_ticks, cpu_ticks, median, rss_kib, run_in, start_nginx, start_nginx_workers, tree_rss_kib, wait_listening,
    wrk_in,
};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::netns::sh;
use mesh_e2e::waypoint::{identity, Waypoint};
use mesh_e2e::Netns;

use super::{load_average, pct, write_report, Opts, Plan};

/// Cluster id: underlay 10.90.120.0/24, pods 10.100.120.0/24 and 10.101.120.0/24.
const ID: u8 = 120;
const GW_NS: &str = "istio-system";
const GW: &str = "istio-ingressgateway";
const HOST: &str = "app.example.com";
/// The fixed load: 12 connections, each pausing 5-15 ms (10 on average) between requests:
/// about 1,000 req/s with the timer's and the request's own time. The pause is random so the
/// connections do not fire together (a burst of 12 would queue behind itself).
const FIXED_CONNS: u32 = 12;
const PAUSE_LUA: &str = "function delay()\n  return math.random(5, 15)\nend\n";

/// Namespaces, the backend's Service, the Gateway (HTTPS, the Secret below) and its route.
fn world(cert_pem: &str, key_pem: &str) -> String {
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: production, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: {GW_NS}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: outside}}
---
apiVersion: v1
kind: Service
metadata: {{name: app, namespace: production}}
spec: {{clusterIP: 10.96.{ID}.10, selector: {{app: app}}, ports: [{{name: http, port: 8080, targetPort: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {GW}, namespace: {GW_NS}}}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    hostname: "*.example.com"
    port: 443
    protocol: HTTPS
    tls: {{mode: Terminate, certificateRefs: [{{name: example-com-cert}}]}}
    allowedRoutes: {{namespaces: {{from: All}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: app, namespace: production}}
spec:
  parentRefs: [{{name: {GW}, namespace: {GW_NS}}}]
  hostnames: ["{HOST}"]
  rules: [{{backendRefs: [{{name: app, port: 8080}}]}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: example-com-cert, namespace: {GW_NS}}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{}  tls.key: |
{}"#,
        indent(cert_pem),
        indent(key_pem)
    )
}

/// A self-signed P-256 certificate for `*.example.com` (cert.pem, key.pem in `dir`); wrk
/// does not verify it, and both proxies serve this same one.
fn certificate(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=*.example.com",
        "-addext",
        "subjectAltName=DNS:*.example.com",
        "-keyout",
        &k,
        "-out",
        &c,
    ])
    .context("openssl req (Debian package openssl)")?;
    Ok((cert, key))
}

/// `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over /etc/hosts: wrk in the client
/// resolves the gateway's hostname, the SNI its listener selects by. Removed on drop.
struct Hosts(PathBuf);

impl Hosts {
    fn new(ns: &Netns, entries: &[(IpAddr, &str)]) -> Result<Hosts> {
        let dir = Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir)?;
        let text: String = entries.iter().map(|(ip, name)| format!("{ip} {name}\n")).collect();
        std::fs::write(dir.join("hosts"), text)?;
        Ok(Hosts(dir))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One path: its URL and the proxy process to watch (none for plain).
struct Target {
    label: &'static str,
    url: String,
    pid: Option<i32>,
    /// nginx is a master and its workers.
    tree: bool,
}

impl Target {
    fn rss(&self) -> Result<Option<u64>> {
        self.pid
            .map(|p| if self.tree { tree_rss_kib(p) } else { rss_kib(p) })
            .transpose()
    }

    /// utime + stime of the proxy (nginx: master and workers) in clock ticks.
    fn cpu(&self) -> Result<Option<u64>> {
        let Some(pid) = self.pid else { return Ok(None) };
        let mut total = cpu_ticks(pid)?;
        if self.tree {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                total += cpu_ticks(child).unwrap_or(0);
            }
        }
        Ok(Some(total))
    }
}

/// One path's figures in one round.
#[derive(Clone, Copy, Default)]
struct Sample {
    rps: f64,
    fixed_rps: f64,
    p50_us: f64,
    p99_us: f64,
    loaded_rss: Option<u64>,
    /// The proxy's CPU time (user + system) per request of the -c16 run, in µs.
    cpu_us: Option<f64>,
    errors: u64,
}

async fn measure(client: &Netns, t: &Target, secs: u32, lua: &str) -> Result<Sample> {
    let cpu_before = t.cpu()?;
    let load = wrk_in(client, &t.url, (2, 16, secs), &[]);
    let rss = async {
        tokio::time::sleep(Duration::from_millis(u64::from(secs) * 500)).await;
        t.rss()
    };
    let (max, loaded_rss) = tokio::join!(load, rss);
    let max = max.with_context(|| format!("{}: wrk -c16", t.label))?;
    let cpu_us = match (cpu_before, t.cpu()?) {
        (Some(a), Some(b)) if max.requests > 0 => {
            Some(b.saturating_sub(a) as f64 / clock_ticks() * 1e6 / max.requests as f64)
        }
        _ => None,
    };
    let fixed = wrk_in(client, &t.url, (1, FIXED_CONNS, secs), &["-s", lua])
        .await
        .with_context(|| format!("{}: fixed rate", t.label))?;
    Ok(Sample {
        rps: max.rps,
        fixed_rps: fixed.rps,
        p50_us: fixed.p50_us,
        p99_us: fixed.p99_us,
        loaded_rss: loaded_rss?,
        cpu_us,
        errors: max.socket_errors + max.non_2xx + fixed.socket_errors + fixed.non_2xx,
    })
}

/// curl through the path until it answers "ok" (the route takes a moment to reach the gateway).
async fn wait_answer(client: &Netns, t: &Target) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let args = ["curl", "-sSk", "--max-time", "5", &t.url];
        let got = run_in(client, &args, Duration::from_secs(10)).await;
        match got {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            other if std::time::Instant::now() > deadline => bail!("{}: {} answered {other:?}", t.label, t.url),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub(super) async fn run(opts: &Opts) -> Result<()> {
    ensure!(
        mesh_e2e::cluster_capable(),
        "the ingress scenario needs root and containernetworking-plugins"
    );
    let plan = Plan::new(opts.quick, opts.rounds);
    let tmp = tempfile::Builder::new().prefix("meshbench-ingress-").tempdir()?;
    let dir = tmp.path();
    let (cert, key) = certificate(dir)?;
    let world = world(&std::fs::read_to_string(&cert)?, &std::fs::read_to_string(&key)?);
    let gw_id = identity(GW_NS, GW);
    let cluster = Cluster::start_with_identities(ID, 2, &world, &[&gw_id]).await?;
    let app = cluster.add_pod(1, PodSpec::new("app", "production", &[("app", "app")]))?;
    let mut backend = start_nginx(&app.ns, &dir.join("backend"), "", r#"return 200 "ok\n";"#)?;
    wait_listening(&app.ns, 8080, &mut backend).await?;
    let front = cluster.add_pod(0, PodSpec::new("nginx", "outside", &[]))?;
    let mut nginx = start_front(&front.ns, dir, (&cert, &key), app.ip)?;
    wait_listening(&front.ns, 443, &mut nginx).await?;
    let client = cluster.add_pod(0, PodSpec::new("client", "outside", &[]))?;
    let gateway = Waypoint::start_with(&cluster, 0, GW_NS, GW, &["--role", "ingress"]).await?;
    cluster.wait_workload(&app, true, Duration::from_secs(20)).await?;
    let _hosts = Hosts::new(&client.ns, &[(gateway.pod.ip, HOST)])?;
    let targets = [
        Target {
            label: "plain",
            url: format!("http://{}:8080/", app.ip),
            pid: None,
            tree: false,
        },
        Target {
            label: "nginx",
            url: format!("https://{}/", front.ip),
            pid: Some(nginx.pid()),
            tree: true,
        },
        Target {
            label: "gateway",
            url: format!("https://{HOST}/"),
            pid: Some(gateway.pid() as i32),
            tree: false,
        },
    ];
    for t in &targets {
        wait_answer(&client.ns, t).await?;
    }
    hold(&client.ns, &targets).await;
    let idle: Vec<Option<u64>> = targets.iter().map(Target::rss).collect::<Result<_>>()?;
    let lua = dir.join("pause.lua");
    std::fs::write(&lua, PAUSE_LUA)?;
    let lua = lua.display().to_string();
    for t in &targets {
        wrk_in(&client.ns, &t.url, (2, 16, plan.warmup_secs), &[]).await?;
    }
    let load_before = load_average();
    let mut samples: Vec<Vec<Sample>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.rounds as usize {
        eprintln!("meshbench: ingress round {}/{}", round + 1, plan.rounds);
        // Each round starts with the next path so none always runs first.
        for k in (0..targets.len()).map(|k| (k + round) % targets.len()) {
            samples[k].push(measure(&client.ns, &targets[k], plan.wrk_secs, &lua).await?);
        }
    }
    let report = Report {
        plan,
        figures: samples.iter().zip(idle).map(|(s, idle)| Figures::of(s, idle)).collect(),
        load: (load_before, load_average()),
    };
    drop((nginx, backend));
    write_report(opts, "ingress", &report.markdown())
}

/// With `MESHBENCH_HOLD=<seconds>`, keeps the topology up that long before the rounds and
/// says how to reach it, so a profiler (perf, strace) can be attached to a proxy by hand.
async fn hold(client: &Netns, targets: &[Target]) {
    let Some(secs) = std::env::var("MESHBENCH_HOLD").ok().and_then(|s| s.parse::<u64>().ok()) else {
        return;
    };
    eprintln!("meshbench: holding {secs} s; client netns {}", client.name);
    for t in targets {
        eprintln!("meshbench:   {} {} pid {:?}", t.label, t.url, t.pid);
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

/// The front nginx: TLS on 443 with `cert`, `proxy_pass` to the backend with keep-alive.
fn start_front(ns: &Netns, dir: &Path, (cert, key): (&Path, &Path), backend: IpAddr) -> Result<mesh_e2e::bench::Proc> {
    let http = format!(
        r#"upstream backend {{ server {backend}:8080; keepalive 32; keepalive_requests 1000000; }}
  server {{
    listen 443 ssl;
    ssl_certificate {};
    ssl_certificate_key {};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}"#,
        cert.display(),
        key.display()
    );
    start_nginx_workers(ns, &dir.join("front"), "auto", &http, "return 404;")
}

/// A path's medians over the rounds.
#[derive(Clone, Copy, Default)]
struct Figures {
    rps: f64,
    fixed_rps: f64,
    p50_us: f64,
    p99_us: f64,
    idle_rss: Option<u64>,
    loaded_rss: Option<u64>,
    cpu_us: Option<f64>,
    errors: u64,
}

impl Figures {
    fn of(s: &[Sample], idle_rss: Option<u64>) -> Figures {
        let med = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
        let rss: Vec<f64> = s.iter().filter_map(|x| x.loaded_rss).map(|k| k as f64).collect();
        let cpu: Vec<f64> = s.iter().filter_map(|x| x.cpu_us).collect();
        Figures {
            rps: med(|x| x.rps),
            fixed_rps: med(|x| x.fixed_rps),
            p50_us: med(|x| x.p50_us),
            p99_us: med(|x| x.p99_us),
            idle_rss,
            loaded_rss: (!rss.is_empty()).then(|| median(rss) as u64),
            cpu_us: (!cpu.is_empty()).then(|| median(cpu)),
            errors: s.iter().map(|x| x.errors).sum(),
        }
    }
}

struct Report {
    plan: Plan,
    /// plain, nginx, gateway.
    figures: Vec<Figures>,
    /// Load average before and after the rounds.
    load: (String, String),
}

impl Report {
    fn markdown(&self) -> String {
        let [p, n, g] = [0, 1, 2].map(|k| self.figures.get(k).copied().unwrap_or_default());
        let mut md = format!(
            "## meshbench --scenario ingress: HTTPS through our ingress gateway vs nginx, same certificate, same backend\n\n\
             Median of {} round(s), {} s per load; the fixed load is wrk -t1 -c{FIXED_CONNS} pausing 5-15 ms (random) per \
             connection between requests.\n\n\
             | figure | plain HTTP, no proxy | nginx (TLS, plaintext upstream) | our gateway (TLS, HBONE upstream) | gateway vs nginx |\n\
             |---|---:|---:|---:|---:|\n",
            self.plan.rounds, self.plan.wrk_secs
        );
        md += &format!(
            "| wrk -t2 -c16 keep-alive (req/s) | {:.0} | {:.0} | {:.0} | {:.0} % |\n",
            p.rps,
            n.rps,
            g.rps,
            pct(g.rps, n.rps)
        );
        let us = |c: Option<f64>| c.map_or_else(|| "—".to_owned(), |c| format!("{c:.1}"));
        md += &format!(
            "| proxy CPU (user+sys) per request at -c16 (µs) | — | {} | {} | {} |\n",
            us(n.cpu_us),
            us(g.cpu_us),
            match (g.cpu_us, n.cpu_us) {
                (Some(g), Some(n)) if n > 0.0 => format!("{:.0} %", g / n * 100.0),
                _ => String::new(),
            }
        );
        md += &format!(
            "| fixed load, achieved (req/s) | {:.0} | {:.0} | {:.0} | |\n",
            p.fixed_rps, n.fixed_rps, g.fixed_rps
        );
        for (name, get) in [
            ("p50", (|f: &Figures| f.p50_us) as fn(&Figures) -> f64),
            ("p99", |f| f.p99_us),
        ] {
            md += &format!(
                "| {name} at ~1,000 req/s (µs) | {:.0} | {:.0} ({:+.0}) | {:.0} ({:+.0}) | {:+.0} µs |\n",
                get(&p),
                get(&n),
                get(&n) - get(&p),
                get(&g),
                get(&g) - get(&p),
                get(&g) - get(&n)
            );
        }
        let mib = |k: Option<u64>| k.map_or_else(|| "—".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
        md += &format!("| RSS idle (MiB) | — | {} | {} | |\n", mib(n.idle_rss), mib(g.idle_rss));
        md += &format!(
            "| RSS under -c16 (MiB) | — | {} | {} | |\n",
            mib(n.loaded_rss),
            mib(g.loaded_rss)
        );
        let errors = p.errors + n.errors + g.errors;
        if errors > 0 {
            md += &format!(
                "\n**{errors} errors / non-2xx** (plain {}, nginx {}, gateway {})\n",
                p.errors, n.errors, g.errors
            );
        }
        md += &format!(
            "\nGoals (issue 14): at least nginx's request rate: {}; p99 added by the gateway under 1 ms: {} ({:+.0} µs over plain).\n\
             nginx RSS is its master and workers (worker_processes auto). Load average (1, 5, 15 min): {} before, {} after.\n",
            if g.rps >= n.rps { "met" } else { "**not met**" },
            if g.p99_us - p.p99_us < 1000.0 { "met" } else { "**not met**" },
            g.p99_us - p.p99_us,
            self.load.0,
            self.load.1
        );
        md
    }
}
