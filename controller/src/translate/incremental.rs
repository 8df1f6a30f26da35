//! Incremental translation: the same outputs as [`super::translate_synced`], recomputed only
//! where a change can reach them. The per-object functions of the translation modules
//! (`workload::PodContext::pod`, `service::translate_one`, `authz::translate` on one policy)
//! are called as they are, so their behaviour flows through unchanged; this module only
//! tracks what depends on what:
//!
//! - a pod -> its workload (and, with PeerAuthentications, the pods their precedence moves);
//! - a Service -> its address and the pods its old or new selector (or its EndpointSlices)
//!   name, whose workloads list it;
//! - an AuthorizationPolicy -> its authorization and the pods its old or new selector picks
//!   (their workloads list the policy);
//! - a Namespace -> its pods and services (waypoint and ingress labels);
//! - EndpointSlices -> the pods they name, and their entries in the slice index
//!   ([`super::slice_index`]) a pod's translation looks its selector-less services up in (so
//!   a pod change reads its own slices, not every slice of the cluster) and their problem
//!   (naming pods in other namespaces, which are ignored); the enrolled set ->
//!   the pods entering or leaving it;
//! - ServiceEntries, WorkloadEntries and WorkloadGroups -> their layer ([`super::entries`]:
//!   the entries' services and workloads), recomputed as a whole (few objects) whenever
//!   something it reads changed (an entry, a Service's key or VIP, a selector policy, the
//!   tail); the pods an entry's `workloadSelector` picked or picks, whose workloads list its
//!   hosts;
//! - everything else (Gateways, routes, waypoint policies, ingress, telemetry, kind states)
//!   -> the "tail": routes, waypoint policies, ingress gateways and waypoints, recomputed as a
//!   whole (few objects); when the waypoints' addresses change, every pod and service.
//!
//! - remote clusters and east-west gateways -> the multicluster layer
//!   ([`super::remote::layer`]) over the local addresses: each remote translated on its own
//!   and cached until a change to it is noted; the names a local change wrote are merged
//!   again (and the services whose gateway identities or remote contributions they move),
//!   everything on another network when the gateways change; cluster statuses and the
//!   merge's problems from its indexes, not a pass over the addresses.
//!
//! When in doubt it translates from scratch: the first time, on a relist (`Replace`), on a
//! MeshConfig change or a change of this cluster's network. The property test
//! (`controller/tests/incremental.rs`) checks, for random change sequences (remote clusters
//! and east-west gateways among them), that the outputs equal a full translation after
//! every step.
//!
//! The outputs are kept in two copies that alternate: the one published (shared with the
//! admin dump) and a spare brought up to date from the names the last step touched, so a
//! change costs what it touches, not a copy of the world.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_proto::security::Authorization;
use mesh_proto::workload as pb;

use super::attach::{self, Attachments, Waypoint};
use super::remote::layer::{self, Layer};
use super::service_entry::Selector;
use super::slice_index::{foreign, slice_pods, SliceIndex, SERVICE_NAME_LABEL};
use super::workload::{self, PodContext};
use super::{authz, peer_authn, service, Options, Outputs, Problem, Report, Selected};
use crate::mesh_config::OutboundMode;
use crate::model::{in_namespace, Inputs, Kind, Object, ObjectKey, Pod, Service};
use crate::source::{Change, KindSync};

/// Names whose resources a step may have changed (the snapshot re-encodes only these).
#[derive(Clone, Debug, Default)]
pub struct Touched {
    pub addresses: BTreeSet<String>,
    pub authorizations: BTreeSet<String>,
    /// Routes, waypoint policies, ingress gateways and waypoints were recomputed as a whole.
    pub tail: bool,
}

/// One step's result: the outputs and what changed (`None`: anything may have).
pub struct Step {
    pub outputs: Arc<Outputs>,
    pub touched: Option<Touched>,
}

/// What the changes seen since the last step make dirty.
#[derive(Default)]
struct Pending {
    full: bool,
    pods: BTreeSet<ObjectKey>,
    services: BTreeSet<ObjectKey>,
    policies: BTreeSet<ObjectKey>,
    namespaces: BTreeSet<String>,
    /// (namespace, selector) of services as they were or are: their pods list the service.
    selectors: Vec<(String, BTreeMap<String, String>)>,
    tail: bool,
    /// Every pod is dirty (the waypoints changed): no need to look for the ones a selector
    /// picks.
    all_pods: bool,
    /// Pods, PeerAuthentications or namespaces changed: PeerAuthentication is recomputed.
    peer: bool,
    /// EndpointSlices changed: their entries in the slice index are brought up to date.
    slices: BTreeSet<ObjectKey>,
    /// An entry, or a selector policy their workloads list, changed: the entries' layer is
    /// recomputed.
    entries: bool,
}

/// What one policy translated to.
#[derive(Default)]
struct PolicyOut {
    authorizations: BTreeMap<String, Authorization>,
    selected: Vec<Selected>,
    problems: Vec<Problem>,
}

