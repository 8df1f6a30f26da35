//! Remote clusters' sources. Local mode: `--remote-manifests <cluster-id>=<dir>`, read by the
//! same manifest source as the local cluster. Cluster mode: Secrets labelled
//! `istio/multiCluster=true` in the controller's namespace, each key a cluster id and its value
//! a kubeconfig (what `istioctl create-remote-secret` writes), watched with the same watches as
//! the local cluster. Every change a remote source makes is tagged with its cluster id
//! ([`ClusterChange`]). Whether a cluster can be read is tracked by [`Health`]: a cluster that
//! cannot be read keeps its last good objects for a grace period, then its workloads are
//! withdrawn (and come back when it can be read again); the rest keeps serving throughout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Change, ChangeSender, KindSync};
use crate::model::cluster::{ClusterChange, RemoteState};
use crate::model::{Kind, Secret};

/// Label that marks a Secret holding remote clusters' kubeconfigs.
pub const MULTICLUSTER_LABEL: &str = "istio/multiCluster";

/// Why a remote cluster's configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RemoteError {
    #[error("{0:?} is not <cluster-id>=<directory>")]
    NotAssignment(String),
    #[error("cluster id {0:?} must be non-empty letters, digits, '.', '-' or '_' (it is part of workload uids)")]
    ClusterId(String),
    #[error("Secret {0} is not labelled {MULTICLUSTER_LABEL}=true")]
    NotMulticluster(String),
    #[error("Secret {secret}: key {cluster:?}: {reason}")]
    Kubeconfig {
        secret: String,
        cluster: String,
        reason: String,
    },
    #[error("Secret {0} holds no kubeconfig")]
    Empty(String),
}

/// Cluster ids end up in workload uids (`<cluster>//Pod/<ns>/<name>`): no `/`, nothing odd.
pub fn check_cluster_id(id: &str) -> Result<(), RemoteError> {
    let ok = !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(RemoteError::ClusterId(id.to_owned()))
    }
}

/// `<cluster-id>=<path>`, as `--remote-manifests` and `--remote-enrolment` take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteDir {
    pub cluster: String,
    pub dir: PathBuf,
}

impl std::str::FromStr for RemoteDir {
    type Err = RemoteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (cluster, dir) = s
            .split_once('=')
            .filter(|(_, d)| !d.is_empty())
            .ok_or_else(|| RemoteError::NotAssignment(s.to_owned()))?;
        check_cluster_id(cluster)?;
        Ok(RemoteDir {
            cluster: cluster.to_owned(),
            dir: PathBuf::from(dir),
        })
    }
}

/// Turns "could it be read" observations into the states the controller serves by: `Synced`
/// while readable, `Failing` from the first failure, `Withdrawn` once it has failed for
/// `grace`. A state is returned only when it changes.
#[derive(Debug)]
pub struct Health {
    grace: Duration,
    down_since: Option<Instant>,
    reported: Option<RemoteState>,
}

impl Health {
    pub fn new(grace: Duration) -> Self {
        Health {
            grace,
            down_since: None,
            reported: None,
        }
    }

    /// The state to send after observing `outcome` at `now`, if it changed.
    pub fn observe(&mut self, now: Instant, outcome: Result<(), String>) -> Option<RemoteState> {
        let state = match outcome {
            Ok(()) => {
                self.down_since = None;
                RemoteState::Synced
            }
            Err(reason) => {
                let since = *self.down_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.grace {
                    RemoteState::Withdrawn { reason }
                } else {
                    RemoteState::Failing { reason }
                }
            }
        };
        let same = |a: &RemoteState, b: &RemoteState| std::mem::discriminant(a) == std::mem::discriminant(b);
        if self.reported.as_ref().is_some_and(|r| same(r, &state)) {
            return None;
        }
        self.reported = Some(state.clone());
        Some(state)
    }
}

fn tagged(cluster: &str, change: Change) -> Change {
    Change::Cluster(ClusterChange::Objects(cluster.to_owned(), Box::new(change)))
}

