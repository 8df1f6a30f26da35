//! Cluster mode's link to the API server, kept thin on purpose: watches of all Namespaces and of
//! the Pods scheduled on this node, turned by pure functions ([`namespace_from`], [`pod_from`])
//! into the agent's own [`Meta`]/[`Pod`] and published as a [`ClusterState`] the agent reads and
//! is woken by; single GETs for a pod the watch has not delivered yet; and
//! [`AnnotationReporter`], which marks captured pods with [`REDIRECTION_ANNOTATION`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::pods::{Inventory, Meta, Pod};
use super::report::{EnrolmentReporter, PodKey};

/// The pod annotation that says the agent captured the pod (Istio's name for it).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
const REDIRECTION_ENABLED: &str = "enabled";
/// Tries per annotation patch before giving up (the next transition of the pod reports again).
const PATCH_ATTEMPTS: u64 = 3;

/// A failed call to the API server.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("getting {what} from the API server: {source}")]
    Get { what: String, source: kube::Error },
    #[error("patching pod {namespace}/{name}: {source}")]
    Patch {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// What the watches have delivered so far.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub inventory: Arc<Inventory>,
    /// Both watches have listed once. Until then a pod or namespace missing from `inventory`
    /// may well exist, so nothing may be released for its absence.
    pub synced: bool,
}

/// The cluster as this node's agent sees it, kept current by [`ClusterInventory::run`].
pub struct ClusterInventory {
    client: Client,
    state: watch::Sender<ClusterState>,
}

impl ClusterInventory {
    pub fn new(client: Client) -> Arc<ClusterInventory> {
        Arc::new(ClusterInventory {
            client,
            state: watch::Sender::new(ClusterState::default()),
        })
    }

    /// The latest state (cheap: the inventory is shared).
    pub fn state(&self) -> ClusterState {
        self.state.borrow().clone()
    }

    /// A receiver woken whenever the inventory or its sync status changes.
    pub fn subscribe(&self) -> watch::Receiver<ClusterState> {
        self.state.subscribe()
    }

    /// One pod by a direct GET; `None` when it does not exist.
    pub async fn get_pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, K8sError> {
        let pod = Api::<K8sPod>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|source| K8sError::Get {
                what: format!("pod {namespace}/{name}"),
                source,
            })?;
        Ok(pod.and_then(pod_from).map(|(_, pod)| pod))
    }

    /// One namespace by a direct GET; `None` when it does not exist.
    pub async fn get_namespace(&self, name: &str) -> Result<Option<Meta>, K8sError> {
        let ns = Api::<K8sNamespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(|source| K8sError::Get {
                what: format!("namespace {name}"),
                source,
            })?;
        Ok(ns.and_then(namespace_from).map(|(_, meta)| meta))
    }

    /// Watches all namespaces and the pods of `node` for as long as the process runs. Watch
    /// errors are logged and retried with backoff.
    pub async fn run(self: Arc<Self>, node: String) {
        let namespaces = watcher(
            Api::<K8sNamespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .filter_map(|e| futures_util::future::ready(convert("namespaces", e, namespace_from).map(Update::Namespace)))
        .boxed();
        // Only this node's pods: the agent never acts on others, and a node sees few.
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let pods = watcher(Api::<K8sPod>::all(self.client.clone()), config)
            .default_backoff()
            .filter_map(|e| futures_util::future::ready(convert("pods", e, pod_from).map(Update::Pod)))
            .boxed();
        let mut updates = stream::select(namespaces, pods);
        let mut watches = Watches::default();
        while let Some(update) = updates.next().await {
            self.state.send_if_modified(|state| watches.apply(state, update));
        }
    }
}

/// The agent's fields of an object's metadata; `None` without a name.
fn meta_from(m: ObjectMeta) -> Option<Meta> {
    Some(Meta {
        name: m.name?,
        namespace: m.namespace.unwrap_or_default(),
        uid: m.uid.unwrap_or_default(),
        labels: m.labels.unwrap_or_default(),
        annotations: m.annotations.unwrap_or_default(),
    })
}

/// A Namespace as the agent keeps it, by name.
pub fn namespace_from(ns: K8sNamespace) -> Option<(String, Meta)> {
    let meta = meta_from(ns.metadata)?;
    Some((meta.name.clone(), meta))
}

