//! Route selection: which compiled route a request takes. Gateway API routes follow the
//! spec's precedence (exact path, then longest prefix, then method, then most header and
//! query matches, then declaration order); VirtualService routes are tried in order.

use http::{HeaderMap, Method};
use mesh_proto::waypoint as wp;
use regex::Regex;

use mesh_core::route_match;

/// Why a route (one rule) could not be compiled: the route and its invalid match.
#[derive(Debug, thiserror::Error)]
#[error("{route}: matches[{index}].{source}")]
pub struct CompileError {
    pub route: String,
    pub index: usize,
    #[source]
    pub source: route_match::Invalid,
}

#[derive(Debug)]
enum Text {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl From<route_match::Text> for Text {
    fn from(t: route_match::Text) -> Text {
        match t {
            route_match::Text::Any => Text::Any,
            route_match::Text::Exact(v) => Text::Exact(v),
            route_match::Text::Prefix(v) => Text::Prefix(v),
            route_match::Text::Regex(r) => Text::Regex(r),
        }
    }
}

impl Text {
    fn matches(&self, v: &str) -> bool {
        match self {
            Text::Any => true,
            Text::Exact(e) => v == e,
            Text::Prefix(p) => v.starts_with(p.as_str()),
            Text::Regex(r) => r.is_match(v),
        }
    }

