//! Which pods EndpointSlices name, for the selector-less Services whose members only slices
//! say: pod -> the slices naming it, and service -> its slices. A pod's translation looks up
//! its own slices instead of walking every slice of the cluster (a cluster has at least one
//! per Service); the incremental translator keeps one index, updated per changed slice and
//! per changed Service (whether it has a selector: then the selector, not the slice, says
//! who backs it), and a full pass builds one.
//!
//! Pods are indexed by a keyed hash of their name, not a copy of it: at 100,000 pods the
//! copies were ~700,000 small long-lived allocations, scattered through a heap the start-up
//! had just freed, and held ~265 MiB of resident memory. Each slice keeps the names it holds
//! in one string, which a hash is checked against; a lookup reads only the index (reading
//! the slices and services of the inputs per pod cost a 100k-pod translation 1.5 s).
//!
//! An endpoint whose targetRef names a pod in another namespace than the slice's is ignored
//! (Kubernetes never writes one; honoured, a slice in one namespace would make another's pod
//! back its Service) and the slice reported once ([`foreign`]), however many it names.

use std::collections::HashMap;
use std::hash::BuildHasher;

use super::Report;
use crate::model::endpoint_slice::Endpoint;
use crate::model::{EndpointSlice, Inputs, Kind, ObjectKey};

/// The label naming an EndpointSlice's Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A selector-less service a pod backs, with the slice's port names and numbers.
pub(crate) type SliceMembership<'a> = (&'a ObjectKey, &'a [(String, u32)]);

/// What one slice says.
struct Slice {
    key: ObjectKey,
    service: ObjectKey,
    /// The service exists and has no selector: this slice says who backs it.
    counts: bool,
    ports: Vec<(String, u32)>,
    /// The pods named, as `namespace` `name` back to back.
    names: String,
    /// Per pod named: the hash of its key, where its namespace starts, where its name starts
    /// and ends in `names`; sorted.
    pods: Vec<(u64, u32, u32, u32)>,
}

/// The slices naming one pod hash: one, mostly.
enum Ids {
    One(u32),
    Many(Vec<u32>),
}

/// EndpointSlices by the pods and services they name.
#[derive(Default)]
pub(crate) struct SliceIndex {
    /// Slot per slice (a free slot is `None`), and the slot of each slice key.
    slots: Vec<Option<Slice>>,
    free: Vec<u32>,
    ids: HashMap<ObjectKey, u32>,
    by_pod: HashMap<u64, Ids>,
    by_service: HashMap<ObjectKey, Vec<u32>>,
    /// Random keys: names cannot be picked to collide (a collision would only cost a check).
    hasher: std::collections::hash_map::RandomState,
}

impl SliceIndex {
    /// The index of every slice in `inputs`.
    pub(crate) fn new(inputs: &Inputs) -> Self {
        let mut index = SliceIndex::default();
        for key in inputs.endpoint_slices.keys() {
            index.update(inputs, key);
        }
        index
    }

    /// Brings slice `key` up to date with `inputs`.
    pub(crate) fn update(&mut self, inputs: &Inputs, key: &ObjectKey) {
        if let Some(id) = self.ids.remove(key) {
            if let Some(old) = self.slots.get_mut(id as usize).and_then(Option::take) {
                for (pod, ..) in &old.pods {
                    unlist_pod(&mut self.by_pod, *pod, id);
                }
                unlist(&mut self.by_service, &old.service, id);
            }
            self.free.push(id);
        }
        let slice = inputs.endpoint_slices.get(key);
        let Some(new) = slice.and_then(|s| self.read(inputs, key, s)) else {
            return;
        };
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        for (pod, ..) in &new.pods {
            list_pod(&mut self.by_pod, *pod, id);
        }
        list(&mut self.by_service, &new.service, id);
        self.ids.insert(key.clone(), id);
        if let Some(slot) = self.slots.get_mut(id as usize) {
            *slot = Some(new);
        }
    }

    /// Service `key` changed (or went): whether its slices count is read again.
    pub(crate) fn service_changed(&mut self, inputs: &Inputs, key: &ObjectKey) {
        let counts = selectorless(inputs, key);
        for id in self.by_service.get(key).into_iter().flatten() {
            if let Some(Some(slice)) = self.slots.get_mut(*id as usize) {
                slice.counts = counts;
            }
        }
    }

