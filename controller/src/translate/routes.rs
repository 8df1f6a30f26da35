//! Waypoint routes: per service from HTTPRoute/GRPCRoute (parent: the Service) and
//! VirtualService (hosts: the service), with the host's DestinationRule. The L7 policies
//! waypoints enforce are translated in [`super::waypoint_policy`].

mod locality;

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_core::route_match::{self, Field};
use mesh_proto::waypoint as wp;

use super::{service_hostname, Options, RefusedRef, Report};
use crate::model::gateway::{self, BackendRef, HeaderMatch, HeaderModifier, ParentReference, WAYPOINT_CLASS};
use crate::model::istio::{self, TrafficPolicy};
use crate::model::reference_grant::{self, Reference, GATEWAY_GROUP};
use crate::model::{Inputs, Kind, ObjectKey};

/// Parses Go-style durations as Kubernetes APIs write them: `1.5s`, `250ms`, `1m30s`, `1h`.
pub(crate) fn duration(text: &str) -> Result<prost_types::Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 250ms, 2s or 1m30s");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (number, tail) = rest.split_at(split);
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let value: f64 = number.parse().map_err(|_| bad())?;
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        let part = Duration::try_from_secs_f64(value * seconds).map_err(|_| bad())?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = next;
    }
    prost_types::Duration::try_from(total).map_err(|_| bad())
}

fn opt_duration(
    text: Option<&str>,
    kind: Kind,
    key: &ObjectKey,
    field: &str,
    report: &mut Report,
) -> Option<prost_types::Duration> {
    let text = text?;
    match duration(text) {
        Ok(d) => Some(d),
        Err(e) => {
            report.add(kind, key, format!("{field}: {e}; ignored"));
            None
        }
    }
}

fn is_service_ref(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("") | Some("core")) && matches!(kind, None | Some("Service"))
}

/// `<ns>/<hostname>` of a Service reference.
fn service_key(name: &str, namespace: Option<&str>, default_ns: &str, options: &Options) -> String {
    let ns = namespace.unwrap_or(default_ns);
    format!("{ns}/{}", service_hostname(name, ns, options))
}

/// A VirtualService/DestinationRule host to `<ns>/<hostname>`: a short name is in the
/// object's namespace, `name.ns` and `name.ns.svc...` name another.
fn host_key(host: &str, default_ns: &str, options: &Options) -> String {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or(host);
    let ns = parts.next().unwrap_or(default_ns);
    format!("{ns}/{}", service_hostname(name, ns, options))
}

/// The reason a route's refused cross-namespace reference carries, in its problem message
/// and as the route status's `ResolvedRefs=False` reason (Gateway API's name for it).
pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";

/// The reason a route refused for a match the proxy cannot compile carries, in its problem
/// message and as the route status's `Accepted=False` reason (Gateway API's name for it).
pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";

/// Every match of a route's compiled rules (rule `i` is `rules[i]`) checked with the proxy's
/// own compile ([`route_match::compile`], same regex engine and limits): the invalid ones as
/// `<field> <value>: <why>`, `field(rule, match, part)` naming the field as the object
/// spells it.
fn invalid_matches(rules: &[wp::Route], field: impl Fn(usize, usize, &Field) -> String) -> Vec<String> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        for (j, m) in rule.matches.iter().enumerate() {
            if let Err(e) = route_match::compile(m) {
                out.push(format!("{} {:?}: {}", field(i, j, &e.field), e.value, e.reason));
            }
        }
    }
    out
}

/// A Gateway API route's rules, or the route refused whole (`Err`, the invalid fields).
///
/// A rule with a match the proxy cannot compile makes the whole route not Accepted
/// (`Accepted=False`, [`UNSUPPORTED_VALUE`], each invalid field reported), rather than the
/// rule alone dropped (Gateway API's `PartiallyInvalid` "Dropped Rule" option): a route's
/// rules are written together, a narrow rule often carving an exception (a redirect, a
/// different backend for `/admin`) out of a broader one, and serving the rest without it
/// would send the carved-out requests to the broader rule. Refused whole, the route is
/// served as if it did not exist, and only it: at a shared ingress host or a service the
/// other routes keep their rules (the proxy would otherwise refuse the whole host table).
fn accept_rules(
    kind: Kind,
    key: &ObjectKey,
    rules: Vec<wp::Route>,
    field: impl Fn(usize, usize, &Field) -> String,
    report: &mut Report,
) -> Result<Vec<wp::Route>, Vec<String>> {
    let invalid = invalid_matches(&rules, field);
    if invalid.is_empty() {
        return Ok(rules);
    }
    for m in &invalid {
        let message = format!("{m}; the route is not accepted ({UNSUPPORTED_VALUE})");
        report.refused(kind, key, RefusedRef::Invalid(m.clone()), message);
    }
    Err(invalid)
}

/// An HTTPRoute's or GRPCRoute's match field, as the object spells it.
fn gateway_match_field(i: usize, j: usize, f: &Field) -> String {
    let part = match f {
        Field::Path => "path.value".to_owned(),
        Field::Method => "method".to_owned(),
        Field::Header { index, .. } => format!("headers[{index}].value"),
        Field::QueryParam { index, .. } => format!("queryParams[{index}].value"),
    };
    format!("spec.rules[{i}].matches[{j}].{part}")
}

