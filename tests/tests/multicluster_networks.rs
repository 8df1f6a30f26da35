//! Two clusters on two networks (issue 17), control plane and data plane together: clusters
//! 70 and 81 (c70 on net-a, c81 on net-b), each controller reading the other's manifests, no
//! route between their pod ranges. c81 runs an east-west gateway (`waypoint --role east-west`,
//! identity istio-system/eastwest, with its controller's state) declared by a Gateway of class
//! `istio-east-west`; c70's controller gives c81's workloads that gateway as their
//! `network_gateway`, so a pod in c70 reaches a service whose endpoint is in c81 through it with
//! double HBONE, and the server's ztunnel sees the client's identity.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_e2e::apps::{echo_connect, echo_server};
use mesh_e2e::cluster::PodSpec;
use mesh_e2e::multicluster::MultiCluster;
use mesh_e2e::waypoint::Waypoint;

const WAIT: Duration = Duration::from_secs(20);

fn vip(cluster: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, cluster, 30).into()
}

/// The system namespace on `network`, namespace `shop` (ambient) and service `far` (declared in
/// both clusters, as Istio requires of a service reached across networks).
fn world(cluster: u8, network: &str) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: istio-system, labels: {{topology.istio.io/network: {network}}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: far, namespace: shop}}
spec: {{clusterIP: {}, selector: {{app: far}}, ports: [{{name: tcp, port: 80, targetPort: 8080}}]}}
",
        vip(cluster)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_two_networks_through_the_east_west_gateway() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let mc = MultiCluster::start_two_networks(
        (70, 81),
        2,
        (&world(70, "net-a"), &world(81, "net-b")),
        ("net-a", "net-b"),
    )
    .await
    .expect("two clusters up");
    let (a, b) = (&mc.a, &mc.b);
    let client = a.add_pod(0, PodSpec::new("client", "shop", &[])).expect("client");
    let server = b
        .add_pod(0, PodSpec::new("server", "shop", &[("app", "far")]))
        .expect("server");
    tokio::spawn(echo_server(
        server.ns.listen(SocketAddr::new(server.ip, 8080)).expect("listen"),
    ));
    let gateway = Waypoint::start_with(
        b,
        1,
        "istio-system",
        "eastwest",
        &["--role", "east-west", "--network", "net-b"],
    )
    .await
    .expect("east-west gateway");
    mc.expose(b, &gateway.pod).expect("gateway reachable from c70");
    b.write_manifest(
        "eastwest.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: eastwest, namespace: istio-system, labels: {{topology.istio.io/network: net-b}}}}
spec:
  gatewayClassName: istio-east-west
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
  addresses: [{{type: IPAddress, value: {}}}]
",
            gateway.pod.ip
        ),
    )
    .expect("Gateway");
    a.wait_workload(&client, true, WAIT).await.expect("client");
    b.wait_workload(&server, true, WAIT).await.expect("server");
    MultiCluster::wait_uid(a, &MultiCluster::uid(b, &server), true, WAIT)
        .await
        .expect("c81's server in c70");
    // No route between the pod ranges: only the gateway is reachable from c70.
    let direct = tokio::time::timeout(
        Duration::from_secs(2),
        a.nodes[0].ns.connect(SocketAddr::new(server.ip, 8080)),
    )
    .await;
    assert!(!matches!(direct, Ok(Ok(_))), "c70 must not reach c81's pods directly");

    let dump = a.ztunnel_dump(0).await.expect("dump");
    let uid = MultiCluster::uid(b, &server);
    let held = dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["uid"] == uid.as_str());
    assert_eq!(held.map(|w| w["network"].clone()), Some("net-b".into()), "{dump:#}");

    // Once c70's ztunnel has the gateway (no view of it in the dump): through it by c70's VIP.
    let target = SocketAddr::new(vip(70), 80);
    mesh_e2e::until("c70 -> c81 through the east-west gateway", WAIT, || async {
        echo_connect(&client.ns, target).await.is_ok()
    })
    .await;
    let (peer, _conn) = echo_connect(&client.ns, target).await.expect("again");
    assert_eq!(
        peer,
        format!("peer={}", gateway.pod.ip),
        "the server's side of the relay is the gateway"
    );
    let relayed = gateway.metrics().await.expect("gateway metrics");
    assert!(
        relayed
            .lines()
            .any(|l| l.starts_with("eastwest_streams_total") && l.contains("outcome=\"forwarded\"")),
        "{relayed}"
    );
    assert_client_seen(b, "client").await;

    // Istio's ztunnel as the client's node proxy in c70 (shared mode, our node agent, our
    // controller): it reaches the c81 endpoint through our gateway with what our controller
    // serves.
    let Some(peer) = mesh_e2e::istio::peer().expect("Istio's ztunnel") else {
        return;
    };
    let istio_zt = istio_ztunnel_on_node_1(a, &peer).await;
    let istio_client = a.add_pod(1, PodSpec::new("istio-client", "shop", &[])).expect("pod");
    mesh_e2e::until("Istio's ztunnel -> c81 through our east-west gateway", WAIT, || async {
        echo_connect(&istio_client.ns, target).await.is_ok()
    })
    .await;
    assert_client_seen(b, "istio-client").await;
    eprintln!("Istio's ztunnel reached c81 through our east-west gateway");
    drop(istio_zt);
}

