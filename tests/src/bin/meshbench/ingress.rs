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
//! Both proxies run with access logging on and off, so the comparison is like for like:
//!
//! - on: the gateway as configured by default (a JSON access-log line per request on its
//!   stdout, a file), nginx's server on 443 with `access_log <file>;` (the combined format,
//!   unbuffered: nginx's default, a write(2) per request as the gateway's);
//! - off: a second Gateway that a Telemetry targets with `accessLogging: [{disabled: true}]`
//!   (how a user turns the log off), nginx's server on 8443 with `access_log off`. The run
//!   checks the setting took: the quiet gateway writes no access-log line, the other does.
//!
//! The backend is nginx answering "ok" in a meshed pod on node 1; gateways, nginx and client
//! (outside the mesh) are pods on node 0. Per path and round: `wrk -t2 -c16` HTTPS keep-alive
//! requests/s and the proxy's CPU per request, with the proxy's RSS read halfway through; for
//! the logging-on paths also p50/p99 at about 1,000 requests/s (`wrk -t1 -c12` with a random
//! 5-15 ms pause per connection between requests: wrk2 is not packaged, so a request queued
//! behind a slow one is timed from when it was sent, not when it was due).

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
/// The second Gateway, with its access log disabled by a Telemetry, and its hostname.
const GW_QUIET: &str = "quiet-ingressgateway";
const QUIET_HOST: &str = "quiet.example.com";
/// The front nginx's ports: access log to a file, and off.
const NGINX_LOG_PORT: u16 = 443;
const NGINX_QUIET_PORT: u16 = 8443;
/// The fixed load: 12 connections, each pausing 5-15 ms (10 on average) between requests:
/// about 1,000 req/s with the timer's and the request's own time. The pause is random so the
/// connections do not fire together (a burst of 12 would queue behind itself).
const FIXED_CONNS: u32 = 12;
const PAUSE_LUA: &str = "function delay()\n  return math.random(5, 15)\nend\n";

/// An HTTPS Gateway `name` in the gateway namespace terminating the Secret below.
fn gateway(name: &str) -> String {
    format!(
        r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {GW_NS}}}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    hostname: "*.example.com"
    port: 443
    protocol: HTTPS
    tls: {{mode: Terminate, certificateRefs: [{{name: example-com-cert}}]}}
    allowedRoutes: {{namespaces: {{from: All}}}}
"#
    )
}

/// Namespaces, the backend's Service, the two Gateways (HTTPS, the Secret below), the
/// Telemetry that turns the second one's access log off, and the route on both.
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
{gateway}{quiet}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: no-access-log, namespace: {GW_NS}}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: {GW_QUIET}}}]
  accessLogging: [{{disabled: true}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: app, namespace: production}}
spec:
  parentRefs: [{{name: {GW}, namespace: {GW_NS}}}, {{name: {GW_QUIET}, namespace: {GW_NS}}}]
  hostnames: ["{HOST}", "{QUIET_HOST}"]
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
        indent(key_pem),
        gateway = gateway(GW),
        quiet = gateway(GW_QUIET),
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
    /// Whether the fixed-load latency is measured too (the logging-off paths: -c16 only).
    latency: bool,
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

