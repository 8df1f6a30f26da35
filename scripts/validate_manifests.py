#!/usr/bin/env python3
"""Validates the Kubernetes manifests (manifests/) and the examples (examples/brief/, and
examples/istio-real/: Istio resources as users write them, with fields we do not implement),
offline.

1. Every YAML file parses (all documents); a parse error names the file and document index.
2. Built-in kinds are validated against the Kubernetes OpenAPI schema of KUBERNETES_VERSION,
   strictly (unknown fields are errors), with the schemas bundled in the pinned PyPI package
   kubernetes-validate (scripts/deps.sh).
3. Our CRDs (manifests/crds/) are checked for what the API server demands of a structural
   schema (a type everywhere, no additionalProperties: false, preserve-unknown-fields only
   `true` on objects), one storage version (v1), the versions Istio serves (ISTIO_VERSIONS),
   all with one schema; every object under `spec` preserves unknown fields, so an Istio field
   we do not implement is kept (and reported by the controller), never pruned. Every
   Istio-kind document is validated against the openAPIV3Schema of the CRD version its
   apiVersion names (jsonschema, Draft 2020-12), and a field the API server would prune
   (not declared, not under preserve-unknown-fields) is a failure.
4. Gateway API kinds (their CRDs are upstream's, v1.2.1, not vendored) get basic field checks.
5. manifests/kustomization.yaml lists every manifest and every listed file exists.
6. Every container of every workload states the pod security of scripts/pod_security.py, or
   names the reason it cannot in a `security-exception.ambient-mesh.io/...` annotation; every
   shipped Namespace states its Pod Security `enforce` level, and every pod spec passes the
   Pod Security Standard it must meet (restricted, or with stated exceptions its namespace's).
7. Every CEL expression of a ValidatingAdmissionPolicy compiles, every binding names a shipped
   policy, and the node agent's policy decides the table of scripts/admission_policy.py
   (its own node's pods, the redirection annotation only) as it must.
8. The objects the controller generates for a waypoint (controller/tests/golden/
   waypoint-objects/, kept equal to the generator by a golden test) validate as in 2 and 6.
9. Each file in examples/brief/invalid/ and scripts/testdata/invalid/ MUST be rejected, for the
   reason its `# expect:` comment names; one that is accepted (or rejected for another reason)
   fails the run.

Exit status 0 when everything holds, 1 otherwise; every problem is printed as
`file#document (Kind/name): field.path: message`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

try:
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource
except ImportError as e:  # pragma: no cover - a setup problem, reported plainly
    sys.exit(f"validate-manifests: missing Python package ({e}); run scripts/deps.sh")

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
import admission_policy  # noqa: E402
import pod_security  # noqa: E402

KUBERNETES_VERSION = "1.31.0"
KUBERNETES_VALIDATE_VERSION = "1.37.0"
GATEWAY_API_VERSION = "v1.2.1"

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
EXAMPLES = ROOT / "examples" / "brief"
INVALID = EXAMPLES / "invalid"
# Real-world Istio resources using fields the mesh does not implement: they must validate and
# keep every field (controller/tests/istio_real.rs checks each is reported).
ISTIO_REAL = ROOT / "examples" / "istio-real"
# Manifests the checks of this script must reject (pod security, admission policies).
TESTDATA_INVALID = ROOT / "scripts" / "testdata" / "invalid"
# What the controller generates for a waypoint (Deployment, Service, HPA, PDB, ...), written by
# the golden test controller/src/k8s/manifests.rs::generated_objects_are_the_validated_file.
GENERATED = ROOT / "controller" / "tests" / "golden" / "waypoint-objects"

BUILTIN = {
    ("v1", "Namespace"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "DaemonSet"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"),
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"),
}
# The versions Istio serves per group (v1 is the storage version; all share one schema).
ISTIO_VERSIONS = {
    "security.istio.io": {"v1", "v1beta1"},
    "networking.istio.io": {"v1", "v1beta1", "v1alpha3"},
    "telemetry.istio.io": {"v1", "v1alpha1"},
}
ISTIO_GROUPS = set(ISTIO_VERSIONS)
GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_KINDS = {"GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "GatewayClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


class Doc:
    def __init__(self, path: Path, index: int, body: dict):
        self.path = path
        self.index = index
        self.body = body

    @property
    def where(self) -> str:
        kind = self.body.get("kind", "?")
        name = (self.body.get("metadata") or {}).get("name", "?")
        return f"{self.path.relative_to(ROOT)}#{self.index} ({kind}/{name})"


def field_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(root)"


def short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + "..."


def schema_errors(validator: jsonschema.protocols.Validator, body: dict) -> list[str]:
    """Every violation (not just the first), deepest-first within each, as `path: message`."""
    found = []
    for err in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
        # For anyOf/oneOf the useful message is in the best matching sub-error.
        best = jsonschema.exceptions.best_match([err]) if err.context else err
        found.append(f"{field_path(best.absolute_path)}: {short(best.message)}")
    return found


# ---------------------------------------------------------------- built-in kinds


class KubeSchemas:
    """The bundled (strict) schemas of kubernetes-validate, loaded once."""

    def __init__(self, version: str):
        self.version = version
        self.dir = f"kubernetes-json-schema/v{version}-local-strict"
        defs = kubernetes_validate.utils.schema_contents(f"{self.dir}/_definitions.json", version)
        self.registry = Resource.from_contents(defs) @ Registry()
        self.validators: dict[tuple[str, str], Any] = {}

    def validator(self, api_version: str, kind: str):
        key = (api_version, kind)
        if key not in self.validators:
            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            schema = kubernetes_validate.utils.schema_contents(
                f"{self.dir}/{kind.lower()}-{group_version}.json", self.version
            )
            registry = Resource.from_contents(schema) @ self.registry
            self.validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self.validators[key]


# ---------------------------------------------------------------- CRDs


def structural_problems(schema: Any, path: str = "openAPIV3Schema") -> list[str]:
    """What makes the API server refuse a schema as non-structural, or what we rule out."""
    problems = []
    if not isinstance(schema, dict):
        return [f"{path}: not a schema object"]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if preserve is not None and (preserve is not True or schema.get("type") != "object"):
        problems.append(f"{path}: x-kubernetes-preserve-unknown-fields is only used as `true` on an object")
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type (structural schemas need one at every level)")
    if schema.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false is not allowed (rely on pruning)")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    for name in schema.get("required", []):
        if name not in schema.get("properties", {}):
            problems.append(f"{path}: required {name!r} is not a listed property")
    if schema.get("type") == "object" and path != "openAPIV3Schema" and not (
        "properties" in schema or "additionalProperties" in schema or preserve
    ):
        problems.append(f"{path}: an object without properties (its content would be pruned)")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except re.error as e:
            problems.append(f"{path}: pattern does not compile: {e}")
    for name, sub in schema.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.properties.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}.additionalProperties")
    if "items" in schema:
        problems += structural_problems(schema["items"], f"{path}.items")
    return problems


def unpreserved_objects(schema: dict, path: str) -> list[str]:
    """Objects with declared properties under `spec` that would prune the fields they do not
    declare (Istio has more fields than we implement: each must be kept and reported)."""
    problems = []
    if schema.get("type") == "object" and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: does not preserve unknown fields (Istio fields we do not implement would be pruned)")
    for name, sub in (schema.get("properties") or {}).items():
        problems += unpreserved_objects(sub, f"{path}.properties.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += unpreserved_objects(schema[key], f"{path}.{key}")
    return problems


def pruned_fields(schema: dict, value: Any, path: list) -> list[str]:
    """Fields of `value` the API server would prune (or refuse under strict field validation):
    keys an object schema neither declares nor preserves."""
    problems = []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                problems += pruned_fields(props[key], sub, path + [key])
            elif isinstance(extra, dict):
                problems += pruned_fields(extra, sub, path + [key])
            elif not schema.get("x-kubernetes-preserve-unknown-fields") and not (path == [] and key in ("apiVersion", "kind", "metadata")):
                problems.append(f"{field_path(path + [key])}: not in the CRD schema, the API server would prune it")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += pruned_fields(schema["items"], item, path + [i])
    return problems


class Crds:
    def __init__(self):
        # (group, kind) -> {version: schema}
        self.schemas: dict[tuple[str, str], dict[str, dict]] = {}
        self.validators: dict[tuple[str, str, str], Any] = {}

    def add(self, doc: Doc) -> list[str]:
        spec = doc.body.get("spec") or {}
        group, kind = spec.get("group"), (spec.get("names") or {}).get("kind")
        problems = []
        versions = spec.get("versions") or []
        storage = [v.get("name") for v in versions if v.get("storage")]
        if len(storage) != 1:
            problems.append(f"exactly one version must be the storage version, found {storage}")
        schemas = {}
        for v in versions:
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            if schema is None:
                problems.append(f"version {v.get('name')}: no openAPIV3Schema")
                continue
            problems += [f"version {v.get('name')}: {p}" for p in structural_problems(schema)]
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as e:
                problems.append(f"version {v.get('name')}: not a valid JSON schema: {e.message}")
            if v.get("served"):
                schemas[v["name"]] = schema
        if group in ISTIO_GROUPS:
            if storage != ["v1"]:
                problems.append(f"v1 must be the storage version, found {storage}")
            if set(schemas) != ISTIO_VERSIONS[group]:
                problems.append(f"must serve {sorted(ISTIO_VERSIONS[group])}, serves {sorted(schemas)}")
            elif any(schemas[v] != schemas["v1"] for v in schemas):
                problems.append("the served versions' schemas differ")
            spec_schema = ((schemas.get("v1") or {}).get("properties") or {}).get("spec")
            if not isinstance(spec_schema, dict):
                problems.append("version v1: openAPIV3Schema.properties.spec: missing")
            else:
                problems += [f"version v1: {p}" for p in unpreserved_objects(spec_schema, "openAPIV3Schema.properties.spec")]
        self.schemas[(group, kind)] = schemas
        return problems

    def validate(self, doc: Doc) -> list[str]:
        api_version, kind = doc.body.get("apiVersion", ""), doc.body.get("kind", "")
        group, _, version = api_version.partition("/")
        served = self.schemas.get((group, kind))
        if served is None:
            return [f"no CRD in manifests/crds for {kind}.{group}"]
        if version not in served:
            return [f"apiVersion: {api_version} is not served (served: {', '.join(sorted(served))})"]
        key = (group, kind, version)
        if key not in self.validators:
            self.validators[key] = jsonschema.Draft202012Validator(served[version])
        problems = schema_errors(self.validators[key], doc.body)
        problems += pruned_fields(served[version], doc.body, [])
        return problems + metadata_problems(doc, namespaced=True)


def metadata_problems(doc: Doc, namespaced: bool) -> list[str]:
    meta = doc.body.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: required"]
    problems = []
    name = meta.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name or ""):
        problems.append(f"metadata.name: {name!r} is not a DNS subdomain name")
    if namespaced and "namespace" in meta and not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(meta["namespace"])):
        problems.append(f"metadata.namespace: {meta['namespace']!r} is not a DNS label")
    return problems


# ---------------------------------------------------------------- Gateway API (basic checks)


def port_problem(value: Any, path: str) -> list[str]:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        return [f"{path}: {value!r} is not a port number (1-65535)"]
    return []


def gateway_api_problems(doc: Doc) -> list[str]:
    body, kind = doc.body, doc.body.get("kind")
    group, _, version = str(body.get("apiVersion", "")).partition("/")
    problems = metadata_problems(doc, namespaced=kind != "GatewayClass")
    if version not in ("v1", "v1beta1"):
        problems.append(f"apiVersion: {body.get('apiVersion')} is not a served Gateway API {GATEWAY_API_VERSION} version")
    spec = body.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec: required (an object)"]
    if kind == "GatewayClass":
        if not spec.get("controllerName"):
            problems.append("spec.controllerName: required")
    elif kind == "Gateway":
        if not spec.get("gatewayClassName"):
            problems.append("spec.gatewayClassName: required")
        listeners = spec.get("listeners")
        if not isinstance(listeners, list) or not listeners:
            problems.append("spec.listeners: at least one listener is required")
        for i, listener in enumerate(listeners or []):
            path = f"spec.listeners[{i}]"
            if not isinstance(listener, dict):
                problems.append(f"{path}: not an object")
                continue
            for field in ("name", "protocol"):
                if not isinstance(listener.get(field), str) or not listener.get(field):
                    problems.append(f"{path}.{field}: required (a string)")
            problems += port_problem(listener.get("port"), f"{path}.port")
    elif kind in ("HTTPRoute", "GRPCRoute"):
        parents = spec.get("parentRefs")
        if not isinstance(parents, list) or not parents:
            problems.append("spec.parentRefs: at least one parent is required")
        for i, ref in enumerate(parents or []):
            if not isinstance(ref, dict) or not ref.get("name"):
                problems.append(f"spec.parentRefs[{i}].name: required")
            elif "port" in ref:
                problems += port_problem(ref["port"], f"spec.parentRefs[{i}].port")
        for i, rule in enumerate(spec.get("rules") or []):
            for j, backend in enumerate((rule or {}).get("backendRefs") or []):
                path = f"spec.rules[{i}].backendRefs[{j}]"
                if not backend.get("name"):
                    problems.append(f"{path}.name: required")
                if "port" in backend:
                    problems += port_problem(backend["port"], f"{path}.port")
                weight = backend.get("weight", 1)
                if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1_000_000:
                    problems.append(f"{path}.weight: {weight!r} is not an integer in 0-1000000")
    return problems


# ---------------------------------------------------------------- files


def load(path: Path) -> tuple[list[Doc], list[str]]:
    docs, index = [], 0
    try:
        with path.open() as f:
            for index, body in enumerate(yaml.safe_load_all(f)):
                if body is None:
                    continue
                if not isinstance(body, dict):
                    return docs, [f"{path.relative_to(ROOT)}#{index}: a document must be a mapping, got {type(body).__name__}"]
                docs.append(Doc(path, index, body))
    except yaml.YAMLError as e:
        # The failing document is the one after the last one that parsed.
        return docs, [f"{path.relative_to(ROOT)}#{index + 1 if docs else 0}: YAML parse error: {e}"]
    return docs, []


def yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


class Run:
    def __init__(self):
        self.kube = KubeSchemas(KUBERNETES_VERSION)
        self.crds = Crds()
        self.failures: list[str] = []
        self.checked = 0
        self.checked_cases = 0
        # Pod Security enforce level of each namespace the manifests ship.
        self.enforced: dict[str, str] = {}

    def problems(self, doc: Doc) -> list[str]:
        body = doc.body
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if not api_version or not kind:
            return ["apiVersion and kind: required"]
        group = api_version.partition("/")[0] if "/" in api_version else ""
        if (api_version, kind) in BUILTIN:
            found = schema_errors(self.kube.validator(api_version, kind), body)
            found += metadata_problems(doc, namespaced=kind not in CLUSTER_SCOPED)
            found += pod_security.problems(body)
            level = pod_security.required_level(body, self.enforced)
            found += [f"Pod Security {level!r} refuses it: {v}" for v in pod_security.standard_violations(body, level)]
            if kind == "ValidatingAdmissionPolicy":
                found += admission_policy.compile_problems(body)
            if kind not in CLUSTER_SCOPED and not (body.get("metadata") or {}).get("namespace") and doc.path.is_relative_to(MANIFESTS):
                found.append("metadata.namespace: the mesh's manifests name their namespace explicitly")
            return found
        if group in ISTIO_GROUPS:
            return self.crds.validate(doc)
        if group == GATEWAY_GROUP and kind in GATEWAY_KINDS:
            return gateway_api_problems(doc)
        return [f"kind {kind} ({api_version}) is not one this check knows; add it to validate_manifests.py"]

    def fail(self, where: str, problems: list[str]):
        for p in problems:
            self.failures.append(f"{where}: {p}")

    def kustomization(self, path: Path, docs: list[Doc]):
        body = docs[0].body if docs else {}
        listed = set()
        for entry in body.get("resources", []):
            target = (path.parent / entry).resolve()
            if not target.exists():
                self.failures.append(f"{path.relative_to(ROOT)}: resource {entry} does not exist")
            listed.add(target)
        for entry in body.get("configurations", []):
            if not (path.parent / entry).exists():
                self.failures.append(f"{path.relative_to(ROOT)}: configuration {entry} does not exist")
        return listed

    def admission(self, docs: list[Doc]):
        """Bindings name shipped policies; the node agent's policy decides its table as it must,
        for the service account the cni-agent DaemonSet runs as."""
        policies = {d.body["metadata"]["name"]: d for d in docs if d.body.get("kind") == "ValidatingAdmissionPolicy"}
        for d in docs:
            if d.body.get("kind") == "ValidatingAdmissionPolicyBinding":
                name = (d.body.get("spec") or {}).get("policyName")
                if name not in policies:
                    self.fail(d.where, [f"spec.policyName: {name!r} is not a ValidatingAdmissionPolicy of the manifests"])
        agents = [d for d in docs if d.body.get("kind") == "DaemonSet" and d.body["metadata"].get("name") == "cni-agent"]
        policy = policies.get(admission_policy.AGENT_POLICY)
        if policy is None or len(agents) != 1:
            self.failures.append(
                f"manifests/: the node agent's DaemonSet and its ValidatingAdmissionPolicy "
                f"{admission_policy.AGENT_POLICY} must both be shipped (the agent's pod patches are limited by it)"
            )
            return
        agent = agents[0].body
        account = ((agent["spec"].get("template") or {}).get("spec") or {}).get("serviceAccountName", "default")
        user = f"system:serviceaccount:{agent['metadata'].get('namespace')}:{account}"
        self.fail(policy.where, [f"table: {p}" for p in admission_policy.agent_table_problems(policy.body, user)])
        self.checked_cases = len(admission_policy.agent_cases(user))

    def rendered(self):
        """`kubectl kustomize manifests/` (offline) when kubectl is installed: the build must
        succeed and what it renders (aliases expanded, labels and images applied) must validate."""
        kubectl = shutil.which("kubectl")
        if not kubectl:
            print("validate-manifests: kubectl not installed, the kustomize build is not checked")
            return
        out = subprocess.run([kubectl, "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            self.failures.append(f"kubectl kustomize manifests/: {out.stderr.strip()}")
            return
        for index, body in enumerate(yaml.safe_load_all(out.stdout)):
            doc = Doc(MANIFESTS / "kustomization.yaml", index, body)
            self.checked += 1
            self.fail(f"(kustomize build) {doc.where}", self.problems(doc))

    def main(self) -> int:
        started = time.monotonic()
        installed = importlib.metadata.version("kubernetes-validate")
        if installed != KUBERNETES_VALIDATE_VERSION:
            print(
                f"validate-manifests: kubernetes-validate {installed} is installed, {KUBERNETES_VALIDATE_VERSION} is "
                "pinned (scripts/deps.sh installs it)",
                file=sys.stderr,
            )
            return 1
        manifest_files = yaml_files(MANIFESTS)
        example_files = yaml_files(EXAMPLES) + yaml_files(ISTIO_REAL) + yaml_files(GENERATED)
        invalid_files = [p for p in example_files if p.is_relative_to(INVALID)]
        valid_example_files = [p for p in example_files if not p.is_relative_to(INVALID)]
        testdata_invalid = yaml_files(TESTDATA_INVALID)
        loaded: dict[Path, list[Doc]] = {}
        for path in manifest_files + example_files + testdata_invalid:
            docs, errors = load(path)
            self.failures += errors
            loaded[path] = docs

        # Namespaces first: workloads are checked against the Pod Security level they enforce.
        self.enforced, problems = pod_security.namespace_levels(
            [doc.body for path in manifest_files for doc in loaded[path]]
        )
        self.failures += [f"manifests/: {p}" for p in problems]

        # The CRDs first: examples are validated against them.
        for path in manifest_files:
            for doc in loaded[path]:
                if doc.body.get("kind") == "CustomResourceDefinition":
                    self.fail(doc.where, self.crds.add(doc))

        listed: set[Path] = set()
        kustomization = MANIFESTS / "kustomization.yaml"
        if not kustomization.exists():
            self.failures.append("manifests/kustomization.yaml: missing")
        for path in manifest_files:
            if path == kustomization:
                listed = self.kustomization(path, loaded[path])
                continue
            if path.is_relative_to(MANIFESTS / "kustomizeconfig"):
                continue  # kustomize transformer configuration, not resources
            for doc in loaded[path]:
                self.checked += 1
                self.fail(doc.where, self.problems(doc))
        for path in manifest_files:
            if path == kustomization or path.is_relative_to(MANIFESTS / "kustomizeconfig"):
                continue
            if path.resolve() not in listed:
                self.failures.append(f"{path.relative_to(ROOT)}: not listed in manifests/kustomization.yaml")

        self.admission([doc for path in manifest_files for doc in loaded[path]])
        self.rendered()

        for path in valid_example_files:
            for doc in loaded[path]:
                self.checked += 1
                self.fail(doc.where, self.problems(doc))

        if not yaml_files(GENERATED):
            self.failures.append("controller/tests/golden/waypoint-objects/: no generated waypoint objects to check")
        if not yaml_files(ISTIO_REAL):
            self.failures.append("examples/istio-real/: no real-world Istio resources to check")
        if not invalid_files:
            self.failures.append("examples/brief/invalid/: no invalid examples to check")
        if not testdata_invalid:
            self.failures.append("scripts/testdata/invalid/: no invalid manifests to check")
        invalid_files += testdata_invalid
        for path in invalid_files:
            expect = re.search(r"^# expect: (.+)$", path.read_text(), re.MULTILINE)
            problems = [f"{d.where}: {p}" for d in loaded[path] for p in self.problems(d)]
            rel = path.relative_to(ROOT)
            if not problems:
                self.failures.append(f"{rel}: an invalid example was ACCEPTED (it must be rejected)")
            elif expect and not any(expect.group(1).strip() in p for p in problems):
                self.failures.append(
                    f"{rel}: rejected, but not for the expected reason {expect.group(1).strip()!r}: {problems}"
                )
            else:
                for p in problems:
                    print(f"rejected as expected: {p}")

        elapsed = time.monotonic() - started
        for f in self.failures:
            print(f"FAIL {f}", file=sys.stderr)
        print(
            f"validate-manifests: {len(manifest_files)} manifest files, {len(valid_example_files)} example files, "
            f"{self.checked} documents, {len(invalid_files)} invalid examples, {self.checked_cases} admission "
            f"cases; Kubernetes {KUBERNETES_VERSION} "
            f"schemas (kubernetes-validate {KUBERNETES_VALIDATE_VERSION}), Gateway API {GATEWAY_API_VERSION} "
            f"kinds basic-checked only; {len(self.failures)} failures in {elapsed:.1f}s"
        )
        return 1 if self.failures else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(Run().main())
