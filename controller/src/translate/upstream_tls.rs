//! TLS origination at the waypoint, as Istio's waypoint does it: DestinationRule
//! `trafficPolicy.tls` (and `portLevelSettings[].tls`) becomes the routes' `UpstreamTls`, and
//! the Secrets its `credentialName`s name become the `WaypointCredentials` of the waypoint in
//! front of the host. Those carry private keys, so they are a separate resource named after
//! the waypoint's identity, which the xDS server sends to that identity only (as it does
//! ingress gateways' certificates). The Secret must be in the waypoint's namespace, and the
//! DestinationRule too: a rule elsewhere must not make a waypoint present its namespace's
//! client certificate to a server that rule chose.

use std::collections::BTreeMap;

use mesh_proto::waypoint as wp;

use super::attach::Attachments;
use super::{Options, Report};
use crate::model::istio::{ClientTls, TrafficPolicy};
use crate::model::{Inputs, Kind, ObjectKey, Secret};

/// Where a DestinationRule's host is: the key of its service, and whether it is a
/// ServiceEntry host (outside the mesh's identities: ISTIO_MUTUAL cannot apply).
pub(super) struct Host {
    pub service: String,
    pub service_entry: bool,
}

/// The service a DestinationRule `host` names: a ServiceEntry host (the rule's namespace
/// first, then any other: entries are exported everywhere by default) is `<ns>/<host>`;
/// anything else is a Kubernetes Service name (`fallback`).
pub(super) fn host(inputs: &Inputs, host: &str, namespace: &str, fallback: impl FnOnce() -> String) -> Host {
    let with_host = || {
        inputs
            .service_entries
            .iter()
            .filter(|(_, se)| se.spec.hosts.iter().any(|h| h == host))
            .map(|(k, _)| k)
    };
    let found = with_host()
        .find(|k| k.namespace == namespace)
        .or_else(|| with_host().next());
    match found {
        Some(key) => Host {
            service: format!("{}/{host}", key.namespace),
            service_entry: true,
        },
        None => Host {
            service: fallback(),
            service_entry: false,
        },
    }
}

/// One ClientTLSSettings as the waypoint applies it; `None` when nothing is originated
/// (ISTIO_MUTUAL on a mesh service: HBONE already is mutual TLS).
fn client_tls(t: &ClientTls, key: &ObjectKey, at: &str, host: &Host, report: &mut Report) -> Option<wp::UpstreamTls> {
    let kind = Kind::DestinationRule;
    let mode = t.mode.clone().unwrap_or_else(|| "DISABLE".to_owned());
    match mode.as_str() {
        "DISABLE" | "SIMPLE" | "MUTUAL" => {}
        "ISTIO_MUTUAL" if !host.service_entry => return None,
        "ISTIO_MUTUAL" => {
            // Sent as is: the waypoint refuses a mode it cannot apply, never sends plaintext.
            report.add(
                kind,
                key,
                format!("{at}.mode ISTIO_MUTUAL on ServiceEntry host {}: an external server has no mesh identity; requests fail", host.service),
            );
        }
        other => {
            report.add(
                kind,
                key,
                format!("{at}.mode {other:?} is not a TLS mode; requests fail"),
            );
        }
    }
    for (field, value) in [
        ("caCertificates", &t.ca_certificates),
        ("clientCertificate", &t.client_certificate),
        ("privateKey", &t.private_key),
    ] {
        if value.is_some() {
            report.add(
                kind,
                key,
                format!("{at}.{field}: file paths are not available to a waypoint pod; use credentialName"),
            );
        }
    }
    if mode == "MUTUAL" && t.credential_name.is_none() {
        report.add(
            kind,
            key,
            format!("{at}: MUTUAL needs credentialName (the client certificate); requests fail"),
        );
    }
    for san in &t.subject_alt_names {
        if san.contains("://") || san.is_empty() {
            report.add(
                kind,
                key,
                format!("{at}.subjectAltNames: {san:?} is not a DNS name or IP address; no certificate matches it"),
            );
        }
    }
    Some(wp::UpstreamTls {
        mode,
        sni: t.sni.clone().unwrap_or_default(),
        subject_alt_names: t.subject_alt_names.clone(),
        insecure_skip_verify: t.insecure_skip_verify == Some(true),
        credential: t
            .credential_name
            .as_ref()
            .map(|n| format!("{}/{n}", key.namespace))
            .unwrap_or_default(),
    })
}

