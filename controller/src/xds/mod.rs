//! Serving translation results over Delta ADS: [`snapshot`] turns outputs into versioned
//! resources, [`server`] streams differences to each client (the
//! resources encoded once, shared by all: `wire`), [`metrics`] counts it.

pub mod metrics;
pub mod server;
pub mod snapshot;
mod wire;

pub use metrics::XdsMetrics;
pub use server::{AdsServer, MAX_NAMES, SEND_TIMEOUT};
pub use snapshot::Snapshot;
pub use wire::{AdsService, EncodedResponse, Resources};
