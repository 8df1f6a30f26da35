//! What a downstream connection is doing, and ending one that does nothing. [`Watched`] wraps
//! a socket and counts the bytes it moves each way into an [`Activity`], which also counts
//! the requests being answered on it; [`Activity::silence`] resolves once neither changed
//! for a period. A watchdog compares counts on a timer, so no clock is read per I/O call.
//!
//! Three users:
//! - [`until_idle`] ends an HTTP connection a client leaves silent at the ingress gateway;
//! - [`splice`] copies a TCP connection (a TCPRoute or TLS passthrough at the ingress, TCP
//!   through a waypoint) both ways until either end is done, or until no byte has moved
//!   either way for the backend's `connectionPool.tcp.idleTimeout` (an hour unless a
//!   DestinationRule says otherwise), as Envoy's TCP proxy does for Istio. Without it, a
//!   client that goes quiet holds its slot, a socket on each side and the backend's
//!   connection for ever.
//! - [`IdleBody`] fails a stream on which no frame has moved either way for a period (Envoy's
//!   stream idle timeout), watching both its request body and the backend's answer body
//!   through one [`StreamClock`]: a connection with a request in flight is never silent to
//!   the watchdog, so without it a client that announces a body and never sends it holds its
//!   stream, a backend's connection and a slot of the backend's `maxRequests` for ever, and a
//!   backend that sends its answer's head and never the rest holds the client's stream and
//!   the backend's connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use mesh_core::hbone::stream::SpliceObserver;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, MissedTickBehavior, Sleep};

/// How often per period the watchdog looks: silence is noticed at most a quarter late.
const CHECKS_PER_PERIOD: u32 = 4;

/// What a connection is doing: the bytes its socket moved each way, and how many requests
/// are being answered (one waiting on a slow backend is not silence).
#[derive(Clone, Default)]
pub struct Activity(Arc<Counts>);

#[derive(Default)]
struct Counts {
    read: AtomicU64,
    written: AtomicU64,
    in_flight: AtomicU64,
    meter: Option<Meter>,
}

/// Counters a spliced connection's bytes are also added to as they move, so a scrape during
/// a long transfer sees them: its `istio_tcp_received_bytes` series (the request direction,
/// read from the client) and `istio_tcp_sent_bytes` (the response, written to it), as Istio
/// counts them.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    pub to_destination: Counter,
    pub to_client: Counter,
}

