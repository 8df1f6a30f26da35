//! Delta ADS client (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`)
//! for the two types ztunnel consumes: `istio.workload.Address` and `istio.security.Authorization`.
//!
//! Both types are subscribed as wildcards (no resource names). Every response is applied to the
//! [`StateStore`] in one update, so readers never see half a response. Resources that cannot be
//! decoded or validated are skipped, logged, counted and reported back in a NACK, while the
//! valid resources of the same response are still applied: one bad workload must not stall
//! updates for the whole mesh. The client remembers the name, version and store key of every
//! resource it applied, so that a reconnecting stream can tell the server what it already holds
//! (`initial_resource_versions`) and a removal deletes exactly what was applied.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource, Status};
use mesh_proto::{security as secpb, workload as pb, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;
use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tonic::metadata::AsciiMetadataValue;

use super::StoreKey;
use crate::grpc::{ErrorChain, GrpcError, StreamChannel};
use crate::identity::TokenSource;
use crate::socket::SocketFactory;
use crate::state::StateStore;

/// gRPC status code INVALID_ARGUMENT, carried in the `error_detail` of a NACK.
const INVALID_ARGUMENT: i32 = 3;
/// Largest response accepted. Address responses list every workload of the mesh on connect,
/// which outgrows tonic's 4 MiB default in large clusters.
const MAX_MESSAGE_SIZE: usize = 64 << 20;
/// The smallest retry delay, so a zero `initial_backoff` cannot turn into a busy loop.
const MIN_BACKOFF: Duration = Duration::from_millis(1);

/// How to reach the control plane and how to present ourselves to it.
#[derive(Clone)]
pub struct XdsConfig {
    /// `http://host:port` or `https://host:port`. Whether TLS is used is decided by `tls`; an
    /// `https` address without `tls` is refused rather than silently sent in plaintext.
    pub address: String,
    /// `Node.id` of the requests.
    pub node_id: String,
    /// Put into `Node.metadata` as string values.
    pub node_metadata: BTreeMap<String, String>,
    /// TLS client configuration (roots, verifier, client certificate if any). SNI is not
    /// sent; see [`crate::tls::control_plane_client_config`].
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where the TCP sockets come from; `None` makes plain ones. A node proxy passes its
    /// factory so its own capture rules skip the control plane connection.
    pub sockets: Option<Arc<dyn SocketFactory>>,
    /// Bearer token presented as `authorization` metadata; re-read on every connection.
    pub token: TokenSource,
    /// First reconnection delay; doubled after every failed attempt up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Types beyond the two workload types, held by their consumer (a waypoint's routes).
    pub extra_types: Vec<Arc<dyn ResourceSink>>,
}

/// A resource type the state store does not hold, subscribed to beside the workload types
/// and applied by whoever consumes it.
pub trait ResourceSink: Send + Sync {
    fn type_url(&self) -> &'static str;
    /// Applies one response as a unit: `upserts` are (name, encoded message) and `removed`
    /// are names. Returns the resources left unapplied, as (name, reason).
    fn apply(&self, upserts: &[(String, &[u8])], removed: &[String]) -> Vec<(String, String)>;
}

impl XdsConfig {
    /// A plaintext configuration without token, retrying after 1 s up to 30 s.
    pub fn new(address: impl Into<String>, node_id: impl Into<String>) -> Self {
        XdsConfig {
            address: address.into(),
            node_id: node_id.into(),
            node_metadata: BTreeMap::new(),
            tls: None,
            sockets: None,
            token: TokenSource::None,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            extra_types: Vec::new(),
        }
    }
}

/// Hand-written so that a static token never ends up in a log line.
impl fmt::Debug for XdsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match &self.token {
            TokenSource::None => "none".to_owned(),
            TokenSource::Static(_) => "static (redacted)".to_owned(),
            TokenSource::File(p) => format!("file {}", p.display()),
        };
        f.debug_struct("XdsConfig")
            .field("address", &self.address)
            .field("node_id", &self.node_id)
            .field("node_metadata", &self.node_metadata)
            .field("tls", &self.tls.is_some())
            .field("sockets", &self.sockets.is_some())
            .field("token", &token)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field(
                "extra_types",
                &self.extra_types.iter().map(|t| t.type_url()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a stream ended or could not be started. [`XdsClient::run`] logs these and retries.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The address is invalid or the control plane could not be reached.
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    #[error("reading token file {path}: {source}")]
    TokenFile { path: String, source: std::io::Error },
    #[error("token contains characters not allowed in a header")]
    TokenValue,
    /// Boxed: a `Status` is large, and this error travels through every `?` of the stream.
    #[error("xDS stream failed: {}", ErrorChain(.0))]
    Stream(#[source] Box<tonic::Status>),
    #[error("control plane closed the xDS stream")]
    Closed,
}

impl From<tonic::Status> for XdsError {
    fn from(status: tonic::Status) -> Self {
        XdsError::Stream(Box::new(status))
    }
}

/// Label of the per-type metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeUrlLabel {
    pub type_url: String,
}

/// Metrics of the xDS client. `Default` gives unregistered metrics (for tests).
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    /// Streams established with the control plane (`xds_connections_total`).
    pub connections: Counter,
    /// Responses applied, per type (`xds_updates_total`).
    pub updates: Family<TypeUrlLabel, Counter>,
    /// Resources rejected and NACKed, per type (`xds_rejected_resources_total`).
    pub rejected_resources: Family<TypeUrlLabel, Counter>,
    /// 1 while a stream is established, else 0 (`xds_connected`).
    pub connected: Gauge,
}

impl XdsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = XdsMetrics::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "xds_connections",
            "Delta ADS streams established with the control plane",
            m.connections.clone(),
        );
        registry.register(
            "xds_updates",
            "Delta ADS responses applied, per type URL",
            m.updates.clone(),
        );
        registry.register(
            "xds_rejected_resources",
            "Delta ADS resources rejected (NACKed), per type URL",
            m.rejected_resources.clone(),
        );
        registry.register(
            "xds_connected",
            "1 while a Delta ADS stream is established",
            m.connected.clone(),
        );
        m
    }

    fn label(type_url: &str) -> TypeUrlLabel {
        TypeUrlLabel {
            type_url: type_url.to_owned(),
        }
    }
}

