//! Multicluster data path (issue 17): two networks that cannot route to each other's pods,
//! joined only by network 2's east-west gateway (`waypoint --role east-west`). A client pod
//! on network 1 reaches a server on network 2 with double HBONE: outer mutual TLS to the
//! gateway, inner mutual TLS end to end with the server's ztunnel. Ztunnels and the gateway
//! run from local state files and the development CA (no control plane), so this tests the
//! data plane alone, with the workload fields Istio's control plane serves (`network`,
//! `network_gateway`).
//!
//! The topology ([`Nets`], [`EastWest`]) is in `mesh_e2e::eastwest`, shared with meshbench.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::hbone::{HboneError, HbonePool, PoolKey, Settings, TunnelRequest};
use mesh_core::identity::{CertManager, CertManagerConfig, DevCa, Identity};
use mesh_e2e::apps::{echo_connect, echo_server, ping};
use mesh_e2e::eastwest::{EastWest, Nets, GATEWAY, HOST};
use mesh_e2e::netns::NetnsSockets;
use mesh_e2e::tcpdump::Tcpdump;
use mesh_e2e::Hub;

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

fn counter(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Captures `link` (in `hub`'s namespace) to a pcap file until stopped.
fn capture_link(hub: &Hub, link: &str, file: &std::path::Path) -> Tcpdump {
    let path = file.display().to_string();
    Tcpdump::start(
        &hub.ns.name,
        &[
            "--immediate-mode",
            "-Z",
            "root",
            "-i",
            link,
            "-U",
            "-s",
            "0",
            "-w",
            &path,
        ],
    )
    .expect("tcpdump capture live")
}

/// The TCP packets of a capture as tcpdump prints them.
fn tcp_lines(file: &std::path::Path) -> String {
    let out = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .arg("tcp")
        .output()
        .expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reaches_another_network_through_the_gateway_with_double_hbone() {
    let Some(nets) = Nets::new(94) else { return };
    let za = nets.ztunnel(&nets.a, 1).await.expect("ztunnel ready");
    let zb = nets.ztunnel(&nets.b, 2).await.expect("ztunnel ready");
    let gw = EastWest::start(&nets).await.expect("gateway ready");
    tokio::spawn(echo_server(nets.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));

    // The networks do not route to each other: the server's own address is out of reach.
    let direct = tokio::time::timeout(
        Duration::from_secs(5),
        echo_connect(&nets.a, SocketAddr::new(nets.ip(2, 2), 8080)),
    )
    .await;
    assert!(
        !matches!(direct, Ok(Ok(_))),
        "network 1 reached a pod of network 2 directly"
    );

    let pcap1 = nets.path("outer.pcap");
    let pcap2 = nets.path("inside.pcap");
    let dump1 = capture_link(&nets.hub1, &nets.g_link1, &pcap1);
    let dump2 = capture_link(&nets.hub2, &nets.g_link2, &pcap2);
    const MARKER: &str = "MULTINET-MARKER-4b7e21";
    for round in 0..2 {
        let (_, mut c) = echo_connect(&nets.a, nets.vip())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}; client ztunnel:\n{}", za.logs()));
        for _ in 0..10 {
            assert_eq!(ping(&mut c, MARKER).await.unwrap(), MARKER);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    dump1.stop().expect("tcpdump stopped");
    dump2.stop().expect("tcpdump stopped");

    // Both sides of the gateway carried only TLS on 15008: the marker never crossed in clear,
    // so the gateway, which only relays, never had it either.
    for pcap in [&pcap1, &pcap2] {
        let captured = std::fs::read(pcap).unwrap();
        assert!(captured.len() > 2000, "nothing captured on {}", pcap.display());
        assert!(
            !captured.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "the marker crossed {} in clear",
            pcap.display()
        );
        let text = tcp_lines(pcap);
        assert!(text.lines().count() > 10, "{text}");
        for l in text.lines() {
            assert!(
                l.contains(".15008 ") || l.contains(".15008:"),
                "non-HBONE TCP at the gateway: {l}"
            );
        }
    }
    // Two connections, one outer TLS connection to the gateway (pooled per client and gateway).
    let syns = tcp_lines(&pcap1)
        .lines()
        .filter(|l| l.contains("Flags [S]") && l.contains(&format!("> {}.15008", nets.ip(1, 10))))
        .count();
    assert_eq!(syns, 1, "outer connections opened to the gateway");

    // The server's ztunnel authenticated the client itself (inner mutual TLS end to end).
    let zb_metrics = zb.metrics().await.unwrap();
    let opened = counter(
        &zb_metrics,
        "istio_tcp_connections_opened_total",
        &["reporter=\"destination\"", &format!("source_principal=\"{CLIENT}\"")],
    );
    assert!(
        opened >= 2.0,
        "server ztunnel did not see the client's identity:\n{zb_metrics}"
    );
    let gw_metrics = gw.metrics().await.expect("gateway metrics");
    assert_eq!(
        counter(&gw_metrics, "eastwest_streams_total", &["outcome=\"forwarded\""]),
        2.0,
        "{gw_metrics}"
    );
    let logs = gw.logs();
    assert!(logs.contains("relaying the inner tunnel"), "{logs}");
    assert!(
        logs.contains(HOST),
        "the gateway routed by the service hostname: {logs}"
    );
    drop(za);
}

/// A client for the test to play from the rogue host `x`: identity `who`, certificates from
/// `ca`, sockets in `x`.
fn rogue(nets: &Nets, ca: DevCa) -> Arc<HbonePool> {
    let certs = CertManager::new(Arc::new(ca), vec![], CertManagerConfig::default());
    HbonePool::new(
        Settings::default(),
        certs,
        Arc::new(NetnsSockets {
            name: nets.x.name.clone(),
        }),
    )
}

fn to_gateway(nets: &Nets, who: Identity, authority: &str) -> TunnelRequest {
    TunnelRequest {
        key: PoolKey {
            src_identity: who,
            dst_identities: vec![GATEWAY.parse().unwrap()],
            src_ip: None,
            dst: SocketAddr::new(nets.ip(1, 10), 15008),
        },
        authority: authority.to_owned(),
        forwarded_for: None,
        baggage: None,
        traceparent: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_foreign_identities_and_other_networks() {
    let Some(nets) = Nets::new(95) else { return };
    let _zb = nets.ztunnel(&nets.b, 2).await.expect("ztunnel ready");
    let gw = EastWest::start(&nets).await.expect("gateway ready");
    let client: Identity = CLIENT.parse().unwrap();
    let service = format!("{HOST}:80");

    // A certificate from another root: the outer handshake fails.
    let other = rogue(&nets, DevCa::generate("cluster.local").unwrap());
    let err = other.connect(&to_gateway(&nets, client.clone(), &service)).await.err();
    assert!(
        matches!(
            err,
            Some(HboneError::Tls(_)) | Some(HboneError::H2(_)) | Some(HboneError::Io(_))
        ),
        "{err:?}"
    );

    // Signed by the mesh's root, but an identity of another trust domain: 401.
    let pool = rogue(&nets, nets.ca().expect("development CA"));
    let foreign = Identity::new("evil.example", "default", "client").unwrap();
    let err = pool.connect(&to_gateway(&nets, foreign, &service)).await.err();
    assert!(matches!(err, Some(HboneError::Status(s)) if s == 401), "{err:?}");

    // A mesh identity, but authorities that are not of network 2: 400.
    for authority in [
        "nope.default.svc.cluster.local:80",
        &format!("{}:80", nets.ip(1, 1)),
        &format!("{HOST}:81"),
    ] {
        let err = pool.connect(&to_gateway(&nets, client.clone(), authority)).await.err();
        assert!(
            matches!(err, Some(HboneError::Status(s)) if s == 400),
            "{authority}: {err:?}"
        );
    }

    // A mesh identity and the service's authority: relayed (the answer is the gateway's 200;
    // what follows would be the inner TLS with the server's ztunnel).
    pool.connect(&to_gateway(&nets, client, &service))
        .await
        .expect("relayed");

    let metrics = gw.metrics().await.expect("gateway metrics");
    for (outcome, n) in [
        ("foreign_trust_domain", 1.0),
        ("not_in_network", 3.0),
        ("forwarded", 1.0),
    ] {
        assert_eq!(
            counter(&metrics, "eastwest_streams_total", &[&format!("outcome=\"{outcome}\"")]),
            n,
            "{outcome}:\n{metrics}"
        );
    }
}

/// The root (certificate, key) Istio's ztunnel signs its own certificates with under
/// `FAKE_CA=true`, read out of the peer binary at run time (never copied into this
/// repository): the key is the one that signs leaves chaining to the certificate.
fn istio_test_root(binary: &std::path::Path) -> anyhow::Result<(String, String)> {
    use mesh_core::identity::ca::new_csr;
    let bytes = std::fs::read(binary)?;
    let text = String::from_utf8_lossy(&bytes);
    let blocks = |kind: &str| -> Vec<String> {
        let (begin, end) = (format!("-----BEGIN {kind}-----"), format!("-----END {kind}-----"));
        let mut found = Vec::new();
        let mut rest = &text[..];
        while let Some(i) = rest.find(&begin) {
            let Some(j) = rest[i..].find(&end) else { break };
            found.push(format!("{}\n", &rest[i..i + j + end.len()]));
            rest = &rest[i + j + end.len()..];
        }
        found
    };
    let probe = Identity::new("cluster.local", "default", "probe")?;
    for cert in blocks("CERTIFICATE") {
        let roots = mesh_core::identity::cert::certs_from_pem(&cert)?;
        for key in blocks("PRIVATE KEY") {
            let Ok(ca) = DevCa::from_pem(&cert, &key) else { continue };
            let (_, csr) = new_csr(&probe)?;
            let leaf = ca.issue(&probe, &csr, Duration::from_secs(600))?;
            let chain = mesh_core::identity::cert::certs_from_pem(&leaf)?;
            if mesh_core::tls::verify_workload_chain(&chain, &roots).is_ok() {
                return Ok((cert, key));
            }
        }
    }
    anyhow::bail!("no test root with its key in {}", binary.display())
}

/// Istio's local-file format for network `net`'s view: the same world as [`Nets::state`].
fn istio_state(nets: &Nets, net: u8) -> String {
    let n = nets.id;
    let workload = |ns: &str, name: &str, ips: &str, network: &str, extra: &str| {
        format!(
            "- uid: c//Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {name}\n  \
             trustDomain: cluster.local\n  workloadIps: [{ips}]\n  protocol: HBONE\n  node: node-{name}\n  \
             network: {network}\n  canonicalName: {name}\n  canonicalRevision: v1\n  workloadName: {name}\n{extra}"
        )
    };
    format!(
        "workloads:\n{}{}{}services:\n- name: server\n  namespace: default\n  hostname: {HOST}\n  \
         vips: [\"net{net}/10.96.{n}.10\"]\n  subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/server\"]\n  ports:\n    80: 8080\npolicies: []\n",
        workload("default", "client", &format!("\"10.{n}.1.1\""), "net1", "  services: {}\n"),
        workload(
            "default",
            "server",
            &format!("\"10.{n}.2.2\""),
            "net2",
            &format!(
                "  networkGateway:\n    destination: \"net2/10.{n}.1.10\"\n    hboneMtlsPort: 15008\n  \
                 services: {{\"default/{HOST}\": {{80: 8080}}}}\n"
            ),
        ),
        workload(
            "istio-system",
            "eastwest",
            &format!("\"10.{n}.1.10\", \"10.{n}.2.10\""),
            "net2",
            "  services: {}\n"
        ),
    )
}

/// Makes Istio's test root the root of every process of `nets` started from now on.
fn use_istio_root(nets: &Nets, binary: &std::path::Path) {
    let (cert, key) = istio_test_root(binary).expect("Istio's test root");
    std::fs::write(nets.path("root-cert.pem"), cert).unwrap();
    std::fs::write(nets.path("root-key.pem"), key).unwrap();
}

/// Istio's ztunnel in dedicated mode for `workload` (`ns/name/sa`) on network `net`.
fn istio_env(workload: &str, state: &std::path::Path, net: u8) -> Vec<(&'static str, String)> {
    vec![
        ("PROXY_MODE", "dedicated".to_owned()),
        ("PROXY_WORKLOAD_INFO", workload.to_owned()),
        ("XDS_ADDRESS", String::new()),
        ("CA_ADDRESS", String::new()),
        ("FAKE_CA", "true".to_owned()),
        ("LOCAL_XDS_PATH", state.display().to_string()),
        ("NETWORK", format!("net{net}")),
        ("PACKET_MARK", "1337".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_ztunnel_reaches_another_network_through_our_gateway() {
    let Some(binary) = mesh_e2e::istio::peer().expect("Istio's ztunnel") else {
        return;
    };
    let Some(nets) = Nets::new(96) else { return };
    // One root for all: Istio's ztunnel signs with its built-in test root, so our gateway
    // and server ztunnel sign with it too.
    use_istio_root(&nets, &binary);
    let state = nets.path("istio-net1.yaml");
    std::fs::write(&state, istio_state(&nets, 1)).unwrap();
    let _zb = nets.ztunnel(&nets.b, 2).await.expect("ztunnel ready");
    let gw = EastWest::start(&nets).await.expect("gateway ready");
    tokio::spawn(echo_server(nets.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));
    let env = istio_env("default/client/client", &state, 1);
    let mut za = mesh_e2e::istio::IstioZtunnel::spawn(&nets.a, &binary, &env).unwrap();
    za.wait_ready(Duration::from_secs(20)).await.unwrap();

    let pcap = nets.path("istio-outer.pcap");
    let dump = capture_link(&nets.hub1, &nets.g_link1, &pcap);
    const MARKER: &str = "ISTIO-MULTINET-MARKER-93a0";
    let (_, mut c) = echo_connect(&nets.a, nets.vip())
        .await
        .unwrap_or_else(|e| panic!("{e}; Istio's ztunnel:\n{}\ngateway:\n{}", za.logs(), gw.logs()));
    for _ in 0..10 {
        assert_eq!(ping(&mut c, MARKER).await.unwrap(), MARKER);
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    dump.stop().expect("tcpdump stopped");
    let captured = std::fs::read(&pcap).unwrap();
    assert!(
        !captured.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "marker in clear"
    );
    let gw_metrics = gw.metrics().await.expect("gateway metrics");
    assert_eq!(
        counter(&gw_metrics, "eastwest_streams_total", &["outcome=\"forwarded\""]),
        1.0,
        "{gw_metrics}"
    );
    let zb_metrics = _zb.metrics().await.unwrap();
    let opened = counter(
        &zb_metrics,
        "istio_tcp_connections_opened_total",
        &["reporter=\"destination\"", &format!("source_principal=\"{CLIENT}\"")],
    );
    assert!(
        opened >= 1.0,
        "our server ztunnel did not see Istio's client identity:\n{zb_metrics}"
    );
}

/// The other direction: our ztunnel as the client, Istio's ztunnel serving the destination
/// behind our gateway. Istio's ztunnel accepts our inner handshake and our inner CONNECT,
/// which names the service by hostname as its own client would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_ztunnel_reaches_istio_ztunnel_on_another_network_through_our_gateway() {
    let Some(binary) = mesh_e2e::istio::peer().expect("Istio's ztunnel") else {
        return;
    };
    let Some(nets) = Nets::new(96) else { return };
    use_istio_root(&nets, &binary);
    let state = nets.path("istio-net2.yaml");
    std::fs::write(&state, istio_state(&nets, 2)).unwrap();
    let mut zb =
        mesh_e2e::istio::IstioZtunnel::spawn(&nets.b, &binary, &istio_env("default/server/server", &state, 2)).unwrap();
    zb.wait_ready(Duration::from_secs(20)).await.unwrap();
    let gw = EastWest::start(&nets).await.expect("gateway ready");
    let za = nets.ztunnel(&nets.a, 1).await.expect("ztunnel ready");
    tokio::spawn(echo_server(nets.b.listen("0.0.0.0:8080".parse().unwrap()).unwrap()));

    const MARKER: &str = "TO-ISTIO-MULTINET-MARKER-5c1d";
    let (_, mut c) = echo_connect(&nets.a, nets.vip())
        .await
        .unwrap_or_else(|e| panic!("{e}; our ztunnel:\n{}\nIstio's ztunnel:\n{}", za.logs(), zb.logs()));
    for _ in 0..10 {
        assert_eq!(ping(&mut c, MARKER).await.unwrap(), MARKER);
    }
    drop(c);
    let gw_metrics = gw.metrics().await.expect("gateway metrics");
    assert_eq!(
        counter(&gw_metrics, "eastwest_streams_total", &["outcome=\"forwarded\""]),
        1.0,
        "{gw_metrics}"
    );
    let zb_metrics = zb.metrics().await.unwrap();
    let opened = counter(
        &zb_metrics,
        "istio_tcp_connections_opened_total",
        &["reporter=\"destination\"", &format!("source_principal=\"{CLIENT}\"")],
    );
    assert!(
        opened >= 1.0,
        "Istio's ztunnel did not see our client's identity:\n{zb_metrics}"
    );
}
