//! The controller's loop: apply source changes to the inputs, wait for a burst to settle,
//! translate, and publish — a new xDS snapshot, the pods the CA may sign for, waypoint
//! decisions and problems. Translation runs on a blocking thread; the async workers keep
//! serving streams meanwhile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};

use crate::burst::Bursts;
pub use crate::burst::Debounce;
use crate::ca::PodLocator;
use crate::model::{Inputs, Kind, Object, ObjectKey, Pod};
use crate::source::{Change, KindSync};
use crate::translate::incremental::Incremental;
use crate::translate::{Options, Outputs, Problem};
use crate::waypoint::WaypointDeployment;
use crate::xds::Snapshot;

/// Pods per (node, namespace, service account): what the CA's impersonation rule checks.
#[derive(Default)]
pub struct NodePods(ArcSwap<HashSet<(String, String, String)>>);

type NodeKey = (String, String, String);

/// The (node, namespace, service account) of a pod, if it is on a node.
fn node_key(key: &ObjectKey, pod: &Pod) -> Option<NodeKey> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let sa = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    Some((node, key.namespace.clone(), sa))
}

/// How many pods each (node, namespace, service account) has, kept up to date change by
/// change so that a pod change does not walk every pod; the published set is rebuilt only
/// when a key appears or disappears.
#[derive(Default)]
struct NodeCounts {
    counts: HashMap<NodeKey, usize>,
    /// The key set changed since it was last published.
    changed: bool,
}

impl NodeCounts {
    fn add(&mut self, key: &ObjectKey, pod: &Pod) {
        if let Some(k) = node_key(key, pod) {
            let n = self.counts.entry(k).or_default();
            *n += 1;
            self.changed |= *n == 1;
        }
    }

    fn remove(&mut self, key: &ObjectKey, pod: &Pod) {
        let Some(k) = node_key(key, pod) else { return };
        if let Some(n) = self.counts.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&k);
                self.changed = true;
            }
        }
    }

    /// Before `change` is applied to `inputs`.
    fn note(&mut self, inputs: &Inputs, change: &Change) {
        match change {
            Change::Apply(Object::Pod(pod)) => {
                let key = ObjectKey::of(&pod.metadata, false);
                if let Some(old) = inputs.pods.get(&key) {
                    self.remove(&key, old);
                }
                self.add(&key, pod);
            }
            Change::Delete(Kind::Pod, key) => {
                if let Some(old) = inputs.pods.get(key) {
                    self.remove(key, old);
                }
            }
            Change::Replace(Kind::Pod, pods) => {
                self.counts.clear();
                self.changed = true;
                for o in pods {
                    if let Object::Pod(pod) = o {
                        self.add(&ObjectKey::of(&pod.metadata, false), pod);
                    }
                }
            }
            _ => {}
        }
    }

    /// The set to publish, when it changed.
    fn take(&mut self) -> Option<HashSet<NodeKey>> {
        std::mem::take(&mut self.changed).then(|| self.counts.keys().cloned().collect())
    }
}

/// What the loop keeps beside the inputs, told of each change before it is applied.
struct Tracking {
    translator: Arc<Mutex<Incremental>>,
    node_pods: NodeCounts,
}

impl Tracking {
    fn note(&mut self, inputs: &Inputs, change: &Change) {
        lock(&self.translator).note(inputs, change);
        self.node_pods.note(inputs, change);
    }
}

/// The translator, also after a panic on the translation thread (its next step then
/// translates from scratch: a panic leaves no step half-recorded that it would trust).
fn lock(m: &Mutex<Incremental>) -> std::sync::MutexGuard<'_, Incremental> {
    m.lock().unwrap_or_else(|poisoned| {
        m.clear_poison();
        let mut translator = poisoned.into_inner();
        translator.invalidate();
        translator
    })
}

impl PodLocator for NodePods {
    fn has_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.0
            .load()
            .contains(&(node.to_owned(), namespace.to_owned(), service_account.to_owned()))
    }
}

