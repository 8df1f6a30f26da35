//! Watches every [`Kind`] in all namespaces and sends [`Change`]s: a full list becomes
//! [`Change::Replace`], later events [`Change::Apply`] / [`Change::Delete`], and
//! [`Change::Synced`] follows once every kind has been listed or has failed once. Built-in kinds
//! are watched with their typed k8s-openapi structs; custom kinds are read as untyped objects
//! and parsed one by one, so an object the model rejects is logged and skipped instead of
//! failing its whole list. A custom kind whose CRD is not installed counts as listed and empty.
//!
//! Each kind's state ([`KindSync`]: synced, not served, failing with a reason) is sent as a
//! [`Change::KindState`] whenever it changes, and logged then (not on every retry). A kind
//! whose list fails (403 because its RBAC is missing, 5xx...) no longer holds up the others:
//! the controller syncs without it, translation reports it and fails closed for security
//! kinds, and the watch keeps retrying with backoff until it lists, which clears the state.
//! Custom kinds are read at the version API discovery finds served
//! ([`pick_version`]); one served only at versions we do not read is reported failing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use ::kube::core::DynamicObject;
use ::kube::runtime::watcher::{self, watcher};
use ::kube::runtime::WatchStreamExt;
use ::kube::{Api, Client, Resource};
use futures_util::stream::{self, BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use super::resources::{api_resource_at, discover, is_custom, pick_version, served_version, ServedVersion};
use super::KubeError;
use crate::model::{
    EndpointSlice, Kind, Namespace, Object, ObjectKey, ParseError, Pod, Secret, Service, ServiceAccount,
};
use crate::source::{Change, ChangeSender, KindSync};

/// Watches all kinds until `tx` closes (the error) or the process ends; watch errors are
/// logged and retried with backoff, never returned.
pub async fn run(client: Client, tx: ChangeSender) -> Result<(), KubeError> {
    let versions = served_versions(&client).await;
    let streams: Vec<_> = Kind::ALL
        .iter()
        .map(|&kind| match versions.get(&kind) {
            // Served only at versions we do not read: reported (security kinds fail closed)
            // until a restart after the CRD is upgraded.
            Some(ServedVersion::Unreadable(why)) => {
                let failed = stream::once(futures_util::future::ready((kind, Event::Failed(why.clone()))));
                failed.chain(stream::pending()).boxed()
            }
            Some(ServedVersion::Read(v)) => watch(client.clone(), kind, v),
            Some(ServedVersion::NotServed) | None => watch(client.clone(), kind, served_version(kind)),
        })
        .collect();
    let mut events = stream::select_all(streams);
    let mut state = SyncState::default();
    while let Some((kind, event)) = events.next().await {
        for change in state.handle(kind, event) {
            tx.send(change).await.map_err(|_| KubeError::ChannelClosed)?;
        }
    }
    Ok(())
}

/// The version to read of each custom kind, from API discovery of its group. A kind whose
/// group could not be discovered is absent (its default version is read).
async fn served_versions(client: &Client) -> BTreeMap<Kind, ServedVersion> {
    let groups: BTreeSet<&str> = Kind::ALL.iter().filter(|&&k| is_custom(k)).map(|k| k.group()).collect();
    let mut out = BTreeMap::new();
    for group in groups {
        let Some(served) = discover(client, group).await else {
            continue;
        };
        for &kind in Kind::ALL.iter().filter(|k| k.group() == group) {
            let choice = pick_version(kind, &served);
            info!(?kind, ?choice, "served version");
            out.insert(kind, choice);
        }
    }
    out
}

/// A watcher event after conversion to the model.
#[derive(Debug)]
enum Event {
    Init,
    InitApply(Object),
    InitDone,
    Apply(Object),
    Delete(ObjectKey),
    /// The kind's resource does not exist (404 on list): its CRD is not installed.
    Missing,
    /// The list failed for another reason (forbidden, server error, unreachable).
    Failed(String),
}

fn watch(client: Client, kind: Kind, version: &'static str) -> BoxStream<'static, (Kind, Event)> {
    fn typed<K>(client: Client, kind: Kind, wrap: fn(K) -> Object) -> BoxStream<'static, (Kind, Event)>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug + Send + 'static,
    {
        watch_kind(Api::all(client), kind, move |o| Ok(wrap(o)))
    }
    match kind {
        Kind::Namespace => typed::<Namespace>(client, kind, Object::Namespace),
        // Only the labels are read (locality): the status (images, conditions) is dropped.
        Kind::Node => typed::<crate::model::Node>(client, kind, |mut n| {
            n.status = None;
            n.spec = None;
            Object::Node(n)
        }),
        Kind::Pod => typed::<Pod>(client, kind, Object::Pod),
        Kind::Service => typed::<Service>(client, kind, Object::Service),
        Kind::EndpointSlice => typed::<EndpointSlice>(client, kind, Object::EndpointSlice),
        Kind::ServiceAccount => typed::<ServiceAccount>(client, kind, Object::ServiceAccount),
        Kind::Secret => typed::<Secret>(client, kind, Object::Secret),
        Kind::GatewayClass
        | Kind::Gateway
        | Kind::HttpRoute
        | Kind::GrpcRoute
        | Kind::TcpRoute
        | Kind::TlsRoute
        | Kind::ReferenceGrant
        | Kind::AuthorizationPolicy
        | Kind::PeerAuthentication
        | Kind::RequestAuthentication
        | Kind::VirtualService
        | Kind::DestinationRule
        | Kind::ServiceEntry
        | Kind::WorkloadEntry
        | Kind::WorkloadGroup
        | Kind::LocalRateLimitPolicy
        | Kind::Telemetry => {
            let api = Api::<DynamicObject>::all_with(client, &api_resource_at(kind, version));
            watch_kind(api, kind, move |o| parse_dynamic(kind, version, o))
        }
    }
}

/// Parses an untyped object with the same code the local directory source uses.
fn parse_dynamic(kind: Kind, version: &str, object: DynamicObject) -> Result<Object, ParseError> {
    let mut value = serde_json::to_value(object).map_err(|e| ParseError::Shape(e.to_string()))?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), format!("{}/{version}", kind.group()).into());
        map.insert("kind".into(), kind.name().into());
    }
    Object::parse(value)
}

