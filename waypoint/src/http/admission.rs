//! The stages of a request before anything is sent upstream, each of which may answer it
//! locally: sanitizing what only the proxy decides, authentication (JWT), authorization
//! against the original client's identity, route selection, the route's own answers
//! (redirect, fault abort) and rewrites, and resolving the backend the route sends to.
//! Every refusal is a [`LocalReply`]; nothing here sends to an endpoint. Sanitizing writes
//! the canonical path and host back into the request first, so every later stage, and the
//! backend, reads that one path and host.

use std::borrow::Cow;
use std::sync::Arc;

use http::header;
use http::request::Parts;
use http::Method;
use mesh_core::state::model::{AppProtocol, Service, Workload};
use mesh_core::state::State;
use mesh_proto::waypoint as wp;
use rand::Rng;

use super::authority;
use super::local_reply::{BadRequest, LocalReply};
use super::path;
use super::proxy::Downstream;
use super::retry::to_duration;
use super::rewrite::{self, UpgradeRequest};
use super::route::RequestView;
use crate::policy::authz::{self, Decision, RequestAttrs};
use crate::policy::jwt::RequestPrincipal;
use crate::store::Snapshot;
use crate::upstream::{self, cluster::Cluster, Endpoint};
use crate::Waypoint;

/// What only the proxy decides, before anything reads the headers: the canonical path and
/// host, hop-by-hop headers (a client's `Connection` list cannot remove what the mesh wrote
/// before or writes later), headers the mesh vouches for, and upgrades other than WebSocket.
/// `Ok(Some(note))`: an upgrade was dropped. The path and host are both checked before either
/// is written back, so a request refused for one is left (and logged) as it arrived. `paths`
/// is the mesh's path normalisation.
pub fn sanitize(parts: &mut Parts, paths: path::Normalization) -> Result<Option<String>, LocalReply> {
    let bad_path = |e| LocalReply::BadRequest(BadRequest::Path(e));
    let path = match path::normalize(parts.uri.path(), paths).map_err(bad_path)? {
        Cow::Borrowed(_) => None,
        Cow::Owned(p) => Some(p),
    };
    let bad_authority = |e| LocalReply::BadRequest(BadRequest::Authority(e));
    let named = authority::of_request(&parts.uri, &parts.headers).map_err(bad_authority)?;
    if let Some(canonical) = path {
        write_path(parts, &canonical).map_err(LocalReply::BadRequest)?;
    }
    authority::write_back(parts, named).map_err(bad_authority)?;
    let upgrade = rewrite::upgrade_requested(parts.version, &parts.headers);
    rewrite::strip_hop_by_hop(&mut parts.headers, upgrade == UpgradeRequest::WebSocket);
    rewrite::strip_vouched(&mut parts.headers);
    if parts.method == Method::CONNECT {
        return Err(LocalReply::ConnectUnsupported);
    }
    Ok(match upgrade {
        UpgradeRequest::Refused(protocol) => Some(format!("upgrade to {protocol:?} not forwarded")),
        _ => None,
    })
}

/// Replaces the request's path with `canonical`, its canonical form (see [`path`]), keeping
/// the query.
fn write_path(parts: &mut Parts, canonical: &str) -> Result<(), BadRequest> {
    // Unreachable for a canonical path; refused rather than sent on as it came.
    let unusable = BadRequest::Path(path::PathError::NotAbsolute);
    let with_query = rewrite::with_query(canonical, parts.uri.query());
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = Some(with_query.parse().map_err(|_| unusable.clone())?);
    parts.uri = http::Uri::from_parts(uri).map_err(|_| unusable)?;
    Ok(())
}

/// Who the request is for: the gateway this waypoint implements and the target service.
pub struct Target<'a> {
    pub gateway: (&'a str, &'a str),
    pub service: (&'a str, &'a str),
    /// Where AUDIT matches and dry-run decisions are counted.
    pub metrics: &'a crate::telemetry::metrics::Metrics,
}

impl<'a> Target<'a> {
    pub fn new(wp: &'a Waypoint, svc: &'a Service) -> Self {
        Target {
            gateway: (wp.gateway.0.as_str(), wp.gateway.1.as_str()),
            service: (svc.namespace.as_str(), svc.name.as_str()),
            metrics: &wp.metrics,
        }
    }
}

/// Authentication: a token that is present must be valid. `None`: no token (or no rules).
pub async fn authenticate(
    wp: &Waypoint,
    snapshot: &Snapshot,
    target: &Target<'_>,
    parts: &mut Parts,
) -> Result<Option<RequestPrincipal>, LocalReply> {
    match snapshot.authenticator(target.gateway, target.service, &wp.jwks) {
        None => Ok(None),
        Some(authenticator) => authenticator
            .authenticate(parts)
            .await
            .map_err(|e| LocalReply::JwtRejected(e.to_string())),
    }
}

