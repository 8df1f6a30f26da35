//! The waypoint end to end in the two-node cluster: the brief's canary (HTTPRoute weights and
//! a header match; VirtualService + DestinationRule subsets), a header-adding route, and the
//! payment AuthorizationPolicy enforced against the original client's SPIFFE identity.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_e2e::apps::{accepted, named_echo_server, named_server, served, span_collector, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::promtool_check;
use mesh_e2e::waypoint::{base, identity, service, service_port, Waypoint};

const ID: u8 = 90;
const WAIT: Duration = Duration::from_secs(15);
const REQUESTS: usize = 2000;

fn vip(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, ID, n).into()
}

fn world() -> String {
    let mut w = base(ID);
    w += &service(ID, "server", "app: server", 10, true);
    w += &service(ID, "server-v1", "app: server, version: v1", 11, false);
    w += &service(ID, "server-v2", "app: server, version: v2", 12, false);
    w += &service(ID, "payments", "app: payments", 13, true);
    w += &service(ID, "reviews", "app: reviews", 14, true);
    w += r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server-canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: server-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-api-version, value: v1}]}
    backendRefs: [{name: server-v1, port: 80}]
  - backendRefs:
    - {name: server-v1, port: 80, weight: 90}
    - {name: server-v2, port: 80, weight: 10}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v2}}]
  - route:
    - {destination: {host: reviews.shop.svc.cluster.local, subset: v1}, weight: 90}
    - {destination: {host: reviews.shop.svc.cluster.local, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: payments, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: payments}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/order-service]}}]
    to: [{operation: {methods: [POST], paths: [/api/v1/payments*]}}]
---
# The recommended guard against bypassing the waypoint: at ztunnel (L4), the payments pods
# admit only the waypoint's identity, so dialling a pod IP directly is refused.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-via-waypoint, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/waypoint]}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments.shop.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /api/v1/payments/flaky}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: payments.shop.svc.cluster.local}}]
  - route: [{destination: {host: payments.shop.svc.cluster.local}}]
"#;
    w
}

/// Sends `n` requests on one keep-alive connection and returns the share answered by `v2`.
async fn share_of(conn: &mut HttpConn, n: usize, who: &str, headers: &[(&str, &str)]) -> f64 {
    let mut hits = 0usize;
    for _ in 0..n {
        let a = conn
            .send("GET", "/", headers)
            .await
            .expect("request through the waypoint");
        assert_eq!(a.status, 200, "{}", a.body);
        if a.body.lines().next() == Some(who) {
            hits += 1;
        }
    }
    hits as f64 / n as f64
}

/// A server pod: name (also the server's name), node, labels.
type ServerPod<'a> = (&'static str, u8, Vec<(&'a str, &'a str)>);

