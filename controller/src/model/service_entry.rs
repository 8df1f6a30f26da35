//! Istio's `networking.istio.io` ServiceEntry: services outside the platform registry
//! (external APIs, hosts by name or address) added to the mesh's registry, in the field names
//! users write. As for the other Istio kinds, our structs name only what the mesh implements;
//! every other field of a spec is listed by path in `unimplemented` so translation reports it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::unknown::typed_spec;
use super::ObjectMeta;

/// A ServiceEntry (v1, v1beta1 and v1alpha3 share this shape).
#[derive(Clone, Debug, Serialize)]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    pub spec: ServiceEntrySpec,
    /// Paths of the spec's fields the mesh does not implement.
    #[serde(skip)]
    pub unimplemented: Vec<String>,
}

#[derive(Deserialize)]
struct RawObject {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: serde_json::Value,
}

impl<'de> Deserialize<'de> for ServiceEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawObject::deserialize(d)?;
        let (spec, unimplemented) = typed_spec(raw.spec).map_err(serde::de::Error::custom)?;
        Ok(ServiceEntry {
            metadata: raw.metadata,
            spec,
            unimplemented,
        })
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    /// VIPs (IPs; CIDR prefixes are reported and ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServiceEntryPort>,
    /// MESH_EXTERNAL (default) or MESH_INTERNAL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// NONE (default), STATIC, DNS, DNS_ROUND_ROBIN (DYNAMIC_DNS is reported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<EntrySelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    pub number: u32,
    /// HTTP, HTTPS, HTTP2, GRPC, TCP, TLS, MONGO... (case-insensitive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// `workloadSelector: {labels: {...}}` (not `matchLabels`, unlike policies). A misspelt key
/// would select every pod of the namespace, so unknown keys are refused.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntrySelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One endpoint: a WorkloadEntry spec inline.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// An IP, or a host name resolved by the sending proxy (resolution DNS).
    #[serde(default)]
    pub address: String,
    /// Port name -> port the endpoint listens on (matched with the entry's port names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// A WorkloadEntry: one non-Kubernetes workload (a VM, a database host); its spec is the
/// shape of a ServiceEntry endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadEntry {
    pub metadata: ObjectMeta,
    pub spec: Endpoint,
    /// Paths of the spec's fields the mesh does not implement.
    #[serde(skip)]
    pub unimplemented: Vec<String>,
}

impl<'de> Deserialize<'de> for WorkloadEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawObject::deserialize(d)?;
        let (spec, unimplemented) = typed_spec(raw.spec).map_err(serde::de::Error::custom)?;
        Ok(WorkloadEntry {
            metadata: raw.metadata,
            spec,
            unimplemented,
        })
    }
}

/// A WorkloadGroup: the template of the WorkloadEntries that name it (annotation or label
/// `istio.io/autoRegistrationGroup`): the group's `metadata` labels/annotations and its
/// `template` (service account, network, locality, ports, weight) fill what the entry leaves
/// out. `probe` (health checking by the VM's agent) is not implemented and is reported.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadGroup {
    pub metadata: ObjectMeta,
    pub spec: WorkloadGroupSpec,
    /// Paths of the spec's fields the mesh does not implement.
    #[serde(skip)]
    pub unimplemented: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadGroupSpec {
    #[serde(default)]
    pub metadata: GroupMetadata,
    #[serde(default)]
    pub template: Endpoint,
    /// Kept only to be reported as not implemented.
    #[serde(default, skip_serializing)]
    pub probe: Option<serde_json::Value>,
}

/// Labels and annotations every member of a group carries.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct GroupMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for WorkloadGroup {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawObject::deserialize(d)?;
        let (spec, mut unimplemented): (WorkloadGroupSpec, _) =
            typed_spec(raw.spec).map_err(serde::de::Error::custom)?;
        if spec.probe.is_some() {
            unimplemented.push("spec.probe".to_owned());
        }
        Ok(WorkloadGroup {
            metadata: raw.metadata,
            spec,
            unimplemented,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn unimplemented_fields_are_listed_by_path() {
        let se: ServiceEntry = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {
                "hosts": ["api.example.com"],
                "ports": [{"number": 443, "protocol": "TLS", "name": "tls"}],
                "resolution": "DNS",
                "endpoints": [{"address": "192.0.2.1", "labels": {"a": "b"}, "weight": 2}],
                "somethingNew": true,
            }
        }))
        .unwrap();
        assert_eq!(se.spec.hosts, ["api.example.com"]);
        assert_eq!(se.spec.endpoints[0].weight, Some(2));
        assert_eq!(se.unimplemented, ["spec.somethingNew"]);
    }

    #[test]
    fn a_misspelt_selector_is_refused() {
        let r: Result<ServiceEntry, _> = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ext"},
            "spec": {"hosts": ["a"], "workloadSelector": {"matchLabels": {"app": "x"}}}
        }));
        assert!(r.is_err());
    }
}
