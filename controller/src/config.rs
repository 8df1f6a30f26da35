//! The controller's configuration: flags and environment, validated at start-up.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use std::ffi::OsString;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

/// Where the debug views are served by default: localhost, never the pod address.
pub const DEFAULT_DEBUG_ADDR: &str = "127.0.0.1:15015";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "controller",
    about = "Control plane: sources, translation, Delta ADS, CA, waypoints"
)]
pub struct Config {
    /// Local mode: read Kubernetes-shaped manifests from this directory and watch it.
    #[arg(long, env = "MANIFEST_DIR", conflicts_with = "kubernetes")]
    pub manifest_dir: Option<PathBuf>,
    /// Cluster mode: watch the Kubernetes API (in-cluster config or KUBECONFIG).
    #[arg(long, env = "KUBERNETES")]
    pub kubernetes: bool,
    /// xDS and CA over TLS.
    #[arg(long, env = "LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Metrics (`/metrics`) and readiness (`/ready`): what scrapers and probes reach.
    #[arg(long, env = "ADMIN", default_value = "0.0.0.0:15014")]
    pub admin: SocketAddr,
    /// Debug views (`/debug/config`, `/debug/problems`, `/debug/skipped`,
    /// `/debug/waypoints`): a loopback address only (reach it with `kubectl port-forward`).
    #[arg(long, env = "DEBUG_ADDR", default_value = DEFAULT_DEBUG_ADDR)]
    pub debug_addr: SocketAddr,
    /// Root certificate and key (root-cert.pem, root-key.pem): loaded, or generated and kept here.
    #[arg(long, env = "CA_DIR", default_value = "./mesh-ca")]
    pub ca_dir: PathBuf,
    /// Plug-in CA in Istio's layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem;
    /// in a cluster the `cacerts` Secret mounted here): signs instead of the self-signed root
    /// of --ca-dir when present, and is re-read for root rotations.
    #[arg(long, env = "CACERTS_DIR", default_value = crate::ca::DEFAULT_CACERTS_DIR)]
    pub cacerts_dir: PathBuf,
    /// Local mode: YAML list of `{token, identity, node}` bootstrap tokens.
    #[arg(long, env = "BOOTSTRAP_TOKENS")]
    pub bootstrap_tokens: Option<PathBuf>,
    /// HMAC key of controller-issued VM tokens (`meshctl vm token`): 32 random bytes as hex,
    /// created (mode 0600) when missing. Without it no VM token is issued or accepted.
    #[arg(long, env = "VM_TOKEN_KEY")]
    pub vm_token_key: Option<PathBuf>,
    /// Default lifetime of an issued VM token (`1440m` = 24 h, `30m`, `3600s`).
    #[arg(long, env = "VM_TOKEN_TTL", default_value = "1440m", value_parser = parse_duration)]
    pub vm_token_ttl: std::time::Duration,
    /// Cluster mode: audiences accepted in TokenReview.
    #[arg(long, env = "TOKEN_AUDIENCES", value_delimiter = ',', default_value = "istio-ca")]
    pub token_audiences: Vec<String>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The cluster's DNS domain: Service hostnames are `<name>.<ns>.svc.<cluster-domain>`
    /// (the kubelet's --cluster-domain; not always cluster.local).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// This cluster's id: the prefix of workload uids (`<cluster>//Pod/<ns>/<name>`), unique
    /// among the clusters of one mesh.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// This cluster's network (empty: the label `topology.istio.io/network` on the system
    /// namespace, else the default network). Workloads on other networks are reached through
    /// their network's east-west gateway.
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// Local mode: a remote cluster's manifest directory, `<cluster-id>=<dir>` (repeatable):
    /// its pods, services and east-west gateways are merged into what is served.
    #[arg(long, env = "REMOTE_MANIFESTS", value_delimiter = ',')]
    pub remote_manifests: Vec<crate::source::remote::RemoteDir>,
    /// Local mode: a remote cluster's node agents' enrolment reports, `<cluster-id>=<dir>`.
    #[arg(long, env = "REMOTE_ENROLMENT", value_delimiter = ',')]
    pub remote_enrolment: Vec<crate::source::remote::RemoteDir>,
    /// Cluster mode: read remote clusters from Secrets labelled `istio/multiCluster=true` in
    /// POD_NAMESPACE (one kubeconfig per key, the key being the cluster id).
    #[arg(long, env = "REMOTE_SECRETS", default_value_t = true, action = clap::ArgAction::Set)]
    pub remote_secrets: bool,
    /// How long a remote cluster that cannot be read keeps its workloads served before they
    /// are withdrawn (`30s`, `500ms`, `2m`).
    #[arg(long, env = "REMOTE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub remote_grace: std::time::Duration,
    #[arg(long, env = "ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// The controller's own identity (its serving certificate's SAN).
    #[arg(
        long,
        env = "IDENTITY",
        default_value = "spiffe://cluster.local/ns/istio-system/sa/mesh-controller"
    )]
    pub identity: String,
    /// DNS names the serving certificate (15012) carries besides the SPIFFE id, for clients
    /// that verify the control plane by hostname (Istio's ztunnel: the URL's host or
    /// ALT_XDS_HOSTNAME). The controller's own Service names in POD_NAMESPACE
    /// (`mesh-controller.<ns>.svc[.<cluster domain>]`) are always added. Empty: none.
    #[arg(
        long,
        env = "SERVING_DNS_NAMES",
        value_delimiter = ',',
        default_value = "istiod.istio-system.svc,istiod.istio-system.svc.cluster.local"
    )]
    pub serving_dns_names: Vec<String>,
    /// IP addresses the serving certificate carries (local mode: the addresses clients dial).
    /// The --listen address is added when it is a specific one.
    #[arg(long, env = "SERVING_IPS", value_delimiter = ',')]
    pub serving_ips: Vec<IpAddr>,
    /// Longest certificate lifetime the CA grants, in seconds.
    #[arg(long, env = "MAX_CERT_TTL_SECONDS", default_value_t = 24 * 3600)]
    pub max_cert_ttl_seconds: u64,
    /// Local mode: node agents' enrolment reports (`cni-agent --enrolment-report`); the pods
    /// listed there are advertised with HBONE like annotated ones.
    #[arg(long, env = "ENROLMENT_DIR")]
    pub enrolment_dir: Option<PathBuf>,
    /// Local mode: write one JSON record per waypoint to run into this directory.
    #[arg(long, env = "WAYPOINT_RECORDS")]
    pub waypoint_records: Option<PathBuf>,
    /// Local mode: how often the manifest directory is checked for changes, in milliseconds
    /// (also the --mesh-config file, in both modes).
    #[arg(long, env = "POLL_MS", default_value_t = 200)]
    pub poll_ms: u64,
    /// Istio MeshConfig YAML (the `mesh` key of the `istio` ConfigMap, mounted): its
    /// `outboundTrafficPolicy.mode` (ALLOW_ANY or REGISTRY_ONLY) is applied, and re-read on
    /// change. Unset or missing: the defaults.
    #[arg(long, env = "MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,
    /// Cluster mode: the waypoint image deployed for istio-waypoint Gateways.
    #[arg(long, env = "WAYPOINT_IMAGE", default_value = "ghcr.io/ambient-mesh/waypoint:latest")]
    pub waypoint_image: String,
    /// Cluster mode: this replica's name (Lease holder identity).
    #[arg(long, env = "POD_NAME", default_value = "mesh-controller")]
    pub pod_name: String,
    /// Cluster mode: namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    /// Log filter (tracing EnvFilter syntax), `RUST_LOG` as for ztunnel and the waypoint; the
    /// former `LOG` is still read (see [`Config::load`]).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
}