/// Server pods in `shop`, each running a [`named_server`] called after the pod on 8080.
fn start_servers(cluster: &Cluster, pods: &[ServerPod<'_>]) -> Vec<mesh_e2e::cluster::Pod> {
    let mut servers = Vec::new();
    for (name, node, labels) in pods {
        let pod = cluster
            .add_pod(*node, PodSpec::new(name, "shop", labels))
            .expect("server pod");
        let l = pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen");
        tokio::spawn(named_server(l, name));
        servers.push(pod);
    }
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_routes_and_authorizes() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let scene = Scene::start().await;
    // The connections stay open to the end and close before the scene, newest first.
    let mut server = httproute_canary(&scene).await;
    header_added_on_v1(&mut server).await;
    h2c_client_to_an_http_port(&scene).await;
    let _reviews = virtual_service_canary(&scene).await;
    let mut order = payment_policy_allows_order_service(&scene).await;
    let _other = payment_policy_refuses_others(&scene).await;
    fault_injection(&mut order).await;
    direct_dial_refused(&scene, &mut order).await;
    request_metrics(&scene).await;
}

/// What the phases of [`waypoint_routes_and_authorizes`] share: the cluster, its pods, the waypoint.
struct Scene {
    // Field order is drop order, as the locals it replaces: the waypoint, then the pods,
    // then the cluster.
    waypoint: Waypoint,
    frontend: mesh_e2e::cluster::Pod,
    client: mesh_e2e::cluster::Pod,
    servers: Vec<mesh_e2e::cluster::Pod>,
    _cluster: Cluster,
}

impl Scene {
    /// The two-node cluster with the servers, the two clients and the waypoint, all advertised.
    async fn start() -> Scene {
        let wp_id = identity("shop", "waypoint");
        let cluster = Cluster::start_with_identities(ID, 2, &world(), &[&wp_id])
            .await
            .expect("cluster up");
        let pods = [
            ("server-v1", 1, vec![("app", "server"), ("version", "v1")]),
            ("server-v2", 0, vec![("app", "server"), ("version", "v2")]),
            ("reviews-v1", 1, vec![("app", "reviews"), ("version", "v1")]),
            ("reviews-v2", 0, vec![("app", "reviews"), ("version", "v2")]),
            ("payments", 1, vec![("app", "payments")]),
        ];
        let servers = start_servers(&cluster, &pods);
        let client = cluster
            .add_pod(0, PodSpec::new("order-service", "shop", &[]))
            .expect("client pod");
        let frontend = cluster
            .add_pod(0, PodSpec::new("frontend", "shop", &[]))
            .expect("frontend pod");
        let waypoint = Waypoint::start(&cluster, 1, "shop", "waypoint")
            .await
            .expect("waypoint up");
        for p in servers.iter().chain([&client, &frontend]) {
            cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
        }
        Scene {
            waypoint,
            frontend,
            client,
            servers,
            _cluster: cluster,
        }
    }
}

/// Header match: every canary request reaches v2; weights: 90/10 within 3 points (returns the connection).
async fn httproute_canary(scene: &Scene) -> HttpConn {
    let server = SocketAddr::new(vip(10), 80);
    let mut conn = HttpConn::open(&scene.client.ns, server, "server.shop.svc.cluster.local")
        .await
        .expect("connect to the server VIP");

    // Header match: every canary request reaches v2.
    let canary = share_of(&mut conn, 200, "server-v2", &[("x-canary", "true")]).await;
    assert_eq!(canary, 1.0, "x-canary: true must always reach v2");
    // Weights: 90/10 within 3 points.
    let v2 = share_of(&mut conn, REQUESTS, "server-v2", &[]).await;
    assert!(
        (0.07..=0.13).contains(&v2),
        "HTTPRoute split: v2 got {:.1}%",
        v2 * 100.0
    );
    conn
}

/// A header added on /v1 paths reaches the backend.
async fn header_added_on_v1(conn: &mut HttpConn) {
    let a = conn.send("GET", "/v1/items", &[]).await.expect("/v1 request");
    assert_eq!(a.status, 200);
    assert!(a.body.starts_with("server-v1\n"), "{}", a.body);
    assert!(a.body.contains("h x-api-version: v1"), "header not added: {}", a.body);
}

/// An HTTP/2 (prior knowledge) client of a port declared `http`, whose backends speak only
/// HTTP/1.1: the waypoint sends HTTP/1.1 upstream, as Istio's clusters do for such ports.
async fn h2c_client_to_an_http_port(scene: &Scene) {
    use http_body_util::{BodyExt, Empty};
    let tcp = scene
        .client
        .ns
        .connect(SocketAddr::new(vip(10), 80))
        .await
        .expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake through the waypoint");
    tokio::spawn(conn);
    let req = hyper::Request::get("http://server.shop.svc.cluster.local/v1/items")
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("HTTP/2 request");
    assert_eq!(resp.status(), 200, "an h2c client of an HTTP/1.1-only backend");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("server-v1\n"), "{body}");
}

/// The same canary with VirtualService + DestinationRule subsets (returns the connection).
async fn virtual_service_canary(scene: &Scene) -> HttpConn {
    let mut reviews = HttpConn::open(
        &scene.client.ns,
        SocketAddr::new(vip(14), 80),
        "reviews.shop.svc.cluster.local",
    )
    .await
    .expect("connect to reviews");
    let canary = share_of(&mut reviews, 200, "reviews-v2", &[("x-canary", "true")]).await;
    assert_eq!(canary, 1.0, "VirtualService header match must always reach subset v2");
    let v2 = share_of(&mut reviews, REQUESTS, "reviews-v2", &[]).await;
    assert!(
        (0.07..=0.13).contains(&v2),
        "VirtualService split: v2 got {:.1}%",
        v2 * 100.0
    );
    reviews
}

/// The payment policy: only order-service, only POST to /api/v1/payments* (returns the connection).
async fn payment_policy_allows_order_service(scene: &Scene) -> HttpConn {
    let payments = SocketAddr::new(vip(13), 80);
    let mut order = HttpConn::open(&scene.client.ns, payments, "payments.shop.svc.cluster.local")
        .await
        .expect("connect to payments");
    let ok = order.send("POST", "/api/v1/payments", &[]).await.expect("POST");
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        order.send("GET", "/api/v1/payments", &[]).await.expect("GET").status,
        403
    );
    assert_eq!(
        order.send("POST", "/api/v1/refunds", &[]).await.expect("POST").status,
        403
    );
    order
}

/// The payment policy refuses another principal, frontend, even an allowed POST (returns the connection).
async fn payment_policy_refuses_others(scene: &Scene) -> HttpConn {
    let payments = SocketAddr::new(vip(13), 80);
    let mut other = HttpConn::open(&scene.frontend.ns, payments, "payments.shop.svc.cluster.local")
        .await
        .expect("connect from frontend");
    let denied = other.send("POST", "/api/v1/payments", &[]).await.expect("POST");
    assert_eq!(denied.status, 403, "another principal must be refused: {}", denied.body);
    other
}

/// Fault injection at the configured percentage (400 requests, 50 % ± 10).
async fn fault_injection(order: &mut HttpConn) {
    let mut aborted = 0;
    for _ in 0..400 {
        let a = order.send("POST", "/api/v1/payments/flaky", &[]).await.expect("POST");
        match a.status {
            503 => aborted += 1,
            200 => {}
            other => panic!("unexpected status {other}: {}", a.body),
        }
    }
    assert!((160..=240).contains(&aborted), "abort 50%: {aborted}/400 aborted");
}

