//! Incremental translation equals a full translation: for random sequences of changes (pods,
//! services, EndpointSlices, authorization and peer authentication policies, DestinationRules
//! with subsets, namespace labels, waypoints, ServiceEntries, WorkloadEntries and
//! WorkloadGroups, the enrolled set, kind states, relists of a kind locally or in a remote
//! cluster, the system namespace's network label, pods, Services and entries with IPv4 and
//! IPv6 addresses), applied in random bursts, and crashes of the translation thread (after
//! which the translator is invalidated, as `core::lock` does), the outputs of
//! [`Incremental`] after every burst equal `translate_synced` of the same inputs. The world
//! starts from the golden fixtures (waypoints, workloads, authorization, peer authentication,
//! service entries) and the generated objects share their namespaces, labels, hosts and IPs,
//! so selectors, waypoints, host claims and duplicate IPs really meet.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use controller::model::cluster::{self, ClusterChange, RemoteState};
use controller::model::{Inputs, Kind, Object, ObjectKey};
use controller::source::manifest_dir::{parse_text, Loaded};
use controller::source::{Change, KindSync};
use controller::translate::incremental::Incremental;
use controller::translate::{render, translate_synced, Options, Outputs};
use controller::xds::Snapshot;
use proptest::prelude::*;

fn parse(text: &str) -> Vec<Object> {
    let mut loaded = Loaded::default();
    parse_text(Path::new("generated.yaml"), text, &mut loaded);
    assert!(loaded.errors.is_empty(), "{:?}\n{text}", loaded.errors);
    loaded.objects
}

fn golden(case: &str) -> Vec<Object> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
        .join("input.yaml");
    let mut loaded = Loaded::default();
    parse_text(&path, &std::fs::read_to_string(&path).unwrap(), &mut loaded);
    loaded.objects
}

/// Namespaces the generated objects live in: two of the fixtures' and the root.
const NAMESPACES: [&str; 3] = ["shop", "payments", "istio-system"];
const APPS: [&str; 3] = ["web", "api", "db"];

/// A pod; `v` picks its variant (labels, IP, phase, enrolment, waypoint label).
fn pod(ns: usize, n: usize, v: u32) -> String {
    let ns = NAMESPACES[ns % 3];
    let app = APPS[(v % 3) as usize];
    let ip = format!("10.9.0.{}", 1 + (v / 3) % 5);
    // Dual-stack variants (IPv4 or IPv6 first, the first as podIP), their IPv6 from a pool
    // of three so that they clash too.
    let v6 = format!("'fd00::9:{}'", 1 + v % 3);
    let ips = match v % 8 {
        3 => format!("podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: {v6}}}]"),
        6 => format!("podIP: {v6}, podIPs: [{{ip: {v6}}}, {{ip: {ip}}}]"),
        _ => format!("podIP: {ip}"),
    };
    let phase = if v.is_multiple_of(11) { "Succeeded" } else { "Running" };
    let annotations = if v.is_multiple_of(2) {
        "annotations: {ambient.istio.io/redirection: enabled}, "
    } else {
        ""
    };
    let waypoint = match v % 7 {
        0 => ", istio.io/use-waypoint: none",
        1 => ", istio.io/use-waypoint: shop-waypoint",
        _ => "",
    };
    let host = if v % 13 == 5 { "hostNetwork: true, " } else { "" };
    // A few pods on other networks (reached through their network's east-west gateway).
    let network = match v % 10 {
        4 => ", topology.istio.io/network: net-b",
        9 => ", topology.istio.io/network: net-c",
        _ => "",
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: gen-{n}, namespace: {ns}, {annotations}labels: {{app: {app}, version: v{v}{waypoint}{network}}}}}\n\
         spec: {{{host}nodeName: node-{n}, serviceAccountName: sa-{app}, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{phase: {phase}, {ips}}}\n"
    )
}

/// A service; some select an app, one is selector-less (backed by an EndpointSlice).
fn service(ns: usize, n: usize, v: u32) -> String {
    let ns = NAMESPACES[ns % 3];
    let selector = match v % 4 {
        0 => String::new(),
        i => format!("selector: {{app: {}}}, ", APPS[(i - 1) as usize]),
    };
    let labels = match v % 5 {
        0 => "labels: {istio.io/use-waypoint: shop-waypoint}",
        1 => "labels: {istio.io/ingress-use-waypoint: 'true'}",
        _ => "labels: {}",
    };
    if v % 9 == 8 {
        // No address of its own: a remote cluster's Service of that name may still serve it.
        return format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: gsvc-{n}, namespace: {ns}, {labels}}}\n\
             spec: {{type: ExternalName, externalName: gsvc-{n}.example.org}}\n"
        );
    }
    let vip = format!("10.96.50.{}", 1 + (v % 7));
    // Some dual-stack, their IPv6 VIP from a pool of two.
    let vips = match v % 6 {
        5 => format!("clusterIP: {vip}, clusterIPs: [{vip}, 'fd00::96:{}']", 1 + v % 2),
        _ => format!("clusterIP: {vip}"),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: gsvc-{n}, namespace: {ns}, {labels}}}\n\
         spec: {{{selector}{vips}, ports: [{{name: http, port: 80, targetPort: {}}}]}}\n",
        if v.is_multiple_of(2) { "http" } else { "8080" }
    )
}

