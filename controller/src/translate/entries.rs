//! ServiceEntries and WorkloadEntries together, as one layer over the Kubernetes Services:
//! the entries' services and endpoint workloads, the WorkloadEntries' workloads, and the
//! `workloadSelector`s that add entry hosts to the pods they select. The full translation
//! and the incremental one ([`super::incremental`]) both call [`translate`], so an entry is
//! translated the same way whichever path runs; the layer is small (entries are few beside
//! pods), so the incremental path recomputes it whole when anything it reads changed.
//!
//! [`Owned`] says which addresses an entry may use ([`Refusal`] says why not): no VIP,
//! endpoint or WorkloadEntry address may be loopback, unspecified, link-local or multicast
//! ([`Unroutable`], mesh-core's classifier, by which ztunnel also refuses what a name-only
//! endpoint resolves to: a proxy dialling it reaches its own host, its admin port, or the
//! cloud metadata server), no VIP may be in the auto-allocated ranges (declaring another
//! host's allocated VIP would move that host and take its cached clients' traffic), and no
//! endpoint may be a service's VIP (a Kubernetes Service's, one an
//! entry keeps, or in the auto-allocated ranges), which would loop through the waypoints.
//! Hosts are claimed as addresses are ([`super::entry_hosts`]): the older entry's namespace
//! keeps a host, a newer entry of another namespace declaring it or a wildcard overlapping it
//! is refused ([`Refusal::OlderEntry`], as for an address), and names under
//! `.svc.<cluster domain>` are only the entry's own namespace's to declare.
//!
//! Every VIP rule reads only what the layer is recomputed on (entries, Services' VIPs, pods
//! whose IP an entry declares), so the incremental translation stays equal to a full one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use mesh_core::unroutable::Unroutable;
use mesh_proto::workload as pb;

use super::attach::Attachments;
use super::entry_hosts::{self, Hosts};
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

/// What an older entry declares that a newer one of another namespace may not: an address
/// (canonical) or a host (as written; [`super::entry_hosts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Declared<'a> {
    Ip(IpAddr),
    Host(&'a str),
}

impl fmt::Display for Declared<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Host(host) => write!(f, "host {host}"),
        }
    }
}

