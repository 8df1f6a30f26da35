//! Workload, service and policy state with the indexes the proxy needs, held as an immutable
//! snapshot swapped atomically on every update: readers never lock, and a connection keeps the
//! snapshot it started with.
//!
//! A VIP finds one service. When two services declare one VIP (on one network), the first to
//! declare it keeps it, whatever the order of later updates (an update of the holder keeps
//! its place); the later one is logged and reached only by name. When the holder is removed,
//! or stops declaring the VIP, the VIP goes to the next service still declaring it, in the
//! order they declared it. The last writer winning instead would let whoever pushes a
//! service at another's VIP last take that VIP's traffic.

pub mod locality;
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
    /// network -> VIP -> service: the first of `vip_claims` holding it.
    service_by_vip: HashMap<String, HashMap<IpAddr, Arc<Service>>>,
    /// network -> VIP -> keys of the services declaring it, in the order they declared it.
    vip_claims: HashMap<String, HashMap<IpAddr, Vec<String>>>,
    /// service key -> workloads selecting it
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    policies: HashMap<String, Arc<Policy>>,
    global_policies: BTreeSet<String>,
    namespace_policies: HashMap<String, BTreeSet<String>>,
    /// service key -> (service port, declared protocol) for ports that declare one. Beside
    /// the services rather than in [`PortMapping`], which many callers build field by field.
    port_protocols: HashMap<String, Vec<(u16, AppProtocol)>>,
    /// Keys of services whose load balancing is PASSTHROUGH (ServiceEntry `resolution: NONE`):
    /// connect to the address the client dialled. Beside the services for the same reason.
    passthrough: BTreeSet<String>,
    /// hostname -> keys of the services with it (one per namespace), for the DNS proxy.
    by_hostname: HashMap<String, BTreeSet<String>>,
    /// Uids of workloads whose outbound traffic may only reach registered destinations
    /// ([`OUTBOUND_POLICY_EXTENSION`] = REGISTRY_ONLY on the workload).
    registry_only: BTreeSet<String>,
    /// uid -> host name of workloads known by name only (ServiceEntry endpoints with
    /// `resolution: DNS`): the sending proxy resolves the name.
    hostnames: HashMap<String, String>,
    /// uid -> the east-west gateway through which a workload on another network is reached
    /// (the workload's `network_gateway`): double HBONE, see ztunnel's outbound.
    network_gateways: HashMap<String, GatewayAddress>,
    /// uid -> where a workload runs (its `locality`), for locality-aware endpoint choice.
    localities: HashMap<String, locality::Locality>,
    /// service key -> its locality preference (`load_balancing` STRICT or FAILOVER).
    load_policies: HashMap<String, locality::LoadPolicy>,
}

/// The `Extension` on a Workload that carries the mesh's outbound traffic policy for that
/// workload's outbound connections: a `google.protobuf.StringValue`, `REGISTRY_ONLY` or
/// `ALLOW_ANY` (also the meaning of its absence). Receivers that do not know it ignore it.
pub const OUTBOUND_POLICY_EXTENSION: &str = "ambient-mesh.io/outbound-traffic-policy";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// The extension marking a workload REGISTRY_ONLY.
pub fn registry_only_extension() -> pb::Extension {
    use prost::Message;
    pb::Extension {
        name: OUTBOUND_POLICY_EXTENSION.to_owned(),
        config: Some(prost_types::Any {
            type_url: STRING_VALUE_TYPE.to_owned(),
            value: "REGISTRY_ONLY".to_owned().encode_to_vec(),
        }),
    }
}

