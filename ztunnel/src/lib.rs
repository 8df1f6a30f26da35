//! ztunnel: the per-node proxy of the ambient mesh. Captured pod TCP leaves through the
//! outbound listener and travels over HBONE (HTTP/2 CONNECT in mutual TLS) to the destination's
//! ztunnel, which authorizes it and hands it to the application.
//!
//! A library so the proxy can be started and tested inside one process (`tests/in_process.rs`
//! runs dedicated mode on loopback); the `ztunnel` binary only parses the configuration, sets
//! up logging and the runtime, and calls [`app::run`].

pub mod admin;
pub mod app;
pub mod config;
pub mod dns;
pub mod inpod;
pub mod metrics;
pub mod proxy;
