//! [`kube::Resource`] for the controller's own Gateway API and Istio structs, at the version
//! the controller reads (`v1`; TCPRoute only exists as `v1alpha2`), and [`api_resource`] to
//! address any [`Kind`] dynamically.
//!
//! Clusters serve different versions of the Istio and Gateway API CRDs (an older Istio has no
//! `security.istio.io/v1`), so [`discover`] asks the API server and [`pick_version`] chooses,
//! per kind, the first served version we read, or says the kind is not served or is served
//! only at versions we cannot read (a pure function, unit-tested).

use std::borrow::Cow;

use ::kube::core::{ApiResource, ClusterResourceScope, NamespaceResourceScope};
use ::kube::Resource;

use crate::model::{
    gateway, istio, rate_limit, reference_grant, service_entry, EndpointSlice, Kind, Namespace, ObjectMeta, Pod,
    Secret, Service, ServiceAccount,
};

/// The version the controller reads and writes for `kind`: the first it knows.
pub fn served_version(kind: Kind) -> &'static str {
    kind.versions().first().copied().unwrap_or("v1")
}

macro_rules! resource {
    ($($ty:ty => $kind:ident, $plural:literal, $scope:ty;)+) => {
        $(
            impl Resource for $ty {
                type DynamicType = ();
                type Scope = $scope;

                fn kind(_: &()) -> Cow<'_, str> {
                    Cow::Borrowed(Kind::$kind.name())
                }

                fn group(_: &()) -> Cow<'_, str> {
                    Cow::Borrowed(Kind::$kind.group())
                }

                fn version(_: &()) -> Cow<'_, str> {
                    Cow::Borrowed(served_version(Kind::$kind))
                }

                fn plural(_: &()) -> Cow<'_, str> {
                    Cow::Borrowed($plural)
                }

                fn meta(&self) -> &ObjectMeta {
                    &self.metadata
                }

                fn meta_mut(&mut self) -> &mut ObjectMeta {
                    &mut self.metadata
                }
            }
        )+
    };
}

resource! {
    Pod => Pod, "pods", NamespaceResourceScope;
    EndpointSlice => EndpointSlice, "endpointslices", NamespaceResourceScope;
    gateway::GatewayClass => GatewayClass, "gatewayclasses", ClusterResourceScope;
    gateway::Gateway => Gateway, "gateways", NamespaceResourceScope;
    gateway::HttpRoute => HttpRoute, "httproutes", NamespaceResourceScope;
    gateway::GrpcRoute => GrpcRoute, "grpcroutes", NamespaceResourceScope;
    gateway::TcpRoute => TcpRoute, "tcproutes", NamespaceResourceScope;
    gateway::TlsRoute => TlsRoute, "tlsroutes", NamespaceResourceScope;
    reference_grant::ReferenceGrant => ReferenceGrant, "referencegrants", NamespaceResourceScope;
    istio::AuthorizationPolicy => AuthorizationPolicy, "authorizationpolicies", NamespaceResourceScope;
    istio::PeerAuthentication => PeerAuthentication, "peerauthentications", NamespaceResourceScope;
    istio::RequestAuthentication => RequestAuthentication, "requestauthentications", NamespaceResourceScope;
    istio::VirtualService => VirtualService, "virtualservices", NamespaceResourceScope;
    istio::DestinationRule => DestinationRule, "destinationrules", NamespaceResourceScope;
    service_entry::ServiceEntry => ServiceEntry, "serviceentries", NamespaceResourceScope;
    service_entry::WorkloadEntry => WorkloadEntry, "workloadentries", NamespaceResourceScope;
    service_entry::WorkloadGroup => WorkloadGroup, "workloadgroups", NamespaceResourceScope;
    rate_limit::LocalRateLimitPolicy => LocalRateLimitPolicy, "localratelimitpolicies", NamespaceResourceScope;
    istio::Telemetry => Telemetry, "telemetries", NamespaceResourceScope;
}

