//! The TLS listener for gRPC (xDS and CA on 15012): handshakes run concurrently in their own
//! tasks, so one slow client cannot hold up the accept loop, and the TLS stream is handed to
//! tonic directly (no copy through a pipe). Handshakes in progress are bounded in total
//! ([`MAX_PENDING_HANDSHAKES`]) and per source address ([`MAX_PENDING_PER_SOURCE`]), each for
//! at most [`HANDSHAKE_TIMEOUT`]; past a bound a new connection is closed at once (and counted
//! by the [`LimitObserver`] given). So clients that connect and send nothing cannot make the
//! controller hold unbounded tasks and sockets, and one source cannot take every slot from the
//! proxies (each comes from its own pod or node address and needs a few connections).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use mesh_core::hbone::limits::{LimitConfig, LimitObserver, ServerLimits};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The most TLS handshakes in progress at once. Proxies reconnecting after a controller
/// restart handshake in well under a second each, so this many is ample.
pub const MAX_PENDING_HANDSHAKES: u32 = 1_024;
/// The most handshakes in progress from one source address: a proxy opens a few connections.
pub const MAX_PENDING_PER_SOURCE: u32 = 32;
/// How long a client has to finish its handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The handshake bounds above, telling `observer` (a metric) each time one bites.
pub fn handshake_limits(observer: Option<LimitObserver>) -> Arc<ServerLimits> {
    let config = LimitConfig {
        max_pending: MAX_PENDING_HANDSHAKES,
        max_pending_per_source: MAX_PENDING_PER_SOURCE,
        ..LimitConfig::default()
    };
    Arc::new(ServerLimits::new(config, observer))
}

/// Connections closed unhandshaken because a bound was full: logged at most once a minute
/// per bound.
static HANDSHAKES_FULL: std::sync::LazyLock<mesh_core::log_limit::LogLimiter> =
    std::sync::LazyLock::new(|| mesh_core::log_limit::LogLimiter::new(std::time::Duration::from_secs(60)));

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// [`handshake_limits`] counting each refusal in `connections_refused_total{reason}`
/// (`pending_connections_limit`, `pending_per_source_limit`).
pub fn registered_handshake_limits(registry: &mut prometheus_client::registry::Registry) -> Arc<ServerLimits> {
    use prometheus_client::metrics::{counter::Counter, family::Family};
    let refused = Family::<ReasonLabels, Counter>::default();
    registry.register(
        "connections_refused",
        "Connections to the xDS/CA port closed before their TLS handshake, by the bound that was full",
        refused.clone(),
    );
    let observer: LimitObserver = Arc::new(move |limit| {
        refused.get_or_create(&ReasonLabels { reason: limit.as_str() }).inc();
    });
    handshake_limits(Some(observer))
}

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
    tls_incoming_live(
        listener,
        Arc::new(arc_swap::ArcSwap::new(config)),
        handshake_limits(None),
    )
}

/// As [`tls_incoming`], each handshake with the configuration current when the connection
/// arrives: the serving certificate is replaced when the CA rotates. `limits` bounds the
/// handshakes in progress ([`handshake_limits`]).
pub fn tls_incoming_live(
    listener: TcpListener,
    config: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
    limits: Arc<ServerLimits>,
) -> impl Stream<Item = io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel::<io::Result<TlsConn>>(64);
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
            let slot = match limits.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(limit) => {
                    if let Some(suppressed) = HANDSHAKES_FULL.check(limit.as_str()) {
                        tracing::warn!(%peer, suppressed, %limit, "too many TLS handshakes in progress; connection closed");
                    }
                    continue;
                }
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

    /// The controller's serving configuration, and a proxy's client configuration trusting it.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        use mesh_core::identity::ca::new_csr;
        use mesh_core::identity::{DevCa, Identity, WorkloadCertificate};
        let ca = DevCa::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "istio-system", "controller").unwrap();
        let (key, csr) = new_csr(&id).unwrap();
        let leaf = ca.issue(&id, &csr, Duration::from_secs(600)).unwrap();
        let chain = [leaf, ca.root_pem().to_owned()];
        let cert = WorkloadCertificate::from_chain(&id, key.serialize_der(), &chain, &[]).unwrap();
        let server = mesh_core::tls::control_plane_server_config(&cert).unwrap();
        let client = mesh_core::tls::control_plane_client_config(&cert.roots, vec![id]).unwrap();
        (server, client)
    }

    /// Clients that connect and send nothing hold at most the per-source bound: the next
    /// connection from that source is closed at once, while another source still gets a
    /// handshake slot.
    #[tokio::test]
    async fn pending_handshakes_are_bounded_per_source() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = refused.clone();
        let observer: LimitObserver = Arc::new(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let limits = handshake_limits(Some(observer));
        let (server, client) = configs();
        let config = Arc::new(arc_swap::ArcSwap::new(server));
        let mut incoming = tls_incoming_live(listener, config, limits).boxed();
        let mut silent = Vec::new();
        for _ in 0..MAX_PENDING_PER_SOURCE {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut [0u8; 1])).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "the connection past the bound was not closed"
        );
        assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Another source (127.0.0.2 is loopback too) still completes a handshake.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let tcp = other.connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = mesh_core::tls::placeholder_server_name();
        let handshake = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await;
        assert!(
            matches!(handshake, Ok(Ok(_))),
            "another source was refused: {handshake:?}"
        );
        let served = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(served, Ok(Some(Ok(_)))));
        let mut held = silent.pop().unwrap();
        let open = tokio::time::timeout(Duration::from_millis(200), held.read(&mut [0u8; 1])).await;
        assert!(open.is_err(), "a connection within the bound was closed");
    }
}
