//! The cluster's service account token signing keys, checked before a token is reviewed.
//!
//! A TokenReview is a call to the API server, so a forged token (any JWT-shaped string) used
//! to cost one each (bounded per source and in all by [`super::review_bound`], but still
//! paid). The API server publishes the public keys it signs service account tokens with
//! (`/openid/v1/jwks`, service account issuer discovery); a token no published key verifies is
//! refused here, unasked. This check never accepts anyone: a token it passes is still reviewed,
//! which decides expiry, audience, binding to a live pod, and the identity.
//!
//! - No keys yet (the endpoint is not served, or RBAC denies it): every token goes to review,
//!   as before this check existed. The keys are asked for again at most every [`RETRY`].
//! - A token naming a key (`kid`) the set lacks makes the set be fetched again (the keys may
//!   have rotated), at most once per [`REFRESH_COOLDOWN`]; still unknown, the token is refused
//!   as unavailable (retryable), so a real token signed just after a rotation is retried
//!   rather than refused for good. Keys are also fetched again once they are [`MAX_AGE`] old.
//! - A known key that does not verify the signature: refused (a forgery).

use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::BoxFuture;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

/// The shortest time between two fetches caused by unknown key ids.
pub const REFRESH_COOLDOWN: Duration = Duration::from_secs(5);
/// How long fetched keys are used before they are fetched again.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// How long after a failed fetch (with no keys held) the keys are asked for again.
pub const RETRY: Duration = Duration::from_secs(60);

/// Where the keys come from: the API server in a cluster, a fixed set in tests.
pub trait KeySource: Send + Sync {
    fn fetch(&self) -> BoxFuture<'_, Result<JwkSet, String>>;
}

impl KeySource for Box<dyn KeySource> {
    fn fetch(&self) -> BoxFuture<'_, Result<JwkSet, String>> {
        (**self).fetch()
    }
}

/// What the keys say about a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A published key verifies it, or no keys are known: review it.
    Review,
    /// Its key is not published, even after a fetch: refuse, retryably.
    UnknownKey(String),
    /// Not signed by the key it names, or not a JWT: refuse.
    Forged(&'static str),
}

/// One usable public key.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    rsa: bool,
}

#[derive(Default)]
struct Held {
    /// `None` until a fetch succeeds.
    keys: Option<Vec<Key>>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
}

impl Held {
    fn since(at: Option<Instant>, now: Instant) -> Option<Duration> {
        at.map(|t| now.duration_since(t))
    }

    /// Due for a fetch before use: never fetched or fetched [`MAX_AGE`] ago, and not
    /// attempted within [`RETRY`].
    fn stale(&self, now: Instant) -> bool {
        Self::since(self.fetched, now).is_none_or(|d| d >= MAX_AGE)
            && Self::since(self.attempted, now).is_none_or(|d| d >= RETRY)
    }

    /// A token names an unknown key: fetch unless attempted within [`REFRESH_COOLDOWN`].
    fn may_refresh(&self, now: Instant) -> bool {
        Self::since(self.attempted, now).is_none_or(|d| d >= REFRESH_COOLDOWN)
    }
}

/// The published keys, fetched on demand.
pub struct IssuerKeys<S> {
    source: S,
    held: Mutex<Held>,
    /// One fetch at a time; others wait for its result.
    fetching: tokio::sync::Mutex<()>,
}

