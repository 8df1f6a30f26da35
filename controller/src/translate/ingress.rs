//! Ingress gateways: a `Gateway` whose class is `istio` (the brief's) or ours
//! ([`INGRESS_CLASSES`]) becomes an `mesh.waypoint.v1.IngressGateway` that the gateway's proxy
//! (the waypoint binary with `--role ingress`) runs: its listeners (HTTP, HTTPS terminated
//! with certificates from `kubernetes.io/tls` Secrets, several chosen by SNI), and per
//! listener the HTTPRoutes attached to it, compiled as a waypoint's routes and grouped by the
//! request host they answer.
//!
//! Gateway API rules decided here, as pure functions with table tests: a route's `parentRefs`
//! select listeners by `sectionName` and `port`; a listener takes only routes its
//! `allowedRoutes` admits (namespaces `Same` by default, `All`, or `Selector`; kinds); the
//! route's hostnames intersect the listener's (wildcards match one or more labels). What
//! cannot attach gets the Gateway API status reason (`NotAllowedByListeners`,
//! `NoMatchingListenerHostname`, `NoMatchingParent`), a cross-namespace backend without a
//! ReferenceGrant `ResolvedRefs=False RefNotPermitted`, and a listener whose certificate
//! cannot be used is left unprogrammed (`InvalidCertificateRef`) while the others serve.

use std::collections::BTreeMap;

use mesh_proto::waypoint as wp;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::{Options, Report};
use crate::model::gateway::{Gateway, GatewayStatusAddress, Listener, ParentReference, SecretObjectReference};
use crate::model::reference_grant::{self, Reference, GATEWAY_GROUP};
use crate::model::{Inputs, Kind, ObjectKey};
use crate::waypoint::Condition;

/// Gateway classes served by the ingress role: Istio's default and our own.
pub const INGRESS_CLASSES: [&str; 2] = ["istio", "mesh-ingress"];

/// On a Service: an ingress gateway sends to the service's waypoint, not its pods (Istio's).
const INGRESS_USE_WAYPOINT: &str = "istio.io/ingress-use-waypoint";

/// Istio's per-Gateway proxy settings; `gatewayTopology.numTrustedProxies` is read.
const PROXY_CONFIG_ANNOTATION: &str = "proxy.istio.io/config";

/// Whether a Gateway is run by the ingress role.
pub fn is_ingress(gw: &Gateway) -> bool {
    INGRESS_CLASSES.contains(&gw.spec.gateway_class_name.as_str())
}

/// What translation decided about ingress gateways and the routes naming them.
#[derive(Clone, Debug, Default)]
pub struct Ingress {
    /// By `<ns>/<name>` (the xDS resource name).
    pub gateways: BTreeMap<String, wp::IngressGateway>,
    pub status: BTreeMap<ObjectKey, GatewayStatus>,
    /// One per (route, parentRef to an ingress Gateway).
    pub route_parents: Vec<RouteParentStatus>,
    /// What runs each gateway in a cluster (applied by `k8s::writer`, with the status).
    pub deployments: BTreeMap<ObjectKey, crate::waypoint::WaypointDeployment>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct GatewayStatus {
    pub conditions: Vec<Condition>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    /// The route kinds the listener takes (Gateway API's `supportedKinds`).
    pub supported_kinds: Vec<String>,
    pub attached_routes: u32,
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RouteParentStatus {
    /// `HTTPRoute`, `TCPRoute` or `TLSRoute`.
    pub kind: String,
    pub route: ObjectKey,
    pub parent: ObjectKey,
    pub section_name: Option<String>,
    /// The parentRef's `port`, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub conditions: Vec<Condition>,
}

fn condition(kind: &str, status: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        kind: kind.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.into(),
    }
}

// ---- hostnames ----

/// Whether `host` (exact) is matched by `pattern` (exact, `*.suffix` for one or more labels,
/// or `*`).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) if suffix.starts_with('.') => host.len() > suffix.len() && host.ends_with(suffix),
        _ => host == pattern,
    }
}

/// The hostnames a route answers on a listener: the intersection of the listener's hostname
/// (`None`: any) with the route's (`[]`: any). Empty when they have none in common.
pub fn intersect(listener: Option<&str>, route: &[String]) -> Vec<String> {
    let listener = listener.filter(|h| !h.is_empty());
    if route.is_empty() {
        return vec![listener.unwrap_or("*").to_ascii_lowercase()];
    }
    let l = listener.unwrap_or("*").to_ascii_lowercase();
    let mut out: Vec<String> = route
        .iter()
        .filter_map(|r| intersect_one(&l, &r.to_ascii_lowercase()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The more specific of two hostnames when one includes the other (both lowercase).
fn intersect_one(l: &str, r: &str) -> Option<String> {
    if l == "*" || r == "*" {
        return Some(if l == "*" { r } else { l }.to_owned());
    }
    match (l.strip_prefix('*'), r.strip_prefix('*')) {
        (None, None) => (l == r).then(|| r.to_owned()),
        (Some(_), None) => host_matches(l, r).then(|| r.to_owned()),
        (None, Some(_)) => host_matches(r, l).then(|| l.to_owned()),
        (Some(ls), Some(rs)) if rs.ends_with(ls) => Some(r.to_owned()),
        (Some(ls), Some(rs)) if ls.ends_with(rs) => Some(l.to_owned()),
        _ => None,
    }
}

// ---- allowedRoutes ----

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AllowedRoutes {
    namespaces: Option<RouteNamespaces>,
    #[serde(default)]
    kinds: Vec<RouteGroupKind>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouteNamespaces {
    from: Option<String>,
    selector: Option<LabelSelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RouteGroupKind {
    group: Option<String>,
    kind: String,
}

/// The route kind a listener takes when `allowedRoutes.kinds` is not given.
fn default_kind(protocol: &str) -> &'static str {
    match protocol {
        "TCP" => "TCPRoute",
        "TLS" => "TLSRoute",
        _ => "HTTPRoute",
    }
}

/// The route kinds a listener of `protocol` can serve: HTTP and gRPC routes on HTTP(S), a
/// TLSRoute only on a TLS (passthrough) listener, a TCPRoute only on TCP.
pub fn supported_kinds(protocol: &str) -> &'static [&'static str] {
    match protocol {
        "TCP" => &["TCPRoute"],
        "TLS" => &["TLSRoute"],
        _ => &["HTTPRoute", "GRPCRoute"],
    }
}

/// The kinds a listener's `allowedRoutes.kinds` names that its protocol cannot serve
/// (Gateway API's `InvalidRouteKinds`); empty when it names none or all are fine.
pub fn invalid_kinds(l: &Listener) -> Vec<String> {
    let Some(Ok(allowed)) = l
        .allowed_routes
        .as_ref()
        .map(|v| serde_json::from_value::<AllowedRoutes>(v.clone()))
    else {
        return Vec::new();
    };
    allowed
        .kinds
        .into_iter()
        .filter(|k| {
            !supported_kinds(&l.protocol).contains(&k.kind.as_str())
                || k.group.as_deref().is_some_and(|g| g != GATEWAY_GROUP)
        })
        .map(|k| k.kind)
        .collect()
}

/// Whether listener `l` of a Gateway in `gw_ns` admits a route of `kind` in `route_ns`
/// (whose namespace has `ns_labels`). `Err`: the listener's `allowedRoutes` cannot be read,
/// and admits nothing but its own namespace (the default, and the narrowest).
pub fn allows(
    l: &Listener,
    gw_ns: &str,
    kind: &str,
    route_ns: &str,
    ns_labels: Option<&BTreeMap<String, String>>,
) -> Result<bool, String> {
    let allowed: AllowedRoutes = match &l.allowed_routes {
        None => AllowedRoutes::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            format!(
                "listener {}: allowedRoutes cannot be read ({e}); only routes of its namespace attach",
                l.name
            )
        })?,
    };
    // A kind the protocol cannot serve never attaches, whatever allowedRoutes names.
    let kind_ok = supported_kinds(&l.protocol).contains(&kind)
        && (allowed.kinds.is_empty()
            || allowed
                .kinds
                .iter()
                .any(|k| k.kind == kind && k.group.as_deref().is_none_or(|g| g == GATEWAY_GROUP)));
    let ns = allowed.namespaces.unwrap_or_default();
    let ns_ok = match ns.from.as_deref().unwrap_or("Same") {
        "All" => true,
        "Selector" => {
            let sel = ns.selector.unwrap_or_default();
            if !sel.match_expressions.is_empty() {
                return Err(format!(
                    "listener {}: allowedRoutes.namespaces.selector.matchExpressions is not supported; \
                     only routes of its namespace attach",
                    l.name
                ));
            }
            crate::model::selects(&sel.match_labels, ns_labels)
        }
        _ => route_ns == gw_ns,
    };
    Ok(kind_ok && ns_ok)
}

// ---- certificates ----

/// Why a listener's certificate cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("Secret {0} does not exist")]
    Missing(ObjectKey),
    #[error("Secret {0} is of type {1:?}, not kubernetes.io/tls")]
    WrongType(ObjectKey, String),
    #[error("Secret {0} has no {1}")]
    MissingKey(ObjectKey, &'static str),
    #[error("Secret {0}: {1}")]
    Invalid(ObjectKey, String),
    #[error("certificateRef {0} is of kind {1}, not a core Secret")]
    NotSecret(String, String),
    #[error("RefNotPermitted: Secret {0} is in another namespace and no ReferenceGrant there allows Gateway from {1}")]
    NotPermitted(ObjectKey, String),
}

impl CertError {
    fn reason(&self) -> &'static str {
        match self {
            CertError::NotPermitted(..) => "RefNotPermitted",
            _ => "InvalidCertificateRef",
        }
    }
}

