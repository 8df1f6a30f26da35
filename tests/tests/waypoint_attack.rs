//! The waypoint under attack, in one network-namespace cluster: the ways a client used to get
//! past its L7 decisions (issues 10 and 19) and the admin views a pod could read.
//!
//! - TCP fallback: `GET /admin` after a pause longer than protocol detection, or behind a
//!   first line `FOO / HTTP/1.1`, to a service with `DENY paths [/admin*]`; a silent client
//!   on a port declared HTTP; a forged `outputClaimToHeaders` header and
//!   `x-forwarded-client-cert` sent the same way. Opaque TCP still passes where nothing
//!   speaks HTTP.
//! - Upgrades: `Upgrade: h2c` is not forwarded and the next request is still decided;
//!   WebSocket works on an allowed route and gets 403 on a denied one; a 101 naming another
//!   protocol than requested is refused and the connection closed.
//! - Admin: from a pod, the waypoint's config dump is not served on its pod address; metrics
//!   and readiness are; the dump answers on localhost in the waypoint's pod.
//! - A borrowed identity: a client with another namespace's mesh certificate tunnels through
//!   the waypoint to a pod it does not serve (the destination's policy trusts the waypoint's
//!   identity); refused, while a service that uses the waypoint is served.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::hbone::{HbonePool, PoolKey, Settings, TunnelRequest};
use mesh_core::identity::{CertManager, CertManagerConfig, DevCa};

use mesh_e2e::apps::{named_echo_server, named_server, served, upgrade_server, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::metrics::sample;
use mesh_e2e::netns::NsSockets;
use mesh_e2e::waypoint::{base, identity, service_port, Waypoint};
use mesh_e2e::ztunnel::http_request;
use mesh_e2e::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ID: u8 = 97;
const WAIT: Duration = Duration::from_secs(15);
/// Longer than the waypoint's protocol detection (300 ms): the pause that used to turn a
/// connection into opaque TCP.
const PAUSE: Duration = Duration::from_millis(500);
/// The waypoint's bound on a silent client of an HTTP-only port, set short for the test.
const HEADER_TIMEOUT_MS: u64 = 1000;

fn vip(n: u8) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(10, 96, ID, n).into(), 80)
}

fn world() -> String {
    let mut w = base(ID);
    w += "apiVersion: v1\nkind: Namespace\nmetadata: {name: outside}\n---\n";
    // Ports named `web`/`tcp` are not declared HTTP; `http` ports are.
    w += &service_port(ID, "admin", "app: admin", 10, true, "web");
    w += &service_port(ID, "claims", "app: claims", 11, true, "web");
    w += &service_port(ID, "declared", "app: declared", 12, true, "http");
    w += &service_port(ID, "opaque", "app: opaque", 13, true, "tcp");
    w += &service_port(ID, "pay", "app: pay", 14, true, "http");
    w += &service_port(ID, "liar", "app: liar", 15, true, "http");
    w += r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: admin}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: pay, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: pay}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
    to: [{operation: {methods: [POST], paths: ["/api/v1/payments*"]}}, {operation: {methods: [GET], paths: ["/ws"]}}]
---
"#;
    w += &format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: claims, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: claims}}]
  jwtRules:
  - issuer: https://issuer.test
    jwks: '{{"keys": [{{"kty": "RSA", "kid": "rsa", "alg": "RS256", "n": "{}", "e": "AQAB"}}]}}'
    outputClaimToHeaders: [{{header: x-jwt-group, claim: group}}]
---
"#,
        include_str!("../fixtures/jwt-rsa.n").trim()
    );
    w
}

