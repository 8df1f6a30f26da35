//! A local YAML file as a source of workloads, services and policies, for standalone runs and
//! tests. The file mirrors the xDS messages in camelCase:
//!
//! ```yaml
//! workloads:
//!   - uid: Kubernetes//Pod/default/client
//!     name: client
//!     namespace: default
//!     addresses: [10.0.0.1]
//!     protocol: HBONE            # or NONE (default)
//!     serviceAccount: client
//!     services:
//!       default/server.default.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
//!     waypoint: {address: 10.0.0.9, hbonePort: 15008}
//!   - uid: c2//Pod/default/remote  # on another network, reached through its gateway
//!     network: net2
//!     clusterId: c2
//!     networkGateway: {address: 192.0.2.10, network: net2, hbonePort: 15008}
//! services:
//!   - name: server
//!     namespace: default
//!     hostname: server.default.svc.cluster.local
//!     vips: [10.96.0.1]
//!     ports: [{servicePort: 80, targetPort: 8080}]
//! policies:
//!   - name: allow-client
//!     namespace: default
//!     scope: Namespace           # Global | Namespace | WorkloadSelector
//!     action: Allow              # Allow | Deny
//!     groups:
//!       - rules:
//!           - matches:
//!               - principals: [{exact: cluster.local/ns/default/sa/client}]
//!                 sourceIps: [10.0.0.0/8]
//! ```
//!
//! Entries are converted to the wire messages and applied with the same
//! [`State::apply_address`] / [`State::apply_authorization`] the xDS client uses, so both
//! sources validate identically. An entry that is invalid (unknown field, bad value, failed
//! validation) is reported with file, list, index and reason and skipped; the rest applies.
//! A file that cannot be read or parsed as a whole keeps the previously applied state: a
//! half-saved file must not wipe the mesh's policies.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use mesh_proto::{security as secpb, workload as pb};
use serde::Deserialize;
use serde_yaml::Value;

use super::StoreKey;
use crate::state::model::ip_to_bytes;
use crate::state::{State, StateStore};

/// The file as a whole could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("reading {0}")]
    Read(#[from] crate::input_file::InputFileError),
    #[error("parsing {path}: {source}")]
    Yaml { path: String, source: serde_yaml::Error },
    #[error("parsing {0}: the parser thread panicked")]
    Panicked(String),
}

/// One entry of the file that was skipped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {list}[{index}]{}: {reason}", .name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default())]
pub struct EntryError {
    pub file: String,
    /// `workloads`, `services` or `policies`.
    pub list: &'static str,
    pub index: usize,
    /// The entry's uid or name, when it has one.
    pub name: Option<String>,
    pub reason: String,
}

/// Where an entry came from.
#[derive(Clone, Debug)]
struct Origin {
    list: &'static str,
    index: usize,
    name: Option<String>,
}

/// The parsed file: entries converted to wire messages, and the entries that did not parse.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    file: String,
    addresses: Vec<(Origin, pb::Address)>,
    policies: Vec<(Origin, secpb::Authorization)>,
    invalid: Vec<EntryError>,
}

/// Largest local state file read (a 10,000-workload file is about 5 MiB).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Reads and parses `path`. Entries that do not parse are kept as errors in the result, to be
/// reported when it is applied.
pub fn load(path: &Path) -> Result<LocalConfig, LocalError> {
    let text = crate::input_file::read_text(path, MAX_FILE_BYTES)?;
    parse(&path.display().to_string(), &text)
}

