//! Leaving the mesh (issue 15): a pod reaches an external host declared by a ServiceEntry by
//! name (the DNS proxy answers the auto-allocated VIP, ztunnel sends to the entry's endpoint
//! outside the cluster); under the mesh config's REGISTRY_ONLY an unregistered external
//! address is refused (counted as `not_registered`) while registered ones still work, and
//! ALLOW_ANY restores passthrough; nothing restarts. The "internet" is namespaces on the
//! underlay, outside the cluster's pods and the mesh.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mesh_e2e::apps::{named_server, resolve_a, served, HttpConn};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::metrics::sample;

const ID: u8 = 71;
const WAIT: Duration = Duration::from_secs(15);

fn external(n: u8) -> IpAddr {
    Ipv4Addr::new(10, 90, ID, n).into()
}

/// `shop` (ambient) and two ServiceEntries: `api.external.test` (DNS resolution, one endpoint:
/// the external host .200, no address: auto-allocated) and `direct.external.test` (its own
/// address .201, resolution NONE: passthrough to it).
fn world() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.external.test]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: DNS
  endpoints: [{{address: 10.90.{ID}.200}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: direct, namespace: shop}}
spec:
  hosts: [direct.external.test]
  addresses: [10.90.{ID}.201]
  location: MESH_EXTERNAL
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: implicit, namespace: shop}}
spec:
  hosts: [implicit.external.test]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: DNS
"#
    )
}

/// A hosts file for one network namespace, which `ip netns exec` (how the harness starts
/// ztunnel) mounts over /etc/hosts; removed on drop.
struct NetnsHosts(std::path::PathBuf);