/// The -c16 run, and the fixed load when `t.latency`.
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
    let mut sample = Sample {
        rps: max.rps,
        loaded_rss: loaded_rss?,
        cpu_us,
        errors: max.socket_errors + max.non_2xx,
        ..Sample::default()
    };
    if t.latency {
        let fixed = wrk_in(client, &t.url, (1, FIXED_CONNS, secs), &["-s", lua])
            .await
            .with_context(|| format!("{}: fixed rate", t.label))?;
        sample.fixed_rps = fixed.rps;
        sample.p50_us = fixed.p50_us;
        sample.p99_us = fixed.p99_us;
        sample.errors += fixed.socket_errors + fixed.non_2xx;
    }
    Ok(sample)
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
    let ids = [identity(GW_NS, GW), identity(GW_NS, GW_QUIET)];
    let cluster = Cluster::start_with_identities(ID, 2, &world, &[&ids[0], &ids[1]]).await?;
    let app = cluster.add_pod(1, PodSpec::new("app", "production", &[("app", "app")]))?;
    let mut backend = start_nginx(&app.ns, &dir.join("backend"), "", r#"return 200 "ok\n";"#)?;
    wait_listening(&app.ns, 8080, &mut backend).await?;
    let front = cluster.add_pod(0, PodSpec::new("nginx", "outside", &[]))?;
    let nginx_log = dir.join("front").join("access.log");
    let mut nginx = start_front(&front.ns, dir, (&cert, &key), app.ip, &nginx_log)?;
    for port in [NGINX_LOG_PORT, NGINX_QUIET_PORT] {
        wait_listening(&front.ns, port, &mut nginx).await?;
    }
    let client = cluster.add_pod(0, PodSpec::new("client", "outside", &[]))?;
    let gateway = Waypoint::start_with(&cluster, 0, GW_NS, GW, &["--role", "ingress"]).await?;
    let quiet = Waypoint::start_with(&cluster, 0, GW_NS, GW_QUIET, &["--role", "ingress"]).await?;
    cluster.wait_workload(&app, true, Duration::from_secs(20)).await?;
    let _hosts = Hosts::new(&client.ns, &[(gateway.pod.ip, HOST), (quiet.pod.ip, QUIET_HOST)])?;
    let targets = targets(app.ip, (front.ip, nginx.pid()), (gateway.pid(), quiet.pid()));
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
    let logged = [
        access_lines(&gateway.log)?,
        access_lines(&quiet.log)?,
        file_lines(&nginx_log)?,
    ];
    ensure!(
        logged[0] > 0 && logged[1] == 0 && logged[2] > 0,
        "access logging did not take as configured: gateway {} lines, Telemetry-disabled gateway {}, nginx {}",
        logged[0],
        logged[1],
        logged[2]
    );
    let report = Report {
        plan,
        figures: samples.iter().zip(idle).map(|(s, idle)| Figures::of(s, idle)).collect(),
        load: (load_before, load_average()),
        logged,
    };
    drop((nginx, backend));
    write_report(opts, "ingress", &report.markdown())
}

/// The paths in report order: plain; nginx and gateway logging; nginx and gateway not logging.
fn targets(app: IpAddr, (front, nginx): (IpAddr, i32), (gateway, quiet): (u32, u32)) -> Vec<Target> {
    let proxy = |label, url, pid, tree, latency| Target {
        label,
        url,
        pid: Some(pid),
        tree,
        latency,
    };
    vec![
        Target {
            label: "plain",
            url: format!("http://{app}:8080/"),
            pid: None,
            tree: false,
            latency: true,
        },
        proxy("nginx", format!("https://{front}:{NGINX_LOG_PORT}/"), nginx, true, true),
        proxy("gateway", format!("https://{HOST}/"), gateway as i32, false, true),
        proxy(
            "nginx, access_log off",
            format!("https://{front}:{NGINX_QUIET_PORT}/"),
            nginx,
            true,
            false,
        ),
        proxy(
            "gateway, access log disabled",
            format!("https://{QUIET_HOST}/"),
            quiet as i32,
            false,
            false,
        ),
    ]
}

/// Access-log lines (`"target":"access"` in the JSON log) in a waypoint's log file.
fn access_lines(log: &Path) -> Result<u64> {
    count_lines(log, |l| l.contains("\"target\":\"access\""))
}

fn file_lines(path: &Path) -> Result<u64> {
    count_lines(path, |_| true)
}

fn count_lines(path: &Path, keep: impl Fn(&str) -> bool) -> Result<u64> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut n = 0;
    for line in std::io::BufReader::new(file).lines() {
        n += u64::from(keep(&line?));
    }
    Ok(n)
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

