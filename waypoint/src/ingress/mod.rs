//! The ingress role (`waypoint --role ingress`): the same HTTP pipeline as the waypoint
//! (admission, JWT, authorization, routes, retries, local replies, telemetry), fed by clients
//! outside the mesh on the listeners of an ingress `Gateway` instead of HBONE tunnels.
//!
//! The controller sends the gateway's `mesh.waypoint.v1.IngressGateway` (to this gateway's
//! identity only: it carries private keys). [`IngressSink`] compiles it in one step: each
//! listener host's route table goes into the shared [`ConfigStore`] under its
//! `ingress/<ns>/<gw>/<listener>/<host>` name, each TLS port's [`tls::SniResolver`] gets the
//! certificates (swapped atomically: a rotated Secret serves new handshakes, live connections
//! are untouched), and [`server`] binds and releases ports to match. Requests pick their
//! listener (by SNI on TLS ports, where the Host must select the same listener or the answer
//! is 421, by Host otherwise), then the host table (exact, then the longest wildcard, then
//! `*`), and enter [`crate::http::proxy::handle`] with no peer identity
//! and the client address from X-Forwarded-For past the trusted proxies.

pub mod passthrough;
pub mod server;
pub mod tcp;
pub mod tls;
pub mod via_waypoint;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mesh_core::state::model::Service;
use mesh_core::xds::ResourceSink;
use mesh_proto::waypoint as wp;
use prost::Message;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::http::local_reply::LocalReply;
use crate::http::route::CompiledRoutes;
use crate::store::ConfigStore;

/// Route tables of ingress listeners are named with this prefix.
pub const TABLE_PREFIX: &str = "ingress/";

/// Whether `host` is matched by `pattern` (exact, `*.suffix` for one or more labels, `*`).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) if suffix.starts_with('.') => {
            host.len() > suffix.len() && host.to_ascii_lowercase().ends_with(&suffix.to_ascii_lowercase())
        }
        _ => pattern.eq_ignore_ascii_case(host),
    }
}

/// Ordering of hostnames by how specific they are: exact over any wildcard, longer wildcards
/// over shorter ones, `*`/empty last.
pub fn specificity(pattern: &str) -> (u8, usize) {
    match pattern {
        "" | "*" => (0, 0),
        p if p.starts_with("*.") => (1, p.len()),
        p => (2, p.len()),
    }
}

/// One listener: its hostname and its route tables by host pattern.
#[derive(Debug, Default)]
pub struct ListenerState {
    pub name: String,
    pub hostname: String,
    /// (host pattern, route table name), most specific first.
    pub hosts: Vec<(String, String)>,
}

impl ListenerState {
    /// The route table for a request to `host`.
    pub fn table(&self, host: &str) -> Option<&str> {
        self.hosts
            .iter()
            .find(|(pattern, _)| host_matches(pattern, host))
            .map(|(_, table)| table.as_str())
    }
}

/// The listeners sharing one port.
#[derive(Debug, Default)]
pub struct PortState {
    pub tls: bool,
    /// A TCP listener: connections are proxied by its TCPRoute, not parsed as HTTP.
    pub tcp: bool,
    /// TLS passthrough listeners: connections are proxied by the TLSRoute their SNI selects.
    pub passthrough: bool,
    /// Most specific hostname first.
    pub listeners: Vec<ListenerState>,
}

impl PortState {
    /// The listener serving `host` (an SNI or a Host header).
    pub fn listener(&self, host: &str) -> Option<&ListenerState> {
        self.listeners
            .iter()
            .find(|l| l.hostname.is_empty() || host_matches(&l.hostname, host))
    }