impl NetnsHosts {
    fn write(netns: &str, text: &str) -> std::io::Result<NetnsHosts> {
        let dir = std::path::Path::new("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), text)?;
        Ok(NetnsHosts(dir))
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One GET on a new connection from `from`: the status, or the error when refused.
async fn get(from: &mesh_e2e::cluster::Pod, addr: SocketAddr, host: &str) -> Result<u16, String> {
    let mut conn = HttpConn::open(&from.ns, addr, host).await.map_err(|e| e.to_string())?;
    conn.send("GET", "/", &[])
        .await
        .map(|a| a.status)
        .map_err(|e| e.to_string())
}

/// Polls `get` until `want(result)` or the deadline.
async fn until(
    from: &mesh_e2e::cluster::Pod,
    addr: SocketAddr,
    what: &str,
    want: impl Fn(&Result<u16, String>) -> bool,
) -> Result<u16, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = get(from, addr, "x").await;
        if want(&got) {
            return got;
        }
        if Instant::now() > deadline {
            panic!("{what}: {addr} still answers {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn not_registered(cluster: &Cluster) -> f64 {
    let node = &cluster.nodes[0];
    let (code, text) =
        mesh_e2e::ztunnel::http_request(node.ns, SocketAddr::from(([127, 0, 0, 1], 15020)), "GET", "/metrics")
            .await
            .expect("ztunnel metrics");
    assert_eq!(code, 200);
    sample(
        &text,
        "ztunnel_connections_refused_total",
        &["reason=\"not_registered\""],
    )
}

/// The VIP the controller allocated for `host`, from ztunnel's config dump.
async fn vip_of(cluster: &Cluster, host: &str) -> IpAddr {
    let deadline = Instant::now() + WAIT;
    loop {
        let dump = cluster.ztunnel_dump(0).await.expect("config dump");
        let vip = dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["hostname"] == host)
            .and_then(|s| s["vips"].as_array()?.iter().find_map(|v| v[1].as_str()?.parse().ok()));
        match vip {
            Some(IpAddr::V4(v4)) => return v4.into(),
            _ if Instant::now() > deadline => panic!("{host} never reached ztunnel: {dump}"),
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_entries_dns_and_registry_only() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let cluster = Cluster::start(ID, 1, &world()).await.expect("cluster up");
    // ztunnel's resolver knows `implicit.external.test` (the entry with no endpoints: ztunnel
    // resolves its host itself) once restarted under this hosts file.
    let _hosts = NetnsHosts::write(
        cluster.nodes[0].name(),
        &format!("127.0.0.1 localhost\n10.90.{ID}.200 implicit.external.test\n"),
    )
    .expect("hosts file");
    drop(
        cluster.nodes[0]
            .ztunnel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    cluster.replace_ztunnel(0).await.expect("ztunnel restarted");
    // The internet: the entry's endpoint (.200), the entry's own address (.201), and a host
    // nobody registered (.202).
    let (api, direct, stranger) = (
        cluster.add_external(200).expect("external .200"),
        cluster.add_external(201).expect("external .201"),
        cluster.add_external(202).expect("external .202"),
    );
    tokio::spawn(named_server(
        api.listen(SocketAddr::new(external(200), 80)).expect("listen"),
        "egress-api",
    ));
    tokio::spawn(named_server(
        direct.listen(SocketAddr::new(external(201), 8080)).expect("listen"),
        "egress-direct",
    ));
    tokio::spawn(named_server(
        stranger.listen(SocketAddr::new(external(202), 8080)).expect("listen"),
        "egress-stranger",
    ));
    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    cluster
        .wait_workload(&client, true, WAIT)
        .await
        .expect("client advertised");

    // By name: the DNS proxy answers the auto-allocated VIP (240.240.0.0/16), and the VIP
    // leads to the external endpoint.
    let vip = vip_of(&cluster, "api.external.test").await;
    assert!(matches!(vip, IpAddr::V4(v) if v.octets()[..2] == [240, 240]), "{vip}");
    let resolver = Ipv4Addr::new(10, 96, ID, 53).into();
    let answered = resolve_a(&client.ns, resolver, "api.external.test").expect("DNS answer");
    assert_eq!(answered.into_iter().map(IpAddr::from).collect::<Vec<_>>(), vec![vip]);
    let before = served("egress-api");
    assert_eq!(
        get(&client, SocketAddr::new(vip, 80), "api.external.test").await,
        Ok(200)
    );
    assert_eq!(served("egress-api"), before + 1, "the external server answered");
    // resolution DNS without endpoints: ztunnel resolves the host for each connection.
    let implicit = vip_of(&cluster, "implicit.external.test").await;
    assert_ne!(implicit, vip);
    assert_eq!(
        get(&client, SocketAddr::new(implicit, 80), "implicit.external.test").await,
        Ok(200)
    );
    assert_eq!(served("egress-api"), before + 2, "resolved to the external server");
    let unregistered = SocketAddr::new(external(202), 8080);
    assert_eq!(get(&client, unregistered, "x").await, Ok(200), "ALLOW_ANY: passthrough");

    // REGISTRY_ONLY, without restarting anything: the stranger is refused and counted, the
    // registered destinations still work.
    let refused_before = not_registered(&cluster).await;
    cluster
        .controller
        .write_mesh_config("outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n")
        .expect("mesh config");
    let refused = until(&client, unregistered, "REGISTRY_ONLY applied", Result::is_err).await;
    assert!(refused.is_err());
    assert!(not_registered(&cluster).await > refused_before, "refusal counted");
    assert_eq!(
        get(&client, SocketAddr::new(vip, 80), "api.external.test").await,
        Ok(200)
    );
    assert_eq!(
        get(&client, SocketAddr::new(external(200), 80), "x").await,
        Ok(200),
        "an entry's endpoint address is registered"
    );
    assert_eq!(
        get(&client, SocketAddr::new(external(201), 8080), "direct.external.test").await,
        Ok(200),
        "an entry's own address (resolution NONE) is registered"
    );
    let logs = cluster.nodes[0]
        .ztunnel
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|z| z.logs())
        .unwrap_or_default();
    assert!(
        logs.contains("not in the mesh registry") && logs.contains("10.90.71.202:8080"),
        "the refusal's reason is logged"
    );

    // Back to ALLOW_ANY: passthrough again.
    cluster
        .controller
        .write_mesh_config("outboundTrafficPolicy:\n  mode: ALLOW_ANY\n")
        .expect("mesh config");
    assert_eq!(
        until(&client, unregistered, "ALLOW_ANY restored", Result::is_ok).await,
        Ok(200)
    );
}

const WP_ID: u8 = 72;

/// `shop` with a waypoint, and `api.external.test` (endpoint 10.90.72.200) labelled to go
/// through it, with an L7 policy on the entry: only `GET /allowed`.
fn waypoint_world() -> String {
    let mut w = mesh_e2e::waypoint::base(WP_ID);
    w += &format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.external.test]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: DNS
  endpoints: [{{address: 10.90.{WP_ID}.200}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-get-allowed, namespace: shop}}
spec:
  targetRefs: [{{kind: ServiceEntry, group: networking.istio.io, name: api}}]
  action: ALLOW
  rules: [{{to: [{{operation: {{methods: [GET], paths: [/allowed]}}}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: api-route, namespace: shop}}
spec:
  parentRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: api}}]
  rules:
    - filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{add: [{{name: x-egress, value: via-waypoint}}]}}}}]
      backendRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: api, port: 80}}]
