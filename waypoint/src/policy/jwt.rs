//! Istio `RequestAuthentication` for the waypoint: finds a JWT in a request where the rules say,
//! verifies it (signature, `iss`, `exp`/`nbf`, `aud`) against the issuer's JWKS, and yields the
//! request principal (`<iss>/<sub>`) plus claims for authorization. Like Istio, a request with no
//! token passes through unauthenticated (authorization decides), a request with an invalid token
//! is rejected. Remote JWKS documents are cached per URI in a process-wide [`JwksCache`] that
//! fetches once (single-flight), refreshes in the background and fails closed when it never got keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, USER_AGENT};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use mesh_proto::waypoint::JwtRule;
use serde_json::{Map, Value};
// The cache's refresh and failure backoff run on tokio's clock, so tests can pause it.
use tokio::time::Instant;
use tracing::{debug, warn};

/// Clock skew tolerated on `exp` and `nbf` (Envoy allows 60 s; a smaller window limits replay of
/// just-expired tokens while still absorbing ordinary NTP drift).
const LEEWAY_SECS: f64 = 30.0;
/// How long a failed JWKS fetch is remembered before another is tried, so that an unreachable
/// JWKS server does not turn every request into a fetch attempt.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);
/// JWKS documents are a few KiB; anything much larger is a misconfiguration or an attack.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Error messages quote issuer/kid/alg from the token; clip them so a hostile token cannot flood logs.
const MAX_QUOTED: usize = 128;
/// Token locations are tracked as a bitmask; more distinct locations than this is not a real config.
const MAX_LOCATIONS: usize = 64;

/// JWT segments are unpadded base64url, but tolerate padding from sloppy issuers.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A validated token's identity and claims.
#[derive(Clone, Debug)]
pub struct RequestPrincipal {
    pub issuer: String,
    pub subject: String,
    pub claims: Map<String, Value>,
}

impl RequestPrincipal {
    /// Istio's `requestPrincipal`: "<iss>/<sub>".
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }

    /// Values of a claim for `request.auth.claims[a][b]` conditions: `path` is ["a","b"] (nested
    /// objects). A string gives one value, an array gives each of its strings (numbers/bools as
    /// text), numbers/bools their text; a missing claim, null or object gives nothing.
    pub fn claim_values(&self, path: &[&str]) -> Vec<String> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut value = match self.claims.get(*first) {
            Some(v) => v,
            None => return Vec::new(),
        };
        for key in rest {
            match value.get(*key) {
                Some(v) => value = v,
                None => return Vec::new(),
            }
        }
        match value {
            Value::Array(items) => items.iter().filter_map(scalar_text).collect(),
            other => scalar_text(other).into_iter().collect(),
        }
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Why a present token was rejected. Messages describe the problem but never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("malformed JWT: {0}")]
    Malformed(&'static str),
    #[error("JWT issuer {issuer:?} is not accepted for the location the token was found in")]
    UnknownIssuer { issuer: String },
    #[error("JWT has expired")]
    Expired,
    #[error("JWT is not yet valid (nbf is in the future)")]
    NotYetValid,
    #[error("JWT signature does not verify with the issuer's keys")]
    BadSignature,
    #[error("JWT audience does not match any accepted audience")]
    AudienceMismatch,
    #[error("no verification keys available for issuer {issuer:?} (JWKS missing, invalid or not fetched)")]
    NoKeys { issuer: String },
    #[error("no key in the JWKS of issuer {issuer:?} matches kid {kid:?} and algorithm {alg:?}")]
    KeyNotFound {
        issuer: String,
        kid: Option<String>,
        alg: Algorithm,
    },
    #[error("JWT algorithm {0:?} is not supported")]
    UnsupportedAlgorithm(String),
    #[error("request carries more than one distinct JWT")]
    MultipleTokens,
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Keys

/// Which keys can verify an algorithm; a key is only ever tried with algorithms of its family so
/// an RSA key can never be (mis)used as an HMAC secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
}

/// HMAC (HS*) is deliberately unsupported: a JWKS is a public document, so a symmetric key in it
/// would let anyone who can read it mint tokens.
fn family_of(alg: Algorithm) -> Option<Family> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(Family::Rsa),
        Algorithm::ES256 => Some(Family::P256),
        Algorithm::ES384 => Some(Family::P384),
        Algorithm::EdDSA => Some(Family::Ed25519),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
    }
}

struct Key {
    kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    alg: Option<Algorithm>,
    family: Family,
    key: DecodingKey,
}

/// The usable signing keys of one JWKS document.
struct KeySet {
    keys: Vec<Key>,
}

/// Parses a JWKS, keeping every usable verification key. Keys are parsed one by one because real
/// JWKS documents mix in keys this proxy cannot use (encryption keys, P-521, RSA-OAEP `alg`s), and
/// one of those must not make the whole document unusable.
fn parse_jwks(text: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<Value>,
    }
    let doc: Doc = serde_json::from_slice(text).map_err(|e| format!("JWKS is not a JSON key set: {e}"))?;
    let total = doc.keys.len();
    let keys: Vec<Key> = doc.keys.into_iter().filter_map(usable_key).collect();
    if keys.is_empty() {
        return Err(format!("JWKS has no usable signature keys (of {total})"));
    }
    if keys.len() < total {
        debug!(
            usable = keys.len(),
            total, "JWKS: skipped keys that cannot verify signatures"
        );
    }
    Ok(KeySet { keys })
}

fn usable_key(raw: Value) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(raw).ok()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Family::P256,
            EllipticCurve::P384 => Family::P384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => Family::Ed25519,
        _ => return None,
    };
    let alg = match &jwk.common.key_algorithm {
        // A pinned algorithm that is not a signature algorithm of this family: not a signing key.
        Some(a) => {
            let alg = Algorithm::from_str(&a.to_string()).ok()?;
            if family_of(alg) != Some(family) {
                return None;
            }
            Some(alg)
        }
        None => None,
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id,
        alg,
        family,
        key,
    })
}

// ---------------------------------------------------------------------------------------------
// JWKS cache

type HttpClient = Client<HttpsConnector<HttpConnector<RoutableOnly>>, Empty<Bytes>>;

