//! Property-based fuzzing of every parser a peer or a file controls in mesh-core: the HBONE
//! CONNECT target and `forwarded` header, SPIFFE identities, xDS resources (raw protobuf bytes
//! and structured messages), ZDS packets over a real socket, and the local workload file.
//!
//! Properties: hostile input never panics, accepted values round-trip, and what validation
//! accepts is usable (it lands in the state and evaluates). Case count: `PROPTEST_CASES`
//! (default 256, fast enough for CI); a long run is
//! `PROPTEST_CASES=100000 cargo test --release -p mesh-core --test fuzz`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use http::{Method, Uri};
use mesh_core::hbone::server::{connect_host, connect_target, parse_forwarded};
use mesh_core::identity::Identity;
use mesh_core::rbac::{evaluate, ConnectionInfo};
use mesh_core::state::State;
use mesh_core::zds::{ZdsConn, ZdsError, ZdsListener, MAX_MESSAGE};
use mesh_proto::security as secpb;
use mesh_proto::workload as pb;
use mesh_proto::workload::zds;
use proptest::prelude::*;
use prost::Message;

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
    ]
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// Strings biased towards the characters parsers split on.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9/:;=\"\\[\\]%.,@ -]{0,40}",
        "(for=|For=|spiffe://|/ns/|/sa/|;|\"|\\[|\\]|:|[0-9a-f.]{1,6}){0,12}",
    ]
}

/// Short identifier-like strings, sometimes empty or hostile.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z0-9-]{1,12}", 1 => Just(String::new()), 1 => any::<String>()]
}

/// Address bytes: mostly well-formed IPv4/IPv6, sometimes any length.
fn addr_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| b.to_vec()),
        any::<[u8; 16]>().prop_map(|b| b.to_vec()),
        proptest::collection::vec(any::<u8>(), 0..20),
    ]
}

fn gateway() -> impl Strategy<Value = Option<pb::GatewayAddress>> {
    let dest = prop_oneof![
        (name(), addr_bytes()).prop_map(|(network, address)| {
            pb::gateway_address::Destination::Address(pb::NetworkAddress { network, address })
        }),
        (name(), name()).prop_map(|(namespace, hostname)| {
            pb::gateway_address::Destination::Hostname(pb::NamespacedHostname { namespace, hostname })
        }),
    ];
    proptest::option::of((proptest::option::of(dest), any::<u32>(), any::<u32>()).prop_map(
        |(destination, hbone_mtls_port, hbone_single_tls_port)| pb::GatewayAddress {
            destination,
            hbone_mtls_port,
            hbone_single_tls_port,
        },
    ))
}

fn ports() -> impl Strategy<Value = Vec<pb::Port>> {
    proptest::collection::vec(
        (any::<u32>(), any::<u32>(), -1i32..5).prop_map(|(service_port, target_port, app_protocol)| pb::Port {
            service_port,
            target_port,
            app_protocol,
        }),
        0..4,
    )
}

fn workload() -> impl Strategy<Value = pb::Workload> {
    (
        (name(), name(), name(), proptest::collection::vec(addr_bytes(), 0..4)),
        (name(), -1i32..4, name(), name(), gateway(), gateway()),
        (
            proptest::collection::hash_map(name(), ports(), 0..3),
            proptest::collection::vec(name(), 0..3),
            -1i32..3,
            -1i32..3,
        ),
    )
        .prop_map(
            |(
                (uid, name, namespace, addresses),
                (network, tunnel_protocol, trust_domain, service_account, waypoint, network_gateway),
                (services, authorization_policies, status, network_mode),
            )| pb::Workload {
                uid,
                name,
                namespace,
                addresses,
                network,
                tunnel_protocol,
                trust_domain,
                service_account,
                waypoint,
                network_gateway,
                services: services
                    .into_iter()
                    .map(|(k, ports)| (k, pb::PortList { ports }))
                    .collect(),
                authorization_policies,
                status,
                network_mode,
                ..Default::default()
            },
        )
}

