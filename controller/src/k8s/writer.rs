//! Applies the waypoint controller's [`WaypointDeployment`] records while this replica leads:
//! a ServiceAccount, a Deployment of the waypoint binary and a Service, by server-side apply and
//! owned by the Gateway (deleting the Gateway garbage-collects them), then the Gateway's status.
//! Also writes problems found in Istio policies to their status. The manifests are built by
//! pure functions; status writes are skipped when nothing changed, so a status update never
//! feeds back into another one through the watch.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use ::kube::api::{DynamicObject, Patch, PatchParams};
use ::kube::{Api, Client};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile, SecurityContext,
    Service, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::resources::{api_resource, served_version};
use super::{KubeError, FIELD_MANAGER};
use crate::model::gateway::{Gateway, GatewayClass, WAYPOINT_CLASS};
use crate::model::{Kind, ObjectKey, ObjectMeta, ServiceAccount};
use crate::waypoint::{Condition, WaypointDeployment};

/// Selects a waypoint's pods (Gateway API's standard label).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Marks pods as a managed gateway; the node agent never captures them.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub const MANAGED_VALUE: &str = "istio.io-mesh-controller";
/// Waypoints carry mesh traffic themselves and must not be captured.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// The waypoint serves `/metrics` and `/healthz/ready` here.
pub const METRICS_PORT: u16 = 15020;
/// The ConfigMap (one per waypoint namespace) holding the mesh's root certificate.
pub const ROOT_CERT_CONFIGMAP: &str = "mesh-root-cert";
/// Audience of the token waypoints present to the CA and xDS server (TokenReview checks it).
pub const TOKEN_AUDIENCE: &str = "istio-ca";
const ROOT_CERT_DIR: &str = "/var/run/secrets/mesh";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// The waypoint runs as the proxies' conventional user and group, Istio's 1337. It equals
/// the socket mark (`mesh_core::capture::MESH_MARK`) only by Istio's convention; they are
/// unrelated.
const PROXY_UID: i64 = 1337;

/// What the writer needs besides the records.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// The waypoint container image.
    pub image: String,
    /// The controller's xDS and CA address the waypoint connects to (`https://host:15012`).
    pub xds_address: String,
    /// The mesh root certificate (PEM), published to each waypoint namespace.
    pub root_cert: String,
    /// Wait before retrying records whose apply failed.
    pub retry: Duration,
}

/// Applies `records` whenever they or the leadership change, and only while leading. Returns
/// when either channel closes.
pub async fn run(
    client: Client,
    config: WriterConfig,
    mut leader: watch::Receiver<bool>,
    mut records: watch::Receiver<Vec<WaypointDeployment>>,
) {
    // What was applied successfully during the current leadership.
    let mut applied: HashMap<ObjectKey, WaypointDeployment> = HashMap::new();
    // Whether the waypoint GatewayClass's Accepted condition is written this leadership (a
    // missing class is tried again on the next change).
    let mut class_accepted = false;
    loop {
        let leading = *leader.borrow_and_update();
        let current = records.borrow_and_update().clone();
        let mut failed = false;
        if leading && !class_accepted {
            match accept_gateway_class(&client).await {
                Ok(done) => class_accepted = done,
                Err(e) => {
                    warn!(error = %e, "writing the GatewayClass status failed");
                    failed = true;
                }
            }
        }
        if leading {
            for record in current {
                if applied.get(&record.gateway) == Some(&record) {
                    continue;
                }
                match apply_waypoint(&client, &record, &config).await {
                    Ok(()) => drop(applied.insert(record.gateway.clone(), record)),
                    Err(e) => {
                        warn!(gateway = %record.gateway, error = %e, "applying waypoint failed");
                        failed = true;
                    }
                }
            }
        } else {
            // Re-apply everything on the next leadership: another replica may have written since.
            applied.clear();
            class_accepted = false;
        }
        tokio::select! {
            changed = leader.changed() => if changed.is_err() { return },
            changed = records.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(config.retry), if failed => {}
        }
    }
}