/// The resource types this client subscribes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Address,
    Authorization,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Address, Kind::Authorization];

    fn type_url(self) -> &'static str {
        match self {
            Kind::Address => ADDRESS_TYPE_URL,
            Kind::Authorization => AUTHORIZATION_TYPE_URL,
        }
    }

    fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One applied resource.
#[derive(Debug)]
struct Held {
    version: String,
    key: StoreKey,
}

/// What the client holds of one type.
#[derive(Debug, Default)]
struct TypeState {
    /// Applied resources by resource name.
    held: HashMap<String, Held>,
    /// A response of this type has been applied since the client started.
    synced: bool,
}

/// A decoded resource, not yet validated.
enum Decoded {
    /// Boxed: a workload is several times larger than a policy.
    Address(Box<pb::Address>),
    Authorization(secpb::Authorization),
}

struct Incoming {
    name: String,
    version: String,
    key: StoreKey,
    resource: Decoded,
}

/// A resource that was not applied, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rejected {
    name: String,
    reason: String,
}

/// A policy this proxy cannot read, and holds no earlier version of, denies every connection
/// in its namespace until a readable version or its removal arrives: what it says cannot be
/// enforced, and leaving it out would open what a DENY closes (or what an ALLOW limits). An
/// earlier, readable version stays in force instead (the last good state). A name that is
/// not `<namespace>/<name>` names no namespace to close, and is only refused.
fn stand_in_for_unreadable(ts: &mut TypeState, state: &mut crate::state::State, name: String, version: String) {
    if ts.held.contains_key(&name) {
        return;
    }
    let Some((namespace, policy)) = name.split_once('/').filter(|(ns, p)| !ns.is_empty() && !p.is_empty()) else {
        return;
    };
    let stand_in = crate::rbac::Policy {
        name: policy.to_owned(),
        namespace: namespace.to_owned(),
        scope: crate::rbac::Scope::Namespace,
        action: crate::rbac::Action::Deny,
        // One rule with no clauses: matches every connection.
        groups: vec![vec![]],
        dry_run: false,
    };
    let key = StoreKey::Policy(stand_in.key());
    tracing::warn!(policy = %name, "unreadable authorization policy: every connection in its namespace is denied until it is fixed");
    state.upsert_policy(stand_in);
    ts.held.insert(name, Held { version, key });
}

/// Decodes one `Resource` of a response of type `kind`.
fn decode(kind: Kind, index: usize, r: &Resource) -> Result<Incoming, Rejected> {
    let reject = |reason: String| Rejected {
        name: if r.name.is_empty() {
            format!("<unnamed resource #{index}>")
        } else {
            r.name.clone()
        },
        reason,
    };
    let any = r
        .resource
        .as_ref()
        .ok_or_else(|| reject("resource has no body".to_owned()))?;
    if any.type_url != kind.type_url() {
        return Err(reject(format!(
            "body type {:?} does not match the response type {:?}",
            any.type_url,
            kind.type_url()
        )));
    }
    let (key, resource) = match kind {
        Kind::Address => {
            let a = pb::Address::decode(any.value.as_slice()).map_err(|e| reject(format!("cannot decode: {e}")))?;
            let key = StoreKey::of_address(&a)
                .ok_or_else(|| reject("address.type: neither workload nor service set".to_owned()))?;
            (key, Decoded::Address(Box::new(a)))
        }
        Kind::Authorization => {
            let a = secpb::Authorization::decode(any.value.as_slice())
                .map_err(|e| reject(format!("cannot decode: {e}")))?;
            (StoreKey::of_authorization(&a), Decoded::Authorization(a))
        }
    };
    let name = if r.name.is_empty() {
        key.name().to_owned()
    } else {
        r.name.clone()
    };
    Ok(Incoming {
        name,
        version: r.version.clone(),
        key,
        resource,
    })
}

/// Versions of one extra type's resources, as its sink accepted them.
#[derive(Debug, Default)]
struct ExtraState {
    versions: HashMap<String, String>,
    synced: bool,
}

/// The resources this client holds, per type; survives reconnections.
#[derive(Debug, Default)]
struct Tracker {
    types: [TypeState; 2],
    /// In the order of [`XdsConfig::extra_types`].
    extra: Vec<ExtraState>,
}

