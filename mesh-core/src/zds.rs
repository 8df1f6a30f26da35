//! ZDS framing: the node agent and ztunnel exchange one protobuf message per packet over a
//! unix `SOCK_SEQPACKET` socket (no length prefix, at most [`MAX_MESSAGE`] bytes), and an
//! `AddWorkload` carries the pod's network namespace as one fd (SCM_RIGHTS). Both sides use
//! this module: ztunnel connects, the agent listens.
//!
//! Whoever connects receives every pod's namespace, and may acknowledge pods it does not
//! serve: the agent's socket is mode 0600 (made so before `listen`, so no peer ever connects
//! through a wider mode) and a peer is admitted only when its `SO_PEERCRED` uid is root's or
//! the agent's own ([`ZdsError::PeerRefused`] otherwise). ztunnel runs as root, as the agent.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, recvmsg, sendmsg, socket, sockopt, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 1024;

/// What went wrong on a ZDS socket.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket {path}: {source}")]
    Socket { path: String, source: std::io::Error },
    #[error("ZDS I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("ZDS peer closed the connection")]
    Closed,
    #[error("ZDS message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("ZDS message is not valid protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("ZDS message carried {0} file descriptors; at most one is allowed")]
    TooManyFds(usize),
    /// A peer whose uid is neither root's nor the agent's: its connection was closed.
    #[error("ZDS peer refused: pid {pid} runs as uid {uid}; only uid 0 or the agent's uid {allowed} may connect")]
    PeerRefused { pid: i32, uid: u32, allowed: u32 },
}

fn nix_io(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

/// Registers an owned socket with the reactor.
fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is a valid open descriptor that the AsyncFd owns (and so keeps open,
    // unchanged) for its whole lifetime.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn seqpacket() -> Result<OwnedFd, std::io::Error> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(nix_io)
}

/// One ZDS connection.
pub struct ZdsConn {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsConn {
    /// Connects to the agent's socket (ztunnel's side).
    pub fn connect(path: &Path) -> Result<Self, ZdsError> {
        let err = |source| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        let fd = seqpacket().map_err(err)?;
        let addr = UnixAddr::new(path).map_err(|e| err(nix_io(e)))?;
        connect(fd.as_raw_fd(), &addr).map_err(|e| err(nix_io(e)))?;
        Ok(ZdsConn { fd: register(fd)? })
    }

    /// Sends one message, optionally with one fd attached.
    pub async fn send(&self, msg: &impl prost::Message, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let bytes = msg.encode_to_vec();
        if bytes.len() > MAX_MESSAGE {
            return Err(ZdsError::TooLarge);
        }
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.ready(Interest::WRITABLE).await?;
            let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
                vec![]
            } else {
                vec![ControlMessage::ScmRights(&fds)]
            };
            let iov = [IoSlice::new(&bytes)];
            match sendmsg::<()>(
                self.fd.get_ref().as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(ZdsError::Io(nix_io(e))),
            }
        }
    }

    /// Receives one message and the fd it carried, if any.
    pub async fn recv<M: prost::Message + Default>(&self) -> Result<(M, Option<OwnedFd>), ZdsError> {
        let mut buf = [0u8; MAX_MESSAGE + 1];
        loop {
            let mut guard = self.fd.ready(Interest::READABLE).await?;
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let res = recvmsg::<()>(
                self.fd.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let msg = match res {
                Ok(m) => m,
                Err(nix::Error::EAGAIN) => {
                    guard.clear_ready();
                    continue;
                }
                Err(e) => return Err(ZdsError::Io(nix_io(e))),
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(nix_io)? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors for us; we own them.
                    fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                }
            }
            let n = msg.bytes;
            if msg.flags.contains(MsgFlags::MSG_TRUNC) || n > MAX_MESSAGE {
                return Err(ZdsError::TooLarge);
            }
            if n == 0 && fds.is_empty() {
                return Err(ZdsError::Closed);
            }
            if fds.len() > 1 {
                return Err(ZdsError::TooManyFds(fds.len()));
            }
            let m = M::decode(&buf[..n])?;
            return Ok((m, fds.pop()));
        }
    }
}

/// The agent's listening socket.
pub struct ZdsListener {
    fd: AsyncFd<OwnedFd>,
    /// Besides root, the uid a peer may run as: the agent's own (effective) uid.
    own_uid: u32,
}

/// The socket file's mode: the agent (and root) alone may connect.
const SOCKET_MODE: u32 = 0o600;