/// Applies one waypoint's ServiceAccount, Deployment and Service, then the Gateway's status.
pub async fn apply_waypoint(
    client: &Client,
    record: &WaypointDeployment,
    config: &WriterConfig,
) -> Result<(), KubeError> {
    if owner_reference(record).is_none() {
        return Err(KubeError::Waypoint(
            record.gateway.clone(),
            "the record has no Gateway uid",
        ));
    }
    let ns = &record.gateway.namespace;
    let name = &record.gateway.name;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // Shared by every waypoint of the namespace, so not owned by this Gateway.
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch(ROOT_CERT_CONFIGMAP, &params, &Patch::Apply(&root_cert_for(ns, config)))
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .patch(
            &record.service_account,
            &params,
            &Patch::Apply(&service_account_for(record)),
        )
        .await?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(name, &params, &Patch::Apply(&deployment_for(record, config)))
        .await?;
    let service = Api::<Service>::namespaced(client.clone(), ns)
        .patch(name, &params, &Patch::Apply(&service_for(record)))
        .await?;
    let address = service
        .spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .or(record.address);

    let gateways = Api::<Gateway>::namespaced(client.clone(), ns);
    let Some(gateway) = gateways.get_opt(name).await? else {
        debug!(gateway = %record.gateway, "Gateway is gone, not writing its status");
        return Ok(());
    };
    let existing = gateway.status.unwrap_or_default();
    let existing = json!({"addresses": existing.addresses, "conditions": existing.conditions});
    let status = gateway_status(
        record,
        address,
        gateway.metadata.generation,
        &existing,
        Timestamp::now(),
    );
    if status == existing {
        return Ok(());
    }
    gateways
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    info!(gateway = %record.gateway, ?address, "waypoint applied");
    Ok(())
}

/// Writes `messages` (problems found translating an Istio policy) to its `status.conditions`:
/// `Accepted=False` with the messages, or `Accepted=True` when there are none.
pub async fn report_problems(
    client: &Client,
    kind: Kind,
    key: &ObjectKey,
    messages: &[String],
) -> Result<(), KubeError> {
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &key.namespace, &api_resource(kind));
    let Some(object) = api.get_opt(&key.name).await? else {
        return Ok(());
    };
    let existing = object
        .data
        .pointer("/status/conditions")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    let desired = [problems_condition(messages)];
    let conditions = conditions(
        &desired,
        existing.as_array().map_or(&[], Vec::as_slice),
        object.metadata.generation,
        Timestamp::now(),
    );
    if conditions == existing {
        return Ok(());
    }
    api.patch_status(
        &key.name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conditions}})),
    )
    .await?;
    Ok(())
}

/// The condition [`report_problems`] writes.
pub fn problems_condition(messages: &[String]) -> Condition {
    if messages.is_empty() {
        Condition {
            kind: "Accepted".into(),
            status: true,
            reason: "Accepted".into(),
            message: String::new(),
        }
    } else {
        Condition {
            kind: "Accepted".into(),
            status: false,
            reason: "UnsupportedValue".into(),
            message: messages.join("; "),
        }
    }
}

/// Status conditions as written: `lastTransitionTime` is kept from the existing condition of the
/// same type while its status is unchanged, so rewriting the same status is a no-op.
pub fn conditions(desired: &[Condition], existing: &[Value], generation: Option<i64>, now: Timestamp) -> Value {
    let conditions = desired
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let previous = existing
                .iter()
                .find(|e| e.get("type").and_then(Value::as_str) == Some(c.kind.as_str()));
            let since = previous
                .filter(|p| p.get("status").and_then(Value::as_str) == Some(status))
                .and_then(|p| p.get("lastTransitionTime").cloned())
                .unwrap_or_else(|| Value::String(now.to_string()));
            let mut condition = json!({
                "type": c.kind,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": since,
            });
            if let (Some(generation), Some(map)) = (generation, condition.as_object_mut()) {
                map.insert("observedGeneration".into(), generation.into());
            }
            condition
        })
        .collect();
    Value::Array(conditions)
}

/// The Gateway's `status` (addresses and conditions) for `record`; `existing` is the current
/// status, whose `lastTransitionTime`s are kept where nothing changed.
pub fn gateway_status(
    record: &WaypointDeployment,
    address: Option<IpAddr>,
    generation: Option<i64>,
    existing: &Value,
    now: Timestamp,
) -> Value {
    let existing = existing
        .get("conditions")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let addresses: Vec<Value> = address
        .map(|ip| json!({"type": "IPAddress", "value": ip.to_string()}))
        .into_iter()
        .collect();
    json!({
        "addresses": addresses,
        "conditions": conditions(&record.conditions, existing, generation, now),
    })
}

