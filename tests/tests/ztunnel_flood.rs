//! Floods against the real ztunnel process in network namespaces (root), for the bounds on
//! what an HBONE peer can hold (issue 10, "Resources a peer can hold"): thousands of idle
//! sockets on 15008 that never start TLS, and streams reset shortly after they were opened
//! (the rapid-reset variant that used to leave one application connection per reset). Each
//! test prints what it measured (run with `--nocapture`) and checks that an unrelated request
//! through the mesh keeps working meanwhile.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Method, Request};
use mesh_core::identity::{CertManager, CertManagerConfig, DevCa, Identity};
use mesh_core::tls;
use mesh_e2e::apps::{echo_connect, echo_server};
use mesh_e2e::netns::{enter, socket_in};
use mesh_e2e::{Bed, Netns, Ztunnel};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

const CLIENT_SA: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_SA: &str = "spiffe://cluster.local/ns/default/sa/server";
const ECHO_PORT: u16 = 9000;
/// The port whose SYNs b's namespace drops: a connect to it hangs in SYN-SENT.
const HANGING_PORT: u16 = 9002;

/// The value of ztunnel_connections_refused_total{reason=`reason`}, or 0.
fn refused(metrics: &str, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    mesh_e2e::metrics::sample(metrics, "ztunnel_connections_refused_total", &[&label])
}

/// Resident memory of process `pid` in KiB (VmRSS), or 0 once it is gone.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Polls `f` every 20 ms until it holds; false when `within` passed first.
async fn poll_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !f() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Samples the RSS of `pid` every 20 ms into a running maximum until `stop` is set.
fn watch_peak(pid: u32, stop: Arc<AtomicBool>) -> Arc<AtomicU64> {
    let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
    let p = peak.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            p.fetch_max(rss_kib(pid), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    peak
}

/// `n` unconnected sockets in namespace `ns` bound to source address `src`.
fn sockets_from(ns: &str, src: IpAddr, n: usize) -> std::io::Result<Vec<TcpSocket>> {
    let std = enter(ns, || {
        (0..n)
            .map(|_| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                s.set_nonblocking(true)?;
                s.bind(&SocketAddr::new(src, 0).into())?;
                Ok(std::net::TcpStream::from(s))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    Ok(std.into_iter().map(TcpSocket::from_std_stream).collect())
}

/// Opens `per_source[i]` connections from each source address to `dst` concurrently, sends
/// nothing, and returns those that connected.
async fn idle_flood(ns: &str, dst: SocketAddr, sources: &[(IpAddr, usize)]) -> Vec<TcpStream> {
    let mut sockets = Vec::new();
    for (src, n) in sources {
        sockets.extend(sockets_from(ns, *src, *n).expect("flood sockets"));
    }
    let connects = sockets
        .into_iter()
        .map(|s| tokio::time::timeout(Duration::from_secs(5), s.connect(dst)));
    join_all(connects)
        .await
        .into_iter()
        .filter_map(|r| r.ok().and_then(Result::ok))
        .collect()
}

/// Lines `ss` prints in namespace `ns` for `filter` (header omitted).
fn ss(ns: &Netns, args: &[&str]) -> Vec<String> {
    let mut full = vec!["ss", "-Htn"];
    full.extend_from_slice(args);
    ns.exec(&full)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Connections queued on b's HBONE listeners that ztunnel has not accepted yet.
fn accept_backlog(ns: &Netns) -> u64 {
    ss(ns, &["-l", "( sport = :15008 )"])
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|q| q.parse::<u64>().ok()))
        .sum()
}

/// Fresh connections from pod a to b's echo app through both ztunnels; the time from connect
/// until the app's first line arrived, sorted, in milliseconds.
async fn round_trips(bed: &Bed, count: usize) -> Vec<f64> {
    let dst = SocketAddr::new(bed.ip(2), ECHO_PORT);
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        let (peer, _conn) = echo_connect(&bed.a, dst)
            .await
            .unwrap_or_else(|e| panic!("request {i} through the mesh failed: {e}"));
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(peer, format!("peer={}", bed.ip(1)));
    }
    times.sort_by(f64::total_cmp);
    times
}

/// Times `count` fresh connections from namespace `ns` to the echo app at `dst` (connect until
/// the app's first line arrived, sorted, in ms) on a thread with its own runtime, so the
/// test's polling (which runs `ss`) cannot delay them.
fn latency_probe(ns: String, dst: SocketAddr, count: usize) -> std::thread::JoinHandle<std::io::Result<Vec<f64>>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut times = Vec::with_capacity(count);
            for _ in 0..count {
                let socket = socket_in(&ns, dst)?;
                let started = Instant::now();
                let mut conn = BufReader::new(socket.connect(dst).await?);
                let mut line = String::new();
                tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut line))
                    .await
                    .map_err(std::io::Error::other)??;
                if !line.starts_with("peer=") {
                    return Err(std::io::Error::other(format!("the app did not answer: {line:?}")));
                }
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            times.sort_by(f64::total_cmp);
            Ok(times)
        })
    })
}

