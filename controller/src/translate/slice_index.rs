//! Which pods EndpointSlices name, for the selector-less Services whose members only slices
//! say: pod -> the slices naming it, and service -> its slices. A pod's translation looks up
//! its own slices instead of walking every slice of the cluster (a cluster has at least one
//! per Service); the incremental translator keeps one index and updates it per changed
//! slice, a full pass builds it once.
//!
//! The index holds every slice that names a pod, whatever its service: whether the service
//! has a selector (then the selector, not the slice, says who backs it) is looked up when a
//! pod asks, so a Service change needs no re-indexing, only its pods re-translated.
//!
//! Pods are indexed by a keyed hash of their name, not a copy of it: at 100,000 pods the
//! copies were ~700,000 small long-lived allocations, scattered through a heap the start-up
//! had just freed, and held ~265 MiB of resident memory. A hash only narrows the search: a
//! candidate slice is kept only if the endpoint the hash points at (in the inputs) names the
//! pod — one comparison, not a pass over the slice's endpoints (100 pods of 100-endpoint
//! slices made that 4 s of a 100k-pod translation).

use std::collections::HashMap;
use std::hash::BuildHasher;

use k8s_openapi::api::discovery::v1::Endpoint;

use crate::model::{EndpointSlice, Inputs, ObjectKey};

/// The label naming an EndpointSlice's Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A selector-less service a pod backs, with the slice's port names and numbers.
pub(crate) type SliceMembership<'a> = (&'a ObjectKey, &'a [(String, u32)]);

/// What one slice says.
struct Slice {
    key: ObjectKey,
    service: ObjectKey,
    ports: Vec<(String, u32)>,
    /// Hash of each pod its endpoints' targetRefs name, and the endpoint's position; sorted.
    pods: Vec<(u64, u32)>,
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
        for (key, slice) in &inputs.endpoint_slices {
            index.update(key, Some(slice));
        }
        index
    }

    /// Brings slice `key` up to date: `slice` is what it is now (`None`: deleted).
    pub(crate) fn update(&mut self, key: &ObjectKey, slice: Option<&EndpointSlice>) {
        if let Some(id) = self.ids.remove(key) {
            if let Some(old) = self.slots.get_mut(id as usize).and_then(Option::take) {
                for (pod, _) in &old.pods {
                    unlist_pod(&mut self.by_pod, *pod, id);
                }
                unlist(&mut self.by_service, &old.service, id);
            }
            self.free.push(id);
        }
        let Some(new) = slice.and_then(|s| self.read(key, s)) else {
            return;
        };
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        for (pod, _) in &new.pods {
            list_pod(&mut self.by_pod, *pod, id);
        }
        list(&mut self.by_service, &new.service, id);
        self.ids.insert(key.clone(), id);
        if let Some(slot) = self.slots.get_mut(id as usize) {
            *slot = Some(new);
        }
    }

    /// The selector-less services whose slices name `pod`, with each slice's ports, in slice
    /// key order; services that do not exist or have a selector are left out.
    pub(crate) fn memberships<'a>(&'a self, inputs: &'a Inputs, pod: &ObjectKey) -> Vec<SliceMembership<'a>> {
        let hash = self.hasher.hash_one(pod);
        let ids = match self.by_pod.get(&hash) {
            None => &[][..],
            Some(Ids::One(id)) => std::slice::from_ref(id),
            Some(Ids::Many(ids)) => ids.as_slice(),
        };
        let mut slices: Vec<&Slice> = ids
            .iter()
            .filter_map(|id| self.slot(*id))
            .filter(|s| {
                inputs
                    .endpoint_slices
                    .get(&s.key)
                    .is_some_and(|e| s.names(e, hash, pod))
            })
            .filter(|s| !has_selector(inputs, &s.service))
            .collect();
        slices.sort_by(|a, b| a.key.cmp(&b.key));
        slices.into_iter().map(|s| (&s.service, s.ports.as_slice())).collect()
    }

    /// The pods the slices of service `service` name.
    pub(crate) fn pods_of(&self, inputs: &Inputs, service: &ObjectKey) -> Vec<ObjectKey> {
        let ids = self.by_service.get(service).map_or(&[][..], Vec::as_slice);
        ids.iter()
            .filter_map(|id| self.slot(*id))
            .filter_map(|s| Some((&s.key, inputs.endpoint_slices.get(&s.key)?)))
            .flat_map(|(k, e)| slice_pods(k, e))
            .collect()
    }

    fn slot(&self, id: u32) -> Option<&Slice> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// A slice's service, ports and pods; `None` when it names no service or no pod.
    fn read(&self, key: &ObjectKey, slice: &EndpointSlice) -> Option<Slice> {
        let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let mut pods: Vec<(u64, u32)> = targets(key, slice)
            .filter_map(|(at, ns, name)| {
                Some((self.hasher.hash_one(ObjectKey::new(ns, name)), u32::try_from(at).ok()?))
            })
            .collect();
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
        Some(Slice {
            key: key.clone(),
            service: ObjectKey::new(key.namespace.clone(), name.clone()),
            ports,
            pods,
        })
    }
}

