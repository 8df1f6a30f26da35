//! Controller-issued VM bootstrap tokens: a VM's ztunnel (a WorkloadEntry outside the
//! cluster) has no Kubernetes service-account token, so the controller issues it one bound to
//! one WorkloadGroup (namespace, group name, the group's service account) with an expiry.
//!
//! A token is `vmt1.<hex payload>.<hex HMAC-SHA256>`; the payload is
//! `<namespace>:<group>:<service account>:<expiry, unix seconds>`. The HMAC key is 32 random
//! bytes the controller keeps in a private file (local mode), so tokens survive restarts and
//! every replica reading the same key agrees. Verification is `ring::hmac::verify`, constant
//! time. A verified token authenticates as `spiffe://<td>/ns/<namespace>/sa/<service account>`
//! and nothing else: the CA's rules then refuse any other identity.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use mesh_core::identity::Identity;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use ring::hmac;

use super::auth::{AuthError, Authenticator, Caller};

/// The prefix that tells a VM token from any other bearer token.
pub const PREFIX: &str = "vmt1.";
/// Default lifetime of an issued token (`--vm-token-ttl`).
pub const DEFAULT_VM_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
const KEY_BYTES: usize = 32;

/// What a token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub namespace: String,
    pub group: String,
    pub service_account: String,
    /// Unix seconds after which the token is refused.
    pub expires: u64,
}

/// Why a token is refused; `reason()` is the metric label.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmTokenError {
    #[error("malformed VM token")]
    Malformed,
    #[error("VM token signature does not verify (tampered, or signed with another key)")]
    BadSignature,
    #[error("VM token expired at {0} (unix seconds)")]
    Expired(u64),
    #[error("VM token names an invalid identity: {0}")]
    BadIdentity(String),
}

impl VmTokenError {
    pub fn reason(&self) -> &'static str {
        match self {
            VmTokenError::Malformed => "malformed",
            VmTokenError::BadSignature => "bad_signature",
            VmTokenError::Expired(_) => "expired",
            VmTokenError::BadIdentity(_) => "bad_identity",
        }
    }
}

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:03o}): the VM token key must be private")]
    Permissions { path: String, mode: u32 },
    #[error("{path}: expected {KEY_BYTES} bytes as hex")]
    Format { path: String },
    #[error("no randomness for a new key")]
    Random,
}

/// A clock in unix seconds; injected so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// Issues and verifies VM tokens with one HMAC key.
pub struct VmTokenKey {
    key: hmac::Key,
}

impl fmt::Debug for VmTokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VmTokenKey(..)")
    }
}

/// A Kubernetes name as the payload can carry it (no separator, not empty).
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl VmTokenKey {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        VmTokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// Reads the hex key at `path`, or creates it (mode 0600, 32 random bytes) when missing.
    /// A key file others may read is refused: with it anyone could mint tokens.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        use std::io::{Read, Write};
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::File::open(path) {
            Ok(mut file) => {
                let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Permissions {
                        path: path.display().to_string(),
                        mode,
                    });
                }
                let mut text = String::new();
                file.read_to_string(&mut text).map_err(io)?;
                let bytes = hex::decode(text.trim()).map_err(|_| KeyError::Format {
                    path: path.display().to_string(),
                })?;
                if bytes.len() != KEY_BYTES {
                    return Err(KeyError::Format {
                        path: path.display().to_string(),
                    });
                }
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use ring::rand::SecureRandom;
                let mut bytes = [0u8; KEY_BYTES];
                ring::rand::SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| KeyError::Random)?;
                // create_new: a replica that raced us wrote first; read its key instead.
                let created = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path);
                match created {
                    Ok(mut file) => {
                        file.write_all(hex::encode(bytes).as_bytes()).map_err(io)?;
                        Ok(Self::from_bytes(&bytes))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load_or_create(path),
                    Err(e) => Err(io(e)),
                }
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A token for `claims`. Names must be Kubernetes names.
    pub fn issue(&self, claims: &Claims) -> Result<String, VmTokenError> {
        for name in [&claims.namespace, &claims.group, &claims.service_account] {
            if !valid_name(name) {
                return Err(VmTokenError::BadIdentity(name.clone()));
            }
        }
        let payload = format!(
            "{}:{}:{}:{}",
            claims.namespace, claims.group, claims.service_account, claims.expires
        );
        let tag = hmac::sign(&self.key, payload.as_bytes());
        Ok(format!(
            "{PREFIX}{}.{}",
            hex::encode(payload),
            hex::encode(tag.as_ref())
        ))
    }

    /// The claims of `token` if its signature verifies and it has not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, VmTokenError> {
        let rest = token.strip_prefix(PREFIX).ok_or(VmTokenError::Malformed)?;
        let (payload, tag) = rest.split_once('.').ok_or(VmTokenError::Malformed)?;
        let payload = hex::decode(payload).map_err(|_| VmTokenError::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| VmTokenError::Malformed)?;
        // The signature first: nothing of an unsigned payload is interpreted.
        hmac::verify(&self.key, &payload, &tag).map_err(|_| VmTokenError::BadSignature)?;
        let payload = String::from_utf8(payload).map_err(|_| VmTokenError::Malformed)?;
        let parts: Vec<&str> = payload.split(':').collect();
        let [namespace, group, service_account, expires] = parts[..] else {
            return Err(VmTokenError::Malformed);
        };
        let expires: u64 = expires.parse().map_err(|_| VmTokenError::Malformed)?;
        if now >= expires {
            return Err(VmTokenError::Expired(expires));
        }
        Ok(Claims {
            namespace: namespace.to_owned(),
            group: group.to_owned(),
            service_account: service_account.to_owned(),
            expires,
        })
    }
}