"#
    );
    w
}

/// Egress through a waypoint: the entry's traffic goes to the waypoint (never straight out),
/// which applies the AuthorizationPolicy targeting the ServiceEntry by method and path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_waypoint_applies_l7_policy_to_the_external_host() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let wp_id = mesh_e2e::waypoint::identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(WP_ID, 1, &waypoint_world(), &[&wp_id])
        .await
        .expect("cluster up");
    let api = cluster.add_external(200).expect("external .200");
    tokio::spawn(named_server(
        api.listen(SocketAddr::new(Ipv4Addr::new(10, 90, WP_ID, 200).into(), 80))
            .expect("listen"),
        "egress-wp-api",
    ));
    let waypoint = mesh_e2e::waypoint::Waypoint::start(&cluster, 0, "shop", "waypoint")
        .await
        .expect("waypoint up");
    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    cluster
        .wait_workload(&client, true, WAIT)
        .await
        .expect("client advertised");
    let vip = vip_of(&cluster, "api.external.test").await;
    let request = |method: &'static str, path: &'static str| {
        let client = &client;
        async move {
            let mut conn = HttpConn::open(&client.ns, SocketAddr::new(vip, 80), "api.external.test")
                .await
                .map_err(|e| e.to_string())?;
            conn.send(method, path, &[])
                .await
                .map(|a| a.status)
                .map_err(|e| e.to_string())
        }
    };
    let deadline = Instant::now() + WAIT;
    loop {
        match request("GET", "/allowed").await {
            Ok(200) => break,
            other if Instant::now() > deadline => {
                panic!("GET /allowed never succeeded: {other:?}\n{}", waypoint.logs())
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // The HTTPRoute attached to the ServiceEntry applies: the external server sees its header.
    let mut conn = HttpConn::open(&client.ns, SocketAddr::new(vip, 80), "api.external.test")
        .await
        .expect("connect");
    let answer = conn.send("GET", "/allowed", &[]).await.expect("answer");
    assert!(answer.body.contains("h x-egress: via-waypoint"), "{}", answer.body);
    let before = served("egress-wp-api");
    assert_eq!(request("POST", "/").await, Ok(403), "POST / denied at the waypoint");
    assert_eq!(request("GET", "/").await, Ok(403), "GET / is not allowed either");
    assert_eq!(served("egress-wp-api"), before, "denied requests never left the mesh");
    assert_eq!(request("GET", "/allowed").await, Ok(200));
    assert_eq!(served("egress-wp-api"), before + 1);
    // The waypoint's metrics name the external host as the destination service.
    let metrics = waypoint.metrics().await.expect("waypoint metrics");
    for code in ["200", "403"] {
        let labels = [
            "destination_service=\"api.external.test\"",
            &format!("response_code=\"{code}\""),
        ];
        assert!(
            mesh_e2e::metrics::sum(&metrics, "istio_requests_total", &labels) >= 1.0,
            "no {code} for api.external.test in:\n{metrics}"
        );
    }
}

const ISTIO_ID: u8 = 73;

/// The same ServiceEntry state consumed by Istio's ztunnel (shared mode on our node agent, our
/// controller): the auto-allocated VIP of an entry with an IP endpoint, and the own address
/// of a `resolution: NONE` entry, both reach the external hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ztunnel_reaches_external_hosts_by_our_service_entries() {
    let Some(peer) = mesh_e2e::istio::peer().expect("Istio's ztunnel") else {
        return;
    };
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let world = world().replace(&format!("10.90.{ID}."), &format!("10.90.{ISTIO_ID}."));
    let cluster = Cluster::start(ISTIO_ID, 1, &world).await.expect("cluster up");
    let ip = |n: u8| IpAddr::from([10, 90, ISTIO_ID, n]);
    let (api, direct) = (
        cluster.add_external(200).expect("external .200"),
        cluster.add_external(201).expect("external .201"),
    );
    tokio::spawn(named_server(
        api.listen(SocketAddr::new(ip(200), 80)).expect("listen"),
        "istio-egress-api",
    ));
    tokio::spawn(named_server(
        direct.listen(SocketAddr::new(ip(201), 8080)).expect("listen"),
        "istio-egress-direct",
    ));
    drop(
        cluster.nodes[0]
            .ztunnel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(),
    );
    let n0 = &cluster.nodes[0];
    let cp = format!("https://{}:15012", cluster.controller_ip());
    let bundle = cluster.controller.trust_bundle().display().to_string();
    let env: Vec<(&str, String)> = vec![
        ("INPOD_UDS", n0.zds_socket().display().to_string()),
        ("XDS_ADDRESS", cp.clone()),
        ("CA_ADDRESS", cp),
        ("XDS_ROOT_CA", bundle.clone()),
        ("CA_ROOT_CA", bundle),
        (
            "AUTH_TOKEN",
            cluster.controller.token_file(n0.name()).display().to_string(),
        ),
        ("NODE_NAME", n0.name().to_owned()),
        ("POD_NAMESPACE", "istio-system".into()),
        ("POD_NAME", "ztunnel-istio".into()),
        ("SERVICE_ACCOUNT", "ztunnel".into()),
        ("INSTANCE_IP", Cluster::underlay_ip(ISTIO_ID, 0).to_string()),
        ("TRUST_DOMAIN", "cluster.local".into()),
        ("CLUSTER_ID", "Kubernetes".into()),
        ("ZTUNNEL_WORKER_THREADS", "1".into()),
    ];
    let mut istio_zt = mesh_e2e::istio::IstioZtunnel::spawn(n0.ns, &peer, &env).expect("spawn Istio's ztunnel");
    istio_zt.wait_ready(WAIT).await.expect("Istio's ztunnel ready");
    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    // Istio's ztunnel has the entry's service (with our allocated VIP) and the client.
    let deadline = Instant::now() + WAIT;
    let vip = loop {
        let dump = istio_zt.config_dump().await.expect("Istio's config dump");
        let text = dump.to_string();
        let vip = dump["services"].as_array().into_iter().flatten().find_map(|s| {
            if s["hostname"] != "api.external.test" {
                return None;
            }
            let vips = s["vips"].as_array()?;
            vips.iter()
                .filter_map(|v| v.as_str()?.rsplit('/').next()?.parse::<IpAddr>().ok())
                .find(IpAddr::is_ipv4)
        });
        let client_known = text.contains("Kubernetes//Pod/shop/client");
        match vip {
            Some(v) if client_known => break v,
            _ if Instant::now() > deadline => {
                panic!("Istio's ztunnel never had the entry: {text}\n{}", istio_zt.logs())
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(matches!(vip, IpAddr::V4(v) if v.octets()[..2] == [240, 240]), "{vip}");
    let before = served("istio-egress-api");
    let deadline = Instant::now() + WAIT;
    loop {
        match get(&client, SocketAddr::new(vip, 80), "api.external.test").await {
            Ok(200) => break,
            other if Instant::now() > deadline => panic!("VIP through Istio's ztunnel: {other:?}\n{}", istio_zt.logs()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(served("istio-egress-api") > before, "the external server answered");
    assert_eq!(
        get(&client, SocketAddr::new(ip(201), 8080), "direct.external.test").await,
        Ok(200),
        "resolution NONE: passthrough to the entry's own address"
    );
}

const VM_ID: u8 = 74;
const VM_SA: &str = "spiffe://cluster.local/ns/vm/sa/legacy-db";

/// A VM (WorkloadEntry `legacy-db` at 10.90.74.150 in namespace `vm`, HBONE: it runs its own
/// ztunnel) behind the Service `db` (10.96.74.20:80 -> 8080); `shop` is ambient.
fn vm_world(deny: bool) -> String {
    let mut w = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: vm}}
---
# The group is the entry's template: labels, redirection and service account come from it.
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: legacy-db, namespace: vm}}
spec:
  metadata: {{labels: {{app: legacy-db}}, annotations: {{ambient.istio.io/redirection: enabled}}}}
  template: {{serviceAccount: legacy-db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: legacy-db, namespace: vm, annotations: {{istio.io/autoRegistrationGroup: legacy-db}}}}
spec: {{address: 10.90.{VM_ID}.150}}
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: vm}}
spec: {{clusterIP: 10.96.{VM_ID}.20, selector: {{app: legacy-db}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"#
    );
    if deny {
        w += r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-shop-client, namespace: vm}
spec:
  selector: {matchLabels: {app: legacy-db}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
"#;
    }
    w
}

/// A WorkloadEntry "VM" (its labels and service account from a WorkloadGroup) with its own
/// dedicated-mode ztunnel, bootstrapped with a token `meshctl vm token` obtained from the
/// controller for that group (good for the group's service account only): a pod reaches it by the Service VIP over HBONE, the VM's ztunnel sees the
/// pod's identity, and an L4 DENY selecting the VM applies there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_entry_vm_with_its_own_ztunnel_joins_the_mesh() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let key = std::env::temp_dir().join(format!("vm-token-{VM_ID}-{}.key", std::process::id()));
    let _ = std::fs::remove_file(&key);
    let options = mesh_e2e::controller::Options {
        args: vec!["--vm-token-key".to_owned(), key.display().to_string()],
        ..Default::default()
    };
    let cluster = Cluster::start_with_options(VM_ID, 1, &vm_world(false), options)
        .await
        .expect("cluster up");
    // The token from the controller's loopback debug listener, as an operator gets it.
    let out = cluster
        .controller
        .ns
        .command(&mesh_e2e::binary("meshctl"))
        .args(["vm", "token", "--group", "vm/legacy-db"])
        .output()
        .expect("meshctl vm token");
    let _ = std::fs::remove_file(&key);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).expect("ascii");
    let token_file = cluster.controller.dir.path().join("vm.token");
    mesh_e2e::controller::write_private(&token_file, token.trim()).expect("token file");
    let vm = cluster.add_external(150).expect("the VM");
    let vm_ip = IpAddr::from([10, 90, VM_ID, 150]);
    tokio::spawn(named_server(
        vm.listen(SocketAddr::new(vm_ip, 8080)).expect("listen"),
        "vm-db",
    ));
    let cp = format!("https://{}:15012", cluster.controller_ip());
    let args = [
        "--xds-address".to_owned(),
        cp.clone(),
        "--ca-address".to_owned(),
        cp,
        "--trust-bundle".to_owned(),
        cluster.controller.trust_bundle().display().to_string(),
        "--token-file".to_owned(),
        token_file.display().to_string(),
        // No return-path rules on a VM: the app answers ztunnel, not the client's address.
        "--enable-original-source".to_owned(),
        "false".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm_ztunnel = mesh_e2e::Ztunnel::start_raw(&vm, &args)
        .await
        .expect("the VM's ztunnel");
    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    cluster
        .wait_workload(&client, true, WAIT)
        .await
        .expect("client advertised");
    let vip = SocketAddr::new(IpAddr::from([10, 96, VM_ID, 20]), 80);
    let deadline = Instant::now() + WAIT;
    loop {
        match get(&client, vip, "db.vm.svc.cluster.local").await {
            Ok(200) => break,
            other if Instant::now() > deadline => {
                panic!("the VM never answered: {other:?}\n{}", vm_ztunnel.logs())
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // Over HBONE with the pod's identity, as the VM's ztunnel reports it.
    let metrics = vm_ztunnel.metrics().await.expect("VM ztunnel metrics");
    let labels = [
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    // The VM holds the group's identity (its token's, and no other).
    let vm_principal = format!("destination_principal=\"{VM_SA}\"");
    let labels = [labels[0], labels[1], labels[2], vm_principal.as_str()];
    assert!(
        mesh_e2e::metrics::sum(&metrics, "istio_tcp_connections_opened_total", &labels) >= 1.0,
        "{metrics}"
    );
    // An L4 DENY for the client, selecting the VM: enforced by the VM's ztunnel.
    cluster
        .controller
        .write_manifests(&vm_world(true))
        .expect("deny policy");
    until(&client, vip, "DENY applied at the VM", Result::is_err).await.ok();
    assert!(get(&client, vip, "db.vm.svc.cluster.local").await.is_err());
}

const TLS_ID: u8 = 65;

/// The "internet" HTTPS server's record of what reached it.
#[derive(Default, Debug)]
struct Seen {
    /// SNI of every ClientHello (empty: none sent).
    snis: Vec<String>,
    /// DER of the client certificate of every completed handshake (empty: none).
    client_certs: Vec<Vec<u8>>,
    handshakes: usize,
    failed_handshakes: usize,
    /// Connections whose first byte was not a TLS handshake record.
    plaintext: usize,
    /// HTTP requests answered over TLS.
    requests: usize,
}

/// A CA (the internet's, or the client certificates') and a leaf it signs.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let ca = params.self_signed(&ca_key).expect("CA");
        Pki { ca, ca_key }
    }

    /// A leaf for `names` (the first also its common name): (certificate, key).
    fn leaf(&self, names: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).expect("leaf");
        (cert, key)
    }
}

type TlsConfig = std::sync::Arc<tokio_rustls::rustls::ServerConfig>;

fn server_config(cert: &rcgen::Certificate, key: &rcgen::KeyPair, client_ca: Option<&Pki>) -> TlsConfig {
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(pki) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(pki.ca.der().clone()).expect("client CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key DER");
    std::sync::Arc::new(
        builder
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config"),
    )
}

/// Serves HTTPS on `listener` with `config` (swappable while it runs), recording into `seen`.
async fn https_server(
    listener: tokio::net::TcpListener,
    config: std::sync::Arc<std::sync::Mutex<TlsConfig>>,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (config, seen) = (config.clone(), seen.clone());
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            if stream.peek(&mut first).await.unwrap_or(0) == 0 {
                return;
            }
            if first[0] != 0x16 {
                seen.lock().unwrap().plaintext += 1;
                return;
            }
            let acceptor = tokio_rustls::LazyConfigAcceptor::new(Default::default(), stream);
            let Ok(start) = acceptor.await else { return };
            let sni = start.client_hello().server_name().unwrap_or_default().to_owned();
            seen.lock().unwrap().snis.push(sni);
            let cfg = config.lock().unwrap().clone();
            let tls = match start.into_stream(cfg).await {
                Ok(tls) => tls,
                Err(_) => {
                    seen.lock().unwrap().failed_handshakes += 1;
                    return;
                }
            };
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .unwrap_or_default();
            {
                let mut s = seen.lock().unwrap();
                s.handshakes += 1;
                s.client_certs.push(client_cert);
            }
            serve_requests(tls, &seen).await;
        });
    }
}

