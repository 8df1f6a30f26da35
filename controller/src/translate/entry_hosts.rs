//! Which namespace may declare a ServiceEntry host. ztunnel and its DNS proxy find a service
//! by host name; two namespaces declaring one name (or a wildcard covering another's name)
//! would leave the choice to namespace-name order, which a tenant picks. So hosts are
//! claimed as addresses are ([`super::entries::Owned`]): the older entry keeps a host, and a
//! newer entry of another namespace declaring the same host, a wildcard covering it, or a
//! name its wildcard covers, is refused ([`super::entries::Refusal::OlderEntry`]); entries
//! of one namespace may share hosts (the first entry keeps the service, as before).
//!
//! Age is the entry's creation timestamp (unknown sorts first), then its namespace/name, as
//! for addresses. Claims are placed oldest first and a refused claim holds nothing, so a host
//! a newer entry was refused never blocks a third entry.
//!
//! Names under `.svc.<cluster domain>` are the Kubernetes Services' of each namespace: an
//! entry may declare only names under its own namespace's `<ns>.svc.<domain>` there, and no
//! wildcard covering others' (`*.svc.<domain>`, `*.<domain>`, `*`). Such hosts claim
//! nothing either.
//!
//! Everything here reads only the ServiceEntries, so the entries' layer, recomputed whole
//! whenever an entry changes ([`super::incremental`]), re-checks every newer entry when an
//! older one comes or goes.

use std::collections::BTreeMap;

use super::entries::Refusal;
use super::service_entry::{valid_host, within_bounds};
use crate::model::{Inputs, ObjectKey};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// An entry's claim: its age (`None`, unknown, sorts first), key, and the host as written.
pub(crate) type HostClaim<'a> = (Option<&'a Time>, &'a ObjectKey, &'a str);

/// The hosts entries keep, by reversed labels (`test.api` for `api.test`) so that the names
/// under a wildcard are one range: exact hosts and wildcards (`*.wild.test` under
/// `test.wild`) apart. Each holds the oldest claim kept (one namespace's, by construction).
#[derive(Default)]
pub(crate) struct Hosts<'a> {
    exact: BTreeMap<String, HostClaim<'a>>,
    wild: BTreeMap<String, HostClaim<'a>>,
}

/// `host` (lowercase) as (its name without `*.`, whether a wildcard); `*` is `("", true)`.
fn split(host: &str) -> (&str, bool) {
    match host.strip_prefix("*.") {
        Some(name) => (name, true),
        None if host == "*" => ("", true),
        None => (host, false),
    }
}

/// `name`'s labels in reverse order, dot-joined.
fn reversed(name: &str) -> String {
    name.rsplit('.').collect::<Vec<_>>().join(".")
}

/// Whether `name` is `parent` or a name under it.
fn within(name: &str, parent: &str) -> bool {
    name == parent || name.strip_suffix(parent).is_some_and(|rest| rest.ends_with('.'))
}

/// Whether the entry of `namespace` may declare `host` (lowercase) as far as the cluster's
/// Service names go (see the module doc).
pub(crate) fn check_space<'d>(host: &str, namespace: &str, domain: &'d str) -> Result<(), Refusal<'d>> {
    let (name, wild) = split(host);
    let svc = format!("svc.{domain}");
    if within(name, &format!("{namespace}.{svc}")) {
        return Ok(());
    }
    // Exact names strictly under svc.<domain>; a wildcard covers them when its name is under
    // svc.<domain> or svc.<domain> is under its name (`*.cluster.local`, `*`).
    let under = name.strip_suffix(svc.as_str()).is_some_and(|rest| rest.ends_with('.'));
    let covers = wild && (name.is_empty() || within(&svc, name));
    if under || covers {
        return Err(Refusal::ClusterServices(domain));
    }
    Ok(())
}

