//! Finding the network namespace of a pod the agent never saw through CNI (it ran before the
//! mesh was installed, or while no agent ran): every namespace pinned under /var/run/netns
//! (where container runtimes keep pod sandboxes) or held by a process (/proc/<pid>/ns/net),
//! looked into once each, matched by the pod's IP.
//!
//! An IP is anyone's to add (`ip addr add` in a pod with NET_ADMIN, or `unshare -rn` on the
//! node), so an IP held by more than one namespace does not name the pod by itself. The pod's
//! cgroup does: the kubelet puts every process of pod `<UID>` under a cgroup named after it
//! (`pod<UID>`, or `…-pod<UID_with_underscores>.slice` with the systemd driver), which a
//! process in a pod cannot leave. Of the namespaces holding the IP, the one with a process in
//! the pod's cgroup is the pod's; when none or several are, the IP is reported as ambiguous
//! and adopted nowhere, since adopting the wrong one would leave the real pod uncaptured and
//! give its identity to the impostor.
//!
//! Within one scan every namespace looked into stays open until the scan ends, so no inode
//! is reused meanwhile and device and inode tell namespaces apart cheaply (one fstat per
//! path). Only a namespace holding a wanted IP gets its full identity, cookie included
//! ([`NsId`]), read while the scan's thread is in it: that identity is what an adopted pod
//! is recorded with and checked against whenever its namespace is opened again.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;

use super::netns::{self, Inode, NsId};

/// A namespace holding an IP: one path that reached it, and its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub path: PathBuf,
    pub id: NsId,
}

/// What a scan found for the IPs it was asked about; IPs no namespace holds are in neither.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// IPs held by exactly one namespace.
    pub owned: HashMap<IpAddr, Owner>,
    /// IPs held by more than one namespace, with every owner, none of them (or several)
    /// told apart as the pod's by its cgroup: adopted nowhere.
    pub ambiguous: HashMap<IpAddr, Vec<Owner>>,
    /// IPs in `owned` by the pod's cgroup, with the other namespaces that hold them too.
    pub impostors: HashMap<IpAddr, Vec<Owner>>,
}

impl Found {
    /// Sorts what each namespace holds (one observation per path looked into; the same
    /// namespace reached through several paths counts once) into owned and ambiguous IPs.
    fn resolve(seen: impl IntoIterator<Item = (Owner, Vec<IpAddr>)>, ips: &HashSet<IpAddr>) -> Found {
        let mut owners: HashMap<IpAddr, Vec<Owner>> = HashMap::new();
        for (owner, held) in seen {
            for ip in held.into_iter().filter(|ip| ips.contains(ip)) {
                let of_ip = owners.entry(ip).or_default();
                if !of_ip.iter().any(|o| o.id.inode() == owner.id.inode()) {
                    of_ip.push(owner.clone());
                }
            }
        }
        let mut found = Found::default();
        for (ip, of_ip) in owners {
            match <[Owner; 1]>::try_from(of_ip) {
                Ok([only]) => {
                    found.owned.insert(ip, only);
                }
                Err(many) => {
                    found.ambiguous.insert(ip, many);
                }
            }
        }
        found
    }

    /// Settles each ambiguous IP whose pod (UID in `uids`) has processes (`procs`: namespace
    /// inode and `/proc/<pid>/cgroup` text) in exactly one of the namespaces holding it.
    fn settle(&mut self, uids: &HashMap<IpAddr, String>, procs: &[(Inode, String)]) {
        for (ip, owners) in std::mem::take(&mut self.ambiguous) {
            let uid = uids.get(&ip).map_or("", String::as_str);
            let mut pods = owners.iter().filter(|o| {
                procs
                    .iter()
                    .any(|(id, cgroup)| *id == o.id.inode() && cgroup_names_pod(cgroup, uid))
            });
            match (pods.next().cloned(), pods.next()) {
                (Some(pod), None) => {
                    let others = owners.into_iter().filter(|o| o.id.inode() != pod.id.inode()).collect();
                    self.impostors.insert(ip, others);
                    self.owned.insert(ip, pod);
                }
                _ => drop(self.ambiguous.insert(ip, owners)),
            }
        }
    }
}

