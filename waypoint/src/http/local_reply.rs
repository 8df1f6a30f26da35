//! Answers the waypoint writes itself instead of a backend: every refusal or failure of the
//! request pipeline is one [`LocalReply`] variant, which knows its HTTP status, Envoy response
//! flag, gRPC status, body, extra headers and rejection metric. An early return therefore
//! cannot forget its flag: the only way to answer locally is to build a variant.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::upstream::cluster::Overflow;
use crate::upstream::Body;

/// Envoy's response flags (the `%RESPONSE_FLAGS%` short names) this waypoint sets; they appear
/// in the access log and in the `response_flags` metric label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResponseFlag {
    /// Nothing to report (`-`).
    #[default]
    None,
    /// `NR`: no route, or the route's backend (service or subset) is unknown.
    NoRoute,
    /// `UAEX`: rejected by the authentication filter (an invalid JWT).
    Unauthenticated,
    /// `RBAC`: denied by authorization policy.
    RbacDenied,
    /// `FI`: aborted by a fault-injection rule.
    FaultAbort,
    /// `DPE`: the downstream request could not be handled as sent (bad body, bad path, CONNECT).
    DownstreamProtocolError,
    /// `UO`: a connection-pool limit of the cluster is full (circuit breaking).
    Overflow,
    /// `UH`: no healthy endpoint to send to.
    NoHealthyUpstream,
    /// `UF`: connecting to the endpoint failed, or it reset before answering.
    UpstreamFailure,
    /// `UT`: the route timeout or the per-try timeout expired.
    UpstreamTimeout,
    /// `UPE`: the upstream broke the protocol (e.g. switched protocols unasked).
    UpstreamProtocolError,
    /// `RL`: refused by local rate limiting.
    RateLimited,
    /// `SI`: the client sent nothing of its request body for the stream idle timeout.
    StreamIdleTimeout,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::Unauthenticated => "UAEX",
            ResponseFlag::RbacDenied => "RBAC",
            ResponseFlag::FaultAbort => "FI",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::Overflow => "UO",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamFailure => "UF",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::UpstreamProtocolError => "UPE",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::StreamIdleTimeout => "SI",
        }
    }
}

/// Which part of a request made it unusable (all answered 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRequest {
    /// The route's path rewrite produced something that is not a URI.
    RewrittenPath,
    /// The buffered request body could not be read (too large, or the client broke off).
    Body(String),
    /// The request path has no canonical form (see [`super::path`]).
    Path(super::path::PathError),
    /// The host the request names is refused (see [`super::authority`]).
    Authority(super::authority::AuthorityError),
}

/// A response the waypoint writes itself.
#[derive(Debug)]
pub enum LocalReply {
    /// `CONNECT` inside the tunnel: a tunnel in the tunnel would carry bytes no policy sees.
    ConnectUnsupported,
    /// A present JWT did not verify (the error text goes to the access log only).
    JwtRejected(String),
    /// Authorization policy denied the request; the reason names the policy.
    RbacDenied(String),
    /// The service has routes and none matched.
    NoRoute,
    /// The route's backend service is not known.
    BackendUnknown { service: String },
    /// The route names a DestinationRule subset that does not exist.
    SubsetUnknown { service: String, subset: String },
    /// The route redirects.
    Redirect { status: StatusCode, location: String },
    /// A fault-injection rule aborted the request with this status.
    FaultAbort(StatusCode),
    /// The request cannot be forwarded as sent.
    BadRequest(BadRequest),
    /// On TLS, the request's host belongs to another listener than the one the connection's
    /// SNI chose (a connection reused for another host): the client must connect anew.
    Misdirected { sni: String, host: String },
    /// A connection-pool limit refused the request.
    Overflow(Overflow),
    /// No endpoint of the backend can be sent to.
    NoHealthyUpstream,
    /// The last attempt failed to connect or was reset before an answer.
    UpstreamFailure,
    /// TLS origination to the endpoint failed (settings unusable, handshake, or a server
    /// certificate that did not verify); nothing was sent. Envoy: `UF`, upstream transport
    /// failure reason `TLS_error`.
    UpstreamTls(crate::upstream::tls::TlsFailure),
    /// The route timeout or the last per-try timeout expired.
    UpstreamTimeout,
    /// The upstream answered 101 to a request that did not ask for that protocol.
    UnrequestedUpgrade { protocol: String },
    /// The client's request body sent nothing for this long (Envoy's stream idle timeout).
    StreamIdleTimeout(std::time::Duration),
    /// A LocalRateLimitPolicy's bucket is empty; a token comes back in `reset`.
    RateLimited {
        policy: String,
        limit: u32,
        reset: std::time::Duration,
    },
}

