//! Where proxy sockets come from. Dedicated mode makes ordinary sockets in ztunnel's own
//! network namespace; in-pod mode (driven by ZDS) makes them inside each pod's namespace.
//! Either way every socket carries the mesh mark so redirection rules let it through.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub use crate::capture::MESH_MARK;

/// Creates listeners and outbound sockets for one network namespace.
pub trait SocketFactory: Send + Sync + 'static {
    /// A TCP socket for connecting to `dst`.
    fn tcp_socket(&self, dst: SocketAddr) -> io::Result<TcpSocket>;
    /// A listening socket bound to `addr`.
    fn tcp_listener(&self, addr: SocketAddr) -> io::Result<TcpListener>;
    /// A UDP socket bound to `addr` (port 0 for an upstream query socket).
    fn udp_socket(&self, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket>;
}

/// Sockets in the current network namespace.
#[derive(Clone, Debug, Default)]
pub struct PlainSockets {
    /// SO_MARK to set (needs CAP_NET_ADMIN); None leaves sockets unmarked.
    pub mark: Option<u32>,
}

impl SocketFactory for PlainSockets {
    fn tcp_socket(&self, dst: SocketAddr) -> io::Result<TcpSocket> {
        let s = Socket::new(
            Domain::for_address(dst),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        if let Some(m) = self.mark {
            s.set_mark(m)?;
        }
        s.set_nodelay(true)?;
        Ok(TcpSocket::from_std_stream(s.into()))
    }

    fn tcp_listener(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let s = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        if let Some(m) = self.mark {
            s.set_mark(m)?;
        }
        // A new ztunnel binds beside the old one during an upgrade.
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())?;
        s.listen(1024)?;
        TcpListener::from_std(s.into())
    }

    fn udp_socket(&self, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let s = Socket::new(
            Domain::for_address(addr),
            Type::DGRAM.nonblocking(),
            Some(Protocol::UDP),
        )?;
        if let Some(m) = self.mark {
            s.set_mark(m)?;
        }
        if addr.port() != 0 {
            // A listener: a new ztunnel binds beside the old one during an upgrade.
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
        }
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())?;
        tokio::net::UdpSocket::from_std(s.into())
    }
}

/// Connects to `dst` from `src` (a foreign address) when the kernel allows IP_TRANSPARENT,
/// so the application sees the real client address; falls back to an ordinary source.
pub async fn connect_from(
    factory: &dyn SocketFactory,
    src: Option<IpAddr>,
    dst: SocketAddr,
) -> io::Result<(TcpStream, bool)> {
    let sock = factory.tcp_socket(dst)?;
    let mut transparent = false;
    if let Some(src) = src.filter(|s| s.is_ipv4() == dst.is_ipv4()) {
        let sref = SockRef::from(&sock);
        let ok = if src.is_ipv4() {
            sref.set_ip_transparent(true).and_then(|_| sref.set_freebind(true))
        } else {
            set_ipv6_transparent(&sref).and_then(|_| sref.set_freebind_ipv6(true))
        };
        if ok.is_ok() && sock.bind(SocketAddr::new(src, 0)).is_ok() {
            transparent = true;
        }
    }
    if !transparent && src.is_some() {
        // Binding failed half way: start from a clean socket.
        let sock = factory.tcp_socket(dst)?;
        return Ok((sock.connect(dst).await?, false));
    }
    Ok((sock.connect(dst).await?, transparent))
}

fn set_ipv6_transparent(s: &SockRef<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: nix::libc::c_int = 1;
    // SAFETY: a valid fd and a pointer/length pair to a live c_int; IPV6_TRANSPARENT has no
    // safe wrapper in socket2 or nix.
    let rc = unsafe {
        nix::libc::setsockopt(
            s.as_raw_fd(),
            nix::libc::SOL_IPV6,
            nix::libc::IPV6_TRANSPARENT,
            &one as *const nix::libc::c_int as *const nix::libc::c_void,
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The destination a connection had before it was redirected (SO_ORIGINAL_DST).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr()?;
    let addr = if local.is_ipv4() {
        let a = getsockopt(stream, sockopt::OriginalDst)?;
        SocketAddr::new(
            IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()),
            u16::from_be(a.sin_port),
        )
    } else {
        let a = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
        let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).to_canonical();
        SocketAddr::new(ip, u16::from_be(a.sin6_port))
    };
    Ok(addr)
}

/// What an accept loop does after `accept` failed. Running out of file descriptors or memory
/// makes every `accept` fail at once until something is freed: the loop waits, doubling from
/// 10 ms to 1 s, instead of spinning a core and flooding the log. Anything else (a connection
/// aborted before it was accepted) is retried at once. Failures are logged at most once per
/// 10 s with the number suppressed.
pub struct AcceptBackoff {
    delay: std::time::Duration,
    log: crate::log_limit::LogLimiter,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            delay: Self::FIRST,
            log: crate::log_limit::LogLimiter::new(std::time::Duration::from_secs(10)),
        }
    }
}

impl AcceptBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(10);
    const MAX: std::time::Duration = std::time::Duration::from_secs(1);

    /// Whether `e` means the process or system ran out of a resource.
    pub fn is_exhaustion(e: &io::Error) -> bool {
        use nix::libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
        matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
    }

    /// Logs (rate-limited) and waits as `e` deserves; returns how long it waited.
    pub async fn failed(&mut self, listener: &str, e: &io::Error) -> std::time::Duration {
        if let Some(suppressed) = self.log.check("accept") {
            tracing::warn!(listener, error = %e, suppressed, "accept failed");
        }
        if !Self::is_exhaustion(e) {
            return std::time::Duration::ZERO;
        }
        let wait = self.delay;
        self.delay = (self.delay * 2).min(Self::MAX);
        tokio::time::sleep(wait).await;
        wait
    }

    /// A connection was accepted: the next failure starts from the shortest wait again.
    pub fn succeeded(&mut self) {
        self.delay = Self::FIRST;
    }
}

#[cfg(test)]
mod accept_backoff_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn exhaustion_waits_longer_each_time_and_resets_after_success() {
        let mut b = AcceptBackoff::default();
        let emfile = io::Error::from_raw_os_error(nix::libc::EMFILE);
        let mut got = Vec::new();
        for _ in 0..9 {
            got.push(b.failed("test", &emfile).await.as_millis());
        }
        assert_eq!(got, vec![10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed("test", &emfile).await.as_millis(), 10);
        let aborted = io::Error::from_raw_os_error(nix::libc::ECONNABORTED);
        assert_eq!(b.failed("test", &aborted).await, std::time::Duration::ZERO);
    }
}
