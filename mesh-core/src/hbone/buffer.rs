//! The read buffer below rustls. rustls pulls at most 4 KiB per read from its transport, which
//! costs four syscalls per full 16 KiB TLS record; a user-space buffer below it turns that into
//! one read per 64 KiB. The buffer exists only once the TLS handshake has proven who the peer
//! is, so a flood of unauthenticated connections costs no more than their sockets and rustls'
//! own state; and it is held only while bytes flow: a read that finds the socket empty gives
//! it back, so an HBONE connection whose streams are quiet (most of them, most of the time)
//! holds none of it. A given-back buffer waits in a small per-thread spare list for the next
//! burst on any connection, so a request/response exchange costs no allocation and no page
//! faults (freeing 64 KiB to the allocator each time let it return the pages to the kernel,
//! and the next burst faulted them in again: ~5 µs per request, measured).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A full TLS 1.3 record on the wire: 5-byte header, 16 KiB of plaintext, content type, tag.
const MAX_RECORD: usize = 5 + 16 * 1024 + 1 + 16;
/// Size of the buffer once a connection is authenticated: four full records, what a peer's
/// rustls writes at once (its 64 KiB send-buffer limit). A buffer of 64 KiB left each such write's
/// last 88 bytes (the records' overhead) to a read of their own.
pub(crate) const AUTHENTICATED_READ_BUFFER: usize = 4 * MAX_RECORD;
/// Given-back buffers each thread keeps for the next burst: the runtime's threads each hold at
/// most this many, however many connections are quiet.
const SPARE_PER_THREAD: usize = 2;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for `size` bytes: a spare one when this thread has it.
fn take(size: usize) -> BytesMut {
    SPARE
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| BytesMut::with_capacity(size))
}

/// Keeps an emptied buffer for this thread's next burst, or frees it.
fn give_back(mut buf: BytesMut) {
    buf.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARE_PER_THREAD {
            spare.push(buf);
        }
    });
}

/// A transport whose reads go through a buffer of [`grow`](Self::grow)'s size, held only while
/// the socket has bytes to read.
#[derive(Debug)]
pub struct LazyBuffered<T> {
    inner: T,
    /// Bytes read from `inner` and not yet handed over; `None` while none is held.
    buf: Option<BytesMut>,
    /// Buffer size for reads (0: unbuffered).
    size: usize,
}

impl<T> LazyBuffered<T> {
    /// Unbuffered until [`grow`](Self::grow).
    pub fn new(inner: T) -> Self {
        LazyBuffered {
            inner,
            buf: None,
            size: 0,
        }
    }

    /// Reads go through a buffer of `capacity` bytes from now on (no-op if it is already that
    /// large); bytes already buffered are kept.
    pub fn grow(&mut self, capacity: usize) {
        self.size = self.size.max(capacity);
    }

