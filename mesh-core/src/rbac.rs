//! L4 authorization: `istio.security.Authorization` validated into [`Policy`] and evaluated
//! at the destination. Any matching DENY denies; with no ALLOW policy the connection is
//! allowed; otherwise some ALLOW must match. Groups are OR'd, rules in a group AND'd, matches
//! in a rule OR'd; within a match every set field must hold and values of a field are OR'd.
//!
//! Two kinds of policy never decide ([`evaluate`] skips them); [`observe`] reports what they
//! saw, for the access log and metrics:
//! - AUDIT ([`Action::Audit`], carried in the `audit` extension field: Istio's ztunnel sees a
//!   DENY without groups, which matches nothing): the policies whose rules match are named.
//! - dry-run (`dry_run`, from the `istio.io/dry-run` annotation): the dry-run policies alone
//!   are evaluated as if enforced (Istio's shadow rules) and that decision is reported.
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use mesh_proto::security as pb;

use crate::identity::Identity;
use crate::state::model::{ip_from_bytes, ResourceError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Logs the connections its rules match; never allows or denies.
    Audit,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// A source service account, matched exactly against the peer's identity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl ServiceAccountMatch {
    fn matches(&self, id: &Identity) -> bool {
        id.namespace == self.namespace && id.service_account == self.service_account
    }
}

/// One match clause.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// A validated authorization policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// groups -> rules -> matches
    pub groups: Vec<Vec<Vec<Match>>>,
    /// Logged and counted, never enforced.
    pub dry_run: bool,
}

impl Policy {
    /// The xDS resource name.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The L4 facts of one connection, as the destination sees them.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// None for plaintext (no mutual TLS).
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst: SocketAddr,
}

fn any_str(ms: &[StringMatch], v: Option<&str>) -> bool {
    v.is_some_and(|v| ms.iter().any(|m| m.matches(v)))
}

fn any_ip(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

fn any_sa(ms: &[ServiceAccountMatch], id: Option<&Identity>) -> bool {
    id.is_some_and(|id| ms.iter().any(|m| m.matches(id)))
}

impl Match {
    fn matches(&self, c: &ConnectionInfo) -> bool {
        let ns = c.src_identity.as_ref().map(|i| i.namespace.as_str());
        let principal = c.src_identity.as_ref().map(|i| i.principal());
        let principal = principal.as_deref();
        (self.namespaces.is_empty() || any_str(&self.namespaces, ns))
            && !any_str(&self.not_namespaces, ns)
            && (self.service_accounts.is_empty() || any_sa(&self.service_accounts, c.src_identity.as_ref()))
            && !any_sa(&self.not_service_accounts, c.src_identity.as_ref())
            && (self.principals.is_empty() || any_str(&self.principals, principal))
            && !any_str(&self.not_principals, principal)
            && (self.source_ips.is_empty() || any_ip(&self.source_ips, c.src_ip))
            && !any_ip(&self.not_source_ips, c.src_ip)
            && (self.destination_ips.is_empty() || any_ip(&self.destination_ips, c.dst.ip()))
            && !any_ip(&self.not_destination_ips, c.dst.ip())
            && (self.destination_ports.is_empty() || self.destination_ports.contains(&c.dst.port()))
            && !self.not_destination_ports.contains(&c.dst.port())
    }
}

impl Policy {
    /// True when some group matches. A policy without groups matches nothing (so an ALLOW
    /// without rules denies everything); a group or rule without clauses matches everything.
    pub fn matches(&self, c: &ConnectionInfo) -> bool {
        self.matching_rule(c).is_some()
    }

    /// The index of the first group (an AuthorizationPolicy rule) that matches, if any.
    pub fn matching_rule(&self, c: &ConnectionInfo) -> Option<usize> {
        self.groups.iter().position(|rules| {
            rules
                .iter()
                .all(|matches| matches.is_empty() || matches.iter().any(|m| m.matches(c)))
        })
    }
}

/// The outcome of evaluating the policies of a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Denial),
}

