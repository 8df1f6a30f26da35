//! Waypoint credentials (TLS origination's client certificates and keys) over the real Delta
//! ADS server: like ingress gateways' certificates, a `WaypointCredentials` resource goes
//! only to the identity it is named after (the waypoint's namespace and service account),
//! by wildcard or by name; another waypoint or a ztunnel gets none.

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
use mesh_proto::WAYPOINT_CREDENTIALS_TYPE_URL as CREDS;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Streaming;

const EGRESS_TOKEN: &str = "egress-waypoint-secret-0123456789";
const OTHER_TOKEN: &str = "other-waypoint-secret-0123456789";
const ZTUNNEL_TOKEN: &str = "ztunnel-secret-0123456789";
const TOKENS: &str = "\
- {token: egress-waypoint-secret-0123456789, identity: spiffe://cluster.local/ns/egress/sa/waypoint}
- {token: other-waypoint-secret-0123456789, identity: spiffe://cluster.local/ns/other/sa/waypoint}
- {token: ztunnel-secret-0123456789, identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel, node: node-1}
";

/// Two waypoints (`egress/waypoint`, `other/waypoint`), each in front of an external host
/// with a MUTUAL DestinationRule naming a client certificate Secret in its namespace.
fn world() -> String {
    let mut yaml = String::new();
    for (ns, host) in [("egress", "api.external.test"), ("other", "other.external.test")] {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![format!("client.{ns}")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let indent = |pem: String| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
        yaml += &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: {ns}}}\n\
             spec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: api, namespace: {ns}, labels: {{istio.io/use-waypoint: waypoint}}}}\n\
             spec: {{hosts: [{host}], ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 443}}], \
             resolution: DNS, endpoints: [{{address: 10.90.1.200}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: tls, namespace: {ns}}}\n\
             spec: {{host: {host}, trafficPolicy: {{tls: {{mode: MUTUAL, credentialName: client}}}}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: client, namespace: {ns}}}\ntype: kubernetes.io/tls\n\
             stringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
            indent(cert.pem()),
            indent(key.serialize_pem())
        );
    }
    yaml
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
            type_url: CREDS.to_owned(),
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

    /// Nothing (or only empty responses) arrives for a while.
    async fn quiet(&mut self, who: &str) {
        match tokio::time::timeout(Duration::from_millis(300), self.responses.message()).await {
            Err(_) => {}
            Ok(Ok(Some(r))) => assert!(r.resources.is_empty(), "{who} got {:?}", names(&r)),
            Ok(other) => panic!("stream ended: {other:?}"),
        }
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|x| x.name.as_str()).collect()
}

#[tokio::test]
async fn waypoint_credentials_go_only_to_their_waypoint() {
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
    let mut loaded = Loaded::default();
    parse_text(Path::new("test.yaml"), &world(), &mut loaded);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut inputs = Inputs::default();
    loaded.objects.into_iter().for_each(|o| inputs.apply(o));
    let out = translate(&inputs, &Options::default());
    assert_eq!(
        out.waypoint_credentials.keys().collect::<Vec<_>>(),
        ["egress/waypoint", "other/waypoint"],
        "{:?}",
        out.problems
    );
    snapshots.send_replace(Arc::new(Snapshot::next(&Snapshot::default(), Arc::new(out), None)));

    // The egress waypoint, by wildcard: its own credentials only, key included.
    let mut egress = connect(addr, EGRESS_TOKEN).await;
    egress.subscribe(&[]).await;
    let got = egress.next().await;
    assert_eq!(names(&got), ["egress/waypoint"]);
    let any = got.resources[0].resource.as_ref().expect("body");
    let decoded = mesh_proto::waypoint::WaypointCredentials::decode(any.value.as_slice()).unwrap();
    assert_eq!(decoded.credentials[0].secret, "egress/client");
    assert!(decoded.credentials[0].private_key.contains("PRIVATE KEY"));
    // The other waypoint's, asked for by name: nothing.
    egress.subscribe(&["other/waypoint"]).await;
    egress.quiet("the egress waypoint").await;

    // The other waypoint by name: its own only.
    let mut other = connect(addr, OTHER_TOKEN).await;
    other.subscribe(&["other/waypoint", "egress/waypoint"]).await;
    let got = other.next().await;
    assert_eq!(names(&got), ["other/waypoint"]);
    other.quiet("the other waypoint").await;

    // A ztunnel: nothing by wildcard, nothing by name.
    let mut zt = connect(addr, ZTUNNEL_TOKEN).await;
    zt.subscribe(&[]).await;
    let first = zt.next().await;
    assert!(first.resources.is_empty(), "{:?}", names(&first));
    zt.subscribe(&["egress/waypoint"]).await;
    zt.quiet("a ztunnel").await;
}
