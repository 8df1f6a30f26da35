//! Answers from the mesh state. A Service name (`<svc>.<ns>.svc.<domain>`; short forms
//! `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc` expanded with the asking pod's namespace, as its
//! search domains would) resolves to the VIPs of the service keyed `<ns>/<name>`; a headless
//! one (no VIP) to its ready endpoints' addresses, as kube-dns does. Per-pod names
//! (`<pod>.<svc>.<ns>.svc.<domain>`) and headless services without endpoints are forwarded:
//! the cluster DNS knows them better than the mesh state.
//!
//! Other names are ServiceEntry hosts: exactly, then by the closest wildcard (`*.a.b`). Host
//! names are not owned by a namespace, so the choice resists hijacking:
//! - a name under `.svc.<domain>` whose namespace label is `L` is answered only by entries
//!   of `L`, or (exact host only) of the asking pod's namespace — never by another
//!   namespace's wildcard such as `*.svc.cluster.local`;
//! - of several entries with the matching host, the asking pod's namespace wins; otherwise
//!   a single candidate answers, and several are ambiguous: the name is forwarded upstream
//!   (no tie-break an attacker could win by choosing a namespace name, and no fall-back to
//!   wider wildcards an attacker could provoke by adding a conflicting exact entry).
//!
//! An entry answers with its VIPs, else its endpoints' addresses; one with neither, and any
//! other name, is not ours to answer ([`Lookup::Unknown`]).

use std::net::IpAddr;

use std::sync::Arc;

use mesh_core::state::{Service, State};

/// What the mesh knows about a name.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A mesh service: its addresses (possibly none of the asked family), never empty.
    Found(Vec<IpAddr>),
    /// Not a mesh name, or none the mesh can answer alone: forward it.
    Unknown,
}

/// The entries one host (exact or wildcard) offers for a name.
#[derive(Debug)]
enum Choice {
    One(Arc<Service>),
    /// Entries of several other namespaces, none the asker's: not ours to arbitrate.
    Ambiguous,
    None,
}

/// The candidate Service hostnames for `name` (no trailing dot, lowercase) asked from a pod
/// in `namespace`: `<svc>.<ns>.svc.<domain>` only.
fn candidates(name: &str, namespace: Option<&str>, domain: &str) -> Vec<String> {
    let suffix = format!(".svc.{domain}");
    if let Some(rest) = name.strip_suffix(&suffix) {
        return if rest.split('.').count() == 2 {
            vec![name.to_owned()]
        } else {
            Vec::new() // `<pod>.<svc>.<ns>` or a search-domain expansion: not a Service name
        };
    }
    let mut out = Vec::with_capacity(1);
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
            return answer(state, svc);
        }
    }
    match entry(state, &name, namespace, &format!(".svc.{domain}")) {
        Choice::One(svc) => answer(state, &svc),
        Choice::Ambiguous => {
            tracing::debug!(%name, "several namespaces' entries have this host: forwarded");
            Lookup::Unknown
        }
        Choice::None => Lookup::Unknown,
    }
}

/// The ServiceEntry service for `name`: exact host first, then wildcards from the closest.
/// The first host with any admissible entry decides, even when it is ambiguous.
fn entry(state: &State, name: &str, namespace: Option<&str>, svc_suffix: &str) -> Choice {
    // For a name under `.svc.<domain>`, the namespace it names (the label before the suffix).
    let name_ns = name.strip_suffix(svc_suffix).and_then(|rest| rest.rsplit('.').next());
    let admissible = |svc: &Service, wildcard: bool| match name_ns {
        None => true,
        Some(l) => svc.namespace == l || (!wildcard && Some(svc.namespace.as_str()) == namespace),
    };
    let pick = |host: &str, wildcard: bool| {
        let found: Vec<&Arc<Service>> = state
            .services_by_hostname(host)
            .filter(|s| admissible(s, wildcard))
            .collect();
        if let Some(own) = found.iter().find(|s| Some(s.namespace.as_str()) == namespace) {
            return Choice::One(Arc::clone(own));
        }
        match found.as_slice() {
            [] => Choice::None,
            [one] => Choice::One(Arc::clone(one)),
            _ => Choice::Ambiguous,
        }
    };
    match pick(name, false) {
        Choice::None => {}
        decided => return decided,
    }
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        match pick(&format!("*.{parent}"), true) {
            Choice::None => {}
            decided => return decided,
        }
        rest = parent;
    }
    Choice::None
}