fn secret_value(secret: &crate::model::Secret, field: &str) -> Option<Vec<u8>> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(field)) {
        return Some(v.0.clone());
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(field))
        .map(|s| s.as_bytes().to_vec())
}

/// Checks a PEM chain and key: at least one certificate, a key rustls can sign with, and the
/// key belonging to the leaf.
pub fn check_pair(chain: &[u8], key: &[u8]) -> Result<(), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("tls.crt holds no certificate".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls.key is not a PEM private key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("tls.key is not a usable key: {e}"))?;
    rustls::sign::CertifiedKey::new(certs, signer)
        .keys_match()
        .map_err(|e| format!("tls.key does not belong to the certificate: {e}"))
}

/// The certificate `r` names for a Gateway in `gw_ns`, read and checked.
fn certificate(inputs: &Inputs, gw_ns: &str, r: &SecretObjectReference) -> Result<wp::TlsCertificate, CertError> {
    let kind = r.kind.as_deref().unwrap_or("Secret");
    let group = r.group.as_deref().unwrap_or("");
    if kind != "Secret" || !(group.is_empty() || group == "core") {
        return Err(CertError::NotSecret(r.name.clone(), format!("{group}/{kind}")));
    }
    let key = ObjectKey::new(r.namespace.as_deref().unwrap_or(gw_ns), r.name.as_str());
    let reference = Reference {
        from_group: GATEWAY_GROUP,
        from_kind: "Gateway",
        from_namespace: gw_ns,
        to_group: "",
        to_kind: "Secret",
        to_namespace: &key.namespace,
        to_name: &key.name,
    };
    let grants = inputs.reference_grants.iter().map(|(k, g)| (k.namespace.as_str(), g));
    if !reference_grant::permitted(grants, &reference) {
        return Err(CertError::NotPermitted(key, gw_ns.to_owned()));
    }
    let secret = inputs
        .secrets
        .get(&key)
        .ok_or_else(|| CertError::Missing(key.clone()))?;
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    if kind != "kubernetes.io/tls" {
        return Err(CertError::WrongType(key, kind.to_owned()));
    }
    let chain = secret_value(secret, "tls.crt").ok_or_else(|| CertError::MissingKey(key.clone(), "tls.crt"))?;
    let private = secret_value(secret, "tls.key").ok_or_else(|| CertError::MissingKey(key.clone(), "tls.key"))?;
    check_pair(&chain, &private).map_err(|e| CertError::Invalid(key.clone(), e))?;
    let text = |b: Vec<u8>| String::from_utf8(b).map_err(|_| CertError::Invalid(key.clone(), "not UTF-8 PEM".into()));
    Ok(wp::TlsCertificate {
        secret: key.to_string(),
        cert_chain: text(chain)?,
        private_key: text(private)?,
    })
}

// ---- listeners ----

/// The certificates a listener serves, and the `ResolvedRefs=False` condition naming those
/// of its refs that could not be used (if any).
type Certificates = (Vec<wp::TlsCertificate>, Option<Condition>);

/// The certificates of an HTTPS listener's `refs` that load, and the `ResolvedRefs=False`
/// condition naming those that do not; `Err` (reason, message) when none loads, and the
/// listener is not programmed.
fn certificates(
    inputs: &Inputs,
    gw_ns: &str,
    refs: &[SecretObjectReference],
) -> Result<Certificates, (&'static str, String)> {
    let (mut certs, mut broken) = (Vec::new(), Vec::new());
    for r in refs {
        match certificate(inputs, gw_ns, r) {
            Ok(c) => certs.push(c),
            Err(e) => broken.push(e),
        }
    }
    let Some(first) = broken.first() else {
        return Ok((certs, None));
    };
    let reasons: Vec<String> = broken.iter().map(ToString::to_string).collect();
    let reasons = reasons.join("; ");
    if certs.is_empty() {
        return Err((first.reason(), format!("{reasons}; the listener is not programmed")));
    }
    let msg = format!(
        "{reasons}; the listener serves its other certificates ({})",
        certs.len()
    );
    Ok((certs, Some(condition("ResolvedRefs", false, first.reason(), msg))))
}

/// One listener as translated: its proxy config (when programmed) and status so far.
struct ListenerOut {
    config: Option<wp::IngressListener>,
    status: ListenerStatus,
    hosts: BTreeMap<String, wp::ServiceRoutes>,
}

/// Why a listener cannot be served: the condition it fails (`Accepted` or `ResolvedRefs`),
/// the reason and the message.
type Refusal = (&'static str, &'static str, String);

/// What a listener's protocol and TLS settings allow: the certificates to serve (HTTPS) and
/// a `ResolvedRefs=False` condition when only some of them load.
fn protocol_settings(inputs: &Inputs, gw_ns: &str, l: &Listener) -> Result<Certificates, Refusal> {
    let mode = l.tls.as_ref().and_then(|t| t.mode.as_deref()).unwrap_or("Terminate");
    match l.protocol.as_str() {
        "HTTP" | "TCP" => Ok((Vec::new(), None)),
        "TLS" if mode == "Passthrough" => Ok((Vec::new(), None)),
        "TLS" => Err((
            "Accepted",
            "UnsupportedValue",
            format!(
                "tls.mode {mode} is not supported on TLS listeners (only Passthrough; terminate TLS with an HTTPS listener)"
            ),
        )),
        "HTTPS" if mode != "Terminate" => Err((
            "Accepted",
            "UnsupportedValue",
            format!("tls.mode {mode} is not supported on HTTPS listeners (only Terminate)"),
        )),
        "HTTPS" => {
            let refs = l
                .tls
                .as_ref()
                .map(|t| t.certificate_refs.as_slice())
                .unwrap_or_default();
            if refs.is_empty() {
                let msg = "an HTTPS listener needs tls.certificateRefs".to_owned();
                return Err(("ResolvedRefs", "InvalidCertificateRef", msg));
            }
            certificates(inputs, gw_ns, refs).map_err(|(reason, msg)| ("ResolvedRefs", reason, msg))
        }
        other => Err((
            "Accepted",
            "UnsupportedProtocol",
            format!("protocol {other} is not supported by the ingress gateway (HTTP, HTTPS, TLS, TCP)"),
        )),
    }
}

/// The route kinds listener `l` takes: its protocol's, narrowed by `allowedRoutes.kinds`.
fn listener_kinds(l: &Listener) -> Vec<String> {
    let wanted = l
        .allowed_routes
        .as_ref()
        .and_then(|v| serde_json::from_value::<AllowedRoutes>(v.clone()).ok())
        .map(|a| a.kinds)
        .unwrap_or_default();
    supported_kinds(&l.protocol)
        .iter()
        .filter(|k| wanted.is_empty() || wanted.iter().any(|w| w.kind == **k))
        .map(|k| (*k).to_owned())
        .collect()
}

