//! `meshctl analyze`: loads manifests with the controller's parser, translates them exactly
//! as the controller would, and reports every problem plus meshctl's own checks
//! ([`checks`]) as findings with a fix, one object and cause per finding.

pub mod checks;
pub mod load;

use std::collections::BTreeSet;
use std::path::PathBuf;

use controller::model::{Inputs, ObjectKey};
use controller::translate::{translate, unimplemented, Options, Problem};

use crate::style::Style;
pub use load::{load, Corpus, LoadError};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warn,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Warn => "WARN",
        }
    }
}

/// One thing wrong, on one object, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// The object's kind (`Document` for a document that did not parse).
    pub kind: String,
    /// `<ns>/<name>` (`<name>` for cluster-scoped kinds; `<file> document <i>` for documents).
    pub object: String,
    pub message: String,
    pub fix: String,
}

impl Finding {
    /// `ERROR <Kind> <ns>/<name>: <what>` and an indented `fix: <how>` line.
    pub fn render(&self, style: Style) -> String {
        let sev = match self.severity {
            Severity::Error => style.red(self.severity.as_str()),
            Severity::Warn => style.yellow(self.severity.as_str()),
        };
        format!(
            "{sev} {} {}: {}\n  {} {}",
            self.kind,
            self.object,
            self.message,
            style.dim("fix:"),
            self.fix
        )
    }
}

/// The result of an analysis.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub files: usize,
    pub objects: usize,
    pub ignored: Vec<(String, usize)>,
    /// References to Services not checked because the inputs hold no Service at all.
    pub unverified_service_refs: usize,
}

impl Report {
    /// The closing summary line.
    pub fn summary(&self) -> String {
        let errors = self.findings.iter().filter(|f| f.severity == Severity::Error).count();
        let warnings = self.findings.len() - errors;
        let mut s = if self.findings.is_empty() {
            format!("no findings in {} object(s) from {} file(s)", self.objects, self.files)
        } else {
            format!(
                "{} finding(s) ({errors} error(s), {warnings} warning(s)) in {} object(s) from {} file(s)",
                self.findings.len(),
                self.objects,
                self.files
            )
        };
        if self.unverified_service_refs > 0 {
            s.push_str(&format!(
                "; {} targetRef(s) to Services not checked (no Service in the inputs)",
                self.unverified_service_refs
            ));
        }
        if !self.ignored.is_empty() {
            let kinds: Vec<String> = self.ignored.iter().map(|(k, n)| format!("{n} {k}")).collect();
            s.push_str(&format!("; not analyzed: {}", kinds.join(", ")));
        }
        s
    }
}

/// A fix for a problem the controller reported, from what it says.
fn fix_for(problem: &Problem) -> String {
    let m = problem.message.as_str();
    if m.contains("cannot be enforced by ztunnel") || m.contains("ztunnel ignores") {
        checks::L7_FIX.to_owned()
    } else if m.ends_with(unimplemented::IGNORED) {
        "the object keeps the field but the mesh does not apply it: remove it, or do not rely on it".to_owned()
    } else if m.contains(unimplemented::FAILS_CLOSED) {
        "remove the field: the mesh does not implement it, and the policy fails closed (allows nothing, or as a DENY denies everything) while it is present".to_owned()
    } else if m.contains("CUSTOM") {
        "attach the policy to a waypoint with targetRefs; ztunnel cannot call an external authorizer".to_owned()
    } else if m.contains("unknown field")
        || m.contains("allows nothing")
        || m.contains("denies everything")
        || m.starts_with("spec")
    {
        "correct the spec as the message says (field names are camelCase, as in the Istio API)".to_owned()
    } else if m.starts_with("action ") {
        "use one of the actions the message lists (ALLOW, DENY, AUDIT, CUSTOM)".to_owned()
    } else if m.contains("is not a duration") {
        "write durations as Istio does: 250ms, 2s, 1m30s".to_owned()
    } else if m.contains("ports differ between clusters") {
        "declare the same ports (and target ports) for the Service in every cluster: clients in any cluster may reach any endpoint".to_owned()
    } else if m.contains("has no east-west gateway") {
        "run an east-west gateway in that network: a Gateway of class istio-east-west with an HBONE listener on 15008 and an address, labelled topology.istio.io/network=<network>".to_owned()
    } else if m.contains("does not exist") || m.contains("not found") {
        "create the object it refers to, or correct the reference".to_owned()
    } else {
        "correct the object as the message says; the controller reports the same at runtime".to_owned()
    }
}

fn object_count(c: &Corpus) -> usize {
    let i = &c.inputs;
    i.namespaces.len()
        + i.pods.len()
        + i.services.len()
        + i.endpoint_slices.len()
        + i.service_accounts.len()
        + i.gateway_classes.len()
        + i.gateways.len()
        + i.http_routes.len()
        + i.grpc_routes.len()
        + i.authorization_policies.len()
        + i.peer_authentications.len()
        + i.request_authentications.len()
        + i.virtual_services.len()
        + i.destination_rules.len()
}

/// Analyzes a loaded corpus.
pub fn analyze(corpus: &Corpus) -> Report {
    analyze_with(corpus, &Options::default())
}