impl Slice {
    /// Whether `slice` (this slice as the inputs hold it) names `pod`, whose hash is `hash`:
    /// the endpoints the hash points at are compared.
    fn names(&self, slice: &EndpointSlice, hash: u64, pod: &ObjectKey) -> bool {
        let from = self.pods.partition_point(|(h, _)| *h < hash);
        self.pods[from..]
            .iter()
            .take_while(|(h, _)| *h == hash)
            .filter_map(|(_, at)| target(&self.key, slice.endpoints.get(*at as usize)?))
            .any(|(ns, name)| ns == pod.namespace && name == pod.name)
    }
}

/// An endpoint's targetRef of kind Pod, as (namespace, name); without a namespace, the
/// slice's own.
fn target<'a>(key: &'a ObjectKey, endpoint: &'a Endpoint) -> Option<(&'a str, &'a str)> {
    let t = endpoint
        .target_ref
        .as_ref()
        .filter(|t| t.kind.as_deref() == Some("Pod"))?;
    let ns = t.namespace.as_deref().unwrap_or(&key.namespace);
    Some((ns, t.name.as_deref().unwrap_or_default()))
}

/// The Pod targetRefs of a slice's endpoints, with the endpoints' positions.
fn targets<'a>(key: &'a ObjectKey, slice: &'a EndpointSlice) -> impl Iterator<Item = (usize, &'a str, &'a str)> + 'a {
    let endpoints = slice.endpoints.iter().enumerate();
    endpoints.filter_map(|(at, ep)| target(key, ep).map(|(ns, name)| (at, ns, name)))
}

/// The pods an EndpointSlice's endpoints name.
pub(crate) fn slice_pods<'a>(key: &'a ObjectKey, slice: &'a EndpointSlice) -> impl Iterator<Item = ObjectKey> + 'a {
    targets(key, slice).map(|(_, ns, name)| ObjectKey::new(ns, name))
}

/// Whether service `key` exists and has a non-empty selector.
fn has_selector(inputs: &Inputs, key: &ObjectKey) -> bool {
    inputs
        .services
        .get(key)
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
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

    fn ports(index: &SliceIndex, inputs: &Inputs, pod: &str) -> Vec<u32> {
        let (ns, name) = pod.split_once('/').unwrap();
        let key = ObjectKey::new(ns, name);
        index
            .memberships(inputs, &key)
            .into_iter()
            .map(|(_, p)| p[0].1)
            .collect()
    }

    /// Updates replace a slice's entries, removals withdraw them, members in other namespaces
    /// count, memberships come in slice key order, and a service with a selector has none.
    #[test]
    fn updates_removals_and_selectors() {
        let mut inputs = Inputs::default();
        inputs.apply(object("apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: a}\nspec: {ports: [{name: tcp, port: 5432}]}\n"));
        for o in [slice("db-2", 2, &["b/p"]), slice("db-1", 1, &["a/p", "b/p"])] {
            inputs.apply(o);
        }
        let mut index = SliceIndex::new(&inputs);
        assert_eq!(ports(&index, &inputs, "b/p"), [1, 2]);
        assert_eq!(ports(&index, &inputs, "a/p"), [1]);
        let mut service = index.pods_of(&inputs, &ObjectKey::new("a", "db"));
        service.sort();
        assert_eq!(
            service,
            [
                ObjectKey::new("a", "p"),
                ObjectKey::new("b", "p"),
                ObjectKey::new("b", "p")
            ]
        );

        inputs.apply(slice("db-1", 1, &["a/q"]));
        let key = ObjectKey::new("a", "db-1");
        index.update(&key, inputs.endpoint_slices.get(&key));
        assert_eq!(ports(&index, &inputs, "a/p"), Vec::<u32>::new());
        assert_eq!(ports(&index, &inputs, "a/q"), [1]);
        let key = ObjectKey::new("a", "db-2");
        inputs.endpoint_slices.remove(&key);
        index.update(&key, None);
        assert_eq!(ports(&index, &inputs, "b/p"), Vec::<u32>::new());
        assert_eq!(index.by_pod.len(), 1, "no empty entries left behind");
        assert_eq!(index.by_service.len(), 1);
        // A pod whose hash met db-1's (as a collision would): db-1 does not name it.
        let stranger = index.hasher.hash_one(ObjectKey::new("c", "x"));
        list_pod(&mut index.by_pod, stranger, index.ids[&ObjectKey::new("a", "db-1")]);
        assert_eq!(ports(&index, &inputs, "c/x"), Vec::<u32>::new());

        inputs.apply(object("apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: a}\nspec: {selector: {app: db}, ports: [{name: tcp, port: 5432}]}\n"));
        assert_eq!(ports(&index, &inputs, "a/q"), Vec::<u32>::new(), "the selector decides");
    }
}
