//! Mesh-wide settings in Istio's MeshConfig shape (the `mesh` key of the `istio` ConfigMap,
//! mounted as a file as istiod reads it): `outboundTrafficPolicy.mode`, ALLOW_ANY (the
//! default: unknown destinations pass through) or REGISTRY_ONLY (ztunnel refuses them), and
//! the telemetry `extensionProviders` (tracing collectors, access-log sinks) with their
//! `defaultProviders`. Other MeshConfig fields are accepted and ignored. The file is polled; a change is sent to the
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
}

/// One `extensionProviders` entry; only the kinds waypoints export to are read: tracing
/// (`zipkin`, `opentelemetry`) and access logs (`envoyOtelAls`, `envoyFileAccessLog`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    pub zipkin: Option<Collector>,
    pub opentelemetry: Option<Collector>,
    /// Access logs to an OpenTelemetry collector (Istio's name; sent as OTLP/HTTP).
    pub envoy_otel_als: Option<Collector>,
    /// Access logs to a file; waypoints write theirs to stdout.
    pub envoy_file_access_log: Option<serde_yaml::Value>,
}

/// Where a collector listens (`service` is a host name or address, as Istio writes it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Collector {
    pub service: String,
    pub port: u16,
    /// OpenTelemetry over HTTP: `{path}`; gRPC collectors are not supported by waypoints.
    pub http: Option<OtlpHttp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct OtlpHttp {
    #[serde(default)]
    pub path: String,
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
    /// OTLP/HTTP logs endpoints.
    pub otlp: Vec<String>,
    /// Names that are no access-log provider (reported; nothing is written for them).
    pub unknown: Vec<String>,
}

/// Where a waypoint sends its spans.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TraceExport {
    /// A Zipkin v2 endpoint URL.
    Zipkin(String),
    /// An OTLP/HTTP traces endpoint URL.
    Otlp(String),
}

impl MeshConfig {
    /// The collector of tracing provider `name` (or of the default provider when `None`).
    pub fn trace_export(&self, name: Option<&str>) -> Option<TraceExport> {
        let name = name.or_else(|| self.default_providers.tracing.first().map(String::as_str))?;
        let p = self.extension_providers.iter().find(|p| p.name == name)?;
        let url = |c: &Collector, path: &str| format!("http://{}:{}{path}", c.service, c.port);
        if let Some(z) = &p.zipkin {
            return Some(TraceExport::Zipkin(url(z, "/api/v2/spans")));
        }
        let o = p.opentelemetry.as_ref()?;
        let path = o
            .http
            .as_ref()
            .map(|h| h.path.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/v1/traces");
        Some(TraceExport::Otlp(url(o, path)))
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
            if let Some(c) = p.envoy_otel_als.as_ref().or(p.opentelemetry.as_ref()) {
                let path = c
                    .http
                    .as_ref()
                    .map(|h| h.path.as_str())
                    .filter(|p| !p.is_empty() && *p != "/v1/traces")
                    .unwrap_or("/v1/logs");
                out.otlp.push(format!("http://{}:{}{path}", c.service, c.port));
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
    fn tracing_providers_resolve_to_collector_urls() {
        let cfg = parse(
            "extensionProviders:
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
- name: otel
  opentelemetry: {service: otel.obs.svc, port: 4318, http: {path: /v1/traces}}
- name: envoy-log
  envoyFileAccessLog: {path: /dev/stdout}
defaultProviders: {tracing: [zipkin]}
",
        )
        .unwrap();
        assert_eq!(
            cfg.trace_export(None),
            Some(TraceExport::Zipkin(
                "http://zipkin.istio-system.svc.cluster.local:9411/api/v2/spans".into()
            ))
        );
        assert_eq!(
            cfg.trace_export(Some("otel")),
            Some(TraceExport::Otlp("http://otel.obs.svc:4318/v1/traces".into()))
        );
        assert_eq!(cfg.trace_export(Some("envoy-log")), None);
        assert_eq!(cfg.trace_export(Some("missing")), None);
        assert_eq!(MeshConfig::default().trace_export(None), None);
    }

    #[test]
    fn access_log_providers_resolve_to_stdout_and_otlp_endpoints() {
        let cfg = parse(
            "extensionProviders:
- name: otel-als
  envoyOtelAls: {service: otel.obs.svc, port: 4318}
- name: otel
  opentelemetry: {service: 10.0.0.9, port: 4318, http: {path: /custom/logs}}
- name: file
  envoyFileAccessLog: {path: /dev/stdout}
- name: zipkin
  zipkin: {service: zipkin, port: 9411}
",
        )
        .unwrap();
        let s = cfg.access_log_sinks(&["otel-als", "otel"]);
        assert!(!s.stdout && s.unknown.is_empty());
        assert_eq!(
            s.otlp,
            ["http://otel.obs.svc:4318/v1/logs", "http://10.0.0.9:4318/custom/logs"]
        );
        let s = cfg.access_log_sinks(&["envoy", "file", "zipkin", "nope"]);
        assert!(s.stdout && s.otlp.is_empty());
        assert_eq!(s.unknown, ["zipkin", "nope"]);
        assert!(cfg.access_log_sinks(&[]).stdout, "nothing named anywhere: stdout");
        let with_default = MeshConfig {
            default_providers: DefaultProviders {
                access_logging: vec!["otel-als".into()],
                ..Default::default()
            },
            ..cfg
        };
        let s = with_default.access_log_sinks(&[]);
        assert!(!s.stdout);
        assert_eq!(s.otlp, ["http://otel.obs.svc:4318/v1/logs"]);
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
