//! Embeds the Kubernetes manifests: reads `../manifests/kustomization.yaml`, and generates
//! `embedded.rs` with the kustomization and every file its `resources:` list names (plus
//! `configurations:`), each through `include_str!`, so the binary carries them.

use std::path::{Path, PathBuf};

/// The entries of a top-level list (`resources:`, `configurations:`) in a kustomization.
fn list(text: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if !line.starts_with(' ') && !line.starts_with('-') && !trimmed.starts_with('#') && !trimmed.is_empty() {
            inside = line.trim_end() == format!("{key}:");
            continue;
        }
        if inside {
            if let Some(item) = trimmed.strip_prefix("- ") {
                out.push(item.trim().trim_matches('"').to_owned());
            }
        }
    }
    out
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let dir = manifest_dir.join("..").join("manifests");
    let kustomization = dir.join("kustomization.yaml");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed={}", kustomization.display());
    let text = std::fs::read_to_string(&kustomization).unwrap_or_default();
    let mut files = list(&text, "resources");
    files.extend(list(&text, "configurations"));
    let mut code = String::from("/// The kustomization and its files, as (relative path, text).\n");
    code.push_str("pub const FILES: &[(&str, &str)] = &[\n");
    let mut entry = |rel: &str, path: &Path| {
        println!("cargo:rerun-if-changed={}", path.display());
        code.push_str(&format!(
            "    ({rel:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    };
    if kustomization.is_file() {
        entry("kustomization.yaml", &kustomization);
    }
    for f in &files {
        let path = dir.join(f);
        if path.is_file() {
            entry(f, &path);
        } else {
            println!("cargo:warning=manifests/{f} is listed in the kustomization but does not exist");
        }
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("embedded.rs");
    if let Err(e) = std::fs::write(&out, code) {
        panic!("cannot write {}: {e}", out.display());
    }
}