/// Where a cached problem came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    Pod(ObjectKey),
    Service(ObjectKey),
    Ip(IpAddr),
    /// An EndpointSlice naming pods in other namespaces.
    Slice(ObjectKey),
    Peer,
    Unreadable,
    Entries,
    Tail,
}

/// The incremental translator; feed it every change ([`Incremental::note`]) before applying
/// it to the inputs, then call [`Incremental::step`] with the updated inputs.
pub struct Incremental {
    /// The options given; `options` are those in force ([`super::remote::local_options`]).
    base: Options,
    options: Options,
    pending: Pending,
    /// False until a from-scratch pass filled the caches (and after a fallback).
    valid: bool,
    out: Arc<Outputs>,
    /// The previously published outputs, if given back, and what changed since them.
    spare: Option<Outputs>,
    last: Option<Touched>,
    /// Address of the outputs published before `out` (the only ones `recycle` keeps).
    before: usize,
    /// The multicluster merge over the local addresses (remote clusters, network gateways).
    layer: Layer,
    policies: BTreeMap<ObjectKey, PolicyOut>,
    peer: authz::Output,
    unreadable: BTreeMap<String, Authorization>,
    selected: Vec<Selected>,
    waypoints: BTreeMap<ObjectKey, Waypoint>,
    /// Each pod's IPs (eligible, not host-network) and the pods holding each IP.
    pod_ips: HashMap<ObjectKey, Vec<IpAddr>>,
    ip_pods: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    /// Which pods EndpointSlices name: a pod change looks up its own slices.
    slices: SliceIndex,
    /// The names of the addresses the entries' layer wrote, and its selectors.
    entry_names: BTreeSet<String>,
    entry_selectors: Vec<Selector>,
    problems: BTreeMap<Origin, Vec<Problem>>,
}

impl Incremental {
    pub fn new(options: Options) -> Self {
        Incremental {
            base: options.clone(),
            options,
            pending: Pending::default(),
            valid: false,
            out: Arc::new(Outputs::default()),
            spare: None,
            last: None,
            before: 0,
            layer: Layer::default(),
            policies: BTreeMap::new(),
            peer: authz::Output::default(),
            unreadable: BTreeMap::new(),
            selected: Vec::new(),
            waypoints: BTreeMap::new(),
            pod_ips: HashMap::new(),
            ip_pods: HashMap::new(),
            slices: SliceIndex::default(),
            entry_names: BTreeSet::new(),
            entry_selectors: Vec::new(),
            problems: BTreeMap::new(),
        }
    }

    /// Forgets what the caches hold: the next step translates from scratch (after a step
    /// that did not finish).
    pub fn invalidate(&mut self) {
        self.valid = false;
        self.layer.invalidate();
    }

    /// How many times a remote cluster's translation was brought up to date (a local change
    /// brings none).
    pub fn remote_translations(&self) -> u64 {
        self.layer.translated()
    }

    /// How many names the multicluster merge went over in the last step (a change merges the
    /// names it reaches, not every remote one).
    pub fn merged_names(&self) -> usize {
        self.layer.merged()
    }

    /// How many times the remote clusters' part of the merge was computed whole (a remote
    /// pod's or service's change that clashes with nothing patches it).
    pub fn remote_parts(&self) -> u64 {
        self.layer.parts()
    }

    /// Records what `change` makes dirty; `inputs` are the inputs before it is applied.
    pub fn note(&mut self, inputs: &Inputs, change: &Change) {
        let p = &mut self.pending;
        match change {
            Change::Apply(o) => note_object(p, inputs, o.kind(), &o.key(), Some(o)),
            Change::Delete(kind, key) => note_object(p, inputs, *kind, key, None),
            Change::Replace(..) | Change::MeshConfig(_) => p.full = true,
            // Remote clusters (issue 17): their own translation and the merge ([`Layer`]).
            Change::Cluster(c) => self.layer.note(inputs, c),
            Change::Synced => {}
            Change::Enrolled(now) => {
                p.pods.extend(now.symmetric_difference(&inputs.enrolled).cloned());
            }
            Change::KindState(..) => p.tail = true,
        }
    }

    /// Gives back outputs this translator published before: the one before the current
    /// becomes the spare copy, brought up to date at the next step instead of cloned.
    pub fn recycle(&mut self, outputs: Arc<Outputs>) {
        if Arc::as_ptr(&outputs) as usize != self.before {
            return;
        }
        if let Ok(o) = Arc::try_unwrap(outputs) {
            self.spare = Some(o);
        }
    }