/// Parses file content; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<LocalConfig, LocalError> {
    // An empty document is an empty configuration, not an error.
    let doc: Option<FileDoc> = serde_yaml::from_str(text).map_err(|source| LocalError::Yaml {
        path: file.to_owned(),
        source,
    })?;
    let doc = doc.unwrap_or_default();
    let mut cfg = LocalConfig {
        file: file.to_owned(),
        addresses: Vec::new(),
        policies: Vec::new(),
        invalid: Vec::new(),
    };
    for (index, v) in doc.workloads.unwrap_or_default().into_iter().enumerate() {
        let origin = Origin {
            list: "workloads",
            index,
            name: entry_name(&v, &["uid", "name"]),
        };
        match serde_yaml::from_value::<WorkloadEntry>(v)
            .map_err(|e| e.to_string())
            .and_then(WorkloadEntry::into_proto)
        {
            Ok(w) => cfg.addresses.push((origin, w)),
            Err(reason) => cfg.invalid.push(cfg_error(file, origin, reason)),
        }
    }
    for (index, v) in doc.services.unwrap_or_default().into_iter().enumerate() {
        let origin = Origin {
            list: "services",
            index,
            name: entry_name(&v, &["hostname", "name"]),
        };
        match serde_yaml::from_value::<ServiceEntry>(v)
            .map_err(|e| e.to_string())
            .and_then(ServiceEntry::into_proto)
        {
            Ok(s) => cfg.addresses.push((origin, s)),
            Err(reason) => cfg.invalid.push(cfg_error(file, origin, reason)),
        }
    }
    for (index, v) in doc.policies.unwrap_or_default().into_iter().enumerate() {
        let origin = Origin {
            list: "policies",
            index,
            name: entry_name(&v, &["name"]),
        };
        match serde_yaml::from_value::<PolicyEntry>(v) {
            Ok(p) => cfg.policies.push((origin, p.into_proto())),
            Err(e) => cfg.invalid.push(cfg_error(file, origin, e.to_string())),
        }
    }
    Ok(cfg)
}

fn cfg_error(file: &str, origin: Origin, reason: String) -> EntryError {
    EntryError {
        file: file.to_owned(),
        list: origin.list,
        index: origin.index,
        name: origin.name,
        reason,
    }
}

/// The first of `keys` that is a string in the entry, to name it in errors.
fn entry_name(v: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| v.get(k).and_then(Value::as_str))
        .map(str::to_owned)
}

impl LocalConfig {
    /// Number of entries that parsed (whether they also validate is known when applied).
    pub fn len(&self) -> usize {
        self.addresses.len() + self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies every entry to `state` and returns the entries that were skipped (parse and
    /// validation errors), each also logged as a warning.
    pub fn apply_to(&self, state: &mut State) -> Vec<EntryError> {
        self.apply_tracked(state).1
    }

    /// A fresh state holding this file's entries, and the skipped entries.
    pub fn to_state(&self) -> (State, Vec<EntryError>) {
        let mut state = State::default();
        let errors = self.apply_to(&mut state);
        (state, errors)
    }

    /// [`LocalConfig::apply_to`], also returning the keys applied so that they can be removed
    /// when the file changes.
    pub(crate) fn apply_tracked(&self, state: &mut State) -> (Vec<StoreKey>, Vec<EntryError>) {
        let mut errors = self.invalid.clone();
        let mut seen: HashMap<StoreKey, Origin> = HashMap::new();
        let mut applied = Vec::new();
        let mut record = |origin: &Origin, result: Result<StoreKey, String>| match result {
            Ok(key) => applied.push(key),
            Err(reason) => errors.push(cfg_error(&self.file, origin.clone(), reason)),
        };
        for (origin, a) in &self.addresses {
            let result = StoreKey::of_address(a)
                .ok_or_else(|| "neither workload nor service".to_owned())
                .and_then(|key| claim(&mut seen, origin, key))
                .and_then(|key| address_taken(state, a).map_or(Ok(key), Err))
                .and_then(|key| state.apply_address(a).map(|()| key).map_err(|e| e.to_string()));
            record(origin, result);
        }
        for (origin, p) in &self.policies {
            let result = claim(&mut seen, origin, StoreKey::of_authorization(p))
                .and_then(|key| state.apply_authorization(p).map(|()| key).map_err(|e| e.to_string()));
            record(origin, result);
        }
        for e in &errors {
            tracing::warn!(
                file = %e.file,
                list = e.list,
                index = e.index,
                name = e.name.as_deref().unwrap_or(""),
                reason = %e.reason,
                "skipping invalid local config entry"
            );
        }
        (applied, errors)
    }
}

/// Why workload `a` cannot take its addresses: one already belongs to another workload of
/// the same network (the later entry would silently take over the first one's traffic).
fn address_taken(state: &State, a: &pb::Address) -> Option<String> {
    let Some(pb::address::Type::Workload(w)) = &a.r#type else {
        return None;
    };
    let wl = crate::state::Workload::try_from(w).ok()?;
    wl.addresses.iter().find_map(|ip| {
        let other = state.workload_by_ip(&wl.network, *ip)?;
        (other.uid != wl.uid).then(|| format!("address {ip} already belongs to workload {}", other.uid))
    })
}

/// Reserves `key` for the entry at `origin`. Two entries for one key would silently shadow
/// each other, so the second is reported instead.
fn claim(seen: &mut HashMap<StoreKey, Origin>, origin: &Origin, key: StoreKey) -> Result<StoreKey, String> {
    match seen.entry(key) {
        Entry::Occupied(first) => Err(format!(
            "duplicate of {}[{}] ({})",
            first.get().list,
            first.get().index,
            first.key().name()
        )),
        Entry::Vacant(slot) => {
            let key = slot.key().clone();
            slot.insert(origin.clone());
            Ok(key)
        }
    }
}

/// The result of [`LocalSource::reload`].
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The content is what was last seen; nothing was done.
    Unchanged,
    /// The file was applied, replacing what it applied before; `skipped` entries were invalid.
    Applied { applied: usize, skipped: Vec<EntryError> },
}

