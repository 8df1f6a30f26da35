//! `PeerAuthentication` to ztunnel policies. STRICT means "no plaintext": a DENY for
//! connections without a peer identity. The effective mode of a workload port is the most
//! specific one set: port-level, then the workload's selector policy, then its namespace's
//! policy, then the mesh-wide one in the root namespace, else PERMISSIVE. PERMISSIVE and
//! DISABLE both accept plaintext on 15006 at ztunnel.
//!
//! Output per namespace whose effective mode is STRICT: one namespace-scoped DENY that
//! excludes (by destination IP) the workloads a selector policy governs; per selector policy
//! that needs one: a workload-scoped DENY limited to its strict ports.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mesh_proto::security as pb;

use super::authz::{cidr, Output};
use super::{Options, Report, Selected};
use crate::model::istio::{MutualTls, PeerAuthentication};
use crate::model::{selects, Inputs, Kind, ObjectKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unset,
    Permissive,
    Strict,
}

fn mode(m: Option<&MutualTls>, key: &ObjectKey, field: &str, report: &mut Report) -> Mode {
    match m.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => Mode::Unset,
        Some("PERMISSIVE" | "DISABLE") => Mode::Permissive,
        Some("STRICT") => Mode::Strict,
        Some(other) => {
            report.add(
                Kind::PeerAuthentication,
                key,
                format!("{field} {other:?} is not UNSET, DISABLE, PERMISSIVE or STRICT; treated as STRICT"),
            );
            Mode::Strict
        }
    }
}

/// Istio resolves conflicts by age: the oldest policy wins.
fn oldest<'a>(
    candidates: impl Iterator<Item = (&'a ObjectKey, &'a PeerAuthentication)>,
) -> Vec<(&'a ObjectKey, &'a PeerAuthentication)> {
    let mut v: Vec<_> = candidates.collect();
    v.sort_by(|a, b| {
        let t = |p: &PeerAuthentication| p.metadata.creation_timestamp.clone().map(|Time(t)| t);
        t(a.1).cmp(&t(b.1)).then_with(|| a.0.cmp(b.0))
    });
    v
}

fn deny_plaintext(matched: pb::Match) -> Vec<pb::Group> {
    let m = pb::Match {
        not_principals: vec![pb::StringMatch {
            match_type: Some(pb::string_match::MatchType::Presence(())),
        }],
        ..matched
    };
    vec![pb::Group {
        rules: vec![pb::Rules { matches: vec![m] }],
    }]
}

fn no_selector(p: &PeerAuthentication) -> bool {
    p.spec.selector.as_ref().is_none_or(|s| s.match_labels.is_empty())
}

/// The one namespace-wide policy of a namespace, reporting any it shadows.
fn namespace_policy<'a>(
    inputs: &'a Inputs,
    namespace: &str,
    report: &mut Report,
) -> Option<(&'a ObjectKey, &'a PeerAuthentication)> {
    let all = oldest(
        inputs
            .peer_authentications
            .iter()
            .filter(|(k, p)| k.namespace == namespace && no_selector(p)),
    );
    for (k, _) in all.iter().skip(1) {
        report.add(
            Kind::PeerAuthentication,
            k,
            format!("ignored: {} is an older namespace-wide policy", all[0].0),
        );
    }
    all.first().copied()
}

pub(crate) fn translate(inputs: &Inputs, options: &Options, report: &mut Report) -> Output {
    let mut out = Output::default();
    let root = namespace_policy(inputs, &options.root_namespace, report);
    let mesh_mode = policy_mode(root, Mode::Permissive, report);
    for (k, p) in &inputs.peer_authentications {
        if no_selector(p) && !p.spec.port_level_mtls.is_empty() {
            report.add(
                Kind::PeerAuthentication,
                k,
                "portLevelMtls needs a selector; ignored on a namespace-wide policy",
            );
        }
    }

    // Namespaces that have workloads, in order.
    let mut namespaces: Vec<&str> = inputs.pods.keys().map(|k| k.namespace.as_str()).collect();
    namespaces.dedup();
    for ns in namespaces {
        let own = namespace_policy(inputs, ns, report).filter(|_| ns != options.root_namespace);
        let ns_mode = policy_mode(own, mesh_mode, report);
        let selector_policies = oldest(
            inputs
                .peer_authentications
                .iter()
                .filter(|(k, p)| k.namespace == ns && !no_selector(p)),
        );
        let governed = governed_pods(inputs, ns, &selector_policies, report);
        // Pods under a selector policy are left out of the namespace-wide STRICT rule.
        let mut excluded = Vec::new();
        for (pa_key, pa) in &selector_policies {
            let Some(pods) = governed.get(pa_key) else { continue };
            for pod in pods {
                excluded.extend(super::workload::pod_ips(&inputs.pods[*pod]).filter_map(|ip| cidr(ip).ok()));
            }
            let policy = PortPolicy {
                namespace: ns,
                key: pa_key,
                policy: pa,
                pods,
            };
            policy.translate(ns_mode, &mut out, report);
        }
        if ns_mode == Mode::Strict {
            let name = "istio_peer_authentication_strict".to_owned();
            out.policies.insert(
                format!("{ns}/{name}"),
                pb::Authorization {
                    name,
                    namespace: ns.to_owned(),
                    scope: pb::Scope::Namespace as i32,
                    action: pb::Action::Deny as i32,
                    groups: deny_plaintext(pb::Match {
                        not_destination_ips: excluded,
                        ..Default::default()
                    }),
                    dry_run: false,
                    audit: None,
                },
            );
        }
    }
    out
}