/// A Pod as the agent keeps it, by namespace/name; the same defaults as local mode.
pub fn pod_from(pod: K8sPod) -> Option<(PodKey, Pod)> {
    let meta = meta_from(pod.metadata)?;
    if meta.namespace.is_empty() {
        return None;
    }
    let spec = pod.spec.unwrap_or_default();
    let pod = Pod {
        host_network: spec.host_network.unwrap_or(false),
        service_account: spec
            .service_account_name
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        containers: spec.containers.into_iter().map(|c| c.name).collect(),
        node_name: spec.node_name.unwrap_or_default(),
        ip: pod.status.and_then(|s| s.pod_ip).and_then(|ip| ip.parse().ok()),
        meta,
    };
    Some(((pod.meta.namespace.clone(), pod.meta.name.clone()), pod))
}

/// One watch event in the agent's types.
#[derive(Debug)]
enum Event<K, V> {
    Init,
    InitApply(K, V),
    InitDone,
    Apply(K, V),
    Delete(K),
}

#[derive(Debug)]
enum Update {
    Namespace(Event<String, Meta>),
    Pod(Event<PodKey, Pod>),
}

/// Converts a watcher event with `from`; errors are logged (the watcher retries) and objects
/// without a name dropped.
fn convert<T, K, V>(
    what: &str,
    event: Result<watcher::Event<T>, watcher::Error>,
    from: fn(T) -> Option<(K, V)>,
) -> Option<Event<K, V>> {
    match event {
        Ok(watcher::Event::Init) => Some(Event::Init),
        Ok(watcher::Event::InitApply(o)) => from(o).map(|(k, v)| Event::InitApply(k, v)),
        Ok(watcher::Event::InitDone) => Some(Event::InitDone),
        Ok(watcher::Event::Apply(o)) => from(o).map(|(k, v)| Event::Apply(k, v)),
        Ok(watcher::Event::Delete(o)) => from(o).map(|(k, _)| Event::Delete(k)),
        Err(e) => {
            warn!(watch = what, error = %e, "watch failed, retrying");
            None
        }
    }
}

/// A change to one map of the inventory.
#[derive(Debug)]
enum Edit<K, V> {
    Replace(BTreeMap<K, V>),
    Insert(K, V),
    Remove(K),
}

impl<K: Ord, V: PartialEq> Edit<K, V> {
    fn changes(&self, map: &BTreeMap<K, V>) -> bool {
        match self {
            Edit::Replace(new) => new != map,
            Edit::Insert(k, v) => map.get(k) != Some(v),
            Edit::Remove(k) => map.contains_key(k),
        }
    }

    fn apply(self, map: &mut BTreeMap<K, V>) {
        match self {
            Edit::Replace(new) => *map = new,
            Edit::Insert(k, v) => drop(map.insert(k, v)),
            Edit::Remove(k) => drop(map.remove(&k)),
        }
    }
}

/// One watch's list in progress, and whether it completed once.
#[derive(Debug)]
struct Listing<K, V> {
    buffer: Option<BTreeMap<K, V>>,
    listed: bool,
}

impl<K, V> Default for Listing<K, V> {
    fn default() -> Self {
        Listing {
            buffer: None,
            listed: false,
        }
    }
}

impl<K: Ord, V> Listing<K, V> {
    /// A (re)list is buffered and replaces the map whole once done, so objects deleted while
    /// the watch was down disappear.
    fn handle(&mut self, event: Event<K, V>) -> Option<Edit<K, V>> {
        match event {
            Event::Init => {
                self.buffer = Some(BTreeMap::new());
                None
            }
            Event::InitApply(k, v) => {
                self.buffer.get_or_insert_with(BTreeMap::new).insert(k, v);
                None
            }
            Event::InitDone => {
                self.listed = true;
                Some(Edit::Replace(self.buffer.take().unwrap_or_default()))
            }
            Event::Apply(k, v) => Some(Edit::Insert(k, v)),
            Event::Delete(k) => Some(Edit::Remove(k)),
        }
    }
}

/// Both watches' progress.
#[derive(Debug, Default)]
struct Watches {
    namespaces: Listing<String, Meta>,
    pods: Listing<PodKey, Pod>,
}

impl Watches {
    /// Applies one update to `state`; true when what the agent sees changed (so it is woken).
    fn apply(&mut self, state: &mut ClusterState, update: Update) -> bool {
        // Each edit is checked against the shared copy first: readers may hold it, and
        // copying the inventory for a no-op (a pod status tick) would be wasted.
        let changed = match update {
            Update::Namespace(event) => match self.namespaces.handle(event) {
                Some(edit) if edit.changes(&state.inventory.namespaces) => {
                    edit.apply(&mut Arc::make_mut(&mut state.inventory).namespaces);
                    true
                }
                _ => false,
            },
            Update::Pod(event) => match self.pods.handle(event) {
                Some(edit) if edit.changes(&state.inventory.pods) => {
                    edit.apply(&mut Arc::make_mut(&mut state.inventory).pods);
                    true
                }
                _ => false,
            },
        };
        let synced = self.namespaces.listed && self.pods.listed;
        if synced && !state.synced {
            info!(
                namespaces = state.inventory.namespaces.len(),
                pods = state.inventory.pods.len(),
                "listed all namespaces and this node's pods"
            );
        }
        let flipped = synced != state.synced;
        state.synced = synced;
        changed || flipped
    }
}

