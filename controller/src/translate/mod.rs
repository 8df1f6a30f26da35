//! Translation: from declared objects ([`Inputs`]) to what the data plane consumes —
//! `istio.workload.Address` (workloads and services) and `istio.security.Authorization` for
//! ztunnels, `mesh.waypoint.v1` routes and L7 policies for waypoints, and the waypoint
//! deployments to run. A pure function of its inputs, so golden tests pin it down; anything
//! it cannot honour is reported as a [`Problem`] on the object that caused it.

mod attach;
mod authz;
mod auto_allocate;
mod entries;
mod entry_hosts;
pub mod incremental;
pub mod ingress;
mod peer_authn;
mod policy_target;
mod rate_limit;
pub mod remote;
pub mod render;
mod routes;
mod service;
mod service_entry;
mod slice_index;
mod telemetry;
pub mod unimplemented;
mod upstream_tls;
mod waypoint_policy;
mod workload;
mod workload_entry;

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_proto::security::Authorization;
use mesh_proto::waypoint as wp;
use mesh_proto::workload as pb;

use crate::model::{Inputs, Kind, ObjectKey};
use crate::waypoint::WaypointDeployment;

pub use attach::{ENROLLED_ANNOTATION, ENROLLED_VALUE};
pub use routes::{REF_NOT_PERMITTED, UNSUPPORTED_VALUE};

/// Cluster-wide facts translation needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Prefix of workload uids (`<cluster>//Pod/<ns>/<name>`).
    pub cluster_id: String,
    /// Network name put on workloads and service addresses (empty: the default network).
    pub network: String,
    pub trust_domain: String,
    /// DNS suffix of service hostnames (`<name>.<ns>.svc.<suffix>`).
    pub domain_suffix: String,
    /// Policies here without a selector apply mesh-wide.
    pub root_namespace: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cluster_id: "Kubernetes".to_owned(),
            network: String::new(),
            trust_domain: "cluster.local".to_owned(),
            domain_suffix: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
        }
    }
}

/// Something declared that could not be honoured as written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Problem {
    pub kind: Kind,
    pub object: ObjectKey,
    pub message: String,
    /// What of a route this problem refused (a reference without ReferenceGrant, or the
    /// route itself), so route status can say which.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<RefusedRef>,
}

/// What of a route translation refused: a cross-namespace reference for want of a
/// ReferenceGrant, or the whole route for a match the proxy cannot compile.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum RefusedRef {
    /// A backendRef: the route is attached but cannot resolve it (`ResolvedRefs=False`).
    Backend,
    /// A Service parentRef: the route is not attached to it (`Accepted=False` on that parent).
    Parent(ObjectKey),
    /// The route: a rule has a match the proxy cannot compile (the message names the field);
    /// it is attached to no parent (`Accepted=False UnsupportedValue` on every one).
    Invalid(String),
}

/// Addresses by xDS resource name. The values are shared: the incremental translator's two
/// copies of the outputs (published and spare) hold each address once, not twice (at 100k
/// pods that is ~250 MiB).
pub type Addresses = BTreeMap<String, Arc<pb::Address>>;

/// Everything translation produces, keyed by xDS resource name.
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    /// `istio.workload.Address` by name: workload uid, or `<ns>/<hostname>` for services.
    pub addresses: Addresses,
    /// `istio.security.Authorization` by `<ns>/<name>`.
    pub authorizations: BTreeMap<String, Authorization>,
    /// `mesh.waypoint.v1.ServiceRoutes` by `<ns>/<hostname>`.
    pub service_routes: BTreeMap<String, wp::ServiceRoutes>,
    /// `mesh.waypoint.v1.Policy` by `<Kind>/<ns>/<name>`.
    pub waypoint_policies: BTreeMap<String, wp::Policy>,
    /// Waypoint gateways to run, by gateway key.
    pub waypoints: BTreeMap<ObjectKey, WaypointDeployment>,
    /// Ingress gateways (`mesh.waypoint.v1.IngressGateway` by `<ns>/<name>`), their statuses
    /// and those of the routes naming them.
    pub ingress: ingress::Ingress,
    /// `mesh.waypoint.v1.WaypointCredentials` by `<ns>/<service account>` of the waypoint.
    pub waypoint_credentials: BTreeMap<String, wp::WaypointCredentials>,
    pub problems: Vec<Problem>,
    /// This cluster and the remote ones, with what each contributes.
    pub clusters: Vec<remote::ClusterStatus>,
}

/// Collects problems while translating.
#[derive(Default)]
pub(crate) struct Report(Vec<Problem>);

impl Report {
    pub(crate) fn add(&mut self, kind: Kind, object: &ObjectKey, message: impl Into<String>) {
        self.0.push(Problem {
            kind,
            object: object.clone(),
            message: message.into(),
            refused: None,
        });
    }