/// A listener's config and status: HTTP, TCP and TLS passthrough as they are; HTTPS with
/// the certificates that load (none: not programmed).
fn listener(inputs: &Inputs, gw_ns: &str, l: &Listener) -> ListenerOut {
    let mut status = ListenerStatus {
        name: l.name.clone(),
        supported_kinds: listener_kinds(l),
        ..Default::default()
    };
    let mut config = wp::IngressListener {
        name: l.name.clone(),
        port: u32::from(l.port),
        protocol: l.protocol.clone(),
        hostname: l.hostname.clone().unwrap_or_default(),
        ..Default::default()
    };
    let (certificates, partial) = match protocol_settings(inputs, gw_ns, l) {
        Ok(settings) => settings,
        Err((kind, reason, msg)) => {
            status.conditions.push(condition(kind, false, reason, msg.clone()));
            status.conditions.push(condition("Programmed", false, "Invalid", msg));
            return ListenerOut {
                config: None,
                status,
                hosts: BTreeMap::new(),
            };
        }
    };
    config.certificates = certificates;
    let invalid = invalid_kinds(l);
    let resolved = if let Some(broken) = partial {
        broken
    } else if invalid.is_empty() {
        condition("ResolvedRefs", true, "ResolvedRefs", "references resolved")
    } else {
        let msg = format!(
            "allowedRoutes.kinds {invalid:?} cannot be served by a {} listener (only {:?})",
            l.protocol,
            supported_kinds(&l.protocol)
        );
        condition("ResolvedRefs", false, "InvalidRouteKinds", msg)
    };
    status.conditions = vec![
        condition("Accepted", true, "Accepted", "listener accepted"),
        resolved,
        condition("Programmed", true, "Programmed", "listener programmed"),
    ];
    ListenerOut {
        config: Some(config),
        status,
        hosts: BTreeMap::new(),
    }
}

/// Per listener, why it conflicts with an earlier one (Gateway API's `Conflicted`): another
/// protocol on the same port (`ProtocolConflict`), or the same port and hostname
/// (`HostnameConflict`). Listener names must be unique too.
pub fn conflicts(listeners: &[Listener]) -> Vec<Option<(&'static str, String)>> {
    let mut out = Vec::with_capacity(listeners.len());
    // Compared with the earlier listeners that were kept.
    let mut kept: Vec<&Listener> = Vec::new();
    for l in listeners {
        let earlier = &kept;
        let host = |x: &Listener| x.hostname.clone().unwrap_or_default().to_ascii_lowercase();
        out.push(if let Some(e) = earlier.iter().find(|e| e.name == l.name) {
            Some(("NameConflict", format!("listener name {} is used twice", e.name)))
        } else if let Some(e) = earlier.iter().find(|e| e.port == l.port && e.protocol != l.protocol) {
            let msg = format!("port {} is {} on listener {}", l.port, e.protocol, e.name);
            Some(("ProtocolConflict", msg))
        } else if let Some(e) = earlier.iter().find(|e| e.port == l.port && host(e) == host(l)) {
            let msg = format!("port {} and hostname {:?} are listener {}'s", l.port, host(l), e.name);
            Some(("HostnameConflict", msg))
        } else {
            kept.push(l);
            None
        });
    }
    out
}

/// A listener left out for conflicting with an earlier one.
fn conflicted(l: &Listener, reason: &str, msg: String) -> ListenerOut {
    let msg = format!("{msg}; the listener is not programmed");
    ListenerOut {
        config: None,
        status: ListenerStatus {
            name: l.name.clone(),
            supported_kinds: Vec::new(),
            attached_routes: 0,
            conditions: vec![
                condition("Conflicted", false, reason, msg.clone()),
                condition("Programmed", false, "Invalid", msg),
            ],
        },
        hosts: BTreeMap::new(),
    }
}

/// `gatewayTopology.numTrustedProxies` of the Gateway's `proxy.istio.io/config` annotation.
fn num_trusted_proxies(gw: &Gateway, key: &ObjectKey, report: &mut Report) -> u32 {
    let Some(text) = gw
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PROXY_CONFIG_ANNOTATION))
    else {
        return 0;
    };
    let parsed: Result<serde_json::Value, _> = serde_yaml::from_str(text);
    match parsed {
        Ok(v) => v
            .pointer("/gatewayTopology/numTrustedProxies")
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        Err(e) => {
            report.add(
                Kind::Gateway,
                key,
                format!("annotation {PROXY_CONFIG_ANNOTATION} cannot be read ({e}); no proxy in front is trusted"),
            );
            0
        }
    }
}

// ---- route attachment ----

/// Why a parentRef attached to no listener (Gateway API reasons), or where it attached.
#[derive(Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Indices of the listeners taken, with the hostnames the route answers on each.
    Attached(Vec<(usize, Vec<String>)>),
    NoMatchingParent,
    NotAllowedByListeners,
    NoMatchingListenerHostname,
}

impl Attachment {
    fn reason(&self) -> &'static str {
        match self {
            Attachment::Attached(_) => "Accepted",
            Attachment::NoMatchingParent => "NoMatchingParent",
            Attachment::NotAllowedByListeners => "NotAllowedByListeners",
            Attachment::NoMatchingListenerHostname => "NoMatchingListenerHostname",
        }
    }
}

/// The route (`kind` in `route_ns`, with `hostnames`) attaching through `p` to a Gateway's
/// `listeners` in `gw_ns`. `allowed` decides allowedRoutes per listener.
pub fn attach(
    p: &ParentReference,
    listeners: &[Listener],
    hostnames: &[String],
    mut allowed: impl FnMut(&Listener) -> bool,
) -> Attachment {
    let named: Vec<(usize, &Listener)> = listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| p.section_name.as_deref().is_none_or(|s| s == l.name))
        .filter(|(_, l)| p.port.is_none_or(|port| port == l.port))
        .collect();
    if named.is_empty() {
        return Attachment::NoMatchingParent;
    }
    let admitted: Vec<(usize, &Listener)> = named.into_iter().filter(|(_, l)| allowed(l)).collect();
    if admitted.is_empty() {
        return Attachment::NotAllowedByListeners;
    }
    let taken: Vec<(usize, Vec<String>)> = admitted
        .into_iter()
        .map(|(i, l)| (i, intersect(l.hostname.as_deref(), hostnames)))
        .filter(|(_, hosts)| !hosts.is_empty())
        .collect();
    if taken.is_empty() {
        return Attachment::NoMatchingListenerHostname;
    }
    Attachment::Attached(taken)
}

fn is_gateway_ref(p: &ParentReference) -> bool {
    p.group.as_deref().is_none_or(|g| g == GATEWAY_GROUP) && p.kind.as_deref().is_none_or(|k| k == "Gateway")
}

/// `ResolvedRefs` of a route: False when a backend in another namespace has no ReferenceGrant
/// or names no Service.
fn resolved_refs<'a>(
    inputs: &Inputs,
    key: &ObjectKey,
    kind: Kind,
    refs: impl Iterator<Item = &'a crate::model::gateway::BackendRef>,
) -> Condition {
    for b in refs {
        let ns = b.namespace.as_deref().unwrap_or(&key.namespace);
        if !super::routes::service_ref_permitted(inputs, kind, key, ns, &b.name) {
            let msg = format!("backendRef {ns}/{} needs a ReferenceGrant in {ns}", b.name);
            return condition("ResolvedRefs", false, super::REF_NOT_PERMITTED, msg);
        }
        if !inputs.services.contains_key(&ObjectKey::new(ns, b.name.as_str())) {
            let msg = format!("backendRef {ns}/{} does not exist", b.name);
            return condition("ResolvedRefs", false, "BackendNotFound", msg);
        }
    }
    condition("ResolvedRefs", true, "ResolvedRefs", "references resolved")
}

/// The table name of a listener's host: `ingress/<ns>/<gateway>/<listener>/<hostname>`.
pub fn table_name(gw: &ObjectKey, listener: &str, host: &str) -> String {
    format!("ingress/{}/{}/{listener}/{host}", gw.namespace, gw.name)
}

struct GatewayOut {
    num_trusted_proxies: u32,
    conditions: Vec<Condition>,
    listeners: Vec<ListenerOut>,
}

