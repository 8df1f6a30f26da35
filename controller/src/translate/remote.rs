//! Multicluster: the remote clusters' workloads and services merged into what this controller
//! serves, as Istio's control plane merges them. Each served remote cluster is translated on
//! its own (its cluster id in workload uids, its network on workloads and VIPs, no policies:
//! the destination's own controller decides those); its workloads are added, and a service
//! with the same namespace and name as one already known is one service: its VIPs and subject
//! alt names are the union, its ports the local cluster's (ports that differ are reported).
//! Workloads on a network other than this cluster's get that network's east-west gateway as
//! `network_gateway`, so clients on other networks tunnel through it (double HBONE), and
//! their identities join their services' subject alt names (the inner handshake's check).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use mesh_core::state::model::{ip_from_bytes, ip_to_bytes};
use mesh_proto::workload as pb;

use super::{Options, Outputs, Problem};
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

/// The discovery part of a remote cluster: what Istio reads from a remote (no policies, no
/// routes, no ServiceEntries: those are this cluster's configuration).
fn discovery(remote: &Inputs) -> Inputs {
    Inputs {
        namespaces: remote.namespaces.clone(),
        nodes: remote.nodes.clone(),
        pods: remote.pods.clone(),
        services: remote.services.clone(),
        endpoint_slices: remote.endpoint_slices.clone(),
        gateway_classes: remote.gateway_classes.clone(),
        gateways: remote.gateways.clone(),
        enrolled: remote.enrolled.clone(),
        ..Inputs::default()
    }
}

/// Merges the served remote clusters into `out` (translated from the local cluster with
/// `options`, already [`local_options`]) and sets network gateways.
pub(crate) fn merge(inputs: &Inputs, options: &Options, out: &mut Outputs) {
    let mut gateways = cluster::network_gateways(&inputs.gateways, &options.cluster_id, &options.network, true);
    let mut clusters = vec![status(&options.cluster_id, &options.network, true, RemoteState::Synced)];
    let mut local_ips: HashMap<(String, IpAddr), String> = HashMap::new();
    // Only remote clusters need it (a pass over every workload: skipped on the common path).
    for (name, a) in out.addresses.iter().filter(|_| !inputs.remotes.is_empty()) {
        match &a.r#type {
            Some(pb::address::Type::Workload(w)) => {
                for ip in w.addresses.iter().filter_map(|b| ip_from_bytes(b)) {
                    local_ips.insert((w.network.clone(), ip), w.uid.clone());
                }
            }
            // Service VIPs too: a remote must not take a local service's or pod's address.
            Some(pb::address::Type::Service(s)) => {
                for a in &s.addresses {
                    if let Some(ip) = ip_from_bytes(&a.address) {
                        local_ips.insert((a.network.clone(), ip), name.clone());
                    }
                }
            }
            None => {}
        }
    }
    let mut problems = Vec::new();
    for (id, remote) in &inputs.remotes {
        let network = cluster::cluster_network(&remote.inputs, &options.root_namespace, "");
        let mut st = status(id, &network, false, remote.state.clone());
        if id == &options.cluster_id {
            problems.push(problem(
                &options.root_namespace,
                format!("remote cluster {id} has this cluster's own id; it is ignored"),
            ));
        } else if remote.served() {
            gateways.extend(cluster::network_gateways(&remote.inputs.gateways, id, &network, false));
            let opts = Options {
                cluster_id: id.clone(),
                network,
                ..options.clone()
            };
            add_remote(id, remote, &opts, &mut local_ips, out, &mut st, &mut problems);
        }
        clusters.push(st);
    }
    gateways.sort();
    gateways.dedup();
    set_network_gateways(out, &options.network, &gateways);
    remote_network_sans(out, &options.network);
    missing_gateways(out, options, &gateways, &mut problems);
    for c in &mut clusters {
        c.gateways = gateways
            .iter()
            .filter(|g| g.network == c.network)
            .map(|g| format!("{}:{}", target(&g.target), g.port))
            .collect();
        if c.local {
            c.workloads = count_workloads(out, &c.id);
            c.services = out.addresses.len() - out.addresses.values().filter(|a| is_workload(a)).count();
        }
    }
    out.clusters = clusters;
    out.problems.extend(problems);
    out.problems.sort();
    out.problems.dedup();
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

