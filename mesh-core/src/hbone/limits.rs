//! What a peer can make an HBONE server hold, and the bounds on it. One [`ServerLimits`] is
//! shared by every connection of a server (all pods of a node ztunnel, or a waypoint):
//!
//! - connections that have not finished TLS, in total and per source address, so a flood of
//!   idle or slow sockets cannot exhaust memory or starve real clients; then, until the HTTP/2
//!   preface, in total and per peer identity (an east-west gateway is one source address for
//!   many clients);
//! - authenticated connections per peer identity (each holds TLS and HTTP/2 state even with
//!   no stream; the server also closes one left without streams, see `Settings`);
//! - concurrent CONNECT streams per peer identity, across all its connections, since each
//!   stream can pin flow-control windows and send buffers;
//! - streams a peer resets before they were answered (rapid reset), per connection.
//!
//! Every time a bound bites, the observer is told which one, so binaries count it.
//!
//! [`ServerLimits::admit`] alone also bounds plain TCP listeners (ztunnel's 15001 and 15006, each
//! with its own instance): there a connection keeps its slot, per source and in total, until it ends.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::identity::Identity;

/// The bounds, with defaults sized for a node proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitConfig {
    /// Connections still in TLS or HTTP/2 preface, all sources together.
    pub max_pending: u32,
    /// Connections still in TLS from one source address.
    pub max_pending_per_source: u32,
    /// Connections of one peer identity past TLS and still awaiting the HTTP/2 preface.
    pub max_preface_per_peer: u32,
    /// Authenticated connections of one peer identity (a client's pool holds about one per
    /// source pod and destination workload, most of them idle).
    pub max_connections_per_peer: u32,
    /// Concurrent CONNECT streams of one peer identity across its connections.
    pub max_streams_per_peer: u32,
    /// Streams a peer may reset before answer within [`reset_window`](Self::reset_window) on one
    /// connection before the connection is closed with GOAWAY (ENHANCE_YOUR_CALM).
    pub max_resets: u32,
    pub reset_window: Duration,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            max_pending: 4096,
            max_pending_per_source: 256,
            max_preface_per_peer: 128,
            max_connections_per_peer: 4096,
            max_streams_per_peer: 1024,
            max_resets: 100,
            reset_window: Duration::from_secs(10),
        }
    }
}

/// The per-peer bounds as flags, one spelling in every binary with an HBONE server (ztunnel,
/// the waypoint); the other bounds keep their defaults.
#[derive(Clone, Debug, clap::Args)]
pub struct PeerLimitArgs {
    /// Concurrent HBONE streams one peer identity may hold across its connections (each is a
    /// proxied connection; beyond it new ones are refused and counted). Raise it where one
    /// client workload holds more connections than this.
    #[arg(long, env = "MAX_STREAMS_PER_PEER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_peer: u32,
    /// Authenticated HBONE connections one peer identity may hold at once (a client's pool
    /// keeps about one per source pod and destination pod, mostly idle); beyond it new ones
    /// are closed and counted.
    #[arg(long, env = "MAX_CONNECTIONS_PER_PEER", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_peer: u32,
}

impl PeerLimitArgs {
    /// The server's bounds: these per-peer ones, the defaults for the rest.
    pub fn config(&self) -> LimitConfig {
        LimitConfig {
            max_streams_per_peer: self.max_streams_per_peer,
            max_connections_per_peer: self.max_connections_per_peer,
            ..LimitConfig::default()
        }
    }
}

/// Which bound bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    PendingConnections,
    PendingPerSource,
    PrefacePerPeer,
    ConnectionsPerPeer,
    StreamsPerPeer,
    ResetFlood,
    HandshakeTimeout,
    PrefaceTimeout,
    /// An authenticated connection held no stream for the server's idle timeout.
    IdleConnection,
}