/// Dialling a payments pod directly skips the waypoint: ztunnel's L4 policy refuses it.
async fn direct_dial_refused(scene: &Scene, order: &mut HttpConn) {
    let pod = scene
        .servers
        .iter()
        .find(|p| p.name == "payments")
        .expect("payments pod");
    let direct = match HttpConn::open(&scene.client.ns, SocketAddr::new(pod.ip, 8080), "payments").await {
        Ok(mut c) => c.send("POST", "/api/v1/payments", &[]).await.map(|a| a.status).ok(),
        Err(_) => None,
    };
    assert_eq!(direct, None, "a direct call to the pod must not get an answer");
    let ok = order.send("POST", "/api/v1/payments", &[]).await.expect("POST");
    assert_eq!(ok.status, 200, "through the waypoint it still works: {}", ok.body);
}

/// Istio's request metrics, with the original client's identity.
async fn request_metrics(scene: &Scene) {
    let metrics = scene.waypoint.metrics().await.expect("metrics");
    promtool_check(&metrics).expect("promtool accepts the waypoint's metrics");
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    let has = |code: &str, principal: &str| {
        series.iter().any(|l| {
            l.contains("reporter=\"waypoint\"")
                && l.contains(&format!("response_code=\"{code}\""))
                && l.contains(&format!(
                    "source_principal=\"spiffe://cluster.local/ns/shop/sa/{principal}\""
                ))
        })
    };
    assert!(
        has("200", "order-service"),
        "no 200 series for order-service:\n{}",
        series.join("\n")
    );
    assert!(
        has("403", "frontend"),
        "no 403 series for frontend:\n{}",
        series.join("\n")
    );
    assert!(
        series.iter().any(|l| l.contains("destination_workload=\"server-v2\"")),
        "no series for the v2 destination"
    );
}

const ID2: u8 = 91;

fn resilience_world() -> String {
    let mut w = base(ID2);
    w += "apiVersion: v1\nkind: Namespace\nmetadata: {name: observability}\n---\n";
    for (name, selector, n) in [
        ("flaky", "app: backend", 20),
        ("slow", "app: backend", 21),
        ("cb", "app: backend", 22),
        ("od", "app: od", 23),
        ("web", "app: web", 24),
        ("locked", "app: backend", 25),
        ("guarded", "app: backend", 26),
        ("fresh", "app: fresh", 28),
    ] {
        w += &service(ID2, name, selector, n, true);
    }
    w += &service(ID2, "web-mirror", "app: web-mirror", 27, false);
    w += r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: flaky}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {attempts: 3, codes: [503], backoff: 10ms}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: slow, namespace: shop}
spec:
  hosts: [slow.shop.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /delayed}}]
    fault: {delay: {fixedDelay: 200ms, percentage: {value: 100}}}
    route: [{destination: {host: slow.shop.svc.cluster.local}}]
  - match: [{uri: {prefix: /delay/600}}]
    timeout: 300ms
    route: [{destination: {host: slow.shop.svc.cluster.local}}]
  - retries: {attempts: 2, perTryTimeout: 200ms, retryOn: 5xx}
    route: [{destination: {host: slow.shop.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cb, namespace: shop}
spec:
  host: cb.shop.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: fresh, namespace: shop}
spec:
  host: fresh.shop.svc.cluster.local
  trafficPolicy:
    connectionPool: {http: {maxRequestsPerConnection: 1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: od, namespace: shop}
spec:
  host: od.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs: [{name: web, port: 80}]
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: web-mirror, port: 80}}
    backendRefs: [{name: web, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: locked, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: locked}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: guarded, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: guarded}]
  action: ALLOW
  rules:
  - when: [{key: "request.headers[x-tier]", notValues: [blocked]}]
"#;
    w
}

