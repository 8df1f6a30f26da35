//! The multicluster merge ([`super::merge`]) kept up to date by the incremental translator,
//! as a layer over the local addresses it brings up to date: a change re-translates and
//! re-merges what depends on it, not the world (at 100k pods a from-scratch merge costs
//! seconds). It calls the same pieces as the full merge, and keeps what they depend on:
//!
//! - each remote cluster's own translation, by an incremental translator of its own
//!   ([`Incremental`], fed that cluster's changes): a change to a remote re-translates what it
//!   reaches in that cluster, a local change none;
//! - the remote part ([`RemotePart`]), recomputed whole (remote clusters are translated
//!   already; this is a pass over their addresses) when a remote cluster changed, or a local
//!   address changed that holds a `(network, IP)` the part looked up: the local owners of
//!   those pairs are kept in an index, so no pass over the local addresses is needed. Only the
//!   names whose contributions it changed are merged again (unchanged ones are the same
//!   allocations, so comparing them is cheap). When only remote pods, services, slices or
//!   nodes changed, the names their translation changed are patched into the part instead
//!   ([`super::patch`]), as long as none of their addresses is held by anything else (what
//!   a clash needs, and the pass decides);
//! - each name's merged address: the local (base) address, the remote contributions, the
//!   network gateway, the identities of the workloads reached through a gateway that list it
//!   (an index by service). A local change recomputes its names, the names whose remote
//!   contributions changed, and the services whose identities changed; a change of the
//!   gateways recomputes every workload on another network (an index by network, which also
//!   gives the networks without a gateway);
//! - the base value of every name whose published address differs from it (`shadow`), so a
//!   name can be merged again from what the local translation gave it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use mesh_proto::workload as pb;

use super::{
    add_sans, address_keys, all_gateways, gateway_identity, merged, missing, patch, remote_part, set_gateway, statuses,
    Contribution, Gateways, RemotePart,
};
use crate::model::cluster::{self, ClusterChange, NetworkGateway, Remote};
use crate::model::Inputs;
use crate::translate::incremental::Incremental;
use crate::translate::{Addresses, Options, Outputs, Problem};

/// What the local translation gives a name (`None`: nothing).
type Base = Option<Arc<pb::Address>>;

/// The owners of the local addresses' `(network, IP)` pairs ([`address_keys`]): by pair, the
/// names holding it and the owner each gives (the last name's wins, as in a pass in order).
#[derive(Default)]
struct Owners {
    by_key: HashMap<(String, IpAddr), BTreeMap<String, String>>,
    of: HashMap<String, Vec<(String, IpAddr)>>,
}

impl Owners {
    /// Records `name`'s base address; returns the pairs it held or holds.
    fn set(&mut self, name: &str, base: Option<&pb::Address>) -> Vec<(String, IpAddr)> {
        let mut touched = self.of.remove(name).unwrap_or_default();
        for key in &touched {
            if let Some(names) = self.by_key.get_mut(key) {
                names.remove(name);
                if names.is_empty() {
                    self.by_key.remove(key);
                }
            }
        }
        let keys = base.map(|a| address_keys(name, a)).unwrap_or_default();
        for (key, owner) in &keys {
            self.by_key
                .entry(key.clone())
                .or_default()
                .insert(name.to_owned(), owner.clone());
        }
        let mine: Vec<_> = keys.into_iter().map(|(k, _)| k).collect();
        if !mine.is_empty() {
            self.of.insert(name.to_owned(), mine.clone());
        }
        touched.extend(mine);
        touched
    }

    fn owner(&self, key: &(String, IpAddr)) -> Option<String> {
        Some(self.by_key.get(key)?.last_key_value()?.1.clone())
    }
}

/// One remote cluster's own translation, kept up to date by its changes.
struct RemoteTranslation {
    /// The options it translates with (a new translator when they change: its network).
    options: Options,
    translator: Incremental,
    out: Arc<Outputs>,
    /// Changes were noted since `out`.
    dirty: bool,
}

impl RemoteTranslation {
    fn new(options: &Options) -> Self {
        RemoteTranslation {
            options: options.clone(),
            translator: Incremental::new(options.clone()),
            out: Arc::default(),
            dirty: true,
        }
    }