/// Why no token was issued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("expected group=<namespace>/<name>")]
    BadGroup,
    #[error("no WorkloadGroup {0}")]
    NoSuchGroup(String),
    #[error("ttl must be whole seconds between 1 and {max}")]
    BadTtl { max: u64 },
    #[error(transparent)]
    Token(#[from] VmTokenError),
}

/// Issues tokens for the controller's WorkloadGroups (the debug listener's `/debug/vm-token`).
pub struct VmTokenIssuer {
    pub key: Arc<VmTokenKey>,
    /// Lifetime when the request names none (`--vm-token-ttl`).
    pub ttl: Duration,
    pub clock: Clock,
}

/// The longest lifetime a request may ask for: a year.
const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

impl VmTokenIssuer {
    /// A token for `group` (`<namespace>/<name>`), bound to the group's service account in
    /// `groups` (group -> service account, as the controller last translated them).
    pub fn issue(
        &self,
        groups: &std::collections::BTreeMap<crate::model::ObjectKey, String>,
        group: &str,
        ttl_secs: Option<&str>,
    ) -> Result<String, IssueError> {
        let (namespace, name) = group.split_once('/').ok_or(IssueError::BadGroup)?;
        let key = crate::model::ObjectKey::new(namespace, name);
        let service_account = groups
            .get(&key)
            .ok_or_else(|| IssueError::NoSuchGroup(group.to_owned()))?;
        let ttl = match ttl_secs {
            None => self.ttl.as_secs(),
            Some(t) => t
                .parse::<u64>()
                .ok()
                .filter(|t| (1..=MAX_TTL_SECS).contains(t))
                .ok_or(IssueError::BadTtl { max: MAX_TTL_SECS })?,
        };
        let claims = Claims {
            namespace: namespace.to_owned(),
            group: name.to_owned(),
            service_account: service_account.clone(),
            expires: (self.clock)().saturating_add(ttl),
        };
        Ok(self.key.issue(&claims)?)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// `vm_tokens_refused_total{reason}`: VM tokens that did not authenticate.
#[derive(Clone, Debug, Default)]
pub struct VmTokenMetrics {
    refused: Family<ReasonLabels, Counter>,
}

impl VmTokenMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = VmTokenMetrics::default();
        registry.register(
            "vm_tokens_refused",
            "VM bootstrap tokens refused, by reason (malformed, bad_signature, expired, bad_identity)",
            m.refused.clone(),
        );
        m
    }

    pub fn refused(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&ReasonLabels { reason }).get()
    }
}

/// An [`Authenticator`] that accepts VM tokens and hands every other token to `inner`.
pub struct VmTokenAuth {
    pub key: Arc<VmTokenKey>,
    pub trust_domain: String,
    pub clock: Clock,
    pub metrics: VmTokenMetrics,
    pub inner: Arc<dyn Authenticator>,
}

impl VmTokenAuth {
    fn caller(&self, token: &str) -> Result<Caller, VmTokenError> {
        let claims = self.key.verify(token, (self.clock)())?;
        let identity = Identity::new(&self.trust_domain, &claims.namespace, &claims.service_account)
            .map_err(|e| VmTokenError::BadIdentity(e.to_string()))?;
        Ok(Caller { identity, node: None })
    }
}

