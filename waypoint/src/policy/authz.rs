//! L7 authorization with Istio's semantics, evaluated per request against the original
//! client's SPIFFE identity: any matching DENY denies; if ALLOW policies apply, one must
//! match; AUDIT never changes the decision. An unknown condition key makes a DENY rule match
//! and an ALLOW rule miss, so a mistake never opens access. `paths` and `notPaths` take
//! Istio's path templates (`/admin/{**}`, `/api/{*}/secret`) besides its `*` forms
//! ([`mesh_core::path_template`]); an invalid template fails closed the same way.
//!
//! A connection proxied as opaque TCP has no method, path, host, headers or request
//! principal. Istio's rule for it, kept here: a DENY rule's HTTP-only fields are ignored (the
//! rule denies more, never less), and an ALLOW rule with HTTP-only fields allows nothing.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;
use mesh_core::path_template::{self, Chars};
use mesh_proto::waypoint as wp;

use super::jwt::RequestPrincipal;

/// What policies see of one request.
pub struct RequestAttrs<'a> {
    /// SPIFFE identity without the scheme: `td/ns/x/sa/y`; empty for a client without one
    /// (at an ingress gateway), which no `principals`/`namespaces` value matches.
    pub source_principal: &'a str,
    pub source_namespace: &'a str,
    /// The peer's address (`ipBlocks`).
    pub source_ip: IpAddr,
    /// The original client's address (`remoteIpBlocks`, `remote.ip`): at an ingress gateway,
    /// taken from X-Forwarded-For past the trusted proxies; elsewhere the peer's.
    pub remote_ip: IpAddr,
    pub request_principal: Option<&'a RequestPrincipal>,
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// What policies see of a connection proxied as opaque TCP.
pub struct ConnectionAttrs<'a> {
    /// SPIFFE identity without the scheme: `td/ns/x/sa/y`.
    pub source_principal: &'a str,
    pub source_namespace: &'a str,
    pub source_ip: IpAddr,
    pub port: u16,
}

/// Whether the HTTP-only parts of a rule can be evaluated.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    Http,
    /// Opaque TCP: HTTP-only fields are ignored in DENY rules and make ALLOW rules miss.
    Tcp,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Names the policy that denied, or says no ALLOW matched.
    Deny(String),
}

/// Istio's string forms: `*`, `prefix*`, `*suffix`, exact.
fn wildcard(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return value.starts_with(p);
    }
    if let Some(s) = pattern.strip_prefix('*') {
        return value.ends_with(s);
    }
    pattern == value
}

fn any_wildcard(patterns: &[String], value: &str) -> bool {
    patterns.iter().any(|p| wildcard(p, value))
}

fn in_blocks(blocks: &[String], ip: IpAddr) -> bool {
    blocks.iter().any(|b| match b.parse::<IpNet>() {
        Ok(net) => net.contains(&ip),
        Err(_) => b.parse::<IpAddr>().is_ok_and(|a| a == ip),
    })
}

/// `positive` must match if non-empty; `negative` must not match.
fn field(positive: &[String], negative: &[String], matches: impl Fn(&[String]) -> bool) -> bool {
    (positive.is_empty() || matches(positive)) && (negative.is_empty() || !matches(negative))
}

fn source_matches(s: &wp::Source, r: &RequestAttrs<'_>, traffic: Traffic) -> bool {
    let principal = r.source_principal;
    let req_principal = r.request_principal.map(|p| p.principal());
    // Without a peer identity nothing is matched, not even `*` (Istio: "any authenticated").
    field(&s.principals, &s.not_principals, |ps| {
        !principal.is_empty() && any_wildcard(ps, principal)
    }) && field(&s.namespaces, &s.not_namespaces, |ns| {
        !r.source_namespace.is_empty() && any_wildcard(ns, r.source_namespace)
    }) && field(&s.ip_blocks, &s.not_ip_blocks, |b| in_blocks(b, r.source_ip))
        && field(&s.remote_ip_blocks, &s.not_remote_ip_blocks, |b| {
            in_blocks(b, r.remote_ip)
        })
        && (traffic == Traffic::Tcp
            || field(&s.request_principals, &s.not_request_principals, |ps| {
                req_principal.as_deref().is_some_and(|p| any_wildcard(ps, p))
            }))
}

