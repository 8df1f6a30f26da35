//! A bound in front of the TokenReview authenticator. Every CA and xDS request carries a
//! bearer token, and in a cluster each one became a TokenReview: anyone who could reach port
//! 15012 could turn each request, with any random token, into a call to the API server,
//! throttling the controller's own service account there (and with it its lease and the real
//! proxies' certificates). So:
//!
//! - a token that is not a JWT (three base64url parts) or is longer than [`MAX_TOKEN_BYTES`] is
//!   refused without asking: Kubernetes service account tokens are JWTs;
//! - answers are cached by the token's SHA-256: a caller for [`ACCEPTED_TTL`], a refusal for
//!   [`REFUSED_TTL`]; an unavailable API server is never cached. Acceptances and refusals
//!   are kept apart, [`MAX_ENTRIES`] each (expired ones go first; when all are live, a new
//!   answer is not kept), so a flood of forged tokens cannot push out or crowd out the real
//!   callers' answers;
//! - a token no key the API server publishes verifies is refused unasked ([`IssuerKeys`]);
//! - one source address has at most [`MAX_IN_FLIGHT_PER_SOURCE`] reviews in flight or
//!   waiting (a proxy needs one or two), so one client cannot queue thousands ahead of the
//!   proxies; at most [`MAX_IN_FLIGHT`] reviews run at once, and a request that waits
//!   [`QUEUE_WAIT`] for a slot is answered "unavailable", which callers retry.
//!
//! `controller_token_reviews_total{result}` counts each outcome (reviewed, cached, malformed,
//! forged, unknown_key, busy, busy_source).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::auth::{AuthError, Authenticator, Caller};
use super::issuer_keys::{IssuerKeys, KeySource, Verdict};

/// The longest token reviewed; projected service account tokens are about 1 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How long an accepted token's caller is reused. A token whose pod is deleted stays
/// accepted this long at most.
pub const ACCEPTED_TTL: Duration = Duration::from_secs(60);
/// How long a refused token stays refused without asking again.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);
/// The most answers kept, of each kind (accepted, refused).
pub const MAX_ENTRIES: usize = 8_192;
/// The most reviews in flight at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// The most reviews one source address may have in flight or waiting.
pub const MAX_IN_FLIGHT_PER_SOURCE: u32 = 2;
/// How long a request waits for a review slot.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Cached answers of one kind: a caller, or a refusal's text, by the token's SHA-256.
struct Answers<T> {
    ttl: Duration,
    entries: HashMap<[u8; 32], (Instant, T)>,
}

impl<T: Clone> Answers<T> {
    fn new(ttl: Duration) -> Self {
        Answers {
            ttl,
            entries: HashMap::new(),
        }
    }

    fn get(&self, key: &[u8; 32], now: Instant) -> Option<T> {
        self.entries
            .get(key)
            .filter(|(until, _)| *until > now)
            .map(|(_, v)| v.clone())
    }

    fn insert(&mut self, key: [u8; 32], value: T, now: Instant) {
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, (until, _)| *until > now);
        }
        if self.entries.len() < MAX_ENTRIES || self.entries.contains_key(&key) {
            self.entries.insert(key, (now + self.ttl, value));
        }
    }
}

/// Both kinds of cached answers.
struct Cache {
    accepted: Answers<Caller>,
    refused: Answers<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// `token_reviews_total{result}`.
#[derive(Clone, Debug, Default)]
pub struct ReviewMetrics {
    outcomes: Family<ResultLabels, Counter>,
}

impl ReviewMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ReviewMetrics::default();
        registry.register(
            "token_reviews",
            "Bearer tokens authenticated, by result: reviewed (asked the API server), cached, malformed or forged (refused unasked: not a JWT, or no published key verifies it), unknown_key (signed by a key not published, retryable), busy and busy_source (no review slot in time)",
            m.outcomes.clone(),
        );
        m
    }

    fn count(&self, result: &'static str) {
        self.outcomes.get_or_create(&ResultLabels { result }).inc();
    }

    /// The count for `result`.
    pub fn get(&self, result: &'static str) -> u64 {
        self.outcomes.get_or_create(&ResultLabels { result }).get()
    }
}

