//! The DNS proxy (15053 in each pod namespace; the capture rules redirect the pod's port 53
//! to it). Mesh service names are answered from the mesh state, so a pod resolves services
//! the instant the controller knows them; every other query is forwarded unchanged to the
//! upstream resolvers from a socket carrying the mesh mark (which the redirect skips).
//! Malformed queries are dropped with a log line, never answered with garbage.

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

/// One pod's (or the node's) DNS proxy.
pub struct DnsProxy {
    pub state: Arc<StateStore>,
    pub sockets: Arc<dyn SocketFactory>,
    /// The pod's namespace, for short names; `None` in dedicated mode.
    pub namespace: Option<String>,
    pub domain: String,
    pub upstreams: Arc<Vec<SocketAddr>>,
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
                    tracing::warn!(error = %e, "DNS receive failed");
                    continue;
                }
            };
            let query = buf[..n].to_vec();
            let (px, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                if let Some(reply) = px.handle(&query, false).await {
                    let _ = socket.send_to(&reply, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let px = self.clone();
            tokio::spawn(async move {
                // Two-byte length prefix per message (RFC 1035 4.2.2); several per connection.
                loop {
                    let Ok(len) = stream.read_u16().await else { return };
                    let mut query = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut query).await.is_err() {
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
                    socket.send_to(query, upstream).await?;
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
