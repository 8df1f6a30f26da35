//! connbench: what an idle proxied connection costs, and how fast new ones are set up, as the
//! count grows to the descriptor limit; ours and Istio's ztunnel in one run.
//!
//! For each proxy, a [`mesh_e2e::Bed`]: client pod `a` and server pod `b`, both captured with
//! the node agent's in-pod rules, each served by its own ztunnel (dedicated mode; Istio's
//! with `PACKET_MARK=1337` as meshbench runs it, skipped with a note when
//! `../shared/peers/istio-ztunnel` is absent or with `--no-istio`). The server pod runs this
//! binary's holding server (`--hold PORT`: accept, echo one byte, keep the connection). The
//! bench opens keep-alive connections from the client pod, each proven end to end by its
//! one-byte echo (client pod -> ztunnel -> HBONE -> ztunnel -> server), and keeps them open,
//! stepping through the levels (1,000, 10,000 and the descriptor limit: `ulimit -Hn` less
//! room for the processes' own files; the soft limit is raised to the hard one first, and
//! the proxies inherit it). At each level it prints both ztunnels' RSS, the memory per
//! connection (RSS growth over the idle proxies, both together, / connections held) and the
//! setup rate at that level (new connections/s over the step's last `--rate-window`
//! connections, the median of three batches, `--concurrency` in flight), then the cost
//! extrapolated to 100,000 connections.
//!
//! ```text
//! cargo build --release -p ztunnel -p mesh-e2e
//! sudo target/release/connbench [--levels 1000,10000,max] [--concurrency N] [--rate-window N] [--ramp N] [--warm N] [--no-istio]
//! ```
//!
//! Everything it creates (namespaces, processes, files) is removed on exit, error, Ctrl-C or
//! SIGTERM.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mesh_e2e::bench::{raise_nofile, rss_kib, wait_listening, Proc};
use mesh_e2e::istio::{self, IstioZtunnel};
use mesh_e2e::{Bed, Netns, Ztunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const USAGE: &str =
    "usage: connbench [--levels L,L,...] [--concurrency N] [--rate-window N] [--ramp N] [--warm N] [--no-istio]

Opens idle keep-alive connections client pod -> ztunnel -> HBONE -> ztunnel -> server
(dedicated mode, in-pod rules) and reports, at each level, both ztunnels' RSS, memory per
connection and the setup rate; for ours and Istio's ztunnel. Needs root.

  --levels L,...     connection counts to step through (default 1000,10000,max; max = the
                     descriptor limit, `ulimit -Hn`, less room for the processes' own files)
  --concurrency N    connections being set up at once (default 64)
  --rate-window N    the setup rate at a level is timed over the last N connections opened to
                     reach it (default 1500, as three batches; the median batch's rate): the
                     rate with that many held, not an average over the step
  --ramp N           connections opened and closed after the idle baseline, before the first
                     level (default 1000): the first few hundred after start set up at about
                     half speed, and the first level's connections reuse what they freed
  --warm N           connections opened and closed before the idle baseline (default 10); what
                     a larger warm-up leaves allocated counts as idle memory, so memory per
                     connection reads low at the first levels
  --no-istio         leave out Istio's ztunnel (also skipped, with a note, when
                     ../shared/peers/istio-ztunnel is absent)
  --pause SECS       wait SECS after the idle baseline, printing the ztunnels' pids (to attach
                     a heap profiler such as `heaptrack -p PID`)
";

/// The server pod's port (the workload file's target port).
const PORT: u16 = 8080;
/// Descriptors kept free under the limit in every process on the path (listeners, logs,
/// HBONE connections, the runtime's own).
const HEADROOM: u64 = 300;
/// Subnets 10.77.<n>.0/24 of the two beds.
const NET: u8 = 233;
/// Timed batches per level (see [`step`]).
const RATE_BATCHES: u64 = 3;
/// What the cost is extrapolated to.
const EXTRAPOLATE: u64 = 100_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Level {
    Count(u64),
    Max,
}

struct Opts {
    levels: Vec<Level>,
    concurrency: usize,
    rate_window: u64,
    ramp: u64,
    warm: u64,
    istio: bool,
    pause: Duration,
}

enum Mode {
    Bench(Opts),
    Hold(u16),
    Help,
}

fn parse_args() -> Result<Mode> {
    let mut o = Opts {
        levels: vec![Level::Count(1_000), Level::Count(10_000), Level::Max],
        concurrency: 64,
        rate_window: 1500,
        ramp: 1000,
        warm: 10,
        istio: true,
        pause: Duration::ZERO,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--hold" => return Ok(Mode::Hold(args.next().context("--hold PORT")?.parse()?)),
            "--levels" => {
                let list = args.next().context("--levels L,L,...")?;
                o.levels = list
                    .split(',')
                    .map(|l| match l {
                        "max" => Ok(Level::Max),
                        n => n.parse().map(Level::Count).with_context(|| format!("level {n:?}")),
                    })
                    .collect::<Result<_>>()?;
            }
            "--concurrency" => o.concurrency = args.next().context("--concurrency N")?.parse()?,
            "--rate-window" => o.rate_window = args.next().context("--rate-window N")?.parse()?,
            "--ramp" => o.ramp = args.next().context("--ramp N")?.parse()?,
            "--warm" => o.warm = args.next().context("--warm N")?.parse()?,
            "--no-istio" => o.istio = false,
            "--pause" => o.pause = Duration::from_secs(args.next().context("--pause SECS")?.parse()?),
            "-h" | "--help" => return Ok(Mode::Help),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if o.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if o.rate_window == 0 {
        bail!("--rate-window must be at least 1");
    }
    if o.warm == 0 {
        bail!("--warm must be at least 1 (the warm-up proves the path)");
    }
    Ok(Mode::Bench(o))
}

fn main() -> std::process::ExitCode {
    let mode = match parse_args() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("connbench: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = (|| {
        let limit = raise_nofile()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async {
            match mode {
                Mode::Help => {
                    print!("{USAGE}");
                    Ok(())
                }
                Mode::Hold(port) => hold(port).await,
                Mode::Bench(opts) => {
                    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                    // Dropping the bench future runs every guard's Drop: the teardown.
                    tokio::select! {
                        r = bench(&opts, limit) => r,
                        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (Ctrl-C); cleaned up")),
                        _ = term.recv() => Err(anyhow!("terminated (SIGTERM); cleaned up")),
                    }
                }
            }
        })
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connbench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server pod's holding server

/// Accepts on `port`, echoes each connection's first byte and holds it until the peer closes.
async fn hold(port: u16) -> Result<()> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    let listener = socket.listen(4096)?;
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors: say so and keep serving the connections held.
                eprintln!("connbench --hold: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                // Held until the client closes.
                let _ = s.read(&mut b).await;
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The proxies

/// A pair of ztunnels (ours or Istio's) serving the bed's client and server pods.
enum Pair<'a> {
    Ours(Ztunnel<'a>, Ztunnel<'a>),
    Istio(IstioZtunnel<'a>, IstioZtunnel<'a>),
}

impl Pair<'_> {
    fn pids(&self) -> Result<(i32, i32)> {
        let (c, s) = match self {
            Pair::Ours(c, s) => (c.pid(), s.pid()),
            Pair::Istio(c, s) => (c.pid(), s.pid()),
        };
        match (c, s) {
            (Some(c), Some(s)) => Ok((c as i32, s as i32)),
            _ => bail!("a ztunnel is not running"),
        }
    }

    /// Both ztunnels' RSS in KiB (client side, server side).
    fn rss(&self) -> Result<(u64, u64)> {
        let (c, s) = self.pids()?;
        Ok((rss_kib(c)?, rss_kib(s)?))
    }

    /// Both ztunnels' memory mappings (client side, server side): growing by one per
    /// connection means each holds an allocation large enough for malloc to map it alone.
    fn mappings(&self) -> Result<(usize, usize)> {
        let (c, s) = self.pids()?;
        let count = |pid: i32| -> Result<usize> {
            Ok(std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .with_context(|| format!("reading /proc/{pid}/maps"))?
                .lines()
                .count())
        };
        Ok((count(c)?, count(s)?))
    }
}

/// Istio's ztunnel in dedicated mode for `workload` (`ns/name/sa`) from `state`, with its
/// built-in test CA and `PACKET_MARK=1337` so the capture rules let its own sockets through.
async fn istio_ztunnel<'a>(ns: &'a Netns, binary: &Path, workload: &str, state: &Path) -> Result<IstioZtunnel<'a>> {
    let env = [
        ("PROXY_MODE", "dedicated".to_owned()),
        ("PROXY_WORKLOAD_INFO", workload.to_owned()),
        ("XDS_ADDRESS", String::new()),
        ("CA_ADDRESS", String::new()),
        ("FAKE_CA", "true".to_owned()),
        ("LOCAL_XDS_PATH", state.display().to_string()),
        ("PACKET_MARK", "1337".to_owned()),
    ];
    let mut z = IstioZtunnel::spawn(ns, binary, &env)?;
    z.wait_ready(Duration::from_secs(20)).await?;
    Ok(z)
}

