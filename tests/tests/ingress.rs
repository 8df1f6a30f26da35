//! The ingress gateway end to end in the two-node cluster: the brief's Gateway and HTTPRoute
//! (refused as written, since the listener admits only its own namespace's routes, then
//! attached once the Gateway allows them), TLS terminated with certificates from Secrets
//! chosen by SNI, an unknown SNI refused, HTTP redirected with 301, the backend's ztunnel
//! seeing the gateway's SPIFFE identity, JWT and remoteIpBlocks at the door, and the statuses
//! of routes that must not attach. The client is a pod outside the mesh, using curl.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_e2e::apps::named_server;
use mesh_e2e::cluster::{Cluster, Pod, PodSpec};
use mesh_e2e::waypoint::{identity, Waypoint};

const ID: u8 = 88;
const WAIT: Duration = Duration::from_secs(20);
const GW_NS: &str = "istio-system";
const GW: &str = "istio-ingressgateway";
const ISSUER: &str = "https://issuer.test";

/// The brief's Gateway, exactly.
const BRIEF_GATEWAY: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    hostname: "*.example.com"
    port: 443
    protocol: HTTPS
    tls: {mode: Terminate, certificateRefs: [{name: example-com-cert}]}
"#;

/// The brief's HTTPRoute, exactly.
const BRIEF_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app-routes, namespace: production}
spec:
  parentRefs: [{name: istio-ingressgateway, namespace: istio-system}]
  hostnames: ["app.example.com"]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-api-version, value: v1}]}
    backendRefs: [{name: app-v1, port: 8080}]
"#;

/// The brief's Gateway opened to routes of other namespaces, with a second certificate
/// (chosen by SNI; its listener names a missing Secret too), a listener whose Secret is missing, an HTTP listener, and the trust of one
/// proxy in front (X-Forwarded-For).
const OPEN_GATEWAY: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: istio-ingressgateway
  namespace: istio-system
  annotations: {proxy.istio.io/config: '{"gatewayTopology": {"numTrustedProxies": 1}}'}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    hostname: "*.example.com"
    port: 443
    protocol: HTTPS
    tls: {mode: Terminate, certificateRefs: [{name: example-com-cert}]}
    allowedRoutes: {namespaces: {from: All}}
  - name: other
    hostname: "*.other.org"
    port: 443
    protocol: HTTPS
    # The second Secret does not exist: the listener serves with the first.
    tls: {certificateRefs: [{name: other-org-cert}, {name: no-such-other-cert}]}
    allowedRoutes: {namespaces: {from: All}}
  - name: broken
    hostname: "*.broken.net"
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: no-such-secret}]}
  - name: http
    port: 80
    protocol: HTTP
"#;

fn world() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: production, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: istio-system}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: outside}}
---
apiVersion: v1
kind: Service
metadata: {{name: app-v1, namespace: production}}
spec: {{clusterIP: 10.96.{ID}.10, selector: {{app: app-v1}}, ports: [{{name: http, port: 8080, targetPort: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: secure-routes, namespace: production}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: https}}]
  hostnames: ["app.example.com"]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /secure}}}}]
    backendRefs: [{{name: app-v1, port: 8080}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: other-routes, namespace: production}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: other}}]
  hostnames: ["www.other.org"]
  rules: [{{backendRefs: [{{name: app-v1, port: 8080}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: to-https, namespace: istio-system}}
spec:
  parentRefs: [{{name: istio-ingressgateway, sectionName: http}}]
  rules:
  - filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https, statusCode: 301}}}}]
---
# Must not attach: a hostname no listener has; the http listener admits only istio-system.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: wrong-host, namespace: production}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: https}}]
  hostnames: ["shop.example.net"]
  rules: [{{backendRefs: [{{name: app-v1, port: 8080}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: wrong-namespace, namespace: production}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: http}}]
  rules: [{{backendRefs: [{{name: app-v1, port: 8080}}]}}]
---
# A backend in another namespace without a ReferenceGrant there.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: no-grant, namespace: istio-system}}
spec:
  parentRefs: [{{name: istio-ingressgateway, sectionName: http}}]
  hostnames: ["grant.example.com"]
  rules: [{{backendRefs: [{{name: app-v1, namespace: production, port: 8080}}]}}]
---
# At the backend's ztunnel (L4): only the gateway may call app-v1.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: app-via-gateway, namespace: production}}
spec:
  selector: {{matchLabels: {{app: app-v1}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/istio-system/sa/istio-ingressgateway]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-blocked-clients, namespace: istio-system}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: istio-ingressgateway}}]
  action: DENY
  rules: [{{from: [{{source: {{remoteIpBlocks: [203.0.113.0/24]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: secure-needs-jwt, namespace: istio-system}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: istio-ingressgateway}}]
  action: DENY
  rules:
  - from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: ["/secure*"]}}}}]
---
"#
    )
}

/// The test CA and the certificates it signs, as PEM.
struct Pki {
    ca_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ingress test CA");
        let ca_cert = params.self_signed(&ca_key).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            ca_cert,
            ca_key,
        }
    }

    /// A `kubernetes.io/tls` Secret for `names`.
    fn secret(&self, namespace: &str, name: &str, names: &[&str]) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        let indent = |pem: String| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\ntype: kubernetes.io/tls\n\
             stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
            indent(cert.pem()),
            indent(key.serialize_pem())
        )
    }
}

/// What curl saw: status and body, or the error it failed with.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
    location: String,
}