/// What the loop publishes besides the xDS snapshot.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub synced: bool,
    /// Each kind's sync state as its source last reported it (Kubernetes mode; empty for
    /// the local source, which reads everything or reports per file).
    pub kinds: BTreeMap<Kind, KindSync>,
    pub problems: Vec<Problem>,
    pub waypoints: Vec<WaypointDeployment>,
    /// The last translation, for the admin dump.
    pub outputs: Arc<Outputs>,
    /// Each WorkloadGroup's service account (`default` when its template names none): what
    /// a VM token issued for the group may obtain certificates for.
    pub workload_groups: BTreeMap<crate::model::ObjectKey, String>,
}

/// Handles to the loop's results.
pub struct Core {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub published: watch::Receiver<Published>,
    pub pods: Arc<NodePods>,
    pub kind_metrics: KindMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
    state: &'static str,
}

/// `kind_state{kind, state}`: 1 for each kind's current sync state (`synced`, `not_served`,
/// `failing`, `unreadable` = failing with nothing listed yet), 0 for the others.
#[derive(Clone, Default)]
pub struct KindMetrics(Family<KindLabel, Gauge>);

impl KindMetrics {
    const STATES: [&'static str; 4] = ["synced", "not_served", "failing", "unreadable"];

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kind_state",
            "Sync state of each watched kind (1: current)",
            self.0.clone(),
        );
    }

    fn update(&self, kinds: &BTreeMap<Kind, KindSync>) {
        for (&kind, state) in kinds {
            let now = match state {
                KindSync::Synced => "synced",
                KindSync::NotServed => "not_served",
                KindSync::Failing { listed: true, .. } => "failing",
                KindSync::Failing { listed: false, .. } => "unreadable",
            };
            for s in Self::STATES {
                let label = KindLabel {
                    kind: kind.name(),
                    state: s,
                };
                self.0.get_or_create(&label).set(i64::from(s == now));
            }
        }
    }
}

/// Whether every kind has been listed (or reported) once, and each kind's state.
#[derive(Default)]
struct Sources {
    synced: bool,
    kinds: BTreeMap<Kind, KindSync>,
}

fn apply(inputs: &mut Inputs, change: Change, sources: &mut Sources, tracking: &mut Tracking) {
    tracking.note(inputs, &change);
    match change {
        Change::Apply(o) => inputs.apply(o),
        Change::Delete(kind, key) => {
            inputs.remove(kind, &key);
        }
        Change::Replace(kind, objects) => {
            inputs.clear(kind);
            objects.into_iter().for_each(|o| inputs.apply(o));
        }
        Change::Synced => sources.synced = true,
        Change::Enrolled(pods) => inputs.enrolled = pods,
        Change::KindState(kind, state) => drop(sources.kinds.insert(kind, state)),
        Change::MeshConfig(mesh) => inputs.mesh = mesh,
        Change::Cluster(c) => crate::model::cluster::apply(&mut inputs.remotes, c),
    }
}

/// Starts the loop reading `changes`.
pub fn start(changes: mpsc::Receiver<Change>, options: Options, debounce: Debounce) -> Core {
    let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    let (pub_tx, published) = watch::channel(Published::default());
    let pods = Arc::new(NodePods::default());
    let kind_metrics = KindMetrics::default();
    let worker = Loop {
        bursts: Bursts::new(changes, debounce),
        inputs: Arc::new(Inputs::default()),
        sources: Sources::default(),
        previous: Arc::new(Snapshot::default()),
        tracking: Tracking {
            translator: Arc::new(Mutex::new(Incremental::new(options))),
            node_pods: NodeCounts::default(),
        },
        out: LoopOutputs {
            snapshots: snap_tx,
            published: pub_tx,
            node_pods: pods.clone(),
            metrics: kind_metrics.clone(),
            trim: spawn_trimmer(),
        },
    };
    tokio::spawn(worker.run());
    Core {
        snapshots,
        published,
        pods,
        kind_metrics,
    }
}

