//! The demo's state file, written by `demo --hold --state-file FILE` once the cluster is up
//! and removed on exit: its pid, logs, network namespaces, the client and the endpoints.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a demo state file: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

/// Something reachable inside a network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(default)]
    pub name: String,
    pub netns: String,
    pub url: String,
}

/// The client pod the traffic comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    pub netns: String,
    pub url: String,
}

/// The whole state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub pid: i32,
    #[serde(default)]
    pub logs_dir: Option<PathBuf>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub client: Client,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub prometheus: Option<Endpoint>,
}

impl State {
    pub fn parse(path: &Path, text: &str) -> Result<State, StateError> {
        serde_json::from_str(text).map_err(|source| StateError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads `path`; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<State>, StateError> {
        match std::fs::read_to_string(path) {
            Ok(text) => State::parse(path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Where things are, for `demo up`.
    pub fn summary(&self, state_file: &Path) -> String {
        let mut s = format!("demo is up (pid {})\n", self.pid);
        s.push_str(&format!("  state file  {}\n", state_file.display()));
        if let Some(logs) = &self.logs_dir {
            s.push_str(&format!("  logs        {}\n", logs.display()));
        }
        s.push_str(&format!("  namespaces  {}\n", self.namespaces.len()));
        s.push_str(&format!(
            "  client      {} (netns {})\n",
            self.client.url, self.client.netns
        ));
        for e in &self.endpoints {
            s.push_str(&format!("  {:<11} {} (netns {})\n", e.name, e.url, e.netns));
        }
        if let Some(p) = &self.prometheus {
            s.push_str(&format!("  prometheus  {} (netns {})\n", p.url, p.netns));
        }
        s.push_str("next: meshctl demo traffic | meshctl demo status | meshctl demo down\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_format_parses() {
        let text = r#"{"pid": 123, "logs_dir": "/tmp/demo-logs", "namespaces": ["n0-abc", "p-xyz"],
          "client": {"netns": "p-xyz", "url": "http://10.96.200.10/"},
          "endpoints": [{"name": "controller", "netns": "cp-abc", "url": "http://10.90.200.100:15014/metrics"}],
          "prometheus": {"netns": "cp-abc", "url": "http://10.90.200.100:9090/"}}"#;
        let s = State::parse(Path::new("s.json"), text).unwrap();
        assert_eq!(s.pid, 123);
        assert_eq!(s.namespaces, ["n0-abc", "p-xyz"]);
        assert_eq!(s.client.netns, "p-xyz");
        assert_eq!(s.endpoints[0].name, "controller");
        assert_eq!(
            s.prometheus.as_ref().map(|p| p.url.as_str()),
            Some("http://10.90.200.100:9090/")
        );
        let summary = s.summary(Path::new("/run/mesh-demo/state.json"));
        assert!(
            summary.contains("controller  http://10.90.200.100:15014/metrics (netns cp-abc)"),
            "{summary}"
        );
    }

    #[test]
    fn prometheus_and_logs_are_optional_but_pid_is_not() {
        let s = State::parse(
            Path::new("s.json"),
            r#"{"pid": 1, "namespaces": [], "client": {"netns": "c", "url": "http://x/"}, "endpoints": []}"#,
        )
        .unwrap();
        assert!(s.prometheus.is_none() && s.logs_dir.is_none());
        let e = State::parse(Path::new("s.json"), r#"{"client": {"netns": "c", "url": "u"}}"#).unwrap_err();
        assert!(e.to_string().contains("pid"), "{e}");
    }

    #[test]
    fn a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(State::read(&dir.path().join("nope.json")).unwrap().is_none());
    }
}
