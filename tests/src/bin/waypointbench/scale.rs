//! `waypointbench --scale N`: what the waypoint holds per client connection and per request in
//! flight, and that N concurrent keep-alive clients hold.
//!
//! One captured client pod opens keep-alive connections to a service behind a waypoint, each
//! proven by one answered request and kept open, up to 1,000 and then N: over HTTP/1.1 through
//! one waypoint, over HTTP/2 (prior knowledge) through a second. Through a third, R requests
//! are held in flight by the backend (`/delay/`), one per connection. Each waypoint is fresh
//! for its phase, so no phase reuses memory another freed. A figure is the waypoint's RSS
//! growth over its RSS before the phase (after one warm-up request), divided by what it holds.
//! With R, a fourth waypoint gets R connections that each send a request head just under the
//! waypoint's limit and never finish it: the most one client connection can make it hold
//! without an answer (a head over the limit is checked to get 431).
//!
//! Every connection comes from one client identity, so the waypoints run with
//! `--max-streams-per-peer` above N: the default, 1,024, is the bound one client workload
//! meets (beyond it streams are refused and counted in `waypoint_rejected_requests_total`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::{stream, StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_e2e::apps::{named_server, served};
use mesh_e2e::bench::{raise_nofile, rss_kib};
use mesh_e2e::cluster::{Cluster, Pod, PodSpec};
use mesh_e2e::waypoint::{gateway, identity, Waypoint, AMBIENT_SHOP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ID: u8 = 204;
/// Descriptors kept free under the limit (listeners, logs, the runtime's own).
const HEADROOM: u64 = 300;
/// Connections being opened at once.
const CONCURRENCY: usize = 64;
/// The backend's HTTP/1.1 ([`named_server`]) and HTTP/2 ([`h2_server`]) ports.
const H1_PORT: u16 = 8080;
const H2_PORT: u16 = 8081;

/// The phases: which waypoint (and service) each uses.
const PHASES: [(&str, u8); 4] = [("wp-h1", 11), ("wp-h2", 12), ("wp-req", 13), ("wp-head", 14)];
/// The request head the waypoint accepts (`waypoint::http::server::MAX_HEAD`).
const MAX_HEAD: usize = 64 * 1024;

pub struct Opts {
    pub connections: usize,
    pub in_flight: usize,
}

fn vip(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, ID, n).into()
}

/// Namespace `shop` (ambient) with one waypoint Gateway and one service per phase.
fn world() -> String {
    let mut w = AMBIENT_SHOP.to_owned();
    for (name, n) in PHASES {
        w += &gateway(ID, name, n + 40);
        // The port's declared protocol decides what the waypoint speaks upstream.
        let (port, port_name) = if name == "wp-h2" {
            (H2_PORT, "http2")
        } else {
            (H1_PORT, "http")
        };
        w += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: via-{name}, namespace: shop, labels: {{istio.io/use-waypoint: {name}}}}}\n\
             spec: {{clusterIP: 10.96.{ID}.{n}, selector: {{app: server}}, ports: [{{name: {port_name}, port: 80, targetPort: {port}}}]}}\n---\n",
        );
    }
    w
}

/// One row of the report.
struct Row {
    what: String,
    count: usize,
    rss_kib: u64,
    base_kib: u64,
}

