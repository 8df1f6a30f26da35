//! The certificate manager: fetches a certificate per identity on first use, caches it, renews
//! it at half-life with exponential backoff, keeps serving the old one while renewal fails and
//! it is still valid, and never hands out an expired certificate.

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

struct Entry {
    state: watch::Receiver<CertState>,
    worker: tokio::task::AbortHandle,
}

/// Per-identity certificates, fetched on demand and kept fresh in the background.
pub struct CertManager {
    signer: Arc<dyn CertificateSigner>,
    roots: Vec<CertificateDer<'static>>,
    config: CertManagerConfig,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl CertManager {
    /// `roots` is the configured trust bundle; when empty, the root the CA returns is trusted.
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        roots: Vec<CertificateDer<'static>>,
        config: CertManagerConfig,
    ) -> Arc<Self> {
        Arc::new(CertManager {
            signer,
            roots,
            config,
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
                    CertState::Ready(c) if c.is_valid_at(SystemTime::now()) => return Ok(c),
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
            CertState::Ready(c) if c.is_valid_at(SystemTime::now()) => Some(c),
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
        WorkloadCertificate::from_chain(identity, key.serialize_der(), &chain, &self.roots)
            .map_err(|e: CertError| format!("CA response unusable: {e}"))
    }

    async fn keep_fresh(self: Arc<Self>, identity: Identity, tx: watch::Sender<CertState>) {
        let mut backoff = self.config.initial_backoff;
        loop {
            match self.request(&identity).await {
                Ok(cert) => {
                    let expires_in = cert.not_after.duration_since(SystemTime::now()).unwrap_or_default();
                    info!(identity = %identity, expires_in_s = expires_in.as_secs(), "certificate issued");
                    let refresh = cert.refresh_at();
                    tx.send_replace(CertState::Ready(Arc::new(cert)));
                    backoff = self.config.initial_backoff;
                    sleep_until_system(refresh).await;
                }
                Err(reason) => {
                    let now = SystemTime::now();
                    let held = match &*tx.borrow() {
                        CertState::Ready(c) if c.is_valid_at(now) => Some(c.not_after),
                        _ => None,
                    };
                    match held {
                        Some(not_after) => {
                            warn!(identity = %identity, %reason, ?backoff, "certificate renewal failed; still serving the current certificate");
                            // Retry before the held certificate runs out.
                            let left = not_after.duration_since(now).unwrap_or_default();
                            tokio::time::sleep(backoff.min(left)).await;
                        }
                        None => {
                            warn!(identity = %identity, %reason, ?backoff, "certificate request failed");
                            tx.send_replace(CertState::Failed(reason.into()));
                            tokio::time::sleep(backoff).await;
                        }
                    }
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }
}

async fn sleep_until_system(at: SystemTime) {
    let d = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(d).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::identity::ca::BoxFuture;
    use crate::identity::DevCa;

    /// A development CA that can be switched to failing, counting requests.
    struct Flaky {
        ca: DevCa,
        fail: AtomicBool,
        calls: AtomicUsize,
    }

    impl CertificateSigner for Flaky {
        fn sign<'a>(
            &'a self,
            identity: &'a Identity,
            csr: String,
            validity: Duration,
        ) -> BoxFuture<'a, Result<Vec<String>, CaError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Box::pin(async { Err(CaError::Transport("CA down".into())) });
            }
            self.ca.sign(identity, csr, validity)
        }
    }

    fn setup(validity: Duration) -> (Arc<Flaky>, Arc<CertManager>) {
        let flaky = Arc::new(Flaky {
            ca: DevCa::generate("cluster.local").unwrap(),
            fail: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        });
        let cfg = CertManagerConfig {
            validity,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            fetch_timeout: Duration::from_secs(5),
        };
        let mgr = CertManager::new(flaky.clone(), vec![], cfg);
        (flaky, mgr)
    }

    fn id() -> Identity {
        Identity::new("cluster.local", "default", "app").unwrap()
    }

    #[tokio::test]
    async fn fetches_once_and_caches() {
        let (flaky, mgr) = setup(Duration::from_secs(3600));
        let a = mgr.fetch(&id()).await.unwrap();
        let b = mgr.fetch(&id()).await.unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
        assert_eq!(a.identity, id());
    }

    #[tokio::test]
    async fn renews_at_half_life() {
        let (_, mgr) = setup(Duration::from_secs(2));
        let first = mgr.fetch(&id()).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = mgr.fetch(&id()).await.unwrap();
            if now.not_after != first.not_after {
                // Renewed while the first one was still valid.
                assert!(first.is_valid_at(SystemTime::now()) || now.not_before < first.not_after);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no renewal");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn keeps_valid_certificate_while_renewal_fails_then_refuses_expired() {
        let (flaky, mgr) = setup(Duration::from_secs(2));
        let first = mgr.fetch(&id()).await.unwrap();
        flaky.fail.store(true, Ordering::SeqCst);
        // Past half-life renewal fails, but the valid certificate is still served.
        tokio::time::sleep(
            first.refresh_at().duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(300),
        )
        .await;
        assert!(flaky.calls.load(Ordering::SeqCst) >= 2, "renewal was attempted");
        let held = mgr.fetch(&id()).await.unwrap();
        assert_eq!(held.not_after, first.not_after);
        // Once it expires, nothing is served.
        tokio::time::sleep(
            first.not_after.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(300),
        )
        .await;
        assert!(mgr.fetch(&id()).await.is_err(), "an expired certificate was served");
        assert!(mgr.get_ready(&id()).is_none());
        // The CA comes back: a fresh certificate follows.
        flaky.fail.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while mgr.fetch(&id()).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "no recovery after the CA came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn forget_stops_renewal_and_drops_the_certificate() {
        let (flaky, mgr) = setup(Duration::from_secs(2));
        mgr.fetch(&id()).await.unwrap();
        mgr.forget(&id());
        assert!(mgr.snapshot().is_empty());
        assert!(mgr.get_ready(&id()).is_none());
        let calls = flaky.calls.load(Ordering::SeqCst);
        // Past the half-life no renewal happens for a forgotten identity.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(flaky.calls.load(Ordering::SeqCst), calls);
    }
}