/// Answers HTTP/1.1 requests without bodies on one connection until it closes.
async fn serve_requests<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
    seen: &std::sync::Mutex<Seen>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stream = tokio::io::BufReader::new(stream);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match stream.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => head.push_str(&line),
            }
        }
        seen.lock().unwrap().requests += 1;
        let body = format!("tls-ok {}\n", head.lines().next().unwrap_or_default());
        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

/// `api.external.test` through the waypoint of `shop`, port 80 -> 443 on the external host
/// .200, with a DestinationRule `tls` (Istio's documented origination shape) and `secrets`.
fn tls_world(tls: &str, secrets: &str) -> String {
    let mut w = mesh_e2e::waypoint::base(TLS_ID);
    w += &format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.external.test]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}]
  resolution: DNS
  endpoints: [{{address: 10.90.{TLS_ID}.200}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api-tls, namespace: shop}}
spec:
  host: api.external.test
  trafficPolicy:
    tls: {tls}
{secrets}"#
    );
    w
}

/// A Secret in `shop` with PEM `fields`.
fn secret(name: &str, fields: &[(&str, &str)]) -> String {
    let data: String = fields.iter().map(|(k, v)| format!("  {k}: |\n{}", indent(v))).collect();
    format!("---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: shop}}\nstringData:\n{data}")
}

