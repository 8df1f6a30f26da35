//! A Kubernetes-like cluster made of network namespaces, as real as this kernel allows:
//!
//! - an underlay bridge (`Hub`) with one namespace per node (`10.90.<id>.<i+1>`), each node
//!   routing to the others' pod CIDRs (`10.<100+i>.<id>.0/24`) over the underlay;
//! - pods created as a container runtime does it: a namespace, then the reference `bridge` +
//!   `host-local` plugins and our `ambient-cni` chained after them (CNI_* environment, config
//!   on stdin), run in the node namespace; deletion with CNI DEL;
//! - the controller in local mode in its own namespace on the underlay (`10.90.<id>.100`),
//!   reading a manifest directory this harness keeps current the way a kubelet would (pod
//!   objects first, `status.podIP` after the sandbox exists), and the node agents' enrolment
//!   reports;
//! - per node: the `cni-agent` and an in-pod-mode ztunnel taking state and certificates from
//!   the controller.
//!
//! Everything (processes, namespaces, links, files) goes when the [`Cluster`] is dropped,
//! including on panic.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::controller::Controller;
use crate::netns::{Hub, Netns};
use crate::ztunnel::Ztunnel;

/// The reference plugins' directory (Debian's containernetworking-plugins).
pub const CNI_BIN: &str = "/usr/lib/cni";

