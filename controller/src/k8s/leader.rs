//! Lease-based leader election (`coordination.k8s.io/v1` Lease). One replica holds the lease
//! and writes to the API server; the others wait until it expires. Writes carry the lease's
//! `resourceVersion`, so of two replicas racing for an expired lease only one succeeds.
//!
//! Two rules keep two replicas from both writing when an API call hangs or clocks disagree:
//! - every Lease call has a deadline (`call_timeout`, well under the renew deadline), and the
//!   leader's flag drops at `renew_deadline` after the start of its last successful renewal
//!   whatever the loop is doing, so a stalled leader stops writing before anyone may take over;
//! - expiry is judged from what this replica saw, on its own monotonic clock: a lease held by
//!   someone else is expired only when we have not seen it change (holder, renewTime or
//!   resourceVersion) for its lease duration. The holder's wall-clock `renewTime` is never
//!   compared with ours.

use std::time::Duration;

use ::kube::api::PostParams;
use ::kube::{Api, Client};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::KubeError;

/// Which lease, who we are, and how long a lease lasts.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// The controller's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// Holder identity: the pod name.
    pub identity: String,
    /// How long a lease stays valid without renewal (whole seconds are written to the Lease).
    pub lease_duration: Duration,
}

impl LeaderConfig {
    /// How often the lease is renewed (or, when not leading, checked).
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 3
    }

    /// How long after the start of its last successful renewal the leader stops writing;
    /// shorter than the lease so it stops before anyone else may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// The deadline of one Lease call (a round makes two): a hung call ends well before the
    /// renew deadline.
    pub fn call_timeout(&self) -> Duration {
        self.lease_duration / 5
    }
}

/// What to do with the lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Absent, unheld or expired: take it.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else holds a valid lease.
    Wait { holder: String },
}

/// What identifies one version of the lease: any change of it is a renewal we saw.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
}

/// When this replica last saw the lease change, on its monotonic clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Version, Instant)>,
}

impl Observer {
    /// Records `lease` as seen at `now`; returns how long it has gone unchanged.
    pub fn observe(&mut self, lease: Option<&Lease>, now: Instant) -> Duration {
        let Some(lease) = lease else {
            self.last = None;
            return Duration::ZERO;
        };
        let spec = lease.spec.as_ref();
        let version = Version {
            holder: spec.and_then(|s| s.holder_identity.clone()),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            resource_version: lease.metadata.resource_version.clone(),
        };
        match &self.last {
            Some((seen, at)) if *seen == version => now.saturating_duration_since(*at),
            _ => {
                self.last = Some((version, now));
                Duration::ZERO
            }
        }
    }
}

/// Decides from the current lease spec (`None`: no Lease object), how long we have seen it
/// unchanged, our identity and our own lease duration (used when the lease names none).
pub fn decide(spec: Option<&LeaseSpec>, unchanged_for: Duration, me: &str, ours: Duration) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = match spec.lease_duration_seconds {
        Some(s) if s > 0 => Duration::from_secs(u64::from(s.unsigned_abs())),
        _ => ours,
    };
    if unchanged_for >= duration {
        Decision::Acquire
    } else {
        Decision::Wait {
            holder: holder.to_owned(),
        }
    }
}

/// The lease to write for `decision` (`None` for [`Decision::Wait`]), keeping the current
/// object's metadata (and so its `resourceVersion`).
pub fn claim(current: Option<&Lease>, decision: &Decision, config: &LeaderConfig, now: Timestamp) -> Option<Lease> {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    match decision {
        Decision::Wait { .. } => return None,
        Decision::Renew => {}
        Decision::Acquire => {
            let had_holder = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
            if had_holder {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            }
            spec.holder_identity = Some(config.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
        }
    }
    spec.renew_time = Some(MicroTime(now));
    // At least one second: a zero duration would read as "use your own" to others.
    let seconds = config.lease_duration.as_secs().max(1);
    spec.lease_duration_seconds = Some(i32::try_from(seconds).unwrap_or(i32::MAX));
    Some(lease)
}

/// Starts the election in a task; the receiver says whether this replica leads.
pub fn spawn(client: Client, config: LeaderConfig) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(run(client, config, tx));
    rx
}

/// Runs the election until every receiver of `is_leader` is dropped.
pub async fn run(client: Client, config: LeaderConfig, is_leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observer = Observer::default();
    // The start of the last successful round as leader: the flag drops renew_deadline later.
    let mut renewed: Option<Instant> = None;
    while !is_leader.is_closed() {
        let started = Instant::now();
        // A leader's round ends at its step-down time at the latest, so the flag drops on time.
        let mut until = started + config.call_timeout() * 2;
        if let Some(at) = renewed {
            until = until.min(at + config.renew_deadline());
        }
        match tokio::time::timeout_at(until, attempt(&api, &config, &mut observer)).await {
            Ok(Ok(true)) => renewed = Some(started),
            Ok(Ok(false)) => renewed = None,
            Ok(Err(e)) => warn!(lease = %config.name, error = %e, "leader election request failed"),
            Err(_) => warn!(lease = %config.name, "leader election round timed out"),
        }
        if renewed.is_some_and(|at| at.elapsed() >= config.renew_deadline()) {
            warn!(lease = %config.name, "could not renew the lease in time, stepping down");
            renewed = None;
        }
        publish(&is_leader, renewed.is_some(), &config);
        let mut next = Instant::now() + config.retry_period();
        if let Some(at) = renewed {
            next = next.min(at + config.renew_deadline());
        }
        tokio::time::sleep_until(next).await;
    }
}

