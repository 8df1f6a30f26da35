//! The node agent's pieces with real ztunnel processes in in-pod mode: pods enrolled through
//! the agent's ZDS server (with its redirection rules already in the pod namespaces), and a
//! rolling upgrade of ztunnel under a steady stream of new connections.

use std::fs::File;
use std::net::SocketAddr;
use std::time::Duration;

use cni_plugin::agent::zds::ZdsServer;
use mesh_core::zds::ZdsListener;
use mesh_e2e::apps::{echo_connect, echo_server, ping, LoadClient};
use mesh_e2e::{Bed, Netns, Ztunnel};
use mesh_proto::workload::zds::WorkloadInfo;

fn netns_fd(ns: &Netns) -> std::os::fd::OwnedFd {
    File::open(format!("/var/run/netns/{}", ns.name)).unwrap().into()
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_of_ztunnel_loses_no_connection() {
    let Some(bed) = Bed::new(60) else { return };
    let (node1, node2) = (Netns::new("n1").unwrap(), Netns::new("n2").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ztunnel.sock");
    let agent = ZdsServer::new();
    tokio::spawn(agent.clone().serve(ZdsListener::bind(&sock).unwrap()));
    tokio::spawn(echo_server(bed.b.listen("0.0.0.0:9000".parse().unwrap()).unwrap()));
    let dst = SocketAddr::new(bed.ip(2), 9000);
    let zds = sock.to_string_lossy().into_owned();
    let files = bed.files();

    // The first ztunnel connects (empty snapshot: ready), then the agent enrols both pods.
    let mut z1 = Ztunnel::start(&node1, &files, &["--zds-socket", &zds, "--drain-seconds", "2"])
        .await
        .unwrap();
    agent
        .add_pod("cluster1//Pod/default/client", info("client"), netns_fd(&bed.a))
        .await
        .unwrap();
    agent
        .add_pod("cluster1//Pod/default/server", info("server"), netns_fd(&bed.b))
        .await
        .unwrap();
    let (peer, mut c) = echo_connect(&bed.a, dst).await.unwrap();
    assert_eq!(peer, format!("peer={}", bed.ip(1)));
    assert_eq!(ping(&mut c, "enrolled").await.unwrap(), "enrolled");
    drop(c);

    // A client opening a new connection every 10 ms for the whole upgrade.
    let load = LoadClient::start(bed.a.name.clone(), dst, Duration::from_millis(10));

    // The new ztunnel starts beside the old one (its snapshot re-adds both pods; listeners
    // share the ports through SO_REUSEPORT), then the old one is told to stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let z2 = Ztunnel::start(&node2, &files, &["--zds-socket", &zds]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    z1.sigterm().unwrap();
    assert_eq!(z1.wait_exit(Duration::from_secs(15)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.finish().await;
    assert!(ok > 50, "only {ok} connections succeeded");
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during the upgrade",
        ok + failed
    );
    // The new ztunnel carries traffic alone now.
    assert!(z2
        .metrics()
        .await
        .unwrap()
        .contains("istio_tcp_connections_opened_total{reporter=\"destination\""));
}
