#!/usr/bin/env bash
# The local demo: installs what it needs, builds, and runs the brief's shop (examples/demo/)
# on a two-node mesh made of network namespaces: the controller in local mode, a node agent
# and an in-pod ztunnel per node, pods created through the real CNI chain, a waypoint with the
# 90/10 canary and the payment policy, STRICT mTLS, and Prometheus scraping everything. Prints
# identities, the split, allowed/denied calls and latency. Needs root for namespaces.
# `--hold` keeps the cluster up until Ctrl-C (or `meshctl demo down`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release -p ztunnel -p controller -p cni-plugin -p waypoint -p mesh-e2e
exec target/release/demo "$@"
