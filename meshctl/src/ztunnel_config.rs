//! `meshctl ztunnel-config`: ztunnel's admin `/config_dump` (workloads, services, policies,
//! certificates, as serialized by ztunnel/src/admin.rs from mesh-core's state model) shown as
//! tables or as the selected JSON/YAML sub-document. ztunnel has no per-connection dump, so
//! `connections` is derived from the TCP connection counters on the same server's `/metrics`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::http::{self, HttpError, Url};
use crate::table::Table;

/// Why the dump could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("{url} did not return JSON: {source}")]
    Json { url: String, source: serde_json::Error },
    #[error("cannot encode output: {0}")]
    Encode(String),
}

/// Which part of the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Workloads,
    Services,
    Policies,
    Certificates,
    Connections,
}

impl Section {
    pub fn key(self) -> &'static str {
        match self {
            Section::Workloads => "workloads",
            Section::Services => "services",
            Section::Policies => "policies",
            Section::Certificates => "certificates",
            Section::Connections => "connections",
        }
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

fn fetch_text(url: &Url, timeout: Duration) -> Result<String, ConfigError> {
    let r = http::get(url, timeout)?;
    if r.status != 200 {
        return Err(ConfigError::Status {
            url: format!("http://{}{}", url.addr(), url.path),
            status: r.status,
            body: r.body.trim().to_owned(),
        });
    }
    Ok(r.body)
}

/// GETs `<admin>/config_dump`.
pub fn fetch_dump(admin: &Url, timeout: Duration) -> Result<Value, ConfigError> {
    let url = admin.with_path("/config_dump");
    let body = fetch_text(&url, timeout)?;
    serde_json::from_str(&body).map_err(|source| ConfigError::Json {
        url: format!("http://{}{}", url.addr(), url.path),
        source,
    })
}

/// The rows of `section`: the dump's list, or for connections (absent from the dump) the
/// summary of `metrics` text.
pub fn select(dump: &Value, section: Section, metrics: Option<&str>) -> Value {
    match dump.get(section.key()) {
        Some(v) => v.clone(),
        None if section == Section::Connections => Value::Array(
            connections_from_metrics(metrics.unwrap_or(""))
                .into_iter()
                .map(|c| serde_json::to_value(c).unwrap_or_default())
                .collect(),
        ),
        None => Value::Array(Vec::new()),
    }
}

/// Runs the command: fetch, select, render.
pub fn run(admin: &str, section: Section, format: Format, timeout: Duration) -> Result<String, ConfigError> {
    let admin = Url::parse(admin)?;
    let dump = fetch_dump(&admin, timeout)?;
    if section == Section::Services && format == Format::Table {
        return Ok(render_services(&dump));
    }
    let metrics = if section == Section::Connections && dump.get("connections").is_none() {
        Some(fetch_text(&admin.with_path("/metrics"), timeout)?)
    } else {
        None
    };
    let rows = select(&dump, section, metrics.as_deref());
    render(&rows, section, format)
}

/// Renders the selected rows.
pub fn render(rows: &Value, section: Section, format: Format) -> Result<String, ConfigError> {
    match format {
        Format::Json => serde_json::to_string_pretty(rows)
            .map(|s| s + "\n")
            .map_err(|e| ConfigError::Encode(e.to_string())),
        Format::Yaml => serde_yaml::to_string(rows).map_err(|e| ConfigError::Encode(e.to_string())),
        Format::Table => Ok(table(rows, section)),
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

/// `spiffe://td/ns/N/sa/S` from mesh-core's Identity (or the string as given).
pub fn identity(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(_) => format!(
            "spiffe://{}/ns/{}/sa/{}",
            s(v, "trust_domain"),
            s(v, "namespace"),
            s(v, "service_account")
        ),
        _ => String::new(),
    }
}

/// A waypoint address: `ns/hostname` or `ip:port`, `-` for none.
fn waypoint(v: &Value) -> String {
    let Some(w) = v.get("waypoint").filter(|w| !w.is_null()) else {
        return "-".to_owned();
    };
    let port = w.get("hbone_port").and_then(Value::as_u64).unwrap_or(15008);
    let d = &w["destination"];
    if let Some(h) = d.get("Hostname") {
        format!("{}/{}", s(h, "namespace"), s(h, "hostname"))
    } else if let Some(a) = d.get("Address") {
        format!("{}:{port}", s(a, "ip"))
    } else {
        "?".to_owned()
    }
}

fn dash(s: String) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s
    }
}

