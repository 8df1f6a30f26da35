//! The agent's HTTP API for the CNI plugin, on a unix socket:
//!
//! - `POST /v1/pods/add`: decide enrolment; for an ambient pod install the redirection in its
//!   namespace and hand the namespace to ztunnel; answers `{"captured": bool}`, or an error
//!   (and undoes what it did) so the CNI ADD fails closed. A pod the inventory cannot decide
//!   on yet (its object or its namespace not listed) is waited for, bounded by the plugin's
//!   timeout, then refused: never started uncaptured.
//! - `POST /v1/pods/del`: release the pod (idempotent; 404 when unknown); all or nothing.
//! - `POST /v1/pods/check`: 200 when every part of an enrolled pod is in place (table and
//!   rules, policy rule and route, ztunnel serving it); otherwise names the missing part.
//! - `GET /v1/ready`: 200 once the agent serves.
//!
//! Bodies are at most [`MAX_BODY`] (413 beyond); a failing accept backs off ([`accept_loop`]).
//!
//! ADD, DEL, CHECK and reconciliation of one container run one at a time ([`ContainerLocks`]),
//! each in a task of its own, so a plugin that gives up mid-way cannot cancel one half done.

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::log_limit::LogLimiter;
use mesh_proto::workload::zds::WorkloadInfo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use super::enrol::{decide, Enrolment, PodFacts};
use super::host;
use super::inventory::{InventoryError, InventorySource};
use super::netns::{self, NetnsError, NsId, PodNetns};
use super::pods::Inventory;
use super::report::{EnrolmentReporter, Reported};
use super::rules;
use super::serial::ContainerLocks;
use super::zds::ZdsServer;

/// Longest an ADD waits for the inventory to list its pod and namespace.
const UNDECIDED_WAIT: Duration = Duration::from_secs(5);
/// How often the inventory is read again meanwhile.
const UNDECIDED_POLL: Duration = Duration::from_millis(100);
/// Left of the plugin's timeout for the enrolment itself and the answer.
const REPLY_MARGIN: Duration = Duration::from_millis(600);
/// The plugin's default timeout, for a request that does not carry one.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The first wait before a failed capture or release is retried; doubled after each pass
/// that leaves one pending, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How often one pod's failed enrolment or release is logged at most.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Largest request body read: the plugin's requests are small JSON (ids, a path, names,
/// addresses: well under a KiB), so this leaves a wide margin; a larger one gets 413.
const MAX_BODY: usize = 1024 * 1024;
/// The wait after a failed accept of a plugin connection, doubled while accepts keep
/// failing, up to the second.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The wait before the next retry pass, after `failed` passes in a row left pods pending.
fn retry_delay(failed: u32) -> Duration {
    RETRY_FIRST
        .checked_mul(2u32.saturating_pow(failed))
        .map_or(RETRY_MAX, |d| d.min(RETRY_MAX))
}

/// What a reconciliation pass covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Every known pod, and the node's namespaces scanned for pods that never came through CNI.
    Full,
    /// Every known pod only: a retry of what failed, which the scan has no part in.
    Retry,
}

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
    /// How long the plugin waits for the answer: an undecided ADD gives up before it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl PodRequest {
    /// How long an ADD may wait for the inventory to list the pod.
    fn undecided_wait(&self) -> Duration {
        let plugin = self.timeout_ms.map_or(PLUGIN_TIMEOUT, Duration::from_millis);
        plugin.saturating_sub(REPLY_MARGIN).min(UNDECIDED_WAIT)
    }
}

/// A pod the plugin told us about, and its uid when it is captured.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
struct Known {
    req: PodRequest,
    captured: Option<String>,
    #[serde(default)]
    service_account: String,
    /// Which namespace `req.netns` reached when the pod was seen: its path may reach another
    /// one later (a reused pid), and is only used while it still reaches this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns_id: Option<NsId>,
    /// When it was last captured, in the order of this node's captures (higher is later,
    /// across restarts): of two sandboxes of one pod, the later holds the uid at ztunnel.
    /// 0 in a state file from before it was recorded.
    #[serde(default)]
    seq: u64,
}

/// Why a pod was not enrolled.
#[derive(Debug, thiserror::Error)]
enum EnrolError {
    /// Its namespace is gone, another one now, or the node's: nothing was written.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Writing the rules or the hand-off failed: what was done is undone.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The container id of a pod adopted by [`Agent::adopt_unknown`] (`found:<namespace>/<name>`).
const FOUND: &str = "found:";

/// What reconciling one known pod changes.
enum Change {
    Keep,
    /// As `Keep`, after a capture or release that failed: to be tried again.
    Retry,
    Record(Box<Known>),
    /// As `Record`, for a pod just captured (handed to ztunnel): it gets the next sequence.
    Captured(Box<Known>),
    /// The pod is gone: nothing of it is left to track.
    Forget,
}

/// How a release ended.
#[derive(Debug, PartialEq, Eq)]
enum Released {
    /// The rules were removed from the pod's namespace.
    Removed,
    /// The pod's namespace is gone (or is not the pod's any more): nothing left to remove.
    Gone,
}

/// Where the agent keeps its files and finds the node's sysctls.
#[derive(Clone, Debug)]
pub struct AgentPaths {
    /// Where the known pods are persisted across restarts.
    pub state_file: Option<PathBuf>,
    /// Local mode's enrolment report for the controller.
    pub report_file: Option<PathBuf>,
    /// The sysctl tree pod sysctls are written through ([`rules::install_via`]).
    pub proc_sys: PathBuf,
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
    /// One operation at a time per container.
    serial: ContainerLocks,
    /// Where the known pods are persisted, so an agent restart does not forget them (and a
    /// reconnecting ztunnel does not drop every pod at the next snapshot).
    state_file: Option<PathBuf>,
    /// Local mode's enrolment report: the pods captured on this node, for the controller
    /// (which advertises only those as HBONE). In a cluster the pod annotation says it.
    report_file: Option<PathBuf>,
    /// The sysctl tree each pod's sysctl is written through, from a thread in its namespace.
    proc_sys: Arc<std::path::Path>,
    /// Cluster mode's enrolment report (pod annotations), told of each capture and release.
    reporter: Option<Arc<dyn EnrolmentReporter>>,
    /// What `reporter` was last told, so it hears transitions only.
    reported: std::sync::Mutex<Reported>,
    pub metrics: super::metrics::AgentMetrics,
    /// This node's name: ambient pods of this node that never came through CNI (started
    /// before the mesh) are found by their IP and enrolled. `None` turns that off.
    pub node_name: Option<String>,
    /// The node's network namespace (the agent's own), which never gets pod rules; `None`
    /// when it could not be read, and then no namespace gets them.
    host_netns: Option<NsId>,
    /// Failed enrolments and releases, retried, would log at every pass: by pod uid and kind.
    failures: LogLimiter<(String, &'static str)>,
}

/// Why the inventory cannot decide on `namespace/name` yet: its object or its namespace is
/// not listed (a pod label or the namespace's may say ambient).
fn undecided(inv: &Inventory, namespace: &str, name: &str) -> Option<String> {
    if !inv.pods.contains_key(&(namespace.to_owned(), name.to_owned())) {
        return Some(format!("pod {namespace}/{name} is not in the inventory"));
    }
    if !inv.namespaces.contains_key(namespace) {
        return Some(format!(
            "namespace {namespace} of pod {namespace}/{name} is not in the inventory"
        ));
    }
    None
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

/// Writes `bytes` to `path` readable by the agent alone (0600, also when the file existed):
/// the state names every pod's namespace and identity.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)
}

/// The containers holding the newest capture of each uid in `known` (highest sequence; of
/// equal ones, from a state file without sequences, the first listed).
fn newest_per_uid(known: &[Known]) -> std::collections::HashSet<String> {
    let mut newest: HashMap<&str, &Known> = HashMap::new();
    for k in known {
        let Some(uid) = k.captured.as_deref() else { continue };
        match newest.get(uid) {
            Some(held) if held.seq >= k.seq => {}
            _ => drop(newest.insert(uid, k)),
        }
    }
    newest.values().map(|k| k.req.container_id.clone()).collect()
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
        paths: AgentPaths,
        reporter: Option<Arc<dyn EnrolmentReporter>>,
        node_name: Option<String>,
    ) -> Arc<Agent> {
        Arc::new(Agent {
            zds,
            source,
            cluster_id,
            ports: rules::Ports::default(),
            pods: Default::default(),
            serial: ContainerLocks::default(),
            state_file: paths.state_file,
            report_file: paths.report_file,
            proc_sys: paths.proc_sys.into(),
            reporter,
            reported: Default::default(),
            metrics: Default::default(),
            node_name,
            host_netns: netns::host()
                .inspect_err(|e| warn!(error = %e, "cannot identify the node's network namespace; enrolling nothing"))
                .ok(),
            failures: LogLimiter::new(FAILURE_LOG_INTERVAL),
        })
    }

