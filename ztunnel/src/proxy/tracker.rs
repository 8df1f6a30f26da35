//! Live inbound connections and their authorization facts. Whenever the state changes, each is
//! evaluated against the new policies and those now denied are closed. An entry holds what the
//! connection had (its facts, moved in; its workload, shared) and is boxed, so the map's spare
//! capacity costs a pointer per slot: thousands of idle connections each have one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mesh_core::rbac::{evaluate, ConnectionInfo, Decision, Denial};
use mesh_core::state::{StateStore, Workload};
use tokio_util::sync::CancellationToken;
use tracing::info;

struct Tracked {
    info: ConnectionInfo,
    /// The destination as the connection was authorized; looked up again by uid.
    dst: Arc<Workload>,
    cancel: CancellationToken,
}

#[derive(Clone, Default)]
pub struct ConnTracker {
    inner: Arc<Mutex<HashMap<u64, Box<Tracked>>>>,
    next: Arc<AtomicU64>,
}

/// Removes the connection from the tracker when dropped.
pub struct Registration {
    id: u64,
    tracker: ConnTracker,
    pub cancel: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.id);
    }
}

impl ConnTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<Tracked>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, info: ConnectionInfo, dst: Arc<Workload>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.lock().insert(
            id,
            Box::new(Tracked {
                info,
                dst,
                cancel: cancel.clone(),
            }),
        );
        Registration {
            id,
            tracker: self.clone(),
            cancel,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Re-checks every live connection on each state change.
    pub async fn enforce(self, store: Arc<StateStore>) {
        let mut changes = store.subscribe();
        while changes.changed().await.is_ok() {
            let state = store.load();
            for t in self.lock().values() {
                let decision = match state.workload(&t.dst.uid) {
                    Some(w) => evaluate(state.policies_for(w), &t.info),
                    // The destination is gone: nothing authorizes the connection any more.
                    None => Decision::Deny(Denial::NoWorkload),
                };
                if let Decision::Deny(denial) = decision {
                    info!(src = %t.info.src_ip, dst = %t.info.dst, %denial, "closing connection denied by updated policy");
                    t.cancel.cancel();
                }
            }
        }
    }
}
