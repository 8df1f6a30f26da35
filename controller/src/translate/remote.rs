//! Multicluster: the remote clusters' workloads and services merged into what this controller
//! serves, as Istio's control plane merges them. Each served remote cluster is translated on
//! its own (its cluster id in workload uids, its network on workloads and VIPs, no policies:
//! the destination's own controller decides those); its workloads are added, and a service
//! with the same namespace and name as one already known is one service: its VIPs and subject
//! alt names are the union, its ports the local cluster's (ports that differ are reported).
//! Workloads on a network other than this cluster's get that network's east-west gateway as
//! `network_gateway`, so clients on other networks tunnel through it (double HBONE), and
//! their identities join their services' subject alt names (the inner handshake's check).
//!
//! The merge is cut into pieces that depend on little, so that the incremental translator
//! ([`layer`]) can recompute only what a change reaches and still give what [`merge`] gives
//! (both call the same pieces): the remote part ([`remote_part`]: every remote's accepted
//! workloads and services by name, which reads the local addresses only through the owners of
//! the `(network, IP)` pairs it looks up), one name's merged address ([`merged`]), a
//! workload's gateway ([`set_gateway`]), a service's added identities ([`add_sans`]), the
//! networks without a gateway ([`missing`]) and the cluster statuses ([`statuses`]).

pub(crate) mod layer;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use mesh_core::state::model::{ip_from_bytes, ip_to_bytes};
use mesh_proto::workload as pb;

use super::{Addresses, Options, Outputs, Problem};
use crate::model::cluster::{self, GatewayTarget, NetworkGateway, Remote, RemoteState};
use crate::model::{Inputs, Kind, ObjectKey};

/// One cluster as `meshctl clusters` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ClusterStatus {
    pub id: String,
    pub network: String,
    pub local: bool,
    #[serde(flatten)]
    pub state: RemoteState,
    /// Workloads and services of this cluster in what is served.
    pub workloads: usize,
    pub services: usize,
    /// Its network's east-west gateways (`<address>:<port>`).
    pub gateways: Vec<String>,
}

/// The options this cluster's own objects are translated with: the network from the system
/// namespace's label when `--network` is not set.
pub(crate) fn local_options(inputs: &Inputs, options: &Options) -> Options {
    let network = cluster::cluster_network(inputs, &options.root_namespace, &options.network);
    if network == options.network {
        return options.clone();
    }
    Options {
        network,
        ..options.clone()
    }
}

/// A remote cluster translated on its own: a function of its objects (the discovery kinds
/// only: [`cluster::DISCOVERY_KINDS`]) and `opts` (its id and network, this cluster's trust
/// domain, suffix and root namespace) only.
pub(crate) fn translate_remote(remote: &Remote, opts: &Options) -> Outputs {
    super::translate(&remote.inputs, opts)
}

/// What one remote cluster contributes to a name, in merge order.
#[derive(Clone, Debug)]
pub(crate) enum Contribution {
    /// A workload, accepted (its addresses clash with none before it).
    Workload(Arc<pb::Address>),
    /// A service (its taken VIPs dropped), merged into the one of the same name.
    Service { cluster: String, address: Arc<pb::Address> },
}

impl Contribution {
    /// The remote cluster it comes from.
    fn cluster(&self) -> Option<&str> {
        match self {
            Contribution::Workload(a) => match &a.r#type {
                Some(pb::address::Type::Workload(w)) => Some(&w.cluster_id),
                _ => None,
            },
            Contribution::Service { cluster, .. } => Some(cluster),
        }
    }

    /// Whether two contributions are the same: the same allocation (a remote's translation
    /// keeps what a change did not reach), else equal.
    pub(crate) fn same(&self, other: &Contribution) -> bool {
        let same = |a: &Arc<pb::Address>, b: &Arc<pb::Address>| Arc::ptr_eq(a, b) || a == b;
        match (self, other) {
            (Contribution::Workload(a), Contribution::Workload(b)) => same(a, b),
            (
                Contribution::Service { cluster, address },
                Contribution::Service {
                    cluster: other,
                    address: b,
                },
            ) => cluster == other && same(address, b),
            _ => false,
        }
    }
}

/// The remote clusters' part of the merge.
#[derive(Clone, Debug, Default)]
pub(crate) struct RemotePart {
    /// What the remote clusters contribute, by name (in cluster id order).
    pub names: BTreeMap<String, Vec<Contribution>>,
    /// Clashing addresses, taken VIPs, a remote with this cluster's own id.
    pub problems: Vec<Problem>,
    /// The remote clusters' statuses (their gateways not filled in yet).
    pub clusters: Vec<ClusterStatus>,
    /// The served remote clusters' east-west gateways.
    pub gateways: Vec<NetworkGateway>,
    /// The `(network, IP)` pairs looked up among the local addresses: the part changes only
    /// when one of their owners does.
    pub queried: HashSet<(String, IpAddr)>,
    /// How many remote workloads and service VIPs hold each `(network, IP)` pair, accepted or
    /// not: a pair held once cannot clash ([`patch`]).
    pub holders: HashMap<(String, IpAddr), u32>,
}

