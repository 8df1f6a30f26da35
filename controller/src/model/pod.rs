//! [`Pod`]: the part of a Kubernetes Pod that translation reads, kept instead of the whole
//! object.
//!
//! The controller holds every pod of the cluster. k8s-openapi's `Pod` is 2,176 bytes inline
//! and each of its `Container`s 2,120, whatever they hold, and both carry images, commands,
//! environment and volumes nothing here reads: at 100,000 pods that is over 400 MB before a
//! single string. These structs keep the same field names and JSON spelling as the API's, so
//! the API server's objects and the manifest directory's deserialise into them directly
//! (other fields are skipped while parsing, never stored), and code reading
//! `pod.spec.as_ref().and_then(|s| s.node_name ..)` reads the same as before.

use serde::{Deserialize, Serialize};

use super::{null_or_default, ObjectMeta};

/// A pod: metadata (labels, annotations, owners), where it runs, its containers' ports and
/// its addresses and readiness.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    /// Only their ports: a Service's named `targetPort` resolves through them.
    #[serde(default, deserialize_with = "null_or_default")]
    pub containers: Vec<Container>,
    /// Kept for sidecars (`restartPolicy: Always`), whose named ports Services resolve too.
    #[serde(default, deserialize_with = "null_or_default")]
    pub init_containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ContainerPort>>,
    /// `Always` on an init container makes it a sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, deserialize_with = "null_or_default")]
    pub container_port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// TCP when absent, as the API server defaults it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<PodCondition>>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIP>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodCondition {
    #[serde(default, rename = "type", deserialize_with = "null_or_default")]
    pub type_: String,
    #[serde(default, deserialize_with = "null_or_default")]
    pub status: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodIP {
    #[serde(default, deserialize_with = "null_or_default")]
    pub ip: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full API object (as `kubectl get -o json` prints it) keeps what translation reads
    /// and nothing else, and the struct stays a fraction of k8s-openapi's.
    #[test]
    fn an_api_pod_keeps_what_translation_reads() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u1"}]},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web", "hostNetwork": false,
                     "containers": [{"name": "web", "image": "nginx", "args": ["-g", "daemon off;"],
                                     "env": [{"name": "A", "value": "b"}],
                                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                       "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                       "hostIP": "192.168.1.1", "containerStatuses": [{"name": "web", "ready": true}]}
        });
        let pod: Pod = serde_json::from_value(json).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(spec.host_network, Some(false));
        let port = &spec.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.container_port), (Some("http"), 8080));
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.5"));
        let ips: Vec<&str> = status.pod_ips.iter().flatten().map(|p| p.ip.as_str()).collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5"]);
        let ready = &status.conditions.as_ref().unwrap()[0];
        assert_eq!((ready.type_.as_str(), ready.status.as_str()), ("Ready", "True"));
        assert_eq!(pod.metadata.owner_references.as_ref().unwrap()[0].name, "web");
        assert!(std::mem::size_of::<Pod>() * 3 < std::mem::size_of::<k8s_openapi::api::core::v1::Pod>());
    }

    /// Nulls and missing required values read as k8s-openapi reads them: the default.
    #[test]
    fn nulls_and_missing_required_values_are_defaults() {
        let json = serde_json::json!({"metadata": {"name": "p"},
            "spec": {"containers": null}, "status": {"conditions": [{"type": "Ready"}], "podIPs": [{"ip": null}]}});
        let pod: Pod = serde_json::from_value(json).unwrap();
        assert!(pod.spec.unwrap().containers.is_empty());
        let status = pod.status.unwrap();
        assert_eq!(status.conditions.unwrap()[0].status, "");
        assert_eq!(status.pod_ips.unwrap()[0].ip, "");
        let json =
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"ports": [{"name": "http"}]}]}});
        let pod: Pod = serde_json::from_value(json).unwrap();
        assert_eq!(
            pod.spec.unwrap().containers[0].ports.as_ref().unwrap()[0].container_port,
            0
        );
    }

    /// A field we keep with the wrong type is still an error naming it, as before.
    #[test]
    fn a_mistyped_kept_field_is_an_error() {
        let json = serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"ports": [{"containerPort": "http"}]}]}});
        let err = serde_json::from_value::<Pod>(json).unwrap_err().to_string();
        assert!(err.contains("invalid type"), "{err}");
    }
}
