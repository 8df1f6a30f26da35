//! End-to-end tests of the `ambient-cni` binary: it runs as a real process with CNI_*
//! variables and a config on stdin, talking to a test node agent (a unix-socket HTTP server
//! with canned answers that records every request). The last test chains the plugin after the
//! real reference plugins (`bridge` + `host-local`) the way a container runtime does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ambient-cni");

// ---------------------------------------------------------------------------------------------
// The test agent.

/// One request the agent received.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    body: Value,
}

/// A canned answer.
#[derive(Debug, Clone)]
struct Canned {
    status: u16,
    body: String,
    delay: Duration,
}

fn canned(status: u16, body: Value) -> Canned {
    Canned {
        status,
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

type Responder = dyn Fn(&str, &str) -> Canned + Send + Sync;

/// A node agent stand-in on a unix socket in a temp dir. Stopped and removed on drop.
struct TestAgent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestAgent {
    /// An agent answering every request with `respond(method, path)`.
    fn start(respond: impl Fn(&str, &str) -> Canned + Send + Sync + 'static) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind agent socket");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let respond: Arc<Responder> = Arc::new(respond);
        let thread = {
            let requests = requests.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let requests = requests.clone();
                    let respond = respond.clone();
                    std::thread::spawn(move || serve(conn, &requests, &*respond));
                }
            })
        };
        TestAgent {
            _dir: dir,
            socket,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// An agent answering `status`/`body` to every request.
    fn fixed(status: u16, body: Value) -> TestAgent {
        TestAgent::start(move |_, _| canned(status, body.clone()))
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket); // wake the accept loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn serve(mut conn: UnixStream, requests: &Mutex<Vec<Recorded>>, respond: &Responder) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return, // e.g. the wake-up connection from Drop
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let body = if len == 0 {
        Value::Null
    } else {
        serde_json::from_slice(&body[..len]).unwrap_or(Value::String("<not json>".into()))
    };
    requests.lock().unwrap().push(Recorded {
        method: method.clone(),
        path: path.clone(),
        body,
    });
    let answer = respond(&method, &path);
    std::thread::sleep(answer.delay);
    let resp = format!(
        "HTTP/1.1 {} Canned\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        answer.status,
        answer.body.len(),
        answer.body
    );
    let _ = conn.write_all(resp.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Running the plugin.

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}\nstderr: {}", self.stdout, self.stderr))
    }

    fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "plugin failed: stdout {}\nstderr {}",
            self.stdout, self.stderr
        );
        self
    }

    fn assert_silent_ok(&self) {
        self.assert_ok();
        assert_eq!(self.stdout, "", "a successful DEL/CHECK/STATUS prints nothing");
    }

    /// A spec error: exit 1 and `{cniVersion, code, msg, details}` on stdout. Returns msg.
    fn assert_error(&self, code: u64) -> String {
        assert_eq!(
            self.code, 1,
            "expected failure; stdout {}\nstderr {}",
            self.stdout, self.stderr
        );
        let err = self.json();
        assert_eq!(err["code"], json!(code), "error: {err}");
        assert!(err["cniVersion"].is_string(), "error: {err}");
        assert!(err["details"].is_string(), "error: {err}");
        let msg = err["msg"].as_str().expect("msg").to_string();
        assert!(!msg.is_empty());
        msg
    }
}

fn run_raw(env: &HashMap<String, String>, stdin: &str) -> Outcome {
    run_program(BIN, &[], env, stdin)
}

fn run_program(program: &str, args: &[&str], env: &HashMap<String, String>, stdin: &str) -> Outcome {
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    // A plugin may exit before reading stdin: ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("wait for plugin");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        elapsed: started.elapsed(),
    }
}

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee";

