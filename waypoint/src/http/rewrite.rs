//! Request and response edits a route asks for: header modifiers, URL rewrites, redirects,
//! and removing hop-by-hop headers before a message crosses the proxy. Also what a client may
//! not decide for itself: which protocol upgrades pass (WebSocket only), and the headers the
//! mesh vouches for, which never come from the client.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri, Version};
use mesh_proto::waypoint as wp;

use super::authority;
use crate::telemetry::trace;

/// Applies set/add/remove; names or values that are not valid HTTP are skipped (the
/// controller validated them, so this only guards against a buggy control plane).
pub fn headers(h: &mut HeaderMap, rw: &wp::HeaderRewrite) {
    let pair = |k: &str, v: &str| {
        Some((
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in &rw.set {
        if let Some((k, v)) = pair(k, v) {
            h.insert(k, v);
        }
    }
    for (k, v) in &rw.add {
        if let Some((k, v)) = pair(k, v) {
            h.append(k, v);
        }
    }
    for k in &rw.remove {
        h.remove(k.as_str());
    }
}

/// Headers that describe one hop, not the message.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Joins an HTTP/2 request's `cookie` fields into one, as a request going on over HTTP/1.1
/// must carry them (RFC 9113 §8.2.3: HTTP/2 clients may split cookies into one field each,
/// and many HTTP/1.1 servers read only the first `Cookie` line).
pub fn join_cookies(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<u8> = h
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// Headers a `Connection` list cannot remove: written by the mesh before stripping (the
/// ingress's X-Forwarded-For, the injected trace context), or already routed by (`Host`).
/// A client naming them would otherwise delete what the mesh vouches for.
fn written_by_mesh(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(name, "host" | "x-forwarded-for" | "x-forwarded-proto") || trace::HEADERS.contains(&name)
}

/// Drops hop-by-hop headers (and those `Connection` names, but for what the mesh wrote), and
/// keeps `te: trailers` (gRPC needs it). For a WebSocket upgrade (`upgrade`), the message then
/// carries exactly `Connection: upgrade` and `Upgrade: websocket`.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !written_by_mesh(n))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP.iter() {
        h.remove(n);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static(WEBSOCKET));
    }
}

/// The only protocol a client may switch to through the waypoint. After a 101 the bytes are
/// no longer requests the waypoint decides, so only a protocol whose frames a backend cannot
/// read as new requests may pass: never `h2c` (HTTP/2 after the switch), nothing unknown.
const WEBSOCKET: &str = "websocket";

/// What a request asks to switch to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpgradeRequest {
    None,
    WebSocket,
    /// An upgrade the waypoint does not forward (the request goes on without it).
    Refused(String),
}

fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Reads a request's `Upgrade`: a WebSocket upgrade needs HTTP/1.1, one `Upgrade` value
/// `websocket` and `Connection: upgrade`; any other `Upgrade` is refused.
pub fn upgrade_requested(version: Version, h: &HeaderMap) -> UpgradeRequest {
    let values: Vec<&HeaderValue> = h.get_all(header::UPGRADE).iter().collect();
    match values.as_slice() {
        [] => UpgradeRequest::None,
        [one]
            if version == Version::HTTP_11
                && one.as_bytes().trim_ascii().eq_ignore_ascii_case(WEBSOCKET.as_bytes())
                && has_token(h, header::CONNECTION, "upgrade") =>
        {
            UpgradeRequest::WebSocket
        }
        _ => UpgradeRequest::Refused(
            values
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", "),
        ),
    }
}

/// Whether a 101 answer switches to the protocol that was requested (WebSocket).
pub fn upgrade_confirmed(response: &HeaderMap) -> bool {
    let values: Vec<&HeaderValue> = response.get_all(header::UPGRADE).iter().collect();
    matches!(values.as_slice(), [one] if one.as_bytes().trim_ascii().eq_ignore_ascii_case(WEBSOCKET.as_bytes()))
}

/// Headers only the mesh may write: a client's copy is dropped from every request. The
/// RequestAuthentication outputs (`outputClaimToHeaders`, `outputPayloadToHeader`) are
/// dropped by the authenticator of the service that declares them.
const VOUCHED: [&str; 3] = [
    "x-forwarded-client-cert",
    "x-envoy-peer-metadata",
    "x-envoy-peer-metadata-id",
];

/// Removes the headers in [`VOUCHED`].
pub fn strip_vouched(h: &mut HeaderMap) {
    for n in VOUCHED {
        h.remove(n);
    }
}

