//! The waypoint's part of an explanation, in the waypoint's order: authorization (the
//! policies attached to the waypoint or the service, evaluated by the waypoint's own code),
//! then route matching, then the backend the route sends to.

use std::sync::Arc;

use ::http::{HeaderMap, HeaderName, HeaderValue, Method};
use ::waypoint::http::route::{CompiledRoutes, RequestView};
use ::waypoint::policy::authz::{self, Decision, RequestAttrs};
use controller::waypoint::WaypointDeployment;
use mesh_core::state::model::{Service, Workload};
use mesh_proto::waypoint as wp;

use super::{pick_endpoint, Call, Caller, Enforcer, Explanation, Verdict};

fn headers(call: &Call) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in &call.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            map.append(k, v);
        }
    }
    map
}

/// The waypoint's decision; `Some` (the backend workload and port) when it forwards.
pub(super) fn decide(
    view: &super::View,
    call: &Call,
    caller: &Caller,
    svc: &Service,
    d: &WaypointDeployment,
    ex: &mut Explanation,
) -> Option<(Arc<Workload>, u16)> {
    let at = "waypoint";
    let gateway = (d.gateway.namespace.as_str(), d.gateway.name.as_str());
    let service = (svc.namespace.as_str(), svc.name.as_str());
    let policies: Vec<&wp::Policy> = view
        .outputs
        .waypoint_policies
        .values()
        .filter(|p| ::waypoint::policy::applies(p, gateway, service))
        .collect();
    if policies
        .iter()
        .any(|p| matches!(p.kind, Some(wp::policy::Kind::Jwt(_))))
    {
        ex.notes
            .push("a RequestAuthentication applies: tokens are not checked offline (none assumed)".to_owned());
    }
    let principal = caller.identity.as_ref().map(|i| i.principal()).unwrap_or_default();
    let namespace = caller
        .identity
        .as_ref()
        .map(|i| i.namespace.clone())
        .unwrap_or_default();
    let headers = headers(call);
    let host = format!("{}:{}", svc.hostname, call.port);
    let attrs = RequestAttrs {
        source_principal: &principal,
        source_namespace: &namespace,
        source_ip: caller.ip,
        remote_ip: caller.ip,
        request_principal: None,
        host: &host,
        port: call.port,
        method: &call.method,
        path: &call.path,
        headers: &headers,
    };
    let (decision, considered) = authz::evaluate_traced(policies.iter().copied(), &attrs);
    ex.hop(
        at,
        format!("L7 policies for {} {} {}", call.method, call.path, svc.key()),
    );
    if considered.is_empty() {
        ex.hop(at, "  no policy applies");
    }
    for c in &considered {
        let matched = c
            .matched_rule
            .map_or("no rule matches".to_owned(), |r| format!("rule {r} matches"));
        let dry = if c.dry_run { " (dry run: logged only)" } else { "" };
        ex.hop(at, format!("  {} {}: {matched}{dry}", c.action.as_str_name(), c.policy));
    }
    if let Decision::Deny(reason) = decision {
        ex.verdict = Verdict::Denied {
            by: Enforcer::Waypoint,
            reason,
        };
        return None;
    }
    route(view, call, svc, &headers, ex)
}

/// The route the request takes and the backend it reaches.
fn route(
    view: &super::View,
    call: &Call,
    svc: &Service,
    headers: &HeaderMap,
    ex: &mut Explanation,
) -> Option<(Arc<Workload>, u16)> {
    let at = "waypoint";
    let routes = view
        .outputs
        .service_routes
        .get(&svc.key())
        .map(|r| CompiledRoutes::compile(r.clone()));
    let Some(routes) = routes.filter(|r| !r.is_empty()) else {
        ex.hop(at, format!("route: none declared, to {} itself", svc.key()));
        return pick_endpoint(view, svc, call.port, ex);
    };
    let method = Method::from_bytes(call.method.as_bytes()).unwrap_or(Method::GET);
    let (path, query) = match call.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (call.path.as_str(), None),
    };
    let request = RequestView {
        method: &method,
        path,
        query,
        headers,
    };
    let Some(chosen) = routes.select(&request) else {
        ex.hop(at, "route: no route matches");
        ex.verdict = Verdict::Answered {
            reply: "404 (no route matched)".to_owned(),
        };
        return None;
    };
    let r = &chosen.route;
    if let Some(redirect) = &r.redirect {
        ex.hop(at, format!("route {}: redirect", r.name));
        ex.verdict = Verdict::Answered {
            reply: format!("redirect to {redirect:?}"),
        };
        return None;
    }
    let split: Vec<String> = r
        .backends
        .iter()
        .map(|b| format!("{}:{} (weight {})", b.service, b.port, b.weight))
        .collect();
    ex.hop(at, format!("route {}: {}", r.name, split.join(", ")));
    let Some(backend) = r.backends.iter().max_by_key(|b| b.weight) else {
        ex.verdict = Verdict::Answered {
            reply: "500 (the route has no backend)".to_owned(),
        };
        return None;
    };
    let Some(target) = view.state.service(&backend.service).cloned() else {
        ex.verdict = Verdict::Answered {
            reply: format!("503 (backend {} not found)", backend.service),
        };
        return None;
    };
    let port = u16::try_from(backend.port).unwrap_or(call.port);
    pick_endpoint(view, &target, port, ex)
}
