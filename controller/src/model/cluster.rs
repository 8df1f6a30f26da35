//! Clusters and networks: the remote clusters a controller reads besides its own (their
//! discovery objects and whether they can be read), the network every workload is on, and the
//! east-west gateways that make a network reachable from the others. Istio's rules: a pod's
//! `topology.istio.io/network` label, else the network of its cluster (`--network`, else the
//! same label on the cluster's system namespace); a Gateway of class `istio-east-west` with an
//! HBONE listener marks its network's gateway address (`istio-remote` ones only locally).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::gateway::Gateway;
use super::{Inputs, Kind, ObjectKey};
use crate::source::Change;

/// Label naming a pod's, a namespace's or an east-west Gateway's network.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Class of the Gateways that accept double-HBONE traffic into their network.
pub const EAST_WEST_CLASS: &str = "istio-east-west";
/// Class of a Gateway declared locally for another network's gateway (no remote access).
pub const REMOTE_GATEWAY_CLASS: &str = "istio-remote";

/// Whether a remote cluster's objects are served.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RemoteState {
    /// Not listed yet: nothing of it is served.
    #[default]
    Pending,
    /// Listed and watched.
    Synced,
    /// Cannot be read: its last good objects are still served until the grace period ends.
    Failing { reason: String },
    /// Could not be read for longer than the grace period: its workloads are withdrawn (its
    /// objects are kept, and served again as soon as it can be read).
    Withdrawn { reason: String },
}

/// One remote cluster as the controller knows it.
#[derive(Clone, Debug, Default)]
pub struct Remote {
    /// Its objects of the [`DISCOVERY_KINDS`] (and its enrolled pods): nothing else is kept.
    pub inputs: Inputs,
    pub state: RemoteState,
    /// Whether its source has listed everything once.
    pub listed: bool,
}

impl Remote {
    /// Whether its workloads and services are part of what is served.
    pub fn served(&self) -> bool {
        self.listed && !matches!(self.state, RemoteState::Withdrawn { .. } | RemoteState::Pending)
    }
}

/// What Istio reads from a remote cluster: its workloads, services, their namespaces and
/// nodes, and its gateways. Policies, routes and ServiceEntries are this cluster's own
/// configuration, so a remote's are not kept (its translation is a function of these alone).
pub const DISCOVERY_KINDS: [Kind; 7] = [
    Kind::Namespace,
    Kind::Node,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::GatewayClass,
    Kind::Gateway,
];

/// Whether a remote cluster's `change` is to what it keeps ([`DISCOVERY_KINDS`], enrolment).
pub fn kept(change: &Change) -> bool {
    match change {
        Change::Apply(o) => DISCOVERY_KINDS.contains(&o.kind()),
        Change::Delete(kind, _) | Change::Replace(kind, _) => DISCOVERY_KINDS.contains(kind),
        Change::Enrolled(_) => true,
        Change::Synced | Change::KindState(..) | Change::MeshConfig(_) | Change::Cluster(_) => false,
    }
}

/// A change that concerns a remote cluster.
#[derive(Debug)]
pub enum ClusterChange {
    /// A change from the cluster's own source (objects, `Synced`, enrolment).
    Objects(String, Box<Change>),
    /// The cluster's source could (or could not) be read.
    State(String, RemoteState),
    /// The cluster is no longer configured (its Secret was deleted): forgotten at once.
    Removed(String),
}

impl std::fmt::Display for ClusterChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterChange::Objects(id, c) => write!(f, "cluster {id}: {c}"),
            ClusterChange::State(id, s) => write!(f, "cluster {id}: {s:?}"),
            ClusterChange::Removed(id) => write!(f, "cluster {id} removed"),
        }
    }
}

