//! The Delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`). Each
//! stream keeps, per type, what the client subscribed to and which version of each resource
//! it has; every new [`Snapshot`] is diffed against that and only differences are sent.
//! A NACK is logged and counted; the rejected version is not re-sent (the client keeps its
//! last good state) until the resource changes again. Callers authenticate with the same
//! bearer tokens as the CA.
//!
//! Addresses can be subscribed to by name, as Istio's ztunnel does with `XDS_ON_DEMAND`
//! (its first request subscribes to `*` and unsubscribes it at once, then it asks for a
//! workload or VIP by `network/IP`, or a service by `namespace/hostname`, on first use). A
//! name resolves to the addresses it matches ([`Snapshot::resolve_address`]: a service brings
//! the workloads behind it), which are sent under their own names with the asked-for name
//! among their `aliases`, sent again even if the client holds them (the answer is what it
//! waits for), and followed from then on; the asked-for name itself, when it is no
//! resource's name, is listed in `removed_resources` of the same response (Istio's ztunnel
//! stops waiting on a resource name or a removal, not an alias). Resolutions are redone on
//! every snapshot; an on-demand client's own workload (node metadata `INSTANCE_IPS`) is
//! always included.
//!
//! What one stream can make the server hold is bounded: at most [`MAX_NAMES`] subscribed or
//! held names per type (more ends the stream with RESOURCE_EXHAUSTED), one queued response
//! plus the chunk being built, and a client that takes no response for [`SEND_TIMEOUT`] is
//! dropped so it cannot pin old snapshots. Warnings a client can trigger are rate-limited.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use mesh_core::log_limit::LogLimiter;
use mesh_proto::discovery::DeltaDiscoveryRequest;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::metrics::XdsMetrics;
use super::snapshot::{Entry, Snapshot, PRIVATE_TYPES, PUSH_ORDER, TYPES};
use super::wire::{AdsService, EncodedResponse, Resources};
use crate::ca::auth::{bearer_token, AuthError, Authenticator};

/// Resources per response: bounds the memory one slow client pins during a full push.
const CHUNK: usize = 500;
/// Names one stream may subscribe to or claim to hold, per type. A node proxy subscribing by
/// name asks for the workloads and services it talks to, far fewer than this.
pub const MAX_NAMES: usize = 100_000;
/// How long a response may wait for the client to take it before the stream is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) type ResponseStream = Pin<Box<dyn Stream<Item = Result<EncodedResponse, Status>> + Send>>;

/// The ADS service; clone per connection is cheap.
#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    auth: Arc<dyn Authenticator>,
    metrics: XdsMetrics,
    nonce: Arc<AtomicU64>,
    warnings: Arc<LogLimiter>,
    send_timeout: Duration,
}

impl AdsServer {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, auth: Arc<dyn Authenticator>, metrics: XdsMetrics) -> Self {
        AdsServer {
            snapshots,
            auth,
            metrics,
            nonce: Arc::new(AtomicU64::new(0)),
            warnings: Arc::new(LogLimiter::new(Duration::from_secs(10))),
            send_timeout: SEND_TIMEOUT,
        }
    }

    /// How long a response may wait for a client (default [`SEND_TIMEOUT`]).
    pub fn with_send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// The gRPC service (requests up to 16 MiB, responses up to 64 MiB).
    pub fn into_service(self) -> AdsService {
        AdsService::new(self)
    }
}

/// What one client holds of one type.
#[derive(Default)]
struct Subscription {
    wildcard: bool,
    /// The names the client subscribed to.
    names: HashSet<String>,
    /// Addresses those names resolve to (address type only), in the current snapshot.
    resolved: HashSet<Arc<str>>,
    /// Name -> version the client has (sent, whether it ACKed or NACKed it).
    has: Held,
}

/// The entries of one type in one generation, shared by the snapshot and its clients.
type TypeEntries = super::snapshot::Entries;

