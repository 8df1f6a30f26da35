//! Kubernetes Services to `istio.workload.Service`: hostname, VIPs, ports (a named target port
//! is resolved per workload, so it is 0 here), waypoint. Also the index workload translation
//! uses to find the services a pod belongs to. Every Kubernetes Service is `canonical` for
//! its hostname; `istio.io/ingress-use-waypoint` (on the Service or its namespace) sets
//! `ingress_use_waypoint`; `publishNotReadyAddresses`, `internalTrafficPolicy` and the traffic
//! distribution become the load-balancing health policy and locality preference, as Istio
//! sends them (see `load_balancing`).

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::state::model::ip_to_bytes;
use mesh_proto::workload as pb;

mod load_balancing;

use super::attach::Attachments;
use super::{service_hostname, Options, Report};
use crate::model::{Inputs, Kind, ObjectKey, Pod, Service};

/// `appProtocol`, else the port name's prefix (`http-web`, `grpc`), as Istio reads it; the
/// Kubernetes-standard values (`kubernetes.io/h2c`, `kubernetes.io/ws`, `kubernetes.io/wss`)
/// as what they carry.
pub(crate) fn app_protocol(port: &k8s_openapi::api::core::v1::ServicePort) -> i32 {
    let name = port.app_protocol.as_deref().or(port.name.as_deref()).unwrap_or("");
    let prefix = match name.to_ascii_lowercase().strip_prefix("kubernetes.io/") {
        Some("h2c") => "http2".to_owned(),
        Some("ws") => "http".to_owned(),
        Some("wss") => "tls".to_owned(),
        _ => name.split(['-', '/']).next().unwrap_or("").to_ascii_lowercase(),
    };
    let proto = match prefix.as_str() {
        "http" => pb::AppProtocol::Http11,
        "http2" | "h2c" => pb::AppProtocol::Http2,
        "grpc" | "grpc-web" => pb::AppProtocol::Grpc,
        "tcp" => pb::AppProtocol::Tcp,
        "tls" | "https" => pb::AppProtocol::Tls,
        _ => pb::AppProtocol::Unknown,
    };
    proto as i32
}

/// Istio's label asking ingress gateways to go through the service's waypoint.
pub(crate) const INGRESS_USE_WAYPOINT_LABEL: &str = "istio.io/ingress-use-waypoint";

fn label_true(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> Option<bool> {
    let v = meta.labels.as_ref()?.get(key)?;
    Some(v.trim().eq_ignore_ascii_case("true"))
}

/// The Service's label wins over its namespace's.
fn ingress_use_waypoint(inputs: &Inputs, key: &ObjectKey, svc: &Service) -> bool {
    label_true(&svc.metadata, INGRESS_USE_WAYPOINT_LABEL)
        .or_else(|| {
            let ns = inputs.namespaces.get(&key.namespace)?;
            label_true(&ns.metadata, INGRESS_USE_WAYPOINT_LABEL)
        })
        .unwrap_or(false)
}

fn vips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    ips.into_iter().filter_map(|s| s.parse().ok()).collect()
}

/// Services translated for ztunnel; ExternalName services are skipped (nothing to capture).
pub(crate) fn translate(
    inputs: &Inputs,
    options: &Options,
    attach: &Attachments<'_>,
    report: &mut Report,
) -> Vec<pb::Service> {
    inputs
        .services
        .iter()
        .filter_map(|(key, svc)| translate_one(inputs, options, attach, key, svc, report))
        .collect()
}

/// One Service (`None` for ExternalName and spec-less ones); the incremental layer calls it
/// for the services a change touches.
pub(crate) fn translate_one(
    inputs: &Inputs,
    options: &Options,
    attach: &Attachments<'_>,
    key: &ObjectKey,
    svc: &Service,
    report: &mut Report,
) -> Option<pb::Service> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue; // UDP/SCTP are not captured.
        }
        let Ok(service_port) = u32::try_from(p.port) else {
            report.add(
                Kind::Service,
                key,
                format!("spec.ports[{i}].port {} is not a port", p.port),
            );
            continue;
        };
        let target_port = match &p.target_port {
            None => service_port,
            Some(IntOrString::Int(n)) => match u32::try_from(*n) {
                Ok(n) if n > 0 && n <= 65535 => n,
                _ => {
                    report.add(
                        Kind::Service,
                        key,
                        format!("spec.ports[{i}].targetPort {n} is not a port"),
                    );
                    continue;
                }
            },
            // Named: resolved against each pod's container ports.
            Some(IntOrString::String(_)) => 0,
        };
        ports.push(pb::Port {
            service_port,
            target_port,
            app_protocol: app_protocol(p),
        });
    }
    let addresses = vips(svc)
        .into_iter()
        .map(|ip| pb::NetworkAddress {
            network: options.network.clone(),
            address: ip_to_bytes(ip),
        })
        .collect();
    Some(pb::Service {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        hostname: service_hostname(&key.name, &key.namespace, options),
        addresses,
        ports,
        subject_alt_names: Vec::new(),
        waypoint: attach.for_service(key, &svc.metadata, report),
        load_balancing: load_balancing::for_service(svc, inputs.namespaces.get(&key.namespace)),
        ip_families: 0,
        extensions: Vec::new(),
        canonical: true,
        ingress_use_waypoint: ingress_use_waypoint(inputs, key, svc),
    })
}

