//! Relays still in their inner handshake, bounded per client identity.
//!
//! The gateway opens every relay from its own address, so the destination ztunnel counts all
//! relayed connections still in TLS on one per-source allowance (mesh-core `hbone::limits`).
//! A client that opens relays and stalls inside the inner TLS handshake would use that
//! allowance up for every other client of its network. The gateway cannot read the inner
//! TLS, but it sees its record framing: a relay counts as *in handshake* until the
//! destination has sent an encrypted record (type 23), the client then an encrypted record,
//! and the destination another one after it. In TLS 1.3 the destination's second encrypted
//! output only follows a client flight it could decrypt: the handshake succeeded (tickets,
//! HTTP/2 SETTINGS; from then on the destination counts the client under its own identity)
//! or failed (an alert, and the destination closes). Records the destination skips (rejected
//! early data) or partial records make it send nothing, so a stalling client stays counted.
//!
//! The order seen is the order the splice hands bytes on, which the client steers: the
//! destination's bytes reach the observer only as the client's HTTP/2 window admits them. So
//! the rule holds only while the destination's encrypted output before the client's flight is
//! a single record: were it several (TLS stacks writing one record per handshake message), a
//! client could take the first, send any encrypted record the destination keeps waiting on (a
//! fragment of its Certificate, under keys it derives from the ServerHello alone), then open
//! its window for the rest and reach [`Stage::Done`] mid-handshake. rustls (our destinations,
//! and Istio's ztunnel) sends the whole flight as one record; a test pins that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mesh_core::hbone::stream::SpliceObserver;
use mesh_core::identity::Identity;

/// Relays one client identity may hold in their inner handshake at once. A well-behaved
/// client's relay leaves this state within a round trip, so 64 allows bursts of new
/// connections while keeping one identity to a quarter of a destination's per-source
/// allowance (256).
pub const MAX_HANDSHAKES_PER_PEER: u32 = 64;

/// TLS record content type of encrypted records (TLS 1.3 `application_data`).
const ENCRYPTED: u8 = 23;
/// TLS record header: type, version (2), length (2).
const HEADER: usize = 5;

/// Record boundaries in one direction of a byte stream.
#[derive(Debug, Default)]
struct Records {
    header: [u8; HEADER],
    have: usize,
    body_left: usize,
}

impl Records {
    /// Feeds `data`; calls `complete` with the content type of every record whose last byte
    /// it contained.
    fn feed(&mut self, mut data: &[u8], mut complete: impl FnMut(u8)) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                if self.body_left == 0 {
                    complete(self.header[0]);
                }
                continue;
            }
            let n = (HEADER - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == HEADER {
                self.have = 0;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                if self.body_left == 0 {
                    complete(self.header[0]);
                }
            }
        }
    }
}

/// Where a relay's inner handshake stands, as far as its record framing shows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// No encrypted record from the destination yet.
    #[default]
    Hello,
    /// The destination sent its encrypted flight.
    ServerFlight,
    /// The client answered with an encrypted record.
    ClientFlight,
    /// The destination answered that: the handshake is over, one way or the other.
    Done,
}

/// Follows one relay's records in both directions.
#[derive(Debug, Default)]
pub struct Handshake {
    from_client: Records,
    from_server: Records,
    stage: Stage,
}

impl Handshake {
    /// Bytes the client sent towards the destination.
    pub fn client(&mut self, data: &[u8]) -> Stage {
        let stage = &mut self.stage;
        self.from_client.feed(data, |t| {
            if t == ENCRYPTED && *stage == Stage::ServerFlight {
                *stage = Stage::ClientFlight;
            }
        });
        self.stage
    }

    /// Bytes the destination sent towards the client.
    pub fn server(&mut self, data: &[u8]) -> Stage {
        let stage = &mut self.stage;
        self.from_server.feed(data, |t| match (*stage, t) {
            (Stage::Hello, ENCRYPTED) => *stage = Stage::ServerFlight,
            (Stage::ClientFlight, ENCRYPTED) => *stage = Stage::Done,
            _ => {}
        });
        self.stage
    }
}

