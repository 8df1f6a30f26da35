//! meshbench: the mesh path and the plain path, side by side, in one run.
//!
//! Two pairs of pod namespaces are built at once, each pair on its own bridge:
//!
//! - mesh: pods `a` (client, 10.77.201.1) and `b` (server, 10.77.201.2) of the shared
//!   [`mesh_e2e::Bed`], both captured with the ambient rules and each served by its own ztunnel
//!   (dedicated mode, local workload file, development CA);
//! - direct: client 10.78.201.1 and server 10.78.201.2, no capture rules and no ztunnel.
//!
//! Both servers run `iperf3 -s` and nginx; the clients run iperf3, wrk and ab. ztunnel's CPU
//! (utime+stime from /proc) and memory (VmRSS) are sampled around the runs, and ztunnel is
//! restarted with 1,000 and 10,000 extra workloads to see what its state costs.
//!
//! Run as root, after building ztunnel with the same profile:
//!
//! ```text
//! cargo build --release -p ztunnel
//! cargo run --release -p mesh-e2e --bin meshbench -- [--quick] [--out DIR]
//! ```
//!
//! Results go to DIR/bench.json (every raw number) and DIR/bench.md (the table, also printed);
//! DIR defaults to `<target dir>/bench`. Everything created (namespaces, processes, temporary
//! files) is removed on exit, on error, on panic and on Ctrl-C / SIGTERM.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mesh_e2e::bench::{
    clock_ticks, cpu_ticks, hwm_kib, parse_wrk, rss_kib, run_in, start_nginx, wait_listening, Proc, Wrk,
};
use mesh_e2e::netns::sh;
use mesh_e2e::ztunnel::ZtunnelFiles;
use mesh_e2e::{Bed, Hub, Netns, Ztunnel};
use serde_json::{json, Value};

const USAGE: &str = "usage: meshbench [--quick] [--out DIR]

Measures the ambient mesh path (two captured pods, two ztunnels) against a plain path (two
uncaptured pods) with iperf3, wrk and ab, and ztunnel's CPU and memory. Needs root.

  --quick     short runs (about 3 s each), under a minute in total
  --out DIR   where bench.json and bench.md go (default: <target dir>/bench)
";

/// Tools the bench runs, and the Debian package providing each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("nft", "nftables"),
    ("sysctl", "procps"),
    ("curl", "curl"),
    ("iperf3", "iperf3"),
    ("wrk", "wrk"),
    ("ab", "apache2-utils"),
    ("nginx", "nginx-light"),
];

/// Subnet number of the bed: mesh pods on 10.77.<n>.0/24, direct pods on 10.78.<n>.0/24.
const NET: u8 = 201;
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

struct Opts {
    quick: bool,
    out: PathBuf,
}

/// Durations and counts of one run.
#[derive(Clone, Copy)]
struct Plan {
    iperf_secs: u32,
    wrk_secs: u32,
    ab_requests: u32,
    warmup_secs: u32,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                iperf_secs: 3,
                wrk_secs: 3,
                ab_requests: 5000,
                warmup_secs: 1,
            }
        } else {
            Plan {
                iperf_secs: 10,
                wrk_secs: 10,
                ab_requests: 20000,
                warmup_secs: 1,
            }
        }
    }
}

fn parse_args() -> Result<Option<Opts>> {
    let mut quick = false;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => {
                out = Some(PathBuf::from(
                    args.next().ok_or_else(|| anyhow!("--out needs a directory"))?,
                ))
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            other => match other.strip_prefix("--out=") {
                Some(dir) => out = Some(PathBuf::from(dir)),
                None => bail!("unknown argument {other:?}\n\n{USAGE}"),
            },
        }
    }
    let out = match out {
        Some(o) => o,
        // target/<profile>/meshbench -> target/bench
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent()?.parent().map(|t| t.join("bench")))
            .unwrap_or_else(|| PathBuf::from("target/bench")),
    };
    Ok(Some(Opts { quick, out }))
}

fn main() -> std::process::ExitCode {
    let opts = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => return std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshbench: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshbench: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // Dropping the bench future on a signal runs every guard's Drop: the teardown.
        tokio::select! {
            r = bench(&opts) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (Ctrl-C); cleaned up")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM); cleaned up")),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshbench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-flight checks

fn in_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

