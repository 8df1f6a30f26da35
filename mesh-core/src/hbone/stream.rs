//! One proxied connection as an HTTP/2 stream, and the copy loop that splices it to a TCP
//! socket. Data moves as `Bytes` handed to h2 without an extra copy, and each direction
//! honours HTTP/2 flow control so a slow reader pushes back instead of buffering.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read size for the TCP side once data flows; large enough for full TLS records and few syscalls.
const READ_CHUNK: usize = 128 * 1024;
/// Read size until a read fills it: an idle proxied connection holds this, not a whole chunk
/// (at thousands of idle connections the 128 KiB chunks were most of ztunnel's memory).
const FIRST_READ: usize = 4 * 1024;

/// Dropped when the stream ends; lets a pool count streams per connection.
pub trait StreamGuard: Send + Sync {}

/// An established CONNECT stream.
pub struct H2Stream {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    pub(crate) _guard: Option<Box<dyn StreamGuard>>,
}

/// Bytes moved by a splice, from the TCP side's point of view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// TCP -> tunnel.
    pub to_tunnel: u64,
    /// Tunnel -> TCP.
    pub from_tunnel: u64,
}

/// Told of bytes as a splice moves them, so a long transfer's counters grow while it runs
/// and a splice that ends in error has still counted what moved. Called once per chunk:
/// keep it to an atomic add.
pub trait SpliceObserver: Sync {
    /// `n` bytes read from the TCP side were handed to the tunnel.
    fn moved_to_tunnel(&self, n: u64);
    /// `n` bytes from the tunnel were written to the TCP side.
    fn moved_from_tunnel(&self, n: u64);
}

/// Observes nothing.
impl SpliceObserver for () {
    fn moved_to_tunnel(&self, _: u64) {}
    fn moved_from_tunnel(&self, _: u64) {}
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

/// Reads a chunk, then hands it to h2 as flow control allows. A peer that stops reading
/// leaves at most one chunk here and h2's send buffer (128 KiB) queued per stream; asking for
/// room before reading would hold less, but measured 25-40 % more CPU per Gbit (smaller
/// frames), and reserving room ahead would let idle streams sit on connection window.
async fn tcp_to_h2<R: AsyncRead + Unpin>(
    mut r: R,
    send: &mut SendStream<Bytes>,
    obs: &dyn SpliceObserver,
) -> io::Result<u64> {
    let mut want = FIRST_READ;
    let mut buf = BytesMut::with_capacity(want);
    let mut total = 0u64;
    loop {
        if buf.capacity() < want / 4 {
            // Reclaims the allocation once h2 has released the previous chunks.
            buf.reserve(want);
        }
        let n = r.read_buf(&mut buf).await?;
        if n >= FIRST_READ {
            // Data flows: large reads from now on.
            want = READ_CHUNK;
        }
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += n as u64;
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            let granted = capacity(send, chunk.len()).await?;
            let part = chunk.split_to(granted);
            let len = part.len() as u64;
            send.send_data(part, false).map_err(h2_io)?;
            obs.moved_to_tunnel(len);
        }
    }
}

/// Flow-control room for up to `want` bytes on `send`, waiting until there is some.
async fn capacity(send: &mut SendStream<Bytes>, want: usize) -> io::Result<usize> {
    loop {
        send.reserve_capacity(want);
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(c)) => return Ok(c.min(want)),
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by peer")),
        }
    }
}

async fn h2_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    mut w: W,
    obs: &dyn SpliceObserver,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        let n = data.len();
        w.write_all(&data).await?;
        total += n as u64;
        obs.moved_from_tunnel(n as u64);
        // Return the window only once the bytes left for the socket: backpressure end to end.
        recv.flow_control().release_capacity(n).map_err(h2_io)?;
    }
    w.shutdown().await?;
    Ok(total)
}

impl H2Stream {
    /// Copies both ways until each side has finished sending; a half-close on one side is
    /// passed on to the other. An error in either direction ends both.
    pub async fn splice_tcp(self, tcp: &mut tokio::net::TcpStream) -> io::Result<Transferred> {
        self.splice_tcp_observed(tcp, &()).await
    }

    /// As [`H2Stream::splice_tcp`], telling `obs` of every chunk as it moves.
    pub async fn splice_tcp_observed(
        self,
        tcp: &mut tokio::net::TcpStream,
        obs: &dyn SpliceObserver,
    ) -> io::Result<Transferred> {
        let H2Stream {
            mut send,
            mut recv,
            _guard,
        } = self;
        let (r, w) = tcp.split();
        let (to_tunnel, from_tunnel) = tokio::try_join!(tcp_to_h2(r, &mut send, obs), h2_to_tcp(&mut recv, w, obs))?;
        Ok(Transferred { to_tunnel, from_tunnel })
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
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
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