/// Relays in handshake per client identity.
#[derive(Debug, Default)]
pub struct Handshakes {
    held: Mutex<HashMap<Identity, u32>>,
}

impl Handshakes {
    /// A slot for a new relay of `peer`, or `None` when it holds its maximum.
    pub fn take(self: &Arc<Self>, peer: &Identity) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(peer.clone()).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Slot {
            all: self.clone(),
            peer: peer.clone(),
        })
    }

    /// Relays of `peer` in handshake now (for tests and debugging).
    pub fn held(&self, peer: &Identity) -> u32 {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(peer).copied().unwrap_or(0)
    }
}

/// One relay's place in its client's count; given back on drop.
pub struct Slot {
    all: Arc<Handshakes>,
    peer: Identity,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.all.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

/// Watches a relay's splice and gives its slot back once the handshake is done. The TCP
/// side of the splice is the destination; the tunnel side is the client.
pub struct Watch {
    inner: Mutex<(Handshake, Option<Slot>)>,
    /// Set once the handshake is over: every later chunk of the relay passes with one load,
    /// no lock.
    done: AtomicBool,
}

impl Watch {
    pub fn new(slot: Slot) -> Self {
        Watch {
            inner: Mutex::new((Handshake::default(), Some(slot))),
            done: AtomicBool::new(false),
        }
    }

    fn observe(&self, data: &[u8], from_client: bool) {
        if self.done.load(Ordering::Acquire) {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (handshake, slot) = &mut *inner;
        if slot.is_none() {
            return;
        }
        let stage = if from_client {
            handshake.client(data)
        } else {
            handshake.server(data)
        };
        if stage == Stage::Done {
            *slot = None;
            self.done.store(true, Ordering::Release);
        }
    }
}

impl SpliceObserver for Watch {
    fn moved_to_tunnel(&self, chunk: &[u8]) {
        self.observe(chunk, false)
    }

    fn moved_from_tunnel(&self, chunk: &[u8]) {
        self.observe(chunk, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, len: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(0xAB, len));
        r
    }

    const HELLO: u8 = 22;
    const CCS: u8 = 20;

    /// Each step: who sends, the bytes, the stage after.
    fn run(steps: &[(bool, Vec<u8>, Stage)]) {
        let mut h = Handshake::default();
        for (i, (from_client, bytes, want)) in steps.iter().enumerate() {
            let got = if *from_client { h.client(bytes) } else { h.server(bytes) };
            assert_eq!(got, *want, "step {i}");
        }
    }

    #[test]
    fn a_full_handshake_is_done_after_the_servers_second_encrypted_output() {
        let server_flight = [record(HELLO, 90), record(CCS, 1), record(ENCRYPTED, 2000)].concat();
        run(&[
            (true, record(HELLO, 300), Stage::Hello),
            (false, server_flight, Stage::ServerFlight),
            (
                true,
                [record(CCS, 1), record(ENCRYPTED, 1500)].concat(),
                Stage::ClientFlight,
            ),
            (false, record(ENCRYPTED, 40), Stage::Done),
        ]);
    }

    #[test]
    fn hello_retry_and_split_records_are_followed() {
        let mut h = Handshake::default();
        assert_eq!(h.client(&record(HELLO, 200)), Stage::Hello);
        // HelloRetryRequest is a plaintext handshake record.
        assert_eq!(h.server(&record(HELLO, 80)), Stage::Hello);
        assert_eq!(h.client(&record(HELLO, 260)), Stage::Hello);
        // The server's flight arrives one byte at a time.
        let flight = [record(HELLO, 90), record(ENCRYPTED, 700)].concat();
        let (last, head) = flight.split_last().unwrap();
        for b in head {
            assert_eq!(h.server(std::slice::from_ref(b)), Stage::Hello);
        }
        assert_eq!(h.server(&[*last]), Stage::ServerFlight);
        assert_eq!(h.client(&record(ENCRYPTED, 1200)), Stage::ClientFlight);
        assert_eq!(h.server(&record(ENCRYPTED, 30)[..10]), Stage::ClientFlight, "partial");
    }

