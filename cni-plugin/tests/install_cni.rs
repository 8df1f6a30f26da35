//! The real installer script (docker/cni/install-cni.sh) run against node layouts in temp
//! dirs (issue 20 item 2): whatever the layout and whatever the primary CNI does, our entry is
//! in the file the container runtime reads (the lexically first .conf/.conflist/.json, as
//! libcni picks it), within 1 s, with the file's mode kept; and on SIGTERM the plugin is
//! removed only when the DaemonSet is gone (item 3's uninstall path).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use serde_json::{json, Value};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker/cni/install-cni.sh");
const OURS: &str = "ambient-cni";
const WITHIN: Duration = Duration::from_secs(1);

/// A node's CNI directories under a temp root, at the paths a platform uses.
struct Node {
    root: tempfile::TempDir,
    net: PathBuf,
    bin: PathBuf,
    env: Vec<(String, String)>,
}

impl Node {
    fn new(net_dir: &str, bin_dir: &str) -> Node {
        let root = tempfile::tempdir().expect("tempdir");
        let net = root.path().join(net_dir.trim_start_matches('/'));
        let bin = root.path().join(bin_dir.trim_start_matches('/'));
        fs::create_dir_all(&net).unwrap();
        fs::create_dir_all(&bin).unwrap();
        let src = root.path().join("ambient-cni-build");
        fs::write(&src, b"#!/bin/sh\n").unwrap();
        let p = |p: &Path| p.display().to_string();
        let env = vec![
            ("CNI_NET_DIR".into(), p(&net)),
            ("CNI_BIN_DIR".into(), p(&bin)),
            ("PLUGIN_SRC".into(), p(&src)),
            ("UNINSTALL_FLAG_FILE".into(), p(&root.path().join("flag/uninstall"))),
            ("DAEMONSET_STATE_FILE".into(), p(&root.path().join("daemonset-state"))),
            ("CONFIG_WAIT_SECONDS".into(), "2".into()),
        ];
        Node { root, net, bin, env }
    }

    fn standard() -> Node {
        Node::new("/etc/cni/net.d", "/opt/cni/bin")
    }

    fn with_env(mut self, key: &str, value: &str) -> Node {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    fn command(&self, mode: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(SCRIPT)
            .arg(mode)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, mode: &str) -> Output {
        self.command(mode).output().expect("run install-cni.sh")
    }

    /// What a primary CNI does: write its config, atomically (temp file + rename) or in place.
    fn primary_writes(&self, name: &str, doc: &Value, mode: u32, atomic: bool) {
        let path = self.net.join(name);
        let text = serde_json::to_vec_pretty(doc).unwrap();
        if atomic {
            let tmp = self.net.join(format!(".{name}.primary-tmp"));
            fs::write(&tmp, &text).unwrap();
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).unwrap();
            fs::rename(&tmp, &path).unwrap();
        } else {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            f.write_all(&text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
    }

    fn set_daemonset_state(&self, state: &str) {
        fs::write(self.root.path().join("daemonset-state"), state).unwrap();
    }

    fn watch(&self, watch_mode: &str) -> Watcher {
        let log = self.root.path().join(format!("watch-{watch_mode}.log"));
        let child = self
            .command("watch")
            .env("WATCH_MODE", watch_mode)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn install-cni.sh watch");
        let w = Watcher { child, log };
        // Readiness: the script logs it once its watch is in place.
        let ready = wait_for(Duration::from_secs(10), || w.log().contains("install-cni: watching"));
        assert!(ready.is_some(), "watch never ready: {}", w.log());
        w
    }

    fn plugin_binary(&self) -> PathBuf {
        self.bin.join(OURS)
    }
}

struct Watcher {
    child: Child,
    log: PathBuf,
}

impl Watcher {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (what the kubelet sends when the pod is deleted), then its exit status.
    fn terminate(mut self) -> (i32, String) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), self.log());
            }
            assert!(Instant::now() < deadline, "watch ignored SIGTERM: {}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watcher {
    /// A failed test: SIGKILL (its inotifywait exits with the temp dir it watches).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 5 ms until it holds (the time it took) or `limit` passes (None).
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The file the runtime reads: libcni's ConfFiles (regular files ending in .conf, .conflist
/// or .json) sorted as Go's sort.Strings does, first one.
fn runtime_reads(net: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(net)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            )
        })
        .collect();
    files.sort_by(|a, b| {
        a.file_name()
            .unwrap()
            .as_encoded_bytes()
            .cmp(b.file_name().unwrap().as_encoded_bytes())
    });
    files.into_iter().next()
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Whether the runtime's file is a conflist whose last plugin is ours.
fn runtime_has_our_entry(net: &Path) -> bool {
    let Some(path) = runtime_reads(net) else { return false };
    if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
        return false;
    }
    read_json(&path)
        .and_then(|doc| doc["plugins"].as_array().and_then(|p| p.last().cloned()))
        .is_some_and(|last| last["type"] == OURS)
}

