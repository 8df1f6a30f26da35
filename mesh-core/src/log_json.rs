//! JSON log lines, written straight into the line buffer.
//!
//! The binaries log JSON as tracing-subscriber's `json().flatten_event(true)` formats it:
//! `{"timestamp":…,"level":…,<the event's fields in order>,"target":…}`. That formatter hands
//! each token through serde_json to an `io::Write` adaptor that checks it is UTF-8 again and
//! copies it into the line; profiled on the ingress gateway, an access-log line cost ~4 µs of
//! CPU that way, per request. [`JsonLines`] writes the same bytes directly: strings escaped as
//! serde_json escapes them, numbers as serde_json prints them (floats by the same shortest
//! representation), `Debug`/`Display` values formatted into the line through the escaper, the
//! timestamp's date and second formatted once a second ([`Seconds`]). An
//! event inside a span, or one forwarded from the `log` crate, goes to the stock formatter, so
//! every line reads exactly as before (pinned by `the_same_line_as_the_stock_formatter`).

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::time::UNIX_EPOCH;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter: `fmt::layer().json().flatten_event(true).event_format(JsonLines::default())`.
pub struct JsonLines<T = Seconds> {
    timer: T,
    stock: Format<Json, T>,
}

impl Default for JsonLines {
    fn default() -> JsonLines {
        JsonLines::with_timer(Seconds)
    }
}

/// The stock clock's text (`SystemTime`: `2026-12-06T23:00:00.123456Z`, UTC, microseconds),
/// with the date and time to the second formatted once per second per thread instead of on
/// every line (the civil-date arithmetic and padded `write!`s were a fifth of a line's cost).
#[derive(Debug, Clone, Copy, Default)]
pub struct Seconds;

/// `YYYY-MM-DDTHH:MM:SS`.
const SECOND_LEN: usize = 19;

thread_local! {
    static SECOND: Cell<(u64, [u8; SECOND_LEN])> = const { Cell::new((u64::MAX, [0; SECOND_LEN])) };
}

impl FormatTime for Seconds {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let Ok(now) = std::time::SystemTime::now().duration_since(UNIX_EPOCH) else {
            return SystemTime.format_time(w);
        };
        let secs = now.as_secs();
        let (cached, mut text) = SECOND.get();
        if cached != secs {
            match second(secs) {
                Some(t) => text = t,
                None => return SystemTime.format_time(w),
            }
            SECOND.set((secs, text));
        }
        w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)?;
        let mut frac = *b".000000Z";
        let mut micros = now.subsec_micros();
        for d in frac[1..7].iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        w.write_str(std::str::from_utf8(&frac).map_err(|_| fmt::Error)?)
    }
}

/// `secs` after the epoch as `YYYY-MM-DDTHH:MM:SS` (UTC); `None` past year 9999, which the
/// stock clock writes its own way.
fn second(secs: u64) -> Option<[u8; SECOND_LEN]> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    let mut out = [0u8; SECOND_LEN];
    let text = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if text.len() != SECOND_LEN {
        return None;
    }
    out.copy_from_slice(text.as_bytes());
    Some(out)
}

impl<T: FormatTime + Clone> JsonLines<T> {
    /// With another clock (tests pin the timestamp).
    pub fn with_timer(timer: T) -> JsonLines<T> {
        let stock = tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_timer(timer.clone());
        JsonLines { timer, stock }
    }
}

impl<S, N, T> FormatEvent<S, N> for JsonLines<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    T: FormatTime,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        // As the stock formatter decides: the explicit parent, else the current span.
        let in_span = event.parent().is_some() || ctx.lookup_current().is_some();
        // `log` records carry their real target and level in fields the stock formatter
        // normalises.
        if in_span || meta.target() == "log" {
            return self.stock.format_event(ctx, w, event);
        }
        w.write_str("{\"timestamp\":\"")?;
        let mut escaped = Escaped(w.by_ref());
        self.timer.format_time(&mut Writer::new(&mut escaped))?;
        write!(w, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = Fields {
            w: w.by_ref(),
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        string(&mut w, meta.target())?;
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct Fields<'a> {
    w: Writer<'a>,
    result: fmt::Result,
}

impl Fields<'_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.w.write_char(',')?;
                string(&mut self.w, field.name())?;
                self.w.write_char(':')?;
                value(&mut self.w)
            })();
        }
    }
}

