//! The pod sysctl written through a sysctl tree mounted somewhere else than `/proc/sys`, as the
//! unprivileged DaemonSet does (the node's `/proc/sys/net` at `/host/proc/sys/net`, because the
//! runtime mounts the container's own `/proc/sys` read-only).
//!
//! What this rests on: a net sysctl file belongs to the network namespace of the thread that
//! opens it, not to the mount it is reached through nor to the proc instance behind it. So the
//! agent's thread switched into a pod's namespace changes the pod's value; the namespace the
//! agent runs in and the root namespace (whose proc instance is mounted) keep theirs. A
//! read-only mount (the runtime's `/proc/sys`) is refused, at start-up and per pod.
//!
//! The "agent" runs on a thread in a network namespace of its own (its value is known to start
//! at 0, whatever other tests do to the root's) with a mount namespace private to that thread:
//! the mounts are invisible on the host and vanish with the thread, whatever happens.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use cni_plugin::agent::rules::{self, Ports};

const KEY: &str = "net.ipv4.tcp_migrate_req";

struct Ns(String);

impl Ns {
    fn new(prefix: &str) -> Option<Ns> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return None;
        }
        let name = format!("{prefix}{}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        Some(Ns(name))
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }

    /// The sysctl as `sysctl` run inside the namespace reads it.
    fn sysctl(&self) -> String {
        run(&["ip", "netns", "exec", &self.0, "sysctl", "-n", KEY])
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The node's value, read in this process's (the root) network namespace.
fn node_value() -> String {
    run(&["sysctl", "-n", KEY])
}

/// Runs `f` on a thread in `agent`'s network namespace with a mount namespace of its own
/// (mounts not propagated to the host); the `mount` commands it spawns and the threads it
/// starts share both.
fn as_agent<T: Send>(agent: &Ns, f: impl FnOnce() -> T + Send) -> T {
    let netns = std::fs::File::open(agent.path()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
            run(&["mount", "--make-rprivate", "/"]);
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("agent thread")
    })
}

fn bind(source: &str, target: &Path, read_only: bool) {
    std::fs::create_dir_all(target).unwrap();
    let target = target.to_str().unwrap();
    run(&["mount", "--bind", source, target]);
    if read_only {
        run(&["mount", "-o", "remount,bind,ro", target]);
    }
}

#[test]
fn pod_sysctl_through_a_host_proc_sys_mounted_elsewhere() {
    let (Some(ns), Some(agent)) = (Ns::new("sysdir"), Ns::new("sysagent")) else {
        return;
    };
    let root = node_value();
    // Kept outside the private mounts: dropped (deleted) only after they are gone.
    let (whole, net_only) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let layouts = [
        // All of /proc/sys bound onto a directory.
        ("/proc/sys", whole.path().to_path_buf(), whole.path().to_path_buf()),
        // Only /proc/sys/net, as manifests/cni/daemonset.yaml mounts it.
        (
            "/proc/sys/net",
            net_only.path().join("net"),
            net_only.path().to_path_buf(),
        ),
    ];
    for (source, target, proc_sys) in layouts {
        let at = format!("{source} at {}", target.display());
        assert_eq!(ns.sysctl(), "0", "a new namespace starts with {KEY}=0");
        assert_eq!(agent.sysctl(), "0");
        as_agent(&agent, || {
            bind(source, &target, false);
            rules::check_proc_sys(&proc_sys).expect("a read-write mount passes the start-up check");
            rules::install_via(&ns.path(), Ports::default(), &proc_sys).expect("install through the mount");
        });
        assert_eq!(ns.sysctl(), "1", "{at}: the pod's namespace did not take the value");
        assert_eq!(agent.sysctl(), "0", "{at}: the agent's namespace took the value");
        // Decisive while the root's is 0 (the kernel's default); another test may have set it.
        assert_eq!(node_value(), root, "{at}: the root namespace's value changed");
        as_agent(&agent, || {
            bind(source, &target, false);
            rules::remove_via(&ns.path(), &proc_sys).expect("remove through the mount");
        });
        assert_eq!(ns.sysctl(), "0", "{at}: removal did not reset the pod's value");
    }
}

#[test]
fn a_read_only_sysctl_tree_is_refused() {
    let (Some(ns), Some(agent)) = (Ns::new("sysro"), Ns::new("sysroagent")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let proc_sys = dir.path().to_path_buf();
    as_agent(&agent, || {
        // What the runtime gives an unprivileged container at /proc/sys.
        bind("/proc/sys/net", &proc_sys.join("net"), true);
        let e = rules::check_proc_sys(&proc_sys).expect_err("a read-only mount passed the start-up check");
        assert!(e.to_string().contains("Read-only"), "{e}");
        let e = rules::install_via(&ns.path(), Ports::default(), &proc_sys)
            .expect_err("install succeeded without writing the sysctl");
        assert!(e.to_string().contains(KEY), "{e}");
    });
    assert_eq!(ns.sysctl(), "0");
    // Nothing mounted there at all: the configured directory is the one used, not /proc/sys.
    let empty = tempfile::tempdir().unwrap();
    assert!(rules::check_proc_sys(empty.path()).is_err());
    assert!(rules::install_via(&ns.path(), Ports::default(), empty.path()).is_err());
}
