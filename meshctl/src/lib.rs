//! meshctl: the mesh's command line. Each subcommand lives in its own module; shared
//! helpers (HTTP, kubectl, tables, styling, progress) are small modules of their own.

pub mod analyze;
pub mod check;
pub mod clusters;
pub mod demo;
pub mod explain;
pub mod http;
pub mod install;
pub mod kubectl;
pub mod manifest_files;
pub mod progress;
pub mod style;
pub mod table;
pub mod vm;
pub mod waypoint;
pub mod ztunnel_config;