/// Applies `change` to the remote clusters.
pub fn apply(remotes: &mut BTreeMap<String, Remote>, change: ClusterChange) {
    match change {
        ClusterChange::Removed(id) => drop(remotes.remove(&id)),
        ClusterChange::State(id, state) => remotes.entry(id).or_default().state = state,
        ClusterChange::Objects(id, change) => {
            let remote = remotes.entry(id).or_default();
            if !kept(&change) && !matches!(*change, Change::Synced) {
                return;
            }
            match *change {
                Change::Apply(o) => remote.inputs.apply(o),
                Change::Delete(kind, key) => drop(remote.inputs.remove(kind, &key)),
                Change::Replace(kind, objects) => {
                    remote.inputs.clear(kind);
                    objects.into_iter().for_each(|o| remote.inputs.apply(o));
                }
                Change::Synced => {
                    remote.listed = true;
                    if remote.state == RemoteState::Pending {
                        remote.state = RemoteState::Synced;
                    }
                }
                Change::Enrolled(pods) => remote.inputs.enrolled = pods,
                // Health is reported as `State` by the source; mesh settings are local config.
                Change::KindState(..) | Change::MeshConfig(_) | Change::Cluster(_) => {}
            }
        }
    }
}

/// The network of a cluster: `configured` (`--network`) when set, else the label on its
/// system namespace, else the default network (empty).
pub fn cluster_network(inputs: &Inputs, root_namespace: &str, configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    inputs
        .namespace_labels(root_namespace)
        .and_then(|l| l.get(NETWORK_LABEL))
        .cloned()
        .unwrap_or_default()
}

/// A pod's network: its own label, else its cluster's.
pub fn pod_network(labels: Option<&BTreeMap<String, String>>, cluster_network: &str) -> String {
    labels
        .and_then(|l| l.get(NETWORK_LABEL))
        .filter(|n| !n.is_empty())
        .map_or_else(|| cluster_network.to_owned(), Clone::clone)
}

/// Where a network's east-west gateway is reached.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayTarget {
    Address(IpAddr),
    /// A hostname in the Gateway's namespace (a Service ztunnel resolves).
    Hostname {
        namespace: String,
        hostname: String,
    },
}

/// An east-west gateway: the network it admits into, and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct NetworkGateway {
    pub network: String,
    pub cluster: String,
    pub gateway: ObjectKey,
    pub target: GatewayTarget,
    /// The HBONE listener's port (15008).
    pub port: u32,
}