/// `curl` from `client` to `url`, resolving its host to the gateway `gw` (port from the URL).
fn curl(client: &Pod, ca: &Path, gw: IpAddr, url: &str, headers: &[&str]) -> Result<Answer, String> {
    let without_scheme = url.split("://").nth(1).unwrap_or(url);
    let host = without_scheme.split('/').next().unwrap_or_default();
    let port = if url.starts_with("https") { 443 } else { 80 };
    let resolve = format!("{host}:{port}:{gw}");
    let ca = ca.to_string_lossy();
    let mut args = vec![
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{redirect_url}",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = client.ns.exec(&args).map_err(|e| e.to_string())?;
    let (body, last) = out.rsplit_once('\n').unwrap_or(("", &out));
    let (status, location) = last.split_once(' ').unwrap_or((last, ""));
    Ok(Answer {
        status: status.parse().map_err(|_| format!("curl printed {out:?}"))?,
        body: body.to_owned(),
        location: location.to_owned(),
    })
}

/// Retries `f` until `done` holds (configuration propagating), at most [`WAIT`].
async fn eventually<T: std::fmt::Debug>(mut f: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = f();
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The controller's view of route `name`'s parent status: (Accepted reason, ResolvedRefs reason).
async fn route_status(cluster: &Cluster, name: &str) -> Option<(String, String)> {
    let (_, body) = cluster.controller.debug("/debug/ingress").await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let route = v["routes"].as_array()?.iter().find(|r| r["route"]["name"] == name)?;
    let reason = |kind: &str| {
        route["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == kind))
            .map(|c| c["reason"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    Some((reason("Accepted"), reason("ResolvedRefs")))
}

fn jwt(claims: serde_json::Value, key: &jsonwebtoken::EncodingKey) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("ec".into());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// An inline-JWKS RequestAuthentication on the gateway and the key that signs its tokens.
fn jwt_world() -> (String, jsonwebtoken::EncodingKey) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = ec.public_key_raw();
    let jwks = serde_json::json!({"keys": [
        {"kty": "EC", "kid": "ec", "alg": "ES256", "crv": "P-256", "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..])},
    ]});
    let manifest = format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: gateway-jwt, namespace: istio-system}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: istio-ingressgateway}}]
  jwtRules:
  - issuer: {ISSUER}
    jwks: '{jwks}'
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
"#
    );
    let key = jsonwebtoken::EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    (manifest, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_gateway_end_to_end() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let started = Instant::now();
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let (jwt_manifest, jwt_key) = jwt_world();
    let mut manifests = world();
    manifests += BRIEF_ROUTE;
    manifests += "---\n";
    manifests += &jwt_manifest;
    let gw_id = identity(GW_NS, GW);
    let cluster = Cluster::start_with_identities(ID, 2, &manifests, &[&gw_id])
        .await
        .expect("cluster up");
    cluster.write_manifest("gateway.yaml", BRIEF_GATEWAY).expect("gateway");
    let certs = pki.secret(GW_NS, "example-com-cert", &["*.example.com"])
        + "---\n"
        + &pki.secret(GW_NS, "other-org-cert", &["*.other.org"]);
    cluster.write_manifest("certs.yaml", &certs).expect("secrets");

    let app = cluster
        .add_pod(1, PodSpec::new("app-v1", "production", &[("app", "app-v1")]))
        .expect("backend pod");
    tokio::spawn(named_server(
        app.ns.listen(SocketAddr::new(app.ip, 8080)).expect("listen"),
        "app-v1",
    ));
    let client = cluster
        .add_pod(0, PodSpec::new("client", "outside", &[]))
        .expect("client pod outside the mesh");
    assert!(!client.captured(), "the client is outside the mesh");
    let direct = cluster
        .add_pod(0, PodSpec::new("direct", "production", &[]))
        .expect("a meshed pod calling the backend directly");
    let gateway = Waypoint::start_with(&cluster, 0, GW_NS, GW, &["--role", "ingress"])
        .await
        .expect("ingress gateway up");
    assert!(!gateway.pod.captured(), "the gateway's pod is not captured");
    cluster
        .wait_workload(&app, true, WAIT)
        .await
        .expect("backend advertised");
    let gw_ip = gateway.pod.ip;
    let get = |url: &str, headers: &[&str]| curl(&client, &ca, gw_ip, url, headers);

    // 1. The brief as written: the listener admits routes of its own namespace only.
    let refused = eventually(
        || futures_block(route_status(&cluster, "app-routes")),
        |s| s.as_ref().is_some_and(|(a, _)| a == "NotAllowedByListeners"),
    )
    .await;
    assert_eq!(
        refused.map(|s| s.0).as_deref(),
        Some("NotAllowedByListeners"),
        "{}",
        gateway.logs()
    );
    let a = eventually(
        || get("https://app.example.com/v1", &[]),
        |r| r.as_ref().is_ok_and(|a| a.status == 404),
    )
    .await;
    assert_eq!(
        a.as_ref().map(|a| a.status),
        Ok(404),
        "TLS served, no route attached: {a:?}"
    );

    // 2. Opened to other namespaces: the brief's request gets 200 with the header added.
    cluster.write_manifest("gateway.yaml", OPEN_GATEWAY).expect("gateway");
    let a = eventually(
        || get("https://app.example.com/v1", &[]),
        |r| r.as_ref().is_ok_and(|a| a.status == 200),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", gateway.logs()));
    assert_eq!(a.status, 200, "{a:?}\n{}", gateway.logs());
    assert_eq!(a.body.lines().next(), Some("app-v1"), "{a:?}");
    assert!(a.body.contains("h x-api-version: v1"), "{}", a.body);
    assert!(a.body.contains("h x-forwarded-proto: https"), "{}", a.body);
    assert_eq!(get("https://app.example.com/v2", &[]).map(|a| a.status), Ok(404));

    // The gateway's own request metrics, as Istio's gateway reports them.
    let gw_metrics = gateway.metrics().await.expect("gateway metrics");
    assert!(
        gw_metrics.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains("reporter=\"source\"")
            && l.contains(&format!("source_principal=\"{gw_id}\""))
            && l.contains("destination_service=\"app-v1.production.svc.cluster.local\"")
            && l.contains("destination_workload=\"app-v1\"")
            && l.contains("response_code=\"200\"")),
        "{gw_metrics}"
    );

    // The backend's ztunnel saw the gateway's SPIFFE identity over mutual TLS.
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 15020));
    let (_, metrics) = mesh_e2e::ztunnel::http_request(cluster.nodes[1].ns, metrics_addr, "GET", "/metrics")
        .await
        .expect("backend node's ztunnel metrics");
    let principal = format!("source_principal=\"{gw_id}\"");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains(&principal)
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );

    // L4 policy at the backend admits only the gateway's identity: a direct call is refused.
    let bypass = direct.ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "3",
        &format!("http://10.96.{ID}.10:8080/v1"),
    ]);
    assert!(bypass.is_err(), "a direct call past the gateway: {bypass:?}");

    // 3. The second certificate by SNI (curl verifies it names www.other.org); an unknown
    // SNI and a listener whose Secret is missing fail the handshake.
    let a = get("https://www.other.org/", &[]).expect("second certificate");
    assert_eq!((a.status, a.body.lines().next()), (200, Some("app-v1")), "{a:?}");
    let unknown = get("https://unknown.test/", &[]);
    assert!(unknown.is_err(), "unknown SNI: {unknown:?}");
    let broken = get("https://www.broken.net/", &[]);
    assert!(broken.is_err(), "listener without its Secret: {broken:?}");

    // 4. HTTP gets 301 to HTTPS.
    let a = get("http://app.example.com/v1?q=1", &[]).expect("http");
    assert_eq!(a.status, 301, "{a:?}");
    assert_eq!(a.location, "https://app.example.com/v1?q=1");

    // 5. JWT at the door: no token 403, a bad one 401, a good one 200 with its claim.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = jwt(
        serde_json::json!({"iss": ISSUER, "sub": "alice", "exp": now + 600}),
        &jwt_key,
    );
    let bad = jwt(
        serde_json::json!({"iss": "https://evil.test", "sub": "alice", "exp": now + 600}),
        &jwt_key,
    );
    assert_eq!(get("https://app.example.com/secure", &[]).map(|a| a.status), Ok(403));
    let auth = |t: &str| format!("authorization: Bearer {t}");
    assert_eq!(
        get("https://app.example.com/secure", &[&auth(&bad)]).map(|a| a.status),
        Ok(401)
    );
    let a = get("https://app.example.com/secure", &[&auth(&good)]).expect("good token");
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.contains("h x-jwt-sub: alice"), "{}", a.body);

    // 6. remoteIpBlocks: the client X-Forwarded-For names past the one trusted proxy.
    let blocked = "x-forwarded-for: 203.0.113.7";
    assert_eq!(get("https://app.example.com/v1", &[blocked]).map(|a| a.status), Ok(403));
    let other = "x-forwarded-for: 198.51.100.7";
    assert_eq!(get("https://app.example.com/v1", &[other]).map(|a| a.status), Ok(200));

    // 8. Connections that never finish TLS are bounded per source: with 256 pending from the
    // client, the next is closed at once (counted), while other sources are served.
    let mut idle = Vec::new();
    for _ in 0..256 {
        idle.push(
            client
                .ns
                .connect(SocketAddr::new(gw_ip, 443))
                .await
                .expect("idle connection"),
        );
    }
    let metrics_has_limit = |m: &str| {
        m.lines()
            .any(|l| l.starts_with("waypoint_rejected_requests_total") && l.contains("pending_per_source_limit"))
    };
    let deadline = Instant::now() + WAIT;
    loop {
        // Accepting is asynchronous: connect until one is refused.
        let mut extra = client.ns.connect(SocketAddr::new(gw_ip, 443)).await.expect("connect");
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_millis(300), extra.read(&mut buf)).await;
        if matches!(closed, Ok(Ok(0)) | Ok(Err(_))) && metrics_has_limit(&gateway.metrics().await.unwrap()) {
            break;
        }
        idle.push(extra);
        assert!(
            Instant::now() < deadline,
            "no per-source bound on pending TLS handshakes"
        );
    }
    let a = direct_get(&direct, gw_ip).await;
    assert_eq!(
        a, 301,
        "another source is still served (the HTTP listener redirects any host)"
    );
    drop(idle);

    // 7. Routes that must not attach, with their reasons.
    for (route, accepted, resolved) in [
        ("wrong-host", "NoMatchingListenerHostname", "ResolvedRefs"),
        ("wrong-namespace", "NotAllowedByListeners", "ResolvedRefs"),
        ("no-grant", "Accepted", "RefNotPermitted"),
        ("app-routes", "Accepted", "ResolvedRefs"),
    ] {
        let got = futures_block(route_status(&cluster, route));
        assert_eq!(got, Some((accepted.to_owned(), resolved.to_owned())), "route {route}");
    }
    let (_, body) = cluster.controller.debug("/debug/ingress").await.unwrap();
    assert!(body.contains("no-such-secret does not exist"), "{body}");
    assert!(
        body.contains("no-such-other-cert does not exist; the listener serves its other certificates"),
        "{body}"
    );
    assert!(!body.contains("PRIVATE KEY"), "statuses never carry keys");
    eprintln!("ingress e2e took {:?}", started.elapsed());
}