/// A route naming ingress Gateways, whatever its kind.
struct RouteRef<'a> {
    kind: Kind,
    key: &'a ObjectKey,
    parent_refs: &'a [ParentReference],
    hostnames: &'a [String],
    resolved: Condition,
}

fn by_age<T>(items: &BTreeMap<ObjectKey, T>, meta: impl Fn(&T) -> &crate::model::ObjectMeta) -> Vec<(&ObjectKey, &T)> {
    let mut v: Vec<_> = items.iter().collect();
    v.sort_by(|a, b| {
        let t = |x: &T| meta(x).creation_timestamp.clone().map(|t| t.0);
        t(a.1).cmp(&t(b.1)).then_with(|| a.0.cmp(b.0))
    });
    v
}

/// Attaches every HTTPRoute, TCPRoute and TLSRoute naming an ingress Gateway to its listeners.
fn attach_routes(
    inputs: &Inputs,
    options: &Options,
    gateways: &mut BTreeMap<ObjectKey, GatewayOut>,
    report: &mut Report,
) -> Vec<RouteParentStatus> {
    let mut statuses = Vec::new();
    for (key, route) in by_age(&inputs.http_routes, |r| &r.metadata) {
        let r = RouteRef {
            kind: Kind::HttpRoute,
            key,
            parent_refs: &route.spec.parent_refs,
            hostnames: &route.spec.hostnames,
            resolved: resolved_refs(
                inputs,
                key,
                Kind::HttpRoute,
                route.spec.rules.iter().flat_map(|r| &r.backend_refs),
            ),
        };
        let compile = |report: &mut Report| super::routes::compile_http_route(inputs, options, key, route, report);
        statuses.extend(attach_route(inputs, gateways, report, r, compile));
    }
    for (key, route) in by_age(&inputs.tcp_routes, |r| &r.metadata) {
        let r = RouteRef {
            kind: Kind::TcpRoute,
            key,
            parent_refs: &route.spec.parent_refs,
            hostnames: &[],
            resolved: resolved_refs(
                inputs,
                key,
                Kind::TcpRoute,
                route.spec.rules.iter().flat_map(|r| &r.backend_refs),
            ),
        };
        let compile = |report: &mut Report| Ok(super::routes::compile_tcp_route(inputs, options, key, route, report));
        statuses.extend(attach_route(inputs, gateways, report, r, compile));
    }
    for (key, route) in by_age(&inputs.tls_routes, |r| &r.metadata) {
        let rules = &route.spec.rules;
        let r = RouteRef {
            kind: Kind::TlsRoute,
            key,
            parent_refs: &route.spec.parent_refs,
            hostnames: &route.spec.hostnames,
            resolved: resolved_refs(inputs, key, Kind::TlsRoute, rules.iter().flat_map(|r| &r.backend_refs)),
        };
        let compile = |report: &mut Report| {
            Ok(super::routes::compile_l4_rules(
                inputs,
                options,
                (Kind::TlsRoute, key),
                rules,
                report,
            ))
        };
        statuses.extend(attach_route(inputs, gateways, report, r, compile));
    }
    statuses
}

/// One route's parentRefs to ingress Gateways: attached to the listeners that take it (its
/// rules compiled once, into each host table), or refused with the reason. A route whose
/// rules do not compile (`Err`: the invalid fields, already reported) goes into no table:
/// `Accepted=False UnsupportedValue` on every parent that would take it, and the host's other
/// routes serve as before.
/// Adds an accepted route's `rules` to the host tables of the listeners it took.
fn attach_rules(
    out: &mut GatewayOut,
    gw_key: &ObjectKey,
    taken: Vec<(usize, Vec<String>)>,
    (kind, key): (Kind, &ObjectKey),
    rules: &[wp::Route],
) {
    for (i, hosts) in taken {
        let Some(l) = out.listeners.get_mut(i) else { continue };
        l.status.attached_routes += 1;
        for host in hosts {
            let table = l.hosts.entry(host.clone()).or_insert_with(|| wp::ServiceRoutes {
                service: table_name(gw_key, &l.status.name, &host),
                ..Default::default()
            });
            table.sources.push(format!("{}/{key}", kind.name()));
            table.routes.extend(rules.iter().cloned());
        }
    }
}

fn attach_route(
    inputs: &Inputs,
    gateways: &mut BTreeMap<ObjectKey, GatewayOut>,
    report: &mut Report,
    route: RouteRef<'_>,
    compile: impl FnOnce(&mut Report) -> Result<Vec<wp::Route>, Vec<String>>,
) -> Vec<RouteParentStatus> {
    let (kind, key) = (route.kind, route.key);
    let mut statuses = Vec::new();
    let mut compile = Some(compile);
    let mut compiled: Option<Result<Vec<wp::Route>, Vec<String>>> = None;
    for p in route.parent_refs.iter().filter(|p| is_gateway_ref(p)) {
        let gw_key = ObjectKey::new(p.namespace.as_deref().unwrap_or(&key.namespace), p.name.as_str());
        let Some(gw) = inputs.gateways.get(&gw_key) else {
            // No Gateway of any class by that name: the route is attached to nothing.
            let msg = format!("parentRef {gw_key}: no such Gateway; the route is attached to nothing");
            report.add(kind, key, msg);
            continue;
        };
        let Some(out) = gateways.get_mut(&gw_key) else {
            continue; // a waypoint's or another controller's Gateway
        };
        let ns_labels = inputs.namespace_labels(&key.namespace);
        let allowed = |l: &Listener| {
            allows(l, &gw_key.namespace, kind.name(), &key.namespace, ns_labels).unwrap_or_else(|e| {
                report.add(Kind::Gateway, &gw_key, e);
                key.namespace == gw_key.namespace && default_kind(&l.protocol) == kind.name()
            })
        };
        let mut conditions = Vec::new();
        match attach(p, &gw.spec.listeners, route.hostnames, allowed) {
            Attachment::Attached(taken) => {
                if compiled.is_none() {
                    compiled = compile.take().map(|c| c(report));
                }
                match compiled.as_ref() {
                    // Refused whole: it attaches to no listener, nor counts in attachedRoutes.
                    Some(Err(invalid)) => {
                        let msg = format!("invalid rule: {}", invalid.join("; "));
                        conditions.push(condition("Accepted", false, super::UNSUPPORTED_VALUE, msg));
                    }
                    compiled => {
                        let rules = compiled.and_then(|r| r.as_ref().ok()).map_or(&[][..], Vec::as_slice);
                        conditions.push(condition("Accepted", true, "Accepted", "attached"));
                        attach_rules(out, &gw_key, taken, (kind, key), rules);
                    }
                }
            }
            refused => {
                let mut msg = format!("parentRef {gw_key}: {}", refused.reason());
                if matches!(refused, Attachment::NoMatchingListenerHostname) {
                    let hosts = route.hostnames.join(", ");
                    msg.push_str(&format!(" (no listener's hostname matches {hosts})"));
                }
                report.add(kind, key, format!("{msg}; not attached"));
                conditions.push(condition("Accepted", false, refused.reason(), msg));
            }
        }
        conditions.push(route.resolved.clone());
        statuses.push(RouteParentStatus {
            kind: kind.name().to_owned(),
            route: key.clone(),
            parent: gw_key,
            section_name: p.section_name.clone(),
            port: p.port,
            conditions,
        });
    }
    statuses
}

/// An ingress Gateway's listeners (conflicting ones left out) and its own conditions.
fn gateway(inputs: &Inputs, key: &ObjectKey, gw: &Gateway, report: &mut Report) -> GatewayOut {
    let conflicts = conflicts(&gw.spec.listeners);
    let listeners: Vec<ListenerOut> = gw
        .spec
        .listeners
        .iter()
        .zip(conflicts)
        .map(|(l, conflict)| match conflict {
            None => listener(inputs, &key.namespace, l),
            Some((reason, msg)) => conflicted(l, reason, msg),
        })
        .collect();
    for l in &listeners {
        if let Some(c) = l.status.conditions.iter().find(|c| !c.status) {
            report.add(Kind::Gateway, key, format!("listener {}: {}", l.status.name, c.message));
        }
    }
    let programmed = listeners.iter().any(|l| l.config.is_some());
    let conditions = vec![
        condition("Accepted", true, "Accepted", "ingress gateway accepted"),
        if programmed {
            condition("Programmed", true, "Programmed", "programmed")
        } else {
            condition("Programmed", false, "Invalid", "no listener is programmed")
        },
    ];
    GatewayOut {
        num_trusted_proxies: num_trusted_proxies(gw, key, report),
        conditions,
        listeners,
    }
}

