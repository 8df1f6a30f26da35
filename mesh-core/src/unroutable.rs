//! Addresses no proxy may dial for a tenant, whoever names them: one classifier for the
//! controller (refusing them as entry VIPs, endpoints and WorkloadEntry addresses) and for the
//! proxies (refusing what a name-only endpoint resolves to before connecting). A proxy
//! dialling one reaches its own host (a waypoint's admin port and its config dump of every
//! tenant), or what only its node should reach (the cloud metadata server at 169.254.169.254).
//! IPv4-mapped IPv6 addresses are read as the IPv4 address they carry.

use std::fmt;
use std::net::IpAddr;

/// The class of an address nothing may be served at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unroutable {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 0.0.0.0/8 ("this network"), ::.
    Unspecified,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8: never one connection's peer.
    Multicast,
}

impl Unroutable {
    /// The class of `ip`, read canonical (`::ffff:127.0.0.1` is loopback); `None` when none.
    pub fn of(ip: IpAddr) -> Option<Self> {
        match ip.to_canonical() {
            IpAddr::V4(v4) if v4.is_loopback() => Some(Self::Loopback),
            IpAddr::V4(v4) if v4.octets()[0] == 0 => Some(Self::Unspecified),
            IpAddr::V4(v4) if v4.is_link_local() => Some(Self::LinkLocal),
            IpAddr::V4(v4) if v4.is_multicast() => Some(Self::Multicast),
            IpAddr::V6(v6) if v6.is_loopback() => Some(Self::Loopback),
            IpAddr::V6(v6) if v6.is_unspecified() => Some(Self::Unspecified),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(Self::LinkLocal),
            IpAddr::V6(v6) if v6.is_multicast() => Some(Self::Multicast),
            IpAddr::V4(_) | IpAddr::V6(_) => None,
        }
    }
}

impl fmt::Display for Unroutable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "a loopback address: the proxy dialling it would reach its own host",
            Self::Unspecified => "an unspecified address: the proxy dialling it would reach its own host",
            Self::LinkLocal => {
                "a link-local address: the proxy dialling it would reach its node's link (the cloud metadata server)"
            }
            Self::Multicast => "a multicast address: never a connection's peer",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Unroutable::{self, *};

    /// Every unroutable class, IPv4, IPv6 and IPv4-mapped, and their neighbours that are not.
    #[test]
    fn unroutable_address_classes() {
        let table: [(&str, Option<Unroutable>); 26] = [
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.0.1", Some(LinkLocal)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf:ffff::1", Some(LinkLocal)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("::ffff:224.0.0.251", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("10.0.0.1", None),
            ("1.0.0.0", None),
            ("169.255.0.1", None),
            ("223.255.255.255", None),
            ("::2", None),
            ("fec0::1", None),
            ("fd00::1", None),
            ("2001:db8::1", None),
            ("::ffff:10.1.2.3", None),
        ];
        for (ip, class) in table {
            let ip = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
            assert_eq!(Unroutable::of(ip), class, "{ip}");
        }
    }
}
