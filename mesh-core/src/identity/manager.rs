//! The certificate manager: fetches a certificate per identity on first use, caches it, renews
//! it at half-life with exponential backoff, keeps serving the old one while renewal fails and
//! it is still valid, and never hands out an expired certificate.
//!
//! Timing runs on tokio's clock (delays are computed as a `Duration` from now and slept with
//! `tokio::time`), so tests drive it with a paused clock. Validity itself is X.509 wall-clock
//! time, read through [`WallClock`] so those tests can move it in step with tokio's clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::{info, warn};

use super::ca::{new_csr, CaError, CertificateSigner};
use super::cert::{CertError, WorkloadCertificate};
use super::spiffe::Identity;

/// Why no usable certificate could be returned.
#[derive(Debug, thiserror::Error, Clone)]
pub enum FetchError {
    #[error("no valid certificate for {identity}: {reason}")]
    Unavailable { identity: String, reason: String },
    #[error("timed out after {0:?} waiting for a certificate for {1}")]
    Timeout(Duration, String),
}

/// What the manager currently holds for one identity.
#[derive(Clone, Debug)]
pub enum CertState {
    Pending,
    Ready(Arc<WorkloadCertificate>),
    /// The last attempt failed and no valid certificate is held.
    Failed(Arc<str>),
}

/// Tuning for the manager.
#[derive(Clone, Debug)]
pub struct CertManagerConfig {
    /// Lifetime asked of the CA.
    pub validity: Duration,
    /// First retry delay after a failed request; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long `fetch` waits for a first certificate.
    pub fetch_timeout: Duration,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        CertManagerConfig {
            validity: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}

/// The wall clock a certificate's validity is judged against (X.509 times are wall-clock).
pub trait WallClock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock, used outside tests.
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

struct Entry {
    state: watch::Receiver<CertState>,
    worker: tokio::task::AbortHandle,
}

/// Per-identity certificates, fetched on demand and kept fresh in the background.
pub struct CertManager {
    signer: Arc<dyn CertificateSigner>,
    roots: Vec<CertificateDer<'static>>,
    config: CertManagerConfig,
    clock: Arc<dyn WallClock>,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl CertManager {
    /// `roots` is the configured trust bundle, used when the CA's response carries no root;
    /// otherwise the roots the CA sends with each certificate are trusted (so a proxy learns
    /// roots added or retired during a rotation with its next certificate).
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        roots: Vec<CertificateDer<'static>>,
        config: CertManagerConfig,
    ) -> Arc<Self> {
        Self::with_clock(signer, roots, config, Arc::new(SystemClock))
    }