impl<'a> Hosts<'a> {
    /// The hosts the ServiceEntries in `inputs` keep, placed oldest first. Only a DNS name
    /// in the entry's space ([`check_space`]) of an entry within its bounds (one that is
    /// served) claims anything.
    pub(crate) fn new(inputs: &'a Inputs, domain: &str) -> Self {
        let mut claims: Vec<(HostClaim<'a>, String)> = Vec::new();
        for (key, se) in inputs
            .service_entries
            .iter()
            .filter(|(_, se)| within_bounds(se).is_ok())
        {
            let age = se.metadata.creation_timestamp.as_ref();
            for host in &se.spec.hosts {
                let lower = host.to_ascii_lowercase();
                if valid_host(&lower) && check_space(&lower, &key.namespace, domain).is_ok() {
                    claims.push(((age, key, host.as_str()), lower));
                }
            }
        }
        claims.sort_by(|((a, k, _), _), ((b, l, _), _)| (a, k).cmp(&(b, l)));
        let mut out = Hosts::default();
        for (claim, lower) in claims {
            if out.held(&lower, &claim.1.namespace).is_none() {
                out.insert(&lower, claim);
            }
        }
        out
    }

    fn insert(&mut self, host: &str, claim: HostClaim<'a>) {
        let (name, wild) = split(host);
        let map = if wild { &mut self.wild } else { &mut self.exact };
        map.entry(reversed(name)).or_insert(claim);
    }

    /// The claim of another namespace than `namespace` that `host` (lowercase) overlaps: the
    /// same name, a wildcard covering it, or (for a wildcard) a name it covers.
    pub(crate) fn held(&self, host: &str, namespace: &str) -> Option<HostClaim<'a>> {
        let (name, wild) = split(host);
        let other = |c: &&HostClaim<'a>| c.1.namespace != namespace;
        let rev = reversed(name);
        if !wild {
            if let Some(c) = self.exact.get(&rev).filter(other) {
                return Some(*c);
            }
        }
        // Wildcards covering it: `*.<suffix>` for each proper suffix (and, for a wildcard,
        // its own name), longest first.
        if let Some(c) = self.wild.get("").filter(other) {
            return Some(*c); // `*`
        }
        let labels: Vec<&str> = rev.split('.').collect();
        let own = usize::from(wild);
        for n in (1..labels.len() + own).rev() {
            if let Some(c) = self.wild.get(&labels[..n].join(".")).filter(other) {
                return Some(*c);
            }
        }
        if wild {
            // Names it covers: strictly under its name (everything for `*`).
            let prefix = if name.is_empty() {
                String::new()
            } else {
                format!("{rev}.")
            };
            for map in [&self.exact, &self.wild] {
                let mut under = map.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix));
                if let Some((_, c)) = under.find(|(_, c)| other(c)) {
                    return Some(*c);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Which hosts an entry of `evil` may declare in the cluster's Service names.
    #[test]
    fn only_the_entrys_own_namespace_names_under_svc() {
        let table = [
            ("*.svc.cluster.local", false),
            ("*.cluster.local", false),
            ("*.local", false),
            ("*", false),
            ("*.shop.svc.cluster.local", false),
            ("db.shop.svc.cluster.local", false),
            ("shop.svc.cluster.local", false),
            ("*.x.shop.svc.cluster.local", false),
            ("*.evil.svc.cluster.local", true),
            ("db.evil.svc.cluster.local", true),
            ("evil.svc.cluster.local", true),
            ("*.a.evil.svc.cluster.local", true),
            ("svc.cluster.local", true),
            ("api.cluster.local", true),
            ("*.other.local", true),
            ("api.example.com", true),
            ("*.example.com", true),
            ("xsvc.cluster.local", true),
            ("db.shopsvc.cluster.local", true),
        ];
        for (host, ok) in table {
            assert_eq!(check_space(host, "evil", "cluster.local").is_ok(), ok, "{host}");
        }
        assert!(check_space("db.shop.svc.corp.example", "evil", "corp.example").is_err());
        assert!(check_space("db.shop.svc.cluster.local", "evil", "corp.example").is_ok());
    }

    fn key(ns: &str, name: &str) -> &'static ObjectKey {
        Box::leak(Box::new(ObjectKey::new(ns, name)))
    }

    /// Overlap both ways: the same name, a wildcard covering it, a name a wildcard covers;
    /// only another namespace's claim counts.
    #[test]
    fn a_claim_is_held_by_overlapping_hosts_of_other_namespaces() {
        let mut hosts = Hosts::default();
        hosts.insert("api.shop.test", (None, key("shop", "a"), "api.shop.test"));
        hosts.insert("*.wild.test", (None, key("shop", "w"), "*.wild.test"));
        let table = [
            ("api.shop.test", Some("api.shop.test")),
            ("*.shop.test", Some("api.shop.test")),
            ("*.test", Some("api.shop.test")),
            ("x.api.shop.test", None),
            ("*.api.shop.test", None),
            ("shop.test", None),
            ("a.wild.test", Some("*.wild.test")),
            ("a.b.wild.test", Some("*.wild.test")),
            ("*.wild.test", Some("*.wild.test")),
            ("*.b.wild.test", Some("*.wild.test")),
            ("wild.test", None),
            ("*.ild.test", None),
            ("pi.shop.test", None),
            ("other.test", None),
        ];
        for (host, held) in table {
            assert_eq!(hosts.held(host, "evil").map(|c| c.2), held, "{host}");
            assert_eq!(hosts.held(host, "shop"), None, "{host}: shop's own");
        }
    }

    use crate::model::Kind;
    use crate::translate::incremental::testing::{objects, step_equals_full};
    use crate::translate::{translate, Options, Outputs};

    /// A ServiceEntry `ns/name` created at second `at`, of `hosts` (resolution DNS: each host
    /// gets an allocated VIP).
    fn entry(ns: &str, name: &str, at: u32, hosts: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"2026-01-01T00:00:{at:02}Z\"}}
spec: {{hosts: {hosts}, resolution: DNS, ports: [{{number: 80, name: http}}]}}
---
"
        )
    }