/// Why an entry may not use an address (canonical, as every proxy reads it) or a host, in a
/// problem's words ([`fmt::Display`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal<'a> {
    Unroutable(IpAddr, Unroutable),
    /// A Kubernetes Service's VIP.
    ServiceVip(IpAddr),
    /// A pod's IP on the entry's network.
    Pod(IpAddr, &'a ObjectKey),
    /// Declared by an older entry of another namespace (a host: one overlapping it).
    OlderEntry(Declared<'a>, &'a ObjectKey),
    /// A host among the cluster's Service names (under `.svc.<domain>`, the domain here)
    /// outside the entry's own namespace's.
    ClusterServices(&'a str),
    /// An endpoint at a VIP the ServiceEntry keeps.
    EntryVip(IpAddr, &'a ObjectKey),
    /// An endpoint in the auto-allocated VIP ranges.
    AutoAllocated(IpAddr),
    /// A VIP in the auto-allocated ranges: allocation alone assigns them (a declared one
    /// would move the host allocated there, and take the traffic of clients that cached it).
    AllocatedRange(IpAddr),
}

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const TAKE: &str = "an entry cannot take it";
        const LOOP: &str = "a service's VIP as an endpoint loops its traffic through the waypoints";
        match self {
            Self::Unroutable(ip, class) => write!(f, "{ip} is {class}"),
            Self::ServiceVip(ip) => write!(f, "{ip} is a Kubernetes Service's VIP; {TAKE}"),
            Self::Pod(ip, pod) => write!(
                f,
                "{ip} is the IP of pod {pod} (select the pod with workloadSelector instead); {TAKE}"
            ),
            Self::OlderEntry(what, owner) => write!(f, "{what} is declared by the older entry {owner}; {TAKE}"),
            Self::ClusterServices(domain) => write!(
                f,
                "names under .svc.{domain} are the Kubernetes Services' of each namespace: an entry may declare only \
                 those under <its namespace>.svc.{domain}"
            ),
            Self::EntryVip(ip, entry) => write!(f, "{ip} is the VIP of ServiceEntry {entry}: {LOOP}"),
            Self::AllocatedRange(ip) => write!(
                f,
                "{ip} is in the auto-allocated VIP ranges (240.240.0.0/16, 2001:2::/48), which only allocation \
                 assigns; {TAKE}"
            ),
            Self::AutoAllocated(ip) => write!(
                f,
                "{ip} is in the auto-allocated VIP ranges (240.240.0.0/16, 2001:2::/48): {LOOP}"
            ),
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
    /// The VIPs ServiceEntries keep (on the cluster's network), with the first such entry.
    entry_vips: HashMap<IpAddr, &'a ObjectKey>,
    /// The hosts entries keep, each by the oldest entry's namespace.
    hosts: Hosts<'a>,
    network: &'a str,
    /// The cluster domain (`svc.<domain>` holds the Kubernetes Services' names).
    domain: &'a str,
}

/// An entry's claim to an address: its age (`None`, unknown, sorts first) and key.
type Claim<'a> = (Option<&'a Time>, &'a ObjectKey);

impl<'a> Owned<'a> {
    pub(crate) fn new(inputs: &'a Inputs, taken: &'a Taken, options: &'a Options) -> Self {
        let network = options.network.as_str();
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
        let mut owned = Owned {
            vips: &taken.ips,
            pods,
            entries: entry_claims(inputs, network),
            entry_vips: HashMap::new(),
            hosts: Hosts::new(inputs, &options.domain_suffix),
            network,
            domain: &options.domain_suffix,
        };
        owned.entry_vips = kept_vips(inputs, &owned);
        owned
    }

    /// Whether the entry in `namespace` may declare the VIP `ip`: not an [`Unroutable`]
    /// address, nor one in the auto-allocated ranges, nor one something else holds
    /// ([`Self::held`]).
    pub(crate) fn check_vip(&self, ip: IpAddr, namespace: &str) -> Result<(), Refusal<'a>> {
        let ip = ip.to_canonical();
        if let Some(class) = Unroutable::of(ip) {
            return Err(Refusal::Unroutable(ip, class));
        }
        if super::auto_allocate::in_ranges(ip) {
            return Err(Refusal::AllocatedRange(ip));
        }
        self.held(ip, None, namespace).map_or(Ok(()), Err)
    }

    /// Whether the entry in `namespace` may declare `host` (lowercase, a DNS name): not a
    /// name of the cluster's Services outside its namespace's, nor one overlapping a host an
    /// older entry of another namespace keeps ([`super::entry_hosts`]).
    pub(crate) fn check_host(&self, host: &str, namespace: &str) -> Result<(), Refusal<'a>> {
        entry_hosts::check_space(host, namespace, self.domain)?;
        match self.hosts.held(host, namespace) {
            Some((_, owner, declared)) => Err(Refusal::OlderEntry(Declared::Host(declared), owner)),
            None => Ok(()),
        }
    }

    /// Whether the entry in `namespace` may have an endpoint (a ServiceEntry's, or a
    /// WorkloadEntry) at `ip` on `network`: what [`Self::check_vip`] refuses, and no
    /// service's VIP: a Kubernetes Service's, the auto-allocated ranges, or a VIP an entry
    /// keeps on the cluster's network (its own, or another's of its namespace; an older entry
    /// of another namespace holds its VIPs already, a newer one's VIP there is refused).
    pub(crate) fn check_endpoint(&self, ip: IpAddr, network: Option<&str>, namespace: &str) -> Result<(), Refusal<'a>> {
        let ip = ip.to_canonical();
        if let Some(class) = Unroutable::of(ip) {
            return Err(Refusal::Unroutable(ip, class));
        }
        if super::auto_allocate::in_ranges(ip) {
            return Err(Refusal::AutoAllocated(ip));
        }
        let local = network.unwrap_or(self.network) == self.network;
        if let Some(entry) = self.entry_vips.get(&ip).filter(|_| local && !self.vips.contains(&ip)) {
            return Err(Refusal::EntryVip(ip, entry));
        }
        self.held(ip, network, namespace).map_or(Ok(()), Err)
    }

    /// What holds canonical `ip` on `network` (the entry's, as its workload will carry it:
    /// the cluster's when unset); `None` when the entry may declare it. An address an older
    /// entry of another namespace declares is that namespace's (entries of one namespace may
    /// share one).
    fn held(&self, ip: IpAddr, network: Option<&str>, namespace: &str) -> Option<Refusal<'a>> {
        if self.vips.contains(&ip) {
            return Some(Refusal::ServiceVip(ip));
        }
        let at = (network.unwrap_or(self.network).to_owned(), ip);
        if let Some(pod) = self.pods.get(&at) {
            return Some(Refusal::Pod(ip, pod));
        }
        let (_, owner) = self.entries.get(&at)?;
        (owner.namespace != namespace).then_some(Refusal::OlderEntry(Declared::Ip(ip), owner))
    }
}

