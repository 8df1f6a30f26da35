//! WorkloadEntries to `istio.workload.Workload`, as Istio's control plane sends them: uid
//! `<cluster>/networking.istio.io/WorkloadEntry/<ns>/<name>`, the entry's address, network,
//! service account, locality and weight; selected by the Kubernetes Services and the
//! ServiceEntries (`workloadSelector`) of its namespace whose selector its labels match (a
//! named target port, or a ServiceEntry port's name, looked up in the entry's `ports`); the
//! selector authorization policies that apply to its labels; HBONE when annotated
//! `ambient.istio.io/redirection: enabled` (a VM running its own ztunnel), else plain.
//! An address that is not an IP is reported (resolving VM names is not implemented), and so
//! is one [`Owned::check_endpoint`] refuses (unroutable, another's, a service's VIP): the
//! entry is not served.
//!
//! An entry naming a WorkloadGroup (annotation or label `istio.io/autoRegistrationGroup`, as
//! Istio marks the entries its auto-registration creates from a group) takes what it leaves
//! out from the group: labels and annotations (the entry's own win), service account,
//! network, locality, weight and ports (the entry's own win). An entry naming a group that
//! does not exist in its namespace is reported and not served: its identity is unknown.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::state::model::ip_to_bytes;
use mesh_proto::workload as pb;

use super::entries::Owned;
use super::{Options, Report, Selected};
use crate::model::service_entry::{WorkloadEntry, WorkloadGroup};
use crate::model::{selects, Inputs, Kind, ObjectKey};

/// Names the WorkloadGroup an entry belongs to (Istio's auto-registration annotation).
pub(crate) const GROUP_KEY: &str = "istio.io/autoRegistrationGroup";

/// The group `we` names, if any: `Ok(None)` when it names none, `Err(name)` when the named
/// group does not exist in the entry's namespace.
fn group_of<'a>(inputs: &'a Inputs, key: &ObjectKey, we: &WorkloadEntry) -> Result<Option<&'a WorkloadGroup>, String> {
    let named = we
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GROUP_KEY))
        .or_else(|| we.metadata.labels.as_ref().and_then(|l| l.get(GROUP_KEY)));
    let Some(name) = named else { return Ok(None) };
    inputs
        .workload_groups
        .get(&ObjectKey::new(key.namespace.clone(), name.clone()))
        .map(Some)
        .ok_or_else(|| name.clone())
}

/// The entry with what it leaves out taken from its group (its own fields win).
fn with_group(we: &WorkloadEntry, group: &WorkloadGroup) -> WorkloadEntry {
    let mut out = we.clone();
    let (spec, template) = (&mut out.spec, &group.spec.template);
    let mut labels = group.spec.metadata.labels.clone();
    labels.extend(template.labels.clone());
    labels.extend(std::mem::take(&mut spec.labels));
    spec.labels = labels;
    let mut ports = template.ports.clone();
    ports.extend(std::mem::take(&mut spec.ports));
    spec.ports = ports;
    let empty = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
    if empty(&spec.service_account) {
        spec.service_account = template.service_account.clone();
    }
    if empty(&spec.network) {
        spec.network = template.network.clone();
    }
    if empty(&spec.locality) {
        spec.locality = template.locality.clone();
    }
    spec.weight = spec.weight.or(template.weight);
    let mut annotations: BTreeMap<String, String> = group.spec.metadata.annotations.clone();
    annotations.extend(out.metadata.annotations.take().unwrap_or_default());
    out.metadata.annotations = Some(annotations);
    out
}

/// Kubernetes Services of the entry's namespace selecting it, with its ports for each.
fn kubernetes_services(
    inputs: &Inputs,
    key: &ObjectKey,
    we: &WorkloadEntry,
    options: &Options,
) -> BTreeMap<String, pb::PortList> {
    let labels = Some(&we.spec.labels);
    let mut out = BTreeMap::new();
    for (svc_key, svc) in inputs.services.range(ObjectKey::new(key.namespace.clone(), "")..) {
        if svc_key.namespace != key.namespace {
            break;
        }
        let Some(spec) = svc.spec.as_ref() else { continue };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        if !selects(selector, labels) {
            continue;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|pr| pr == "TCP"))
            .filter_map(|p| {
                let service_port = u32::try_from(p.port).ok()?;
                let target_port = match &p.target_port {
                    None => service_port,
                    Some(IntOrString::Int(n)) => u32::try_from(*n).ok()?,
                    Some(IntOrString::String(name)) => *we.spec.ports.get(name)?,
                };
                Some(pb::Port {
                    service_port,
                    target_port,
                    app_protocol: super::service::app_protocol(p),
                })
            })
            .collect();
        let host = super::service_hostname(&svc_key.name, &svc_key.namespace, options);
        out.insert(format!("{}/{host}", svc_key.namespace), pb::PortList { ports });
    }
    out
}

