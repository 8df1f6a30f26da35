//! Two networks joined only by network 2's east-west gateway (`waypoint --role east-west`),
//! with ztunnels and the gateway fed by local state files and the development CA (no control
//! plane): the topology of the multicluster data-path tests and of `meshbench --scenario
//! double-hbone`.
//!
//! Layout for id N: network 1 is bridge hub1 with 10.N.1.0/24 (client `a` .1, a rogue
//! uncaptured host `x` .5, the gateway's public side .10); network 2 is bridge hub2 with
//! 10.N.2.0/24 (server `b` .2, the gateway's inside .10). Only the gateway has a leg in both.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_core::identity::DevCa;

use crate::netns::{sh, unique};
use crate::ztunnel::{http_request, ZtunnelFiles};
use crate::{capture, privileged, Hub, Netns, Ztunnel};

/// The gateway's identity.
pub const GATEWAY: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest";
/// Service `server`'s hostname (VIP 10.96.N.10, ports 80 -> 8080, 8080 and 5201).
pub const HOST: &str = "server.default.svc.cluster.local";

/// Two networks, their pods, the gateway between them, and the state files each side reads.
pub struct Nets {
    pub id: u8,
    pub dir: tempfile::TempDir,
    pub a: Netns,
    pub b: Netns,
    pub g: Netns,
    pub x: Netns,
    /// The gateway's link on hub1 (from network 1) and on hub2 (into network 2).
    pub g_link1: String,
    pub g_link2: String,
    pub hub1: Hub,
    pub hub2: Hub,
}

impl Nets {
    /// Builds the networks, or None (with a note) when this process may not create namespaces.
    pub fn new(id: u8) -> Option<Nets> {
        if !privileged() {
            eprintln!("skipping: needs root and iproute2");
            return None;
        }
        match Self::build(id) {
            Ok(n) => Some(n),
            Err(e) => panic!("building the two networks: {e:#}"),
        }
    }

    /// Builds the networks; everything created so far is removed again on error.
    pub fn build(id: u8) -> Result<Nets> {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::generate("cluster.local")?;
        std::fs::write(dir.path().join("root-cert.pem"), ca.root_pem())?;
        std::fs::write(dir.path().join("root-key.pem"), ca.key_pem())?;
        let (hub1, hub2) = (Hub::new()?, Hub::new()?);
        let (a, b, g, x) = (Netns::new("a")?, Netns::new("b")?, Netns::new("g")?, Netns::new("x")?);
        hub1.attach(&a, &[&format!("10.{id}.1.1/24")])?;
        hub1.attach(&x, &[&format!("10.{id}.1.5/24")])?;
        hub2.attach(&b, &[&format!("10.{id}.2.2/24")])?;
        let g_link1 = hub1.attach(&g, &[&format!("10.{id}.1.10/24")])?;
        // The gateway's second leg, into network 2 (eth1; its default route stays on hub1).
        let g_link2 = unique("vh");
        sh(&[
            "ip",
            "link",
            "add",
            &g_link2,
            "netns",
            &hub2.ns.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "netns",
            &g.name,
        ])?;
        hub2.ns.exec(&["ip", "link", "set", &g_link2, "master", "br0", "up"])?;
        g.exec(&["ip", "addr", "add", &format!("10.{id}.2.10/24"), "dev", "eth1"])?;
        g.exec(&["ip", "link", "set", "eth1", "up"])?;
        capture::install(&a)?;
        capture::install(&b)?;
        let nets = Nets {
            id,
            dir,
            a,
            b,
            g,
            x,
            g_link1,
            g_link2,
            hub1,
            hub2,
        };
        std::fs::write(nets.path("net1.yaml"), nets.state(1))?;
        std::fs::write(nets.path("net2.yaml"), nets.state(2))?;
        Ok(nets)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ip(&self, net: u8, host: u8) -> IpAddr {
        Ipv4Addr::new(10, self.id, net, host).into()
    }

    /// Service `server` on port 80.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(10, 96, self.id, 10).into(), 80)
    }

