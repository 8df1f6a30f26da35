//! meshbench: the mesh path, Istio's ztunnel on the same path, and the plain path, side by
//! side, in one run.
//!
//! Three pairs of pod namespaces are built at once, each pair on its own bridge:
//!
//! - ours: pods `a` (client, 10.77.201.1) and `b` (server, 10.77.201.2) of a
//!   [`mesh_e2e::Bed`], both captured with the ambient rules and each served by its own
//!   ztunnel (dedicated mode, local workload file, development CA);
//! - istio: the same on 10.77.202.0/24, each pod served by Istio's ztunnel
//!   (`../shared/peers/istio-ztunnel`, dedicated mode, its local workload file and built-in test
//!   CA, `PACKET_MARK=1337` so the same capture rules skip its sockets); skipped with a note
//!   when the peer binary is absent or with `--no-istio`;
//! - direct: client 10.78.201.1 and server 10.78.201.2, no capture rules and no ztunnel.
//!
//! Every server runs `iperf3 -s` and nginx; the clients run iperf3, wrk and ab. Each figure is
//! measured `--rounds` times (3; 1 with `--quick`), the paths back to back within a round so
//! a noisy moment hits all of them, and the median is reported. The proxies' CPU
//! (utime+stime from /proc), context switches (/proc/<pid>/task/*/status) and memory (VmRSS)
//! are sampled around each run, and our ztunnel is restarted with 1,000 and 10,000 extra
//! workloads to see what its state costs. `--profile` adds syscalls per request and per MiB
//! (strace -c), a perf cpu-clock profile and allocations per request (see
//! [`mesh_e2e::profile`]).
//!
//! Run as root, after building ztunnel with the same profile:
//!
//! ```text
//! cargo build --release -p ztunnel -p mesh-e2e
//! sudo target/release/meshbench [--quick] [--rounds N] [--profile] [--out DIR]
//! ```
//!
//! Results go to DIR/bench.json (every raw number) and DIR/bench.md (the table, also printed);
//! DIR defaults to `<target dir>/bench`. Everything created (namespaces, processes, temporary
//! files) is removed on exit, on error, on panic and on Ctrl-C / SIGTERM.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mesh_e2e::bench::{
    clock_ticks, cpu_ticks, ctxt_switches, hwm_kib, median, minor_faults, rss_kib, run_in, start_nginx, wait_listening,
    wrk_in, Proc, Wrk,
};
use mesh_e2e::istio::{self, IstioZtunnel};
use mesh_e2e::netns::sh;
use mesh_e2e::profile::{self, LoadProfile, ProfileReport};
use mesh_e2e::ztunnel::ZtunnelFiles;
use mesh_e2e::{Bed, Hub, Netns, Ztunnel};
use serde_json::{json, Value};

#[path = "meshbench/double_hbone.rs"]
mod double_hbone;
#[path = "meshbench/ingress.rs"]
mod ingress;

const USAGE: &str = "usage: meshbench [--scenario mesh|ingress|double-hbone] [--quick] [--rounds N] [--no-istio] [--istio-threads N] [--compare ZTUNNEL] [--profile] [--out DIR]

Measures the ambient mesh path (two captured pods, two ztunnels) against the same path
through Istio's ztunnel and a plain path (two uncaptured pods) with iperf3, wrk and ab, and
the proxies' CPU, context switches and memory. Needs root.

  --quick             1 round of short runs (2 s each), about a minute in total
  --rounds N          repeat each figure N times and report the median (default 3, quick 1)
  --no-istio          leave out Istio's ztunnel (also skipped, with a note, when
                      ../shared/peers/istio-ztunnel is absent)
  --istio-threads N   ZTUNNEL_WORKER_THREADS for Istio's ztunnel (default: its own, 2)
  --compare ZTUNNEL   also run this build of our ztunnel (say, of the base commit) as path
                      \"base\" on its own pods, with an A/B table against ours
  --profile           afterwards, per proxy: syscalls per request, new connection and MiB (strace -c),
                      perf cpu-clock profile (perf-*.data kept in --out; MESHBENCH_CALL_GRAPH=1
                      records call graphs), allocations per request (ours)
  --out DIR           where bench.json and bench.md go (default: <target dir>/bench)
  --scenario S        mesh (the default: all of the above); ingress: HTTPS through our ingress
                      gateway into the mesh vs nginx terminating the same certificate (issue 14),
                      to ingress.md; double-hbone: client -> ztunnel -> east-west gateway ->
                      ztunnel -> server vs a same-network call (issue 17), to double-hbone.md
";

/// What a run measures.
#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Mesh,
    Ingress,
    DoubleHbone,
}

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

/// Subnet number of our bed (10.77.<n>.0/24) and of the direct pods (10.78.<n>.0/24); Istio's
/// bed is on n + 1.
const NET: u8 = 201;
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

struct Opts {
    quick: bool,
    out: PathBuf,
    rounds: Option<u32>,
    istio: bool,
    istio_threads: Option<u32>,
    profile: bool,
    /// Another build of our ztunnel, run as path "base" (A/B).
    compare: Option<PathBuf>,
    scenario: Scenario,
}

/// Durations and counts of one run.
#[derive(Clone, Copy)]
struct Plan {
    iperf_secs: u32,
    wrk_secs: u32,
    ab_requests: u32,
    warmup_secs: u32,
    rounds: u32,
}

impl Plan {
    fn new(quick: bool, rounds: Option<u32>) -> Plan {
        let p = if quick {
            Plan {
                iperf_secs: 2,
                wrk_secs: 2,
                ab_requests: 3000,
                warmup_secs: 1,
                rounds: 1,
            }
        } else {
            Plan {
                iperf_secs: 5,
                wrk_secs: 5,
                ab_requests: 10000,
                warmup_secs: 1,
                rounds: 3,
            }
        };
        Plan {
            rounds: rounds.unwrap_or(p.rounds).max(1),
            ..p
        }
    }
}