/// c81's ztunnel counted a connection from c70's `client` service account, mutual TLS end to
/// end (the gateway in between holds no certificate the inner handshake accepts).
async fn assert_client_seen(b: &mesh_e2e::cluster::Cluster, client: &str) {
    let metrics = MultiCluster::ztunnel_metrics(b, 0).await.expect("c81 node 0 metrics");
    let principal = format!("source_principal=\"spiffe://cluster.local/ns/shop/sa/{client}\"");
    let seen = metrics.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains(&principal)
            && l.contains("connection_security_policy=\"mutual_tls\"")
    });
    assert!(seen, "c81's ztunnel saw c70's {client} identity end to end:\n{metrics}");
}

/// Replaces our ztunnel on node 1 of `c` (c70, net-a) with Istio's, on our node agent's ZDS
/// socket, and waits until it is ready.
async fn istio_ztunnel_on_node_1(
    c: &mesh_e2e::cluster::Cluster,
    peer: &std::path::Path,
) -> mesh_e2e::istio::IstioZtunnel<'static> {
    use mesh_e2e::cluster::Cluster;
    drop(c.nodes[1].ztunnel.lock().unwrap_or_else(|e| e.into_inner()).take());
    let n1 = &c.nodes[1];
    let cp = format!("https://{}:15012", c.controller_ip());
    let bundle = c.controller.trust_bundle().display().to_string();
    let env: Vec<(&str, String)> = vec![
        ("INPOD_UDS", n1.zds_socket().display().to_string()),
        ("XDS_ADDRESS", cp.clone()),
        ("CA_ADDRESS", cp),
        ("XDS_ROOT_CA", bundle.clone()),
        ("CA_ROOT_CA", bundle),
        ("AUTH_TOKEN", c.controller.token_file(n1.name()).display().to_string()),
        ("NODE_NAME", n1.name().to_owned()),
        ("POD_NAMESPACE", "istio-system".into()),
        ("POD_NAME", "ztunnel-istio".into()),
        ("SERVICE_ACCOUNT", "ztunnel".into()),
        ("INSTANCE_IP", Cluster::underlay_ip(c.id, 1).to_string()),
        ("TRUST_DOMAIN", "cluster.local".into()),
        ("CLUSTER_ID", c.cluster_id.clone()),
        ("NETWORK", "net-a".into()),
        ("ZTUNNEL_WORKER_THREADS", "1".into()),
    ];
    let mut z = mesh_e2e::istio::IstioZtunnel::spawn(n1.ns, peer, &env).expect("spawn Istio's ztunnel");
    z.wait_ready(WAIT).await.expect("Istio's ztunnel ready");
    z
}