/// An [`Authenticator`] of Kubernetes tokens behind the bounds above.
pub struct ReviewBound<A> {
    inner: A,
    cache: Mutex<Cache>,
    slots: Semaphore,
    /// Reviews in flight or waiting, by source address.
    sources: Mutex<HashMap<IpAddr, u32>>,
    metrics: ReviewMetrics,
    /// The API server's published signing keys, when checked before reviewing.
    keys: Option<IssuerKeys<Box<dyn KeySource>>>,
}

/// One source's place among the reviews in flight; given back on drop.
struct SourceSlot<'a> {
    sources: &'a Mutex<HashMap<IpAddr, u32>>,
    source: Option<IpAddr>,
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let Some(source) = self.source else { return };
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = sources.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                sources.remove(&source);
            }
        }
    }
}

impl<A: Authenticator> ReviewBound<A> {
    pub fn new(inner: A, metrics: ReviewMetrics) -> Self {
        ReviewBound {
            inner,
            cache: Mutex::new(Cache {
                accepted: Answers::new(ACCEPTED_TTL),
                refused: Answers::new(REFUSED_TTL),
            }),
            slots: Semaphore::new(MAX_IN_FLIGHT),
            sources: Mutex::new(HashMap::new()),
            metrics,
            keys: None,
        }
    }

