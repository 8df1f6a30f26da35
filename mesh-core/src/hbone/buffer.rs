//! The read buffer below rustls. rustls pulls at most 4 KiB per read from its transport, which
//! costs four syscalls per full 16 KiB TLS record; a user-space buffer below it turns that into
//! one read per 64 KiB. The buffer is allocated only once the TLS handshake has proven who the
//! peer is: a connection that has not authenticated costs no more than its socket and rustls'
//! own state, so a flood of idle connections cannot take the node's memory.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A full TLS 1.3 record on the wire: 5-byte header, 16 KiB of plaintext, content type, tag.
const MAX_RECORD: usize = 5 + 16 * 1024 + 1 + 16;
/// Size of the buffer once a connection is authenticated: four full records, what a peer's
/// rustls writes at once (its 64 KiB send-buffer limit). A buffer of 64 KiB left each such write's
/// last 88 bytes (the records' overhead) to a read of their own.
pub(crate) const AUTHENTICATED_READ_BUFFER: usize = 4 * MAX_RECORD;

/// A transport whose reads go through a buffer that exists only after [`grow`](Self::grow).
#[derive(Debug)]
pub struct LazyBuffered<T> {
    inner: T,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
}

impl<T> LazyBuffered<T> {
    /// Unbuffered until [`grow`](Self::grow).
    pub fn new(inner: T) -> Self {
        LazyBuffered {
            inner,
            buf: Box::default(),
            pos: 0,
            filled: 0,
        }
    }

    /// Gives the reader a buffer of `capacity` bytes (no-op if it already has one that large).
    pub fn grow(&mut self, capacity: usize) {
        if self.buf.len() >= capacity {
            return;
        }
        let mut bigger = vec![0u8; capacity].into_boxed_slice();
        let pending = self.filled - self.pos;
        bigger[..pending].copy_from_slice(&self.buf[self.pos..self.filled]);
        self.buf = bigger;
        self.pos = 0;
        self.filled = pending;
    }

    /// Bytes of buffer currently allocated (for tests and accounting).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for LazyBuffered<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.filled {
            // Nothing buffered: a read as large as the buffer (or no buffer at all) goes straight
            // to the caller.
            if out.remaining() >= this.buf.len() {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            this.filled = rb.filled().len();
            this.pos = 0;
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
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

    #[tokio::test]
    async fn reads_pass_through_until_grown_then_buffer() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut lazy = LazyBuffered::new(b);
        assert_eq!(lazy.capacity(), 0);
        a.write_all(b"hello world").await.unwrap();
        let mut five = [0u8; 5];
        lazy.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"hello");
        lazy.grow(16);
        assert_eq!(lazy.capacity(), 16);
        let mut rest = [0u8; 6];
        lazy.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" world");
        // Small reads are now served from the buffer: one write, several reads.
        a.write_all(b"abcdef").await.unwrap();
        let mut two = [0u8; 2];
        for want in [b"ab", b"cd", b"ef"] {
            lazy.read_exact(&mut two).await.unwrap();
            assert_eq!(&two, want);
        }
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
