//! ServiceEntries to workload xDS, as Istio's control plane sends them so that Istio's ztunnel
//! reads them the same way:
//! - one `Service` per host (resource `<ns>/<host>`, wildcards kept as hostnames), with the
//!   entry's `addresses` or, for a host without them, an auto-allocated VIP pair
//!   ([`super::auto_allocate`], per namespace and host, oldest entry first; not for
//!   wildcards or `resolution: NONE`); ports with their
//!   protocol; `subjectAltNames`; the waypoint of `istio.io/use-waypoint` (egress waypoint);
//!   `resolution: NONE` as load balancing PASSTHROUGH (connect to the address the client
//!   dialled), anything else picks an endpoint;
//! - one `Workload` per endpoint (uid `<cluster>/networking.istio.io/ServiceEntry/<ns>/<name>/
//!   <address>`), an IP in `addresses` or a host name in `hostname` (resolution DNS); with
//!   `resolution: DNS` and neither endpoints nor selector, one per host named by the host
//!   itself, as Istio does;
//! - `workloadSelector` adds the entry's hosts to the selected pods' `services`, at most
//!   [`MAX_SELECTED_HOSTS`] per pod from all entries together.
//!
//! What ztunnel cannot honour is reported: `exportTo` narrower than `*` (every ztunnel gets
//! every service), CIDR `addresses`, subject alt names that are not SPIFFE ids (only TLS
//! origination would check them), `DYNAMIC_DNS`; and a host that is already a Kubernetes
//! Service in that namespace, or declared twice there, keeps its first owner. An address
//! [`Owned`] refuses (unroutable, another's, in the allocation ranges, or for an endpoint a
//! service's VIP), or a host it refuses (another namespace's cluster name, or overlapping an
//! older entry of another namespace's host: [`super::entry_hosts`]), is reported with its
//! field and only that VIP, endpoint or host dropped; the rest of the entry is served.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use mesh_core::state::model::ip_to_bytes;
use mesh_proto::workload as pb;

use super::attach::Attachments;
use super::auto_allocate::{allocate, Allocated};
use super::entries::{Owned, Taken};
use super::{Options, Report};
use crate::model::service_entry::{Endpoint, ServiceEntry, ServiceEntryPort};
use crate::model::{Inputs, Kind, ObjectKey};

/// Annotation opting an entry out of auto-allocation (Istio's name).
const AUTO_ALLOCATE_ANNOTATION: &str = "networking.istio.io/enable-autoallocate-ip";

/// How the entry's endpoints are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolution {
    /// Connect to the address the client dialled.
    None,
    Static,
    Dns,
}

/// Everything the entries contribute.
#[derive(Default)]
pub(crate) struct Translated {
    pub services: Vec<pb::Service>,
    pub workloads: Vec<pb::Workload>,
    /// The entries with a `workloadSelector`, for the pods they select.
    pub selectors: Vec<Selector>,
}

/// A `workloadSelector`: pods of `namespace` with `labels` back `services`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Selector {
    namespace: String,
    labels: BTreeMap<String, String>,
    /// Service key and the ports a selected pod serves it on.
    services: Vec<(String, pb::PortList)>,
}

impl Selector {
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Whether this selector picks the pod `pod` with `labels`.
    pub(crate) fn picks(&self, pod: &ObjectKey, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.namespace == pod.namespace && crate::model::selects(&self.labels, labels)
    }
}

fn resolution(key: &ObjectKey, se: &ServiceEntry, report: &mut Report) -> Resolution {
    match se.spec.resolution.as_deref().unwrap_or("NONE") {
        "NONE" => Resolution::None,
        "STATIC" => Resolution::Static,
        "DNS" | "DNS_ROUND_ROBIN" => Resolution::Dns,
        other => {
            report.add(
                Kind::ServiceEntry,
                key,
                format!("spec.resolution {other} is not implemented; treated as NONE"),
            );
            Resolution::None
        }
    }
}