impl Visit for Fields<'_> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's rendering: the shortest representation that reads back the same,
        // `null` for NaN and infinities.
        self.entry(field, |w| match serde_json::Number::from_f64(value) {
            Some(n) => write!(w, "{n}"),
            None => w.write_str("null"),
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| string(w, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w.by_ref()), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn string(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w.by_ref()).write_str(s)?;
    w.write_char('"')
}

/// A writer that escapes what passes through it as serde_json does inside a string: `"`,
/// `\`, and control characters (`\b \t \n \f \r`, others as `\u00XX`); everything else,
/// non-ASCII included, as it is.
struct Escaped<'a>(Writer<'a>);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone)]
    struct FixedTime;
    impl FormatTime for FixedTime {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-12-06T23:00:00.123456Z")
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `emit` logs, formatted by ours and by the stock formatter.
    fn both(emit: impl Fn()) -> (String, String) {
        let ours = Lines::default();
        let stock = Lines::default();
        let (o, s) = (ours.clone(), stock.clone());
        let ours_sub = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .event_format(JsonLines::with_timer(FixedTime))
            .with_writer(move || o.clone())
            .finish();
        let stock_sub = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_timer(FixedTime)
            .with_writer(move || s.clone())
            .finish();
        tracing::subscriber::with_default(ours_sub, &emit);
        tracing::subscriber::with_default(stock_sub, &emit);
        let text = |l: Lines| String::from_utf8(l.0.lock().unwrap().clone()).unwrap();
        (text(ours), text(stock))
    }

    #[test]
    fn the_same_line_as_the_stock_formatter() {
        let hostile = "quote\" back\\slash\nnew\rline\ttab\u{8}\u{c}\u{0}\u{1f}\u{7f} é ✓ \u{1F600}";
        let addr: std::net::SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let (ours, stock) = both(|| {
            tracing::info!(target: "access", src_addr = %addr, path = hostile, status = 200u16, attempts = 1u32,
                delta = -3i64, ok = true, duration_ms = 0.1 + 0.2, big = 1e21, tiny = 1e-7, whole = 2.0,
                nan = f64::NAN, inf = f64::INFINITY, huge = u128::MAX, debug = ?Some(hostile), "request");
            tracing::warn!(error = %format!("bad {hostile}"), "refused: {}", hostile);
            tracing::error!("no fields");
        });
        assert_eq!(ours.lines().count(), 3, "{ours}");
        assert_eq!(ours, stock);
        for line in ours.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        }
    }

    #[test]
    fn events_in_spans_read_as_before() {
        let (ours, stock) = both(|| {
            let span = tracing::info_span!("conn", id = 7, peer = "a\"b");
            let _entered = span.enter();
            tracing::info!(target: "access", bytes = 10, "done");
            // An explicit root still shows the current span in the stock format.
            tracing::info!(parent: None, "root");
        });
        assert!(ours.contains("\"spans\""), "{ours}");
        assert_eq!(ours, stock);
    }

    #[test]
    fn seconds_as_the_stock_clock_writes_them() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_234_567_890, "2009-02-13T23:31:30"),
            (1_796_598_000, "2026-12-06T23:00:00"),
            (4_102_444_799, "2099-12-31T23:59:59"),
        ] {
            assert_eq!(
                second(secs)
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .as_deref(),
                Some(text)
            );
        }
        assert_eq!(second(253_402_300_800), None, "year 10000 is left to the stock clock");
        // Now, against the stock clock: the same shape and second (retried across a tick).
        let show = |t: &dyn FormatTime| {
            let mut s = String::new();
            t.format_time(&mut Writer::new(&mut s)).unwrap();
            s
        };
        let same = (0..10).any(|_| {
            let (stock, ours) = (show(&SystemTime), show(&Seconds));
            assert_eq!(ours.len(), stock.len(), "{ours} vs {stock}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[SECOND_LEN] == b'.', "{ours}");
            stock[..SECOND_LEN] == ours[..SECOND_LEN]
        });
        assert!(same, "never the same second as the stock clock");
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_escaped_as_serde_json_does(s in "\\PC*|[\\x00-\\x1f\"\\\\]{0,8}") {
            let (ours, stock) = both(|| tracing::info!(value = s.as_str(), shown = %s, "m"));
            proptest::prop_assert_eq!(ours, stock);
        }
    }
}