/// A plain-HTTP request from `pod` to the gateway's port 80: its status.
async fn direct_get(pod: &Pod, gw: IpAddr) -> u16 {
    let out = pod
        .ns
        .exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "host: nothing.test",
            &format!("http://{gw}:80/"),
        ])
        .unwrap_or_default();
    out.trim().parse().unwrap_or(0)
}

/// Runs a future to completion from synchronous code inside the test's runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

const ROTATION_ID: u8 = 87;

/// The brief's Gateway, open to other namespaces' routes.
fn rotation_world() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: production, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: istio-system}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: outside}}
---
apiVersion: v1
kind: Service
metadata: {{name: app-v1, namespace: production}}
spec: {{clusterIP: 10.96.{ROTATION_ID}.10, selector: {{app: app-v1}}, ports: [{{name: http, port: 8080, targetPort: 8080}}, {{name: tcp-closed, port: 9999, targetPort: 9999}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    hostname: "*.example.com"
    port: 443
    protocol: HTTPS
    tls: {{mode: Terminate, certificateRefs: [{{name: example-com-cert}}]}}
    allowedRoutes: {{namespaces: {{from: All}}}}
  - name: tcp
    port: 9000
    protocol: TCP
    allowedRoutes: {{namespaces: {{from: All}}}}
  - name: tcp-closed
    port: 9001
    protocol: TCP
    allowedRoutes: {{namespaces: {{from: All}}}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: raw, namespace: production}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: tcp}}]
  rules: [{{backendRefs: [{{name: app-v1, port: 8080}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: closed, namespace: production}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: tcp-closed}}]
  rules: [{{backendRefs: [{{name: app-v1, port: 9999}}]}}]
---
{BRIEF_ROUTE}"#
    )
}

