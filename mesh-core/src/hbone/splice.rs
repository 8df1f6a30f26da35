//! The copy loop that splices an HTTP/2 stream to a TCP socket, both directions in one
//! hand-written future. Data moves as `Bytes` handed to h2 without an extra copy, and each
//! direction honours HTTP/2 flow control so a slow reader pushes back instead of buffering.
//!
//! Hand-written rather than two async fns joined: an idle proxied connection holds this future
//! for its whole life, and the joined state machines kept a slot for every local of every wait
//! (520 bytes; this one is under half that), in each of the two tasks a connection has.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::stream::{h2_io, StreamGuard};

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

/// Both observe.
impl<A: SpliceObserver, B: SpliceObserver> SpliceObserver for (A, B) {
    fn moved_to_tunnel(&self, chunk: &[u8]) {
        self.0.moved_to_tunnel(chunk);
        self.1.moved_to_tunnel(chunk);
    }

    fn moved_from_tunnel(&self, chunk: &[u8]) {
        self.0.moved_from_tunnel(chunk);
        self.1.moved_from_tunnel(chunk);
    }
}

impl<T: SpliceObserver + ?Sized> SpliceObserver for &T {
    fn moved_to_tunnel(&self, chunk: &[u8]) {
        (**self).moved_to_tunnel(chunk)
    }
    fn moved_from_tunnel(&self, chunk: &[u8]) {
        (**self).moved_from_tunnel(chunk)
    }
}

/// Copies both ways until each side has finished sending; a half-close on one side is passed
/// on to the other. An error in either direction ends both (dropping the stream resets it).
pub(crate) struct Splice<'a, O> {
    tcp: &'a mut TcpStream,
    obs: O,
    send: SendStream<Bytes>,
    recv: RecvStream,
    _guard: Option<Box<dyn StreamGuard>>,
    reader: ChunkReader,
    /// Read from TCP, not yet handed to h2 (waiting for flow-control room).
    outgoing: Bytes,
    /// Taken from h2, `written` bytes of it written to TCP so far.
    incoming: Bytes,
    written: usize,
    moved: Transferred,
    /// TCP's end of stream was passed on as END_STREAM.
    sent_eof: bool,
    /// h2's end of stream arrived; then `shut` once it was passed on as TCP's write shutdown.
    received_eof: bool,
    shut: bool,
    /// Which direction goes first in the next poll.
    tunnel_first: bool,
    /// Flow-control room for `outgoing` was asked for and not granted yet.
    room_asked: bool,
}

impl<'a, O: SpliceObserver> Splice<'a, O> {
    pub(crate) fn new(
        (send, recv, guard): (SendStream<Bytes>, RecvStream, Option<Box<dyn StreamGuard>>),
        tcp: &'a mut TcpStream,
        obs: O,
    ) -> Self {
        Splice {
            tcp,
            obs,
            send,
            recv,
            _guard: guard,
            reader: ChunkReader::default(),
            outgoing: Bytes::new(),
            incoming: Bytes::new(),
            written: 0,
            moved: Transferred::default(),
            sent_eof: false,
            received_eof: false,
            shut: false,
            tunnel_first: false,
            room_asked: false,
        }
    }

