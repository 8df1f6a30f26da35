//! The host a request names, in its one canonical form: the ingress gateway picks its route
//! table by it, authorization matches `hosts` against it, and the backend is sent it. Read
//! two ways (a routing host that drops userinfo and port, an authz host that did not), a
//! request for `x@admin.example.com` or `admin.example.com:99999` reached admin's routes
//! past a DENY on `admin.example.com`.
//!
//! The URI's authority (HTTP/2 `:authority`, an absolute-form target) is read first, else
//! the `Host` header. Refused (400): userinfo, a port that is not a 16-bit number, an
//! authority that does not parse, and more than one `Host` header. The host is lowercased;
//! an empty port (`host:`) is no port. One trailing dot (`admin.example.com.`, the same name
//! to DNS and to backends such as nginx) is dropped, as Envoy's `strip_trailing_host_dot`
//! does, or the name would miss rules on `admin.example.com`; a host that is only dots or
//! ends in two is refused.

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Authority;
use http::Uri;

/// Why a request's host is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorityError {
    /// Not an authority (or not text).
    Unparsable,
    /// `user@host`: a host that two readers could see differently.
    UserInfo,
    /// A port that is not a number from 0 to 65535.
    BadPort,
    /// More than one `Host` header.
    ManyHosts,
}

/// A canonical host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHost {
    host: String,
    port: Option<u16>,
}

impl RequestHost {
    /// The host alone, lowercase (IPv6 in brackets): what routes match.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, when the request named one.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// `host[:port]`: what authorization matches and the backend is sent.
    pub fn authority(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }
}

/// The canonical form of one authority.
pub fn canonical(raw: &str) -> Result<RequestHost, AuthorityError> {
    let parsed: Authority = raw.parse().map_err(|_| AuthorityError::Unparsable)?;
    if parsed.as_str().contains('@') {
        return Err(AuthorityError::UserInfo);
    }
    let host = parsed.host();
    let rest = parsed.as_str().strip_prefix(host).ok_or(AuthorityError::Unparsable)?;
    let port = match rest.strip_prefix(':') {
        None if rest.is_empty() => None,
        None => return Err(AuthorityError::Unparsable),
        Some("") => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().map_err(|_| AuthorityError::BadPort)?),
        Some(_) => return Err(AuthorityError::BadPort),
    };
    let host = match host.strip_suffix('.') {
        Some(stripped) if stripped.ends_with('.') => return Err(AuthorityError::Unparsable),
        Some(stripped) => stripped,
        None => host,
    };
    if host.is_empty() {
        return Err(AuthorityError::Unparsable);
    }
    Ok(RequestHost {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// The host a request names (`None`: neither an authority nor a non-empty `Host`).
pub fn of_request(uri: &Uri, headers: &HeaderMap) -> Result<Option<RequestHost>, AuthorityError> {
    if let Some(a) = uri.authority() {
        return canonical(a.as_str()).map(Some);
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return match headers.contains_key(header::HOST) {
            true => Err(AuthorityError::ManyHosts),
            false => Ok(None),
        };
    };
    match host.to_str().map_err(|_| AuthorityError::Unparsable)? {
        "" => Ok(None),
        raw => canonical(raw).map(Some),
    }
}

/// Writes the canonical host back into the request (the URI's authority, and a single
/// `Host`), so whatever reads either later reads it; returns it.
pub fn canonicalize(parts: &mut http::request::Parts) -> Result<Option<RequestHost>, AuthorityError> {
    let named = of_request(&parts.uri, &parts.headers)?;
    write_back(parts, named)
}

/// Writes `named`, the host [`of_request`] read from this request, back into it (see
/// [`canonicalize`]); returns it.
pub fn write_back(
    parts: &mut http::request::Parts,
    named: Option<RequestHost>,
) -> Result<Option<RequestHost>, AuthorityError> {
    parts.headers.remove(header::HOST);
    let Some(named) = named else {
        return Ok(None);
    };
    let authority = named.authority();
    let value = HeaderValue::from_str(&authority).map_err(|_| AuthorityError::Unparsable)?;
    parts.headers.insert(header::HOST, value);
    if parts.uri.authority().is_some_and(|a| a.as_str() != authority) {
        let mut uri = parts.uri.clone().into_parts();
        uri.authority = Some(authority.parse().map_err(|_| AuthorityError::Unparsable)?);
        parts.uri = Uri::from_parts(uri).map_err(|_| AuthorityError::Unparsable)?;
    }
    Ok(Some(named))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_canonicalise_or_are_refused() {
        let table: &[(&str, Result<&str, AuthorityError>)] = &[
            ("admin.example.com", Ok("admin.example.com")),
            ("Admin.Example.COM:8443", Ok("admin.example.com:8443")),
            ("admin.example.com:", Ok("admin.example.com")),
            ("admin.example.com:080", Ok("admin.example.com:80")),
            ("[::1]:8080", Ok("[::1]:8080")),
            ("10.0.0.1", Ok("10.0.0.1")),
            ("admin.example.com.", Ok("admin.example.com")),
            ("Admin.Example.com.:8443", Ok("admin.example.com:8443")),
            ("admin.example.com.:", Ok("admin.example.com")),
            ("admin.example.com..", Err(AuthorityError::Unparsable)),
            (".", Err(AuthorityError::Unparsable)),
            ("..", Err(AuthorityError::Unparsable)),
            (".:80", Err(AuthorityError::Unparsable)),
            ("admin.example.com:99999", Err(AuthorityError::BadPort)),
            ("admin.example.com:8a", Err(AuthorityError::BadPort)),
            ("x@admin.example.com", Err(AuthorityError::UserInfo)),
            ("x:y@admin.example.com:443", Err(AuthorityError::UserInfo)),
            ("", Err(AuthorityError::Unparsable)),
            ("a b", Err(AuthorityError::Unparsable)),
        ];
        for (raw, want) in table {
            let got = canonical(raw).map(|h| h.authority());
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{raw:?}");
        }
        let h = canonical("Admin.example.com:8443").expect("valid");
        assert_eq!(h.host(), "admin.example.com");
    }

    #[test]
    fn the_uri_authority_wins_and_both_are_written_back() {
        let mut parts = http::Request::builder()
            .uri("https://API.example.com:/x")
            .header(header::HOST, "other.example.com")
            .body(())
            .expect("a test request")
            .into_parts()
            .0;
        let named = canonicalize(&mut parts).expect("valid").expect("named");
        assert_eq!(named.host(), "api.example.com");
        assert_eq!(parts.uri.to_string(), "https://api.example.com/x");
        assert_eq!(parts.headers[header::HOST], "api.example.com");

        let mut two = http::Request::builder()
            .uri("/x")
            .header(header::HOST, "a.example.com")
            .header(header::HOST, "b.example.com")
            .body(())
            .expect("a test request")
            .into_parts()
            .0;
        assert_eq!(canonicalize(&mut two), Err(AuthorityError::ManyHosts));
        let none = http::Request::builder().uri("/x").body(()).expect("a test request");
        assert_eq!(of_request(none.uri(), none.headers()), Ok(None));
    }
}
