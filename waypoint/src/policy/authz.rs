//! L7 authorization with Istio's semantics, evaluated per request against the original
//! client's SPIFFE identity: any matching DENY denies; if ALLOW policies apply, one must
//! match; AUDIT never changes the decision. An unknown condition key makes a DENY rule match
//! and an ALLOW rule miss, so a mistake never opens access.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;
use mesh_proto::waypoint as wp;

use super::jwt::RequestPrincipal;

/// What policies see of one request.
pub struct RequestAttrs<'a> {
    /// SPIFFE identity without the scheme: `td/ns/x/sa/y`.
    pub source_principal: &'a str,
    pub source_namespace: &'a str,
    pub source_ip: IpAddr,
    pub request_principal: Option<&'a RequestPrincipal>,
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
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

fn source_matches(s: &wp::Source, r: &RequestAttrs<'_>) -> bool {
    let principal = r.source_principal;
    let req_principal = r.request_principal.map(|p| p.principal());
    field(&s.principals, &s.not_principals, |ps| any_wildcard(ps, principal))
        && field(&s.namespaces, &s.not_namespaces, |ns| {
            any_wildcard(ns, r.source_namespace)
        })
        && field(&s.ip_blocks, &s.not_ip_blocks, |b| in_blocks(b, r.source_ip))
        && field(&s.remote_ip_blocks, &s.not_remote_ip_blocks, |b| {
            in_blocks(b, r.source_ip)
        })
        && field(&s.request_principals, &s.not_request_principals, |ps| {
            req_principal.as_deref().is_some_and(|p| any_wildcard(ps, p))
        })
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

fn operation_matches(o: &wp::Operation, r: &RequestAttrs<'_>) -> bool {
    let port_in = |ports: &[u32]| ports.contains(&u32::from(r.port));
    (o.ports.is_empty() || port_in(&o.ports))
        && (o.not_ports.is_empty() || !port_in(&o.not_ports))
        && field(&o.hosts, &o.not_hosts, |h| host_matches(h, r.host))
        && field(&o.methods, &o.not_methods, |m| any_wildcard(m, r.method))
        && field(&o.paths, &o.not_paths, |p| any_wildcard(p, r.path))
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
        "source.ip" | "remote.ip" => one(Some(r.source_ip.to_string())),
        "source.namespace" => one(Some(r.source_namespace.to_owned())),
        "source.principal" => one(Some(r.source_principal.to_owned())),
        "destination.port" => one(Some(r.port.to_string())),
        _ => None,
    }
}

fn condition_matches(c: &wp::Condition, r: &RequestAttrs<'_>, unknown: bool) -> bool {
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

fn rule_matches(rule: &wp::Rule, r: &RequestAttrs<'_>, unknown: bool) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, r)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, r)))
        && rule.when.iter().all(|c| condition_matches(c, r, unknown))
}

/// Decides a request under the authorization policies that apply to it.
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a wp::Policy>, r: &RequestAttrs<'_>) -> Decision {
    let mut allows = Vec::new();
    for p in policies {
        let Some(wp::policy::Kind::Authorization(a)) = &p.kind else {
            continue;
        };
        match wp::Action::try_from(a.action) {
            Ok(wp::Action::Deny) => {
                if a.rules.iter().any(|rule| rule_matches(rule, r, true)) {
                    return Decision::Deny(format!("denied by {}/{}", p.namespace, p.name));
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
            .any(|a| a.rules.iter().any(|rule| rule_matches(rule, r, false)))
    {
        Decision::Allow
    } else {
        Decision::Deny("no ALLOW policy matched".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs<'a>(principal: &'a str, method: &'a str, path: &'a str, headers: &'a HeaderMap) -> RequestAttrs<'a> {
        RequestAttrs {
            source_principal: principal,
            source_namespace: principal.split('/').nth(2).unwrap_or(""),
            source_ip: "10.0.0.1".parse().unwrap(),
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
            })),
        }
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
}
