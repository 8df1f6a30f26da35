//! ztunnel's configuration: one typed struct from flags and environment, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mesh_core::capture;
pub use mesh_core::control_plane_args::DEFAULT_CONTROL_PLANE_IDENTITY;
use mesh_core::control_plane_args::{uses_tls, ControlPlaneArgs};

/// Default listeners of ztunnel's own HTTP endpoints: admin (state and log level, localhost
/// only), Prometheus metrics and readiness (reachable by scrapers and the kubelet).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_STATS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Node proxy of the ambient mesh.
#[derive(Clone, Debug, Parser)]
#[command(name = "ztunnel", version, about)]
pub struct Config {
    /// Name of the node this proxy serves (workloads with this node are local).
    #[arg(long, env = "NODE_NAME", default_value = "local")]
    pub node_name: String,
    /// Network of local workloads (empty = default network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,

    /// Workload state from a local YAML file instead of xDS (watched for changes).
    #[arg(long, env = "LOCAL_XDS_PATH", conflicts_with = "xds_address")]
    pub local_xds_path: Option<PathBuf>,
    /// In-pod mode: connect to the node agent's ZDS socket and serve each pod it hands over
    /// inside the pod's own network namespace. Without it, ztunnel serves the workloads of its
    /// own namespace (dedicated mode).
    #[arg(long, env = "ZDS_SOCKET")]
    pub zds_socket: Option<PathBuf>,
    /// In-pod mode: port of the DNS proxy in each pod (the node agent redirects port 53 to
    /// it); 0 turns the proxy off.
    #[arg(long, env = "DNS_PORT", default_value_t = capture::DNS_PORT)]
    pub dns_port: u16,
    /// Resolvers for names the mesh does not answer (default: the nameservers of
    /// /etc/resolv.conf).
    #[arg(long, env = "DNS_UPSTREAM", value_delimiter = ',')]
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// DNS suffix of service hostnames.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// xDS and CA addresses, token, trust bundle, control plane identity.
    #[command(flatten)]
    pub control_plane: ControlPlaneArgs,

    /// Development CA: root certificate (PEM). With --ca-root-key, certificates are signed
    /// locally instead of by the mesh CA.
    #[arg(long, env = "CA_ROOT_CERT", requires = "ca_root_key", conflicts_with = "ca_address")]
    pub ca_root_cert: Option<PathBuf>,
    /// Development CA: root key (PEM, PKCS#8).
    #[arg(long, env = "CA_ROOT_KEY", requires = "ca_root_cert")]
    pub ca_root_key: Option<PathBuf>,
    /// Lifetime requested for workload certificates, in seconds.
    #[arg(long, env = "CERT_TTL_SECONDS", default_value_t = 24 * 3600)]
    pub cert_ttl_seconds: u64,

    /// Outbound capture port.
    #[arg(long, env = "OUTBOUND_PORT", default_value_t = capture::OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Inbound plaintext port.
    #[arg(long, env = "INBOUND_PLAINTEXT_PORT", default_value_t = capture::INBOUND_PLAINTEXT_PORT)]
    pub inbound_plaintext_port: u16,
    /// Inbound HBONE port.
    #[arg(long, env = "INBOUND_PORT", default_value_t = capture::HBONE_PORT)]
    pub inbound_port: u16,
    /// Port of HBONE on remote workloads.
    #[arg(long, env = "HBONE_PORT", default_value_t = capture::HBONE_PORT)]
    pub hbone_port: u16,
    /// Admin server (/config_dump, /logging): a loopback address only, since it reveals every
    /// workload, policy and certificate and changes the log level.
    #[arg(long, env = "ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics, /stats/prometheus only).
    #[arg(long, env = "STATS_ADDR", default_value = DEFAULT_STATS_ADDR)]
    pub stats_addr: SocketAddr,
    /// Readiness probe (/healthz/ready only).
    #[arg(long, env = "READINESS_ADDR", default_value = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
    /// Also listen on IPv6 (dual stack); failures to bind IPv6 are logged, not fatal.
    #[arg(long, env = "IPV6", default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6: bool,

