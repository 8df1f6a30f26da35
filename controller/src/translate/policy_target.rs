//! A policy's `targetRef` and `targetRefs` as Istio's PolicyTargetReference allows them: in
//! the policy's own namespace only ("cross namespace referencing is not currently
//! supported"; the CRDs reject the rest, `manifests/crds/`). A target whose `namespace` is set
//! to another namespace is dropped and reported by field, so a policy in one namespace never
//! attaches to another's Service or Gateway; the policy's other targets are kept. Dropping
//! never widens a policy: each translator treats a policy whose targets were all dropped as
//! one with targets (it applies to nothing), never as one without (namespace- or mesh-wide).

use super::Report;
use crate::model::gateway::PolicyTargetReference;
use crate::model::{Kind, ObjectKey};

/// The targets of policy `key` (of `kind`) in its own namespace, each with its field path
/// (`spec.targetRef`, `spec.targetRefs[i]`), in the order written: `targetRef`, then
/// `targetRefs`. Each target naming another namespace is reported and left out.
pub(crate) fn own_namespace<'a>(
    target_ref: Option<&'a PolicyTargetReference>,
    target_refs: &'a [PolicyTargetReference],
    kind: Kind,
    key: &ObjectKey,
    report: &mut Report,
) -> Vec<(String, &'a PolicyTargetReference)> {
    let single = target_ref.map(|t| ("spec.targetRef".to_owned(), t));
    let listed = target_refs
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("spec.targetRefs[{i}]"), t));
    single
        .into_iter()
        .chain(listed)
        .filter(|(path, t)| match t.namespace.as_deref() {
            Some(ns) if !ns.is_empty() && ns != key.namespace => {
                report.add(
                    kind,
                    key,
                    format!(
                        "{path}.namespace {ns:?}: a policy applies only in its own namespace ({}); this target is \
                         ignored",
                        key.namespace
                    ),
                );
                false
            }
            _ => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, namespace: Option<&str>) -> PolicyTargetReference {
        PolicyTargetReference {
            group: String::new(),
            kind: "Service".to_owned(),
            name: name.to_owned(),
            namespace: namespace.map(str::to_owned),
        }
    }

    /// Unset, empty and own namespaces are kept with their paths; another is reported.
    #[test]
    fn foreign_namespaces_are_dropped_and_reported() {
        let single = target("a", Some("shop"));
        let listed = [
            target("b", None),
            target("c", Some("")),
            target("d", Some("evil")),
            target("e", Some("shop")),
        ];
        let key = ObjectKey::new("evil", "p");
        let mut report = Report::default();
        let kept = own_namespace(Some(&single), &listed, Kind::Telemetry, &key, &mut report);
        let kept: Vec<(&str, &str)> = kept.iter().map(|(p, t)| (p.as_str(), t.name.as_str())).collect();
        assert_eq!(
            kept,
            [
                ("spec.targetRefs[0]", "b"),
                ("spec.targetRefs[1]", "c"),
                ("spec.targetRefs[2]", "d")
            ]
        );
        let messages: Vec<&str> = report.0.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "spec.targetRef.namespace \"shop\": a policy applies only in its own namespace (evil); this target \
                 is ignored",
                "spec.targetRefs[3].namespace \"shop\": a policy applies only in its own namespace (evil); this \
                 target is ignored"
            ]
        );
        assert!(report.0.iter().all(|p| p.kind == Kind::Telemetry && p.object == key));
    }
}