/// Group, version, kind and plural of `kind`, for dynamic (untyped) requests.
pub fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Namespace => ApiResource::erase::<Namespace>(&()),
        Kind::Node => ApiResource::erase::<crate::model::Node>(&()),
        Kind::Pod => ApiResource::erase::<Pod>(&()),
        Kind::Service => ApiResource::erase::<Service>(&()),
        Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        Kind::ServiceAccount => ApiResource::erase::<ServiceAccount>(&()),
        Kind::GatewayClass => ApiResource::erase::<gateway::GatewayClass>(&()),
        Kind::Gateway => ApiResource::erase::<gateway::Gateway>(&()),
        Kind::HttpRoute => ApiResource::erase::<gateway::HttpRoute>(&()),
        Kind::GrpcRoute => ApiResource::erase::<gateway::GrpcRoute>(&()),
        Kind::TcpRoute => ApiResource::erase::<gateway::TcpRoute>(&()),
        Kind::TlsRoute => ApiResource::erase::<gateway::TlsRoute>(&()),
        Kind::ReferenceGrant => ApiResource::erase::<reference_grant::ReferenceGrant>(&()),
        Kind::AuthorizationPolicy => ApiResource::erase::<istio::AuthorizationPolicy>(&()),
        Kind::PeerAuthentication => ApiResource::erase::<istio::PeerAuthentication>(&()),
        Kind::RequestAuthentication => ApiResource::erase::<istio::RequestAuthentication>(&()),
        Kind::VirtualService => ApiResource::erase::<istio::VirtualService>(&()),
        Kind::DestinationRule => ApiResource::erase::<istio::DestinationRule>(&()),
        Kind::ServiceEntry => ApiResource::erase::<service_entry::ServiceEntry>(&()),
        Kind::WorkloadEntry => ApiResource::erase::<service_entry::WorkloadEntry>(&()),
        Kind::WorkloadGroup => ApiResource::erase::<service_entry::WorkloadGroup>(&()),
        Kind::Secret => ApiResource::erase::<Secret>(&()),
        Kind::LocalRateLimitPolicy => ApiResource::erase::<rate_limit::LocalRateLimitPolicy>(&()),
        Kind::Telemetry => ApiResource::erase::<istio::Telemetry>(&()),
    }
}

/// Which version of a custom kind to read, from what the API server serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServedVersion {
    /// The first of the versions we read (in our order of preference) that is served.
    Read(&'static str),
    /// The kind is served at no version (its CRD is not installed): empty is the truth.
    NotServed,
    /// Served, but only at versions we do not read: its objects are unknown to us.
    Unreadable(String),
}

/// Istio and Gateway API kinds: CRDs, whose served versions differ between clusters.
pub fn is_custom(kind: Kind) -> bool {
    kind.group().ends_with(".istio.io") || kind.group() == "gateway.networking.k8s.io"
}

/// Picks `kind`'s version from `served` (each version its group serves, with the kind names
/// served at it), falling back in the order of [`Kind::versions`] (v1, v1beta1, v1alpha3...).
pub fn pick_version(kind: Kind, served: &[(String, Vec<String>)]) -> ServedVersion {
    let serves = |v: &str| {
        served
            .iter()
            .any(|(sv, kinds)| sv == v && kinds.iter().any(|k| k == kind.name()))
    };
    if let Some(v) = kind.versions().iter().copied().find(|v| serves(v)) {
        return ServedVersion::Read(v);
    }
    let others: Vec<&str> = served
        .iter()
        .filter(|(_, kinds)| kinds.iter().any(|k| k == kind.name()))
        .map(|(v, _)| v.as_str())
        .collect();
    if others.is_empty() {
        return ServedVersion::NotServed;
    }
    ServedVersion::Unreadable(format!(
        "served only as {}; this controller reads {}",
        others.join(", "),
        kind.versions().join(", ")
    ))
}

/// Asks the API server which versions of `group` it serves, and which kinds at each; `None`
/// when discovery itself fails (the caller then reads its default version and lets the
/// watch report what happens). A group that is not served at all is an empty list.
pub async fn discover(client: &::kube::Client, group: &str) -> Option<Vec<(String, Vec<String>)>> {
    match ::kube::discovery::group(client, group).await {
        Ok(g) => Some(
            g.versions()
                .map(|v| {
                    let kinds = g.versioned_resources(v).into_iter().map(|(ar, _)| ar.kind).collect();
                    (v.to_owned(), kinds)
                })
                .collect(),
        ),
        Err(::kube::Error::Api(status)) if status.is_not_found() => Some(Vec::new()),
        Err(e) => {
            tracing::warn!(group, error = %e, "API discovery failed; reading the default versions");
            None
        }
    }
}