fn is_workload(a: &pb::Address) -> bool {
    matches!(a.r#type, Some(pb::address::Type::Workload(_)))
}

fn count_workloads(out: &Outputs, cluster: &str) -> usize {
    out.addresses
        .values()
        .filter(|a| matches!(&a.r#type, Some(pb::address::Type::Workload(w)) if w.cluster_id == cluster))
        .count()
}

/// Adds one remote cluster's workloads and services.
fn add_remote(
    id: &str,
    remote: &Remote,
    opts: &Options,
    local_ips: &mut HashMap<(String, IpAddr), String>,
    out: &mut Outputs,
    st: &mut ClusterStatus,
    problems: &mut Vec<Problem>,
) {
    let translated = super::translate(&discovery(&remote.inputs), opts);
    for (name, address) in translated.addresses {
        match Arc::unwrap_or_clone(address).r#type {
            Some(pb::address::Type::Workload(w)) => {
                if let Some(clash) = ip_clash(&w, local_ips) {
                    problems.push(problem(
                        &opts.root_namespace,
                        format!(
                            "workload {} of cluster {id} has the address of {clash} on network {:?}; it is not served",
                            w.uid, w.network
                        ),
                    ));
                    continue;
                }
                st.workloads += 1;
                let w = pb::Address {
                    r#type: Some(pb::address::Type::Workload(w)),
                };
                out.addresses.insert(name, Arc::new(w));
            }
            Some(pb::address::Type::Service(mut svc)) => {
                st.services += 1;
                drop_taken_vips(id, &mut svc, &name, local_ips, problems);
                merge_service(id, svc, &name, out, problems);
            }
            None => {}
        }
    }
}

/// The workload that already holds one of `w`'s addresses on its network (two clusters on one
/// network with overlapping pod ranges): ztunnel could not tell them apart. Otherwise `w`'s
/// addresses are recorded.
fn ip_clash(w: &pb::Workload, ips: &mut HashMap<(String, IpAddr), String>) -> Option<String> {
    let mine: Vec<IpAddr> = w.addresses.iter().filter_map(|b| ip_from_bytes(b)).collect();
    if let Some(owner) = mine.iter().find_map(|ip| ips.get(&(w.network.clone(), *ip))) {
        return Some(owner.clone());
    }
    for ip in mine {
        ips.insert((w.network.clone(), ip), w.uid.clone());
    }
    None
}

/// Removes the VIPs of a remote cluster's service `name` that another service or a workload
/// already holds on their network: ztunnel resolves a VIP before a pod address and keeps one
/// service per VIP, so a remote cluster (which names its own network) could otherwise take
/// over a local service's or pod's traffic. The same service's VIP in two clusters is fine.
fn drop_taken_vips(
    cluster: &str,
    svc: &mut pb::Service,
    name: &str,
    taken: &mut HashMap<(String, IpAddr), String>,
    problems: &mut Vec<Problem>,
) {
    svc.addresses.retain(|a| {
        let Some(ip) = ip_from_bytes(&a.address) else { return true };
        match taken.get(&(a.network.clone(), ip)) {
            Some(owner) if owner != name => {
                problems.push(Problem {
                    kind: Kind::Service,
                    object: ObjectKey::new(svc.namespace.clone(), svc.name.clone()),
                    message: format!(
                        "address {ip} on network {:?} of this service in cluster {cluster} is {owner}'s; it is not served",
                        a.network
                    ),
                    refused: None,
                });
                false
            }
            Some(_) => true,
            None => {
                taken.insert((a.network.clone(), ip), name.to_owned());
                true
            }
        }
    });
}

/// Merges a remote cluster's service into the one of the same name, or adds it.
fn merge_service(cluster: &str, svc: pb::Service, name: &str, out: &mut Outputs, problems: &mut Vec<Problem>) {
    let Some(pb::Address {
        r#type: Some(pb::address::Type::Service(known)),
    }) = out.addresses.get_mut(name).map(Arc::make_mut)
    else {
        let svc = pb::Address {
            r#type: Some(pb::address::Type::Service(svc)),
        };
        out.addresses.insert(name.to_owned(), Arc::new(svc));
        return;
    };
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
    for a in svc.addresses {
        if !known.addresses.contains(&a) {
            known.addresses.push(a);
        }
    }
    for san in svc.subject_alt_names {
        if !known.subject_alt_names.contains(&san) {
            known.subject_alt_names.push(san);
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

/// Every workload on a network other than `local_network` that has an east-west gateway gets
/// the first one (in a stable order) as its `network_gateway`. The workload API is the same
/// for every client; ztunnel uses the gateway only when the workload's network is not its own.
fn set_network_gateways(out: &mut Outputs, local_network: &str, gateways: &[NetworkGateway]) {
    if gateways.is_empty() {
        return;
    }
    let mut by_network: BTreeMap<&str, pb::GatewayAddress> = BTreeMap::new();
    for g in gateways {
        by_network
            .entry(g.network.as_str())
            .or_insert_with(|| gateway_address(g));
    }
    for a in out.addresses.values_mut() {
        let Some(pb::address::Type::Workload(w)) = &a.r#type else {
            continue;
        };
        let gateway = by_network.get(w.network.as_str());
        if w.network == local_network || w.network_gateway.as_ref() == gateway {
            continue;
        }
        if let Some(pb::address::Type::Workload(w)) = &mut Arc::make_mut(a).r#type {
            w.network_gateway = gateway.cloned();
        }
    }
}

/// The identities of a service's endpoints on other networks join its `subject_alt_names`:
/// through an east-west gateway the client cannot know which endpoint the gateway picks, and
/// Istio's ztunnel checks the inner (end-to-end) handshake against the service's SANs only.
fn remote_network_sans(out: &mut Outputs, local_network: &str) {
    let mut sans: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in out.addresses.values() {
        let Some(pb::address::Type::Workload(w)) = &a.r#type else {
            continue;
        };
        if w.network == local_network || w.network_gateway.is_none() {
            continue;
        }
        let td = if w.trust_domain.is_empty() {
            "cluster.local"
        } else {
            &w.trust_domain
        };
        let id = format!("spiffe://{td}/ns/{}/sa/{}", w.namespace, w.service_account);
        for service in w.services.keys() {
            sans.entry(service.clone()).or_default().push(id.clone());
        }
    }
    for (service, ids) in sans {
        if let Some(pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        }) = out.addresses.get_mut(&service).map(Arc::make_mut)
        {
            for id in ids {
                if !s.subject_alt_names.contains(&id) {
                    s.subject_alt_names.push(id);
                }
            }
            s.subject_alt_names.sort();
        }
    }
}

/// A network other than this cluster's with workloads but no east-west gateway: nothing on
/// another network can reach them (they are served, and reachable only from their own).
fn missing_gateways(out: &Outputs, options: &Options, gateways: &[NetworkGateway], problems: &mut Vec<Problem>) {
    let mut networks: BTreeMap<&str, &str> = BTreeMap::new();
    for a in out.addresses.values() {
        if let Some(pb::address::Type::Workload(w)) = &a.r#type {
            if w.network != options.network {
                networks.entry(w.network.as_str()).or_insert(w.cluster_id.as_str());
            }
        }
    }
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
