//! The Delta ADS server against a real tonic client over TCP: initial state, incremental
//! update, removal, NACK (not re-sent), reconnect with `initial_resource_versions`, two
//! clients with different subscriptions, addresses by name on demand (as Istio's ztunnel
//! asks for them), and refusal without a valid token.

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
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Status as ErrorDetail};
use mesh_proto::{ADDRESS_TYPE_URL as ADDRESS, AUTHORIZATION_TYPE_URL as AUTHZ};
use tokio::sync::{mpsc, watch};
use tonic::Streaming;

const TOKENS: &str =
    "- {token: node-1-secret-0123456789, identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel, node: node-1}\n";

fn world(extra: &str) -> String {
    format!(
        "\
apiVersion: v1
kind: Pod
metadata: {{name: a, namespace: shop, labels: {{app: a}}, annotations: {{ambient.istio.io/redirection: enabled}}}}
spec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}
status: {{podIP: 10.0.0.1}}
---
apiVersion: v1
kind: Service
metadata: {{name: a, namespace: shop}}
spec: {{clusterIP: 10.96.0.1, selector: {{app: a}}, ports: [{{port: 80}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-all, namespace: shop}}
spec: {{}}
{extra}"
    )
}

const POD_B: &str = "---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop, annotations: {ambient.istio.io/redirection: enabled}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.2}
";

struct Server {
    addr: std::net::SocketAddr,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

impl Server {
    async fn start() -> Server {
        Server::start_with(|ads| ads).await
    }

    async fn start_with(configure: impl FnOnce(AdsServer) -> AdsServer) -> Server {
        Server::start_on(tonic::transport::Server::builder(), configure).await
    }

    async fn start_on(mut builder: tonic::transport::Server, configure: impl FnOnce(AdsServer) -> AdsServer) -> Server {
        let (snapshots, rx) = watch::channel(Arc::new(Snapshot::default()));
        let auth = Arc::new(BootstrapTokens::from_yaml(TOKENS, "test").expect("tokens"));
        let ads = configure(AdsServer::new(rx, auth, XdsMetrics::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(builder.add_service(ads.into_service()).serve_with_incoming(incoming));
        Server { addr, snapshots }
    }

    fn publish(&self, yaml: &str) {
        let mut loaded = Loaded::default();
        parse_text(Path::new("test.yaml"), yaml, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut inputs = Inputs::default();
        loaded.objects.into_iter().for_each(|o| inputs.apply(o));
        let out = translate(&inputs, &Options::default());
        let previous = self.snapshots.borrow().clone();
        self.snapshots
            .send_replace(Arc::new(Snapshot::next(&previous, Arc::new(out), None)));
    }
}

struct Client {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

async fn connect(addr: std::net::SocketAddr, token: &str) -> Result<Client, tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("uri");
    connect_to(endpoint, token).await
}

async fn connect_to(endpoint: tonic::transport::Endpoint, token: &str) -> Result<Client, tonic::Status> {
    connect_sending(endpoint, token, Vec::new()).await
}

/// A stream whose first requests are queued before the call, as proxies open theirs.
async fn connect_sending(
    endpoint: tonic::transport::Endpoint,
    token: &str,
    first: Vec<DeltaDiscoveryRequest>,
) -> Result<Client, tonic::Status> {
    let channel = endpoint.connect().await.expect("connect");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (requests, rx) = mpsc::channel(16);
    for r in first {
        requests.send(r).await.expect("queued");
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut request = tonic::Request::new(stream);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    let responses = client.delta_aggregated_resources(request).await?.into_inner();
    Ok(Client { requests, responses })
}

impl Client {
    async fn send(&self, r: DeltaDiscoveryRequest) {
        self.requests.send(r).await.expect("stream open");
    }

    async fn subscribe(&self, type_url: &str, names: &[&str], versions: &[(&str, &str)]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            initial_resource_versions: versions.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.responses.message())
            .await
            .expect("a response within 5 s")
            .expect("stream ok")
            .expect("stream not closed")
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    let mut n: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    n.sort();
    n
}

/// `n` enrolled pods `p0`... in namespace shop at 10.1.x.y.
fn pods(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: shop, annotations: {{ambient.istio.io/redirection: enabled}}}}\nspec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: 10.1.{}.{}}}\n",
                i / 200,
                i % 200 + 1
            )
        })
        .collect()
}