/// The ztunnel `Ztunnel::start` runs: the one built with the same profile as this binary.
fn ztunnel_binary() -> Result<PathBuf> {
    let bin = mesh_e2e::binary("ztunnel");
    if !bin.is_file() {
        let build = match bin.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()) {
            Some("debug") => "cargo build -p ztunnel",
            _ => "cargo build --release -p ztunnel",
        };
        bail!(
            "ztunnel binary not found at {} (meshbench runs the ztunnel built next to its own executable); \
             build it first: {build}",
            bin.display()
        );
    }
    Ok(bin)
}

fn preflight() -> Result<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        bail!("meshbench creates network namespaces and must run as root (try: sudo -E cargo run --release -p mesh-e2e --bin meshbench)");
    }
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(t, _)| !in_path(t))
        .map(|(t, pkg)| format!("{t} (Debian package {pkg})"))
        .collect();
    if !missing.is_empty() {
        let pkgs: Vec<&str> = TOOLS.iter().filter(|(t, _)| !in_path(t)).map(|(_, p)| *p).collect();
        bail!(
            "missing tools: {}; install with: apt-get install {}",
            missing.join(", "),
            pkgs.join(" ")
        );
    }
    ztunnel_binary()
}

// ---------------------------------------------------------------------------------------------
// Processes

// ---------------------------------------------------------------------------------------------
// /proc sampling

// ---------------------------------------------------------------------------------------------
// ztunnel and topology

/// A ztunnel started by `mesh_e2e::Ztunnel::start`, with its pid for /proc sampling.
struct Zt<'a> {
    z: Ztunnel<'a>,
    pid: i32,
    /// From spawn to readiness.
    ready_after: Duration,
}

impl<'a> Zt<'a> {
    async fn start(ns: &'a Netns, files: &ZtunnelFiles<'_>) -> Result<Zt<'a>> {
        let started = Instant::now();
        let z = Ztunnel::start(ns, files, &[]).await?;
        let ready_after = started.elapsed();
        let pid = z
            .pid()
            .ok_or_else(|| anyhow!("ztunnel in {} is not running", ns.name))? as i32;
        Ok(Zt { z, pid, ready_after })
    }

    fn cpu(&self) -> Result<u64> {
        cpu_ticks(self.pid)
    }

    fn rss(&self) -> Result<u64> {
        rss_kib(self.pid)
    }
}

/// The plain pair: client 10.78.<n>.1 and server 10.78.<n>.2 on their own bridge, without
/// capture rules or ztunnel.
struct Plain {
    client: Netns,
    server: Netns,
    _hub: Hub,
    n: u8,
}

impl Plain {
    fn new(n: u8) -> Result<Plain> {
        let hub = Hub::new()?;
        let client = Netns::new("pc")?;
        let server = Netns::new("ps")?;
        for (ns, host) in [(&client, 1), (&server, 2)] {
            hub.attach(ns, &[&format!("10.78.{n}.{host}/24")])?;
        }
        Ok(Plain {
            client,
            server,
            _hub: hub,
            n,
        })
    }

    fn ip(&self, host: u8) -> IpAddr {
        Ipv4Addr::new(10, 78, self.n, host).into()
    }
}

/// Room for tens of thousands of short connections (ab) without waiting on TIME_WAIT ports.
fn tune(ns: &Netns) -> Result<()> {
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])?;
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    Ok(())
}

/// One side of the comparison: a client pod calling a server pod.
struct Pods<'a> {
    label: &'static str,
    client: &'a Netns,
    server: &'a Netns,
    server_ip: IpAddr,
}

impl Pods<'_> {
    fn url(&self) -> String {
        format!("http://{}:{HTTP_PORT}/", self.server_ip)
    }
}

/// The workload file of the bed (client and server with protocol HBONE, service `server` on
/// its VIP, as `Bed::write_state` writes it) plus `extra` workloads and one service per ten.
fn state_yaml(client: [IpAddr; 2], server: [IpAddr; 2], vip: IpAddr, extra: u32) -> String {
    let pair = mesh_e2e::bed::PairEntries::new(client, server, vip);
    let mut y = format!("workloads:\n{}", pair.workloads);
    y.reserve(extra as usize * 330);
    for i in 0..extra {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i + 1);
        let s = i / 10;
        y.push_str(&format!(
            r#"- uid: cluster1//Pod/bench/w{i}
  name: w{i}
  namespace: bench
  serviceAccount: sa{s}
  addresses: ["{ip}"]
  protocol: HBONE
  node: node-{}
  canonicalName: app{s}
  canonicalRevision: v1
  services:
    bench/svc{s}.bench.svc.cluster.local:
    - servicePort: 80
      targetPort: 8080
"#,
            i % 50
        ));
    }
    y.push_str("services:\n");
    y.push_str(&pair.services);
    for s in 0..extra.div_ceil(10) {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 160, 0, 0)) + s + 1);
        y.push_str(&format!(
            r#"- name: svc{s}
  namespace: bench
  hostname: svc{s}.bench.svc.cluster.local
  vips: ["{vip}"]
  ports:
  - servicePort: 80
    targetPort: 8080
"#
        ));
    }
    y.push_str("policies: []\n");
    y
}

