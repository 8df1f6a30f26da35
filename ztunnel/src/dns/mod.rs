//! The DNS proxy (15053 in each pod namespace; the capture rules redirect the pod's port 53
//! to it). Mesh service names are answered from the mesh state, so a pod resolves services
//! the instant the controller knows them; every other query is forwarded unchanged to the
//! upstream resolvers from a socket carrying the mesh mark (which the redirect skips).
//! Malformed queries are dropped with a log line, never answered with garbage.
//!
//! A pod can send queries as fast as it likes, and each forwarded one holds a socket for up
//! to the upstream timeout: at most [`MAX_IN_FLIGHT`] queries per pod are handled at once
//! (UDP queries beyond that are dropped, TCP connections wait), TCP connections idle for
//! [`TCP_IDLE`] are closed, and the accept loop backs off when descriptors run out. Dropped
//! queries are counted as `ztunnel_connections_refused_total{reason="dns_overload"}`.

pub mod answer;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use mesh_core::socket::SocketFactory;
use mesh_core::state::StateStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use answer::Lookup;

/// Answers' TTL: short, so a changed VIP is picked up quickly.
const TTL: u32 = 30;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries (UDP) and connections (TCP) one pod's proxy handles at once.
pub const MAX_IN_FLIGHT: usize = 128;
/// A TCP connection that sends no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What bounds one pod's DNS proxy, and where a refusal is counted.
pub struct Limits {
    in_flight: Arc<tokio::sync::Semaphore>,
    metrics: crate::metrics::Metrics,
    warnings: mesh_core::log_limit::LogLimiter,
}

impl Limits {
    pub fn new(metrics: crate::metrics::Metrics) -> Self {
        Limits {
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            metrics,
            warnings: mesh_core::log_limit::LogLimiter::new(Duration::from_secs(10)),
        }
    }

    fn overloaded(&self) {
        self.metrics.refuse(crate::proxy::refusal::Refusal::DnsOverload);
        if let Some(suppressed) = self.warnings.check("overload") {
            tracing::warn!(
                suppressed,
                limit = MAX_IN_FLIGHT,
                "DNS queries dropped: too many in flight for one pod"
            );
        }
    }
}

/// One pod's (or the node's) DNS proxy.
pub struct DnsProxy {
    pub state: Arc<StateStore>,
    pub sockets: Arc<dyn SocketFactory>,
    /// The pod's namespace, for short names; `None` in dedicated mode.
    pub namespace: Option<String>,
    pub domain: String,
    pub upstreams: Arc<Vec<SocketAddr>>,
    pub limits: Limits,
}

