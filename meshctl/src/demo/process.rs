//! Processes of the demo: is a pid alive, signal it, and run a command inside a network
//! namespace (`ip netns exec`).

use std::process::Command;

/// Whether `pid` exists (a process we may not signal still counts).
pub fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends SIGTERM; `Ok(false)` when the process was already gone.
pub fn terminate(pid: i32) -> std::io::Result<bool> {
    if pid <= 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid pid {pid}"),
        ));
    }
    // SAFETY: plain kill(2) on a positive pid read from the state file.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// `ip netns exec <netns> <program> args...`.
pub fn in_netns(netns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns, program]);
    c
}

/// Names in `ip netns list` (first word of each line).
pub fn netns_list() -> std::io::Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// The last `n` lines of a file (empty when unreadable).
pub fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn our_own_pid_is_alive_and_pid_zero_is_not() {
        assert!(super::alive(std::process::id() as i32));
        assert!(!super::alive(0));
    }
}
