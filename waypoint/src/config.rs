//! The waypoint's configuration: one typed struct from flags and environment, validated at
//! start-up.

use std::net::SocketAddr;
use std::time::Duration;

use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use mesh_core::control_plane_args::ControlPlaneArgs;
use mesh_core::identity::Identity;

fn parse_identity(s: &str) -> Result<Identity, String> {
    s.parse()
        .map_err(|e| format!("{e}; expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"))
}

/// What the proxy serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Waypoint,
    Ingress,
    /// An east-west gateway: HBONE on 15008 from other networks, relayed by the outer
    /// authority to this network's endpoints without terminating the inner TLS (double HBONE;
    /// see [`crate::eastwest`]).
    EastWest,
}

/// L7 proxy of the ambient mesh, in front of services that ask for it with
/// `istio.io/use-waypoint`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "waypoint",
    version,
    about,
    // A waypoint has no local workload file or development CA, and verifies peers against
    // the trust bundle: these shared control-plane flags are required.
    mut_arg("xds_address", |a| a.required_unless_present("local_xds_path")),
    mut_arg("ca_address", |a| a.required_unless_present("ca_root_cert")),
    mut_arg("trust_bundle", |a| a.required_unless_present("ca_root_cert"))
)]
pub struct Config {
    /// Worker threads (`--worker-threads`, `WORKER_THREADS`), as ztunnel's.
    #[command(flatten)]
    pub runtime: mesh_core::runtime::RuntimeArgs,
    /// `waypoint` (HBONE from ztunnels) or `ingress` (an ingress Gateway's listeners for
    /// clients outside the mesh, same HTTP pipeline; configuration from the controller).
    #[arg(long, env = "ROLE", value_enum, default_value_t = Role::Waypoint)]
    pub role: Role,
    /// Ingress role: the address its listeners' ports are bound on.
    #[arg(long, env = "INGRESS_BIND", default_value = "0.0.0.0")]
    pub ingress_bind: std::net::IpAddr,
    /// Ingress role: client connections held at once across all its listeners (each holds its
    /// TLS and HTTP state); beyond it a new one is closed at once and counted as
    /// `connections_limit` in `waypoint_rejected_requests_total`. Keep it under the process's
    /// descriptor limit.
    #[arg(long, env = "INGRESS_MAX_CONNECTIONS", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    pub ingress_max_connections: u32,
    /// The identity this waypoint proves (its service account's SPIFFE ID).
    #[arg(long, env = "WAYPOINT_IDENTITY", value_parser = parse_identity)]
    pub identity: Identity,
    /// The Gateway it implements, `namespace/name` (default: the identity's namespace and
    /// service account, as the controller names them).
    #[arg(long, env = "WAYPOINT_GATEWAY")]
    pub gateway: Option<String>,
    /// Network of this waypoint's endpoints (empty = default network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// HBONE listener.
    #[arg(long, env = "HBONE_ADDR", default_value = "0.0.0.0:15008")]
    pub hbone_addr: SocketAddr,
    /// Per-peer bounds of the HBONE listener (`--max-streams-per-peer`,
    /// `--max-connections-per-peer`), as ztunnel's.
    #[command(flatten)]
    pub peer_limits: mesh_core::hbone::limits::PeerLimitArgs,
    /// HBONE port of ztunnels (upstream tunnels).
    #[arg(long, env = "HBONE_PORT", default_value_t = 15008)]
    pub hbone_port: u16,
    /// `/metrics` and `/healthz/ready`, as ztunnel's. Formerly `--metrics-addr` and
    /// `METRICS_ADDR`, still read (see [`Config::load`]).
    #[arg(long, alias = "metrics-addr", env = "STATS_ADDR", default_value = "0.0.0.0:15020")]
    pub stats_addr: SocketAddr,
    /// `/healthz/ready` only.
    #[arg(long, env = "READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// State views (`/config_dump`) besides metrics and readiness: keep it on localhost (a
    /// user reaches it with `kubectl port-forward`).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// xDS and CA addresses, token, trust bundle, control plane identity (the addresses and
    /// the trust bundle are required here: see the `mut_arg`s above).
    #[command(flatten)]
    pub control_plane: ControlPlaneArgs,
    /// Zipkin v2 collector for spans, e.g. http://zipkin.istio-system:9411/api/v2/spans.
    #[arg(long, env = "ZIPKIN_ADDRESS")]
    pub zipkin_address: Option<String>,
    /// OTLP collector for spans: grpc://otel-collector:4317 (OTLP/gRPC) or
    /// http://otel-collector:4318/v1/traces (OTLP/HTTP, protobuf).
    #[arg(long, env = "OTLP_ADDRESS")]
    pub otlp_address: Option<String>,
    /// Percentage of new traces sampled (0-100); a caller's sampling decision is kept.
    #[arg(long, env = "TRACE_SAMPLING", default_value_t = 1.0)]
    pub trace_sampling: f64,
    /// A tag added to every span, `key=value` (repeatable).
    #[arg(long = "trace-tag", env = "TRACE_TAGS", value_delimiter = ',', value_parser = crate::telemetry::trace::parse_tag)]
    pub trace_tags: Vec<(String, String)>,
    /// How often JWKS documents fetched from a jwksUri are refreshed, in seconds.
    #[arg(long, env = "JWKS_REFRESH_SECONDS", default_value_t = 1200)]
    pub jwks_refresh_seconds: u64,
    /// How long a client of a port that must be HTTP may take to send its first bytes, in
    /// milliseconds; a silent stream is then closed (where TCP is allowed, a client silent for
    /// 300 ms is a server-first protocol instead).
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// How long a stream may move nothing either way (its request body or its answer's)
    /// before it fails (408 unless the answer has begun): Envoy's and Istio's
    /// `stream_idle_timeout`, 5 minutes. Milliseconds.
    #[arg(long, env = "STREAM_IDLE_TIMEOUT_MS", default_value_t = 300_000)]
    pub stream_idle_timeout_ms: u64,
    /// How request paths are normalised before authorization, routing and the backend read
    /// them: Istio's `meshConfig.pathNormalization` (`base`, its default; `merge-slashes`;
    /// `decode-and-merge-slashes`). The controller sets it from MeshConfig.
    #[arg(long, env = "PATH_NORMALIZATION", value_enum, default_value_t = crate::http::path::Normalization::Base)]
    pub path_normalization: crate::http::path::Normalization,
    /// Grace for requests in flight after SIGTERM, in seconds.
    #[arg(long, env = "DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u64,
    /// After SIGTERM, how long new connections are still accepted (and every HTTP/1.1 answer
    /// says `Connection: close`) while ztunnels learn that this replica is leaving; then
    /// HBONE connections get GOAWAY and idle client connections close. Milliseconds.
    #[arg(long, env = "DRAIN_ACCEPT_MS", default_value_t = 2_000)]
    pub drain_accept_ms: u64,
    /// East-west role only, for development and tests: workload state from this file (the
    /// format of ztunnel's `--local-xds-path`) instead of xDS.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<std::path::PathBuf>,
    /// East-west role only, for development and tests: sign our certificate with this
    /// development root (and its `--ca-root-key`) instead of asking the mesh CA; peers are
    /// checked against it.
    #[arg(long, env = "CA_ROOT_CERT", requires = "ca_root_key")]
    pub ca_root_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "CA_ROOT_KEY", requires = "ca_root_cert")]
    pub ca_root_key: Option<std::path::PathBuf>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// Flags and environment of this process.
    pub fn load() -> anyhow::Result<Config> {
        Config::from_matches(&Config::command().get_matches(), |k| std::env::var_os(k))
    }

    /// The configuration from parsed flags, with the former variable names read through
    /// `lookup` where neither the flag nor the current variable was given.
    pub fn from_matches(
        matches: &clap::ArgMatches,
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> anyhow::Result<Config> {
        let mut cfg = Config::from_arg_matches(matches)?;
        if matches.value_source("stats_addr") == Some(ValueSource::DefaultValue) {
            if let Some(addr) = mesh_core::former_env::read("METRICS_ADDR", "STATS_ADDR", lookup)? {
                cfg.stats_addr = addr;
            }
        }
        Ok(cfg)
    }

    /// Checks what clap cannot, with messages that say how to fix it.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(g) = &self.gateway {
            anyhow::ensure!(
                matches!(g.split_once('/'), Some((ns, name)) if !ns.is_empty() && !name.is_empty()),
                "--gateway {g:?}: expected namespace/name of the waypoint Gateway"
            );
        }
        anyhow::ensure!(
            (0.0..=100.0).contains(&self.trace_sampling),
            "--trace-sampling {}: expected a percentage between 0 and 100",
            self.trace_sampling
        );
        anyhow::ensure!(
            self.header_read_timeout_ms > 0,
            "--header-read-timeout-ms 0: a client needs some time to send its request"
        );
        anyhow::ensure!(
            self.admin_addr.ip().is_loopback(),
            "--admin-addr {} must be a loopback address (e.g. 127.0.0.1:15000): the admin endpoint \
             shows every route and policy this proxy holds; use `kubectl port-forward` to reach it",
            self.admin_addr
        );
        anyhow::ensure!(
            self.stream_idle_timeout_ms > 0,
            "--stream-idle-timeout-ms 0: a client needs some time to send its request's body"
        );
        if let Some(a) = &self.otlp_address {
            crate::telemetry::export::Transport::from_address(a, "/", "")
                .map_err(|e| anyhow::anyhow!("--otlp-address {e}"))?;
        }
        for (flag, addr) in [("--zipkin-address", &self.zipkin_address)] {
            if let Some(a) = addr {
                anyhow::ensure!(
                    a.starts_with("http://") && a.parse::<http::Uri>().is_ok(),
                    "{flag} {a:?}: expected an http:// URL of the collector's endpoint"
                );
            }
        }
        let local = self.local_xds_path.is_some() || self.ca_root_cert.is_some();
        anyhow::ensure!(
            !local || self.role == Role::EastWest,
            "--local-xds-path and --ca-root-cert are for --role east-west only (development and tests)"
        );
        let addresses = [
            ("--xds-address", &self.control_plane.xds_address),
            ("--ca-address", &self.control_plane.ca_address),
        ];
        for (flag, addr) in addresses.iter().filter_map(|(f, a)| Some((f, a.as_deref()?))) {
            anyhow::ensure!(
                addr.starts_with("http://") || addr.starts_with("https://"),
                "{flag} {addr:?}: expected http://host:port or https://host:port"
            );
        }
        Ok(())
    }

    /// The xDS server's address (a required flag; absent only if built around clap).
    pub fn xds_address(&self) -> anyhow::Result<&str> {
        required(&self.control_plane.xds_address, "--xds-address").map(String::as_str)
    }

    /// The mesh CA's address (a required flag).
    pub fn ca_address(&self) -> anyhow::Result<&str> {
        required(&self.control_plane.ca_address, "--ca-address").map(String::as_str)
    }

    /// The trust bundle file (a required flag).
    pub fn trust_bundle(&self) -> anyhow::Result<&std::path::Path> {
        required(&self.control_plane.trust_bundle, "--trust-bundle").map(|p| p.as_path())
    }

    /// (namespace, name) of the Gateway.
    pub fn gateway(&self) -> (String, String) {
        match self.gateway.as_deref().and_then(|g| g.split_once('/')) {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (self.identity.namespace.clone(), self.identity.service_account.clone()),
        }
    }

    pub fn drain_accept(&self) -> Duration {
        Duration::from_millis(self.drain_accept_ms)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }
}

