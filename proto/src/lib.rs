//! Protobuf wire types shared with Istio's ambient data plane, generated at build time by
//! protox + tonic-build from `proto/*.proto` (no system `protoc` needed).

// Generated code: message layout is dictated by the wire format, not by lint preferences.
#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

/// Workload discovery: `istio.workload.Address`, `Workload`, `Service`.
pub mod workload {
    tonic::include_proto!("istio.workload");

    /// ZDS: node agent <-> ztunnel.
    pub mod zds {
        tonic::include_proto!("istio.workload.zds");
    }
}

/// L4 authorization: `istio.security.Authorization`.
pub mod security {
    tonic::include_proto!("istio.security");
}

/// Delta ADS envelope.
pub mod discovery {
    tonic::include_proto!("envoy.service.discovery.v3");
}

/// The CA service.
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// The waypoint's L7 configuration (our own package).
pub mod waypoint {
    tonic::include_proto!("mesh.waypoint.v1");
}

/// OpenTelemetry's OTLP (`opentelemetry.proto.*`, the subset the waypoint exports): access-log
/// records and spans, and the collector services (`LogsService`, `TraceService`) they go to.
pub mod otlp {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.common.v1");
        }
    }
    pub mod resource {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.resource.v1");
        }
    }
    pub mod logs {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.logs.v1");
        }
    }
    pub mod trace {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.trace.v1");
        }
    }
    pub mod collector {
        pub mod logs {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.logs.v1");
            }
        }
        pub mod trace {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
            }
        }
    }
}

/// Type URL of `istio.workload.Address` resources.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of `istio.security.Authorization` resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of `mesh.waypoint.v1.ServiceRoutes` resources.
pub const SERVICE_ROUTES_TYPE_URL: &str = "type.googleapis.com/mesh.waypoint.v1.ServiceRoutes";
/// Type URL of `mesh.waypoint.v1.Policy` resources.
pub const WAYPOINT_POLICY_TYPE_URL: &str = "type.googleapis.com/mesh.waypoint.v1.Policy";
/// Type URL of `mesh.waypoint.v1.IngressGateway` resources (served only to the gateway's own identity).
pub const INGRESS_GATEWAY_TYPE_URL: &str = "type.googleapis.com/mesh.waypoint.v1.IngressGateway";
/// Type URL of `mesh.waypoint.v1.WaypointCredentials` resources (served only to the waypoint's own identity).
pub const WAYPOINT_CREDENTIALS_TYPE_URL: &str = "type.googleapis.com/mesh.waypoint.v1.WaypointCredentials";
