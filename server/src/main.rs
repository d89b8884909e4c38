//! `sigil-server`: run the identity server, or administer a running one.

use clap::Parser;
use sigil_server::cli::{self, Cli, Command};
use sigil_server::config::ServerConfig;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(flags) => {
                let cfg = ServerConfig::load(&flags)?;
                sigil::logging::init(&cfg.log_level, cfg.log_format)?;
                sigil_server::run::run(cfg).await
            }
            other => cli::run_admin(other).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, as operators read it in a terminal.
            eprintln!("error: {}", sigil::text::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