/// The system resolver, keeping only addresses a tenant may have the waypoint fetch from: a
/// `jwksUri` comes from a tenant's RequestAuthentication, and on a shared waypoint one naming
/// a host that resolves to loopback or link-local would have the waypoint request its own
/// admin port or the cloud metadata server ([`mesh_core::unroutable`]).
#[derive(Clone)]
struct RoutableOnly(GaiResolver);

type Resolved =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<std::vec::IntoIter<SocketAddr>>> + Send>>;

impl tower_service::Service<Name> for RoutableOnly {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolved;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Resolved {
        let lookup = self.0.call(name.clone());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = lookup
                .await?
                .filter(|a| mesh_core::unroutable::Unroutable::of(a.ip()).is_none())
                .collect();
            if addrs.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{name} resolves to no address the waypoint may fetch from (loopback, link-local, unspecified or multicast)"
                )));
            }
            Ok(addrs.into_iter())
        })
    }
}

/// Refuses a `jwksUri` whose host is a literal address of a class the waypoint may not
/// fetch from (the connector does not resolve literal addresses, so [`RoutableOnly`] never
/// sees them).
fn literal_host_allowed(uri: &http::Uri) -> Result<(), String> {
    let host = uri.host().unwrap_or_default();
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    match literal
        .parse::<std::net::IpAddr>()
        .ok()
        .and_then(mesh_core::unroutable::Unroutable::of)
    {
        Some(class) => Err(format!("jwksUri host {host} is a {class} address: not fetched")),
        None => Ok(()),
    }
}

/// A stand-in for the JWKS server in tests: the document (or error) for a URI.
#[cfg(test)]
type FakeFetch = Box<
    dyn Fn(&str) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>> + Send + Sync,
>;

struct Fetcher {
    /// `Err` only if TLS could not be set up (then every fetch reports it).
    client: Result<HttpClient, String>,
    timeout: Duration,
    /// Whether literal loopback (and other unroutable) hosts may be fetched: tests serve
    /// JWKS from 127.0.0.1.
    #[cfg(test)]
    any_literal_host: bool,
    #[cfg(test)]
    fake: Option<FakeFetch>,
}

impl Fetcher {
    async fn fetch(&self, uri: &str) -> Result<KeySet, String> {
        let body = tokio::time::timeout(self.timeout, self.get(uri))
            .await
            .map_err(|_| format!("JWKS fetch timed out after {:?}", self.timeout))??;
        parse_jwks(&body)
    }

    /// The JWKS document at `uri`, at most `MAX_JWKS_BYTES` of it.
    async fn get(&self, uri: &str) -> Result<Bytes, String> {
        #[cfg(test)]
        if let Some(fake) = &self.fake {
            return fake(uri).await.map(Bytes::from);
        }
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let parsed: http::Uri = uri.parse().map_err(|e| format!("invalid jwksUri: {e}"))?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) {
            return Err("jwksUri must be http:// or https://".to_owned());
        }
        #[cfg(test)]
        let checked = !self.any_literal_host;
        #[cfg(not(test))]
        let checked = true;
        if checked {
            literal_host_allowed(&parsed)?;
        }
        let req = http::Request::get(parsed)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, "mesh-waypoint")
            .body(Empty::new())
            .map_err(|e| format!("cannot build JWKS request: {e}"))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("JWKS request failed: {}", mesh_core::grpc::ErrorChain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("JWKS server answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading JWKS body failed: {e}"))?;
        Ok(body.to_bytes())
    }
}

#[derive(Default)]
struct EntryState {
    keys: Option<Arc<KeySet>>,
    fetched: Option<Instant>,
    failed: Option<Instant>,
    refreshing: bool,
}

#[derive(Default)]
struct Entry {
    /// Held only for brief reads/writes, never across an await.
    state: Mutex<EntryState>,
    /// Single-flight: whoever holds it fetches; others wait and then reuse the outcome.
    fetching: tokio::sync::Mutex<()>,
}

enum Peek {
    Keys(Arc<KeySet>),
    RecentlyFailed,
    Empty,
}

impl Entry {
    fn state(&self) -> std::sync::MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, uri: &str, result: Result<KeySet, String>) -> Option<Arc<KeySet>> {
        let mut s = self.state();
        let now = Instant::now();
        match result {
            Ok(keys) => {
                let keys = Arc::new(keys);
                s.keys = Some(keys.clone());
                s.fetched = Some(now);
                s.failed = None;
                Some(keys)
            }
            Err(error) => {
                // Keep serving the last good keys: a flapping JWKS server must not log everyone out.
                warn!(jwks_uri = uri, %error, have_keys = s.keys.is_some(), "JWKS fetch failed");
                s.failed = Some(now);
                s.keys.clone()
            }
        }
    }
}

/// Shared cache of JWKS documents fetched from jwksUri; one per waypoint process.
///
/// Both `http://` and `https://` URIs work; HTTPS is verified against the Mozilla root set
/// (webpki-roots), not the host's trust store. Entries are keyed by URI and live as long as the
/// cache (the set of URIs comes from configuration, so it stays small).
pub struct JwksCache {
    refresh: Duration,
    fetcher: Arc<Fetcher>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

impl JwksCache {
    /// `refresh`: how often a fetched JWKS is re-fetched (Istio default 20 min); `timeout`: per fetch.
    pub fn new(refresh: Duration, timeout: Duration) -> Arc<Self> {
        Self::build(refresh, timeout, false)
    }

    /// [`new`](Self::new), fetching from literal loopback hosts too (test JWKS servers).
    #[cfg(test)]
    fn for_local_servers(refresh: Duration, timeout: Duration) -> Arc<Self> {
        Self::build(refresh, timeout, true)
    }

    fn build(refresh: Duration, timeout: Duration, _any_literal_host: bool) -> Arc<Self> {
        let client = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map(|b| {
                let mut http = HttpConnector::new_with_resolver(RoutableOnly(GaiResolver::new()));
                http.enforce_http(false);
                let connector = b.https_or_http().enable_http1().wrap_connector(http);
                // Fetches are minutes apart: keeping idle connections would only hold sockets.
                Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(0)
                    .build(connector)
            })
            .map_err(|e| format!("TLS setup for JWKS fetches failed: {e}"));
        Arc::new(Self {
            refresh,
            fetcher: Arc::new(Fetcher {
                client,
                timeout,
                #[cfg(test)]
                any_literal_host: _any_literal_host,
                #[cfg(test)]
                fake: None,
            }),
            entries: Mutex::default(),
        })
    }

