//! `AuthorizationPolicy` to `istio.security.Authorization` for ztunnel. Policies with
//! `targetRefs` belong to waypoints and are skipped here. ztunnel sees only L4, so a rule that
//! needs L7 (methods, paths, hosts, request principals, request conditions) or a value it
//! cannot parse is handled failing closed: in an ALLOW the rule never matches; in a DENY the
//! unenforceable part is dropped, so the DENY covers at least what was asked. Each such
//! change is reported on the policy. A policy annotated `istio.io/dry-run: "true"` is sent
//! with `dry_run` set (Istio's field): ztunnel logs what it would decide and does not enforce
//! it. An AUDIT policy is sent as a DENY without groups (Istio's ztunnel, which istiod sends
//! no AUDIT policy, sees one that matches nothing) with its rules in the `audit` extension
//! field, which our ztunnel logs connections by; a rule with L7 parts never matches there.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::state::model::ip_to_bytes;
use mesh_proto::security as pb;

use super::{Options, Report, Selected};
use crate::model::istio::{AuthorizationPolicy, Condition, Operation, Rule, Source};
use crate::model::{Kind, ObjectKey};

/// Translation output: policies by `<ns>/<name>` and the selectors of workload-scoped ones.
#[derive(Default)]
pub(crate) struct Output {
    pub policies: BTreeMap<String, pb::Authorization>,
    pub selected: Vec<Selected>,
}

/// `*` is presence, `x*` a prefix, `*x` a suffix, anything else exact.
pub(crate) fn string_match(value: &str) -> pb::StringMatch {
    use pb::string_match::MatchType;
    let m = if value == "*" {
        MatchType::Presence(())
    } else if let Some(rest) = value.strip_prefix('*') {
        MatchType::Suffix(rest.to_owned())
    } else if let Some(rest) = value.strip_suffix('*') {
        MatchType::Prefix(rest.to_owned())
    } else {
        MatchType::Exact(value.to_owned())
    };
    pb::StringMatch { match_type: Some(m) }
}

/// Principals are matched without the `spiffe://` scheme.
fn principal_match(value: &str) -> pb::StringMatch {
    string_match(value.strip_prefix("spiffe://").unwrap_or(value))
}

pub(crate) fn cidr(value: &str) -> Result<pb::Address, String> {
    let net: IpNet = match value.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => value
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{value:?} is not an IP address or CIDR"))?,
    };
    Ok(pb::Address {
        address: ip_to_bytes(net.network()),
        length: u32::from(net.prefix_len()),
    })
}

fn port(value: &str) -> Result<u32, String> {
    match value.parse::<u16>() {
        Ok(p) if p > 0 => Ok(u32::from(p)),
        _ => Err(format!("{value:?} is not a port")),
    }
}

/// What of a rule ztunnel cannot enforce, with why.
#[derive(Default)]
struct Unenforceable(Vec<String>);

impl Unenforceable {
    fn l7(&mut self, field: &str, values: &[String]) {
        if !values.is_empty() {
            self.0.push(format!("{field} (L7)"));
        }
    }
}

fn parsed<T>(
    values: &[String],
    field: &str,
    parse: impl Fn(&str) -> Result<T, String>,
    skipped: &mut Unenforceable,
) -> Vec<T> {
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        match parse(v) {
            Ok(x) => out.push(x),
            Err(e) => skipped.0.push(format!("{field}: {e}")),
        }
    }
    out
}

fn source_match(s: &Source, skipped: &mut Unenforceable) -> pb::Match {
    skipped.l7("from.source.requestPrincipals", &s.request_principals);
    skipped.l7("from.source.notRequestPrincipals", &s.not_request_principals);
    skipped.l7("from.source.remoteIpBlocks", &s.remote_ip_blocks);
    skipped.l7("from.source.notRemoteIpBlocks", &s.not_remote_ip_blocks);
    pb::Match {
        namespaces: s.namespaces.iter().map(|v| string_match(v)).collect(),
        not_namespaces: s.not_namespaces.iter().map(|v| string_match(v)).collect(),
        principals: s.principals.iter().map(|v| principal_match(v)).collect(),
        not_principals: s.not_principals.iter().map(|v| principal_match(v)).collect(),
        source_ips: parsed(&s.ip_blocks, "from.source.ipBlocks", cidr, skipped),
        not_source_ips: parsed(&s.not_ip_blocks, "from.source.notIpBlocks", cidr, skipped),
        ..Default::default()
    }
}