    /// The selector-less services whose slices name `pod`, with each slice's ports, in slice
    /// key order.
    pub(crate) fn memberships(&self, pod: &ObjectKey) -> Vec<SliceMembership<'_>> {
        let hash = self.hasher.hash_one(pod);
        let ids = match self.by_pod.get(&hash) {
            None => &[][..],
            Some(Ids::One(id)) => std::slice::from_ref(id),
            Some(Ids::Many(ids)) => ids.as_slice(),
        };
        let mut slices: Vec<&Slice> = ids
            .iter()
            .filter_map(|id| self.slot(*id))
            .filter(|s| s.counts && s.names(hash, pod))
            .collect();
        slices.sort_by(|a, b| a.key.cmp(&b.key));
        slices.into_iter().map(|s| (&s.service, s.ports.as_slice())).collect()
    }

    /// The pods the slices of service `service` name.
    pub(crate) fn pods_of(&self, service: &ObjectKey) -> Vec<ObjectKey> {
        let ids = self.by_service.get(service).map_or(&[][..], Vec::as_slice);
        ids.iter()
            .filter_map(|id| self.slot(*id))
            .flat_map(|s| s.pods.iter().map(|p| s.pod(p)))
            .map(|(ns, name)| ObjectKey::new(ns, name))
            .collect()
    }

    fn slot(&self, id: u32) -> Option<&Slice> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// A slice's service, ports and pods; `None` when it names no service or no pod.
    fn read(&self, inputs: &Inputs, key: &ObjectKey, slice: &EndpointSlice) -> Option<Slice> {
        let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let mut names = String::new();
        let mut pods = Vec::new();
        for (ns, pod) in slice.endpoints.iter().filter_map(|e| target(key, e)) {
            let hash = self.hasher.hash_one(ObjectKey::new(ns, pod));
            let at = |len: usize| u32::try_from(len).ok();
            let (Some(start), Some(middle)) = (at(names.len()), at(names.len() + ns.len())) else {
                break; // over 4 GiB of names: not a slice the API server stores
            };
            names.push_str(ns);
            names.push_str(pod);
            pods.push((hash, start, middle, at(names.len()).unwrap_or(middle)));
        }
        if pods.is_empty() {
            return None;
        }
        pods.sort_unstable();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u32::try_from(p.port?).ok()?)))
            .collect();
        let service = ObjectKey::new(key.namespace.clone(), name.clone());
        Some(Slice {
            key: key.clone(),
            counts: selectorless(inputs, &service),
            service,
            ports,
            names,
            pods,
        })
    }
}

impl Slice {
    /// The (namespace, name) of one of `pods`.
    fn pod(&self, &(_, start, middle, end): &(u64, u32, u32, u32)) -> (&str, &str) {
        let part = |from: u32, to: u32| self.names.get(from as usize..to as usize).unwrap_or_default();
        (part(start, middle), part(middle, end))
    }

    /// Whether this slice names `pod`, whose hash is `hash`.
    fn names(&self, hash: u64, pod: &ObjectKey) -> bool {
        let from = self.pods.partition_point(|p| p.0 < hash);
        self.pods[from..]
            .iter()
            .take_while(|p| p.0 == hash)
            .any(|p| self.pod(p) == (pod.namespace.as_str(), pod.name.as_str()))
    }
}

/// An endpoint's targetRef of kind Pod, as (namespace, name); without a namespace, the
/// slice's own. One naming a pod in another namespace is none: Kubernetes writes slices
/// only for pods of their Service's namespace, and honouring one would let a slice in one
/// namespace make another's pod back its Service (see [`foreign`]).
fn target<'a>(key: &'a ObjectKey, endpoint: &'a Endpoint) -> Option<(&'a str, &'a str)> {
    let t = endpoint
        .target_ref
        .as_ref()
        .filter(|t| t.kind.as_deref() == Some("Pod"))?;
    if foreign_namespace(key, endpoint).is_some() {
        return None;
    }
    Some((&key.namespace, t.name.as_deref().unwrap_or_default()))
}

