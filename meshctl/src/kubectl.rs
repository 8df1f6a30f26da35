//! Running `kubectl`: one place that spawns it, feeds stdin, captures output and turns a
//! missing binary or a failed command into an error that says what to do.

use std::io::Write;
use std::process::{Command, Stdio};

/// Why a kubectl invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error("kubectl not found in PATH: install kubectl (https://kubernetes.io/docs/tasks/tools/) or use the local mode ({hint})")]
    Missing { hint: &'static str },
    #[error("cannot run kubectl: {0}")]
    Spawn(std::io::Error),
    #[error("`kubectl {args}` failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
}

/// The binary to run: `$KUBECTL` if set (tests, wrappers), else `kubectl`.
fn program() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned())
}

/// Runs `kubectl args...` with `stdin` (if any); returns stdout. `hint` says what to use
/// instead when kubectl is missing.
pub fn run(args: &[&str], stdin: Option<&str>, hint: &'static str) -> Result<String, KubectlError> {
    let mut child = Command::new(program())
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KubectlError::Missing { hint },
            _ => KubectlError::Spawn(e),
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (kubectl exited early) shows up in its status and stderr below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(KubectlError::Spawn)?;
    if !out.status.success() {
        return Err(KubectlError::Failed {
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: last_lines(&String::from_utf8_lossy(&out.stderr), 2),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` non-empty lines (kubectl repeats client-side errors many times).
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_kubectl_says_what_to_do() {
        std::env::set_var("KUBECTL", "/nonexistent/kubectl");
        let e = super::run(&["version"], None, "--print").unwrap_err().to_string();
        std::env::remove_var("KUBECTL");
        assert!(
            e.starts_with("kubectl not found in PATH") && e.contains("--print"),
            "{e}"
        );
        assert_eq!(super::last_lines("a\n\nb\nc\n", 2), "b\nc");
    }
}
