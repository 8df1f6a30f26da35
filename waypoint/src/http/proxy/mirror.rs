//! Request mirrors (a route's `RequestMirror` filters, Envoy's shadow traffic), bounded.
//! Nothing waits for a mirror, so nothing else would bound one: a route with several mirrors
//! to a backend that never answers left a task, a copy of the body and an upstream connection
//! behind for every request, until the process ran out of memory. Now each mirror takes one
//! of [`MAX_MIRRORS_IN_FLIGHT`] slots shared by the whole process (none free: the mirror is
//! dropped, as Envoy drops shadow traffic rather than queue it), is admitted by its cluster's
//! connection-pool limits as any request is, and has the route's timeout
//! ([`MIRROR_TIMEOUT`] when the route sets none) for its whole exchange, answer body
//! included. Every mirror dropped is counted by reason.

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics::{MirrorDrop, MirrorDrops};
use crate::upstream::cluster::Cluster;

/// Mirrors in flight at once, in the whole process.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 1024;

/// How long a mirror may take when its route sets no timeout.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

/// The slots mirrors take while in flight.
pub struct Mirrors {
    slots: Arc<Semaphore>,
    #[cfg(test)]
    cap: usize,
}

static SHARED: LazyLock<Mirrors> = LazyLock::new(|| Mirrors::new(MAX_MIRRORS_IN_FLIGHT));

/// One mirror's slot, given back when its task ends.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Mirrors {
    /// The process's mirrors.
    pub fn shared() -> &'static Mirrors {
        &SHARED
    }

    fn new(cap: usize) -> Mirrors {
        Mirrors {
            slots: Arc::new(Semaphore::new(cap)),
            #[cfg(test)]
            cap,
        }
    }

    /// The slots taken now.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.cap - self.slots.available_permits()
    }

    /// A slot for one mirror, or `None` (counted) when all are taken. Taken before the mirror's
    /// request is built, so a dropped mirror costs no copy.
    pub fn slot(&self, drops: &MirrorDrops) -> Option<Slot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(Slot { _permit: permit }),
            Err(_) => {
                drops.count(MirrorDrop::Overflow);
                None
            }
        }
    }
}

impl Slot {
    /// Runs `exchange` (send the mirror, read its answer) as a task holding this slot, once
    /// `cluster` admits it; waiting for admission and the exchange together end at `timeout`.
    pub fn spawn<F>(self, cluster: Arc<Cluster>, timeout: Duration, drops: MirrorDrops, exchange: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(async move {
            let _slot = self;
            let admitted = async {
                let Ok(_admission) = cluster.admit().await else {
                    return Err(MirrorDrop::CircuitOpen);
                };
                exchange.await;
                Ok(())
            };
            match tokio::time::timeout(timeout, admitted).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => drops.count(reason),
                Err(_) => drops.count(MirrorDrop::Timeout),
            }
        });
    }
}

/// The `Host` a mirror is sent: Envoy's convention, the host with `-shadow` before its port
/// (`api:8080` -> `api-shadow:8080`, `[::1]:80` -> `[::1]-shadow:80`). The request's host is
/// canonical already; one that does not parse is left as it is.
pub fn shadow_host(host: &str) -> String {
    match super::super::authority::canonical(host) {
        Ok(h) => match h.port() {
            Some(port) => format!("{}-shadow:{port}", h.host()),
            None => format!("{}-shadow", h.host()),
        },
        Err(_) => host.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::waypoint as wp;

    use super::*;

    const CAP: usize = 4;

    /// Sends `n` mirrors to a backend that never answers.
    fn flood(mirrors: &Mirrors, cluster: &Arc<Cluster>, drops: &MirrorDrops, n: usize) {
        for _ in 0..n {
            if let Some(slot) = mirrors.slot(drops) {
                slot.spawn(cluster.clone(), MIRROR_TIMEOUT, drops.clone(), std::future::pending());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn mirrors_to_a_silent_backend_are_bounded_and_time_out() {
        let (mirrors, drops) = (Mirrors::new(CAP), MirrorDrops::default());
        let cluster = Cluster::new(wp::TrafficPolicy::default());
        flood(&mirrors, &cluster, &drops, 3 * CAP);
        tokio::task::yield_now().await;
        assert_eq!(mirrors.in_flight(), CAP, "mirrors beyond the bound were kept");
        assert_eq!(drops.get(MirrorDrop::Overflow), 2 * CAP as u64);
        // Just before the timeout every slot is still held; just after, all are free again.
        tokio::time::sleep(MIRROR_TIMEOUT - Duration::from_millis(1)).await;
        assert_eq!(mirrors.in_flight(), CAP);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(mirrors.in_flight(), 0, "a mirror past its timeout kept its slot");
        assert_eq!(drops.get(MirrorDrop::Timeout), CAP as u64);
        // The cluster's request slots went with them.
        assert!(cluster.admit().await.is_ok());
        flood(&mirrors, &cluster, &drops, 1);
        tokio::task::yield_now().await;
        assert_eq!(mirrors.in_flight(), 1, "freed slots are taken again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_mirror_its_cluster_refuses_is_dropped_and_frees_its_slot() {
        let (mirrors, drops) = (Mirrors::new(CAP), MirrorDrops::default());
        let pool = wp::ConnectionPool {
            max_requests: 1,
            ..Default::default()
        };
        let cluster = Cluster::new(wp::TrafficPolicy {
            connection_pool: Some(pool),
            ..Default::default()
        });
        let _primary = cluster.admit().await.expect("the first request is admitted");
        flood(&mirrors, &cluster, &drops, 2);
        tokio::task::yield_now().await;
        assert_eq!(drops.get(MirrorDrop::CircuitOpen), 2);
        assert_eq!(mirrors.in_flight(), 0);
    }

    #[test]
    fn the_shadow_host_keeps_the_port_and_ipv6_brackets() {
        for (host, want) in [
            ("api.shop.svc", "api.shop.svc-shadow"),
            ("api.shop.svc:8080", "api.shop.svc-shadow:8080"),
            ("10.0.0.1:80", "10.0.0.1-shadow:80"),
            ("[::1]", "[::1]-shadow"),
            ("[2001:db8::7]:8080", "[2001:db8::7]-shadow:8080"),
        ] {
            assert_eq!(super::shadow_host(host), want, "{host}");
        }
    }
}
