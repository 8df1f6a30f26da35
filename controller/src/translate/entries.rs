//! ServiceEntries and WorkloadEntries together, as one layer over the Kubernetes Services:
//! the entries' services and endpoint workloads, the WorkloadEntries' workloads, and the
//! `workloadSelector`s that add entry hosts to the pods they select. The full translation
//! and the incremental one ([`super::incremental`]) both call [`translate`], so an entry is
//! translated the same way whichever path runs; the layer is small (entries are few beside
//! pods), so the incremental path recomputes it whole when anything it reads changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use mesh_proto::workload as pb;

use super::attach::Attachments;
use super::service_entry::{self, Selector};
use super::{workload_entry, Options, Report, Selected};
use crate::model::pod::Pod;
use crate::model::{Inputs, ObjectKey, ObjectMeta};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

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

/// Addresses an entry may not declare, because something else is found by them: a Kubernetes
/// Service's VIP and a pod's IP. ztunnel finds a destination, and at a pod's IP the inbound
/// policy, by address; an entry in one namespace declaring another's address would take its
/// traffic, or strip its policy. Only the addresses entries declare are indexed, so the cost
/// is one pass over the pods when entries exist.
pub(crate) struct Owned<'a> {
    vips: &'a HashSet<IpAddr>,
    /// By (network, IP), the pod's own network as its workload carries it.
    pods: HashMap<(String, IpAddr), &'a ObjectKey>,
    /// By (network, IP), the oldest entry declaring it: its namespace keeps the address.
    entries: HashMap<(String, IpAddr), Claim<'a>>,
    network: &'a str,
}

/// An entry's claim to an address: its age (`None`, unknown, sorts first) and key.
type Claim<'a> = (Option<&'a Time>, &'a ObjectKey);

impl<'a> Owned<'a> {
    pub(crate) fn new(inputs: &'a Inputs, taken: &'a Taken, network: &'a str) -> Self {
        let declared: HashSet<IpAddr> = declared_ips(inputs).collect();
        let mut pods = HashMap::new();
        for (key, pod) in &inputs.pods {
            // Host-network pods share their node's address by design: not theirs alone.
            if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
                continue;
            }
            let pod_network = || crate::model::cluster::pod_network(pod.metadata.labels.as_ref(), network);
            for ip in canonical_ips(super::workload::pod_ips(pod)).filter(|ip| declared.contains(ip)) {
                pods.entry((pod_network(), ip)).or_insert(key);
            }
        }
        Owned {
            vips: &taken.ips,
            pods,
            entries: entry_claims(inputs, network),
            network,
        }
    }

    /// What holds `ip` on `network` (the entry's, as its workload will carry it: the
    /// cluster's when unset), in a problem's words; `None` when the entry may declare it.
    /// Compared canonical, as every proxy reads addresses: `::ffff:10.1.2.3` is `10.1.2.3`.
    /// An address an older entry of another namespace declares is that namespace's (entries
    /// of one namespace may share one).
    pub(crate) fn holder(&self, ip: IpAddr, network: Option<&str>, namespace: &str) -> Option<String> {
        let ip = ip.to_canonical();
        if self.vips.contains(&ip) {
            return Some(format!("{ip} is a Kubernetes Service's VIP"));
        }
        let at = (network.unwrap_or(self.network).to_owned(), ip);
        if let Some(pod) = self.pods.get(&at) {
            return Some(format!(
                "{ip} is the IP of pod {pod} (select the pod with workloadSelector instead)"
            ));
        }
        let (_, owner) = self.entries.get(&at)?;
        (owner.namespace != namespace).then(|| format!("{ip} is declared by the older entry {owner}"))
    }
}

/// Every address entries declare, by (network, IP), with its oldest claim.
fn entry_claims<'a>(inputs: &'a Inputs, network: &str) -> HashMap<(String, IpAddr), Claim<'a>> {
    let mut out: HashMap<(String, IpAddr), Claim<'a>> = HashMap::new();
    let mut claim = |meta: &'a ObjectMeta, key: &'a ObjectKey, net: Option<&str>, ip: IpAddr| {
        let age = meta.creation_timestamp.as_ref();
        let at = (net.unwrap_or(network).to_owned(), ip);
        let older = |(a, k): &Claim<'a>| (age, key) < (*a, *k);
        if out.get(&at).is_none_or(older) {
            out.insert(at, (age, key));
        }
    };
    for (key, se) in &inputs.service_entries {
        let vips = se.spec.addresses.iter().map(|a| a.split('/').next().unwrap_or(a));
        for ip in canonical_ips(vips) {
            claim(&se.metadata, key, None, ip);
        }
        for ep in &se.spec.endpoints {
            for ip in canonical_ips(std::iter::once(ep.address.as_str())) {
                claim(&se.metadata, key, ep.network.as_deref(), ip);
            }
        }
    }
    for (key, we) in &inputs.workload_entries {
        for ip in canonical_ips(std::iter::once(we.spec.address.as_str())) {
            claim(&we.metadata, key, we.spec.network.as_deref(), ip);
        }
    }
    out
}

