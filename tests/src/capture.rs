//! Capture for test pods: the node agent's own redirection rules
//! ([`cni_plugin::agent::rules`]), installed into a test namespace.

use std::path::PathBuf;

use cni_plugin::agent::rules;

use crate::netns::Netns;

/// Path of a named namespace, as `ip netns` keeps it.
pub fn netns_path(ns: &Netns) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{}", ns.name))
}

/// Installs the ambient redirection in `ns`.
pub fn install(ns: &Netns) -> anyhow::Result<()> {
    rules::install(&netns_path(ns), rules::Ports::default())?;
    Ok(())
}
