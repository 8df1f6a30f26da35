//! What an effective Telemetry ([`super::effective`]) changes about one request's telemetry:
//! the trace sampling rate and custom span tags, the labels of each metric series (tags
//! removed or added, metrics disabled), and whether the access log line is written.
//! Expressions are `mesh_core::expr`, evaluated over [`Facts`]: what is known of the request
//! once it is answered.

use std::borrow::Cow;
use std::sync::Arc;

use http::HeaderMap;
use mesh_core::expr::{self, Attr, Value};
use mesh_proto::waypoint as wp;

use super::effective::{overrides_for, Effective};
use super::metrics::{SeriesLabels, StandardLabels, MAX_TAG_VALUE};

/// What expressions can ask about a request.
pub struct Facts<'a> {
    pub status: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub protocol: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub source_principal: &'a str,
    pub source_namespace: &'a str,
    pub source_workload: &'a str,
    pub service_name: &'a str,
    pub service_host: &'a str,
    pub service_namespace: &'a str,
    pub destination_workload: &'a str,
    pub port: u16,
}

impl Facts<'_> {
    pub fn attr(&self, a: &Attr) -> Option<Value<'_>> {
        let s = |v: &str| (!v.is_empty()).then(|| Value::Str(Cow::Owned(v.to_owned())));
        match a {
            Attr::ResponseCode => Some(Value::Int(i64::from(self.status))),
            Attr::RequestMethod => s(self.method),
            Attr::RequestPath => s(self.path),
            Attr::RequestHost => s(self.host),
            Attr::RequestProtocol => s(self.protocol),
            Attr::RequestHeader(h) => self
                .headers?
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .map(|v| Value::Str(Cow::Owned(v.to_owned()))),
            Attr::SourcePrincipal => s(self.source_principal),
            Attr::SourceNamespace => s(self.source_namespace),
            Attr::SourceWorkload => s(self.source_workload),
            Attr::DestinationServiceName => s(self.service_name),
            Attr::DestinationServiceHost => s(self.service_host),
            Attr::DestinationServiceNamespace => s(self.service_namespace),
            Attr::DestinationWorkload => s(self.destination_workload),
            Attr::DestinationPort => Some(Value::Int(i64::from(self.port))),
        }
    }
}

/// Whether the request's headers must be kept until it is answered (an expression may read them).
pub fn needs_headers(e: &Effective<'_>) -> bool {
    let tag_reads = e
        .metrics
        .iter()
        .flat_map(|o| &o.tags)
        .any(|t| t.value.contains("request.headers"));
    tag_reads || e.access_log.is_some_and(|a| a.filter.contains("request.headers"))
}

/// The sampling percentage for new traces.
pub fn sampling(e: &Effective<'_>, default: f64) -> f64 {
    e.tracing.filter(|t| t.has_sampling).map_or(default, |t| t.sampling)
}

/// Custom span tags, read while the request's headers are at hand.
pub fn custom_tags(e: &Effective<'_>, headers: &HeaderMap) -> Vec<(String, String)> {
    let Some(t) = e.tracing else { return Vec::new() };
    t.custom_tags
        .iter()
        .map(|tag| {
            let value = match &tag.kind {
                Some(wp::custom_tag::Kind::Literal(v)) => Some(v.clone()),
                Some(wp::custom_tag::Kind::Header(h)) => {
                    headers.get(h.as_str()).and_then(|v| v.to_str().ok()).map(str::to_owned)
                }
                Some(wp::custom_tag::Kind::Environment(var)) => std::env::var(var).ok(),
                None => None,
            };
            (tag.name.clone(), value.unwrap_or_else(|| tag.default_value.clone()))
        })
        .collect()
}

/// The labels of `metric`'s series for this request, or `None` when a Telemetry disables it.
pub fn series(
    e: &Effective<'_>,
    metric: &str,
    labels: &Arc<StandardLabels>,
    facts: &Facts<'_>,
) -> Option<SeriesLabels> {
    let mut overrides = overrides_for(e, metric).peekable();
    if overrides.peek().is_none() {
        return Some(SeriesLabels::Standard(labels.clone()));
    }
    let mut pairs: Option<Vec<(String, String)>> = None;
    for o in overrides {
        if o.disabled {
            return None;
        }
        for t in &o.tags {
            let p = pairs.get_or_insert_with(|| labels.labels().pairs());
            p.retain(|(k, _)| *k != t.name);
            if !t.remove {
                let mut value = expr::parse_value(&t.value)
                    .ok()
                    .and_then(|v| v.value(&|a| facts.attr(a)).map(|v| v.to_text()))
                    .unwrap_or_else(|| "unknown".to_owned());
                // A value may be what a client sent: cut it (on a character boundary).
                if value.len() > MAX_TAG_VALUE {
                    let mut end = MAX_TAG_VALUE;
                    while !value.is_char_boundary(end) {
                        end -= 1;
                    }
                    value.truncate(end);
                }
                p.push((t.name.clone(), value));
            }
        }
    }
    Some(match pairs {
        Some(p) => SeriesLabels::Custom(p),
        None => SeriesLabels::Standard(labels.clone()),
    })
}