async fn timed(conn: &mut HttpConn, method: &str, path: &str) -> (u16, Duration, mesh_e2e::apps::Answer) {
    let start = std::time::Instant::now();
    let a = conn
        .send(method, path, &[])
        .await
        .expect("request through the waypoint");
    (a.status, start.elapsed(), a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_resilience_rewrites_and_policies() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let mut scene = ResilienceScene::start().await;
    // The connections stay open to the end and close before the scene, newest first.
    let _flaky = retries(&scene).await;
    let _slow = timeouts_and_fault_delay(&scene).await;
    circuit_breaking(&scene).await;
    let _od = outlier_detection(&scene).await;
    let mut web = redirect_rewrite_mirror(&scene).await;
    websocket_upgrade(&scene).await;
    tracing_continued_and_collected(&mut scene, &mut web).await;
    malformed_request_rejected(&scene, &mut web).await;
    let _fresh = max_requests_per_connection(&scene, &mut web).await;
    let _guarded = not_values_on_a_header(&scene).await;
    let _locked = empty_spec_deny_all(&scene).await;
}

/// What the phases of [`waypoint_resilience_rewrites_and_policies`] share: the cluster, its pods, the span collector, the waypoint.
struct ResilienceScene {
    // Field order is drop order, as the locals it replaces: the waypoint, the collector's
    // spans and pod, the client, the servers, then the cluster.
    waypoint: Waypoint,
    spans: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    _zipkin: mesh_e2e::cluster::Pod,
    client: mesh_e2e::cluster::Pod,
    _servers: Vec<mesh_e2e::cluster::Pod>,
    _cluster: Cluster,
}

impl ResilienceScene {
    /// The two-node cluster with the servers, the client, a span collector and the tracing waypoint.
    async fn start() -> ResilienceScene {
        let wp_id = identity("shop", "waypoint");
        let cluster = Cluster::start_with_identities(ID2, 2, &resilience_world(), &[&wp_id])
            .await
            .expect("cluster up");
        let pods = [
            ("backend", 1, vec![("app", "backend")]),
            ("od-good", 0, vec![("app", "od")]),
            ("od-broken", 1, vec![("app", "od")]),
            ("web", 0, vec![("app", "web")]),
            ("web-mirror", 1, vec![("app", "web-mirror")]),
            ("fresh", 0, vec![("app", "fresh")]),
        ];
        let servers = start_servers(&cluster, &pods);
        let client = cluster
            .add_pod(0, PodSpec::new("client", "shop", &[]))
            .expect("client pod");
        // A Zipkin-compatible collector outside the mesh; the waypoint samples every trace.
        let zipkin = cluster
            .add_pod(0, PodSpec::new("zipkin", "observability", &[]))
            .expect("collector pod");
        let spans = span_collector(zipkin.ns.listen(SocketAddr::new(zipkin.ip, 9411)).expect("listen"));
        let zipkin_url = format!("http://{}:9411/api/v2/spans", zipkin.ip);
        let tracing_flags = [
            "--zipkin-address",
            zipkin_url.as_str(),
            "--trace-sampling",
            "100",
            "--trace-tag",
            "cluster=netns",
        ];
        let waypoint = Waypoint::start_with(&cluster, 1, "shop", "waypoint", &tracing_flags)
            .await
            .expect("waypoint up");
        for p in servers.iter().chain([&client]) {
            cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
        }
        ResilienceScene {
            waypoint,
            spans,
            _zipkin: zipkin,
            client,
            _servers: servers,
            _cluster: cluster,
        }
    }

    /// A connection from the client to the service VIP 10.96.ID2.`n`, port 80.
    async fn open(&self, n: u8, host: &'static str) -> anyhow::Result<HttpConn> {
        HttpConn::open(
            &self.client.ns,
            SocketAddr::new(Ipv4Addr::new(10, 96, ID2, n).into(), 80),
            host,
        )
        .await
    }
}

/// Retries (GEP-1731): two failures then success within attempts: 3; a POST is not retried (returns the connection).
async fn retries(scene: &ResilienceScene) -> HttpConn {
    let mut flaky = scene.open(20, "flaky.shop.svc.cluster.local").await.expect("connect");
    assert_eq!(
        timed(&mut flaky, "GET", "/fail/2/get").await.0,
        200,
        "third attempt succeeds"
    );
    assert_eq!(
        timed(&mut flaky, "GET", "/fail/5/many").await.0,
        503,
        "attempts exhausted"
    );
    assert_eq!(
        timed(&mut flaky, "POST", "/fail/1/post").await.0,
        503,
        "POST not retried"
    );
    flaky
}

/// Per-try timeout (2 × 200 ms) and overall timeout (300 ms), with tolerance; fault delay at 100 % (returns the connection).
async fn timeouts_and_fault_delay(scene: &ResilienceScene) -> HttpConn {
    let mut slow = scene.open(21, "slow.shop.svc.cluster.local").await.expect("connect");
    let (status, took, _) = timed(&mut slow, "GET", "/delay/500").await;
    assert_eq!(status, 504);
    assert!(
        took >= Duration::from_millis(380) && took < Duration::from_millis(1000),
        "2 tries of 200 ms took {took:?}"
    );
    let (status, took, _) = timed(&mut slow, "GET", "/delay/600").await;
    assert_eq!(status, 504);
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(550),
        "300 ms timeout took {took:?}"
    );
    // Fault delay at 100 %.
    let (status, took, _) = timed(&mut slow, "GET", "/delayed").await;
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(190), "200 ms fault delay took {took:?}");
    slow
}

/// Circuit breaking: one connection, one pending; a burst of 8 gets prompt overflows.
async fn circuit_breaking(scene: &ResilienceScene) {
    let mut burst = Vec::new();
    for _ in 0..8 {
        let mut c = scene.open(22, "cb.shop.svc.cluster.local").await.expect("connect");
        burst.push(tokio::spawn(async move { timed(&mut c, "GET", "/delay/400").await }));
    }
    let (mut ok, mut overflow) = (0, 0);
    for b in burst {
        let (status, took, a) = b.await.expect("burst request");
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!(
                    a.headers.get("x-envoy-overloaded").map(|v| v.as_bytes()),
                    Some(&b"true"[..])
                );
                assert!(
                    took < Duration::from_millis(300),
                    "overflow must be prompt, took {took:?}"
                );
                overflow += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 1 && overflow >= 4, "burst: {ok} served, {overflow} overflowed");
}