/// The `(network, IP)` pairs taken so far: the local addresses' owners (`local`), then those
/// the remote clusters took in merge order.
struct Taken<'a> {
    local: &'a dyn Fn(&(String, IpAddr)) -> Option<String>,
    remote: HashMap<(String, IpAddr), String>,
    queried: HashSet<(String, IpAddr)>,
}

impl Taken<'_> {
    fn get(&mut self, key: &(String, IpAddr)) -> Option<String> {
        self.queried.insert(key.clone());
        (self.local)(key).or_else(|| self.remote.get(key).cloned())
    }
}

/// Every served remote cluster's contribution. `translation` gives a remote's own translation
/// (the incremental translator caches them), `local` the owner of a `(network, IP)` among the
/// local addresses (the last by name, as [`local_owners`] builds them).
pub(crate) fn remote_part(
    inputs: &Inputs,
    options: &Options,
    translation: &mut dyn FnMut(&str, &Remote, &Options) -> Arc<Outputs>,
    local: &dyn Fn(&(String, IpAddr)) -> Option<String>,
) -> RemotePart {
    let mut part = RemotePart::default();
    let mut taken = Taken {
        local,
        remote: HashMap::new(),
        queried: HashSet::new(),
    };
    for (id, remote) in &inputs.remotes {
        let network = cluster::cluster_network(&remote.inputs, &options.root_namespace, "");
        let mut st = status(id, &network, false, remote.state.clone());
        if id == &options.cluster_id {
            part.problems.push(problem(
                &options.root_namespace,
                format!("remote cluster {id} has this cluster's own id; it is ignored"),
            ));
        } else if remote.served() {
            let gateways = cluster::network_gateways(&remote.inputs.gateways, id, &network, false);
            part.gateways.extend(gateways);
            let opts = Options {
                cluster_id: id.clone(),
                network,
                ..options.clone()
            };
            let translated = translation(id, remote, &opts);
            add_remote(id, &translated.addresses, &opts, &mut taken, &mut part, &mut st);
        }
        part.clusters.push(st);
    }
    part.queried = taken.queried;
    part
}

/// Brings the part up to date with one name of served remote cluster `id` going from `old`
/// to `new` in that cluster's translation, when nothing else can move with it: none of its
/// `(network, IP)` pairs, before or after, is held by a local address or another remote
/// entry, and no other cluster contributes to the name. Then it was and is accepted whole (a
/// workload served, a service with every VIP), and the clashes and every other name are as
/// they were. Returns false, having changed nothing, otherwise: the part is then recomputed.
pub(crate) fn patch(
    part: &mut RemotePart,
    id: &str,
    name: &str,
    (old, new): (Option<&Arc<pb::Address>>, Option<&Arc<pb::Address>>),
    local: &dyn Fn(&(String, IpAddr)) -> Option<String>,
) -> bool {
    let keys = |a: Option<&Arc<pb::Address>>| -> Vec<(String, IpAddr)> {
        a.map(|a| address_keys(name, a).into_iter().map(|(k, _)| k).collect())
            .unwrap_or_default()
    };
    let (was, now) = (keys(old), keys(new));
    let alone = was.iter().all(|k| part.holders.get(k) == Some(&1));
    let free = now
        .iter()
        .all(|k| (was.contains(k) || !part.holders.contains_key(k)) && local(k).is_none());
    let others = part
        .names
        .get(name)
        .is_some_and(|c| c.iter().any(|c| c.cluster() != Some(id)));
    let Some(st) = part.clusters.iter_mut().find(|c| c.id == id) else {
        return false;
    };
    if !alone || !free || others || was.iter().any(|k| local(k).is_some()) {
        return false;
    }
    let kind = |a: Option<&Arc<pb::Address>>| match a.and_then(|a| a.r#type.as_ref()) {
        Some(pb::address::Type::Workload(_)) => (1, 0),
        Some(pb::address::Type::Service(_)) => (0, 1),
        None => (0, 0),
    };
    let ((ow, os), (nw, ns)) = (kind(old), kind(new));
    st.workloads = (st.workloads + nw).saturating_sub(ow);
    st.services = (st.services + ns).saturating_sub(os);
    for k in &was {
        part.holders.remove(k);
    }
    for k in now {
        *part.holders.entry(k.clone()).or_default() += 1;
        part.queried.insert(k);
    }
    let contribution = new.and_then(|a| match a.r#type {
        Some(pb::address::Type::Workload(_)) => Some(Contribution::Workload(a.clone())),
        Some(pb::address::Type::Service(_)) => Some(Contribution::Service {
            cluster: id.to_owned(),
            address: a.clone(),
        }),
        None => None,
    });
    match contribution {
        Some(c) => drop(part.names.insert(name.to_owned(), vec![c])),
        None => drop(part.names.remove(name)),
    }
    true
}