/// The host the client addressed: the URI's authority, else `Host`, else the service name.
/// [`sanitize`] made both canonical (and the same).
pub fn request_host(parts: &Parts, svc: &Service) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| svc.hostname.clone())
}

/// Authorization against the original client's identity. AUDIT matches and the dry-run
/// policies' decision are logged and counted; they never change the decision.
pub fn authorize(
    snapshot: &Snapshot,
    target: &Target<'_>,
    down: &Downstream,
    principal: Option<&RequestPrincipal>,
    parts: &Parts,
    host: &str,
) -> Result<(), LocalReply> {
    let spiffe = down.peer_identity.as_ref().map(ToString::to_string).unwrap_or_default();
    let attrs = RequestAttrs {
        source_principal: spiffe.strip_prefix("spiffe://").unwrap_or(&spiffe),
        source_namespace: down.peer_identity.as_ref().map_or("", |p| p.namespace.as_str()),
        source_ip: down.client_addr.ip(),
        remote_ip: down.remote_ip,
        request_principal: principal,
        host,
        port: down.dst.port(),
        method: parts.method.as_str(),
        path: parts.uri.path(),
        headers: &parts.headers,
    };
    let decision = authz::evaluate(snapshot.policies_for(target.gateway, target.service), &attrs);
    let observed = authz::observe(|| snapshot.policies_for(target.gateway, target.service), &attrs);
    if !observed.is_empty() {
        let text = match &decision {
            Decision::Allow => "allowed",
            Decision::Deny(why) => why.as_str(),
        };
        log_observed(&observed, &attrs, text);
        target.metrics.observed(&observed);
    }
    match decision {
        Decision::Deny(why) => Err(LocalReply::RbacDenied(why)),
        Decision::Allow => Ok(()),
    }
}

/// Logs AUDIT matches and the dry-run policies' decision next to the enforced one.
fn log_observed(observed: &authz::Observed, attrs: &RequestAttrs<'_>, decision: &str) {
    for (policy, rule) in &observed.audits {
        tracing::info!(target: "access", audit_policy = %policy, rule, src = attrs.source_principal, method = attrs.method, path = attrs.path, decision, "AUDIT policy matched");
    }
    if let Some(shadow) = &observed.dry_run {
        let would = match shadow {
            Decision::Allow => "allowed".to_owned(),
            Decision::Deny(why) => format!("denied ({why})"),
        };
        tracing::info!(target: "access", dry_run = %would, src = attrs.source_principal, method = attrs.method, path = attrs.path, decision, "dry-run policies evaluated; not enforced");
    }
}

/// Local rate limits on the waypoint, the service or the matched route: each that applies
/// takes one token from its bucket; an empty bucket answers 429.
pub fn rate_limit(
    wp: &Waypoint,
    snapshot: &Snapshot,
    target: &Target<'_>,
    down: &Downstream,
    route: &str,
) -> Result<(), LocalReply> {
    use crate::policy::rate_limit::{Limit, Verdict};
    for p in snapshot.policies.values() {
        let Some(wp::policy::Kind::RateLimit(r)) = &p.kind else {
            continue;
        };
        let applies =
            crate::policy::applies(p, target.gateway, target.service) || crate::policy::applies_to_route(p, route);
        let Some(limit) = Limit::from_policy(r).filter(|_| applies) else {
            continue;
        };
        let key = format!("{}/{}", p.namespace, p.name);
        // The identity when the client has one, else its address.
        let source = match (&down.peer_identity, limit.per_source) {
            (_, false) => String::new(),
            (Some(id), true) => id.to_string(),
            (None, true) => down.client_addr.ip().to_string(),
        };
        let taken = wp.rate_limits.take(&key, &limit, &source);
        if taken.overflowed {
            wp.metrics.rate_limit_overflow.inc();
        }
        if let Verdict::Limited { reset } = taken.verdict {
            return Err(LocalReply::RateLimited {
                policy: key,
                limit: limit.max_tokens,
                reset,
            });
        }
    }
    Ok(())
}

/// The route a request takes: a matched one, or the default route (to the service itself)
/// when the service has no routes.
pub struct Routed<'s> {
    pub route: Cow<'s, wp::Route>,
    /// The path prefix that matched, for `ReplacePrefixMatch`.
    pub matched_prefix: Option<String>,
}