/// An EndpointSlice of service `gsvc-n`: two per service (`-x`, `-y`, different ports: the
/// later names win for a pod both list), naming one or two generated pods, the first in the
/// next namespace for some variants (a cross-namespace targetRef: ignored, the slice
/// reported), without a namespace (the slice's own) for others.
fn endpoint_slice(ns: usize, n: usize, v: u32) -> String {
    let (own, next) = (NAMESPACES[ns % 3], NAMESPACES[(ns + 1) % 3]);
    let suffix = if v % 5 == 4 { "y" } else { "x" };
    let first = match v % 3 {
        0 => format!("name: gen-{}, namespace: {next}", v % 4),
        1 => format!("name: gen-{}", v % 4),
        _ => format!("name: gen-{}, namespace: {own}", v % 4),
    };
    let second = if v % 2 == 1 {
        format!(
            ", {{addresses: [10.9.0.2], targetRef: {{kind: Pod, name: gen-{}, namespace: {own}}}}}",
            (v / 2) % 8
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: gsvc-{n}-{suffix}, namespace: {own}, labels: {{kubernetes.io/service-name: gsvc-{n}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}]\n\
         endpoints: [{{addresses: [10.9.0.1], targetRef: {{kind: Pod, {first}}}}}{second}]\n",
        8000 + v % 3
    )
}

/// A ServiceEntry `gse-n`; `v` picks its hosts (one a generated Service's, whose key the
/// Service keeps; one shared between entries and namespaces, which the first, or the older
/// entry's namespace, keeps; wildcards covering other namespaces' hosts, or another
/// namespace's cluster names), its creation time (or none), its addresses (one a generated
/// Service's VIP; none: auto-allocated), resolution, endpoints or a `workloadSelector`
/// picking generated pods and entries (or endpoints at VIPs), and an egress waypoint label.
fn service_entry(ns: usize, n: usize, v: u32) -> String {
    let next = NAMESPACES[(ns + 1) % 3];
    let ns = NAMESPACES[ns % 3];
    let hosts = match v % 4 {
        0 => format!("[gsvc-{}.{ns}.svc.cluster.local]", n % 4),
        1 => format!("[shared-{}.test]", v % 3),
        2 => match v / 4 % 4 {
            0 => format!("[ext-{n}.test, '*.wild-{n}.test']"),
            1 => format!("[ext-{n}.test, '*.test']"),
            2 => format!("['*.{next}.svc.cluster.local', shared-{}.test]", v % 3),
            _ => format!("[a.wild-{}.test, '*.wild-{}.test']", n % 3, v % 3),
        },
        _ => format!("[gse-{n}.test]"),
    };
    let created = match v % 5 {
        4 => String::new(),
        age => format!("creationTimestamp: '2024-01-0{}T00:00:00Z', ", 1 + (age + n as u32) % 4),
    };
    let addresses = match v % 5 {
        0 => format!("addresses: [10.96.50.{}], ", 1 + v % 7),
        1 => "addresses: [192.0.2.44], ".to_owned(),
        2 => format!("addresses: [10.96.50.{}, 'fd00::96:{}'], ", 1 + v % 7, 1 + v % 2),
        _ => String::new(),
    };
    let resolution = match v % 6 {
        4 => "STATIC",
        _ => ["STATIC", "DNS", "NONE"][(v % 3) as usize],
    };
    let backing = match v % 6 {
        0 | 3 => format!(
            "workloadSelector: {{labels: {{app: {}}}}}, ",
            APPS[(v / 6 % 3) as usize]
        ),
        1 => "endpoints: [{address: 10.9.2.1}, {address: 10.9.2.2, ports: {http: 9090}}], ".to_owned(),
        // At VIPs: an entry's (192.0.2.44), a generated Service's or entry's, one's own;
        // refused (an endpoint at a VIP loops) while the VIP is kept.
        2 => format!(
            "endpoints: [{{address: 192.0.2.44}}, {{address: 10.96.50.{}}}, {{address: 10.9.2.3}}], ",
            1 + v / 6 % 7
        ),
        // Both families, at addresses generated pods hold.
        4 => format!(
            "endpoints: [{{address: 10.9.0.{}}}, {{address: 'fd00::9:{}'}}], ",
            1 + v / 6 % 5,
            1 + v % 3
        ),
        _ => String::new(),
    };
    let labels = if v.is_multiple_of(7) {
        "istio.io/use-waypoint: shop-waypoint"
    } else {
        ""
    };
    // Some name the identity of the pods their selector picks (as the merge adds for pods
    // behind an east-west gateway), so an entry can come to equal its merged address.
    let sans = if v % 8 == 5 {
        format!(
            "subjectAltNames: [spiffe://cluster.local/ns/{ns}/sa/sa-{}], ",
            APPS[(v / 6 % 3) as usize]
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: gse-{n}, namespace: {ns}, {created}labels: {{{labels}}}}}\n\
         spec: {{hosts: {hosts}, {addresses}{backing}{sans}resolution: {resolution}, ports: [{{number: 80, name: http, protocol: HTTP}}]}}\n"
    )
}

/// A WorkloadEntry `gwe-n` with an app label the generated Services, ServiceEntries and
/// policies select; some name a WorkloadGroup (which may not exist); some have a generated
/// pod's IPv4 or IPv6 address (an entry has one address), or a generated entry's VIP.
fn workload_entry(ns: usize, n: usize, v: u32) -> String {
    let ns = NAMESPACES[ns % 3];
    let group = if v.is_multiple_of(3) {
        format!("annotations: {{istio.io/autoRegistrationGroup: gwg-{}}}, ", v % 2)
    } else {
        String::new()
    };
    let address = match v % 10 {
        7 => format!("10.9.0.{}", 1 + v / 10 % 5),
        // A generated entry's VIP (refused while an entry of the namespace keeps it).
        8 => "192.0.2.44".to_owned(),
        9 => format!("'fd00::9:{}'", 1 + v / 10 % 3),
        _ => format!("10.9.3.{}", 1 + n),
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: gwe-{n}, namespace: {ns}, {group}}}\n\
         spec: {{address: {address}, labels: {{app: {}}}, ports: {{http: 8{v:03}}}}}\n",
        APPS[(v % 3) as usize]
    )
}

/// A WorkloadGroup `gwg-n` whose labels fill in its entries'.
fn workload_group(ns: usize, n: usize, v: u32) -> String {
    let ns = NAMESPACES[ns % 3];
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: gwg-{}, namespace: {ns}}}\n\
         spec: {{metadata: {{labels: {{app: {}, tier: vm}}}}, template: {{serviceAccount: vm-{v}}}}}\n",
        n % 2,
        APPS[(v % 3) as usize]
    )
}

fn authorization_policy(ns: usize, n: usize, v: u32) -> String {
    let ns = NAMESPACES[ns % 3];
    let selector = match v % 3 {
        0 => String::new(),
        i => format!("selector: {{matchLabels: {{app: {}}}}}, ", APPS[i as usize]),
    };
    let action = if v.is_multiple_of(2) { "ALLOW" } else { "DENY" };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: gap-{n}, namespace: {ns}}}\n\
         spec: {{{selector}action: {action}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/sa-web]}}}}], to: [{{operation: {{ports: ['{}']}}}}]}}]}}\n",
        8000 + v % 4
    )
}

fn peer_authentication(ns: usize, n: usize, v: u32) -> String {
    let ns = NAMESPACES[ns % 3];
    let selector = match v % 3 {
        0 => String::new(),
        i => format!("selector: {{matchLabels: {{app: {}}}}}, ", APPS[i as usize]),
    };
    let mode = if v.is_multiple_of(2) { "STRICT" } else { "PERMISSIVE" };
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: gpa-{n}, namespace: {ns}, creationTimestamp: '2024-01-0{}T00:00:00Z'}}\n\
         spec: {{{selector}mtls: {{mode: {mode}}}}}\n",
        1 + v % 5
    )
}

/// A DestinationRule for a generated service, with subsets selecting by app or by version
/// (which pods change), or none.
fn destination_rule(ns: usize, n: usize, v: u32) -> String {
    let ns = NAMESPACES[ns % 3];
    let subsets = match v % 3 {
        0 => String::new(),
        1 => format!(
            ", subsets: [{{name: a, labels: {{app: {}}}}}]",
            APPS[(v % 9 / 3) as usize]
        ),
        _ => format!(
            ", subsets: [{{name: a, labels: {{version: v{}}}}}, {{name: b, labels: {{app: web, version: v{}}}}}]",
            v % 40,
            (v * 7) % 40
        ),
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: gdr-{n}, namespace: {ns}}}\n\
         spec: {{host: gsvc-{n}{subsets}}}\n"
    )
}

