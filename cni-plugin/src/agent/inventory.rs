//! Where the agent's [`Inventory`] comes from. Local mode reads the manifest directory's changed
//! files on every use ([`ManifestDir`]) and polls it for changes; cluster mode reads the watches' latest copy, is woken by them,
//! and for an ADD they have not caught up with GETs the pod and its namespace first (an API
//! error fails the ADD: a pod must not start uncaptured because the agent could not look).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::dir::ManifestDir;
use super::k8s::{ClusterInventory, ClusterState, K8sError};
use super::pods::{Inventory, Meta, Pod};

/// How long cluster mode lets a burst of watch events (a relist, many pods starting) gather
/// before one reconcile handles them all.
const COALESCE: Duration = Duration::from_millis(200);

/// Why no inventory could be had.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("reading {}: {source}", dir.display())]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("the pod and namespace watches have not listed yet")]
    NotSynced,
    #[error(transparent)]
    Kubernetes(#[from] K8sError),
}

/// The pods and namespaces the agent decides on.
pub enum InventorySource {
    /// Local mode: the controller's manifest directory.
    Dir(ManifestDir),
    /// Cluster mode: watches of the API server.
    Kubernetes(Arc<ClusterInventory>),
}

impl InventorySource {
    /// The latest inventory. Cluster mode fails with [`InventoryError::NotSynced`] until both
    /// watches have listed, since a partial view would release pods.
    pub fn current(&self) -> Result<Arc<Inventory>, InventoryError> {
        match self {
            InventorySource::Dir(dir) => dir.inventory().map_err(|source| InventoryError::Dir {
                dir: dir.path().to_owned(),
                source,
            }),
            InventorySource::Kubernetes(cluster) => {
                let state = cluster.state();
                if state.synced {
                    Ok(state.inventory)
                } else {
                    Err(InventoryError::NotSynced)
                }
            }
        }
    }

    /// The inventory to decide the ADD of `namespace/name` on: in cluster mode the pod and its
    /// namespace are fetched when the watches do not have them (yet).
    pub async fn for_pod(&self, namespace: &str, name: &str) -> Result<Arc<Inventory>, InventoryError> {
        let cluster = match self {
            InventorySource::Dir(_) => return self.current(),
            InventorySource::Kubernetes(cluster) => cluster,
        };
        let state = cluster.state();
        let (fetch_pod, fetch_namespace) = to_fetch(&state, namespace, name);
        let pod = if fetch_pod {
            Some(cluster.get_pod(namespace, name).await?)
        } else {
            None
        };
        let ns = if fetch_namespace {
            Some(cluster.get_namespace(namespace).await?)
        } else {
            None
        };
        Ok(with_fetched(state.inventory, namespace, name, pod, ns))
    }

    /// Whether a pod missing from the inventory is gone (and released if captured). In the
    /// cluster it may only be newer than the watch; its deletion arrives as a CNI DEL anyway.
    pub fn absent_means_gone(&self) -> bool {
        matches!(self, InventorySource::Dir(_))
    }

    /// Changes to wait on; local mode polls the directory every `every`.
    pub fn changes(&self, every: Duration) -> Changes {
        match self {
            InventorySource::Dir(dir) => Changes(ChangesInner::Dir {
                dir: dir.path().to_owned(),
                every,
                last: None,
            }),
            InventorySource::Kubernetes(cluster) => {
                let mut rx = cluster.subscribe();
                // The watches may have synced before this subscription: reconcile once at start.
                rx.mark_changed();
                Changes(ChangesInner::Kubernetes(rx))
            }
        }
    }
}

/// What a cluster-mode ADD must GET: (the pod, its namespace). Before the watches synced
/// nothing cached can be trusted to be complete.
fn to_fetch(state: &ClusterState, namespace: &str, name: &str) -> (bool, bool) {
    // Not a pod reference (the plugin never sends one): no GET would name an object.
    if namespace.is_empty() || name.is_empty() {
        return (false, false);
    }
    if !state.synced {
        return (true, true);
    }
    let inv = &state.inventory;
    (
        !inv.pods.contains_key(&(namespace.to_owned(), name.to_owned())),
        !inv.namespaces.contains_key(namespace),
    )
}

