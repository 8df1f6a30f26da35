//! Logging for the plugin. stdout belongs to the CNI protocol, so logs go to the optional
//! `logFile` (everything) and to stderr (warnings and errors only: the runtime shows a
//! plugin's stderr to operators, so routine lines there would be noise).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// Writes log lines tagged with the invocation's context (command, container, pod).
#[derive(Debug, Default)]
pub struct Logger {
    file: Option<File>,
    context: String,
}

impl Logger {
    pub fn new() -> Self {
        Logger::default()
    }

    /// Also append to `path` from now on. Failing to open it is reported on stderr and
    /// otherwise ignored: logging must never fail a pod.
    pub fn open_file(&mut self, path: &Path) {
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => self.file = Some(f),
            Err(e) => self.write(Level::Warn, &format!("cannot open log file {}: {e}", path.display())),
        }
    }

    /// Set the `key=value` context printed on every line.
    pub fn set_context(&mut self, context: String) {
        self.context = context;
    }

    pub fn info(&mut self, msg: &str) {
        self.write(Level::Info, msg);
    }

    pub fn warn(&mut self, msg: &str) {
        self.write(Level::Warn, msg);
    }

    pub fn error(&mut self, msg: &str) {
        self.write(Level::Error, msg);
    }

    fn write(&mut self, level: Level, msg: &str) {
        let sep = if self.context.is_empty() { "" } else { " " };
        let line = format!(
            "{} {} ambient-cni[{}]{sep}{}: {msg}\n",
            timestamp(),
            level.as_str(),
            std::process::id(),
            self.context
        );
        if let Some(f) = self.file.as_mut() {
            // One write per line so concurrent plugin processes do not interleave.
            let _ = f.write_all(line.as_bytes());
        }
        if level >= Level::Warn {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }
}

/// RFC 3339 UTC timestamp with milliseconds, without pulling in a date crate.
fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let millis = now.subsec_millis();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