/// Why a connection is denied: what an access log and `meshctl explain` name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// Rule `rule` (0-based, in the policy's order) of the DENY policy `policy` matched.
    Matched { policy: String, rule: usize },
    /// ALLOW policies apply and none of their rules matched.
    NoAllowMatched,
    /// The destination workload is gone, so nothing authorizes the connection any more.
    NoWorkload,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::Matched { policy, rule } => write!(f, "DENY policy {policy} rule {rule} matched"),
            Denial::NoAllowMatched => f.write_str("no rule of an ALLOW policy matched"),
            Denial::NoWorkload => f.write_str("the destination workload is gone"),
        }
    }
}

/// One policy considered for a connection, for explaining a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Considered {
    /// `namespace/name`.
    pub policy: String,
    pub action: Action,
    pub dry_run: bool,
    /// The first rule that matched.
    pub matched_rule: Option<usize>,
}

/// Decides under the enforced policies (`dry_run` false) or under the dry-run ones alone
/// (`dry_run` true). AUDIT policies never take part.
fn decide<'a>(policies: impl IntoIterator<Item = &'a Policy>, c: &ConnectionInfo, dry_run: bool) -> Decision {
    let mut have_allow = false;
    let mut allowed = false;
    for p in policies.into_iter().filter(|p| p.dry_run == dry_run) {
        match p.action {
            Action::Deny => {
                if let Some(rule) = p.matching_rule(c) {
                    return Decision::Deny(Denial::Matched { policy: p.key(), rule });
                }
            }
            Action::Allow => {
                have_allow = true;
                allowed = allowed || p.matches(c);
            }
            Action::Audit => {}
        }
    }
    if !have_allow || allowed {
        Decision::Allow
    } else {
        Decision::Deny(Denial::NoAllowMatched)
    }
}

/// Evaluates `policies` (those that apply to the destination workload) for one connection.
/// Dry-run and AUDIT policies do not take part (see [`observe`]).
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a Policy>, c: &ConnectionInfo) -> Decision {
    decide(policies, c, false)
}

/// What the dry-run policies alone would have decided for a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRun {
    pub decision: Decision,
    /// The dry-run policy whose rule decided (`namespace/name`): the DENY that matched, or
    /// the first ALLOW that did. None when no rule decided (no dry-run ALLOW applies, or none
    /// of them matched).
    pub by: Option<String>,
}

impl DryRun {
    /// `allow` or `deny`, the metric label.
    pub fn verdict(&self) -> &'static str {
        match self.decision {
            Decision::Allow => "allow",
            Decision::Deny(_) => "deny",
        }
    }
}

impl std::fmt::Display for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.decision, &self.by) {
            (Decision::Deny(d), _) => write!(f, "would deny: {d}"),
            (Decision::Allow, Some(p)) => write!(f, "would allow: ALLOW policy {p} matched"),
            (Decision::Allow, None) => f.write_str("would allow: no dry-run ALLOW policy applies"),
        }
    }
}

/// What AUDIT and dry-run policies saw of one connection: logged and counted, never enforced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// AUDIT policies (`namespace/name`) whose rules matched, with the first rule that did.
    pub audits: Vec<(String, usize)>,
    /// What the dry-run policies alone would decide, when any apply.
    pub dry_run: Option<DryRun>,
}

impl Observed {
    pub fn is_empty(&self) -> bool {
        self.audits.is_empty() && self.dry_run.is_none()
    }

    /// The matched AUDIT policies, comma-separated (empty when none), for a log field.
    pub fn audit_names(&self) -> String {
        let names: Vec<&str> = self.audits.iter().map(|(p, _)| p.as_str()).collect();
        names.join(",")
    }
}

/// The AUDIT matches and the dry-run decision for one connection. Allocates nothing when
/// neither kind of policy applies (the common case).
pub fn observe<'a, I>(policies: impl Fn() -> I, c: &ConnectionInfo) -> Observed
where
    I: IntoIterator<Item = &'a Policy>,
{
    let mut out = Observed::default();
    let mut any_dry_run = false;
    for p in policies() {
        any_dry_run |= p.dry_run;
        if p.action == Action::Audit && !p.dry_run {
            if let Some(rule) = p.matching_rule(c) {
                out.audits.push((p.key(), rule));
            }
        }
    }
    if any_dry_run {
        let decision = decide(policies(), c, true);
        let by = match &decision {
            Decision::Deny(Denial::Matched { policy, .. }) => Some(policy.clone()),
            Decision::Deny(_) => None,
            Decision::Allow => policies()
                .into_iter()
                .find(|p| p.dry_run && p.action == Action::Allow && p.matches(c))
                .map(Policy::key),
        };
        out.dry_run = Some(DryRun { decision, by });
    }
    out
}

