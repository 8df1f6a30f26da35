//! Mesh-wide settings in Istio's MeshConfig shape (the `mesh` key of the `istio` ConfigMap,
//! mounted as a file as istiod reads it): `outboundTrafficPolicy.mode`, ALLOW_ANY (the
//! default: unknown destinations pass through) or REGISTRY_ONLY (ztunnel refuses them), and
//! the telemetry `extensionProviders` (tracing collectors, access-log sinks) with their
//! `defaultProviders`, and `pathNormalization` (how waypoints and gateways normalise request
//! paths; given to them as `--path-normalization`). Other MeshConfig fields are accepted and ignored. The file is polled; a change is sent to the
//! controller's loop as [`Change::MeshConfig`] and reaches ztunnels with the next push, so no
//! component restarts. An unreadable or invalid file keeps the last good settings (logged), and
//! one at start-up stops the controller (`read`, called first): falling back to the defaults
//! could turn REGISTRY_ONLY into ALLOW_ANY. A missing file means the defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::source::{Change, ChangeSender};

/// What ztunnel does with a destination that is neither a mesh workload, a service nor a
/// ServiceEntry address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    #[default]
    AllowAny,
    RegistryOnly,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: OutboundMode,
}

/// The settings the mesh reads from MeshConfig.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Telemetry providers (tracing collectors), as `meshConfig.extensionProviders`.
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
    #[serde(default)]
    pub default_providers: DefaultProviders,
    #[serde(default)]
    pub path_normalization: PathNormalization,
}

/// `pathNormalization`: how request paths are normalised before policy and routing read them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PathNormalization {
    #[serde(default)]
    pub normalization: Normalization,
}

/// Istio's `ProxyPathNormalization.NormalizationType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Normalization {
    /// `BASE`.
    #[default]
    Default,
    /// No normalisation in Istio. Not offered: waypoints keep `BASE`, since their policies
    /// and routes must read one canonical path (logged when read).
    None,
    Base,
    MergeSlashes,
    DecodeAndMergeSlashes,
}

impl Normalization {
    /// The waypoint's `--path-normalization` value; `None` for its default, `BASE`.
    pub fn waypoint_flag(self) -> Option<&'static str> {
        match self {
            Normalization::Default | Normalization::None | Normalization::Base => None,
            Normalization::MergeSlashes => Some("merge-slashes"),
            Normalization::DecodeAndMergeSlashes => Some("decode-and-merge-slashes"),
        }
    }
}

/// One `extensionProviders` entry; only the kinds waypoints export to are read: tracing
/// (`zipkin`, `opentelemetry`) and access logs (`envoyOtelAls`, `envoyFileAccessLog`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    pub zipkin: Option<Collector>,
    pub opentelemetry: Option<Collector>,
    /// Access logs to an OpenTelemetry collector (Istio's `EnvoyOpenTelemetryLogProvider`:
    /// OTLP/gRPC `LogsService`, as Envoy's OpenTelemetry access logger sends them).
    pub envoy_otel_als: Option<Collector>,
    /// Access logs to a file; waypoints write theirs to stdout.
    pub envoy_file_access_log: Option<serde_yaml::Value>,
}

/// Where a collector listens (`service` is `[<namespace>/]<host>`, as Istio writes it).
/// Istio's other fields (`logName`, `logFormat`, `maxTagLength`, `grpc`, ...) are accepted
/// and not used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Collector {
    pub service: String,
    pub port: u16,
    /// `opentelemetry` only: OTLP/HTTP at `{path}` instead of OTLP/gRPC (Istio's `http`).
    pub http: Option<OtlpHttp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct OtlpHttp {
    #[serde(default)]
    pub path: String,
}

impl Collector {
    /// The host without Istio's optional `<namespace>/` prefix.
    fn host(&self) -> &str {
        self.service.rsplit('/').next().unwrap_or(&self.service)
    }

    /// OTLP/gRPC: `grpc://host:port` (the waypoint calls the collector service's Export).
    fn grpc(&self) -> String {
        format!("grpc://{}:{}", self.host(), self.port)
    }

