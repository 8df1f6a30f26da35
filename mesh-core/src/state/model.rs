//! The mesh model ztunnel routes and authorizes with, validated from the wire types.
//! Conversion errors name the field that was wrong so a bad resource can be NACKed precisely.

use std::net::IpAddr;

use mesh_proto::workload as pb;

use crate::identity::{Identity, IdentityError};

/// A resource that cannot be used, and why.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ResourceError {
    pub field: String,
    pub reason: String,
}

impl ResourceError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ResourceError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Parses a raw 4 or 16 byte address.
pub fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b)
            .ok()
            .map(|a| std::net::Ipv6Addr::from(a).to_canonical()),
        _ => None,
    }
}

/// Raw bytes of an address, as the wire carries it.
pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Tunnel {
    None,
    Hbone,
}

/// A service port and the workload port it forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
}

/// The application protocol a service port declares (`appProtocol`, else the port name's
/// prefix, as the control plane read it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum AppProtocol {
    /// Not declared: a proxy may detect the protocol.
    #[default]
    Unknown,
    Http11,
    Http2,
    Grpc,
    /// A protocol this version does not know, from a newer control plane: HTTP for the
    /// protocol check (never opaque bytes), but no particular HTTP version upstream.
    OtherHttp,
}

impl AppProtocol {
    /// Whether the port is declared to carry HTTP (any version, gRPC included).
    pub fn is_http(self) -> bool {
        !matches!(self, AppProtocol::Unknown)
    }
}

impl From<i32> for AppProtocol {
    /// A value this version does not know counts as HTTP: a newer control plane declaring a
    /// protocol must not make a proxy treat the port as opaque bytes. Declared TCP or TLS is
    /// not HTTP, so it is `Unknown` (no HTTP handling is forced on it).
    fn from(v: i32) -> Self {
        match pb::AppProtocol::try_from(v) {
            Ok(pb::AppProtocol::Unknown | pb::AppProtocol::Tcp | pb::AppProtocol::Tls) => AppProtocol::Unknown,
            Ok(pb::AppProtocol::Http11) => AppProtocol::Http11,
            Ok(pb::AppProtocol::Http2) => AppProtocol::Http2,
            Ok(pb::AppProtocol::Grpc) => AppProtocol::Grpc,
            Err(_) => AppProtocol::OtherHttp,
        }
    }
}

/// Where a waypoint is reached.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum GatewayDestination {
    Address { network: String, ip: IpAddr },
    Hostname { namespace: String, hostname: String },
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_port: u16,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub tunnel: Tunnel,
    pub identity: Identity,
    pub waypoint: Option<GatewayAddress>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    /// Services selecting this workload ("ns/hostname") and their port mappings. A short
    /// list: a workload belongs to few services, and a map per workload costs far more.
    pub services: Vec<(String, Vec<PortMapping>)>,
    /// Selector policies ("ns/name") that select this workload.
    pub authorization_policies: Vec<String>,
    pub healthy: bool,
    pub cluster_id: String,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<(String, IpAddr)>,
    pub ports: Vec<PortMapping>,
    pub subject_alt_names: Vec<Identity>,
    pub waypoint: Option<GatewayAddress>,
    /// False when the service's load balancing allows unhealthy endpoints.
    pub only_healthy: bool,
}

impl Workload {
    /// This workload's port mappings for the service `key` ("ns/hostname").
    pub fn service_ports(&self, key: &str) -> Option<&[PortMapping]> {
        self.services.iter().find(|(k, _)| k == key).map(|(_, p)| p.as_slice())
    }

    /// An address of the same family as `like`, else the first one.
    pub fn address_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == like.is_ipv4())
            .or_else(|| self.addresses.first().copied())
    }

    /// The port this workload serves `service`'s `port` on: its own mapping (named target
    /// ports) wins over the service's; `None` when the service has no such port.
    pub fn target_port(&self, service: &Service, port: u16) -> Option<u16> {
        let declared = service.ports.iter().find(|p| p.service_port == port)?;
        let own = self
            .service_ports(&service.key())
            .and_then(|ps| ps.iter().find(|p| p.service_port == port))
            .map(|p| p.target_port)
            .filter(|p| *p != 0);
        Some(own.unwrap_or(if declared.target_port == 0 {
            declared.service_port
        } else {
            declared.target_port
        }))
    }
}

