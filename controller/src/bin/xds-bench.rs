//! xds-bench: the controller at scale. Generates a manifest directory (by default 10,000 pods,
//! 1,000 services, 500 authorization policies; one EndpointSlice per Service listing the pods
//! its selector picks, as a cluster has, and 20 selector-less services whose hand-written
//! slices name pods, some in other namespaces, the probe pod among them; 100 ServiceEntries,
//! 20 of them selecting pods, and 20 WorkloadEntries), starts the real controller binary on
//! it, and connects many Delta ADS clients over TLS, each on its own HTTP/2 connection
//! accepting frames as large as our ztunnel's do (`--default-frames`: 16 KiB, as Istio's
//! ztunnel). Measures:
//!
//! - start-up: process start to `/ready` (reading, translating, encoding everything);
//! - full push: clients connecting at once until every one holds every resource;
//! - single change: one pod's IP rewritten in its file until every client has the update
//!   (includes the directory poll interval, `--poll-ms`, 20 ms by default);
//! - the controller's memory (VmRSS, VmHWM) after each phase;
//! - the full push's cost: the controller's CPU time (user + system) and the bytes it wrote
//!   (TLS records), per client, and the bench clients' own CPU time (they share the machine);
//! - what each grows with: start-up time and RSS per object (pods + services + policies),
//!   RSS per client after the push.
//!
//! With `--remote-pods N`, a remote cluster `r1` (its own manifest directory, given to the
//! controller with `--remote-manifests`) holds N pods and the same Services under the same
//! names with VIPs of its own, so every local Service merges with a remote one and each
//! local change goes through the multicluster layer; after the local changes, as many of the
//! remote cluster's probe pod are timed the same way.
//!
//! Clients count what they receive instead of keeping the names, so 1,000 clients of a
//! 100,000-pod world fit in the bench's own memory.
//!
//! ```text
//! cargo build --release -p controller
//! target/release/xds-bench [--pods N] [--services N] [--policies N] [--clients N] [--changes N] [--poll-ms N] [--remote-pods N] [--default-frames]
//! target/release/xds-bench --pods 100000 --services 10000 --policies 2000 --clients 1000 --changes 20
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_core::identity::cert::certs_from_pem;
use mesh_proto::discovery::DeltaDiscoveryRequest;
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use tokio::sync::mpsc;

struct Args {
    pods: usize,
    services: usize,
    policies: usize,
    clients: usize,
    changes: usize,
    /// The controller's manifest-directory poll interval: part of every change's latency
    /// here (a cluster's watch delivers a change without it).
    poll_ms: usize,
    /// Pods of the remote cluster `r1` (none: no remote cluster).
    remote_pods: usize,
    /// The largest HTTP/2 frame the clients accept: ours by default, HTTP/2's default
    /// (16 KiB, what Istio's ztunnel accepts) with `--default-frames`.
    max_frame: u32,
}

fn args() -> Result<Args> {
    let mut a = Args {
        pods: 10_000,
        services: 1_000,
        policies: 500,
        clients: 100,
        changes: 5,
        poll_ms: 20,
        remote_pods: 0,
        max_frame: mesh_core::grpc::MAX_FRAME_SIZE,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = |it: &mut dyn Iterator<Item = String>| -> Result<usize> {
            it.next().context("missing value")?.parse().context("not a number")
        };
        match flag.as_str() {
            "--pods" => a.pods = value(&mut it)?,
            "--services" => a.services = value(&mut it)?,
            "--policies" => a.policies = value(&mut it)?,
            "--clients" => a.clients = value(&mut it)?,
            "--changes" => a.changes = value(&mut it)?,
            "--poll-ms" => a.poll_ms = value(&mut it)?.max(1),
            "--remote-pods" => a.remote_pods = value(&mut it)?,
            "--default-frames" => a.max_frame = 16 * 1024,
            other => bail!(
                "unknown flag {other}; flags: --pods --services --policies --clients --changes --poll-ms --remote-pods \
                 --default-frames"
            ),
        }
    }
    Ok(a)
}

const NAMESPACES: usize = 20;

fn pod(i: usize, ip: &str) -> String {
    let ns = i % NAMESPACES;
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{ns}, labels: {{app: app-{app}}}, annotations: {{ambient.istio.io/redirection: enabled}}}}\nspec: {{nodeName: node-{node}, serviceAccountName: sa-{app}, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIP: {ip}}}\n---\n",
        app = i % 1000,
        node = i % 50,
    )
}