/// A namespace's labels; the system namespace's may name this cluster's network (none, a
/// remote cluster's net-b, the local east-west gateway's net-c, or net-a of its own), which
/// every local workload and VIP is on.
fn namespace(ns: usize, v: u32) -> String {
    let labels = match v % 4 {
        0 => "istio.io/dataplane-mode: ambient",
        1 => "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: shop-waypoint",
        2 => "istio.io/use-waypoint: none, istio.io/ingress-use-waypoint: 'true'",
        _ => "",
    };
    let network = match (NAMESPACES[ns % 3], v / 4 % 4) {
        ("istio-system", 1) => "topology.istio.io/network: net-b",
        ("istio-system", 2) => "topology.istio.io/network: net-c",
        ("istio-system", 3) => "topology.istio.io/network: net-a",
        _ => "",
    };
    let labels: Vec<&str> = [labels, network].into_iter().filter(|l| !l.is_empty()).collect();
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{{}}}}}\n",
        NAMESPACES[ns % 3],
        labels.join(", ")
    )
}

/// The fixtures' waypoint, in variants: for services, for workloads, without HBONE.
fn waypoint(v: u32) -> String {
    let (for_, protocol) = match v % 3 {
        0 => ("service", "HBONE"),
        1 => ("all", "HBONE"),
        _ => ("workload", "HTTP"),
    };
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: shop-waypoint, namespace: shop, uid: gw-uid-1, labels: {{istio.io/waypoint-for: {for_}}}}}\n\
         spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: {protocol}}}]}}\n"
    )
}

/// An east-west gateway `ew-n` (local or in a remote cluster): for network net-b, net-c or
/// its cluster's, by address or hostname; some of class `istio-remote` (counted locally only).
fn east_west(n: usize, v: u32) -> String {
    let class = if v % 5 == 4 { "istio-remote" } else { "istio-east-west" };
    let labels = match v % 3 {
        0 => "{topology.istio.io/network: net-b}",
        1 => "{topology.istio.io/network: net-c}",
        _ => "{}",
    };
    let address = if v % 4 == 3 {
        format!("{{type: Hostname, value: ew-{n}.example}}")
    } else {
        format!("{{type: IPAddress, value: 172.16.0.{}}}", 1 + v % 5)
    };
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: ew-{n}, namespace: istio-system, labels: {labels}}}\n\
         spec: {{gatewayClassName: {class}, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}], addresses: [{address}]}}\n"
    )
}

/// A remote cluster's system namespace, naming its network (net-b, net-c, or the local one).
fn remote_namespace(v: u32) -> String {
    let labels = [
        "{topology.istio.io/network: net-b}",
        "{topology.istio.io/network: net-c}",
        "{}",
    ][(v % 3) as usize];
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: istio-system, labels: {labels}}}\n")
}

/// Remote clusters: two, and one with this cluster's own id (ignored, a problem).
const REMOTES: [&str; 3] = ["r1", "r2", "Kubernetes"];

/// A change of remote cluster `id`'s objects.
fn remote(id: &str, c: Change) -> Change {
    Change::Cluster(ClusterChange::Objects(id.to_owned(), Box::new(c)))
}

/// A change to a remote cluster: its pods and services (named as the local ones, sharing
/// their IPs, VIPs and labels, ports that may differ), its network, its east-west gateway,
/// its state (listed, failing, withdrawn, removed).
fn remote_change(what: u8, ns: usize, n: usize, v: u32) -> Change {
    let id = REMOTES[[0, 0, 0, 1, 1, 1, 2, 0][n % 8]];
    let one = |text: String| remote(id, Change::Apply(parse(&text).remove(0)));
    let ns_name = NAMESPACES[ns % 3];
    match what {
        0 | 1 => one(pod(ns, n % 4, v)),
        2 => one(service(ns, n % 4, v)),
        3 => match v % 2 {
            0 => remote(
                id,
                Change::Delete(Kind::Pod, ObjectKey::new(ns_name, format!("gen-{}", v % 4))),
            ),
            _ => remote(
                id,
                Change::Delete(Kind::Service, ObjectKey::new(ns_name, format!("gsvc-{}", v % 4))),
            ),
        },
        4 => match v % 3 {
            0 => one(remote_namespace(v / 3)),
            1 => one(east_west(n % 2, v / 3)),
            _ => remote(
                id,
                Change::Delete(Kind::Gateway, ObjectKey::new("istio-system", format!("ew-{}", n % 2))),
            ),
        },
        _ => match v % 6 {
            0 => remote(id, Change::Synced),
            1 => Change::Cluster(ClusterChange::State(id.to_owned(), RemoteState::Synced)),
            2 => Change::Cluster(ClusterChange::State(
                id.to_owned(),
                RemoteState::Failing { reason: "x".into() },
            )),
            3 => Change::Cluster(ClusterChange::State(
                id.to_owned(),
                RemoteState::Withdrawn { reason: "x".into() },
            )),
            4 => Change::Cluster(ClusterChange::Removed(id.to_owned())),
            _ => one(pod(ns, 4 + n % 4, v)),
        },
    }
}

/// One generated change: (what, namespace, name index, variant).
type Op = (u8, usize, usize, u32);

/// `what` from here on: relists, crashes, the system namespace's network, several addresses
/// (the rest, `what % 32`, the single changes).
const LATER: u8 = 208;

/// The objects of `kind` in `inputs`, as a source lists them.
fn listed(inputs: &Inputs, kind: Kind) -> Vec<Object> {
    match kind {
        Kind::Pod => inputs.pods.values().cloned().map(Object::Pod).collect(),
        Kind::Service => inputs.services.values().cloned().map(Object::Service).collect(),
        Kind::AuthorizationPolicy => inputs
            .authorization_policies
            .values()
            .cloned()
            .map(Object::AuthorizationPolicy)
            .collect(),
        Kind::PeerAuthentication => inputs
            .peer_authentications
            .values()
            .cloned()
            .map(Object::PeerAuthentication)
            .collect(),
        Kind::EndpointSlice => inputs
            .endpoint_slices
            .values()
            .cloned()
            .map(Object::EndpointSlice)
            .collect(),
        Kind::Namespace => inputs.namespaces.values().cloned().map(Object::Namespace).collect(),
        Kind::Gateway => inputs.gateways.values().cloned().map(Object::Gateway).collect(),
        other => panic!("not relisted: {other:?}"),
    }
}

/// A relist (`Change::Replace`, what a watch sends when it lists a kind again): the current
/// objects less some (every second, third or fourth from `v`, or none), with `fresh` (new
/// or other variants of generated objects) in place of those of their names; nothing at all
/// for some variants (the kind is no longer served).
fn relist(kind: Kind, current: Vec<Object>, fresh: &[String], n: usize, v: u32) -> Change {
    if v % 10 == 9 {
        return Change::Replace(kind, Vec::new());
    }
    let every = [2, 3, 4, usize::MAX][n % 4];
    let mut objects: BTreeMap<ObjectKey, Object> = current
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !(i + v as usize).is_multiple_of(every))
        .map(|(_, o)| (o.key(), o))
        .collect();
    for text in fresh {
        let o = parse(text).remove(0);
        objects.insert(o.key(), o);
    }
    Change::Replace(kind, objects.into_values().collect())
}