    /// Brings `out` up to date with `remote`'s objects; returns the outputs before and the
    /// names that may have changed (`None`: any).
    fn step(&mut self, remote: &Remote) -> (Arc<Outputs>, Option<BTreeSet<String>>) {
        let step = self.translator.step(&remote.inputs, &BTreeMap::new());
        let before = std::mem::replace(&mut self.out, step.outputs);
        self.dirty = false;
        (before, step.touched.map(|t| t.addresses))
    }

    /// Gives the outputs [`Self::step`] returned back: nothing else holds them (the remote
    /// part keeps addresses, not outputs), so the translator updates them next time instead
    /// of copying the cluster.
    fn recycle(&mut self, before: Arc<Outputs>) {
        self.translator.recycle(before);
    }
}

/// The layer's state; see the module doc.
#[derive(Default)]
pub(crate) struct Layer {
    valid: bool,
    /// Each remote cluster's own translation, by id.
    translations: BTreeMap<String, RemoteTranslation>,
    /// How many remote translation steps were made (tests show a local change makes none).
    translated: u64,
    /// How many names the last step merged (tests show a remote change merges its own).
    merged: usize,
    /// How many times the remote part was computed whole (tests show a remote pod's change
    /// patches it).
    parts: u64,
    /// A remote cluster changed since the remote part was computed.
    changed: bool,
    /// Only remote pods, services, slices, nodes or enrolment changed since (and every such
    /// cluster has a translation): the part may be patched ([`Layer::patch_part`]).
    patchable: bool,
    part: RemotePart,
    gateways: Vec<NetworkGateway>,
    by_network: Gateways,
    /// Base values of the names whose published address is not their base.
    shadow: HashMap<String, Base>,
    /// Only with remote clusters (the part is what looks owners up).
    owners: Option<Owners>,
    /// Workloads reached through a gateway: the services they list and their identity; and
    /// by service, those workloads' identities.
    contributes: HashMap<String, (Vec<String>, String)>,
    sans: HashMap<String, BTreeMap<String, String>>,
    /// Workloads not on the local network, by network (and the cluster of each); and each
    /// such workload's network.
    networks: BTreeMap<String, BTreeMap<String, String>>,
    network_of: HashMap<String, String>,
    /// Problems of merging one name (ports that differ between clusters).
    name_problems: BTreeMap<String, Vec<Problem>>,
    /// Workloads published, and those of the local cluster among them.
    workloads: usize,
    local_workloads: usize,
}

/// One step's context.
pub(crate) struct Ctx<'a> {
    pub inputs: &'a Inputs,
    /// The local options in force ([`super::local_options`]).
    pub options: &'a Options,
    /// The addresses published before this step.
    pub previous: &'a Addresses,
    /// Everything is recomputed (the outputs being built hold only base values).
    pub full: bool,
}

impl Layer {
    /// Records a change to a remote cluster; `inputs` are the local inputs (holding the
    /// remote clusters) before it is applied.
    pub(crate) fn note(&mut self, inputs: &Inputs, change: &ClusterChange) {
        if !self.changed {
            self.patchable = true;
        }
        self.changed = true;
        self.patchable &= matches!(change, ClusterChange::Objects(_, c) if patchable(c));
        match change {
            // Only its objects and enrolment are translated: a `Synced` or a kind's health
            // moves its state (the remote part), not its translation.
            ClusterChange::Objects(id, c) if cluster::kept(c) => {
                let Some(t) = self.translations.get_mut(id) else {
                    self.patchable = false;
                    return;
                };
                match inputs.remotes.get(id) {
                    Some(remote) => {
                        t.translator.note(&remote.inputs, c);
                        t.dirty = true;
                    }
                    None => drop(self.translations.remove(id)),
                }
            }
            ClusterChange::Removed(id) => drop(self.translations.remove(id)),
            ClusterChange::Objects(..) | ClusterChange::State(..) => {}
        }
    }

    /// Forgets everything, the remote translations too.
    pub(crate) fn invalidate(&mut self) {
        *self = Layer {
            translated: self.translated,
            parts: self.parts,
            ..Layer::default()
        };
    }

    /// How many times a remote cluster's translation was brought up to date.
    pub(crate) fn translated(&self) -> u64 {
        self.translated
    }