/// `<n>ms`, `<n>s`, `<n>m` or bare seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "" | "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: the unit is ms, s or m")),
    }
}

/// Name of the controller's own Service (manifests/controller/service.yaml).
pub const SERVICE_NAME: &str = "mesh-controller";

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
        if matches.value_source("log") == Some(ValueSource::DefaultValue) {
            if let Some(log) = mesh_core::former_env::read("LOG", "RUST_LOG", lookup)? {
                cfg.log = log;
            }
        }
        Ok(cfg)
    }

    /// The DNS and IP names of the serving certificate: the configured ones, the controller's
    /// own Service names, and the listen address when specific; without duplicates.
    pub fn serving_names(&self) -> crate::ca::ServingNames {
        let own = [
            format!("{SERVICE_NAME}.{}.svc", self.pod_namespace),
            format!("{SERVICE_NAME}.{}.svc.{}", self.pod_namespace, self.cluster_domain),
        ];
        let mut dns: Vec<String> = Vec::new();
        for name in self
            .serving_dns_names
            .iter()
            .map(|n| n.trim())
            .chain(own.iter().map(String::as_str))
        {
            if !name.is_empty() && !dns.iter().any(|d| d == name) {
                dns.push(name.to_owned());
            }
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        let listen = Some(self.listen.ip()).filter(|ip| !ip.is_unspecified());
        for ip in self.serving_ips.iter().copied().chain(listen) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        crate::ca::ServingNames { dns, ips }
    }

    /// Cluster ids: valid, unique, and the remote flags only in local mode.
    fn validate_clusters(&self) -> Result<(), String> {
        crate::source::remote::check_cluster_id(&self.cluster_id).map_err(|e| format!("--cluster-id: {e}"))?;
        let mut seen = std::collections::BTreeSet::from([self.cluster_id.as_str()]);
        for r in &self.remote_manifests {
            if !seen.insert(r.cluster.as_str()) {
                return Err(format!(
                    "--remote-manifests: cluster id {:?} is used twice (or is this cluster's --cluster-id)",
                    r.cluster
                ));
            }
        }
        if let Some(r) = self
            .remote_enrolment
            .iter()
            .find(|e| !self.remote_manifests.iter().any(|m| m.cluster == e.cluster))
        {
            return Err(format!(
                "--remote-enrolment {}: no --remote-manifests for that cluster",
                r.cluster
            ));
        }
        if self.kubernetes && !self.remote_manifests.is_empty() {
            return Err("--remote-manifests is for local mode; in a cluster, remote clusters come from Secrets labelled istio/multiCluster=true".into());
        }
        Ok(())
    }

    /// Checks what flags alone cannot, with a message saying how to fix it.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.manifest_dir, self.kubernetes) {
            (None, false) => return Err("choose a source: --manifest-dir <dir> (local mode) or --kubernetes".into()),
            (Some(d), _) if !d.is_dir() => {
                return Err(format!("--manifest-dir {}: not a directory", d.display()));
            }
            (Some(_), _) if self.bootstrap_tokens.is_none() => {
                return Err(
                    "local mode needs --bootstrap-tokens <file> so ztunnels and waypoints can authenticate".into(),
                );
            }
            _ => {}
        }
        self.validate_clusters()?;
        if self.max_cert_ttl_seconds < 60 {
            return Err("--max-cert-ttl-seconds must be at least 60".into());
        }
        if !self.debug_addr.ip().is_loopback() {
            return Err(format!(
                "--debug-addr {} must be a loopback address (e.g. {DEFAULT_DEBUG_ADDR}): the debug views reveal the whole configuration",
                self.debug_addr
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_names_default_to_istiod_and_our_service() {
        let dir = std::env::temp_dir();
        let dir = dir.to_string_lossy();
        let parse = |extra: &[&str]| {
            let base = ["controller", "--manifest-dir", &dir, "--bootstrap-tokens", "/t.yaml"];
            Config::try_parse_from(base.iter().chain(extra))
                .expect("parse")
                .serving_names()
        };
        let names = parse(&[]);
        assert_eq!(
            names.dns,
            [
                "istiod.istio-system.svc",
                "istiod.istio-system.svc.cluster.local",
                "mesh-controller.istio-system.svc",
                "mesh-controller.istio-system.svc.cluster.local",
            ]
        );
        assert!(names.ips.is_empty(), "0.0.0.0 is no address to verify: {:?}", names.ips);
        let names = parse(&[
            "--serving-dns-names",
            "cp.example,istiod.istio-system.svc",
            "--serving-ips",
            "10.0.0.9,10.0.0.10",
            "--listen",
            "10.0.0.9:15012",
            "--pod-namespace",
            "mesh",
        ]);
        assert_eq!(
            names.dns,
            [
                "cp.example",
                "istiod.istio-system.svc",
                "mesh-controller.mesh.svc",
                "mesh-controller.mesh.svc.cluster.local"
            ]
        );
        let ips: Vec<String> = names.ips.iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.0.0.9", "10.0.0.10"]);
        assert_eq!(parse(&["--serving-dns-names", ""]).dns.len(), 2, "only our own Service");
    }

    #[test]
    fn debug_views_stay_on_loopback() {
        let dir = std::env::temp_dir();
        let dir = dir.to_string_lossy();
        let with = |extra: &[&str]| {
            let base = ["controller", "--manifest-dir", &dir, "--bootstrap-tokens", "/t.yaml"];
            Config::try_parse_from(base.iter().chain(extra))
                .expect("parse")
                .validate()
        };
        with(&[]).expect("default 127.0.0.1:15015");
        with(&["--debug-addr", "[::1]:15015"]).expect("IPv6 loopback");
        for bad in ["0.0.0.0:15015", "10.0.0.1:15015", "[::]:15015"] {
            let e = with(&["--debug-addr", bad]).expect_err(bad);
            assert!(e.contains("--debug-addr") && e.contains("loopback"), "{e}");
        }
    }

    #[test]
    fn remote_clusters_are_validated() {
        let dir = std::env::temp_dir();
        let dir = dir.to_string_lossy();
        let with = |extra: &[&str]| {
            let base = ["controller", "--manifest-dir", &dir, "--bootstrap-tokens", "/t.yaml"];
            Config::try_parse_from(base.iter().chain(extra))
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map(|()| c))
        };
        let c = with(&[
            "--cluster-id",
            "c68",
            "--remote-manifests",
            "c69=/b,c70=/c",
            "--remote-grace",
            "500ms",
        ])
        .expect("valid");
        assert_eq!(c.remote_manifests.len(), 2);
        assert_eq!(c.remote_grace, std::time::Duration::from_millis(500));
        assert_eq!(
            with(&[]).expect("defaults").remote_grace,
            std::time::Duration::from_secs(30)
        );
        for bad in [
            &["--cluster-id", "c68", "--remote-manifests", "c68=/b"][..],
            &["--remote-manifests", "c69=/b", "--remote-manifests", "c69=/c"],
            &["--remote-manifests", "c69"],
            &["--remote-enrolment", "c69=/e"],
            &["--cluster-id", "a/b"],
            &["--remote-grace", "5h"],
        ] {
            assert!(with(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn former_log_variable_is_read_only_without_the_flag() {
        let dir = std::env::temp_dir();
        let dir = dir.to_string_lossy();
        let load = |extra: &[&str], env: &[(&str, &str)]| {
            let base = ["controller", "--manifest-dir", &dir, "--bootstrap-tokens", "/t.yaml"];
            // Not this process's RUST_LOG: the test gives the environment itself.
            let matches = Config::command()
                .mut_arg("log", |a| a.env(None))
                .try_get_matches_from(base.iter().chain(extra))
                .expect("parse");
            Config::from_matches(&matches, |k| {
                env.iter().find(|(name, _)| *name == k).map(|(_, v)| OsString::from(v))
            })
            .expect("config")
        };
        assert_eq!(load(&[], &[("LOG", "debug")]).log, "debug");
        assert_eq!(load(&["--log", "warn"], &[("LOG", "debug")]).log, "warn");
        assert_eq!(load(&[], &[]).log, "info");
    }
}