/// Route selection: a service with routes must match one of them.
pub fn select_route<'s>(snapshot: &'s Snapshot, down: &Downstream, parts: &Parts) -> Result<Routed<'s>, LocalReply> {
    let view = RequestView {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let routes = snapshot.routes.get(&down.service_key).filter(|r| !r.is_empty());
    let Some(routes) = routes else {
        return Ok(Routed {
            route: Cow::Owned(wp::Route::default()),
            matched_prefix: None,
        });
    };
    let chosen = routes.select(&view).ok_or(LocalReply::NoRoute)?;
    Ok(Routed {
        route: Cow::Borrowed(&chosen.route),
        matched_prefix: chosen.matched_prefix(&view).map(str::to_owned),
    })
}

fn percent_hit(p: f64) -> bool {
    p >= 100.0 || (p > 0.0 && rand::thread_rng().gen_range(0.0..100.0) < p)
}

/// What the route does before forwarding: redirect, fault delay/abort, path and header
/// rewrites. Returns the host to send (a route may rewrite it).
pub async fn apply_route(
    routed: &Routed<'_>,
    parts: &mut Parts,
    host: String,
    down: &Downstream,
) -> Result<String, LocalReply> {
    let rt = &routed.route;
    let prefix = routed.matched_prefix.as_deref();
    if let Some(r) = &rt.redirect {
        // The scheme the client used (where the ingress terminated TLS, https) and its port.
        let origin = rewrite::Origin {
            scheme: down.forwarded_proto,
            port: down.dst.port(),
        };
        let (status, location) = rewrite::redirect(r, &parts.uri, &host, prefix, origin);
        return Err(LocalReply::Redirect { status, location });
    }
    if let Some(f) = &rt.fault {
        if let Some(d) = to_duration(f.delay.as_ref()).filter(|_| percent_hit(f.delay_percent)) {
            tokio::time::sleep(d).await;
        }
        if f.abort_status != 0 && percent_hit(f.abort_percent) {
            let status = u16::try_from(f.abort_status)
                .ok()
                .and_then(|s| http::StatusCode::from_u16(s).ok())
                .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
            return Err(LocalReply::FaultAbort(status));
        }
    }
    let rw = rt.rewrite.as_ref();
    if let Some(rw) = rw.filter(|rw| !rw.path.is_empty() || rw.replace_prefix) {
        let p = rewrite::path(parts.uri.path(), &rw.path, rw.replace_prefix, prefix);
        parts.uri = rewrite::with_query(&p, parts.uri.query())
            .parse()
            .map_err(|_| LocalReply::BadRequest(BadRequest::RewrittenPath))?;
    }
    if let Some(rw) = &rt.request_headers {
        rewrite::headers(&mut parts.headers, rw);
    }
    Ok(match rw {
        Some(rw) if !rw.host.is_empty() => rw.host.clone(),
        _ => host,
    })
}

/// Picks a backend by weight.
pub(crate) fn pick_backend(backends: &[wp::WeightedBackend]) -> Option<&wp::WeightedBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return backends.first();
    }
    let mut n = rand::thread_rng().gen_range(0..total);
    backends.iter().find(|b| {
        let w = u64::from(b.weight);
        if n < w {
            true
        } else {
            n -= w;
            false
        }
    })
}

/// Where a routed request goes: the backend service's cluster and its endpoints.
pub struct Backend {
    pub service: Arc<Service>,
    pub port: u16,
    pub cluster: Arc<Cluster>,
    pub candidates: Vec<Arc<Workload>>,
    /// The protocol the backend's port declares (it decides the upstream HTTP version).
    pub declared: AppProtocol,
    /// At an ingress gateway, for a service labelled `istio.io/ingress-use-waypoint`: its
    /// `vip:port`, which the connector tunnels to the service's waypoint.
    pub via_waypoint: Option<std::net::SocketAddr>,
}