impl Tracker {
    /// Applies one response of type `kind` in a single store update and returns what was
    /// rejected. Removals delete what this client applied under that name; a name it never
    /// applied is ignored, so a removal cannot delete state another source put there.
    fn apply(&mut self, store: &StateStore, kind: Kind, resp: &DeltaDiscoveryResponse) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut incoming = Vec::with_capacity(resp.resources.len());
        // Policies this proxy cannot read, by resource name and version.
        let mut unreadable = Vec::new();
        for (i, r) in resp.resources.iter().enumerate() {
            match decode(kind, i, r) {
                Ok(inc) => incoming.push(inc),
                Err(rej) => {
                    if kind == Kind::Authorization {
                        unreadable.push((r.name.clone(), r.version.clone()));
                    }
                    rejected.push(rej);
                }
            }
        }
        let ts = &mut self.types[kind.index()];
        if !incoming.is_empty() || !resp.removed_resources.is_empty() || !unreadable.is_empty() {
            store.update(|state| {
                for name in &resp.removed_resources {
                    if let Some(held) = ts.held.remove(name) {
                        held.key.remove(state);
                    }
                }
                for inc in incoming {
                    let applied = match &inc.resource {
                        Decoded::Address(a) => state.apply_address(a),
                        Decoded::Authorization(a) => state.apply_authorization(a),
                    };
                    match applied {
                        Ok(()) => {
                            let held = Held {
                                version: inc.version,
                                key: inc.key.clone(),
                            };
                            // The same name now stored under another key (say a workload whose
                            // uid changed): drop the old entry so it does not linger.
                            if let Some(previous) = ts.held.insert(inc.name, held) {
                                if previous.key != inc.key {
                                    previous.key.remove(state);
                                }
                            }
                        }
                        // A rejected update leaves the previous version applied and tracked,
                        // so a reconnect reports the version actually in use.
                        Err(e) => {
                            if kind == Kind::Authorization {
                                unreadable.push((inc.name.clone(), inc.version.clone()));
                            }
                            rejected.push(Rejected {
                                name: inc.name,
                                reason: e.to_string(),
                            });
                        }
                    }
                }
                for (name, version) in unreadable {
                    stand_in_for_unreadable(ts, state, name, version);
                }
            });
        }
        ts.synced = true;
        rejected
    }

    fn versions(&self, kind: Kind) -> std::collections::BTreeMap<String, String> {
        self.types[kind.index()]
            .held
            .iter()
            .map(|(name, h)| (name.clone(), h.version.clone()))
            .collect()
    }

    /// Hands one response of an extra type to its sink and records what it accepted.
    fn apply_extra(&mut self, index: usize, sink: &dyn ResourceSink, resp: &DeltaDiscoveryResponse) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut upserts = Vec::with_capacity(resp.resources.len());
        for (i, r) in resp.resources.iter().enumerate() {
            match r.resource.as_ref() {
                Some(any) if any.type_url == sink.type_url() && !r.name.is_empty() => {
                    upserts.push((r.name.clone(), any.value.as_slice(), r.version.clone()))
                }
                _ => rejected.push(Rejected {
                    name: if r.name.is_empty() {
                        format!("<unnamed resource #{i}>")
                    } else {
                        r.name.clone()
                    },
                    reason: format!("needs a name and a body of type {}", sink.type_url()),
                }),
            }
        }
        let bodies: Vec<(String, &[u8])> = upserts.iter().map(|(n, b, _)| (n.clone(), *b)).collect();
        let refused = sink.apply(&bodies, &resp.removed_resources);
        let state = &mut self.extra[index];
        for name in &resp.removed_resources {
            state.versions.remove(name);
        }
        for (name, _, version) in upserts {
            if !refused.iter().any(|(n, _)| *n == name) {
                state.versions.insert(name, version);
            }
        }
        rejected.extend(refused.into_iter().map(|(name, reason)| Rejected { name, reason }));
        state.synced = true;
        rejected
    }

    fn synced(&self) -> bool {
        self.types.iter().all(|t| t.synced) && self.extra.iter().all(|t| t.synced)
    }
}

/// The ACK (nothing rejected) or NACK for a response.
fn reply(type_url: &str, nonce: &str, rejected: &[Rejected]) -> DeltaDiscoveryRequest {
    let error_detail = (!rejected.is_empty()).then(|| {
        let list = rejected
            .iter()
            .map(|r| format!("{}: {}", r.name, r.reason))
            .collect::<Vec<_>>()
            .join("; ");
        Status {
            code: INVALID_ARGUMENT,
            message: format!("rejected {} resource(s): {list}", rejected.len()),
            details: Vec::new(),
        }
    });
    DeltaDiscoveryRequest {
        type_url: type_url.to_owned(),
        response_nonce: nonce.to_owned(),
        error_detail,
        ..Default::default()
    }
}

/// The `authorization` metadata for `token`, read now (file tokens rotate).
async fn bearer(token: &TokenSource) -> Result<Option<AsciiMetadataValue>, XdsError> {
    let token = match token {
        TokenSource::None => return Ok(None),
        TokenSource::Static(t) => t.to_string(),
        TokenSource::File(p) => tokio::fs::read_to_string(p)
            .await
            .map_err(|source| XdsError::TokenFile {
                path: p.display().to_string(),
                source,
            })?
            .trim()
            .to_owned(),
    };
    let mut value: AsciiMetadataValue = format!("Bearer {token}").parse().map_err(|_| XdsError::TokenValue)?;
    value.set_sensitive(true);
    Ok(Some(value))
}