    /// A cache whose fetches are answered by `fake` instead of the network, so tests of its
    /// timing need no sockets and can run on paused time.
    #[cfg(test)]
    fn with_fake(refresh: Duration, timeout: Duration, fake: FakeFetch) -> Arc<Self> {
        Arc::new(Self {
            refresh,
            fetcher: Arc::new(Fetcher {
                client: Err("no network in this test".to_owned()),
                timeout,
                any_literal_host: true,
                fake: Some(fake),
            }),
            entries: Mutex::default(),
        })
    }

    fn entry(&self, uri: &str) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get(uri) {
            return e.clone();
        }
        let e = Arc::new(Entry::default());
        entries.insert(uri.to_owned(), e.clone());
        e
    }

    /// Current keys without waiting; starts a background refresh when they are stale.
    fn peek(&self, entry: &Arc<Entry>, uri: &str) -> Peek {
        let mut s = entry.state();
        let recently_failed = s.failed.is_some_and(|t| t.elapsed() < FAILURE_BACKOFF);
        let Some(keys) = s.keys.clone() else {
            return if recently_failed {
                Peek::RecentlyFailed
            } else {
                Peek::Empty
            };
        };
        let stale = s.fetched.is_none_or(|t| t.elapsed() >= self.refresh);
        if stale && !recently_failed && !s.refreshing {
            // Refresh off the request path: this request (and others) keep using the current keys.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                s.refreshing = true;
                let (entry, fetcher, uri) = (entry.clone(), self.fetcher.clone(), uri.to_owned());
                rt.spawn(async move {
                    let _flight = entry.fetching.lock().await;
                    let result = fetcher.fetch(&uri).await;
                    entry.record(&uri, result);
                    entry.state().refreshing = false;
                });
            }
        }
        Peek::Keys(keys)
    }

    /// Keys for `uri`, fetching them first if there are none yet. `None`: no keys (fail closed).
    async fn keys(&self, uri: &str) -> Option<Arc<KeySet>> {
        let entry = self.entry(uri);
        match self.peek(&entry, uri) {
            Peek::Keys(k) => return Some(k),
            Peek::RecentlyFailed => return None,
            Peek::Empty => {}
        }
        let _flight = entry.fetching.lock().await;
        // Whoever held the lock before us may have just fetched (or just failed).
        match self.peek(&entry, uri) {
            Peek::Keys(k) => return Some(k),
            Peek::RecentlyFailed => return None,
            Peek::Empty => {}
        }
        let result = self.fetcher.fetch(uri).await;
        entry.record(uri, result)
    }
}

// ---------------------------------------------------------------------------------------------
// Authenticator

enum KeySource {
    /// Inline `jwks`, parsed once; `None` if it did not parse (tokens are then rejected).
    Inline(Option<Arc<KeySet>>),
    Remote(String),
    Missing,
}

struct Rule {
    issuer: String,
    audiences: Vec<String>,
    keys: KeySource,
    forward_original_token: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
    /// Bitmask of `Authenticator::locations` this rule reads tokens from.
    locations: u64,
}

#[derive(PartialEq, Eq)]
enum Where {
    Header { name: HeaderName, prefix: String },
    Param(String),
}

/// The JWT rules that apply to one request target (all RequestAuthentications selecting it).
pub struct Authenticator {
    rules: Vec<Rule>,
    locations: Vec<Where>,
    /// Every header the rules write; stripped from incoming requests so clients cannot forge them.
    output_headers: Vec<HeaderName>,
    cache: Arc<JwksCache>,
}

struct Verified {
    principal: RequestPrincipal,
    rule: usize,
    payload: HeaderValue,
}

fn header_name(name: &str, what: &str, issuer: &str) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            warn!(
                issuer,
                header = name,
                "RequestAuthentication: ignoring invalid {what} header name"
            );
            None
        }
    }
}

/// Where rule `r` reads tokens. Envoy's defaults apply only when it names no location at all.
fn rule_locations(r: &JwtRule) -> Vec<Where> {
    let mut wheres = Vec::new();
    if r.from_headers.is_empty() && r.from_params.is_empty() {
        wheres.push(Where::Header {
            name: AUTHORIZATION,
            prefix: "Bearer ".to_owned(),
        });
        wheres.push(Where::Param("access_token".to_owned()));
    }
    for h in &r.from_headers {
        if let Some(name) = header_name(&h.name, "fromHeaders", &r.issuer) {
            wheres.push(Where::Header {
                name,
                prefix: h.prefix.clone(),
            });
        }
    }
    wheres.extend(r.from_params.iter().map(|p| Where::Param(p.clone())));
    wheres
}

/// Adds `wheres` to the shared `locations` (at most `MAX_LOCATIONS`) and returns their bitmask.
fn intern_locations(locations: &mut Vec<Where>, wheres: Vec<Where>, issuer: &str) -> u64 {
    let mut mask = 0u64;
    for w in wheres {
        let idx = match locations.iter().position(|l| *l == w) {
            Some(i) => i,
            None if locations.len() < MAX_LOCATIONS => {
                locations.push(w);
                locations.len() - 1
            }
            None => {
                warn!(
                    issuer,
                    "RequestAuthentication: too many token locations, ignoring the rest"
                );
                continue;
            }
        };
        mask |= 1 << idx;
    }
    mask
}

/// Where rule `r`'s keys come from. Istio: inline `jwks` wins over `jwksUri`.
fn key_source(r: &JwtRule) -> KeySource {
    if !r.jwks.is_empty() {
        KeySource::Inline(match parse_jwks(r.jwks.as_bytes()) {
            Ok(k) => Some(Arc::new(k)),
            Err(error) => {
                warn!(issuer = r.issuer, %error, "RequestAuthentication: inline jwks unusable; its tokens will be rejected");
                None
            }
        })
    } else if !r.jwks_uri.is_empty() {
        KeySource::Remote(r.jwks_uri.clone())
    } else {
        warn!(
            issuer = r.issuer,
            "RequestAuthentication: rule has neither jwks nor jwksUri; its tokens will be rejected"
        );
        KeySource::Missing
    }
}