/// The value of a flag the waypoint requires; an error naming it, never a default, if absent.
fn required<'a, T>(value: &'a Option<T>, flag: &str) -> anyhow::Result<&'a T> {
    value.as_ref().ok_or_else(|| anyhow::anyhow!("{flag} is required"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, clap::Error> {
        let base = [
            "waypoint",
            "--identity",
            "spiffe://cluster.local/ns/shop/sa/waypoint",
            "--xds-address",
            "http://cp:15012",
            "--ca-address",
            "http://cp:15012",
            "--trust-bundle",
            "/roots.pem",
        ];
        Config::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn admin_views_default_to_localhost_and_stats_addr_is_ztunnels_name() {
        let cfg = parse(&[]).expect("defaults");
        assert!(cfg.admin_addr.ip().is_loopback(), "{}", cfg.admin_addr);
        assert_eq!(cfg.stats_addr.port(), 15020);
        assert_eq!(cfg.readiness_addr.port(), 15021);
        let cfg = parse(&["--stats-addr", "0.0.0.0:9020"]).expect("--stats-addr");
        assert_eq!(cfg.stats_addr.port(), 9020);
        let cfg = parse(&["--metrics-addr", "0.0.0.0:9021"]).expect("former --metrics-addr");
        assert_eq!(cfg.stats_addr.port(), 9021);
        let cfg = parse(&["--header-read-timeout-ms", "0"]).expect("parses");
        assert!(cfg.validate().is_err(), "a zero header-read timeout is refused");
        let cfg = parse(&["--admin-addr", "0.0.0.0:15000"]).expect("parses");
        assert!(cfg.validate().is_err(), "an admin port off localhost is refused");
    }

    #[test]
    fn the_stream_idle_timeout_is_envoys_five_minutes_and_never_zero() {
        assert_eq!(parse(&[]).expect("defaults").stream_idle_timeout_ms, 300_000);
        let cfg = parse(&["--stream-idle-timeout-ms", "0"]).expect("parses");
        assert!(cfg.validate().is_err(), "a zero stream idle timeout is refused");
    }

    #[test]
    fn path_normalization_takes_istio_s_modes_and_defaults_to_base() {
        use crate::http::path::Normalization;
        assert_eq!(parse(&[]).expect("defaults").path_normalization, Normalization::Base);
        for (flag, want) in [
            ("merge-slashes", Normalization::MergeSlashes),
            ("decode-and-merge-slashes", Normalization::DecodeAndMergeSlashes),
        ] {
            let cfg = parse(&["--path-normalization", flag]).expect(flag);
            assert_eq!(cfg.path_normalization, want);
        }
        assert!(parse(&["--path-normalization", "none"]).is_err(), "NONE is not offered");
    }

    fn load(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Config> {
        let base = [
            "waypoint",
            "--identity",
            "spiffe://cluster.local/ns/default/sa/waypoint",
        ];
        let base = base.iter().chain(
            [
                "--xds-address",
                "http://cp:15012",
                "--ca-address",
                "http://cp:15012",
                "--trust-bundle",
                "/roots.pem",
            ]
            .iter(),
        );
        // Not this process's STATS_ADDR: the test gives the environment itself.
        let matches = Config::command()
            .mut_arg("stats_addr", |a| a.env(None))
            .try_get_matches_from(base.chain(args.iter()))?;
        Config::from_matches(&matches, |k| {
            env.iter().find(|(name, _)| *name == k).map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn former_metrics_addr_variable_is_read_only_without_the_flag() {
        let former = [("METRICS_ADDR", "0.0.0.0:9030")];
        assert_eq!(load(&[], &former).expect("former name").stats_addr.port(), 9030);
        let flag = load(&["--stats-addr", "0.0.0.0:9040"], &former).expect("flag");
        assert_eq!(flag.stats_addr.port(), 9040, "the flag wins over the former variable");
        assert_eq!(load(&[], &[]).expect("default").stats_addr.port(), 15020);
        let text = load(&[], &[("METRICS_ADDR", "nine")]).expect_err("invalid").to_string();
        assert!(text.contains("METRICS_ADDR"), "{text}");
    }

    #[test]
    fn shared_control_plane_flags_are_required_here() {
        let id = [
            "waypoint",
            "--identity",
            "spiffe://cluster.local/ns/default/sa/waypoint",
        ];
        let all = [
            ["--xds-address", "http://cp:15012"],
            ["--ca-address", "http://cp:15012"],
            ["--trust-bundle", "/roots.pem"],
        ];
        for missing in 0..all.len() {
            let args = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != missing)
                .flat_map(|(_, a)| a);
            let command = Config::command()
                .mut_arg("xds_address", |a| a.env(None))
                .mut_arg("ca_address", |a| a.env(None))
                .mut_arg("trust_bundle", |a| a.env(None));
            let text = command
                .try_get_matches_from(id.iter().chain(args))
                .expect_err("a required flag is missing")
                .to_string();
            assert!(text.contains(all[missing][0]), "{text}");
        }
    }
}
