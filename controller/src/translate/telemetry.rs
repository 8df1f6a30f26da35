//! Istio's Telemetry API → `mesh.waypoint.v1.Telemetry` policies. Scope as Istio has it: a
//! Telemetry in the root namespace without selector or targetRefs is mesh-wide, one elsewhere
//! without them covers its namespace, one with targetRefs its Gateways and Services (in its own
//! namespace only: others are dropped and reported, [`super::policy_target`]). Each
//! section (tracing, metrics, access logging) is carried only when written, so the waypoint
//! inherits per section. Expressions are parsed here with the waypoint's own parser
//! (`mesh_core::expr`): one that cannot be read is reported and left out, never sent.
//! Access-log providers are resolved against MeshConfig's `extensionProviders`: OpenTelemetry
//! ones become the OTLP logs endpoints the waypoint exports to (`envoyOtelAls` over gRPC, an
//! `opentelemetry` one with an `http` block over HTTP); `envoy` and file providers keep its
//! own (stdout) log. MeshConfig's `defaultProviders.accessLogging` applies mesh-wide as in
//! Istio, also with no Telemetry at all: it becomes a mesh-scope policy of its own that any
//! Telemetry writing access logging (mesh, namespace or targeted) overrides.

use std::collections::BTreeMap;

use mesh_proto::waypoint as wp;

use super::{policy_target, Options, Report};
use crate::mesh_config::MeshConfig;
use crate::model::istio::{Telemetry, TelemetrySpec};
use crate::model::{Inputs, Kind, ObjectKey};

/// Istio's metric names as `match.metric` writes them.
const METRICS: [&str; 5] = [
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
];

/// Key of the policy `defaultProviders.accessLogging` makes. The waypoint breaks ties between
/// mesh-scope policies by key, the smaller winning; this sorts after every `Telemetry/...`
/// key, so a mesh-wide Telemetry that writes access logging is chosen over the defaults.
pub(crate) const DEFAULT_PROVIDERS_KEY: &str = "TelemetryDefaults/mesh";

/// Every Telemetry's waypoint policy, by `Telemetry/<ns>/<name>`, and the default providers'
/// one by [`DEFAULT_PROVIDERS_KEY`].
pub(crate) fn translate(inputs: &Inputs, options: &Options, report: &mut Report) -> BTreeMap<String, wp::Policy> {
    let mut out = BTreeMap::new();
    if let Some(p) = default_providers(&inputs.mesh, options) {
        out.insert(DEFAULT_PROVIDERS_KEY.to_owned(), p);
    }
    for (key, t) in &inputs.telemetries {
        for path in &t.unimplemented {
            report.add(Kind::Telemetry, key, format!("{path} is not implemented; ignored"));
        }
        if let Some(p) = one(key, t, &inputs.mesh, options, report) {
            out.insert(format!("Telemetry/{key}"), p);
        }
    }
    out
}