/// The JSON merge patch that marks a pod captured, or releases it (null deletes the key).
pub fn redirection_patch(captured: bool) -> Value {
    let value = if captured {
        Value::from(REDIRECTION_ENABLED)
    } else {
        Value::Null
    };
    json!({ "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } } })
}

/// Reports enrolment by annotating pods. Patches are sent in order by one task, so a pod
/// captured then quickly released ends without the annotation.
pub struct AnnotationReporter {
    queue: mpsc::UnboundedSender<(PodKey, bool)>,
}

impl AnnotationReporter {
    /// Starts the patching task (needs a Tokio runtime).
    pub fn start(client: Client) -> Arc<AnnotationReporter> {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_patches(client, rx));
        Arc::new(AnnotationReporter { queue })
    }
}

impl EnrolmentReporter for AnnotationReporter {
    fn report(&self, namespace: &str, name: &str, captured: bool) {
        if self
            .queue
            .send(((namespace.to_owned(), name.to_owned()), captured))
            .is_err()
        {
            warn!(pod = %format!("{namespace}/{name}"), "the annotation task is gone; enrolment not reported");
        }
    }
}

async fn patch_redirection(client: &Client, namespace: &str, name: &str, captured: bool) -> Result<(), kube::Error> {
    Api::<K8sPod>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(redirection_patch(captured)),
        )
        .await
        .map(drop)
}

