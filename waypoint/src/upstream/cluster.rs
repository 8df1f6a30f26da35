//! One backend cluster (a service, or a DestinationRule subset of it): its connection-pool
//! limits (circuit breaking: requests beyond them get a prompt 503, never a queue without
//! bound), outlier detection (endpoints answering 5xx in a row are ejected for a while) and
//! the load-balancing choice among the endpoints left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::state::model::Workload;
use mesh_proto::waypoint as wp;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
// Ejection times run on tokio's clock, so tests can pause it.
use tokio::time::Instant;

/// A request refused by a connection-pool limit (Envoy's `UO` flag).
#[derive(Debug, thiserror::Error)]
#[error("upstream overflow: {0}")]
pub struct Overflow(pub &'static str);

#[derive(Debug, Default)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
    active: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Balance {
    RoundRobin,
    LeastRequest,
    Random,
}

pub struct Cluster {
    pub policy: wp::TrafficPolicy,
    connections: Option<Arc<Semaphore>>,
    max_pending: usize,
    max_requests: usize,
    max_retries: usize,
    pending: AtomicUsize,
    requests: AtomicUsize,
    retries: AtomicUsize,
    rr: AtomicUsize,
    /// `maxRequestsPerConnection` (0: unlimited) and the requests sent so far.
    per_connection: usize,
    sent: AtomicUsize,
    balance: Balance,
    endpoints: Mutex<HashMap<String, EndpointState>>,
    /// Its own connection pools when it originates TLS.
    pub tls: Option<super::TlsPools>,
}

/// Held while a request is admitted; releases its slot on drop.
pub struct Admission {
    cluster: Arc<Cluster>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.cluster.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held while a retry is in flight (`maxRetries` bounds concurrent retries per cluster).
pub struct RetryBudget(Arc<Cluster>);

impl Drop for RetryBudget {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The state of endpoint `uid`; the key is allocated only the first time.
fn endpoint_state<'a>(eps: &'a mut HashMap<String, EndpointState>, uid: &str) -> &'a mut EndpointState {
    if !eps.contains_key(uid) {
        eps.insert(uid.to_owned(), EndpointState::default());
    }
    // Inserted just above when missing (the entry API would allocate the key on every lookup).
    #[allow(clippy::expect_used)]
    eps.get_mut(uid).expect("endpoint state present")
}

fn limit(v: u32) -> usize {
    if v == 0 {
        usize::MAX
    } else {
        v as usize
    }
}

/// Istio's default `connectionPool.tcp.idleTimeout` (Envoy's TCP proxy default).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// `d`, or `default` when absent or negative.
fn duration(d: Option<&prost_types::Duration>, default: Duration) -> Duration {
    d.and_then(|d| Duration::try_from(*d).ok()).unwrap_or(default)
}

impl Cluster {
    pub fn new(policy: wp::TrafficPolicy) -> Arc<Self> {
        Self::with_tls(policy, None)
    }

    /// A cluster whose requests go through `tls`'s pools (TLS origination).
    pub fn with_tls(policy: wp::TrafficPolicy, tls: Option<super::TlsPools>) -> Arc<Self> {
        let pool = policy.connection_pool.unwrap_or_default();
        let balance = match policy.load_balancer.as_ref().map(|l| l.simple.as_str()) {
            Some("LEAST_REQUEST") => Balance::LeastRequest,
            Some("RANDOM") => Balance::Random,
            _ => Balance::RoundRobin,
        };
        Arc::new(Cluster {
            connections: (pool.max_connections > 0).then(|| Arc::new(Semaphore::new(pool.max_connections as usize))),
            max_pending: limit(pool.max_pending_requests),
            max_requests: limit(pool.max_requests),
            max_retries: limit(pool.max_retries),
            pending: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            rr: AtomicUsize::new(0),
            per_connection: pool.max_requests_per_connection as usize,
            sent: AtomicUsize::new(0),
            balance,
            endpoints: Mutex::new(HashMap::new()),
            tls,
            policy,
        })
    }

    /// How long a TCP connection to this cluster may move no byte either way before it is
    /// closed: `connectionPool.tcp.idleTimeout`, [`TCP_IDLE_TIMEOUT`] when unset, `None`
    /// (never) when set to zero, as Istio reads it.
    pub fn tcp_idle_timeout(&self) -> Option<Duration> {
        let pool = self.policy.connection_pool.as_ref();
        let d = duration(pool.and_then(|p| p.tcp_idle_timeout.as_ref()), TCP_IDLE_TIMEOUT);
        (!d.is_zero()).then_some(d)
    }

    pub fn connect_timeout(&self) -> Duration {
        let pool = self.policy.connection_pool.as_ref();
        duration(pool.and_then(|p| p.connect_timeout.as_ref()), Duration::from_secs(10))
    }

    /// Admits a request or refuses it at once when a limit is full. With `maxConnections`
    /// reached a request waits for a connection only while fewer than
    /// `http1MaxPendingRequests` already wait.
    pub async fn admit(self: &Arc<Self>) -> Result<Admission, Overflow> {
        if self.requests.fetch_add(1, Ordering::AcqRel) >= self.max_requests {
            self.requests.fetch_sub(1, Ordering::AcqRel);
            return Err(Overflow("http2MaxRequests reached"));
        }
        let admission = |permit| Admission {
            cluster: self.clone(),
            _connection: permit,
        };
        let Some(sem) = &self.connections else {
            return Ok(admission(None));
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(admission(Some(p)));
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.requests.fetch_sub(1, Ordering::AcqRel);
            return Err(Overflow("http1MaxPendingRequests reached"));
        }
        let permit = sem.clone().acquire_owned().await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        match permit {
            Ok(p) => Ok(admission(Some(p))),
            Err(_) => {
                self.requests.fetch_sub(1, Ordering::AcqRel);
                Err(Overflow("cluster closed"))
            }
        }
    }

    /// Requests admitted and not yet finished.
    #[cfg(test)]
    pub(crate) fn requests_in_flight(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }

    /// Whether the HTTP/1.1 request about to go out should close its connection after the
    /// answer (`maxRequestsPerConnection`). Counted per cluster rather than per pooled
    /// connection, so it is exact with one connection (or a limit of 1) and approximate
    /// otherwise: connections serve about that many requests each.
    pub fn close_after_this(&self) -> bool {
        self.per_connection > 0 && (self.sent.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(self.per_connection)
    }

    /// A slot for one retry, or `None` when `maxRetries` retries are already in flight.
    pub fn retry_budget(self: &Arc<Self>) -> Option<RetryBudget> {
        if self.retries.fetch_add(1, Ordering::AcqRel) >= self.max_retries {
            self.retries.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RetryBudget(self.clone()))
    }

    /// Chooses among `candidates`, skipping ejected endpoints unless too many are ejected
    /// (`maxEjectionPercent`, at least one) or too few are healthy (`minHealthPercent`).
    pub fn pick(&self, candidates: &[Arc<Workload>]) -> Option<Arc<Workload>> {
        if candidates.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let od = self.policy.outlier_detection.as_ref();
        let chosen = {
            let is_ejected = |w: &Workload| {
                eps.get(&w.uid)
                    .and_then(|s| s.ejected_until)
                    .is_some_and(|until| until > now)
            };
            let n = candidates.len();
            let n_ejected = candidates.iter().filter(|w| is_ejected(w)).count();
            let max_percent = od.map(|o| o.max_ejection_percent).filter(|p| *p > 0).unwrap_or(10) as usize;
            let allowed = (n * max_percent / 100).max(1);
            let healthy_percent = (n - n_ejected) * 100 / n;
            let min_health = od.map(|o| o.min_health_percent).unwrap_or(0) as usize;
            let skip_ejected = n_ejected > 0 && n_ejected <= allowed && healthy_percent >= min_health && n_ejected < n;
            // The k-th usable endpoint, without collecting them (the common case skips nothing).
            let usable = if skip_ejected { n - n_ejected } else { n };
            let nth = |k: usize| -> &Arc<Workload> {
                if skip_ejected {
                    candidates
                        .iter()
                        .filter(|w| !is_ejected(w))
                        .nth(k)
                        .unwrap_or(&candidates[0])
                } else {
                    &candidates[k]
                }
            };
            match self.balance {
                Balance::RoundRobin => nth(self.rr.fetch_add(1, Ordering::Relaxed) % usable),
                Balance::Random => nth(rand::thread_rng().gen_range(0..usable)),
                Balance::LeastRequest => {
                    // Power of two choices.
                    let mut rng = rand::thread_rng();
                    let a = nth(rng.gen_range(0..usable));
                    let b = nth(rng.gen_range(0..usable));
                    let active = |w: &Workload| eps.get(&w.uid).map_or(0, |s| s.active);
                    if active(b) < active(a) {
                        b
                    } else {
                        a
                    }
                }
            }
            .clone()
        };
        endpoint_state(&mut eps, &chosen.uid).active += 1;
        Some(chosen)
    }

    /// Records an attempt's outcome: `None` when no response came (connect failure, reset).
    /// Returns true when this outcome ejected the endpoint.
    pub fn record(&self, uid: &str, status: Option<http::StatusCode>) -> bool {
        let mut eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let s = endpoint_state(&mut eps, uid);
        s.active = s.active.saturating_sub(1);
        let Some(od) = self.policy.outlier_detection.as_ref() else {
            return false;
        };
        let code = status.map(|s| s.as_u16());
        let server_error = code.is_none_or(|c| c >= 500);
        let gateway_error = code.is_none_or(|c| matches!(c, 502..=504));
        if !server_error {
            s.consecutive_5xx = 0;
            s.consecutive_gateway = 0;
            return false;
        }
        s.consecutive_5xx += 1;
        if gateway_error {
            s.consecutive_gateway += 1;
        }
        let trip = (od.consecutive_5xx_errors > 0 && s.consecutive_5xx >= od.consecutive_5xx_errors)
            || (od.consecutive_gateway_errors > 0 && s.consecutive_gateway >= od.consecutive_gateway_errors);
        if !trip {
            return false;
        }
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        s.ejections += 1;
        let base = duration(od.base_ejection_time.as_ref(), Duration::from_secs(30));
        s.ejected_until = Some(Instant::now() + base * s.ejections.min(10));
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A healthy HBONE workload named `uid` (shared with other modules' tests).
    pub(crate) fn workload(uid: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses: vec![],
            network: String::new(),
            tunnel: mesh_core::state::model::Tunnel::Hbone,
            identity: "spiffe://td/ns/ns/sa/x".parse().unwrap(),
            waypoint: None,
            node: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_name: String::new(),
            services: vec![],
            authorization_policies: vec![],
            healthy: true,
            cluster_id: String::new(),
        })
    }

    #[tokio::test]
    async fn pending_limit_overflows_at_once() {
        let c = Cluster::new(wp::TrafficPolicy {
            connection_pool: Some(wp::ConnectionPool {
                max_connections: 1,
                max_pending_requests: 1,
                ..Default::default()
            }),
            ..Default::default()
        });
        let first = c.admit().await.unwrap();
        let c2 = c.clone();
        let waiting = tokio::spawn(async move { c2.admit().await.map(|_| ()) });
        while c.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(c.admit().await.is_err(), "third request must overflow");
        drop(first);
        waiting.await.unwrap().unwrap();
    }

    #[test]
    fn max_requests_per_connection_closes_every_nth() {
        let c = Cluster::new(wp::TrafficPolicy {
            connection_pool: Some(wp::ConnectionPool {
                max_requests_per_connection: 3,
                ..Default::default()
            }),
            ..Default::default()
        });
        let closes: Vec<bool> = (0..6).map(|_| c.close_after_this()).collect();
        assert_eq!(closes, [false, false, true, false, false, true]);
        assert!(!Cluster::new(wp::TrafficPolicy::default()).close_after_this());
    }

    #[test]
    fn the_tcp_idle_timeout_is_an_hour_unless_set_and_zero_means_never() {
        let with = |d: Option<(i64, i32)>| {
            Cluster::new(wp::TrafficPolicy {
                connection_pool: Some(wp::ConnectionPool {
                    tcp_idle_timeout: d.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .tcp_idle_timeout()
        };
        let cases = [
            (None, Some(TCP_IDLE_TIMEOUT)),
            (Some((30, 0)), Some(Duration::from_secs(30))),
            (Some((0, 500_000_000)), Some(Duration::from_millis(500))),
            (Some((0, 0)), None),
            // Not durations: the default, never a silent "off".
            (Some((-5, 0)), Some(TCP_IDLE_TIMEOUT)),
            (Some((-1, 500_000_000)), Some(TCP_IDLE_TIMEOUT)),
            // Nanoseconds beyond a second carry over, as protobuf normalizes them.
            (Some((1, 2_000_000_000)), Some(Duration::from_secs(3))),
        ];
        for (set, want) in cases {
            assert_eq!(with(set), want, "{set:?}");
        }
        assert_eq!(
            Cluster::new(wp::TrafficPolicy::default()).tcp_idle_timeout(),
            Some(TCP_IDLE_TIMEOUT)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_until_the_ejection_time_passes() {
        let c = Cluster::new(wp::TrafficPolicy {
            outlier_detection: Some(wp::OutlierDetection {
                consecutive_5xx_errors: 2,
                base_ejection_time: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 50_000_000,
                }),
                max_ejection_percent: 100,
                ..Default::default()
            }),
            ..Default::default()
        });
        let (a, b) = (workload("a"), workload("b"));
        let both = [a.clone(), b.clone()];
        assert!(!c.record("a", Some(http::StatusCode::SERVICE_UNAVAILABLE)));
        assert!(c.record("a", Some(http::StatusCode::INTERNAL_SERVER_ERROR)));
        for _ in 0..10 {
            let w = c.pick(&both).unwrap();
            assert_eq!(w.uid, "b");
            c.record(&w.uid, Some(http::StatusCode::OK));
        }
        tokio::time::advance(Duration::from_millis(49)).await;
        assert!((0..4).all(|_| c.pick(&both).unwrap().uid == "b"), "still ejected");
        tokio::time::advance(Duration::from_millis(1)).await;
        let picked: Vec<String> = (0..4).map(|_| c.pick(&both).unwrap().uid.clone()).collect();
        assert!(picked.iter().any(|u| u == "a"), "{picked:?}");
    }
}