/// Writes `first`, waits `pause`, writes `rest`, and returns everything the peer sends until
/// it closes (requests end with `Connection: close`).
async fn exchange(ns: &Netns, dst: SocketAddr, first: &str, pause: Duration, rest: &str) -> String {
    let mut s = ns.connect(dst).await.expect("connect to the VIP");
    s.write_all(first.as_bytes()).await.expect("write");
    tokio::time::sleep(pause).await;
    s.write_all(rest.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

fn get(host: &str, path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
}

/// The number after `reason="<reason>"` in the waypoint's rejected-requests counter.
async fn rejected(waypoint: &Waypoint, reason: &str) -> u64 {
    let metrics = waypoint.metrics().await.expect("metrics");
    let reason = format!("reason=\"{reason}\"");
    sample(&metrics, "waypoint_rejected_requests_total", &[&reason]) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_attacks_are_refused() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(ID, 2, &world(), &[&wp_id])
        .await
        .expect("cluster up");
    let mut pods = Vec::new();
    for (name, node) in [("admin", 0), ("claims", 1), ("declared", 0), ("pay", 1)] {
        let pod = cluster
            .add_pod(node, PodSpec::new(name, "shop", &[("app", name)]))
            .expect("server pod");
        tokio::spawn(named_server(
            pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen"),
            name,
        ));
        pods.push(pod);
    }
    let opaque = cluster
        .add_pod(0, PodSpec::new("opaque", "shop", &[("app", "opaque")]))
        .expect("opaque pod");
    tokio::spawn(named_echo_server(
        opaque.ns.listen(SocketAddr::new(opaque.ip, 8080)).expect("listen"),
        "opaque",
    ));
    let liar = cluster
        .add_pod(1, PodSpec::new("liar", "shop", &[("app", "liar")]))
        .expect("liar pod");
    tokio::spawn(upgrade_server(
        liar.ns.listen(SocketAddr::new(liar.ip, 8080)).expect("listen"),
        "liar",
        "h2c",
    ));
    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    let outsider = cluster
        .add_pod(0, PodSpec::new("outsider", "outside", &[]))
        .expect("outsider pod");
    let timeout_flag = HEADER_TIMEOUT_MS.to_string();
    let waypoint = Waypoint::start_with(
        &cluster,
        1,
        "shop",
        "waypoint",
        &["--header-read-timeout-ms", &timeout_flag],
    )
    .await
    .expect("waypoint up");
    for p in pods.iter().chain([&opaque, &liar, &client]) {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }
    let ns = &client.ns;

    // 1. DENY paths [/admin*] holds after a pause longer than protocol detection...
    let before = served("admin");
    let a = exchange(ns, vip(10), "", PAUSE, &get("admin", "/admin", "")).await;
    assert!(a.starts_with("HTTP/1.1 403"), "paused GET /admin: {a:?}");
    // ...and behind a first line that is not one of the common methods: the stream is
    // parsed as HTTP, so the second request is decided on its own.
    let foo = "FOO / HTTP/1.1\r\nHost: admin\r\n\r\n";
    let a = exchange(ns, vip(10), foo, Duration::ZERO, &get("admin", "/admin/users", "")).await;
    assert!(!a.contains("path GET /admin"), "GET /admin reached the app: {a:?}");
    assert!(a.contains("HTTP/1.1 403"), "GET /admin after FOO: {a:?}");
    assert_eq!(served("admin"), before + 1, "only the FOO request reaches the app");

    // A port declared HTTP waits for HTTP from a silent client (the waypoint's own header
    // shows the request went through its HTTP pipeline) ...
    let a = exchange(ns, vip(12), "", PAUSE, &get("declared", "/late", "")).await;
    assert!(a.starts_with("HTTP/1.1 200"), "paused request on an HTTP port: {a:?}");
    assert!(a.contains("h x-forwarded-proto: http"), "not proxied as HTTP: {a:?}");
    // ... but not forever: a client that never speaks is closed and counted.
    let timeouts = rejected(&waypoint, "header_timeout").await;
    let started = Instant::now();
    let silent = exchange(ns, vip(12), "", Duration::ZERO, "").await;
    let took = started.elapsed();
    assert!(silent.is_empty(), "silent client answered: {silent:?}");
    assert!(
        took >= Duration::from_millis(HEADER_TIMEOUT_MS - 100) && took < Duration::from_secs(5),
        "silent client closed after {took:?}"
    );
    assert_eq!(rejected(&waypoint, "header_timeout").await, timeouts + 1);

    // An opaque protocol where nothing declares HTTP still passes as TCP (server-first).
    {
        use tokio::io::AsyncBufReadExt;
        let mut tcp = tokio::io::BufReader::new(ns.connect(vip(13)).await.expect("connect"));
        let mut line = String::new();
        tokio::time::timeout(WAIT, tcp.read_line(&mut line))
            .await
            .expect("greeting in time")
            .expect("greeting");
        assert_eq!(line, "opaque\n");
        tcp.get_mut()
            .write_all(b"\x16\x03\x01 not http\n")
            .await
            .expect("write");
        line.clear();
        tokio::time::timeout(WAIT, tcp.read_line(&mut line))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(line, "\x16\x03\x01 not http\n");
    }

    // 2. Headers the mesh vouches for never pass from the client: the RequestAuthentication's
    // claim header, after the pause as well as at once, and x-forwarded-client-cert.
    let forged = "x-jwt-group: admins\r\nx-forwarded-client-cert: By=spiffe://cluster.local/ns/shop/sa/pay\r\n";
    for pause in [PAUSE, Duration::ZERO] {
        let a = exchange(ns, vip(11), "", pause, &get("claims", "/", forged)).await;
        assert!(a.starts_with("HTTP/1.1 200"), "claims after {pause:?}: {a:?}");
        assert!(
            !a.contains("h x-jwt-group"),
            "forged claim header reached the app: {a:?}"
        );
        assert!(
            !a.contains("h x-forwarded-client-cert"),
            "forged XFCC reached the app: {a:?}"
        );
    }

    // 3. Upgrades. h2c is not forwarded: the allowed POST is answered as HTTP/1.1 without the
    // upgrade, and the denied GET that follows on the same connection is still decided.
    let mut pay = HttpConn::open(ns, vip(14), "pay.shop").await.expect("connect to pay");
    let h2c = [
        ("connection", "Upgrade, HTTP2-Settings"),
        ("upgrade", "h2c"),
        ("http2-settings", "AAMAAABkAAQAAP__"),
    ];
    let a = pay.send("POST", "/api/v1/payments", &h2c).await.expect("POST with h2c");
    assert_eq!(a.status, 200, "h2c upgrade: {}", a.body);
    assert!(!a.body.contains("h upgrade:"), "Upgrade forwarded: {}", a.body);
    assert!(
        !a.body.contains("h http2-settings:"),
        "HTTP2-Settings forwarded: {}",
        a.body
    );
    let a = pay.send("GET", "/api/v1/payments", &[]).await.expect("GET after h2c");
    assert_eq!(
        a.status, 403,
        "the GET after an h2c upgrade must be decided: {}",
        a.body
    );
    // WebSocket: denied route 403 (and the connection stays HTTP), allowed route works.
    let ws = [("connection", "upgrade"), ("upgrade", "websocket")];
    let a = pay.send("GET", "/private", &ws).await.expect("denied upgrade");
    assert_eq!(a.status, 403, "WebSocket upgrade on a denied route: {}", a.body);
    let echoed = pay
        .upgrade_echo("/ws", b"hello over an upgrade")
        .await
        .expect("upgrade");
    assert_eq!(echoed, b"hello over an upgrade");
    // A 101 that switches to another protocol than the client asked for is refused, and
    // the connection closed.
    let mut liar_conn = HttpConn::open(ns, vip(15), "liar.shop").await.expect("connect to liar");
    let a = liar_conn.send("GET", "/chat", &ws).await.expect("upgrade to the liar");
    assert_eq!(
        a.status, 502,
        "101 with Upgrade: h2c to a WebSocket request: {}",
        a.body
    );
    assert!(
        liar_conn.send("GET", "/", &[]).await.is_err(),
        "the connection must close after a refused 101"
    );

    // 4. Admin views: not on the pod address, from a pod; metrics and readiness are.
    let on_pod = |port: u16| SocketAddr::new(waypoint.pod.ip, port);
    for port in [15000, 15020, 15021] {
        let answer = http_request(&outsider.ns, on_pod(port), "GET", "/config_dump").await;
        assert!(
            !matches!(answer, Ok((200, _))),
            "config dump served on {port} of the pod address"
        );
    }
    let (status, _) = http_request(&outsider.ns, on_pod(15020), "GET", "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    let (status, _) = http_request(&outsider.ns, on_pod(15021), "GET", "/healthz/ready")
        .await
        .expect("readiness");
    assert_eq!(status, 200);
    let dump = waypoint.config_dump().await.expect("config dump on localhost");
    assert!(dump.contains("no-admin"), "{dump}");

    let admin_pod = SocketAddr::new(pods[0].ip, 8080);
    borrowed_identity_is_refused(&cluster, &waypoint, &outsider.ns, admin_pod).await;
}

/// Phase 5, a borrowed identity: a client with another namespace's mesh identity (minted
/// here from the cluster's CA, as any pod there gets its own) tunnels through the waypoint.
/// To a pod address nothing binds to the waypoint: refused and counted. To a service that
/// uses it: served.
async fn borrowed_identity_is_refused(cluster: &Cluster, waypoint: &Waypoint, outsider: &Netns, pod: SocketAddr) {
    let dir = cluster.controller.ca_dir();
    let ca = DevCa::load(&dir.join("root-cert.pem"), &dir.join("root-key.pem")).expect("cluster CA");
    let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
    let pool = HbonePool::new(Settings::default(), certs, Arc::new(NsSockets(outsider.name.clone())));
    let req = |authority: SocketAddr| TunnelRequest {
        key: PoolKey {
            src_identity: identity("outside", "default").parse().expect("identity"),
            dst_identities: vec![identity("shop", "waypoint").parse().expect("identity")],
            src_ip: None,
            dst: SocketAddr::new(waypoint.pod.ip, 15008),
        },
        authority: authority.to_string(),
        forwarded_for: None,
        baggage: None,
        traceparent: None,
    };
    let before = rejected(waypoint, "not_bound_to_waypoint").await;
    let refused = pool.connect(&req(pod)).await;
    assert!(
        refused.is_err(),
        "a tunnel to {pod}, which does not use the waypoint, was accepted"
    );
    assert_eq!(rejected(waypoint, "not_bound_to_waypoint").await, before + 1);
    let stream = pool
        .connect(&req(vip(10)))
        .await
        .expect("a tunnel to a service using the waypoint");
    let mut io = stream.into_io();
    io.write_all(get("admin", "/", "").as_bytes()).await.expect("send");
    let mut head = [0u8; 12];
    tokio::time::timeout(WAIT, io.read_exact(&mut head))
        .await
        .expect("answered in time")
        .expect("read the answer");
    assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
}