impl Backend {
    /// Resolves the route's backend (picked by weight; the service itself without backends).
    pub fn resolve(
        wp: &Waypoint,
        snapshot: &Snapshot,
        state: &State,
        down: &Downstream,
        rt: &wp::Route,
    ) -> Result<Self, LocalReply> {
        let default_backend;
        let backend = if rt.backends.is_empty() {
            default_backend = wp::WeightedBackend {
                service: down.service_key.clone(),
                port: u32::from(down.dst.port()),
                weight: 1,
                subset: String::new(),
            };
            &default_backend
        } else {
            pick_backend(&rt.backends).ok_or(LocalReply::NoHealthyUpstream)?
        };
        let Some(service) = state.service(&backend.service).cloned() else {
            return Err(LocalReply::BackendUnknown {
                service: backend.service.clone(),
            });
        };
        let port = upstream::backend_port(&service, backend.port, down.dst.port());
        if !crate::listener::declares_port(&service, port) {
            // No such cluster: never an endpoint's undeclared port.
            return Err(LocalReply::BackendUnknown {
                service: format!("{}:{port}", backend.service),
            });
        }
        // Subsets and traffic policy come from the backend's own DestinationRule.
        let backend_routes = snapshot.routes.get(&backend.service).map(|r| &r.config);
        let subset = match backend.subset.as_str() {
            "" => None,
            name => Some(
                backend_routes
                    .and_then(|r| r.subsets.iter().find(|s| s.name == name))
                    .ok_or_else(|| LocalReply::SubsetUnknown {
                        service: backend.service.clone(),
                        subset: backend.subset.clone(),
                    })?,
            ),
        };
        let policy = upstream::effective_policy(backend_routes, subset);
        // Before the cluster takes the policy: a DestinationRule's locality failover.
        let candidates = crate::locality::candidates(state, &service, subset, &policy);
        let cluster = wp
            .upstreams
            .http_cluster((&backend.service, &service.hostname), &backend.subset, port, policy);
        let via_waypoint = wp
            .ingress
            .as_ref()
            .and_then(|i| i.waypoint_vip(&backend.service, &service, &wp.network, port));
        Ok(Backend {
            declared: state.port_protocol(&backend.service, port),
            service,
            port,
            cluster,
            candidates,
            via_waypoint,
        })
    }

