//! ztunnel and the controller together, in local mode: the controller reads a manifest
//! directory, ztunnels in two namespaces get their workload state over Delta ADS and their
//! certificates from its CA (TLS, bootstrap tokens, impersonation for their node's pods),
//! and real HTTP flows between the pods over HBONE; a policy added to the manifests is
//! pushed and enforced.

use std::time::Duration;

use mesh_e2e::apps::http_server;
use mesh_e2e::bed::Bed;
use mesh_e2e::controller::Controller;
use mesh_e2e::ztunnel::Ztunnel;

const N: u8 = 42;

fn manifests(bed: &Bed, extra: &str) -> String {
    let (a, b) = (&bed.a.name, &bed.b.name);
    format!(
        "\
apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, annotations: {{ambient.istio.io/redirection: enabled}}}}
spec: {{nodeName: {a}, serviceAccountName: client, containers: [{{name: c, image: x}}]}}
status: {{podIP: {ip_a}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: default, labels: {{app: server}}, annotations: {{ambient.istio.io/redirection: enabled}}}}
spec: {{nodeName: {b}, serviceAccountName: server, containers: [{{name: c, image: x}}]}}
status: {{podIP: {ip_b}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: default}}
spec: {{clusterIP: {vip}, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
{extra}",
        ip_a = bed.ip(1),
        ip_b = bed.ip(2),
        vip = bed.vip(),
    )
}

const DENY_CLIENT: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]
";

const WAYPOINT: &str = "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";

fn curl(bed: &Bed, target: &str) -> String {
    bed.a
        .exec(&[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            target,
        ])
        .unwrap_or_else(|e| format!("error: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnels_take_state_and_certificates_from_the_controller() {
    let Some(bed) = Bed::new(N) else { return };
    let (node_a, node_b) = (bed.a.name.clone(), bed.b.name.clone());
    let controller = Controller::start(&bed.c, bed.ip(3), &[&node_a, &node_b], &manifests(&bed, ""))
        .await
        .expect("controller ready");
    let cp = format!("https://{}:15012", bed.ip(3));
    let bundle = controller.trust_bundle();
    let args = |node: &str| -> Vec<String> {
        vec![
            "--xds-address".into(),
            cp.clone(),
            "--ca-address".into(),
            cp.clone(),
            "--trust-bundle".into(),
            bundle.display().to_string(),
            "--token-file".into(),
            controller.token_file(node).display().to_string(),
        ]
    };
    let (args_a, args_b) = (args(&node_a), args(&node_b));
    let refs_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let refs_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let za = Ztunnel::start_raw(&bed.a, &refs_a).await.expect("ztunnel a ready");
    let zb = Ztunnel::start_raw(&bed.b, &refs_b).await.expect("ztunnel b ready");
    tokio::spawn(http_server(bed.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));

    // The state came from the controller's translation of the manifests.
    let dump = za.config_dump().await.expect("config dump");
    let text = dump.to_string();
    assert!(text.contains("Kubernetes//Pod/default/server"), "{dump:#}");
    assert!(text.contains("server.default.svc.cluster.local"), "{dump:#}");

    // Traffic by pod IP and by VIP, mutual TLS with identities the controller's CA issued.
    let by_ip = format!("http://{}:8080/", bed.ip(2));
    let by_vip = format!("http://{}:80/", bed.vip());
    assert_eq!(
        curl(&bed, &by_ip),
        "200",
        "ztunnel a:\n{}\nztunnel b:\n{}",
        za.logs(),
        zb.logs()
    );
    assert_eq!(curl(&bed, &by_vip), "200", "ztunnel a:\n{}", za.logs());
    let metrics = zb.metrics().await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );
    let (_, signed) = controller.get("/metrics").await.expect("controller metrics");
    assert!(
        signed
            .lines()
            .any(|l| l.starts_with("controller_certificates_signed_total") && !l.ends_with(" 0")),
        "{signed}"
    );

    mesh_e2e::promtool_check(&signed).expect("controller metrics are valid Prometheus text");
    assert!(signed.contains("controller_xds_connected_clients 2"), "{signed}");

    // A policy and a waypoint written to the manifests: the policy reaches ztunnel b and is
    // enforced, the waypoint becomes a record for the harness to run.
    controller
        .write_manifests(&(manifests(&bed, DENY_CLIENT) + WAYPOINT))
        .expect("write manifests");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dump = zb.config_dump().await.expect("config dump").to_string();
        if dump.contains("deny-client") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "policy not pushed:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let denied = curl(&bed, &by_ip);
    assert_ne!(denied, "200", "the DENY policy is enforced");
    let record = controller.dir.path().join("waypoints/default.waypoint.json");
    while !record.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no waypoint record:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = std::fs::read_to_string(&record).expect("waypoint record");
    let record: serde_json::Value = serde_json::from_str(&text).expect("JSON record");
    assert_eq!(
        record["identity"], "spiffe://cluster.local/ns/default/sa/waypoint",
        "{record:#}"
    );
}
