//! `meshctl clusters`: the clusters a controller serves (its own and the remote ones), each
//! with its network, sync state, what it contributes and its network's east-west gateways,
//! from the controller's `/debug/clusters` view.

use std::time::Duration;

use serde_json::Value;

use crate::http::{self, Url};
use crate::table::Table;

/// Why the clusters could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum ClustersError {
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("{url}: HTTP {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("{url}: not the clusters view: {reason}")]
    Json { url: String, reason: String },
}

/// Fetches `<admin>/debug/clusters` and renders it as a table, or as JSON with `json`.
pub fn run(admin: &str, json: bool, timeout: Duration) -> Result<(String, bool), ClustersError> {
    let url = Url::parse(admin)?.with_path("/debug/clusters");
    let name = format!("http://{}{}", url.addr(), url.path);
    let r = http::get(&url, timeout)?;
    if r.status != 200 {
        return Err(ClustersError::Status {
            url: name,
            status: r.status,
            body: r.body.trim().to_owned(),
        });
    }
    let value: Value = serde_json::from_str(&r.body).map_err(|e| ClustersError::Json {
        url: name.clone(),
        reason: e.to_string(),
    })?;
    let Some(rows) = value.as_array() else {
        return Err(ClustersError::Json {
            url: name,
            reason: "not a list".into(),
        });
    };
    let healthy = rows.iter().all(|c| c["state"] == "synced");
    if json {
        return Ok((format!("{value:#}\n"), healthy));
    }
    Ok((render(rows), healthy))
}

/// One row per cluster; a remote cluster's failure reason closes its row.
pub fn render(rows: &[Value]) -> String {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let mut table = Table::new(&[
        "CLUSTER",
        "ROLE",
        "NETWORK",
        "STATE",
        "WORKLOADS",
        "SERVICES",
        "GATEWAYS",
        "REASON",
    ]);
    for c in rows {
        let network = match text(&c["network"]) {
            n if n.is_empty() => "(default)".to_owned(),
            n => n,
        };
        let gateways: Vec<String> = c["gateways"].as_array().into_iter().flatten().map(text).collect();
        table.row(vec![
            text(&c["id"]),
            if c["local"] == true { "local" } else { "remote" }.to_owned(),
            network,
            text(&c["state"]),
            c["workloads"].as_u64().unwrap_or(0).to_string(),
            c["services"].as_u64().unwrap_or(0).to_string(),
            if gateways.is_empty() {
                "-".to_owned()
            } else {
                gateways.join(",")
            },
            text(&c["reason"]),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_local_and_remote_clusters() {
        let rows: Vec<Value> = serde_json::from_str(
            r#"[{"id":"c68","network":"","local":true,"state":"synced","workloads":3,"services":2,"gateways":[]},
                {"id":"c69","network":"net-b","local":false,"state":"withdrawn","reason":"/m: No such file","workloads":0,"services":0,"gateways":["10.90.69.200:15008"]}]"#,
        )
        .unwrap();
        let out = render(&rows);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("CLUSTER"), "{out}");
        assert!(
            lines[1].contains("c68") && lines[1].contains("local") && lines[1].contains("(default)"),
            "{out}"
        );
        assert!(
            lines[2].contains("withdrawn")
                && lines[2].contains("10.90.69.200:15008")
                && lines[2].ends_with("/m: No such file"),
            "{out}"
        );
    }
}