/// What one client holds of one type: a whole generation's entries (shared with the
/// snapshot, so a caught-up wildcard client costs no memory per name), plus the names where
/// it differs from them (by-name subscribers, private types and clients still catching up
/// keep everything here; names are shared with the snapshot entries).
#[derive(Default)]
struct Held {
    base: Option<(u64, TypeEntries)>,
    /// `Some(version)`: held at that version; `None`: not held although `base` has it.
    delta: HashMap<Arc<str>, Option<u64>>,
}

impl Held {
    fn from_versions(versions: impl Iterator<Item = (Arc<str>, u64)>) -> Self {
        Held {
            base: None,
            delta: versions.map(|(n, v)| (n, Some(v))).collect(),
        }
    }

    fn get(&self, name: &str) -> Option<u64> {
        match self.delta.get(name) {
            Some(v) => *v,
            None => self.base.as_ref().and_then(|(_, b)| b.get(name)).map(|e| e.version),
        }
    }

    /// Holds nothing (a new client, or one that said it holds nothing).
    fn is_empty(&self) -> bool {
        self.base.is_none() && self.delta.is_empty()
    }

    fn in_base(&self, name: &str) -> Option<u64> {
        self.base.as_ref().and_then(|(_, b)| b.get(name)).map(|e| e.version)
    }

    fn insert(&mut self, name: Arc<str>, version: u64) {
        if self.in_base(&name) == Some(version) {
            self.delta.remove(&name);
        } else {
            self.delta.insert(name, Some(version));
        }
    }

    fn remove(&mut self, name: &str) -> Option<u64> {
        let had = self.get(name);
        match self.base.as_ref().and_then(|(_, b)| b.get(name)) {
            Some(e) => drop(self.delta.insert(e.name.clone(), None)),
            None => drop(self.delta.remove(name)),
        }
        had
    }

    /// Every name held.
    fn names(&self) -> impl Iterator<Item = Arc<str>> + '_ {
        let base = self.base.iter().flat_map(|(_, b)| b.values());
        let from_base = base
            .filter(|e| !self.delta.contains_key(&*e.name))
            .map(|e| e.name.clone());
        let from_delta = self.delta.iter().filter(|(_, v)| v.is_some()).map(|(n, _)| n.clone());
        from_base.chain(from_delta)
    }

    /// The client now holds exactly `entries` of `generation`.
    fn rebase(&mut self, generation: u64, entries: TypeEntries) {
        self.base = Some((generation, entries));
        self.delta = HashMap::new();
    }

    /// After the changes of `generation` were pushed: a client that held exactly the
    /// generation before holds exactly this one.
    fn advance(&mut self, generation: u64, entries: &TypeEntries) {
        if self.base.as_ref().is_some_and(|(g, _)| *g + 1 == generation) {
            self.rebase(generation, entries.clone());
        }
    }
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name) || self.resolved.contains(name)
    }

    /// Re-resolves the subscribed names against `snapshot` (address type, by name only),
    /// with the client's own workloads (at `own_ips`) always included.
    fn resolve(&mut self, snapshot: &Snapshot, own_ips: &[IpAddr]) {
        if self.wildcard {
            self.resolved.clear();
            return;
        }
        let own = own_ips
            .iter()
            .filter_map(|ip| snapshot.workloads_at(ip))
            .flatten()
            .cloned();
        self.resolved = self
            .names
            .iter()
            .flat_map(|n| snapshot.resolve_address(n))
            .chain(own)
            .collect();
    }
}

/// At most this many addresses are taken from a client's `INSTANCE_IPS`.
const MAX_OWN_IPS: usize = 8;

/// Messages read from a client while a push to it runs, kept for after it: ACKs of the
/// push's own responses, mostly (~100 bytes each). Past this many, or once they hold
/// [`EARLY_MAX_BYTES`], the stream is not read until the push ends: a client cannot make the
/// server hold more than that plus one message (each at most the request size limit).
const EARLY_MAX: usize = 64;
const EARLY_MAX_BYTES: usize = 64 << 10;