/// The front nginx: TLS with `cert`, `proxy_pass` to the backend with keep-alive; on
/// [`NGINX_LOG_PORT`] with an access log to `log` (the combined format, unbuffered: nginx's
/// defaults), on [`NGINX_QUIET_PORT`] without one.
fn start_front(
    ns: &Netns,
    dir: &Path,
    (cert, key): (&Path, &Path),
    backend: IpAddr,
    log: &Path,
) -> Result<mesh_e2e::bench::Proc> {
    let (cert, key, log) = (cert.display(), key.display(), log.display());
    let server = |port: u16, access_log: &str| {
        format!(
            r#"
  server {{
    listen {port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    access_log {access_log};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}"#
        )
    };
    let http = format!(
        "upstream backend {{ server {backend}:8080; keepalive 32; keepalive_requests 1000000; }}{}{}",
        server(NGINX_LOG_PORT, &log.to_string()),
        server(NGINX_QUIET_PORT, "off")
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
    /// plain, nginx, gateway (access logs on); nginx, gateway (off): as [`targets`].
    figures: Vec<Figures>,
    /// Load average before and after the rounds.
    load: (String, String),
    /// Access-log lines written: gateway, quiet gateway, nginx.
    logged: [u64; 3],
}

impl Report {
    fn markdown(&self) -> String {
        let [p, n, g] = [0, 1, 2].map(|k| self.figures.get(k).copied().unwrap_or_default());
        let mut md = format!(
            "## meshbench --scenario ingress: HTTPS through our ingress gateway vs nginx, same certificate, same backend\n\n\
             Median of {} round(s), {} s per load; the fixed load is wrk -t1 -c{FIXED_CONNS} pausing 5-15 ms (random) per \
             connection between requests.\n\n\
             Access logging on (both write a line per request to a file): the gateway as configured by default, \
             nginx with `access_log <file>;` (combined format, unbuffered).\n\n\
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
        md += &self.logging_table();
        let errors: u64 = self.figures.iter().map(|f| f.errors).sum();
        if errors > 0 {
            let each: Vec<String> = self.figures.iter().map(|f| f.errors.to_string()).collect();
            md += &format!(
                "\n**{errors} errors / non-2xx** (plain, nginx, gateway, nginx off, gateway off: {})\n",
                each.join(", ")
            );
        }
        let [no, go] = [3, 4].map(|k| self.figures.get(k).copied().unwrap_or_default());
        let met = |g: f64, n: f64| if g >= n { "met" } else { "**not met**" };
        md += &format!(
            "\nGoals (issue 14): at least nginx's request rate: {} with access logs, {} without; p99 added by the gateway \
             under 1 ms: {} ({:+.0} µs over plain).\n\
             nginx RSS is its master and workers (worker_processes auto). Load average (1, 5, 15 min): {} before, {} after.\n",
            met(g.rps, n.rps),
            met(go.rps, no.rps),
            if g.p99_us - p.p99_us < 1000.0 { "met" } else { "**not met**" },
            g.p99_us - p.p99_us,
            self.load.0,
            self.load.1
        );
        md
    }

    /// -c16 request rate and CPU per request with access logging on and off, side by side.
    fn logging_table(&self) -> String {
        let f = |k: usize| self.figures.get(k).copied().unwrap_or_default();
        let us = |c: Option<f64>| c.map_or_else(|| "—".to_owned(), |c| format!("{c:.1}"));
        let ratio = |g: Option<f64>, n: Option<f64>| match (g, n) {
            (Some(g), Some(n)) if n > 0.0 => format!("{:.0} %", g / n * 100.0),
            _ => "—".to_owned(),
        };
        let mut md = format!(
            "\nAccess logging on vs off, wrk -t2 -c16 keep-alive (off: a Telemetry targeting a second Gateway with \
             `accessLogging: [{{disabled: true}}]`, nginx `access_log off`; lines written: gateway {}, gateway off {}, \
             nginx {}).\n\n\
             | access logging | nginx (req/s) | gateway (req/s) | gateway / nginx | nginx CPU/request (µs) | gateway CPU/request (µs) | gateway / nginx |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
            self.logged[0], self.logged[1], self.logged[2]
        );
        for (label, n, g) in [("on", f(1), f(2)), ("off", f(3), f(4))] {
            md += &format!(
                "| {label} | {:.0} | {:.0} | {:.0} % | {} | {} | {} |\n",
                n.rps,
                g.rps,
                pct(g.rps, n.rps),
                us(n.cpu_us),
                us(g.cpu_us),
                ratio(g.cpu_us, n.cpu_us)
            );
        }
        md
    }
}