/// A request being answered, until dropped.
pub struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        (self.0).0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// An activity whose bytes are also added to `meter`.
    pub fn metered(meter: Meter) -> Activity {
        Activity(Arc::new(Counts {
            meter: Some(meter),
            ..Counts::default()
        }))
    }

    fn add_read(&self, n: usize) {
        self.0.read.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(m) = &self.0.meter {
            m.to_destination.inc_by(n as u64);
        }
    }

    fn add_written(&self, n: usize) {
        self.0.written.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(m) = &self.0.meter {
            m.to_client.inc_by(n as u64);
        }
    }

    /// Counts a request until the guard is dropped (when its service future ends).
    pub fn request(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Bytes read from and written to the watched socket so far.
    pub fn moved(&self) -> (u64, u64) {
        (
            self.0.read.load(Ordering::Relaxed),
            self.0.written.load(Ordering::Relaxed),
        )
    }

    /// The bytes moved, or `None` while a request is being answered.
    fn quiet_count(&self) -> Option<u64> {
        let (read, written) = self.moved();
        (self.0.in_flight.load(Ordering::Relaxed) == 0).then_some(read.wrapping_add(written))
    }

    /// Resolves once no byte has moved and no request was being answered for a whole
    /// `period` (noticed up to a quarter period later).
    pub async fn silence(&self, period: Duration) {
        let step = (period / CHECKS_PER_PERIOD).max(Duration::from_millis(1));
        let mut check = tokio::time::interval_at(Instant::now() + step, step);
        // After a stall of the runtime, ticks come one step apart again, not back to back.
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seen = self.quiet_count();
        let mut since = Instant::now();
        loop {
            check.tick().await;
            let now = self.quiet_count();
            if now.is_none() || now != seen {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() >= period {
                return;
            }
        }
    }
}

/// For splices that count through an observer (an HBONE stream's): bytes from the TCP side
/// count as read, bytes to it as written.
impl SpliceObserver for Activity {
    fn moved_to_tunnel(&self, chunk: &[u8]) {
        self.add_read(chunk.len());
    }

    fn moved_from_tunnel(&self, chunk: &[u8]) {
        self.add_written(chunk.len());
    }
}

/// A socket whose reads and writes are counted in an [`Activity`].
pub struct Watched<T> {
    inner: T,
    activity: Activity,
    /// A slot of a bound on connections, released with the socket: after a WebSocket upgrade
    /// the socket outlives the HTTP connection.
    _slot: Option<OwnedSemaphorePermit>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        Watched {
            inner,
            activity,
            _slot: None,
        }
    }

    /// The same, holding `slot` for as long as the socket lives.
    pub fn holding(self, slot: OwnedSemaphorePermit) -> Self {
        Watched {
            _slot: Some(slot),
            ..self
        }
    }

    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.activity.add_written(*n);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.activity.add_read(n);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
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

/// Drives `conn` to its end. Once no byte has moved on it and no request was waiting for its
/// answer for a whole `period`, `shutdown` is called on it: hyper sends HTTP/2 a GOAWAY (and
/// waits for the client to answer its PING), closes an idle HTTP/1.1 connection, drops a
/// client that never sent a byte. If it is still open and silent one period later (a client
/// that neither reads nor answers), it is dropped (`None`). This is what ends an HTTP/2
/// connection, or one that never began a request, that a client leaves open without a word;
/// HTTP/1.1 heads already have hyper's header timer. Traffic keeps a connection open (an
/// answer streaming, a body trickling in), as it does with nginx's timeouts.
pub async fn until_idle<F: Future>(
    mut conn: Pin<&mut F>,
    activity: &Activity,
    period: Duration,
    shutdown: impl FnOnce(Pin<&mut F>),
) -> Option<F::Output> {
    // Biased towards the connection: after a stall, bytes waiting in the socket are counted
    // before the watchdog looks.
    tokio::select! {
        biased;
        r = conn.as_mut() => return Some(r),
        () = activity.silence(period) => shutdown(conn.as_mut()),
    }
    tokio::select! {
        biased;
        r = conn.as_mut() => Some(r),
        () = activity.silence(period) => None,
    }
}

/// How a spliced connection ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both directions were shut down by their senders, or a side failed.
    Done(io::Result<()>),
    /// Nothing moved either way for the idle timeout: both sockets were dropped.
    Idle,
}

/// A spliced connection's outcome, with the bytes `down` sent and received.
#[derive(Debug)]
pub struct Spliced {
    pub sent: u64,
    pub received: u64,
    pub end: SpliceEnd,
}

/// Copies `down` to `up` and back until both directions are done, or until no byte has moved
/// either way for `idle` (`None`: no limit); bytes are added to `meter` as they move.
pub async fn splice<D, U>(down: D, up: &mut U, idle: Option<Duration>, meter: Option<Meter>) -> Spliced
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let activity = meter.map(Activity::metered).unwrap_or_default();
    let mut down = Watched::new(down, activity.clone());
    let copy = tokio::io::copy_bidirectional(&mut down, up);
    let end = match idle {
        None => SpliceEnd::Done(copy.await.map(drop)),
        Some(period) => tokio::select! {
            biased;
            r = copy => SpliceEnd::Done(r.map(drop)),
            () = activity.silence(period) => SpliceEnd::Idle,
        },
    };
    let (sent, received) = activity.moved();
    Spliced { sent, received, end }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One stream's idle clock, shared by its request and response bodies: when a frame last
/// moved either way, and whether the stream timed out. Envoy's `stream_idle_timeout` is reset
/// by activity in either direction, so a client quiet while its answer streams (a gRPC
/// bidirectional call) is not idle, and a backend that stops its answer halfway is.
#[derive(Clone, Debug)]
pub struct StreamClock(Arc<Clock>);

#[derive(Debug)]
struct Clock {
    /// What `last_frame` counts from: an `Instant` cannot be stored atomically.
    origin: Instant,
    /// Nanoseconds from `origin` to the last frame either way (only ever moves forward).
    last_frame: AtomicU64,
    stalled: AtomicBool,
    period: Duration,
    /// Counts the stream once when it times out.
    timeouts: Counter,
}