fn entries_anywhere(net: &Path) -> usize {
    fs::read_dir(net)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| read_json(&e.path()))
        .map(|doc| {
            doc["plugins"]
                .as_array()
                .map(|p| p.iter().filter(|x| x["type"] == OURS).count())
                .unwrap_or(0)
        })
        .sum()
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn bridge_conf(name: &str) -> Value {
    json!({"cniVersion": "1.0.0", "name": name, "type": "bridge", "bridge": "cni0",
           "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}})
}

fn conflist(name: &str, primary: &str) -> Value {
    json!({"cniVersion": "1.0.0", "name": name,
           "plugins": [{"type": primary, "ipam": {"type": "host-local"}}, {"type": "portmap"}]})
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "install-cni.sh failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn conf_only_layout_is_converted_into_a_conflist_the_runtime_reads() {
    let node = Node::standard().with_env("EXCLUDE_NAMESPACES", "monitoring,,logging");
    node.primary_writes("10-bridge.conf", &bridge_conf("podnet"), 0o640, true);
    assert_ok(&node.run("install"));

    let read = runtime_reads(&node.net).unwrap();
    assert_eq!(read.file_name().unwrap(), "10-bridge.conflist");
    assert!(
        !node.net.join("10-bridge.conf").exists(),
        "the .conf would still be read first"
    );
    assert_eq!(mode_of(&read), 0o640, "mode kept");
    let doc = read_json(&read).unwrap();
    assert_eq!(doc["name"], "podnet");
    assert_eq!(doc["cniVersion"], "1.0.0");
    assert_eq!(
        doc["plugins"][0],
        json!({"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}),
        "the single plugin wrapped unchanged (name and cniVersion move to the list)"
    );
    assert_eq!(doc["plugins"][1]["type"], OURS);
    assert_eq!(doc["plugins"][1]["excludeNamespaces"], json!(["monitoring", "logging"]));
    assert!(node.plugin_binary().exists());
    assert_eq!(mode_of(&node.plugin_binary()), 0o755);

    // Idempotent: a second run changes nothing.
    let before = fs::read(&read).unwrap();
    assert_ok(&node.run("install"));
    assert_eq!(fs::read(&read).unwrap(), before);
}

#[test]
fn conf_or_json_sorting_before_a_conflist_gets_the_entry() {
    for first in ["05-cilium.conf", "05-cilium.json"] {
        let node = Node::standard();
        node.primary_writes("10-kindnet.conflist", &conflist("kindnet", "ptp"), 0o644, true);
        node.primary_writes(first, &bridge_conf("cilium"), 0o600, true);
        assert_ok(&node.run("install"));
        let read = runtime_reads(&node.net).unwrap();
        assert_eq!(read.file_name().unwrap(), "05-cilium.conflist", "{first}");
        assert!(runtime_has_our_entry(&node.net), "{first}");
        assert_eq!(mode_of(&read), 0o600);
        assert_eq!(
            entries_anywhere(&node.net),
            1,
            "only the file the runtime reads is changed"
        );
    }
}

#[test]
fn a_conversion_the_runtime_would_not_read_fails_loudly_and_touches_nothing() {
    let node = Node::standard();
    node.primary_writes("10-x.conf", &bridge_conf("x"), 0o644, true);
    // Sorts between 10-x.conf and 10-x.conflist: it, not our conflist, would be read next.
    node.primary_writes("10-x.conf.json", &bridge_conf("y"), 0o644, true);
    let out = node.run("install");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sorts before it"));
    assert_eq!(runtime_reads(&node.net).unwrap().file_name().unwrap(), "10-x.conf");
    assert!(!node.net.join("10-x.conflist").exists());
}

/// A primary CNI rewriting its config (atomically, in place, or a new .conf sorting first):
/// our entry is back in the file the runtime reads within 1 s, with the primary's mode.
fn primary_rewrites(watch_mode: &str) {
    let node = Node::standard();
    node.primary_writes("10-kindnet.conflist", &conflist("kindnet", "ptp"), 0o644, true);
    let w = node.watch(watch_mode);
    assert!(wait_for(Duration::from_secs(5), || runtime_has_our_entry(&node.net)).is_some());

    let mut worst = Duration::ZERO;
    let rewrites: [(&str, Value, u32, bool); 3] = [
        ("10-kindnet.conflist", conflist("kindnet", "ptp"), 0o600, true),
        ("10-kindnet.conflist", conflist("kindnet", "bridge"), 0o640, false),
        ("05-calico.conf", bridge_conf("calico"), 0o600, true),
    ];
    for (name, doc, mode, atomic) in rewrites {
        node.primary_writes(name, &doc, mode, atomic);
        let took = wait_for(Duration::from_secs(5), || runtime_has_our_entry(&node.net))
            .unwrap_or_else(|| panic!("{watch_mode}: entry not restored after {name}: {}", w.log()));
        assert!(took <= WITHIN, "{watch_mode}: {name} restored after {took:?}");
        worst = worst.max(took);
        let read = runtime_reads(&node.net).unwrap();
        assert_eq!(mode_of(&read), mode, "{watch_mode}: mode of {name} kept");
    }
    assert_eq!(
        runtime_reads(&node.net).unwrap().file_name().unwrap(),
        "05-calico.conflist"
    );
    eprintln!("{watch_mode}: entry back in the runtime's file after at most {worst:?}");
    let (code, log) = w.terminate();
    assert_eq!(code, 0, "{log}");
}

#[test]
fn primary_rewriting_its_config_is_undone_within_a_second_inotify() {
    assert!(
        Command::new("inotifywait").arg("--help").output().is_ok(),
        "inotifywait missing: run scripts/deps.sh (inotify-tools)"
    );
    primary_rewrites("inotify");
}

#[test]
fn primary_rewriting_its_config_is_undone_within_a_second_poll() {
    primary_rewrites("poll");
}

/// Platform layouts: the directories come from the environment; the watch starts before the
/// primary CNI has written anything (as on a fresh node) and follows it within 1 s.
#[test]
fn k3s_gke_and_openshift_layouts() {
    let layouts = [
        // k3s: flannel's conflist under the agent dir, binaries in the data dir.
        (
            "/var/lib/rancher/k3s/agent/etc/cni/net.d",
            "/var/lib/rancher/k3s/data/current/bin",
            "10-flannel.conflist",
        ),
        // GKE on COS: /opt is read-only there, binaries live in /home/kubernetes/bin.
        ("/etc/cni/net.d", "/home/kubernetes/bin", "10-gke-ptp.conflist"),
        // OpenShift: Multus reads the default network's config (a .conf) from here.
        (
            "/var/run/multus/cni/net.d",
            "/var/lib/cni/bin",
            "10-ovn-kubernetes.conf",
        ),
    ];
    for (net, bin, file) in layouts {
        let node = Node::new(net, bin);
        let w = node.watch("auto");
        let doc = if file.ends_with(".conf") {
            bridge_conf("ovn")
        } else {
            conflist("primary", "ptp")
        };
        node.primary_writes(file, &doc, 0o600, true);
        let took = wait_for(Duration::from_secs(5), || runtime_has_our_entry(&node.net))
            .unwrap_or_else(|| panic!("{net}: no entry: {}", w.log()));
        assert!(took <= WITHIN, "{net}: entry after {took:?}");
        assert_eq!(mode_of(&runtime_reads(&node.net).unwrap()), 0o600, "{net}");
        assert!(node.plugin_binary().exists(), "{bin}");
        eprintln!("{net}: entry in the runtime's file {took:?} after the primary wrote it");
        let (code, log) = w.terminate();
        assert_eq!(code, 0, "{log}");
        assert!(runtime_has_our_entry(&node.net), "no DaemonSet state: kept on SIGTERM");
    }
}

#[test]
fn sigterm_removes_the_plugin_only_when_the_daemonset_is_gone() {
    // state file content -> removed?
    for (state, removed) in [
        (Some("present"), false),
        (None, false),
        (Some("deleting"), true),
        (Some("absent"), true),
    ] {
        let node = Node::standard();
        node.primary_writes("10-kindnet.conflist", &conflist("kindnet", "ptp"), 0o640, true);
        if let Some(s) = state {
            node.set_daemonset_state(s);
        }
        let w = node.watch("auto");
        assert!(wait_for(Duration::from_secs(5), || runtime_has_our_entry(&node.net)).is_some());
        let (code, log) = w.terminate();
        assert_eq!(code, 0, "{log}");
        assert_eq!(entries_anywhere(&node.net), usize::from(!removed), "{state:?}: {log}");
        assert_eq!(node.plugin_binary().exists(), !removed, "{state:?}: {log}");
        let read = runtime_reads(&node.net).unwrap();
        assert_eq!(mode_of(&read), 0o640, "{state:?}");
        assert_eq!(
            read_json(&read).unwrap()["plugins"].as_array().unwrap().len(),
            2 + usize::from(!removed)
        );
    }
}

#[test]
fn uninstall_flag_removes_the_plugin_and_the_watch_does_not_put_it_back() {
    let node = Node::standard();
    fs::create_dir_all(node.root.path().join("flag")).unwrap();
    node.primary_writes("10-kindnet.conflist", &conflist("kindnet", "ptp"), 0o644, true);
    let w = node.watch("auto");
    assert!(wait_for(Duration::from_secs(5), || runtime_has_our_entry(&node.net)).is_some());
    fs::write(node.root.path().join("flag/uninstall"), "true\n").unwrap();
    let took = wait_for(Duration::from_secs(5), || {
        entries_anywhere(&node.net) == 0 && !node.plugin_binary().exists()
    });
    assert!(took.is_some_and(|t| t <= WITHIN), "{took:?}: {}", w.log());
    // A primary rewrite while uninstalling: still nothing of ours.
    node.primary_writes("10-kindnet.conflist", &conflist("kindnet", "ptp"), 0o644, true);
    node.primary_writes("10-kindnet.conflist", &conflist("kindnet", "bridge"), 0o644, true);
    let (code, log) = w.terminate();
    assert_eq!(code, 0);
    assert_eq!(entries_anywhere(&node.net), 0, "{log}");
}

/// An API-server stand-in answering the DaemonSet GET with a canned status and body, and
/// recording request heads.
fn api_stand_in(status: u16, body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            record.lock().unwrap().push(head);
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn sigterm_asks_the_api_server_whether_the_daemonset_is_being_deleted() {
    let cases: [(Option<(u16, &'static str)>, bool); 6] = [
        (Some((200, r#"{"metadata":{"name":"cni-agent"}}"#)), false),
        (
            Some((
                200,
                r#"{"metadata":{"name":"cni-agent","deletionTimestamp":"2025-01-01T00:00:00Z"}}"#,
            )),
            true,
        ),
        (Some((404, r#"{"kind":"Status","code":404}"#)), true),
        (Some((401, r#"{"kind":"Status","code":401}"#)), true),
        (Some((500, r#"{"kind":"Status","code":500}"#)), false),
        (None, false), // nobody listening: unknown, keep
    ];
    for (answer, removed) in cases {
        let sa = tempfile::tempdir().unwrap();
        fs::write(sa.path().join("token"), "t0ken").unwrap();
        fs::write(sa.path().join("ca.crt"), "").unwrap();
        let (url, seen) = match answer {
            Some((status, body)) => api_stand_in(status, body),
            None => {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let url = format!("http://{}", l.local_addr().unwrap());
                drop(l);
                (url, Arc::new(Mutex::new(Vec::new())))
            }
        };
        let node = Node::standard()
            .with_env("DAEMONSET_STATE_FILE", "")
            .with_env("KUBE_API_URL", &url)
            .with_env("SA_DIR", &sa.path().display().to_string())
            .with_env("POD_NAMESPACE", "mesh-ns");
        node.primary_writes("10-kindnet.conflist", &conflist("kindnet", "ptp"), 0o644, true);
        let w = node.watch("auto");
        assert!(wait_for(Duration::from_secs(5), || runtime_has_our_entry(&node.net)).is_some());
        let (code, log) = w.terminate();
        assert_eq!(code, 0, "{log}");
        assert_eq!(entries_anywhere(&node.net), usize::from(!removed), "{answer:?}: {log}");
        assert_eq!(node.plugin_binary().exists(), !removed, "{answer:?}");
        if answer.is_some() {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 1, "{answer:?}");
            assert!(
                seen[0].starts_with("GET /apis/apps/v1/namespaces/mesh-ns/daemonsets/cni-agent "),
                "{}",
                seen[0]
            );
            assert!(seen[0].contains("Authorization: Bearer t0ken"), "{}", seen[0]);
        }
    }
}
