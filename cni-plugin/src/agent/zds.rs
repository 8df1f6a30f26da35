//! The ZDS server: the agent listens, ztunnels connect. Each new connection first gets a
//! snapshot of every enrolled pod (an Add carrying the pod's namespace fd), then
//! `SnapshotSent`; afterwards pods are added on the newest ztunnel (during a rolling upgrade
//! the new one takes new pods) and deleted on all. One message is in flight per connection and
//! each is acknowledged; an Add the ztunnel rejects (or cannot receive) fails the enrolment,
//! so the CNI ADD fails and the pod never runs uncaptured. A snapshot Add it rejects leaves the
//! pod captured but unserved, as while no ztunnel is connected (fail closed): the agent's retry
//! of pending reconciliations offers it again ([`ZdsServer::reoffer`]), backing off as for a
//! failed capture. Peers of another uid than root's or the agent's are refused (mesh-core's
//! `zds` module).

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::log_limit::LogLimiter;
use mesh_core::zds::{ZdsConn, ZdsError, ZdsListener};
use mesh_proto::workload::zds::{self, workload_request::Payload, WorkloadRequest, WorkloadResponse};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How long a ztunnel may take to acknowledge one message.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a pod could not be handed over.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EnrolError {
    #[error("no ztunnel is connected to the node agent")]
    NoZtunnel,
    #[error("ztunnel rejected pod {uid}: {reason}")]
    Rejected { uid: String, reason: String },
    #[error("ztunnel connection lost while handing over pod {0}")]
    Lost(String),
}

struct Pod {
    info: zds::WorkloadInfo,
    netns: Arc<OwnedFd>,
}

/// How one request ended.
enum Outcome {
    Acked,
    Rejected(String),
    Lost,
}

struct Job {
    req: WorkloadRequest,
    fd: Option<Arc<OwnedFd>>,
    done: Option<oneshot::Sender<Outcome>>,
}

struct Client {
    id: u64,
    jobs: mpsc::UnboundedSender<Job>,
    /// Pods this ztunnel acknowledged an Add for (and no Del since): what it serves.
    served: HashSet<String>,
    /// Its snapshot is sent: a pod it does not serve now was rejected, not still to come.
    synced: bool,
}

#[derive(Default)]
struct Inner {
    pods: BTreeMap<String, Pod>,
    /// In connection order: the last is the newest.
    clients: Vec<Client>,
}

/// The agent's side of ZDS.
pub struct ZdsServer {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    /// Told of each ztunnel that connects, once its snapshot is sent: the agent's retry of
    /// failed captures (and of rejected snapshot Adds) waits on it rather than capturing (and
    /// undoing) while no ztunnel is there to take the pod.
    connects: tokio::sync::Notify,
    /// A ztunnel that keeps rejecting a pod would otherwise log at every retry.
    rejections: LogLimiter<String>,
    /// A refused peer that keeps connecting would otherwise log at every attempt: by uid.
    refusals: LogLimiter<u32>,
}

/// How often a ztunnel's rejection of one pod is logged at most.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl Default for ZdsServer {
    fn default() -> Self {
        ZdsServer {
            inner: Mutex::default(),
            next_id: AtomicU64::default(),
            connects: tokio::sync::Notify::new(),
            rejections: LogLimiter::new(REJECTION_LOG_INTERVAL),
            refusals: LogLimiter::new(REJECTION_LOG_INTERVAL),
        }
    }
}

/// How the hand-off of pod `uid` ended, as an enrolment's result.
fn handed_over(uid: &str, outcome: Result<Outcome, oneshot::error::RecvError>) -> Result<(), EnrolError> {
    match outcome {
        Ok(Outcome::Acked) => Ok(()),
        Ok(Outcome::Rejected(reason)) => Err(EnrolError::Rejected {
            uid: uid.to_owned(),
            reason,
        }),
        Ok(Outcome::Lost) | Err(_) => Err(EnrolError::Lost(uid.to_owned())),
    }
}

fn add_request(uid: &str, info: &zds::WorkloadInfo) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Add(zds::AddWorkload {
            uid: uid.to_owned(),
            workload_info: Some(info.clone()),
        })),
    }
}