/// Outlier detection: the broken endpoint is ejected, then restored after baseEjectionTime (returns the connection).
async fn outlier_detection(scene: &ResilienceScene) -> HttpConn {
    let mut od = scene.open(23, "od.shop.svc.cluster.local").await.expect("connect");
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(timed(&mut od, "GET", "/").await.0);
    }
    assert!(
        answers[6..].iter().all(|s| *s == 200),
        "after ejection only the good endpoint answers: {answers:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut after = Vec::new();
    for _ in 0..6 {
        after.push(timed(&mut od, "GET", "/").await.0);
    }
    assert!(after.contains(&500), "restored after the ejection time: {after:?}");
    od
}

/// Redirect, rewrite, mirror (returns the connection).
async fn redirect_rewrite_mirror(scene: &ResilienceScene) -> HttpConn {
    let mut web = scene.open(24, "web.shop.svc.cluster.local").await.expect("connect");
    let (status, _, a) = timed(&mut web, "GET", "/old").await;
    assert_eq!(status, 301);
    assert_eq!(
        a.headers.get("location").and_then(|v| v.to_str().ok()),
        Some("http://web.shop.svc.cluster.local/new")
    );
    let (status, _, a) = timed(&mut web, "GET", "/api/items?x=1").await;
    assert_eq!(status, 200);
    assert!(a.body.contains("path GET /v2/items?x=1"), "rewrite: {}", a.body);
    let mirrored_before = served("web-mirror");
    for _ in 0..5 {
        let (status, _, a) = timed(&mut web, "GET", "/hello").await;
        assert_eq!(status, 200);
        assert!(
            a.body.starts_with("web\n"),
            "the client sees only the primary: {}",
            a.body
        );
    }
    let deadline = std::time::Instant::now() + WAIT;
    while served("web-mirror") < mirrored_before + 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror never got its 5 copies"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    web
}

/// A WebSocket-style upgrade through the waypoint.
async fn websocket_upgrade(scene: &ResilienceScene) {
    let ws = scene.open(24, "web.shop.svc.cluster.local").await.expect("connect");
    let echoed = ws.upgrade_echo("/ws", b"hello over an upgrade").await.expect("upgrade");
    assert_eq!(echoed, b"hello over an upgrade");
}

/// Tracing: the caller's W3C context is continued, the upstream gets the waypoint's span as parent in both header families, and the span reaches the collector with its tags.
async fn tracing_continued_and_collected(scene: &mut ResilienceScene, web: &mut HttpConn) {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{parent}-01");
    let a = web
        .send("GET", "/traced", &[("traceparent", &traceparent)])
        .await
        .expect("traced request");
    assert!(a.body.contains(&format!("h traceparent: 00-{trace}-")), "{}", a.body);
    assert!(a.body.contains(&format!("h x-b3-traceid: {trace}")), "{}", a.body);
    assert!(a.body.contains(&format!("h x-b3-parentspanid: {parent}")), "{}", a.body);
    let spans = &mut scene.spans;
    let span = tokio::time::timeout(WAIT, async {
        while let Some((path, body)) = spans.recv().await {
            assert_eq!(path, "/api/v2/spans");
            let list: serde_json::Value = serde_json::from_str(&body).expect("Zipkin v2 JSON");
            if let Some(s) = list.as_array().into_iter().flatten().find(|s| s["traceId"] == trace) {
                return s.clone();
            }
        }
        panic!("collector closed");
    })
    .await
    .expect("the span reached the collector");
    assert_eq!(span["parentId"], parent);
    assert_eq!(span["tags"]["http.status_code"], "200");
    assert_eq!(span["tags"]["cluster"], "netns");
    assert_eq!(span["localEndpoint"]["serviceName"], "waypoint.shop");
}

/// A malformed request gets 400 and is counted; the tunnel's other requests are unaffected.
async fn malformed_request_rejected(scene: &ResilienceScene, web: &mut HttpConn) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = scene
        .client
        .ns
        .connect(SocketAddr::new(Ipv4Addr::new(10, 96, ID2, 24).into(), 80))
        .await
        .expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nno colon here\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "malformed request answered: {answer:?}"
    );
    let metrics = scene.waypoint.metrics().await.expect("metrics");
    assert!(
        metrics.contains("waypoint_rejected_requests_total{reason=\"malformed_http\"} 1"),
        "malformed request counted:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("rejected"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(timed(web, "GET", "/hello").await.0, 200);
}

/// maxRequestsPerConnection: 1 gives every request its own upstream connection; without it the waypoint reuses its pooled one (returns the connection).
async fn max_requests_per_connection(scene: &ResilienceScene, web: &mut HttpConn) -> HttpConn {
    let mut fresh = scene.open(28, "fresh.shop.svc.cluster.local").await.expect("connect");
    let (fresh_before, web_before) = (accepted("fresh"), accepted("web"));
    for _ in 0..5 {
        assert_eq!(timed(&mut fresh, "GET", "/").await.0, 200);
        assert_eq!(timed(web, "GET", "/").await.0, 200);
    }
    assert_eq!(
        accepted("fresh") - fresh_before,
        5,
        "one upstream connection per request"
    );
    assert!(accepted("web") - web_before <= 1, "pooled connections are reused");
    fresh
}

