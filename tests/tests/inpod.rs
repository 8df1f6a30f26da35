//! In-pod mode end to end: one ztunnel in a node namespace serves two captured pods whose
//! network namespaces a (test) node agent hands over on a real ZDS socket. Listeners and
//! upstream sockets live inside each pod; the agent's Add/Keep/Del/SnapshotSent drive them.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use mesh_core::zds::{ZdsConn, ZdsListener};
use mesh_e2e::apps::{echo_connect, echo_server, ping};
use mesh_e2e::{Bed, Netns, Ztunnel};
use mesh_proto::workload::zds::{self, workload_request::Payload, WorkloadRequest, WorkloadResponse};

const A_UID: &str = "cluster1//Pod/default/client";
const B_UID: &str = "cluster1//Pod/default/server";

/// Sends one request (with the pod's namespace fd for an Add) and returns the ack's error.
async fn request(conn: &ZdsConn, payload: Payload, netns: Option<&Netns>) -> String {
    let file = netns.map(|ns| File::open(format!("/var/run/netns/{}", ns.name)).unwrap());
    conn.send(
        &WorkloadRequest { payload: Some(payload) },
        file.as_ref().map(|f| f.as_fd()),
    )
    .await
    .unwrap();
    let (resp, _) = tokio::time::timeout(Duration::from_secs(10), conn.recv::<WorkloadResponse>())
        .await
        .expect("ztunnel acks within 10 s")
        .unwrap();
    match resp.payload {
        Some(zds::workload_response::Payload::Ack(a)) => a.error,
        None => panic!("response without ack"),
    }
}

fn add(uid: &str) -> Payload {
    Payload::Add(zds::AddWorkload {
        uid: uid.into(),
        workload_info: None,
    })
}

async fn hello(listener: &ZdsListener) -> ZdsConn {
    let conn = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("ztunnel connects")
        .unwrap();
    let (h, fd) = conn.recv::<zds::ZdsHello>().await.unwrap();
    assert_eq!(h.version, zds::Version::V1 as i32);
    assert!(fd.is_none());
    conn
}

async fn ready(z: &Ztunnel<'_>) -> bool {
    matches!(z.get("127.0.0.1:15021", "/healthz/ready").await, Ok((200, _)))
}

