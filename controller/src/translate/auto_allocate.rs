//! DNS auto-allocation: a ServiceEntry host without `addresses` (and not a wildcard, and not
//! `resolution: NONE`) gets a VIP from Istio's reserved ranges, 240.240.0.0/16 (Class E, never
//! routed) and 2001:2::/48 (RFC 5180 benchmarking), which the DNS proxy answers and ztunnel
//! captures like any service VIP.
//!
//! Istio's allocator writes the addresses to the ServiceEntry's status; ours writes nothing:
//! the VIP is a pure function of the entries, so it is the same after a controller restart
//! and on every replica without coordination. VIPs are allocated per namespace and host (the
//! service key `<ns>/<host>`), as Istio allocates per ServiceEntry object: one host in two
//! namespaces gets two VIPs, since ztunnel keeps one service per VIP. Each host's candidates
//! are `sha256(host || attempt)` mapped into the range; hosts are placed oldest entry first
//! (creation timestamp, then namespace/name, as the entries' claims) and a host whose
//! candidate is taken (by an earlier host, the same host of an older namespace's entry, or an
//! address someone declared) tries the next attempt. A host keeps its VIP while the set of
//! hosts changes unless an older one comes to land on the same candidate (about 1 in 65,534
//! per pair for IPv4; never a newly created entry), the price of needing no stored state. A
//! newer entry, whatever host it crafts, never moves an older entry's VIP: clients that
//! cached it would reach the newer entry's service.
//!
//! No endpoint may sit in these ranges ([`in_ranges`], checked by [`super::entries`]): any
//! address there is some host's VIP now or after the next allocation, and a service's VIP as
//! an endpoint sends the traffic round through the waypoints again.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sha2::{Digest, Sha256};

/// Usable IPv4 addresses in 240.240.0.0/16 (the network and broadcast addresses excluded).
const V4_SLOTS: u32 = 65_534;

/// The allocated pair of one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Allocated {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// Whether `ip` (canonical) is in the ranges VIPs are allocated from.
pub(crate) fn in_ranges(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.octets()[..2] == [240, 240],
        IpAddr::V6(v6) => v6.segments()[..3] == [0x2001, 0x2, 0],
    }
}

fn digest(host: &str, attempt: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(host.as_bytes());
    h.update(attempt.to_be_bytes());
    h.finalize().into()
}

fn v4(d: &[u8; 32]) -> Ipv4Addr {
    // 1..=65534: never 240.240.0.0 nor 240.240.255.255.
    let n = u32::from(u16::from_be_bytes([d[0], d[1]])) % V4_SLOTS + 1;
    let [_, _, a, b] = n.to_be_bytes();
    Ipv4Addr::new(240, 240, a, b)
}

fn v6(d: &[u8; 32]) -> Ipv6Addr {
    // 2001:2:0::/48, the low 80 bits from the digest.
    let mut o = [0u8; 16];
    o[0..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x02]);
    o[6..16].copy_from_slice(&d[2..12]);
    Ipv6Addr::from(o)
}

/// VIPs for `hosts`, (key, host name) pairs placed in the order given (a key already placed
/// keeps its first pair), by key, avoiding `taken` (addresses declared elsewhere). A host for
/// which no free IPv4 address is found (the range is full) is left out.
pub(crate) fn allocate<'h>(
    hosts: impl IntoIterator<Item = (&'h str, &'h str)>,
    taken: &HashSet<IpAddr>,
) -> BTreeMap<String, Allocated> {
    let mut used: HashSet<IpAddr> = taken.clone();
    let mut out = BTreeMap::new();
    for (key, host) in hosts {
        if out.contains_key(key) {
            continue;
        }
        let mut found = None;
        for attempt in 0..V4_SLOTS.saturating_mul(4) {
            let d = digest(host, attempt);
            let (a, b) = (v4(&d), v6(&d));
            if !used.contains(&IpAddr::V4(a)) && !used.contains(&IpAddr::V6(b)) {
                found = Some(Allocated { v4: a, v6: b });
                break;
            }
        }
        if let Some(pair) = found {
            used.insert(IpAddr::V4(pair.v4));
            used.insert(IpAddr::V6(pair.v6));
            out.insert(key.to_owned(), pair);
        }
    }
    out
}

