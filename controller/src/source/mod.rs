//! Where declared objects come from. A source sends [`Change`]s; the controller applies them
//! to its [`Inputs`](crate::model::Inputs) and recomputes what changed. The Kubernetes API
//! watches and the local manifest directory speak the same language, so everything behind
//! them is tested with the local one.

use crate::model::{Kind, Object, ObjectKey};

/// One change from a source.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // see `Object`
pub enum Change {
    /// An object was created or updated.
    Apply(Object),
    /// An object was deleted.
    Delete(Kind, ObjectKey),
    /// Every object of `kind` is now exactly `objects` (a list or relist, a directory rescan).
    Replace(Kind, Vec<Object>),
    /// Every kind has been listed once: outputs computed from now on are complete.
    Synced,
    /// Local mode: the pods node agents report captured (in a cluster, the pod annotation).
    Enrolled(std::collections::BTreeSet<ObjectKey>),
    /// Whether `kind` can be read (Kubernetes mode: reported by each kind's watch).
    KindState(Kind, KindSync),
    /// The mesh-wide settings changed (`--mesh-config`).
    MeshConfig(crate::mesh_config::MeshConfig),
    /// Something about a remote cluster (its objects, whether it can be read).
    Cluster(crate::model::cluster::ClusterChange),
}

/// Whether one kind's source could be read, as translation needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum KindSync {
    /// Listed; watch events follow.
    Synced,
    /// Not served by the API server at any version (its CRD is not installed): no object of
    /// it can exist, so empty is the truth.
    NotServed,
    /// Cannot be listed (forbidden, served only at a version we do not read, API errors):
    /// retried with backoff. `listed` says whether an earlier list succeeded, i.e. whether
    /// there is a last good state to keep serving.
    Failing { reason: String, listed: bool },
}

impl KindSync {
    /// Whether the kind's objects are unknown: failing with no good list behind it.
    pub fn unreadable(&self) -> Option<&str> {
        match self {
            KindSync::Failing { reason, listed: false } => Some(reason),
            _ => None,
        }
    }
}

/// Sender half a source writes to.
pub type ChangeSender = tokio::sync::mpsc::Sender<Change>;
pub mod manifest_dir;
pub mod remote;

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Apply(o) => write!(f, "apply {}", o.key()),
            Change::Delete(k, key) => write!(f, "delete {k:?} {key}"),
            Change::Replace(k, objects) => write!(f, "replace {k:?} {}", objects.len()),
            Change::Synced => f.write_str("synced"),
            Change::Enrolled(pods) => write!(f, "enrolled {}", pods.len()),
            Change::KindState(k, state) => write!(f, "state {k:?} {state:?}"),
            Change::MeshConfig(m) => write!(f, "mesh config {m:?}"),
            Change::Cluster(c) => write!(f, "{c}"),
        }
    }
}
