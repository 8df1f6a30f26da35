//! ZDS framing: the node agent and ztunnel exchange one protobuf message per packet over a
//! unix `SOCK_SEQPACKET` socket (no length prefix, at most [`MAX_MESSAGE`] bytes), and an
//! `AddWorkload` carries the pod's network namespace as one fd (SCM_RIGHTS). Both sides use
//! this module: ztunnel connects, the agent listens.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    accept4, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
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
}

impl ZdsListener {
    /// Binds `path` (removing a stale socket file first).
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        let err = |source| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        let _ = std::fs::remove_file(path);
        let fd = seqpacket().map_err(err)?;
        let addr = UnixAddr::new(path).map_err(|e| err(nix_io(e)))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| err(nix_io(e)))?;
        listen(&fd, Backlog::new(16).map_err(|e| err(nix_io(e)))?).map_err(|e| err(nix_io(e)))?;
        Ok(ZdsListener { fd: register(fd)? })
    }

    pub async fn accept(&self) -> Result<ZdsConn, ZdsError> {
        loop {
            let mut guard = self.fd.ready(Interest::READABLE).await?;
            match accept4(
                self.fd.get_ref().as_raw_fd(),
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            ) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(raw) => {
                    return Ok(ZdsConn {
                        fd: register(unsafe { OwnedFd::from_raw_fd(raw) })?,
                    })
                }
                Err(nix::Error::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(ZdsError::Io(nix_io(e))),
            }
        }
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
}
