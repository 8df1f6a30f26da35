//! In-pod mode: the node agent hands ztunnel each captured pod's network namespace over ZDS,
//! and ztunnel serves that pod with listeners created inside it (15001, 15006, 15008).
//!
//! The session: connect to the agent's socket, send `ZdsHello`, then handle one request at a
//! time and acknowledge each. Until `SnapshotSent`, the agent lists every pod it holds (Add
//! with a namespace fd, or Keep for a pod ztunnel already serves); after it, pods not listed
//! are dropped and ztunnel is ready. Later Adds and Dels follow pods as they come and go. A
//! bad request is answered with an error ack and counted; the session goes on. A pod's DNS
//! proxy expands short names in the namespace of its workload info (the uid as a fallback).

pub mod netns;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::socket::PlainSockets;
use mesh_core::zds::{ZdsConn, ZdsError};
use mesh_proto::workload::zds::{self, workload_request::Payload, WorkloadRequest, WorkloadResponse};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::proxy::local_addrs::{self, LocalAddrs};
use crate::proxy::owner::{self, Owner};
use crate::proxy::{Proxy, Served, Shared};

struct Pod {
    proxy: Arc<Proxy>,
    addrs: HashSet<IpAddr>,
    /// The namespace served ([`netns::identity`]).
    netns: (u64, u64),
}

/// The pods being served, and the union of their addresses.
struct Pods {
    shared: Shared,
    mark: Option<u32>,
    pods: HashMap<String, Pod>,
    all: LocalAddrs,
}

impl Pods {
    fn publish_addresses(&self) {
        self.all
            .set(self.pods.values().flat_map(|p| p.addrs.iter().copied()).collect());
    }

    fn add(&mut self, add: &zds::AddWorkload, netns: Option<OwnedFd>) -> Result<(), String> {
        let uid = add.uid.as_str();
        let netns = netns.ok_or("AddWorkload carried no network namespace fd")?;
        let id = netns::identity(&netns).map_err(|e| format!("pod {uid}: network namespace: {e}"))?;
        if let Some(held) = self.pods.get(uid) {
            if held.netns == id {
                // A re-sent Add (agent restart): the pod is already served.
                return Ok(());
            }
            // The same pod name in a new sandbox (a StatefulSet pod re-created on this node):
            // serve the new namespace, or its traffic would meet no listener.
            info!(%uid, "pod's network namespace changed; replacing its proxy");
            self.remove(uid);
        }
        let netns = Arc::new(netns);
        let addrs = netns::enter(&netns, || local_addrs::read().map_err(std::io::Error::from))
            .map_err(|e| format!("pod {uid}: {e}"))?;
        let sockets = Arc::new(netns::NetnsSockets {
            netns,
            plain: PlainSockets { mark: self.mark },
        });
        let served = Served {
            addrs: LocalAddrs::fixed(addrs.clone()),
            owner: Owner::Pod(owner::Pod {
                uid: uid.to_owned(),
                info: add.workload_info.clone(),
            }),
        };
        let proxy = Proxy::new(&self.shared, sockets.clone(), served);
        proxy
            .start(self.shared.ports)
            .map_err(|e| format!("pod {uid}: {e:#}"))?;
        if let Some(dns) = &self.shared.dns {
            let namespace = dns_namespace(uid, add.workload_info.as_ref());
            let resolver = Arc::new(crate::dns::DnsProxy {
                state: self.shared.state.clone(),
                sockets,
                namespace,
                domain: dns.domain.clone(),
                upstreams: dns.upstreams.clone(),
                limits: crate::dns::Limits::new(self.shared.metrics.clone()),
            });
            if let Err(e) = resolver.start(dns.port, proxy.drain.clone()) {
                // Fail the Add: the agent redirects the pod's DNS here.
                proxy.drain.cancel();
                return Err(format!("pod {uid}: DNS proxy on port {}: {e}", dns.port));
            }
        }
        info!(%uid, addresses = ?addrs, "serving pod");
        self.pods.insert(
            uid.to_owned(),
            Pod {
                proxy,
                addrs,
                netns: id,
            },
        );
        self.publish_addresses();
        Ok(())
    }

    fn remove(&mut self, uid: &str) {
        if let Some(p) = self.pods.remove(uid) {
            info!(%uid, "pod removed; draining its proxy");
            // Stops its listeners and sends GOAWAY on its HBONE connections.
            p.proxy.drain.cancel();
            self.publish_addresses();
        }
    }
}