impl LocalReply {
    pub fn status(&self) -> StatusCode {
        match self {
            LocalReply::ConnectUnsupported => StatusCode::METHOD_NOT_ALLOWED,
            LocalReply::JwtRejected(_) => StatusCode::UNAUTHORIZED,
            LocalReply::RbacDenied(_) => StatusCode::FORBIDDEN,
            LocalReply::NoRoute => StatusCode::NOT_FOUND,
            LocalReply::Redirect { status, .. } | LocalReply::FaultAbort(status) => *status,
            LocalReply::BadRequest(_) => StatusCode::BAD_REQUEST,
            LocalReply::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            LocalReply::BackendUnknown { .. }
            | LocalReply::SubsetUnknown { .. }
            | LocalReply::Overflow(_)
            | LocalReply::NoHealthyUpstream
            | LocalReply::UpstreamFailure
            | LocalReply::UpstreamTls(_) => StatusCode::SERVICE_UNAVAILABLE,
            LocalReply::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            LocalReply::UnrequestedUpgrade { .. } => StatusCode::BAD_GATEWAY,
            LocalReply::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            LocalReply::StreamIdleTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn flag(&self) -> ResponseFlag {
        match self {
            LocalReply::ConnectUnsupported | LocalReply::BadRequest(_) => ResponseFlag::DownstreamProtocolError,
            LocalReply::JwtRejected(_) => ResponseFlag::Unauthenticated,
            LocalReply::RbacDenied(_) => ResponseFlag::RbacDenied,
            LocalReply::NoRoute
            | LocalReply::Misdirected { .. }
            | LocalReply::BackendUnknown { .. }
            | LocalReply::SubsetUnknown { .. } => ResponseFlag::NoRoute,
            LocalReply::Redirect { .. } => ResponseFlag::None,
            LocalReply::FaultAbort(_) => ResponseFlag::FaultAbort,
            LocalReply::Overflow(_) => ResponseFlag::Overflow,
            LocalReply::NoHealthyUpstream => ResponseFlag::NoHealthyUpstream,
            LocalReply::UpstreamFailure | LocalReply::UpstreamTls(_) => ResponseFlag::UpstreamFailure,
            LocalReply::UpstreamTimeout => ResponseFlag::UpstreamTimeout,
            LocalReply::UnrequestedUpgrade { .. } => ResponseFlag::UpstreamProtocolError,
            LocalReply::RateLimited { .. } => ResponseFlag::RateLimited,
            LocalReply::StreamIdleTimeout(_) => ResponseFlag::StreamIdleTimeout,
        }
    }

    /// The gRPC status a gRPC client would see for this answer (Envoy's HTTP-to-gRPC mapping),
    /// reported as the `grpc_response_status` metric label.
    pub fn grpc_status(&self) -> u8 {
        match self.status().as_u16() {
            400 => 13,             // INTERNAL
            401 => 16,             // UNAUTHENTICATED
            403 => 7,              // PERMISSION_DENIED
            404 => 12,             // UNIMPLEMENTED
            429 | 502..=504 => 14, // UNAVAILABLE
            _ => 2,                // UNKNOWN
        }
    }

    /// The body text (a line, like Envoy's local replies).
    pub fn body(&self) -> &'static str {
        match self {
            LocalReply::ConnectUnsupported => "CONNECT is not supported",
            LocalReply::JwtRejected(_) => "Jwt verification fails",
            LocalReply::RbacDenied(_) => "RBAC: access denied",
            LocalReply::NoRoute => "no route matched",
            LocalReply::Misdirected { .. } => "misdirected request",
            LocalReply::BackendUnknown { .. } => "backend service not found",
            LocalReply::SubsetUnknown { .. } | LocalReply::NoHealthyUpstream => "no healthy upstream",
            LocalReply::Redirect { .. } => "redirect",
            LocalReply::FaultAbort(_) => "fault filter abort",
            LocalReply::BadRequest(BadRequest::RewrittenPath) => "rewritten path is not a valid URI",
            LocalReply::BadRequest(BadRequest::Body(_)) => "could not read the request body",
            LocalReply::BadRequest(BadRequest::Path(_)) => "the request path is not valid",
            LocalReply::BadRequest(BadRequest::Authority(_)) => "the request host is not valid",
            LocalReply::Overflow(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            }
            LocalReply::UpstreamFailure => "upstream connect error or disconnect/reset before headers",
            LocalReply::UpstreamTls(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure, \
                 transport failure reason: TLS_error"
            }
            LocalReply::UpstreamTimeout => "upstream request timeout",
            LocalReply::UnrequestedUpgrade { .. } => "upstream switched to a protocol that was not requested",
            LocalReply::RateLimited { .. } => "local_rate_limited",
            LocalReply::StreamIdleTimeout(_) => "stream timeout",
        }
    }

    /// The `reason` label of the rejection metric, for refusals counted there.
    pub fn reject_reason(&self) -> Option<&'static str> {
        match self {
            LocalReply::ConnectUnsupported => Some("connect_method"),
            LocalReply::NoRoute => Some("no_route"),
            LocalReply::Misdirected { .. } => Some("misdirected_request"),
            LocalReply::BadRequest(BadRequest::RewrittenPath) => Some("bad_rewrite"),
            LocalReply::BadRequest(BadRequest::Body(_)) => Some("bad_body"),
            LocalReply::BadRequest(BadRequest::Path(_)) => Some("bad_path"),
            LocalReply::BadRequest(BadRequest::Authority(_)) => Some("bad_authority"),
            LocalReply::UnrequestedUpgrade { .. } => Some("bad_upgrade"),
            LocalReply::RateLimited { .. } => Some("rate_limited"),
            _ => None,
        }
    }

