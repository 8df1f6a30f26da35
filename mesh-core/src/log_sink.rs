//! Where log lines go: stdout, with access-log lines written in batches.
//!
//! A proxy writes an access-log line per request or per connection. Written as each is made,
//! every line is a `write(2)` on the request path: on a file, some µs of filesystem work per
//! request (profiled on the ingress gateway: 5 % of its CPU at 13k req/s); on a pipe that the
//! container runtime drains slowly, a runtime thread blocked. Here a line whose target is
//! [`ACCESS_TARGET`] is appended to a pending buffer, and a flusher thread writes the buffer
//! when [`Limits::flush_at`] bytes have gathered or [`Limits::flush_every`] has passed,
//! whichever comes first (Envoy's file access log is buffered the same way). Every other line
//! is written at once, after the access lines still pending, so the output keeps the order
//! in which lines were made.
//!
//! Bounds: at most [`Limits::max_pending`] bytes wait; a line that would pass it (the output
//! is stalled) is dropped and counted in [`LogSink::dropped`], which each binary exports, as
//! are lines a failed write lost. A crash loses at most the last `flush_every` of access
//! lines; an orderly exit calls [`LogSink::flush`].

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// The target of access-log events (`info!(target: "access", ...)`): the lines batched.
pub const ACCESS_TARGET: &str = "access";

/// When pending access lines are written, and how many may wait.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Write once this many bytes are pending.
    pub flush_at: usize,
    /// Write at least this often while lines are pending.
    pub flush_every: Duration,
    /// Drop (and count) a line that would make more than this many bytes pending.
    pub max_pending: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            flush_at: 64 * 1024,
            flush_every: Duration::from_millis(100),
            max_pending: 4 << 20,
        }
    }
}

/// A `MakeWriter` for the fmt subscriber: access lines batched, the rest written at once.
/// Cheap to clone; the flusher thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct LogSink(Arc<Shared>);

struct Shared {
    limits: Limits,
    /// Access lines made and not yet handed to the flusher.
    pending: Mutex<Vec<u8>>,
    /// Held while writing, so a batch and a line written at once cannot overtake each other.
    /// Lock order: `out`, then `pending`.
    out: Mutex<Output>,
    flusher: OnceLock<std::thread::Thread>,
    dropped: Counter,
}

struct Output {
    writer: Box<dyn Write + Send>,
    /// The buffer being written; swapped with `pending`, so neither is reallocated.
    batch: Vec<u8>,
}