/// Whether the route `kind`/`key` may reference Service `to_ns/name`: always in its own
/// namespace, else only with a ReferenceGrant in `to_ns` (a route could otherwise send, or
/// take over, another namespace's traffic).
pub(super) fn service_ref_permitted(inputs: &Inputs, kind: Kind, key: &ObjectKey, to_ns: &str, name: &str) -> bool {
    let r = Reference {
        from_group: GATEWAY_GROUP,
        from_kind: kind.name(),
        from_namespace: &key.namespace,
        to_group: "",
        to_kind: "Service",
        to_namespace: to_ns,
        to_name: name,
    };
    reference_grant::permitted(
        inputs.reference_grants.iter().map(|(k, g)| (k.namespace.as_str(), g)),
        &r,
    )
}

fn refused(kind: Kind, key: &ObjectKey, what: &str, ns: &str, name: &str, effect: &str) -> String {
    format!(
        "{REF_NOT_PERMITTED}: {what} Service {ns}/{name} is in another namespace and no ReferenceGrant in {ns} \
         allows {} from {}; {effect}",
        kind.name(),
        key.namespace
    )
}

/// A rule's backends: those it may use, and the weight of those refused (no ReferenceGrant),
/// whose share of requests must fail rather than go elsewhere.
#[derive(Default)]
struct Backends {
    permitted: Vec<wp::WeightedBackend>,
    refused_weight: u32,
    total_weight: u32,
}

impl Backends {
    /// The fault that fails the refused share with 500, as Gateway API asks of invalid backends.
    fn refused_fault(&self) -> Option<wp::Fault> {
        (self.refused_weight > 0 && self.total_weight > 0).then(|| wp::Fault {
            abort_status: 500,
            abort_percent: f64::from(self.refused_weight) * 100.0 / f64::from(self.total_weight),
            ..Default::default()
        })
    }
}

/// Effects of a refused backendRef, as its problem states them.
const FAILS_500: &str = "its share of requests fails (500)";
const NOT_MIRRORED: &str = "requests are not mirrored to it";
const TCP_UNUSED: &str = "not used (the rule is dropped when no backend is left)";

fn backends(
    refs: &[BackendRef],
    ctx: (&Inputs, &Options),
    (kind, key): (Kind, &ObjectKey),
    effect: &str,
    report: &mut Report,
) -> Backends {
    let (inputs, options) = ctx;
    let mut out = Backends::default();
    for b in refs {
        if is_service_entry_ref(b.group.as_deref(), b.kind.as_deref()) {
            // A ServiceEntry backend: its first host, in the route's namespace.
            let weight = b.weight.unwrap_or(1);
            let ns = key.namespace.as_str();
            if let Some(service) = service_entry_hosts(inputs, ns, b.namespace.as_deref(), &b.name, kind, key, report)
                .into_iter()
                .next()
            {
                out.total_weight = out.total_weight.saturating_add(weight);
                out.permitted.push(wp::WeightedBackend {
                    service,
                    port: b.port.map(u32::from).unwrap_or(0),
                    weight,
                    subset: String::new(),
                });
            }
            continue;
        }
        if !is_service_ref(b.group.as_deref(), b.kind.as_deref()) {
            report.add(kind, key, format!("backendRef {} is not a Service; skipped", b.name));
            continue;
        }
        let weight = b.weight.unwrap_or(1);
        out.total_weight = out.total_weight.saturating_add(weight);
        let ns = b.namespace.as_deref().unwrap_or(&key.namespace);
        if !service_ref_permitted(inputs, kind, key, ns, &b.name) {
            let message = refused(kind, key, "backendRef", ns, &b.name, effect);
            report.refused(kind, key, RefusedRef::Backend, message);
            out.refused_weight = out.refused_weight.saturating_add(weight);
            continue;
        }
        out.permitted.push(wp::WeightedBackend {
            service: service_key(&b.name, Some(ns), ns, options),
            port: b.port.map(u32::from).unwrap_or(0),
            weight,
            subset: String::new(),
        });
    }
    out
}

/// A Gateway API path modifier as (path, replaces only the matched prefix).
fn path_modifier(m: Option<&gateway::PathModifier>) -> (String, bool) {
    match m {
        Some(m) if m.kind == "ReplacePrefixMatch" => (m.replace_prefix_match.clone().unwrap_or_default(), true),
        Some(m) => (m.replace_full_path.clone().unwrap_or_default(), false),
        None => (String::new(), false),
    }
}

fn header_rewrite(m: &HeaderModifier) -> wp::HeaderRewrite {
    wp::HeaderRewrite {
        set: m.set.iter().map(|h| (h.name.clone(), h.value.clone())).collect(),
        add: m.add.iter().map(|h| (h.name.clone(), h.value.clone())).collect(),
        remove: m.remove.clone(),
    }
}

fn string_match(kind: Option<&str>, value: String, default: &str) -> wp::StringMatch {
    use wp::string_match::Kind as K;
    let k = match kind.unwrap_or(default) {
        "Exact" => K::Exact(value),
        "RegularExpression" => K::Regex(value),
        _ => K::Prefix(value),
    };
    wp::StringMatch { kind: Some(k) }
}

fn istio_match(m: &istio::StringMatch) -> Option<wp::StringMatch> {
    use wp::string_match::Kind as K;
    let k = if let Some(v) = &m.exact {
        K::Exact(v.clone())
    } else if let Some(v) = &m.prefix {
        K::Prefix(v.clone())
    } else {
        K::Regex(m.regex.clone()?)
    };
    Some(wp::StringMatch { kind: Some(k) })
}

/// Istio's `{name: {exact|prefix|regex}}` header or query matches.
fn istio_matches(by_name: &BTreeMap<String, istio::StringMatch>, lowercase: bool) -> Vec<wp::HeaderMatch> {
    by_name
        .iter()
        .filter_map(|(n, v)| {
            Some(wp::HeaderMatch {
                name: if lowercase { n.to_ascii_lowercase() } else { n.clone() },
                value: Some(istio_match(v)?),
            })
        })
        .collect()
}