/// The CNI_* variables of `command` for the test pod.
fn cni_env(command: &str, cni_args: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/var/run/netns/cni-test"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", cni_args),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "6e:2a:4b:11:22:33"},
            {"name": "veth1234", "mac": "6e:2a:4b:44:55:66"},
            {"name": "eth0", "mac": "0a:58:0a:01:00:07", "sandbox": "/var/run/netns/cni-test"}
        ],
        "ips": [
            {"interface": 2, "address": "10.1.0.7/24", "gateway": "10.1.0.1"},
            {"interface": 2, "address": "fd00:10:1::7/64", "gateway": "fd00:10:1::1"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["demo.svc.cluster.local"]}
    })
}

fn conf(socket: &Path, prev: Option<Value>) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "ambient-test",
        "type": "ambient-cni",
        "agentSocket": socket,
        "agentTimeoutMs": 1000,
    });
    if let Some(prev) = prev {
        c["prevResult"] = prev;
    }
    c
}

fn run(command: &str, cni_args: &str, config: &Value) -> Outcome {
    run_raw(&cni_env(command, cni_args), &config.to_string())
}

fn missing_socket() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody-listens.sock");
    (dir, path)
}

// ---------------------------------------------------------------------------------------------
// ADD.

#[test]
fn add_without_pod_args_passes_prev_result_through_without_the_agent() {
    let agent = TestAgent::fixed(500, json!({"error": "must not be called"}));
    let out = run("ADD", "IgnoreUnknown=1", &conf(&agent.socket, Some(prev_result())));
    out.assert_ok();
    assert_eq!(out.json(), prev_result());
    assert!(agent.requests().is_empty(), "agent contacted: {:?}", agent.requests());

    // Not a pod and no agent at all: still passes through.
    let (_dir, nowhere) = missing_socket();
    let out = run("ADD", "", &conf(&nowhere, Some(prev_result())));
    out.assert_ok();
    assert_eq!(out.json(), prev_result());
}

#[test]
fn add_output_carries_the_config_cni_version() {
    let agent = TestAgent::fixed(200, json!({"captured": true}));
    let mut prev = prev_result();
    prev.as_object_mut().unwrap().remove("cniVersion");
    let mut config = conf(&agent.socket, Some(prev.clone()));
    config["cniVersion"] = json!("1.1.0");
    let out = run("ADD", POD_ARGS, &config);
    out.assert_ok();
    prev["cniVersion"] = json!("1.1.0");
    assert_eq!(out.json(), prev);
}

#[test]
fn add_captured_pod_posts_to_agent_and_passes_result_through() {
    let agent = TestAgent::fixed(200, json!({"captured": true}));
    let out = run("ADD", POD_ARGS, &conf(&agent.socket, Some(prev_result())));
    out.assert_ok();
    assert_eq!(out.json(), prev_result());
    assert_eq!(out.stderr, "", "nothing logged on stderr on success");

    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/v1/pods/add");
    assert_eq!(
        reqs[0].body,
        json!({
            "containerId": "c0ffee",
            "netns": "/var/run/netns/cni-test",
            "ifname": "eth0",
            "podName": "web-0",
            "podNamespace": "demo",
            "ips": ["10.1.0.7/24", "fd00:10:1::7/64"],
            "timeoutMs": 1000,
        })
    );
}

#[test]
fn add_uncaptured_pod_succeeds() {
    let agent = TestAgent::fixed(200, json!({"captured": false}));
    let out = run("ADD", POD_ARGS, &conf(&agent.socket, Some(prev_result())));
    out.assert_ok();
    assert_eq!(out.json(), prev_result());
    assert_eq!(agent.requests().len(), 1);
}

#[test]
fn add_fails_when_agent_refuses() {
    let agent = TestAgent::fixed(500, json!({"error": "nft: cannot install redirection"}));
    let out = run("ADD", POD_ARGS, &conf(&agent.socket, Some(prev_result())));
    let msg = out.assert_error(101);
    assert!(msg.contains("nft: cannot install redirection"), "{msg}");
    assert!(msg.contains("500"), "{msg}");
    assert!(msg.contains("demo/web-0"), "{msg}");
    assert_eq!(out.json()["cniVersion"], json!("1.0.0"));
    assert!(
        out.stderr.contains("nft: cannot install redirection"),
        "stderr: {}",
        out.stderr
    );
}

