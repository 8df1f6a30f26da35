//! The return path of a pod's redirection written over rtnetlink from the agent itself, no
//! `ip` process: `lo` up, and for IPv4 and IPv6 the policy rule `fwmark 0x111/0xfff pref
//! 32764 lookup 100` and the route `local default dev lo table 100`; their removal; and the
//! dumps [`super::rules::verify`] checks.
//!
//! A netlink socket belongs to the network namespace of the thread that opened it, so the
//! caller opens [`Netlink`] from a thread switched into the pod's namespace; every request
//! is then a message and its acknowledgement on that socket (microseconds, where each `ip`
//! was a fork and exec). Messages are built with netlink-packet-route and sent on a blocking
//! netlink-sys socket: the agent calls this from blocking threads, so no async runtime.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkFlags, LinkHeader, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The loopback interface: index 1 in every network namespace (the kernel's
/// `LOOPBACK_IFINDEX`).
const LO: u32 = 1;

/// The policy rule's preference (as `ip rule` printed it before: the first free one below
/// the main table's 32766 that other software leaves alone).
pub const RULE_PREF: u32 = 32764;

/// An rtnetlink socket in one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

/// The return path of one family.
#[derive(Clone, Copy, Debug)]
pub struct ReturnPath {
    pub ipv6: bool,
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
}

impl ReturnPath {
    fn family(&self) -> AddressFamily {
        if self.ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        }
    }

    fn rule(&self) -> RuleMessage {
        let mut rule = RuleMessage::default();
        rule.header = RuleHeader {
            family: self.family(),
            action: RuleAction::ToTable,
            // The table goes in the attribute (ids above 255 fit); the header's field only
            // when it fits too, as `ip` does.
            table: u8::try_from(self.table).unwrap_or(0),
            ..RuleHeader::default()
        };
        rule.attributes = vec![
            RuleAttribute::FwMark(self.mark),
            RuleAttribute::FwMask(self.mask),
            RuleAttribute::Priority(RULE_PREF),
            RuleAttribute::Table(self.table),
        ];
        rule
    }

    fn route(&self) -> RouteMessage {
        let mut route = RouteMessage::default();
        route.header = RouteHeader {
            address_family: self.family(),
            destination_prefix_length: 0,
            table: u8::try_from(self.table).unwrap_or(0),
            protocol: RouteProtocol::Boot,
            scope: RouteScope::Host,
            kind: RouteType::Local,
            ..RouteHeader::default()
        };
        let any = if self.ipv6 {
            RouteAddress::Inet6(Ipv6Addr::UNSPECIFIED)
        } else {
            RouteAddress::Inet(Ipv4Addr::UNSPECIFIED)
        };
        route.attributes = vec![
            RouteAttribute::Destination(any),
            RouteAttribute::Table(self.table),
            RouteAttribute::Oif(LO),
        ];
        route
    }
}

/// What a dump of the rules and of one table's routes shows, for verification.
#[derive(Debug, Default)]
pub struct Seen {
    pub rule: bool,
    pub route: bool,
}

impl Netlink {
    /// Opens an rtnetlink socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sets `lo` up (the return path routes through it; runtimes normally raise it already).
    pub fn loopback_up(&mut self) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header = LinkHeader {
            index: LO,
            flags: LinkFlags::Up,
            change_mask: LinkFlags::Up,
            ..LinkHeader::default()
        };
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    /// Adds the rule (an identical rule already there is kept: the kernel refuses a
    /// duplicate under `NLM_F_EXCL`) and replaces the route; idempotent.
    pub fn add(&mut self, path: ReturnPath) -> io::Result<()> {
        match self.request(RouteNetlinkMessage::NewRule(path.rule()), NLM_F_CREATE | NLM_F_EXCL) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
            other => other?,
        }
        self.request(
            RouteNetlinkMessage::NewRoute(path.route()),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes the rule and the route; what is not there is not an error.
    pub fn delete(&mut self, path: ReturnPath) -> io::Result<()> {
        let absent = |e: &io::Error| matches!(e.raw_os_error(), Some(nix::libc::ENOENT | nix::libc::ESRCH));
        match self.request(RouteNetlinkMessage::DelRule(path.rule()), 0) {
            Err(e) if absent(&e) => {}
            other => other?,
        }
        match self.request(RouteNetlinkMessage::DelRoute(path.route()), 0) {
            Err(e) if absent(&e) => Ok(()),
            other => other,
        }
    }

    /// Whether the rule and the route of `path` are there.
    pub fn seen(&mut self, path: ReturnPath) -> io::Result<Seen> {
        let mut seen = Seen::default();
        let mut probe = RuleMessage::default();
        probe.header.family = path.family();
        for msg in self.dump(RouteNetlinkMessage::GetRule(probe))? {
            if let RouteNetlinkMessage::NewRule(r) = msg {
                let has = |a: RuleAttribute| r.attributes.contains(&a);
                seen.rule |= has(RuleAttribute::FwMark(path.mark))
                    && has(RuleAttribute::FwMask(path.mask))
                    && has(RuleAttribute::Table(path.table));
            }
        }
        let mut probe = RouteMessage::default();
        probe.header.address_family = path.family();
        let want = path.route();
        for msg in self.dump(RouteNetlinkMessage::GetRoute(probe))? {
            if let RouteNetlinkMessage::NewRoute(r) = msg {
                let has = |a: &RouteAttribute| r.attributes.contains(a);
                seen.route |= r.header.kind == RouteType::Local
                    && r.header.destination_prefix_length == 0
                    && want
                        .attributes
                        .iter()
                        .filter(|a| !matches!(a, RouteAttribute::Destination(_)))
                        .all(has);
            }
        }
        Ok(seen)
    }

    fn send(&mut self, inner: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(self.seq)
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, inner: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(inner, flags | NLM_F_ACK)?;
        let mut done = false;
        self.receive(seq, |payload| match payload {
            NetlinkPayload::Error(e) => {
                done = true;
                match e.code {
                    None => Ok(true),
                    Some(_) => Err(e.to_io()),
                }
            }
            _ => Ok(false),
        })?;
        if done {
            Ok(())
        } else {
            Err(io::Error::other("netlink: no acknowledgement"))
        }
    }

    /// Sends a dump request and collects the messages of the answer.
    fn dump(&mut self, inner: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(inner, NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(seq, |payload| match payload {
            NetlinkPayload::InnerMessage(m) => {
                out.push(m);
                Ok(false)
            }
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) => Err(e.to_io()),
            _ => Ok(false),
        })?;
        Ok(out)
    }

    /// Reads messages answering `seq` until `each` says the answer is complete.
    fn receive(
        &mut self,
        seq: u32,
        mut each: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> io::Result<bool>,
    ) -> io::Result<()> {
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "netlink: empty message"));
                }
                // Messages in one datagram are 4-byte aligned.
                at += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                if each(msg.payload)? {
                    return Ok(());
                }
            }
        }
    }
}
