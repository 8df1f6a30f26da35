//! `meshbench --profile`: where a proxy's time goes under a load. Each load runs twice per
//! proxy pair: once with `strace -c -f` attached to both proxies (system calls by name, per
//! request or per MiB; strace slows the proxies, the counts stay right), once under
//! `perf record -e cpu-clock` (CPU samples by shared object and by symbol; Istio's ztunnel is
//! stripped, so only its split between kernel and user space is meaningful). Tools that are
//! absent are skipped with a note.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// System calls of one proxy over one load: (name, calls), most frequent first.
#[derive(Clone, Debug, Default)]
pub struct Syscalls {
    pub calls: Vec<(String, u64)>,
}

impl Syscalls {
    pub fn total(&self) -> u64 {
        self.calls.iter().map(|c| c.1).sum()
    }
}

/// Parses the summary `strace -c` writes: one line per system call, then `total`.
pub fn parse_strace_summary(text: &str) -> Syscalls {
    let mut calls: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors,] syscall
            let (calls, name) = match t.as_slice() {
                [_, _, _, calls, name] | [_, _, _, calls, _, name] => (calls, name),
                _ => return None,
            };
            if *name == "total" || t[0].starts_with('%') || t[0].starts_with('-') {
                return None;
            }
            Some(((*name).to_owned(), calls.parse().ok()?))
        })
        .collect();
    calls.sort_by_key(|c| std::cmp::Reverse(c.1));
    Syscalls { calls }
}

/// CPU samples of one proxy: (name, share in %), largest first.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub by_dso: Vec<(String, f64)>,
    pub by_symbol: Vec<(String, f64)>,
    /// Symbols in user space only (`[.]`): the proxy's own code and its libraries.
    pub user_symbols: Vec<(String, f64)>,
}

/// Parses `perf report --stdio` lines (`  12.34%  name...`).
pub fn parse_perf_report(text: &str, keep: usize) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let l = l.trim();
            let (p, rest) = l.split_once('%')?;
            Some((rest.trim().to_owned(), p.trim().parse::<f64>().ok()?))
        })
        .take(keep)
        .collect()
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A tracer attached to a pid, interrupted (SIGINT: strace and perf then write their output)
/// and reaped on drop.
struct Tracer(Child);