    /// Translates what the changes noted since the last step reach.
    pub fn step(&mut self, inputs: &Inputs, states: &BTreeMap<Kind, KindSync>) -> Step {
        let pending = std::mem::take(&mut self.pending);
        let options = super::remote::local_options(inputs, &self.base);
        let network_changed = options.network != self.options.network;
        self.options = options;
        let full = pending.full || !self.valid || network_changed;
        let started = Instant::now();
        let mut pending = if full { self.everything(inputs) } else { pending };
        for key in &pending.slices {
            self.slices.update(inputs, key);
        }
        // Slices naming pods in other namespaces: reported per slice, those changed (or all).
        let reported: Box<dyn Iterator<Item = &ObjectKey>> = if full {
            Box::new(inputs.endpoint_slices.keys())
        } else {
            Box::new(pending.slices.iter())
        };
        for key in reported {
            let mut report = Report::default();
            if let Some(message) = inputs.endpoint_slices.get(key).and_then(|s| foreign(key, s)) {
                report.add(Kind::EndpointSlice, key, message);
            }
            set_problems(&mut self.problems, Origin::Slice(key.clone()), report.0);
        }
        let mut touched = Touched::default();
        let mut updates: BTreeMap<String, Option<pb::Address>> = BTreeMap::new();
        let tail = (pending.tail || full).then(|| self.tail(inputs, states, &mut pending));
        self.authorizations(inputs, states, &mut pending, &mut touched);
        self.services(inputs, &mut pending, &mut updates);
        if full || pending.entries || tail.is_some() || !pending.services.is_empty() {
            self.entries(inputs, &mut pending, &mut updates, full);
        }
        let pods = pending.pods.len();
        self.pods(inputs, &pending, &mut updates);
        touched.addresses = updates.keys().cloned().collect();
        touched.tail = tail.is_some();
        let translated = started.elapsed();
        let mut work = self.work(full);
        self.assemble(&mut work, updates, &touched, tail);
        let assembled = started.elapsed();
        let ctx = layer::Ctx {
            inputs,
            options: &self.options,
            previous: &self.out.addresses,
            full,
        };
        let written = self.layer.step(&ctx, &mut work, &touched.addresses);
        touched.addresses.extend(written);
        tracing::debug!(
            full,
            pods,
            addresses = touched.addresses.len(),
            authorizations = touched.authorizations.len(),
            tail = touched.tail,
            translate_us = translated.as_micros() as u64,
            assemble_us = (assembled - translated).as_micros() as u64,
            merge_us = (started.elapsed() - assembled).as_micros() as u64,
            "incremental step"
        );
        self.valid = true;
        self.before = Arc::as_ptr(&self.out) as usize;
        self.out = Arc::new(work);
        self.last = (!full).then(|| touched.clone());
        Step {
            outputs: self.out.clone(),
            touched: (!full).then_some(touched),
        }
    }

    /// Makes the spare copy of the outputs after a from-scratch step, off the path of the
    /// next change (which would otherwise copy the world first).
    pub fn prepare(&mut self) {
        if self.valid && self.last.is_none() {
            self.spare = Some((*self.out).clone());
            self.last = Some(Touched::default());
        }
    }

    /// Writes a step's results into the outputs being built.
    fn assemble(
        &self,
        work: &mut Outputs,
        updates: BTreeMap<String, Option<pb::Address>>,
        touched: &Touched,
        tail: Option<Outputs>,
    ) {
        for (name, a) in updates {
            match a {
                Some(a) => drop(work.addresses.insert(name, Arc::new(a))),
                None => drop(work.addresses.remove(&name)),
            }
        }
        for name in &touched.authorizations {
            match self.authorization(name) {
                Some(a) => drop(work.authorizations.insert(name.clone(), a.clone())),
                None => drop(work.authorizations.remove(name)),
            }
        }
        if let Some(t) = tail {
            work.service_routes = t.service_routes;
            work.waypoint_policies = t.waypoint_policies;
            work.ingress = t.ingress;
            work.waypoints = t.waypoints;
            work.waypoint_credentials = t.waypoint_credentials;
        }
        work.problems = self.problems();
    }

    /// The outputs to update: the spare brought up to date, else a copy of the current ones.
    fn work(&mut self, full: bool) -> Outputs {
        let (spare, last) = (self.spare.take(), self.last.take());
        let (Some(mut o), Some(last), false) = (spare, last, full) else {
            return if full { Outputs::default() } else { (*self.out).clone() };
        };
        let cur = &self.out;
        for name in &last.addresses {
            match cur.addresses.get(name) {
                Some(a) => drop(o.addresses.insert(name.clone(), a.clone())),
                None => drop(o.addresses.remove(name)),
            }
        }
        for name in &last.authorizations {
            match cur.authorizations.get(name) {
                Some(a) => drop(o.authorizations.insert(name.clone(), a.clone())),
                None => drop(o.authorizations.remove(name)),
            }
        }
        if last.tail {
            o.service_routes = cur.service_routes.clone();
            o.waypoint_policies = cur.waypoint_policies.clone();
            o.ingress = cur.ingress.clone();
            o.waypoints = cur.waypoints.clone();
            o.waypoint_credentials = cur.waypoint_credentials.clone();
        }
        o
    }

