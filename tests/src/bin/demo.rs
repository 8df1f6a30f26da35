//! The local demo: two ambient pods in network namespaces, each captured by the in-pod rules
//! and served by its own ztunnel; curl in the client pod calls an HTTP server in the server
//! pod by pod IP and by service VIP. Prints what happened: identities, the address the server
//! saw, access logs, metrics, and an authorization policy taking effect. Tears down on exit.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh_e2e::apps::http_server;
use mesh_e2e::{privileged, Bed, Ztunnel};

const REQUESTS: usize = 20;

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn curl(bed: &Bed, url: &str) -> anyhow::Result<String> {
    Ok(bed.a.exec(&["curl", "-sS", "--max-time", "5", url])?.trim().to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !privileged() {
        bail!("the demo creates network namespaces: run it as root (sudo scripts/demo.sh)");
    }
    section("building two pods (client 10.77.200.1, server 10.77.200.2) and a plain pod");
    let bed = Bed::new(200).context("test bed")?;
    let za = Ztunnel::start(&bed.a, &bed.files(), &[]).await?;
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await?;
    println!("ztunnel ready in {} and {}", bed.a.name, bed.b.name);
    tokio::spawn(http_server(bed.b.listen("0.0.0.0:8080".parse()?)?));

    section(&format!(
        "{REQUESTS} HTTP requests from the client pod, half by pod IP, half by service VIP"
    ));
    let mut latencies = Vec::new();
    for i in 0..REQUESTS {
        let url = if i % 2 == 0 {
            format!("http://{}:8080/", bed.ip(2))
        } else {
            format!("http://{}:80/", bed.vip())
        };
        let t = Instant::now();
        let body = curl(&bed, &url)?;
        latencies.push(t.elapsed());
        if i < 2 {
            println!("\rGET {url} -> {body}");
        }
        print!("\r{}/{REQUESTS} done ", i + 1);
        use std::io::Write;
        std::io::stdout().flush()?;
    }
    latencies.sort();
    println!(
        "\np50 {:?}, max {:?} per curl invocation (process start included)",
        latencies[REQUESTS / 2],
        latencies[REQUESTS - 1]
    );

    section("what the server pod's ztunnel saw (access log)");
    for line in zb.logs().lines().filter(|l| l.contains("connection complete")).take(2) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        println!(
            "{} {} ({}) -> {} ({}), {} bytes in, {} bytes out",
            v["direction"],
            v["src.addr"],
            v["src.identity"],
            v["dst.addr"],
            v["dst.identity"],
            v["bytes_sent"],
            v["bytes_recv"]
        );
    }

    section("metrics (istio_tcp_connections_opened_total, server side)");
    let metrics = zb.metrics().await?;
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
    {
        let count = l.rsplit(' ').next().unwrap_or("?");
        let principal = l
            .split("source_principal=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        let security = l
            .split("connection_security_policy=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        println!("{count} connections from {principal} over {security}");
    }

    section("applying AuthorizationPolicy: DENY principal cluster.local/ns/default/sa/client");
    bed.write_state(
        r#"
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  groups:
  - rules:
    - matches:
      - principals: [{exact: "cluster.local/ns/default/sa/client"}]
"#,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match curl(&bed, &format!("http://{}:8080/", bed.ip(2))) {
            Err(e) => {
                println!(
                    "request refused as expected: {}",
                    e.to_string().lines().last().unwrap_or_default()
                );
                break;
            }
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(body) => bail!("policy did not apply: {body}"),
        }
    }

    section("summary");
    let dump = za.config_dump().await?;
    let certs: Vec<_> = dump["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["identity"].to_string())
        .collect();
    println!("client ztunnel holds certificates for: {}", certs.join(", "));
    if std::env::args().any(|a| a == "--hold") {
        println!(
            "metrics:     ip netns exec {} curl -s 127.0.0.1:15020/metrics",
            bed.b.name
        );
        println!(
            "config dump: ip netns exec {} curl -s 127.0.0.1:15000/config_dump",
            bed.a.name
        );
        println!("press Ctrl-C to tear everything down");
        tokio::signal::ctrl_c().await?;
    } else {
        println!("(run with --hold to keep the pods up and inspect them)");
    }
    println!("tearing down namespaces and processes");
    Ok(())
}