/// Every ingress Gateway, its listeners and attached routes, their statuses and (cluster
/// mode) deployments.
pub(crate) fn translate(inputs: &Inputs, options: &Options, report: &mut Report) -> Ingress {
    let mut gateways = BTreeMap::new();
    for (key, gw) in inputs.gateways.iter().filter(|(_, g)| is_ingress(g)) {
        gateways.insert(key.clone(), gateway(inputs, key, gw, report));
    }
    let route_parents = attach_routes(inputs, options, &mut gateways, report);
    let waypoint_services: Vec<String> = inputs
        .services
        .iter()
        .filter(|(_, s)| {
            let labels = s.metadata.labels.as_ref();
            labels
                .and_then(|l| l.get(INGRESS_USE_WAYPOINT))
                .is_some_and(|v| v == "true")
        })
        .map(|(k, _)| {
            format!(
                "{}/{}",
                k.namespace,
                super::service_hostname(&k.name, &k.namespace, options)
            )
        })
        .collect();
    let mut result = Ingress {
        route_parents,
        ..Default::default()
    };
    for (key, out) in gateways {
        let mut status = GatewayStatus {
            conditions: out.conditions,
            listeners: Vec::new(),
        };
        let mut config = wp::IngressGateway {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            num_trusted_proxies: out.num_trusted_proxies,
            listeners: Vec::new(),
            waypoint_services: waypoint_services.clone(),
        };
        for l in out.listeners {
            if let Some(mut c) = l.config {
                c.hosts = l
                    .hosts
                    .into_iter()
                    .map(|(hostname, routes)| wp::IngressHost {
                        hostname,
                        routes: Some(routes),
                    })
                    .collect();
                config.listeners.push(c);
            }
            status.listeners.push(l.status);
        }
        result.gateways.insert(key.to_string(), config);
        if let Some(gw) = inputs.gateways.get(&key) {
            let record = deployment(inputs, options, (&key, gw), &status, report);
            result.deployments.insert(key.clone(), record);
        }
        result.status.insert(key, status);
    }
    result
}

// ---- deployment ----

/// Istio's Gateway annotation choosing the type of the gateway's Service.
pub const SERVICE_TYPE_ANNOTATION: &str = "networking.istio.io/service-type";

/// The Service type of an ingress gateway: `LoadBalancer`, or what the annotation says.
fn service_type(gw: &Gateway, key: &ObjectKey, report: &mut Report) -> String {
    let wanted = gw
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_TYPE_ANNOTATION));
    match wanted.map(String::as_str) {
        None => "LoadBalancer".to_owned(),
        Some(t @ ("LoadBalancer" | "ClusterIP" | "NodePort")) => t.to_owned(),
        Some(other) => {
            let msg = format!(
                "annotation {SERVICE_TYPE_ANNOTATION} {other:?} is not LoadBalancer, ClusterIP or NodePort; using LoadBalancer"
            );
            report.add(Kind::Gateway, key, msg);
            "LoadBalancer".to_owned()
        }
    }
}

/// The addresses of the gateway's own Service (same name as the Gateway): a LoadBalancer's
/// ingress IPs and hostnames once assigned, else (other types) its cluster IPs.
pub fn service_addresses(service: Option<&crate::model::Service>, service_type: &str) -> Vec<GatewayStatusAddress> {
    let Some(service) = service else { return Vec::new() };
    let address = |kind: &str, value: &str| GatewayStatusAddress {
        kind: Some(kind.to_owned()),
        value: value.to_owned(),
    };
    if service_type == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        return ingress
            .into_iter()
            .flatten()
            .filter_map(|i| match (&i.ip, &i.hostname) {
                (Some(ip), _) => Some(address("IPAddress", ip)),
                (None, Some(host)) => Some(address("Hostname", host)),
                (None, None) => None,
            })
            .collect();
    }
    let spec = service.spec.as_ref();
    let ips = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    let ips = if ips.is_empty() {
        spec.and_then(|s| s.cluster_ip.clone()).into_iter().collect()
    } else {
        ips
    };
    ips.iter()
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        .map(|ip| address("IPAddress", ip))
        .collect()
}