/// The namespace an endpoint's targetRef names, when set and not the slice's own.
fn foreign_namespace<'a>(key: &ObjectKey, endpoint: &'a Endpoint) -> Option<&'a str> {
    let ns = endpoint.target_ref.as_ref()?.namespace.as_deref()?;
    (!ns.is_empty() && ns != key.namespace).then_some(ns)
}

/// The problem of slice `key` naming pods in other namespaces (ignored by [`target`]): one
/// per slice, naming the first such endpoint and how many there are, however many.
pub(crate) fn foreign(key: &ObjectKey, slice: &EndpointSlice) -> Option<String> {
    let mut found = slice
        .endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, e)| Some((i, foreign_namespace(key, e)?)));
    let (first, ns) = found.next()?;
    let ignored = match 1 + found.count() {
        1 => "this endpoint is ignored".to_owned(),
        n => format!("{n} such endpoints are ignored"),
    };
    Some(format!(
        "endpoints[{first}].targetRef.namespace {ns:?}: an EndpointSlice names pods only in its own namespace \
         ({}); {ignored}",
        key.namespace
    ))
}

/// Reports every slice of `inputs` that names pods in other namespaces ([`foreign`]).
pub(crate) fn report_foreign(inputs: &Inputs, report: &mut Report) {
    for (key, slice) in &inputs.endpoint_slices {
        if let Some(message) = foreign(key, slice) {
            report.add(Kind::EndpointSlice, key, message);
        }
    }
}

/// The pods an EndpointSlice's endpoints name.
pub(crate) fn slice_pods<'a>(key: &'a ObjectKey, slice: &'a EndpointSlice) -> impl Iterator<Item = ObjectKey> + 'a {
    slice
        .endpoints
        .iter()
        .filter_map(|e| target(key, e))
        .map(|(ns, name)| ObjectKey::new(ns, name))
}

/// Whether service `key` exists and has no selector (or an empty one).
fn selectorless(inputs: &Inputs, key: &ObjectKey) -> bool {
    let Some(svc) = inputs.services.get(key) else {
        return false;
    };
    let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
    selector.is_none_or(|s| s.is_empty())
}

fn list_pod(map: &mut HashMap<u64, Ids>, pod: u64, id: u32) {
    let now = match map.remove(&pod) {
        None => Ids::One(id),
        Some(Ids::One(other)) if other == id => Ids::One(id),
        Some(Ids::One(other)) => Ids::Many(vec![other, id]),
        Some(Ids::Many(mut ids)) => {
            if !ids.contains(&id) {
                ids.push(id);
            }
            Ids::Many(ids)
        }
    };
    map.insert(pod, now);
}

fn unlist_pod(map: &mut HashMap<u64, Ids>, pod: u64, id: u32) {
    let rest = match map.remove(&pod) {
        None => None,
        Some(Ids::One(other)) => (other != id).then_some(Ids::One(other)),
        Some(Ids::Many(mut ids)) => {
            ids.retain(|i| *i != id);
            match ids[..] {
                [] => None,
                [only] => Some(Ids::One(only)),
                _ => Some(Ids::Many(ids)),
            }
        }
    };
    if let Some(rest) = rest {
        map.insert(pod, rest);
    }
}

fn list(map: &mut HashMap<ObjectKey, Vec<u32>>, at: &ObjectKey, id: u32) {
    map.entry(at.clone()).or_default().push(id);
}