/// The bed's client and server in the local file format of Istio's ztunnel.
fn istio_state(bed: &Bed) -> String {
    let workload = |name: &str, ip: IpAddr| {
        format!(
            "- uid: cluster1//Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  \
             trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: node-{name}\n  \
             canonicalName: {name}\n  canonicalRevision: v1\n  workloadName: {name}\n  services: {{}}\n"
        )
    };
    format!(
        "workloads:\n{}{}services: []\npolicies: []\n",
        workload("client", bed.ip(1)),
        workload("server", bed.ip(2))
    )
}

// ---------------------------------------------------------------------------------------------
// Opening connections

/// What opening a batch of connections gave.
struct Opened {
    streams: Vec<TcpStream>,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

/// Sockets created inside `ns` (one thread switch for the lot, so the setup time measured
/// below is the proxies' and the kernel's, not the bench's).
fn sockets(ns: &Netns, count: u64) -> Result<Vec<TcpSocket>> {
    let std: Vec<std::net::TcpStream> = ns.enter(|| {
        (0..count)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                Ok(std::net::TcpStream::from(s))
            })
            .collect()
    })?;
    Ok(std.into_iter().map(TcpSocket::from_std_stream).collect())
}

/// Connects and proves the path with the one-byte echo.
async fn connect(socket: TcpSocket, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = socket.connect(dst).await?;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(s)
}

