//! One proxied connection as an HTTP/2 stream, and the copy loop that splices it to a TCP
//! socket. Data moves as `Bytes` handed to h2 without an extra copy, and each direction
//! honours HTTP/2 flow control so a slow reader pushes back instead of buffering.

use std::future::poll_fn;
use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Read size for the TCP side once data flows; large enough for full TLS records and few syscalls.
const READ_CHUNK: usize = 128 * 1024;
/// HTTP/2 frame header, sent in front of every DATA frame's payload.
const FRAME_HEADER: usize = 9;
/// The most one read takes once data flows: a full read becomes one DATA frame whose header and
/// payload fill whole 16 KiB TLS records. A read of [`READ_CHUNK`] made each frame end in a
/// separate TLS record of its last 9 bytes, written with a syscall of its own (3 writev per
/// 128 KiB where 2 do) and read and decrypted as a record of its own by the peer.
pub(crate) const READ_LIMIT: usize = READ_CHUNK - FRAME_HEADER;
/// Read size until a read fills it: small messages do not take a whole chunk each.
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
    /// `chunk`, read from the TCP side, was handed to the tunnel.
    fn moved_to_tunnel(&self, chunk: &[u8]);
    /// `chunk`, from the tunnel, was written to the TCP side.
    fn moved_from_tunnel(&self, chunk: &[u8]);
}

/// Observes nothing.
impl SpliceObserver for () {
    fn moved_to_tunnel(&self, _: &[u8]) {}
    fn moved_from_tunnel(&self, _: &[u8]) {}
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

/// Reads a chunk, then hands it to h2 as flow control allows. A peer that stops reading
/// leaves at most one chunk here and h2's send buffer (one chunk) queued per stream; asking for
/// room before reading would hold less, but measured 25-40 % more CPU per Gbit (smaller
/// frames), and reserving room ahead would let idle streams sit on connection window.
async fn tcp_to_h2(
    r: tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    obs: &dyn SpliceObserver,
) -> io::Result<u64> {
    let mut reader = ChunkReader::default();
    let mut total = 0u64;
    loop {
        // The socket's own read waker, not `readable()`: that future carries a waiter node
        // (tens of bytes) in every idle connection's task; this task is the socket's only reader.
        poll_fn(|cx| r.as_ref().poll_read_ready(cx)).await?;
        let mut chunk = match reader.try_read(&r) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += chunk.len() as u64;
        while !chunk.is_empty() {
            let granted = capacity(send, chunk.len()).await?;
            let part = chunk.split_to(granted);
            // A handle for the observer (a reference count, no copy): `send_data` takes the part.
            send.send_data(part.clone(), false).map_err(h2_io)?;
            obs.moved_to_tunnel(&part);
        }
    }
}

/// How a splice reads its TCP side. While waiting for the socket it holds no buffer at all: at
/// thousands of idle connections, read buffers held while waiting were most of ztunnel's
/// memory. Small reads land on the stack and are copied out at their exact size; once a read
/// fills [`FIRST_READ`], data flows and reads go straight into [`READ_LIMIT`] buffers handed
/// to h2 without a copy, until a read comes back small again. The chunk is kept between reads
/// while data flows (letting it go at every drained read measured 4-5 % more CPU per Gbit), so
/// a connection idle right after a bulk transfer may hold one until its next read.
#[derive(Default)]
struct ChunkReader {
    /// Present only between a read and the next wait, and only while data flows.
    buf: BytesMut,
    flowing: bool,
}

impl ChunkReader {
    /// One non-blocking read; an empty chunk is the end of the stream.
    fn try_read(&mut self, r: &tokio::net::tcp::ReadHalf<'_>) -> io::Result<Bytes> {
        if !self.flowing {
            let mut small = [0u8; FIRST_READ];
            let n = r.try_read(&mut small)?;
            self.flowing = n == FIRST_READ;
            return Ok(Bytes::copy_from_slice(&small[..n]));
        }
        if self.buf.capacity() < READ_CHUNK / 4 {
            // Reclaims the allocation once h2 has released the previous chunks.
            self.buf.reserve(READ_LIMIT);
        }
        let n = match r.try_read_buf(&mut (&mut self.buf).limit(READ_LIMIT)) {
            Ok(n) => n,
            Err(e) => {
                self.buf = BytesMut::new();
                return Err(e);
            }
        };
        let chunk = self.buf.split().freeze();
        if n < FIRST_READ {
            // Data stopped flowing: hold nothing while waiting for more.
            self.buf = BytesMut::new();
            self.flowing = false;
        }
        Ok(chunk)
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
        obs.moved_from_tunnel(&data);
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

    /// As [`H2Stream::splice_tcp`], telling `obs` of every chunk as it moves. Not an async fn:
    /// the future holds the stream's parts once, not also the `H2Stream` they came from.
    pub fn splice_tcp_observed<'a>(
        self,
        tcp: &'a mut tokio::net::TcpStream,
        obs: &'a dyn SpliceObserver,
    ) -> impl std::future::Future<Output = io::Result<Transferred>> + Send + 'a {
        let H2Stream {
            mut send,
            mut recv,
            _guard,
        } = self;
        async move {
            let _guard = _guard;
            let (r, w) = tcp.split();
            let (to_tunnel, from_tunnel) =
                tokio::try_join!(tcp_to_h2(r, &mut send, obs), h2_to_tcp(&mut recv, w, obs))?;
            Ok(Transferred { to_tunnel, from_tunnel })
        }
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Reads until `want` bytes came, as the splice does (wait, then one non-blocking read).
    async fn read(reader: &mut ChunkReader, r: &tokio::net::tcp::ReadHalf<'_>, want: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < want {
            r.readable().await.expect("readable");
            match reader.try_read(r) {
                Ok(c) => sizes.push(c.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("read: {e}"),
            }
        }
        sizes
    }