    /// As [`CertManager::new`], judging validity by `clock` (tests pass one that follows
    /// tokio's paused clock).
    pub fn with_clock(
        signer: Arc<dyn CertificateSigner>,
        roots: Vec<CertificateDer<'static>>,
        config: CertManagerConfig,
        clock: Arc<dyn WallClock>,
    ) -> Arc<Self> {
        Arc::new(CertManager {
            signer,
            roots,
            config,
            clock,
            entries: Mutex::new(HashMap::new()),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still sound.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A valid certificate for `identity`, requesting one if none is held yet.
    pub async fn fetch(self: &Arc<Self>, identity: &Identity) -> Result<Arc<WorkloadCertificate>, FetchError> {
        let mut rx = self.subscribe(identity);
        let wait = async {
            loop {
                let state = rx.borrow_and_update().clone();
                match state {
                    CertState::Ready(c) if c.is_valid_at(self.clock.now()) => return Ok(c),
                    CertState::Failed(reason) => {
                        return Err(FetchError::Unavailable {
                            identity: identity.to_string(),
                            reason: reason.to_string(),
                        })
                    }
                    CertState::Ready(_) | CertState::Pending => {}
                }
                if rx.changed().await.is_err() {
                    return Err(FetchError::Unavailable {
                        identity: identity.to_string(),
                        reason: "certificate worker stopped".into(),
                    });
                }
            }
        };
        tokio::time::timeout(self.config.fetch_timeout, wait)
            .await
            .map_err(|_| FetchError::Timeout(self.config.fetch_timeout, identity.to_string()))?
    }

    /// The held certificate if it is valid now, without waiting.
    pub fn get_ready(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let state = self.entries().get(identity)?.state.borrow().clone();
        match state {
            CertState::Ready(c) if c.is_valid_at(self.clock.now()) => Some(c),
            _ => None,
        }
    }

    fn subscribe(self: &Arc<Self>, identity: &Identity) -> watch::Receiver<CertState> {
        let mut entries = self.entries();
        if let Some(e) = entries.get(identity) {
            return e.state.clone();
        }
        let (tx, rx) = watch::channel(CertState::Pending);
        let worker = tokio::spawn(Arc::clone(self).keep_fresh(identity.clone(), tx)).abort_handle();
        entries.insert(
            identity.clone(),
            Entry {
                state: rx.clone(),
                worker,
            },
        );
        rx
    }

    /// Stops renewing `identity` (its last workload left) and drops the certificate.
    pub fn forget(&self, identity: &Identity) {
        if let Some(e) = self.entries().remove(identity) {
            e.worker.abort();
        }
    }

    /// Every identity and its state, for `/config_dump`.
    pub fn snapshot(&self) -> Vec<(Identity, CertState)> {
        let mut out: Vec<_> = self
            .entries()
            .iter()
            .map(|(id, e)| (id.clone(), e.state.borrow().clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    async fn request(&self, identity: &Identity) -> Result<WorkloadCertificate, String> {
        let (key, csr) = new_csr(identity).map_err(|e| e.to_string())?;
        let chain = self
            .signer
            .sign(identity, csr, self.config.validity)
            .await
            .map_err(|e: CaError| e.to_string())?;
        WorkloadCertificate::from_ca_response(identity, key.serialize_der(), &chain, &self.roots)
            .map_err(|e: CertError| format!("CA response unusable: {e}"))
    }

    async fn keep_fresh(self: Arc<Self>, identity: Identity, tx: watch::Sender<CertState>) {
        let mut backoff = self.config.initial_backoff;
        loop {
            let delay = match self.request(&identity).await {
                Ok(cert) => {
                    let now = self.clock.now();
                    let expires_in = cert.not_after.duration_since(now).unwrap_or_default();
                    info!(identity = %identity, expires_in_s = expires_in.as_secs(), "certificate issued");
                    // Renew at half-life: a wall-clock instant turned into a delay from now.
                    let refresh_in = cert.refresh_at().duration_since(now).unwrap_or_default();
                    tx.send_replace(CertState::Ready(Arc::new(cert)));
                    backoff = self.config.initial_backoff;
                    refresh_in
                }
                Err(reason) => {
                    let delay = self.after_failure(&identity, &tx, reason, backoff);
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    delay
                }
            };
            tokio::time::sleep_until(tokio::time::Instant::now() + delay).await;
        }
    }

    /// Publishes a failed request unless a still-valid certificate is held, and returns how
    /// long to wait before the next attempt.
    fn after_failure(
        &self,
        identity: &Identity,
        tx: &watch::Sender<CertState>,
        reason: String,
        backoff: Duration,
    ) -> Duration {
        let now = self.clock.now();
        let held = match &*tx.borrow() {
            CertState::Ready(c) if c.is_valid_at(now) => Some(c.not_after),
            _ => None,
        };
        match held {
            Some(not_after) => {
                warn!(identity = %identity, %reason, ?backoff, "certificate renewal failed; still serving the current certificate");
                // Retry before the held certificate runs out.
                backoff.min(not_after.duration_since(now).unwrap_or_default())
            }
            None => {
                warn!(identity = %identity, %reason, ?backoff, "certificate request failed");
                tx.send_replace(CertState::Failed(reason.into()));
                backoff
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! All timing here runs on tokio's paused clock: the runtime jumps to the next timer when
    //! every task is idle, and [`TokioWallClock`] moves the certificates' wall clock with it.
    use std::sync::atomic::{AtomicBool, Ordering};

    use time::OffsetDateTime;
    use tokio::time::Instant;

    use super::*;
    use crate::identity::ca::BoxFuture;
    use crate::identity::DevCa;

    /// Wall-clock time that advances with tokio's (paused) clock.
    struct TokioWallClock {
        wall: SystemTime,
        start: Instant,
    }

    impl WallClock for TokioWallClock {
        fn now(&self) -> SystemTime {
            self.wall + self.start.elapsed()
        }
    }

    /// A development CA that issues by the test's wall clock, can be switched to failing, and
    /// records when (on tokio's clock) each request came.
    struct Flaky {
        ca: DevCa,
        clock: Arc<TokioWallClock>,
        fail: AtomicBool,
        calls: Mutex<Vec<Instant>>,
    }

    impl Flaky {
        fn calls(&self) -> Vec<Instant> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl CertificateSigner for Flaky {
        fn sign<'a>(
            &'a self,
            identity: &'a Identity,
            csr: String,
            validity: Duration,
        ) -> BoxFuture<'a, Result<Vec<String>, CaError>> {
            self.calls.lock().unwrap().push(Instant::now());
            if self.fail.load(Ordering::SeqCst) {
                return Box::pin(async { Err(CaError::Transport("CA down".into())) });
            }
            let now = OffsetDateTime::from(self.clock.now());
            let issued = self.ca.issue_at(identity, &csr, now, now + validity);
            let root = self.ca.root_pem().to_string();
            Box::pin(async move { Ok(vec![issued?, root]) })
        }
    }

    const VALIDITY: Duration = Duration::from_secs(3600);
    const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
    const MAX_BACKOFF: Duration = Duration::from_secs(16);

    fn setup() -> (Arc<Flaky>, Arc<CertManager>) {
        let clock = Arc::new(TokioWallClock {
            wall: SystemTime::now(),
            start: Instant::now(),
        });
        let flaky = Arc::new(Flaky {
            ca: DevCa::generate("cluster.local").unwrap(),
            clock: clock.clone(),
            fail: AtomicBool::new(false),
            calls: Mutex::new(Vec::new()),
        });
        let cfg = CertManagerConfig {
            validity: VALIDITY,
            initial_backoff: INITIAL_BACKOFF,
            max_backoff: MAX_BACKOFF,
            fetch_timeout: Duration::from_secs(5),
        };
        let mgr = CertManager::with_clock(flaky.clone(), vec![], cfg, clock);
        (flaky, mgr)
    }

    fn id() -> Identity {
        Identity::new("cluster.local", "default", "app").unwrap()
    }

    /// Sleeps on tokio's clock until the wall-clock instant `at`.
    async fn sleep_until_wall(mgr: &CertManager, at: SystemTime) {
        tokio::time::sleep(at.duration_since(mgr.clock.now()).unwrap_or_default()).await;
    }

    fn gaps(calls: &[Instant]) -> Vec<Duration> {
        calls.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn fetches_once_and_caches() {
        let (flaky, mgr) = setup();
        let a = mgr.fetch(&id()).await.unwrap();
        let b = mgr.fetch(&id()).await.unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(flaky.calls().len(), 1);
        assert_eq!(a.identity, id());
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life() {
        let (flaky, mgr) = setup();
        let first = mgr.fetch(&id()).await.unwrap();
        // Just before half-life nothing has been asked again.
        sleep_until_wall(&mgr, first.refresh_at() - Duration::from_secs(1)).await;
        assert_eq!(flaky.calls().len(), 1);
        assert!(Arc::ptr_eq(&first, &mgr.fetch(&id()).await.unwrap()));
        // Just after it, the renewed certificate is served while the first is still valid.
        sleep_until_wall(&mgr, first.refresh_at() + Duration::from_secs(1)).await;
        let calls = flaky.calls();
        assert_eq!(calls.len(), 2);
        // X.509 times have whole seconds: the renewal came at half-life to within one.
        let half_life = calls[1] - calls[0];
        assert!(
            half_life.abs_diff(VALIDITY / 2) <= Duration::from_secs(1),
            "renewed after {half_life:?}"
        );
        let renewed = mgr.fetch(&id()).await.unwrap();
        assert!(renewed.not_after > first.not_after);
        assert!(first.is_valid_at(mgr.clock.now()));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_requests_back_off_exponentially_up_to_the_cap() {
        let (flaky, mgr) = setup();
        flaky.fail.store(true, Ordering::SeqCst);
        let err = mgr.fetch(&id()).await.unwrap_err();
        assert!(matches!(err, FetchError::Unavailable { .. }), "{err:?}");
        tokio::time::sleep(Duration::from_secs(70)).await;
        let secs: Vec<u64> = gaps(&flaky.calls()).iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 16, 16]);
        // Success resets the backoff: the next failures start again from the first delay.
        flaky.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(MAX_BACKOFF).await;
        let cert = mgr.fetch(&id()).await.unwrap();
        flaky.fail.store(true, Ordering::SeqCst);
        sleep_until_wall(&mgr, cert.refresh_at() + Duration::from_secs(5)).await;
        let calls = flaky.calls();
        let secs: Vec<u64> = gaps(&calls[calls.len() - 3..]).iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_valid_certificate_while_renewal_fails_then_refuses_expired() {
        let (flaky, mgr) = setup();
        let first = mgr.fetch(&id()).await.unwrap();
        flaky.fail.store(true, Ordering::SeqCst);
        // Past half-life renewal fails, but the valid certificate is still served.
        sleep_until_wall(&mgr, first.refresh_at() + Duration::from_secs(60)).await;
        assert!(flaky.calls().len() > 2, "renewal was attempted and retried");
        assert!(Arc::ptr_eq(&first, &mgr.fetch(&id()).await.unwrap()));
        assert!(mgr.get_ready(&id()).is_some());
        // One second before expiry it is still served.
        sleep_until_wall(&mgr, first.not_after - Duration::from_secs(1)).await;
        assert!(Arc::ptr_eq(&first, &mgr.fetch(&id()).await.unwrap()));
        // From expiry on, nothing is served.
        sleep_until_wall(&mgr, first.not_after).await;
        let err = mgr.fetch(&id()).await.unwrap_err();
        assert!(matches!(err, FetchError::Unavailable { .. }), "{err:?}");
        assert!(mgr.get_ready(&id()).is_none());
        // The CA comes back: a fresh certificate follows within one backoff.
        flaky.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(MAX_BACKOFF + Duration::from_secs(1)).await;
        let fresh = mgr.fetch(&id()).await.unwrap();
        assert!(fresh.not_after > first.not_after);
    }

    #[tokio::test(start_paused = true)]
    async fn never_serves_an_expired_certificate_even_before_the_worker_notices() {
        let (_, mgr) = setup();
        let first = mgr.fetch(&id()).await.unwrap();
        // The worker sleeps until half-life; judged from outside at expiry the held
        // certificate must not be handed out, whatever the worker's state.
        let clock = TokioWallClock {
            wall: first.not_after,
            start: Instant::now(),
        };
        let late = CertManager::with_clock(mgr.signer.clone(), vec![], mgr.config.clone(), Arc::new(clock));
        // A worker that holds the channel open but never publishes again.
        let (_tx, state) = watch::channel(CertState::Ready(first));
        late.entries().insert(
            id(),
            Entry {
                state,
                worker: tokio::spawn(async {}).abort_handle(),
            },
        );
        assert!(late.get_ready(&id()).is_none());
        let err = late.fetch(&id()).await.unwrap_err();
        assert!(matches!(err, FetchError::Timeout(..)), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn forget_stops_renewal_and_drops_the_certificate() {
        let (flaky, mgr) = setup();
        let first = mgr.fetch(&id()).await.unwrap();
        mgr.forget(&id());
        assert!(mgr.snapshot().is_empty());
        assert!(mgr.get_ready(&id()).is_none());
        // Past the half-life no renewal happens for a forgotten identity.
        sleep_until_wall(&mgr, first.refresh_at() + Duration::from_secs(60)).await;
        assert_eq!(flaky.calls().len(), 1);
    }
}
