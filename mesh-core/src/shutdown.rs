//! The one shutdown signal of every long-running binary: SIGTERM (what the kubelet sends) or
//! SIGINT (Ctrl-C), so each binary drains the same way whichever stopped it.

use std::future::Future;

use tokio::signal::unix::{signal, SignalKind};

/// Resolves on the first SIGTERM or SIGINT.
///
/// The SIGTERM handler is installed when this is called, not when the future is first
/// polled, so a SIGTERM arriving between the call and the first poll is not the default
/// "terminate now". Must be called inside a Tokio runtime. If SIGTERM cannot be watched,
/// a warning says so and only Ctrl-C stops the process.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let term = signal(SignalKind::terminate())
        .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process"))
        .ok();
    async move {
        match term {
            Some(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn sigterm_resolves_it() {
        let stop = shutdown_signal();
        // The handler is in place before the first poll: raising SIGTERM now does not kill the
        // test process, and the future resolves.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise SIGTERM");
        tokio::time::timeout(Duration::from_secs(10), stop)
            .await
            .expect("SIGTERM resolves the shutdown future");
    }
}