impl Authenticator for VmTokenAuth {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        self.authenticate_from(token, None)
    }

    fn authenticate_from<'a>(
        &'a self,
        token: &'a str,
        source: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        if !token.starts_with(PREFIX) {
            return self.inner.authenticate_from(token, source);
        }
        let result = self.caller(token).map_err(|e| {
            self.metrics
                .refused
                .get_or_create(&ReasonLabels { reason: e.reason() })
                .inc();
            AuthError::Rejected(e.to_string())
        });
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn claims(group: &str, sa: &str, expires: u64) -> Claims {
        Claims {
            namespace: "vm".into(),
            group: group.into(),
            service_account: sa.into(),
            expires,
        }
    }

    fn auth(key: VmTokenKey, now: Arc<AtomicU64>) -> VmTokenAuth {
        VmTokenAuth {
            key: Arc::new(key),
            trust_domain: "cluster.local".into(),
            clock: Arc::new(move || now.load(Ordering::SeqCst)),
            metrics: VmTokenMetrics::default(),
            inner: Arc::new(super::super::auth::BootstrapTokens::from_yaml("", "t").expect("empty")),
        }
    }

    #[tokio::test]
    async fn a_token_authenticates_as_its_groups_service_account_until_it_expires() {
        let key = VmTokenKey::from_bytes(&[7; 32]);
        let token = key.issue(&claims("db", "db-sa", 1_000)).expect("issue");
        assert!(token.starts_with(PREFIX) && token.bytes().all(|b| b.is_ascii_graphic()));
        let now = Arc::new(AtomicU64::new(999));
        let a = auth(key, now.clone());
        let caller = a.authenticate(&token).await.expect("valid");
        assert_eq!(caller.identity.to_string(), "spiffe://cluster.local/ns/vm/sa/db-sa");
        assert_eq!(caller.node, None);
        now.store(1_000, Ordering::SeqCst);
        let e = a.authenticate(&token).await.expect_err("expired");
        assert!(matches!(e, AuthError::Rejected(ref m) if m.contains("expired")), "{e}");
        assert_eq!(a.metrics.refused("expired"), 1);
    }

    #[tokio::test]
    async fn a_tampered_token_or_another_key_is_refused() {
        let key = VmTokenKey::from_bytes(&[7; 32]);
        let token = key.issue(&claims("db", "db-sa", 1_000)).expect("issue");
        // Rewrite the payload to claim another service account, keep the tag.
        let (_, tag) = token[PREFIX.len()..].split_once('.').expect("two parts");
        let forged = format!("{PREFIX}{}.{tag}", hex::encode("vm:db:admin:1000"));
        let a = auth(key, Arc::new(AtomicU64::new(0)));
        for bad in [forged.as_str(), &format!("{token}00"), "vmt1.zz.zz", "vmt1.abcd"] {
            assert!(a.authenticate(bad).await.is_err(), "{bad}");
        }
        assert_eq!(a.metrics.refused("bad_signature"), 2);
        assert_eq!(a.metrics.refused("malformed"), 2);
        let other = VmTokenKey::from_bytes(&[8; 32]);
        assert_eq!(other.verify(&token, 0), Err(VmTokenError::BadSignature));
    }

    #[tokio::test]
    async fn a_token_for_one_group_is_not_anothers_identity() {
        let key = VmTokenKey::from_bytes(&[7; 32]);
        let token_a = key.issue(&claims("group-a", "sa-a", 1_000)).expect("issue");
        let a = auth(key, Arc::new(AtomicU64::new(0)));
        let caller = a.authenticate(&token_a).await.expect("valid");
        let b = Identity::new("cluster.local", "vm", "sa-b").expect("id");
        // The CA signs only the caller's own identity: group A's token never yields B's.
        assert_ne!(caller.identity, b);
        // Other tokens still reach the inner authenticator (here: none known).
        assert!(matches!(
            a.authenticate("not-a-vm-token-0123456789").await,
            Err(AuthError::UnknownToken)
        ));
    }

    #[test]
    fn the_issuer_binds_the_groups_service_account_and_ttl() {
        let key = Arc::new(VmTokenKey::from_bytes(&[7; 32]));
        let issuer = VmTokenIssuer {
            key: key.clone(),
            ttl: DEFAULT_VM_TOKEN_TTL,
            clock: Arc::new(|| 100),
        };
        let groups: std::collections::BTreeMap<_, _> =
            [(crate::model::ObjectKey::new("vm", "db"), "db-sa".to_owned())].into();
        let token = issuer.issue(&groups, "vm/db", None).expect("issue");
        let c = key.verify(&token, 100).expect("valid");
        assert_eq!((c.service_account.as_str(), c.expires), ("db-sa", 100 + 24 * 3600));
        let token = issuer.issue(&groups, "vm/db", Some("60")).expect("issue");
        assert_eq!(key.verify(&token, 160), Err(VmTokenError::Expired(160)));
        assert_eq!(
            issuer.issue(&groups, "vm/other", None),
            Err(IssueError::NoSuchGroup("vm/other".into()))
        );
        assert_eq!(issuer.issue(&groups, "db", None), Err(IssueError::BadGroup));
        for bad in ["0", "-1", "x", "99999999999"] {
            assert!(
                matches!(
                    issuer.issue(&groups, "vm/db", Some(bad)),
                    Err(IssueError::BadTtl { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_that_could_break_the_payload_are_refused() {
        let key = VmTokenKey::from_bytes(&[7; 32]);
        for sa in ["", "a:b", "a b"] {
            assert!(key.issue(&claims("g", sa, 1)).is_err(), "{sa:?}");
        }
    }

    #[test]
    fn the_key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("vm-token.key");
        let first = VmTokenKey::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let token = first.issue(&claims("g", "sa", 10)).expect("issue");
        // A restart (or another replica with the same file) verifies it.
        let second = VmTokenKey::load_or_create(&path).expect("load");
        assert!(second.verify(&token, 0).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            VmTokenKey::load_or_create(&path),
            Err(KeyError::Permissions { .. })
        ));
    }
}
