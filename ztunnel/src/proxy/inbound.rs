//! Inbound HBONE (15008): terminate mutual TLS with the local workload's certificate, check
//! that each CONNECT targets that workload, authorize it, connect to the application from the
//! client's own address where the kernel allows (the peer's, or the `forwarded` one when a
//! waypoint of the destination sends it: see [`super::source`]), answer 200 and splice.
//!
//! A connection is admitted against the handshake bounds at accept, before its certificate is
//! fetched: while one is pending, the sockets waiting for it are counted like any other.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::hbone::{serve_admitted, HboneError, InboundConnect, PendingGuard};
use mesh_core::log_limit::LogLimiter;
use mesh_core::rbac::ConnectionInfo;
use mesh_core::state::{Service, State, Workload};
use mesh_core::tls;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::deliver::{deliver, Client, Inbound};
use super::refusal::Refusal;
use super::source::is_waypoint_for;
use super::Proxy;
use crate::metrics::{Reporter, TcpLabels};

/// Failed connections are logged at most once a second, with the number suppressed: any
/// client can make a connection fail.
static CONNECTION_ERRORS: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(std::time::Duration::from_secs(1)));

pub async fn serve(px: Arc<Proxy>, listener: TcpListener) {
    let limits = px.settings.limits.clone();
    super::accept_loop(px, listener, "HBONE", limits, connection).await
}

/// `pending` is the connection's handshake slot, taken at accept: held while the certificate
/// is fetched, then through TLS and the HTTP/2 preface.
async fn connection(px: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr, pending: PendingGuard) {
    let Ok(local) = tcp.local_addr() else { return };
    let wl = match px.local_workload(local, Refusal::UnknownDestination) {
        Ok(wl) => wl,
        Err(refusal) => {
            warn!(%peer, %local, %refusal, "HBONE connection refused");
            px.metrics.refuse(refusal);
            return;
        }
    };
    let cert = match px.certs.fetch(&wl.identity).await {
        Ok(c) => c,
        Err(e) => {
            // No certificate: refuse rather than serve without identity.
            warn!(identity = %wl.identity, error = %e, "no certificate for inbound HBONE");
            px.metrics.refuse(Refusal::NoCertificate);
            return;
        }
    };
    let config = match tls::cached_server_config(&cert) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot build TLS server configuration");
            px.metrics.refuse(Refusal::TlsConfig);
            return;
        }
    };
    let px2 = px.clone();
    let result = serve_admitted(tcp, pending, config, &px.settings, px.drain.clone(), move |req| {
        let px = px2.clone();
        // Boxed, and no async block around it: an async fn keeps its arguments for as long as it
        // runs, and each idle stream's task is as large as what its longest wait holds.
        stream(px, Box::new(req))
    })
    .await;
    match result {
        Ok(()) => {}
        // Already counted by the limit's observer; a flood must not become a log flood.
        Err(HboneError::Limited(_)) => {}
        Err(e) => {
            px.metrics.refuse(Refusal::HboneConnectionError);
            if let Some(suppressed) = CONNECTION_ERRORS.check("hbone") {
                info!(%peer, error = %e, suppressed, "HBONE connection ended with error");
            }
        }
    }
}

pub(super) async fn stream(px: Arc<Proxy>, req: Box<InboundConnect>) {
    // Checked in a plain function: its locals are gone before the connection's long wait.
    let Some((state, req, conn)) = check(&px, req) else {
        return;
    };
    deliver(&px, state, Client::Hbone(req), conn).await;
}

/// The stream's destination workload and what is known of the connection, or `None` once the
/// stream was refused (answered and counted).
fn check(px: &Proxy, mut req: Box<InboundConnect>) -> Option<(Arc<State>, Box<InboundConnect>, Box<Inbound>)> {
    let state = px.state.load();
    // Double HBONE names the service by hostname: resolve it to this workload's target port.
    if let Some(host) = req.hostname.take() {
        match super::double_hbone::hostname_target(&state, &px.network, req.local_addr, &host, req.dst.port()) {
            Some(dst) => req.dst = dst,
            None => {
                debug!(%host, local = %req.local_addr, "{}", Refusal::BadAuthority);
                px.metrics.refuse(Refusal::BadAuthority);
                req.reject(Refusal::BadAuthority.status());
                return None;
            }
        }
    }
    // The authority must name this listener's workload (by one of its addresses).
    let owner = state.workload_by_ip(&px.network, req.local_addr.ip()).cloned();
    let Some(wl) = owner.filter(|w| w.addresses.contains(&req.dst.ip()) && px.local.contains(req.dst.ip())) else {
        debug!(dst = %req.dst, local = %req.local_addr, "{}", Refusal::BadAuthority);
        px.metrics.refuse(Refusal::BadAuthority);
        req.reject(Refusal::BadAuthority.status());
        return None;
    };
    if px.is_loop(req.dst) {
        px.metrics.refuse(Refusal::Loop);
        req.reject(Refusal::Loop.status());
        return None;
    }
    let src_wl = state.workload_by_ip(&px.network, req.peer_addr.ip()).cloned();
    let info = ConnectionInfo {
        src_identity: Some(req.peer_identity.clone()),
        src_ip: req.peer_addr.ip(),
        dst: req.dst,
    };
    let host = forwarded_host(&req.headers);
    let service = inbound_service(&state, &wl, req.dst.port(), host.as_deref());
    let labels = TcpLabels::new(
        Reporter::destination,
        src_wl.as_deref(),
        Some(&req.peer_identity),
        Some(&wl),
        service.as_deref(),
        true,
    );
    // The application sees the peer, unless a waypoint of this workload forwards another.
    let forwarded = req.forwarded_for();
    let forwarded_trusted = forwarded.is_some_and(|f| {
        f.ip() != req.peer_addr.ip()
            && is_waypoint_for(&state, &px.network, &wl, &req.peer_identity, req.peer_addr.ip())
    });
    let conn = Inbound {
        wl,
        info,
        labels,
        direction: "inbound",
        peer: req.peer_addr,
        forwarded,
        forwarded_trusted,
    };
    Some((state, req, Box::new(conn)))
}

