//! Istio's own ztunnel (`../shared/peers/istio-ztunnel`, unmodified) on our control plane and
//! beside our data plane, configured by its environment variables as a user would run it.
//!
//! - dedicated mode: pointed at our controller with Istio's default control plane name
//!   (`https://istiod.istio-system.svc:15012`, resolved by the pod's hosts file; Istio's
//!   ztunnel checks that name against the DNS SANs), it becomes ready with our
//!   workloads from Delta ADS and a certificate from our CA, and sends no NACK; then traffic
//!   between it and our ztunnel both ways by pod IP and VIP (a checksummed transfer, the
//!   client's IP preserved), and an L4 DENY from our controller enforced by it.
//! - on-demand (`XDS_ON_DEMAND=true`, the URL's host an IP checked against our IP SAN): it
//!   subscribes to nothing up front and still reaches a service and a pod.
//! - shared mode on node 1 of the namespace cluster, driven by our node agent over ZDS: it
//!   serves pods our ztunnel reaches, enforces STRICT; and as the client of our waypoint it
//!   sends `use-waypoint` traffic there over HBONE with the client's identity, so the
//!   HTTPRoute split and the L7 AuthorizationPolicy apply.
//!
//! The peer is missing: the tests fail under `CI` and skip with a note otherwise.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mesh_e2e::apps::{echo_connect, http_server, ping};
use mesh_e2e::controller::Controller;
use mesh_e2e::istio::{self, IstioZtunnel};
use mesh_e2e::{Bed, Netns, Ztunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const READY: Duration = Duration::from_secs(20);

/// Pod `client` (bed pod a, Istio's ztunnel), pod `server` (bed pod b, our ztunnel), service
/// `server` at the bed VIP; `extra` is appended.
fn manifests(bed: &Bed, extra: &str) -> String {
    format!(
        "\
apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}, annotations: {{ambient.istio.io/redirection: enabled}}}}
spec: {{nodeName: node-a, serviceAccountName: client, containers: [{{name: c, image: x}}]}}
status: {{podIP: {ip_a}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: default, labels: {{app: server}}, annotations: {{ambient.istio.io/redirection: enabled}}}}
spec: {{nodeName: node-b, serviceAccountName: server, containers: [{{name: c, image: x}}]}}
status: {{podIP: {ip_b}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: default}}
spec: {{clusterIP: {vip}, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: bulk, port: 81, targetPort: 8081}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: client, namespace: default}}
spec: {{clusterIP: {vip_client}, selector: {{app: client}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
{extra}",
        ip_a = bed.ip(1),
        ip_b = bed.ip(2),
        vip = bed.vip(),
        vip_client = client_vip(bed),
    )
}

/// The client's service VIP (beside the bed's server VIP).
fn client_vip(bed: &Bed) -> IpAddr {
    match bed.vip() {
        IpAddr::V4(v) => {
            let [a, b, c, d] = v.octets();
            IpAddr::from([a, b, c, d.wrapping_add(1)])
        }
        v6 => v6,
    }
}

/// A DENY from our controller for connections to the client pod from the server's identity.
const DENY_SERVER_TO_CLIENT: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-server, namespace: default}
spec:
  selector: {matchLabels: {app: client}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/server]}}]}]
";

/// An AUDIT policy (ours: a DENY without groups plus the `audit` extension) for `principal`,
/// as `name`, on the client.
fn audit_client(name: &str, principal: &str) -> String {
    format!(
        "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: client}}}}
  action: AUDIT
  rules: [{{from: [{{source: {{principals: [{principal}]}}}}]}}]
"
    )
}

/// The same DENY as [`DENY_SERVER_TO_CLIENT`] in dry-run (Istio's `dry_run` field).
const DRY_RUN_DENY: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-server-dry-run, namespace: default, annotations: {istio.io/dry-run: \"true\"}}
spec:
  selector: {matchLabels: {app: client}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/server]}}]}]
";