/// What reading the client's stream gave.
type Inbound = Result<Option<DeltaDiscoveryRequest>, Status>;

/// Runs `push` while reading what the client sends meanwhile into `early` (bounded by
/// [`EARLY_MAX`] and [`EARLY_MAX_BYTES`]). A full push to a slow client can take minutes; hyper's HTTP/2 keep-alive
/// counts as a sign of life only what the service reads, so a client ACKing every response
/// but not read until the push ended got keep-alive PINGs queued behind megabytes of data,
/// and was dropped when their answer came later than the keep-alive timeout.
async fn reading_meanwhile<T, S>(
    push: impl std::future::Future<Output = T>,
    inbound: &mut S,
    early: &mut VecDeque<Inbound>,
) -> T
where
    S: Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Unpin,
{
    use futures_util::StreamExt;
    tokio::pin!(push);
    loop {
        let ended = matches!(early.back(), Some(Ok(None) | Err(_)));
        let room = early.len() < EARLY_MAX && held_bytes(early) < EARLY_MAX_BYTES;
        tokio::select! {
            biased;
            done = &mut push => return done,
            msg = inbound.next(), if room && !ended => early.push_back(msg.transpose()),
        }
    }
}

/// Reads a stream's first request and every one already arrived behind it, policy types
/// first ([`PUSH_ORDER`]): a client that subscribes to addresses before policies (Istio's
/// ztunnel) still gets its policies before the workloads they protect, when it sent both at
/// once, as it does. A later request is never moved ahead of an earlier one of its type.
async fn initial_batch<S>(inbound: &mut S, early: &mut VecDeque<Inbound>)
where
    S: Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Unpin,
{
    use futures_util::{FutureExt, StreamExt};
    early.push_back(inbound.next().await.transpose());
    while early.len() < EARLY_MAX && !matches!(early.back(), Some(Ok(None) | Err(_))) {
        match inbound.next().now_or_never() {
            Some(msg) => early.push_back(msg.transpose()),
            None => break,
        }
    }
    let rank = |m: &Inbound| match m {
        Ok(Some(r)) => PUSH_ORDER
            .iter()
            .position(|t| *t == r.type_url)
            .unwrap_or(PUSH_ORDER.len()),
        // The stream's end stays last.
        _ => usize::MAX,
    };
    early.make_contiguous().sort_by_key(rank);
}

/// The encoded size of the requests held in `early`.
fn held_bytes(early: &VecDeque<Inbound>) -> usize {
    use prost::Message;
    early
        .iter()
        .map(|m| match m {
            Ok(Some(r)) => r.encoded_len(),
            _ => 0,
        })
        .sum()
}

/// One stream's state.
struct Session {
    peer: String,
    /// The client's own addresses (node metadata `INSTANCE_IPS`): an on-demand client gets
    /// its own workload without asking, as it needs it before its first connection.
    own_ips: Vec<IpAddr>,
    subs: HashMap<&'static str, Subscription>,
    generation: u64,
    tx: mpsc::Sender<Result<EncodedResponse, Status>>,
    metrics: XdsMetrics,
    nonce: Arc<AtomicU64>,
    warnings: Arc<LogLimiter>,
    send_timeout: Duration,
    /// `<ns>/<service account>` of the caller: the only ingress gateway resource it may
    /// receive (those carry the listeners' private keys).
    own_gateway: String,
}

/// Why a stream is ended by the server.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The client went away.
    Gone,
    /// The client took no response for the send timeout.
    Slow,
    /// The client asked for more than [`MAX_NAMES`] names of one type.
    TooManyNames(&'static str),
}

fn known_type(type_url: &str) -> Option<&'static str> {
    TYPES.iter().copied().find(|t| *t == type_url)
}