fn ports(v: &Value) -> String {
    list(v, "ports")
        .iter()
        .map(|p| {
            let sp = p.get("service_port").and_then(Value::as_u64).unwrap_or(0);
            let tp = p.get("target_port").and_then(Value::as_u64).unwrap_or(0);
            if sp == tp || tp == 0 {
                sp.to_string()
            } else {
                format!("{sp}->{tp}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn table(rows: &Value, section: Section) -> String {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let t = match section {
        Section::Workloads => workloads(rows),
        Section::Services => services(rows, &[]),
        Section::Policies => policies(rows),
        Section::Certificates => certificates(rows, SystemTime::now()),
        Section::Connections => connections(rows),
    };
    if t.is_empty() && section == Section::Connections {
        "no connections recorded (from ztunnel's TCP connection counters on /metrics)\n".to_owned()
    } else if t.is_empty() {
        format!("no {} in ztunnel's configuration\n", section.key())
    } else {
        t.render()
    }
}

pub fn workloads(rows: &[Value]) -> Table {
    let mut t = Table::new(&["NAME", "NAMESPACE", "IP", "NODE", "PROTOCOL", "IDENTITY", "WAYPOINT"]);
    for w in rows {
        let ips: Vec<&str> = list(w, "addresses").iter().filter_map(Value::as_str).collect();
        let protocol = match s(w, "tunnel") {
            "Hbone" => "HBONE",
            "None" => "TCP",
            other => other,
        };
        t.row(vec![
            dash(s(w, "name").to_owned()),
            dash(s(w, "namespace").to_owned()),
            dash(ips.join(",")),
            dash(s(w, "node").to_owned()),
            protocol.to_owned(),
            identity(w.get("identity").unwrap_or(&Value::Null)),
            waypoint(w),
        ]);
    }
    t
}

/// Services; `workloads` (the dump's) counts each service's endpoints.
pub fn services(rows: &[Value], workloads: &[Value]) -> Table {
    let mut t = Table::new(&["NAME", "NAMESPACE", "VIPS", "PORTS", "ENDPOINTS", "WAYPOINT"]);
    for svc in rows {
        let key = format!("{}/{}", s(svc, "namespace"), s(svc, "hostname"));
        let vips: Vec<String> = list(svc, "vips")
            .iter()
            .filter_map(|v| match v {
                Value::Array(pair) => pair.get(1).and_then(Value::as_str).map(str::to_owned),
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let endpoints = if workloads.is_empty() {
            "?".to_owned()
        } else {
            workloads
                .iter()
                .filter(|w| {
                    list(w, "services")
                        .iter()
                        .any(|e| e.get(0).and_then(Value::as_str) == Some(key.as_str()))
                })
                .count()
                .to_string()
        };
        t.row(vec![
            dash(s(svc, "name").to_owned()),
            dash(s(svc, "namespace").to_owned()),
            dash(vips.join(",")),
            dash(ports(svc)),
            endpoints,
            waypoint(svc),
        ]);
    }
    t
}

pub fn policies(rows: &[Value]) -> Table {
    let mut t = Table::new(&["NAME", "NAMESPACE", "SCOPE", "ACTION", "RULES"]);
    for p in rows {
        t.row(vec![
            dash(s(p, "name").to_owned()),
            dash(s(p, "namespace").to_owned()),
            s(p, "scope").to_owned(),
            s(p, "action").to_ascii_uppercase(),
            list(p, "groups").len().to_string(),
        ]);
    }
    t
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn relative(secs: i64) -> String {
    let (sign, a) = if secs < 0 { ("-", -secs) } else { ("", secs) };
    let text = if a >= 86_400 {
        format!("{}d{}h", a / 86_400, (a % 86_400) / 3600)
    } else if a >= 3600 {
        format!("{}h{}m", a / 3600, (a % 3600) / 60)
    } else {
        format!("{}m", a / 60)
    };
    format!("{sign}{text}")
}

pub fn certificates(rows: &[Value], now: SystemTime) -> Table {
    let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let mut t = Table::new(&["IDENTITY", "STATE", "EXPIRES"]);
    for c in rows {
        let expires = match c.get("notAfter").and_then(Value::as_u64) {
            Some(at) => {
                let left = at as i64 - now;
                let when = if left < 0 { "expired" } else { "in" };
                format!("{} ({when} {})", utc(at), relative(left.abs()))
            }
            None => match s(c, "error") {
                "" => "-".to_owned(),
                e => format!("- ({e})"),
            },
        };
        t.row(vec![
            identity(c.get("identity").unwrap_or(&Value::Null)),
            s(c, "state").to_owned(),
            expires,
        ]);
    }
    t
}

/// Connections by (reporter, source, destination), from ztunnel's TCP counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionSummary {
    pub reporter: String,
    pub source: String,
    pub destination: String,
    pub service: String,
    pub security: String,
    pub opened: u64,
    pub closed: u64,
    pub active: u64,
}

/// Labels and value of one Prometheus sample line.
fn sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((n, rest)) => (n, rest.strip_suffix('}')?),
        None => (head, ""),
    };
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while let Some((k, after)) = rest.split_once("=\"") {
        let mut v = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        v.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => v.push(c),
            }
        }
        map.insert(k.trim_start_matches(',').trim().to_owned(), v);
        rest = &after[end..];
    }
    Some((name, map, value))
}

/// (reporter, source, destination, service, security policy).
type ConnectionKey = (String, String, String, String, String);

/// Summarizes `istio_tcp_connections_opened_total` and `..._closed_total`.
pub fn connections_from_metrics(metrics: &str) -> Vec<ConnectionSummary> {
    let mut by: BTreeMap<ConnectionKey, (u64, u64)> = BTreeMap::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        let opened = match name {
            "istio_tcp_connections_opened_total" | "istio_tcp_connections_opened" => true,
            "istio_tcp_connections_closed_total" | "istio_tcp_connections_closed" => false,
            _ => continue,
        };
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let who = |w: String, ns: String| {
            if ns.is_empty() || ns == "unknown" {
                w
            } else {
                format!("{ns}/{w}")
            }
        };
        let key = (
            get("reporter"),
            who(get("source_workload"), get("source_workload_namespace")),
            who(get("destination_workload"), get("destination_workload_namespace")),
            get("destination_service"),
            get("connection_security_policy"),
        );
        let entry = by.entry(key).or_default();
        if opened {
            entry.0 += value as u64;
        } else {
            entry.1 += value as u64;
        }
    }
    by.into_iter()
        .map(
            |((reporter, source, destination, service, security), (opened, closed))| ConnectionSummary {
                reporter,
                source,
                destination,
                service,
                security,
                opened,
                closed,
                active: opened.saturating_sub(closed),
            },
        )
        .collect()
}

fn connections(rows: &[Value]) -> Table {
    let mut t = Table::new(&[
        "REPORTER",
        "SOURCE",
        "DESTINATION",
        "SERVICE",
        "SECURITY",
        "OPENED",
        "CLOSED",
        "ACTIVE",
    ]);
    for c in rows {
        let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0).to_string();
        t.row(vec![
            dash(s(c, "reporter").to_owned()),
            dash(s(c, "source").to_owned()),
            dash(s(c, "destination").to_owned()),
            dash(s(c, "service").to_owned()),
            dash(s(c, "security").to_owned()),
            n("opened"),
            n("closed"),
            n("active"),
        ]);
    }
    t
}

/// Services with endpoint counts need the workloads too: the table entry point for them.
pub fn render_services(dump: &Value) -> String {
    let t = services(
        dump.get("services")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]),
        dump.get("workloads")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]),
    );
    if t.is_empty() {
        "no services in ztunnel's configuration\n".to_owned()
    } else {
        t.render()
    }
}