/// Istio's protocol names to the app protocol ztunnel and waypoints read (as for Services).
fn app_protocol(p: &ServiceEntryPort) -> i32 {
    let proto = p.protocol.as_deref().unwrap_or("").to_ascii_uppercase();
    (match proto.as_str() {
        "HTTP" => pb::AppProtocol::Http11,
        "HTTP2" => pb::AppProtocol::Http2,
        "GRPC" | "GRPC-WEB" => pb::AppProtocol::Grpc,
        "TCP" => pb::AppProtocol::Tcp,
        "TLS" | "HTTPS" => pb::AppProtocol::Tls,
        _ => pb::AppProtocol::Unknown,
    }) as i32
}

fn ports(key: &ObjectKey, se: &ServiceEntry, report: &mut Report) -> Vec<(Option<String>, pb::Port)> {
    let mut out = Vec::new();
    for (i, p) in se.spec.ports.iter().enumerate() {
        if p.protocol.as_deref().is_some_and(|pr| pr.eq_ignore_ascii_case("UDP")) {
            continue; // not captured
        }
        let target = p.target_port.unwrap_or(p.number);
        if !(1..=65535).contains(&p.number) || !(1..=65535).contains(&target) {
            report.add(
                Kind::ServiceEntry,
                key,
                format!("spec.ports[{i}]: {} -> {target} is not a port; ignored", p.number),
            );
            continue;
        }
        let port = pb::Port {
            service_port: p.number,
            target_port: target,
            app_protocol: app_protocol(p),
        };
        out.push((p.name.clone(), port));
    }
    out
}

/// Declared VIPs: IPs (a /32 or /128 is one too); wider CIDRs, and addresses
/// [`Owned::check_vip`] refuses (unroutable, or a Service's or a pod's), are reported.
fn addresses(key: &ObjectKey, se: &ServiceEntry, owned: &Owned<'_>, report: &mut Report) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut keep = |i: usize, ip: IpAddr, report: &mut Report| match owned.check_vip(ip, &key.namespace) {
        Err(refusal) => report.add(
            Kind::ServiceEntry,
            key,
            format!("spec.addresses[{i}]: {refusal}, ignored"),
        ),
        Ok(()) => out.push(ip),
    };
    for (i, a) in se.spec.addresses.iter().enumerate() {
        if let Ok(ip) = a.parse::<IpAddr>() {
            keep(i, ip, report);
        } else if let Ok(net) = a.parse::<ipnet::IpNet>() {
            if net.prefix_len() == net.max_prefix_len() {
                keep(i, net.addr(), report);
            } else {
                report.add(
                    Kind::ServiceEntry,
                    key,
                    format!("spec.addresses[{i}] {a}: CIDR ranges are not implemented; ignored"),
                );
            }
        } else {
            report.add(
                Kind::ServiceEntry,
                key,
                format!("spec.addresses[{i}] {a:?} is not an IP address; ignored"),
            );
        }
    }
    out
}

fn wildcard(host: &str) -> bool {
    host.starts_with('*')
}

/// A host as Istio accepts it: a DNS name, optionally `*.`-prefixed, or `*`.
pub(crate) fn valid_host(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    host == "*"
        || (!name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }))
}

fn wants_allocation(se: &ServiceEntry, res: Resolution) -> bool {
    let opted_out = se
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUTO_ALLOCATE_ANNOTATION))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
    se.spec.addresses.is_empty() && res != Resolution::None && !opted_out
}

/// The auto-allocated VIPs by service key (`<ns>/<host>`: one host of two namespaces gets
/// two), for the hosts of entries wanting them that [`Owned::check_host`] leaves the entry;
/// placed oldest entry first, so a newer entry never moves an older one's VIP (see
/// [`super::auto_allocate`]).
fn allocation(inputs: &Inputs, owned: &Owned<'_>, taken: &HashSet<IpAddr>) -> BTreeMap<String, Allocated> {
    let mut scratch = Report::default();
    let mut wanting: Vec<(&ObjectKey, &ServiceEntry)> = inputs
        .service_entries
        .iter()
        .filter(|(key, se)| wants_allocation(se, resolution(key, se, &mut scratch)))
        .collect();
    wanting.sort_by_key(|(key, se)| (se.metadata.creation_timestamp.as_ref(), *key));
    let mut hosts = Vec::new();
    for (key, se) in wanting {
        for host in se.spec.hosts.iter().map(|h| h.to_ascii_lowercase()) {
            if !wildcard(&host) && valid_host(&host) && owned.check_host(&host, &key.namespace).is_ok() {
                hosts.push((format!("{}/{host}", key.namespace), host));
            }
        }
    }
    allocate(hosts.iter().map(|(k, h)| (k.as_str(), h.as_str())), taken)
}