/// Adds `p`'s TLS settings to its translation `out`.
pub(super) fn translate(
    p: &TrafficPolicy,
    key: &ObjectKey,
    host: &Host,
    out: &mut wp::TrafficPolicy,
    report: &mut Report,
) {
    out.tls = p
        .tls
        .as_ref()
        .and_then(|t| client_tls(t, key, "trafficPolicy.tls", host, report));
    for (i, s) in p.port_level_settings.iter().enumerate() {
        let at = format!("trafficPolicy.portLevelSettings[{i}]");
        let Some(port) = s.port.as_ref().map(|p| p.number).filter(|n| (1..=65535).contains(n)) else {
            report.add(
                Kind::DestinationRule,
                key,
                format!("{at}: no valid port.number; ignored"),
            );
            continue;
        };
        if let Some(tls) = s
            .tls
            .as_ref()
            .and_then(|t| client_tls(t, key, &format!("{at}.tls"), host, report))
        {
            out.port_tls.insert(port, tls);
        }
    }
}

/// The credential names a translated policy uses.
fn credentials_used(p: &wp::TrafficPolicy) -> impl Iterator<Item = &str> {
    p.tls
        .iter()
        .chain(p.port_tls.values())
        .map(|t| t.credential.as_str())
        .filter(|c| !c.is_empty())
}

fn secret_value(secret: &Secret, fields: &[&str]) -> Option<String> {
    fields.iter().find_map(|f| {
        if let Some(v) = secret.data.as_ref().and_then(|d| d.get(*f)) {
            return String::from_utf8(v.0.clone()).ok();
        }
        secret.string_data.as_ref().and_then(|d| d.get(*f)).cloned()
    })
}

/// The credential of Secret `key` (and its `<name>-cacert` companion, which Istio reads for
/// the CA when present), checked: a certificate with its key, a CA, or both.
fn credential(inputs: &Inputs, key: &ObjectKey) -> Result<wp::UpstreamCredential, String> {
    let secret = inputs
        .secrets
        .get(key)
        .ok_or_else(|| format!("Secret {key} does not exist"))?;
    let cert = secret_value(secret, &["tls.crt", "cert"]).unwrap_or_default();
    let private = secret_value(secret, &["tls.key", "key"]).unwrap_or_default();
    let companion = ObjectKey::new(&key.namespace, format!("{}-cacert", key.name));
    let ca = inputs
        .secrets
        .get(&companion)
        .and_then(|s| secret_value(s, &["cacert", "ca.crt"]))
        .or_else(|| secret_value(secret, &["ca.crt", "cacert"]))
        .unwrap_or_default();
    match (cert.is_empty(), private.is_empty()) {
        (false, false) => super::ingress::check_pair(cert.as_bytes(), private.as_bytes())
            .map_err(|e| format!("Secret {key}: {}", e.replace("tls.", "")))?,
        (true, true) if !ca.is_empty() => {}
        _ => return Err(format!("Secret {key} has neither a certificate with its key nor a CA")),
    }
    if !ca.is_empty() && !ca.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("Secret {key}: the CA is not PEM certificates"));
    }
    Ok(wp::UpstreamCredential {
        secret: key.to_string(),
        cert_chain: cert,
        private_key: private,
        ca_certificates: ca,
    })
}

/// The waypoint gateway in front of service `service` (a ServiceEntry's or a Kubernetes
/// Service's `istio.io/use-waypoint`).
fn waypoint_of(inputs: &Inputs, options: &Options, attach: &Attachments<'_>, service: &str) -> Option<ObjectKey> {
    let (ns, hostname) = service.split_once('/')?;
    let from_entry = inputs
        .service_entries
        .iter()
        .filter(|(k, se)| k.namespace == ns && se.spec.hosts.iter().any(|h| h == hostname))
        .find_map(|(_, se)| attach.waypoint_key(&se.metadata, ns));
    from_entry.or_else(|| {
        let name = hostname.strip_suffix(&format!(".{ns}.svc.{}", options.domain_suffix))?;
        let svc = inputs.services.get(&ObjectKey::new(ns, name))?;
        attach.waypoint_key(&svc.metadata, ns)
    })
}

