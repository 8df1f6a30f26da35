//! Inbound plaintext (15006): connections redirected without HBONE. They carry no identity,
//! so a policy requiring one (STRICT mTLS) denies them.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::rbac::{evaluate, ConnectionInfo, Decision};
use mesh_core::socket::{connect_from, original_dst};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::Proxy;
use crate::metrics::{ConnRecord, CountedClient, Reporter, TcpLabels};

pub async fn serve(px: Arc<Proxy>, listener: TcpListener) {
    super::accept_loop(px, listener, "plaintext", handle).await
}

async fn handle(px: Arc<Proxy>, mut tcp: TcpStream, peer: SocketAddr) {
    let Ok(dst) = original_dst(&tcp) else {
        px.metrics.refuse("no_original_dst");
        return;
    };
    if px.is_loop(dst) {
        px.metrics.refuse("loop");
        return;
    }
    let Some(wl) = px.local_workload(dst) else {
        warn!(%peer, %dst, "plaintext connection to an address with no local workload");
        px.metrics.refuse("unknown_destination");
        return;
    };
    let state = px.state.load();
    let info = ConnectionInfo {
        src_identity: None,
        src_ip: peer.ip(),
        dst,
    };
    let src_wl = state.workload_by_ip(&px.network, peer.ip()).cloned();
    let labels = TcpLabels::new(Reporter::destination, src_wl.as_deref(), None, Some(&wl), None, false);
    if let Decision::Deny(policy) = evaluate(state.policies_for(&wl), &info) {
        info!(src = %peer, %dst, ?policy, "plaintext connection denied by authorization policy");
        px.metrics.refuse("policy_denied");
        return;
    }
    drop(state);
    let registration = px.tracker.register(info, wl.uid.clone());
    let record = ConnRecord::open(&px.metrics, labels, "inbound_plaintext", peer, dst, None);
    let result = async {
        let (mut up, _) = tokio::time::timeout(
            px.settings.connect_timeout,
            connect_from(&*px.sockets, Some(peer.ip()), dst),
        )
        .await
        .map_err(|_| format!("connect to {dst} timed out"))?
        .map_err(|e| format!("connect to {dst}: {e}"))?;
        let mut client = CountedClient {
            inner: &mut tcp,
            bytes: record.bytes(),
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut up) => {
                r.map(drop).map_err(|e| e.to_string())
            }
            _ = registration.cancel.cancelled() => Err("closed: denied by updated authorization policy".to_owned()),
        }
    }
    .await;
    record.finish(result);
}