/// The owner of each `(network, IP)` of `addresses`: a workload's uid, a service VIP's name;
/// the last by name wins, as a pass over them in order leaves it.
pub(crate) fn address_keys(name: &str, a: &pb::Address) -> Vec<((String, IpAddr), String)> {
    match &a.r#type {
        Some(pb::address::Type::Workload(w)) => w
            .addresses
            .iter()
            .filter_map(|b| ip_from_bytes(b))
            .map(|ip| ((w.network.clone(), ip), w.uid.clone()))
            .collect(),
        // Service VIPs too: a remote must not take a local service's or pod's address.
        Some(pb::address::Type::Service(s)) => s
            .addresses
            .iter()
            .filter_map(|a| Some(((a.network.clone(), ip_from_bytes(&a.address)?), name.to_owned())))
            .collect(),
        None => Vec::new(),
    }
}

/// [`address_keys`] of every local address.
fn local_owners(out: &Outputs) -> HashMap<(String, IpAddr), String> {
    let mut owners = HashMap::new();
    for (name, a) in &out.addresses {
        owners.extend(address_keys(name, a));
    }
    owners
}

/// The east-west gateways of every network: the local cluster's Gateways (`istio-remote` ones
/// too) and the served remote clusters', sorted.
pub(crate) fn all_gateways(inputs: &Inputs, options: &Options, part: &RemotePart) -> Vec<NetworkGateway> {
    let mut gateways = cluster::network_gateways(&inputs.gateways, &options.cluster_id, &options.network, true);
    gateways.extend(part.gateways.iter().cloned());
    gateways.sort();
    gateways.dedup();
    gateways
}

/// Merges the served remote clusters into `out` (translated from the local cluster with
/// `options`, already [`local_options`]) and sets network gateways.
pub(crate) fn merge(inputs: &Inputs, options: &Options, out: &mut Outputs) {
    // Only remote clusters need it (a pass over every address: skipped on the common path).
    let owners = if inputs.remotes.is_empty() {
        HashMap::new()
    } else {
        local_owners(out)
    };
    let mut translate = |_: &str, remote: &Remote, opts: &Options| Arc::new(translate_remote(remote, opts));
    let part = remote_part(inputs, options, &mut translate, &|k| owners.get(k).cloned());
    let gateways = all_gateways(inputs, options, &part);
    let mut problems = part.problems.clone();
    for (name, contributions) in &part.names {
        if let Some(a) = merged(out.addresses.get(name), contributions, &mut problems) {
            out.addresses.insert(name.clone(), a);
        }
    }
    let by_network = Gateways::new(&gateways);
    for a in out.addresses.values_mut() {
        set_gateway(a, &options.network, &by_network);
    }
    remote_network_sans(out, &options.network);
    let mut networks: BTreeMap<&str, &str> = BTreeMap::new();
    let (mut workloads, mut local) = (0, 0);
    for a in out.addresses.values() {
        if let Some(pb::address::Type::Workload(w)) = &a.r#type {
            workloads += 1;
            local += usize::from(w.cluster_id == options.cluster_id);
            if w.network != options.network {
                networks.entry(w.network.as_str()).or_insert(w.cluster_id.as_str());
            }
        }
    }
    problems.extend(missing(networks, options, &gateways));
    let services = out.addresses.len() - workloads;
    out.clusters = statuses(options, &part, &gateways, (local, services));
    out.problems.extend(problems);
    out.problems.sort();
    out.problems.dedup();
}

/// The clusters' statuses: the local one (`counts`: its workloads, and every service served)
/// first, then the remote ones, each with its network's gateways.
pub(crate) fn statuses(
    options: &Options,
    part: &RemotePart,
    gateways: &[NetworkGateway],
    counts: (usize, usize),
) -> Vec<ClusterStatus> {
    let mut local = status(&options.cluster_id, &options.network, true, RemoteState::Synced);
    (local.workloads, local.services) = counts;
    let mut clusters = vec![local];
    clusters.extend(part.clusters.iter().cloned());
    for c in &mut clusters {
        c.gateways = gateways
            .iter()
            .filter(|g| g.network == c.network)
            .map(|g| format!("{}:{}", target(&g.target), g.port))
            .collect();
    }
    clusters
}

fn status(id: &str, network: &str, local: bool, state: RemoteState) -> ClusterStatus {
    ClusterStatus {
        id: id.to_owned(),
        network: network.to_owned(),
        local,
        state,
        workloads: 0,
        services: 0,
        gateways: Vec::new(),
    }
}

fn problem(root_namespace: &str, message: String) -> Problem {
    Problem {
        kind: Kind::Namespace,
        object: ObjectKey::new("", root_namespace),
        message,
        refused: None,
    }
}

