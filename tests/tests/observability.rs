//! Observability for real: Debian's Prometheus scrapes the controller, both ztunnels and a
//! waypoint of the two-node cluster while traffic flows; the test queries its HTTP API for
//! the series and labels dashboards rely on, checks every endpoint with `promtool`, and
//! evaluates every query of the shipped Grafana dashboard.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_e2e::apps::{named_server, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::prometheus::Prometheus;
use mesh_e2e::promtool_check;
use mesh_e2e::waypoint::{base, identity, service, Waypoint};
use mesh_e2e::ztunnel::http_request;

const ID: u8 = 93;
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_controller_ztunnels_and_waypoint() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let mut world = base(ID);
    world += &service(ID, "server", "app: server", 10, true);
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(ID, 2, &world, &[&wp_id])
        .await
        .expect("cluster up");
    let server = cluster
        .add_pod(1, PodSpec::new("server", "shop", &[("app", "server")]))
        .expect("server pod");
    tokio::spawn(named_server(
        server.ns.listen(SocketAddr::new(server.ip, 8080)).expect("listen"),
        "server",
    ));
    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    let waypoint = Waypoint::start(&cluster, 1, "shop", "waypoint")
        .await
        .expect("waypoint up");
    for p in [&server, &client] {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }

    // Every endpoint speaks valid Prometheus text.
    let cp = cluster.controller.ns;
    let targets: Vec<(&str, SocketAddr)> = vec![
        ("controller", SocketAddr::new(cluster.controller_ip(), 15014)),
        ("ztunnel", SocketAddr::new(Cluster::underlay_ip(ID, 0), 15020)),
        ("ztunnel", SocketAddr::new(Cluster::underlay_ip(ID, 1), 15020)),
        ("waypoint", SocketAddr::new(waypoint.pod.ip, 15020)),
    ];
    for (job, addr) in &targets {
        let (status, text) = http_request(cp, *addr, "GET", "/metrics")
            .await
            .expect("scrape by hand");
        assert_eq!(status, 200, "{job} {addr}");
        promtool_check(&text).unwrap_or_else(|e| panic!("{job} {addr}: {e}"));
    }

    let prom = Prometheus::start(cp, SocketAddr::new(cluster.controller_ip(), 9090), &targets)
        .await
        .expect("prometheus up");
    let mut conn = HttpConn::open(
        &client.ns,
        SocketAddr::new(Ipv4Addr::new(10, 96, ID, 10).into(), 80),
        "server.shop",
    )
    .await
    .expect("connect");
    for _ in 0..20 {
        assert_eq!(conn.send("GET", "/", &[]).await.expect("request").status, 200);
    }

    let up = prom
        .wait_for(&format!("count(up == 1) == {}", targets.len()), WAIT)
        .await;
    if let Err(e) = up {
        panic!("{e}; targets: {:?}\n{}", prom.query("up").await, prom.log());
    }
    let requests = prom
        .wait_for(
            r#"istio_requests_total{job="waypoint", reporter="waypoint", response_code="200", destination_service="server.shop.svc.cluster.local"}"#,
            WAIT,
        )
        .await
        .expect("waypoint request series");
    let labels = &requests[0]["metric"];
    assert_eq!(labels["source_principal"], "spiffe://cluster.local/ns/shop/sa/client");
    assert_eq!(labels["destination_workload"], "server");
    assert_eq!(labels["connection_security_policy"], "mutual_tls");
    let tcp = prom
        .wait_for(
            r#"istio_tcp_connections_opened_total{job="ztunnel", reporter="destination"}"#,
            WAIT,
        )
        .await
        .expect("ztunnel TCP series");
    assert!(
        tcp.iter()
            .any(|s| s["metric"]["source_principal"] == "spiffe://cluster.local/ns/shop/sa/waypoint"),
        "the server's ztunnel saw the waypoint's identity: {tcp:?}"
    );
    prom.wait_for(
        r#"istio_request_duration_milliseconds_bucket{job="waypoint", le="+Inf"}"#,
        WAIT,
    )
    .await
    .expect("latency histogram");
    if let Err(e) = prom
        .wait_for(r#"controller_xds_connected_clients{job="controller"} >= 3"#, WAIT)
        .await
    {
        panic!(
            "{e}: two ztunnels and the waypoint must be connected: {:?}",
            prom.query("controller_xds_connected_clients").await
        );
    }
    prom.wait_for(r#"controller_certificates_signed_total{job="controller"}"#, WAIT)
        .await
        .expect("CA series");

    // The dashboard's queries are valid PromQL over these series; the traffic panels have data.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../dashboards/mesh.json")).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let title = panel["title"].as_str().unwrap_or_default();
            if let Err(e) = prom.query(expr).await {
                panic!("panel {title:?}: {e}");
            }
            // rate() needs two scrapes of a series: wait for the panels the traffic feeds.
            if title.starts_with("Requests/s") || title.starts_with("mTLS") || title.starts_with("xDS clients") {
                if let Err(e) = prom.wait_for(expr, WAIT).await {
                    panic!("panel {title:?} has no data: {e}");
                }
            }
        }
    }
}