/// Pod `i`'s address: every pod its own (a duplicate IP is a problem the controller reports,
/// which a real cluster does not have).
fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
}

/// The address pod 0 moves to in change `round`, outside every other pod's range.
fn probe_ip(round: usize) -> String {
    format!("10.99.{}.{}", (round / 256) % 256, round % 256)
}

/// The remote cluster's probe pod (its `pod-0`), rewritten by the remote changes.
fn remote_probe_ip(round: usize) -> String {
    format!("10.95.{}.{}", (round / 256) % 256, round % 256)
}

/// Names of the probe pods, local and remote, as clients see them.
const PROBES: [&str; 2] = ["Kubernetes//Pod/ns-0/pod-0", "r1//Pod/ns-0/pod-0"];

/// Pods per manifest file: few files, so the controller's directory poll (every 20 ms here,
/// a stat per file) costs little beside the push being measured.
const PODS_PER_FILE: usize = 1000;

/// Writes the world into `dir`: one file per [`PODS_PER_FILE`] pods, services and policies
/// in their own.
fn generate(dir: &Path, a: &Args) -> Result<()> {
    let mut text: String = (0..NAMESPACES)
        .map(|n| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n"))
        .collect();
    for s in 0..a.services {
        let ns = s % NAMESPACES;
        text.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\nspec: {{clusterIP: 10.96.{}.{}, selector: {{app: app-{s}}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n---\n",
            s / 256,
            s % 256
        ));
    }
    std::fs::write(dir.join("services.yaml"), text)?;
    write_slices(dir, a)?;
    write_entries(dir)?;
    let mut text = String::new();
    for p in 0..a.policies {
        let ns = p % NAMESPACES;
        text.push_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{p}, namespace: ns-{ns}}}\nspec:\n  selector: {{matchLabels: {{app: app-{app}}}}}\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/ns-{ns}/sa/sa-{p}], namespaces: [ns-{other}]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]\n---\n",
            app = p % 1000,
            other = (p + 1) % NAMESPACES
        ));
    }
    std::fs::write(dir.join("policies.yaml"), text)?;
    // Pod 0 lives alone in probe.yaml: the single change rewrites it.
    for chunk in 0..a.pods.div_ceil(PODS_PER_FILE) {
        let text: String = (chunk * PODS_PER_FILE..((chunk + 1) * PODS_PER_FILE).min(a.pods))
            .filter(|i| *i != 0)
            .map(|i| pod(i, &pod_ip(i)))
            .collect();
        std::fs::write(dir.join(format!("pods-{chunk:04}.yaml")), text)?;
    }
    std::fs::write(dir.join("probe.yaml"), pod(0, &pod_ip(0)))?;
    Ok(())
}

