//! `meshctl ztunnel-config` against a fixture shaped like ztunnel's `/config_dump` (see
//! ztunnel/src/admin.rs and mesh-core's state model serialization), rendered directly and
//! served over HTTP from a local listener.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::io::{Read, Write};
use std::time::{Duration, UNIX_EPOCH};

use meshctl::ztunnel_config::{self, Format, Section};
use serde_json::Value;

fn dump() -> Value {
    serde_json::from_str(include_str!("fixtures/config_dump.json")).expect("fixture")
}

fn rows(key: &str) -> Vec<Value> {
    dump()[key].as_array().cloned().unwrap_or_default()
}

#[test]
fn workloads_table() {
    let t = ztunnel_config::workloads(&rows("workloads")).render();
    assert_eq!(
        t,
        "NAME     NAMESPACE   IP           NODE     PROTOCOL   IDENTITY                                      WAYPOINT\n\
         web-1    shop        10.244.1.5   node-1   HBONE      spiffe://cluster.local/ns/shop/sa/web         10.96.0.99:15008\n\
         client   legacy      -            -        TCP        spiffe://cluster.local/ns/legacy/sa/default   -\n"
    );
}

#[test]
fn services_table_counts_endpoints() {
    let t = ztunnel_config::render_services(&dump());
    assert_eq!(
        t,
        "NAME   NAMESPACE   VIPS         PORTS          ENDPOINTS   WAYPOINT\n\
         web    shop        10.96.0.10   80->8080,443   1           shop/waypoint.shop.svc.cluster.local\n"
    );
}

#[test]
fn policies_table() {
    let t = ztunnel_config::policies(&rows("policies")).render();
    assert_eq!(
        t,
        "NAME           NAMESPACE   SCOPE              ACTION   RULES\nallow-client   shop        WorkloadSelector   ALLOW    2\n"
    );
}

#[test]
fn certificates_table() {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + 3600);
    let t = ztunnel_config::certificates(&rows("certificates"), now).render();
    assert_eq!(
        t,
        "IDENTITY                                      STATE     EXPIRES\n\
         spiffe://cluster.local/ns/shop/sa/web         ready     2023-11-15T22:13:20Z (in 23h0m)\n\
         spiffe://cluster.local/ns/legacy/sa/default   pending   -\n\
         spiffe://cluster.local/ns/x/sa/y              failed    - (CA unreachable)\n"
    );
    assert_eq!(ztunnel_config::utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(ztunnel_config::utc(951_782_400), "2000-02-29T00:00:00Z");
}

#[test]
fn json_and_yaml_are_the_selected_sub_document() {
    let sel = ztunnel_config::select(&dump(), Section::Policies, None);
    let json = ztunnel_config::render(&sel, Section::Policies, Format::Json).unwrap();
    let back: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(back, dump()["policies"]);
    let yaml = ztunnel_config::render(&sel, Section::Policies, Format::Yaml).unwrap();
    assert!(
        yaml.starts_with("- action: Allow\n") && yaml.contains("\n  name: allow-client\n"),
        "{yaml}"
    );
}

const METRICS: &str = "# TYPE istio_tcp_connections_opened counter\n\
istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"legacy\",destination_workload=\"web\",destination_workload_namespace=\"shop\",destination_service=\"web.shop.svc.cluster.local\",connection_security_policy=\"mutual_tls\"} 5\n\
istio_tcp_connections_closed_total{reporter=\"destination\",source_workload=\"client\",source_workload_namespace=\"legacy\",destination_workload=\"web\",destination_workload_namespace=\"shop\",destination_service=\"web.shop.svc.cluster.local\",connection_security_policy=\"mutual_tls\"} 3\n\
ztunnel_active_connections 2\n";

#[test]
fn connections_come_from_the_tcp_counters() {
    let c = ztunnel_config::connections_from_metrics(METRICS);
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].opened, c[0].closed, c[0].active), (5, 3, 2));
    assert_eq!(c[0].source, "legacy/client");
    let sel = ztunnel_config::select(&dump(), Section::Connections, Some(METRICS));
    let t = ztunnel_config::render(&sel, Section::Connections, Format::Table).unwrap();
    assert!(
        t.starts_with("REPORTER      SOURCE          DESTINATION   SERVICE"),
        "{t}"
    );
    assert!(t.contains("mutual_tls   5        3        2\n"), "{t}");
}

/// Serves `/config_dump` and `/metrics` for a few requests.
fn serve() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let body = if req.starts_with("GET /config_dump ") {
                include_str!("fixtures/config_dump.json").to_owned()
            } else {
                METRICS.to_owned()
            };
            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        }
    });
    format!("http://{addr}")
}

#[test]
fn fetched_over_http() {
    let admin = serve();
    let t = ztunnel_config::run(&admin, Section::Workloads, Format::Table, Duration::from_secs(2)).unwrap();
    assert!(t.starts_with("NAME     NAMESPACE"), "{t}");
    let c = ztunnel_config::run(&admin, Section::Connections, Format::Json, Duration::from_secs(2)).unwrap();
    assert!(c.contains("\"active\": 2"), "{c}");
}

#[test]
fn an_unreachable_admin_names_the_address() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let e = ztunnel_config::run(
        &format!("http://{addr}"),
        Section::Workloads,
        Format::Table,
        Duration::from_secs(1),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(&addr.to_string()), "{e}");
}
