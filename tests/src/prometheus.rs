//! A real Prometheus (Debian's `prometheus` package) scraping mesh components inside the
//! namespace cluster: started in a namespace that reaches every target, with a one-second
//! scrape interval, queried through its HTTP API. Killed on drop; its data lives in a
//! temporary directory.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::ztunnel::http_request;

pub struct Prometheus<'a> {
    child: Child,
    ns: &'a Netns,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `%XX` for everything but unreserved characters (RFC 3986), for PromQL in a query string.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `ns` on `addr`, scraping `targets` as (job, `host:port`), and
    /// waits until it is ready.
    pub async fn start(ns: &'a Netns, addr: SocketAddr, targets: &[(&str, SocketAddr)]) -> Result<Prometheus<'a>> {
        let dir = tempfile::tempdir()?;
        let mut config = String::from("global: {scrape_interval: 1s, scrape_timeout: 900ms}\nscrape_configs:\n");
        let mut jobs: Vec<&str> = targets.iter().map(|(j, _)| *j).collect();
        jobs.dedup();
        for job in jobs {
            let addrs: Vec<String> = targets
                .iter()
                .filter(|(j, _)| *j == job)
                .map(|(_, a)| format!("'{a}'"))
                .collect();
            config.push_str(&format!(
                "- job_name: {job}\n  static_configs: [{{targets: [{}]}}]\n",
                addrs.join(", ")
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = ns
            .command(std::path::Path::new("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (scripts/deps.sh installs it)")?;
        let p = Prometheus { child, ns, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_request(ns, addr, "GET", "/-/ready").await {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready within 30 s; log:\n{}", p.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query and returns `data.result` (an error names what Prometheus said).
    pub async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let (status, body) = http_request(self.ns, self.addr, "GET", &path).await?;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("query {promql:?}: HTTP {status}: {body}"))?;
        if v["status"] != "success" {
            bail!("query {promql:?} failed: {}", v["error"]);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `promql` returns at least one series (scrapes are asynchronous).
    pub async fn wait_for(&self, promql: &str, within: Duration) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + within;
        loop {
            let r = self.query(promql).await?;
            if !r.is_empty() {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("no series for {promql:?} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