/// The remote cluster's directory: the local namespaces, every Service again (VIPs 10.97.x.y;
/// their selectors pick the remote pods), and `a.remote_pods` pods on addresses 10.200.x.y
/// and up, none of them a local one's.
fn generate_remote(dir: &Path, a: &Args) -> Result<()> {
    let mut text: String = (0..NAMESPACES)
        .map(|n| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n"))
        .collect();
    for s in 0..a.services {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\nspec: {{clusterIP: 10.97.{}.{}, selector: {{app: app-{s}}}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n---\n",
            s / 256,
            s % 256,
            ns = s % NAMESPACES
        ));
    }
    std::fs::write(dir.join("services.yaml"), text)?;
    for chunk in 0..a.remote_pods.div_ceil(PODS_PER_FILE) {
        let text: String = (chunk * PODS_PER_FILE..((chunk + 1) * PODS_PER_FILE).min(a.remote_pods))
            .filter(|&i| i > 0)
            .map(|i| pod(i, &format!("10.{}.{}.{}", 200 + i / 65536, (i / 256) % 256, i % 256)))
            .collect();
        std::fs::write(dir.join(format!("pods-{chunk:04}.yaml")), text)?;
    }
    // Its pod 0 on its own, as the remote changes' probe, at an address no round uses.
    std::fs::write(dir.join("probe.yaml"), pod(0, &remote_probe_ip(usize::MAX)))?;
    Ok(())
}

/// Endpoints per EndpointSlice, as Kubernetes' EndpointSlice controller caps them by default
/// (`--max-endpoints-per-slice`): a service with more pods would get several slices; at the
/// bench's sizes (at most 100 pods per app) one each suffices.
const ENDPOINTS_PER_SLICE: usize = 100;

/// Selector-less services (`ext-N`, their EndpointSlices written by hand, as for databases
/// outside the cluster or a hand-run controller): each names [`EXT_PODS`] pods.
const EXT_SERVICES: usize = 20;
const EXT_PODS: usize = 5;

/// The namespace of selector-less service `e`: `ext-0` and `ext-1` both in ns-0, beside the
/// probe pod, the others spread.
fn ext_namespace(e: usize) -> usize {
    if e < 2 {
        0
    } else {
        e % NAMESPACES
    }
}

/// The pods selector-less service `e` has endpoints on, in its own namespace (a slice naming
/// another namespace's pod is refused, as Kubernetes never writes one): `ext-0` and `ext-1`
/// name the probe pod (pod 0, in ns-0), so every change lists them.
fn ext_pods(e: usize, pods: usize) -> impl Iterator<Item = usize> {
    let (ns, per_ns) = (ext_namespace(e), (pods / NAMESPACES).max(1));
    let first = if e < 2 { 0 } else { e * 37 };
    (0..EXT_PODS).map(move |j| (ns + NAMESPACES * ((first + j * 7919) % per_ns)) % pods.max(1))
}

/// One EndpointSlice line's endpoint: the pod's original address and a targetRef.
fn endpoint(i: usize) -> String {
    format!(
        "{{addresses: [{}], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: pod-{i}, namespace: ns-{}}}}}",
        pod_ip(i),
        i % NAMESPACES
    )
}

fn slice(ns: usize, service: &str, endpoints: Vec<String>) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-abcde, namespace: ns-{ns}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n---\n",
        endpoints.join(", ")
    )
}

/// Slices per manifest file: a file of 100-endpoint slices is ~13 KB per slice, and the
/// controller skips a document over 16 MiB.
const SLICES_PER_FILE: usize = 500;

/// What a cluster's EndpointSlice controller would hold: one slice per Service, listing the
/// pods its selector picks (pods `i` with `i % 1000 == s`, at most [`ENDPOINTS_PER_SLICE`]);
/// then the selector-less services and their hand-written slices.
fn write_slices(dir: &Path, a: &Args) -> Result<()> {
    for chunk in 0..a.services.div_ceil(SLICES_PER_FILE) {
        let mut text = String::new();
        for s in chunk * SLICES_PER_FILE..((chunk + 1) * SLICES_PER_FILE).min(a.services) {
            let endpoints = (s..a.pods).step_by(1000).take(ENDPOINTS_PER_SLICE).map(endpoint);
            text.push_str(&slice(s % NAMESPACES, &format!("svc-{s}"), endpoints.collect()));
        }
        std::fs::write(dir.join(format!("slices-{chunk:04}.yaml")), text)?;
    }
    let mut text = String::new();
    for e in 0..EXT_SERVICES {
        let ns = ext_namespace(e);
        text.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: ext-{e}, namespace: ns-{ns}}}\nspec: {{clusterIP: 10.97.0.{}, ports: [{{name: http, port: 80}}]}}\n---\n",
            e + 1
        ));
        text.push_str(&slice(
            ns,
            &format!("ext-{e}"),
            ext_pods(e, a.pods).map(endpoint).collect(),
        ));
    }
    Ok(std::fs::write(dir.join("external.yaml"), text)?)
}

/// ServiceEntries, as most clusters have some: external hosts reached by name (auto-allocated
/// VIPs), and the last [`SELECTING_ENTRIES`] mesh-internal with a `workloadSelector` picking
/// app `e` (pod 0, the one the bench changes, among them).
const SERVICE_ENTRIES: usize = 100;
const SELECTING_ENTRIES: usize = 20;
/// WorkloadEntries (VMs), each picked by a Service's and an entry's selector.
const WORKLOAD_ENTRIES: usize = 20;

