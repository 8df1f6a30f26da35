//! What the waypoint tells about the traffic it handles: Istio's request metrics and access
//! log ([`metrics`]), and distributed tracing ([`trace`]: W3C and B3 propagation, spans
//! exported to Zipkin and OTLP/HTTP collectors).

pub mod apply;
pub mod effective;
pub mod metrics;
pub mod trace;