/// Local mode: watches `remote.dir` (and the node agents' enrolment reports in `enrolment`)
/// as the local cluster's directory is watched, every `interval`; the directory missing or
/// unreadable makes the cluster fail, and after `grace` be withdrawn. Returns when the
/// controller is gone.
pub async fn watch_dir(
    remote: RemoteDir,
    enrolment: Option<PathBuf>,
    interval: Duration,
    grace: Duration,
    tx: ChangeSender,
) {
    let (inner_tx, mut inner_rx) = mpsc::channel(1024);
    let (skipped_tx, _) = tokio::sync::watch::channel(Vec::new());
    let (dir, cluster) = (remote.dir.clone(), remote.cluster.clone());
    let manifests_tx = inner_tx.clone();
    let manifests = tokio::spawn(async move {
        // The directory may appear later (another cluster coming up): retried until it does.
        while let Err(e) =
            super::manifest_dir::watch(dir.clone(), interval, manifests_tx.clone(), skipped_tx.clone()).await
        {
            tracing::debug!(cluster = %cluster, error = %e, "remote manifests not readable yet");
            tokio::time::sleep(interval).await;
        }
    });
    let enrolment = enrolment.map(|dir| tokio::spawn(super::manifest_dir::watch_enrolment(dir, interval, inner_tx)));
    let mut health = Health::new(grace);
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            change = inner_rx.recv() => {
                let Some(change) = change else { break };
                if tx.send(tagged(&remote.cluster, change)).await.is_err() {
                    break;
                }
            }
            _ = tick.tick() => {
                let readable = tokio::fs::read_dir(&remote.dir).await.map(drop).map_err(|e| format!("{}: {e}", remote.dir.display()));
                if let Some(state) = health.observe(Instant::now(), readable) {
                    tracing::info!(cluster = %remote.cluster, ?state, "remote cluster");
                    if tx.send(Change::Cluster(ClusterChange::State(remote.cluster.clone(), state))).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    manifests.abort();
    if let Some(e) = enrolment {
        e.abort();
    }
}

/// The kubeconfigs of a remote Secret, by cluster id (Istio's layout: one key per cluster;
/// `stringData` is accepted for Secrets written by hand and read from files).
pub fn parse_secret(secret: &Secret) -> Result<BTreeMap<String, String>, RemoteError> {
    let name = format!(
        "{}/{}",
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default()
    );
    let labelled = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MULTICLUSTER_LABEL))
        .is_some_and(|v| v == "true");
    if !labelled {
        return Err(RemoteError::NotMulticluster(name));
    }
    let data = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k, String::from_utf8(v.0.clone())));
    let string_data = secret.string_data.iter().flatten().map(|(k, v)| (k, Ok(v.clone())));
    let mut out = BTreeMap::new();
    for (cluster, text) in data.chain(string_data) {
        let bad = |reason: String| RemoteError::Kubeconfig {
            secret: name.clone(),
            cluster: cluster.clone(),
            reason,
        };
        check_cluster_id(cluster)?;
        let text = text.map_err(|_| bad("not UTF-8".into()))?;
        let config = ::kube::config::Kubeconfig::from_yaml(&text).map_err(|e| bad(e.to_string()))?;
        if config.clusters.is_empty() {
            return Err(bad("the kubeconfig names no cluster".into()));
        }
        check_safe(&config).map_err(bad)?;
        out.insert(cluster.clone(), text);
    }
    if out.is_empty() {
        return Err(RemoteError::Empty(name));
    }
    Ok(out)
}

/// Refuses what a kubeconfig could make the controller do beyond talking to its server, as
/// Istio's remote-secret sanitizing does: run a program (`exec`, auth providers other than
/// `oidc`, whose `cmd-path` some run) or read the controller's own files (`token-file`,
/// `client-certificate`, `client-key`, `certificate-authority`: a token file pointed at the
/// controller's service account token would send it to whatever server the Secret names).
/// Whoever can write a remote Secret gets to name a server and credentials, nothing more.
pub fn check_safe(config: &::kube::config::Kubeconfig) -> Result<(), String> {
    for user in &config.auth_infos {
        let Some(auth) = &user.auth_info else { continue };
        let refuse = |what: &str| {
            Err(format!(
                "user {:?}: {what} is not allowed in a remote kubeconfig",
                user.name
            ))
        };
        if auth.exec.is_some() {
            return refuse("exec");
        }
        if let Some(p) = auth.auth_provider.as_ref().filter(|p| p.name != "oidc") {
            return refuse(&format!("auth-provider {:?}", p.name));
        }
        for (field, set) in [
            ("tokenFile", &auth.token_file),
            ("client-certificate", &auth.client_certificate),
            ("client-key", &auth.client_key),
        ] {
            if set.is_some() {
                return refuse(field);
            }
        }
    }
    for cluster in &config.clusters {
        if cluster
            .cluster
            .as_ref()
            .is_some_and(|c| c.certificate_authority.is_some())
        {
            return Err(format!(
                "cluster {:?}: certificate-authority (a file path) is not allowed in a remote kubeconfig",
                cluster.name
            ));
        }
    }
    Ok(())
}

