//! Double HBONE, the client half: an HBONE tunnel opened *inside* another CONNECT stream, as
//! Istio's ztunnel does to reach a workload on another network through that network's
//! east-west gateway.
//!
//! The outer tunnel (mutual TLS with the gateway, pooled like any HBONE connection) carries
//! the inner TLS records as opaque bytes; the inner mutual TLS is with the destination's
//! ztunnel (or waypoint) and checks the destination's identity, so the gateway sees neither
//! the plaintext nor any key of the client's identity. Each tunnel gets its own inner
//! connection, as in Istio: pooling inner connections would pin every later stream to the
//! first remote endpoint the gateway picked. The inner connection's task ends with its one
//! stream, and with it the outer stream.

use std::sync::Arc;

use tracing::debug;

use super::pool::{send_connect, HbonePool, TunnelRequest};
use super::stream::H2Stream;
use super::HboneError;
use crate::identity::Identity;
use crate::tls;

/// One tunnel through a gateway.
pub struct DoubleTunnelRequest {
    /// The outer CONNECT: `key.dst` is the gateway's HBONE address, `key.dst_identities` the
    /// identities the gateway may prove; its authority names the final destination for the
    /// gateway to route by. Its headers are sent on the inner CONNECT too.
    pub outer: TunnelRequest,
    /// Identities the destination must prove in the inner handshake.
    pub inner_identities: Vec<Identity>,
    /// `:authority` of the inner CONNECT.
    pub inner_authority: String,
}

impl HbonePool {
    /// Opens the outer stream to the gateway, then mutual TLS and HTTP/2 to the destination
    /// inside it, then the inner CONNECT; answers once the destination replied 200.
    pub async fn connect_double(self: &Arc<Self>, req: &DoubleTunnelRequest) -> Result<H2Stream, HboneError> {
        let outer = self.connect(&req.outer).await?;
        let s = &self.settings;
        let cert = self.certs.fetch(&req.outer.key.src_identity).await?;
        let config = tls::client_config(&cert, req.inner_identities.clone())?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let handshake = async {
            let tls = connector
                .connect(tls::placeholder_server_name(), outer.into_io())
                .await
                .map_err(HboneError::Tls)?;
            let (sender, connection) = h2::client::Builder::new()
                .initial_window_size(s.stream_window)
                .initial_connection_window_size(s.connection_window)
                .max_frame_size(s.max_frame_size)
                .max_header_list_size(super::server::MAX_HEADER_LIST)
                .max_send_buffer_size(super::server::MAX_SEND_BUFFER)
                .handshake::<_, bytes::Bytes>(tls)
                .await?;
            Ok::<_, HboneError>((sender, connection))
        };
        let (sender, connection) = tokio::time::timeout(s.handshake_timeout, handshake)
            .await
            .map_err(|_| HboneError::Timeout("inner TLS handshake", s.handshake_timeout))??;
        let gateway = req.outer.key.dst;
        // Ends once the one stream is done and `sender` is gone: it flushes the last frames,
        // closes the inner TLS and ends the outer stream.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%gateway, error = %e, "inner HBONE connection closed with error");
            }
        });
        let (send, recv) = send_connect(&sender, &req.inner_authority, &req.outer, s.connect_timeout).await?;
        Ok(H2Stream {
            send,
            recv,
            _guard: None,
        })
    }
}