/// Adds one remote cluster's workloads and services to `part`.
fn add_remote(
    id: &str,
    translated: &Addresses,
    opts: &Options,
    taken: &mut Taken<'_>,
    part: &mut RemotePart,
    st: &mut ClusterStatus,
) {
    for (name, address) in translated {
        for (key, _) in address_keys(name, address) {
            *part.holders.entry(key).or_default() += 1;
        }
        let contribution = match &address.r#type {
            Some(pb::address::Type::Workload(w)) => {
                if let Some(clash) = ip_clash(w, taken) {
                    part.problems.push(problem(
                        &opts.root_namespace,
                        format!(
                            "workload {} of cluster {id} has the address of {clash} on network {:?}; it is not served",
                            w.uid, w.network
                        ),
                    ));
                    continue;
                }
                st.workloads += 1;
                Contribution::Workload(address.clone())
            }
            Some(pb::address::Type::Service(svc)) => {
                st.services += 1;
                let mut address = address.clone();
                if let Some(kept) = drop_taken_vips(id, svc, name, taken, &mut part.problems) {
                    address = Arc::new(pb::Address {
                        r#type: Some(pb::address::Type::Service(kept)),
                    });
                }
                Contribution::Service {
                    cluster: id.to_owned(),
                    address,
                }
            }
            None => continue,
        };
        part.names.entry(name.clone()).or_default().push(contribution);
    }
}

/// The workload that already holds one of `w`'s addresses on its network (two clusters on one
/// network with overlapping pod ranges): ztunnel could not tell them apart. Otherwise `w`'s
/// addresses are recorded.
fn ip_clash(w: &pb::Workload, taken: &mut Taken<'_>) -> Option<String> {
    let mine: Vec<(String, IpAddr)> = w
        .addresses
        .iter()
        .filter_map(|b| Some((w.network.clone(), ip_from_bytes(b)?)))
        .collect();
    if let Some(owner) = mine.iter().find_map(|key| taken.get(key)) {
        return Some(owner);
    }
    for key in mine {
        taken.remote.insert(key, w.uid.clone());
    }
    None
}

/// Removes the VIPs of a remote cluster's service `name` that another service or a workload
/// already holds on their network: ztunnel resolves a VIP before a pod address and keeps one
/// service per VIP, so a remote cluster (which names its own network) could otherwise take
/// over a local service's or pod's traffic. The same service's VIP in two clusters is fine.
/// Returns the service without them, when some were dropped.
fn drop_taken_vips(
    cluster: &str,
    svc: &pb::Service,
    name: &str,
    taken: &mut Taken<'_>,
    problems: &mut Vec<Problem>,
) -> Option<pb::Service> {
    let mut kept = Vec::with_capacity(svc.addresses.len());
    for a in &svc.addresses {
        let Some(ip) = ip_from_bytes(&a.address) else {
            kept.push(a.clone());
            continue;
        };
        let key = (a.network.clone(), ip);
        match taken.get(&key) {
            Some(owner) if owner != name => problems.push(Problem {
                kind: Kind::Service,
                object: ObjectKey::new(svc.namespace.clone(), svc.name.clone()),
                message: format!(
                    "address {ip} on network {:?} of this service in cluster {cluster} is {owner}'s; it is not served",
                    a.network
                ),
                refused: None,
            }),
            Some(_) => kept.push(a.clone()),
            None => {
                taken.remote.insert(key, name.to_owned());
                kept.push(a.clone());
            }
        }
    }
    (kept.len() != svc.addresses.len()).then(|| pb::Service {
        addresses: kept,
        ..svc.clone()
    })
}

