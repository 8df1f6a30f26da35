//! The local manifest directory: multi-document YAML (or JSON) files of the same kinds a
//! cluster holds, re-read when anything in the directory changes. A bad document is reported
//! with its file, document index and reason and skipped; the rest applies, and a fix is picked
//! up on the next change. A file that was read cleanly keeps its objects while a later version
//! cannot be read or has errors (withdrawing them would change policy because of a typo); only
//! regular files are read, up to 16 MiB, without blocking; symlinks are followed but each
//! directory is walked once, and a link back into the walk is reported by its path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

use super::{Change, ChangeSender};
use crate::model::{Kind, Object, ObjectKey};

/// A document that was skipped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DocumentError {
    pub file: PathBuf,
    /// 0-based position of the document in its file.
    pub index: usize,
    pub reason: String,
}

impl std::fmt::Display for DocumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} document {}: {}", self.file.display(), self.index, self.reason)
    }
}

/// Everything read from a directory.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub errors: Vec<DocumentError>,
}

/// The largest manifest file read; a bigger one (or `/dev/zero` behind a link) is an error.
pub const MAX_FILE_BYTES: u64 = mesh_core::input_file::MANIFEST_MAX_BYTES;

/// What a walk of the directory found besides files: links that lead back into what was
/// already walked, entries that are not regular files, unreadable subdirectories.
fn walk_problem(path: &Path, reason: String) -> DocumentError {
    DocumentError {
        file: path.to_owned(),
        index: 0,
        reason,
    }
}

/// The manifest files under `dir`, following symlinks but walking each directory once: a link
/// to a directory already walked (`a -> .`, two links to one place) is reported by its path
/// and not followed, so a cycle cannot make the walk explode.
fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>, problems: &mut Vec<DocumentError>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    let mut seen = BTreeMap::from([((meta.dev(), meta.ino()), dir.to_owned())]);
    walk(dir, &mut seen, out, problems)
}

fn walk(
    dir: &Path,
    seen: &mut BTreeMap<(u64, u64), PathBuf>,
    out: &mut Vec<PathBuf>,
    problems: &mut Vec<DocumentError>,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let manifest = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"));
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                if manifest {
                    out.push(path); // Its read reports the error.
                } else if path.is_symlink() {
                    problems.push(walk_problem(&path, format!("cannot follow: {e}")));
                }
                continue;
            }
        };
        if meta.is_dir() {
            let id = (meta.dev(), meta.ino());
            if let Some(first) = seen.get(&id) {
                problems.push(walk_problem(
                    &path,
                    format!(
                        "leads to {}, which is already read (a symlink cycle or a second link): not followed",
                        first.display()
                    ),
                ));
                continue;
            }
            seen.insert(id, path.clone());
            if let Err(e) = walk(&path, seen, out, problems) {
                problems.push(walk_problem(&path, format!("cannot read directory: {e}")));
            }
        } else if manifest {
            // Not a regular file (a FIFO, a device): listed, so reading it fails and the
            // file's last good objects are kept, as for any unreadable file.
            out.push(path);
        }
    }
    Ok(())
}

/// Reads one manifest file: a regular file only (opened without blocking, so a FIFO swapped
/// in after the walk cannot hang the reader), at most [`MAX_FILE_BYTES`].
fn read_manifest(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_FILE_BYTES >> 20
        )));
    }
    Ok(text)
}

/// Parses every document of one file's text into `loaded`.
pub fn parse_text(file: &Path, text: &str, loaded: &mut Loaded) {
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let error = |reason: String| DocumentError {
            file: file.to_owned(),
            index,
            reason,
        };
        let value = match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => continue, // an empty document (`---` at the end)
            Ok(v) => v,
            Err(e) => {
                loaded.errors.push(error(format!("not valid YAML: {e}")));
                // A syntax error leaves the rest of the stream unreadable.
                break;
            }
        };
        // `kind: List` wraps several objects, as `kubectl get -o yaml` writes them.
        let items = match value.get("kind").and_then(|k| k.as_str()) {
            Some("List") => match value.get("items").and_then(|i| i.as_array()) {
                Some(items) => items.clone(),
                None => {
                    loaded.errors.push(error("a List without items".to_owned()));
                    continue;
                }
            },
            _ => vec![value],
        };
        for item in items {
            match Object::parse(item) {
                Ok(o) => loaded.objects.push(o),
                Err(e) => loaded.errors.push(error(e.to_string())),
            }
        }
    }
}