/// Whether the text of a `/proc/<pid>/cgroup` places the process in the cgroup of pod `uid`:
/// a path component `pod<uid>` (cgroupfs driver) or `…-pod<uid>.slice` (systemd driver,
/// dashes of the uid as underscores), in any line (cgroup v1 hierarchies or v2's one).
/// Never for an empty uid.
fn cgroup_names_pod(cgroup: &str, uid: &str) -> bool {
    if uid.is_empty() {
        return false;
    }
    let is_uid = |tail: &str| {
        tail.len() == uid.len()
            && (tail.bytes().zip(uid.bytes())).all(|(t, u)| t.eq_ignore_ascii_case(&u) || (t == b'_' && u == b'-'))
    };
    cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .any(|part| {
            let systemd = part
                .strip_suffix(".slice")
                .and_then(|p| p.rsplit_once("-pod"))
                .map(|(_, t)| t);
            systemd.or_else(|| part.strip_prefix("pod")).is_some_and(is_uid)
        })
}

/// Each process's network namespace (inode) and cgroup text, for the processes that can be
/// read.
fn processes() -> Vec<(Inode, String)> {
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()));
    pids.filter_map(|e| {
        let id = Inode::of(&File::open(e.path().join("ns/net")).ok()?).ok()?;
        Some((id, std::fs::read_to_string(e.path().join("cgroup")).ok()?))
    })
    .collect()
}

/// Candidate namespace paths: pinned ones first, then those held by processes.
fn namespaces() -> Vec<PathBuf> {
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
    pinned.chain(held).collect()
}

/// The addresses of the namespace the calling thread is in.
fn addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            a.address.and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
        })
        .collect()
}

/// Looks into each namespace at `paths` once (by inode, taken from the opened file so a path
/// that changes meanwhile cannot mislead), on the calling thread: the addresses of `ips` each
/// holds, with its identity. Every namespace looked into is returned open, for the caller to
/// hold while it compares inodes.
fn look_into(paths: Vec<PathBuf>, ips: &HashSet<IpAddr>) -> (Vec<(Owner, Vec<IpAddr>)>, Vec<File>) {
    let mut looked = HashSet::new();
    let (mut seen, mut held) = (Vec::new(), Vec::new());
    for path in paths {
        let Ok(file) = File::open(&path) else { continue };
        let Ok(inode) = Inode::of(&file) else { continue };
        if !looked.insert(inode) {
            continue;
        }
        let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET);
        held.push(file);
        if entered.is_err() {
            continue;
        }
        let wanted: Vec<IpAddr> = addresses().into_iter().filter(|ip| ips.contains(ip)).collect();
        if wanted.is_empty() {
            continue;
        }
        // A cookie that cannot be read leaves the identity unproven: an adoption through a
        // process's path is then refused when the pod is enrolled, yet the namespace still
        // counts as an owner of its IPs.
        let id = NsId::from_parts(inode, netns::cookie_here().ok().flatten());
        seen.push((Owner { path, id }, wanted));
    }
    (seen, held)
}

