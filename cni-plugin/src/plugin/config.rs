//! Parsing of the plugin's inputs: the network configuration on stdin and the CNI_*
//! environment variables.

use super::error::{codes, CniError, CniResult};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The CNI versions this plugin speaks. Results of 0.3.x / 0.4.0 / 1.x all carry `ips[]`.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest supported version, used when the config does not say which one it wants.
pub const LATEST_VERSION: &str = "1.1.0";
/// Where the node agent listens by default.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambient/cni.sock";
/// How long to wait for the node agent by default (connect + request + response).
pub const DEFAULT_AGENT_TIMEOUT_MS: u64 = 2000;
/// Upper bound for `agentTimeoutMs`: the runtime itself gives up on a plugin after a while.
pub const MAX_AGENT_TIMEOUT_MS: u64 = 60_000;
/// Namespaces whose pods are never ambient, whatever the config says: the cluster's own
/// (kube-system) and the mesh's (istio-system). Their ADD never asks the agent, so a down or
/// uninstalled agent cannot keep the cluster's DNS, CNI or the agent itself from starting.
pub const ALWAYS_EXCLUDED_NAMESPACES: &[&str] = &["kube-system", "istio-system"];
/// Upper bound for the length of `excludeNamespaces` (a config is a few KiB).
pub const MAX_EXCLUDED_NAMESPACES: usize = 1024;

/// Whether `version` is one of [`SUPPORTED_VERSIONS`].
pub fn is_supported_version(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// `a >= b` for dotted CNI versions (missing components count as 0, junk as 0).
pub fn version_at_least(a: &str, b: &str) -> bool {
    fn parts(v: &str) -> [u64; 3] {
        let mut out = [0u64; 3];
        for (slot, part) in out.iter_mut().zip(v.split('.')) {
            *slot = part.parse().unwrap_or(0);
        }
        out
    }
    parts(a) >= parts(b)
}

/// The network configuration handed to this plugin on stdin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    /// The result of the previous plugin in the chain, verbatim.
    pub prev_result: Option<Map<String, Value>>,
    pub agent_socket: PathBuf,
    pub agent_timeout: Duration,
    pub log_file: Option<PathBuf>,
    /// `excludeNamespaces`: namespaces passed through without asking the agent, on top of
    /// [`ALWAYS_EXCLUDED_NAMESPACES`].
    pub exclude_namespaces: Vec<String>,
}

/// Decode stdin into a JSON object (code 6 when it is not one).
pub fn decode_stdin(raw: &[u8]) -> CniResult<Map<String, Value>> {
    let value: Value = serde_json::from_slice(raw).map_err(|e| {
        CniError::new(codes::DECODE_FAILURE, "failed to decode network config from stdin").with_details(e.to_string())
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(CniError::new(
            codes::DECODE_FAILURE,
            "failed to decode network config from stdin: not a JSON object",
        )
        .with_details(format!("got a JSON {}", json_type(&other)))),
    }
}

/// The cniVersion to stamp on an error, as far as the (possibly broken) config tells.
pub fn error_version(raw: Option<&Map<String, Value>>) -> String {
    raw.and_then(|m| m.get("cniVersion"))
        .and_then(Value::as_str)
        .filter(|v| is_supported_version(v))
        .unwrap_or(LATEST_VERSION)
        .to_string()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(codes::INVALID_NETWORK_CONFIG, msg)
}

fn opt_string(map: &Map<String, Value>, key: &str) -> CniResult<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "invalid network config: \"{key}\" must be a string, got a JSON {}",
            json_type(other)
        ))),
    }
}

fn required_string(map: &Map<String, Value>, key: &str) -> CniResult<String> {
    match opt_string(map, key)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(invalid(format!(
            "invalid network config: \"{key}\" is missing or empty"
        ))),
    }
}

/// Check the cniVersion of a decoded config: missing means 0.1.0 (unsupported), code 1.
pub fn parse_version(map: &Map<String, Value>) -> CniResult<String> {
    let version = match map.get("cniVersion") {
        None | Some(Value::Null) => {
            return Err(CniError::new(
                codes::INCOMPATIBLE_VERSION,
                "network config has no cniVersion (implies 0.1.0, which is not supported)",
            )
            .with_details(format!("supported versions: {}", SUPPORTED_VERSIONS.join(", "))))
        }
        Some(Value::String(v)) => v.clone(),
        Some(other) => {
            return Err(invalid(format!(
                "invalid network config: \"cniVersion\" must be a string, got a JSON {}",
                json_type(other)
            )))
        }
    };
    if !is_supported_version(&version) {
        return Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {version:?}"),
        )
        .with_details(format!("supported versions: {}", SUPPORTED_VERSIONS.join(", "))));
    }
    Ok(version)
}

