//! The CNI commands: ADD, DEL, CHECK, STATUS, VERSION (and a no-op GC).

use super::agent_client::{AgentClient, AgentError, Response};
use super::config::{
    self, pod_ref, prev_result_ips, version_at_least, CniEnv, Command, NetConf, PodRef, LATEST_VERSION,
    SUPPORTED_VERSIONS,
};
use super::error::{codes, CniError, CniResult};
use super::log::Logger;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::Instant;

/// Agent API paths.
pub const PATH_ADD: &str = "/v1/pods/add";
pub const PATH_DEL: &str = "/v1/pods/del";
pub const PATH_CHECK: &str = "/v1/pods/check";
pub const PATH_READY: &str = "/v1/ready";

/// What a successful command prints on stdout (nothing for DEL, CHECK, STATUS, GC).
pub type Output = Option<Value>;

/// VERSION: the versions we speak, stamped with the config's version when it is one of them.
pub fn cmd_version(raw: Option<&Map<String, Value>>) -> CniResult<Output> {
    let version = raw
        .and_then(|m| m.get("cniVersion"))
        .and_then(Value::as_str)
        .filter(|v| config::is_supported_version(v))
        .unwrap_or(LATEST_VERSION);
    Ok(Some(json!({
        "cniVersion": version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })))
}

/// Everything an ADD / DEL / CHECK needs.
pub struct Invocation<'a> {
    pub conf: &'a NetConf,
    pub env: &'a CniEnv,
    pub log: &'a mut Logger,
}

