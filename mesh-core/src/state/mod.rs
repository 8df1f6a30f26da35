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

pub use model::{
    AppProtocol, GatewayAddress, GatewayDestination, PortMapping, ResourceError, Service, Tunnel, Workload,
};

use crate::rbac::{Policy, Scope};

/// One snapshot of everything known.
#[derive(Clone, Debug, Default)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    /// network -> address -> workload
    workload_by_ip: HashMap<String, HashMap<IpAddr, Arc<Workload>>>,
    services: HashMap<String, Arc<Service>>,
    /// network -> VIP -> service
    service_by_vip: HashMap<String, HashMap<IpAddr, Arc<Service>>>,
    /// service key -> workloads selecting it
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    policies: HashMap<String, Arc<Policy>>,
    global_policies: BTreeSet<String>,
    namespace_policies: HashMap<String, BTreeSet<String>>,
    /// service key -> (service port, declared protocol) for ports that declare one. Beside
    /// the services rather than in [`PortMapping`], which many callers build field by field.
    port_protocols: HashMap<String, Vec<(u16, AppProtocol)>>,
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
        self.workload_by_ip.get(network)?.get(&ip)
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(network)?.get(&ip)
    }

    /// The protocol service `key` ("ns/hostname") declares on `port` (`Unknown` if none).
    pub fn port_protocol(&self, key: &str, port: u16) -> AppProtocol {
        self.port_protocols
            .get(key)
            .and_then(|ps| ps.iter().find(|(p, _)| *p == port))
            .map_or(AppProtocol::Unknown, |(_, proto)| *proto)
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
        let w = Arc::new(w);
        let by_ip = self.workload_by_ip.entry(w.network.clone()).or_default();
        for ip in &w.addresses {
            by_ip.insert(*ip, w.clone());
        }
        for (svc, _) in &w.services {
            self.endpoints.entry(svc.clone()).or_default().push(w.clone());
        }
        self.workloads.insert(w.uid.clone(), w);
    }

    pub fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        if let Some(by_ip) = self.workload_by_ip.get_mut(&old.network) {
            for ip in &old.addresses {
                // Only if the address still points at this workload (not a newer owner).
                if by_ip.get(ip).is_some_and(|w| w.uid == uid) {
                    by_ip.remove(ip);
                }
            }
        }
        for (svc, _) in &old.services {
            if let Some(list) = self.endpoints.get_mut(svc) {
                list.retain(|w| w.uid != uid);
                if list.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        true
    }

    pub fn upsert_service(&mut self, s: Service) {
        let key = s.key();
        self.remove_service(&key);
        let s = Arc::new(s);
        for (net, ip) in &s.vips {
            self.service_by_vip
                .entry(net.clone())
                .or_default()
                .insert(*ip, s.clone());
        }
        self.services.insert(key, s);
    }

    pub fn remove_service(&mut self, key: &str) -> bool {
        self.port_protocols.remove(key);
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for (net, ip) in &old.vips {
            if let Some(by_vip) = self.service_by_vip.get_mut(net) {
                if by_vip.get(ip).is_some_and(|s| s.key() == key) {
                    by_vip.remove(ip);
                }
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
            Some(pb::address::Type::Service(s)) => {
                let service = Service::try_from(s)?;
                let key = service.key();
                self.upsert_service(service);
                let declared: Vec<(u16, AppProtocol)> = s
                    .ports
                    .iter()
                    .filter_map(|p| Some((u16::try_from(p.service_port).ok()?, AppProtocol::from(p.app_protocol))))
                    .filter(|(_, proto)| proto.is_http())
                    .collect();
                if !declared.is_empty() {
                    self.port_protocols.insert(key, declared);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn service(ports: &[(u32, i32)]) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                ports: ports
                    .iter()
                    .map(|&(port, app_protocol)| pb::Port {
                        service_port: port,
                        target_port: 8080,
                        app_protocol,
                    })
                    .collect(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn declared_port_protocols_follow_the_service() {
        let key = "shop/web.shop.svc.cluster.local";
        let mut s = State::default();
        s.apply_address(&service(&[(80, pb::AppProtocol::Http11 as i32), (5432, 0), (9000, 42)]))
            .expect("valid service");
        assert_eq!(s.port_protocol(key, 80), AppProtocol::Http11);
        assert!(!s.port_protocol(key, 5432).is_http());
        assert!(
            s.port_protocol(key, 9000).is_http(),
            "an unknown protocol is not opaque"
        );
        assert!(!s.port_protocol(key, 81).is_http());
        // An update that no longer declares the port, then removal, forget it.
        s.apply_address(&service(&[(80, 0)])).expect("valid service");
        assert!(!s.port_protocol(key, 80).is_http());
        s.apply_address(&service(&[(80, pb::AppProtocol::Grpc as i32)]))
            .expect("valid service");
        assert!(s.remove_service(key));
        assert!(!s.port_protocol(key, 80).is_http());
    }
}