fn check_unsupported(key: &ObjectKey, se: &ServiceEntry, report: &mut Report) {
    let export = &se.spec.export_to;
    if !export.is_empty() && !export.iter().any(|e| e == "*") {
        report.add(
            Kind::ServiceEntry,
            key,
            format!(
                "spec.exportTo {export:?} is not enforced: every ztunnel receives every service, so the entry is \
                 visible mesh-wide"
            ),
        );
    }
    if !se.spec.endpoints.is_empty() && se.spec.workload_selector.is_some() {
        report.add(
            Kind::ServiceEntry,
            key,
            "spec.endpoints and spec.workloadSelector are exclusive; the selector is ignored",
        );
    }
    if let Some(loc) = se.spec.location.as_deref() {
        if loc != "MESH_EXTERNAL" && loc != "MESH_INTERNAL" {
            report.add(
                Kind::ServiceEntry,
                key,
                format!("spec.location {loc} is not MESH_EXTERNAL or MESH_INTERNAL; ignored"),
            );
        }
    }
}

/// SPIFFE subject alt names (what ztunnel verifies); others only matter to TLS origination.
fn subject_alt_names(key: &ObjectKey, se: &ServiceEntry, report: &mut Report) -> Vec<String> {
    let (spiffe, other): (Vec<&String>, Vec<&String>) = se
        .spec
        .subject_alt_names
        .iter()
        .partition(|s| s.parse::<mesh_core::identity::Identity>().is_ok());
    if !other.is_empty() {
        report.add(
            Kind::ServiceEntry,
            key,
            format!(
                "spec.subjectAltNames {other:?} are not SPIFFE identities: ztunnel verifies only SPIFFE ids; ignored"
            ),
        );
    }
    spiffe.into_iter().cloned().collect()
}

/// Translates every ServiceEntry. `taken` holds the Kubernetes Services' keys and VIPs,
/// `owned` the addresses no entry may declare.
pub(crate) fn translate(
    inputs: &Inputs,
    options: &Options,
    attach: &Attachments<'_>,
    (taken, owned): (&Taken, &Owned<'_>),
    report: &mut Report,
) -> Translated {
    let mut declared: HashSet<IpAddr> = taken.ips.clone();
    for se in inputs.service_entries.values() {
        // Declared VIPs in the allocation ranges are refused ([`Owned::check_vip`]): they
        // move no allocated VIP.
        let ips = se.spec.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok());
        declared.extend(ips.filter(|ip| !super::auto_allocate::in_ranges(*ip)));
    }
    let allocated = allocation(inputs, owned, &declared);
    let mut out = Translated::default();
    let mut claims = Claims {
        taken: &taken.keys,
        owned,
        owners: BTreeMap::new(),
    };
    for (key, se) in &inputs.service_entries {
        if let Err(e) = within_bounds(se) {
            report.add(Kind::ServiceEntry, key, format!("{e}; the entry is not served"));
            continue;
        }
        check_unsupported(key, se, report);
        let shape = Shape {
            res: resolution(key, se, report),
            ports: ports(key, se, report),
            vips: addresses(key, se, owned, report),
            sans: subject_alt_names(key, se, report),
            waypoint: attach.for_service_entry(key, &se.metadata, report),
        };
        if se.spec.hosts.is_empty() {
            report.add(Kind::ServiceEntry, key, "spec.hosts is empty; nothing to add");
            continue;
        }
        let mut hosts = Vec::new();
        for (i, host) in se.spec.hosts.iter().enumerate() {
            let Some((svc_key, host)) = claims.claim(key, i, host, report) else {
                continue;
            };
            let mut ips = shape.vips.clone();
            if ips.is_empty() && !wildcard(&host) && wants_allocation(se, shape.res) {
                if let Some(pair) = allocated.get(&svc_key) {
                    ips = vec![IpAddr::V4(pair.v4), IpAddr::V6(pair.v6)];
                }
            }
            out.services.push(shape.service(key, &host, &ips, options));
            hosts.push((svc_key, host));
        }
        let entry = Entry {
            key,
            se,
            res: shape.res,
            ports: &shape.ports,
            hosts: &hosts,
            owned,
        };
        endpoints(&entry, options, &mut out, report);
    }
    out
}