fn host_matches(patterns: &[String], host: &str) -> bool {
    let bare = host
        .rsplit_once(':')
        .map_or(host, |(h, p)| if p.parse::<u16>().is_ok() { h } else { host });
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        wildcard(&p, &host.to_ascii_lowercase()) || wildcard(&p, &bare.to_ascii_lowercase())
    })
}

/// Whether one of `patterns` matches `path`: Istio's path templates (`/admin/{**}`) or its
/// `*` forms. `closed` is what a template that cannot be judged counts as: one the controller
/// should have refused, or a request character its operators do not read (then read as any
/// character). It is true where a hit denies more: `paths` of a DENY, `notPaths` of an ALLOW.
fn any_path(patterns: &[String], path: &str, closed: bool) -> bool {
    let chars = if closed { Chars::Any } else { Chars::Strict };
    patterns.iter().any(|p| {
        if path_template::is_template(p) {
            path_template::matches(p, path, chars).unwrap_or(closed)
        } else {
            wildcard(p, path)
        }
    })
}

fn operation_matches(o: &wp::Operation, r: &RequestAttrs<'_>, effect: Effect, traffic: Traffic) -> bool {
    let port_in = |ports: &[u32]| ports.contains(&u32::from(r.port));
    let deny = effect == Effect::Deny;
    (o.ports.is_empty() || port_in(&o.ports))
        && (o.not_ports.is_empty() || !port_in(&o.not_ports))
        && (traffic == Traffic::Tcp
            || (field(&o.hosts, &o.not_hosts, |h| host_matches(h, r.host))
                && field(&o.methods, &o.not_methods, |m| any_wildcard(m, r.method))
                && (o.paths.is_empty() || any_path(&o.paths, r.path, deny))
                && (o.not_paths.is_empty() || !any_path(&o.not_paths, r.path, !deny))))
}

/// Condition keys about the HTTP request (headers, JWT claims and principal).
fn http_only_key(key: &str) -> bool {
    key.starts_with("request.")
}

/// Whether a rule uses a field only HTTP requests have.
fn uses_http_fields(rule: &wp::Rule) -> bool {
    rule.from
        .iter()
        .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
        || rule.to.iter().any(|o| {
            [
                &o.hosts,
                &o.not_hosts,
                &o.methods,
                &o.not_methods,
                &o.paths,
                &o.not_paths,
            ]
            .iter()
            .any(|f| !f.is_empty())
        })
        || rule.when.iter().any(|c| http_only_key(&c.key))
}

/// Whether a policy can only be enforced on HTTP: request authentication, a rate limit (it
/// counts requests), or authorization with HTTP-only fields. A service such a policy applies
/// to is never proxied as opaque TCP, so a raw connection cannot slip past it.
pub fn needs_http(p: &wp::Policy) -> bool {
    match &p.kind {
        Some(wp::policy::Kind::Jwt(_) | wp::policy::Kind::RateLimit(_)) => true,
        Some(wp::policy::Kind::Authorization(a)) => a.rules.iter().any(uses_http_fields),
        Some(wp::policy::Kind::Telemetry(_)) | None => false,
    }
}

/// The values a condition key has for this request; `None` for a key we do not know.
fn condition_values(key: &str, r: &RequestAttrs<'_>) -> Option<Vec<String>> {
    if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        let values = r.headers.get_all(name).iter();
        return Some(values.filter_map(|v| v.to_str().ok()).map(str::to_owned).collect());
    }
    if let Some(rest) = key
        .strip_prefix("request.auth.claims[")
        .and_then(|k| k.strip_suffix(']'))
    {
        let path: Vec<&str> = rest.split("][").collect();
        return Some(r.request_principal.map(|p| p.claim_values(&path)).unwrap_or_default());
    }
    let one = |v: Option<String>| Some(v.into_iter().collect());
    match key {
        "request.auth.principal" => one(r.request_principal.map(|p| p.principal())),
        "request.auth.audiences" => Some(
            r.request_principal
                .map(|p| p.claim_values(&["aud"]))
                .unwrap_or_default(),
        ),
        "request.auth.presenter" => Some(
            r.request_principal
                .map(|p| p.claim_values(&["azp"]))
                .unwrap_or_default(),
        ),
        "source.ip" => one(Some(r.source_ip.to_string())),
        "remote.ip" => one(Some(r.remote_ip.to_string())),
        "source.namespace" => one(Some(r.source_namespace.to_owned())),
        "source.principal" => one(Some(r.source_principal.to_owned())),
        "destination.port" => one(Some(r.port.to_string())),
        _ => None,
    }
}