impl NetConf {
    /// Validate a decoded config (codes 1 and 7).
    pub fn from_map(map: &Map<String, Value>) -> CniResult<NetConf> {
        let cni_version = parse_version(map)?;
        let name = required_string(map, "name")?;
        let plugin_type = required_string(map, "type")?;

        let agent_socket = match opt_string(map, "agentSocket")? {
            None => PathBuf::from(DEFAULT_AGENT_SOCKET),
            Some(s) if s.is_empty() => return Err(invalid("invalid network config: \"agentSocket\" is empty")),
            Some(s) => PathBuf::from(s),
        };

        let timeout_ms = match map.get("agentTimeoutMs") {
            None | Some(Value::Null) => DEFAULT_AGENT_TIMEOUT_MS,
            Some(v) => match v.as_u64() {
                Some(ms) if (1..=MAX_AGENT_TIMEOUT_MS).contains(&ms) => ms,
                _ => {
                    return Err(invalid(format!(
                        "invalid network config: \"agentTimeoutMs\" must be an integer between 1 and \
                         {MAX_AGENT_TIMEOUT_MS}, got {v}"
                    )))
                }
            },
        };

        let log_file = opt_string(map, "logFile")?.filter(|s| !s.is_empty()).map(PathBuf::from);
        let exclude_namespaces = parse_exclude_namespaces(map)?;

        let prev_result = match map.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(Value::Object(prev)) => Some(prev.clone()),
            Some(other) => {
                return Err(invalid(format!(
                    "invalid network config: \"prevResult\" must be an object, got a JSON {}",
                    json_type(other)
                )))
            }
        };

        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            prev_result,
            agent_socket,
            agent_timeout: Duration::from_millis(timeout_ms),
            log_file,
            exclude_namespaces,
        })
    }

    /// Whether pods of `namespace` are passed through without asking the agent.
    pub fn is_excluded_namespace(&self, namespace: &str) -> bool {
        ALWAYS_EXCLUDED_NAMESPACES.contains(&namespace) || self.exclude_namespaces.iter().any(|n| n == namespace)
    }
}

/// `excludeNamespaces`: an array of non-empty strings (absent or null: none). Anything else
/// is a config error, so a typo fails the ADD instead of silently excluding nothing.
fn parse_exclude_namespaces(map: &Map<String, Value>) -> CniResult<Vec<String>> {
    let items = match map.get("excludeNamespaces") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() <= MAX_EXCLUDED_NAMESPACES => items,
        Some(Value::Array(_)) => {
            return Err(invalid(format!(
                "invalid network config: \"excludeNamespaces\" lists more than {MAX_EXCLUDED_NAMESPACES} namespaces"
            )))
        }
        Some(other) => {
            return Err(invalid(format!(
                "invalid network config: \"excludeNamespaces\" must be an array of strings, got a JSON {}",
                json_type(other)
            )))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.as_str() {
            Some(ns) if !ns.is_empty() => Ok(ns.to_string()),
            _ => Err(invalid(format!(
                "invalid network config: excludeNamespaces[{i}] must be a non-empty string, got {item}"
            ))),
        })
        .collect()
}

/// The addresses (CIDR strings) of `prevResult.ips[].address`, validated.
pub fn prev_result_ips(prev: &Map<String, Value>) -> CniResult<Vec<String>> {
    let ips = match prev.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(ips)) => ips,
        Some(other) => {
            return Err(invalid(format!(
                "invalid prevResult: \"ips\" must be an array, got a JSON {}",
                json_type(other)
            )))
        }
    };
    let mut out = Vec::with_capacity(ips.len());
    for (i, ip) in ips.iter().enumerate() {
        let address = ip.get("address").and_then(Value::as_str).ok_or_else(|| {
            invalid(format!(
                "invalid prevResult: ips[{i}].address is missing or not a string"
            ))
        })?;
        if !is_cidr(address) {
            return Err(invalid(format!(
                "invalid prevResult: ips[{i}].address {address:?} is not an address in CIDR notation"
            )));
        }
        out.push(address.to_string());
    }
    Ok(out)
}

