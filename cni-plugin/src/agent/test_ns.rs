//! Real network namespaces for root tests, removed however the test ends: namespaces pinned
//! under `/var/run/netns` and processes held inside them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Runs a command; whether it succeeded.
pub fn run(args: &[&str]) -> bool {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success())
}

/// Namespaces pinned for a test (`ip netns add`), deleted on drop.
#[derive(Default)]
pub struct TestNs(pub Vec<String>);

impl TestNs {
    /// Pins namespace `name`; its path.
    pub fn add(&mut self, name: String) -> PathBuf {
        assert!(run(&["ip", "netns", "add", &name]), "ip netns add {name}");
        self.0.push(name);
        self.path(self.0.len() - 1)
    }

    pub fn path(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0[i]))
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        for name in &self.0 {
            run(&["ip", "netns", "del", name]);
        }
    }
}

/// A process held in a namespace, killed on drop.
pub struct Holder(pub std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process in namespace `name` (pinned at `path`), once it is in: its `/proc/<pid>/ns/net`.
pub fn hold(name: &str, path: &Path) -> (Holder, PathBuf) {
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", name, "sleep", "60"])
        .spawn()
        .map(Holder)
        .expect("ip netns exec");
    let held = PathBuf::from(format!("/proc/{}/ns/net", child.0.id()));
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    // `ip netns exec` switches before it runs sleep: wait until it has.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while id(&held) != id(path) {
        assert!(
            std::time::Instant::now() < deadline,
            "holder never entered the namespace"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (child, held)
}