/// A node namespace with the socket a test agent serves ZDS on.
struct Node {
    ns: Netns,
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    listener: ZdsListener,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ztunnel.sock");
        let listener = ZdsListener::bind(&sock).unwrap();
        Node {
            ns: Netns::new("node").unwrap(),
            _dir: dir,
            sock,
            listener,
        }
    }

    /// Starts ztunnel here; the agent hands it `pods` (uid, namespace) and the snapshot.
    async fn serve<'a>(&'a self, bed: &Bed, pods: &[(&str, &Netns)]) -> (Ztunnel<'a>, ZdsConn) {
        let agent = async {
            let conn = hello(&self.listener).await;
            for (uid, ns) in pods {
                assert_eq!(request(&conn, add(uid), Some(ns)).await, "");
            }
            let snapshot = Payload::SnapshotSent(zds::SnapshotSent {});
            assert_eq!(request(&conn, snapshot, None).await, "");
            conn
        };
        let zds_arg = self.sock.to_string_lossy().into_owned();
        let (args, files) = (["--zds-socket", zds_arg.as_str()], bed.files());
        let (z, conn) = tokio::join!(Ztunnel::start(&self.ns, &files, &args), agent);
        (z.unwrap(), conn)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ztunnel_serves_pods_handed_over_by_zds() {
    let Some(bed) = Bed::new(50) else { return };
    let node = Netns::new("node").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ztunnel.sock");
    let listener = ZdsListener::bind(&sock).unwrap();
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let dst = SocketAddr::new(bed.ip(2), 9000);
    let zds_arg = sock.to_string_lossy().into_owned();
    let files = bed.files();

    // ztunnel becomes ready only after the agent's snapshot.
    let agent = async {
        let conn = hello(&listener).await;
        assert_eq!(request(&conn, add(A_UID), Some(&bed.a)).await, "");
        assert_eq!(request(&conn, add(B_UID), Some(&bed.b)).await, "");
        // Bad requests are answered with an error, and the session goes on.
        assert!(request(&conn, add("no-fd"), None)
            .await
            .contains("no network namespace"));
        let keep_unknown = Payload::Keep(zds::KeepWorkload { uid: "ghost".into() });
        assert!(request(&conn, keep_unknown, None).await.contains("not served"));
        assert_eq!(
            request(&conn, Payload::SnapshotSent(zds::SnapshotSent {}), None).await,
            ""
        );
        conn
    };
    let args = ["--zds-socket", zds_arg.as_str()];
    let (z, conn) = tokio::join!(Ztunnel::start(&node, &files, &args), agent);
    let z = z.unwrap();

    // Pod to pod through the one node ztunnel, over HBONE, source address kept.
    let (peer, mut c) = echo_connect(&bed.a, dst).await.unwrap();
    assert_eq!(peer, format!("peer={}", bed.ip(1)));
    assert_eq!(ping(&mut c, "in-pod").await.unwrap(), "in-pod");
    let m = z.metrics().await.unwrap();
    assert!(
        m.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{m}"
    );
    assert!(m
        .lines()
        .any(|l| l.starts_with("ztunnel_connections_refused_total") && l.contains("zds_request_rejected")));

    // The agent restarts: ztunnel reconnects, is not ready until the new snapshot, and drops
    // the pod the snapshot no longer lists (a).
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready(&z).await {
        assert!(Instant::now() < deadline, "still ready without an agent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conn = hello(&listener).await;
    assert!(!ready(&z).await);
    assert_eq!(
        request(&conn, Payload::Keep(zds::KeepWorkload { uid: B_UID.into() }), None).await,
        ""
    );
    assert_eq!(
        request(&conn, Payload::SnapshotSent(zds::SnapshotSent {}), None).await,
        ""
    );
    assert!(ready(&z).await);
    // a is no longer served: its captured connection finds no listener.
    assert!(
        echo_connect(&bed.a, dst).await.is_err(),
        "pod a is still served after the snapshot dropped it"
    );
    // The plain pod still reaches b, whose inbound listener is still served.
    let (peer, _) = echo_connect(&bed.c, dst).await.unwrap();
    assert_eq!(peer, format!("peer={}", bed.ip(3)));

    // Re-adding a and deleting b.
    assert_eq!(request(&conn, add(A_UID), Some(&bed.a)).await, "");
    assert_eq!(
        request(&conn, Payload::Del(zds::DelWorkload { uid: B_UID.into() }), None).await,
        ""
    );
    // b is not served any more: plaintext redirected to its 15006 finds nothing.
    assert!(
        echo_connect(&bed.c, dst).await.is_err(),
        "pod b is still served after DelWorkload"
    );
}

/// A pod that adds another workload's address inside its own namespace (`ip addr add`, as a
/// pod with NET_ADMIN can) does not get that workload's identity: the in-pod proxy serves only
/// the pod the agent handed the namespace over for, and refuses the rest as `not_this_pod`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cannot_borrow_another_workloads_identity_by_taking_its_address() {
    let Some(bed) = Bed::new(51) else { return };
    let victim = std::net::IpAddr::from([10, 77, bed.n, 9]);
    let pair = mesh_e2e::bed::PairEntries::new([bed.ip(1), bed.ip6(1)], [bed.ip(2), bed.ip6(2)], bed.vip());
    let state = format!(
        "workloads:\n{}- uid: cluster1//Pod/default/victim\n  name: victim\n  namespace: default\n  serviceAccount: victim\n  addresses: [\"{victim}\"]\n  protocol: HBONE\n  node: node-a\nservices:\n{}",
        pair.workloads, pair.services
    );
    std::fs::write(&bed.state, state).unwrap();
    bed.a
        .exec(&["ip", "addr", "add", &format!("{victim}/32"), "dev", "lo"])
        .unwrap();
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));
    let node = Node::new();
    let (z, _conn) = node.serve(&bed, &[(A_UID, &bed.a), (B_UID, &bed.b)]).await;
    let dst = SocketAddr::new(bed.vip(), 80);

    // From its own address the pod is served as itself.
    let (_, mut c) = echo_connect(&bed.a, dst).await.unwrap();
    assert_eq!(ping(&mut c, "own").await.unwrap(), "own");
    // From the victim's address it is refused before any identity is used.
    let socket = bed.a.socket(dst).unwrap();
    socket.bind(SocketAddr::new(victim, 0)).unwrap();
    let borrowed = async {
        let mut r = tokio::io::BufReader::new(socket.connect(dst).await?);
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut r, &mut line).await?;
        Ok::<_, std::io::Error>(line)
    };
    let line = tokio::time::timeout(Duration::from_secs(10), borrowed)
        .await
        .expect("the refusal is prompt");
    assert!(
        line.as_deref().map_or(true, str::is_empty),
        "served from a borrowed address: {line:?}"
    );
    let m = z.metrics().await.unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("ztunnel_connections_refused_total") && l.contains("not_this_pod")),
        "{m}"
    );
}

/// An Add for a pod already served, with a different namespace (the pod re-created under the
/// same name on this node), replaces its proxy: the new namespace gets the listeners and the
/// old one loses them. A re-sent Add with the same namespace changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_re_created_in_a_new_namespace_is_served_there() {
    let Some(bed) = Bed::new(52) else { return };
    let node = Node::new();
    let (_z, conn) = node.serve(&bed, &[(A_UID, &bed.a)]).await;
    let hbone = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 15008);
    assert!(bed.a.connect(hbone).await.is_ok(), "pod a is served");
    assert!(bed.c.connect(hbone).await.is_err(), "c is not served yet");

    assert_eq!(request(&conn, add(A_UID), Some(&bed.a)).await, "", "a re-sent Add");
    assert!(bed.a.connect(hbone).await.is_ok(), "a re-sent Add keeps the proxy");
    assert_eq!(request(&conn, add(A_UID), Some(&bed.c)).await, "");
    assert!(bed.c.connect(hbone).await.is_ok(), "the new namespace is served");
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.a.connect(hbone).await.is_ok() {
        assert!(Instant::now() < deadline, "the old namespace is still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
