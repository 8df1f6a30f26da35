//! The request path in its one canonical form, computed once on admission and written back
//! into the request, so authorization, route matching and the backend read the same path (a
//! raw `/public/../admin` would match an ALLOW on `/public/*` here and reach `/admin` there).
//!
//! The normalisation is Istio's `meshConfig.pathNormalization` ([`Normalization`]), `BASE` by
//! default (Envoy's `normalize_path`):
//! - percent-encoded unreserved characters (`ALPHA DIGIT - . _ ~`) are decoded (`/%61dmin` is
//!   `/admin`, `%2e%2e` is `..`), and the hex of every other percent-encoding is uppercased;
//! - then RFC 3986 `remove_dot_segments` (`/a/./b` and `/a/x/../b` are `/a/b`, `/..` is `/`).
//!
//! `BASE` merges no slashes (`//admin` stays: a policy must name it) and keeps `%2F` / `%5C`
//! encoded (Envoy's `KEEP_UNCHANGED`), so they are not separators. `MERGE_SLASHES` also merges
//! runs of `/` after the dot segments are gone; `DECODE_AND_MERGE_SLASHES` first decodes `%2F`
//! and `%5C` into `/` (Envoy decodes `%5C` to `\`, which its normaliser turns into `/`), so
//! `/a%2F..%2Fadmin` is `/admin`. The steps run in Envoy's order: decode, dot segments, merge.
//! Istio's `NONE` is not offered: authorization and routing always read a canonical path.
//!
//! Stricter than Envoy, and fail closed: a literal `\` (not a URI character; some servers read
//! it as `/`), a malformed percent-encoding, a `#`, or a path that neither starts with `/` nor
//! is `*` is refused. (The HTTP parser already drops a fragment; `#` is refused should one ever
//! get here.) The query is kept as sent.

use std::borrow::Cow;

/// Why a path is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Neither absolute (`/...`) nor `*`.
    NotAbsolute,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// A literal backslash.
    Backslash,
    /// A fragment (`#`), which a request never carries.
    Fragment,
}

/// How far paths are normalised: Istio's `meshConfig.pathNormalization.normalization`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Normalization {
    /// RFC 3986 dot segments and unreserved escapes (Istio's default).
    #[default]
    Base,
    /// `Base`, then runs of `/` merged into one.
    MergeSlashes,
    /// `%2F` and `%5C` decoded into `/` first, then `MergeSlashes`.
    DecodeAndMergeSlashes,
}

impl Normalization {
    fn decodes_slashes(self) -> bool {
        self == Normalization::DecodeAndMergeSlashes
    }

    fn merges_slashes(self) -> bool {
        self != Normalization::Base
    }
}

