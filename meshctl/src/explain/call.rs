//! The call `meshctl explain` is asked about: who calls (a pod or an IP), what it dials (a
//! service hostname, a pod or an IP, with a port) and, for HTTP, the request line and headers.

use std::net::IpAddr;

use controller::model::ObjectKey;

/// Who makes the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `namespace/name` of a pod.
    Pod(ObjectKey),
    /// An address outside the manifests (an unmeshed client, another network).
    Ip(IpAddr),
}

/// What the caller dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A service hostname: `name.namespace`, `name.namespace.svc` or the full name.
    Host(String),
    /// A pod by `namespace/name`: its IP is dialled, as a client that bypasses the service does.
    Pod(ObjectKey),
    /// A service VIP or a pod IP.
    Ip(IpAddr),
}

/// One call to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub from: Source,
    pub to: Target,
    pub port: u16,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// A `--from`, `--to` or `--header` value that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("--from {0:?}: expected namespace/pod or an IP address")]
    From(String),
    #[error("--to {0:?}: expected host[:port] (name.namespace[.svc...]), namespace/pod[:port] or ip[:port]")]
    To(String),
    #[error("--header {0:?}: expected \"name: value\"")]
    Header(String),
}

fn pod_key(text: &str) -> Option<ObjectKey> {
    let (ns, name) = text.split_once('/')?;
    let valid = |s: &str| !s.is_empty() && !s.contains('/') && !s.contains(':');
    (valid(ns) && valid(name)).then(|| ObjectKey::new(ns, name))
}

/// `namespace/pod` or an IP address.
pub fn parse_source(text: &str) -> Result<Source, CallError> {
    if let Ok(ip) = text.parse() {
        return Ok(Source::Ip(ip));
    }
    pod_key(text)
        .map(Source::Pod)
        .ok_or_else(|| CallError::From(text.to_owned()))
}

/// `host[:port]`, `namespace/pod[:port]`, `ip[:port]` or `[ipv6]:port`; the port defaults to
/// `default_port`.
pub fn parse_target(text: &str, default_port: u16) -> Result<(Target, u16), CallError> {
    let bad = || CallError::To(text.to_owned());
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok((Target::Ip(ip), default_port));
    }
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok((Target::Ip(addr.ip()), addr.port()));
    }
    let (head, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
        None => (text, default_port),
    };
    if head.contains('/') {
        return pod_key(head).map(|k| (Target::Pod(k), port)).ok_or_else(bad);
    }
    let host_ok = head.contains('.')
        && head
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !host_ok {
        return Err(bad());
    }
    Ok((Target::Host(head.to_ascii_lowercase()), port))
}

/// `name: value`.
pub fn parse_header(text: &str) -> Result<(String, String), CallError> {
    let (k, v) = text.split_once(':').ok_or_else(|| CallError::Header(text.to_owned()))?;
    let k = k.trim();
    if k.is_empty() || ::http::HeaderName::from_bytes(k.as_bytes()).is_err() {
        return Err(CallError::Header(text.to_owned()));
    }
    Ok((k.to_ascii_lowercase(), v.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_targets_and_headers() {
        assert_eq!(
            parse_source("shop/frontend"),
            Ok(Source::Pod(ObjectKey::new("shop", "frontend")))
        );
        assert_eq!(parse_source("10.0.0.1"), Ok(Source::Ip("10.0.0.1".parse().unwrap())));
        assert!(parse_source("frontend").is_err());
        assert!(parse_source("shop/").is_err());

        let host = |h: &str| Target::Host(h.to_owned());
        assert_eq!(parse_target("payments.shop", 80), Ok((host("payments.shop"), 80)));
        assert_eq!(
            parse_target("Payments.shop.svc.cluster.local:8080", 80),
            Ok((host("payments.shop.svc.cluster.local"), 8080))
        );
        assert_eq!(
            parse_target("shop/payments:8080", 80),
            Ok((Target::Pod(ObjectKey::new("shop", "payments")), 8080))
        );
        assert_eq!(
            parse_target("10.96.0.1:81", 80),
            Ok((Target::Ip("10.96.0.1".parse().unwrap()), 81))
        );
        assert_eq!(
            parse_target("[fd00::1]:81", 80),
            Ok((Target::Ip("fd00::1".parse().unwrap()), 81))
        );
        assert_eq!(
            parse_target("fd00::1", 80),
            Ok((Target::Ip("fd00::1".parse().unwrap()), 80))
        );
        for bad in ["payments", "payments.shop:http", "a..b", "shop/x/y", "x.y:99999"] {
            assert!(parse_target(bad, 80).is_err(), "{bad}");
        }

        assert_eq!(parse_header("X-Canary: true"), Ok(("x-canary".into(), "true".into())));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: v").is_err());
    }
}