/// Opens `count` connections from `ns` to `dst`, `concurrency` at a time.
async fn open(ns: &Netns, dst: SocketAddr, count: u64, concurrency: usize) -> Result<Opened> {
    let queue = Arc::new(Mutex::new(sockets(ns, count)?));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let queue = queue.clone();
        workers.spawn(async move {
            let mut got = (Vec::new(), 0u64, None::<String>);
            loop {
                let next = queue.lock().map_err(|_| anyhow!("queue lock poisoned"))?.pop();
                let Some(socket) = next else { break };
                match tokio::time::timeout(Duration::from_secs(10), connect(socket, dst)).await {
                    Ok(Ok(s)) => got.0.push(s),
                    Ok(Err(e)) => {
                        got.1 += 1;
                        got.2.get_or_insert_with(|| e.to_string());
                    }
                    Err(_) => {
                        got.1 += 1;
                        got.2.get_or_insert_with(|| "no echo within 10 s".to_owned());
                    }
                }
            }
            anyhow::Ok(got)
        });
    }
    let mut opened = Opened {
        streams: Vec::with_capacity(count as usize),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    while let Some(done) = workers.join_next().await {
        let (streams, errors, first) = done??;
        opened.streams.extend(streams);
        opened.errors += errors;
        if opened.first_error.is_none() {
            opened.first_error = first;
        }
    }
    opened.elapsed = started.elapsed();
    Ok(opened)
}

// ---------------------------------------------------------------------------------------------
// The run

/// One level's figures.
struct Row {
    held: u64,
    rss: (u64, u64),
    maps: (usize, usize),
    per_conn_kib: f64,
    rate: f64,
    errors: u64,
}

