//! Live inbound connections and their authorization facts. Whenever the state changes, each is
//! evaluated against the new policies and those now denied are closed. An entry holds what the
//! connection had (its facts, moved in; its workload, shared) and is shared with the
//! connection's task, so the map's spare capacity costs a pointer per slot: thousands of idle
//! connections each have one. The entry is also the connection's revocation signal (a flag
//! and the task's waker): a cancellation token per connection cost a 112-byte tree node, and
//! waiting on it 72 bytes of every idle connection's task.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::task::AtomicWaker;

use mesh_core::rbac::{evaluate, ConnectionInfo, Decision, Denial};
use mesh_core::state::{State, StateStore, Workload};
use tracing::info;

struct Tracked {
    info: ConnectionInfo,
    /// The destination as the connection was authorized; looked up again by uid.
    dst: Arc<Workload>,
    revoked: AtomicBool,
    /// The connection's task, waiting in [`Registration::revoked`].
    waker: AtomicWaker,
}

impl Tracked {
    /// Why `state` no longer authorizes the connection, if it does not.
    fn denial(&self, state: &State) -> Option<Denial> {
        let decision = match state.workload(&self.dst.uid) {
            Some(w) => evaluate(state.policies_for(w), &self.info),
            // The destination is gone: nothing authorizes the connection any more.
            None => Decision::Deny(Denial::NoWorkload),
        };
        match decision {
            Decision::Deny(denial) => Some(denial),
            Decision::Allow => None,
        }
    }

    fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.waker.wake();
    }
}

#[derive(Clone, Default)]
pub struct ConnTracker {
    inner: Arc<Mutex<HashMap<u64, Arc<Tracked>>>>,
    next: Arc<AtomicU64>,
}

/// Removes the connection from the tracker when dropped.
pub struct Registration {
    id: u64,
    tracker: ConnTracker,
    entry: Arc<Tracked>,
}

impl Registration {
    /// Why `state` denies the connection, if it does: for a state that changed between the
    /// connection's authorization and its registration, which the tracker did not see.
    pub fn denial(&self, state: &State) -> Option<Denial> {
        self.entry.denial(state)
    }

    /// Completes once an updated policy denies the connection.
    pub async fn revoked(&self) {
        poll_fn(|cx| {
            if self.entry.revoked.load(Ordering::Acquire) {
                return std::task::Poll::Ready(());
            }
            self.entry.waker.register(cx.waker());
            // Again after registering: a revocation in between woke no one.
            if self.entry.revoked.load(Ordering::Acquire) {
                return std::task::Poll::Ready(());
            }
            std::task::Poll::Pending
        })
        .await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.id);
    }
}

impl ConnTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, info: ConnectionInfo, dst: Arc<Workload>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Tracked {
            info,
            dst,
            revoked: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        self.lock().insert(id, entry.clone());
        Registration {
            id,
            tracker: self.clone(),
            entry,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Re-checks every live connection on each state change after this call (subscribed
    /// before the future is first polled, so no change in between is missed).
    pub fn enforce(self, store: Arc<StateStore>) -> impl std::future::Future<Output = ()> {
        let changes = store.subscribe();
        self.enforce_changes(store, changes)
    }

    async fn enforce_changes(self, store: Arc<StateStore>, mut changes: tokio::sync::watch::Receiver<u64>) {
        while changes.changed().await.is_ok() {
            let state = store.load();
            for t in self.lock().values() {
                if let Some(denial) = t.denial(&state) {
                    info!(src = %t.info.src_ip, dst = %t.info.dst, %denial, "closing connection denied by updated policy");
                    t.revoke();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use mesh_core::identity::Identity;
    use mesh_core::state::Tunnel;

    use super::*;

    fn workload(name: &str, ip: &str) -> Workload {
        Workload {
            uid: format!("c//Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            addresses: vec![ip.parse().expect("ip")],
            network: String::new(),
            tunnel: Tunnel::Hbone,
            identity: Identity::new("", "default", name).expect("identity"),
            waypoint: None,
            node: "n".into(),
            canonical_name: name.into(),
            canonical_revision: "v1".into(),
            workload_name: name.into(),
            services: vec![],
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
        }
    }

    fn info(dst: &str) -> ConnectionInfo {
        ConnectionInfo {
            src_identity: None,
            src_ip: "10.0.0.9".parse().expect("ip"),
            dst: dst.parse().expect("addr"),
        }
    }

    /// A connection whose destination left the state is revoked (its task woken, the signal
    /// kept for the next poll); another stays, and a dropped registration leaves the tracker.
    #[tokio::test]
    async fn a_state_change_revokes_only_what_it_denies() {
        let store = StateStore::new();
        let (a, b) = (Arc::new(workload("a", "10.0.0.1")), Arc::new(workload("b", "10.0.0.2")));
        store.update(|s| {
            s.upsert_workload((*a).clone());
            s.upsert_workload((*b).clone());
        });
        let tracker = ConnTracker::default();
        let to_a = tracker.register(info("10.0.0.1:80"), a);
        let to_b = tracker.register(info("10.0.0.2:80"), b);
        let enforcing = tokio::spawn(tracker.clone().enforce(store.clone()));

        let mut waiting_a = Box::pin(to_a.revoked());
        let mut waiting_b = Box::pin(to_b.revoked());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiting_a.as_mut().poll(&mut cx).is_pending());
        assert!(waiting_b.as_mut().poll(&mut cx).is_pending());

        store.update(|s| s.remove_workload("c//Pod/default/a"));
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting_a)
            .await
            .expect("the connection to the removed workload is revoked");
        assert_eq!(Poll::Ready(()), Box::pin(to_a.revoked()).as_mut().poll(&mut cx));
        assert!(waiting_b.as_mut().poll(&mut cx).is_pending());

        assert_eq!(tracker.len(), 2);
        drop(to_a);
        assert_eq!(tracker.len(), 1);
        enforcing.abort();
    }

    /// What a connection registered after a state change checks itself against.
    #[test]
    fn a_registration_answers_for_a_state_it_did_not_see() {
        let store = StateStore::new();
        let a = Arc::new(workload("a", "10.0.0.1"));
        store.update(|s| s.upsert_workload((*a).clone()));
        let tracker = ConnTracker::default();
        let to_a = tracker.register(info("10.0.0.1:80"), a);
        assert_eq!(to_a.denial(&store.load()), None);
        store.update(|s| s.remove_workload("c//Pod/default/a"));
        assert_eq!(to_a.denial(&store.load()), Some(Denial::NoWorkload));
    }
}
