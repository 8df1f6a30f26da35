//! Lease-based leader election (`coordination.k8s.io/v1` Lease). One replica holds the lease
//! and writes to the API server; the others wait until it expires. Writes carry the lease's
//! `resourceVersion`, so of two replicas racing for an expired lease only one succeeds.

use std::time::Duration;

use ::kube::api::PostParams;
use ::kube::{Api, Client};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
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
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
}

impl LeaderConfig {
    /// How often the lease is renewed (or, when not leading, checked).
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 3
    }

    /// How long renewals may fail before the leader steps down; shorter than the lease so it
    /// stops writing before anyone else may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
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

/// Decides from the current lease spec (`None`: no Lease object), the time and our identity.
pub fn decide(spec: Option<&LeaseSpec>, now: Timestamp, me: &str) -> Decision {
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
    let Some(MicroTime(renewed)) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return Decision::Acquire;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    match renewed.checked_add(duration) {
        Ok(expiry) if expiry >= now => Decision::Wait {
            holder: holder.to_owned(),
        },
        Ok(_) => Decision::Acquire,
        // An expiry beyond the representable range is not expired.
        Err(_) => Decision::Wait {
            holder: holder.to_owned(),
        },
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
    spec.lease_duration_seconds = Some(i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX));
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
    // When the last successful write as leader was sent.
    let mut renewed: Option<Instant> = None;
    while !is_leader.is_closed() {
        let started = Instant::now();
        match attempt(&api, &config).await {
            Ok(true) => renewed = Some(started),
            Ok(false) => renewed = None,
            Err(e) => {
                warn!(lease = %config.name, error = %e, "leader election request failed");
                if renewed.is_some_and(|at| at.elapsed() > config.renew_deadline()) {
                    warn!(lease = %config.name, "could not renew the lease in time, stepping down");
                    renewed = None;
                }
            }
        }
        let leading = renewed.is_some();
        is_leader.send_if_modified(|current| {
            if *current == leading {
                return false;
            }
            info!(lease = %config.name, identity = %config.identity, leading, "leadership changed");
            *current = leading;
            true
        });
        tokio::time::sleep(config.retry_period()).await;
    }
}

/// One read-decide-write round; true when we hold the lease afterwards.
async fn attempt(api: &Api<Lease>, config: &LeaderConfig) -> Result<bool, KubeError> {
    let current = api.get_opt(&config.name).await?;
    let now = Timestamp::now();
    let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), now, &config.identity);
    let Some(lease) = claim(current.as_ref(), &decision, config, now) else {
        return Ok(false);
    };
    let written = match current {
        None => api.create(&PostParams::default(), &lease).await,
        Some(_) => api.replace(&config.name, &PostParams::default(), &lease).await,
    };
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
    fn decisions() {
        assert_eq!(decide(None, at(0), "me"), Decision::Acquire);
        assert_eq!(decide(Some(&LeaseSpec::default()), at(0), "me"), Decision::Acquire);
        assert_eq!(decide(Some(&held("me", 0, 15)), at(100), "me"), Decision::Renew);
        let other = held("other", 0, 15);
        assert_eq!(
            decide(Some(&other), at(10), "me"),
            Decision::Wait { holder: "other".into() }
        );
        assert_eq!(
            decide(Some(&other), at(15), "me"),
            Decision::Wait { holder: "other".into() }
        );
        assert_eq!(decide(Some(&other), at(16), "me"), Decision::Acquire);
        let never_renewed = LeaseSpec {
            holder_identity: Some("other".into()),
            ..LeaseSpec::default()
        };
        assert_eq!(decide(Some(&never_renewed), at(0), "me"), Decision::Acquire);
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
    }
}