    /// The listener a request is served by. Without TLS, the one its `host` selects. On TLS,
    /// the one the connection's SNI chose (no SNI: the one without hostname), which must also
    /// be the one `host` selects: a browser reuses an HTTP/2 connection for any host its
    /// certificate covers, and `a.example.com` must not reach the routes of the
    /// `*.example.com` listener that connection was opened for, with a.example.com's cookies
    /// (421, as Envoy answers). A request naming no host stays on the connection's listener.
    pub fn serving(&self, tls: bool, sni: Option<&str>, host: &str) -> Result<&ListenerState, LocalReply> {
        let by_host = self.listener(host);
        if !tls {
            return by_host.ok_or(LocalReply::NoRoute);
        }
        let by_connection = match sni {
            Some(sni) => self.listener(sni),
            None => self.listeners.iter().find(|l| l.hostname.is_empty()),
        };
        let by_connection = by_connection.ok_or(LocalReply::NoRoute)?;
        if host.is_empty() || by_host.is_some_and(|l| std::ptr::eq(l, by_connection)) {
            return Ok(by_connection);
        }
        Err(LocalReply::Misdirected {
            sni: sni.unwrap_or_default().to_owned(),
            host: host.to_owned(),
        })
    }
}

/// The gateway as it serves now.
#[derive(Debug)]
pub struct IngressState {
    pub ports: BTreeMap<u16, PortState>,
    pub num_trusted_proxies: u32,
    /// Services (`ns/hostname`) reached through their waypoint (`ingress-use-waypoint`).
    pub waypoint_services: std::collections::HashSet<String>,
    /// The gateway as the destination "service" of requests (policies targeting the Gateway,
    /// JWT rules, telemetry).
    pub service: Arc<Service>,
}

/// The ingress role's live configuration.
pub struct Ingress {
    pub gateway: (String, String),
    pub current: ArcSwap<IngressState>,
    /// One per TLS port, kept across updates so a port's TLS configuration never changes.
    resolvers: Mutex<HashMap<u16, Arc<tls::SniResolver>>>,
    config: Arc<ConfigStore>,
    changed: watch::Sender<u64>,
}

fn gateway_service(gateway: &(String, String)) -> Arc<Service> {
    Arc::new(Service {
        name: gateway.1.clone(),
        namespace: gateway.0.clone(),
        hostname: format!("{}.{}.svc.cluster.local", gateway.1, gateway.0),
        vips: Vec::new(),
        ports: Vec::new(),
        subject_alt_names: Vec::new(),
        waypoint: None,
        only_healthy: true,
    })
}

impl Ingress {
    pub fn new(gateway: (String, String), config: Arc<ConfigStore>) -> Arc<Self> {
        let state = IngressState {
            ports: BTreeMap::new(),
            num_trusted_proxies: 0,
            waypoint_services: Default::default(),
            service: gateway_service(&gateway),
        };
        Arc::new(Ingress {
            gateway,
            current: ArcSwap::from_pointee(state),
            resolvers: Mutex::new(HashMap::new()),
            config,
            changed: watch::channel(0).0,
        })
    }

    /// Wakes when the set of ports may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The certificate resolver of TLS port `port` (created empty on first use).
    pub fn resolver(&self, port: u16) -> Arc<tls::SniResolver> {
        let mut r = self.resolvers.lock().unwrap_or_else(|e| e.into_inner());
        r.entry(port).or_default().clone()
    }