    /// Path prefixes match whole segments: `/v1` matches `/v1` and `/v1/x`, not `/v10`.
    fn matches_path(&self, path: &str) -> bool {
        match self {
            Text::Prefix(p) if p != "/" => {
                let p = p.trim_end_matches('/');
                path.starts_with(p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            other => other.matches(path),
        }
    }
}

#[derive(Debug)]
struct Match {
    path: Text,
    method: Option<Method>,
    /// `None`: a header name no request can carry; the match never matches.
    headers: Vec<(Option<http::HeaderName>, Text)>,
    query: Vec<(String, Text)>,
    grpc_service: String,
    grpc_method: String,
}

impl Match {
    /// Compiled by [`route_match::compile`], the function the controller checks routes with.
    fn compile(m: &wp::RouteMatch, route: &str, index: usize) -> Result<Match, CompileError> {
        let c = route_match::compile(m).map_err(|source| CompileError {
            route: route.to_owned(),
            index,
            source,
        })?;
        Ok(Match {
            path: c.path.into(),
            method: c.method,
            headers: c.headers.into_iter().map(|(n, t)| (n, t.into())).collect(),
            query: c.query.into_iter().map(|(n, t)| (n, t.into())).collect(),
            grpc_service: c.grpc_service,
            grpc_method: c.grpc_method,
        })
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        if !self.path.matches_path(req.path) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != req.method) {
            return false;
        }
        if !self.grpc_service.is_empty() || !self.grpc_method.is_empty() {
            // gRPC paths are "/<package.Service>/<Method>".
            let mut parts = req.path.trim_start_matches('/').splitn(2, '/');
            let (svc, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if (!self.grpc_service.is_empty() && svc != self.grpc_service)
                || (!self.grpc_method.is_empty() && method != self.grpc_method)
            {
                return false;
            }
        }
        let headers_ok = self.headers.iter().all(|(name, t)| {
            let Some(name) = name else { return false };
            let mut values = req.headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
            values.any(|v| t.matches(v))
        });
        headers_ok
            && self
                .query
                .iter()
                .all(|(name, t)| query_values(req.query, name).any(|v| t.matches(v)))
    }

    /// Gateway API precedence, larger first.
    fn precedence(&self) -> (u8, usize, bool, usize, usize) {
        let (exact, prefix_len) = match &self.path {
            Text::Exact(p) => (1, p.len()),
            Text::Prefix(p) => (0, p.len()),
            Text::Regex(_) => (0, 0),
            Text::Any => (0, 1),
        };
        (
            exact,
            prefix_len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

fn query_values<'a>(query: Option<&'a str>, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query.into_iter().flat_map(|q| q.split('&')).filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The parts of a request routes look at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// One route with its matches compiled.
#[derive(Debug)]
pub struct CompiledRoute {
    pub route: wp::Route,
    matches: Vec<Match>,
}

impl CompiledRoute {
    /// The path prefix that matched (for `ReplacePrefixMatch` rewrites), if any.
    pub fn matched_prefix(&self, req: &RequestView<'_>) -> Option<&str> {
        self.matches
            .iter()
            .find(|m| m.matches(req))
            .and_then(|m| match &m.path {
                Text::Prefix(p) => Some(p.as_str()),
                _ => None,
            })
    }
}

/// A service's routes, ready to match.
#[derive(Debug)]
pub struct CompiledRoutes {
    pub config: wp::ServiceRoutes,
    /// Where traffic proxied as TCP goes (a TCPRoute), if anywhere but the service itself.
    pub tcp: Option<wp::Route>,
    routes: Vec<CompiledRoute>,
    /// (route index, match index) in the order they are tried; a route without matches
    /// appears once with `usize::MAX` (matches everything).
    order: Vec<(usize, usize)>,
    /// The routes (rules) left out because a match of theirs does not compile.
    dropped: Vec<CompileError>,
}

impl CompiledRoutes {
    /// Compiles a table. A route (one rule) with a match that does not compile is left out
    /// whole, never served, and listed in [`Self::dropped`]; the table's other routes serve.
    /// Refusing the table instead would let one route (at an ingress host, any namespace the
    /// listener admits) take every other route of the table down. The controller refuses such
    /// routes before sending them (with the same [`route_match::compile`]), so this is
    /// defence in depth against other senders and version skew.
    ///
    /// What the dropped rule would have matched cannot be known (its match does not compile),
    /// so those requests take the next route that matches them, as if the rule were absent:
    /// the route author's own later rules, or the other routes of the table in their usual
    /// precedence. No route is widened (a route's other matches are dropped with it rather
    /// than left to match alone), and nothing another route shadowed is exposed that a
    /// configuration without the bad rule would not expose.
    pub fn compile(mut config: wp::ServiceRoutes) -> Self {
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut tcp = None;
        let mut dropped = Vec::new();
        for route in std::mem::take(&mut config.routes) {
            if route.name.starts_with("TCPRoute/") || route.name.starts_with("TLSRoute/") {
                // TCP routes (and TLS passthrough routes, TCP chosen by SNI) never see HTTP
                // requests.
                tcp.get_or_insert(route);
                continue;
            }
            let matches = route
                .matches
                .iter()
                .enumerate()
                .map(|(i, m)| Match::compile(m, &route.name, i))
                .collect::<Result<Vec<_>, _>>();
            match matches {
                Ok(matches) => routes.push(CompiledRoute { route, matches }),
                Err(e) => dropped.push(e),
            }
        }
        let mut order: Vec<(usize, usize)> = Vec::new();
        for (ri, r) in routes.iter().enumerate() {
            if r.matches.is_empty() {
                order.push((ri, usize::MAX));
            } else {
                order.extend((0..r.matches.len()).map(|mi| (ri, mi)));
            }
        }
        let gateway_api = routes
            .iter()
            .all(|r| r.route.name.starts_with("HTTPRoute/") || r.route.name.starts_with("GRPCRoute/"));
        if gateway_api {
            // Stable: equal precedence keeps declaration (oldest route first) order.
            order.sort_by_key(|&(ri, mi)| {
                let p = match routes[ri].matches.get(mi) {
                    Some(m) => m.precedence(),
                    None => (0, 1, false, 0, 0),
                };
                std::cmp::Reverse(p)
            });
        }
        CompiledRoutes {
            config,
            tcp,
            routes,
            order,
            dropped,
        }
    }

    /// The routes left out of this table, with why.
    pub fn dropped(&self) -> &[CompileError] {
        &self.dropped
    }

    /// No route at all: traffic goes to the service itself.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn select(&self, req: &RequestView<'_>) -> Option<&CompiledRoute> {
        self.order.iter().find_map(|&(ri, mi)| {
            let r = &self.routes[ri];
            let hit = match r.matches.get(mi) {
                Some(m) => m.matches(req),
                None => true,
            };
            hit.then_some(r)
        })
    }

    pub fn subset(&self, name: &str) -> Option<&wp::Subset> {
        self.config.subsets.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(v: &str) -> Option<wp::StringMatch> {
        Some(wp::StringMatch {
            kind: Some(wp::string_match::Kind::Exact(v.into())),
        })
    }

    fn prefix(v: &str) -> Option<wp::StringMatch> {
        Some(wp::StringMatch {
            kind: Some(wp::string_match::Kind::Prefix(v.into())),
        })
    }

    fn route(name: &str, matches: Vec<wp::RouteMatch>) -> wp::Route {
        wp::Route {
            name: name.into(),
            matches,
            ..Default::default()
        }
    }

    fn pick<'a>(r: &'a CompiledRoutes, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<&'a str> {
        let uri: http::Uri = uri.parse().unwrap();
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let view = RequestView {
            method: &method,
            path: uri.path(),
            query: uri.query(),
            headers: &h,
        };
        r.select(&view).map(|c| c.route.name.as_str())
    }

    #[test]
    fn gateway_api_precedence_beats_declaration_order() {
        let cfg = wp::ServiceRoutes {
            routes: vec![
                route(
                    "HTTPRoute/a/r/rules[0]",
                    vec![wp::RouteMatch {
                        path: prefix("/"),
                        ..Default::default()
                    }],
                ),
                route(
                    "HTTPRoute/a/r/rules[1]",
                    vec![wp::RouteMatch {
                        path: prefix("/"),
                        headers: vec![wp::HeaderMatch {
                            name: "x-canary".into(),
                            value: exact("true"),
                        }],
                        ..Default::default()
                    }],
                ),
                route(
                    "HTTPRoute/a/r/rules[2]",
                    vec![wp::RouteMatch {
                        path: exact("/v1"),
                        ..Default::default()
                    }],
                ),
                route(
                    "HTTPRoute/a/r/rules[3]",
                    vec![wp::RouteMatch {
                        path: prefix("/v1"),
                        query_params: vec![wp::HeaderMatch {
                            name: "debug".into(),
                            value: exact("1"),
                        }],
                        ..Default::default()
                    }],
                ),
            ],
            ..Default::default()
        };
        let r = CompiledRoutes::compile(cfg);
        assert_eq!(pick(&r, "GET", "/x", &[]), Some("HTTPRoute/a/r/rules[0]"));
        assert_eq!(
            pick(&r, "GET", "/x", &[("x-canary", "true")]),
            Some("HTTPRoute/a/r/rules[1]")
        );
        assert_eq!(
            pick(&r, "GET", "/v1", &[("x-canary", "true")]),
            Some("HTTPRoute/a/r/rules[2]")
        );
        assert_eq!(pick(&r, "GET", "/v1/a?debug=1", &[]), Some("HTTPRoute/a/r/rules[3]"));
        // Segment-wise prefix: /v10 is not under /v1.
        assert_eq!(pick(&r, "GET", "/v10?debug=1", &[]), Some("HTTPRoute/a/r/rules[0]"));
    }

    #[test]
    fn virtual_service_routes_keep_their_order_and_regex_is_anchored() {
        let cfg = wp::ServiceRoutes {
            routes: vec![
                route(
                    "VirtualService/a/v/http[0]",
                    vec![wp::RouteMatch {
                        path: Some(wp::StringMatch {
                            kind: Some(wp::string_match::Kind::Regex("/api/v[0-9]+".into())),
                        }),
                        method: "POST".into(),
                        ..Default::default()
                    }],
                ),
                route("VirtualService/a/v/http[1]", vec![]),
            ],
            ..Default::default()
        };
        let r = CompiledRoutes::compile(cfg);
        assert_eq!(pick(&r, "POST", "/api/v2", &[]), Some("VirtualService/a/v/http[0]"));
        assert_eq!(pick(&r, "POST", "/api/v2/x", &[]), Some("VirtualService/a/v/http[1]"));
        assert_eq!(pick(&r, "GET", "/api/v2", &[]), Some("VirtualService/a/v/http[1]"));
    }

    #[test]
    fn grpc_service_and_method() {
        let cfg = wp::ServiceRoutes {
            routes: vec![route(
                "GRPCRoute/a/g/rules[0]",
                vec![wp::RouteMatch {
                    grpc_service: "echo.Echo".into(),
                    grpc_method: "Stream".into(),
                    ..Default::default()
                }],
            )],
            ..Default::default()
        };
        let r = CompiledRoutes::compile(cfg);
        assert!(pick(&r, "POST", "/echo.Echo/Stream", &[]).is_some());
        assert!(pick(&r, "POST", "/echo.Echo/Unary", &[]).is_none());
    }

    /// One rule that does not compile is dropped; the table (other routes, other tenants')
    /// keeps serving, and the dropped rule's other matches do not serve either.
    #[test]
    fn a_bad_rule_is_dropped_and_the_table_serves() {
        let bad = |p: &str| wp::RouteMatch {
            path: Some(wp::StringMatch {
                kind: Some(wp::string_match::Kind::Regex(p.into())),
            }),
            ..Default::default()
        };
        let cfg = wp::ServiceRoutes {
            routes: vec![
                route(
                    "HTTPRoute/evil/r/rules[0]",
                    vec![
                        wp::RouteMatch {
                            path: prefix("/shop"),
                            ..Default::default()
                        },
                        bad("("),
                    ],
                ),
                route(
                    "HTTPRoute/shop/r/rules[0]",
                    vec![wp::RouteMatch {
                        path: prefix("/"),
                        ..Default::default()
                    }],
                ),
            ],
            ..Default::default()
        };
        let r = CompiledRoutes::compile(cfg);
        assert_eq!(pick(&r, "GET", "/shop/cart", &[]), Some("HTTPRoute/shop/r/rules[0]"));
        let dropped: Vec<String> = r.dropped().iter().map(|e| e.to_string()).collect();
        assert_eq!(dropped.len(), 1);
        assert!(
            dropped[0].starts_with(r#"HTTPRoute/evil/r/rules[0]: matches[1].path "(": not a valid regular expression"#),
            "{dropped:?}"
        );
    }

    #[test]
    fn a_header_name_that_cannot_exist_never_matches() {
        let cfg = wp::ServiceRoutes {
            routes: vec![route(
                "HTTPRoute/a/r/rules[0]",
                vec![wp::RouteMatch {
                    headers: vec![wp::HeaderMatch {
                        name: "bad name".into(),
                        value: None,
                    }],
                    ..Default::default()
                }],
            )],
            ..Default::default()
        };
        let r = CompiledRoutes::compile(cfg);
        assert!(r.dropped().is_empty());
        assert_eq!(pick(&r, "GET", "/", &[("x-invalid-header-name", "1")]), None);
    }
}
