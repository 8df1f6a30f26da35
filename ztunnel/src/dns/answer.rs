//! Answers from the mesh state: a service hostname (`<svc>.<ns>.svc.<domain>`) resolves to its
//! VIPs; short forms (`<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`) are expanded with the asking
//! pod's namespace, as its search domains would. Anything else is not ours to answer.

use std::net::IpAddr;

use mesh_core::state::State;

/// What the mesh knows about a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A mesh service: its addresses (possibly none of the asked family).
    Found(Vec<IpAddr>),
    /// Not a mesh name: forward it.
    Unknown,
}

/// The candidate service hostnames for `name` (no trailing dot, lowercase) asked from a pod
/// in `namespace`, most specific first.
fn candidates(name: &str, namespace: Option<&str>, domain: &str) -> Vec<String> {
    let suffix = format!(".svc.{domain}");
    if name.ends_with(&suffix) {
        return vec![name.to_owned()];
    }
    let mut out = Vec::with_capacity(3);
    match name.split('.').count() {
        1 => {
            if let Some(ns) = namespace {
                out.push(format!("{name}.{ns}{suffix}"));
            }
        }
        2 => out.push(format!("{name}{suffix}")),
        3 if name.ends_with(".svc") => out.push(format!("{name}.{domain}")),
        _ => {}
    }
    out
}

/// Looks `name` up in `state`.
pub fn lookup(state: &State, name: &str, namespace: Option<&str>, domain: &str) -> Lookup {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    for host in candidates(&name, namespace, domain) {
        // `<svc>.<ns>.svc.<domain>`: the namespace is the second label.
        let Some(ns) = host.split('.').nth(1) else { continue };
        if let Some(svc) = state.service(&format!("{ns}/{host}")) {
            return Lookup::Found(svc.vips.iter().map(|(_, ip)| *ip).collect());
        }
    }
    Lookup::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_forms_expand_with_the_pod_namespace() {
        let d = "cluster.local";
        assert_eq!(
            candidates("web.shop.svc.cluster.local", Some("x"), d),
            ["web.shop.svc.cluster.local"]
        );
        assert_eq!(candidates("web", Some("shop"), d), ["web.shop.svc.cluster.local"]);
        assert!(candidates("web", None, d).is_empty());
        assert_eq!(candidates("web.shop", Some("x"), d), ["web.shop.svc.cluster.local"]);
        assert_eq!(candidates("web.shop.svc", Some("x"), d), ["web.shop.svc.cluster.local"]);
        assert!(candidates("example.com.org.net", Some("x"), d).is_empty());
    }
}