fn parse_args() -> Result<Option<Opts>> {
    let mut o = Opts {
        quick: false,
        out: PathBuf::new(),
        rounds: None,
        istio: true,
        istio_threads: None,
        profile: false,
        compare: None,
        scenario: Scenario::Mesh,
    };
    let mut out = None;
    let mut args = std::env::args().skip(1);
    let number = |v: Option<String>, flag: &str| -> Result<u32> {
        v.ok_or_else(|| anyhow!("{flag} needs a number"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--no-istio" => o.istio = false,
            "--profile" => o.profile = true,
            "--compare" => {
                o.compare = Some(PathBuf::from(
                    args.next().ok_or_else(|| anyhow!("--compare needs a ztunnel binary"))?,
                ))
            }
            "--rounds" => o.rounds = Some(number(args.next(), "--rounds")?),
            "--scenario" => {
                o.scenario = match args.next().as_deref() {
                    Some("mesh") => Scenario::Mesh,
                    Some("ingress") => Scenario::Ingress,
                    Some("double-hbone") => Scenario::DoubleHbone,
                    other => bail!("--scenario needs mesh, ingress or double-hbone, not {other:?}"),
                }
            }
            "--istio-threads" => o.istio_threads = Some(number(args.next(), "--istio-threads")?),
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
    o.out = match out {
        Some(o) => o,
        // target/<profile>/meshbench -> target/bench
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent()?.parent().map(|t| t.join("bench")))
            .unwrap_or_else(|| PathBuf::from("target/bench")),
    };
    Ok(Some(o))
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
            r = run(&opts) => r,
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
// ztunnel and topology
// ---------------------------------------------------------------------------------------------
// Proxies and topology

/// A ztunnel started by `mesh_e2e::Ztunnel::start`, with its pid for /proc sampling.
struct Zt<'a> {
    z: Ztunnel<'a>,
    pid: i32,
    /// From spawn to readiness.
    ready_after: Duration,
}

impl<'a> Zt<'a> {
    /// Our ztunnel built beside this binary, or the one at `binary`.
    async fn start(ns: &'a Netns, files: &ZtunnelFiles<'_>, binary: Option<&Path>) -> Result<Zt<'a>> {
        let started = Instant::now();
        let z = match binary {
            Some(b) => Ztunnel::start_binary(ns, files, b, &[]).await?,
            None => Ztunnel::start(ns, files, &[]).await?,
        };
        let ready_after = started.elapsed();
        let pid = z
            .pid()
            .ok_or_else(|| anyhow!("ztunnel in {} is not running", ns.name))? as i32;
        Ok(Zt { z, pid, ready_after })
    }

    /// The client's and the server's ztunnel of `bed`.
    async fn pair(bed: &'a Bed, binary: Option<&Path>) -> Result<(Zt<'a>, Zt<'a>)> {
        let files = bed.files();
        Ok((
            Zt::start(&bed.a, &files, binary).await?,
            Zt::start(&bed.b, &files, binary).await?,
        ))
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

    fn pods(&self) -> Pods<'_> {
        Pods {
            label: "direct",
            client: &self.client,
            server: &self.server,
            server_ip: self.ip(2),
            proxies: None,
        }
    }
}

/// Room for tens of thousands of short connections (ab) without waiting on TIME_WAIT ports.
fn tune(ns: &Netns) -> Result<()> {
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])?;
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    Ok(())
}

/// One side of the comparison: a client pod calling a server pod, through two proxies
/// (their pids, client side first) or none.
struct Pods<'a> {
    label: &'static str,
    client: &'a Netns,
    server: &'a Netns,
    server_ip: IpAddr,
    proxies: Option<(i32, i32)>,
}

impl<'a> Pods<'a> {
    /// As [`Pods::proxied`], when both the bed and its proxies exist.
    fn proxied_if(label: &'static str, bed: Option<&'a Bed>, proxies: Option<(i32, i32)>) -> Option<Self> {
        Some(Pods::proxied(label, bed?, proxies?))
    }

    /// The pods of `bed`, proxied by the ztunnels with these pids (client, server).
    fn proxied(label: &'static str, bed: &'a Bed, proxies: (i32, i32)) -> Self {
        Pods {
            label,
            client: &bed.a,
            server: &bed.b,
            server_ip: bed.ip(2),
            proxies: Some(proxies),
        }
    }

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

/// Istio's ztunnel serving one pod of its bed, with its pid for /proc sampling.
struct IstioZt<'a> {
    z: IstioZtunnel<'a>,
    pid: i32,
}

impl<'a> IstioZt<'a> {
    /// Dedicated mode for `workload` (`ns/name/sa`) from `state` with its built-in test CA, and
    /// `PACKET_MARK=1337` so the capture rules let its own sockets through; waits for readiness.
    async fn start(
        ns: &'a Netns,
        binary: &Path,
        workload: &str,
        state: &Path,
        threads: Option<u32>,
    ) -> Result<IstioZt<'a>> {
        let mut env = vec![
            ("PROXY_MODE", "dedicated".to_owned()),
            ("PROXY_WORKLOAD_INFO", workload.to_owned()),
            ("XDS_ADDRESS", String::new()),
            ("CA_ADDRESS", String::new()),
            ("FAKE_CA", "true".to_owned()),
            ("LOCAL_XDS_PATH", state.display().to_string()),
            ("PACKET_MARK", "1337".to_owned()),
        ];
        if let Some(n) = threads {
            env.push(("ZTUNNEL_WORKER_THREADS", n.to_string()));
        }
        let mut z = IstioZtunnel::spawn(ns, binary, &env)?;
        z.wait_ready(Duration::from_secs(20)).await?;
        let pid = z
            .pid()
            .ok_or_else(|| anyhow!("Istio's ztunnel in {} is not running", ns.name))? as i32;
        Ok(IstioZt { z, pid })
    }
}

/// The bed's client and server and service `server` (port 80 -> 8080) in the local file
/// format of Istio's ztunnel.
fn istio_state(bed: &Bed) -> String {
    const SERVICE: &str = "server.default.svc.cluster.local";
    let workload = |name: &str, ip: IpAddr, services: &str| {
        format!(
            "- uid: cluster1//Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  \
             trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: node-{name}\n  \
             canonicalName: {name}\n  canonicalRevision: v1\n  workloadName: {name}\n  services: {services}\n"
        )
    };
    format!(
        "workloads:\n{}{}services:\n- name: server\n  namespace: default\n  hostname: {SERVICE}\n  \
         vips: [\"/{}\"]\n  ports:\n    80: 8080\npolicies: []\n",
        workload("client", bed.ip(1), "{}"),
        workload("server", bed.ip(2), &format!("{{\"default/{SERVICE}\": {{80: 8080}}}}")),
        bed.vip()
    )
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

/// What a path's two proxies spent over one run.
#[derive(Clone, Copy, Debug, Default)]
struct CpuWindow {
    client_s: f64,
    server_s: f64,
    /// Context switches (voluntary + involuntary, all threads).
    client_cs: u64,
    server_cs: u64,
    /// Minor page faults.
    client_mf: u64,
    server_mf: u64,
    wall_s: f64,
}

impl CpuWindow {
    fn json(&self) -> Value {
        json!({"client_cpu_s": self.client_s, "server_cpu_s": self.server_s, "wall_s": self.wall_s,
               "client_ctxt_switches": self.client_cs, "server_ctxt_switches": self.server_cs,
               "client_minor_faults": self.client_mf, "server_minor_faults": self.server_mf,
               "client_cpu_pct": pct(self.client_s, self.wall_s), "server_cpu_pct": pct(self.server_s, self.wall_s)})
    }

    /// (client, server) CPU per unit, times `scale`.
    fn per(&self, units: f64, scale: f64) -> (f64, f64) {
        (per(self.client_s * scale, units), per(self.server_s * scale, units))
    }
}

fn pct(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        100.0 * a / b
    } else {
        f64::NAN
    }
}

fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// Runs `f` and returns what the path's proxies spent meanwhile (`None` without proxies).
async fn with_cpu<T, F>(p: &Pods<'_>, tck: f64, f: F) -> Result<(T, Option<CpuWindow>)>
where
    F: std::future::Future<Output = Result<T>>,
{
    let Some((c, s)) = p.proxies else {
        return Ok((f.await?, None));
    };
    let (c0, s0, cc0, sc0) = (cpu_ticks(c)?, cpu_ticks(s)?, ctxt_switches(c)?, ctxt_switches(s)?);
    let (cf0, sf0) = (minor_faults(c)?, minor_faults(s)?);
    let t0 = Instant::now();
    let r = f.await?;
    let wall_s = t0.elapsed().as_secs_f64();
    let (c1, s1, cc1, sc1) = (cpu_ticks(c)?, cpu_ticks(s)?, ctxt_switches(c)?, ctxt_switches(s)?);
    let (cf1, sf1) = (minor_faults(c)?, minor_faults(s)?);
    Ok((
        r,
        Some(CpuWindow {
            client_s: c1.saturating_sub(c0) as f64 / tck,
            server_s: s1.saturating_sub(s0) as f64 / tck,
            client_cs: cc1.saturating_sub(cc0),
            server_cs: sc1.saturating_sub(sc0),
            client_mf: cf1.saturating_sub(cf0),
            server_mf: sf1.saturating_sub(sf0),
            wall_s,
        }),
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
    wrk_in(p.client, &p.url(), (threads, conns, secs), &[]).await
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

/// One round of one path: every figure, with its proxies' cost.
struct Round {
    iperf: (Iperf, Option<CpuWindow>),
    keepalive: (Wrk, Option<CpuWindow>),
    closed_loop: (Wrk, Option<CpuWindow>),
    ab: (Ab, Option<CpuWindow>),
}

impl Round {
    fn json(&self) -> Value {
        let cpu = |w: &Option<CpuWindow>| w.as_ref().map(CpuWindow::json);
        json!({
            "iperf3": self.iperf.0.json(), "iperf3_proxies": cpu(&self.iperf.1),
            "wrk_keepalive": self.keepalive.0.json(), "wrk_keepalive_proxies": cpu(&self.keepalive.1),
            "wrk_closed_loop": self.closed_loop.0.json(), "wrk_closed_loop_proxies": cpu(&self.closed_loop.1),
            "ab_new_connections": self.ab.0.json(), "ab_proxies": cpu(&self.ab.1),
        })
    }

    fn errors(&self) -> u64 {
        let (ka, rr, ab) = (&self.keepalive.0, &self.closed_loop.0, &self.ab.0);
        ka.socket_errors + ka.non_2xx + rr.socket_errors + rr.non_2xx + ab.failed + ab.non_2xx
    }
}

/// A path's figures: medians over its rounds. CPU pairs are (client side, server side).
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    gbps: f64,
    ka_rps: f64,
    ka_p50: f64,
    ka_p99: f64,
    rr_rps: f64,
    rr_p50: f64,
    rr_p99: f64,
    ab_rps: f64,
    cpu_s_per_gbit: (f64, f64),
    cpu_us_per_ka: (f64, f64),
    cpu_us_per_rr: (f64, f64),
    cpu_us_per_conn: (f64, f64),
    cs_per_ka: (f64, f64),
    cs_per_mib: (f64, f64),
    faults_per_mib: (f64, f64),
    iperf_cpu_pct: (f64, f64),
    errors: u64,
}

/// The median of `f` over `rounds`.
fn med(rounds: &[Round], f: impl Fn(&Round) -> f64) -> f64 {
    median(rounds.iter().map(f).collect())
}

/// The medians of a per-side cost over `rounds` (NaN without proxies).
fn med2(rounds: &[Round], f: impl Fn(&Round) -> Option<(f64, f64)>) -> (f64, f64) {
    let v: Vec<(f64, f64)> = rounds.iter().filter_map(f).collect();
    (
        median(v.iter().map(|x| x.0).collect()),
        median(v.iter().map(|x| x.1).collect()),
    )
}

impl Figures {
    fn of(rounds: &[Round]) -> Figures {
        let gbit = |r: &Round| r.iperf.0.bytes as f64 * 8.0 / 1e9;
        let mib = |r: &Round| r.iperf.0.bytes as f64 / (1024.0 * 1024.0);
        Figures {
            gbps: med(rounds, |r| r.iperf.0.gbps),
            ka_rps: med(rounds, |r| r.keepalive.0.rps),
            ka_p50: med(rounds, |r| r.keepalive.0.p50_us),
            ka_p99: med(rounds, |r| r.keepalive.0.p99_us),
            rr_rps: med(rounds, |r| r.closed_loop.0.rps),
            rr_p50: med(rounds, |r| r.closed_loop.0.p50_us),
            rr_p99: med(rounds, |r| r.closed_loop.0.p99_us),
            ab_rps: med(rounds, |r| r.ab.0.rps),
            cpu_s_per_gbit: med2(rounds, |r| Some(r.iperf.1?.per(gbit(r), 1.0))),
            cpu_us_per_ka: med2(rounds, |r| Some(r.keepalive.1?.per(r.keepalive.0.requests as f64, 1e6))),
            cpu_us_per_rr: med2(rounds, |r| {
                Some(r.closed_loop.1?.per(r.closed_loop.0.requests as f64, 1e6))
            }),
            cpu_us_per_conn: med2(rounds, |r| Some(r.ab.1?.per(r.ab.0.complete as f64, 1e6))),
            cs_per_ka: med2(rounds, |r| {
                let w = r.keepalive.1?;
                let n = r.keepalive.0.requests as f64;
                Some((per(w.client_cs as f64, n), per(w.server_cs as f64, n)))
            }),
            cs_per_mib: med2(rounds, |r| {
                let w = r.iperf.1?;
                Some((per(w.client_cs as f64, mib(r)), per(w.server_cs as f64, mib(r))))
            }),
            faults_per_mib: med2(rounds, |r| {
                let w = r.iperf.1?;
                Some((per(w.client_mf as f64, mib(r)), per(w.server_mf as f64, mib(r))))
            }),
            iperf_cpu_pct: med2(rounds, |r| {
                let w = r.iperf.1?;
                Some((pct(w.client_s, w.wall_s), pct(w.server_s, w.wall_s)))
            }),
            errors: rounds.iter().map(Round::errors).sum(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "iperf3_gbit_per_sec": self.gbps,
            "wrk_keepalive_rps": self.ka_rps, "wrk_keepalive_p50_us": self.ka_p50, "wrk_keepalive_p99_us": self.ka_p99,
            "wrk_closed_loop_rps": self.rr_rps, "wrk_closed_loop_p50_us": self.rr_p50, "wrk_closed_loop_p99_us": self.rr_p99,
            "ab_new_connections_rps": self.ab_rps,
            "cpu_s_per_gbit": [self.cpu_s_per_gbit.0, self.cpu_s_per_gbit.1],
            "cpu_us_per_keepalive_request": [self.cpu_us_per_ka.0, self.cpu_us_per_ka.1],
            "cpu_us_per_closed_loop_request": [self.cpu_us_per_rr.0, self.cpu_us_per_rr.1],
            "cpu_us_per_new_connection": [self.cpu_us_per_conn.0, self.cpu_us_per_conn.1],
            "ctxt_switches_per_keepalive_request": [self.cs_per_ka.0, self.cs_per_ka.1],
            "ctxt_switches_per_mib": [self.cs_per_mib.0, self.cs_per_mib.1],
            "minor_faults_per_mib": [self.faults_per_mib.0, self.faults_per_mib.1],
            "iperf3_cpu_pct": [self.iperf_cpu_pct.0, self.iperf_cpu_pct.1],
            "errors": self.errors,
            "cpu_pairs_are": "[client side, server side]",
        })
    }
}

/// One path's results.
struct PathRun {
    label: &'static str,
    rounds: Vec<Round>,
    /// (client, server) proxy RSS in KiB, idle and after the load.
    idle_rss: Option<(u64, u64)>,
    loaded_rss: Option<(u64, u64)>,
}

/// Runs every figure `plan.rounds` times on every path, the paths back to back per figure;
/// each round starts with the next path so none always runs first or last.
async fn rounds(paths: &[&Pods<'_>], plan: Plan, tck: f64) -> Result<Vec<Vec<Round>>> {
    let mut out: Vec<Vec<Round>> = paths.iter().map(|_| Vec::new()).collect();
    let n = paths.len();
    for round in 0..plan.rounds as usize {
        eprintln!(
            "meshbench: round {}/{}: iperf3 {} s, wrk -c10 and -c1 {} s, ab -c4 -n {} per path",
            round + 1,
            plan.rounds,
            plan.iperf_secs,
            plan.wrk_secs,
            plan.ab_requests
        );
        let order: Vec<usize> = (0..n).map(|k| (k + round) % n).collect();
        let mut ip: Vec<Option<_>> = (0..n).map(|_| None).collect();
        for &k in &order {
            ip[k] = Some(with_cpu(paths[k], tck, iperf(paths[k], plan.iperf_secs)).await?);
        }
        let mut ka: Vec<Option<_>> = (0..n).map(|_| None).collect();
        for &k in &order {
            ka[k] = Some(with_cpu(paths[k], tck, wrk(paths[k], 2, 10, plan.wrk_secs)).await?);
        }
        let mut rr: Vec<Option<_>> = (0..n).map(|_| None).collect();
        for &k in &order {
            rr[k] = Some(with_cpu(paths[k], tck, wrk(paths[k], 1, 1, plan.wrk_secs)).await?);
        }
        let mut ab_: Vec<Option<_>> = (0..n).map(|_| None).collect();
        for &k in &order {
            ab_[k] = Some(with_cpu(paths[k], tck, ab(paths[k], plan.ab_requests)).await?);
        }
        for (k, (((iperf, keepalive), closed_loop), ab)) in ip.into_iter().zip(ka).zip(rr).zip(ab_).enumerate() {
            let (Some(iperf), Some(keepalive), Some(closed_loop), Some(ab)) = (iperf, keepalive, closed_loop, ab)
            else {
                bail!("round {round}: path {k} was not measured");
            };
            out[k].push(Round {
                iperf,
                keepalive,
                closed_loop,
                ab,
            });
        }
    }
    Ok(out)
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

/// Our client-side ztunnel restarted on bigger workload files: what its state costs.
async fn scale(bed: &Bed, dir: &Path) -> Result<Vec<Scale>> {
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
        let z = Zt::start(&bed.a, &files, None).await?;
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
    Ok(scale)
}

/// Starts nginx and `iperf3 -s` in the path's server pod.
async fn start_servers(p: &Pods<'_>, dir: &Path) -> Result<Vec<Proc>> {
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
    Ok(vec![nginx, iperf])
}

/// The client-side proxy's metrics count an outbound connection: the path went through it.
fn check_proxied(label: &str, metrics: &str) -> Result<()> {
    if line_value(metrics, "istio_tcp_connections_opened_total", &["reporter=\"source\""]) < 1.0 {
        bail!("{label} path: the client-side proxy reports no outbound connection; is capture working?\n{metrics}");
    }
    Ok(())
}

fn rss_pair(p: &Pods<'_>) -> Result<Option<(u64, u64)>> {
    p.proxies.map(|(c, s)| Ok((rss_kib(c)?, rss_kib(s)?))).transpose()
}

async fn run(opts: &Opts) -> Result<()> {
    match opts.scenario {
        Scenario::Mesh => bench(opts).await,
        Scenario::Ingress => ingress::run(opts).await,
        Scenario::DoubleHbone => double_hbone::run(opts).await,
    }
}

/// Writes a scenario's table to `<out>/<name>.md` and prints it.
fn write_report(opts: &Opts, name: &str, md: &str) -> Result<()> {
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let path = opts.out.join(format!("{name}.md"));
    std::fs::write(&path, md)?;
    println!("{md}");
    eprintln!("meshbench: wrote {}", path.display());
    Ok(())
}

/// The load average, as `uptime` prints it: how busy the machine was during a run.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The binaries compared, on stderr.
fn announce(bin: &Path, peer: Option<&Path>, plan: Plan) {
    eprintln!(
        "meshbench: ztunnel {}, Istio's ztunnel {}, {} rounds",
        bin.display(),
        peer.map_or_else(|| "absent (column skipped)".to_owned(), |p| p.display().to_string()),
        plan.rounds
    );
}

async fn bench(opts: &Opts) -> Result<()> {
    let started = Instant::now();
    let bin = preflight()?;
    let plan = Plan::new(opts.quick, opts.rounds);
    let tck = clock_ticks();
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let peer = peer(opts)?;
    announce(&bin, peer.as_deref(), plan);

    // Declaration order is teardown order, reversed: processes first, then their files, then
    // the namespaces.
    anyhow::ensure!(
        mesh_e2e::privileged(),
        "cannot create network namespaces (needs root and iproute2)"
    );
    let bed = tuned_bed(NET, "the mesh pods")?;
    let ibed = peer
        .as_ref()
        .map(|_| tuned_bed(NET + 1, "the pods for Istio's ztunnel"))
        .transpose()?;
    let plain = Plain::new(NET).context("creating the direct pods")?;
    tune(&plain.client)?;
    tune(&plain.server)?;
    let tmp = tempfile::Builder::new().prefix("meshbench-").tempdir()?;
    let dir = tmp.path();

    let (zc, zs) = Zt::pair(&bed, None).await?;
    let bbed = opts
        .compare
        .as_ref()
        .map(|_| tuned_bed(NET + 2, "the pods for --compare"))
        .transpose()?;
    let base_zts = match (&opts.compare, &bbed) {
        (Some(binary), Some(bb)) => Some(Zt::pair(bb, Some(binary)).await?),
        _ => None,
    };
    let istio_zts = match (&peer, &ibed) {
        (Some(binary), Some(ib)) => Some(istio_pair(ib, binary, dir, opts.istio_threads).await?),
        _ => None,
    };
    let direct = plain.pods();
    let ours = Pods::proxied("ours", &bed, (zc.pid, zs.pid));
    let theirs = Pods::proxied_if("istio", ibed.as_ref(), istio_zts.as_ref().map(|(c, s)| (c.pid, s.pid)));
    let base = Pods::proxied_if("base", bbed.as_ref(), base_zts.as_ref().map(|(c, s)| (c.pid, s.pid)));
    let mut paths = vec![&direct];
    paths.extend(theirs.as_ref());
    paths.extend(base.as_ref());
    paths.push(&ours);

    let proxies_carried_it = async || all_proxied(&zc, istio_zts.as_ref(), base_zts.as_ref()).await;
    let Measured {
        servers,
        results,
        idle_rss,
        loaded_rss,
    } = measure(&paths, (plan, tck), dir, proxies_carried_it).await?;
    let profiles = profiles(opts, &paths, plan).await?;
    let mesh_conns = line_value(
        &zc.z.metrics().await?,
        "istio_tcp_connections_opened_total",
        &["reporter=\"source\""],
    );
    let ready = (zc.ready_after, zs.ready_after);
    drop(istio_zts);
    drop(base_zts);
    drop(zc);
    drop(zs);
    let scale = scale(&bed, dir).await?;
    drop(servers);

    let report = Report {
        plan,
        quick: opts.quick,
        tck,
        runs: path_runs(&paths, results, idle_rss, loaded_rss),
        istio_note: istio_note(peer.is_some(), opts.istio),
        istio_threads: opts.istio_threads,
        ready,
        scale,
        mesh_conns,
        ztunnel: bin,
        profiles,
        elapsed: started.elapsed(),
    };
    write_bench_report(&opts.out, &report)
}

/// Every client-side proxy counted the benchmark's connections as its own.
async fn all_proxied(
    ours: &Zt<'_>,
    istio: Option<&(IstioZt<'_>, IstioZt<'_>)>,
    base: Option<&(Zt<'_>, Zt<'_>)>,
) -> Result<()> {
    check_proxied("ours", &ours.z.metrics().await?)?;
    if let Some((c, _)) = istio {
        check_proxied("istio", &c.z.metrics().await?)?;
    }
    if let Some((c, _)) = base {
        check_proxied("base", &c.z.metrics().await?)?;
    }
    Ok(())
}

/// What the rounds measured, and the servers still running for the scale run.
struct Measured {
    servers: Vec<Proc>,
    results: Vec<Vec<Round>>,
    idle_rss: Vec<Option<(u64, u64)>>,
    loaded_rss: Vec<Option<(u64, u64)>>,
}

/// Starts the servers, proves every path (and, with `proxies_carried_it`, that the proxies
/// carried it), warms up and runs the rounds, with the proxies' memory before and after.
async fn measure(
    paths: &[&Pods<'_>],
    (plan, tck): (Plan, f64),
    dir: &Path,
    proxies_carried_it: impl AsyncFn() -> Result<()>,
) -> Result<Measured> {
    let mut servers = Vec::new();
    for p in paths {
        servers.extend(start_servers(p, dir).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = paths.iter().map(|p| rss_pair(p)).collect::<Result<_>>()?;
    for p in paths {
        check_path(p).await?;
    }
    proxies_carried_it().await?;
    warm_up(paths, plan).await?;
    let results = rounds(paths, plan, tck).await?;
    let loaded_rss = paths.iter().map(|p| rss_pair(p)).collect::<Result<_>>()?;
    Ok(Measured {
        servers,
        results,
        idle_rss,
        loaded_rss,
    })
}

/// With `--profile`, each proxied path profiled (files kept in `--out`, for `perf report -i` by
/// hand); else nothing.
async fn profiles(opts: &Opts, paths: &[&Pods<'_>], plan: Plan) -> Result<Vec<ProfileReport>> {
    if !opts.profile {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for p in paths.iter().filter(|p| p.proxies.is_some()) {
        v.push(profile_path(p, plan, &opts.out).await?);
    }
    Ok(v)
}

/// Each path's rounds and memory, in path order.
fn path_runs(
    paths: &[&Pods<'_>],
    results: Vec<Vec<Round>>,
    idle_rss: Vec<Option<(u64, u64)>>,
    loaded_rss: Vec<Option<(u64, u64)>>,
) -> Vec<PathRun> {
    paths
        .iter()
        .zip(results)
        .zip(idle_rss.into_iter().zip(loaded_rss))
        .map(|((p, rounds), (idle_rss, loaded_rss))| PathRun {
            label: p.label,
            rounds,
            idle_rss,
            loaded_rss,
        })
        .collect()
}

/// Istio's ztunnel binary, unless `--no-istio` (or absent: the column is skipped).
fn peer(opts: &Opts) -> Result<Option<PathBuf>> {
    if opts.istio {
        return istio::peer();
    }
    eprintln!("meshbench: --no-istio: Istio's ztunnel left out");
    Ok(None)
}

/// Istio's ztunnel for `bed`'s client and server pods, from a state file written in `dir`.
async fn istio_pair<'a>(
    bed: &'a Bed,
    binary: &Path,
    dir: &Path,
    threads: Option<u32>,
) -> Result<(IstioZt<'a>, IstioZt<'a>)> {
    let state = dir.join("istio-state.yaml");
    std::fs::write(&state, istio_state(bed))?;
    let c = IstioZt::start(&bed.a, binary, "default/client/client", &state, threads).await?;
    let s = IstioZt::start(&bed.b, binary, "default/server/server", &state, threads).await?;
    Ok((c, s))
}

/// Why the Istio column is missing, if it is.
fn istio_note(present: bool, wanted: bool) -> Option<String> {
    match (present, wanted) {
        (true, _) => None,
        (false, true) => Some(format!(
            "Istio's ztunnel not found at {}: column skipped",
            istio::PEER_PATH
        )),
        (false, false) => Some("--no-istio: column skipped".to_owned()),
    }
}

/// A client and server pod pair on subnet `net`, tuned as every path is.
fn tuned_bed(net: u8, what: &str) -> Result<Bed> {
    let bed = Bed::try_new(net).with_context(|| format!("creating {what}"))?;
    tune(&bed.a)?;
    tune(&bed.b)?;
    Ok(bed)
}

/// A short keep-alive load on every path before the measured rounds.
async fn warm_up(paths: &[&Pods<'_>], plan: Plan) -> Result<()> {
    eprintln!("meshbench: every path answers; warming up");
    for p in paths {
        wrk(p, 2, 10, plan.warmup_secs)
            .await
            .with_context(|| format!("{} warm-up", p.label))?;
    }
    Ok(())
}

/// Prints the data-path table and writes it (bench.md) and its JSON (bench.json) to `out`.
fn write_bench_report(out: &Path, report: &Report) -> Result<()> {
    let md = report.markdown();
    let js = report.json();
    let json_path = out.join("bench.json");
    let md_path = out.join("bench.md");
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

/// `--profile` on one meshed path: short keep-alive, closed-loop, new-connection and bulk loads, each watched
/// by [`profile::watch`] on both proxies.
async fn profile_path(p: &Pods<'_>, plan: Plan, dir: &Path) -> Result<ProfileReport> {
    let Some((c, s)) = p.proxies else {
        bail!("{} path has no proxies to profile", p.label);
    };
    let secs = plan.wrk_secs.max(3);
    eprintln!("meshbench: profiling the {} path ({secs} s per load and tool)", p.label);
    let mut loads = Vec::new();
    for (name, threads, conns) in [("wrk -c10 keep-alive", 2, 10), ("wrk -c1 closed loop", 1, 1)] {
        let (runs, sides) = profile::watch(p.label, name, [c, s], dir, || wrk(p, threads, conns, secs)).await?;
        loads.push(LoadProfile {
            load: name.to_owned(),
            unit: "request",
            // Per-unit counts come from the first (strace) run.
            units: runs.first().map_or(0.0, |w| w.requests as f64),
            sides,
        });
    }
    let (runs, sides) = profile::watch(p.label, "ab", [c, s], dir, || ab(p, plan.ab_requests)).await?;
    loads.push(LoadProfile {
        load: "ab -c4 new connection per request".to_owned(),
        unit: "connection",
        units: runs.first().map_or(0.0, |a| a.complete as f64),
        sides,
    });
    let (runs, sides) = profile::watch(p.label, "iperf3", [c, s], dir, || iperf(p, secs)).await?;
    loads.push(LoadProfile {
        load: "iperf3 one stream".to_owned(),
        unit: "MiB",
        units: runs.first().map_or(0.0, |i| i.bytes as f64 / (1024.0 * 1024.0)),
        sides,
    });
    Ok(ProfileReport {
        label: p.label.to_owned(),
        loads,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

struct Report {
    plan: Plan,
    quick: bool,
    tck: f64,
    /// direct, then istio (when present), then ours.
    runs: Vec<PathRun>,
    istio_note: Option<String>,
    istio_threads: Option<u32>,
    ready: (Duration, Duration),
    scale: Vec<Scale>,
    mesh_conns: f64,
    ztunnel: PathBuf,
    profiles: Vec<ProfileReport>,
    elapsed: Duration,
}

/// The goals of issue 13, checked on one run's medians.
struct Goal {
    what: &'static str,
    met: bool,
    value: String,
}

impl Report {
    fn run(&self, label: &str) -> Option<&PathRun> {
        self.runs.iter().find(|r| r.label == label)
    }

    fn figures(&self, label: &str) -> Option<Figures> {
        self.run(label).map(|r| Figures::of(&r.rounds))
    }

    fn goals(&self, d: &Figures, o: &Figures, i: Option<&Figures>) -> Vec<Goal> {
        let worst = |p: (f64, f64)| p.0.max(p.1);
        let mut g = vec![
            Goal {
                what: "one stream >= 45 % of direct",
                met: pct(o.gbps, d.gbps) >= 45.0,
                value: format!("{:.0} %", pct(o.gbps, d.gbps)),
            },
            Goal {
                what: "added round trip (wrk -c1 p50) <= 40 µs",
                met: o.rr_p50 - d.rr_p50 <= 40.0,
                value: format!("{:+.0} µs", o.rr_p50 - d.rr_p50),
            },
            Goal {
                what: "new connections >= 25 % of direct",
                met: pct(o.ab_rps, d.ab_rps) >= 25.0,
                value: format!("{:.0} %", pct(o.ab_rps, d.ab_rps)),
            },
            Goal {
                what: "<= 15 µs ztunnel CPU per keep-alive request per side",
                met: worst(o.cpu_us_per_ka) <= 15.0,
                value: format!("{:.1} / {:.1} µs", o.cpu_us_per_ka.0, o.cpu_us_per_ka.1),
            },
        ];
        if let Some(i) = i {
            let behind: Vec<&str> = [
                ("one stream", o.gbps < i.gbps),
                ("keep-alive req/s", o.ka_rps < i.ka_rps),
                ("closed-loop p50", o.rr_p50 > i.rr_p50),
                ("new connections", o.ab_rps < i.ab_rps),
                ("CPU per request", worst(o.cpu_us_per_ka) > worst(i.cpu_us_per_ka)),
                ("RSS idle", self.idle_worst("ours") > self.idle_worst("istio")),
            ]
            .into_iter()
            .filter_map(|(n, b)| b.then_some(n))
            .collect();
            g.push(Goal {
                what: "never behind Istio's ztunnel",
                met: behind.is_empty(),
                value: if behind.is_empty() {
                    "ahead or equal on every figure".to_owned()
                } else {
                    format!("behind on: {}", behind.join(", "))
                },
            });
        }
        g
    }

    fn idle_worst(&self, label: &str) -> u64 {
        self.run(label).and_then(|r| r.idle_rss).map_or(0, |(c, s)| c.max(s))
    }

    fn json(&self) -> Value {
        let d = self.figures("direct").unwrap_or_default();
        let o = self.figures("ours").unwrap_or_default();
        let i = self.figures("istio");
        let paths: serde_json::Map<String, Value> = self
            .runs
            .iter()
            .map(|r| {
                let rss = |x: Option<(u64, u64)>| x.map(|(c, s)| json!({"client_kib": c, "server_kib": s}));
                (
                    r.label.to_owned(),
                    json!({
                        "median": Figures::of(&r.rounds).json(),
                        "rounds": r.rounds.iter().map(Round::json).collect::<Vec<_>>(),
                        "rss_idle": rss(r.idle_rss),
                        "rss_after_load": rss(r.loaded_rss),
                    }),
                )
            })
            .collect();
        let ratio = |a: &Figures, b: &Figures| {
            json!({
                "throughput_pct": pct(a.gbps, b.gbps),
                "keepalive_rps_pct": pct(a.ka_rps, b.ka_rps),
                "closed_loop_p50_added_us": a.rr_p50 - d.rr_p50,
                "closed_loop_p99_added_us": a.rr_p99 - d.rr_p99,
                "new_connection_rps_pct": pct(a.ab_rps, b.ab_rps),
            })
        };
        let scale: Vec<Value> = self
            .scale
            .iter()
            .map(|s| {
                let idle = self.run("ours").and_then(|r| r.idle_rss).map_or(0, |x| x.0);
                json!({
                    "extra_workloads": s.extra_workloads, "extra_services": s.services, "rss_kib": s.rss_kib, "peak_rss_kib": s.peak_kib,
                    "ready_ms": s.ready_ms, "config_dump_workloads": s.dumped_workloads,
                    "config_dump_services": s.dumped_services,
                    "kib_per_extra_workload": per(s.rss_kib as f64 - idle as f64, s.extra_workloads as f64),
                })
            })
            .collect();
        let goals: Vec<Value> = self
            .goals(&d, &o, i.as_ref())
            .iter()
            .map(|g| json!({"goal": g.what, "met": g.met, "value": g.value}))
            .collect();
        json!({
            "tool": "meshbench",
            "quick": self.quick,
            "rounds": self.plan.rounds,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "host": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "kernel": sh(&["uname", "-r"]).map(|s| s.trim().to_owned()).unwrap_or_default(),
                "clk_tck": self.tck,
            },
            "ztunnel_binary": self.ztunnel.display().to_string(),
            "istio": {"note": self.istio_note, "worker_threads": self.istio_threads},
            "plan": {
                "iperf3": format!("iperf3 -c <server> -t {} -J", self.plan.iperf_secs),
                "wrk_keepalive": format!("wrk -t2 -c10 -d{}s --latency http://<server>:{HTTP_PORT}/", self.plan.wrk_secs),
                "wrk_closed_loop": format!("wrk -t1 -c1 -d{}s --latency http://<server>:{HTTP_PORT}/", self.plan.wrk_secs),
                "ab": format!("ab -q -r -c4 -n {} http://<server>:{HTTP_PORT}/", self.plan.ab_requests),
                "warmup_s": self.plan.warmup_secs,
            },
            "paths": paths,
            "ratios": {
                "ours_vs_direct": ratio(&o, &d),
                "istio_vs_direct": i.as_ref().map(|i| ratio(i, &d)),
                "ours_vs_istio": i.as_ref().map(|i| json!({
                    "throughput_pct": pct(o.gbps, i.gbps),
                    "keepalive_rps_pct": pct(o.ka_rps, i.ka_rps),
                    "new_connection_rps_pct": pct(o.ab_rps, i.ab_rps),
                    "closed_loop_added_p50_pct": pct(o.rr_p50 - d.rr_p50, i.rr_p50 - d.rr_p50),
                })),
            },
            "goals": goals,
            "ztunnel": {
                "ready_ms": {"client": self.ready.0.as_secs_f64() * 1e3, "server": self.ready.1.as_secs_f64() * 1e3},
                "client_outbound_connections_total": self.mesh_conns,
                "scale": scale,
            },
            "profiles": self.profiles.iter().map(ProfileReport::json).collect::<Vec<_>>(),
        })
    }
}

/// One table row: name, then direct, Istio's, ours, Istio/direct, ours/direct, ours/Istio.
type Row = [String; 7];

fn pair(p: (f64, f64), digits: usize) -> String {
    format!("{:.*} / {:.*}", digits, p.0, digits, p.1)
}

impl Report {
    /// The main table's rows; `i` is Istio's figures when that column ran.
    fn rows(d: &Figures, o: &Figures, i: Option<&Figures>) -> Vec<Row> {
        let dash = || "—".to_owned();
        let iv = |f: &dyn Fn(&Figures) -> String| i.map_or_else(dash, f);
        let pct_s = |a: f64, b: f64| format!("{:.0} %", pct(a, b));
        let rate = |name: &str, get: fn(&Figures) -> f64, digits: usize| -> Row {
            [
                name.to_owned(),
                format!("{:.*}", digits, get(d)),
                iv(&|i| format!("{:.*}", digits, get(i))),
                format!("{:.*}", digits, get(o)),
                iv(&|i| pct_s(get(i), get(d))),
                pct_s(get(o), get(d)),
                iv(&|i| pct_s(get(o), get(i))),
            ]
        };
        let latency = |name: &str, get: fn(&Figures) -> f64| -> Row {
            let added = |x: &Figures| get(x) - get(d);
            [
                name.to_owned(),
                format!("{:.0}", get(d)),
                iv(&|i| format!("{:.0}", get(i))),
                format!("{:.0}", get(o)),
                iv(&|i| format!("{:+.0} µs", added(i))),
                format!("{:+.0} µs", added(o)),
                // A ratio of added latencies means something only when Istio's adds some.
                iv(&|i| {
                    if added(i) > 0.0 {
                        format!("{:.0} % of Istio's added", pct(added(o), added(i)))
                    } else {
                        "—".to_owned()
                    }
                }),
            ]
        };
        let cost = |name: &str, get: fn(&Figures) -> (f64, f64), digits: usize| -> Row {
            let worst = |x: &Figures| get(x).0.max(get(x).1);
            [
                name.to_owned(),
                dash(),
                iv(&|i| pair(get(i), digits)),
                pair(get(o), digits),
                String::new(),
                String::new(),
                iv(&|i| pct_s(worst(o), worst(i))),
            ]
        };
        vec![
            rate("iperf3 one stream (Gbit/s)", |f| f.gbps, 2),
            rate("wrk -c10 keep-alive (req/s)", |f| f.ka_rps, 0),
            latency("wrk -c10 keep-alive p99 (µs)", |f| f.ka_p99),
            latency("wrk -c1 closed loop p50 (µs)", |f| f.rr_p50),
            latency("wrk -c1 closed loop p99 (µs)", |f| f.rr_p99),
            rate("ab -c4 new connection per request (req/s)", |f| f.ab_rps, 0),
            cost(
                "proxy CPU per keep-alive request, client / server (µs)",
                |f| f.cpu_us_per_ka,
                1,
            ),
            cost("proxy CPU per closed-loop request (µs)", |f| f.cpu_us_per_rr, 1),
            cost("proxy CPU per new connection (µs)", |f| f.cpu_us_per_conn, 1),
            cost("proxy CPU per Gbit (s)", |f| f.cpu_s_per_gbit, 3),
            cost("proxy CPU during iperf3 (% of a core)", |f| f.iperf_cpu_pct, 0),
            cost("context switches per keep-alive request", |f| f.cs_per_ka, 2),
            cost("context switches per MiB (iperf3)", |f| f.cs_per_mib, 1),
            cost("page faults per MiB (iperf3)", |f| f.faults_per_mib, 1),
        ]
    }

    fn markdown(&self) -> String {
        let d = self.figures("direct").unwrap_or_default();
        let o = self.figures("ours").unwrap_or_default();
        let i = self.figures("istio");
        let p = &self.plan;
        let mut s = format!(
            "## meshbench{}: direct vs Istio's ztunnel vs ours (2 dedicated-mode proxies, HBONE mTLS)\n\n\
             Median of {} round(s); iperf3 {} s, wrk {} s, ab -n {} per path and round; proxy costs are client / server side.\n\n",
            if self.quick { " --quick" } else { "" },
            p.rounds,
            p.iperf_secs,
            p.wrk_secs,
            p.ab_requests
        );
        if let Some(note) = &self.istio_note {
            s.push_str(&format!("Note: {note}.\n\n"));
        }
        s.push_str(
            "| figure | direct | Istio's ztunnel | ours | Istio / direct | ours / direct | ours / Istio |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut rows = Self::rows(&d, &o, i.as_ref());
        let mib = |k: Option<(u64, u64)>| {
            k.map_or_else(
                || "—".to_owned(),
                |(c, s)| pair((c as f64 / 1024.0, s as f64 / 1024.0), 1),
            )
        };
        let rss = |label: &str, f: fn(&PathRun) -> Option<(u64, u64)>| mib(self.run(label).and_then(f));
        for (name, f) in [
            (
                "RSS idle (MiB)",
                (|r: &PathRun| r.idle_rss) as fn(&PathRun) -> Option<(u64, u64)>,
            ),
            ("RSS after the load (MiB)", |r: &PathRun| r.loaded_rss),
        ] {
            rows.push([
                name.to_owned(),
                "—".to_owned(),
                rss("istio", f),
                rss("ours", f),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for r in rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        let errors: u64 = self.runs.iter().map(|r| Figures::of(&r.rounds).errors).sum();
        if errors > 0 {
            s.push_str(&format!("\n**{errors} errors / failed requests** (see bench.json)\n"));
        }
        s.push_str("\n| goal (issue 13) | met | this run |\n|---|---|---|\n");
        for g in self.goals(&d, &o, i.as_ref()) {
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                g.what,
                if g.met { "yes" } else { "**no**" },
                g.value
            ));
        }
        if let Some(b) = self.figures("base") {
            s.push_str(&Self::ab_markdown(&o, &b));
        }
        for prof in &self.profiles {
            s.push('\n');
            s.push_str(&prof.markdown());
        }
        self.scale_markdown(&mut s);
        s.push_str(&format!(
            "\n{} CPUs, kernel {}; CPU from /proc utime+stime ({} ticks/s); Istio's ztunnel worker threads: {}; total run {:.0} s.\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            sh(&["uname", "-r"]).map(|s| s.trim().to_owned()).unwrap_or_default(),
            self.tck,
            self.istio_threads.map_or_else(|| "its default".to_owned(), |n| n.to_string()),
            self.elapsed.as_secs_f64()
        ));
        s
    }

    /// `--compare`: ours (this build) against base (the other build), same run.
    fn ab_markdown(o: &Figures, b: &Figures) -> String {
        let mut s = String::from("\n| A/B | base | ours | ours / base |\n|---|---:|---:|---:|\n");
        fn worst(p: (f64, f64)) -> f64 {
            p.0.max(p.1)
        }
        for (name, get, digits) in [
            (
                "iperf3 one stream (Gbit/s)",
                (|f: &Figures| f.gbps) as fn(&Figures) -> f64,
                2,
            ),
            ("wrk -c10 keep-alive (req/s)", |f| f.ka_rps, 0),
            ("wrk -c1 closed loop p50 (µs)", |f| f.rr_p50, 0),
            ("ab -c4 new connections (req/s)", |f| f.ab_rps, 0),
            (
                "CPU per keep-alive request, worse side (µs)",
                |f| worst(f.cpu_us_per_ka),
                1,
            ),
            (
                "CPU per closed-loop request, worse side (µs)",
                |f| worst(f.cpu_us_per_rr),
                1,
            ),
            (
                "CPU per new connection, worse side (µs)",
                |f| worst(f.cpu_us_per_conn),
                1,
            ),
            ("CPU per Gbit, worse side (s)", |f| worst(f.cpu_s_per_gbit), 3),
            (
                "page faults per MiB, both sides",
                |f| f.faults_per_mib.0 + f.faults_per_mib.1,
                1,
            ),
        ] {
            s.push_str(&format!(
                "| {name} | {:.*} | {:.*} | {:.0} % |\n",
                digits,
                get(b),
                digits,
                get(o),
                pct(get(o), get(b))
            ));
        }
        s
    }

    fn scale_markdown(&self, s: &mut String) {
        let idle = self.run("ours").and_then(|r| r.idle_rss).map_or(0, |x| x.0);
        let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
        s.push_str(
            "\n| our ztunnel's state size | RSS steady (MiB) | RSS peak while loading (MiB) | KiB per extra workload | start to ready (ms) |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|\n");
        s.push_str(&format!(
            "| 2 workloads, 1 service | {} | - | - | {:.0} |\n",
            mib(idle),
            self.ready.0.as_secs_f64() * 1e3
        ));
        for sc in &self.scale {
            s.push_str(&format!(
                "| +{} workloads, +{} services | {} | {} | {:.2} | {:.0} |\n",
                sc.extra_workloads,
                sc.services,
                mib(sc.rss_kib),
                mib(sc.peak_kib),
                per(sc.rss_kib as f64 - idle as f64, sc.extra_workloads as f64),
                sc.ready_ms
            ));
        }
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