/// `addr/prefix` with a valid IPv4/IPv6 address and a prefix length that fits it.
pub fn is_cidr(s: &str) -> bool {
    let Some((addr, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return false;
    };
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    prefix.parse::<u32>().is_ok_and(|p| p <= max)
}

/// The CNI operation requested in CNI_COMMAND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
    Gc,
}

impl Command {
    pub fn from_env(env: &HashMap<String, String>) -> CniResult<Command> {
        match env.get("CNI_COMMAND").map(String::as_str) {
            None | Some("") => Err(CniError::new(
                codes::INVALID_ENV,
                "required env variable CNI_COMMAND is not set",
            )),
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("STATUS") => Ok(Command::Status),
            Some("VERSION") => Ok(Command::Version),
            Some("GC") => Ok(Command::Gc),
            Some(other) => Err(
                CniError::new(codes::INVALID_ENV, format!("unknown CNI_COMMAND {other:?}"))
                    .with_details("expected one of ADD, DEL, CHECK, STATUS, VERSION, GC"),
            ),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
            Command::Gc => "GC",
        }
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: Vec<(String, String)>,
}

impl CniArgs {
    pub fn parse(raw: &str) -> CniResult<CniArgs> {
        let mut pairs = Vec::new();
        for part in raw.split(';') {
            if part.is_empty() {
                continue;
            }
            match part.split_once('=') {
                Some((k, v)) if !k.is_empty() => pairs.push((k.to_string(), v.to_string())),
                _ => {
                    return Err(CniError::new(
                        codes::INVALID_ENV,
                        "invalid CNI_ARGS: expected KEY=VALUE pairs separated by ';'",
                    )
                    .with_details(format!("bad pair {part:?}")))
                }
            }
        }
        Ok(CniArgs { pairs })
    }

    /// The last value given for `key` (non-empty), if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// The Kubernetes pod a CNI invocation is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub name: String,
    pub namespace: String,
}

/// The pod named by `K8S_POD_NAME` / `K8S_POD_NAMESPACE`: `Ok(None)` when neither is there
/// (not a Kubernetes pod), an error (code 4) when only one is.
pub fn pod_ref(args: &CniArgs) -> CniResult<Option<PodRef>> {
    match (args.get("K8S_POD_NAME"), args.get("K8S_POD_NAMESPACE")) {
        (None, None) => Ok(None),
        (Some(name), Some(namespace)) => Ok(Some(PodRef {
            name: name.to_string(),
            namespace: namespace.to_string(),
        })),
        (Some(_), None) => Err(CniError::new(
            codes::INVALID_ENV,
            "CNI_ARGS has K8S_POD_NAME but no K8S_POD_NAMESPACE",
        )),
        (None, Some(_)) => Err(CniError::new(
            codes::INVALID_ENV,
            "CNI_ARGS has K8S_POD_NAMESPACE but no K8S_POD_NAME",
        )),
    }
}

/// The CNI_* variables of an ADD / DEL / CHECK invocation.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub container_id: String,
    /// Empty on DEL when the runtime no longer has the namespace.
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
    pub path: String,
}