    /// Whether a failure of `kind` for pod `uid` may be logged now: `Some(suppressed)` if so.
    fn may_log(&self, uid: &str, kind: &'static str) -> Option<u64> {
        self.failures.check((uid.to_owned(), kind))
    }

    /// Opens a pod's namespace, checked to be the one `recorded` and not the node's.
    fn open_netns(&self, path: &str, recorded: Option<NsId>) -> Result<PodNetns, NetnsError> {
        netns::open(std::path::Path::new(path), recorded, self.host_netns)
    }

    /// Reloads the pods a previous agent process knew: captured pods whose namespace is still
    /// the one they were enrolled in get their rules re-asserted and are offered to ztunnel in
    /// the next snapshot; the others are forgotten. Call before serving.
    pub async fn restore(&self) -> anyhow::Result<usize> {
        let Some(path) = &self.state_file else { return Ok(0) };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let known: Vec<Known> = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a valid agent state file: {e}", path.display()))?;
        let newest = newest_per_uid(&known);
        let mut pods = self.pods.lock().await;
        for k in known {
            let hand_off = newest.contains(&k.req.container_id);
            if let Some(k) = self.restore_one(k, hand_off).await? {
                pods.insert(k.req.container_id.clone(), k);
            }
        }
        let n = pods.len();
        self.persist(&pods);
        drop(pods);
        Ok(n)
    }

    /// One pod of the state file: `None` when it is to be forgotten. A captured pod gets its
    /// rules back, and is offered to ztunnel when `hand_off` (the newest capture of its uid).
    async fn restore_one(&self, mut k: Known, hand_off: bool) -> anyhow::Result<Option<Known>> {
        let container = k.req.container_id.clone();
        // A state file from before identities were recorded: a pinned path is taken as it
        // is, a process's may reach another process's namespace by now. (One from before
        // cookies were recorded: see the netns module.)
        if k.netns_id.is_none() && netns::held_by_process(std::path::Path::new(&k.req.netns)) {
            warn!(%container, netns = %k.req.netns, "no namespace identity recorded for a process's namespace; forgetting the pod");
            return Ok(None);
        }
        let ns = match self.open_netns(&k.req.netns, k.netns_id) {
            Ok(ns) => ns,
            Err(e) => {
                warn!(%container, error = %e, "pod's namespace gone or unusable while the agent was down; forgetting it");
                return Ok(None);
            }
        };
        k.netns_id = Some(ns.id);
        if let Some(uid) = &k.captured {
            let (ports, proc_sys, ips) = (self.ports, self.proc_sys.clone(), k.req.ips.clone());
            let ns = tokio::task::spawn_blocking(move || {
                rules::install_in(&ns.file, &ns.path, ports, &proc_sys)?;
                host::add_pod_ips(&ips)?;
                anyhow::Ok(ns)
            })
            .await??;
            let info = WorkloadInfo {
                name: k.req.pod_name.clone(),
                namespace: k.req.pod_namespace.clone(),
                service_account: k.service_account.clone(),
            };
            if hand_off {
                self.zds.restore_pod(uid, info, ns.file.into());
            }
        }
        Ok(Some(k))
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
            .and_then(|bytes| write_private(&tmp, &bytes))
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
        let serial = self.serial.lock(&req.container_id).await;
        let (result, response) = self.add_inner(req).await;
        drop(serial);
        self.metrics.outcome(result);
        self.metrics.add_seconds.observe(started.elapsed().as_secs_f64());
        response
    }