/// A local relist of pods, services, policies, slices, namespaces or gateways (the fresh
/// objects in two namespaces), or a remote cluster's of its pods, services, namespaces or gateways (as
/// its source wraps its watch's, in `ClusterChange::Objects`).
fn relist_change(which: u8, ns: usize, n: usize, v: u32, inputs: &Inputs) -> Change {
    let w = (v * 7 + 3) % 40;
    let two = |f: fn(usize, usize, u32) -> String, names: usize| [f(ns, n % names, v), f(ns + 1, (n + 1) % names, w)];
    if which >= 9 {
        let id = REMOTES[n % 3];
        let empty = Inputs::default();
        let theirs = inputs.remotes.get(id).map_or(&empty, |r| &r.inputs);
        let (kind, fresh) = match which % 4 {
            0 => (Kind::Pod, two(pod, 4).to_vec()),
            1 => (Kind::Service, two(service, 4).to_vec()),
            2 => (Kind::Namespace, vec![remote_namespace(v / 3)]),
            _ => (Kind::Gateway, vec![east_west(n % 2, v / 3)]),
        };
        return remote(id, relist(kind, listed(theirs, kind), &fresh, n, v));
    }
    let (kind, fresh) = match which % 7 {
        0 => (Kind::Pod, two(pod, 8)),
        1 => (Kind::Service, two(service, 4)),
        2 => (Kind::AuthorizationPolicy, two(authorization_policy, 4)),
        3 => (Kind::PeerAuthentication, two(peer_authentication, 3)),
        4 => (Kind::EndpointSlice, two(endpoint_slice, 4)),
        5 => (Kind::Namespace, [namespace(ns, v), namespace(ns + 1, w)]),
        // Waypoints and east-west gateways: some relists leave no waypoint at all.
        _ => (Kind::Gateway, [waypoint(v), east_west(n % 2, w)]),
    };
    relist(kind, listed(inputs, kind), &fresh, n, v)
}

/// A relist of the Gateways that finds no waypoint (east-west gateways only): the waypoints'
/// addresses name the network, so while any waypoint exists a network change translates
/// every pod again anyway; without one, only the network change itself does.
fn no_waypoints(inputs: &Inputs) -> Change {
    let gateways = listed(inputs, Kind::Gateway).into_iter().filter(|o| match o {
        Object::Gateway(g) => g.spec.gateway_class_name != "istio-waypoint",
        _ => false,
    });
    Change::Replace(Kind::Gateway, gateways.collect())
}

/// Whether `op` is a crash: the step after its burst panics on the translation thread, and
/// the next takes the translator's lock poisoned, which invalidates it (`core::lock`). For
/// `Some(true)` the step had taken the burst's notes (they are lost: the burst is applied
/// unnoted), for `Some(false)` it had not.
fn crash(op: Op) -> Option<bool> {
    let (what, _, _, v) = op;
    (LATER + 15..LATER + 21).contains(&what).then_some(v % 3 != 0)
}

/// The changes from [`LATER`] on (crashes aside): relists; the system namespace's network
/// set, changed or removed (with its namespace); pods (local and remote) with two addresses,
/// WorkloadEntries and ServiceEntry endpoints at their addresses.
fn later_change(which: u8, ns: usize, n: usize, v: u32, inputs: &Inputs) -> Change {
    let one = |text: String| Change::Apply(parse(&text).remove(0));
    let dual = v / 8 * 8 + [3, 6][n % 2];
    match which {
        0..=14 => relist_change(which, ns, n, v, inputs),
        21..=26 => match v % 6 {
            5 => Change::Delete(Kind::Namespace, ObjectKey::new("", "istio-system")),
            _ => one(namespace(2, v)),
        },
        27..=30 => one(pod(ns, n % 8, dual)),
        31..=34 => no_waypoints(inputs),
        35..=38 => remote(REMOTES[n % 2], one(pod(ns, n % 4, dual))),
        39..=42 => one(workload_entry(ns, n % 3, v / 10 * 10 + [7, 9][n % 2])),
        _ => one(service_entry(ns, n % 3, v / 6 * 6 + 4)),
    }
}

/// The change `op` stands for, given the current inputs.
fn change(op: Op, inputs: &Inputs) -> Change {
    let (what, ns, n, v) = op;
    if what >= LATER {
        return later_change(what - LATER, ns, n, v, inputs);
    }
    let one = |text: String| Change::Apply(parse(&text).remove(0));
    let key = ObjectKey::new(NAMESPACES[ns % 3], "");
    match what % 32 {
        0..=3 => one(pod(ns, n % 8, v)),
        24..=29 => remote_change(what % 32 - 24, ns, n, v),
        30 => match v % 4 {
            0 => Change::Delete(Kind::Gateway, ObjectKey::new("istio-system", format!("ew-{}", n % 2))),
            _ => one(east_west(n % 2, v)),
        },
        31 => one(pod(ns, n % 8, v / 10 * 10 + [4, 9][n % 2])),
        4 => Change::Delete(Kind::Pod, ObjectKey::new(key.namespace, format!("gen-{}", n % 8))),
        5 | 6 => one(service(ns, n % 4, v)),
        7 => Change::Delete(Kind::Service, ObjectKey::new(key.namespace, format!("gsvc-{}", n % 4))),
        8 => one(authorization_policy(ns, n % 4, v)),
        9 => Change::Delete(
            Kind::AuthorizationPolicy,
            ObjectKey::new(key.namespace, format!("gap-{}", n % 4)),
        ),
        10 => one(namespace(ns, v)),
        other => more_change(other, ns, n, v, inputs),
    }
}

/// The changes 11-23 of [`change`] (and 15, kind states): slices, PeerAuthentications,
/// waypoints, enrolment, DestinationRules, ServiceEntries, WorkloadEntries and WorkloadGroups.
fn more_change(what: u8, ns: usize, n: usize, v: u32, inputs: &Inputs) -> Change {
    let one = |text: String| Change::Apply(parse(&text).remove(0));
    let key = ObjectKey::new(NAMESPACES[ns % 3], "");
    match what {
        11 => one(endpoint_slice(ns, n % 4, v)),
        12 => match v % 3 {
            0 => one(peer_authentication(ns, n % 3, v)),
            _ => Change::Delete(
                Kind::PeerAuthentication,
                ObjectKey::new(key.namespace, format!("gpa-{}", n % 3)),
            ),
        },
        13 => match v % 4 {
            0 => Change::Delete(Kind::Gateway, ObjectKey::new("shop", "shop-waypoint")),
            _ => one(waypoint(v)),
        },
        14 => {
            // Toggle some pods in and out of the enrolled set.
            let mut now = inputs.enrolled.clone();
            let pod = ObjectKey::new(key.namespace, format!("gen-{}", n % 8));
            if !now.remove(&pod) {
                now.insert(pod);
            }
            Change::Enrolled(now)
        }
        16 => one(destination_rule(ns, n % 4, v)),
        17 => Change::Delete(
            Kind::DestinationRule,
            ObjectKey::new(key.namespace, format!("gdr-{}", n % 4)),
        ),
        18 => one(endpoint_slice(ns, n % 4, v)),
        19 => Change::Delete(
            Kind::EndpointSlice,
            ObjectKey::new(
                key.namespace,
                format!("gsvc-{}-{}", n % 4, ["x", "y"][(v % 2) as usize]),
            ),
        ),
        20 => one(service_entry(ns, n % 3, v)),
        21 => Change::Delete(
            Kind::ServiceEntry,
            ObjectKey::new(key.namespace, format!("gse-{}", n % 3)),
        ),
        22 => match v % 3 {
            0 => one(workload_group(ns, n, v)),
            _ => one(workload_entry(ns, n % 3, v)),
        },
        23 => match v % 2 {
            0 => Change::Delete(
                Kind::WorkloadEntry,
                ObjectKey::new(key.namespace, format!("gwe-{}", n % 3)),
            ),
            _ => Change::Delete(
                Kind::WorkloadGroup,
                ObjectKey::new(key.namespace, format!("gwg-{}", n % 2)),
            ),
        },
        _ => {
            let state = match v % 3 {
                0 => KindSync::Synced,
                1 => KindSync::Failing {
                    reason: "forbidden".into(),
                    listed: false,
                },
                _ => KindSync::NotServed,
            };
            let kind = [Kind::AuthorizationPolicy, Kind::PeerAuthentication][n % 2];
            Change::KindState(kind, state)
        }
    }
}

