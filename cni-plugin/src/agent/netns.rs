//! The identity of a network namespace: the device and inode of its nsfs file, the same
//! through every path that reaches it (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`). Paths
//! are only names: two of them may reach one namespace, and `/proc/<pid>/ns/net` reaches
//! another one once the pid is reused, so the agent compares identities, never paths.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

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
