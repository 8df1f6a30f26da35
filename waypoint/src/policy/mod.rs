//! L7 security: request authentication (JWT) and authorization of each request, and which
//! policies apply to a request (those targeting this waypoint's Gateway or the destination
//! Service).

pub mod authz;
pub mod jwt;
pub mod rate_limit;

use mesh_proto::waypoint as wp;

/// Whether `p` targets the HTTPRoute a request matched: route names are
/// `HTTPRoute/<ns>/<name>/rules[<i>]`.
pub fn applies_to_route(p: &wp::Policy, route: &str) -> bool {
    let Some(rest) = route.strip_prefix("HTTPRoute/") else {
        return false;
    };
    p.targets.iter().any(|t| {
        let ns = if t.namespace.is_empty() {
            p.namespace.as_str()
        } else {
            t.namespace.as_str()
        };
        t.kind == "HTTPRoute"
            && rest
                .strip_prefix(ns)
                .and_then(|r| r.strip_prefix('/'))
                .and_then(|r| r.strip_prefix(t.name.as_str()))
                .is_some_and(|r| r.starts_with('/'))
    })
}

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