fn operation_match(o: &Operation, skipped: &mut Unenforceable) -> pb::Match {
    skipped.l7("to.operation.hosts", &o.hosts);
    skipped.l7("to.operation.notHosts", &o.not_hosts);
    skipped.l7("to.operation.methods", &o.methods);
    skipped.l7("to.operation.notMethods", &o.not_methods);
    skipped.l7("to.operation.paths", &o.paths);
    skipped.l7("to.operation.notPaths", &o.not_paths);
    pb::Match {
        destination_ports: parsed(&o.ports, "to.operation.ports", port, skipped),
        not_destination_ports: parsed(&o.not_ports, "to.operation.notPorts", port, skipped),
        ..Default::default()
    }
}

/// A `when` condition as a match; L7 keys are unenforceable.
fn condition_match(c: &Condition, skipped: &mut Unenforceable) -> pb::Match {
    let mut m = pb::Match::default();
    let field = format!("when[{}]", c.key);
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = parsed(&c.values, &field, cidr, skipped);
            m.not_source_ips = parsed(&c.not_values, &field, cidr, skipped);
        }
        "source.namespace" => {
            m.namespaces = c.values.iter().map(|v| string_match(v)).collect();
            m.not_namespaces = c.not_values.iter().map(|v| string_match(v)).collect();
        }
        "source.principal" => {
            m.principals = c.values.iter().map(|v| principal_match(v)).collect();
            m.not_principals = c.not_values.iter().map(|v| principal_match(v)).collect();
        }
        "destination.ip" => {
            m.destination_ips = parsed(&c.values, &field, cidr, skipped);
            m.not_destination_ips = parsed(&c.not_values, &field, cidr, skipped);
        }
        "destination.port" => {
            m.destination_ports = parsed(&c.values, &field, port, skipped);
            m.not_destination_ports = parsed(&c.not_values, &field, port, skipped);
        }
        other => skipped.0.push(format!("when key {other:?} (L7 or unknown)")),
    }
    m
}

/// One Istio rule as a group of AND'd clauses, plus what could not be enforced.
fn rule_group(rule: &Rule) -> (pb::Group, Unenforceable) {
    let mut skipped = Unenforceable::default();
    let mut rules = Vec::new();
    if !rule.from.is_empty() {
        let matches = rule
            .from
            .iter()
            .map(|f| source_match(&f.source, &mut skipped))
            .collect();
        rules.push(pb::Rules { matches });
    }
    if !rule.to.is_empty() {
        let matches = rule
            .to
            .iter()
            .map(|t| operation_match(&t.operation, &mut skipped))
            .collect();
        rules.push(pb::Rules { matches });
    }
    for c in &rule.when {
        rules.push(pb::Rules {
            matches: vec![condition_match(c, &mut skipped)],
        });
    }
    (pb::Group { rules }, skipped)
}

/// The scope and, for selector policies, the labels.
fn scope(
    key: &ObjectKey,
    policy: &AuthorizationPolicy,
    options: &Options,
) -> (pb::Scope, Option<BTreeMap<String, String>>) {
    match policy.spec.selector.as_ref().filter(|s| !s.match_labels.is_empty()) {
        Some(sel) => (pb::Scope::WorkloadSelector, Some(sel.match_labels.clone())),
        None if key.namespace == options.root_namespace => (pb::Scope::Global, None),
        None => (pb::Scope::Namespace, None),
    }
}

pub(crate) fn translate(inputs: &crate::model::Inputs, options: &Options, report: &mut Report) -> Output {
    let mut out = Output::default();
    for (key, policy) in &inputs.authorization_policies {
        if let Some(t) = translate_one(key, policy, options, report) {
            insert(&mut out, key, t);
        }
    }
    out
}

