//! Pods to `istio.workload.Workload`: uid, addresses, identity, HBONE only when the node agent
//! reports the pod captured, canonical names, health, the services it backs (by selector, or
//! by EndpointSlice for selector-less services) with per-pod target ports, its waypoint and
//! the selector policies that apply to it, and its locality from the `istio-locality` label.

use std::collections::{BTreeMap, HashMap};

use mesh_core::state::model::ip_to_bytes;
use mesh_proto::workload as pb;

use super::attach::{Attachments, ENROLLED_ANNOTATION, ENROLLED_VALUE};
use super::service::{target_port, SelectorIndex};
use super::slice_index::{SliceIndex, SliceMembership};
use super::{service_hostname, Options, Report, Selected};
use crate::model::{Inputs, Kind, ObjectKey, Pod};

/// Pod label Istio reads a workload's locality from: `region.zone.subzone` (label values
/// cannot hold `/`, so dots separate; missing trailing parts are empty).
const LOCALITY_LABEL: &str = "istio-locality";

/// Well-known topology labels: on the pod's node, where Kubernetes puts them and Istio reads
/// them; else on the pod itself (local manifests, admission webhooks).
const TOPOLOGY_LABELS: [&str; 3] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
];

/// `istio-locality` on the pod, else its node's topology labels, else its own.
fn locality(
    labels: Option<&BTreeMap<String, String>>,
    node: Option<&BTreeMap<String, String>>,
) -> Option<pb::Locality> {
    let v = labels.and_then(|l| l.get(LOCALITY_LABEL)).map_or("", |v| v.trim());
    if !v.is_empty() {
        let mut parts = v.splitn(3, '.').map(str::to_owned);
        return Some(pb::Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        });
    }
    [node, labels].into_iter().find_map(|source| {
        let [region, zone, subzone] =
            TOPOLOGY_LABELS.map(|k| source.and_then(|l| l.get(k)).cloned().unwrap_or_default());
        let any = !(region.is_empty() && zone.is_empty() && subzone.is_empty());
        any.then_some(pb::Locality { region, zone, subzone })
    })
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, keys: &[&str]) -> Option<&'a str> {
    let labels = labels?;
    keys.iter().find_map(|k| labels.get(*k)).map(String::as_str)
}

/// The workload's controller name and type: a ReplicaSet's Deployment (the name minus the
/// pod-template-hash), a Job's CronJob, else the owner or the pod itself.
fn workload_name(pod: &Pod, key: &ObjectKey) -> (String, pb::WorkloadType) {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .or_else(|| pod.metadata.owner_references.iter().flatten().next());
    let Some(owner) = owner else {
        return (key.name.clone(), pb::WorkloadType::Pod);
    };
    let strip_suffix = |name: &str| {
        name.rsplit_once('-')
            .map(|(n, _)| n.to_owned())
            .unwrap_or(name.to_owned())
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = pod.metadata.labels.as_ref().and_then(|l| l.get("pod-template-hash"));
            match hash {
                Some(h) if owner.name.ends_with(&format!("-{h}")) => (
                    owner.name[..owner.name.len() - h.len() - 1].to_owned(),
                    pb::WorkloadType::Deployment,
                ),
                _ => (owner.name.clone(), pb::WorkloadType::Deployment),
            }
        }
        "Job" => {
            // A Job created by a CronJob is named <cronjob>-<schedule time>.
            let cron = owner
                .name
                .rsplit_once('-')
                .is_some_and(|(_, t)| t.bytes().all(|b| b.is_ascii_digit()));
            if cron {
                (strip_suffix(&owner.name), pb::WorkloadType::Cronjob)
            } else {
                (owner.name.clone(), pb::WorkloadType::Job)
            }
        }
        _ => (owner.name.clone(), pb::WorkloadType::Pod),
    }
}

fn healthy(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else { return true };
    match status.conditions.iter().flatten().find(|c| c.type_ == "Ready") {
        Some(c) => c.status == "True",
        // Local manifests often carry no conditions: a running (or unstated) phase is healthy.
        None => matches!(status.phase.as_deref(), None | Some("Running")),
    }
}

/// A pod's IPs as written in its status (`podIPs`, else `podIP`).
pub(crate) fn pod_ips(pod: &Pod) -> impl Iterator<Item = &str> {
    let status = pod.status.as_ref();
    let list = status.and_then(|s| s.pod_ips.as_ref()).filter(|l| !l.is_empty());
    let single = match list {
        Some(_) => None,
        None => status.and_then(|s| s.pod_ip.as_deref()),
    };
    list.into_iter().flatten().map(|p| p.ip.as_str()).chain(single)
}

pub(crate) fn translate(
    inputs: &Inputs,
    options: &Options,
    attach: &Attachments<'_>,
    selected: &[Selected],
    report: &mut Report,
) -> Vec<pb::Workload> {
    let slices = SliceIndex::new(inputs);
    let ctx = PodContext::new(inputs, options, attach, selected, &slices);
    // Which pod first claimed each address: two pods with one IP cannot be told apart by
    // ztunnel (policy and identity would follow whichever it indexed last), so it is reported.
    let mut ip_owner: HashMap<std::net::IpAddr, &ObjectKey> = HashMap::new();
    let mut out = Vec::with_capacity(inputs.pods.len());
    out.extend(
        inputs
            .pods
            .iter()
            .filter_map(|(key, pod)| ctx.pod(key, pod, &mut ip_owner, report)),
    );
    out
}