fn is_service_entry_ref(group: Option<&str>, kind: Option<&str>) -> bool {
    group == Some("networking.istio.io") && kind == Some("ServiceEntry")
}

/// The services (`<ns>/<host>`) a ServiceEntry reference names: each of its hosts. Only in the
/// route's own namespace (no ReferenceGrant covers ServiceEntries here).
fn service_entry_hosts(
    inputs: &Inputs,
    ns: &str,
    to_ns: Option<&str>,
    name: &str,
    kind: Kind,
    key: &ObjectKey,
    report: &mut Report,
) -> Vec<String> {
    let to_ns = to_ns.unwrap_or(ns);
    let se = inputs.service_entries.get(&ObjectKey::new(to_ns, name));
    match se {
        Some(se) if to_ns == ns => se
            .spec
            .hosts
            .iter()
            .map(|h| format!("{to_ns}/{}", h.to_ascii_lowercase()))
            .collect(),
        Some(_) => {
            report.add(
                kind,
                key,
                format!("ServiceEntry {to_ns}/{name} is in another namespace; not attached"),
            );
            Vec::new()
        }
        None => {
            report.add(kind, key, format!("ServiceEntry {to_ns}/{name} does not exist"));
            Vec::new()
        }
    }
}

/// The Service parents of a route, as `<ns>/<hostname>`; other parents are reported.
fn service_parents(
    parents: &[ParentReference],
    ns: &str,
    options: &Options,
    inputs: &Inputs,
    kind: Kind,
    key: &ObjectKey,
    report: &mut Report,
) -> Vec<String> {
    let mut out = Vec::new();
    for p in parents {
        if is_service_entry_ref(p.group.as_deref(), p.kind.as_deref()) {
            out.extend(service_entry_hosts(
                inputs,
                ns,
                p.namespace.as_deref(),
                &p.name,
                kind,
                key,
                report,
            ));
            continue;
        }
        if is_service_ref(p.group.as_deref(), p.kind.as_deref()) && p.kind.is_some() {
            let to_ns = p.namespace.as_deref().unwrap_or(ns);
            if service_ref_permitted(inputs, kind, key, to_ns, &p.name) {
                out.push(service_key(&p.name, Some(to_ns), ns, options));
            } else {
                let effect = "not attached (the route would route that Service for every client)";
                let message = refused(kind, key, "parentRef", to_ns, &p.name, effect);
                report.refused(
                    kind,
                    key,
                    RefusedRef::Parent(ObjectKey::new(to_ns, p.name.as_str())),
                    message,
                );
            }
            continue;
        }
        let gw = ObjectKey::new(p.namespace.as_deref().unwrap_or(ns), p.name.as_str());
        if inputs
            .gateways
            .get(&gw)
            .is_some_and(|g| g.spec.gateway_class_name == WAYPOINT_CLASS)
        {
            report.add(
                kind,
                key,
                format!("parentRef {gw} is a waypoint: attach routes to the Service they route (GAMMA)"),
            );
        }
        // Other gateways' routes are not the mesh's business.
    }
    out
}

type Routes = BTreeMap<String, wp::ServiceRoutes>;

fn entry<'a>(routes: &'a mut Routes, service: &str) -> &'a mut wp::ServiceRoutes {
    routes.entry(service.to_owned()).or_insert_with(|| wp::ServiceRoutes {
        service: service.to_owned(),
        ..Default::default()
    })
}

fn by_age<'a, T>(
    items: impl Iterator<Item = (&'a ObjectKey, &'a T)>,
    meta: impl Fn(&T) -> &crate::model::ObjectMeta,
) -> Vec<(&'a ObjectKey, &'a T)> {
    let mut v: Vec<_> = items.collect();
    v.sort_by(|a, b| {
        let t = |x: &T| meta(x).creation_timestamp.clone().map(|t| t.0);
        t(a.1).cmp(&t(b.1)).then_with(|| a.0.cmp(b.0))
    });
    v
}

fn header_matches(headers: &[HeaderMatch], lowercase: bool) -> Vec<wp::HeaderMatch> {
    headers
        .iter()
        .map(|h| wp::HeaderMatch {
            name: if lowercase {
                h.name.to_ascii_lowercase()
            } else {
                h.name.clone()
            },
            value: Some(string_match(h.kind.as_deref(), h.value.clone(), "Exact")),
        })
        .collect()
}

/// Compiles each route once and attaches it to every Service it names as a parent.
fn attach<'a, R>(
    routes: &mut Routes,
    ctx: (&Inputs, &Options),
    report: &mut Report,
    kind: Kind,
    items: Vec<(&'a ObjectKey, &'a R)>,
    parents: impl Fn(&R) -> &[ParentReference],
    compile: impl Fn(&ObjectKey, &R, &mut Report) -> Result<Vec<wp::Route>, Vec<String>>,
) {
    let (inputs, options) = ctx;
    for (key, route) in items {
        let services = service_parents(parents(route), &key.namespace, options, inputs, kind, key, report);
        if services.is_empty() {
            continue;
        }
        let Ok(compiled) = compile(key, route, report) else {
            continue; // refused whole, reported: attached to none of its Services
        };
        for service in services {
            let target = entry(routes, &service);
            target.sources.push(format!("{}/{key}", kind.name()));
            target.routes.extend(compiled.iter().cloned());
        }
    }
}

