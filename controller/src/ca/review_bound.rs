//! A bound in front of the TokenReview authenticator. Every CA and xDS request carries a
//! bearer token, and in a cluster each one became a TokenReview: anyone who could reach port
//! 15012 could turn each request, with any random token, into a call to the API server,
//! throttling the controller's own service account there (and with it its lease and the real
//! proxies' certificates). So:
//!
//! - a token that is not a JWT (three base64url parts) or is longer than [`MAX_TOKEN_BYTES`] is
//!   refused without asking: Kubernetes service account tokens are JWTs;
//! - answers are cached by the token's SHA-256: a caller for [`ACCEPTED_TTL`], a refusal for
//!   [`REFUSED_TTL`]; an unavailable API server is never cached. At most [`MAX_ENTRIES`]
//!   answers are kept (expired ones go first; when all are live, a new answer is not kept);
//! - at most [`MAX_IN_FLIGHT`] reviews run at once; a request that waits [`QUEUE_WAIT`] for a
//!   slot is answered "unavailable", which callers retry.
//!
//! `controller_token_reviews_total{result}` counts each outcome (reviewed, cached, malformed,
//! busy).

use std::collections::HashMap;
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

/// The longest token reviewed; projected service account tokens are about 1 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How long an accepted token's caller is reused. A token whose pod is deleted stays
/// accepted this long at most.
pub const ACCEPTED_TTL: Duration = Duration::from_secs(60);
/// How long a refused token stays refused without asking again.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);
/// The most answers kept.
pub const MAX_ENTRIES: usize = 8_192;
/// The most reviews in flight at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// How long a request waits for a review slot.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// A cached answer: the caller, or the refusal's text.
#[derive(Clone)]
struct Answer {
    until: Instant,
    result: Result<Caller, String>,
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
            "Bearer tokens authenticated, by result: reviewed (asked the API server), cached, malformed (refused unasked), busy (no review slot in time)",
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
    cache: Mutex<HashMap<[u8; 32], Answer>>,
    slots: Semaphore,
    metrics: ReviewMetrics,
}

impl<A: Authenticator> ReviewBound<A> {
    pub fn new(inner: A, metrics: ReviewMetrics) -> Self {
        ReviewBound {
            inner,
            cache: Mutex::new(HashMap::new()),
            slots: Semaphore::new(MAX_IN_FLIGHT),
            metrics,
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<Caller, String>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|a| a.until > Instant::now())
            .map(|a| a.result.clone())
    }

    fn remember(&self, key: [u8; 32], result: Result<Caller, String>) {
        let now = Instant::now();
        let ttl = if result.is_ok() { ACCEPTED_TTL } else { REFUSED_TTL };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, a| a.until > now);
        }
        if cache.len() < MAX_ENTRIES || cache.contains_key(&key) {
            cache.insert(
                key,
                Answer {
                    until: now + ttl,
                    result,
                },
            );
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        if !looks_like_jwt(token) {
            self.metrics.count("malformed");
            return Err(AuthError::Malformed("not a Kubernetes service account token (a JWT)"));
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(answer) = self.cached(&key) {
            self.metrics.count("cached");
            return answer.map_err(AuthError::Rejected);
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(QUEUE_WAIT, self.slots.acquire()).await else {
            self.metrics.count("busy");
            return Err(AuthError::Unavailable("too many token reviews in flight; retry".into()));
        };
        self.metrics.count("reviewed");
        let result = self.inner.authenticate(token).await;
        match &result {
            Ok(caller) => self.remember(key, Ok(caller.clone())),
            Err(AuthError::Unavailable(_)) => {}
            Err(e) => self.remember(key, Err(e.to_string())),
        }
        result
    }
}

impl<A: Authenticator> Authenticator for ReviewBound<A> {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        self.review(token).boxed()
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
        assert_eq!(bound.cache.lock().unwrap().len(), MAX_ENTRIES);
    }
}
