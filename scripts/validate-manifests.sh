#!/usr/bin/env bash
# Validates manifests/ and examples/brief/ offline (scripts/validate_manifests.py): YAML
# parsing, built-in kinds against the pinned Kubernetes schemas (kubernetes-validate), the
# Istio examples against our CRD schemas, and examples/brief/invalid/ being rejected.
# Needs the Python packages scripts/deps.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/validate_manifests.py "$@"