    /// How many names the last step merged.
    pub(crate) fn merged(&self) -> usize {
        self.merged
    }

    /// How many times the remote part was computed whole.
    pub(crate) fn parts(&self) -> u64 {
        self.parts
    }

    /// Merges what this step reaches into `work`, whose `updated` names hold their new base
    /// values (every name, when `ctx.full`); sets its clusters and adds its problems. Returns
    /// the names it wrote.
    pub(crate) fn step(&mut self, ctx: &Ctx<'_>, work: &mut Outputs, updated: &BTreeSet<String>) -> BTreeSet<String> {
        let full = ctx.full || !self.valid;
        if full {
            self.reset();
        }
        for name in updated {
            self.shadow.remove(name);
        }
        let mut dirty: BTreeSet<String> = if full {
            work.addresses.keys().cloned().collect()
        } else {
            updated.clone()
        };
        let hit = self.owners_changed(ctx.inputs, work, updated, full);
        if hit || self.changed {
            let patched = !full && !hit && self.patch_part(ctx, &mut dirty);
            if !patched {
                let before = std::mem::take(&mut self.part.names);
                self.repart(ctx);
                changed_names(&before, &self.part.names, &mut dirty);
            }
        }
        let gateways = all_gateways(ctx.inputs, ctx.options, &self.part);
        if full || gateways != self.gateways {
            dirty.extend(self.networks.values().flat_map(|m| m.keys().cloned()));
            self.by_network = Gateways::new(&gateways);
            self.gateways = gateways;
        }
        self.merged = dirty.len();
        let written = self.remerge(ctx, work, &dirty, full);
        self.finish(ctx.options, work);
        self.valid = true;
        written
    }

    /// Clears what a from-scratch step rebuilds (not the remote translations).
    fn reset(&mut self) {
        *self = Layer {
            translations: std::mem::take(&mut self.translations),
            translated: self.translated,
            parts: self.parts,
            changed: true,
            ..Layer::default()
        };
    }

    /// A name's value as the local translation left it in the outputs published last
    /// (`published`): what the merge started from, not what it made of it. Readers outside the
    /// layer that compare or look up local values use this, never the published address.
    pub(crate) fn local<'a>(&'a self, published: &'a Addresses, name: &str) -> Option<&'a pb::Address> {
        match self.shadow.get(name) {
            Some(base) => base.as_deref(),
            None => published.get(name).map(|a| &**a),
        }
    }

    /// A name's base value.
    fn base<'a>(&'a self, work: &'a Outputs, name: &str) -> Option<&'a Arc<pb::Address>> {
        match self.shadow.get(name) {
            Some(base) => base.as_ref(),
            None => work.addresses.get(name),
        }
    }

    /// Keeps the owners index (with remote clusters only); whether an owner the remote part
    /// looked up may have changed.
    fn owners_changed(&mut self, inputs: &Inputs, work: &Outputs, updated: &BTreeSet<String>, full: bool) -> bool {
        if inputs.remotes.is_empty() {
            let had = self.owners.take().is_some();
            return had || !self.part.names.is_empty() || !self.part.clusters.is_empty();
        }
        if let (Some(mut owners), false) = (self.owners.take(), full) {
            let queried = &self.part.queried;
            let mut hit = false;
            for name in updated {
                let keys = owners.set(name, work.addresses.get(name).map(|a| &**a));
                hit |= keys.iter().any(|k| queried.contains(k));
            }
            self.owners = Some(owners);
            return hit;
        }
        let mut owners = Owners::default();
        let names = work.addresses.keys().chain(self.shadow.keys());
        for name in names.collect::<BTreeSet<_>>() {
            owners.set(name, self.base(work, name).map(|a| &**a));
        }
        self.owners = Some(owners);
        true
    }

