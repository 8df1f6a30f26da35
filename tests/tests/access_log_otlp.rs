//! The waypoint's access log sent to an OpenTelemetry collector over OTLP/HTTP: MeshConfig
//! names an `envoyOtelAls` provider, a mesh-wide Telemetry's access logging names it with a
//! 5xx filter, and the collector (an HTTP server in this test) decodes `ExportLogsServiceRequest`
//! JSON posted to `/v1/logs` carrying exactly the 5xx requests, while the waypoint's own log
//! no longer has them. Then the provider points at a port nobody listens on: requests are
//! served as before and the lost records are counted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_e2e::apps::{named_server, span_collector, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::waypoint::{base, identity, service, Waypoint};

const ID: u8 = 67;
const WAIT: Duration = Duration::from_secs(15);

fn vip(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, ID, n).into()
}

/// A request with `x-fail: 1` is aborted by the waypoint with 503 (fault injection).
fn world() -> String {
    let mut w = base(ID);
    w += &service(ID, "server", "app: server", 10, true);
    w += r#"apiVersion: v1
kind: Namespace
metadata: {name: observability}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server, namespace: shop}
spec:
  hosts: [server.shop.svc.cluster.local]
  http:
  - match: [{headers: {x-fail: {exact: "1"}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: server.shop.svc.cluster.local}}]
  - route: [{destination: {host: server.shop.svc.cluster.local}}]
---
"#;
    w
}

const TELEMETRY: &str = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: otel}]
    filter: {expression: "response.code >= 500"}
"#;

fn mesh_config(collector: SocketAddr) -> String {
    format!(
        "extensionProviders:\n- name: otel\n  envoyOtelAls: {{service: {}, port: {}}}\n",
        collector.ip(),
        collector.port()
    )
}

/// The `path` attribute of every log record in one OTLP/HTTP JSON body.
fn record_paths(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let mut out = Vec::new();
    for rl in v["resourceLogs"].as_array().into_iter().flatten() {
        assert_eq!(
            rl["resource"]["attributes"][0]["value"]["stringValue"], "waypoint.shop",
            "{body}"
        );
        for sl in rl["scopeLogs"].as_array().into_iter().flatten() {
            for r in sl["logRecords"].as_array().into_iter().flatten() {
                let attrs = r["attributes"].as_array().cloned().unwrap_or_default();
                let get = |k: &str| attrs.iter().find(|a| a["key"] == k).map(|a| a["value"].clone());
                let status = get("status").and_then(|v| v["intValue"].as_str().map(str::to_owned));
                assert_eq!(status.as_deref(), Some("503"), "only 5xx pass the filter: {r}");
                if let Some(p) = get("path").and_then(|v| v["stringValue"].as_str().map(str::to_owned)) {
                    out.push(p);
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_to_an_otlp_collector_with_drops_counted() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(ID, 2, &world(), &[&wp_id])
        .await
        .expect("cluster up");
    let server = cluster
        .add_pod(1, PodSpec::new("server", "shop", &[("app", "server")]))
        .expect("server");
    tokio::spawn(named_server(
        server.ns.listen(SocketAddr::new(server.ip, 8080)).expect("listen"),
        "server",
    ));
    let client = cluster.add_pod(0, PodSpec::new("client", "shop", &[])).expect("client");
    let otel = cluster
        .add_pod(0, PodSpec::new("otel", "observability", &[]))
        .expect("collector");
    let collector = SocketAddr::new(otel.ip, 4318);
    let mut posts = span_collector(otel.ns.listen(collector).expect("listen"));
    let waypoint = Waypoint::start_with(&cluster, 1, "shop", "waypoint", &[])
        .await
        .expect("waypoint");
    for p in [&server, &client] {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }
    cluster
        .controller
        .write_mesh_config(&mesh_config(collector))
        .expect("mesh config");
    cluster
        .write_manifest("telemetry.yaml", TELEMETRY)
        .expect("write the Telemetry");
    let host = "server.shop.svc.cluster.local";
    let mut conn = HttpConn::open(&client.ns, SocketAddr::new(vip(10), 80), host)
        .await
        .expect("connect");

    // Polled with failing requests until one arrives at the collector (no readiness signal
    // tells when the Telemetry reached the waypoint).
    let deadline = std::time::Instant::now() + WAIT;
    'applied: loop {
        let a = conn.send("GET", "/probe", &[("x-fail", "1")]).await.expect("probe");
        assert_eq!(a.status, 503);
        while let Ok(Some((path, body))) = tokio::time::timeout(Duration::from_millis(200), posts.recv()).await {
            assert_eq!(path, "/v1/logs");
            if record_paths(&body).iter().any(|p| p == "/probe") {
                break 'applied;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no record reached the collector");
    }
    for i in 0..5 {
        assert_eq!(
            conn.send("GET", &format!("/ok-{i}"), &[]).await.expect("ok").status,
            200
        );
        let failed = conn
            .send("GET", &format!("/fail-{i}"), &[("x-fail", "1")])
            .await
            .expect("fail");
        assert_eq!(failed.status, 503);
    }
    let mut exported = Vec::new();
    // Batches go at least every second; wait until the last failing request is in.
    while !exported.iter().any(|p: &String| p == "/fail-4") {
        match tokio::time::timeout(WAIT, posts.recv()).await {
            Ok(Some((_, body))) => exported.extend(record_paths(&body)),
            _ => panic!("records missing at the collector: {exported:?}"),
        }
    }
    for i in 0..5 {
        assert!(exported.contains(&format!("/fail-{i}")), "{exported:?}");
    }
    assert!(!exported.iter().any(|p| p.starts_with("/ok-")), "{exported:?}");
    assert!(
        !waypoint.logs().contains("/fail-0"),
        "only the OTLP provider is named: the waypoint's own log has no line"
    );

    // The collector's address now leads nowhere: requests do not wait, records are counted lost.
    let nowhere = SocketAddr::new(otel.ip, 4319);
    cluster
        .controller
        .write_mesh_config(&mesh_config(nowhere))
        .expect("mesh config");
    let started = std::time::Instant::now();
    let mut lost = 0.0;
    while lost < 1.0 {
        let a = conn.send("GET", "/lost", &[("x-fail", "1")]).await.expect("request");
        assert_eq!(a.status, 503);
        let m = waypoint.metrics().await.unwrap_or_default();
        lost = m
            .lines()
            .find(|l| l.starts_with("waypoint_access_log_dropped_total{") && l.contains("reason=\"export_failed\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(started.elapsed() < WAIT * 2, "no lost record counted:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still answered at once, although each answer is a record for the dead collector.
    let t = std::time::Instant::now();
    for _ in 0..20 {
        let a = conn.send("GET", "/after", &[("x-fail", "1")]).await.expect("request");
        assert_eq!(a.status, 503);
    }
    println!("{lost} records counted lost; 20 requests in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2));
}
