//! Inbound plaintext (15006): connections redirected without HBONE. They carry no identity,
//! so a policy requiring one (STRICT mTLS) denies them. Under PERMISSIVE anyone can open them,
//! so how many are held is bounded per source address and in total ([`super::ListenerLimits`]).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::hbone::PendingGuard;
use mesh_core::rbac::ConnectionInfo;
use mesh_core::socket::original_dst;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::deliver::{deliver, Client, Inbound};
use super::refusal::Refusal;
use super::Proxy;
use crate::metrics::{Reporter, TcpLabels};

pub async fn serve(px: Arc<Proxy>, listener: TcpListener) {
    let limits = px.limits.plaintext.clone();
    super::accept_loop(px, listener, "plaintext", limits, handle).await
}

/// `_slot` is the connection's place in the plaintext bound, held until it ends.
async fn handle(px: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr, _slot: PendingGuard) {
    let Ok(dst) = original_dst(&tcp) else {
        px.metrics.refuse(Refusal::NoOriginalDst);
        return;
    };
    if px.is_loop(dst) {
        px.metrics.refuse(Refusal::Loop);
        return;
    }
    let wl = match px.local_workload(dst, Refusal::UnknownDestination) {
        Ok(wl) => wl,
        Err(refusal) => {
            warn!(%peer, %dst, %refusal, "plaintext connection refused");
            px.metrics.refuse(refusal);
            return;
        }
    };
    let state = px.state.load();
    let info = ConnectionInfo {
        src_identity: None,
        src_ip: peer.ip(),
        dst,
    };
    let src_wl = state.workload_by_ip(&px.network, peer.ip()).cloned();
    let labels = TcpLabels::new(Reporter::destination, src_wl.as_deref(), None, Some(&wl), None, false);
    let conn = Inbound {
        wl,
        info,
        labels,
        direction: "inbound_plaintext",
        peer,
        // No HBONE, no `forwarded`: the application sees the peer.
        forwarded: None,
        forwarded_trusted: false,
    };
    deliver(&px, state, Client::Plain(tcp), Box::new(conn)).await;
}