    /// Brings the changed remote clusters' translations up to date and patches what they
    /// changed into the part, adding those names to `dirty`; false when a name cannot be
    /// patched ([`patch`]) or the changes were not all patchable (the part is then recomputed;
    /// the names patched so far are in `dirty`).
    fn patch_part(&mut self, ctx: &Ctx<'_>, dirty: &mut BTreeSet<String>) -> bool {
        if !self.patchable {
            return false;
        }
        let owners = self.owners.as_ref();
        let local = |k: &(String, IpAddr)| owners.and_then(|o| o.owner(k));
        for (id, t) in self.translations.iter_mut().filter(|(_, t)| t.dirty) {
            let Some(remote) = ctx.inputs.remotes.get(id) else {
                return false;
            };
            // Not part of the part: its translation waits until it is served again (a
            // change that is not patched).
            if !remote.served() || *id == ctx.options.cluster_id {
                continue;
            }
            self.translated += 1;
            let (before, touched) = t.step(remote);
            let Some(touched) = touched else { return false };
            for name in touched {
                let change = (before.addresses.get(&name), t.out.addresses.get(&name));
                if same(change.0, change.1) {
                    continue;
                }
                if !patch(&mut self.part, id, &name, change, &local) {
                    return false;
                }
                dirty.insert(name);
            }
            t.recycle(before);
        }
        self.changed = false;
        true
    }

    /// Recomputes the remote part, bringing the remote clusters' translations up to date.
    fn repart(&mut self, ctx: &Ctx<'_>) {
        self.translations.retain(|id, _| ctx.inputs.remotes.contains_key(id));
        let (translations, count) = (&mut self.translations, &mut self.translated);
        let mut translation = |id: &str, remote: &Remote, opts: &Options| {
            let t = translations
                .entry(id.to_owned())
                .or_insert_with(|| RemoteTranslation::new(opts));
            if t.options != *opts {
                *t = RemoteTranslation::new(opts);
            }
            if t.dirty {
                *count += 1;
                let (before, _) = t.step(remote);
                t.recycle(before);
            }
            t.out.clone()
        };
        let owners = self.owners.as_ref();
        let local = |k: &(String, IpAddr)| owners.and_then(|o| o.owner(k));
        self.part = remote_part(ctx.inputs, ctx.options, &mut translation, &local);
        self.parts += 1;
        self.changed = false;
    }

    /// A name merged, with its gateway (not its identities yet); records its problems.
    fn value(&mut self, work: &Outputs, name: &str, options: &Options) -> Base {
        let base = self.base(work, name);
        let mut problems = Vec::new();
        let contributions = self.part.names.get(name).map_or(&[][..], Vec::as_slice);
        let mut v = merged(base, contributions, &mut problems);
        if let Some(a) = v.as_mut() {
            set_gateway(a, &options.network, &self.by_network);
        }
        if problems.is_empty() {
            self.name_problems.remove(name);
        } else {
            self.name_problems.insert(name.to_owned(), problems);
        }
        v
    }

    /// Merges the `dirty` names and the services whose identities they change into `work`.
    fn remerge(&mut self, ctx: &Ctx<'_>, work: &mut Outputs, dirty: &BTreeSet<String>, full: bool) -> BTreeSet<String> {
        let options = ctx.options;
        let mut services = BTreeSet::new();
        let mut values = Vec::with_capacity(dirty.len());
        for name in dirty {
            let v = self.value(work, name, options);
            self.index(name, v.as_deref(), &options.network, &mut services);
            values.push((name.as_str(), v));
        }
        for name in services.iter().filter(|s| !dirty.contains(*s)) {
            let v = self.value(work, name, options);
            values.push((name.as_str(), v));
        }
        let mut written = BTreeSet::new();
        for (name, mut v) in values {
            if let (Some(a), Some(ids)) = (v.as_mut(), self.sans.get(name)) {
                add_sans(a, &ids.values().cloned().collect());
            }
            let old = if full { None } else { ctx.previous.get(name) };
            self.count(old.map(|a| &**a), v.as_deref(), options);
            let base = self.base(work, name);
            if same(base, v.as_ref()) {
                self.shadow.remove(name);
            } else {
                let base = base.cloned();
                self.shadow.insert(name.to_owned(), base);
            }
            if !same(work.addresses.get(name), v.as_ref()) {
                match v {
                    Some(a) => drop(work.addresses.insert(name.to_owned(), a)),
                    None => drop(work.addresses.remove(name)),
                }
                written.insert(name.to_owned());
            }
        }
        written
    }

