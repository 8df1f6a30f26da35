//! The local demo: a two-node mesh made of network namespaces (see `mesh_e2e::cluster`): the
//! controller in local mode, a node agent and an in-pod ztunnel per node, pods created through
//! the real CNI chain. Curl in a client pod on node 0 calls servers on node 1 by pod IP, by
//! service VIP and by DNS name; the demo prints what the mesh did (identities, the address the
//! server saw, metrics), then an AuthorizationPolicy written to the manifests taking effect.
//! Everything is torn down on exit; `--hold` keeps it up for inspection until Ctrl-C.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh_e2e::apps::{http_server, resolve_a};
use mesh_e2e::cluster::{Cluster, Pod, PodSpec, CNI_BIN};
use mesh_e2e::privileged;

const ID: u8 = 200;

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn curl(pod: &Pod, url: &str) -> anyhow::Result<String> {
    Ok(pod.ns.exec(&["curl", "-sS", "--max-time", "5", url])?.trim().to_owned())
}

fn label<'a>(line: &'a str, name: &str) -> &'a str {
    line.split(&format!("{name}=\""))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !privileged() || !std::path::Path::new(CNI_BIN).join("bridge").exists() {
        bail!("the demo builds network namespaces with the reference CNI plugins: run `sudo scripts/demo.sh`");
    }
    let vip = std::net::Ipv4Addr::new(10, 96, ID, 10);
    section("starting a two-node cluster: controller, node agents, ztunnels");
    let world = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{clusterIP: {vip}, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    );
    let t = Instant::now();
    let cluster = Cluster::start(ID, 2, &world).await.context("cluster")?;
    println!(
        "ready in {:?}: controller {}:15012, nodes {}",
        t.elapsed(),
        cluster.controller_ip(),
        cluster.nodes.iter().map(|n| n.name()).collect::<Vec<_>>().join(", ")
    );

    section("creating pods through the CNI chain (bridge + host-local + ambient-cni)");
    let client = cluster.add_pod(0, PodSpec::new("client", "shop", &[]))?;
    let web = [
        cluster.add_pod(1, PodSpec::new("web-1", "shop", &[("app", "web")]))?,
        cluster.add_pod(1, PodSpec::new("web-2", "shop", &[("app", "web")]))?,
    ];
    for p in std::iter::once(&client).chain(web.iter()) {
        println!(
            "{}/{} on node {} at {}: captured={}, ambient-cni ADD {:?}",
            p.namespace,
            p.name,
            p.node,
            p.ip,
            p.captured(),
            p.plugin_add
        );
    }
    for w in &web {
        tokio::spawn(http_server(w.ns.listen(SocketAddr::new(w.ip, 8080))?));
        cluster.wait_workload(w, true, Duration::from_secs(15)).await?;
    }
    cluster.wait_workload(&client, true, Duration::from_secs(15)).await?;

    section("requests from the client pod (node 0) to node 1: pod IP, VIP, DNS name");
    let dns = resolve_a(&client.ns, std::net::Ipv4Addr::new(10, 96, ID, 53).into(), "web")?;
    println!("DNS web -> {dns:?} (answered by ztunnel's DNS proxy from the mesh state)");
    for url in [
        format!("http://{}:8080/", web[0].ip),
        format!("http://{vip}:80/"),
        "http://web.shop.svc.cluster.local/".to_owned(),
    ] {
        println!("GET {url} -> {}", curl(&client, &url)?);
    }
    println!("(the server reports the client pod's own address: source IP preserved over HBONE)");

    section("what node 1's ztunnel recorded (istio_tcp_connections_opened_total)");
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 15020));
    let (_, metrics) = mesh_e2e::ztunnel::http_request(cluster.nodes[1].ns, metrics_addr, "GET", "/metrics").await?;
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total") && l.contains("destination\""))
    {
        println!(
            "{} connection(s) {} -> {} over {}",
            l.rsplit(' ').next().unwrap_or("?"),
            label(l, "source_principal"),
            label(l, "destination_principal"),
            label(l, "connection_security_policy")
        );
    }

    section("AuthorizationPolicy: DENY principal cluster.local/ns/shop/sa/client (written to the manifests)");
    cluster.write_manifest(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match curl(&client, &format!("http://{vip}:80/")) {
            Err(e) => {
                println!("request refused: {}", e.to_string().lines().last().unwrap_or_default());
                break;
            }
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(body) => bail!("policy did not apply: {body}"),
        }
    }

    if std::env::args().any(|a| a == "--hold") {
        section("holding");
        let (n0, n1) = (cluster.nodes[0].name(), cluster.nodes[1].name());
        println!("client shell:    ip netns exec {} bash", client.ns.name);
        println!("ztunnel metrics: ip netns exec {n1} curl -s 127.0.0.1:15020/metrics");
        println!("ztunnel config:  ip netns exec {n0} curl -s 127.0.0.1:15000/config_dump");
        println!(
            "controller:      ip netns exec {} curl -s {}:15014/debug/config",
            cluster.controller.ns.name,
            cluster.controller_ip()
        );
        println!(
            "manifests:       {}",
            cluster.controller.dir.path().join("manifests").display()
        );
        println!("press Ctrl-C to tear everything down");
        tokio::signal::ctrl_c().await?;
    } else {
        println!("\n(run with --hold to keep the cluster up and inspect it)");
    }
    println!("tearing down pods, nodes, processes");
    for p in std::iter::once(&client).chain(web.iter()) {
        cluster.delete_pod(p)?;
    }
    Ok(())
}
