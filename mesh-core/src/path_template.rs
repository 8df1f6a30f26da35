//! Istio's path templates in an AuthorizationPolicy's `paths` and `notPaths` (Istio 1.22+,
//! Envoy's URI template): `{*}` is exactly one path segment, `{**}` the rest of the path (any
//! number of segments, `/` included), as in `/admin/{**}` or `/api/{*}/secret`. One checker,
//! [`check`], that the controller refuses invalid templates with, and one matcher,
//! [`matches`], that the waypoint decides with, so a template is never taken for an exact
//! path (a DENY of `/admin/{**}` that never matched).
//!
//! Istio's validity rules: a path with `{` or `}` is a template; it starts with `/`; each of
//! its segments is `{*}`, `{**}` or a literal of URI path characters (no `*`, `{`, `}`, not
//! empty); `{**}` is the last operator (literals may follow it). Matching is Envoy's: `{*}`
//! is one or more path characters without `/`, `{**}` zero or more with `/`, the whole path
//! matched. Matching scans the pattern in place and allocates nothing, so the waypoint can
//! match per request without compiling.

/// Why a path template is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("a path template must start with '/'")]
    NoLeadingSlash,
    #[error("{{**}} must be the last operator of a path template")]
    OperatorAfterAny,
    #[error(
        "segment {0:?} is not {{*}}, {{**}} or a literal (no '*', '{{', '}}', empty segment or character outside a \
         URI path)"
    )]
    BadSegment(String),
}

/// How an operator reads a character of the request path outside the URI path characters
/// Envoy's operators match (RFC 3986 `pchar`, such as `"` or `{`, which some clients send).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chars {
    /// As Envoy: an operator does not match it.
    Strict,
    /// As any other character: where a match denies, the request is denied, not let past.
    Any,
}

/// Whether `pattern` is a path template (and not Istio's `*`, `prefix*`, `*suffix`, exact).
pub fn is_template(pattern: &str) -> bool {
    pattern.contains(['{', '}'])
}

/// Envoy's URI path characters (RFC 3986 `pchar` without `/`).
fn path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)
}

/// Whether `pattern` is a valid path template.
pub fn check(pattern: &str) -> Result<(), TemplateError> {
    let Some(rest) = pattern.strip_prefix('/') else {
        return Err(TemplateError::NoLeadingSlash);
    };
    let mut after_any = false;
    for segment in rest.strip_suffix('/').unwrap_or(rest).split('/') {
        match segment {
            "{*}" | "{**}" if after_any => return Err(TemplateError::OperatorAfterAny),
            "{*}" => {}
            "{**}" => after_any = true,
            literal if !literal.is_empty() && literal.bytes().all(path_char) => {}
            other => return Err(TemplateError::BadSegment(other.to_owned())),
        }
    }
    Ok(())
}

/// Whether the path template `pattern` matches the whole of `path` (without its query).
pub fn matches(pattern: &str, path: &str, chars: Chars) -> Result<bool, TemplateError> {
    check(pattern)?;
    let ok = |b: u8| chars == Chars::Any || path_char(b);
    Ok(match pattern.split_once("{**}") {
        None => prefix(pattern, path, ok) == Some(""),
        // Only literals follow `{**}`: what it spans is what lies between.
        Some((head, tail)) => prefix(head, path, ok).is_some_and(|rest| {
            rest.strip_suffix(tail)
                .is_some_and(|any| any.bytes().all(|b| b == b'/' || ok(b)))
        }),
    })
}

/// Matches `head` (literals and `{*}`, no `{**}`) at the start of `path`; what follows.
fn prefix<'p>(head: &str, path: &'p str, ok: impl Fn(u8) -> bool) -> Option<&'p str> {
    let mut pieces = head.split("{*}");
    let mut rest = path.strip_prefix(pieces.next()?)?;
    for literal in pieces {
        // `{*}` is a whole segment: what follows it starts with `/` or ends the pattern.
        let end = rest.find('/').unwrap_or(rest.len());
        if end == 0 || !rest.as_bytes()[..end].iter().all(|&b| ok(b)) {
            return None;
        }
        rest = rest[end..].strip_prefix(literal)?;
    }
    Some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (template, path, matches strictly, matches with [`Chars::Any`]).
    #[test]
    fn templates_match_as_istio_and_envoy() {
        let rows: &[(&str, &str, bool, bool)] = &[
            ("/admin/{**}", "/admin/", true, true),
            ("/admin/{**}", "/admin/users", true, true),
            ("/admin/{**}", "/admin/users/1/delete", true, true),
            ("/admin/{**}", "/admin", false, false),
            ("/admin/{**}", "/administrator/x", false, false),
            ("/admin/{**}", "/public/admin/x", false, false),
            ("/admin/{**}", "/admin/a\"b", false, true),
            ("/api/{*}/secret", "/api/v1/secret", true, true),
            ("/api/{*}/secret", "/api/v1/v2/secret", false, false),
            ("/api/{*}/secret", "/api//secret", false, false),
            ("/api/{*}/secret", "/api/v1/secret/x", false, false),
            ("/api/{*}/secret", "/api/v1/secrets", false, false),
            ("/api/{*}/secret", "/api/{x}/secret", false, true),
            ("/foo/{*}", "/foo/bar", true, true),
            ("/foo/{*}", "/foo/bar/baz", false, false),
            ("/foo/{*}", "/foo/", false, false),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true, true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true, true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar", false, false),
            ("/foo/{**}/", "/foo/bar/", true, true),
            ("/foo/{**}/", "/foo//", true, true),
            ("/foo/{**}/", "/foo/bar", false, false),
            ("/{**}/edit", "/a/b/edit", true, true),
            ("/{**}/edit", "/a/b/edit/x", false, false),
            ("/{**}", "/", true, true),
            ("/{*}", "/", false, false),
        ];
        for &(template, path, strict, any) in rows {
            assert_eq!(matches(template, path, Chars::Strict), Ok(strict), "{template} {path}");
            assert_eq!(matches(template, path, Chars::Any), Ok(any), "{template} {path} (any)");
        }
    }

    /// Istio's invalid templates, each with why.
    #[test]
    fn invalid_templates_are_refused() {
        let bad = |s: &str| TemplateError::BadSegment(s.to_owned());
        let rows = [
            ("/*/baz/{*}", bad("*")),
            ("/**/baz/{*}", bad("**")),
            ("/{**}/foo/{*}", TemplateError::OperatorAfterAny),
            ("/{**}/{**}", TemplateError::OperatorAfterAny),
            ("/foo/{*}.txt", bad("{*}.txt")),
            ("/foo/{bar}", bad("{bar}")),
            ("/foo/}", bad("}")),
            ("/foo//{*}", bad("")),
            ("admin/{**}", TemplateError::NoLeadingSlash),
            ("{**}", TemplateError::NoLeadingSlash),
        ];
        for (template, why) in rows {
            assert!(is_template(template), "{template}");
            assert_eq!(check(template), Err(why.clone()), "{template}");
            assert_eq!(matches(template, "/foo/x", Chars::Any), Err(why), "{template}");
        }
        assert!(!is_template("/admin*"));
        assert_eq!(check("/a/{*}/b-c.d~e/{**}/"), Ok(()));
    }
}