fn condition_matches(c: &wp::Condition, r: &RequestAttrs<'_>, unknown: bool, traffic: Traffic) -> bool {
    if traffic == Traffic::Tcp && http_only_key(&c.key) {
        return true;
    }
    let Some(values) = condition_values(&c.key, r) else {
        return unknown;
    };
    let ip_key = matches!(c.key.as_str(), "source.ip" | "remote.ip");
    let hit = |patterns: &[String]| {
        values.iter().any(|v| match v.parse::<IpAddr>() {
            Ok(ip) if ip_key => in_blocks(patterns, ip),
            _ => any_wildcard(patterns, v),
        })
    };
    (c.values.is_empty() || hit(&c.values)) && (c.not_values.is_empty() || !hit(&c.not_values))
}

/// Whether `rule` matches. An unknown condition key matches in a DENY rule and misses in an
/// ALLOW rule; on TCP, an ALLOW rule with HTTP-only fields misses.
fn rule_matches(rule: &wp::Rule, r: &RequestAttrs<'_>, effect: Effect, traffic: Traffic) -> bool {
    if traffic == Traffic::Tcp && effect == Effect::Allow && uses_http_fields(rule) {
        return false;
    }
    let unknown = effect == Effect::Deny;
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, r, traffic)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, r, effect, traffic)))
        && rule.when.iter().all(|c| condition_matches(c, r, unknown, traffic))
}

/// Decides a request under the authorization policies that apply to it.
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a wp::Policy>, r: &RequestAttrs<'_>) -> Decision {
    decide(policies, r, Traffic::Http)
}

/// Decides a connection proxied as opaque TCP under the policies that apply to it.
pub fn evaluate_tcp<'a>(policies: impl IntoIterator<Item = &'a wp::Policy>, c: &ConnectionAttrs<'_>) -> Decision {
    let headers = HeaderMap::new();
    let r = RequestAttrs {
        source_principal: c.source_principal,
        source_namespace: c.source_namespace,
        source_ip: c.source_ip,
        remote_ip: c.source_ip,
        request_principal: None,
        host: "",
        port: c.port,
        method: "",
        path: "",
        headers: &headers,
    };
    decide(policies, &r, Traffic::Tcp)
}

fn decide<'a>(policies: impl IntoIterator<Item = &'a wp::Policy>, r: &RequestAttrs<'_>, traffic: Traffic) -> Decision {
    decide_set(policies, r, traffic, false)
}

/// Decides under the enforced policies (`dry_run` false) or, for Istio's shadow rules, under
/// the dry-run ones alone (`dry_run` true).
fn decide_set<'a>(
    policies: impl IntoIterator<Item = &'a wp::Policy>,
    r: &RequestAttrs<'_>,
    traffic: Traffic,
    dry_run: bool,
) -> Decision {
    let mut allows = Vec::new();
    for p in policies {
        let Some(wp::policy::Kind::Authorization(a)) = &p.kind else {
            continue;
        };
        if a.dry_run != dry_run {
            continue;
        }
        match wp::Action::try_from(a.action) {
            Ok(wp::Action::Deny) => {
                if let Some(i) = a
                    .rules
                    .iter()
                    .position(|rule| rule_matches(rule, r, Effect::Deny, traffic))
                {
                    return Decision::Deny(format!("denied by {}/{} rule {i}", p.namespace, p.name));
                }
            }
            Ok(wp::Action::Allow) => allows.push(a),
            // AUDIT only marks; an action we do not know cannot grant access.
            Ok(wp::Action::Audit) => {}
            Err(_) => return Decision::Deny(format!("{}/{} has an unknown action", p.namespace, p.name)),
        }
    }
    if allows.is_empty()
        || allows
            .iter()
            .any(|a| a.rules.iter().any(|rule| rule_matches(rule, r, Effect::Allow, traffic)))
    {
        Decision::Allow
    } else {
        Decision::Deny("no ALLOW policy matched".to_owned())
    }
}

