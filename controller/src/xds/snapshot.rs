//! Versioned resources: every translation result becomes a [`Snapshot`] of encoded resources
//! per type, each with a content-derived version. Equal content has equal versions on every
//! replica, so a client reconnecting (to any replica) with `initial_resource_versions` gets
//! only what really changed. Each snapshot also lists what changed since the one before, so
//! a caught-up client does not diff the whole world.
//!
//! For clients that subscribe to addresses by name (Istio's ztunnel with `XDS_ON_DEMAND`),
//! each snapshot indexes the other names an address answers to: `network/IP` of a workload
//! or a service VIP (carried as the resource's `aliases`), and the workloads behind each
//! service ([`Snapshot::resolve_address`]).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use mesh_proto::discovery::Resource;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::translate::incremental::Touched;
use crate::translate::Outputs;

/// Type URLs served (indexes into a snapshot's per-type tables; pushes go out in
/// [`PUSH_ORDER`]).
pub const TYPES: [&str; 6] = [
    mesh_proto::ADDRESS_TYPE_URL,
    mesh_proto::AUTHORIZATION_TYPE_URL,
    mesh_proto::SERVICE_ROUTES_TYPE_URL,
    mesh_proto::WAYPOINT_POLICY_TYPE_URL,
    mesh_proto::INGRESS_GATEWAY_TYPE_URL,
    mesh_proto::WAYPOINT_CREDENTIALS_TYPE_URL,
];

/// The order a change goes out in, and initial subscriptions are answered in: policies
/// before the addresses they apply to, then routes, addresses last. A proxy that learned a
/// workload, or a service bound to a waypoint, before the policies naming it would serve it
/// unprotected until they came (at a proxy's start: every pod of its node, for the length of
/// the whole address push).
pub const PUSH_ORDER: [&str; 6] = [
    mesh_proto::AUTHORIZATION_TYPE_URL,
    mesh_proto::WAYPOINT_POLICY_TYPE_URL,
    mesh_proto::WAYPOINT_CREDENTIALS_TYPE_URL,
    mesh_proto::INGRESS_GATEWAY_TYPE_URL,
    mesh_proto::SERVICE_ROUTES_TYPE_URL,
    mesh_proto::ADDRESS_TYPE_URL,
];

/// Types whose resources carry private keys: a client gets only the one named after its own
/// identity (`<ns>/<service account>`).
pub const PRIVATE_TYPES: [&str; 2] = [
    mesh_proto::INGRESS_GATEWAY_TYPE_URL,
    mesh_proto::WAYPOINT_CREDENTIALS_TYPE_URL,
];

/// One encoded resource, shared by every client's responses.
#[derive(Debug)]
pub struct Entry {
    /// Shared with every client's record of what it holds.
    pub name: Arc<str>,
    /// Content hash; the resource's `version` is its hex form.
    pub version: u64,
    /// The `envoy.service.discovery.v3.Resource`, encoded once for every client.
    pub encoded: Bytes,
    /// The resource's aliases (also in `encoded`), for name lookups.
    pub aliases: Vec<String>,
    /// For a workload: its IPs and the services it is behind (the address type's lookups).
    pub lookup: Lookup,
}

/// What name lookups index of a workload.
#[derive(Debug, Default)]
pub struct Lookup {
    pub ips: Vec<IpAddr>,
    pub services: Vec<String>,
}

/// All resources of every type at one generation.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// When the change that produced it was first seen (for push latency).
    pub since: Option<Instant>,
    /// Each type's entries; a type a generation did not change is shared with the one before.
    pub types: HashMap<&'static str, Entries>,
    /// Names per type that were added, changed or removed since generation - 1.
    pub changed: HashMap<&'static str, BTreeSet<String>>,
    /// The translation this snapshot encodes, when built from a whole translation (the next
    /// one compares against it); empty when built from a change set ([`Snapshot::apply`]).
    pub outputs: Arc<Outputs>,
    /// Name lookups, built on first use (only clients subscribing by name need them).
    indexes: OnceLock<AddressIndexes>,
    /// Per type (in [`TYPES`] order), the whole type framed in response-sized chunks, built
    /// on first use: every client that needs all of it gets the same bytes.
    framed: [OnceLock<Vec<Framed>>; TYPES.len()],
}

