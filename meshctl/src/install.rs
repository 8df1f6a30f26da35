//! `meshctl install`: the kustomize manifests (embedded at build time, or read from a
//! directory) rendered into one multi-document YAML stream the way `kubectl apply -k` would
//! (common labels, `images:` overrides including the controller's `WAYPOINT_IMAGE`), with
//! `--hub`/`--tag` on top; printed, or piped to `kubectl apply --server-side -f -`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// Why the manifests could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{file}: invalid YAML: {source}")]
    Yaml { file: String, source: serde_yaml::Error },
    #[error("the manifests have no kustomization.yaml")]
    NoKustomization,
    #[error("cannot write YAML for {file}: {source}")]
    Write { file: String, source: serde_yaml::Error },
}

/// One `images:` entry of a kustomization.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageOverride {
    pub name: String,
    #[serde(default)]
    pub new_name: Option<String>,
    #[serde(default)]
    pub new_tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct LabelSet {
    #[serde(default)]
    pairs: BTreeMap<String, String>,
}

/// The parts of `kustomization.yaml` meshctl understands.
#[derive(Debug, Default, Deserialize)]
struct Kustomization {
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    labels: Vec<LabelSet>,
    #[serde(default, rename = "commonLabels")]
    common_labels: BTreeMap<String, String>,
    #[serde(default)]
    images: Vec<ImageOverride>,
}

/// The manifest files, by path relative to the kustomization.
#[derive(Debug, Clone)]
pub struct Manifests {
    files: BTreeMap<String, String>,
}

impl Manifests {
    /// The copy built into the binary.
    pub fn embedded() -> Manifests {
        Manifests {
            files: embedded::FILES
                .iter()
                .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
                .collect(),
        }
    }

    /// `dir/kustomization.yaml` and the files it lists.
    pub fn from_dir(dir: &Path) -> Result<Manifests, InstallError> {
        let read = |rel: &str| {
            let path = dir.join(rel);
            std::fs::read_to_string(&path).map_err(|source| InstallError::Read { path, source })
        };
        let kustomization = read("kustomization.yaml")?;
        let parsed: Kustomization = serde_yaml::from_str(&kustomization).map_err(|source| InstallError::Yaml {
            file: "kustomization.yaml".to_owned(),
            source,
        })?;
        let mut files = BTreeMap::new();
        for rel in &parsed.resources {
            files.insert(rel.clone(), read(rel)?);
        }
        files.insert("kustomization.yaml".to_owned(), kustomization);
        Ok(Manifests { files })
    }

    fn kustomization(&self) -> Result<Kustomization, InstallError> {
        let text = self
            .files
            .get("kustomization.yaml")
            .ok_or(InstallError::NoKustomization)?;
        serde_yaml::from_str(text).map_err(|source| InstallError::Yaml {
            file: "kustomization.yaml".to_owned(),
            source,
        })
    }
}

/// What `--hub` and `--tag` change.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Registry and path replacing everything before an image's last `/`.
    pub hub: Option<String>,
    pub tag: Option<String>,
}

/// An image reference split into name, tag and digest.
fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..]), digest),
        _ => (rest, None, digest),
    }
}

/// The image `image` becomes, or `None` when it is not one of the kustomization's images.
pub fn rewrite_image(image: &str, images: &[ImageOverride], overrides: &Overrides) -> Option<String> {
    let (name, tag, digest) = split_image(image);
    let entry = images.iter().find(|i| i.name == name)?;
    let mut name = entry.new_name.clone().unwrap_or_else(|| name.to_owned());
    let mut tag = entry.new_tag.clone().or_else(|| tag.map(str::to_owned));
    let mut digest = digest.map(str::to_owned);
    if let Some(hub) = &overrides.hub {
        let base = name.rsplit('/').next().unwrap_or(&name).to_owned();
        name = format!("{}/{base}", hub.trim_end_matches('/'));
    }
    if let Some(t) = &overrides.tag {
        tag = Some(t.clone());
        digest = None;
    }
    let mut out = name;
    if let Some(t) = tag {
        out.push(':');
        out.push_str(&t);
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(&d);
    }
    Some(out)
}

fn rewrite_containers(spec: &mut Value, images: &[ImageOverride], overrides: &Overrides, env_too: bool) {
    for list in ["containers", "initContainers"] {
        let Some(Value::Sequence(containers)) = spec.get_mut(list) else {
            continue;
        };
        for c in containers {
            if let Some(Value::String(image)) = c.get_mut("image") {
                if let Some(new) = rewrite_image(image, images, overrides) {
                    *image = new;
                }
            }
            // kustomizeconfig/images.yaml: env values of Deployments naming a listed image.
            if !env_too || list != "containers" {
                continue;
            }
            if let Some(Value::Sequence(env)) = c.get_mut("env") {
                for e in env {
                    if let Some(Value::String(v)) = e.get_mut("value") {
                        if let Some(new) = rewrite_image(v, images, overrides) {
                            *v = new;
                        }
                    }
                }
            }
        }
    }
}