impl Row {
    fn per_kib(&self) -> f64 {
        (self.rss_kib.saturating_sub(self.base_kib)) as f64 / self.count.max(1) as f64
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Http1,
    Http2,
}

/// A client connection kept open by its sender (dropping it closes the connection).
struct Held {
    http1: Option<http1::SendRequest<Empty<Bytes>>>,
    _http2: Option<http2::SendRequest<Empty<Bytes>>>,
}

/// A GET of `path`: HTTP/2 names the host in the URI (`:authority`), HTTP/1.1 in `Host`.
fn get(host: &str, path: &str, http2: bool) -> Result<http::Request<Empty<Bytes>>> {
    let req = if http2 {
        http::Request::get(format!("http://{host}{path}"))
    } else {
        http::Request::get(path).header("host", host)
    };
    Ok(req.body(Empty::new())?)
}

/// Opens a connection to `target` and proves it with one answered request.
async fn open(client: &Pod, target: SocketAddr, host: &str, proto: Proto) -> Result<Held> {
    let io = TokioIo::new(client.ns.connect(target).await?);
    let (held, status) = match proto {
        Proto::Http1 => {
            let (mut s, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            let resp = s.send_request(get(host, "/", false)?).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            let held = Held {
                http1: Some(s),
                _http2: None,
            };
            (held, status)
        }
        Proto::Http2 => {
            let (mut s, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| anyhow::anyhow!("HTTP/2 handshake: {e:?}"))?;
            tokio::spawn(conn);
            let resp = s
                .send_request(get(host, "/", true)?)
                .await
                .map_err(|e| anyhow::anyhow!("HTTP/2 request: {e:?}"))?;
            let status = resp.status();
            resp.into_body().collect().await?;
            let held = Held {
                http1: None,
                _http2: Some(s),
            };
            (held, status)
        }
    };
    if status != 200 {
        bail!("status {status} from {target}");
    }
    Ok(held)
}

/// Opens `count` more connections into `held`.
async fn open_many(
    client: &Pod,
    target: SocketAddr,
    host: &str,
    proto: Proto,
    count: usize,
    held: &mut Vec<Held>,
) -> Result<()> {
    let more: Vec<Held> = stream::iter(0..count)
        .map(|_| open(client, target, host, proto))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
        .with_context(|| format!("opening connection {} of {count}", held.len() + 1))?;
    held.extend(more);
    Ok(())
}

/// Connections held through `waypoint` at each level.
async fn connections(
    client: &Pod,
    waypoint: &Waypoint,
    (name, n): (&str, u8),
    proto: Proto,
    levels: &[usize],
) -> Result<Vec<Row>> {
    let target = SocketAddr::new(vip(n), 80);
    let host = format!("via-{name}.shop");
    let pid = waypoint.pid() as i32;
    drop(
        open(client, target, &host, proto)
            .await
            .map_err(|e| anyhow::anyhow!("warm-up: {e:?}"))?,
    );
    let base_kib = rss_kib(pid)?;
    let label = if proto == Proto::Http1 { "HTTP/1.1" } else { "HTTP/2" };
    let mut held = Vec::new();
    let mut rows = Vec::new();
    for &level in levels {
        let started = Instant::now();
        open_many(client, target, &host, proto, level - held.len(), &mut held).await?;
        eprintln!(
            "waypointbench: {label}: {level} connections held ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        rows.push(Row {
            what: format!("{label} keep-alive connections"),
            count: level,
            rss_kib: rss_kib(pid)?,
            base_kib,
        });
    }
    Ok(rows)
}

/// `count` requests held in flight by the backend, one per connection.
async fn in_flight(client: &Pod, waypoint: &Waypoint, (name, n): (&str, u8), count: usize) -> Result<Row> {
    let target = SocketAddr::new(vip(n), 80);
    let host = format!("via-{name}.shop");
    let pid = waypoint.pid() as i32;
    let mut held = Vec::new();
    open_many(client, target, &host, Proto::Http1, count, &mut held).await?;
    let base_kib = rss_kib(pid)?;
    let before = served("server");
    let mut pending = Vec::new();
    for s in held.iter_mut().filter_map(|h| h.http1.as_mut()) {
        pending.push(tokio::spawn(s.send_request(get(&host, "/delay/60000", false)?)));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while served("server") < before + count {
        if Instant::now() > deadline {
            bail!("{} of {count} requests reached the backend", served("server") - before);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = Row {
        what: "HTTP/1.1 requests in flight (one per connection)".into(),
        count,
        rss_kib: rss_kib(pid)?,
        base_kib,
    };
    for p in pending {
        p.abort();
    }
    Ok(row)
}

/// A request head of `len` bytes, the blank line that ends it left off.
fn unfinished_head(host: &str, len: usize) -> Vec<u8> {
    let mut head = format!("GET / HTTP/1.1\r\nhost: {host}\r\nx-filler: ").into_bytes();
    head.resize(len, b'x');
    head
}

/// `count` connections that each send a request head 1 KiB under the limit and never finish
/// it: the most a client can make the waypoint hold per connection without an answer. One
/// more that goes over the limit must be answered 431.
async fn unfinished_heads(client: &Pod, waypoint: &Waypoint, (name, n): (&str, u8), count: usize) -> Result<Row> {
    let target = SocketAddr::new(vip(n), 80);
    let host = format!("via-{name}.shop");
    let pid = waypoint.pid() as i32;
    drop(open(client, target, &host, Proto::Http1).await?);
    let base_kib = rss_kib(pid)?;
    let head = unfinished_head(&host, MAX_HEAD - 1024);
    let held: Vec<tokio::net::TcpStream> = stream::iter(0..count)
        .map(|_| async {
            let mut c = client.ns.connect(target).await?;
            c.write_all(&head).await?;
            anyhow::Ok(c)
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    // Nothing signals that the waypoint has read them: wait for its RSS to settle.
    let (mut last, deadline) = (0, Instant::now() + Duration::from_secs(30));
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib(pid)?;
        if now.abs_diff(last) * 100 <= now || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let row = Row {
        what: format!("HTTP/1.1 unfinished request heads of {} KiB", head.len() / 1024),
        count: held.len(),
        rss_kib: rss_kib(pid)?,
        base_kib,
    };
    let mut over = client.ns.connect(target).await?;
    over.write_all(&unfinished_head(&host, MAX_HEAD + 1024)).await?;
    let mut answer = vec![0; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), over.read(&mut answer)).await??;
    let status = String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if !status.contains(" 431 ") {
        bail!("a request head over {MAX_HEAD} bytes was answered {status:?}, not 431");
    }
    Ok(row)
}

pub async fn run(o: Opts) -> Result<()> {
    let limit = raise_nofile()?;
    // Every client connection is a descriptor here and in the client's ztunnel.
    if o.connections as u64 + HEADROOM > limit || o.in_flight as u64 * 2 + HEADROOM > limit {
        bail!(
            "--scale {} / --in-flight {} need more descriptors than the limit, {limit}",
            o.connections,
            o.in_flight
        );
    }
    let ids: Vec<String> = PHASES.iter().map(|(name, _)| identity("shop", name)).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let cluster = Cluster::start_with_identities(ID, 2, &world(), &ids).await?;
    let server = cluster.add_pod(1, PodSpec::new("server", "shop", &[("app", "server")]))?;
    tokio::spawn(named_server(
        server.ns.listen(SocketAddr::new(server.ip, H1_PORT))?,
        "server",
    ));
    tokio::spawn(h2_server(server.ns.listen(SocketAddr::new(server.ip, H2_PORT))?));
    let client = cluster.add_pod(0, PodSpec::new("client", "shop", &[]))?;
    let streams = (o.connections.max(o.in_flight) + 1000).to_string();
    let flags = ["--max-streams-per-peer", streams.as_str()];
    let mut waypoints = Vec::new();
    for (name, _) in PHASES {
        waypoints.push(Waypoint::start_with(&cluster, 1, "shop", name, &flags).await?);
    }
    for p in [&server, &client] {
        cluster.wait_workload(p, true, Duration::from_secs(15)).await?;
    }
    let levels: Vec<usize> = [1000.min(o.connections), o.connections]
        .into_iter()
        .filter(|l| *l > 0)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut rows = connections(&client, &waypoints[0], PHASES[0], Proto::Http1, &levels).await?;
    rows.extend(connections(&client, &waypoints[1], PHASES[1], Proto::Http2, &levels).await?);
    if o.in_flight > 0 {
        rows.push(in_flight(&client, &waypoints[2], PHASES[2], o.in_flight).await?);
        rows.push(unfinished_heads(&client, &waypoints[3], PHASES[3], o.in_flight).await?);
    }
    report(&rows);
    Ok(())
}

/// An HTTP/2 (prior knowledge) server answering 200 to everything.
async fn h2_server(listener: tokio::net::TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tcp), svc),
        );
    }
}

fn report(rows: &[Row]) {
    println!("\n| waypoint holds | count | RSS before (MiB) | RSS (MiB) | KiB each | at 100,000 (MiB) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.0} |",
            r.what,
            r.count,
            r.base_kib as f64 / 1024.0,
            r.rss_kib as f64 / 1024.0,
            r.per_kib(),
            r.per_kib() * 100_000.0 / 1024.0,
        );
    }
}