/// The network gateways the Gateways of one cluster declare. `local` says whether they are the
/// controller's own cluster's (where `istio-remote` Gateways describe other networks).
pub fn network_gateways(
    gateways: &BTreeMap<ObjectKey, Gateway>,
    cluster: &str,
    cluster_network: &str,
    local: bool,
) -> Vec<NetworkGateway> {
    let mut out = Vec::new();
    for (key, gw) in gateways {
        let class = gw.spec.gateway_class_name.as_str();
        if class != EAST_WEST_CLASS && !(local && class == REMOTE_GATEWAY_CLASS) {
            continue;
        }
        let Some(listener) = gw.spec.listeners.iter().find(|l| l.protocol == "HBONE") else {
            continue;
        };
        let network = pod_network(gw.metadata.labels.as_ref(), cluster_network);
        let status = gw.status.iter().flat_map(|s| s.addresses.iter());
        for address in gw.spec.addresses.iter().chain(status) {
            let target = match address.kind.as_deref() {
                None | Some("IPAddress") => match address.value.parse() {
                    Ok(ip) => GatewayTarget::Address(ip),
                    Err(_) => continue,
                },
                Some("Hostname") => GatewayTarget::Hostname {
                    namespace: key.namespace.clone(),
                    hostname: address.value.clone(),
                },
                Some(_) => continue,
            };
            out.push(NetworkGateway {
                network: network.clone(),
                cluster: cluster.to_owned(),
                gateway: key.clone(),
                target,
                port: u32::from(listener.port),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::model::{Kind, Object};

    fn object(yaml: &str) -> Object {
        Object::parse(serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    fn gateways(yaml: &str) -> BTreeMap<ObjectKey, Gateway> {
        let mut inputs = Inputs::default();
        for doc in yaml.split("\n---\n") {
            inputs.apply(object(doc));
        }
        inputs.gateways
    }

    #[test]
    fn remote_is_served_once_listed_until_withdrawn() {
        let mut remotes = BTreeMap::new();
        let ns = object("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}");
        apply(
            &mut remotes,
            ClusterChange::Objects("b".into(), Box::new(Change::Apply(ns))),
        );
        assert!(!remotes["b"].served(), "not listed yet");
        apply(
            &mut remotes,
            ClusterChange::Objects("b".into(), Box::new(Change::Synced)),
        );
        assert!(remotes["b"].served());
        assert_eq!(remotes["b"].state, RemoteState::Synced);
        let failing = RemoteState::Failing { reason: "gone".into() };
        apply(&mut remotes, ClusterChange::State("b".into(), failing));
        assert!(
            remotes["b"].served(),
            "failing: last good state kept within the grace period"
        );
        let withdrawn = RemoteState::Withdrawn { reason: "gone".into() };
        apply(&mut remotes, ClusterChange::State("b".into(), withdrawn));
        assert!(!remotes["b"].served());
        assert_eq!(
            remotes["b"].inputs.namespaces.len(),
            1,
            "objects kept for when it returns"
        );
        apply(&mut remotes, ClusterChange::State("b".into(), RemoteState::Synced));
        assert!(remotes["b"].served());
        let delete = Change::Delete(Kind::Namespace, ObjectKey::new("", "shop"));
        apply(&mut remotes, ClusterChange::Objects("b".into(), Box::new(delete)));
        assert!(remotes["b"].inputs.namespaces.is_empty());
        apply(&mut remotes, ClusterChange::Removed("b".into()));
        assert!(remotes.is_empty());
    }

    #[test]
    fn networks_follow_pod_label_then_flag_then_system_namespace() {
        let mut inputs = Inputs::default();
        assert_eq!(cluster_network(&inputs, "istio-system", ""), "");
        inputs.apply(object(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system, labels: {topology.istio.io/network: net-a}}",
        ));
        assert_eq!(cluster_network(&inputs, "istio-system", ""), "net-a");
        assert_eq!(cluster_network(&inputs, "istio-system", "flag"), "flag");
        let labels = BTreeMap::from([(NETWORK_LABEL.to_owned(), "vm-net".to_owned())]);
        assert_eq!(pod_network(Some(&labels), "net-a"), "vm-net");
        assert_eq!(pod_network(None, "net-a"), "net-a");
    }

    #[test]
    fn east_west_gateways_mark_their_network() {
        let gws = gateways(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway
metadata: {name: ew, namespace: istio-system, labels: {topology.istio.io/network: net-b}}
spec:
  gatewayClassName: istio-east-west
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 10.90.69.200}, {type: Hostname, value: ew.example}]
---
apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway
metadata: {name: unlabelled, namespace: istio-system}
spec:
  gatewayClassName: istio-east-west
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status: {addresses: [{value: 10.90.69.201}]}
---
apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{value: 10.0.0.1}]
---
apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway
metadata: {name: no-hbone, namespace: istio-system}
spec:
  gatewayClassName: istio-east-west
  listeners: [{name: tls, port: 15443, protocol: TLS}]
  addresses: [{value: 10.0.0.2}]
---
apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway
metadata: {name: declared, namespace: istio-system, labels: {topology.istio.io/network: net-c}}
spec:
  gatewayClassName: istio-remote
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{value: 192.0.2.7}]",
        );
        let remote = network_gateways(&gws, "c69", "net-default", false);
        let found: Vec<(&str, &GatewayTarget)> = remote.iter().map(|g| (g.network.as_str(), &g.target)).collect();
        assert_eq!(
            found,
            [
                ("net-b", &GatewayTarget::Address("10.90.69.200".parse().unwrap())),
                (
                    "net-b",
                    &GatewayTarget::Hostname {
                        namespace: "istio-system".into(),
                        hostname: "ew.example".into()
                    }
                ),
                ("net-default", &GatewayTarget::Address("10.90.69.201".parse().unwrap())),
            ]
        );
        assert!(remote.iter().all(|g| g.port == 15008 && g.cluster == "c69"));
        let local = network_gateways(&gws, "c68", "", true);
        assert!(
            local.iter().any(|g| g.network == "net-c"),
            "istio-remote counts locally: {local:?}"
        );
        assert_eq!(local.len(), 4);
    }
}