/// One kind's watch, retried with backoff, as model events. Objects `convert` rejects are
/// logged and dropped.
fn watch_kind<K, F>(api: Api<K>, kind: Kind, convert: F) -> BoxStream<'static, (Kind, Event)>
where
    K: Resource + DeserializeOwned + Clone + Debug + Send + 'static,
    F: Fn(K) -> Result<Object, ParseError> + Send + 'static,
{
    let convert = move |mut object: K| {
        // Managed fields are large and never read.
        object.meta_mut().managed_fields = None;
        let key = ObjectKey::of(object.meta(), kind.cluster_scoped());
        convert(object)
            .inspect_err(|e| warn!(?kind, %key, error = %e, "ignoring an object the model rejects"))
            .ok()
    };
    // Only TLS Secrets are read (listener certificates): the controller neither holds nor
    // receives the cluster's other Secrets.
    let config = match kind {
        Kind::Secret => watcher::Config::default().fields("type=kubernetes.io/tls"),
        _ => watcher::Config::default(),
    };
    watcher(api, config)
        .default_backoff()
        .filter_map(move |event| {
            let event = match event {
                Ok(watcher::Event::Init) => Some(Event::Init),
                Ok(watcher::Event::InitApply(o)) => convert(o).map(Event::InitApply),
                Ok(watcher::Event::InitDone) => Some(Event::InitDone),
                Ok(watcher::Event::Apply(o)) => convert(o).map(Event::Apply),
                Ok(watcher::Event::Delete(o)) => Some(Event::Delete(ObjectKey::of(o.meta(), kind.cluster_scoped()))),
                Err(watcher::Error::InitialListFailed(::kube::Error::Api(status))) if status.is_not_found() => {
                    Some(Event::Missing)
                }
                Err(watcher::Error::InitialListFailed(e)) => Some(Event::Failed(e.to_string())),
                Err(e) => {
                    warn!(?kind, error = %e, "watch failed, retrying");
                    None
                }
            };
            futures_util::future::ready(event.map(|e| (kind, e)))
        })
        .boxed()
}

/// Buffers initial lists, tracks each kind's [`KindSync`] and decides when everything has been
/// listed or reported once.
#[derive(Default)]
struct SyncState {
    listing: BTreeMap<Kind, Vec<Object>>,
    /// Kinds listed successfully at least once (they have a last good state).
    listed: BTreeSet<Kind>,
    states: BTreeMap<Kind, KindSync>,
    synced: bool,
}

