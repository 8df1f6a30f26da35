//! The capture contract: the ports, marks and routing table on which the node agent's
//! redirection rules, ztunnel's listeners and sockets, and the controller's manifests must
//! agree. Each fact is defined here once; the crates read it from here.

use std::net::Ipv4Addr;

/// Mark on every socket ztunnel creates in a captured namespace; the rules let such packets
/// past the capture.
pub const MESH_MARK: u32 = 0x539;
/// Connmark, then fwmark, of connections ztunnel opened to the application, so that the
/// application's replies are routed back to ztunnel's transparent socket.
pub const RETURN_MARK: u32 = 0x111;
/// The bits of the packet and connection marks the rules own; other bits are left to others.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table of the return path (a `local` default route looked up by [`RETURN_MARK`]).
pub const ROUTE_TABLE: u32 = 100;
/// Source the node's own traffic to a pod (kubelet probes) is SNATed to; not captured.
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// ztunnel's outbound listener: the application's outgoing TCP is redirected here.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's inbound plaintext listener: incoming TCP other than HBONE is redirected here.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (mutual TLS, HTTP/2 CONNECT): ztunnel's inbound listener and a waypoint's listener.
pub const HBONE_PORT: u16 = 15008;
/// ztunnel's DNS proxy: the application's DNS (UDP and TCP port 53) is redirected here.
pub const DNS_PORT: u16 = 15053;

/// The ports ztunnel listens on inside a captured pod, as the redirection rules see them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub inbound: u16,
    /// ztunnel's DNS proxy; DNS (UDP and TCP port 53) is redirected only when set.
    pub dns: Option<u16>,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: OUTBOUND_PORT,
            inbound_plaintext: INBOUND_PLAINTEXT_PORT,
            inbound: HBONE_PORT,
            dns: Some(DNS_PORT),
        }
    }
}
