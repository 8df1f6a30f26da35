//! `meshctl check`: node pre-flight. Kernel features the node agent's nftables rules need
//! (from /proc/modules, /sys/module, modules.builtin/modules.dep and, for kernels without
//! loadable modules, the kernel config in /proc/config.gz or /boot), the `nft` binary, the
//! CNI configuration directory, and the readiness of the controller and ztunnel endpoints.
//! Every check is one [`CheckResult`]; the command fails when any of them failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::http::{self, Url};
use crate::style::Style;

/// Outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// How to fix a failure.
    pub fix: Option<String>,
}

impl CheckResult {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        CheckResult {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        CheckResult {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// `✓ name: detail` (or `ok`/`FAIL` without colour) and an indented fix line.
    pub fn render(&self, style: Style) -> String {
        let mark = if self.ok { style.ok() } else { style.fail() };
        let mut out = format!("{mark} {}: {}", self.name, self.detail);
        if let Some(fix) = &self.fix {
            out.push_str(&format!("\n    fix: {fix}"));
        }
        out
    }
}

/// Where kernel module information is read from (`/` on the node itself; the host's root
/// when run in a container with it mounted).
#[derive(Debug, Clone)]
pub struct KernelProbe {
    pub root: PathBuf,
    pub release: String,
    /// The kernel's build configuration (`CONFIG_...=y|m` lines), when available.
    pub config: String,
}

/// The kernel config symbol of a module.
fn config_symbol(module: &str) -> Option<&'static str> {
    Some(match module {
        "nf_tables" => "CONFIG_NF_TABLES",
        "nft_tproxy" => "CONFIG_NFT_TPROXY",
        "xt_TPROXY" => "CONFIG_NETFILTER_XT_TARGET_TPROXY",
        "nf_conntrack" => "CONFIG_NF_CONNTRACK",
        "nft_ct" => "CONFIG_NFT_CT",
        "nft_socket" => "CONFIG_NFT_SOCKET",
        "xt_socket" => "CONFIG_NETFILTER_XT_MATCH_SOCKET",
        _ => return None,
    })
}

/// `/boot/config-<release>`, else `/proc/config.gz` through zcat; empty when neither exists.
fn read_config(root: &Path, release: &str) -> String {
    if let Ok(text) = std::fs::read_to_string(root.join("boot").join(format!("config-{release}"))) {
        return text;
    }
    let gz = root.join("proc/config.gz");
    if !gz.is_file() {
        return String::new();
    }
    std::process::Command::new("zcat")
        .arg(&gz)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// How a module is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleState {
    Loaded,
    BuiltIn,
    /// Installed but not loaded; nftables loads it on first use.
    Available,
    Missing,
}

impl KernelProbe {
    /// Probes the running kernel under `root`.
    pub fn new(root: &Path) -> KernelProbe {
        let release = std::fs::read_to_string(root.join("proc/sys/kernel/osrelease"))
            .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/osrelease"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let config = read_config(root, &release);
        KernelProbe {
            root: root.to_owned(),
            release,
            config,
        }
    }

    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// Whether `name` (as in /proc/modules, underscores) is loaded, built in or installed.
    pub fn module(&self, name: &str) -> ModuleState {
        let loaded = std::fs::read_to_string(self.root.join("proc/modules"))
            .map(|t| t.lines().any(|l| l.split_whitespace().next() == Some(name)))
            .unwrap_or(false);
        if loaded {
            return ModuleState::Loaded;
        }
        let file_matches = |file: &str| {
            let dashed = name.replace('_', "-");
            std::fs::read_to_string(self.modules_dir().join(file))
                .map(|t| {
                    t.lines().any(|l| {
                        let path = l.split(':').next().unwrap_or("");
                        let base = path.rsplit('/').next().unwrap_or("");
                        let stem = base.split(".ko").next().unwrap_or("");
                        stem == name || stem == dashed
                    })
                })
                .unwrap_or(false)
        };
        if file_matches("modules.builtin") {
            return ModuleState::BuiltIn;
        }
        let configured = config_symbol(name).and_then(|sym| {
            self.config
                .lines()
                .find_map(|l| l.strip_prefix(sym).and_then(|rest| rest.strip_prefix('=')))
        });
        if configured == Some("y") {
            return ModuleState::BuiltIn;
        }
        // /sys/module/<name> exists for loaded modules and for built-ins with parameters.
        if self.root.join("sys/module").join(name).is_dir() {
            return ModuleState::BuiltIn;
        }
        if file_matches("modules.dep") || configured == Some("m") {
            return ModuleState::Available;
        }
        ModuleState::Missing
    }
}

/// A kernel feature and the modules that provide it: every group is needed, any module of a
/// group will do.
struct Feature {
    name: &'static str,
    why: &'static str,
    groups: &'static [&'static [&'static str]],
}

const FEATURES: &[Feature] = &[
    Feature {
        name: "nf_tables",
        why: "the capture rules, which are nftables",
        groups: &[&["nf_tables"]],
    },
    Feature {
        name: "TPROXY",
        why: "transparent redirection to ztunnel's listeners",
        groups: &[&["nft_tproxy", "xt_TPROXY"]],
    },
    Feature {
        name: "connmark",
        why: "marking connections so replies return through ztunnel",
        groups: &[&["nf_conntrack"], &["nft_ct"]],
    },
    Feature {
        name: "socket match",
        why: "matching packets of ztunnel's own transparent sockets",
        groups: &[&["nft_socket", "xt_socket"]],
    },
];

/// The kernel feature checks.
pub fn kernel(probe: &KernelProbe) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for f in FEATURES {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for group in f.groups {
            let states: Vec<(&str, ModuleState)> = group.iter().map(|m| (*m, probe.module(m))).collect();
            match states.iter().find(|(_, s)| *s != ModuleState::Missing) {
                Some((m, s)) => found.push(match s {
                    ModuleState::Loaded => format!("{m} loaded"),
                    ModuleState::BuiltIn => format!("{m} built in"),
                    _ => format!("{m} available (loaded on first use)"),
                }),
                None => missing.push(group[0]),
            }
        }
        let name = format!("kernel {}", f.name);
        if missing.is_empty() {
            out.push(CheckResult::pass(name, found.join(", ")));
        } else {
            let modprobe = missing
                .iter()
                .map(|m| format!("modprobe {m}"))
                .collect::<Vec<_>>()
                .join(" && ");
            out.push(CheckResult::fail(
                name,
                format!(
                    "{} not found for kernel {} (needed for {})",
                    missing.join(", "),
                    probe.release,
                    f.why
                ),
                format!(
                    "{modprobe}; if the module does not exist, install your distribution's extra kernel modules \
                     (e.g. linux-modules-extra-{}) or enable it in the kernel config",
                    probe.release
                ),
            ));
        }
    }
    out
}

/// The `nft` binary in PATH (or the usual sbin directories, which PATH may lack).
pub fn nft_binary() -> CheckResult {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join("nft"));
    for c in candidates {
        if c.is_file() {
            return CheckResult::pass("nft binary", c.display().to_string());
        }
    }
    CheckResult::fail(
        "nft binary",
        "nft not found in PATH",
        "install nftables (apt-get install nftables / dnf install nftables)",
    )
}

