# syntax=docker/dockerfile:1
# ztunnel, the per-node proxy. Build from the repository root:
#   docker build -f docker/ztunnel.Dockerfile -t ghcr.io/ambient-mesh/ztunnel:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ztunnel --bin ztunnel \
    && install -D -m 0755 target/release/ztunnel /out/ztunnel

FROM debian:bookworm-slim
# No packages: ztunnel makes its sockets itself (setns, SO_MARK, IP_TRANSPARENT) and needs no
# tools. Runs as root with NET_ADMIN and SYS_ADMIN only (manifests/ztunnel/).
COPY --from=build /out/ztunnel /usr/local/bin/ztunnel
ENTRYPOINT ["/usr/local/bin/ztunnel"]
