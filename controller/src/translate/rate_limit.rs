//! LocalRateLimitPolicy → `mesh.waypoint.v1.Policy` with a `RateLimit`: validated numbers,
//! targets kept as the waypoint matches them (Gateway and Service as for authorization,
//! HTTPRoute by name), in the policy's own namespace only ([`super::policy_target`]). A policy
//! that cannot limit anything (no target, zero tokens, a bad interval) is reported and not
//! sent, so waypoints never see a half-read limit.

use std::collections::BTreeMap;

use mesh_proto::waypoint as wp;

use super::{policy_target, Report};
use crate::model::rate_limit::LocalRateLimitPolicy;
use crate::model::{Inputs, Kind, ObjectKey};

/// The waypoint policies of every LocalRateLimitPolicy, by `LocalRateLimitPolicy/<ns>/<name>`.
pub(crate) fn translate(inputs: &Inputs, report: &mut Report) -> BTreeMap<String, wp::Policy> {
    let mut out = BTreeMap::new();
    for (key, policy) in &inputs.rate_limits {
        if let Some(p) = one(key, policy, report) {
            out.insert(format!("LocalRateLimitPolicy/{key}"), p);
        }
    }
    out
}

fn one(key: &ObjectKey, p: &LocalRateLimitPolicy, report: &mut Report) -> Option<wp::Policy> {
    let kind = Kind::LocalRateLimitPolicy;
    let bucket = &p.spec.token_bucket;
    let fill_interval = match super::routes::duration(&bucket.fill_interval) {
        Ok(d) if d.seconds > 0 || d.nanos > 0 => d,
        Ok(_) => {
            report.add(
                kind,
                key,
                "spec.tokenBucket.fillInterval must be longer than 0; the policy is not applied",
            );
            return None;
        }
        Err(e) => {
            report.add(
                kind,
                key,
                format!("spec.tokenBucket.fillInterval {e}; the policy is not applied"),
            );
            return None;
        }
    };
    let tokens_per_fill = bucket.tokens_per_fill.unwrap_or(bucket.max_tokens);
    if bucket.max_tokens == 0 || tokens_per_fill == 0 {
        report.add(
            kind,
            key,
            "spec.tokenBucket.maxTokens and tokensPerFill must be at least 1; the policy is not applied",
        );
        return None;
    }
    let mut targets = Vec::new();
    // Targets in another namespace are dropped (reported by `own_namespace`): a policy left
    // with none is not sent.
    let own = policy_target::own_namespace(None, &p.spec.target_refs, kind, key, report);
    for (path, t) in own {
        let known = matches!(
            (t.group.as_str(), t.kind.as_str()),
            ("gateway.networking.k8s.io", "Gateway" | "HTTPRoute") | ("" | "core", "Service")
        );
        if !known {
            report.add(
                kind,
                key,
                format!(
                    "{path} {}/{} is not a Gateway, HTTPRoute (gateway.networking.k8s.io) or Service; ignored",
                    t.group, t.kind
                ),
            );
            continue;
        }
        targets.push(wp::Target {
            kind: t.kind.clone(),
            namespace: key.namespace.clone(),
            name: t.name.clone(),
        });
    }
    if targets.is_empty() {
        report.add(
            kind,
            key,
            "spec.targetRefs names nothing a waypoint serves; the policy is not applied",
        );
        return None;
    }
    Some(wp::Policy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        targets,
        kind: Some(wp::policy::Kind::RateLimit(wp::RateLimit {
            max_tokens: bucket.max_tokens,
            tokens_per_fill,
            fill_interval: Some(fill_interval),
            per_source: p.spec.per_source,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest_dir::parse_text;

    fn translated(yaml: &str) -> (BTreeMap<String, wp::Policy>, Vec<String>) {
        let mut loaded = Default::default();
        parse_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        let loaded: crate::source::manifest_dir::Loaded = loaded;
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut inputs = Inputs::default();
        for o in loaded.objects {
            inputs.apply(o);
        }
        let mut report = Report::default();
        let out = translate(&inputs, &mut report);
        (out, report.0.into_iter().map(|p| p.message).collect())
    }

    #[test]
    fn token_buckets_and_targets() {
        let (out, problems) = translated(
            "apiVersion: policy.ambient-mesh.io/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: ten, namespace: shop}
spec:
  targetRefs:
  - {group: '', kind: Service, name: payments}
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews}
  - {group: apps, kind: Deployment, name: x}
  tokenBucket: {maxTokens: 10, fillInterval: 1s}
  perSource: true
---
apiVersion: policy.ambient-mesh.io/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: zero, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: payments}]
  tokenBucket: {maxTokens: 0, fillInterval: 1s}
---
apiVersion: policy.ambient-mesh.io/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: bad-interval, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: payments}]
  tokenBucket: {maxTokens: 5, fillInterval: soon}
",
        );
        assert_eq!(out.keys().collect::<Vec<_>>(), ["LocalRateLimitPolicy/shop/ten"]);
        let p = &out["LocalRateLimitPolicy/shop/ten"];
        let kinds: Vec<&str> = p.targets.iter().map(|t| t.kind.as_str()).collect();
        assert_eq!(kinds, ["Service", "HTTPRoute"]);
        assert!(p.targets.iter().all(|t| t.namespace == "shop"));
        let Some(wp::policy::Kind::RateLimit(r)) = &p.kind else {
            panic!("{p:?}")
        };
        assert_eq!((r.max_tokens, r.tokens_per_fill, r.per_source), (10, 10, true));
        assert_eq!(r.fill_interval.as_ref().map(|d| d.seconds), Some(1));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("spec.targetRefs[2] apps/Deployment")),
            "{problems:?}"
        );
        assert!(problems.iter().any(|p| p.contains("maxTokens and tokensPerFill")));
        assert!(problems
            .iter()
            .any(|p| p.contains("fillInterval \"soon\" is not a duration")));
    }

    /// A policy in `evil` naming shop's Service: that target is dropped and reported, its
    /// own-namespace one kept; one whose only target is foreign is not sent.
    #[test]
    fn foreign_namespace_targets_are_dropped() {
        let (out, problems) = translated(
            "apiVersion: policy.ambient-mesh.io/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: mixed, namespace: evil}
spec:
  targetRefs:
  - {group: '', kind: Service, name: web}
  - {group: '', kind: Service, name: payments, namespace: shop}
  - {group: '', kind: Service, name: web, namespace: evil}
  tokenBucket: {maxTokens: 1, fillInterval: 1h}
---
apiVersion: policy.ambient-mesh.io/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: starve-shop, namespace: evil}
spec:
  targetRefs: [{group: '', kind: Service, name: payments, namespace: shop}]
  tokenBucket: {maxTokens: 1, fillInterval: 1h}
",
        );
        assert_eq!(out.keys().collect::<Vec<_>>(), ["LocalRateLimitPolicy/evil/mixed"]);
        let p = &out["LocalRateLimitPolicy/evil/mixed"];
        let targets: Vec<(&str, &str)> = p
            .targets
            .iter()
            .map(|t| (t.namespace.as_str(), t.name.as_str()))
            .collect();
        assert_eq!(targets, [("evil", "web"), ("evil", "web")]);
        let foreign = "spec.targetRefs[1].namespace \"shop\": a policy applies only in its own namespace (evil); \
                       this target is ignored";
        assert!(problems.iter().any(|p| p == foreign), "{problems:?}");
        let only = "spec.targetRefs[0].namespace \"shop\": a policy applies only in its own namespace (evil); \
                    this target is ignored";
        assert!(problems.iter().any(|p| p == only), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("names nothing a waypoint serves")));
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn unknown_fields_are_errors() {
        let mut loaded = crate::source::manifest_dir::Loaded::default();
        parse_text(
            std::path::Path::new("t.yaml"),
            "apiVersion: policy.ambient-mesh.io/v1alpha1
kind: LocalRateLimitPolicy
metadata: {name: typo, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: payments}]
  tokenBucket: {maxToken: 10, fillInterval: 1s}
",
            &mut loaded,
        );
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.objects.len());
        assert!(
            loaded.errors[0].reason.contains("maxToken"),
            "{}",
            loaded.errors[0].reason
        );
    }
}
