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
pub mod bench;
pub mod capture;
pub mod cluster;
pub mod controller;
pub mod eastwest;
pub mod istio;
pub mod metrics;
pub mod multicluster;
pub mod netns;
pub mod profile;
pub mod prometheus;
pub mod tcpdump;
pub mod waypoint;
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
/// With `MESH_E2E_REQUIRED=1` (set by scripts/test.sh) a machine that cannot run them fails
/// the calling test instead of letting it skip and pass.
pub fn privileged() -> bool {
    let ok = nix::unistd::geteuid().is_root() && std::process::Command::new("ip").arg("-V").output().is_ok();
    if !ok && std::env::var_os("MESH_E2E_REQUIRED").is_some_and(|v| v == "1") {
        panic!("MESH_E2E_REQUIRED=1 but this test cannot run here: it needs root and iproute2 (`ip`)");
    }
    ok
}

/// Checks Prometheus text with `promtool check metrics` (Debian package `prometheus`,
/// installed by scripts/deps.sh); the error carries promtool's complaints.
pub fn promtool_check(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running promtool (scripts/deps.sh installs it): {e}"))?;
    if let Some(mut stdin) = check.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    let out = check.wait_with_output()?;
    // Istio's own metric names (`istio_request_duration_milliseconds`) break the base-unit
    // lint; dashboards depend on those names, so that one complaint is accepted for them.
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let only_istio_units = complaints
        .lines()
        .filter(|l| !l.trim().is_empty())
        .all(|l| l.starts_with("istio_") && l.contains("use base unit"));
    if !out.status.success() && !only_istio_units {
        anyhow::bail!(
            "promtool rejected the metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// True when the namespace cluster can be built here (root, `ip`, and the reference CNI
/// plugins); otherwise prints why the calling test is skipped, or fails it when
/// `MESH_E2E_REQUIRED=1` says the end-to-end tests must run here.
pub fn cluster_capable() -> bool {
    let ok = privileged() && std::path::Path::new(cluster::CNI_BIN).join("bridge").exists();
    if !ok {
        if std::env::var_os("MESH_E2E_REQUIRED").is_some_and(|v| v == "1") {
            panic!(
                "MESH_E2E_REQUIRED=1 but this test cannot run here: it needs root and containernetworking-plugins in {}",
                cluster::CNI_BIN
            );
        }
        eprintln!("skipping: needs root and containernetworking-plugins");
    }
    ok
}

/// Polls `f` every 50 ms until it holds, failing the test with `what` after `within`: for
/// conditions that have no readiness signal of their own (a counter, a log line).
pub async fn until<F, Fut>(what: &str, within: std::time::Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !f().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
