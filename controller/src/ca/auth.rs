//! Who is calling the CA: the bearer token of a request, turned into a [`Caller`] by an
//! [`Authenticator`] (bootstrap tokens from a file in local mode; TokenReview in a cluster).

use std::fmt;
use std::path::Path;

use futures_util::future::BoxFuture;
use mesh_core::identity::Identity;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    /// The node a node proxy runs on, when its credentials bind it to one.
    pub node: Option<String>,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{} (node {node})", self.identity),
            None => write!(f, "{}", self.identity),
        }
    }
}

/// Why a request is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no authorization header: send 'authorization: Bearer <token>'")]
    Missing,
    #[error("malformed authorization header: {0}")]
    Malformed(&'static str),
    #[error("unknown bearer token")]
    UnknownToken,
    /// The token is known but not acceptable (expired, wrong audience, ...).
    #[error("bearer token rejected: {0}")]
    Rejected(String),
    /// The authenticator could not decide (say, the Kubernetes API is unreachable): the
    /// caller may retry, unlike the other variants.
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

/// Turns a bearer token into a caller.
pub trait Authenticator: Send + Sync {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>>;

    /// As [`authenticate`](Self::authenticate), for a request from `source`: an
    /// authenticator that asks a remote service bounds the work per source with it.
    fn authenticate_from<'a>(
        &'a self,
        token: &'a str,
        _source: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        self.authenticate(token)
    }
}

/// The token of an `authorization: Bearer <token>` header. The scheme is case-insensitive
/// (RFC 7235).
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, AuthError> {
    let mut values = metadata.get_all("authorization").iter();
    let value = values.next().ok_or(AuthError::Missing)?;
    if values.next().is_some() {
        return Err(AuthError::Malformed("more than one authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("not printable ASCII"))?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::Malformed("expected 'Bearer <token>'"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed("the scheme is not Bearer"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed("empty token"));
    }
    if token.contains(char::is_whitespace) {
        return Err(AuthError::Malformed("the token contains whitespace"));
    }
    Ok(token)
}

/// Why a bootstrap token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: expected a YAML list of {{token, identity, node}} entries: {source}")]
    Yaml {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    /// Anyone but the owner may read the file: every token in it is as good as leaked.
    #[error(
        "{path} is readable by group or others (mode {mode:03o}): bootstrap tokens must be private; run chmod 600 {path}"
    )]
    Permissions { path: String, mode: u32 },
    #[error("{path}: entry {index}: {problem}")]
    Entry {
        path: String,
        index: usize,
        problem: String,
    },
}

/// One entry of the bootstrap token file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    token: String,
    identity: String,
    #[serde(default)]
    node: Option<String>,
}

/// Static tokens for local mode, read from a YAML file:
///
/// ```yaml
/// - token: 3f1c...            # the secret a node proxy presents
///   identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel
///   node: node-a              # optional: the node it runs on
/// ```
///
/// The file must be private to its owner (mode 0600 or stricter) and every token at least
/// [`MIN_TOKEN_BYTES`] long: a token is a bearer credential, so a readable file or a short,
/// guessable token lets any local process or pod ask for another workload's certificate.
///
/// Only SHA-256 digests of the tokens are kept, and a presented token is compared with every
/// entry in constant time, so response timing tells nothing about how close a guess was.
pub struct BootstrapTokens {
    entries: Vec<([u8; 32], Caller)>,
}

impl fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Callers only: the digests are as good as the tokens against an offline guess.
        f.debug_list().entries(self.entries.iter().map(|(_, c)| c)).finish()
    }
}

/// The shortest bootstrap token accepted: 16 bytes, i.e. 128 bits when the token is random
/// (generate one with `openssl rand -hex 16`, 32 characters, or longer).
pub const MIN_TOKEN_BYTES: usize = 16;