/// The most hosts one entry may declare.
const MAX_HOSTS: usize = 1_000;
/// The most endpoints one entry may list.
const MAX_ENDPOINTS: usize = 10_000;
/// The most (host, endpoint) pairs one entry may make: each endpoint workload lists every
/// host, and every ztunnel holds the result.
const MAX_PAIRS: usize = 100_000;

/// Whether `se` is within the bounds above. One object in one namespace must not be able to
/// make the controller, and every ztunnel, hold hosts × endpoints entries without limit
/// (30k hosts and 30k endpoints fit in an object Kubernetes accepts).
pub(crate) fn within_bounds(se: &ServiceEntry) -> Result<(), String> {
    let (hosts, endpoints) = (se.spec.hosts.len(), se.spec.endpoints.len());
    if hosts > MAX_HOSTS {
        return Err(format!("spec.hosts has {hosts} entries, more than {MAX_HOSTS}"));
    }
    if endpoints > MAX_ENDPOINTS {
        return Err(format!(
            "spec.endpoints has {endpoints} entries, more than {MAX_ENDPOINTS}"
        ));
    }
    if hosts * endpoints > MAX_PAIRS {
        return Err(format!(
            "{hosts} hosts × {endpoints} endpoints = {} host-endpoint pairs, more than {MAX_PAIRS}: split the entry",
            hosts * endpoints
        ));
    }
    Ok(())
}

/// Which ServiceEntry declared each host first, beside the Kubernetes Services' keys and the
/// hosts [`Owned`] refuses.
struct Claims<'a> {
    taken: &'a HashSet<String>,
    owned: &'a Owned<'a>,
    owners: BTreeMap<String, ObjectKey>,
}

impl Claims<'_> {
    /// `spec.hosts[i]` as the entry's (service key, lowercase host), unless it is not a DNS
    /// name, [`Owned::check_host`] refuses it (another namespace's Service name, or an older
    /// entry of another namespace's host), is a Kubernetes Service (the Service wins) or an
    /// earlier entry's of the namespace (the first wins).
    fn claim(&mut self, key: &ObjectKey, i: usize, host: &str, report: &mut Report) -> Option<(String, String)> {
        let host = host.to_ascii_lowercase();
        if !valid_host(&host) {
            report.add(
                Kind::ServiceEntry,
                key,
                format!("spec.hosts[{i}] {host:?} is not a DNS name; ignored"),
            );
            return None;
        }
        if let Err(refusal) = self.owned.check_host(&host, &key.namespace) {
            report.add(
                Kind::ServiceEntry,
                key,
                format!("spec.hosts[{i}] {host:?}: {refusal}, ignored"),
            );
            return None;
        }
        let svc_key = format!("{}/{host}", key.namespace);
        if self.taken.contains(&svc_key) {
            report.add(
                Kind::ServiceEntry,
                key,
                format!(
                    "host {host} is a Kubernetes Service in {}; the Service wins",
                    key.namespace
                ),
            );
            return None;
        }
        if let Some(first) = self.owners.get(&svc_key) {
            report.add(
                Kind::ServiceEntry,
                key,
                format!("host {host} is already declared by ServiceEntry {first}; the first wins"),
            );
            return None;
        }
        self.owners.insert(svc_key.clone(), key.clone());
        Some((svc_key, host))
    }
}

/// What every host of one entry shares.
struct Shape {
    res: Resolution,
    ports: Vec<(Option<String>, pb::Port)>,
    vips: Vec<IpAddr>,
    sans: Vec<String>,
    waypoint: Option<pb::GatewayAddress>,
}

impl Shape {
    /// The workload-API Service for one host of the entry, at `ips`.
    fn service(&self, key: &ObjectKey, host: &str, ips: &[IpAddr], options: &Options) -> pb::Service {
        pb::Service {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            hostname: host.to_owned(),
            addresses: ips
                .iter()
                .map(|ip| pb::NetworkAddress {
                    network: options.network.clone(),
                    address: ip_to_bytes(*ip),
                })
                .collect(),
            ports: self.ports.iter().map(|(_, p)| *p).collect(),
            subject_alt_names: self.sans.clone(),
            waypoint: self.waypoint.clone(),
            load_balancing: (self.res == Resolution::None).then(|| pb::LoadBalancing {
                routing_preference: Vec::new(),
                mode: pb::load_balancing::Mode::Passthrough as i32,
                health_policy: pb::load_balancing::HealthPolicy::AllowAll as i32,
                dns_connect_strategy: 0,
            }),
            ip_families: 0,
            extensions: Vec::new(),
            canonical: false,
            ingress_use_waypoint: false,
        }
    }
}