/// TLS origination at the egress waypoint (DestinationRule `tls`): the pod speaks plain HTTP
/// to `api.external.test`; the external server sees TLS with the configured SNI (SIMPLE),
/// the Secret's client certificate (MUTUAL, rotated without restart); a server certificate
/// from another CA or without the expected name gives 503 with flag UF (TLS_error), counted,
/// and the server never receives a plaintext request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_waypoint_originates_tls_from_the_destination_rule() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let internet = Pki::new("internet CA");
    let other_ca = Pki::new("some other CA");
    let clients = Pki::new("client CA");
    let (server_cert, server_key) = internet.leaf(&["api.external.test"]);
    let (client1, client1_key) = clients.leaf(&["egress-client-1"]);
    let (client2, client2_key) = clients.leaf(&["egress-client-2"]);
    let ca_pem = internet.ca.pem();
    let simple = secret("internet-ca", &[("ca.crt", &ca_pem)]);
    let simple_world = tls_world(
        "{mode: SIMPLE, sni: secure.external.test, credentialName: internet-ca}",
        &simple,
    );
    let wp_id = mesh_e2e::waypoint::identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(TLS_ID, 1, &simple_world, &[&wp_id])
        .await
        .expect("cluster up");
    let host = cluster.add_external(200).expect("external .200");
    let config = std::sync::Arc::new(std::sync::Mutex::new(server_config(&server_cert, &server_key, None)));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    tokio::spawn(https_server(
        host.listen(SocketAddr::new(IpAddr::from([10, 90, TLS_ID, 200]), 443))
            .expect("listen"),
        config.clone(),
        seen.clone(),
    ));
    let waypoint = mesh_e2e::waypoint::Waypoint::start(&cluster, 0, "shop", "waypoint")
        .await
        .expect("waypoint up");
    let client = cluster
        .add_pod(0, PodSpec::new("client", "shop", &[]))
        .expect("client pod");
    cluster
        .wait_workload(&client, true, WAIT)
        .await
        .expect("client advertised");
    let vip = SocketAddr::new(vip_of(&cluster, "api.external.test").await, 80);
    let get = || async {
        let exchange = async {
            let mut conn = HttpConn::open(&client.ns, vip, "api.external.test")
                .await
                .map_err(|e| e.to_string())?;
            conn.send("GET", "/hello", &[]).await.map_err(|e| e.to_string())
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .unwrap_or_else(|_| Err("no answer in 5 s".to_owned()))
    };
    let until_status = |want: u16, what: &'static str| {
        let get = &get;
        let waypoint = &waypoint;
        async move {
            let deadline = Instant::now() + WAIT;
            loop {
                match get().await {
                    Ok(a) if a.status == want => return a,
                    other if Instant::now() > deadline => {
                        let got = other.map(|a| (a.status, a.body));
                        panic!("{what}: still {got:?}\n{}", waypoint.logs())
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    };

    // SIMPLE: plain HTTP from the pod, TLS with the configured SNI at the server.
    let answer = until_status(200, "SIMPLE origination").await;
    assert!(answer.body.contains("tls-ok GET /hello"), "{}", answer.body);
    for _ in 0..3 {
        assert_eq!(get().await.map(|a| a.status), Ok(200));
    }
    {
        let s = seen.lock().unwrap();
        assert!(
            !s.snis.is_empty() && s.snis.iter().all(|n| n == "secure.external.test"),
            "{s:?}"
        );
        assert!(
            s.client_certs.iter().all(Vec::is_empty),
            "SIMPLE sends no client certificate"
        );
        assert!(s.requests >= 4 && s.handshakes < s.requests, "pooled: {s:?}");
    }

    // MUTUAL: the server requires a client certificate and sees the Secret's.
    *config.lock().unwrap() = server_config(&server_cert, &server_key, Some(&clients));
    let mutual = |cert: &rcgen::Certificate, key: &rcgen::KeyPair| {
        tls_world(
            "{mode: MUTUAL, credentialName: client-cred}",
            &secret(
                "client-cred",
                &[
                    ("tls.crt", &cert.pem()),
                    ("tls.key", &key.serialize_pem()),
                    ("ca.crt", &ca_pem),
                ],
            ),
        )
    };
    cluster
        .controller
        .write_manifests(&mutual(&client1, &client1_key))
        .expect("MUTUAL");
    let deadline = Instant::now() + WAIT;
    while !seen.lock().unwrap().client_certs.contains(&client1.der().to_vec()) {
        assert!(
            Instant::now() < deadline,
            "client certificate never seen\n{}",
            waypoint.logs()
        );
        let _ = get().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get().await.map(|a| a.status), Ok(200));
    // Rotated in the Secret: used from then on, nothing restarted.
    cluster
        .controller
        .write_manifests(&mutual(&client2, &client2_key))
        .expect("rotation");
    let deadline = Instant::now() + WAIT;
    while !seen.lock().unwrap().client_certs.contains(&client2.der().to_vec()) {
        assert!(
            Instant::now() < deadline,
            "rotated certificate never seen\n{}",
            waypoint.logs()
        );
        let _ = get().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get().await.map(|a| a.status), Ok(200));

    // A server certificate from another CA, then one without the expected name: 503 UF
    // (TLS_error), and not one request reaches the server, in plaintext or otherwise.
    *config.lock().unwrap() = server_config(&server_cert, &server_key, None);
    let wrong_ca = tls_world(
        "{mode: SIMPLE, credentialName: other-ca}",
        &secret("other-ca", &[("ca.crt", &other_ca.ca.pem())]),
    );
    let wrong_name = tls_world(
        "{mode: SIMPLE, credentialName: internet-ca, subjectAltNames: [not-api.external.test]}",
        &simple,
    );
    for (world, what) in [(wrong_ca, "CA mismatch"), (wrong_name, "SAN mismatch")] {
        cluster.controller.write_manifests(&world).expect(what);
        let answer = until_status(503, what).await;
        assert!(answer.body.contains("TLS_error"), "{what}: {}", answer.body);
        let before = {
            let s = seen.lock().unwrap();
            (s.requests, s.plaintext)
        };
        for _ in 0..3 {
            assert_eq!(get().await.map(|a| a.status), Ok(503), "{what}");
        }
        let s = seen.lock().unwrap();
        assert_eq!(
            (s.requests, s.plaintext),
            before,
            "{what}: nothing reached the server: {s:?}"
        );
        assert_eq!(s.plaintext, 0, "{what}: never plaintext");
    }
    let metrics = waypoint.metrics().await.expect("waypoint metrics");
    let failed = mesh_e2e::metrics::sum(
        &metrics,
        "istio_requests_total",
        &["response_code=\"503\"", "response_flags=\"UF\""],
    );
    assert!(failed >= 6.0, "503 UF counted: {failed}\n{metrics}");
    let tls_failures = mesh_e2e::metrics::sum(&metrics, "waypoint_upstream_tls_failures_total", &["reason=\"verify\""]);
    assert!(tls_failures >= 2.0, "TLS failures counted: {tls_failures}\n{metrics}");
    assert!(waypoint.logs().contains("TLS origination failed"), "logged");
}