/// The new path for a rewrite or redirect: the whole path, or only the matched prefix.
pub fn path(original: &str, replacement: &str, replace_prefix: bool, matched_prefix: Option<&str>) -> String {
    if !replace_prefix {
        return replacement.to_owned();
    }
    let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
    let rest = original.strip_prefix(prefix).unwrap_or(original);
    let base = replacement.trim_end_matches('/');
    match (base.is_empty(), rest.is_empty()) {
        (true, true) => "/".to_owned(),
        (true, false) => rest.to_owned(),
        (false, _) => format!("{base}{rest}"),
    }
}

/// A path and query as a URI suffix.
pub fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
}

/// Where a request arrived: the scheme the client used and the listener's port.
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    pub scheme: &'a str,
    pub port: u16,
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The `Location` and status of a redirect. As Gateway API says: an empty scheme is the
/// request's; without a port, a scheme the redirect sets brings its well-known port, else the
/// listener's port is kept; a scheme's default port is left out.
pub fn redirect(
    r: &wp::Redirect,
    uri: &Uri,
    host: &str,
    matched_prefix: Option<&str>,
    origin: Origin<'_>,
) -> (StatusCode, String) {
    let scheme = if r.scheme.is_empty() {
        origin.scheme
    } else {
        r.scheme.as_str()
    };
    // The request's host without its port, read by the canonical parser: cutting at the last
    // ':' made `[::1]` into `[:`. A host it refuses (not expected: it parsed on arrival) is
    // kept as it is rather than cut wrongly.
    let named = match r.host.as_str() {
        "" => authority::canonical(host).ok(),
        _ => None,
    };
    let host = match &named {
        Some(named) => named.host(),
        None if r.host.is_empty() => host,
        None => r.host.as_str(),
    };
    let port = match u16::try_from(r.port).ok().filter(|p| *p != 0) {
        Some(p) => p,
        None if r.scheme.is_empty() => origin.port,
        None => well_known_port(scheme).unwrap_or(origin.port),
    };
    let port = match well_known_port(scheme) == Some(port) {
        true => String::new(),
        false => format!(":{port}"),
    };
    let path = if r.path.is_empty() && !r.replace_prefix {
        uri.path().to_owned()
    } else {
        path(uri.path(), &r.path, r.replace_prefix, matched_prefix)
    };
    let status = u16::try_from(r.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| s.is_redirection())
        .unwrap_or(StatusCode::FOUND);
    (
        status,
        format!("{scheme}://{host}{port}{}", with_query(&path, uri.query())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cookies_are_joined_and_one_is_left_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1");
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
    }

    #[test]
    fn prefix_rewrites() {
        assert_eq!(path("/v1/users", "/api/v2", true, Some("/v1")), "/api/v2/users");
        assert_eq!(path("/v1", "/", true, Some("/v1")), "/");
        assert_eq!(path("/v1/users", "/", true, Some("/v1")), "/users");
        assert_eq!(path("/anything", "/fixed", false, None), "/fixed");
    }

    #[test]
    fn redirects_keep_what_is_not_replaced() {
        let r = wp::Redirect {
            scheme: "https".into(),
            status: 301,
            ..Default::default()
        };
        let uri: Uri = "/a/b?x=1".parse().unwrap();
        let plain = Origin {
            scheme: "http",
            port: 8080,
        };
        assert_eq!(
            redirect(&r, &uri, "shop.example:8080", None, plain),
            (StatusCode::MOVED_PERMANENTLY, "https://shop.example/a/b?x=1".to_owned())
        );
    }

    #[test]
    fn a_redirect_keeps_the_request_host_without_its_port_ipv6_too() {
        let uri: Uri = "/a?x=1".parse().unwrap();
        let origin = Origin {
            scheme: "http",
            port: 8080,
        };
        let keep_host = wp::Redirect::default();
        let to_https = wp::Redirect {
            scheme: "https".into(),
            ..Default::default()
        };
        // (request host, redirect) -> Location
        let cases = [
            ("[::1]", &keep_host, "http://[::1]:8080/a?x=1"),
            ("[::1]:8080", &keep_host, "http://[::1]:8080/a?x=1"),
            ("[2001:db8::7]:9000", &to_https, "https://[2001:db8::7]/a?x=1"),
            ("[2001:db8::7]", &to_https, "https://[2001:db8::7]/a?x=1"),
            ("10.0.0.1", &keep_host, "http://10.0.0.1:8080/a?x=1"),
            ("10.0.0.1:8080", &to_https, "https://10.0.0.1/a?x=1"),
            ("shop.example", &keep_host, "http://shop.example:8080/a?x=1"),
            ("shop.example:8080", &to_https, "https://shop.example/a?x=1"),
        ];
        for (host, r, want) in cases {
            let (_, location) = redirect(r, &uri, host, None, origin);
            assert_eq!(location, want, "{host} {r:?}");
        }
        // A configured host replaces the request's, whatever form that had.
        let to_host = wp::Redirect {
            host: "new.example".into(),
            ..Default::default()
        };
        for host in ["[::1]", "[::1]:8080", "10.0.0.1:8080", "shop.example"] {
            let (_, location) = redirect(&to_host, &uri, host, None, origin);
            assert_eq!(location, "http://new.example:8080/a?x=1", "{host}");
        }
    }

    #[test]
    fn a_redirect_without_scheme_or_port_keeps_the_requests() {
        let uri: Uri = "/a?x=1".parse().unwrap();
        let tls = |port| Origin { scheme: "https", port };
        let to = |scheme: &str, port: u32| wp::Redirect {
            scheme: scheme.into(),
            port,
            host: "new.example".into(),
            ..Default::default()
        };
        let cases = [
            (to("", 0), tls(443), "https://new.example/a?x=1"),
            (to("", 0), tls(8443), "https://new.example:8443/a?x=1"),
            (to("http", 0), tls(8443), "http://new.example/a?x=1"),
            (to("", 80), tls(443), "https://new.example:80/a?x=1"),
            (to("https", 443), tls(8443), "https://new.example/a?x=1"),
            (
                to("", 0),
                Origin {
                    scheme: "http",
                    port: 80,
                },
                "http://new.example/a?x=1",
            ),
        ];
        for (r, origin, want) in cases {
            let (_, location) = redirect(&r, &uri, "shop.example", None, origin);
            assert_eq!(location, want, "{r:?} {origin:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go_but_upgrades_stay() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "upgrade, x-private".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        let mut plain = h.clone();
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key(header::UPGRADE) && h.contains_key(header::TE) && !h.contains_key("x-private"));
        assert_eq!(h.get(header::CONNECTION).map(|v| v.as_bytes()), Some(&b"upgrade"[..]));
        strip_hop_by_hop(&mut plain, false);
        assert!(!plain.contains_key(header::UPGRADE) && !plain.contains_key(header::CONNECTION));
    }

    #[test]
    fn a_connection_token_cannot_remove_what_the_mesh_writes_later() {
        // Stripping runs before authentication adds its headers, and once stripped a
        // WebSocket request names only `upgrade`: a second pass removes nothing else.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "upgrade, x-jwt-group".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        h.insert("x-jwt-group", "admins".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key("x-jwt-group"));
    }

    #[test]
    fn a_connection_list_cannot_remove_what_the_mesh_wrote() {
        let mut h = HeaderMap::new();
        let named = "keep-alive, X-Forwarded-For, traceparent, x-b3-traceid, host, x-forwarded-proto, x-private";
        h.insert(header::CONNECTION, named.parse().unwrap());
        h.insert(header::HOST, "shop.example".parse().unwrap());
        h.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        let ctx = trace::extract(&HeaderMap::new(), 100.0);
        trace::inject(&ctx, &mut h);
        h.insert("x-private", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-private") && !h.contains_key(header::CONNECTION));
        for kept in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "traceparent",
            "x-b3-traceid",
            "host",
        ] {
            assert!(h.contains_key(kept), "{kept} was removed");
        }
    }

    #[test]
    fn only_websocket_upgrades_pass() {
        let req = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, v.parse().unwrap());
            }
            h
        };
        let v11 = Version::HTTP_11;
        let ws = req(&[("connection", "keep-alive, Upgrade"), ("upgrade", "WebSocket")]);
        assert_eq!(upgrade_requested(v11, &ws), UpgradeRequest::WebSocket);
        assert_eq!(upgrade_requested(v11, &req(&[])), UpgradeRequest::None);
        let cases = [
            req(&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")]),
            req(&[("connection", "upgrade"), ("upgrade", "websocket, h2c")]),
            req(&[("connection", "upgrade"), ("upgrade", "websocket"), ("upgrade", "h2c")]),
            req(&[("upgrade", "websocket")]),
            req(&[("connection", "upgrade"), ("upgrade", "foo/1")]),
        ];
        for h in &cases {
            assert!(matches!(upgrade_requested(v11, h), UpgradeRequest::Refused(_)), "{h:?}");
        }
        assert!(matches!(
            upgrade_requested(Version::HTTP_10, &ws),
            UpgradeRequest::Refused(_)
        ));
        assert!(upgrade_confirmed(&req(&[("upgrade", "websocket")])));
        assert!(!upgrade_confirmed(&req(&[("upgrade", "h2c")])));
        assert!(!upgrade_confirmed(&req(&[])));
        let mut h = req(&[("x-forwarded-client-cert", "By=x"), ("x-envoy-peer-metadata-id", "y")]);
        strip_vouched(&mut h);
        assert!(h.is_empty());
    }
}
