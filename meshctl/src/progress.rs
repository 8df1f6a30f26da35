//! Progress for long operations, on stderr: a spinner line rewritten in place when stderr
//! is a terminal, otherwise a line every ten seconds so logs show the wait.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// One long wait being reported.
pub struct Progress {
    what: String,
    started: Instant,
    last_line: Instant,
    tty: bool,
    tick: usize,
}

impl Progress {
    pub fn start(what: impl Into<String>) -> Progress {
        let p = Progress {
            what: what.into(),
            started: Instant::now(),
            last_line: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            tick: 0,
        };
        if !p.tty {
            eprintln!("{}...", p.what);
        }
        p
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Call regularly while waiting; `detail` is shown after the elapsed time.
    pub fn tick(&mut self, detail: &str) {
        let secs = self.started.elapsed().as_secs();
        if self.tty {
            const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
            self.tick = self.tick.wrapping_add(1);
            let frame = FRAMES[self.tick % FRAMES.len()];
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{frame} {} ({secs}s) {detail}", self.what);
            let _ = err.flush();
        } else if self.last_line.elapsed() >= Duration::from_secs(10) {
            self.last_line = Instant::now();
            eprintln!("  still {} ({secs}s) {detail}", self.what);
        }
    }

    /// Ends the progress display with a final message.
    pub fn finish(self, message: &str) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{message} ({:.1}s)", self.started.elapsed().as_secs_f64());
    }
}
