//! Two captured pods and one plain pod on a bridge, with a development CA and a workload
//! file: the fixture shared by the end-to-end tests, the demo and the benchmark.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use mesh_core::identity::DevCa;

use crate::ztunnel::ZtunnelFiles;
use crate::{capture, privileged, Hub, Netns};

/// Two captured pods (`a` client, `b` server) and one plain pod `c`, on subnet 10.77.<n>.0/24
/// and fd77:<n>::/64, each test with its own subnet so tests run in parallel.
pub struct Bed {
    pub n: u8,
    _dir: tempfile::TempDir,
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    pub state: PathBuf,
    pub a: Netns,
    pub b: Netns,
    pub c: Netns,
    hub: Hub,
    /// Bridge-side link of each pod (a, b, c).
    links: Vec<String>,
}

impl Bed {
    /// Builds the bed, or None (with a note) when this process may not create namespaces.
    pub fn new(n: u8) -> Option<Bed> {
        if !privileged() {
            eprintln!("skipping: needs root and iproute2");
            return None;
        }
        match Self::try_new(n) {
            Ok(b) => Some(b),
            Err(e) => panic!("building the test bed: {e:#}"),
        }
    }

    /// Builds the bed; everything created so far is removed again on error.
    pub fn try_new(n: u8) -> anyhow::Result<Bed> {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::generate("cluster.local")?;
        let root_cert = dir.path().join("root-cert.pem");
        let root_key = dir.path().join("root-key.pem");
        std::fs::write(&root_cert, ca.root_pem())?;
        std::fs::write(&root_key, ca.key_pem())?;
        let hub = Hub::new()?;
        let (a, b, c) = (Netns::new("a")?, Netns::new("b")?, Netns::new("c")?);
        let mut links = Vec::new();
        for (ns, host) in [(&a, 1), (&b, 2), (&c, 3)] {
            links.push(hub.attach(ns, &[&format!("10.77.{n}.{host}/24"), &format!("fd77:{n}::{host}/64")])?);
        }
        capture::install(&a)?;
        capture::install(&b)?;
        let bed = Bed {
            n,
            state: dir.path().join("state.yaml"),
            _dir: dir,
            root_cert,
            root_key,
            a,
            b,
            c,
            hub,
            links,
        };
        bed.write_state("")?;
        Ok(bed)
    }

    /// The namespace holding the bridge all pods attach to (where the underlay is captured).
    pub fn hub_name(&self) -> String {
        self.hub.ns.name.clone()
    }

    /// The bridge-side link of host 1 (a), 2 (b) or 3 (c): what crosses the underlay to it.
    pub fn link(&self, host: u8) -> &str {
        &self.links[usize::from(host.clamp(1, 3)) - 1]
    }

    /// IPv4 of host 1 (a), 2 (b) or 3 (c).
    pub fn ip(&self, host: u8) -> IpAddr {
        Ipv4Addr::new(10, 77, self.n, host).into()
    }

    pub fn ip6(&self, host: u8) -> IpAddr {
        Ipv6Addr::new(0xfd77, self.n.into(), 0, 0, 0, 0, 0, host.into()).into()
    }

    /// The service VIP of `server`.
    pub fn vip(&self) -> IpAddr {
        Ipv4Addr::new(10, 96, self.n, 10).into()
    }

    /// Workloads a (client) and b (server), service `server` on the VIP, plus `policies`.
    pub fn write_state(&self, policies: &str) -> std::io::Result<()> {
        let entries = PairEntries::new([self.ip(1), self.ip6(1)], [self.ip(2), self.ip6(2)], self.vip());
        let yaml = format!(
            "\nworkloads:\n{}services:\n{}policies: {policies}\n",
            entries.workloads, entries.services
        );
        let tmp = self.state.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        // Atomic replace: the watcher never reads a half-written file.
        std::fs::rename(&tmp, &self.state)
    }

    pub fn files(&self) -> ZtunnelFiles<'_> {
        ZtunnelFiles {
            root_cert: &self.root_cert,
            root_key: &self.root_key,
            state: &self.state,
        }
    }
}

/// The bed's workload-file entries: client and server workloads (HBONE) and service `server`
/// on `vip` (port 80 -> 8080), as list items to place under `workloads:` and `services:`.
pub struct PairEntries {
    pub workloads: String,
    pub services: String,
}

impl PairEntries {
    pub fn new(client: [IpAddr; 2], server: [IpAddr; 2], vip: IpAddr) -> Self {
        let ([c4, c6], [s4, s6]) = (client, server);
        let workloads = format!(
            r#"- uid: cluster1//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  addresses: ["{c4}", "{c6}"]
  protocol: HBONE
  node: node-a
  canonicalName: client
  canonicalRevision: v1
- uid: cluster1//Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  addresses: ["{s4}", "{s6}"]
  protocol: HBONE
  node: node-b
  canonicalName: server
  canonicalRevision: v1
  services:
    default/server.default.svc.cluster.local:
    - servicePort: 80
      targetPort: 8080
"#
        );
        let services = format!(
            r#"- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["{vip}"]
  ports:
  - servicePort: 80
    targetPort: 8080
"#
        );
        PairEntries { workloads, services }
    }
}
