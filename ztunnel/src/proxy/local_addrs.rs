//! The addresses of this network namespace, refreshed periodically so that a workload whose
//! address appears later (or moves away) is served correctly. A failed read (out of file
//! descriptors, say) keeps the last known set: an empty set would refuse every valid
//! connection with a misleading reason.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

/// Refresh failures repeat every period while they last: logged once a minute.
static REFRESH_FAILURES: std::sync::LazyLock<mesh_core::log_limit::LogLimiter> =
    std::sync::LazyLock::new(|| mesh_core::log_limit::LogLimiter::new(Duration::from_secs(60)));

#[derive(Clone)]
pub struct LocalAddrs(Arc<ArcSwap<HashSet<IpAddr>>>);

/// The addresses of the current thread's network namespace.
pub fn read() -> nix::Result<HashSet<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

impl LocalAddrs {
    /// The current namespace's addresses; fails when they cannot be read at start.
    pub fn discover() -> nix::Result<Self> {
        Ok(LocalAddrs(Arc::new(ArcSwap::from_pointee(read()?))))
    }

    /// A fixed set (a pod's addresses, read once inside its namespace).
    pub fn fixed(addrs: HashSet<IpAddr>) -> Self {
        LocalAddrs(Arc::new(ArcSwap::from_pointee(addrs)))
    }

    /// Replaces the set.
    pub fn set(&self, addrs: HashSet<IpAddr>) {
        self.0.store(Arc::new(addrs));
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_canonical(),
            v4 => v4,
        };
        self.0.load().contains(&ip)
    }

    /// Re-reads the interface addresses every `every`.
    pub async fn refresh(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let now = match read() {
                Ok(now) => now,
                Err(e) => {
                    if let Some(suppressed) = REFRESH_FAILURES.check("getifaddrs") {
                        tracing::warn!(error = %e, suppressed, "cannot read local addresses; keeping the last known");
                    }
                    continue;
                }
            };
            if **self.0.load() != now {
                tracing::info!(addresses = ?now, "local addresses changed");
                self.0.store(Arc::new(now));
            }
        }
    }
}