impl SyncState {
    fn handle(&mut self, kind: Kind, event: Event) -> Vec<Change> {
        let mut changes = Vec::new();
        match event {
            Event::Init => drop(self.listing.insert(kind, Vec::new())),
            Event::InitApply(object) => self.listing.entry(kind).or_default().push(object),
            Event::InitDone => {
                let objects = self.listing.remove(&kind).unwrap_or_default();
                debug!(?kind, count = objects.len(), "listed");
                changes.push(Change::Replace(kind, objects));
                self.listed.insert(kind);
                self.set(kind, KindSync::Synced, &mut changes);
            }
            Event::Apply(object) => changes.push(Change::Apply(object)),
            Event::Delete(key) => changes.push(Change::Delete(kind, key)),
            Event::Missing => {
                self.listing.remove(&kind);
                if self.states.get(&kind) != Some(&KindSync::NotServed) {
                    changes.push(Change::Replace(kind, Vec::new()));
                }
                self.set(kind, KindSync::NotServed, &mut changes);
            }
            Event::Failed(reason) => {
                self.listing.remove(&kind);
                let listed = self.listed.contains(&kind);
                self.set(kind, KindSync::Failing { reason, listed }, &mut changes);
            }
        }
        if !self.synced && self.states.len() == Kind::ALL.len() {
            self.synced = true;
            info!("every kind listed");
            changes.push(Change::Synced);
        }
        changes
    }
}

