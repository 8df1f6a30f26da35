//! Your own PKI (issue 16): the controller signs with a plug-in intermediate in Istio's
//! `cacerts` layout, and its root is rotated while traffic flows through ztunnel, in the
//! two-node namespace cluster.
//!
//! The cacerts directory is shaped as a mounted Kubernetes Secret (each file a link into
//! `..data`, which is swapped atomically), and goes through the three steps of a rotation:
//! root B published beside root A, workload certificates re-issued from intermediate B, root A
//! retired. Workload certificates live 10 s (renewed every ~4 s), so each step is waited for
//! by watching every certificate the ztunnels hold be re-issued after the controller applied
//! it. Meanwhile a client opens a connection every 20 ms, a second one every 1.5 s on a fresh
//! HBONE connection (pooled connections idle out after 1 s, so each is a new mTLS handshake
//! with the certificates of the moment), and one connection stays open throughout: none may
//! fail. After retirement a certificate chained only to root A is refused by the server's
//! ztunnel, while the same certificate was accepted before and one from intermediate B is,
//! and a ztunnel started with only root B reaches the controller (whose own serving
//! certificate the rotation re-issued).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::identity::ca::new_csr;
use mesh_core::identity::{DevCa, Identity, WorkloadCertificate};
use mesh_core::tls;
use mesh_e2e::apps::{echo_connect, echo_server, ping, LoadClient};
use mesh_e2e::cluster::{Cluster, PodSpec};
use mesh_e2e::netns::Netns;

const ID: u8 = 76;
const WAIT: Duration = Duration::from_secs(15);
/// Lifetime ztunnels ask for: renewed at half-life (~4 s after issue, with the CA's backdating).
const CERT_TTL_SECS: u64 = 10;
/// How far the CA backdates a certificate: a quarter of its lifetime (at most a minute).
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
        dn.push(rcgen::DnType::OrganizationName, "Example Corp");
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

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// The cacerts directory as kubelet mounts a Secret: each file a link into `..data`, a link
/// to the current version's directory, replaced by one rename.
struct Cacerts {
    dir: tempfile::TempDir,
    version: std::cell::Cell<u32>,
}

const FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"];

impl Cacerts {
    fn new() -> Cacerts {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in FILES {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).expect("link");
        }
        Cacerts {
            dir,
            version: std::cell::Cell::new(0),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Publishes a new version, atomically.
    fn publish(&self, v: &Version<'_>) {
        let Version { ca, parent, roots } = *v;
        let n = self.version.get() + 1;
        self.version.set(n);
        let version = self.path().join(format!("..v{n}"));
        std::fs::create_dir(&version).expect("version dir");
        let bundle: String = roots.iter().map(|r| r.pem()).collect();
        for (file, text) in [
            ("ca-cert.pem", ca.pem()),
            ("ca-key.pem", ca.key.serialize_pem()),
            ("cert-chain.pem", format!("{}{}", ca.pem(), parent.pem())),
            ("root-cert.pem", bundle),
        ] {
            std::fs::write(version.join(file), text).expect("write");
        }
        let tmp = self.path().join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{n}"), &tmp).expect("link");
        std::fs::rename(&tmp, self.path().join("..data")).expect("swap ..data");
    }
}

/// One state of the cacerts directory: `ca` signs, cert-chain.pem is `ca` then `parent` (its
/// root), the bundle is `roots`.
#[derive(Clone, Copy)]
struct Version<'a> {
    ca: &'a Authority,
    parent: &'a Authority,
    roots: &'a [&'a Authority],
}

impl<'a> Version<'a> {
    fn new(ca: &'a Authority, parent: &'a Authority, roots: &'a [&'a Authority]) -> Self {
        Version { ca, parent, roots }
    }

    fn bundle(&self) -> String {
        self.roots.iter().map(|r| r.pem()).collect()
    }
}

