//! Sample applications for the test bed: an HTTP server and an echo server that both report
//! the peer address they saw, so tests can check source-address preservation.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP server that answers every request with the peer address it saw.
pub async fn http_server(listener: TcpListener) {
    while let Ok((mut s, peer)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("peer={}\n", peer.ip());
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Writes "peer=<ip>\n" on accept, then echoes until EOF.
pub async fn echo_server(listener: TcpListener) {
    while let Ok((mut s, peer)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = s.write_all(format!("peer={}\n", peer.ip()).as_bytes()).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}