/// One type's entries by name: a persistent map, so a generation that changes one entry
/// shares every other node with the generation before (and with the generations clients
/// still hold) instead of copying the map (at 110k addresses a copy cost ~15 ms per change).
pub type Entries = imbl::OrdMap<String, Arc<Entry>>;

/// A chunk of resources framed as response records, and how many.
pub type Framed = (Bytes, usize);

/// The indexes of the address type that name lookups use.
#[derive(Debug, Default)]
struct AddressIndexes {
    /// Address names by alias: `network/IP` of a workload or a service VIP.
    aliases: HashMap<String, Vec<Arc<str>>>,
    /// Workload names by the name of a service they are behind.
    endpoints: HashMap<String, Vec<Arc<str>>>,
    /// Workload names by IP, on any network.
    by_ip: HashMap<IpAddr, Vec<Arc<str>>>,
}

fn ip_of(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(raw).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(raw).ok()?)),
        _ => None,
    }
}

/// `network/IP`, as Istio names an address (`/10.0.0.1` on the default network).
fn network_ip(network: &str, raw: &[u8]) -> Option<String> {
    Some(format!("{network}/{}", ip_of(raw)?))
}

/// The aliases of an address: `network/IP` of each of its addresses.
fn address_aliases(address: &mesh_proto::workload::Address) -> Vec<String> {
    use mesh_proto::workload::address::Type;
    match &address.r#type {
        Some(Type::Workload(w)) => w.addresses.iter().filter_map(|a| network_ip(&w.network, a)).collect(),
        Some(Type::Service(s)) => s
            .addresses
            .iter()
            .filter_map(|a| network_ip(&a.network, &a.address))
            .collect(),
        None => Vec::new(),
    }
}

/// The alias and endpoint indexes of `entries` (the address type's).
fn address_indexes(entries: &Entries) -> AddressIndexes {
    let mut ix = AddressIndexes::default();
    for entry in entries.values() {
        for alias in &entry.aliases {
            ix.aliases.entry(alias.clone()).or_default().push(entry.name.clone());
        }
        for service in &entry.lookup.services {
            ix.endpoints
                .entry(service.clone())
                .or_default()
                .push(entry.name.clone());
        }
        for ip in &entry.lookup.ips {
            ix.by_ip.entry(*ip).or_default().push(entry.name.clone());
        }
    }
    ix
}

/// The aliases and lookups of an address.
fn address_meta(address: &mesh_proto::workload::Address) -> (Vec<String>, Lookup) {
    use mesh_proto::workload::address::Type;
    let lookup = match &address.r#type {
        Some(Type::Workload(w)) => Lookup {
            ips: w.addresses.iter().filter_map(|a| ip_of(a)).collect(),
            services: w.services.keys().cloned().collect(),
        },
        _ => Lookup::default(),
    };
    (address_aliases(address), lookup)
}

/// Other types have neither aliases nor lookups.
fn no_meta<M>(_: &M) -> (Vec<String>, Lookup) {
    (Vec::new(), Lookup::default())
}