/// The result of a [`latency_probe`], awaited without blocking the test's runtime.
async fn probe_result(probe: std::thread::JoinHandle<std::io::Result<Vec<f64>>>) -> Vec<f64> {
    tokio::task::spawn_blocking(move || probe.join())
        .await
        .expect("join the probe")
        .expect("the probe thread")
        .expect("every request through the mesh succeeds")
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_flood_is_cheap_and_others_keep_working() {
    let Some(bed) = Bed::new(90) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.expect("ztunnel a");
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.expect("ztunnel b");
    let pid = zb.pid().expect("ztunnel b runs");
    let app = SocketAddr::new(bed.ip(2), ECHO_PORT);
    tokio::spawn(echo_server(bed.b.listen(app).expect("echo listener")));
    // Warm up: certificates issued, a's pooled HBONE connection to b is up.
    round_trips(&bed, 20).await;
    let idle = rss_kib(pid);

    // Pod c floods b:15008 from its own address (over the per-source cap of 256) and from
    // 11 more addresses (under it), ~3000 sockets in all, below the total cap of 4096.
    let mut sources = vec![(bed.ip(3), 300)];
    for i in 0..11u8 {
        let ip = IpAddr::from([10, 77, bed.n, 100 + i]);
        bed.c
            .exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])
            .expect("extra address on c");
        sources.push((ip, 250));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let peak = watch_peak(pid, stop.clone());
    let started = Instant::now();
    let flood = idle_flood(&bed.c.name, SocketAddr::new(bed.ip(2), 15008), &sources).await;
    assert!(
        poll_until(Duration::from_secs(5), || accept_backlog(&bed.b) == 0).await,
        "ztunnel b did not accept the flood"
    );
    let opened = flood.len();
    let held = ss(&bed.b, &["state", "established", "( sport = :15008 )"]).len();
    let times = probe_result(latency_probe(bed.a.name.clone(), app, 200)).await;
    let during = started.elapsed();
    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
    let metrics = zb.metrics().await.expect("metrics");

    drop(flood);
    stop.store(true, Ordering::Relaxed);
    let peak = peak.load(Ordering::Relaxed);
    let closed = Instant::now();
    // Memory counts once ztunnel has let go of the flood's sockets (a's pooled one stays).
    let released = poll_until(Duration::from_secs(15), || {
        ss(
            &bed.b,
            &["state", "established", "state", "close-wait", "( sport = :15008 )"],
        )
        .len()
            <= 1
    })
    .await;
    assert!(released, "ztunnel b still holds the flood's sockets");
    let recovered = poll_until(Duration::from_secs(30), || rss_kib(pid) <= 2 * idle).await;
    let after = rss_kib(pid);
    let (p50, p99, max) = (quantile(&times, 0.5), quantile(&times, 0.99), quantile(&times, 1.0));
    println!(
        "idle flood: {opened} sockets connected from c ({} sources), {held} held open by ztunnel b \
         during the requests ({:.1} s after the flood began)",
        sources.len(),
        during.as_secs_f64()
    );
    println!(
        "ztunnel b RSS: idle {:.1} MiB, peak {:.1} MiB (+{:.1} MiB, {:.2} KiB per held socket), \
         after {:.1} MiB ({:.1} s after close)",
        mib(idle),
        mib(peak),
        mib(peak - idle),
        (peak - idle) as f64 / held.max(1) as f64,
        mib(after),
        closed.elapsed().as_secs_f64()
    );
    println!("a -> b through the mesh during the flood, 200 fresh connections: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    println!(
        "refused: pending_per_source_limit {}, pending_connections_limit {}",
        refused(&metrics, "pending_per_source_limit"),
        refused(&metrics, "pending_connections_limit")
    );

    assert!(held >= 2500, "the flood should hold ~3000 sockets, held {held}");
    assert!(during < Duration::from_secs(10), "measured past the handshake deadline");
    assert!(p99 < 50.0, "p99 {p99:.2} ms during the flood");
    assert!(
        peak - idle < 16 * 1024,
        "ztunnel b grew by {:.1} MiB for {held} idle sockets",
        mib(peak - idle)
    );
    assert!(refused(&metrics, "pending_per_source_limit") > 0.0, "{metrics}");
    assert!(
        recovered,
        "RSS {:.1} MiB 30 s after the flood (idle {:.1} MiB)",
        mib(after),
        mib(idle)
    );
}

