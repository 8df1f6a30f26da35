//! The one transport for what the waypoint sends to telemetry collectors (spans, access-log
//! records): a bounded queue per exporter that never makes a request wait (full: the item is
//! dropped and counted), and a task that gathers up to [`BATCH`] items or one second's worth
//! and POSTs each batch to every endpoint, one at a time with a 5 s timeout. A batch an
//! endpoint refuses or never answers is dropped and counted, not retried: a slow or dead
//! collector costs at most the queue's memory, never the traffic.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

/// Items kept waiting for the exporter task; beyond, new ones are dropped.
pub const QUEUE: usize = 4096;
/// Items per POST at most.
pub const BATCH: usize = 256;
/// How long one POST may take before its batch is given up.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

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

/// An encoder of one batch for one endpoint: the body and its content type.
pub type Encode<T> = Box<dyn Fn(&[T]) -> Vec<u8> + Send + Sync>;

/// One endpoint of an exporter.
pub struct Endpoint<T> {
    pub url: String,
    pub content_type: &'static str,
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

/// Collects items for up to a second (or [`BATCH`]) and posts each batch to every endpoint.
async fn run<T>(what: &'static str, endpoints: Vec<Endpoint<T>>, mut rx: mpsc::Receiver<T>, on_drop: OnDrop) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
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
            if !post(&client, e, &batch, what).await {
                on_drop(Dropped::ExportFailed, batch.len() as u64);
            }
        }
        batch.clear();
    }
}

/// One POST of `batch` to `e`; false when it did not arrive.
async fn post<T>(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    e: &Endpoint<T>,
    batch: &[T],
    what: &'static str,
) -> bool {
    let url = e.url.as_str();
    let req = Request::post(url)
        .header(http::header::CONTENT_TYPE, e.content_type)
        .body(Full::new(Bytes::from((e.encode)(batch))));
    let Ok(req) = req else {
        tracing::warn!(%url, what, "collector address is not a valid URI");
        return false;
    };
    let n = batch.len();
    match tokio::time::timeout(POST_TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) if resp.status().is_success() => return true,
        Ok(Ok(resp)) => tracing::warn!(%url, status = %resp.status(), n, what, "collector refused a batch"),
        Ok(Err(err)) => tracing::warn!(%url, error = %err, n, what, "exporting a batch failed"),
        Err(_) => tracing::warn!(%url, n, what, "exporting a batch timed out"),
    }
    false
}