    /// What the access log's `reason` says, when this reply has something to add to it.
    pub fn log_reason(&self) -> Option<String> {
        match self {
            LocalReply::ConnectUnsupported => Some("CONNECT is not proxied".to_owned()),
            LocalReply::JwtRejected(why) | LocalReply::RbacDenied(why) => Some(why.clone()),
            LocalReply::BackendUnknown { service } => Some(format!("backend service {service} unknown")),
            LocalReply::Misdirected { sni, host } => Some(format!(
                "host {host:?} is not served by the listener of this connection (SNI {sni:?})"
            )),
            LocalReply::SubsetUnknown { service, subset } => Some(format!("subset {subset} of {service} unknown")),
            LocalReply::BadRequest(BadRequest::Body(e)) => Some(format!("reading request body: {e}")),
            LocalReply::BadRequest(BadRequest::Path(e)) => Some(format!("request path refused: {e:?}")),
            LocalReply::BadRequest(BadRequest::Authority(e)) => Some(format!("request host refused: {e:?}")),
            LocalReply::Overflow(e) => Some(e.to_string()),
            LocalReply::UpstreamTls(e) => Some(e.to_string()),
            LocalReply::UnrequestedUpgrade { protocol } => Some(format!(
                "upstream switched protocols to {protocol:?}, which was not requested"
            )),
            LocalReply::RateLimited { policy, .. } => Some(format!("rate limited by {policy}")),
            LocalReply::StreamIdleTimeout(d) => Some(format!("request body sent nothing for {d:?}")),
            _ => None,
        }
    }

