//! How a proxy binary runs: its tokio runtime, sized alike in ztunnel and the waypoint, and
//! glibc malloc's settings for ztunnel (the waypoint links mimalloc instead: its binary says
//! why).
//!
//! On a node with one or two CPUs the proxy shares them with the applications it serves. A
//! second worker thread there buys no parallelism, only wake-ups across cores: every task
//! woken on the other worker is a futex, an IPI and a context switch. So "auto" runs one
//! thread there, two on larger nodes, and an explicit count overrides it.

use std::io;

/// The runtime flag both proxies flatten into their configuration.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RuntimeArgs {
    /// Proxy threads. 1 runs a single-threaded runtime (no cross-core wake-ups); 0 picks 1 on
    /// nodes with up to 2 CPUs (where the proxy shares cores with the apps) and 2 otherwise.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

impl RuntimeArgs {
    /// Worker threads after resolving 0 ("auto") against this machine's CPUs.
    pub fn threads(&self) -> usize {
        threads_for(
            self.worker_threads,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )
    }

    /// The runtime: single-threaded for one worker, multi-threaded otherwise; I/O and
    /// timers enabled.
    pub fn build(&self) -> io::Result<tokio::runtime::Runtime> {
        let mut builder = match self.threads() {
            1 => tokio::runtime::Builder::new_current_thread(),
            n => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n);
                b
            }
        };
        builder.enable_all().build()
    }
}

/// `requested` workers (0 = auto) on a machine with `cpus`.
fn threads_for(requested: usize, cpus: usize) -> usize {
    match (requested, cpus) {
        (0, 0..=2) => 1,
        (0, _) => 2,
        (n, _) => n,
    }
}

/// Fixes glibc malloc's thresholds for a proxy's data path. With the default, dynamic ones
/// the receiving side's buffers churn: h2 reserves each DATA frame whole (128 KiB + 9 bytes
/// from our peers, just over the initial 128 KiB mmap threshold), and freeing them trims the
/// heap top, so the next frames fault fresh pages in (perf: page faults, clear_page and
/// unmapping were ~8-10 % of the receiving ztunnel's CPU in a bulk transfer). With these,
/// buffers up to 2 MiB stay in the heap and only more than 4 MiB free at its top is returned
/// at once. Call it before other threads run.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc malloc parameters; it is called before other threads run.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 2 << 20);
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::threads_for;

    #[test]
    fn auto_is_one_thread_on_small_nodes_and_two_on_larger_ones() {
        let cases = [(0, 1, 1), (0, 2, 1), (0, 3, 2), (0, 64, 2), (1, 64, 1), (4, 2, 4)];
        for (requested, cpus, want) in cases {
            assert_eq!(
                threads_for(requested, cpus),
                want,
                "{requested} requested on {cpus} CPUs"
            );
        }
    }
}
