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

/// Translates every ServiceEntry and WorkloadEntry. A WorkloadEntry lists the hosts of the
/// entries selecting it that the entries' own services hold: a host a Kubernetes Service
/// kept is the Service's, which lists the WorkloadEntry only through its own selector.
pub(crate) fn translate(
    inputs: &Inputs,
    options: &Options,
    attach: &Attachments<'_>,
    taken: &Taken,
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
    let workloads = workload_entry::translate(inputs, options, selected, |name| out.addresses.get(name), report);
    out.addresses.extend(workloads);
    if inputs.mesh.outbound_traffic_policy.mode == crate::mesh_config::OutboundMode::RegistryOnly {
        service_entry::registry_only(&mut out.addresses);
    }
    out.selectors = entries.selectors;
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use crate::model::{Inputs, Object};
    use crate::translate::{translate, Options};
    use mesh_proto::workload as pb;

    /// A ServiceEntry whose host a Kubernetes Service of the same name keeps: the VM it
    /// selects does not list the Service's host with the entry's ports (the Service does not
    /// select it), only the host the entry owns.
    #[test]
    fn a_host_the_service_kept_is_not_the_entrys_to_give() {
        let mut inputs = Inputs::default();
        for o in [
            serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.5", "selector": {"app": "postgres"}, "ports": [{"port": 5432}]}}),
            serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {"hosts": ["db.shop.svc.cluster.local", "db.vm.test"], "resolution": "STATIC",
                         "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP"}],
                         "workloadSelector": {"labels": {"app": "vm-db"}}}}),
            serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": "vm", "namespace": "shop"},
                "spec": {"address": "10.20.0.5", "labels": {"app": "vm-db"}}}),
        ] {
            inputs.apply(Object::parse(o).unwrap());
        }
        let out = translate(&inputs, &Options::default());
        let vm = out
            .addresses
            .values()
            .find_map(|a| match &a.r#type {
                Some(pb::address::Type::Workload(w)) if w.name == "vm" => Some(w.clone()),
                _ => None,
            })
            .expect("the VM's workload");
        let services: Vec<&String> = vm.services.keys().collect();
        assert_eq!(services, ["shop/db.vm.test"], "{services:?}");
    }
}