/// Applies a change as the controller's loop does.
fn apply(inputs: &mut Inputs, states: &mut BTreeMap<Kind, KindSync>, c: Change) {
    match c {
        Change::Apply(o) => inputs.apply(o),
        Change::Delete(kind, key) => drop(inputs.remove(kind, &key)),
        Change::Enrolled(pods) => inputs.enrolled = pods,
        Change::KindState(kind, state) => drop(states.insert(kind, state)),
        Change::Cluster(c) => cluster::apply(&mut inputs.remotes, c),
        Change::Replace(kind, objects) => {
            inputs.clear(kind);
            objects.into_iter().for_each(|o| inputs.apply(o));
        }
        other => panic!("not generated: {other}"),
    }
}

/// Everything a client or the admin dump can see of two outputs, side by side.
fn assert_same(step: usize, incremental: &Outputs, full: &Outputs) {
    assert_eq!(incremental.addresses, full.addresses, "addresses after step {step}");
    assert_eq!(
        incremental.authorizations, full.authorizations,
        "authorizations after step {step}"
    );
    assert_eq!(
        incremental.service_routes, full.service_routes,
        "routes after step {step}"
    );
    assert_eq!(
        incremental.waypoint_policies, full.waypoint_policies,
        "waypoint policies after step {step}"
    );
    assert_eq!(incremental.waypoints, full.waypoints, "waypoints after step {step}");
    assert_eq!(incremental.problems, full.problems, "problems after step {step}");
    assert_eq!(
        format!("{:?}", incremental.ingress),
        format!("{:?}", full.ingress),
        "ingress after step {step}"
    );
    assert_eq!(
        format!("{:?} {:?}", incremental.waypoint_credentials, incremental.clusters),
        format!("{:?} {:?}", full.waypoint_credentials, full.clusters),
        "credentials and cluster status after step {step}"
    );
    assert_eq!(
        render::to_json(incremental),
        render::to_json(full),
        "rendered after step {step}"
    );
}

/// Same resources at the same versions, and the same names announced as changed.
fn assert_same_snapshot(step: usize, a: &Snapshot, b: &Snapshot) {
    let versions = |s: &Snapshot| -> BTreeMap<String, BTreeMap<String, u64>> {
        s.types
            .iter()
            .map(|(t, m)| (t.to_string(), m.iter().map(|(n, e)| (n.clone(), e.version)).collect()))
            .filter(|(_, m): &(String, BTreeMap<String, u64>)| !m.is_empty())
            .collect()
    };
    assert_eq!(versions(a), versions(b), "snapshot versions after step {step}");
    let changed = |s: &Snapshot| -> BTreeMap<String, BTreeSet<String>> {
        s.changed
            .iter()
            .filter(|(_, n)| !n.is_empty())
            .map(|(t, n)| (t.to_string(), n.clone()))
            .collect()
    };
    assert_eq!(changed(a), changed(b), "changed names after step {step}");
}

/// The starting world: the golden fixtures and a few generated objects of each kind.
fn world() -> Inputs {
    let mut inputs = Inputs::default();
    for case in [
        "waypoints",
        "workloads",
        "authorization",
        "peer-authentication",
        "service-entries",
    ] {
        for o in golden(case) {
            inputs.apply(o);
        }
    }
    for i in 0..6u32 {
        let n = i as usize;
        let objects = [
            pod(n, n, i * 5),
            service(n, n, i),
            authorization_policy(n, n, i),
            destination_rule(n, n % 4, i + 1),
            service_entry(n, n % 3, i * 7 + 3),
            workload_entry(n, n % 3, i + 1),
        ];
        for text in objects {
            inputs.apply(parse(&text).remove(0));
        }
    }
    // Selector-less gsvc-0 (shop): slice -x names shop/gen-3, slice -y payments/gen-1.
    for v in [11, 9] {
        inputs.apply(parse(&endpoint_slice(0, 0, v)).remove(0));
    }
    // Remote clusters: r1 on net-b with its east-west gateway, r2 on this cluster's network
    // (its pods' IPs are the local ones'); a local east-west gateway for net-c.
    for (id, network, gateway) in [("r1", 0, true), ("r2", 2, false)] {
        let mut texts = vec![remote_namespace(network)];
        if gateway {
            texts.push(east_west(0, 0));
        }
        for i in 0..4u32 {
            let n = i as usize;
            texts.push(pod(n, n, i * 7 + 2));
            texts.push(service(n, n, i * 3 + 1));
        }
        if gateway {
            texts.push(pod(1, 5, 19)); // dual-stack
        }
        let mut changes: Vec<Change> = texts.iter().map(|t| applied(t)).collect();
        changes.push(Change::Synced);
        for c in changes {
            cluster::apply(&mut inputs.remotes, ClusterChange::Objects(id.to_owned(), Box::new(c)));
        }
    }
    inputs.apply(parse(&east_west(1, 1)).remove(0));
    // Two dual-stack pods (IPv4 first, IPv6 first) with one IPv6 address.
    for text in [pod(0, 6, 27), pod(1, 7, 30)] {
        inputs.apply(parse(&text).remove(0));
    }
    inputs
}

/// The services a workload lists (`None`: no such workload).
fn services_of(out: &Outputs, ns: &str, pod: &str) -> Option<Vec<String>> {
    let address = out.addresses.get(&format!("Kubernetes//Pod/{ns}/{pod}"))?;
    match &address.r#type {
        Some(mesh_proto::workload::address::Type::Workload(w)) => Some(w.services.keys().cloned().collect()),
        _ => None,
    }
}

/// The changes of the remote-heavy property test: remote pods and services at addresses
/// spread over more subnets than [`pod`]'s (so that many hold an address alone and are patched
/// into the remote part, while some still clash), remote pods deleted, local pods at the same
/// spread (the remote ones' addresses may come to clash with them), and every other change.
fn remote_heavy_change(op: Op, inputs: &Inputs) -> Change {
    let (what, ns, n, v) = op;
    let spread = |text: String| {
        text.replace("10.9.0.", &format!("10.9.{}.", what / 8 % 4))
            .replace("10.96.50.", &format!("10.96.{}.", 50 + what / 8 % 3))
    };
    let id = REMOTES[n % 2];
    match what % 8 {
        0..=2 => remote(id, applied(&spread(pod(ns, n, v)))),
        3 => remote(id, applied(&spread(service(ns, n % 4, v)))),
        4 => remote(
            id,
            Change::Delete(Kind::Pod, ObjectKey::new(NAMESPACES[ns % 3], format!("gen-{n}"))),
        ),
        5 => applied(&spread(pod(ns, n, v))),
        _ => change(op, inputs),
    }
}

