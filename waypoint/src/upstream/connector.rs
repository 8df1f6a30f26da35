//! Opens upstream connections for the HTTP client pool: to a mesh endpoint through an HBONE
//! tunnel to its ztunnel (the waypoint's own identity as client, the endpoint's as the
//! expected server), to anything else over plain TCP. The pool above reuses what this opens
//! (HTTP/1.1 keep-alive, HTTP/2 multiplexing), keyed by the endpoint's `ip:port`. A cluster
//! that originates TLS has its own pool over a connector with `originate` set, which wraps
//! every connection in TLS or fails it: it never hands out a plaintext one. A service VIP is
//! reached through the service's waypoint, never this proxy itself (refused as a loop).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_core::hbone::{H2Io, HbonePool, PoolKey, TunnelRequest};
use mesh_core::identity::Identity;
use mesh_core::state::model::Tunnel;
use mesh_core::state::StateStore;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::tls::{Originate, TlsFailure};
use crate::ingress::via_waypoint::WaypointError;

/// A connection to one endpoint.
pub enum Conn {
    Tcp(TcpStream),
    Hbone(Box<H2Io>),
    /// TLS originated by the waypoint over either of the others.
    Tls(Box<tokio_rustls::client::TlsStream<Conn>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Hbone(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Hbone(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Hbone(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Hbone(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens connections for a [`super::pool::Pool`]: one `Arc` around what it dials with, shared
/// by a cluster's pools.
#[derive(Clone)]
pub struct Connector(Arc<Dial>);

/// What a [`Connector`] dials with.
#[derive(Clone)]
pub struct Dial {
    pub state: Arc<StateStore>,
    pub hbone: Arc<HbonePool>,
    pub identity: Identity,
    pub network: String,
    pub hbone_port: u16,
    pub connect_timeout: Duration,
    /// TLS origination of this connector's cluster (`None`: connections as they are).
    pub originate: Option<Originate>,
    /// `waypoint_upstream_tls_failures_total` by reason.
    pub tls_failures: Family<Vec<(String, String)>, Counter>,
    /// `waypoint_rejected_requests_total` by reason: here, dials refused as a loop.
    pub rejected: Family<Vec<(String, String)>, Counter>,
}

impl From<Dial> for Connector {
    fn from(dial: Dial) -> Self {
        Connector(Arc::new(dial))
    }
}

impl std::ops::Deref for Connector {
    type Target = Dial;

    fn deref(&self) -> &Dial {
        &self.0
    }
}

impl Connector {
    /// Opens a connection to `target`, over HBONE when the workload there speaks it.
    pub async fn open(&self, target: SocketAddr) -> io::Result<Conn> {
        let state = self.state.load();
        // A service VIP (an ingress gateway's ingress-use-waypoint, or a waypoint's backend
        // whose endpoint is a VIP): through the service's waypoint, or not at all; never to
        // this proxy itself (a loop, counted).
        if let Some(service) = state.service_by_vip(&self.network, target.ip()) {
            let own = (self.network.as_str(), &self.identity);
            let (endpoint, identity) = match crate::ingress::via_waypoint::endpoint(&state, own, service, target) {
                Ok(found) => found,
                Err(e) => {
                    if matches!(e, WaypointError::Loop(_)) {
                        self.rejected
                            .get_or_create(&vec![("reason".to_owned(), "loop".to_owned())])
                            .inc();
                    }
                    return Err(io::Error::other(e));
                }
            };
            return self.tunnel(endpoint, identity, target).await;
        }
        let workload = state.workload_by_ip(&self.network, target.ip()).cloned();
        let connect = async {
            match workload {
                Some(w) if w.tunnel == Tunnel::Hbone => {
                    let req = TunnelRequest {
                        key: PoolKey {
                            src_identity: self.identity.clone(),
                            dst_identities: vec![w.identity.clone()],
                            src_ip: None,
                            dst: SocketAddr::new(target.ip(), self.hbone_port),
                        },
                        authority: target.to_string(),
                        forwarded_for: None,
                        baggage: None,
                        traceparent: None,
                    };
                    let stream = self.hbone.connect(&req).await.map_err(io::Error::other)?;
                    Ok(Conn::Hbone(Box::new(stream.into_io())))
                }
                _ => {
                    let tcp = TcpStream::connect(target).await?;
                    tcp.set_nodelay(true)?;
                    Ok(Conn::Tcp(tcp))
                }
            }
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {target} timed out")))?
    }
}

impl Connector {
    /// An HBONE tunnel to `endpoint` (expected to prove `identity`) for `authority`.
    async fn tunnel(&self, endpoint: SocketAddr, identity: Identity, authority: SocketAddr) -> io::Result<Conn> {
        let req = TunnelRequest {
            key: PoolKey {
                src_identity: self.identity.clone(),
                dst_identities: vec![identity],
                src_ip: None,
                dst: endpoint,
            },
            authority: authority.to_string(),
            forwarded_for: None,
            baggage: None,
            traceparent: None,
        };
        let connect = self.hbone.connect(&req);
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("tunnel to {endpoint} timed out")))?
            .map_err(io::Error::other)?;
        Ok(Conn::Hbone(Box::new(stream.into_io())))
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Connector {
    /// This connector for a cluster that originates TLS as `how`.
    pub fn originating(&self, how: Originate) -> Connector {
        Connector::from(Dial {
            originate: Some(how),
            ..Dial::clone(self)
        })
    }

    /// A connection to `target` with TLS over it; a refusal fails before connecting. A
    /// failed handshake is counted and logged.
    async fn originate(&self, how: &Originate, target: SocketAddr) -> Result<Conn, BoxError> {
        let result = match how {
            Originate::Refuse(why) => Err(why.clone()),
            Originate::Tls(o) => {
                let conn = self.open(target).await?;
                match tokio::time::timeout(self.connect_timeout, o.handshake(conn)).await {
                    Ok(r) => r.map(|s| Conn::Tls(Box::new(s))),
                    Err(_) => Err(TlsFailure::Handshake("timed out".to_owned())),
                }
            }
        };
        if let Err(e) = &result {
            self.tls_failures
                .get_or_create(&vec![("reason".to_owned(), e.reason().to_owned())])
                .inc();
            super::tls::log_failure(target, e);
        }
        Ok(result?)
    }
}

impl Connector {
    /// A connection to `target`: as it is, or with TLS over it when this connector's
    /// cluster originates TLS.
    pub async fn connect(&self, target: SocketAddr) -> Result<Conn, BoxError> {
        match &self.originate {
            None => Ok(self.open(target).await?),
            Some(how) => self.originate(how, target).await,
        }
    }
}

/// A connector for tests: plain TCP to any address the (empty) state does not know.
#[cfg(test)]
pub(crate) fn test_connector() -> Connector {
    use mesh_core::hbone::Settings;
    use mesh_core::identity::{CertManager, CertManagerConfig, DevCa};
    use mesh_core::socket::PlainSockets;
    let ca = DevCa::generate("cluster.local").unwrap();
    let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
    Connector::from(Dial {
        state: StateStore::new(),
        hbone: HbonePool::new(Settings::default(), certs, Arc::new(PlainSockets::default())),
        identity: "spiffe://cluster.local/ns/egress/sa/waypoint".parse().unwrap(),
        network: String::new(),
        hbone_port: 15008,
        connect_timeout: Duration::from_secs(1),
        originate: None,
        tls_failures: Default::default(),
        rejected: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use mesh_core::state::model::{GatewayAddress, GatewayDestination, PortMapping, Service};

    use super::*;

    /// `web` (VIP 10.96.0.1) uses the waypoint `ns/waypoint`, whose one endpoint has
    /// `identity`.
    fn connector_with_waypoint(identity: &str) -> Connector {
        let c = test_connector();
        let service = |name: &str, ip: &str, waypoint: Option<GatewayAddress>| Service {
            name: name.into(),
            namespace: "ns".into(),
            hostname: format!("{name}.ns.svc.cluster.local"),
            vips: vec![(String::new(), ip.parse().unwrap())],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
            subject_alt_names: vec![],
            waypoint,
            only_healthy: true,
        };
        let waypoint = GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "ns".into(),
                hostname: "waypoint.ns.svc.cluster.local".into(),
            },
            hbone_port: 15008,
        };
        let mut w = (*super::super::cluster::tests::workload("waypoint-0")).clone();
        // Nothing listens there: a dial fails, it never hangs.
        w.addresses = vec!["127.0.0.1".parse().unwrap()];
        w.identity = identity.parse().unwrap();
        w.services = vec![("ns/waypoint.ns.svc.cluster.local".into(), vec![])];
        c.state.update(|s| {
            s.upsert_service(service("waypoint", "10.96.0.9", None));
            s.upsert_service(service("web", "10.96.0.1", Some(waypoint)));
            s.upsert_workload(w);
        });
        c
    }

    fn loops(c: &Connector) -> u64 {
        c.rejected
            .get_or_create(&vec![("reason".to_owned(), "loop".to_owned())])
            .get()
    }

    /// A VIP whose waypoint is this proxy (its own identity: a ServiceEntry whose endpoint is
    /// its own VIP) is refused as a loop and counted, never dialled; another proxy's
    /// waypoint is dialled (the ingress gateway's ingress-use-waypoint).
    #[tokio::test]
    async fn a_vip_whose_waypoint_is_this_proxy_is_refused_as_a_loop() {
        let own = test_connector().identity.to_string();
        let c = connector_with_waypoint(&own);
        let err = c.open("10.96.0.1:80".parse().unwrap()).await.err().expect("refused");
        let why = err.get_ref().and_then(|e| e.downcast_ref::<WaypointError>());
        assert!(matches!(why, Some(WaypointError::Loop(_))), "{err}");
        assert_eq!(loops(&c), 1);
        let other = connector_with_waypoint("spiffe://cluster.local/ns/ns/sa/waypoint");
        let err = other
            .open("10.96.0.1:80".parse().unwrap())
            .await
            .err()
            .expect("nothing listens");
        let why = err.get_ref().and_then(|e| e.downcast_ref::<WaypointError>());
        assert!(why.is_none(), "{err}");
        assert_eq!(loops(&other), 0);
    }
}
