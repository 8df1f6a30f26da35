//! ztunnel under attack by a mesh peer or a pod (root): a workload with a foreign identity
//! claiming another client address in `forwarded`, CONNECTs aimed at ztunnel's own listeners,
//! and admin actions tried on every address a pod reaches. Each test fails on the code before
//! the fix it guards (issues 10 items 3 and 6, 19 item 2).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::hbone::{HboneError, HbonePool, PoolKey, Settings, TunnelRequest};
use mesh_core::identity::{CertManager, CertManagerConfig, DevCa, Identity};
use mesh_e2e::apps::echo_server;
use mesh_e2e::bed::PairEntries;
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::metrics::sample;
use mesh_e2e::netns::{Netns, NsSockets};
use mesh_e2e::ztunnel::http_request;
use mesh_e2e::{until, Bed, Ztunnel};
use tokio::io::AsyncBufReadExt;

const SERVER_SA: &str = "spiffe://cluster.local/ns/default/sa/server";
const ATTACKER_SA: &str = "spiffe://cluster.local/ns/evil/sa/attacker";
const WAYPOINT_SA: &str = "spiffe://cluster.local/ns/default/sa/waypoint";

/// An HBONE client in pod c holding certificates for any identity the bed's root signs.
fn client_in_c(bed: &Bed) -> Arc<HbonePool> {
    let ca = DevCa::load(&bed.root_cert, &bed.root_key).expect("bed CA");
    let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
    HbonePool::new(Settings::default(), certs, Arc::new(NsSockets(bed.c.name.clone())))
}

fn connect_req(bed: &Bed, identity: &str, authority: SocketAddr, forwarded: Option<SocketAddr>) -> TunnelRequest {
    TunnelRequest {
        key: PoolKey {
            src_identity: identity.parse::<Identity>().expect("identity"),
            dst_identities: vec![SERVER_SA.parse().expect("identity")],
            src_ip: None,
            dst: SocketAddr::new(bed.ip(2), 15008),
        },
        authority: authority.to_string(),
        forwarded_for: forwarded,
        baggage: None,
        traceparent: None,
    }
}

/// Opens a tunnel to pod b's echo server as `identity` claiming `forwarded`, and returns the
/// peer address the application saw ("peer=<ip>").
async fn seen_by_app(pool: &Arc<HbonePool>, bed: &Bed, identity: &str, forwarded: Option<SocketAddr>) -> String {
    let req = connect_req(bed, identity, SocketAddr::new(bed.ip(2), 9000), forwarded);
    let stream = pool.connect(&req).await.expect("tunnel accepted");
    let mut r = tokio::io::BufReader::new(stream.into_io());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .expect("the app answers in time")
        .expect("read the peer line");
    line.trim().to_owned()
}