    /// What network `net` knows: the client (network 1), the server (network 2, behind the
    /// gateway's public address), the gateway itself (network 1's view only: the client must
    /// know the identity it proves) and service `server` with a VIP of that network (port 80
    /// for the tests, 8080 and 5201 for the bench's nginx and iperf3).
    pub fn state(&self, net: u8) -> String {
        let n = self.id;
        let gateway = if net == 1 {
            format!(
                r#"- uid: c2//Pod/istio-system/eastwest
  name: eastwest
  namespace: istio-system
  serviceAccount: eastwest
  addresses: ["10.{n}.1.10", "10.{n}.2.10"]
  network: net2
  protocol: HBONE
  node: node-g
"#
            )
        } else {
            String::new()
        };
        format!(
            r#"workloads:
- uid: c1//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  addresses: ["10.{n}.1.1"]
  network: net1
  clusterId: c1
  protocol: HBONE
  node: node-a
- uid: c2//Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  addresses: ["10.{n}.2.2"]
  network: net2
  clusterId: c2
  protocol: HBONE
  node: node-b
  networkGateway: {{address: "10.{n}.1.10", network: net2, hbonePort: 15008}}
  services:
    default/{HOST}:
    - servicePort: 80
      targetPort: 8080
    - servicePort: 8080
      targetPort: 8080
    - servicePort: 5201
      targetPort: 5201
{gateway}services:
- name: server
  namespace: default
  hostname: {HOST}
  vips: ["10.96.{n}.10"]
  network: net{net}
  ports:
  - servicePort: 80
    targetPort: 8080
  - servicePort: 8080
    targetPort: 8080
  - servicePort: 5201
    targetPort: 5201
policies: []
"#
        )
    }

    /// Root certificate, root key and state file of network `net`.
    pub fn files(&self, net: u8) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.path("root-cert.pem"),
            self.path("root-key.pem"),
            self.path(&format!("net{net}.yaml")),
        )
    }

    /// A ztunnel in `ns` (dedicated mode) serving network `net` from its state file.
    pub async fn ztunnel<'a>(&self, ns: &'a Netns, net: u8) -> Result<Ztunnel<'a>> {
        let (root_cert, root_key, state) = self.files(net);
        let files = ZtunnelFiles {
            root_cert: &root_cert,
            root_key: &root_key,
            state: &state,
        };
        Ztunnel::start(ns, &files, &["--network", &format!("net{net}")]).await
    }

    /// The mesh's development CA, for clients a test itself plays.
    pub fn ca(&self) -> Result<DevCa> {
        Ok(DevCa::load(&self.path("root-cert.pem"), &self.path("root-key.pem"))?)
    }
}

/// The east-west gateway process in `g`, killed on drop.
pub struct EastWest<'a> {
    ns: &'a Netns,
    child: Child,
    log: PathBuf,
}

impl<'a> EastWest<'a> {
    /// Starts the waypoint binary as network 2's east-west gateway; waits for readiness.
    pub async fn start(nets: &'a Nets) -> Result<EastWest<'a>> {
        let (root_cert, root_key, state) = nets.files(2);
        let log = std::env::temp_dir().join(format!("{}-eastwest.log", nets.g.name));
        let out = std::fs::File::create(&log)?;
        let child = nets
            .g
            .command(&crate::binary("waypoint"))
            .args(["--role", "east-west", "--identity", GATEWAY, "--network", "net2"])
            .arg("--local-xds-path")
            .arg(&state)
            .arg("--ca-root-cert")
            .arg(&root_cert)
            .arg("--ca-root-key")
            .arg(&root_key)
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning the waypoint binary (did `cargo build` run?)")?;
        let gw = EastWest {
            ns: &nets.g,
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let ready = SocketAddr::from(([127, 0, 0, 1], 15021));
        while !matches!(http_request(gw.ns, ready, "GET", "/healthz/ready").await, Ok((200, _))) {
            if Instant::now() > deadline {
                bail!("gateway not ready; log:\n{}", gw.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(gw)
    }

    /// The gateway process (`ip netns exec` replaces itself with the program).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn metrics(&self) -> Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 15020));
        Ok(http_request(self.ns, addr, "GET", "/metrics").await?.1)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EastWest<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- east-west gateway log ---\n{}", self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
