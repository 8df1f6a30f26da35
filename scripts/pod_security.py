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


# Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
# the checks Pod Security Admission makes at `enforce: baseline` and `enforce: restricted`.
PSS_LEVELS = ("privileged", "baseline", "restricted")
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def _baseline(pod: dict, containers: list[dict]) -> list[str]:
    out = [f"spec.{ns} is true" for ns in HOST_NAMESPACES if pod.get(ns) is True]
    out += [f"volume {v.get('name')} is a hostPath" for v in pod.get("volumes") or [] if "hostPath" in v]
    pod_sc = pod.get("securityContext") or {}
    out += [f"sysctl {s.get('name')} is not a safe sysctl" for s in pod_sc.get("sysctls") or []
            if s.get("name") not in SAFE_SYSCTLS]
    for c in containers:
        name, sc = c.get("name", "?"), c.get("securityContext") or {}
        if sc.get("privileged") is True:
            out.append(f"container {name} is privileged")
        for cap in (sc.get("capabilities") or {}).get("add") or []:
            if str(cap).removeprefix("CAP_") not in BASELINE_CAPS:
                out.append(f"container {name} adds capability {cap}")
        out += [f"container {name} uses hostPort {p['hostPort']}" for p in c.get("ports") or [] if p.get("hostPort")]
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"container {name} has procMount {sc['procMount']}")
        for ctx in (sc, pod_sc):
            if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
                out.append(f"container {name}: seccompProfile Unconfined")
            if (ctx.get("appArmorProfile") or {}).get("type") == "Unconfined":
                out.append(f"container {name}: appArmorProfile Unconfined")
    return out


def _restricted(pod: dict, containers: list[dict]) -> list[str]:
    out = []
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v.get('name')} is of type {sorted(kinds - RESTRICTED_VOLUMES)}")
    pod_sc = pod.get("securityContext") or {}
    for c in containers:
        name, sc = c.get("name", "?"), c.get("securityContext") or {}

        def effective(key: str, sc=sc):
            return sc[key] if key in sc else pod_sc.get(key)

        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"container {name}: allowPrivilegeEscalation is not false")
        if effective("runAsNonRoot") is not True:
            out.append(f"container {name}: runAsNonRoot is not true")
        if effective("runAsUser") == 0:
            out.append(f"container {name}: runAsUser is 0")
        if (effective("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"container {name}: seccompProfile is not RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"container {name}: capabilities.drop does not include ALL")
        for cap in caps.get("add") or []:
            if str(cap).removeprefix("CAP_") != "NET_BIND_SERVICE":
                out.append(f"container {name}: adds capability {cap}")
    return out


def standard_violations(body: dict, level: str) -> list[str]:
    """What Pod Security Admission at `enforce: <level>` refuses in this workload's pods."""
    found = pod_template(body)
    if found is None or level == "privileged":
        return []
    _, _, pod = found
    containers = (pod.get("initContainers") or []) + (pod.get("containers") or [])
    out = _baseline(pod, containers)
    if level == "restricted":
        out += _restricted(pod, containers)
    return out


def required_level(body: dict, enforced: dict[str, str]) -> str:
    """The Pod Security Standard a workload must satisfy: its namespace's enforce label when
    it states privileges it needs (security-exception annotations), else `restricted` — a pod
    that needs nothing must be admissible anywhere, also in the mesh's privileged namespace.
    A namespace the manifests do not ship is someone else's: assume `restricted`."""
    found = pod_template(body)
    if found is None:
        return "privileged"
    annotations = found[1].get("annotations") or {}
    if not any(k.startswith(EXCEPTION_PREFIX) for k in annotations):
        return "restricted"
    namespace = (body.get("metadata") or {}).get("namespace", "default")
    return enforced.get(namespace, "restricted")


def namespace_levels(bodies: list[dict]) -> tuple[dict[str, str], list[str]]:
    """The enforce level of each Namespace document, and the namespaces that state none (the
    cluster's default would decide, which differs between clusters)."""
    levels, problems = {}, []
    for body in bodies:
        if body.get("kind") != "Namespace":
            continue
        meta = body.get("metadata") or {}
        level = (meta.get("labels") or {}).get(ENFORCE_LABEL)
        if level not in PSS_LEVELS:
            problems.append(f"Namespace {meta.get('name')}: label {ENFORCE_LABEL} is {level!r}, not one of {PSS_LEVELS}")
            continue
        levels[meta.get("name")] = level
    return levels, problems
