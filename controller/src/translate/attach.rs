//! Waypoints and who uses them: which `Gateway`s are waypoints, where they are reached, and
//! the `istio.io/use-waypoint` resolution for pods and services (object label, then namespace
//! label; `none` opts out; `istio.io/use-waypoint-namespace` points across namespaces; the
//! gateway's `istio.io/waypoint-for` decides whether it takes service or workload traffic).

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::capture::HBONE_PORT;
use mesh_core::state::model::ip_to_bytes;
use mesh_proto::workload as pb;

use super::{service_hostname, Options, Report};
use crate::model::gateway::{Gateway, Listener, WAYPOINT_CLASS};
use crate::model::{Inputs, Kind, ObjectKey, ObjectMeta};
use crate::waypoint::{Condition, WaypointDeployment, WaypointFor};

/// The annotation the node agent puts on a pod it captured; only such pods get HBONE.
pub const ENROLLED_ANNOTATION: &str = "ambient.istio.io/redirection";
pub const ENROLLED_VALUE: &str = "enabled";

const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// Set on a waypoint's own pods; they never send through a waypoint.
pub(crate) const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// A waypoint gateway and where ztunnels reach it.
pub(crate) struct Waypoint {
    pub deployment: WaypointDeployment,
    pub address: Option<pb::GatewayAddress>,
    /// Its HBONE listener, whose `allowedRoutes` says which other namespaces may use it.
    pub hbone: Option<Listener>,
}

fn ip_address(value: &str) -> Option<IpAddr> {
    value.parse().ok()
}

/// The address a waypoint is reached at: its own Service's (named as the Gateway), else an
/// address its status or spec declares, else its DNS name.
///
/// A declared address is the Gateway owner's word: one that is another Service's VIP is
/// refused (reported), or a waypoint in one namespace could name another's waypoint address
/// and put its own services' traffic through that waypoint, with that waypoint's identity.
fn waypoint_address(
    gw: &Gateway,
    key: &ObjectKey,
    (inputs, options): (&Inputs, &Options),
    report: &mut Report,
) -> (Option<IpAddr>, pb::gateway_address::Destination) {
    let vip = |svc: &crate::model::Service| svc.spec.as_ref()?.cluster_ip.as_deref().and_then(ip_address);
    let declared = || {
        let ip = gw
            .status
            .iter()
            .flat_map(|s| s.addresses.iter())
            .chain(gw.spec.addresses.iter())
            .filter(|a| a.kind.as_deref().unwrap_or("IPAddress") == "IPAddress")
            .find_map(|a| ip_address(&a.value))?
            .to_canonical();
        match inputs.services.iter().find(|(_, s)| vip(s) == Some(ip)) {
            Some((other, _)) => {
                report.add(
                    Kind::Gateway,
                    key,
                    format!("address {ip} is the VIP of Service {other}, not this waypoint's; ignored"),
                );
                None
            }
            None => Some(ip),
        }
    };
    match inputs.services.get(key).and_then(vip).or_else(declared) {
        Some(ip) => (
            Some(ip),
            pb::gateway_address::Destination::Address(pb::NetworkAddress {
                network: options.network.clone(),
                address: ip_to_bytes(ip),
            }),
        ),
        None => (
            None,
            pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: key.namespace.clone(),
                hostname: service_hostname(&key.name, &key.namespace, options),
            }),
        ),
    }
}

fn condition(kind: &str, status: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        kind: kind.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.into(),
    }
}

/// Every Gateway of class `istio-waypoint`, accepted or not.
pub(crate) fn waypoints(inputs: &Inputs, options: &Options, report: &mut Report) -> BTreeMap<ObjectKey, Waypoint> {
    let mut out = BTreeMap::new();
    for (key, gw) in &inputs.gateways {
        if gw.spec.gateway_class_name != WAYPOINT_CLASS {
            continue;
        }
        let labels = gw.metadata.labels.as_ref();
        let mut conditions = Vec::new();
        let waypoint_for = match WaypointFor::parse(labels.and_then(|l| l.get(WAYPOINT_FOR)).map(String::as_str)) {
            Ok(f) => f,
            Err(e) => {
                report.add(Kind::Gateway, key, format!("{e}; using service"));
                WaypointFor::Service
            }
        };
        let hbone = gw.spec.listeners.iter().find(|l| l.protocol == "HBONE");
        let accepted = match hbone {
            Some(_) => condition("Accepted", true, "Accepted", "waypoint accepted"),
            None => {
                let msg = "a waypoint needs a listener with protocol HBONE (port 15008)";
                report.add(Kind::Gateway, key, msg);
                condition("Accepted", false, "Invalid", msg)
            }
        };
        let usable = accepted.status;
        conditions.push(accepted);
        let (ip, destination) = waypoint_address(gw, key, (inputs, options), report);
        conditions.push(match (usable, ip) {
            (false, _) => condition("Programmed", false, "Invalid", "not accepted"),
            (true, Some(ip)) => condition("Programmed", true, "Programmed", format!("reachable at {ip}")),
            (true, None) => condition(
                "Programmed",
                false,
                "Pending",
                "waiting for the waypoint Service address",
            ),
        });
        let hbone_port = hbone.map(|l| l.port).unwrap_or(HBONE_PORT);
        let mut problems = Vec::new();
        let scaling = crate::waypoint::scaling::read(
            gw.metadata.annotations.as_ref().unwrap_or(&BTreeMap::new()),
            gw.spec.infrastructure.as_ref(),
            &mut problems,
        );
        for p in problems {
            report.add(Kind::Gateway, key, p);
        }
        let deployment = WaypointDeployment {
            gateway: key.clone(),
            gateway_uid: gw.metadata.uid.clone().unwrap_or_default(),
            service_account: key.name.clone(),
            identity: format!("spiffe://{}/ns/{}/sa/{}", options.trust_domain, key.namespace, key.name),
            waypoint_for,
            hbone_port,
            address: ip,
            conditions,
            scaling,
            trace_export: inputs.mesh.trace_export(mesh_tracing_provider(inputs, options)),
            path_normalization: inputs.mesh.waypoint_path_normalization(),
            ingress: None,
        };
        let address = usable.then(|| pb::GatewayAddress {
            destination: Some(destination),
            hbone_mtls_port: u32::from(hbone_port),
            hbone_single_tls_port: 0,
        });
        let hbone = hbone.cloned();
        out.insert(
            key.clone(),
            Waypoint {
                deployment,
                address,
                hbone,
            },
        );
    }
    out
}