/// The mesh-wide access logging of `defaultProviders.accessLogging`, when it names any.
fn default_providers(mesh: &MeshConfig, options: &Options) -> Option<wp::Policy> {
    if mesh.default_providers.access_logging.is_empty() {
        return None;
    }
    let sinks = mesh.access_log_sinks(&[]);
    for name in &sinks.unknown {
        tracing::warn!(provider = %name, "defaultProviders.accessLogging names no access-log provider; nothing is written for it");
    }
    let telemetry = wp::Telemetry {
        scope: wp::telemetry::Scope::Mesh as i32,
        access_log: Some(wp::TelemetryAccessLog {
            otlp: sinks.otlp,
            no_stdout: !sinks.stdout,
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(wp::Policy {
        name: "default-providers".to_owned(),
        namespace: options.root_namespace.clone(),
        targets: Vec::new(),
        kind: Some(wp::policy::Kind::Telemetry(telemetry)),
    })
}

fn one(
    key: &ObjectKey,
    t: &Telemetry,
    mesh: &MeshConfig,
    options: &Options,
    report: &mut Report,
) -> Option<wp::Policy> {
    let spec = &t.spec;
    if spec.selector.is_some() {
        report.add(
            Kind::Telemetry,
            key,
            "spec.selector picks sidecar workloads; waypoints apply Telemetry with targetRefs, so it is ignored",
        );
        return None;
    }
    // Targets in another namespace are dropped (reported by `own_namespace`); a Telemetry
    // written with targets stays targeted even when none is left (then it is not sent), never
    // namespace- or mesh-wide.
    let own = policy_target::own_namespace(
        spec.target_ref.as_ref(),
        &spec.target_refs,
        Kind::Telemetry,
        key,
        report,
    );
    let own_count = own.len();
    let targets: Vec<wp::Target> = own
        .into_iter()
        .filter(|(_, r)| matches!(r.kind.as_str(), "Gateway" | "Service"))
        .map(|(_, r)| wp::Target {
            kind: r.kind.clone(),
            namespace: key.namespace.clone(),
            name: r.name.clone(),
        })
        .collect();
    if own_count != targets.len() {
        report.add(
            Kind::Telemetry,
            key,
            "spec.targetRefs: only Gateway and Service are applied; others ignored",
        );
    }
    let scope = if !targets.is_empty() {
        wp::telemetry::Scope::Targeted
    } else if spec.targets().next().is_some() {
        return None;
    } else if key.namespace == options.root_namespace {
        wp::telemetry::Scope::Mesh
    } else {
        wp::telemetry::Scope::Namespace
    };
    let telemetry = wp::Telemetry {
        scope: scope as i32,
        tracing: tracing(key, spec, report),
        has_metrics: spec.metrics.is_some(),
        metrics: metrics(key, spec, report),
        access_log: access_log(key, spec, mesh, report),
    };
    Some(wp::Policy {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        targets,
        kind: Some(wp::policy::Kind::Telemetry(telemetry)),
    })
}

fn tracing(key: &ObjectKey, spec: &TelemetrySpec, report: &mut Report) -> Option<wp::TelemetryTracing> {
    let t = spec.tracing.first()?;
    if spec.tracing.len() > 1 {
        report.add(Kind::Telemetry, key, "spec.tracing: only the first entry is applied");
    }
    let sampling = t.random_sampling_percentage.filter(|p| (0.0..=100.0).contains(p));
    if t.random_sampling_percentage.is_some() && sampling.is_none() {
        report.add(
            Kind::Telemetry,
            key,
            "spec.tracing[0].randomSamplingPercentage must be 0 to 100; ignored",
        );
    }
    let mut custom_tags = Vec::new();
    for (name, tag) in &t.custom_tags {
        let default_value = |n: &crate::model::istio::NamedTag| n.default_value.clone().unwrap_or_default();
        let (kind, default) = match (&tag.literal, &tag.header, &tag.environment) {
            (Some(l), None, None) => (wp::custom_tag::Kind::Literal(l.value.clone()), String::new()),
            (None, Some(h), None) => (
                wp::custom_tag::Kind::Header(h.name.to_ascii_lowercase()),
                default_value(h),
            ),
            (None, None, Some(e)) => (wp::custom_tag::Kind::Environment(e.name.clone()), default_value(e)),
            _ => {
                report.add(
                    Kind::Telemetry,
                    key,
                    format!(
                        "spec.tracing[0].customTags.{name} needs exactly one of literal, header, environment; ignored"
                    ),
                );
                continue;
            }
        };
        custom_tags.push(wp::CustomTag {
            name: name.clone(),
            kind: Some(kind),
            default_value: default,
        });
    }
    Some(wp::TelemetryTracing {
        has_sampling: sampling.is_some(),
        sampling: sampling.unwrap_or_default(),
        custom_tags,
        disable_span_reporting: t.disable_span_reporting,
    })
}

fn metrics(key: &ObjectKey, spec: &TelemetrySpec, report: &mut Report) -> Vec<wp::MetricOverride> {
    let mut out = Vec::new();
    for (i, m) in spec.metrics.iter().flatten().enumerate() {
        for (j, o) in m.overrides.iter().enumerate() {
            let at = format!("spec.metrics[{i}].overrides[{j}]");
            let selector = o.match_.as_ref();
            if selector.and_then(|s| s.custom_metric.as_ref()).is_some() {
                report.add(
                    Kind::Telemetry,
                    key,
                    format!("{at}.match.customMetric is not implemented; ignored"),
                );
                continue;
            }
            let metric = selector
                .and_then(|s| s.metric.clone())
                .unwrap_or_else(|| "ALL_METRICS".to_owned());
            if !METRICS.contains(&metric.as_str()) {
                report.add(
                    Kind::Telemetry,
                    key,
                    format!("{at}.match.metric {metric:?} is not a metric waypoints report; ignored"),
                );
                continue;
            }
            let mut tags = Vec::new();
            for (name, t) in &o.tag_overrides {
                let remove = t.operation.as_deref() == Some("REMOVE");
                let value = t.value.clone().unwrap_or_default();
                if !remove {
                    if let Err(e) = mesh_core::expr::parse_value(&value) {
                        report.add(
                            Kind::Telemetry,
                            key,
                            format!("{at}.tagOverrides.{name}.value {value:?}: {e}; ignored"),
                        );
                        continue;
                    }
                }
                tags.push(wp::TagOverride {
                    name: name.clone(),
                    remove,
                    value,
                });
            }
            out.push(wp::MetricOverride {
                metric,
                disabled: o.disabled.unwrap_or(false),
                tags,
            });
        }
    }
    out
}

fn access_log(
    key: &ObjectKey,
    spec: &TelemetrySpec,
    mesh: &MeshConfig,
    report: &mut Report,
) -> Option<wp::TelemetryAccessLog> {
    let a = spec.access_logging.first()?;
    if spec.access_logging.len() > 1 {
        report.add(
            Kind::Telemetry,
            key,
            "spec.accessLogging: only the first entry is applied",
        );
    }
    let names: Vec<&str> = a.providers.iter().map(|p| p.name.as_str()).collect();
    let sinks = mesh.access_log_sinks(&names);
    for name in &sinks.unknown {
        report.add(
            Kind::Telemetry,
            key,
            format!(
                "spec.accessLogging[0].providers: {name:?} is not an access-log provider of the mesh config \
                 (envoy, envoyFileAccessLog, envoyOtelAls, opentelemetry); nothing is written for it"
            ),
        );
    }
    let mut filter = a.filter.as_ref().map(|f| f.expression.clone()).unwrap_or_default();
    if !filter.is_empty() {
        if let Err(e) = mesh_core::expr::parse_filter(&filter) {
            report.add(
                Kind::Telemetry,
                key,
                format!("spec.accessLogging[0].filter.expression {filter:?}: {e}; every request is logged"),
            );
            filter.clear();
        }
    }
    Some(wp::TelemetryAccessLog {
        disabled: a.disabled.unwrap_or(false),
        filter,
        otlp: sinks.otlp,
        no_stdout: !sinks.stdout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest_dir::{parse_text, Loaded};

    fn translated(yaml: &str) -> (BTreeMap<String, wp::Policy>, Vec<String>) {
        translated_with(yaml, MeshConfig::default())
    }

    fn translated_with(yaml: &str, mesh: MeshConfig) -> (BTreeMap<String, wp::Policy>, Vec<String>) {
        let mut loaded = Loaded::default();
        parse_text(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut inputs = Inputs {
            mesh,
            ..Default::default()
        };
        for o in loaded.objects {
            inputs.apply(o);
        }
        let mut report = Report::default();
        let out = translate(&inputs, &Options::default(), &mut report);
        (out, report.0.into_iter().map(|p| p.message).collect())
    }

    /// A Telemetry in `evil` naming shop's Service: that target is dropped and reported, its
    /// own-namespace one kept; one whose only target is foreign is not sent (and does not
    /// become evil's namespace-wide Telemetry).
    #[test]
    fn foreign_namespace_targets_are_dropped() {
        let (out, problems) = translated(
            r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mixed, namespace: evil}
spec:
  targetRefs:
  - {kind: Service, group: "", name: web}
  - {kind: Service, group: "", name: payments, namespace: shop}
  accessLogging: [{disabled: true}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: blind-shop, namespace: evil}
spec:
  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: shop}
  accessLogging: [{disabled: true}]
"#,
        );
        assert_eq!(out.keys().collect::<Vec<_>>(), ["Telemetry/evil/mixed"]);
        let p = &out["Telemetry/evil/mixed"];
        let targets: Vec<(&str, &str)> = p
            .targets
            .iter()
            .map(|t| (t.namespace.as_str(), t.name.as_str()))
            .collect();
        assert_eq!(targets, [("evil", "web")]);
        let Some(wp::policy::Kind::Telemetry(t)) = &p.kind else {
            panic!("{p:?}")
        };
        assert_eq!(t.scope, wp::telemetry::Scope::Targeted as i32);
        for path in ["spec.targetRefs[1]", "spec.targetRef"] {
            let expected = format!(
                "{path}.namespace \"shop\": a policy applies only in its own namespace (evil); this target is ignored"
            );
            assert!(problems.contains(&expected), "{expected} not in {problems:?}");
        }
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn scopes_sections_and_bad_expressions() {
        let (out, problems) = translated(
            r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: zipkin}]
    randomSamplingPercentage: 10
    customTags:
      environment: {literal: {value: production}}
      user: {header: {name: X-User, defaultValue: anonymous}}
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT}
      tagOverrides:
        request_host: {operation: UPSERT, value: request.host}
        request_protocol: {operation: REMOVE}
        broken: {value: "request.host =="}
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: "response.code >= 500"}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: shop, namespace: shop}
spec:
  accessLogging:
  - filter: {expression: "response.size > 1"}
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: payments, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: payments}]
  metrics:
  - overrides: [{disabled: true}]
"#,
        );
        let tel = |k: &str| match &out[k].kind {
            Some(wp::policy::Kind::Telemetry(t)) => t.clone(),
            other => panic!("{other:?}"),
        };
        let mesh = tel("Telemetry/istio-system/mesh-default");
        assert_eq!(mesh.scope, wp::telemetry::Scope::Mesh as i32);
        let tracing = mesh.tracing.expect("tracing");
        assert!(tracing.has_sampling && (tracing.sampling - 10.0).abs() < f64::EPSILON);
        assert_eq!(tracing.custom_tags.len(), 2);
        assert_eq!(mesh.metrics[0].metric, "REQUEST_COUNT");
        let names: Vec<_> = mesh.metrics[0]
            .tags
            .iter()
            .map(|t| (t.name.as_str(), t.remove))
            .collect();
        assert_eq!(names, [("request_host", false), ("request_protocol", true)]);
        assert_eq!(mesh.access_log.expect("log").filter, "response.code >= 500");

        let ns = tel("Telemetry/shop/shop");
        assert_eq!(ns.scope, wp::telemetry::Scope::Namespace as i32);
        assert!(!ns.has_metrics && ns.tracing.is_none());
        assert_eq!(
            ns.access_log.expect("log").filter,
            "",
            "an unreadable filter logs everything"
        );

        let targeted = tel("Telemetry/shop/payments");
        assert_eq!(targeted.scope, wp::telemetry::Scope::Targeted as i32);
        assert!(targeted.has_metrics && targeted.metrics[0].disabled);
        assert_eq!(targeted.metrics[0].metric, "ALL_METRICS");

        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("tagOverrides.broken.value")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("unknown attribute \"response.size\"")),
            "{problems:?}"
        );
    }

    /// `defaultProviders.accessLogging` logs mesh-wide with no Telemetry at all (Istio), and a
    /// Telemetry that writes access logging (here a namespace one) is more specific.
    #[test]
    fn default_access_log_providers_apply_without_any_telemetry() {
        let mesh = crate::mesh_config::parse(
            "extensionProviders:\n- name: otel\n  envoyOtelAls: {service: otel.obs.svc, port: 4317}\n\
             defaultProviders: {accessLogging: [otel]}\n",
        )
        .unwrap();
        let (out, problems) = translated_with("", mesh.clone());
        assert!(problems.is_empty(), "{problems:?}");
        let p = out
            .get(DEFAULT_PROVIDERS_KEY)
            .expect("a mesh-wide policy from the defaults");
        let Some(wp::policy::Kind::Telemetry(t)) = &p.kind else {
            panic!("{p:?}")
        };
        assert_eq!(t.scope, wp::telemetry::Scope::Mesh as i32);
        assert!(t.tracing.is_none() && !t.has_metrics, "only access logging");
        let log = t.access_log.clone().expect("access log");
        assert_eq!(
            (log.otlp.as_slice(), log.no_stdout),
            (&["grpc://otel.obs.svc:4317".to_owned()][..], true)
        );
        assert!(
            "Telemetry/istio-system/a" < DEFAULT_PROVIDERS_KEY && "Telemetry/~" < DEFAULT_PROVIDERS_KEY,
            "a mesh-wide Telemetry wins the tie"
        );
        let (out, _) = translated_with(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: off, namespace: shop}\n\
             spec:\n  accessLogging: [{disabled: true}]\n",
            mesh,
        );
        assert!(out.contains_key(DEFAULT_PROVIDERS_KEY) && out.contains_key("Telemetry/shop/off"));
        let (out, _) = translated_with("", MeshConfig::default());
        assert!(out.is_empty(), "no default providers: no policy");
    }

    /// Access-log providers: an OpenTelemetry one becomes the waypoint's OTLP endpoint and
    /// turns its own log off unless `envoy` is named too; an unknown name is reported.
    #[test]
    fn access_log_providers_from_the_mesh_config() {
        let mesh = crate::mesh_config::parse(
            "extensionProviders:\n- name: otel\n  envoyOtelAls: {service: 10.0.0.7, port: 4317}\n",
        )
        .unwrap();
        let doc = |name: &str, providers: &str| {
            format!(
                "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: ns-{name}}}\n\
                 spec:\n  accessLogging: [{{providers: [{providers}]}}]\n---\n"
            )
        };
        let yaml = doc("a", "{name: otel}") + &doc("b", "{name: otel}, {name: envoy}") + &doc("c", "{name: nope}");
        let (out, problems) = translated_with(&yaml, mesh);
        let log = |k: &str| match &out[k].kind {
            Some(wp::policy::Kind::Telemetry(t)) => t.access_log.clone().expect("access log"),
            other => panic!("{other:?}"),
        };
        let a = log("Telemetry/ns-a/a");
        assert_eq!(
            (a.otlp.as_slice(), a.no_stdout),
            (&["grpc://10.0.0.7:4317".to_owned()][..], true)
        );
        let b = log("Telemetry/ns-b/b");
        assert_eq!((b.otlp.len(), b.no_stdout), (1, false));
        let c = log("Telemetry/ns-c/c");
        assert!(
            c.otlp.is_empty() && c.no_stdout,
            "an unknown provider writes nothing, as in Istio"
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("\"nope\""), "{problems:?}");
    }
}