impl Session {
    /// Answers requests and follows snapshots until the stream ends, saying why.
    async fn serve(
        &mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> Ended {
        let mut early = VecDeque::new();
        initial_batch(&mut inbound, &mut early).await;
        loop {
            let step = match early.pop_front() {
                Some(msg) => self.on_request(msg, &mut snapshots, &mut inbound, &mut early).await,
                None => tokio::select! {
                    msg = inbound.message() => self.on_request(msg, &mut snapshots, &mut inbound, &mut early).await,
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            return Ended::Gone;
                        }
                        let snapshot = snapshots.borrow_and_update().clone();
                        reading_meanwhile(self.push_changes(&snapshot), &mut inbound, &mut early).await
                    }
                },
            };
            if let Err(ended) = step {
                return ended;
            }
        }
    }

    /// Handles one message read from the client: a subscription change or an ACK, answered
    /// with a push when it asks for resources.
    async fn on_request(
        &mut self,
        msg: Inbound,
        snapshots: &mut watch::Receiver<Arc<Snapshot>>,
        inbound: &mut Streaming<DeltaDiscoveryRequest>,
        early: &mut VecDeque<Inbound>,
    ) -> Result<(), Ended> {
        let req = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Ended::Gone),
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "xDS stream ended");
                return Err(Ended::Gone);
            }
        };
        self.note_node(&req);
        let Some((type_url, names, first)) = self.request(req)? else {
            return Ok(());
        };
        let snapshot = snapshots.borrow_and_update().clone();
        self.generation = snapshot.generation;
        if let Some(sub) = self.subs.get_mut(TYPES[0]) {
            sub.resolve(&snapshot, &self.own_ips);
        }
        let (names, unknown) = match names {
            Some(fresh) => self.resolve_fresh(&snapshot, type_url, fresh),
            None => (None, Vec::new()),
        };
        let push = self.push(&snapshot, type_url, names.as_ref(), first, unknown);
        reading_meanwhile(push, inbound, early).await
    }

    /// For names just subscribed to: on the address type, what they resolve to joins the
    /// subscription and is sent (again, if the client holds it: the answer is what an
    /// on-demand client waits for). Returns the names to push and the asked-for names that are
    /// not themselves resource names, to list as removed: Istio's ztunnel ends its wait for
    /// a name only when that name comes back as a resource or a removal (not as an alias),
    /// and it applies a response's resources before its removals, so it then holds what the
    /// name resolved to; a removal of a name that is no resource's drops nothing.
    fn resolve_fresh(
        &mut self,
        snapshot: &Snapshot,
        type_url: &'static str,
        fresh: BTreeSet<String>,
    ) -> (Option<BTreeSet<String>>, Vec<String>) {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return (Some(fresh), Vec::new());
        };
        if type_url != TYPES[0] || sub.wildcard {
            return (Some(fresh), Vec::new());
        }
        let mut push = BTreeSet::new();
        let mut answered = Vec::new();
        for name in fresh {
            let found = snapshot.resolve_address(&name);
            if !found.iter().any(|n| **n == *name) {
                answered.push(name);
            }
            for n in found {
                sub.has.remove(&n);
                push.insert(n.to_string());
                sub.resolved.insert(n);
            }
        }
        (Some(push), answered)
    }

    /// Names the client's node in this stream's log lines (once, bounded in length).
    fn note_node(&mut self, req: &DeltaDiscoveryRequest) {
        if let Some(node) = &req.node {
            if self.own_ips.is_empty() {
                self.own_ips = instance_ips(node);
            }
            let id: String = node.id.chars().take(128).collect();
            if !id.is_empty() && !self.peer.contains(&id) {
                self.peer = format!("{} node={id}", self.peer);
            }
        }
    }

    /// Sends what differs between the snapshot and what the client has, for `names` of
    /// `type_url` (all names when `None`). Fails when the client is gone or too slow.
    /// With `always`, a response goes out even when empty: the answer to a first subscription
    /// tells the client it holds the current state (ztunnel readiness waits for it).
    async fn push(
        &mut self,
        snapshot: &Snapshot,
        type_url: &'static str,
        names: Option<&BTreeSet<String>>,
        always: bool,
        unknown: Vec<String>,
    ) -> Result<(), Ended> {
        // Ingress gateways and waypoint credentials carry private keys: a client gets only
        // its own (named after its identity's namespace and service account, which for a
        // gateway is the gateway's name).
        let only = PRIVATE_TYPES.contains(&type_url).then(|| self.own_gateway.clone());
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let Some(current) = snapshot.types.get(type_url) else {
            return Ok(());
        };
        if names.is_none() && sub.wildcard && only.is_none() {
            // Everything: streamed from the snapshot (what differs from what the client
            // holds), after which it holds exactly this generation.
            let held = std::mem::take(&mut sub.has);
            if held.is_empty() {
                // A new client: the snapshot's framed chunks, the same bytes for all.
                let result = self.send_framed(snapshot, type_url, unknown, always).await;
                if let Some(sub) = self.subs.get_mut(type_url) {
                    sub.has.rebase(snapshot.generation, current.clone());
                }
                return result;
            }
            let gone = held.names().filter(|n| !current.contains_key(&**n));
            let removed: Vec<String> = gone.map(|n| n.to_string()).chain(unknown).collect();
            let stale = |e: &&Arc<Entry>| held.get(&e.name) != Some(e.version);
            let count = current.values().filter(stale).count();
            let sent = current.values().filter(stale);
            let result = self.send(snapshot, type_url, (sent, count), removed, always).await;
            if let Some(sub) = self.subs.get_mut(type_url) {
                sub.has.rebase(snapshot.generation, current.clone());
            }
            return result;
        }
        // Entries to send are collected as pointers; the per-client copies are made one
        // chunk at a time, so a full push pins at most a chunk per client.
        let mut send: Vec<Arc<Entry>> = Vec::new();
        let mut removed = Vec::new();
        let mut consider = |name: &str, sub: &mut Subscription| {
            if !sub.wants(name) || only.as_deref().is_some_and(|own| own != name) {
                return;
            }
            match current.get(name) {
                Some(e) if sub.has.get(name) != Some(e.version) => {
                    sub.has.insert(e.name.clone(), e.version);
                    send.push(e.clone());
                }
                Some(_) => {}
                None => {
                    if sub.has.remove(name).is_some() {
                        removed.push(name.to_owned());
                    }
                }
            }
        };
        match names {
            Some(names) => names.iter().for_each(|n| consider(n, sub)),
            None => {
                let gone: Vec<Arc<str>> = sub.has.names().filter(|k| !current.contains_key(&**k)).collect();
                current.keys().for_each(|n| consider(n, sub));
                gone.iter().for_each(|n| consider(n, sub));
            }
        }
        // Asked-for names that are no resource's name (see `resolve_fresh`).
        removed.extend(unknown);
        let count = send.len();
        self.send(snapshot, type_url, (send.iter(), count), removed, always)
            .await
    }

    /// Sends every entry of the type as the snapshot's framed chunks, `removed` with the last.
    async fn send_framed(
        &self,
        snapshot: &Snapshot,
        type_url: &'static str,
        mut removed: Vec<String>,
        always: bool,
    ) -> Result<(), Ended> {
        let chunks = snapshot.framed(type_url, CHUNK);
        let len: usize = chunks.iter().map(|(_, n)| n).sum();
        if len == 0 && removed.is_empty() && !always {
            return Ok(());
        }
        let count = len + removed.len();
        let empty = [(bytes::Bytes::new(), 0)];
        let chunks = if chunks.is_empty() { &empty[..] } else { chunks };
        for (i, (framed, _)) in chunks.iter().enumerate() {
            let response = EncodedResponse {
                system_version_info: snapshot.generation.to_string(),
                resources: Resources::Framed(framed.clone()),
                type_url: type_url.to_owned(),
                nonce: self.nonce.fetch_add(1, Ordering::Relaxed).to_string(),
                removed_resources: if i + 1 == chunks.len() {
                    std::mem::take(&mut removed)
                } else {
                    Vec::new()
                },
            };
            self.deliver(response).await?;
        }
        self.metrics.pushed(type_url, count, snapshot.since);
        tracing::debug!(peer = %self.peer, type_url, count, generation = snapshot.generation, "pushed");
        Ok(())
    }

    /// Queues one response, failing when the client is gone or takes none for the timeout.
    async fn deliver(&self, response: EncodedResponse) -> Result<(), Ended> {
        match tokio::time::timeout(self.send_timeout, self.tx.send(Ok(response))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::Gone),
            Err(_) => Err(Ended::Slow),
        }
    }

    /// Sends `entries` (an iterator and its length) in chunks of [`CHUNK`], the removals with
    /// the last; nothing when both are empty unless `always`. The resources are the
    /// snapshot's encoded bytes: a response costs the client a pointer per resource.
    async fn send<'e>(
        &self,
        snapshot: &Snapshot,
        type_url: &'static str,
        (mut entries, len): (impl Iterator<Item = &'e Arc<Entry>>, usize),
        mut removed: Vec<String>,
        always: bool,
    ) -> Result<(), Ended> {
        if len == 0 && removed.is_empty() && !always {
            return Ok(());
        }
        let count = len + removed.len();
        let chunks = len.div_ceil(CHUNK).max(1);
        for i in 0..chunks {
            let resources = Resources::Each(entries.by_ref().take(CHUNK).map(|e| e.encoded.clone()).collect());
            let response = EncodedResponse {
                system_version_info: snapshot.generation.to_string(),
                resources,
                type_url: type_url.to_owned(),
                nonce: self.nonce.fetch_add(1, Ordering::Relaxed).to_string(),
                removed_resources: if i + 1 == chunks {
                    std::mem::take(&mut removed)
                } else {
                    Vec::new()
                },
            };
            self.deliver(response).await?;
        }
        self.metrics.pushed(type_url, count, snapshot.since);
        tracing::debug!(peer = %self.peer, type_url, count, generation = snapshot.generation, "pushed");
        Ok(())
    }

    /// Logs a warning a client can trigger at most once per interval per kind.
    fn warn(&self, kind: &'static str, detail: &str) {
        if let Some(suppressed) = self.warnings.check(kind) {
            tracing::warn!(peer = %self.peer, suppressed, "{kind}: {detail}");
        }
    }

    /// Handles one request; returns the names to push, or `None` for a plain ACK/NACK.
    fn request(&mut self, req: DeltaDiscoveryRequest) -> Result<Option<Push>, Ended> {
        let Some(type_url) = known_type(&req.type_url) else {
            self.warn("subscription to an unknown type ignored", &req.type_url);
            return Ok(None);
        };
        if let Some(err) = &req.error_detail {
            self.metrics.nack(type_url);
            let detail = format!("{type_url} nonce {}: {} {}", req.response_nonce, err.code, err.message);
            self.warn(
                "client rejected resources (NACK); not resending them until they change",
                &detail,
            );
        }
        let first = !self.subs.contains_key(type_url);
        let sub = self.subs.entry(type_url).or_default();
        let asked = req.resource_names_subscribe.len() + req.initial_resource_versions.len();
        if sub.names.len().saturating_add(asked) > MAX_NAMES {
            return Err(Ended::TooManyNames(type_url));
        }
        if first {
            // Legacy wildcard: a first request without names subscribes to everything.
            sub.wildcard = req.resource_names_subscribe.is_empty();
            // A version we cannot read is one we never sent: it will not match, so it is resent.
            sub.has = Held::from_versions(
                req.initial_resource_versions
                    .into_iter()
                    .map(|(n, v)| (Arc::from(n.as_str()), u64::from_str_radix(&v, 16).unwrap_or(u64::MAX))),
            );
        }
        let mut fresh = BTreeSet::new();
        for name in req.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else if sub.names.insert(name.clone()) {
                fresh.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(&name);
            }
            if !sub.wants(&name) {
                sub.has.remove(name.as_str());
            }
        }
        Ok(if first || (sub.wildcard && !fresh.is_empty()) {
            Some((type_url, None, first))
        } else if !fresh.is_empty() {
            Some((type_url, Some(fresh), false))
        } else {
            None
        })
    }

    /// Pushes every type that changed in `snapshot`: only the changed names when the client
    /// saw the previous generation, a full diff when it lags.
    async fn push_changes(&mut self, snapshot: &Snapshot) -> Result<(), Ended> {
        let incremental = snapshot.generation == self.generation + 1;
        self.generation = snapshot.generation;
        if let Some(sub) = self.subs.get_mut(TYPES[0]) {
            sub.resolve(snapshot, &self.own_ips);
        }
        for type_url in PUSH_ORDER {
            let names = incremental.then(|| snapshot.changed.get(type_url)).flatten();
            if !(incremental && names.is_none_or(|n| n.is_empty())) {
                self.push(snapshot, type_url, names, false, Vec::new()).await?;
            }
            if let (true, Some(sub), Some(current)) =
                (incremental, self.subs.get_mut(type_url), snapshot.types.get(type_url))
            {
                if sub.wildcard {
                    sub.has.advance(snapshot.generation, current);
                }
            }
        }
        Ok(())
    }
}