/// `inventory` with what was fetched: `Some(Some(x))` found, `Some(None)` does not exist,
/// `None` not fetched. The shared copy is only cloned when something was fetched.
fn with_fetched(
    mut inventory: Arc<Inventory>,
    namespace: &str,
    name: &str,
    pod: Option<Option<Pod>>,
    ns: Option<Option<Meta>>,
) -> Arc<Inventory> {
    if pod.is_none() && ns.is_none() {
        return inventory;
    }
    let inv = Arc::make_mut(&mut inventory);
    let key = (namespace.to_owned(), name.to_owned());
    match pod {
        Some(Some(pod)) => drop(inv.pods.insert(key, pod)),
        Some(None) => drop(inv.pods.remove(&key)),
        None => {}
    }
    match ns {
        Some(Some(meta)) => drop(inv.namespaces.insert(namespace.to_owned(), meta)),
        Some(None) => drop(inv.namespaces.remove(namespace)),
        None => {}
    }
    inventory
}

/// A stream of "the inventory may have changed" from [`InventorySource::changes`].
pub struct Changes(ChangesInner);

enum ChangesInner {
    Dir {
        dir: PathBuf,
        every: Duration,
        last: Option<u64>,
    },
    Kubernetes(watch::Receiver<ClusterState>),
}

impl Changes {
    /// Waits for the next change; false once none can come.
    pub async fn next(&mut self) -> bool {
        match &mut self.0 {
            ChangesInner::Dir { dir, every, last } => loop {
                tokio::time::sleep(*every).await;
                let path = dir.clone();
                let digest = tokio::task::spawn_blocking(move || ManifestDir::digest(&path))
                    .await
                    .ok()
                    .flatten();
                // The first reading counts as a change too: whatever changed between the
                // agent's start-up reconcile and now would otherwise go unnoticed (reconciling
                // is idempotent, so an extra pass costs nothing).
                if digest.is_some() && digest != *last {
                    *last = digest;
                    return true;
                }
            },
            ChangesInner::Kubernetes(rx) => {
                if rx.changed().await.is_err() {
                    return false;
                }
                tokio::time::sleep(COALESCE).await;
                rx.borrow_and_update();
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> (String, String) {
        (ns.to_owned(), name.to_owned())
    }

    fn cached() -> ClusterState {
        let mut inv = Inventory::default();
        inv.pods.insert(key("shop", "web"), Pod::default());
        inv.namespaces.insert("shop".to_owned(), Meta::default());
        ClusterState {
            inventory: Arc::new(inv),
            synced: true,
        }
    }

    #[test]
    fn fetches_only_what_the_synced_watches_lack() {
        let state = cached();
        assert_eq!(to_fetch(&state, "shop", "web"), (false, false));
        assert_eq!(to_fetch(&state, "shop", "new"), (true, false));
        assert_eq!(to_fetch(&state, "blog", "new"), (true, true));
        let unsynced = ClusterState { synced: false, ..state };
        assert_eq!(to_fetch(&unsynced, "shop", "web"), (true, true));
        assert_eq!(to_fetch(&unsynced, "", "web"), (false, false));
    }

    #[test]
    fn fetched_objects_complete_a_copy() {
        let shared = cached().inventory;
        // Nothing fetched: the shared copy itself.
        assert!(Arc::ptr_eq(
            &with_fetched(shared.clone(), "shop", "web", None, None),
            &shared
        ));

        let pod = Pod {
            service_account: "api".to_owned(),
            ..Default::default()
        };
        let ns = Meta {
            name: "blog".to_owned(),
            ..Default::default()
        };
        let inv = with_fetched(shared.clone(), "blog", "api", Some(Some(pod)), Some(Some(ns)));
        assert_eq!(inv.pods[&key("blog", "api")].service_account, "api");
        assert_eq!(inv.namespaces["blog"].name, "blog");
        assert!(
            !shared.pods.contains_key(&key("blog", "api")),
            "the watches' copy is untouched"
        );

        // A stale entry the API no longer has is dropped.
        let inv = with_fetched(shared.clone(), "shop", "web", Some(None), None);
        assert!(!inv.pods.contains_key(&key("shop", "web")));
        assert!(inv.namespaces.contains_key("shop"));
    }

    #[test]
    fn local_mode_reads_the_directory_each_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = InventorySource::Dir(ManifestDir::new(dir.path().to_owned()));
        assert!(source.absent_means_gone());
        assert!(source.current().expect("empty").pods.is_empty());
        std::fs::write(
            dir.path().join("pod.yaml"),
            "kind: Pod\nmetadata: {name: web, namespace: shop}\n",
        )
        .expect("write");
        assert!(source.current().expect("loaded").pods.contains_key(&key("shop", "web")));
        let missing = InventorySource::Dir(ManifestDir::new(dir.path().join("missing")));
        match missing.current() {
            Err(e @ InventoryError::Dir { .. }) => assert!(e.to_string().starts_with("reading ")),
            other => panic!("{other:?}"),
        }
    }
}
