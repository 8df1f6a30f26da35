//! The one exporter loop for what the waypoint sends to telemetry collectors (spans, access-log
//! records): a bounded queue per exporter that never makes a request wait (full: the item is
//! dropped and counted), and a task that gathers up to [`BATCH`] items or one second's worth
//! and sends each batch to every endpoint, one at a time with a 5 s timeout, over the
//! endpoint's [`Transport`]: an HTTP POST (Zipkin, OTLP/HTTP) or a unary OTLP/gRPC call
//! (cleartext HTTP/2, as Envoy's OpenTelemetry access logger and tracer speak to a collector's
//! 4317). A batch an endpoint refuses or never answers is dropped and counted, not retried: a
//! slow or dead collector costs at most the queue's memory, never the traffic.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

/// Items kept waiting for the exporter task; beyond, new ones are dropped.
pub const QUEUE: usize = 4096;
/// Items per POST at most.
pub const BATCH: usize = 256;
/// How long one POST may take before its batch is given up.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a gRPC answer read (an ExportLogsServiceResponse is a few bytes): a collector
/// cannot make the waypoint buffer what it sends for [`POST_TIMEOUT`].
const MAX_GRPC_RESPONSE: usize = 64 * 1024;

/// Why items were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The queue was full (the collector is slower than the traffic).
    QueueFull,
    /// The collector refused the batch, failed or did not answer in time.
    ExportFailed,
}

impl Dropped {
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::ExportFailed => "export_failed",
        }
    }
}

/// Where lost items are counted (`n` items, and why).
pub type OnDrop = Arc<dyn Fn(Dropped, u64) + Send + Sync>;

/// An encoder of one batch for one endpoint: the body (for gRPC, the message without framing).
pub type Encode<T> = Box<dyn Fn(&[T]) -> Vec<u8> + Send + Sync>;

/// How a batch reaches an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A POST of the encoded batch to `url` with `content_type`.
    Http { url: String, content_type: &'static str },
    /// A unary gRPC call: `uri` is `http://host:port/<service>/<method>`, spoken as h2c.
    Grpc { uri: Uri },
}

/// Why an endpoint address cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected http://host:port/path or grpc://host:port")]
pub struct BadAddress(pub String);

impl Transport {
    /// `grpc://host:port` calls `method` (`/package.Service/Method`); `http://...` is posted
    /// to as written, with `content_type`.
    pub fn from_address(address: &str, method: &str, content_type: &'static str) -> Result<Transport, BadAddress> {
        let bad = || BadAddress(address.to_owned());
        if let Some(authority) = address.strip_prefix("grpc://") {
            let authority = authority.trim_end_matches('/');
            let uri = format!("http://{authority}{method}")
                .parse::<Uri>()
                .map_err(|_| bad())?;
            if authority.is_empty() || authority.contains('/') {
                return Err(bad());
            }
            return Ok(Transport::Grpc { uri });
        }
        if address.starts_with("http://") && address.parse::<Uri>().is_ok() {
            return Ok(Transport::Http {
                url: address.to_owned(),
                content_type,
            });
        }
        Err(bad())
    }

    fn describe(&self) -> String {
        match self {
            Transport::Http { url, .. } => url.clone(),
            Transport::Grpc { uri } => format!("grpc {uri}"),
        }
    }
}

/// One endpoint of an exporter.
pub struct Endpoint<T> {
    pub transport: Transport,
    pub encode: Encode<T>,
}

/// The sending side: cheap to clone, never blocks.
pub struct Exporter<T> {
    queue: mpsc::Sender<T>,
    on_drop: OnDrop,
}

impl<T> Clone for Exporter<T> {
    fn clone(&self) -> Self {
        Exporter {
            queue: self.queue.clone(),
            on_drop: self.on_drop.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> Exporter<T> {
    /// Starts the task posting to `endpoints` (`what` names the items in logs). Needs a runtime.
    pub fn start(what: &'static str, endpoints: Vec<Endpoint<T>>, on_drop: OnDrop) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(what, endpoints, rx, on_drop.clone()));
        Exporter { queue: tx, on_drop }
    }

    /// Queues `item`, or drops and counts it when the queue is full.
    pub fn send(&self, item: T) {
        if self.queue.try_send(item).is_err() {
            (self.on_drop)(Dropped::QueueFull, 1);
        }
    }
}

/// The HTTP/1 client for POSTs and the HTTP/2 (h2c) one for gRPC calls.
struct Clients {
    http: Client<HttpConnector, Full<Bytes>>,
    grpc: Client<HttpConnector, Full<Bytes>>,
}

/// Collects items for up to a second (or [`BATCH`]) and sends each batch to every endpoint.
async fn run<T>(what: &'static str, endpoints: Vec<Endpoint<T>>, mut rx: mpsc::Receiver<T>, on_drop: OnDrop) {
    let clients = Clients {
        http: Client::builder(TokioExecutor::new()).build_http(),
        grpc: Client::builder(TokioExecutor::new()).http2_only(true).build_http(),
    };
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => batch.push(item),
                Ok(None) | Err(_) => break,
            }
        }
        for e in &endpoints {
            let body = (e.encode)(&batch);
            let sent = tokio::time::timeout(POST_TIMEOUT, send(&clients, &e.transport, body)).await;
            let failure = match sent {
                Ok(Ok(())) => continue,
                Ok(Err(why)) => why,
                Err(_) => "timed out".to_owned(),
            };
            let n = batch.len();
            tracing::warn!(endpoint = %e.transport.describe(), n, what, error = %failure, "exporting a batch failed");
            on_drop(Dropped::ExportFailed, n as u64);
        }
        batch.clear();
    }
}