/// Whether a workload's extensions say REGISTRY_ONLY (anything else, or none, is ALLOW_ANY).
fn registry_only(w: &pb::Workload) -> bool {
    use prost::Message;
    w.extensions.iter().any(|e| {
        e.name == OUTBOUND_POLICY_EXTENSION
            && e.config.as_ref().is_some_and(|c| {
                c.type_url == STRING_VALUE_TYPE
                    && String::decode(c.value.as_slice()).is_ok_and(|v| v == "REGISTRY_ONLY")
            })
    })
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

    /// Whether the service connects to the dialled address (load balancing PASSTHROUGH).
    pub fn passthrough(&self, service: &Service) -> bool {
        self.passthrough.contains(&service.key())
    }

    /// Services with this hostname, by key (one per namespace at most).
    pub fn services_by_hostname<'a>(&'a self, hostname: &str) -> impl Iterator<Item = &'a Arc<Service>> + 'a {
        self.by_hostname
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|k| self.services.get(k))
    }

    /// The host name of a workload known by name only (no addresses).
    pub fn workload_hostname(&self, uid: &str) -> Option<&str> {
        self.hostnames.get(uid).map(String::as_str)
    }

    /// The network gateway of workload `uid`, if the control plane gave it one.
    pub fn network_gateway(&self, uid: &str) -> Option<&GatewayAddress> {
        self.network_gateways.get(uid)
    }

    /// Sets (or with `None` clears) the network gateway of an existing workload `uid`.
    pub fn set_network_gateway(&mut self, uid: &str, gateway: Option<GatewayAddress>) {
        match gateway {
            Some(g) if self.workloads.contains_key(uid) => {
                self.network_gateways.insert(uid.to_owned(), g);
            }
            _ => {
                self.network_gateways.remove(uid);
            }
        }
    }

    /// Whether `uid`'s outbound connections may only reach registered destinations.
    pub fn registry_only(&self, uid: &str) -> bool {
        self.registry_only.contains(uid)
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

    /// Where workload `uid` runs (empty when the control plane did not say).
    pub fn locality(&self, uid: &str) -> &locality::Locality {
        static UNKNOWN: locality::Locality = locality::Locality {
            region: String::new(),
            zone: String::new(),
            subzone: String::new(),
        };
        self.localities.get(uid).unwrap_or(&UNKNOWN)
    }

    /// Service `key`'s locality preference, if it has one.
    pub fn load_policy(&self, key: &str) -> Option<&locality::LoadPolicy> {
        self.load_policies.get(key)
    }

    /// The workloads at `ip` on any network (few networks: a map probe each).
    pub fn workloads_at(&self, ip: IpAddr) -> impl Iterator<Item = &Arc<Workload>> + '_ {
        self.workload_by_ip.values().filter_map(move |m| m.get(&ip))
    }

    /// Narrows `endpoints` of `service` to those its locality preference picks for `client`
    /// (see [`locality::select`]): the closest rank under FAILOVER, full matches under STRICT.
    pub fn closest(
        &self,
        service: &Service,
        client: &Workload,
        endpoints: Vec<Arc<Workload>>,
    ) -> Result<Vec<Arc<Workload>>, locality::OutOfScope> {
        self.closest_by(self.load_policy(&service.key()), client, endpoints)
    }

    /// As [`State::closest`] with `policy` instead of the service's (a DestinationRule's
    /// locality failover at the waypoint); `None` keeps every endpoint.
    pub fn closest_by(
        &self,
        policy: Option<&locality::LoadPolicy>,
        client: &Workload,
        endpoints: Vec<Arc<Workload>>,
    ) -> Result<Vec<Arc<Workload>>, locality::OutOfScope> {
        let Some(policy) = policy else {
            return Ok(endpoints);
        };
        fn peer<'a>(state: &'a State, w: &'a Workload) -> locality::Peer<'a> {
            locality::Peer {
                network: &w.network,
                locality: state.locality(&w.uid),
                node: &w.node,
                cluster_id: &w.cluster_id,
            }
        }
        let client_peer = peer(self, client);
        let candidates: Vec<_> = endpoints.iter().map(|w| (peer(self, w), w.clone())).collect();
        locality::select(Some(policy), &client_peer, candidates)
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
        self.registry_only.remove(uid);
        self.hostnames.remove(uid);
        self.network_gateways.remove(uid);
        self.localities.remove(uid);
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

    /// Inserts or replaces a service (keyed by `ns/hostname`). A VIP another service declared
    /// first stays that service's (see the module doc); one this service already held stays
    /// its own.
    pub fn upsert_service(&mut self, s: Service) {
        let key = s.key();
        self.remove_service_keeping(&key, &s.vips);
        let s = Arc::new(s);
        self.services.insert(key.clone(), s.clone());
        for (net, ip) in &s.vips {
            let claims = self.vip_claims.entry(net.clone()).or_default().entry(*ip).or_default();
            if !claims.contains(&key) {
                if let Some(holder) = claims.first() {
                    tracing::warn!(service = %key, %holder, vip = %ip, network = %net,
                        "two services declare one VIP: the first keeps it");
                }
                claims.push(key.clone());
            }
            self.point_vip(net, *ip);
        }
        self.by_hostname.entry(s.hostname.clone()).or_default().insert(key);
    }

    pub fn remove_service(&mut self, key: &str) -> bool {
        self.remove_service_keeping(key, &[])
    }

    /// Removes service `key`, but not its claims to the VIPs in `keep` (an update that still
    /// declares them keeps its place).
    fn remove_service_keeping(&mut self, key: &str, keep: &[(String, IpAddr)]) -> bool {
        self.port_protocols.remove(key);
        self.passthrough.remove(key);
        self.load_policies.remove(key);
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        if let Some(keys) = self.by_hostname.get_mut(&old.hostname) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_hostname.remove(&old.hostname);
            }
        }
        for (net, ip) in old.vips.iter().filter(|v| !keep.contains(v)) {
            if let Some(by_vip) = self.vip_claims.get_mut(net) {
                if let Some(claims) = by_vip.get_mut(ip) {
                    claims.retain(|k| k != key);
                    if claims.is_empty() {
                        by_vip.remove(ip);
                    }
                }
                if by_vip.is_empty() {
                    self.vip_claims.remove(net);
                }
            }
            self.point_vip(net, *ip);
        }
        true
    }

    /// Points `ip` on `net` at the first service still declaring it, or at none.
    fn point_vip(&mut self, net: &str, ip: IpAddr) {
        let claims = self.vip_claims.get(net).and_then(|m| m.get(&ip));
        let holder = claims
            .and_then(|c| c.iter().find_map(|k| self.services.get(k)))
            .cloned();
        match holder {
            Some(s) => {
                self.service_by_vip.entry(net.to_owned()).or_default().insert(ip, s);
            }
            None => {
                if let Some(by_vip) = self.service_by_vip.get_mut(net) {
                    by_vip.remove(&ip);
                    if by_vip.is_empty() {
                        self.service_by_vip.remove(net);
                    }
                }
            }
        }
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
            Some(pb::address::Type::Workload(w)) => {
                let network_gateway = w
                    .network_gateway
                    .as_ref()
                    .map(|g| model::gateway("workload.network_gateway", g))
                    .transpose()?;
                self.upsert_workload(Workload::try_from(w)?);
                self.set_network_gateway(&w.uid, network_gateway);
                if registry_only(w) {
                    self.registry_only.insert(w.uid.clone());
                }
                if w.addresses.is_empty() && !w.hostname.is_empty() {
                    self.hostnames.insert(w.uid.clone(), w.hostname.to_ascii_lowercase());
                }
                if let Some(l) = w.locality.as_ref() {
                    self.localities.insert(w.uid.clone(), l.into());
                }
            }
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
                    self.port_protocols.insert(key.clone(), declared);
                }
                if let Some(p) = s.load_balancing.as_ref().and_then(locality::LoadPolicy::from_proto) {
                    self.load_policies.insert(key.clone(), p);
                }
                let mode = s.load_balancing.as_ref().map(|lb| lb.mode);
                if mode == Some(pb::load_balancing::Mode::Passthrough as i32) {
                    self.passthrough.insert(key);
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
        assert_eq!(s.port_protocol(key, 9000), AppProtocol::OtherHttp, "nor taken for gRPC");
        assert!(!s.port_protocol(key, 81).is_http());
        // An update that no longer declares the port, then removal, forget it.
        s.apply_address(&service(&[(80, 0)])).expect("valid service");
        assert!(!s.port_protocol(key, 80).is_http());
        s.apply_address(&service(&[(80, pb::AppProtocol::Grpc as i32)]))
            .expect("valid service");
        assert!(s.remove_service(key));
        assert!(!s.port_protocol(key, 80).is_http());
    }
    /// ServiceEntry facts kept beside the model: PASSTHROUGH load balancing, the hostname
    /// index, and a workload's REGISTRY_ONLY extension; each follows updates and removal.
    #[test]
    fn passthrough_hostnames_and_registry_only_follow_their_resources() {
        let entry = |ns: &str, lb: Option<pb::LoadBalancing>| pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "ext".into(),
                namespace: ns.into(),
                hostname: "api.example.com".into(),
                load_balancing: lb,
                ..Default::default()
            })),
        };
        let passthrough = pb::LoadBalancing {
            mode: pb::load_balancing::Mode::Passthrough as i32,
            ..Default::default()
        };
        let mut s = State::default();
        s.apply_address(&entry("a", Some(passthrough))).expect("valid");
        s.apply_address(&entry("b", None)).expect("valid");
        let found: Vec<String> = s.services_by_hostname("api.example.com").map(|s| s.key()).collect();
        assert_eq!(found, ["a/api.example.com", "b/api.example.com"]);
        let a = s.service("a/api.example.com").expect("a").clone();
        assert!(s.passthrough(&a));
        assert!(!s.passthrough(s.service("b/api.example.com").expect("b")));
        s.apply_address(&entry("a", None)).expect("valid");
        assert!(!s.passthrough(&a), "an update without PASSTHROUGH clears it");
        assert!(s.remove_service("a/api.example.com") && s.remove_service("b/api.example.com"));
        assert_eq!(s.services_by_hostname("api.example.com").count(), 0);

        let workload = |ext: Vec<pb::Extension>| pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: "c//Pod/a/p".into(),
                name: "p".into(),
                namespace: "a".into(),
                extensions: ext,
                ..Default::default()
            })),
        };
        s.apply_address(&workload(vec![registry_only_extension()]))
            .expect("valid");
        assert!(s.registry_only("c//Pod/a/p"));
        let mut other = registry_only_extension();
        other.name = "someone.else/policy".into();
        s.apply_address(&workload(vec![other])).expect("valid");
        assert!(!s.registry_only("c//Pod/a/p"), "only our extension's name counts");
        s.apply_address(&workload(vec![registry_only_extension()]))
            .expect("valid");
        assert!(s.remove_address("c//Pod/a/p"));
        assert!(!s.registry_only("c//Pod/a/p"));

        // A workload known by name only (a DNS ServiceEntry endpoint).
        let uid = "c/networking.istio.io/ServiceEntry/a/ext/api.example.com";
        let by_name = pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: "ext".into(),
                namespace: "a".into(),
                hostname: "API.example.com".into(),
                ..Default::default()
            })),
        };
        s.apply_address(&by_name).expect("valid");
        assert_eq!(s.workload_hostname(uid), Some("api.example.com"));
        assert!(s.remove_address(uid));
        assert_eq!(s.workload_hostname(uid), None);
    }

    /// Two services at one VIP: the first to declare it keeps it through the other's and its
    /// own updates; when it goes, or stops declaring the VIP, the VIP goes to the next still
    /// declaring it; another network's same address is apart. (op, expected holder's key).
    #[test]
    fn the_first_service_at_a_vip_keeps_it_and_removal_hands_it_on() {
        let vip: IpAddr = "10.96.0.1".parse().expect("ip");
        let svc = |ns: &str, vips: &[(&str, &str)], port: u16| Service {
            name: "web".into(),
            namespace: ns.into(),
            hostname: "web.test".into(),
            vips: vips
                .iter()
                .map(|(n, ip)| ((*n).to_owned(), ip.parse().expect("ip")))
                .collect(),
            ports: vec![model::PortMapping {
                service_port: port,
                target_port: port,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            only_healthy: true,
        };
        enum Op {
            Up(&'static str, &'static [(&'static str, &'static str)], u16),
            Rm(&'static str),
        }
        use Op::{Rm, Up};
        const AT: &[(&str, &str)] = &[("", "10.96.0.1")];
        const ELSEWHERE: &[(&str, &str)] = &[("", "10.96.0.2"), ("far", "10.96.0.1")];
        let table: [(Op, Option<(&str, u16)>); 12] = [
            (Up("shop", AT, 80), Some(("shop", 80))),
            (Up("evil", AT, 81), Some(("shop", 80))),
            (Up("evil", AT, 82), Some(("shop", 80))),
            (Up("shop", AT, 83), Some(("shop", 83))),
            (Rm("shop/web.test"), Some(("evil", 82))),
            (Up("shop", AT, 84), Some(("evil", 82))),
            (Rm("evil/web.test"), Some(("shop", 84))),
            (Up("evil", AT, 85), Some(("shop", 84))),
            (Up("shop", ELSEWHERE, 86), Some(("evil", 85))),
            (Up("shop", AT, 87), Some(("evil", 85))),
            (Rm("evil/web.test"), Some(("shop", 87))),
            (Rm("shop/web.test"), None),
        ];
        let mut s = State::default();
        for (step, (op, holder)) in table.into_iter().enumerate() {
            match op {
                Up(ns, vips, port) => s.upsert_service(svc(ns, vips, port)),
                Rm(key) => assert!(s.remove_service(key), "step {step}"),
            }
            let got = s
                .service_by_vip("", vip)
                .map(|h| (h.namespace.as_str(), h.ports[0].service_port));
            assert_eq!(got, holder, "step {step}");
            if step == 8 {
                let far = s.service_by_vip("far", vip).map(|h| h.namespace.clone());
                assert_eq!(far.as_deref(), Some("shop"), "another network's address is apart");
                let other = s.service_by_vip("", "10.96.0.2".parse().expect("ip"));
                assert_eq!(other.map(|h| h.namespace.as_str()), Some("shop"));
            }
        }
        assert!(s.service_by_vip("far", vip).is_none() && s.vip_claims.is_empty());
    }

    /// An Istio peer may send every field of the current API; none may make us reject the
    /// resource, and the fields the data plane uses must survive decoding.
    #[test]
    fn every_wire_field_decodes() {
        use prost::Message;
        let gw = |port| pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: "shop".into(),
                hostname: "wp.shop.svc.cluster.local".into(),
            })),
            hbone_mtls_port: port,
            hbone_single_tls_port: 0,
        };
        let ext = || pb::Extension {
            name: "vendor.example/x".into(),
            config: Some(prost_types::Any {
                type_url: "type.googleapis.com/google.protobuf.Empty".into(),
                value: Vec::new(),
            }),
        };
        let port = pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: pb::AppProtocol::Tcp as i32,
        };
        let w = pb::Workload {
            uid: "Kubernetes//Pod/shop/web-0".into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            addresses: vec![vec![10, 0, 0, 5]],
            hostname: String::new(),
            network: "net1".into(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            trust_domain: "cluster.local".into(),
            service_account: "web".into(),
            waypoint: Some(gw(15008)),
            network_gateway: Some(gw(15009)),
            node: "node-1".into(),
            canonical_name: "web".into(),
            canonical_revision: "v1".into(),
            workload_type: pb::WorkloadType::Deployment as i32,
            workload_name: "web".into(),
            native_tunnel: true,
            application_tunnel: Some(pb::ApplicationTunnel {
                protocol: pb::application_tunnel::Protocol::Proxy as i32,
                port: 15088,
            }),
            services: [(
                "shop/web.shop.svc.cluster.local".to_owned(),
                pb::PortList { ports: vec![port] },
            )]
            .into_iter()
            .collect(),
            authorization_policies: vec!["shop/p".into()],
            status: pb::WorkloadStatus::Healthy as i32,
            cluster_id: "c1".into(),
            locality: Some(pb::Locality {
                region: "r".into(),
                zone: "z".into(),
                subzone: "s".into(),
            }),
            network_mode: pb::NetworkMode::Standard as i32,
            extensions: vec![ext()],
            capacity: Some(3),
        };
        let svc = pb::Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress {
                network: "net1".into(),
                address: vec![10, 96, 0, 1],
            }],
            ports: vec![port],
            subject_alt_names: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
            waypoint: Some(gw(15008)),
            load_balancing: Some(pb::LoadBalancing {
                routing_preference: vec![pb::load_balancing::Scope::Zone as i32],
                mode: pb::load_balancing::Mode::Passthrough as i32,
                health_policy: pb::load_balancing::HealthPolicy::AllowAll as i32,
                dns_connect_strategy: pb::load_balancing::DnsConnectStrategy::FirstHealthyRace as i32,
            }),
            ip_families: pb::IpFamilies::Ipv4Only as i32,
            extensions: vec![ext()],
            canonical: true,
            ingress_use_waypoint: true,
        };
        let mut s = State::default();
        for a in [
            pb::Address {
                r#type: Some(pb::address::Type::Workload(w.clone())),
            },
            pb::Address {
                r#type: Some(pb::address::Type::Service(svc.clone())),
            },
        ] {
            let mut bytes = a.encode_to_vec();
            // A field number from a future API version: skipped, not an error.
            bytes.extend_from_slice(&[0xf8, 0x06, 0x01]); // field 111, varint 1
            let decoded = pb::Address::decode(bytes.as_slice()).expect("decodes");
            assert_eq!(decoded, a, "every known field round-trips");
            s.apply_address(&decoded).expect("accepted");
        }
        let got = s.workload(&w.uid).expect("workload kept");
        assert_eq!((got.cluster_id.as_str(), got.node.as_str()), ("c1", "node-1"));
        assert!(got.waypoint.is_some() && got.healthy);
        let got = s.service("shop/web.shop.svc.cluster.local").expect("service kept");
        assert!(!got.only_healthy, "ALLOW_ALL is honoured");
        assert!(
            !s.port_protocol("shop/web.shop.svc.cluster.local", 80).is_http(),
            "declared TCP is not HTTP"
        );

        let sa = |ns: &str, name: &str| secpb::ServiceAccountMatch {
            namespace: ns.into(),
            service_account: name.into(),
        };
        let exact = |v: &str| secpb::StringMatch {
            match_type: Some(secpb::string_match::MatchType::Exact(v.into())),
        };
        let cidr = secpb::Address {
            address: vec![10, 0, 0, 0],
            length: 8,
        };
        let policy = secpb::Authorization {
            name: "p".into(),
            namespace: "shop".into(),
            scope: secpb::Scope::WorkloadSelector as i32,
            action: secpb::Action::Deny as i32,
            groups: vec![secpb::Group {
                rules: vec![secpb::Rules {
                    matches: vec![secpb::Match {
                        namespaces: vec![exact("a")],
                        not_namespaces: vec![exact("b")],
                        service_accounts: vec![sa("a", "x")],
                        not_service_accounts: vec![sa("a", "y")],
                        principals: vec![exact("cluster.local/ns/a/sa/x")],
                        not_principals: vec![exact("cluster.local/ns/a/sa/y")],
                        source_ips: vec![cidr.clone()],
                        not_source_ips: vec![cidr.clone()],
                        destination_ips: vec![cidr.clone()],
                        not_destination_ips: vec![cidr],
                        destination_ports: vec![80],
                        not_destination_ports: vec![81],
                    }],
                }],
            }],
            dry_run: true,
            audit: None,
        };
        let decoded = secpb::Authorization::decode(policy.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, policy);
        s.apply_authorization(&decoded).expect("accepted");
        let p = s.policies().next().expect("policy kept");
        assert!(p.dry_run, "dry_run is kept (so it is not enforced)");
        let m = &p.groups[0][0][0];
        assert_eq!((m.service_accounts.len(), m.not_service_accounts.len()), (1, 1));
    }
}