/// The VIPs ServiceEntries keep ([`Owned::check_vip`] passes), each with the first entry
/// (by namespace/name) keeping it. Only an IP or a /32, /128 is a VIP (as
/// `service_entry::addresses` reads them).
fn kept_vips<'a>(inputs: &'a Inputs, owned: &Owned<'a>) -> HashMap<IpAddr, &'a ObjectKey> {
    let mut out = HashMap::new();
    for (key, se) in &inputs.service_entries {
        let ips = se
            .spec
            .addresses
            .iter()
            .filter_map(|a| match a.parse::<ipnet::IpNet>() {
                Ok(net) => (net.prefix_len() == net.max_prefix_len()).then(|| net.addr()),
                Err(_) => a.parse::<IpAddr>().ok(),
            });
        for ip in ips.map(|ip| ip.to_canonical()) {
            if owned.check_vip(ip, &key.namespace).is_ok() {
                out.entry(ip).or_insert(key);
            }
        }
    }
    out
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
    let owned = Owned::new(inputs, taken, options);
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
    /// translation equals a full one, and the entry is refused the pod's IP only while the
    /// pod holds it. Without the pod, grab keeps 10.1.2.3 as its VIP, and the WorkloadEntry
    /// at it is refused for that (an endpoint at a VIP loops).
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
            let pod_ip: std::net::IpAddr = "10.1.2.3".parse().unwrap();
            let vip = ips(&out.addresses["evil/grab.evil.test"]).contains(&pod_ip);
            assert_eq!(vip, step == 1, "step {step}");
            assert!(!out.addresses.keys().any(|n| n.ends_with("WorkloadEntry/evil/ghost")));
            let ghost = out
                .problems
                .iter()
                .find(|p| p.object == crate::model::ObjectKey::new("evil", "ghost"));
            let why = if step == 1 {
                "VIP of ServiceEntry evil/grab"
            } else {
                "pod shop/payments-0"
            };
            assert!(ghost.is_some_and(|p| p.message.contains(why)), "step {step}: {ghost:?}");
        }
    }

    /// The problems of one object, in order.
    fn problems_of(out: &crate::translate::Outputs, kind: Kind, ns: &str, name: &str) -> Vec<String> {
        let key = crate::model::ObjectKey::new(ns, name);
        let of = out.problems.iter().filter(|p| p.kind == kind && p.object == key);
        of.map(|p| p.message.clone()).collect()
    }

    fn translated(yaml: &str) -> crate::translate::Outputs {
        let mut inputs = Inputs::default();
        objects(yaml).into_iter().for_each(|o| inputs.apply(o));
        translate(&inputs, &Options::default())
    }

    /// evil's entry `admin` (use-waypoint; VIPs and endpoints of every unroutable class, one
    /// of each good), and WorkloadEntries at the metadata server, loopback (mapped), and a VM.
    const ADMIN: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {name: admin, namespace: evil, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [admin.evil.test]
  addresses: [127.0.0.1, 10.200.1.1, \"::ffff:169.254.169.254/128\", 224.0.0.1]
  resolution: STATIC
  ports: [{number: 15000, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1}, {address: 169.254.169.254}, {address: \"::ffff:127.0.0.1\"},
    {address: \"fe80::1\"}, {address: 0.0.0.0}, {address: \"::\"}, {address: 224.0.0.1},
    {address: \"ff02::1\"}, {address: \"::1\"}, {address: 10.200.0.9}]
---
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {name: metadata, namespace: evil}
spec: {address: 169.254.169.254}
---
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {name: mapped, namespace: evil}
spec: {address: \"::ffff:127.0.0.1\"}
---
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {name: vm, namespace: evil}
spec: {address: 10.200.0.10}
";

    /// An entry's endpoints at the proxies' own host (a shared waypoint's admin port) or its
    /// node's link (the cloud metadata server), and VIPs there, are refused one by one, as
    /// written or IPv4-mapped; the rest of the entry is served. WorkloadEntries there are
    /// not served.
    #[test]
    fn unroutable_addresses_are_refused_and_the_rest_served() {
        let out = translated(ADMIN);
        let vip: std::net::IpAddr = "10.200.1.1".parse().unwrap();
        assert_eq!(ips(&out.addresses["evil/admin.evil.test"]), [vip]);
        let endpoints: Vec<Vec<std::net::IpAddr>> = out
            .addresses
            .iter()
            .filter(|(n, _)| n.contains("ServiceEntry/evil/admin/"))
            .map(|(_, a)| ips(a))
            .collect();
        assert_eq!(endpoints, [vec!["10.200.0.9".parse::<std::net::IpAddr>().unwrap()]]);
        let refused: Vec<String> = problems_of(&out, Kind::ServiceEntry, "evil", "admin")
            .into_iter()
            .filter(|m| m.starts_with("spec.addresses") || m.starts_with("spec.endpoints"))
            .collect();
        let loopback = "is a loopback address: the proxy dialling it would reach its own host, ignored";
        let expected = [
            format!("spec.addresses[0]: 127.0.0.1 {loopback}"),
            "spec.addresses[2]: 169.254.169.254 is a link-local address".to_owned(),
            "spec.addresses[3]: 224.0.0.1 is a multicast address".to_owned(),
            format!("spec.endpoints[0].address: 127.0.0.1 {loopback}"),
            "spec.endpoints[1].address: 169.254.169.254 is a link-local address: the proxy dialling it would reach its node's link (the cloud metadata server), ignored".to_owned(),
            format!("spec.endpoints[2].address: 127.0.0.1 {loopback}"),
            "spec.endpoints[3].address: fe80::1 is a link-local address".to_owned(),
            "spec.endpoints[4].address: 0.0.0.0 is an unspecified address".to_owned(),
            "spec.endpoints[5].address: :: is an unspecified address".to_owned(),
            "spec.endpoints[6].address: 224.0.0.1 is a multicast address".to_owned(),
            "spec.endpoints[7].address: ff02::1 is a multicast address".to_owned(),
            format!("spec.endpoints[8].address: ::1 {loopback}"),
        ];
        assert_eq!(refused.len(), expected.len(), "{refused:#?}");
        for (got, want) in refused.iter().zip(&expected) {
            assert!(got.starts_with(want.as_str()), "{got:?} is not {want:?}");
        }
        let served = |we: &str| {
            out.addresses
                .keys()
                .any(|n| n.ends_with(&format!("WorkloadEntry/evil/{we}")))
        };
        assert!(served("vm") && !served("metadata") && !served("mapped"));
        let metadata = problems_of(&out, Kind::WorkloadEntry, "evil", "metadata");
        assert!(
            metadata == ["spec.address: 169.254.169.254 is a link-local address: the proxy dialling it would reach its node's link (the cloud metadata server), not served"],
            "{metadata:?}"
        );
        let mapped = problems_of(&out, Kind::WorkloadEntry, "evil", "mapped");
        assert_eq!(
            mapped,
            [format!(
                "spec.address: 127.0.0.1 {}",
                loopback.replace("ignored", "not served")
            )]
        );
    }

    /// Entries naming `endpoints` in namespace evil, with shop's Service `db` (10.96.0.5),
    /// evil's entry `other` (VIP 10.200.0.2), and evil's entry `auto` (an auto-allocated VIP).
    fn loops(endpoints: &str) -> String {
        format!(
            "{SHOP}---
apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {{name: loop, namespace: evil}}
spec:
  hosts: [loop.evil.test]
  addresses: [10.200.0.1]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: {endpoints}
---
apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {{name: other, namespace: evil}}
spec: {{hosts: [other.evil.test], addresses: [10.200.0.2], resolution: STATIC, ports: [{{number: 80, name: http}}]}}
---
apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {{name: auto, namespace: evil}}
spec: {{hosts: [auto.evil.test], resolution: DNS, ports: [{{number: 80, name: http}}]}}
---
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry
metadata: {{name: at-vip, namespace: evil}}
spec: {{address: 10.200.0.2}}
"
        )
    }

    /// An endpoint at a service's VIP (the entry's own, another entry's, a Kubernetes
    /// Service's, an auto-allocated one) sends the traffic back through the waypoints, round
    /// and round: each is refused and reported; the other endpoints are served, and so is
    /// the entry's VIP at a remote network's endpoint (no loop there).
    #[test]
    fn an_endpoint_cannot_be_a_services_vip() {
        let first = translated(&loops("[]"));
        let auto = ips(&first.addresses["evil/auto.evil.test"]);
        assert_eq!(auto.len(), 2, "an allocated pair");
        let endpoints = format!(
            "[{{address: 10.200.0.1}}, {{address: 10.200.0.2}}, {{address: \"{}\"}}, {{address: \"{}\"}},
    {{address: 240.240.7.7}}, {{address: \"2001:2::7\"}}, {{address: 10.96.0.5}},
    {{address: 10.200.0.1, network: far}}, {{address: 10.200.0.50}}]",
            auto[0], auto[1]
        );
        let out = translated(&loops(&endpoints));
        let mut kept: Vec<String> = out
            .addresses
            .keys()
            .filter(|n| n.contains("ServiceEntry/evil/loop/"))
            .cloned()
            .collect();
        kept.sort();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(
            kept[0].ends_with("/10.200.0.1") && kept[1].ends_with("/10.200.0.50"),
            "{kept:?}"
        );
        let vip = |ip: &str| ips(&out.addresses[&format!("evil/{ip}.evil.test")]);
        assert_eq!(vip("loop"), ["10.200.0.1".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(vip("auto"), auto, "the allocation did not move");
        let refused = problems_of(&out, Kind::ServiceEntry, "evil", "loop");
        let looping = "a service's VIP as an endpoint loops its traffic through the waypoints, ignored";
        let auto_range = "is in the auto-allocated VIP ranges (240.240.0.0/16, 2001:2::/48)";
        let expected = [
            format!("spec.endpoints[0].address: 10.200.0.1 is the VIP of ServiceEntry evil/loop: {looping}"),
            format!("spec.endpoints[1].address: 10.200.0.2 is the VIP of ServiceEntry evil/other: {looping}"),
            format!("spec.endpoints[2].address: {} {auto_range}: {looping}", auto[0]),
            format!("spec.endpoints[3].address: {} {auto_range}: {looping}", auto[1]),
            format!("spec.endpoints[4].address: 240.240.7.7 {auto_range}: {looping}"),
            format!("spec.endpoints[5].address: 2001:2::7 {auto_range}: {looping}"),
            "spec.endpoints[6].address: 10.96.0.5 is a Kubernetes Service's VIP; an entry cannot take it, ignored"
                .to_owned(),
        ];
        assert_eq!(refused, expected);
        assert!(!out.addresses.keys().any(|n| n.ends_with("WorkloadEntry/evil/at-vip")));
        let at_vip = problems_of(&out, Kind::WorkloadEntry, "evil", "at-vip");
        let want = "spec.address: 10.200.0.2 is the VIP of ServiceEntry evil/other: a service's VIP as an endpoint loops its traffic through the waypoints, not served";
        assert_eq!(at_vip, [want]);
    }

    /// A VIP that appears after the endpoints naming it (an entry's, a Kubernetes Service's)
    /// refuses them, and its removal restores them: each step of the incremental translation
    /// equals a full one.
    #[test]
    fn incremental_endpoint_refusal_follows_the_vips() {
        use crate::source::Change;
        use crate::translate::incremental::Incremental;
        let (mut inputs, states) = (Inputs::default(), Default::default());
        let loop_only = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {name: loop, namespace: evil}
spec: {hosts: [loop.evil.test], resolution: STATIC, ports: [{number: 80, name: http}],
  endpoints: [{address: 10.200.0.2}, {address: 10.200.0.50}]}
";
        objects(loop_only).into_iter().for_each(|o| inputs.apply(o));
        let mut inc = Incremental::new(Options::default());
        inc.step(&inputs, &states);
        let other = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {name: other, namespace: evil}
spec: {hosts: [other.evil.test], addresses: [10.200.0.2], resolution: STATIC, ports: [{number: 80, name: http}]}
";
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: svc, namespace: shop}
spec: {clusterIP: 10.200.0.50, ports: [{port: 80}]}
";
        let one = |yaml: &str| objects(yaml).remove(0);
        let changes = [
            (Change::Apply(one(other)), 1),
            (Change::Apply(one(service)), 0),
            (
                Change::Delete(Kind::ServiceEntry, crate::model::ObjectKey::new("evil", "other")),
                1,
            ),
            (
                Change::Delete(Kind::Service, crate::model::ObjectKey::new("shop", "svc")),
                2,
            ),
        ];
        for (step, (change, served)) in changes.into_iter().enumerate() {
            let out = step_equals_full(&mut inc, &mut inputs, change, step);
            let endpoints = out.addresses.keys().filter(|n| n.contains("ServiceEntry/evil/loop/"));
            assert_eq!(endpoints.count(), served, "step {step}");
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