fn unlist(map: &mut HashMap<ObjectKey, Vec<u32>>, at: &ObjectKey, id: u32) {
    let Some(ids) = map.get_mut(at) else { return };
    ids.retain(|i| *i != id);
    if ids.is_empty() {
        map.remove(at);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a failed test

    use super::*;
    use crate::model::Object;
    use crate::source::manifest_dir::{parse_text, Loaded};

    fn object(yaml: &str) -> Object {
        let mut loaded = Loaded::default();
        parse_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        loaded.objects.remove(0)
    }

    fn slice(name: &str, port: u16, pods: &[&str]) -> Object {
        let endpoints: Vec<String> = pods
            .iter()
            .map(|p| {
                let (ns, name) = p.split_once('/').unwrap();
                format!("{{addresses: [10.0.0.1], targetRef: {{kind: Pod, name: {name}, namespace: {ns}}}}}")
            })
            .collect();
        object(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: a, labels: {{kubernetes.io/service-name: db}}}}\naddressType: IPv4\nports: [{{name: tcp, port: {port}}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        ))
    }

    fn ports(index: &SliceIndex, pod: &str) -> Vec<u32> {
        let (ns, name) = pod.split_once('/').unwrap();
        let key = ObjectKey::new(ns, name);
        index.memberships(&key).into_iter().map(|(_, p)| p[0].1).collect()
    }

    /// Updates replace a slice's entries, removals withdraw them, memberships come in slice key
    /// order, and a service with a selector has none.
    #[test]
    fn updates_removals_and_selectors() {
        let mut inputs = Inputs::default();
        inputs.apply(object("apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: a}\nspec: {ports: [{name: tcp, port: 5432}]}\n"));
        for o in [slice("db-2", 2, &["a/r"]), slice("db-1", 1, &["a/p", "a/r"])] {
            inputs.apply(o);
        }
        let mut index = SliceIndex::new(&inputs);
        assert_eq!(ports(&index, "a/r"), [1, 2]);
        assert_eq!(ports(&index, "a/p"), [1]);
        let mut service = index.pods_of(&ObjectKey::new("a", "db"));
        service.sort();
        assert_eq!(
            service,
            [
                ObjectKey::new("a", "p"),
                ObjectKey::new("a", "r"),
                ObjectKey::new("a", "r")
            ]
        );

        inputs.apply(slice("db-1", 1, &["a/q"]));
        let key = ObjectKey::new("a", "db-1");
        index.update(&inputs, &key);
        assert_eq!(ports(&index, "a/p"), Vec::<u32>::new());
        assert_eq!(ports(&index, "a/q"), [1]);
        let key = ObjectKey::new("a", "db-2");
        inputs.endpoint_slices.remove(&key);
        index.update(&inputs, &key);
        assert_eq!(ports(&index, "a/r"), Vec::<u32>::new());
        assert_eq!(index.by_pod.len(), 1, "no empty entries left behind");
        assert_eq!(index.by_service.len(), 1);
        // A pod whose hash met db-1's (as a collision would): db-1 does not name it.
        let stranger = index.hasher.hash_one(ObjectKey::new("c", "x"));
        list_pod(&mut index.by_pod, stranger, index.ids[&ObjectKey::new("a", "db-1")]);
        assert_eq!(ports(&index, "c/x"), Vec::<u32>::new());

        let db = ObjectKey::new("a", "db");
        inputs.apply(object("apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: a}\nspec: {selector: {app: db}, ports: [{name: tcp, port: 5432}]}\n"));
        index.service_changed(&inputs, &db);
        assert_eq!(ports(&index, "a/q"), Vec::<u32>::new(), "the selector decides");
        inputs.services.remove(&db);
        index.service_changed(&inputs, &db);
        assert_eq!(ports(&index, "a/q"), Vec::<u32>::new(), "no service, no member");
        inputs.apply(object("apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: a}\nspec: {ports: [{name: tcp, port: 5432}]}\n"));
        index.service_changed(&inputs, &db);
        assert_eq!(ports(&index, "a/q"), [1], "selector-less again");
    }

    /// The attack of a hand-written slice: Service `evil/fake` (no selector) and its slice
    /// naming `shop/payments-0`. Shop's pod does not list the evil service, the slice is
    /// reported once, and a same-namespace targetRef (with or without its namespace) still
    /// makes a member.
    const FOREIGN: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}
