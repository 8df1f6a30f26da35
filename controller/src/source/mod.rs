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
}

/// Sender half a source writes to.
pub type ChangeSender = tokio::sync::mpsc::Sender<Change>;
pub mod local;

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Apply(o) => write!(f, "apply {}", o.key()),
            Change::Delete(k, key) => write!(f, "delete {k:?} {key}"),
            Change::Replace(k, objects) => write!(f, "replace {k:?} {}", objects.len()),
            Change::Synced => f.write_str("synced"),
            Change::Enrolled(pods) => write!(f, "enrolled {}", pods.len()),
        }
    }
}
