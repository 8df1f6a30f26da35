//! The controller's HTTP endpoints, one role per listener:
//!
//! - monitoring (`--admin`, 15014 on the pod address): `/metrics` (Prometheus text) and
//!   `/ready` (200 once every source kind was listed and translated);
//! - debug (`--debug-addr`, 127.0.0.1:15015): `/debug/problems` (what could not be honoured,
//!   per object), `/debug/config` (the translated resources as JSON), `/debug/skipped`
//!   (manifest documents the local source rejected) and `/debug/waypoints`. They reveal the
//!   whole configuration, so they are never served on an address other pods reach.
//!
//! Anything else is 404 on either listener.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::core::Published;
use crate::source::manifest_dir::DocumentError;
use crate::translate::render;

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Metrics and readiness.
    Monitoring,
    /// The `/debug/*` views: loopback only.
    Debug,
}

pub struct Admin {
    pub registry: Registry,
    pub published: watch::Receiver<Published>,
    pub skipped: watch::Receiver<Vec<DocumentError>>,
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn not_found() -> Response<Full<Bytes>> {
    reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
    }
}

impl Admin {
    fn handle(&self, role: Role, path: &str, headers: &HeaderMap) -> Response<Full<Bytes>> {
        match role {
            Role::Monitoring => self.monitoring(path, headers),
            Role::Debug => self.debug(path),
        }
    }

    fn monitoring(&self, path: &str, headers: &HeaderMap) -> Response<Full<Bytes>> {
        match path {
            "/metrics" | "/stats/prometheus" => mesh_core::prometheus::response(&self.registry, headers),
            "/ready" | "/healthz/ready" => {
                if self.published.borrow().synced {
                    reply(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "sources not synced yet\n",
                    )
                }
            }
            _ => not_found(),
        }
    }

    fn debug(&self, path: &str) -> Response<Full<Bytes>> {
        match path {
            "/debug/problems" => json(&self.published.borrow().problems),
            "/debug/skipped" => json(&*self.skipped.borrow()),
            "/debug/waypoints" => json(&self.published.borrow().waypoints),
            // This cluster and the remote ones: network, sync state, what each contributes.
            "/debug/clusters" => json(&self.published.borrow().outputs.clusters),
            // Ingress gateways' and their routes' statuses (never their certificates' keys).
            "/debug/ingress" => {
                let outputs = self.published.borrow().outputs.clone();
                let gateways: Vec<_> = outputs
                    .ingress
                    .status
                    .iter()
                    .map(|(k, s)| serde_json::json!({"gateway": k.to_string(), "status": s}))
                    .collect();
                json(&serde_json::json!({"gateways": gateways, "routes": outputs.ingress.route_parents}))
            }
            "/debug/config" => {
                let outputs = self.published.borrow().outputs.clone();
                json(&render::to_json(&outputs))
            }
            _ => not_found(),
        }
    }
}

/// Serves the paths of `role` on `listener` until the process ends.
pub async fn serve(admin: Arc<Admin>, role: Role, listener: TcpListener) {
    mesh_core::admin_http::serve_forever(listener, move |req| {
        let admin = admin.clone();
        async move { admin.handle(role, req.uri().path(), req.headers()) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_listener_serves_only_its_own_paths() {
        let admin = Admin {
            registry: Registry::default(),
            published: watch::channel(Published::default()).1,
            skipped: watch::channel(Vec::new()).1,
        };
        let status = |role, path| admin.handle(role, path, &HeaderMap::new()).status();
        let debug = [
            "/debug/config",
            "/debug/problems",
            "/debug/skipped",
            "/debug/waypoints",
            "/debug/ingress",
            "/debug/clusters",
        ];
        for path in debug {
            assert_eq!(status(Role::Debug, path), StatusCode::OK, "{path}");
            assert_eq!(status(Role::Monitoring, path), StatusCode::NOT_FOUND, "{path}");
        }
        assert_eq!(status(Role::Monitoring, "/metrics"), StatusCode::OK);
        // Not synced yet: answered, but not ready.
        assert_eq!(status(Role::Monitoring, "/ready"), StatusCode::SERVICE_UNAVAILABLE);
        for path in ["/metrics", "/ready", "/", "/debug", "/debug/", "/config_dump"] {
            assert_eq!(status(Role::Debug, path), StatusCode::NOT_FOUND, "{path}");
        }
        assert_eq!(status(Role::Monitoring, "/nope"), StatusCode::NOT_FOUND);
    }
}