/// The environment of Istio's ztunnel serving pod `client` in dedicated mode.
fn dedicated_env(
    bed: &Bed,
    controller: &Controller<'_>,
    cp_host: &str,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let cp = format!("https://{cp_host}:15012");
    let bundle = controller.trust_bundle().display().to_string();
    let token = controller.identity_token_file(CLIENT_ID).display().to_string();
    let mut env: Vec<(&'static str, String)> = vec![
        ("PROXY_MODE", "dedicated".into()),
        ("PROXY_WORKLOAD_INFO", "default/client/client".into()),
        ("XDS_ADDRESS", cp.clone()),
        ("CA_ADDRESS", cp),
        ("XDS_ROOT_CA", bundle.clone()),
        ("CA_ROOT_CA", bundle),
        ("AUTH_TOKEN", token),
        ("POD_NAMESPACE", "default".into()),
        ("POD_NAME", "client".into()),
        ("SERVICE_ACCOUNT", "client".into()),
        ("NODE_NAME", "node-a".into()),
        ("INSTANCE_IP", bed.ip(1).to_string()),
        ("TRUST_DOMAIN", "cluster.local".into()),
        ("CLUSTER_ID", "Kubernetes".into()),
        ("PACKET_MARK", "1337".into()),
        ("ZTUNNEL_WORKER_THREADS", "1".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    env
}

/// Istio's ztunnel's xDS and CA sockets carry no mark: the pod's capture must let the
/// control plane's address through, as its README says.
fn let_control_plane_through(pod: &Netns, controller: IpAddr) {
    let family = if controller.is_ipv4() { "ip" } else { "ip6" };
    pod.exec(&[
        "nft",
        "insert",
        "rule",
        "inet",
        cni_plugin::agent::rules::TABLE,
        "output_nat",
        family,
        "daddr",
        &controller.to_string(),
        "tcp",
        "dport",
        "15012",
        "return",
    ])
    .expect("nft exception for the control plane");
}

/// The sum of `controller_xds_nacks_total` over types.
async fn controller_nacks(controller: &Controller<'_>) -> f64 {
    let (_, text) = controller.get("/metrics").await.expect("controller metrics");
    text.lines()
        .filter(|l| l.starts_with("controller_xds_nacks_total"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn curl(ns: &Netns, target: &str) -> String {
    ns.exec(&["curl", "-sS", "--max-time", "5", target])
        .unwrap_or_else(|e| format!("error: {e}"))
}

/// FNV-1a 64, continued from `h` (start with [`FNV_START`]).
fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Serves: on accept, reads until EOF and answers the length and FNV-1a of what it read.
async fn checksum_server(listener: tokio::net::TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut h, mut len) = (FNV_START, 0usize);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        h = fnv(h, &buf[..n]);
                        len += n;
                    }
                    Err(_) => return,
                }
            }
            let _ = s.write_all(format!("{len} {h:016x}").as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Sends `len` pseudo-random bytes from `ns` to `dst` and checks the checksum that comes back.
async fn checksummed_transfer(ns: &Netns, dst: SocketAddr, len: usize) -> anyhow::Result<Duration> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let want = format!("{len} {:016x}", fnv(FNV_START, &data));
    let start = Instant::now();
    let mut s = ns.connect(dst).await?;
    s.write_all(&data).await?;
    s.shutdown().await?;
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut got)).await??;
    anyhow::ensure!(got == want, "checksum via {dst}: got {got:?}, want {want}");
    Ok(start.elapsed())
}

