//! The agent's ZDS server against simulated ztunnels on a real SOCK_SEQPACKET socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use cni_plugin::agent::zds::{EnrolError, ZdsServer};
use mesh_core::zds::{ZdsConn, ZdsListener};
use mesh_proto::workload::zds::{self, workload_request::Payload, WorkloadRequest, WorkloadResponse};

fn netns() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net").unwrap().into()
}

fn info(name: &str) -> zds::WorkloadInfo {
    zds::WorkloadInfo {
        name: name.into(),
        namespace: "default".into(),
        service_account: "sa".into(),
    }
}

/// A fake ztunnel: says hello, then acks everything with `error` ("" = ok).
struct FakeZtunnel {
    conn: ZdsConn,
}

impl FakeZtunnel {
    async fn connect(path: &std::path::Path) -> FakeZtunnel {
        let conn = ZdsConn::connect(path).unwrap();
        conn.send(
            &zds::ZdsHello {
                version: zds::Version::V1 as i32,
            },
            None,
        )
        .await
        .unwrap();
        FakeZtunnel { conn }
    }

    /// Receives the next request and acks it.
    async fn next(&self, error: &str) -> (Payload, bool) {
        let (req, fd) = tokio::time::timeout(Duration::from_secs(5), self.conn.recv::<WorkloadRequest>())
            .await
            .expect("a request within 5 s")
            .unwrap();
        let ack = WorkloadResponse {
            payload: Some(zds::workload_response::Payload::Ack(zds::Ack { error: error.into() })),
        };
        self.conn.send(&ack, None).await.unwrap();
        (req.payload.unwrap(), fd.is_some())
    }
}

async fn server() -> (Arc<ZdsServer>, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let srv = ZdsServer::new();
    tokio::spawn(srv.clone().serve(ZdsListener::bind(&path).unwrap()));
    (srv, dir, path)
}

