//! Pieces the benchmark binaries share: processes in namespaces stopped on drop, running a
//! tool to completion, waiting for a listener, /proc sampling (CPU ticks, RSS) and wrk's
//! output.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::netns::sh;
use crate::Netns;

/// A long-running process (inside a namespace), stopped on drop: SIGTERM, then SIGKILL after
/// `grace`.
pub struct Proc {
    what: String,
    child: Child,
    grace: Duration,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(ns: &Netns, args: &[&str], log: PathBuf, grace: Duration) -> Result<Proc> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {args:?} in {}", ns.name))?;
        Ok(Proc {
            what: format!("{} in {}", args[0], ns.name),
            child,
            grace,
            log,
        })
    }

    /// The process (`ip netns exec` replaces itself with the program).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails (with the log) if the process already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); output:\n{}", self.what, tail(&self.log, 40));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if !self.grace.is_zero() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a tool inside `ns` to completion (killed if the bench is interrupted or it overruns).
pub async fn run_in(ns: &Netns, args: &[&str], timeout: Duration) -> Result<String> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| anyhow!("{} did not finish within {timeout:?}", args.join(" ")))?
        .with_context(|| format!("running {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`{}` in {} failed ({}):\n{}\n{}",
            args.join(" "),
            ns.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

/// Waits until something listens on TCP `port` inside `ns` (checked with ss, so no probe
/// connection disturbs the server).
pub async fn wait_listening(ns: &Netns, port: u16, proc_: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.exec(&["ss", "-Hltn", &format!("sport = :{port}")])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        proc_.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{} not listening on port {port} within 10 s; output:\n{}",
                proc_.what,
                tail(&proc_.log, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn clock_ticks() -> f64 {
    sh(&["getconf", "CLK_TCK"])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid` in clock ticks (all threads).
pub fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat_ticks(&stat).ok_or_else(|| anyhow!("cannot parse /proc/{pid}/stat: {stat}"))
}

pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // Fields after "(comm)" start at field 3 (state); utime is field 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Context switches of `pid` (voluntary and involuntary, summed over its threads): how often
/// it went to sleep and was woken, or was preempted.
pub fn ctxt_switches(pid: i32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("reading /proc/{pid}/task"))? {
        // A thread may exit between listing and reading.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Minor page faults of `pid` (all threads): pages the kernel had to map in, say for memory
/// the allocator took fresh from the system.
pub fn minor_faults(pid: i32) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after "(comm)" start at field 3 (state); minflt is field 10.
    let rest = stat.rfind(')').map(|i| &stat[i + 1..]).unwrap_or_default();
    rest.split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("cannot parse /proc/{pid}/stat: {stat}"))
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: i32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size.
pub fn hwm_kib(pid: i32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

pub fn status_kib(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Wrk {
    pub rps: f64,
    pub requests: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p75_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub socket_errors: u64,
    pub non_2xx: u64,
}

impl Wrk {
    pub fn json(&self) -> Value {
        json!({
            "requests_per_sec": self.rps, "requests": self.requests, "latency_mean_us": self.mean_us,
            "latency_p50_us": self.p50_us, "latency_p75_us": self.p75_us, "latency_p90_us": self.p90_us,
            "latency_p99_us": self.p99_us, "socket_errors": self.socket_errors, "non_2xx": self.non_2xx,
        })
    }
}

/// "110.00us", "1.20ms", "2.00s", "1.00m" -> microseconds.
pub fn wrk_duration_us(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e6)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * scale)
}

pub fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let mut in_dist = false;
    let (mut got_rps, mut got_p50, mut got_p99) = (false, false, false);
    for line in out.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Latency", "Distribution", ..] => in_dist = true,
            ["Latency", avg, ..] if !in_dist => w.mean_us = wrk_duration_us(avg).unwrap_or(0.0),
            [pct, v] if in_dist && pct.ends_with('%') => {
                let v = wrk_duration_us(v).ok_or_else(|| anyhow!("bad latency {v:?} in wrk output"))?;
                match *pct {
                    "50%" => (w.p50_us, got_p50) = (v, true),
                    "75%" => w.p75_us = v,
                    "90%" => w.p90_us = v,
                    "99%" => (w.p99_us, got_p99) = (v, true),
                    _ => {}
                }
            }
            [n, "requests", "in", ..] => {
                in_dist = false;
                w.requests = n.parse()?;
            }
            ["Requests/sec:", v] => (w.rps, got_rps) = (v.parse()?, true),
            ["Socket", "errors:", rest @ ..] => {
                w.socket_errors = rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.non_2xx = n.parse()?,
            _ => {}
        }
    }
    if !(got_rps && got_p50 && got_p99) {
        bail!("unexpected wrk output (was --latency given?):\n{out}");
    }
    Ok(w)
}

/// `wrk -t<threads> -c<conns> -d<secs>s --latency [extra..] <url>` from `ns`, parsed; fails
/// when no request completed.
pub async fn wrk_in(ns: &Netns, url: &str, load: (u32, u32, u32), extra: &[&str]) -> Result<Wrk> {
    let (threads, conns, secs) = load;
    let (t, c, d) = (format!("-t{threads}"), format!("-c{conns}"), format!("-d{secs}s"));
    let mut args = vec!["wrk", &t, &c, &d, "--latency"];
    args.extend(extra);
    args.push(url);
    let out = run_in(ns, &args, Duration::from_secs(secs as u64 + 30)).await?;
    let w = parse_wrk(&out)?;
    if w.requests == 0 {
        bail!("wrk against {url} completed no request:\n{out}");
    }
    Ok(w)
}

/// RSS of `pid` and its children (nginx's master and workers), in KiB.
pub fn tree_rss_kib(pid: i32) -> Result<u64> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut total = rss_kib(pid)?;
    for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
        total += rss_kib(child).unwrap_or(0);
    }
    Ok(total)
}

/// nginx on port 8080 with all its files inside `dir`: `http_extra` goes into the `http`
/// block (an upstream, say) and `location` is the body of `location /`.
pub fn start_nginx(ns: &Netns, dir: &Path, http_extra: &str, location: &str) -> Result<Proc> {
    start_nginx_workers(ns, dir, "1", http_extra, location)
}

/// As [`start_nginx`] with `worker_processes` set to `workers` ("auto": one per CPU, as
/// Debian's default configuration has it).
pub fn start_nginx_workers(ns: &Netns, dir: &Path, workers: &str, http_extra: &str, location: &str) -> Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    let conf = format!(
        r#"worker_processes {workers};
daemon off;
error_log stderr;
pid {d}/nginx.pid;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  # Benchmarks keep connections for the whole run.
  keepalive_requests 1000000;
  {http_extra}
  server {{
    listen 8080;
    location / {{ {location} }}
  }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let prefix = format!("{d}/");
    let conf_s = conf_path.display().to_string();
    Proc::spawn(
        ns,
        &["nginx", "-e", "stderr", "-p", &prefix, "-c", &conf_s],
        dir.join("nginx.log"),
        Duration::from_secs(3),
    )
}

/// Raises this process's soft descriptor limit to the hard one (the proxies it starts
/// inherit it) with util-linux's `prlimit`; returns the limit.
pub fn raise_nofile() -> Result<u64> {
    let pid = std::process::id().to_string();
    let hard = sh(&[
        "prlimit",
        "--pid",
        &pid,
        "--nofile",
        "--raw",
        "--noheadings",
        "--output",
        "HARD",
    ])
    .context("reading the descriptor limit (prlimit, util-linux)")?;
    let hard = hard.trim();
    let limit: u64 = hard.parse().with_context(|| format!("descriptor limit {hard:?}"))?;
    sh(&["prlimit", "--pid", &pid, &format!("--nofile={limit}:{limit}")])
        .context("raising the soft descriptor limit")?;
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://10.202.0.2:8080/
  2 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.50us   50.00us   2.00ms   90.00%
    Req/Sec    40.00k     2.00k   45.00k    70.00%
  Latency Distribution
     50%  110.00us
     75%  130.00us
     90%  160.00us
     99%    1.30ms
  800000 requests in 10.00s, 100.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  80000.00
Transfer/sec:     10.00MB
";

    #[test]
    fn parses_wrk() {
        let w = parse_wrk(WRK).unwrap();
        assert_eq!(w.rps, 80000.0);
        assert_eq!(w.requests, 800000);
        assert_eq!(w.mean_us, 120.5);
        assert_eq!(w.p50_us, 110.0);
        assert_eq!(w.p99_us, 1300.0);
        assert_eq!(w.socket_errors, 3);
        assert!(parse_wrk("garbage").is_err());
        assert_eq!(wrk_duration_us("2.00s"), Some(2e6));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(median(vec![f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn parses_stat() {
        let stat = "1234 (z tun) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 4 0";
        assert_eq!(parse_stat_ticks(stat), Some(267));
    }
}
