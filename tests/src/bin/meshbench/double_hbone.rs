//! `meshbench --scenario double-hbone` (issue 17): what crossing networks through an east-west
//! gateway costs. Two paths in the same run, measured by the same rounds as the main bench
//! (iperf3 one stream, wrk -c10 and -c1, ab -c4):
//!
//! - same network: client pod -> ztunnel -> ztunnel -> server pod ([`Bed`], each pod with its
//!   own dedicated-mode ztunnel, as on two nodes);
//! - double HBONE: client pod -> ztunnel -> east-west gateway -> ztunnel -> server pod on the
//!   other network ([`Nets`], ztunnels and `waypoint --role east-west` fed by local state
//!   files), calling service `server`'s VIP, whose only endpoint is behind the gateway.

use anyhow::{ensure, Context, Result};
use mesh_e2e::bench::rss_kib;
use mesh_e2e::eastwest::{EastWest, Nets};
use mesh_e2e::Bed;

use super::{
    check_path, clock_ticks, line_value, load_average, pct, preflight, rounds, start_servers, tune, write_report, wrk,
    Figures, Opts, Plan, Pods, Zt, NET,
};

/// Id of the two networks: 10.121.1.0/24 and 10.121.2.0/24, VIP 10.96.121.10.
const NETS_ID: u8 = 121;

pub(super) async fn run(opts: &Opts) -> Result<()> {
    preflight()?;
    let plan = Plan::new(opts.quick, opts.rounds);
    let tck = clock_ticks();
    let bed = Bed::try_new(NET).context("creating the same-network pods")?;
    let nets = Nets::build(NETS_ID).context("creating the two networks")?;
    for ns in [&bed.a, &bed.b, &nets.a, &nets.b] {
        tune(ns)?;
    }
    let tmp = tempfile::Builder::new().prefix("meshbench-").tempdir()?;
    let zc = Zt::start(&bed.a, &bed.files(), None).await?;
    let zs = Zt::start(&bed.b, &bed.files(), None).await?;
    let za = nets.ztunnel(&nets.a, 1).await?;
    let zb = nets.ztunnel(&nets.b, 2).await?;
    let gw = EastWest::start(&nets).await?;
    let pid = |z: &mesh_e2e::Ztunnel<'_>| z.pid().map(|p| p as i32).context("ztunnel not running");
    let same = Pods {
        label: "same-network",
        client: &bed.a,
        server: &bed.b,
        server_ip: bed.ip(2),
        proxies: Some((zc.pid, zs.pid)),
    };
    let double = Pods {
        label: "double-hbone",
        client: &nets.a,
        server: &nets.b,
        server_ip: nets.vip().ip(),
        proxies: Some((pid(&za)?, pid(&zb)?)),
    };
    let paths = [&same, &double];
    let mut servers = Vec::new();
    for p in paths {
        servers.extend(start_servers(p, tmp.path()).await?);
        check_path(p).await?;
    }
    let forwarded = line_value(
        &gw.metrics().await?,
        "eastwest_streams_total",
        &["outcome=\"forwarded\""],
    );
    ensure!(
        forwarded >= 1.0,
        "the double-HBONE path did not cross the gateway; log:\n{}",
        gw.logs()
    );
    eprintln!("meshbench: both paths answer; warming up");
    for p in paths {
        wrk(p, 2, 10, plan.warmup_secs)
            .await
            .with_context(|| format!("{} warm-up", p.label))?;
    }
    let load_before = load_average();
    let results = rounds(&paths, plan, tck).await?;
    let report = Report {
        plan,
        same: Figures::of(&results[0]),
        double: Figures::of(&results[1]),
        gateway_rss_kib: rss_kib(gw.pid() as i32)?,
        load: (load_before, load_average()),
    };
    drop(servers);
    write_report(opts, "double-hbone", &report.markdown())
}

struct Report {
    plan: Plan,
    same: Figures,
    double: Figures,
    gateway_rss_kib: u64,
    /// Load average before and after the rounds.
    load: (String, String),
}

impl Report {
    fn markdown(&self) -> String {
        let (s, d, p) = (&self.same, &self.double, &self.plan);
        let mut md = format!(
            "## meshbench --scenario double-hbone: same-network call vs double HBONE through the east-west gateway\n\n\
             Median of {} round(s); iperf3 {} s, wrk {} s, ab -n {} per path and round.\n\n\
             | figure | same network (ztunnel -> ztunnel) | double HBONE (ztunnel -> east-west gateway -> ztunnel) | double / same |\n\
             |---|---:|---:|---:|\n",
            p.rounds, p.iperf_secs, p.wrk_secs, p.ab_requests
        );
        let rate = |name: &str, a: f64, b: f64, digits: usize| {
            format!("| {name} | {a:.digits$} | {b:.digits$} | {:.0} % |\n", pct(b, a))
        };
        let latency = |name: &str, a: f64, b: f64| format!("| {name} | {a:.0} | {b:.0} | {:+.0} µs |\n", b - a);
        md += &rate("iperf3 one stream (Gbit/s)", s.gbps, d.gbps, 2);
        md += &rate("wrk -c10 keep-alive (req/s)", s.ka_rps, d.ka_rps, 0);
        md += &latency("wrk -c10 keep-alive p99 (µs)", s.ka_p99, d.ka_p99);
        md += &latency("wrk -c1 closed loop p50 (µs)", s.rr_p50, d.rr_p50);
        md += &latency("wrk -c1 closed loop p99 (µs)", s.rr_p99, d.rr_p99);
        md += &rate("ab -c4 new connection per request (req/s)", s.ab_rps, d.ab_rps, 0);
        if s.errors + d.errors > 0 {
            md += &format!("\n**{} errors / failed requests**\n", s.errors + d.errors);
        }
        md += &format!(
            "\nEast-west gateway RSS after the load: {:.1} MiB. Load average (1, 5, 15 min): {} before, {} after.\n",
            self.gateway_rss_kib as f64 / 1024.0,
            self.load.0,
            self.load.1
        );
        md
    }
}