    /// Applies the gateway's configuration; returns what was refused as (name, reason).
    pub fn apply(&self, g: wp::IngressGateway) -> Vec<(String, String)> {
        let mut refused = Vec::new();
        let mut tables = Vec::new();
        let mut ports: BTreeMap<u16, PortState> = BTreeMap::new();
        let mut certs: HashMap<u16, Vec<tls::Entry>> = HashMap::new();
        for l in g.listeners {
            let Some(port) = u16::try_from(l.port).ok().filter(|p| *p != 0) else {
                refused.push((l.name.clone(), format!("port {} is not a port", l.port)));
                continue;
            };
            let tls = l.protocol == "HTTPS";
            if tls {
                let mut mine = Vec::new();
                for c in &l.certificates {
                    match tls::entry(&l.hostname, c) {
                        Ok(e) => mine.push(e),
                        Err(e) => refused.push((l.name.clone(), e.to_string())),
                    }
                }
                if mine.is_empty() {
                    // Fail closed: a listener without a usable certificate is not served.
                    refused.push((l.name.clone(), "no usable certificate; listener not served".into()));
                    continue;
                }
                certs.entry(port).or_default().extend(mine);
            }
            let mut hosts = Vec::new();
            for h in l.hosts {
                let Some(routes) = h.routes else { continue };
                let name = routes.service.clone();
                // A route that does not compile is left out of its table; the host's other
                // routes (other namespaces' too) keep serving.
                let c = CompiledRoutes::compile(routes);
                if let Some(reason) = crate::store::dropped_reason(&c) {
                    warn!(table = %name, %reason, "ingress routes dropped");
                    refused.push((name.clone(), reason));
                }
                tables.push((name.clone(), Arc::new(c)));
                hosts.push((h.hostname, name));
            }
            hosts.sort_by_key(|(p, _)| std::cmp::Reverse(specificity(p)));
            let entry = ports.entry(port).or_default();
            entry.tls |= tls;
            entry.tcp |= l.protocol == "TCP";
            entry.passthrough |= l.protocol == "TLS";
            entry.listeners.push(ListenerState {
                name: l.name,
                hostname: l.hostname,
                hosts,
            });
        }
        for p in ports.values_mut() {
            p.listeners.sort_by_key(|l| std::cmp::Reverse(specificity(&l.hostname)));
        }
        // Routes first, then certificates, then the ports that lead to them.
        self.config.replace_tables(TABLE_PREFIX, tables);
        for (port, p) in &ports {
            if p.tls {
                self.resolver(*port).replace(certs.remove(port).unwrap_or_default());
            }
        }
        let state = IngressState {
            ports,
            num_trusted_proxies: g.num_trusted_proxies,
            waypoint_services: g.waypoint_services.into_iter().collect(),
            service: gateway_service(&self.gateway),
        };
        info!(ports = ?state.ports.keys().collect::<Vec<_>>(), "ingress configuration applied");
        self.current.store(Arc::new(state));
        self.changed.send_modify(|n| *n += 1);
        refused
    }

    /// Whether requests to service `key` (`ns/hostname`) go through its waypoint.
    pub fn uses_waypoint(&self, key: &str) -> bool {
        self.current.load().waypoint_services.contains(key)
    }

    /// For a service (`key`) reached through its waypoint: its `vip:port` on `network` (else
    /// its first VIP), which the connector tunnels to the waypoint with that authority.
    /// `None` for a service reached at its pods.
    pub fn waypoint_vip(
        &self,
        key: &str,
        service: &mesh_core::state::Service,
        network: &str,
        port: u16,
    ) -> Option<std::net::SocketAddr> {
        if service.waypoint.is_none() || !self.uses_waypoint(key) {
            return None;
        }
        let (_, ip) = service
            .vips
            .iter()
            .find(|(n, _)| n == network)
            .or(service.vips.first())?;
        Some(std::net::SocketAddr::new(*ip, port))
    }

    /// Withdraws everything (the gateway's resource was removed).
    pub fn clear(&self) {
        self.apply(wp::IngressGateway::default());
    }
}