fn version_of(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The previous generation's messages and entries of one type.
type Previous<'a, V> = (&'a BTreeMap<String, V>, &'a Entries);

/// What an item's aliases and lookups are derived from.
type Meta<M> = fn(&M) -> (Vec<String>, Lookup);

/// Encodes one message as an entry; `before` is reused when its content is the same (the
/// flag says whether the entry is new).
fn encode<M: Message>(
    type_url: &str,
    name: &str,
    m: &M,
    before: Option<&Arc<Entry>>,
    meta: Meta<M>,
) -> (Arc<Entry>, bool) {
    let value = m.encode_to_vec();
    let version = version_of(&value);
    if let Some(same) = before.filter(|e| e.version == version) {
        return (same.clone(), false);
    }
    // Derived from the message: equal messages have equal aliases and lookups.
    let (aliases, lookup) = meta(m);
    let resource = Resource {
        version: format!("{version:016x}"),
        resource: Some(prost_types::Any {
            type_url: type_url.to_owned(),
            value,
        }),
        name: name.to_owned(),
        aliases,
        ttl: None,
    };
    let entry = Entry {
        name: Arc::from(name),
        version,
        encoded: Bytes::from(resource.encode_to_vec()),
        aliases: resource.aliases,
        lookup,
    };
    (Arc::new(entry), true)
}

/// Encodes `items`. A message equal to the previous one reuses its entry (no encoding, no
/// hashing, one shared copy); others are encoded and versioned by content. Items are held
/// directly or shared (`Arc`, as addresses are).
fn entries<M: Message + PartialEq + Sync, V: Borrow<M> + Sync>(
    type_url: &str,
    items: &BTreeMap<String, V>,
    previous: Option<Previous<'_, V>>,
    meta: Meta<M>,
) -> Entries {
    let items: Vec<(&String, &V)> = items.iter().collect();
    let entries = crate::parallel::map(&items, |(name, m)| {
        let old = previous.and_then(|(before, entries)| Some((before.get(*name)?, entries.get(*name)?)));
        match old {
            Some((before, e)) if before.borrow() == (*m).borrow() => e.clone(),
            _ => {
                let e = previous.and_then(|(_, p)| p.get(*name));
                encode(type_url, name, (*m).borrow(), e, meta).0
            }
        }
    });
    items.into_iter().map(|(name, _)| name.clone()).zip(entries).collect()
}

/// Re-encodes the `names` of one type from `items` into `map` (a copy of the previous
/// generation's, made only when something really changed); returns the names whose
/// version changed or that were removed.
fn update<M: Message, V: Borrow<M>>(
    type_url: &str,
    map: &mut Entries,
    items: &BTreeMap<String, V>,
    names: &BTreeSet<String>,
    meta: Meta<M>,
) -> BTreeSet<String> {
    let mut changed = BTreeSet::new();
    for name in names {
        match items.get(name) {
            Some(m) => {
                let (e, new) = encode(type_url, name, m.borrow(), map.get(name), meta);
                if new {
                    map.insert(name.clone(), e);
                    changed.insert(name.clone());
                }
            }
            None if map.contains_key(name) => {
                map.remove(name);
                changed.insert(name.clone());
            }
            None => {}
        }
    }
    changed
}

/// Encodes all of `items` (a type without aliases), reusing the entries of `previous` whose
/// content is the same.
fn reencode<M: Message + PartialEq>(
    type_url: &str,
    items: &BTreeMap<String, M>,
    previous: Option<&Entries>,
) -> Entries {
    let no_messages = BTreeMap::new();
    entries(type_url, items, previous.map(|e| (&no_messages, e)), no_meta)
}

/// The changed names of one type between two generations' entries.
fn diff(before: &Entries, now: &Entries) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = now
        .iter()
        .filter(|(n, e)| before.get(*n).is_none_or(|b| b.version != e.version))
        .map(|(n, _)| n.clone())
        .collect();
    names.extend(before.keys().filter(|n| !now.contains_key(*n)).cloned());
    names
}

impl Snapshot {
    /// Encodes `out` as the generation after `previous`.
    pub fn next(previous: &Snapshot, out: Arc<Outputs>, since: Option<Instant>) -> Snapshot {
        let prev = |t: &str| previous.types.get(t);
        let po = &previous.outputs;
        let mut types = HashMap::new();
        let a = entries(
            TYPES[0],
            &out.addresses,
            prev(TYPES[0]).map(|e| (&po.addresses, e)),
            address_meta,
        );
        types.insert(TYPES[0], a);
        let b = entries(
            TYPES[1],
            &out.authorizations,
            prev(TYPES[1]).map(|e| (&po.authorizations, e)),
            no_meta,
        );
        types.insert(TYPES[1], b);
        let c = entries(
            TYPES[2],
            &out.service_routes,
            prev(TYPES[2]).map(|e| (&po.service_routes, e)),
            no_meta,
        );
        types.insert(TYPES[2], c);
        let d = entries(
            TYPES[3],
            &out.waypoint_policies,
            prev(TYPES[3]).map(|e| (&po.waypoint_policies, e)),
            no_meta,
        );
        types.insert(TYPES[3], d);
        let e = entries(
            TYPES[4],
            &out.ingress.gateways,
            prev(TYPES[4]).map(|e| (&po.ingress.gateways, e)),
            no_meta,
        );
        types.insert(TYPES[4], e);
        let f = entries(
            TYPES[5],
            &out.waypoint_credentials,
            prev(TYPES[5]).map(|e| (&po.waypoint_credentials, e)),
            no_meta,
        );
        types.insert(TYPES[5], f);
        let empty = Entries::default();
        let changed = types
            .iter()
            .map(|(t, now)| (*t, diff(prev(t).unwrap_or(&empty), now)))
            .collect();
        Snapshot {
            generation: previous.generation + 1,
            since,
            types,
            changed,
            outputs: out,
            indexes: OnceLock::new(),
            framed: Default::default(),
        }
    }