impl Authenticator {
    pub fn new(rules: Vec<JwtRule>, cache: Arc<JwksCache>) -> Self {
        let mut locations: Vec<Where> = Vec::new();
        let mut output_headers: Vec<HeaderName> = Vec::new();
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let mask = intern_locations(&mut locations, rule_locations(&r), &r.issuer);
            let keys = key_source(&r);
            let payload_header = Some(&r.output_payload_to_header)
                .filter(|h| !h.is_empty())
                .and_then(|h| header_name(h, "outputPayloadToHeader", &r.issuer));
            let claim_headers: Vec<(HeaderName, String)> = r
                .output_claim_to_headers
                .iter()
                .filter_map(|c| {
                    Some((
                        header_name(&c.header, "outputClaimToHeaders", &r.issuer)?,
                        c.claim.clone(),
                    ))
                })
                .collect();
            for h in payload_header.iter().chain(claim_headers.iter().map(|(h, _)| h)) {
                if !output_headers.contains(h) {
                    output_headers.push(h.clone());
                }
            }
            out.push(Rule {
                issuer: r.issuer,
                audiences: r.audiences,
                keys,
                forward_original_token: r.forward_original_token,
                payload_header,
                claim_headers,
                locations: mask,
            });
        }
        Self {
            rules: out,
            locations,
            output_headers,
            cache,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Looks for a token where the rules say (fromHeaders, default `Authorization: Bearer <t>`;
    /// fromParams, default query param `access_token`) and validates it against the rule whose
    /// issuer matches the token's `iss` (and which reads the location the token was found in).
    ///
    /// - `Ok(None)`: no token present; the caller has no request principal (authorization decides).
    /// - `Ok(Some(p))`: valid. Unless `forward_original_token`, the header carrying the token was
    ///   removed (a query parameter is left in the URI); `output_payload_to_header` holds the
    ///   base64url payload; each `output_claim_to_headers` header holds its claim (strings as-is,
    ///   other values as JSON text).
    /// - `Err(e)`: a token was present but invalid; the caller answers 401.
    ///
    /// In all non-error cases, incoming headers named as outputs are removed first so a client
    /// cannot forge them.
    pub async fn authenticate(&self, parts: &mut http::request::Parts) -> Result<Option<RequestPrincipal>, JwtError> {
        if self.rules.is_empty() {
            return Ok(None);
        }
        let outcome = match self.find(parts)? {
            None => None,
            Some((token, mask)) => Some((self.verify(token, mask).await?, mask)),
        };
        for h in &self.output_headers {
            parts.headers.remove(h);
        }
        let Some((verified, mask)) = outcome else {
            return Ok(None);
        };
        let rule = &self.rules[verified.rule];
        if !rule.forward_original_token {
            for (i, loc) in self.locations.iter().enumerate() {
                if let Where::Header { name, .. } = loc {
                    if mask & (1 << i) != 0 {
                        parts.headers.remove(name);
                    }
                }
            }
        }
        if let Some(h) = &rule.payload_header {
            parts.headers.insert(h.clone(), verified.payload);
        }
        for (h, claim) in &rule.claim_headers {
            if let Some(v) = claim_header_value(&verified.principal.claims, claim) {
                parts.headers.insert(h.clone(), v);
            }
        }
        Ok(Some(verified.principal))
    }

    /// The token, borrowed from the request, and the bitmask of locations it was found in. The same
    /// token in several places is one token; different tokens are ambiguous and rejected.
    fn find<'a>(&self, parts: &'a http::request::Parts) -> Result<Option<(&'a str, u64)>, JwtError> {
        fn note<'a>(found: &mut Option<(&'a str, u64)>, token: &'a str, idx: usize) -> Result<(), JwtError> {
            match found {
                None => *found = Some((token, 1 << idx)),
                Some((t, mask)) if *t == token => *mask |= 1 << idx,
                Some(_) => return Err(JwtError::MultipleTokens),
            }
            Ok(())
        }
        let mut found = None;
        for (idx, loc) in self.locations.iter().enumerate() {
            match loc {
                Where::Header { name, prefix } => {
                    for value in parts.headers.get_all(name) {
                        // A value without the prefix (e.g. `Authorization: Basic ...`) is not a JWT location.
                        let Some(token) = value.to_str().ok().and_then(|v| strip_prefix_ignore_case(v, prefix)) else {
                            continue;
                        };
                        let token = token.trim();
                        if !token.is_empty() {
                            note(&mut found, token, idx)?;
                        }
                    }
                }
                Where::Param(param) => {
                    let Some(query) = parts.uri.query() else { continue };
                    for pair in query.split('&') {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        // JWT characters never need percent-encoding, so the raw value is the token.
                        if k == param && !v.is_empty() {
                            note(&mut found, v, idx)?;
                        }
                    }
                }
            }
        }
        Ok(found)
    }

    async fn verify(&self, token: &str, mask: u64) -> Result<Verified, JwtError> {
        let token = Token::parse(token)?;
        let issuer = token.issuer()?;
        let mut first_err = None;
        for (idx, rule) in self.rules.iter().enumerate() {
            if rule.issuer != issuer || rule.locations & mask == 0 {
                continue;
            }
            match self.check(rule, &token).await {
                Ok(()) => return token.into_verified(rule, idx),
                // Several RequestAuthentications may name the same issuer (e.g. other audiences).
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| JwtError::UnknownIssuer { issuer: clip(issuer) }))
    }

    /// Verifies `token` under `rule`: a key of the issuer's signs it, its times and audience fit.
    async fn check(&self, rule: &Rule, token: &Token<'_>) -> Result<(), JwtError> {
        let no_keys = || JwtError::NoKeys {
            issuer: rule.issuer.clone(),
        };
        let keys = match &rule.keys {
            KeySource::Inline(Some(k)) => k.clone(),
            KeySource::Inline(None) | KeySource::Missing => return Err(no_keys()),
            KeySource::Remote(uri) => self.cache.keys(uri).await.ok_or_else(no_keys)?,
        };
        token.check_signature(&rule.issuer, &keys)?;
        token.check_claims(rule)
    }
}

