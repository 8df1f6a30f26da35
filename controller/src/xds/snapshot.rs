//! Versioned resources: every translation result becomes a [`Snapshot`] of encoded resources
//! per type, each with a content-derived version. Equal content has equal versions on every
//! replica, so a client reconnecting (to any replica) with `initial_resource_versions` gets
//! only what really changed. Each snapshot also lists what changed since the one before, so
//! a caught-up client does not diff the whole world.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use mesh_proto::discovery::Resource;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::translate::Outputs;

/// Type URLs served, in the order pushes go out (addresses before the policies naming them).
pub const TYPES: [&str; 4] = [
    mesh_proto::ADDRESS_TYPE_URL,
    mesh_proto::AUTHORIZATION_TYPE_URL,
    mesh_proto::SERVICE_ROUTES_TYPE_URL,
    mesh_proto::WAYPOINT_POLICY_TYPE_URL,
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
                aliases: Vec::new(),
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
        let a = entries(TYPES[0], &out.addresses, prev(TYPES[0]).map(|e| (&po.addresses, e)));
        types.insert(TYPES[0], a);
        let b = entries(
            TYPES[1],
            &out.authorizations,
            prev(TYPES[1]).map(|e| (&po.authorizations, e)),
        );
        types.insert(TYPES[1], b);
        let c = entries(
            TYPES[2],
            &out.service_routes,
            prev(TYPES[2]).map(|e| (&po.service_routes, e)),
        );
        types.insert(TYPES[2], c);
        let d = entries(
            TYPES[3],
            &out.waypoint_policies,
            prev(TYPES[3]).map(|e| (&po.waypoint_policies, e)),
        );
        types.insert(TYPES[3], d);
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
        }
    }

    /// Number of names changed in this generation, over all types.
    pub fn changes(&self) -> usize {
        self.changed.values().map(BTreeSet::len).sum()
    }
}