/// One file applied to a store, replacing what it applied before on every change.
pub struct LocalSource {
    path: PathBuf,
    store: Arc<StateStore>,
    /// Keys applied from the file last time, removed before the next version is applied.
    loaded: Vec<StoreKey>,
    /// Hash of the content last seen (applied or rejected), so an unchanged file is not
    /// re-applied (which would wake every subscriber of the store) nor re-reported.
    last_hash: Option<u64>,
}

impl LocalSource {
    pub fn new(path: impl Into<PathBuf>, store: Arc<StateStore>) -> Self {
        LocalSource {
            path: path.into(),
            store,
            loaded: Vec::new(),
            last_hash: None,
        }
    }

    /// Reads the file and, when its content changed, applies it in one store update that
    /// also removes everything the previous version applied. On an error the store keeps the
    /// previous version.
    pub fn reload(&mut self) -> Result<Reload, LocalError> {
        let text = crate::input_file::read_text(&self.path, MAX_FILE_BYTES)?;
        let mut hasher = DefaultHasher::new();
        text.hash(&mut hasher);
        let hash = hasher.finish();
        if self.last_hash == Some(hash) {
            return Ok(Reload::Unchanged);
        }
        self.last_hash = Some(hash);
        // Parse on a short-lived thread: its allocator arena then holds only parse garbage,
        // freed as a whole, while the state is built here with compact allocations. Parsing in
        // place scatters the long-lived state among freed parse buffers, and a 10,000-workload
        // file would leave ~50 MB of unreturnable fragments behind.
        let file = self.path.display().to_string();
        let cfg = std::thread::scope(|s| s.spawn(|| parse(&file, &text)).join())
            .unwrap_or_else(|_| Err(LocalError::Panicked(file.clone())))?;
        let previous = std::mem::take(&mut self.loaded);
        let (loaded, skipped) = self.store.update(|state| {
            for key in &previous {
                key.remove(state);
            }
            cfg.apply_tracked(state)
        });
        let applied = loaded.len();
        self.loaded = loaded;
        Ok(Reload::Applied { applied, skipped })
    }
}

/// Applies `path` to `store` now and again whenever its content changes, checking every
/// `poll`. Runs forever. The content is read and hashed on every poll instead of trusting
/// the modification time, whose granularity can hide a quick rewrite of the same size; the
/// file is small, so the read is done in place rather than on a blocking thread.
pub async fn watch(path: impl Into<PathBuf>, store: Arc<StateStore>, poll: Duration) {
    LocalSource::new(path, store).watch(poll).await
}