/// A client for a remote cluster from its kubeconfig (its current context).
pub async fn client_for(kubeconfig: &str) -> Result<::kube::Client, String> {
    let config = ::kube::config::Kubeconfig::from_yaml(kubeconfig).map_err(|e| e.to_string())?;
    check_safe(&config)?;
    let options = ::kube::config::KubeConfigOptions::default();
    let config = ::kube::Config::from_custom_kubeconfig(config, &options)
        .await
        .map_err(|e| e.to_string())?;
    ::kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// The kinds whose watch decides whether a remote cluster can be read.
const DISCOVERY: [Kind; 5] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Gateway,
];

/// Cluster mode: one remote cluster through `kubeconfig`, with the local cluster's watches;
/// a discovery kind failing makes the cluster fail (withdrawn after `grace`). Runs until
/// aborted (its Secret changed or went) or the controller is gone.
pub async fn run_cluster(cluster: String, kubeconfig: String, grace: Duration, tx: ChangeSender) {
    let mut health = Health::new(grace);
    let send_state = |state: Option<RemoteState>| {
        let (tx, cluster) = (tx.clone(), cluster.clone());
        async move {
            match state {
                Some(s) => tx.send(Change::Cluster(ClusterChange::State(cluster, s))).await.is_ok(),
                None => true,
            }
        }
    };
    let client = loop {
        match client_for(&kubeconfig).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(%cluster, error = %e, "remote cluster: no client");
                if !send_state(health.observe(Instant::now(), Err(e))).await {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let (inner_tx, mut inner_rx) = mpsc::channel(1024);
    let watches = tokio::spawn(crate::k8s::watch::run(client, inner_tx));
    let mut failing: BTreeMap<Kind, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let outcome = tokio::select! {
            change = inner_rx.recv() => {
                let Some(change) = change else { break };
                if let Change::KindState(kind, state) = &change {
                    if DISCOVERY.contains(kind) {
                        match state {
                            KindSync::Failing { reason, .. } => drop(failing.insert(*kind, reason.clone())),
                            _ => drop(failing.remove(kind)),
                        }
                    }
                }
                if tx.send(tagged(&cluster, change)).await.is_err() {
                    break;
                }
                continue;
            }
            _ = tick.tick() => match failing.iter().next() {
                Some((kind, reason)) => Err(format!("{}: {reason}", kind.name())),
                None => Ok(()),
            },
        };
        if !send_state(health.observe(Instant::now(), outcome)).await {
            break;
        }
    }
    watches.abort();
}

/// Cluster mode: watches the remote Secrets in `namespace` and runs one [`run_cluster`] per
/// cluster id they hold; a cluster whose Secret goes (or no longer names it) is removed at
/// once, one whose kubeconfig changed is restarted.
pub async fn watch_secrets(client: ::kube::Client, namespace: String, grace: Duration, tx: ChangeSender) {
    use futures_util::StreamExt;
    use kube::runtime::{watcher, WatchStreamExt};
    let api: ::kube::Api<Secret> = ::kube::Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{MULTICLUSTER_LABEL}=true"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut running = Running::default();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => running.apply(&s, grace, &tx),
            Ok(watcher::Event::Delete(s)) => running.delete(&s, &tx).await,
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => tracing::warn!(error = %e, "remote Secrets watch failed, retrying"),
        }
    }
}

/// The remote clusters running, by the Secret that names them.
#[derive(Default)]
struct Running {
    by_secret: BTreeMap<String, BTreeMap<String, (String, tokio::task::AbortHandle)>>,
}

fn secret_name(s: &Secret) -> String {
    s.metadata.name.clone().unwrap_or_default()
}