/// [`evaluate`]'s decision with every policy it considered and the rule of each that matched
/// (dry-run and AUDIT policies included, never deciding), for `meshctl explain`. Not on the
/// data path.
pub fn evaluate_traced<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    c: &ConnectionInfo,
) -> (Decision, Vec<Considered>) {
    let policies: Vec<&Policy> = policies.into_iter().collect();
    let considered = policies
        .iter()
        .map(|p| Considered {
            policy: p.key(),
            action: p.action,
            dry_run: p.dry_run,
            matched_rule: p.matching_rule(c),
        })
        .collect();
    (evaluate(policies, c), considered)
}

fn string_matches(field: &str, ms: &[pb::StringMatch]) -> Result<Vec<StringMatch>, ResourceError> {
    use pb::string_match::MatchType;
    ms.iter()
        .enumerate()
        .map(|(i, m)| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
            Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
            Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
            Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
            None => Err(ResourceError::new(format!("{field}[{i}]"), "no match type set")),
        })
        .collect()
}

fn cidrs(field: &str, addrs: &[pb::Address]) -> Result<Vec<IpNet>, ResourceError> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let f = || format!("{field}[{i}]");
            let ip = ip_from_bytes(&a.address).ok_or_else(|| ResourceError::new(f(), "not a 4 or 16 byte IP"))?;
            let len = u8::try_from(a.length).map_err(|_| ResourceError::new(f(), "prefix length too large"))?;
            IpNet::new(ip, len).map_err(|_| ResourceError::new(f(), format!("prefix length {len} too large for {ip}")))
        })
        .collect()
}

fn service_accounts(field: &str, ms: &[pb::ServiceAccountMatch]) -> Result<Vec<ServiceAccountMatch>, ResourceError> {
    ms.iter()
        .enumerate()
        .map(|(i, m)| {
            // An empty side would match nothing real; reject rather than guess a wildcard.
            if m.namespace.is_empty() || m.service_account.is_empty() {
                return Err(ResourceError::new(
                    format!("{field}[{i}]"),
                    "namespace and service_account must be set",
                ));
            }
            Ok(ServiceAccountMatch {
                namespace: m.namespace.clone(),
                service_account: m.service_account.clone(),
            })
        })
        .collect()
}

fn ports(field: &str, ps: &[u32]) -> Result<Vec<u16>, ResourceError> {
    ps.iter()
        .map(|p| u16::try_from(*p).map_err(|_| ResourceError::new(field, format!("{p} is not a valid port"))))
        .collect()
}

impl TryFrom<&pb::Match> for Match {
    type Error = ResourceError;

    fn try_from(m: &pb::Match) -> Result<Self, ResourceError> {
        Ok(Match {
            namespaces: string_matches("namespaces", &m.namespaces)?,
            not_namespaces: string_matches("not_namespaces", &m.not_namespaces)?,
            service_accounts: service_accounts("service_accounts", &m.service_accounts)?,
            not_service_accounts: service_accounts("not_service_accounts", &m.not_service_accounts)?,
            principals: string_matches("principals", &m.principals)?,
            not_principals: string_matches("not_principals", &m.not_principals)?,
            source_ips: cidrs("source_ips", &m.source_ips)?,
            not_source_ips: cidrs("not_source_ips", &m.not_source_ips)?,
            destination_ips: cidrs("destination_ips", &m.destination_ips)?,
            not_destination_ips: cidrs("not_destination_ips", &m.not_destination_ips)?,
            destination_ports: ports("destination_ports", &m.destination_ports)?,
            not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
        })
    }
}

impl TryFrom<&pb::Authorization> for Policy {
    type Error = ResourceError;

