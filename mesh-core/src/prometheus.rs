//! Prometheus text exposition: prometheus-client writes OpenMetrics; Prometheus' classic
//! text format (0.0.4, what `promtool check metrics` reads) differs in counter naming and the
//! `# EOF` marker.

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: counter families are named with their
/// `_total` suffix in HELP/TYPE (as their samples are), and the `# EOF` marker is dropped.
pub fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64 * counters.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The `/metrics` answer for `registry`: OpenMetrics when the scraper asks for it in
/// `Accept`, Prometheus text 0.0.4 otherwise.
pub fn response(
    registry: &prometheus_client::registry::Registry,
    request_headers: &http::HeaderMap,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let text = |status: http::StatusCode, content_type: &'static str, body: String| {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        r
    };
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        return text(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding metrics: {e}\n"),
        );
    }
    let openmetrics = request_headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        text(
            http::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            out,
        )
    } else {
        text(
            http::StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            openmetrics_to_prometheus(&out),
        )
    }
}
