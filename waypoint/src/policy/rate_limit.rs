//! Local rate limiting with Envoy's local_ratelimit semantics: a token bucket of `max_tokens`
//! that gains `tokens_per_fill` every `fill_interval`; a request takes one token or gets 429.
//! One bucket per policy (shared by every client), or per policy and source identity when the
//! policy says `per_source` (the client address stands in for a client without identity).
//!
//! Buckets outlive configuration snapshots (a config push must not refill them) and are reset
//! when their policy's numbers change. Per-source buckets are bounded: a full bucket is the
//! same as none, so full ones are dropped first; past the bound, new sources share one
//! overflow bucket (never unlimited), counted by `waypoint_rate_limit_overflow_total`.
//! Time is tokio's, so tests run on a paused clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use mesh_proto::waypoint as wp;
use tokio::time::Instant;

/// Per-source buckets kept per policy before new sources share the overflow bucket.
pub const MAX_SOURCES_PER_POLICY: usize = 10_000;

/// A policy's bucket parameters, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    pub per_source: bool,
}

impl Limit {
    /// The limit a policy sets; `None` when it cannot limit anything (zero interval or fill,
    /// which the controller reports and never sends).
    pub fn from_policy(r: &wp::RateLimit) -> Option<Limit> {
        let interval = r.fill_interval.as_ref()?;
        let fill_interval = Duration::new(
            u64::try_from(interval.seconds).ok()?,
            u32::try_from(interval.nanos).ok()?,
        );
        (r.max_tokens > 0 && r.tokens_per_fill > 0 && !fill_interval.is_zero()).then_some(Limit {
            max_tokens: r.max_tokens,
            tokens_per_fill: r.tokens_per_fill,
            fill_interval,
            per_source: r.per_source,
        })
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When the last fill was credited.
    filled: Instant,
}

impl Bucket {
    fn full(limit: &Limit, now: Instant) -> Bucket {
        Bucket {
            tokens: limit.max_tokens,
            filled: now,
        }
    }

    /// Credits the fills since the last one (whole intervals only, as Envoy does).
    fn refill(&mut self, limit: &Limit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.filled);
        let fills = elapsed.as_nanos() / limit.fill_interval.as_nanos().max(1);
        if fills == 0 {
            return;
        }
        let added = fills.saturating_mul(u128::from(limit.tokens_per_fill));
        let tokens = (u128::from(self.tokens) + added).min(u128::from(limit.max_tokens));
        self.tokens = u32::try_from(tokens).unwrap_or(limit.max_tokens);
        let credited = limit
            .fill_interval
            .saturating_mul(u32::try_from(fills).unwrap_or(u32::MAX));
        self.filled += credited;
    }

    fn take(&mut self, limit: &Limit, now: Instant) -> Verdict {
        self.refill(limit, now);
        let reset = limit
            .fill_interval
            .saturating_sub(now.saturating_duration_since(self.filled));
        if self.tokens == 0 {
            return Verdict::Limited { reset };
        }
        self.tokens -= 1;
        Verdict::Allowed {
            remaining: self.tokens,
            reset,
        }
    }
}

/// The buckets of one policy.
#[derive(Debug)]
struct PolicyBuckets {
    limit: Limit,
    shared: Bucket,
    per_source: HashMap<String, Bucket>,
    overflow: Bucket,
}

/// What a request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `remaining` tokens left, the next fill in `reset`.
    Allowed { remaining: u32, reset: Duration },
    /// Over the limit; a token comes back in `reset`.
    Limited { reset: Duration },
}

/// Whether taking a token had to use the shared overflow bucket (the source bound bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    pub verdict: Verdict,
    pub overflowed: bool,
}

/// Every policy's buckets.
#[derive(Debug, Default)]
pub struct Limiter {
    policies: Mutex<HashMap<String, PolicyBuckets>>,
}