/// What the controller deploys for an ingress Gateway in a cluster: the waypoint's record
/// (ServiceAccount, Deployment, Service; `spec.infrastructure` and the scaling annotations
/// read the same way) with the listeners' ports, the Service type and the listener statuses.
fn deployment(
    inputs: &Inputs,
    options: &Options,
    (key, gw): (&ObjectKey, &Gateway),
    status: &GatewayStatus,
    report: &mut Report,
) -> crate::waypoint::WaypointDeployment {
    let mut problems = Vec::new();
    let scaling = crate::waypoint::scaling::read(
        gw.metadata.annotations.as_ref().unwrap_or(&BTreeMap::new()),
        gw.spec.infrastructure.as_ref(),
        &mut problems,
    );
    for p in problems {
        report.add(Kind::Gateway, key, p);
    }
    let mut ports: Vec<crate::waypoint::IngressPort> = Vec::new();
    for l in &gw.spec.listeners {
        if !ports.iter().any(|p| p.port == l.port) {
            ports.push(crate::waypoint::IngressPort {
                port: l.port,
                protocol: l.protocol.clone(),
            });
        }
    }
    let provider = super::attach::mesh_tracing_provider(inputs, options);
    let service_type = service_type(gw, key, report);
    let addresses = service_addresses(inputs.services.get(key), &service_type);
    let mut conditions = status.conditions.clone();
    if addresses.is_empty() {
        // Listeners may be ready; clients cannot reach them before the Service has an address.
        for c in conditions.iter_mut().filter(|c| c.kind == "Programmed" && c.status) {
            *c = condition(
                "Programmed",
                false,
                "AddressNotAssigned",
                format!("waiting for an address of the {service_type} Service {key}"),
            );
        }
    }
    crate::waypoint::WaypointDeployment {
        gateway: key.clone(),
        gateway_uid: gw.metadata.uid.clone().unwrap_or_default(),
        service_account: key.name.clone(),
        identity: format!("spiffe://{}/ns/{}/sa/{}", options.trust_domain, key.namespace, key.name),
        waypoint_for: crate::waypoint::WaypointFor::None,
        hbone_port: mesh_core::capture::HBONE_PORT,
        address: None,
        conditions,
        trace_export: inputs.mesh.trace_export(provider),
        path_normalization: inputs.mesh.waypoint_path_normalization(),
        scaling,
        ingress: Some(crate::waypoint::IngressDeployment {
            ports,
            service_type,
            listeners: status.listeners.clone(),
            addresses,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hostname_intersection_table() {
        let cases: &[(Option<&str>, &[&str], &[&str])] = &[
            (None, &[], &["*"]),
            (Some("*.example.com"), &[], &["*.example.com"]),
            (Some("*.example.com"), &["app.example.com"], &["app.example.com"]),
            (Some("*.example.com"), &["a.b.example.com"], &["a.b.example.com"]),
            (Some("*.example.com"), &["example.com"], &[]),
            (Some("*.example.com"), &["app.other.com"], &[]),
            (Some("app.example.com"), &["*.example.com"], &["app.example.com"]),
            (Some("app.example.com"), &["app.example.com"], &["app.example.com"]),
            (Some("app.example.com"), &["api.example.com"], &[]),
            (Some("*.example.com"), &["*.api.example.com"], &["*.api.example.com"]),
            (Some("*.api.example.com"), &["*.example.com"], &["*.api.example.com"]),
            (None, &["App.Example.com", "*.x.io"], &["*.x.io", "app.example.com"]),
            (
                Some("*.example.com"),
                &["app.example.com", "nope.org"],
                &["app.example.com"],
            ),
        ];
        for (listener, route, want) in cases {
            assert_eq!(
                intersect(*listener, &strings(route)),
                strings(want),
                "listener {listener:?}, route {route:?}"
            );
        }
    }

    #[test]
    fn host_match_table() {
        assert!(host_matches("*", "anything"));
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "a.example.com.evil"));
        assert!(host_matches("App.example.com", "app.EXAMPLE.com"));
        assert!(!host_matches("app.example.com", "api.example.com"));
    }

    fn listener(name: &str, port: u16, host: Option<&str>, allowed: Option<serde_json::Value>) -> Listener {
        Listener {
            name: name.into(),
            port,
            protocol: "HTTP".into(),
            hostname: host.map(str::to_owned),
            allowed_routes: allowed,
            tls: None,
        }
    }

    #[test]
    fn allowed_routes_table() {
        let labels: BTreeMap<String, String> = [("team".to_owned(), "a".to_owned())].into();
        let sel = serde_json::json!({"namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}});
        /// allowedRoutes, route kind, route namespace, its labels, admitted.
        type Case<'a> = (
            Option<serde_json::Value>,
            &'a str,
            &'a str,
            Option<&'a BTreeMap<String, String>>,
            bool,
        );
        let cases: Vec<Case> = vec![
            (None, "HTTPRoute", "gw", None, true),
            (None, "HTTPRoute", "other", None, false),
            (None, "TCPRoute", "gw", None, false),
            (
                Some(serde_json::json!({"namespaces": {"from": "All"}})),
                "HTTPRoute",
                "other",
                None,
                true,
            ),
            (
                Some(serde_json::json!({"namespaces": {"from": "Same"}})),
                "HTTPRoute",
                "other",
                None,
                false,
            ),
            (Some(sel.clone()), "HTTPRoute", "other", Some(&labels), true),
            (Some(sel), "HTTPRoute", "other", None, false),
            (
                Some(serde_json::json!({"namespaces": {"from": "All"}, "kinds": [{"kind": "GRPCRoute"}]})),
                "HTTPRoute",
                "other",
                None,
                false,
            ),
        ];
        for (allowed, kind, ns, ns_labels, want) in cases {
            let l = listener("l", 80, None, allowed.clone());
            assert_eq!(
                allows(&l, "gw", kind, ns, ns_labels),
                Ok(want),
                "{allowed:?} {kind} {ns}"
            );
        }
        let expr = serde_json::json!({"namespaces": {"from": "Selector", "selector": {"matchExpressions": [{"key": "x", "operator": "Exists"}]}}});
        assert!(allows(&listener("l", 80, None, Some(expr)), "gw", "HTTPRoute", "other", None).is_err());
    }

    #[test]
    fn attachment_table() {
        let listeners = vec![
            listener("http", 80, None, None),
            listener("https", 443, Some("*.example.com"), None),
        ];
        let parent = |section: Option<&str>, port: Option<u16>| ParentReference {
            name: "gw".into(),
            section_name: section.map(str::to_owned),
            port,
            ..Default::default()
        };
        let app = strings(&["app.example.com"]);
        let all = |_: &Listener| true;
        assert_eq!(
            attach(&parent(None, None), &listeners, &app, all),
            Attachment::Attached(vec![(0, app.clone()), (1, app.clone())])
        );
        assert_eq!(
            attach(&parent(Some("https"), None), &listeners, &app, all),
            Attachment::Attached(vec![(1, app.clone())])
        );
        assert_eq!(
            attach(&parent(None, Some(443)), &listeners, &app, all),
            Attachment::Attached(vec![(1, app.clone())])
        );
        assert_eq!(
            attach(&parent(Some("nope"), None), &listeners, &app, all),
            Attachment::NoMatchingParent
        );
        assert_eq!(
            attach(&parent(Some("http"), Some(443)), &listeners, &app, all),
            Attachment::NoMatchingParent
        );
        assert_eq!(
            attach(&parent(None, None), &listeners, &app, |_| false),
            Attachment::NotAllowedByListeners
        );
        let other = strings(&["app.other.org"]);
        assert_eq!(
            attach(&parent(Some("https"), None), &listeners, &other, all),
            Attachment::NoMatchingListenerHostname
        );
    }

    fn inputs(docs: &[String]) -> Inputs {
        let mut inputs = Inputs::default();
        for doc in docs {
            let value: serde_json::Value = serde_yaml::from_str(doc).expect("yaml");
            inputs.apply(crate::model::Object::parse(value).expect("object"));
        }
        inputs
    }

    fn tls_secret(ns: &str, name: &str, host: &str) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let indent = |pem: String| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\n\
             stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
            indent(cert.pem()),
            indent(key.serialize_pem())
        )
    }

    /// The brief's Gateway, exactly.
    const BRIEF: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    hostname: "*.example.com"
    port: 443
    protocol: HTTPS
    tls: {mode: Terminate, certificateRefs: [{name: example-com-cert}]}
"#;
    /// The brief's Gateway letting other namespaces' routes attach, with two more listeners.
    const OPEN: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    hostname: "*.example.com"
    port: 443
    protocol: HTTPS
    tls: {mode: Terminate, certificateRefs: [{name: example-com-cert}]}
    allowedRoutes: {namespaces: {from: All}}
  - name: other
    hostname: "*.other.org"
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: missing-cert}]}
    allowedRoutes: {namespaces: {from: All}}
  - name: http
    port: 80
    protocol: HTTP
"#;
    const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app-routes, namespace: production}
spec:
  parentRefs: [{name: istio-ingressgateway, namespace: istio-system}]
  hostnames: ["app.example.com"]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-api-version, value: v1}]}
    backendRefs: [{name: app-v1, port: 8080}]
