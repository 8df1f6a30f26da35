//! Serving translation results over Delta ADS: [`snapshot`] turns outputs into versioned
//! resources, [`server`] streams differences to each client, [`metrics`] counts it.

pub mod metrics;
pub mod server;
pub mod snapshot;

pub use metrics::XdsMetrics;
pub use server::AdsServer;
pub use snapshot::Snapshot;