impl CniEnv {
    /// Read and validate the variables the command needs (code 4 on failure). As in the
    /// reference `skel`: CNI_CONTAINERID, CNI_IFNAME and CNI_PATH are required for ADD, CHECK
    /// and DEL; CNI_NETNS for ADD and CHECK only.
    pub fn from_env(env: &HashMap<String, String>, command: Command) -> CniResult<CniEnv> {
        let get = |key: &str| env.get(key).map(String::as_str).unwrap_or("");
        let require = |key: &str| -> CniResult<String> {
            let v = get(key);
            if v.is_empty() {
                Err(CniError::new(
                    codes::INVALID_ENV,
                    format!("required env variable {key} is not set for {}", command.as_str()),
                ))
            } else {
                Ok(v.to_string())
            }
        };

        let container_id = require("CNI_CONTAINERID")?;
        validate_container_id(&container_id)?;
        let netns = if command == Command::Del {
            get("CNI_NETNS").to_string()
        } else {
            require("CNI_NETNS")?
        };
        let ifname = require("CNI_IFNAME")?;
        validate_ifname(&ifname)?;
        let path = require("CNI_PATH")?;
        let args = CniArgs::parse(get("CNI_ARGS"))?;
        Ok(CniEnv {
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// Container IDs are alphanumeric plus `_ . -`, starting with an alphanumeric.
fn validate_container_id(id: &str) -> CniResult<()> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(CniError::new(codes::INVALID_ENV, "invalid characters in CNI_CONTAINERID").with_details(id.to_string()))
    }
}

/// Interface names: at most 15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn validate_ifname(name: &str) -> CniResult<()> {
    let bad = name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        Err(CniError::new(codes::INVALID_ENV, "invalid CNI_IFNAME").with_details(name.to_string()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("1.0.0", "1.1.0"));
        assert!(is_supported_version("0.3.1"));
        assert!(!is_supported_version("0.2.0"));
    }

    #[test]
    fn cni_args() {
        let args = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=a=b").unwrap();
        assert_eq!(
            pod_ref(&args).unwrap(),
            Some(PodRef {
                name: "p".into(),
                namespace: "ns".into()
            })
        );
        assert_eq!(args.get("K8S_POD_UID"), Some("a=b"));
        assert_eq!(pod_ref(&CniArgs::parse("").unwrap()).unwrap(), None);
        assert_eq!(CniArgs::parse("junk").unwrap_err().code, codes::INVALID_ENV);
        assert_eq!(
            pod_ref(&CniArgs::parse("K8S_POD_NAME=p").unwrap()).unwrap_err().code,
            codes::INVALID_ENV
        );
    }

    #[test]
    fn cidrs() {
        assert!(is_cidr("10.0.0.5/24"));
        assert!(is_cidr("fd00::5/64"));
        assert!(!is_cidr("10.0.0.5"));
        assert!(!is_cidr("10.0.0.5/33"));
        assert!(!is_cidr("10.0.0.5/+3"));
        assert!(!is_cidr("nope/3"));
        let prev = json!({"ips": [{"address": "10.1.0.4/24"}, {"address": "fd00::4/64", "gateway": "fd00::1"}]});
        assert_eq!(
            prev_result_ips(prev.as_object().unwrap()).unwrap(),
            vec!["10.1.0.4/24", "fd00::4/64"]
        );
        let bad = json!({"ips": [{"address": "10.1.0.4"}]});
        assert_eq!(
            prev_result_ips(bad.as_object().unwrap()).unwrap_err().code,
            codes::INVALID_NETWORK_CONFIG
        );
    }

    #[test]
    fn netconf_defaults_and_errors() {
        let conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "ambient-cni"});
        let conf = NetConf::from_map(conf.as_object().unwrap()).unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(conf.agent_timeout, Duration::from_millis(DEFAULT_AGENT_TIMEOUT_MS));
        assert!(conf.prev_result.is_none() && conf.log_file.is_none());

        let code = |v: Value| NetConf::from_map(v.as_object().unwrap()).unwrap_err().code;
        assert_eq!(code(json!({"name": "n", "type": "t"})), codes::INCOMPATIBLE_VERSION);
        assert_eq!(
            code(json!({"cniVersion": "0.2.0", "name": "n", "type": "t"})),
            codes::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code(json!({"cniVersion": 1, "name": "n", "type": "t"})),
            codes::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            code(json!({"cniVersion": "1.0.0", "type": "t"})),
            codes::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            code(json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "agentTimeoutMs": 0})),
            codes::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            code(json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "prevResult": []})),
            codes::INVALID_NETWORK_CONFIG
        );
        assert_eq!(decode_stdin(b"{nope").unwrap_err().code, codes::DECODE_FAILURE);
        assert_eq!(decode_stdin(b"[1]").unwrap_err().code, codes::DECODE_FAILURE);
    }

    #[test]
    fn env_validation() {
        let mut env: HashMap<String, String> = [
            ("CNI_CONTAINERID", "abc-123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert!(CniEnv::from_env(&env, Command::Add).is_ok());
        env.remove("CNI_NETNS");
        assert_eq!(
            CniEnv::from_env(&env, Command::Add).unwrap_err().code,
            codes::INVALID_ENV
        );
        assert!(CniEnv::from_env(&env, Command::Del).is_ok());
        env.insert("CNI_CONTAINERID".into(), "a/b".into());
        assert_eq!(
            CniEnv::from_env(&env, Command::Del).unwrap_err().code,
            codes::INVALID_ENV
        );
        env.insert("CNI_CONTAINERID".into(), "ab".into());
        env.insert("CNI_IFNAME".into(), "averyveryverylongname".into());
        assert_eq!(
            CniEnv::from_env(&env, Command::Del).unwrap_err().code,
            codes::INVALID_ENV
        );
    }
}
