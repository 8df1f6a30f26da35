//! The agent's HTTP API for the CNI plugin, on a unix socket:
//!
//! - `POST /v1/pods/add`: decide enrolment; for an ambient pod install the redirection in its
//!   namespace and hand the namespace to ztunnel; answers `{"captured": bool}`, or an error
//!   (and undoes what it did) so the CNI ADD fails closed.
//! - `POST /v1/pods/del`: release the pod (idempotent; 404 when unknown).
//! - `POST /v1/pods/check`: 200 when an enrolled pod's rules are in place.
//! - `GET /v1/ready`: 200 once the agent serves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_proto::workload::zds::WorkloadInfo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use super::enrol::{decide, Enrolment, PodFacts};
use super::host;
use super::inventory::{InventoryError, InventorySource};
use super::pods::Inventory;
use super::report::{EnrolmentReporter, Reported};
use super::rules;
use super::zds::ZdsServer;

/// A pod request from the plugin.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRequest {
    pub container_id: String,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub ips: Vec<String>,
}

/// A pod the plugin told us about, and its uid when it is captured.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
struct Known {
    req: PodRequest,
    captured: Option<String>,
    #[serde(default)]
    service_account: String,
}

/// The node agent.
pub struct Agent {
    pub zds: Arc<ZdsServer>,
    /// Where pods and namespaces are read from: the manifest directory or the cluster.
    pub source: InventorySource,
    pub cluster_id: String,
    pub ports: rules::Ports,
    /// Every pod seen through CNI on this node, by container id: when a namespace gains or
    /// loses the ambient label, running pods are enrolled or released without a restart.
    pods: tokio::sync::Mutex<HashMap<String, Known>>,
    /// Where the known pods are persisted, so an agent restart does not forget them (and a
    /// reconnecting ztunnel does not drop every pod at the next snapshot).
    state_file: Option<PathBuf>,
    /// Local mode's enrolment report: the pods captured on this node, for the controller
    /// (which advertises only those as HBONE). In a cluster the pod annotation says it.
    report_file: Option<PathBuf>,
    /// Cluster mode's enrolment report (pod annotations), told of each capture and release.
    reporter: Option<Arc<dyn EnrolmentReporter>>,
    /// What `reporter` was last told, so it hears transitions only.
    reported: std::sync::Mutex<Reported>,
    pub metrics: super::metrics::AgentMetrics,
    /// This node's name: ambient pods of this node that never came through CNI (started
    /// before the mesh) are found by their IP and enrolled. `None` turns that off.
    pub node_name: Option<String>,
}

/// What the inventory says about one pod: capture it (with its service account) or why not.
fn desired(inv: &Inventory, ns: &str, name: &str) -> Result<String, &'static str> {
    let pod = inv
        .pods
        .get(&(ns.to_owned(), name.to_owned()))
        .ok_or("pod not found in the inventory")?;
    let facts = PodFacts {
        labels: Some(&pod.meta.labels),
        annotations: Some(&pod.meta.annotations),
        namespace_labels: inv.namespaces.get(ns).map(|n| &n.labels),
        host_network: pod.host_network,
        container_names: &pod.containers,
    };
    match decide(&facts) {
        Enrolment::Capture => Ok(pod.service_account.clone()),
        Enrolment::Skip(reason) => Err(reason),
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": msg.to_string() }))
}

impl Agent {
    pub fn new(
        zds: Arc<ZdsServer>,
        source: InventorySource,
        cluster_id: String,
        state_file: Option<PathBuf>,
        report_file: Option<PathBuf>,
        reporter: Option<Arc<dyn EnrolmentReporter>>,
        node_name: Option<String>,
    ) -> Arc<Agent> {
        Arc::new(Agent {
            zds,
            source,
            cluster_id,
            ports: rules::Ports::default(),
            pods: Default::default(),
            state_file,
            report_file,
            reporter,
            reported: Default::default(),
            metrics: Default::default(),
            node_name,
        })
    }

