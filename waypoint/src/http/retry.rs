//! When an attempt to a backend is tried again. [`RetryPolicy::decide`] is a pure function of
//! the route's retry policy, the attempt's outcome and its number, so every case is pinned by
//! a table test; the caller still asks the cluster for a retry budget (`maxRetries`) before
//! acting on [`Decision::Retry`]. Timings use tokio's clock, so tests run on paused time.

use std::future::Future;
use std::time::Duration;

use futures_util::future::{Either, FutureExt};

use http::{Method, StatusCode};
use mesh_proto::waypoint as wp;

/// Backoff between attempts when the route does not set one.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Attempts without a retry policy: one more try, only for a request that was never sent.
const DEFAULT_ATTEMPTS: u32 = 2;

/// What one attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The endpoint answered with this status.
    Answered(StatusCode),
    /// No answer: `sent` is false when connecting failed (the request never left), true when
    /// the connection broke after the request was (perhaps partly) sent.
    Failed { sent: bool },
    /// The per-try timeout expired.
    TimedOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Retry,
    Stop,
}

/// A route's retry policy applied to one request.
#[derive(Debug)]
pub struct RetryPolicy {
    retry: wp::Retry,
    /// Whether the route configured retries at all (otherwise only unsent requests are retried).
    configured: bool,
    /// Whether a request that may have reached the endpoint can be sent again (idempotent
    /// method, or `non-idempotent` in `retryOn`).
    may_resend: bool,
    /// Whether the body can be sent again (it was buffered).
    replayable: bool,
    pub attempts: u32,
    pub per_try: Option<Duration>,
    pub backoff: Duration,
}

