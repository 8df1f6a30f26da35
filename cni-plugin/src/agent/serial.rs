//! One operation at a time per container: the agent's ADD, DEL, CHECK and reconcile of a
//! container each hold its lock for their whole run, so a DEL never interleaves with an ADD of
//! the same container (which left pods half installed: a table without its route, a ztunnel
//! listener without rules). Other containers proceed in parallel. A lock exists only while
//! someone holds or waits for it, so the map stays as small as the work in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

type Locks = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// The per-container locks.
#[derive(Default)]
pub struct ContainerLocks {
    locks: Locks,
}

/// Held while one container's operation runs; dropping it lets the next one in.
pub struct Serial<'a> {
    locks: &'a Locks,
    id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ContainerLocks {
    /// Waits for the lock of container `id`.
    pub async fn lock(&self, id: &str) -> Serial<'_> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.to_owned())
            .or_default()
            .clone();
        Serial {
            locks: &self.locks,
            id: id.to_owned(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// Containers with an operation running or waiting.
    pub fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Serial<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the map's own reference left: nobody holds or waits for it. (A waiter holds a
        // clone from before it started waiting, so it is never removed under one.)
        if locks.get(&self.id).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_at_a_time_per_container_and_forgotten_when_idle() {
        let locks = Arc::new(ContainerLocks::default());
        let a = locks.lock("a").await;
        // Another container is not held up.
        let b = tokio::time::timeout(Duration::from_secs(1), locks.lock("b"))
            .await
            .expect("b is independent");
        assert_eq!(locks.len(), 2);
        drop(b);
        assert_eq!(locks.len(), 1);

        // A second operation on "a" waits until the first is done.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _held = locks.lock("a").await;
                let _ = tx.send(());
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "the second ran while the first held the lock");
        drop(a);
        waiter.await.expect("waiter");
        assert!(rx.try_recv().is_ok());
        assert!(locks.is_empty(), "idle locks are removed");
    }
}