async fn until_connected(srv: &ZdsServer, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while srv.connected() != n {
        assert!(std::time::Instant::now() < deadline, "expected {n} ztunnels connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn snapshot_then_adds_to_newest_and_dels_to_all() {
    let (srv, _dir, path) = server().await;
    assert_eq!(srv.add_pod("p0", info("p0"), netns()).await, Err(EnrolError::NoZtunnel));

    let z1 = FakeZtunnel::connect(&path).await;
    // Empty snapshot: just SnapshotSent.
    assert!(matches!(z1.next("").await, (Payload::SnapshotSent(_), false)));
    until_connected(&srv, 1).await;

    let (r, z1_got) = tokio::join!(srv.add_pod("p1", info("p1"), netns()), z1.next(""));
    r.unwrap();
    assert!(
        matches!(z1_got, (Payload::Add(ref a), true) if a.uid == "p1"),
        "Add carries the namespace fd"
    );
    assert!(srv.served("p1"), "acked: served once add_pod returns");

    // A second ztunnel (rolling upgrade) gets the snapshot with p1, and takes new pods.
    let z2 = FakeZtunnel::connect(&path).await;
    assert!(matches!(z2.next("").await, (Payload::Add(ref a), true) if a.uid == "p1"));
    assert!(matches!(z2.next("").await, (Payload::SnapshotSent(_), false)));
    until_connected(&srv, 2).await;
    let (r, z2_got) = tokio::join!(srv.add_pod("p2", info("p2"), netns()), z2.next(""));
    r.unwrap();
    assert!(matches!(z2_got, (Payload::Add(ref a), _) if a.uid == "p2"));

    // Del goes to both.
    let (_, d1, d2) = tokio::join!(srv.del_pod("p1"), z1.next(""), z2.next(""));
    assert!(matches!(d1.0, Payload::Del(ref d) if d.uid == "p1"));
    assert!(matches!(d2.0, Payload::Del(ref d) if d.uid == "p1"));
    assert_eq!(srv.pods(), vec!["p2".to_owned()]);
    assert!(!srv.served("p1") && srv.served("p2"));

    // The old ztunnel leaves: only the new one remains, serving p2.
    drop(z1);
    until_connected(&srv, 1).await;
    assert!(srv.served("p2"));
    // Without any ztunnel nobody serves it, though the pod is still enrolled.
    drop(z2);
    until_connected(&srv, 0).await;
    assert!(!srv.served("p2"));
    assert_eq!(srv.pods(), vec!["p2".to_owned()]);
}

#[tokio::test]
async fn a_rejected_or_lost_add_fails_enrolment() {
    let (srv, _dir, path) = server().await;
    let z = FakeZtunnel::connect(&path).await;
    z.next("").await;
    until_connected(&srv, 1).await;
    let (r, _) = tokio::join!(
        srv.add_pod("bad", info("bad"), netns()),
        z.next("cannot enter namespace")
    );
    assert!(matches!(r, Err(EnrolError::Rejected { ref reason, .. }) if reason.contains("cannot enter")));
    assert!(srv.pods().is_empty(), "a rejected pod is not remembered");
    assert!(!srv.served("bad"));

    // The ztunnel vanishes mid-request.
    let add = srv.add_pod("lost", info("lost"), netns());
    let drop_it = async {
        let _ = z.conn.recv::<WorkloadRequest>().await;
        drop(z);
    };
    let (r, _) = tokio::join!(add, drop_it);
    assert!(matches!(r, Err(EnrolError::Lost(_))), "{r:?}");
}

/// The agent's retry of failed captures waits on this rather than capturing while no ztunnel
/// is there: a ztunnel that connected while nobody waited must still be told, once its
/// snapshot is sent (a retry then sees what it rejected).
#[tokio::test]
async fn a_ztunnel_connecting_is_told_to_the_next_wait() {
    let (srv, _dir, path) = server().await;
    let z = FakeZtunnel::connect(&path).await;
    until_connected(&srv, 1).await;
    let (payload, _) = z.next("").await;
    assert!(matches!(payload, Payload::SnapshotSent(_)), "{payload:?}");
    // The wait starts after the connection (and the snapshot's ack) was told.
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::ZERO, srv.ztunnel_connected())
        .await
        .expect("the connection is told to a wait that starts after it");
    // Told once: the next wait is for the next connection.
    assert!(tokio::time::timeout(Duration::ZERO, srv.ztunnel_connected())
        .await
        .is_err());
}

/// A snapshot Add the ztunnel rejects leaves the pod enrolled and unserved, and it is offered
/// again (once the snapshot is sent, and only while no ztunnel serves it).
#[tokio::test]
async fn a_rejected_snapshot_add_can_be_offered_again() {
    let (srv, _dir, path) = server().await;
    srv.restore_pod("p1", info("p1"), netns());
    srv.restore_pod("p2", info("p2"), netns());
    assert!(!srv.unserved(), "no ztunnel: nothing to offer again");
    let z = FakeZtunnel::connect(&path).await;
    assert!(matches!(z.next("no room").await, (Payload::Add(ref a), true) if a.uid == "p1"));
    assert!(matches!(z.next("").await, (Payload::Add(ref a), true) if a.uid == "p2"));
    // Before the snapshot is sent, the snapshot still carries every pod: nothing to offer.
    assert_eq!(srv.reoffer("p1").await, Ok(()));
    assert!(matches!(z.next("").await, (Payload::SnapshotSent(_), false)));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !srv.unserved() {
        assert!(std::time::Instant::now() < deadline, "p1 not seen unserved");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.pods(), vec!["p1".to_owned(), "p2".to_owned()], "p1 stays enrolled");
    assert!(!srv.served("p1") && srv.served("p2"));

    // Rejected again: an error for the retry to back off on.
    let (r, _) = tokio::join!(srv.reoffer("p1"), z.next("still no room"));
    assert!(matches!(r, Err(EnrolError::Rejected { .. })), "{r:?}");
    let (r, got) = tokio::join!(srv.reoffer("p1"), z.next(""));
    r.unwrap();
    assert!(matches!(got, (Payload::Add(ref a), true) if a.uid == "p1"), "{got:?}");
    assert!(srv.served("p1") && !srv.unserved());
    // Served: nothing is sent (the ztunnel would see it next).
    assert_eq!(srv.reoffer("p1").await, Ok(()));
    assert_eq!(srv.reoffer("p2").await, Ok(()));
    let ((), got) = tokio::join!(srv.del_pod("p2"), z.next(""));
    assert!(matches!(got.0, Payload::Del(ref d) if d.uid == "p2"), "{got:?}");
}