/// Addresses parsed and made canonical (an IPv4-mapped IPv6 address as IPv4).
fn canonical_ips<'s, I: Iterator<Item = &'s str> + 's>(text: I) -> impl Iterator<Item = IpAddr> + 's {
    text.filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

/// Every IP an entry declares: ServiceEntry addresses and endpoints, WorkloadEntry addresses.
fn declared_ips(inputs: &Inputs) -> impl Iterator<Item = IpAddr> + '_ {
    let entries = inputs.service_entries.values().flat_map(|se| {
        let vips = se.spec.addresses.iter().map(|a| a.split('/').next().unwrap_or(a));
        vips.chain(se.spec.endpoints.iter().map(|e| e.address.as_str()))
    });
    let workloads = inputs.workload_entries.values().map(|we| we.spec.address.as_str());
    canonical_ips(entries.chain(workloads))
}

/// Whether an entry declares one of `pod`'s IPs: the layer then depends on that pod
/// ([`Owned`]), and the incremental translation recomputes it when the pod changes.
pub(crate) fn declares_ip_of(inputs: &Inputs, pod: &Pod) -> bool {
    let ips: Vec<IpAddr> = canonical_ips(super::workload::pod_ips(pod)).collect();
    !ips.is_empty() && declared_ips(inputs).any(|ip| ips.contains(&ip))
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
    let owned = Owned::new(inputs, taken, &options.network);
    let entries = service_entry::translate(inputs, options, attach, (taken, &owned), report);
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
    let service = |name: &str| out.addresses.get(name);
    let workloads = workload_entry::translate(inputs, (options, &owned), selected, service, report);
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

    use crate::model::{Inputs, Kind, Object};
    use crate::translate::incremental::testing::{objects, step_equals_full};
    use crate::translate::{translate, Options};
    use mesh_proto::workload as pb;

    /// shop's Service `db` (10.96.0.5) and pod `payments-0` (10.1.2.3); `evil` holds only
    /// its own namespace.
    const SHOP: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.5, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1\nkind: Pod\nmetadata: {name: payments-0, namespace: shop, labels: {app: payments}}
spec: {nodeName: n0, containers: []}
status: {podIP: 10.1.2.3}
---
apiVersion: v1\nkind: Pod
metadata: {name: ledger-0, namespace: shop, labels: {topology.istio.io/network: net1}}
spec: {nodeName: n0, containers: []}
status: {podIP: 10.1.2.4}
";

    /// Entries in `evil` declaring shop's Service VIP and pod IP (as a VIP, an endpoint and
    /// a WorkloadEntry's address), and one on another network.
    const GRAB: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {name: grab, namespace: evil}
spec:
  hosts: [grab.evil.test]
  addresses: [10.96.0.5, 10.1.2.3/32, 10.200.0.1, \"::ffff:10.96.0.5\", \"::ffff:10.1.2.3/128\"]
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.1.2.3}, {address: 10.200.0.2}, {address: 10.1.2.3, network: far}]
---
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {name: ghost, namespace: evil}
spec: {address: 10.1.2.3}
---
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {name: far, namespace: evil}
spec: {address: 10.1.2.3, network: far}
---
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {name: mapped, namespace: evil}
spec: {address: \"::ffff:10.1.2.3\"}
---
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {name: labelled, namespace: evil}
spec: {address: 10.1.2.4, network: net1}
";

    fn ips(a: &pb::Address) -> Vec<std::net::IpAddr> {
        let ip = |b: &Vec<u8>| mesh_core::state::model::ip_from_bytes(b);
        match &a.r#type {
            Some(pb::address::Type::Service(s)) => s.addresses.iter().filter_map(|n| ip(&n.address)).collect(),
            Some(pb::address::Type::Workload(w)) => w.addresses.iter().filter_map(ip).collect(),
            None => Vec::new(),
        }
    }

    /// ztunnel finds a destination, and at a pod's IP its inbound policy, by address: an
    /// entry in one namespace declaring another's Service VIP or pod IP would take that
    /// traffic or strip that policy. Those addresses are refused and reported; the entry's
    /// own addresses, and a pod's IP on another network, are kept.
    #[test]
    fn an_entry_cannot_take_a_services_vip_or_a_pods_ip() {
        let mut inputs = Inputs::default();
        objects(&format!("{SHOP}---\n{GRAB}"))
            .into_iter()
            .for_each(|o| inputs.apply(o));
        let out = translate(&inputs, &Options::default());
        let held = |name: &str| ips(&out.addresses[name]);
        assert_eq!(
            held("evil/grab.evil.test"),
            ["10.200.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        let shop: [std::net::IpAddr; 2] = ["10.96.0.5".parse().unwrap(), "10.1.2.3".parse().unwrap()];
        for (name, a) in &out.addresses {
            let local = match &a.r#type {
                Some(pb::address::Type::Workload(w)) => w.network.is_empty(),
                _ => true,
            };
            if name.contains("evil") && local {
                assert!(ips(a).iter().all(|ip| !shop.contains(ip)), "{name} holds {:?}", ips(a));
            }
        }
        let entry_ips: Vec<Vec<std::net::IpAddr>> = out
            .addresses
            .iter()
            .filter(|(n, _)| n.contains("ServiceEntry/evil/grab"))
            .map(|(_, a)| ips(a))
            .collect();
        assert_eq!(
            entry_ips.len(),
            2,
            "the endpoint at 10.200.0.2 and the one on network far"
        );
        assert!(out.addresses.keys().any(|n| n.ends_with("WorkloadEntry/evil/far")));
        assert!(!out.addresses.keys().any(|n| n.ends_with("WorkloadEntry/evil/ghost")));
        let problems = |kind, name: &str| {
            out.problems
                .iter()
                .filter(|p| p.kind == kind && p.object == crate::model::ObjectKey::new("evil", name))
                .map(|p| p.message.clone())
                .collect::<Vec<_>>()
        };
        let grab = problems(Kind::ServiceEntry, "grab");
        assert_eq!(grab.len(), 5, "{grab:?}");
        assert!(
            grab[0].contains("spec.addresses[0]") && grab[0].contains("Kubernetes Service"),
            "{grab:?}"
        );
        assert!(
            grab[1].contains("spec.addresses[1]") && grab[1].contains("pod shop/payments-0"),
            "{grab:?}"
        );
        // Written IPv4-mapped, as every proxy reads them back: the same addresses.
        assert!(grab[2].contains("spec.addresses[3]: 10.96.0.5"), "{grab:?}");
        assert!(grab[3].contains("spec.addresses[4]: 10.1.2.3"), "{grab:?}");
        assert!(grab[4].contains("spec.endpoints[0]"), "{grab:?}");
        // A pod's network is its own label's: an entry naming that network cannot take it.
        for we in ["ghost", "mapped", "labelled"] {
            assert_eq!(problems(Kind::WorkloadEntry, we).len(), 1, "{we}");
            assert!(!out
                .addresses
                .keys()
                .any(|n| n.ends_with(&format!("WorkloadEntry/evil/{we}"))));
        }
    }

    /// Two namespaces' entries at one address: the older keeps it, the newer is refused
    /// (whichever is pushed last would otherwise win it in every ztunnel); entries of one
    /// namespace may share an address.
    #[test]
    fn an_older_entry_of_another_namespace_keeps_its_address() {
        let we = |ns: &str, name: &str, second: u32| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"2026-01-01T00:00:{second:02}Z\"}}
spec: {{address: 10.200.0.1}}
---
"
            )
        };
        let vip = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {name: egress, namespace: evil, creationTimestamp: \"2026-01-01T00:00:09Z\"}
spec: {hosts: [x.evil.test], addresses: [10.200.0.1], resolution: STATIC, ports: [{number: 80, name: http}]}
";
        let yaml = we("evil", "late", 5) + &we("shop", "vm", 1) + &we("shop", "vm2", 2) + vip;
        let mut inputs = Inputs::default();
        objects(&yaml).into_iter().for_each(|o| inputs.apply(o));
        let out = translate(&inputs, &Options::default());
        let served = |name: &str| out.addresses.keys().any(|n| n.ends_with(name));
        assert!(served("WorkloadEntry/shop/vm") && served("WorkloadEntry/shop/vm2"));
        assert!(!served("WorkloadEntry/evil/late"));
        assert!(ips(&out.addresses["evil/x.evil.test"]).is_empty(), "the VIP is shop's");
        let refused: Vec<&str> = out.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            refused.iter().filter(|m| m.contains("older entry shop/vm")).count(),
            2,
            "{refused:?}"
        );
    }

    /// The pod comes and goes under an entry holding its IP: each step of the incremental
    /// translation equals a full one, and the entry is refused only while the pod holds it.
    #[test]
    fn incremental_entry_refusal_follows_the_pod() {
        use crate::source::Change;
        use crate::translate::incremental::Incremental;
        let (mut inputs, states) = (Inputs::default(), Default::default());
        objects(GRAB).into_iter().for_each(|o| inputs.apply(o));
        let mut inc = Incremental::new(Options::default());
        inc.step(&inputs, &states);
        let pod = || objects(SHOP).into_iter().find(|o| o.kind() == Kind::Pod).unwrap();
        let key = crate::model::ObjectKey::new("shop", "payments-0");
        let changes = [
            Change::Apply(pod()),
            Change::Delete(Kind::Pod, key.clone()),
            Change::Apply(pod()),
        ];
        for (step, change) in changes.into_iter().enumerate() {
            let out = step_equals_full(&mut inc, &mut inputs, change, step);
            let ghost = out.addresses.keys().any(|n| n.ends_with("WorkloadEntry/evil/ghost"));
            assert_eq!(ghost, step == 1, "step {step}");
        }
    }

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
