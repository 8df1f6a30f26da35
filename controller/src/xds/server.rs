//! The Delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`). Each
//! stream keeps, per type, what the client subscribed to and which version of each resource
//! it has; every new [`Snapshot`] is diffed against that and only differences are sent.
//! A NACK is logged and counted; the rejected version is not re-sent (the client keeps its
//! last good state) until the resource changes again. Callers authenticate with the same
//! bearer tokens as the CA.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::Stream;
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::metrics::XdsMetrics;
use super::snapshot::{Entry, Snapshot, TYPES};
use crate::ca::auth::{bearer_token, Authenticator};

/// Resources per response: bounds the memory one slow client pins during a full push.
const CHUNK: usize = 500;

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// The ADS service; clone per connection is cheap.
#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    auth: Arc<dyn Authenticator>,
    metrics: XdsMetrics,
    nonce: Arc<AtomicU64>,
}

impl AdsServer {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, auth: Arc<dyn Authenticator>, metrics: XdsMetrics) -> Self {
        AdsServer {
            snapshots,
            auth,
            metrics,
            nonce: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

/// What one client holds of one type.
#[derive(Default)]
struct Subscription {
    wildcard: bool,
    names: HashSet<String>,
    /// Name -> version the client has (sent, whether it ACKed or NACKed it). Names are
    /// shared with the snapshot entries: a client's record costs a pointer and a number each.
    has: HashMap<Arc<str>, u64>,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// One stream's state.
struct Session {
    peer: String,
    subs: HashMap<&'static str, Subscription>,
    generation: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    metrics: XdsMetrics,
    nonce: Arc<AtomicU64>,
}

fn known_type(type_url: &str) -> Option<&'static str> {
    TYPES.iter().copied().find(|t| *t == type_url)
}

impl Session {
    /// Sends what differs between the snapshot and what the client has, for `names` of
    /// `type_url` (all names when `None`). Returns false when the client is gone.
    /// With `always`, a response goes out even when empty: the answer to a first subscription
    /// tells the client it holds the current state (ztunnel readiness waits for it).
    async fn push(
        &mut self,
        snapshot: &Snapshot,
        type_url: &'static str,
        names: Option<&BTreeSet<String>>,
        always: bool,
    ) -> bool {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return true;
        };
        let Some(current) = snapshot.types.get(type_url) else {
            return true;
        };
        // Entries to send are collected as pointers; the per-client copies are made one
        // chunk at a time, so a full push pins at most a chunk per client.
        let mut send: Vec<Arc<Entry>> = Vec::new();
        let mut removed = Vec::new();
        let mut consider = |name: &str, sub: &mut Subscription| {
            if !sub.wants(name) {
                return;
            }
            match current.get(name) {
                Some(e) if sub.has.get(name) != Some(&e.version) => {
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
                let gone: Vec<Arc<str>> = sub
                    .has
                    .keys()
                    .filter(|k| !current.contains_key(&***k))
                    .cloned()
                    .collect();
                current.keys().for_each(|n| consider(n, sub));
                gone.iter().for_each(|n| consider(n, sub));
            }
        }
        if send.is_empty() && removed.is_empty() && !always {
            return true;
        }
        let count = send.len() + removed.len();
        let chunks = send.len().div_ceil(CHUNK).max(1);
        for i in 0..chunks {
            let part = &send[(i * CHUNK).min(send.len())..((i + 1) * CHUNK).min(send.len())];
            let resources: Vec<Resource> = part.iter().map(|e| e.resource.clone()).collect();
            let response = DeltaDiscoveryResponse {
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
            if self.tx.send(Ok(response)).await.is_err() {
                return false;
            }
        }
        self.metrics.pushed(type_url, count, snapshot.since);
        tracing::debug!(peer = %self.peer, type_url, count, generation = snapshot.generation, "pushed");
        true
    }

    /// Handles one request; returns the names to push, or `None` for a plain ACK/NACK.
    fn request(&mut self, req: DeltaDiscoveryRequest) -> Option<(&'static str, Option<BTreeSet<String>>, bool)> {
        let Some(type_url) = known_type(&req.type_url) else {
            tracing::warn!(peer = %self.peer, type_url = %req.type_url, "subscription to an unknown type ignored");
            return None;
        };
        if let Some(err) = &req.error_detail {
            self.metrics.nack(type_url);
            tracing::warn!(peer = %self.peer, type_url, nonce = %req.response_nonce, code = err.code, message = %err.message, "client rejected resources (NACK); not resending them until they change");
        }
        let first = !self.subs.contains_key(type_url);
        let sub = self.subs.entry(type_url).or_default();
        if first {
            // Legacy wildcard: a first request without names subscribes to everything.
            sub.wildcard = req.resource_names_subscribe.is_empty();
            // A version we cannot read is one we never sent: it will not match, so it is resent.
            sub.has = req
                .initial_resource_versions
                .into_iter()
                .map(|(n, v)| (Arc::from(n.as_str()), u64::from_str_radix(&v, 16).unwrap_or(u64::MAX)))
                .collect();
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
        if first || (sub.wildcard && !fresh.is_empty()) {
            Some((type_url, None, first))
        } else if !fresh.is_empty() {
            Some((type_url, Some(fresh), false))
        } else {
            None
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let token = bearer_token(request.metadata()).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let caller = self.auth.authenticate(token).await.map_err(|e| {
            self.metrics.refused();
            Status::unauthenticated(format!("xDS: {e}"))
        })?;
        let remote = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let mut session = Session {
            peer: format!("{caller} ({remote})"),
            subs: HashMap::new(),
            generation: 0,
            tx,
            metrics: self.metrics.clone(),
            nonce: self.nonce.clone(),
        };
        let mut snapshots = self.snapshots.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            metrics.connected(1);
            tracing::info!(peer = %session.peer, "xDS client connected");
            loop {
                tokio::select! {
                    msg = inbound.message() => {
                        let req = match msg {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(peer = %session.peer, error = %e, "xDS stream ended");
                                break;
                            }
                        };
                        if let Some(node) = &req.node {
                            if !node.id.is_empty() && !session.peer.contains(&node.id) {
                                session.peer = format!("{} node={}", session.peer, node.id);
                            }
                        }
                        if let Some((type_url, names, first)) = session.request(req) {
                            let snapshot = snapshots.borrow_and_update().clone();
                            session.generation = snapshot.generation;
                            if !session.push(&snapshot, type_url, names.as_ref(), first).await {
                                break;
                            }
                        }
                    }
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let snapshot = snapshots.borrow_and_update().clone();
                        // Caught up: only what changed; lagging: a full diff.
                        let incremental = snapshot.generation == session.generation + 1;
                        session.generation = snapshot.generation;
                        let mut alive = true;
                        for type_url in TYPES {
                            let names = incremental.then(|| snapshot.changed.get(type_url)).flatten();
                            if incremental && names.is_none_or(|n| n.is_empty()) {
                                continue;
                            }
                            alive = session.push(&snapshot, type_url, names, false).await;
                            if !alive {
                                break;
                            }
                        }
                        if !alive {
                            break;
                        }
                    }
                }
            }
            metrics.connected(-1);
            tracing::info!(peer = %session.peer, "xDS client disconnected");
        });
        let out = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(out)))
    }
}