impl Invocation<'_> {
    fn client(&self) -> AgentClient {
        AgentClient::new(self.conf.agent_socket.clone(), self.conf.agent_timeout)
    }

    fn pod_body(&self, pod: &PodRef, ips: &[String]) -> Value {
        json!({
            "containerId": self.env.container_id,
            "netns": self.env.netns,
            "ifname": self.env.ifname,
            "podName": pod.name,
            "podNamespace": pod.namespace,
            "ips": ips,
            // The agent gives up waiting for an undecided pod before the plugin gives up on it.
            "timeoutMs": u64::try_from(self.conf.agent_timeout.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// Read the env for `command` and attach the invocation's identity to the log context.
pub fn load_env(env: &HashMap<String, String>, command: Command, log: &mut Logger) -> CniResult<CniEnv> {
    let cni_env = CniEnv::from_env(env, command)?;
    let mut ctx = format!("cmd={} container={}", command.as_str(), cni_env.container_id);
    if let (Some(ns), Some(name)) = (cni_env.args.get("K8S_POD_NAMESPACE"), cni_env.args.get("K8S_POD_NAME")) {
        ctx.push_str(&format!(" pod={ns}/{name}"));
    }
    log.set_context(ctx);
    Ok(cni_env)
}

/// The previous plugin's result, with our config's cniVersion (what ADD prints).
fn chained_result(conf: &NetConf) -> CniResult<(Map<String, Value>, Vec<String>)> {
    let Some(prev) = conf.prev_result.as_ref() else {
        return Err(CniError::new(
            codes::INVALID_NETWORK_CONFIG,
            "no prevResult: ambient-cni must be chained after a primary CNI plugin",
        )
        .with_details("add it after the interface-creating plugin (e.g. bridge, ptp) in the conflist's \"plugins\""));
    };
    let ips = prev_result_ips(prev)?;
    let mut result = prev.clone();
    result.insert("cniVersion".to_string(), Value::String(conf.cni_version.clone()));
    Ok((result, ips))
}

/// The agent's `{"error": "..."}` (or the start of whatever body it sent).
fn agent_error_message(resp: &Response) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(&resp.body) {
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            return e.to_string();
        }
    }
    let text = String::from_utf8_lossy(&resp.body);
    let text = text.trim();
    if text.is_empty() {
        "no error message".to_string()
    } else {
        text.chars().take(300).collect()
    }
}

/// A failed call to the agent as a CNI error. `what` names the operation.
fn agent_failure(client: &AgentClient, what: &str, err: AgentError) -> CniError {
    let socket = client.socket().display();
    match err {
        AgentError::Unreachable(m) => CniError::new(
            codes::AGENT_UNREACHABLE,
            format!("{what}: ambient node agent unreachable at {socket}: {m}"),
        ),
        AgentError::Timeout(m) => CniError::new(
            codes::TRY_AGAIN_LATER,
            format!(
                "{what}: ambient node agent at {socket} did not answer within {} ms ({m})",
                client.timeout().as_millis()
            ),
        ),
        AgentError::Protocol(m) => CniError::new(
            codes::AGENT_PROTOCOL,
            format!("{what}: bad response from ambient node agent at {socket}: {m}"),
        ),
    }
}

fn agent_status_failure(what: &str, resp: &Response) -> CniError {
    // 503: the agent is up but not ready yet (e.g. still reconciling): transient.
    let code = if resp.status == 503 {
        codes::TRY_AGAIN_LATER
    } else {
        codes::AGENT_REFUSED
    };
    CniError::new(
        code,
        format!(
            "{what}: ambient node agent answered {}: {}",
            resp.status,
            agent_error_message(resp)
        ),
    )
}

const FAIL_CLOSED: &str = "the pod is not started rather than started outside the mesh (fail closed)";

/// ADD: enrol the pod with the agent (fail closed), then pass the previous result through.
pub fn cmd_add(inv: Invocation<'_>) -> CniResult<Output> {
    let (result, ips) = chained_result(inv.conf)?;
    let Some(pod) = pod_ref(&inv.env.args)? else {
        inv.log
            .info("no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS: not a pod, passing through");
        return Ok(Some(Value::Object(result)));
    };
    if inv.conf.is_excluded_namespace(&pod.namespace) {
        // Never ambient: answered without the agent, so its absence blocks nothing here.
        inv.log.info(&format!(
            "namespace {} is excluded from the mesh: passing through without the agent",
            pod.namespace
        ));
        return Ok(Some(Value::Object(result)));
    }
    let client = inv.client();
    let started = Instant::now();
    let what = format!("enrolling pod {}/{}", pod.namespace, pod.name);
    let resp = client
        .post_json(PATH_ADD, &inv.pod_body(&pod, &ips))
        .map_err(|e| agent_failure(&client, &what, e).with_details(FAIL_CLOSED))?;
    if resp.status != 200 {
        return Err(agent_status_failure(&what, &resp).with_details(FAIL_CLOSED));
    }
    let captured = serde_json::from_slice::<Value>(&resp.body)
        .ok()
        .and_then(|v| v.get("captured").and_then(Value::as_bool))
        .ok_or_else(|| {
            CniError::new(
                codes::AGENT_PROTOCOL,
                format!(
                    "{what}: ambient node agent answered 200 without a boolean \"captured\": {}",
                    agent_error_message(&resp)
                ),
            )
            .with_details(FAIL_CLOSED)
        })?;
    inv.log.info(&format!(
        "agent answered in {} us: captured={captured} ips={ips:?}",
        started.elapsed().as_micros()
    ));
    Ok(Some(Value::Object(result)))
}

/// DEL: tell the agent the pod is gone. Idempotent; an unreachable agent is logged, not fatal
/// (the agent reconciles at startup), so pod teardown never blocks on it.
pub fn cmd_del(inv: Invocation<'_>) -> CniResult<Output> {
    let pod = match pod_ref(&inv.env.args) {
        Ok(Some(pod)) => pod,
        Ok(None) => {
            inv.log
                .info("no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS: not a pod, nothing to do");
            return Ok(None);
        }
        Err(e) => {
            inv.log
                .warn(&format!("{}: not a pod we could have enrolled, nothing to do", e.msg));
            return Ok(None);
        }
    };
    let client = inv.client();
    let body = json!({
        "containerId": inv.env.container_id,
        "netns": inv.env.netns,
        "podName": pod.name,
        "podNamespace": pod.namespace,
    });
    let what = format!("removing pod {}/{}", pod.namespace, pod.name);
    match client.post_json(PATH_DEL, &body) {
        Ok(resp) if matches!(resp.status, 200 | 202 | 204) => {
            inv.log.info("agent removed the pod");
            Ok(None)
        }
        Ok(resp) if resp.status == 404 => {
            inv.log.info("agent does not know the pod: nothing to remove");
            Ok(None)
        }
        Ok(resp) if resp.status == 503 => {
            // Up but not ready (still reconciling): like an absent agent, it catches up itself.
            inv.log.warn(&format!(
                "{}; DEL succeeds anyway, the agent reconciles when it is ready",
                agent_status_failure(&what, &resp).msg
            ));
            Ok(None)
        }
        Ok(resp) => Err(agent_status_failure(&what, &resp)),
        Err(e) => {
            let e = agent_failure(&client, &what, e);
            inv.log.warn(&format!(
                "{}; DEL succeeds anyway, the agent reconciles when it starts",
                e.msg
            ));
            Ok(None)
        }
    }
}

/// CHECK: the pod must have a previous result and the agent must confirm its state.
pub fn cmd_check(inv: Invocation<'_>) -> CniResult<Output> {
    if !version_at_least(&inv.conf.cni_version, "0.4.0") {
        return Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} does not support CHECK (0.4.0 or later needed)",
                inv.conf.cni_version
            ),
        ));
    }
    let (_, ips) = chained_result(inv.conf)?;
    let Some(pod) = pod_ref(&inv.env.args)? else {
        return Ok(None);
    };
    if inv.conf.is_excluded_namespace(&pod.namespace) {
        return Ok(None);
    }
    let client = inv.client();
    let what = format!("checking pod {}/{}", pod.namespace, pod.name);
    let resp = client
        .post_json(PATH_CHECK, &inv.pod_body(&pod, &ips))
        .map_err(|e| agent_failure(&client, &what, e))?;
    if resp.status != 200 {
        return Err(agent_status_failure(&what, &resp));
    }
    Ok(None)
}

/// STATUS: ready when the agent says so.
pub fn cmd_status(conf: &NetConf) -> CniResult<Output> {
    if !version_at_least(&conf.cni_version, "1.1.0") {
        return Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!("cniVersion {} does not support STATUS (1.1.0 needed)", conf.cni_version),
        ));
    }
    let client = AgentClient::new(conf.agent_socket.clone(), conf.agent_timeout);
    let not_available = |reason: String| {
        CniError::new(
            codes::NOT_AVAILABLE,
            format!("plugin not available: ambient node agent {reason}"),
        )
        .with_details(format!("socket {}", conf.agent_socket.display()))
    };
    match client.get(PATH_READY) {
        Ok(resp) if resp.status == 200 => Ok(None),
        Ok(resp) => Err(not_available(format!(
            "not ready ({}: {})",
            resp.status,
            agent_error_message(&resp)
        ))),
        Err(e) => Err(not_available(e.to_string())),
    }
}

/// GC (CNI 1.1): nothing to collect here; the agent reconciles its own state.
pub fn cmd_gc(conf: &NetConf) -> CniResult<Output> {
    if !version_at_least(&conf.cni_version, "1.1.0") {
        return Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!("cniVersion {} does not support GC (1.1.0 needed)", conf.cni_version),
        ));
    }
    Ok(None)
}
