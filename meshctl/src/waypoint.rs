//! `meshctl waypoint`: waypoint Gateways (class `istio-waypoint`, listener `mesh` HBONE
//! 15008, label `istio.io/waypoint-for`) written to / listed from / removed from the
//! controller's local manifest directory, or applied, listed and deleted with kubectl.

use std::path::{Path, PathBuf};

use controller::model::gateway::WAYPOINT_CLASS;
use controller::model::Object;
use controller::source::manifest_dir::{parse_text, Loaded};

use crate::kubectl::{self, KubectlError};
use crate::table::Table;

const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
const KUBECTL_HINT: &str = "--manifest-dir DIR for the controller's local manifest directory";

/// Why a waypoint operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("manifest directory {0} does not exist")]
    NoDir(PathBuf),
    #[error("waypoint {namespace}/{name} not found in {dir}")]
    NotFound {
        namespace: String,
        name: String,
        dir: PathBuf,
    },
    #[error("waypoint {namespace}/{name} is defined in {file}, which meshctl did not write: remove it there")]
    Foreign {
        namespace: String,
        name: String,
        file: PathBuf,
    },
    #[error("{0:?} is not a valid Kubernetes name (lowercase letters, digits and '-', at most 63)")]
    BadName(String),
    #[error(transparent)]
    Kubectl(#[from] KubectlError),
    #[error("cannot read kubectl's output: {0}")]
    Output(String),
}

/// Which traffic the waypoint handles (`istio.io/waypoint-for`): the controller's own type.
pub use controller::waypoint::WaypointFor;

/// A DNS-1123 label.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The Gateway document.
pub fn gateway_yaml(namespace: &str, name: &str, for_: WaypointFor) -> String {
    format!(
        "# Written by meshctl waypoint apply.\n\
         apiVersion: gateway.networking.k8s.io/v1\n\
         kind: Gateway\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    {WAYPOINT_FOR}: {}\n\
         spec:\n  gatewayClassName: {WAYPOINT_CLASS}\n  listeners:\n    - name: mesh\n      port: 15008\n      protocol: HBONE\n",
        for_.label()
    )
}

/// The file meshctl writes for a waypoint.
pub fn file_name(namespace: &str, name: &str) -> String {
    format!("gateway.{namespace}.{name}.yaml")
}

/// The hint printed for `--enroll-namespace` in local mode.
pub fn enroll_hint(namespace: &str, name: &str) -> String {
    format!(
        "to send namespace {namespace}'s traffic through it, label the namespace: \
         istio.io/use-waypoint={name} (in the manifest directory: metadata.labels of Namespace {namespace}; \
         in a cluster: kubectl label namespace {namespace} istio.io/use-waypoint={name})"
    )
}

fn check_names(namespace: &str, name: &str) -> Result<(), WaypointError> {
    for n in [namespace, name] {
        if !valid_name(n) {
            return Err(WaypointError::BadName(n.to_owned()));
        }
    }
    Ok(())
}

/// Writes the Gateway into `dir` atomically (temporary file, then rename); returns its path.
pub fn apply_local(dir: &Path, namespace: &str, name: &str, for_: WaypointFor) -> Result<PathBuf, WaypointError> {
    check_names(namespace, name)?;
    if !dir.is_dir() {
        return Err(WaypointError::NoDir(dir.to_owned()));
    }
    let path = dir.join(file_name(namespace, name));
    // A dot file ending in .tmp: the controller's directory watcher ignores it.
    let tmp = dir.join(format!(".{}.{}.tmp", file_name(namespace, name), std::process::id()));
    let write = |p: &Path| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(p)?;
        f.write_all(gateway_yaml(namespace, name, for_).as_bytes())?;
        f.sync_all()
    };
    if let Err(source) = write(&tmp).and_then(|()| std::fs::rename(&tmp, &path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(WaypointError::Write { path, source });
    }
    Ok(path)
}

/// A waypoint found somewhere.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    pub namespace: String,
    pub name: String,
    pub waypoint_for: String,
    pub file: Option<PathBuf>,
}

/// Manifest files under `dir`, recursively, sorted, skipping hidden entries.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, WaypointError> {
    crate::manifest_files::under(dir).map_err(|(path, source)| WaypointError::Read { path, source })
}

