//! Which pods EndpointSlices name, for the selector-less Services whose members only slices
//! say: pod -> the slices naming it (with each slice's service and ports), and service -> its
//! slices. A pod's translation looks up its own entries instead of walking every slice of the
//! cluster (a cluster has at least one per Service); the incremental translator keeps one
//! index and updates it per changed slice, a full pass builds it once.
//!
//! The index holds every slice that names a pod, whatever its service: whether the service
//! has a selector (then the selector, not the slice, says who backs it) is looked up when a
//! pod asks, so a Service change needs no re-indexing, only its pods re-translated.

use std::collections::HashMap;

use crate::model::{EndpointSlice, Inputs, ObjectKey};

/// The label naming an EndpointSlice's Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A selector-less service a pod backs, with the slice's port names and numbers.
pub(crate) type SliceMembership<'a> = (&'a ObjectKey, &'a [(String, u32)]);

/// What one slice says.
struct Slice {
    service: ObjectKey,
    ports: Vec<(String, u32)>,
    /// The pods its endpoints' targetRefs name (a targetRef may name another namespace).
    pods: Vec<ObjectKey>,
}

/// EndpointSlices by the pods and services they name.
#[derive(Default)]
pub(crate) struct SliceIndex {
    slices: HashMap<ObjectKey, Slice>,
    /// The slices naming each pod, sorted by key: the order a full pass visits them in (a
    /// later slice's ports win when two slices of one service name the pod).
    by_pod: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// The slices of each service (by its label), sorted.
    by_service: HashMap<ObjectKey, Vec<ObjectKey>>,
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
        if let Some(old) = self.slices.remove(key) {
            for pod in &old.pods {
                unlist(&mut self.by_pod, pod, key);
            }
            unlist(&mut self.by_service, &old.service, key);
        }
        let Some(new) = slice.and_then(|s| read(key, s)) else {
            return;
        };
        for pod in &new.pods {
            list(&mut self.by_pod, pod, key);
        }
        list(&mut self.by_service, &new.service, key);
        self.slices.insert(key.clone(), new);
    }

    /// The selector-less services whose slices name `pod`, with each slice's ports, in slice
    /// key order; services that do not exist or have a selector are left out.
    pub(crate) fn memberships<'a>(
        &'a self,
        inputs: &'a Inputs,
        pod: &ObjectKey,
    ) -> impl Iterator<Item = SliceMembership<'a>> + 'a {
        let keys = self.by_pod.get(pod).map_or(&[][..], Vec::as_slice);
        keys.iter()
            .filter_map(|k| self.slices.get(k))
            .filter(|s| !has_selector(inputs, &s.service))
            .map(|s| (&s.service, s.ports.as_slice()))
    }

    /// The pods the slices of service `service` name.
    pub(crate) fn pods_of(&self, service: &ObjectKey) -> impl Iterator<Item = &ObjectKey> {
        let keys = self.by_service.get(service).map_or(&[][..], Vec::as_slice);
        keys.iter()
            .filter_map(|k| self.slices.get(k))
            .flat_map(|s| s.pods.iter())
    }
}

/// A slice's service, ports and pods; `None` when it names no service or no pod.
fn read(key: &ObjectKey, slice: &EndpointSlice) -> Option<Slice> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let mut pods: Vec<ObjectKey> = slice_pods(key, slice).collect();
    if pods.is_empty() {
        return None;
    }
    pods.sort();
    pods.dedup();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u32::try_from(p.port?).ok()?)))
        .collect();
    Some(Slice {
        service: ObjectKey::new(key.namespace.clone(), name.clone()),
        ports,
        pods,
    })
}

/// The pods an EndpointSlice's endpoints name (targetRef of kind Pod; without a namespace,
/// the slice's own).
pub(crate) fn slice_pods<'a>(key: &'a ObjectKey, slice: &'a EndpointSlice) -> impl Iterator<Item = ObjectKey> + 'a {
    slice
        .endpoints
        .iter()
        .filter_map(|ep| ep.target_ref.as_ref())
        .filter(|t| t.kind.as_deref() == Some("Pod"))
        .map(|t| {
            ObjectKey::new(
                t.namespace.clone().unwrap_or_else(|| key.namespace.clone()),
                t.name.clone().unwrap_or_default(),
            )
        })
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

fn list(map: &mut HashMap<ObjectKey, Vec<ObjectKey>>, at: &ObjectKey, slice: &ObjectKey) {
    let keys = map.entry(at.clone()).or_default();
    if let Err(i) = keys.binary_search(slice) {
        keys.insert(i, slice.clone());
    }
}

fn unlist(map: &mut HashMap<ObjectKey, Vec<ObjectKey>>, at: &ObjectKey, slice: &ObjectKey) {
    let Some(keys) = map.get_mut(at) else { return };
    if let Ok(i) = keys.binary_search(slice) {
        keys.remove(i);
    }
    if keys.is_empty() {
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
        index.memberships(inputs, &key).map(|(_, p)| p[0].1).collect()
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
        let mut service: Vec<_> = index.pods_of(&ObjectKey::new("a", "db")).cloned().collect();
        service.sort();
        assert_eq!(
            service,
            [
                ObjectKey::new("a", "p"),
                ObjectKey::new("b", "p"),
                ObjectKey::new("b", "p")
            ]
        );

        let Object::EndpointSlice(moved) = slice("db-1", 1, &["a/q"]) else {
            unreachable!()
        };
        index.update(&ObjectKey::new("a", "db-1"), Some(&moved));
        assert_eq!(ports(&index, &inputs, "a/p"), Vec::<u32>::new());
        assert_eq!(ports(&index, &inputs, "a/q"), [1]);
        index.update(&ObjectKey::new("a", "db-2"), None);
        assert_eq!(ports(&index, &inputs, "b/p"), Vec::<u32>::new());
        assert_eq!(index.by_pod.len(), 1, "no empty entries left behind");

        inputs.apply(object("apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: a}\nspec: {selector: {app: db}, ports: [{name: tcp, port: 5432}]}\n"));
        assert_eq!(ports(&index, &inputs, "a/q"), Vec::<u32>::new(), "the selector decides");
    }
}