    /// The endpoint for the next attempt, chosen by the cluster (outlier ejection, balancing).
    pub fn pick(&self, down: &Downstream) -> Result<(Arc<Workload>, Endpoint), LocalReply> {
        let workload = self
            .cluster
            .pick(&self.candidates)
            .ok_or(LocalReply::NoHealthyUpstream)?;
        match upstream::target(&workload, &self.service, self.port, down.dst.ip()) {
            Some(mut ep) => {
                if let Some(vip) = self.via_waypoint {
                    ep.target = vip;
                }
                Ok((workload, ep))
            }
            None => {
                self.cluster.record(&workload.uid, None);
                Err(LocalReply::NoHealthyUpstream)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn request(uri: &str) -> Parts {
        let req = http::Request::builder()
            .uri(uri)
            .body(())
            .expect("a valid test request");
        req.into_parts().0
    }

    fn service() -> Arc<Service> {
        Arc::new(Service {
            name: "api".into(),
            namespace: "shop".into(),
            hostname: "api.shop.svc.cluster.local".into(),
            vips: Vec::new(),
            ports: Vec::new(),
            subject_alt_names: Vec::new(),
            waypoint: None,
            only_healthy: true,
        })
    }

    fn downstream(service: Arc<Service>) -> Downstream {
        let client: std::net::SocketAddr = "203.0.113.7:40000".parse().expect("an address");
        Downstream {
            peer_identity: None,
            client_addr: client,
            remote_ip: client.ip(),
            forwarded_proto: "https",
            upstream_protocol: super::super::proxy::UpstreamProtocol::Http2ForGrpc,
            dst: "10.0.0.1:443".parse().expect("an address"),
            service_key: service.key(),
            service,
        }
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    fn paths(paths: &[&str]) -> wp::Operation {
        wp::Operation {
            paths: strings(paths),
            ..Default::default()
        }
    }

    fn authz(name: &str, action: wp::Action, operation: wp::Operation) -> (String, Arc<wp::Policy>) {
        let rule = wp::Rule {
            to: vec![operation],
            ..Default::default()
        };
        let policy = wp::Policy {
            name: name.into(),
            namespace: "shop".into(),
            targets: vec![wp::Target {
                kind: "Service".into(),
                name: "api".into(),
                namespace: String::new(),
            }],
            kind: Some(wp::policy::Kind::Authorization(wp::Authorization {
                action: action as i32,
                rules: vec![rule],
                dry_run: false,
            })),
        };
        (format!("AuthorizationPolicy/shop/{name}"), Arc::new(policy))
    }

    /// Sanitizes `uri` as the pipeline does, then authorizes it.
    fn admit(snapshot: &Snapshot, uri: &str) -> Result<(), LocalReply> {
        admit_request(snapshot, request(uri))
    }

    /// Sanitizes a request as the pipeline does, then authorizes it for the host it names.
    fn admit_request(snapshot: &Snapshot, parts: Parts) -> Result<(), LocalReply> {
        admit_with(snapshot, parts, path::Normalization::Base)
    }

    /// [`admit_request`] under path normalisation `paths`.
    fn admit_with(snapshot: &Snapshot, mut parts: Parts, paths: path::Normalization) -> Result<(), LocalReply> {
        let metrics = crate::telemetry::metrics::Metrics::register(&mut Registry::default());
        let svc = service();
        let down = downstream(svc.clone());
        let target = Target {
            gateway: ("istio-system", "gw"),
            service: ("shop", "api"),
            metrics: &metrics,
        };
        sanitize(&mut parts, paths)?;
        let host = request_host(&parts, &svc);
        authorize(snapshot, &target, &down, None, &parts, &host)
    }

    #[test]
    fn a_deny_on_a_path_holds_however_the_path_is_spelled() {
        let mut snapshot = Snapshot::default();
        snapshot.policies = [
            authz("public", wp::Action::Allow, paths(&["/public/*"])),
            authz("admin", wp::Action::Deny, paths(&["/admin*"])),
        ]
        .into_iter()
        .collect();
        assert!(admit(&snapshot, "/public/index.html").is_ok());
        for uri in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/./../%61dmin",
            "/public/../admin?x=1",
        ] {
            assert!(
                matches!(admit(&snapshot, uri), Err(LocalReply::RbacDenied(ref why)) if why.contains("shop/admin")),
                "{uri}: {:?}",
                admit(&snapshot, uri)
            );
        }
        assert!(matches!(
            admit(&snapshot, "/public/..\\admin"),
            Err(LocalReply::BadRequest(BadRequest::Path(path::PathError::Backslash)))
        ));
    }

    #[test]
    fn the_stricter_normalisations_close_what_base_leaves_to_the_policy() {
        let mut snapshot = Snapshot::default();
        snapshot.policies = [authz("admin", wp::Action::Deny, paths(&["/admin*"]))]
            .into_iter()
            .collect();
        let admit_as = |uri: &str, mode| admit_with(&snapshot, request(uri), mode);
        let denied = |r: Result<(), LocalReply>| matches!(r, Err(LocalReply::RbacDenied(_)));
        use path::Normalization::{Base, DecodeAndMergeSlashes, MergeSlashes};
        // (uri, denied under BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
        let table = [
            ("//admin", [false, true, true]),
            ("/public/..//admin", [false, true, true]),
            ("/public%2F..%2Fadmin", [false, false, true]),
            ("/%2Fadmin", [false, false, true]),
            ("/%5Cadmin", [false, false, true]),
            ("/admin", [true, true, true]),
            ("/public/index.html", [false, false, false]),
        ];
        for (uri, want) in table {
            for (mode, want) in [Base, MergeSlashes, DecodeAndMergeSlashes].into_iter().zip(want) {
                assert_eq!(denied(admit_as(uri, mode)), want, "{uri} {mode:?}");
            }
        }
    }

    #[test]
    fn a_deny_on_a_host_holds_however_the_host_is_spelled() {
        let mut snapshot = Snapshot::default();
        let admin = wp::Operation {
            hosts: strings(&["admin.example.com"]),
            ..Default::default()
        };
        snapshot.policies = [authz("admin", wp::Action::Deny, admin)].into_iter().collect();
        let with_host = |host: &str| {
            let req = http::Request::builder().uri("/").header(header::HOST, host);
            req.body(()).expect("a test request").into_parts().0
        };
        assert!(admit_request(&snapshot, with_host("www.example.com")).is_ok());
        for denied in [
            "admin.example.com:",
            "ADMIN.example.com:8443",
            "admin.example.com.",
            "admin.example.com.:80",
        ] {
            let got = admit_request(&snapshot, with_host(denied));
            assert!(matches!(got, Err(LocalReply::RbacDenied(_))), "{denied}: {got:?}");
        }
        for refused in [
            "admin.example.com:99999",
            "x@admin.example.com",
            "admin.example.com..",
            ".",
        ] {
            let got = admit_request(&snapshot, with_host(refused));
            assert!(
                matches!(got, Err(LocalReply::BadRequest(BadRequest::Authority(_)))),
                "{refused}: {got:?}"
            );
        }
    }

    #[test]
    fn the_canonical_path_is_written_back_with_the_query_and_authority() {
        let cases = [
            ("/a/./b/../c?q=%2e%2e&x", "/a/c?q=%2e%2e&x"),
            ("https://shop.example/a/%7e?", "https://shop.example/a/~?"),
            ("/plain?y=1", "/plain?y=1"),
            ("*", "*"),
        ];
        for (raw, want) in cases {
            let mut parts = request(raw);
            sanitize(&mut parts, path::Normalization::Base).expect("a valid path");
            assert_eq!(parts.uri.to_string(), want, "{raw}");
        }
    }
}