/// ServiceEntries of the entry's namespace whose `workloadSelector` matches it: each host
/// the entry's translation kept (`service` finds the entries' own services, so a host a
/// Kubernetes Service kept is never the entry's), with the entry's ports (by port name) or
/// the declared ones.
fn entry_services<'a>(
    inputs: &Inputs,
    key: &ObjectKey,
    we: &WorkloadEntry,
    service: &impl Fn(&str) -> Option<&'a pb::Address>,
) -> BTreeMap<String, pb::PortList> {
    let mut out = BTreeMap::new();
    for (se_key, se) in &inputs.service_entries {
        let Some(sel) = &se.spec.workload_selector else {
            continue;
        };
        if se_key.namespace != key.namespace
            || !se.spec.endpoints.is_empty()
            || !selects(&sel.labels, Some(&we.spec.labels))
        {
            continue;
        }
        let ports: Vec<pb::Port> = se
            .spec
            .ports
            .iter()
            .filter(|p| (1..=65535).contains(&p.number))
            .map(|p| {
                let own = p.name.as_ref().and_then(|n| we.spec.ports.get(n)).copied();
                pb::Port {
                    service_port: p.number,
                    target_port: own.or(p.target_port).unwrap_or(p.number),
                    app_protocol: 0,
                }
            })
            .collect();
        for host in &se.spec.hosts {
            let svc_key = format!("{}/{}", se_key.namespace, host.to_ascii_lowercase());
            // Only hosts this entry owns (not refused for a collision).
            let owned = matches!(
                service(&svc_key).and_then(|a| a.r#type.as_ref()),
                Some(pb::address::Type::Service(s)) if s.name == se_key.name
            );
            if owned {
                // The service's app protocols, port by port.
                let declared = match service(&svc_key).and_then(|a| a.r#type.as_ref()) {
                    Some(pb::address::Type::Service(s)) => s.ports.clone(),
                    _ => Vec::new(),
                };
                let ports = ports
                    .iter()
                    .map(|p| pb::Port {
                        app_protocol: declared
                            .iter()
                            .find(|d| d.service_port == p.service_port)
                            .map_or(0, |d| d.app_protocol),
                        ..*p
                    })
                    .collect();
                out.insert(svc_key, pb::PortList { ports });
            }
        }
    }
    out
}

/// Every WorkloadEntry as a workload, by uid. `service` finds a service address by name
/// (the entries' hosts a selecting ServiceEntry owns); an address `owned` refuses is
/// reported and the entry not served.
pub(crate) fn translate<'a>(
    inputs: &Inputs,
    (options, owned): (&Options, &Owned<'_>),
    selected: &[Selected],
    service: impl Fn(&str) -> Option<&'a pb::Address>,
    report: &mut Report,
) -> BTreeMap<String, pb::Address> {
    let mut addresses = BTreeMap::new();
    for (key, we) in &inputs.workload_entries {
        let we: Cow<'_, WorkloadEntry> = match group_of(inputs, key, we) {
            Ok(None) => Cow::Borrowed(we),
            Ok(Some(group)) => Cow::Owned(with_group(we, group)),
            Err(name) => {
                report.add(
                    Kind::WorkloadEntry,
                    key,
                    format!(
                        "{GROUP_KEY} names WorkloadGroup {name:?}, which does not exist in this namespace; not served"
                    ),
                );
                continue;
            }
        };
        let we = we.as_ref();
        let Ok(ip) = we.spec.address.parse::<IpAddr>() else {
            report.add(
                Kind::WorkloadEntry,
                key,
                format!(
                    "spec.address {:?} is not an IP: resolving workload entries by name is not implemented; ignored",
                    we.spec.address
                ),
            );
            continue;
        };
        if let Err(refusal) = owned.check_endpoint(ip, we.spec.network.as_deref(), &key.namespace) {
            report.add(Kind::WorkloadEntry, key, format!("spec.address: {refusal}, not served"));
            continue;
        }
        let mut services = kubernetes_services(inputs, key, we, options);
        services.extend(entry_services(inputs, key, we, &service));
        let labels = Some(&we.spec.labels);
        let policies = selected
            .iter()
            .filter(|s| s.applies_to(key, labels, &options.root_namespace))
            .map(|s| s.name.clone())
            .collect();
        let workload = pb::Workload {
            services,
            authorization_policies: policies,
            ..workload(options, key, we, ip)
        };
        let uid = workload.uid.clone();
        addresses.insert(
            uid,
            pb::Address {
                r#type: Some(pb::address::Type::Workload(workload)),
            },
        );
    }
    addresses
}

/// An entry's workload at `ip`, without its services and policies (the caller adds them):
/// identity, tunnel, canonical name and revision from Istio's labels, locality, weight.
fn workload(options: &Options, key: &ObjectKey, we: &WorkloadEntry, ip: IpAddr) -> pb::Workload {
    let hbone = super::workload::redirection_enabled(we.metadata.annotations.as_ref());
    let (canonical_name, canonical_revision) = super::workload::canonical(Some(&we.spec.labels), &key.name);
    let uid = format!(
        "{}/networking.istio.io/WorkloadEntry/{}/{}",
        options.cluster_id, key.namespace, key.name
    );
    pb::Workload {
        uid,
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        addresses: vec![ip_to_bytes(ip)],
        hostname: String::new(),
        network: we.spec.network.clone().unwrap_or_else(|| options.network.clone()),
        tunnel_protocol: if hbone {
            pb::TunnelProtocol::Hbone
        } else {
            pb::TunnelProtocol::None
        } as i32,
        trust_domain: options.trust_domain.clone(),
        service_account: we
            .spec
            .service_account
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        waypoint: None,
        network_gateway: None,
        node: String::new(),
        canonical_name,
        canonical_revision,
        workload_type: pb::WorkloadType::Pod as i32,
        workload_name: key.name.clone(),
        native_tunnel: false,
        application_tunnel: None,
        services: BTreeMap::new(),
        authorization_policies: Vec::new(),
        status: pb::WorkloadStatus::Healthy as i32,
        cluster_id: options.cluster_id.clone(),
        locality: we.spec.locality.as_deref().map(|l| {
            let mut parts = l.splitn(3, '/').map(str::to_owned);
            pb::Locality {
                region: parts.next().unwrap_or_default(),
                zone: parts.next().unwrap_or_default(),
                subzone: parts.next().unwrap_or_default(),
            }
        }),
        network_mode: pb::NetworkMode::Standard as i32,
        extensions: Vec::new(),
        capacity: we.spec.weight.filter(|w| *w > 0),
    }
}
