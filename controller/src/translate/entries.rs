//! ServiceEntries and WorkloadEntries together, as one layer over the Kubernetes Services:
//! the entries' services and endpoint workloads, the WorkloadEntries' workloads, and the
//! `workloadSelector`s that add entry hosts to the pods they select. The full translation
//! and the incremental one ([`super::incremental`]) both call [`translate`], so an entry is
//! translated the same way whichever path runs; the layer is small (entries are few beside
//! pods), so the incremental path recomputes it whole when anything it reads changed.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use mesh_proto::workload as pb;

use super::attach::Attachments;
use super::service_entry::{self, Selector};
use super::{workload_entry, Options, Report, Selected};
use crate::model::Inputs;

/// What the Kubernetes Services hold that entries must not take: their keys (`ns/host`) and
/// VIPs.
#[derive(Default)]
pub(crate) struct Taken {
    pub keys: HashSet<String>,
    pub ips: HashSet<IpAddr>,
}

impl Taken {
    /// Adds one translated Kubernetes Service.
    pub(crate) fn add(&mut self, name: &str, address: &pb::Address) {
        self.keys.insert(name.to_owned());
        if let Some(pb::address::Type::Service(s)) = &address.r#type {
            let vips = s.addresses.iter();
            self.ips
                .extend(vips.filter_map(|a| mesh_core::state::model::ip_from_bytes(&a.address)));
        }
    }
}

/// The layer's result.
#[derive(Default)]
pub(crate) struct Entries {
    /// Services and workloads by resource name.
    pub addresses: BTreeMap<String, pb::Address>,
    pub selectors: Vec<Selector>,
}

/// Translates every ServiceEntry and WorkloadEntry. `service` looks up a Kubernetes Service's
/// address by name (a WorkloadEntry's `entry_services` checks which entry owns a host).
pub(crate) fn translate<'a>(
    inputs: &Inputs,
    options: &Options,
    attach: &Attachments<'_>,
    taken: &Taken,
    service: impl Fn(&str) -> Option<&'a pb::Address>,
    selected: &[Selected],
    report: &mut Report,
) -> Entries {
    let mut out = Entries::default();
    if inputs.service_entries.is_empty() && inputs.workload_entries.is_empty() {
        return out;
    }
    let entries = service_entry::translate(inputs, options, attach, &taken.keys, &taken.ips, report);
    for svc in entries.services {
        out.addresses.insert(
            format!("{}/{}", svc.namespace, svc.hostname),
            pb::Address {
                r#type: Some(pb::address::Type::Service(svc)),
            },
        );
    }
    for w in entries.workloads {
        out.addresses.insert(
            w.uid.clone(),
            pb::Address {
                r#type: Some(pb::address::Type::Workload(w)),
            },
        );
    }
    let workloads = workload_entry::translate(
        inputs,
        options,
        selected,
        |name| out.addresses.get(name).or_else(|| service(name)),
        report,
    );
    out.addresses.extend(workloads);
    if inputs.mesh.outbound_traffic_policy.mode == crate::mesh_config::OutboundMode::RegistryOnly {
        service_entry::registry_only(&mut out.addresses);
    }
    out.selectors = entries.selectors;
    out
}
