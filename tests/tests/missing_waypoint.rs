//! A service that names a waypoint which does not exist yet (issue 10, item 5): connections to
//! it are refused (counted as `waypoint_unavailable` at the client's ztunnel, reported by the
//! controller), never sent directly past the waypoint's L7 policy; once the waypoint exists,
//! traffic goes through it and its policy applies.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mesh_e2e::apps::{named_server, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::metrics::sample;
use mesh_e2e::waypoint::{identity, service, Waypoint, AMBIENT_SHOP};

const ID: u8 = 86;
const WAIT: Duration = Duration::from_secs(15);

fn vip(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, ID, n).into()
}

/// `shop` with a service labelled `istio.io/use-waypoint: waypoint` and an L7 policy only the
/// waypoint can enforce; no waypoint Gateway.
fn world() -> String {
    let mut w = AMBIENT_SHOP.to_owned();
    w += &service(ID, "server", "app: server", 10, true);
    w += r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: server}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;
    w
}

/// The waypoint Gateway and its Service (10.96.<id>.50), as a user would add them.
fn waypoint_objects() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: waypoint, namespace: shop}}
spec: {{clusterIP: 10.96.{ID}.50, selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}, ports: [{{name: mesh, port: 15008}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: shop}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"#
    )
}

/// One GET on a new connection: the status, or the error when the connection is refused.
async fn get(from: &mesh_e2e::cluster::Pod, path: &str) -> Result<u16, String> {
    let mut conn = HttpConn::open(&from.ns, SocketAddr::new(vip(10), 80), "server.shop.svc.cluster.local")
        .await
        .map_err(|e| e.to_string())?;
    conn.send("GET", path, &[])
        .await
        .map(|a| a.status)
        .map_err(|e| e.to_string())
}

async fn refused_count(cluster: &Cluster, node: u8) -> u64 {
    let node = &cluster.nodes[usize::from(node)];
    let (code, text) =
        mesh_e2e::ztunnel::http_request(node.ns, SocketAddr::from(([127, 0, 0, 1], 15020)), "GET", "/metrics")
            .await
            .expect("ztunnel metrics");
    assert_eq!(code, 200);
    sample(
        &text,
        "ztunnel_connections_refused_total",
        &["reason=\"waypoint_unavailable\""],
    ) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_waypoint_refuses_connections_until_it_exists() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(ID, 2, &world(), &[&wp_id])
        .await
        .expect("cluster up");
    let server = cluster
        .add_pod(1, PodSpec::new("server", "shop", &[("app", "server")]))
        .expect("server pod");
    tokio::spawn(named_server(
        server.ns.listen(SocketAddr::new(server.ip, 8080)).expect("listen"),
        "missing-wp-server",
    ));
    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    for p in [&server, &client] {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }

    // No waypoint: refused, not sent to the server directly (where /admin would get 200).
    let before = refused_count(&cluster, 0).await;
    for path in ["/", "/admin"] {
        let answer = get(&client, path).await;
        assert!(
            answer.is_err(),
            "{path} reached the service without its waypoint: {answer:?}"
        );
    }
    assert!(
        refused_count(&cluster, 0).await >= before + 2,
        "refusals counted as waypoint_unavailable"
    );
    let (code, problems) = cluster.controller.debug("/debug/problems").await.expect("problems");
    assert_eq!(code, 200);
    assert!(
        problems.contains("waypoint shop/waypoint does not exist") && problems.contains("\"name\": \"server\""),
        "{problems}"
    );

    // The waypoint arrives: traffic goes through it, and its L7 policy applies.
    cluster
        .write_manifest("waypoint.yaml", &waypoint_objects())
        .expect("waypoint objects");
    let waypoint = Waypoint::start(&cluster, 1, "shop", "waypoint")
        .await
        .expect("waypoint up");
    let deadline = Instant::now() + WAIT;
    loop {
        match get(&client, "/").await {
            Ok(200) => break,
            other if Instant::now() > deadline => {
                panic!(
                    "never reached the server through the waypoint: {other:?}\n{}",
                    waypoint.logs()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(get(&client, "/admin").await, Ok(403), "the waypoint's DENY applies");
}
