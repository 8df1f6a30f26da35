//! Property-based fuzzing of what the ingress role reads: the controller's `IngressGateway`
//! resource as raw bytes and as hostile structured values (certificates, ports, host tables),
//! X-Forwarded-For values and host patterns. Nothing panics; a resource for another gateway or
//! a listener without a usable certificate is never served. Case count: `PROPTEST_CASES`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use mesh_core::xds::ResourceSink;
use mesh_proto::waypoint as wp;
use proptest::prelude::*;
use prost::Message;
use waypoint::ingress::{host_matches, remote_ip, Ingress, IngressSink};
use waypoint::store::ConfigStore;

fn sink() -> (std::sync::Arc<Ingress>, IngressSink) {
    let ingress = Ingress::new(("ns".into(), "gw".into()), ConfigStore::new());
    (ingress.clone(), IngressSink(ingress))
}

proptest! {
    #[test]
    fn raw_resources_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (_, sink) = sink();
        let _ = sink.apply(&[("ns/gw".into(), body.as_slice())], &[]);
    }

    #[test]
    fn hostile_listeners_are_never_served_without_a_certificate(
        port in any::<u32>(),
        protocol in proptest::sample::select(&["HTTP", "HTTPS", "TCP", "", "TLS"][..]),
        hostname in "[a-z*.]{0,20}",
        chain in ".{0,200}",
        key in ".{0,200}",
        host in "[a-z*.]{0,20}",
    ) {
        let (ingress, sink) = sink();
        let g = wp::IngressGateway {
            namespace: "ns".into(),
            name: "gw".into(),
            listeners: vec![wp::IngressListener {
                name: "l".into(),
                port,
                protocol: protocol.into(),
                hostname,
                certificates: vec![wp::TlsCertificate { secret: "ns/s".into(), cert_chain: chain, private_key: key }],
                hosts: vec![wp::IngressHost { hostname: host, routes: Some(wp::ServiceRoutes::default()) }],
            }],
            ..Default::default()
        };
        let body = g.encode_to_vec();
        let _ = sink.apply(&[("ns/gw".into(), body.as_slice())], &[]);
        let state = ingress.current.load();
        // Garbage is never a certificate: an HTTPS listener made of it is not served.
        prop_assert!(state.ports.values().all(|p| !p.tls));
        prop_assert!(state.ports.keys().all(|p| *p != 0));
    }

    #[test]
    fn forwarded_for_and_host_patterns_never_panic(
        xff in "[0-9a-f.:, ]{0,64}",
        hops in 0u32..8,
        pattern in "[a-zA-Z*.]{0,16}",
        host in "[a-zA-Z.]{0,16}",
    ) {
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = xff.parse() {
            headers.insert("x-forwarded-for", v);
        }
        let peer: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let ip = remote_ip(&headers, peer, hops);
        if hops == 0 {
            prop_assert_eq!(ip, peer);
        }
        let _ = host_matches(&pattern, &host);
        prop_assert!(host_matches("*", &host));
    }
}