/// The controller name of the waypoint GatewayClass (manifests/waypoint/gatewayclass.yaml).
pub const WAYPOINT_CONTROLLER: &str = "istio.io/waypoint-controller";

/// The `status` to write on a GatewayClass: `Accepted=True` when it is our waypoint class and
/// names our controller; `None` for any other class (not ours to judge). `existing` is the
/// current status, whose `lastTransitionTime` is kept while nothing changed.
pub fn gateway_class_status(
    class: &GatewayClass,
    existing: &Value,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Value> {
    let name = class.metadata.name.as_deref()?;
    if name != WAYPOINT_CLASS || class.spec.controller_name != WAYPOINT_CONTROLLER {
        return None;
    }
    let accepted = Condition {
        kind: "Accepted".into(),
        status: true,
        reason: "Accepted".into(),
        message: "waypoints of this class are deployed by the mesh controller".into(),
    };
    let existing = existing
        .get("conditions")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    Some(json!({"conditions": conditions(&[accepted], existing, generation, now)}))
}

/// Writes `Accepted` on the waypoint GatewayClass when it exists and is ours; true when there
/// is nothing left to do (written, unchanged, or not ours), false when the class is missing.
pub async fn accept_gateway_class(client: &Client) -> Result<bool, KubeError> {
    let api = Api::<GatewayClass>::all(client.clone());
    let Some(class) = api.get_opt(WAYPOINT_CLASS).await? else {
        return Ok(false);
    };
    let existing = serde_json::to_value(&class.status)?;
    let Some(status) = gateway_class_status(&class, &existing, class.metadata.generation, Timestamp::now()) else {
        return Ok(true);
    };
    if existing.get("conditions") == status.get("conditions") {
        return Ok(true);
    }
    api.patch_status(
        WAYPOINT_CLASS,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    info!(class = WAYPOINT_CLASS, "GatewayClass accepted");
    Ok(true)
}

/// The owner reference to the Gateway (`None` without a uid, as in local mode).
pub fn owner_reference(record: &WaypointDeployment) -> Option<OwnerReference> {
    if record.gateway_uid.is_empty() {
        return None;
    }
    Some(OwnerReference {
        api_version: format!("{}/{}", Kind::Gateway.group(), served_version(Kind::Gateway)),
        kind: Kind::Gateway.name().to_owned(),
        name: record.gateway.name.clone(),
        uid: record.gateway_uid.clone(),
        controller: Some(true),
        // blockOwnerDeletion would need `update` on gateways/finalizers; not worth the RBAC.
        block_owner_deletion: None,
    })
}

/// The labels selecting a waypoint's pods.
pub fn selector_labels(record: &WaypointDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), record.gateway.name.clone())])
}

fn metadata(record: &WaypointDeployment, name: &str) -> ObjectMeta {
    let mut labels = selector_labels(record);
    labels.insert(MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned());
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(record.gateway.namespace.clone()),
        labels: Some(labels),
        owner_references: owner_reference(record).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

pub fn service_account_for(record: &WaypointDeployment) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(record, &record.service_account),
        ..ServiceAccount::default()
    }
}

/// The waypoint binary's arguments: who it is, where the control plane is, and the files the
/// pod mounts (the root certificate and a projected token for the CA's TokenReview).
pub fn waypoint_args(record: &WaypointDeployment, config: &WriterConfig) -> Vec<String> {
    vec![
        "--identity".into(),
        record.identity.clone(),
        "--gateway".into(),
        format!("{}/{}", record.gateway.namespace, record.gateway.name),
        "--xds-address".into(),
        config.xds_address.clone(),
        "--ca-address".into(),
        config.xds_address.clone(),
        "--trust-bundle".into(),
        format!("{ROOT_CERT_DIR}/root-cert.pem"),
        "--token-file".into(),
        format!("{TOKEN_DIR}/mesh-token"),
        "--hbone-addr".into(),
        format!("0.0.0.0:{}", record.hbone_port),
        "--metrics-addr".into(),
        format!("0.0.0.0:{METRICS_PORT}"),
    ]
}

