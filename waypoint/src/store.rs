//! The waypoint's L7 configuration as received over xDS: compiled routes per service and the
//! policies that target this waypoint or its services. Each update swaps a whole snapshot, so
//! a request in flight keeps the configuration it started with (hot swap without drops).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mesh_core::xds::ResourceSink;
use mesh_proto::waypoint as wp;
use prost::Message;
use tracing::warn;

use crate::http::route::CompiledRoutes;
use crate::policy::jwt::{Authenticator, JwksCache};

/// JWT authenticators by service namespace, then name (`None`: no RequestAuthentication).
type Authenticators = HashMap<String, HashMap<String, Option<Arc<Authenticator>>>>;

/// One consistent view of the configuration.
#[derive(Default)]
pub struct Snapshot {
    /// By service key ("ns/hostname").
    pub routes: HashMap<String, Arc<CompiledRoutes>>,
    /// By resource name ("Kind/ns/name").
    pub policies: HashMap<String, Arc<wp::Policy>>,
    /// Built from `policies` on a service's first request: rules are compiled (and inline
    /// JWKS parsed) once per configuration, not per request.
    authenticators: Mutex<Authenticators>,
}

impl Snapshot {
    /// The policies that apply to a request for `service` ("ns", "name") at `gateway`.
    pub fn policies_for<'a>(
        &'a self,
        gateway: (&'a str, &'a str),
        service: (&'a str, &'a str),
    ) -> impl Iterator<Item = &'a wp::Policy> + 'a {
        self.policies
            .values()
            .map(|p| p.as_ref())
            .filter(move |p| crate::policy::applies(p, gateway, service))
    }

    /// The JWT rules of every RequestAuthentication that applies, compiled; `None` when none do.
    pub fn authenticator(
        &self,
        gateway: (&str, &str),
        service: (&str, &str),
        jwks: &Arc<JwksCache>,
    ) -> Option<Arc<Authenticator>> {
        let mut cache = self.authenticators.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = cache.get(service.0).and_then(|by_name| by_name.get(service.1)) {
            return a.clone();
        }
        let rules: Vec<wp::JwtRule> = self
            .policies_for(gateway, service)
            .filter_map(|p| match &p.kind {
                Some(wp::policy::Kind::Jwt(j)) => Some(j.rules.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        let built = (!rules.is_empty()).then(|| Arc::new(Authenticator::new(rules, jwks.clone())));
        cache
            .entry(service.0.to_owned())
            .or_default()
            .insert(service.1.to_owned(), built.clone());
        built
    }
}

/// Why routes of a table were left out, if any were: one line per route.
pub fn dropped_reason(c: &CompiledRoutes) -> Option<String> {
    let d = c.dropped();
    (!d.is_empty()).then(|| {
        let each: Vec<String> = d.iter().map(|e| e.to_string()).collect();
        format!("route dropped (does not compile): {}", each.join("; "))
    })
}

/// The live configuration; readers `load()` a snapshot per request.
#[derive(Default)]
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
}

impl ConfigStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let old = self.current.load();
        let mut next = Snapshot {
            routes: old.routes.clone(),
            policies: old.policies.clone(),
            authenticators: Mutex::default(),
        };
        f(&mut next);
        self.current.store(Arc::new(next));
    }

    /// Applies a batch of routes; returns the rejected ones as (name, reason). A table with a
    /// route that does not compile is applied without that route (see
    /// [`CompiledRoutes::compile`]) and reported here too, so the control plane hears of it.
    pub fn apply_routes(&self, upserts: &[(String, &[u8])], removed: &[String]) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        let mut compiled = Vec::with_capacity(upserts.len());
        for (name, body) in upserts {
            match wp::ServiceRoutes::decode(*body) {
                Ok(r) => {
                    let c = CompiledRoutes::compile(r);
                    if let Some(reason) = dropped_reason(&c) {
                        warn!(service = %name, %reason, "routes dropped");
                        rejected.push((name.clone(), reason));
                    }
                    compiled.push((name.clone(), Arc::new(c)));
                }
                Err(e) => rejected.push((name.clone(), format!("cannot decode: {e}"))),
            }
        }
        self.update(|s| {
            for name in removed {
                s.routes.remove(name);
            }
            s.routes.extend(compiled);
        });
        rejected
    }

    /// Replaces every route table whose name starts with `prefix` (an ingress gateway's, named
    /// `ingress/...`) by `tables`, in one swap.
    pub fn replace_tables(&self, prefix: &str, tables: Vec<(String, Arc<CompiledRoutes>)>) {
        self.update(|s| {
            s.routes.retain(|name, _| !name.starts_with(prefix));
            s.routes.extend(tables);
        });
    }

    /// Applies a batch of policies; returns the rejected ones as (name, reason).
    pub fn apply_policies(&self, upserts: &[(String, &[u8])], removed: &[String]) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        let mut decoded = Vec::with_capacity(upserts.len());
        for (name, body) in upserts {
            match wp::Policy::decode(*body) {
                Ok(p) if p.kind.is_some() => decoded.push((name.clone(), Arc::new(p))),
                Ok(_) => rejected.push((name.clone(), "policy has neither authorization nor jwt".to_owned())),
                Err(e) => rejected.push((name.clone(), format!("cannot decode: {e}"))),
            }
        }
        self.update(|s| {
            for name in removed {
                s.policies.remove(name);
            }
            s.policies.extend(decoded);
        });
        rejected
    }
}

