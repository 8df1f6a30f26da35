//! What inbound HBONE and inbound plaintext share once they know the destination workload:
//! authorize the connection against its policies, decide the client address (see
//! [`super::source`]), connect to the application from it, track the connection so a policy
//! update can close it, and splice until either side ends, counting bytes as they move and
//! writing the access log. One sequence, so a fix to one path cannot miss the other.
//! AUDIT and dry-run policies are observed here too (never enforced): counted, and named in
//! the refusal log or the connection's access log (`authz.audit`, `authz.dry_run`).
//!
//! The two clients differ in what a failure means: an HBONE CONNECT is not answered yet, so a
//! refusal becomes its status and a dial it reset is abandoned; a plaintext client's TCP
//! connection already exists, so nothing is answered and a failed dial is recorded as a
//! connection that failed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::{Either, FutureExt};
use mesh_core::hbone::InboundConnect;
use mesh_core::rbac::{evaluate, observe, ConnectionInfo, Decision};
use mesh_core::socket::connect_from;
use mesh_core::state::{State, Workload};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::refusal::{ConnError, Refusal};
use super::source::client_source;
use super::tracker::Registration;
use super::Proxy;
use crate::metrics::{ConnRecord, CountedClient, ReasonLabels, TcpLabels};

/// The client side of an inbound connection.
pub enum Client {
    /// An HBONE CONNECT not answered yet (boxed: it is ten times a socket's size).
    Hbone(Box<InboundConnect>),
    /// A redirected plaintext connection.
    Plain(TcpStream),
}

/// What the listener found out about a connection before authorizing it.
pub struct Inbound {
    pub wl: Arc<Workload>,
    pub info: ConnectionInfo,
    pub labels: TcpLabels,
    /// The access log's `direction`.
    pub direction: &'static str,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The `forwarded: for=` address the peer claims, and whether it may forward one.
    pub forwarded: Option<SocketAddr>,
    pub forwarded_trusted: bool,
}

impl Client {
    /// Counts the refusal and answers it (HBONE: the stream's status; plaintext: close).
    fn refuse(self, px: &Proxy, refusal: Refusal) {
        px.metrics.refuse(refusal);
        if let Client::Hbone(req) = self {
            (*req).reject(refusal.status());
        }
    }
}

/// Authorizes, connects, tracks and splices one inbound connection to `conn.wl`.
/// `conn` comes boxed: an async fn keeps its arguments for as long as it runs.
pub async fn deliver(px: &Proxy, state: Arc<State>, client: Client, conn: Box<Inbound>) {
    // Set-up is boxed and freed once done: a task's size is fixed by what its longest wait
    // holds, and thousands of idle connections each hold one.
    let Some(Ready {
        record,
        registration,
        client,
        mut upstream,
    }) = Box::pin(prepare(px, state, client, conn)).await
    else {
        return;
    };
    let result = tokio::select! {
        r = client.splice(&mut upstream, &record) => r,
        _ = registration.revoked() => Err(ConnError::PolicyRevoked),
    };
    record.finish(result);
}

/// An authorized connection, tracked, connected to the application and accepted.
struct Ready<'a> {
    record: ConnRecord<'a>,
    registration: Registration,
    client: Accepted,
    upstream: TcpStream,
}