"#;
    const APP: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: app-v1, namespace: production, \
                       labels: {istio.io/ingress-use-waypoint: \"true\"}}\nspec: {ports: [{port: 8080}]}\n";

    fn run(docs: &[String]) -> (Ingress, Vec<super::super::Problem>) {
        let mut report = Report::default();
        let out = translate(&inputs(docs), &Options::default(), &mut report);
        (out, report.0)
    }

    fn cond<'a>(conditions: &'a [Condition], kind: &str) -> &'a Condition {
        conditions.iter().find(|c| c.kind == kind).expect("condition")
    }

    #[test]
    fn the_briefs_route_in_another_namespace_is_not_allowed_by_the_default_listener() {
        let secret = tls_secret("istio-system", "example-com-cert", "*.example.com");
        let (out, problems) = run(&[BRIEF.to_owned(), ROUTE.to_owned(), secret, APP.to_owned()]);
        let gw = &out.gateways["istio-system/istio-ingressgateway"];
        assert_eq!(gw.listeners.len(), 1, "programmed: the certificate is valid");
        assert!(gw.listeners[0].hosts.is_empty(), "the route did not attach");
        let parent = &out.route_parents[0];
        let accepted = cond(&parent.conditions, "Accepted");
        assert_eq!(
            (accepted.status, accepted.reason.as_str()),
            (false, "NotAllowedByListeners")
        );
        assert!(
            problems.iter().any(|p| p.message.contains("NotAllowedByListeners")),
            "{problems:?}"
        );
    }

    #[test]
    fn routes_attach_and_a_missing_certificate_leaves_only_its_listener_unprogrammed() {
        let secret = tls_secret("istio-system", "example-com-cert", "*.example.com");
        let (out, _) = run(&[OPEN.to_owned(), ROUTE.to_owned(), secret, APP.to_owned()]);
        let gw = &out.gateways["istio-system/istio-ingressgateway"];
        let names: Vec<&str> = gw.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            ["https", "http"],
            "the listener with a missing certificate is not programmed"
        );
        let https = &gw.listeners[0];
        assert_eq!(https.certificates.len(), 1);
        assert!(https.certificates[0].private_key.contains("PRIVATE KEY"));
        assert_eq!(https.hosts.len(), 1);
        assert_eq!(https.hosts[0].hostname, "app.example.com");
        let table = https.hosts[0].routes.as_ref().expect("routes");
        assert_eq!(
            table.service,
            "ingress/istio-system/istio-ingressgateway/https/app.example.com"
        );
        assert_eq!(
            table.routes[0].backends[0].service,
            "production/app-v1.production.svc.cluster.local"
        );
        assert!(table.routes[0].request_headers.is_some());
        assert!(
            gw.listeners[1].hosts.is_empty(),
            "the HTTP listener admits its own namespace only"
        );

        let status = &out.status[&ObjectKey::new("istio-system", "istio-ingressgateway")];
        let attached: Vec<u32> = status.listeners.iter().map(|l| l.attached_routes).collect();
        assert_eq!(attached, [1, 0, 0], "the route's hostname matches no *.other.org");
        let other = &status.listeners[1];
        assert!(!cond(&other.conditions, "Programmed").status);
        let resolved = cond(&other.conditions, "ResolvedRefs");
        assert_eq!(resolved.reason, "InvalidCertificateRef");
        assert!(
            resolved.message.contains("missing-cert does not exist"),
            "{}",
            resolved.message
        );
        assert!(
            cond(&status.conditions, "Programmed").status,
            "the other listeners serve"
        );
        let parent = &out.route_parents[0];
        assert!(cond(&parent.conditions, "Accepted").status);
        assert!(cond(&parent.conditions, "ResolvedRefs").status);
    }

    #[test]
    fn refused_routes_get_their_reason() {
        let secret = tls_secret("istio-system", "example-com-cert", "*.example.com");
        let mismatch = ROUTE
            .replace("app-routes", "elsewhere")
            .replace("app.example.com", "app.other.org");
        let no_grant = ROUTE
            .replace("app-routes", "cross")
            .replace("{name: app-v1, port: 8080}", "{name: db, namespace: data, port: 5432}");
        let (out, _) = run(&[OPEN.to_owned(), mismatch, no_grant, secret, APP.to_owned()]);
        let by_name = |name: &str| {
            out.route_parents
                .iter()
                .find(|p| p.route.name == name)
                .expect("route status")
        };
        // `other` is unprogrammed but still decides attachment (its hostname matches).
        let elsewhere = cond(&by_name("elsewhere").conditions, "Accepted");
        assert!(elsewhere.status, "attached to listener other (not programmed)");
        let cross = by_name("cross");
        assert!(cond(&cross.conditions, "Accepted").status);
        let resolved = cond(&cross.conditions, "ResolvedRefs");
        assert_eq!((resolved.status, resolved.reason.as_str()), (false, "RefNotPermitted"));

        let only_https = ROUTE
            .replace("app-routes", "nomatch")
            .replace("app.example.com", "shop.example.net");
        let secret = tls_secret("istio-system", "example-com-cert", "*.example.com");
        let (out, _) = run(&[OPEN.to_owned(), only_https, secret]);
        let accepted = cond(&out.route_parents[0].conditions, "Accepted");
        assert_eq!(
            (accepted.status, accepted.reason.as_str()),
            (false, "NoMatchingListenerHostname")
        );
    }

    /// Whether a host table compiles in the proxy exactly as sent, every rule kept.
    fn compiles_whole(routes: &wp::ServiceRoutes) -> Result<(), String> {
        let c = waypoint::http::route::CompiledRoutes::compile(routes.clone());
        match waypoint::store::dropped_reason(&c) {
            None => Ok(()),
            Some(reason) => Err(reason),
        }
    }

    /// A tenant's route on a shared host (listener `allowedRoutes: All`) with a match the
    /// proxy cannot compile is refused alone: the host table still holds shop's route and
    /// compiles in the proxy, and evil's route is told which field is wrong.
    #[test]
    fn an_invalid_route_on_a_shared_host_is_refused_alone() {
        let secret = tls_secret("istio-system", "example-com-cert", "*.example.com");
        let shop = ROUTE
            .replace("app-routes", "shop")
            .replace("namespace: production", "namespace: shop")
            .replace("app.example.com", "shop.example.com");
        let evil = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: steal, namespace: evil, creationTimestamp: "2020-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: istio-ingressgateway, namespace: istio-system}]
  hostnames: ["shop.example.com"]
  rules:
  - matches: [{path: {type: PathPrefix, value: /evil}}]
    backendRefs: [{name: steal, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "("}}]
    backendRefs: [{name: steal, port: 80}]
"#;
        let (out, problems) = run(&[OPEN.to_owned(), shop, evil.to_owned(), secret]);
        let gw = &out.gateways["istio-system/istio-ingressgateway"];
        for l in &gw.listeners {
            for h in &l.hosts {
                let table = h.routes.as_ref().expect("routes");
                compiles_whole(table).unwrap_or_else(|e| panic!("{}: {e}", table.service));
            }
        }
        let https = &gw.listeners[0];
        let host = https
            .hosts
            .iter()
            .find(|h| h.hostname == "shop.example.com")
            .expect("shop's host is served");
        let names: Vec<&str> = host
            .routes
            .as_ref()
            .expect("routes")
            .routes
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["HTTPRoute/shop/shop/rules[0]"],
            "evil's route is not in the table"
        );

        let status = |ns: &str| {
            out.route_parents
                .iter()
                .find(|p| p.route.namespace == ns)
                .expect("route status")
        };
        assert!(cond(&status("shop").conditions, "Accepted").status);
        let refused = cond(&status("evil").conditions, "Accepted");
        assert_eq!((refused.status, refused.reason.as_str()), (false, "UnsupportedValue"));
        let field = r#"spec.rules[1].matches[0].path.value "(": not a valid regular expression"#;
        assert!(refused.message.contains(field), "{}", refused.message);
        let evil_problems: Vec<&str> = problems
            .iter()
            .filter(|p| p.object.namespace == "evil")
            .map(|p| p.message.as_str())
            .collect();
        assert!(evil_problems.iter().any(|m| m.starts_with(field)), "{evil_problems:?}");
        assert!(problems.iter().all(|p| p.object.namespace != "shop"), "{problems:?}");
    }

    #[test]
    fn certificate_checks() {
        let good = tls_secret("istio-system", "c", "a.example.com");
        let wrong_type = good.replace("kubernetes.io/tls", "Opaque");
        let other_key = tls_secret("istio-system", "c", "b.example.com");
        // The key of another certificate.
        let key_at = |s: &str| s.find("  tls.key").expect("key");
        let mismatched = format!("{}{}", &good[..key_at(&good)], &other_key[key_at(&other_key)..]);
        let garbage = good.replace("BEGIN CERTIFICATE-----\n", "BEGIN CERTIFICATE-----\n    AAAA\n");
        let r = SecretObjectReference {
            name: "c".into(),
            ..Default::default()
        };
        let key = ObjectKey::new("istio-system", "c");
        assert!(certificate(&inputs(&[good]), "istio-system", &r).is_ok());
        assert_eq!(
            certificate(&inputs(&[wrong_type]), "istio-system", &r),
            Err(CertError::WrongType(key.clone(), "Opaque".into()))
        );
        assert!(matches!(
            certificate(&inputs(&[mismatched]), "istio-system", &r),
            Err(CertError::Invalid(..))
        ));
        assert!(matches!(
            certificate(&inputs(&[garbage]), "istio-system", &r),
            Err(CertError::Invalid(..))
        ));
        assert_eq!(
            certificate(&inputs(&[]), "istio-system", &r),
            Err(CertError::Missing(key))
        );
        let cross = SecretObjectReference {
            name: "c".into(),
            namespace: Some("certs".into()),
            ..Default::default()
        };
        let in_certs = tls_secret("certs", "c", "a.example.com");
        assert!(matches!(
            certificate(&inputs(&[in_certs]), "istio-system", &cross),
            Err(CertError::NotPermitted(..))
        ));
    }

    #[test]
    fn conflicting_listeners_are_left_out() {
        let l = |name: &str, port: u16, protocol: &str, host: Option<&str>| Listener {
            protocol: protocol.into(),
            ..listener(name, port, host, None)
        };
        let got: Vec<Option<&str>> = conflicts(&[
            l("a", 443, "HTTPS", Some("*.example.com")),
            l("b", 443, "HTTPS", Some("*.other.org")),
            l("c", 443, "HTTP", None),
            l("d", 443, "HTTPS", Some("*.EXAMPLE.com")),
            l("a", 8443, "HTTPS", None),
            l("e", 80, "HTTP", None),
        ])
        .into_iter()
        .map(|c| c.map(|(reason, _)| reason))
        .collect();
        assert_eq!(
            got,
            [
                None,
                None,
                Some("ProtocolConflict"),
                Some("HostnameConflict"),
                Some("NameConflict"),
                None
            ]
        );
    }

    #[test]
    fn tcp_listeners_take_tcp_routes_only() {
        let gw = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: edge}\n\
                  spec:\n  gatewayClassName: istio\n  listeners: [{name: db, port: 5432, protocol: TCP}]\n";
        let tcp =
            "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: db, namespace: edge}\n\
                   spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{name: pg, port: 5432}]}]}\n";
        let http =
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: edge}\n\
                    spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{name: pg, port: 5432}]}]}\n";
        let svc =
            "apiVersion: v1\nkind: Service\nmetadata: {name: pg, namespace: edge}\nspec: {ports: [{port: 5432}]}\n";
        let (out, _) = run(&[gw.into(), tcp.into(), http.into(), svc.into()]);
        let l = &out.gateways["edge/gw"].listeners[0];
        assert_eq!(l.protocol, "TCP");
        let table = l.hosts[0].routes.as_ref().expect("table");
        assert_eq!(table.routes.len(), 1);
        assert!(table.routes[0].name.starts_with("TCPRoute/edge/db"));
        assert_eq!(table.routes[0].backends[0].service, "edge/pg.edge.svc.cluster.local");
        let web = out
            .route_parents
            .iter()
            .find(|p| p.route.name == "web")
            .expect("status");
        assert_eq!(cond(&web.conditions, "Accepted").reason, "NotAllowedByListeners");
        let db = out.route_parents.iter().find(|p| p.route.name == "db").expect("status");
        assert_eq!(db.kind, "TCPRoute");
        assert!(cond(&db.conditions, "Accepted").status);
    }

    #[test]
    fn tls_passthrough_listeners_take_tls_routes_by_sni() {
        let gw = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge}
