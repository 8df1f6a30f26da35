//! Two namespace clusters ([`Cluster`]) as one mesh on one network: their underlay bridges
//! are joined by a veth pair and every node routes to the other cluster's pod ranges through
//! the other cluster's nodes, so a pod of one reaches a pod of the other directly. The second
//! controller signs with the first one's root (one trust domain, one root), and each controller
//! reads its own manifests plus the other's as a remote cluster (`--remote-manifests`, with
//! the other's node agents' enrolment reports), through links this harness owns: removing a
//! link is the other cluster going away. Cluster ids are `c<id>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{Cluster, Pod};
use crate::controller::Options;
use crate::netns::{sh, unique};

/// The identity of an east-west gateway run as `istio-system/eastwest`.
pub const EAST_WEST_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest";

pub struct MultiCluster {
    pub a: Cluster,
    pub b: Cluster,
    /// `<cluster id>` and `<cluster id>-enrolment`: links to each cluster's directories.
    links: tempfile::TempDir,
}

/// The controller flags of a cluster that reads `remote` through the links in `links`.
fn remote_args(own: &str, remote: &str, links: &std::path::Path, grace: &str) -> Vec<String> {
    vec![
        "--cluster-id".into(),
        own.into(),
        "--remote-manifests".into(),
        format!("{remote}={}", links.join(remote).display()),
        "--remote-enrolment".into(),
        format!("{remote}={}", links.join(format!("{remote}-enrolment")).display()),
        "--remote-grace".into(),
        grace.into(),
    ]
}

impl MultiCluster {
    /// Builds clusters `a` and `b` (harness ids, e.g. 68 and 69) with `nodes` nodes each and
    /// their manifests, on one network; a remote cluster that cannot be read is withdrawn
    /// after `grace`.
    pub async fn start(ids: (u8, u8), nodes: u8, manifests: (&str, &str), grace: &str) -> Result<MultiCluster> {
        let mc = Self::build(ids, nodes, manifests, grace, None).await?;
        mc.route_pod_ranges()?;
        Ok(mc)
    }

    /// As [`MultiCluster::start`] on two networks, `networks` (each node's ztunnel gets its
    /// cluster's `--network`; the manifests label their system namespace with it): no route
    /// between the clusters' pod ranges; [`MultiCluster::expose`] makes one pod (an east-west
    /// gateway) reachable from the other cluster, as a load balancer would.
    pub async fn start_two_networks(
        ids: (u8, u8),
        nodes: u8,
        manifests: (&str, &str),
        networks: (&str, &str),
    ) -> Result<MultiCluster> {
        Self::build(ids, nodes, manifests, "30s", Some(networks)).await
    }

    async fn build(
        ids: (u8, u8),
        nodes: u8,
        manifests: (&str, &str),
        grace: &str,
        networks: Option<(&str, &str)>,
    ) -> Result<MultiCluster> {
        let ztunnel = |n: Option<&str>| {
            n.map(|n| vec!["--network".to_owned(), n.to_owned()])
                .unwrap_or_default()
        };
        let links = tempfile::tempdir()?;
        let (name_a, name_b) = (format!("c{}", ids.0), format!("c{}", ids.1));
        // Two networks: each cluster may run an east-west gateway with its own identity.
        let identities: Vec<String> = match networks {
            Some(_) => vec![EAST_WEST_IDENTITY.to_owned()],
            None => Vec::new(),
        };
        let a = Cluster::start_with_options(
            ids.0,
            nodes,
            manifests.0,
            Options {
                identities: identities.clone(),
                args: remote_args(&name_a, &name_b, links.path(), grace),
                ztunnel_args: ztunnel(networks.map(|n| n.0)),
                ..Options::default()
            },
        )
        .await
        .context("cluster a")?;
        let b = Cluster::start_with_options(
            ids.1,
            nodes,
            manifests.1,
            Options {
                identities,
                args: remote_args(&name_b, &name_a, links.path(), grace),
                ca_from: Some(a.controller.ca_dir()),
                ztunnel_args: ztunnel(networks.map(|n| n.1)),
                ..Options::default()
            },
        )
        .await
        .context("cluster b")?;
        let mc = MultiCluster { a, b, links };
        mc.link(&mc.a)?;
        mc.link(&mc.b)?;
        mc.join_underlays()?;
        Ok(mc)
    }

    /// The other cluster of `c`.
    fn other(&self, c: &Cluster) -> &Cluster {
        if c.id == self.a.id {
            &self.b
        } else {
            &self.a
        }
    }