/// notValues on a header (returns the connection).
async fn not_values_on_a_header(scene: &ResilienceScene) -> HttpConn {
    let mut guarded = scene.open(26, "guarded.shop.svc.cluster.local").await.expect("connect");
    assert_eq!(
        guarded
            .send("GET", "/", &[("x-tier", "gold")])
            .await
            .expect("gold")
            .status,
        200
    );
    assert_eq!(
        guarded
            .send("GET", "/", &[("x-tier", "blocked")])
            .await
            .expect("blocked")
            .status,
        403
    );
    guarded
}

/// The empty-spec deny-all (returns the connection).
async fn empty_spec_deny_all(scene: &ResilienceScene) -> HttpConn {
    let mut locked = scene.open(25, "locked.shop.svc.cluster.local").await.expect("connect");
    assert_eq!(timed(&mut locked, "GET", "/").await.0, 403, "deny-all");
    locked
}

const ID3: u8 = 92;
const ISSUER: &str = "https://issuer.test";

fn auth_world() -> String {
    let mut w = base(ID3);
    w += "apiVersion: v1\nkind: Namespace\nmetadata: {name: observability}\n---\n";
    w += &service(ID3, "api", "app: api", 30, true);
    w += &service(ID3, "grpc", "app: grpc-a", 31, true);
    w += &service(ID3, "grpc-a", "app: grpc-a", 32, false);
    w += &service(ID3, "grpc-b", "app: grpc-b", 33, false);
    // Port `tcp`: not declared HTTP, so the waypoint may proxy it as opaque TCP.
    w += &service_port(ID3, "tcp", "app: tcp-a", 34, true, "tcp");
    w += &service_port(ID3, "tcp-b", "app: tcp-b", 35, false, "tcp");
    w += r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc}]
  rules:
  - matches: [{method: {service: istio.v1.auth.IstioCertificateService, method: CreateCertificate}}]
    backendRefs: [{name: grpc-a, port: 80}]
  - matches: [{method: {service: envoy.service.discovery.v3.AggregatedDiscoveryService}}]
    backendRefs: [{name: grpc-b, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: tcp, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: tcp, port: 80}]
  rules: [{backendRefs: [{name: tcp-b, port: 80}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-needs-jwt, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: api}]
  action: ALLOW
  rules: [{from: [{source: {requestPrincipals: ["https://issuer.test/*"]}}]}]
---
"#;
    w
}

/// The RequestAuthentication, once the issuer's JWKS address is known.
fn request_authentication(jwks_uri: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: api-jwt, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: api}}]
  jwtRules:
  - issuer: {ISSUER}
    jwksUri: {jwks_uri}
    audiences: [api]
    outputClaimToHeaders: [{{header: x-jwt-group, claim: group}}]
"#
    )
}

struct Keys {
    rsa: jsonwebtoken::EncodingKey,
    ec: jsonwebtoken::EncodingKey,
    jwks: String,
}

fn keys() -> Keys {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
    let raw = ec.public_key_raw();
    let jwks = serde_json::json!({"keys": [
        {"kty": "RSA", "kid": "rsa", "alg": "RS256", "n": include_str!("../fixtures/jwt-rsa.n").trim(), "e": "AQAB"},
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..])},
    ]});
    Keys {
        rsa: jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt-rsa.pem")).expect("RSA key"),
        ec: jsonwebtoken::EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("EC key"),
        jwks: jwks.to_string(),
    }
}