/// The bed's workloads plus pod c as `waypoint` (identity sa/waypoint), named as the server's
/// waypoint by address.
fn state_with_waypoint(bed: &Bed) -> String {
    let pair = PairEntries::new([bed.ip(1), bed.ip6(1)], [bed.ip(2), bed.ip6(2)], bed.vip());
    let c = bed.ip(3);
    let workloads = pair.workloads.replace(
        "  node: node-b\n",
        &format!("  node: node-b\n  waypoint: {{address: \"{c}\", hbonePort: 15008}}\n"),
    );
    format!(
        "\nworkloads:\n{workloads}- uid: cluster1//Pod/default/waypoint
  name: waypoint
  namespace: default
  serviceAccount: waypoint
  addresses: [\"{c}\"]
  protocol: HBONE
  node: node-c
services:\n{}policies: []\n",
        pair.services
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_client_address_is_believed_only_from_the_destinations_waypoint() {
    let Some(bed) = Bed::new(75) else { return };
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.expect("ztunnel b");
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let pool = client_in_c(&bed);
    let c = format!("peer={}", bed.ip(3));
    let loopback: SocketAddr = "127.0.0.1:1234".parse().unwrap();
    let pod_a = SocketAddr::new(bed.ip(1), 1234);

    // A foreign identity claiming loopback or another pod's address is seen as itself.
    assert_eq!(seen_by_app(&pool, &bed, ATTACKER_SA, Some(loopback)).await, c);
    assert_eq!(seen_by_app(&pool, &bed, ATTACKER_SA, Some(pod_a)).await, c);
    assert_eq!(seen_by_app(&pool, &bed, ATTACKER_SA, None).await, c);
    let m = zb.metrics().await.unwrap();
    assert_eq!(
        sample(&m, "ztunnel_forwarded_ignored_total", &["reason=\"untrusted_peer\""]),
        2.0,
        "{m}"
    );

    // Pod c becomes the server's waypoint: its identity, from its address, is believed...
    let tmp = bed.state.with_extension("tmp");
    std::fs::write(&tmp, state_with_waypoint(&bed)).unwrap();
    std::fs::rename(&tmp, &bed.state).unwrap();
    until("the waypoint workload to apply", Duration::from_secs(10), || async {
        zb.config_dump()
            .await
            .map(|d| d["workloads"].as_array().map(Vec::len) == Some(3))
            .unwrap_or(false)
    })
    .await;
    let forwarded = SocketAddr::new(bed.ip(1), 5555);
    assert_eq!(
        seen_by_app(&pool, &bed, WAYPOINT_SA, Some(forwarded)).await,
        format!("peer={}", bed.ip(1)),
        "the waypoint's forwarded client address is honoured"
    );
    // ...but never for loopback, unspecified or the destination's own address...
    for bad in [loopback, "0.0.0.0:1".parse().unwrap(), SocketAddr::new(bed.ip(2), 1)] {
        assert_eq!(seen_by_app(&pool, &bed, WAYPOINT_SA, Some(bad)).await, c, "{bad}");
    }
    // ...and another identity from the waypoint's address is still not believed.
    assert_eq!(seen_by_app(&pool, &bed, ATTACKER_SA, Some(pod_a)).await, c);
    let m = zb.metrics().await.unwrap();
    assert_eq!(
        sample(&m, "ztunnel_forwarded_ignored_total", &["reason=\"invalid_address\""]),
        3.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "ztunnel_forwarded_ignored_total", &["reason=\"untrusted_peer\""]),
        3.0,
        "{m}"
    );
    // The access log attributes each connection to the same source the app saw.
    let trusted = format!("\"src.addr\":\"{forwarded}\"");
    let own = format!("\"src.addr\":\"{}:", bed.ip(3));
    until("access log lines", Duration::from_secs(5), || {
        let logs = zb.logs();
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains("connection complete")).collect();
        let done = lines.iter().any(|l| l.contains(&trusted))
            && lines.iter().filter(|l| l.contains(&own)).count() >= 7
            && !lines.iter().any(|l| l.contains("127.0.0.1") || l.contains("0.0.0.0:1"));
        async move { done }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_ztunnels_own_listeners_is_a_loop() {
    let Some(bed) = Bed::new(76) else { return };
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.expect("ztunnel b");
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let pool = client_in_c(&bed);
    let client = "spiffe://cluster.local/ns/default/sa/client";
    let loops = |m: &str| sample(m, "ztunnel_connections_refused_total", &["reason=\"loop\""]);
    let before = loops(&zb.metrics().await.unwrap());
    // Metrics, readiness and admin (dedicated mode shares the pod's namespace), and the proxy
    // ports themselves: 400, counted as a loop.
    let ports = [15020, 15021, 15000, 15001, 15006, 15008];
    for port in ports {
        let req = connect_req(&bed, client, SocketAddr::new(bed.ip(2), port), None);
        match pool.connect(&req).await {
            Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::BAD_REQUEST, "port {port}"),
            other => panic!("port {port}: expected 400, got {:?}", other.map(|_| ())),
        }
    }
    let after = loops(&zb.metrics().await.unwrap());
    assert_eq!(after - before, ports.len() as f64, "each refusal counted as a loop");
    // The application's own port still works.
    assert_eq!(
        seen_by_app(&pool, &bed, client, None).await,
        format!("peer={}", bed.ip(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_ztunnel_listener_serves_only_its_own_paths() {
    let Some(bed) = Bed::new(77) else { return };
    let za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.expect("ztunnel a");
    let (admin, stats, ready) = ("127.0.0.1:15000", "127.0.0.1:15020", "127.0.0.1:15021");
    // Admin actions only on the loopback admin listener.
    for addr in [stats, ready] {
        assert_eq!(za.get(addr, "/config_dump").await.unwrap().0, 404, "{addr}");
        assert_eq!(za.post(addr, "/logging?level=trace").await.unwrap().0, 404, "{addr}");
        assert_eq!(za.get(addr, "/logging").await.unwrap().0, 404, "{addr}");
    }
    assert_eq!(za.get(admin, "/config_dump").await.unwrap().0, 200);
    assert_eq!(
        za.post(admin, "/logging?level=info%2Caccess%3Dinfo").await.unwrap().0,
        200
    );
    // Metrics and readiness each on their own.
    assert_eq!(za.get(stats, "/metrics").await.unwrap().0, 200);
    assert_eq!(za.get(stats, "/stats/prometheus").await.unwrap().0, 200);
    assert_eq!(za.get(ready, "/healthz/ready").await.unwrap().0, 200);
    for (addr, path) in [
        (admin, "/metrics"),
        (admin, "/healthz/ready"),
        (ready, "/metrics"),
        (stats, "/healthz/ready"),
        (stats, "/"),
        (admin, "/nope"),
    ] {
        assert_eq!(za.get(addr, path).await.unwrap().0, 404, "{addr}{path}");
    }
    // A log filter past the bound is refused, and the level stays what it was.
    let long = format!("/logging?level=info,{}", "a=debug,".repeat(64));
    let (status, body) = za.post(admin, &long).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("longer than"), "{body}");
    assert!(za.get(admin, "/logging").await.unwrap().1.contains("info,access=info"));
    // The admin address cannot be moved off loopback.
    let refused = std::process::Command::new(mesh_e2e::binary("ztunnel"))
        .args(["--local-xds-path", "/nonexistent", "--admin-addr", "0.0.0.0:15000"])
        .args(["--ca-root-cert", "/x", "--ca-root-key", "/y"])
        .output()
        .expect("run ztunnel");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("loopback"));
}

fn cluster_world() -> &'static str {
    "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
"
}

/// An HTTP/1.0 request from `ns` that gives up after 5 s; (0, "") when nothing answered.
async fn ask(ns: &Netns, addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    match tokio::time::timeout(Duration::from_secs(5), http_request(ns, addr, method, path)).await {
        Ok(Ok(answer)) => answer,
        _ => (0, String::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_are_unreachable_from_pods() {
    const ID: u8 = 86;
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let cluster = Cluster::start(ID, 2, cluster_world()).await.expect("cluster up");
    let meshed = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("meshed pod");
    let legacy = cluster
        .add_pod(1, PodSpec::new("old", "legacy", &[]))
        .expect("legacy pod");
    cluster
        .wait_workload(&meshed, true, Duration::from_secs(15))
        .await
        .expect("meshed pod advertised");
    // Every address of a ztunnel (node) and of the controller a pod reaches.
    let mut ztunnels: Vec<IpAddr> = (0..2).map(|i| Cluster::underlay_ip(ID, i)).collect();
    ztunnels.extend((0..2u8).map(|i| IpAddr::from([10, 100 + i, ID, 1])));
    let controller = cluster.controller_ip();
    let admin_calls = [
        ("POST", "/logging?level=trace"),
        ("GET", "/logging"),
        ("GET", "/config_dump"),
        ("GET", "/debug/config"),
        ("GET", "/debug/problems"),
        ("GET", "/debug/waypoints"),
        ("GET", "/debug/skipped"),
    ];
    for pod in [&meshed, &legacy] {
        let from = &pod.ns.name;
        for ip in &ztunnels {
            for port in [15000, 15020, 15021] {
                for (method, path) in admin_calls {
                    let (status, body) = ask(&pod.ns, SocketAddr::new(*ip, port), method, path).await;
                    assert_ne!(status, 200, "{method} {ip}:{port}{path} from {from}: {body}");
                }
            }
            let (status, _) = ask(&pod.ns, SocketAddr::new(*ip, 15020), "GET", "/metrics").await;
            assert_eq!(status, 200, "ztunnel metrics on {ip} from {from}");
            let (status, _) = ask(&pod.ns, SocketAddr::new(*ip, 15021), "GET", "/healthz/ready").await;
            assert_eq!(status, 200, "ztunnel readiness on {ip} from {from}");
        }
        for port in [15014, 15015] {
            for (method, path) in admin_calls {
                let (status, body) = ask(&pod.ns, SocketAddr::new(controller, port), method, path).await;
                assert_ne!(status, 200, "{method} controller:{port}{path} from {from}: {body}");
            }
        }
        let (status, _) = ask(&pod.ns, SocketAddr::new(controller, 15014), "GET", "/metrics").await;
        assert_eq!(status, 200, "controller metrics from {from}");
        let (status, _) = ask(&pod.ns, SocketAddr::new(controller, 15014), "GET", "/ready").await;
        assert_eq!(status, 200, "controller readiness from {from}");
    }
    // The same calls work on localhost inside each component's namespace.
    let local_admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    for n in &cluster.nodes {
        let (status, body) = ask(n.ns, local_admin, "GET", "/config_dump").await;
        assert_eq!(status, 200, "config_dump in {}", n.name());
        assert!(body.contains("\"workloads\""), "{body}");
        let (status, body) = ask(n.ns, local_admin, "POST", "/logging?level=info").await;
        assert_eq!(status, 200, "logging in {}: {body}", n.name());
    }
    let control = &cluster.controller.ns;
    let local_debug = SocketAddr::from(([127, 0, 0, 1], 15015));
    for path in ["/debug/config", "/debug/problems", "/debug/waypoints", "/debug/skipped"] {
        let (status, body) = ask(control, local_debug, "GET", path).await;
        assert_eq!(status, 200, "controller {path} on localhost: {body}");
    }
    let (status, body) = cluster.controller.debug("/debug/config").await.expect("harness debug");
    assert_eq!(status, 200, "{body}");
}