/// Translation and encoding leave freed heap behind; a second after a burst has been pushed,
/// give it back (glibc keeps it otherwise). Notify the returned handle after each push.
fn spawn_trimmer() -> Arc<tokio::sync::Notify> {
    let trim = Arc::new(tokio::sync::Notify::new());
    let trimmer = trim.clone();
    tokio::spawn(async move {
        loop {
            trimmer.notified().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            // SAFETY: malloc_trim has no preconditions; it only returns free pages to the kernel.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        }
    });
    trim
}

/// Where the loop publishes.
struct LoopOutputs {
    snapshots: watch::Sender<Arc<Snapshot>>,
    published: watch::Sender<Published>,
    node_pods: Arc<NodePods>,
    metrics: KindMetrics,
    trim: Arc<tokio::sync::Notify>,
}

/// The controller's loop state: the inputs (shared with the translation thread without a
/// copy; mutated only once it is back), the sources' sync state and the last snapshot.
struct Loop {
    bursts: Bursts<Change>,
    inputs: Arc<Inputs>,
    sources: Sources,
    previous: Arc<Snapshot>,
    tracking: Tracking,
    out: LoopOutputs,
}

impl Loop {
    async fn run(mut self) {
        loop {
            let (inputs, sources, tracking) = (&mut self.inputs, &mut self.sources, &mut self.tracking);
            let burst = self.bursts.next(|c| apply(Arc::make_mut(inputs), c, sources, tracking));
            let Some(since) = burst.await.map(tokio::time::Instant::into_std) else {
                return;
            };
            // Publish nothing until every kind is listed or reported: a partial world would
            // remove resources. A kind that cannot be read is in `sources.kinds`, which
            // translation turns into problems and, for security kinds, fail-closed policies.
            if self.sources.synced {
                self.translate_and_publish(since).await;
            }
        }
    }

    /// Translates what the burst changed on a blocking thread and publishes the result.
    async fn translate_and_publish(&mut self, since: Instant) {
        let workload_groups = self
            .inputs
            .workload_groups
            .iter()
            .map(|(k, g)| {
                let sa = g.spec.template.service_account.clone().filter(|s| !s.is_empty());
                (k.clone(), sa.unwrap_or_else(|| "default".to_owned()))
            })
            .collect();
        let (shared, prev) = (self.inputs.clone(), self.previous.clone());
        let kinds = self.sources.kinds.clone();
        self.out.metrics.update(&kinds);
        let (translator, step_kinds) = (self.tracking.translator.clone(), kinds.clone());
        let done = tokio::task::spawn_blocking(move || {
            let step = lock(&translator).step(&shared, &step_kinds);
            let snapshot = match &step.touched {
                Some(touched) => Snapshot::apply(&prev, &step.outputs, touched, Some(since)),
                None => Snapshot::next(&prev, step.outputs.clone(), Some(since)),
            };
            (step.outputs, snapshot)
        })
        .await;
        let (out, snapshot) = match done {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "translation failed");
                return;
            }
        };
        if let Some(pods_by_node) = self.tracking.node_pods.take() {
            self.out.node_pods.0.store(Arc::new(pods_by_node));
        }
        tracing::info!(
            generation = snapshot.generation,
            changed = snapshot.changes(),
            problems = out.problems.len(),
            took_ms = since.elapsed().as_millis() as u64,
            "translated"
        );
        let snapshot = Arc::new(snapshot);
        self.previous = snapshot.clone();
        self.out.snapshots.send_replace(snapshot);
        self.publish(out, kinds, workload_groups);
    }

    fn publish(
        &mut self,
        out: Arc<Outputs>,
        kinds: BTreeMap<Kind, KindSync>,
        workload_groups: BTreeMap<ObjectKey, String>,
    ) {
        for p in &out.problems {
            tracing::debug!(kind = p.kind.name(), object = %p.object, problem = %p.message, "problem");
        }
        let before = self.out.published.send_replace(Published {
            synced: true,
            kinds,
            problems: out.problems.clone(),
            waypoints: out.waypoints.values().cloned().collect(),
            outputs: out,
            workload_groups,
        });
        // The outputs published before become the translator's spare copy.
        lock(&self.tracking.translator).recycle(before.outputs);
        // After a from-scratch step, the spare is made now rather than by the next change.
        let translator = self.tracking.translator.clone();
        tokio::task::spawn_blocking(move || lock(&translator).prepare());
        self.out.trim.notify_one();
    }
}