    /// TCP -> tunnel: read a chunk, then hand it to h2 as flow control allows. A peer that
    /// stops reading leaves at most one chunk here and h2's send buffer (one chunk) queued per
    /// stream; asking for room before reading would hold less, but measured 25-40 % more CPU
    /// per Gbit (smaller frames), and reserving room ahead would let idle streams sit on
    /// connection window.
    fn poll_to_tunnel(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.sent_eof {
            if !self.outgoing.is_empty() {
                let granted = ready!(self.poll_room(cx))?;
                let part = self.outgoing.split_to(granted);
                // A handle for the observer (a reference count, no copy): `send_data` takes it.
                self.send.send_data(part.clone(), false).map_err(h2_io)?;
                self.obs.moved_to_tunnel(&part);
                continue;
            }
            // The socket's own read waker: this future is the socket's only reader.
            ready!(self.tcp.poll_read_ready(cx))?;
            let chunk = match self.reader.try_read(self.tcp) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if chunk.is_empty() {
                self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
                self.sent_eof = true;
            } else {
                self.moved.to_tunnel += chunk.len() as u64;
                self.outgoing = chunk;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Flow-control room for some of `outgoing`, waiting until there is some. Room is asked
    /// for once per grant, not again on every wake-up while waiting: h2 counts the bytes it
    /// still buffers for the stream into a request, so asking again after it wrote some asks
    /// for less and hands assigned room back to the connection (measured: smaller frames,
    /// ~10 % more writes per MiB and 11-18 % less single-stream throughput).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = self.outgoing.len();
        loop {
            if !self.room_asked {
                self.send.reserve_capacity(want);
                self.room_asked = true;
            }
            let granted = ready!(self.send.poll_capacity(cx));
            self.room_asked = false;
            match granted {
                Some(Ok(0)) => continue,
                Some(Ok(c)) => return Poll::Ready(Ok(c.min(want))),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by peer"))),
            }
        }
    }

    /// Tunnel -> TCP: write each DATA frame whole, and only then return its window, so
    /// backpressure holds end to end; the end of the stream becomes TCP's write shutdown.
    fn poll_from_tunnel(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.written < self.incoming.len() {
                let n = ready!(Pin::new(&mut *self.tcp).poll_write(cx, &self.incoming[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                continue;
            }
            if !self.incoming.is_empty() {
                let data = std::mem::take(&mut self.incoming);
                self.written = 0;
                self.moved.from_tunnel += data.len() as u64;
                self.obs.moved_from_tunnel(&data);
                self.recv.flow_control().release_capacity(data.len()).map_err(h2_io)?;
            }
            if self.received_eof {
                if !self.shut {
                    ready!(Pin::new(&mut *self.tcp).poll_shutdown(cx))?;
                    self.shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(data) => self.incoming = data.map_err(h2_io)?,
                None => self.received_eof = true,
            }
        }
    }
}

impl<O: SpliceObserver + Unpin> Future for Splice<'_, O> {
    type Output = io::Result<Transferred>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Both directions every time (they share the task's waker), the first one alternating:
        // one that keeps finding data would otherwise spend tokio's per-poll budget each time
        // and leave the other none.
        this.tunnel_first = !this.tunnel_first;
        let (to, from) = if this.tunnel_first {
            let from = this.poll_from_tunnel(cx)?;
            (this.poll_to_tunnel(cx)?, from)
        } else {
            let to = this.poll_to_tunnel(cx)?;
            (to, this.poll_from_tunnel(cx)?)
        };
        if to.is_ready() && from.is_ready() {
            return Poll::Ready(Ok(this.moved));
        }
        Poll::Pending
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
    fn try_read(&mut self, r: &TcpStream) -> io::Result<Bytes> {
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A client connected to `listener`, and the accepted side.
    async fn connected(listener: TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// Reads until `want` bytes came, as the splice does (wait, then one non-blocking read).
    async fn read(reader: &mut ChunkReader, r: &TcpStream, want: usize) -> Vec<usize> {
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
        let (mut client, server) = connected(socket.listen(1).expect("listen")).await;
        let r = &server;
        let mut reader = ChunkReader::default();

        let bulk = vec![7u8; 4 * READ_CHUNK];
        client.write_all(&bulk).await.expect("write");
        let sizes = read(&mut reader, r, bulk.len()).await;
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

    /// Each of a proxied connection's two tasks holds a splice for the connection's life (the
    /// two joined async fns it replaced took 520 bytes in a release build).
    #[test]
    fn a_splice_is_small() {
        let size = std::mem::size_of::<Splice<'_, &dyn SpliceObserver>>();
        assert!(size <= 256, "splice future {size} bytes");
    }

    #[tokio::test]
    async fn a_waiting_splice_holds_no_read_buffer() {
        let (mut client, server) = connected(TcpListener::bind("127.0.0.1:0").await.expect("bind")).await;
        let r = &server;
        let mut reader = ChunkReader::default();

        client.write_all(b"x").await.expect("write");
        assert_eq!(read(&mut reader, r, 1).await, [1]);
        assert_eq!(reader.buf.capacity(), 0, "idle after a small read");
        assert!(!reader.flowing);

        // Bulk: once a small read fills up, reads go into large chunks; a small read ends that
        // and lets the chunk buffer go.
        let bulk = vec![7u8; 3 * READ_CHUNK];
        client.write_all(&bulk).await.expect("write");
        let sizes = read(&mut reader, r, bulk.len()).await;
        assert_eq!(sizes[0], FIRST_READ);
        assert!(sizes[1..].iter().any(|&n| n > FIRST_READ), "large reads: {sizes:?}");
        client.write_all(b"y").await.expect("write");
        assert_eq!(read(&mut reader, r, 1).await, [1]);
        assert_eq!(reader.buf.capacity(), 0, "idle after a small read again");
        assert!(!reader.flowing);

        // The end of the stream is an empty chunk.
        drop(client);
        r.readable().await.expect("readable");
        assert!(reader.try_read(r).expect("eof").is_empty());
    }
}