/// The `host=` of a `forwarded` header (a waypoint names the service the client reached).
fn forwarded_host(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get("forwarded")?.to_str().ok()?;
    value.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.eq_ignore_ascii_case("host").then(|| v.trim_matches('"').to_owned())
    })
}

/// The service an inbound connection most likely came through, for metrics (Istio's rule):
/// the one the client named if it is one of the workload's own services (a client cannot
/// name an arbitrary one), else the first of them that serves the destination port.
pub fn inbound_service(state: &State, wl: &Workload, port: u16, named: Option<&str>) -> Option<Arc<Service>> {
    let services = || wl.services.iter().filter_map(|(key, _)| state.service(key));
    if let Some(found) = named.and_then(|h| services().find(|s| s.hostname == h)) {
        return Some(found.clone());
    }
    services()
        .find(|s| s.ports.iter().any(|p| wl.target_port(s, p.service_port) == Some(port)))
        .cloned()
}

#[cfg(test)]
mod tests {
    use mesh_core::identity::Identity;
    use mesh_core::state::PortMapping;

    use super::*;

    fn pm(service_port: u16, target_port: u16) -> PortMapping {
        PortMapping {
            service_port,
            target_port,
        }
    }

    fn service(name: &str, port: PortMapping) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            hostname: format!("{name}.default.svc.cluster.local"),
            vips: vec![(String::new(), "10.96.0.1".parse().unwrap())],
            ports: vec![port],
            subject_alt_names: vec![],
            waypoint: None,
            only_healthy: true,
        }
    }

    fn server(services: Vec<(String, Vec<PortMapping>)>) -> Workload {
        Workload {
            uid: "c//Pod/default/server".into(),
            name: "server".into(),
            namespace: "default".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
            network: String::new(),
            tunnel: mesh_core::state::Tunnel::Hbone,
            identity: Identity::new("", "default", "server").unwrap(),
            waypoint: None,
            node: "n".into(),
            canonical_name: "server".into(),
            canonical_revision: "v1".into(),
            workload_name: "server".into(),
            services,
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
        }
    }

    #[test]
    fn inbound_service_by_target_port_or_named_host() {
        let mut state = State::default();
        state.upsert_service(service("web", pm(80, 8080)));
        state.upsert_service(service("admin", pm(81, 9090)));
        // "named" maps its port 90 to 8080 on this workload only (a named target port).
        state.upsert_service(service("named", pm(90, 0)));
        let wl = server(vec![
            ("default/web.default.svc.cluster.local".into(), vec![]),
            ("default/admin.default.svc.cluster.local".into(), vec![]),
            ("default/named.default.svc.cluster.local".into(), vec![pm(90, 8080)]),
        ]);
        state.upsert_workload(wl.clone());
        let name = |port, named| inbound_service(&state, &wl, port, named).map(|s| s.name.clone());
        assert_eq!(name(8080, None).as_deref(), Some("web"));
        assert_eq!(name(9090, None).as_deref(), Some("admin"));
        assert_eq!(name(7000, None), None);
        // The client's named service wins when it is one of the workload's own.
        assert_eq!(
            name(8080, Some("named.default.svc.cluster.local")).as_deref(),
            Some("named")
        );
        // A service the workload is not part of is not believed.
        state.upsert_service(service("other", pm(80, 8080)));
        assert_eq!(
            inbound_service(&state, &wl, 8080, Some("other.default.svc.cluster.local"))
                .map(|s| s.name.clone())
                .as_deref(),
            Some("web")
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "forwarded",
            "for=10.0.0.1:5000;host=\"web.default.svc.cluster.local\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            forwarded_host(&headers).as_deref(),
            Some("web.default.svc.cluster.local")
        );
    }
}