/// One name's address after the remote clusters' contributions: a remote workload replaces,
/// a remote service merges into the service known by then (or is added).
pub(crate) fn merged(
    base: Option<&Arc<pb::Address>>,
    contributions: &[Contribution],
    problems: &mut Vec<Problem>,
) -> Option<Arc<pb::Address>> {
    let mut current = base.cloned();
    for c in contributions {
        match c {
            Contribution::Workload(a) => current = Some(a.clone()),
            Contribution::Service { cluster, address } => {
                let Some(pb::address::Type::Service(svc)) = &address.r#type else {
                    continue;
                };
                let known = current
                    .as_mut()
                    .filter(|a| matches!(a.r#type, Some(pb::address::Type::Service(_))));
                match known.map(Arc::make_mut).and_then(|a| a.r#type.as_mut()) {
                    Some(pb::address::Type::Service(known)) => merge_service(cluster, svc, known, problems),
                    _ => current = Some(address.clone()),
                }
            }
        }
    }
    current
}

/// Merges a remote cluster's service into the known one of the same name.
fn merge_service(cluster: &str, svc: &pb::Service, known: &mut pb::Service, problems: &mut Vec<Problem>) {
    let key = |p: &pb::Port| (p.service_port, p.target_port);
    let mut mine: Vec<_> = known.ports.iter().map(key).collect();
    let mut theirs: Vec<_> = svc.ports.iter().map(key).collect();
    mine.sort_unstable();
    theirs.sort_unstable();
    if mine != theirs {
        problems.push(Problem {
            kind: Kind::Service,
            object: ObjectKey::new(svc.namespace.clone(), svc.name.clone()),
            message: format!(
                "ports differ between clusters: {} in cluster {cluster}, {} here; this cluster's are served",
                render_ports(&theirs),
                render_ports(&mine)
            ),
            refused: None,
        });
    }
    for a in &svc.addresses {
        if !known.addresses.contains(a) {
            known.addresses.push(a.clone());
        }
    }
    for san in &svc.subject_alt_names {
        if !known.subject_alt_names.contains(san) {
            known.subject_alt_names.push(san.clone());
        }
    }
}

fn render_ports(ports: &[(u32, u32)]) -> String {
    let list: Vec<String> = ports.iter().map(|(s, t)| format!("{s}->{t}")).collect();
    format!("[{}]", list.join(", "))
}

fn target(t: &GatewayTarget) -> String {
    match t {
        GatewayTarget::Address(ip) => ip.to_string(),
        GatewayTarget::Hostname { namespace, hostname } => format!("{namespace}/{hostname}"),
    }
}

/// The wire form of a network gateway.
fn gateway_address(g: &NetworkGateway) -> pb::GatewayAddress {
    let destination = match &g.target {
        GatewayTarget::Address(ip) => pb::gateway_address::Destination::Address(pb::NetworkAddress {
            network: g.network.clone(),
            address: ip_to_bytes(*ip),
        }),
        GatewayTarget::Hostname { namespace, hostname } => {
            pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: namespace.clone(),
                hostname: hostname.clone(),
            })
        }
    };
    pb::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: g.port,
        hbone_single_tls_port: 0,
    }
}

/// Each network's gateway as workloads carry it: the first of the network's in a stable order.
#[derive(Default, PartialEq)]
pub(crate) struct Gateways(BTreeMap<String, pb::GatewayAddress>);

impl Gateways {
    pub(crate) fn new(gateways: &[NetworkGateway]) -> Self {
        let mut by_network = BTreeMap::new();
        for g in gateways {
            by_network
                .entry(g.network.clone())
                .or_insert_with(|| gateway_address(g));
        }
        Gateways(by_network)
    }
}

/// A workload on a network other than `local_network` gets its network's gateway as
/// `network_gateway` (none when that network has none), once any network has one. The
/// workload API is the same for every client; ztunnel uses the gateway only when the
/// workload's network is not its own.
pub(crate) fn set_gateway(a: &mut Arc<pb::Address>, local_network: &str, gateways: &Gateways) {
    if gateways.0.is_empty() {
        return;
    }
    let Some(pb::address::Type::Workload(w)) = &a.r#type else {
        return;
    };
    let gateway = gateways.0.get(w.network.as_str());
    if w.network == local_network || w.network_gateway.as_ref() == gateway {
        return;
    }
    if let Some(pb::address::Type::Workload(w)) = &mut Arc::make_mut(a).r#type {
        w.network_gateway = gateway.cloned();
    }
}

/// The identity a workload adds to its services' subject alt names: one on another network
/// reached through a gateway. Through an east-west gateway the client cannot know which
/// endpoint the gateway picks, and Istio's ztunnel checks the inner (end-to-end) handshake
/// against the service's SANs only.
pub(crate) fn gateway_identity(w: &pb::Workload, local_network: &str) -> Option<String> {
    if w.network == local_network || w.network_gateway.is_none() {
        return None;
    }
    let td = if w.trust_domain.is_empty() {
        "cluster.local"
    } else {
        &w.trust_domain
    };
    Some(format!("spiffe://{td}/ns/{}/sa/{}", w.namespace, w.service_account))
}

/// Adds `ids` to a service's subject alt names (sorted then), when there are any.
pub(crate) fn add_sans(a: &mut Arc<pb::Address>, ids: &BTreeSet<String>) {
    if ids.is_empty() || !matches!(a.r#type, Some(pb::address::Type::Service(_))) {
        return;
    }
    if let Some(pb::address::Type::Service(s)) = &mut Arc::make_mut(a).r#type {
        for id in ids {
            if !s.subject_alt_names.contains(id) {
                s.subject_alt_names.push(id.clone());
            }
        }
        s.subject_alt_names.sort();
    }
}

/// [`gateway_identity`] of every workload, added to the services each lists.
fn remote_network_sans(out: &mut Outputs, local_network: &str) {
    let mut sans: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in out.addresses.values() {
        let Some(pb::address::Type::Workload(w)) = &a.r#type else {
            continue;
        };
        if let Some(id) = gateway_identity(w, local_network) {
            for service in w.services.keys() {
                sans.entry(service.clone()).or_default().insert(id.clone());
            }
        }
    }
    for (service, ids) in sans {
        if let Some(a) = out.addresses.get_mut(&service) {
            add_sans(a, &ids);
        }
    }
}