/// The mode a namespace-wide policy sets; `inherited` when there is none or it leaves it unset.
fn policy_mode(policy: Option<(&ObjectKey, &PeerAuthentication)>, inherited: Mode, report: &mut Report) -> Mode {
    match policy {
        Some((k, p)) => match mode(p.spec.mtls.as_ref(), k, "mtls.mode", report) {
            Mode::Unset => inherited,
            m => m,
        },
        None => inherited,
    }
}

/// Which selector policy governs each pod of `ns` (the oldest that selects it); the younger
/// ones that also select it are reported as shadowed.
fn governed_pods<'a>(
    inputs: &'a Inputs,
    ns: &str,
    selector_policies: &[(&'a ObjectKey, &'a PeerAuthentication)],
    report: &mut Report,
) -> BTreeMap<&'a ObjectKey, Vec<&'a ObjectKey>> {
    let mut governed: BTreeMap<&ObjectKey, Vec<&ObjectKey>> = BTreeMap::new();
    let pods = inputs
        .pods
        .range(ObjectKey::new(ns, "")..)
        .take_while(|(k, _)| k.namespace == ns);
    for (pod_key, pod) in pods {
        let labels = pod.metadata.labels.as_ref();
        let mut winners = selector_policies.iter().filter(|(_, p)| {
            p.spec
                .selector
                .as_ref()
                .is_some_and(|s| selects(&s.match_labels, labels))
        });
        if let Some((k, _)) = winners.next() {
            governed.entry(*k).or_default().push(pod_key);
            for (shadowed, _) in winners {
                report.add(
                    Kind::PeerAuthentication,
                    shadowed,
                    format!("does not apply to pod {pod_key}: {k} is older and selects it too"),
                );
            }
        }
    }
    governed
}

/// A selector policy and the pods it governs.
struct PortPolicy<'a> {
    namespace: &'a str,
    key: &'a ObjectKey,
    policy: &'a PeerAuthentication,
    pods: &'a [&'a ObjectKey],
}

impl PortPolicy<'_> {
    /// Adds the DENY of plaintext this policy means for its pods (none when it accepts
    /// plaintext on every port).
    fn translate(&self, ns_mode: Mode, out: &mut Output, report: &mut Report) {
        let base = match mode(self.policy.spec.mtls.as_ref(), self.key, "mtls.mode", report) {
            Mode::Unset => ns_mode,
            m => m,
        };
        let (strict_ports, open_ports) = self.port_modes(report);
        let groups = match base {
            Mode::Strict => deny_plaintext(pb::Match {
                not_destination_ports: open_ports,
                ..Default::default()
            }),
            _ if !strict_ports.is_empty() => deny_plaintext(pb::Match {
                destination_ports: strict_ports,
                ..Default::default()
            }),
            _ => return, // Plaintext accepted on every port: nothing to deny.
        };
        let ns = self.namespace;
        let name = format!("istio_peer_authentication_{}", self.key.name);
        let full = format!("{ns}/{name}");
        out.selected.push(Selected {
            name: full.clone(),
            namespace: ns.to_owned(),
            match_labels: BTreeMap::new(),
            only: Some(self.pods.iter().map(|k| (*k).clone()).collect()),
        });
        let policy = pb::Authorization {
            name,
            namespace: ns.to_owned(),
            scope: pb::Scope::WorkloadSelector as i32,
            action: pb::Action::Deny as i32,
            groups,
            dry_run: false,
            audit: None,
        };
        out.policies.insert(full, policy);
    }

    /// The ports `portLevelMtls` makes STRICT and PERMISSIVE; a key that is not a port is reported.
    fn port_modes(&self, report: &mut Report) -> (Vec<u32>, Vec<u32>) {
        let (mut strict, mut open) = (Vec::new(), Vec::new());
        for (port, m) in &self.policy.spec.port_level_mtls {
            let Ok(p) = port.parse::<u16>() else {
                report.add(
                    Kind::PeerAuthentication,
                    self.key,
                    format!("portLevelMtls key {port:?} is not a port"),
                );
                continue;
            };
            match mode(Some(m), self.key, &format!("portLevelMtls[{port}].mode"), report) {
                Mode::Unset => {}
                Mode::Strict => strict.push(u32::from(p)),
                Mode::Permissive => open.push(u32::from(p)),
            }
        }
        (strict, open)
    }
}
