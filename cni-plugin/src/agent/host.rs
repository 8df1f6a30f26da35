//! Host-side rules in the node's own namespace: traffic the node itself sends to an enrolled
//! pod (kubelet health probes) is SNATed to 169.254.7.127, which the pod's rules let past the
//! capture, so probes keep working unchanged. Forwarded traffic from other pods is untouched
//! (its source is not a node address).
//!
//! The batches run through libnftables in the agent's own thread, which is in the node's
//! namespace ([`super::nft`]): no process per pod.

use mesh_core::capture::PROBE_SOURCE;

use super::nft;
use super::rules::RulesError;

/// The agent's table in the node namespace.
pub const HOST_TABLE: &str = "ambient-host";

/// The host table, with empty sets of enrolled pod addresses (replaced atomically).
pub fn ruleset() -> String {
    format!(
        r#"table inet {HOST_TABLE}
delete table inet {HOST_TABLE}
table inet {HOST_TABLE} {{
  set pods4 {{ type ipv4_addr; }}
  set pods6 {{ type ipv6_addr; }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr @pods4 fib saddr type local snat ip to {PROBE_SOURCE}
  }}
}}
"#
    )
}

/// Runs a batch in the agent's (the node's) namespace.
fn run(command: &str, batch: &str) -> Result<(), RulesError> {
    nft::run(batch).map(drop).map_err(|e| RulesError::Failed {
        command: command.to_owned(),
        netns: "the node's namespace".to_owned(),
        stderr: e.to_string(),
    })
}

/// Creates (or resets) the host table in the agent's namespace.
pub fn install() -> Result<(), RulesError> {
    run("nft -f (host table)", &ruleset())
}

fn element(verb: &str, ip: &str) -> Result<(), RulesError> {
    let set = if ip.contains(':') { "pods6" } else { "pods4" };
    run(
        &format!("nft {verb} element"),
        &format!("{verb} element inet {HOST_TABLE} {set} {{ {ip} }}\n"),
    )
}

/// Adds pod addresses (CIDR or plain) to the probe SNAT.
pub fn add_pod_ips(ips: &[String]) -> Result<(), RulesError> {
    for ip in ips {
        element("add", ip.split('/').next().unwrap_or(ip))?;
    }
    Ok(())
}

/// Removes pod addresses; absent ones are not an error.
pub fn remove_pod_ips(ips: &[String]) {
    for ip in ips {
        let _ = element("delete", ip.split('/').next().unwrap_or(ip));
    }
}