// ---------------------------------------------------------------------------------------------
// Tool output

#[derive(Clone, Debug, Default, PartialEq)]
struct Ab {
    rps: f64,
    complete: u64,
    failed: u64,
    non_2xx: u64,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Ab {
    fn json(&self) -> Value {
        json!({
            "requests_per_sec": self.rps, "complete": self.complete, "failed": self.failed, "non_2xx": self.non_2xx,
            "time_per_request_mean_ms": self.mean_ms, "latency_p50_ms": self.p50_ms, "latency_p99_ms": self.p99_ms,
        })
    }
}

fn parse_ab(out: &str) -> Result<Ab> {
    let mut a = Ab::default();
    let mut got_rps = false;
    let mut got_mean = false;
    for line in out.lines() {
        let line = line.trim();
        let value = |prefix: &str| line.strip_prefix(prefix).and_then(|r| r.split_whitespace().next());
        if let Some(v) = value("Requests per second:") {
            (a.rps, got_rps) = (v.parse()?, true);
        } else if let Some(v) = value("Complete requests:") {
            a.complete = v.parse()?;
        } else if let Some(v) = value("Failed requests:") {
            a.failed = v.parse()?;
        } else if let Some(v) = value("Non-2xx responses:") {
            a.non_2xx = v.parse()?;
        } else if let Some(v) = value("Time per request:") {
            // The first "Time per request" is the mean per request; the second is per batch.
            if !got_mean {
                (a.mean_ms, got_mean) = (v.parse()?, true);
            }
        } else if let Some(v) = value("50%") {
            a.p50_ms = v.parse()?;
        } else if let Some(v) = value("99%") {
            a.p99_ms = v.parse()?;
        }
    }
    if !got_rps {
        bail!("unexpected ab output:\n{out}");
    }
    Ok(a)
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Iperf {
    gbps: f64,
    bytes: u64,
    retransmits: u64,
    secs: f64,
}

impl Iperf {
    fn json(&self) -> Value {
        json!({"gbit_per_sec": self.gbps, "bytes": self.bytes, "retransmits": self.retransmits, "seconds": self.secs})
    }
}

fn parse_iperf(out: &str) -> Result<Iperf> {
    let v: Value = serde_json::from_str(out).with_context(|| format!("iperf3 -J output is not JSON:\n{out}"))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let recv = &v["end"]["sum_received"];
    let sent = &v["end"]["sum_sent"];
    let bps = recv["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no end.sum_received in iperf3 output"))?;
    Ok(Iperf {
        gbps: bps / 1e9,
        bytes: recv["bytes"].as_u64().unwrap_or(0),
        retransmits: sent["retransmits"].as_u64().unwrap_or(0),
        secs: recv["seconds"].as_f64().unwrap_or(0.0),
    })
}

// ---------------------------------------------------------------------------------------------
// The bench

/// ztunnel CPU over one run: ticks used by each side.
struct CpuWindow {
    client_s: f64,
    server_s: f64,
    wall_s: f64,
}

impl CpuWindow {
    fn json(&self) -> Value {
        json!({"client_cpu_s": self.client_s, "server_cpu_s": self.server_s, "wall_s": self.wall_s,
               "client_cpu_pct": pct(self.client_s, self.wall_s), "server_cpu_pct": pct(self.server_s, self.wall_s)})
    }
}

fn pct(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        100.0 * a / b
    } else {
        f64::NAN
    }
}

/// Runs `f` and returns what both ztunnels spent meanwhile.
async fn with_cpu<T, F>(zts: (&Zt<'_>, &Zt<'_>), tck: f64, f: F) -> Result<(T, CpuWindow)>
where
    F: std::future::Future<Output = Result<T>>,
{
    let (c0, s0) = (zts.0.cpu()?, zts.1.cpu()?);
    let t0 = Instant::now();
    let r = f.await?;
    let wall_s = t0.elapsed().as_secs_f64();
    let (c1, s1) = (zts.0.cpu()?, zts.1.cpu()?);
    Ok((
        r,
        CpuWindow {
            client_s: (c1 - c0) as f64 / tck,
            server_s: (s1 - s0) as f64 / tck,
            wall_s,
        },
    ))
}