/// The CNI configuration directory and whether `ambient-cni` is chained in its first conflist.
pub fn cni_dir(dir: &Path) -> CheckResult {
    let name = "CNI config";
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return CheckResult::fail(
                name,
                format!("cannot read {}: {e}", dir.display()),
                "install the primary CNI first (it writes a *.conflist there), or pass --cni-dir",
            )
        }
    };
    let mut conflists: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    conflists.sort();
    let Some(first) = conflists.first() else {
        return CheckResult::fail(
            name,
            format!("no *.conflist in {}", dir.display()),
            "install the primary CNI first: ambient-cni chains after a *.conflist",
        );
    };
    let chained = match std::fs::read_to_string(first)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()))
    {
        Ok(v) => v.get("plugins").and_then(|p| p.as_array()).is_some_and(|p| {
            p.iter()
                .any(|p| p.get("type").and_then(|t| t.as_str()) == Some("ambient-cni"))
        }),
        Err(e) => {
            return CheckResult::fail(
                name,
                format!("{} is not valid JSON: {e}", first.display()),
                "fix or reinstall the primary CNI's configuration",
            )
        }
    };
    let what = if chained {
        "ambient-cni is chained"
    } else {
        "ambient-cni not chained yet (the cni-agent DaemonSet adds it)"
    };
    CheckResult::pass(name, format!("{}: {what}", first.display()))
}