/// Compiles an HTTPRoute's rules (matches, filters, backends: a cross-namespace backend
/// needs a ReferenceGrant), for a waypoint's service or an ingress listener alike; `Err`
/// (reported) when a match cannot be compiled: see [`accept_rules`].
pub(super) fn compile_http_route(
    inputs: &Inputs,
    options: &Options,
    key: &ObjectKey,
    route: &gateway::HttpRoute,
    report: &mut Report,
) -> Result<Vec<wp::Route>, Vec<String>> {
    let kind = Kind::HttpRoute;
    let mut out = Vec::with_capacity(route.spec.rules.len());
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let matches = rule
            .matches
            .iter()
            .map(|m| wp::RouteMatch {
                path: m.path.as_ref().map(|p| {
                    let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
                    string_match(p.kind.as_deref(), value, "PathPrefix")
                }),
                method: m.method.clone().unwrap_or_default(),
                headers: header_matches(&m.headers, true),
                query_params: header_matches(&m.query_params, false),
                ..Default::default()
            })
            .collect();
        let timeout = rule.timeouts.as_ref().and_then(|t| t.request.as_deref());
        let backend_timeout = rule.timeouts.as_ref().and_then(|t| t.backend_request.as_deref());
        let retry = rule.retry.as_ref().map(|r| wp::Retry {
            attempts: r.attempts.unwrap_or(1),
            codes: r.codes.clone(),
            backoff: opt_duration(
                r.backoff.as_deref(),
                kind,
                key,
                &format!("rules[{i}].retry.backoff"),
                report,
            ),
            ..Default::default()
        });
        let chosen = backends(&rule.backend_refs, (inputs, options), (kind, key), FAILS_500, report);
        let mut r = wp::Route {
            name: format!("HTTPRoute/{key}/rules[{i}]"),
            matches,
            fault: chosen.refused_fault(),
            backends: chosen.permitted,
            timeout: opt_duration(timeout, kind, key, &format!("rules[{i}].timeouts.request"), report),
            backend_timeout: opt_duration(
                backend_timeout,
                kind,
                key,
                &format!("rules[{i}].timeouts.backendRequest"),
                report,
            ),
            retry,
            ..Default::default()
        };
        for f in &rule.filters {
            apply_filter(&mut r, f, (inputs, options), (key, i), report);
        }
        out.push(r);
    }
    accept_rules(kind, key, out, gateway_match_field, report)
}

/// Applies one HTTPRoute filter of `rules[i]` of route `key` to its compiled route; an
/// unsupported filter is reported and ignored.
fn apply_filter(
    r: &mut wp::Route,
    f: &gateway::HttpRouteFilter,
    (inputs, options): (&Inputs, &Options),
    (key, i): (&ObjectKey, usize),
    report: &mut Report,
) {
    let kind = Kind::HttpRoute;
    match f.kind.as_str() {
        "RequestHeaderModifier" => r.request_headers = f.request_header_modifier.as_ref().map(header_rewrite),
        "ResponseHeaderModifier" => r.response_headers = f.response_header_modifier.as_ref().map(header_rewrite),
        "RequestRedirect" => {
            r.redirect = f.request_redirect.as_ref().map(|x| {
                let (path, replace_prefix) = path_modifier(x.path.as_ref());
                wp::Redirect {
                    scheme: x.scheme.clone().unwrap_or_default(),
                    host: x.hostname.clone().unwrap_or_default(),
                    port: x.port.map(u32::from).unwrap_or(0),
                    path,
                    replace_prefix,
                    status: x.status_code.unwrap_or(302),
                }
            })
        }
        "URLRewrite" => {
            r.rewrite = f.url_rewrite.as_ref().map(|x| {
                let (path, replace_prefix) = path_modifier(x.path.as_ref());
                wp::Rewrite {
                    host: x.hostname.clone().unwrap_or_default(),
                    path,
                    replace_prefix,
                }
            })
        }
        "RequestMirror" => {
            if let Some(m) = &f.request_mirror {
                let refs = std::slice::from_ref(&m.backend_ref);
                r.mirrors
                    .extend(backends(refs, (inputs, options), (kind, key), NOT_MIRRORED, report).permitted);
            }
        }
        other => report.add(
            kind,
            key,
            format!("rules[{i}]: filter {other} is not supported; ignored"),
        ),
    }
}

fn http_routes(inputs: &Inputs, options: &Options, routes: &mut Routes, report: &mut Report) {
    let compile = |key: &ObjectKey, route: &gateway::HttpRoute, report: &mut Report| {
        compile_http_route(inputs, options, key, route, report)
    };
    let items = by_age(inputs.http_routes.iter(), |r| &r.metadata);
    attach(
        routes,
        (inputs, options),
        report,
        Kind::HttpRoute,
        items,
        |r| &r.spec.parent_refs,
        compile,
    );

    let compile = |key: &ObjectKey, route: &gateway::GrpcRoute, report: &mut Report| {
        let kind = Kind::GrpcRoute;
        let mut out = Vec::with_capacity(route.spec.rules.len());
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let matches = rule
                .matches
                .iter()
                .map(|m| wp::RouteMatch {
                    grpc_service: m.method.as_ref().and_then(|x| x.service.clone()).unwrap_or_default(),
                    grpc_method: m.method.as_ref().and_then(|x| x.method.clone()).unwrap_or_default(),
                    headers: header_matches(&m.headers, true),
                    ..Default::default()
                })
                .collect();
            let chosen = backends(&rule.backend_refs, (inputs, options), (kind, key), FAILS_500, report);
            out.push(wp::Route {
                name: format!("GRPCRoute/{key}/rules[{i}]"),
                matches,
                fault: chosen.refused_fault(),
                backends: chosen.permitted,
                ..Default::default()
            });
        }
        accept_rules(kind, key, out, gateway_match_field, report)
    };
    let items = by_age(inputs.grpc_routes.iter(), |r| &r.metadata);
    attach(
        routes,
        (inputs, options),
        report,
        Kind::GrpcRoute,
        items,
        |r| &r.spec.parent_refs,
        compile,
    );
}

