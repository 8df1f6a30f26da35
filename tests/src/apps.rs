//! Sample applications for the test bed: an HTTP server and an echo server that both report
//! the peer address they saw, so tests can check source-address preservation.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::Netns;

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

/// A connection to the echo server: returns the peer line and the stream.
pub async fn echo_connect(ns: &Netns, dst: SocketAddr) -> std::io::Result<(String, BufReader<tokio::net::TcpStream>)> {
    let s = ns.connect(dst).await?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .map_err(std::io::Error::other)??;
    if n == 0 {
        // The local ztunnel accepted, then closed: the tunnel was refused.
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "closed before the app answered",
        ));
    }
    Ok((line.trim().to_owned(), r))
}

pub async fn ping(conn: &mut BufReader<tokio::net::TcpStream>, msg: &str) -> std::io::Result<String> {
    conn.get_mut().write_all(format!("{msg}\n").as_bytes()).await?;
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut line))
        .await
        .map_err(std::io::Error::other)??;
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(line.trim().to_owned())
}
