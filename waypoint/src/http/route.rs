//! Route selection: which compiled route a request takes. Gateway API routes follow the
//! spec's precedence (exact path, then longest prefix, then method, then most header and
//! query matches, then declaration order); VirtualService routes are tried in order.

use http::{HeaderMap, Method};
use mesh_proto::waypoint as wp;
use regex::Regex;

/// Why a route could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{route}: invalid regular expression {pattern:?}: {source}")]
    Regex {
        route: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("{route}: method {method:?} is not an HTTP method")]
    Method { route: String, method: String },
}

#[derive(Debug)]
enum Text {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Text {
    fn compile(m: Option<&wp::StringMatch>, route: &str) -> Result<Text, CompileError> {
        use wp::string_match::Kind;
        Ok(match m.and_then(|m| m.kind.as_ref()) {
            None => Text::Any,
            Some(Kind::Exact(v)) => Text::Exact(v.clone()),
            Some(Kind::Prefix(v)) => Text::Prefix(v.clone()),
            Some(Kind::Regex(p)) => {
                // Anchored: Gateway API and Istio match the whole value.
                let re = Regex::new(&format!("^(?:{p})$")).map_err(|source| CompileError::Regex {
                    route: route.to_owned(),
                    pattern: p.clone(),
                    source,
                })?;
                Text::Regex(re)
            }
        })
    }

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
    headers: Vec<(http::HeaderName, Text)>,
    query: Vec<(String, Text)>,
    grpc_service: String,
    grpc_method: String,
}

impl Match {
    fn compile(m: &wp::RouteMatch, route: &str) -> Result<Match, CompileError> {
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                Method::from_bytes(m.method.as_bytes()).map_err(|_| CompileError::Method {
                    route: route.to_owned(),
                    method: m.method.clone(),
                })?,
            )
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for h in &m.headers {
            // A header name that cannot exist never matches; keep the rule, drop nothing silently.
            let name = http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                .unwrap_or_else(|_| http::HeaderName::from_static("x-invalid-header-name"));
            headers.push((name, Text::compile(h.value.as_ref(), route)?));
        }
        let query = m
            .query_params
            .iter()
            .map(|q| Ok((q.name.clone(), Text::compile(q.value.as_ref(), route)?)))
            .collect::<Result<_, CompileError>>()?;
        Ok(Match {
            path: Text::compile(m.path.as_ref(), route)?,
            method,
            headers,
            query,
            grpc_service: m.grpc_service.clone(),
            grpc_method: m.grpc_method.clone(),
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
}

impl CompiledRoutes {
    pub fn compile(mut config: wp::ServiceRoutes) -> Result<Self, CompileError> {
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut tcp = None;
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
                .map(|m| Match::compile(m, &route.name))
                .collect::<Result<Vec<_>, _>>()?;
            routes.push(CompiledRoute { route, matches });
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
        Ok(CompiledRoutes {
            config,
            tcp,
            routes,
            order,
        })
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
        let r = CompiledRoutes::compile(cfg).unwrap();
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
        let r = CompiledRoutes::compile(cfg).unwrap();
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
        let r = CompiledRoutes::compile(cfg).unwrap();
        assert!(pick(&r, "POST", "/echo.Echo/Stream", &[]).is_some());
        assert!(pick(&r, "POST", "/echo.Echo/Unary", &[]).is_none());
    }

    #[test]
    fn bad_regex_is_a_compile_error_naming_the_route() {
        let cfg = wp::ServiceRoutes {
            routes: vec![route(
                "HTTPRoute/a/r/rules[0]",
                vec![wp::RouteMatch {
                    path: Some(wp::StringMatch {
                        kind: Some(wp::string_match::Kind::Regex("(".into())),
                    }),
                    ..Default::default()
                }],
            )],
            ..Default::default()
        };
        let e = CompiledRoutes::compile(cfg).unwrap_err().to_string();
        assert!(e.contains("HTTPRoute/a/r/rules[0]"), "{e}");
    }
}
