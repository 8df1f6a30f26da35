//! The manifest files under a directory: `.yaml`, `.yml` and `.json`, recursively, sorted,
//! skipping hidden entries (editors' and meshctl's own temporary files).

use std::io;
use std::path::{Path, PathBuf};

/// The files under `dir`; an error carries the directory that could not be read.
pub fn under(dir: &Path) -> Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| (d.clone(), e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