/// `WaypointCredentials` by `<ns>/<service account>` of each waypoint whose routes use a
/// credential; a credential that cannot be served is a problem on the DestinationRule (the
/// waypoint then fails those requests).
pub(super) fn credentials(
    inputs: &Inputs,
    options: &Options,
    attach: &Attachments<'_>,
    routes: &BTreeMap<String, wp::ServiceRoutes>,
    report: &mut Report,
) -> BTreeMap<String, wp::WaypointCredentials> {
    let mut out: BTreeMap<String, wp::WaypointCredentials> = BTreeMap::new();
    for (service, r) in routes {
        let Some(dr) = r.sources.iter().find_map(|s| s.strip_prefix("DestinationRule/")) else {
            continue;
        };
        let Some((dr_ns, dr_name)) = dr.split_once('/') else {
            continue;
        };
        let dr_key = ObjectKey::new(dr_ns, dr_name);
        let policies = r
            .traffic_policy
            .iter()
            .chain(r.subsets.iter().filter_map(|s| s.traffic_policy.as_ref()));
        let used: std::collections::BTreeSet<&str> = policies.flat_map(credentials_used).collect();
        if used.is_empty() {
            continue;
        }
        let Some(wp_key) = waypoint_of(inputs, options, attach, service) else {
            report.add(
                Kind::DestinationRule,
                &dr_key,
                format!("credentialName for {service}, which has no waypoint: only a waypoint originates TLS"),
            );
            continue;
        };
        let Some(waypoint) = attach.waypoint(&wp_key) else {
            continue;
        };
        let sa = &waypoint.deployment.service_account;
        for name in used {
            let Some((secret_ns, secret_name)) = name.split_once('/') else {
                continue;
            };
            if secret_ns != wp_key.namespace {
                report.add(
                    Kind::DestinationRule,
                    &dr_key,
                    format!(
                        "credentialName {secret_name}: the DestinationRule must be in the namespace of waypoint {wp_key}, \
                         whose Secrets it names; requests fail"
                    ),
                );
                continue;
            }
            match credential(inputs, &ObjectKey::new(secret_ns, secret_name)) {
                Ok(c) => {
                    let entry =
                        out.entry(format!("{}/{sa}", wp_key.namespace))
                            .or_insert_with(|| wp::WaypointCredentials {
                                namespace: wp_key.namespace.clone(),
                                service_account: sa.clone(),
                                credentials: Vec::new(),
                            });
                    if !entry.credentials.iter().any(|e| e.secret == c.secret) {
                        entry.credentials.push(c);
                    }
                }
                Err(e) => report.add(
                    Kind::DestinationRule,
                    &dr_key,
                    format!("credentialName: {e}; requests fail"),
                ),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{translate as translate_all, Options, Outputs};
    use crate::model::Inputs;
    use crate::source::manifest_dir::{parse_text, Loaded};

    /// The egress waypoint `egress/waypoint` and `api.external.test` (port 80 -> 443) through it.
    const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: egress}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: egress}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [api.external.test]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: DNS
  endpoints: [{address: 10.90.1.200}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: egress}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
"#;

    fn pem_pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["client.egress".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn indent(pem: &str) -> String {
        pem.lines().map(|l| format!("    {l}\n")).collect()
    }

    /// A Secret with `fields` (name, PEM), of type Opaque.
    fn secret(ns: &str, name: &str, fields: &[(&str, &str)]) -> String {
        let data: String = fields.iter().map(|(k, v)| format!("  {k}: |\n{}", indent(v))).collect();
        format!("---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\nstringData:\n{data}")
    }

    fn dr(ns: &str, host: &str, policy: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: tls, namespace: {ns}}}\n\
             spec:\n  host: {host}\n  trafficPolicy:\n{}",
            policy.lines().map(|l| format!("    {l}\n")).collect::<String>()
        )
    }

    fn run(yaml: &str) -> (Outputs, Vec<String>) {
        let mut loaded = Loaded::default();
        parse_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut inputs = Inputs::default();
        loaded.objects.into_iter().for_each(|o| inputs.apply(o));
        let out = translate_all(&inputs, &Options::default());
        let problems = out
            .problems
            .iter()
            .filter(|p| p.kind == crate::model::Kind::DestinationRule)
            .map(|p| p.message.clone())
            .collect();
        (out, problems)
    }

    fn tls_of(out: &Outputs) -> Option<mesh_proto::waypoint::UpstreamTls> {
        out.service_routes["egress/api.external.test"]
            .traffic_policy
            .as_ref()
            .and_then(|p| p.tls.clone())
    }

    #[test]
    fn simple_sni_and_names_on_a_service_entry_host() {
        let policy = "tls: {mode: SIMPLE, sni: api.example.org, subjectAltNames: [api.example.org]}";
        let (out, problems) = run(&(WORLD.to_owned() + &dr("egress", "api.external.test", policy)));
        assert!(problems.is_empty(), "{problems:?}");
        let tls = tls_of(&out).expect("tls on the entry's routes, keyed <ns>/<host>");
        assert_eq!(
            (tls.mode.as_str(), tls.sni.as_str(), tls.subject_alt_names.as_slice()),
            ("SIMPLE", "api.example.org", &["api.example.org".to_owned()][..])
        );
        assert!(!tls.insecure_skip_verify && tls.credential.is_empty());
        assert!(out.waypoint_credentials.is_empty(), "no credential named");
    }

    #[test]
    fn modes_and_insecure_skip_verify_table() {
        // (policy, mode sent (None: no TLS), insecure, problem expected)
        let table: &[(&str, Option<&str>, bool, Option<&str>)] = &[
            ("tls: {mode: DISABLE}", Some("DISABLE"), false, None),
            (
                "tls: {mode: SIMPLE, insecureSkipVerify: false}",
                Some("SIMPLE"),
                false,
                None,
            ),
            (
                "tls: {mode: SIMPLE, insecureSkipVerify: true}",
                Some("SIMPLE"),
                true,
                None,
            ),
            ("tls: {mode: SIMPLE}", Some("SIMPLE"), false, None),
            (
                "tls: {mode: ISTIO_MUTUAL}",
                Some("ISTIO_MUTUAL"),
                false,
                Some("ISTIO_MUTUAL on ServiceEntry host"),
            ),
            (
                "tls: {mode: SIMPLE, caCertificates: /etc/ca.pem}",
                Some("SIMPLE"),
                false,
                Some("file paths"),
            ),
            (
                "tls: {mode: MUTUAL}",
                Some("MUTUAL"),
                false,
                Some("MUTUAL needs credentialName"),
            ),
            ("tls: {mode: BOGUS}", Some("BOGUS"), false, Some("not a TLS mode")),
            (
                "tls: {mode: SIMPLE, subjectAltNames: [\"spiffe://x/ns/a/sa/b\"]}",
                Some("SIMPLE"),
                false,
                Some("not a DNS name"),
            ),
            ("connectionPool: {tcp: {maxConnections: 3}}", None, false, None),
        ];
        for (policy, mode, insecure, problem) in table {
            let (out, problems) = run(&(WORLD.to_owned() + &dr("egress", "api.external.test", policy)));
            let tls = tls_of(&out);
            assert_eq!(tls.as_ref().map(|t| t.mode.as_str()), *mode, "{policy}");
            assert_eq!(tls.is_some_and(|t| t.insecure_skip_verify), *insecure, "{policy}");
            match problem {
                Some(p) => assert!(problems.iter().any(|m| m.contains(p)), "{policy}: {problems:?}"),
                None => assert!(problems.is_empty(), "{policy}: {problems:?}"),
            }
        }
    }

    #[test]
    fn istio_mutual_on_a_mesh_service_is_hbone_already() {
        let (out, problems) = run(&(WORLD.to_owned() + &dr("egress", "web", "tls: {mode: ISTIO_MUTUAL}")));
        assert!(problems.is_empty(), "{problems:?}");
        let routes = &out.service_routes["egress/web.egress.svc.cluster.local"];
        assert!(routes.traffic_policy.as_ref().is_some_and(|p| p.tls.is_none()));
    }

    #[test]
    fn port_level_tls_by_service_port() {
        let policy = "portLevelSettings:\n- port: {number: 80}\n  tls: {mode: SIMPLE, sni: a.example}\n\
                      - tls: {mode: SIMPLE}\n- port: {number: 8080}\n  loadBalancer: {simple: RANDOM}";
        let (out, problems) = run(&(WORLD.to_owned() + &dr("egress", "api.external.test", policy)));
        let p = out.service_routes["egress/api.external.test"]
            .traffic_policy
            .clone()
            .expect("policy");
        assert_eq!(p.port_tls.keys().copied().collect::<Vec<_>>(), [80]);
        assert_eq!(p.port_tls[&80].sni, "a.example");
        assert!(p.tls.is_none());
        assert!(
            problems.iter().any(|m| m.contains("no valid port.number")),
            "{problems:?}"
        );
        let unimplemented = out
            .problems
            .iter()
            .any(|p| p.message.contains("portLevelSettings[2].loadBalancer"));
        assert!(
            unimplemented,
            "other port-level fields are reported: {:?}",
            out.problems
        );
    }

    #[test]
    fn mutual_credentials_go_to_the_waypoint_identity_only() {
        let (cert, key) = pem_pair();
        let (ca, _) = pem_pair();
        let yaml = WORLD.to_owned()
            + &secret(
                "egress",
                "client",
                &[("tls.crt", &cert), ("tls.key", &key), ("ca.crt", &ca)],
            )
            + &dr(
                "egress",
                "api.external.test",
                "tls: {mode: MUTUAL, credentialName: client}",
            );
        let (out, problems) = run(&yaml);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(tls_of(&out).expect("tls").credential, "egress/client");
        let names: Vec<&String> = out.waypoint_credentials.keys().collect();
        assert_eq!(names, ["egress/waypoint"], "named after the waypoint's service account");
        let c = &out.waypoint_credentials["egress/waypoint"].credentials[0];
        assert_eq!(
            (
                c.secret.as_str(),
                c.cert_chain.as_str(),
                c.private_key.as_str(),
                c.ca_certificates.as_str()
            ),
            ("egress/client", cert.as_str(), key.as_str(), ca.as_str())
        );
        // Nothing carrying the key goes anywhere else: not in the routes, not in the debug JSON.
        let routes = format!("{:?}", out.service_routes);
        assert!(!routes.contains("PRIVATE KEY"));
        assert!(!super::super::render::to_json(&out).to_string().contains("PRIVATE KEY"));
    }

    #[test]
    fn istio_key_names_and_the_cacert_companion() {
        let (cert, key) = pem_pair();
        let (ca, _) = pem_pair();
        let yaml = WORLD.to_owned()
            + &secret("egress", "client", &[("cert", &cert), ("key", &key)])
            + &secret("egress", "client-cacert", &[("cacert", &ca)])
            + &dr(
                "egress",
                "api.external.test",
                "tls: {mode: MUTUAL, credentialName: client}",
            );
        let (out, problems) = run(&yaml);
        assert!(problems.is_empty(), "{problems:?}");
        let c = &out.waypoint_credentials["egress/waypoint"].credentials[0];
        assert_eq!(
            (c.cert_chain.as_str(), c.ca_certificates.as_str()),
            (cert.as_str(), ca.as_str())
        );
        // SIMPLE with a CA-only Secret.
        let yaml = WORLD.to_owned()
            + &secret("egress", "ca-only", &[("ca.crt", &ca)])
            + &dr(
                "egress",
                "api.external.test",
                "tls: {mode: SIMPLE, credentialName: ca-only}",
            );
        let (out, problems) = run(&yaml);
        assert!(problems.is_empty(), "{problems:?}");
        let c = &out.waypoint_credentials["egress/waypoint"].credentials[0];
        assert!(c.private_key.is_empty() && c.ca_certificates == ca);
    }

    #[test]
    fn unusable_credentials_are_problems_and_never_sent() {
        let (cert, _) = pem_pair();
        let (_, other_key) = pem_pair();
        let mismatched = secret("egress", "client", &[("tls.crt", &cert), ("tls.key", &other_key)]);
        let cases: &[(String, &str)] = &[
            (String::new(), "does not exist"),
            (mismatched, "does not belong"),
            (secret("egress", "client", &[("other", "x")]), "neither a certificate"),
        ];
        for (secret_yaml, problem) in cases {
            let yaml = WORLD.to_owned()
                + secret_yaml
                + &dr(
                    "egress",
                    "api.external.test",
                    "tls: {mode: MUTUAL, credentialName: client}",
                );
            let (out, problems) = run(&yaml);
            assert!(problems.iter().any(|m| m.contains(problem)), "{problem}: {problems:?}");
            assert!(out.waypoint_credentials.is_empty(), "{problem}");
            assert_eq!(
                tls_of(&out).expect("tls kept: requests fail").credential,
                "egress/client"
            );
        }
    }

    #[test]
    fn a_rule_outside_the_waypoint_namespace_gets_no_credential() {
        let (cert, key) = pem_pair();
        // The root namespace's rule applies to the egress waypoint's service (another
        // namespace's would not apply at all), but its Secret is not the waypoint's to read.
        let yaml = WORLD.to_owned()
            + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n"
            + &secret("istio-system", "client", &[("tls.crt", &cert), ("tls.key", &key)])
            + &secret("egress", "client", &[("tls.crt", &cert), ("tls.key", &key)])
            + &dr(
                "istio-system",
                "api.external.test",
                "tls: {mode: MUTUAL, credentialName: client}",
            );
        let (out, problems) = run(&yaml);
        assert!(out.waypoint_credentials.is_empty());
        assert!(
            problems
                .iter()
                .any(|m| m.contains("must be in the namespace of waypoint egress/waypoint")),
            "{problems:?}"
        );
    }
}