impl Service {
    /// The xDS resource name.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

fn port(field: &str, v: u32) -> Result<u16, ResourceError> {
    u16::try_from(v).map_err(|_| ResourceError::new(field, format!("{v} is not a valid port")))
}

fn mappings(field: &str, ports: &[pb::Port]) -> Result<Vec<PortMapping>, ResourceError> {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let service_port = port(&format!("{field}[{i}].service_port"), p.service_port)?;
            let target = port(&format!("{field}[{i}].target_port"), p.target_port)?;
            Ok(PortMapping {
                service_port,
                target_port: target,
            })
        })
        .collect()
}

pub(crate) fn gateway(field: &str, g: &pb::GatewayAddress) -> Result<GatewayAddress, ResourceError> {
    let destination = match &g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
            network: a.network.clone(),
            ip: ip_from_bytes(&a.address)
                .ok_or_else(|| ResourceError::new(format!("{field}.address"), "not a 4 or 16 byte IP"))?,
        },
        Some(pb::gateway_address::Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        },
        None => return Err(ResourceError::new(field, "neither address nor hostname set")),
    };
    let hbone_port = match g.hbone_mtls_port {
        0 => crate::capture::HBONE_PORT,
        p => port(&format!("{field}.hbone_mtls_port"), p)?,
    };
    Ok(GatewayAddress {
        destination,
        hbone_port,
    })
}

fn identity_err(field: &str) -> impl Fn(IdentityError) -> ResourceError + '_ {
    move |e| ResourceError::new(field, e.to_string())
}

impl TryFrom<&pb::Workload> for Workload {
    type Error = ResourceError;

    fn try_from(w: &pb::Workload) -> Result<Self, ResourceError> {
        if w.uid.is_empty() {
            return Err(ResourceError::new("workload.uid", "must not be empty"));
        }
        let addresses = w
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                ip_from_bytes(a).ok_or_else(|| {
                    ResourceError::new(
                        format!("workload.addresses[{i}]"),
                        format!("{} bytes is not an IP", a.len()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sa = if w.service_account.is_empty() {
            "default"
        } else {
            &w.service_account
        };
        let identity = Identity::new(&w.trust_domain, &w.namespace, sa).map_err(identity_err("workload.identity"))?;
        let tunnel = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(pb::TunnelProtocol::None) => Tunnel::None,
            Ok(pb::TunnelProtocol::Hbone) => Tunnel::Hbone,
            _ => {
                return Err(ResourceError::new(
                    "workload.tunnel_protocol",
                    format!("{} is not supported (NONE or HBONE)", w.tunnel_protocol),
                ))
            }
        };
        let waypoint = w
            .waypoint
            .as_ref()
            .map(|g| gateway("workload.waypoint", g))
            .transpose()?;
        let mut services = w
            .services
            .iter()
            .map(|(k, v)| Ok((k.clone(), mappings(&format!("workload.services[{k}]"), &v.ports)?)))
            .collect::<Result<Vec<_>, ResourceError>>()?;
        services.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            addresses,
            network: w.network.clone(),
            tunnel,
            identity,
            waypoint,
            node: w.node.clone(),
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            workload_name: w.workload_name.clone(),
            services,
            authorization_policies: w.authorization_policies.clone(),
            healthy: w.status == pb::WorkloadStatus::Healthy as i32,
            cluster_id: w.cluster_id.clone(),
        })
    }
}

impl TryFrom<&pb::Service> for Service {
    type Error = ResourceError;

    fn try_from(s: &pb::Service) -> Result<Self, ResourceError> {
        if s.hostname.is_empty() || s.namespace.is_empty() {
            return Err(ResourceError::new(
                "service.hostname",
                "namespace and hostname must be set",
            ));
        }
        let vips = s
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                ip_from_bytes(&a.address)
                    .map(|ip| (a.network.clone(), ip))
                    .ok_or_else(|| ResourceError::new(format!("service.addresses[{i}]"), "not a 4 or 16 byte IP"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let subject_alt_names = s
            .subject_alt_names
            .iter()
            .map(|san| san.parse().map_err(identity_err("service.subject_alt_names")))
            .collect::<Result<Vec<_>, _>>()?;
        let only_healthy = s
            .load_balancing
            .as_ref()
            .map(|lb| lb.health_policy != pb::load_balancing::HealthPolicy::AllowAll as i32)
            .unwrap_or(true);
        Ok(Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            vips,
            ports: mappings("service.ports", &s.ports)?,
            subject_alt_names,
            waypoint: s
                .waypoint
                .as_ref()
                .map(|g| gateway("service.waypoint", g))
                .transpose()?,
            only_healthy,
        })
    }
}
