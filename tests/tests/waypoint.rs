//! The waypoint end to end in the two-node cluster: the brief's canary (HTTPRoute weights and
//! a header match; VirtualService + DestinationRule subsets), a header-adding route, and the
//! payment AuthorizationPolicy enforced against the original client's SPIFFE identity.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_e2e::apps::{named_server, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec, CNI_BIN};
use mesh_e2e::waypoint::{identity, Waypoint};
use mesh_e2e::{privileged, promtool_check};

const ID: u8 = 90;
const WAIT: Duration = Duration::from_secs(15);
const REQUESTS: usize = 2000;

fn vip(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, ID, n).into()
}

fn service(name: &str, selector: &str, n: u8, waypoint: bool) -> String {
    let labels = if waypoint {
        ", labels: {istio.io/use-waypoint: waypoint}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop{labels}}}\n\
         spec: {{clusterIP: {}, selector: {{{selector}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n",
        vip(n)
    )
}

fn world() -> String {
    let mut w = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n",
    );
    w += &service("server", "app: server", 10, true);
    w += &service("server-v1", "app: server, version: v1", 11, false);
    w += &service("server-v2", "app: server, version: v2", 12, false);
    w += &service("payments", "app: payments", 13, true);
    w += &service("reviews", "app: reviews", 14, true);
    w += &format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: waypoint, namespace: shop}}\n\
         spec: {{clusterIP: {}, selector: {{gateway.networking.k8s.io/gateway-name: waypoint}}, ports: [{{name: mesh, port: 15008}}]}}\n---\n",
        vip(50)
    );
    w += r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_routes_and_authorizes() {
    if !privileged() || !std::path::Path::new(CNI_BIN).join("bridge").exists() {
        eprintln!("skipping: needs root and containernetworking-plugins");
        return;
    }
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
    let mut servers = Vec::new();
    for (name, node, labels) in &pods {
        let pod = cluster
            .add_pod(*node, PodSpec::new(name, "shop", labels))
            .expect("server pod");
        let l = pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen");
        tokio::spawn(named_server(l, name));
        servers.push(pod);
    }
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

    let server = SocketAddr::new(vip(10), 80);
    let mut conn = HttpConn::open(&client.ns, server, "server.shop.svc.cluster.local")
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

    // A header added on /v1 paths reaches the backend.
    let a = conn.send("GET", "/v1/items", &[]).await.expect("/v1 request");
    assert_eq!(a.status, 200);
    assert!(a.body.starts_with("server-v1\n"), "{}", a.body);
    assert!(a.body.contains("h x-api-version: v1"), "header not added: {}", a.body);

    // The same canary with VirtualService + DestinationRule subsets.
    let mut reviews = HttpConn::open(
        &client.ns,
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

    // The payment policy: only order-service, only POST to /api/v1/payments*.
    let payments = SocketAddr::new(vip(13), 80);
    let mut order = HttpConn::open(&client.ns, payments, "payments.shop.svc.cluster.local")
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
    let mut other = HttpConn::open(&frontend.ns, payments, "payments.shop.svc.cluster.local")
        .await
        .expect("connect from frontend");
    let denied = other.send("POST", "/api/v1/payments", &[]).await.expect("POST");
    assert_eq!(denied.status, 403, "another principal must be refused: {}", denied.body);

    // Fault injection at the configured percentage (400 requests, 50 % ± 10).
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

    // Dialling a payments pod directly skips the waypoint: ztunnel's L4 policy refuses it.
    let pod = servers.iter().find(|p| p.name == "payments").expect("payments pod");
    let direct = match HttpConn::open(&client.ns, SocketAddr::new(pod.ip, 8080), "payments").await {
        Ok(mut c) => c.send("POST", "/api/v1/payments", &[]).await.map(|a| a.status).ok(),
        Err(_) => None,
    };
    assert_eq!(direct, None, "a direct call to the pod must not get an answer");
    let ok = order.send("POST", "/api/v1/payments", &[]).await.expect("POST");
    assert_eq!(ok.status, 200, "through the waypoint it still works: {}", ok.body);

    // Istio's request metrics, with the original client's identity.
    let metrics = waypoint.metrics().await.expect("metrics");
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