    /// A from-scratch pass: every cache cleared, every object dirty.
    fn everything(&mut self, inputs: &Inputs) -> Pending {
        self.policies.clear();
        self.peer = authz::Output::default();
        self.unreadable.clear();
        self.selected.clear();
        self.waypoints.clear();
        self.pod_ips.clear();
        self.ip_pods.clear();
        self.slices = SliceIndex::new(inputs);
        self.entry_names.clear();
        self.entry_selectors.clear();
        self.problems.clear();
        self.spare = None;
        self.last = None;
        Pending {
            full: true,
            pods: inputs.pods.keys().cloned().collect(),
            services: inputs.services.keys().cloned().collect(),
            policies: inputs.authorization_policies.keys().cloned().collect(),
            tail: true,
            peer: true,
            ..Pending::default()
        }
    }

    /// The final authorization of `name`: kind-level stand-ins win over PeerAuthentication's,
    /// which win over AuthorizationPolicies' (as `translate_synced` extends them).
    fn authorization(&self, name: &str) -> Option<&Authorization> {
        self.unreadable
            .get(name)
            .or_else(|| self.peer.policies.get(name))
            .or_else(|| {
                let key = name.split_once('/').map(|(ns, n)| ObjectKey::new(ns, n))?;
                self.policies.get(&key)?.authorizations.get(name)
            })
            .or_else(|| {
                // A policy whose output is named otherwise than its key.
                self.policies.values().find_map(|p| p.authorizations.get(name))
            })
    }

    /// Routes, waypoint policies, ingress, waypoints; marks every pod and service dirty when
    /// the waypoints pods and services attach to changed.
    fn tail(&mut self, inputs: &Inputs, states: &BTreeMap<Kind, KindSync>, pending: &mut Pending) -> Outputs {
        let options = &self.options;
        let mut report = Report::default();
        let waypoints = attach::waypoints(inputs, options, &mut report);
        let key = |w: &BTreeMap<ObjectKey, Waypoint>| -> Vec<_> {
            w.iter()
                .map(|(k, w)| {
                    let allowed = w.hbone.as_ref().and_then(|l| l.allowed_routes.clone());
                    (k.clone(), w.deployment.waypoint_for, w.address.clone(), allowed)
                })
                .collect()
        };
        if key(&waypoints) != key(&self.waypoints) {
            pending.pods.extend(inputs.pods.keys().cloned());
            pending.services.extend(inputs.services.keys().cloned());
            pending.all_pods = true;
        }
        let (service_routes, mut waypoint_policies) = super::routes::translate(inputs, options, &mut report);
        waypoint_policies.extend(super::rate_limit::translate(inputs, &mut report));
        waypoint_policies.extend(super::telemetry::translate(inputs, options, &mut report));
        waypoint_policies.extend(super::waypoint_policy::unreadable_kinds(inputs, states, options));
        let ingress = super::ingress::translate(inputs, options, &mut report);
        let attach = Attachments::new(inputs, &waypoints, options, &mut report);
        let waypoint_credentials =
            super::upstream_tls::credentials(inputs, options, &attach, &service_routes, &mut report);
        super::unimplemented::report(inputs, &mut report);
        let out = Outputs {
            waypoint_credentials,
            service_routes,
            waypoint_policies,
            ingress,
            waypoints: waypoints
                .iter()
                .map(|(k, w)| (k.clone(), w.deployment.clone()))
                .collect(),
            ..Outputs::default()
        };
        self.waypoints = waypoints;
        set_problems(&mut self.problems, Origin::Tail, report.0);
        out
    }

    /// AuthorizationPolicies (one at a time), PeerAuthentications and kind-level stand-ins;
    /// the pods whose selector policies changed become dirty.
    fn authorizations(
        &mut self,
        inputs: &Inputs,
        states: &BTreeMap<Kind, KindSync>,
        pending: &mut Pending,
        touched: &mut Touched,
    ) {
        let options = &self.options;
        let mut changed: Vec<Selected> = Vec::new();
        for key in std::mem::take(&mut pending.policies) {
            let old = self.policies.remove(&key).unwrap_or_default();
            let new = match inputs.authorization_policies.get(&key) {
                Some(policy) => {
                    let mut one = Inputs::default();
                    one.authorization_policies.insert(key.clone(), policy.clone());
                    let mut report = Report::default();
                    let out = authz::translate(&one, options, &mut report);
                    PolicyOut {
                        authorizations: out.policies,
                        selected: out.selected,
                        problems: report.0,
                    }
                }
                None => PolicyOut::default(),
            };
            touched.authorizations.extend(old.authorizations.keys().cloned());
            touched.authorizations.extend(new.authorizations.keys().cloned());
            changed.extend(selected_diff(&old.selected, &new.selected));
            if inputs.authorization_policies.contains_key(&key) {
                self.policies.insert(key, new);
            }
        }
        let peer_now =
            !inputs.peer_authentications.is_empty() || !self.peer.policies.is_empty() || !self.peer.selected.is_empty();
        if pending.peer && peer_now {
            let mut report = Report::default();
            let new = peer_authn::translate(inputs, options, &mut report);
            names_diff(&self.peer.policies, &new.policies, &mut touched.authorizations);
            changed.extend(selected_diff(&self.peer.selected, &new.selected));
            self.peer = new;
            set_problems(&mut self.problems, Origin::Peer, report.0);
        }
        let mut report = Report::default();
        let unreadable = authz::unreadable_kinds(states, options, &mut report);
        names_diff(&self.unreadable, &unreadable, &mut touched.authorizations);
        self.unreadable = unreadable;
        set_problems(&mut self.problems, Origin::Unreadable, report.0);
        if !changed.is_empty() {
            pending.entries = true; // workload entries list the policies selecting them
            self.selected = self
                .policies
                .values()
                .flat_map(|p| p.selected.iter().cloned())
                .collect();
            self.selected.extend(self.peer.selected.iter().cloned());
            // (A from-scratch pass has every pod dirty already.)
            for s in changed.iter().filter(|_| !pending.full) {
                pending.pods.extend(selected_pods(inputs, s, &options.root_namespace));
            }
        }
    }