/// TCPRoute: the first rule's weighted backends carry every connection (TCP has nothing to
/// match on); the waypoint uses routes named `TCPRoute/...` for traffic it proxies as TCP.
/// Compiles a TCPRoute: its first rule's weighted backends (cross-namespace ones need a
/// ReferenceGrant), for a waypoint's service or an ingress listener alike.
pub(super) fn compile_tcp_route(
    inputs: &Inputs,
    options: &Options,
    key: &ObjectKey,
    route: &gateway::TcpRoute,
    report: &mut Report,
) -> Vec<wp::Route> {
    compile_l4_rules(inputs, options, (Kind::TcpRoute, key), &route.spec.rules, report)
}

/// The rules of a TCPRoute or TLSRoute (`kind`): the first rule's weighted backends, as a
/// route named `<Kind>/<key>/rules[0]` (the waypoint proxies such routes as TCP).
pub(super) fn compile_l4_rules(
    inputs: &Inputs,
    options: &Options,
    (kind, key): (Kind, &ObjectKey),
    rules: &[gateway::TcpRouteRule],
    report: &mut Report,
) -> Vec<wp::Route> {
    if rules.len() > 1 {
        let msg = format!(
            "only the first rule of a {} is used; the others are ignored",
            kind.name()
        );
        report.add(kind, key, msg);
    }
    let Some(rule) = rules.first() else {
        return Vec::new();
    };
    let chosen = backends(&rule.backend_refs, (inputs, options), (kind, key), TCP_UNUSED, report);
    if chosen.permitted.is_empty() && chosen.refused_weight > 0 {
        // TCP has no error response: without a backend it may use, the rule is refused and
        // connections go to the parent Service, as with no route at all.
        return Vec::new();
    }
    vec![wp::Route {
        name: format!("{}/{key}/rules[0]", kind.name()),
        backends: chosen.permitted,
        ..Default::default()
    }]
}

fn tcp_routes(inputs: &Inputs, options: &Options, routes: &mut Routes, report: &mut Report) {
    let compile = |key: &ObjectKey, route: &gateway::TcpRoute, report: &mut Report| {
        Ok(compile_tcp_route(inputs, options, key, route, report))
    };
    let items = by_age(inputs.tcp_routes.iter(), |r| &r.metadata);
    attach(
        routes,
        (inputs, options),
        report,
        Kind::TcpRoute,
        items,
        |r| &r.spec.parent_refs,
        compile,
    );
}

fn percent(p: Option<&istio::Percent>) -> f64 {
    p.map(|p| p.value).unwrap_or(100.0)
}

fn virtual_services(inputs: &Inputs, options: &Options, routes: &mut Routes, report: &mut Report) {
    for (key, vs) in by_age(inputs.virtual_services.iter(), |v| &v.metadata) {
        let kind = Kind::VirtualService;
        let ns = key.namespace.as_str();
        if vs.spec.gateways.iter().any(|g| g != "mesh") {
            continue; // Routes for ingress gateways, not the mesh.
        }
        if !vs_matches_compile(vs, key, report) {
            continue;
        }
        for host in &vs.spec.hosts {
            if host.contains('*') {
                report.add(kind, key, format!("wildcard host {host:?} is not supported; skipped"));
                continue;
            }
            let service = host_key(host, ns, options);
            let target = entry(routes, &service);
            target.sources.push(format!("VirtualService/{key}"));
            for (i, http) in vs.spec.http.iter().enumerate() {
                let route = vs_route(http, i, key, &|h: &str| host_key(h, ns, options), report);
                target.routes.push(route);
            }
        }
    }
}

/// Whether every match of VirtualService `key` compiles in the proxy; otherwise each invalid
/// field is reported and the VirtualService is refused whole, for every host (as admission
/// would refuse it; see [`accept_rules`] for why not the one route alone).
fn vs_matches_compile(vs: &istio::VirtualService, key: &ObjectKey, report: &mut Report) -> bool {
    let routes: Vec<wp::Route> = vs
        .spec
        .http
        .iter()
        .map(|http| wp::Route {
            matches: vs_matches(http),
            ..Default::default()
        })
        .collect();
    let field = |i: usize, j: usize, f: &Field| {
        let spelled = |names: Option<&BTreeMap<String, istio::StringMatch>>, name: &str| {
            names
                .and_then(|n| n.keys().find(|k| k.eq_ignore_ascii_case(name)))
                .cloned()
                .unwrap_or_else(|| name.to_owned())
        };
        let m = vs.spec.http.get(i).and_then(|h| h.matches.get(j));
        let part = match f {
            Field::Path => "uri.regex".to_owned(),
            Field::Method => "method.exact".to_owned(),
            Field::Header { name, .. } => format!("headers.{}.regex", spelled(m.map(|m| &m.headers), name)),
            Field::QueryParam { name, .. } => {
                format!("queryParams.{}.regex", spelled(m.map(|m| &m.query_params), name))
            }
        };
        format!("spec.http[{i}].match[{j}].{part}")
    };
    let invalid = invalid_matches(&routes, field);
    for m in &invalid {
        report.add(
            Kind::VirtualService,
            key,
            format!("{m}; the VirtualService is not applied"),
        );
    }
    invalid.is_empty()
}

