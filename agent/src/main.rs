//! `sigil-agent`: the node agent.

use clap::{Parser, Subcommand};
use sigil_agent::config::{AgentConfig, RunFlags};

/// Sigil node agent.
#[derive(Debug, Parser)]
#[command(name = "sigil-agent", version, about = "Sigil SPIFFE node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run(Box<RunFlags>),
    /// Check the agent's health endpoint: exit 0 when ready.
    Healthcheck {
        /// The agent's health address.
        #[arg(long, value_name = "HOST:PORT", default_value = sigil_agent::config::DEFAULT_HEALTH_ADDRESS)]
        health_address: String,
    },
}

async fn healthcheck(addr: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the agent's health endpoint at {addr}: {e} (is sigil-agent running?)"
        )
    })?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    if out.starts_with("HTTP/1.1 200") {
        println!("Agent is healthy");
        Ok(())
    } else {
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        anyhow::bail!("agent is not ready: {body}")
    }
}

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
                let cfg = AgentConfig::load(&flags)?;
                sigil::logging::init(&cfg.log_level, cfg.log_format).map_err(anyhow::Error::msg)?;
                sigil_agent::run::run(cfg).await
            }
            Command::Healthcheck { health_address } => healthcheck(&health_address).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
