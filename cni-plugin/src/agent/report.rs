//! Telling the rest of the mesh which pods are enrolled. Local mode writes a report file (in
//! `Agent::persist`); cluster mode annotates pods through an [`EnrolmentReporter`]. Reporters
//! hear transitions only: [`Reported`] remembers what was last said and yields the difference, so
//! an unchanged pod costs no API call.

use std::collections::BTreeSet;

/// Hears that a pod became captured (`true`) or released (`false`).
pub trait EnrolmentReporter: Send + Sync {
    /// Called with the agent's pod lock held: queue the work, never block on it.
    fn report(&self, namespace: &str, name: &str, captured: bool);
}

/// A pod's `(namespace, name)`.
pub type PodKey = (String, String);

/// The pods last reported as captured.
#[derive(Debug, Default)]
pub struct Reported {
    captured: BTreeSet<PodKey>,
}

impl Reported {
    /// Records `now` as the captured set and returns what changed since the last call:
    /// `(key, true)` for newly captured pods, `(key, false)` for released ones.
    pub fn update(&mut self, now: BTreeSet<PodKey>) -> Vec<(PodKey, bool)> {
        let mut changes: Vec<(PodKey, bool)> = now.difference(&self.captured).map(|k| (k.clone(), true)).collect();
        changes.extend(self.captured.difference(&now).map(|k| (k.clone(), false)));
        self.captured = now;
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(keys: &[(&str, &str)]) -> BTreeSet<PodKey> {
        keys.iter().map(|(n, p)| (n.to_string(), p.to_string())).collect()
    }

    fn key(ns: &str, name: &str) -> PodKey {
        (ns.to_owned(), name.to_owned())
    }

    #[test]
    fn reports_only_transitions() {
        let mut reported = Reported::default();
        assert_eq!(
            reported.update(set(&[("shop", "web"), ("shop", "db")])),
            vec![(key("shop", "db"), true), (key("shop", "web"), true)]
        );
        // Nothing changed: nothing to say.
        assert!(reported.update(set(&[("shop", "web"), ("shop", "db")])).is_empty());
        assert_eq!(
            reported.update(set(&[("shop", "web"), ("blog", "api")])),
            vec![(key("blog", "api"), true), (key("shop", "db"), false)]
        );
        assert_eq!(
            reported.update(BTreeSet::new()),
            vec![(key("blog", "api"), false), (key("shop", "web"), false)]
        );
    }
}
