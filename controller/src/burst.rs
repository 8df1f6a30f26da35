//! Gathers source changes into bursts, each translated once.
//!
//! Inside a busy period (a rollout, a relist, a file rewritten object by object) changes are
//! debounced: a burst ends after a quiet period or at its deadline, so a thousand changes cost
//! a few translations rather than a thousand. An isolated change — nothing else queued, and
//! the previous burst finished at least a quiet period ago — is translated at once: waiting
//! would only add the quiet period to every lone change's latency. Changes that arrive while
//! that change is being translated queue up and form the next (debounced) burst.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long a burst of changes may keep arriving before translation runs anyway, and how
/// long a quiet period must last to count as the end of a burst.
#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    pub quiet: Duration,
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(10),
            max: Duration::from_millis(250),
        }
    }
}

/// The change stream and when the last burst was handled.
pub(crate) struct Bursts<C> {
    changes: mpsc::Receiver<C>,
    debounce: Debounce,
    /// When the last burst's translation finished ([`Bursts::done`]); `None` before the first.
    last_done: Option<Instant>,
}

impl<C> Bursts<C> {
    pub(crate) fn new(changes: mpsc::Receiver<C>, debounce: Debounce) -> Self {
        Bursts {
            changes,
            debounce,
            last_done: None,
        }
    }

    /// Hands every change of the next burst to `apply`; returns when the burst started, or
    /// `None` once the sources are gone.
    pub(crate) async fn next(&mut self, mut apply: impl FnMut(C)) -> Option<Instant> {
        let first = self.changes.recv().await?;
        let since = Instant::now();
        apply(first);
        let mut queued = false;
        while let Ok(c) = self.changes.try_recv() {
            apply(c);
            queued = true;
        }
        let idle = self
            .last_done
            .is_some_and(|t| since.saturating_duration_since(t) >= self.debounce.quiet);
        if idle && !queued {
            return Some(since);
        }
        let deadline = since + self.debounce.max;
        loop {
            let wait = self
                .debounce
                .quiet
                .min(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(wait, self.changes.recv()).await {
                Ok(Some(c)) => apply(c),
                Ok(None) | Err(_) => break,
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Some(since)
    }

    /// Records that the burst returned by [`Bursts::next`] has been handled.
    pub(crate) fn done(&mut self) {
        self.last_done = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(10);

    fn bursts() -> (mpsc::Sender<u32>, Bursts<u32>) {
        let (tx, rx) = mpsc::channel(16);
        let debounce = Debounce {
            quiet: QUIET,
            max: Duration::from_millis(250),
        };
        (tx, Bursts::new(rx, debounce))
    }

    /// The next burst's changes and how long (virtual time) gathering it took.
    async fn gather(b: &mut Bursts<u32>) -> (Vec<u32>, Duration) {
        let mut got = Vec::new();
        let started = Instant::now();
        b.next(|c| got.push(c)).await.expect("a burst");
        (got, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_burst_is_debounced() {
        let (tx, mut b) = bursts();
        tx.send(1).await.unwrap();
        let (got, took) = gather(&mut b).await;
        assert_eq!(got, vec![1]);
        assert_eq!(
            took, QUIET,
            "before any translation the loop waits for the burst to settle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_isolated_change_after_a_quiet_period_goes_at_once() {
        let (tx, mut b) = bursts();
        tx.send(1).await.unwrap();
        gather(&mut b).await;
        b.done();
        tokio::time::advance(QUIET).await;
        tx.send(2).await.unwrap();
        let (got, took) = gather(&mut b).await;
        assert_eq!(got, vec![2]);
        assert_eq!(took, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_right_after_the_last_burst_is_debounced() {
        let (tx, mut b) = bursts();
        tx.send(1).await.unwrap();
        gather(&mut b).await;
        b.done();
        tokio::time::advance(QUIET / 2).await;
        tx.send(2).await.unwrap();
        let (got, took) = gather(&mut b).await;
        assert_eq!(got, vec![2]);
        assert_eq!(took, QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_queued_together_are_one_debounced_burst() {
        let (tx, mut b) = bursts();
        tx.send(1).await.unwrap();
        gather(&mut b).await;
        b.done();
        tokio::time::advance(QUIET * 3).await;
        for c in 2..5 {
            tx.send(c).await.unwrap();
        }
        let later = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(QUIET / 2).await;
            later.send(5).await.unwrap();
        });
        let (got, took) = gather(&mut b).await;
        assert_eq!(
            got,
            vec![2, 3, 4, 5],
            "the change within the quiet period joins the burst"
        );
        assert_eq!(took, QUIET / 2 + QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_ends_at_its_deadline() {
        let (tx, mut b) = bursts();
        tokio::spawn(async move {
            for c in 0.. {
                if tx.send(c).await.is_err() {
                    return;
                }
                tokio::time::sleep(QUIET / 2).await;
            }
        });
        let (got, took) = gather(&mut b).await;
        assert_eq!(took, Duration::from_millis(250));
        assert!(got.len() > 40, "{} changes", got.len());
    }

    #[tokio::test]
    async fn no_burst_once_the_sources_are_gone() {
        let (tx, mut b) = bursts();
        drop(tx);
        assert!(b.next(|_| {}).await.is_none());
    }
}
