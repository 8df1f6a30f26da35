//! Two clusters, one network (issue 17): two namespace clusters (ids 68 and 69, cluster ids
//! c68 and c69), each with its own controller, node agents and ztunnels, their underlays
//! joined; each controller reads the other's manifests as a remote cluster and the second
//! signs with the first one's root. A pod in c68 reaches a service whose only endpoints are in
//! c69 by name, over HBONE straight to the pod (c69's ztunnel counts c68's client identity;
//! an L4 policy in c69 admits it and refuses another identity of c68); a service with
//! endpoints in both clusters is served by both; when c69's manifests can no longer be read,
//! c68 withdraws c69's endpoints after the grace period and keeps serving its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mesh_e2e::apps::{echo_connect, echo_server, named_echo_server, resolve_a};
use mesh_e2e::cluster::PodSpec;
use mesh_e2e::multicluster::MultiCluster;

const WAIT: Duration = Duration::from_secs(20);
/// `--remote-grace` of both controllers.
const GRACE: Duration = Duration::from_secs(3);

fn vip(cluster: u8, n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, cluster, n).into()
}

/// Namespace `shop` (ambient) and service `both` in every cluster; `extra` besides.
fn world(cluster: u8, extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: both, namespace: shop}}
spec: {{clusterIP: {}, selector: {{app: both}}, ports: [{{name: tcp, port: 80, targetPort: 8080}}]}}
---
{extra}",
        vip(cluster, 10)
    )
}

/// c69 only: service `only-b` and the policy that admits c68's `client` and nobody else.
fn only_b() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: only-b, namespace: shop}}
spec: {{clusterIP: {}, selector: {{app: only-b}}, ports: [{{name: tcp, port: 80, targetPort: 8080}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-client, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: only-b}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/client]}}}}]}}]
",
        vip(69, 20)
    )
}

