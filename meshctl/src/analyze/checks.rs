//! meshctl's own analysis on top of the controller's problems: L7 policy fields only
//! ztunnel would see, `istio.io/use-waypoint` naming a missing Gateway, ambient pods on
//! nodes without a ztunnel, and STRICT mutual TLS while plaintext clients exist.

use std::collections::{BTreeMap, BTreeSet};

use controller::model::gateway::WAYPOINT_CLASS;
use controller::model::istio::AuthorizationPolicy;
use controller::model::{Inputs, ObjectKey, ObjectMeta};

use super::{Finding, Severity};

const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// Namespaces never counted as plaintext clients.
const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "istio-system"];

pub const L7_FIX: &str = "attach it to a waypoint with targetRefs (kind Gateway or Service) and deploy a waypoint";

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref().and_then(|l| l.get(key)).map(String::as_str)
}

/// Whether namespace `ns` is labelled `istio.io/dataplane-mode=ambient`.
pub fn ambient(inputs: &Inputs, ns: &str) -> bool {
    inputs
        .namespace_labels(ns)
        .and_then(|l| l.get(DATAPLANE_MODE))
        .is_some_and(|v| v == "ambient")
}

/// The L7 fields a policy's rules use, in the order first seen.
pub fn l7_fields(policy: &AuthorizationPolicy) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |name: &str, used: bool| {
        if used && !out.iter().any(|o| o == name) {
            out.push(name.to_owned());
        }
    };
    for rule in policy.spec.rules.iter().flatten() {
        for f in &rule.from {
            add("from.source.requestPrincipals", !f.source.request_principals.is_empty());
            add(
                "from.source.notRequestPrincipals",
                !f.source.not_request_principals.is_empty(),
            );
        }
        for t in &rule.to {
            let o = &t.operation;
            add("to.operation.methods", !o.methods.is_empty());
            add("to.operation.notMethods", !o.not_methods.is_empty());
            add("to.operation.paths", !o.paths.is_empty());
            add("to.operation.notPaths", !o.not_paths.is_empty());
            add("to.operation.hosts", !o.hosts.is_empty());
            add("to.operation.notHosts", !o.not_hosts.is_empty());
        }
        for c in &rule.when {
            if c.key.starts_with("request.") {
                add(&format!("when {}", c.key), true);
            }
        }
    }
    out
}

/// (a) Selector (or untargeted) policies with L7 fields where only ztunnel enforces them.
pub fn l7_policies(inputs: &Inputs, root_namespace: &str) -> Vec<Finding> {
    let any_ambient = inputs.namespaces.keys().any(|ns| ambient(inputs, ns));
    let mut out = Vec::new();
    for (key, policy) in &inputs.authorization_policies {
        if policy.invalid.is_some() || policy.spec.targets().next().is_some() {
            continue;
        }
        let applies = ambient(inputs, &key.namespace) || (key.namespace == root_namespace && any_ambient);
        if !applies {
            continue;
        }
        let fields = l7_fields(policy);
        if fields.is_empty() {
            continue;
        }
        let how = if policy.spec.selector.is_some() {
            "a selector"
        } else {
            "no targetRefs"
        };
        let effect = match policy.spec.action.as_deref().unwrap_or("ALLOW") {
            "DENY" | "CUSTOM" => "; ztunnel denies on the rest of each rule",
            "AUDIT" => "",
            _ => "; those rules never match",
        };
        out.push(Finding {
            severity: Severity::Error,
            kind: "AuthorizationPolicy".to_owned(),
            object: key.to_string(),
            message: format!(
                "uses {how} with L7 fields ({}): only ztunnel sees it and ztunnel cannot enforce L7 fields{effect}",
                fields.join(", ")
            ),
            fix: L7_FIX.to_owned(),
        });
    }
    out
}