    /// Adds a problem about a refused cross-namespace reference.
    pub(crate) fn refused(&mut self, kind: Kind, object: &ObjectKey, what: RefusedRef, message: String) {
        self.0.push(Problem {
            kind,
            object: object.clone(),
            message,
            refused: Some(what),
        });
    }
}

/// Translates the whole input snapshot.
pub fn translate(inputs: &Inputs, options: &Options) -> Outputs {
    let options = &remote::local_options(inputs, options);
    let mut report = Report::default();
    let waypoints = attach::waypoints(inputs, options, &mut report);
    let attach = attach::Attachments::new(inputs, &waypoints, options, &mut report);
    let mut authz = authz::translate(inputs, options, &mut report);
    let peer = peer_authn::translate(inputs, options, &mut report);
    authz.policies.extend(peer.policies);
    authz.selected.extend(peer.selected);
    let mut addresses = BTreeMap::new();
    for svc in service::translate(inputs, options, &attach, &mut report) {
        let name = format!("{}/{}", svc.namespace, svc.hostname);
        addresses.insert(
            name,
            pb::Address {
                r#type: Some(pb::address::Type::Service(svc)),
            },
        );
    }
    let mut taken = entries::Taken::default();
    for (name, a) in &addresses {
        taken.add(name, a);
    }
    let entries = entries::translate(inputs, options, &attach, &taken, &authz.selected, &mut report);
    let mut workloads = BTreeMap::new();
    for w in workload::translate(inputs, options, &attach, &authz.selected, &mut report) {
        workloads.insert(
            w.uid.clone(),
            pb::Address {
                r#type: Some(pb::address::Type::Workload(w)),
            },
        );
    }
    service_entry::select_pods(inputs, options, &entries.selectors, (&mut workloads, &mut report));
    if inputs.mesh.outbound_traffic_policy.mode == crate::mesh_config::OutboundMode::RegistryOnly {
        service_entry::registry_only(&mut workloads);
    }
    addresses.extend(workloads);
    addresses.extend(entries.addresses);
    let (service_routes, mut waypoint_policies) = routes::translate(inputs, options, &mut report);
    waypoint_policies.extend(rate_limit::translate(inputs, &mut report));
    waypoint_policies.extend(telemetry::translate(inputs, options, &mut report));
    let ingress = ingress::translate(inputs, options, &mut report);
    let waypoint_credentials = upstream_tls::credentials(inputs, options, &attach, &service_routes, &mut report);
    unimplemented::report(inputs, &mut report);
    slice_index::report_foreign(inputs, &mut report);
    let mut problems = report.0;
    problems.sort();
    problems.dedup();
    let mut out = Outputs {
        addresses: addresses.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        authorizations: authz.policies,
        service_routes,
        waypoint_policies,
        waypoints: waypoints.into_iter().map(|(k, w)| (k, w.deployment)).collect(),
        ingress,
        waypoint_credentials,
        problems,
        clusters: Vec::new(),
    };
    remote::merge(inputs, options, &mut out);
    out
}

/// [`translate`] given each kind's sync state (Kubernetes mode): a security kind that cannot
/// be read fails closed mesh-wide and every failing kind is reported (see
/// `authz::unreadable_kinds`). Still a pure function, so the decision is unit-tested.
pub fn translate_synced(
    inputs: &Inputs,
    states: &BTreeMap<Kind, crate::source::KindSync>,
    options: &Options,
) -> Outputs {
    let mut out = translate(inputs, options);
    let mut report = Report::default();
    out.authorizations
        .extend(authz::unreadable_kinds(states, options, &mut report));
    out.waypoint_policies
        .extend(waypoint_policy::unreadable_kinds(inputs, states, options));
    out.problems.extend(report.0);
    out.problems.sort();
    out.problems.dedup();
    out
}

/// A workload-scoped policy and the workloads it applies to.
#[derive(Clone, Debug)]
pub(crate) struct Selected {
    /// `<ns>/<name>`, as listed in `Workload.authorization_policies`.
    pub name: String,
    pub namespace: String,
    pub match_labels: BTreeMap<String, String>,
    /// Exactly these pods, when the selector alone does not decide (PeerAuthentication precedence).
    pub only: Option<Vec<ObjectKey>>,
}

impl Selected {
    pub(crate) fn applies_to(
        &self,
        pod: &ObjectKey,
        labels: Option<&BTreeMap<String, String>>,
        root_namespace: &str,
    ) -> bool {
        match &self.only {
            Some(pods) => pods.contains(pod),
            None => {
                (self.namespace == pod.namespace || self.namespace == root_namespace)
                    && crate::model::selects(&self.match_labels, labels)
            }
        }
    }
}

/// `<name>.<ns>.svc.<suffix>`.
pub(crate) fn service_hostname(name: &str, namespace: &str, options: &Options) -> String {
    format!("{name}.{namespace}.svc.{}", options.domain_suffix)
}