const WA: &str = "Kubernetes//Pod/shop/a";
const WB: &str = "Kubernetes//Pod/shop/b";
const SA: &str = "shop/a.shop.svc.cluster.local";

/// Istio's ztunnel subscribes to addresses, then policies, in one go: it still gets the
/// policies first, so no workload is known to it before the policies that protect it; a
/// change to both goes out policies first too.
#[tokio::test]
async fn policies_go_out_before_the_workloads_they_protect() {
    let server = Server::start().await;
    server.publish(&world(""));
    let subscribe = |type_url: &str| DeltaDiscoveryRequest {
        type_url: type_url.to_owned(),
        ..Default::default()
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr)).expect("uri");
    let mut a = connect_sending(
        endpoint,
        "node-1-secret-0123456789",
        vec![subscribe(ADDRESS), subscribe(AUTHZ)],
    )
    .await
    .expect("authenticated");
    let first = a.next().await;
    assert_eq!(first.type_url, AUTHZ, "policies first");
    a.ack(&first).await;
    let second = a.next().await;
    assert_eq!(second.type_url, ADDRESS);
    a.ack(&second).await;
    let policy = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-b, namespace: shop}\nspec: {action: DENY, rules: [{}]}\n";
    server.publish(&world(&format!("{POD_B}{policy}")));
    let update = a.next().await;
    assert_eq!((update.type_url.as_str(), names(&update)), (AUTHZ, vec!["shop/deny-b"]));
    a.ack(&update).await;
    let update = a.next().await;
    assert_eq!((update.type_url.as_str(), names(&update)), (ADDRESS, vec![WB]));
}

#[tokio::test]
async fn delta_ads_serves_changes_only() {
    let server = Server::start().await;
    server.publish(&world(""));

    // Initial state.
    let mut a = connect(server.addr, "node-1-secret-0123456789")
        .await
        .expect("authenticated");
    a.subscribe(ADDRESS, &[], &[]).await;
    let first = a.next().await;
    assert_eq!(first.type_url, ADDRESS);
    assert_eq!(names(&first), vec![WA, SA]);
    a.ack(&first).await;
    a.subscribe(AUTHZ, &["*"], &[]).await;
    let policies = a.next().await;
    assert_eq!(names(&policies), vec!["shop/deny-all"]);
    a.ack(&policies).await;
    let versions: Vec<(String, String)> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();

    // Update: a new pod is pushed alone.
    server.publish(&world(POD_B));
    let update = a.next().await;
    assert_eq!(names(&update), vec![WB]);
    assert!(update.removed_resources.is_empty());
    a.ack(&update).await;

    // NACK it: the same version is not sent again; the next change still arrives.
    a.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.to_owned(),
        response_nonce: update.nonce.clone(),
        error_detail: Some(ErrorDetail {
            code: 3,
            message: "workload b: bad".into(),
            details: Vec::new(),
        }),
        ..Default::default()
    })
    .await;
    server.publish(&world(POD_B).replace("10.0.0.1", "10.0.0.9"));
    let after_nack = a.next().await;
    assert_eq!(
        names(&after_nack),
        vec![WA],
        "only the changed pod, not the NACKed one again"
    );

    // Removal.
    server.publish(&world("").replace("10.0.0.1", "10.0.0.9"));
    let removal = a.next().await;
    assert!(removal.resources.is_empty());
    assert_eq!(removal.removed_resources, vec![WB.to_owned()]);

    // Reconnect with the versions held before the update: only what differs comes back.
    drop(a);
    let mut again = connect(server.addr, "node-1-secret-0123456789")
        .await
        .expect("authenticated");
    let held: Vec<(&str, &str)> = versions
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .chain([(WB, "stale")])
        .collect();
    again.subscribe(ADDRESS, &["*"], &held).await;
    let resync = again.next().await;
    assert_eq!(
        names(&resync),
        vec![WA],
        "pod a's address changed since; the service did not"
    );
    assert_eq!(resync.removed_resources, vec![WB.to_owned()]);

    // A second client subscribed to one service only sees that service and the pod behind
    // it (what it needs to connect, as Istio's control plane answers on-demand clients).
    let mut b = connect(server.addr, "node-1-secret-0123456789")
        .await
        .expect("authenticated");
    b.subscribe(ADDRESS, &[SA], &[]).await;
    let only = b.next().await;
    assert_eq!(names(&only), vec![WA, SA]);
    server.publish(
        &world(POD_B)
            .replace("10.0.0.1", "10.0.0.9")
            .replace("10.96.0.1", "10.96.0.7"),
    );
    let b_next = b.next().await;
    assert_eq!(
        names(&b_next),
        vec![SA],
        "the new pod b is not pushed to a client that did not ask for it"
    );
    let a_next = again.next().await;
    assert_eq!(names(&a_next), vec![WB, SA]);
}