/// The xDS subscription for `ServiceRoutes`.
pub struct RoutesSink(pub Arc<ConfigStore>);

impl ResourceSink for RoutesSink {
    fn type_url(&self) -> &'static str {
        mesh_proto::SERVICE_ROUTES_TYPE_URL
    }

    fn apply(&self, upserts: &[(String, &[u8])], removed: &[String]) -> Vec<(String, String)> {
        self.0.apply_routes(upserts, removed)
    }
}

/// The xDS subscription for waypoint `Policy`.
pub struct PolicySink(pub Arc<ConfigStore>);

impl ResourceSink for PolicySink {
    fn type_url(&self) -> &'static str {
        mesh_proto::WAYPOINT_POLICY_TYPE_URL
    }

    fn apply(&self, upserts: &[(String, &[u8])], removed: &[String]) -> Vec<(String, String)> {
        self.0.apply_policies(upserts, removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(service: &str, regex: &str) -> Vec<u8> {
        wp::ServiceRoutes {
            service: service.into(),
            routes: vec![wp::Route {
                name: "HTTPRoute/a/r/rules[0]".into(),
                matches: vec![wp::RouteMatch {
                    path: Some(wp::StringMatch {
                        kind: Some(wp::string_match::Kind::Regex(regex.into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn bad_resources_are_rejected_by_name_and_the_rest_applies() {
        let store = ConfigStore::new();
        let good = routes("a/good", "/v[0-9]+");
        let bad_regex = routes("a/bad", "(");
        let rejected = store.apply_routes(
            &[
                ("a/good".into(), good.as_slice()),
                ("a/bad".into(), bad_regex.as_slice()),
                ("a/garbage".into(), b"\xff\xff\xff".as_slice()),
            ],
            &[],
        );
        let names: Vec<&str> = rejected.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a/bad", "a/garbage"]);
        assert!(rejected[0].1.contains("regular expression"), "{}", rejected[0].1);
        assert!(rejected[1].1.contains("cannot decode"), "{}", rejected[1].1);
        assert!(store.load().routes.contains_key("a/good"));
        // The table with a bad rule serves without it (reported above), not its old rules.
        let bad = store.load().routes.get("a/bad").cloned().expect("applied");
        assert!(bad.is_empty() && bad.dropped().len() == 1);

        // A snapshot taken before an update keeps serving the old configuration.
        let before = store.load();
        store.apply_routes(&[], &["a/good".into()]);
        assert!(before.routes.contains_key("a/good") && !store.load().routes.contains_key("a/good"));

        let empty_policy = wp::Policy::default().encode_to_vec();
        let rejected = store.apply_policies(&[("Kind/a/p".into(), empty_policy.as_slice())], &[]);
        assert_eq!(
            rejected.len(),
            1,
            "a policy that is neither authorization nor jwt is refused"
        );
    }
}