/// A token split and decoded, not yet verified.
struct Token<'t> {
    alg: Algorithm,
    family: Family,
    kid: Option<String>,
    /// `header.payload`: what the signature covers.
    message: &'t [u8],
    signature: &'t str,
    /// The payload segment as sent (forwarded in the payload header).
    payload: &'t str,
    claims: Map<String, Value>,
}

impl<'t> Token<'t> {
    fn parse(token: &'t str) -> Result<Self, JwtError> {
        #[derive(serde::Deserialize)]
        struct JoseHeader {
            alg: String,
            #[serde(default)]
            kid: Option<String>,
        }
        let mut segments = token.split('.');
        let (Some(h64), Some(p64), Some(sig), None) =
            (segments.next(), segments.next(), segments.next(), segments.next())
        else {
            return Err(JwtError::Malformed("expected three dot-separated segments"));
        };
        if h64.is_empty() || p64.is_empty() {
            return Err(JwtError::Malformed("empty header or payload segment"));
        }
        let header_json = B64URL
            .decode(h64)
            .map_err(|_| JwtError::Malformed("header is not base64url"))?;
        let header: JoseHeader = serde_json::from_slice(&header_json)
            .map_err(|_| JwtError::Malformed("header is not a JSON object with a string alg"))?;
        let alg = Algorithm::from_str(&header.alg).map_err(|_| JwtError::UnsupportedAlgorithm(clip(&header.alg)))?;
        let family = family_of(alg).ok_or_else(|| JwtError::UnsupportedAlgorithm(clip(&header.alg)))?;
        if sig.is_empty() {
            return Err(JwtError::Malformed("missing signature"));
        }
        let payload_json = B64URL
            .decode(p64)
            .map_err(|_| JwtError::Malformed("payload is not base64url"))?;
        let claims: Map<String, Value> =
            serde_json::from_slice(&payload_json).map_err(|_| JwtError::Malformed("payload is not a JSON object"))?;
        Ok(Token {
            alg,
            family,
            kid: header.kid,
            message: &token.as_bytes()[..h64.len() + 1 + p64.len()],
            signature: sig,
            payload: p64,
            claims,
        })
    }

    fn issuer(&self) -> Result<&str, JwtError> {
        match self.claims.get("iss") {
            Some(Value::String(s)) => Ok(s.as_str()),
            _ => Err(JwtError::Malformed("missing or non-string iss claim")),
        }
    }

    /// Some key of `keys` verifies the signature. A key is a candidate if its type fits the
    /// algorithm, it does not pin another algorithm, and (when both name one) its kid matches.
    fn check_signature(&self, issuer: &str, keys: &KeySet) -> Result<(), JwtError> {
        let (alg, kid) = (self.alg, self.kid.as_deref());
        let mut candidates = keys
            .keys
            .iter()
            .filter(|k| k.family == self.family && k.alg.is_none_or(|a| a == alg))
            .filter(|k| match (kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::KeyNotFound {
                issuer: issuer.to_owned(),
                kid: kid.map(clip),
                alg,
            });
        }
        // `verify` errors (e.g. signature not base64url) count as a failed verification.
        if !candidates.any(|k| jsonwebtoken::crypto::verify(self.signature, self.message, &k.key, alg).unwrap_or(false))
        {
            return Err(JwtError::BadSignature);
        }
        Ok(())
    }

    /// `exp`/`nbf` against the wall clock (with leeway) and `aud` against the rule's audiences.
    fn check_claims(&self, rule: &Rule) -> Result<(), JwtError> {
        let claims = &self.claims;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if let Some(exp) = claims.get("exp") {
            let exp = exp.as_f64().ok_or(JwtError::Malformed("exp is not a number"))?;
            if now > exp + LEEWAY_SECS {
                return Err(JwtError::Expired);
            }
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_f64().ok_or(JwtError::Malformed("nbf is not a number"))?;
            if nbf > now + LEEWAY_SECS {
                return Err(JwtError::NotYetValid);
            }
        }
        if !rule.audiences.is_empty() {
            let accepted = |a: &str| rule.audiences.iter().any(|x| x == a);
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => accepted(a),
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str().is_some_and(accepted)),
                _ => false,
            };
            if !ok {
                return Err(JwtError::AudienceMismatch);
            }
        }
        Ok(())
    }

    /// The verified token's principal, accepted by rule number `idx`.
    fn into_verified(self, rule: &Rule, idx: usize) -> Result<Verified, JwtError> {
        let payload = HeaderValue::from_str(self.payload.trim_end_matches('='))
            .map_err(|_| JwtError::Malformed("payload is not base64url"))?;
        let subject = match self.claims.get("sub") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        Ok(Verified {
            principal: RequestPrincipal {
                issuer: rule.issuer.clone(),
                subject,
                claims: self.claims,
            },
            rule: idx,
            payload,
        })
    }
}

fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &value[prefix.len()..])
}

