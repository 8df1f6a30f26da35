//! `meshctl vm token --group <ns>/<name> [--ttl <seconds>]`: asks the controller's loopback
//! debug listener (`/debug/vm-token`) for a bootstrap token bound to one WorkloadGroup, for
//! a VM's ztunnel (`--token-file`). Run it where the controller runs (or through
//! `kubectl port-forward`): the listener is never reachable from pods.

use std::time::Duration;

use crate::http::{self, Url};

/// Why no token was obtained.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("--group {0:?}: expected <namespace>/<name> (Kubernetes names)")]
    BadGroup(String),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("the controller refused: HTTP {status}: {body}")]
    Status { status: u16, body: String },
}

fn kubernetes_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The request path for `group` and `ttl`; the group is checked so that nothing else can
/// enter the request line.
pub fn request_path(group: &str, ttl: Option<u64>) -> Result<String, VmError> {
    let ok = group
        .split_once('/')
        .is_some_and(|(ns, name)| kubernetes_name(ns) && kubernetes_name(name));
    if !ok {
        return Err(VmError::BadGroup(group.to_owned()));
    }
    let mut path = format!("/debug/vm-token?group={group}");
    if let Some(ttl) = ttl {
        path.push_str(&format!("&ttl={ttl}"));
    }
    Ok(path)
}

/// Fetches a token for `group` from the controller at `admin`.
pub fn token(admin: &str, group: &str, ttl: Option<u64>, timeout: Duration) -> Result<String, VmError> {
    let url = Url::parse(admin)?.with_path(&request_path(group, ttl)?);
    let r = http::get(&url, timeout)?;
    if r.status != 200 {
        return Err(VmError::Status {
            status: r.status,
            body: r.body.trim().to_owned(),
        });
    }
    Ok(r.body.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kubernetes_names_enter_the_request() {
        assert_eq!(
            request_path("vm/db", Some(60)).expect("ok"),
            "/debug/vm-token?group=vm/db&ttl=60"
        );
        for bad in ["db", "vm/", "/db", "vm/db x", "vm/db&ttl=1", "vm/db\r\nX: y", "a/b/c"] {
            assert!(matches!(request_path(bad, None), Err(VmError::BadGroup(_))), "{bad:?}");
        }
    }
}