/// The first candidate of `host` (what it gets when nothing is in the way).
#[cfg(test)]
pub(crate) fn first_candidate(host: &str) -> Ipv4Addr {
    v4(&digest(host, 0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Hosts keyed by themselves, placed in the order given.
    fn alloc(hosts: &[&str], taken: &HashSet<IpAddr>) -> BTreeMap<String, Allocated> {
        allocate(hosts.iter().map(|h| (*h, *h)), taken)
    }

    #[test]
    fn addresses_are_in_the_reserved_ranges_and_a_function_of_the_names() {
        let a = alloc(&["api.example.com", "db.example.com"], &HashSet::new());
        let b = alloc(&["db.example.com", "api.example.com"], &HashSet::new());
        assert_eq!(a, b, "same hosts, same VIPs (restart, another replica)");
        for pair in a.values() {
            assert_eq!(pair.v4.octets()[..2], [240, 240]);
            assert_eq!(pair.v6.segments()[..3], [0x2001, 0x2, 0]);
        }
        assert_ne!(a["api.example.com"], a["db.example.com"]);
        // Adding an unrelated host does not move the others (no collision here).
        let c = alloc(
            &["api.example.com", "db.example.com", "zzz.example.org"],
            &HashSet::new(),
        );
        assert_eq!(c["api.example.com"], a["api.example.com"]);
        assert_eq!(c["db.example.com"], a["db.example.com"]);
    }

    #[test]
    fn collisions_move_to_the_next_candidate_and_declared_addresses_are_avoided() {
        let hosts = ["api.example.com"];
        let first = alloc(&hosts, &HashSet::new())["api.example.com"];
        let taken: HashSet<IpAddr> = [IpAddr::V4(first.v4)].into();
        let moved = alloc(&hosts, &taken)["api.example.com"];
        assert_ne!(moved.v4, first.v4);
        // Many hosts: all distinct.
        let many: Vec<String> = (0..5000).map(|i| format!("h{i}.example.com")).collect();
        let all = allocate(many.iter().map(|h| (h.as_str(), h.as_str())), &HashSet::new());
        assert_eq!(all.len(), 5000);
        let distinct: HashSet<Ipv4Addr> = all.values().map(|p| p.v4).collect();
        assert_eq!(distinct.len(), 5000);
        assert!(!distinct.contains(&Ipv4Addr::new(240, 240, 0, 0)));
    }

    /// One host in two namespaces is two services: two VIPs (ztunnel keeps one service per
    /// VIP). The one placed first (the older entry's) keeps the host's first candidate; a key
    /// placed twice keeps its first pair.
    #[test]
    fn one_host_of_two_namespaces_gets_two_vips() {
        let alone = alloc(&["api.test"], &HashSet::new())["api.test"];
        let pairs = [
            ("shop/api.test", "api.test"),
            ("evil/api.test", "api.test"),
            ("shop/api.test", "api.test"),
        ];
        let both = allocate(pairs, &HashSet::new());
        assert_eq!(both.len(), 2);
        assert_eq!(both["shop/api.test"], alone);
        assert_ne!(both["evil/api.test"].v4, alone.v4);
        assert_ne!(both["evil/api.test"].v6, alone.v6);
    }

    /// Every allocated VIP is in the ranges endpoints may not use, and only those ranges are.
    #[test]
    fn allocated_vips_are_in_the_ranges() {
        let all = alloc(&["a.test", "b.test", "c.test"], &HashSet::new());
        for pair in all.values() {
            assert!(in_ranges(IpAddr::V4(pair.v4)) && in_ranges(IpAddr::V6(pair.v6)));
            assert!(in_ranges(IpAddr::V6(pair.v4.to_ipv6_mapped())), "IPv4-mapped too");
        }
        for (ip, inside) in [
            ("240.240.0.1", true),
            ("240.240.255.254", true),
            ("240.241.0.1", false),
            ("10.240.240.1", false),
            ("2001:2::1", true),
            ("2001:2:0:ffff::1", true),
            ("2001:2:1::1", false),
            ("2001:db8::1", false),
        ] {
            assert_eq!(in_ranges(ip.parse().unwrap()), inside, "{ip}");
        }
    }
}