fn service() -> impl Strategy<Value = pb::Service> {
    (
        name(),
        name(),
        name(),
        proptest::collection::vec(
            (name(), addr_bytes()).prop_map(|(network, address)| pb::NetworkAddress { network, address }),
            0..4,
        ),
        ports(),
        proptest::collection::vec(name(), 0..3),
        gateway(),
    )
        .prop_map(
            |(name, namespace, hostname, addresses, ports, subject_alt_names, waypoint)| pb::Service {
                name,
                namespace,
                hostname,
                addresses,
                ports,
                subject_alt_names,
                waypoint,
                ..Default::default()
            },
        )
}

fn string_matches() -> impl Strategy<Value = Vec<secpb::StringMatch>> {
    use secpb::string_match::MatchType;
    let m = prop_oneof![
        name().prop_map(MatchType::Exact),
        name().prop_map(MatchType::Prefix),
        name().prop_map(MatchType::Suffix),
        Just(MatchType::Presence(())),
    ];
    proptest::collection::vec(
        proptest::option::of(m).prop_map(|match_type| secpb::StringMatch { match_type }),
        0..3,
    )
}

fn cidrs() -> impl Strategy<Value = Vec<secpb::Address>> {
    proptest::collection::vec(
        (addr_bytes(), 0u32..200).prop_map(|(address, length)| secpb::Address { address, length }),
        0..3,
    )
}

fn authorization() -> impl Strategy<Value = secpb::Authorization> {
    let matcher = (
        (string_matches(), string_matches(), string_matches(), string_matches()),
        (cidrs(), cidrs(), cidrs(), cidrs()),
        (
            proptest::collection::vec(any::<u32>(), 0..3),
            proptest::collection::vec(any::<u32>(), 0..3),
        ),
    )
        .prop_map(
            |((ns, not_ns, pr, not_pr), (si, not_si, di, not_di), (dp, not_dp))| secpb::Match {
                namespaces: ns,
                not_namespaces: not_ns,
                principals: pr,
                not_principals: not_pr,
                source_ips: si,
                not_source_ips: not_si,
                destination_ips: di,
                not_destination_ips: not_di,
                destination_ports: dp,
                not_destination_ports: not_dp,
                ..Default::default()
            },
        );
    let rules = proptest::collection::vec(matcher, 0..3).prop_map(|matches| secpb::Rules { matches });
    let group = proptest::collection::vec(rules, 0..3).prop_map(|rules| secpb::Group { rules });
    (
        name(),
        name(),
        -1i32..4,
        -1i32..3,
        proptest::collection::vec(group, 0..3),
    )
        .prop_map(|(name, namespace, scope, action, groups)| secpb::Authorization {
            name,
            namespace,
            scope,
            action,
            groups,
            ..Default::default()
        })
}

fn connection() -> impl Strategy<Value = ConnectionInfo> {
    (
        proptest::option::of(("[a-z.]{1,8}", "[a-z0-9-]{1,8}", "[a-z0-9-]{1,8}")),
        ip(),
        socket_addr(),
    )
        .prop_map(|(id, src_ip, dst)| ConnectionInfo {
            src_identity: id.and_then(|(td, ns, sa)| Identity::new(&td, &ns, &sa).ok()),
            src_ip,
            dst,
        })
}

/// Applies resources and evaluates every policy that made it in against `conn`.
fn apply_and_evaluate(addresses: &[pb::Address], policies: &[secpb::Authorization], conn: &ConnectionInfo) {
    let mut state = State::default();
    for a in addresses {
        let accepted = state.apply_address(a).is_ok();
        if let (true, Some(pb::address::Type::Workload(w))) = (accepted, &a.r#type) {
            assert!(
                state.workload(&w.uid).is_some(),
                "accepted workload {:?} is not in the state",
                w.uid
            );
        }
    }
    for p in policies {
        let _ = state.apply_authorization(p);
    }
    let _ = evaluate(state.policies().map(|p| p.as_ref()), conn);
    let _ = state.lookup("", conn.dst.ip());
    for w in state.workloads() {
        let _ = state.policies_for(w).count();
    }
    for s in state.services() {
        let _ = state.endpoints(s);
    }
}