/// A claim for `outputClaimToHeaders`: a top-level claim, or a nested one written `a.b` (Envoy).
/// Strings are copied as-is, other values as JSON text. `None` if missing or not a valid header value.
fn claim_header_value(claims: &Map<String, Value>, claim: &str) -> Option<HeaderValue> {
    let value = claims.get(claim).or_else(|| {
        let mut parts = claim.split('.');
        let first = claims.get(parts.next()?)?;
        parts.try_fold(first, |v, k| v.get(k))
    })?;
    let text = match value {
        Value::String(s) => HeaderValue::from_str(s),
        other => HeaderValue::from_str(&other.to_string()),
    };
    text.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use jsonwebtoken::{EncodingKey, Header};
    use mesh_proto::waypoint::{ClaimToHeader, JwtHeader};
    use serde_json::json;

    /// Fixed 2048-bit test key (generated once with `openssl genrsa`; RSA keygen is slow in
    /// tests), shared with the end-to-end JWT test; `jwt-rsa.n` is its base64url modulus.
    const RSA_PEM: &str = include_str!("../../../tests/fixtures/jwt-rsa.pem");
    const RSA_N: &str = include_str!("../../../tests/fixtures/jwt-rsa.n").trim_ascii_end();
    const ISS: &str = "https://issuer.example";

    struct EcKey {
        pem: String,
        x: String,
        y: String,
    }

    fn ec_key() -> EcKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 65, "uncompressed P-256 point");
        EcKey {
            pem: kp.serialize_pem(),
            x: B64URL.encode(&raw[1..33]),
            y: B64URL.encode(&raw[33..]),
        }
    }

    fn jwks(ec: &EcKey) -> String {
        json!({"keys": [
            {"kty": "RSA", "kid": "rsa1", "use": "sig", "alg": "RS256", "n": RSA_N, "e": "AQAB"},
            {"kty": "EC", "kid": "ec1", "crv": "P-256", "x": ec.x, "y": ec.y},
            // Keys this proxy cannot use must not spoil the document.
            {"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP", "n": RSA_N, "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        ]})
        .to_string()
    }

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn claims() -> Value {
        json!({
            "iss": ISS, "sub": "alice", "aud": ["other", "svc"], "exp": now() + 600,
            "groups": ["dev", "ops"], "org": {"team": "core", "level": 3}, "admin": true,
        })
    }

    fn sign_rs(claims: &Value) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("rsa1".into());
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap()).unwrap()
    }

    fn sign_es(ec: &EcKey, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(Into::into);
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_pem(ec.pem.as_bytes()).unwrap()).unwrap()
    }

    struct Server {
        uri: String,
        hits: Arc<AtomicUsize>,
        /// (status, body) served; switchable mid-test.
        reply: Arc<Mutex<(u16, String)>>,
    }

    async fn serve(body: String) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(Mutex::new((200u16, body)));
        let (h, r) = (hits.clone(), reply.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (h, r) = (h.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let (h, r) = (h.clone(), r.clone());
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            let (status, body) = r.lock().unwrap().clone();
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Server {
            uri: format!("http://{addr}/jwks.json"),
            hits,
            reply,
        }
    }

    fn rule(jwks_uri: &str) -> JwtRule {
        JwtRule {
            issuer: ISS.into(),
            audiences: vec!["svc".into()],
            jwks_uri: jwks_uri.into(),
            output_payload_to_header: "x-jwt-payload".into(),
            output_claim_to_headers: vec![
                ClaimToHeader {
                    header: "x-sub".into(),
                    claim: "sub".into(),
                },
                ClaimToHeader {
                    header: "x-groups".into(),
                    claim: "groups".into(),
                },
                ClaimToHeader {
                    header: "x-team".into(),
                    claim: "org.team".into(),
                },
            ],
            ..Default::default()
        }
    }

    fn cache() -> Arc<JwksCache> {
        JwksCache::for_local_servers(Duration::from_secs(1200), Duration::from_secs(2))
    }

    /// A tenant's `jwksUri` cannot make the waypoint request its own host or the metadata
    /// server, by a literal address or by a name resolving to one.
    #[tokio::test]
    async fn jwks_are_never_fetched_from_loopback_or_link_local_hosts() {
        let cache = JwksCache::new(Duration::from_secs(1200), Duration::from_secs(2));
        for uri in [
            "http://127.0.0.1:15000/config_dump",
            "http://[::1]:15000/",
            "http://[::ffff:127.0.0.1]:15000/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0.0.0.0:15000/",
            "http://localhost:15000/",
        ] {
            let Err(err) = cache.fetcher.fetch(uri).await else {
                panic!("{uri} was fetched");
            };
            assert!(
                err.contains("not fetched") || err.contains("no address the waypoint may fetch from"),
                "{uri}: {err}"
            );
        }
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn bearer(token: &str) -> http::request::Parts {
        parts("/", &[("authorization", &format!("Bearer {token}"))])
    }

    #[tokio::test]
    async fn valid_rs256_sets_headers_and_strips_token() {
        let ec = ec_key();
        let srv = serve(jwks(&ec)).await;
        let auth = Authenticator::new(vec![rule(&srv.uri)], cache());
        let token = sign_rs(&claims());
        let mut p = bearer(&token);
        p.headers.insert("x-sub", HeaderValue::from_static("forged"));
        let principal = auth.authenticate(&mut p).await.unwrap().unwrap();
        assert_eq!(principal.principal(), "https://issuer.example/alice");
        assert!(p.headers.get(AUTHORIZATION).is_none());
        assert_eq!(p.headers["x-sub"], "alice");
        assert_eq!(p.headers["x-groups"], r#"["dev","ops"]"#);
        assert_eq!(p.headers["x-team"], "core");
        let payload = B64URL.decode(p.headers["x-jwt-payload"].as_bytes()).unwrap();
        let payload: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(payload["sub"], "alice");
        assert!(!p.headers["x-jwt-payload"].to_str().unwrap().contains('='));
    }

    #[tokio::test]
    async fn valid_es256_and_forward_original_token() {
        let ec = ec_key();
        let srv = serve(jwks(&ec)).await;
        let mut r = rule(&srv.uri);
        r.forward_original_token = true;
        let auth = Authenticator::new(vec![r], cache());
        for kid in [Some("ec1"), None] {
            let token = sign_es(&ec, kid, &claims());
            let mut p = bearer(&token);
            let principal = auth.authenticate(&mut p).await.unwrap().unwrap();
            assert_eq!(principal.principal(), "https://issuer.example/alice");
            assert_eq!(p.headers[AUTHORIZATION], format!("Bearer {token}").as_str());
            assert_eq!(p.headers["x-sub"], "alice");
        }
    }

    #[tokio::test]
    async fn inline_jwks_without_audiences_accepts_any_audience() {
        let ec = ec_key();
        let r = JwtRule {
            issuer: ISS.into(),
            jwks: jwks(&ec),
            ..Default::default()
        };
        let auth = Authenticator::new(vec![r], cache());
        let mut c = claims();
        c["aud"] = json!("anything");
        let mut p = bearer(&sign_es(&ec, Some("ec1"), &c));
        assert!(auth.authenticate(&mut p).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn invalid_tokens_are_rejected() {
        let ec = ec_key();
        let srv = serve(jwks(&ec)).await;
        let auth = Authenticator::new(vec![rule(&srv.uri)], cache());
        let check = |token: String| {
            let auth = &auth;
            async move { auth.authenticate(&mut bearer(&token)).await }
        };

        let mut c = claims();
        c["exp"] = json!(now() - 120);
        assert!(matches!(check(sign_rs(&c)).await, Err(JwtError::Expired)));
        // Within the leeway is still fine.
        c["exp"] = json!(now() - 5);
        assert!(check(sign_rs(&c)).await.unwrap().is_some());

        let mut c = claims();
        c["nbf"] = json!(now() + 600);
        assert!(matches!(check(sign_rs(&c)).await, Err(JwtError::NotYetValid)));

        let mut c = claims();
        c["iss"] = json!("https://evil.example");
        let err = check(sign_rs(&c)).await.unwrap_err();
        assert!(matches!(err, JwtError::UnknownIssuer { .. }), "{err}");

        let mut c = claims();
        c["aud"] = json!("nope");
        assert!(matches!(check(sign_rs(&c)).await, Err(JwtError::AudienceMismatch)));
        c.as_object_mut().unwrap().remove("aud");
        assert!(matches!(check(sign_rs(&c)).await, Err(JwtError::AudienceMismatch)));

        // Payload swapped after signing.
        let token = sign_rs(&claims());
        let mut forged = claims();
        forged["sub"] = json!("admin");
        let segs: Vec<&str> = token.split('.').collect();
        let tampered = format!("{}.{}.{}", segs[0], B64URL.encode(forged.to_string()), segs[2]);
        let err = check(tampered).await.unwrap_err();
        assert!(matches!(err, JwtError::BadSignature));
        assert!(!err.to_string().contains(segs[2]), "messages never quote the token");
        // Signed by a different EC key under the trusted kid.
        let other = ec_key();
        assert!(matches!(
            check(sign_es(&other, Some("ec1"), &claims())).await,
            Err(JwtError::BadSignature)
        ));
        assert!(matches!(
            check(sign_es(&ec, Some("nope"), &claims())).await,
            Err(JwtError::KeyNotFound { .. })
        ));

        for garbage in ["not-a-jwt", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.e30", "...."] {
            let err = check(garbage.into()).await.unwrap_err();
            assert!(matches!(err, JwtError::Malformed(_)), "{garbage}: {err}");
        }
        // alg none and HMAC are refused outright.
        let none = format!(
            "{}.{}.",
            B64URL.encode(r#"{"alg":"none"}"#),
            B64URL.encode(claims().to_string())
        );
        assert!(matches!(check(none).await, Err(JwtError::UnsupportedAlgorithm(_))));
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(matches!(check(hs).await, Err(JwtError::UnsupportedAlgorithm(_))));

        let token = sign_rs(&claims());
        let mut p = parts("/?access_token=x.y.z", &[("authorization", &format!("Bearer {token}"))]);
        assert!(matches!(auth.authenticate(&mut p).await, Err(JwtError::MultipleTokens)));
    }

    #[tokio::test]
    async fn no_token_is_not_an_error() {
        let auth = Authenticator::new(vec![rule("http://127.0.0.1:1/unused")], cache());
        let mut p = parts("/x?a=b", &[("x-sub", "forged")]);
        assert!(auth.authenticate(&mut p).await.unwrap().is_none());
        assert!(p.headers.get("x-sub").is_none(), "output headers cannot be forged");
        let mut p = parts("/", &[("authorization", "Basic dXNlcjpwYXNz")]);
        assert!(auth.authenticate(&mut p).await.unwrap().is_none());
        assert!(Authenticator::new(vec![], cache()).is_empty());
    }

    #[tokio::test]
    async fn custom_header_and_query_param() {
        let ec = ec_key();
        let srv = serve(jwks(&ec)).await;
        let mut r = rule(&srv.uri);
        r.from_headers = vec![JwtHeader {
            name: "x-jwt".into(),
            prefix: "Token ".into(),
        }];
        r.from_params = vec!["tok".into()];
        let auth = Authenticator::new(vec![r], cache());
        let token = sign_rs(&claims());

        let mut p = parts("/", &[("x-jwt", &format!("Token {token}"))]);
        assert_eq!(auth.authenticate(&mut p).await.unwrap().unwrap().subject, "alice");
        assert!(p.headers.get("x-jwt").is_none());

        let uri = format!("/path?x=1&tok={token}");
        let mut p = parts(&uri, &[]);
        assert!(auth.authenticate(&mut p).await.unwrap().is_some());
        assert_eq!(p.uri.to_string(), uri, "query string is left alone");

        // The defaults no longer apply once locations are configured.
        assert!(auth.authenticate(&mut bearer(&token)).await.unwrap().is_none());
        assert!(auth
            .authenticate(&mut parts(&format!("/?access_token={token}"), &[]))
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn default_query_param() {
        let ec = ec_key();
        let srv = serve(jwks(&ec)).await;
        let auth = Authenticator::new(vec![rule(&srv.uri)], cache());
        let mut p = parts(&format!("/?access_token={}", sign_rs(&claims())), &[]);
        assert!(auth.authenticate(&mut p).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn jwks_server_down_fails_closed_and_backs_off() {
        // A port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let auth = Authenticator::new(vec![rule(&format!("http://127.0.0.1:{port}/jwks"))], cache());
        let token = sign_rs(&claims());
        let err = auth.authenticate(&mut bearer(&token)).await.unwrap_err();
        assert!(matches!(err, JwtError::NoKeys { .. }), "{err}");

        // A server answering 500: one fetch, then the failure is remembered.
        let srv = serve(String::new()).await;
        srv.reply.lock().unwrap().0 = 500;
        let auth = Authenticator::new(vec![rule(&srv.uri)], cache());
        for _ in 0..5 {
            assert!(matches!(
                auth.authenticate(&mut bearer(&token)).await,
                Err(JwtError::NoKeys { .. })
            ));
        }
        assert_eq!(srv.hits.load(Ordering::SeqCst), 1);
    }

    /// A JWKS server without sockets: counts fetches, answers what the test sets, after `delay`
    /// of tokio time.
    #[derive(Clone)]
    struct FakeJwks {
        hits: Arc<AtomicUsize>,
        reply: Arc<Mutex<Result<String, String>>>,
        delay: Duration,
    }

    const FAKE_URI: &str = "https://jwks.example/keys";

    impl FakeJwks {
        fn new(doc: String, delay: Duration) -> Self {
            FakeJwks {
                hits: Arc::default(),
                reply: Arc::new(Mutex::new(Ok(doc))),
                delay,
            }
        }

        fn cache(&self, refresh: Duration, timeout: Duration) -> Arc<JwksCache> {
            let fake = self.clone();
            JwksCache::with_fake(
                refresh,
                timeout,
                Box::new(move |uri| {
                    assert_eq!(uri, FAKE_URI);
                    let fake = fake.clone();
                    Box::pin(async move {
                        fake.hits.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(fake.delay).await;
                        fake.reply.lock().unwrap().clone()
                    })
                }),
            )
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn set(&self, reply: Result<String, String>) {
            *self.reply.lock().unwrap() = reply;
        }
    }

    /// Lets the background refresh of `uri` run to its end (it needs no timers: the fake
    /// answers at once), without letting tokio's clock move.
    async fn refreshed(cache: &JwksCache, uri: &str) {
        let entry = cache.entry(uri);
        for _ in 0..1000 {
            if !entry.state().refreshing {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("background refresh did not finish");
    }

    #[tokio::test(start_paused = true)]
    async fn jwks_fetched_once_for_concurrent_requests() {
        let ec = ec_key();
        let fake = FakeJwks::new(jwks(&ec), Duration::from_millis(100));
        let cache = fake.cache(Duration::from_secs(1200), Duration::from_secs(2));
        let auth = Arc::new(Authenticator::new(vec![rule(FAKE_URI)], cache));
        let token = sign_rs(&claims());
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (auth, token) = (auth.clone(), token.clone());
                tokio::spawn(async move { auth.authenticate(&mut bearer(&token)).await.map(|p| p.is_some()) })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().unwrap());
        }
        for _ in 0..10 {
            assert!(auth.authenticate(&mut bearer(&token)).await.unwrap().is_some());
        }
        assert_eq!(fake.hits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_in_background_keeps_last_good_keys() {
        let ec = ec_key();
        let fake = FakeJwks::new(jwks(&ec), Duration::ZERO);
        let refresh = Duration::from_secs(1200);
        let cache = fake.cache(refresh, Duration::from_secs(2));
        let auth = Authenticator::new(vec![rule(FAKE_URI)], cache.clone());
        let token = sign_rs(&claims());
        let ok = || async { auth.authenticate(&mut bearer(&token)).await.unwrap().is_some() };
        assert!(ok().await);
        tokio::time::advance(refresh - Duration::from_secs(1)).await;
        assert!(ok().await);
        refreshed(&cache, FAKE_URI).await;
        assert_eq!(fake.hits(), 1, "fresh keys are not fetched again");

        fake.set(Err("JWKS server answered 503".into()));
        tokio::time::advance(Duration::from_secs(1)).await;
        // Stale: served from cache while a refresh runs (and fails) in the background.
        assert!(ok().await);
        refreshed(&cache, FAKE_URI).await;
        assert_eq!(fake.hits(), 2);
        assert!(ok().await, "last good keys kept");
        tokio::time::advance(FAILURE_BACKOFF - Duration::from_millis(1)).await;
        assert!(ok().await);
        refreshed(&cache, FAKE_URI).await;
        assert_eq!(fake.hits(), 2, "failure backoff holds");

        fake.set(Ok(jwks(&ec)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(ok().await);
        refreshed(&cache, FAKE_URI).await;
        assert_eq!(fake.hits(), 3, "refreshed once the backoff passed");
        assert!(ok().await);
        refreshed(&cache, FAKE_URI).await;
        assert_eq!(fake.hits(), 3, "fresh again");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_first_fetch_is_retried_after_the_backoff() {
        let ec = ec_key();
        let fake = FakeJwks::new(String::new(), Duration::ZERO);
        fake.set(Err("connection refused".into()));
        let auth = Authenticator::new(
            vec![rule(FAKE_URI)],
            fake.cache(Duration::from_secs(1200), Duration::from_secs(2)),
        );
        let token = sign_rs(&claims());
        for _ in 0..5 {
            let err = auth.authenticate(&mut bearer(&token)).await.unwrap_err();
            assert!(matches!(err, JwtError::NoKeys { .. }), "{err}");
        }
        tokio::time::advance(FAILURE_BACKOFF - Duration::from_millis(1)).await;
        assert!(auth.authenticate(&mut bearer(&token)).await.is_err());
        assert_eq!(fake.hits(), 1, "no fetch during the backoff");
        fake.set(Ok(jwks(&ec)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(auth.authenticate(&mut bearer(&token)).await.unwrap().is_some());
        assert_eq!(fake.hits(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_jwks_server_times_out_and_fails_closed() {
        let ec = ec_key();
        let fake = FakeJwks::new(jwks(&ec), Duration::from_secs(3600));
        let auth = Authenticator::new(
            vec![rule(FAKE_URI)],
            fake.cache(Duration::from_secs(1200), Duration::from_secs(2)),
        );
        let start = tokio::time::Instant::now();
        let err = auth.authenticate(&mut bearer(&sign_rs(&claims()))).await.unwrap_err();
        assert!(matches!(err, JwtError::NoKeys { .. }), "{err}");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "the fetch timeout bounds the wait"
        );
    }

    #[test]
    fn claim_values_nested_and_arrays() {
        let p = RequestPrincipal {
            issuer: ISS.into(),
            subject: "alice".into(),
            claims: claims().as_object().unwrap().clone(),
        };
        assert_eq!(p.claim_values(&["sub"]), ["alice"]);
        assert_eq!(p.claim_values(&["groups"]), ["dev", "ops"]);
        assert_eq!(p.claim_values(&["org", "team"]), ["core"]);
        assert_eq!(p.claim_values(&["org", "level"]), ["3"]);
        assert_eq!(p.claim_values(&["admin"]), ["true"]);
        assert!(p.claim_values(&["org"]).is_empty());
        assert!(p.claim_values(&["org", "missing"]).is_empty());
        assert!(p.claim_values(&["missing"]).is_empty());
        assert!(p.claim_values(&[]).is_empty());
    }
}
