//! What users declare: the Kubernetes kinds the controller reads, in their standard shapes,
//! and [`Inputs`], the snapshot of all of them that translation works on. Both sources (the
//! Kubernetes API and the local manifest directory) produce the same [`Object`]s.

pub mod cluster;
pub mod endpoint_slice;
pub mod gateway;
pub mod istio;
mod object;
pub mod pod;
pub mod rate_limit;
pub mod reference_grant;
pub mod service_entry;
mod unknown;

use std::collections::BTreeMap;

use serde::Deserialize;

pub use endpoint_slice::EndpointSlice;
pub use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service, ServiceAccount};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
pub use object::{Kind, Object, ParseError};
pub use pod::Pod;

/// For fields the API declares as lists or required values: `null` (which API servers do
/// send, e.g. an empty EndpointSlice's `endpoints` before Kubernetes 1.36) and absence both
/// mean the default, as k8s-openapi reads them.
pub(crate) fn null_or_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Namespace and name of a namespaced object (namespace is empty for cluster-scoped kinds).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object from its metadata; a missing namespace means `default`, as
    /// `kubectl apply` would place it, except for cluster-scoped kinds.
    pub fn of(meta: &ObjectMeta, cluster_scoped: bool) -> Self {
        let namespace = if cluster_scoped {
            String::new()
        } else {
            meta.namespace.clone().unwrap_or_else(|| "default".to_owned())
        };
        ObjectKey {
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Everything the controller knows, by kind and key. Ordered maps keep translation output
/// (and golden files) deterministic.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Nodes by name: their topology labels are their pods' locality.
    pub nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub service_accounts: BTreeMap<ObjectKey, ServiceAccount>,
    pub gateway_classes: BTreeMap<String, gateway::GatewayClass>,
    pub gateways: BTreeMap<ObjectKey, gateway::Gateway>,
    pub http_routes: BTreeMap<ObjectKey, gateway::HttpRoute>,
    pub grpc_routes: BTreeMap<ObjectKey, gateway::GrpcRoute>,
    pub tcp_routes: BTreeMap<ObjectKey, gateway::TcpRoute>,
    pub tls_routes: BTreeMap<ObjectKey, gateway::TlsRoute>,
    pub reference_grants: BTreeMap<ObjectKey, reference_grant::ReferenceGrant>,
    pub authorization_policies: BTreeMap<ObjectKey, istio::AuthorizationPolicy>,
    pub peer_authentications: BTreeMap<ObjectKey, istio::PeerAuthentication>,
    pub request_authentications: BTreeMap<ObjectKey, istio::RequestAuthentication>,
    pub virtual_services: BTreeMap<ObjectKey, istio::VirtualService>,
    pub destination_rules: BTreeMap<ObjectKey, istio::DestinationRule>,
    pub service_entries: BTreeMap<ObjectKey, service_entry::ServiceEntry>,
    pub workload_entries: BTreeMap<ObjectKey, service_entry::WorkloadEntry>,
    pub workload_groups: BTreeMap<ObjectKey, service_entry::WorkloadGroup>,
    /// TLS Secrets an ingress Gateway's listeners name in `certificateRefs`.
    pub secrets: BTreeMap<ObjectKey, Secret>,
    pub rate_limits: BTreeMap<ObjectKey, rate_limit::LocalRateLimitPolicy>,
    pub telemetries: BTreeMap<ObjectKey, istio::Telemetry>,
    /// Mesh-wide settings (`--mesh-config`, Istio's MeshConfig).
    pub mesh: crate::mesh_config::MeshConfig,
    /// Pods the node agents report captured (local mode), besides annotated ones.
    pub enrolled: std::collections::BTreeSet<ObjectKey>,
    /// Remote clusters by cluster id: their discovery objects are merged into what is served.
    pub remotes: BTreeMap<String, cluster::Remote>,
}

impl Inputs {
    /// Adds or replaces an object.
    pub fn apply(&mut self, object: Object) {
        let key = object.key();
        match object {
            Object::Namespace(o) => drop(self.namespaces.insert(key.name, o)),
            Object::Node(o) => drop(self.nodes.insert(key.name, o)),
            Object::Pod(o) => drop(self.pods.insert(key, o)),
            Object::Service(o) => drop(self.services.insert(key, o)),
            Object::EndpointSlice(o) => drop(self.endpoint_slices.insert(key, o)),
            Object::ServiceAccount(o) => drop(self.service_accounts.insert(key, o)),
            Object::GatewayClass(o) => drop(self.gateway_classes.insert(key.name, o)),
            Object::Gateway(o) => drop(self.gateways.insert(key, o)),
            Object::HttpRoute(o) => drop(self.http_routes.insert(key, o)),
            Object::GrpcRoute(o) => drop(self.grpc_routes.insert(key, o)),
            Object::TcpRoute(o) => drop(self.tcp_routes.insert(key, o)),
            Object::TlsRoute(o) => drop(self.tls_routes.insert(key, o)),
            Object::ReferenceGrant(o) => drop(self.reference_grants.insert(key, o)),
            Object::AuthorizationPolicy(o) => drop(self.authorization_policies.insert(key, o)),
            Object::PeerAuthentication(o) => drop(self.peer_authentications.insert(key, o)),
            Object::RequestAuthentication(o) => drop(self.request_authentications.insert(key, o)),
            Object::VirtualService(o) => drop(self.virtual_services.insert(key, o)),
            Object::DestinationRule(o) => drop(self.destination_rules.insert(key, o)),
            Object::ServiceEntry(o) => drop(self.service_entries.insert(key, o)),
            Object::WorkloadEntry(o) => drop(self.workload_entries.insert(key, o)),
            Object::WorkloadGroup(o) => drop(self.workload_groups.insert(key, o)),
            Object::Secret(o) => drop(self.secrets.insert(key, o)),
            Object::LocalRateLimitPolicy(o) => drop(self.rate_limits.insert(key, o)),
            Object::Telemetry(o) => drop(self.telemetries.insert(key, o)),
        }
    }

    /// Removes the object of `kind` at `key`; true when it was present.
    pub fn remove(&mut self, kind: Kind, key: &ObjectKey) -> bool {
        match kind {
            Kind::Namespace => self.namespaces.remove(&key.name).is_some(),
            Kind::Node => self.nodes.remove(&key.name).is_some(),
            Kind::Pod => self.pods.remove(key).is_some(),
            Kind::Service => self.services.remove(key).is_some(),
            Kind::EndpointSlice => self.endpoint_slices.remove(key).is_some(),
            Kind::ServiceAccount => self.service_accounts.remove(key).is_some(),
            Kind::GatewayClass => self.gateway_classes.remove(&key.name).is_some(),
            Kind::Gateway => self.gateways.remove(key).is_some(),
            Kind::HttpRoute => self.http_routes.remove(key).is_some(),
            Kind::GrpcRoute => self.grpc_routes.remove(key).is_some(),
            Kind::TcpRoute => self.tcp_routes.remove(key).is_some(),
            Kind::TlsRoute => self.tls_routes.remove(key).is_some(),
            Kind::ReferenceGrant => self.reference_grants.remove(key).is_some(),
            Kind::AuthorizationPolicy => self.authorization_policies.remove(key).is_some(),
            Kind::PeerAuthentication => self.peer_authentications.remove(key).is_some(),
            Kind::RequestAuthentication => self.request_authentications.remove(key).is_some(),
            Kind::VirtualService => self.virtual_services.remove(key).is_some(),
            Kind::DestinationRule => self.destination_rules.remove(key).is_some(),
            Kind::ServiceEntry => self.service_entries.remove(key).is_some(),
            Kind::WorkloadEntry => self.workload_entries.remove(key).is_some(),
            Kind::WorkloadGroup => self.workload_groups.remove(key).is_some(),
            Kind::Secret => self.secrets.remove(key).is_some(),
            Kind::LocalRateLimitPolicy => self.rate_limits.remove(key).is_some(),
            Kind::Telemetry => self.telemetries.remove(key).is_some(),
        }
    }

    /// Removes every object of `kind`.
    pub fn clear(&mut self, kind: Kind) {
        match kind {
            Kind::Namespace => self.namespaces.clear(),
            Kind::Node => self.nodes.clear(),
            Kind::Pod => self.pods.clear(),
            Kind::Service => self.services.clear(),
            Kind::EndpointSlice => self.endpoint_slices.clear(),
            Kind::ServiceAccount => self.service_accounts.clear(),
            Kind::GatewayClass => self.gateway_classes.clear(),
            Kind::Gateway => self.gateways.clear(),
            Kind::HttpRoute => self.http_routes.clear(),
            Kind::GrpcRoute => self.grpc_routes.clear(),
            Kind::TcpRoute => self.tcp_routes.clear(),
            Kind::TlsRoute => self.tls_routes.clear(),
            Kind::ReferenceGrant => self.reference_grants.clear(),
            Kind::AuthorizationPolicy => self.authorization_policies.clear(),
            Kind::PeerAuthentication => self.peer_authentications.clear(),
            Kind::RequestAuthentication => self.request_authentications.clear(),
            Kind::VirtualService => self.virtual_services.clear(),
            Kind::DestinationRule => self.destination_rules.clear(),
            Kind::ServiceEntry => self.service_entries.clear(),
            Kind::WorkloadEntry => self.workload_entries.clear(),
            Kind::WorkloadGroup => self.workload_groups.clear(),
            Kind::Secret => self.secrets.clear(),
            Kind::LocalRateLimitPolicy => self.rate_limits.clear(),
            Kind::Telemetry => self.telemetries.clear(),
        }
    }

    /// Labels of a namespace (empty when it is unknown).
    pub fn namespace_labels(&self, namespace: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(namespace).and_then(|n| n.metadata.labels.as_ref())
    }
}

/// Objects of one namespace from a map keyed by [`ObjectKey`] (keys order by namespace first).
pub fn in_namespace<'a, 'n, V>(
    map: &'a BTreeMap<ObjectKey, V>,
    ns: &'n str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a V)> + use<'a, 'n, V> {
    map.range(ObjectKey::new(ns, "")..)
        .take_while(move |(k, _)| k.namespace == ns)
}

/// A label selector's `matchLabels` against an object's labels; an empty selector selects all.
pub fn selects(match_labels: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    match_labels
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)).is_some_and(|have| have == v))
}