fn publish(is_leader: &watch::Sender<bool>, leading: bool, config: &LeaderConfig) {
    is_leader.send_if_modified(|current| {
        if *current == leading {
            return false;
        }
        info!(lease = %config.name, identity = %config.identity, leading, "leadership changed");
        *current = leading;
        true
    });
}

/// One read-decide-write round, each call under `call_timeout`; true when we hold the lease
/// afterwards.
async fn attempt(api: &Api<Lease>, config: &LeaderConfig, observer: &mut Observer) -> Result<bool, KubeError> {
    let deadline = config.call_timeout();
    let current = tokio::time::timeout(deadline, api.get_opt(&config.name))
        .await
        .map_err(|_| KubeError::Timeout("get lease"))??;
    let unchanged_for = observer.observe(current.as_ref(), Instant::now());
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        unchanged_for,
        &config.identity,
        config.lease_duration,
    );
    let Some(lease) = claim(current.as_ref(), &decision, config, Timestamp::now()) else {
        return Ok(false);
    };
    let params = PostParams::default();
    let write = async {
        match current {
            None => api.create(&params, &lease).await,
            Some(_) => api.replace(&config.name, &params, &lease).await,
        }
    };
    let written = tokio::time::timeout(deadline, write)
        .await
        .map_err(|_| KubeError::Timeout("write lease"))?;
    match written {
        Ok(_) => Ok(true),
        // Someone else wrote first (created it, or changed its resourceVersion).
        Err(::kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
            info!(lease = %config.name, "lost a race for the lease");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid time")
    }

    fn held(holder: &str, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            renew_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    fn config() -> LeaderConfig {
        LeaderConfig {
            namespace: "istio-system".into(),
            name: "mesh-controller".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn decisions_use_the_locally_observed_age() {
        let ours = Duration::from_secs(15);
        let secs = Duration::from_secs;
        assert_eq!(decide(None, secs(0), "me", ours), Decision::Acquire);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), secs(0), "me", ours),
            Decision::Acquire
        );
        assert_eq!(decide(Some(&held("me", 0, 15)), secs(100), "me", ours), Decision::Renew);
        // The holder's renewTime is far in the past (its clock is behind ours): irrelevant,
        // only how long we have seen it unchanged counts.
        let other = held("other", -100_000, 15);
        let wait = Decision::Wait { holder: "other".into() };
        assert_eq!(decide(Some(&other), secs(0), "me", ours), wait);
        assert_eq!(decide(Some(&other), secs(14), "me", ours), wait);
        assert_eq!(decide(Some(&other), secs(15), "me", ours), Decision::Acquire);
        // No duration on the lease: ours.
        let never_renewed = LeaseSpec {
            holder_identity: Some("other".into()),
            ..LeaseSpec::default()
        };
        assert_eq!(decide(Some(&never_renewed), secs(14), "me", ours), wait);
        assert_eq!(decide(Some(&never_renewed), secs(15), "me", ours), Decision::Acquire);
    }

    #[test]
    fn observer_restarts_the_age_on_any_change() {
        let start = Instant::now();
        let lease = |rv: &str, renewed: i64| Lease {
            metadata: ObjectMeta {
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(held("other", renewed, 15)),
        };
        let mut seen = Observer::default();
        assert_eq!(seen.observe(Some(&lease("1", 0)), start), Duration::ZERO);
        let later = start + Duration::from_secs(7);
        assert_eq!(seen.observe(Some(&lease("1", 0)), later), Duration::from_secs(7));
        // A renewal (new resourceVersion) restarts the count, whatever its renewTime says.
        assert_eq!(seen.observe(Some(&lease("2", -50)), later), Duration::ZERO);
        let much_later = later + Duration::from_secs(20);
        assert_eq!(
            seen.observe(Some(&lease("2", -50)), much_later),
            Duration::from_secs(20)
        );
        assert_eq!(seen.observe(None, much_later), Duration::ZERO);
    }

    #[test]
    fn claims() {
        let cfg = config();
        let fresh = claim(None, &Decision::Acquire, &cfg, at(0)).expect("lease");
        assert_eq!(fresh.metadata.name.as_deref(), Some("mesh-controller"));
        assert_eq!(fresh.metadata.namespace.as_deref(), Some("istio-system"));
        let spec = fresh.spec.as_ref().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, None);

        let mut taken = Lease {
            metadata: ObjectMeta {
                resource_version: Some("42".into()),
                ..fresh.metadata.clone()
            },
            spec: Some(held("other", 0, 15)),
        };
        taken = claim(Some(&taken), &Decision::Acquire, &cfg, at(20)).expect("lease");
        assert_eq!(
            taken.metadata.resource_version.as_deref(),
            Some("42"),
            "optimistic concurrency"
        );
        let spec = taken.spec.as_ref().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(20))));

        let renewed = claim(Some(&taken), &Decision::Renew, &cfg, at(25)).expect("lease");
        let spec = renewed.spec.as_ref().expect("spec");
        assert_eq!(spec.renew_time, Some(MicroTime(at(25))));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(spec.lease_transitions, Some(1));

        assert!(claim(Some(&taken), &Decision::Wait { holder: "x".into() }, &cfg, at(0)).is_none());
    }

    #[test]
    fn timings() {
        let cfg = config();
        assert_eq!(cfg.retry_period(), Duration::from_secs(5));
        assert_eq!(cfg.renew_deadline(), Duration::from_secs(10));
        // A round (two calls) ends before the renew deadline.
        assert!(cfg.call_timeout() * 2 < cfg.renew_deadline());
    }
}