fn node(config: &XdsConfig) -> Node {
    let fields = config
        .node_metadata
        .iter()
        .map(|(k, v)| {
            let value = prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(v.clone())),
            };
            (k.clone(), value)
        })
        .collect();
    Node {
        id: config.node_id.clone(),
        metadata: Some(prost_types::Struct { fields }),
        user_agent_name: "mesh-core".to_owned(),
        ..Default::default()
    }
}

/// A delay in [d/2, d], so that many proxies losing the control plane at once do not all
/// come back in the same instant.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// The Delta ADS client. Create it, take [`XdsClient::ready`], then spawn [`XdsClient::run`].
pub struct XdsClient {
    config: XdsConfig,
    node: Node,
    store: Arc<StateStore>,
    metrics: XdsMetrics,
    tracker: Tracker,
    ready: watch::Sender<bool>,
}

impl XdsClient {
    pub fn new(config: XdsConfig, store: Arc<StateStore>, metrics: XdsMetrics) -> Self {
        XdsClient {
            node: node(&config),
            store,
            metrics,
            tracker: Tracker {
                extra: (0..config.extra_types.len()).map(|_| ExtraState::default()).collect(),
                ..Default::default()
            },
            ready: watch::Sender::new(false),
            config,
        }
    }

    /// Becomes true once a response of each type has been applied, and stays true across
    /// reconnections (the store keeps serving what it has).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Runs forever: connects, streams, and reconnects with exponential backoff (with jitter)
    /// after any error. The backoff starts over once a stream has delivered a response.
    pub async fn run(mut self) {
        let initial = self.config.initial_backoff.max(MIN_BACKOFF);
        let max = self.config.max_backoff.max(initial);
        let mut backoff = initial;
        loop {
            let mut progressed = false;
            let err = self.session(&mut progressed).await;
            self.metrics.connected.set(0);
            if progressed {
                backoff = initial;
            }
            let delay = jittered(backoff);
            match &err {
                XdsError::Grpc(GrpcError::Address { .. }) => {
                    tracing::error!(error = %err, retry_in = ?delay, "xDS client misconfigured")
                }
                _ => tracing::warn!(
                    address = %self.config.address,
                    error = %err,
                    retry_in = ?delay,
                    "xDS stream ended, reconnecting"
                ),
            }
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(max);
        }
    }

    /// One stream, from connect to its end. `progressed` is set once a response was handled.
    async fn session(&mut self, progressed: &mut bool) -> XdsError {
        match self.stream(progressed).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn stream(&mut self, progressed: &mut bool) -> Result<std::convert::Infallible, XdsError> {
        let token = bearer(&self.config.token).await?;
        let channel = self.connect().await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE);

        // The initial requests are queued before the call: tonic only returns the response
        // stream once the server answered, and the server answers our requests.
        let (tx, rx) = mpsc::channel(Kind::ALL.len() + self.config.extra_types.len() + 2);
        for req in self.initial_requests() {
            tx.send(req).await.map_err(|_| XdsError::Closed)?;
        }
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut request = tonic::Request::new(outbound);
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", token);
        }
        let mut inbound = client.delta_aggregated_resources(request).await?.into_inner();
        self.metrics.connections.inc();
        self.metrics.connected.set(1);
        tracing::info!(address = %self.config.address, "xDS stream established");