async fn iperf(p: &Pods<'_>, secs: u32) -> Result<Iperf> {
    let ip = p.server_ip.to_string();
    let t = secs.to_string();
    let out = run_in(
        p.client,
        &["iperf3", "-c", &ip, "-t", &t, "-J"],
        Duration::from_secs(secs as u64 + 30),
    )
    .await;
    // iperf3 -J reports failures as JSON with an "error" field and a non-zero exit.
    match out {
        Ok(o) => parse_iperf(&o),
        Err(e) => Err(e.context(format!("iperf3 to {ip}"))),
    }
}

async fn wrk(p: &Pods<'_>, threads: u32, conns: u32, secs: u32) -> Result<Wrk> {
    let (t, c, d) = (format!("-t{threads}"), format!("-c{conns}"), format!("-d{secs}s"));
    let out = run_in(
        p.client,
        &["wrk", &t, &c, &d, "--latency", &p.url()],
        Duration::from_secs(secs as u64 + 30),
    )
    .await?;
    let w = parse_wrk(&out)?;
    if w.requests == 0 {
        bail!("wrk against {} completed no request:\n{out}", p.url());
    }
    Ok(w)
}

async fn ab(p: &Pods<'_>, n: u32) -> Result<Ab> {
    let n = n.to_string();
    let out = run_in(
        p.client,
        &["ab", "-q", "-r", "-c4", "-n", &n, &p.url()],
        Duration::from_secs(300),
    )
    .await?;
    parse_ab(&out)
}

/// curl through the path once: proves the server answers before anything is measured.
async fn check_path(p: &Pods<'_>) -> Result<()> {
    let body = run_in(
        p.client,
        &["curl", "-sS", "--max-time", "10", &p.url()],
        Duration::from_secs(15),
    )
    .await
    .with_context(|| format!("{} path: {} does not answer", p.label, p.url()))?;
    if body.trim() != "ok" {
        bail!("{} path: {} answered {body:?}, expected \"ok\"", p.label, p.url());
    }
    Ok(())
}

