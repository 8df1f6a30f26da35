//! AUDIT and dry-run AuthorizationPolicies at ztunnel (L4), through the controller: an AUDIT
//! policy names the connections it matches in the destination ztunnel's access log and
//! counts them; a DENY annotated `istio.io/dry-run: "true"` refuses nothing but logs and
//! counts that it would have denied; the same DENY without the annotation refuses.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_e2e::apps::{echo_connect, echo_server, ping};
use mesh_e2e::cluster::{Cluster, PodSpec};

const ID: u8 = 66;
const WAIT: Duration = Duration::from_secs(15);

const WORLD: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-9000, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  action: AUDIT
  rules: [{to: [{operation: {ports: ["9000"]}}]}]
---
"#;

/// The client's DENY; `dry_run` adds Istio's annotation.
fn deny_client(dry_run: bool) -> String {
    let annotations = if dry_run {
        r#", annotations: {istio.io/dry-run: "true"}"#
    } else {
        ""
    };
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client, namespace: shop{annotations}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: ["cluster.local/ns/shop/sa/client"]}}}}]}}]
"#
    )
}

/// The access-log lines of completed connections to `dst`, from the server node's ztunnel.
fn access_lines(cluster: &Cluster, dst: SocketAddr) -> Vec<serde_json::Value> {
    let logs = cluster.nodes[1]
        .ztunnel
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|z| z.logs())
        .unwrap_or_default();
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "connection complete" && v["dst.addr"] == dst.to_string().as_str())
        .collect()
}

async fn server_metrics(cluster: &Cluster) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], 15020));
    mesh_e2e::ztunnel::http_request(cluster.nodes[1].ns, addr, "GET", "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// One echo round trip, then the connection is closed (which writes its access log).
async fn round_trip(from: &mesh_e2e::cluster::Pod, dst: SocketAddr) -> std::io::Result<()> {
    let (_, mut conn) = echo_connect(&from.ns, dst).await?;
    assert_eq!(ping(&mut conn, "hello").await?, "hello");
    Ok(())
}

/// Waits until the server node's ztunnel holds `shop/<name>` with `dry_run` as given.
async fn wait_policy(cluster: &Cluster, name: &str, dry_run: bool) {
    mesh_e2e::until(
        &format!("policy {name} (dry run {dry_run}) at ztunnel"),
        WAIT,
        || async {
            cluster.ztunnel_dump(1).await.is_ok_and(|d| {
                d["policies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == name && p["dry_run"] == dry_run)
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_and_dry_run_policies_at_ztunnel() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let cluster = Cluster::start(ID, 2, WORLD).await.expect("cluster up");
    cluster
        .write_manifest("deny-client.yaml", &deny_client(true))
        .expect("the dry-run DENY");
    let server = cluster
        .add_pod(1, PodSpec::new("server", "shop", &[("app", "server")]))
        .expect("server");
    let client = cluster.add_pod(0, PodSpec::new("client", "shop", &[])).expect("client");
    for port in [9000, 9001] {
        tokio::spawn(echo_server(
            server.ns.listen(SocketAddr::new(server.ip, port)).expect("listen"),
        ));
    }
    for p in [&server, &client] {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }
    wait_policy(&cluster, "audit-9000", false).await;
    wait_policy(&cluster, "deny-client", true).await;
    let audited = SocketAddr::new(server.ip, 9000);
    let other = SocketAddr::new(server.ip, 9001);

    // The dry-run DENY matches the client but refuses nothing.
    round_trip(&client, audited)
        .await
        .expect("a dry-run DENY is not enforced");
    round_trip(&client, other).await.expect("port 9001");
    mesh_e2e::until("both access-log lines", WAIT, || async {
        !access_lines(&cluster, audited).is_empty() && !access_lines(&cluster, other).is_empty()
    })
    .await;
    let would_deny = "would deny: DENY policy shop/deny-client rule 0 matched";
    let line = &access_lines(&cluster, audited)[0];
    assert_eq!(line["authz.audit"], "shop/audit-9000", "{line}");
    assert_eq!(line["authz.dry_run"], would_deny, "{line}");
    // The AUDIT rule names port 9000 only; the dry-run DENY covers both ports.
    let line = &access_lines(&cluster, other)[0];
    assert_eq!(line["authz.audit"], "", "{line}");
    assert_eq!(line["authz.dry_run"], would_deny, "{line}");

    let m = server_metrics(&cluster).await;
    let has = |name: &str, labels: &[&str]| {
        m.lines()
            .any(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)) && l.ends_with(" 1"))
    };
    assert!(
        has("ztunnel_authz_audit_total{", &["policy=\"shop/audit-9000\""]),
        "{m}"
    );
    assert!(
        m.lines().any(|l| l.starts_with("ztunnel_authz_dry_run_total{")
            && l.contains("policy=\"shop/deny-client\"")
            && l.contains("decision=\"deny\"")
            && l.ends_with(" 2")),
        "{m}"
    );

    // Enforced (the annotation removed), the same policy refuses the client.
    cluster
        .write_manifest("deny-client.yaml", &deny_client(false))
        .expect("enforce the DENY");
    mesh_e2e::until("the enforced DENY to refuse the client", WAIT, || async {
        echo_connect(&client.ns, other).await.is_err()
    })
    .await;
    println!(
        "{}",
        m.lines()
            .filter(|l| l.starts_with("ztunnel_authz"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