fn run(bursts: Vec<Vec<Op>>) {
    run_with(bursts, change)
}

fn run_with(bursts: Vec<Vec<Op>>, change: fn(Op, &Inputs) -> Change) {
    let options = Options::default();
    let mut inputs = world();
    let mut states = BTreeMap::new();
    let mut inc = Incremental::new(options.clone());
    let mut previous: Option<Arc<Outputs>> = None;
    // Snapshots as the controller builds them (from the change set) and from whole outputs.
    let (mut snap, mut whole) = (Snapshot::default(), Snapshot::default());
    // Steps that went the incremental way (the first is from scratch).
    let (mut incremental, mut steps) = (0, 0);
    for (step, burst) in bursts.into_iter().enumerate() {
        let crashed = burst.iter().filter_map(|op| crash(*op)).max();
        // A relist, a crash or a change of this cluster's network: may translate from scratch.
        let mut full = crashed.is_some();
        for op in burst.into_iter().filter(|op| crash(*op).is_none()) {
            let c = change(op, &inputs);
            full |= matches!(c, Change::Replace(..));
            if crashed != Some(true) {
                inc.note(&inputs, &c);
            }
            let network = cluster::cluster_network(&inputs, "istio-system", "");
            apply(&mut inputs, &mut states, c);
            full |= network != cluster::cluster_network(&inputs, "istio-system", "");
        }
        if crashed.is_some() {
            inc.invalidate();
        }
        let step_out = inc.step(&inputs, &states);
        let out = step_out.outputs;
        steps += 1;
        incremental += usize::from(step > 0 && (step_out.touched.is_some() || full));
        snap = match &step_out.touched {
            Some(touched) => Snapshot::apply(&snap, &out, touched, None),
            None => Snapshot::next(&snap, out.clone(), None),
        };
        // As the controller does: the outputs published before come back as the spare copy.
        if let Some(before) = previous.replace(out.clone()) {
            inc.recycle(before);
        }
        let full = Arc::new(translate_synced(&inputs, &states, &options));
        assert_same(step, &out, &full);
        whole = Snapshot::next(&whole, full, None);
        assert_same_snapshot(step, &snap, &whole);
    }
    assert_eq!(
        incremental + 1,
        steps,
        "every step after the first is incremental, but after a relist, a crash or a network change"
    );
}

/// 64 cases, or `PROPTEST_CASES` (e.g. a few hundred locally).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64)
}

fn op() -> impl Strategy<Value = Op> {
    (any::<u8>(), 0usize..3, 0usize..8, 0u32..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full_translation(bursts in prop::collection::vec(prop::collection::vec(op(), 1..4), 1..25)) {
        run(bursts);
    }

    #[test]
    fn incremental_equals_full_translation_with_remote_churn(bursts in prop::collection::vec(prop::collection::vec(op(), 1..4), 1..25)) {
        run_with(bursts, remote_heavy_change);
    }
}

/// The world the property test starts from has every kind it changes, and the fixtures'
/// pods really get workloads (so the comparisons above compare something).
#[test]
fn world_is_not_empty() {
    let inputs = world();
    let out = translate_synced(&inputs, &BTreeMap::new(), &Options::default());
    let workloads = out.addresses.keys().filter(|k| k.contains("//Pod/")).count();
    assert!(workloads > 10, "{workloads} workloads");
    // Backing a selector-less service by slice in its namespace; a slice naming another
    // namespace's pod is refused (Kubernetes never writes one).
    let gsvc = "shop/gsvc-0.shop.svc.cluster.local".to_owned();
    for (ns, pod, listed) in [("shop", "gen-3", true), ("payments", "gen-1", false)] {
        let services = services_of(&out, ns, pod).unwrap();
        assert_eq!(services.contains(&gsvc), listed, "{ns}/{pod}: {services:?}");
    }
    assert!(out.authorizations.len() > 5);
    assert!(!out.waypoints.is_empty());
    // Dual-stack pods, one IPv6 address of two of them.
    let dual = out.addresses.values().any(|a| match &a.r#type {
        Some(mesh_proto::workload::address::Type::Workload(w)) => w.addresses.len() == 2,
        _ => false,
    });
    assert!(dual, "a workload with two addresses");
    assert!(
        out.problems.iter().any(|p| p.message.contains("fd00::9:1 is also")),
        "{:#?}",
        out.problems
    );
    let kinds: BTreeSet<Kind> = [Kind::PeerAuthentication, Kind::Gateway, Kind::Namespace]
        .into_iter()
        .collect();
    for kind in kinds {
        let present = match kind {
            Kind::PeerAuthentication => !inputs.peer_authentications.is_empty(),
            Kind::Gateway => !inputs.gateways.is_empty(),
            _ => !inputs.namespaces.is_empty(),
        };
        assert!(present, "{kind:?}");
    }
}

/// The generated entries really meet across namespaces: an older entry's wildcard refuses a
/// newer entry's host of another namespace, another namespace's cluster names are refused,
/// and removing the older entry gives the host back, incrementally as in full.
#[test]
fn generated_entries_meet_across_namespaces() {
    let mut inputs = world();
    let mut inc = Incremental::new(Options::default());
    inc.step(&inputs, &BTreeMap::new());
    // shop/gse-1: [ext-1.test, '*.wild-1.test'], created on the 1st; payments/gse-7:
    // [a.wild-1.test, '*.wild-0.test'] on the 4th; payments/gse-0:
    // ['*.istio-system.svc.cluster.local', shared-1.test].
    for (ns, n, v) in [(0, 1, 18), (1, 7, 30), (1, 0, 10)] {
        noted_step(&mut inc, &mut inputs, applied(&service_entry(ns, n, v)));
    }
    let out = inc.step(&inputs, &BTreeMap::new()).outputs;
    let of = |name: &str| -> Vec<String> {
        let key = ObjectKey::new("payments", name);
        let on = out.problems.iter().filter(|p| p.object == key);
        on.map(|p| p.message.clone()).collect()
    };
    let older = "spec.hosts[0] \"a.wild-1.test\": host *.wild-1.test is declared by the older entry shop/gse-1";
    assert!(of("gse-7").iter().any(|m| m.starts_with(older)), "{:?}", of("gse-7"));
    assert!(
        of("gse-0").iter().any(|m| m.contains("names under .svc.cluster.local")),
        "{:?}",
        of("gse-0")
    );
    assert!(!out.addresses.contains_key("payments/a.wild-1.test"));
    let gone = Change::Delete(Kind::ServiceEntry, ObjectKey::new("shop", "gse-1"));
    let out = noted_step(&mut inc, &mut inputs, gone);
    assert!(out.addresses.contains_key("payments/a.wild-1.test"));
}