    /// SO_MARK set on every proxy socket so capture rules skip it (0 disables).
    #[arg(long, env = "SOCKET_MARK", default_value_t = capture::MESH_MARK)]
    pub socket_mark: u32,
    /// On SIGTERM, how long live connections may take to finish.
    #[arg(long, env = "DRAIN_SECONDS", default_value_t = 30)]
    pub drain_seconds: u64,
    /// Idle pooled HBONE connections are closed after this many seconds.
    #[arg(long, env = "POOL_IDLE_SECONDS", default_value_t = 300)]
    pub pool_idle_seconds: u64,
    #[command(flatten)]
    pub peer_limits: mesh_core::hbone::limits::PeerLimitArgs,
    /// Connections the outbound listeners (15001) of all pods may hold from one source
    /// workload address; beyond it a new one is closed at once and counted
    /// (`outbound_per_source_limit`). Each holds two descriptors.
    #[arg(long, env = "MAX_OUTBOUND_CONNECTIONS_PER_SOURCE", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_outbound_connections_per_source: u32,
    /// Connections the outbound listeners of all pods may hold together
    /// (`outbound_connections_limit`). Keep twice it under the descriptor limit.
    #[arg(long, env = "MAX_OUTBOUND_CONNECTIONS", default_value_t = 131_072, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_outbound_connections: u32,
    /// Plaintext (15006) connections all pods may hold from one source address, in or outside
    /// the mesh (`plaintext_per_source_limit`).
    #[arg(long, env = "MAX_PLAINTEXT_CONNECTIONS_PER_SOURCE", default_value_t = 8_192, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_plaintext_connections_per_source: u32,
    /// Plaintext connections all pods may hold together (`plaintext_connections_limit`).
    #[arg(long, env = "MAX_PLAINTEXT_CONNECTIONS", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_plaintext_connections: u32,
    /// An inbound HBONE connection without a stream for this many seconds gets GOAWAY. Keep
    /// it above the clients' POOL_IDLE_SECONDS so they close idle connections first.
    #[arg(long, env = "INBOUND_IDLE_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub inbound_idle_seconds: u64,
    /// Connect to local applications from the client's address (IP_TRANSPARENT), as Istio's
    /// `ENABLE_ORIGINAL_SOURCE`. Needs the return-path rules the node agent writes in pods;
    /// a VM (WorkloadEntry) running its own ztunnel has none: `false` there.
    #[arg(long, env = "ENABLE_ORIGINAL_SOURCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_original_source: bool,

    /// Worker threads (`--worker-threads`, `WORKER_THREADS`), as the waypoint's.
    #[command(flatten)]
    pub runtime: mesh_core::runtime::RuntimeArgs,