/// Runs one CNI plugin in `node` as a runtime would: CNI_* environment, config on stdin.
/// Returns stdout on success, stdout+stderr on failure.
pub fn run_plugin(
    node: &Netns,
    plugin: &Path,
    command: &str,
    pod: &Netns,
    name: &str,
    namespace: &str,
    config: &str,
) -> Result<String, String> {
    let mut child = node
        .direct_command(plugin)
        .map_err(|e| e.to_string())?
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("ctr-{}", pod.name))
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.name))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_BIN)
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(config.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// One node: its namespace, agent and ztunnel.
pub struct Node {
    /// Lives as long as the cluster (processes borrow it); deleted by the cluster's `Drop`.
    pub ns: &'static Netns,
    pub index: u8,
    pub dir: tempfile::TempDir,
    agent: Mutex<Option<Child>>,
    pub ztunnel: Mutex<Option<Ztunnel<'static>>>,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.ns.name
    }

    pub fn cni_socket(&self) -> PathBuf {
        self.dir.path().join("cni.sock")
    }

    pub fn zds_socket(&self) -> PathBuf {
        self.dir.path().join("ztunnel.sock")
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Stops the node agent (to test what happens without it).
    pub fn stop_agent(&self) {
        if let Some(mut a) = self.agent.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

/// A pod created through the CNI chain.
pub struct Pod {
    pub ns: Netns,
    pub name: String,
    pub namespace: String,
    pub ip: IpAddr,
    pub node: u8,
    /// How long our plugin's ADD took (process start to exit, agent work included).
    pub plugin_add: Duration,
}

impl Pod {
    /// Whether the agent's redirection table exists in the pod.
    pub fn captured(&self) -> bool {
        self.ns.exec(&["nft", "list", "table", "inet", "ambient"]).is_ok()
    }
}

pub struct Cluster {
    pub id: u8,
    /// The controller's `--cluster-id` (workload uids start with it).
    pub cluster_id: String,
    /// More flags of every node's ztunnel.
    ztunnel_extra: Vec<String>,
    // Field order is drop order: processes before the namespaces they run in.
    pub controller: Controller<'static>,
    pub nodes: Vec<Node>,
    control: &'static Netns,
    hub: Hub,
    manifests: PathBuf,
    /// Namespaces of ztunnels started beside a node's own (upgrades).
    extra: Mutex<Vec<&'static Netns>>,
}

/// Node and control-plane namespaces are borrowed by the processes running in them for as
/// long as the cluster lives; they are leaked (a few bytes) and deleted by `Cluster::drop`.
fn leak(ns: Netns) -> &'static Netns {
    Box::leak(Box::new(ns))
}

impl Cluster {
    pub fn underlay_ip(id: u8, node: u8) -> IpAddr {
        Ipv4Addr::new(10, 90, id, node + 1).into()
    }

    pub fn controller_ip(&self) -> IpAddr {
        Ipv4Addr::new(10, 90, self.id, 100).into()
    }

    fn pod_cidr(id: u8, node: u8) -> String {
        format!("10.{}.{id}.0/24", 100 + u16::from(node))
    }

    /// A service VIP in this cluster's range (never routed: ztunnel takes it first).
    pub fn vip(&self, n: u8) -> IpAddr {
        Ipv4Addr::new(10, 96, self.id, n).into()
    }

    /// Builds the cluster with `nodes` nodes and `manifests` (namespaces, services, policies:
    /// anything but pods, which [`Cluster::add_pod`] writes). Waits until every part is ready.
    pub async fn start(id: u8, nodes: u8, manifests: &str) -> Result<Cluster> {
        Self::start_with_identities(id, nodes, manifests, &[]).await
    }

    /// As [`Cluster::start`]; the controller also accepts a bootstrap token for each of
    /// `identities` (SPIFFE IDs of waypoints the test will run).
    pub async fn start_with_identities(id: u8, nodes: u8, manifests: &str, identities: &[&str]) -> Result<Cluster> {
        let options = crate::controller::Options {
            identities: identities.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        Self::start_with_options(id, nodes, manifests, options).await
    }

    /// As [`Cluster::start`] with the controller started as `options` say (node agents'
    /// enrolment reports are always read); its `--cluster-id` among `options.args` names the
    /// cluster's workloads.
    pub async fn start_with_options(
        id: u8,
        nodes: u8,
        manifests: &str,
        mut options: crate::controller::Options,
    ) -> Result<Cluster> {
        options.enrolment = true;
        let cluster_id = options
            .args
            .iter()
            .position(|a| a == "--cluster-id")
            .and_then(|i| options.args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| "Kubernetes".to_owned());
        let hub = Hub::new()?;
        let control = leak(Netns::new("cp")?);
        hub.attach(control, &[&format!("10.90.{id}.100/24")])?;
        let mut node_names = Vec::new();
        let mut built = Vec::new();
        for i in 0..nodes {
            let ns = leak(Netns::new(&format!("n{i}-"))?);
            hub.attach(ns, &[&format!("{}/24", Self::underlay_ip(id, i))])?;
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            node_names.push(ns.name.clone());
            built.push(Node {
                ns,
                index: i,
                dir: tempfile::tempdir()?,
                agent: Mutex::new(None),
                ztunnel: Mutex::new(None),
            });
        }
        for n in &built {
            for other in built.iter().filter(|o| o.index != n.index) {
                let via = Self::underlay_ip(id, other.index).to_string();
                n.ns.exec(&["ip", "route", "add", &Self::pod_cidr(id, other.index), "via", &via])?;
            }
        }
        // Pods that talk to the control plane themselves (waypoints) need the way back.
        for n in &built {
            let via = Self::underlay_ip(id, n.index).to_string();
            control.exec(&["ip", "route", "add", &Self::pod_cidr(id, n.index), "via", &via])?;
        }
        let names: Vec<&str> = node_names.iter().map(String::as_str).collect();
        let cp_ip = Ipv4Addr::new(10, 90, id, 100).into();
        let controller = Controller::start_with_options(control, cp_ip, &names, manifests, &options).await?;
        let manifests = controller.dir.path().join("manifests");
        let cluster = Cluster {
            id,
            cluster_id,
            ztunnel_extra: options.ztunnel_args.clone(),
            controller,
            nodes: built,
            control,
            hub,
            manifests,
            extra: Mutex::new(Vec::new()),
        };
        for n in &cluster.nodes {
            cluster.start_agent(n.index).await?;
        }
        for i in 0..nodes {
            cluster.replace_ztunnel(i).await?;
        }
        Ok(cluster)
    }

    /// Starts (or restarts) node `i`'s agent and waits for its CNI socket.
    pub async fn start_agent(&self, i: u8) -> Result<()> {
        let n = &self.nodes[usize::from(i)];
        n.stop_agent();
        let _ = std::fs::remove_file(n.cni_socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.path().join("agent.log"))?;
        let report = self.controller.enrolment_dir().join(format!("{}.json", n.name()));
        let child =
            n.ns.command(&crate::binary("cni-agent"))
                .arg("--cni-socket")
                .arg(n.cni_socket())
                .arg("--zds-socket")
                .arg(n.zds_socket())
                .arg("--manifest-dir")
                .arg(&self.manifests)
                .arg("--state-file")
                .arg(n.dir.path().join("pods.json"))
                .arg("--enrolment-report")
                .arg(report)
                .arg("--node-name")
                .arg(n.name())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawning cni-agent (did `cargo build` run?)")?;
        *n.agent.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !n.cni_socket().exists() {
            if Instant::now() > deadline {
                bail!("agent on {} did not start:\n{}", n.name(), n.agent_log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// A node's ztunnel flags: in-pod mode on the node agent's socket, state and certificates
    /// from the controller with the node's token.
    fn ztunnel_args(&self, n: &Node) -> Vec<String> {
        let cp = format!("https://{}:15012", self.controller_ip());
        let mut args: Vec<String> = vec![
            "--zds-socket".into(),
            n.zds_socket().display().to_string(),
            "--xds-address".into(),
            cp.clone(),
            "--ca-address".into(),
            cp,
            "--trust-bundle".into(),
            self.controller.trust_bundle().display().to_string(),
            "--token-file".into(),
            self.controller.token_file(n.name()).display().to_string(),
        ];
        args.extend(self.ztunnel_extra.iter().cloned());
        args
    }

    /// Starts node `i`'s ztunnel (in-pod mode, control plane = the controller) and waits
    /// until it is ready. A ztunnel already running is left alone (a rolling upgrade).
    pub async fn start_ztunnel(&self, i: u8) -> Result<Ztunnel<'static>> {
        let n = &self.nodes[usize::from(i)];
        let args = self.ztunnel_args(n);
        Ztunnel::start_raw(n.ns, &args.iter().map(String::as_str).collect::<Vec<_>>()).await
    }

    /// Starts a second ztunnel for node `i` in a namespace of its own on the underlay, as a
    /// DaemonSet's new pod runs beside the old one during a rolling update: it serves the
    /// node's pods (their sockets live in the pods) and shares nothing with the first.
    pub async fn start_ztunnel_beside(&self, i: u8) -> Result<Ztunnel<'static>> {
        let n = &self.nodes[usize::from(i)];
        let ns = leak(Netns::new(&format!("z{i}-"))?);
        let host = {
            let mut extra = self.extra.lock().unwrap_or_else(|e| e.into_inner());
            extra.push(ns);
            150 + extra.len()
        };
        self.hub.attach(ns, &[&format!("10.90.{}.{host}/24", self.id)])?;
        let args = self.ztunnel_args(n);
        Ztunnel::start_for_node(ns, n.name(), &args.iter().map(String::as_str).collect::<Vec<_>>()).await
    }

    /// Starts node `i`'s ztunnel and keeps it as the node's current one.
    pub async fn replace_ztunnel(&self, i: u8) -> Result<()> {
        let z = self.start_ztunnel(i).await?;
        *self.nodes[usize::from(i)]
            .ztunnel
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(z);
        Ok(())
    }

    fn pod_manifest(&self, p: &PodSpec<'_>, node: &str, ip: Option<IpAddr>) -> String {
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
        let status = ip
            .map(|ip| format!("status: {{phase: Running, podIP: {ip}}}\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {}, containers: [{{name: app, image: app}}]}}\n{status}",
            p.name,
            p.namespace,
            labels.join(", "),
            p.service_account
        )
    }

    fn pod_file(&self, namespace: &str, name: &str) -> PathBuf {
        self.manifests.join(format!("pod.{namespace}.{name}.yaml"))
    }

    /// Writes (atomically) a manifest file the controller and the agents read.
    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    /// The sandbox: a namespace wired by the reference bridge plugin; returns the namespace,
    /// the plugin's result (the next plugin's prevResult) and the pod's IPv4 address.
    fn sandbox(&self, n: &Node, p: &PodSpec<'_>) -> Result<(Netns, String, IpAddr)> {
        let ns = Netns::new("p")?;
        let bridge = Path::new(CNI_BIN).join("bridge");
        let result = run_plugin(n.ns, &bridge, "ADD", &ns, p.name, p.namespace, &self.bridge_conf(n))
            .map_err(|e| anyhow!("bridge ADD: {e}"))?;
        let ip = first_ip(&result)?;
        Ok((ns, result, ip))
    }

    /// A pod that exists without our plugin having seen it (it started before the mesh was
    /// installed): the sandbox through the reference bridge plugin only, then its object with
    /// its IP.
    pub fn add_pod_without_mesh(&self, node: u8, p: PodSpec<'_>) -> Result<Pod> {
        let n = &self.nodes[usize::from(node)];
        let (ns, _, ip) = self.sandbox(n, &p)?;
        let file = format!("pod.{}.{}.yaml", p.namespace, p.name);
        self.write_manifest(&file, &self.pod_manifest(&p, n.name(), Some(ip)))?;
        Ok(Pod {
            ns,
            name: p.name.to_owned(),
            namespace: p.namespace.to_owned(),
            ip,
            node,
            plugin_add: Duration::ZERO,
        })
    }

    /// Creates a pod on node `node` the way kubelet does: the object, the sandbox through the
    /// CNI chain, then the IP in its status.
    pub fn add_pod(&self, node: u8, p: PodSpec<'_>) -> Result<Pod> {
        let n = &self.nodes[usize::from(node)];
        let file = self.pod_file(p.namespace, p.name);
        std::fs::write(&file, self.pod_manifest(&p, n.name(), None))?;
        let (ns, bridge, ip) = self.sandbox(n, &p)?;
        let started = Instant::now();
        let ours = run_plugin(
            n.ns,
            &crate::binary("ambient-cni"),
            "ADD",
            &ns,
            p.name,
            p.namespace,
            &self.ambient_conf(n, &bridge),
        )
        .map_err(|e| anyhow!("ambient-cni ADD: {e}"))?;
        let plugin_add = started.elapsed();
        if first_ip(&ours)? != ip {
            bail!("ambient-cni changed the previous result:\n{ours}");
        }
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, self.pod_manifest(&p, n.name(), Some(ip)))?;
        std::fs::rename(&tmp, &file)?;
        Ok(Pod {
            ns,
            name: p.name.to_owned(),
            namespace: p.namespace.to_owned(),
            ip,
            node,
            plugin_add,
        })
    }

    /// The pod object goes (the controller withdraws the workload) while its namespace and
    /// processes stay, as a terminating pod's do until its containers exit.
    pub fn withdraw_pod(&self, pod: &Pod) -> Result<()> {
        std::fs::remove_file(self.pod_file(&pod.namespace, &pod.name))?;
        Ok(())
    }

    /// CNI DEL through the chain (ours first, as a runtime tears down in reverse), then the
    /// object goes. The namespace itself goes when `pod` is dropped.
    pub fn delete_pod(&self, pod: &Pod) -> Result<()> {
        let n = &self.nodes[usize::from(pod.node)];
        run_plugin(
            n.ns,
            &crate::binary("ambient-cni"),
            "DEL",
            &pod.ns,
            &pod.name,
            &pod.namespace,
            &self.ambient_conf(n, "null"),
        )
        .map_err(|e| anyhow!("ambient-cni DEL: {e}"))?;
        run_plugin(
            n.ns,
            &Path::new(CNI_BIN).join("bridge"),
            "DEL",
            &pod.ns,
            &pod.name,
            &pod.namespace,
            &self.bridge_conf(n),
        )
        .map_err(|e| anyhow!("bridge DEL: {e}"))?;
        let _ = std::fs::remove_file(self.pod_file(&pod.namespace, &pod.name));
        Ok(())
    }

    pub fn bridge_conf(&self, n: &Node) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"podnet","type":"bridge","bridge":"cni{}","isGateway":true,"ipMasq":false,
"ipam":{{"type":"host-local","subnet":"{}","dataDir":"{}","routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
            self.id,
            Self::pod_cidr(self.id, n.index),
            n.dir.path().join("ipam").display()
        )
    }

    pub fn ambient_conf(&self, n: &Node, prev: &str) -> String {
        let prev: serde_json::Value = serde_json::from_str(prev).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "podnet", "type": "ambient-cni",
            "agentSocket": n.cni_socket(), "prevResult": prev,
        })
        .to_string()
    }

    /// Waits until every node's ztunnel holds `pod` as a workload reached over HBONE (once its
    /// agent reported it captured) or not (`hbone` false).
    pub async fn wait_workload(&self, pod: &Pod, hbone: bool, within: Duration) -> Result<()> {
        let protocol = if hbone { "Hbone" } else { "None" };
        self.wait_dumped(pod, protocol, within, |w| w["tunnel"] == protocol)
            .await
    }

    /// Waits until every node's ztunnel (ours or Istio's: both dump `workloads[].uid`) holds
    /// `pod`, however it is reached.
    pub async fn wait_known(&self, pod: &Pod, within: Duration) -> Result<()> {
        self.wait_dumped(pod, "any tunnel", within, |_| true).await
    }

    async fn wait_dumped(
        &self,
        pod: &Pod,
        what: &str,
        within: Duration,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<()> {
        let uid = format!("{}//Pod/{}/{}", self.cluster_id, pod.namespace, pod.name);
        let deadline = Instant::now() + within;
        for n in &self.nodes {
            loop {
                let dump = match self.ztunnel_dump(n.index).await {
                    Ok(d) => d,
                    Err(e) => bail!("config dump of {}: {e}", n.name()),
                };
                let found = dump["workloads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|w| w["uid"] == uid.as_str() && matches(w));
                if found {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} never showed {uid} with {what}; controller log:\n{}",
                        n.name(),
                        self.controller.logs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    pub async fn ztunnel_dump(&self, i: u8) -> Result<serde_json::Value> {
        let n = &self.nodes[usize::from(i)];
        let (code, body) =
            crate::ztunnel::http_request(n.ns, SocketAddr::from(([127, 0, 0, 1], 15000)), "GET", "/config_dump")
                .await?;
        if code != 200 {
            bail!("config_dump: {code}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    pub fn hub(&self) -> &Netns {
        &self.hub.ns
    }

    /// A host outside the cluster and the mesh (the "internet"): a namespace on the underlay
    /// at 10.90.<id>.<n>, which pods reach through their node and which routes back to them.
    pub fn add_external(&self, n: u8) -> Result<Netns> {
        let ns = Netns::new("ext")?;
        self.hub.attach(&ns, &[&format!("10.90.{}.{n}/24", self.id)])?;
        for node in &self.nodes {
            let via = Self::underlay_ip(self.id, node.index).to_string();
            ns.exec(&["ip", "route", "add", &Self::pod_cidr(self.id, node.index), "via", &via])?;
        }
        Ok(ns)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.stop_agent();
            drop(n.ztunnel.lock().unwrap_or_else(|e| e.into_inner()).take());
            crate::netns::destroy(&n.ns.name);
        }
        for ns in self.extra.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            crate::netns::destroy(&ns.name);
        }
        // Kills the controller too (its handle drops after this, harmlessly).
        crate::netns::destroy(&self.control.name);
    }
}

/// The first IP address of a CNI result.
fn first_ip(result: &str) -> Result<IpAddr> {
    let v: serde_json::Value = serde_json::from_str(result).with_context(|| format!("CNI result: {result}"))?;
    let cidr = v["ips"][0]["address"]
        .as_str()
        .context("no address in the CNI result")?;
    Ok(cidr.split('/').next().unwrap_or_default().parse()?)
}

/// What the harness writes for a new pod.
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
}

impl<'a> PodSpec<'a> {
    /// A pod whose service account has its name.
    pub fn new(name: &'a str, namespace: &'a str, labels: &'a [(&'a str, &'a str)]) -> Self {
        PodSpec {
            name,
            namespace,
            service_account: name,
            labels,
        }
    }
}
