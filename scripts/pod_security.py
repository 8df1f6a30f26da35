"""The pod security every workload of the manifests must state, checked offline.

Every container (init containers included) of a Deployment, DaemonSet, StatefulSet, ReplicaSet,
Job, CronJob or Pod must run with:

  runAsNonRoot: true (and no runAsUser 0)   container or pod securityContext
  allowPrivilegeEscalation: false           container
  privileged unset or false                 container
  capabilities.drop containing ALL          container
  no capabilities.add                       container
  seccompProfile RuntimeDefault/Localhost   container or pod
  readOnlyRootFilesystem: true              container

and the pod must not share the node's PID, IPC or network namespace.

A workload that needs one of these is allowed it only with a reason a parser can see: an
annotation of the pod template (so it is also on every pod, for whoever audits the cluster)

  security-exception.ambient-mesh.io/<container>.<setting>: "<why>"
  security-exception.ambient-mesh.io/<hostPID|hostIPC|hostNetwork>: "<why>"

where <setting> is one of the names above (runAsNonRoot, allowPrivilegeEscalation, privileged,
capabilities.drop, seccompProfile, readOnlyRootFilesystem) or capabilities.add.<CAP>, one per
added capability. An exception for a setting that holds, or for a container that does not
exist, is an error too: the reasons stay true.
"""

from __future__ import annotations

from typing import Any

EXCEPTION_PREFIX = "security-exception.ambient-mesh.io/"
HOST_NAMESPACES = ("hostPID", "hostIPC", "hostNetwork")
# The shortest reason accepted: a few words, not "TODO" or "needed".
MIN_REASON = 15


def pod_template(body: dict) -> tuple[str, dict, dict] | None:
    """(path of the pod template, its metadata, its spec) of a workload; None for other kinds."""
    kind = body.get("kind")
    spec = body.get("spec") or {}
    if kind == "Pod":
        return "", body.get("metadata") or {}, spec
    path = "spec.template"
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
        path = "spec.jobTemplate.spec.template"
    elif kind not in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        return None
    template = spec.get("template") or {}
    return path, template.get("metadata") or {}, template.get("spec") or {}


def unmet(container: dict, pod: dict) -> list[tuple[str, str]]:
    """The settings this container does not meet: (exception name, what is wrong)."""
    sc = container.get("securityContext") or {}
    pod_sc = pod.get("securityContext") or {}

    def effective(key: str) -> Any:
        return sc[key] if key in sc else pod_sc.get(key)

    found = []
    if effective("runAsNonRoot") is not True or effective("runAsUser") == 0:
        found.append(("runAsNonRoot", "runAsNonRoot is not true (or runAsUser is 0)"))
    if sc.get("allowPrivilegeEscalation") is not False:
        found.append(("allowPrivilegeEscalation", "allowPrivilegeEscalation is not false"))
    if sc.get("privileged") is True:
        found.append(("privileged", "privileged is true"))
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        found.append(("capabilities.drop", "capabilities.drop does not include ALL"))
    for cap in caps.get("add") or []:
        cap = str(cap).removeprefix("CAP_")
        found.append((f"capabilities.add.{cap}", f"capability {cap} is added"))
    seccomp = effective("seccompProfile") or {}
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        found.append(("seccompProfile", "seccompProfile is not RuntimeDefault or Localhost"))
    if sc.get("readOnlyRootFilesystem") is not True:
        found.append(("readOnlyRootFilesystem", "readOnlyRootFilesystem is not true"))
    return found


def problems(body: dict) -> list[str]:
    """What a workload is missing without a stated reason, and exceptions that explain nothing."""
    found = pod_template(body)
    if found is None:
        return []
    base, meta, pod = found
    at = f"{base}." if base else ""
    annotations = meta.get("annotations") or {}
    exceptions = {
        k.removeprefix(EXCEPTION_PREFIX): v for k, v in annotations.items() if k.startswith(EXCEPTION_PREFIX)
    }
    out = []
    used = set()

    def need(name: str, where: str, what: str):
        used.add(name)
        reason = exceptions.get(name)
        if reason is None:
            out.append(f"{where}: {what} without a justification (annotation {EXCEPTION_PREFIX}{name})")
        elif len(str(reason).strip()) < MIN_REASON:
            out.append(f"{where}: the reason for {name} ({reason!r}) is too short to justify anything")

    for ns in HOST_NAMESPACES:
        if pod.get(ns) is True:
            need(ns, f"{at}spec.{ns}", f"{ns} shares the node's namespace")
    for group in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(group) or []):
            name = container.get("name", "?")
            for setting, what in unmet(container, pod):
                need(f"{name}.{setting}", f"{at}spec.{group}[{i}]({name}).securityContext", what)
    for name in sorted(set(exceptions) - used):
        out.append(
            f"{at}metadata.annotations.{EXCEPTION_PREFIX}{name}: an exception for a setting that holds or a "
            "container that does not exist"
        )
    return out
