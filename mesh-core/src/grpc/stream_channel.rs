//! One HTTP/2 connection for one long-lived gRPC stream (xDS), with the frame size a large
//! push needs, which tonic's `Endpoint` does not let a client set.
//!
//! A server sends DATA frames no larger than the client's `SETTINGS_MAX_FRAME_SIZE`, 16 KiB
//! unless the client says more. h2 flushes its transport after every DATA frame, and a TLS
//! stream writes on every flush, so at 16 KiB a control plane pushing the world (37 MB at
//! 100,000 pods) makes a TLS record pair and a system call per 16 KiB, for each client.
//! Accepting [`MAX_FRAME_SIZE`], it writes the same bytes in a third of the calls (rustls
//! then writes at most its 64 KiB send buffer at once): measured, 2,550 -> 860 per client.
//!
//! No reconnect and no pooling: the caller dials again after the stream ends, as the xDS
//! client does anyway. The connection's task ends with the last clone of the channel.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tonic::body::BoxBody;

use super::{Dial, GrpcError, CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// Largest DATA frame this client accepts: 256 KiB, sixteen times HTTP/2's default and more
/// than a server's TLS layer writes at once. h2 reads one frame at a time, so this is also
/// what a connection may buffer for a frame.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

/// HTTP/2's bounds on SETTINGS_MAX_FRAME_SIZE (RFC 9113, 6.5.2): h2 panics outside them, so
/// [`Dial::connect_stream`] clamps what it is given.
const MIN_FRAME_SIZE: u32 = 16 * 1024;
const MAX_FRAME_SIZE_LIMIT: u32 = (1 << 24) - 1;

/// A gRPC channel over one HTTP/2 connection; cheap to clone (the clones share it).
#[derive(Clone, Debug)]
pub struct StreamChannel {
    send: http2::SendRequest<BoxBody>,
    /// `:scheme` and `:authority` of every request (tonic's generated clients leave them
    /// unset unless made with an origin).
    origin: Uri,
}

impl Dial {
    /// Dials one HTTP/2 connection for a long-lived stream ([`StreamChannel`]) that accepts
    /// frames up to `max_frame_size` ([`MAX_FRAME_SIZE`]; HTTP/2's default and least is 16 KiB,
    /// values outside HTTP/2's range are clamped into it); fails
    /// if the server cannot be reached or the TLS or HTTP/2 handshake fails within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect_stream(&self, max_frame_size: u32) -> Result<StreamChannel, GrpcError> {
        let failed = |reason: String| GrpcError::Handshake {
            address: self.address.clone(),
            reason,
        };
        let handshake = async {
            let io = self.connector.clone().dial().await.map_err(|e| e.to_string())?;
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_frame_size(max_frame_size.clamp(MIN_FRAME_SIZE, MAX_FRAME_SIZE_LIMIT))
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake(io)
                .await
                .map_err(|e| super::ErrorChain(&e).to_string())
        };
        let (send, conn) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| failed(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(failed)?;
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%address, error = %super::ErrorChain(&e), "gRPC connection ended");
            }
        });
        Ok(StreamChannel {
            send,
            origin: self.origin.clone(),
        })
    }
}

impl tower::Service<http::Request<BoxBody>> for StreamChannel {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<BoxBody>) -> Self::Future {
        let mut parts = http::uri::Parts::default();
        parts.scheme = self.origin.scheme().cloned();
        parts.authority = self.origin.authority().cloned();
        parts.path_and_query = request.uri().path_and_query().cloned();
        // Scheme and authority come from a URI that parsed: this cannot fail, and if it did
        // the request would go as it came (and the server refuse it), not to another path.
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        Box::pin(self.send.send_request(request))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// The SETTINGS a client sends first, as (identifier, value) pairs, read off the wire.
    async fn client_settings(listener: TcpListener) -> Vec<(u16, u32)> {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let mut head = [0u8; 24 + 9];
        tcp.read_exact(&mut head).await.expect("preface and frame header");
        assert_eq!(&head[..24], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let frame = &head[24..];
        assert_eq!(frame[3], 0x4, "the first frame is SETTINGS");
        let len = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.expect("settings");
        payload
            .chunks_exact(6)
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn the_client_announces_its_frame_size() {
        const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
        for wanted in [MAX_FRAME_SIZE, 16 * 1024 + 1] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = format!("http://{}", listener.local_addr().expect("addr"));
            let server = tokio::spawn(client_settings(listener));
            let dial = super::super::endpoint(&address, None).expect("endpoint");
            let _channel = dial.connect_stream(wanted).await.expect("connect");
            let settings = server.await.expect("server");
            assert!(
                settings.contains(&(SETTINGS_MAX_FRAME_SIZE, wanted)),
                "{settings:?} has no max frame size {wanted}"
            );
        }
    }
}
