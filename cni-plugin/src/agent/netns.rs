//! The identity of a network namespace, the same through every path that reaches it
//! (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`). Paths are only names: two of them may
//! reach one namespace, and `/proc/<pid>/ns/net` reaches another one once the pid is reused,
//! so the agent compares identities, never paths.
//!
//! An identity is the device and inode of the namespace's nsfs file plus the kernel's
//! namespace cookie (`SO_NETNS_COOKIE`, read from a socket made inside the namespace). The
//! inode alone is not enough: it is reused once nothing holds the namespace, so after the
//! agent and ztunnel both restart, a `/proc/<pid>/ns/net` path could reach another namespace
//! (a host process's even) with the recorded inode. The cookie is never reused within a boot
//! (and the state file, under /var/run by default, does not outlive one).
//! A kernel without cookies (before 5.14: `ENOPROTOOPT`) leaves device and inode alone, with
//! one warning.
//!
//! A recorded identity without a cookie (a state file from an older agent) cannot prove
//! which namespace it was. Behind a pinned path (a bind mount the runtime names uniquely,
//! which holds the namespace, so its inode cannot be reused while the path exists) it is
//! taken as it is, then recorded again with the cookie: upgraded nodes keep their pods.
//! Behind a process's path it is refused ([`NetnsError::Unproven`]): the pod is forgotten,
//! and one adopted by its IP is found again by the next scan, with a cookie.
//!
//! A pod's namespace is opened once per use ([`open`]), checked against the identity recorded
//! when the pod was enrolled and against the node's own namespace (which must never get pod
//! rules), and the open file, not the path, is then written to and handed to ztunnel.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// The calling thread's network namespace: the node's, for the agent's own threads.
const HOST: &str = "/proc/thread-self/ns/net";

/// Set once the kernel was found to have no namespace cookies (warned about once).
static NO_COOKIES: AtomicBool = AtomicBool::new(false);

/// The device and inode of a namespace's nsfs file: which namespace it reaches while that
/// namespace lives (the inode is reused once it is gone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Inode {
    pub dev: u64,
    pub ino: u64,
}

impl Inode {
    /// The inode of an open file (fstat: the file, not whatever its path names now).
    pub fn of(file: &File) -> std::io::Result<Inode> {
        let meta = file.metadata()?;
        Ok(Inode {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Which network namespace a file reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
    /// The kernel's cookie of the namespace, never reused within a boot; `None` on a kernel
    /// without cookies, or in a state file written before they were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
}

impl std::fmt::Display for NsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)?;
        match self.cookie {
            Some(cookie) => write!(f, " cookie {cookie}"),
            None => write!(f, " (no cookie)"),
        }
    }
}

/// What comparing a recorded identity with one read now proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// The same namespace (on a kernel without cookies: the same device and inode).
    Same,
    /// Another namespace.
    Different,
    /// The same device and inode, but one side has no cookie: either namespace.
    Unproven,
}

impl NsId {
    /// The namespace an open file reaches: its inode (fstat), and its cookie read on a
    /// short-lived thread switched into it (the caller's thread never changes namespace).
    pub fn of(file: &File) -> Result<NsId, IdError> {
        let inode = Inode::of(file).map_err(IdError::Stat)?;
        let cookie = enter(file, cookie_here)??;
        Ok(NsId::from_parts(inode, cookie))
    }

    /// The identity of a namespace of inode `inode` and cookie `cookie`.
    pub fn from_parts(inode: Inode, cookie: Option<u64>) -> NsId {
        NsId {
            dev: inode.dev,
            ino: inode.ino,
            cookie,
        }
    }

    /// Its device and inode.
    pub fn inode(&self) -> Inode {
        Inode {
            dev: self.dev,
            ino: self.ino,
        }
    }