        loop {
            let resp = inbound.message().await?.ok_or(XdsError::Closed)?;
            let reply = self.handle(&resp);
            *progressed = true;
            tx.send(reply).await.map_err(|_| XdsError::Closed)?;
        }
    }

    /// The subscriptions a stream opens with, policies first and addresses last: a server
    /// answers them in order, so no workload (or service a waypoint serves) is known here
    /// before the policies that protect it, even while a large address push is under way.
    fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        let request = |type_url: &str, versions| DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.to_owned(),
            initial_resource_versions: versions,
            ..Default::default()
        };
        let mut out = vec![request(
            Kind::Authorization.type_url(),
            self.tracker.versions(Kind::Authorization),
        )];
        for (sink, state) in self.config.extra_types.iter().zip(&self.tracker.extra) {
            let versions = state.versions.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            out.push(request(sink.type_url(), versions));
        }
        out.push(request(Kind::Address.type_url(), self.tracker.versions(Kind::Address)));
        out
    }

    /// One connection per stream: a push arrives in frames of up to
    /// [`crate::grpc::MAX_FRAME_SIZE`], and a failed stream is dialled again by [`Self::run`].
    async fn connect(&self) -> Result<StreamChannel, XdsError> {
        let mut dial = crate::grpc::endpoint(&self.config.address, self.config.tls.clone())?;
        if let Some(sockets) = &self.config.sockets {
            dial = dial.sockets(sockets.clone());
        }
        Ok(dial.connect_stream(crate::grpc::MAX_FRAME_SIZE).await?)
    }

    /// Applies one response and builds its ACK or NACK. Exactly one reply per response: a
    /// NACK is not repeated, the server decides what to send next.
    fn handle(&mut self, resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let extra = self
            .config
            .extra_types
            .iter()
            .position(|t| t.type_url() == resp.type_url);
        if let Some(index) = extra {
            let sink = self.config.extra_types[index].clone();
            let rejected = self.tracker.apply_extra(index, sink.as_ref(), resp);
            return self.finish(sink.type_url(), resp, rejected);
        }
        let Some(kind) = Kind::from_type_url(&resp.type_url) else {
            tracing::warn!(type_url = %resp.type_url, "xDS response of a type this client did not subscribe to");
            let rejected = Rejected {
                name: "*".to_owned(),
                reason: format!("type {:?} is not subscribed", resp.type_url),
            };
            return reply(&resp.type_url, &resp.nonce, &[rejected]);
        };
        let rejected = self.tracker.apply(&self.store, kind, resp);
        self.finish(kind.type_url(), resp, rejected)
    }

    /// Counts, logs and answers one applied response.
    fn finish(
        &mut self,
        type_url: &str,
        resp: &DeltaDiscoveryResponse,
        rejected: Vec<Rejected>,
    ) -> DeltaDiscoveryRequest {
        let label = XdsMetrics::label(type_url);
        self.metrics.updates.get_or_create(&label).inc();
        for r in &rejected {
            tracing::warn!(
                type_url = type_url,
                resource = %r.name,
                reason = %r.reason,
                "rejected xDS resource"
            );
        }
        if !rejected.is_empty() {
            self.metrics
                .rejected_resources
                .get_or_create(&label)
                .inc_by(rejected.len() as u64);
        }
        tracing::debug!(
            type_url = type_url,
            nonce = %resp.nonce,
            resources = resp.resources.len(),
            removed = resp.removed_resources.len(),
            rejected = rejected.len(),
            "applied xDS response"
        );
        if self.tracker.synced() {
            self.ready.send_if_modified(|r| !std::mem::replace(r, true));
        }
        reply(type_url, &resp.nonce, &rejected)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use std::pin::Pin;

    use futures_util::Stream;
    use mesh_proto::discovery::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use tokio::net::TcpListener;
    use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
    use tonic::metadata::MetadataMap;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::Server;

    use super::*;
    use crate::identity::{ca::new_csr, DevCa, Identity, WorkloadCertificate};

    const DEADLINE: Duration = Duration::from_secs(10);

    type ResponseTx = UnboundedSender<Result<DeltaDiscoveryResponse, tonic::Status>>;

    /// One stream as the test server sees it. Dropping it ends the stream (the server
    /// finishes the response stream with an OK status).
    struct ServerConn {
        metadata: MetadataMap,
        requests: UnboundedReceiver<DeltaDiscoveryRequest>,
        responses: ResponseTx,
    }

    impl ServerConn {
        async fn request(&mut self) -> DeltaDiscoveryRequest {
            tokio::time::timeout(DEADLINE, self.requests.recv())
                .await
                .expect("timed out waiting for a request")
                .expect("client closed the stream")
        }

        fn send(&self, resp: DeltaDiscoveryResponse) {
            self.responses.send(Ok(resp)).expect("stream gone");
        }

        /// Both initial requests, by type URL.
        async fn initial(&mut self) -> HashMap<String, DeltaDiscoveryRequest> {
            let mut out = HashMap::new();
            for _ in 0..2 {
                let r = self.request().await;
                out.insert(r.type_url.clone(), r);
            }
            out
        }
    }

    /// An ADS server that hands every new stream to the test.
    struct TestAds {
        conns: UnboundedSender<ServerConn>,
    }

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for TestAds {
        type DeltaAggregatedResourcesStream =
            Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

        async fn delta_aggregated_resources(
            &self,
            request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
            let metadata = request.metadata().clone();
            let mut inbound = request.into_inner();
            let (req_tx, requests) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Ok(Some(r)) = inbound.message().await {
                    if req_tx.send(r).is_err() {
                        break;
                    }
                }
            });
            let (responses, resp_rx) = mpsc::unbounded_channel();
            self.conns
                .send(ServerConn {
                    metadata,
                    requests,
                    responses,
                })
                .map_err(|_| tonic::Status::unavailable("test finished"))?;
            let out = futures_util::stream::unfold(resp_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
            Ok(tonic::Response::new(Box::pin(out)))
        }
    }

    fn ads_service() -> (AggregatedDiscoveryServiceServer<TestAds>, UnboundedReceiver<ServerConn>) {
        let (conns, rx) = mpsc::unbounded_channel();
        (AggregatedDiscoveryServiceServer::new(TestAds { conns }), rx)
    }

    async fn plaintext_server() -> (SocketAddr, UnboundedReceiver<ServerConn>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let incoming = TcpIncoming::from_listener(listener, true, None).expect("incoming");
        let (svc, conns) = ads_service();
        tokio::spawn(Server::builder().add_service(svc).serve_with_incoming(incoming));
        (addr, conns)
    }

    async fn next_conn(conns: &mut UnboundedReceiver<ServerConn>) -> ServerConn {
        tokio::time::timeout(DEADLINE, conns.recv())
            .await
            .expect("timed out waiting for a connection")
            .expect("server gone")
    }

    /// Polls `cond` on the store's snapshots until it holds or the deadline passes.
    async fn eventually(store: &StateStore, what: &str, cond: impl Fn(&crate::state::State) -> bool) {
        let mut changes = store.subscribe();
        let wait = async {
            while !cond(&store.load()) {
                changes.changed().await.expect("store dropped");
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
    }

    fn workload(uid: &str, ip: &[u8]) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.to_owned(),
                name: "w".to_owned(),
                namespace: "default".to_owned(),
                addresses: vec![ip.to_vec()],
                tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
                ..Default::default()
            })),
        }
    }

    fn service(ns: &str, host: &str) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "svc".to_owned(),
                namespace: ns.to_owned(),
                hostname: host.to_owned(),
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 1],
                }],
                ports: vec![pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
                ..Default::default()
            })),
        }
    }

    fn policy(ns: &str, name: &str) -> secpb::Authorization {
        secpb::Authorization {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            scope: secpb::Scope::Namespace as i32,
            action: secpb::Action::Allow as i32,
            groups: vec![],
            ..Default::default()
        }
    }

    fn resource(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
        Resource {
            name: name.to_owned(),
            version: version.to_owned(),
            resource: Some(prost_types::Any {
                type_url: type_url.to_owned(),
                value,
            }),
            ..Default::default()
        }
    }

    fn response(type_url: &str, nonce: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            nonce: nonce.to_owned(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    const W1: &str = "Kubernetes//Pod/default/w1";
    const BAD_IP: &str = "Kubernetes//Pod/default/bad-ip";
    const SVC: &str = "default/svc.default.svc.cluster.local";

    fn config(addr: SocketAddr) -> XdsConfig {
        XdsConfig {
            node_metadata: [("NAMESPACE".to_owned(), "istio-system".to_owned())].into(),
            token: TokenSource::Static("s3cret".into()),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            ..XdsConfig::new(format!("http://{addr}"), "node-1")
        }
    }

    fn assert_initial(initial: &HashMap<String, DeltaDiscoveryRequest>) {
        let types: BTreeSet<_> = initial.keys().map(String::as_str).collect();
        assert_eq!(types, BTreeSet::from([ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]));
        for r in initial.values() {
            let node = r.node.as_ref().expect("initial request carries the node");
            assert_eq!(node.id, "node-1");
            let meta = node.metadata.as_ref().expect("node metadata");
            assert_eq!(
                meta.fields.get("NAMESPACE").and_then(|v| v.kind.clone()),
                Some(prost_types::value::Kind::StringValue("istio-system".to_owned()))
            );
            assert!(r.resource_names_subscribe.is_empty(), "wildcard subscription");
            assert!(r.response_nonce.is_empty());
            assert!(r.error_detail.is_none());
        }
    }

    /// A policy this proxy cannot read denies its namespace until a readable version or its
    /// removal comes; an earlier readable version stays in force instead.
    #[test]
    fn an_unreadable_policy_denies_its_namespace_until_it_is_fixed() {
        use crate::rbac::{evaluate, ConnectionInfo, Decision};
        let store = StateStore::new();
        let mut tracker = Tracker::default();
        let authz = |resources| response(AUTHORIZATION_TYPE_URL, "n", resources, &[]);
        let policy_in = |ns: &str, name: &str, scope: i32| {
            let mut p = policy(ns, name);
            p.scope = scope;
            p.encode_to_vec()
        };
        let namespace = secpb::Scope::Namespace as i32;
        let decision_in = |ns: &str| {
            let state = store.load();
            let applying: Vec<_> = state
                .policies()
                .filter(|p| p.namespace == ns)
                .map(|p| p.as_ref())
                .collect();
            let c = ConnectionInfo {
                src_identity: None,
                src_ip: "10.0.0.9".parse().unwrap(),
                dst: "10.0.0.1:80".parse().unwrap(),
            };
            evaluate(applying, &c)
        };
        let rejected = tracker.apply(
            &store,
            Kind::Authorization,
            &authz(vec![
                resource("shop/garbled", "1", AUTHORIZATION_TYPE_URL, vec![0xff, 0xff, 0xff]),
                resource(
                    "bank/future",
                    "1",
                    AUTHORIZATION_TYPE_URL,
                    policy_in("bank", "future", 99),
                ),
                resource(
                    "web/allow",
                    "1",
                    AUTHORIZATION_TYPE_URL,
                    policy_in("web", "allow", namespace),
                ),
            ]),
        );
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(matches!(decision_in("shop"), Decision::Deny(_)));
        assert!(matches!(decision_in("bank"), Decision::Deny(_)));
        assert_eq!(decision_in("other"), Decision::Allow);

        // An unreadable update of a readable policy: the readable version stays.
        tracker.apply(
            &store,
            Kind::Authorization,
            &authz(vec![resource("web/allow", "2", AUTHORIZATION_TYPE_URL, vec![0xff])]),
        );
        let state = store.load();
        let kept = state.policies().find(|p| p.key() == "web/allow").expect("kept");
        assert_eq!(kept.action, crate::rbac::Action::Allow);

        // A readable version replaces the stand-in; a removal removes it.
        tracker.apply(
            &store,
            Kind::Authorization,
            &authz(vec![resource(
                "shop/garbled",
                "2",
                AUTHORIZATION_TYPE_URL,
                policy_in("shop", "garbled", namespace),
            )]),
        );
        assert_eq!(store.load().policies().filter(|p| p.namespace == "shop").count(), 1);
        assert_ne!(
            decision_in("shop"),
            Decision::Allow,
            "an ALLOW without rules allows nothing"
        );
        assert!(store
            .load()
            .policies()
            .any(|p| p.key() == "shop/garbled" && p.action == crate::rbac::Action::Allow));
        tracker.apply(
            &store,
            Kind::Authorization,
            &response(AUTHORIZATION_TYPE_URL, "r", vec![], &["bank/future"]),
        );
        assert_eq!(decision_in("bank"), Decision::Allow);
    }

    /// Policies are subscribed to first and addresses last, so a server answering in order
    /// never shows this client a workload before the policies protecting it.
    #[tokio::test]
    async fn policies_are_asked_for_before_addresses() {
        let (addr, mut conns) = plaintext_server().await;
        let client = XdsClient::new(config(addr), StateStore::new(), XdsMetrics::default());
        let task = tokio::spawn(client.run());
        let mut conn = next_conn(&mut conns).await;
        let first = conn.request().await;
        let second = conn.request().await;
        assert_eq!(
            [first.type_url.as_str(), second.type_url.as_str()],
            [AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL]
        );
        task.abort();
    }

    #[tokio::test]
    async fn acks_nacks_removes_and_resumes() {
        let (addr, mut conns) = plaintext_server().await;
        let store = StateStore::new();
        let metrics = XdsMetrics::default();
        let client = XdsClient::new(config(addr), store.clone(), metrics.clone());
        let mut ready = client.ready();
        let task = tokio::spawn(client.run());

        let mut conn = next_conn(&mut conns).await;
        assert_eq!(
            conn.metadata.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret")
        );
        let initial = conn.initial().await;
        assert_initial(&initial);
        assert!(initial.values().all(|r| r.initial_resource_versions.is_empty()));

        // Two valid resources, one that is not protobuf, one that fails validation.
        conn.send(response(
            ADDRESS_TYPE_URL,
            "a1",
            vec![
                resource(W1, "1", ADDRESS_TYPE_URL, workload(W1, &[10, 0, 0, 1]).encode_to_vec()),
                resource(
                    SVC,
                    "1",
                    ADDRESS_TYPE_URL,
                    service("default", "svc.default.svc.cluster.local").encode_to_vec(),
                ),
                resource("corrupt", "1", ADDRESS_TYPE_URL, b"garbage!".to_vec()),
                resource(
                    BAD_IP,
                    "1",
                    ADDRESS_TYPE_URL,
                    workload(BAD_IP, &[10, 0, 0]).encode_to_vec(),
                ),
            ],
            &[],
        ));
        let nack = conn.request().await;
        assert_eq!(nack.type_url, ADDRESS_TYPE_URL);
        assert_eq!(nack.response_nonce, "a1");
        assert!(nack.node.is_none());
        let detail = nack.error_detail.expect("a NACK carries error_detail");
        assert_eq!(detail.code, 3);
        assert!(detail.message.contains("corrupt: cannot decode"), "{}", detail.message);
        assert!(detail.message.contains(BAD_IP), "{}", detail.message);
        assert!(!detail.message.contains(W1), "{}", detail.message);
        // The reply is sent after the store update: the valid resources are there already.
        let state = store.load();
        assert!(state.workload(W1).is_some());
        assert!(state.service(SVC).is_some());
        assert!(state.workload(BAD_IP).is_none());
        assert!(!*ready.borrow(), "not ready before the first Authorization response");

        // Policies: the name is derived from namespace/name when the resource has none.
        conn.send(response(
            AUTHORIZATION_TYPE_URL,
            "p1",
            vec![resource(
                "",
                "7",
                AUTHORIZATION_TYPE_URL,
                policy("default", "allow").encode_to_vec(),
            )],
            &[],
        ));
        // The next request is this ACK: the NACK above was not repeated.
        let ack = conn.request().await;
        assert_eq!(
            (ack.type_url.as_str(), ack.response_nonce.as_str()),
            (AUTHORIZATION_TYPE_URL, "p1")
        );
        assert!(ack.error_detail.is_none());
        tokio::time::timeout(DEADLINE, ready.wait_for(|r| *r))
            .await
            .expect("ready in time")
            .expect("client alive");
        assert!(store.load().policies().any(|p| p.key() == "default/allow"));

        // Remove the service, update the workload.
        conn.send(response(
            ADDRESS_TYPE_URL,
            "a2",
            vec![resource(
                W1,
                "2",
                ADDRESS_TYPE_URL,
                workload(W1, &[10, 0, 0, 2]).encode_to_vec(),
            )],
            &[SVC],
        ));
        let ack = conn.request().await;
        assert_eq!(
            (ack.type_url.as_str(), ack.response_nonce.as_str()),
            (ADDRESS_TYPE_URL, "a2")
        );
        assert!(ack.error_detail.is_none());
        let state = store.load();
        assert!(state.service(SVC).is_none());
        assert_eq!(
            state.workload(W1).map(|w| w.addresses.clone()),
            Some(vec!["10.0.0.2".parse().expect("ip")])
        );

        // A type nobody asked for is NACKed, nothing else happens.
        conn.send(response("type.googleapis.com/some.Other", "x1", vec![], &[]));
        let nack = conn.request().await;
        assert_eq!(nack.response_nonce, "x1");
        assert!(nack.error_detail.is_some());

        // The server drops the stream: the client reconnects and says what it holds.
        drop(conn);
        let mut conn = next_conn(&mut conns).await;
        let initial = conn.initial().await;
        assert_initial(&initial);
        assert_eq!(
            initial[ADDRESS_TYPE_URL].initial_resource_versions,
            std::collections::BTreeMap::from([(W1.to_owned(), "2".to_owned())])
        );
        assert_eq!(
            initial[AUTHORIZATION_TYPE_URL].initial_resource_versions,
            std::collections::BTreeMap::from([("default/allow".to_owned(), "7".to_owned())])
        );
        assert!(*ready.borrow(), "readiness survives a reconnect");

        // Removal by the derived policy name.
        conn.send(response(AUTHORIZATION_TYPE_URL, "p2", vec![], &["default/allow"]));
        let ack = conn.request().await;
        assert_eq!(ack.response_nonce, "p2");
        assert!(store.load().policies().next().is_none());

        let address = XdsMetrics::label(ADDRESS_TYPE_URL);
        assert_eq!(metrics.rejected_resources.get_or_create(&address).get(), 2);
        assert_eq!(metrics.updates.get_or_create(&address).get(), 2);
        assert_eq!(metrics.connections.get(), 2);
        assert_eq!(metrics.connected.get(), 1);
        task.abort();
    }

    #[tokio::test]
    async fn reconnects_after_connection_refused() {
        // Reserve a port, close it, and only then start serving on it.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let store = StateStore::new();
        let client = XdsClient::new(config(addr), store.clone(), XdsMetrics::default());
        let mut ready = client.ready();
        let task = tokio::spawn(client.run());

        let listener = TcpListener::bind(addr).await.expect("rebind");
        let incoming = TcpIncoming::from_listener(listener, true, None).expect("incoming");
        let (svc, mut conns) = ads_service();
        tokio::spawn(Server::builder().add_service(svc).serve_with_incoming(incoming));

        let mut conn = next_conn(&mut conns).await;
        conn.initial().await;
        conn.send(response(ADDRESS_TYPE_URL, "a", vec![], &[]));
        conn.send(response(AUTHORIZATION_TYPE_URL, "p", vec![], &[]));
        tokio::time::timeout(DEADLINE, ready.wait_for(|r| *r))
            .await
            .expect("ready in time")
            .expect("client alive");
        task.abort();
    }

    /// A TLS server in front of the test service, with certificates from a development CA.
    #[tokio::test]
    async fn connects_over_mutual_tls() {
        let ca = DevCa::generate("cluster.local").expect("ca");
        let cert = |ns: &str, sa: &str| {
            let id = Identity::new("cluster.local", ns, sa).expect("identity");
            let (key, csr) = new_csr(&id).expect("csr");
            let leaf = ca.issue(&id, &csr, Duration::from_secs(3600)).expect("issue");
            WorkloadCertificate::from_chain(&id, key.serialize_der(), &[leaf, ca.root_pem().to_owned()], &[])
                .expect("certificate")
        };
        let server_cert = cert("istio-system", "controller");
        let client_cert = cert("istio-system", "ztunnel");
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&server_cert).expect("server tls"));
        let client_tls =
            crate::tls::client_config(&client_cert, vec![server_cert.identity.clone()]).expect("client tls");

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // tonic's server cannot take rustls streams without its TLS feature: bridge each
        // handshaken connection through an in-memory duplex pipe.
        let incoming = futures_util::stream::unfold((listener, acceptor), |(listener, acceptor)| async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return None;
                };
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let (near, mut far) = tokio::io::duplex(64 << 10);
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut far).await;
                });
                return Some((Ok::<_, std::io::Error>(near), (listener, acceptor)));
            }
        });
        let (svc, mut conns) = ads_service();
        tokio::spawn(Server::builder().add_service(svc).serve_with_incoming(incoming));

        let store = StateStore::new();
        let cfg = XdsConfig {
            tls: Some(client_tls),
            ..config(addr)
        };
        let cfg = XdsConfig {
            address: format!("https://{addr}"),
            ..cfg
        };
        let client = XdsClient::new(cfg, store.clone(), XdsMetrics::default());
        let task = tokio::spawn(client.run());
        let mut conn = next_conn(&mut conns).await;
        assert_initial(&conn.initial().await);
        conn.send(response(
            ADDRESS_TYPE_URL,
            "a1",
            vec![resource(
                W1,
                "1",
                ADDRESS_TYPE_URL,
                workload(W1, &[10, 0, 0, 1]).encode_to_vec(),
            )],
            &[],
        ));
        let ack = conn.request().await;
        assert_eq!(ack.response_nonce, "a1");
        assert!(ack.error_detail.is_none());
        eventually(&store, "workload applied", |s| s.workload(W1).is_some()).await;
        task.abort();
    }

    #[tokio::test]
    async fn https_without_tls_is_a_configuration_error() {
        let cfg = XdsConfig::new("https://127.0.0.1:1", "node-1");
        let client = XdsClient::new(cfg, StateStore::new(), XdsMetrics::default());
        match client.connect().await {
            Err(XdsError::Grpc(GrpcError::Address { address, .. })) => assert_eq!(address, "https://127.0.0.1:1"),
            other => panic!("expected an address error, got {:?}", other.err()),
        }
    }

    #[test]
    fn metrics_are_registered_with_their_names() {
        let mut registry = Registry::default();
        let m = XdsMetrics::register(&mut registry);
        m.connections.inc();
        m.updates.get_or_create(&XdsMetrics::label(ADDRESS_TYPE_URL)).inc();
        m.rejected_resources
            .get_or_create(&XdsMetrics::label(ADDRESS_TYPE_URL))
            .inc();
        m.connected.set(1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for name in [
            "xds_connections_total 1",
            "xds_updates_total{type_url=\"type.googleapis.com/istio.workload.Address\"} 1",
            "xds_rejected_resources_total{type_url=\"type.googleapis.com/istio.workload.Address\"} 1",
            "xds_connected 1",
        ] {
            assert!(text.contains(name), "{name} missing in:\n{text}");
        }
    }
}