/// Analyzes a loaded corpus as the controller of cluster `options.cluster_id` would translate it.
pub fn analyze_with(corpus: &Corpus, options: &Options) -> Report {
    let inputs = &corpus.inputs;
    let mut findings = corpus_findings(corpus);
    let l7 = checks::l7_policies(inputs, &options.root_namespace);
    let (waypoints, missing) = checks::missing_waypoints(inputs);
    let outputs = translate(inputs, options);
    let (problems, unverified_service_refs) = problem_findings(inputs, &outputs.problems, &l7, &missing);
    findings.extend(problems);
    findings.extend(l7);
    findings.extend(waypoints);
    findings.extend(checks::nodes_without_ztunnel(inputs, &corpus.nodes));
    findings.extend(checks::strict_with_plaintext_clients(inputs, &options.root_namespace));
    // Documents first, then by object; one finding per object and cause.
    findings.sort_by(|a, b| {
        (a.kind != "Document", &a.kind, &a.object, a.severity).cmp(&(
            b.kind != "Document",
            &b.kind,
            &b.object,
            b.severity,
        ))
    });
    findings.dedup();
    Report {
        findings,
        files: corpus.files,
        objects: object_count(corpus),
        ignored: corpus.ignored.iter().map(|(k, n)| (k.clone(), *n)).collect(),
        unverified_service_refs,
    }
}

/// Documents that did not parse and objects declared twice.
fn corpus_findings(corpus: &Corpus) -> Vec<Finding> {
    let mut findings = Vec::new();
    for e in &corpus.errors {
        findings.push(Finding {
            severity: Severity::Error,
            kind: "Document".to_owned(),
            object: format!("{} document {}", e.file.display(), e.index),
            message: e.reason.clone(),
            fix: "correct the document: apiVersion, kind, metadata.name and the spec's field names".to_owned(),
        });
    }
    for (kind, key, kept, ignored) in &corpus.duplicates {
        findings.push(Finding {
            severity: Severity::Warn,
            kind: kind.name().to_owned(),
            object: key.to_string(),
            message: format!(
                "declared in {} and again in {}; the first copy is used",
                kept.display(),
                ignored.display()
            ),
            fix: "keep one definition".to_owned(),
        });
    }

    findings
}

/// The translation's problems as findings, less those a more specific check already names
/// (L7 policies at ztunnel, missing waypoints); with how many Service references could not
/// be checked because the manifests hold no Service at all.
fn problem_findings(
    inputs: &Inputs,
    problems: &[Problem],
    l7: &[Finding],
    missing: &BTreeSet<ObjectKey>,
) -> (Vec<Finding>, usize) {
    let mut findings = Vec::new();
    let mut unverified_service_refs = 0;
    for p in problems {
        // Manifests without any Service are a partial view (the Services live elsewhere):
        // a reference to one cannot be checked, which is not a mistake.
        if inputs.services.is_empty()
            && p.message.starts_with("targetRef Service ")
            && p.message.ends_with("does not exist")
        {
            unverified_service_refs += 1;
            continue;
        }
        let object = p.object.to_string();
        let kind = p.kind.name();
        let covered_by_l7 = kind == "AuthorizationPolicy"
            && (p.message.contains("cannot be enforced by ztunnel") || p.message.contains("ztunnel ignores"))
            && l7.iter().any(|f| f.object == object);
        let covered_by_waypoint = missing
            .iter()
            .any(|wp| p.message.starts_with(&format!("waypoint {wp} does not exist")));
        if covered_by_l7 || covered_by_waypoint {
            continue;
        }
        // A field that is kept but not applied changes nothing the mesh enforces: a warning.
        let severity = if p.message.ends_with(unimplemented::IGNORED) {
            Severity::Warn
        } else {
            Severity::Error
        };
        findings.push(Finding {
            severity,
            kind: kind.to_owned(),
            object,
            message: p.message.clone(),
            fix: fix_for(p),
        });
    }
    (findings, unverified_service_refs)
}

/// Loads and analyzes `paths`.
pub fn run(paths: &[PathBuf]) -> Result<Report, LoadError> {
    let corpus = load(paths)?;
    Ok(analyze(&corpus))
}

/// Loads `paths` as cluster `cluster_id` and each of `remotes` (cluster id, manifests) as a
/// remote cluster, and analyzes them together as that cluster's controller would merge them:
/// services whose ports differ between clusters and networks without an east-west gateway
/// are findings besides everything [`run`] reports.
pub fn run_multicluster(
    paths: &[PathBuf],
    cluster_id: &str,
    remotes: &[(String, PathBuf)],
) -> Result<Report, LoadError> {
    let mut corpus = load(paths)?;
    for (id, path) in remotes {
        let remote = load(std::slice::from_ref(path))?;
        corpus.files += remote.files;
        corpus.errors.extend(remote.errors);
        corpus.inputs.remotes.insert(
            id.clone(),
            controller::model::cluster::Remote {
                inputs: remote.inputs,
                state: controller::model::cluster::RemoteState::Synced,
                listed: true,
            },
        );
    }
    let options = Options {
        cluster_id: cluster_id.to_owned(),
        ..Options::default()
    };
    Ok(analyze_with(&corpus, &options))
}
