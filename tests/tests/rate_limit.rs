//! Local rate limiting at the waypoint (LocalRateLimitPolicy) in the two-node cluster:
//! 10 requests per second on `payments` — paced within the budget nothing is refused, a burst
//! beyond it gets 429 with the `x-ratelimit-*` headers and the `RL` flag; a per-source limit on
//! `reviews` gives each client identity its own bucket.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_e2e::apps::{named_server, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::waypoint::{base, identity, service, Waypoint};

const ID: u8 = 62;
const WAIT: Duration = Duration::from_secs(15);

fn vip(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 96, ID, n).into()
}

fn world() -> String {
    let mut w = base(ID);
    w += &service(ID, "payments", "app: payments", 13, true);
    w += &service(ID, "reviews", "app: reviews", 14, true);
    w += r#"apiVersion: policy.ambient-mesh.io/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: payments-10rps, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: payments}]
  tokenBucket: {maxTokens: 10, tokensPerFill: 10, fillInterval: 1s}
---
apiVersion: policy.ambient-mesh.io/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: reviews-per-client, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: reviews}]
  tokenBucket: {maxTokens: 5, fillInterval: 60s}
  perSource: true
---
"#;
    w
}

/// Status codes of `n` requests on one keep-alive connection, `gap` apart.
async fn statuses(conn: &mut HttpConn, n: usize, gap: Duration) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let a = conn.send("GET", "/", &[]).await.expect("request through the waypoint");
        if a.status == 429 {
            assert_eq!(a.headers["x-ratelimit-remaining"], "0");
            assert!(a.headers.contains_key("x-ratelimit-limit") && a.headers.contains_key("x-ratelimit-reset"));
            assert_eq!(a.body.trim(), "local_rate_limited");
        }
        out.push(a.status);
        if !gap.is_zero() {
            // Pacing the client (the subject under test is the rate), not synchronisation.
            tokio::time::sleep(gap).await;
        }
    }
    out
}

fn count(v: &[u16], status: u16) -> usize {
    v.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_local_rate_limits() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(ID, 2, &world(), &[&wp_id])
        .await
        .expect("cluster up");
    let mut servers = Vec::new();
    for (name, labels) in [("payments", [("app", "payments")]), ("reviews", [("app", "reviews")])] {
        let pod = cluster
            .add_pod(1, PodSpec::new(name, "shop", &labels))
            .expect("server pod");
        let l = pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen");
        tokio::spawn(named_server(l, name));
        servers.push(pod);
    }
    let a = cluster
        .add_pod(0, PodSpec::new("client-a", "shop", &[]))
        .expect("client a");
    let b = cluster
        .add_pod(0, PodSpec::new("client-b", "shop", &[]))
        .expect("client b");
    let waypoint = Waypoint::start(&cluster, 1, "shop", "waypoint")
        .await
        .expect("waypoint up");
    for p in servers.iter().chain([&a, &b]) {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }

    let host = "payments.shop.svc.cluster.local";
    let mut conn = HttpConn::open(&a.ns, SocketAddr::new(vip(13), 80), host)
        .await
        .expect("connect");
    // Within the budget: 5 per second for 3 s (at most 6 in any second, under 10).
    let within = statuses(&mut conn, 15, Duration::from_millis(200)).await;
    assert_eq!(count(&within, 200), 15, "paced under 10 req/s: {within:?}");
    // Beyond it: a burst of 40 gets 429s once the bucket is empty.
    let burst = statuses(&mut conn, 40, Duration::ZERO).await;
    let (ok, limited) = (count(&burst, 200), count(&burst, 429));
    assert_eq!(ok + limited, 40, "{burst:?}");
    assert!(
        limited >= 10 && ok >= 1,
        "burst of 40 over 10/s: {ok} allowed, {limited} limited: {burst:?}"
    );

    // Per source: each client identity has its own 5 tokens (no refill within the test).
    let host = "reviews.shop.svc.cluster.local";
    let mut from_a = HttpConn::open(&a.ns, SocketAddr::new(vip(14), 80), host)
        .await
        .expect("a");
    let mut from_b = HttpConn::open(&b.ns, SocketAddr::new(vip(14), 80), host)
        .await
        .expect("b");
    let sa = statuses(&mut from_a, 8, Duration::ZERO).await;
    assert_eq!(sa, [200, 200, 200, 200, 200, 429, 429, 429], "client a");
    let sb = statuses(&mut from_b, 6, Duration::ZERO).await;
    assert_eq!(sb, [200, 200, 200, 200, 200, 429], "client b has its own bucket");

    let metrics = waypoint.metrics().await.expect("waypoint metrics");
    let rejected: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("waypoint_rejected_requests_total") && l.contains("reason=\"rate_limited\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(rejected as usize, limited + 4, "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("response_code=\"429\"")
            && l.contains("response_flags=\"RL\"")),
        "{metrics}"
    );
}
