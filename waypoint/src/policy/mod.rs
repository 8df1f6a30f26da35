//! L7 security: request authentication (JWT) and authorization of each request, and which
//! policies apply to a request (those targeting this waypoint's Gateway or the destination
//! Service).

pub mod authz;
pub mod jwt;

use mesh_proto::waypoint as wp;

/// Whether `p` targets the waypoint `gateway` ("ns", "name") or the service `service`
/// ("ns", "name").
pub fn applies(p: &wp::Policy, gateway: (&str, &str), service: (&str, &str)) -> bool {
    p.targets.iter().any(|t| {
        let ns = if t.namespace.is_empty() {
            p.namespace.as_str()
        } else {
            t.namespace.as_str()
        };
        match t.kind.as_str() {
            "Gateway" => (ns, t.name.as_str()) == gateway,
            "Service" => (ns, t.name.as_str()) == service,
            _ => false,
        }
    })
}
