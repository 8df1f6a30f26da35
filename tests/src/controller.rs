//! The controller as a process in a test namespace, in local mode: a manifest directory the
//! test writes like a kubelet would, bootstrap tokens for each node's ztunnel, and its CA
//! directory (whose trust bundle ztunnels are given).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::netns::Netns;
use crate::ztunnel::http_request;

/// The controller's default debug port (`--debug-addr 127.0.0.1:15015`).
pub const DEBUG_PORT: u16 = 15015;

/// How a test controller is started besides its manifests.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Pods are advertised with HBONE when a node agent reports them captured.
    pub enrolment: bool,
    /// SPIFFE ids of proxies (waypoints) given a bootstrap token of their own.
    pub identities: Vec<String>,
    /// A CA directory whose root (root-cert.pem, root-key.pem) this controller signs with.
    pub ca_from: Option<PathBuf>,
    /// More controller flags (`--cluster-id`, `--remote-manifests`, ...).
    pub args: Vec<String>,
    /// For a [`crate::cluster::Cluster`]: more flags of every node's ztunnel (`--network`).
    pub ztunnel_args: Vec<String>,
}

pub struct Controller<'a> {
    pub ns: &'a Netns,
    child: Child,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl<'a> Controller<'a> {
    /// Starts the controller on `ip` (xDS+CA on 15012, admin on 15014) with one random bootstrap
    /// token per node name (in [`Controller::token_file`], mode 0600), and waits until it is ready.
    pub async fn start(ns: &'a Netns, ip: std::net::IpAddr, nodes: &[&str], manifests: &str) -> anyhow::Result<Self> {
        Self::start_with(ns, ip, nodes, manifests, false, &[]).await
    }

    /// As [`Controller::start`]; with `enrolment`, pods are advertised with HBONE when a node
    /// agent reports them captured (`enrolment_dir`) rather than by their annotation.
    pub async fn start_with(
        ns: &'a Netns,
        ip: std::net::IpAddr,
        nodes: &[&str],
        manifests: &str,
        enrolment: bool,
        identities: &[&str],
    ) -> anyhow::Result<Self> {
        let options = Options {
            enrolment,
            identities: identities.iter().map(|s| (*s).to_owned()).collect(),
            ..Options::default()
        };
        Self::start_with_options(ns, ip, nodes, manifests, &options).await
    }

    /// As [`Controller::start`] with everything [`Options`] says.
    pub async fn start_with_options(
        ns: &'a Netns,
        ip: std::net::IpAddr,
        nodes: &[&str],
        manifests: &str,
        options: &Options,
    ) -> anyhow::Result<Self> {
        let (enrolment, identities) = (options.enrolment, &options.identities);
        let dir = tempfile::tempdir()?;
        if let Some(from) = &options.ca_from {
            // One mesh, one root: this controller signs with the root another one generated.
            std::fs::create_dir_all(dir.path().join("ca"))?;
            for f in ["root-cert.pem", "root-key.pem"] {
                std::fs::copy(from.join(f), dir.path().join("ca").join(f))?;
            }
        }
        std::fs::create_dir_all(dir.path().join("enrolment"))?;
        std::fs::create_dir_all(dir.path().join("manifests"))?;
        std::fs::write(dir.path().join("manifests/world.yaml"), manifests)?;
        // Random tokens (never derived from the node or identity names, which pods can learn),
        // in files only their owner may read, as the controller requires of its token list.
        let mut tokens = String::new();
        for n in nodes {
            let token = random_token()?;
            tokens.push_str(&format!(
                "- {{token: {token}, identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel, node: {n}}}\n"
            ));
            write_private(&dir.path().join(format!("{n}.token")), &token)?;
        }
        // Proxies that run as themselves (waypoints): a token bound to their identity only.
        for id in identities.iter() {
            let token = random_token()?;
            tokens.push_str(&format!("- {{token: {token}, identity: \"{id}\"}}\n"));
            write_private(&dir.path().join(identity_token_name(id)), &token)?;
        }
        write_private(&dir.path().join("tokens.yaml"), &tokens)?;
        let log = std::env::temp_dir().join(format!("{}-controller.log", ns.name));
        let out = std::fs::File::create(&log)?;
        let admin = SocketAddr::new(ip, 15014);
        let mut command = ns.command(&crate::binary("controller"));
        if enrolment {
            command.arg("--enrolment-dir").arg(dir.path().join("enrolment"));
        }
        let child = command
            .arg("--manifest-dir")
            .arg(dir.path().join("manifests"))
            .arg("--bootstrap-tokens")
            .arg(dir.path().join("tokens.yaml"))
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            .arg("--waypoint-records")
            .arg(dir.path().join("waypoints"))
            // Absent until a test writes it (`write_mesh_config`): the defaults.
            .arg("--mesh-config")
            .arg(dir.path().join("mesh.yaml"))
            .args(["--listen", &SocketAddr::new(ip, 15012).to_string()])
            // The address clients dial, as an IP SAN for those that verify by address.
            .args(["--serving-ips", &ip.to_string()])
            .args(["--admin", &admin.to_string()])
            .args(["--poll-ms", "50", "--log", "info"])
            .args(&options.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning controller (did `cargo build` run?)")?;
        let c = Controller {
            ns,
            child,
            dir,
            admin,
            log,
        };
        c.wait_ready(Duration::from_secs(20)).await?;
        Ok(c)
    }

    async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_request(self.ns, self.admin, "GET", "/ready").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("controller not ready within {within:?}; log:\n{}", self.logs())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The CA directory (root-cert.pem, root-key.pem, trust-bundle.pem).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The manifest directory it reads.
    pub fn manifest_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// The trust bundle ztunnels verify the controller (and each other) with.
    pub fn trust_bundle(&self) -> PathBuf {
        self.dir.path().join("ca/trust-bundle.pem")
    }

    /// Where node agents write their enrolment reports.
    pub fn enrolment_dir(&self) -> PathBuf {
        self.dir.path().join("enrolment")
    }

    /// The token file of a proxy registered with `identities` at start.
    pub fn identity_token_file(&self, identity: &str) -> PathBuf {
        self.dir.path().join(identity_token_name(identity))
    }

    /// The bootstrap token file of node `node`'s ztunnel.
    pub fn token_file(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.token"))
    }

    /// The bootstrap token list the controller reads.
    pub fn tokens_file(&self) -> PathBuf {
        self.dir.path().join("tokens.yaml")
    }

    /// Every credential file this controller's harness wrote (token list and token files).
    pub fn credential_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "token"))
            .collect();
        files.push(self.tokens_file());
        files
    }

    /// Replaces the manifests (atomically, as an editor or kubelet would).
    pub fn write_manifests(&self, text: &str) -> std::io::Result<()> {
        let dir = self.dir.path().join("manifests");
        let tmp = self.dir.path().join("world.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, Path::new(&dir).join("world.yaml"))
    }

    /// Writes the mesh config (Istio MeshConfig YAML) the controller polls, atomically.
    pub fn write_mesh_config(&self, text: &str) -> std::io::Result<()> {
        let tmp = self.dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.path().join("mesh.yaml"))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_request(self.ns, self.admin, "GET", path).await
    }

    /// GETs a debug view (`/debug/config`, ...) from the controller's localhost debug listener,
    /// inside its namespace (the only place it answers).
    pub async fn debug(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_request(self.ns, SocketAddr::from(([127, 0, 0, 1], DEBUG_PORT)), "GET", path).await
    }
}

impl Drop for Controller<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The token file name of a proxy running as `identity` (the name is not secret; the token is
/// random).
fn identity_token_name(identity: &str) -> String {
    let body: String = identity
        .trim_start_matches("spiffe://")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("id-{body}.token")
}

/// A bootstrap token: 128 bits from the kernel's CSPRNG, as 32 hex characters.
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a credential file with mode 0600 (created so; never readable by others meanwhile).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}
