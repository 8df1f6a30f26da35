//! From the controller's self-signed CA to a plug-in CA without a restart, with traffic
//! flowing (issue 16): the controller starts with an empty `cacerts` directory (its own root
//! signs); plug-in files appear whose `root-cert.pem` carries the self-signed root beside the
//! plug-in root, and the controller switches to the plug-in intermediate: every workload
//! certificate is re-issued through it (`openssl verify`), the published bundle holds both
//! roots; then the self-signed root is retired. A client connecting every 20 ms, one on a
//! fresh HBONE connection every 1.5 s, and a connection open throughout: none fails.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_e2e::apps::{echo_connect, echo_server, ping, LoadClient};
use mesh_e2e::cluster::{Cluster, PodSpec};

const ID: u8 = 66;
const WAIT: Duration = Duration::from_secs(15);
const CERT_TTL_SECS: u64 = 10;
/// How far the CA backdates a certificate: a quarter of its lifetime.
const BACKDATE: Duration = Duration::from_millis(CERT_TTL_SECS * 1000 / 4);

const WORLD: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
";

/// A CA certificate and its key.
struct Authority {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Authority {
    fn new(name: &str, parent: Option<&Authority>) -> Authority {
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = match parent {
            None => params.self_signed(&key),
            Some(p) => params.signed_by(&key, &p.cert, &p.key),
        }
        .expect("CA certificate");
        Authority { cert, key }
    }
}

/// Publishes a version of the cacerts directory the way kubelet swaps a Secret: files
/// written under `..vN`, then `..data` (which the file links point into) renamed into place.
fn publish(dir: &std::path::Path, n: u32, ca: &Authority, root: &Authority, bundle: &str) {
    let version = dir.join(format!("..v{n}"));
    std::fs::create_dir(&version).expect("version dir");
    for (file, text) in [
        ("ca-cert.pem", ca.cert.pem()),
        ("ca-key.pem", ca.key.serialize_pem()),
        ("cert-chain.pem", format!("{}{}", ca.cert.pem(), root.cert.pem())),
        ("root-cert.pem", bundle.to_owned()),
    ] {
        std::fs::write(version.join(file), text).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..v{n}"), &tmp).expect("link");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
}

/// `controller_ca_reloads_total{result="applied"}`.
async fn applied(cluster: &Cluster) -> u64 {
    let (_, body) = cluster.controller.get("/metrics").await.expect("controller metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("controller_ca_reloads_total{result=\"applied\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits for the controller's `n`th applied CA change; returns when it was seen.
async fn wait_applied(cluster: &Cluster, n: u64) -> SystemTime {
    mesh_e2e::until("the controller to apply the cacerts change", WAIT, || async {
        applied(cluster).await >= n
    })
    .await;
    SystemTime::now()
}

/// The leaf PEMs both ztunnels hold, once every one was issued after `since`.
async fn reissued_after(cluster: &Cluster, since: SystemTime) -> Vec<String> {
    let floor = (since - BACKDATE).duration_since(UNIX_EPOCH).expect("time").as_secs() + 1;
    let found = Mutex::new(Vec::new());
    let shared = &found;
    mesh_e2e::until("every workload certificate re-issued", WAIT, move || async move {
        let mut leaves = Vec::new();
        for i in 0..2 {
            let Ok(dump) = cluster.ztunnel_dump(i).await else {
                return false;
            };
            let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
            if certs.is_empty() {
                return false;
            }
            for c in certs {
                let fresh = c["state"] == "ready" && c["notBefore"].as_u64().is_some_and(|nb| nb >= floor);
                if !fresh {
                    return false;
                }
                leaves.push(c["chain"].as_str().unwrap_or_default().to_owned());
            }
        }
        *shared.lock().expect("lock") = leaves;
        true
    })
    .await;
    found.into_inner().expect("lock")
}

/// `openssl verify` of `leaf` through `intermediate` to the roots of `bundle`.
fn openssl_verifies(leaf: &str, intermediate: &Authority, bundle: &str) -> bool {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (f, text) in [
        ("leaf.pem", leaf.to_owned()),
        ("chain.pem", intermediate.cert.pem()),
        ("roots.pem", bundle.to_owned()),
    ] {
        std::fs::write(tmp.path().join(f), text).expect("write");
    }
    std::process::Command::new("openssl")
        .args(["verify", "-CAfile", "roots.pem", "-untrusted", "chain.pem", "leaf.pem"])
        .current_dir(tmp.path())
        .output()
        .expect("openssl")
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_to_plug_in_ca_without_restart_fails_no_connection() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let cacerts = tempfile::tempdir().expect("tempdir");
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"] {
        // Dangling until `..data` appears: an empty directory to the controller.
        std::os::unix::fs::symlink(format!("..data/{f}"), cacerts.path().join(f)).expect("link");
    }
    std::env::set_var("CACERTS_DIR", cacerts.path());
    std::env::set_var("CERT_TTL_SECONDS", CERT_TTL_SECS.to_string());
    std::env::set_var("POOL_IDLE_SECONDS", "1");
    let cluster = Cluster::start(ID, 2, WORLD).await.expect("cluster up");
    let self_signed = std::fs::read_to_string(cluster.controller.ca_dir().join("root-cert.pem")).expect("own root");

    let server = cluster.add_pod(1, PodSpec::new("server", "shop", &[])).expect("server");
    let client = cluster.add_pod(0, PodSpec::new("client", "shop", &[])).expect("client");
    let prober = cluster.add_pod(0, PodSpec::new("prober", "shop", &[])).expect("prober");
    for p in [&server, &client, &prober] {
        cluster.wait_workload(p, true, WAIT).await.expect("meshed");
    }
    let dst = SocketAddr::new(server.ip, 9000);
    tokio::spawn(echo_server(server.ns.listen(dst).expect("listen")));
    let (_, mut long) = echo_connect(&client.ns, dst).await.expect("long-lived connection");
    assert_eq!(ping(&mut long, "before").await.expect("ping"), "before");
    let steady = LoadClient::start(client.ns.name.clone(), dst, Duration::from_millis(20));
    let fresh = LoadClient::start(prober.ns.name.clone(), dst, Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(applied(&cluster).await, 0, "no plug-in CA yet");

    // 1. The plug-in CA appears, its bundle carrying the self-signed root beside its own.
    let root = Authority::new("plug-in root", None);
    let inter = Authority::new("plug-in intermediate", Some(&root));
    let both = format!("{self_signed}{}", root.cert.pem());
    publish(cacerts.path(), 1, &inter, &root, &both);
    let t = wait_applied(&cluster, 1).await;
    let published = std::fs::read_to_string(cluster.controller.trust_bundle()).expect("bundle");
    assert_eq!(published.matches("BEGIN CERTIFICATE").count(), 2, "{published}");
    let leaves = reissued_after(&cluster, t).await;
    assert!(
        leaves.iter().all(|l| openssl_verifies(l, &inter, &root.cert.pem())),
        "workload certificates chain through the plug-in intermediate"
    );
    assert_eq!(ping(&mut long, "switched").await.expect("long-lived"), "switched");

    // 2. The self-signed root retired.
    publish(cacerts.path(), 2, &inter, &root, &root.cert.pem());
    let t = wait_applied(&cluster, 2).await;
    reissued_after(&cluster, t).await;
    assert_eq!(ping(&mut long, "retired").await.expect("long-lived"), "retired");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (ok, failed) = steady.finish().await;
    let (fresh_ok, fresh_failed) = fresh.finish().await;
    eprintln!(
        "switch: {ok} connections every 20 ms and {fresh_ok} on fresh HBONE connections, {} failed",
        failed + fresh_failed
    );
    assert_eq!(failed + fresh_failed, 0, "connections failed across the switch");
    assert!(ok > 100 && fresh_ok >= 3, "too little traffic: {ok} and {fresh_ok}");
}