impl Tracer {
    fn spawn(args: &[&str]) -> Result<Tracer> {
        let child = Command::new(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", args.join(" ")))?;
        Ok(Tracer(child))
    }

    fn stop(mut self) -> Result<()> {
        self.interrupt();
        Ok(())
    }

    fn interrupt(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.interrupt();
    }
}

/// Waits until every thread of `pid` is traced (strace attached to all of them).
async fn wait_traced(pid: i32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = true;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let status = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
            let tracer = status
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .map_or("0", str::trim);
            all &= tracer != "0";
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("strace did not attach to {pid} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one proxy did during a load.
#[derive(Clone, Debug, Default)]
pub struct SideProfile {
    pub syscalls: Option<Syscalls>,
    pub samples: Option<Samples>,
}

/// Runs `load` twice (see the module comment) with the proxies `pids` (client, server) watched.
pub async fn watch<T, F, Fut>(
    label: &str,
    what: &str,
    pids: [i32; 2],
    dir: &Path,
    load: F,
) -> Result<(Vec<T>, [SideProfile; 2])>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut out: [SideProfile; 2] = Default::default();
    let mut results = Vec::new();
    let files = |tool: &str, ext: &str| -> Vec<PathBuf> {
        (0..2)
            .map(|i| dir.join(format!("{tool}-{label}-{}-{i}.{ext}", what.replace(" ", "-"))))
            .collect()
    };
    if have("strace") {
        let files = files("strace", "txt");
        results.push(under_strace(pids, &files, &load).await?);
        for (side, file) in out.iter_mut().zip(&files) {
            side.syscalls = Some(parse_strace_summary(&std::fs::read_to_string(file).unwrap_or_default()));
        }
    } else {
        eprintln!("meshbench: --profile: strace not found; system calls not counted");
    }
    if have("perf") {
        let files = files("perf", "data");
        results.push(under_perf(pids, &files, &load).await?);
        for (side, file) in out.iter_mut().zip(&files) {
            side.samples = Some(perf_samples(file));
        }
    } else {
        eprintln!("meshbench: --profile: perf not found; no CPU profile");
    }
    Ok((results, out))
}

/// One run of `load` with `strace -c` attached to both proxies, summaries to `files`.
async fn under_strace<T, F, Fut>(pids: [i32; 2], files: &[PathBuf], load: &F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let tracers = spawn_each(pids, files, |p, f| {
        ["strace", "-c", "-f", "-q", "-o", f, "-p", p]
            .map(str::to_owned)
            .to_vec()
    })?;
    for pid in pids {
        wait_traced(pid).await?;
    }
    run_then_stop(tracers, load).await
}

/// One run of `load` with `perf record` (cpu-clock) attached to both proxies, data to `files`.
async fn under_perf<T, F, Fut>(pids: [i32; 2], files: &[PathBuf], load: &F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    // Call graphs make each file hundreds of MiB: only when asked.
    let call_graph = std::env::var_os("MESHBENCH_CALL_GRAPH").is_some_and(|v| v == "1");
    let tracers = spawn_each(pids, files, |p, f| {
        let mut args = [
            "perf",
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "4000",
            "-p",
            p,
            "-o",
            f,
        ]
        .to_vec();
        if call_graph {
            args.extend(["--call-graph", "dwarf,16384"]);
        }
        args.into_iter().map(str::to_owned).collect()
    })?;
    // perf record gives no signal once it is attached; it takes a few milliseconds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    run_then_stop(tracers, load).await
}

/// One tracer per proxy, its command line from the pid and the output file.
fn spawn_each(pids: [i32; 2], files: &[PathBuf], args: impl Fn(&str, &str) -> Vec<String>) -> Result<Vec<Tracer>> {
    pids.iter()
        .zip(files)
        .map(|(pid, file)| {
            let argv = args(&pid.to_string(), &file.display().to_string());
            Tracer::spawn(&argv.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .collect()
}

async fn run_then_stop<T, F, Fut>(tracers: Vec<Tracer>, load: &F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let result = load().await?;
    for t in tracers {
        t.stop()?;
    }
    Ok(result)
}

/// The samples of one perf data file: by object, by symbol, and user-space symbols.
fn perf_samples(file: &Path) -> Samples {
    let f = file.display().to_string();
    let report = |sort: &str| {
        crate::netns::sh(&["perf", "report", "-i", &f, "--stdio", "--no-children", "--sort", sort]).unwrap_or_default()
    };
    let symbols = parse_perf_report(&report("sym"), usize::MAX);
    Samples {
        by_dso: parse_perf_report(&report("dso"), 6),
        user_symbols: symbols
            .iter()
            .filter(|s| s.0.starts_with("[.]"))
            .take(25)
            .cloned()
            .collect(),
        by_symbol: symbols.into_iter().take(25).collect(),
    }
}

/// One load watched on a path: what each proxy (client, server) did per unit of work.
pub struct LoadProfile {
    /// What ran, say "wrk -c10 keep-alive".
    pub load: String,
    /// "request" or "MiB".
    pub unit: &'static str,
    /// Units done during the strace run (the per-unit divisor).
    pub units: f64,
    pub sides: [SideProfile; 2],
}

/// A path's profile under several loads.
pub struct ProfileReport {
    pub label: String,
    pub loads: Vec<LoadProfile>,
}

impl ProfileReport {
    pub fn json(&self) -> Value {
        let side = |s: &SideProfile, units: f64| {
            json!({
                "syscalls_per_unit": s.syscalls.as_ref().map(|c| c.total() as f64 / units),
                "syscalls": s.syscalls.as_ref().map(|c| c.calls.iter().map(|(n, k)| json!({"name": n, "per_unit": *k as f64 / units})).collect::<Vec<_>>()),
                "cpu_by_dso_pct": s.samples.as_ref().map(|p| p.by_dso.clone()),
                "cpu_by_symbol_pct": s.samples.as_ref().map(|p| p.by_symbol.clone()),
                "cpu_by_user_symbol_pct": s.samples.as_ref().map(|p| p.user_symbols.clone()),
            })
        };
        let loads: Vec<Value> = self
            .loads
            .iter()
            .map(|l| {
                json!({
                    "load": l.load, "unit": l.unit, "units": l.units,
                    "client": side(&l.sides[0], l.units), "server": side(&l.sides[1], l.units),
                })
            })
            .collect();
        json!({"path": self.label, "loads": loads})
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("### profile: {} (client side / server side)\n\n", self.label);
        for l in &self.loads {
            let calls = |i: usize| {
                l.sides[i].syscalls.as_ref().map_or_else(
                    || "—".to_owned(),
                    |c| {
                        let top: Vec<String> = c
                            .calls
                            .iter()
                            .take(6)
                            .map(|(n, k)| format!("{n} {:.2}", *k as f64 / l.units))
                            .collect();
                        format!("{:.2} ({})", c.total() as f64 / l.units, top.join(", "))
                    },
                )
            };
            s.push_str(&format!(
                "- {}: system calls per {}: client {}; server {}\n",
                l.load,
                l.unit,
                calls(0),
                calls(1)
            ));
            for (i, side) in ["client", "server"].iter().enumerate() {
                if let Some(p) = &l.sides[i].samples {
                    let list = |v: &[(String, f64)], n: usize| {
                        v.iter()
                            .take(n)
                            .map(|(k, p)| format!("{p:.1} % {k}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    s.push_str(&format!(
                        "- {}, {side} CPU by object: {}; top symbols: {}; top user-space symbols: {}\n",
                        l.load,
                        list(&p.by_dso, 4),
                        list(&p.by_symbol, 8),
                        list(&p.user_symbols, 8)
                    ));
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strace_and_perf() {
        let strace = "% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 60.00    0.006000          10       600           sendto
 30.00    0.003000           5       600       300 recvfrom
 10.00    0.001000           1      1000           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.010000           4      2200       300 total
";
        let s = parse_strace_summary(strace);
        assert_eq!(s.total(), 2200);
        assert_eq!(s.calls[0], ("epoll_wait".to_owned(), 1000));
        let perf = "# Overhead  Shared Object\n# ....\n    55.10%  [kernel.kallsyms]\n    40.00%  ztunnel\n";
        assert_eq!(
            parse_perf_report(perf, 5),
            vec![("[kernel.kallsyms]".to_owned(), 55.1), ("ztunnel".to_owned(), 40.0)]
        );
    }
}
