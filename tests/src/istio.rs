//! Istio's own ztunnel (`../shared/peers/istio-ztunnel`, built from istio/ztunnel) as a
//! process in a test namespace, configured only by its environment variables as a user would
//! run it; logs captured to a file (printed when a test panics), killed on drop.
//!
//! The binary is a test peer, never linked or shipped. When it is missing, [`peer`] fails
//! under `CI` (the interop tests must run there) and otherwise returns `None` so the test
//! can skip with a note.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::netns::Netns;
use crate::ztunnel::http_request;

/// Where the reference peer lives, relative to the project root.
pub const PEER_PATH: &str = "../shared/peers/istio-ztunnel";

/// Istio's ztunnel ports (DESIGN.md): admin, metrics, readiness.
pub const ADMIN: u16 = 15000;
pub const STATS: u16 = 15020;
pub const READINESS: u16 = 15021;

/// The peer binary: `Ok(Some)` when present, `Ok(None)` (skip, with a note on stderr) when
/// absent outside CI, an error when absent under `CI`.
pub fn peer() -> anyhow::Result<Option<PathBuf>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(PEER_PATH);
    if path.is_file() {
        return Ok(Some(path));
    }
    if std::env::var_os("CI").is_some() {
        bail!(
            "Istio's ztunnel is missing at {} (resolved {}): CI must provide it (see ../shared/peers/README.md)",
            PEER_PATH,
            path.display()
        );
    }
    eprintln!(
        "note: skipping: Istio's ztunnel not found at {PEER_PATH} ({}); set it up to run the interop tests",
        path.display()
    );
    Ok(None)
}

/// A running Istio ztunnel.
pub struct IstioZtunnel<'a> {
    pub ns: &'a Netns,
    child: Option<Child>,
    pub log: PathBuf,
}

impl<'a> IstioZtunnel<'a> {
    /// Starts `binary` in `ns` with exactly `env` (plus `RUST_LOG` when the caller does not
    /// set it); does not wait for readiness.
    pub fn spawn(ns: &'a Netns, binary: &Path, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("{}-istio-ztunnel.log", ns.name));
        let out = std::fs::File::create(&log)?;
        let mut command: Command = ns.command(binary);
        command.env_clear();
        command.env("PATH", std::env::var_os("PATH").unwrap_or_default());
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        Ok(IstioZtunnel {
            ns,
            child: Some(child),
            log,
        })
    }

    /// The process id (`ip netns exec` execs, so this is Istio's ztunnel itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Polls `/healthz/ready` on 15021 until it answers 200; fails early if the process exits.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let addr = SocketAddr::from(([127, 0, 0, 1], READINESS));
            if let Ok((200, _)) = http_request(self.ns, addr, "GET", "/healthz/ready").await {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
                    bail!("Istio's ztunnel exited ({status}); log:\n{}", self.logs());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "Istio's ztunnel in {} not ready within {within:?}; log:\n{}",
                    self.ns.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET on one of its localhost ports.
    pub async fn get(&self, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
        http_request(self.ns, SocketAddr::from(([127, 0, 0, 1], port)), "GET", path).await
    }

    /// `/config_dump` from its admin port.
    pub async fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get(ADMIN, "/config_dump").await?;
        if status != 200 {
            bail!("config_dump: HTTP {status}: {body}");
        }
        serde_json::from_str(&body).context("config_dump is not JSON")
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.get(STATS, "/metrics").await?.1)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for IstioZtunnel<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- Istio ztunnel log ({}) ---\n{}", self.ns.name, self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over `/etc/hosts` for processes it
/// starts in that namespace: lets a process reach the controller by a DNS name (say
/// `istiod.istio-system.svc`) without cluster DNS. Removed on drop.
pub struct HostsFile {
    dir: PathBuf,
}

impl HostsFile {
    /// Maps each `(name, ip)` for processes started in `ns` from now on.
    pub fn write(ns: &Netns, entries: &[(&str, std::net::IpAddr)]) -> anyhow::Result<Self> {
        let dir = Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let guard = HostsFile { dir };
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, ip) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(guard.dir.join("hosts"), text)?;
        Ok(guard)
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The workloads (by uid) in an Istio ztunnel config dump.
pub fn dumped_workloads(dump: &serde_json::Value) -> Vec<String> {
    dump.get("workloads")
        .and_then(|w| w.as_array())
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w.get("uid").and_then(|u| u.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The certificates in an Istio ztunnel config dump, as `(identity, state)` pairs.
pub fn dumped_certificates(dump: &serde_json::Value) -> Vec<(String, String)> {
    dump.get("certificates")
        .and_then(|c| c.as_array())
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let s = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                    (s("identity"), s("state"))
                })
                .collect()
        })
        .unwrap_or_default()
}