/// A network other than this cluster's with workloads but no east-west gateway: nothing on
/// another network can reach them (they are served, and reachable only from their own).
/// `networks`: each such network and the cluster of its first workload by name.
pub(crate) fn missing<'a>(
    networks: impl IntoIterator<Item = (&'a str, &'a str)>,
    options: &Options,
    gateways: &[NetworkGateway],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (network, cluster) in networks {
        if !gateways.iter().any(|g| g.network == network) {
            problems.push(problem(
                &options.root_namespace,
                format!(
                    "network {network:?} (cluster {cluster}) has no east-west gateway (a Gateway of class \
                     istio-east-west with an HBONE listener): its workloads cannot be reached from network {:?}",
                    options.network
                ),
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cluster::ClusterChange;
    use crate::model::Object;
    use crate::source::Change;

    fn objects(yaml: &str) -> Vec<Object> {
        yaml.split("\n---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| Object::parse(serde_yaml::from_str(d).unwrap()).unwrap())
            .collect()
    }

    fn inputs(yaml: &str) -> Inputs {
        let mut inputs = Inputs::default();
        objects(yaml).into_iter().for_each(|o| inputs.apply(o));
        inputs
    }

    /// A namespace, service `echo` (port 80 -> `target`) with VIP `vip`, and pod `pod` at `ip`
    /// backing it; `extra` documents besides.
    fn cluster(pod: &str, ip: &str, vip: &str, target: u16, extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}
---
apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: shop}}
spec: {{clusterIP: {vip}, selector: {{app: echo}}, ports: [{{port: 80, targetPort: {target}}}]}}
---
apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: shop, labels: {{app: echo}}}}
spec: {{nodeName: n0, containers: []}}
status: {{podIP: {ip}}}
---
{extra}"
        )
    }

    fn add_remote(inputs: &mut Inputs, id: &str, yaml: &str) {
        let change = Change::Replace(Kind::Namespace, Vec::new());
        crate::model::cluster::apply(&mut inputs.remotes, ClusterChange::Objects(id.into(), Box::new(change)));
        for o in objects(yaml) {
            let change = ClusterChange::Objects(id.into(), Box::new(Change::Apply(o)));
            crate::model::cluster::apply(&mut inputs.remotes, change);
        }
        let synced = ClusterChange::Objects(id.into(), Box::new(Change::Synced));
        crate::model::cluster::apply(&mut inputs.remotes, synced);
    }

    fn workload<'a>(out: &'a Outputs, uid: &str) -> Option<&'a pb::Workload> {
        match &out.addresses.get(uid)?.r#type {
            Some(pb::address::Type::Workload(w)) => Some(w),
            _ => None,
        }
    }

    fn service<'a>(out: &'a Outputs, name: &str) -> Option<&'a pb::Service> {
        match &out.addresses.get(name)?.r#type {
            Some(pb::address::Type::Service(s)) => Some(s),
            _ => None,
        }
    }

    fn vips(s: &pb::Service) -> Vec<String> {
        let mut v: Vec<String> = s
            .addresses
            .iter()
            .map(|a| format!("{}/{}", a.network, ip_from_bytes(&a.address).unwrap()))
            .collect();
        v.sort();
        v
    }

    fn options(id: &str) -> Options {
        Options {
            cluster_id: id.into(),
            ..Options::default()
        }
    }

    const ECHO: &str = "shop/echo.shop.svc.cluster.local";
    const DB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.69.9, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: n0, containers: []}