/// Waits until `f` holds on Istio's ztunnel's config dump.
async fn wait_dump(z: &IstioZtunnel<'_>, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + READY;
    loop {
        if let Ok(dump) = z.config_dump().await {
            if f(&dump) {
                return dump;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what} not in Istio's ztunnel config dump:\n{dump:#}\nlog:\n{}",
                    z.logs()
                );
            }
        }
        if Instant::now() > deadline {
            panic!("no config dump from Istio's ztunnel; log:\n{}", z.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Our ztunnel for pod b (node-b), on the controller in pod c's namespace.
async fn our_ztunnel_on_b<'b>(bed: &'b Bed, controller: &Controller<'_>) -> Ztunnel<'b> {
    let cp = format!("https://{}:15012", bed.ip(3));
    let bundle = controller.trust_bundle().display().to_string();
    let token = controller.token_file("node-b").display().to_string();
    let args = [
        "--xds-address",
        &cp,
        "--ca-address",
        &cp,
        "--trust-bundle",
        &bundle,
        "--token-file",
        &token,
    ];
    Ztunnel::start_for_node(&bed.b, "node-b", &args)
        .await
        .expect("our ztunnel ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ztunnel_dedicated_on_our_control_plane_and_beside_our_ztunnel() {
    let Some(peer) = istio::peer().expect("Istio's ztunnel") else {
        return;
    };
    let Some(bed) = Bed::new(110) else { return };
    let controller = Controller::start_with(
        &bed.c,
        bed.ip(3),
        &["node-b"],
        &manifests(&bed, ""),
        false,
        &[CLIENT_ID],
    )
    .await
    .expect("controller ready");
    let_control_plane_through(&bed.a, bed.ip(3));
    // Istio's default control plane name as the URL's host (resolved by the pod's hosts file),
    // which the serving certificate must carry as a DNS SAN.
    let _hosts = istio::HostsFile::write(&bed.a, &[("istiod.istio-system.svc", bed.ip(3))]).expect("hosts file");
    let env = dedicated_env(&bed, &controller, "istiod.istio-system.svc", &[]);
    let mut istio_zt = IstioZtunnel::spawn(&bed.a, &peer, &env).expect("spawn Istio's ztunnel");
    istio_zt.wait_ready(READY).await.expect("Istio's ztunnel ready");

    // State from our Delta ADS.
    let dump = wait_dump(&istio_zt, "our workloads", |d| {
        let uids = istio::dumped_workloads(d);
        uids.iter().any(|u| u == "Kubernetes//Pod/default/server")
            && uids.iter().any(|u| u == "Kubernetes//Pod/default/client")
    })
    .await;
    assert!(
        dump.to_string().contains("server.default.svc.cluster.local"),
        "{dump:#}"
    );

    // Our ztunnel serves the server pod.
    let our_zt = our_ztunnel_on_b(&bed, &controller).await;
    tokio::spawn(http_server(bed.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));
    tokio::spawn(checksum_server(bed.b.listen("0.0.0.0:8081".parse().unwrap()).unwrap()));
    tokio::spawn(http_server(bed.a.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));
    tokio::spawn(checksum_server(bed.a.listen("0.0.0.0:8081".parse().unwrap()).unwrap()));

    // Istio's ztunnel -> ours, by pod IP and VIP; the server sees the client's own address.
    let want_peer = format!("peer={}", bed.ip(1));
    for target in [
        format!("http://{}:8080/", bed.ip(2)),
        format!("http://{}:80/", bed.vip()),
    ] {
        let got = curl(&bed.a, &target);
        assert_eq!(
            got.trim(),
            want_peer,
            "{target}\nIstio ztunnel:\n{}\nours:\n{}",
            istio_zt.logs(),
            our_zt.logs()
        );
    }
    // Ours -> Istio's, by pod IP and VIP.
    let want_peer = format!("peer={}", bed.ip(2));
    for target in [
        format!("http://{}:8080/", bed.ip(1)),
        format!("http://{}:80/", client_vip(&bed)),
    ] {
        let got = curl(&bed.b, &target);
        assert_eq!(
            got.trim(),
            want_peer,
            "{target}\nIstio ztunnel:\n{}\nours:\n{}",
            istio_zt.logs(),
            our_zt.logs()
        );
    }
    // 16 MiB each way, checksummed.
    let took = checksummed_transfer(&bed.a, SocketAddr::new(bed.vip(), 81), 16 << 20)
        .await
        .expect("Istio's -> ours");
    eprintln!("16 MiB Istio's ztunnel -> ours by VIP: {took:?}");
    let took = checksummed_transfer(&bed.b, SocketAddr::new(bed.ip(1), 8081), 16 << 20)
        .await
        .expect("ours -> Istio's");
    eprintln!("16 MiB our ztunnel -> Istio's by pod IP: {took:?}");
    // Its certificate (fetched on first use in dedicated mode) came from our CA.
    wait_dump(&istio_zt, "a certificate for the client", |d| {
        istio::dumped_certificates(d)
            .iter()
            .any(|(id, state)| id == CLIENT_ID && state.contains("Available"))
    })
    .await;
    let dump = istio_zt.config_dump().await.expect("dump");
    let root_b64 = dump["certificates"][0]["rootCerts"][0]["pem"]
        .as_str()
        .unwrap_or_default();
    let root = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, root_b64).expect("base64 root");
    let bundle = std::fs::read_to_string(controller.trust_bundle()).expect("trust bundle");
    // The same certificate, whatever the PEM line width.
    let squash = |pem: &str| pem.split_whitespace().collect::<String>();
    assert_eq!(
        squash(&String::from_utf8_lossy(&root)),
        squash(&bundle),
        "Istio's ztunnel's root is not our CA's"
    );
    // The traffic went through HBONE: Istio's ztunnel counted it with our peer's identity.
    let metrics = istio_zt.metrics().await.expect("Istio metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/server\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );

    // AUDIT and dry-run policies reach Istio's ztunnel (no NACK) and change nothing there. An
    // AUDIT for nobody alone would refuse the server were its rules a visible ALLOW; one for
    // the server would, were they a visible DENY; so would the dry-run DENY if enforced.
    let phases = [
        (
            audit_client("audit-nobody", "cluster.local/ns/default/sa/nobody") + DRY_RUN_DENY,
            "audit-nobody",
        ),
        (
            audit_client("audit-server", "cluster.local/ns/default/sa/server"),
            "audit-server",
        ),
    ];
    for (extra, name) in phases {
        controller
            .write_manifests(&manifests(&bed, &extra))
            .expect("write policies");
        wait_dump(&istio_zt, name, |d| d.to_string().contains(name)).await;
        let got = curl(&bed.b, &format!("http://{}:8080/", bed.ip(1)));
        assert!(
            got.contains("peer="),
            "Istio's ztunnel enforced an AUDIT or dry-run policy ({name}): {got}\n{}",
            istio_zt.logs()
        );
    }

    // An L4 DENY from our controller, enforced by Istio's ztunnel on its inbound side.
    controller
        .write_manifests(&manifests(&bed, DENY_SERVER_TO_CLIENT))
        .expect("write policy");
    let deadline = Instant::now() + READY;
    loop {
        let got = curl(&bed.b, &format!("http://{}:8080/", bed.ip(1)));
        if !got.contains("peer=") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "DENY not enforced by Istio's ztunnel: {got}\n{}",
            istio_zt.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The other direction is not affected.
    let got = curl(&bed.a, &format!("http://{}:8080/", bed.ip(2)));
    assert!(got.contains("peer="), "{got}");
    assert_eq!(controller_nacks(&controller).await, 0.0, "{}", controller.logs());
    assert!(
        !istio_zt.logs().contains("NACK"),
        "Istio's ztunnel rejected a response:\n{}",
        istio_zt.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ztunnel_on_demand_reaches_a_service_and_a_pod() {
    let Some(peer) = istio::peer().expect("Istio's ztunnel") else {
        return;
    };
    let Some(bed) = Bed::new(111) else { return };
    let controller = Controller::start_with(
        &bed.c,
        bed.ip(3),
        &["node-b"],
        &manifests(&bed, ""),
        false,
        &[CLIENT_ID],
    )
    .await
    .expect("controller ready");
    let_control_plane_through(&bed.a, bed.ip(3));
    // No ALT_*_HOSTNAME: the URL's host (an IP) must be an IP SAN of our serving certificate.
    let env = dedicated_env(
        &bed,
        &controller,
        &bed.ip(3).to_string(),
        &[
            ("XDS_ON_DEMAND", "true"),
            ("ISTIO_META_DNS_CAPTURE", "false"),
            ("RUST_LOG", "debug"),
        ],
    );
    let mut istio_zt = IstioZtunnel::spawn(&bed.a, &peer, &env).expect("spawn Istio's ztunnel");
    istio_zt.wait_ready(READY).await.expect("Istio's ztunnel ready");
    // Nothing is pushed up front: the server pod is not known yet.
    let dump = istio_zt.config_dump().await.expect("dump");
    assert!(
        !istio::dumped_workloads(&dump)
            .iter()
            .any(|u| u.ends_with("/default/server")),
        "on-demand client got the server up front: {dump:#}"
    );

    let our_zt = our_ztunnel_on_b(&bed, &controller).await;
    tokio::spawn(mesh_e2e::apps::echo_server(
        bed.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap(),
    ));

    // A service by VIP, then a pod by IP, each fetched on first use.
    for dst in [SocketAddr::new(bed.vip(), 80), SocketAddr::new(bed.ip(2), 8080)] {
        let (greeting, mut conn) = echo_connect(&bed.a, dst)
            .await
            .unwrap_or_else(|e| panic!("{dst}: {e}\nIstio:\n{}\nours:\n{}", istio_zt.logs(), our_zt.logs()));
        assert!(greeting.contains(&bed.ip(1).to_string()), "{dst}: {greeting}");
        assert_eq!(ping(&mut conn, "hello").await.expect("echo"), "hello");
    }
    let dump = istio_zt.config_dump().await.expect("dump");
    assert!(
        istio::dumped_workloads(&dump)
            .iter()
            .any(|u| u == "Kubernetes//Pod/default/server"),
        "{dump:#}"
    );
    assert_eq!(controller_nacks(&controller).await, 0.0, "{}", controller.logs());
}

/// Cluster subnet id of the shared-mode test.
const CLUSTER_ID: u8 = 88;

const STRICT: &str = "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

fn shop(vip: IpAddr) -> String {
    format!(
        "\
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: legacy}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: shop}}
spec: {{clusterIP: {vip}, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"
    )
}

/// Whether Istio's ztunnel's dump lists `uid` as an HBONE workload.
fn istio_has_hbone(dump: &serde_json::Value, uid: &str) -> bool {
    dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|w| w["uid"] == uid && w["protocol"] == "HBONE")
}

/// Replaces our ztunnel on node 1 of `cluster` with Istio's, on our node agent's ZDS socket
/// (shared mode), and waits until it is ready.
async fn istio_ztunnel_on_node_1(
    cluster: &mesh_e2e::cluster::Cluster,
    peer: &std::path::Path,
) -> IstioZtunnel<'static> {
    use mesh_e2e::cluster::Cluster;
    let ours = cluster.nodes[1]
        .ztunnel
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    drop(ours);
    let n1 = &cluster.nodes[1];
    let cp = format!("https://{}:15012", cluster.controller_ip());
    let bundle = cluster.controller.trust_bundle().display().to_string();
    let env: Vec<(&str, String)> = vec![
        ("INPOD_UDS", n1.zds_socket().display().to_string()),
        ("XDS_ADDRESS", cp.clone()),
        ("CA_ADDRESS", cp),
        ("XDS_ROOT_CA", bundle.clone()),
        ("CA_ROOT_CA", bundle),
        (
            "AUTH_TOKEN",
            cluster.controller.token_file(n1.name()).display().to_string(),
        ),
        ("NODE_NAME", n1.name().to_owned()),
        ("POD_NAMESPACE", "istio-system".into()),
        ("POD_NAME", "ztunnel-istio".into()),
        ("SERVICE_ACCOUNT", "ztunnel".into()),
        ("INSTANCE_IP", Cluster::underlay_ip(cluster.id, 1).to_string()),
        ("TRUST_DOMAIN", "cluster.local".into()),
        ("CLUSTER_ID", "Kubernetes".into()),
        ("ZTUNNEL_WORKER_THREADS", "1".into()),
    ];
    let mut istio_zt = IstioZtunnel::spawn(n1.ns, peer, &env).expect("spawn Istio's ztunnel");
    istio_zt.wait_ready(READY).await.expect("Istio's ztunnel ready");
    istio_zt
}

/// Waits until `pods` are known as HBONE workloads both to our ztunnel on node 0 and to
/// Istio's on node 1 (so both nodes' agents reported them captured).
async fn wait_hbone_on_both(
    cluster: &mesh_e2e::cluster::Cluster,
    istio_zt: &IstioZtunnel<'_>,
    pods: &[&mesh_e2e::cluster::Pod],
) {
    let deadline = Instant::now() + READY;
    for pod in pods {
        let uid = format!("Kubernetes//Pod/{}/{}", pod.namespace, pod.name);
        loop {
            let theirs = istio_zt.config_dump().await.map(|d| istio_has_hbone(&d, &uid));
            let ours = cluster.ztunnel_dump(0).await.map(|d| {
                d["workloads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|w| w["uid"] == uid.as_str() && w["tunnel"] == "Hbone")
            });
            if matches!((theirs, ours), (Ok(true), Ok(true))) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{uid} not HBONE on both nodes\nIstio:\n{}\nagent:\n{}",
                istio_zt.logs(),
                cluster.nodes[1].agent_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ztunnel_shared_mode_driven_by_our_node_agent() {
    use mesh_e2e::cluster::{Cluster, PodSpec};
    let Some(peer) = istio::peer().expect("Istio's ztunnel") else {
        return;
    };
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let vip = IpAddr::from([10, 96, CLUSTER_ID, 10]);
    let cluster = Cluster::start(CLUSTER_ID, 2, &shop(vip)).await.expect("cluster up");
    let istio_zt = istio_ztunnel_on_node_1(&cluster, &peer).await;

    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    let server = cluster
        .add_pod(1, PodSpec::new("server", "shop", &[("app", "server")]))
        .expect("server pod");
    tokio::spawn(http_server(
        server.ns.listen(SocketAddr::new(server.ip, 8080)).expect("listen"),
    ));
    tokio::spawn(http_server(
        client.ns.listen(SocketAddr::new(client.ip, 8080)).expect("listen"),
    ));
    // Both pods captured and known with HBONE on both sides.
    wait_hbone_on_both(&cluster, &istio_zt, &[&client, &server]).await;

    // Ours -> Istio's by pod IP, VIP and DNS name (our DNS proxy), and back by pod IP;
    // client addresses preserved.
    for target in [
        format!("http://{}:8080/", server.ip),
        format!("http://{vip}:80/"),
        "http://server.shop.svc.cluster.local/".to_owned(),
    ] {
        let got = client
            .ns
            .exec(&["curl", "-sS", "--max-time", "5", &target])
            .unwrap_or_else(|e| format!("error: {e}"));
        assert_eq!(
            got.trim(),
            format!("peer={}", client.ip),
            "{target}\n{}",
            istio_zt.logs()
        );
    }
    let got = server
        .ns
        .exec(&["curl", "-sS", "--max-time", "5", &format!("http://{}:8080/", client.ip)])
        .unwrap_or_else(|e| format!("error: {e}"));
    assert_eq!(got.trim(), format!("peer={}", server.ip), "{}", istio_zt.logs());
    // The server pod's certificate came from our CA, asked for by the node proxy.
    let dump = wait_dump(&istio_zt, "a certificate for the server pod", |d| {
        istio::dumped_certificates(d)
            .iter()
            .any(|(id, state)| id == "spiffe://cluster.local/ns/shop/sa/server" && state.contains("Available"))
    })
    .await;
    // A plain pod reaches the server in plaintext until a STRICT PeerAuthentication from our
    // controller, which Istio's ztunnel then enforces.
    let plain = cluster
        .add_pod_without_mesh(0, PodSpec::new("plain", "legacy", &[]))
        .expect("plain pod");
    let direct = format!("http://{}:8080/", server.ip);
    let curl_plain = || {
        plain
            .ns
            .exec(&["curl", "-sS", "--max-time", "3", &direct])
            .unwrap_or_else(|e| format!("error: {e}"))
    };
    assert_eq!(curl_plain().trim(), format!("peer={}", plain.ip), "{}", istio_zt.logs());
    cluster
        .write_manifest("strict.yaml", STRICT)
        .expect("PeerAuthentication");
    let deadline = Instant::now() + READY;
    while curl_plain().contains("peer=") {
        assert!(
            Instant::now() < deadline,
            "STRICT not enforced by Istio's ztunnel:\n{}",
            istio_zt.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Mesh traffic still passes.
    let got = client
        .ns
        .exec(&["curl", "-sS", "--max-time", "5", &direct])
        .unwrap_or_else(|e| format!("error: {e}"));
    assert_eq!(got.trim(), format!("peer={}", client.ip), "{}", istio_zt.logs());
    eprintln!(
        "shared mode: Istio's ztunnel holds {} workloads, certificates {:?}",
        istio::dumped_workloads(&dump).len(),
        istio::dumped_certificates(&dump)
    );
    assert_eq!(controller_nacks(&cluster.controller).await, 0.0);
}

/// Cluster subnet id of the waypoint test.
const WAYPOINT_CLUSTER_ID: u8 = 89;

/// `shop` with our waypoint, a `server` service using it with a 90/10 HTTPRoute split over
/// `server-v1`/`server-v2`, and a `payments` service using it with the L7 payment policy.
fn waypoint_world() -> String {
    use mesh_e2e::waypoint::{base, service};
    let id = WAYPOINT_CLUSTER_ID;
    let mut w = base(id);
    w += &service(id, "server", "app: server", 10, true);
    w += &service(id, "server-v1", "app: server, version: v1", 11, false);
    w += &service(id, "server-v2", "app: server, version: v2", 12, false);
    w += &service(id, "payments", "app: payments", 13, true);
    w += r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server-split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: server, port: 80}]
  rules:
  - backendRefs:
    - {name: server-v1, port: 80, weight: 90}
    - {name: server-v2, port: 80, weight: 10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: payments}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/order-service]}}]
    to: [{operation: {methods: [POST], paths: [/api/v1/payments*]}}]
"#;
    w
}

/// Istio's ztunnel as the client of our waypoint: the client pods are on node 1, served by
/// Istio's ztunnel (shared mode, our node agent); our waypoint and the servers are on node 0
/// with our ztunnel, but for `server-v2`, on node 1 (the waypoint's upstream through Istio's
/// inbound). Istio's ztunnel must send the client's traffic to the waypoint over
/// HBONE, and the waypoint must route (HTTPRoute split) and authorize (L7 policy) on the
/// original client's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ztunnel_client_through_our_waypoint() {
    use mesh_e2e::apps::{named_server, HttpConn};
    use mesh_e2e::cluster::{Cluster, PodSpec};
    use mesh_e2e::waypoint::{identity, Waypoint};
    let Some(peer) = istio::peer().expect("Istio's ztunnel") else {
        return;
    };
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let id = WAYPOINT_CLUSTER_ID;
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(id, 2, &waypoint_world(), &[&wp_id])
        .await
        .expect("cluster up");
    let istio_zt = istio_ztunnel_on_node_1(&cluster, &peer).await;
    let waypoint = Waypoint::start(&cluster, 0, "shop", "waypoint")
        .await
        .expect("waypoint up");
    let mut pods = Vec::new();
    // server-v2 is on Istio's node: the waypoint reaches it through Istio's ztunnel's inbound.
    for (name, node, labels) in [
        ("server-v1", 0, &[("app", "server"), ("version", "v1")][..]),
        ("server-v2", 1, &[("app", "server"), ("version", "v2")][..]),
        ("payments", 0, &[("app", "payments")][..]),
    ] {
        let pod = cluster
            .add_pod(node, PodSpec::new(name, "shop", labels))
            .expect("server pod");
        let name: &'static str = name;
        tokio::spawn(named_server(
            pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen"),
            name,
        ));
        pods.push(pod);
    }
    let order = cluster
        .add_pod(1, PodSpec::new("order-service", "shop", &[]))
        .expect("client pod");
    let frontend = cluster
        .add_pod(1, PodSpec::new("frontend", "shop", &[]))
        .expect("client pod");
    let all: Vec<&mesh_e2e::cluster::Pod> = pods.iter().chain([&order, &frontend]).collect();
    wait_hbone_on_both(&cluster, &istio_zt, &all).await;
    let logs = || format!("Istio:\n{}\nwaypoint:\n{}", istio_zt.logs(), waypoint.logs());

    // The HTTPRoute's 90/10 split, on one keep-alive connection from the Istio-served client.
    let server = SocketAddr::new(cluster.vip(10), 80);
    let mut conn = HttpConn::open(&order.ns, server, "server.shop.svc.cluster.local")
        .await
        .unwrap_or_else(|e| panic!("connect to the server VIP: {e}\n{}", logs()));
    const SPLIT_REQUESTS: usize = 500;
    let mut v2 = 0usize;
    for _ in 0..SPLIT_REQUESTS {
        let a = conn
            .send("GET", "/", &[])
            .await
            .unwrap_or_else(|e| panic!("request through the waypoint: {e}\n{}", logs()));
        assert_eq!(a.status, 200, "{}", a.body);
        // Only the waypoint could have chosen a version: the client dialled the VIP.
        match a.body.lines().next() {
            Some("server-v2") => v2 += 1,
            Some("server-v1") => {}
            other => panic!("answered by {other:?}"),
        }
    }
    let share = v2 as f64 / SPLIT_REQUESTS as f64;
    eprintln!(
        "HTTPRoute split from Istio's ztunnel's client: v2 {:.1}%",
        share * 100.0
    );
    assert!(
        (0.05..=0.15).contains(&share),
        "90/10 split: v2 got {:.1}%",
        share * 100.0
    );

    // The L7 policy on the original client's identity: order-service may POST to
    // /api/v1/payments*, nothing else; frontend may not.
    let payments = SocketAddr::new(cluster.vip(13), 80);
    let mut pay = HttpConn::open(&order.ns, payments, "payments.shop.svc.cluster.local")
        .await
        .expect("connect to payments");
    let ok = pay.send("POST", "/api/v1/payments", &[]).await.expect("POST");
    assert_eq!(ok.status, 200, "{}\n{}", ok.body, logs());
    assert_eq!(pay.send("GET", "/api/v1/payments", &[]).await.expect("GET").status, 403);
    assert_eq!(
        pay.send("POST", "/api/v1/refunds", &[]).await.expect("POST").status,
        403
    );
    let mut other = HttpConn::open(&frontend.ns, payments, "payments.shop.svc.cluster.local")
        .await
        .expect("connect from frontend");
    let denied = other.send("POST", "/api/v1/payments", &[]).await.expect("POST");
    assert_eq!(denied.status, 403, "another principal must be refused: {}", denied.body);

    // The waypoint saw the clients' own identities (only HBONE from Istio's ztunnel, with
    // the certificates it got for them from our CA, carries those).
    let metrics = waypoint.metrics().await.expect("waypoint metrics");
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"waypoint\""))
        .collect();
    let has = |code: &str, principal: &str, service: &str| {
        series.iter().any(|l| {
            l.contains(&format!("response_code=\"{code}\""))
                && l.contains(&format!(
                    "source_principal=\"spiffe://cluster.local/ns/shop/sa/{principal}\""
                ))
                && l.contains(&format!("destination_service=\"{service}.shop.svc.cluster.local\""))
        })
    };
    for (code, principal, service) in [
        ("200", "order-service", "server"),
        ("200", "order-service", "payments"),
        ("403", "order-service", "payments"),
        ("403", "frontend", "payments"),
    ] {
        assert!(
            has(code, principal, service),
            "no {code} series for {principal} -> {service}:\n{}",
            series.join("\n")
        );
    }
    // Istio's ztunnel, on its side, sent those connections to the waypoint's identity.
    let theirs = istio_zt.metrics().await.expect("Istio metrics");
    let to_waypoint = theirs.lines().find(|l| {
        l.starts_with("istio_tcp_connections_opened_total{")
            && l.contains("reporter=\"source\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/order-service\"")
            && l.contains(&format!("destination_principal=\"{wp_id}\""))
    });
    let to_waypoint = to_waypoint.unwrap_or_else(|| panic!("no connection to the waypoint:\n{theirs}"));
    eprintln!("Istio's ztunnel: {to_waypoint}");
    // And it admitted the waypoint's connections to server-v2 on its inbound side.
    assert!(
        theirs
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("source_principal=\"{wp_id}\""))
                && l.contains("destination_workload=\"server-v2\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "no inbound connection from the waypoint to server-v2:\n{theirs}"
    );
    assert_eq!(controller_nacks(&cluster.controller).await, 0.0);
}
