//! Answers from the mesh state: a service hostname (`<svc>.<ns>.svc.<domain>`) resolves to its
//! VIPs; short forms (`<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`) are expanded with the asking
//! pod's namespace, as its search domains would. Other names are looked up as ServiceEntry
//! hosts: exactly, then by the closest wildcard (`*.example.com`); of several entries with the
//! host, the asking pod's namespace wins, then the first by namespace. An entry answers with
//! its VIPs (declared or auto-allocated), else with its endpoints' addresses; an entry with
//! neither, and anything else, is not ours to answer.

use std::net::IpAddr;

use std::sync::Arc;

use mesh_core::state::{Service, State};

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
    match entry(state, &name, namespace) {
        Some(svc) => answer(state, &svc),
        None => Lookup::Unknown,
    }
}

/// The ServiceEntry service for `name`: exact host first, then wildcards from the closest.
fn entry(state: &State, name: &str, namespace: Option<&str>) -> Option<Arc<Service>> {
    let pick = |host: &str| {
        let mut found: Vec<&Arc<Service>> = state.services_by_hostname(host).collect();
        found.sort_by_key(|s| (Some(s.namespace.as_str()) != namespace, s.namespace.clone()));
        found.first().copied().cloned()
    };
    if let Some(svc) = pick(name) {
        return Some(svc);
    }
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        if let Some(svc) = pick(&format!("*.{parent}")) {
            return Some(svc);
        }
        rest = parent;
    }
    None
}

fn answer(state: &State, svc: &Service) -> Lookup {
    let mut ips: Vec<IpAddr> = svc.vips.iter().map(|(_, ip)| *ip).collect();
    if ips.is_empty() {
        ips = state
            .endpoints(svc)
            .iter()
            .flat_map(|w| w.addresses.iter().copied())
            .collect();
    }
    if ips.is_empty() {
        Lookup::Unknown
    } else {
        Lookup::Found(ips)
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::workload as pb;

    use super::*;

    fn entry_address(ns: &str, host: &str, vip: Option<[u8; 4]>) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Service(pb::Service {
                name: "ext".into(),
                namespace: ns.into(),
                hostname: host.into(),
                addresses: vip
                    .map(|v| pb::NetworkAddress {
                        network: String::new(),
                        address: v.to_vec(),
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn service_entry_hosts_answer_with_their_vips() {
        let d = "cluster.local";
        let mut s = State::default();
        s.apply_address(&entry_address("egress", "api.external.test", Some([240, 240, 1, 2])))
            .expect("valid");
        s.apply_address(&entry_address("shop", "api.external.test", Some([240, 240, 9, 9])))
            .expect("valid");
        s.apply_address(&entry_address("egress", "*.wild.test", Some([198, 51, 100, 7])))
            .expect("valid");
        s.apply_address(&entry_address("egress", "novip.test", None))
            .expect("valid");
        let ip = |a: [u8; 4]| Lookup::Found(vec![IpAddr::from(a)]);
        assert_eq!(lookup(&s, "api.external.test.", Some("other"), d), ip([240, 240, 1, 2]));
        assert_eq!(
            lookup(&s, "API.External.test", Some("shop"), d),
            ip([240, 240, 9, 9]),
            "the pod's own namespace wins"
        );
        assert_eq!(lookup(&s, "a.b.wild.test", None, d), ip([198, 51, 100, 7]));
        assert_eq!(
            lookup(&s, "wild.test", None, d),
            Lookup::Unknown,
            "*.x does not match x"
        );
        assert_eq!(
            lookup(&s, "novip.test", None, d),
            Lookup::Unknown,
            "no address: forwarded"
        );
        assert_eq!(lookup(&s, "example.org", None, d), Lookup::Unknown);
    }

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
