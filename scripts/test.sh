#!/usr/bin/env bash
# The test command: system packages, formatting, lints, then every test (unit, loopback HBONE, and the
# network-namespace end-to-end suites, which need root), ending with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/validate-manifests.sh
# The end-to-end tests run the ztunnel binary: build it first.
cargo build --workspace --locked

# Tests that need root and namespaces fail here instead of skipping (tests/src/lib.rs).
export MESH_E2E_REQUIRED=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --locked 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
