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
    pub version: String,
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
}

fn version_of(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..8])
}

/// Encodes `items`, reusing the previous entry (one shared copy) when the content is equal.
fn entries<M: Message>(
    type_url: &str,
    items: &BTreeMap<String, M>,
    previous: Option<&BTreeMap<String, Arc<Entry>>>,
) -> BTreeMap<String, Arc<Entry>> {
    items
        .iter()
        .map(|(name, m)| {
            let value = m.encode_to_vec();
            let version = version_of(&value);
            if let Some(same) = previous.and_then(|p| p.get(name)).filter(|e| e.version == version) {
                return (name.clone(), same.clone());
            }
            let resource = Resource {
                version: version.clone(),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_owned(),
                    value,
                }),
                name: name.clone(),
                aliases: Vec::new(),
                ttl: None,
            };
            (name.clone(), Arc::new(Entry { version, resource }))
        })
        .collect()
}

impl Snapshot {
    /// Encodes `out` as the generation after `previous`.
    pub fn next(previous: &Snapshot, out: &Outputs, since: Option<Instant>) -> Snapshot {
        let prev = |t: &str| previous.types.get(t);
        let mut types = HashMap::new();
        types.insert(TYPES[0], entries(TYPES[0], &out.addresses, prev(TYPES[0])));
        types.insert(TYPES[1], entries(TYPES[1], &out.authorizations, prev(TYPES[1])));
        types.insert(TYPES[2], entries(TYPES[2], &out.service_routes, prev(TYPES[2])));
        types.insert(TYPES[3], entries(TYPES[3], &out.waypoint_policies, prev(TYPES[3])));
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
        }
    }

    /// Number of names changed in this generation, over all types.
    pub fn changes(&self) -> usize {
        self.changed.values().map(BTreeSet::len).sum()
    }
}