    /// The inventory once it lists the pod and its namespace, re-read for at most the
    /// request's wait; an error message when it never does (or cannot be read).
    async fn decidable(&self, req: &PodRequest) -> Result<Arc<Inventory>, (StatusCode, String)> {
        let (ns, name) = (&req.pod_namespace, &req.pod_name);
        let wait = req.undecided_wait();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let inv = self
                .source
                .for_pod(ns, name)
                .await
                .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
            let Some(why) = undecided(&inv, ns, name) else {
                return Ok(inv);
            };
            if tokio::time::Instant::now() + UNDECIDED_POLL > deadline {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "cannot decide whether pod {ns}/{name} is ambient: {why} after {} ms; \
                         refusing the ADD rather than starting the pod outside the mesh",
                        wait.as_millis()
                    ),
                ));
            }
            tokio::time::sleep(UNDECIDED_POLL).await;
        }
    }

    /// ADD under the container's lock: all or nothing.
    async fn add_inner(&self, req: PodRequest) -> (&'static str, Response<Full<Bytes>>) {
        let inv = match self.decidable(&req).await {
            Ok(i) => i,
            // Fail closed: the plugin fails the ADD and the runtime retries it.
            Err((status, why)) => {
                warn!(container = %req.container_id, error = %why, "ADD refused");
                return ("undecided", error(status, why));
            }
        };
        let previous = self.pods.lock().await.get(&req.container_id).cloned();
        let sa = match desired(&inv, &req.pod_namespace, &req.pod_name) {
            Ok(sa) => sa,
            Err(reason) => {
                // A repeated ADD of a pod captured before: out of the mesh now, wholly.
                if let Some(
                    old @ Known {
                        captured: Some(uid), ..
                    },
                ) = &previous
                {
                    if let Err(e) = self.release(uid, old).await {
                        return ("failed", error(StatusCode::INTERNAL_SERVER_ERROR, e));
                    }
                }
                // Enrolled later only while its path still reaches this namespace.
                let netns_id = netns::identify(std::path::Path::new(&req.netns));
                self.record(Known {
                    req,
                    captured: None,
                    service_account: String::new(),
                    netns_id,
                    seq: 0,
                })
                .await;
                return (
                    "skipped",
                    reply(StatusCode::OK, json!({ "captured": false, "reason": reason })),
                );
            }
        };
        let uid = self.uid(&req);
        // The runtime's path of this ADD is the pod's namespace: whatever it reaches now.
        match self.enrol(&uid, sa.clone(), &req, None).await {
            Ok(id) => {
                self.record_captured(Known {
                    req,
                    captured: Some(uid),
                    service_account: sa,
                    netns_id: Some(id),
                    seq: 0,
                })
                .await;
                ("captured", reply(StatusCode::OK, json!({ "captured": true })))
            }
            Err(e) => {
                // enrol undid its part; nothing of the pod is left, so it is not known either.
                self.forget(&req.container_id).await;
                (
                    "failed",
                    error(StatusCode::INTERNAL_SERVER_ERROR, format!("enrolling {uid}: {e}")),
                )
            }
        }
    }

    /// Stores what is now true of a container, and persists it.
    async fn record(&self, known: Known) {
        let mut pods = self.pods.lock().await;
        pods.insert(known.req.container_id.clone(), known);
        self.persist(&pods);
    }

    /// [`Agent::record`] for a container just captured: it gets a sequence above every
    /// known one, the newest hand-off of its uid.
    async fn record_captured(&self, mut known: Known) {
        let mut pods = self.pods.lock().await;
        known.seq = pods.values().map(|k| k.seq).max().unwrap_or(0).saturating_add(1);
        pods.insert(known.req.container_id.clone(), known);
        self.persist(&pods);
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
        // The pod's UID names its cgroup: it tells the pod's namespace from an impostor's.
        let uids: HashMap<std::net::IpAddr, String> = (wanted.iter())
            .map(|(ip, (key, _))| (*ip, inv.pods.get(*key).map(|p| p.meta.uid.clone()).unwrap_or_default()))
            .collect();
        let found = tokio::task::spawn_blocking(move || super::scan::find(&uids))
            .await
            .unwrap_or_default();
        for (ip, others) in &found.impostors {
            let Some(((ns, name), _)) = wanted.get(ip) else {
                continue;
            };
            let netns: Vec<String> = others.iter().map(|o| o.path.display().to_string()).collect();
            warn!(pod = %format!("{ns}/{name}"), %ip, ?netns, "a running pod's IP is held by other network namespaces too; adopting the one in the pod's cgroup");
        }
        for (ip, owners) in &found.ambiguous {
            let Some(((ns, name), _)) = wanted.get(ip) else {
                continue;
            };
            // Fail closed: whichever namespace were adopted, it may be an impostor's.
            let netns: Vec<String> = owners.iter().map(|o| o.path.display().to_string()).collect();
            warn!(pod = %format!("{ns}/{name}"), %ip, ?netns, "a running pod's IP is held by more than one network namespace, not one of them alone in the pod's cgroup; adopting none");
            self.metrics.ambiguous.inc();
        }
        for (ip, owner) in found.owned {
            let Some(((ns, name), sa)) = wanted.get(&ip) else {
                continue;
            };
            let netns = owner.path;
            info!(pod = %format!("{ns}/{name}"), %ip, netns = %netns.display(), "found a running pod that never came through CNI");
            pods.insert(
                format!("{FOUND}{ns}/{name}"),
                Known {
                    req: PodRequest {
                        container_id: format!("{FOUND}{ns}/{name}"),
                        netns: netns.display().to_string(),
                        pod_name: name.clone(),
                        pod_namespace: ns.clone(),
                        ips: vec![ip.to_string()],
                        timeout_ms: None,
                    },
                    captured: None,
                    service_account: sa.clone(),
                    // The namespace the IP was seen in, not whatever the path reaches later.
                    netns_id: Some(owner.id),
                    seq: 0,
                },
            );
        }
    }

    /// Writes the redirection and hands the pod to ztunnel; on failure undoes all of it (the
    /// hand-off too: a lost connection may have delivered the Add). Nothing is written unless
    /// the namespace is the one `recorded` (when known) and not the node's; the identity of
    /// the namespace enrolled is returned, to be recorded.
    async fn enrol(&self, uid: &str, sa: String, req: &PodRequest, recorded: Option<NsId>) -> Result<NsId, EnrolError> {
        let ns = self.open_netns(&req.netns, recorded).inspect_err(|e| {
            if let Some(suppressed) = self.may_log(uid, "netns") {
                warn!(%uid, error = %e, suppressed, "not enrolling the pod");
            }
        })?;
        let ns = Arc::new(ns);
        let result = async {
            let (pod_ns, ports, proc_sys) = (ns.clone(), self.ports, self.proc_sys.clone());
            // libnftables and rtnetlink calls block (briefly): keep them off the async threads.
            let ips = req.ips.clone();
            // Pod rules and the node's probe SNAT set are independent: written at once.
            tokio::task::spawn_blocking(move || {
                std::thread::scope(|scope| {
                    let host = scope.spawn(|| host::add_pod_ips(&ips));
                    let pod =
                        rules::install_in(&pod_ns.file, &pod_ns.path, ports, &proc_sys).map_err(anyhow::Error::from);
                    let host = match host.join() {
                        Ok(r) => r.map_err(anyhow::Error::from),
                        Err(_) => Err(anyhow::anyhow!("probe SNAT thread panicked")),
                    };
                    pod.and(host)
                })
            })
            .await??;
            // The very namespace the rules went into, not whatever the path reaches now.
            let fd: OwnedFd = ns.file.try_clone()?.into();
            let info = WorkloadInfo {
                name: req.pod_name.clone(),
                namespace: req.pod_namespace.clone(),
                service_account: sa,
            };
            self.zds.add_pod(uid, info, fd).await?;
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                info!(%uid, netns = %ns.path.display(), "pod enrolled");
                Ok(ns.id)
            }
            Err(e) => {
                if let Some(suppressed) = self.may_log(uid, "enrol") {
                    warn!(%uid, error = %e, suppressed, "enrolment failed; the pod must not run uncaptured");
                }
                self.zds.del_pod(uid).await;
                let (ips, proc_sys) = (req.ips.clone(), self.proc_sys.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    host::remove_pod_ips(&ips);
                    rules::remove_in(&ns.file, &ns.path, &proc_sys)
                })
                .await;
                Err(e.into())
            }
        }
    }

    /// Takes a pod out of the mesh: ztunnel stops serving it, its rules go. All or nothing:
    /// when the rules cannot be removed the pod is enrolled again, whole, and the error
    /// returned (the caller keeps it captured). A namespace that is gone, or is not the one
    /// the pod was enrolled in (a reused pid), is left alone: the pod is gone.
    async fn release(&self, uid: &str, known: &Known) -> Result<Released, String> {
        self.metrics.releases.inc();
        // A newer sandbox of the same pod (re-created on this node) may hold the uid now: its
        // hand-off and addresses are not this container's to take away.
        let newer = self.newer_holder(uid, known).await;
        if newer.is_none() {
            self.zds.del_pod(uid).await;
        }
        let ips: Vec<String> = (known.req.ips.iter())
            .filter(|ip| !newer.as_ref().is_some_and(|n| n.contains(ip)))
            .cloned()
            .collect();
        let _ = tokio::task::spawn_blocking(move || host::remove_pod_ips(&ips)).await;
        let ns = match self.open_netns(&known.req.netns, known.netns_id) {
            Ok(ns) => ns,
            Err(e) => {
                info!(%uid, reason = %e, "pod released; its namespace is gone, nothing to remove");
                return Ok(Released::Gone);
            }
        };
        let proc_sys = self.proc_sys.clone();
        let removed = tokio::task::spawn_blocking(move || rules::remove_in(&ns.file, &ns.path, &proc_sys))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match removed {
            Ok(()) => {
                info!(%uid, "pod released");
                Ok(Released::Removed)
            }
            Err(e) => {
                if let Some(suppressed) = self.may_log(uid, "remove") {
                    warn!(%uid, error = %e, suppressed, "removing redirection rules failed; enrolling the pod again");
                }
                let sa = known.service_account.clone();
                match self.enrol(uid, sa, &known.req, known.netns_id).await {
                    Ok(_) => Err(format!("releasing {uid}: {e} (the pod stays enrolled)")),
                    Err(again) => Err(format!("releasing {uid}: {e}; enrolling it again: {again}")),
                }
            }
        }
    }

    /// The addresses of another container that holds `uid` captured later than `released`
    /// was, if one does: only that one's hand-off is ztunnel's now (an older one's was
    /// replaced by `released`'s).
    async fn newer_holder(&self, uid: &str, released: &Known) -> Option<Vec<String>> {
        let pods = self.pods.lock().await;
        pods.values()
            .find(|k| {
                k.req.container_id != released.req.container_id
                    && k.captured.as_deref() == Some(uid)
                    && k.seq > released.seq
            })
            .map(|k| k.req.ips.clone())
    }

    async fn del(&self, req: PodRequest) -> Response<Full<Bytes>> {
        let _serial = self.serial.lock(&req.container_id).await;
        let Some(known) = self.pods.lock().await.get(&req.container_id).cloned() else {
            return error(
                StatusCode::NOT_FOUND,
                format!("container {} is not known", req.container_id),
            );
        };
        if let Some(uid) = &known.captured {
            if let Err(e) = self.release(uid, &known).await {
                return error(StatusCode::INTERNAL_SERVER_ERROR, e);
            }
        }
        // Forgotten only once released: an agent killed mid-way re-asserts the pod on restart
        // and the runtime's retried DEL releases it.
        self.forget(&req.container_id).await;
        reply(StatusCode::OK, json!({}))
    }

    /// Re-decides every known pod against the inventory: a namespace that gained the ambient
    /// label gets its running pods captured, one that lost it gets them released. Each pod
    /// under its container's lock.
    pub async fn reconcile(&self) {
        self.reconcile_pass(Pass::Full).await;
    }

    /// [`Agent::reconcile`], with the scan for pods that never came through CNI on a full pass.
    async fn reconcile_pass(&self, pass: Pass) {
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
        let ids: Vec<String> = {
            let mut pods = self.pods.lock().await;
            if pass == Pass::Full {
                self.adopt_unknown(&inv, &mut pods).await;
            }
            pods.keys().cloned().collect()
        };
        let mut pending = 0;
        for id in ids {
            let _serial = self.serial.lock(&id).await;
            // A DEL may have come first.
            let Some(known) = self.pods.lock().await.get(&id).cloned() else {
                continue;
            };
            // Persist each change as it happens: an agent killed mid-way restarts from the truth.
            match self.reconcile_one(&inv, known).await {
                Change::Keep => {}
                Change::Retry => pending += 1,
                Change::Record(known) => self.record(*known).await,
                Change::Captured(known) => self.record_captured(*known).await,
                Change::Forget => self.forget(&id).await,
            }
        }
        self.metrics.pending.set(pending);
    }

    /// Reconciles the known pods again while the last pass left one it could not capture or
    /// release, or a captured pod is unserved (its snapshot Add rejected): without this, a namespace labelled ambient while ztunnel was away left its
    /// running pods unmeshed until some unrelated change. A pass runs when a ztunnel connects
    /// or after [`retry_delay`] (which backs off while passes keep failing), never in a loop:
    /// each failed capture touched a running pod's traffic.
    pub async fn retry_pending(self: Arc<Self>) {
        let mut failed = 0;
        loop {
            tokio::select! {
                () = self.zds.ztunnel_connected() => failed = 0,
                () = tokio::time::sleep(retry_delay(failed)) => {}
            }
            if self.metrics.pending.get() == 0 && !self.zds.unserved() {
                failed = 0;
                continue;
            }
            self.reconcile_pass(Pass::Retry).await;
            failed = if self.metrics.pending.get() > 0 {
                failed.saturating_add(1)
            } else {
                0
            };
        }
    }

    /// Re-decides one known pod (under its container's lock).
    async fn reconcile_one(&self, inv: &Inventory, known: Known) -> Change {
        let key = (known.req.pod_namespace.clone(), known.req.pod_name.clone());
        // A pod adopted from a synced inventory gets no CNI DEL: leaving it is its deletion.
        let adopted_and_deleted = known.req.container_id.starts_with(FOUND) && !inv.pods.contains_key(&key);
        if !inv.pods.contains_key(&key) && !adopted_and_deleted && !self.source.absent_means_gone() {
            return Change::Keep;
        }
        match (&known.captured, desired(inv, &key.0, &key.1)) {
            (None, Ok(sa)) => {
                let uid = self.uid(&known.req);
                // Capturing now would only redirect the running pod's connections to ports
                // nobody listens on until the hand-off fails and is undone: wait for a ztunnel.
                if self.zds.connected() == 0 {
                    debug!(%uid, "no ztunnel connected; capture left pending");
                    return Change::Retry;
                }
                match self.enrol(&uid, sa.clone(), &known.req, known.netns_id).await {
                    Ok(id) => Change::Captured(Box::new(Known {
                        captured: Some(uid),
                        service_account: sa,
                        netns_id: Some(id),
                        ..known
                    })),
                    Err(EnrolError::Netns(e)) if e.gone() => Change::Forget,
                    Err(_) => Change::Retry,
                }
            }
            (Some(uid), Err(reason)) => {
                info!(%uid, reason, "no longer ambient");
                match self.release(uid, &known).await {
                    Ok(Released::Gone) => Change::Forget,
                    Ok(Released::Removed) if adopted_and_deleted => Change::Forget,
                    Ok(Released::Removed) => Change::Record(Box::new(Known {
                        captured: None,
                        ..known
                    })),
                    Err(e) => {
                        if let Some(suppressed) = self.may_log(uid, "release") {
                            warn!(%uid, error = %e, suppressed, "release failed; trying again");
                        }
                        Change::Retry
                    }
                }
            }
            (None, Err(_)) if adopted_and_deleted => Change::Forget,
            // Captured and unserved: treated as a live Add that failed in a retry pass, but
            // kept captured (fail closed) as the pod already runs in the mesh.
            (Some(uid), Ok(_)) => match self.zds.reoffer(uid).await {
                Ok(()) => Change::Keep,
                // The ZDS server logged the rejection.
                Err(e) => {
                    debug!(%uid, error = %e, "pod still unserved; offered again after a back-off");
                    Change::Retry
                }
            },
            _ => Change::Keep,
        }
    }

    /// Forgets a container, and persists that.
    async fn forget(&self, id: &str) {
        let mut pods = self.pods.lock().await;
        if pods.remove(id).is_some() {
            self.persist(&pods);
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

    /// CHECK: every part of an enrolment in place, or an error naming the missing one.
    async fn check(&self, req: PodRequest) -> Response<Full<Bytes>> {
        let _serial = self.serial.lock(&req.container_id).await;
        let Some(known) = self.pods.lock().await.get(&req.container_id).cloned() else {
            return error(
                StatusCode::NOT_FOUND,
                format!("container {} is not known to the node agent", req.container_id),
            );
        };
        let Some(uid) = known.captured else {
            return reply(StatusCode::OK, json!({ "captured": false }));
        };
        if !self.zds.served(&uid) {
            let why = if self.zds.connected() == 0 {
                "no ztunnel is connected"
            } else {
                "no connected ztunnel acknowledged serving it"
            };
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("pod {uid} is not handed to ztunnel: {why}"),
            );
        }
        if let Err(e) = self.open_netns(&known.req.netns, known.netns_id) {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("pod {uid} is not in its namespace: {e}"),
            );
        }
        let (netns, ports) = (PathBuf::from(&known.req.netns), self.ports);
        match tokio::task::spawn_blocking(move || rules::verify(&netns, ports)).await {
            Ok(Ok(())) => reply(StatusCode::OK, json!({ "captured": true })),
            Ok(Err(missing)) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("redirection of pod {uid} incomplete: {missing}"),
            ),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("checking {uid}: {e}")),
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
        let body = match read_body(req.into_body()).await {
            Ok(b) => b,
            Err(e @ BodyError::TooLarge) => return error(StatusCode::PAYLOAD_TOO_LARGE, e),
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        let pod: PodRequest = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")),
        };
        // In a task of its own: a plugin that times out and closes the connection must not
        // cancel an ADD or DEL half done.
        let agent = self.clone();
        let task = tokio::spawn(async move {
            match path.as_str() {
                "/v1/pods/add" => agent.add(pod).await,
                "/v1/pods/del" => agent.del(pod).await,
                "/v1/pods/check" => agent.check(pod).await,
                _ => error(StatusCode::NOT_FOUND, format!("no route {path}")),
            }
        });
        task.await
            .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("request failed: {e}")))
    }

    /// Serves the plugin's requests on `listener`.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        let listener = &listener;
        let accept = || async move { listener.accept().await.map(|(s, _)| s) };
        accept_loop(accept, |stream| {
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
        })
        .await;
    }
}