/// A new bootstrap token: 128 bits from the system's CSPRNG, as 32 hex characters. Tokens
/// must never be derived from names (node, identity) that others can read.
pub fn random_token() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl BootstrapTokens {
    /// Reads and validates the token file at `path`; refuses a file that group or others
    /// may read.
    pub fn load(path: &Path) -> Result<Self, BootstrapError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let io = |source| BootstrapError::Io {
            path: path.display().to_string(),
            source,
        };
        // The mode is checked on the file opened, not on the path (which could change between).
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(BootstrapError::Permissions {
                path: path.display().to_string(),
                mode,
            });
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and validates a token file's text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, BootstrapError> {
        // An empty file is an empty list, not a YAML error.
        let parsed: Option<Vec<Entry>> = serde_yaml::from_str(text).map_err(|source| BootstrapError::Yaml {
            path: origin.to_owned(),
            source,
        })?;
        let mut entries: Vec<([u8; 32], Caller)> = Vec::new();
        let mut tokens: Vec<String> = Vec::new();
        for (index, entry) in parsed.unwrap_or_default().into_iter().enumerate() {
            let problem = |problem: String| BootstrapError::Entry {
                path: origin.to_owned(),
                index,
                problem,
            };
            if entry.token.is_empty() {
                return Err(problem("empty token".into()));
            }
            if entry.token.len() < MIN_TOKEN_BYTES {
                return Err(problem(format!(
                    "token is {} bytes; at least {MIN_TOKEN_BYTES} random bytes are required (e.g. openssl rand -hex 16)",
                    entry.token.len()
                )));
            }
            // What cannot travel in `authorization: Bearer <token>` could never match.
            if !entry.token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(problem(
                    "token contains characters other than printable ASCII without spaces".into(),
                ));
            }
            if let Some(first) = tokens.iter().position(|t| *t == entry.token) {
                return Err(problem(format!("duplicate token (same as entry {first})")));
            }
            let identity: Identity = entry
                .identity
                .parse()
                .map_err(|e| problem(format!("bad identity: {e}")))?;
            if entry.node.as_deref() == Some("") {
                return Err(problem("empty node name (leave node out instead)".into()));
            }
            entries.push((
                digest(&entry.token),
                Caller {
                    identity,
                    node: entry.node,
                },
            ));
            tokens.push(entry.token);
        }
        Ok(BootstrapTokens { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, token: &str) -> Option<&Caller> {
        let presented = digest(token);
        let mut found = None;
        // No early exit: every entry is compared whatever matched.
        for (d, caller) in &self.entries {
            if bool::from(d.ct_eq(&presented)) {
                found = Some(caller);
            }
        }
        found
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        let result = self.find(token).cloned().ok_or(AuthError::UnknownToken);
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token long enough to be accepted.
    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaa";

    fn err(yaml: &str) -> String {
        BootstrapTokens::from_yaml(yaml, "tokens.yaml")
            .expect_err("invalid file")
            .to_string()
    }

    #[tokio::test]
    async fn valid_file_authenticates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("tokens.yaml");
        std::fs::write(
            &path,
            "- token: node-a-secret-0123456789\n  identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel\n  node: node-a\n\
             - token: sleep-secret-0123456789\n  identity: spiffe://cluster.local/ns/default/sa/sleep\n",
        )
        .expect("write");
        private(&path, 0o600);
        let tokens = BootstrapTokens::load(&path).expect("valid");
        assert_eq!(tokens.len(), 2);
        let caller = tokens.authenticate("node-a-secret-0123456789").await.expect("known");
        assert_eq!(
            caller.identity.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
        assert_eq!(caller.node.as_deref(), Some("node-a"));
        let caller = tokens.authenticate("sleep-secret-0123456789").await.expect("known");
        assert_eq!(caller.node, None);
        assert!(matches!(
            tokens.authenticate("node-a-secret-012345678A").await,
            Err(AuthError::UnknownToken)
        ));
        assert!(!format!("{tokens:?}").contains("secret"));
    }

    fn private(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_file_others_may_read_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("tokens.yaml");
        std::fs::write(&path, "").expect("write");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            private(&path, mode);
            let text = BootstrapTokens::load(&path)
                .expect_err("readable by others")
                .to_string();
            assert!(
                text.contains("readable by group or others") && text.contains("chmod 600"),
                "{text}"
            );
        }
        for mode in [0o600, 0o400] {
            private(&path, mode);
            BootstrapTokens::load(&path).expect("private file");
        }
    }

    #[test]
    fn short_tokens_are_refused() {
        let id = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
        // The names the test harness once derived tokens from.
        for short in ["n0-token", "node-a-token", "0123456789abcde"] {
            let text = err(&format!("- token: {short}\n  identity: {id}\n"));
            assert!(
                text.contains("entry 0: token is") && text.contains("at least 16"),
                "{text}"
            );
        }
        BootstrapTokens::from_yaml(&format!("- token: 0123456789abcdef\n  identity: {id}\n"), "t")
            .expect("16 bytes is enough");
    }

    #[test]
    fn random_tokens_are_long_enough_and_differ() {
        let (a, b) = (random_token().expect("rng"), random_token().expect("rng"));
        assert_eq!(a.len(), 32);
        assert!(a.len() >= MIN_TOKEN_BYTES && a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn empty_file_is_an_empty_list() {
        assert!(BootstrapTokens::from_yaml("", "t").expect("empty").is_empty());
        assert!(BootstrapTokens::from_yaml("[]", "t").expect("empty").is_empty());
    }

    #[test]
    fn invalid_entries_name_file_index_and_problem() {
        let id = "spiffe://cluster.local/ns/default/sa/sleep";
        let text = err(&format!(
            "- token: {A}\n  identity: {id}\n- token: ''\n  identity: {id}\n"
        ));
        assert!(text.starts_with("tokens.yaml: entry 1: empty token"), "{text}");
        let text = err(&format!(
            "- token: {A}\n  identity: {id}\n- token: {A}\n  identity: {id}\n"
        ));
        assert!(text.contains("entry 1: duplicate token (same as entry 0)"), "{text}");
        let text = err(&format!(
            "- token: {A}\n  identity: spiffe://cluster.local/default/sleep\n"
        ));
        assert!(text.contains("tokens.yaml: entry 0: bad identity"), "{text}");
        let text = err(&format!("- token: 'a b{A}'\n  identity: {id}\n"));
        assert!(text.contains("entry 0: token contains characters"), "{text}");
        let text = err(&format!("- token: {A}\n  identity: {id}\n  node: ''\n"));
        assert!(text.contains("entry 0: empty node name"), "{text}");
        // Shape errors name the file too.
        let text = err(&format!("- token: {A}\n  identity: {id}\n  nodes: x\n"));
        assert!(text.starts_with("tokens.yaml: "), "{text}");
        let text = err("token: a\n");
        assert!(text.starts_with("tokens.yaml: expected a YAML list"), "{text}");
    }

    #[test]
    fn missing_file_is_named() {
        let text = BootstrapTokens::load(Path::new("/nonexistent/tokens.yaml"))
            .expect_err("missing")
            .to_string();
        assert!(text.contains("/nonexistent/tokens.yaml"), "{text}");
    }

    fn md(values: &[&str]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for v in values {
            m.append("authorization", v.parse().expect("ascii"));
        }
        m
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(&md(&["Bearer abc"])).expect("ok"), "abc");
        assert_eq!(bearer_token(&md(&["bearer  abc "])).expect("ok"), "abc");
        assert!(matches!(bearer_token(&md(&[])), Err(AuthError::Missing)));
        for bad in [
            &["Basic abc"][..],
            &["Bearer"],
            &["Bearer "],
            &["Bearer a b"],
            &["Bearer a", "Bearer b"],
        ] {
            assert!(
                matches!(bearer_token(&md(bad)), Err(AuthError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    /// Istio's ztunnel sends `Bearer ` followed by its `AUTH_TOKEN` file's bytes as they are.
    /// The harness writes token files without a newline: those bytes are exactly the token.
    /// A JWT (projected service account token) passes unchanged; a file ending in a newline
    /// cannot even become a header value, so Istio's client fails before sending it.
    #[test]
    fn istio_sends_the_token_file_bytes_as_they_are() {
        let token = random_token().expect("token");
        let file_bytes = token.as_bytes().to_vec();
        let header = [b"Bearer ".as_slice(), &file_bytes].concat();
        let header = String::from_utf8(header).expect("ascii");
        assert_eq!(bearer_token(&md(&[&header])).expect("ok"), token);
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl-_x";
        assert_eq!(bearer_token(&md(&[&format!("Bearer {jwt}")])).expect("ok"), jwt);
        let with_newline = format!("Bearer {token}\n");
        assert!(tonic::metadata::MetadataValue::try_from(with_newline.as_str()).is_err());
    }
}
