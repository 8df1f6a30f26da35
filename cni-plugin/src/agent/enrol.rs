//! Which pods are captured. A pod is enrolled when it or its namespace is labelled
//! `istio.io/dataplane-mode=ambient` (a pod label `none` opts out of a namespace's label), and
//! never when it uses the host network, already runs a sidecar, or is ztunnel or a waypoint.

use std::collections::BTreeMap;

/// The label that enrols namespaces and pods.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const AMBIENT: &str = "ambient";
const NONE: &str = "none";

/// What the decision looks at.
#[derive(Clone, Debug, Default)]
pub struct PodFacts<'a> {
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    pub host_network: bool,
    pub container_names: &'a [String],
}

/// The decision and, when not captured, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrolment {
    Capture,
    Skip(&'static str),
}

fn get<'a>(m: Option<&'a BTreeMap<String, String>>, k: &str) -> Option<&'a str> {
    m.and_then(|m| m.get(k)).map(String::as_str)
}

/// Decides whether a pod is captured.
pub fn decide(p: &PodFacts<'_>) -> Enrolment {
    if p.host_network {
        return Enrolment::Skip("host network");
    }
    if get(p.annotations, "sidecar.istio.io/status").is_some() || p.container_names.iter().any(|c| c == "istio-proxy") {
        return Enrolment::Skip("sidecar injected");
    }
    if get(p.labels, "app") == Some("ztunnel") {
        return Enrolment::Skip("ztunnel");
    }
    if get(p.labels, "gateway.istio.io/managed").is_some() || get(p.labels, "istio.io/gateway-name").is_some() {
        return Enrolment::Skip("waypoint");
    }
    match (get(p.labels, DATAPLANE_MODE), get(p.namespace_labels, DATAPLANE_MODE)) {
        (Some(AMBIENT), _) => Enrolment::Capture,
        (Some(NONE), _) => Enrolment::Skip("pod opted out (dataplane-mode=none)"),
        (_, Some(AMBIENT)) => Enrolment::Capture,
        _ => Enrolment::Skip("not ambient"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn facts<'a>(pod: &'a BTreeMap<String, String>, ns: &'a BTreeMap<String, String>) -> PodFacts<'a> {
        PodFacts {
            labels: Some(pod),
            namespace_labels: Some(ns),
            ..Default::default()
        }
    }

    #[test]
    fn namespace_and_pod_labels() {
        let ambient = labels(&[(DATAPLANE_MODE, AMBIENT)]);
        let none = labels(&[(DATAPLANE_MODE, NONE)]);
        let empty = BTreeMap::new();
        assert_eq!(decide(&facts(&empty, &ambient)), Enrolment::Capture);
        assert_eq!(decide(&facts(&ambient, &empty)), Enrolment::Capture);
        assert!(matches!(decide(&facts(&none, &ambient)), Enrolment::Skip(_)));
        assert!(matches!(decide(&facts(&empty, &empty)), Enrolment::Skip("not ambient")));
    }

    #[test]
    fn never_host_network_sidecars_ztunnel_or_waypoints() {
        let ns = labels(&[(DATAPLANE_MODE, AMBIENT)]);
        let base = PodFacts {
            namespace_labels: Some(&ns),
            ..Default::default()
        };
        assert_eq!(
            decide(&PodFacts {
                host_network: true,
                ..base.clone()
            }),
            Enrolment::Skip("host network")
        );
        let ann = labels(&[("sidecar.istio.io/status", "{}")]);
        assert_eq!(
            decide(&PodFacts {
                annotations: Some(&ann),
                ..base.clone()
            }),
            Enrolment::Skip("sidecar injected")
        );
        let containers = vec!["app".to_owned(), "istio-proxy".to_owned()];
        assert_eq!(
            decide(&PodFacts {
                container_names: &containers,
                ..base.clone()
            }),
            Enrolment::Skip("sidecar injected")
        );
        let zt = labels(&[("app", "ztunnel")]);
        assert_eq!(
            decide(&PodFacts {
                labels: Some(&zt),
                ..base.clone()
            }),
            Enrolment::Skip("ztunnel")
        );
        let wp = labels(&[("gateway.istio.io/managed", "istio.io-mesh-controller")]);
        assert_eq!(
            decide(&PodFacts {
                labels: Some(&wp),
                ..base.clone()
            }),
            Enrolment::Skip("waypoint")
        );
    }
}
