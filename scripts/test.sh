#!/usr/bin/env bash
# The test command: formatting, lints, then every test (unit, loopback HBONE, and the
# network-namespace end-to-end suite, which needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The e2e tests run the ztunnel binary: build it first.
cargo build --workspace --locked
cargo test --workspace --locked