#[test]
fn add_fails_closed_when_agent_is_down() {
    let (_dir, nowhere) = missing_socket();
    let out = run("ADD", POD_ARGS, &conf(&nowhere, Some(prev_result())));
    let msg = out.assert_error(100);
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(msg.contains(&nowhere.display().to_string()), "{msg}");
    assert!(out.json()["details"].as_str().unwrap().contains("fail closed"));

    // A socket file nobody accepts on (agent crashed, stale socket): refused, same outcome.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    run("ADD", POD_ARGS, &conf(&stale, Some(prev_result()))).assert_error(100);
}

/// Issue 20 item 3: namespaces that can never be ambient start with the agent down (the
/// cluster's DNS, the primary CNI, the agent itself), without a request to the agent; every
/// other namespace still fails closed.
#[test]
fn add_passes_never_ambient_namespaces_through_with_the_agent_down() {
    let (_dir, nowhere) = missing_socket();
    let mut config = conf(&nowhere, Some(prev_result()));
    config["excludeNamespaces"] = json!(["monitoring"]);
    for ns in ["kube-system", "istio-system", "monitoring"] {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=p-0");
        let out = run("ADD", &args, &config);
        out.assert_ok();
        assert_eq!(out.json(), prev_result(), "{ns}: prevResult passed through unchanged");
        run("CHECK", &args, &config).assert_silent_ok();
    }
    // An ambient-capable namespace with the same config: fail closed, as before.
    let out = run("ADD", POD_ARGS, &config);
    assert!(out.assert_error(100).contains("unreachable"));
    // Not a prefix or pattern match.
    let out = run("ADD", "K8S_POD_NAMESPACE=kube-system-apps;K8S_POD_NAME=p", &config);
    out.assert_error(100);
}

#[test]
fn add_for_excluded_namespace_never_contacts_the_agent() {
    let agent = TestAgent::fixed(200, json!({"captured": true}));
    let out = run(
        "ADD",
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0",
        &conf(&agent.socket, Some(prev_result())),
    );
    out.assert_ok();
    assert!(agent.requests().is_empty(), "agent contacted: {:?}", agent.requests());
}