    /// The generation after `previous` when only the `touched` names of `out` may differ
    /// (incremental translation): only they are encoded, and types nothing touched are
    /// shared with `previous`. The routes and gateway types, few, are compared whole when
    /// the step recomputed them.
    pub fn apply(previous: &Snapshot, out: &Outputs, touched: &Touched, since: Option<Instant>) -> Snapshot {
        let mut types = previous.types.clone();
        let mut changed = HashMap::new();
        let mut map = |t: &'static str| types.entry(t).or_default().clone();
        let mut addresses = map(TYPES[0]);
        changed.insert(
            TYPES[0],
            update(
                TYPES[0],
                &mut addresses,
                &out.addresses,
                &touched.addresses,
                address_meta,
            ),
        );
        let mut authorizations = map(TYPES[1]);
        let names = &touched.authorizations;
        changed.insert(
            TYPES[1],
            update(TYPES[1], &mut authorizations, &out.authorizations, names, no_meta),
        );
        types.insert(TYPES[0], addresses);
        types.insert(TYPES[1], authorizations);
        if touched.tail {
            let empty = Entries::default();
            let mut whole = |t: &'static str, now: Entries| {
                let before = previous.types.get(t).unwrap_or(&empty);
                changed.insert(t, diff(before, &now));
                types.insert(t, now);
            };
            let prev = |t: &str| previous.types.get(t);
            whole(TYPES[2], reencode(TYPES[2], &out.service_routes, prev(TYPES[2])));
            whole(TYPES[3], reencode(TYPES[3], &out.waypoint_policies, prev(TYPES[3])));
            whole(TYPES[4], reencode(TYPES[4], &out.ingress.gateways, prev(TYPES[4])));
            whole(TYPES[5], reencode(TYPES[5], &out.waypoint_credentials, prev(TYPES[5])));
        }
        Snapshot {
            generation: previous.generation + 1,
            since,
            types,
            changed,
            outputs: Arc::default(),
            indexes: OnceLock::new(),
            framed: Default::default(),
        }
    }

    fn indexes(&self) -> &AddressIndexes {
        self.indexes.get_or_init(|| match self.types.get(TYPES[0]) {
            Some(addresses) => address_indexes(addresses),
            None => AddressIndexes::default(),
        })
    }

    /// All entries of `type_url` framed as response records, `chunk` per response.
    pub fn framed(&self, type_url: &str, chunk: usize) -> &[Framed] {
        let Some(i) = TYPES.iter().position(|t| *t == type_url) else {
            return &[];
        };
        self.framed[i].get_or_init(|| {
            let Some(entries) = self.types.get(type_url) else {
                return Vec::new();
            };
            let all: Vec<&Arc<Entry>> = entries.values().collect();
            all.chunks(chunk.max(1))
                .map(|part| (super::wire::frame(part.iter().map(|e| &e.encoded)), part.len()))
                .collect()
        })
    }

    /// Workload names at `ip`, on any network.
    pub fn workloads_at(&self, ip: &IpAddr) -> Option<&Vec<Arc<str>>> {
        self.indexes().by_ip.get(ip)
    }

    /// The address names that answer a subscription to `requested` by name, as Istio's
    /// control plane answers on-demand clients: the address of that name, or the workloads
    /// and services holding that `network/IP`; with each service, the workloads behind it
    /// (a client that asked for a VIP needs them to connect). Empty when nothing matches.
    pub fn resolve_address(&self, requested: &str) -> Vec<Arc<str>> {
        let Some(addresses) = self.types.get(TYPES[0]) else {
            return Vec::new();
        };
        let mut names: Vec<Arc<str>> = match addresses.get(requested) {
            Some(e) => vec![e.name.clone()],
            None => self.indexes().aliases.get(requested).cloned().unwrap_or_default(),
        };
        let services: Vec<Arc<str>> = names.clone();
        for name in services {
            if let Some(behind) = self.indexes().endpoints.get(&*name) {
                names.extend(behind.iter().cloned());
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// Number of names changed in this generation, over all types.
    pub fn changes(&self) -> usize {
        self.changed.values().map(BTreeSet::len).sum()
    }
}
