//! Waypoint route matches (`mesh.waypoint.v1.RouteMatch`) compiled: one function, [`compile`],
//! that the proxy builds its matchers with and the controller validates routes with, so a
//! route the controller sends is one the proxy compiles (an invalid rule would otherwise take
//! a whole host table, shared by tenants, down in the proxy).
//!
//! What can fail: a regular expression (syntax, or past [`REGEX_SIZE_LIMIT`] compiled) and a
//! method that is not an HTTP token. A header name that cannot exist is not an error: its
//! match never matches (`None`), as a header that cannot be sent is never present.

use std::fmt;

use mesh_proto::waypoint as wp;
use regex::{Regex, RegexBuilder};

/// The compiled size a route regex may reach (bytes, `RegexBuilder::size_limit`); past it the
/// regex is refused. Explicit, so the controller's check and the proxy's compile agree.
pub const REGEX_SIZE_LIMIT: usize = 10 << 20;

/// A string match, compiled.
#[derive(Debug)]
pub enum Text {
    /// No match given: anything matches.
    Any,
    Exact(String),
    Prefix(String),
    /// Anchored: Gateway API and Istio match the whole value.
    Regex(Regex),
}

/// A route match, compiled.
#[derive(Debug)]
pub struct Compiled {
    pub path: Text,
    pub method: Option<http::Method>,
    /// `None`: a name no request can carry; that match never matches.
    pub headers: Vec<(Option<http::HeaderName>, Text)>,
    pub query: Vec<(String, Text)>,
    pub grpc_service: String,
    pub grpc_method: String,
}

/// The part of a route match that is invalid, by its place in `RouteMatch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    Path,
    Method,
    /// `headers[index]`, named `name`.
    Header {
        index: usize,
        name: String,
    },
    /// `query_params[index]`, named `name`.
    QueryParam {
        index: usize,
        name: String,
    },
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Path => f.write_str("path"),
            Field::Method => f.write_str("method"),
            Field::Header { index, .. } => write!(f, "headers[{index}]"),
            Field::QueryParam { index, .. } => write!(f, "query_params[{index}]"),
        }
    }
}

/// Why a route match cannot be compiled: the field, its value, the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?}: {reason}")]
pub struct Invalid {
    pub field: Field,
    pub value: String,
    pub reason: String,
}

/// `pattern` as the proxy matches it: the whole value (`^(?:pattern)$`), within
/// [`REGEX_SIZE_LIMIT`]. The pattern must be a regular expression on its own: `a)|(b` would
/// otherwise close the anchoring group and match anywhere in the value.
pub fn anchored_regex(pattern: &str) -> Result<Regex, String> {
    regex_syntax::ast::parse::Parser::new()
        .parse(pattern)
        .map_err(|e| format!("not a valid regular expression: {e}"))?;
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("not a valid regular expression: {e}"))
}

fn text(m: Option<&wp::StringMatch>, field: impl FnOnce() -> Field) -> Result<Text, Invalid> {
    use wp::string_match::Kind;
    Ok(match m.and_then(|m| m.kind.as_ref()) {
        None => Text::Any,
        Some(Kind::Exact(v)) => Text::Exact(v.clone()),
        Some(Kind::Prefix(v)) => Text::Prefix(v.clone()),
        Some(Kind::Regex(p)) => Text::Regex(anchored_regex(p).map_err(|reason| Invalid {
            field: field(),
            value: p.clone(),
            reason,
        })?),
    })
}

/// Compiles a route match; the first invalid field is the error.
pub fn compile(m: &wp::RouteMatch) -> Result<Compiled, Invalid> {
    let method = if m.method.is_empty() {
        None
    } else {
        Some(http::Method::from_bytes(m.method.as_bytes()).map_err(|_| Invalid {
            field: Field::Method,
            value: m.method.clone(),
            reason: "not an HTTP method".into(),
        })?)
    };
    let path = text(m.path.as_ref(), || Field::Path)?;
    let mut headers = Vec::with_capacity(m.headers.len());
    for (index, h) in m.headers.iter().enumerate() {
        let name = http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).ok();
        let field = || Field::Header {
            index,
            name: h.name.clone(),
        };
        headers.push((name, text(h.value.as_ref(), field)?));
    }
    let mut query = Vec::with_capacity(m.query_params.len());
    for (index, q) in m.query_params.iter().enumerate() {
        let field = || Field::QueryParam {
            index,
            name: q.name.clone(),
        };
        query.push((q.name.clone(), text(q.value.as_ref(), field)?));
    }
    Ok(Compiled {
        path,
        method,
        headers,
        query,
        grpc_service: m.grpc_service.clone(),
        grpc_method: m.grpc_method.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex(p: &str) -> Option<wp::StringMatch> {
        Some(wp::StringMatch {
            kind: Some(wp::string_match::Kind::Regex(p.into())),
        })
    }

    #[test]
    fn invalid_fields_are_named() {
        let bad_path = wp::RouteMatch {
            path: regex("("),
            ..Default::default()
        };
        let e = compile(&bad_path).unwrap_err();
        assert_eq!((e.field, e.value.as_str()), (Field::Path, "("));
        assert!(e.reason.starts_with("not a valid regular expression"), "{}", e.reason);

        let bad_method = wp::RouteMatch {
            method: "GET POST".into(),
            ..Default::default()
        };
        assert_eq!(compile(&bad_method).unwrap_err().field, Field::Method);

        let bad_query = wp::RouteMatch {
            query_params: vec![
                wp::HeaderMatch {
                    name: "a".into(),
                    value: regex("x"),
                },
                wp::HeaderMatch {
                    name: "b".into(),
                    value: regex("[z"),
                },
            ],
            ..Default::default()
        };
        let e = compile(&bad_query).unwrap_err();
        assert_eq!(
            e.field,
            Field::QueryParam {
                index: 1,
                name: "b".into()
            }
        );
        assert_eq!(e.to_string().split(':').next(), Some(r#"query_params[1] "[z""#));
    }

    #[test]
    fn regexes_match_whole_values_and_cannot_escape_the_anchors() {
        let r = anchored_regex("/api/v[0-9]+").unwrap();
        assert!(r.is_match("/api/v2") && !r.is_match("/api/v2/x"));
        // Valid once wrapped in `^(?:...)$`, but not a regex of its own: refused.
        assert!(anchored_regex("x)|(?:.*").is_err());
        // Past the size limit.
        assert!(anchored_regex(r"\w{1000}{1000}").is_err());
    }

    #[test]
    fn a_header_name_that_cannot_exist_never_matches() {
        let m = wp::RouteMatch {
            headers: vec![wp::HeaderMatch {
                name: "bad name".into(),
                value: None,
            }],
            ..Default::default()
        };
        assert!(compile(&m).unwrap().headers[0].0.is_none());
    }
}
