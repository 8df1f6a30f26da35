//! [`Object`]: one declared object of a kind the controller understands, parsed from its
//! `apiVersion`/`kind` and checked enough that translation can trust its keys.

use serde::de::DeserializeOwned;

use super::{
    gateway, istio, rate_limit, reference_grant, service_entry, EndpointSlice, Namespace, Node, ObjectKey, ObjectMeta,
    Pod, Secret, Service, ServiceAccount,
};

macro_rules! kinds {
    ($( $variant:ident($ty:ty) = $group:literal, $kind:literal, cluster: $cluster:literal, versions: [$($v:literal),+] ;)+) => {
        /// The kinds the controller reads.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        pub enum Kind { $($variant),+ }

        /// One object of a known kind. Node (k8s-openapi's, with its status) is the largest
        /// variant; objects are moved a few times on their way into `Inputs`, so boxing
        /// would only add an allocation per object.
        #[derive(Clone, Debug)]
        #[allow(clippy::large_enum_variant)]
        pub enum Object { $($variant($ty)),+ }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$variant),+];

            /// The API group (empty for the core group).
            pub fn group(self) -> &'static str {
                match self { $(Kind::$variant => $group),+ }
            }

            /// The `kind` field's value.
            pub fn name(self) -> &'static str {
                match self { $(Kind::$variant => $kind),+ }
            }

            pub fn cluster_scoped(self) -> bool {
                match self { $(Kind::$variant => $cluster),+ }
            }

            /// Versions accepted in `apiVersion` (the served versions of the real API).
            pub fn versions(self) -> &'static [&'static str] {
                match self { $(Kind::$variant => &[$($v),+]),+ }
            }

            /// Finds the kind for an `apiVersion` and `kind` pair.
            pub fn lookup(api_version: &str, kind: &str) -> Result<Kind, ParseError> {
                let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
                let known = Kind::ALL.iter().copied().find(|k| k.name() == kind && k.group() == group)
                    .ok_or_else(|| ParseError::UnknownKind { api_version: api_version.to_owned(), kind: kind.to_owned() })?;
                if !known.versions().contains(&version) {
                    return Err(ParseError::UnknownVersion { kind: kind.to_owned(), version: version.to_owned(), known: known.versions().join(", ") });
                }
                Ok(known)
            }

            fn parse(self, value: serde_json::Value) -> Result<Object, ParseError> {
                Ok(match self { $(Kind::$variant => Object::$variant(typed(value)?)),+ })
            }
        }

        impl Object {
            pub fn kind(&self) -> Kind {
                match self { $(Object::$variant(_) => Kind::$variant),+ }
            }

            pub fn metadata(&self) -> &ObjectMeta {
                match self { $(Object::$variant(o) => &o.metadata),+ }
            }
        }
    };
}

kinds! {
    Namespace(Namespace) = "", "Namespace", cluster: true, versions: ["v1"];
    Node(Node) = "", "Node", cluster: true, versions: ["v1"];
    Pod(Pod) = "", "Pod", cluster: false, versions: ["v1"];
    Service(Service) = "", "Service", cluster: false, versions: ["v1"];
    EndpointSlice(EndpointSlice) = "discovery.k8s.io", "EndpointSlice", cluster: false, versions: ["v1"];
    ServiceAccount(ServiceAccount) = "", "ServiceAccount", cluster: false, versions: ["v1"];
    GatewayClass(gateway::GatewayClass) = "gateway.networking.k8s.io", "GatewayClass", cluster: true, versions: ["v1", "v1beta1"];
    Gateway(gateway::Gateway) = "gateway.networking.k8s.io", "Gateway", cluster: false, versions: ["v1", "v1beta1"];
    HttpRoute(gateway::HttpRoute) = "gateway.networking.k8s.io", "HTTPRoute", cluster: false, versions: ["v1", "v1beta1"];
    GrpcRoute(gateway::GrpcRoute) = "gateway.networking.k8s.io", "GRPCRoute", cluster: false, versions: ["v1"];
    TcpRoute(gateway::TcpRoute) = "gateway.networking.k8s.io", "TCPRoute", cluster: false, versions: ["v1alpha2"];
    TlsRoute(gateway::TlsRoute) = "gateway.networking.k8s.io", "TLSRoute", cluster: false, versions: ["v1alpha2", "v1alpha3"];
    ReferenceGrant(reference_grant::ReferenceGrant) = "gateway.networking.k8s.io", "ReferenceGrant", cluster: false, versions: ["v1beta1"];
    AuthorizationPolicy(istio::AuthorizationPolicy) = "security.istio.io", "AuthorizationPolicy", cluster: false, versions: ["v1", "v1beta1"];
    PeerAuthentication(istio::PeerAuthentication) = "security.istio.io", "PeerAuthentication", cluster: false, versions: ["v1", "v1beta1"];
    RequestAuthentication(istio::RequestAuthentication) = "security.istio.io", "RequestAuthentication", cluster: false, versions: ["v1", "v1beta1"];
    VirtualService(istio::VirtualService) = "networking.istio.io", "VirtualService", cluster: false, versions: ["v1", "v1beta1", "v1alpha3"];
    DestinationRule(istio::DestinationRule) = "networking.istio.io", "DestinationRule", cluster: false, versions: ["v1", "v1beta1", "v1alpha3"];
    ServiceEntry(service_entry::ServiceEntry) = "networking.istio.io", "ServiceEntry", cluster: false, versions: ["v1", "v1beta1", "v1alpha3"];
    WorkloadEntry(service_entry::WorkloadEntry) = "networking.istio.io", "WorkloadEntry", cluster: false, versions: ["v1", "v1beta1", "v1alpha3"];
    WorkloadGroup(service_entry::WorkloadGroup) = "networking.istio.io", "WorkloadGroup", cluster: false, versions: ["v1", "v1beta1", "v1alpha3"];
    Secret(Secret) = "", "Secret", cluster: false, versions: ["v1"];
    Telemetry(istio::Telemetry) = "telemetry.istio.io", "Telemetry", cluster: false, versions: ["v1", "v1alpha1"];
    LocalRateLimitPolicy(rate_limit::LocalRateLimitPolicy) = "policy.ambient-mesh.io", "LocalRateLimitPolicy", cluster: false, versions: ["v1alpha1"];
}

/// Why a document is not a usable object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("missing or non-string `{0}`")]
    MissingField(&'static str),
    #[error("unsupported kind {kind:?} in apiVersion {api_version:?}")]
    UnknownKind { api_version: String, kind: String },
    #[error("{kind} has no version {version:?} (known: {known})")]
    UnknownVersion {
        kind: String,
        version: String,
        known: String,
    },
    #[error("metadata.name is missing or empty")]
    MissingName,
    #[error("{0}")]
    Shape(String),
}

fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ParseError> {
    // serde_path_to_error would give a path; serde_json's message already names the field.
    serde_json::from_value(value).map_err(|e| ParseError::Shape(e.to_string()))
}

impl Object {
    /// Parses one document (already decoded from YAML or JSON).
    pub fn parse(value: serde_json::Value) -> Result<Object, ParseError> {
        let field = |name: &'static str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or(ParseError::MissingField(name))
        };
        let kind = Kind::lookup(&field("apiVersion")?, &field("kind")?)?;
        let object = kind.parse(value)?;
        if object.metadata().name.as_deref().unwrap_or("").is_empty() {
            return Err(ParseError::MissingName);
        }
        Ok(object)
    }

    pub fn key(&self) -> ObjectKey {
        ObjectKey::of(self.metadata(), self.kind().cluster_scoped())
    }
}
