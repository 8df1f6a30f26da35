# syntax=docker/dockerfile:1
# The CNI node agent (cni-agent), the plugin it installs (ambient-cni) and the installer
# script (install-cni.sh). Build from the repository root:
#   docker build -f docker/cni.Dockerfile -t ghcr.io/ambient-mesh/cni:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cni-plugin --bin cni-agent --bin ambient-cni \
    && install -D -m 0755 target/release/cni-agent /out/cni-agent \
    && install -D -m 0755 target/release/ambient-cni /out/ambient-cni

FROM debian:bookworm-slim
# nftables (nft) and iproute2 (ip): the capture rules inside pod namespaces and the probe SNAT
# on the node; nsenter comes with util-linux in the base image; jq edits the node's conflist,
# inotifywait (inotify-tools) lets install-cni.sh react to a rewrite at once and curl asks the
# API server whether the DaemonSet is being deleted.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables iproute2 jq \
       inotify-tools curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/cni-agent /out/ambient-cni /usr/local/bin/
COPY docker/cni/install-cni.sh /usr/local/bin/install-cni.sh
ENTRYPOINT ["/usr/local/bin/cni-agent"]