    /// Checks each token against `keys` before reviewing it.
    pub fn with_issuer_keys(mut self, keys: IssuerKeys<Box<dyn KeySource>>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Refuses a token no published key signed (the keys' [`Verdict`]), unasked.
    async fn check_signature(&self, token: &str) -> Result<(), AuthError> {
        let Some(keys) = &self.keys else { return Ok(()) };
        match keys.check(token).await {
            Verdict::Review => Ok(()),
            Verdict::UnknownKey(why) => {
                self.metrics.count("unknown_key");
                Err(AuthError::Unavailable(why))
            }
            Verdict::Forged(why) => {
                self.metrics.count("forged");
                Err(AuthError::Rejected(why.to_owned()))
            }
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<Caller, String>> {
        let (cache, now) = (self.cache(), Instant::now());
        match cache.accepted.get(key, now) {
            Some(caller) => Some(Ok(caller)),
            None => cache.refused.get(key, now).map(Err),
        }
    }

    /// A place for `source` among the reviews in flight, unless it holds its share already.
    fn source_slot(&self, source: Option<IpAddr>) -> Option<SourceSlot<'_>> {
        if let Some(ip) = source {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let n = sources.entry(ip).or_insert(0);
            if *n >= MAX_IN_FLIGHT_PER_SOURCE {
                return None;
            }
            *n += 1;
        }
        Some(SourceSlot {
            sources: &self.sources,
            source,
        })
    }

    async fn review(&self, token: &str, source: Option<IpAddr>) -> Result<Caller, AuthError> {
        if !looks_like_jwt(token) {
            self.metrics.count("malformed");
            return Err(AuthError::Malformed("not a Kubernetes service account token (a JWT)"));
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(answer) = self.cached(&key) {
            self.metrics.count("cached");
            return answer.map_err(AuthError::Rejected);
        }
        // Not cached: a verification costs less than the entry a flood of forgeries would take.
        self.check_signature(token).await?;
        let Some(_source) = self.source_slot(source) else {
            self.metrics.count("busy_source");
            return Err(AuthError::Unavailable(
                "too many token reviews in flight from this address; retry".into(),
            ));
        };
        let Ok(Ok(_slot)) = tokio::time::timeout(QUEUE_WAIT, self.slots.acquire()).await else {
            self.metrics.count("busy");
            return Err(AuthError::Unavailable("too many token reviews in flight; retry".into()));
        };
        self.metrics.count("reviewed");
        let result = self.inner.authenticate(token).await;
        let now = Instant::now();
        match &result {
            Ok(caller) => self.cache().accepted.insert(key, caller.clone(), now),
            Err(AuthError::Unavailable(_)) => {}
            Err(e) => self.cache().refused.insert(key, e.to_string(), now),
        }
        result
    }
}

impl<A: Authenticator> Authenticator for ReviewBound<A> {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        self.review(token, None).boxed()
    }

    fn authenticate_from<'a>(
        &'a self,
        token: &'a str,
        source: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        self.review(token, source).boxed()
    }
}

/// Whether `token` has a JWT's shape: at most [`MAX_TOKEN_BYTES`], three non-empty base64url
/// parts.
fn looks_like_jwt(token: &str) -> bool {
    let base64url = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
    };
    token.len() <= MAX_TOKEN_BYTES && token.split('.').count() == 3 && token.split('.').all(base64url)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a failed test

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use mesh_core::identity::Identity;

    use super::*;

    /// Accepts `good.x.y`, refuses other JWTs; counts reviews; never answers while `hold`.
    #[derive(Clone, Default)]
    struct Fake {
        reviews: Arc<AtomicUsize>,
        hold: bool,
    }

    impl Authenticator for Fake {
        fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
            async move {
                self.reviews.fetch_add(1, Ordering::SeqCst);
                if self.hold {
                    std::future::pending::<()>().await;
                }
                match token {
                    "good.x.y" => Ok(Caller {
                        identity: Identity::new("cluster.local", "ns", "sa").unwrap(),
                        node: None,
                    }),
                    _ => Err(AuthError::Rejected("expired".into())),
                }
            }
            .boxed()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn forged_tokens_are_refused_without_a_review() {
        use crate::ca::issuer_keys::testing::{Fixed, Signer};
        let (cluster, attacker) = (Signer::new("k1"), Signer::new("k1"));
        let source = Fixed::default();
        source.serve(Some(vec![cluster.jwk.clone()]));
        let fake = Fake::default();
        let keys = IssuerKeys::new(Box::new(source.clone()) as Box<dyn KeySource>);
        let bound = ReviewBound::new(fake.clone(), ReviewMetrics::default()).with_issuer_keys(keys);
        for _ in 0..1_000 {
            let forged = attacker.sign(Some("k1"));
            assert!(matches!(bound.authenticate(&forged).await, Err(AuthError::Rejected(_))));
        }
        assert_eq!(fake.reviews.load(Ordering::SeqCst), 0, "no forgery is reviewed");
        assert_eq!(bound.metrics.get("forged"), 1_000);
        tokio::time::advance(crate::ca::issuer_keys::REFRESH_COOLDOWN).await;
        assert!(matches!(
            bound.authenticate(&cluster.sign(Some("k9"))).await,
            Err(AuthError::Unavailable(_))
        ));
        assert_eq!(bound.metrics.get("unknown_key"), 1);
        // A token the cluster signed is reviewed (the fake refuses it: it is not good.x.y).
        assert!(bound.authenticate(&cluster.sign(Some("k1"))).await.is_err());
        assert_eq!(fake.reviews.load(Ordering::SeqCst), 1);
        assert_eq!(source.fetches(), 2, "one fetch at start, one for the unknown key id");
    }

    #[test]
    fn only_jwt_shaped_tokens_are_reviewed() {
        let cases = [
            ("a.b.c", true),
            ("eyJh-_.eyJz=.sig", true),
            ("random", false),
            ("a.b", false),
            ("a..c", false),
            ("a.b.c.d", false),
            ("a.b.c$", false),
        ];
        for (token, want) in cases {
            assert_eq!(looks_like_jwt(token), want, "{token}");
        }
        let long = format!("a.{}.c", "b".repeat(MAX_TOKEN_BYTES));
        assert!(!looks_like_jwt(&long));
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_reused_until_they_expire_and_junk_is_never_reviewed() {
        let fake = Fake::default();
        let bound = ReviewBound::new(fake.clone(), ReviewMetrics::default());
        for _ in 0..1_000 {
            assert!(matches!(
                bound.authenticate("bad.x.y").await,
                Err(AuthError::Rejected(_))
            ));
            assert!(matches!(bound.authenticate("junk").await, Err(AuthError::Malformed(_))));
        }
        assert_eq!(
            fake.reviews.load(Ordering::SeqCst),
            1,
            "one review for a repeated bad token"
        );
        assert!(bound.authenticate("good.x.y").await.is_ok());
        assert!(bound.authenticate("good.x.y").await.is_ok());
        assert_eq!(fake.reviews.load(Ordering::SeqCst), 2);
        tokio::time::advance(ACCEPTED_TTL).await;
        assert!(bound.authenticate("good.x.y").await.is_ok());
        assert_eq!(fake.reviews.load(Ordering::SeqCst), 3, "reviewed again once expired");
        assert_eq!(bound.metrics.get("malformed"), 1_000);
        assert_eq!(bound.metrics.get("cached"), 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn reviews_in_flight_are_bounded() {
        let fake = Fake {
            hold: true,
            ..Fake::default()
        };
        let bound = Arc::new(ReviewBound::new(fake.clone(), ReviewMetrics::default()));
        let mut waiting = Vec::new();
        for i in 0..MAX_IN_FLIGHT + 3 {
            let b = bound.clone();
            waiting.push(tokio::spawn(async move { b.authenticate(&format!("t{i}.x.y")).await }));
        }
        tokio::time::sleep(QUEUE_WAIT + Duration::from_millis(1)).await;
        assert_eq!(fake.reviews.load(Ordering::SeqCst), MAX_IN_FLIGHT);
        assert_eq!(bound.metrics.get("busy"), 3);
        assert_eq!(waiting.iter().filter(|t| t.is_finished()).count(), 3);
        waiting.iter().for_each(|t| t.abort());
    }

    /// Forged tokens fill the refusals, never the acceptances: a real caller's answer is
    /// still kept and reused.
    #[tokio::test(start_paused = true)]
    async fn refusals_do_not_crowd_out_acceptances() {
        let fake = Fake::default();
        let bound = ReviewBound::new(fake.clone(), ReviewMetrics::default());
        for i in 0..MAX_ENTRIES {
            let _ = bound.authenticate(&format!("t{i}.x.y")).await;
        }
        let before = fake.reviews.load(Ordering::SeqCst);
        assert!(bound.authenticate("good.x.y").await.is_ok());
        assert!(bound.authenticate("good.x.y").await.is_ok());
        assert_eq!(
            fake.reviews.load(Ordering::SeqCst),
            before + 1,
            "the acceptance was not kept"
        );
    }

    /// One source holds at most its share of reviews: the next is refused at once, and
    /// another source still gets a slot.
    #[tokio::test(start_paused = true)]
    async fn one_source_cannot_take_every_review() {
        let fake = Fake {
            hold: true,
            ..Fake::default()
        };
        let bound = Arc::new(ReviewBound::new(fake.clone(), ReviewMetrics::default()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut held = Vec::new();
        for i in 0..MAX_IN_FLIGHT_PER_SOURCE {
            let bound = bound.clone();
            held.push(tokio::spawn(async move {
                bound.authenticate_from(&format!("a{i}.x.y"), Some(a)).await
            }));
        }
        tokio::task::yield_now().await;
        let refused = tokio::time::timeout(Duration::from_millis(1), bound.authenticate_from("a9.x.y", Some(a))).await;
        assert!(
            matches!(refused, Ok(Err(AuthError::Unavailable(_)))),
            "not refused at once: {refused:?}"
        );
        assert_eq!(bound.metrics.get("busy_source"), 1);
        let other = bound.clone();
        held.push(tokio::spawn(
            async move { other.authenticate_from("b0.x.y", Some(b)).await },
        ));
        tokio::task::yield_now().await;
        assert_eq!(
            fake.reviews.load(Ordering::SeqCst),
            MAX_IN_FLIGHT_PER_SOURCE as usize + 1
        );
        held.iter().for_each(|t| t.abort());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let bound = ReviewBound::new(Fake::default(), ReviewMetrics::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..MAX_ENTRIES + 10 {
                let _ = bound.authenticate(&format!("t{i}.x.y")).await;
            }
        });
        assert_eq!(bound.cache().refused.entries.len(), MAX_ENTRIES);
    }
}
