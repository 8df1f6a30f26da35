//! [`EndpointSlice`]: the part of a Kubernetes EndpointSlice that translation reads, kept
//! instead of the whole object (see [`super::pod`] for why).
//!
//! Slices matter to translation only for Services without a selector: which pods their
//! endpoints name (`targetRef` of kind Pod) and the slice's port names and numbers. Addresses,
//! conditions, hints and topology are skipped while parsing. Field names and JSON spelling
//! are the API's, so both sources deserialise into these structs directly.

use serde::{Deserialize, Serialize};

use super::{null_or_default, ObjectMeta};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_or_default")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
}

/// An endpoint's `targetRef` (an ObjectReference): only what names a pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice as the API server returns it keeps its pod references and ports.
    #[test]
    fn an_api_slice_keeps_pod_references_and_ports() {
        let json = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "db-x1", "namespace": "a", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": true}, "nodeName": "n1", "zone": "z",
                           "targetRef": {"kind": "Pod", "namespace": "b", "name": "db-0", "uid": "u"}},
                          {"addresses": ["10.0.0.8"]}],
            "ports": [{"name": "tcp", "port": 5432, "protocol": "TCP"}]
        });
        let slice: EndpointSlice = serde_json::from_value(json).unwrap();
        let target = slice.endpoints[0].target_ref.as_ref().unwrap();
        assert_eq!(
            (
                target.kind.as_deref(),
                target.namespace.as_deref(),
                target.name.as_deref()
            ),
            (Some("Pod"), Some("b"), Some("db-0"))
        );
        assert_eq!(slice.endpoints[1].target_ref, None);
        let port = &slice.ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("tcp"), Some(5432)));
        assert!(std::mem::size_of::<Endpoint>() * 3 < std::mem::size_of::<k8s_openapi::api::discovery::v1::Endpoint>());
    }

    /// API servers before 1.36 send `endpoints: null` for a slice with none (a Service scaled
    /// to zero): it is an empty slice, not an object that fails the whole list.
    #[test]
    fn null_endpoints_are_none() {
        let json = serde_json::json!({"metadata": {"name": "db-x1", "namespace": "a"},
            "addressType": "IPv4", "endpoints": null, "ports": null});
        let slice: EndpointSlice = serde_json::from_value(json).unwrap();
        assert!(slice.endpoints.is_empty() && slice.ports.is_none());
    }
}