    /// The response to send.
    pub fn into_response(self) -> Response<Body> {
        let mut r = text(self.status(), self.body());
        let headers = r.headers_mut();
        match self {
            LocalReply::Redirect { location, .. } => {
                if let Ok(v) = HeaderValue::from_str(&location) {
                    headers.insert(header::LOCATION, v);
                }
            }
            LocalReply::Overflow(_) => {
                headers.insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            }
            // The upstream failure reason, as Envoy's %UPSTREAM_TRANSPORT_FAILURE_REASON%.
            LocalReply::UpstreamTls(e) => {
                headers.insert(
                    "x-upstream-transport-failure",
                    HeaderValue::from_static(match e.reason() {
                        "verify" => "TLS_error:CERTIFICATE_VERIFY_FAILED",
                        _ => "TLS_error",
                    }),
                );
            }
            // The client's connection closes so nothing is sent after the refused switch, or
            // (stream idle) so the unread rest of the body is not taken for the next request.
            LocalReply::UnrequestedUpgrade { .. } | LocalReply::StreamIdleTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            // The IETF draft's headers, as Envoy's local rate limit sends them.
            LocalReply::RateLimited { limit, reset, .. } => {
                let reset_secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
                headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
                headers.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
                headers.insert("x-ratelimit-reset", HeaderValue::from(reset_secs));
            }
            _ => {}
        }
        r
    }
}

