//! The addresses of this network namespace, refreshed periodically so that a workload whose
//! address appears later (or moves away) is served correctly.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

#[derive(Clone)]
pub struct LocalAddrs(Arc<ArcSwap<HashSet<IpAddr>>>);

/// The addresses of the current thread's network namespace.
pub fn read() -> HashSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return HashSet::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

impl LocalAddrs {
    pub fn discover() -> Self {
        LocalAddrs(Arc::new(ArcSwap::from_pointee(read())))
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
            let now = read();
            if **self.0.load() != now {
                tracing::info!(addresses = ?now, "local addresses changed");
                self.0.store(Arc::new(now));
            }
        }
    }
}
