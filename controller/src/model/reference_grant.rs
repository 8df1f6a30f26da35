//! Gateway API `ReferenceGrant`: the owner of a namespace's Services says which other
//! namespaces' routes may reference them. Without one, a route in namespace A must not send
//! traffic to (or take over the routing of) a Service in namespace B: anyone able to write a
//! route in A could otherwise redirect B's traffic.

use serde::{Deserialize, Serialize};

use super::ObjectMeta;

/// The Gateway API group, as routes carry it.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ReferenceGrant {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ReferenceGrantSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<ReferenceGrantFrom>,
    #[serde(default)]
    pub to: Vec<ReferenceGrantTo>,
}

/// Who may refer: every object of `group`/`kind` in `namespace`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceGrantFrom {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

/// What may be referred to in the grant's namespace: objects of `group`/`kind`, only `name`
/// when it is set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceGrantTo {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: Option<String>,
}

/// One reference from an object to another namespace's object.
#[derive(Clone, Copy, Debug)]
pub struct Reference<'a> {
    /// The referring object's group, kind and namespace (e.g. an HTTPRoute).
    pub from_group: &'a str,
    pub from_kind: &'a str,
    pub from_namespace: &'a str,
    /// The referred-to object's group (empty for the core group), kind, namespace and name.
    pub to_group: &'a str,
    pub to_kind: &'a str,
    pub to_namespace: &'a str,
    pub to_name: &'a str,
}

/// The core group is spelt "" in grants; `core` is accepted as the same group.
fn same_group(a: &str, b: &str) -> bool {
    fn norm(g: &str) -> &str {
        if g == "core" {
            ""
        } else {
            g
        }
    }
    norm(a) == norm(b)
}

impl ReferenceGrant {
    /// Whether this grant, living in `namespace`, allows `r`.
    pub fn allows(&self, namespace: &str, r: &Reference<'_>) -> bool {
        if namespace != r.to_namespace {
            return false;
        }
        let from =
            self.spec.from.iter().any(|f| {
                same_group(&f.group, r.from_group) && f.kind == r.from_kind && f.namespace == r.from_namespace
            });
        let to = self.spec.to.iter().any(|t| {
            same_group(&t.group, r.to_group)
                && t.kind == r.to_kind
                && t.name.as_deref().is_none_or(|n| n.is_empty() || n == r.to_name)
        });
        from && to
    }
}

/// Whether `r` is allowed: always within one namespace, else only by a ReferenceGrant in the
/// target namespace.
pub fn permitted<'a>(grants: impl IntoIterator<Item = (&'a str, &'a ReferenceGrant)>, r: &Reference<'_>) -> bool {
    r.from_namespace == r.to_namespace || grants.into_iter().any(|(ns, g)| g.allows(ns, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(from_ns: &str, to_name: Option<&str>) -> ReferenceGrant {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "g", "namespace": "backend"},
            "spec": {
                "from": [{"group": GATEWAY_GROUP, "kind": "HTTPRoute", "namespace": from_ns}],
                "to": [{"group": "", "kind": "Service", "name": to_name}],
            }
        }))
        .expect("grant parses")
    }

    fn reference<'a>(from_ns: &'a str, to_ns: &'a str, name: &'a str) -> Reference<'a> {
        Reference {
            from_group: GATEWAY_GROUP,
            from_kind: "HTTPRoute",
            from_namespace: from_ns,
            to_group: "",
            to_kind: "Service",
            to_namespace: to_ns,
            to_name: name,
        }
    }

    #[test]
    fn same_namespace_needs_no_grant() {
        assert!(permitted([], &reference("a", "a", "svc")));
    }

    #[test]
    fn cross_namespace_needs_a_grant_in_the_target_namespace() {
        let g = grant("front", None);
        assert!(!permitted([], &reference("front", "backend", "svc")));
        assert!(permitted([("backend", &g)], &reference("front", "backend", "svc")));
        // A grant elsewhere (here: in the route's own namespace) grants nothing.
        assert!(!permitted([("front", &g)], &reference("front", "backend", "svc")));
        // Another namespace, another kind: not granted.
        assert!(!permitted([("backend", &g)], &reference("other", "backend", "svc")));
        let mut tcp = reference("front", "backend", "svc");
        tcp.from_kind = "TCPRoute";
        assert!(!permitted([("backend", &g)], &tcp));
    }

    #[test]
    fn a_named_grant_covers_only_that_service() {
        let g = grant("front", Some("svc"));
        assert!(permitted([("backend", &g)], &reference("front", "backend", "svc")));
        assert!(!permitted([("backend", &g)], &reference("front", "backend", "db")));
    }
}
