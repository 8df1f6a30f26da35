//! cnibench: pod start-up latency added by the `ambient-cni` plugin, with the real node agent
//! (nftables rules written into the pod, ZDS hand-off to ztunnel, enrolment report) on a
//! one-node namespace cluster. Creates N ambient pods and N pods of a non-ambient namespace
//! through the CNI chain, timing our plugin's process from start to exit; prints p50/p99/max
//! and the agent's share (ambient p50 less pass-through p50). The plugin is started straight in
//! the node's network namespace, as a container runtime starts it (no `ip netns exec` process
//! in the time); the pass-through figure is the floor: process start and the plugin's exchange
//! with the agent.
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

/// The `p` quantile of sorted `v`, in milliseconds.
fn at(v: &[Duration], p: f64) -> f64 {
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn stats(v: &[Duration]) -> String {
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(v, 0.5),
        at(v, 0.99),
        at(v, 1.0)
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut pods = 50usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pods" => pods = args.next().context("--pods N")?.parse()?,
            other => anyhow::bail!(
                "unknown argument {other}; usage: cnibench [--pods N] (N at most 125: one /24 for both namespaces)"
            ),
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
    ambient.sort();
    plain.sort();
    println!("ambient-cni ADD with the node agent, {pods} pods each:");
    println!("  ambient namespace (rules + ZDS hand-off): {}", stats(&ambient));
    println!("  non-ambient namespace (pass-through):     {}", stats(&plain));
    println!(
        "  the agent's share (ambient p50 - pass-through p50): {:.1} ms",
        at(&ambient, 0.5) - at(&plain, 0.5)
    );
    for p in &keep {
        cluster.delete_pod(p)?;
    }
    Ok(())
}
