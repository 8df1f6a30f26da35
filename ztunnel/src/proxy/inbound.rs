//! Inbound HBONE (15008): terminate mutual TLS with the local workload's certificate, check
//! that each CONNECT targets that workload, authorize it, connect to the application from the
//! client's own address where the kernel allows (the peer's, or the `forwarded` one when a
//! waypoint of the destination sends it: see [`super::source`]), answer 200 and splice.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::hbone::{serve_connection, HboneError, InboundConnect};
use mesh_core::log_limit::LogLimiter;
use mesh_core::rbac::{evaluate, ConnectionInfo, Decision};
use mesh_core::socket::connect_from;
use mesh_core::tls;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::source::{client_source, is_waypoint_for};
use super::Proxy;
use crate::metrics::{ConnRecord, Reporter, TcpLabels};

/// Failed connections are logged at most once a second, with the number suppressed: any
/// client can make a connection fail.
static CONNECTION_ERRORS: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(std::time::Duration::from_secs(1)));

pub async fn serve(px: Arc<Proxy>, listener: TcpListener) {
    super::accept_loop(px, listener, "HBONE", connection).await
}

async fn connection(px: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let Ok(local) = tcp.local_addr() else { return };
    let Some(wl) = px.local_workload(local) else {
        warn!(%peer, %local, "HBONE connection to an address with no local workload");
        px.metrics.refuse("unknown_destination");
        return;
    };
    let cert = match px.certs.fetch(&wl.identity).await {
        Ok(c) => c,
        Err(e) => {
            // No certificate: refuse rather than serve without identity.
            warn!(identity = %wl.identity, error = %e, "no certificate for inbound HBONE");
            px.metrics.refuse("no_certificate");
            return;
        }
    };
    let config = match tls::cached_server_config(&cert) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot build TLS server configuration");
            px.metrics.refuse("tls_config");
            return;
        }
    };
    let px2 = px.clone();
    let result = serve_connection(tcp, config, &px.settings, px.drain.clone(), move |req| {
        let px = px2.clone();
        async move { stream(px, req).await }
    })
    .await;
    match result {
        Ok(()) => {}
        // Already counted by the limit's observer; a flood must not become a log flood.
        Err(HboneError::Limited(_)) => {}
        Err(e) => {
            px.metrics.refuse("hbone_connection_error");
            if let Some(suppressed) = CONNECTION_ERRORS.check("hbone") {
                info!(%peer, error = %e, suppressed, "HBONE connection ended with error");
            }
        }
    }
}

async fn stream(px: Arc<Proxy>, mut req: InboundConnect) {
    let state = px.state.load();
    // The authority must name this listener's workload (by one of its addresses).
    let owner = state.workload_by_ip(&px.network, req.local_addr.ip()).cloned();
    let Some(wl) = owner.filter(|w| w.addresses.contains(&req.dst.ip()) && px.local.contains(req.dst.ip())) else {
        debug!(dst = %req.dst, local = %req.local_addr, "CONNECT authority does not belong to this workload");
        px.metrics.refuse("bad_authority");
        req.reject(StatusCode::BAD_REQUEST);
        return;
    };
    if px.is_loop(req.dst) {
        px.metrics.refuse("loop");
        req.reject(StatusCode::BAD_REQUEST);
        return;
    }
    let src_wl = state.workload_by_ip(&px.network, req.peer_addr.ip()).cloned();
    let info = ConnectionInfo {
        src_identity: Some(req.peer_identity.clone()),
        src_ip: req.peer_addr.ip(),
        dst: req.dst,
    };
    let labels = TcpLabels::new(
        Reporter::destination,
        src_wl.as_deref(),
        Some(&req.peer_identity),
        Some(&wl),
        None,
        true,
    );
    if let Decision::Deny(policy) = evaluate(state.policies_for(&wl), &info) {
        info!(src = %req.peer_identity, dst = %req.dst, ?policy, "connection denied by authorization policy");
        px.metrics.refuse("policy_denied");
        req.reject(StatusCode::UNAUTHORIZED);
        return;
    }
    // Connect from the original client address: the peer's, unless a waypoint of this
    // workload forwards another.
    let forwarded = req.forwarded_for();
    let trusted = forwarded.is_some_and(|f| {
        f.ip() != req.peer_addr.ip()
            && is_waypoint_for(&state, &px.network, &wl, &req.peer_identity, req.peer_addr.ip())
    });
    drop(state);
    let source = client_source(req.peer_addr, forwarded, trusted, |ip| px.is_own_address(ip));
    if let Some(ignored) = source.ignored {
        debug!(peer = %req.peer_addr, src = %req.peer_identity, ?forwarded, reason = ignored.reason(), "forwarded client address ignored");
        px.metrics
            .forwarded_ignored
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: ignored.reason(),
            })
            .inc();
    }
    let client = source.addr.ip();
    let dst = req.dst;
    let connect = tokio::time::timeout(
        px.settings.connect_timeout,
        connect_from(&*px.sockets, Some(client), dst),
    );
    // A client that resets the stream meanwhile gets no connection to the application.
    let Some(upstream) = req.unless_reset(connect).await else {
        debug!(%dst, "stream reset by the client before the application answered");
        px.metrics.refuse("reset_before_connect");
        return;
    };
    let mut upstream = match upstream {
        Ok(Ok((s, _transparent))) => s,
        Ok(Err(e)) => {
            info!(dst = %req.dst, error = %e, "application unreachable");
            px.metrics.refuse("upstream_unreachable");
            req.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
        Err(_) => {
            px.metrics.refuse("upstream_timeout");
            req.reject(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let peer = source.addr;
    let registration = px.tracker.register(info, wl.uid.clone());
    let h2 = match req.accept() {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "client went away before the tunnel was accepted");
            return;
        }
    };
    let record = ConnRecord::open(&px.metrics, labels, "inbound", peer, dst, None);
    let result = tokio::select! {
        r = h2.splice_tcp(&mut upstream) => r.map_err(|e| e.to_string()),
        _ = registration.cancel.cancelled() => Err("closed: denied by updated authorization policy".to_owned()),
    };
    // Bytes flowing from the tunnel go to the destination app ("sent" by the client).
    record.finish(result.map(|t| (t.from_tunnel, t.to_tunnel)));
}