impl ZdsServer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of ztunnels connected.
    pub fn connected(&self) -> usize {
        self.lock().clients.len()
    }

    /// Returns once a ztunnel has connected (and had its snapshot) since the last return (a
    /// connection while no one waits is kept for the next call). For one waiter: the agent's
    /// retry loop.
    pub async fn ztunnel_connected(&self) {
        self.connects.notified().await;
    }

    /// The namespace pod `uid` is offered to ztunnel with, if it is.
    #[cfg(test)]
    pub(crate) fn netns_of(&self, uid: &str) -> Option<super::netns::NsId> {
        let fd = self.lock().pods.get(uid)?.netns.try_clone().ok()?;
        super::netns::NsId::of(&std::fs::File::from(fd)).ok()
    }

    /// Pods currently enrolled.
    pub fn pods(&self) -> Vec<String> {
        self.lock().pods.keys().cloned().collect()
    }

    /// Whether pod `uid` is enrolled and a connected ztunnel acknowledged serving it.
    pub fn served(&self, uid: &str) -> bool {
        let inner = self.lock();
        inner.pods.contains_key(uid) && inner.clients.iter().any(|c| c.served.contains(uid))
    }

    /// Records what client `id` acknowledged, before whoever queued the request hears of it.
    fn acked(&self, id: u64, req: &WorkloadRequest) {
        let mut inner = self.lock();
        let Some(client) = inner.clients.iter_mut().find(|c| c.id == id) else {
            return;
        };
        match &req.payload {
            Some(Payload::Add(add)) => drop(client.served.insert(add.uid.clone())),
            Some(Payload::Del(del)) => drop(client.served.remove(&del.uid)),
            _ => {}
        }
    }

    /// Accepts ztunnel connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: ZdsListener) {
        loop {
            match listener.accept().await {
                Ok(conn) => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(self.clone().client(id, conn));
                }
                Err(ZdsError::PeerRefused { pid, uid, allowed }) => {
                    if let Some(suppressed) = self.refusals.check(uid) {
                        warn!(pid, uid, allowed_uid = allowed, suppressed, "refused a ZDS peer that is neither root nor the agent's uid: it would receive every pod's namespace");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "ZDS accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Hands a pod to the newest ztunnel and remembers it for later snapshots.
    pub async fn add_pod(&self, uid: &str, info: zds::WorkloadInfo, netns: OwnedFd) -> Result<(), EnrolError> {
        let netns = Arc::new(netns);
        let (tx, rx) = oneshot::channel();
        {
            let inner = self.lock();
            let client = inner.clients.last().ok_or(EnrolError::NoZtunnel)?;
            let job = Job {
                req: add_request(uid, &info),
                fd: Some(netns.clone()),
                done: Some(tx),
            };
            client.jobs.send(job).map_err(|_| EnrolError::Lost(uid.to_owned()))?;
        }
        handed_over(uid, rx.await)?;
        self.lock().pods.insert(uid.to_owned(), Pod { info, netns });
        Ok(())
    }

    /// Whether an enrolled pod is served by no ztunnel although the newest has had its
    /// snapshot: a snapshot Add it rejected, for [`ZdsServer::reoffer`].
    pub fn unserved(&self) -> bool {
        let inner = self.lock();
        inner.clients.last().is_some_and(|c| c.synced)
            && (inner.pods.keys()).any(|uid| !inner.clients.iter().any(|c| c.served.contains(uid)))
    }

    /// Offers enrolled pod `uid` again to the newest ztunnel if no ztunnel serves it (its
    /// snapshot Add was rejected), as [`ZdsServer::add_pod`] does. Nothing to do when it is
    /// served, not enrolled, or the newest ztunnel's snapshot (which carries it) is not sent yet.
    pub async fn reoffer(&self, uid: &str) -> Result<(), EnrolError> {
        let rx = {
            let inner = self.lock();
            let Some(pod) = inner.pods.get(uid) else { return Ok(()) };
            let Some(newest) = inner.clients.last().filter(|c| c.synced) else {
                return Ok(());
            };
            if inner.clients.iter().any(|c| c.served.contains(uid)) {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            let job = Job {
                req: add_request(uid, &pod.info),
                fd: Some(pod.netns.clone()),
                done: Some(tx),
            };
            newest.jobs.send(job).map_err(|_| EnrolError::Lost(uid.to_owned()))?;
            rx
        };
        handed_over(uid, rx.await)
    }

    /// Records a pod enrolled by an earlier agent process without sending anything: it goes
    /// out in the snapshot of the next ztunnel that connects.
    pub fn restore_pod(&self, uid: &str, info: zds::WorkloadInfo, netns: OwnedFd) {
        self.lock().pods.insert(
            uid.to_owned(),
            Pod {
                info,
                netns: Arc::new(netns),
            },
        );
    }

    /// Forgets a pod and tells every ztunnel to stop serving it. Unknown pods are fine.
    pub async fn del_pod(&self, uid: &str) {
        let waits: Vec<_> = {
            let mut inner = self.lock();
            inner.pods.remove(uid);
            inner
                .clients
                .iter()
                .filter_map(|c| {
                    let (tx, rx) = oneshot::channel();
                    let req = WorkloadRequest {
                        payload: Some(Payload::Del(zds::DelWorkload { uid: uid.to_owned() })),
                    };
                    c.jobs
                        .send(Job {
                            req,
                            fd: None,
                            done: Some(tx),
                        })
                        .ok()
                        .map(|_| rx)
                })
                .collect()
        };
        for w in waits {
            if let Ok(Outcome::Rejected(reason)) = w.await {
                warn!(%uid, %reason, "ztunnel rejected a DelWorkload");
            }
        }
    }

    async fn client(self: Arc<Self>, id: u64, conn: ZdsConn) {
        match self.clone().session(id, &conn).await {
            Ok(()) => {}
            Err(e) => info!(client = id, error = %e, "ztunnel disconnected"),
        }
        self.lock().clients.retain(|c| c.id != id);
    }

    /// Registers client `id` and takes its snapshot under one lock, so no pod added meanwhile
    /// is missed: later adds queue behind the snapshot.
    fn register(&self, id: u64, jobs: mpsc::UnboundedSender<Job>) -> Vec<Job> {
        let mut inner = self.lock();
        inner.clients.push(Client {
            id,
            jobs,
            served: HashSet::new(),
            synced: false,
        });
        (inner.pods.iter())
            .map(|(uid, p)| Job {
                req: add_request(uid, &p.info),
                fd: Some(p.netns.clone()),
                done: None,
            })
            .chain(std::iter::once(Job {
                req: WorkloadRequest {
                    payload: Some(Payload::SnapshotSent(zds::SnapshotSent {})),
                },
                fd: None,
                done: None,
            }))
            .collect()
    }

    async fn session(self: Arc<Self>, id: u64, conn: &ZdsConn) -> Result<(), ZdsError> {
        let (hello, _) = conn.recv::<zds::ZdsHello>().await?;
        if hello.version != zds::Version::V1 as i32 {
            warn!(
                client = id,
                version = hello.version,
                "ztunnel speaks an unknown ZDS version; trying V1"
            );
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let snapshot = self.register(id, tx);
        info!(
            client = id,
            pods = snapshot.len() - 1,
            "ztunnel connected; sending snapshot"
        );
        for job in snapshot {
            self.exchange(id, conn, job).await?;
        }
        if let Some(client) = self.lock().clients.iter_mut().find(|c| c.id == id) {
            client.synced = true;
        }
        // Once the snapshot is sent: a retry then finds the pods it rejected unserved.
        self.connects.notify_one();
        loop {
            // While idle, watch the connection too, so a ztunnel that left is noticed now and
            // not only when the next pod arrives.
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => self.exchange(id, conn, job).await?,
                    None => return Ok(()),
                },
                unsolicited = conn.recv::<WorkloadResponse>() => {
                    unsolicited?;
                    warn!(client = id, "ignoring an unsolicited ZDS message");
                }
            }
        }
    }
}

impl ZdsServer {
    /// Logs a rejection, at most once a while per pod: a retried capture meets it again.
    fn log_rejection(&self, req: &WorkloadRequest, reason: &str) {
        let uid = match &req.payload {
            Some(Payload::Add(add)) => add.uid.clone(),
            Some(Payload::Del(del)) => del.uid.clone(),
            _ => String::new(),
        };
        if let Some(suppressed) = self.rejections.check(uid.clone()) {
            warn!(%uid, %reason, suppressed, "ztunnel rejected a ZDS request");
        }
    }

    /// Sends one request and waits for its ack; the outcome goes to whoever queued the job.
    async fn exchange(&self, id: u64, conn: &ZdsConn, job: Job) -> Result<(), ZdsError> {
        let Job { req, fd, done } = job;
        let outcome = async {
            conn.send(&req, fd.as_deref().map(|f| f.as_fd())).await?;
            let (resp, _) = tokio::time::timeout(ACK_TIMEOUT, conn.recv::<WorkloadResponse>())
                .await
                .map_err(|_| {
                    ZdsError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no ack from ztunnel"))
                })??;
            Ok::<_, ZdsError>(match resp.payload {
                Some(zds::workload_response::Payload::Ack(a)) if a.error.is_empty() => Outcome::Acked,
                Some(zds::workload_response::Payload::Ack(a)) => Outcome::Rejected(a.error),
                None => Outcome::Rejected("response without ack".to_owned()),
            })
        }
        .await;
        match outcome {
            Ok(result) => {
                match &result {
                    Outcome::Acked => self.acked(id, &req),
                    Outcome::Rejected(reason) => self.log_rejection(&req, reason),
                    Outcome::Lost => {}
                }
                if let Some(done) = done {
                    let _ = done.send(result);
                }
                Ok(())
            }
            Err(e) => {
                if let Some(done) = done {
                    let _ = done.send(Outcome::Lost);
                }
                Err(e)
            }
        }
    }
}
