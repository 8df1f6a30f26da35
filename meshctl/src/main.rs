//! `meshctl`: install the mesh, check a node, inspect ztunnel, manage waypoints, analyze
//! manifests and drive the local demo. Exit codes: 0 ok, 1 findings or failures, 2 usage.

mod cli;

use clap::Parser;

fn main() {
    // Die quietly on a closed pipe (`meshctl install | head`), as command-line tools do,
    // instead of panicking in print!.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = cli::Cli::parse();
    let code = match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
