//! Authenticates CA callers by their Kubernetes ServiceAccount token with a TokenReview: the
//! API server says whose token it is; the username `system:serviceaccount:<ns>:<sa>` becomes the
//! caller's SPIFFE identity and a node-bound token names the caller's node. [`PublishedKeys`]
//! reads the keys the API server signs those tokens with, so forged ones are refused unasked.

use ::kube::api::PostParams;
use ::kube::{Api, Client};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use mesh_core::identity::Identity;

use super::KubeError;
use crate::ca::auth::{AuthError, Authenticator, Caller};
use crate::ca::issuer_keys::KeySource;

/// Where the API server publishes its service account signing keys (issuer discovery).
pub const JWKS_PATH: &str = "/openid/v1/jwks";

/// The API server's published service account signing keys.
pub struct PublishedKeys {
    client: Client,
}

impl PublishedKeys {
    pub fn new(client: Client) -> Self {
        PublishedKeys { client }
    }
}

impl KeySource for PublishedKeys {
    fn fetch(&self) -> BoxFuture<'_, Result<jsonwebtoken::jwk::JwkSet, String>> {
        async move {
            let request = http::Request::get(JWKS_PATH)
                .body(Vec::new())
                .map_err(|e| e.to_string())?;
            let text = self
                .client
                .request_text(request)
                .await
                .map_err(|e| format!("GET {JWKS_PATH}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("GET {JWKS_PATH}: {e}"))
        }
        .boxed()
    }
}

/// The `extra` key a node-bound service account token carries the node name in.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// An [`Authenticator`] backed by the TokenReview API.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: Client,
    trust_domain: String,
    audiences: Vec<String>,
}

impl TokenReviewAuthenticator {
    /// `audiences`: the token must be valid for one of them (empty: the API server's default).
    pub fn new(client: Client, trust_domain: impl Into<String>, audiences: Vec<String>) -> Self {
        TokenReviewAuthenticator {
            client,
            trust_domain: trust_domain.into(),
            audiences,
        }
    }
}

impl TokenReviewAuthenticator {
    /// The API client the reviews go through.
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        async move {
            match review(&self.client, token, &self.audiences, &self.trust_domain).await {
                Ok((identity, node)) => Ok(Caller { identity, node }),
                // The API server could not be asked (or refused us): the caller may retry.
                Err(e @ KubeError::Api(_)) => Err(AuthError::Unavailable(e.to_string())),
                Err(e) => Err(AuthError::Rejected(e.to_string())),
            }
        }
        .boxed()
    }
}

/// Reviews `token`; the identity (in `trust_domain`) and node of its service account.
pub async fn review(
    client: &Client,
    token: &str,
    audiences: &[String],
    trust_domain: &str,
) -> Result<(Identity, Option<String>), KubeError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await?;
    let status = reviewed
        .status
        .ok_or_else(|| KubeError::Unauthenticated("the review has no status".into()))?;
    caller_of(&status, audiences, trust_domain)
}

/// Interprets a TokenReview's status.
pub fn caller_of(
    status: &TokenReviewStatus,
    audiences: &[String],
    trust_domain: &str,
) -> Result<(Identity, Option<String>), KubeError> {
    if status.authenticated != Some(true) {
        let why = status.error.clone().filter(|e| !e.is_empty());
        return Err(KubeError::Unauthenticated(
            why.unwrap_or_else(|| "rejected by the API server".into()),
        ));
    }
    if !audiences.is_empty() {
        let granted = status.audiences.as_deref().unwrap_or_default();
        if !granted.iter().any(|a| audiences.contains(a)) {
            return Err(KubeError::Unauthenticated(format!(
                "the token is not valid for {}",
                audiences.join(", ")
            )));
        }
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    let (namespace, service_account) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| KubeError::NotServiceAccount(username.to_owned()))?;
    let identity = Identity::new(trust_domain, namespace, service_account)?;
    let node = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|extra| extra.get(NODE_NAME_EXTRA))
        .and_then(|values| values.first())
        .filter(|n| !n.is_empty())
        .cloned();
    Ok((identity, node))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(username: &str, node: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["istio-ca".into()]),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: node.map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_owned(), vec![n.to_owned()])])),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn service_account_becomes_identity_and_node() {
        let aud = ["istio-ca".to_owned()];
        let (id, node) = caller_of(
            &status("system:serviceaccount:istio-system:ztunnel", Some("node-a")),
            &aud,
            "example.org",
        )
        .expect("authenticated");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/istio-system/sa/ztunnel");
        assert_eq!(node.as_deref(), Some("node-a"));
        let (_, node) = caller_of(&status("system:serviceaccount:apps:web", None), &[], "").expect("authenticated");
        assert_eq!(node, None);
    }

    #[test]
    fn rejections() {
        let aud = ["istio-ca".to_owned()];
        let mut denied = status("system:serviceaccount:a:b", None);
        denied.authenticated = Some(false);
        denied.error = Some("token expired".into());
        assert!(matches!(caller_of(&denied, &aud, ""), Err(KubeError::Unauthenticated(m)) if m == "token expired"));
        assert!(matches!(
            caller_of(&status("system:serviceaccount:a:b", None), &["other".into()], ""),
            Err(KubeError::Unauthenticated(_))
        ));
        for user in [
            "alice",
            "system:serviceaccount:a",
            "system:serviceaccount::b",
            "system:serviceaccount:a:b:c",
        ] {
            assert!(
                matches!(
                    caller_of(&status(user, None), &aud, ""),
                    Err(KubeError::NotServiceAccount(_))
                ),
                "{user}"
            );
        }
        assert!(matches!(
            caller_of(&status("system:serviceaccount:A:b", None), &aud, ""),
            Err(KubeError::Identity(_))
        ));
    }
}
