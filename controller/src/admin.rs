//! The controller's HTTP endpoints, one role per listener:
//!
//! - monitoring (`--admin`, 15014 on the pod address): `/metrics` (Prometheus text) and
//!   `/ready` (200 once every source kind was listed and translated);
//! - debug (`--debug-addr`, 127.0.0.1:15015): `/debug/problems` (what could not be honoured,
//!   per object), `/debug/config` (the translated resources as JSON), `/debug/skipped`
//!   (manifest documents the local source rejected) and `/debug/waypoints`. They reveal the
//!   whole configuration, so they are never served on an address other pods reach.
//!   `/debug/vm-token?group=<ns>/<name>[&ttl=<seconds>]` issues a VM bootstrap token for a
//!   WorkloadGroup (`meshctl vm token`) when the controller has a VM token key: only where
//!   the debug listener is reachable, i.e. on the controller's host.
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
    /// Issues VM tokens on the debug listener; `None` without `--vm-token-key`.
    pub vm_tokens: Option<crate::ca::VmTokenIssuer>,
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
    #[cfg(test)]
    fn handle(&self, role: Role, path: &str, headers: &HeaderMap) -> Response<Full<Bytes>> {
        self.handle_query(role, path, None, headers)
    }

    fn handle_query(&self, role: Role, path: &str, query: Option<&str>, headers: &HeaderMap) -> Response<Full<Bytes>> {
        match role {
            Role::Monitoring => self.monitoring(path, headers),
            Role::Debug if path == "/debug/vm-token" => self.vm_token(query.unwrap_or("")),
            Role::Debug => self.debug(path),
        }
    }

    /// Issues a VM token for `group=<ns>/<name>` (optionally `ttl=<seconds>`).
    fn vm_token(&self, query: &str) -> Response<Full<Bytes>> {
        let Some(issuer) = &self.vm_tokens else {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no VM token key (--vm-token-key)\n",
            );
        };
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .map(|v| v.replace("%2F", "/").replace("%2f", "/"))
        };
        let Some(group) = param("group") else {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "expected group=<namespace>/<name>\n",
            );
        };
        let ttl = param("ttl");
        match issuer.issue(&self.published.borrow().workload_groups, &group, ttl.as_deref()) {
            Ok(token) => reply(StatusCode::OK, "text/plain", token),
            Err(e @ crate::ca::IssueError::NoSuchGroup(_)) => {
                reply(StatusCode::NOT_FOUND, "text/plain", format!("{e}\n"))
            }
            Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
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
        async move { admin.handle_query(role, req.uri().path(), req.uri().query(), req.headers()) }
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
            vm_tokens: None,
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

    /// VM tokens are issued on the loopback debug listener only, for an existing group.
    #[test]
    fn vm_tokens_are_issued_on_the_debug_listener_only() {
        use crate::ca::vm_token::{VmTokenIssuer, VmTokenKey};
        let key = Arc::new(VmTokenKey::from_bytes(&[1; 32]));
        let published = Published {
            workload_groups: [(crate::model::ObjectKey::new("vm", "db"), "db-sa".to_owned())].into(),
            ..Published::default()
        };
        let admin = Admin {
            registry: Registry::default(),
            published: watch::channel(published).1,
            skipped: watch::channel(Vec::new()).1,
            vm_tokens: Some(VmTokenIssuer {
                key: key.clone(),
                ttl: std::time::Duration::from_secs(60),
                clock: Arc::new(|| 0),
            }),
        };
        let get = |role, query| admin.handle_query(role, "/debug/vm-token", Some(query), &HeaderMap::new());
        let ok = get(Role::Debug, "group=vm%2Fdb");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(get(Role::Monitoring, "group=vm/db").status(), StatusCode::NOT_FOUND);
        assert_eq!(get(Role::Debug, "group=vm/nope").status(), StatusCode::NOT_FOUND);
        assert_eq!(get(Role::Debug, "group=vm/db&ttl=0").status(), StatusCode::BAD_REQUEST);
        assert_eq!(get(Role::Debug, "").status(), StatusCode::BAD_REQUEST);
    }
}