/// What AUDIT and dry-run policies saw of a request: logged and counted, never enforced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// AUDIT policies (`namespace/name`) that matched, with the first rule that did.
    pub audits: Vec<(String, usize)>,
    /// What the dry-run policies alone would decide (Istio's shadow rules), when any apply.
    pub dry_run: Option<Decision>,
}

impl Observed {
    pub fn is_empty(&self) -> bool {
        self.audits.is_empty() && self.dry_run.is_none()
    }
}

/// The AUDIT matches and the dry-run decision for a request. `policies` is walked twice at
/// most and nothing is allocated unless an AUDIT policy matches.
pub fn observe<'a, I>(policies: impl Fn() -> I, r: &RequestAttrs<'_>) -> Observed
where
    I: Iterator<Item = &'a wp::Policy>,
{
    let mut out = Observed::default();
    let mut any_dry_run = false;
    for p in policies() {
        let Some(wp::policy::Kind::Authorization(a)) = &p.kind else {
            continue;
        };
        any_dry_run |= a.dry_run;
        if a.action == wp::Action::Audit as i32 && !a.dry_run {
            let effect = Effect::Allow;
            if let Some(i) = a
                .rules
                .iter()
                .position(|rule| rule_matches(rule, r, effect, Traffic::Http))
            {
                out.audits.push((format!("{}/{}", p.namespace, p.name), i));
            }
        }
    }
    if any_dry_run {
        out.dry_run = Some(decide_set(policies(), r, Traffic::Http, true));
    }
    out
}

/// One authorization policy considered for a request, for explaining a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Considered {
    /// `namespace/name`.
    pub policy: String,
    pub action: wp::Action,
    /// Logged, never enforced.
    pub dry_run: bool,
    /// The first rule (0-based) that matched.
    pub matched_rule: Option<usize>,
}