/// Hands each connection `accept` yields to `handle`. A failed accept (descriptors exhausted,
/// say) is retried after a wait doubling from [`ACCEPT_BACKOFF_FIRST`] to
/// [`ACCEPT_BACKOFF_MAX`] while accepts keep failing: the listener stays readable, and
/// retrying at once would spin a core.
async fn accept_loop<S, F, Fut>(mut accept: F, mut handle: impl FnMut(S))
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        match accept().await {
            Ok(stream) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                handle(stream);
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis(), "CNI socket accept failed");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Why a request body was not read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body larger than {MAX_BODY} bytes; the plugin's requests are small JSON")]
    TooLarge,
    #[error("reading body: {0}")]
    Read(Box<dyn std::error::Error + Send + Sync>),
}

/// The request body, refused once it grows past [`MAX_BODY`] (or says it will).
async fn read_body<B>(body: B) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A `content-length` beyond the limit is refused before any of the body is waited for.
    if usize::try_from(body.size_hint().lower()).map_or(true, |n| n > MAX_BODY) {
        return Err(BodyError::TooLarge);
    }
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(e) => Err(BodyError::Read(e)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::pods::{Meta, Pod};

    #[test]
    fn a_pod_or_namespace_not_listed_is_undecided() {
        let mut inv = Inventory::default();
        let why = undecided(&inv, "shop", "web").expect("pod missing");
        assert!(why.contains("pod shop/web is not in the inventory"), "{why}");
        inv.pods.insert(("shop".into(), "web".into()), Pod::default());
        // As in cluster mode when the namespace GET finds nothing.
        let why = undecided(&inv, "shop", "web").expect("namespace missing");
        assert!(why.contains("namespace shop"), "{why}");
        inv.namespaces.insert("shop".into(), Meta::default());
        assert_eq!(undecided(&inv, "shop", "web"), None);
    }

    #[test]
    fn the_wait_ends_before_the_plugin_gives_up() {
        let req = |timeout_ms| PodRequest {
            container_id: "c".into(),
            netns: String::new(),
            pod_name: "web".into(),
            pod_namespace: "shop".into(),
            ips: vec![],
            timeout_ms,
        };
        assert_eq!(req(None).undecided_wait(), Duration::from_millis(1400));
        assert_eq!(req(Some(4000)).undecided_wait(), Duration::from_millis(3400));
        assert_eq!(req(Some(60_000)).undecided_wait(), UNDECIDED_WAIT);
        assert_eq!(req(Some(100)).undecided_wait(), Duration::ZERO);
    }

    /// A namespace pinned for the test, deleted on drop (also when the test fails).
    struct TestNs(String);

    impl TestNs {
        fn new(prefix: &str) -> Option<TestNs> {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("skipping: needs root");
                return None;
            }
            let name = format!("{prefix}{}", std::process::id());
            let ok = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip netns add {name}");
            Some(TestNs(name))
        }

        fn path(&self) -> String {
            format!("/var/run/netns/{}", self.0)
        }

        fn id(&self) -> NsId {
            netns::identify(std::path::Path::new(&self.path())).unwrap()
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    /// An agent on an empty manifest directory, its state file in `dir`.
    fn agent(dir: &std::path::Path) -> Arc<Agent> {
        agent_via(dir, rules::PROC_SYS.into())
    }

    /// [`agent`], writing pod sysctls through `proc_sys`.
    fn agent_via(dir: &std::path::Path, proc_sys: PathBuf) -> Arc<Agent> {
        Agent::new(
            ZdsServer::new(),
            InventorySource::Dir(crate::agent::dir::ManifestDir::new(dir.join("manifests"))),
            "Kubernetes".into(),
            AgentPaths {
                state_file: Some(dir.join("pods.json")),
                report_file: None,
                proc_sys,
            },
            None,
            None,
        )
    }

    fn known(container_id: &str, netns: String, netns_id: Option<NsId>, captured: bool) -> Known {
        Known {
            req: PodRequest {
                container_id: container_id.into(),
                netns,
                pod_name: "web".into(),
                pod_namespace: "shop".into(),
                // No address: the node's probe SNAT set is not touched.
                ips: vec![],
                timeout_ms: None,
            },
            captured: captured.then(|| "Kubernetes//Pod/shop/web".to_owned()),
            service_account: "web".into(),
            netns_id,
            seq: 0,
        }
    }

    #[tokio::test]
    async fn restore_forgets_a_pod_whose_path_reaches_another_namespace() {
        let Some(ns) = TestNs::new("restore") else { return };
        // The pid behind the recorded path was reused: the path reaches a namespace other
        // than the one the pod was enrolled in, with another inode or (the enrolled one gone,
        // its inode reused) another cookie only.
        let other_inode = NsId {
            ino: ns.id().ino + 1,
            ..ns.id()
        };
        let other_cookie = (ns.id().cookie).map(|c| NsId {
            cookie: Some(c ^ 1),
            ..ns.id()
        });
        for enrolled in std::iter::once(other_inode).chain(other_cookie) {
            let dir = tempfile::tempdir().unwrap();
            let state = vec![known("c1", ns.path(), Some(enrolled), true)];
            std::fs::write(dir.path().join("pods.json"), serde_json::to_vec(&state).unwrap()).unwrap();
            let agent = agent(dir.path());
            assert_eq!(agent.restore().await.unwrap(), 0, "restored {enrolled}");
            assert!(agent.zds.pods().is_empty(), "handed to ztunnel: {:?}", agent.zds.pods());
            assert!(!rules::installed(std::path::Path::new(&ns.path())), "rules installed");
            let persisted = std::fs::read_to_string(dir.path().join("pods.json")).unwrap();
            assert_eq!(persisted, "[]");
        }
    }

    /// A state file from an agent that recorded no cookies: a pod behind a pinned path is
    /// kept and recorded again with its cookie; one behind a process's path is forgotten (its
    /// inode proves nothing once the namespace may be gone), never written to.
    #[tokio::test]
    async fn restore_of_identities_without_cookies_trusts_pinned_paths_only() {
        let Some(ns) = TestNs::new("legacy") else { return };
        if ns.id().cookie.is_none() {
            eprintln!("skipping: a kernel without namespace cookies has only inodes to go by");
            return;
        }
        let holder = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "sleep", "60"])
            .spawn()
            .unwrap();
        let holder = KillOnDrop(holder);
        let held = format!("/proc/{}/ns/net", holder.0.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while netns::identify(std::path::Path::new(&held)) != Some(ns.id()) {
            assert!(
                std::time::Instant::now() < deadline,
                "holder never entered the namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let legacy = NsId {
            cookie: None,
            ..ns.id()
        };
        for (path, kept) in [(held, false), (ns.path(), true)] {
            let dir = tempfile::tempdir().unwrap();
            let state = serde_json::to_string(&vec![known("c1", path.clone(), Some(legacy), false)]).unwrap();
            assert!(!state.contains("cookie"), "{state}");
            std::fs::write(dir.path().join("pods.json"), state).unwrap();
            let agent = agent(dir.path());
            assert_eq!(agent.restore().await.unwrap(), usize::from(kept), "{path}");
            let persisted: Vec<Known> =
                serde_json::from_str(&std::fs::read_to_string(dir.path().join("pods.json")).unwrap()).unwrap();
            let ids: Vec<Option<NsId>> = persisted.iter().map(|k| k.netns_id).collect();
            let want = if kept { vec![Some(ns.id())] } else { vec![] };
            assert_eq!(ids, want, "{path}");
        }
    }

    /// A child process, killed on drop (also when the test fails).
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn retries_back_off_from_5_s_to_5_min() {
        let table = [
            (0, 5),
            (1, 10),
            (2, 20),
            (3, 40),
            (5, 160),
            (6, 300),
            (7, 300),
            (40, 300),
            (u32::MAX, 300),
        ];
        for (failed, secs) in table {
            assert_eq!(
                retry_delay(failed),
                Duration::from_secs(secs),
                "after {failed} failed passes"
            );
        }
    }

    /// A pod re-created on this node, then an agent restart: of the two captured sandboxes the
    /// newer is handed to ztunnel, wherever the state file lists it; the old sandbox's DEL,
    /// arriving after, leaves the pod handed over.
    #[tokio::test]
    async fn the_newer_sandbox_is_restored_and_kept_in_any_order() {
        let (Some(old), Some(new)) = (TestNs::new("oldseq"), TestNs::new("newseq")) else {
            return;
        };
        let uid = "Kubernetes//Pod/shop/web".to_owned();
        let c1 = Known {
            seq: 1,
            ..known("c1", old.path(), Some(old.id()), true)
        };
        let c2 = Known {
            seq: 2,
            ..known("c2", new.path(), Some(new.id()), true)
        };
        for state in [vec![c2.clone(), c1.clone()], vec![c1.clone(), c2.clone()]] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("pods.json"), serde_json::to_vec(&state).unwrap()).unwrap();
            let agent = agent(dir.path());
            assert_eq!(agent.restore().await.unwrap(), 2);
            assert_eq!(
                agent.zds.netns_of(&uid),
                Some(new.id()),
                "the older sandbox offered to ztunnel"
            );
            let response = agent.del(c1.req.clone()).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                agent.zds.netns_of(&uid),
                Some(new.id()),
                "the newer sandbox lost its hand-off"
            );
            assert!(!rules::installed(std::path::Path::new(&old.path())), "old rules left");
            assert!(rules::installed(std::path::Path::new(&new.path())), "new rules removed");
            let _ = agent.del(c2.req.clone()).await;
            assert_eq!(agent.zds.netns_of(&uid), None);
        }
    }

    /// The older of two captured sandboxes does not keep the hand-off when the newer is
    /// released: the uid is ztunnel's to drop.
    #[tokio::test]
    async fn an_older_holder_does_not_keep_the_hand_off() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        let uid = "Kubernetes//Pod/shop/web";
        // Captured in this order (the later capture gets the higher sequence).
        for id in ["c1", "c2"] {
            agent
                .record_captured(known(id, "/nonexistent".into(), None, true))
                .await;
        }
        let get = |id: &'static str| {
            let agent = agent.clone();
            async move { agent.pods.lock().await.get(id).cloned().unwrap() }
        };
        let (c1, c2) = (get("c1").await, get("c2").await);
        assert!(c2.seq > c1.seq, "{} then {}", c1.seq, c2.seq);
        assert_eq!(agent.newer_holder(uid, &c2).await, None, "c1 kept the hand-off");
        assert_eq!(agent.newer_holder(uid, &c1).await, Some(vec![]));
    }

    /// A pod the inventory wants captured while no ztunnel is connected: no capture is tried
    /// (it would break the running pod's connections until undone), and the pod is counted as
    /// pending, for `retry_pending` to capture once a ztunnel connects.
    #[tokio::test]
    async fn a_capture_that_failed_is_left_pending() {
        let Some(ns) = TestNs::new("pending") else { return };
        let dir = tempfile::tempdir().unwrap();
        known_uncaptured_ambient_pod(dir.path(), &ns);
        // The sysctl the capture writes (and its undoing rewrites) lands here: a trace of
        // any capture tried, even one undone since.
        let proc_sys = dir.path().join("sys");
        std::fs::create_dir_all(proc_sys.join("net/ipv4")).unwrap();
        let agent = agent_via(dir.path(), proc_sys.clone());
        agent.restore().await.unwrap();
        for pass in 1..=2 {
            agent.reconcile().await;
            assert_eq!(
                agent.metrics.pending.get(),
                1,
                "pass {pass}: the capture is not pending"
            );
            assert!(
                !rules::installed(std::path::Path::new(&ns.path())),
                "pass {pass}: rules installed"
            );
            assert!(
                !proc_sys.join("net/ipv4/tcp_migrate_req").exists(),
                "pass {pass}: a capture was tried with no ztunnel"
            );
        }
    }

    /// In `dir`, an inventory wanting pod shop/web captured and a state file knowing it
    /// uncaptured, in `ns`.
    fn known_uncaptured_ambient_pod(dir: &std::path::Path, ns: &TestNs) {
        ambient_inventory(dir);
        let state = vec![known("c1", ns.path(), Some(ns.id()), false)];
        std::fs::write(dir.join("pods.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    }

    /// In `dir`, an inventory wanting pod shop/web captured.
    fn ambient_inventory(dir: &std::path::Path) {
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        let inventory = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {serviceAccountName: web, containers: [{name: c, image: x}]}\n";
        std::fs::write(dir.join("manifests/shop.yaml"), inventory).unwrap();
    }

    /// A captured pod whose snapshot Add the ztunnel rejects stays captured and is offered
    /// again by the retry of pending reconciliations once the snapshot is sent, not left
    /// unserved until the next reconnect.
    /// A ztunnel on the agent's ZDS socket at `sock` that acks every request (rejecting the
    /// first Add when `reject_first`) and passes on what it is sent.
    async fn fake_ztunnel(
        sock: &std::path::Path,
        reject_first: bool,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::mpsc::UnboundedReceiver<Option<mesh_proto::workload::zds::workload_request::Payload>>,
    ) {
        use mesh_core::zds::ZdsConn;
        use mesh_proto::workload::zds::{self, WorkloadRequest, WorkloadResponse};
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let conn = ZdsConn::connect(sock).unwrap();
        let hello = zds::ZdsHello {
            version: zds::Version::V1 as i32,
        };
        conn.send(&hello, None).await.unwrap();
        let ztunnel = tokio::spawn(async move {
            let mut adds = 0;
            while let Ok((req, _)) = conn.recv::<WorkloadRequest>().await {
                adds += usize::from(matches!(req.payload, Some(zds::workload_request::Payload::Add(_))));
                let error = if reject_first && adds == 1 { "no room" } else { "" };
                let ack = WorkloadResponse {
                    payload: Some(zds::workload_response::Payload::Ack(zds::Ack { error: error.into() })),
                };
                if conn.send(&ack, None).await.is_err() || tx.send(req.payload).is_err() {
                    break;
                }
            }
        });
        (ztunnel, rx)
    }

    #[tokio::test]
    async fn a_rejected_snapshot_add_is_offered_again() {
        use mesh_core::zds::ZdsListener;
        use mesh_proto::workload::zds::workload_request::Payload;
        let dir = tempfile::tempdir().unwrap();
        ambient_inventory(dir.path());
        let agent = agent(dir.path());
        let uid = "Kubernetes//Pod/shop/web";
        agent
            .record_captured(known("c1", "/nonexistent".into(), None, true))
            .await;
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        agent.zds.restore_pod(uid, WorkloadInfo::default(), netns.into());
        let sock = dir.path().join("zds.sock");
        let server = tokio::spawn(agent.zds.clone().serve(ZdsListener::bind(&sock).unwrap()));
        let retry = tokio::spawn(agent.clone().retry_pending());
        // A ztunnel rejecting the first Add (the snapshot's) and acking the rest.
        let (ztunnel, mut rx) = fake_ztunnel(&sock, true).await;
        let adds = tokio::time::timeout(RETRY_FIRST - Duration::from_secs(1), async {
            let mut adds = 0;
            while let Some(payload) = rx.recv().await {
                adds += usize::from(matches!(payload, Some(Payload::Add(ref a)) if a.uid == uid));
                if adds == 2 {
                    break;
                }
            }
        })
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while !agent.zds.served(uid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let served = agent.zds.served(uid);
        for task in [server, retry, ztunnel] {
            task.abort();
        }
        adds.expect("the rejected snapshot Add was not offered again before the back-off");
        assert!(served, "offered again and acked, yet not served");
        assert_eq!(agent.zds.pods(), vec![uid.to_owned()]);
    }

    /// A capture left pending for want of a ztunnel is done when one connects, not after the
    /// retry's back-off.
    #[tokio::test]
    async fn a_ztunnel_connecting_gets_the_pending_capture() {
        use mesh_core::zds::ZdsListener;
        use mesh_proto::workload::zds::workload_request::Payload;
        let Some(ns) = TestNs::new("zconnect") else { return };
        let dir = tempfile::tempdir().unwrap();
        known_uncaptured_ambient_pod(dir.path(), &ns);
        let agent = agent(dir.path());
        agent.restore().await.unwrap();
        agent.reconcile().await;
        assert_eq!(agent.metrics.pending.get(), 1);
        let sock = dir.path().join("zds.sock");
        let server = tokio::spawn(agent.zds.clone().serve(ZdsListener::bind(&sock).unwrap()));
        let retry = tokio::spawn(agent.clone().retry_pending());
        // A ztunnel acking everything, passing on what it is sent.
        let (ztunnel, mut rx) = fake_ztunnel(&sock, false).await;
        let added = tokio::time::timeout(RETRY_FIRST - Duration::from_secs(1), async {
            while let Some(payload) = rx.recv().await {
                if let Some(Payload::Add(add)) = payload {
                    return Some(add.uid);
                }
            }
            None
        })
        .await;
        for task in [server, retry, ztunnel] {
            task.abort();
        }
        let added = added.expect("no capture before the back-off elapsed");
        assert_eq!(added.as_deref(), Some("Kubernetes//Pod/shop/web"));
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_refused_unread() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let full = |n| Full::new(Bytes::from(vec![b' '; n]));
        assert_eq!(read_body(full(MAX_BODY)).await.unwrap().len(), MAX_BODY);
        assert!(matches!(read_body(full(MAX_BODY + 1)).await, Err(BodyError::TooLarge)));
        // Over the socket: a request announcing more gets 413 before its body is sent; a
        // chunked one once it has sent more (and is not read to its end).
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("cni.sock");
        let server = tokio::spawn(agent(dir.path()).serve(UnixListener::bind(&sock).unwrap()));
        let sized = format!("content-length: {}\r\n\r\n{{", MAX_BODY + 1);
        let chunk = format!("transfer-encoding: chunked\r\n\r\n{:x}\r\n", 2 * MAX_BODY);
        for (head, body) in [(sized, 0), (chunk, 2 * MAX_BODY)] {
            let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
            let (mut rd, mut wr) = stream.into_split();
            let request = format!("POST /v1/pods/add HTTP/1.1\r\nhost: agent\r\n{head}");
            let writer = tokio::spawn(async move {
                wr.write_all(request.as_bytes()).await?;
                wr.write_all(&vec![b' '; body]).await?;
                std::future::pending::<std::io::Result<()>>().await
            });
            let mut answer = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut answer)).await;
            writer.abort();
            let n = n.expect("no answer while the body is pending").unwrap();
            let text = String::from_utf8_lossy(&answer[..n]);
            assert!(text.starts_with("HTTP/1.1 413"), "{text}");
            assert!(text.contains("larger than 1048576 bytes"), "{text}");
        }
        server.abort();
    }

    /// Accepts that keep failing (descriptors exhausted) are retried after a growing wait,
    /// not in a loop spinning a core.
    #[tokio::test]
    async fn a_failing_accept_backs_off() {
        let calls = std::cell::Cell::new(0u32);
        let accept = || {
            calls.set(calls.get() + 1);
            async {
                tokio::task::yield_now().await;
                Err::<(), _>(std::io::Error::from_raw_os_error(nix::libc::EMFILE))
            }
        };
        let ran = tokio::time::timeout(Duration::from_millis(200), accept_loop(accept, |()| {})).await;
        assert!(ran.is_err(), "the loop ends only with its task");
        // Waits of 5, 10, 20, 40, 80 ms: six tries in 200 ms (a loaded machine gets fewer).
        assert!((1..=7).contains(&calls.get()), "{} accepts in 200 ms", calls.get());
    }

    #[tokio::test]
    async fn the_node_namespace_is_never_enrolled() {
        let Some(ns) = TestNs::new("nodens") else { return };
        let dir = tempfile::tempdir().unwrap();
        let mut agent = agent(dir.path());
        // The test's namespace stands for the node's: the real one never risks the rules.
        Arc::get_mut(&mut agent).unwrap().host_netns = Some(ns.id());
        let req = known("c1", ns.path(), None, false).req;
        let e = agent
            .enrol("Kubernetes//Pod/shop/web", "web".into(), &req, None)
            .await
            .unwrap_err();
        assert!(matches!(e, EnrolError::Netns(NetnsError::Host { .. })), "{e}");
        assert!(!rules::installed(std::path::Path::new(&ns.path())), "rules installed");
        // Nor restored from a state file.
        let state = vec![known("c1", ns.path(), Some(ns.id()), true)];
        std::fs::write(dir.path().join("pods.json"), serde_json::to_vec(&state).unwrap()).unwrap();
        assert_eq!(agent.restore().await.unwrap(), 0);
        assert!(!rules::installed(std::path::Path::new(&ns.path())), "rules installed");
        assert!(agent.zds.pods().is_empty());
    }

    #[tokio::test]
    async fn the_state_file_is_readable_by_the_agent_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        // A left-over temporary file keeps no wider mode either.
        std::fs::write(dir.path().join("pods.tmp"), "").unwrap();
        std::fs::set_permissions(dir.path().join("pods.tmp"), std::fs::Permissions::from_mode(0o644)).unwrap();
        agent.persist(&HashMap::new());
        let mode = std::fs::metadata(dir.path().join("pods.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[tokio::test]
    async fn an_adopted_pod_gone_from_the_inventory_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        let agent = agent(dir.path());
        let adopted = known("found:shop/web", "/proc/1/ns/net".into(), None, false);
        agent.record(adopted).await;
        agent.reconcile().await;
        assert!(agent.pods.lock().await.is_empty());
    }
}