#[test]
fn malformed_exclude_namespaces_is_a_config_error() {
    let (_dir, nowhere) = missing_socket();
    for bad in [json!("kube-system"), json!([""]), json!([1])] {
        let mut config = conf(&nowhere, Some(prev_result()));
        config["excludeNamespaces"] = bad.clone();
        run("ADD", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=p", &config).assert_error(7);
    }
}

#[test]
fn add_fails_when_agent_times_out() {
    let agent = TestAgent::start(|_, _| Canned {
        delay: Duration::from_secs(3),
        ..canned(200, json!({"captured": true}))
    });
    let mut config = conf(&agent.socket, Some(prev_result()));
    config["agentTimeoutMs"] = json!(300);
    let out = run("ADD", POD_ARGS, &config);
    let msg = out.assert_error(11);
    assert!(msg.contains("300 ms"), "{msg}");
    assert!(out.elapsed < Duration::from_secs(2), "took {:?}", out.elapsed);
}

#[test]
fn add_fails_when_agent_answers_garbage() {
    let agent = TestAgent::start(|_, _| Canned {
        status: 200,
        body: "ok".into(),
        delay: Duration::ZERO,
    });
    let msg = run("ADD", POD_ARGS, &conf(&agent.socket, Some(prev_result()))).assert_error(102);
    assert!(msg.contains("captured"), "{msg}");
}

#[test]
fn add_requires_prev_result() {
    let agent = TestAgent::fixed(200, json!({"captured": true}));
    let msg = run("ADD", POD_ARGS, &conf(&agent.socket, None)).assert_error(7);
    assert!(msg.contains("prevResult"), "{msg}");
    assert!(agent.requests().is_empty());
}

#[test]
fn add_rejects_half_pod_identity() {
    let agent = TestAgent::fixed(200, json!({"captured": true}));
    run("ADD", "K8S_POD_NAME=web-0", &conf(&agent.socket, Some(prev_result()))).assert_error(4);
    run("ADD", "garbage", &conf(&agent.socket, Some(prev_result()))).assert_error(4);
    assert!(agent.requests().is_empty());
}

#[test]
fn add_writes_the_log_file() {
    let agent = TestAgent::fixed(200, json!({"captured": true}));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cni.log");
    let mut config = conf(&agent.socket, Some(prev_result()));
    config["logFile"] = json!(log);
    run("ADD", POD_ARGS, &config).assert_ok();
    let text = std::fs::read_to_string(&log).expect("log file written");
    assert!(text.contains("cmd=ADD container=c0ffee pod=demo/web-0"), "{text}");
    assert!(text.contains("captured=true"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// DEL.

#[test]
fn del_is_idempotent_when_agent_does_not_know_the_pod() {
    let agent = TestAgent::fixed(404, json!({"error": "unknown pod"}));
    for _ in 0..2 {
        run("DEL", POD_ARGS, &conf(&agent.socket, Some(prev_result()))).assert_silent_ok();
    }
    let reqs = agent.requests();
    assert_eq!(reqs.len(), 2);
    for r in reqs {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1/pods/del"));
        assert_eq!(
            r.body,
            json!({
                "containerId": "c0ffee",
                "netns": "/var/run/netns/cni-test",
                "podName": "web-0",
                "podNamespace": "demo",
            })
        );
    }
}

#[test]
fn del_removes_known_pod_without_netns_or_prev_result() {
    let agent = TestAgent::fixed(200, json!({}));
    let mut env = cni_env("DEL", POD_ARGS);
    env.remove("CNI_NETNS"); // the runtime may have lost the netns already
    run_raw(&env, &conf(&agent.socket, None).to_string()).assert_silent_ok();
    assert_eq!(agent.requests()[0].body["netns"], json!(""));
}

#[test]
fn del_succeeds_when_agent_is_down() {
    let (_dir, nowhere) = missing_socket();
    let out = run("DEL", POD_ARGS, &conf(&nowhere, Some(prev_result())));
    out.assert_silent_ok();
    assert!(out.stderr.contains("unreachable"), "stderr: {}", out.stderr);

    // Up but not ready yet (503): same, it reconciles once ready.
    let starting = TestAgent::fixed(503, json!({"error": "reconciling"}));
    let out = run("DEL", POD_ARGS, &conf(&starting.socket, None));
    out.assert_silent_ok();
    assert!(out.stderr.contains("reconciling"), "stderr: {}", out.stderr);
}

#[test]
fn del_reports_agent_errors() {
    let agent = TestAgent::fixed(500, json!({"error": "cannot remove rules"}));
    let msg = run("DEL", POD_ARGS, &conf(&agent.socket, None)).assert_error(101);
    assert!(msg.contains("cannot remove rules"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// CHECK, STATUS, VERSION.

#[test]
fn check_asks_the_agent() {
    let agent = TestAgent::start(|_, path| match path {
        "/v1/pods/check" => canned(200, json!({"captured": true})),
        _ => canned(404, json!({"error": "no such path"})),
    });
    run("CHECK", POD_ARGS, &conf(&agent.socket, Some(prev_result()))).assert_silent_ok();
    let reqs = agent.requests();
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("POST", "/v1/pods/check")
    );
    assert_eq!(reqs[0].body["ips"], json!(["10.1.0.7/24", "fd00:10:1::7/64"]));
    assert_eq!(reqs[0].body["podName"], json!("web-0"));

    let failing = TestAgent::fixed(404, json!({"error": "pod demo/web-0 is not enrolled"}));
    let msg = run("CHECK", POD_ARGS, &conf(&failing.socket, Some(prev_result()))).assert_error(101);
    assert!(msg.contains("not enrolled"), "{msg}");

    run("CHECK", POD_ARGS, &conf(&agent.socket, None)).assert_error(7);
    let mut old = conf(&agent.socket, Some(prev_result()));
    old["cniVersion"] = json!("0.3.1");
    run("CHECK", POD_ARGS, &old).assert_error(1);
}

#[test]
fn status_reflects_agent_readiness() {
    let status_conf = |socket: &Path| {
        let mut c = conf(socket, None);
        c["cniVersion"] = json!("1.1.0");
        c
    };
    let env = HashMap::from([("CNI_COMMAND".to_string(), "STATUS".to_string())]);

    let ready = TestAgent::fixed(200, json!({"ready": true}));
    run_raw(&env, &status_conf(&ready.socket).to_string()).assert_silent_ok();
    let reqs = ready.requests();
    assert_eq!((reqs[0].method.as_str(), reqs[0].path.as_str()), ("GET", "/v1/ready"));

    let not_ready = TestAgent::fixed(503, json!({"error": "reconciling"}));
    let msg = run_raw(&env, &status_conf(&not_ready.socket).to_string()).assert_error(50);
    assert!(msg.contains("reconciling"), "{msg}");

    let (_dir, nowhere) = missing_socket();
    let msg = run_raw(&env, &status_conf(&nowhere).to_string()).assert_error(50);
    assert!(msg.contains("not available"), "{msg}");
}

#[test]
fn version_lists_supported_versions() {
    let env = HashMap::from([("CNI_COMMAND".to_string(), "VERSION".to_string())]);
    let supported = json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);

    let out = run_raw(&env, r#"{"cniVersion": "1.0.0"}"#);
    out.assert_ok();
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": supported})
    );

    let out = run_raw(&env, "");
    out.assert_ok();
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": supported})
    );
}

// ---------------------------------------------------------------------------------------------
// Input errors.

#[test]
fn malformed_config_is_a_decode_error() {
    for command in ["ADD", "DEL", "CHECK"] {
        let out = run_raw(&cni_env(command, POD_ARGS), r#"{"cniVersion": "1.0.0", "name": "#);
        out.assert_error(6);
        assert_eq!(out.json()["cniVersion"], json!("1.1.0"));
    }
    run_raw(&cni_env("ADD", POD_ARGS), "").assert_error(6);
    run_raw(&cni_env("ADD", POD_ARGS), "[1, 2]").assert_error(6);
}

#[test]
fn invalid_config_fields_are_config_errors() {
    let (_dir, nowhere) = missing_socket();
    let mut c = conf(&nowhere, Some(prev_result()));
    c["agentTimeoutMs"] = json!("soon");
    run("ADD", POD_ARGS, &c).assert_error(7);

    let mut c = conf(&nowhere, Some(json!({"ips": [{"address": "10.1.0.7"}]})));
    c["name"] = json!("n");
    run("ADD", POD_ARGS, &c).assert_error(7);
}

#[test]
fn unsupported_version_is_rejected() {
    let (_dir, nowhere) = missing_socket();
    let mut c = conf(&nowhere, Some(prev_result()));
    c["cniVersion"] = json!("0.2.0");
    let out = run("ADD", POD_ARGS, &c);
    let msg = out.assert_error(1);
    assert!(msg.contains("0.2.0"), "{msg}");
    c.as_object_mut().unwrap().remove("cniVersion");
    run("ADD", POD_ARGS, &c).assert_error(1);
}

#[test]
fn missing_environment_is_an_env_error() {
    let (_dir, nowhere) = missing_socket();
    let config = conf(&nowhere, Some(prev_result())).to_string();

    let mut env = cni_env("ADD", POD_ARGS);
    env.remove("CNI_COMMAND");
    let msg = run_raw(&env, &config).assert_error(4);
    assert!(msg.contains("CNI_COMMAND"), "{msg}");

    let mut env = cni_env("ADD", POD_ARGS);
    env.remove("CNI_NETNS");
    let msg = run_raw(&env, &config).assert_error(4);
    assert!(msg.contains("CNI_NETNS"), "{msg}");

    let mut env = cni_env("CHECK", POD_ARGS);
    env.remove("CNI_CONTAINERID");
    run_raw(&env, &config).assert_error(4);

    run_raw(&cni_env("FROB", POD_ARGS), &config).assert_error(4);
}

// ---------------------------------------------------------------------------------------------
// Latency added to pod start-up.

#[test]
fn add_latency_report() {
    let agent = TestAgent::fixed(200, json!({"captured": true}));
    let config = conf(&agent.socket, Some(prev_result()));
    let env = cni_env("ADD", POD_ARGS);
    let stdin = config.to_string();
    let mut samples: Vec<Duration> = (0..100)
        .map(|_| {
            let out = run_raw(&env, &stdin);
            out.assert_ok();
            out.elapsed
        })
        .collect();
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    eprintln!(
        "ambient-cni ADD latency (process spawn to exit, {} runs, debug build, tests in parallel): p50 {:?} p99 {:?}",
        samples.len(),
        pct(50),
        pct(99)
    );
    assert_eq!(agent.requests().len(), 100);
}

// ---------------------------------------------------------------------------------------------
// Chained after the real reference plugins.

const REF_PLUGINS: &str = "/usr/lib/cni";

/// Network namespaces created by the test, deleted on drop (also when the test fails).
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn add(&mut self, name: &str) {
        // A namespace left by a killed earlier run with the same pid would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip netns add {name} failed");
        self.names.push(name.to_string());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the node namespace deletes the bridge and the host side of the veth with it.
        for name in self.names.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn chained_after_reference_bridge_plugin() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping chained_after_reference_bridge_plugin: needs root (ip netns, bridge plugin)");
        return;
    }
    for p in ["bridge", "host-local"] {
        if !Path::new(REF_PLUGINS).join(p).exists() {
            eprintln!("skipping chained_after_reference_bridge_plugin: {REF_PLUGINS}/{p} missing (containernetworking-plugins)");
            return;
        }
    }

    let pid = std::process::id();
    let tag = pid % 1_000_000;
    let node = format!("ambt{tag}-node");
    let pod = format!("ambt{tag}-pod");
    let bridge = format!("ambt{tag}"); // <= 15 chars
    let subnet = format!("10.99.{}.0/24", pid % 250);
    let net_name = format!("ambient-test-{tag}");
    let container_id = format!("ctr{tag}");
    let ipam_dir = tempfile::tempdir().unwrap();

    let mut guard = Netns { names: Vec::new() };
    // The bridge lives in a "node" namespace so the test never touches the host's network.
    guard.add(&node);
    guard.add(&pod);

    let env = |command: &str| -> HashMap<String, String> {
        [
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", container_id.clone()),
            ("CNI_NETNS", format!("/var/run/netns/{pod}")),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", REF_PLUGINS.to_string()),
            (
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={pod}"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    // Run a plugin inside the node namespace, as the runtime would run it on the node.
    let in_node = |plugin: &str, command: &str, config: &Value| -> Outcome {
        run_program(
            "ip",
            &["netns", "exec", &node, plugin],
            &env(command),
            &config.to_string(),
        )
    };

    // The conflist, as a runtime would split it into per-plugin configs.
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": net_name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir.path(),
                }
            },
            {"type": "ambient-cni", "agentTimeoutMs": 1000}
        ]
    });
    let plugin_conf = |i: usize, prev: Option<&Value>| -> Value {
        let mut c = conflist["plugins"][i].clone();
        c["cniVersion"] = conflist["cniVersion"].clone();
        c["name"] = conflist["name"].clone();
        if let Some(prev) = prev {
            c["prevResult"] = prev.clone();
        }
        c
    };

    let agent = TestAgent::fixed(200, json!({"captured": true}));
    let mut ours = plugin_conf(1, None);
    ours["agentSocket"] = json!(agent.socket);

    // ADD: bridge first, then ours with the bridge's result.
    let bridge_add = in_node(&format!("{REF_PLUGINS}/bridge"), "ADD", &plugin_conf(0, None));
    bridge_add.assert_ok();
    let bridge_result = bridge_add.json();
    let pod_ip = bridge_result["ips"][0]["address"]
        .as_str()
        .expect("bridge result has an IP")
        .to_string();
    assert!(
        pod_ip.starts_with(&subnet[..subnet.len() - 4]),
        "{pod_ip} not in {subnet}"
    );

    let mut ours_add_conf = ours.clone();
    ours_add_conf["prevResult"] = bridge_result.clone();
    let our_add = in_node(BIN, "ADD", &ours_add_conf);
    our_add.assert_ok();
    assert_eq!(
        our_add.json(),
        bridge_result,
        "the chained result must pass through unchanged"
    );

    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "/v1/pods/add");
    assert_eq!(reqs[0].body["ips"], json!([pod_ip]));
    assert_eq!(reqs[0].body["netns"], json!(format!("/var/run/netns/{pod}")));
    assert_eq!(reqs[0].body["podName"], json!(pod));

    // The pod really has its address.
    let addrs = Command::new("ip")
        .args(["-n", &pod, "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr");
    assert!(
        String::from_utf8_lossy(&addrs.stdout).contains(&pod_ip),
        "eth0 lacks {pod_ip}"
    );

    // CHECK the whole chain, in order.
    in_node(
        &format!("{REF_PLUGINS}/bridge"),
        "CHECK",
        &plugin_conf(0, Some(&bridge_result)),
    )
    .assert_silent_ok();
    in_node(BIN, "CHECK", &ours_add_conf).assert_silent_ok();

    // DEL in reverse order, each with the final result as prevResult; then again (idempotent).
    for _ in 0..2 {
        in_node(BIN, "DEL", &ours_add_conf).assert_silent_ok();
        in_node(
            &format!("{REF_PLUGINS}/bridge"),
            "DEL",
            &plugin_conf(0, Some(&bridge_result)),
        )
        .assert_silent_ok();
    }
    let dels = agent.requests().iter().filter(|r| r.path == "/v1/pods/del").count();
    assert_eq!(dels, 2);

    // host-local released the address.
    let ip_only = pod_ip.split('/').next().unwrap();
    assert!(
        !ipam_dir.path().join(&net_name).join(ip_only).exists(),
        "host-local still holds {ip_only}"
    );
    drop(guard);
    assert!(
        !Path::new("/var/run/netns").join(&pod).exists(),
        "pod netns left behind"
    );
}

#[test]
fn config_over_the_stdin_limit_is_named_as_such() {
    const LIMIT: usize = 16 << 20;
    // A valid config of exactly the limit is read whole (VERSION decodes it, no agent needed).
    let doc = |len: usize| {
        let head = r#"{"cniVersion": "1.0.0", "name": "n", "type": "ambient-cni", "pad": ""#;
        let tail = "\"}";
        format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
    };
    let out = run_raw(&cni_env("VERSION", POD_ARGS), &doc(LIMIT));
    out.assert_ok();
    assert_eq!(out.json()["cniVersion"], json!("1.0.0"));

    // One byte more is refused for its size, not as a truncated (unparsable) document.
    for command in ["VERSION", "ADD"] {
        let out = run_raw(&cni_env(command, POD_ARGS), &doc(LIMIT + 1));
        let msg = out.assert_error(7);
        assert!(msg.contains("config larger than 16 MiB"), "{msg}");
        assert!(!msg.to_lowercase().contains("json"), "{msg}");
    }
}
