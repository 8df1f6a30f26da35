//! The waypoint: an L7 proxy that ztunnels send a service's traffic to over HBONE. It routes
//! each HTTP request by the service's compiled routes, enforces L7 policy against the
//! original client's identity, and forwards to endpoints over HBONE or plain TCP.
//!
//! Follow a request: [`listener`] (HBONE, protocol detection) -> [`http::proxy`] (JWT,
//! authorization, [`http::route`], faults, retries) -> [`upstream`] (cluster limits, outlier
//! ejection, pooled connections). Configuration arrives in [`store`] over xDS.

pub mod admin;
pub mod app;
pub mod config;
pub mod eastwest;
pub mod http;
pub mod idle;
pub mod ingress;
pub mod listener;
pub mod locality;
pub mod policy;
pub mod store;
pub mod tcp;
pub mod telemetry;
pub mod upstream;

use std::sync::Arc;

use mesh_core::identity::{CertManager, Identity};
use mesh_core::state::StateStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a request handler shares.
pub struct Waypoint {
    /// The Gateway this waypoint implements: (namespace, name).
    pub gateway: (String, String),
    pub identity: Identity,
    pub network: String,
    pub state: Arc<StateStore>,
    pub config: Arc<store::ConfigStore>,
    pub certs: Arc<CertManager>,
    pub upstreams: upstream::Upstreams,
    pub jwks: Arc<policy::jwt::JwksCache>,
    pub metrics: telemetry::metrics::Metrics,
    pub tracer: Arc<telemetry::trace::Tracer>,
    /// Access-log exporters to OpenTelemetry collectors (Telemetry access-log providers).
    pub access_log: Arc<telemetry::access_log::Sinks>,
    /// How long a client of an HTTP-only port may stay silent before its stream is closed.
    pub header_read_timeout: std::time::Duration,
    /// How long a stream may move nothing either way (its request body or its answer's)
    /// before it fails.
    pub stream_idle_timeout: std::time::Duration,
    /// How request paths are normalised (`--path-normalization`).
    pub path_normalization: http::path::Normalization,
    /// Cancelled on SIGTERM: readiness fails, HTTP/1.1 answers say `Connection: close`.
    pub drain: CancellationToken,
    /// Cancelled `--drain-accept-ms` later: no new connections, GOAWAY, idle clients closed.
    pub closing: CancellationToken,
    pub tasks: TaskTracker,
    /// Token buckets of the LocalRateLimitPolicies; they outlive configuration snapshots.
    pub rate_limits: policy::rate_limit::Limiter,
    /// The ingress role's listeners and certificates (`--role ingress`); `None` for a waypoint.
    pub ingress: Option<Arc<ingress::Ingress>>,
}

/// The size of what `f` returns (an `async fn`'s future, via a closure taking its arguments
/// as one tuple) without calling it: tests bound the futures every connection or request holds.
#[cfg(test)]
pub(crate) fn future_size<A, R>(_: impl FnOnce(A) -> R) -> usize {
    std::mem::size_of::<R>()
}