#[tokio::test]
async fn streams_without_a_valid_token_are_refused() {
    let server = Server::start().await;
    server.publish(&world(""));
    let status = match connect(server.addr, "wrong").await {
        Ok(mut c) => {
            c.subscribe(ADDRESS, &[], &[]).await;
            c.responses.message().await.expect_err("refused")
        }
        Err(s) => s,
    };
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn a_stream_asking_for_too_many_names_is_ended() {
    let server = Server::start().await;
    server.publish(&world(""));
    let mut client = connect(server.addr, "node-1-secret-0123456789").await.expect("stream");
    let names: Vec<String> = (0..=controller::xds::MAX_NAMES).map(|i| format!("n{i}")).collect();
    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS.to_owned(),
            resource_names_subscribe: names,
            ..Default::default()
        })
        .await;
    let ended = tokio::time::timeout(Duration::from_secs(5), client.responses.message())
        .await
        .expect("an answer within 5 s");
    let status = ended.expect_err("the stream is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("wildcard"),
        "the refusal says what to do: {status}"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_after_the_send_timeout() {
    let server = Server::start_with(|ads| ads.with_send_timeout(Duration::from_millis(300))).await;
    // Enough pods that a few pushes fill the client's HTTP/2 window when it does not read.
    let pods = pods(2000);
    server.publish(&world(&pods));
    let mut client = connect(server.addr, "node-1-secret-0123456789").await.expect("stream");
    client.subscribe(ADDRESS, &[], &[]).await;
    // Never read: every change is another full push the server cannot hand over.
    for round in 0..12 {
        let renamed = pods.replace(
            "namespace: shop",
            &format!("namespace: shop, labels: {{round: r{round}}}"),
        );
        server.publish(&world(&renamed.replace("10.1.", &format!("10.{}.", round + 2))));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The server gave up on the stream: reading now drains what was queued, then it ends.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = client.responses.message().await {}
    })
    .await;
    assert!(
        drained.is_ok(),
        "the stream of a client that stopped reading is ended by the server"
    );
}

/// A client that ACKs every response but answers an HTTP/2 PING late (its runtime blocked
/// between responses, as a starved proxy's is) still gets the whole push: the server reads
/// the ACKs while it pushes, so its keep-alive sees the client alive and never PINGs it.
/// Before, the server read nothing until the push ended, PINGed after the keep-alive
/// interval and dropped the client when the answer came later than the keep-alive timeout.
#[test]
fn a_slow_client_acking_during_a_long_push_keeps_its_stream() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_millis(1000)))
        .http2_keepalive_timeout(Some(Duration::from_millis(200)));
    let server = rt.block_on(Server::start_on(builder, |ads| ads));
    rt.block_on(async { server.publish(&world(&pods(5000))) });
    let (addr, expected) = (server.addr, 5002);
    let client = std::thread::spawn(move || {
        let crt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        crt.block_on(async move {
            // Small windows: the server cannot hand the push to the kernel ahead of the client.
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("uri")
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(65_535);
            let mut client = connect_to(endpoint, "node-1-secret-0123456789").await.expect("stream");
            client.subscribe(ADDRESS, &[], &[]).await;
            let (mut received, mut responses) = (0, 0);
            while received < expected {
                let next = tokio::time::timeout(Duration::from_secs(10), client.responses.message()).await;
                let r = match next {
                    Ok(Ok(Some(r))) => r,
                    other => return Err(format!("after {responses} responses ({received} resources): {other:?}")),
                };
                received += r.resources.len();
                responses += 1;
                client.ack(&r).await;
                // Blocks the whole client runtime, its HTTP/2 connection task included.
                std::thread::sleep(Duration::from_millis(600));
            }
            Ok(responses)
        })
    });
    let responses = client.join().expect("client thread").expect("the whole push");
    assert!(
        responses >= 10,
        "a push of {responses} responses is too short to show anything"
    );
}

