//! The waypoint binary: flags and environment to [`waypoint::config::Config`], logging, run.

#[tokio::main]
async fn main() {
    let cfg = match waypoint::config::Config::load() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log).unwrap_or_else(|e| {
        eprintln!("warning: invalid log filter {:?} ({e}); using info", cfg.log);
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .json()
        .flatten_event(true)
        .with_writer(stdout_writer())
        .init();
    if let Err(e) = waypoint::app::run(cfg).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Log lines go to a duplicate of stdout, written without `std::io::Stdout`'s lock: the
/// subscriber formats a whole line and hands it over in one `write_all`, so each line is one
/// `write(2)` as before, but the request path's two runtime threads no longer wait on each
/// other for the lock (the access log writes a line per request; profiled, the contended lock
/// cost a futex wait per request). Falls back to stdout itself when fd 1 cannot be duplicated.
fn stdout_writer() -> tracing_subscriber::fmt::writer::BoxMakeWriter {
    use std::os::fd::AsFd;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => {
            let file = std::sync::Arc::new(std::fs::File::from(fd));
            BoxMakeWriter::new(move || SharedFile(file.clone()))
        }
        Err(_) => BoxMakeWriter::new(std::io::stdout),
    }
}

/// `&File` writes without a lock; an `Arc` lets every event have its own writer.
struct SharedFile(std::sync::Arc<std::fs::File>);

impl std::io::Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