    /// A full read is one DATA frame that, with its header, fills whole TLS records: no frame
    /// ends in a record (and a write) of its own.
    #[tokio::test]
    async fn full_reads_make_frames_that_fill_tls_records() {
        const TLS_RECORD: usize = 16 * 1024;
        assert_eq!((READ_LIMIT + FRAME_HEADER) % TLS_RECORD, 0);
        // A receive buffer that holds the whole transfer, so reads fill up whatever the timing.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(8 << 20).expect("rcvbuf");
        socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let listener = socket.listen(1).expect("listen");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let (r, _w) = server.split();
        let mut reader = ChunkReader::default();

        let bulk = vec![7u8; 4 * READ_CHUNK];
        client.write_all(&bulk).await.expect("write");
        let sizes = read(&mut reader, &r, bulk.len()).await;
        assert!(sizes.iter().all(|&n| n <= READ_LIMIT), "{sizes:?}");
        assert!(sizes.contains(&READ_LIMIT), "no full read: {sizes:?}");
    }

    /// h2 hands a stream room only in whole chunks while windows or its send buffer hold it
    /// back: both are whole multiples of a full read.
    #[test]
    fn windows_and_send_buffer_hold_whole_chunks() {
        let s = super::super::Settings::default();
        assert_eq!(s.stream_window as usize % READ_LIMIT, 0);
        assert_eq!(s.connection_window as usize % READ_LIMIT, 0);
        assert_eq!(super::super::server::MAX_SEND_BUFFER, READ_LIMIT);
    }

    #[tokio::test]
    async fn a_waiting_splice_holds_no_read_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        let (r, _w) = server.split();
        let mut reader = ChunkReader::default();

        client.write_all(b"x").await.expect("write");
        assert_eq!(read(&mut reader, &r, 1).await, [1]);
        assert_eq!(reader.buf.capacity(), 0, "idle after a small read");
        assert!(!reader.flowing);

        // Bulk: once a small read fills up, reads go into large chunks; a small read ends that
        // and lets the chunk buffer go.
        let bulk = vec![7u8; 3 * READ_CHUNK];
        client.write_all(&bulk).await.expect("write");
        let sizes = read(&mut reader, &r, bulk.len()).await;
        assert_eq!(sizes[0], FIRST_READ);
        assert!(sizes[1..].iter().any(|&n| n > FIRST_READ), "large reads: {sizes:?}");
        client.write_all(b"y").await.expect("write");
        assert_eq!(read(&mut reader, &r, 1).await, [1]);
        assert_eq!(reader.buf.capacity(), 0, "idle after a small read again");
        assert!(!reader.flowing);

        // The end of the stream is an empty chunk.
        drop(client);
        r.readable().await.expect("readable");
        assert!(reader.try_read(&r).expect("eof").is_empty());
    }
}