status: {podIP: 10.100.69.9}";

    /// One service across two clusters: both pods are endpoints (by the service key in their
    /// workload), the VIPs are the union; a remote-only service is served with its endpoint.
    #[test]
    fn services_merge_by_namespace_and_name() {
        let mut local = inputs(&cluster("a", "10.100.68.2", "10.96.68.1", 8080, ""));
        add_remote(&mut local, "c69", &cluster("b", "10.100.69.2", "10.96.69.1", 8080, DB));
        let out = super::super::translate(&local, &options("c68"));
        let a = workload(&out, "c68//Pod/shop/a").expect("local workload");
        let b = workload(&out, "c69//Pod/shop/b").expect("remote workload");
        assert_eq!((a.cluster_id.as_str(), b.cluster_id.as_str()), ("c68", "c69"));
        assert!(a.services.contains_key(ECHO) && b.services.contains_key(ECHO));
        let echo = service(&out, ECHO).expect("merged service");
        assert_eq!(vips(echo), ["/10.96.68.1", "/10.96.69.1"]);
        assert!(
            echo.subject_alt_names.is_empty(),
            "one network: each endpoint's own identity"
        );
        let db = service(&out, "shop/db.shop.svc.cluster.local").expect("remote-only service");
        assert_eq!(vips(db), ["/10.96.69.9"]);
        assert!(workload(&out, "c69//Pod/shop/db-0").is_some());
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let ids: Vec<(&str, bool, usize)> = out
            .clusters
            .iter()
            .map(|c| (c.id.as_str(), c.local, c.workloads))
            .collect();
        assert_eq!(ids, [("c68", true, 1), ("c69", false, 2)]);
    }

    /// Different ports for one service are reported on it; the local cluster's are served.
    #[test]
    fn ports_that_differ_between_clusters_are_a_problem() {
        let mut local = inputs(&cluster("a", "10.100.68.2", "10.96.68.1", 8080, ""));
        add_remote(&mut local, "c70", &cluster("b", "10.100.70.2", "10.96.70.1", 9090, ""));
        let out = super::super::translate(&local, &options("c68"));
        let p = out
            .problems
            .iter()
            .find(|p| p.kind == Kind::Service && p.object == ObjectKey::new("shop", "echo"))
            .expect("problem on shop/echo");
        assert!(
            p.message.contains("ports differ between clusters") && p.message.contains("c70"),
            "{}",
            p.message
        );
        assert_eq!(service(&out, ECHO).unwrap().ports[0].target_port, 8080);
    }

    /// A withdrawn cluster contributes nothing (its objects are kept for its return); one not
    /// listed yet neither; one failing within its grace period still does.
    #[test]
    fn withdrawn_and_pending_clusters_are_not_served() {
        let mut local = inputs(&cluster("a", "10.100.68.2", "10.96.68.1", 8080, ""));
        add_remote(&mut local, "c69", &cluster("b", "10.100.69.2", "10.96.69.1", 8080, DB));
        let set = |inputs: &mut Inputs, state: RemoteState| {
            crate::model::cluster::apply(&mut inputs.remotes, ClusterChange::State("c69".into(), state));
        };
        set(&mut local, RemoteState::Failing { reason: "gone".into() });
        let out = super::super::translate(&local, &options("c68"));
        assert!(workload(&out, "c69//Pod/shop/b").is_some(), "within the grace period");
        set(&mut local, RemoteState::Withdrawn { reason: "gone".into() });
        let out = super::super::translate(&local, &options("c68"));
        assert!(workload(&out, "c69//Pod/shop/b").is_none());
        assert!(service(&out, "shop/db.shop.svc.cluster.local").is_none());
        assert_eq!(vips(service(&out, ECHO).unwrap()), ["/10.96.68.1"]);
        assert!(
            workload(&out, "c68//Pod/shop/a").is_some(),
            "the local cluster keeps serving"
        );
        let pending = ClusterChange::Objects("c81".into(), Box::new(Change::Apply(objects(DB).remove(0))));
        crate::model::cluster::apply(&mut local.remotes, pending);
        let out = super::super::translate(&local, &options("c68"));
        assert!(
            service(&out, "shop/db.shop.svc.cluster.local").is_none(),
            "c81 not listed yet"
        );
    }

    const EAST_WEST: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway
