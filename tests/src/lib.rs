//! A test bed made of real kernel network namespaces. Every namespace, process and file it
//! creates is removed when its guard drops, including when a test panics.
//!
//! - [`Netns`]: one namespace; run commands in it, spawn processes in it, and create sockets
//!   inside it from the test process (the thread switches in with `setns`, makes the socket
//!   and switches back, as ztunnel's in-pod mode does).
//! - [`Hub`]: a namespace holding a bridge that pods attach to with veth pairs.
//! - [`capture`]: the redirection rules of an ambient pod (nftables + policy routing).
//! - [`Ztunnel`]: a ztunnel process in a namespace, with readiness and admin helpers.

pub mod apps;
pub mod bed;
pub mod capture;
pub mod controller;
pub mod netns;
pub mod ztunnel;

pub use bed::Bed;
pub use netns::{Hub, Netns};
pub use ztunnel::Ztunnel;

/// Path of a workspace binary of the same build profile as the running executable: tests
/// run from `target/<profile>/deps/`, binaries from `target/<profile>/`.
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(|d| d.to_path_buf()).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

/// True when this process may create namespaces (root with CAP_SYS_ADMIN and `ip` present).
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root() && std::process::Command::new("ip").arg("-V").output().is_ok()
}