/// The matches of a VirtualService `http` route.
fn vs_matches(http: &istio::HttpRoute) -> Vec<wp::RouteMatch> {
    http.matches
        .iter()
        .map(|m| wp::RouteMatch {
            path: m.uri.as_ref().and_then(istio_match),
            method: m.method.as_ref().and_then(|s| s.exact.clone()).unwrap_or_default(),
            headers: istio_matches(&m.headers, true),
            query_params: istio_matches(&m.query_params, false),
            ..Default::default()
        })
        .collect()
}

/// One `http` route of a VirtualService (`i`-th, for problem locations) as a waypoint route;
/// `host` names a destination host as a service key.
fn vs_route(
    http: &istio::HttpRoute,
    i: usize,
    key: &ObjectKey,
    host: &dyn Fn(&str) -> String,
    report: &mut Report,
) -> wp::Route {
    let kind = Kind::VirtualService;
    let matches = vs_matches(http);
    let field = |f: &str| format!("http[{i}].{f}");
    let single = http.route.len() == 1;
    let backends = http
        .route
        .iter()
        .map(|d| wp::WeightedBackend {
            service: host(&d.destination.host),
            port: d.destination.port.as_ref().map(|p| p.number).unwrap_or(0),
            weight: d.weight.unwrap_or(if single { 100 } else { 0 }),
            subset: d.destination.subset.clone().unwrap_or_default(),
        })
        .collect();
    let retry = http.retries.as_ref().map(|r| wp::Retry {
        attempts: r.attempts,
        per_try_timeout: opt_duration(
            r.per_try_timeout.as_deref(),
            kind,
            key,
            &field("retries.perTryTimeout"),
            report,
        ),
        retry_on: r
            .retry_on
            .iter()
            .flat_map(|s| s.split(','))
            .map(|s| s.trim().to_owned())
            .collect(),
        ..Default::default()
    });
    let fault = http.fault.as_ref().map(|f| wp::Fault {
        delay: f.delay.as_ref().and_then(|d| {
            opt_duration(
                d.fixed_delay.as_deref(),
                kind,
                key,
                &field("fault.delay.fixedDelay"),
                report,
            )
        }),
        delay_percent: f.delay.as_ref().map(|d| percent(d.percentage.as_ref())).unwrap_or(0.0),
        abort_status: f.abort.as_ref().and_then(|a| a.http_status).unwrap_or(0),
        abort_percent: f.abort.as_ref().map(|a| percent(a.percentage.as_ref())).unwrap_or(0.0),
    });
    wp::Route {
        name: format!(
            "VirtualService/{key}/{}",
            http.name.clone().unwrap_or_else(|| format!("http[{i}]"))
        ),
        matches,
        backends,
        timeout: opt_duration(http.timeout.as_deref(), kind, key, &field("timeout"), report),
        retry,
        fault,
        ..Default::default()
    }
}

/// `connectionPool.tcp.idleTimeout`: `0s` turns it off; anything else under a millisecond
/// (Envoy's resolution) would close connections between two packets, and is refused.
fn idle_timeout(text: Option<&str>, key: &ObjectKey, report: &mut Report) -> Option<prost_types::Duration> {
    const FIELD: &str = "connectionPool.tcp.idleTimeout";
    let d = opt_duration(text, Kind::DestinationRule, key, FIELD, report)?;
    let millis = Duration::try_from(d).map_or(0, |d| d.as_nanos() / 1_000_000);
    if millis == 0 && (d.seconds, d.nanos) != (0, 0) {
        report.add(
            Kind::DestinationRule,
            key,
            format!(
                "{FIELD}: {:?} is under 1ms (0s turns the timeout off); ignored",
                text.unwrap_or_default()
            ),
        );
        return None;
    }
    Some(d)
}

fn traffic_policy(p: &TrafficPolicy, key: &ObjectKey, report: &mut Report) -> wp::TrafficPolicy {
    let kind = Kind::DestinationRule;
    let pool = p.connection_pool.as_ref().map(|c| wp::ConnectionPool {
        max_connections: c.tcp.as_ref().and_then(|t| t.max_connections).unwrap_or(0),
        connect_timeout: opt_duration(
            c.tcp.as_ref().and_then(|t| t.connect_timeout.as_deref()),
            kind,
            key,
            "connectionPool.tcp.connectTimeout",
            report,
        ),
        max_pending_requests: c.http.as_ref().and_then(|h| h.http1_max_pending_requests).unwrap_or(0),
        max_requests: c.http.as_ref().and_then(|h| h.http2_max_requests).unwrap_or(0),
        max_requests_per_connection: c.http.as_ref().and_then(|h| h.max_requests_per_connection).unwrap_or(0),
        max_retries: c.http.as_ref().and_then(|h| h.max_retries).unwrap_or(0),
        tcp_idle_timeout: idle_timeout(c.tcp.as_ref().and_then(|t| t.idle_timeout.as_deref()), key, report),
    });
    let outlier = p.outlier_detection.as_ref().map(|o| wp::OutlierDetection {
        consecutive_5xx_errors: o.consecutive5xx_errors.unwrap_or(0),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval: opt_duration(o.interval.as_deref(), kind, key, "outlierDetection.interval", report),
        base_ejection_time: opt_duration(
            o.base_ejection_time.as_deref(),
            kind,
            key,
            "outlierDetection.baseEjectionTime",
            report,
        ),
        max_ejection_percent: o.max_ejection_percent.unwrap_or(0),
        min_health_percent: o.min_health_percent.unwrap_or(0),
    });
    let load_balancer = p.load_balancer.as_ref().and_then(|lb| {
        let locality = locality::failover(lb.locality_lb_setting.as_ref(), outlier.is_some(), key, report);
        let simple = lb.simple.clone().filter(|simple| {
            let known = matches!(
                simple.as_str(),
                "ROUND_ROBIN" | "LEAST_REQUEST" | "RANDOM" | "PASSTHROUGH" | "UNSPECIFIED"
            );
            if !known {
                report.add(
                    kind,
                    key,
                    format!("loadBalancer.simple {simple:?} is not supported; using ROUND_ROBIN"),
                );
            }
            known
        });
        (simple.is_some() || locality.is_some()).then(|| wp::LoadBalancer {
            simple: simple.unwrap_or_default(),
            locality,
        })
    });
    wp::TrafficPolicy {
        connection_pool: pool,
        outlier_detection: outlier,
        load_balancer,
        ..Default::default()
    }
}

