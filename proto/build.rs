//! Compiles `proto/*.proto` with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/discovery.proto",
        "proto/ca.proto",
        "proto/zds.proto",
        "proto/waypoint.proto",
        // OTLP (the subset the waypoint exports): access logs and spans over gRPC or HTTP.
        "proto/opentelemetry/proto/collector/logs/v1/logs_service.proto",
        "proto/opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        // Ordered maps encode deterministically, so equal resources have equal bytes.
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
