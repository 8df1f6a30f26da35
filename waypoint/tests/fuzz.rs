//! Property-based fuzzing of what the waypoint reads from a client before policy: the protocol
//! sniff on a stream's first bytes, and JWTs (arbitrary, structured, correctly signed with
//! hostile claims, and tampered). A token must be rejected or accepted, never panic, and no
//! altered token is ever accepted. Case count: `PROPTEST_CASES` (default 256); a long run is
//! `PROPTEST_CASES=100000 cargo test --release -p waypoint --test fuzz`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh_proto::waypoint::{ClaimToHeader, JwtHeader, JwtRule};
use proptest::prelude::*;
use serde_json::{json, Value};
use waypoint::listener::{looks_like_http, plausible_http};
use waypoint::policy::jwt::{Authenticator, JwksCache};

const ISS: &str = "https://issuer.example";
const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
];

proptest! {
    #[test]
    fn sniff_never_panics(first in proptest::collection::vec(any::<u8>(), 0..64)) {
        // What is sniffed as HTTP must also be accepted where HTTP is required.
        if looks_like_http(&first) {
            prop_assert!(plausible_http(&first), "{:?}", String::from_utf8_lossy(&first));
        }
    }

    #[test]
    fn request_lines_are_http(
        method in proptest::sample::select(METHODS),
        rest in proptest::collection::vec(any::<u8>(), 0..32),
        cut in any::<usize>(),
    ) {
        let mut line = format!("{method} ").into_bytes();
        line.extend(rest);
        prop_assert!(looks_like_http(&line));
        prop_assert!(plausible_http(&line));
        // A request line that arrived in pieces is HTTP from its first byte.
        let cut = 1 + cut % line.len();
        prop_assert!(looks_like_http(&line[..cut]));
    }
}

/// A P-256 key and its JWKS.
struct Key {
    encoding: EncodingKey,
    jwks: String,
}

fn key() -> Key {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let jwks = json!({"keys": [{"kty": "EC", "kid": "ec1", "crv": "P-256",
        "x": B64URL.encode(&raw[1..33]), "y": B64URL.encode(&raw[33..])}]})
    .to_string();
    Key {
        encoding: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        jwks,
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn authenticator(jwks: &str) -> Authenticator {
    let rule = JwtRule {
        issuer: ISS.into(),
        audiences: vec!["svc".into()],
        jwks: jwks.into(),
        from_headers: vec![
            JwtHeader {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            },
            JwtHeader {
                name: "x-token".into(),
                prefix: String::new(),
            },
        ],
        from_params: vec!["token".into()],
        output_payload_to_header: "x-jwt-payload".into(),
        output_claim_to_headers: vec![ClaimToHeader {
            header: "x-sub".into(),
            claim: "sub".into(),
        }],
        ..Default::default()
    };
    Authenticator::new(
        vec![rule],
        JwksCache::new(Duration::from_secs(600), Duration::from_secs(1)),
    )
}

/// Where a token is presented.
#[derive(Clone, Copy, Debug)]
enum Place {
    Bearer,
    Header,
    Query,
}

fn place() -> impl Strategy<Value = Place> {
    prop_oneof![Just(Place::Bearer), Just(Place::Header), Just(Place::Query)]
}

/// Runs the authenticator on a request carrying `token`: `None` if the request could not even
/// be built (the token is not a valid header value or URI), else whether it authenticated.
fn present(rt: &tokio::runtime::Runtime, auth: &Authenticator, token: &str, place: Place) -> Option<bool> {
    let b = http::Request::builder();
    let b = match place {
        Place::Bearer => b.uri("/").header("authorization", format!("Bearer {token}")),
        Place::Header => b.uri("/").header("x-token", token),
        Place::Query => b.uri(format!("/?token={token}")),
    };
    let mut parts = b.body(()).ok()?.into_parts().0;
    Some(matches!(rt.block_on(auth.authenticate(&mut parts)), Ok(Some(_))))
}

fn claim_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(json!(ISS)),
        Just(json!("svc")),
        Just(json!(["svc", 1, null])),
        Just(json!({"nested": {"sub": "x"}})),
        any::<String>().prop_map(Value::String),
    ]
}

/// Claims that are sometimes right and often hostile (types, ranges, missing fields).
fn claims() -> impl Strategy<Value = Value> {
    let keys = proptest::sample::select(&["iss", "sub", "aud", "exp", "nbf", "iat", "groups", "x"][..]);
    proptest::collection::vec((keys, claim_value()), 0..8).prop_map(|kv| {
        let mut c = json!({"iss": ISS, "aud": "svc", "exp": now() + 600, "sub": "alice"});
        for (k, v) in kv {
            c[k] = v;
        }
        c
    })
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9_=+/-]{0,40}",
        any::<Vec<u8>>().prop_map(|b| B64URL.encode(b)),
        proptest::sample::select(
            &[
                r#"{"alg":"ES256","kid":"ec1"}"#,
                r#"{"alg":"none"}"#,
                r#"{"alg":"HS256"}"#,
                r#"{"alg":"RS256"}"#,
                r#"{"alg":1}"#,
                r#"{"alg":"ES256","kid":null}"#,
                r#"{"iss":"https://issuer.example"}"#,
                "[]",
                "null",
            ][..]
        )
        .prop_map(|s| B64URL.encode(s)),
        claims().prop_map(|c| B64URL.encode(c.to_string())),
    ]
}

#[test]
fn jwt_properties() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = key();
    let auth = authenticator(&key.jwks);
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec1".into());
    let sign = |c: &Value| jsonwebtoken::encode(&header, c, &key.encoding).unwrap();

    // A good token is accepted in every place: the harness can tell acceptance apart.
    let good = sign(&json!({"iss": ISS, "aud": "svc", "exp": now() + 600, "sub": "alice"}));
    for p in [Place::Bearer, Place::Header, Place::Query] {
        assert_eq!(present(&rt, &auth, &good, p), Some(true), "{p:?}");
    }

    let mut runner = proptest::test_runner::TestRunner::default();
    let any_token = prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_.=+/ -]{0,80}",
        proptest::collection::vec(segment(), 0..5).prop_map(|s| s.join(".")),
    ];
    runner
        .run(&(any_token, place()), |(token, p)| {
            // Unsigned junk never authenticates.
            prop_assert_ne!(present(&rt, &auth, &token, p), Some(true), "{:?}", token);
            Ok(())
        })
        .unwrap();

    runner
        .run(&(claims(), place()), |(c, p)| {
            // Correctly signed, hostile claims: accepted only when issuer and audience are right.
            let token = sign(&c);
            let valid = c["iss"] == json!(ISS)
                && (c["aud"] == json!("svc") || c["aud"].as_array().is_some_and(|a| a.contains(&json!("svc"))));
            if present(&rt, &auth, &token, p) == Some(true) {
                prop_assert!(valid, "accepted {}", c);
            }
            Ok(())
        })
        .unwrap();

    runner
        .run(&(any::<usize>(), any::<u8>(), place()), |(at, byte, p)| {
            // A valid token with one byte changed is never accepted.
            let mut t = good.clone().into_bytes();
            let at = at % t.len();
            prop_assume!(t[at] != byte);
            t[at] = byte;
            let t = String::from_utf8_lossy(&t).into_owned();
            prop_assume!(t != good);
            prop_assert_ne!(present(&rt, &auth, &t, p), Some(true), "{:?}", t);
            Ok(())
        })
        .unwrap();
}