/// What identifies a file's content cheaply: size, modification time and inode (editors and
/// atomic writers replace the file, which changes the inode even within one clock tick).
type Stamp = (u64, Option<SystemTime>, u64);

/// The directory's manifest files with their stamps, and what the walk reported.
struct Listing {
    files: BTreeMap<PathBuf, Stamp>,
    problems: Vec<DocumentError>,
}

fn stamps(dir: &Path) -> std::io::Result<Listing> {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    let mut problems = Vec::new();
    manifest_files(dir, &mut files, &mut problems)?;
    let files = files
        .into_iter()
        .filter_map(|f| {
            let meta = std::fs::metadata(&f).or_else(|_| std::fs::symlink_metadata(&f)).ok()?;
            Some((f, (meta.len(), meta.modified().ok(), meta.ino())))
        })
        .collect();
    Ok(Listing { files, problems })
}

/// What was read from one file.
struct FileState {
    stamp: Stamp,
    keys: Vec<(Kind, ObjectKey)>,
    errors: Vec<DocumentError>,
    /// The objects applied came from a read without errors: they are the file's last good
    /// state, kept while a later version cannot be read or has errors.
    good: bool,
}

/// The directory as last read: files, which file each object came from, and what the last
/// walk of the directory reported.
#[derive(Default)]
struct DirState {
    files: BTreeMap<PathBuf, FileState>,
    owner: BTreeMap<(Kind, ObjectKey), PathBuf>,
    walk: Vec<DocumentError>,
}

/// Reads and parses one file; the errors say why documents (or the whole file) were not read.
fn load_file(file: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    match read_manifest(file) {
        Ok(text) => parse_text(file, &text, &mut loaded),
        Err(e) => loaded.errors.push(DocumentError {
            file: file.to_owned(),
            index: 0,
            reason: format!("cannot read: {e}"),
        }),
    }
    loaded
}

/// Reads and parses `files` on as many threads as the machine has cores (parsing YAML is most
/// of a large directory's first read: ~35 % of the controller's start-up at 100k pods); the
/// results come back in the order of `files`, so what follows is the same as a serial read.
fn load_files(files: &[&Path]) -> Vec<Loaded> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(files.len());
    if threads <= 1 {
        return files.iter().map(|f| load_file(f)).collect();
    }
    let next = AtomicUsize::new(0);
    let mut parts: Vec<(usize, Loaded)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(file) = files.get(i) else { break };
                        mine.push((i, load_file(file)));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    parts.sort_by_key(|(i, _)| *i);
    parts.into_iter().map(|(_, l)| l).collect()
}

impl DirState {
    /// Re-reads changed files only; returns the changes to send. Objects of a file that
    /// changed are re-applied; objects that disappeared are deleted. An object defined in two
    /// files belongs to the first file that defined it; the other copy is reported.
    ///
    /// A file whose last applied read was clean keeps those objects while a new version cannot
    /// be read or has errors (an editor's half-written save, a typo, a permission change): the
    /// errors are reported and nothing is withdrawn until the file is fixed or deleted.
    fn refresh(&mut self, listing: Listing) -> Vec<Change> {
        let Listing { files: now, problems } = listing;
        self.walk = problems;
        let mut changes = Vec::new();
        let gone: Vec<PathBuf> = self.files.keys().filter(|f| !now.contains_key(*f)).cloned().collect();
        for file in gone {
            if let Some(state) = self.files.remove(&file) {
                for key in state.keys {
                    if self.owner.get(&key) == Some(&file) {
                        self.owner.remove(&key);
                        changes.push(Change::Delete(key.0, key.1));
                    }
                }
            }
        }
        let changed: Vec<(PathBuf, Stamp)> = now
            .into_iter()
            .filter(|(file, stamp)| self.files.get(file).is_none_or(|f| f.stamp != *stamp))
            .collect();
        let paths: Vec<&Path> = changed.iter().map(|(f, _)| f.as_path()).collect();
        let loads = load_files(&paths);
        for ((file, stamp), mut loaded) in changed.into_iter().zip(loads) {
            if !loaded.errors.is_empty() {
                if let Some(held) = self.files.get_mut(&file).filter(|f| f.good) {
                    loaded.errors.push(DocumentError {
                        file: file.clone(),
                        index: 0,
                        reason: format!(
                            "keeping the {} object(s) of this file's last good version until it is fixed",
                            held.keys.len()
                        ),
                    });
                    held.stamp = stamp;
                    held.errors = loaded.errors;
                    continue;
                }
            }
            let good = loaded.errors.is_empty();
            let before: Vec<(Kind, ObjectKey)> = self.files.remove(&file).map(|f| f.keys).unwrap_or_default();
            let mut keys = Vec::with_capacity(loaded.objects.len());
            for object in loaded.objects {
                let key = (object.kind(), object.key());
                match self.owner.get(&key) {
                    Some(owner) if *owner != file => {
                        loaded.errors.push(DocumentError {
                            file: file.clone(),
                            index: 0,
                            reason: format!(
                                "duplicate {} {}: {} defines it; this copy is ignored",
                                key.0.name(),
                                key.1,
                                owner.display()
                            ),
                        });
                        continue;
                    }
                    _ => {}
                }
                self.owner.insert(key.clone(), file.clone());
                keys.push(key);
                changes.push(Change::Apply(object));
            }
            for key in before {
                if !keys.contains(&key) && self.owner.get(&key) == Some(&file) {
                    self.owner.remove(&key);
                    changes.push(Change::Delete(key.0, key.1));
                }
            }
            self.files.insert(
                file,
                FileState {
                    stamp,
                    keys,
                    errors: loaded.errors,
                    good,
                },
            );
        }
        changes
    }