/// (b) `istio.io/use-waypoint` naming a Gateway that does not exist. Returns the findings and
/// the waypoint keys they name (to drop the controller's own per-object reports of them).
pub fn missing_waypoints(inputs: &Inputs) -> (Vec<Finding>, BTreeSet<ObjectKey>) {
    let mut out = Vec::new();
    let mut missing = BTreeSet::new();
    let mut check = |kind: &str, object: String, ns: &str, meta: &ObjectMeta| {
        let Some(name) = label(meta, USE_WAYPOINT) else {
            return;
        };
        if name == "none" || name.is_empty() {
            return;
        }
        let wp_ns = label(meta, USE_WAYPOINT_NAMESPACE).unwrap_or(ns);
        let wp = ObjectKey::new(wp_ns, name);
        let message = match inputs.gateways.get(&wp) {
            Some(gw) if gw.spec.gateway_class_name == WAYPOINT_CLASS => return,
            Some(gw) => format!(
                "istio.io/use-waypoint names Gateway {wp}, which is of class {:?}, not {WAYPOINT_CLASS}",
                gw.spec.gateway_class_name
            ),
            None => format!("istio.io/use-waypoint names Gateway {wp}, which does not exist"),
        };
        missing.insert(wp.clone());
        out.push(Finding {
            severity: Severity::Error,
            kind: kind.to_owned(),
            object,
            message,
            fix: format!(
                "create it: meshctl waypoint apply -n {} --name {}",
                wp.namespace, wp.name
            ),
        });
    };
    for (name, ns) in &inputs.namespaces {
        check("Namespace", name.clone(), name, &ns.metadata);
    }
    for (key, svc) in &inputs.services {
        check("Service", key.to_string(), &key.namespace, &svc.metadata);
    }
    for (key, pod) in &inputs.pods {
        check("Pod", key.to_string(), &key.namespace, &pod.metadata);
    }
    (out, missing)
}

fn node_of(pod: &controller::model::Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

/// Up to three names and how many more.
fn some_of(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    match names.len().saturating_sub(3) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// (c) Ambient pods on nodes where no ztunnel runs; only when ztunnel pods or nodes are known.
pub fn nodes_without_ztunnel(inputs: &Inputs, nodes: &BTreeSet<String>) -> Vec<Finding> {
    let ztunnel_nodes: BTreeSet<&str> = inputs
        .pods
        .values()
        .filter(|p| label(&p.metadata, "app") == Some("ztunnel"))
        .filter_map(node_of)
        .collect();
    let any_ztunnel = inputs
        .pods
        .values()
        .any(|p| label(&p.metadata, "app") == Some("ztunnel"));
    if !any_ztunnel && nodes.is_empty() {
        return Vec::new();
    }
    let mut by: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (key, pod) in &inputs.pods {
        if !ambient(inputs, &key.namespace) || label(&pod.metadata, "app") == Some("ztunnel") {
            continue;
        }
        if label(&pod.metadata, DATAPLANE_MODE) == Some("none") {
            continue;
        }
        let Some(node) = node_of(pod) else { continue };
        if !ztunnel_nodes.contains(node) {
            by.entry((key.namespace.clone(), node.to_owned()))
                .or_default()
                .push(key.to_string());
        }
    }
    by.into_iter()
        .map(|((ns, node), pods)| Finding {
            severity: Severity::Error,
            kind: "Namespace".to_owned(),
            object: ns,
            message: format!(
                "ambient pods {} run on node {node}, where no ztunnel pod runs: their traffic cannot pass the mesh",
                some_of(&pods)
            ),
            fix: format!("the ztunnel DaemonSet must run on node {node} (check its tolerations/nodeSelector)"),
        })
        .collect()
}

/// (d) STRICT mutual TLS (namespace-wide, or mesh-wide in the root namespace) while pods
/// outside the mesh exist.
pub fn strict_with_plaintext_clients(inputs: &Inputs, root_namespace: &str) -> Vec<Finding> {
    let outside: Vec<String> = inputs
        .pods
        .iter()
        .filter(|(key, pod)| {
            if SYSTEM_NAMESPACES.contains(&key.namespace.as_str()) || label(&pod.metadata, "app") == Some("ztunnel") {
                return false;
            }
            !ambient(inputs, &key.namespace) || label(&pod.metadata, DATAPLANE_MODE) == Some("none")
        })
        .map(|(key, _)| key.to_string())
        .collect();
    if outside.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (key, pa) in &inputs.peer_authentications {
        if pa.spec.selector.is_some() {
            continue;
        }
        let strict = pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()) == Some("STRICT");
        let some_port_open = pa
            .spec
            .port_level_mtls
            .values()
            .any(|m| matches!(m.mode.as_deref(), Some("PERMISSIVE" | "DISABLE")));
        if !strict || some_port_open {
            continue;
        }
        let target = if key.namespace == root_namespace {
            "any meshed pod (mesh-wide STRICT)".to_owned()
        } else {
            format!("pods in namespace {}", key.namespace)
        };
        out.push(Finding {
            severity: Severity::Warn,
            kind: "PeerAuthentication".to_owned(),
            object: key.to_string(),
            message: format!(
                "mode STRICT while pods run outside the mesh: plaintext clients such as pod {} cannot reach {target}",
                some_of(&outside)
            ),
            fix: "enrol the clients' namespace (istio.io/dataplane-mode=ambient) or use PERMISSIVE for the ports they call"
                .to_owned(),
        });
    }
    out
}
