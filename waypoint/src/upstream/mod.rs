//! Where a routed request goes: the backend's endpoints (a DestinationRule subset narrows
//! them), one picked by its cluster, and a pooled HTTP connection to it (HBONE for mesh
//! endpoints, plain TCP otherwise; with TLS originated over either when the DestinationRule
//! asks, from the cluster's own pools).

pub mod cluster;
pub mod connector;
pub mod pool;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use mesh_core::state::model::{Service, Workload};
use mesh_core::state::State;
use mesh_proto::waypoint as wp;

use self::cluster::Cluster;
use self::connector::Connector;
use self::pool::Pool;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A chosen endpoint and the address its application listens on.
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub target: SocketAddr,
}

/// Upstream connection pools and per-cluster state.
pub struct Upstreams {
    pub connector: Connector,
    http1: Arc<Pool>,
    http2: Arc<Pool>,
    clusters: Mutex<HashMap<(String, String), Arc<Cluster>>>,
    /// Clusters that originate TLS, by service, subset and port (`portLevelSettings`).
    tls_clusters: Mutex<HashMap<(String, String, u16), Arc<Cluster>>>,
    pub credentials: Arc<tls::CredentialStore>,
}

/// The pools of a cluster that originates TLS: connections are reused per endpoint under
/// these settings and this credential; new settings or a rotated Secret make a new cluster.
pub struct TlsPools {
    http1: Arc<Pool>,
    http2: Arc<Pool>,
    settings: wp::UpstreamTls,
    credential: Option<Arc<wp::UpstreamCredential>>,
}

fn pools(connector: &Connector) -> (Arc<Pool>, Arc<Pool>) {
    (Pool::new(connector.clone(), false), Pool::new(connector.clone(), true))
}

impl Upstreams {
    pub fn new(connector: Connector, credentials: Arc<tls::CredentialStore>) -> Self {
        let (http1, http2) = pools(&connector);
        Upstreams {
            connector,
            http1,
            http2,
            clusters: Mutex::new(HashMap::new()),
            tls_clusters: Mutex::new(HashMap::new()),
            credentials,
        }
    }

    pub fn pool(&self, http2: bool) -> &Arc<Pool> {
        if http2 {
            &self.http2
        } else {
            &self.http1
        }
    }

    /// The pool for a request through `cluster`: its own TLS pools when it originates TLS.
    pub fn pool_for<'a>(&'a self, cluster: &'a Cluster, http2: bool) -> &'a Arc<Pool> {
        match &cluster.tls {
            Some(t) if http2 => &t.http2,
            Some(t) => &t.http1,
            None => self.pool(http2),
        }
    }

    /// The cluster for HTTP to `service` (named `hostname`) on `port`: [`Upstreams::cluster`],
    /// unless the policy originates TLS on that port, in which case a cluster with its own
    /// pools, rebuilt when the settings or the credential change (rotation without restart).
    pub fn http_cluster(
        &self,
        (service, hostname): (&str, &str),
        subset: &str,
        port: u16,
        policy: wp::TrafficPolicy,
    ) -> Arc<Cluster> {
        let settings = policy
            .port_tls
            .get(&u32::from(port))
            .or(policy.tls.as_ref())
            .filter(|t| t.mode != "DISABLE")
            .cloned();
        let Some(settings) = settings else {
            return self.cluster(service, subset, policy);
        };
        let credential = Some(settings.credential.as_str())
            .filter(|c| !c.is_empty())
            .and_then(|c| self.credentials.get(c));
        let mut clusters = self.tls_clusters.lock().unwrap_or_else(|e| e.into_inner());
        let key = (service.to_owned(), subset.to_owned(), port);
        if let Some(c) = clusters.get(&key) {
            let same = c.tls.as_ref().is_some_and(|t| {
                t.settings == settings
                    && match (&t.credential, &credential) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    }
            });
            if c.policy == policy && same {
                return c.clone();
            }
        }
        let how = tls::Origination::build(&settings, hostname, credential.as_deref())
            .unwrap_or_else(|| tls::Originate::Refuse(tls::TlsFailure::Config("mode DISABLE".to_owned())));
        let (http1, http2) = pools(&self.connector.originating(how));
        let tls = TlsPools {
            http1,
            http2,
            settings,
            credential,
        };
        let c = Cluster::with_tls(policy, Some(tls));
        clusters.insert(key, c.clone());
        c
    }

    /// The cluster of `service`/`subset` under the current traffic policy; a changed policy
    /// starts a fresh cluster (requests in flight finish under the old one).
    pub fn cluster(&self, service: &str, subset: &str, policy: wp::TrafficPolicy) -> Arc<Cluster> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        let key = (service.to_owned(), subset.to_owned());
        match clusters.get(&key) {
            Some(c) if c.policy == policy => c.clone(),
            _ => {
                let c = Cluster::new(policy);
                clusters.insert(key, c.clone());
                c
            }
        }
    }
}

/// The traffic policy of a subset over the service's: a subset's own policy wins field by field.
pub fn effective_policy(routes: Option<&wp::ServiceRoutes>, subset: Option<&wp::Subset>) -> wp::TrafficPolicy {
    let base = routes.and_then(|r| r.traffic_policy.clone()).unwrap_or_default();
    let Some(over) = subset.and_then(|s| s.traffic_policy.clone()) else {
        return base;
    };
    wp::TrafficPolicy {
        connection_pool: over.connection_pool.or(base.connection_pool),
        outlier_detection: over.outlier_detection.or(base.outlier_detection),
        load_balancer: over.load_balancer.or(base.load_balancer),
        tls: over.tls.or(base.tls),
        port_tls: if over.port_tls.is_empty() {
            base.port_tls
        } else {
            over.port_tls
        },
    }
}