    /// Write a development CA (root-cert.pem, root-key.pem) into this directory and exit.
    #[arg(long, value_name = "DIR")]
    pub gen_dev_ca: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); changeable at runtime via the admin /logging.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// Checks what clap cannot, with messages that say how to fix it.
    pub fn validate(&self) -> anyhow::Result<()> {
        let cp = &self.control_plane;
        if self.local_xds_path.is_none() && cp.xds_address.is_none() {
            anyhow::bail!("no workload source: pass --local-xds-path <file> or --xds-address <url>");
        }
        if self.ca_root_cert.is_none() && cp.ca_address.is_none() {
            anyhow::bail!(
                "no certificate source: pass --ca-root-cert and --ca-root-key (development CA) or --ca-address <url>"
            );
        }
        if self.cert_ttl_seconds < 60 {
            // Short lifetimes are allowed for tests, but warn-level short is a misconfiguration.
            if self.cert_ttl_seconds < 2 {
                anyhow::bail!("--cert-ttl-seconds {} is too short (minimum 2)", self.cert_ttl_seconds);
            }
        }
        if self.inbound_idle_seconds <= self.pool_idle_seconds {
            anyhow::bail!(
                "--inbound-idle-seconds {} must be longer than --pool-idle-seconds {}: clients close idle pooled \
                 connections first, so a server GOAWAY never races a new stream",
                self.inbound_idle_seconds,
                self.pool_idle_seconds
            );
        }
        let bounds = [
            (
                "outbound",
                self.max_outbound_connections_per_source,
                self.max_outbound_connections,
            ),
            (
                "plaintext",
                self.max_plaintext_connections_per_source,
                self.max_plaintext_connections,
            ),
        ];
        for (what, per_source, total) in bounds {
            if per_source > total {
                anyhow::bail!(
                    "--max-{what}-connections-per-source {per_source} exceeds --max-{what}-connections {total}: \
                     one source could then hold every {what} connection; lower it or raise the total"
                );
            }
        }
        let ports = [self.outbound_port, self.inbound_plaintext_port, self.inbound_port];
        if ports.contains(&0) {
            anyhow::bail!("proxy ports must be non-zero");
        }
        if !self.admin_addr.ip().is_loopback() {
            anyhow::bail!(
                "--admin-addr {} must be a loopback address (e.g. {DEFAULT_ADMIN_ADDR}): the admin endpoint reveals \
                 state and changes the log level; use `kubectl port-forward` to reach it from outside",
                self.admin_addr
            );
        }
        for (flag, addr) in [("--xds-address", &cp.xds_address), ("--ca-address", &cp.ca_address)] {
            let Some(addr) = addr else { continue };
            if !(addr.starts_with("http://") || addr.starts_with("https://")) {
                anyhow::bail!("{flag} {addr:?} must start with http:// or https://");
            }
            if uses_tls(addr) && cp.trust_bundle.is_none() {
                anyhow::bail!(
                    "{flag} {addr} uses TLS, which needs the roots the control plane's certificate chains to: \
                     pass --trust-bundle <PEM file> (the control plane must prove --control-plane-identity {}), \
                     or use an http:// address",
                    cp.control_plane_identity
                );
            }
        }
        Ok(())
    }

    /// The outbound and plaintext listeners' bounds.
    pub fn listener_bounds(&self) -> (crate::proxy::ConnBound, crate::proxy::ConnBound) {
        let bound = |per_source, total| crate::proxy::ConnBound { per_source, total };
        (
            bound(self.max_outbound_connections_per_source, self.max_outbound_connections),
            bound(
                self.max_plaintext_connections_per_source,
                self.max_plaintext_connections,
            ),
        )
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }

    /// The capture listeners in each served namespace; the DNS proxy only in in-pod mode
    /// (dedicated mode has no redirection to it).
    pub fn capture_ports(&self) -> capture::Ports {
        capture::Ports {
            outbound: self.outbound_port,
            inbound_plaintext: self.inbound_plaintext_port,
            inbound: self.inbound_port,
            dns: (self.zds_socket.is_some() && self.dns_port != 0).then_some(self.dns_port),
        }
    }

    /// ztunnel's other listeners that live in the namespaces it serves: admin, metrics and
    /// readiness in dedicated mode, where ztunnel shares its namespace with the workloads;
    /// none in in-pod mode. 0 = none.
    pub fn other_listener_ports(&self) -> [u16; 3] {
        if self.zds_socket.is_some() {
            [0; 3]
        } else {
            [
                self.admin_addr.port(),
                self.stats_addr.port(),
                self.readiness_addr.port(),
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("ztunnel").chain(args.iter().copied()))
    }

    #[test]
    fn control_plane_identity_defaults_and_is_validated() {
        let cfg = parse(&["--xds-address", "http://cp:15012", "--ca-address", "http://cp:15012"]).expect("parse");
        assert_eq!(
            cfg.control_plane.control_plane_identity.to_string(),
            DEFAULT_CONTROL_PLANE_IDENTITY
        );
        cfg.validate().expect("plaintext needs no trust bundle");

        let cfg = parse(&["--control-plane-identity", "spiffe://example.org/ns/mesh/sa/cp"]).expect("parse");
        assert_eq!(cfg.control_plane.control_plane_identity.namespace, "mesh");

        let err = parse(&["--control-plane-identity", "mesh-controller"]).expect_err("not a SPIFFE id");
        let text = err.to_string();
        assert!(text.contains("--control-plane-identity"), "{text}");
        assert!(
            text.contains("spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"),
            "{text}"
        );
    }

    #[test]
    fn the_per_peer_stream_bound_is_configurable_but_never_zero() {
        let base = ["--xds-address", "http://cp:15012", "--ca-address", "http://cp:15012"];
        assert_eq!(parse(&base).expect("parse").peer_limits.max_streams_per_peer, 1024);
        let mut args = base.to_vec();
        args.extend(["--max-streams-per-peer", "20000"]);
        assert_eq!(parse(&args).expect("parse").peer_limits.max_streams_per_peer, 20000);
        let mut args = base.to_vec();
        args.extend(["--max-streams-per-peer", "0"]);
        assert!(parse(&args).is_err(), "0 would refuse every stream");
    }

    #[test]
    fn listener_bounds_default_generous_and_are_validated() {
        let base = ["--xds-address", "http://cp:15012", "--ca-address", "http://cp:15012"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend(extra);
            parse(&args)
        };
        let cfg = with(&[]).expect("parse");
        let (outbound, plaintext) = cfg.listener_bounds();
        assert_eq!((outbound.per_source, outbound.total), (16_384, 131_072));
        assert_eq!((plaintext.per_source, plaintext.total), (8_192, 65_536));
        cfg.validate().expect("the defaults are consistent");
        let cfg = with(&["--max-plaintext-connections-per-source", "70000"]).expect("parse");
        let err = cfg.validate().expect_err("per source above the total").to_string();
        assert!(err.contains("--max-plaintext-connections 65536"), "{err}");
        assert!(
            with(&["--max-outbound-connections", "0"]).is_err(),
            "0 would refuse every connection"
        );
        let cfg = with(&[
            "--max-outbound-connections-per-source",
            "10",
            "--max-outbound-connections",
            "20",
        ])
        .expect("parse");
        assert_eq!(
            cfg.listener_bounds().0,
            crate::proxy::ConnBound {
                per_source: 10,
                total: 20
            }
        );
    }

    #[test]
    fn admin_must_be_loopback() {
        let base = ["--xds-address", "http://cp:15012", "--ca-address", "http://cp:15012"];
        let with = |addr: &str| {
            let mut args = base.to_vec();
            args.extend(["--admin-addr", addr]);
            parse(&args).expect("parse").validate()
        };
        with("127.0.0.1:15000").expect("IPv4 loopback");
        with("[::1]:15000").expect("IPv6 loopback");
        for bad in ["0.0.0.0:15000", "10.0.0.1:15000", "[::]:15000"] {
            let text = with(bad).expect_err(bad).to_string();
            assert!(text.contains("--admin-addr") && text.contains("loopback"), "{text}");
        }
    }

    #[test]
    fn loop_guard_ports_follow_the_mode() {
        let cfg = parse(&["--xds-address", "http://cp:15012", "--stats-addr", "0.0.0.0:9020"]).expect("parse");
        assert_eq!(cfg.other_listener_ports(), [15000, 9020, 15021]);
        assert_eq!(cfg.capture_ports().dns, None);
        let cfg = parse(&["--zds-socket", "/run/zds.sock"]).expect("parse");
        assert_eq!(cfg.other_listener_ports(), [0; 3]);
        assert_eq!(cfg.capture_ports(), capture::Ports::default());
        let cfg = parse(&["--zds-socket", "/run/zds.sock", "--dns-port", "0"]).expect("parse");
        assert_eq!(cfg.capture_ports().dns, None);
    }

    #[test]
    fn https_needs_a_trust_bundle() {
        for flag in ["--xds-address", "--ca-address"] {
            let mut args = vec!["--xds-address", "http://cp:15012", "--ca-address", "http://cp:15012"];
            let i = args.iter().position(|a| *a == flag).expect("flag") + 1;
            args[i] = "https://cp:15012";
            let cfg = parse(&args).expect("parse");
            let text = cfg.validate().expect_err("no trust bundle").to_string();
            assert!(text.contains(flag) && text.contains("--trust-bundle"), "{text}");
            args.extend(["--trust-bundle", "/etc/mesh/roots.pem"]);
            parse(&args)
                .expect("parse")
                .validate()
                .expect("valid with a trust bundle");
        }
        let cfg = parse(&["--xds-address", "cp:15012", "--ca-address", "http://cp:15012"]).expect("parse");
        let text = cfg.validate().expect_err("no scheme").to_string();
        assert!(text.contains("http:// or https://"), "{text}");
    }

    #[test]
    fn shared_control_plane_flags_keep_their_conflicts() {
        parse(&["--local-xds-path", "/w.yaml", "--xds-address", "http://cp:15012"]).expect_err("two workload sources");
        let dev_ca = ["--ca-root-cert", "/c.pem", "--ca-root-key", "/k.pem"];
        parse(&dev_ca).expect("development CA alone");
        let mut both = dev_ca.to_vec();
        both.extend(["--ca-address", "http://cp:15012"]);
        parse(&both).expect_err("two certificate sources");
    }
}
