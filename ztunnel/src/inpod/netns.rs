//! Sockets inside a pod's network namespace: the current thread switches in with `setns`,
//! creates (and binds) the socket, and switches back before anything can await. A socket keeps
//! the namespace it was created in, so the proxy then uses it like any other.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use mesh_core::socket::{PlainSockets, SocketFactory};
use nix::sched::{setns, CloneFlags};
use tokio::net::{TcpListener, TcpSocket};

/// Runs `f` with the current thread in the namespace `target`.
pub fn enter<T>(target: &OwnedFd, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a usable network namespace: {e}"),
        )
    })?;
    let result = f();
    if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
        // Any later socket would silently land in a pod's namespace: stop instead.
        tracing::error!(error = %e, "cannot return to ztunnel's own network namespace; exiting");
        std::process::exit(70);
    }
    result
}

/// Which namespace `fd` reaches: its nsfs file's device and inode (equal exactly when two
/// descriptors reach the same namespace).
pub fn identity(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = File::from(fd.try_clone()?).metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// Makes every socket inside one pod's namespace, with the mesh mark.
pub struct NetnsSockets {
    pub netns: Arc<OwnedFd>,
    pub plain: PlainSockets,
}

impl SocketFactory for NetnsSockets {
    fn tcp_socket(&self, dst: SocketAddr) -> io::Result<TcpSocket> {
        enter(&self.netns, || self.plain.tcp_socket(dst))
    }

    fn tcp_listener(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        enter(&self.netns, || self.plain.tcp_listener(addr))
    }

    fn udp_socket(&self, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        enter(&self.netns, || self.plain.udp_socket(addr))
    }
}
