//! The control plane: reads what users declare (Kubernetes API or a local manifest
//! directory), translates it into the workload xDS resources ztunnels and waypoints use,
//! serves them over Delta ADS, signs workload certificates, and deploys waypoints.

pub mod admin;
mod burst;
pub mod ca;
pub mod config;
pub mod core;
pub mod k8s;
pub mod mesh_config;
pub mod model;
mod parallel;
pub mod serve;
pub mod source;
pub mod translate;
pub mod waypoint;
pub mod xds;