    /// OTLP/HTTP: `http://host:port<path>` (`default` when the path is empty).
    fn http_url(&self, path: &str, default: &str) -> String {
        let path = if path.is_empty() { default } else { path };
        format!("http://{}:{}{path}", self.host(), self.port)
    }
}

/// `defaultProviders`: the providers used when no Telemetry names one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DefaultProviders {
    #[serde(default)]
    pub tracing: Vec<String>,
    #[serde(default)]
    pub access_logging: Vec<String>,
}

/// Where a waypoint writes the access log of one Telemetry's `accessLogging` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessLogSinks {
    /// Its own log (stdout): Istio's built-in `envoy` provider, an `envoyFileAccessLog` one,
    /// or no provider named anywhere.
    pub stdout: bool,
    /// OTLP logs endpoints: `grpc://host:port` (OTLP/gRPC) or `http://host:port/path`.
    pub otlp: Vec<String>,
    /// Names that are no access-log provider (reported; nothing is written for them).
    pub unknown: Vec<String>,
}

/// Where a waypoint sends its spans.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TraceExport {
    /// A Zipkin v2 endpoint URL.
    Zipkin(String),
    /// An OTLP traces endpoint: `grpc://host:port` (OTLP/gRPC, Istio's default for an
    /// `opentelemetry` provider) or `http://host:port/path` (one with an `http` block).
    Otlp(String),
}

impl MeshConfig {
    /// The `--path-normalization` deployed waypoints and gateways get; `None`: their default.
    pub fn waypoint_path_normalization(&self) -> Option<String> {
        self.path_normalization.normalization.waypoint_flag().map(str::to_owned)
    }

    /// The collector of tracing provider `name` (or of the default provider when `None`).
    pub fn trace_export(&self, name: Option<&str>) -> Option<TraceExport> {
        let name = name.or_else(|| self.default_providers.tracing.first().map(String::as_str))?;
        let p = self.extension_providers.iter().find(|p| p.name == name)?;
        if let Some(z) = &p.zipkin {
            return Some(TraceExport::Zipkin(z.http_url("/api/v2/spans", "")));
        }
        let o = p.opentelemetry.as_ref()?;
        Some(TraceExport::Otlp(match &o.http {
            Some(h) => o.http_url(&h.path, "/v1/traces"),
            None => o.grpc(),
        }))
    }
}

impl MeshConfig {
    /// Where the access log of an entry naming `names` goes (none named: the default
    /// providers; none of those either: stdout, the waypoint's own log).
    pub fn access_log_sinks(&self, names: &[&str]) -> AccessLogSinks {
        let defaults: Vec<&str> = self
            .default_providers
            .access_logging
            .iter()
            .map(String::as_str)
            .collect();
        let names = if names.is_empty() { &defaults[..] } else { names };
        let mut out = AccessLogSinks {
            stdout: names.is_empty(),
            ..Default::default()
        };
        for &name in names {
            let Some(p) = self.extension_providers.iter().find(|p| p.name == name) else {
                // Istio's built-in provider: Envoy's stdout log.
                if name == "envoy" {
                    out.stdout = true;
                } else {
                    out.unknown.push(name.to_owned());
                }
                continue;
            };
            if let Some(c) = &p.envoy_otel_als {
                // Istio's provider has no HTTP form: always OTLP/gRPC.
                out.otlp.push(c.grpc());
            } else if let Some(c) = &p.opentelemetry {
                out.otlp.push(match &c.http {
                    Some(h) if h.path != "/v1/traces" => c.http_url(&h.path, "/v1/logs"),
                    Some(_) => c.http_url("", "/v1/logs"),
                    None => c.grpc(),
                });
            } else if p.envoy_file_access_log.is_some() {
                out.stdout = true;
            } else {
                out.unknown.push(name.to_owned());
            }
        }
        out
    }
}

/// Why a mesh config file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, serde_yaml::Error),
}

/// Parses MeshConfig YAML (empty text: the defaults).
pub fn parse(text: &str) -> Result<MeshConfig, serde_yaml::Error> {
    if text.trim().is_empty() {
        return Ok(MeshConfig::default());
    }
    serde_yaml::from_str(text)
}