    fn errors(&self) -> Vec<DocumentError> {
        self.walk
            .iter()
            .chain(self.files.values().flat_map(|f| f.errors.iter()))
            .cloned()
            .collect()
    }
}

/// Watches `dir`: the first read is sent as a full replacement of every kind followed by
/// [`Change::Synced`]; later, only the objects of files that changed. Skipped documents are
/// published on `errors`.
pub async fn watch(
    dir: PathBuf,
    interval: Duration,
    tx: ChangeSender,
    errors: watch::Sender<Vec<DocumentError>>,
) -> std::io::Result<()> {
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("manifest directory {} does not exist", dir.display()),
        ));
    }
    let mut state = Some(DirState::default());
    let mut first = true;
    let mut published: Option<Vec<DocumentError>> = None;
    loop {
        let d = dir.clone();
        let mut current = state.take().unwrap_or_default();
        // Listing and parsing are file system work: keep them off the async workers.
        let (current, changes) = match tokio::task::spawn_blocking(move || {
            let changes = match stamps(&d) {
                Ok(now) => Ok(current.refresh(now)),
                Err(e) => Err(e),
            };
            (current, changes)
        })
        .await
        {
            Ok((current, Ok(changes))) => (current, changes),
            Ok((current, Err(e))) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read manifest directory");
                (current, Vec::new())
            }
            Err(e) => {
                tracing::error!(error = %e, "manifest loader failed");
                return Err(std::io::Error::other(e.to_string()));
            }
        };
        let skipped = current.errors();
        if published.as_ref() != Some(&skipped) {
            for e in &skipped {
                tracing::warn!(file = %e.file.display(), document = e.index, reason = %e.reason, "skipped manifest document");
            }
            errors.send_replace(skipped.clone());
            published = Some(skipped);
        }
        if !changes.is_empty() || first {
            tracing::info!(dir = %dir.display(), changes = changes.len(), objects = current.owner.len(), "manifests read");
            let batch: Vec<Change> = if first {
                let mut by_kind: BTreeMap<Kind, Vec<Object>> = Kind::ALL.iter().map(|k| (*k, Vec::new())).collect();
                for c in changes {
                    if let Change::Apply(o) = c {
                        by_kind.entry(o.kind()).or_default().push(o);
                    }
                }
                let mut all: Vec<Change> = by_kind.into_iter().map(|(k, v)| Change::Replace(k, v)).collect();
                all.push(Change::Synced);
                all
            } else {
                changes
            };
            first = false;
            for c in batch {
                if tx.send(c).await.is_err() {
                    return Ok(()); // The controller is gone.
                }
            }
        }
        state = Some(current);
        tokio::time::sleep(interval).await;
    }
}