/// What translating one pod needs besides the pod, built once per pass over many pods (the
/// incremental layer builds one per change and translates only the pods that depend on it).
pub(crate) struct PodContext<'a> {
    inputs: &'a Inputs,
    options: &'a Options,
    attach: &'a Attachments<'a>,
    index: SelectorIndex<'a>,
    /// Selector policies by namespace: a pod only looks at its namespace's and the root's.
    by_namespace: HashMap<&'a str, Vec<&'a Selected>>,
    /// Which pods EndpointSlices name (for selector-less services).
    slices: &'a SliceIndex,
}

impl<'a> PodContext<'a> {
    pub(crate) fn new(
        inputs: &'a Inputs,
        options: &'a Options,
        attach: &'a Attachments<'a>,
        selected: &'a [Selected],
        slices: &'a SliceIndex,
    ) -> Self {
        let index = SelectorIndex::new(inputs);
        Self::with_index(inputs, options, attach, selected, slices, index)
    }

    /// A context for pods of `namespaces` only (what the incremental layer translates after
    /// a change of a few pods: the services of other namespaces are not indexed).
    pub(crate) fn of_namespaces<'n>(
        inputs: &'a Inputs,
        options: &'a Options,
        attach: &'a Attachments<'a>,
        selected: &'a [Selected],
        slices: &'a SliceIndex,
        namespaces: impl IntoIterator<Item = &'n str>,
    ) -> Self {
        let index = SelectorIndex::of_namespaces(inputs, namespaces);
        Self::with_index(inputs, options, attach, selected, slices, index)
    }

    fn with_index(
        inputs: &'a Inputs,
        options: &'a Options,
        attach: &'a Attachments<'a>,
        selected: &'a [Selected],
        slices: &'a SliceIndex,
        index: SelectorIndex<'a>,
    ) -> Self {
        let mut by_namespace: HashMap<&str, Vec<&Selected>> = HashMap::new();
        for s in selected {
            by_namespace.entry(s.namespace.as_str()).or_default().push(s);
        }
        PodContext {
            inputs,
            options,
            attach,
            index,
            by_namespace,
            slices,
        }
    }

    /// One pod's workload (`None`: not started, or finished). `ip_owner` holds the IPs the
    /// pods translated before this one claimed, for the duplicate-IP problem.
    pub(crate) fn pod<'k>(
        &self,
        key: &'k ObjectKey,
        pod: &Pod,
        ip_owner: &mut HashMap<std::net::IpAddr, &'k ObjectKey>,
        report: &mut Report,
    ) -> Option<pb::Workload> {
        let (inputs, options) = (self.inputs, self.options);
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let spec = pod.spec.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let addresses = pod_addresses(key, pod, host_network, ip_owner, report);
        if addresses.is_empty() {
            return None; // Not started yet: nothing to route to.
        }
        let labels = pod.metadata.labels.as_ref();
        let enrolled = redirection_enabled(pod.metadata.annotations.as_ref()) || inputs.enrolled.contains(key);
        let (workload_name, workload_type) = workload_name(pod, key);
        let (canonical_name, canonical_revision) = canonical(labels, &workload_name);
        let mut services = selected_services(&self.index, key, pod, options);
        services.extend(sliced_services(inputs, self.slices.memberships(key), options));
        let authorization_policies = policies_for(&self.by_namespace, key, labels, options);
        Some(pb::Workload {
            uid: pod_uid(options, key),
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            addresses,
            hostname: String::new(),
            network: crate::model::cluster::pod_network(labels, &options.network),
            tunnel_protocol: if enrolled && !host_network {
                pb::TunnelProtocol::Hbone as i32
            } else {
                pb::TunnelProtocol::None as i32
            },
            trust_domain: options.trust_domain.clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            waypoint: self.attach.for_workload(key, &pod.metadata, report),
            network_gateway: None,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            canonical_name,
            canonical_revision,
            workload_type: workload_type as i32,
            workload_name,
            native_tunnel: false,
            services,
            authorization_policies,
            status: if healthy(pod) {
                pb::WorkloadStatus::Healthy as i32
            } else {
                pb::WorkloadStatus::Unhealthy as i32
            },
            cluster_id: options.cluster_id.clone(),
            locality: locality(
                labels,
                spec.and_then(|s| s.node_name.as_ref())
                    .and_then(|n| inputs.nodes.get(n))
                    .and_then(|n| n.metadata.labels.as_ref()),
            ),
            network_mode: if host_network {
                pb::NetworkMode::HostNetwork as i32
            } else {
                pb::NetworkMode::Standard as i32
            },
            // Not known for pods: sandwiched proxies, extensions and capacity are opt-in
            // features of other control planes; unset means none and a capacity of 1.
            application_tunnel: None,
            extensions: Vec::new(),
            capacity: None,
        })
    }
}

