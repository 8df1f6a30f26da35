//! Istio's Telemetry API at the waypoint, changed at runtime (no restart): a mesh-wide
//! Telemetry (root namespace) adds a `request_host` tag to `istio_requests_total` and removes
//! `request_protocol`, samples 10% of new traces with a literal custom tag, and logs only 5xx
//! answers; before it is applied every request is logged and the standard labels are exported.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_e2e::apps::{named_server, span_collector, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::waypoint::{base, identity, service, Waypoint};

const ID: u8 = 64;
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
  tracing:
  - providers: [{name: zipkin}]
    randomSamplingPercentage: 10
    customTags:
      environment: {literal: {value: production}}
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT}
      tagOverrides:
        request_host: {operation: UPSERT, value: request.host}
        request_protocol: {operation: REMOVE}
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: "response.code >= 500"}
"#;

fn request_series(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_api_changes_metrics_tracing_and_logs_at_runtime() {
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
    let zipkin = cluster
        .add_pod(0, PodSpec::new("zipkin", "observability", &[]))
        .expect("collector");
    let mut spans = span_collector(zipkin.ns.listen(SocketAddr::new(zipkin.ip, 9411)).expect("listen"));
    let url = format!("http://{}:9411/api/v2/spans", zipkin.ip);
    // The waypoint's own setting samples nothing; the Telemetry's 10% must take over.
    let flags = ["--zipkin-address", url.as_str(), "--trace-sampling", "0"];
    let waypoint = Waypoint::start_with(&cluster, 1, "shop", "waypoint", &flags)
        .await
        .expect("waypoint");
    for p in [&server, &client] {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }
    let host = "server.shop.svc.cluster.local";
    let mut conn = HttpConn::open(&client.ns, SocketAddr::new(vip(10), 80), host)
        .await
        .expect("connect");

    // Before: standard labels, every request logged.
    assert_eq!(conn.send("GET", "/before-ok", &[]).await.expect("request").status, 200);
    let metrics = waypoint.metrics().await.expect("metrics");
    assert!(
        request_series(&metrics)
            .iter()
            .all(|l| l.contains("request_protocol=\"http\"") && !l.contains("request_host")),
        "{metrics}"
    );

    // Applied at runtime.
    cluster
        .write_manifest("telemetry.yaml", TELEMETRY)
        .expect("write the Telemetry");
    // Polled with traffic (the tag shows on a request's series); no readiness signal exists.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let _ = conn.send("GET", "/probe", &[]).await;
        let m = waypoint.metrics().await.unwrap_or_default();
        if request_series(&m)
            .iter()
            .any(|l| l.contains("request_host=\"server.shop.svc.cluster.local\""))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Telemetry never reached the waypoint:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = waypoint.metrics().await.expect("metrics");
    let tagged: Vec<_> = request_series(&metrics)
        .into_iter()
        .filter(|l| l.contains("request_host="))
        .collect();
    assert!(
        tagged.iter().all(|l| !l.contains("request_protocol=")),
        "removed label still exported: {tagged:?}"
    );
    // Other metrics keep the standard labels (the override names REQUEST_COUNT only).
    assert!(metrics.lines().any(
        |l| l.starts_with("istio_request_duration_milliseconds_count{") && l.contains("request_protocol=\"http\"")
    ));

    // Access log: only 5xx.
    for i in 0..5 {
        assert_eq!(
            conn.send("GET", &format!("/log-ok-{i}"), &[]).await.expect("ok").status,
            200
        );
        let failed = conn
            .send("GET", &format!("/log-fail-{i}"), &[("x-fail", "1")])
            .await
            .expect("fail");
        assert_eq!(failed.status, 503);
    }
    mesh_e2e::until("the 5xx access log lines", WAIT, || async {
        waypoint.logs().contains("/log-fail-4")
    })
    .await;
    let logs = waypoint.logs();
    assert!(
        logs.contains("/before-ok"),
        "before the Telemetry every request was logged"
    );
    assert!(
        (0..5).all(|i| logs.contains(&format!("/log-fail-{i}"))),
        "5xx answers are logged"
    );
    assert!(
        !logs.contains("/log-ok-"),
        "2xx answers are not logged under the filter"
    );

    // Tracing: 10% of 1,000 new traces, each span with the custom tag.
    while spans.try_recv().is_ok() {}
    for i in 0..1000 {
        let a = conn.send("GET", &format!("/trace-{i}"), &[]).await.expect("request");
        assert_eq!(a.status, 200);
    }
    let mut traced = 0usize;
    let mut untagged = 0usize;
    // The exporter sends a batch at least every second; two quiet seconds mean it is done.
    while let Ok(Some((_, body))) = tokio::time::timeout(Duration::from_secs(2), spans.recv()).await {
        let batch: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        for span in batch.as_array().into_iter().flatten() {
            if span["name"].as_str().is_some_and(|n| n.contains("/trace-")) {
                traced += 1;
                untagged += usize::from(span["tags"]["environment"] != "production");
            }
        }
    }
    println!("10% sampling: {traced} of 1000 requests traced");
    assert!((50..=150).contains(&traced), "{traced} of 1000 traced at 10%");
    assert_eq!(untagged, 0, "every span carries the custom tag");
}
