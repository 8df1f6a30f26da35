//! The waypoint controller's decisions: for every `Gateway` of class `istio-waypoint`, what
//! must run (a ServiceAccount, a Deployment of the waypoint binary, a Service on 15008) and
//! what its status says; an ingress Gateway (class `istio`) is the same record with
//! [`IngressDeployment`] (its listener ports on a LoadBalancer Service, `--role ingress`). In a cluster these become owned objects; in local mode they are
//! records the demo and the test harness act on.

pub mod scaling;

use std::net::IpAddr;

use crate::model::ObjectKey;

/// Traffic a waypoint handles (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("service") => Ok(WaypointFor::Service),
            Some("workload") => Ok(WaypointFor::Workload),
            Some("all") => Ok(WaypointFor::All),
            Some("none") => Ok(WaypointFor::None),
            Some(other) => Err(format!(
                "istio.io/waypoint-for {other:?} is not one of service, workload, all, none"
            )),
        }
    }

    /// The label value, as `parse` reads it.
    pub fn label(self) -> &'static str {
        match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
            WaypointFor::None => "none",
        }
    }

    pub fn services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    pub fn workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// What must exist for one waypoint Gateway.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WaypointDeployment {
    /// The Gateway; the ServiceAccount, Deployment and Service share its name and namespace.
    pub gateway: ObjectKey,
    /// The Gateway's uid, for owner references (empty in local mode).
    pub gateway_uid: String,
    pub service_account: String,
    /// The SPIFFE identity its certificate carries.
    pub identity: String,
    pub waypoint_for: WaypointFor,
    /// HBONE port (the listener port, 15008).
    pub hbone_port: u16,
    /// The address ztunnels send to: the waypoint Service's cluster IP once known.
    pub address: Option<IpAddr>,
    /// Accepted=True/Programmed=... reasons, or why it is not accepted.
    pub conditions: Vec<Condition>,
    /// Replicas or autoscaling, resources, disruption budget, spread (from the Gateway).
    /// Where its spans go: the mesh-wide Telemetry's tracing provider (or the default one) of
    /// MeshConfig `extensionProviders`, so deployed waypoints trace with no flags of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_export: Option<crate::mesh_config::TraceExport>,
    /// MeshConfig `pathNormalization`, when not the waypoint's default (`BASE`): the value of
    /// its `--path-normalization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<String>,
    /// Left out of the JSON when the Gateway asks for nothing, as most do.
    #[serde(default, skip_serializing_if = "scaling::Scaling::is_default")]
    pub scaling: scaling::Scaling,
    /// Set for an ingress gateway (the same binary, `--role ingress`); `None`: a waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressDeployment>,
}

/// What an ingress gateway (class `istio`) needs besides what a waypoint does: its
/// listeners' ports on a Service of `service_type`, and the listener statuses written with
/// the Gateway's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IngressDeployment {
    /// Each listener port once, with the protocol of its first listener.
    pub ports: Vec<IngressPort>,
    /// `LoadBalancer` unless the Gateway's `networking.istio.io/service-type` says otherwise.
    pub service_type: String,
    pub listeners: Vec<crate::translate::ingress::ListenerStatus>,
    /// Where clients reach it (the Gateway's `status.addresses`): the load balancer's
    /// addresses for a LoadBalancer Service, the cluster IP otherwise; empty until assigned.
    #[serde(default)]
    pub addresses: Vec<crate::model::gateway::GatewayStatusAddress>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IngressPort {
    pub port: u16,
    /// The Gateway API protocol (`HTTP`, `HTTPS`, `TLS`, `TCP`).
    pub protocol: String,
}

/// A Gateway API style status condition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Condition {
    /// `Accepted` or `Programmed`.
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}