async fn send_patches(client: Client, mut queue: mpsc::UnboundedReceiver<(PodKey, bool)>) {
    while let Some(((namespace, name), captured)) = queue.recv().await {
        for attempt in 1..=PATCH_ATTEMPTS {
            match patch_redirection(&client, &namespace, &name, captured).await {
                Ok(()) => {
                    debug!(pod = %format!("{namespace}/{name}"), captured, "enrolment annotated");
                    break;
                }
                // Deleted meanwhile: nothing left to annotate.
                Err(kube::Error::Api(status)) if status.is_not_found() => break,
                Err(e) => {
                    let error = K8sError::Patch {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        source: e,
                    };
                    if attempt == PATCH_ATTEMPTS {
                        warn!(%error, captured, "giving up on the enrolment annotation");
                    } else {
                        warn!(%error, captured, attempt, "enrolment annotation failed, retrying");
                        tokio::time::sleep(Duration::from_secs(attempt)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k8s_pod(value: Value) -> K8sPod {
        serde_json::from_value(value).expect("a valid pod")
    }

    #[test]
    fn pods_convert_with_local_mode_defaults() {
        let pod = k8s_pod(json!({
            "metadata": {
                "name": "web", "namespace": "shop",
                "uid": "5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10",
                "labels": {"app": "web"},
                "annotations": {"sidecar.istio.io/status": "{}"},
                "managedFields": [],
            },
            "spec": {
                "hostNetwork": true, "serviceAccountName": "web-sa", "nodeName": "node-1",
                "containers": [{"name": "app"}, {"name": "istio-proxy"}],
            },
            "status": {"podIP": "10.0.0.7", "phase": "Running"},
        }));
        let (key, pod) = pod_from(pod).expect("converted");
        assert_eq!(key, ("shop".to_owned(), "web".to_owned()));
        assert_eq!(pod.meta.labels["app"], "web");
        assert_eq!(pod.meta.uid, "5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10");
        assert!(pod.meta.annotations.contains_key("sidecar.istio.io/status"));
        assert!(pod.host_network);
        assert_eq!(pod.service_account, "web-sa");
        assert_eq!(pod.containers, ["app", "istio-proxy"]);
        assert_eq!(pod.node_name, "node-1");
        assert_eq!(pod.ip, Some("10.0.0.7".parse().expect("ip")));

        // A pending pod: no spec details, no IP yet.
        let (_, bare) = pod_from(k8s_pod(json!({"metadata": {"name": "p", "namespace": "ns"}}))).expect("converted");
        assert_eq!(bare.service_account, "default");
        assert!(!bare.host_network && bare.containers.is_empty() && bare.ip.is_none());
        assert!(bare.meta.labels.is_empty());

        // Without a name or namespace there is no key to keep it under.
        assert!(pod_from(k8s_pod(json!({"metadata": {"namespace": "ns"}}))).is_none());
        assert!(pod_from(k8s_pod(json!({"metadata": {"name": "p"}}))).is_none());
    }

    #[test]
    fn namespaces_convert() {
        let ns: K8sNamespace = serde_json::from_value(
            json!({"metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        )
        .expect("a valid namespace");
        let (name, meta) = namespace_from(ns).expect("converted");
        assert_eq!(name, "shop");
        assert_eq!(meta.labels["istio.io/dataplane-mode"], "ambient");
        assert!(namespace_from(K8sNamespace::default()).is_none());
    }

    fn ns(name: &str, mode: &str) -> (String, Meta) {
        let meta = Meta {
            name: name.to_owned(),
            labels: [("istio.io/dataplane-mode".to_owned(), mode.to_owned())].into(),
            ..Default::default()
        };
        (name.to_owned(), meta)
    }

    fn pod(name: &str) -> (PodKey, Pod) {
        let key = ("shop".to_owned(), name.to_owned());
        let pod = Pod {
            meta: Meta {
                name: name.to_owned(),
                namespace: "shop".to_owned(),
                ..Default::default()
            },
            ..Default::default()
        };
        (key, pod)
    }

    #[test]
    fn synced_once_both_watches_listed_and_only_real_changes_wake() {
        let mut watches = Watches::default();
        let mut state = ClusterState::default();
        let mut apply = |state: &mut ClusterState, u| watches.apply(state, u);

        // Listing is buffered: nothing visible until it is done.
        assert!(!apply(&mut state, Update::Namespace(Event::Init)));
        let (k, v) = ns("shop", "ambient");
        assert!(!apply(&mut state, Update::Namespace(Event::InitApply(k, v))));
        assert!(state.inventory.namespaces.is_empty());
        assert!(apply(&mut state, Update::Namespace(Event::InitDone)));
        assert!(!state.synced, "pods are not listed yet");
        assert_eq!(
            state.inventory.namespaces["shop"].labels["istio.io/dataplane-mode"],
            "ambient"
        );

        // An empty pod list still completes the sync, and that alone wakes the agent.
        assert!(!apply(&mut state, Update::Pod(Event::Init)));
        assert!(apply(&mut state, Update::Pod(Event::InitDone)));
        assert!(state.synced);

        let (k, v) = pod("web");
        assert!(apply(&mut state, Update::Pod(Event::Apply(k.clone(), v.clone()))));
        // The same pod again (a status update the agent does not read): no wake-up.
        assert!(!apply(&mut state, Update::Pod(Event::Apply(k.clone(), v))));
        // A namespace label change does wake it.
        let (name, meta) = ns("shop", "none");
        assert!(apply(&mut state, Update::Namespace(Event::Apply(name, meta))));
        assert!(apply(&mut state, Update::Pod(Event::Delete(k.clone()))));
        assert!(!apply(&mut state, Update::Pod(Event::Delete(k))));

        // A relist replaces the map whole: objects of an abandoned relist are dropped, and
        // the sync status stays.
        let (a, va) = pod("a");
        let (b, vb) = pod("b");
        assert!(!apply(&mut state, Update::Pod(Event::Init)));
        assert!(!apply(&mut state, Update::Pod(Event::InitApply(a, va))));
        assert!(!apply(&mut state, Update::Pod(Event::Init)));
        assert!(!apply(&mut state, Update::Pod(Event::InitApply(b.clone(), vb))));
        assert!(apply(&mut state, Update::Pod(Event::InitDone)));
        assert_eq!(state.inventory.pods.keys().collect::<Vec<_>>(), [&b]);
        assert!(state.synced);
    }

    #[test]
    fn readers_keep_their_snapshot() {
        let mut watches = Watches::default();
        let mut state = ClusterState::default();
        let before = state.inventory.clone();
        let (k, v) = pod("web");
        assert!(watches.apply(&mut state, Update::Pod(Event::Apply(k, v))));
        assert!(before.pods.is_empty());
        assert_eq!(state.inventory.pods.len(), 1);
    }

    #[test]
    fn redirection_patches_set_and_remove_the_annotation() {
        assert_eq!(
            redirection_patch(true),
            json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}})
        );
        assert_eq!(
            redirection_patch(false),
            json!({"metadata": {"annotations": {"ambient.istio.io/redirection": null}}})
        );
    }
}
