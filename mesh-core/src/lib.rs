//! Shared library of the mesh: what ztunnel, the waypoint and the controller all need.
//!
//! - [`identity`]: SPIFFE ids, certificates, the development CA and the mesh CA client, and
//!   the certificate manager.
//! - [`tls`]: rustls configurations and verifiers for HBONE.
//! - [`grpc`]: gRPC channels to the control plane (`http`/`https`, TLS without SNI, keepalive).
//! - [`hbone`]: the HBONE server and the pooled HBONE client.
//! - [`state`]: the workload/service/policy model and its atomically swapped store.
//! - [`xds`]: sources that fill the store: the Delta ADS client and a local file.
//! - [`rbac`]: L4 authorization evaluation.
//! - [`route_match`]: waypoint route matches compiled, for the proxy and the controller's check.
//! - [`path_template`]: Istio's authorization path templates (`{*}`, `{**}`), for the same two.
//! - [`admin_http`] and [`prometheus`]: the admin/metrics endpoints' server and `/metrics` answer.
//! - [`control_plane_args`]: the control-plane flags ztunnel and the waypoint share.
//! - [`capture`]: the capture contract (ports, marks, routing table) every crate agrees on.
//! - [`unroutable`]: addresses no proxy may dial for a tenant (loopback, link-local, ...).
//! - [`log_limit`]: at most one repeated warning per interval, with a suppressed count.
//! - [`log_json`]: JSON log lines as tracing-subscriber writes them, without its detours.
//! - [`log_sink`]: log lines to stdout, access-log lines in batches off the request path.
//! - [`former_env`]: the old names of environment variables renamed to one spelling.
//! - [`shutdown`]: the SIGTERM/SIGINT future every binary drains on.

pub mod admin_http;
pub mod capture;
pub mod control_plane_args;
pub mod expr;
pub mod former_env;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod input_file;
pub mod log_json;
pub mod log_limit;
pub mod log_sink;
pub mod path_template;
pub mod prometheus;
pub mod rbac;
pub mod route_match;
pub mod runtime;
pub mod shutdown;
pub mod socket;
pub mod state;
pub mod tls;
pub mod unroutable;
pub mod xds;
pub mod zds;
