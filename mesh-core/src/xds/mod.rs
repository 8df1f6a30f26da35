//! Sources that fill the [`crate::state::StateStore`]: the Delta ADS client and a local file.
//!
//! - [`client`]: Delta ADS (`DeltaAggregatedResources`) for `istio.workload.Address` and
//!   `istio.security.Authorization`, with ACK/NACK, resumption and reconnection.
//! - [`workload_file`]: a YAML file of workloads, services and policies in the same shape,
//!   for standalone runs and tests.
//!
//! Both go through [`crate::state::State::apply_address`] and
//! [`crate::state::State::apply_authorization`], so validation is the same whichever source a
//! resource came from.

pub mod client;
pub mod workload_file;

pub use client::{ResourceSink, XdsClient, XdsConfig, XdsError, XdsMetrics};
pub use workload_file::{EntryError, LocalConfig, LocalError, LocalSource, Reload};

use mesh_proto::{security as secpb, workload as pb};

use crate::state::State;

/// Where an applied resource lives in the [`State`]. Sources remember this per resource so a
/// removal (or a replacement under another key) deletes exactly what was applied, whatever
/// name the resource was delivered under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum StoreKey {
    /// A workload, by uid.
    Workload(String),
    /// A service, by `ns/hostname`.
    Service(String),
    /// A policy, by `ns/name`.
    Policy(String),
}

impl StoreKey {
    /// The key an Address resource is stored under, when it carries a workload or a service.
    pub(crate) fn of_address(a: &pb::Address) -> Option<StoreKey> {
        match &a.r#type {
            Some(pb::address::Type::Workload(w)) => Some(StoreKey::Workload(w.uid.clone())),
            Some(pb::address::Type::Service(s)) => Some(StoreKey::Service(format!("{}/{}", s.namespace, s.hostname))),
            None => None,
        }
    }

    /// The key an Authorization resource is stored under.
    pub(crate) fn of_authorization(a: &secpb::Authorization) -> StoreKey {
        StoreKey::Policy(format!("{}/{}", a.namespace, a.name))
    }

    /// The key as a resource name (what the control plane names it by convention).
    pub(crate) fn name(&self) -> &str {
        match self {
            StoreKey::Workload(k) | StoreKey::Service(k) | StoreKey::Policy(k) => k,
        }
    }

    /// Removes the resource from `state`; true when it was there.
    pub(crate) fn remove(&self, state: &mut State) -> bool {
        match self {
            StoreKey::Workload(uid) => state.remove_workload(uid),
            StoreKey::Service(key) => state.remove_service(key),
            StoreKey::Policy(key) => state.remove_policy(key),
        }
    }
}