    fn try_from(a: &pb::Authorization) -> Result<Self, ResourceError> {
        if a.name.is_empty() {
            return Err(ResourceError::new("authorization.name", "must not be empty"));
        }
        let scope = match pb::Scope::try_from(a.scope) {
            Ok(pb::Scope::Global) => Scope::Global,
            Ok(pb::Scope::Namespace) => Scope::Namespace,
            Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => {
                return Err(ResourceError::new(
                    "authorization.scope",
                    format!("unknown value {}", a.scope),
                ))
            }
        };
        let action = match pb::Action::try_from(a.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(ResourceError::new(
                    "authorization.action",
                    format!("unknown value {}", a.action),
                ))
            }
        };
        let (action, groups) = match &a.audit {
            None => (action, &a.groups),
            // What Istio's ztunnel sees must match nothing, or it would enforce an AUDIT policy.
            Some(_) if action != Action::Deny || !a.groups.is_empty() => {
                return Err(ResourceError::new(
                    "authorization.audit",
                    "an AUDIT policy's Istio-visible part must be a DENY without groups",
                ))
            }
            Some(audit) => (Action::Audit, &audit.groups),
        };
        let groups = groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                group
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(r, rule)| {
                        rule.matches
                            .iter()
                            .enumerate()
                            .map(|(m, mm)| {
                                Match::try_from(mm).map_err(|e| ResourceError {
                                    field: format!("authorization.groups[{g}].rules[{r}].matches[{m}].{}", e.field),
                                    reason: e.reason,
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            scope,
            action,
            groups,
            dry_run: a.dry_run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(src: Option<&str>, src_ip: &str, dst: &str) -> ConnectionInfo {
        ConnectionInfo {
            src_identity: src.map(|s| s.parse().unwrap()),
            src_ip: src_ip.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    fn policy(action: Action, m: Match) -> Policy {
        Policy {
            name: "p".into(),
            namespace: "ns".into(),
            scope: Scope::Namespace,
            action,
            groups: vec![vec![vec![m]]],
            dry_run: false,
        }
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/app";

    #[test]
    fn no_policies_allow() {
        assert_eq!(evaluate([], &conn(None, "10.0.0.1", "10.0.0.2:80")), Decision::Allow);
    }

    #[test]
    fn allow_by_principal() {
        let p = policy(
            Action::Allow,
            Match {
                principals: vec![StringMatch::Exact("cluster.local/ns/default/sa/sleep".into())],
                ..Default::default()
            },
        );
        assert_eq!(
            evaluate([&p], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80")),
            Decision::Allow
        );
        assert_eq!(
            evaluate([&p], &conn(Some(OTHER), "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::NoAllowMatched)
        );
        assert_eq!(
            evaluate([&p], &conn(None, "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::NoAllowMatched)
        );
    }

    #[test]
    fn namespaces_ports_and_negations() {
        let p = policy(
            Action::Allow,
            Match {
                namespaces: vec![StringMatch::Prefix("def".into())],
                destination_ports: vec![80],
                not_source_ips: vec!["10.9.0.0/16".parse().unwrap()],
                ..Default::default()
            },
        );
        assert_eq!(
            evaluate([&p], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80")),
            Decision::Allow
        );
        assert_eq!(
            evaluate([&p], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:81")),
            Decision::Deny(Denial::NoAllowMatched)
        );
        assert_eq!(
            evaluate([&p], &conn(Some(SLEEP), "10.9.1.1", "10.0.0.2:80")),
            Decision::Deny(Denial::NoAllowMatched)
        );
        assert_eq!(
            evaluate([&p], &conn(Some(OTHER), "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::NoAllowMatched)
        );
    }

    #[test]
    fn the_deciding_rule_is_named_and_traced() {
        let mut deny = policy(
            Action::Deny,
            Match {
                namespaces: vec![StringMatch::Exact("nobody".into())],
                ..Default::default()
            },
        );
        // A second rule (group) that matches OTHER's namespace.
        deny.groups.push(vec![vec![Match {
            not_namespaces: vec![StringMatch::Exact("default".into())],
            ..Default::default()
        }]]);
        let other = conn(Some(OTHER), "10.0.0.1", "10.0.0.2:80");
        let want = Decision::Deny(Denial::Matched {
            policy: "ns/p".into(),
            rule: 1,
        });
        assert_eq!(evaluate([&deny], &other), want);
        let (decision, considered) = evaluate_traced([&deny], &other);
        assert_eq!(decision, want);
        assert_eq!(considered.len(), 1);
        assert_eq!(
            (considered[0].action, considered[0].matched_rule),
            (Action::Deny, Some(1))
        );
        let (decision, considered) = evaluate_traced([&deny], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80"));
        assert_eq!((decision, considered[0].matched_rule), (Decision::Allow, None));
        assert_eq!(
            Denial::Matched {
                policy: "ns/p".into(),
                rule: 1
            }
            .to_string(),
            "DENY policy ns/p rule 1 matched"
        );
    }

    #[test]
    fn deny_takes_precedence() {
        let allow = policy(Action::Allow, Match::default());
        let deny = policy(
            Action::Deny,
            Match {
                not_namespaces: vec![StringMatch::Exact("default".into())],
                ..Default::default()
            },
        );
        assert_eq!(
            evaluate([&allow, &deny], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80")),
            Decision::Allow
        );
        assert_eq!(
            evaluate([&allow, &deny], &conn(Some(OTHER), "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::Matched {
                policy: "ns/p".into(),
                rule: 0
            })
        );
    }

    #[test]
    fn presence_requires_an_identity() {
        // STRICT PeerAuthentication: deny connections without a peer identity.
        let strict = policy(
            Action::Deny,
            Match {
                not_principals: vec![StringMatch::Presence],
                ..Default::default()
            },
        );
        assert_eq!(
            evaluate([&strict], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80")),
            Decision::Allow
        );
        assert!(matches!(
            evaluate([&strict], &conn(None, "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::Matched { .. })
        ));
    }

    #[test]
    fn empty_allow_denies_all_and_empty_group_allows_all() {
        let deny_all = Policy {
            groups: vec![],
            ..policy(Action::Allow, Match::default())
        };
        assert_eq!(
            evaluate([&deny_all], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::NoAllowMatched)
        );
        let allow_all = Policy {
            groups: vec![vec![]],
            ..policy(Action::Allow, Match::default())
        };
        assert_eq!(
            evaluate([&allow_all], &conn(None, "10.0.0.1", "10.0.0.2:80")),
            Decision::Allow
        );
    }

    #[test]
    fn rules_are_anded_and_matches_ored() {
        let ns = Match {
            namespaces: vec![StringMatch::Exact("default".into())],
            ..Default::default()
        };
        let port = Match {
            destination_ports: vec![80],
            ..Default::default()
        };
        let other_port = Match {
            destination_ports: vec![90],
            ..Default::default()
        };
        let p = Policy {
            groups: vec![vec![vec![ns], vec![port, other_port]]],
            ..policy(Action::Allow, Match::default())
        };
        assert_eq!(
            evaluate([&p], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:90")),
            Decision::Allow
        );
        assert_eq!(
            evaluate([&p], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:91")),
            Decision::Deny(Denial::NoAllowMatched)
        );
        assert_eq!(
            evaluate([&p], &conn(Some(OTHER), "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::NoAllowMatched)
        );
    }

    #[test]
    fn invalid_resources_name_the_field() {
        let a = pb::Authorization {
            name: "x".into(),
            groups: vec![pb::Group {
                rules: vec![pb::Rules {
                    matches: vec![pb::Match {
                        destination_ports: vec![70000],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        let e = Policy::try_from(&a).unwrap_err();
        assert_eq!(e.field, "authorization.groups[0].rules[0].matches[0].destination_ports");
    }
    #[test]
    fn dry_run_policies_are_not_enforced() {
        let deny_sleep = Policy {
            dry_run: true,
            ..policy(
                Action::Deny,
                Match {
                    principals: vec![StringMatch::Exact("cluster.local/ns/default/sa/sleep".into())],
                    ..Default::default()
                },
            )
        };
        // It matches, but is only reported: the connection is allowed.
        let sleep = conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80");
        assert_eq!(evaluate([&deny_sleep], &sleep), Decision::Allow);
        let seen = observe(|| [&deny_sleep], &sleep).dry_run.unwrap();
        assert_eq!(seen.verdict(), "deny");
        assert_eq!(seen.by.as_deref(), Some("ns/p"));
        assert_eq!(seen.to_string(), "would deny: DENY policy ns/p rule 0 matched");
        // A dry-run ALLOW does not make the destination default-deny.
        let allow_other = Policy {
            dry_run: true,
            ..policy(
                Action::Allow,
                Match {
                    namespaces: vec![StringMatch::Exact("other".into())],
                    ..Default::default()
                },
            )
        };
        assert_eq!(
            evaluate([&allow_other], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80")),
            Decision::Allow
        );
        // The same DENY enforced denies.
        let enforced = Policy {
            dry_run: false,
            ..deny_sleep.clone()
        };
        assert!(matches!(
            evaluate([&enforced], &conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::Matched { .. })
        ));
        // Decoded from the wire, dry_run is kept.
        let a = pb::Authorization {
            name: "x".into(),
            dry_run: true,
            ..Default::default()
        };
        assert!(Policy::try_from(&a).unwrap().dry_run);
    }

    fn named(name: &str, p: Policy) -> Policy {
        Policy { name: name.into(), ..p }
    }

    /// Policies of the AUDIT and dry-run tables; `sleep` is from namespace default to port 80,
    /// `other` from namespace other to port 9000.
    struct Table {
        audit_default: Policy,
        audit_port: Policy,
        dry_deny: Policy,
        dry_allow: Policy,
        allow_other: Policy,
        sleep: ConnectionInfo,
        other: ConnectionInfo,
    }

    fn table() -> Table {
        let from = |ns: &str| Match {
            namespaces: vec![StringMatch::Exact(ns.into())],
            ..Default::default()
        };
        let port = Match {
            destination_ports: vec![9000],
            ..Default::default()
        };
        let dry = |p: Policy| Policy { dry_run: true, ..p };
        Table {
            audit_default: named("audit-default", policy(Action::Audit, from("default"))),
            audit_port: named("audit-port", policy(Action::Audit, port)),
            dry_deny: named("dry-deny", dry(policy(Action::Deny, from("default")))),
            dry_allow: named("dry-allow", dry(policy(Action::Allow, from("other")))),
            allow_other: named("allow-other", policy(Action::Allow, from("other"))),
            sleep: conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80"),
            other: conn(Some(OTHER), "10.0.0.1", "10.0.0.2:9000"),
        }
    }

    /// One row: the enforced decision, the AUDIT policies named, the dry-run verdict.
    fn row(policies: &[&Policy], c: &ConnectionInfo, allowed: bool, audits: &[&str], dry_run: Option<&str>) {
        let decision = evaluate(policies.iter().copied(), c);
        assert_eq!(decision == Decision::Allow, allowed, "{policies:?}: {decision:?}");
        let seen = observe(|| policies.iter().copied(), c);
        let names: Vec<&str> = seen.audits.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, audits, "{policies:?}");
        assert_eq!(seen.dry_run.map(|d| d.to_string()).as_deref(), dry_run, "{policies:?}");
    }

    /// AUDIT policies never decide; the ones that match are named.
    #[test]
    fn audit_table() {
        let t = table();
        row(&[&t.audit_default], &t.sleep, true, &["ns/audit-default"], None);
        row(&[&t.audit_default], &t.other, true, &[], None);
        // No default-deny of an ALLOW-less destination, no widening of an ALLOW.
        row(
            &[&t.audit_default, &t.allow_other],
            &t.sleep,
            false,
            &["ns/audit-default"],
            None,
        );
        row(
            &[&t.audit_port, &t.audit_default],
            &t.other,
            true,
            &["ns/audit-port"],
            None,
        );
    }

    /// Dry-run policies alone decide the reported verdict (Istio's shadow rules); the enforced
    /// decision never changes.
    #[test]
    fn dry_run_table() {
        let t = table();
        let deny = Some("would deny: DENY policy ns/dry-deny rule 0 matched");
        row(&[&t.dry_deny], &t.sleep, true, &[], deny);
        row(
            &[&t.dry_deny],
            &t.other,
            true,
            &[],
            Some("would allow: no dry-run ALLOW policy applies"),
        );
        // A dry-run ALLOW's own default-deny is only reported.
        let no_allow = Some("would deny: no rule of an ALLOW policy matched");
        row(&[&t.dry_allow], &t.sleep, true, &[], no_allow);
        let allowed = Some("would allow: ALLOW policy ns/dry-allow matched");
        row(&[&t.dry_allow], &t.other, true, &[], allowed);
        // The enforced ALLOW does not rescue the shadow rules, nor they the enforced ones.
        row(&[&t.allow_other, &t.dry_deny], &t.sleep, false, &[], deny);
        let all = [&t.allow_other, &t.dry_allow, &t.audit_port];
        row(&all, &t.other, true, &["ns/audit-port"], allowed);
    }

    /// An AUDIT policy travels as a DENY without groups plus the `audit` extension; anything
    /// else in the Istio-visible part is refused, since Istio's ztunnel would enforce it.
    #[test]
    fn audit_decodes_from_its_extension_only() {
        let group = pb::Group {
            rules: vec![pb::Rules {
                matches: vec![pb::Match {
                    destination_ports: vec![9000],
                    ..Default::default()
                }],
            }],
        };
        let mut a = pb::Authorization {
            name: "audit".into(),
            namespace: "ns".into(),
            action: pb::Action::Deny as i32,
            audit: Some(pb::AuditRules {
                groups: vec![group.clone()],
            }),
            ..Default::default()
        };
        let p = Policy::try_from(&a).unwrap();
        assert_eq!((p.action, p.groups.len()), (Action::Audit, 1));
        a.groups = vec![group];
        assert!(
            Policy::try_from(&a).is_err(),
            "visible groups would be enforced by Istio's ztunnel"
        );
        a.groups.clear();
        a.action = pb::Action::Allow as i32;
        assert!(
            Policy::try_from(&a).is_err(),
            "a visible ALLOW would make Istio's ztunnel default-deny"
        );
    }

    #[test]
    fn service_account_matches() {
        let sa = |ns: &str, name: &str| ServiceAccountMatch {
            namespace: ns.into(),
            service_account: name.into(),
        };
        let allow_sleep = policy(
            Action::Allow,
            Match {
                service_accounts: vec![sa("default", "sleep")],
                ..Default::default()
            },
        );
        let sleep = conn(Some(SLEEP), "10.0.0.1", "10.0.0.2:80");
        let other = conn(Some(OTHER), "10.0.0.1", "10.0.0.2:80");
        let plaintext = conn(None, "10.0.0.1", "10.0.0.2:80");
        assert_eq!(evaluate([&allow_sleep], &sleep), Decision::Allow);
        assert_eq!(evaluate([&allow_sleep], &other), Decision::Deny(Denial::NoAllowMatched));
        assert_eq!(
            evaluate([&allow_sleep], &plaintext),
            Decision::Deny(Denial::NoAllowMatched)
        );
        let deny_not_sleep = policy(
            Action::Deny,
            Match {
                not_service_accounts: vec![sa("default", "sleep")],
                ..Default::default()
            },
        );
        assert_eq!(evaluate([&deny_not_sleep], &sleep), Decision::Allow);
        assert!(matches!(
            evaluate([&deny_not_sleep], &other),
            Decision::Deny(Denial::Matched { .. })
        ));
        assert!(matches!(
            evaluate([&deny_not_sleep], &plaintext),
            Decision::Deny(Denial::Matched { .. })
        ));
    }

    #[test]
    fn service_accounts_decode_from_the_wire() {
        // Before this field was read, a service-account-only ALLOW decoded to an empty match
        // and so allowed every source.
        let a = pb::Authorization {
            name: "x".into(),
            groups: vec![pb::Group {
                rules: vec![pb::Rules {
                    matches: vec![pb::Match {
                        service_accounts: vec![pb::ServiceAccountMatch {
                            namespace: "default".into(),
                            service_account: "sleep".into(),
                        }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        let p = Policy::try_from(&a).unwrap();
        assert_eq!(
            evaluate([&p], &conn(Some(OTHER), "10.0.0.1", "10.0.0.2:80")),
            Decision::Deny(Denial::NoAllowMatched)
        );
        let empty = pb::Authorization {
            groups: vec![pb::Group {
                rules: vec![pb::Rules {
                    matches: vec![pb::Match {
                        not_service_accounts: vec![pb::ServiceAccountMatch::default()],
                        ..Default::default()
                    }],
                }],
            }],
            ..a
        };
        let e = Policy::try_from(&empty).unwrap_err();
        assert_eq!(
            e.field,
            "authorization.groups[0].rules[0].matches[0].not_service_accounts[0]"
        );
    }
}
