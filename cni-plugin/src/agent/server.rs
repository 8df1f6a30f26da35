//! The agent's HTTP API for the CNI plugin, on a unix socket:
//!
//! - `POST /v1/pods/add`: decide enrolment; for an ambient pod install the redirection in its
//!   namespace and hand the namespace to ztunnel; answers `{"captured": bool}`, or an error
//!   (and undoes what it did) so the CNI ADD fails closed.
//! - `POST /v1/pods/del`: release the pod (idempotent; 404 when unknown).
//! - `POST /v1/pods/check`: 200 when an enrolled pod's rules are in place.
//! - `GET /v1/ready`: 200 once the agent serves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_proto::workload::zds::WorkloadInfo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::UnixListener;
use tracing::{info, warn};

use super::enrol::{decide, Enrolment, PodFacts};
use super::pods::Inventory;
use super::rules;
use super::zds::ZdsServer;

/// A pod request from the plugin.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRequest {
    pub container_id: String,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub ips: Vec<String>,
}

struct Enrolled {
    uid: String,
    netns: PathBuf,
}

/// The node agent.
pub struct Agent {
    pub zds: Arc<ZdsServer>,
    pub manifests: PathBuf,
    pub cluster_id: String,
    pub ports: rules::Ports,
    /// By container id.
    enrolled: Mutex<HashMap<String, Enrolled>>,
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": msg.to_string() }))
}

impl Agent {
    pub fn new(zds: Arc<ZdsServer>, manifests: PathBuf, cluster_id: String) -> Arc<Agent> {
        Arc::new(Agent {
            zds,
            manifests,
            cluster_id,
            ports: rules::Ports::default(),
            enrolled: Mutex::default(),
        })
    }

    fn enrolled(&self) -> std::sync::MutexGuard<'_, HashMap<String, Enrolled>> {
        self.enrolled.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn add(&self, req: PodRequest) -> Response<Full<Bytes>> {
        let inv = match Inventory::load(&self.manifests) {
            Ok(i) => i,
            Err(e) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading {}: {e}", self.manifests.display()),
                )
            }
        };
        let key = (req.pod_namespace.clone(), req.pod_name.clone());
        let Some(pod) = inv.pods.get(&key) else {
            // An unknown pod cannot be ambient as far as we know; say so rather than guess.
            return reply(
                StatusCode::OK,
                json!({ "captured": false, "reason": "pod not found in manifests" }),
            );
        };
        let facts = PodFacts {
            labels: Some(&pod.meta.labels),
            annotations: Some(&pod.meta.annotations),
            namespace_labels: inv.namespaces.get(&req.pod_namespace).map(|n| &n.labels),
            host_network: pod.host_network,
            container_names: &pod.containers,
        };
        if let Enrolment::Skip(reason) = decide(&facts) {
            return reply(StatusCode::OK, json!({ "captured": false, "reason": reason }));
        }
        let netns = PathBuf::from(&req.netns);
        let uid = format!("{}//Pod/{}/{}", self.cluster_id, req.pod_namespace, req.pod_name);
        match self.enrol(&uid, &netns, pod.service_account.clone(), &req).await {
            Ok(()) => {
                info!(%uid, netns = %netns.display(), "pod enrolled");
                self.enrolled()
                    .insert(req.container_id.clone(), Enrolled { uid, netns });
                reply(StatusCode::OK, json!({ "captured": true }))
            }
            Err(e) => {
                warn!(%uid, error = %e, "enrolment failed; the pod must not start");
                let _ = rules::remove(&netns);
                error(StatusCode::INTERNAL_SERVER_ERROR, format!("enrolling {uid}: {e}"))
            }
        }
    }

    async fn enrol(&self, uid: &str, netns: &Path, sa: String, req: &PodRequest) -> anyhow::Result<()> {
        let (netns_owned, ports) = (netns.to_path_buf(), self.ports);
        // nft and ip run as child processes: keep them off the async threads.
        tokio::task::spawn_blocking(move || rules::install(&netns_owned, ports)).await??;
        let fd: OwnedFd = std::fs::File::open(netns)?.into();
        let info = WorkloadInfo {
            name: req.pod_name.clone(),
            namespace: req.pod_namespace.clone(),
            service_account: sa,
        };
        self.zds.add_pod(uid, info, fd).await?;
        Ok(())
    }

    async fn del(&self, req: PodRequest) -> Response<Full<Bytes>> {
        let Some(e) = self.enrolled().remove(&req.container_id) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("container {} is not enrolled", req.container_id),
            );
        };
        self.zds.del_pod(&e.uid).await;
        let netns = e.netns.clone();
        // The namespace may already be gone: nothing left to remove then.
        if netns.exists() {
            if let Ok(Err(err)) = tokio::task::spawn_blocking(move || rules::remove(&netns)).await {
                warn!(uid = %e.uid, error = %err, "removing redirection rules failed");
            }
        }
        info!(uid = %e.uid, "pod released");
        reply(StatusCode::OK, json!({}))
    }

    fn check(&self, req: PodRequest) -> Response<Full<Bytes>> {
        match self.enrolled().get(&req.container_id) {
            None => reply(StatusCode::OK, json!({ "captured": false })),
            Some(e) if rules::installed(&e.netns) => reply(StatusCode::OK, json!({ "captured": true })),
            Some(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("redirection rules missing for {}", e.uid),
            ),
        }
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        if method == Method::GET && path == "/v1/ready" {
            return reply(StatusCode::OK, json!({ "ztunnels": self.zds.connected() }));
        }
        if method != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {path}"));
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
        };
        let pod: PodRequest = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")),
        };
        match path.as_str() {
            "/v1/pods/add" => self.add(pod).await,
            "/v1/pods/del" => self.del(pod).await,
            "/v1/pods/check" => self.check(pod),
            _ => error(StatusCode::NOT_FOUND, format!("no route {path}")),
        }
    }

    /// Serves the plugin's requests on `listener`.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "CNI socket accept failed");
                    continue;
                }
            };
            let agent = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let agent = agent.clone();
                    async move { Ok::<_, Infallible>(agent.route(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}