impl SyncState {
    /// Records `kind`'s state; a change is sent on, and logged when its kind of state changes
    /// (a retry failing again, even with other words, stays quiet).
    fn set(&mut self, kind: Kind, state: KindSync, changes: &mut Vec<Change>) {
        let previous = self.states.insert(kind, state.clone());
        if previous.as_ref() == Some(&state) {
            return;
        }
        let same_kind_of_state = previous
            .as_ref()
            .is_some_and(|p| std::mem::discriminant(p) == std::mem::discriminant(&state));
        match &state {
            _ if same_kind_of_state => debug!(?kind, ?state, "kind state"),
            KindSync::Synced if previous.is_some() => info!(?kind, "kind can be listed again"),
            KindSync::Synced => {}
            KindSync::NotServed => warn!(
                ?kind,
                "resource is not served by the API server (CRD not installed?); treating it as empty"
            ),
            KindSync::Failing { reason, listed } => warn!(
                ?kind,
                %reason,
                listed,
                "cannot list this kind; retrying with backoff (see /debug/problems)"
            ),
        }
        changes.push(Change::KindState(kind, state));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn namespace(name: &str) -> Object {
        Object::parse(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
            .expect("valid namespace")
    }

    fn summary(changes: &[Change]) -> Vec<String> {
        changes.iter().map(Change::to_string).collect()
    }

    #[test]
    fn lists_are_buffered_until_done() {
        let mut state = SyncState::default();
        assert!(state.handle(Kind::Namespace, Event::Init).is_empty());
        assert!(state
            .handle(Kind::Namespace, Event::InitApply(namespace("a")))
            .is_empty());
        assert!(state
            .handle(Kind::Namespace, Event::InitApply(namespace("b")))
            .is_empty());
        assert_eq!(
            summary(&state.handle(Kind::Namespace, Event::InitDone)),
            ["replace Namespace 2", "state Namespace Synced"]
        );
        assert_eq!(
            summary(&state.handle(Kind::Namespace, Event::Apply(namespace("c")))),
            ["apply c"]
        );
        let delete = Event::Delete(ObjectKey::new("", "a"));
        assert_eq!(summary(&state.handle(Kind::Namespace, delete)), ["delete Namespace a"]);
        // A relist starts over: objects from the broken attempt are dropped.
        state.handle(Kind::Namespace, Event::Init);
        state.handle(Kind::Namespace, Event::InitApply(namespace("x")));
        state.handle(Kind::Namespace, Event::Init);
        state.handle(Kind::Namespace, Event::InitApply(namespace("y")));
        let changes = state.handle(Kind::Namespace, Event::InitDone);
        match changes.as_slice() {
            [Change::Replace(Kind::Namespace, objects)] => {
                assert_eq!(objects.iter().map(|o| o.key().name).collect::<Vec<_>>(), ["y"]);
            }
            other => panic!("unexpected {:?}", summary(other)),
        }
    }

    #[test]
    fn synced_once_after_every_kind_with_missing_crds_counted_as_empty() {
        let mut state = SyncState::default();
        let (last, rest) = Kind::ALL.split_last().expect("kinds");
        for &kind in rest {
            state.handle(kind, Event::Init);
            let changes = state.handle(kind, Event::InitDone);
            assert_eq!(
                summary(&changes),
                [format!("replace {kind:?} 0"), format!("state {kind:?} Synced")]
            );
        }
        // The last kind's CRD is missing: warned once, empty, and Synced follows.
        state.handle(*last, Event::Init);
        let changes = state.handle(*last, Event::Missing);
        assert_eq!(
            summary(&changes),
            [
                format!("replace {last:?} 0"),
                format!("state {last:?} NotServed"),
                "synced".to_owned()
            ]
        );
        // Retries that still 404 say nothing more.
        state.handle(*last, Event::Init);
        assert!(state.handle(*last, Event::Missing).is_empty());
        // Installing the CRD later lists it normally; Synced is not repeated.
        state.handle(*last, Event::Init);
        assert_eq!(
            summary(&state.handle(*last, Event::InitDone)),
            [format!("replace {last:?} 0"), format!("state {last:?} Synced")]
        );
        state.handle(Kind::Namespace, Event::Init);
        assert_eq!(
            summary(&state.handle(Kind::Namespace, Event::InitDone)),
            ["replace Namespace 0"]
        );
    }

    /// Issue 20: a kind whose list is forbidden used to be retried forever with nothing sent,
    /// so the controller never synced. Now it is reported, the others sync without it, and a
    /// later successful list clears it.
    #[test]
    fn a_forbidden_kind_is_reported_and_does_not_hold_up_sync() {
        let mut state = SyncState::default();
        let forbidden = Kind::AuthorizationPolicy;
        for &kind in Kind::ALL.iter().filter(|&&k| k != forbidden) {
            state.handle(kind, Event::Init);
            state.handle(kind, Event::InitDone);
        }
        state.handle(forbidden, Event::Init);
        let denied = || Event::Failed("403 Forbidden".to_owned());
        let changes = state.handle(forbidden, denied());
        assert_eq!(
            summary(&changes),
            [
                r#"state AuthorizationPolicy Failing { reason: "403 Forbidden", listed: false }"#,
                "synced"
            ]
        );
        // Retries failing the same way say nothing; another reason is passed on.
        state.handle(forbidden, Event::Init);
        assert!(state.handle(forbidden, denied()).is_empty());
        let changes = state.handle(forbidden, Event::Failed("500".to_owned()));
        assert_eq!(
            summary(&changes),
            [r#"state AuthorizationPolicy Failing { reason: "500", listed: false }"#]
        );
        // Access granted: listed, state cleared, Synced not repeated.
        state.handle(forbidden, Event::Init);
        assert_eq!(
            summary(&state.handle(forbidden, Event::InitDone)),
            ["replace AuthorizationPolicy 0", "state AuthorizationPolicy Synced"]
        );
        // Failing after a good list: there is a last good state.
        assert_eq!(
            summary(&state.handle(forbidden, denied())),
            [r#"state AuthorizationPolicy Failing { reason: "403 Forbidden", listed: true }"#]
        );
    }

    #[test]
    fn untyped_objects_parse_through_the_model() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": "ns", "managedFields": []},
            "spec": {"action": "DENY", "rules": [{}]},
            "status": {"conditions": []}
        }))
        .expect("dynamic object");
        let parsed = parse_dynamic(Kind::AuthorizationPolicy, "v1", object).expect("parses");
        assert_eq!(parsed.kind(), Kind::AuthorizationPolicy);
        assert_eq!(parsed.key(), ObjectKey::new("ns", "deny"));

        let bad: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "typo", "namespace": "ns"},
            "spec": {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}
        }))
        .expect("dynamic object");
        // Kept, marked invalid: translation fails closed on it instead of dropping it.
        match parse_dynamic(Kind::AuthorizationPolicy, "v1beta1", bad) {
            Ok(Object::AuthorizationPolicy(p)) => assert!(p.invalid.is_some()),
            other => panic!("{other:?}"),
        }
    }
}
