//! [`kube::Resource`] for the controller's own Gateway API and Istio structs, at the version
//! the controller reads (`v1`; TCPRoute only exists as `v1alpha2`), and [`api_resource`] to
//! address any [`Kind`] dynamically.

use std::borrow::Cow;

use ::kube::core::{ApiResource, ClusterResourceScope, NamespaceResourceScope};
use ::kube::Resource;

use crate::model::{
    gateway, istio, reference_grant, EndpointSlice, Kind, Namespace, ObjectMeta, Pod, Service, ServiceAccount,
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
    gateway::GatewayClass => GatewayClass, "gatewayclasses", ClusterResourceScope;
    gateway::Gateway => Gateway, "gateways", NamespaceResourceScope;
    gateway::HttpRoute => HttpRoute, "httproutes", NamespaceResourceScope;
    gateway::GrpcRoute => GrpcRoute, "grpcroutes", NamespaceResourceScope;
    gateway::TcpRoute => TcpRoute, "tcproutes", NamespaceResourceScope;
    reference_grant::ReferenceGrant => ReferenceGrant, "referencegrants", NamespaceResourceScope;
    istio::AuthorizationPolicy => AuthorizationPolicy, "authorizationpolicies", NamespaceResourceScope;
    istio::PeerAuthentication => PeerAuthentication, "peerauthentications", NamespaceResourceScope;
    istio::RequestAuthentication => RequestAuthentication, "requestauthentications", NamespaceResourceScope;
    istio::VirtualService => VirtualService, "virtualservices", NamespaceResourceScope;
    istio::DestinationRule => DestinationRule, "destinationrules", NamespaceResourceScope;
}

/// Group, version, kind and plural of `kind`, for dynamic (untyped) requests.
pub fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Namespace => ApiResource::erase::<Namespace>(&()),
        Kind::Pod => ApiResource::erase::<Pod>(&()),
        Kind::Service => ApiResource::erase::<Service>(&()),
        Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        Kind::ServiceAccount => ApiResource::erase::<ServiceAccount>(&()),
        Kind::GatewayClass => ApiResource::erase::<gateway::GatewayClass>(&()),
        Kind::Gateway => ApiResource::erase::<gateway::Gateway>(&()),
        Kind::HttpRoute => ApiResource::erase::<gateway::HttpRoute>(&()),
        Kind::GrpcRoute => ApiResource::erase::<gateway::GrpcRoute>(&()),
        Kind::TcpRoute => ApiResource::erase::<gateway::TcpRoute>(&()),
        Kind::ReferenceGrant => ApiResource::erase::<reference_grant::ReferenceGrant>(&()),
        Kind::AuthorizationPolicy => ApiResource::erase::<istio::AuthorizationPolicy>(&()),
        Kind::PeerAuthentication => ApiResource::erase::<istio::PeerAuthentication>(&()),
        Kind::RequestAuthentication => ApiResource::erase::<istio::RequestAuthentication>(&()),
        Kind::VirtualService => ApiResource::erase::<istio::VirtualService>(&()),
        Kind::DestinationRule => ApiResource::erase::<istio::DestinationRule>(&()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