/// Where each IP of `uids` (with the UID of the pod it is wanted for; empty when unknown) is
/// held. Every namespace is looked into (a second owner must not be missed), on a short-lived
/// thread that switches into each in turn (the caller's thread never changes namespace); an
/// IP held by several is settled by the pod's cgroup when it can be.
pub fn find(uids: &HashMap<IpAddr, String>) -> Found {
    if uids.is_empty() {
        return Found::default();
    }
    let ips: HashSet<IpAddr> = uids.keys().copied().collect();
    let candidates = namespaces();
    let (seen, held) =
        std::thread::scope(|scope| scope.spawn(|| look_into(candidates, &ips)).join().unwrap_or_default());
    let mut found = Found::resolve(seen, &ips);
    if !found.ambiguous.is_empty() {
        found.settle(uids, &processes());
    }
    drop(held);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(path: &str, ino: u64) -> Owner {
        Owner {
            path: PathBuf::from(path),
            id: NsId {
                dev: 4,
                ino,
                cookie: Some(ino + 100),
            },
        }
    }

    #[test]
    fn an_ip_two_namespaces_hold_is_adopted_nowhere() {
        let victim: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let ips = HashSet::from([victim, other]);
        let seen = vec![
            // The impostor, pinned (listed first), then the real pod held by its process.
            (owner("/var/run/netns/evil", 1), vec![victim]),
            (owner("/proc/42/ns/net", 2), vec![victim, other]),
        ];
        let found = Found::resolve(seen, &ips);
        assert_eq!(found.owned.get(&victim), None);
        let both: Vec<u64> = found.ambiguous[&victim].iter().map(|o| o.id.ino).collect();
        assert_eq!(both, [1, 2]);
        assert_eq!(found.owned[&other].id.ino, 2);
    }

    const UID: &str = "5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10";

    #[test]
    fn a_cgroup_names_the_pod_under_either_driver_and_cgroup_version() {
        let table = [
            // cgroup v2, systemd driver (containerd, CRI-O).
            ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f0c2d6e_1b7a_4c1e_9f3b_2a8d7e6c4b10.slice/cri-containerd-ab12.scope\n", true),
            ("0::/kubepods.slice/kubepods-pod5f0c2d6e_1b7a_4c1e_9f3b_2a8d7e6c4b10.slice/crio-ab12.scope\n", true),
            // cgroup v2, cgroupfs driver; a guaranteed pod sits right under kubepods.
            ("0::/kubepods/besteffort/pod5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10/ab12\n", true),
            ("0::/kubepods/pod5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10/ab12\n", true),
            // cgroup v1: one line per hierarchy.
            ("12:memory:/kubepods/burstable/pod5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10/ab12\n1:name=systemd:/kubepods/burstable/pod5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10/ab12\n", true),
            ("11:cpu,cpuacct:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f0c2d6e_1b7a_4c1e_9f3b_2a8d7e6c4b10.slice/docker-ab12.scope\n", true),
            // Seen from inside the agent's own cgroup namespace.
            ("0::/../../kubepods-burstable-pod5f0c2d6e_1b7a_4c1e_9f3b_2a8d7e6c4b10.slice/cri-containerd-ab12.scope\n", true),
            // Upper case hex (as some runtimes print it).
            ("0::/kubepods/pod5F0C2D6E-1B7A-4C1E-9F3B-2A8D7E6C4B10/ab12\n", true),
            // Another pod, a uid prefix or extension, the uid outside a pod component.
            ("0::/kubepods/burstable/pod0a0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10/ab12\n", false),
            ("0::/kubepods/burstable/pod5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b1/ab12\n", false),
            ("0::/kubepods/burstable/pod5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b100/ab12\n", false),
            ("0::/user.slice/5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10/x\n", false),
            ("0::/system.slice/containerd.service\n", false),
            ("", false),
        ];
        for (cgroup, names) in table {
            assert_eq!(cgroup_names_pod(cgroup, UID), names, "{cgroup}");
        }
        assert!(
            !cgroup_names_pod("0::/kubepods/pod/ab12\n", ""),
            "an unknown uid names no pod"
        );
    }

    #[test]
    fn the_pods_cgroup_tells_its_namespace_from_an_impostors() {
        let victim: IpAddr = "10.0.0.7".parse().unwrap();
        let uids = HashMap::from([(victim, UID.to_owned())]);
        let seen = || {
            vec![
                (owner("/var/run/netns/evil", 1), vec![victim]),
                (owner("/var/run/netns/cni-2", 2), vec![victim]),
            ]
        };
        let pod = "0::/kubepods/burstable/pod5f0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10/pause\n".to_owned();
        let other = "0::/kubepods/burstable/pod0a0c2d6e-1b7a-4c1e-9f3b-2a8d7e6c4b10/ab12\n".to_owned();
        let id = |ino| Inode { dev: 4, ino };
        let settled = |procs: &[(Inode, String)]| {
            let mut found = Found::resolve(seen(), &HashSet::from([victim]));
            found.settle(&uids, procs);
            found
        };
        // The pod's pause process is in namespace 2, an impostor's process in 1.
        let found = settled(&[(id(1), other.clone()), (id(2), pod.clone())]);
        assert_eq!(found.owned.get(&victim).map(|o| o.id.ino), Some(2), "{found:?}");
        assert!(found.ambiguous.is_empty(), "{found:?}");
        assert_eq!(found.impostors[&victim], [owner("/var/run/netns/evil", 1)]);
        // No namespace, or both, with a process of the pod: still adopted nowhere.
        for procs in [
            vec![(id(1), other.clone())],
            vec![(id(1), pod.clone()), (id(2), pod.clone())],
        ] {
            let found = settled(&procs);
            assert!(found.owned.is_empty(), "{found:?}");
            assert_eq!(found.ambiguous[&victim].len(), 2, "{found:?}");
        }
        // A pod whose uid is not known is never matched.
        let mut found = Found::resolve(seen(), &HashSet::from([victim]));
        found.settle(&HashMap::from([(victim, String::new())]), &[(id(2), pod)]);
        assert!(found.owned.is_empty(), "{found:?}");
    }

    #[test]
    fn one_namespace_through_two_paths_is_one_owner() {
        let ip: IpAddr = "fd00::7".parse().unwrap();
        let seen = vec![
            (owner("/var/run/netns/cni-1", 9), vec![ip]),
            (owner("/proc/42/ns/net", 9), vec![ip]),
        ];
        let found = Found::resolve(seen, &HashSet::from([ip]));
        assert!(found.ambiguous.is_empty(), "{found:?}");
        assert_eq!(found.owned[&ip], owner("/var/run/netns/cni-1", 9));
    }

    use super::super::test_ns::{hold, run, TestNs};

    fn id_of(path: &std::path::Path) -> Option<NsId> {
        netns::identify(path)
    }

    #[test]
    fn real_namespaces_are_told_apart_by_identity_not_path() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let mut ns = TestNs::default();
        let pid = std::process::id();
        ns.add(format!("scanreal{pid}"));
        ns.add(format!("scanevil{pid}"));
        let (real, impostor) = (ns.0[0].clone(), ns.0[1].clone());
        // TEST-NET-2 addresses: on no real interface.
        let (shared, own) = ("198.51.100.7", "198.51.100.8");
        assert!(run(&["ip", "-n", &real, "addr", "add", shared, "dev", "lo"]));
        assert!(run(&["ip", "-n", &real, "addr", "add", own, "dev", "lo"]));
        assert!(run(&["ip", "-n", &impostor, "addr", "add", shared, "dev", "lo"]));
        let (_child, held) = hold(&real, &ns.path(0));
        let (shared, own): (IpAddr, IpAddr) = (shared.parse().unwrap(), own.parse().unwrap());
        let paths = vec![held.clone(), ns.path(1), ns.path(0)];
        let ips = HashSet::from([shared, own]);
        let wanted = ips.clone();
        let (seen, _held) = std::thread::spawn(move || look_into(paths, &wanted)).join().unwrap();
        let found = Found::resolve(seen, &ips);
        assert_eq!(found.owned.get(&shared), None, "{found:?}");
        assert_eq!(found.ambiguous[&shared].len(), 2, "{found:?}");
        assert_eq!(found.owned[&own].path, held, "{found:?}");
        // The identity the scan records, cookie included, is the one the agent reads when it
        // opens the namespace through another path.
        assert_eq!(Some(found.owned[&own].id), id_of(&ns.path(0)));
    }
}
