//! `meshctl explain`: what the mesh does with one call, hop by hop — capture at the source,
//! the destination it resolves to, the waypoint and its route and L7 policies, the L4 policies
//! at the destination's ztunnel — and which policy rule decided. Decided by the code the
//! proxies run: the controller's translation, mesh-core's state and RBAC (ztunnel), the
//! waypoint's route matching and authorization. Offline, from the manifests the controller
//! reads; in local mode those are the live state.

pub mod call;
mod view;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use controller::translate::Options;
use mesh_core::identity::Identity;
use mesh_core::rbac::{self, ConnectionInfo, Decision};
use mesh_core::state::model::{GatewayAddress, GatewayDestination, Service, Tunnel, Workload};
use mesh_core::state::Destination;

pub use call::{Call, CallError, Source, Target};
pub use view::{build, View};

mod l7;

/// Which proxy refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcer {
    Waypoint,
    DestinationZtunnel,
    SourceZtunnel,
}

/// What happens to the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Reaches the application: `pod ns/name ip:port`.
    Allowed { backend: String },
    /// Refused, by whom and why (the policy and rule, or what is missing).
    Denied { by: Enforcer, reason: String },
    /// Answered by the waypoint without a backend (a redirect).
    Answered { reply: String },
}

/// The explanation: one line per hop, then the verdict.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub hops: Vec<(String, String)>,
    pub verdict: Verdict,
    pub notes: Vec<String>,
}

/// What cannot be explained (the caller or the destination is not in the manifests).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("pod {0} is not in the manifests (or has no IP)")]
    NoPod(String),
    #[error("no service named {0} in the manifests")]
    NoService(String),
}

/// The source as ztunnel sees it.
struct Caller {
    ip: IpAddr,
    identity: Option<Identity>,
    workload: Option<Arc<Workload>>,
}

fn describe_workload(w: &Workload) -> String {
    let ip = w.addresses.first().map(ToString::to_string).unwrap_or_default();
    format!("pod {}/{} {ip}", w.namespace, w.name)
}

impl Explanation {
    fn hop(&mut self, at: impl Into<String>, text: impl Into<String>) {
        self.hops.push((at.into(), text.into()));
    }

