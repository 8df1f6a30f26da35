//! A waypoint in the network-namespace cluster, started the way the waypoint controller's
//! record asks: a pod (not captured: it speaks HBONE itself) running the waypoint binary with
//! its own identity, certificates and configuration from the controller. Killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{Cluster, Pod, PodSpec};
use crate::ztunnel::http_request;

pub struct Waypoint {
    // Field order is drop order: the process before its pod.
    child: Child,
    pub pod: Pod,
    pub log: PathBuf,
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- waypoint log ({}) ---\n{}", self.pod.ns.name, self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The SPIFFE identity of waypoint `name` in `namespace` (its service account is its name).
pub fn identity(namespace: &str, name: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{name}")
}

impl Waypoint {
    /// Creates the waypoint pod for Gateway `namespace/name` on `node` (labelled so that the
    /// Gateway's Service selects it and the node agent leaves it alone), starts the binary in
    /// it and waits until it has its certificate and configuration and every ztunnel knows it.
    pub async fn start(cluster: &Cluster, node: u8, namespace: &str, name: &str) -> Result<Waypoint> {
        Self::start_with(cluster, node, namespace, name, &[]).await
    }

    /// As [`Waypoint::start`], with `extra` flags (tracing, say).
    pub async fn start_with(
        cluster: &Cluster,
        node: u8,
        namespace: &str,
        name: &str,
        extra: &[&str],
    ) -> Result<Waypoint> {
        Self::start_replica(cluster, node, namespace, name, name, extra).await
    }

    /// One replica of waypoint `name`: pod `pod_name`, the waypoint's service account.
    pub async fn start_replica(
        cluster: &Cluster,
        node: u8,
        namespace: &str,
        name: &str,
        pod_name: &str,
        extra: &[&str],
    ) -> Result<Waypoint> {
        let labels = [
            ("gateway.networking.k8s.io/gateway-name", name),
            ("istio.io/dataplane-mode", "none"),
        ];
        let spec = PodSpec {
            name: pod_name,
            namespace,
            service_account: name,
            labels: &labels,
        };
        let pod = cluster.add_pod(node, spec)?;
        let id = identity(namespace, name);
        let log = std::env::temp_dir().join(format!("{}-waypoint.log", pod.ns.name));
        let out = std::fs::File::create(&log)?;
        let cp = format!("https://{}:15012", cluster.controller_ip());
        let child = pod
            .ns
            .command(&crate::binary("waypoint"))
            .args(["--identity", &id])
            .args(["--xds-address", &cp, "--ca-address", &cp])
            .arg("--trust-bundle")
            .arg(cluster.controller.trust_bundle())
            .arg("--token-file")
            .arg(cluster.controller.identity_token_file(&id))
            .args(["--log", "info,access=info"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning waypoint (did `cargo build` run?)")?;
        let w = Waypoint { child, pod, log };
        w.wait_ready(Duration::from_secs(20)).await?;
        // Ready is the waypoint's own view; clients reach it only once every ztunnel holds
        // its pod (the Service's endpoint), or they refuse with "no healthy endpoint".
        cluster.wait_known(&w.pod, Duration::from_secs(20)).await?;
        Ok(w)
    }

    /// The waypoint process (`ip netns exec` replaces itself with the program).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as the kubelet does to a replica that is scaled away.
    pub fn terminate(&self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits (without blocking the runtime) for the process to exit; its status.
    pub async fn exited(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("waypoint still running after {within:?}; log:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::new(self.pod.ip, 15020)
    }

    async fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_request(&self.pod.ns, self.metrics_addr(), "GET", "/healthz/ready").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("waypoint not ready within {within:?}; log:\n{}", self.logs())
    }

    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = http_request(&self.pod.ns, self.metrics_addr(), "GET", "/metrics").await?;
        anyhow::ensure!(status == 200, "waypoint /metrics answered {status}");
        Ok(body)
    }

    /// The configuration in force, from the admin port (localhost in the waypoint's pod).
    pub async fn config_dump(&self) -> Result<String> {
        let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
        let (status, body) = http_request(&self.pod.ns, admin, "GET", "/config_dump").await?;
        anyhow::ensure!(status == 200, "waypoint /config_dump answered {status}");
        Ok(body)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A Service on port 80 (target 8080) in `shop` with cluster IP 10.96.<id>.<n>; the port is
/// named `http`, which declares it HTTP.
pub fn service(id: u8, name: &str, selector: &str, n: u8, waypoint: bool) -> String {
    service_port(id, name, selector, n, waypoint, "http")
}

/// As [`service`], with the port named `port_name` (`tcp`, say, for a port whose protocol
/// is not declared HTTP).
pub fn service_port(id: u8, name: &str, selector: &str, n: u8, waypoint: bool, port_name: &str) -> String {
    let labels = if waypoint {
        ", labels: {istio.io/use-waypoint: waypoint}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop{labels}}}\n\
         spec: {{clusterIP: 10.96.{id}.{n}, selector: {{{selector}}}, ports: [{{name: {port_name}, port: 80, targetPort: 8080}}]}}\n---\n",
    )
}

/// The namespace `shop`, enrolled in ambient mode.
pub const AMBIENT_SHOP: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n";

/// Waypoint Gateway `name` in `shop` and the Service selecting its pods (10.96.<id>.<n>).
pub fn gateway(id: u8, name: &str, n: u8) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec: {{clusterIP: 10.96.{id}.{n}, selector: {{gateway.networking.k8s.io/gateway-name: {name}}}, ports: [{{name: mesh, port: 15008}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: shop, labels: {{istio.io/waypoint-for: service}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
"#
    )
}

/// The ambient namespace `shop` with the waypoint Gateway and its Service (10.96.<id>.50).
pub fn base(id: u8) -> String {
    format!("{AMBIENT_SHOP}{}", gateway(id, "waypoint", 50))
}