/// One entry's translated parts that its endpoints need.
struct Entry<'a> {
    key: &'a ObjectKey,
    se: &'a ServiceEntry,
    res: Resolution,
    ports: &'a [(Option<String>, pb::Port)],
    /// (service key, host) of the hosts kept.
    hosts: &'a [(String, String)],
    owned: &'a Owned<'a>,
}

/// Endpoints (explicit or implicit) as workloads, or the selector for pods.
fn endpoints(entry: &Entry<'_>, options: &Options, out: &mut Translated, report: &mut Report) {
    let Entry {
        key,
        se,
        res,
        ports,
        hosts,
        owned,
    } = *entry;
    if hosts.is_empty() {
        return;
    }
    let port_list = |ep: Option<&Endpoint>| pb::PortList {
        ports: ports
            .iter()
            .map(|(name, p)| {
                let own = name.as_ref().and_then(|n| ep.and_then(|e| e.ports.get(n)));
                pb::Port {
                    target_port: own.copied().unwrap_or(p.target_port),
                    ..*p
                }
            })
            .collect(),
    };
    if se.spec.endpoints.is_empty() {
        if let Some(sel) = &se.spec.workload_selector {
            let services = hosts.iter().map(|(k, _)| (k.clone(), port_list(None))).collect();
            out.selectors.push(Selector {
                namespace: key.namespace.clone(),
                labels: sel.labels.clone(),
                services,
            });
            return;
        }
        if res == Resolution::Dns {
            // Implicit endpoints: each host resolved by the sending proxy.
            for (svc_key, host) in hosts.iter().filter(|(_, h)| !wildcard(h)) {
                let ep = Endpoint {
                    address: host.clone(),
                    ..Endpoint::default()
                };
                let services = [(svc_key.clone(), port_list(None))].into();
                out.workloads.push(workload(key, se, &ep, None, services, options));
            }
        }
        return;
    }
    for (i, ep) in se.spec.endpoints.iter().enumerate() {
        let ip = ep.address.parse::<IpAddr>().ok();
        if ip.is_none() && (res != Resolution::Dns || !valid_host(&ep.address) || wildcard(&ep.address)) {
            report.add(
                Kind::ServiceEntry,
                key,
                format!(
                    "spec.endpoints[{i}].address {:?} must be an IP (a host name needs resolution DNS); ignored",
                    ep.address
                ),
            );
            continue;
        }
        let checked = ip.map(|ip| owned.check_endpoint(ip, ep.network.as_deref(), &key.namespace));
        if let Some(Err(refusal)) = checked {
            report.add(
                Kind::ServiceEntry,
                key,
                format!("spec.endpoints[{i}].address: {refusal}, ignored"),
            );
            continue;
        }
        let services = hosts.iter().map(|(k, _)| (k.clone(), port_list(Some(ep)))).collect();
        out.workloads.push(workload(key, se, ep, ip, services, options));
    }
}

