//! The `sigil-server` command line: `run` plus admin subcommands that talk to a running server
//! over its admin socket.
//!
//! Conventions (SPIRE's, in Rust flag style): every admin command takes `--admin-socket` and
//! `--output text|json`; success exits 0, failure exits non-zero with one line on stderr.

pub mod agent;
pub mod bundle;
pub mod entry;
pub mod federation;
pub mod localauthority;
pub mod output;
pub mod spire_data;
pub mod token;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use sigil::proto::admin::admin_client::AdminClient;
use sigil::socket_api::Api;
use tonic::transport::Channel;

use crate::config::{RunFlags, DEFAULT_ADMIN_SOCKET};
use output::Output;

/// Sigil identity server.
#[derive(Debug, Parser)]
#[command(
    name = "sigil-server",
    version,
    about = "Sigil SPIFFE identity server",
    propagate_version = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Run(Box<RunFlags>),
    /// Manage registration entries.
    #[command(subcommand)]
    Entry(entry::EntryCommand),
    /// Manage join tokens for node attestation.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Inspect and manage attested agents.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Show the trust bundle; manage federated bundles of other trust domains.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Manage federation relationships: other trust domains whose bundles are fetched from
    /// their bundle endpoints and kept fresh.
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// Show and manage the CA's X.509 authorities and JWT keys (rotation, taint, revoke).
    #[command(subcommand)]
    Localauthority(localauthority::LocalAuthorityCommand),
    /// Check that the server is up and ready (exit 0) or not (exit 1).
    Healthcheck(Common),
}

/// Flags every admin command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Admin socket of the server to talk to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET, env = "SIGIL_SERVER_ADMIN_SOCKET", global = true)]
    pub admin_socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
}

/// Connects to the admin socket, with an error that says what to check (missing, not this
/// user's to open, nobody listening).
pub async fn connect(socket: &Path) -> anyhow::Result<AdminClient<Channel>> {
    // Whatever answers on it is believed (bundles, entries): not in a directory anyone can write.
    if socket.exists() {
        sigil::uds::check_client_path(socket)?;
    }
    let channel = sigil::socket_api::connect(socket, Api::ServerAdmin).await?;
    Ok(AdminClient::new(channel))
}

/// Turns a gRPC status into one readable line. `Unimplemented` means the socket serves another
/// API: [`run_admin`] then finds out which.
pub fn status_error(what: &str, s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Unimplemented {
        return anyhow::Error::new(sigil::socket_api::Unimplemented {
            what: what.to_string(),
        });
    }
    status_line(what, &s)
}

/// `what: message (Code)`; a status without a message is described by its code.
pub fn status_line(what: &str, s: &tonic::Status) -> anyhow::Error {
    if s.message().is_empty() {
        anyhow::anyhow!("{what}: {:?} ({})", s.code(), s.code().description())
    } else {
        anyhow::anyhow!("{what}: {} ({:?})", s.message(), s.code())
    }
}

impl Command {
    /// The admin socket an admin command talks to (`None` for `run`).
    fn admin_socket(&self) -> Option<&Path> {
        let common = match self {
            Command::Run(_) => return None,
            Command::Entry(c) => c.common(),
            Command::Token(c) => c.common(),
            Command::Agent(c) => c.common(),
            Command::Bundle(c) => c.common(),
            Command::Federation(c) => c.common(),
            Command::Localauthority(c) => c.common(),
            Command::Healthcheck(c) => c,
        };
        Some(&common.admin_socket)
    }
}

/// Runs an admin command (everything but `run`).
pub async fn run_admin(command: Command) -> anyhow::Result<()> {
    let socket = command.admin_socket().map(Path::to_path_buf);
    let result = run_admin_command(command).await;
    match (result, socket) {
        (Err(e), Some(socket)) => match e.downcast::<sigil::socket_api::Unimplemented>() {
            Ok(u) => Err(
                sigil::socket_api::wrong_api(&socket, Api::ServerAdmin, &u.what)
                    .await
                    .into(),
            ),
            Err(e) => Err(e),
        },
        (result, _) => result,
    }
}

async fn run_admin_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(_) => unreachable!("run is handled by main"),
        Command::Entry(c) => entry::run(c).await,
        Command::Token(c) => token::run(c).await,
        Command::Agent(c) => agent::run(c).await,
        Command::Bundle(c) => bundle::run(c).await,
        Command::Federation(c) => federation::run(c).await,
        Command::Localauthority(c) => localauthority::run(c).await,
        Command::Healthcheck(common) => {
            let mut client = connect(&common.admin_socket).await?;
            let h = client
                .health(sigil::proto::admin::HealthRequest {})
                .await
                .map_err(|s| status_error("health check failed", s))?
                .into_inner();
            if !h.ready {
                if h.not_ready_reason.is_empty() {
                    anyhow::bail!("server is not ready");
                }
                anyhow::bail!("server is not ready: {}", h.not_ready_reason);
            }
            match common.output {
                Output::Json => output::print_json(&serde_json::json!({
                    "ready": h.ready,
                    "trust_domain": h.trust_domain,
                    "version": h.version,
                    "entries": h.entries,
                    "agents": h.agents,
                    "ca_not_after": h.ca_not_after,
                })),
                Output::Text => println!(
                    "Server is healthy (trust domain {}, version {}, {} entries, {} agents)",
                    h.trust_domain, h.version, h.entries, h.agents
                ),
            }
            Ok(())
        }
    }
}
