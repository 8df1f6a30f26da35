//! Which Telemetry (Istio's Telemetry API, from the controller) applies to a request: per
//! section — tracing, metrics, access logging — the most specific policy that writes it, a
//! targeted one (targetRefs to this waypoint or the service) over the service's namespace's
//! over the mesh's (root namespace); equal ranks are decided by name so every replica agrees.

use mesh_proto::waypoint as wp;

use crate::store::Snapshot;

/// The sections that apply to one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Effective<'a> {
    pub tracing: Option<&'a wp::TelemetryTracing>,
    pub metrics: &'a [wp::MetricOverride],
    pub access_log: Option<&'a wp::TelemetryAccessLog>,
}

/// How specific a policy is for this request; `None` when it does not apply.
fn rank(p: &wp::Policy, t: &wp::Telemetry, gateway: (&str, &str), service: (&str, &str)) -> Option<u8> {
    match wp::telemetry::Scope::try_from(t.scope) {
        Ok(wp::telemetry::Scope::Targeted) => crate::policy::applies(p, gateway, service).then_some(3),
        Ok(wp::telemetry::Scope::Namespace) => (p.namespace == service.0).then_some(2),
        Ok(wp::telemetry::Scope::Mesh) => Some(1),
        Err(_) => None,
    }
}

/// The effective Telemetry for a request to `service` at `gateway`.
pub fn effective<'a>(snapshot: &'a Snapshot, gateway: (&str, &str), service: (&str, &str)) -> Effective<'a> {
    let mut out = Effective::default();
    // (rank, policy key) of the policy each section came from.
    let mut best: [Option<(u8, &str)>; 3] = [None; 3];
    let better = |cur: Option<(u8, &str)>, cand: (u8, &str)| match cur {
        None => true,
        Some((r, k)) => cand.0 > r || (cand.0 == r && cand.1 < k),
    };
    for (key, p) in &snapshot.policies {
        let Some(wp::policy::Kind::Telemetry(t)) = &p.kind else {
            continue;
        };
        let Some(r) = rank(p, t, gateway, service) else {
            continue;
        };
        let cand = (r, key.as_str());
        if let Some(tr) = &t.tracing {
            if better(best[0], cand) {
                best[0] = Some(cand);
                out.tracing = Some(tr);
            }
        }
        if t.has_metrics && better(best[1], cand) {
            best[1] = Some(cand);
            out.metrics = &t.metrics;
        }
        if let Some(a) = &t.access_log {
            if better(best[2], cand) {
                best[2] = Some(cand);
                out.access_log = Some(a);
            }
        }
    }
    out
}

/// The overrides that apply to `metric` (an Istio name such as `REQUEST_COUNT`).
pub fn overrides_for<'a>(e: &Effective<'a>, metric: &'a str) -> impl Iterator<Item = &'a wp::MetricOverride> + 'a {
    e.metrics
        .iter()
        .filter(move |o| o.metric == "ALL_METRICS" || o.metric == metric)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn telemetry(
        ns: &str,
        name: &str,
        scope: wp::telemetry::Scope,
        filter: &str,
        targets: Vec<wp::Target>,
    ) -> (String, Arc<wp::Policy>) {
        let t = wp::Telemetry {
            scope: scope as i32,
            access_log: Some(wp::TelemetryAccessLog {
                disabled: false,
                filter: filter.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = wp::Policy {
            name: name.into(),
            namespace: ns.into(),
            targets,
            kind: Some(wp::policy::Kind::Telemetry(t)),
        };
        (format!("Telemetry/{ns}/{name}"), Arc::new(p))
    }

    #[test]
    fn targeted_over_namespace_over_mesh() {
        use wp::telemetry::Scope;
        let target = wp::Target {
            kind: "Service".into(),
            namespace: "shop".into(),
            name: "payments".into(),
        };
        let mut snap = Snapshot::default();
        for (k, p) in [
            telemetry("istio-system", "mesh", Scope::Mesh, "mesh", vec![]),
            telemetry("shop", "ns", Scope::Namespace, "namespace", vec![]),
            telemetry("shop", "pay", Scope::Targeted, "targeted", vec![target]),
        ] {
            snap.policies.insert(k, p);
        }
        let gw = ("shop", "waypoint");
        let filter = |svc| effective(&snap, gw, svc).access_log.map(|a| a.filter.clone());
        assert_eq!(filter(("shop", "payments")).as_deref(), Some("targeted"));
        assert_eq!(filter(("shop", "reviews")).as_deref(), Some("namespace"));
        assert_eq!(filter(("other", "x")).as_deref(), Some("mesh"));
        assert!(effective(&snap, gw, ("other", "x")).tracing.is_none());
    }
}