/// The original client's address: with `trusted` proxies in front, the X-Forwarded-For entry
/// the outermost trusted one appended (the `trusted`-th from the right); the peer's address
/// without trusted proxies or when the header has fewer entries (Envoy's xff_num_trusted_hops).
pub fn remote_ip(headers: &http::HeaderMap, peer: IpAddr, trusted: u32) -> IpAddr {
    if trusted == 0 {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let Some(i) = entries.len().checked_sub(trusted as usize) else {
        return peer;
    };
    entries.get(i).and_then(|e| e.parse().ok()).unwrap_or(peer)
}

/// The xDS subscription for the gateway's `IngressGateway`.
pub struct IngressSink(pub Arc<Ingress>);

impl ResourceSink for IngressSink {
    fn type_url(&self) -> &'static str {
        mesh_proto::INGRESS_GATEWAY_TYPE_URL
    }

    fn apply(&self, upserts: &[(String, &[u8])], removed: &[String]) -> Vec<(String, String)> {
        let own = format!("{}/{}", self.0.gateway.0, self.0.gateway.1);
        let mut rejected = Vec::new();
        if removed.contains(&own) {
            self.0.clear();
        }
        for (name, body) in upserts {
            if *name != own {
                rejected.push((name.clone(), format!("not this gateway ({own})")));
                continue;
            }
            match wp::IngressGateway::decode(*body) {
                Ok(g) => {
                    for (what, why) in self.0.apply(g) {
                        warn!(listener = %what, reason = %why, "ingress listener refused");
                    }
                }
                Err(e) => rejected.push((name.clone(), format!("cannot decode: {e}"))),
            }
        }
        rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_ip_from_x_forwarded_for() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let mut h = http::HeaderMap::new();
        h.append("x-forwarded-for", "203.0.113.7, 198.51.100.1".parse().unwrap());
        h.append("x-forwarded-for", "192.0.2.1".parse().unwrap());
        assert_eq!(
            remote_ip(&h, peer, 0),
            peer,
            "no trusted proxy: the peer, whatever the header says"
        );
        assert_eq!(remote_ip(&h, peer, 1), "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(remote_ip(&h, peer, 3), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(remote_ip(&h, peer, 4), peer, "fewer entries than trusted hops");
        let mut bad = http::HeaderMap::new();
        bad.append("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(remote_ip(&bad, peer, 1), peer);
    }

    #[test]
    fn listener_and_table_selection() {
        let port = PortState {
            tls: true,
            tcp: false,
            passthrough: false,
            listeners: vec![
                ListenerState {
                    name: "api".into(),
                    hostname: "api.example.com".into(),
                    hosts: vec![("api.example.com".into(), "t-api".into())],
                },
                ListenerState {
                    name: "https".into(),
                    hostname: "*.example.com".into(),
                    hosts: vec![
                        ("app.example.com".into(), "t-app".into()),
                        ("*.example.com".into(), "t-wild".into()),
                    ],
                },
            ],
        };
        let table = |h: &str| port.listener(h).and_then(|l| l.table(h));
        assert_eq!(table("api.example.com"), Some("t-api"));
        assert_eq!(table("app.example.com"), Some("t-app"));
        assert_eq!(table("x.example.com"), Some("t-wild"));
        assert_eq!(table("example.com"), None);
        assert!(host_matches("*.example.com", "A.B.Example.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
    }

    #[test]
    fn a_tls_request_is_served_only_by_the_listener_its_sni_chose() {
        let listener = |name: &str, hostname: &str| ListenerState {
            name: name.into(),
            hostname: hostname.into(),
            hosts: vec![("*".into(), format!("t-{name}"))],
        };
        let port = PortState {
            tls: true,
            tcp: false,
            passthrough: false,
            listeners: vec![listener("a", "a.example.com"), listener("b", "*.example.com")],
        };
        let name = |r: Result<&ListenerState, LocalReply>| r.map(|l| l.name.clone());
        let tls = |sni: Option<&str>, host: &str| name(port.serving(true, sni, host));
        assert_eq!(tls(Some("a.example.com"), "a.example.com").ok().as_deref(), Some("a"));
        assert_eq!(tls(Some("b.example.com"), "b.example.com").ok().as_deref(), Some("b"));
        assert_eq!(tls(Some("b.example.com"), "c.example.com").ok().as_deref(), Some("b"));
        assert_eq!(tls(Some("b.example.com"), "").ok().as_deref(), Some("b"));
        // A trailing dot names the same listener (the server matches the canonical host).
        let dotted = crate::http::authority::canonical("A.example.com.").expect("a valid host");
        assert_eq!(tls(Some("a.example.com"), dotted.host()).ok().as_deref(), Some("a"));
        for (sni, host) in [("b.example.com", "a.example.com"), ("a.example.com", "b.example.com")] {
            let got = tls(Some(sni), host);
            assert!(
                matches!(got, Err(LocalReply::Misdirected { .. })),
                "{sni} {host}: {got:?}"
            );
            let reply = got.err().map(|r| (r.status().as_u16(), r.reject_reason()));
            assert_eq!(reply, Some((421, Some("misdirected_request"))));
        }
        assert!(matches!(tls(None, "a.example.com"), Err(LocalReply::NoRoute)));
        // Without TLS the Host alone decides.
        assert_eq!(
            name(port.serving(false, None, "a.example.com")).ok().as_deref(),
            Some("a")
        );
    }

    fn tls_cert(names: &[&str]) -> wp::TlsCertificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        wp::TlsCertificate {
            secret: "istio-system/c".into(),
            cert_chain: c.pem(),
            private_key: key.serialize_pem(),
        }
    }

    #[test]
    fn a_listener_with_a_bad_certificate_is_not_served_and_the_others_are() {
        let ingress = Ingress::new(("istio-system".into(), "gw".into()), ConfigStore::new());
        let table = |name: &str| wp::IngressHost {
            hostname: "*".into(),
            routes: Some(wp::ServiceRoutes {
                service: format!("ingress/istio-system/gw/{name}/*"),
                ..Default::default()
            }),
        };
        let mut broken = tls_cert(&["*.other.org"]);
        broken.private_key = tls_cert(&["x"]).private_key;
        let config = wp::IngressGateway {
            namespace: "istio-system".into(),
            name: "gw".into(),
            listeners: vec![
                wp::IngressListener {
                    name: "good".into(),
                    port: 443,
                    protocol: "HTTPS".into(),
                    hostname: "*.example.com".into(),
                    certificates: vec![tls_cert(&["*.example.com"])],
                    hosts: vec![table("good")],
                },
                wp::IngressListener {
                    name: "broken".into(),
                    port: 443,
                    protocol: "HTTPS".into(),
                    hostname: "*.other.org".into(),
                    certificates: vec![broken],
                    hosts: vec![table("broken")],
                },
            ],
            ..Default::default()
        };
        let sink = IngressSink(ingress.clone());
        let body = config.encode_to_vec();
        let rejected = sink.apply(&[("istio-system/other".into(), body.as_slice())], &[]);
        assert_eq!(rejected.len(), 1, "another gateway's configuration is refused");
        assert!(ingress.current.load().ports.is_empty());
        assert!(sink
            .apply(&[("istio-system/gw".into(), body.as_slice())], &[])
            .is_empty());
        let state = ingress.current.load();
        let names: Vec<&str> = state.ports[&443].listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["good"]);
        assert!(!ingress.resolver(443).is_empty());
        assert!(ingress
            .config
            .load()
            .routes
            .contains_key("ingress/istio-system/gw/good/*"));
        assert!(!ingress
            .config
            .load()
            .routes
            .contains_key("ingress/istio-system/gw/broken/*"));
        // Removal withdraws ports and tables.
        sink.apply(&[], &["istio-system/gw".into()]);
        assert!(ingress.current.load().ports.is_empty());
        assert!(ingress
            .config
            .load()
            .routes
            .keys()
            .all(|k| !k.starts_with(TABLE_PREFIX)));
    }

    #[test]
    fn a_listener_serves_the_certificates_that_load() {
        let ingress = Ingress::new(("istio-system".into(), "gw".into()), ConfigStore::new());
        let mut broken = tls_cert(&["b.example.com"]);
        broken.private_key = tls_cert(&["x"]).private_key;
        let config = wp::IngressGateway {
            namespace: "istio-system".into(),
            name: "gw".into(),
            listeners: vec![wp::IngressListener {
                name: "https".into(),
                port: 443,
                protocol: "HTTPS".into(),
                certificates: vec![broken, tls_cert(&["a.example.com"])],
                ..Default::default()
            }],
            ..Default::default()
        };
        let refused = ingress.apply(config);
        assert_eq!(refused.len(), 1, "the broken certificate is named: {refused:?}");
        assert!(refused[0].1.contains("istio-system/c"), "{refused:?}");
        let state = ingress.current.load();
        assert_eq!(
            state.ports[&443].listeners.len(),
            1,
            "served with the other certificate"
        );
        assert!(!ingress.resolver(443).is_empty());
    }
}
