//! Rate-limited logging: a repeated warning (same key) is let through at most once per
//! interval, and the next one that is let through says how many were suppressed meanwhile.
//!
//! Why: a peer that can trigger a log line (an unauthenticated request, a bad message) could
//! otherwise flood the log and a core with it (the CA once wrote 2.1 M identical lines in 25 s).
//! The number of distinct keys is bounded too, so keys derived from peer input cannot grow
//! the map: past the bound, new keys share one overflow slot.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most distinct keys tracked; more share the overflow slot.
pub const DEFAULT_MAX_KEYS: usize = 256;

#[derive(Debug)]
struct Slot {
    /// When a line for this key was last let through.
    last: Instant,
    /// Lines suppressed since then.
    suppressed: u64,
}

/// Decides, per key, whether a log line may be written now.
///
/// ```
/// use std::time::Duration;
/// let limit = mesh_core::log_limit::LogLimiter::new(Duration::from_secs(10));
/// if let Some(suppressed) = limit.check("unauthenticated") {
///     tracing::warn!(suppressed, "request refused");
/// }
/// ```
#[derive(Debug)]
pub struct LogLimiter<K = &'static str> {
    interval: Duration,
    max_keys: usize,
    slots: Mutex<HashMap<K, Slot>>,
    overflow: Mutex<Option<Slot>>,
}

impl<K: Hash + Eq> LogLimiter<K> {
    /// At most one line per key per `interval`, [`DEFAULT_MAX_KEYS`] keys.
    pub fn new(interval: Duration) -> Self {
        Self::with_max_keys(interval, DEFAULT_MAX_KEYS)
    }

    pub fn with_max_keys(interval: Duration, max_keys: usize) -> Self {
        LogLimiter {
            interval,
            max_keys,
            slots: Mutex::new(HashMap::new()),
            overflow: Mutex::new(None),
        }
    }

    /// `Some(n)` when a line for `key` may be written now, `n` being how many were suppressed
    /// since the last one; `None` when it must be suppressed (and is counted).
    pub fn check(&self, key: K) -> Option<u64> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: K, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked while counting: keep counting.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(&key) {
            return Self::pass(slot, now, self.interval);
        }
        if slots.len() < self.max_keys {
            slots.insert(
                key,
                Slot {
                    last: now,
                    suppressed: 0,
                },
            );
            return Some(0);
        }
        drop(slots);
        let mut overflow = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
        match overflow.as_mut() {
            Some(slot) => Self::pass(slot, now, self.interval),
            None => {
                *overflow = Some(Slot {
                    last: now,
                    suppressed: 0,
                });
                Some(0)
            }
        }
    }

    fn pass(slot: &mut Slot, now: Instant, interval: Duration) -> Option<u64> {
        if now.saturating_duration_since(slot.last) >= interval {
            slot.last = now;
            Some(std::mem::take(&mut slot.suppressed))
        } else {
            slot.suppressed = slot.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_suppressed_count() {
        let limit = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.check_at("a", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(limit.check_at("a", t0 + Duration::from_secs(i)), None);
        }
        // Another key is independent.
        assert_eq!(limit.check_at("b", t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(limit.check_at("a", t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(limit.check_at("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.check_at("a", t0 + Duration::from_secs(25)), Some(1));
    }

    #[test]
    fn keys_past_the_bound_share_one_slot() {
        let limit: LogLimiter<String> = LogLimiter::with_max_keys(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        assert_eq!(limit.check_at("a".into(), t0), Some(0));
        assert_eq!(limit.check_at("b".into(), t0), Some(0));
        assert_eq!(limit.check_at("c".into(), t0), Some(0));
        // "d" is new but the map is full: it shares the overflow slot with "c".
        assert_eq!(limit.check_at("d".into(), t0), None);
        for i in 0..1000 {
            assert_eq!(limit.check_at(format!("k{i}"), t0), None);
        }
        assert_eq!(limit.slots.lock().unwrap().len(), 2);
        assert_eq!(limit.check_at("e".into(), t0 + Duration::from_secs(10)), Some(1001));
    }
}
