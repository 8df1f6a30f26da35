#!/usr/bin/env bash
# The local demo: installs what it needs, builds, and runs a two-node mesh made of network
# namespaces: the controller in local mode, a node agent and an in-pod ztunnel per node, pods
# created through the real CNI chain, curl talking to HTTP servers on the other node over
# HBONE (mutual TLS, SPIFFE identities), DNS through ztunnel, and a policy taking effect.
# Needs root for namespaces. `--hold` keeps the cluster up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release -p ztunnel -p controller -p cni-plugin -p mesh-e2e
exec target/release/demo "$@"