    /// Whether `now` is the namespace `self` identifies: the inode must match, and so must
    /// the cookies when both have one; with a cookie on one side only, nothing is proven.
    pub fn proves(&self, now: &NsId) -> Proof {
        if self.inode() != now.inode() {
            return Proof::Different;
        }
        match (self.cookie, now.cookie) {
            (Some(a), Some(b)) if a == b => Proof::Same,
            (Some(_), Some(_)) => Proof::Different,
            (None, None) => Proof::Same,
            _ => Proof::Unproven,
        }
    }
}

/// Why a namespace's identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error("reading the namespace file: {0}")]
    Stat(#[source] std::io::Error),
    #[error(transparent)]
    Enter(#[from] EnterError),
    #[error("opening a socket in the namespace: {0}")]
    Socket(#[source] Errno),
    #[error("reading the namespace cookie: {0}")]
    Cookie(#[source] Errno),
}

/// Why code could not run inside a namespace.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    #[error("starting a thread for the namespace: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("setns: {0}")]
    Setns(#[source] Errno),
    #[error("the thread switched into the namespace panicked")]
    Panicked,
}

/// Runs `f` on a short-lived thread switched into the network namespace `file` reaches:
/// sockets and sysctl files it opens belong to that namespace. The caller's thread (a tokio
/// worker, say) never switches.
pub fn enter<T: Send>(file: &File, f: impl FnOnce() -> T + Send) -> Result<T, EnterError> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().spawn_scoped(scope, || {
            setns(file, CloneFlags::CLONE_NEWNET).map_err(EnterError::Setns)?;
            Ok(f())
        });
        thread
            .map_err(EnterError::Spawn)?
            .join()
            .unwrap_or(Err(EnterError::Panicked))
    })
}

/// The cookie of the namespace the calling thread is in; `None` when the kernel has none.
pub fn cookie_here() -> Result<Option<u64>, IdError> {
    let sock =
        socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(IdError::Socket)?;
    let mut cookie: u64 = 0;
    let mut len: libc::socklen_t = 8;
    // SAFETY: getsockopt writes at most `len` (8) bytes into `cookie`, a live u64, and its
    // length into `len`; the descriptor is owned by `sock` for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    let read = if rc == 0 && len == 8 {
        Ok(cookie)
    } else if rc == 0 {
        Err(Errno::EINVAL)
    } else {
        Err(Errno::last())
    };
    interpret(read)
}

/// A cookie read: a kernel that does not know the option (`ENOPROTOOPT`) has no cookies,
/// which is warned about once; any other failure is an error.
fn interpret(read: Result<u64, Errno>) -> Result<Option<u64>, IdError> {
    match read {
        Ok(cookie) => Ok(Some(cookie)),
        Err(Errno::ENOPROTOOPT) => {
            if !NO_COOKIES.swap(true, Ordering::Relaxed) {
                tracing::warn!("the kernel has no network namespace cookies (SO_NETNS_COOKIE, Linux 5.14): namespaces are told apart by device and inode only, which are reused once a namespace is gone");
            }
            Ok(None)
        }
        Err(e) => Err(IdError::Cookie(e)),
    }
}

/// The node's network namespace (that of the calling thread, which must be one of the
/// agent's own, never switched): read without switching anywhere.
pub fn host() -> Result<NsId, IdError> {
    let inode = Inode::of(&File::open(HOST).map_err(IdError::Stat)?).map_err(IdError::Stat)?;
    Ok(NsId::from_parts(inode, cookie_here()?))
}

/// Whether `path` reaches a namespace through a process (`/proc/<pid>/ns/net`, also under
/// another mount of a proc filesystem), which reaches another namespace once the pid is
/// reused; any other path is taken as pinned (a bind mount the runtime owns).
pub fn held_by_process(path: &Path) -> bool {
    let mut tail = path.components().rev().map(|c| c.as_os_str());
    let ns_net = tail.next().is_some_and(|c| c == "net") && tail.next().is_some_and(|c| c == "ns");
    path.starts_with("/proc") || ns_net
}