/// [`evaluate`]'s decision with every authorization policy it considered and the rule of each
/// that matched, for `meshctl explain`. Not on the request path.
pub fn evaluate_traced<'a>(
    policies: impl IntoIterator<Item = &'a wp::Policy>,
    r: &RequestAttrs<'_>,
) -> (Decision, Vec<Considered>) {
    let policies: Vec<&wp::Policy> = policies.into_iter().collect();
    let mut considered = Vec::new();
    for p in &policies {
        let Some(wp::policy::Kind::Authorization(a)) = &p.kind else {
            continue;
        };
        let action = wp::Action::try_from(a.action).unwrap_or(wp::Action::Deny);
        let effect = if action == wp::Action::Allow {
            Effect::Allow
        } else {
            Effect::Deny
        };
        considered.push(Considered {
            policy: format!("{}/{}", p.namespace, p.name),
            action,
            dry_run: a.dry_run,
            matched_rule: a
                .rules
                .iter()
                .position(|rule| rule_matches(rule, r, effect, Traffic::Http)),
        });
    }
    (decide(policies, r, Traffic::Http), considered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs<'a>(principal: &'a str, method: &'a str, path: &'a str, headers: &'a HeaderMap) -> RequestAttrs<'a> {
        RequestAttrs {
            source_principal: principal,
            source_namespace: principal.split('/').nth(2).unwrap_or(""),
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: "10.0.0.1".parse().unwrap(),
            request_principal: None,
            host: "payments.shop.svc.cluster.local:8080",
            port: 8080,
            method,
            path,
            headers,
        }
    }

    fn policy(action: wp::Action, rules: Vec<wp::Rule>) -> wp::Policy {
        wp::Policy {
            name: "p".into(),
            namespace: "shop".into(),
            targets: vec![],
            kind: Some(wp::policy::Kind::Authorization(wp::Authorization {
                action: action as i32,
                rules,
                dry_run: false,
            })),
        }
    }

    fn dry_run(mut p: wp::Policy, name: &str) -> wp::Policy {
        p.name = name.into();
        if let Some(wp::policy::Kind::Authorization(a)) = &mut p.kind {
            a.dry_run = true;
        }
        p
    }

    #[test]
    fn audit_and_dry_run_are_observed_never_enforced() {
        let h = HeaderMap::new();
        let order = attrs("cluster.local/ns/shop/sa/order-service", "POST", "/api/v1/payments", &h);
        let frontend = attrs("cluster.local/ns/shop/sa/frontend", "POST", "/api/v1/payments", &h);
        let deny_all = policy(wp::Action::Deny, vec![wp::Rule::default()]);
        let mut audit = policy(wp::Action::Audit, vec![wp::Rule::default()]);
        audit.name = "audit-all".into();
        // A dry-run ALLOW that only order-service matches, and a dry-run DENY of everything.
        let policies = [
            payments(),
            audit,
            dry_run(payments(), "allow-dry"),
            dry_run(deny_all, "deny-dry"),
        ];

        // Enforced: only `payments` decides; the dry-run DENY of everything changes nothing.
        assert_eq!(evaluate(&policies, &order), Decision::Allow);
        assert!(matches!(evaluate(&policies, &frontend), Decision::Deny(_)));

        let seen = observe(|| policies.iter(), &order);
        assert_eq!(seen.audits, vec![("shop/audit-all".to_owned(), 0)]);
        assert_eq!(
            seen.dry_run,
            Some(Decision::Deny("denied by shop/deny-dry rule 0".into()))
        );

        // Without the dry-run DENY, the shadow rules allow order-service and deny frontend.
        let shadow = [policies[0].clone(), policies[2].clone()];
        assert_eq!(observe(|| shadow.iter(), &order).dry_run, Some(Decision::Allow));
        assert_eq!(
            observe(|| shadow.iter(), &frontend).dry_run,
            Some(Decision::Deny("no ALLOW policy matched".into()))
        );
        // Nothing to observe: no allocation, nothing logged.
        assert!(observe(|| policies[..1].iter(), &order).is_empty());
    }

    fn payments() -> wp::Policy {
        policy(
            wp::Action::Allow,
            vec![wp::Rule {
                from: vec![wp::Source {
                    principals: vec!["cluster.local/ns/shop/sa/order-service".into()],
                    ..Default::default()
                }],
                to: vec![wp::Operation {
                    methods: vec!["POST".into()],
                    paths: vec!["/api/v1/payments*".into()],
                    ..Default::default()
                }],
                when: vec![],
            }],
        )
    }

    #[test]
    fn payment_policy() {
        let h = HeaderMap::new();
        let p = [payments()];
        let order = "cluster.local/ns/shop/sa/order-service";
        assert_eq!(
            evaluate(&p, &attrs(order, "POST", "/api/v1/payments", &h)),
            Decision::Allow
        );
        assert_ne!(
            evaluate(&p, &attrs(order, "GET", "/api/v1/payments", &h)),
            Decision::Allow
        );
        assert_ne!(
            evaluate(&p, &attrs(order, "POST", "/api/v1/refunds", &h)),
            Decision::Allow
        );
        let other = "cluster.local/ns/shop/sa/frontend";
        assert_ne!(
            evaluate(&p, &attrs(other, "POST", "/api/v1/payments", &h)),
            Decision::Allow
        );
    }

    #[test]
    fn empty_allow_denies_everything_and_deny_wins() {
        let h = HeaderMap::new();
        let a = attrs("cluster.local/ns/a/sa/b", "GET", "/", &h);
        assert_ne!(evaluate(&[policy(wp::Action::Allow, vec![])], &a), Decision::Allow);
        let deny_all = policy(wp::Action::Deny, vec![wp::Rule::default()]);
        assert_ne!(evaluate(&[payments(), deny_all], &a), Decision::Allow);
        assert_eq!(evaluate(&[], &a), Decision::Allow);
    }

    /// What the controller sends for an invalid policy targeting a gateway: a DENY with one
    /// empty rule. Every request and connection at that gateway is denied, even when a valid
    /// ALLOW there matches (an ALLOW without rules would not be enough); another gateway is
    /// not affected.
    #[test]
    fn an_invalid_policys_stand_in_denies_everything_at_its_target() {
        let public = vec![wp::Target {
            kind: "Gateway".into(),
            namespace: "shop".into(),
            name: "public".into(),
        }];
        let mut stand_in = policy(wp::Action::Deny, vec![wp::Rule::default()]);
        stand_in.targets = public.clone();
        let mut allow_all = policy(wp::Action::Allow, vec![wp::Rule::default()]);
        allow_all.targets = public;
        allow_all.name = "allow-all".into();
        let policies = [stand_in, allow_all];
        let at = |gw: (&'static str, &'static str)| policies.iter().filter(move |p| crate::policy::applies(p, gw, gw));
        let h = HeaderMap::new();
        let a = attrs("", "GET", "/", &h);
        let public = ("shop", "public");
        assert_eq!(
            evaluate(at(public), &a),
            Decision::Deny("denied by shop/p rule 0".into())
        );
        assert!(matches!(
            evaluate_tcp(at(public), &tcp("td/ns/shop/sa/x")),
            Decision::Deny(_)
        ));
        assert_eq!(at(("shop", "other")).count(), 0);
    }

    /// Path templates in `paths` and `notPaths`, one policy per row: (action, paths,
    /// notPaths, request path, allowed). An invalid template (the controller refuses them)
    /// denies in a DENY and allows nothing in an ALLOW, in either field.
    #[test]
    fn path_templates_decide_and_invalid_ones_fail_closed() {
        use wp::Action::{Allow, Deny};
        type Row<'a> = (wp::Action, &'a [&'a str], &'a [&'a str], &'a str, bool);
        let rows: &[Row<'_>] = &[
            (Deny, &["/admin/{**}"], &[], "/admin/users/1", false),
            (Deny, &["/admin/{**}"], &[], "/admin/", false),
            (Deny, &["/admin/{**}"], &[], "/admin", true),
            (Deny, &["/admin/{**}"], &[], "/public", true),
            // A character the template's operators do not read: denied all the same.
            (Deny, &["/admin/{**}"], &[], "/admin/{x}", false),
            (Deny, &["/api/{*}/secret"], &[], "/api/v1/secret", false),
            (Deny, &["/api/{*}/secret"], &[], "/api/v1/x/secret", true),
            (Deny, &[], &["/public/{**}"], "/public/a", true),
            (Deny, &[], &["/public/{**}"], "/private/a", false),
            (Allow, &["/api/{*}/items"], &[], "/api/v1/items", true),
            (Allow, &["/api/{*}/items"], &[], "/api/v1/items/2", false),
            (Allow, &["/api/{*}/items"], &[], "/api/{v1}/items", false),
            (Allow, &["/{**}"], &["/admin/{**}"], "/admin/x", false),
            (Allow, &["/{**}"], &["/admin/{**}"], "/shop/x", true),
            (Deny, &["/{**}/admin"], &[], "/a/b/admin", false),
            (Deny, &["/{**}/admin"], &[], "/x", true),
            // Invalid templates: a DENY denies, an ALLOW allows nothing.
            (Deny, &["/{**}/{*}"], &[], "/x", false),
            (Deny, &[], &["/public/{*}.html"], "/public/a.html", false),
            (Allow, &["/api/{*}.json"], &[], "/api/a.json", false),
            (Allow, &["/{**}"], &["/a/{**}/{*}"], "/b", false),
            // Istio's `*` forms are unchanged.
            (Deny, &["/admin*"], &[], "/admin/x", false),
        ];
        let h = HeaderMap::new();
        for &(action, paths, not_paths, path, allowed) in rows {
            let strings = |v: &[&str]| v.iter().map(|p| (*p).to_owned()).collect();
            let p = policy(
                action,
                vec![to(wp::Operation {
                    paths: strings(paths),
                    not_paths: strings(not_paths),
                    ..Default::default()
                })],
            );
            let decision = evaluate(&[p], &attrs("td/ns/shop/sa/x", "GET", path, &h));
            assert_eq!(
                decision == Decision::Allow,
                allowed,
                "{action:?} paths {paths:?} notPaths {not_paths:?} {path}: {decision:?}"
            );
        }
    }

    #[test]
    fn header_not_values_and_unknown_keys_fail_closed() {
        let rule = |key: &str| wp::Rule {
            when: vec![wp::Condition {
                key: key.into(),
                values: vec![],
                not_values: vec!["blocked*".into()],
            }],
            ..Default::default()
        };
        let allow = [policy(wp::Action::Allow, vec![rule("request.headers[x-tier]")])];
        let mut h = HeaderMap::new();
        h.insert("x-tier", "gold".parse().unwrap());
        assert_eq!(
            evaluate(&allow, &attrs("td/ns/a/sa/b", "GET", "/", &h)),
            Decision::Allow
        );
        h.insert("x-tier", "blocked-user".parse().unwrap());
        assert_ne!(
            evaluate(&allow, &attrs("td/ns/a/sa/b", "GET", "/", &h)),
            Decision::Allow
        );
        let h = HeaderMap::new();
        let unknown_allow = [policy(wp::Action::Allow, vec![rule("experimental.foo")])];
        assert_ne!(
            evaluate(&unknown_allow, &attrs("td/ns/a/sa/b", "GET", "/", &h)),
            Decision::Allow
        );
        let unknown_deny = [policy(wp::Action::Deny, vec![rule("experimental.foo")])];
        assert_ne!(
            evaluate(&unknown_deny, &attrs("td/ns/a/sa/b", "GET", "/", &h)),
            Decision::Allow
        );
    }

    #[test]
    fn not_forms_and_ip_blocks() {
        let h = HeaderMap::new();
        let p = [policy(
            wp::Action::Deny,
            vec![wp::Rule {
                from: vec![wp::Source {
                    not_namespaces: vec!["shop".into()],
                    ip_blocks: vec!["10.0.0.0/8".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        )];
        assert_eq!(evaluate(&p, &attrs("td/ns/shop/sa/x", "GET", "/", &h)), Decision::Allow);
        assert_ne!(
            evaluate(&p, &attrs("td/ns/other/sa/x", "GET", "/", &h)),
            Decision::Allow
        );
    }

    #[test]
    fn a_client_without_identity_matches_no_principal_and_remote_ip_is_its_own() {
        let h = HeaderMap::new();
        let allow_any_peer = [policy(
            wp::Action::Allow,
            vec![wp::Rule {
                from: vec![wp::Source {
                    principals: vec!["*".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        )];
        // An ingress client has no SPIFFE identity: "*" (any authenticated peer) must not match.
        assert_ne!(evaluate(&allow_any_peer, &attrs("", "GET", "/", &h)), Decision::Allow);
        assert_eq!(
            evaluate(&allow_any_peer, &attrs("td/ns/a/sa/b", "GET", "/", &h)),
            Decision::Allow
        );
        let deny_remote = [policy(
            wp::Action::Deny,
            vec![wp::Rule {
                from: vec![wp::Source {
                    remote_ip_blocks: vec!["203.0.113.0/24".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        )];
        let mut a = attrs("", "GET", "/", &h);
        assert_eq!(evaluate(&deny_remote, &a), Decision::Allow, "the peer is 10.0.0.1");
        a.remote_ip = "203.0.113.7".parse().unwrap();
        assert_ne!(
            evaluate(&deny_remote, &a),
            Decision::Allow,
            "the original client is denied"
        );
        let deny_peer = [policy(
            wp::Action::Deny,
            vec![wp::Rule {
                from: vec![wp::Source {
                    ip_blocks: vec!["203.0.113.0/24".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        )];
        assert_eq!(
            evaluate(&deny_peer, &a),
            Decision::Allow,
            "ipBlocks is the peer's address"
        );
    }

    fn tcp(principal: &str) -> ConnectionAttrs<'_> {
        ConnectionAttrs {
            source_principal: principal,
            source_namespace: principal.split('/').nth(2).unwrap_or(""),
            source_ip: "10.0.0.1".parse().unwrap(),
            port: 8080,
        }
    }

    fn to(op: wp::Operation) -> wp::Rule {
        wp::Rule {
            to: vec![op],
            ..Default::default()
        }
    }

    fn when(key: &str, values: &[&str]) -> wp::Rule {
        wp::Rule {
            when: vec![wp::Condition {
                key: key.into(),
                values: values.iter().map(|v| (*v).to_owned()).collect(),
                not_values: vec![],
            }],
            ..Default::default()
        }
    }

    fn from_ns(ns: &str) -> wp::Source {
        wp::Source {
            namespaces: vec![ns.into()],
            ..Default::default()
        }
    }

    /// Istio's rule for traffic that is not HTTP, one policy per row: (policy, the decision
    /// for a TCP connection from `shop`, and whether the policy forces HTTP).
    #[test]
    fn tcp_ignores_http_fields_in_deny_and_they_allow_nothing() {
        let paths = |p: &str| wp::Operation {
            paths: vec![p.into()],
            ..Default::default()
        };
        let methods = wp::Operation {
            methods: vec!["GET".into()],
            ..Default::default()
        };
        let hosts = wp::Operation {
            hosts: vec!["admin.example".into()],
            ..Default::default()
        };
        let port = |p: u32| wp::Operation {
            ports: vec![p],
            ..Default::default()
        };
        let request_principals = wp::Rule {
            from: vec![wp::Source {
                request_principals: vec!["*".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let deny_other_ns_paths = wp::Rule {
            from: vec![from_ns("other")],
            to: vec![paths("/admin*")],
            when: vec![],
        };
        let allow_mixed = vec![
            to(paths("/public*")),
            wp::Rule {
                from: vec![from_ns("shop")],
                ..Default::default()
            },
        ];
        use wp::Action::{Allow, Deny};
        let rows: Vec<(&str, wp::Policy, bool, bool)> = vec![
            ("DENY paths", policy(Deny, vec![to(paths("/admin*"))]), false, true),
            ("DENY methods", policy(Deny, vec![to(methods.clone())]), false, true),
            ("DENY hosts", policy(Deny, vec![to(hosts.clone())]), false, true),
            (
                "DENY requestPrincipals",
                policy(Deny, vec![request_principals.clone()]),
                false,
                true,
            ),
            (
                "DENY request.headers",
                policy(Deny, vec![when("request.headers[x-a]", &["1"])]),
                false,
                true,
            ),
            (
                "DENY request.auth.claims",
                policy(Deny, vec![when("request.auth.claims[group]", &["x"])]),
                false,
                true,
            ),
            // The L4 part of a DENY rule still has to match.
            (
                "DENY paths from another ns",
                policy(Deny, vec![deny_other_ns_paths]),
                true,
                true,
            ),
            ("DENY port 9090", policy(Deny, vec![to(port(9090))]), true, false),
            ("DENY port 8080", policy(Deny, vec![to(port(8080))]), false, false),
            ("ALLOW paths", policy(Allow, vec![to(paths("/*"))]), false, true),
            ("ALLOW methods", policy(Allow, vec![to(methods)]), false, true),
            ("ALLOW hosts", policy(Allow, vec![to(hosts)]), false, true),
            (
                "ALLOW requestPrincipals",
                policy(Allow, vec![request_principals]),
                false,
                true,
            ),
            (
                "ALLOW request.headers",
                policy(Allow, vec![when("request.headers[x-a]", &["1"])]),
                false,
                true,
            ),
            (
                "ALLOW source.namespace",
                policy(Allow, vec![when("source.namespace", &["shop"])]),
                true,
                false,
            ),
            (
                "ALLOW from shop",
                policy(
                    Allow,
                    vec![wp::Rule {
                        from: vec![from_ns("shop")],
                        ..Default::default()
                    }],
                ),
                true,
                false,
            ),
            // One L4 rule is enough; the HTTP-only rule beside it allows nothing on TCP.
            ("ALLOW mixed", policy(Allow, allow_mixed), true, true),
        ];
        let headers = HeaderMap::new();
        for (name, p, allowed, http) in rows {
            let one = [p];
            let decision = evaluate_tcp(&one, &tcp("td/ns/shop/sa/client"));
            assert_eq!(decision == Decision::Allow, allowed, "{name}: {decision:?}");
            assert_eq!(needs_http(&one[0]), http, "{name}: needs_http");
            // On HTTP a request the HTTP-only fields do not name is decided by them.
            if name == "DENY paths" {
                let a = attrs("td/ns/shop/sa/client", "GET", "/", &headers);
                assert_eq!(evaluate(&one, &a), Decision::Allow);
            }
        }
        let jwt = wp::Policy {
            kind: Some(wp::policy::Kind::Jwt(wp::JwtAuthentication::default())),
            ..payments()
        };
        assert!(needs_http(&jwt), "RequestAuthentication needs HTTP");
    }
}