/// `--header-read-timeout-ms` of the rotation test's gateway: also how long a silent client is
/// held.
const HEADER_TIMEOUT_MS: u64 = 2000;

/// A TLS connection from `client` to the gateway for `sni`, verified against `ca`.
async fn tls_connect(
    client: &Pod,
    gw: IpAddr,
    ca: &rcgen::Certificate,
    sni: &'static str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio_rustls::rustls;
    let name = rustls::pki_types::ServerName::try_from(sni).map_err(std::io::Error::other)?;
    tls_connect_to(client, SocketAddr::new(gw, 443), ca, name).await
}

/// A TLS connection from `client` to `to` for `name` (a DNS name: its SNI; an IP address:
/// no SNI), verified against `ca`.
async fn tls_connect_to(
    client: &Pod,
    to: SocketAddr,
    ca: &rcgen::Certificate,
    name: tokio_rustls::rustls::pki_types::ServerName<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).map_err(std::io::Error::other)?;
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = client.ns.connect(to).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The leaf certificate a fresh handshake for `sni` gets.
async fn served_leaf(client: &Pod, gw: IpAddr, ca: &rcgen::Certificate, sni: &'static str) -> Option<Vec<u8>> {
    let tls = tls_connect(client, gw, ca, sni).await.ok()?;
    let leaf = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
    Some(leaf)
}