/// The addresses in a node's `INSTANCE_IPS` metadata (Istio's proxies send it,
/// comma-separated), at most [`MAX_OWN_IPS`]; unparsable entries are skipped.
fn instance_ips(node: &mesh_proto::discovery::Node) -> Vec<IpAddr> {
    use prost_types::value::Kind;
    let Some(Kind::StringValue(ips)) = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("INSTANCE_IPS"))
        .and_then(|v| v.kind.as_ref())
    else {
        return Vec::new();
    };
    ips.split(',')
        .filter_map(|ip| ip.trim().parse().ok())
        .take(MAX_OWN_IPS)
        .collect()
}

/// A push a request asks for: type, names (`None`: all), and whether to answer even if empty.
type Push = (&'static str, Option<BTreeSet<String>>, bool);

impl AdsServer {
    /// One Delta ADS stream: authenticates the caller, then serves it until it ends.
    pub(super) async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let token = bearer_token(request.metadata()).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let source = request.remote_addr().map(|a| a.ip());
        let caller = self.auth.authenticate_from(token, source).await.map_err(|e| {
            self.metrics.refused();
            match e {
                // Not the caller's fault (API server away, reviews busy): it retries.
                AuthError::Unavailable(_) => Status::unavailable(format!("xDS: {e}")),
                e => Status::unauthenticated(format!("xDS: {e}")),
            }
        })?;
        let remote = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let mut session = Session {
            peer: format!("{caller} ({remote})"),
            own_ips: Vec::new(),
            subs: HashMap::new(),
            generation: 0,
            tx,
            metrics: self.metrics.clone(),
            nonce: self.nonce.clone(),
            warnings: self.warnings.clone(),
            send_timeout: self.send_timeout,
            own_gateway: format!("{}/{}", caller.identity.namespace, caller.identity.service_account),
        };
        let snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            session.metrics.connected(1);
            tracing::info!(peer = %session.peer, "xDS client connected");
            let ended = session.serve(inbound, snapshots).await;
            session.metrics.connected(-1);
            match ended {
                Ended::Gone => tracing::info!(peer = %session.peer, "xDS client disconnected"),
                Ended::Slow => {
                    session.metrics.limited("slow_client");
                    let waited = session.send_timeout;
                    session.warn("xDS client dropped", &format!("took no response for {waited:?}"));
                }
                Ended::TooManyNames(type_url) => {
                    session.metrics.limited("too_many_names");
                    let msg = format!(
                        "more than {MAX_NAMES} names of {type_url} on one stream; subscribe with a wildcard instead"
                    );
                    session.warn("xDS stream refused", &msg);
                    let refusal = session.tx.send(Err(Status::resource_exhausted(msg)));
                    let _ = tokio::time::timeout(Duration::from_secs(1), refusal).await;
                }
            }
        });
        let out = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(out)))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// A request of about `names` * 20 bytes.
    fn request(names: usize) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            resource_names_subscribe: (0..names).map(|i| format!("ns/name-{i:012}")).collect(),
            ..Default::default()
        }
    }

    /// What a push reads meanwhile is bounded in bytes and count; the rest stays unread in
    /// the stream (HTTP/2 flow control then holds the client back), and nothing is lost.
    #[tokio::test]
    async fn reads_during_a_push_are_bounded() {
        for (size, count) in [(1000, 100), (1, 200)] {
            let requests = (0..count).map(|_| request(size)).map(Ok::<_, Status>);
            let mut inbound = futures_util::stream::iter(requests);
            let (release, push) = tokio::sync::oneshot::channel::<()>();
            let mut early = VecDeque::new();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let _ = release.send(());
            });
            reading_meanwhile(push, &mut inbound, &mut early)
                .await
                .expect("released");
            let held = held_bytes(&early);
            assert!(early.len() <= 64, "{} held", early.len());
            // 64 KiB and one message past it, whatever the constants say.
            assert!(held < (64 << 10) + request(size).encoded_len(), "{held} bytes held");
            let rest = futures_util::StreamExt::count(inbound).await;
            assert_eq!(early.len() + rest, count, "every request is held or still unread");
            assert!(rest > 0, "the stream was read past the bound");
        }
    }

    /// A stream that ends during a push is noted once and not polled again.
    #[tokio::test]
    async fn the_end_of_the_stream_is_kept_for_after_the_push() {
        let mut inbound = futures_util::stream::iter([Ok(request(1))]);
        let mut early = VecDeque::new();
        let push = async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        reading_meanwhile(push, &mut inbound, &mut early).await;
        assert_eq!(early.len(), 2);
        assert!(matches!(early.back(), Some(Ok(None))));
    }

    /// The requests a stream opens with are answered policies first, each type's own
    /// requests in the order sent, the stream's end last; a request not yet arrived is not
    /// waited for.
    #[tokio::test]
    async fn a_streams_first_requests_are_answered_policies_first() {
        let of = |type_url: &str, nonce: &str| DeltaDiscoveryRequest {
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        let sent = [
            of(mesh_proto::ADDRESS_TYPE_URL, "a1"),
            of(mesh_proto::SERVICE_ROUTES_TYPE_URL, "r1"),
            of(mesh_proto::AUTHORIZATION_TYPE_URL, "z1"),
            of(mesh_proto::ADDRESS_TYPE_URL, "a2"),
            of(mesh_proto::WAYPOINT_POLICY_TYPE_URL, "p1"),
        ];
        let mut inbound = futures_util::stream::iter(sent.map(Ok::<_, Status>));
        let mut early = VecDeque::new();
        initial_batch(&mut inbound, &mut early).await;
        let order: Vec<&str> = early
            .iter()
            .map(|m| match m {
                Ok(Some(r)) => r.response_nonce.as_str(),
                Ok(None) => "end",
                Err(_) => "error",
            })
            .collect();
        assert_eq!(order, ["z1", "p1", "r1", "a1", "a2", "end"]);

        // Only what has arrived: the first request alone when nothing follows yet.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<DeltaDiscoveryRequest, Status>>();
        tx.send(Ok(of(mesh_proto::ADDRESS_TYPE_URL, "a1"))).expect("open");
        let mut inbound = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut early = VecDeque::new();
        initial_batch(&mut inbound, &mut early).await;
        assert_eq!(early.len(), 1);
    }
}