fn workload(
    key: &ObjectKey,
    se: &ServiceEntry,
    ep: &Endpoint,
    ip: Option<IpAddr>,
    services: BTreeMap<String, pb::PortList>,
    options: &Options,
) -> pb::Workload {
    let (canonical_name, canonical_revision) = super::workload::canonical(se.metadata.labels.as_ref(), &key.name);
    let hbone = super::workload::redirection_enabled(se.metadata.annotations.as_ref());
    let locality = ep.locality.as_deref().map(|l| {
        let mut parts = l.splitn(3, '/').map(str::to_owned);
        pb::Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    });
    pb::Workload {
        uid: format!(
            "{}/networking.istio.io/ServiceEntry/{}/{}/{}",
            options.cluster_id, key.namespace, key.name, ep.address
        ),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        addresses: ip.map(ip_to_bytes).into_iter().collect(),
        hostname: if ip.is_none() {
            ep.address.clone()
        } else {
            String::new()
        },
        network: ep.network.clone().unwrap_or_else(|| options.network.clone()),
        tunnel_protocol: if hbone {
            pb::TunnelProtocol::Hbone
        } else {
            pb::TunnelProtocol::None
        } as i32,
        trust_domain: options.trust_domain.clone(),
        service_account: ep.service_account.clone().unwrap_or_default(),
        waypoint: None,
        network_gateway: None,
        node: String::new(),
        canonical_name,
        canonical_revision,
        workload_type: pb::WorkloadType::Pod as i32,
        workload_name: key.name.clone(),
        native_tunnel: false,
        application_tunnel: None,
        services,
        authorization_policies: Vec::new(),
        status: pb::WorkloadStatus::Healthy as i32,
        cluster_id: options.cluster_id.clone(),
        locality,
        network_mode: pb::NetworkMode::Standard as i32,
        extensions: Vec::new(),
        capacity: ep.weight.filter(|w| *w > 0),
    }
}

/// The most hosts entries' `workloadSelector`s may add to one pod. The entries are cheap
/// objects and the pods they pick are their namespace's own, but every ztunnel holds each
/// pod's services: without this, 1,000 entries of 1,000 hosts would put 10⁶ on every pod
/// they select.
const MAX_SELECTED_HOSTS: usize = 1_000;

/// Adds the hosts of entries with a `workloadSelector` to the pod workloads they select
/// (`workloads` by uid).
pub(crate) fn select_pods(
    inputs: &Inputs,
    options: &Options,
    selectors: &[Selector],
    (workloads, report): (&mut BTreeMap<String, pb::Address>, &mut Report),
) {
    if selectors.is_empty() {
        return;
    }
    for (pod_key, pod) in &inputs.pods {
        let uid = super::workload::pod_uid(options, pod_key);
        if let Some(pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        }) = workloads.get_mut(&uid)
        {
            add_hosts(selectors, (pod_key, pod.metadata.labels.as_ref()), w, report);
        }
    }
}

/// Adds to one pod's workload the hosts of the entries whose selector picks it (a Kubernetes
/// Service already listed keeps its ports), at most [`MAX_SELECTED_HOSTS`] of them in the
/// entries' order; the pod's problem says how many were left out.
pub(crate) fn add_hosts(
    selectors: &[Selector],
    (pod, labels): (&ObjectKey, Option<&BTreeMap<String, String>>),
    w: &mut pb::Workload,
    report: &mut Report,
) {
    let (mut added, mut left) = (0, 0);
    for sel in selectors.iter().filter(|s| s.picks(pod, labels)) {
        for (k, ports) in &sel.services {
            if w.services.contains_key(k) {
                continue;
            }
            if added == MAX_SELECTED_HOSTS {
                left += 1;
                continue;
            }
            w.services.insert(k.clone(), ports.clone());
            added += 1;
        }
    }
    if left > 0 {
        report.add(
            Kind::Pod,
            pod,
            format!(
                "ServiceEntry workloadSelectors pick this pod for {} hosts, more than {MAX_SELECTED_HOSTS}: {left} left out (the entries sorted by namespace/name keep theirs first)",
                added + left
            ),
        );
    }
}