impl<S: KeySource> IssuerKeys<S> {
    pub fn new(source: S) -> Self {
        IssuerKeys {
            source,
            held: Mutex::new(Held::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `token`'s signature against the published keys.
    pub async fn check(&self, token: &str) -> Verdict {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Verdict::Forged("not a signed JWT");
        };
        let Some(rsa) = rsa_family(header.alg) else {
            return Verdict::Forged("not signed with RS*/PS*/ES256/ES384, as service account tokens are");
        };
        let kid = header.kid.as_deref();
        self.fetch_if(Held::stale).await;
        match self.verify(token, header.alg, rsa, kid) {
            Lookup::Unknown if self.fetch_if(Held::may_refresh).await => match self.verify(token, header.alg, rsa, kid)
            {
                Lookup::Unknown => unknown(kid),
                found => found.verdict(),
            },
            Lookup::Unknown => unknown(kid),
            found => found.verdict(),
        }
    }

    /// Fetches the keys if `due` says so once this caller's turn comes (callers that waited
    /// for another's fetch see its result); whether new keys arrived. A failure keeps the
    /// keys held.
    async fn fetch_if(&self, due: fn(&Held, Instant) -> bool) -> bool {
        if !due(&self.held(), Instant::now()) {
            return false;
        }
        let _one = self.fetching.lock().await;
        if !due(&self.held(), Instant::now()) {
            return false;
        }
        self.held().attempted = Some(Instant::now());
        match self.source.fetch().await {
            Ok(set) => {
                let keys: Vec<Key> = set.keys.iter().filter_map(usable).collect();
                tracing::debug!(keys = keys.len(), "service account issuer keys fetched");
                let mut held = self.held();
                held.keys = Some(keys);
                held.fetched = Some(Instant::now());
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "service account issuer keys not fetched; tokens are reviewed unchecked until they are");
                false
            }
        }
    }

    fn verify(&self, token: &str, alg: Algorithm, rsa: bool, kid: Option<&str>) -> Lookup {
        let held = self.held();
        let Some(keys) = &held.keys else {
            return Lookup::NoKeys;
        };
        let Some((message, signature)) = token.rsplit_once('.') else {
            return Lookup::Bad;
        };
        let mut candidates = keys
            .iter()
            .filter(|k| k.rsa == rsa)
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .peekable();
        if candidates.peek().is_none() {
            return Lookup::Unknown;
        }
        match candidates
            .any(|k| jsonwebtoken::crypto::verify(signature, message.as_bytes(), &k.key, alg).unwrap_or(false))
        {
            true => Lookup::Verified,
            false => Lookup::Bad,
        }
    }
}

/// What the held keys say.
enum Lookup {
    NoKeys,
    Unknown,
    Verified,
    Bad,
}

impl Lookup {
    fn verdict(self) -> Verdict {
        match self {
            Lookup::NoKeys | Lookup::Verified => Verdict::Review,
            Lookup::Unknown => unknown(None),
            Lookup::Bad => Verdict::Forged("the signature does not verify with the cluster's published key"),
        }
    }
}

fn unknown(kid: Option<&str>) -> Verdict {
    let kid: String = kid.unwrap_or("(none)").chars().take(64).collect();
    Verdict::UnknownKey(format!(
        "key id {kid:?} is not among the cluster's published service account keys"
    ))
}

/// Whether `alg` is an RSA algorithm (`Some(true)`), an ECDSA one (`Some(false)`), or one
/// service account tokens are never signed with (`None`: HMAC, EdDSA).
fn rsa_family(alg: Algorithm) -> Option<bool> {
    use Algorithm::*;
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(true),
        ES256 | ES384 => Some(false),
        HS256 | HS384 | HS512 | EdDSA => None,
    }
}

/// A published key usable to verify: RSA or P-256/P-384.
fn usable(jwk: &Jwk) -> Option<Key> {
    let rsa = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => true,
        AlgorithmParameters::EllipticCurve(_) => false,
        _ => return None,
    };
    Some(Key {
        kid: jwk.common.key_id.clone(),
        key: DecodingKey::from_jwk(jwk).ok()?,
        rsa,
    })
}

