//! The controller's HTTP endpoint (15014): `/metrics` (Prometheus text), `/ready` (200 once
//! every source kind was listed and translated), `/debug/problems` (what could not be
//! honoured, per object), `/debug/config` (the translated resources as JSON) and
//! `/debug/skipped` (manifest documents the local source rejected).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::core::Published;
use crate::source::local::DocumentError;
use crate::translate::render;

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

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
    }
}

impl Admin {
    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/metrics" | "/stats/prometheus" => mesh_core::prometheus::response(&self.registry, req.headers()),
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
            "/debug/problems" => json(&self.published.borrow().problems),
            "/debug/skipped" => json(&*self.skipped.borrow()),
            "/debug/waypoints" => json(&self.published.borrow().waypoints),
            "/debug/config" => {
                let outputs = self.published.borrow().outputs.clone();
                json(&render::to_json(&outputs))
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// Serves until the process ends.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    mesh_core::admin_http::serve_forever(listener, move |req| {
        let admin = admin.clone();
        async move { admin.handle(&req) }
    })
    .await
}
