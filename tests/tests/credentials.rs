//! Control-plane credentials in local mode, tried from inside a pod as an attacker would
//! (issue 19, item 1): the bootstrap token files are private (0600) and unreadable from the
//! pod, the tokens are random (the names they were once derived from get nothing), and so the
//! CA on 15012 signs nothing for the pod: not its neighbours, not pods of other nodes, not the
//! waypoint, not ztunnel. The node's real token, which the test (not the pod) reads, still
//! works for exactly the pods of its node: the attempts could have succeeded.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use mesh_core::identity::ca::{new_csr, CaClient, CaError, CertificateSigner, TokenSource};
use mesh_core::identity::Identity;
use mesh_e2e::cluster::{Cluster, Pod, PodSpec};
use mesh_e2e::netns::NetnsSockets;

const ID: u8 = 84;
const CONTROLLER: &str = "spiffe://cluster.local/ns/istio-system/sa/mesh-controller";
const ZTUNNEL: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
const WAYPOINT: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
/// The uid pods run as here (the test bed shares one filesystem; a pod never has the host's
/// root).
const POD_UID: &str = "65534";

const WORLD: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
";

fn id(s: &str) -> Identity {
    s.parse().expect("identity")
}

/// A CA client whose connections are made inside `pod`, as a process in the pod would.
async fn ca_from(cluster: &Cluster, pod: &Pod, token: TokenSource, impersonate: bool) -> CaClient {
    let bundle = std::fs::read_to_string(cluster.controller.trust_bundle()).expect("trust bundle");
    let roots = mesh_core::identity::cert::certs_from_pem(&bundle).expect("roots");
    let tls = mesh_core::tls::control_plane_client_config(&roots, vec![id(CONTROLLER)]).expect("client TLS");
    let channel = mesh_core::grpc::endpoint(&format!("https://{}:15012", cluster.controller_ip()), Some(tls))
        .expect("endpoint")
        .sockets(Arc::new(NetnsSockets {
            name: pod.ns.name.clone(),
        }))
        .connect()
        .await
        .expect("the CA port is reachable from the pod");
    CaClient::new(channel, token, impersonate)
}

async fn request(client: &CaClient, identity: &str) -> Result<Vec<String>, CaError> {
    let identity = id(identity);
    let (_, csr) = new_csr(&identity).expect("csr");
    client.sign(&identity, csr, std::time::Duration::from_secs(3600)).await
}

/// The names tokens were once derived from, and what a pod can learn: node names (from
/// xDS, `/debug/config`, its own node), identities, the old `<node>-token` and `id-<identity>`
/// forms, and empty or trivial values.
fn guesses(cluster: &Cluster) -> Vec<String> {
    let mut out = vec!["token".to_owned(), "x".to_owned(), "0".repeat(32)];
    for n in &cluster.nodes {
        out.push(format!("{}-token", n.name()));
        out.push(n.name().to_owned());
        out.push(format!("{}.token", n.name()));
    }
    for identity in [WAYPOINT, ZTUNNEL] {
        let body: String = identity
            .trim_start_matches("spiffe://")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        out.push(format!("id-{body}"));
        out.push(identity.to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_obtains_no_certificate_with_any_token_it_can_read_or_guess() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let cluster = Cluster::start_with_identities(ID, 2, WORLD, &[WAYPOINT])
        .await
        .expect("cluster up");
    let attacker = cluster
        .add_pod(0, PodSpec::new("frontend", "shop", &[]))
        .expect("attacker pod");
    let neighbour = cluster
        .add_pod(0, PodSpec::new("orders", "shop", &[]))
        .expect("same-node pod");
    let remote = cluster
        .add_pod(1, PodSpec::new("payments", "shop", &[]))
        .expect("other-node pod");
    for p in [&attacker, &neighbour, &remote] {
        cluster
            .wait_workload(p, true, std::time::Duration::from_secs(15))
            .await
            .expect("pods known to the controller");
    }

    // Every credential file is private to its owner, and a process in the pod cannot read one.
    let files = cluster.controller.credential_files();
    assert!(
        files.len() >= 4,
        "token list, two node tokens, the waypoint's: {files:?}"
    );
    let mut stolen = Vec::new();
    for f in &files {
        let mode = std::fs::metadata(f).expect("credential file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:03o}", f.display());
        let path = f.display().to_string();
        let read = attacker.ns.exec(&[
            "setpriv",
            &format!("--reuid={POD_UID}"),
            &format!("--regid={POD_UID}"),
            "--clear-groups",
            "cat",
            &path,
        ]);
        match read {
            Ok(text) => stolen.push(text.trim().to_owned()),
            Err(e) => assert!(e.to_string().contains("Permission denied"), "{path}: {e}"),
        }
    }
    assert!(stolen.is_empty(), "the pod read credentials: {stolen:?}");

    // Guessed tokens: refused as unauthenticated, whatever identity is asked for, directly or
    // on behalf of a pod (as a node proxy would).
    let own = format!("spiffe://cluster.local/ns/shop/sa/{}", attacker.name);
    let neighbour_id = format!("spiffe://cluster.local/ns/shop/sa/{}", neighbour.name);
    let remote_id = format!("spiffe://cluster.local/ns/shop/sa/{}", remote.name);
    let targets = [WAYPOINT, ZTUNNEL, &own, &neighbour_id, &remote_id];
    let mut attempts = 0;
    for guess in guesses(&cluster) {
        for impersonate in [false, true] {
            let client = ca_from(
                &cluster,
                &attacker,
                TokenSource::Static(guess.as_str().into()),
                impersonate,
            )
            .await;
            for target in targets {
                attempts += 1;
                match request(&client, target).await {
                    Err(CaError::Refused(text)) => {
                        assert!(text.contains("Unauthenticated"), "token {guess:?} for {target}: {text}")
                    }
                    other => panic!("token {guess:?} for {target}: {other:?}"),
                }
            }
        }
    }
    let client = ca_from(&cluster, &attacker, TokenSource::None, true).await;
    assert!(matches!(request(&client, &own).await, Err(CaError::Refused(_))));
    eprintln!("{attempts} guessed-token requests refused");

    // The control: node 0's real token (read by the test, as root) gets certificates for the
    // pods of node 0 only, so the refusals above are the tokens', not the harness's.
    let node0 = TokenSource::File(cluster.controller.token_file(cluster.nodes[0].name()));
    let client = ca_from(&cluster, &attacker, node0, true).await;
    request(&client, &neighbour_id)
        .await
        .expect("node 0's token signs for a pod of node 0");
    match request(&client, &remote_id).await {
        Err(CaError::Refused(text)) => assert!(text.contains("PermissionDenied"), "{text}"),
        other => panic!("node 0's token for a pod of node 1: {other:?}"),
    }
    assert!(
        request(&client, WAYPOINT).await.is_err(),
        "node 0's token must not sign for {WAYPOINT}"
    );
    // The token is the node's ztunnel's own: its identity is signed whether or not the
    // request names it in the impersonation metadata (nothing a pod can read grants it).
    request(&client, ZTUNNEL)
        .await
        .expect("node 0's token signs for its own ztunnel identity");
}