fn line_value(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Results {
    iperf: Iperf,
    keepalive: Wrk,
    closed_loop: Wrk,
    ab: Ab,
}

impl Results {
    fn json(&self) -> Value {
        json!({"iperf3": self.iperf.json(), "wrk_keepalive": self.keepalive.json(),
               "wrk_closed_loop": self.closed_loop.json(), "ab_new_connections": self.ab.json()})
    }
}

struct Scale {
    extra_workloads: u32,
    services: u32,
    rss_kib: u64,
    peak_kib: u64,
    ready_ms: f64,
    dumped_workloads: usize,
    dumped_services: usize,
}

async fn bench(opts: &Opts) -> Result<()> {
    let started = Instant::now();
    let bin = preflight()?;
    let plan = Plan::new(opts.quick);
    let tck = clock_ticks();
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    eprintln!(
        "meshbench: ztunnel {}, {} mode",
        bin.display(),
        if opts.quick { "quick" } else { "full" }
    );

    // Declaration order is teardown order, reversed: processes first, then their files, then
    // the namespaces.
    anyhow::ensure!(
        mesh_e2e::privileged(),
        "cannot create network namespaces (needs root and iproute2)"
    );
    let bed = Bed::try_new(NET).context("creating the mesh pods")?;
    let plain = Plain::new(NET).context("creating the direct pods")?;
    for ns in [&bed.a, &bed.b, &plain.client, &plain.server] {
        tune(ns)?;
    }
    let mesh = Pods {
        label: "mesh",
        client: &bed.a,
        server: &bed.b,
        server_ip: bed.ip(2),
    };
    let direct = Pods {
        label: "direct",
        client: &plain.client,
        server: &plain.server,
        server_ip: plain.ip(2),
    };
    let tmp = tempfile::Builder::new().prefix("meshbench-").tempdir()?;
    let dir = tmp.path();

    // Servers: nginx and iperf3 in both server pods.
    let mut servers = Vec::new();
    for p in [&mesh, &direct] {
        let mut nginx = start_nginx(
            p.server,
            &dir.join(format!("nginx-{}", p.label)),
            "",
            r#"return 200 "ok\n";"#,
        )?;
        wait_listening(p.server, HTTP_PORT, &mut nginx).await?;
        let mut iperf = Proc::spawn(
            p.server,
            &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
            dir.join(format!("iperf3-{}.log", p.label)),
            Duration::from_secs(2),
        )?;
        wait_listening(p.server, IPERF_PORT, &mut iperf).await?;
        servers.push(nginx);
        servers.push(iperf);
    }
    let zc = Zt::start(&bed.a, &bed.files()).await?;
    let zs = Zt::start(&bed.b, &bed.files()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = (zc.rss()?, zs.rss()?);

    check_path(&direct).await?;
    check_path(&mesh).await?;
    // The mesh path must really go through the ztunnels.
    let m = zc.z.metrics().await?;
    if line_value(&m, "istio_tcp_connections_opened_total", &["reporter=\"source\""]) < 1.0 {
        bail!("mesh path: the client ztunnel reports no outbound connection; is capture working?\n{m}");
    }
    eprintln!("meshbench: both paths answer; warming up");
    for p in [&direct, &mesh] {
        wrk(p, 2, 10, plan.warmup_secs)
            .await
            .with_context(|| format!("{} warm-up", p.label))?;
    }
    let zts = (&zc, &zs);

    eprintln!("meshbench: iperf3 single stream, {} s per path", plan.iperf_secs);
    let iperf_d = iperf(&direct, plan.iperf_secs).await?;
    let (iperf_m, cpu_iperf) = with_cpu(zts, tck, iperf(&mesh, plan.iperf_secs)).await?;

    eprintln!("meshbench: wrk keep-alive -t2 -c10, {} s per path", plan.wrk_secs);
    let ka_d = wrk(&direct, 2, 10, plan.wrk_secs).await?;
    let (ka_m, cpu_ka) = with_cpu(zts, tck, wrk(&mesh, 2, 10, plan.wrk_secs)).await?;

    eprintln!("meshbench: wrk closed loop -t1 -c1, {} s per path", plan.wrk_secs);
    let rr_d = wrk(&direct, 1, 1, plan.wrk_secs).await?;
    let (rr_m, cpu_rr) = with_cpu(zts, tck, wrk(&mesh, 1, 1, plan.wrk_secs)).await?;

    eprintln!("meshbench: ab new connections -c4 -n {} per path", plan.ab_requests);
    let ab_d = ab(&direct, plan.ab_requests).await?;
    let (ab_m, cpu_ab) = with_cpu(zts, tck, ab(&mesh, plan.ab_requests)).await?;

    let loaded_rss = (zc.rss()?, zs.rss()?);
    let mesh_conns = line_value(
        &zc.z.metrics().await?,
        "istio_tcp_connections_opened_total",
        &["reporter=\"source\""],
    );
    let ready = (zc.ready_after, zs.ready_after);
    drop(zc);
    drop(zs);

    // Memory with a larger mesh: restart the client-side ztunnel on a bigger workload file.
    let mut scale = Vec::new();
    for extra in [1_000u32, 10_000] {
        eprintln!("meshbench: ztunnel RSS with {extra} extra workloads");
        let file = dir.join(format!("state-{extra}.yaml"));
        let yaml = state_yaml([bed.ip(1), bed.ip6(1)], [bed.ip(2), bed.ip6(2)], bed.vip(), extra);
        std::fs::write(&file, yaml)?;
        let files = ZtunnelFiles {
            root_cert: &bed.root_cert,
            root_key: &bed.root_key,
            state: &file,
        };
        let z = Zt::start(&bed.a, &files).await?;
        // Steady state: ztunnel returns the load's freed pages to the system 1 s after the
        // state settles; give it a little more before reading.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let rss = z.rss()?;
        let peak = hwm_kib(z.pid)?;
        let dump = z.z.config_dump().await.context("reading /config_dump")?;
        let dumped_workloads = dump["workloads"].as_array().map_or(0, Vec::len);
        let dumped_services = dump["services"].as_array().map_or(0, Vec::len);
        if dumped_workloads < extra as usize + 2 {
            bail!(
                "ztunnel with {extra} extra workloads holds only {dumped_workloads} workloads; log:\n{}",
                z.z.logs()
            );
        }
        scale.push(Scale {
            extra_workloads: extra,
            services: extra.div_ceil(10),
            rss_kib: rss,
            peak_kib: peak,
            ready_ms: z.ready_after.as_secs_f64() * 1e3,
            dumped_workloads,
            dumped_services,
        });
    }
    drop(servers);

    let report = Report {
        plan,
        quick: opts.quick,
        tck,
        mesh_ips: (bed.ip(1), bed.ip(2)),
        direct_ips: (plain.ip(1), plain.ip(2)),
        direct: Results {
            iperf: iperf_d,
            keepalive: ka_d,
            closed_loop: rr_d,
            ab: ab_d,
        },
        mesh: Results {
            iperf: iperf_m,
            keepalive: ka_m,
            closed_loop: rr_m,
            ab: ab_m,
        },
        cpu_iperf,
        cpu_ka,
        cpu_rr,
        cpu_ab,
        idle_rss,
        loaded_rss,
        ready,
        scale,
        mesh_conns,
        ztunnel: bin,
        elapsed: started.elapsed(),
    };
    let md = report.markdown();
    let js = report.json();
    let json_path = opts.out.join("bench.json");
    let md_path = opts.out.join("bench.md");
    std::fs::write(&json_path, serde_json::to_string_pretty(&js)? + "\n")?;
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    eprintln!(
        "meshbench: wrote {} and {} in {:.0} s",
        json_path.display(),
        md_path.display(),
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

struct Report {
    plan: Plan,
    quick: bool,
    tck: f64,
    mesh_ips: (IpAddr, IpAddr),
    direct_ips: (IpAddr, IpAddr),
    direct: Results,
    mesh: Results,
    cpu_iperf: CpuWindow,
    cpu_ka: CpuWindow,
    cpu_rr: CpuWindow,
    cpu_ab: CpuWindow,
    idle_rss: (u64, u64),
    loaded_rss: (u64, u64),
    ready: (Duration, Duration),
    scale: Vec<Scale>,
    mesh_conns: f64,
    ztunnel: PathBuf,
    elapsed: Duration,
}

fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

impl Report {
    fn gbit(&self) -> f64 {
        self.mesh.iperf.bytes as f64 * 8.0 / 1e9
    }

    /// CPU per unit: (client, server).
    fn cpu_per(&self, w: &CpuWindow, units: f64, scale: f64) -> (f64, f64) {
        (per(w.client_s * scale, units), per(w.server_s * scale, units))
    }

    fn json(&self) -> Value {
        let (d, m) = (&self.direct, &self.mesh);
        let (ka_c, ka_s) = self.cpu_per(&self.cpu_ka, m.keepalive.requests as f64, 1e6);
        let (rr_c, rr_s) = self.cpu_per(&self.cpu_rr, m.closed_loop.requests as f64, 1e6);
        let (ab_c, ab_s) = self.cpu_per(&self.cpu_ab, m.ab.complete as f64, 1e6);
        let (ip_c, ip_s) = self.cpu_per(&self.cpu_iperf, self.gbit(), 1.0);
        let scale: Vec<Value> = self
            .scale
            .iter()
            .map(|s| {
                json!({
                    "extra_workloads": s.extra_workloads, "extra_services": s.services, "rss_kib": s.rss_kib, "peak_rss_kib": s.peak_kib,
                    "ready_ms": s.ready_ms, "config_dump_workloads": s.dumped_workloads,
                    "config_dump_services": s.dumped_services,
                    "kib_per_extra_workload": per(s.rss_kib as f64 - self.idle_rss.0 as f64, s.extra_workloads as f64),
                })
            })
            .collect();
        json!({
            "tool": "meshbench",
            "quick": self.quick,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "host": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "kernel": sh(&["uname", "-r"]).map(|s| s.trim().to_owned()).unwrap_or_default(),
                "clk_tck": self.tck,
            },
            "ztunnel_binary": self.ztunnel.display().to_string(),
            "plan": {
                "iperf3": format!("iperf3 -c <server> -t {} -J", self.plan.iperf_secs),
                "wrk_keepalive": format!("wrk -t2 -c10 -d{}s --latency http://<server>:{HTTP_PORT}/", self.plan.wrk_secs),
                "wrk_closed_loop": format!("wrk -t1 -c1 -d{}s --latency http://<server>:{HTTP_PORT}/", self.plan.wrk_secs),
                "ab": format!("ab -q -r -c4 -n {} http://<server>:{HTTP_PORT}/", self.plan.ab_requests),
                "warmup_s": self.plan.warmup_secs,
            },
            "topology": {
                "mesh": {"client": self.mesh_ips.0.to_string(), "server": self.mesh_ips.1.to_string(),
                         "capture": true, "ztunnels": 2},
                "direct": {"client": self.direct_ips.0.to_string(), "server": self.direct_ips.1.to_string(),
                           "capture": false, "ztunnels": 0},
            },
            "direct": d.json(),
            "mesh": m.json(),
            "ratios": {
                "throughput_pct": pct(m.iperf.gbps, d.iperf.gbps),
                "keepalive_rps_pct": pct(m.keepalive.rps, d.keepalive.rps),
                "keepalive_added_p50_us": m.keepalive.p50_us - d.keepalive.p50_us,
                "keepalive_added_p99_us": m.keepalive.p99_us - d.keepalive.p99_us,
                "closed_loop_rps_pct": pct(m.closed_loop.rps, d.closed_loop.rps),
                "closed_loop_added_p50_us": m.closed_loop.p50_us - d.closed_loop.p50_us,
                "closed_loop_added_p99_us": m.closed_loop.p99_us - d.closed_loop.p99_us,
                "new_connection_rps_pct": pct(m.ab.rps, d.ab.rps),
            },
            "ztunnel": {
                "cpu": {
                    "iperf3": self.cpu_iperf.json(),
                    "wrk_keepalive": self.cpu_ka.json(),
                    "wrk_closed_loop": self.cpu_rr.json(),
                    "ab_new_connections": self.cpu_ab.json(),
                    "client_cpu_s_per_gbit": ip_c, "server_cpu_s_per_gbit": ip_s,
                    "client_cpu_us_per_keepalive_request": ka_c, "server_cpu_us_per_keepalive_request": ka_s,
                    "client_cpu_us_per_closed_loop_request": rr_c, "server_cpu_us_per_closed_loop_request": rr_s,
                    "client_cpu_us_per_new_connection": ab_c, "server_cpu_us_per_new_connection": ab_s,
                },
                "rss_kib": {
                    "client_idle": self.idle_rss.0, "server_idle": self.idle_rss.1,
                    "client_after_load": self.loaded_rss.0, "server_after_load": self.loaded_rss.1,
                },
                "ready_ms": {"client": self.ready.0.as_secs_f64() * 1e3, "server": self.ready.1.as_secs_f64() * 1e3},
                "client_outbound_connections_total": self.mesh_conns,
                "scale": scale,
            },
        })
    }

    fn markdown(&self) -> String {
        let (d, m) = (&self.direct, &self.mesh);
        let mut s = String::new();
        let p = &self.plan;
        s.push_str(&format!(
            "## meshbench{}: mesh (2 ztunnels, HBONE mTLS) vs direct\n\n",
            if self.quick { " --quick" } else { "" }
        ));
        s.push_str("| measurement | direct | mesh | mesh vs direct |\n|---|---:|---:|---:|\n");
        let mut row = |name: String, dv: String, mv: String, cmp: String| {
            s.push_str(&format!("| {name} | {dv} | {mv} | {cmp} |\n"));
        };
        let pct_s = |a: f64, b: f64| format!("{:.1} %", pct(a, b));
        let add_us = |a: f64, b: f64| format!("{:+.0} µs", a - b);
        row(
            format!("iperf3 single stream, {} s (Gbit/s)", p.iperf_secs),
            format!("{:.2}", d.iperf.gbps),
            format!("{:.2}", m.iperf.gbps),
            pct_s(m.iperf.gbps, d.iperf.gbps),
        );
        for (label, dw, mw) in [
            ("wrk keep-alive -t2 -c10", &d.keepalive, &m.keepalive),
            ("wrk closed loop -t1 -c1", &d.closed_loop, &m.closed_loop),
        ] {
            row(
                format!("{label} (req/s)"),
                format!("{:.0}", dw.rps),
                format!("{:.0}", mw.rps),
                pct_s(mw.rps, dw.rps),
            );
            row(
                format!("{label} p50 (µs)"),
                format!("{:.0}", dw.p50_us),
                format!("{:.0}", mw.p50_us),
                add_us(mw.p50_us, dw.p50_us),
            );
            row(
                format!("{label} p99 (µs)"),
                format!("{:.0}", dw.p99_us),
                format!("{:.0}", mw.p99_us),
                add_us(mw.p99_us, dw.p99_us),
            );
        }
        row(
            format!("ab new connections -c4 -n {} (req/s)", p.ab_requests),
            format!("{:.0}", d.ab.rps),
            format!("{:.0}", m.ab.rps),
            pct_s(m.ab.rps, d.ab.rps),
        );
        let errors = d.keepalive.socket_errors
            + d.keepalive.non_2xx
            + m.keepalive.socket_errors
            + m.keepalive.non_2xx
            + d.closed_loop.socket_errors
            + m.closed_loop.socket_errors
            + d.ab.failed
            + m.ab.failed
            + d.ab.non_2xx
            + m.ab.non_2xx;
        if errors > 0 {
            s.push_str(&format!("\n**{errors} errors / failed requests** (see bench.json)\n"));
        }

        let (ka_c, ka_s) = self.cpu_per(&self.cpu_ka, m.keepalive.requests as f64, 1e6);
        let (rr_c, rr_s) = self.cpu_per(&self.cpu_rr, m.closed_loop.requests as f64, 1e6);
        let (ab_c, ab_s) = self.cpu_per(&self.cpu_ab, m.ab.complete as f64, 1e6);
        let (ip_c, ip_s) = self.cpu_per(&self.cpu_iperf, self.gbit(), 1.0);
        let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
        s.push_str("\n| ztunnel cost | client side | server side |\n|---|---:|---:|\n");
        s.push_str(&format!(
            "| CPU per keep-alive request (µs) | {ka_c:.1} | {ka_s:.1} |\n"
        ));
        s.push_str(&format!(
            "| CPU per closed-loop request (µs) | {rr_c:.1} | {rr_s:.1} |\n"
        ));
        s.push_str(&format!("| CPU per new connection (µs) | {ab_c:.1} | {ab_s:.1} |\n"));
        s.push_str(&format!("| CPU per Gbit transferred (s) | {ip_c:.3} | {ip_s:.3} |\n"));
        s.push_str(&format!(
            "| CPU during iperf3 (% of one core) | {:.0} | {:.0} |\n",
            pct(self.cpu_iperf.client_s, self.cpu_iperf.wall_s),
            pct(self.cpu_iperf.server_s, self.cpu_iperf.wall_s)
        ));
        s.push_str(&format!(
            "| RSS idle (MiB) | {} | {} |\n",
            mib(self.idle_rss.0),
            mib(self.idle_rss.1)
        ));
        s.push_str(&format!(
            "| RSS after load (MiB) | {} | {} |\n",
            mib(self.loaded_rss.0),
            mib(self.loaded_rss.1)
        ));

        s.push_str(
            "\n| ztunnel state size | RSS steady (MiB) | RSS peak while loading (MiB) | KiB per extra workload | start to ready (ms) |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|\n");
        s.push_str(&format!(
            "| 2 workloads, 1 service | {} | - | - | {:.0} |\n",
            mib(self.idle_rss.0),
            self.ready.0.as_secs_f64() * 1e3
        ));
        for sc in &self.scale {
            s.push_str(&format!(
                "| +{} workloads, +{} services | {} | {} | {:.2} | {:.0} |\n",
                sc.extra_workloads,
                sc.services,
                mib(sc.rss_kib),
                mib(sc.peak_kib),
                per(sc.rss_kib as f64 - self.idle_rss.0 as f64, sc.extra_workloads as f64),
                sc.ready_ms
            ));
        }
        s.push_str(&format!(
            "\n{} CPUs, kernel {}; CPU from /proc utime+stime ({} ticks/s); total run {:.0} s.\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            sh(&["uname", "-r"]).map(|s| s.trim().to_owned()).unwrap_or_default(),
            self.tck,
            self.elapsed.as_secs_f64()
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ab() {
        let out = "Complete requests:      5000
Failed requests:        0
Requests per second:    4123.45 [#/sec] (mean)
Time per request:       0.970 [ms] (mean)
Time per request:       0.243 [ms] (mean, across all concurrent requests)
Percentage of the requests served within a certain time (ms)
  50%      1
  99%      3
 100%      7 (longest request)
";
        let a = parse_ab(out).unwrap();
        assert_eq!(
            (a.rps, a.complete, a.failed, a.mean_ms, a.p50_ms, a.p99_ms),
            (4123.45, 5000, 0, 0.970, 1.0, 3.0)
        );
    }

    #[test]
    fn state_has_requested_entries() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let y = state_yaml(
            [ip("10.0.0.1"), ip("fd00::1")],
            [ip("10.0.0.2"), ip("fd00::2")],
            ip("10.96.0.1"),
            25,
        );
        assert_eq!(y.matches("- uid: ").count(), 27);
        assert_eq!(y.matches("hostname: ").count(), 4);
    }
}