/// The service's endpoints, narrowed to a subset's workloads when one is named.
pub fn candidates(state: &State, service: &Service, subset: Option<&wp::Subset>) -> Vec<Arc<Workload>> {
    let mut eps = state.endpoints(service);
    if let Some(s) = subset {
        eps.retain(|w| s.workloads.iter().any(|u| *u == w.uid));
    }
    // Then the closest of them (the service's locality preference), as Istio's waypoint.
    crate::locality::closest(state, service, eps)
}

/// The service port a route's backend is sent to: its own when it names one (`explicit`),
/// else `fallback` (the port the client addressed) when the service declares it, else the
/// service's only port (Istio: a destination without a port takes a single-port service's).
/// Whatever comes out, [`target`] serves only a declared port.
pub fn backend_port(service: &Service, explicit: u32, fallback: u16) -> u16 {
    if let Some(p) = u16::try_from(explicit).ok().filter(|p| *p != 0) {
        return p;
    }
    match service.ports.as_slice() {
        ports if ports.iter().any(|p| p.service_port == fallback) => fallback,
        [only] => only.service_port,
        _ => fallback,
    }
}

/// Where `workload` serves the service's `port`: its own mapping, else the service's; `None`
/// for a port the service does not declare (never passed through: the pod's other ports are
/// not the service's).
pub fn target(workload: &Arc<Workload>, service: &Service, port: u16, like: std::net::IpAddr) -> Option<Endpoint> {
    let mapped = workload.target_port(service, port)?;
    let ip = workload.address_like(like)?;
    Some(Endpoint {
        workload: workload.clone(),
        target: SocketAddr::new(ip, mapped),
    })
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn upstreams() -> Upstreams {
        Upstreams::new(
            connector::test_connector(),
            tls::CredentialStore::new("egress/waypoint".into()),
        )
    }

    fn tls(mode: &str, sni: &str) -> wp::UpstreamTls {
        wp::UpstreamTls {
            mode: mode.into(),
            sni: sni.into(),
            credential: "egress/cred".into(),
            ..Default::default()
        }
    }

    fn deliver(u: &Upstreams, ca: &str) {
        let body = wp::WaypointCredentials {
            credentials: vec![wp::UpstreamCredential {
                secret: "egress/cred".into(),
                ca_certificates: ca.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let sink = tls::CredentialsSink(u.credentials.clone());
        use mesh_core::xds::ResourceSink;
        assert!(sink
            .apply(&[("egress/waypoint".into(), body.as_slice())], &[])
            .is_empty());
    }

    /// A declared port maps to its target port; an undeclared one is no endpoint at all,
    /// never passed through to the pod.
    #[test]
    fn only_declared_service_ports_have_a_target() {
        let mut w = (*cluster::tests::workload("web")).clone();
        w.addresses = vec!["10.0.0.7".parse().unwrap()];
        let w = Arc::new(w);
        let service = Service {
            name: "web".into(),
            namespace: "ns".into(),
            hostname: "web.ns.svc.cluster.local".into(),
            vips: vec![],
            ports: vec![mesh_core::state::model::PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            only_healthy: true,
        };
        let like = "10.0.0.1".parse().unwrap();
        let ep = target(&w, &service, 80, like).expect("declared");
        assert_eq!(ep.target, "10.0.0.7:8080".parse().unwrap());
        assert!(target(&w, &service, 8080, like).is_none());
        assert!(target(&w, &service, 9090, like).is_none());
        // A backend without a port: the addressed one if declared, else the only one.
        assert_eq!(backend_port(&service, 0, 80), 80);
        assert_eq!(backend_port(&service, 0, 9090), 80);
        assert_eq!(backend_port(&service, 9090, 80), 9090);
    }

    #[tokio::test]
    async fn tls_clusters_follow_the_port_the_settings_and_the_credential() {
        let u = upstreams();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = |name: &str| {
            let mut p = rcgen::CertificateParams::new(Vec::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.self_signed(&key).unwrap().pem()
        };
        deliver(&u, &ca("first"));
        let mut policy = wp::TrafficPolicy {
            tls: Some(tls("SIMPLE", "a.example")),
            ..Default::default()
        };
        policy.port_tls.insert(8080, tls("DISABLE", ""));
        let svc = ("egress/api.external.test", "api.external.test");
        // Port-level DISABLE wins on 8080: the shared plaintext cluster, no TLS pools.
        let plain = u.http_cluster(svc, "", 8080, policy.clone());
        assert!(plain.tls.is_none());
        assert!(Arc::ptr_eq(&plain, &u.cluster(svc.0, "", policy.clone())));
        // Port 80 originates; the same settings and credential reuse the cluster (its pools).
        let first = u.http_cluster(svc, "", 80, policy.clone());
        assert!(first.tls.is_some());
        assert!(Arc::ptr_eq(&first, &u.http_cluster(svc, "", 80, policy.clone())));
        // A rotated Secret: a new cluster (new connections with the new credential).
        deliver(&u, &ca("second"));
        let rotated = u.http_cluster(svc, "", 80, policy.clone());
        assert!(!Arc::ptr_eq(&first, &rotated));
        assert!(Arc::ptr_eq(&rotated, &u.http_cluster(svc, "", 80, policy.clone())));
        // Changed settings: a new cluster too.
        policy.tls = Some(tls("SIMPLE", "b.example"));
        assert!(!Arc::ptr_eq(&rotated, &u.http_cluster(svc, "", 80, policy)));
    }
}