---
apiVersion: v1\nkind: Pod\nmetadata: {name: payments-0, namespace: shop, labels: {app: payments}}
spec: {nodeName: n0, containers: []}
status: {podIP: 10.100.0.7}
---
apiVersion: v1\nkind: Service\nmetadata: {name: fake, namespace: evil}
spec: {clusterIP: 10.96.0.66, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice
metadata: {name: fake-1, namespace: evil, labels: {kubernetes.io/service-name: fake}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.100.0.8], targetRef: {kind: Pod, name: web-0, namespace: evil}}
- {addresses: [10.100.0.7], targetRef: {kind: Pod, name: payments-0, namespace: shop}}
- {addresses: [10.100.0.9], targetRef: {kind: Pod, name: payments-1, namespace: shop}}
---
apiVersion: v1\nkind: Service\nmetadata: {name: legacy, namespace: shop}
spec: {clusterIP: 10.96.0.67, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice
metadata: {name: legacy-1, namespace: shop, labels: {kubernetes.io/service-name: legacy}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.100.0.7], targetRef: {kind: Pod, name: payments-0, namespace: shop}}]
---
apiVersion: v1\nkind: Service\nmetadata: {name: legacy2, namespace: shop}
spec: {clusterIP: 10.96.0.68, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice
metadata: {name: legacy2-1, namespace: shop, labels: {kubernetes.io/service-name: legacy2}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints: [{addresses: [10.100.0.7], targetRef: {kind: Pod, name: payments-0}}]
";

    fn inputs(yaml: &str) -> Inputs {
        let mut loaded = Loaded::default();
        parse_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut inputs = Inputs::default();
        loaded.objects.into_iter().for_each(|o| inputs.apply(o));
        inputs
    }

    /// The services `ns/pod`'s workload lists.
    fn services_of(out: &crate::translate::Outputs, pod: &str) -> Vec<String> {
        let address = &out.addresses[&format!("Kubernetes//Pod/{pod}")];
        match &address.r#type {
            Some(mesh_proto::workload::address::Type::Workload(w)) => w.services.keys().cloned().collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_slice_names_pods_only_in_its_own_namespace() {
        let inputs = inputs(FOREIGN);
        let index = SliceIndex::new(&inputs);
        let members = |pod: &str| -> Vec<String> {
            let (ns, name) = pod.split_once('/').unwrap();
            let key = ObjectKey::new(ns, name);
            index
                .memberships(&key)
                .into_iter()
                .map(|(s, _)| s.to_string())
                .collect()
        };
        assert_eq!(members("shop/payments-0"), ["shop/legacy", "shop/legacy2"]);
        assert_eq!(members("shop/payments-1"), Vec::<String>::new());
        assert_eq!(members("evil/web-0"), ["evil/fake"]);
        assert_eq!(
            index.pods_of(&ObjectKey::new("evil", "fake")),
            [ObjectKey::new("evil", "web-0")]
        );
        let fake = ObjectKey::new("evil", "fake-1");
        assert_eq!(slice_pods(&fake, &inputs.endpoint_slices[&fake]).count(), 1);

        let out = crate::translate::translate(&inputs, &crate::translate::Options::default());
        let services = services_of(&out, "shop/payments-0");
        assert!(!services.iter().any(|s| s.starts_with("evil/")), "{services:?}");
        assert!(
            services.contains(&"shop/legacy.shop.svc.cluster.local".to_owned()),
            "{services:?}"
        );
        assert!(
            services.contains(&"shop/legacy2.shop.svc.cluster.local".to_owned()),
            "{services:?}"
        );
        let problems: Vec<_> = out.problems.iter().filter(|p| p.kind == Kind::EndpointSlice).collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object, fake);
        assert_eq!(
            problems[0].message,
            "endpoints[1].targetRef.namespace \"shop\": an EndpointSlice names pods only in its own \
             namespace (evil); 2 such endpoints are ignored"
        );
    }

    /// Thousands of foreign endpoints make one problem, not one each.
    #[test]
    fn foreign_endpoints_are_reported_once_per_slice() {
        let endpoints: Vec<String> = (0..5000)
            .map(|i| format!("{{addresses: [10.0.0.1], targetRef: {{kind: Pod, name: p-{i}, namespace: shop}}}}"))
            .collect();
        let inputs = inputs(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: fake, namespace: evil}}\nspec: {{ports: [{{port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: fake-1, namespace: evil, labels: {{kubernetes.io/service-name: fake}}}}\naddressType: IPv4\nendpoints: [{}]\n",
            endpoints.join(", ")
        ));
        let mut report = crate::translate::Report::default();
        report_foreign(&inputs, &mut report);
        let messages: Vec<&str> = report.0.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "endpoints[0].targetRef.namespace \"shop\": an EndpointSlice names pods only in its own \
              namespace (evil); 5000 such endpoints are ignored"
            ]
        );
        assert!(SliceIndex::new(&inputs)
            .pods_of(&ObjectKey::new("evil", "fake"))
            .is_empty());
    }
}
