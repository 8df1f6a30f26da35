//! Network namespaces and the links between them.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};
use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique name: interface names are limited to 15 bytes.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr when it does not succeed.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        // Transparent sockets deliver packets with foreign sources over lo.
        ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])?;
        ns.exec(&["sysctl", "-qw", "net.ipv4.conf.lo.rp_filter=0"])?;
        Ok(ns)
    }

    /// Runs `args` inside the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// A command started straight in this network namespace, the way a container runtime
    /// starts a CNI plugin: the child enters it with `setns` before `exec`. No `ip` process
    /// and no mount namespace (so `/sys` stays the caller's): for programs that use only the
    /// network namespace.
    pub fn direct_command(&self, program: &std::path::Path) -> anyhow::Result<Command> {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.name))?;
        let mut c = Command::new(program);
        // SAFETY: setns is a single async-signal-safe system call on a descriptor opened
        // before the fork; the closure owns the file, so it stays open until exec.
        unsafe {
            c.pre_exec(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(c)
    }

    /// Runs `f` on a thread switched into this namespace (for creating sockets there).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> std::io::Result<T> + Send) -> std::io::Result<T> {
        enter(&self.name, f)
    }

    /// A TCP listener bound inside the namespace.
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        let std = self.enter(|| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&addr.into())?;
            s.listen(128)?;
            s.set_nonblocking(true)?;
            Ok(std::net::TcpListener::from(s))
        })?;
        tokio::net::TcpListener::from_std(std)
    }

    /// A TCP socket that lives in the namespace, ready to connect.
    pub fn socket(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
        socket_in(&self.name, dst)
    }

    /// Connects from inside the namespace.
    pub async fn connect(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        self.socket(dst)?.connect(dst).await
    }
}

/// Runs `f` on a thread switched into the namespace `name`.
pub fn enter<T: Send>(name: &str, f: impl FnOnce() -> std::io::Result<T> + Send) -> std::io::Result<T> {
    let file = File::open(format!("/var/run/netns/{name}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("socket thread panicked")))
    })
}

/// A TCP socket created in the namespace `name`, ready to connect.
pub fn socket_in(name: &str, dst: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let std = enter(name, || {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        Ok(std::net::TcpStream::from(s))
    })?;
    Ok(tokio::net::TcpSocket::from_std_stream(std))
}

/// Outbound TCP sockets of an in-process HBONE client living in namespace `.0` (an
/// uncaptured pod, say, standing for a process that holds a mesh certificate).
pub struct NsSockets(pub String);

impl mesh_core::socket::SocketFactory for NsSockets {
    fn tcp_socket(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
        socket_in(&self.0, dst)
    }
    fn tcp_listener(&self, _: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        Err(std::io::Error::other("not used"))
    }
    fn udp_socket(&self, _: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
        Err(std::io::Error::other("not used"))
    }
}

/// Kills what still runs in namespace `name` (which frees it) and deletes it.
pub fn destroy(name: &str) {
    if let Ok(pids) = sh(&["ip", "netns", "pids", name]) {
        for pid in pids.split_whitespace() {
            let _ = sh(&["kill", "-9", pid]);
        }
    }
    if let Err(e) = sh(&["ip", "netns", "del", name]) {
        eprintln!("cleanup: {e}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        destroy(&self.name);
    }
}

/// A namespace with a bridge; pods attach with veth pairs. Deleting the namespace removes the
/// bridge and every veth end inside it (and so their peers).
pub struct Hub {
    pub ns: Netns,
}

impl Hub {
    pub fn new() -> anyhow::Result<Self> {
        let ns = Netns::new("hub")?;
        ns.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        ns.exec(&["ip", "link", "set", "br0", "up"])?;
        Ok(Hub { ns })
    }

    /// Links `pod` to the bridge and gives it `addrs` (CIDR strings) on its `eth0`; returns
    /// the name of the link's end on the bridge.
    pub fn attach(&self, pod: &Netns, addrs: &[&str]) -> anyhow::Result<String> {
        let host = unique("vh");
        sh(&[
            "ip",
            "link",
            "add",
            &host,
            "netns",
            &self.ns.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.name,
        ])?;
        self.ns.exec(&["ip", "link", "set", &host, "master", "br0", "up"])?;
        for a in addrs {
            if a.contains(':') {
                pod.exec(&["ip", "-6", "addr", "add", a, "dev", "eth0", "nodad"])?;
            } else {
                pod.exec(&["ip", "addr", "add", a, "dev", "eth0"])?;
            }
        }
        pod.exec(&["ip", "link", "set", "eth0", "up"])?;
        // Service VIPs are routed nowhere: capture must take them before they leave.
        pod.exec(&["ip", "-4", "route", "add", "default", "dev", "eth0"])?;
        if addrs.iter().any(|a| a.contains(':')) {
            pod.exec(&["ip", "-6", "route", "add", "default", "dev", "eth0"])?;
        }
        Ok(host)
    }
}

/// Client sockets made inside a namespace, for clients that take a socket factory (the
/// gRPC dialer): a test's gRPC client then connects as a pod would.
pub struct NetnsSockets {
    pub name: String,
}

impl mesh_core::socket::SocketFactory for NetnsSockets {
    fn tcp_socket(&self, dst: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
        socket_in(&self.name, dst)
    }

    fn tcp_listener(&self, _addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "client sockets only",
        ))
    }

    fn udp_socket(&self, _addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "client sockets only",
        ))
    }
}
