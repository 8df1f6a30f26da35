//! Applies the waypoint controller's [`WaypointDeployment`] records while this replica leads:
//! the objects [`super::manifests`] builds, by server-side apply, then the Gateway's status.
//! Also writes problems found in Istio policies to their status. Status writes are skipped
//! when nothing changed, so a status update never feeds back into another one through the
//! watch. The `istio-ca-root-cert` ConfigMap of each waypoint namespace follows the CA's
//! published trust bundle (`WriterConfig::trust_bundle`): a root rotation or a switch to a
//! plug-in CA rewrites it in every namespace with a waypoint, so waypoints keep trusting the
//! controller once its serving certificate comes from the new root.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use ::kube::api::{DynamicObject, Patch, PatchParams};
use ::kube::{Api, Client};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::manifests::{
    deployment_for, hpa_for, owner_reference, pdb_for, root_cert_for, service_account_for, service_for,
    ROOT_CERT_CONFIGMAP,
};
use super::resources::api_resource;
use super::route_status;
use super::{KubeError, FIELD_MANAGER};
use crate::model::gateway::{Gateway, GatewayClass, WAYPOINT_CLASS};
use crate::model::{Kind, ObjectKey, ServiceAccount};
use crate::translate::ingress::INGRESS_CLASSES;
use crate::translate::RefusedRef;
use crate::waypoint::{Condition, WaypointDeployment};

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
    /// The CA's trust bundle as it changes (root rotation, plug-in CA); it replaces
    /// `root_cert`. None: `root_cert` as given, for good.
    pub trust_bundle: Option<watch::Receiver<String>>,
}

impl WriterConfig {
    /// Takes the CA's current trust bundle as `root_cert`; true when it changed (every
    /// namespace's root-cert ConfigMap is then stale).
    pub(crate) fn take_bundle(&mut self) -> bool {
        let Some(rx) = &mut self.trust_bundle else {
            return false;
        };
        let now = rx.borrow_and_update();
        if *now == self.root_cert {
            return false;
        }
        self.root_cert = now.clone();
        true
    }
}

/// The root-cert ConfigMap of every namespace with a waypoint among `records`, once each.
pub(crate) fn root_cert_maps<'a>(
    records: impl IntoIterator<Item = &'a WaypointDeployment>,
    config: &WriterConfig,
) -> Vec<ConfigMap> {
    let namespaces: std::collections::BTreeSet<&str> =
        records.into_iter().map(|r| r.gateway.namespace.as_str()).collect();
    namespaces.into_iter().map(|ns| root_cert_for(ns, config)).collect()
}

/// Rewrites `maps`; false when a write failed (retried after `config.retry`).
async fn apply_root_certs(client: &Client, maps: Vec<ConfigMap>) -> bool {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut ok = true;
    for map in maps {
        let ns = map.metadata.namespace.clone().unwrap_or_default();
        let api = Api::<ConfigMap>::namespaced(client.clone(), &ns);
        if let Err(e) = api.patch(ROOT_CERT_CONFIGMAP, &params, &Patch::Apply(&map)).await {
            warn!(namespace = %ns, error = %e, "updating the root certificate ConfigMap failed");
            ok = false;
        }
    }
    ok
}

/// Resolves when the trust bundle changes; never when there is none (or its sender is gone).
async fn bundle_changed(rx: &mut Option<watch::Receiver<String>>) {
    if let Some(r) = rx {
        if r.changed().await.is_ok() {
            return;
        }
    }
    *rx = None;
    std::future::pending::<()>().await;
}

/// Applies `records` whenever they or the leadership change, and only while leading. Returns
/// when either channel closes.
pub async fn run(
    client: Client,
    mut config: WriterConfig,
    mut leader: watch::Receiver<bool>,
    mut records: watch::Receiver<Vec<WaypointDeployment>>,
) {
    let mut bundle = config.trust_bundle.clone();
    config.take_bundle();
    // Root-cert ConfigMaps written before the bundle last changed.
    let mut roots_stale = false;
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
        roots_stale |= config.take_bundle();
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
            if roots_stale {
                let ok = apply_root_certs(&client, root_cert_maps(applied.values(), &config)).await;
                roots_stale = !ok;
                failed |= !ok;
            }
        } else {
            // Re-apply everything on the next leadership: another replica may have written since.
            applied.clear();
            class_accepted = false;
        }
        tokio::select! {
            changed = leader.changed() => if changed.is_err() { return },
            changed = records.changed() => if changed.is_err() { return },
            () = bundle_changed(&mut bundle) => {}
            _ = tokio::time::sleep(config.retry), if failed => {}
        }
    }
}

