//! What the waypoint tells about the traffic it handles: Istio's request metrics and access
//! log ([`metrics`]), and distributed tracing ([`trace`]: W3C and B3 propagation, spans
//! exported to Zipkin and OTLP/HTTP collectors), access-log records to OTLP/HTTP collectors
//! ([`access_log`]), both through one batching transport ([`export`]).

pub mod access_log;
pub mod apply;
pub mod effective;
pub mod export;
pub mod metrics;
pub mod trace;