/// Waypoints declared in `dir`.
pub fn list_local(dir: &Path) -> Result<Vec<Listed>, WaypointError> {
    if !dir.is_dir() {
        return Err(WaypointError::NoDir(dir.to_owned()));
    }
    let mut out = Vec::new();
    for file in manifest_files(dir)? {
        let text = std::fs::read_to_string(&file).map_err(|source| WaypointError::Read {
            path: file.clone(),
            source,
        })?;
        let mut loaded = Loaded::default();
        parse_text(&file, &text, &mut loaded);
        for o in loaded.objects {
            if let Object::Gateway(gw) = &o {
                if gw.spec.gateway_class_name != WAYPOINT_CLASS {
                    continue;
                }
                let key = o.key();
                out.push(Listed {
                    namespace: key.namespace,
                    name: key.name,
                    waypoint_for: waypoint_for_label(gw.metadata.labels.as_ref()),
                    file: Some(file.clone()),
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

fn waypoint_for_label(labels: Option<&std::collections::BTreeMap<String, String>>) -> String {
    labels
        .and_then(|l| l.get(WAYPOINT_FOR))
        .cloned()
        .unwrap_or_else(|| "service".to_owned())
}

/// Removes the file meshctl wrote; a waypoint declared in another file is left alone.
pub fn delete_local(dir: &Path, namespace: &str, name: &str) -> Result<PathBuf, WaypointError> {
    check_names(namespace, name)?;
    let path = dir.join(file_name(namespace, name));
    match std::fs::remove_file(&path) {
        Ok(()) => return Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(WaypointError::Write { path, source }),
    }
    if let Some(other) = list_local(dir)?
        .into_iter()
        .find(|l| l.namespace == namespace && l.name == name)
    {
        return Err(WaypointError::Foreign {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            file: other.file.unwrap_or_default(),
        });
    }
    Err(WaypointError::NotFound {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        dir: dir.to_owned(),
    })
}

/// `kubectl apply -f -` of the Gateway, and the namespace label when asked.
pub fn apply_kubectl(namespace: &str, name: &str, for_: WaypointFor, enroll: bool) -> Result<String, WaypointError> {
    check_names(namespace, name)?;
    let mut out = kubectl::run(
        &["apply", "-f", "-"],
        Some(&gateway_yaml(namespace, name, for_)),
        KUBECTL_HINT,
    )?;
    if enroll {
        let label = format!("istio.io/use-waypoint={name}");
        out.push_str(&kubectl::run(
            &["label", "namespace", namespace, &label, "--overwrite"],
            None,
            KUBECTL_HINT,
        )?);
    }
    Ok(out)
}

/// Waypoints in the cluster (`kubectl get gateways -A -o json`, class istio-waypoint).
pub fn list_kubectl() -> Result<Vec<Listed>, WaypointError> {
    let json = kubectl::run(
        &["get", "gateways.gateway.networking.k8s.io", "-A", "-o", "json"],
        None,
        KUBECTL_HINT,
    )?;
    parse_gateway_list(&json)
}

/// Filters a `kubectl get gateways -o json` list to waypoints.
pub fn parse_gateway_list(json: &str) -> Result<Vec<Listed>, WaypointError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| WaypointError::Output(e.to_string()))?;
    let items = v.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default();
    let mut out: Vec<Listed> = items
        .iter()
        .filter(|g| g.pointer("/spec/gatewayClassName").and_then(|c| c.as_str()) == Some(WAYPOINT_CLASS))
        .map(|g| {
            let s = |p: &str| g.pointer(p).and_then(|v| v.as_str()).unwrap_or("").to_owned();
            Listed {
                namespace: s("/metadata/namespace"),
                name: s("/metadata/name"),
                waypoint_for: g
                    .pointer("/metadata/labels")
                    .and_then(|l| l.get(WAYPOINT_FOR))
                    .and_then(|v| v.as_str())
                    .unwrap_or("service")
                    .to_owned(),
                file: None,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

/// `kubectl delete gateway NAME -n NS`.
pub fn delete_kubectl(namespace: &str, name: &str) -> Result<String, WaypointError> {
    check_names(namespace, name)?;
    Ok(kubectl::run(
        &["delete", "gateways.gateway.networking.k8s.io", name, "-n", namespace],
        None,
        KUBECTL_HINT,
    )?)
}

/// The NAMESPACE NAME FOR table.
pub fn table(list: &[Listed]) -> String {
    if list.is_empty() {
        return "no waypoints\n".to_owned();
    }
    let mut t = Table::new(&["NAMESPACE", "NAME", "FOR"]);
    for l in list {
        t.row(vec![l.namespace.clone(), l.name.clone(), l.waypoint_for.clone()]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_list_delete_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = apply_local(dir.path(), "shop", "waypoint", WaypointFor::Workload).unwrap();
        assert!(path.ends_with("gateway.shop.waypoint.yaml"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left");
        let listed = list_local(dir.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (
                listed[0].namespace.as_str(),
                listed[0].name.as_str(),
                listed[0].waypoint_for.as_str()
            ),
            ("shop", "waypoint", "workload")
        );
        assert_eq!(
            table(&listed),
            "NAMESPACE   NAME       FOR\nshop        waypoint   workload\n"
        );
        delete_local(dir.path(), "shop", "waypoint").unwrap();
        assert!(list_local(dir.path()).unwrap().is_empty());
        assert!(matches!(
            delete_local(dir.path(), "shop", "waypoint"),
            Err(WaypointError::NotFound { .. })
        ));
        assert!(matches!(
            apply_local(dir.path(), "Shop", "w", WaypointFor::All),
            Err(WaypointError::BadName(_))
        ));
    }

    #[test]
    fn a_waypoint_the_user_wrote_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mine.yaml"),
            gateway_yaml("a", "w", WaypointFor::Service),
        )
        .unwrap();
        assert!(matches!(
            delete_local(dir.path(), "a", "w"),
            Err(WaypointError::Foreign { .. })
        ));
    }

    #[test]
    fn kubectl_lists_only_waypoints() {
        let json = r#"{"items":[
          {"metadata":{"name":"w","namespace":"a","labels":{"istio.io/waypoint-for":"all"}},"spec":{"gatewayClassName":"istio-waypoint"}},
          {"metadata":{"name":"ingress","namespace":"a"},"spec":{"gatewayClassName":"nginx"}}]}"#;
        let l = parse_gateway_list(json).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].waypoint_for, "all");
    }
}
