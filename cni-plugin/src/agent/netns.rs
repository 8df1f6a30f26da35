//! The identity of a network namespace: the device and inode of its nsfs file, the same
//! through every path that reaches it (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`). Paths
//! are only names: two of them may reach one namespace, and `/proc/<pid>/ns/net` reaches
//! another one once the pid is reused, so the agent compares identities, never paths.
//!
//! A pod's namespace is opened once per use ([`open`]), checked against the identity recorded
//! when the pod was enrolled and against the node's own namespace (which must never get pod
//! rules), and the open file, not the path, is then written to and handed to ztunnel.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The agent's own network namespace: the node's.
const HOST: &str = "/proc/self/ns/net";

/// Which network namespace a file reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

impl NsId {
    /// The namespace an open file reaches (fstat: the file, not whatever its path names now).
    pub fn of(file: &File) -> std::io::Result<NsId> {
        let meta = file.metadata()?;
        Ok(NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// The node's network namespace (the agent's own).
pub fn host() -> std::io::Result<NsId> {
    NsId::of(&File::open(HOST)?)
}

/// Why a pod's namespace was not opened: in every case nothing was written anywhere.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{} reaches network namespace {now}, not the pod's ({recorded}): the pod is gone", path.display())]
    Replaced { path: PathBuf, recorded: NsId, now: NsId },
    #[error("{} is the node's own network namespace: pod rules never go there", path.display())]
    Host { path: PathBuf },
    #[error("the node's own network namespace could not be identified: no pod namespace is used")]
    HostUnknown,
}

impl NetnsError {
    /// Whether the pod's namespace no longer exists at its path (nothing of the pod left there).
    pub fn gone(&self) -> bool {
        match self {
            NetnsError::Replaced { .. } => true,
            NetnsError::Open { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            NetnsError::Host { .. } | NetnsError::HostUnknown => false,
        }
    }
}

/// A pod's network namespace, open and checked.
#[derive(Debug)]
pub struct PodNetns {
    pub file: File,
    pub path: PathBuf,
    pub id: NsId,
}

/// Opens the namespace at `path` for a pod: refused when it is the node's (`host`, `None`
/// when that could not be read: then every namespace is refused) or not the one `recorded`
/// when the pod was enrolled.
pub fn open(path: &Path, recorded: Option<NsId>, host: Option<NsId>) -> Result<PodNetns, NetnsError> {
    let opened = File::open(path).and_then(|file| Ok((NsId::of(&file)?, file)));
    let (id, file) = opened.map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    let path = path.to_owned();
    match (host, recorded) {
        (None, _) => Err(NetnsError::HostUnknown),
        (Some(host), _) if host == id => Err(NetnsError::Host { path }),
        (_, Some(recorded)) if recorded != id => Err(NetnsError::Replaced {
            path,
            recorded,
            now: id,
        }),
        _ => Ok(PodNetns { file, path, id }),
    }
}

/// The identity of the namespace at `path` now, when it can be read.
pub fn identify(path: &Path) -> Option<NsId> {
    File::open(path).and_then(|file| NsId::of(&file)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_namespace_and_a_replaced_one_are_refused() {
        let host_id = host().unwrap();
        let e = open(Path::new(HOST), None, Some(host_id)).unwrap_err();
        assert!(matches!(e, NetnsError::Host { .. }), "{e}");
        let e = open(Path::new(HOST), None, None).unwrap_err();
        assert!(matches!(e, NetnsError::HostUnknown), "{e}");
        // Any file has an identity: a regular file stands in for a pod's namespace here.
        let pod = tempfile::NamedTempFile::new().unwrap();
        let now = identify(pod.path()).unwrap();
        let other = NsId {
            ino: now.ino + 1,
            ..now
        };
        let e = open(pod.path(), Some(other), Some(host_id)).unwrap_err();
        assert!(e.gone() && matches!(e, NetnsError::Replaced { .. }), "{e}");
        assert_eq!(open(pod.path(), Some(now), Some(host_id)).unwrap().id, now);
        assert!(open(Path::new("/proc/no-such-pid/ns/net"), None, Some(host_id))
            .unwrap_err()
            .gone());
    }
}