/// Whether the access log line is written: not when disabled, and only when the filter holds
/// (a filter the controller could not read never arrives; one that fails here logs).
pub fn log_wanted(e: &Effective<'_>, facts: &Facts<'_>) -> bool {
    match e.access_log {
        Some(a) if a.disabled => false,
        Some(a) if !a.filter.is_empty() => {
            expr::parse_filter(&a.filter).map_or(true, |f| f.eval(&|attr| facts.attr(attr)))
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::RequestLabels;

    fn facts(status: u16) -> Facts<'static> {
        Facts {
            status,
            method: "GET",
            path: "/",
            host: "server.shop.svc.cluster.local",
            protocol: "http",
            headers: None,
            source_principal: "cluster.local/ns/shop/sa/client",
            source_namespace: "shop",
            source_workload: "client",
            service_name: "server",
            service_host: "server.shop.svc.cluster.local",
            service_namespace: "shop",
            destination_workload: "server-v1",
            port: 80,
        }
    }

    fn labels() -> Arc<StandardLabels> {
        let svc = mesh_core::state::model::Service {
            name: "server".into(),
            namespace: "shop".into(),
            hostname: "server.shop.svc.cluster.local".into(),
            vips: vec![],
            ports: vec![],
            subject_alt_names: vec![],
            waypoint: None,
            only_healthy: true,
        };
        StandardLabels::new(RequestLabels::new(None, "p", None, Some(&svc), "http"))
    }

    #[test]
    fn tags_added_removed_and_metrics_disabled() {
        let overrides = vec![
            wp::MetricOverride {
                metric: "REQUEST_COUNT".into(),
                disabled: false,
                tags: vec![
                    wp::TagOverride {
                        name: "request_host".into(),
                        remove: false,
                        value: "request.host".into(),
                    },
                    wp::TagOverride {
                        name: "env".into(),
                        remove: false,
                        value: "'prod'".into(),
                    },
                    wp::TagOverride {
                        name: "request_protocol".into(),
                        remove: true,
                        value: String::new(),
                    },
                ],
            },
            wp::MetricOverride {
                metric: "REQUEST_SIZE".into(),
                disabled: true,
                tags: vec![],
            },
        ];
        let e = Effective {
            metrics: &overrides,
            ..Default::default()
        };
        let f = facts(200);
        let Some(SeriesLabels::Custom(p)) = series(&e, "REQUEST_COUNT", &labels(), &f) else {
            panic!()
        };
        assert!(p
            .iter()
            .any(|(k, v)| k == "request_host" && v == "server.shop.svc.cluster.local"));
        assert!(p.iter().any(|(k, v)| k == "env" && v == "prod"));
        assert!(!p.iter().any(|(k, _)| k == "request_protocol"));
        assert_eq!(p.len(), 26);
        assert!(series(&e, "REQUEST_SIZE", &labels(), &f).is_none());
        assert!(matches!(
            series(&e, "REQUEST_DURATION", &labels(), &f),
            Some(SeriesLabels::Standard(_))
        ));
    }

    #[test]
    fn client_supplied_tag_values_are_bounded_in_length_and_in_series() {
        let overrides = vec![wp::MetricOverride {
            metric: "REQUEST_COUNT".into(),
            disabled: false,
            tags: vec![wp::TagOverride {
                name: "user".into(),
                remove: false,
                value: "request.headers['x-user']".into(),
            }],
        }];
        let e = Effective {
            metrics: &overrides,
            ..Default::default()
        };
        let metrics =
            crate::telemetry::metrics::Metrics::register(&mut prometheus_client::registry::Registry::default());
        let mut admitted = 0;
        for i in 0..crate::telemetry::metrics::MAX_CUSTOM_SERIES + 50 {
            let mut headers = HeaderMap::new();
            let user = format!("{i}{}", "x".repeat(200));
            headers.insert("x-user", http::HeaderValue::from_bytes(user.as_bytes()).unwrap());
            let f = Facts {
                headers: Some(&headers),
                ..facts(200)
            };
            let Some(SeriesLabels::Custom(p)) = series(&e, "REQUEST_COUNT", &labels(), &f) else {
                panic!()
            };
            let v = &p.iter().find(|(k, _)| k == "user").unwrap().1;
            assert!(v.len() <= MAX_TAG_VALUE, "{}", v.len());
            let l = metrics.admit(SeriesLabels::Custom(p), labels);
            admitted += usize::from(matches!(l, SeriesLabels::Custom(_)));
        }
        assert!(admitted <= crate::telemetry::metrics::MAX_CUSTOM_SERIES, "{admitted}");
        assert!(metrics.custom_series_overflow.get() >= 50);
    }

    #[test]
    fn access_log_filter_and_sampling() {
        let log = wp::TelemetryAccessLog {
            disabled: false,
            filter: "response.code >= 500".into(),
            ..Default::default()
        };
        let tracing = wp::TelemetryTracing {
            has_sampling: true,
            sampling: 10.0,
            ..Default::default()
        };
        let e = Effective {
            access_log: Some(&log),
            tracing: Some(&tracing),
            ..Default::default()
        };
        assert!(!log_wanted(&e, &facts(200)));
        assert!(log_wanted(&e, &facts(503)));
        assert!(log_wanted(&Effective::default(), &facts(200)));
        let off = wp::TelemetryAccessLog {
            disabled: true,
            ..Default::default()
        };
        assert!(!log_wanted(
            &Effective {
                access_log: Some(&off),
                ..Default::default()
            },
            &facts(500)
        ));
        assert_eq!(sampling(&e, 100.0), 10.0);
        assert_eq!(sampling(&Effective::default(), 100.0), 100.0);
    }
}