/// Applies one waypoint's ServiceAccount, Deployment and Service, then the Gateway's status.
/// The waypoint's autoscaler and disruption budget: applied when the Gateway asks for them,
/// deleted when it no longer does (absent already is fine).
async fn apply_scaling(client: &Client, record: &WaypointDeployment, params: &PatchParams) -> Result<(), KubeError> {
    let (ns, name) = (&record.gateway.namespace, &record.gateway.name);
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns);
    match hpa_for(record) {
        Some(hpa) => drop(hpas.patch(name, params, &Patch::Apply(&hpa)).await?),
        None => drop(
            hpas.delete(name, &Default::default())
                .await
                .map(|_| ())
                .or_else(absent)?,
        ),
    }
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns);
    match pdb_for(record) {
        Some(pdb) => drop(pdbs.patch(name, params, &Patch::Apply(&pdb)).await?),
        None => drop(
            pdbs.delete(name, &Default::default())
                .await
                .map(|_| ())
                .or_else(absent)?,
        ),
    }
    Ok(())
}

/// A delete of something already gone succeeded.
fn absent(e: ::kube::Error) -> Result<(), ::kube::Error> {
    match e {
        ::kube::Error::Api(r) if r.code == 404 => Ok(()),
        e => Err(e),
    }
}

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
    apply_scaling(client, record, &params).await?;
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
    let current = gateway.status.unwrap_or_default();
    let mut existing = json!({"addresses": current.addresses, "conditions": current.conditions});
    let generation = gateway.metadata.generation;
    // An ingress gateway's status also has its listeners (super::ingress_status).
    let with_listeners = json!({"addresses": existing["addresses"], "conditions": existing["conditions"], "listeners": current.listeners});
    let status = match super::ingress_status::gateway_status(record, generation, &with_listeners, Timestamp::now()) {
        Some(status) => {
            existing = with_listeners;
            status
        }
        None => gateway_status(record, address, generation, &existing, Timestamp::now()),
    };
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