    /// The hops, the verdict and the notes, as printed.
    pub fn render(&self) -> String {
        let width = self.hops.iter().map(|(a, _)| a.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (at, text) in &self.hops {
            out.push_str(&format!("{at:<width$}  {text}\n"));
        }
        out.push_str(&match &self.verdict {
            Verdict::Allowed { backend } => format!("ALLOWED: reaches {backend}\n"),
            Verdict::Denied { by, reason } => {
                let who = match by {
                    Enforcer::Waypoint => "the waypoint (HTTP 403)",
                    Enforcer::DestinationZtunnel => "the destination's ztunnel (connection refused)",
                    Enforcer::SourceZtunnel => "the source's ztunnel (connection refused)",
                };
                format!("DENIED by {who}: {reason}\n")
            }
            Verdict::Answered { reply } => format!("ANSWERED by the waypoint: {reply}\n"),
        });
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

/// Loads the manifests under `paths` (as `analyze` does) and explains `call`.
pub fn run(paths: &[std::path::PathBuf], call: &Call) -> anyhow::Result<Explanation> {
    let corpus = crate::analyze::load(paths)?;
    let view = build(&corpus.inputs, Options::default());
    Ok(explain(&view, call)?)
}

/// Explains `call` against `view`.
pub fn explain(view: &View, call: &Call) -> Result<Explanation, ExplainError> {
    let mut ex = Explanation {
        hops: Vec::new(),
        verdict: Verdict::Allowed { backend: String::new() },
        notes: view.notes.clone(),
    };
    let caller = caller(view, &call.from)?;
    match &caller.workload {
        Some(w) if w.tunnel == Tunnel::Hbone => ex.hop(
            "source",
            format!(
                "{} on {}, identity {}; captured: its ztunnel carries the call over HBONE",
                describe_workload(w),
                if w.node.is_empty() { "its node" } else { &w.node },
                w.identity
            ),
        ),
        Some(w) => ex.hop(
            "source",
            format!("{} is not captured: it connects in plaintext", describe_workload(w)),
        ),
        None => ex.hop("source", format!("{} is outside the mesh: plaintext", caller.ip)),
    }
    let dest = destination(view, &call.to)?;
    let captured = caller.identity.is_some();
    match dest {
        Some(Destination::Service(svc)) => {
            ex.hop("destination", format!("service {} port {}", svc.key(), call.port));
            match (&svc.waypoint, captured) {
                (Some(wp), true) => via_waypoint(view, call, &caller, &svc, wp, &mut ex),
                _ => {
                    let Some((w, port)) = pick_endpoint(view, &svc, call.port, &mut ex) else {
                        return Ok(ex);
                    };
                    l4(view, &w, port, &caller, &mut ex);
                }
            }
        }
        Some(Destination::Workload(w)) => {
            ex.hop(
                "destination",
                format!("{} port {} (dialled directly)", describe_workload(&w), call.port),
            );
            if let (Some(wp), true) = (&w.waypoint, captured) {
                let svc = workload_as_service(&w, call.port);
                via_waypoint(view, call, &caller, &svc, wp, &mut ex);
            } else {
                if view
                    .state
                    .services()
                    .any(|s| s.waypoint.is_some() && w.service_ports(&s.key()).is_some())
                {
                    ex.hop(
                        "waypoint",
                        "none: the pod is dialled by IP, so its service's waypoint is bypassed",
                    );
                }
                l4(view, &w, call.port, &caller, &mut ex);
            }
        }
        None => {
            ex.hop("destination", "not in the mesh registry: passed through as plain TCP");
            ex.verdict = Verdict::Allowed {
                backend: "the dialled address, outside the mesh".to_owned(),
            };
        }
    }
    Ok(ex)
}

fn caller(view: &View, from: &Source) -> Result<Caller, ExplainError> {
    let workload = match from {
        Source::Pod(key) => {
            let uid = format!("{}//Pod/{}/{}", view.options.cluster_id, key.namespace, key.name);
            Some(
                view.state
                    .workload(&uid)
                    .cloned()
                    .ok_or_else(|| ExplainError::NoPod(key.to_string()))?,
            )
        }
        Source::Ip(ip) => view.state.workload_by_ip(&view.options.network, *ip).cloned(),
    };
    let ip = match (from, &workload) {
        (Source::Ip(ip), _) => *ip,
        (_, Some(w)) => w
            .addresses
            .first()
            .copied()
            .ok_or_else(|| ExplainError::NoPod(w.name.clone()))?,
        (Source::Pod(key), None) => return Err(ExplainError::NoPod(key.to_string())),
    };
    let identity = workload
        .as_ref()
        .filter(|w| w.tunnel == Tunnel::Hbone)
        .map(|w| w.identity.clone());
    Ok(Caller { ip, identity, workload })
}

/// The full service hostname for `name.ns`, `name.ns.svc` or a full name.
fn full_hostname(host: &str, options: &Options) -> String {
    let suffix = format!(".svc.{}", options.domain_suffix);
    if host.ends_with(&suffix) {
        host.to_owned()
    } else if host.ends_with(".svc") {
        format!("{host}.{}", options.domain_suffix)
    } else if host.matches('.').count() == 1 {
        format!("{host}{suffix}")
    } else {
        host.to_owned()
    }
}

fn destination(view: &View, to: &Target) -> Result<Option<Destination>, ExplainError> {
    Ok(match to {
        Target::Host(host) => {
            let full = full_hostname(host, &view.options);
            let svc = view
                .state
                .services_by_hostname(&full)
                .next()
                .cloned()
                .ok_or(ExplainError::NoService(full))?;
            Some(Destination::Service(svc))
        }
        Target::Pod(key) => {
            let uid = format!("{}//Pod/{}/{}", view.options.cluster_id, key.namespace, key.name);
            let w = view
                .state
                .workload(&uid)
                .cloned()
                .ok_or_else(|| ExplainError::NoPod(key.to_string()))?;
            Some(Destination::Workload(w))
        }
        Target::Ip(ip) => view.state.lookup(&view.options.network, *ip),
    })
}

/// A pod addressed directly behaves as a service of its own at its waypoint.
fn workload_as_service(w: &Workload, port: u16) -> Service {
    Service {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        hostname: w.addresses.first().map(ToString::to_string).unwrap_or_default(),
        vips: Vec::new(),
        ports: vec![mesh_core::state::model::PortMapping {
            service_port: port,
            target_port: port,
        }],
        subject_alt_names: Vec::new(),
        waypoint: w.waypoint.clone(),
        only_healthy: false,
    }
}

/// The first endpoint of `svc` and its target port for `port`, or the verdict that none exists.
fn pick_endpoint(view: &View, svc: &Service, port: u16, ex: &mut Explanation) -> Option<(Arc<Workload>, u16)> {
    let endpoints = view.state.endpoints(svc);
    let Some(w) = endpoints.first() else {
        ex.verdict = Verdict::Denied {
            by: Enforcer::SourceZtunnel,
            reason: format!("service {} has no healthy endpoint", svc.key()),
        };
        return None;
    };
    let target = w.target_port(svc, port).unwrap_or(port);
    if endpoints.len() > 1 {
        ex.notes.push(format!(
            "{} endpoints; the first ({}) is explained",
            endpoints.len(),
            w.name
        ));
    }
    Some((w.clone(), target))
}

/// The L4 decision of the destination's ztunnel for a connection from `caller` to `w:port`.
fn l4(view: &View, w: &Workload, port: u16, caller: &Caller, ex: &mut Explanation) {
    let Some(ip) = w.addresses.first().copied() else { return };
    let dst = SocketAddr::new(ip, port);
    let backend = format!("pod {}/{} {dst}", w.namespace, w.name);
    if w.tunnel != Tunnel::Hbone {
        ex.hop(
            "destination",
            format!("{backend} is not captured: no ztunnel policy applies"),
        );
        ex.verdict = Verdict::Allowed { backend };
        return;
    }
    let info = ConnectionInfo {
        src_identity: caller.identity.clone(),
        src_ip: caller.ip,
        dst,
    };
    let (decision, considered) = rbac::evaluate_traced(view.state.policies_for(w), &info);
    let at = format!("ztunnel {}", if w.node.is_empty() { "(destination)" } else { &w.node });
    let peer = caller
        .identity
        .as_ref()
        .map_or_else(|| "no identity (plaintext)".to_owned(), ToString::to_string);
    ex.hop(at.clone(), format!("L4 policies for {backend}, peer {peer}"));
    if considered.is_empty() {
        ex.hop(at.clone(), "  no policy applies");
    }
    for c in &considered {
        let matched = c
            .matched_rule
            .map_or("no rule matches".to_owned(), |r| format!("rule {r} matches"));
        let dry = if c.dry_run {
            " (dry run: logged only)"
        } else if c.action == rbac::Action::Audit {
            " (audit: logged only)"
        } else {
            ""
        };
        let action = match c.action {
            rbac::Action::Allow => "ALLOW",
            rbac::Action::Deny => "DENY",
            rbac::Action::Audit => "AUDIT",
        };
        ex.hop(at.clone(), format!("  {action} {}: {matched}{dry}", c.policy));
    }
    ex.verdict = match decision {
        Decision::Allow => Verdict::Allowed { backend },
        Decision::Deny(denial) => Verdict::Denied {
            by: Enforcer::DestinationZtunnel,
            reason: denial.to_string(),
        },
    };
}

/// Through the waypoint: its route and L7 policies, then the backend's ztunnel with the
/// waypoint's identity as the peer.
fn via_waypoint(view: &View, call: &Call, caller: &Caller, svc: &Service, wp: &GatewayAddress, ex: &mut Explanation) {
    let deployment = view.outputs.waypoints.values().find(|d| match &wp.destination {
        GatewayDestination::Address { ip, .. } => d.address == Some(*ip),
        GatewayDestination::Hostname { namespace, hostname } => {
            d.gateway.namespace == *namespace && hostname.starts_with(&format!("{}.", d.gateway.name))
        }
    });
    let Some(deployment) = deployment else {
        ex.hop("waypoint", format!("{wp:?} is not a deployed waypoint"));
        ex.verdict = Verdict::Denied {
            by: Enforcer::SourceZtunnel,
            reason: "the destination's waypoint is missing: ztunnel fails closed".to_owned(),
        };
        return;
    };
    ex.hop(
        "waypoint",
        format!(
            "{} ({}), the destination's waypoint",
            deployment.gateway, deployment.identity
        ),
    );
    let Some(next) = l7::decide(view, call, caller, svc, deployment, ex) else {
        return;
    };
    let waypoint_caller = Caller {
        ip: waypoint_ip(view, deployment).unwrap_or(caller.ip),
        identity: deployment.identity.parse().ok(),
        workload: None,
    };
    l4(view, &next.0, next.1, &waypoint_caller, ex);
}

/// The waypoint pod's address (the source the backend's ztunnel sees), when it is known.
fn waypoint_ip(view: &View, d: &controller::waypoint::WaypointDeployment) -> Option<IpAddr> {
    view.state
        .workloads()
        .find(|w| {
            w.namespace == d.gateway.namespace
                && w.identity.to_string() == d.identity
                && w.name.starts_with(&d.gateway.name)
        })
        .and_then(|w| w.addresses.first().copied())
}
