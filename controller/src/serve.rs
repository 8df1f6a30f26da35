//! The TLS listener for gRPC (xDS and CA on 15012): handshakes run concurrently in their own
//! tasks, so one slow client cannot hold up the accept loop, and the TLS stream is handed to
//! tonic directly (no copy through a pipe). At most [`MAX_PENDING_HANDSHAKES`] handshakes run
//! at once, each for at most [`HANDSHAKE_TIMEOUT`]: past that a new connection is closed at
//! once, so clients that connect and send nothing cannot make the controller hold unbounded
//! tasks and sockets.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The most TLS handshakes in progress at once. Proxies reconnecting after a controller
/// restart handshake in well under a second each, so this many is ample.
pub const MAX_PENDING_HANDSHAKES: usize = 1_024;
/// How long a client has to finish its handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections closed unhandshaken because [`MAX_PENDING_HANDSHAKES`] were in progress: logged
/// at most once a minute.
static HANDSHAKES_FULL: std::sync::LazyLock<mesh_core::log_limit::LogLimiter> =
    std::sync::LazyLock::new(|| mesh_core::log_limit::LogLimiter::new(std::time::Duration::from_secs(60)));

/// A server-side TLS connection tonic can serve.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Accepted, handshaken connections from `listener`.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<TlsConn>> {
    tls_incoming_live(listener, Arc::new(arc_swap::ArcSwap::new(config)))
}

/// As [`tls_incoming`], each handshake with the configuration current when the connection
/// arrives: the serving certificate is replaced when the CA rotates.
pub fn tls_incoming_live(
    listener: TcpListener,
    config: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
) -> impl Stream<Item = io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel::<io::Result<TlsConn>>(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = pending.clone().try_acquire_owned() else {
                if let Some(suppressed) = HANDSHAKES_FULL.check("full") {
                    tracing::warn!(%peer, suppressed, limit = MAX_PENDING_HANDSHAKES, "too many TLS handshakes in progress; connection closed");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
            let conn_tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(slot);
                match handshake {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok(TlsConn(tls))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

    use std::time::Duration;

    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;

    use super::*;

    fn server_config() -> Arc<rustls::ServerConfig> {
        use mesh_core::identity::ca::new_csr;
        use mesh_core::identity::{DevCa, Identity, WorkloadCertificate};
        let ca = DevCa::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "istio-system", "controller").unwrap();
        let (key, csr) = new_csr(&id).unwrap();
        let leaf = ca.issue(&id, &csr, Duration::from_secs(600)).unwrap();
        let chain = [leaf, ca.root_pem().to_owned()];
        let cert = WorkloadCertificate::from_chain(&id, key.serialize_der(), &chain, &[]).unwrap();
        mesh_core::tls::server_config(&cert).unwrap()
    }

    /// Clients that connect and send nothing hold at most the handshake bound: the next
    /// connection is closed at once, and one finished handshake frees its slot.
    #[tokio::test]
    async fn pending_handshakes_are_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _incoming = tls_incoming(listener, server_config()).boxed();
        let mut silent = Vec::new();
        for _ in 0..MAX_PENDING_HANDSHAKES {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut [0u8; 1])).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "the connection past the bound was not closed"
        );
        let mut held = silent.pop().unwrap();
        let open = tokio::time::timeout(Duration::from_millis(200), held.read(&mut [0u8; 1])).await;
        assert!(open.is_err(), "a connection within the bound was closed");
    }
}