    /// Dirty services (and those of dirty namespaces); the pods they select become dirty.
    fn services(
        &mut self,
        inputs: &Inputs,
        pending: &mut Pending,
        updates: &mut BTreeMap<String, Option<pb::Address>>,
    ) {
        for ns in std::mem::take(&mut pending.namespaces) {
            pending
                .pods
                .extend(in_namespace(&inputs.pods, &ns).map(|(k, _)| k.clone()));
            pending
                .services
                .extend(in_namespace(&inputs.services, &ns).map(|(k, _)| k.clone()));
        }
        let options = &self.options;
        let attach = Attachments::new(inputs, &self.waypoints, options, &mut Report::default());
        for key in &pending.services {
            let hostname = super::service_hostname(&key.name, &key.namespace, options);
            let name = format!("{}/{hostname}", key.namespace);
            let mut report = Report::default();
            let svc = inputs.services.get(key);
            let translated = svc.and_then(|s| service::translate_one(inputs, options, &attach, key, s, &mut report));
            updates.insert(
                name,
                translated.map(|s| pb::Address {
                    r#type: Some(pb::address::Type::Service(s)),
                }),
            );
            set_problems(&mut self.problems, Origin::Service(key.clone()), report.0);
            if let Some(sel) = svc.and_then(selector) {
                pending.selectors.push((key.namespace.clone(), sel.clone()));
            }
            self.slices.service_changed(inputs, key);
            if !pending.full {
                pending.pods.extend(self.slices.pods_of(key));
            }
        }
        if pending.full || pending.all_pods {
            return; // every pod is dirty already
        }
        for (ns, sel) in std::mem::take(&mut pending.selectors) {
            let pods = in_namespace(&inputs.pods, &ns)
                .filter(|(_, p)| crate::model::selects(&sel, p.metadata.labels.as_ref()))
                .map(|(k, _)| k.clone());
            pending.pods.extend(pods.collect::<Vec<_>>());
        }
    }

    /// The entries' layer, recomputed whole: its addresses go into `updates` where they
    /// changed (or are gone), and the pods an entry selector picked or picks become dirty
    /// when the selectors changed.
    fn entries(
        &mut self,
        inputs: &Inputs,
        pending: &mut Pending,
        updates: &mut BTreeMap<String, Option<pb::Address>>,
        full: bool,
    ) {
        let none = inputs.service_entries.is_empty() && inputs.workload_entries.is_empty();
        if none && self.entry_names.is_empty() && self.entry_selectors.is_empty() {
            // The last entry may have left only problems (a missing group, a taken host).
            self.problems.remove(&Origin::Entries);
            return;
        }
        let options = &self.options;
        let old = std::mem::take(&mut self.entry_names);
        let mut report = Report::default();
        let new = {
            // A Kubernetes Service's address as this step leaves it (never the entries' own),
            // as the local translation made it: not what the multicluster merge added.
            let (out, updates, layer) = (&self.out, &*updates, &self.layer);
            let service = |name: &str| match updates.get(name) {
                Some(a) => a.as_ref(),
                None if full || old.contains(name) => None,
                None => layer.local(&out.addresses, name),
            };
            let mut taken = super::entries::Taken::default();
            for key in inputs.services.keys() {
                let name = format!(
                    "{}/{}",
                    key.namespace,
                    super::service_hostname(&key.name, &key.namespace, options)
                );
                if let Some(a) = service(&name) {
                    taken.add(&name, a);
                }
            }
            let attach = Attachments::new(inputs, &self.waypoints, options, &mut Report::default());
            super::entries::translate(inputs, options, &attach, &taken, &self.selected, &mut report)
        };
        for gone in old.iter().filter(|n| !new.addresses.contains_key(*n)) {
            updates.entry(gone.clone()).or_insert(None);
        }
        for (name, a) in new.addresses {
            // Unchanged, and no Service of this step wrote the name (a deleted one's `None`);
            // compared with the local value, since the published one may carry the merge's
            // additions and an entry can come to equal it.
            let same = !full
                && old.contains(&name)
                && !updates.contains_key(&name)
                && self
                    .layer
                    .local(&self.out.addresses, &name)
                    .is_some_and(|cur| *cur == a);
            self.entry_names.insert(name.clone());
            if !same {
                updates.insert(name, Some(a));
            }
        }
        if new.selectors != self.entry_selectors && !full && !pending.all_pods {
            for sel in self.entry_selectors.iter().chain(&new.selectors) {
                let picked = in_namespace(&inputs.pods, sel.namespace())
                    .filter(|(k, p)| sel.picks(k, p.metadata.labels.as_ref()))
                    .map(|(k, _)| k.clone());
                pending.pods.extend(picked.collect::<Vec<_>>());
            }
        }
        self.entry_selectors = new.selectors;
        set_problems(&mut self.problems, Origin::Entries, report.0);
    }