/// [`api_resource`] at `version`.
pub fn api_resource_at(kind: Kind, version: &str) -> ApiResource {
    let mut ar = api_resource(kind);
    ar.version = version.to_owned();
    ar.api_version = format!("{}/{version}", ar.group);
    ar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_version_discovery_falls_back_in_order() {
        let served = |list: &[(&str, &[&str])]| -> Vec<(String, Vec<String>)> {
            list.iter()
                .map(|(v, kinds)| (v.to_string(), kinds.iter().map(|k| k.to_string()).collect()))
                .collect()
        };
        let ap = Kind::AuthorizationPolicy;
        // A current Istio serves v1 and v1beta1: v1.
        let both = served(&[("v1", &["AuthorizationPolicy"]), ("v1beta1", &["AuthorizationPolicy"])]);
        assert_eq!(pick_version(ap, &both), ServedVersion::Read("v1"));
        // An older Istio without security.istio.io/v1 (was a silent 404, fail-open): v1beta1.
        let old = served(&[("v1beta1", &["AuthorizationPolicy", "PeerAuthentication"])]);
        assert_eq!(pick_version(ap, &old), ServedVersion::Read("v1beta1"));
        assert_eq!(
            pick_version(Kind::PeerAuthentication, &old),
            ServedVersion::Read("v1beta1")
        );
        // The group is there, the kind is not: no CRD.
        assert_eq!(
            pick_version(Kind::RequestAuthentication, &old),
            ServedVersion::NotServed
        );
        assert_eq!(pick_version(ap, &[]), ServedVersion::NotServed);
        // Only at a version we do not read: unreadable, said why.
        let alpha = served(&[("v1alpha1", &["AuthorizationPolicy"])]);
        match pick_version(ap, &alpha) {
            ServedVersion::Unreadable(why) => assert!(why.contains("v1alpha1"), "{why}"),
            other => panic!("{other:?}"),
        }
        // VirtualService on an Istio that still serves only v1alpha3.
        let vs = served(&[("v1alpha3", &["VirtualService", "DestinationRule"])]);
        assert_eq!(pick_version(Kind::VirtualService, &vs), ServedVersion::Read("v1alpha3"));
        assert_eq!(
            api_resource_at(Kind::VirtualService, "v1alpha3").api_version,
            "networking.istio.io/v1alpha3"
        );
        assert!(is_custom(Kind::HttpRoute) && is_custom(Kind::DestinationRule) && !is_custom(Kind::Pod));
    }

    #[test]
    fn every_kind_matches_the_model() {
        for &kind in Kind::ALL {
            let ar = api_resource(kind);
            assert_eq!(ar.kind, kind.name());
            assert_eq!(ar.group, kind.group());
            // What the watch reads must parse back through `Object::parse`.
            assert!(
                kind.versions().contains(&ar.version.as_str()),
                "{kind:?} {}",
                ar.version
            );
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            gateway::Gateway::url_path(&(), Some("ns")),
            "/apis/gateway.networking.k8s.io/v1/namespaces/ns/gateways"
        );
        assert_eq!(
            gateway::GatewayClass::url_path(&(), None),
            "/apis/gateway.networking.k8s.io/v1/gatewayclasses"
        );
        assert_eq!(
            istio::AuthorizationPolicy::url_path(&(), Some("a")),
            "/apis/security.istio.io/v1/namespaces/a/authorizationpolicies"
        );
        assert_eq!(
            istio::DestinationRule::api_version(&()),
            "networking.istio.io/v1",
            "api_version is derived from group and version"
        );
        assert_eq!(api_resource(Kind::GrpcRoute).plural, "grpcroutes");
        assert_eq!(
            api_resource(Kind::RequestAuthentication).plural,
            "requestauthentications"
        );
        assert_eq!(api_resource(Kind::VirtualService).plural, "virtualservices");
        assert_eq!(api_resource(Kind::PeerAuthentication).plural, "peerauthentications");
        assert_eq!(api_resource(Kind::HttpRoute).plural, "httproutes");
        assert_eq!(
            api_resource(Kind::ReferenceGrant).api_version,
            "gateway.networking.k8s.io/v1beta1"
        );
    }
}