impl Limiter {
    /// Takes a token from `policy`'s bucket (for `source` when the limit is per source).
    pub fn take(&self, policy: &str, limit: &Limit, source: &str) -> Taken {
        let now = Instant::now();
        let mut all = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        if !all.get(policy).is_some_and(|b| b.limit == *limit) {
            all.insert(
                policy.to_owned(),
                PolicyBuckets {
                    limit: *limit,
                    shared: Bucket::full(limit, now),
                    per_source: HashMap::new(),
                    overflow: Bucket::full(limit, now),
                },
            );
        }
        let Some(b) = all.get_mut(policy) else {
            // Inserted just above; refuse rather than panic if that ever changes.
            return Taken {
                verdict: Verdict::Limited {
                    reset: limit.fill_interval,
                },
                overflowed: false,
            };
        };
        if !limit.per_source {
            return Taken {
                verdict: b.shared.take(limit, now),
                overflowed: false,
            };
        }
        if let Some(bucket) = b.per_source.get_mut(source) {
            return Taken {
                verdict: bucket.take(limit, now),
                overflowed: false,
            };
        }
        if b.per_source.len() >= MAX_SOURCES_PER_POLICY {
            // A bucket that has refilled completely is the same as none: drop those first.
            b.per_source.retain(|_, bucket| {
                bucket.refill(limit, now);
                bucket.tokens < limit.max_tokens
            });
        }
        if b.per_source.len() >= MAX_SOURCES_PER_POLICY {
            return Taken {
                verdict: b.overflow.take(limit, now),
                overflowed: true,
            };
        }
        let mut bucket = Bucket::full(limit, now);
        let verdict = bucket.take(limit, now);
        b.per_source.insert(source.to_owned(), bucket);
        Taken {
            verdict,
            overflowed: false,
        }
    }

    /// Drops the buckets of policies that no longer exist.
    pub fn retain(&self, exists: impl Fn(&str) -> bool) {
        let mut all = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|k, _| exists(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: u32, per_fill: u32, every_ms: u64, per_source: bool) -> Limit {
        Limit {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(every_ms),
            per_source,
        }
    }

    fn allowed(t: Taken) -> bool {
        matches!(t.verdict, Verdict::Allowed { .. })
    }

    #[tokio::test(start_paused = true)]
    async fn ten_per_second_then_refills_by_the_interval() {
        let l = Limiter::default();
        let ten = limit(10, 10, 1000, false);
        let first: Vec<bool> = (0..12).map(|_| allowed(l.take("ns/p", &ten, "a"))).collect();
        assert_eq!(first.iter().filter(|a| **a).count(), 10, "{first:?}");
        assert!(!first[10] && !first[11]);
        assert_eq!(
            l.take("ns/p", &ten, "a").verdict,
            Verdict::Limited {
                reset: Duration::from_secs(1)
            }
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!allowed(l.take("ns/p", &ten, "a")), "no partial fills");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            l.take("ns/p", &ten, "a").verdict,
            Verdict::Allowed {
                remaining: 9,
                reset: Duration::from_secs(1)
            }
        );
        // Long idle: capped at max_tokens.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..20).filter(|_| allowed(l.take("ns/p", &ten, "a"))).count(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn per_source_buckets_are_separate_and_bounded() {
        let l = Limiter::default();
        let two = limit(2, 1, 1000, true);
        assert!(allowed(l.take("ns/p", &two, "a")) && allowed(l.take("ns/p", &two, "a")));
        assert!(!allowed(l.take("ns/p", &two, "a")));
        assert!(allowed(l.take("ns/p", &two, "b")), "another source has its own bucket");
        // Fill the bound ("a" and "b" are two) with sources that each took a token (not full,
        // so not dropped).
        for i in 0..MAX_SOURCES_PER_POLICY - 2 {
            l.take("ns/p", &two, &format!("s{i}"));
        }
        let t = l.take("ns/p", &two, "late");
        assert!(t.overflowed && allowed(t));
        assert!(allowed(l.take("ns/p", &two, "later")));
        assert!(
            !allowed(l.take("ns/p", &two, "latest")),
            "overflow sources share one bucket"
        );
        // Once buckets refill completely they are dropped and new sources get their own.
        tokio::time::advance(Duration::from_secs(2)).await;
        let t = l.take("ns/p", &two, "fresh");
        assert!(!t.overflowed && allowed(t));
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_limit_resets_and_removed_policies_go() {
        let l = Limiter::default();
        let one = limit(1, 1, 1000, false);
        assert!(allowed(l.take("ns/p", &one, "a")));
        assert!(!allowed(l.take("ns/p", &one, "a")));
        let five = limit(5, 5, 1000, false);
        assert!(allowed(l.take("ns/p", &five, "a")), "new numbers, new bucket");
        l.retain(|k| k != "ns/p");
        assert!(l.policies.lock().unwrap().is_empty());
        let zero = wp::RateLimit {
            max_tokens: 0,
            tokens_per_fill: 1,
            fill_interval: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            per_source: false,
        };
        assert_eq!(Limit::from_policy(&zero), None);
        let ok = wp::RateLimit { max_tokens: 10, ..zero };
        assert_eq!(Limit::from_policy(&ok), Some(limit(10, 1, 1000, false)));
    }
}