    #[test]
    fn stalling_clients_stay_in_handshake() {
        // Encrypted records sent before the server's flight (skippable as rejected early data)
        // do not count as the client's answer.
        run(&[
            (
                true,
                [record(HELLO, 300), record(ENCRYPTED, 500)].concat(),
                Stage::Hello,
            ),
            (false, record(ENCRYPTED, 2000), Stage::ServerFlight),
            (false, record(ENCRYPTED, 200), Stage::ServerFlight),
        ]);
        // A partial record after the server's flight is no answer either.
        run(&[
            (true, record(HELLO, 300), Stage::Hello),
            (false, record(ENCRYPTED, 2000), Stage::ServerFlight),
            (true, record(ENCRYPTED, 1000)[..600].to_vec(), Stage::ServerFlight),
        ]);
        // Nothing at all.
        run(&[(true, Vec::new(), Stage::Hello)]);
    }

    /// Content types of the complete records in `bytes`.
    fn types(bytes: &[u8]) -> Vec<u8> {
        let mut seen = Vec::new();
        Records::default().feed(bytes, |t| seen.push(t));
        seen
    }

    /// The record rule is sound only while the destination sends its encrypted flight as one
    /// record (see the module comment): true of rustls, which coalesces it. If an upgrade
    /// splits it, this fails, and the rule must be revisited before relying on it.
    #[tokio::test]
    async fn the_mesh_tls_server_sends_its_encrypted_flight_as_one_record() {
        use mesh_core::identity::{CertManager, CertManagerConfig, DevCa};
        let ca = DevCa::generate("cluster.local").unwrap();
        let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
        let server_id = Identity::new("cluster.local", "default", "server").unwrap();
        let client_id = Identity::new("cluster.local", "default", "client").unwrap();
        let server_cfg = mesh_core::tls::server_config(&certs.fetch(&server_id).await.unwrap()).unwrap();
        let client_cfg =
            mesh_core::tls::client_config(&certs.fetch(&client_id).await.unwrap(), vec![server_id]).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        let mut client = rustls::ClientConnection::new(client_cfg, mesh_core::tls::placeholder_server_name()).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        server.read_tls(&mut &hello[..]).unwrap();
        server.process_new_packets().unwrap();
        let mut flight = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut flight).unwrap();
        }
        let encrypted = types(&flight).into_iter().filter(|t| *t == ENCRYPTED).count();
        assert_eq!(encrypted, 1, "the server's first flight: {:?}", types(&flight));
    }

    #[test]
    fn slots_are_bounded_per_identity_and_given_back() {
        let all = Arc::new(Handshakes::default());
        let a = Identity::new("cluster.local", "ns", "a").unwrap();
        let b = Identity::new("cluster.local", "ns", "b").unwrap();
        let held: Vec<Slot> = (0..MAX_HANDSHAKES_PER_PEER).map(|_| all.take(&a).unwrap()).collect();
        assert!(all.take(&a).is_none());
        assert!(all.take(&b).is_some(), "another identity has its own allowance");
        drop(held);
        assert_eq!(all.held(&a), 0);
        // A watched relay gives its slot back once done.
        let watch = Watch::new(all.take(&a).unwrap());
        assert_eq!(all.held(&a), 1);
        watch.moved_from_tunnel(&record(HELLO, 300));
        watch.moved_to_tunnel(&record(ENCRYPTED, 2000));
        watch.moved_from_tunnel(&record(ENCRYPTED, 1500));
        assert_eq!(all.held(&a), 1);
        watch.moved_to_tunnel(&record(ENCRYPTED, 40));
        assert_eq!(all.held(&a), 0);
    }
}