fn write_entries(dir: &Path) -> Result<()> {
    let mut text = String::new();
    for e in 0..SERVICE_ENTRIES {
        let ns = e % NAMESPACES;
        let external = SERVICE_ENTRIES - SELECTING_ENTRIES;
        let spec = if e < external {
            format!("hosts: [api-{e}.example.com], location: MESH_EXTERNAL, resolution: DNS, ports: [{{number: 443, name: https, protocol: HTTPS}}]")
        } else {
            format!(
                "hosts: [mesh-{e}.internal], location: MESH_INTERNAL, resolution: STATIC, ports: [{{number: 80, name: http, protocol: HTTP}}], workloadSelector: {{labels: {{app: app-{}}}}}",
                e - external
            )
        };
        text.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: entry-{e}, namespace: ns-{ns}}}\nspec: {{{spec}}}\n---\n"
        ));
    }
    for w in 0..WORKLOAD_ENTRIES {
        text.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm-{w}, namespace: ns-{}}}\nspec: {{address: 10.98.0.{}, labels: {{app: app-{w}}}, serviceAccount: vm}}\n---\n",
            w % NAMESPACES,
            w + 1
        ));
    }
    Ok(std::fs::write(dir.join("entries.yaml"), text)?)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    Duration::from_millis(ticks * 1000 / hz)
}

/// Waits until `pid` is idle (under 10 % of a core over 250 ms), at most `within`; returns
/// how long that took.
async fn settle(pid: u32, within: Duration) -> Duration {
    let start = Instant::now();
    let step = Duration::from_millis(250);
    let mut before = cpu_time(pid);
    while start.elapsed() < within {
        tokio::time::sleep(step).await;
        let now = cpu_time(pid);
        // Idle: under 10 % of a core. The manifest directory's poll alone (a stat per file
        // every `--poll-ms`) takes ~6 % at 100k pods, so a lower bar was met only by chance.
        if now.saturating_sub(before) < step / 10 {
            break;
        }
        before = now;
    }
    start.elapsed()
}

/// A counter of `/proc/<pid>/io` so far (0 when unreadable): `wchar` is the bytes written
/// through system calls (sockets included), `syscw` the write calls.
fn io_counter(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn ready(admin: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", admin)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await?;
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf).await;
            if buf.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("controller not ready within {within:?}")
}

/// What clients report to the bench.
enum Event {
    /// A client holds the full state.
    Complete(Instant),
    /// Client `id` received an update of probe pod `PROBES[probe]`: (id, probe, when).
    Probe(usize, usize, Instant),
    /// A client's stream ended with this error.
    Failed(String),
}

const DELTA: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// What a bench client reads of a `DeltaDiscoveryResponse`: resources are counted and
/// skipped, the first few of a response kept undecoded (shared slices of the received bytes)
/// for their names to be read once the client holds everything, so a thousand clients on the
/// controller's machine cost it little CPU. A change reaches a pod and the services it
/// touches, so a few are not enough: a remote pod's name sorts after its services'.
#[derive(Debug, Default)]
struct LiteResponse {
    count: usize,
    kept: Vec<bytes::Bytes>,
    type_url: String,
    nonce: String,
}

/// Resources kept per response.
const KEPT: usize = 64;

impl LiteResponse {
    /// Which probe pod (its index in [`PROBES`]) one of the kept resources is, if any.
    fn probe(&self) -> Option<usize> {
        use prost::Message;
        self.kept
            .iter()
            .filter_map(|r| LiteResource::decode(r.clone()).ok())
            .find_map(|r| PROBES.iter().position(|p| *p == r.name))
    }
}

impl prost::Message for LiteResponse {
    fn encode_raw(&self, _: &mut impl bytes::BufMut) {}

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        use prost::encoding::{decode_varint, skip_field, string, WireType};
        match tag {
            2 if wire_type == WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(buf)?).unwrap_or(usize::MAX);
                if len > buf.remaining() {
                    return Err(prost::DecodeError::new("buffer underflow"));
                }
                self.count += 1;
                if self.kept.len() < KEPT {
                    self.kept.push(buf.copy_to_bytes(len));
                } else {
                    buf.advance(len);
                }
                Ok(())
            }
            4 => string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => string::merge(wire_type, &mut self.nonce, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = LiteResponse::default();
    }
}

/// The name of an `envoy.service.discovery.v3.Resource`.
#[derive(Clone, PartialEq, prost::Message)]
struct LiteResource {
    #[prost(string, tag = "3")]
    name: String,
}