/// One policy as ztunnel enforces it; `None` for a policy enforced by waypoints.
fn translate_one(
    key: &ObjectKey,
    policy: &AuthorizationPolicy,
    options: &Options,
    report: &mut Report,
) -> Option<Translated> {
    if let Some(why) = &policy.invalid {
        return Some(unreadable(key, policy, why, options, report));
    }
    if policy.spec.targets().next().is_some() {
        return None; // Enforced by waypoints.
    }
    let action = match policy.spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => pb::Action::Allow,
        "DENY" => pb::Action::Deny,
        "AUDIT" => return Some(audit(key, policy, options, report)),
        "CUSTOM" => {
            report.add(
                Kind::AuthorizationPolicy,
                key,
                "CUSTOM (external authorization) needs a waypoint; ztunnel enforces it as a DENY of its L4 part",
            );
            pb::Action::Deny
        }
        other => {
            // Unknown action: an ALLOW that matches nothing is the closed choice.
            report.add(
                Kind::AuthorizationPolicy,
                key,
                format!("action {other:?} is not ALLOW, DENY, AUDIT or CUSTOM; the policy allows nothing"),
            );
            let (scope, labels) = scope(key, policy, options);
            return Some(Translated {
                scope,
                action: pb::Action::Allow,
                groups: Vec::new(),
                labels,
                dry_run: dry_run(policy),
                audit: None,
            });
        }
    };
    let groups = enforced_groups(key, policy, action, report);
    let (scope, labels) = scope(key, policy, options);
    Some(Translated {
        scope,
        action,
        groups,
        labels,
        dry_run: dry_run(policy),
        audit: None,
    })
}

/// A policy that could not be read, in its namespace (or the mesh, in the root namespace)
/// until fixed. An ALLOW whose spec was read but has fields we do not implement allows
/// nothing, as Istio's ztunnel treats an ALLOW rule it cannot enforce. Anything else may have
/// been a DENY, and an ALLOW that matches nothing would not stop what another, valid ALLOW
/// admits: it denies everything (one empty rule matches every connection).
fn unreadable(
    key: &ObjectKey,
    policy: &AuthorizationPolicy,
    why: &str,
    options: &Options,
    report: &mut Report,
) -> Translated {
    let read_allow = policy.invalid.as_deref() == Some(crate::model::istio::AUTHZ_UNIMPLEMENTED_FIELDS)
        && matches!(policy.spec.action.as_deref(), None | Some("ALLOW"));
    let (action, groups, effect) = if read_allow {
        (pb::Action::Allow, Vec::new(), "allows nothing")
    } else {
        (pb::Action::Deny, vec![pb::Group::default()], "denies everything")
    };
    report.add(
        Kind::AuthorizationPolicy,
        key,
        format!(
            "{why}; until it is fixed the policy {effect} in namespace {}",
            key.namespace
        ),
    );
    let scope = if key.namespace == options.root_namespace {
        pb::Scope::Global
    } else {
        pb::Scope::Namespace
    };
    Translated {
        scope,
        action,
        groups,
        labels: None,
        dry_run: dry_run(policy),
        audit: None,
    }
}

/// The rules ztunnel enforces: an ALLOW rule needing L7 never matches (dropped, reported);
/// a DENY rule is enforced on its L4 part (reported), the closed choice for each.
fn enforced_groups(
    key: &ObjectKey,
    policy: &AuthorizationPolicy,
    action: pb::Action,
    report: &mut Report,
) -> Vec<pb::Group> {
    let mut groups = Vec::new();
    for (i, rule) in policy.spec.rules.iter().flatten().enumerate() {
        let (group, skipped) = rule_group(rule);
        if skipped.0.is_empty() {
            groups.push(group);
            continue;
        }
        let what = skipped.0.join(", ");
        if action == pb::Action::Allow {
            report.add(
                Kind::AuthorizationPolicy,
                key,
                format!(
                    "rules[{i}] cannot be enforced by ztunnel ({what}): it never matches here; \
                     attach the policy to a waypoint with targetRefs to enforce it"
                ),
            );
        } else {
            report.add(
                Kind::AuthorizationPolicy,
                key,
                format!("rules[{i}]: ztunnel ignores {what} and denies on the rest of the rule"),
            );
            groups.push(group);
        }
    }
    groups
}

/// An AUDIT policy: its L4 rules in the `audit` field; a rule needing L7 never matches at
/// ztunnel (reported), as in an ALLOW, so ztunnel logs no connection it cannot judge.
fn audit(key: &ObjectKey, policy: &AuthorizationPolicy, options: &Options, report: &mut Report) -> Translated {
    let mut groups = Vec::new();
    for (i, rule) in policy.spec.rules.iter().flatten().enumerate() {
        let (group, skipped) = rule_group(rule);
        if skipped.0.is_empty() {
            groups.push(group);
        } else {
            report.add(
                Kind::AuthorizationPolicy,
                key,
                format!(
                    "rules[{i}] cannot be audited by ztunnel ({}): it never matches here; \
                     attach the policy to a waypoint with targetRefs to audit requests",
                    skipped.0.join(", ")
                ),
            );
        }
    }
    let (scope, labels) = scope(key, policy, options);
    Translated {
        scope,
        action: pb::Action::Deny,
        groups: Vec::new(),
        labels,
        dry_run: dry_run(policy),
        audit: Some(pb::AuditRules { groups }),
    }
}