/// The tracing provider a mesh-wide Telemetry (root namespace, no selector or targetRefs)
/// names, the first of its first tracing entry; `None`: MeshConfig's default provider.
pub(crate) fn mesh_tracing_provider<'a>(inputs: &'a Inputs, options: &Options) -> Option<&'a str> {
    inputs
        .telemetries
        .iter()
        .filter(|(k, t)| {
            k.namespace == options.root_namespace && t.spec.selector.is_none() && t.spec.targets().next().is_none()
        })
        .find_map(|(_, t)| t.spec.tracing.first()?.providers.first().map(|p| p.name.as_str()))
}

/// What an object's (or its namespace's) labels ask for.
enum Wanted {
    Nothing,
    OptOut,
    Waypoint { key: ObjectKey, explicit: bool },
}

/// Resolves `istio.io/use-waypoint` for pods and services.
///
/// Fail closed: when the named waypoint does not exist or is not accepted, the object still
/// gets a waypoint reference (the waypoint Service's hostname, which no ztunnel can resolve
/// while that waypoint is missing), so traffic to it is refused rather than sent directly,
/// past the waypoint's L7 policy. The problem is reported on the object.
pub(crate) struct Attachments<'a> {
    inputs: &'a Inputs,
    waypoints: &'a BTreeMap<ObjectKey, Waypoint>,
    options: &'a Options,
}

/// The reference to a waypoint that cannot be used: its Service's hostname, resolved by
/// ztunnel only once a Service of that name exists (a ztunnel that cannot resolve a waypoint
/// refuses the connection, ours and Istio's alike).
fn unavailable_waypoint(key: &ObjectKey, options: &Options) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
            namespace: key.namespace.clone(),
            hostname: service_hostname(&key.name, &key.namespace, options),
        })),
        hbone_mtls_port: u32::from(HBONE_PORT),
        hbone_single_tls_port: 0,
    }
}

/// The reference given to an object whose waypoint does not admit its namespace: a hostname
/// no Service can have (`.invalid`, RFC 6761), so every ztunnel refuses its traffic until the
/// waypoint admits it. The waypoint's own hostname would resolve, and send the traffic
/// through the very waypoint that refused it.
fn not_admitted(wp_key: &ObjectKey, key: &ObjectKey) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
            namespace: key.namespace.clone(),
            hostname: format!("{}.{}.not-admitted.invalid", wp_key.name, wp_key.namespace),
        })),
        hbone_mtls_port: u32::from(HBONE_PORT),
        hbone_single_tls_port: 0,
    }
}

impl<'a> Attachments<'a> {
    pub(crate) fn new(
        inputs: &'a Inputs,
        waypoints: &'a BTreeMap<ObjectKey, Waypoint>,
        options: &'a Options,
        _report: &mut Report,
    ) -> Self {
        Attachments {
            inputs,
            waypoints,
            options,
        }
    }

    fn wanted(&self, meta: &ObjectMeta, namespace: &str) -> Wanted {
        let from = |labels: &BTreeMap<String, String>, explicit: bool| {
            labels.get(USE_WAYPOINT).map(|name| match name.as_str() {
                "none" => Wanted::OptOut,
                _ => Wanted::Waypoint {
                    key: ObjectKey::new(
                        labels
                            .get(USE_WAYPOINT_NAMESPACE)
                            .map(String::as_str)
                            .unwrap_or(namespace),
                        name.as_str(),
                    ),
                    explicit,
                },
            })
        };
        meta.labels
            .as_ref()
            .and_then(|l| from(l, true))
            .or_else(|| self.inputs.namespace_labels(namespace).and_then(|l| from(l, false)))
            .unwrap_or(Wanted::Nothing)
    }

