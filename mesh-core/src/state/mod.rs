//! Workload, service and policy state with the indexes the proxy needs, held as an immutable
//! snapshot swapped atomically on every update: readers never lock, and a connection keeps the
//! snapshot it started with.

pub mod model;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mesh_proto::{security as secpb, workload as pb};
use tokio::sync::watch;

pub use model::{GatewayAddress, GatewayDestination, PortMapping, ResourceError, Service, Tunnel, Workload};

use crate::rbac::{Policy, Scope};

/// One snapshot of everything known.
#[derive(Clone, Debug, Default)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    workload_by_ip: HashMap<(String, IpAddr), String>,
    services: HashMap<String, Arc<Service>>,
    service_by_vip: HashMap<(String, IpAddr), String>,
    /// service key -> workload uids selecting it
    endpoints: HashMap<String, BTreeSet<String>>,
    policies: HashMap<String, Arc<Policy>>,
    global_policies: BTreeSet<String>,
    namespace_policies: HashMap<String, BTreeSet<String>>,
}

/// Where an address points.
#[derive(Clone, Debug)]
pub enum Destination {
    Service(Arc<Service>),
    Workload(Arc<Workload>),
}

impl State {
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip
            .get(&(network.to_owned(), ip))
            .and_then(|uid| self.workloads.get(uid))
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip
            .get(&(network.to_owned(), ip))
            .and_then(|k| self.services.get(k))
    }

    /// A service VIP first, then a workload IP.
    pub fn lookup(&self, network: &str, ip: IpAddr) -> Option<Destination> {
        if let Some(s) = self.service_by_vip(network, ip) {
            return Some(Destination::Service(s.clone()));
        }
        self.workload_by_ip(network, ip)
            .map(|w| Destination::Workload(w.clone()))
    }

    /// Workloads selected by a service, healthy ones only unless the service allows all.
    pub fn endpoints(&self, service: &Service) -> Vec<Arc<Workload>> {
        let key = service.key();
        self.endpoints
            .get(&key)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| w.healthy || !service.only_healthy)
            .cloned()
            .collect()
    }

    /// Global, namespace and selector policies that apply to `w`.
    pub fn policies_for<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Policy> + 'a {
        self.global_policies
            .iter()
            .chain(self.namespace_policies.get(&w.namespace).into_iter().flatten())
            .chain(w.authorization_policies.iter())
            .filter_map(|k| self.policies.get(k))
            .map(|p| p.as_ref())
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }

    /// Inserts or replaces a workload (keyed by uid).
    pub fn upsert_workload(&mut self, w: Workload) {
        self.remove_workload(&w.uid);
        for ip in &w.addresses {
            self.workload_by_ip.insert((w.network.clone(), *ip), w.uid.clone());
        }
        for svc in w.services.keys() {
            self.endpoints.entry(svc.clone()).or_default().insert(w.uid.clone());
        }
        self.workloads.insert(w.uid.clone(), Arc::new(w));
    }

    pub fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for ip in &old.addresses {
            let k = (old.network.clone(), *ip);
            if self.workload_by_ip.get(&k).map(String::as_str) == Some(uid) {
                self.workload_by_ip.remove(&k);
            }
        }
        for svc in old.services.keys() {
            if let Some(set) = self.endpoints.get_mut(svc) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        true
    }

    pub fn upsert_service(&mut self, s: Service) {
        let key = s.key();
        self.remove_service(&key);
        for (net, ip) in &s.vips {
            self.service_by_vip.insert((net.clone(), *ip), key.clone());
        }
        self.services.insert(key, Arc::new(s));
    }

    pub fn remove_service(&mut self, key: &str) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for (net, ip) in &old.vips {
            let k = (net.clone(), *ip);
            if self.service_by_vip.get(&k).map(String::as_str) == Some(key) {
                self.service_by_vip.remove(&k);
            }
        }
        true
    }

    pub fn upsert_policy(&mut self, p: Policy) {
        let key = p.key();
        self.remove_policy(&key);
        match p.scope {
            Scope::Global => {
                self.global_policies.insert(key.clone());
            }
            Scope::Namespace => {
                self.namespace_policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .insert(key.clone());
            }
            Scope::WorkloadSelector => {}
        }
        self.policies.insert(key, Arc::new(p));
    }

    pub fn remove_policy(&mut self, key: &str) -> bool {
        let Some(old) = self.policies.remove(key) else {
            return false;
        };
        self.global_policies.remove(key);
        if let Some(set) = self.namespace_policies.get_mut(&old.namespace) {
            set.remove(key);
        }
        true
    }

    /// Applies one `istio.workload.Address` resource.
    pub fn apply_address(&mut self, a: &pb::Address) -> Result<(), ResourceError> {
        match &a.r#type {
            Some(pb::address::Type::Workload(w)) => self.upsert_workload(Workload::try_from(w)?),
            Some(pb::address::Type::Service(s)) => self.upsert_service(Service::try_from(s)?),
            None => return Err(ResourceError::new("address.type", "neither workload nor service set")),
        }
        Ok(())
    }

    /// Applies one `istio.security.Authorization` resource.
    pub fn apply_authorization(&mut self, a: &secpb::Authorization) -> Result<(), ResourceError> {
        self.upsert_policy(Policy::try_from(a)?);
        Ok(())
    }

    /// Removes an Address resource by name: a workload uid or a service "ns/hostname".
    pub fn remove_address(&mut self, name: &str) -> bool {
        self.remove_workload(name) || self.remove_service(name)
    }
}

/// The shared, atomically swapped state plus a change signal.
pub struct StateStore {
    current: ArcSwap<State>,
    writer: Mutex<()>,
    version: watch::Sender<u64>,
}

impl Default for StateStore {
    fn default() -> Self {
        StateStore {
            current: ArcSwap::from_pointee(State::default()),
            writer: Mutex::new(()),
            version: watch::Sender::new(0),
        }
    }
}

impl StateStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current snapshot; lock-free.
    pub fn load(&self) -> Arc<State> {
        self.current.load_full()
    }

    /// Applies `f` to a copy of the state and publishes it in one step.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = State::clone(&self.current.load());
        let r = f(&mut next);
        self.current.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
        r
    }

    /// Fires after every update (used to re-check live connections against new policy).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
