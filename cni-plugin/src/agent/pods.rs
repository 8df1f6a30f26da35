//! What the agent knows of pods and namespaces ([`Inventory`]), and how local mode reads a file
//! of the controller's manifest directory (multi-document YAML of Namespaces and Pods, as
//! `kubectl` would take them; the directory itself is [`super::dir`]). An invalid document is skipped with a warning naming file and index; the
//! rest is used. Cluster mode fills the same types from watches (see [`super::k8s`]).

use std::collections::BTreeMap;
use std::path::Path;

use mesh_core::input_file::{read_text, MANIFEST_MAX_BYTES};
use serde::Deserialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    /// `metadata.uid`: a pod's names its cgroup on the node, which tells its network
    /// namespace from an impostor's holding the same IP ([`super::scan`]). Empty when unknown.
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    #[serde(default)]
    name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    service_account_name: String,
    #[serde(default)]
    containers: Vec<Container>,
    #[serde(default)]
    node_name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    kind: String,
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Option<serde_yaml::Value>,
    #[serde(default)]
    status: Option<serde_yaml::Value>,
}

/// A pod as the agent needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub meta: Meta,
    pub host_network: bool,
    pub service_account: String,
    pub containers: Vec<String>,
    /// `spec.nodeName`: pods of other nodes are not this agent's.
    pub node_name: String,
    /// `status.podIP`, once the pod runs.
    pub ip: Option<std::net::IpAddr>,
}

/// Namespaces (by name) and pods (by namespace/name) found in the directory or the cluster.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub namespaces: BTreeMap<String, Meta>,
    pub pods: BTreeMap<(String, String), Pod>,
}

impl Inventory {
    /// The namespaces and pods of one manifest file; invalid documents are skipped with a
    /// warning naming the file and the document's index. Only a regular file of at most
    /// [`MANIFEST_MAX_BYTES`] is read: a FIFO or a device in the directory is an error naming
    /// it, not an agent stuck on it.
    pub fn read_file(file: &Path) -> std::io::Result<Inventory> {
        let mut inv = Inventory::default();
        let text = read_text(file, MANIFEST_MAX_BYTES).map_err(std::io::Error::other)?;
        for (index, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let obj = match Object::deserialize(doc) {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(file = %file.display(), index, error = %e, "skipping invalid manifest document");
                    continue;
                }
            };
            inv.add(obj, file, index);
        }
        Ok(inv)
    }

    /// Adds `other`'s objects, which replace any of the same name (a later file wins).
    pub fn merge(&mut self, other: &Inventory) {
        self.namespaces
            .extend(other.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.pods.extend(other.pods.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    fn add(&mut self, obj: Object, file: &Path, index: usize) {
        match obj.kind.as_str() {
            "Namespace" => {
                self.namespaces.insert(obj.metadata.name.clone(), obj.metadata);
            }
            "Pod" => {
                let spec: PodSpec = match obj.spec.map(serde_yaml::from_value).transpose() {
                    Ok(s) => s.unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(file = %file.display(), index, error = %e, "skipping pod with an invalid spec");
                        return;
                    }
                };
                let ns = if obj.metadata.namespace.is_empty() {
                    "default".to_owned()
                } else {
                    obj.metadata.namespace.clone()
                };
                let status: PodStatus = obj
                    .status
                    .and_then(|v| serde_yaml::from_value(v).ok())
                    .unwrap_or_default();
                let pod = Pod {
                    node_name: spec.node_name.clone(),
                    ip: status.pod_ip.parse().ok(),
                    host_network: spec.host_network,
                    service_account: if spec.service_account_name.is_empty() {
                        "default".into()
                    } else {
                        spec.service_account_name
                    },
                    containers: spec.containers.into_iter().map(|c| c.name).collect(),
                    meta: obj.metadata,
                };
                self.pods.insert((ns, pod.meta.name.clone()), pod);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_namespaces_and_pods_and_skips_bad_documents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
kind: [not, a, string]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web-sa, containers: [{name: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: shop}
spec: {hostNetwork: "maybe"}
"#,
        )
        .unwrap();
        let inv = Inventory::read_file(&dir.path().join("a.yaml")).unwrap();
        assert_eq!(inv.namespaces["shop"].labels["istio.io/dataplane-mode"], "ambient");
        let web = &inv.pods[&("shop".to_owned(), "web".to_owned())];
        assert_eq!(web.service_account, "web-sa");
        assert_eq!(web.containers, vec!["app"]);
        assert!(!inv.pods.contains_key(&("shop".to_owned(), "broken".to_owned())));
    }
}