/// A client subscribing by name, as Istio's ztunnel with `XDS_ON_DEMAND=true` does: `*`
/// subscribed and unsubscribed at once (nothing), then a VIP, a pod IP, an unknown IP and a
/// service by `namespace/hostname`, each answered on first use; later changes follow what the
/// names resolve to, and nothing else.
#[tokio::test]
async fn addresses_are_served_by_name_on_demand() {
    const POD_C: &str = "---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: shop, labels: {app: a}, annotations: {ambient.istio.io/redirection: enabled}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: shop, annotations: {ambient.istio.io/redirection: enabled}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.4}
";
    let server = Server::start().await;
    server.publish(&world(POD_B));
    let mut client = connect(server.addr, "node-1-secret-0123456789").await.expect("connect");
    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS.to_owned(),
            resource_names_subscribe: vec!["*".into()],
            resource_names_unsubscribe: vec!["*".into()],
            ..Default::default()
        })
        .await;
    let r = client.next().await;
    assert!(r.resources.is_empty() && r.removed_resources.is_empty(), "{r:?}");
    client.ack(&r).await;

    let aliases = |r: &DeltaDiscoveryResponse, name: &str| -> Vec<String> {
        r.resources
            .iter()
            .find(|x| x.name == name)
            .map(|x| x.aliases.clone())
            .unwrap_or_default()
    };
    // A VIP: the service under its own name, the VIP as its alias, and the pod behind it.
    client.subscribe(ADDRESS, &["/10.96.0.1"], &[]).await;
    // The asked-for name, no resource's own, comes back as removed in the same response:
    // what ends an Istio ztunnel's wait (it applies the resources first).
    let r = client.next().await;
    assert_eq!(names(&r), [WA, SA], "{r:?}");
    assert_eq!(aliases(&r, SA), ["/10.96.0.1"]);
    assert_eq!(aliases(&r, WA), ["/10.0.0.1"]);
    assert_eq!(r.removed_resources, ["/10.96.0.1"]);
    client.ack(&r).await;
    // A pod by IP.
    client.subscribe(ADDRESS, &["/10.0.0.2"], &[]).await;
    let r = client.next().await;
    assert_eq!(names(&r), [WB], "{r:?}");
    assert_eq!(r.removed_resources, ["/10.0.0.2"]);
    client.ack(&r).await;
    // Nothing there: said so, so the client stops waiting.
    client.subscribe(ADDRESS, &["/10.9.9.9"], &[]).await;
    let r = client.next().await;
    assert!(r.resources.is_empty(), "{r:?}");
    assert_eq!(r.removed_resources, ["/10.9.9.9"]);
    client.ack(&r).await;
    // A service by name, already held: sent again (the answer is what the client waits for).
    client.subscribe(ADDRESS, &[SA], &[]).await;
    let r = client.next().await;
    assert_eq!(names(&r), [WA, SA], "{r:?}");
    assert!(
        r.removed_resources.is_empty(),
        "a resource's own name is never removed: {r:?}"
    );
    client.ack(&r).await;

    // A new pod behind the service follows; an unrelated one does not.
    server.publish(&world(&format!("{POD_B}{POD_C}")));
    let r = client.next().await;
    assert_eq!(names(&r), ["Kubernetes//Pod/shop/c"], "{r:?}");
    client.ack(&r).await;
    // The unknown IP appears later: sent then.
    server.publish(&world(&format!("{POD_B}{POD_C}").replace("10.0.0.4", "10.9.9.9")));
    let r = client.next().await;
    assert_eq!(names(&r), ["Kubernetes//Pod/shop/d"], "{r:?}");
}