impl LogSink {
    /// A sink writing to `writer`, with its flusher thread started.
    pub fn new(writer: impl Write + Send + 'static, limits: Limits) -> io::Result<LogSink> {
        let shared = Arc::new(Shared::new(Box::new(writer), limits));
        let weak = Arc::downgrade(&shared);
        let thread = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || flush_loop(weak, limits.flush_every))?;
        let _ = shared.flusher.set(thread.thread().clone());
        Ok(LogSink(shared))
    }

    /// The process's sink to stdout (a duplicate of fd 1, written without `Stdout`'s lock),
    /// made on first use. Falls back to `Stdout` when fd 1 cannot be duplicated, and to
    /// unbatched writes when the flusher thread cannot be started.
    pub fn stdout() -> &'static LogSink {
        static STDOUT: OnceLock<LogSink> = OnceLock::new();
        STDOUT.get_or_init(|| {
            let writer: Box<dyn Write + Send> = match io::stdout().as_fd().try_clone_to_owned() {
                Ok(fd) => Box::new(std::fs::File::from(fd)),
                Err(_) => Box::new(io::stdout()),
            };
            let limits = Limits::default();
            LogSink::new(writer, limits).unwrap_or_else(|e| {
                eprintln!("warning: no log flusher thread ({e}); access-log lines are written one by one");
                LogSink::unbatched(io::stdout(), limits)
            })
        })
    }

    /// A sink without a flusher: every line written at once.
    fn unbatched(writer: impl Write + Send + 'static, limits: Limits) -> LogSink {
        let limits = Limits { flush_at: 0, ..limits };
        LogSink(Arc::new(Shared::new(Box::new(writer), limits)))
    }

    /// Writes the pending access lines now (at exit, say).
    pub fn flush(&self) {
        self.0.write_out(&[]);
    }

    /// Lines dropped because too much was pending or a write failed.
    pub fn dropped(&self) -> Counter {
        self.0.dropped.clone()
    }

    /// Exports [`LogSink::dropped`] as `name` (`<binary>_log_lines_dropped`).
    pub fn register_dropped(&self, registry: &mut Registry, name: &str) {
        registry.register(
            name,
            "Log lines lost: the output stalled with too many access-log lines pending, or a write to it failed",
            self.dropped(),
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn flush_loop(shared: Weak<Shared>, every: Duration) {
    loop {
        std::thread::park_timeout(every);
        match shared.upgrade() {
            Some(s) => s.write_out(&[]),
            None => return,
        }
    }
}

impl Shared {
    fn new(writer: Box<dyn Write + Send>, limits: Limits) -> Shared {
        Shared {
            limits,
            pending: Mutex::new(Vec::new()),
            out: Mutex::new(Output {
                writer,
                batch: Vec::new(),
            }),
            flusher: OnceLock::new(),
            dropped: Counter::default(),
        }
    }

    /// Queues one access line; wakes the flusher when the buffer passes `flush_at`.
    fn queue(&self, line: &[u8]) {
        let mut pending = lock(&self.pending);
        let before = pending.len();
        if before + line.len() > self.limits.max_pending {
            drop(pending);
            self.dropped.inc();
            return;
        }
        pending.extend_from_slice(line);
        let crossed = before < self.limits.flush_at && pending.len() >= self.limits.flush_at;
        drop(pending);
        if crossed {
            match self.flusher.get() {
                Some(t) => t.unpark(),
                None => self.write_out(&[]),
            }
        }
    }

    /// Writes what is pending, then `line`, under the output lock.
    fn write_out(&self, line: &[u8]) {
        let mut out = lock(&self.out);
        let Output { writer, batch } = &mut *out;
        std::mem::swap(batch, &mut *lock(&self.pending));
        if !batch.is_empty() {
            if writer.write_all(batch).is_err() {
                self.dropped.inc_by(lines_in(batch));
            }
            batch.clear();
            // After a burst, give back what a steady load does not need.
            batch.shrink_to(self.limits.flush_at.saturating_mul(2));
        }
        if !line.is_empty() && writer.write_all(line).is_err() {
            self.dropped.inc_by(lines_in(line));
        }
    }
}

impl Drop for Shared {
    /// The last clone is gone: write what is left and let the flusher thread end.
    fn drop(&mut self) {
        self.write_out(&[]);
        if let Some(t) = self.flusher.get() {
            t.unpark();
        }
    }
}

fn lines_in(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count().max(1) as u64
}

/// One event's writer: the fmt subscriber formats a whole line and hands it over in one
/// `write_all`, so each `write` here is one line.
pub struct LineWriter<'a> {
    shared: &'a Shared,
    batched: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.batched {
            self.shared.queue(buf);
        } else {
            self.shared.write_out(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            shared: &self.0,
            batched: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            shared: &self.0,
            batched: self.0.limits.flush_at > 0 && meta.target() == ACCESS_TARGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A writer that records what it was given and tells the test each time.
    #[derive(Clone)]
    struct Recorder {
        written: Arc<Mutex<Vec<u8>>>,
        wrote: mpsc::Sender<usize>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.written).extend_from_slice(buf);
            let _ = self.wrote.send(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn recorder() -> (Recorder, mpsc::Receiver<usize>) {
        let (tx, rx) = mpsc::channel();
        let r = Recorder {
            written: Arc::default(),
            wrote: tx,
        };
        (r, rx)
    }

    fn text(r: &Recorder) -> String {
        String::from_utf8_lossy(&lock(&r.written)).into_owned()
    }

    /// A sink whose timer never fires during a test: only size and other lines flush.
    fn slow_limits(flush_at: usize, max_pending: usize) -> Limits {
        Limits {
            flush_at,
            flush_every: Duration::from_secs(3600),
            max_pending,
        }
    }

    fn emit(sink: &LogSink, target_access: bool, msg: &str) {
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_writer(sink.clone())
                .without_time()
                .with_ansi(false)
                .finish(),
        );
        tracing::dispatcher::with_default(&dispatch, || {
            if target_access {
                tracing::info!(target: "access", "{msg}");
            } else {
                tracing::warn!("{msg}");
            }
        });
    }

    #[test]
    fn access_lines_wait_and_other_lines_keep_the_order() {
        let (r, _rx) = recorder();
        let sink = LogSink::new(r.clone(), slow_limits(1 << 20, 1 << 20)).unwrap();
        emit(&sink, true, "first access");
        emit(&sink, true, "second access");
        assert_eq!(text(&r), "", "access lines wait for the flusher");
        emit(&sink, false, "a warning");
        let out = text(&r);
        let order: Vec<_> = ["first access", "second access", "a warning"]
            .iter()
            .map(|m| out.find(m).unwrap_or_else(|| panic!("{m} missing in {out:?}")))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "out of order: {out:?}");
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting_for_the_timer() {
        let (r, rx) = recorder();
        let sink = LogSink::new(r.clone(), slow_limits(200, 1 << 20)).unwrap();
        for i in 0..20 {
            emit(&sink, true, &format!("access line {i}"));
        }
        rx.recv_timeout(Duration::from_secs(10)).expect("the flusher wrote");
        assert!(text(&r).contains("access line 0"));
    }

    #[test]
    fn the_timer_writes_a_lone_line() {
        let (r, rx) = recorder();
        let limits = Limits {
            flush_every: Duration::from_millis(10),
            ..slow_limits(1 << 20, 1 << 20)
        };
        let sink = LogSink::new(r.clone(), limits).unwrap();
        emit(&sink, true, "lone");
        rx.recv_timeout(Duration::from_secs(10)).expect("the timer flushed");
        assert!(text(&r).contains("lone"));
    }

    #[test]
    fn a_stalled_output_drops_and_counts_past_the_bound() {
        let (r, _rx) = recorder();
        let sink = LogSink::new(r.clone(), slow_limits(1 << 20, 300)).unwrap();
        for i in 0..20 {
            emit(&sink, true, &format!("access line {i:02}"));
        }
        let dropped = sink.dropped().get();
        assert!(dropped > 0 && dropped < 20, "dropped {dropped}");
        sink.flush();
        let kept = text(&r).lines().count() as u64;
        assert_eq!(kept + dropped, 20, "every line written or counted");
        assert!(text(&r).len() <= 300);
    }

    #[test]
    fn a_failed_write_counts_its_lines() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = LogSink::new(Broken, slow_limits(1 << 20, 1 << 20)).unwrap();
        emit(&sink, true, "one");
        emit(&sink, true, "two");
        emit(&sink, false, "three");
        assert_eq!(sink.dropped().get(), 3);
    }

    #[test]
    fn flush_writes_what_is_pending() {
        let (r, _rx) = recorder();
        let sink = LogSink::new(r.clone(), slow_limits(1 << 20, 1 << 20)).unwrap();
        emit(&sink, true, "pending");
        sink.flush();
        assert!(text(&r).contains("pending"));
    }
}