/// The change applying the object `text` describes.
fn applied(text: &str) -> Change {
    Change::Apply(parse(text).remove(0))
}

/// Translates `inputs` after noting `c` and applying it; asserts it equals a full translation.
fn noted_step(inc: &mut Incremental, inputs: &mut Inputs, c: Change) -> Arc<Outputs> {
    inc.note(inputs, &c);
    apply(inputs, &mut BTreeMap::new(), c);
    let out = inc.step(inputs, &BTreeMap::new()).outputs;
    assert_same(
        0,
        &out,
        &translate_synced(inputs, &BTreeMap::new(), &Options::default()),
    );
    out
}

const EXT: &str = "shop/gext.shop.svc.cluster.local";

/// A selector-less service in shop and its slice naming shop/gen-3 (a slice naming a pod in
/// another namespace is ignored: `slice_index::tests`).
const EXT_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: gext, namespace: shop}\n\
     spec: {clusterIP: 10.96.60.1, ports: [{name: http, port: 80}]}\n";
const EXT_SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata: {name: gext-1, namespace: shop, labels: {kubernetes.io/service-name: gext}}\n\
     addressType: IPv4\nports: [{name: http, port: 9090}]\n\
     endpoints: [{addresses: [10.9.0.3], targetRef: {kind: Pod, name: gen-3, namespace: shop}}]\n";

/// The slice index the incremental translator keeps is brought up to date by slice changes:
/// a pod change after a slice was added lists the slice's service, a pod
/// change after it was removed no longer does; every step equals a full translation.
#[test]
fn pod_change_after_slice_change() {
    let mut inputs = world();
    let mut inc = Incremental::new(Options::default());
    inc.step(&inputs, &BTreeMap::new());
    noted_step(&mut inc, &mut inputs, applied(EXT_SERVICE));
    let listed = |out: &Outputs| services_of(out, "shop", "gen-3").unwrap().contains(&EXT.to_owned());
    let out = noted_step(&mut inc, &mut inputs, applied(EXT_SLICE));
    assert!(listed(&out), "the slice's change re-translates the pods it names");
    let out = noted_step(&mut inc, &mut inputs, applied(&pod(3, 3, 16)));
    assert!(listed(&out), "a later pod change still sees the slice");
    let slice = ObjectKey::new("shop", "gext-1");
    let out = noted_step(&mut inc, &mut inputs, Change::Delete(Kind::EndpointSlice, slice));
    assert!(!listed(&out), "the slice's removal withdraws the membership");
    let out = noted_step(&mut inc, &mut inputs, applied(&pod(3, 3, 17)));
    assert!(!listed(&out), "a later pod change does not bring it back");
}

/// A pod change reads the slice index, not every EndpointSlice of the cluster (a pass over
/// all slices per pod change is what issue 18 removed): a slice put into the inputs without
/// its change being noted stays unseen by the next pod change. (The controller notes every
/// change; this only shows which of the two the pod path reads.)
#[test]
fn pod_change_reads_no_slice() {
    let mut inputs = world();
    let mut inc = Incremental::new(Options::default());
    inc.step(&inputs, &BTreeMap::new());
    noted_step(&mut inc, &mut inputs, applied(EXT_SERVICE));
    inputs.apply(parse(EXT_SLICE).remove(0));
    let c = applied(&pod(3, 3, 16));
    inc.note(&inputs, &c);
    apply(&mut inputs, &mut BTreeMap::new(), c);
    let out = inc.step(&inputs, &BTreeMap::new()).outputs;
    let services = services_of(&out, "shop", "gen-3").unwrap();
    assert!(!services.contains(&EXT.to_owned()), "{services:?}");
}

/// A ServiceEntry whose host a Kubernetes Service held takes it when the Service goes, and
/// keeps it through a later step that touches the Service's name again (here a second
/// delete): the entries' unchanged address must not be skipped while the Service's removal
/// of the same name is in the step (found by the property test).
#[test]
fn an_entry_keeps_the_host_a_deleted_service_left() {
    let mut inputs = world();
    let mut inc = Incremental::new(Options::default());
    inc.step(&inputs, &BTreeMap::new());
    let host = "shop/gsvc-0.shop.svc.cluster.local";
    let entry = applied(&service_entry(0, 0, 4));
    let out = noted_step(&mut inc, &mut inputs, entry);
    let owner = |out: &Outputs| match out.addresses.get(host).and_then(|a| a.r#type.as_ref()) {
        Some(mesh_proto::workload::address::Type::Service(s)) => s.name.clone(),
        _ => String::new(),
    };
    assert_eq!(owner(&out), "gsvc-0", "the Service keeps its host");
    let gone = || Change::Delete(Kind::Service, ObjectKey::new("shop", "gsvc-0"));
    let out = noted_step(&mut inc, &mut inputs, gone());
    assert_eq!(owner(&out), "gse-0", "the entry takes the host");
    let out = noted_step(&mut inc, &mut inputs, gone());
    assert_eq!(owner(&out), "gse-0", "and keeps it");
}

/// The last entry of the cluster going takes its problems with it: an entry that left only a
/// problem (here a WorkloadEntry naming a missing WorkloadGroup) and nothing else.
#[test]
fn the_last_entry_takes_its_problems_along() {
    let mut inputs = world();
    inputs.service_entries.clear();
    inputs.workload_entries.clear();
    inputs.workload_groups.clear();
    let mut inc = Incremental::new(Options::default());
    inc.step(&inputs, &BTreeMap::new());
    let orphan = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
         metadata: {name: orphan, namespace: shop, annotations: {istio.io/autoRegistrationGroup: missing}}\n\
         spec: {address: 10.9.4.1}\n";
    let out = noted_step(&mut inc, &mut inputs, applied(orphan));
    assert!(
        out.problems.iter().any(|p| p.object.name == "orphan"),
        "{:?}",
        out.problems
    );
    let gone = Change::Delete(Kind::WorkloadEntry, ObjectKey::new("shop", "orphan"));
    let out = noted_step(&mut inc, &mut inputs, gone);
    assert!(!out.problems.iter().any(|p| p.object.name == "orphan"));
}

/// The starting world really has remote clusters meeting the local one: their workloads
/// (some refused for a local pod's address, some through an east-west gateway), merged
/// services (VIPs, identities), and the problems of the merge.
#[test]
fn world_has_remote_clusters_meeting_the_local_one() {
    use mesh_proto::workload::address::Type;
    let out = translate_synced(&world(), &BTreeMap::new(), &Options::default());
    let workloads: Vec<_> = out
        .addresses
        .values()
        .filter_map(|a| match &a.r#type {
            Some(Type::Workload(w)) => Some(w),
            _ => None,
        })
        .collect();
    let remote = |id: &str| workloads.iter().filter(|w| w.cluster_id == id).count();
    assert!(remote("r1") > 0 && remote("r2") > 0, "{:?}", out.clusters);
    assert!(workloads
        .iter()
        .any(|w| w.cluster_id == "r1" && w.network_gateway.is_some()));
    let merged = out.addresses.values().any(|a| match &a.r#type {
        Some(Type::Service(s)) => s.addresses.len() > 1 && !s.subject_alt_names.is_empty(),
        _ => false,
    });
    assert!(merged, "a service with VIPs of two clusters and gateway identities");
    let messages: Vec<&str> = out.problems.iter().map(|p| p.message.as_str()).collect();
    for needle in [
        "has the address of",
        "ports differ between clusters",
        "no east-west gateway",
    ] {
        assert!(messages.iter().any(|m| m.contains(needle)), "{needle}: {messages:#?}");
    }
    assert_eq!(out.clusters.len(), 3);
}