/// A service's VIPs, else (headless, or an entry without VIPs) its endpoints' addresses.
fn answer(state: &State, svc: &Service) -> Lookup {
    let mut ips: Vec<IpAddr> = svc.vips.iter().map(|(_, ip)| *ip).collect();
    if ips.is_empty() {
        ips = state
            .endpoints(svc)
            .iter()
            .flat_map(|w| w.addresses.iter().copied())
            .collect();
        ips.sort_unstable();
        ips.dedup();
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

    fn service_address(ns: &str, name: &str, vip: Option<[u8; 4]>) -> pb::Address {
        let host = format!("{name}.{ns}.svc.cluster.local");
        let mut a = entry_address(ns, &host, vip);
        if let Some(pb::address::Type::Service(s)) = a.r#type.as_mut() {
            s.name = name.into();
        }
        a
    }

    fn pod(ns: &str, name: &str, ip: [u8; 4], service: &str, status: pb::WorkloadStatus) -> pb::Address {
        pb::Address {
            r#type: Some(pb::address::Type::Workload(pb::Workload {
                uid: format!("c//Pod/{ns}/{name}"),
                name: name.into(),
                namespace: ns.into(),
                addresses: vec![ip.to_vec()],
                services: [(service.to_owned(), pb::PortList::default())].into(),
                status: status as i32,
                ..Default::default()
            })),
        }
    }

    fn ip(a: [u8; 4]) -> Lookup {
        Lookup::Found(vec![IpAddr::from(a)])
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
        s.apply_address(&entry_address("egress", "only.test", Some([198, 51, 100, 8])))
            .expect("valid");
        s.apply_address(&entry_address("egress", "novip.test", None))
            .expect("valid");
        assert_eq!(lookup(&s, "only.test.", Some("other"), d), ip([198, 51, 100, 8]));
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

    /// A headless Service (no VIP) answers with its ready endpoints, as kube-dns does; with
    /// none, or for a per-pod name, the query goes to the cluster DNS.
    #[test]
    fn headless_services_answer_with_their_endpoints() {
        let d = "cluster.local";
        let mut s = State::default();
        s.apply_address(&service_address("data", "kafka", None)).expect("valid");
        s.apply_address(&service_address("data", "empty", None)).expect("valid");
        let key = "data/kafka.data.svc.cluster.local";
        for (name, ip, status) in [
            ("kafka-1", [10, 1, 0, 2], pb::WorkloadStatus::Healthy),
            ("kafka-0", [10, 1, 0, 1], pb::WorkloadStatus::Healthy),
            ("kafka-2", [10, 1, 0, 3], pb::WorkloadStatus::Unhealthy),
        ] {
            s.apply_address(&pod("data", name, ip, key, status)).expect("valid");
        }
        let ready = Lookup::Found(vec![[10, 1, 0, 1].into(), [10, 1, 0, 2].into()]);
        for (name, ns, want) in [
            ("kafka.data.svc.cluster.local", None, &ready),
            ("kafka", Some("data"), &ready),
            ("kafka.data", Some("web"), &ready),
            ("empty.data.svc.cluster.local", None, &Lookup::Unknown),
            ("kafka-0.kafka.data.svc.cluster.local", Some("data"), &Lookup::Unknown),
        ] {
            assert_eq!(&lookup(&s, name, ns, d), want, "{name}");
        }
    }

    /// Entries of another namespace cannot answer names of a Kubernetes namespace, nor win a
    /// tie by their namespace's name.
    #[test]
    fn entries_cannot_hijack_names_of_other_namespaces() {
        let d = "cluster.local";
        let mut s = State::default();
        s.apply_address(&service_address("prod", "web", Some([10, 96, 0, 1])))
            .expect("valid");
        for (ns, host, vip) in [
            ("evil", "*.svc.cluster.local", [6, 6, 6, 1]),
            ("evil", "*.cluster.local", [6, 6, 6, 2]),
            ("evil", "db.prod.svc.cluster.local", [6, 6, 6, 3]),
            ("evil", "web-0.kafka.prod.svc.cluster.local", [6, 6, 6, 4]),
            ("aaa", "pay.example.com", [6, 6, 6, 5]),
            ("payments", "pay.example.com", [10, 96, 0, 9]),
            ("prod", "*.prod.svc.cluster.local", [10, 96, 0, 7]),
            ("front", "db.prod.svc.cluster.local", [10, 96, 0, 8]),
        ] {
            s.apply_address(&entry_address(ns, host, Some(vip))).expect("valid");
        }
        for (name, ns, want) in [
            // The first search step of `web.prod` from `frontend`.
            ("web.prod.frontend.svc.cluster.local", Some("frontend"), Lookup::Unknown),
            ("web.prod.svc.cluster.local", Some("frontend"), ip([10, 96, 0, 1])),
            ("db.prod.svc.cluster.local", Some("frontend"), ip([10, 96, 0, 7])),
            ("db.prod.svc.cluster.local", Some("front"), ip([10, 96, 0, 8])),
            ("web-0.kafka.prod.svc.cluster.local", Some("x"), ip([10, 96, 0, 7])),
            ("pay.example.com", Some("payments"), ip([10, 96, 0, 9])),
            ("pay.example.com", Some("other"), Lookup::Unknown),
            ("x.evil.svc.cluster.local", Some("other"), ip([6, 6, 6, 1])),
            ("other.cluster.local", Some("other"), ip([6, 6, 6, 2])),
        ] {
            assert_eq!(lookup(&s, name, ns, d), want, "{name} from {ns:?}");
        }
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
        assert!(candidates("web-0.kafka.shop.svc.cluster.local", Some("x"), d).is_empty());
    }
}