impl ZdsListener {
    /// Binds `path` (removing a stale socket file first), mode [`SOCKET_MODE`] whatever the
    /// umask. The mode is set between `bind` and `listen`: until `listen` every `connect`
    /// is refused, so the mode the umask gave is never one a peer gets through. (A process
    /// swapping the path meanwhile must write its directory: root's, as the agent.)
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |source| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        let _ = std::fs::remove_file(path);
        let fd = seqpacket().map_err(err)?;
        let addr = UnixAddr::new(path).map_err(|e| err(nix_io(e)))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| err(nix_io(e)))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(err)?;
        listen(&fd, Backlog::new(16).map_err(|e| err(nix_io(e)))?).map_err(|e| err(nix_io(e)))?;
        Ok(ZdsListener {
            fd: register(fd)?,
            own_uid: nix::unistd::geteuid().as_raw(),
        })
    }

    /// The next connection of an admitted peer; [`ZdsError::PeerRefused`] (the connection
    /// closed) for another one, for the caller to log and accept the next.
    pub async fn accept(&self) -> Result<ZdsConn, ZdsError> {
        loop {
            let mut guard = self.fd.ready(Interest::READABLE).await?;
            match accept4(
                self.fd.get_ref().as_raw_fd(),
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            ) {
                Ok(raw) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    self.admit(&fd)?;
                    return Ok(ZdsConn { fd: register(fd)? });
                }
                Err(nix::Error::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(ZdsError::Io(nix_io(e))),
            }
        }
    }

    /// Whether the peer of `conn` (as it was when it connected) may have the pods' namespaces.
    fn admit(&self, conn: &OwnedFd) -> Result<(), ZdsError> {
        let cred = getsockopt(conn, sockopt::PeerCredentials).map_err(nix_io)?;
        if cred.uid() == 0 || cred.uid() == self.own_uid {
            return Ok(());
        }
        Err(ZdsError::PeerRefused {
            pid: cred.pid(),
            uid: cred.uid(),
            allowed: self.own_uid,
        })
    }
}

impl AsFd for ZdsConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::workload::zds::{self, workload_request::Payload, WorkloadRequest};

    use super::*;

    #[tokio::test]
    async fn messages_and_fds_cross_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zds.sock");
        let listener = ZdsListener::bind(&path).unwrap();
        let client = ZdsConn::connect(&path).unwrap();
        let server = listener.accept().await.unwrap();

        let hello = zds::ZdsHello {
            version: zds::Version::V1 as i32,
        };
        client.send(&hello, None).await.unwrap();
        let (got, fd) = server.recv::<zds::ZdsHello>().await.unwrap();
        assert_eq!(got, hello);
        assert!(fd.is_none());

        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        let add = WorkloadRequest {
            payload: Some(Payload::Add(zds::AddWorkload {
                uid: "pod-1".into(),
                workload_info: None,
            })),
        };
        server.send(&add, Some(file.as_fd())).await.unwrap();
        let (got, fd) = client.recv::<WorkloadRequest>().await.unwrap();
        assert_eq!(got, add);
        assert!(fd.is_some(), "the namespace fd arrives with the message");

        drop(server);
        assert!(matches!(client.recv::<WorkloadRequest>().await, Err(ZdsError::Closed)));
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zds.sock");
        let listener = ZdsListener::bind(&path).unwrap();
        let client = ZdsConn::connect(&path).unwrap();
        let server = listener.accept().await.unwrap();
        // A raw packet that is not a valid WorkloadRequest.
        let raw = [0xffu8, 0xff, 0xff];
        nix::sys::socket::send(server.as_fd().as_raw_fd(), &raw, MsgFlags::empty()).unwrap();
        assert!(matches!(
            client.recv::<WorkloadRequest>().await,
            Err(ZdsError::Decode(_))
        ));
    }

    #[tokio::test]
    async fn the_socket_is_for_its_owner_alone_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zds.sock");
        let _listener = ZdsListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    /// Run by [`a_peer_of_another_uid_is_refused`] as another uid: connects and waits until
    /// the agent closes the connection. Does nothing in a test run.
    #[test]
    fn connect_helper() {
        let Some(path) = std::env::var_os("MESH_ZDS_CONNECT_HELPER") else {
            return;
        };
        let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(Path::new(&path)).unwrap()).unwrap();
        let _ = nix::sys::socket::recv(fd.as_raw_fd(), &mut [0u8; 1], MsgFlags::empty());
    }

    /// A child process, killed on drop (also when the test fails).
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The peer's uid is checked whatever the socket's mode: as root, a child of uid 65534
    /// connects to a socket opened to everyone; otherwise the listener takes its own uid for
    /// another one. Either way the next admitted peer still gets in.
    #[tokio::test]
    async fn a_peer_of_another_uid_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zds.sock");
        let mut listener = ZdsListener::bind(&path).unwrap();
        let own = listener.own_uid;
        let (_child, _client, refused) = if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "zds::tests::connect_helper", "--test-threads=1"])
                .env("MESH_ZDS_CONNECT_HELPER", &path)
                .uid(65534)
                .gid(65534)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            (Some(KillOnDrop(child)), None, 65534)
        } else {
            listener.own_uid = own.wrapping_add(1);
            (None, Some(ZdsConn::connect(&path).unwrap()), own)
        };
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept()).await;
        match accepted.expect("no peer within 10 s") {
            Err(ZdsError::PeerRefused { uid, .. }) => assert_eq!(uid, refused),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a peer of uid {refused} was admitted"),
        }
        listener.own_uid = own;
        let _admitted = ZdsConn::connect(&path).unwrap();
        listener.accept().await.expect("the agent's own uid is admitted");
    }
}