/// Outbound policy REGISTRY_ONLY: every workload carries the extension ztunnel reads for the
/// connections that workload opens ([`mesh_core::state::OUTBOUND_POLICY_EXTENSION`]); under
/// ALLOW_ANY nothing is added, so Istio's ztunnel and older ones see the same resources.
pub(crate) fn registry_only(addresses: &mut BTreeMap<String, pb::Address>) {
    for a in addresses.values_mut() {
        if let Some(pb::address::Type::Workload(w)) = &mut a.r#type {
            w.extensions.push(mesh_core::state::registry_only_extension());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::mesh_config::{MeshConfig, OutboundMode, OutboundTrafficPolicy};
    use crate::model::Object;

    fn inputs(mode: OutboundMode) -> Inputs {
        let mut inputs = Inputs {
            mesh: MeshConfig {
                outbound_traffic_policy: OutboundTrafficPolicy { mode },
                ..MeshConfig::default()
            },
            ..Inputs::default()
        };
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "shop"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"podIP": "10.1.0.1"}
        });
        inputs.apply(Object::parse(pod).unwrap());
        inputs
    }

    /// One entry of `hosts` × `endpoints` in namespace `evil`, and whether it was served.
    fn served(hosts: usize, endpoints: usize) -> (bool, Vec<String>) {
        let mut inputs = Inputs::default();
        let se = serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "big", "namespace": "evil"},
            "spec": {
                "hosts": (0..hosts).map(|i| format!("h{i}.evil.test")).collect::<Vec<_>>(),
                "resolution": "STATIC",
                "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                "endpoints": (0..endpoints).map(|i| serde_json::json!({"address": format!("10.200.{}.{}", i / 250, i % 250 + 1)})).collect::<Vec<_>>()
            }
        });
        inputs.apply(Object::parse(se).unwrap());
        let out = super::super::translate(&inputs, &Options::default());
        let served = out.addresses.keys().any(|k| k.starts_with("evil/h0."));
        (served, out.problems.iter().map(|p| p.message.clone()).collect())
    }

    /// Hosts × endpoints is bounded per entry; an entry past a bound is reported whole and
    /// not served, so one namespace cannot make every ztunnel hold millions of entries.
    #[test]
    fn an_entry_past_its_bounds_is_refused() {
        assert!(served(100, 1000).0);
        let (ok, problems) = served(400, 400);
        assert!(!ok);
        assert!(
            problems.iter().any(|p| p.contains("400 hosts × 400 endpoints")),
            "{problems:?}"
        );
        let (ok, problems) = served(MAX_HOSTS + 1, 1);
        assert!(
            !ok && problems.iter().any(|p| p.contains("spec.hosts has 1001")),
            "{problems:?}"
        );
    }

    /// An entry of `hosts` selecting `app: a` in namespace shop.
    fn selecting(name: &str, hosts: usize) -> Object {
        Object::parse(serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "hosts": (0..hosts).map(|i| format!("h{i}.{name}.test")).collect::<Vec<_>>(),
                "resolution": "STATIC",
                "ports": [{"number": 80, "name": "http"}],
                "workloadSelector": {"labels": {"app": "a"}}
            }
        }))
        .unwrap()
    }

    /// The entry hosts a pod's workload lists, and the pod's problems.
    fn selected_hosts(out: &crate::translate::Outputs) -> (usize, Vec<String>) {
        let uid = super::super::workload::pod_uid(&Options::default(), &ObjectKey::new("shop", "a"));
        let hosts = match out.addresses.get(&uid).and_then(|a| a.r#type.as_ref()) {
            Some(pb::address::Type::Workload(w)) => w.services.len(),
            other => panic!("no workload for the pod: {other:?}"),
        };
        (hosts, out.problems.iter().map(|p| p.message.clone()).collect())
    }

    /// Many selecting entries cannot pile hosts onto a pod without bound: the first 1,000 (by
    /// entry) are added, the pod's problem counts the rest; the incremental translation
    /// agrees with a full one as entries come and go.
    #[test]
    fn selectors_add_at_most_their_bound_of_hosts_to_a_pod() {
        use crate::source::Change;
        use crate::translate::incremental::testing::step_equals_full;
        use crate::translate::incremental::Incremental;
        let mut inputs = Inputs::default();
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "shop", "labels": {"app": "a"}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"podIP": "10.1.0.1"}
        });
        inputs.apply(Object::parse(pod).unwrap());
        inputs.apply(selecting("e1", 600));
        let mut inc = Incremental::new(Options::default());
        inc.step(&inputs, &Default::default());
        let out = step_equals_full(&mut inc, &mut inputs, Change::Apply(selecting("e2", 600)), 0);
        let (hosts, problems) = selected_hosts(&out);
        assert_eq!(hosts, MAX_SELECTED_HOSTS);
        let hint = "for 1200 hosts, more than 1000: 200 left out";
        assert!(problems.iter().any(|p| p.contains(hint)), "{problems:?}");
        let gone = Change::Delete(Kind::ServiceEntry, ObjectKey::new("shop", "e2"));
        let (hosts, problems) = selected_hosts(&step_equals_full(&mut inc, &mut inputs, gone, 1));
        assert_eq!(hosts, 600);
        assert!(!problems.iter().any(|p| p.contains("left out")), "{problems:?}");
    }

    /// The mode reaches ztunnel as the workload extension under REGISTRY_ONLY only.
    #[test]
    fn registry_only_marks_every_workload_and_allow_any_none() {
        let extensions = |mode| {
            let out = super::super::translate(&inputs(mode), &Options::default());
            out.addresses
                .values()
                .filter_map(|a| match &a.r#type {
                    Some(pb::address::Type::Workload(w)) => Some(w.extensions.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let on = extensions(OutboundMode::RegistryOnly);
        assert_eq!(on.len(), 1);
        assert_eq!(on[0], [mesh_core::state::registry_only_extension()]);
        assert!(extensions(OutboundMode::AllowAny).iter().all(Vec::is_empty));
    }

    /// A newer entry cannot move an older entry's auto-allocated VIP by crafting a host whose
    /// first candidate is that VIP and that sorts first (clients that cached the VIP would
    /// reach the newer entry's service): hosts are placed oldest entry first.
    #[test]
    fn a_newer_entry_cannot_move_an_older_entrys_vip() {
        use super::super::auto_allocate::first_candidate;
        let victim = first_candidate("api.shop.test");
        let crafted = (0..1_000_000)
            .map(|i| format!("a{i}.evil.test"))
            .find(|h| first_candidate(h) == victim)
            .expect("a colliding host");
        assert!(crafted.as_str() < "api.shop.test");
        let entry = |ns: &str, at: u32, host: &str| {
            Object::parse(serde_json::json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "e", "namespace": ns, "creationTimestamp": format!("2026-01-01T00:00:{at:02}Z")},
                "spec": {"hosts": [host], "resolution": "DNS", "ports": [{"number": 80, "name": "http"}]}
            }))
            .unwrap()
        };
        let mut inputs = Inputs::default();
        inputs.apply(entry("shop", 1, "api.shop.test"));
        inputs.apply(entry("aaa", 5, &crafted));
        let out = super::super::translate(&inputs, &Options::default());
        let v4 = |key: &str| match out.addresses.get(key).and_then(|a| a.r#type.as_ref()) {
            Some(pb::address::Type::Service(s)) => s.addresses.first().map(|a| a.address.clone()),
            _ => None,
        };
        assert_eq!(v4("shop/api.shop.test"), Some(victim.octets().to_vec()));
        let theirs = v4(&format!("aaa/{crafted}")).expect("the newer entry is served");
        assert_ne!(theirs, victim.octets().to_vec());
    }

    /// A newer entry declaring an older entry's auto-allocated VIP as its address is refused
    /// it, and the older entry keeps its VIP.
    #[test]
    fn an_entry_cannot_declare_an_allocated_vip() {
        let victim = super::super::auto_allocate::first_candidate("api.shop.test");
        let entry = |ns: &str, at: u32, host: &str, addresses: Vec<String>| {
            Object::parse(serde_json::json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "e", "namespace": ns, "creationTimestamp": format!("2026-01-01T00:00:{at:02}Z")},
                "spec": {"hosts": [host], "addresses": addresses, "resolution": "STATIC",
                         "ports": [{"number": 80, "name": "http"}]}
            }))
            .unwrap()
        };
        let mut inputs = Inputs::default();
        inputs.apply(entry("shop", 1, "api.shop.test", vec![]));
        inputs.apply(entry("evil", 5, "grab.evil.test", vec![victim.to_string()]));
        let out = super::super::translate(&inputs, &Options::default());
        let vips = |key: &str| match out.addresses.get(key).and_then(|a| a.r#type.as_ref()) {
            Some(pb::address::Type::Service(s)) => s.addresses.iter().map(|a| a.address.clone()).collect(),
            _ => Vec::new(),
        };
        assert_eq!(vips("shop/api.shop.test").first(), Some(&victim.octets().to_vec()));
        assert!(vips("evil/grab.evil.test").is_empty());
        let refused = out.problems.iter().any(|p| {
            p.object == ObjectKey::new("evil", "e")
                && p.message.starts_with(&format!(
                    "spec.addresses[0]: {victim} is in the auto-allocated VIP ranges"
                ))
        });
        assert!(refused, "{:?}", out.problems);
    }
}