/// The leaf (DER) of a Secret manifest written by [`Pki::secret`].
fn leaf_of(secret: &str) -> Vec<u8> {
    let pem: String = secret
        .lines()
        .skip_while(|l| !l.contains("BEGIN CERTIFICATE"))
        .take_while(|l| !l.contains("tls.key"))
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    tokio_rustls::rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Sends `GET /v1` on one keep-alive TLS connection until `stop`; returns (ok, failed).
async fn keep_alive_load(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u32, u32) {
    use http_body_util::{BodyExt, Empty};
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 over TLS");
    tokio::spawn(conn);
    let (mut ok, mut failed) = (0, 0);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let req = http::Request::get("/v1")
            .header("host", "app.example.com")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        match sender.send_request(req).await {
            Ok(resp) if resp.status() == 200 => {
                let _ = resp.into_body().collect().await;
                ok += 1;
            }
            _ => failed += 1,
        }
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_loses_no_request() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let pki = Pki::new();
    let gw_id = identity(GW_NS, GW);
    let cluster = Cluster::start_with_identities(ROTATION_ID, 2, &rotation_world(), &[&gw_id])
        .await
        .expect("cluster up");
    let first = pki.secret(GW_NS, "example-com-cert", &["*.example.com"]);
    cluster.write_manifest("cert.yaml", &first).expect("secret");
    let app = cluster
        .add_pod(1, PodSpec::new("app-v1", "production", &[("app", "app-v1")]))
        .expect("backend pod");
    tokio::spawn(named_server(
        app.ns.listen(SocketAddr::new(app.ip, 8080)).expect("listen"),
        "app-v1",
    ));
    let client = cluster
        .add_pod(0, PodSpec::new("client", "outside", &[]))
        .expect("client pod");
    let header_timeout = HEADER_TIMEOUT_MS.to_string();
    let flags = ["--role", "ingress", "--header-read-timeout-ms", header_timeout.as_str()];
    let gateway = Waypoint::start_with(&cluster, 0, GW_NS, GW, &flags)
        .await
        .expect("ingress gateway up");
    cluster
        .wait_workload(&app, true, WAIT)
        .await
        .expect("backend advertised");
    let gw = gateway.pod.ip;
    let deadline = Instant::now() + WAIT;
    while served_leaf(&client, gw, &pki.ca_cert, "app.example.com").await != Some(leaf_of(&first)) {
        assert!(
            Instant::now() < deadline,
            "first certificate never served\n{}",
            gateway.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The TCP listener proxies bytes to the TCPRoute's backend (no HTTP processing: no
    // x-api-version), over HBONE like the rest.
    let raw = client
        .ns
        .exec(&["curl", "-sS", "--max-time", "5", &format!("http://{gw}:9000/v1")]);
    let raw = raw.unwrap_or_else(|e| format!("error: {e}\n{}", gateway.logs()));
    assert!(raw.starts_with("app-v1\n"), "{raw}");
    assert!(!raw.contains("x-api-version"), "{raw}");

    // A TCPRoute to a port nothing listens on: the connection is closed, and counted as
    // Envoy counts an unreachable upstream (opened and closed, `UF`).
    let refused = client
        .ns
        .exec(&["curl", "-sS", "--max-time", "5", &format!("http://{gw}:9001/")]);
    assert!(refused.is_err(), "{refused:?}");
    let uf = [
        "reporter=\"source\"",
        "response_flags=\"UF\"",
        "destination_service=\"app-v1.production.svc.cluster.local\"",
    ];
    let counted = || async {
        let m = gateway.metrics().await.unwrap_or_default();
        mesh_e2e::metrics::sum(&m, "istio_tcp_connections_closed_total", &uf) >= 1.0
            && mesh_e2e::metrics::sum(&m, "istio_tcp_connections_opened_total", &uf) >= 1.0
    };
    mesh_e2e::until("the unreachable upstream counted with UF", WAIT, counted).await;

    use tokio::io::AsyncReadExt;
    // A client that completes its TLS handshake and never sends a byte is closed once the
    // header read timeout passes in silence (not before), and counted.
    let mut silent = tls_connect(&client, gw, &pki.ca_cert, "app.example.com")
        .await
        .expect("TLS");
    let since = Instant::now();
    let closed = tokio::time::timeout(WAIT, silent.read(&mut [0u8; 64])).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent client is still held: {closed:?}"
    );
    let took = since.elapsed();
    assert!(
        took >= Duration::from_millis(HEADER_TIMEOUT_MS),
        "closed after {took:?}"
    );
    let counted = || async {
        let m = gateway.metrics().await.unwrap_or_default();
        mesh_e2e::metrics::sample(&m, "waypoint_idle_timeouts_total", &["connection=\"http\""]) >= 1.0
    };
    mesh_e2e::until("the silent client's close counted", WAIT, counted).await;

    // Four keep-alive connections under load while the Secret is replaced.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loads = Vec::new();
    for _ in 0..4 {
        let tls = tls_connect(&client, gw, &pki.ca_cert, "app.example.com")
            .await
            .expect("TLS");
        loads.push(tokio::spawn(keep_alive_load(tls, stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = pki.secret(GW_NS, "example-com-cert", &["*.example.com"]);
    cluster.write_manifest("cert.yaml", &second).expect("rotated secret");
    let deadline = Instant::now() + WAIT;
    while served_leaf(&client, gw, &pki.ca_cert, "app.example.com").await != Some(leaf_of(&second)) {
        assert!(
            Instant::now() < deadline,
            "rotated certificate never served\n{}",
            gateway.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for l in loads {
        let (o, f) = l.await.expect("load task");
        assert!(o > 10, "each connection kept serving: {o}");
        ok += o;
        failed += f;
    }
    eprintln!("rotation under load: {ok} requests ok, {failed} failed");
    assert_eq!(failed, 0, "no request lost while the certificate rotated");

    // A Secret that is not a valid certificate: the listener is unprogrammed, with its reason.
    let garbage = second.replace("BEGIN CERTIFICATE-----\n", "BEGIN CERTIFICATE-----\n    AAAA\n");
    cluster.write_manifest("cert.yaml", &garbage).expect("broken secret");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = cluster.controller.debug("/debug/ingress").await.unwrap();
        if body.contains("InvalidCertificateRef") {
            assert!(body.contains("example-com-cert"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + WAIT;
    while served_leaf(&client, gw, &pki.ca_cert, "app.example.com")
        .await
        .is_some()
    {
        assert!(Instant::now() < deadline, "an unprogrammed listener still serves");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const WAYPOINT_ID: u8 = 85;

/// `shop` with a waypoint; `reviews` asks ingress gateways to use it; the waypoint's own
/// HTTPRoute sends `x-canary: true` to v2, the rest to v1; an HTTP ingress listener routes
/// reviews.example.com to `reviews`.
fn waypoint_world() -> String {
    let id = WAYPOINT_ID;
    let mut w = mesh_e2e::waypoint::base(id);
    w += &format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: istio-system}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: outside}}
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
  labels: {{istio.io/use-waypoint: waypoint, istio.io/ingress-use-waypoint: "true"}}
spec: {{clusterIP: 10.96.{id}.20, selector: {{app: reviews}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews-v1, namespace: shop}}
spec: {{clusterIP: 10.96.{id}.21, selector: {{app: reviews, version: v1}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: reviews-v2, namespace: shop}}
spec: {{clusterIP: 10.96.{id}.22, selector: {{app: reviews, version: v2}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-canary, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews, port: 80}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: "true"}}]}}]
    backendRefs: [{{name: reviews-v2, port: 80}}]
  - backendRefs: [{{name: reviews-v1, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes: {{namespaces: {{from: All}}}}
  - name: tcp
    port: 9000
    protocol: TCP
    allowedRoutes: {{namespaces: {{from: All}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-ingress, namespace: shop}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: http}}]
  hostnames: [reviews.example.com]
  rules: [{{backendRefs: [{{name: reviews, port: 80}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: reviews-tcp, namespace: shop}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: tcp}}]
  rules: [{{backendRefs: [{{name: reviews, port: 80}}]}}]
---
# The pods admit only the waypoint: reaching them past it is refused at their ztunnel.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-via-waypoint, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/shop/sa/waypoint]}}}}]}}]
"#
    );
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_use_waypoint_goes_through_the_waypoint() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    let gw_id = identity(GW_NS, GW);
    let wp_id = identity("shop", "waypoint");
    let cluster = Cluster::start_with_identities(WAYPOINT_ID, 2, &waypoint_world(), &[&gw_id, &wp_id])
        .await
        .expect("cluster up");
    let mut pods = Vec::new();
    for (name, version) in [("reviews-v1", "v1"), ("reviews-v2", "v2")] {
        let pod = cluster
            .add_pod(
                1,
                PodSpec::new(name, "shop", &[("app", "reviews"), ("version", version)]),
            )
            .expect("reviews pod");
        let listener = pod.ns.listen(SocketAddr::new(pod.ip, 8080)).expect("listen");
        tokio::spawn(named_server(
            listener,
            if version == "v1" { "reviews-v1" } else { "reviews-v2" },
        ));
        pods.push(pod);
    }
    let client = cluster
        .add_pod(0, PodSpec::new("client", "outside", &[]))
        .expect("client pod");
    let waypoint = Waypoint::start(&cluster, 1, "shop", "waypoint")
        .await
        .expect("waypoint up");
    let gateway = Waypoint::start_with(&cluster, 0, GW_NS, GW, &["--role", "ingress"])
        .await
        .expect("ingress gateway up");
    for p in &pods {
        cluster.wait_workload(p, true, WAIT).await.expect("pods advertised");
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("none.pem");
    std::fs::write(&ca, "").unwrap();
    let get = |headers: &[&str]| curl(&client, &ca, gateway.pod.ip, "http://reviews.example.com/", headers);
    let a = eventually(|| get(&[]), |r| r.as_ref().is_ok_and(|a| a.status == 200))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", gateway.logs(), waypoint.logs()));
    assert_eq!(a.body.lines().next(), Some("reviews-v1"), "{a:?}\n{}", gateway.logs());
    // Only the waypoint's route sends x-canary to v2: the request went through it, and the
    // pods (which admit only the waypoint) answered. The ztunnels holding both pods says
    // nothing of the waypoint's own view, which may take v2 a moment later (seen in CI under
    // load: 503 "no healthy upstream"): the first canary waits for it.
    let a = eventually(
        || get(&["x-canary: true"]),
        |r| r.as_ref().is_ok_and(|a| a.status == 200),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", gateway.logs(), waypoint.logs()));
    assert_eq!(a.status, 200, "{a:?}\n{}", waypoint.logs());
    for _ in 0..5 {
        let a = get(&["x-canary: true"]).expect("canary");
        assert_eq!((a.status, a.body.lines().next()), (200, Some("reviews-v2")), "{a:?}");
    }
    let metrics = waypoint.metrics().await.expect("waypoint metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total")
            && l.contains(&format!("source_principal=\"{gw_id}\""))
            && l.contains("response_code=\"200\"")),
        "the waypoint counts the gateway's identity:\n{metrics}"
    );
    // A TCP listener's route to the same service goes through the waypoint too: its HTTP
    // route sends x-canary to v2, and the pods admit only the waypoint.
    let request =
        b"GET / HTTP/1.1\r\nHost: reviews.shop.svc.cluster.local\r\nx-canary: true\r\nConnection: close\r\n\r\n";
    let deadline = Instant::now() + WAIT;
    let answer = loop {
        let got = tcp_exchange(&client, SocketAddr::new(gateway.pod.ip, 9000), request).await;
        match got {
            Ok(a) if a.starts_with("HTTP/1.1 200") => break a,
            other if Instant::now() > deadline => panic!("{other:?}\n{}\n{}", gateway.logs(), waypoint.logs()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(answer.contains("reviews-v2"), "{answer}");
}

/// Sends `request` on a TCP connection from `from` to `to` and reads until it closes.
async fn tcp_exchange(from: &Pod, to: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = from.ns.connect(to).await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

const PASSTHROUGH_ID: u8 = 77;

/// A TLS passthrough listener on 8443 for `*.passthrough.test`, a TLSRoute sending
/// db.passthrough.test to `secure-db` (a meshed pod terminating TLS with its own
/// certificate), an HTTPRoute that must not attach to it, and L4 policy at the backend
/// admitting only the gateway.
fn passthrough_world() -> String {
    let id = PASSTHROUGH_ID;
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: production, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: istio-system}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: outside}}
---
apiVersion: v1
kind: Service
metadata: {{name: secure-db, namespace: production}}
spec: {{clusterIP: 10.96.{id}.10, selector: {{app: secure-db}}, ports: [{{name: tls, port: 9443, targetPort: 9443}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: istio-ingressgateway, namespace: istio-system}}
spec:
  gatewayClassName: istio
  listeners:
  - name: passthrough
    hostname: "*.passthrough.test"
    port: 8443
    protocol: TLS
    tls: {{mode: Passthrough}}
    allowedRoutes: {{namespaces: {{from: All}}}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: secure-db, namespace: production}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: passthrough}}]
  hostnames: [db.passthrough.test]
  rules: [{{backendRefs: [{{name: secure-db, port: 9443}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: http-on-tls, namespace: production}}
spec:
  parentRefs: [{{name: istio-ingressgateway, namespace: istio-system, sectionName: passthrough}}]
  rules: [{{backendRefs: [{{name: secure-db, port: 9443}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: db-via-gateway, namespace: production}}
spec:
  selector: {{matchLabels: {{app: secure-db}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/istio-system/sa/istio-ingressgateway]}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure-db, namespace: production}}
spec:
  host: secure-db.production.svc.cluster.local
  trafficPolicy: {{connectionPool: {{tcp: {{idleTimeout: {TCP_IDLE_MS}ms}}}}}}
"#
    )
}

/// The passthrough backend's `connectionPool.tcp.idleTimeout`.
const TCP_IDLE_MS: u64 = 1000;

/// Terminates TLS with `secret`'s certificate (a [`Pki::secret`] manifest) and answers every
/// HTTP/1.1 request with `secure-db` and the SNI it saw.
async fn tls_server(listener: tokio::net::TcpListener, secret: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let key_pem: String = secret
        .lines()
        .skip_while(|l| !l.contains("tls.key"))
        .skip(1)
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let chain = vec![rustls::pki_types::CertificateDer::from(leaf_of(&secret))];
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
            let mut buf = vec![0u8; 4096];
            let mut read = 0;
            while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf[read..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read += n,
                }
            }
            let body = format!("secure-db\nsni {sni}\n");
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.shutdown().await;
        });
    }
}

/// `GET /` over `tls`: the whole response.
async fn get_over(mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET / HTTP/1.1\r\nhost: db.passthrough.test\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_reaches_the_backend_by_sni() {
    if !mesh_e2e::cluster_capable() {
        return;
    }
    use tokio_rustls::rustls::pki_types::ServerName;
    // The backend's own CA and certificate: the gateway has neither.
    let backend_pki = Pki::new();
    let backend_secret = backend_pki.secret("production", "unused", &["db.passthrough.test"]);
    let gw_id = identity(GW_NS, GW);
    let cluster = Cluster::start_with_identities(PASSTHROUGH_ID, 2, &passthrough_world(), &[&gw_id])
        .await
        .expect("cluster up");
    let db = cluster
        .add_pod(1, PodSpec::new("secure-db", "production", &[("app", "secure-db")]))
        .expect("backend pod");
    tokio::spawn(tls_server(
        db.ns.listen(SocketAddr::new(db.ip, 9443)).expect("listen"),
        backend_secret.clone(),
    ));
    let client = cluster
        .add_pod(0, PodSpec::new("client", "outside", &[]))
        .expect("client pod");
    let max = CONNECTION_BOUND.to_string();
    let flags = ["--role", "ingress", "--ingress-max-connections", max.as_str()];
    let gateway = Waypoint::start_with(&cluster, 0, GW_NS, GW, &flags)
        .await
        .expect("ingress gateway up");
    cluster
        .wait_workload(&db, true, WAIT)
        .await
        .expect("backend advertised");
    let to = SocketAddr::new(gateway.pod.ip, 8443);
    let ca = &backend_pki.ca_cert;
    let name = |n: &str| ServerName::try_from(n.to_owned()).unwrap();

    // By SNI to the backend, verified against the backend's CA: the certificate the client
    // sees is the backend's own leaf, and the backend saw the client's SNI.
    let deadline = Instant::now() + WAIT;
    let tls = loop {
        match tls_connect_to(&client, to, ca, name("db.passthrough.test")).await {
            Ok(t) => break t,
            Err(e) => assert!(Instant::now() < deadline, "{e}\n{}", gateway.logs()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        leaf,
        leaf_of(&backend_secret),
        "the backend's certificate, not the gateway's"
    );
    let reply = get_over(tls).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("secure-db\nsni db.passthrough.test\n"), "{reply}");

    // Istio's TCP series as its gateway reports them: as the source, with the ClientHello it
    // read for the SNI among the bytes received from the client.
    let series = [
        "reporter=\"source\"",
        "request_protocol=\"tcp\"",
        "source_workload=\"istio-ingressgateway\"",
        "destination_service=\"secure-db.production.svc.cluster.local\"",
    ];
    let gw_metrics = gateway.metrics().await.expect("gateway metrics");
    let count = |name: &str| mesh_e2e::metrics::sum(&gw_metrics, name, &series);
    assert!(count("istio_tcp_connections_opened_total") >= 1.0, "{gw_metrics}");
    assert!(
        count("istio_tcp_received_bytes_total") > 200.0,
        "a ClientHello and a request: {gw_metrics}"
    );
    assert!(
        count("istio_tcp_sent_bytes_total") > 500.0,
        "the server's flight and answer: {gw_metrics}"
    );
    let closed = || async {
        let m = gateway.metrics().await.unwrap_or_default();
        mesh_e2e::metrics::sum(&m, "istio_tcp_connections_closed_total", &series) >= 1.0
    };
    mesh_e2e::until("the gateway's TCP close counted", WAIT, closed).await;

    // Over HBONE with the gateway's identity: the backend's ztunnel (whose policy admits only
    // the gateway) counts it with mutual TLS.
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 15020));
    let (_, metrics) = mesh_e2e::ztunnel::http_request(cluster.nodes[1].ns, metrics_addr, "GET", "/metrics")
        .await
        .expect("backend node's ztunnel metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("source_principal=\"{gw_id}\""))
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );

    // Refused: an SNI in the listener's domain that no TLSRoute names, one outside it, and a
    // hello without SNI, each with the unrecognized_name alert; plaintext with decode_error.
    for n in ["other.passthrough.test", "db.example.org", "10.0.0.1"] {
        let refused = tls_connect_to(&client, to, ca, name(n)).await;
        let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("UnrecognisedName"), "{n}: {err}");
    }
    let mut plain = client.ns.connect(to).await.expect("connect");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        plain
            .write_all(b"GET / HTTP/1.1\r\nhost: db.passthrough.test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer).await;
        assert_eq!(answer, [0x15, 3, 3, 0, 2, 2, 50], "a decode_error alert, then closed");
        // A ClientHello claiming 16,000 bytes in 100-byte records passes the 16 KiB read
        // bound before it completes: closed there, not buffered on.
        let mut handshake = vec![1u8, 0, 0x3e, 0x80];
        handshake.resize(4 + 16_000, 0);
        let mut big = Vec::new();
        for piece in handshake.chunks(100) {
            big.extend_from_slice(&[0x16, 3, 1, 0, piece.len() as u8]);
            big.extend_from_slice(piece);
        }
        let mut oversized = client.ns.connect(to).await.expect("connect");
        let _ = oversized.write_all(&big).await;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT, oversized.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok() && rest.is_empty(),
            "closed without an answer: {closed:?} {rest:?}"
        );
    }
    let gw_metrics = gateway.metrics().await.expect("gateway metrics");
    for reason in [
        "tls_unknown_sni",
        "tls_no_sni",
        "tls_client_hello_malformed",
        "tls_client_hello_too_large",
    ] {
        assert!(
            gw_metrics
                .lines()
                .any(|l| l.starts_with("waypoint_rejected_requests_total")
                    && l.contains(&format!("reason=\"{reason}\""))),
            "{reason}\n{gw_metrics}"
        );
    }

    // Statuses: the TLSRoute attached; an HTTPRoute cannot attach to a TLS listener.
    for (route, accepted) in [("secure-db", "Accepted"), ("http-on-tls", "NotAllowedByListeners")] {
        let got = futures_block(route_status(&cluster, route)).map(|s| s.0);
        assert_eq!(got.as_deref(), Some(accepted), "route {route}");
    }
    tcp_idle_timeout(&client, to, &gateway, ca).await;
    connection_bound(&client, to, &gateway, ca).await;
}

/// The backend's DestinationRule `connectionPool.tcp.idleTimeout`: a connection whose bytes
/// keep coming outlives it; one where no byte moves either way is closed once it passes (not
/// before), and counted.
async fn tcp_idle_timeout(client: &Pod, to: SocketAddr, gateway: &Waypoint, ca: &rcgen::Certificate) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::ServerName;
    let idle = Duration::from_millis(TCP_IDLE_MS);
    let name = ServerName::try_from("db.passthrough.test".to_owned()).unwrap();
    let mut tls = tls_connect_to(client, to, ca, name.clone()).await.expect("TLS");
    tls.write_all(b"GET / HTTP/1.1\r\nhost: db.passthrough.test\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // Each piece a quarter of the timeout after the last: margin for a loaded runner.
    for _ in 0..8 {
        tokio::time::sleep(idle / 4).await;
        tls.write_all(b"x-still-typing: 1\r\n").await.unwrap();
        tls.flush().await.unwrap();
    }
    tls.write_all(b"\r\n").await.unwrap();
    let mut reply = String::new();
    let _ = tls.read_to_string(&mut reply).await;
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "a trickling client was cut: {reply:?}"
    );

    let mut silent = tls_connect_to(client, to, ca, name).await.expect("TLS");
    let since = Instant::now();
    let closed = tokio::time::timeout(WAIT, silent.read(&mut [0u8; 64])).await;
    let took = since.elapsed();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection outlived its idle timeout: {closed:?}"
    );
    assert!(took >= idle, "closed after {took:?}, before the idle timeout");
    // Counted just after the sockets go: the client may see the close first.
    let counted = || async {
        let m = gateway.metrics().await.unwrap_or_default();
        mesh_e2e::metrics::sample(&m, "waypoint_idle_timeouts_total", &["connection=\"tcp\""]) >= 1.0
    };
    mesh_e2e::until("the idle close counted", WAIT, counted).await;
}

/// `--ingress-max-connections` of the passthrough test's gateway.
const CONNECTION_BOUND: usize = 8;

/// With the gateway holding its bound in silent connections (each waits for a ClientHello),
/// one more is closed at once and counted; once they go, a client is served again.
async fn connection_bound(client: &Pod, to: SocketAddr, gateway: &Waypoint, ca: &rcgen::Certificate) {
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls::pki_types::ServerName;
    let mut held = Vec::new();
    for _ in 0..CONNECTION_BOUND {
        held.push(client.ns.connect(to).await.expect("connect"));
    }
    let mut over = client.ns.connect(to).await.expect("connect");
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "one over the bound must be closed at once: {closed:?}"
    );
    let metrics = gateway.metrics().await.expect("gateway metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("waypoint_rejected_requests_total") && l.contains("reason=\"connections_limit\"")),
        "{metrics}"
    );
    drop(held);
    let name = ServerName::try_from("db.passthrough.test".to_owned()).unwrap();
    let deadline = Instant::now() + WAIT;
    let tls = loop {
        match tls_connect_to(client, to, ca, name.clone()).await {
            Ok(t) => break t,
            Err(e) => assert!(Instant::now() < deadline, "not served once the slots were free: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(get_over(tls).await.starts_with("HTTP/1.1 200"));
}
