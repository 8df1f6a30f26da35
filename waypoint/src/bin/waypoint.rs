//! The waypoint binary: flags and environment to [`waypoint::config::Config`], logging (JSON
//! by [`mesh_core::log_json`] to [`mesh_core::log_sink`]: access-log lines batched off the
//! request path), the runtime ([`mesh_core::runtime`]: one thread on small nodes), run.

/// mimalloc rather than glibc's malloc: an L7 request makes dozens of small allocations across
/// hyper, h2 and http, and with glibc they cost the ingress gateway about a tenth of its CPU
/// per request more (README, "Ingress gateway"). ztunnel keeps glibc, tuned for its
/// per-connection memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cfg = match waypoint::config::Config::load() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log).unwrap_or_else(|e| {
        eprintln!("warning: invalid log filter {:?} ({e}); using info", cfg.log);
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .json()
        .flatten_event(true)
        .event_format(mesh_core::log_json::JsonLines::default())
        .with_writer(mesh_core::log_sink::LogSink::stdout().clone())
        .init();
    let rt = match cfg.runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(waypoint::app::run(cfg));
    mesh_core::log_sink::LogSink::stdout().flush();
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
