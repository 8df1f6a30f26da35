//! Istio's security (`security.istio.io`) and traffic (`networking.istio.io`) kinds, in the
//! field names users write. Our structs name only the fields the mesh implements; every other
//! field of a spec is kept in the object's `unimplemented` list (by path) so translation
//! reports it, instead of serde dropping it unseen. An AuthorizationPolicy with such a field
//! fails closed: a misspelt `principal`, or a constraint we do not implement, must not
//! silently widen a policy. Workload selectors still reject unknown fields outright: a
//! misspelt `matchLabels` would select every workload.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::gateway::PolicyTargetReference;
use super::unknown::typed_spec;
use super::ObjectMeta;

/// `selector: {matchLabels: {...}}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// An AuthorizationPolicy. A spec that cannot be read does not make the object disappear
/// (that would silently drop a DENY): it is kept with `invalid` set, and translation turns
/// it into a policy that allows nothing in its namespace (and at its waypoint or ingress
/// targets) until it is fixed. A spec with fields we do not implement is invalid the same
/// way (each field is reported by path). An unreadable spec keeps the targets it names, read
/// on their own, so the waypoints and gateways it was written for still deny.
#[derive(Clone, Debug, Serialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
    #[serde(skip)]
    pub invalid: Option<String>,
    /// Paths of the spec's fields the mesh does not implement (`spec.rules[0]...`).
    #[serde(skip)]
    pub unimplemented: Vec<String>,
    /// An unreadable spec whose `targetRef` or `targetRefs` cannot be read either: the
    /// policy may have targeted anything in its namespace.
    #[serde(skip)]
    pub targets_unknown: bool,
}

/// The message `invalid` holds when the spec only has fields we do not implement; the
/// fields themselves are reported one by one, so it does not repeat them.
pub const AUTHZ_UNIMPLEMENTED_FIELDS: &str = "spec has fields the mesh does not implement (reported by path)";

#[derive(Deserialize)]
struct RawObject {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: serde_json::Value,
}

impl<'de> Deserialize<'de> for AuthorizationPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawObject::deserialize(d)?;
        // Read before the spec is consumed: only an unreadable spec needs them.
        let targets = targets_only(&raw.spec);
        Ok(match typed_spec::<AuthorizationPolicySpec>(raw.spec) {
            Ok((spec, unimplemented)) => AuthorizationPolicy {
                metadata: raw.metadata,
                spec,
                invalid: (!unimplemented.is_empty()).then(|| AUTHZ_UNIMPLEMENTED_FIELDS.to_owned()),
                unimplemented,
                targets_unknown: false,
            },
            Err(e) => {
                let (spec, targets_unknown) = targets;
                AuthorizationPolicy {
                    metadata: raw.metadata,
                    spec,
                    invalid: Some(format!("spec: {e}")),
                    unimplemented: Vec::new(),
                    targets_unknown,
                }
            }
        })
    }
}

/// The `targetRef` and `targetRefs` of a spec that does not parse as a whole, each read on
/// its own, and whether one is present but unreadable. Nothing else of the spec is kept.
fn targets_only(raw: &serde_json::Value) -> (AuthorizationPolicySpec, bool) {
    fn field<T: serde::de::DeserializeOwned>(raw: &serde_json::Value, name: &str) -> Result<Option<T>, ()> {
        match raw.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| ()),
        }
    }
    let target_ref = field::<PolicyTargetReference>(raw, "targetRef");
    let target_refs = field::<Vec<PolicyTargetReference>>(raw, "targetRefs");
    let unknown = target_ref.is_err() || target_refs.is_err();
    let spec = AuthorizationPolicySpec {
        target_ref: target_ref.ok().flatten(),
        target_refs: target_refs.ok().flatten().unwrap_or_default(),
        ..AuthorizationPolicySpec::default()
    };
    (spec, unknown)
}

/// An Istio object of a kind whose unreadable spec rejects the document, with the paths of
/// its spec's fields we do not implement.
macro_rules! lenient_object {
    ($(#[$doc:meta])* $name:ident($spec:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Serialize)]
        pub struct $name {
            pub metadata: ObjectMeta,
            pub spec: $spec,
            /// Paths of the spec's fields the mesh does not implement.
            #[serde(skip)]
            pub unimplemented: Vec<String>,
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = RawObject::deserialize(d)?;
                let (spec, unimplemented) = typed_spec(raw.spec).map_err(serde::de::Error::custom)?;
                Ok($name { metadata: raw.metadata, spec, unimplemented })
            }
        }
    };
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// ALLOW (default), DENY, AUDIT or CUSTOM.
    pub action: Option<String>,
    pub provider: Option<serde_json::Value>,
    /// Absent rules: an ALLOW matches nothing (deny all), a DENY denies nothing.
    pub rules: Option<Vec<Rule>>,
}