/// Istio's annotation marking a policy as evaluated and logged only, never enforced.
pub(crate) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Whether the policy carries `istio.io/dry-run: "true"` (any case, as Istio parses a bool).
pub(crate) fn dry_run(policy: &AuthorizationPolicy) -> bool {
    policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// One translated policy, before it is keyed into the output.
struct Translated {
    scope: pb::Scope,
    action: pb::Action,
    groups: Vec<pb::Group>,
    labels: Option<BTreeMap<String, String>>,
    dry_run: bool,
    /// An AUDIT policy's rules (then `action` is DENY and `groups` empty).
    audit: Option<pb::AuditRules>,
}

fn insert(out: &mut Output, key: &ObjectKey, t: Translated) {
    let Translated {
        scope,
        action,
        groups,
        labels,
        dry_run,
        audit,
    } = t;
    let name = format!("{}/{}", key.namespace, key.name);
    if let Some(match_labels) = labels {
        out.selected.push(Selected {
            name: name.clone(),
            namespace: key.namespace.clone(),
            match_labels,
            only: None,
        });
    }
    out.policies.insert(
        name,
        pb::Authorization {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            scope: scope as i32,
            action: action as i32,
            groups,
            dry_run,
            audit,
        },
    );
}

/// The name of the mesh-wide policy standing in for an unreadable security kind; `:` keeps it
/// apart from any object's name.
fn unreadable_name(kind: Kind) -> String {
    format!("kind-unreadable:{}", kind.name())
}

/// Kind-level fail-closed, as an unreadable policy above is at object level: a security kind
/// whose source cannot be read (failing and never listed, so its policies are unknown) gets a
/// mesh-wide stand-in that denies what its policies could govern. An unreadable
/// AuthorizationPolicy or RequestAuthentication source denies everything anywhere; an
/// unreadable PeerAuthentication source makes every workload STRICT (no plaintext). Every
/// kind that is failing is reported; other kinds keep serving their last good state.
pub(crate) fn unreadable_kinds(
    states: &BTreeMap<Kind, crate::source::KindSync>,
    options: &Options,
    report: &mut Report,
) -> BTreeMap<String, pb::Authorization> {
    let mut out = BTreeMap::new();
    for (&kind, state) in states {
        let crate::source::KindSync::Failing { reason, listed } = state else {
            continue;
        };
        let security = matches!(
            kind,
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication
        );
        let (action, groups, effect) = match kind {
            _ if *listed => {
                report.add(
                    kind,
                    &ObjectKey::new("", "*"),
                    format!(
                        "kind {} cannot be listed ({reason}); serving its last good state",
                        kind.name()
                    ),
                );
                continue;
            }
            _ if !security => {
                report.add(
                    kind,
                    &ObjectKey::new("", "*"),
                    format!(
                        "kind {} unreadable ({reason}); treated as empty until it can be listed",
                        kind.name()
                    ),
                );
                continue;
            }
            Kind::PeerAuthentication => {
                let plaintext = pb::Match {
                    not_principals: vec![pb::StringMatch {
                        match_type: Some(pb::string_match::MatchType::Presence(())),
                    }],
                    ..Default::default()
                };
                let group = pb::Group {
                    rules: vec![pb::Rules {
                        matches: vec![plaintext],
                    }],
                };
                (
                    pb::Action::Deny,
                    vec![group],
                    "every workload refuses plaintext (STRICT)",
                )
            }
            // A DENY of everything: an ALLOW matching nothing would not outweigh the valid
            // ALLOWs of the other kind (a RequestAuthentication's JWT rule would be lost).
            _ => (
                pb::Action::Deny,
                vec![pb::Group::default()],
                "every workload, waypoint and ingress gateway in the mesh denies everything",
            ),
        };
        report.add(
            kind,
            &ObjectKey::new("", "*"),
            format!(
                "kind {} unreadable ({reason}); failing closed until it can be listed: {effect}",
                kind.name()
            ),
        );
        let name = unreadable_name(kind);
        out.insert(
            format!("{}/{name}", options.root_namespace),
            pb::Authorization {
                name,
                namespace: options.root_namespace.clone(),
                scope: pb::Scope::Global as i32,
                action: action as i32,
                groups,
                ..Default::default()
            },
        );
    }
    out
}
