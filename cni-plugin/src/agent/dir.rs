//! Local mode's inventory: the manifest directory, each file parsed again only when it changed.
//! Every ADD asks for the inventory, and the directory holds every manifest of the cluster (a
//! file per pod in the test cluster), so parsing all of it per ADD made pod start-up grow with
//! the cluster and repeated each bad document's warning on every ADD and every poll. A file is
//! known by its stamp (size, modification time, inode: atomic writers replace the file, which
//! changes the inode even within one clock tick); the inventory is rebuilt from the parsed
//! files only when a stamp or the listing changed, and shared otherwise.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::pods::Inventory;

/// What identifies a file's content cheaply.
type Stamp = (u64, Option<SystemTime>, u64);

/// The manifest directory and what was last read from it.
pub struct ManifestDir {
    dir: PathBuf,
    read: Mutex<Read>,
}

/// The files as last parsed (each file's own objects) and the inventory they make.
#[derive(Default)]
struct Read {
    files: BTreeMap<PathBuf, (Stamp, Inventory)>,
    inventory: Arc<Inventory>,
}

/// The directory's `.yaml`/`.yml` files with their stamps, in name order.
fn stamps(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, Stamp>> {
    use std::os::unix::fs::MetadataExt;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        // A file removed between the listing and here is simply not there.
        if let Ok(meta) = std::fs::metadata(&path) {
            files.insert(path, (meta.len(), meta.modified().ok(), meta.ino()));
        }
    }
    Ok(files)
}

impl ManifestDir {
    pub fn new(dir: PathBuf) -> ManifestDir {
        ManifestDir {
            dir,
            read: Mutex::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The inventory as the directory is now: changed files are parsed again, the rest reused.
    /// A file that cannot be read fails the whole read (a partial view would release pods).
    pub fn inventory(&self) -> std::io::Result<Arc<Inventory>> {
        let now = stamps(&self.dir)?;
        let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
        let unchanged = now.len() == read.files.len()
            && now
                .iter()
                .zip(&read.files)
                .all(|((p, s), (q, (t, _)))| p == q && s == t);
        if unchanged {
            return Ok(read.inventory.clone());
        }
        let mut files = BTreeMap::new();
        for (path, stamp) in now {
            let parsed = match read.files.remove(&path) {
                Some((old, parsed)) if old == stamp => parsed,
                _ => Inventory::read_file(&path)?,
            };
            files.insert(path, (stamp, parsed));
        }
        let mut inventory = Inventory::default();
        for (_, parsed) in files.values() {
            inventory.merge(parsed);
        }
        *read = Read {
            files,
            inventory: Arc::new(inventory),
        };
        Ok(read.inventory.clone())
    }

    /// A fingerprint of the listing and every file's stamp (None when the directory cannot be
    /// read): it changes when a file is written, replaced, added or removed.
    pub fn digest(dir: &Path) -> Option<u64> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        stamps(dir).ok()?.hash(&mut h);
        Some(h.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> (String, String) {
        (ns.to_owned(), name.to_owned())
    }

    fn pod(name: &str, sa: &str) -> String {
        format!("kind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{serviceAccountName: {sa}}}\n")
    }

    #[test]
    fn unchanged_files_are_not_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = ManifestDir::new(dir.path().to_owned());
        std::fs::write(dir.path().join("a.yaml"), pod("a", "one")).expect("write");
        let first = source.inventory().expect("read");
        assert_eq!(first.pods[&key("shop", "a")].service_account, "one");
        // Nothing changed: the same shared inventory, no parse.
        assert!(Arc::ptr_eq(&first, &source.inventory().expect("read")));

        // A file whose stamp is unchanged is not parsed again: made unreadable as YAML behind
        // the cache's back (same size, same time, same inode), it still gives its old objects.
        let a = dir.path().join("a.yaml");
        let meta = std::fs::metadata(&a).expect("stat");
        std::fs::write(dir.path().join("b.yaml"), pod("b", "two")).expect("write");
        let garbled = "x".repeat(usize::try_from(meta.len()).expect("small"));
        std::fs::write(&a, garbled).expect("write");
        let file = std::fs::File::options().write(true).open(&a).expect("open");
        file.set_modified(meta.modified().expect("mtime")).expect("set mtime");
        let second = source.inventory().expect("read");
        assert_eq!(second.pods[&key("shop", "a")].service_account, "one", "a.yaml reused");
        assert_eq!(second.pods[&key("shop", "b")].service_account, "two", "b.yaml read");
    }

    #[test]
    fn a_fifo_in_the_directory_is_an_error_naming_it_not_a_hang() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), pod("a", "one")).expect("write");
        let fifo = dir.path().join("b.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).expect("mkfifo");
        let source = ManifestDir::new(dir.path().to_owned());
        let err = source.inventory().expect_err("a FIFO is not a manifest");
        assert!(
            err.to_string().contains("b.yaml") && err.to_string().contains("FIFO"),
            "{err}"
        );
        std::fs::remove_file(&fifo).expect("remove");
        assert_eq!(source.inventory().expect("read").pods.len(), 1);
    }

    #[test]
    fn replaced_and_removed_files_are_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = ManifestDir::new(dir.path().to_owned());
        let a = dir.path().join("a.yaml");
        std::fs::write(&a, pod("a", "one")).expect("write");
        assert_eq!(
            source.inventory().expect("read").pods[&key("shop", "a")].service_account,
            "one"
        );
        // Replaced atomically with content of the same size: a new inode.
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, pod("a", "two")).expect("write");
        std::fs::rename(&tmp, &a).expect("rename");
        assert_eq!(
            source.inventory().expect("read").pods[&key("shop", "a")].service_account,
            "two"
        );
        let before = ManifestDir::digest(dir.path());
        std::fs::remove_file(&a).expect("remove");
        assert!(source.inventory().expect("read").pods.is_empty());
        assert_ne!(ManifestDir::digest(dir.path()), before);
    }
}