/// The `status` to write on a GatewayClass: `Accepted=True` when it is our waypoint class (or
/// an ingress class, `istio` or `mesh-ingress`, under `istio.io/gateway-controller`) and
/// names our controller; `None` for any other class (not ours to judge). `existing` is the
/// current status, whose `lastTransitionTime` is kept while nothing changed.
pub fn gateway_class_status(
    class: &GatewayClass,
    existing: &Value,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Value> {
    let name = class.metadata.name.as_deref()?;
    let controller = class.spec.controller_name.as_str();
    let message = if name == WAYPOINT_CLASS && controller == WAYPOINT_CONTROLLER {
        "waypoints of this class are deployed by the mesh controller"
    } else if INGRESS_CLASSES.contains(&name) && controller == super::ingress_status::INGRESS_CONTROLLER {
        "ingress gateways of this class are deployed by the mesh controller"
    } else {
        return None;
    };
    let accepted = Condition {
        kind: "Accepted".into(),
        status: true,
        reason: "Accepted".into(),
        message: message.into(),
    };
    let existing = existing
        .get("conditions")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    Some(json!({"conditions": conditions(&[accepted], existing, generation, now)}))
}

/// Writes `Accepted` on the waypoint GatewayClass and the ingress ones when they exist and are
/// ours; true when there is nothing left to do (written, unchanged, or not ours), false when a
/// class is missing.
pub async fn accept_gateway_class(client: &Client) -> Result<bool, KubeError> {
    let mut done = accept_class(client, WAYPOINT_CLASS).await?;
    // The ingress classes (manifests/ingress/gatewayclass.yaml), when installed.
    for class in INGRESS_CLASSES {
        done &= accept_class(client, class).await?;
    }
    Ok(done)
}

/// [`accept_gateway_class`] for the class `name`.
async fn accept_class(client: &Client, name: &str) -> Result<bool, KubeError> {
    let api = Api::<GatewayClass>::all(client.clone());
    let Some(class) = api.get_opt(name).await? else {
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
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    info!(class = name, "GatewayClass accepted");
    Ok(true)
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
            | Kind::ServiceEntry
    )
}

/// Statuses as written during this leadership: only a write that succeeded counts, so a failed
/// one stays pending and is retried. `T` is a policy's messages or a route's refused references.
#[derive(Debug)]
pub(crate) struct Reported<T>(BTreeMap<(Kind, ObjectKey), Vec<T>>);

impl<T> Default for Reported<T> {
    fn default() -> Self {
        Reported(BTreeMap::new())
    }
}

pub(crate) type Pending<T> = Vec<((Kind, ObjectKey), Vec<T>)>;

impl<T: Clone + PartialEq> Reported<T> {
    /// The writes that bring the statuses to `now`: an empty list (all clear) for objects
    /// whose problems went away, then each object whose problems changed.
    pub(crate) fn pending(&self, now: &BTreeMap<(Kind, ObjectKey), Vec<T>>) -> Pending<T> {
        let cleared = self
            .0
            .keys()
            .filter(|k| !now.contains_key(*k))
            .map(|k| (k.clone(), Vec::new()));
        let changed = now
            .iter()
            .filter(|(k, items)| self.0.get(*k) != Some(*items))
            .map(|(k, items)| (k.clone(), items.clone()));
        cleared.chain(changed).collect()
    }

    /// Records a successful write.
    pub(crate) fn written(&mut self, key: (Kind, ObjectKey), items: Vec<T>) {
        if items.is_empty() {
            self.0.remove(&key);
        } else {
            self.0.insert(key, items);
        }
    }
}

/// Keeps problems on the status of the objects that caused them (only while leading): Istio
/// objects with problems get `Accepted=False` with the messages, and `Accepted=True` again
/// once they went away; routes with refused cross-namespace references get their
/// `status.parents` (see [`super::route_status`]), and `ResolvedRefs=True` once permitted. A
/// failed write is retried after `retry`, as in [`run`].
pub async fn run_status(
    client: Client,
    retry: Duration,
    mut leader: watch::Receiver<bool>,
    mut problems: watch::Receiver<Vec<crate::translate::Problem>>,
) {
    let mut reported = Reported::default();
    let mut routes = Reported::default();
    loop {
        let mut failed = false;
        if *leader.borrow_and_update() {
            let (now, refused) = by_object(&problems.borrow_and_update());
            for ((kind, key), messages) in reported.pending(&now) {
                match report_problems(&client, kind, &key, &messages).await {
                    Ok(()) => reported.written((kind, key), messages),
                    Err(e) => {
                        warn!(%key, error = %e, "cannot write policy status");
                        failed = true;
                    }
                }
            }
            for ((kind, key), refs) in routes.pending(&refused) {
                match route_status::report_refused(&client, kind, &key, &refs).await {
                    Ok(()) => routes.written((kind, key), refs),
                    Err(e) => {
                        warn!(%key, error = %e, "cannot write route status");
                        failed = true;
                    }
                }
            }
        } else {
            reported = Reported::default();
            routes = Reported::default();
        }
        tokio::select! {
            r = leader.changed() => if r.is_err() { return },
            r = problems.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(retry), if failed => {}
        }
    }
}

type ByObject<T> = BTreeMap<(Kind, ObjectKey), Vec<T>>;

/// Problems grouped by the object whose status carries them: Istio policies' messages, and
/// routes' refused references. Kind-level problems (object "*": the kind cannot be listed)
/// have no object to carry a status; they are in /debug/problems and the log.
fn by_object(problems: &[crate::translate::Problem]) -> (ByObject<String>, ByObject<RefusedRef>) {
    let mut messages = ByObject::new();
    let mut refused = ByObject::new();
    for p in problems.iter().filter(|p| p.object.name != "*") {
        let key = (p.kind, p.object.clone());
        if reports_status(p.kind) {
            messages.entry(key).or_insert_with(Vec::new).push(p.message.clone());
        } else if let (true, Some(r)) = (route_status::is_route(p.kind), &p.refused) {
            refused.entry(key).or_insert_with(Vec::new).push(r.clone());
        }
    }
    (messages, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::manifests::tests::record;

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
    /// The root-cert ConfigMaps follow the CA's bundle: one per waypoint namespace, with the
    /// bundle of the moment (the start-time one was written for good before).
    #[test]
    fn root_cert_maps_follow_the_published_bundle() {
        let (tx, rx) = watch::channel("OLD ROOT\n".to_owned());
        let mut config = WriterConfig {
            trust_bundle: Some(rx),
            ..crate::k8s::manifests::tests::config()
        };
        assert!(config.take_bundle(), "the bundle replaces the start-time root");
        let mut other = crate::k8s::manifests::tests::record();
        other.gateway = ObjectKey::new("other", "waypoint");
        let records = [crate::k8s::manifests::tests::record(), other.clone(), other];
        let data = |maps: &[ConfigMap]| -> Vec<(String, String)> {
            maps.iter()
                .map(|m| {
                    let pem = m.data.as_ref().and_then(|d| d.get("root-cert.pem")).cloned();
                    (
                        m.metadata.namespace.clone().unwrap_or_default(),
                        pem.unwrap_or_default(),
                    )
                })
                .collect()
        };
        let ns = crate::k8s::manifests::tests::record().gateway.namespace;
        assert_eq!(
            data(&root_cert_maps(&records, &config)),
            [
                (ns.clone(), "OLD ROOT\n".to_owned()),
                ("other".into(), "OLD ROOT\n".into())
            ]
        );
        assert!(!config.take_bundle(), "unchanged");
        // A rotation publishes both roots, then retires the old one.
        tx.send_replace("OLD ROOT\nNEW ROOT\n".into());
        assert!(config.take_bundle());
        assert_eq!(data(&root_cert_maps(&records, &config))[1].1, "OLD ROOT\nNEW ROOT\n");
        tx.send_replace("NEW ROOT\n".into());
        assert!(config.take_bundle());
        let maps = root_cert_maps(&records, &config);
        assert_eq!(
            data(&maps),
            [(ns, "NEW ROOT\n".to_owned()), ("other".into(), "NEW ROOT\n".into())]
        );
        assert_eq!(maps[0].metadata.name.as_deref(), Some(ROOT_CERT_CONFIGMAP));
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
        // The ingress classes under Istio's gateway controller name, and only under it.
        let ingress_controller = crate::k8s::ingress_status::INGRESS_CONTROLLER;
        for name in INGRESS_CLASSES {
            let status = gateway_class_status(&class(name, ingress_controller), &Value::Null, None, at(0));
            assert_eq!(status.expect("an ingress class")["conditions"][0]["status"], "True");
            assert!(gateway_class_status(&class(name, WAYPOINT_CONTROLLER), &Value::Null, None, at(0)).is_none());
        }
        assert!(gateway_class_status(&class(WAYPOINT_CLASS, ingress_controller), &Value::Null, None, at(0)).is_none());
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

    fn problem(name: &str) -> (Kind, ObjectKey) {
        (Kind::AuthorizationPolicy, ObjectKey::new("apps", name))
    }

    /// A ServiceEntry's problems (an unenforced exportTo, say) are written on its status.
    #[test]
    fn service_entry_problems_go_to_its_status() {
        let key = ObjectKey::new("shop", "ext");
        let problem = crate::translate::Problem {
            kind: Kind::ServiceEntry,
            object: key.clone(),
            message: "spec.exportTo [\".\"] is not enforced".into(),
            refused: None,
        };
        let (messages, refused) = by_object(&[problem]);
        assert_eq!(messages[&(Kind::ServiceEntry, key)].len(), 1);
        assert!(refused.is_empty());
    }

    #[test]
    fn a_failed_status_write_stays_pending_until_it_succeeds() {
        let mut reported = Reported::default();
        let now = BTreeMap::from([(problem("a"), vec!["bad port".to_owned()])]);
        let write = vec![(problem("a"), vec!["bad port".to_owned()])];
        assert_eq!(reported.pending(&now), write);
        // The write failed: nothing is recorded, so the same write is still pending.
        assert_eq!(reported.pending(&now), write);
        reported.written(problem("a"), vec!["bad port".to_owned()]);
        assert!(reported.pending(&now).is_empty());
        // The problem went away: clearing it is pending until a clear succeeds.
        let none = BTreeMap::new();
        assert_eq!(reported.pending(&none), [(problem("a"), vec![])]);
        assert_eq!(reported.pending(&none), [(problem("a"), vec![])]);
        reported.written(problem("a"), vec![]);
        assert!(reported.pending(&none).is_empty());
    }

    #[test]
    fn only_changed_statuses_are_written() {
        let mut reported = Reported::default();
        reported.written(problem("a"), vec!["x".to_owned()]);
        reported.written(problem("b"), vec!["y".to_owned()]);
        let now = BTreeMap::from([
            (problem("a"), vec!["x".to_owned()]),
            (problem("b"), vec!["z".to_owned()]),
            (problem("c"), vec!["w".to_owned()]),
        ]);
        let keys: Vec<String> = reported.pending(&now).into_iter().map(|((_, k), _)| k.name).collect();
        assert_eq!(keys, ["b", "c"]);
    }

    #[test]
    fn route_problems_are_grouped_by_refused_reference() {
        let p = |kind, name: &str, refused: Option<RefusedRef>| crate::translate::Problem {
            kind,
            object: ObjectKey::new("apps", name),
            message: "m".into(),
            refused,
        };
        let problems = [
            p(Kind::HttpRoute, "r", Some(RefusedRef::Backend)),
            p(
                Kind::HttpRoute,
                "r",
                Some(RefusedRef::Parent(ObjectKey::new("db", "db"))),
            ),
            // Not a refused reference: nothing for route status to say.
            p(Kind::GrpcRoute, "g", None),
            p(Kind::TcpRoute, "*", Some(RefusedRef::Backend)),
            p(Kind::AuthorizationPolicy, "a", None),
        ];
        let (messages, refused) = by_object(&problems);
        assert_eq!(messages.keys().collect::<Vec<_>>(), [&problem("a")]);
        assert_eq!(
            refused,
            BTreeMap::from([(
                (Kind::HttpRoute, ObjectKey::new("apps", "r")),
                vec![RefusedRef::Backend, RefusedRef::Parent(ObjectKey::new("db", "db"))]
            )])
        );
    }
}