impl Running {
    fn apply(&mut self, secret: &Secret, grace: Duration, tx: &ChangeSender) {
        let name = secret_name(secret);
        let wanted = match parse_secret(secret) {
            Ok(w) => w,
            Err(e) => {
                // A broken Secret changes nothing: the clusters it named keep running.
                tracing::warn!(secret = %name, error = %e, "remote Secret not usable");
                return;
            }
        };
        let mut old = self.by_secret.remove(&name).unwrap_or_default();
        let mut now = BTreeMap::new();
        for (cluster, kubeconfig) in wanted {
            match old.remove(&cluster) {
                Some((known, task)) if known == kubeconfig => drop(now.insert(cluster, (known, task))),
                previous => {
                    if let Some((_, task)) = previous {
                        task.abort();
                    }
                    tracing::info!(secret = %name, %cluster, "remote cluster added");
                    let task = tokio::spawn(run_cluster(cluster.clone(), kubeconfig.clone(), grace, tx.clone()));
                    now.insert(cluster, (kubeconfig, task.abort_handle()));
                }
            }
        }
        for (cluster, (_, task)) in old {
            task.abort();
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(Change::Cluster(ClusterChange::Removed(cluster))).await });
        }
        self.by_secret.insert(name, now);
    }

    async fn delete(&mut self, secret: &Secret, tx: &ChangeSender) {
        for (cluster, (_, task)) in self.by_secret.remove(&secret_name(secret)).unwrap_or_default() {
            task.abort();
            tracing::info!(%cluster, "remote cluster removed");
            let _ = tx.send(Change::Cluster(ClusterChange::Removed(cluster))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_dirs_parse() {
        let r: RemoteDir = "c69=/tmp/b".parse().unwrap();
        assert_eq!((r.cluster.as_str(), r.dir.to_str()), ("c69", Some("/tmp/b")));
        for bad in ["c69", "=/tmp/b", "c69=", "a/b=/tmp", "c 1=/x"] {
            assert!(bad.parse::<RemoteDir>().is_err(), "{bad}");
        }
    }

    /// The grace period: failing at once, withdrawn only after `grace`, back when readable.
    #[test]
    fn health_withdraws_after_the_grace_period() {
        let mut h = Health::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(h.observe(t0, Ok(())), Some(RemoteState::Synced));
        assert_eq!(h.observe(t0, Ok(())), None, "unchanged");
        let down = || Err("gone".to_owned());
        let failing = h.observe(t0 + Duration::from_secs(1), down());
        assert_eq!(failing, Some(RemoteState::Failing { reason: "gone".into() }));
        assert_eq!(
            h.observe(t0 + Duration::from_secs(30), down()),
            None,
            "29 s down: still failing"
        );
        let withdrawn = h.observe(t0 + Duration::from_secs(31), down());
        assert_eq!(withdrawn, Some(RemoteState::Withdrawn { reason: "gone".into() }));
        assert_eq!(
            h.observe(t0 + Duration::from_secs(40), Ok(())),
            Some(RemoteState::Synced)
        );
        // A new outage starts a new grace period.
        assert!(matches!(
            h.observe(t0 + Duration::from_secs(41), down()),
            Some(RemoteState::Failing { .. })
        ));
        assert_eq!(h.observe(t0 + Duration::from_secs(70), down()), None);
    }

    fn secret(yaml: &str) -> Secret {
        serde_yaml::from_str(yaml).unwrap()
    }

    const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: c69
  cluster: {server: 'https://10.90.69.10:6443', certificate-authority-data: bm90IGEgcmVhbCBDQQ==}
users:
- name: reader
  user: {token: abc}
contexts:
- name: c69
  context: {cluster: c69, user: reader}
current-context: c69
";

    /// Istio's remote Secret (as `istioctl create-remote-secret` prints it) and the same read
    /// back from the API (base64 `data`).
    #[test]
    fn remote_secrets_parse() {
        let indented: String = KUBECONFIG.lines().map(|l| format!("    {l}\n")).collect();
        let written = secret(&format!(
            "apiVersion: v1
kind: Secret
metadata:
  name: istio-remote-secret-c69
  namespace: istio-system
  annotations: {{networking.istio.io/cluster: c69}}
  labels: {{istio/multiCluster: 'true'}}
stringData:
  c69: |
{indented}"
        ));
        let parsed = parse_secret(&written).unwrap();
        assert_eq!(parsed.keys().collect::<Vec<_>>(), ["c69"]);
        assert!(parsed["c69"].contains("https://10.90.69.10:6443"));
        let b64 = {
            use std::fmt::Write;
            // Base64 without a dependency: k8s-openapi's ByteString decodes it on parse.
            let json = serde_json::to_string(&k8s_openapi::ByteString(KUBECONFIG.as_bytes().to_vec())).unwrap();
            let mut s = String::new();
            let _ = write!(s, "{}", json.trim_matches('"'));
            s
        };
        let read = secret(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: r, namespace: istio-system, labels: {{istio/multiCluster: 'true'}}}}\ndata: {{c69: {b64}}}"
        ));
        assert_eq!(parse_secret(&read).unwrap(), parsed);
    }

    #[test]
    fn unusable_remote_secrets_are_refused() {
        let base = "apiVersion: v1\nkind: Secret\nmetadata: {name: r, namespace: istio-system, labels: {istio/multiCluster: 'true'}}\n";
        let unlabelled =
            secret("apiVersion: v1\nkind: Secret\nmetadata: {name: r, namespace: istio-system}\nstringData: {c69: x}");
        assert!(matches!(
            parse_secret(&unlabelled),
            Err(RemoteError::NotMulticluster(_))
        ));
        assert!(matches!(parse_secret(&secret(base)), Err(RemoteError::Empty(_))));
        let garbage = secret(&format!("{base}stringData: {{c69: 'not: [a kubeconfig'}}"));
        assert!(matches!(parse_secret(&garbage), Err(RemoteError::Kubeconfig { .. })));
        let no_cluster = secret(&format!("{base}stringData: {{c69: 'apiVersion: v1\nkind: Config'}}"));
        assert!(matches!(parse_secret(&no_cluster), Err(RemoteError::Kubeconfig { .. })));
        let bad_id = secret(&format!("{base}stringData: {{'a/b': x}}"));
        assert!(matches!(parse_secret(&bad_id), Err(RemoteError::ClusterId(_))));
    }

    /// A remote Secret must not make the controller run a program or read its own files
    /// (an `exec` user ran `sh` as the controller; a `token-file` sent its token away).
    #[tokio::test]
    async fn remote_kubeconfigs_cannot_run_programs_or_read_local_files() {
        let base = "apiVersion: v1\nkind: Secret\nmetadata: {name: r, namespace: istio-system, labels: {istio/multiCluster: 'true'}}\n";
        let cluster = "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]";
        let context = "contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c";
        let marker = std::env::temp_dir().join(format!("exec-ran-{}", std::process::id()));
        let users = [
            format!(
                "{{exec: {{apiVersion: client.authentication.k8s.io/v1, command: sh, args: ['-c', 'touch {}']}}}}",
                marker.display()
            ),
            "{auth-provider: {name: gcp, config: {cmd-path: /bin/true}}}".to_owned(),
            "{tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token}".to_owned(),
            "{client-certificate: /etc/cert.pem, client-key: /etc/key.pem}".to_owned(),
        ];
        for user in users {
            let kubeconfig =
                format!("apiVersion: v1\nkind: Config\n{cluster}\n{context}\nusers: [{{name: u, user: {user}}}]\n");
            let mut s = secret(base);
            s.string_data = Some([("c69".to_owned(), kubeconfig.clone())].into());
            assert!(
                matches!(parse_secret(&s), Err(RemoteError::Kubeconfig { .. })),
                "{user}"
            );
            assert!(client_for(&kubeconfig).await.is_err(), "{user}");
        }
        assert!(!marker.exists(), "the exec plugin ran");
        let ca_file = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:1', certificate-authority: /etc/ca.pem}}}}]\n{context}\nusers: [{{name: u, user: {{token: t}}}}]\n"
        );
        assert!(check_safe(&::kube::config::Kubeconfig::from_yaml(&ca_file).unwrap()).is_err());
        // oidc and inline credentials stay allowed.
        let ok =
            format!("apiVersion: v1\nkind: Config\n{cluster}\n{context}\nusers: [{{name: u, user: {{token: t}}}}]\n");
        assert!(check_safe(&::kube::config::Kubeconfig::from_yaml(&ok).unwrap()).is_ok());
    }

    /// The next state `rx` reports for cluster `id`, skipping its objects.
    async fn next_state(rx: &mut mpsc::Receiver<Change>, objects: &mut usize) -> RemoteState {
        loop {
            let c = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("in time")
                .expect("open");
            match c {
                Change::Cluster(ClusterChange::State(id, s)) if id == "c69" => return s,
                Change::Cluster(ClusterChange::Objects(id, c)) if id == "c69" => {
                    if let Change::Replace(_, o) = *c {
                        *objects += o.len();
                    }
                }
                other => panic!("{other}"),
            }
        }
    }

    /// A remote directory is read and tagged with its cluster; once it goes, the cluster
    /// fails at once and is withdrawn after the grace period, and comes back with it.
    #[tokio::test]
    async fn a_remote_directory_that_goes_is_withdrawn_after_the_grace_period() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c69");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let remote = RemoteDir {
            cluster: "c69".into(),
            dir: dir.clone(),
        };
        let grace = Duration::from_millis(300);
        let task = tokio::spawn(watch_dir(remote, None, Duration::from_millis(20), grace, tx));
        let mut objects = 0;
        assert_eq!(next_state(&mut rx, &mut objects).await, RemoteState::Synced);
        let moved = tmp.path().join("away");
        std::fs::rename(&dir, &moved).unwrap();
        let failing = next_state(&mut rx, &mut objects).await;
        let since = Instant::now();
        assert!(matches!(failing, RemoteState::Failing { .. }), "{failing:?}");
        let withdrawn = next_state(&mut rx, &mut objects).await;
        assert!(matches!(withdrawn, RemoteState::Withdrawn { .. }), "{withdrawn:?}");
        assert!(
            since.elapsed() >= grace - Duration::from_millis(40),
            "withdrawn after {:?}",
            since.elapsed()
        );
        std::fs::rename(&moved, &dir).unwrap();
        assert_eq!(next_state(&mut rx, &mut objects).await, RemoteState::Synced);
        assert_eq!(objects, 1, "the namespace, read once");
        task.abort();
    }

    /// The next `Removed` on `rx` (remote clusters' own changes skipped).
    async fn next_removed(rx: &mut mpsc::Receiver<Change>) -> String {
        loop {
            let c = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("in time");
            if let Some(Change::Cluster(ClusterChange::Removed(id))) = c {
                return id;
            }
        }
    }

    fn kubeconfig_secret(clusters: &[(&str, &str)]) -> Secret {
        let mut data = String::new();
        for (id, server) in clusters {
            let config = KUBECONFIG.replace("https://10.90.69.10:6443", server);
            data.push_str(&format!("  {id}: {}\n", serde_json::to_string(&config).unwrap()));
        }
        secret(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: r, namespace: istio-system, labels: {{istio/multiCluster: 'true'}}}}\nstringData:\n{data}"
        ))
    }

    /// A Secret's clusters start once, restart when their kubeconfig changes, stay when the
    /// Secret becomes unusable, and are removed when the Secret drops them or goes.
    #[tokio::test]
    async fn remote_secrets_start_restart_and_remove_clusters() {
        let (tx, mut rx) = mpsc::channel(1024);
        let grace = Duration::from_secs(30);
        let mut running = Running::default();
        let ids = |r: &Running| {
            r.by_secret["r"]
                .iter()
                .map(|(k, (_, t))| (k.clone(), t.id()))
                .collect::<Vec<_>>()
        };
        // Nothing listens on port 1: the clusters fail to be read, which is not what this tests.
        running.apply(
            &kubeconfig_secret(&[("c69", "https://127.0.0.1:1"), ("c70", "https://127.0.0.1:1")]),
            grace,
            &tx,
        );
        let first = ids(&running);
        assert_eq!(
            first.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["c69", "c70"]
        );
        running.apply(
            &kubeconfig_secret(&[("c69", "https://127.0.0.1:1"), ("c70", "https://127.0.0.1:1")]),
            grace,
            &tx,
        );
        assert_eq!(ids(&running), first, "unchanged: not restarted");
        running.apply(
            &kubeconfig_secret(&[("c69", "https://127.0.0.1:2"), ("c70", "https://127.0.0.1:1")]),
            grace,
            &tx,
        );
        let now = ids(&running);
        assert_ne!(now[0], first[0], "c69's kubeconfig changed: restarted");
        assert_eq!(now[1], first[1]);
        let mut broken = kubeconfig_secret(&[]);
        broken.string_data = Some([("c69".to_owned(), "not: [yaml".to_owned())].into());
        running.apply(&broken, grace, &tx);
        assert_eq!(ids(&running), now, "an unusable Secret changes nothing");
        running.apply(&kubeconfig_secret(&[("c69", "https://127.0.0.1:2")]), grace, &tx);
        assert_eq!(next_removed(&mut rx).await, "c70");
        running.delete(&kubeconfig_secret(&[]), &tx).await;
        assert_eq!(next_removed(&mut rx).await, "c69");
        assert!(running.by_secret.is_empty());
    }

    #[tokio::test]
    async fn a_client_is_built_from_a_remote_kubeconfig() {
        client_for(KUBECONFIG).await.expect("client");
        assert!(client_for("apiVersion: v1\nkind: Config\n").await.is_err());
    }
}