fn token(keys: &Keys, alg: jsonwebtoken::Algorithm, claims: serde_json::Value) -> String {
    let (kid, key) = match alg {
        jsonwebtoken::Algorithm::RS256 => ("rsa", &keys.rsa),
        _ => ("ec", &keys.ec),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

fn claims(iss: &str, aud: &str, exp_in: i64) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    serde_json::json!({"iss": iss, "sub": "alice", "aud": aud, "exp": now + exp_in, "group": "admins"})
}

mod grpc_backend {
    //! A gRPC backend for routing tests, made of two services from our own protos: the CA's
    //! unary `CreateCertificate` and ADS's bidirectional stream. Both answer with the
    //! backend's name so the test sees where a call went.

    use std::pin::Pin;

    use futures_util::{Stream, StreamExt};
    use mesh_proto::ca::istio_certificate_service_server::IstioCertificateService;
    use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
    use mesh_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
    use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
    use tonic::{Request, Response, Status, Streaming};

    #[derive(Clone)]
    pub struct Named(pub &'static str);

    #[tonic::async_trait]
    impl IstioCertificateService for Named {
        async fn create_certificate(
            &self,
            _req: Request<IstioCertificateRequest>,
        ) -> Result<Response<IstioCertificateResponse>, Status> {
            Ok(Response::new(IstioCertificateResponse {
                cert_chain: vec![self.0.to_owned()],
            }))
        }
    }

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for Named {
        type DeltaAggregatedResourcesStream =
            Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

        async fn delta_aggregated_resources(
            &self,
            req: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
            let name = self.0;
            // tonic's Status is the stream's error type by contract, large or not.
            #[allow(clippy::result_large_err)]
            let out = req.into_inner().map(move |r| {
                r.map(|r| DeltaDiscoveryResponse {
                    system_version_info: name.to_owned(),
                    nonce: r.response_nonce,
                    ..Default::default()
                })
            });
            Ok(Response::new(Box::pin(out)))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_jwt_and_grpc() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let scene = AuthScene::start().await;
    // The api connection stays open to the end and closes before the scene.
    let _api = jwt_tokens(&scene).await;
    server_first_tcp(&scene).await;
    grpc_routed_by_method(&scene).await;
}

/// What the phases of [`waypoint_jwt_and_grpc`] share: the cluster, its pods, the keys, the waypoint.
struct AuthScene {
    // Field order is drop order, as the locals it replaces: the waypoint, the client, the
    // gRPC and TCP pods, the api pod, the issuer, the keys, then the cluster.
    _waypoint: Waypoint,
    client: mesh_e2e::cluster::Pod,
    _grpc_pods: Vec<mesh_e2e::cluster::Pod>,
    _api: mesh_e2e::cluster::Pod,
    _issuer: mesh_e2e::cluster::Pod,
    keys: Keys,
    _cluster: Cluster,
}

impl AuthScene {
    /// The two-node cluster with the JWKS issuer, the api, gRPC and TCP servers, the client and the waypoint.
    async fn start() -> AuthScene {
        let wp_id = identity("shop", "waypoint");
        let cluster = Cluster::start_with_identities(ID3, 2, &auth_world(), &[&wp_id])
            .await
            .expect("cluster up");
        let keys = keys();
        let issuer = cluster
            .add_pod(1, PodSpec::new("issuer", "observability", &[]))
            .expect("issuer pod");
        tokio::spawn(mesh_e2e::apps::json_server(
            issuer.ns.listen(SocketAddr::new(issuer.ip, 8080)).expect("listen"),
            keys.jwks.clone(),
        ));
        cluster
            .write_manifest(
                "jwt.yaml",
                &request_authentication(&format!("http://{}:8080/jwks.json", issuer.ip)),
            )
            .expect("RequestAuthentication");

        let api = cluster
            .add_pod(1, PodSpec::new("api", "shop", &[("app", "api")]))
            .expect("api pod");
        tokio::spawn(named_server(
            api.ns.listen(SocketAddr::new(api.ip, 8080)).expect("listen"),
            "api",
        ));
        let grpc_pods = start_grpc_and_tcp_servers(&cluster);
        let client = cluster
            .add_pod(0, PodSpec::new("client", "shop", &[]))
            .expect("client pod");
        let waypoint = Waypoint::start(&cluster, 1, "shop", "waypoint")
            .await
            .expect("waypoint up");
        for p in grpc_pods.iter().chain([&api, &client]) {
            cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
        }
        AuthScene {
            _waypoint: waypoint,
            client,
            _grpc_pods: grpc_pods,
            _api: api,
            _issuer: issuer,
            keys,
            _cluster: cluster,
        }
    }
}

/// The gRPC pods grpc-a and grpc-b ([`grpc_backend::Named`]), then the TCP pods tcp-a and tcp-b ([`named_echo_server`]), all on 8080.
fn start_grpc_and_tcp_servers(cluster: &Cluster) -> Vec<mesh_e2e::cluster::Pod> {
    use mesh_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
    use mesh_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;

    let mut grpc_pods = Vec::new();
    for (name, node) in [("grpc-a", 0), ("grpc-b", 1)] {
        let pod = cluster
            .add_pod(node, PodSpec::new(name, "shop", &[("app", name)]))
            .expect("grpc pod");
        let listener = pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen");
        let backend = grpc_backend::Named(name);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IstioCertificateServiceServer::new(backend.clone()))
                .add_service(AggregatedDiscoveryServiceServer::new(backend))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        grpc_pods.push(pod);
    }
    for (name, node) in [("tcp-a", 0), ("tcp-b", 1)] {
        let pod = cluster
            .add_pod(node, PodSpec::new(name, "shop", &[("app", name)]))
            .expect("tcp pod");
        tokio::spawn(named_echo_server(
            pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen"),
            name,
        ));
        grpc_pods.push(pod);
    }
    grpc_pods
}

/// JWT: valid RS256 and ES256 tokens pass with the claim forwarded and the token removed; invalid ones get 401, none 403 (returns the connection).
async fn jwt_tokens(scene: &AuthScene) -> HttpConn {
    let keys = &scene.keys;
    let mut conn = HttpConn::open(
        &scene.client.ns,
        SocketAddr::new(Ipv4Addr::new(10, 96, ID3, 30).into(), 80),
        "api.shop",
    )
    .await
    .expect("connect to api");
    let bearer = |t: String| format!("Bearer {t}");
    let mut status_with = async |auth: Option<String>| {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        conn.send("GET", "/", &headers).await.expect("request")
    };
    for alg in [jsonwebtoken::Algorithm::RS256, jsonwebtoken::Algorithm::ES256] {
        // The RequestAuthentication arrives after the pods: wait for it to be in force.
        let deadline = std::time::Instant::now() + WAIT;
        let a = loop {
            let a = status_with(Some(bearer(token(keys, alg, claims(ISSUER, "api", 600))))).await;
            if a.status == 200 || std::time::Instant::now() > deadline {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(a.status, 200, "{alg:?}: {}", a.body);
        assert!(a.body.contains("h x-jwt-group: admins"), "claim forwarded: {}", a.body);
        assert!(!a.body.contains("h authorization:"), "token not forwarded: {}", a.body);
    }
    let rs = jsonwebtoken::Algorithm::RS256;
    let invalid = [
        ("expired", token(keys, rs, claims(ISSUER, "api", -300))),
        ("wrong issuer", token(keys, rs, claims("https://evil.test", "api", 600))),
        ("wrong audience", token(keys, rs, claims(ISSUER, "other", 600))),
        ("bad signature", {
            let t = token(keys, rs, claims(ISSUER, "api", 600));
            let forged = token(keys, rs, claims(ISSUER, "api", 6000));
            // The payload of one token with the signature of another.
            let (head_body, _) = forged.rsplit_once('.').expect("jwt");
            format!("{head_body}.{}", t.rsplit_once('.').expect("jwt").1)
        }),
    ];
    for (what, t) in invalid {
        assert_eq!(status_with(Some(bearer(t))).await.status, 401, "{what} must be 401");
    }
    assert_eq!(
        status_with(None).await.status,
        403,
        "no token where a request principal is required"
    );
    conn
}

/// A server-first TCP protocol through the waypoint: detection gives up waiting for HTTP, and the TCPRoute sends the connection to tcp-b although the service selects tcp-a.
async fn server_first_tcp(scene: &AuthScene) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let tcp = scene
        .client
        .ns
        .connect(SocketAddr::new(Ipv4Addr::new(10, 96, ID3, 34).into(), 80))
        .await
        .expect("connect to the tcp VIP");
    let mut tcp = tokio::io::BufReader::new(tcp);
    let mut line = String::new();
    tokio::time::timeout(WAIT, tcp.read_line(&mut line))
        .await
        .expect("greeting in time")
        .expect("greeting");
    assert_eq!(line, "tcp-b\n", "TCPRoute backend");
    tcp.get_mut().write_all(b"ping\n").await.expect("write");
    line.clear();
    tokio::time::timeout(WAIT, tcp.read_line(&mut line))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(line, "ping\n");

    // Istio's TCP series, as its waypoint reports them: bytes while the connection is open
    // (received from the client: "ping\n"; sent back: the greeting and the echo), its close
    // once it ends.
    let series = [
        "reporter=\"waypoint\"",
        "request_protocol=\"tcp\"",
        "destination_service=\"tcp-b.shop.svc.cluster.local\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/",
    ];
    let metrics = scene._waypoint.metrics().await.expect("waypoint metrics");
    let count = |name: &str| mesh_e2e::metrics::sample(&metrics, name, &series);
    assert_eq!(count("istio_tcp_connections_opened_total"), 1.0, "{metrics}");
    assert_eq!(count("istio_tcp_received_bytes_total"), 5.0, "{metrics}");
    assert_eq!(count("istio_tcp_sent_bytes_total"), 11.0, "{metrics}");
    drop(tcp);
    let closed = || async {
        let metrics = scene._waypoint.metrics().await.unwrap_or_default();
        mesh_e2e::metrics::sample(&metrics, "istio_tcp_connections_closed_total", &series) == 1.0
    };
    mesh_e2e::until("the TCP close counted", WAIT, closed).await;
}

/// gRPC through the waypoint, routed by method: unary to grpc-a, streaming to grpc-b.
async fn grpc_routed_by_method(scene: &AuthScene) {
    use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
    use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use mesh_proto::discovery::DeltaDiscoveryRequest;

    let sockets = std::sync::Arc::new(mesh_e2e::netns::NetnsSockets {
        name: scene.client.ns.name.clone(),
    });
    let channel = mesh_core::grpc::endpoint(&format!("http://10.96.{ID3}.31:80"), None)
        .expect("grpc address")
        .sockets(sockets)
        .connect()
        .await
        .expect("grpc connect");
    let unary = IstioCertificateServiceClient::new(channel.clone())
        .create_certificate(mesh_proto::ca::IstioCertificateRequest::default())
        .await
        .expect("unary call");
    assert_eq!(unary.into_inner().cert_chain, vec!["grpc-a".to_owned()]);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("streaming call")
        .into_inner();
    for i in 0..3 {
        tx.send(DeltaDiscoveryRequest {
            response_nonce: format!("n{i}"),
            ..Default::default()
        })
        .await
        .expect("send on the stream");
        let r = stream.message().await.expect("stream message").expect("stream open");
        assert_eq!((r.system_version_info.as_str(), r.nonce), ("grpc-b", format!("n{i}")));
    }
}
