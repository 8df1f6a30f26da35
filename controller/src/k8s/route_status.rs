//! Route status (`status.parents[]`) for HTTPRoute, GRPCRoute and TCPRoute whose cross-namespace
//! references translation refused for want of a ReferenceGrant: per Service parent,
//! `Accepted` (False/`RefNotPermitted` when that parentRef was refused, False/`UnsupportedValue`
//! on every parent when a rule has a match the proxy cannot compile) and `ResolvedRefs`
//! (False/`RefNotPermitted` when a backendRef was). A merge patch replaces the whole list,
//! so the builder keeps the entries other controllers wrote and the writer guards the patch
//! with the resourceVersion it read.

use ::kube::api::{DynamicObject, Patch, PatchParams};
use ::kube::{Api, Client};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use super::resources::api_resource;
use super::writer::{conditions, WAYPOINT_CONTROLLER};
use super::KubeError;
use crate::model::{Kind, ObjectKey};
use crate::translate::{RefusedRef, REF_NOT_PERMITTED, UNSUPPORTED_VALUE};
use crate::waypoint::Condition;

/// The route kinds whose status carries refused references.
pub fn is_route(kind: Kind) -> bool {
    matches!(kind, Kind::HttpRoute | Kind::GrpcRoute | Kind::TcpRoute)
}

/// A parentRef translation attaches to (a Service, named with an explicit kind, as in
/// translate/routes.rs), as the key it refuses it under.
fn service_parent(parent: &Value, route_ns: &str) -> Option<ObjectKey> {
    let text = |f: &str| parent.get(f).and_then(Value::as_str);
    let core = matches!(text("group"), None | Some("") | Some("core"));
    if !core || text("kind") != Some("Service") {
        return None;
    }
    Some(ObjectKey::new(text("namespace").unwrap_or(route_ns), text("name")?))
}

fn condition(kind: &str, ok: bool, ok_reason: &str, message: String) -> Condition {
    Condition {
        kind: kind.into(),
        status: ok,
        reason: if ok { ok_reason } else { REF_NOT_PERMITTED }.into(),
        message,
    }
}

/// The `status.parents` to write on `route` (the object as read) given its `refused`
/// references: one entry of ours per Service parentRef, other controllers' entries kept as
/// they are. `lastTransitionTime`s are kept where a condition did not change, so an unchanged
/// status rebuilds identically.
pub fn route_parents(route: &Value, refused: &[RefusedRef], generation: Option<i64>, now: Timestamp) -> Value {
    let route_ns = route
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let existing = route
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let ours = |e: &&Value| e.get("controllerName").and_then(Value::as_str) == Some(WAYPOINT_CONTROLLER);
    let mut parents: Vec<Value> = existing.iter().filter(|e| !ours(e)).cloned().collect();
    let backend_refused = refused.contains(&RefusedRef::Backend);
    // A rule the proxy cannot compile: the route is attached to none of its parents.
    let invalid: Vec<&str> = refused
        .iter()
        .filter_map(|r| match r {
            RefusedRef::Invalid(m) => Some(m.as_str()),
            _ => None,
        })
        .collect();
    let resolved = condition(
        "ResolvedRefs",
        !backend_refused,
        "ResolvedRefs",
        if backend_refused {
            "a cross-namespace backendRef has no ReferenceGrant allowing it".into()
        } else {
            String::new()
        },
    );
    let refs = route.pointer("/spec/parentRefs").and_then(Value::as_array);
    for parent in refs.into_iter().flatten() {
        let Some(service) = service_parent(parent, route_ns) else {
            continue;
        };
        let attached = !refused.contains(&RefusedRef::Parent(service));
        let accepted = if !invalid.is_empty() {
            Condition {
                kind: "Accepted".into(),
                status: false,
                reason: UNSUPPORTED_VALUE.into(),
                message: format!("invalid rule: {}", invalid.join("; ")),
            }
        } else {
            condition(
                "Accepted",
                attached,
                "Accepted",
                if attached {
                    String::new()
                } else {
                    "the Service is in another namespace and no ReferenceGrant there allows this route".into()
                },
            )
        };
        let previous = existing
            .iter()
            .filter(ours)
            .find(|e| e.get("parentRef") == Some(parent))
            .and_then(|e| e.get("conditions"))
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        parents.push(json!({
            "parentRef": parent,
            "controllerName": WAYPOINT_CONTROLLER,
            "conditions": conditions(&[accepted, resolved.clone()], previous, generation, now),
        }));
    }
    Value::Array(parents)
}

/// Writes [`route_parents`] on route `kind`/`key` when it changed.
pub async fn report_refused(
    client: &Client,
    kind: Kind,
    key: &ObjectKey,
    refused: &[RefusedRef],
) -> Result<(), KubeError> {
    patch_parents(client, kind, key, |route, generation, now| {
        route_parents(route, refused, generation, now)
    })
    .await
}