/// Why a pod's namespace was not opened: in every case nothing was written anywhere.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("identifying network namespace {}: {source}", path.display())]
    Identify { path: PathBuf, source: IdError },
    #[error("{} reaches network namespace {now}, not the pod's ({recorded}): the pod is gone", path.display())]
    Replaced { path: PathBuf, recorded: NsId, now: NsId },
    #[error("{} reaches network namespace {now}, which cannot be proven the pod's ({recorded}): a process's path and a cookie on one side only", path.display())]
    Unproven { path: PathBuf, recorded: NsId, now: NsId },
    #[error("{} is the node's own network namespace: pod rules never go there", path.display())]
    Host { path: PathBuf },
    #[error("the node's own network namespace could not be identified: no pod namespace is used")]
    HostUnknown,
}

impl NetnsError {
    /// Whether the pod's namespace is no longer (provably) at its path: nothing of the pod
    /// is to be touched there.
    pub fn gone(&self) -> bool {
        match self {
            NetnsError::Replaced { .. } | NetnsError::Unproven { .. } => true,
            NetnsError::Open { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            NetnsError::Identify { .. } | NetnsError::Host { .. } | NetnsError::HostUnknown => false,
        }
    }
}

/// A pod's network namespace, open and checked.
#[derive(Debug)]
pub struct PodNetns {
    pub file: File,
    pub path: PathBuf,
    pub id: NsId,
}

/// Opens the namespace at `path` for a pod: refused when it is the node's (`host`, `None`
/// when that could not be read: then every namespace is refused) or not the one `recorded`
/// when the pod was enrolled.
pub fn open(path: &Path, recorded: Option<NsId>, host: Option<NsId>) -> Result<PodNetns, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    let Some(host) = host else {
        return Err(NetnsError::HostUnknown);
    };
    let id = NsId::of(&file).map_err(|source| NetnsError::Identify {
        path: path.to_owned(),
        source,
    })?;
    check(path, id, recorded, host)?;
    Ok(PodNetns {
        file,
        path: path.to_owned(),
        id,
    })
}

/// Whether the namespace `now` at `path` may be used for a pod enrolled in `recorded`: not
/// when it may be the node's (`host`), nor when it is not provably the recorded one, except
/// for a record without a cookie behind a pinned path (see the module doc).
fn check(path: &Path, now: NsId, recorded: Option<NsId>, host: NsId) -> Result<(), NetnsError> {
    if host.proves(&now) != Proof::Different {
        return Err(NetnsError::Host { path: path.to_owned() });
    }
    let Some(recorded) = recorded else { return Ok(()) };
    match recorded.proves(&now) {
        Proof::Same => Ok(()),
        Proof::Unproven if recorded.cookie.is_none() && !held_by_process(path) => Ok(()),
        Proof::Unproven => Err(NetnsError::Unproven {
            path: path.to_owned(),
            recorded,
            now,
        }),
        Proof::Different => Err(NetnsError::Replaced {
            path: path.to_owned(),
            recorded,
            now,
        }),
    }
}