async fn client(
    id: usize,
    dial: (mesh_core::grpc::Dial, u32),
    expect: (usize, usize),
    events: mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let channel = dial.0.connect_stream(dial.1).await?;
    let mut ads = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(16);
    for type_url in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        tx.send(DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            ..Default::default()
        })
        .await?;
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut request = tonic::Request::new(stream);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", bench_token()).parse()?);
    ads.ready().await?;
    let codec = tonic::codec::ProstCodec::<DeltaDiscoveryRequest, LiteResponse>::default();
    let mut responses = ads.streaming(request, DELTA.parse()?, codec).await?.into_inner();
    // Counts, not names: the initial push sends each resource once.
    let (mut addresses, mut policies) = (0usize, 0usize);
    let mut complete = false;
    while let Some(r) = responses.message().await? {
        let now = Instant::now();
        let target = if r.type_url == ADDRESS_TYPE_URL {
            &mut addresses
        } else {
            &mut policies
        };
        if let Some(probe) = r.probe().filter(|_| complete) {
            let _ = events.send(Event::Probe(id, probe, now));
        }
        *target += r.count;
        if !complete && addresses >= expect.0 && policies >= expect.1 {
            complete = true;
            let _ = events.send(Event::Complete(now));
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// The bench's bootstrap token: random, made once per run.
fn bench_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        controller::ca::random_token().unwrap_or_else(|_| {
            eprintln!("xds-bench: the system random number generator failed");
            std::process::exit(1)
        })
    })
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let at = ((v.len().max(1) - 1) as f64 * p).round() as usize;
    v.get(at).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let work = tempfile::tempdir()?;
    let manifests = work.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    generate(&manifests, &a)?;
    if a.remote_pods > 0 {
        let remote = work.path().join("remote");
        std::fs::create_dir_all(&remote)?;
        generate_remote(&remote, &a)?;
    }
    let started = start(work.path(), &a).await?;
    let pid = started.proc.0.id();
    let (push, mut events) = push(work.path(), started.port, pid, &a).await?;
    let mut single = changes((&manifests, probe_ip, 0), &mut events, &a).await?;
    let mut remote = if a.remote_pods > 0 {
        changes((&work.path().join("remote"), remote_probe_ip, 1), &mut events, &a).await?
    } else {
        Vec::new()
    };
    let end = Figures {
        startup: started.startup,
        settled: started.settled,
        rss_ready: started.rss_ready,
        push,
        single_max: *single.iter().max().unwrap_or(&Duration::ZERO),
        single_p50: percentile(&mut single, 0.5),
        single_p99: percentile(&mut single, 0.99),
        remote_p50: percentile(&mut remote, 0.5),
        remote_p99: percentile(&mut remote, 0.99),
        hwm: status_kib(pid, "VmHWM:"),
        rss_end: status_kib(pid, "VmRSS:"),
    };
    drop(started);
    report(&a, &end);
    Ok(())
}

/// The controller running on the generated directory, ready and settled.
struct Started {
    proc: Proc,
    port: u16,
    startup: Duration,
    settled: Duration,
    rss_ready: u64,
}

/// Writes the bench clients' bootstrap token (the controller refuses a token file others may
/// read).
fn write_token(path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(
        file,
        "- {{token: {}, identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel, node: node-0}}",
        bench_token()
    )?;
    Ok(())
}

