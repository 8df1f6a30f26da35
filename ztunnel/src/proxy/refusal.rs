//! Typed connection outcomes: why ztunnel refused a connection before any byte moved
//! ([`Refusal`], counted as `ztunnel_connections_refused_total{reason}`), and why a proxied
//! connection ended in error ([`ConnError`], the access log's `error`). A name-only endpoint
//! resolving to unroutable addresses only is both: counted as `unroutable_endpoint` and
//! logged as [`ConnError::Unroutable`].
//!
//! One enum instead of string literals at each call site, so a label cannot be misspelt, the
//! list of reasons is in one place for dashboards, and each refusal knows what an HBONE client
//! is answered. The label values are part of the metrics contract: do not rename them.

use std::net::SocketAddr;

use http::StatusCode;
use mesh_core::hbone::{HboneError, Limit};

use super::Listener;

/// Why a connection (or HBONE stream, ZDS request, DNS query) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `accept` failed (descriptor exhaustion, ...).
    AcceptError,
    /// A pod's DNS proxy had too many queries in flight.
    DnsOverload,
    /// A connection with no `SO_ORIGINAL_DST`: not redirected by the capture rules.
    NoOriginalDst,
    /// The destination is one of ztunnel's own listeners.
    Loop,
    /// Outbound from an address with no local workload: no identity to present.
    UnknownSource,
    /// Inbound to an address with no local workload.
    UnknownDestination,
    /// In-pod: the workload at the address is not the pod the node agent handed this
    /// namespace over for (an address added inside the pod, or a reused pod IP xDS still
    /// gives its former owner).
    NotThisPod,
    /// The local workload has no certificate.
    NoCertificate,
    /// No TLS server configuration could be built from the certificate.
    TlsConfig,
    /// An HBONE connection ended with an error (not a limit).
    HboneConnectionError,
    /// The CONNECT authority does not name this listener's workload.
    BadAuthority,
    /// An authorization policy denies the connection.
    PolicyDenied,
    /// The client reset the stream while the application was being dialled.
    ResetBeforeConnect,
    /// The application refused or could not be reached.
    UpstreamUnreachable,
    /// Dialling the application timed out.
    UpstreamTimeout,
    /// The node agent's ZDS request could not be honoured.
    ZdsRequestRejected,
    /// Outbound: the service does not expose the port.
    NoServicePort,
    /// Outbound: the service has no healthy endpoint.
    NoHealthyEndpoint,
    /// Outbound: the waypoint the destination needs cannot be reached.
    WaypointUnavailable,
    /// Outbound: the chosen workload has no address of the destination's family.
    NoAddress,
    /// Outbound under REGISTRY_ONLY: the destination is neither a mesh workload, a service
    /// nor a ServiceEntry address.
    NotRegistered,
    /// Outbound: the endpoint is on another network and its east-west gateway is unknown or
    /// has no healthy endpoint (double HBONE).
    NetworkGatewayUnavailable,
    /// Outbound: the service's load balancing is STRICT and no healthy endpoint shares the
    /// client's locality scopes (e.g. `internalTrafficPolicy: Local` and none on this node).
    NoLocalEndpoint,
    /// Outbound: an endpoint known by name only resolved to no address but unroutable ones
    /// (loopback, unspecified, link-local, multicast: [`mesh_core::unroutable`]), which would
    /// have ztunnel dial its own host or the metadata server.
    UnroutableEndpoint,
    /// An HBONE bound a peer hit (mesh-core's limits; labelled with the limit's name).
    Limit(Limit),
    /// The outbound or plaintext listener holds its maximum of connections from this source
    /// address (`per_source`) or in all ([`super::ListenerLimits`]).
    Connections { listener: Listener, per_source: bool },
}

