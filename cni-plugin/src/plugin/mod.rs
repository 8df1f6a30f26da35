//! The CNI plugin (`ambient-cni`), per the CNI specification 1.0/1.1.
//!
//! It runs chained after the primary plugin (e.g. `bridge`): ADD hands Kubernetes pods to the
//! node agent over its unix socket (`agentSocket`, HTTP/1.1) and passes the previous plugin's
//! result through unchanged. It fails closed: when the agent cannot be reached or refuses the
//! pod, the ADD fails and the pod does not start. Pods of namespaces that are never ambient
//! (kube-system, istio-system and the config's `excludeNamespaces`) pass through without the
//! agent, so a down or uninstalled agent cannot keep the cluster's own pods from starting. DEL is idempotent and never blocks teardown
//! on an absent agent. Errors are spec-shaped JSON on stdout; logs go to stderr and `logFile`.
//!
//! - [`config`]: the network config on stdin and the CNI_* environment.
//! - [`agent_client`]: the HTTP-over-unix-socket client for the node agent.
//! - [`commands`]: ADD, DEL, CHECK, STATUS, VERSION (and a no-op GC).
//! - [`error`]: spec error codes and the error JSON.

pub mod agent_client;
pub mod commands;
pub mod config;
pub mod error;
pub mod log;

use config::{Command, NetConf};
use error::{codes, CniError, CniResult};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::{Read, Write};

/// Largest network config accepted on stdin.
const MAX_STDIN_BYTES: u64 = 16 << 20;

/// Run one plugin invocation: `env` is the process environment, the network config is read
/// from `stdin`, and the result or error is written to `stdout`. Returns the exit code (0 on
/// success, 1 on error). Never panics: a bug is reported as error code 999.
pub fn run<R: Read, W: Write>(env: &HashMap<String, String>, stdin: R, mut stdout: W) -> i32 {
    let mut log = log::Logger::new();
    let mut version = config::LATEST_VERSION.to_string();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dispatch(env, stdin, &mut log, &mut version)
    }));
    let outcome = outcome.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(CniError::new(codes::INTERNAL, "internal error in ambient-cni").with_details(what))
    });

    let (doc, exit) = match outcome {
        Ok(out) => (out, 0),
        Err(e) => {
            log.error(&e.to_string());
            (Some(e.to_json(&version)), 1)
        }
    };
    if let Some(doc) = doc {
        let mut text = match serde_json::to_vec(&doc) {
            Ok(t) => t,
            Err(e) => {
                log.error(&format!("encoding output: {e}"));
                return 1;
            }
        };
        text.push(b'\n');
        if let Err(e) = stdout.write_all(&text).and_then(|()| stdout.flush()) {
            log.error(&format!("writing to stdout: {e}"));
            return 1;
        }
    }
    exit
}

fn dispatch<R: Read>(
    env: &HashMap<String, String>,
    stdin: R,
    log: &mut log::Logger,
    version: &mut String,
) -> CniResult<commands::Output> {
    let command = Command::from_env(env)?;
    log.set_context(format!("cmd={}", command.as_str()));

    let raw = read_stdin(stdin)?;

    if command == Command::Version {
        // VERSION may come with an empty stdin: answer with the latest version then.
        let map = if raw.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(decode(&raw, version)?)
        };
        return commands::cmd_version(map.as_ref());
    }

    let map = decode(&raw, version)?;
    let conf = NetConf::from_map(&map)?;
    if let Some(path) = &conf.log_file {
        log.open_file(path);
    }

    match command {
        Command::Status => commands::cmd_status(&conf),
        Command::Gc => commands::cmd_gc(&conf),
        Command::Add | Command::Del | Command::Check => {
            let cni_env = commands::load_env(env, command, log)?;
            let inv = commands::Invocation {
                conf: &conf,
                env: &cni_env,
                log,
            };
            match command {
                Command::Add => commands::cmd_add(inv),
                Command::Del => commands::cmd_del(inv),
                _ => commands::cmd_check(inv),
            }
        }
        Command::Version => commands::cmd_version(Some(&map)),
    }
}

/// Reads the network config, refusing one over [`MAX_STDIN_BYTES`] for its size: a truncated
/// document would otherwise surface as a puzzling parse error.
fn read_stdin<R: Read>(stdin: R) -> CniResult<Vec<u8>> {
    let mut raw = Vec::new();
    // One byte past the limit tells "exactly the limit" from "more".
    stdin.take(MAX_STDIN_BYTES + 1).read_to_end(&mut raw).map_err(|e| {
        CniError::new(codes::IO_FAILURE, "reading network config from stdin").with_details(e.to_string())
    })?;
    if u64::try_from(raw.len()).unwrap_or(u64::MAX) > MAX_STDIN_BYTES {
        return Err(CniError::new(
            codes::INVALID_NETWORK_CONFIG,
            format!("network config larger than {} MiB on stdin", MAX_STDIN_BYTES >> 20),
        )
        .with_details("refused unread: a CNI network config is a few KiB"));
    }
    Ok(raw)
}

/// Decode stdin and remember its cniVersion for error output.
fn decode(raw: &[u8], version: &mut String) -> CniResult<Map<String, Value>> {
    let map = config::decode_stdin(raw)?;
    *version = config::error_version(Some(&map));
    Ok(map)
}