/// Starts the controller next to this binary on `work`'s manifests; returns once it is ready
/// and the work it does after (the translator's spare copy of its outputs) is finished, so
/// the push's CPU and memory are its own.
async fn start(work: &Path, a: &Args) -> Result<Started> {
    write_token(&work.join("tokens.yaml"))?;
    let controller: PathBuf = std::env::current_exe()?.with_file_name("controller");
    let (port, admin) = (free_port()?, free_port()?);
    let started = Instant::now();
    let child = std::process::Command::new(&controller)
        .arg("--manifest-dir")
        .arg(work.join("manifests"))
        .arg("--bootstrap-tokens")
        .arg(work.join("tokens.yaml"))
        .arg("--ca-dir")
        .arg(work.join("ca"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .args(["--poll-ms", &a.poll_ms.to_string()])
        .args(if a.remote_pods > 0 {
            vec![
                "--remote-manifests".to_owned(),
                format!("r1={}", work.join("remote").display()),
            ]
        } else {
            vec![]
        })
        // The controller's own log (LOG=info shows translation times) goes to stderr.
        .arg("--log")
        .arg(std::env::var("LOG").unwrap_or_else(|_| "warn".to_owned()))
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (build it with the same profile)", controller.display()))?;
    let proc = Proc(child);
    let pid = proc.0.id();
    ready(admin, Duration::from_secs(120)).await?;
    let startup = started.elapsed();
    let settled = settle(pid, Duration::from_secs(60)).await;
    Ok(Started {
        proc,
        port,
        startup,
        settled,
        rss_ready: status_kib(pid, "VmRSS:"),
    })
}

/// The full push: what it took and cost.
struct Push {
    p50: Duration,
    last: Duration,
    rss: u64,
    cpu: Duration,
    own_cpu: Duration,
    bytes: u64,
    writes: u64,
}

/// Connects every client at once and waits until each holds the full state; returns the
/// clients' event stream for the changes that follow.
async fn push(work: &Path, port: u16, pid: u32, a: &Args) -> Result<(Push, mpsc::UnboundedReceiver<Event>)> {
    let roots = certs_from_pem(&std::fs::read_to_string(work.join("ca/trust-bundle.pem"))?)?;
    let identity = "spiffe://cluster.local/ns/istio-system/sa/mesh-controller".parse()?;
    let tls = mesh_core::tls::control_plane_client_config(&roots, vec![identity])?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Entries add a service per host, a workload per external host (resolved by name) and
    // per WorkloadEntry.
    let entries = SERVICE_ENTRIES + (SERVICE_ENTRIES - SELECTING_ENTRIES) + WORKLOAD_ENTRIES;
    let expect = (a.pods + a.services + EXT_SERVICES + entries, a.policies);
    let push_start = Instant::now();
    let (cpu_before, own_cpu_before) = (cpu_time(pid), cpu_time(std::process::id()));
    let (written_before, writes_before) = (io_counter(pid, "wchar"), io_counter(pid, "syscw"));
    for id in 0..a.clients {
        let dial = mesh_core::grpc::endpoint(&format!("https://127.0.0.1:{port}"), Some(tls.clone()))?;
        let dial = (dial, a.max_frame);
        let events = events_tx.clone();
        tokio::spawn(async move {
            // Errors after the run are the controller being stopped: nobody listens then.
            if let Err(e) = client(id, dial, expect, events.clone()).await {
                let _ = events.send(Event::Failed(format!("{e:#}")));
            }
        });
    }
    let mut full = Vec::with_capacity(a.clients);
    let mut failed = Vec::new();
    // Clients of a big world complete together near the end of the push, which grows with
    // their number (about 0.4 s per client at 100k pods): the wait does too.
    let patience = Duration::from_secs(120).max(Duration::from_secs(a.clients as u64));
    while full.len() + failed.len() < a.clients {
        match tokio::time::timeout(patience, events.recv()).await {
            Ok(Some(Event::Complete(at))) => full.push(at - push_start),
            Ok(Some(Event::Failed(e))) => failed.push(e),
            Ok(Some(Event::Probe(..))) => {}
            _ => bail!(
                "only {} of {} clients received the full state within {patience:?} of the previous one",
                full.len(),
                a.clients
            ),
        }
    }
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} clients failed before the full state; first: {first}",
            failed.len(),
            a.clients
        );
    }
    let push = Push {
        last: *full.iter().max().unwrap_or(&Duration::ZERO),
        p50: percentile(&mut full, 0.5),
        rss: status_kib(pid, "VmRSS:"),
        cpu: cpu_time(pid).saturating_sub(cpu_before),
        own_cpu: cpu_time(std::process::id()).saturating_sub(own_cpu_before),
        bytes: io_counter(pid, "wchar").saturating_sub(written_before),
        writes: io_counter(pid, "syscw").saturating_sub(writes_before),
    };
    Ok((push, events))
}

/// Rewrites the probe pod `PROBES[probe]` (in `manifests`, at addresses `ip(round)`)
/// `a.changes` times; each time, how long until every client had it. Reports of the other
/// probe, or from before the rewrite, are not this change's.
async fn changes(
    (manifests, ip, probe): (&Path, fn(usize) -> String, usize),
    events: &mut mpsc::UnboundedReceiver<Event>,
    a: &Args,
) -> Result<Vec<Duration>> {
    let mut single = Vec::new();
    for round in 0..a.changes {
        let tmp = manifests.join("probe.tmp");
        std::fs::write(&tmp, pod(0, &ip(round)))?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, manifests.join("probe.yaml"))?;
        let mut seen = HashSet::new();
        let mut last = t0;
        while seen.len() < a.clients {
            match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
                Ok(Some(Event::Probe(id, which, at))) => {
                    if which == probe && at >= t0 && seen.insert(id) {
                        last = last.max(at);
                    }
                }
                Ok(Some(Event::Complete(_) | Event::Failed(_))) => {}
                _ => bail!("change {round}: only {} of {} clients got it", seen.len(), a.clients),
            }
        }
        single.push(last - t0);
    }
    Ok(single)
}