impl Refusal {
    /// The metric label (`reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::AcceptError => "accept_error",
            Refusal::DnsOverload => "dns_overload",
            Refusal::NoOriginalDst => "no_original_dst",
            Refusal::Loop => "loop",
            Refusal::UnknownSource => "unknown_source",
            Refusal::UnknownDestination => "unknown_destination",
            Refusal::NotThisPod => "not_this_pod",
            Refusal::NoCertificate => "no_certificate",
            Refusal::TlsConfig => "tls_config",
            Refusal::HboneConnectionError => "hbone_connection_error",
            Refusal::BadAuthority => "bad_authority",
            Refusal::PolicyDenied => "policy_denied",
            Refusal::ResetBeforeConnect => "reset_before_connect",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::ZdsRequestRejected => "zds_request_rejected",
            Refusal::NoServicePort => "no_service_port",
            Refusal::NoHealthyEndpoint => "no_healthy_endpoint",
            Refusal::WaypointUnavailable => "waypoint_unavailable",
            Refusal::NoAddress => "no_address",
            Refusal::NotRegistered => "not_registered",
            Refusal::NetworkGatewayUnavailable => "network_gateway_unavailable",
            Refusal::NoLocalEndpoint => "no_local_endpoint",
            Refusal::UnroutableEndpoint => "unroutable_endpoint",
            Refusal::Limit(l) => l.as_str(),
            Refusal::Connections { listener, per_source } => match (listener, per_source) {
                (Listener::Outbound, true) => "outbound_per_source_limit",
                (Listener::Outbound, false) => "outbound_connections_limit",
                (Listener::Plaintext, true) => "plaintext_per_source_limit",
                (Listener::Plaintext, false) => "plaintext_connections_limit",
            },
        }
    }

    /// What an HBONE client whose CONNECT is refused for this reason is answered.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::PolicyDenied => StatusCode::UNAUTHORIZED,
            Refusal::UpstreamUnreachable | Refusal::UpstreamTimeout => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::AcceptError => "accept failed",
            Refusal::DnsOverload => "too many DNS queries in flight",
            Refusal::NoOriginalDst => "no original destination; connection was not redirected",
            Refusal::Loop => "refusing connection to ztunnel's own port",
            Refusal::UnknownSource => "outbound connection from an unknown workload refused",
            Refusal::UnknownDestination => "connection to an address with no local workload",
            Refusal::NotThisPod => "the workload at this address is not the pod this namespace was handed over for",
            Refusal::NoCertificate => "no certificate for the local workload",
            Refusal::TlsConfig => "cannot build TLS server configuration",
            Refusal::HboneConnectionError => "HBONE connection ended with error",
            Refusal::BadAuthority => "CONNECT authority does not belong to this workload",
            Refusal::PolicyDenied => "connection denied by authorization policy",
            Refusal::ResetBeforeConnect => "stream reset by the client before the application answered",
            Refusal::UpstreamUnreachable => "application unreachable",
            Refusal::UpstreamTimeout => "application connect timed out",
            Refusal::ZdsRequestRejected => "rejected ZDS request",
            Refusal::NoServicePort => "service does not expose the port",
            Refusal::NoHealthyEndpoint => "service has no healthy endpoint",
            Refusal::WaypointUnavailable => "waypoint unavailable",
            Refusal::NoAddress => "workload has no address of the right family",
            Refusal::NotRegistered => "destination not in the mesh registry (outbound policy REGISTRY_ONLY)",
            Refusal::NetworkGatewayUnavailable => "network gateway of a workload on another network unavailable",
            Refusal::NoLocalEndpoint => "no endpoint in the service's strict locality scope",
            Refusal::UnroutableEndpoint => "endpoint name resolved to unroutable addresses only",
            Refusal::Limit(l) => l.as_str(),
            Refusal::Connections { per_source: true, .. } => "too many connections from this source address",
            Refusal::Connections { per_source: false, .. } => "too many connections on this listener",
        })
    }
}

/// Why a proxied connection ended in error; its text is the access log's `error` field.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// A destination known by name only (a DNS ServiceEntry endpoint) did not resolve.
    #[error("resolving {0}: {1}")]
    Resolve(String, std::io::Error),
    /// A destination known by name only resolved to this unroutable address (the first of
    /// them; no routable one): refused before connecting ([`Refusal::UnroutableEndpoint`]).
    #[error("{host} resolved to {addr}, {class}; refused")]
    Unroutable {
        host: String,
        addr: std::net::IpAddr,
        class: mesh_core::unroutable::Unroutable,
    },
    /// Moving bytes (or making a socket) failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The HBONE tunnel could not be opened.
    #[error("{0}")]
    Hbone(#[from] HboneError),
    /// The tracker closed it: an updated policy denies it.
    #[error("closed: denied by updated authorization policy")]
    PolicyRevoked,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dashboards and the end-to-end tests select on these values.
    #[test]
    fn labels_are_the_published_ones() {
        let table = [
            (Refusal::Loop, "loop", StatusCode::BAD_REQUEST),
            (Refusal::BadAuthority, "bad_authority", StatusCode::BAD_REQUEST),
            (Refusal::PolicyDenied, "policy_denied", StatusCode::UNAUTHORIZED),
            (
                Refusal::UpstreamUnreachable,
                "upstream_unreachable",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Refusal::UpstreamTimeout,
                "upstream_timeout",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Refusal::WaypointUnavailable,
                "waypoint_unavailable",
                StatusCode::BAD_REQUEST,
            ),
            (Refusal::NoLocalEndpoint, "no_local_endpoint", StatusCode::BAD_REQUEST),
            (
                Refusal::UnroutableEndpoint,
                "unroutable_endpoint",
                StatusCode::BAD_REQUEST,
            ),
            (
                Refusal::Connections {
                    listener: Listener::Plaintext,
                    per_source: true,
                },
                "plaintext_per_source_limit",
                StatusCode::BAD_REQUEST,
            ),
            (
                Refusal::Connections {
                    listener: Listener::Outbound,
                    per_source: false,
                },
                "outbound_connections_limit",
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (r, label, status) in table {
            assert_eq!((r.as_str(), r.status()), (label, status), "{r:?}");
        }
        assert_eq!(
            Refusal::Limit(Limit::StreamsPerPeer).as_str(),
            Limit::StreamsPerPeer.as_str()
        );
        assert_eq!(
            ConnError::PolicyRevoked.to_string(),
            "closed: denied by updated authorization policy"
        );
    }
}
