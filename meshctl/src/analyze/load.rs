//! Loading manifests for analysis: files and directories (recursively, hidden entries
//! skipped) parsed with the controller's own local-source parser, duplicates kept first as
//! the controller does, `Node` documents collected on the side (the controller has no such
//! kind), and kinds the controller does not read counted rather than reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use controller::model::{Inputs, Kind, ObjectKey};
use controller::source::manifest_dir::{parse_text, DocumentError, Loaded};
use serde::Deserialize;

/// Why loading failed as a whole (a path that cannot be read).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// What analysis works on.
#[derive(Debug, Default)]
pub struct Corpus {
    pub inputs: Inputs,
    /// Documents that could not be parsed.
    pub errors: Vec<DocumentError>,
    /// Node names declared (`kind: Node`).
    pub nodes: BTreeSet<String>,
    /// Documents of kinds analysis ignores, by kind.
    pub ignored: BTreeMap<String, usize>,
    /// Objects declared twice: (kind, key, kept file, ignored file).
    pub duplicates: Vec<(Kind, ObjectKey, PathBuf, PathBuf)>,
    pub files: usize,
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_dir() {
        out.extend(crate::manifest_files::under(path).map_err(|(path, source)| LoadError::Read { path, source })?);
    } else {
        out.push(path.to_owned());
    }
    Ok(())
}

/// The `kind` of every object of a file's documents (List items flattened), for Nodes and
/// for counting the kinds analysis ignores.
fn kinds_of(text: &str) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let Ok(value) = serde_json::Value::deserialize(doc) else {
            break; // parse_text reports it
        };
        let items = match value.get("kind").and_then(|k| k.as_str()) {
            Some("List") => value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default(),
            _ => vec![value],
        };
        for item in items {
            let kind = item.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_owned();
            out.push((kind, item));
        }
    }
    out
}

/// Loads every manifest under `paths`.
pub fn load(paths: &[PathBuf]) -> Result<Corpus, LoadError> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut out = Corpus {
        files: files.len(),
        ..Default::default()
    };
    let mut owner: BTreeMap<(Kind, ObjectKey), PathBuf> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Read {
            path: file.clone(),
            source,
        })?;
        let mut loaded = Loaded::default();
        parse_text(&file, &text, &mut loaded);
        for (kind, item) in kinds_of(&text) {
            if kind == "Node" {
                if let Some(name) = item.pointer("/metadata/name").and_then(|n| n.as_str()) {
                    out.nodes.insert(name.to_owned());
                }
            }
        }
        for e in loaded.errors {
            if e.reason.starts_with("unsupported kind") {
                let kind = e.reason.split('"').nth(1).unwrap_or("?").to_owned();
                if kind != "Node" {
                    *out.ignored.entry(kind).or_default() += 1;
                }
            } else {
                out.errors.push(e);
            }
        }
        for o in loaded.objects {
            let id = (o.kind(), o.key());
            if let Some(first) = owner.get(&id) {
                out.duplicates.push((id.0, id.1, first.clone(), file.clone()));
                continue;
            }
            owner.insert(id, file.clone());
            out.inputs.apply(o);
        }
    }
    Ok(out)
}