/// Resolves a Service port's target for one pod: numeric as is, named as Kubernetes'
/// `FindPort` does — the first container port with that name and the Service port's
/// protocol (TCP when unset on either), in the containers, then in the sidecars (init
/// containers with `restartPolicy: Always`); `None` when the pod has no such port.
pub(crate) fn target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<u32> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => u32::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u32::try_from(*n).ok(),
        Some(IntOrString::String(name)) => {
            let spec = pod.spec.as_ref()?;
            let sidecars = spec
                .init_containers
                .iter()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            spec.containers
                .iter()
                .chain(sidecars)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name.as_str()) && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .and_then(|p| u32::try_from(p.container_port).ok())
        }
    }
}

/// Finds the selector services of a pod without comparing it to every service: services are
/// indexed by namespace and one of their selector labels.
pub(crate) struct SelectorIndex<'a> {
    /// (namespace, label key, label value) -> services whose selector has that pair.
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<ServiceRef<'a>>>,
}

type ServiceRef<'a> = (&'a ObjectKey, &'a Service);

impl<'a> SelectorIndex<'a> {
    pub(crate) fn new(inputs: &'a Inputs) -> Self {
        Self::of(inputs.services.iter())
    }

    /// The index of the services of `namespaces` only: enough for pods of those namespaces
    /// (a selector picks pods of its own namespace), and what a change of a few pods needs
    /// instead of indexing every service of the cluster.
    pub(crate) fn of_namespaces<'n>(inputs: &'a Inputs, namespaces: impl IntoIterator<Item = &'n str>) -> Self {
        let mut namespaces: Vec<&str> = namespaces.into_iter().collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        Self::of(
            namespaces
                .into_iter()
                .flat_map(|ns| crate::model::in_namespace(&inputs.services, ns)),
        )
    }

    fn of(services: impl Iterator<Item = ServiceRef<'a>>) -> Self {
        let mut by_label: HashMap<_, Vec<_>> = HashMap::new();
        for (key, svc) in services {
            let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
                continue;
            };
            if let Some((k, v)) = selector.iter().next() {
                by_label
                    .entry((key.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push((key, svc));
            }
        }
        SelectorIndex { by_label }
    }

    /// Services in `namespace` whose whole selector matches `labels`, in key order.
    pub(crate) fn matching(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Vec<(&'a ObjectKey, &'a Service)> {
        let mut out: Vec<(&ObjectKey, &Service)> = labels
            .iter()
            .filter_map(|(k, v)| self.by_label.get(&(namespace, k.as_str(), v.as_str())))
            .flatten()
            .filter(|(_, svc)| {
                svc.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|sel| crate::model::selects(sel, Some(labels)))
            })
            .copied()
            .collect();
        out.sort_by_key(|(k, _)| *k);
        out.dedup_by_key(|(k, _)| *k);
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use k8s_openapi::api::core::v1::ServicePort;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::{app_protocol, target_port};
    use crate::model::Pod;
    use mesh_proto::workload::AppProtocol as P;

    /// Port names by prefix, `appProtocol` first, the Kubernetes-standard values by meaning.
    #[test]
    fn app_protocol_reads_names_and_standard_values() {
        let table = [
            (Some("http-web"), None, P::Http11),
            (Some("grpc"), None, P::Grpc),
            (Some("http2"), None, P::Http2),
            (Some("web"), None, P::Unknown),
            (Some("http"), Some("kubernetes.io/h2c"), P::Http2),
            (Some("web"), Some("kubernetes.io/ws"), P::Http11),
            (Some("http"), Some("kubernetes.io/wss"), P::Tls),
            (Some("http"), Some("kubernetes.io/other"), P::Unknown),
            (None, Some("TCP"), P::Tcp),
        ];
        for (name, app, want) in table {
            let port = ServicePort {
                name: name.map(str::to_owned),
                app_protocol: app.map(str::to_owned),
                ..ServicePort::default()
            };
            assert_eq!(app_protocol(&port), want as i32, "{name:?} {app:?}");
        }
    }

    /// Named target ports as Kubernetes resolves them: name and protocol, containers first,
    /// then sidecar init containers; plain init containers never.
    #[test]
    fn named_target_ports_resolve_as_kubernetes_does() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [{"name": "app", "ports": [
                    {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
                    {"name": "web", "containerPort": 8080}]}],
                "initContainers": [
                    {"name": "setup", "ports": [{"name": "setup", "containerPort": 7000}]},
                    {"name": "proxy", "restartPolicy": "Always", "ports": [
                        {"name": "admin", "containerPort": 15000}, {"name": "web", "containerPort": 9999}]}]
            }
        }))
        .unwrap();
        let port = |target: &str, protocol: Option<&str>| ServicePort {
            port: 80,
            target_port: Some(IntOrString::String(target.to_owned())),
            protocol: protocol.map(str::to_owned),
            ..ServicePort::default()
        };
        let table = [
            (port("web", None), Some(8080)),        // the container's, before the sidecar's
            (port("web", Some("TCP")), Some(8080)), // TCP spelled out
            (port("dns", None), None),              // a UDP port does not serve TCP
            (port("dns", Some("UDP")), Some(5353)),
            (port("admin", None), Some(15000)), // a sidecar's port
            (port("setup", None), None),        // a plain init container's is not
            (port("missing", None), None),
        ];
        for (service_port, want) in table {
            let target = service_port.target_port.clone();
            assert_eq!(
                target_port(&service_port, &pod),
                want,
                "{target:?} {:?}",
                service_port.protocol
            );
        }
    }
}