impl Limit {
    /// The label value binaries count it under.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::PendingConnections => "pending_connections_limit",
            Limit::PendingPerSource => "pending_per_source_limit",
            Limit::PrefacePerPeer => "preface_per_peer_limit",
            Limit::ConnectionsPerPeer => "connections_per_peer_limit",
            Limit::StreamsPerPeer => "streams_per_peer_limit",
            Limit::ResetFlood => "reset_flood",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::PrefaceTimeout => "preface_timeout",
            Limit::IdleConnection => "idle_connection",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Called each time a bound bites.
pub type LimitObserver = Arc<dyn Fn(Limit) + Send + Sync>;

#[derive(Default)]
struct Counts {
    pending_total: u32,
    pending: HashMap<IpAddr, u32>,
    preface: HashMap<Identity, u32>,
    connections: HashMap<Identity, u32>,
    streams: HashMap<Identity, u32>,
}

/// Shared accounting for one HBONE server.
pub struct ServerLimits {
    pub config: LimitConfig,
    counts: Mutex<Counts>,
    observer: Option<LimitObserver>,
}

impl fmt::Debug for ServerLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerLimits")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits::new(LimitConfig::default(), None)
    }
}

impl ServerLimits {
    pub fn new(config: LimitConfig, observer: Option<LimitObserver>) -> Self {
        ServerLimits {
            config,
            counts: Mutex::default(),
            observer,
        }
    }

    /// Reports a bound that bit.
    pub fn hit(&self, limit: Limit) {
        if let Some(o) = &self.observer {
            o(limit);
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked: every update is one statement.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new, not yet authenticated connection from `source`, or says which bound
    /// refuses it. The slot is released when the guard drops.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<PendingGuard, Limit> {
        let mut c = self.counts();
        let refused = if c.pending_total >= self.config.max_pending {
            Some(Limit::PendingConnections)
        } else if c.pending.get(&source).copied().unwrap_or(0) >= self.config.max_pending_per_source {
            Some(Limit::PendingPerSource)
        } else {
            None
        };
        if let Some(limit) = refused {
            drop(c);
            self.hit(limit);
            return Err(limit);
        }
        c.pending_total += 1;
        *c.pending.entry(source).or_insert(0) += 1;
        Ok(PendingGuard {
            limits: self.clone(),
            source: Some(source),
        })
    }

    /// Takes one stream slot for `peer`, or `None` when it already holds its maximum.
    pub fn stream(self: &Arc<Self>, peer: &Identity) -> Option<PeerSlot> {
        self.take(peer, Held::Streams)
    }

    /// Takes one authenticated-connection slot for `peer`, or `None` when it already holds
    /// its maximum.
    pub fn connection(self: &Arc<Self>, peer: &Identity) -> Option<PeerSlot> {
        self.take(peer, Held::Connections)
    }

    /// Takes one slot for a connection of `peer` awaiting its HTTP/2 preface, or `None` when
    /// it already holds its maximum.
    pub fn preface(self: &Arc<Self>, peer: &Identity) -> Option<PeerSlot> {
        self.take(peer, Held::Preface)
    }

    fn take(self: &Arc<Self>, peer: &Identity, what: Held) -> Option<PeerSlot> {
        let (max, limit) = match what {
            Held::Preface => (self.config.max_preface_per_peer, Limit::PrefacePerPeer),
            Held::Streams => (self.config.max_streams_per_peer, Limit::StreamsPerPeer),
            Held::Connections => (self.config.max_connections_per_peer, Limit::ConnectionsPerPeer),
        };
        let mut c = self.counts();
        let held = c.held(what).entry(peer.clone()).or_insert(0);
        if *held >= max {
            drop(c);
            self.hit(limit);
            return None;
        }
        *held += 1;
        Some(PeerSlot {
            limits: self.clone(),
            peer: peer.clone(),
            what,
        })
    }

    /// Connections still pending and streams held by `peer` (for tests and debugging).
    pub fn usage(&self, peer: &Identity) -> (u32, u32) {
        let c = self.counts();
        (c.pending_total, c.streams.get(peer).copied().unwrap_or(0))
    }

    /// Connections from `source` still in TLS (for tests and debugging).
    pub fn pending_from(&self, source: IpAddr) -> u32 {
        self.counts().pending.get(&source).copied().unwrap_or(0)
    }

    /// What `peer` holds (for tests and debugging).
    pub fn held(&self, peer: &Identity) -> PeerUsage {
        let c = self.counts();
        let get = |m: &HashMap<Identity, u32>| m.get(peer).copied().unwrap_or(0);
        PeerUsage {
            preface: get(&c.preface),
            connections: get(&c.connections),
            streams: get(&c.streams),
        }
    }
}

/// A pending connection's slot: in the total until dropped, and in its source address's
/// count until TLS proved the peer ([`PendingGuard::release_source`]).
pub struct PendingGuard {
    limits: Arc<ServerLimits>,
    source: Option<IpAddr>,
}

impl PendingGuard {
    /// Gives back the source address's share (the peer is now counted under its identity);
    /// the place in the total is kept until the guard drops.
    pub fn release_source(&mut self) {
        if let Some(source) = self.source.take() {
            self.limits.counts().release_source(source);
        }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        c.pending_total = c.pending_total.saturating_sub(1);
        if let Some(source) = self.source.take() {
            c.release_source(source);
        }
    }
}

/// What one peer identity holds, as [`ServerLimits::held`] reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerUsage {
    /// Connections past TLS awaiting the HTTP/2 preface.
    pub preface: u32,
    /// Authenticated connections.
    pub connections: u32,
    /// Open CONNECT streams.
    pub streams: u32,
}

