//! Ingress gateway resources over the real Delta ADS server: they carry the listeners'
//! private keys, so a client gets only the gateway its own identity runs (wildcard or by
//! name), and another caller (a ztunnel, another gateway) gets none.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use controller::ca::BootstrapTokens;
use controller::model::Inputs;
use controller::source::manifest_dir::{parse_text, Loaded};
use controller::translate::{translate, Options};
use controller::xds::{AdsServer, Snapshot, XdsMetrics};
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_proto::INGRESS_GATEWAY_TYPE_URL as INGRESS;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Streaming;

const GATEWAY_TOKEN: &str = "gateway-secret-0123456789";
const ZTUNNEL_TOKEN: &str = "ztunnel-secret-0123456789";
const TOKENS: &str = "\
- {token: gateway-secret-0123456789, identity: spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway}
- {token: ztunnel-secret-0123456789, identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel, node: node-1}
";

fn secret(name: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["*.example.com".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let indent = |pem: String| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: istio-system}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
        indent(cert.pem()),
        indent(key.serialize_pem())
    )
}

fn gateway(name: &str, secret: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: istio-system}}\n\
         spec:\n  gatewayClassName: istio\n  listeners:\n  - name: https\n    port: 443\n    protocol: HTTPS\n    \
         hostname: \"*.example.com\"\n    tls: {{certificateRefs: [{{name: {secret}}}]}}\n---\n"
    )
}

struct Client {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

async fn connect(addr: std::net::SocketAddr, token: &str) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (requests, rx) = mpsc::channel(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut request = tonic::Request::new(stream);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(request)
        .await
        .expect("authenticated")
        .into_inner();
    Client { requests, responses }
}

impl Client {
    async fn subscribe(&self, names: &[&str]) {
        let r = DeltaDiscoveryRequest {
            type_url: INGRESS.to_owned(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.requests.send(r).await.unwrap();
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.responses.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .expect("stream open")
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|x| x.name.as_str()).collect()
}

#[tokio::test]
async fn ingress_resources_go_only_to_their_gateway() {
    let (snapshots, rx) = watch::channel(Arc::new(Snapshot::default()));
    let auth = Arc::new(BootstrapTokens::from_yaml(TOKENS, "test").unwrap());
    let ads = AdsServer::new(rx, auth, XdsMetrics::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let yaml = gateway("istio-ingressgateway", "a-cert")
        + &secret("a-cert")
        + &gateway("other-gw", "b-cert")
        + &secret("b-cert");
    let mut loaded = Loaded::default();
    parse_text(Path::new("test.yaml"), &yaml, &mut loaded);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut inputs = Inputs::default();
    loaded.objects.into_iter().for_each(|o| inputs.apply(o));
    let out = translate(&inputs, &Options::default());
    assert_eq!(out.ingress.gateways.len(), 2);
    snapshots.send_replace(Arc::new(Snapshot::next(&Snapshot::default(), Arc::new(out), None)));

    // The gateway's own identity, by wildcard: its gateway only, keys included.
    let mut gw = connect(addr, GATEWAY_TOKEN).await;
    gw.subscribe(&[]).await;
    let got = gw.next().await;
    assert_eq!(names(&got), ["istio-system/istio-ingressgateway"]);
    let any = got.resources[0].resource.as_ref().expect("body");
    let decoded = mesh_proto::waypoint::IngressGateway::decode(any.value.as_slice()).unwrap();
    assert!(decoded.listeners[0].certificates[0].private_key.contains("PRIVATE KEY"));

    // Another gateway's, asked for by name: nothing.
    gw.subscribe(&["istio-system/other-gw"]).await;
    // A ztunnel: nothing by wildcard, nothing by name.
    let mut zt = connect(addr, ZTUNNEL_TOKEN).await;
    zt.subscribe(&[]).await;
    let first = zt.next().await;
    assert!(first.resources.is_empty(), "{:?}", names(&first));
    zt.subscribe(&["istio-system/istio-ingressgateway"]).await;
    let quiet = tokio::time::timeout(Duration::from_millis(300), zt.responses.message()).await;
    match quiet {
        Err(_) => {}
        Ok(Ok(Some(r))) => assert!(r.resources.is_empty(), "a ztunnel got {:?}", names(&r)),
        Ok(other) => panic!("stream ended: {other:?}"),
    }
    let quiet = tokio::time::timeout(Duration::from_millis(300), gw.responses.message()).await;
    match quiet {
        Err(_) => {}
        Ok(Ok(Some(r))) => assert!(r.resources.is_empty(), "the gateway got {:?}", names(&r)),
        Ok(other) => panic!("stream ended: {other:?}"),
    }
}