/// Uids of the pods in the service's namespace whose labels include `labels`: workload
/// resources carry no labels, so the waypoint learns subset membership from here.
fn subset_workloads(
    inputs: &Inputs,
    options: &Options,
    service: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<String> {
    let namespace = service.split('/').next().unwrap_or_default();
    inputs
        .pods
        .iter()
        .filter(|(key, _)| key.namespace == namespace)
        .filter(|(_, pod)| {
            let have = pod.metadata.labels.as_ref();
            labels.iter().all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
        })
        .map(|(key, _)| super::workload::pod_uid(options, key))
        .collect()
}

/// The DestinationRules a waypoint applies, as Istio's lookup for a proxy in the service's
/// namespace finds them: the service's own namespace first, then the root namespace (the
/// oldest wins within each). A rule in any other namespace configures its own clients in
/// Istio, never the service's proxy: here it would let one namespace set another's TLS,
/// connection pool and outlier detection, so it is reported and skipped.
fn destination_rules(inputs: &Inputs, options: &Options, routes: &mut Routes, report: &mut Report) {
    let mut rules = by_age(inputs.destination_rules.iter(), |d| &d.metadata);
    rules.sort_by_key(|(key, _)| key.namespace == options.root_namespace); // stable: age kept
    for (key, dr) in rules {
        let host = super::upstream_tls::host(inputs, &dr.spec.host, &key.namespace, || {
            host_key(&dr.spec.host, &key.namespace, options)
        });
        let service = host.service.clone();
        let service_ns = service.split_once('/').map_or("", |(ns, _)| ns);
        if key.namespace != service_ns && key.namespace != options.root_namespace {
            report.add(
                Kind::DestinationRule,
                key,
                format!(
                    "spec.host {}: {service} is in namespace {service_ns}; a DestinationRule in {} \
                     does not configure another namespace's service at its waypoint (put it in \
                     {service_ns} or {}); ignored",
                    dr.spec.host, key.namespace, options.root_namespace
                ),
            );
            continue;
        }
        let policy = |p: &TrafficPolicy, report: &mut Report| {
            let mut out = traffic_policy(p, key, report);
            super::upstream_tls::translate(p, key, &host, &mut out, report);
            out
        };
        let target = entry(routes, &service);
        if target.traffic_policy.is_some() || !target.subsets.is_empty() {
            report.add(
                Kind::DestinationRule,
                key,
                format!("an older DestinationRule already configures {service}; ignored"),
            );
            continue;
        }
        target.sources.push(format!("DestinationRule/{key}"));
        target.traffic_policy = dr.spec.traffic_policy.as_ref().map(|p| policy(p, report));
        target.subsets = dr
            .spec
            .subsets
            .iter()
            .map(|s| wp::Subset {
                name: s.name.clone(),
                labels: s.labels.clone(),
                traffic_policy: s.traffic_policy.as_ref().map(|p| policy(p, report)),
                workloads: subset_workloads(inputs, options, &service, &s.labels),
            })
            .collect();
    }
}

pub(crate) fn translate(
    inputs: &Inputs,
    options: &Options,
    report: &mut Report,
) -> (Routes, BTreeMap<String, wp::Policy>) {
    let mut routes = Routes::new();
    http_routes(inputs, options, &mut routes, report);
    tcp_routes(inputs, options, &mut routes, report);
    virtual_services(inputs, options, &mut routes, report);
    destination_rules(inputs, options, &mut routes, report);
    (routes, super::waypoint_policy::policies(inputs, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: front}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web}]
  rules: [{backendRefs: [{name: api, namespace: backend, port: 80}]}]
";
    const GRANT: &str = "
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: g, namespace: backend}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: front}]
  to: [{group: \"\", kind: Service}]
";

    fn translated(docs: &[&str]) -> (Routes, Vec<super::super::Problem>) {
        let mut inputs = Inputs::default();
        for doc in docs {
            let value: serde_json::Value = serde_yaml::from_str(doc).expect("yaml");
            inputs.apply(crate::model::Object::parse(value).expect("object"));
        }
        let mut report = Report::default();
        let (routes, _) = translate(&inputs, &Options::default(), &mut report);
        (routes, report.0)
    }

    /// A DestinationRule for `payments.shop` in namespace `ns`, made at second `age`, with a
    /// connection limit that tells the rules apart.
    fn payments_rule(ns: &str, age: u32, max: u32) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule
metadata: {{name: d, namespace: {ns}, creationTimestamp: \"2026-01-01T00:00:{age:02}Z\"}}
spec:
  host: payments.shop.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: {max}"
        )
    }

    /// Istio's lookup for the service's proxy: its own namespace's rule, else the root
    /// namespace's; never another namespace's, however old (that would let `evil` set shop's
    /// limits, TLS and outlier detection).
    #[test]
    fn only_the_services_namespace_and_the_root_configure_it() {
        let limit = |docs: &[String]| {
            let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
            let (routes, problems) = translated(&docs);
            let policy = routes
                .get("shop/payments.shop.svc.cluster.local")
                .and_then(|r| r.traffic_policy.clone());
            let max = policy.and_then(|p| p.connection_pool).map(|c| c.max_connections);
            let refused = problems.iter().filter(|p| p.object.namespace == "evil").count();
            (max, refused)
        };
        let (evil, root, shop) = (
            payments_rule("evil", 1, 1),
            payments_rule("istio-system", 2, 2),
            payments_rule("shop", 3, 3),
        );
        assert_eq!(limit(std::slice::from_ref(&evil)), (None, 1));
        assert_eq!(limit(&[evil.clone(), root.clone()]), (Some(2), 1));
        assert_eq!(limit(&[evil, root, shop]), (Some(3), 1));
    }

    #[test]
    fn cross_namespace_backend_is_refused_without_a_reference_grant() {
        let (routes, problems) = translated(&[ROUTE]);
        let route = &routes["front/web.front.svc.cluster.local"].routes[0];
        assert!(route.backends.is_empty(), "{route:?}");
        let fault = route.fault.as_ref().expect("the refused share fails");
        assert_eq!((fault.abort_status, fault.abort_percent), (500, 100.0));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.starts_with("RefNotPermitted: "), "{problems:?}");
        // Typed, so the route's status can say which reference was refused.
        assert_eq!(problems[0].refused, Some(RefusedRef::Backend));
    }

    #[test]
    fn cross_namespace_backend_is_accepted_with_a_reference_grant() {
        let (routes, problems) = translated(&[ROUTE, GRANT]);
        let route = &routes["front/web.front.svc.cluster.local"].routes[0];
        assert_eq!(route.backends.len(), 1);
        assert_eq!(route.backends[0].service, "backend/api.backend.svc.cluster.local");
        assert!(route.fault.is_none());
        assert!(problems.is_empty(), "{problems:?}");
    }

    /// A route or VirtualService with a match the proxy cannot compile is refused whole, with
    /// the field named; the service's other routes are untouched.
    #[test]
    fn routes_with_matches_the_proxy_cannot_compile_are_refused_whole() {
        let good = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute
metadata: {name: good, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web}]
  rules: [{matches: [{path: {type: PathPrefix, value: /}}], backendRefs: [{name: web, port: 80}]}]";
        let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute
metadata: {name: bad, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web}]
  rules:
  - backendRefs: [{name: web, port: 80}]
  - matches: [{headers: [{name: x, type: RegularExpression, value: \"[z\"}]}]
    backendRefs: [{name: web, port: 80}]";
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService
metadata: {name: v, namespace: shop}
spec:
  hosts: [api]
  http: [{match: [{queryParams: {Debug: {regex: \"(\"}}}], route: [{destination: {host: api}}]}]";
        let (routes, problems) = translated(&[good, bad, vs]);
        let names: Vec<&str> = routes["shop/web.shop.svc.cluster.local"]
            .routes
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["HTTPRoute/shop/good/rules[0]"]);
        assert!(routes
            .get("shop/api.shop.svc.cluster.local")
            .is_none_or(|r| r.routes.is_empty()));
        let bad_problem = problems.iter().find(|p| p.object.name == "bad").expect("reported");
        let field = r#"spec.rules[1].matches[0].headers[0].value "[z": not a valid regular expression"#;
        assert!(bad_problem.message.starts_with(field), "{problems:?}");
        assert!(matches!(&bad_problem.refused, Some(RefusedRef::Invalid(m)) if m.starts_with(field)));
        let vs_problem = problems.iter().find(|p| p.object.name == "v").expect("reported");
        assert!(
            vs_problem
                .message
                .starts_with(r#"spec.http[0].match[0].queryParams.Debug.regex "(""#),
            "{problems:?}"
        );
        assert!(problems.iter().all(|p| p.object.name != "good"), "{problems:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            duration("1.5s").unwrap(),
            prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            }
        );
        assert_eq!(duration("1m30s").unwrap().seconds, 90);
        assert_eq!(duration("250ms").unwrap().nanos, 250_000_000);
        assert!(duration("5").is_err());
        assert!(duration("").is_err());
        assert!(duration("3 days").is_err());
        // Past what a Duration holds: an error, not a panic that stops every translation.
        let huge = "10000000000000000000s10000000000000000000s";
        assert!(duration(huge).is_err());
    }

    #[test]
    fn tcp_idle_timeouts_are_read_and_sub_millisecond_ones_refused() {
        let rule = |idle: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: ns}}\n\
                 spec: {{host: api, trafficPolicy: {{connectionPool: {{tcp: {{idleTimeout: {idle}}}}}}}}}"
            )
        };
        let cases = [
            ("90s", Some((90, 0)), false),
            ("0s", Some((0, 0)), false),
            ("1ms", Some((0, 1_000_000)), false),
            ("500us", None, true),
            ("1ns", None, true),
            ("soon", None, true),
        ];
        for (idle, want, refused) in cases {
            let (routes, problems) = translated(&[&rule(idle)]);
            let pool = routes["ns/api.ns.svc.cluster.local"]
                .traffic_policy
                .as_ref()
                .and_then(|p| p.connection_pool.as_ref())
                .expect("a connection pool");
            let got = pool.tcp_idle_timeout.map(|d| (d.seconds, d.nanos));
            assert_eq!(got, want, "{idle}");
            assert_eq!(problems.len(), usize::from(refused), "{idle}: {problems:?}");
            if refused {
                assert!(
                    problems[0].message.contains("connectionPool.tcp.idleTimeout"),
                    "{problems:?}"
                );
            }
        }
    }
}