/// The namespace's copy of the root certificate waypoints verify the control plane with.
pub fn root_cert_for(namespace: &str, config: &WriterConfig) -> ConfigMap {
    ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(ROOT_CERT_CONFIGMAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned())].into()),
            ..Default::default()
        },
        data: Some([("root-cert.pem".to_owned(), config.root_cert.clone())].into()),
        ..ConfigMap::default()
    }
}

fn waypoint_volumes() -> (Vec<Volume>, Vec<VolumeMount>) {
    let volumes = vec![
        Volume {
            name: "root-cert".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: ROOT_CERT_CONFIGMAP.to_owned(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "mesh-token".to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(43200),
                        path: "mesh-token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mounts = vec![
        VolumeMount {
            name: "root-cert".to_owned(),
            mount_path: ROOT_CERT_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "mesh-token".to_owned(),
            mount_path: TOKEN_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    (volumes, mounts)
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

fn port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

pub fn deployment_for(record: &WaypointDeployment, config: &WriterConfig) -> Deployment {
    let mut pod_labels = metadata(record, &record.gateway.name).labels.unwrap_or_default();
    pod_labels.insert(DATAPLANE_MODE_LABEL.to_owned(), "none".to_owned());
    let (volumes, mounts) = waypoint_volumes();
    let container = Container {
        volume_mounts: Some(mounts),
        name: "waypoint".to_owned(),
        image: Some(config.image.clone()),
        args: Some(waypoint_args(record, config)),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ]),
        ports: Some(vec![port("hbone", record.hbone_port), port("metrics", METRICS_PORT)]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(i32::from(METRICS_PORT)),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Deployment {
        metadata: metadata(record, &record.gateway.name),
        spec: Some(DeploymentSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(record)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(record.service_account.clone()),
                    // The projected token above is the only credential it needs.
                    automount_service_account_token: Some(false),
                    // Requests in flight get the waypoint's drain (5 s) and a margin.
                    termination_grace_period_seconds: Some(10),
                    volumes: Some(volumes),
                    containers: vec![container],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

pub fn service_for(record: &WaypointDeployment) -> Service {
    Service {
        metadata: metadata(record, &record.gateway.name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(record)),
            ports: Some(vec![ServicePort {
                name: Some("mesh".to_owned()),
                port: i32::from(record.hbone_port),
                target_port: Some(IntOrString::String("hbone".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Istio kinds whose status carries translation problems.
fn reports_status(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::AuthorizationPolicy
            | Kind::PeerAuthentication
            | Kind::RequestAuthentication
            | Kind::VirtualService
            | Kind::DestinationRule
    )
}

/// Keeps problems on the status of the Istio objects that caused them (only while leading):
/// objects with problems get `Accepted=False` with the messages, objects whose problems went
/// away get `Accepted=True` again.
pub async fn run_status(
    client: Client,
    mut leader: watch::Receiver<bool>,
    mut problems: watch::Receiver<Vec<crate::translate::Problem>>,
) {
    let mut reported: BTreeMap<(Kind, ObjectKey), Vec<String>> = BTreeMap::new();
    loop {
        if *leader.borrow_and_update() {
            let mut now: BTreeMap<(Kind, ObjectKey), Vec<String>> = BTreeMap::new();
            // Kind-level problems (object "*": the kind cannot be listed) have no object to
            // carry a status; they are in /debug/problems and the log.
            let on_objects = |p: &&crate::translate::Problem| reports_status(p.kind) && p.object.name != "*";
            for p in problems.borrow_and_update().iter().filter(on_objects) {
                now.entry((p.kind, p.object.clone()))
                    .or_default()
                    .push(p.message.clone());
            }
            let cleared: Vec<(Kind, ObjectKey)> = reported.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
            for (kind, key) in cleared {
                if let Err(e) = report_problems(&client, kind, &key, &[]).await {
                    warn!(%key, error = %e, "cannot clear policy status");
                }
            }
            for ((kind, key), messages) in &now {
                if reported.get(&(*kind, key.clone())) == Some(messages) {
                    continue;
                }
                if let Err(e) = report_problems(&client, *kind, key, messages).await {
                    warn!(%key, error = %e, "cannot write policy status");
                }
            }
            reported = now;
        } else {
            reported.clear();
        }
        tokio::select! {
            r = leader.changed() => if r.is_err() { return },
            r = problems.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waypoint::WaypointFor;

    fn record() -> WaypointDeployment {
        WaypointDeployment {
            gateway: ObjectKey::new("apps", "waypoint"),
            gateway_uid: "uid-1".into(),
            service_account: "waypoint".into(),
            identity: "spiffe://cluster.local/ns/apps/sa/waypoint".into(),
            waypoint_for: WaypointFor::Service,
            hbone_port: mesh_core::capture::HBONE_PORT,
            address: None,
            conditions: vec![
                Condition {
                    kind: "Accepted".into(),
                    status: true,
                    reason: "Accepted".into(),
                    message: String::new(),
                },
                Condition {
                    kind: "Programmed".into(),
                    status: false,
                    reason: "Pending".into(),
                    message: "waiting for the deployment".into(),
                },
            ],
        }
    }

    fn config() -> WriterConfig {
        WriterConfig {
            image: "mesh/waypoint:1".into(),
            xds_address: "https://mesh-controller.istio-system:15012".into(),
            root_cert: "-----BEGIN CERTIFICATE-----\n".into(),
            retry: Duration::from_secs(5),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid time")
    }

    fn class(name: &str, controller: &str) -> GatewayClass {
        serde_json::from_value(json!({
            "metadata": {"name": name, "generation": 2},
            "spec": {"controllerName": controller},
        }))
        .expect("class parses")
    }

    #[test]
    fn the_waypoint_gateway_class_is_accepted() {
        let ours = class(WAYPOINT_CLASS, WAYPOINT_CONTROLLER);
        let status = gateway_class_status(&ours, &Value::Null, Some(2), at(0)).expect("ours");
        let accepted = &status["conditions"][0];
        assert_eq!(accepted["type"], "Accepted");
        assert_eq!(accepted["status"], "True");
        assert_eq!(accepted["observedGeneration"], 2);
        // Rewriting an unchanged status keeps its transition time: no write loop.
        let again = gateway_class_status(&ours, &status, Some(2), at(60)).expect("ours");
        assert_eq!(again, status);
        // Other classes, or our name under another controller, are not ours to accept.
        assert!(gateway_class_status(&class("other", WAYPOINT_CONTROLLER), &Value::Null, None, at(0)).is_none());
        assert!(gateway_class_status(&class(WAYPOINT_CLASS, "example.com/x"), &Value::Null, None, at(0)).is_none());
    }

    #[test]
    fn everything_is_owned_by_the_gateway() {
        let r = record();
        let deployment = deployment_for(&r, &config());
        let service = service_for(&r);
        let account = service_account_for(&r);
        for meta in [&deployment.metadata, &service.metadata, &account.metadata] {
            let owners = meta.owner_references.as_deref().expect("owner references");
            assert_eq!(owners.len(), 1);
            let owner = &owners[0];
            assert_eq!(owner.api_version, "gateway.networking.k8s.io/v1");
            assert_eq!(owner.kind, "Gateway");
            assert_eq!(owner.name, "waypoint");
            assert_eq!(owner.uid, "uid-1");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("apps"));
        }
        let local = WaypointDeployment {
            gateway_uid: String::new(),
            ..r
        };
        assert!(owner_reference(&local).is_none());
        assert!(service_for(&local).metadata.owner_references.is_none());
    }

    #[test]
    fn deployment_runs_an_uncaptured_waypoint() {
        let r = record();
        let deployment = deployment_for(&r, &config());
        let spec = deployment.spec.expect("spec");
        let selector = spec.selector.match_labels.expect("selector");
        assert_eq!(selector.get(GATEWAY_NAME_LABEL).map(String::as_str), Some("waypoint"));
        let template_labels = spec.template.metadata.and_then(|m| m.labels).expect("pod labels");
        for (k, v) in &selector {
            assert_eq!(template_labels.get(k), Some(v), "the selector selects the pods");
        }
        assert_eq!(
            template_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str),
            Some("none")
        );
        assert_eq!(
            template_labels.get(MANAGED_LABEL).map(String::as_str),
            Some(MANAGED_VALUE)
        );
        assert_eq!(spec.replicas, None, "left to users and autoscalers");

        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("mesh/waypoint:1"));
        let args = container.args.as_deref().expect("args");
        assert!(args.windows(2).any(|w| w == ["--gateway", "apps/waypoint"]));
        assert!(args.windows(2).any(|w| w[0] == "--identity" && w[1] == r.identity));
        assert!(args
            .windows(2)
            .any(|w| w == ["--trust-bundle", "/var/run/secrets/mesh/root-cert.pem"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--token-file", "/var/run/secrets/tokens/mesh-token"]));
        // Every flag is one the waypoint binary accepts.
        let mut argv = vec!["waypoint".to_owned()];
        argv.extend(args.iter().cloned());
        if let Err(e) = <waypoint::config::Config as clap::Parser>::try_parse_from(&argv) {
            panic!("the waypoint refuses the generated arguments: {e}");
        }
        let volumes = pod.volumes.as_deref().expect("volumes");
        let token = volumes
            .iter()
            .find_map(|v| v.projected.as_ref())
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s[0].service_account_token.as_ref())
            .expect("projected token");
        assert_eq!(token.audience.as_deref(), Some(TOKEN_AUDIENCE));
        let ports: Vec<_> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref().unwrap_or(""), p.container_port))
            .collect();
        assert_eq!(ports, [("hbone", 15008), ("metrics", 15020)]);
        let probe = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("readiness probe");
        assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(probe.port, IntOrString::Int(15020));
    }

    #[test]
    fn service_exposes_hbone() {
        let r = record();
        let service = service_for(&r);
        let spec = service.spec.clone().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.selector, Some(selector_labels(&r)));
        let ports = spec.ports.expect("ports");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name.as_deref(), Some("mesh"));
        assert_eq!(ports[0].port, 15008);
        assert_eq!(ports[0].target_port, Some(IntOrString::String("hbone".into())));
        // Server-side apply bodies carry their type.
        let body = serde_json::to_value(&service).expect("serializes");
        assert_eq!(body["apiVersion"], "v1");
        assert_eq!(body["kind"], "Service");
        assert!(body.get("status").is_none());
    }

    #[test]
    fn gateway_status_is_stable() {
        let r = record();
        let ip: IpAddr = "10.96.0.20".parse().expect("ip");
        let first = gateway_status(&r, Some(ip), Some(3), &Value::Null, at(0));
        assert_eq!(
            first["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.20"}])
        );
        let accepted = &first["conditions"][0];
        assert_eq!(accepted["type"], "Accepted");
        assert_eq!(accepted["status"], "True");
        assert_eq!(accepted["observedGeneration"], 3);
        assert_eq!(accepted["lastTransitionTime"], at(0).to_string());
        assert_eq!(first["conditions"][1]["status"], "False");

        // Same decision later: identical status, nothing to write.
        assert_eq!(gateway_status(&r, Some(ip), Some(3), &first, at(60)), first);

        // Programmed flips: only its transition time moves.
        let mut programmed = r.clone();
        programmed.conditions[1].status = true;
        programmed.conditions[1].reason = "Programmed".into();
        let second = gateway_status(&programmed, Some(ip), Some(3), &first, at(60));
        assert_eq!(second["conditions"][0]["lastTransitionTime"], at(0).to_string());
        assert_eq!(second["conditions"][1]["lastTransitionTime"], at(60).to_string());
        assert_eq!(second["conditions"][1]["status"], "True");
    }

    #[test]
    fn problems() {
        let ok = problems_condition(&[]);
        assert!(ok.status);
        let bad = problems_condition(&["paths need a waypoint".into(), "methods too".into()]);
        assert!(!bad.status);
        assert_eq!(bad.message, "paths need a waypoint; methods too");
        let written = conditions(&[bad], &[], None, at(0));
        assert_eq!(written[0]["status"], "False");
        assert!(written[0].get("observedGeneration").is_none());
    }

    /// The generated waypoint passes the same pod-security rules the shipped manifests are
    /// checked against (scripts/pod_security.py): no exception needed.
    #[test]
    fn waypoint_container_is_locked_down() {
        let d = deployment_for(&record(), &config());
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod spec");
        let sc = pod.containers[0].security_context.clone().expect("security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_owned()]));
        assert_eq!(sc.seccomp_profile.map(|p| p.type_), Some("RuntimeDefault".to_owned()));
        assert_ne!(pod.host_network, Some(true));
    }
}