/// `meshctl clusters` where `c`'s controller runs (its debug views answer on loopback only):
/// whether it exited 0 (every cluster synced), and its table.
fn meshctl_clusters(c: &mesh_e2e::cluster::Cluster) -> (bool, String) {
    let out = c
        .controller
        .ns
        .command(&mesh_e2e::binary("meshctl"))
        .arg("clusters")
        .output()
        .expect("meshctl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_one_network() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let grace = format!("{}s", GRACE.as_secs());
    let mc = MultiCluster::start((68, 69), 2, (&world(68, ""), &world(69, &only_b())), &grace)
        .await
        .expect("two clusters up");
    let (a, b) = (&mc.a, &mc.b);
    let client = a.add_pod(0, PodSpec::new("client", "shop", &[])).expect("client");
    let other = a.add_pod(1, PodSpec::new("other", "shop", &[])).expect("other client");
    let both_a = a
        .add_pod(1, PodSpec::new("both-a", "shop", &[("app", "both")]))
        .expect("both-a");
    let server = b
        .add_pod(0, PodSpec::new("server", "shop", &[("app", "only-b")]))
        .expect("server");
    let both_b = b
        .add_pod(1, PodSpec::new("both-b", "shop", &[("app", "both")]))
        .expect("both-b");
    tokio::spawn(echo_server(
        server.ns.listen(SocketAddr::new(server.ip, 8080)).expect("listen"),
    ));
    for (pod, name) in [(&both_a, "mc-both-a"), (&both_b, "mc-both-b")] {
        let listener = pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen");
        tokio::spawn(named_echo_server(listener, name));
    }
    for p in [&client, &other, &both_a] {
        a.wait_workload(p, true, WAIT).await.expect("c68's own pods");
    }
    for p in [&server, &both_b] {
        b.wait_workload(p, true, WAIT).await.expect("c69's own pods");
        let uid = MultiCluster::uid(b, p);
        MultiCluster::wait_uid(a, &uid, true, WAIT)
            .await
            .expect("c69's pods in c68, over HBONE");
    }
    MultiCluster::wait_uid(b, &MultiCluster::uid(a, &client), true, WAIT)
        .await
        .expect("c68's pods in c69");
    let (ok, table) = meshctl_clusters(a);
    assert!(ok, "every cluster synced: exit 0\n{table}");
    let row = table.lines().find(|l| l.starts_with("c69")).unwrap_or_default();
    assert!(row.contains("remote") && row.contains("synced"), "{table}");

    // A service whose only endpoints are in c69, by name through c68's DNS proxy, straight to
    // the pod: the server sees the client pod's own address.
    let resolver = vip(68, 53);
    let got = resolve_a(&client.ns, resolver, "only-b.shop.svc.cluster.local").expect("resolve");
    assert_eq!(
        got,
        vec![Ipv4Addr::new(10, 96, 69, 20)],
        "the remote-only service's VIP"
    );
    let (peer, _conn) = echo_connect(&client.ns, SocketAddr::new(vip(69, 20), 80))
        .await
        .expect("c68 -> c69 by the remote-only service");
    assert_eq!(peer, format!("peer={}", client.ip));
    let metrics = MultiCluster::ztunnel_metrics(b, 0).await.expect("c69 node 0 metrics");
    let from_client = metrics.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
            && l.contains("destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains("source_cluster=\"c68\"")
            && l.contains("destination_cluster=\"c69\"")
    });
    assert!(
        from_client,
        "c69's ztunnel saw c68's client identity over mTLS:\n{metrics}"
    );
    // c69's policy admits c68's client only.
    let refused = echo_connect(&other.ns, SocketAddr::new(vip(69, 20), 80)).await;
    assert!(
        refused.is_err(),
        "c68's other identity is refused by c69's policy: {refused:?}"
    );

    // One service, endpoints in both clusters: both serve it, by either cluster's VIP.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let target = SocketAddr::new(vip(if i % 2 == 0 { 68 } else { 69 }, 10), 80);
        let (name, _conn) = echo_connect(&client.ns, target).await.expect("both");
        seen.insert(name);
        if seen.len() == 2 && i >= 10 {
            break;
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["mc-both-a", "mc-both-b"]);

    // c69 goes away for c68: its endpoints are withdrawn after the grace period, not before;
    // c68 keeps serving its own.
    mc.unlink(b).expect("unlink c69");
    let gone = Instant::now();
    MultiCluster::wait_uid(a, &MultiCluster::uid(b, &both_b), false, GRACE + WAIT)
        .await
        .expect("c69's endpoints withdrawn from c68");
    let after = gone.elapsed();
    assert!(
        after >= GRACE - Duration::from_millis(500),
        "withdrawn after {after:?}, grace {GRACE:?}"
    );
    let (_, clusters) = a.controller.debug("/debug/clusters").await.expect("clusters view");
    let view: serde_json::Value = serde_json::from_str(&clusters).expect("JSON");
    let c69 = view.as_array().into_iter().flatten().find(|c| c["id"] == "c69");
    assert_eq!(c69.map(|c| c["state"].clone()), Some("withdrawn".into()), "{clusters}");
    let (ok, table) = meshctl_clusters(a);
    assert!(!ok, "a withdrawn cluster: exit 1\n{table}");
    assert!(
        table.lines().any(|l| l.starts_with("c69") && l.contains("withdrawn")),
        "{table}"
    );
    for _ in 0..6 {
        let (name, _conn) = echo_connect(&client.ns, SocketAddr::new(vip(68, 10), 80))
            .await
            .expect("c68 keeps serving");
        assert_eq!(name, "mc-both-a");
    }
    let unreachable = echo_connect(&client.ns, SocketAddr::new(vip(69, 20), 80)).await;
    assert!(
        unreachable.is_err(),
        "the remote-only service is gone with c69: {unreachable:?}"
    );
    eprintln!("c69's endpoints withdrawn from c68 {after:?} after its manifests went (grace {GRACE:?})");

    // c69 comes back: served again.
    mc.link(b).expect("relink c69");
    MultiCluster::wait_uid(a, &MultiCluster::uid(b, &both_b), true, WAIT)
        .await
        .expect("c69's endpoints back in c68");
}