/// What a peer identity holds, counted per identity.
#[derive(Clone, Copy, Debug)]
enum Held {
    Preface,
    Connections,
    Streams,
}

impl Counts {
    fn release_source(&mut self, source: IpAddr) {
        if let Some(n) = self.pending.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&source);
            }
        }
    }

    fn held(&mut self, what: Held) -> &mut HashMap<Identity, u32> {
        match what {
            Held::Preface => &mut self.preface,
            Held::Connections => &mut self.connections,
            Held::Streams => &mut self.streams,
        }
    }
}

/// A connection's or a stream's place in its peer's count; released on drop (a stream's when
/// its handler is done).
pub struct PeerSlot {
    limits: Arc<ServerLimits>,
    peer: Identity,
    what: Held,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        let counts = c.held(self.what);
        if let Some(n) = counts.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// Resets counted over a sliding window on one connection.
#[derive(Debug)]
pub(crate) struct ResetWindow {
    started: tokio::time::Instant,
    count: u32,
}

impl ResetWindow {
    pub(crate) fn new() -> Self {
        ResetWindow {
            started: tokio::time::Instant::now(),
            count: 0,
        }
    }

    /// Counts one reset; true when the connection has now reset too many.
    pub(crate) fn record(&mut self, config: &LimitConfig) -> bool {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.started) > config.reset_window {
            self.started = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > config.max_resets
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn id(sa: &str) -> Identity {
        Identity {
            trust_domain: "cluster.local".into(),
            namespace: "ns".into(),
            service_account: sa.into(),
        }
    }

    fn limits(config: LimitConfig) -> (Arc<ServerLimits>, Arc<AtomicU32>) {
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        let observer: LimitObserver = Arc::new(move |_| {
            h.fetch_add(1, Ordering::Relaxed);
        });
        (Arc::new(ServerLimits::new(config, Some(observer))), hits)
    }

    #[test]
    fn pending_connections_are_bounded_per_source_and_in_total() {
        let (l, hits) = limits(LimitConfig {
            max_pending: 3,
            max_pending_per_source: 2,
            ..Default::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Limit::PendingPerSource));
        let _b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Limit::PendingConnections));
        assert_eq!(hits.load(Ordering::Relaxed), 2);
        drop(a1);
        assert!(l.admit(b).is_ok(), "a released slot is available again");
    }

    #[test]
    fn streams_are_bounded_per_peer_and_released() {
        let (l, hits) = limits(LimitConfig {
            max_streams_per_peer: 2,
            ..Default::default()
        });
        let s1 = l.stream(&id("a")).unwrap();
        let s2 = l.stream(&id("a")).unwrap();
        assert!(l.stream(&id("a")).is_none());
        assert!(l.stream(&id("b")).is_some(), "another identity has its own budget");
        assert_eq!(hits.load(Ordering::Relaxed), 1);
        drop(s1);
        assert!(l.stream(&id("a")).is_some());
        drop(s2);
        assert_eq!(l.usage(&id("a")).1, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn resets_are_counted_over_a_window() {
        let config = LimitConfig {
            max_resets: 3,
            reset_window: Duration::from_secs(10),
            ..Default::default()
        };
        let mut w = ResetWindow::new();
        assert!(!(0..3).any(|_| w.record(&config)));
        assert!(w.record(&config), "the fourth reset in the window is one too many");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!w.record(&config), "a new window starts the count again");
    }
}