/// The namespace a pod's short DNS names expand in: the workload info's, else the one in
/// a uid of the form `<cluster>//Pod/<namespace>/<name>` (Istio's agent sends the pod UID,
/// which names none).
fn dns_namespace(uid: &str, info: Option<&zds::WorkloadInfo>) -> Option<String> {
    match info {
        Some(i) if !i.namespace.is_empty() => Some(i.namespace.clone()),
        _ => {
            let mut parts = uid.rsplit('/');
            let (_name, ns) = (parts.next(), parts.next()?);
            (!ns.is_empty()).then(|| ns.to_owned())
        }
    }
}

/// Starts the ZDS client. Returns readiness (true once a snapshot is applied) and the
/// addresses of all pods served.
pub fn start(shared: Shared, path: PathBuf, mark: u32) -> (watch::Receiver<bool>, LocalAddrs) {
    let (ready, ready_rx) = watch::channel(false);
    let all = LocalAddrs::fixed(HashSet::new());
    let pods = Pods {
        shared,
        mark: (mark != 0).then_some(mark),
        pods: HashMap::new(),
        all: all.clone(),
    };
    tokio::spawn(run(pods, path, ready));
    (ready_rx, all)
}

async fn run(mut pods: Pods, path: PathBuf, ready: watch::Sender<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let err = session(&mut pods, &path, &ready, &mut backoff).await;
        // Pods keep being served while the agent is away, but ztunnel is not caught up.
        ready.send_replace(false);
        warn!(path = %path.display(), error = %err, ?backoff, "ZDS session ended; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    pods: &mut Pods,
    path: &std::path::Path,
    ready: &watch::Sender<bool>,
    backoff: &mut Duration,
) -> ZdsError {
    let conn = match ZdsConn::connect(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
    };
    if let Err(e) = conn.send(&hello, None).await {
        return e;
    }
    info!(path = %path.display(), "connected to the node agent");
    *backoff = Duration::from_millis(100);
    // Pods listed in the current snapshot; None once it has been applied.
    let mut snapshot: Option<HashSet<String>> = Some(HashSet::new());
    loop {
        let result = match conn.recv::<WorkloadRequest>().await {
            Ok((req, fd)) => handle(pods, &mut snapshot, ready, req, fd),
            Err(ZdsError::Decode(e)) => Err(format!("undecodable request: {e}")),
            Err(e) => return e,
        };
        if let Err(reason) = &result {
            warn!(%reason, "rejected ZDS request");
            pods.shared
                .metrics
                .refuse(crate::proxy::refusal::Refusal::ZdsRequestRejected);
        }
        let ack = WorkloadResponse {
            payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
                error: result.err().unwrap_or_default(),
            })),
        };
        if let Err(e) = conn.send(&ack, None).await {
            return e;
        }
    }
}

fn handle(
    pods: &mut Pods,
    snapshot: &mut Option<HashSet<String>>,
    ready: &watch::Sender<bool>,
    req: WorkloadRequest,
    fd: Option<OwnedFd>,
) -> Result<(), String> {
    match req.payload {
        Some(Payload::Add(add)) => {
            if add.uid.is_empty() {
                return Err("AddWorkload without uid".into());
            }
            pods.add(&add, fd)?;
            if let Some(s) = snapshot {
                s.insert(add.uid);
            }
            Ok(())
        }
        Some(Payload::Keep(keep)) => {
            if !pods.pods.contains_key(&keep.uid) {
                return Err(format!("KeepWorkload for {}, which is not served", keep.uid));
            }
            match snapshot {
                Some(s) => {
                    s.insert(keep.uid);
                    Ok(())
                }
                None => Err("KeepWorkload outside a snapshot".into()),
            }
        }
        Some(Payload::Del(del)) => {
            pods.remove(&del.uid);
            Ok(())
        }
        Some(Payload::SnapshotSent(_)) => {
            let listed = snapshot.take().ok_or("SnapshotSent twice in one session")?;
            let stale: Vec<String> = pods.pods.keys().filter(|uid| !listed.contains(*uid)).cloned().collect();
            for uid in stale {
                pods.remove(&uid);
            }
            info!(pods = pods.pods.len(), "ZDS snapshot applied");
            ready.send_replace(true);
            Ok(())
        }
        None => Err("request without payload".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_namespace_comes_from_the_workload_info() {
        let info = |ns: &str| zds::WorkloadInfo {
            name: "web-0".into(),
            namespace: ns.into(),
            service_account: "default".into(),
        };
        for (uid, info, want) in [
            ("0b7e5c4a-pod-uid", Some(info("shop")), Some("shop")),
            ("c//Pod/other/web-0", Some(info("shop")), Some("shop")),
            ("c//Pod/shop/web-0", Some(info("")), Some("shop")),
            ("c//Pod/shop/web-0", None, Some("shop")),
            ("0b7e5c4a-pod-uid", None, None),
        ] {
            assert_eq!(dns_namespace(uid, info.as_ref()).as_deref(), want, "{uid}");
        }
    }
}