    /// Dirty pods: their workloads and duplicate-IP problems.
    fn pods(&mut self, inputs: &Inputs, pending: &Pending, updates: &mut BTreeMap<String, Option<pb::Address>>) {
        if pending.pods.is_empty() {
            return;
        }
        let options = &self.options;
        let attach = Attachments::new(inputs, &self.waypoints, options, &mut Report::default());
        let namespaces = pending.pods.iter().map(|k| k.namespace.as_str());
        let ctx = PodContext::of_namespaces(inputs, options, &attach, &self.selected, &self.slices, namespaces);
        let registry_only = inputs.mesh.outbound_traffic_policy.mode == OutboundMode::RegistryOnly;
        let keys: Vec<&ObjectKey> = pending.pods.iter().collect();
        let selectors = &self.entry_selectors;
        let translated = crate::parallel::map(&keys, |key| {
            let uid = workload::pod_uid(options, key);
            let mut report = Report::default();
            let w = inputs.pods.get(*key).and_then(|p| {
                let mut w = ctx.pod(key, p, &mut HashMap::new(), &mut report)?;
                super::service_entry::add_hosts(selectors, (key, p.metadata.labels.as_ref()), &mut w, &mut report);
                Some(w)
            });
            let mut one = BTreeMap::new();
            if let Some(w) = w {
                let address = pb::Address {
                    r#type: Some(pb::address::Type::Workload(w)),
                };
                one.insert(uid.clone(), address);
            }
            if registry_only {
                super::service_entry::registry_only(&mut one);
            }
            let address = one.remove(&uid);
            (uid, address, report.0)
        });
        self.index_pods(inputs, keys.into_iter().zip(translated), updates);
    }

    /// Records the pods' translations ([`Incremental::pods`]): their addresses into
    /// `updates`, their problems, and the IP index with the duplicate-address problems.
    fn index_pods<'k>(
        &mut self,
        inputs: &Inputs,
        translated: impl Iterator<Item = (&'k ObjectKey, (String, Option<pb::Address>, Vec<Problem>))>,
        updates: &mut BTreeMap<String, Option<pb::Address>>,
    ) {
        let mut ips_touched = BTreeSet::new();
        for (key, (uid, address, problems)) in translated {
            let pod = inputs.pods.get(key);
            updates.insert(uid, address);
            set_problems(&mut self.problems, Origin::Pod(key.clone()), problems);
            // The IP index: out with the old addresses, in with the new.
            for ip in self.pod_ips.remove(key).unwrap_or_default() {
                if let Some(holders) = self.ip_pods.get_mut(&ip) {
                    holders.remove(key);
                    if holders.is_empty() {
                        self.ip_pods.remove(&ip);
                    }
                }
                ips_touched.insert(ip);
            }
            let ips = pod.map(claimed_ips).unwrap_or_default();
            for ip in &ips {
                self.ip_pods.entry(*ip).or_default().insert(key.clone());
                ips_touched.insert(*ip);
            }
            if !ips.is_empty() {
                self.pod_ips.insert(key.clone(), ips);
            }
        }
        for ip in ips_touched {
            let mut report = Report::default();
            if let Some(holders) = self.ip_pods.get(&ip) {
                let mut it = holders.iter();
                if let Some(first) = it.next() {
                    it.for_each(|k| workload::duplicate_ip(k, ip, first, &mut report));
                }
            }
            set_problems(&mut self.problems, Origin::Ip(ip), report.0);
        }
    }

    /// Every cached problem, sorted and deduplicated as `translate_synced` leaves them.
    fn problems(&self) -> Vec<Problem> {
        let policies = self.policies.values().flat_map(|p| p.problems.iter());
        dedup(self.problems.values().flatten().chain(policies).cloned().collect())
    }
}

fn dedup(mut v: Vec<Problem>) -> Vec<Problem> {
    v.sort();
    v.dedup();
    v
}