metadata: {name: ew, namespace: istio-system}
spec:
  gatewayClassName: istio-east-west
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 172.16.69.1}]
---
apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system, labels: {topology.istio.io/network: net-b}}";

    /// Workloads on another network get its east-west gateway; the local ones none; a network
    /// without one is a problem.
    #[test]
    fn other_networks_get_their_east_west_gateway() {
        let mut local = inputs(&cluster("a", "10.100.68.2", "10.96.68.1", 8080, ""));
        add_remote(
            &mut local,
            "c69",
            &cluster("b", "10.100.69.2", "10.96.69.1", 8080, EAST_WEST),
        );
        let c70 = "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system, labels: {topology.istio.io/network: net-c}}";
        add_remote(&mut local, "c70", &cluster("c", "10.100.70.2", "10.96.70.1", 8080, c70));
        let out = super::super::translate(&local, &options("c68"));
        assert_eq!(workload(&out, "c68//Pod/shop/a").unwrap().network_gateway, None);
        let b = workload(&out, "c69//Pod/shop/b").unwrap();
        assert_eq!(b.network, "net-b");
        let gw = b.network_gateway.as_ref().expect("gateway");
        assert_eq!(gw.hbone_mtls_port, 15008);
        match &gw.destination {
            Some(pb::gateway_address::Destination::Address(a)) => {
                assert_eq!(
                    (a.network.as_str(), ip_from_bytes(&a.address)),
                    ("net-b", Some("172.16.69.1".parse().unwrap()))
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            vips(service(&out, ECHO).unwrap()),
            ["/10.96.68.1", "net-b/10.96.69.1", "net-c/10.96.70.1"]
        );
        // The end-to-end identity through the gateway: c69's endpoint (c70's has no gateway).
        assert_eq!(
            service(&out, ECHO).unwrap().subject_alt_names,
            ["spiffe://cluster.local/ns/shop/sa/default"]
        );
        let c = workload(&out, "c70//Pod/shop/c").unwrap();
        assert_eq!((c.network.as_str(), &c.network_gateway), ("net-c", &None));
        let missing: Vec<&str> = out
            .problems
            .iter()
            .filter(|p| p.message.contains("no east-west gateway"))
            .map(|p| p.message.as_str())
            .collect();
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(
            missing[0].contains("\"net-c\"") && missing[0].contains("c70"),
            "{}",
            missing[0]
        );
    }

    /// A remote pod with a local pod's address on the same network is not served (ztunnel could
    /// not tell them apart), and a remote with this cluster's own id is ignored.
    #[test]
    fn clashing_addresses_and_own_id_are_refused() {
        let mut local = inputs(&cluster("a", "10.100.68.2", "10.96.68.1", 8080, ""));
        add_remote(&mut local, "c69", &cluster("b", "10.100.68.2", "10.96.69.1", 8080, ""));
        add_remote(&mut local, "c68", &cluster("x", "10.100.68.3", "10.96.68.3", 8080, ""));
        let out = super::super::translate(&local, &options("c68"));
        assert!(workload(&out, "c69//Pod/shop/b").is_none());
        assert!(workload(&out, "c68//Pod/shop/x").is_none());
        let messages: Vec<&str> = out.problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("has the address of c68//Pod/shop/a")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("this cluster's own id")),
            "{messages:?}"
        );
    }

    /// A remote cluster's service cannot take the VIP of a local service of another name, nor
    /// a local pod's address, on the same network (it would receive their clients' traffic).
    #[test]
    fn a_remote_service_cannot_take_a_local_address() {
        let mut local = inputs(&cluster("a", "10.100.68.2", "10.96.68.1", 8080, ""));
        let thief = |name: &str, vip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}"
            )
        };
        let extra = format!(
            "{}\n---\n{}",
            thief("vip-thief", "10.96.68.1"),
            thief("pod-thief", "10.100.68.2")
        );
        add_remote(
            &mut local,
            "c69",
            &cluster("b", "10.100.69.2", "10.96.68.1", 8080, &extra),
        );
        let out = super::super::translate(&local, &options("c68"));
        let echo = service(&out, "shop/echo.shop.svc.cluster.local").expect("echo");
        assert_eq!(
            vips(echo).len(),
            1,
            "the same service's VIP in both clusters is one VIP"
        );
        for thief in ["vip-thief", "pod-thief"] {
            let s = service(&out, &format!("shop/{thief}.shop.svc.cluster.local"));
            assert!(
                s.is_none_or(|s| vips(s).is_empty()),
                "{thief} took a local address: {s:?}"
            );
        }
        let messages: Vec<&str> = out.problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("is shop/echo.shop.svc.cluster.local's")),
            "{messages:?}"
        );
    }

    /// Pod labels decide a workload's network and locality.
    #[test]
    fn pod_labels_set_network_and_locality() {
        let pod = "apiVersion: v1\nkind: Pod
metadata:
  name: vm
  namespace: shop
  labels: {topology.istio.io/network: vm-net, topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1, topology.istio.io/subzone: rack4}
spec: {nodeName: n0, containers: []}
status: {podIP: 10.100.68.7}";
        let out = super::super::translate(&inputs(pod), &options("c68"));
        let w = workload(&out, "c68//Pod/shop/vm").unwrap();
        assert_eq!(w.network, "vm-net");
        let l = w.locality.as_ref().expect("locality");
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.subzone.as_str()),
            ("eu", "eu-1", "rack4")
        );
    }

    /// Locality is the node's topology labels (as Istio reads it), for remote pods too.
    #[test]
    fn locality_comes_from_the_node() {
        let node = "apiVersion: v1\nkind: Node
metadata: {name: n0, labels: {topology.kubernetes.io/region: us, topology.kubernetes.io/zone: us-2}}";
        let mut local = inputs(&cluster("a", "10.100.68.2", "10.96.68.1", 8080, node));
        add_remote(
            &mut local,
            "c69",
            &cluster("b", "10.100.69.2", "10.96.69.1", 8080, node),
        );
        let out = super::super::translate(&local, &options("c68"));
        for uid in ["c68//Pod/shop/a", "c69//Pod/shop/b"] {
            let l = workload(&out, uid).unwrap().locality.clone().expect("locality");
            assert_eq!(
                (l.region.as_str(), l.zone.as_str(), l.subzone.as_str()),
                ("us", "us-2", ""),
                "{uid}"
            );
        }
    }

    /// Auto-allocated ServiceEntry addresses derive from the host alone: two controllers with
    /// different cluster ids give the same VIP, so DNS answers agree across clusters.
    #[test]
    fn auto_allocated_addresses_are_the_same_in_every_cluster() {
        let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {name: api, namespace: shop}
spec: {hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}";
        let vip = |id: &str| {
            let out = super::super::translate(&inputs(se), &options(id));
            vips(service(&out, "shop/api.example.com").expect("service entry"))
        };
        let a = vip("c68");
        assert_eq!(a.len(), 2, "an IPv4 and an IPv6 address: {a:?}");
        assert_eq!(a, vip("c69"));
        assert_eq!(a, vip("Kubernetes"));
    }
}