/// Publishes `v` as the controller's `n`th change and waits until it applied it and every
/// certificate the ztunnels hold was re-issued after; checks the published bundle, that the
/// leaves chain through `v.ca`, and that the long-lived connection still answers.
async fn step(cluster: &Cluster, cacerts: &Cacerts, n: u64, v: Version<'_>, long: &mut Echo) {
    cacerts.publish(&v);
    let t = applied(cluster, n).await;
    let published = std::fs::read_to_string(cluster.controller.trust_bundle()).expect("published bundle");
    assert_eq!(published, v.bundle(), "step {n}: the published bundle");
    let leaves = reissued_after(cluster, t).await;
    assert!(
        leaves.iter().all(|l| openssl_verifies(l, v.ca, v.parent)),
        "step {n}: workload certificates chain through the signing intermediate"
    );
    let msg = format!("step {n}");
    assert_eq!(ping(long, &msg).await.expect("the long-lived connection"), msg);
}

type Echo = tokio::io::BufReader<tokio::net::TcpStream>;

fn id(s: &str) -> Identity {
    s.parse().expect("identity")
}

/// `controller_ca_reloads_total{result}` from the controller's metrics.
async fn reloads(cluster: &Cluster, result: &str) -> u64 {
    let (_, body) = cluster.controller.get("/metrics").await.expect("controller metrics");
    let prefix = format!("controller_ca_reloads_total{{result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the controller applied its `n`th change; returns when it was seen.
async fn applied(cluster: &Cluster, n: u64) -> SystemTime {
    mesh_e2e::until("the controller to apply the cacerts change", WAIT, move || async move {
        reloads(cluster, "applied").await >= n
    })
    .await;
    SystemTime::now()
}

/// The leaf PEMs of every certificate both ztunnels hold, once each was issued after `since`.
async fn reissued_after(cluster: &Cluster, since: SystemTime) -> Vec<String> {
    // notBefore is the issue time minus the backdating, in whole seconds (rounded down).
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

/// `openssl verify` of `leaf` through `intermediate` to `root`.
fn openssl_verifies(leaf: &str, intermediate: &Authority, root: &Authority) -> bool {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (f, text) in [
        ("leaf.pem", leaf.to_owned()),
        ("chain.pem", intermediate.pem()),
        ("root.pem", root.pem()),
    ] {
        std::fs::write(tmp.path().join(f), text).expect("write");
    }
    std::process::Command::new("openssl")
        .args(["verify", "-CAfile", "root.pem", "-untrusted", "chain.pem", "leaf.pem"])
        .current_dir(tmp.path())
        .output()
        .expect("openssl")
        .status
        .success()
}

/// A certificate for `identity` signed by `ca` (whose key the test holds), trusting `roots`.
fn certificate(identity: &Identity, ca: &Authority, roots: &[&Authority]) -> WorkloadCertificate {
    let signer = DevCa::from_pem(&ca.pem(), &ca.key.serialize_pem()).expect("signer");
    let (key, csr) = new_csr(identity).expect("csr");
    let leaf = signer.issue(identity, &csr, Duration::from_secs(600)).expect("leaf");
    let bundle: String = roots.iter().map(|r| r.pem()).collect();
    WorkloadCertificate::from_chain(identity, key.serialize_der(), &[leaf, ca.pem(), bundle], &[]).expect("cert")
}

/// An HBONE CONNECT to `target` through the ztunnel at `hbone` with `cert`, from `ns`:
/// the response status, or why the connection failed.
async fn hbone_connect(
    ns: &Netns,
    hbone: SocketAddr,
    cert: &WorkloadCertificate,
    server: Identity,
    target: SocketAddr,
) -> Result<u16, String> {
    let attempt = async {
        let config = tls::client_config(cert, vec![server]).map_err(|e| e.to_string())?;
        let tcp = ns.connect(hbone).await.map_err(|e| format!("TCP: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(tls::placeholder_server_name(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = h2::client::handshake(tls).await.map_err(|e| format!("HTTP/2: {e}"))?;
        let conn = tokio::spawn(conn);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .map_err(|e| e.to_string())?;
        let (response, _stream) = sender
            .send_request(request, false)
            .map_err(|e| format!("HTTP/2: {e}"))?;
        let result = response
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| format!("HTTP/2: {e}"));
        conn.abort();
        result
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_with_traffic_flowing_fails_no_connection() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let started = std::time::Instant::now();
    let (root_a, root_b) = (Authority::new("root A", None), Authority::new("root B", None));
    let inter_a = Authority::new("intermediate A", Some(&root_a));
    let inter_b = Authority::new("intermediate B", Some(&root_b));
    let cacerts = Cacerts::new();
    cacerts.publish(&Version::new(&inter_a, &root_a, &[&root_a]));
    // The processes the cluster starts inherit these: the controller's plug-in CA, short
    // workload certificates, pooled HBONE connections that idle out after a second.
    std::env::set_var("CACERTS_DIR", cacerts.path());
    std::env::set_var("CERT_TTL_SECONDS", CERT_TTL_SECS.to_string());
    std::env::set_var("POOL_IDLE_SECONDS", "1");
    let cluster = Cluster::start(ID, 2, WORLD).await.expect("cluster up");
    let published = std::fs::read_to_string(cluster.controller.trust_bundle()).expect("published bundle");
    assert_eq!(published, root_a.pem(), "the plug-in root is the published bundle");

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
    let leaves = reissued_after(&cluster, UNIX_EPOCH + BACKDATE).await;
    assert!(
        leaves.iter().all(|l| openssl_verifies(l, &inter_a, &root_a)),
        "workload certificates chain through intermediate A"
    );

    let steady = LoadClient::start(client.ns.name.clone(), dst, Duration::from_millis(20));
    let fresh = LoadClient::start(prober.ns.name.clone(), dst, Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. Root B published beside root A; certificates re-issued (still by A) carry both.
    let both = [&root_a, &root_b];
    step(&cluster, &cacerts, 1, Version::new(&inter_a, &root_a, &both), &mut long).await;
    // 2. Workload certificates re-issued from intermediate B (root B).
    step(&cluster, &cacerts, 2, Version::new(&inter_b, &root_b, &both), &mut long).await;
    // Until root A is retired a certificate from intermediate A is still accepted.
    let hbone = SocketAddr::new(server.ip, 15008);
    let client_id = id(&format!("spiffe://cluster.local/ns/shop/sa/{}", client.name));
    let server_id = id(&format!("spiffe://cluster.local/ns/shop/sa/{}", server.name));
    let old = certificate(&client_id, &inter_a, &both);
    let node0 = cluster.nodes[0].ns;
    assert_eq!(
        hbone_connect(node0, hbone, &old, server_id.clone(), dst).await,
        Ok(200),
        "a chain to root A before retirement"
    );
    // 3. Root A retired.
    step(
        &cluster,
        &cacerts,
        3,
        Version::new(&inter_b, &root_b, &[&root_b]),
        &mut long,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (ok, failed) = steady.finish().await;
    let (fresh_ok, fresh_failed) = fresh.finish().await;
    eprintln!(
        "rotation: {ok} connections every 20 ms and {fresh_ok} on fresh HBONE connections, {} failed; \
         {:.1} s in all",
        failed + fresh_failed,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(failed + fresh_failed, 0, "connections failed across the rotation");
    assert!(ok > 100 && fresh_ok >= 5, "too little traffic: {ok} and {fresh_ok}");
    assert_eq!(reloads(&cluster, "refused").await, 0, "every step was a usable change");

    after_retirement(&cluster, &old, &Version::new(&inter_b, &root_b, &[&root_b]), &server).await;
}

/// After retirement a certificate chained only to root A (`old`) is refused by the server's
/// ztunnel, the same request with a certificate from the current intermediate is answered,
/// and a ztunnel started now, knowing only the new root, reaches the controller.
async fn after_retirement(
    cluster: &Cluster,
    old: &WorkloadCertificate,
    current: &Version<'_>,
    server: &mesh_e2e::cluster::Pod,
) {
    let (hbone, dst) = (SocketAddr::new(server.ip, 15008), SocketAddr::new(server.ip, 9000));
    let server_id = id(&format!("spiffe://cluster.local/ns/shop/sa/{}", server.name));
    let node0 = cluster.nodes[0].ns;
    let err = hbone_connect(node0, hbone, old, server_id.clone(), dst)
        .await
        .expect_err("a chain to the retired root");
    eprintln!("certificate chained to the retired root: {err}");
    let new = certificate(&old.identity, current.ca, current.roots);
    assert_eq!(
        hbone_connect(node0, hbone, &new, server_id, dst).await,
        Ok(200),
        "a chain to the new root"
    );
    // The controller's own serving certificate was re-issued by the new CA, so a ztunnel
    // trusting only the new root connects (xDS and CA) and becomes ready.
    let late = cluster
        .start_ztunnel_beside(1)
        .await
        .expect("a ztunnel trusting only root B reaches the controller");
    drop(late);
}