fn set_problems(map: &mut BTreeMap<Origin, Vec<Problem>>, origin: Origin, problems: Vec<Problem>) {
    if problems.is_empty() {
        map.remove(&origin);
    } else {
        map.insert(origin, problems);
    }
}

/// Records the dirt of one object's change (`new` is `None` for a deletion).
fn note_object(p: &mut Pending, inputs: &Inputs, kind: Kind, key: &ObjectKey, new: Option<&Object>) {
    match (kind, new) {
        (Kind::Pod, Some(Object::Pod(pod))) if inputs.pods.get(key) == Some(pod) => {}
        (Kind::Pod, new) => {
            p.pods.insert(key.clone());
            p.peer = true;
            // DestinationRule subsets list the pods their labels select (routes::subset_workloads):
            // routes are recomputed when the pod was or is in one.
            let new_pod = match new {
                Some(Object::Pod(pod)) => Some(pod),
                _ => None,
            };
            let pods = || [inputs.pods.get(key), new_pod].into_iter().flatten();
            if pods().any(|pod| in_a_subset(inputs, pod)) {
                p.tail = true;
            }
            // An entry declaring the pod's IP is refused while the pod holds it.
            if pods().any(|pod| super::entries::declares_ip_of(inputs, pod)) {
                p.entries = true;
            }
        }
        (Kind::Service, Some(Object::Service(s))) if inputs.services.get(key) == Some(s) => {}
        (Kind::Service, _) => {
            if let Some(sel) = inputs.services.get(key).and_then(selector) {
                p.selectors.push((key.namespace.clone(), sel.clone()));
            }
            p.pods.extend(sliced_pods(inputs, key));
            p.services.insert(key.clone());
            p.tail = true;
        }
        (Kind::Namespace, Some(Object::Namespace(n))) if inputs.namespaces.get(&key.name) == Some(n) => {}
        // The system namespace's network label is every workload's and VIP's network (issue 17).
        (Kind::Namespace, new)
            if network_label(inputs.namespaces.get(&key.name))
                != network_label(new.and_then(|o| match o {
                    Object::Namespace(n) => Some(n),
                    _ => None,
                })) =>
        {
            p.full = true
        }
        (Kind::Namespace, _) => {
            p.namespaces.insert(key.name.clone());
            p.tail = true;
            p.peer = true;
        }
        (Kind::AuthorizationPolicy, _) => {
            p.policies.insert(key.clone());
            p.tail = true;
        }
        (Kind::EndpointSlice, new) => {
            if let Some(old) = inputs.endpoint_slices.get(key) {
                p.pods.extend(slice_pods(key, old));
            }
            if let Some(Object::EndpointSlice(s)) = new {
                p.pods.extend(slice_pods(key, s));
            }
            p.slices.insert(key.clone());
        }
        (Kind::PeerAuthentication, _) => {
            p.peer = true;
            p.tail = true;
        }
        // Entries are routes' and waypoints' destinations too (egress waypoints).
        (Kind::ServiceEntry | Kind::WorkloadEntry | Kind::WorkloadGroup, _) => {
            p.entries = true;
            p.tail = true;
        }
        // A node's labels are its pods' locality (issue 17); status-only updates change nothing.
        (Kind::Node, Some(Object::Node(n)))
            if inputs.nodes.get(&key.name).map(|o| &o.metadata.labels) == Some(&n.metadata.labels) => {}
        (Kind::Node, _) => p.full = true,
        _ => p.tail = true,
    }
}

/// Whether some DestinationRule subset's labels select `pod` (in any namespace: a cheap
/// over-approximation of the subset's service namespace, never missing a member).
fn in_a_subset(inputs: &Inputs, pod: &crate::model::Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    inputs
        .destination_rules
        .values()
        .flat_map(|d| &d.spec.subsets)
        .any(|s| s.labels.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)))
}

/// A namespace's `topology.istio.io/network` label.
fn network_label(ns: Option<&crate::model::Namespace>) -> Option<&String> {
    ns?.metadata.labels.as_ref()?.get(crate::model::cluster::NETWORK_LABEL)
}

/// A Service's selector, when it has one (empty selects nothing: EndpointSlices decide).
fn selector(svc: &Service) -> Option<&BTreeMap<String, String>> {
    svc.spec.as_ref()?.selector.as_ref().filter(|s| !s.is_empty())
}

/// The pods the EndpointSlices of service `key` name.
fn sliced_pods(inputs: &Inputs, key: &ObjectKey) -> Vec<ObjectKey> {
    in_namespace(&inputs.endpoint_slices, &key.namespace)
        .filter(|(_, s)| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|n| *n == key.name)
        })
        .flat_map(|(k, s)| slice_pods(k, s).collect::<Vec<_>>())
        .collect()
}

