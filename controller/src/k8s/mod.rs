//! The Kubernetes-facing layer: the only code that talks to the API server. It is kept thin on
//! purpose: [`watch`] turns watches into the same [`Change`](crate::source::Change)s the local
//! directory source produces, [`manifests`] builds the objects a waypoint runs as, [`writer`]
//! applies them and writes statuses, [`leader`] decides which replica writes, and
//! [`tokenreview`] authenticates CA callers. Everything behind it is tested through the local
//! source.

pub mod ingress_status;
pub mod leader;
pub mod manifests;
pub mod resources;
pub mod route_status;
pub mod tokenreview;
pub mod watch;
pub mod writer;

use mesh_core::identity::IdentityError;

use crate::model::ObjectKey;

/// The field manager for everything the controller writes with server-side apply.
pub const FIELD_MANAGER: &str = "mesh-controller";

/// Why a call to the API server (or what it returned) failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] ::kube::Error),
    #[error("the change channel is closed")]
    ChannelClosed,
    #[error("token not authenticated: {0}")]
    Unauthenticated(String),
    #[error("token user {0:?} is not a service account")]
    NotServiceAccount(String),
    #[error("token identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("encoding a request: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("{0}: no answer in time")]
    Timeout(&'static str),
    #[error("waypoint {0}: {1}")]
    Waypoint(ObjectKey, &'static str),
}

/// A client from the in-cluster service account, or the local kubeconfig.
pub async fn client() -> Result<::kube::Client, KubeError> {
    Ok(::kube::Client::try_default().await?)
}
