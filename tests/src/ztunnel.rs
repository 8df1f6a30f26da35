//! A ztunnel process in a namespace: started with a local workload file and the development
//! CA, awaited through its readiness endpoint, queried through its admin endpoints, and
//! killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::Netns;

pub struct Ztunnel<'a> {
    pub ns: &'a Netns,
    child: Option<Child>,
    pub log: PathBuf,
}

/// Files a ztunnel reads: the development root and the workload state.
pub struct ZtunnelFiles<'a> {
    pub root_cert: &'a Path,
    pub root_key: &'a Path,
    pub state: &'a Path,
}

impl<'a> Ztunnel<'a> {
    /// Starts ztunnel in `ns` and waits until it reports ready.
    pub async fn start(ns: &'a Netns, files: &ZtunnelFiles<'_>, extra: &[&str]) -> anyhow::Result<Ztunnel<'a>> {
        Self::launch(ns, files, Some(files.state), extra).await
    }

    /// Starts ztunnel in `ns` with the development CA of `files` but without the local
    /// workload file: `args` name the workload source (say `--xds-address http://...`).
    /// Waits until it reports ready, which with xDS means a response of every type arrived.
    pub async fn start_with(ns: &'a Netns, files: &ZtunnelFiles<'_>, args: &[&str]) -> anyhow::Result<Ztunnel<'a>> {
        Self::launch(ns, files, None, args).await
    }

    /// Starts ztunnel in `ns` with exactly `args` besides node name and logging: the control
    /// plane (`--xds-address`, `--ca-address`, ...) provides state and certificates.
    pub async fn start_raw(ns: &'a Netns, args: &[&str]) -> anyhow::Result<Ztunnel<'a>> {
        Self::spawn(ns, &ns.name, None, None, args).await
    }

    /// As [`Ztunnel::start_raw`], for node `node` while running in namespace `ns` (a ztunnel
    /// pod beside the node's current one during an upgrade).
    pub async fn start_for_node(ns: &'a Netns, node: &str, args: &[&str]) -> anyhow::Result<Ztunnel<'a>> {
        Self::spawn(ns, node, None, None, args).await
    }

    async fn launch(
        ns: &'a Netns,
        files: &ZtunnelFiles<'_>,
        state: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<Ztunnel<'a>> {
        Self::spawn(ns, &ns.name, Some(files), state, extra).await
    }

    /// As [`Ztunnel::start`], running the ztunnel binary at `binary` (say, a build of another
    /// commit, for an A/B benchmark).
    pub async fn start_binary(
        ns: &'a Netns,
        files: &ZtunnelFiles<'_>,
        binary: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Ztunnel<'a>> {
        Self::spawn_binary(binary, ns, &ns.name, Some(files), Some(files.state), extra).await
    }

    async fn spawn(
        ns: &'a Netns,
        node: &str,
        files: Option<&ZtunnelFiles<'_>>,
        state: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<Ztunnel<'a>> {
        Self::spawn_binary(&crate::binary("ztunnel"), ns, node, files, state, extra).await
    }

    async fn spawn_binary(
        binary: &Path,
        ns: &'a Netns,
        node: &str,
        files: Option<&ZtunnelFiles<'_>>,
        state: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<Ztunnel<'a>> {
        let log = std::env::temp_dir().join(format!("{}-ztunnel.log", ns.name));
        let out = std::fs::File::create(&log)?;
        let mut command = ns.command(binary);
        if let Some(state) = state {
            command.arg("--local-xds-path").arg(state);
        }
        if let Some(files) = files {
            command
                .arg("--ca-root-cert")
                .arg(files.root_cert)
                .arg("--ca-root-key")
                .arg(files.root_key);
        }
        let child = command
            .args(["--node-name", node, "--log", "info,access=info", "--log-format", "json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning ztunnel (did `cargo build` run?)")?;
        let z = Ztunnel {
            ns,
            child: Some(child),
            log,
        };
        z.wait_ready(Duration::from_secs(20)).await?;
        Ok(z)
    }

    /// The process id (`ip netns exec` execs, so this is ztunnel itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Polls the readiness endpoint (ztunnel's own readiness signal) until it answers 200.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = self.get("127.0.0.1:15021", "/healthz/ready").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel in {} not ready within {within:?}; log:\n{}",
                    self.ns.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A plain HTTP/1.0 GET from inside the namespace; returns status and body.
    pub async fn get(&self, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
        http_request(self.ns, addr.parse()?, "GET", path).await
    }

    pub async fn post(&self, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
        http_request(self.ns, addr.parse()?, "POST", path).await
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.get("127.0.0.1:15020", "/metrics").await?.1)
    }

    pub async fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.get("127.0.0.1:15000", "/config_dump").await?.1,
        )?)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (`ip netns exec` execs the program, so the child pid is ztunnel itself).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let Some(child) = &self.child else { bail!("not running") };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(())
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<i32> {
        let Some(child) = self.child.as_mut() else {
            bail!("not running")
        };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                bail!("ztunnel did not exit within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Ztunnel<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- ztunnel log ({}) ---\n{}", self.ns.name, self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Minimal HTTP/1.0 client used for admin endpoints.
pub async fn http_request(ns: &Netns, addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = ns.connect(addr).await?;
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
