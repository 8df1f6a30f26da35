//! The waypoint's own HTTP endpoints, each listener serving only its own paths (as
//! ztunnel's): the admin port (localhost by default) has the state view `/config_dump`
//! (routes and policies in force, as JSON) besides everything else; the stats port (pod
//! address) `/metrics` (Prometheus text) and `/healthz/ready`, which generated Deployments
//! probe there; the readiness port (pod address) `/healthz/ready` (certificate and
//! configuration loaded). A pod that can reach the waypoint cannot read its configuration.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Waypoint;

pub struct Admin {
    pub waypoint: Arc<Waypoint>,
    pub registry: Registry,
    pub ready: watch::Receiver<bool>,
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// Which listener a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Everything, state views included: bind it to localhost.
    Admin,
    /// `/metrics` and `/healthz/ready`.
    Stats,
    /// `/healthz/ready`.
    Readiness,
}

impl Port {
    fn serves(self, path: &str) -> bool {
        match self {
            Port::Admin => true,
            Port::Stats => matches!(path, "/metrics" | "/healthz/ready"),
            Port::Readiness => path == "/healthz/ready",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Port::Admin => "try /metrics, /healthz/ready or /config_dump\n",
            Port::Stats => "try /metrics or /healthz/ready\n",
            Port::Readiness => "try /healthz/ready\n",
        }
    }
}

fn route(admin: &Admin, port: Port, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !port.serves(path) {
        return text(StatusCode::NOT_FOUND, "text/plain", port.help().into());
    }
    match path {
        "/metrics" => mesh_core::prometheus::response(&admin.registry, req.headers()),
        "/healthz/ready" => {
            let cert = admin.waypoint.certs.get_ready(&admin.waypoint.identity).is_some();
            if admin.waypoint.drain.is_cancelled() {
                // Leaving: the probe fails so the endpoint is withdrawn while we still serve.
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n".into())
            } else if *admin.ready.borrow() && cert {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                let why = format!(
                    "not ready: configuration synced={}, certificate={cert}\n",
                    *admin.ready.borrow()
                );
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why)
            }
        }
        "/config_dump" => {
            let snap = admin.waypoint.config.load();
            let routes: serde_json::Map<String, serde_json::Value> = snap
                .routes
                .iter()
                .map(|(k, r)| (k.clone(), serde_json::Value::String(format!("{:?}", r.config))))
                .collect();
            let policies: Vec<String> = snap.policies.keys().cloned().collect();
            let body = serde_json::json!({ "routes": routes, "policies": policies });
            text(StatusCode::OK, "application/json", body.to_string())
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", port.help().into()),
    }
}

/// Serves the paths of `port` on `listener`.
pub async fn serve(admin: Arc<Admin>, port: Port, listener: TcpListener) {
    mesh_core::admin_http::serve_forever(listener, move |req| {
        let admin = admin.clone();
        async move { route(&admin, port, &req) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::Port;

    #[test]
    fn state_views_only_on_the_admin_port() {
        for port in [Port::Stats, Port::Readiness] {
            for path in ["/config_dump", "/logging", "/debug", "/"] {
                assert!(!port.serves(path), "{port:?} serves {path}");
            }
        }
        assert!(Port::Admin.serves("/config_dump"));
        assert!(Port::Stats.serves("/metrics") && Port::Stats.serves("/healthz/ready"));
        assert!(Port::Readiness.serves("/healthz/ready") && !Port::Readiness.serves("/metrics"));
    }
}