    /// Reloads the pods a previous agent process knew: captured pods whose namespace still
    /// exists get their rules re-asserted and are offered to ztunnel in the next snapshot.
    /// Call before serving.
    pub async fn restore(&self) -> anyhow::Result<usize> {
        let Some(path) = &self.state_file else { return Ok(0) };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let known: Vec<Known> = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a valid agent state file: {e}", path.display()))?;
        let mut pods = self.pods.lock().await;
        for k in known {
            let netns = PathBuf::from(&k.req.netns);
            if !netns.exists() {
                info!(container = %k.req.container_id, "pod gone while the agent was down; forgetting it");
                continue;
            }
            if let Some(uid) = &k.captured {
                let (path, ports) = (netns.clone(), self.ports);
                let ips = k.req.ips.clone();
                tokio::task::spawn_blocking(move || {
                    rules::install(&path, ports)?;
                    host::add_pod_ips(&ips)
                })
                .await??;
                let info = WorkloadInfo {
                    name: k.req.pod_name.clone(),
                    namespace: k.req.pod_namespace.clone(),
                    service_account: k.service_account.clone(),
                };
                self.zds.restore_pod(uid, info, std::fs::File::open(&netns)?.into());
            }
            pods.insert(k.req.container_id.clone(), k);
        }
        let n = pods.len();
        self.persist(&pods);
        drop(pods);
        Ok(n)
    }