/// Local mode's enrolment reports: every `*.json` file in `dir` is a node agent's
/// `{"enrolled": ["ns/name", ...]}`; their union is sent whenever it changes. An unreadable
/// report is logged and counts as empty (its pods fall back to plaintext, never the reverse).
pub async fn watch_enrolment(dir: PathBuf, interval: Duration, tx: ChangeSender) {
    #[derive(Deserialize)]
    struct Report {
        enrolled: Vec<String>,
    }
    let read = |dir: &Path| -> std::collections::BTreeSet<ObjectKey> {
        let mut out = std::collections::BTreeSet::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return out;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Report>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(r) => out.extend(r.enrolled.iter().filter_map(|k| {
                    let (ns, name) = k.split_once('/')?;
                    Some(ObjectKey::new(ns, name))
                })),
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "unreadable enrolment report"),
            }
        }
        out
    };
    let mut last = None;
    loop {
        let d = dir.clone();
        let now = tokio::task::spawn_blocking(move || read(&d)).await.unwrap_or_default();
        if last.as_ref() != Some(&now) {
            tracing::info!(pods = now.len(), "enrolment reports changed");
            last = Some(now.clone());
            if tx.send(Change::Enrolled(now)).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_documents_are_reported_and_skipped() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: a}
spec:
  rules: [{from: [{source: {principal: [x]}}]}]
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: w}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: s, namespace: a}
";
        let mut loaded = Loaded::default();
        parse_text(Path::new("m.yaml"), text, &mut loaded);
        let kinds: Vec<Kind> = loaded.objects.iter().map(|o| o.kind()).collect();
        assert_eq!(kinds, vec![Kind::Namespace, Kind::AuthorizationPolicy, Kind::Service]);
        // The misspelt policy is kept, marked invalid, so translation can fail closed.
        match &loaded.objects[1] {
            Object::AuthorizationPolicy(p) => {
                assert!(p.invalid.is_some());
                assert_eq!(p.unimplemented, ["spec.rules[0].from[0].source.principal"]);
            }
            other => panic!("{other:?}"),
        }
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("m.yaml document 1: metadata.name"), "{errors:?}");
        assert!(
            errors[1].contains("document 3") && errors[1].contains("Widget"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_syntax_error_names_the_document() {
        let mut loaded = Loaded::default();
        parse_text(
            Path::new("x.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [\n",
            &mut loaded,
        );
        assert_eq!(loaded.objects.len(), 1);
        assert_eq!(loaded.errors.len(), 1);
        assert_eq!(loaded.errors[0].index, 1);
        assert!(loaded.errors[0].reason.contains("not valid YAML"));
    }

    fn names(changes: &[Change]) -> Vec<String> {
        changes.iter().map(Change::to_string).collect()
    }

    fn ns(names: &[&str]) -> String {
        names
            .iter()
            .map(|n| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n---\n"))
            .collect()
    }

    fn refresh(state: &mut DirState, dir: &Path) -> Vec<Change> {
        state.refresh(stamps(dir).expect("stamps"))
    }

    fn reasons(state: &DirState) -> Vec<String> {
        state.errors().iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn a_file_that_breaks_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.yaml");
        let replace = |text: &str| {
            let tmp = dir.path().join("a.tmp");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, &a).expect("rename");
        };
        replace(&ns(&["one", "two"]));
        let mut state = DirState::default();
        assert_eq!(names(&refresh(&mut state, dir.path())), ["apply one", "apply two"]);

        // Invalid YAML, then a document that is not an object, then unreadable (a dangling
        // link, a FIFO, a device): nothing is withdrawn, each error is reported.
        type Break<'a> = Box<dyn Fn() + 'a>;
        let broken: [(&str, Break<'_>); 5] = [
            ("not valid YAML", Box::new(|| replace("kind: [\n"))),
            (
                "metadata.name",
                Box::new(|| replace("apiVersion: v1\nkind: Namespace\nmetadata: {}\n")),
            ),
            (
                "cannot read",
                Box::new(|| {
                    std::fs::remove_file(&a).expect("rm");
                    std::os::unix::fs::symlink(dir.path().join("gone"), &a).expect("link");
                }),
            ),
            (
                "not a regular file",
                Box::new(|| {
                    std::fs::remove_file(&a).expect("rm");
                    let ok = std::process::Command::new("mkfifo").arg(&a).status().expect("mkfifo");
                    assert!(ok.success());
                }),
            ),
            (
                "not a regular file",
                Box::new(|| {
                    std::fs::remove_file(&a).expect("rm");
                    std::os::unix::fs::symlink("/dev/zero", &a).expect("link");
                }),
            ),
        ];
        for (why, make) in &broken {
            make();
            assert!(refresh(&mut state, dir.path()).is_empty(), "{why}: nothing withdrawn");
            let errors = reasons(&state);
            assert!(
                errors.iter().any(|e| e.contains(why)) && errors.iter().any(|e| e.contains("keeping the 2 object(s)")),
                "{why}: {errors:?}"
            );
        }

        // Fixed: the new version applies and the old objects it no longer has go.
        std::fs::remove_file(&a).expect("rm");
        replace(&ns(&["one", "three"]));
        assert_eq!(
            names(&refresh(&mut state, dir.path())),
            ["apply one", "apply three", "delete Namespace two"]
        );
        assert!(state.errors().is_empty());
        // Deleting the file is a real removal.
        std::fs::remove_file(&a).expect("rm");
        assert_eq!(
            names(&refresh(&mut state, dir.path())),
            ["delete Namespace one", "delete Namespace three"]
        );
    }

    #[test]
    fn symlink_cycles_are_reported_by_path_and_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), ns(&["one"])).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/b.yaml"), ns(&["two"])).expect("write");
        for link in ["l1", "l2", "sub/up"] {
            std::os::unix::fs::symlink(".", dir.path().join(link)).expect("link");
        }
        std::os::unix::fs::symlink("..", dir.path().join("sub/parent")).expect("link");
        let started = std::time::Instant::now();
        let listing = stamps(dir.path()).expect("stamps");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        let files: Vec<&Path> = listing.files.keys().map(PathBuf::as_path).collect();
        assert_eq!(files, [dir.path().join("a.yaml"), dir.path().join("sub/b.yaml")]);
        let problems: Vec<String> = listing.problems.iter().map(|e| e.to_string()).collect();
        for link in ["l1", "l2", "sub/up", "sub/parent"] {
            let path = dir.path().join(link).display().to_string();
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&path) && p.contains("symlink cycle")),
                "{link}: {problems:?}"
            );
        }
        let mut state = DirState::default();
        assert_eq!(names(&state.refresh(listing)), ["apply one", "apply two"]);
        assert_eq!(state.errors().len(), 4);
    }

    #[test]
    fn files_parsed_in_parallel_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = (0..40)
            .map(|i| {
                let f = dir.path().join(format!("{i:02}.yaml"));
                // Sizes differ so that threads finish out of order.
                let pad = "# padding\n".repeat((i * 37) % 200);
                std::fs::write(
                    &f,
                    format!("{pad}apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{i}}}\n"),
                )
                .unwrap();
                f
            })
            .collect();
        let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let names: Vec<String> = load_files(&paths)
            .into_iter()
            .map(|l| l.objects.iter().map(|o| o.key().name).collect::<Vec<_>>().join(","))
            .collect();
        let want: Vec<String> = (0..40).map(|i| format!("ns-{i}")).collect();
        assert_eq!(names, want);
    }

    #[test]
    fn only_changed_files_are_reread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, ns(&["one", "two"])).expect("write");
        std::fs::write(&b, ns(&["three", "one"])).expect("write");
        let mut state = DirState::default();
        let first = state.refresh(stamps(dir.path()).expect("stamps"));
        assert_eq!(names(&first), ["apply one", "apply two", "apply three"]);
        assert_eq!(state.errors().len(), 1, "the second `one` is a duplicate");
        assert!(
            state.refresh(stamps(dir.path()).expect("stamps")).is_empty(),
            "nothing changed"
        );

        // Rewrite a (atomically, new inode): `two` goes, `four` comes, `one` is re-applied.
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, ns(&["one", "four"])).expect("write");
        std::fs::rename(&tmp, &a).expect("rename");
        let second = state.refresh(stamps(dir.path()).expect("stamps"));
        assert_eq!(names(&second), ["apply one", "apply four", "delete Namespace two"]);

        std::fs::remove_file(&b).expect("remove");
        let third = state.refresh(stamps(dir.path()).expect("stamps"));
        assert_eq!(names(&third), ["delete Namespace three"]);
        assert!(state.errors().is_empty());
    }
}