    fn translated(yaml: &str) -> Outputs {
        let mut inputs = Inputs::default();
        objects(yaml).into_iter().for_each(|o| inputs.apply(o));
        translate(&inputs, &Options::default())
    }

    fn problems(out: &Outputs, ns: &str, name: &str) -> Vec<String> {
        let key = ObjectKey::new(ns, name);
        let of = out
            .problems
            .iter()
            .filter(|p| p.kind == Kind::ServiceEntry && p.object == key);
        of.map(|p| p.message.clone()).collect()
    }

    const TAKE: &str = "an entry cannot take it, ignored";

    /// A newer entry of another namespace is refused the older entry's host, a name its
    /// wildcard covers, and a wildcard covering its host, each reported with its field; its
    /// other hosts are served. A refused wildcard claims nothing (a third namespace's name
    /// under it is served); entries of one namespace share hosts.
    #[test]
    fn an_older_entrys_hosts_are_kept_from_other_namespaces() {
        let yaml = entry("shop", "api", 1, "[api.shop.test, '*.wild.test']")
            + &entry(
                "evil",
                "grab",
                5,
                "[ok.evil.test, API.shop.test, x.wild.test, '*.shop.test', '*.test']",
            )
            + &entry("shop", "second", 6, "[api.shop.test, b.shop.test]")
            + &entry("third", "late", 9, "[y.test]");
        let out = translated(&yaml);
        let served = |k: &str| out.addresses.contains_key(k);
        for k in [
            "shop/api.shop.test",
            "shop/*.wild.test",
            "shop/b.shop.test",
            "evil/ok.evil.test",
            "third/y.test",
        ] {
            assert!(served(k), "{k}");
        }
        for k in [
            "evil/api.shop.test",
            "evil/x.wild.test",
            "evil/*.shop.test",
            "evil/*.test",
        ] {
            assert!(!served(k), "{k}");
        }
        let owner = "is declared by the older entry shop/api";
        assert_eq!(
            problems(&out, "evil", "grab"),
            [
                format!("spec.hosts[1] \"api.shop.test\": host api.shop.test {owner}; {TAKE}"),
                format!("spec.hosts[2] \"x.wild.test\": host *.wild.test {owner}; {TAKE}"),
                format!("spec.hosts[3] \"*.shop.test\": host api.shop.test {owner}; {TAKE}"),
                format!("spec.hosts[4] \"*.test\": host api.shop.test {owner}; {TAKE}"),
            ]
        );
        assert!(problems(&out, "third", "late").is_empty());
        assert_eq!(
            problems(&out, "shop", "second"),
            ["host api.shop.test is already declared by ServiceEntry shop/api; the first wins"]
        );
    }

