# syntax=docker/dockerfile:1
# The controller (xDS, CA, waypoint deployment). Build from the repository root:
#   docker build -f docker/controller.Dockerfile -t ghcr.io/ambient-mesh/controller:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p controller --bin controller \
    && install -D -m 0755 target/release/controller /out/controller

FROM debian:bookworm-slim
# No packages: the Kubernetes client uses the service account's CA bundle; the init container
# of manifests/controller/deployment.yaml uses coreutils' install(1) from the base image.
COPY --from=build /out/controller /usr/local/bin/controller
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/controller"]
