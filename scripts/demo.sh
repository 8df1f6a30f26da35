#!/usr/bin/env bash
# The local demo: installs what it needs, builds, and runs two pods in network namespaces,
# each captured by the ambient rules and served by its own ztunnel, with curl talking to a
# real HTTP server over HBONE (mutual TLS, SPIFFE identities). Needs root for namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release -p ztunnel -p mesh-e2e
exec target/release/demo "$@"
