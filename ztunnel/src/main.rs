//! ztunnel: the per-node proxy of the ambient mesh. Captured pod TCP leaves through the
//! outbound listener and travels over HBONE (HTTP/2 CONNECT in mutual TLS) to the destination's
//! ztunnel, which authorizes it and hands it to the application.
//!
//! This binary only sets up the process: configuration, logging and the runtime; the library
//! (`ztunnel::app::run`) wires the workload source, certificates, listeners, admin and drain.

use std::process::ExitCode;

use clap::Parser;
use ztunnel::{app, config};

fn main() -> ExitCode {
    let cfg = config::Config::parse();
    if let Some(dir) = &cfg.gen_dev_ca {
        return match app::write_dev_ca(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = cfg.validate() {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    mesh_core::runtime::tune_allocator();
    let reload = app::init_logging(&cfg);
    let rt = match cfg.runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(app::run(cfg, reload));
    mesh_core::log_sink::LogSink::stdout().flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
