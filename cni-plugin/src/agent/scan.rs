//! Finding the network namespace of a pod the agent never saw through CNI (it ran before the
//! mesh was installed, or while no agent ran): every namespace pinned under /var/run/netns
//! (where container runtimes keep pod sandboxes) or held by a process (/proc/<pid>/ns/net),
//! looked into once each, matched by the pod's IP.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Candidate namespace paths, one per distinct namespace (by inode).
fn namespaces() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let pinned = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let held = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .map(|e| e.path().join("ns/net"));
    for path in pinned.chain(held) {
        if let Ok(meta) = std::fs::metadata(&path) {
            if seen.insert((meta.dev(), meta.ino())) {
                out.push(path);
            }
        }
    }
    out
}

/// The namespace holding each of `ips`, for those found. Runs on a short-lived thread that
/// switches into each namespace in turn (the caller's thread never changes namespace).
pub fn find(ips: &HashSet<IpAddr>) -> HashMap<IpAddr, PathBuf> {
    if ips.is_empty() {
        return HashMap::new();
    }
    let candidates = namespaces();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut found = HashMap::new();
                for path in candidates {
                    let Ok(file) = std::fs::File::open(&path) else { continue };
                    if nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                        continue;
                    }
                    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
                        continue;
                    };
                    for a in addrs {
                        let ip = a.address.and_then(|s| {
                            s.as_sockaddr_in()
                                .map(|v4| IpAddr::V4(v4.ip()))
                                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                        });
                        if let Some(ip) = ip.filter(|ip| ips.contains(ip)) {
                            found.entry(ip).or_insert_with(|| path.clone());
                        }
                    }
                    if found.len() == ips.len() {
                        break;
                    }
                }
                found
            })
            .join()
            .unwrap_or_default()
    })
}