/// Each remote cluster's translation is cached: local pod, service and policy changes with
/// remote clusters and east-west gateways present translate no remote again (they go the
/// incremental way), a change to a remote translates that one only.
#[test]
fn a_local_change_translates_no_remote_cluster() {
    let mut inputs = world();
    let mut inc = Incremental::new(Options::default());
    inc.step(&inputs, &BTreeMap::new());
    assert_eq!(inc.remote_translations(), 2, "r1 and r2");
    for c in [
        applied(&pod(0, 3, 16)),
        applied(&service(0, 1, 2)),
        applied(&authorization_policy(1, 1, 4)),
    ] {
        inc.note(&inputs, &c);
        apply(&mut inputs, &mut BTreeMap::new(), c);
        let step = inc.step(&inputs, &BTreeMap::new());
        assert!(step.touched.is_some(), "incremental");
        let full = translate_synced(&inputs, &BTreeMap::new(), &Options::default());
        assert_same(0, &step.outputs, &full);
    }
    assert_eq!(inc.remote_translations(), 2);
    noted_step(&mut inc, &mut inputs, remote("r1", applied(&pod(0, 1, 5))));
    assert_eq!(inc.remote_translations(), 3, "r1 again");
}

/// A change to a remote cluster goes the incremental way in that cluster and in the merge:
/// one translation step of that cluster, the names it reaches merged again (not every remote
/// name), and the outputs equal a full translation. The changes are chosen where a slip shows:
/// a remote pod made equal to the local pod of its name (noted against the local objects, it
/// would be skipped as unchanged), a remote service's selector moved (its old pods must drop
/// it), a remote pod deleted; the remote's network label moved re-translates it whole. A pod
/// at an address nothing else holds is patched into the remote part (not a pass over it).
#[test]
fn a_remote_change_is_translated_incrementally() {
    let mut inputs = world();
    let mut inc = Incremental::new(Options::default());
    inc.step(&inputs, &BTreeMap::new());
    let all = inc.merged_names();
    let before = inc.remote_translations();
    let changes = [
        remote("r1", applied(&pod(2, 2, 10))),
        remote("r1", applied(&service(2, 2, 6))),
        remote("r1", Change::Delete(Kind::Pod, ObjectKey::new(NAMESPACES[1], "gen-1"))),
    ];
    for (i, c) in changes.into_iter().enumerate() {
        noted_step(&mut inc, &mut inputs, c);
        assert_eq!(inc.remote_translations(), before + 1 + i as u64, "one cluster's step");
        let merged = inc.merged_names();
        assert!((1..=4).contains(&merged), "change {i}: {merged} of {all} names merged");
    }
    let parts = inc.remote_parts();
    let alone = pod(2, 2, 10).replace("10.9.0.", "10.77.0.");
    noted_step(&mut inc, &mut inputs, remote("r1", applied(&alone)));
    assert_eq!(inc.remote_parts(), parts, "patched, not recomputed");
    noted_step(&mut inc, &mut inputs, remote("r1", applied(&remote_namespace(1))));
    assert!(inc.merged_names() > 4, "a remote's network moves all of its names");
    assert_eq!(inc.remote_parts(), parts + 1);
}

/// A from-scratch step over more pods than one thread takes (the incremental translator
/// translates them on every core) gives what the full translation gives, problems (many
/// duplicate addresses here) and order included, and its snapshot holds each resource under
/// its own name; a change after it is the same as a full translation too.
#[test]
fn a_large_world_translated_on_several_threads_is_the_same() {
    let mut inputs = world();
    for n in 0..6000 {
        inputs.apply(parse(&pod(n % 3, 100 + n, n as u32 % 40)).remove(0));
    }
    let mut inc = Incremental::new(Options::default());
    let out = inc.step(&inputs, &BTreeMap::new()).outputs;
    let full = translate_synced(&inputs, &BTreeMap::new(), &Options::default());
    assert!(inputs.pods.len() > 6000 && full.addresses.len() > 5000);
    assert_same(0, &out, &full);
    // The snapshot encodes them on several threads too: each entry under its own name.
    let snap = Snapshot::next(&Snapshot::default(), out.clone(), None);
    let entries: Vec<_> = snap.types.values().flat_map(|m| m.iter()).collect();
    assert!(entries.len() > 5000);
    for (name, e) in entries {
        assert_eq!(&*e.name, name.as_str());
    }
    noted_step(&mut inc, &mut inputs, applied(&pod(1, 4000, 7)));
}

/// A ServiceEntry edited to equal its merged address: the entry selects a pod on net-c (behind
/// the local east-west gateway), whose identity the merge adds to the entry's service; the
/// entry then names that identity itself, so its new value equals the published one, and
/// the pod goes. The identity must stay (the entry's own); the incremental step once compared
/// with the published value, skipped the update and re-merged from the stale local value.
#[test]
fn an_entry_that_comes_to_equal_its_merged_address_keeps_it() {
    let mut inputs = world();
    let mut inc = Incremental::new(Options::default());
    inc.step(&inputs, &BTreeMap::new());
    let id = "spiffe://cluster.local/ns/shop/sa/sa-san";
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: san-pod, namespace: shop, annotations: {ambient.istio.io/redirection: enabled}, \
         labels: {app: sanapp, topology.istio.io/network: net-c}}\n\
         spec: {nodeName: node-1, serviceAccountName: sa-san, containers: [{name: c, image: x}]}\n\
         status: {phase: Running, podIP: 10.9.7.7}\n";
    let entry = |sans: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: san-se, namespace: shop}}\n\
             spec: {{hosts: [san.test], workloadSelector: {{labels: {{app: sanapp}}}}, {sans}resolution: STATIC, \
             ports: [{{number: 80, name: http, protocol: HTTP}}]}}\n"
        )
    };
    let sans = |out: &Outputs| match out.addresses.get("shop/san.test").and_then(|a| a.r#type.as_ref()) {
        Some(mesh_proto::workload::address::Type::Service(s)) => s.subject_alt_names.clone(),
        _ => Vec::new(),
    };
    noted_step(&mut inc, &mut inputs, applied(pod));
    let out = noted_step(&mut inc, &mut inputs, applied(&entry("")));
    assert_eq!(
        sans(&out),
        [id],
        "the merge adds the identity of the pod behind the gateway"
    );
    let out = noted_step(
        &mut inc,
        &mut inputs,
        applied(&entry(&format!("subjectAltNames: [{id}], "))),
    );
    assert_eq!(sans(&out), [id]);
    let out = noted_step(
        &mut inc,
        &mut inputs,
        Change::Delete(Kind::Pod, ObjectKey::new("shop", "san-pod")),
    );
    assert_eq!(sans(&out), [id], "the entry's own identity stays");
}
