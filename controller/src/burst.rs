//! Gathers source changes into bursts, each translated once.
//!
//! A change that arrives alone (nothing else queued behind it) is translated at once: waiting
//! for a quiet period would only add that period to every lone change's latency. Changes that
//! arrive together (a relist, a rollout, a file of many objects) or while a translation runs
//! (they queue meanwhile) are debounced: the burst ends after a quiet period or at its
//! deadline, so a thousand changes cost a few translations rather than a thousand. The load
//! regulates itself: the busier the sources, the more each translation takes in.

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

/// The change stream, read a burst at a time.
pub(crate) struct Bursts<C> {
    changes: mpsc::Receiver<C>,
    debounce: Debounce,
}

impl<C> Bursts<C> {
    pub(crate) fn new(changes: mpsc::Receiver<C>, debounce: Debounce) -> Self {
        Bursts { changes, debounce }
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
        if !queued {
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
    async fn a_lone_change_goes_at_once() {
        let (tx, mut b) = bursts();
        for c in 1..3 {
            tx.send(c).await.unwrap();
            let (got, took) = gather(&mut b).await;
            assert_eq!(got, vec![c]);
            assert_eq!(took, Duration::ZERO, "change {c} waited");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn changes_queued_together_are_one_debounced_burst() {
        let (tx, mut b) = bursts();
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
        tx.send(0).await.unwrap();
        tx.send(1).await.unwrap();
        tokio::spawn(async move {
            for c in 2.. {
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