    /// Makes `pod` of cluster `c` reachable from the other cluster's nodes (a route to its
    /// address through its node), their pods' connections to it masqueraded behind their
    /// node's underlay address, as a load balancer in front of a gateway would be.
    pub fn expose(&self, c: &Cluster, pod: &Pod) -> Result<()> {
        let via = Cluster::underlay_ip(c.id, pod.node).to_string();
        let target = format!("{}/32", pod.ip);
        for n in &self.other(c).nodes {
            n.ns.exec(&["ip", "route", "add", &target, "via", &via, "dev", "eth0", "onlink"])?;
            let ip = pod.ip.to_string();
            n.ns.exec(&["nft", "add", "table", "ip", "mcexpose"])?;
            let chain = "add chain ip mcexpose post { type nat hook postrouting priority 100 ; }";
            n.ns.exec(&["nft", chain])?;
            n.ns.exec(&[
                "nft",
                "add",
                "rule",
                "ip",
                "mcexpose",
                "post",
                "ip",
                "daddr",
                &ip,
                "masquerade",
            ])?;
        }
        Ok(())
    }

    /// Makes `c`'s manifests and enrolment reports readable to the other controller.
    pub fn link(&self, c: &Cluster) -> Result<()> {
        let enrolment = self.links.path().join(format!("{}-enrolment", c.cluster_id));
        let manifests = self.links.path().join(&c.cluster_id);
        for (link, target) in [
            (enrolment, c.controller.enrolment_dir()),
            (manifests, c.controller.manifest_dir()),
        ] {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, link)?;
        }
        Ok(())
    }

    /// The other controller can no longer read `c`'s manifests (its API server went away).
    pub fn unlink(&self, c: &Cluster) -> Result<()> {
        std::fs::remove_file(self.links.path().join(&c.cluster_id))?;
        Ok(())
    }

    /// One L2 segment for both underlays (the nodes' addresses are on-link to each other).
    fn join_underlays(&self) -> Result<()> {
        let (ha, hb) = (unique("vx"), unique("vx"));
        sh(&[
            "ip",
            "link",
            "add",
            &ha,
            "netns",
            &self.a.hub().name,
            "type",
            "veth",
            "peer",
            "name",
            &hb,
            "netns",
            &self.b.hub().name,
        ])?;
        self.a.hub().exec(&["ip", "link", "set", &ha, "master", "br0", "up"])?;
        self.b.hub().exec(&["ip", "link", "set", &hb, "master", "br0", "up"])?;
        Ok(())
    }

    /// One network: routes from every node to the other cluster's pod ranges through the
    /// node that holds each.
    fn route_pod_ranges(&self) -> Result<()> {
        for (from, to) in [(&self.a, &self.b), (&self.b, &self.a)] {
            for n in &from.nodes {
                for other in &to.nodes {
                    let via = Cluster::underlay_ip(to.id, other.index).to_string();
                    let cidr = format!("10.{}.{}.0/24", 100 + u16::from(other.index), to.id);
                    n.ns.exec(&["ip", "route", "add", &cidr, "via", &via, "dev", "eth0", "onlink"])?;
                }
            }
        }
        Ok(())
    }

    /// Waits until every node's ztunnel of `viewer` holds the workload `uid` reached over
    /// HBONE, or (`present` false) holds no workload of that uid.
    pub async fn wait_uid(viewer: &Cluster, uid: &str, present: bool, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        for n in &viewer.nodes {
            loop {
                let dump = viewer.ztunnel_dump(n.index).await?;
                let workload = dump["workloads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|w| w["uid"] == uid);
                let done = match workload {
                    Some(w) => present && w["tunnel"] == "Hbone",
                    None => !present,
                };
                if done {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} {} {uid} after {within:?}; controller log:\n{}",
                        n.name(),
                        if present { "never showed" } else { "still shows" },
                        viewer.controller.logs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Ok(())
    }

    /// The workload uid of `pod` of cluster `c`.
    pub fn uid(c: &Cluster, pod: &Pod) -> String {
        format!("{}//Pod/{}/{}", c.cluster_id, pod.namespace, pod.name)
    }

    /// The metrics text of node `i`'s ztunnel in `c`.
    pub async fn ztunnel_metrics(c: &Cluster, i: u8) -> Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 15020));
        let (_, text) = crate::ztunnel::http_request(c.nodes[usize::from(i)].ns, addr, "GET", "/metrics").await?;
        Ok(text)
    }

    /// Where the links live (for tests that break one in another way).
    pub fn links(&self) -> PathBuf {
        self.links.path().to_owned()
    }
}
