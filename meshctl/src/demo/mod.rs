//! `meshctl demo`: drive the local network-namespace demo (`target/release/demo`) through
//! its state file: start it detached and wait for the file (`up`), send traffic from the
//! client pod (`traffic`), probe its endpoints (`status`), and tear it down (`down`).

pub mod process;
pub mod state;
pub mod traffic;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::progress::Progress;
use crate::style::Style;
pub use state::{State, StateError};

/// Where the state file lives unless told otherwise.
pub const DEFAULT_STATE_FILE: &str = "/run/mesh-demo/state.json";

/// Why a demo operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no demo binary found (tried {tried}); build it with `cargo build --release -p mesh-e2e --bin demo` or pass --binary")]
    NoBinary { tried: String },
    #[error("cannot {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the demo is not running: no state file at {0} (start it with `meshctl demo up`)")]
    NotRunning(PathBuf),
    #[error("the demo (pid {pid}) exited before it was up; last lines of {log}:\n{tail}")]
    Died { pid: u32, log: PathBuf, tail: String },
    #[error("the demo (pid {pid}) was not up after {secs}s (stopped it); last lines of {log}:\n{tail}")]
    Timeout {
        pid: u32,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// `--binary`, else `target/release/demo` under the current directory, else next to meshctl.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, DemoError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(DemoError::NoBinary {
                tried: p.display().to_string(),
            })
        };
    }
    let mut tried = vec![PathBuf::from("target/release/demo")];
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        tried.push(dir.join("demo"));
    }
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| DemoError::NoBinary {
            tried: tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Starts the demo detached and waits for its state file. Returns the summary to print.
pub fn up(binary: &Path, state_file: &Path, timeout: Duration) -> Result<String, DemoError> {
    if let Some(s) = State::read(state_file)? {
        if process::alive(s.pid) {
            return Ok(format!("already running\n{}", s.summary(state_file)));
        }
        eprintln!(
            "removing stale state file {} (pid {} is gone)",
            state_file.display(),
            s.pid
        );
        std::fs::remove_file(state_file).map_err(io(format!("remove {}", state_file.display())))?;
    }
    let dir = state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let log = dir.join("demo.log");
    let out = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
    let err = out.try_clone().map_err(io("duplicate the log file"))?;
    let mut cmd = Command::new(binary);
    cmd.arg("--hold")
        .arg("--state-file")
        .arg(state_file)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe; it detaches the demo from our terminal and
    // process group so Ctrl-C here or our exit does not stop it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io(format!("start {}", binary.display())))?;
    let pid = child.id();
    let mut progress = Progress::start(format!("starting the demo (pid {pid}, log {})", log.display()));
    loop {
        if let Ok(Some(s)) = State::read(state_file) {
            progress.finish("demo is up");
            return Ok(s.summary(state_file));
        }
        if let Ok(Some(status)) = child.try_wait() {
            progress.finish(&format!("demo exited: {status}"));
            return Err(DemoError::Died {
                pid,
                log: log.clone(),
                tail: process::tail(&log, 20),
            });
        }
        if progress.elapsed() >= timeout {
            let _ = process::terminate(pid as i32);
            progress.finish("gave up waiting");
            return Err(DemoError::Timeout {
                pid,
                secs: timeout.as_secs(),
                log: log.clone(),
                tail: process::tail(&log, 20),
            });
        }
        let last = process::tail(&log, 1);
        progress.tick(&last.chars().take(60).collect::<String>());
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn require(state_file: &Path) -> Result<State, DemoError> {
    State::read(state_file)?.ok_or_else(|| DemoError::NotRunning(state_file.to_owned()))
}

/// Sends `n` requests from the client; returns the summary.
pub fn traffic(
    state_file: &Path,
    n: usize,
    headers: &[String],
    url: Option<&str>,
    keep_alive: bool,
) -> Result<traffic::Summary, DemoError> {
    let s = require(state_file)?;
    let url = url.unwrap_or(&s.client.url);
    let mut child = process::in_netns(&s.client.netns, "curl")
        .args(traffic::curl_args(url, n, headers, keep_alive, 5))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(io(
            "run `ip netns exec ... curl` (are ip and curl installed, and are you root?)",
        ))?;
    let mut progress = Progress::start(format!("{n} request(s) to {url} from netns {}", s.client.netns));
    let mut output = String::new();
    let mut done = 0;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(io("read curl's output"))?;
            if line.starts_with(traffic::MARKER) {
                done += 1;
                progress.tick(&format!("{done}/{n}"));
            }
            output.push_str(&line);
            output.push('\n');
        }
    }
    let status = child.wait().map_err(io("wait for curl"))?;
    progress.finish(&format!("done ({status})"));
    Ok(traffic::Summary::parse(&output))
}

/// One endpoint's status line.
fn probe(name: &str, netns: &str, url: &str, style: Style) -> (bool, String) {
    let out = process::in_netns(netns, "curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url])
        .stderr(Stdio::null())
        .output();
    let (up, detail) = match out {
        Ok(o) => {
            let code = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            let up = code.starts_with('2') || code.starts_with('3');
            (
                up,
                if code == "000" || code.is_empty() {
                    "no answer".to_owned()
                } else {
                    format!("HTTP {code}")
                },
            )
        }
        Err(e) => (false, format!("cannot run ip netns exec: {e}")),
    };
    let mark = if up { style.ok() } else { style.fail() };
    (
        up,
        format!(
            "{mark} {name:<12} {} {url} (netns {netns}): {detail}",
            if up { "up  " } else { "down" }
        ),
    )
}

/// Lines describing the demo, and whether everything is up.
pub fn status(state_file: &Path, style: Style) -> Result<(bool, String), DemoError> {
    let s = require(state_file)?;
    let mut ok = true;
    let mut out = String::new();
    let alive = process::alive(s.pid);
    ok &= alive;
    out.push_str(&format!(
        "{} demo pid {}: {}\n",
        if alive { style.ok() } else { style.fail() },
        s.pid,
        if alive {
            "running"
        } else {
            "not running (stale state file; run `meshctl demo down`)"
        }
    ));
    let mut probes: Vec<(String, String, String)> = s
        .endpoints
        .iter()
        .map(|e| (e.name.clone(), e.netns.clone(), e.url.clone()))
        .collect();
    probes.push(("client".to_owned(), s.client.netns.clone(), s.client.url.clone()));
    if let Some(p) = &s.prometheus {
        probes.push(("prometheus".to_owned(), p.netns.clone(), p.url.clone()));
    }
    for (name, netns, url) in probes {
        let (up, line) = probe(&name, &netns, &url, style);
        ok &= up;
        out.push_str(&line);
        out.push('\n');
    }
    Ok((ok, out))
}

/// What `down` found.
pub enum Down {
    NothingToDo,
    Stopped { pid: i32 },
    StillRunning { pid: i32, secs: u64 },
    Leftovers { pid: i32, namespaces: Vec<String> },
}

/// SIGTERM, wait up to `timeout` for the exit, check the namespaces are gone, remove the file.
pub fn down(state_file: &Path, timeout: Duration) -> Result<Down, DemoError> {
    let Some(s) = State::read(state_file)? else {
        return Ok(Down::NothingToDo);
    };
    if process::terminate(s.pid).map_err(io(format!("signal pid {}", s.pid)))? {
        let mut progress = Progress::start(format!("stopping the demo (pid {})", s.pid));
        while process::alive(s.pid) {
            if progress.elapsed() >= timeout {
                progress.finish("still running");
                return Ok(Down::StillRunning {
                    pid: s.pid,
                    secs: timeout.as_secs(),
                });
            }
            progress.tick("");
            std::thread::sleep(Duration::from_millis(200));
        }
        progress.finish("demo exited");
    }
    let present = process::netns_list().map_err(io("list network namespaces (ip netns list)"))?;
    let leftovers: Vec<String> = s.namespaces.iter().filter(|n| present.contains(n)).cloned().collect();
    match std::fs::remove_file(state_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("remove {}", state_file.display()))(e)),
    }
    if leftovers.is_empty() {
        Ok(Down::Stopped { pid: s.pid })
    } else {
        Ok(Down::Leftovers {
            pid: s.pid,
            namespaces: leftovers,
        })
    }
}