    /// Whether a read buffer is held now (for tests and accounting).
    pub fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> LazyBuffered<T> {
    /// Refills the (empty) buffer from `inner`; on `Pending` the buffer is given back.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let size = self.size;
        let buf = self.buf.get_or_insert_with(|| take(size));
        // Reclaims the space of what was handed over.
        buf.reserve(size);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, buf) {
            Poll::Ready(r) => Poll::Ready(r.map(drop)),
            Poll::Pending => {
                if let Some(buf) = self.buf.take() {
                    give_back(buf);
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for LazyBuffered<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.as_ref().is_none_or(BytesMut::is_empty) {
            // Nothing buffered: a read as large as the buffer (or with no buffer at all) goes
            // straight to the caller.
            if out.remaining() >= this.size {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            std::task::ready!(this.poll_fill(cx))?;
        }
        if let Some(buf) = this.buf.as_mut() {
            let n = out.remaining().min(buf.len());
            out.put_slice(&buf[..n]);
            buf.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LazyBuffered<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Polls one read of up to `n` bytes without waiting.
    fn try_read(lazy: &mut LazyBuffered<tokio::io::DuplexStream>, n: usize) -> Poll<Vec<u8>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut storage = vec![0u8; n];
        let mut rb = ReadBuf::new(&mut storage);
        match Pin::new(lazy).poll_read(&mut cx, &mut rb) {
            Poll::Ready(r) => {
                r.unwrap();
                Poll::Ready(rb.filled().to_vec())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    #[tokio::test]
    async fn reads_pass_through_until_grown_then_buffer() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut lazy = LazyBuffered::new(b);
        a.write_all(b"hello world").await.unwrap();
        assert_eq!(try_read(&mut lazy, 5), Poll::Ready(b"hello".to_vec()));
        assert!(!lazy.holds_buffer(), "unbuffered before grow");
        lazy.grow(16);
        assert!(!lazy.holds_buffer(), "no buffer before there is something to read");
        assert_eq!(try_read(&mut lazy, 6), Poll::Ready(b" world".to_vec()));
        // Small reads are now served from the buffer: one write, one read of the transport
        // (the buffer holds it all), several reads of the caller.
        a.write_all(b"abcdef").await.unwrap();
        assert_eq!(try_read(&mut lazy, 2), Poll::Ready(b"ab".to_vec()));
        assert!(lazy.holds_buffer());
        a.write_all(b"gh").await.unwrap();
        for want in [b"cd", b"ef", b"gh"] {
            assert_eq!(try_read(&mut lazy, 2), Poll::Ready(want.to_vec()));
        }
    }

    #[tokio::test]
    async fn a_quiet_transport_holds_no_buffer() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut lazy = LazyBuffered::new(b);
        lazy.grow(64);
        for round in 0..3 {
            a.write_all(b"burst").await.unwrap();
            assert_eq!(try_read(&mut lazy, 4), Poll::Ready(b"burs".to_vec()), "round {round}");
            assert!(lazy.holds_buffer(), "held while bytes are buffered");
            assert_eq!(try_read(&mut lazy, 4), Poll::Ready(b"t".to_vec()));
            assert!(try_read(&mut lazy, 4).is_pending());
            assert!(
                !lazy.holds_buffer(),
                "given back once the transport is empty (round {round})"
            );
        }
        drop(a);
        assert_eq!(try_read(&mut lazy, 4), Poll::Ready(Vec::new()), "end of stream");
    }

    #[tokio::test]
    async fn given_back_buffers_are_reused_and_bounded_per_thread() {
        SPARE.with_borrow_mut(Vec::clear);
        let mut pairs = Vec::new();
        for _ in 0..=SPARE_PER_THREAD {
            let (mut a, b) = tokio::io::duplex(1024);
            let mut lazy = LazyBuffered::new(b);
            lazy.grow(64);
            a.write_all(b"x").await.unwrap();
            assert_eq!(try_read(&mut lazy, 4), Poll::Ready(b"x".to_vec()));
            pairs.push((a, lazy));
        }
        for (_, lazy) in &mut pairs {
            assert!(try_read(lazy, 4).is_pending());
        }
        assert_eq!(SPARE.with_borrow(Vec::len), SPARE_PER_THREAD, "the rest are freed");
        let spare = SPARE.with_borrow(|s| s.last().map(|b| b.as_ptr() as usize));
        let (a, lazy) = &mut pairs[0];
        a.write_all(b"yz").await.unwrap();
        assert_eq!(try_read(lazy, 1), Poll::Ready(b"y".to_vec()));
        let held = lazy.buf.as_ref().map(|b| b.as_ptr() as usize - 1);
        assert_eq!(held, spare, "the next burst reads into a spare buffer");
        assert_eq!(SPARE.with_borrow(Vec::len), SPARE_PER_THREAD - 1);
    }

    #[tokio::test]
    async fn growing_keeps_buffered_bytes() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut lazy = LazyBuffered::new(b);
        lazy.grow(8);
        a.write_all(b"0123456789").await.unwrap();
        let mut one = [0u8; 1];
        lazy.read_exact(&mut one).await.unwrap();
        lazy.grow(64);
        let mut rest = [0u8; 9];
        lazy.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"123456789");
    }
}
