//! The DNS proxy (15053 in each pod namespace, on 127.0.0.1 and, when the namespace has it,
//! [::1]; the capture rules redirect the pod's port 53 of both families to it). Mesh service
//! names are answered from the mesh state, so a pod resolves services the instant the
//! controller knows them; every other query is forwarded unchanged to the upstream resolvers
//! from a socket carrying the mesh mark (which the redirect skips), and answered SERVFAIL when
//! none replies. Malformed queries are dropped with a log line, never answered with garbage.
//! Our answers fit the client's transport: over UDP 512 bytes or its EDNS size, at most 64 KiB
//! over TCP; a larger one keeps the records that fit and sets TC (the client retries on TCP).
//! Upstream replies are taken whole (64 KiB) and passed on only if they parse.
//!
//! A pod can send queries as fast as it likes, and each forwarded one holds a socket for up
//! to the upstream timeout: at most [`MAX_IN_FLIGHT`] queries or TCP connections per pod, and
//! [`NODE_MAX_IN_FLIGHT`] across the node, are handled at once; beyond that UDP queries and
//! new TCP connections are dropped (counted as
//! `ztunnel_connections_refused_total{reason="dns_overload"}`). A TCP query longer than
//! [`MAX_TCP_QUERY`] closes its connection, as do [`TCP_IDLE`] without a query or a reply
//! the client does not take within it; the accept loop backs off when descriptors run out.

pub mod answer;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use mesh_core::socket::SocketFactory;
use mesh_core::state::StateStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use answer::Lookup;

/// Answers' TTL: short, so a changed VIP is picked up quickly.
const TTL: u32 = 30;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries (UDP) and connections (TCP) one pod's proxy handles at once.
pub const MAX_IN_FLIGHT: usize = 128;
/// Queries and connections all pods' proxies handle at once (one ztunnel per node).
pub const NODE_MAX_IN_FLIGHT: usize = 4096;
/// The longest query taken over TCP: a question is small (a name is at most 255 bytes).
pub const MAX_TCP_QUERY: u16 = 4096;
/// A TCP connection that sends no query, or does not take a reply, for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest DNS message (TCP's length prefix; UDP's datagram).
const MAX_MESSAGE: usize = 65535;
/// The EDNS payload size we advertise in our own answers.
const OUR_EDNS_PAYLOAD: u16 = 4096;

/// The transport a query came on, which bounds its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// Which bound refused a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Overload {
    Pod,
    Node,
}

/// What bounds one pod's DNS proxy, and where a refusal is counted.
pub struct Limits {
    in_flight: Arc<Semaphore>,
    /// Shared by every pod's proxy in this process.
    node: Arc<Semaphore>,
    metrics: crate::metrics::Metrics,
    warnings: mesh_core::log_limit::LogLimiter,
}

/// Both permits a query or connection holds while it is handled.
struct Admitted {
    _pod: OwnedSemaphorePermit,
    _node: OwnedSemaphorePermit,
}

impl Limits {
    /// A pod's limits, sharing this process's node-wide bound.
    pub fn new(metrics: crate::metrics::Metrics) -> Self {
        static NODE: OnceLock<Arc<Semaphore>> = OnceLock::new();
        let node = NODE.get_or_init(|| Arc::new(Semaphore::new(NODE_MAX_IN_FLIGHT)));
        Self::sharing(metrics, node.clone())
    }

    /// A pod's limits under the node-wide bound `node`.
    fn sharing(metrics: crate::metrics::Metrics, node: Arc<Semaphore>) -> Self {
        Limits {
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            node,
            metrics,
            warnings: mesh_core::log_limit::LogLimiter::new(Duration::from_secs(10)),
        }
    }

