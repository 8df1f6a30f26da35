//! The waypoint binary: flags and environment to [`waypoint::config::Config`], logging, run.

#[tokio::main]
async fn main() {
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
        .init();
    if let Err(e) = waypoint::app::run(cfg).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
