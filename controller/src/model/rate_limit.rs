//! Our own `policy.ambient-mesh.io` LocalRateLimitPolicy: a token bucket (Envoy's
//! local_ratelimit semantics) enforced by waypoints for the Gateway, Service or HTTPRoute it
//! targets. Istio has no ambient equivalent; the shape follows Gateway API policy attachment
//! (`targetRefs`) and Envoy's token bucket field names. Unknown fields are errors: this is our
//! API, so a typo must not silently remove a limit.

use serde::{Deserialize, Serialize};

use super::gateway::PolicyTargetReference;
use super::ObjectMeta;

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LocalRateLimitPolicy {
    pub metadata: ObjectMeta,
    pub spec: LocalRateLimitSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRateLimitSpec {
    /// Gateways (waypoints), Services or HTTPRoutes whose requests are limited.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    pub token_bucket: TokenBucket,
    /// One bucket per source identity instead of one shared by all clients.
    #[serde(default)]
    pub per_source: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenBucket {
    pub max_tokens: u32,
    /// Defaults to `maxTokens`: the bucket refills completely every interval.
    pub tokens_per_fill: Option<u32>,
    /// A duration such as `1s` or `500ms`.
    pub fill_interval: String,
}