/// One proxy's run.
struct Run {
    label: &'static str,
    idle: (u64, u64),
    idle_maps: (usize, usize),
    rows: Vec<Row>,
    first_error: Option<String>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A step's connections and its setup rate.
struct Step {
    opened: Opened,
    rate: f64,
}

/// Opens `want` connections. The rate is timed over the last `--rate-window` of them, in
/// [`RATE_BATCHES`] batches, as the median batch's: a batch takes a tenth of a second, so one
/// stall of either process (or of this machine) would otherwise decide the figure.
async fn step(ns: &Netns, dst: SocketAddr, want: u64, opts: &Opts) -> Result<Step> {
    let window = want.min(opts.rate_window);
    let mut all = open(ns, dst, want - window, opts.concurrency).await?;
    let mut rates = Vec::new();
    for batch in 0..RATE_BATCHES {
        let count = window * (batch + 1) / RATE_BATCHES - window * batch / RATE_BATCHES;
        let mut opened = open(ns, dst, count, opts.concurrency).await?;
        rates.push(opened.streams.len() as f64 / opened.elapsed.as_secs_f64().max(1e-9));
        all.streams.append(&mut opened.streams);
        all.errors += opened.errors;
        all.first_error = all.first_error.or(opened.first_error);
    }
    rates.sort_by(f64::total_cmp);
    let rate = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    Ok(Step { opened: all, rate })
}

/// Steps `pair` through `levels`, holding every connection opened.
async fn run(label: &'static str, bed: &Bed, pair: &Pair<'_>, levels: &[u64], opts: &Opts) -> Result<Run> {
    let dst = SocketAddr::new(bed.ip(2), PORT);
    // Warm-up: certificates fetched, the HBONE connection up; then the idle baseline.
    let warm = open(&bed.a, dst, opts.warm, opts.concurrency).await?;
    if warm.streams.is_empty() {
        bail!(
            "{label}: no connection through the proxies: {}",
            warm.first_error.unwrap_or_default()
        );
    }
    drop(warm);
    tokio::time::sleep(Duration::from_secs(1)).await;
    if !opts.pause.is_zero() {
        let (c, s) = pair.pids()?;
        println!(
            "  {label:>5}: client ztunnel pid {c}, server ztunnel pid {s}; pausing {:?}",
            opts.pause
        );
        tokio::time::sleep(opts.pause).await;
    }
    let idle = pair.rss()?;
    // The first connections after start set up at about half speed (one-time costs of the
    // kernel and both processes). Opened and closed after the baseline, they are out of the
    // first level's rate, and their freed memory is what that level's connections reuse.
    // Its failures count as the first level's.
    let ramp = open(&bed.a, dst, opts.ramp, opts.concurrency).await?;
    let mut run = Run {
        label,
        idle,
        idle_maps: pair.mappings()?,
        rows: Vec::new(),
        first_error: ramp.first_error,
    };
    let mut held: Vec<TcpStream> = Vec::new();
    let mut errors = ramp.errors;
    drop(ramp.streams);
    for &level in levels {
        let want = level.saturating_sub(held.len() as u64);
        let mut step = step(&bed.a, dst, want, opts).await?;
        held.append(&mut step.opened.streams);
        errors += step.opened.errors;
        if run.first_error.is_none() {
            run.first_error = step.opened.first_error;
        }
        let rate = step.rate;
        // Let allocator and buffers settle before sampling.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = pair.rss()?;
        let grown = (rss.0 + rss.1).saturating_sub(idle.0 + idle.1);
        let row = Row {
            held: held.len() as u64,
            rss,
            maps: pair.mappings()?,
            per_conn_kib: grown as f64 / (held.len().max(1) as f64),
            rate,
            errors,
        };
        println!(
            "  {label:>5}: {:>6} held: RSS client {:.1} MiB, server {:.1} MiB, {:.2} KiB/connection (both), \
             setup {:.0}/s, errors {}, mappings {}/{}",
            row.held,
            mib(rss.0),
            mib(rss.1),
            row.per_conn_kib,
            row.rate,
            row.errors,
            row.maps.0,
            row.maps.1
        );
        run.rows.push(row);
    }
    Ok(run)
}

fn levels(opts: &Opts, limit: u64) -> Vec<u64> {
    let max = limit.saturating_sub(HEADROOM);
    let mut v: Vec<u64> = opts
        .levels
        .iter()
        .map(|l| match l {
            Level::Count(n) => (*n).min(max),
            Level::Max => max,
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn report(runs: &[Run], istio_note: Option<&str>, limit: u64) {
    println!("\n## connbench: idle keep-alive connections through two ztunnels (dedicated mode, HBONE)\n");
    if let Some(note) = istio_note {
        println!("note: {note}\n");
    }
    println!(
        "| proxy | connections | client RSS (MiB) | server RSS (MiB) | KiB per connection (both) | setup (conn/s) | errors | mappings (client/server) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        println!(
            "| {} | idle | {:.1} | {:.1} | | | | {}/{} |",
            r.label,
            mib(r.idle.0),
            mib(r.idle.1),
            r.idle_maps.0,
            r.idle_maps.1
        );
        for row in &r.rows {
            println!(
                "| {} | {} | {:.1} | {:.1} | {} | {:.0} | {} | {}/{} |",
                r.label,
                row.held,
                mib(row.rss.0),
                mib(row.rss.1),
                if row.errors == 0 {
                    format!("{:.2}", row.per_conn_kib)
                } else {
                    "- (errors)".to_owned()
                },
                row.rate,
                row.errors,
                row.maps.0,
                row.maps.1
            );
        }
    }
    println!();
    for r in runs {
        // A level some connections failed at says nothing about the cost of those held: the
        // figures come from the levels reached without an error.
        let clean: Vec<&Row> = r.rows.iter().filter(|x| x.errors == 0).collect();
        let Some(last) = clean.last() else {
            println!(
                "{}: no level reached without errors; first error: {}",
                r.label,
                r.first_error.as_deref().unwrap_or("none")
            );
            continue;
        };
        let at = mib(r.idle.0 + r.idle.1) + last.per_conn_kib * EXTRAPOLATE as f64 / 1024.0;
        let rates: Vec<f64> = clean.iter().map(|x| x.rate).collect();
        let (lo, hi) = rates
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        println!(
            "{}: at {} connections both ztunnels together would hold {:.0} MiB ({:.2} KiB each, measured at {}); \
             setup rate spread {:.0}% (min {:.0}/s, max {:.0}/s){}",
            r.label,
            EXTRAPOLATE,
            at,
            last.per_conn_kib,
            last.held,
            if hi > 0.0 { (hi - lo) / hi * 100.0 } else { 0.0 },
            lo,
            hi,
            r.first_error
                .as_ref()
                .map(|e| format!("; levels with errors left out, first error: {e}"))
                .unwrap_or_default()
        );
    }
    println!("descriptor limit (ulimit -Hn): {limit}; levels capped {HEADROOM} below it");
}

async fn bench(opts: &Opts, limit: u64) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("connbench creates network namespaces and must run as root");
    }
    let ztunnel = mesh_e2e::binary("ztunnel");
    if !ztunnel.is_file() {
        bail!(
            "ztunnel not found at {}; build it with the same profile: cargo build --release -p ztunnel",
            ztunnel.display()
        );
    }
    let levels = levels(opts, limit);
    let peer = if opts.istio { istio::peer()? } else { None };
    let istio_note = match (&peer, opts.istio) {
        (None, true) => Some(format!("Istio's ztunnel not found at {}: skipped", istio::PEER_PATH)),
        (None, false) => Some("--no-istio: Istio's ztunnel skipped".to_owned()),
        _ => None,
    };
    println!("connbench: levels {levels:?}, {} in flight", opts.concurrency);
    let exe = std::env::current_exe()?;
    let tmp = tempfile::Builder::new().prefix("connbench-").tempdir()?;
    let mut runs = Vec::new();

    // Ours. Declaration order is teardown order, reversed: connections (inside run), the
    // holding server, the proxies, then the pods.
    {
        let bed = Bed::try_new(NET).context("creating the pods")?;
        tune(&bed)?;
        // One client pod holds every connection: past the per-peer stream bound (1,024 by
        // default, a guard against a peer pinning send buffers) and the outbound listener's
        // bound per source (16,384), which Istio's ztunnel lacks.
        let unbounded = [
            "--max-streams-per-peer",
            "1000000",
            "--max-outbound-connections-per-source",
            "1000000",
            "--max-outbound-connections",
            "1000000",
        ];
        let pair = Pair::Ours(
            Ztunnel::start(&bed.a, &bed.files(), &unbounded).await?,
            Ztunnel::start(&bed.b, &bed.files(), &unbounded).await?,
        );
        let _server = hold_server(&bed.b, &exe, tmp.path().join("hold-ours.log")).await?;
        runs.push(run("ours", &bed, &pair, &levels, opts).await?);
    }
    if let Some(binary) = &peer {
        let bed = Bed::try_new(NET + 1).context("creating the pods for Istio's ztunnel")?;
        tune(&bed)?;
        let state = tmp.path().join("istio-state.yaml");
        std::fs::write(&state, istio_state(&bed))?;
        let pair = Pair::Istio(
            istio_ztunnel(&bed.a, binary, "default/client/client", &state).await?,
            istio_ztunnel(&bed.b, binary, "default/server/server", &state).await?,
        );
        let _server = hold_server(&bed.b, &exe, tmp.path().join("hold-istio.log")).await?;
        runs.push(run("istio", &bed, &pair, &levels, opts).await?);
    }
    report(&runs, istio_note.as_deref(), limit);
    Ok(())
}

/// Room for tens of thousands of connections from one client address.
fn tune(bed: &Bed) -> Result<()> {
    for ns in [&bed.a, &bed.b] {
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])?;
        ns.exec(&["sysctl", "-qw", "net.core.somaxconn=4096"])?;
    }
    Ok(())
}

async fn hold_server(ns: &Netns, exe: &Path, log: PathBuf) -> Result<Proc> {
    let exe = exe.display().to_string();
    let port = PORT.to_string();
    let mut p = Proc::spawn(ns, &[&exe, "--hold", &port], log, Duration::from_secs(3))?;
    wait_listening(ns, PORT, &mut p).await?;
    Ok(p)
}