    fn resolve(
        &self,
        kind: Kind,
        key: &ObjectKey,
        meta: &ObjectMeta,
        serves: fn(WaypointFor) -> bool,
        report: &mut Report,
    ) -> Option<pb::GatewayAddress> {
        // A waypoint never routes through a waypoint (its own or another).
        if meta.labels.as_ref().is_some_and(|l| l.contains_key(GATEWAY_NAME_LABEL)) {
            return None;
        }
        let (wp_key, explicit) = match self.wanted(meta, &key.namespace) {
            Wanted::Nothing | Wanted::OptOut => return None,
            Wanted::Waypoint { key, explicit } => (key, explicit),
        };
        let Some(wp) = self.waypoints.get(&wp_key) else {
            // What a missing waypoint would serve is unknown; a namespace label is taken as the
            // default (service traffic), a pod's own label as asking for workload traffic.
            if kind == Kind::Pod && !explicit {
                return None;
            }
            report.add(
                kind,
                key,
                format!(
                    "waypoint {wp_key} does not exist (or is not of class istio-waypoint); connections to it \
                     are refused until it does"
                ),
            );
            return Some(unavailable_waypoint(&wp_key, self.options));
        };
        if !serves(wp.deployment.waypoint_for) {
            if explicit {
                report.add(
                    kind,
                    key,
                    format!(
                        "waypoint {wp_key} is for {:?} traffic, not {} traffic",
                        wp.deployment.waypoint_for,
                        if kind == Kind::Pod { "workload" } else { "service" }
                    ),
                );
            }
            return None;
        }
        match &wp.address {
            Some(_) if wp_key.namespace != key.namespace && !self.admits(&wp_key, wp, kind, key, report) => {
                Some(not_admitted(&wp_key, key))
            }
            Some(address) => Some(address.clone()),
            None => {
                report.add(
                    kind,
                    key,
                    format!("waypoint {wp_key} is not accepted; connections to it are refused until it is"),
                );
                Some(unavailable_waypoint(&wp_key, self.options))
            }
        }
    }

    /// Whether waypoint `wp_key` admits `key`, of another namespace: as Istio, only when its
    /// HBONE listener's `allowedRoutes.namespaces` names that namespace (`All`, or a
    /// `Selector` its labels match). Otherwise one namespace could put its traffic through
    /// another's waypoint, with that waypoint's identity and policies. Refusals are reported
    /// on the object; its traffic is refused, never sent past the waypoint it asked for.
    fn admits(&self, wp_key: &ObjectKey, wp: &Waypoint, kind: Kind, key: &ObjectKey, report: &mut Report) -> bool {
        let labels = self.inputs.namespace_labels(&key.namespace);
        let admitted = wp
            .hbone
            .as_ref()
            .map(|l| super::ingress::allows(l, &wp_key.namespace, "HTTPRoute", &key.namespace, labels));
        let why = match admitted {
            Some(Ok(true)) => return true,
            Some(Err(e)) => e,
            _ => format!(
                "its HBONE listener's allowedRoutes.namespaces does not admit namespace {}",
                key.namespace
            ),
        };
        report.add(
            kind,
            key,
            format!("waypoint {wp_key} is in another namespace and {why}; connections are refused until it does"),
        );
        false
    }

    /// The waypoint gateway `istio.io/use-waypoint` names for this object (its label, then
    /// its namespace's), whether or not it exists.
    pub(crate) fn waypoint_key(&self, meta: &ObjectMeta, namespace: &str) -> Option<ObjectKey> {
        match self.wanted(meta, namespace) {
            Wanted::Waypoint { key, .. } => Some(key),
            Wanted::Nothing | Wanted::OptOut => None,
        }
    }

    /// The waypoint gateway `key`, when it exists.
    pub(crate) fn waypoint(&self, key: &ObjectKey) -> Option<&Waypoint> {
        self.waypoints.get(key)
    }

    /// The waypoint for traffic addressed to this pod directly.
    pub(crate) fn for_workload(
        &self,
        key: &ObjectKey,
        meta: &ObjectMeta,
        report: &mut Report,
    ) -> Option<pb::GatewayAddress> {
        self.resolve(Kind::Pod, key, meta, WaypointFor::workloads, report)
    }

    /// The waypoint for traffic addressed to this service.
    pub(crate) fn for_service(
        &self,
        key: &ObjectKey,
        meta: &ObjectMeta,
        report: &mut Report,
    ) -> Option<pb::GatewayAddress> {
        self.resolve(Kind::Service, key, meta, WaypointFor::services, report)
    }
    /// The waypoint for traffic addressed to a ServiceEntry's hosts (`istio.io/use-waypoint`
    /// on the entry or its namespace): an egress waypoint.
    pub(crate) fn for_service_entry(
        &self,
        key: &ObjectKey,
        meta: &ObjectMeta,
        report: &mut Report,
    ) -> Option<pb::GatewayAddress> {
        self.resolve(Kind::ServiceEntry, key, meta, WaypointFor::services, report)
    }
}