    /// The same creation time: namespace, then name, decides (as for addresses).
    #[test]
    fn the_same_age_falls_back_to_the_key() {
        let out = translated(&(entry("zz", "a", 3, "[tie.test]") + &entry("aa", "z", 3, "[tie.test]")));
        assert!(out.addresses.contains_key("aa/tie.test") && !out.addresses.contains_key("zz/tie.test"));
        assert_eq!(
            problems(&out, "zz", "a"),
            [format!(
                "spec.hosts[0] \"tie.test\": host tie.test is declared by the older entry aa/z; {TAKE}"
            )]
        );
    }

    /// Names under `.svc.<domain>` are the Kubernetes Services' of each namespace: an entry
    /// may declare those of its own namespace only, whatever its age.
    #[test]
    fn the_cluster_service_names_are_their_namespaces() {
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.7, ports: [{port: 80}]}
---
";
        let hosts = "['*.svc.cluster.local', '*.shop.svc.cluster.local', web.shop.svc.cluster.local,
            '*.evil.svc.cluster.local', db.evil.svc.cluster.local, '*.cluster.local', api.example.com]";
        let out = translated(&(entry("evil", "cluster", 0, hosts) + service));
        let why = "names under .svc.cluster.local are the Kubernetes Services' of each namespace: an entry may \
                   declare only those under <its namespace>.svc.cluster.local, ignored";
        let refused = |i: usize, h: &str| format!("spec.hosts[{i}] \"{h}\": {why}");
        assert_eq!(
            problems(&out, "evil", "cluster"),
            [
                refused(0, "*.svc.cluster.local"),
                refused(1, "*.shop.svc.cluster.local"),
                refused(2, "web.shop.svc.cluster.local"),
                refused(5, "*.cluster.local"),
            ]
        );
        let evil: Vec<&String> = out.addresses.keys().filter(|k| k.starts_with("evil/")).collect();
        assert_eq!(
            evil,
            [
                "evil/*.evil.svc.cluster.local",
                "evil/api.example.com",
                "evil/db.evil.svc.cluster.local"
            ]
        );
        assert!(out.addresses.contains_key("shop/web.shop.svc.cluster.local"));
    }

    /// An older entry that appears later takes its host from the newer one (and gives it back
    /// when it goes): each step of the incremental translation equals a full one.
    #[test]
    fn incremental_host_claims_follow_the_older_entry() {
        use crate::source::Change;
        use crate::translate::incremental::Incremental;
        let mut inputs = Inputs::default();
        objects(&entry("evil", "grab", 5, "['*.shop.test']"))
            .into_iter()
            .for_each(|o| inputs.apply(o));
        let mut inc = Incremental::new(Options::default());
        inc.step(&inputs, &Default::default());
        let shop = |at| Change::Apply(objects(&entry("shop", "api", at, "[api.shop.test]")).remove(0));
        let gone = || Change::Delete(Kind::ServiceEntry, ObjectKey::new("shop", "api"));
        // (change, evil's wildcard served, shop's host served)
        let steps = [
            (shop(1), false, true),
            (gone(), true, false),
            (shop(9), true, false),
            (gone(), true, false),
        ];
        for (step, (change, evil, shop)) in steps.into_iter().enumerate() {
            let out = step_equals_full(&mut inc, &mut inputs, change, step);
            assert_eq!(out.addresses.contains_key("evil/*.shop.test"), evil, "step {step}");
            assert_eq!(out.addresses.contains_key("shop/api.shop.test"), shop, "step {step}");
        }
    }
}