/// GETs a readiness endpoint: `base` as given when it has a path, else `base` + `default_path`.
pub fn readiness(name: &str, base: &str, default_path: &str, timeout: Duration) -> CheckResult {
    let url = match Url::parse(base) {
        Ok(u) if u.path == "/" => u.with_path(default_path),
        Ok(u) => u,
        Err(e) => return CheckResult::fail(name, e.to_string(), "pass an http://host:port URL"),
    };
    let shown = format!("http://{}{}", url.addr(), url.path);
    match http::get(&url, timeout) {
        Ok(r) if r.status == 200 => CheckResult::pass(name, format!("{shown} ready")),
        Ok(r) => CheckResult::fail(
            name,
            format!("{shown} answered {}: {}", r.status, r.body.trim()),
            format!("check the {name} logs; it is up but not ready"),
        ),
        Err(e) => CheckResult::fail(
            name,
            format!("{shown} unreachable: {e}"),
            format!("start the {name} or pass its address (see --help)"),
        ),
    }
}

/// The kinds whose state is 1 in the controller's `controller_kind_state` metric and is
/// neither `synced` nor `not_served`: (kind, state), from Prometheus text.
pub fn kinds_not_synced(metrics: &str) -> Vec<(String, String)> {
    let label = |line: &str, key: &str| -> Option<String> {
        let start = line.find(&format!("{key}=\""))? + key.len() + 2;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_owned())
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("controller_kind_state{") && l.trim_end().ends_with(" 1"))
        .filter_map(|l| Some((label(l, "kind")?, label(l, "state")?)))
        .filter(|(_, state)| state != "synced" && state != "not_served")
        .collect()
}