/// The IPs a pod claims for duplicate detection, as workload translation decides: pods
/// with a status that are not finished and not on the host network, parsable IPs.
fn claimed_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    if host_network || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = workload::pod_ips(pod).filter_map(|ip| ip.parse().ok()).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Selector policies present in one list and not equally in the other, by name.
fn selected_diff(old: &[Selected], new: &[Selected]) -> Vec<Selected> {
    let same = |a: &Selected, b: &Selected| {
        a.name == b.name && a.namespace == b.namespace && a.match_labels == b.match_labels && a.only == b.only
    };
    let gone = old.iter().filter(|o| !new.iter().any(|n| same(o, n)));
    let came = new.iter().filter(|n| !old.iter().any(|o| same(o, n)));
    gone.chain(came).cloned().collect()
}

/// The pods a selector policy applies to.
fn selected_pods(inputs: &Inputs, s: &Selected, root: &str) -> Vec<ObjectKey> {
    if let Some(only) = &s.only {
        return only.clone();
    }
    let candidates: Box<dyn Iterator<Item = (&ObjectKey, &Pod)>> = if s.namespace == root {
        Box::new(inputs.pods.iter())
    } else {
        Box::new(in_namespace(&inputs.pods, &s.namespace))
    };
    candidates
        .filter(|(k, p)| s.applies_to(k, p.metadata.labels.as_ref(), root))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Adds to `touched` the names that differ between two maps.
fn names_diff<V: PartialEq>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>, touched: &mut BTreeSet<String>) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            touched.insert(k.clone());
        }
    }
    touched.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
}

/// What the translation's unit tests share: objects from YAML, and one incremental step
/// checked against a full translation.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)] // a panic in a test is a failed test

    use super::*;
    use crate::source::manifest_dir::{parse_text, Loaded};

    pub(crate) fn objects(yaml: &str) -> Vec<Object> {
        let mut loaded = Loaded::default();
        parse_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        loaded.objects
    }

    /// Notes and applies `change`, steps `inc`, and asserts that its addresses and problems
    /// equal a full translation's (`step` names the step in a failure).
    pub(crate) fn step_equals_full(
        inc: &mut Incremental,
        inputs: &mut Inputs,
        change: Change,
        step: usize,
    ) -> Arc<Outputs> {
        let states = BTreeMap::new();
        inc.note(inputs, &change);
        match change {
            Change::Apply(o) => inputs.apply(o),
            Change::Delete(kind, key) => assert!(inputs.remove(kind, &key)),
            _ => unreachable!(),
        }
        let out = inc.step(inputs, &states).outputs;
        let full = super::super::translate_synced(inputs, &states, &inc.base);
        assert_eq!(out.addresses, full.addresses, "addresses after step {step}");
        assert_eq!(out.problems, full.problems, "problems after step {step}");
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a failed test

    use super::testing::{objects, step_equals_full};
    use super::*;

    const WORLD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}
---
apiVersion: v1\nkind: Pod\nmetadata: {name: payments-0, namespace: shop, labels: {app: payments}}
spec: {nodeName: n0, containers: []}
status: {podIP: 10.100.0.7}
---
apiVersion: v1\nkind: Service\nmetadata: {name: fake, namespace: evil}
spec: {clusterIP: 10.96.0.66, ports: [{name: http, port: 80}]}
";

    /// An EndpointSlice in `evil` naming shop's pod, added, changed to name it from its own
    /// namespace's view (no namespace: evil's pod of that name), and changed back, then
    /// removed: every step equals a full translation, problems included, and shop's pod never
    /// lists the evil service.
    #[test]
    fn incremental_foreign_slice_equals_full() {
        let slice = |target: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice
metadata: {{name: fake-1, namespace: evil, labels: {{kubernetes.io/service-name: fake}}}}
addressType: IPv4\nports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.100.0.7], targetRef: {target}}}]
"
            )
        };
        let mut inputs = Inputs::default();
        objects(WORLD).into_iter().for_each(|o| inputs.apply(o));
        let options = Options::default();
        let mut inc = Incremental::new(options.clone());
        let states = BTreeMap::new();
        inc.step(&inputs, &states);
        let key = ObjectKey::new("evil", "fake-1");
        let changes = [
            Change::Apply(objects(&slice("{kind: Pod, name: payments-0, namespace: shop}")).remove(0)),
            Change::Apply(objects(&slice("{kind: Pod, name: payments-0}")).remove(0)),
            Change::Apply(objects(&slice("{kind: Pod, name: payments-0, namespace: shop}")).remove(0)),
            Change::Delete(Kind::EndpointSlice, key.clone()),
        ];
        for (step, change) in changes.into_iter().enumerate() {
            let out = step_equals_full(&mut inc, &mut inputs, change, step);
            let Some(pb::address::Type::Workload(w)) = &out.addresses["Kubernetes//Pod/shop/payments-0"].r#type else {
                panic!("no workload")
            };
            assert!(w.services.is_empty(), "step {step}: {:?}", w.services);
            let reported = out
                .problems
                .iter()
                .any(|p| p.kind == Kind::EndpointSlice && p.object == key);
            assert_eq!(reported, step % 2 == 0, "step {step}: {:?}", out.problems);
        }
    }
}
