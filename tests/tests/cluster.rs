//! Two nodes, end to end: pods created through the real CNI chain on two node namespaces,
//! the controller in local mode, a node agent and an in-pod ztunnel per node.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_e2e::apps::{echo_server, http_server, resolve_a, LoadClient};
use mesh_e2e::cluster::{Cluster, Pod, PodSpec};
use mesh_e2e::tcpdump::Tcpdump;

const ID: u8 = 80;
const WAIT: Duration = Duration::from_secs(15);

fn world(vip: std::net::IpAddr) -> String {
    format!(
        "\
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: legacy}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: shop}}
spec: {{clusterIP: {vip}, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"
    )
}

fn curl(from: &Pod, url: &str) -> String {
    from.ns
        .exec(&["curl", "-sS", "--max-time", "5", url])
        .unwrap_or_else(|e| format!("error: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_pod_to_pod_over_hbone() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let vip = std::net::Ipv4Addr::new(10, 96, ID, 10);
    let cluster = Cluster::start(ID, 2, &world(vip.into())).await.expect("cluster up");

    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    let local = cluster
        .add_pod(0, PodSpec::new("local", "shop", &[("app", "server")]))
        .expect("same-node server");
    let remote = cluster
        .add_pod(1, PodSpec::new("remote", "shop", &[("app", "server")]))
        .expect("remote server");
    let plain = cluster
        .add_pod(1, PodSpec::new("plain", "legacy", &[]))
        .expect("legacy pod");
    let opted_out = cluster
        .add_pod(1, PodSpec::new("batch", "shop", &[("istio.io/dataplane-mode", "none")]))
        .expect("opted-out pod");
    for server in [&local, &remote, &plain, &opted_out] {
        tokio::spawn(http_server(
            server.ns.listen(SocketAddr::new(server.ip, 8080)).expect("listen"),
        ));
    }
    assert!(client.captured() && local.captured() && remote.captured());
    assert!(!plain.captured(), "a pod of a non-ambient namespace is untouched");
    assert!(!opted_out.captured(), "a pod labelled none is not captured");
    for p in [&client, &local, &remote] {
        cluster
            .wait_workload(p, true, WAIT)
            .await
            .expect("captured pods advertised with HBONE");
    }
    cluster
        .wait_workload(&plain, false, WAIT)
        .await
        .expect("uncaptured pods advertised without");

    // Same node and across nodes, by pod IP; the server sees the client pod's address.
    let want = format!("peer={}\n", client.ip);
    assert_eq!(curl(&client, &format!("http://{}:8080/", local.ip)), want, "same node");
    assert_eq!(
        curl(&client, &format!("http://{}:8080/", remote.ip)),
        want,
        "across nodes"
    );
    // By VIP: either backend, always from the client's address.
    for _ in 0..4 {
        assert_eq!(curl(&client, &format!("http://{vip}:80/")), want, "by VIP");
    }
    // DNS through the proxy: the service's name and its short forms from a pod of its namespace.
    let any_resolver = std::net::Ipv4Addr::new(10, 96, ID, 53).into();
    for name in ["server.shop.svc.cluster.local", "server.shop", "server"] {
        let got = resolve_a(&client.ns, any_resolver, name).unwrap_or_else(|e| panic!("resolving {name}: {e}"));
        assert_eq!(got, vec![vip], "{name}");
    }
    // The pod's own resolver (glibc, /etc/resolv.conf's nameserver, connected UDP socket).
    let by_name = curl(&client, "http://server.shop.svc.cluster.local/");
    assert_eq!(by_name, want, "curl by DNS name");
    // Plain TCP to the legacy pod; its answer comes untouched.
    assert_eq!(
        curl(&client, &format!("http://{}:8080/", plain.ip)),
        want,
        "to a non-mesh pod"
    );

    // Identities in the destination ztunnel's metrics (node 1).
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 15020));
    let (_, metrics) = mesh_e2e::ztunnel::http_request(cluster.nodes[1].ns, metrics_addr, "GET", "/metrics")
        .await
        .expect("metrics of node 1's ztunnel");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                && l.contains("destination_principal=\"spiffe://cluster.local/ns/shop/sa/remote\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );

    // The node agent's metrics: what it enrolled, valid Prometheus text.
    let agent_metrics = SocketAddr::from(([127, 0, 0, 1], 15022));
    let (_, text) = mesh_e2e::ztunnel::http_request(cluster.nodes[0].ns, agent_metrics, "GET", "/metrics")
        .await
        .expect("agent metrics");
    mesh_e2e::promtool_check(&text).expect("agent metrics are valid Prometheus text");
    assert!(
        text.contains("cni_agent_pods_enrolled 2"),
        "client and local on node 0:\n{text}"
    );
    assert!(
        text.contains("cni_agent_enrolments_total{result=\"captured\"} 2"),
        "{text}"
    );
    assert!(text.contains("cni_agent_ztunnels_connected 1"), "{text}");

    // The underlay only ever sees TLS to 15008 for mesh traffic: a marker never in clear.
    let marker = "MARKER-7d1f0c-not-in-clear";
    let args = [
        "-i",
        "br0",
        "-U",
        "-n",
        "-A",
        "-s",
        "0",
        "--immediate-mode",
        "-Z",
        "root",
        "tcp",
    ];
    let capture = Tcpdump::start(&cluster.hub().name, &args).expect("tcpdump capture live");
    let url = format!("http://{}:8080/{marker}", remote.ip);
    assert_eq!(curl(&client, &url), want);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = capture.stop().expect("tcpdump output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(marker), "the marker crossed the underlay in clear");
    let to_remote = format!("{}.15008", remote.ip);
    assert!(text.contains(&to_remote), "no HBONE to {to_remote} seen:\n{text:.2000}");
    let remote_port_8080 = format!("{}.8080", remote.ip);
    assert!(
        !text.contains(&remote_port_8080),
        "mesh traffic bypassed HBONE:\n{text:.2000}"
    );

    // An L4 policy denying the client, enforced across nodes.
    cluster
        .write_manifest(
            "policy.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client, namespace: shop}\nspec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n",
        )
        .expect("policy");
    let deadline = std::time::Instant::now() + WAIT;
    while curl(&client, &format!("http://{}:8080/", remote.ip)) == want {
        assert!(std::time::Instant::now() < deadline, "DENY never enforced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_file(cluster.controller.dir.path().join("manifests/policy.yaml")).expect("remove policy");
    let deadline = std::time::Instant::now() + WAIT;
    while curl(&client, &format!("http://{}:8080/", remote.ip)) != want {
        assert!(std::time::Instant::now() < deadline, "policy removal never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Labelling the legacy namespace captures its running pod; removing the label releases it.
    cluster
        .write_manifest(
            "legacy.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}\n",
        )
        .expect("label");
    // The world file defines `legacy` too; the newer label file must win: rewrite the world.
    cluster
        .write_manifest(
            "world.yaml",
            &world(vip.into()).replace(
                "metadata: {name: legacy}",
                "metadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}",
            ),
        )
        .expect("world");
    std::fs::remove_file(cluster.controller.dir.path().join("manifests/legacy.yaml")).expect("rm");
    cluster
        .wait_workload(&plain, true, WAIT)
        .await
        .expect("labelled namespace's pod captured");
    assert!(plain.captured(), "captured without a restart");
    assert_eq!(
        curl(&client, &format!("http://{}:8080/", plain.ip)),
        want,
        "now over HBONE"
    );
    cluster
        .write_manifest("world.yaml", &world(vip.into()))
        .expect("unlabel");
    cluster.wait_workload(&plain, false, WAIT).await.expect("released");
    assert!(!plain.captured(), "label removed: rules gone");

    // A pod that predates the mesh (never through our plugin) in an ambient namespace: the
    // agent finds its namespace by IP and captures it.
    let old = cluster
        .add_pod_without_mesh(1, PodSpec::new("veteran", "shop", &[]))
        .expect("pod created without the mesh");
    tokio::spawn(http_server(
        old.ns.listen(SocketAddr::new(old.ip, 8080)).expect("listen"),
    ));
    if let Err(e) = cluster.wait_workload(&old, true, WAIT).await {
        panic!("{e}\nagent on node 1:\n{}", cluster.nodes[1].agent_log());
    }
    assert!(old.captured(), "rules written into the found namespace");
    assert_eq!(curl(&client, &format!("http://{}:8080/", old.ip)), want, "over HBONE");

    // Rolling upgrade of node 1's ztunnel under a new connection every 10 ms from node 0: a
    // second ztunnel starts beside the first (its own namespace, as a DaemonSet's new pod),
    // then the first is told to stop.
    let echo = SocketAddr::new(remote.ip, 9000);
    tokio::spawn(echo_server(remote.ns.listen(echo).expect("listen")));
    let load = LoadClient::start(client.ns.name.clone(), echo, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(300)).await; // load before, during and after
    let new = cluster.start_ztunnel_beside(1).await.expect("second ztunnel ready");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = cluster.nodes[1].ztunnel.lock().unwrap().take();
    let mut old = old.expect("first ztunnel");
    old.sigterm().expect("SIGTERM");
    assert_eq!(old.wait_exit(Duration::from_secs(15)).await.expect("exit"), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.finish().await;
    assert!(ok > 50, "only {ok} connections succeeded");
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during the upgrade",
        ok + failed
    );
    drop(new);

    // ztunnel on node 1 killed and restarted: new connections work once it is ready.
    drop(cluster.nodes[1].ztunnel.lock().unwrap().take());
    cluster.replace_ztunnel(1).await.expect("ztunnel restarted");
    assert_eq!(
        curl(&client, &format!("http://{}:8080/", remote.ip)),
        want,
        "after restart"
    );

    // Deleting a pod removes its rules and its ztunnel listeners.
    cluster.delete_pod(&remote).expect("CNI DEL");
    assert!(!remote.captured(), "rules removed on DEL");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let listening = remote
            .ns
            .exec(&["ss", "-Hltn", "sport", "= :15008"])
            .unwrap_or_default();
        if listening.trim().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ztunnel still listens in the deleted pod:\n{listening}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.delete_pod(&remote).expect("DEL is idempotent");

    // CNI ADD of an ambient pod fails clearly when the agent is down.
    cluster.nodes[0].stop_agent();
    let err = match cluster.add_pod(0, PodSpec::new("orphan", "shop", &[])) {
        Ok(_) => panic!("ADD succeeded without an agent"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("ambient-cni ADD"), "{err}");
}
