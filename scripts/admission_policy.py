"""ValidatingAdmissionPolicies checked offline: every CEL expression compiles, and the node
agent's policy (manifests/cni/cni-agent-admission.yaml) decides a table of requests the way the
API server would, with cel-python standing in for the API server's CEL.

The evaluation follows the API server's order: matchConstraints (resource and operation),
matchConditions (all true, or the policy does not apply), variables (in order, each seeing the
earlier ones), then every validation; a validation that is false denies with its message, one
that fails to evaluate denies too (failurePolicy Fail, the only policy we ship). Objects are
plain JSON here, not the API server's typed objects, so type errors the API server's checker
would catch at admission of the policy are not caught; the table catches wrong field names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

try:
    import celpy
except ImportError as e:  # pragma: no cover - a setup problem, reported plainly
    raise SystemExit(f"validate-manifests: missing Python package ({e}); run scripts/deps.sh") from e

ENV = celpy.Environment()
AGENT_POLICY = "cni-agent-own-node-pods"
NODE_CLAIM = "authentication.kubernetes.io/node-name"
ANNOTATION = "ambient.istio.io/redirection"


def expressions(body: dict) -> list[tuple[str, str]]:
    """(field path, CEL source) of every expression of a ValidatingAdmissionPolicy."""
    spec = body.get("spec") or {}
    out = []
    for i, c in enumerate(spec.get("matchConditions") or []):
        out.append((f"spec.matchConditions[{i}].expression", c.get("expression", "")))
    for i, v in enumerate(spec.get("variables") or []):
        out.append((f"spec.variables[{i}].expression", v.get("expression", "")))
    for i, v in enumerate(spec.get("validations") or []):
        out.append((f"spec.validations[{i}].expression", v.get("expression", "")))
        if "messageExpression" in v:
            out.append((f"spec.validations[{i}].messageExpression", v["messageExpression"]))
    for i, a in enumerate(spec.get("auditAnnotations") or []):
        out.append((f"spec.auditAnnotations[{i}].valueExpression", a.get("valueExpression", "")))
    return out


def compile_problems(body: dict) -> list[str]:
    """Every expression that does not parse, as `path: error`."""
    found = []
    for path, source in expressions(body):
        try:
            ENV.compile(source)
        except celpy.CELParseError as e:
            where = f"line {getattr(e, 'line', '?')} column {getattr(e, 'column', '?')}"
            found.append(f"{path}: CEL does not compile ({where}): {str(e).splitlines()[0] if str(e) else ''}")
    return found


@dataclass
class Decision:
    applies: bool
    denied: list[str]

    @property
    def allowed(self) -> bool:
        return not self.denied


def _true(value: Any) -> bool:
    return isinstance(value, celpy.celtypes.BoolType) and bool(value)


def _run(source: str, activation: dict) -> Any:
    program = ENV.program(ENV.compile(source))
    return program.evaluate(activation)


def _rule_matches(rule: dict, group: str, resource: str, operation: str) -> bool:
    return (
        (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", []))
        and (resource in rule.get("resources", []) or "*" in rule.get("resources", []))
        and (operation in rule.get("operations", []) or "*" in rule.get("operations", []))
    )


def evaluate(policy: dict, request: dict, obj: dict | None, old: dict | None) -> Decision:
    """What the API server decides for `request` (its operation, userInfo, resource)."""
    spec = policy.get("spec") or {}
    group, resource = request["resource"]["group"], request["resource"]["resource"]
    rules = (spec.get("matchConstraints") or {}).get("resourceRules") or []
    if not any(_rule_matches(r, group, resource, request["operation"]) for r in rules):
        return Decision(False, [])
    activation: dict[str, Any] = {
        "request": celpy.json_to_cel(request),
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old),
        "params": celpy.json_to_cel(None),
    }
    for c in spec.get("matchConditions") or []:
        matched = _run(c["expression"], activation)
        if isinstance(matched, celpy.CELEvalError):
            return Decision(True, [f"matchCondition {c['name']}: {matched}"])
        if not _true(matched):
            return Decision(False, [])
    variables = celpy.celtypes.MapType()
    for v in spec.get("variables") or []:
        # Each variable sees the ones before it, as `variables.<name>`.
        activation["variables"] = variables
        variables = celpy.celtypes.MapType({**variables, celpy.celtypes.StringType(v["name"]): _run(v["expression"], activation)})
    activation["variables"] = variables
    denied = []
    for v in spec.get("validations") or []:
        ok = _run(v["expression"], activation)
        if isinstance(ok, celpy.CELEvalError):
            denied.append(f"evaluation error: {ok}")
        elif not _true(ok):
            message = v.get("message", "")
            if "messageExpression" in v:
                message = str(_run(v["messageExpression"], activation))
            denied.append(message or v["expression"])
    return Decision(True, denied)


# ---------------------------------------------------------------- the node agent's table


def _pod(node: str | None = "node-a", **changes: Any) -> dict:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "orders-0",
            "namespace": "shop",
            "labels": {"app": "orders"},
            "annotations": {"kubectl.kubernetes.io/default-container": "orders"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-5d9", "uid": "u1"}],
        },
        "spec": {"containers": [{"name": "orders", "image": "shop/orders:1"}]},
        "status": {"phase": "Running"},
    }
    if node is not None:
        pod["spec"]["nodeName"] = node
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = pod
        for p in parents:
            target = target.setdefault(p, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return pod


def _annotated(pod: dict, value: str | None, **extra: str) -> dict:
    pod = copy.deepcopy(pod)
    annotations = pod["metadata"].setdefault("annotations", {})
    if value is None:
        annotations.pop(ANNOTATION, None)
    else:
        annotations[ANNOTATION] = value
    annotations.update(extra)
    return pod


def _request(username: str, nodes: list[str] | None, operation: str = "UPDATE") -> dict:
    user: dict[str, Any] = {"username": username, "groups": ["system:serviceaccounts", "system:authenticated"]}
    if nodes is not None:
        user["extra"] = {NODE_CLAIM: nodes, "authentication.kubernetes.io/pod-name": ["cni-agent-x1"]}
    return {
        "operation": operation,
        "userInfo": user,
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop",
        "name": "orders-0",
    }


@dataclass
class Case:
    what: str
    request: dict
    old: dict | None
    new: dict | None
    # None: allowed; otherwise a piece of the denial message.
    denied: str | None


def agent_cases(agent_user: str) -> list[Case]:
    """Requests and what must happen to them; `agent_user` is the agent's service-account
    user name as the DaemonSet in the manifests runs it."""
    mine = _request(agent_user, ["node-a"])
    here, there, pending = _pod(), _pod(node="node-b"), _pod(node=None)
    enabled = _annotated(here, "enabled")
    own_node = "only the pods of its own node"
    only_annotation = "only the ambient.istio.io/redirection annotation"
    rest = "may not change a pod's spec"
    image = copy.deepcopy(enabled)
    image["spec"]["containers"][0]["image"] = "evil/orders:1"
    return [
        Case("captures a pod of its node", mine, here, enabled, None),
        Case("releases a pod of its node", mine, enabled, here, None),
        Case("patches with nothing to change", mine, enabled, enabled, None),
        Case("a pod of another node", mine, there, _annotated(there, "enabled"), own_node),
        Case("a pod not yet scheduled", mine, pending, _annotated(pending, "enabled"), own_node),
        Case("a token naming no node", _request(agent_user, None), here, enabled, "its token names no single node"),
        Case("a token naming two nodes", _request(agent_user, ["node-a", "node-b"]), here, enabled, own_node),
        Case("another annotation added", mine, here, _annotated(here, "enabled", extra="x"), only_annotation),
        Case(
            "another annotation rewritten",
            mine,
            here,
            _annotated(here, "enabled", **{"kubectl.kubernetes.io/default-container": "x"}),
            only_annotation,
        ),
        Case("every annotation removed", mine, here, _pod(metadata__annotations=None), only_annotation),
        Case("the annotation set to another value", mine, here, _annotated(here, "disabled"), 'only be set to "enabled"'),
        Case("a label changed", mine, here, _pod(metadata__labels={"app": "payments"}), rest),
        Case("the image changed", mine, enabled, image, rest),
        Case("a finalizer added", mine, here, _pod(metadata__finalizers=["x/keep"]), rest),
        Case("owner references removed", mine, here, _pod(metadata__ownerReferences=None), rest),
        Case("moved to its node", mine, there, _pod(), own_node),
        # Not the agent, or not an update: the policy does not apply.
        Case("another user changes the image", _request("system:serviceaccount:shop:deployer", None), here, image, None),
        Case(
            "the agent's name in another namespace",
            _request(agent_user.replace(":istio-system:", ":shop:"), ["node-b"]),
            there,
            _pod(node="node-b", metadata__labels={"app": "x"}),
            None,
        ),
    ]


def agent_table_problems(policy: dict, agent_user: str) -> list[str]:
    """Each case the policy decides otherwise than the table says."""
    found = []
    for case in agent_cases(agent_user):
        decision = evaluate(policy, case.request, case.new, case.old)
        if case.denied is None and not decision.allowed:
            found.append(f"{case.what}: must be allowed, denied: {decision.denied}")
        elif case.denied is not None and not decision.applies:
            found.append(f"{case.what}: must be denied, but the policy does not apply to it")
        elif case.denied is not None and not any(case.denied in d for d in decision.denied):
            found.append(f"{case.what}: must be denied ({case.denied!r}), got {decision.denied or 'allowed'}")
    return found