    /// Indexes a name's merged address: the identity it adds to its services (those whose
    /// identities change go into `services`) and its network when not the local one.
    fn index(&mut self, name: &str, v: Option<&pb::Address>, local: &str, services: &mut BTreeSet<String>) {
        let w = match v.and_then(|a| a.r#type.as_ref()) {
            Some(pb::address::Type::Workload(w)) => Some(w),
            _ => None,
        };
        let new = w.and_then(|w| {
            Some((
                w.services.keys().cloned().collect::<Vec<_>>(),
                gateway_identity(w, local)?,
            ))
        });
        let old = self.contributes.remove(name);
        if old != new {
            for s in old.iter().flat_map(|(s, _)| s) {
                if let Some(ids) = self.sans.get_mut(s) {
                    ids.remove(name);
                    if ids.is_empty() {
                        self.sans.remove(s);
                    }
                }
                services.insert(s.clone());
            }
            for (s, id) in new.iter().flat_map(|(s, id)| s.iter().map(move |s| (s, id))) {
                self.sans
                    .entry(s.clone())
                    .or_default()
                    .insert(name.to_owned(), id.clone());
                services.insert(s.clone());
            }
        }
        if let Some(new) = new {
            self.contributes.insert(name.to_owned(), new);
        }
        if let Some(network) = self.network_of.remove(name) {
            if let Some(names) = self.networks.get_mut(&network) {
                names.remove(name);
                if names.is_empty() {
                    self.networks.remove(&network);
                }
            }
        }
        if let Some(w) = w.filter(|w| w.network != local) {
            let names = self.networks.entry(w.network.clone()).or_default();
            names.insert(name.to_owned(), w.cluster_id.clone());
            self.network_of.insert(name.to_owned(), w.network.clone());
        }
    }

    /// Keeps the workload counts as a name goes from `old` to `new`.
    fn count(&mut self, old: Option<&pb::Address>, new: Option<&pb::Address>, options: &Options) {
        let tally = |a: Option<&pb::Address>| match a.and_then(|a| a.r#type.as_ref()) {
            Some(pb::address::Type::Workload(w)) => (1, usize::from(w.cluster_id == options.cluster_id)),
            _ => (0, 0),
        };
        let ((ow, ol), (nw, nl)) = (tally(old), tally(new));
        self.workloads = (self.workloads + nw).saturating_sub(ow);
        self.local_workloads = (self.local_workloads + nl).saturating_sub(ol);
    }

    /// The clusters and the problems of the merge.
    fn finish(&self, options: &Options, work: &mut Outputs) {
        let mut problems = self.part.problems.clone();
        problems.extend(self.name_problems.values().flatten().cloned());
        let networks = self
            .networks
            .iter()
            .filter_map(|(n, names)| Some((n.as_str(), names.values().next()?.as_str())));
        problems.extend(missing(networks, options, &self.gateways));
        let services = work.addresses.len().saturating_sub(self.workloads);
        work.clusters = statuses(options, &self.part, &self.gateways, (self.local_workloads, services));
        work.problems.extend(problems);
        work.problems.sort();
        work.problems.dedup();
    }
}

/// Whether a remote cluster's `change` leaves its network, gateways and state alone: the
/// part can then be patched where its translation changed.
fn patchable(change: &crate::source::Change) -> bool {
    use crate::model::Kind;
    use crate::source::Change;
    let kind = match change {
        Change::Apply(o) => o.kind(),
        Change::Delete(kind, _) => *kind,
        Change::Enrolled(_) => return true,
        _ => return false,
    };
    matches!(kind, Kind::Pod | Kind::Service | Kind::EndpointSlice | Kind::Node)
}

/// Adds to `dirty` the names whose remote contributions differ between `before` and `after`.
fn changed_names(
    before: &BTreeMap<String, Vec<Contribution>>,
    after: &BTreeMap<String, Vec<Contribution>>,
    dirty: &mut BTreeSet<String>,
) {
    let same = |a: &[Contribution], b: &[Contribution]| a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.same(b));
    for (name, c) in before {
        if after.get(name).is_none_or(|now| !same(c, now)) {
            dirty.insert(name.clone());
        }
    }
    for name in after.keys().filter(|n| !before.contains_key(*n)) {
        dirty.insert(name.clone());
    }
}

/// Whether two values of a name are the same (the same allocation, or equal).
fn same(a: Option<&Arc<pb::Address>>, b: Option<&Arc<pb::Address>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        _ => false,
    }
}
