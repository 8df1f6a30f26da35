//! waypointbench: what the waypoint adds, measured beside the paths it competes with, in one
//! run on the two-node namespace cluster:
//!
//! - plain: a client pod to a server pod, no mesh;
//! - nginx: the same through Debian's nginx as a keep-alive reverse proxy (a pod of its own);
//! - ztunnel: a captured client to a captured server through both ztunnels (HBONE);
//! - waypoint: the same service with `istio.io/use-waypoint`: ztunnel, waypoint, ztunnel.
//!
//! Each path gets a fixed load (default 1,000 requests/s on 4 keep-alive connections; a request
//! that had to wait behind a slow previous one is timed from when it was due, so a stall is
//! not hidden) and a wrk run for its
//! maximum rate. The waypoint's idle RSS, and each proxy's CPU per request over the
//! maximum-rate run, are read from /proc: a per-request cost moves less with the machine's
//! load than a rate does.
//!
//! With `--scale N` it measures instead what the waypoint holds per connection and per
//! request in flight, up to N concurrent keep-alive clients (see [`scale`]).
//!
//! ```text
//! cargo build --release --workspace && sudo target/release/waypointbench [--quick] [--rate N]
//! sudo target/release/waypointbench --scale 10000 [--in-flight 1000]
//! ```

#[path = "waypointbench/scale.rs"]
mod scale;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_e2e::apps::{named_server, HttpConn};
use mesh_e2e::bench::{clock_ticks, cpu_ticks, parse_wrk, rss_kib, run_in, start_nginx, wait_listening};
use mesh_e2e::cluster::{Cluster, Pod, PodSpec};
use mesh_e2e::waypoint::{base, identity, service, Waypoint};
use mesh_e2e::Netns;

const ID: u8 = 203;
const CONNECTIONS: usize = 4;

fn vip(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, ID, n).into()
}

fn world() -> String {
    let mut w = base(ID);
    w += "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\n";
    w += &service(ID, "direct", "app: server", 10, false);
    w += &service(ID, "viawp", "app: server", 11, true);
    w
}