spec:
  gatewayClassName: istio
  listeners:
  - {name: tls, port: 8443, protocol: TLS, hostname: "*.passthrough.test", tls: {mode: Passthrough}}
  - {name: terminate, port: 9443, protocol: TLS, tls: {mode: Terminate}}
  - name: wrong-kinds
    port: 7443
    protocol: TLS
    tls: {mode: Passthrough}
    allowedRoutes: {kinds: [{kind: HTTPRoute}]}
"#;
        let route = |name: &str, ns: &str, hosts: &str, backend: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {{name: {name}, namespace: {ns}}}\n\
                 spec: {{parentRefs: [{{name: gw, namespace: edge, sectionName: tls}}], hostnames: {hosts}, \
                 rules: [{{backendRefs: [{backend}]}}]}}\n"
            )
        };
        let db = route("db", "edge", "[db.passthrough.test]", "{name: db, port: 9443}");
        let other_host = route("elsewhere", "edge", "[db.example.org]", "{name: db, port: 9443}");
        let cross = route(
            "cross",
            "edge",
            "[x.passthrough.test]",
            "{name: db, namespace: data, port: 9443}",
        );
        let other_ns = route("stranger", "apps", "[y.passthrough.test]", "{name: db, port: 9443}");
        let http = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: edge}\n\
                    spec: {parentRefs: [{name: gw, sectionName: tls}], rules: [{backendRefs: [{name: db, port: 9443}]}]}\n";
        let svc = |ns: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: {ns}}}\nspec: {{ports: [{{port: 9443}}]}}\n")
        };
        let (out, _) = run(&[
            gw.into(),
            db,
            other_host,
            cross,
            other_ns,
            http.into(),
            svc("edge"),
            svc("data"),
        ]);
        let gateway = &out.gateways["edge/gw"];
        let names: Vec<&str> = gateway.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["tls", "wrong-kinds"], "TLS Terminate is not served");
        let tls = &gateway.listeners[0];
        assert_eq!((tls.protocol.as_str(), tls.certificates.len()), ("TLS", 0));
        let hosts: Vec<&str> = tls.hosts.iter().map(|h| h.hostname.as_str()).collect();
        assert_eq!(hosts, ["db.passthrough.test", "x.passthrough.test"]);
        let table = tls.hosts[0].routes.as_ref().expect("table");
        assert_eq!(table.routes[0].name, "TLSRoute/edge/db/rules[0]");
        assert_eq!(table.routes[0].backends[0].service, "edge/db.edge.svc.cluster.local");
        let cross_table = tls.hosts[1].routes.as_ref().expect("table");
        assert!(
            cross_table.routes.is_empty(),
            "a backend in another namespace without a ReferenceGrant is not used"
        );

        let parent = |name: &str| {
            let p = out.route_parents.iter().find(|p| p.route.name == name).expect("status");
            let c = |kind| cond(&p.conditions, kind).reason.clone();
            (p.kind.clone(), c("Accepted"), c("ResolvedRefs"))
        };
        let tls_route = |a: &str, r: &str| ("TLSRoute".to_owned(), a.to_owned(), r.to_owned());
        assert_eq!(parent("db"), tls_route("Accepted", "ResolvedRefs"));
        assert_eq!(
            parent("elsewhere"),
            tls_route("NoMatchingListenerHostname", "ResolvedRefs")
        );
        assert_eq!(parent("cross"), tls_route("Accepted", "RefNotPermitted"));
        // No db Service in `apps`: refused, and its backend does not resolve.
        assert_eq!(
            parent("stranger"),
            tls_route("NotAllowedByListeners", "BackendNotFound")
        );
        assert_eq!(parent("web").1, "NotAllowedByListeners", "HTTPRoute on a TLS listener");

        let status = &out.status[&ObjectKey::new("edge", "gw")];
        let listener = |name: &str| status.listeners.iter().find(|l| l.name == name).expect("listener");
        assert_eq!(listener("tls").attached_routes, 2);
        assert_eq!(listener("tls").supported_kinds, ["TLSRoute"]);
        assert_eq!(
            cond(&listener("terminate").conditions, "Accepted").reason,
            "UnsupportedValue"
        );
        let kinds = cond(&listener("wrong-kinds").conditions, "ResolvedRefs");
        assert_eq!((kinds.status, kinds.reason.as_str()), (false, "InvalidRouteKinds"));
        assert!(listener("wrong-kinds").supported_kinds.is_empty());

        // A ReferenceGrant in `data` for TLSRoutes from `edge` lets the backend be used.
        let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: data}\n\
                     spec: {from: [{group: gateway.networking.k8s.io, kind: TLSRoute, namespace: edge}], to: [{group: \"\", kind: Service}]}\n";
        let cross = route(
            "cross",
            "edge",
            "[x.passthrough.test]",
            "{name: db, namespace: data, port: 9443}",
        );
        let (out, _) = run(&[gw.into(), cross, svc("data"), grant.into()]);
        let table = out.gateways["edge/gw"].listeners[0].hosts[0]
            .routes
            .as_ref()
            .expect("table");
        assert_eq!(table.routes[0].backends[0].service, "data/db.data.svc.cluster.local");
        let granted = &out.route_parents[0];
        assert_eq!(cond(&granted.conditions, "ResolvedRefs").reason, "ResolvedRefs");
    }

    #[test]
    fn a_listener_serves_the_certificates_that_load() {
        let gw = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: good}, {name: missing}, {name: other-ns, namespace: certs}]}
"#;
        let good = tls_secret("istio-system", "good", "a.example.com");
        let other_ns = tls_secret("certs", "other-ns", "b.example.com");
        let (out, problems) = run(&[gw.to_owned(), good, other_ns]);
        let l = &out.gateways["istio-system/gw"].listeners[0];
        let secrets: Vec<&str> = l.certificates.iter().map(|c| c.secret.as_str()).collect();
        assert_eq!(secrets, ["istio-system/good"], "served with the certificate that loads");
        let status = &out.status[&ObjectKey::new("istio-system", "gw")].listeners[0];
        assert!(cond(&status.conditions, "Programmed").status);
        let resolved = cond(&status.conditions, "ResolvedRefs");
        assert_eq!(
            (resolved.status, resolved.reason.as_str()),
            (false, "InvalidCertificateRef")
        );
        for named in [
            "istio-system/missing does not exist",
            "certs/other-ns is in another namespace",
        ] {
            assert!(resolved.message.contains(named), "{}", resolved.message);
        }
        assert!(
            problems.iter().any(|p| p.message.contains("istio-system/missing")),
            "{problems:?}"
        );
    }
}
