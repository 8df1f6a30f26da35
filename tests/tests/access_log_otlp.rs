//! The waypoint's access log sent to an OpenTelemetry collector as Istio users configure it:
//! MeshConfig names an `envoyOtelAls` provider (OTLP over gRPC, the collector's 4317, as
//! Envoy's OpenTelemetry access logger sends it), a mesh-wide Telemetry's access logging names
//! it with a 5xx filter, and the collector (a tonic `LogsService` server in this test) receives
//! `Export` calls carrying exactly the 5xx requests, while the waypoint's own log no longer has
//! them. Then the Telemetry goes and MeshConfig's `defaultProviders.accessLogging` alone names
//! the provider: every request is exported, as in Istio. Last the provider points at a port
//! nobody listens on: requests are served as before and the lost records are counted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_e2e::apps::{named_server, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::waypoint::{base, identity, service, Waypoint};
use mesh_proto::otlp::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use mesh_proto::otlp::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use mesh_proto::otlp::common::v1::any_value::Value;
use tokio::sync::mpsc;

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

/// The provider as Istio's docs write it; `defaults` also makes it `defaultProviders.accessLogging`.
fn mesh_config(collector: SocketAddr, defaults: bool) -> String {
    let mut m = format!(
        "extensionProviders:\n- name: otel\n  envoyOtelAls: {{service: {}, port: {}}}\n",
        collector.ip(),
        collector.port()
    );
    if defaults {
        m += "defaultProviders: {accessLogging: [otel]}\n";
    }
    m
}

/// An OTLP/gRPC logs collector: every `Export` request is passed to the test.
struct Collector(mpsc::UnboundedSender<ExportLogsServiceRequest>);

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let _ = self.0.send(req.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

fn grpc_collector(listener: tokio::net::TcpListener) -> mpsc::UnboundedReceiver<ExportLogsServiceRequest> {
    let (tx, rx) = mpsc::unbounded_channel();
    let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None).expect("incoming");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LogsServiceServer::new(Collector(tx)))
            .serve_with_incoming(incoming),
    );
    rx
}

/// (path, status) of every log record in one export; all from the waypoint's resource.
fn records(req: &ExportLogsServiceRequest) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for rl in &req.resource_logs {
        let name = rl.resource.as_ref().and_then(|r| r.attributes.first());
        assert_eq!(
            name.and_then(|a| a.value.clone()?.value),
            Some(Value::StringValue("waypoint.shop".into())),
            "{req:?}"
        );
        for r in rl.scope_logs.iter().flat_map(|s| &s.log_records) {
            let get = |k: &str| {
                r.attributes
                    .iter()
                    .find(|a| a.key == k)
                    .and_then(|a| a.value.clone()?.value)
            };
            let (Some(Value::StringValue(path)), Some(Value::IntValue(status))) = (get("path"), get("status")) else {
                panic!("a record without path and status: {r:?}");
            };
            out.push((path, status));
        }
    }
    out
}

/// Sends `probe` until its record arrives (no readiness signal tells when the configuration
/// reached the waypoint); `fail` sends it with `x-fail: 1`.
async fn until_exported(
    conn: &mut HttpConn,
    exports: &mut mpsc::UnboundedReceiver<ExportLogsServiceRequest>,
    probe: &str,
    fail: bool,
) {
    let deadline = std::time::Instant::now() + WAIT;
    let headers: &[(&str, &str)] = if fail { &[("x-fail", "1")] } else { &[] };
    loop {
        let a = conn.send("GET", probe, headers).await.expect("probe");
        assert_eq!(a.status, if fail { 503 } else { 200 });
        while let Ok(Some(req)) = tokio::time::timeout(Duration::from_millis(200), exports.recv()).await {
            if records(&req).iter().any(|(p, _)| p == probe) {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record for {probe} reached the collector"
        );
    }
}

/// Records exported until one for `last` is in (batches go at least every second).
async fn exported_until(
    exports: &mut mpsc::UnboundedReceiver<ExportLogsServiceRequest>,
    last: &str,
) -> Vec<(String, i64)> {
    let mut exported: Vec<(String, i64)> = Vec::new();
    while !exported.iter().any(|(p, _)| p == last) {
        match tokio::time::timeout(WAIT, exports.recv()).await {
            Ok(Some(req)) => exported.extend(records(&req)),
            _ => panic!("records missing at the collector: {exported:?}"),
        }
    }
    exported
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
    let collector = SocketAddr::new(otel.ip, 4317);
    let mut exports = grpc_collector(otel.ns.listen(collector).expect("listen"));
    let mut waypoint = Waypoint::start_with(&cluster, 1, "shop", "waypoint", &[])
        .await
        .expect("waypoint");
    for p in [&server, &client] {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }
    cluster
        .controller
        .write_mesh_config(&mesh_config(collector, false))
        .expect("mesh config");
    cluster
        .write_manifest("telemetry.yaml", TELEMETRY)
        .expect("write the Telemetry");
    let host = "server.shop.svc.cluster.local";
    let mut conn = HttpConn::open(&client.ns, SocketAddr::new(vip(10), 80), host)
        .await
        .expect("connect");

    until_exported(&mut conn, &mut exports, "/probe", true).await;
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
    let exported = exported_until(&mut exports, "/fail-4").await;
    for i in 0..5 {
        assert!(exported.contains(&(format!("/fail-{i}"), 503)), "{exported:?}");
    }
    assert!(
        exported.iter().all(|(_, status)| *status == 503),
        "only 5xx pass the filter: {exported:?}"
    );

    // No Telemetry at all: MeshConfig's default providers log every request to the collector.
    cluster
        .write_manifest("telemetry.yaml", "")
        .expect("remove the Telemetry");
    cluster
        .controller
        .write_mesh_config(&mesh_config(collector, true))
        .expect("mesh config");
    until_exported(&mut conn, &mut exports, "/default-probe", false).await;
    for i in 0..3 {
        let ok = conn.send("GET", &format!("/default-{i}"), &[]).await.expect("ok");
        assert_eq!(ok.status, 200);
    }
    let exported = exported_until(&mut exports, "/default-2").await;
    for i in 0..3 {
        assert!(exported.contains(&(format!("/default-{i}"), 200)), "{exported:?}");
    }

    // The collector's address now leads nowhere: requests do not wait, records are counted lost.
    let nowhere = SocketAddr::new(otel.ip, 4319);
    cluster
        .controller
        .write_mesh_config(&mesh_config(nowhere, true))
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

    // The stdout log kept up: nothing was lost there.
    let m = waypoint.metrics().await.expect("metrics");
    assert!(m.lines().any(|l| l == "waypoint_log_lines_dropped_total 0"), "{m}");

    // Stdout access lines are written in batches: stopped, the waypoint has written them all
    // (its last line comes after them), and none is a request's.
    drop(conn);
    waypoint.terminate().expect("SIGTERM");
    waypoint.exited(WAIT * 2).await.expect("the waypoint exits");
    let logs = waypoint.logs();
    assert!(logs.contains("waypoint stopped"), "{logs}");
    assert!(
        !logs.contains("/fail-0") && !logs.contains("/default-0"),
        "only the OTLP provider is named: the waypoint's own log has no request line\n{logs}"
    );
}