proptest! {
    #[test]
    fn forwarded_never_panics(v in text()) {
        let _ = parse_forwarded(&v);
    }

    #[test]
    fn forwarded_round_trips(addr in socket_addr(), quoted in any::<bool>(), before in "[a-z]{0,6}=[a-z0-9]{0,6}") {
        let v = if quoted { format!("{before}; for=\"{addr}\"") } else { format!("{before};for={addr}") };
        prop_assert_eq!(parse_forwarded(&v), Some(addr));
    }

    #[test]
    fn connect_target_never_panics(method in "[A-Z]{1,8}", uri in text()) {
        if let (Ok(m), Ok(u)) = (Method::from_bytes(method.as_bytes()), uri.parse::<Uri>()) {
            if let Ok(addr) = connect_target(&m, &u) {
                prop_assert_eq!(m, Method::CONNECT);
                prop_assert!(addr.port() != 0);
            }
        }
    }

    #[test]
    fn connect_target_round_trips(addr in socket_addr().prop_filter("port 0 is refused", |a| a.port() != 0)) {
        let uri: Uri = addr.to_string().parse().map_err(|e| TestCaseError::fail(format!("{addr}: {e}")))?;
        prop_assert_eq!(connect_target(&Method::CONNECT, &uri), Ok(addr));
    }

    /// Double HBONE's `hostname:port` authorities: never a panic; what is accepted is a
    /// lowercase DNS name and the plainly written non-zero port.
    #[test]
    fn connect_host_never_panics(uri in text(), host in "[A-Za-z0-9.-]{0,70}", port in "[0-9]{0,7}") {
        if let Ok(u) = uri.parse::<Uri>() {
            let _ = connect_host(&u);
        }
        if let Ok(u) = format!("{host}:{port}").parse::<Uri>() {
            if let Ok((h, p)) = connect_host(&u) {
                prop_assert!(p != 0);
                prop_assert_eq!(&port, &p.to_string());
                prop_assert_eq!(h, host.to_ascii_lowercase());
            }
        }
    }

    #[test]
    fn spiffe_parse_round_trips(s in text()) {
        if let Ok(id) = s.parse::<Identity>() {
            prop_assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn spiffe_structured_round_trips(parts in proptest::collection::vec(prop_oneof![
        Just(String::new()), Just("ns".to_owned()), Just("sa".to_owned()), "[a-z0-9._-]{1,6}", "[A-Za-z0-9%:@ ._-]{1,6}",
    ], 0..7)) {
        let s = format!("spiffe://{}", parts.join("/"));
        if let Ok(id) = s.parse::<Identity>() {
            prop_assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn connect_target_authority_forms(host in prop_oneof![
        ip().prop_map(|ip| match ip { IpAddr::V4(v4) => v4.to_string(), IpAddr::V6(v6) => format!("[{v6}]") }),
        "[0-9.]{1,16}", "\\[[0-9a-f:.%]{1,20}\\]",
    ], port in "[0-9]{0,7}") {
        if let Ok(u) = format!("{host}:{port}").parse::<Uri>() {
            if let Ok(addr) = connect_target(&Method::CONNECT, &u) {
                // The port is named plainly; IPv4 prints back exactly (IPv6 has several forms).
                prop_assert!(addr.port() != 0);
                prop_assert_eq!(&port, &addr.port().to_string());
                if addr.is_ipv4() {
                    prop_assert_eq!(addr.to_string(), format!("{host}:{port}"));
                }
            }
        }
    }

    #[test]
    fn spiffe_valid_identities_parse(td in "[a-z0-9._-]{1,12}", ns in "[a-z0-9._-]{1,12}", sa in "[a-z0-9._-]{1,12}") {
        let s = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        let id: Identity = s.parse().map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
        prop_assert_eq!(id.to_string(), s);
    }

    #[test]
    fn xds_raw_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), conn in connection()) {
        let addresses: Vec<_> = pb::Address::decode(bytes.as_slice()).into_iter().collect();
        let policies: Vec<_> = secpb::Authorization::decode(bytes.as_slice()).into_iter().collect();
        apply_and_evaluate(&addresses, &policies, &conn);
    }

    #[test]
    fn xds_structured_resources(
        workloads in proptest::collection::vec(workload(), 0..4),
        services in proptest::collection::vec(service(), 0..3),
        policies in proptest::collection::vec(authorization(), 0..3),
        conn in connection(),
    ) {
        let addresses: Vec<pb::Address> = workloads
            .into_iter()
            .map(pb::address::Type::Workload)
            .chain(services.into_iter().map(pb::address::Type::Service))
            .map(|t| pb::Address { r#type: Some(t) })
            .collect();
        // Through the wire and back, as the xDS client sees them.
        let decoded: Vec<pb::Address> = addresses
            .iter()
            .map(|a| pb::Address::decode(a.encode_to_vec().as_slice()))
            .collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded, &addresses);
        apply_and_evaluate(&addresses, &policies, &conn);
    }

    #[test]
    fn local_file_never_panics(text in text()) {
        if let Ok(cfg) = mesh_core::xds::workload_file::parse("fuzz.yaml", &text) {
            let _ = cfg.to_state();
        }
    }

    #[test]
    fn local_file_yamlish(entries in proptest::collection::vec(local_entry(), 0..6)) {
        let text = entries.concat();
        if let Ok(cfg) = mesh_core::xds::workload_file::parse("fuzz.yaml", &text) {
            let _ = cfg.to_state();
        }
    }
}

/// Fragments of a local workload file, in the right places often enough to reach validation.
fn local_entry() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("uid"),
        Just("name"),
        Just("namespace"),
        Just("addresses"),
        Just("serviceAccount"),
        Just("trustDomain"),
        Just("network"),
        Just("protocol"),
        Just("hostname"),
        Just("ports"),
        Just("servicePort"),
        Just("targetPort"),
        Just("scope"),
        Just("action"),
        Just("groups"),
        Just("rules"),
        Just("matches"),
        Just("principals"),
        Just("sourceIps"),
        Just("waypoint"),
        Just("services"),
    ];
    let value = prop_oneof![
        Just("[10.0.0.1]".to_owned()),
        Just("[\"::1\", 10.0.0.0/8]".to_owned()),
        Just("[{servicePort: 80, targetPort: 8080}]".to_owned()),
        Just("[{exact: cluster.local/ns/a/sa/b}]".to_owned()),
        Just("HBONE".to_owned()),
        Just("Deny".to_owned()),
        Just("Namespace".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z0-9./:-]{0,16}",
        any::<String>().prop_map(|s| format!("{s:?}")),
    ];
    let head = prop_oneof![
        Just("workloads:\n"),
        Just("services:\n"),
        Just("policies:\n"),
        Just("  - "),
        Just("    "),
        Just(""),
    ];
    (head, key, value).prop_map(|(h, k, v)| format!("{h}{k}: {v}\n"))
}

/// ZDS packets of arbitrary bytes (up to past the size limit) arrive on a real socket; the
/// receiver returns an error or a message, never panics, and the connection stays usable.
#[test]
fn zds_packets_never_panic() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _ctx = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    let listener = ZdsListener::bind(&path).unwrap();
    let client = ZdsConn::connect(&path).unwrap();
    let server = rt.block_on(listener.accept()).unwrap();
    let mut runner = proptest::test_runner::TestRunner::default();
    let packets = proptest::collection::vec(any::<u8>(), 1..MAX_MESSAGE + 64);
    runner
        .run(&(packets, 0u8..3), |(packet, which)| {
            nix::sys::socket::send(server.as_fd().as_raw_fd(), &packet, nix::sys::socket::MsgFlags::empty())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = rt.block_on(async {
                match which {
                    0 => client.recv::<zds::WorkloadRequest>().await.map(|_| ()),
                    1 => client.recv::<zds::WorkloadResponse>().await.map(|_| ()),
                    _ => client.recv::<zds::ZdsHello>().await.map(|_| ()),
                }
            });
            if packet.len() > MAX_MESSAGE {
                prop_assert!(matches!(got, Err(ZdsError::TooLarge)), "{got:?}");
            }
            prop_assert!(!matches!(got, Err(ZdsError::Closed)), "a packet is not a close");
            Ok(())
        })
        .unwrap();
}