    /// Writes the known pods to the state file and the enrolment report (each atomically:
    /// write then rename), and tells the reporter what changed.
    fn persist(&self, pods: &HashMap<String, Known>) {
        let captured = pods.values().filter(|k| k.captured.is_some()).count();
        self.metrics.enrolled.set(i64::try_from(captured).unwrap_or(i64::MAX));
        if let Some(path) = &self.report_file {
            let mut enrolled: Vec<String> = pods
                .values()
                .filter(|k| k.captured.is_some())
                .map(|k| format!("{}/{}", k.req.pod_namespace, k.req.pod_name))
                .collect();
            enrolled.sort();
            let tmp = path.with_extension("tmp");
            let result = serde_json::to_vec_pretty(&json!({ "enrolled": enrolled }))
                .map_err(std::io::Error::other)
                .and_then(|bytes| std::fs::write(&tmp, bytes))
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = result {
                warn!(file = %path.display(), error = %e, "cannot write the enrolment report");
            }
        }
        if let Some(reporter) = &self.reporter {
            let captured = pods
                .values()
                .filter(|k| k.captured.is_some())
                .map(|k| (k.req.pod_namespace.clone(), k.req.pod_name.clone()))
                .collect();
            let changes = self
                .reported
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .update(captured);
            for ((namespace, name), captured) in changes {
                reporter.report(&namespace, &name, captured);
            }
        }
        let Some(path) = &self.state_file else { return };
        let list: Vec<&Known> = pods.values().collect();
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec(&list)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            warn!(file = %path.display(), error = %e, "cannot persist agent state");
        }
    }

    fn uid(&self, req: &PodRequest) -> String {
        format!("{}//Pod/{}/{}", self.cluster_id, req.pod_namespace, req.pod_name)
    }

    async fn add(&self, req: PodRequest) -> Response<Full<Bytes>> {
        let started = std::time::Instant::now();
        let (result, response) = self.add_inner(req).await;
        self.metrics.outcome(result);
        self.metrics.add_seconds.observe(started.elapsed().as_secs_f64());
        response
    }

    async fn add_inner(&self, req: PodRequest) -> (&'static str, Response<Full<Bytes>>) {
        let inv = match self.source.for_pod(&req.pod_namespace, &req.pod_name).await {
            Ok(i) => i,
            // Fail closed: the plugin fails the ADD and the runtime retries it.
            Err(e) => return ("failed", error(StatusCode::SERVICE_UNAVAILABLE, e)),
        };
        let mut pods = self.pods.lock().await;
        let sa = match desired(&inv, &req.pod_namespace, &req.pod_name) {
            Ok(sa) => sa,
            Err(reason) => {
                pods.insert(
                    req.container_id.clone(),
                    Known {
                        req,
                        captured: None,
                        service_account: String::new(),
                    },
                );
                self.persist(&pods);
                return (
                    "skipped",
                    reply(StatusCode::OK, json!({ "captured": false, "reason": reason })),
                );
            }
        };
        let uid = self.uid(&req);
        match self.enrol(&uid, sa.clone(), &req).await {
            Ok(()) => {
                pods.insert(
                    req.container_id.clone(),
                    Known {
                        req,
                        captured: Some(uid),
                        service_account: sa,
                    },
                );
                self.persist(&pods);
                ("captured", reply(StatusCode::OK, json!({ "captured": true })))
            }
            Err(e) => (
                "failed",
                error(StatusCode::INTERNAL_SERVER_ERROR, format!("enrolling {uid}: {e}")),
            ),
        }
    }

    /// Adds to `pods` the ambient pods of this node that never came through CNI, found by
    /// their IP in the node's network namespaces; the reconcile loop then enrols them.
    async fn adopt_unknown(&self, inv: &Inventory, pods: &mut HashMap<String, Known>) {
        let Some(node) = &self.node_name else { return };
        let seen: std::collections::HashSet<(&str, &str)> = pods
            .values()
            .map(|k| (k.req.pod_namespace.as_str(), k.req.pod_name.as_str()))
            .collect();
        let wanted: HashMap<std::net::IpAddr, (&(String, String), String)> = inv
            .pods
            .iter()
            .filter(|(key, p)| p.node_name == *node && !seen.contains(&(key.0.as_str(), key.1.as_str())))
            .filter_map(|(key, p)| Some((p.ip?, (key, desired(inv, &key.0, &key.1).ok()?))))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let ips: std::collections::HashSet<std::net::IpAddr> = wanted.keys().copied().collect();
        let found = tokio::task::spawn_blocking(move || super::scan::find(&ips))
            .await
            .unwrap_or_default();
        for (ip, netns) in found {
            let Some(((ns, name), sa)) = wanted.get(&ip) else {
                continue;
            };
            info!(pod = %format!("{ns}/{name}"), %ip, netns = %netns.display(), "found a running pod that never came through CNI");
            pods.insert(
                format!("found:{ns}/{name}"),
                Known {
                    req: PodRequest {
                        container_id: format!("found:{ns}/{name}"),
                        netns: netns.display().to_string(),
                        pod_name: name.clone(),
                        pod_namespace: ns.clone(),
                        ips: vec![ip.to_string()],
                    },
                    captured: None,
                    service_account: sa.clone(),
                },
            );
        }
    }

    /// Writes the redirection and hands the pod to ztunnel; undoes the rules on failure.
    async fn enrol(&self, uid: &str, sa: String, req: &PodRequest) -> anyhow::Result<()> {
        let netns = PathBuf::from(&req.netns);
        let result = async {
            let (path, ports) = (netns.clone(), self.ports);
            // nft and ip run as child processes: keep them off the async threads.
            let ips = req.ips.clone();
            // Pod rules and the node's probe SNAT set are independent: written at once.
            tokio::task::spawn_blocking(move || {
                std::thread::scope(|scope| {
                    let host = scope.spawn(|| host::add_pod_ips(&ips));
                    let pod = rules::install(&path, ports).map_err(anyhow::Error::from);
                    let host = match host.join() {
                        Ok(r) => r.map_err(anyhow::Error::from),
                        Err(_) => Err(anyhow::anyhow!("probe SNAT thread panicked")),
                    };
                    pod.and(host)
                })
            })
            .await??;
            let fd: OwnedFd = std::fs::File::open(&netns)?.into();
            let info = WorkloadInfo {
                name: req.pod_name.clone(),
                namespace: req.pod_namespace.clone(),
                service_account: sa,
            };
            self.zds.add_pod(uid, info, fd).await?;
            anyhow::Ok(())
        }
        .await;
        match &result {
            Ok(()) => info!(%uid, netns = %netns.display(), "pod enrolled"),
            Err(e) => {
                warn!(%uid, error = %e, "enrolment failed; the pod must not run uncaptured");
                let ips = req.ips.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    host::remove_pod_ips(&ips);
                    rules::remove(&netns)
                })
                .await;
            }
        }
        result
    }

    /// Takes a pod out of the mesh: ztunnel stops serving it, its rules go.
    async fn release(&self, uid: &str, req: &PodRequest) {
        self.metrics.releases.inc();
        self.zds.del_pod(uid).await;
        let ips = req.ips.clone();
        let _ = tokio::task::spawn_blocking(move || host::remove_pod_ips(&ips)).await;
        let netns = PathBuf::from(&req.netns);
        // The namespace may already be gone: nothing left to remove then.
        if netns.exists() {
            if let Ok(Err(err)) = tokio::task::spawn_blocking(move || rules::remove(&netns)).await {
                warn!(%uid, error = %err, "removing redirection rules failed");
            }
        }
        info!(%uid, "pod released");
    }

    async fn del(&self, req: PodRequest) -> Response<Full<Bytes>> {
        let removed = {
            let mut pods = self.pods.lock().await;
            let removed = pods.remove(&req.container_id);
            self.persist(&pods);
            removed
        };
        let Some(known) = removed else {
            return error(
                StatusCode::NOT_FOUND,
                format!("container {} is not known", req.container_id),
            );
        };
        if let Some(uid) = &known.captured {
            self.release(uid, &known.req).await;
        }
        reply(StatusCode::OK, json!({}))
    }

    /// Re-decides every known pod against the inventory: a namespace that gained the ambient
    /// label gets its running pods captured, one that lost it gets them released.
    pub async fn reconcile(&self) {
        let inv = match self.source.current() {
            Ok(i) => i,
            Err(InventoryError::NotSynced) => {
                debug!("watches not listed yet; reconciling once they are");
                return;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the inventory; keeping enrolments");
                return;
            }
        };
        let mut pods = self.pods.lock().await;
        self.adopt_unknown(&inv, &mut pods).await;
        let ids: Vec<String> = pods.keys().cloned().collect();
        for id in ids {
            let mut changed = false;
            let Some(known) = pods.get_mut(&id) else { continue };
            let key = (known.req.pod_namespace.clone(), known.req.pod_name.clone());
            if !inv.pods.contains_key(&key) && !self.source.absent_means_gone() {
                continue;
            }
            let want = desired(&inv, &key.0, &key.1);
            match (&known.captured, want) {
                (None, Ok(sa)) => {
                    let uid = self.uid(&known.req);
                    if self.enrol(&uid, sa.clone(), &known.req).await.is_ok() {
                        known.captured = Some(uid);
                        known.service_account = sa;
                        changed = true;
                    }
                }
                (Some(uid), Err(reason)) => {
                    info!(%uid, reason, "no longer ambient");
                    self.release(uid, &known.req).await;
                    known.captured = None;
                    changed = true;
                }
                _ => {}
            }
            // Persist each change as it happens: an agent killed mid-way restarts from the truth.
            if changed {
                self.persist(&pods);
            }
        }
    }

    /// Reconciles whenever the inventory changes: the manifest directory's content (checked
    /// every `every`) or, in cluster mode, what the watches deliver.
    pub async fn watch_source(self: Arc<Self>, every: Duration) {
        let mut changes = self.source.changes(every);
        while changes.next().await {
            self.reconcile().await;
        }
    }

    async fn check(&self, req: PodRequest) -> Response<Full<Bytes>> {
        let pods = self.pods.lock().await;
        match pods
            .get(&req.container_id)
            .and_then(|k| k.captured.as_ref().map(|uid| (uid, &k.req.netns)))
        {
            None => reply(StatusCode::OK, json!({ "captured": false })),
            Some((_, netns)) if rules::installed(Path::new(netns)) => {
                reply(StatusCode::OK, json!({ "captured": true }))
            }
            Some((uid, _)) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("redirection rules missing for {uid}"),
            ),
        }
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        if method == Method::GET && path == "/v1/ready" {
            return reply(StatusCode::OK, json!({ "ztunnels": self.zds.connected() }));
        }
        if method != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {path}"));
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
        };
        let pod: PodRequest = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")),
        };
        match path.as_str() {
            "/v1/pods/add" => self.add(pod).await,
            "/v1/pods/del" => self.del(pod).await,
            "/v1/pods/check" => self.check(pod).await,
            _ => error(StatusCode::NOT_FOUND, format!("no route {path}")),
        }
    }

    /// Serves the plugin's requests on `listener`.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "CNI socket accept failed");
                    continue;
                }
            };
            let agent = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let agent = agent.clone();
                    async move { Ok::<_, Infallible>(agent.route(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

/// Serves `/metrics` (Prometheus text) and `/healthz/ready` (200 once the agent serves CNI
/// requests, which it does before this listener starts) on `listener`.
pub async fn serve_metrics(
    agent: Arc<Agent>,
    registry: Arc<prometheus_client::registry::Registry>,
    listener: tokio::net::TcpListener,
) {
    mesh_core::admin_http::serve_forever(listener, move |req: Request<Incoming>| {
        let (agent, registry) = (agent.clone(), registry.clone());
        async move {
            match req.uri().path() {
                "/metrics" | "/stats/prometheus" => {
                    agent
                        .metrics
                        .ztunnels
                        .set(i64::try_from(agent.zds.connected()).unwrap_or(i64::MAX));
                    mesh_core::prometheus::response(&registry, req.headers())
                }
                "/healthz/ready" => reply(StatusCode::OK, json!({ "ztunnels": agent.zds.connected() })),
                _ => error(StatusCode::NOT_FOUND, "not found"),
            }
        }
    })
    .await
}
