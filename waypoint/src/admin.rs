//! The metrics port: `/metrics` (Prometheus text), `/healthz/ready` (certificate and
//! configuration loaded), `/config_dump` (routes and policies in force, as JSON).

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

fn route(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => mesh_core::prometheus::response(&admin.registry, req.headers()),
        "/healthz/ready" => {
            let cert = admin.waypoint.certs.get_ready(&admin.waypoint.identity).is_some();
            if *admin.ready.borrow() && cert {
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
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz/ready or /config_dump\n".into(),
        ),
    }
}

pub async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    mesh_core::admin_http::serve_forever(listener, move |req| {
        let admin = admin.clone();
        async move { route(&admin, &req) }
    })
    .await
}