/// The canonical form of `path` (without its query) under `mode`; borrowed when already
/// canonical.
pub fn normalize(path: &str, mode: Normalization) -> Result<Cow<'_, str>, PathError> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.contains('#') {
        return Err(PathError::Fragment);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let decoded = decode_unreserved(path, mode.decodes_slashes())?;
    let mut out = remove_dot_segments(&decoded);
    if mode.merges_slashes() && out.contains("//") {
        out = merge_slashes(&out);
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Decodes `%XX` of unreserved characters (and `%2F`, `%5C` into `/` when `slashes`);
/// uppercases the hex of the others.
fn decode_unreserved(path: &str, slashes: bool) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let at = path.len() - rest.len() + i;
        let (hi, lo) = match (bytes.get(at + 1), bytes.get(at + 2)) {
            (Some(&h), Some(&l)) => (h, l),
            _ => return Err(PathError::BadEscape),
        };
        let (Some(h), Some(l)) = (hex(hi), hex(lo)) else {
            return Err(PathError::BadEscape);
        };
        let byte = h * 16 + l;
        if is_unreserved(byte) {
            out.push(char::from(byte));
        } else if slashes && matches!(byte, b'/' | b'\\') {
            out.push('/');
        } else {
            out.push('%');
            out.push(char::from(hi.to_ascii_uppercase()));
            out.push(char::from(lo.to_ascii_uppercase()));
        }
        // The three bytes are ASCII, so `i + 3` is a char boundary.
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments go, `..` removes the segment before it
/// (never above the root); a path ending in `.` or `..` keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = matches!(segment, "." | "..");
        match segment {
            "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    out
}

/// `path` with every run of `/` made one.
fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_as_istio_base() {
        let table: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/a/b", Ok("/a/b")),
            ("/a/../b", Ok("/b")),
            ("/a/./b", Ok("/a/b")),
            ("/public/../admin", Ok("/admin")),
            ("/%61dmin", Ok("/admin")),
            ("/a/%2e%2e/b", Ok("/b")),
            ("/a/.%2E/b", Ok("/b")),
            ("/..", Ok("/")),
            ("/../../x", Ok("/x")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/.", Ok("/a/b/")),
            ("/a/", Ok("/a/")),
            ("/a//../b", Ok("/a/b")),
            // Istio BASE: slashes are not merged, %2F and %5C stay (hex uppercased).
            ("//admin", Ok("//admin")),
            ("/a%2fb", Ok("/a%2Fb")),
            ("/a%5cb", Ok("/a%5Cb")),
            ("/a%2F..%2Fb", Ok("/a%2F..%2Fb")),
            ("/%7euser/%41%42", Ok("/~user/AB")),
            ("/sp%20ace", Ok("/sp%20ace")),
            ("/...", Ok("/...")),
            ("*", Ok("*")),
            ("", Err(PathError::NotAbsolute)),
            ("a/b", Err(PathError::NotAbsolute)),
            ("/a%zz", Err(PathError::BadEscape)),
            ("/a%4", Err(PathError::BadEscape)),
            ("/a%", Err(PathError::BadEscape)),
            ("/a\\..\\admin", Err(PathError::Backslash)),
            ("/a#frag", Err(PathError::Fragment)),
        ];
        for (raw, want) in table {
            assert_eq!(
                normalize(raw, Normalization::Base).as_deref().map_err(|e| *e),
                *want,
                "{raw:?}"
            );
        }
    }

    #[test]
    fn a_canonical_path_is_not_copied() {
        for mode in [
            Normalization::Base,
            Normalization::MergeSlashes,
            Normalization::DecodeAndMergeSlashes,
        ] {
            assert!(matches!(normalize("/a/b", mode), Ok(Cow::Borrowed(_))), "{mode:?}");
            assert!(matches!(normalize("/a/./b", mode), Ok(Cow::Owned(_))), "{mode:?}");
        }
    }

    #[test]
    fn slashes_merge_and_decode_as_istio_s_stricter_modes() {
        use Normalization::{DecodeAndMergeSlashes as Decode, MergeSlashes as Merge};
        // (raw, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
        let table: &[(&str, &str, &str)] = &[
            ("//admin", "/admin", "/admin"),
            ("/a///b//", "/a/b/", "/a/b/"),
            // Dot segments go first, as in Envoy: `//..` removes the empty segment only.
            ("/a//../b", "/a/b", "/a/b"),
            ("/a%2fb", "/a%2Fb", "/a/b"),
            ("/a%5Cb", "/a%5Cb", "/a/b"),
            ("/public%2F..%2Fadmin", "/public%2F..%2Fadmin", "/admin"),
            ("/%2F%2Fadmin", "/%2F%2Fadmin", "/admin"),
            ("/x/%2e%2e%2f%2e%2e%2fadmin", "/x/..%2F..%2Fadmin", "/admin"),
            // Escapes other than slashes are still kept, hex uppercased.
            ("/sp%20ace", "/sp%20ace", "/sp%20ace"),
            ("/", "/", "/"),
        ];
        for (raw, merged, decoded) in table {
            assert_eq!(normalize(raw, Merge).as_deref(), Ok(*merged), "{raw:?} merge");
            assert_eq!(normalize(raw, Decode).as_deref(), Ok(*decoded), "{raw:?} decode");
        }
        // A literal backslash is refused in every mode; a decoded one is a separator.
        assert_eq!(normalize("/a\\b", Decode), Err(PathError::Backslash));
        assert_eq!(normalize("/a%zz", Merge), Err(PathError::BadEscape));
    }
}
