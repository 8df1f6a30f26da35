//! One proxied connection as an HTTP/2 stream: spliced to a TCP socket (see [`super::splice`])
//! or read and written as a byte stream by protocols layered on it ([`H2Io`]).

use std::io;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use super::splice::Splice;
pub use super::splice::{SpliceObserver, Transferred};

/// Dropped when the stream ends; lets a pool count streams per connection.
pub trait StreamGuard: Send + Sync {}

/// An established CONNECT stream.
pub struct H2Stream {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    pub(crate) _guard: Option<Box<dyn StreamGuard>>,
}

pub(super) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl H2Stream {
    /// Copies both ways until each side has finished sending; a half-close on one side is
    /// passed on to the other. An error in either direction ends both.
    pub async fn splice_tcp(self, tcp: &mut tokio::net::TcpStream) -> io::Result<Transferred> {
        self.splice_tcp_observed(tcp, ()).await
    }

    /// As [`H2Stream::splice_tcp`], telling `obs` of every chunk as it moves.
    pub fn splice_tcp_observed<'a, O: SpliceObserver + Send + Unpin + 'a>(
        self,
        tcp: &'a mut tokio::net::TcpStream,
        obs: O,
    ) -> impl std::future::Future<Output = io::Result<Transferred>> + Send + 'a {
        Splice::new((self.send, self.recv, self._guard), tcp, obs)
    }
}

/// An [`H2Stream`] as a byte stream, for protocols layered on a tunnel (the waypoint speaks
/// HTTP/1.1 and HTTP/2 inside CONNECT streams). Flow-control window is returned as soon as a
/// frame is taken, so at most one frame per stream waits in `pending`.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    shut: bool,
    _guard: Option<Box<dyn StreamGuard>>,
}

impl H2Stream {
    pub fn into_io(self) -> H2Io {
        H2Io {
            send: self.send,
            recv: self.recv,
            pending: Bytes::new(),
            shut: false,
            _guard: self._guard,
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        loop {
            if !self.pending.is_empty() {
                let n = buf.remaining().min(self.pending.len());
                if n == self.pending.len() {
                    // Taken, not split: an emptied `Bytes` still holds the buffer the frame
                    // was read into (shared with other streams' frames) for as long as this
                    // stream stays idle.
                    buf.put_slice(&std::mem::take(&mut self.pending));
                } else {
                    buf.put_slice(&self.pending.split_to(n));
                }
                return Poll::Ready(Ok(()));
            }
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                Poll::Ready(Some(Ok(data))) => {
                    self.recv.flow_control().release_capacity(data.len()).map_err(h2_io)?;
                    self.pending = data;
                }
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            self.send.reserve_capacity(buf.len());
            match self.send.poll_capacity(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by peer")))
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                Poll::Ready(Some(Ok(0))) => continue,
                Poll::Ready(Some(Ok(n))) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        std::task::Poll::Ready(Ok(()))
    }
}