/// Whether the controller could list every kind it watches (a forbidden or failing kind is
/// served from its last good state, or fails closed for the security kinds).
pub fn kind_sync(base: &str, timeout: Duration) -> CheckResult {
    let name = "controller kinds";
    let url = match Url::parse(base) {
        Ok(u) => u.with_path("/metrics"),
        Err(e) => return CheckResult::fail(name, e.to_string(), "pass an http://host:port URL"),
    };
    match http::get(&url, timeout) {
        Ok(r) if r.status == 200 => match kinds_not_synced(&r.body).as_slice() {
            [] => CheckResult::pass(name, "every watched kind is listed"),
            bad => CheckResult::fail(
                name,
                bad.iter()
                    .map(|(k, s)| format!("{k}: {s}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                "grant the controller list/watch on those kinds (manifests/controller/controller-rbac.yaml) \
                 or install their CRDs; unreadable security kinds deny until then",
            ),
        },
        Ok(r) => CheckResult::fail(
            name,
            format!("/metrics answered {}", r.status),
            "check the controller logs",
        ),
        Err(e) => CheckResult::fail(
            name,
            format!("/metrics unreachable: {e}"),
            "pass the controller's address",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_that_are_not_synced_are_named() {
        let text = "# TYPE controller_kind_state gauge
controller_kind_state{kind=\"AuthorizationPolicy\",state=\"synced\"} 0
controller_kind_state{kind=\"AuthorizationPolicy\",state=\"unreadable\"} 1
controller_kind_state{kind=\"Pod\",state=\"synced\"} 1
controller_kind_state{kind=\"TCPRoute\",state=\"not_served\"} 1
controller_kind_state{kind=\"HTTPRoute\",state=\"failing\"} 1
";
        assert_eq!(
            kinds_not_synced(text),
            vec![
                ("AuthorizationPolicy".to_owned(), "unreadable".to_owned()),
                ("HTTPRoute".to_owned(), "failing".to_owned())
            ]
        );
        assert!(kinds_not_synced("controller_kind_state{kind=\"Pod\",state=\"synced\"} 1\n").is_empty());
    }

    fn fake_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("proc/sys/kernel")).unwrap();
        std::fs::write(r.join("proc/sys/kernel/osrelease"), "6.1.0-test\n").unwrap();
        std::fs::write(
            r.join("proc/modules"),
            "nf_tables 1 0 - Live 0x0\nnf_conntrack 2 0 - Live 0x0\n",
        )
        .unwrap();
        let m = r.join("lib/modules/6.1.0-test");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("modules.builtin"), "kernel/net/netfilter/nft_ct.ko\n").unwrap();
        std::fs::create_dir_all(r.join("boot")).unwrap();
        std::fs::write(
            r.join("boot/config-6.1.0-test"),
            "CONFIG_NETFILTER_XT_TARGET_TPROXY=y\n# CONFIG_NFT_SOCKET is not set\nCONFIG_NETFILTER_XT_MATCH_SOCKET=m\n",
        )
        .unwrap();
        std::fs::write(
            m.join("modules.dep"),
            "kernel/net/netfilter/nft_tproxy.ko.zst: kernel/net/netfilter/nf_tables.ko.zst\n",
        )
        .unwrap();
        root
    }

    #[test]
    fn modules_are_found_loaded_built_in_or_available() {
        let root = fake_root();
        let probe = KernelProbe::new(root.path());
        assert_eq!(probe.release, "6.1.0-test");
        assert_eq!(probe.module("nf_tables"), ModuleState::Loaded);
        assert_eq!(probe.module("nft_ct"), ModuleState::BuiltIn);
        assert_eq!(probe.module("nft_tproxy"), ModuleState::Available);
        assert_eq!(probe.module("nft_socket"), ModuleState::Missing);
        assert_eq!(
            probe.module("xt_TPROXY"),
            ModuleState::BuiltIn,
            "from the kernel config"
        );
        assert_eq!(
            probe.module("xt_socket"),
            ModuleState::Available,
            "=m in the kernel config"
        );
        assert!(kernel(&probe).iter().all(|r| r.ok));
        std::fs::remove_file(root.path().join("boot/config-6.1.0-test")).unwrap();
        let results = kernel(&KernelProbe::new(root.path()));
        let failed: Vec<&str> = results.iter().filter(|r| !r.ok).map(|r| r.name.as_str()).collect();
        assert_eq!(failed, ["kernel socket match"]);
        let socket = results.iter().find(|r| !r.ok).unwrap();
        assert!(socket.fix.as_deref().unwrap().starts_with("modprobe nft_socket"));
    }

    #[test]
    fn cni_dir_reports_chaining() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!cni_dir(dir.path()).ok, "no conflist");
        std::fs::write(
            dir.path().join("10-bridge.conflist"),
            r#"{"cniVersion":"1.0.0","name":"k","plugins":[{"type":"bridge"},{"type":"ambient-cni"}]}"#,
        )
        .unwrap();
        let r = cni_dir(dir.path());
        assert!(r.ok && r.detail.contains("ambient-cni is chained"), "{r:?}");
        assert!(!cni_dir(&dir.path().join("nope")).ok);
    }

    #[test]
    fn unreachable_endpoints_fail_with_the_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = readiness(
            "controller",
            &format!("http://{addr}"),
            "/ready",
            Duration::from_secs(1),
        );
        assert!(!r.ok);
        assert!(r.detail.contains(&format!("http://{addr}/ready")), "{}", r.detail);
        assert!(r.render(Style::plain()).starts_with("FAIL controller: "));
    }
}
