//! The local manifest directory: multi-document YAML (or JSON) files of the same kinds a
//! cluster holds, re-read when anything in the directory changes. A bad document is reported
//! with its file, document index and reason and skipped; the rest applies, and a fix is picked
//! up on the next change.

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

fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            manifest_files(&path, out)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(path);
        }
    }
    Ok(())
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

/// Reads every manifest under `dir`. Duplicates (same kind and key) keep the first and report
/// the others.
pub fn load_dir(dir: &Path) -> std::io::Result<Loaded> {
    let mut files = Vec::new();
    manifest_files(dir, &mut files)?;
    files.sort();
    let mut loaded = Loaded::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_text(&file, &text, &mut loaded),
            Err(e) => loaded.errors.push(DocumentError {
                file,
                index: 0,
                reason: format!("cannot read: {e}"),
            }),
        }
    }
    let mut seen: BTreeMap<(Kind, ObjectKey), ()> = BTreeMap::new();
    let objects = std::mem::take(&mut loaded.objects);
    for o in objects {
        if seen.insert((o.kind(), o.key()), ()).is_some() {
            loaded.errors.push(DocumentError {
                file: dir.to_owned(),
                index: 0,
                reason: format!("duplicate {} {}; the first one is used", o.kind().name(), o.key()),
            });
            continue;
        }
        loaded.objects.push(o);
    }
    Ok(loaded)
}

/// Names, sizes and modification times of the manifest files: cheap to compare.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files = Vec::new();
    if manifest_files(dir, &mut files).is_err() {
        return Vec::new();
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
            let modified = meta.and_then(|m| m.modified().ok());
            (f, len, modified)
        })
        .collect()
}

/// Watches `dir`, sending the full set of objects of every kind after each change, and
/// publishing the skipped documents on `errors`.
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
    let mut last = None;
    let mut first = true;
    loop {
        let d = dir.clone();
        let print = tokio::task::spawn_blocking(move || fingerprint(&d))
            .await
            .unwrap_or_default();
        if last.as_ref() != Some(&print) {
            last = Some(print);
            let d = dir.clone();
            // Parsing 10k objects takes a while: keep it off the async workers.
            let loaded = match tokio::task::spawn_blocking(move || load_dir(&d)).await {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read manifest directory");
                    tokio::time::sleep(interval).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "manifest loader failed");
                    tokio::time::sleep(interval).await;
                    continue;
                }
            };
            for e in &loaded.errors {
                tracing::warn!(file = %e.file.display(), document = e.index, reason = %e.reason, "skipped manifest document");
            }
            tracing::info!(dir = %dir.display(), objects = loaded.objects.len(), skipped = loaded.errors.len(), "manifests loaded");
            errors.send_replace(loaded.errors);
            let mut by_kind: BTreeMap<Kind, Vec<Object>> = Kind::ALL.iter().map(|k| (*k, Vec::new())).collect();
            for o in loaded.objects {
                by_kind.entry(o.kind()).or_default().push(o);
            }
            for (kind, objects) in by_kind {
                if tx.send(Change::Replace(kind, objects)).await.is_err() {
                    return Ok(()); // The controller is gone.
                }
            }
            if first {
                first = false;
                if tx.send(Change::Synced).await.is_err() {
                    return Ok(());
                }
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
        assert_eq!(kinds, vec![Kind::Namespace, Kind::Service]);
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("m.yaml document 1: metadata.name"), "{errors:?}");
        assert!(
            errors[1].contains("document 2") && errors[1].contains("unknown field `principal`"),
            "{errors:?}"
        );
        assert!(
            errors[2].contains("document 3") && errors[2].contains("Widget"),
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
}