/// The pod's IPs as wire bytes; an unparsable IP, or one another pod already holds (host
/// network pods share their node's address by design), is reported.
fn pod_addresses<'a>(
    key: &'a ObjectKey,
    pod: &Pod,
    host_network: bool,
    ip_owner: &mut HashMap<std::net::IpAddr, &'a ObjectKey>,
    report: &mut Report,
) -> Vec<Vec<u8>> {
    let mut addresses = Vec::with_capacity(1);
    for ip in pod_ips(pod) {
        let Ok(ip) = ip.parse() else {
            report.add(Kind::Pod, key, format!("status.podIP {ip:?} is not an IP address"));
            continue;
        };
        if !host_network {
            match ip_owner.get(&ip) {
                Some(first) if *first != key => duplicate_ip(key, ip, first, report),
                Some(_) => {}
                None => {
                    ip_owner.insert(ip, key);
                }
            }
        }
        addresses.push(ip_to_bytes(ip));
    }
    addresses
}

/// The problem of a pod whose IP `first` (earlier in key order) also holds.
pub(crate) fn duplicate_ip(key: &ObjectKey, ip: std::net::IpAddr, first: &ObjectKey, report: &mut Report) {
    report.add(
        Kind::Pod,
        key,
        format!("status.podIP {ip} is also the IP of pod {first}: ztunnel cannot tell them apart"),
    );
}

/// Whether an object's annotations say the node agent redirected it into the mesh
/// (`ambient.istio.io/redirection: enabled`): its workload is reached over HBONE.
pub(super) fn redirection_enabled(annotations: Option<&BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(ENROLLED_ANNOTATION))
        .is_some_and(|v| v == ENROLLED_VALUE)
}

/// Istio's canonical service name and revision from an object's labels, in Istio's order.
pub(super) fn canonical(labels: Option<&BTreeMap<String, String>>, workload_name: &str) -> (String, String) {
    let name = label(
        labels,
        &["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"],
    )
    .map_or_else(|| workload_name.to_owned(), str::to_owned);
    let revision = label(
        labels,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest")
    .to_owned();
    (name, revision)
}

/// The services whose selector matches the pod, keyed `namespace/hostname`, with their TCP
/// ports resolved against the pod's container ports.
fn selected_services(
    index: &SelectorIndex<'_>,
    key: &ObjectKey,
    pod: &Pod,
    options: &Options,
) -> BTreeMap<String, pb::PortList> {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let mut services = BTreeMap::new();
    for (svc_key, svc) in index.matching(&key.namespace, labels) {
        let ports = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .filter_map(|p| {
                Some(pb::Port {
                    service_port: u32::try_from(p.port).ok()?,
                    target_port: target_port(p, pod)?,
                    app_protocol: super::service::app_protocol(p),
                })
            })
            .collect();
        let hostname = service_hostname(&svc_key.name, &svc_key.namespace, options);
        services.insert(format!("{}/{hostname}", svc_key.namespace), pb::PortList { ports });
    }
    services
}

/// The selector-less services whose EndpointSlices name the pod, with the slices' ports.
fn sliced_services<'a>(
    inputs: &'a Inputs,
    slices: Vec<SliceMembership<'a>>,
    options: &'a Options,
) -> impl Iterator<Item = (String, pb::PortList)> + 'a {
    slices.into_iter().filter_map(move |(svc_key, slice_ports)| {
        let svc = inputs.services.get(svc_key)?;
        let ports = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter_map(|p| {
                let name = p.name.clone().unwrap_or_default();
                let target = slice_ports.iter().find(|(n, _)| *n == name)?.1;
                Some(pb::Port {
                    service_port: u32::try_from(p.port).ok()?,
                    target_port: target,
                    app_protocol: super::service::app_protocol(p),
                })
            })
            .collect();
        let hostname = service_hostname(&svc_key.name, &svc_key.namespace, options);
        Some((format!("{}/{hostname}", svc_key.namespace), pb::PortList { ports }))
    })
}

/// The selector policies of the pod's namespace and of the root namespace that apply to it.
fn policies_for(
    by_namespace: &HashMap<&str, Vec<&Selected>>,
    key: &ObjectKey,
    labels: Option<&BTreeMap<String, String>>,
    options: &Options,
) -> Vec<String> {
    let own = by_namespace
        .get(key.namespace.as_str())
        .filter(|_| key.namespace != options.root_namespace);
    let root = by_namespace.get(options.root_namespace.as_str());
    own.into_iter()
        .flatten()
        .chain(root.into_iter().flatten())
        .filter(|s| s.applies_to(key, labels, &options.root_namespace))
        .map(|s| s.name.clone())
        .collect()
}

/// The workload uid of a pod, as Istio's control plane forms it.
pub(crate) fn pod_uid(options: &Options, key: &ObjectKey) -> String {
    format!("{}//Pod/{}/{}", options.cluster_id, key.namespace, key.name)
}