impl StreamClock {
    /// A stream starting now, failed once silent for `period`; its time-out counted in
    /// `timeouts`.
    pub fn start(period: Duration, timeouts: Counter) -> Self {
        StreamClock(Arc::new(Clock {
            origin: Instant::now(),
            last_frame: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            period,
            timeouts,
        }))
    }

    /// Whether the stream timed out (for whoever sent a body on to read after the exchange
    /// failed: the error itself may reach them only as an upstream reset).
    pub fn stalled(&self) -> bool {
        self.0.stalled.load(Ordering::Relaxed)
    }

    /// Notes a frame now.
    fn touch(&self) {
        let since = Instant::now().saturating_duration_since(self.0.origin);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.0.last_frame.fetch_max(nanos, Ordering::Relaxed);
    }

    /// When the stream times out unless a frame moves first; `None`: a period too long for an
    /// `Instant` to hold, which never ends.
    fn deadline(&self) -> Option<Instant> {
        let last = Duration::from_nanos(self.0.last_frame.load(Ordering::Relaxed));
        self.0.origin.checked_add(last)?.checked_add(self.0.period)
    }

    /// Marks the stream timed out, counted once though both bodies may notice.
    fn stall(&self) {
        if !self.0.stalled.swap(true, Ordering::Relaxed) {
            self.0.timeouts.inc();
        }
    }

    fn error(&self) -> BoxError {
        Box::new(StreamIdleTimeout(self.0.period))
    }
}

/// One direction of a stream (a request body, or the backend's answer body) that fails once
/// its [`StreamClock`] saw no frame (data, trailers or an end) either way for its period, as
/// Envoy's `stream_idle_timeout` ends such a stream. Wrapping counts as a frame (the head
/// before the body), so a body that never sends its first byte times out too.
pub struct IdleBody<B> {
    inner: B,
    clock: StreamClock,
    /// Made the first time the body waits, so one that never waits (an answer read as fast as
    /// it comes) costs no timer. Boxed: a `Sleep` is `!Unpin`, and this keeps the body `Unpin`
    /// without unsafe code.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The error an [`IdleBody`] ends with.
#[derive(Debug, thiserror::Error)]
#[error("no frame either way for {0:?} (stream idle timeout)")]
pub struct StreamIdleTimeout(pub Duration);

impl<B> IdleBody<B> {
    /// `inner`, failed once `clock`'s stream is silent both ways for its period.
    pub fn new(inner: B, clock: &StreamClock) -> Self {
        clock.touch();
        IdleBody {
            inner,
            clock: clock.clone(),
            timer: None,
        }
    }