/// The nameservers of a resolv.conf text.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl DnsProxy {
    /// Binds UDP and TCP on 127.0.0.1:`port` and serves until `drain` is cancelled. The
    /// redirect of locally sent packets lands on 127.0.0.1, and a UDP reply must leave from
    /// that same address: conntrack then restores the resolver address the pod asked, which
    /// a connected stub resolver (glibc) insists on.
    pub fn start(self: Arc<Self>, port: u16, drain: CancellationToken) -> std::io::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let udp = self.sockets.udp_socket(addr)?;
        let tcp = self.sockets.tcp_listener(addr)?;
        let (px, d) = (self.clone(), drain.clone());
        tokio::spawn(async move {
            tokio::select! { _ = px.serve_udp(udp) => {}, _ = d.cancelled() => {} }
        });
        tokio::spawn(async move {
            tokio::select! { _ = self.serve_tcp(tcp) => {}, _ = drain.cancelled() => {} }
        });
        Ok(())
    }

    async fn serve_udp(self: Arc<Self>, socket: tokio::net::UdpSocket) {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    if let Some(suppressed) = self.limits.warnings.check("receive") {
                        tracing::warn!(error = %e, suppressed, "DNS receive failed");
                    }
                    continue;
                }
            };
            // Over the limit the query is dropped: the client's resolver retries.
            let Ok(permit) = self.limits.in_flight.clone().try_acquire_owned() else {
                self.limits.overloaded();
                continue;
            };
            let query = buf[..n].to_vec();
            let (px, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                let _permit = permit; // held until the reply is sent
                if let Some(reply) = px.handle(&query, false).await {
                    let _ = socket.send_to(&reply, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut backoff = mesh_core::socket::AcceptBackoff::default();
        loop {
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    backoff.failed("DNS", &e).await;
                    continue;
                }
            };
            backoff.succeeded();
            let Ok(permit) = self.limits.in_flight.clone().try_acquire_owned() else {
                self.limits.overloaded();
                continue;
            };
            let px = self.clone();
            tokio::spawn(async move {
                let _permit = permit; // held for the connection's life
                                      // Two-byte length prefix per message (RFC 1035 4.2.2); several per connection.
                loop {
                    let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
                        return;
                    };
                    let mut query = vec![0u8; usize::from(len)];
                    if !matches!(
                        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await,
                        Ok(Ok(_))
                    ) {
                        return;
                    }
                    let Some(reply) = px.handle(&query, true).await else {
                        return;
                    };
                    let Ok(len) = u16::try_from(reply.len()) else { return };
                    if stream.write_u16(len).await.is_err() || stream.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// The reply to one query: ours for mesh names, the upstream's otherwise.
    async fn handle(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS query dropped");
                return None;
            }
        };
        if msg.metadata.message_type != MessageType::Query || msg.queries.len() != 1 {
            return self.forward(query, tcp).await;
        }
        let q = &msg.queries[0];
        let name = q.name().to_ascii();
        let found = match answer::lookup(&self.state.load(), &name, self.namespace.as_deref(), &self.domain) {
            Lookup::Found(ips) => ips,
            Lookup::Unknown => return self.forward(query, tcp).await,
        };
        let mut reply = Message::response(msg.metadata.id, msg.metadata.op_code);
        reply.metadata = Metadata::response_from_request(&msg.metadata);
        reply.metadata.authoritative = true;
        reply.metadata.recursion_available = true;
        reply.metadata.response_code = ResponseCode::NoError;
        reply.add_query(q.clone());
        for ip in found {
            let rdata = match (ip, q.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(v4.into()),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(v6.into()),
                _ => continue, // the other family: NOERROR without that record
            };
            reply.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
        }
        reply.to_vec().ok()
    }

    /// Sends `query` to the upstreams in turn; `None` (the client retries) when none answers.
    async fn forward(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        for upstream in self.upstreams.iter() {
            let bind = match upstream {
                SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
            };
            let attempt = async {
                if tcp {
                    let socket = self.sockets.tcp_socket(*upstream)?;
                    let mut s = socket.connect(*upstream).await?;
                    s.write_u16(u16::try_from(query.len()).map_err(std::io::Error::other)?)
                        .await?;
                    s.write_all(query).await?;
                    let len = s.read_u16().await?;
                    let mut reply = vec![0u8; usize::from(len)];
                    s.read_exact(&mut reply).await?;
                    Ok::<_, std::io::Error>(reply)
                } else {
                    let socket = self.sockets.udp_socket(bind)?;
                    // Connected: only the upstream's datagrams are taken as the answer.
                    socket.connect(upstream).await?;
                    socket.send(query).await?;
                    let mut buf = vec![0u8; 4096];
                    let n = socket.recv(&mut buf).await?;
                    buf.truncate(n);
                    Ok(buf)
                }
            };
            match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "upstream DNS failed"),
                Err(_) => tracing::debug!(%upstream, "upstream DNS timed out"),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use mesh_core::socket::PlainSockets;
    use prometheus_client::registry::Registry;

    use super::*;

    fn query(id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_ascii("example.org.").unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    /// A pod flooding its DNS proxy with queries that go upstream (to a resolver that never
    /// answers, so each holds its slot): at most MAX_IN_FLIGHT are handled, the rest dropped
    /// and counted, and nothing else is held.
    #[tokio::test]
    async fn a_query_flood_is_bounded_per_pod() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut registry = Registry::default();
        let metrics = crate::metrics::Metrics::register(&mut registry);
        let px = Arc::new(DnsProxy {
            state: StateStore::new(),
            sockets: Arc::new(PlainSockets::default()),
            namespace: Some("default".into()),
            domain: "cluster.local".into(),
            upstreams: Arc::new(vec![silent.local_addr().unwrap()]),
            limits: Limits::new(metrics),
        });
        let listener = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(px.clone().serve_udp(listener));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sent = 3 * MAX_IN_FLIGHT;
        for id in 0..sent {
            client.send_to(&query(id as u16), addr).await.unwrap();
        }
        let dropped = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text.lines()
                .find(|l| l.contains("reason=\"dns_overload\""))
                .and_then(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
                .unwrap_or(0)
        };
        tokio::time::timeout(Duration::from_secs(1), async {
            while dropped() < sent - MAX_IN_FLIGHT {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("queries over the limit are dropped and counted");
        assert_eq!(
            px.limits.in_flight.available_permits(),
            0,
            "the limit is reached, not exceeded"
        );
        assert_eq!(dropped(), sent - MAX_IN_FLIGHT);
    }

    fn proxy_without_upstreams() -> DnsProxy {
        DnsProxy {
            state: StateStore::new(),
            sockets: Arc::new(PlainSockets::default()),
            namespace: Some("default".into()),
            domain: "cluster.local".into(),
            upstreams: Arc::new(Vec::new()),
            limits: Limits::new(crate::metrics::Metrics::default()),
        }
    }

    proptest::proptest! {
        /// Whatever bytes a pod sends, the proxy neither panics nor answers with something
        /// that is not a DNS message (PROPTEST_CASES=100000 for a long run).
        #[test]
        fn arbitrary_queries_are_dropped_or_answered_well(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), tcp in proptest::prelude::any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let px = proxy_without_upstreams();
            if let Some(reply) = rt.block_on(px.handle(&bytes, tcp)) {
                proptest::prop_assert!(Message::from_vec(&reply).is_ok());
            }
        }

        /// Well-formed queries for arbitrary names and types: an answer, when there is one,
        /// carries the query's id and question.
        #[test]
        fn structured_queries_round_trip(id in proptest::prelude::any::<u16>(), label in "[a-z0-9-]{1,20}", qtype in 0u16..300) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let px = proxy_without_upstreams();
            let mut m = Message::query();
            m.metadata.id = id;
            let Ok(name) = Name::from_ascii(format!("{label}.default.svc.cluster.local.")) else { return Ok(()) };
            m.add_query(Query::query(name, RecordType::from(qtype)));
            let bytes = m.to_vec().unwrap();
            if let Some(reply) = rt.block_on(px.handle(&bytes, false)) {
                let reply = Message::from_vec(&reply).unwrap();
                proptest::prop_assert_eq!(reply.metadata.id, id);
                proptest::prop_assert_eq!(reply.queries.len(), 1);
            }
        }
    }
}