fn add_labels(doc: &mut Value, labels: &BTreeMap<String, String>) {
    if labels.is_empty() {
        return;
    }
    let Value::Mapping(root) = doc else { return };
    let meta = root
        .entry(Value::from("metadata"))
        .or_insert_with(|| Value::Mapping(Default::default()));
    let Value::Mapping(meta) = meta else { return };
    let existing = meta
        .entry(Value::from("labels"))
        .or_insert_with(|| Value::Mapping(Default::default()));
    if let Value::Mapping(existing) = existing {
        for (k, v) in labels {
            existing.insert(Value::from(k.as_str()), Value::from(v.as_str()));
        }
    }
}

/// Renders the stream: each resource file in kustomization order, each document once.
pub fn render(manifests: &Manifests, overrides: &Overrides) -> Result<String, InstallError> {
    let k = manifests.kustomization()?;
    let mut labels = k.common_labels.clone();
    for set in &k.labels {
        labels.extend(set.pairs.clone());
    }
    let mut out = String::new();
    for rel in &k.resources {
        let text = manifests.files.get(rel).ok_or_else(|| InstallError::Read {
            path: PathBuf::from(rel),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "listed in kustomization.yaml but missing"),
        })?;
        for doc in serde_yaml::Deserializer::from_str(text) {
            let mut value = Value::deserialize(doc).map_err(|source| InstallError::Yaml {
                file: rel.clone(),
                source,
            })?;
            if value.is_null() {
                continue;
            }
            add_labels(&mut value, &labels);
            let kind = value.get("kind").and_then(Value::as_str).unwrap_or("").to_owned();
            if let Some(spec) = value.get_mut("spec") {
                if kind == "Pod" {
                    rewrite_containers(spec, &k.images, overrides, false);
                } else if let Some(pod) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
                    rewrite_containers(pod, &k.images, overrides, kind == "Deployment");
                }
            }
            let yaml = serde_yaml::to_string(&value).map_err(|source| InstallError::Write {
                file: rel.clone(),
                source,
            })?;
            out.push_str("---\n");
            out.push_str(&format!("# Source: {rel}\n"));
            out.push_str(&yaml);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> Vec<ImageOverride> {
        vec![ImageOverride {
            name: "ghcr.io/ambient-mesh/ztunnel".into(),
            new_name: None,
            new_tag: Some("0.1.0".into()),
        }]
    }

    #[test]
    fn images_follow_the_kustomization_then_the_flags() {
        let none = Overrides::default();
        assert_eq!(
            rewrite_image("ghcr.io/ambient-mesh/ztunnel:latest", &images(), &none).as_deref(),
            Some("ghcr.io/ambient-mesh/ztunnel:0.1.0")
        );
        assert_eq!(rewrite_image("docker.io/busybox:1", &images(), &none), None);
        let both = Overrides {
            hub: Some("registry.example/mesh/".into()),
            tag: Some("dev".into()),
        };
        assert_eq!(
            rewrite_image("ghcr.io/ambient-mesh/ztunnel@sha256:abc", &images(), &both).as_deref(),
            Some("registry.example/mesh/ztunnel:dev")
        );
        assert_eq!(split_image("localhost:5000/x"), ("localhost:5000/x", None, None));
    }

    #[test]
    fn the_embedded_manifests_render_with_rewritten_images() {
        let out = render(
            &Manifests::embedded(),
            &Overrides {
                hub: Some("reg.example/m".into()),
                tag: Some("9.9".into()),
            },
        )
        .unwrap();
        assert!(out.contains("image: reg.example/m/controller:9.9"), "controller image");
        assert!(out.contains("image: reg.example/m/ztunnel:9.9"));
        assert!(out.contains("image: reg.example/m/cni:9.9"));
        assert!(out.contains("value: reg.example/m/waypoint:9.9"), "WAYPOINT_IMAGE");
        assert!(!out.contains("ghcr.io/ambient-mesh"), "every mesh image rewritten");
        assert!(out.contains("app.kubernetes.io/managed-by: kustomize"));
        let docs = out.matches("\n---\n").count() + 1;
        assert!(docs >= 16, "{docs} documents");
        let default = render(&Manifests::embedded(), &Overrides::default()).unwrap();
        assert!(default.contains("image: ghcr.io/ambient-mesh/controller:0.1.0"));
        assert!(!default.contains(":latest"));
    }
}