/// Everything before the splice: `None` once the connection was refused, failed or recorded.
async fn prepare<'a>(px: &'a Proxy, state: Arc<State>, client: Client, conn: Box<Inbound>) -> Option<Ready<'a>> {
    let observed = observe(|| state.policies_for(&conn.wl), &conn.info);
    if !observed.is_empty() {
        px.metrics.observed(&observed);
    }
    if let Decision::Deny(denial) = evaluate(state.policies_for(&conn.wl), &conn.info) {
        let identity = conn.info.src_identity.as_ref().map(ToString::to_string);
        let dry_run = observed.dry_run.as_ref().map(ToString::to_string);
        info!(src = %conn.peer, identity, dst = %conn.info.dst, %denial, direction = conn.direction, audit = %observed.audit_names(), dry_run, "{}", Refusal::PolicyDenied);
        client.refuse(px, Refusal::PolicyDenied);
        return None;
    }
    let source = client_source(conn.peer, conn.forwarded, conn.forwarded_trusted, |ip| {
        px.is_own_address(ip)
    });
    if let Some(ignored) = source.ignored {
        debug!(peer = %conn.peer, src = ?conn.info.src_identity, forwarded = ?conn.forwarded, reason = ignored.reason(), "forwarded client address ignored");
        px.metrics
            .forwarded_ignored
            .get_or_create(&ReasonLabels {
                reason: ignored.reason(),
            })
            .inc();
    }
    // Only what the splice needs is kept across it: a task's size is fixed by what its longest
    // wait holds, and thousands of idle connections each hold one. The tracker takes the
    // connection's facts (moved, not copied).
    let Inbound {
        wl,
        info,
        labels,
        direction,
        ..
    } = *conn;
    let dst = info.dst;
    // Tracked from here: a policy update while the application is dialled closes it too. One
    // that came since `state` was loaded was not seen by the tracker: checked here.
    let registration = px.tracker.register(info, wl);
    let latest = px.state.load();
    if !Arc::ptr_eq(&latest, &state) {
        if let Some(denial) = registration.denial(&latest) {
            info!(src = %source.addr, dst = %dst, %denial, direction, "{}", Refusal::PolicyDenied);
            client.refuse(px, Refusal::PolicyDenied);
            return None;
        }
    }
    drop((state, latest));
    let (client, upstream) = Box::pin(dial(px, client, source.addr, dst, (&labels, direction))).await?;
    let client = match client {
        Client::Hbone(req) => match (*req).accept() {
            Ok(h2) => Accepted::Hbone(h2),
            Err(e) => {
                debug!(error = %e, "client went away before the tunnel was accepted");
                return None;
            }
        },
        Client::Plain(tcp) => Accepted::Plain(tcp),
    };
    let record = ConnRecord::open(&px.metrics, labels, direction, source.addr, dst, None).with_observed(observed);
    Some(Ready {
        record,
        registration,
        client,
        upstream,
    })
}

/// Connects to the application at `dst` from `from`'s address where the kernel allows. On
/// failure the client is answered (HBONE) or the failed connection recorded (plaintext).
async fn dial(
    px: &Proxy,
    mut client: Client,
    from: SocketAddr,
    dst: SocketAddr,
    (labels, direction): (&TcpLabels, &'static str),
) -> Option<(Client, TcpStream)> {
    let connect = tokio::time::timeout(
        px.settings.connect_timeout,
        connect_from(&*px.sockets, px.original_source.then_some(from.ip()), dst),
    );
    let connected = match &mut client {
        // A client that resets the stream meanwhile gets no connection to the application.
        Client::Hbone(req) => match req.unless_reset(connect).await {
            Some(r) => r,
            None => {
                debug!(%dst, "{}", Refusal::ResetBeforeConnect);
                px.metrics.refuse(Refusal::ResetBeforeConnect);
                return None;
            }
        },
        Client::Plain(_) => connect.await,
    };
    let error = match connected {
        Ok(Ok((s, _transparent))) => return Some((client, s)),
        Ok(Err(e)) => ConnError::Connect(dst, e),
        Err(_) => ConnError::ConnectTimeout(dst),
    };
    if let Client::Plain(_) = client {
        let record = ConnRecord::open(&px.metrics, labels.clone(), direction, from, dst, None);
        record.finish(Err(error));
        return None;
    }
    let refusal = match error {
        ConnError::ConnectTimeout(_) => Refusal::UpstreamTimeout,
        _ => Refusal::UpstreamUnreachable,
    };
    info!(%dst, %error, "{refusal}");
    client.refuse(px, refusal);
    None
}

/// The client side once the connection is accepted.
enum Accepted {
    Hbone(mesh_core::hbone::stream::H2Stream),
    Plain(TcpStream),
}

impl Accepted {
    /// Moves bytes between the client and the application until either ends. Not an async fn:
    /// the future holds the client's parts once, not also the `Accepted` they came from.
    fn splice<'a>(
        self,
        upstream: &'a mut TcpStream,
        record: &'a ConnRecord<'a>,
    ) -> impl Future<Output = Result<(), ConnError>> + Send + 'a {
        match self {
            // Bytes flowing from the tunnel go to the destination app ("sent" by the client).
            Accepted::Hbone(h2) => Either::Left(
                h2.splice_tcp_observed(upstream, record.bytes().tunnel_to_client())
                    .map(|r| r.map(drop).map_err(ConnError::from)),
            ),
            Accepted::Plain(tcp) => Either::Right(splice_plain(tcp, upstream, record)),
        }
    }
}

async fn splice_plain(mut tcp: TcpStream, upstream: &mut TcpStream, record: &ConnRecord<'_>) -> Result<(), ConnError> {
    let mut client = CountedClient {
        inner: &mut tcp,
        bytes: record.bytes(),
    };
    tokio::io::copy_bidirectional(&mut client, upstream).await?;
    Ok(())
}
