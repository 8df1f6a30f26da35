//! cnibench: pod start-up latency added by the `ambient-cni` plugin, with the real node agent
//! (nftables rules written into the pod, ZDS hand-off to ztunnel, enrolment report) on a
//! one-node namespace cluster. Creates N ambient pods and N pods of a non-ambient namespace
//! through the CNI chain, timing our plugin's process from start to exit; prints p50/p99/max.
//!
//! ```text
//! cargo build --release --workspace && sudo target/release/cnibench [--pods N]
//! ```

use std::time::Duration;

use anyhow::{Context, Result};
use mesh_e2e::cluster::{Cluster, PodSpec};

const WORLD: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
";

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
    format!("p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", at(0.5), at(0.99), at(1.0))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut pods = 50usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pods" => pods = args.next().context("--pods N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}; usage: cnibench [--pods N]"),
        }
    }
    let cluster = Cluster::start(202, 1, WORLD).await.context("one-node cluster")?;
    let mut ambient = Vec::new();
    let mut plain = Vec::new();
    let mut keep = Vec::new();
    for i in 0..pods {
        for (namespace, out) in [("mesh", &mut ambient), ("plain", &mut plain)] {
            let name = format!("pod-{i}");
            let pod = cluster.add_pod(
                0,
                PodSpec {
                    name: &name,
                    namespace,
                    service_account: "default",
                    labels: &[],
                },
            )?;
            out.push(pod.plugin_add);
            keep.push(pod);
        }
    }
    println!("ambient-cni ADD with the node agent, {pods} pods each:");
    println!("  ambient namespace (rules + ZDS hand-off): {}", stats(ambient));
    println!("  non-ambient namespace (pass-through):     {}", stats(plain));
    for p in &keep {
        cluster.delete_pod(p)?;
    }
    Ok(())
}
