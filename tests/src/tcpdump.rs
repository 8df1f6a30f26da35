//! tcpdump as a test's witness of what crosses a link: started in a namespace, returned once
//! it reports the capture live ("listening on"), stopped with SIGINT so it flushes.

use std::io::BufRead;
use std::process::{Child, Output, Stdio};

use anyhow::{bail, Context, Result};

pub struct Tcpdump(Child);

impl Tcpdump {
    /// Runs `tcpdump <args>` in namespace `ns` (stdout piped) and waits until the capture
    /// is live.
    pub fn start(ns: &str, args: &[&str]) -> Result<Tcpdump> {
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("tcpdump (installed by scripts/deps.sh)")?;
        let mut err = std::io::BufReader::new(child.stderr.take().context("tcpdump stderr")?);
        let mut said = String::new();
        while !said.contains("listening") {
            let mut line = String::new();
            if err.read_line(&mut line)? == 0 {
                let _ = child.kill();
                let _ = child.wait();
                bail!("tcpdump exited: {said}");
            }
            said.push_str(&line);
        }
        Ok(Tcpdump(child))
    }

    /// Stops the capture (SIGINT: tcpdump writes what it holds) and returns its output.
    pub fn stop(self) -> Result<Output> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        Ok(self.0.wait_with_output()?)
    }
}