/// Everything the report prints.
struct Figures {
    startup: Duration,
    settled: Duration,
    rss_ready: u64,
    push: Push,
    single_p50: Duration,
    single_p99: Duration,
    single_max: Duration,
    /// One remote pod change (zero without a remote cluster).
    remote_p50: Duration,
    remote_p99: Duration,
    hwm: u64,
    rss_end: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints the table: each figure beside its goal, then what each object and each client
/// costs, so growth shows between runs of different sizes.
fn report(a: &Args, f: &Figures) {
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    println!(
        "| inputs | {} pods, {} services (+{EXT_SERVICES} selector-less), {} EndpointSlices, {} policies, \
         {SERVICE_ENTRIES} ServiceEntries, {WORKLOAD_ENTRIES} WorkloadEntries, {} clients; \
         remote cluster: {} pods, {} services | |",
        a.pods,
        a.services,
        a.services + EXT_SERVICES,
        a.policies,
        a.clients,
        a.remote_pods,
        if a.remote_pods > 0 { a.services } else { 0 }
    );
    println!(
        "| start-up to ready (read + translate + encode) | {:.0} ms | < 10 s (100k pods) |",
        ms(f.startup)
    );
    println!(
        "| full push to all clients (p50 / last) | {:.0} / {:.0} ms | < 15 s (100k pods, 1,000 clients) |",
        ms(f.push.p50),
        ms(f.push.last)
    );
    println!(
        "| single pod change to all clients (p50 / p99 / max of {}; includes up to {} ms of directory poll) | {:.0} / {:.0} / {:.0} ms | < 100 ms |",
        a.changes,
        a.poll_ms,
        ms(f.single_p50),
        ms(f.single_p99),
        ms(f.single_max)
    );
    if a.remote_pods > 0 {
        println!(
            "| single remote pod change to all clients (p50 / p99 of {}) | {:.0} / {:.0} ms | < 100 ms |",
            a.changes,
            ms(f.remote_p50),
            ms(f.remote_p99)
        );
    }
    println!(
        "| ready to idle (work after ready, before the push) | {:.0} ms | |",
        ms(f.settled)
    );
    println!(
        "| controller RSS idle before the push / after push / end | {} / {} / {} | < 1.5 GiB |",
        mib(f.rss_ready),
        mib(f.push.rss),
        mib(f.rss_end)
    );
    println!("| controller peak RSS (VmHWM) | {} | |", mib(f.hwm));
    let objects = (a.pods + a.services + a.policies).max(1) as f64;
    let clients = a.clients.max(1) as f64;
    println!("| start-up per object | {:.1} µs | |", ms(f.startup) * 1e3 / objects);
    println!(
        "| RSS per object at ready | {:.2} KiB | |",
        f.rss_ready as f64 / objects
    );
    println!(
        "| RSS per client after the push | {:.1} KiB | |",
        f.push.rss.saturating_sub(f.rss_ready) as f64 / clients
    );
    report_push_costs(a, f);
}

/// The full push's cost per client: time, CPU on both sides, bytes and write calls.
fn report_push_costs(a: &Args, f: &Figures) {
    let clients = a.clients.max(1) as f64;
    println!(
        "| full push per client (last / clients) | {:.2} ms | |",
        ms(f.push.last) / clients
    );
    println!(
        "| full push: controller CPU (user + system) / per client | {:.1} s / {:.1} ms | |",
        f.push.cpu.as_secs_f64(),
        ms(f.push.cpu) / clients
    );
    println!(
        "| full push: bench clients' CPU / per client | {:.1} s / {:.1} ms | |",
        f.push.own_cpu.as_secs_f64(),
        ms(f.push.own_cpu) / clients
    );
    println!(
        "| full push: bytes written by the controller per client (TLS) / write calls per client | {:.1} MB / {:.0} | |",
        f.push.bytes as f64 / 1e6 / clients,
        f.push.writes as f64 / clients
    );
}