/// An nft table in `ns` dropping SYNs to [`HANGING_PORT`], so connects to it hang in
/// SYN-SENT; deleted on drop (it would also vanish with the namespace).
struct HangingPort<'a>(&'a Netns);

impl<'a> HangingPort<'a> {
    fn install(ns: &'a Netns) -> anyhow::Result<Self> {
        ns.exec(&["nft", "add table inet flood"])?;
        let guard = HangingPort(ns);
        ns.exec(&[
            "nft",
            "add chain inet flood output { type filter hook output priority 0; }",
        ])?;
        let rule = format!("add rule inet flood output tcp dport {HANGING_PORT} tcp flags & (syn | ack) == syn drop");
        ns.exec(&["nft", &rule])?;
        Ok(guard)
    }
}

impl Drop for HangingPort<'_> {
    fn drop(&mut self) {
        let _ = self.0.exec(&["nft", "delete table inet flood"]);
    }
}

type H2Sender = h2::client::SendRequest<Bytes>;

/// HTTP/2 over mutual TLS from pod c to b's HBONE port as `identity` (signed by the bed's
/// CA); the connection task runs in the background and returns how the connection ended.
async fn h2_from_c(bed: &Bed, identity: &str) -> (H2Sender, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tls = tls_from_c(bed, identity).await;
    let (sender, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    (sender, tokio::spawn(conn))
}

/// Mutual TLS from pod c to b's HBONE port as `identity` (signed by the bed's CA).
async fn tls_from_c(bed: &Bed, identity: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let ca = DevCa::load(&bed.root_cert, &bed.root_key).expect("bed CA");
    let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
    let identity: Identity = identity.parse().expect("identity");
    let cert = certs.fetch(&identity).await.expect("client certificate");
    let config = tls::client_config(&cert, vec![SERVER_SA.parse().expect("identity")]).expect("TLS config");
    let dst = SocketAddr::new(bed.ip(2), 15008);
    let tcp = socket_in(&bed.c.name, dst)
        .expect("socket in c")
        .connect(dst)
        .await
        .expect("connect to b:15008");
    tokio_rustls::TlsConnector::from(config)
        .connect(tls::placeholder_server_name(), tcp)
        .await
        .expect("mTLS with ztunnel b")
}

/// Opens a CONNECT stream to `authority`; None once the connection refuses new streams.
async fn open(sender: &H2Sender, authority: SocketAddr) -> Option<h2::SendStream<Bytes>> {
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .expect("request");
    let mut ready = sender.clone().ready().await.ok()?;
    ready.send_request(request, false).ok().map(|(_, send)| send)
}

/// ztunnel's app connections in `ns` hanging in SYN-SENT towards [`HANGING_PORT`].
fn syn_sent(ns: &Netns) -> usize {
    ss(ns, &["state", "syn-sent", &format!("( dport = :{HANGING_PORT} )")]).len()
}

/// Opens `n` streams to the hanging port, waits until ztunnel started the app connection of
/// each, then resets them all and waits until those connections are gone. How many streams
/// opened (fewer once the connection refuses new ones).
async fn open_then_reset(sender: &H2Sender, ns: &Netns, authority: SocketAddr, n: usize) -> usize {
    let mut streams = Vec::new();
    for _ in 0..n {
        match open(sender, authority).await {
            Some(s) => streams.push(s),
            None => break,
        }
    }
    let opened = streams.len();
    let started = poll_until(Duration::from_secs(2), || syn_sent(ns) == opened).await;
    assert!(started, "{} of {opened} app connections started", syn_sent(ns));
    for mut s in streams {
        s.send_reset(h2::Reason::CANCEL);
    }
    let cancelled = poll_until(Duration::from_secs(2), || syn_sent(ns) == 0).await;
    assert!(cancelled, "{} app connections left after the resets", syn_sent(ns));
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_before_the_app_answers_open_no_app_connections() {
    let Some(bed) = Bed::new(91) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.expect("ztunnel a");
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.expect("ztunnel b");
    let pid = zb.pid().expect("ztunnel b runs");
    let app = SocketAddr::new(bed.ip(2), ECHO_PORT);
    tokio::spawn(echo_server(bed.b.listen(app).expect("echo listener")));
    let _rule = HangingPort::install(&bed.b).expect("nft rule in b");
    let hanging = SocketAddr::new(bed.ip(2), HANGING_PORT);
    round_trips(&bed, 5).await;
    let idle = rss_kib(pid);
    let (sender, conn) = h2_from_c(&bed, CLIENT_SA).await;

    // One stream: ztunnel's app connection hangs in SYN-SENT until the client resets.
    let mut one = open(&sender, hanging).await.expect("stream");
    assert!(
        poll_until(Duration::from_secs(5), || syn_sent(&bed.b) == 1).await,
        "the app connection should hang in SYN-SENT"
    );
    one.send_reset(h2::Reason::CANCEL);
    assert!(
        poll_until(Duration::from_secs(2), || syn_sent(&bed.b) == 0).await,
        "the reset did not cancel the app connection"
    );

    // 50 streams, reset 50 ms after opening: every app connection was started, none stays.
    let streams = 50;
    let mut held = Vec::new();
    for _ in 0..streams {
        held.push(open(&sender, hanging).await.expect("stream"));
    }
    let started = poll_until(Duration::from_secs(2), || syn_sent(&bed.b) == streams).await;
    let pending = syn_sent(&bed.b);
    for mut s in held {
        s.send_reset(h2::Reason::CANCEL);
    }
    let reset_at = Instant::now();
    let cancelled = poll_until(Duration::from_secs(2), || syn_sent(&bed.b) == 0).await;
    let gone_after = reset_at.elapsed();
    let metrics = zb.metrics().await.expect("metrics");
    let abandoned = refused(&metrics, "reset_before_connect");
    println!(
        "reset before answer: {pending} app connects in SYN-SENT while {streams} streams were held, \
         {} left {:.0} ms after the resets; reset_before_connect {abandoned}",
        syn_sent(&bed.b),
        gone_after.as_secs_f64() * 1000.0
    );
    assert!(started, "only {pending} of {streams} app connections started");
    assert!(cancelled, "{} app connections left after the resets", syn_sent(&bed.b));
    assert_eq!(abandoned, (streams + 1) as f64, "{metrics}");
    assert!(!conn.is_finished(), "51 resets are under the limit of 100 per 10 s");

    reset_flood_gets_goaway(&bed, hanging).await;
    let metrics = zb.metrics().await.expect("metrics");
    println!(
        "ztunnel b RSS: idle {:.1} MiB, after the resets {:.1} MiB; reset_flood {}, reset_before_connect {}",
        mib(idle),
        mib(rss_kib(pid)),
        refused(&metrics, "reset_flood"),
        refused(&metrics, "reset_before_connect")
    );
    assert!(refused(&metrics, "reset_flood") >= 1.0, "{metrics}");
    assert!(
        poll_until(Duration::from_secs(2), || syn_sent(&bed.b) == 0).await,
        "{} app connections left after the reset flood",
        syn_sent(&bed.b)
    );
}

/// A second connection resets 100 streams in batches of 25, each batch once ztunnel started
/// its app connections, while pod a keeps making requests through the mesh: the connection
/// survives 100 resets, and the 101st gets GOAWAY ENHANCE_YOUR_CALM. The client writes
/// nothing after it, so it reads the GOAWAY rather than a broken pipe.
async fn reset_flood_gets_goaway(bed: &Bed, hanging: SocketAddr) {
    let (sender, conn) = h2_from_c(bed, CLIENT_SA).await;
    let flood = async {
        let mut sent = 0;
        for _ in 0..4 {
            sent += open_then_reset(&sender, &bed.b, hanging, 25).await;
        }
        let alive = !conn.is_finished();
        sent += open_then_reset(&sender, &bed.b, hanging, 1).await;
        (sent, alive)
    };
    let app = SocketAddr::new(bed.ip(2), ECHO_PORT);
    let probe = latency_probe(bed.a.name.clone(), app, 200);
    let (sent, alive_at_100) = flood.await;
    let times = probe_result(probe).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("ztunnel closes the flooding connection")
        .expect("connection task");
    let reason = ended.as_ref().err().and_then(h2::Error::reason);
    println!(
        "reset flood: {sent} streams reset after their app connect started; the connection ended with \
         {reason:?}; a -> b meanwhile (200 requests): p50 {:.2} ms, p99 {:.2} ms",
        quantile(&times, 0.5),
        quantile(&times, 0.99)
    );
    assert_eq!(sent, 101);
    assert!(alive_at_100, "100 resets are within the limit");
    // ztunnel sends GOAWAY(ENHANCE_YOUR_CALM) and closes; under load the client's next write
    // can meet the closed socket (EPIPE) before it reads the GOAWAY. Either way the flooding
    // connection was ended by ztunnel, never left open.
    let closed_by_peer = ended.as_ref().err().is_some_and(h2::Error::is_io);
    assert!(
        reason == Some(h2::Reason::ENHANCE_YOUR_CALM) || closed_by_peer,
        "{ended:?}"
    );
}

/// Out of file descriptors: ztunnel b's limit is lowered while it runs, and a flood fills it.
/// Every `accept` then fails at once; the loop must back off (little CPU, a handful of log
/// lines instead of millions), keep its local addresses, and serve again once sockets close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_backs_off_and_recovers() {
    let Some(bed) = Bed::new(92) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.expect("ztunnel a");
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.expect("ztunnel b");
    let pid = zb.pid().expect("ztunnel b runs");
    let app = SocketAddr::new(bed.ip(2), ECHO_PORT);
    tokio::spawn(echo_server(bed.b.listen(app).expect("echo listener")));
    round_trips(&bed, 5).await;

    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir").count();
    let limit = (open_fds + 40).to_string();
    mesh_e2e::netns::sh(&[
        "prlimit",
        "--pid",
        &pid.to_string(),
        &format!("--nofile={limit}:{limit}"),
    ])
    .expect("lower ztunnel b's descriptor limit");
    let flood = idle_flood(&bed.c.name, SocketAddr::new(bed.ip(2), 15008), &[(bed.ip(3), 200)]).await;
    // The kernel completes handshakes into the backlog; ztunnel can take only ~40 of them.
    let ticks = mesh_e2e::bench::cpu_ticks(pid as i32).expect("cpu ticks");
    let logs_before = zb.logs().matches("accept failed").count();
    tokio::time::sleep(Duration::from_secs(3)).await; // measuring a span of time, not waiting for an event
    let cpu = (mesh_e2e::bench::cpu_ticks(pid as i32).expect("cpu ticks") - ticks) as f64 / 100.0;
    let lines = zb.logs().matches("accept failed").count() - logs_before;
    let refused = refused(&zb.metrics().await.expect("metrics"), "accept_error");
    println!(
        "descriptor exhaustion: {} flood sockets, {refused} failed accepts in all, {lines} log lines \
         and {cpu:.2} s of CPU in 3 s",
        flood.len()
    );
    assert!(refused > 0.0, "the flood should exhaust ztunnel b's descriptors");
    assert!(cpu < 0.6, "ztunnel b spun on accept: {cpu:.2} s of CPU in 3 s");
    assert!(lines <= 2, "accept failures flooded the log: {lines} lines in 3 s");

    // Once the flood goes, ztunnel serves again with its addresses intact.
    drop(flood);
    let recovered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Ok((peer, _))) = tokio::time::timeout(Duration::from_secs(2), echo_connect(&bed.a, app)).await {
                return peer;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("ztunnel b serves again after the flood");
    assert_eq!(recovered, format!("peer={}", bed.ip(1)));
}

/// A transport that stops reading for good once `stalled` is set: a peer that opens streams,
/// advertises large windows and then never reads what it is sent.
struct Stalling<T> {
    inner: T,
    stalled: Arc<AtomicBool>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Stalling<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stalled.load(Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Stalling<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An app that writes 1 MiB to every connection and holds it open; counts connections.
async fn firehose(listener: tokio::net::TcpListener, accepted: Arc<AtomicU64>) {
    while let Ok((mut s, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(&vec![0u8; 1 << 20]).await;
            std::future::pending::<()>().await;
        });
    }
}

/// Peers that never read: 3 connections x 200 streams to an app that sends 1 MiB on each.
/// What ztunnel holds is bounded per stream (one read chunk and h2's send buffer), and an
/// unrelated request through the mesh keeps its latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_hold_a_bounded_amount() {
    let Some(bed) = Bed::new(93) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.expect("ztunnel a");
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.expect("ztunnel b");
    let pid = zb.pid().expect("ztunnel b runs");
    let echo = SocketAddr::new(bed.ip(2), ECHO_PORT);
    tokio::spawn(echo_server(bed.b.listen(echo).expect("echo listener")));
    let hose = SocketAddr::new(bed.ip(2), 9003);
    let accepted = Arc::new(AtomicU64::new(0));
    tokio::spawn(firehose(
        bed.b.listen(hose).expect("firehose listener"),
        accepted.clone(),
    ));
    round_trips(&bed, 5).await;
    let idle = rss_kib(pid);

    const CONNECTIONS: usize = 3;
    const STREAMS: usize = 200;
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let stalled = Arc::new(AtomicBool::new(false));
        let io = Stalling {
            inner: tls_from_c(&bed, CLIENT_SA).await,
            stalled: stalled.clone(),
        };
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(8 << 20)
            .initial_connection_window_size(1 << 30)
            .handshake::<_, Bytes>(io)
            .await
            .expect("HTTP/2 handshake");
        let conn = tokio::spawn(conn);
        // One answered stream: settings and windows are exchanged; then stop reading.
        let mut ready = sender.clone().ready().await.expect("ready");
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(hose.to_string())
            .body(())
            .expect("request");
        let (first, send) = ready.send_request(request, false).expect("first stream");
        let _ = tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .expect("first answer");
        stalled.store(true, Ordering::Relaxed);
        let mut streams = vec![send];
        for _ in 1..STREAMS {
            streams.push(open(&sender, hose).await.expect("stream opens"));
        }
        held.push((sender, conn, streams));
    }
    let total = (CONNECTIONS * STREAMS) as u64;
    assert!(
        poll_until(Duration::from_secs(20), || accepted.load(Ordering::Relaxed) >= total).await,
        "the app got {} of {total} connections",
        accepted.load(Ordering::Relaxed)
    );
    // Let ztunnel read what it may and fill what the stalled peers will not take.
    let mut last = 0;
    let settled = poll_until(Duration::from_secs(15), || {
        let now = rss_kib(pid);
        let stable = now.abs_diff(last) < 256;
        last = now;
        stable
    })
    .await;
    let times = probe_result(latency_probe(bed.a.name.clone(), echo, 100)).await;
    let peak = rss_kib(pid);
    let per_stream = (peak.saturating_sub(idle)) as f64 / total as f64;
    println!(
        "stalled readers: {total} streams whose peer never reads, each sent 1 MiB: ztunnel b RSS idle {:.1} MiB, \
         held {:.1} MiB (+{per_stream:.0} KiB per stream, settled: {settled}); a->b p50 {:.2} ms p99 {:.2} ms",
        mib(idle),
        mib(peak),
        quantile(&times, 0.5),
        quantile(&times, 0.99)
    );
    // h2 queues at most 256 KiB per stream, plus one 128 KiB read chunk waiting for capacity.
    assert!(
        per_stream <= 400.0,
        "ztunnel holds {per_stream:.0} KiB per stalled stream"
    );
    // Other clients are still served promptly: a ztunnel blocked behind the stalled streams
    // would take seconds (or time out). The p99 bound leaves room for a loaded 2-core machine
    // (55 ms seen once in CI beside other builds); the median shows the normal case.
    assert!(quantile(&times, 0.5) < 10.0, "p50 {:.1} ms", quantile(&times, 0.5));
    assert!(quantile(&times, 0.99) < 250.0, "p99 {:.1} ms", quantile(&times, 0.99));
    drop(held);
}