impl AuthorizationPolicySpec {
    /// `targetRef` and `targetRefs` together.
    pub fn targets(&self) -> impl Iterator<Item = &PolicyTargetReference> {
        self.target_ref.iter().chain(self.target_refs.iter())
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

lenient_object! {
    PeerAuthentication(PeerAuthenticationSpec)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MutualTls>,
    /// Port number (as a string key, the way YAML maps arrive) to mode.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct MutualTls {
    /// UNSET, DISABLE, PERMISSIVE or STRICT.
    pub mode: Option<String>,
}

lenient_object! {
    RequestAuthentication(RequestAuthenticationSpec)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

impl RequestAuthenticationSpec {
    pub fn targets(&self) -> impl Iterator<Item = &PolicyTargetReference> {
        self.target_ref.iter().chain(self.target_refs.iter())
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    /// Inline JWKS (JSON text).
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

lenient_object! {
/// `networking.istio.io` VirtualService: the HTTP routing subset waypoints apply.
    VirtualService(VirtualServiceSpec)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    /// Duration string such as `2s` or `250ms`.
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
}

/// Istio's `{exact|prefix|regex: ...}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    pub attempts: u32,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<String>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: Option<u32>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Percent {
    pub value: f64,
}

lenient_object! {
/// `networking.istio.io` DestinationRule: subsets and traffic policy for waypoints.
    DestinationRule(DestinationRuleSpec)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub load_balancer: Option<LoadBalancer>,
    /// TLS the waypoint originates to the destination.
    pub tls: Option<ClientTls>,
    /// Per-port settings; only `port` and `tls` are implemented (others are reported).
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub tls: Option<ClientTls>,
}

/// Istio's ClientTLSSettings.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    /// DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL.
    pub mode: Option<String>,
    /// File paths in the proxy: not available to a waypoint pod (reported).
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    /// A Secret in the waypoint's namespace: `tls.crt`/`tls.key`/`ca.crt` or
    /// `cert`/`key`/`cacert`, and optionally `<name>-cacert` holding the CA.
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// ROUND_ROBIN, LEAST_REQUEST, RANDOM or PASSTHROUGH.
    pub simple: Option<String>,
    pub locality_lb_setting: Option<LocalityLbSetting>,
}

/// Istio's LocalityLoadBalancerSetting (`distribute` and `failover` kept raw: reported).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityLbSetting {
    pub enabled: Option<bool>,
    #[serde(default)]
    pub failover_priority: Vec<String>,
    #[serde(default)]
    pub failover: Vec<serde_json::Value>,
    #[serde(default)]
    pub distribute: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<String>,
    pub idle_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    pub consecutive5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: Option<u32>,
}

lenient_object! {
/// `telemetry.istio.io` Telemetry: tracing, metric overrides and access logging for waypoints.
    Telemetry(TelemetrySpec)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub tracing: Vec<TelemetryTracing>,
    /// `None` when the section is absent (inherited); `Some(vec![])` replaces inherited ones.
    pub metrics: Option<Vec<TelemetryMetrics>>,
    #[serde(default)]
    pub access_logging: Vec<TelemetryAccessLogging>,
}

impl TelemetrySpec {
    pub fn targets(&self) -> impl Iterator<Item = &PolicyTargetReference> {
        self.target_ref.iter().chain(self.target_refs.iter())
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryProvider {
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryTracing {
    #[serde(default)]
    pub providers: Vec<TelemetryProvider>,
    pub random_sampling_percentage: Option<f64>,
    #[serde(default)]
    pub custom_tags: BTreeMap<String, CustomTag>,
    #[serde(default)]
    pub disable_span_reporting: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomTag {
    pub literal: Option<LiteralTag>,
    pub header: Option<NamedTag>,
    pub environment: Option<NamedTag>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct LiteralTag {
    #[serde(default)]
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamedTag {
    #[serde(default)]
    pub name: String,
    pub default_value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryMetrics {
    #[serde(default)]
    pub providers: Vec<TelemetryProvider>,
    #[serde(default)]
    pub overrides: Vec<MetricsOverride>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsOverride {
    #[serde(rename = "match")]
    pub match_: Option<MetricSelector>,
    pub disabled: Option<bool>,
    #[serde(default)]
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricSelector {
    pub metric: Option<String>,
    pub custom_metric: Option<String>,
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TagOverride {
    pub operation: Option<String>,
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryAccessLogging {
    #[serde(default)]
    pub providers: Vec<TelemetryProvider>,
    pub disabled: Option<bool>,
    pub filter: Option<AccessLogFilter>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogFilter {
    #[serde(default)]
    pub expression: String,
}
