//! ztunnel end to end: two pod namespaces on a bridge, each captured by the ambient rules and
//! served by its own ztunnel (dedicated mode), with real applications, curl, certificates
//! from the development CA, and workload state from a local file.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_core::identity::DevCa;
use mesh_e2e::apps::{echo_connect, echo_server, http_server, ping};
use mesh_e2e::{until, Bed, Ztunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CLIENT_SA: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_SA: &str = "spiffe://cluster.local/ns/default/sa/server";

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn metric_line<'m>(metrics: &'m str, name: &str, labels: &[&str]) -> Option<&'m str> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_large_transfer_through_two_ztunnels() {
    let Some(bed) = Bed::new(1) else { return };
    let za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.unwrap();
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.unwrap();
    tokio::spawn(http_server(bed.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));

    // Real HTTP with curl from the client pod, by pod IP and by service VIP.
    for target in [
        format!("http://{}:8080/", bed.ip(2)),
        format!("http://{}:80/", bed.vip()),
    ] {
        let body = bed.a.exec(&["curl", "-sS", "--max-time", "10", &target]).unwrap();
        assert_eq!(
            body.trim(),
            format!("peer={}", bed.ip(1)),
            "server must see the client pod's address ({target})"
        );
    }

    // 16 MiB each way with a checksum.
    let (peer, conn) = echo_connect(&bed.a, SocketAddr::new(bed.ip(2), 9000)).await.unwrap();
    assert_eq!(peer, format!("peer={}", bed.ip(1)));
    let data: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let mut s = conn.into_inner();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let (_, n) = tokio::join!(send, r.read_to_end(&mut back));
    n.unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(fnv(&back), fnv(&data), "checksum mismatch after 16 MiB round trip");

    // Both ztunnels saw the traffic with the right identities, in Istio's metric names.
    let mb = zb.metrics().await.unwrap();
    let line = metric_line(
        &mb,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            &format!("source_principal=\"{CLIENT_SA}\""),
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(line.is_some(), "destination metrics missing:\n{mb}");
    // The curl requests (by VIP: a named destination service) and the transfer are two series.
    let sent = mesh_e2e::metrics::sum(&mb, "istio_tcp_sent_bytes_total", &["reporter=\"destination\""]);
    assert!(sent >= data.len() as f64, "sent bytes {sent} < {}", data.len());
    let ma = za.metrics().await.unwrap();
    assert!(
        metric_line(
            &ma,
            "istio_tcp_connections_opened_total",
            &["reporter=\"source\"", &format!("destination_principal=\"{SERVER_SA}\"")]
        )
        .is_some(),
        "source metrics missing:\n{ma}"
    );
    assert!(metric_line(
        &ma,
        "istio_tcp_connections_opened_total",
        &["destination_service=\"server.default.svc.cluster.local\""]
    )
    .is_some());
    // The metrics are valid Prometheus text, as promtool reads it; the log lost nothing.
    for m in [&ma, &mb] {
        mesh_e2e::promtool_check(m).expect("promtool accepts the metrics");
        assert!(m.lines().any(|l| l == "ztunnel_log_lines_dropped_total 0"), "{m}");
    }
    // The log level can be changed at runtime, and a bad one is refused.
    assert_eq!(za.post("127.0.0.1:15000", "/logging?level=debug").await.unwrap().0, 200);
    assert!(za.get("127.0.0.1:15000", "/logging").await.unwrap().1.contains("debug"));
    assert_eq!(
        za.post("127.0.0.1:15000", "/logging?level=nonsense[").await.unwrap().0,
        400
    );
    // The config dump shows workloads, services and the certificates held.
    let dump = za.config_dump().await.unwrap();
    assert_eq!(dump["workloads"].as_array().map(Vec::len), Some(2));
    assert_eq!(dump["services"][0]["hostname"], "server.default.svc.cluster.local");
    assert!(dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["identity"] == CLIENT_SA && c["state"] == "ready"));
    // Access log: one structured event per connection (written by ztunnel's log thread).
    let want = format!("\"dst.identity\":\"{SERVER_SA}\"");
    until(
        "an access log naming the server identity",
        Duration::from_secs(5),
        || {
            let found = za
                .logs()
                .lines()
                .any(|l| l.contains("connection complete") && l.contains(&want));
            async move { found }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_round_trip() {
    let Some(bed) = Bed::new(2) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.unwrap();
    let _zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.unwrap();
    tokio::spawn(echo_server(bed.b.listen("[::]:9000".parse().unwrap()).unwrap()));
    let (peer, mut conn) = echo_connect(&bed.a, SocketAddr::new(bed.ip6(2), 9000)).await.unwrap();
    assert_eq!(peer, format!("peer={}", bed.ip6(1)));
    assert_eq!(ping(&mut conn, "over v6").await.unwrap(), "over v6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denies_and_update_cuts_live_connection() {
    let Some(bed) = Bed::new(3) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.unwrap();
    let zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.unwrap();
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let dst = SocketAddr::new(bed.ip(2), 9000);

    let (_, mut live) = echo_connect(&bed.a, dst).await.unwrap();
    assert_eq!(ping(&mut live, "before").await.unwrap(), "before");

    // Deny the client's principal on port 9000 only; the live connection must be cut.
    bed.write_state(
        r#"
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  groups:
  - rules:
    - matches:
      - principals: [{exact: "cluster.local/ns/default/sa/client"}]
        destinationPorts: [9000]
"#,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ping(&mut live, "still there?").await.is_ok() {
        assert!(Instant::now() < deadline, "live connection survived the DENY policy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New connections are refused before reaching the app.
    assert!(
        echo_connect(&bed.a, dst).await.is_err(),
        "denied connection reached the app"
    );
    let m = zb.metrics().await.unwrap();
    assert!(
        metric_line(&m, "ztunnel_connections_refused_total", &["reason=\"policy_denied\""]).is_some(),
        "{m}"
    );

    // An ALLOW for another namespace only: the client (namespace default) is still denied...
    bed.write_state(
        r#"
- name: allow-other
  namespace: default
  scope: Namespace
  action: Allow
  groups:
  - rules:
    - matches:
      - namespaces: [{exact: "other"}]
"#,
    )
    .unwrap();
    until("allow policy to apply", Duration::from_secs(10), || async {
        zb.config_dump()
            .await
            .map(|d| d["policies"][0]["name"] == "allow-other")
            .unwrap_or(false)
    })
    .await;
    assert!(echo_connect(&bed.a, dst).await.is_err());
    // ...and allowed once its namespace is listed.
    bed.write_state(
        r#"
- name: allow-default
  namespace: default
  scope: Namespace
  action: Allow
  groups:
  - rules:
    - matches:
      - namespaces: [{exact: "other"}, {prefix: "def"}]
"#,
    )
    .unwrap();
    until("allow policy to admit the client", Duration::from_secs(10), || async {
        echo_connect(&bed.a, dst).await.is_ok()
    })
    .await;
}

/// An HBONE client in the uncaptured namespace c, talking to pod b's ztunnel directly.
struct NsSockets(String);

impl mesh_core::socket::SocketFactory for NsSockets {
    fn tcp_socket(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
        mesh_e2e::netns::socket_in(&self.0, dst)
    }
    fn tcp_listener(&self, _: SocketAddr) -> std::io::Result<TcpListener> {
        Err(std::io::Error::other("not used"))
    }
    fn udp_socket(&self, _: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
        Err(std::io::Error::other("not used"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_another_workload_or_own_port_is_400() {
    use mesh_core::hbone::{HboneError, HbonePool, PoolKey, Settings, TunnelRequest};
    use mesh_core::identity::{CertManager, CertManagerConfig, Identity};
    let Some(bed) = Bed::new(4) else { return };
    let _zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.unwrap();
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let ca = DevCa::load(&bed.root_cert, &bed.root_key).unwrap();
    let certs = CertManager::new(std::sync::Arc::new(ca), vec![], CertManagerConfig::default());
    let pool = HbonePool::new(
        Settings::default(),
        certs,
        std::sync::Arc::new(NsSockets(bed.c.name.clone())),
    );
    let req = |authority: SocketAddr| TunnelRequest {
        key: PoolKey {
            src_identity: CLIENT_SA.parse::<Identity>().unwrap(),
            dst_identities: vec![SERVER_SA.parse().unwrap()],
            src_ip: None,
            dst: SocketAddr::new(bed.ip(2), 15008),
        },
        authority: authority.to_string(),
        forwarded_for: None,
        baggage: None,
        traceparent: None,
    };
    // The right authority works...
    assert!(pool.connect(&req(SocketAddr::new(bed.ip(2), 9000))).await.is_ok());
    // ...another workload's address (pod a) or ztunnel's own port is a bad request...
    for bad in [
        SocketAddr::new(bed.ip(1), 9000),
        SocketAddr::new(bed.ip(2), 15008),
        SocketAddr::new(bed.ip(2), 15001),
    ] {
        match pool.connect(&req(bad)).await {
            Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::BAD_REQUEST, "authority {bad}"),
            other => panic!("authority {bad}: expected 400, got {:?}", other.map(|_| ())),
        }
    }
    // ...and a port nothing listens on is 503.
    match pool.connect(&req(SocketAddr::new(bed.ip(2), 9999))).await {
        Err(HboneError::Status(s)) => assert_eq!(s, http::StatusCode::SERVICE_UNAVAILABLE),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_inbound_passthrough_and_strict() {
    let Some(bed) = Bed::new(5) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.unwrap();
    let _zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.unwrap();
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    tokio::spawn(echo_server(bed.c.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let dst = SocketAddr::new(bed.ip(2), 9000);

    // A non-mesh pod reaches the captured server in plaintext (through 15006), source kept.
    let (peer, mut conn) = echo_connect(&bed.c, dst).await.unwrap();
    assert_eq!(peer, format!("peer={}", bed.ip(3)));
    assert_eq!(ping(&mut conn, "plain").await.unwrap(), "plain");
    // A mesh pod reaches the unknown (non-mesh) pod untouched: passthrough.
    let (peer, mut conn) = echo_connect(&bed.a, SocketAddr::new(bed.ip(3), 9000)).await.unwrap();
    assert_eq!(peer, format!("peer={}", bed.ip(1)));
    assert_eq!(ping(&mut conn, "passthrough").await.unwrap(), "passthrough");

    // STRICT mTLS as the controller translates it: deny connections without an identity.
    bed.write_state(
        r#"
- name: strict
  namespace: default
  scope: Namespace
  action: Deny
  groups:
  - rules:
    - matches:
      - notPrincipals: [{presence: {}}]
"#,
    )
    .unwrap();
    until("plaintext to be refused", Duration::from_secs(10), || async {
        match echo_connect(&bed.c, dst).await {
            Ok((_, mut c)) => ping(&mut c, "x").await.is_err(),
            Err(_) => true,
        }
    })
    .await;
    // mTLS from the mesh pod still works.
    let (_, mut conn) = echo_connect(&bed.a, dst).await.unwrap();
    assert_eq!(ping(&mut conn, "mtls").await.unwrap(), "mtls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_renewal_while_traffic_flows() {
    let Some(bed) = Bed::new(6) else { return };
    let za = Ztunnel::start(&bed.a, &bed.files(), &["--cert-ttl-seconds", "4"])
        .await
        .unwrap();
    let _zb = Ztunnel::start(&bed.b, &bed.files(), &["--cert-ttl-seconds", "4"])
        .await
        .unwrap();
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let dst = SocketAddr::new(bed.ip(2), 9000);
    let (_, mut live) = echo_connect(&bed.a, dst).await.unwrap();
    let not_after = |d: &serde_json::Value| {
        d["certificates"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["identity"] == CLIENT_SA))
            .map(|c| c["notAfter"].clone())
    };
    let first = not_after(&za.config_dump().await.unwrap()).expect("client certificate held");
    // Traffic keeps flowing across at least two renewals (half-life is ~2.5 s)...
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(6) {
        assert_eq!(ping(&mut live, &format!("msg{i}")).await.unwrap(), format!("msg{i}"));
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let later = not_after(&za.config_dump().await.unwrap()).unwrap();
    assert_ne!(first, later, "certificate was not renewed");
    // ...and new connections after the first certificate expired still succeed.
    let (_, mut fresh) = echo_connect(&bed.a, dst).await.unwrap();
    assert_eq!(ping(&mut fresh, "new").await.unwrap(), "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero() {
    let Some(bed) = Bed::new(7) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.unwrap();
    let mut zb = Ztunnel::start(&bed.b, &bed.files(), &["--drain-seconds", "3"])
        .await
        .unwrap();
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let (_, mut live) = echo_connect(&bed.a, SocketAddr::new(bed.ip(2), 9000)).await.unwrap();
    assert_eq!(ping(&mut live, "one").await.unwrap(), "one");
    let started = Instant::now();
    zb.sigterm().unwrap();
    // The live connection keeps working while draining.
    assert_eq!(ping(&mut live, "during drain").await.unwrap(), "during drain");
    let code = zb.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert_eq!(code, 0);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "exited before the drain period with a live connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underlay_sees_only_tls_to_15008() {
    let Some(bed) = Bed::new(8) else { return };
    let _za = Ztunnel::start(&bed.a, &bed.files(), &[]).await.unwrap();
    let _zb = Ztunnel::start(&bed.b, &bed.files(), &[]).await.unwrap();
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    // Capture pod a's link on the bridge while a marker crosses from a to b and back.
    let pcap = tempfile::NamedTempFile::new().unwrap();
    let pcap_path = pcap.path().display().to_string();
    let dump = mesh_e2e::tcpdump::Tcpdump::start(
        &bed.hub_name(),
        &[
            "--immediate-mode",
            "-Z",
            "root",
            "-i",
            bed.link(1),
            "-U",
            "-s",
            "0",
            "-w",
            &pcap_path,
        ],
    )
    .expect("tcpdump capture live");
    const MARKER: &str = "MESH-MARKER-6d1f0c";
    let (_, mut c) = echo_connect(&bed.a, SocketAddr::new(bed.ip(2), 9000)).await.unwrap();
    for _ in 0..20 {
        assert_eq!(ping(&mut c, MARKER).await.unwrap(), MARKER);
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    dump.stop().expect("tcpdump stopped");
    let captured = std::fs::read(pcap.path()).unwrap();
    assert!(captured.len() > 2000, "nothing captured ({} bytes)", captured.len());
    assert!(
        !captured.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the marker crossed the underlay in clear"
    );
    // Every TCP packet between the pods is to or from port 15008.
    let ports = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(pcap.path())
        .arg("tcp")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ports.stdout);
    assert!(text.lines().count() > 10, "{text}");
    for l in text.lines() {
        assert!(
            l.contains(".15008 ") || l.contains(".15008:"),
            "non-HBONE TCP on the underlay: {l}"
        );
    }
}