pub fn to_duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
        .filter(|d| !d.is_zero())
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl RetryPolicy {
    pub fn new(rt: &wp::Route, method: &Method, replayable: bool) -> Self {
        let retry = rt.retry.clone().unwrap_or_default();
        let configured = rt.retry.is_some();
        RetryPolicy {
            may_resend: idempotent(method) || retry.retry_on.iter().any(|r| r == "non-idempotent"),
            attempts: if configured {
                retry.attempts.max(1)
            } else {
                DEFAULT_ATTEMPTS
            },
            per_try: to_duration(retry.per_try_timeout.as_ref()).or(to_duration(rt.backend_timeout.as_ref())),
            backoff: to_duration(retry.backoff.as_ref()).unwrap_or(DEFAULT_BACKOFF),
            retry,
            configured,
            replayable,
        }
    }

    /// Whether attempt number `attempt` (from 1), which came to `outcome`, is tried again.
    pub fn decide(&self, outcome: Attempt, attempt: u32) -> Decision {
        let left = attempt < self.attempts && self.replayable;
        let retry = left
            && match outcome {
                Attempt::Answered(status) => self.configured && self.may_resend && self.retriable(Some(status), true),
                Attempt::Failed { sent } if self.configured => self.retriable(None, sent) && (!sent || self.may_resend),
                // Without a policy only a request that never left is tried again.
                Attempt::Failed { sent } => !sent,
                Attempt::TimedOut => self.configured && self.may_resend,
            };
        if retry {
            Decision::Retry
        } else {
            Decision::Stop
        }
    }

    /// Whether an answer (`None`: no answer at all) is one `retryOn`/`retriableStatusCodes` names.
    fn retriable(&self, status: Option<StatusCode>, sent: bool) -> bool {
        let on = |k: &str| self.retry.retry_on.iter().any(|r| r == k);
        match status {
            None if !sent => true,
            None => on("5xx") || on("reset") || on("gateway-error") || !self.retry.codes.is_empty(),
            Some(s) => {
                let code = u32::from(s.as_u16());
                self.retry.codes.contains(&code)
                    || (on("5xx") && s.is_server_error())
                    || (on("gateway-error") && matches!(code, 502..=504))
                    || (on("unavailable") && code == 503)
                    || (on("retriable-4xx") && code == 409)
            }
        }
    }

    /// Runs one attempt under the per-try timeout; `None` when it expired.
    ///
    /// Not an `async fn`: its state would hold `send` twice, as the argument and as the future
    /// awaited, doubling the size of every request's future.
    pub fn attempt<F: Future>(&self, send: F) -> impl Future<Output = Option<F::Output>> {
        match self.per_try {
            Some(t) => Either::Left(tokio::time::timeout(t, send).map(Result::ok)),
            None => Either::Right(send.map(Some)),
        }
    }

    /// Waits out the backoff before the next attempt.
    pub async fn back_off(&self) {
        tokio::time::sleep(self.backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Attempt::*;
    use Decision::*;

    fn policy(retry: Option<wp::Retry>, method: Method, replayable: bool) -> RetryPolicy {
        let rt = wp::Route {
            retry,
            ..Default::default()
        };
        RetryPolicy::new(&rt, &method, replayable)
    }

    fn on(kinds: &[&str], codes: &[u32]) -> Option<wp::Retry> {
        Some(wp::Retry {
            attempts: 3,
            retry_on: kinds.iter().map(|k| (*k).to_owned()).collect(),
            codes: codes.to_vec(),
            ..Default::default()
        })
    }

    const S500: Attempt = Answered(StatusCode::INTERNAL_SERVER_ERROR);
    const S502: Attempt = Answered(StatusCode::BAD_GATEWAY);
    const S503: Attempt = Answered(StatusCode::SERVICE_UNAVAILABLE);
    const S409: Attempt = Answered(StatusCode::CONFLICT);
    const S404: Attempt = Answered(StatusCode::NOT_FOUND);
    const S200: Attempt = Answered(StatusCode::OK);
    const UNSENT: Attempt = Failed { sent: false };
    const RESET: Attempt = Failed { sent: true };

    #[test]
    fn decision_table() {
        let get = Method::GET;
        let post = Method::POST;
        #[rustfmt::skip]
        let table: Vec<(&str, RetryPolicy, Attempt, u32, Decision)> = vec![
            // No retry policy: two attempts, only for a request that never left.
            ("default unsent", policy(None, get.clone(), true), UNSENT, 1, Retry),
            ("default unsent, last", policy(None, get.clone(), true), UNSENT, 2, Stop),
            ("default reset", policy(None, get.clone(), true), RESET, 1, Stop),
            ("default 503", policy(None, get.clone(), true), S503, 1, Stop),
            ("default timeout", policy(None, get.clone(), true), TimedOut, 1, Stop),
            ("default unsent, POST", policy(None, post.clone(), true), UNSENT, 1, Retry),
            ("default unsent, streamed body", policy(None, get.clone(), false), UNSENT, 1, Stop),
            // retryOn 5xx.
            ("5xx 500", policy(on(&["5xx"], &[]), get.clone(), true), S500, 1, Retry),
            ("5xx 500 attempt 2", policy(on(&["5xx"], &[]), get.clone(), true), S500, 2, Retry),
            ("5xx 500 last attempt", policy(on(&["5xx"], &[]), get.clone(), true), S500, 3, Stop),
            ("5xx 404", policy(on(&["5xx"], &[]), get.clone(), true), S404, 1, Stop),
            ("5xx 200", policy(on(&["5xx"], &[]), get.clone(), true), S200, 1, Stop),
            ("5xx reset", policy(on(&["5xx"], &[]), get.clone(), true), RESET, 1, Retry),
            ("5xx 500 POST", policy(on(&["5xx"], &[]), post.clone(), true), S500, 1, Stop),
            ("5xx reset POST", policy(on(&["5xx"], &[]), post.clone(), true), RESET, 1, Stop),
            ("5xx unsent POST", policy(on(&["5xx"], &[]), post.clone(), true), UNSENT, 1, Retry),
            ("5xx,non-idempotent 500 POST", policy(on(&["5xx", "non-idempotent"], &[]), post.clone(), true), S500, 1, Retry),
            ("5xx streamed body", policy(on(&["5xx"], &[]), get.clone(), false), S500, 1, Stop),
            ("5xx timeout", policy(on(&["5xx"], &[]), get.clone(), true), TimedOut, 1, Retry),
            ("5xx timeout POST", policy(on(&["5xx"], &[]), post.clone(), true), TimedOut, 1, Stop),
            // Narrower conditions.
            ("gateway-error 502", policy(on(&["gateway-error"], &[]), get.clone(), true), S502, 1, Retry),
            ("gateway-error 500", policy(on(&["gateway-error"], &[]), get.clone(), true), S500, 1, Stop),
            ("unavailable 503", policy(on(&["unavailable"], &[]), get.clone(), true), S503, 1, Retry),
            ("unavailable 502", policy(on(&["unavailable"], &[]), get.clone(), true), S502, 1, Stop),
            ("unavailable reset", policy(on(&["unavailable"], &[]), get.clone(), true), RESET, 1, Stop),
            ("reset reset", policy(on(&["reset"], &[]), get.clone(), true), RESET, 1, Retry),
            ("reset 503", policy(on(&["reset"], &[]), get.clone(), true), S503, 1, Stop),
            ("retriable-4xx 409", policy(on(&["retriable-4xx"], &[]), get.clone(), true), S409, 1, Retry),
            ("retriable-4xx 404", policy(on(&["retriable-4xx"], &[]), get.clone(), true), S404, 1, Stop),
            ("codes 404", policy(on(&[], &[404]), get.clone(), true), S404, 1, Retry),
            ("codes reset", policy(on(&[], &[404]), get.clone(), true), RESET, 1, Retry),
            ("empty retryOn unsent", policy(on(&[], &[]), get.clone(), true), UNSENT, 1, Retry),
            ("empty retryOn reset", policy(on(&[], &[]), get.clone(), true), RESET, 1, Stop),
            ("empty retryOn 503", policy(on(&[], &[]), get.clone(), true), S503, 1, Stop),
        ];
        for (name, p, outcome, attempt, want) in table {
            assert_eq!(p.decide(outcome, attempt), want, "{name}");
        }
    }

    #[test]
    fn attempts_and_timings_from_the_route() {
        let p = policy(None, Method::GET, true);
        assert_eq!((p.attempts, p.per_try, p.backoff), (2, None, DEFAULT_BACKOFF));
        let d = |ms: i32| {
            Some(prost_types::Duration {
                seconds: 0,
                nanos: ms * 1_000_000,
            })
        };
        let rt = wp::Route {
            retry: Some(wp::Retry {
                attempts: 0,
                backoff: d(100),
                ..Default::default()
            }),
            backend_timeout: d(300),
            ..Default::default()
        };
        let p = RetryPolicy::new(&rt, &Method::GET, true);
        assert_eq!(p.attempts, 1, "at least one attempt");
        assert_eq!(
            p.per_try,
            Some(Duration::from_millis(300)),
            "backend timeout bounds each try"
        );
        assert_eq!(p.backoff, Duration::from_millis(100));
        assert_eq!(p.decide(UNSENT, 1), Stop);
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timeout_and_backoff_run_on_tokio_time() {
        let rt = wp::Route {
            retry: Some(wp::Retry {
                attempts: 3,
                per_try_timeout: Some(prost_types::Duration { seconds: 2, nanos: 0 }),
                backoff: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = RetryPolicy::new(&rt, &Method::GET, true);
        let start = tokio::time::Instant::now();
        assert_eq!(p.attempt(std::future::pending::<()>()).await, None);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "the per-try timeout fires on time"
        );
        assert_eq!(p.attempt(async { 7 }).await, Some(7));
        p.back_off().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        let answer = p.attempt(async {
            tokio::time::sleep(Duration::from_millis(1999)).await;
            "late but in time"
        });
        assert_eq!(answer.await, Some("late but in time"));
    }
}