/// Latencies at a fixed rate: each connection sends on its own schedule; a request's latency
/// runs from when it was due, so a slow answer also counts against the requests queued behind.
async fn fixed_rate(ns: &Netns, target: SocketAddr, host: &str, rate: u32, secs: u64) -> Result<Vec<Duration>> {
    let period = Duration::from_secs_f64(CONNECTIONS as f64 / f64::from(rate));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut conn = HttpConn::open(ns, target, host).await?;
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut due = start;
            let mut lat = Vec::new();
            let mut prev_done = start;
            while due.duration_since(start) < Duration::from_secs(secs) {
                tokio::time::sleep_until(due.into()).await;
                // Waiting behind a slow previous answer counts; the timer's own lateness
                // (millisecond granularity) does not.
                let began = if prev_done > due { due } else { Instant::now() };
                let a = conn.send("GET", "/", &[]).await?;
                if a.status != 200 {
                    bail!("status {} from {target}", a.status);
                }
                prev_done = Instant::now();
                lat.push(prev_done - began);
                due += period;
            }
            Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    Ok(all)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

struct Row {
    path: &'static str,
    p50_us: f64,
    p99_us: f64,
    max_rps: f64,
    /// CPU per request over the wrk run, µs, of each proxy the path goes through, in order.
    cpu_us: Vec<(&'static str, f64)>,
}

/// The processes a path goes through, by name and pid.
type Proxies<'a> = &'a [(&'static str, i32)];

async fn measure(
    path: &'static str,
    client: &Pod,
    target: SocketAddr,
    host: &str,
    rate: u32,
    secs: u64,
    proxies: Proxies<'_>,
) -> Result<Row> {
    // Warm-up: connections, pools, certificates.
    fixed_rate(&client.ns, target, host, rate, 1)
        .await
        .with_context(|| format!("{path}: warm-up"))?;
    let lat = fixed_rate(&client.ns, target, host, rate, secs)
        .await
        .with_context(|| format!("{path}: fixed rate"))?;
    let url = format!("http://{target}/");
    let d = format!("-d{secs}s");
    let before = proxies
        .iter()
        .map(|(_, pid)| cpu_ticks(*pid))
        .collect::<Result<Vec<_>>>()?;
    let out = run_in(
        &client.ns,
        &[
            "wrk",
            "-t2",
            "-c16",
            &d,
            "--latency",
            "-H",
            &format!("Host: {host}"),
            &url,
        ],
        Duration::from_secs(secs + 30),
    )
    .await?;
    let wrk = parse_wrk(&out)?;
    let cpu_us = proxies
        .iter()
        .zip(before)
        .map(|((name, pid), b)| {
            let us = (cpu_ticks(*pid)? - b) as f64 / clock_ticks() * 1e6 / wrk.requests.max(1) as f64;
            Ok((*name, us))
        })
        .collect::<Result<Vec<_>>>()?;
    if wrk.non_2xx > 0 || wrk.socket_errors > 0 {
        bail!(
            "{path}: wrk saw {} non-2xx and {} socket errors",
            wrk.non_2xx,
            wrk.socket_errors
        );
    }
    Ok(Row {
        path,
        p50_us: pct(&lat, 0.5),
        p99_us: pct(&lat, 0.99),
        max_rps: wrk.rps,
        cpu_us,
    })
}

const USAGE: &str = "usage: waypointbench [--quick] [--rate N] | --scale N [--in-flight R]";

/// What to run.
enum Mode {
    /// Latency and rate: `(seconds per run, fixed rate)`.
    Paths(u64, u32),
    Scale(scale::Opts),
}

fn parse_args() -> Result<Mode> {
    let (mut secs, mut rate) = (10u64, 1000u32);
    let mut scale: Option<scale::Opts> = None;
    let mut in_flight = 1000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => secs = 3,
            "--rate" => rate = args.next().context("--rate N")?.parse()?,
            "--scale" => {
                scale = Some(scale::Opts {
                    connections: args.next().context("--scale N")?.parse().context("--scale N")?,
                    in_flight: 0,
                })
            }
            "--in-flight" => in_flight = args.next().context("--in-flight R")?.parse().context("--in-flight R")?,
            other => bail!("unknown argument {other}; {USAGE}"),
        }
    }
    Ok(match scale {
        Some(o) => Mode::Scale(scale::Opts { in_flight, ..o }),
        None => Mode::Paths(secs, rate),
    })
}

/// What the waypoint process cost over its run.
struct WaypointCost {
    idle_rss_kib: u64,
    loaded_rss_kib: u64,
    cpu_s: f64,
    elapsed_s: f64,
}

/// Prints the table and how the waypoint and nginx compare with their baselines.
fn print_report(rows: &[Row], rate: u32, cost: &WaypointCost) {
    println!("\n| path | p50 at {rate}/s (µs) | p99 at {rate}/s (µs) | max req/s (wrk -c16) | proxy CPU per request at max (µs) |");
    println!("|---|---:|---:|---:|---|");
    for r in rows {
        let cpu: Vec<String> = r.cpu_us.iter().map(|(name, us)| format!("{name} {us:.1}")).collect();
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} |",
            r.path,
            r.p50_us,
            r.p99_us,
            r.max_rps,
            cpu.join(", ")
        );
    }
    let by = |n: &str| {
        rows.iter()
            .find(|r| r.path == n)
            .map(|r| (r.p50_us, r.p99_us, r.max_rps))
    };
    if let (Some(z), Some(w), Some(p), Some(n)) = (by("ztunnel"), by("waypoint"), by("plain"), by("nginx")) {
        println!(
            "\nwaypoint adds p50 {:+.0} µs, p99 {:+.0} µs over the ztunnel path; nginx adds p50 {:+.0} µs, p99 {:+.0} µs over plain",
            w.0 - z.0,
            w.1 - z.1,
            n.0 - p.0,
            n.1 - p.1
        );
        println!(
            "waypoint max rate: {:.0}% of the ztunnel path's, {:.0}% of nginx's",
            100.0 * w.2 / z.2,
            100.0 * w.2 / n.2
        );
    }
    println!(
        "waypoint RSS: {:.1} MiB idle, {:.1} MiB after load; CPU {:.1} s over {:.0} s of load",
        cost.idle_rss_kib as f64 / 1024.0,
        cost.loaded_rss_kib as f64 / 1024.0,
        cost.cpu_s,
        cost.elapsed_s
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let mode = parse_args()?;
    if !mesh_e2e::privileged() {
        bail!("waypointbench needs root (network namespaces)");
    }
    match mode {
        Mode::Paths(secs, rate) => paths(secs, rate).await,
        Mode::Scale(o) => scale::run(o).await,
    }
}

/// The four paths' latency and rate.
async fn paths(secs: u64, rate: u32) -> Result<()> {
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(ID, 2, &world(), &[&wp_id]).await?;
    let server = cluster.add_pod(1, PodSpec::new("server", "shop", &[("app", "server")]))?;
    let plain_server = cluster.add_pod(1, PodSpec::new("plain-server", "plain", &[]))?;
    for p in [&server, &plain_server] {
        tokio::spawn(named_server(p.ns.listen(SocketAddr::new(p.ip, 8080))?, "server"));
    }
    let nginx_pod = cluster.add_pod(1, PodSpec::new("nginx", "plain", &[]))?;
    let dir = tempfile::tempdir()?;
    let upstream = format!(
        "upstream backend {{ server {}:8080; keepalive 32; keepalive_requests 1000000; }}",
        plain_server.ip
    );
    let location = r#"proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";"#;
    let mut nginx = start_nginx(&nginx_pod.ns, dir.path(), &upstream, location)?;
    wait_listening(&nginx_pod.ns, 8080, &mut nginx).await?;
    let client = cluster.add_pod(0, PodSpec::new("client", "shop", &[]))?;
    let plain_client = cluster.add_pod(0, PodSpec::new("plain-client", "plain", &[]))?;
    let waypoint = Waypoint::start(&cluster, 1, "shop", "waypoint").await?;
    for p in [&server, &client] {
        cluster.wait_workload(p, true, Duration::from_secs(15)).await?;
    }
    let pid = waypoint.pid() as i32;
    let idle_rss = rss_kib(pid)?;
    let ztunnel = |node: usize| -> Result<i32> {
        let z = cluster.nodes[node]
            .ztunnel
            .lock()
            .map_err(|_| anyhow::anyhow!("ztunnel lock poisoned"))?;
        Ok(z.as_ref().and_then(|z| z.pid()).context("node has no ztunnel")? as i32)
    };
    let (zt_client, zt_server) = (("client ztunnel", ztunnel(0)?), ("server ztunnel", ztunnel(1)?));

    let mut rows = vec![
        measure(
            "plain",
            &plain_client,
            SocketAddr::new(plain_server.ip, 8080),
            "server",
            rate,
            secs,
            &[],
        )
        .await?,
        measure(
            "nginx",
            &plain_client,
            SocketAddr::new(nginx_pod.ip, 8080),
            "server",
            rate,
            secs,
            &[],
        )
        .await?,
        measure(
            "ztunnel",
            &client,
            SocketAddr::new(vip(10), 80),
            "direct.shop",
            rate,
            secs,
            &[zt_client, zt_server],
        )
        .await?,
    ];
    let cpu_before = cpu_ticks(pid)?;
    let fixed_start = Instant::now();
    rows.push(
        measure(
            "waypoint",
            &client,
            SocketAddr::new(vip(11), 80),
            "viawp.shop",
            rate,
            secs,
            &[zt_client, ("waypoint", pid), zt_server],
        )
        .await?,
    );
    let cost = WaypointCost {
        cpu_s: (cpu_ticks(pid)? - cpu_before) as f64 / clock_ticks(),
        elapsed_s: fixed_start.elapsed().as_secs_f64(),
        loaded_rss_kib: rss_kib(pid)?,
        idle_rss_kib: idle_rss,
    };
    print_report(&rows, rate, &cost);
    drop(nginx);
    Ok(())
}