/// One batch to one endpoint; `Err` says why it did not arrive.
async fn send(clients: &Clients, transport: &Transport, body: Vec<u8>) -> Result<(), String> {
    match transport {
        Transport::Http { url, content_type } => {
            let req = Request::post(url.as_str())
                .header(http::header::CONTENT_TYPE, *content_type)
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let resp = clients.http.request(req).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status()));
            }
            Ok(())
        }
        Transport::Grpc { uri } => {
            let req = Request::post(uri.clone())
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .body(Full::new(grpc_frame(&body)))
                .map_err(|e| e.to_string())?;
            let resp = clients.grpc.request(req).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status()));
            }
            // A trailers-only answer carries grpc-status in the headers.
            if let Some(status) = resp.headers().get("grpc-status").cloned() {
                return grpc_ok(Some(&status));
            }
            let collected = http_body_util::Limited::new(resp.into_body(), MAX_GRPC_RESPONSE)
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            grpc_ok(collected.trailers().and_then(|t| t.get("grpc-status")))
        }
    }
}

/// gRPC's length-prefixed message: not compressed, 4-byte big-endian length, the message.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// Whether a call's `grpc-status` says OK (missing: the call did not complete).
fn grpc_ok(status: Option<&http::HeaderValue>) -> Result<(), String> {
    match status.map(|s| s.as_bytes()) {
        Some(b"0") => Ok(()),
        Some(other) => Err(format!("grpc-status {}", String::from_utf8_lossy(other))),
        None => Err("no grpc-status".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collector answering a gRPC export with a huge body (then grpc-status 0) gets the batch
    /// counted as failed after [`MAX_GRPC_RESPONSE`] bytes; the body was read whole before.
    #[tokio::test]
    async fn a_huge_grpc_answer_is_not_buffered() {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let body = Full::new(Bytes::from(vec![0u8; 4 << 20]))
                    .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) });
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await;
        });
        let clients = Clients {
            http: Client::builder(TokioExecutor::new()).build_http(),
            grpc: Client::builder(TokioExecutor::new()).http2_only(true).build_http(),
        };
        let uri: Uri = format!("http://{addr}/opentelemetry.proto.collector.logs.v1.LogsService/Export")
            .parse()
            .unwrap();
        let sent = send(&clients, &Transport::Grpc { uri }, vec![1, 2, 3]).await;
        assert!(sent.is_err(), "a 4 MiB answer was read whole and accepted");
    }

    #[test]
    fn addresses_become_transports() {
        let m = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
        let grpc = |s: &str| Transport::Grpc {
            uri: s.parse().unwrap(),
        };
        let table: [(&str, Option<Transport>); 7] = [
            (
                "grpc://otel.obs.svc:4317",
                Some(grpc(
                    "http://otel.obs.svc:4317/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                )),
            ),
            ("grpc://10.0.0.7:4317/", Some(grpc(&format!("http://10.0.0.7:4317{m}")))),
            (
                "http://otel:4318/v1/logs",
                Some(Transport::Http {
                    url: "http://otel:4318/v1/logs".into(),
                    content_type: "application/json",
                }),
            ),
            ("grpc://", None),
            ("grpc://host:4317/extra/path", None),
            ("https://otel:4318/v1/logs", None),
            ("otel:4317", None),
        ];
        for (address, want) in table {
            let got = Transport::from_address(address, m, "application/json").ok();
            assert_eq!(got, want, "{address}");
        }
    }

    #[test]
    fn grpc_frames_are_length_prefixed() {
        assert_eq!(&grpc_frame(b"abc")[..], b"\x00\x00\x00\x00\x03abc");
        assert!(grpc_ok(Some(&http::HeaderValue::from_static("0"))).is_ok());
        assert!(grpc_ok(Some(&http::HeaderValue::from_static("14"))).is_err());
        assert!(grpc_ok(None).is_err());
    }
}