/// A complete body.
pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::tls::TlsFailure;

    fn all() -> Vec<LocalReply> {
        vec![
            LocalReply::ConnectUnsupported,
            LocalReply::JwtRejected("expired".into()),
            LocalReply::RbacDenied("denied by ns/p".into()),
            LocalReply::NoRoute,
            LocalReply::Misdirected {
                sni: "b.example.com".into(),
                host: "a.example.com".into(),
            },
            LocalReply::BackendUnknown { service: "s".into() },
            LocalReply::SubsetUnknown {
                service: "s".into(),
                subset: "v9".into(),
            },
            LocalReply::Redirect {
                status: StatusCode::FOUND,
                location: "http://x/".into(),
            },
            LocalReply::FaultAbort(StatusCode::IM_A_TEAPOT),
            LocalReply::BadRequest(BadRequest::RewrittenPath),
            LocalReply::BadRequest(BadRequest::Body("too big".into())),
            LocalReply::BadRequest(BadRequest::Path(crate::http::path::PathError::Backslash)),
            LocalReply::BadRequest(BadRequest::Authority(crate::http::authority::AuthorityError::UserInfo)),
            LocalReply::Overflow(Overflow("http2MaxRequests reached")),
            LocalReply::NoHealthyUpstream,
            LocalReply::UpstreamFailure,
            LocalReply::UpstreamTls(TlsFailure::Verify("UnknownIssuer".into())),
            LocalReply::UpstreamTimeout,
            LocalReply::StreamIdleTimeout(std::time::Duration::from_secs(300)),
            LocalReply::UnrequestedUpgrade { protocol: "h2c".into() },
            LocalReply::RateLimited {
                policy: "ns/ten".into(),
                limit: 10,
                reset: std::time::Duration::from_millis(400),
            },
        ]
    }

    #[test]
    fn rate_limited_is_429_rl_with_the_draft_headers() {
        let r = LocalReply::RateLimited {
            policy: "ns/ten".into(),
            limit: 10,
            reset: std::time::Duration::from_millis(400),
        };
        assert_eq!(
            (r.status().as_u16(), r.flag().as_str(), r.grpc_status()),
            (429, "RL", 14)
        );
        assert_eq!(r.log_reason().as_deref(), Some("rate limited by ns/ten"));
        let resp = r.into_response();
        let h = resp.headers();
        assert_eq!(h["x-ratelimit-limit"], "10");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "1", "rounded up to whole seconds");
    }

    #[test]
    fn every_refusal_carries_a_flag_and_an_error_status() {
        for r in all() {
            if matches!(r, LocalReply::Redirect { .. }) {
                assert_eq!(r.flag(), ResponseFlag::None);
                continue;
            }
            assert_ne!(r.flag(), ResponseFlag::None, "{r:?}");
            assert!(r.status().is_client_error() || r.status().is_server_error(), "{r:?}");
            assert_ne!(r.grpc_status(), 0, "{r:?}");
        }
    }

    #[test]
    fn statuses_flags_and_grpc_codes() {
        let table: &[(LocalReply, u16, &str, u8)] = &[
            (LocalReply::JwtRejected(String::new()), 401, "UAEX", 16),
            (LocalReply::RbacDenied(String::new()), 403, "RBAC", 7),
            (LocalReply::NoRoute, 404, "NR", 12),
            (
                LocalReply::Misdirected {
                    sni: String::new(),
                    host: String::new(),
                },
                421,
                "NR",
                2,
            ),
            (LocalReply::Overflow(Overflow("x")), 503, "UO", 14),
            (LocalReply::NoHealthyUpstream, 503, "UH", 14),
            (LocalReply::UpstreamFailure, 503, "UF", 14),
            (
                LocalReply::UpstreamTls(TlsFailure::Config("mode".into())),
                503,
                "UF",
                14,
            ),
            (LocalReply::UpstreamTimeout, 504, "UT", 14),
            (
                LocalReply::StreamIdleTimeout(std::time::Duration::from_secs(1)),
                408,
                "SI",
                2,
            ),
            (LocalReply::FaultAbort(StatusCode::IM_A_TEAPOT), 418, "FI", 2),
            (LocalReply::ConnectUnsupported, 405, "DPE", 2),
            (
                LocalReply::UnrequestedUpgrade {
                    protocol: String::new(),
                },
                502,
                "UPE",
                14,
            ),
        ];
        for (r, status, flag, grpc) in table {
            assert_eq!(
                (r.status().as_u16(), r.flag().as_str(), r.grpc_status()),
                (*status, *flag, *grpc),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_tls_failure_says_tls_error_in_body_header_and_log() {
        let r = LocalReply::UpstreamTls(TlsFailure::Verify("NotValidForName".into()));
        assert!(
            r.log_reason()
                .is_some_and(|l| l.contains("TLS_error") && l.contains("NotValidForName")),
            "{:?}",
            r.log_reason()
        );
        assert!(r.body().contains("TLS_error"));
        let resp = r.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            resp.headers()["x-upstream-transport-failure"],
            "TLS_error:CERTIFICATE_VERIFY_FAILED"
        );
    }

    #[test]
    fn responses_carry_their_headers() {
        let r = LocalReply::Overflow(Overflow("x")).into_response();
        assert_eq!(r.headers()["x-envoy-overloaded"], "true");
        let r = LocalReply::Redirect {
            status: StatusCode::MOVED_PERMANENTLY,
            location: "https://a/b".into(),
        }
        .into_response();
        assert_eq!(
            (r.status(), &r.headers()[header::LOCATION]),
            (
                StatusCode::MOVED_PERMANENTLY,
                &"https://a/b".parse::<HeaderValue>().unwrap()
            )
        );
        let r = LocalReply::UnrequestedUpgrade { protocol: "x".into() }.into_response();
        assert_eq!(r.headers()[header::CONNECTION], "close");
        let r = LocalReply::RbacDenied("denied by ns/p".into());
        assert_eq!(r.log_reason().as_deref(), Some("denied by ns/p"));
        assert_eq!(r.into_response().headers()[header::CONTENT_TYPE], "text/plain");
    }
}