/// The file's settings: defaults when it does not exist.
pub fn read(path: &PathBuf) -> Result<MeshConfig, MeshConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map_err(|e| MeshConfigError::Parse(path.clone(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MeshConfig::default()),
        Err(e) => Err(MeshConfigError::Read(path.clone(), e)),
    }
}

/// Sends the file's settings now and whenever they change; returns when the loop is gone.
pub async fn watch(path: PathBuf, interval: Duration, tx: ChangeSender) {
    let mut last: Option<MeshConfig> = None;
    let mut last_error: Option<String> = None;
    loop {
        let result = read(&path);
        if result.is_ok() {
            last_error = None;
        }
        match result {
            Ok(cfg) if last.as_ref() != Some(&cfg) => {
                tracing::info!(path = %path.display(), ?cfg, "mesh config");
                if cfg.path_normalization.normalization == Normalization::None {
                    tracing::warn!(path = %path.display(), "pathNormalization NONE is not offered: waypoints normalise paths as BASE");
                }
                last = Some(cfg.clone());
                if tx.send(Change::MeshConfig(cfg)).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            // Never a fallback to the defaults: that could widen REGISTRY_ONLY to ALLOW_ANY.
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "mesh config unreadable; keeping the last good one");
                    last_error = Some(text);
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    async fn wait(rx: &mut tokio::sync::mpsc::Receiver<Change>) -> OutboundMode {
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Some(Change::MeshConfig(c))) => c.outbound_traffic_policy.mode,
            other => panic!("no mesh config change: {other:?}"),
        }
    }

    #[test]
    fn istio_mesh_config_is_read_and_other_fields_ignored() {
        let cfg = parse("accessLogFile: /dev/stdout\noutboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n").unwrap();
        assert_eq!(cfg.outbound_traffic_policy.mode, OutboundMode::RegistryOnly);
        assert_eq!(parse("").unwrap(), MeshConfig::default());
        assert_eq!(
            parse("outboundTrafficPolicy: {}\n")
                .unwrap()
                .outbound_traffic_policy
                .mode,
            OutboundMode::AllowAny
        );
        assert!(parse("outboundTrafficPolicy: {mode: SOMETIMES}\n").is_err());
    }

    #[test]
    fn path_normalization_is_read_in_istio_s_spelling() {
        let table = [
            ("", None),
            ("pathNormalization: {}\n", None),
            ("pathNormalization: {normalization: DEFAULT}\n", None),
            ("pathNormalization: {normalization: BASE}\n", None),
            ("pathNormalization: {normalization: NONE}\n", None),
            (
                "pathNormalization: {normalization: MERGE_SLASHES}\n",
                Some("merge-slashes"),
            ),
            (
                "pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}\n",
                Some("decode-and-merge-slashes"),
            ),
        ];
        for (text, want) in table {
            let cfg = parse(text).unwrap();
            assert_eq!(cfg.path_normalization.normalization.waypoint_flag(), want, "{text}");
        }
        assert!(parse("pathNormalization: {normalization: MERGE}\n").is_err());
    }

    /// Istio's provider documents as its docs write them, and what the waypoint is told.
    const PROVIDERS: &str = "extensionProviders:
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
- name: otel-grpc
  opentelemetry: {service: observability/otel.obs.svc.cluster.local, port: 4317, maxTagLength: 256}
- name: otel-http
  opentelemetry:
    service: otel.obs.svc
    port: 4318
    http: {path: /v1/traces, timeout: 10s, headers: [{name: x-tenant, value: a}]}
- name: otel-http-custom
  opentelemetry: {service: 10.0.0.9, port: 4318, http: {path: /custom/logs}}
- name: otel-als
  envoyOtelAls: {service: opentelemetry-collector.observability.svc.cluster.local, port: 4317, logName: waypoint}
- name: otel-als-ns
  envoyOtelAls: {service: observability/otel.obs.svc, port: 4317, logFormat: {labels: {pod: x}}}
- name: file
  envoyFileAccessLog: {path: /dev/stdout}
";

    #[test]
    fn tracing_providers_resolve_to_collectors() {
        let cfg = parse(&format!("{PROVIDERS}defaultProviders: {{tracing: [zipkin]}}\n")).unwrap();
        let otlp = |s: &str| Some(TraceExport::Otlp(s.into()));
        let table: [(Option<&str>, Option<TraceExport>); 7] = [
            (
                None,
                Some(TraceExport::Zipkin(
                    "http://zipkin.istio-system.svc.cluster.local:9411/api/v2/spans".into(),
                )),
            ),
            // No `http` block: OTLP/gRPC, as Envoy's OpenTelemetry tracer; the namespace prefix goes.
            (Some("otel-grpc"), otlp("grpc://otel.obs.svc.cluster.local:4317")),
            (Some("otel-http"), otlp("http://otel.obs.svc:4318/v1/traces")),
            (Some("otel-http-custom"), otlp("http://10.0.0.9:4318/custom/logs")),
            (Some("otel-als"), None),
            (Some("file"), None),
            (Some("missing"), None),
        ];
        for (name, want) in table {
            assert_eq!(cfg.trace_export(name), want, "{name:?}");
        }
        assert_eq!(MeshConfig::default().trace_export(None), None);
    }

    #[test]
    fn access_log_providers_resolve_to_stdout_and_otlp_endpoints() {
        let cfg = parse(PROVIDERS).unwrap();
        struct Row {
            names: &'static [&'static str],
            stdout: bool,
            otlp: &'static [&'static str],
            unknown: &'static [&'static str],
        }
        let row = |names, stdout, otlp, unknown| Row {
            names,
            stdout,
            otlp,
            unknown,
        };
        let table = [
            // envoyOtelAls is OTLP/gRPC (collectors' 4317), never HTTP.
            row(
                &["otel-als"],
                false,
                &["grpc://opentelemetry-collector.observability.svc.cluster.local:4317"],
                &[],
            ),
            row(&["otel-als-ns"], false, &["grpc://otel.obs.svc:4317"], &[]),
            row(&["otel-grpc"], false, &["grpc://otel.obs.svc.cluster.local:4317"], &[]),
            row(&["otel-http"], false, &["http://otel.obs.svc:4318/v1/logs"], &[]),
            row(&["otel-http-custom"], false, &["http://10.0.0.9:4318/custom/logs"], &[]),
            row(&["envoy", "file", "zipkin", "nope"], true, &[], &["zipkin", "nope"]),
            row(&[], true, &[], &[]),
        ];
        for r in table {
            let s = cfg.access_log_sinks(r.names);
            assert_eq!(s.stdout, r.stdout, "{:?}", r.names);
            assert_eq!(s.otlp, r.otlp, "{:?}", r.names);
            assert_eq!(s.unknown, r.unknown, "{:?}", r.names);
        }
        let with_default = MeshConfig {
            default_providers: DefaultProviders {
                access_logging: vec!["otel-als-ns".into()],
                ..Default::default()
            },
            ..cfg
        };
        let s = with_default.access_log_sinks(&[]);
        assert!(!s.stdout, "nothing named: the default providers");
        assert_eq!(s.otlp, ["grpc://otel.obs.svc:4317"]);
    }

    #[tokio::test]
    async fn changes_are_sent_and_a_bad_file_keeps_the_last_good_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh");
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let task = tokio::spawn(watch(path.clone(), Duration::from_millis(5), tx));
        assert_eq!(wait(&mut rx).await, OutboundMode::AllowAny, "missing file: defaults");
        std::fs::write(&path, "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n").unwrap();
        assert_eq!(wait(&mut rx).await, OutboundMode::RegistryOnly);
        std::fs::write(&path, "outboundTrafficPolicy: [\n").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "an invalid file changes nothing");
        std::fs::write(&path, "outboundTrafficPolicy: {mode: ALLOW_ANY}\n").unwrap();
        assert_eq!(wait(&mut rx).await, OutboundMode::AllowAny);
        task.abort();
    }
}
