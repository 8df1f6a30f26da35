//! HTTP endpoints, one role per listener: admin (`/config_dump`, `/logging`) on localhost,
//! Prometheus metrics (`/metrics`, `/stats/prometheus`) and readiness (`/healthz/ready`) on
//! addresses the scraper and the kubelet reach. A listener answers only its own paths (404
//! otherwise), so the ones bound to the pod or node address never reveal state or change it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use mesh_core::identity::{CertManager, CertState};
use mesh_core::state::StateStore;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The longest log filter `POST /logging` accepts: filters are short (`info,access=debug`),
/// and the filter is parsed and applied to every log event.
pub const MAX_LOG_FILTER_LEN: usize = 256;

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `/config_dump`, `/logging`: loopback only.
    Admin,
    /// `/metrics`, `/stats/prometheus`.
    Stats,
    /// `/healthz/ready`.
    Readiness,
}

impl Role {
    /// Its flag's name (`--<name>-addr`).
    pub fn flag(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Stats => "stats",
            Role::Readiness => "readiness",
        }
    }
}

/// Changes the log filter at runtime.
pub type LogReload = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub struct Admin {
    pub state: Arc<StateStore>,
    pub certs: Arc<CertManager>,
    pub registry: Registry,
    pub ready: watch::Receiver<bool>,
    pub log_filter: std::sync::Mutex<String>,
    pub reload: LogReload,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Admin {
    fn config_dump(&self) -> serde_json::Value {
        let state = self.state.load();
        let mut workloads: Vec<_> = state
            .workloads()
            .map(|w| serde_json::to_value(&**w).unwrap_or_default())
            .collect();
        workloads.sort_by_key(|v| v["uid"].as_str().unwrap_or_default().to_owned());
        let mut services: Vec<_> = state
            .services()
            .map(|s| serde_json::to_value(&**s).unwrap_or_default())
            .collect();
        services.sort_by_key(|v| {
            format!(
                "{}/{}",
                v["namespace"].as_str().unwrap_or(""),
                v["hostname"].as_str().unwrap_or("")
            )
        });
        let mut policies: Vec<_> = state
            .policies()
            .map(|p| serde_json::to_value(&**p).unwrap_or_default())
            .collect();
        policies.sort_by_key(|v| {
            format!(
                "{}/{}",
                v["namespace"].as_str().unwrap_or(""),
                v["name"].as_str().unwrap_or("")
            )
        });
        let certificates: Vec<_> = self
            .certs
            .snapshot()
            .into_iter()
            .map(|(id, st)| match st {
                CertState::Ready(c) => serde_json::json!({
                    "identity": id.to_string(), "state": "ready",
                    "notBefore": secs(c.not_before), "notAfter": secs(c.not_after),
                    "chain": c.leaf_pem(),
                }),
                CertState::Pending => serde_json::json!({"identity": id.to_string(), "state": "pending"}),
                CertState::Failed(e) => {
                    serde_json::json!({"identity": id.to_string(), "state": "failed", "error": &*e})
                }
            })
            .collect();
        serde_json::json!({
            "workloads": workloads, "services": services, "policies": policies, "certificates": certificates,
        })
    }

    /// OpenMetrics when the scraper asks for it (Prometheus does), else the classic
    /// Prometheus text format that older tools and `promtool check metrics` read.
    fn metrics(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        mesh_core::prometheus::response(&self.registry, req.headers())
    }

    fn logging(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let level = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
        let mut current = self.log_filter.lock().unwrap_or_else(|p| p.into_inner());
        match (req.method(), level) {
            (&Method::POST, Some(level)) if level.len() > MAX_LOG_FILTER_LEN * 3 => text(
                StatusCode::BAD_REQUEST,
                format!("log filter longer than {MAX_LOG_FILTER_LEN} characters\n"),
            ),
            (&Method::POST, Some(level)) => {
                let level = level.replace("%2C", ",").replace("%3D", "=");
                if level.len() > MAX_LOG_FILTER_LEN {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("log filter longer than {MAX_LOG_FILTER_LEN} characters\n"),
                    );
                }
                match (self.reload)(&level) {
                    Ok(()) => {
                        *current = level;
                        text(StatusCode::OK, format!("current log level is {current}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid level {level:?}: {e}\n")),
                }
            }
            (&Method::POST, None) => text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=<filter>\n"),
            (&Method::GET | &Method::HEAD, _) => text(StatusCode::OK, format!("current log level is {current}\n")),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST /logging?level=<filter>\n"),
        }
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        if *self.ready.borrow() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }
    }

    /// Answers `req` on a listener of `role`: its own paths only.
    fn route(&self, role: Role, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (role, req.uri().path()) {
            (Role::Admin, "/config_dump") => text(
                StatusCode::OK,
                serde_json::to_vec_pretty(&self.config_dump()).unwrap_or_default(),
            ),
            (Role::Admin, "/logging") => self.logging(&req),
            (Role::Stats, "/metrics" | "/stats/prometheus") => self.metrics(&req),
            (Role::Readiness, "/healthz/ready") => self.readiness(),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// Serves the paths of `role` on `listener` until `stop` is cancelled.
pub async fn serve(admin: Arc<Admin>, role: Role, listener: TcpListener, stop: CancellationToken) {
    mesh_core::admin_http::serve(listener, stop, move |req| {
        let admin = admin.clone();
        async move { admin.route(role, req) }
    })
    .await
}

/// Binds the listener of `role` with a message naming the flag to change on failure.
pub async fn bind(addr: SocketAddr, role: Role) -> anyhow::Result<TcpListener> {
    let what = role.flag();
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {what} on {addr}: {e} (change it with --{what}-addr)"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_get_total_in_metadata() {
        let om = "# HELP a_b A thing.\n# TYPE a_b counter\na_b_total{x=\"1\"} 3\n# TYPE g gauge\ng 1\n# EOF\n";
        let p = mesh_core::prometheus::openmetrics_to_prometheus(om);
        assert_eq!(
            p,
            "# HELP a_b_total A thing.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n# TYPE g gauge\ng 1\n"
        );
    }
}
