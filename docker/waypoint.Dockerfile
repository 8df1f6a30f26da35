# syntax=docker/dockerfile:1
# The waypoint (L7 proxy), deployed by the controller per Gateway of class istio-waypoint.
# Build from the repository root:
#   docker build -f docker/waypoint.Dockerfile -t ghcr.io/ambient-mesh/waypoint:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p waypoint --bin waypoint \
    && install -D -m 0755 target/release/waypoint /out/waypoint

FROM debian:bookworm-slim
# No packages: JWKS over https uses the bundled webpki roots.
COPY --from=build /out/waypoint /usr/local/bin/waypoint
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/waypoint"]
