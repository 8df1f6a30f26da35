//! The mesh as the proxies would see it, built from manifests: the controller's translation,
//! ztunnel's state (mesh-core's `State`, fed the same workload-xDS resources) and the
//! waypoint configuration. Offline, pods may have no IP yet and no node agent has reported
//! them captured: such pods get a documentation-range address, and capture is decided from
//! the `istio.io/dataplane-mode` labels as the node agent decides it; both are noted.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use controller::model::pod::{PodIP, PodStatus};
use controller::model::{Inputs, ObjectKey};
use controller::translate::{translate, Options, Outputs};
use mesh_core::state::State;

const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Everything an explanation reads.
pub struct View {
    pub options: Options,
    pub outputs: Outputs,
    /// ztunnel's view: workloads, services and the L4 policies that select them.
    pub state: State,
    /// What the view had to assume (addresses given to pods, resources it could not load).
    pub notes: Vec<String>,
}

/// Addresses for pods that have none, from the documentation ranges (RFC 5737).
fn assumed_ips() -> impl Iterator<Item = IpAddr> {
    [[192, 0, 2], [198, 51, 100], [203, 0, 113]]
        .into_iter()
        .flat_map(|[a, b, c]| (1..=254).map(move |d| IpAddr::V4(Ipv4Addr::new(a, b, c, d))))
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.and_then(|l| l.get(key)).map(String::as_str)
}

/// Whether the node agent would capture this pod: its namespace (or the pod itself) asks for
/// ambient, the pod does not opt out, and it is not on the host network.
fn captured(inputs: &Inputs, key: &ObjectKey, pod: &controller::model::Pod) -> bool {
    let pod_mode = label(pod.metadata.labels.as_ref(), DATAPLANE_MODE);
    let ns_mode = label(inputs.namespace_labels(&key.namespace), DATAPLANE_MODE);
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    pod_mode != Some("none") && (pod_mode == Some("ambient") || ns_mode == Some("ambient")) && !host_network
}

/// Fills what only a running cluster knows (pod IPs, capture), noting each assumption.
fn complete(inputs: &mut Inputs, notes: &mut Vec<String>) {
    let mut free = assumed_ips();
    let mut assumed = 0;
    let keys: Vec<ObjectKey> = inputs.pods.keys().cloned().collect();
    for key in keys {
        let Some(pod) = inputs.pods.get(&key) else { continue };
        let capture = captured(inputs, &key, pod);
        let has_ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some();
        if capture {
            inputs.enrolled.insert(key.clone());
        }
        if has_ip {
            continue;
        }
        let Some(ip) = free.next() else {
            notes.push(format!(
                "pod {key} has no IP and the documentation ranges are used up; left out"
            ));
            continue;
        };
        if let Some(pod) = inputs.pods.get_mut(&key) {
            pod.status = Some(PodStatus {
                phase: Some("Running".to_owned()),
                pod_ip: Some(ip.to_string()),
                pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
                ..Default::default()
            });
            assumed += 1;
        }
    }
    if assumed > 0 {
        notes.push(format!(
            "{assumed} pod(s) have no IP in the manifests; addresses from the documentation ranges (192.0.2.0/24, ...) were assumed"
        ));
    }
}

/// Translates `inputs` as the controller does and loads the result as ztunnel would.
pub fn build(inputs: &Inputs, options: Options) -> View {
    let mut inputs = inputs.clone();
    let mut notes = Vec::new();
    complete(&mut inputs, &mut notes);
    let outputs = translate(&inputs, &options);
    let mut state = State::default();
    for (name, address) in &outputs.addresses {
        if let Err(e) = state.apply_address(address) {
            notes.push(format!("address {name} not loaded: {e}"));
        }
    }
    for (name, authorization) in &outputs.authorizations {
        if let Err(e) = state.apply_authorization(authorization) {
            notes.push(format!("policy {name} not loaded by ztunnel: {e}"));
        }
    }
    View {
        options,
        outputs,
        state,
        notes,
    }
}