impl LocalSource {
    /// Keeps applying the file as it changes (see [`watch`]); a source that was already
    /// loaded once does not apply the same content again. Reading and parsing run on the
    /// blocking pool: a large file must not stall the proxy's runtime.
    pub async fn watch(self, poll: Duration) {
        let mut source = self;
        let mut last_error: Option<String> = None;
        let mut ticker = tokio::time::interval(poll.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (back, result) = match tokio::task::spawn_blocking(move || {
                let r = source.reload();
                (source, r)
            })
            .await
            {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = %e, "local config reload task failed; stopping the watch");
                    return;
                }
            };
            source = back;
            match result {
                Ok(Reload::Unchanged) => {}
                Ok(Reload::Applied { applied, skipped }) => {
                    last_error = None;
                    tracing::info!(
                        file = %source.path.display(),
                        applied,
                        skipped = skipped.len(),
                        "applied local config"
                    );
                }
                Err(e) => {
                    // Report an error once, not on every poll.
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        tracing::error!(error = %msg, "local config unusable, keeping the previous state");
                        last_error = Some(msg);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// File format. Every struct rejects unknown fields so that a typo is reported, not ignored.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    /// Kept as raw values so that each entry is parsed (and rejected) on its own.
    #[serde(default)]
    workloads: Option<Vec<Value>>,
    #[serde(default)]
    services: Option<Vec<Value>>,
    #[serde(default)]
    policies: Option<Vec<Value>>,
}

#[derive(Debug, Default, Deserialize)]
enum Protocol {
    #[default]
    #[serde(rename = "NONE")]
    None,
    #[serde(rename = "HBONE")]
    Hbone,
}

#[derive(Debug, Default, Deserialize)]
enum Health {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortEntry {
    service_port: u32,
    target_port: u32,
}

impl PortEntry {
    fn to_proto(&self) -> pb::Port {
        pb::Port {
            service_port: self.service_port,
            target_port: self.target_port,
            app_protocol: pb::AppProtocol::Unknown as i32,
        }
    }
}

/// A waypoint: an `address` (on `network`, by default the entry's own) or a `hostname` given
/// as `ns/hostname`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WaypointEntry {
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    hbone_port: u32,
}

impl WaypointEntry {
    fn to_proto(&self, default_network: &str) -> Result<pb::GatewayAddress, String> {
        use pb::gateway_address::Destination;
        let destination = match (&self.address, &self.hostname) {
            (Some(ip), None) => Destination::Address(pb::NetworkAddress {
                network: self.network.clone().unwrap_or_else(|| default_network.to_owned()),
                address: ip_to_bytes(*ip),
            }),
            (None, Some(h)) => {
                let (namespace, hostname) = h
                    .split_once('/')
                    .ok_or_else(|| format!("waypoint.hostname {h:?} is not of the form ns/hostname"))?;
                Destination::Hostname(pb::NamespacedHostname {
                    namespace: namespace.to_owned(),
                    hostname: hostname.to_owned(),
                })
            }
            _ => return Err("waypoint: exactly one of address and hostname must be set".to_owned()),
        };
        Ok(pb::GatewayAddress {
            destination: Some(destination),
            hbone_mtls_port: self.hbone_port,
            hbone_single_tls_port: 0,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadEntry {
    uid: String,
    name: String,
    namespace: String,
    addresses: Vec<IpAddr>,
    network: String,
    protocol: Protocol,
    trust_domain: String,
    service_account: String,
    node: String,
    canonical_name: String,
    canonical_revision: String,
    workload_name: String,
    waypoint: Option<WaypointEntry>,
    /// The east-west gateway of the workload's network (same shape as `waypoint`).
    network_gateway: Option<WaypointEntry>,
    cluster_id: String,
    services: BTreeMap<String, Vec<PortEntry>>,
    authorization_policies: Vec<String>,
    status: Health,
}

impl WorkloadEntry {
    fn into_proto(self) -> Result<pb::Address, String> {
        let waypoint = self.waypoint.as_ref().map(|w| w.to_proto(&self.network)).transpose()?;
        let network_gateway = self
            .network_gateway
            .as_ref()
            .map(|w| w.to_proto(&self.network))
            .transpose()?;
        let services = self
            .services
            .iter()
            .map(|(k, ports)| {
                let ports = ports.iter().map(PortEntry::to_proto).collect();
                (k.clone(), pb::PortList { ports })
            })
            .collect();
        let w = pb::Workload {
            uid: self.uid,
            name: self.name,
            namespace: self.namespace,
            addresses: self.addresses.into_iter().map(ip_to_bytes).collect(),
            network: self.network,
            tunnel_protocol: match self.protocol {
                Protocol::None => pb::TunnelProtocol::None,
                Protocol::Hbone => pb::TunnelProtocol::Hbone,
            } as i32,
            trust_domain: self.trust_domain,
            service_account: self.service_account,
            waypoint,
            network_gateway,
            cluster_id: self.cluster_id,
            node: self.node,
            canonical_name: self.canonical_name,
            canonical_revision: self.canonical_revision,
            workload_name: self.workload_name,
            services,
            authorization_policies: self.authorization_policies,
            status: match self.status {
                Health::Healthy => pb::WorkloadStatus::Healthy,
                Health::Unhealthy => pb::WorkloadStatus::Unhealthy,
            } as i32,
            ..Default::default()
        };
        Ok(pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    namespace: String,
    hostname: String,
    vips: Vec<IpAddr>,
    /// Network of the VIPs.
    network: String,
    ports: Vec<PortEntry>,
    subject_alt_names: Vec<String>,
    waypoint: Option<WaypointEntry>,
}

impl ServiceEntry {
    fn into_proto(self) -> Result<pb::Address, String> {
        let waypoint = self.waypoint.as_ref().map(|w| w.to_proto(&self.network)).transpose()?;
        let s = pb::Service {
            name: self.name,
            namespace: self.namespace,
            hostname: self.hostname,
            addresses: self
                .vips
                .into_iter()
                .map(|ip| pb::NetworkAddress {
                    network: self.network.clone(),
                    address: ip_to_bytes(ip),
                })
                .collect(),
            ports: self.ports.iter().map(PortEntry::to_proto).collect(),
            subject_alt_names: self.subject_alt_names,
            waypoint,
            ..Default::default()
        };
        Ok(pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        })
    }
}

#[derive(Debug, Deserialize)]
enum ScopeEntry {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Deserialize)]
enum ActionEntry {
    Allow,
    Deny,
}

/// `scope` and `action` are required: a policy's effect should never rest on a default.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyEntry {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    scope: ScopeEntry,
    action: ActionEntry,
    #[serde(default)]
    groups: Vec<GroupEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GroupEntry {
    rules: Vec<RuleEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RuleEntry {
    matches: Vec<MatchEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct MatchEntry {
    namespaces: Vec<StringMatchEntry>,
    not_namespaces: Vec<StringMatchEntry>,
    principals: Vec<StringMatchEntry>,
    not_principals: Vec<StringMatchEntry>,
    source_ips: Vec<Cidr>,
    not_source_ips: Vec<Cidr>,
    destination_ips: Vec<Cidr>,
    not_destination_ips: Vec<Cidr>,
    destination_ports: Vec<u32>,
    not_destination_ports: Vec<u32>,
}

/// `{exact: v}`, `{prefix: v}`, `{suffix: v}` or `{presence: {}}` (or `presence: true`).
/// Parsed as a struct and checked by hand: serde_yaml cannot read a map-shaped enum out of an
/// already parsed `Value`.
#[derive(Debug, Deserialize)]
#[serde(try_from = "StringMatchFields")]
enum StringMatchEntry {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatchFields {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    presence: Option<Value>,
}

impl TryFrom<StringMatchFields> for StringMatchEntry {
    type Error = String;

    fn try_from(f: StringMatchFields) -> Result<Self, String> {
        match (f.exact, f.prefix, f.suffix, f.presence) {
            (Some(s), None, None, None) => Ok(StringMatchEntry::Exact(s)),
            (None, Some(s), None, None) => Ok(StringMatchEntry::Prefix(s)),
            (None, None, Some(s), None) => Ok(StringMatchEntry::Suffix(s)),
            (None, None, None, Some(v)) => match v {
                Value::Bool(true) => Ok(StringMatchEntry::Presence),
                Value::Mapping(m) if m.is_empty() => Ok(StringMatchEntry::Presence),
                other => Err(format!("presence must be {{}} or true, not {other:?}")),
            },
            _ => Err("a string match needs exactly one of exact, prefix, suffix and presence".to_owned()),
        }
    }
}

/// A CIDR, or a bare address meaning just that host. The prefix length is checked by the
/// shared validation, not here, so that both sources report it the same way.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct Cidr {
    ip: IpAddr,
    len: u32,
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IP address or CIDR");
        match s.split_once('/') {
            Some((ip, len)) => Ok(Cidr {
                ip: ip.parse().map_err(|_| bad())?,
                len: len.parse().map_err(|_| bad())?,
            }),
            None => {
                let ip: IpAddr = s.parse().map_err(|_| bad())?;
                Ok(Cidr {
                    ip,
                    len: u32::from(IpNet::from(ip).prefix_len()),
                })
            }
        }
    }
}

impl PolicyEntry {
    fn into_proto(self) -> secpb::Authorization {
        fn strings(ms: Vec<StringMatchEntry>) -> Vec<secpb::StringMatch> {
            use secpb::string_match::MatchType;
            ms.into_iter()
                .map(|m| secpb::StringMatch {
                    match_type: Some(match m {
                        StringMatchEntry::Exact(s) => MatchType::Exact(s),
                        StringMatchEntry::Prefix(s) => MatchType::Prefix(s),
                        StringMatchEntry::Suffix(s) => MatchType::Suffix(s),
                        StringMatchEntry::Presence => MatchType::Presence(()),
                    }),
                })
                .collect()
        }
        fn cidrs(cs: Vec<Cidr>) -> Vec<secpb::Address> {
            cs.into_iter()
                .map(|c| secpb::Address {
                    address: ip_to_bytes(c.ip),
                    length: c.len,
                })
                .collect()
        }
        let groups = self
            .groups
            .into_iter()
            .map(|g| secpb::Group {
                rules: g
                    .rules
                    .into_iter()
                    .map(|r| secpb::Rules {
                        matches: r
                            .matches
                            .into_iter()
                            .map(|m| secpb::Match {
                                namespaces: strings(m.namespaces),
                                not_namespaces: strings(m.not_namespaces),
                                principals: strings(m.principals),
                                not_principals: strings(m.not_principals),
                                source_ips: cidrs(m.source_ips),
                                not_source_ips: cidrs(m.not_source_ips),
                                destination_ips: cidrs(m.destination_ips),
                                not_destination_ips: cidrs(m.not_destination_ips),
                                destination_ports: m.destination_ports,
                                not_destination_ports: m.not_destination_ports,
                                ..Default::default()
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        secpb::Authorization {
            name: self.name,
            namespace: self.namespace,
            scope: match self.scope {
                ScopeEntry::Global => secpb::Scope::Global,
                ScopeEntry::Namespace => secpb::Scope::Namespace,
                ScopeEntry::WorkloadSelector => secpb::Scope::WorkloadSelector,
            } as i32,
            action: match self.action {
                ActionEntry::Allow => secpb::Action::Allow,
                ActionEntry::Deny => secpb::Action::Deny,
            } as i32,
            groups,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbac::{Action, Scope, StringMatch};
    use crate::state::{GatewayDestination, PortMapping, Tunnel};

    const DEADLINE: Duration = Duration::from_secs(10);

    const VALID: &str = r#"
workloads:
  - uid: Kubernetes//Pod/default/client
    name: client
    namespace: default
    addresses: [10.0.0.1]
    protocol: HBONE
    serviceAccount: client-sa
    node: node-1
    canonicalName: client
    canonicalRevision: v1
    workloadName: client
    services:
      default/server.default.svc.cluster.local:
        - {servicePort: 80, targetPort: 8080}
    waypoint: {address: 10.0.0.9, hbonePort: 15008}
    authorizationPolicies: [default/selected]
    status: Unhealthy
services:
  - name: server
    namespace: default
    hostname: server.default.svc.cluster.local
    vips: [10.96.0.1]
    ports: [{servicePort: 80, targetPort: 8080}]
    subjectAltNames: [spiffe://cluster.local/ns/default/sa/server]
policies:
  - name: allow-client
    namespace: default
    scope: Namespace
    action: Allow
    groups:
      - rules:
          - matches:
              - principals: [{exact: cluster.local/ns/default/sa/client-sa}]
                notNamespaces: [{prefix: kube-}, {presence: {}}]
                sourceIps: [10.0.0.0/8, 192.168.1.1]
                destinationPorts: [8080]
"#;

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write config");
    }

    #[test]
    fn valid_file_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        write(&path, VALID);
        let cfg = load(&path).expect("load");
        assert_eq!(cfg.len(), 3, "{:?}", cfg.invalid);
        let (state, errors) = cfg.to_state();
        assert!(errors.is_empty(), "{errors:?}");

        let w = state.workload("Kubernetes//Pod/default/client").expect("workload");
        assert_eq!(w.addresses, vec!["10.0.0.1".parse::<IpAddr>().expect("ip")]);
        assert_eq!(w.tunnel, Tunnel::Hbone);
        assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/default/sa/client-sa");
        assert_eq!(
            w.service_ports("default/server.default.svc.cluster.local"),
            Some(
                &[PortMapping {
                    service_port: 80,
                    target_port: 8080
                }][..]
            )
        );
        let wp = w.waypoint.as_ref().expect("waypoint");
        assert_eq!(
            wp.destination,
            GatewayDestination::Address {
                network: String::new(),
                ip: "10.0.0.9".parse().expect("ip")
            }
        );
        assert!(!w.healthy);
        assert_eq!(w.authorization_policies, vec!["default/selected".to_owned()]);
        assert_eq!(w.canonical_revision, "v1");

        let s = state
            .service_by_vip("", "10.96.0.1".parse().expect("ip"))
            .expect("service by vip");
        assert_eq!(s.key(), "default/server.default.svc.cluster.local");
        assert_eq!(s.subject_alt_names.len(), 1);

        let p = state.policies().next().expect("policy");
        assert_eq!(
            (p.key().as_str(), p.scope, p.action),
            ("default/allow-client", Scope::Namespace, Action::Allow)
        );
        let m = &p.groups[0][0][0];
        assert_eq!(
            m.not_namespaces,
            vec![StringMatch::Prefix("kube-".into()), StringMatch::Presence]
        );
        assert_eq!(
            m.source_ips,
            vec![
                "10.0.0.0/8".parse().expect("net"),
                "192.168.1.1/32".parse().expect("net")
            ]
        );
        assert_eq!(m.destination_ports, vec![8080]);
    }

    #[test]
    fn invalid_entries_are_skipped_and_the_rest_applies() {
        let text = r#"
workloads:
  - uid: good
    namespace: default
    addresses: [10.0.0.1]
  - uid: typo
    namespace: default
    serviceAcount: oops
  - uid: bad-ip
    namespace: default
    addresses: [10.0.0.300]
  - uid: bad-port
    namespace: default
    services:
      default/x: [{servicePort: 70000, targetPort: 1}]
  - uid: good
    namespace: other
services:
  - name: nameless
    vips: [10.96.0.2]
policies:
  - name: wide
    namespace: default
    scope: Global
    action: Deny
    groups: [{rules: [{matches: [{sourceIps: [10.0.0.0/40]}]}]}]
  - name: no-action
    namespace: default
    scope: Global
  - name: ok
    namespace: default
    scope: Global
    action: Deny
  - name: two-kinds
    namespace: default
    scope: Global
    action: Deny
    groups: [{rules: [{matches: [{namespaces: [{exact: a, prefix: b}]}]}]}]
"#;
        let cfg = parse("mesh.yaml", text).expect("parse");
        let (state, errors) = cfg.to_state();
        let got: Vec<(&str, usize)> = errors.iter().map(|e| (e.list, e.index)).collect();
        let mut got = got;
        got.sort();
        assert_eq!(
            got,
            vec![
                ("policies", 0),
                ("policies", 1),
                ("policies", 3),
                ("services", 0),
                ("workloads", 1),
                ("workloads", 2),
                ("workloads", 3),
                ("workloads", 4),
            ]
        );
        let reason = |list: &str, index: usize| {
            let e = errors
                .iter()
                .find(|e| e.list == list && e.index == index)
                .expect("error present");
            assert_eq!(e.file, "mesh.yaml");
            e.reason.clone()
        };
        assert!(reason("workloads", 1).contains("unknown field `serviceAcount`"));
        assert!(reason("workloads", 3).contains("70000 is not a valid port"));
        assert!(reason("workloads", 4).contains("duplicate of workloads[0]"));
        assert!(reason("policies", 0).contains("prefix length"));
        assert!(reason("policies", 1).contains("missing field `action`"));
        assert!(reason("policies", 3).contains("exactly one of exact, prefix"));
        assert!(errors[0].to_string().starts_with("mesh.yaml: "));

        assert!(state.workload("good").is_some());
        assert_eq!(state.workloads().count(), 1);
        assert_eq!(
            state.policies().map(|p| p.key()).collect::<Vec<_>>(),
            vec!["default/ok".to_owned()]
        );
    }

    #[test]
    fn whole_file_errors() {
        assert!(matches!(parse("f", "workloads: [\n"), Err(LocalError::Yaml { .. })));
        assert!(matches!(parse("f", "workload: []\n"), Err(LocalError::Yaml { .. })));
        assert!(parse("f", "").expect("empty file").is_empty());
        assert!(parse("f", "workloads:\n").expect("null list").is_empty());
    }

    #[test]
    fn reload_replaces_and_keeps_state_on_syntax_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        let store = StateStore::new();
        let mut source = LocalSource::new(&path, store.clone());
        assert!(matches!(source.reload(), Err(LocalError::Read(_))));

        write(&path, VALID);
        assert!(matches!(source.reload(), Ok(Reload::Applied { applied: 3, .. })));
        let version = *store.subscribe().borrow();
        assert_eq!(source.reload().expect("reload"), Reload::Unchanged);
        assert_eq!(*store.subscribe().borrow(), version, "no update for unchanged content");

        write(&path, "workloads: [{uid: a, namespace: default\n");
        assert!(matches!(source.reload(), Err(LocalError::Yaml { .. })));
        assert_eq!(store.load().workloads().count(), 1, "previous state kept");
        assert_eq!(
            source.reload().expect("reload"),
            Reload::Unchanged,
            "bad content reported once"
        );

        write(&path, "workloads: [{uid: a, namespace: default}]\n");
        assert!(matches!(source.reload(), Ok(Reload::Applied { applied: 1, .. })));
        let state = store.load();
        assert!(state.workload("a").is_some());
        assert_eq!(state.workloads().count(), 1);
        assert_eq!(state.services().count(), 0);
        assert_eq!(state.policies().count(), 0);
    }

    #[test]
    fn reload_leaves_other_sources_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        let store = StateStore::new();
        let other = parse("other", "workloads: [{uid: other, namespace: default}]").expect("parse");
        store.update(|s| other.apply_to(s));
        write(&path, "workloads: [{uid: mine, namespace: default}]");
        let mut source = LocalSource::new(&path, store.clone());
        source.reload().expect("reload");
        write(&path, "workloads: []");
        source.reload().expect("reload");
        let state = store.load();
        assert!(state.workload("other").is_some());
        assert!(state.workload("mine").is_none());
    }

    #[tokio::test]
    async fn watch_picks_up_rewrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        write(&path, "workloads: [{uid: first, namespace: default}]");
        let store = StateStore::new();
        let task = tokio::spawn(watch(path.clone(), store.clone(), Duration::from_millis(10)));
        let wait_for = |uid: &'static str| {
            let store = store.clone();
            async move {
                let mut changes = store.subscribe();
                let done = async {
                    while store.load().workload(uid).is_none() {
                        changes.changed().await.expect("store alive");
                    }
                };
                tokio::time::timeout(DEADLINE, done)
                    .await
                    .unwrap_or_else(|_| panic!("timed out waiting for {uid}"));
            }
        };
        wait_for("first").await;

        // Replace the file the way editors and config management do: write, then rename.
        let tmp = dir.path().join("mesh.yaml.tmp");
        write(&tmp, "workloads: [{uid: second, namespace: default}]");
        std::fs::rename(&tmp, &path).expect("rename");
        wait_for("second").await;
        assert!(store.load().workload("first").is_none());
        task.abort();
    }

    #[tokio::test]
    async fn a_fifo_or_device_at_the_path_is_refused_and_a_later_file_applies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let store = StateStore::new();
        let mut source = LocalSource::new(path.clone(), store.clone());
        let e = source.reload().expect_err("a FIFO is not read");
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let task = tokio::spawn(source.watch(Duration::from_millis(10)));
        // The watch is not stuck on the FIFO: a regular file put in its place applies.
        let tmp = dir.path().join("mesh.yaml.tmp");
        write(&tmp, "workloads: [{uid: after-fifo, namespace: default}]");
        std::fs::rename(&tmp, &path).expect("rename");
        let mut changes = store.subscribe();
        tokio::time::timeout(DEADLINE, async {
            while store.load().workload("after-fifo").is_none() {
                changes.changed().await.expect("store alive");
            }
        })
        .await
        .expect("the regular file is applied");
        task.abort();
        let e = load(Path::new("/dev/zero")).expect_err("a device is not read");
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn a_second_workload_on_an_address_is_reported_not_applied() {
        let text = "workloads:
- {uid: first, namespace: default, addresses: [10.0.0.1]}
- {uid: second, namespace: default, addresses: [10.0.0.2, 10.0.0.1]}
";
        let cfg = parse("f", text).expect("parses");
        let (state, errors) = cfg.to_state();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].index, 1);
        assert!(
            errors[0].reason.contains("10.0.0.1 already belongs to workload first"),
            "{}",
            errors[0]
        );
        assert!(state.workload("second").is_none());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(state.workload_by_ip("", ip).map(|w| w.uid.as_str()), Some("first"));
    }
}