/// Writes the `status.parents` that `build` makes from route `kind`/`key` as read (with its
/// generation and the time), when they differ from what it holds. The patch carries the
/// resourceVersion read, so a concurrent write by another controller fails (409) and is
/// retried on fresh data instead of being overwritten. A route that is gone is left alone.
pub(crate) async fn patch_parents(
    client: &Client,
    kind: Kind,
    key: &ObjectKey,
    build: impl FnOnce(&Value, Option<i64>, Timestamp) -> Value,
) -> Result<(), KubeError> {
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &key.namespace, &api_resource(kind));
    let Some(object) = api.get_opt(&key.name).await? else {
        return Ok(());
    };
    let generation = object.metadata.generation;
    let version = object.metadata.resource_version.clone();
    let route = serde_json::to_value(&object)?;
    let parents = build(&route, generation, Timestamp::now());
    if route.pointer("/status/parents").unwrap_or(&json!([])) == &parents {
        return Ok(());
    }
    api.patch_status(
        &key.name,
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": {"resourceVersion": version},
            "status": {"parents": parents},
        })),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid time")
    }

    fn route(status: Value) -> Value {
        json!({
            "metadata": {"namespace": "apps", "name": "r", "generation": 4},
            "spec": {"parentRefs": [
                {"group": "", "kind": "Service", "name": "web"},
                {"group": "", "kind": "Service", "namespace": "other", "name": "db"},
                {"name": "public-gw"},
            ]},
            "status": status,
        })
    }

    fn foreign() -> Value {
        json!({
            "parentRef": {"name": "public-gw"},
            "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}],
        })
    }

    fn condition_of<'a>(entry: &'a Value, kind: &str) -> &'a Value {
        entry["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == kind))
            .expect("condition present")
    }

    #[test]
    fn refused_refs_are_reported_per_service_parent_and_foreign_entries_are_kept() {
        let r = route(json!({"parents": [foreign()]}));
        let refused = [RefusedRef::Backend, RefusedRef::Parent(ObjectKey::new("other", "db"))];
        let parents = route_parents(&r, &refused, Some(4), at(0));
        let parents = parents.as_array().expect("array");
        // The foreign entry first, untouched; then ours for the two Service parents only.
        assert_eq!(parents.len(), 3);
        assert_eq!(parents[0], foreign());
        let web = &parents[1];
        assert_eq!(web["parentRef"]["name"], "web");
        assert_eq!(web["controllerName"], WAYPOINT_CONTROLLER);
        assert_eq!(condition_of(web, "Accepted")["status"], "True");
        let resolved = condition_of(web, "ResolvedRefs");
        assert_eq!(resolved["status"], "False");
        assert_eq!(resolved["reason"], REF_NOT_PERMITTED);
        assert_eq!(resolved["observedGeneration"], 4);
        let db = &parents[2];
        assert_eq!(db["parentRef"]["namespace"], "other");
        assert_eq!(condition_of(db, "Accepted")["status"], "False");
        assert_eq!(condition_of(db, "Accepted")["reason"], REF_NOT_PERMITTED);

        // Rebuilding from what was written changes nothing: no write loop.
        let written = route(json!({"parents": parents}));
        assert_eq!(route_parents(&written, &refused, Some(4), at(60)), json!(parents));
    }

    #[test]
    fn a_route_that_becomes_permitted_resolves_its_refs() {
        let refused = [RefusedRef::Backend];
        let before = route_parents(&route(json!({"parents": [foreign()]})), &refused, Some(4), at(0));
        let after = route_parents(&route(json!({"parents": before})), &[], Some(5), at(60));
        let after = after.as_array().expect("array");
        assert_eq!(after.len(), 3);
        assert_eq!(after[0], foreign());
        for ours in &after[1..] {
            let resolved = condition_of(ours, "ResolvedRefs");
            assert_eq!(resolved["status"], "True");
            assert_eq!(resolved["reason"], "ResolvedRefs");
            assert_eq!(resolved["lastTransitionTime"], at(60).to_string());
            // Accepted did not change: its transition time stays.
            assert_eq!(condition_of(ours, "Accepted")["lastTransitionTime"], at(0).to_string());
        }
    }

    #[test]
    fn an_invalid_route_is_accepted_by_no_service_parent() {
        let msg = r#"spec.rules[0].matches[0].path.value "(": not a valid regular expression"#;
        let refused = [RefusedRef::Invalid(msg.into())];
        let parents = route_parents(&route(json!({})), &refused, Some(4), at(0));
        let ours: Vec<&Value> = parents
            .as_array()
            .expect("array")
            .iter()
            .filter(|p| p["controllerName"] == WAYPOINT_CONTROLLER)
            .collect();
        assert_eq!(ours.len(), 2);
        for p in ours {
            let accepted = condition_of(p, "Accepted");
            assert_eq!(accepted["status"], "False");
            assert_eq!(accepted["reason"], UNSUPPORTED_VALUE);
            assert!(
                accepted["message"].as_str().is_some_and(|m| m.contains(msg)),
                "{accepted}"
            );
        }
    }

    #[test]
    fn only_route_kinds_carry_route_status() {
        assert!(is_route(Kind::HttpRoute) && is_route(Kind::GrpcRoute) && is_route(Kind::TcpRoute));
        assert!(!is_route(Kind::AuthorizationPolicy) && !is_route(Kind::Service));
    }
}
