//! Locality and failover (issue 17), end to end on two namespace clusters on one network
//! (ids 82 and 83, cluster ids c82 and c83, one node each): the workloads' zones come from
//! their pods' `topology.kubernetes.io/*` labels, zone a in c82, zone b in c83, and every
//! service is declared in both (one merged service). A client in c82 reaches c82's endpoint
//! of a `trafficDistribution: PreferClose` service (and of one asking through Istio's
//! annotation) every time; when that pod goes, c83's serves with no failed connection once
//! the client's ztunnel has the change; a new zone-a endpoint brings traffic back. A
//! node-local service (`internalTrafficPolicy: Local`, Istio's NODE STRICT) is refused as
//! `no_local_endpoint` when its only endpoint is on another node. The server's reply names
//! which endpoint answered.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mesh_e2e::apps::named_server;
use mesh_e2e::cluster::{Cluster, Pod, PodSpec};
use mesh_e2e::multicluster::MultiCluster;

const A: u8 = 82;
const B: u8 = 83;
const WAIT: Duration = Duration::from_secs(20);

fn vip_of(cluster: u8, n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, cluster, n).into()
}

/// The client's cluster's VIPs.
fn vip(n: u8) -> IpAddr {
    vip_of(A, n)
}

fn world(cluster: u8) -> String {
    format!(
        "\
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: close, namespace: shop}}
spec: {{clusterIP: {close}, trafficDistribution: PreferClose, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: annotated, namespace: shop, annotations: {{networking.istio.io/traffic-distribution: PreferClose}}}}
spec: {{clusterIP: {annotated}, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: node-local, namespace: shop}}
spec: {{clusterIP: {local}, internalTrafficPolicy: Local, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
",
        close = vip_of(cluster, 10),
        annotated = vip_of(cluster, 11),
        local = vip_of(cluster, 12),
    )
}

const ZONE_A: [(&str, &str); 3] = [
    ("app", "server"),
    ("topology.kubernetes.io/region", "r1"),
    ("topology.kubernetes.io/zone", "a"),
];
const ZONE_B: [(&str, &str); 3] = [
    ("app", "server"),
    ("topology.kubernetes.io/region", "r1"),
    ("topology.kubernetes.io/zone", "b"),
];

/// The name of the endpoint that answered (the first line of its reply), or the error.
fn who(from: &Pod, vip: IpAddr) -> String {
    match from
        .ns
        .exec(&["curl", "-sS", "--max-time", "5", &format!("http://{vip}:80/")])
    {
        Ok(body) => body.lines().next().unwrap_or_default().to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// Waits until node `node`'s ztunnel holds (or no longer holds) `pod`'s workload.
async fn wait_known(cluster: &Cluster, node: u8, pod: &Pod, present: bool) {
    let uid = format!("{}//Pod/{}/{}", cluster.cluster_id, pod.namespace, pod.name);
    let deadline = Instant::now() + WAIT;
    loop {
        let dump = cluster.ztunnel_dump(node).await.expect("config dump");
        let found = dump["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| w["uid"] == uid.as_str());
        if found == present {
            return;
        }
        assert!(Instant::now() < deadline, "{uid} present={found} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn refused(cluster: &Cluster, reason: &str) -> u64 {
    let addr = SocketAddr::from(([127, 0, 0, 1], 15020));
    let (_, text) = mesh_e2e::ztunnel::http_request(cluster.nodes[0].ns, addr, "GET", "/metrics")
        .await
        .expect("node 0 ztunnel metrics");
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("ztunnel_connections_refused_total") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn serve(pod: &Pod, name: &'static str) {
    let listener = pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen");
    tokio::spawn(named_server(listener, name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_close_stays_in_zone_and_fails_over_to_the_other_cluster() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let mc = MultiCluster::start((A, B), 1, (&world(A), &world(B)), "30s")
        .await
        .expect("two clusters up");
    let (a, b) = (&mc.a, &mc.b);
    let client_labels = [
        ("topology.kubernetes.io/region", "r1"),
        ("topology.kubernetes.io/zone", "a"),
    ];
    let client = a
        .add_pod(0, PodSpec::new("client", "shop", &client_labels))
        .expect("client pod");
    let near = a.add_pod(0, PodSpec::new("near", "shop", &ZONE_A)).expect("zone a");
    let far = b.add_pod(0, PodSpec::new("far", "shop", &ZONE_B)).expect("zone b");
    serve(&near, "near");
    serve(&far, "far");
    for p in [&client, &near] {
        a.wait_workload(p, true, WAIT).await.expect("c82's pods");
    }
    b.wait_workload(&far, true, WAIT).await.expect("c83's pod");
    MultiCluster::wait_uid(a, &MultiCluster::uid(b, &far), true, WAIT)
        .await
        .expect("c83's endpoint in c82");

    // Same zone (c82) every time, by the field and by Istio's annotation; node-local too.
    for svc in [vip(10), vip(11), vip(12)] {
        for _ in 0..8 {
            assert_eq!(who(&client, svc), "near", "{svc}");
        }
    }

    // c82's endpoint goes: c83's serves, with no failed connection once the client's ztunnel
    // knows.
    a.withdraw_pod(&near).expect("withdraw near");
    wait_known(a, 0, &near, false).await;
    for svc in [vip(10), vip(11)] {
        for _ in 0..8 {
            assert_eq!(who(&client, svc), "far", "{svc} fails over to c83");
        }
    }
    // Node-local (STRICT): the only endpoint is on another node; refused, not sent there.
    let before = refused(a, "no_local_endpoint").await;
    let got = who(&client, vip(12));
    assert!(got.starts_with("error"), "node-local service answered by {got}");
    assert_eq!(refused(a, "no_local_endpoint").await, before + 1);

    // A zone-a endpoint again: traffic comes back to c82.
    let back = a
        .add_pod(0, PodSpec::new("back", "shop", &ZONE_A))
        .expect("zone a again");
    serve(&back, "back");
    a.wait_workload(&back, true, WAIT).await.expect("back advertised");
    for _ in 0..8 {
        assert_eq!(who(&client, vip(10)), "back", "traffic returns to zone a");
    }
    assert_eq!(who(&client, vip(12)), "back", "node-local has an endpoint again");
}