/// The identity of the namespace at `path` now, when it can be read.
pub fn identify(path: &Path) -> Option<NsId> {
    File::open(path).ok().and_then(|file| NsId::of(&file).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64, cookie: Option<u64>) -> NsId {
        NsId { dev: 4, ino, cookie }
    }

    #[test]
    fn a_recorded_identity_is_proven_by_inode_and_cookie() {
        let (host, pinned, held) = (
            id(1, Some(10)),
            Path::new("/var/run/netns/cni-1"),
            Path::new("/proc/42/ns/net"),
        );
        let verdict = |path: &Path, now: NsId, recorded: Option<NsId>| match check(path, now, recorded, host) {
            Ok(()) => "ok",
            Err(NetnsError::Host { .. }) => "host",
            Err(NetnsError::Replaced { .. }) => "replaced",
            Err(NetnsError::Unproven { .. }) => "unproven",
            Err(_) => "other",
        };
        let table = [
            // The recorded namespace, through either kind of path.
            (pinned, id(9, Some(7)), Some(id(9, Some(7))), "ok"),
            (held, id(9, Some(7)), Some(id(9, Some(7))), "ok"),
            (held, id(9, Some(7)), None, "ok"),
            // Its inode reused by another namespace: the cookie tells them apart.
            (held, id(9, Some(8)), Some(id(9, Some(7))), "replaced"),
            (pinned, id(9, Some(8)), Some(id(9, Some(7))), "replaced"),
            (held, id(3, Some(7)), Some(id(9, Some(7))), "replaced"),
            // A record from an older agent: taken behind a pinned path only.
            (pinned, id(9, Some(7)), Some(id(9, None)), "ok"),
            (held, id(9, Some(7)), Some(id(9, None)), "unproven"),
            (pinned, id(3, Some(7)), Some(id(9, None)), "replaced"),
            // A cookie recorded, none readable now.
            (pinned, id(9, None), Some(id(9, Some(7))), "unproven"),
            // A kernel without cookies: device and inode.
            (held, id(9, None), Some(id(9, None)), "ok"),
            (held, id(3, None), Some(id(9, None)), "replaced"),
            // The node's namespace, also when only its inode matches without cookies.
            (held, id(1, Some(10)), None, "host"),
            (pinned, id(1, Some(10)), Some(id(1, Some(10))), "host"),
            (pinned, id(1, None), None, "host"),
            (pinned, id(1, Some(11)), None, "ok"),
        ];
        for (path, now, recorded, want) in table {
            assert_eq!(
                verdict(path, now, recorded),
                want,
                "{} now {now} recorded {recorded:?}",
                path.display()
            );
        }
        let e = check(held, id(9, Some(7)), Some(id(9, None)), host).unwrap_err();
        assert!(e.gone(), "{e}");
    }

    #[test]
    fn a_state_file_without_cookies_is_read_and_cookies_are_written() {
        let legacy: NsId = serde_json::from_str(r#"{"dev":4,"ino":9}"#).unwrap();
        assert_eq!(legacy, id(9, None));
        assert_eq!(serde_json::to_string(&legacy).unwrap(), r#"{"dev":4,"ino":9}"#);
        let now = id(9, Some(7));
        let text = serde_json::to_string(&now).unwrap();
        assert_eq!(text, r#"{"dev":4,"ino":9,"cookie":7}"#);
        assert_eq!(serde_json::from_str::<NsId>(&text).unwrap(), now);
    }

    #[test]
    fn a_kernel_without_cookies_falls_back_to_the_inode() {
        assert_eq!(interpret(Ok(7)).unwrap(), Some(7));
        assert_eq!(interpret(Err(Errno::ENOPROTOOPT)).unwrap(), None);
        assert!(NO_COOKIES.load(Ordering::Relaxed), "not noted for the one warning");
        assert!(matches!(
            interpret(Err(Errno::EPERM)),
            Err(IdError::Cookie(Errno::EPERM))
        ));
    }

    #[test]
    fn process_paths_are_told_from_pinned_ones() {
        for (path, held) in [
            ("/proc/42/ns/net", true),
            ("/proc/42/task/43/ns/net", true),
            ("/host/proc/42/ns/net", true),
            ("/proc/self/ns/net", true),
            ("/var/run/netns/cni-5f0c2d6e", false),
            ("/run/netns/cni-1", false),
            ("/var/run/docker/netns/ab12", false),
        ] {
            assert_eq!(held_by_process(Path::new(path)), held, "{path}");
        }
    }

    #[test]
    fn the_node_namespace_has_a_cookie_read_in_place() {
        let host_id = host().unwrap();
        assert_eq!(host_id.cookie.is_some(), cookies_expected(), "{host_id}");
        let e = open(Path::new(HOST), None, None).unwrap_err();
        assert!(matches!(e, NetnsError::HostUnknown), "{e}");
        assert!(open(Path::new("/proc/no-such-pid/ns/net"), None, Some(host_id))
            .unwrap_err()
            .gone());
    }

    /// Whether this kernel has namespace cookies (Linux 5.14 and later).
    fn cookies_expected() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.split(['.', '-']).map(|p| p.trim().parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (5, 14)
    }

    /// Whether the tests needing real namespaces can run (root); with `MESH_E2E_REQUIRED=1`
    /// they must.
    fn privileged() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root && std::env::var_os("MESH_E2E_REQUIRED").is_some_and(|v| v == "1") {
            panic!("MESH_E2E_REQUIRED=1 but this test needs root to create network namespaces");
        }
        if !root {
            eprintln!("skipping: needs root");
        }
        root
    }

    use super::super::test_ns::{hold, run, TestNs};

    #[test]
    fn real_namespaces_have_their_own_cookies_and_one_identity_through_any_path() {
        if !privileged() {
            return;
        }
        let mut ns = TestNs::default();
        let pid = std::process::id();
        let (a, b) = (ns.add(format!("cka{pid}")), ns.add(format!("ckb{pid}")));
        let (ida, idb) = (identify(&a).unwrap(), identify(&b).unwrap());
        if cookies_expected() {
            assert!(ida.cookie.is_some() && idb.cookie.is_some(), "{ida} {idb}");
            assert_ne!(ida.cookie, idb.cookie, "two namespaces, one cookie");
        }
        assert_eq!(ida.proves(&idb), Proof::Different);
        // The same namespace through a process's path: the same identity, cookie and all.
        let (_holder, held) = hold(&ns.0[0], &a);
        assert_eq!(identify(&held), Some(ida));
        // The node's, read in place, and read by switching into it: one identity.
        let host_id = host().unwrap();
        assert_eq!(identify(Path::new("/proc/self/ns/net")), Some(host_id));
        assert_eq!(open(&held, Some(ida), Some(host_id)).unwrap().id, ida);
        let e = open(Path::new("/proc/self/ns/net"), None, Some(host_id)).unwrap_err();
        assert!(matches!(e, NetnsError::Host { .. }), "{e}");
        let e = open(&b, Some(ida), Some(host_id)).unwrap_err();
        assert!(matches!(e, NetnsError::Replaced { .. }), "{e}");
    }

    #[test]
    fn a_recorded_identity_with_another_cookie_is_replaced() {
        if !privileged() {
            return;
        }
        let host_id = host().unwrap();
        let mut ns = TestNs::default();
        let pid = std::process::id();
        let path = ns.add(format!("ckr{pid}"));
        let now = identify(&path).unwrap();
        // Another namespace that reused the recorded one's inode: only the cookie differs.
        let recorded = NsId {
            cookie: Some(now.cookie.unwrap_or(0) ^ 1),
            ..now
        };
        let e = open(&path, Some(recorded), Some(host_id)).unwrap_err();
        assert!(matches!(e, NetnsError::Replaced { .. }) && e.gone(), "{e}");
        assert_eq!(open(&path, Some(now), Some(host_id)).unwrap().id, now);
        reused_inode_is_refused(&mut ns, now, host_id);
    }

    /// The namespace of `gone` deleted, new ones are made until one gets its inode (the
    /// kernel hands out the lowest free number, after the namespace's deferred cleanup):
    /// that one is refused. Skipped (not failed) when no new namespace reuses it.
    fn reused_inode_is_refused(ns: &mut TestNs, gone: NsId, host_id: NsId) {
        assert!(run(&["ip", "netns", "del", &ns.0.remove(0)]));
        for attempt in 0..64 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let path = ns.add(format!("ckn{}x{attempt}", std::process::id()));
            let Some(now) = identify(&path) else { continue };
            if now.inode() != gone.inode() {
                continue;
            }
            if cookies_expected() {
                let e = open(&path, Some(gone), Some(host_id)).unwrap_err();
                assert!(matches!(e, NetnsError::Replaced { .. }), "{e}");
            }
            return;
        }
        eprintln!("no new namespace reused the inode: that part is skipped");
    }
}