    /// Whether the period has passed since the stream's last frame; if not, the timer is set
    /// to when it will have (and polled, so it wakes the task then). Frames only note their
    /// time: the timer is moved when it fires rather than once per frame, and a frame the
    /// other direction moved is seen then, since a deadline only moves later.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.clock.deadline() else {
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        while timer.as_mut().poll(cx).is_ready() {
            let Some(deadline) = self.clock.deadline() else {
                return false;
            };
            if Instant::now() >= deadline {
                return true;
            }
            timer.as_mut().reset(deadline);
        }
        false
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = &mut *self;
        // The other direction timed out: the stream is over both ways.
        if this.clock.stalled() {
            return Poll::Ready(Some(Err(this.clock.error())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.clock.touch();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.expired(cx) => {
                this.clock.stall();
                Poll::Ready(Some(Err(this.clock.error())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    /// A splice between two in-memory pairs: (client end, backend end, the splice's task).
    fn spliced(idle: Option<Duration>) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<Spliced>) {
        spliced_metered(idle, None)
    }

    fn spliced_metered(
        idle: Option<Duration>,
        meter: Option<Meter>,
    ) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<Spliced>) {
        let (client, down) = tokio::io::duplex(4096);
        let (mut up, backend) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move { splice(down, &mut up, idle, meter).await });
        (client, backend, task)
    }

    async fn echo_once(from: &mut DuplexStream, to: &mut DuplexStream, bytes: &[u8]) {
        from.write_all(bytes).await.unwrap();
        let mut got = vec![0; bytes.len()];
        to.read_exact(&mut got).await.unwrap();
        assert_eq!(got, bytes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_splice_ends_after_its_idle_timeout_and_not_before() {
        let (mut client, mut backend, task) = spliced(Some(IDLE));
        echo_once(&mut client, &mut backend, b"hello").await;
        echo_once(&mut backend, &mut client, b"hi!").await;
        tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
        assert!(!task.is_finished(), "ended before its idle timeout");
        tokio::time::sleep(IDLE / CHECKS_PER_PERIOD + Duration::from_secs(2)).await;
        assert!(task.is_finished(), "silent past its idle timeout and still spliced");
        let s = task.await.unwrap();
        assert!(matches!(s.end, SpliceEnd::Idle), "{s:?}");
        assert_eq!((s.sent, s.received), (5, 3));
        // Both sockets went with it.
        assert_eq!(client.read(&mut [0; 8]).await.unwrap(), 0);
        assert_eq!(backend.read(&mut [0; 8]).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_in_either_direction_alone_keeps_a_splice_open() {
        for upload in [true, false] {
            let (mut client, mut backend, task) = spliced(Some(IDLE));
            for _ in 0..8 {
                // Just under the timeout apart, so each gap alone would not end it.
                tokio::time::sleep(IDLE * 3 / 4).await;
                match upload {
                    true => echo_once(&mut client, &mut backend, b"ping").await,
                    false => echo_once(&mut backend, &mut client, b"pong").await,
                }
            }
            assert!(!task.is_finished(), "upload {upload}: ended while bytes kept moving");
            drop(client);
            drop(backend);
            let s = task.await.unwrap();
            assert!(matches!(s.end, SpliceEnd::Done(Ok(()))), "{s:?}");
            let want = if upload { (32, 0) } else { (0, 32) };
            assert_eq!((s.sent, s.received), want, "upload {upload}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_splice_times_out_when_silent_and_not_while_the_other_way_streams() {
        let (mut client, _backend, task) = spliced(Some(IDLE));
        client.shutdown().await.unwrap();
        tokio::time::sleep(IDLE + IDLE / CHECKS_PER_PERIOD + Duration::from_secs(1)).await;
        assert!(task.is_finished(), "a half-closed, silent splice is still held");
        assert!(matches!(task.await.unwrap().end, SpliceEnd::Idle));

        let (mut client, mut backend, task) = spliced(Some(IDLE));
        client.shutdown().await.unwrap();
        for _ in 0..8 {
            tokio::time::sleep(IDLE * 3 / 4).await;
            echo_once(&mut backend, &mut client, b"more").await;
        }
        assert!(!task.is_finished(), "cut while the answer was still streaming");
    }

    #[tokio::test]
    async fn a_meter_sees_bytes_while_they_move() {
        let meter = Meter::default();
        let (mut client, mut backend, task) = spliced_metered(None, Some(meter.clone()));
        echo_once(&mut client, &mut backend, b"request").await;
        echo_once(&mut backend, &mut client, b"answer, longer").await;
        // Counted before the connection ends.
        assert_eq!((meter.to_destination.get(), meter.to_client.get()), (7, 14));
        drop((client, backend));
        let s = task.await.unwrap();
        assert_eq!((s.sent, s.received), (7, 14));
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_timeout_a_silent_splice_stays() {
        let (mut client, mut backend, task) = spliced(None);
        tokio::time::sleep(IDLE * 100).await;
        assert!(!task.is_finished());
        echo_once(&mut client, &mut backend, b"still here").await;
    }

    /// A request body whose frames the test sends; silent until it does.
    struct Fed(tokio::sync::mpsc::Receiver<bytes::Bytes>);

    impl Body for Fed {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            self.0.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    /// A body wrapped in an [`IdleBody`], being read to its end by a task.
    struct Reading {
        feed: tokio::sync::mpsc::Sender<bytes::Bytes>,
        read: tokio::task::JoinHandle<Result<bytes::Bytes, BoxError>>,
    }

    /// A stream's clock and the counter of its time-outs.
    fn stream_clock() -> (StreamClock, Counter) {
        let timeouts = Counter::default();
        (StreamClock::start(IDLE, timeouts.clone()), timeouts)
    }

    /// One direction of `clock`'s stream, read by a task.
    fn read_idle_body(clock: &StreamClock) -> Reading {
        use http_body_util::BodyExt;
        let (feed, rx) = tokio::sync::mpsc::channel(1);
        let body = IdleBody::new(Fed(rx), clock);
        let read = tokio::spawn(async move { body.collect().await.map(|c| c.to_bytes()) });
        Reading { feed, read }
    }

    fn assert_timed_out(read: Result<bytes::Bytes, BoxError>) {
        let err = read.expect_err("a silent body must fail");
        assert!(err.downcast_ref::<StreamIdleTimeout>().is_some(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_arrives_fails_at_the_stream_idle_timeout() {
        let (clock, timeouts) = stream_clock();
        // The feed is kept (never sent on): a closed one would end the body.
        let Reading { feed: _feed, read } = read_idle_body(&clock);
        tokio::time::sleep(IDLE - Duration::from_millis(1)).await;
        assert!(!read.is_finished(), "failed before its idle timeout");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(
            read.is_finished(),
            "a body silent past its idle timeout is still awaited"
        );
        assert_timed_out(read.await.unwrap());
        assert!(clock.stalled());
        assert_eq!(timeouts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_restarts_the_stream_idle_timeout() {
        let (clock, timeouts) = stream_clock();
        let Reading { feed, read } = read_idle_body(&clock);
        for _ in 0..8 {
            // Just under the timeout apart, so each gap alone would not end it.
            tokio::time::sleep(IDLE * 3 / 4).await;
            feed.send(bytes::Bytes::from_static(b"data")).await.unwrap();
        }
        drop(feed);
        assert_eq!(read.await.unwrap().unwrap().len(), 32);
        assert!(!clock.stalled());
        assert_eq!(timeouts.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_stops_halfway_fails_both_ways_and_is_counted_once() {
        let (clock, timeouts) = stream_clock();
        let request = read_idle_body(&clock);
        tokio::time::sleep(IDLE / 2).await;
        // The answer's head arrives (the body is wrapped), then one chunk, then nothing.
        let answer = read_idle_body(&clock);
        answer.feed.send(bytes::Bytes::from_static(b"half")).await.unwrap();
        let last_frame = Instant::now();
        tokio::time::sleep(IDLE - Duration::from_millis(1)).await;
        assert!(!answer.read.is_finished(), "failed before its idle timeout");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(
            answer.read.is_finished(),
            "an answer silent past the idle timeout is still awaited"
        );
        assert!(request.read.is_finished(), "its request outlived the stream");
        assert!(last_frame.elapsed() >= IDLE);
        assert_timed_out(answer.read.await.unwrap());
        assert_timed_out(request.read.await.unwrap());
        assert!(clock.stalled());
        assert_eq!(timeouts.get(), 1, "one stream, one time-out");
    }

    #[tokio::test(start_paused = true)]
    async fn frames_either_way_keep_the_other_direction_open() {
        // A quiet client while its answer streams (and a quiet answer while the upload does).
        for quiet_request in [true, false] {
            let (clock, timeouts) = stream_clock();
            let request = read_idle_body(&clock);
            let answer = read_idle_body(&clock);
            let busy = if quiet_request { &answer } else { &request };
            for _ in 0..8 {
                tokio::time::sleep(IDLE * 3 / 4).await;
                busy.feed.send(bytes::Bytes::from_static(b"more")).await.unwrap();
            }
            let quiet = if quiet_request { &request } else { &answer };
            assert!(
                !quiet.read.is_finished(),
                "quiet request {quiet_request}: cut while the other way moved"
            );
            assert_eq!(timeouts.get(), 0);
            drop((request, answer));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_not_silence() {
        let activity = Activity::default();
        let answering = activity.request();
        let silent = tokio::time::timeout(IDLE * 10, activity.silence(IDLE)).await;
        assert!(silent.is_err(), "silence declared while a request was being answered");
        drop(answering);
        let start = Instant::now();
        activity.silence(IDLE).await;
        let took = start.elapsed();
        assert!(took >= IDLE && took <= IDLE + IDLE / CHECKS_PER_PERIOD, "{took:?}");
    }
}
