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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_proto::discovery::Resource;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::translate::Outputs;

/// Type URLs served, in the order pushes go out (addresses before the policies naming them).
pub const TYPES: [&str; 6] = [
    mesh_proto::ADDRESS_TYPE_URL,
    mesh_proto::AUTHORIZATION_TYPE_URL,
    mesh_proto::SERVICE_ROUTES_TYPE_URL,
    mesh_proto::WAYPOINT_POLICY_TYPE_URL,
    mesh_proto::INGRESS_GATEWAY_TYPE_URL,
    mesh_proto::WAYPOINT_CREDENTIALS_TYPE_URL,
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
    /// Content hash; `resource.version` is its hex form.
    pub version: u64,
    pub resource: Resource,
}

/// All resources of every type at one generation.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// When the change that produced it was first seen (for push latency).
    pub since: Option<Instant>,
    pub types: HashMap<&'static str, BTreeMap<String, Arc<Entry>>>,
    /// Names per type that were added, changed or removed since generation - 1.
    pub changed: HashMap<&'static str, BTreeSet<String>>,
    /// The translation this snapshot encodes (the next one compares against it).
    pub outputs: Arc<Outputs>,
    /// Address names by alias: `network/IP` of a workload or a service VIP.
    pub address_aliases: HashMap<String, Vec<Arc<str>>>,
    /// Workload names by the name of a service they are behind.
    pub service_endpoints: HashMap<String, Vec<Arc<str>>>,
    /// Workload names by IP, on any network.
    pub workloads_by_ip: HashMap<IpAddr, Vec<Arc<str>>>,
}

/// The indexes of the address type that name lookups use.
#[derive(Default)]
struct AddressIndexes {
    aliases: HashMap<String, Vec<Arc<str>>>,
    endpoints: HashMap<String, Vec<Arc<str>>>,
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
fn address_indexes(outputs: &Outputs, entries: &BTreeMap<String, Arc<Entry>>) -> AddressIndexes {
    use mesh_proto::workload::address::Type;
    let mut ix = AddressIndexes::default();
    for (name, address) in &outputs.addresses {
        let Some(entry) = entries.get(name) else { continue };
        for alias in &entry.resource.aliases {
            ix.aliases.entry(alias.clone()).or_default().push(entry.name.clone());
        }
        if let Some(Type::Workload(w)) = &address.r#type {
            for service in w.services.keys() {
                ix.endpoints
                    .entry(service.clone())
                    .or_default()
                    .push(entry.name.clone());
            }
            for ip in w.addresses.iter().filter_map(|a| ip_of(a)) {
                ix.by_ip.entry(ip).or_default().push(entry.name.clone());
            }
        }
    }
    ix
}

fn version_of(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The previous generation's messages and entries of one type.
type Previous<'a, M> = (&'a BTreeMap<String, M>, &'a BTreeMap<String, Arc<Entry>>);

/// Encodes `items`. A message equal to the previous one reuses its entry (no encoding, no
/// hashing, one shared copy); others are encoded and versioned by content.
fn entries<M: Message + PartialEq>(
    type_url: &str,
    items: &BTreeMap<String, M>,
    previous: Option<Previous<'_, M>>,
    aliases: impl Fn(&M) -> Vec<String>,
) -> BTreeMap<String, Arc<Entry>> {
    items
        .iter()
        .map(|(name, m)| {
            if let Some((before, entries)) = previous {
                if before.get(name) == Some(m) {
                    if let Some(e) = entries.get(name) {
                        return (name.clone(), e.clone());
                    }
                }
            }
            let value = m.encode_to_vec();
            let version = version_of(&value);
            if let Some(same) = previous.and_then(|(_, p)| p.get(name)).filter(|e| e.version == version) {
                return (name.clone(), same.clone());
            }
            let resource = Resource {
                version: format!("{version:016x}"),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_owned(),
                    value,
                }),
                name: name.clone(),
                // Derived from the message: equal messages (reused above) have equal aliases.
                aliases: aliases(m),
                ttl: None,
            };
            let entry = Entry {
                name: Arc::from(name.as_str()),
                version,
                resource,
            };
            (name.clone(), Arc::new(entry))
        })
        .collect()
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
            address_aliases,
        );
        let ix = address_indexes(&out, &a);
        types.insert(TYPES[0], a);
        let b = entries(
            TYPES[1],
            &out.authorizations,
            prev(TYPES[1]).map(|e| (&po.authorizations, e)),
            |_| Vec::new(),
        );
        types.insert(TYPES[1], b);
        let c = entries(
            TYPES[2],
            &out.service_routes,
            prev(TYPES[2]).map(|e| (&po.service_routes, e)),
            |_| Vec::new(),
        );
        types.insert(TYPES[2], c);
        let d = entries(
            TYPES[3],
            &out.waypoint_policies,
            prev(TYPES[3]).map(|e| (&po.waypoint_policies, e)),
            |_| Vec::new(),
        );
        types.insert(TYPES[3], d);
        let e = entries(
            TYPES[4],
            &out.ingress.gateways,
            prev(TYPES[4]).map(|e| (&po.ingress.gateways, e)),
            |_| Vec::new(),
        );
        types.insert(TYPES[4], e);
        let f = entries(
            TYPES[5],
            &out.waypoint_credentials,
            prev(TYPES[5]).map(|e| (&po.waypoint_credentials, e)),
            |_| Vec::new(),
        );
        types.insert(TYPES[5], f);
        let empty = BTreeMap::new();
        let changed = types
            .iter()
            .map(|(t, now)| {
                let before = previous.types.get(t).unwrap_or(&empty);
                let mut names: BTreeSet<String> = now
                    .iter()
                    .filter(|(n, e)| before.get(*n).is_none_or(|b| b.version != e.version))
                    .map(|(n, _)| n.clone())
                    .collect();
                names.extend(before.keys().filter(|n| !now.contains_key(*n)).cloned());
                (*t, names)
            })
            .collect();
        Snapshot {
            generation: previous.generation + 1,
            since,
            types,
            changed,
            outputs: out,
            address_aliases: ix.aliases,
            service_endpoints: ix.endpoints,
            workloads_by_ip: ix.by_ip,
        }
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
            None => self.address_aliases.get(requested).cloned().unwrap_or_default(),
        };
        let services: Vec<Arc<str>> = names.clone();
        for name in services {
            if let Some(behind) = self.service_endpoints.get(&*name) {
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