/// Signing keys and a key source for tests here and in [`super::review_bound`].
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)] // a panic in a test is a failed test

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use base64::Engine;
    use futures_util::future::BoxFuture;
    use futures_util::FutureExt;
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    use super::KeySource;

    /// A P-256 signing key and its JWK.
    pub struct Signer {
        pem: String,
        pub jwk: Jwk,
    }

    impl Signer {
        pub fn new(kid: &str) -> Signer {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let raw = pair.public_key_raw();
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let jwk = serde_json::json!({
                "use": "sig", "kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256",
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            });
            Signer {
                pem: pair.serialize_pem(),
                jwk: serde_json::from_value(jwk).unwrap(),
            }
        }

        /// A token signed by this key, naming key id `kid`.
        pub fn sign(&self, kid: Option<&str>) -> String {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = kid.map(Into::into);
            let claims =
                serde_json::json!({"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:a:b"});
            jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_pem(self.pem.as_bytes()).unwrap()).unwrap()
        }
    }

    /// A key source serving whatever set it holds, counting fetches; `None` fails.
    #[derive(Clone, Default)]
    pub struct Fixed {
        set: Arc<Mutex<Option<Vec<Jwk>>>>,
        pub fetches: Arc<AtomicUsize>,
    }

    impl Fixed {
        pub fn serve(&self, keys: Option<Vec<Jwk>>) {
            *self.set.lock().unwrap() = keys;
        }

        pub fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    impl KeySource for Fixed {
        fn fetch(&self) -> BoxFuture<'_, Result<JwkSet, String>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let set = self.set.lock().unwrap().clone();
            async move { set.map(|keys| JwkSet { keys }).ok_or_else(|| "403".to_owned()) }.boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a failed test

    use jsonwebtoken::{EncodingKey, Header};

    use super::testing::{Fixed, Signer};
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_tokens_a_published_key_signed_are_reviewed() {
        let (cluster, attacker) = (Signer::new("k1"), Signer::new("k1"));
        let source = Fixed::default();
        source.serve(Some(vec![cluster.jwk.clone()]));
        let keys = IssuerKeys::new(source.clone());
        assert_eq!(keys.check(&cluster.sign(Some("k1"))).await, Verdict::Review);
        assert_eq!(keys.check(&cluster.sign(None)).await, Verdict::Review);
        assert!(matches!(
            keys.check(&attacker.sign(Some("k1"))).await,
            Verdict::Forged(_)
        ));
        assert!(matches!(keys.check(&attacker.sign(None)).await, Verdict::Forged(_)));
        // A random JWT-shaped string, and HMAC (its "key" would be public).
        assert!(matches!(
            keys.check("eyJhbGciOiJFUzI1NiJ9.e30.AAAA").await,
            Verdict::Forged(_)
        ));
        let hs = jsonwebtoken::encode(
            &Header::default(),
            &serde_json::json!({}),
            &EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        assert!(matches!(keys.check(&hs).await, Verdict::Forged(_)));
        assert!(matches!(keys.check("not-a-jwt").await, Verdict::Forged(_)));
        assert_eq!(source.fetches(), 1, "the keys are fetched once");
    }

    #[tokio::test(start_paused = true)]
    async fn without_keys_every_token_is_reviewed_and_the_keys_asked_again_later() {
        let cluster = Signer::new("k1");
        let source = Fixed::default();
        let keys = IssuerKeys::new(source.clone());
        let forged = Signer::new("k1").sign(Some("k1"));
        assert_eq!(keys.check(&forged).await, Verdict::Review);
        assert_eq!(keys.check(&forged).await, Verdict::Review);
        assert_eq!(source.fetches(), 1, "a failed fetch is not repeated at once");
        source.serve(Some(vec![cluster.jwk.clone()]));
        tokio::time::advance(RETRY).await;
        assert!(matches!(keys.check(&forged).await, Verdict::Forged(_)));
        assert_eq!(keys.check(&cluster.sign(Some("k1"))).await, Verdict::Review);
        // A later failure keeps the keys held.
        source.serve(None);
        tokio::time::advance(MAX_AGE).await;
        assert!(matches!(keys.check(&forged).await, Verdict::Forged(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_key_is_fetched_and_unknown_ids_cost_one_fetch_per_cooldown() {
        let (old, new) = (Signer::new("old"), Signer::new("new"));
        let source = Fixed::default();
        source.serve(Some(vec![old.jwk.clone()]));
        let keys = IssuerKeys::new(source.clone());
        assert_eq!(keys.check(&old.sign(Some("old"))).await, Verdict::Review);
        tokio::time::advance(REFRESH_COOLDOWN).await;
        source.serve(Some(vec![old.jwk.clone(), new.jwk.clone()]));
        assert_eq!(
            keys.check(&new.sign(Some("new"))).await,
            Verdict::Review,
            "fetched on first sight"
        );
        let fetches = source.fetches();
        for i in 0..100 {
            let kid = format!("random-{i}");
            assert!(matches!(
                keys.check(&new.sign(Some(&kid))).await,
                Verdict::UnknownKey(_)
            ));
        }
        assert_eq!(source.fetches(), fetches, "within the cooldown: no fetch");
        tokio::time::advance(REFRESH_COOLDOWN).await;
        assert!(matches!(
            keys.check(&new.sign(Some("random"))).await,
            Verdict::UnknownKey(_)
        ));
        assert_eq!(source.fetches(), fetches + 1);
    }
}