    /// Takes a pod and a node slot, or counts and logs the refusal.
    fn admit(&self) -> Option<Admitted> {
        let outcome = match self.in_flight.clone().try_acquire_owned() {
            Err(_) => Err(Overload::Pod),
            Ok(pod) => match self.node.clone().try_acquire_owned() {
                Err(_) => Err(Overload::Node),
                Ok(node) => Ok(Admitted { _pod: pod, _node: node }),
            },
        };
        match outcome {
            Ok(admitted) => Some(admitted),
            Err(overload) => {
                self.overloaded(overload);
                None
            }
        }
    }

    fn overloaded(&self, overload: Overload) {
        self.metrics.refuse(crate::proxy::refusal::Refusal::DnsOverload);
        let (key, limit, what) = match overload {
            Overload::Pod => ("overload", MAX_IN_FLIGHT, "for one pod"),
            Overload::Node => ("node overload", NODE_MAX_IN_FLIGHT, "on this node"),
        };
        if let Some(suppressed) = self.warnings.check(key) {
            tracing::warn!(suppressed, limit, "DNS queries dropped: too many in flight {what}");
        }
    }
}

/// How a TCP client connection ended.
#[derive(Debug, PartialEq, Eq)]
enum ConnEnd {
    /// Closed by the client, or idle for [`TCP_IDLE`].
    Closed,
    /// A length prefix over [`MAX_TCP_QUERY`].
    TooLong(u16),
    /// A query we do not answer (malformed): the connection is dropped.
    Unanswered,
    /// The client did not take a reply within [`TCP_IDLE`], or the write failed.
    WriteFailed,
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

/// The upstreams a resolv.conf gives, or why it gives none.
#[derive(Debug)]
pub enum ResolvConf {
    Nameservers(Vec<SocketAddr>),
    /// Readable, but without a usable `nameserver` line.
    NoNameserver,
    Unreadable(std::io::Error),
}

/// Reads the upstream resolvers from the resolv.conf at `path`.
pub fn read_resolv_conf(path: &std::path::Path) -> ResolvConf {
    match std::fs::read_to_string(path) {
        Err(e) => ResolvConf::Unreadable(e),
        Ok(text) => match upstreams_from_resolv_conf(&text) {
            v if v.is_empty() => ResolvConf::NoNameserver,
            v => ResolvConf::Nameservers(v),
        },
    }
}

impl DnsProxy {
    /// Binds UDP and TCP on 127.0.0.1:`port`, and on [::1]:`port` when the namespace has IPv6
    /// (skipped with a log line when not), and serves until `drain` is cancelled. The
    /// redirect of locally sent packets lands on the loopback address of the query's family,
    /// and a UDP reply must leave from that same address: conntrack then restores the
    /// resolver address the pod asked, which a connected stub resolver (glibc) insists on.
    pub fn start(self: Arc<Self>, port: u16, drain: CancellationToken) -> std::io::Result<()> {
        let v4 = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let mut bound = vec![(self.sockets.udp_socket(v4)?, self.sockets.tcp_listener(v4)?)];
        let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port);
        match self
            .sockets
            .udp_socket(v6)
            .and_then(|u| Ok((u, self.sockets.tcp_listener(v6)?)))
        {
            Ok(pair) => bound.push(pair),
            // IPv6 disabled in the namespace (no ::1) or in the kernel: IPv4 only.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EADDRNOTAVAIL | nix::libc::EAFNOSUPPORT)
                ) =>
            {
                tracing::debug!(port, error = %e, "no IPv6 loopback: DNS proxy on IPv4 only");
            }
            Err(e) => tracing::warn!(port, error = %e, "IPv6 DNS listener unavailable"),
        }
        for (udp, tcp) in bound {
            let (px, d) = (self.clone(), drain.clone());
            tokio::spawn(async move {
                tokio::select! { _ = px.serve_udp(udp) => {}, _ = d.cancelled() => {} }
            });
            let (px, d) = (self.clone(), drain.clone());
            tokio::spawn(async move {
                tokio::select! { _ = px.serve_tcp(tcp) => {}, _ = d.cancelled() => {} }
            });
        }
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
            let Some(admitted) = self.limits.admit() else { continue };
            let query = buf[..n].to_vec();
            let (px, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                let _admitted = admitted; // held until the reply is sent
                if let Some(reply) = px.handle(&query, Transport::Udp).await {
                    let _ = socket.send_to(&reply, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut backoff = mesh_core::socket::AcceptBackoff::default();
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    backoff.failed("DNS", &e).await;
                    continue;
                }
            };
            backoff.succeeded();
            // Over the limit the connection is closed at once: the client retries.
            let Some(admitted) = self.limits.admit() else { continue };
            let px = self.clone();
            tokio::spawn(async move {
                let _admitted = admitted; // held for the connection's life
                let end = px.serve_conn(stream, TCP_IDLE).await;
                tracing::trace!(?end, "DNS TCP connection ended");
            });
        }
    }

    /// Serves one TCP connection: two-byte length prefix per message (RFC 1035 4.2.2),
    /// several per connection; closed after `idle` without a query or taking a reply.
    async fn serve_conn<S>(&self, mut stream: S, idle: Duration) -> ConnEnd
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let Ok(Ok(len)) = tokio::time::timeout(idle, stream.read_u16()).await else {
                return ConnEnd::Closed;
            };
            if len > MAX_TCP_QUERY {
                return ConnEnd::TooLong(len);
            }
            let mut query = vec![0u8; usize::from(len)];
            if !matches!(
                tokio::time::timeout(idle, stream.read_exact(&mut query)).await,
                Ok(Ok(_))
            ) {
                return ConnEnd::Closed;
            }
            let Some(reply) = self.handle(&query, Transport::Tcp).await else {
                return ConnEnd::Unanswered;
            };
            let Ok(len) = u16::try_from(reply.len()) else {
                return ConnEnd::Unanswered; // not built by us nor passed on: never happens
            };
            let write = async {
                stream.write_u16(len).await?;
                stream.write_all(&reply).await
            };
            if !matches!(tokio::time::timeout(idle, write).await, Ok(Ok(()))) {
                return ConnEnd::WriteFailed;
            }
        }
    }

    /// The reply to one query: ours for mesh names, the upstream's otherwise, SERVFAIL when
    /// no upstream replies.
    async fn handle(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS query dropped");
                return None;
            }
        };
        let is_query = msg.metadata.message_type == MessageType::Query;
        let found = match msg.queries.as_slice() {
            [q] if is_query => answer::lookup(
                &self.state.load(),
                &q.name().to_ascii(),
                self.namespace.as_deref(),
                &self.domain,
            ),
            _ => Lookup::Unknown,
        };
        match found {
            Lookup::Found(ips) => answer_message(&msg, &ips, transport),
            Lookup::Unknown => match self.forward(query, transport).await {
                Some(reply) => Some(reply),
                None if is_query => error_message(&msg, ResponseCode::ServFail),
                None => None,
            },
        }
    }

    /// Sends `query` to the upstreams in turn; `None` when none answers with a whole message.
    async fn forward(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        for upstream in self.upstreams.iter() {
            let attempt = async {
                let reply = match transport {
                    Transport::Tcp => self.forward_tcp(*upstream, query).await?,
                    Transport::Udp => self.forward_udp(*upstream, query).await?,
                };
                // Only a whole reply to this query is passed on.
                if reply.get(..2) != query.get(..2) || Message::from_vec(&reply).is_err() {
                    return Err(std::io::Error::other("reply does not parse or is not for this query"));
                }
                Ok(reply)
            };
            match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "upstream DNS failed"),
                Err(_) => tracing::debug!(%upstream, "upstream DNS timed out"),
            }
        }
        None
    }

    async fn forward_tcp(&self, upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let socket = self.sockets.tcp_socket(upstream)?;
        let mut s = socket.connect(upstream).await?;
        s.write_u16(u16::try_from(query.len()).map_err(std::io::Error::other)?)
            .await?;
        s.write_all(query).await?;
        let len = s.read_u16().await?;
        let mut reply = vec![0u8; usize::from(len)];
        s.read_exact(&mut reply).await?;
        Ok(reply)
    }

    async fn forward_udp(&self, upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let bind = match upstream {
            SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
        };
        let socket = self.sockets.udp_socket(bind)?;
        // Connected: only the upstream's datagrams are taken as the answer.
        socket.connect(upstream).await?;
        socket.send(query).await?;
        loop {
            socket.readable().await?;
            // Room for any datagram, allocated only once one is there: no reply is cut, and
            // queries waiting on their upstream hold no buffer.
            let mut buf = vec![0u8; MAX_MESSAGE];
            match socket.try_recv(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A reply to `query` with no records: its id, flags and question, and `code`.
fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata = Metadata::response_from_request(&query.metadata);
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    reply.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(OUR_EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

fn error_message(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    reply_to(query, code).to_vec().ok()
}

/// Our authoritative answer with `ips` of the asked family, sized for `transport`.
fn answer_message(query: &Message, ips: &[IpAddr], transport: Transport) -> Option<Vec<u8>> {
    let q = query.queries.first()?;
    let mut reply = reply_to(query, ResponseCode::NoError);
    reply.metadata.authoritative = true;
    for ip in ips {
        let rdata = match (ip, q.query_type()) {
            (IpAddr::V4(v4), RecordType::A) => RData::A((*v4).into()),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA((*v6).into()),
            _ => continue, // the other family: NOERROR without that record
        };
        reply.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
    }
    let limit = match transport {
        Transport::Udp => usize::from(query.max_payload()),
        Transport::Tcp => MAX_MESSAGE,
    };
    fit(reply, limit)
}

/// `reply` encoded in at most `limit` bytes: whole, or with the answers that fit and TC set
/// (RFC 2181 9), so the client retries over TCP.
fn fit(mut reply: Message, limit: usize) -> Option<Vec<u8>> {
    let whole = reply.to_vec().ok()?;
    if whole.len() <= limit {
        return Some(whole);
    }
    reply.metadata.truncation = true;
    let answers = std::mem::take(&mut reply.answers);
    // The most answers that fit: `lo` fits (none always does), `hi` does not.
    let (mut lo, mut hi) = (0, answers.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        reply.answers = answers[..mid].to_vec();
        if reply.to_vec().ok()?.len() <= limit {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    reply.answers = answers[..lo].to_vec();
    reply.to_vec().ok()
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

    fn query_for(name: &str, edns: Option<u16>) -> Message {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m
    }

    /// `web.default.svc.cluster.local` with `n` IPv4 VIPs.
    fn with_service(px: &DnsProxy, n: u32) {
        px.state.update(|s| {
            s.upsert_service(mesh_core::state::Service {
                name: "web".into(),
                namespace: "default".into(),
                hostname: "web.default.svc.cluster.local".into(),
                vips: (0..n)
                    .map(|i| (String::new(), IpAddr::from(Ipv4Addr::from(0x0a60_0000 + i))))
                    .collect(),
                ports: Vec::new(),
                subject_alt_names: Vec::new(),
                waypoint: None,
                only_healthy: true,
            })
        });
    }

    fn decode(reply: Option<Vec<u8>>) -> (usize, Message) {
        let bytes = reply.expect("a reply");
        (bytes.len(), Message::from_vec(&bytes).expect("a DNS message"))
    }

    /// Our answers fit the client's UDP size (512, or its EDNS size) and TCP's 64 KiB, with TC
    /// set when records were left out.
    #[tokio::test]
    async fn answers_are_sized_for_the_transport() {
        let px = proxy_without_upstreams();
        with_service(&px, 60);
        let name = "web.default.svc.cluster.local.";
        for (edns, transport, whole) in [
            (None, Transport::Udp, false),
            (Some(1232), Transport::Udp, true),
            (None, Transport::Tcp, true),
        ] {
            let q = query_for(name, edns).to_vec().unwrap();
            let (len, reply) = decode(px.handle(&q, transport).await);
            let limit = edns.map_or(512, usize::from);
            assert!(transport == Transport::Tcp || len <= limit, "{len} > {limit}");
            assert_eq!(reply.metadata.truncation, !whole, "{edns:?} {transport:?}");
            assert_eq!(reply.answers.len() == 60, whole);
            assert!(!reply.answers.is_empty(), "the records that fit are kept");
            assert_eq!(reply.edns.is_some(), edns.is_some(), "EDNS answered with EDNS");
        }
        with_service(&px, 5000);
        let q = query_for(name, Some(4096)).to_vec().unwrap();
        let (len, reply) = decode(px.handle(&q, Transport::Tcp).await);
        assert!(len <= MAX_MESSAGE && reply.metadata.truncation);
        assert!(reply.answers.len() > 1000, "{}", reply.answers.len());
        let (len, reply) = decode(px.handle(&q, Transport::Udp).await);
        assert!(len <= 4096 && reply.metadata.truncation);
    }

    /// An upstream reply larger than 4 KiB is passed on whole; one that does not parse is not
    /// passed on (the client gets SERVFAIL).
    #[tokio::test]
    async fn upstream_replies_are_passed_on_whole_or_not_at_all() {
        let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut px = proxy_without_upstreams();
        px.upstreams = Arc::new(vec![upstream.local_addr().unwrap()]);
        let mut big = query_for("big.example.org.", Some(65000));
        big.metadata.message_type = MessageType::Response;
        for i in 0..600u32 {
            big.add_answer(Record::from_rdata(
                big.queries[0].name().clone(),
                TTL,
                RData::A(Ipv4Addr::from(i).into()),
            ));
        }
        let big = big.to_vec().unwrap();
        assert!(big.len() > 8192);
        let q = query_for("big.example.org.", Some(65000)).to_vec().unwrap();
        for (sent, want) in [(big.clone(), Some(big.clone())), (big[..5000].to_vec(), None)] {
            let server = async {
                let mut buf = [0u8; 512];
                let (_, peer) = upstream.recv_from(&mut buf).await.unwrap();
                upstream.send_to(&sent, peer).await.unwrap();
            };
            let (reply, ()) = tokio::join!(px.handle(&q, Transport::Udp), server);
            match want {
                Some(whole) => assert_eq!(reply.as_deref(), Some(whole.as_slice())),
                None => {
                    let (_, reply) = decode(reply);
                    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
                }
            }
        }
    }

    /// With no upstream to ask, a query for another name is answered SERVFAIL at once.
    #[tokio::test]
    async fn no_upstream_answers_servfail() {
        let px = proxy_without_upstreams();
        let (_, reply) = decode(px.handle(&query(9), Transport::Udp).await);
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert_eq!((reply.metadata.id, reply.queries.len()), (9, 1));
    }

    /// A TCP length prefix over the cap closes the connection at once, holding nothing.
    #[tokio::test]
    async fn a_long_tcp_query_is_refused() {
        let px = proxy_without_upstreams();
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_u16(60_000).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(1), px.serve_conn(server, TCP_IDLE)).await;
        assert_eq!(end.expect("refused without waiting"), ConnEnd::TooLong(60_000));
    }

    /// A client that never reads its reply loses the connection after TCP_IDLE.
    #[tokio::test]
    async fn a_tcp_client_that_does_not_read_is_dropped() {
        let px = proxy_without_upstreams();
        with_service(&px, 500);
        let (mut client, server) = tokio::io::duplex(64);
        let q = query_for("web.default.svc.cluster.local.", None).to_vec().unwrap();
        client.write_u16(q.len() as u16).await.unwrap();
        client.write_all(&q).await.unwrap();
        let idle = Duration::from_millis(100);
        let end = tokio::time::timeout(Duration::from_secs(2), px.serve_conn(server, idle)).await;
        assert_eq!(end.expect("the write times out"), ConnEnd::WriteFailed);
    }

    /// Pods' proxies share a node-wide bound: beyond it queries are dropped and counted.
    #[tokio::test]
    async fn the_node_bounds_all_pods_together() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let node = Arc::new(Semaphore::new(4));
        let metrics = crate::metrics::Metrics::default();
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut proxies = Vec::new();
        for _ in 0..2 {
            let mut px = proxy_without_upstreams();
            px.upstreams = Arc::new(vec![silent.local_addr().unwrap()]);
            px.limits = Limits::sharing(metrics.clone(), node.clone());
            let px = Arc::new(px);
            let listener = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(px.clone().serve_udp(listener));
            for id in 0..10 {
                client.send_to(&query(id), addr).await.unwrap();
            }
            proxies.push(px);
        }
        tokio::time::timeout(Duration::from_secs(1), async {
            while node.available_permits() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the node bound is reached");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held: usize = proxies
            .iter()
            .map(|px| MAX_IN_FLIGHT - px.limits.in_flight.available_permits())
            .sum();
        assert_eq!(held, 4, "the node bound holds across pods");
    }

    /// The proxy answers on [::1] too when the namespace has IPv6.
    #[tokio::test]
    async fn ipv6_queries_are_answered() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("no IPv6 loopback here: skipped");
            return;
        }
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let px = Arc::new(proxy_without_upstreams());
        with_service(&px, 1);
        px.clone().start(port, CancellationToken::new()).expect("bound");
        let client = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
        let q = query_for("web.default.svc.cluster.local.", None).to_vec().unwrap();
        client.send_to(&q, ("::1", port)).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(1), client.recv(&mut buf))
            .await
            .expect("answered over IPv6")
            .unwrap();
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 1);
    }

    #[test]
    fn resolv_conf_without_nameservers_is_told_apart() {
        let dir = std::env::temp_dir().join(format!("dns-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "search svc.cluster.local\nnameserver not-an-ip\n").unwrap();
        assert!(matches!(read_resolv_conf(&path), ResolvConf::NoNameserver));
        std::fs::write(&path, "nameserver 10.96.0.10\n").unwrap();
        assert!(matches!(read_resolv_conf(&path), ResolvConf::Nameservers(v) if v.len() == 1));
        assert!(matches!(
            read_resolv_conf(&dir.join("missing")),
            ResolvConf::Unreadable(_)
        ));
        let _ = std::fs::remove_dir_all(&dir);
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
            limits: Limits::sharing(metrics, Arc::new(Semaphore::new(NODE_MAX_IN_FLIGHT))),
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
            limits: Limits::sharing(
                crate::metrics::Metrics::default(),
                Arc::new(Semaphore::new(NODE_MAX_IN_FLIGHT)),
            ),
        }
    }

    proptest::proptest! {
        /// Whatever bytes a pod sends, the proxy neither panics nor answers with something
        /// that is not a DNS message (PROPTEST_CASES=100000 for a long run).
        #[test]
        fn arbitrary_queries_are_dropped_or_answered_well(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), tcp in proptest::prelude::any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let px = proxy_without_upstreams();
            if let Some(reply) = rt.block_on(px.handle(&bytes, if tcp { Transport::Tcp } else { Transport::Udp })) {
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
            if let Some(reply) = rt.block_on(px.handle(&bytes, Transport::Udp)) {
                let reply = Message::from_vec(&reply).unwrap();
                proptest::prop_assert_eq!(reply.metadata.id, id);
                proptest::prop_assert_eq!(reply.queries.len(), 1);
            }
        }
    }
}
