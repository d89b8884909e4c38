//! `sigil-agent`: the node agent.

use clap::{Parser, Subcommand};
use sigil_agent::cli::time_text;
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
    /// Show the agent's identity, sync state and cached SVIDs (over the admin socket).
    Status {
        /// The agent's admin socket.
        #[arg(long, value_name = "PATH", default_value = sigil_agent::config::DEFAULT_ADMIN_SOCKET)]
        admin_socket: std::path::PathBuf,
        /// Output format: text or json.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        /// Only the SVIDs (and sign back-offs) of this SPIFFE ID.
        #[arg(long, value_name = "SPIFFE_ID")]
        spiffe_id: Option<String>,
    },
    /// Talk to the Workload API as a workload would: fetch, validate, watch.
    #[command(subcommand)]
    Api(sigil_agent::cli::api::ApiCommand),
    /// Why does a process get (or not get) an SVID: its selectors, matches and near misses.
    Explain(sigil_agent::cli::explain::ExplainArgs),
    /// Keep this process's SVID in files for programs that read PEM files (nginx, PostgreSQL,
    /// …): write them, rotate them, signal or start the program (spiffe-helper's keys).
    Helper(Box<sigil_agent::helper::HelperFlags>),
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

/// The sync state line of `status`: the state, the last sync and, when down, why.
fn sync_text(s: &sigil::proto::agent_admin::StatusResponse) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let last = if s.last_sync_at > 0 {
        format!(
            "last sync {} ({} s ago)",
            time_text(s.last_sync_at),
            (now - s.last_sync_at).max(0)
        )
    } else {
        "never synced".to_string()
    };
    let since = if s.sync_state_since > 0 {
        format!(" since {}", time_text(s.sync_state_since))
    } else {
        String::new()
    };
    let mut text = format!("{}{since}; {last}", s.sync_state);
    if !s.server.is_empty() {
        text.push_str(&format!("; server {}", s.server));
    }
    if !s.sync_error.is_empty() {
        text.push_str(&format!("; error: {}", s.sync_error));
    }
    text
}

/// A signing in back-off as JSON.
fn backoff_json(b: &sigil::proto::agent_admin::SignBackoff) -> serde_json::Value {
    serde_json::json!({
        "entry_id": b.entry_id, "spiffe_id": b.spiffe_id, "failures": b.failures,
        "last_error": b.last_error, "next_retry_at": b.next_retry_at,
        "failing_since": b.failing_since,
    })
}

/// A signing in back-off as a line of text: failures, next retry, last error.
fn backoff_text(b: &sigil::proto::agent_admin::SignBackoff) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    format!(
        "{} failure{} since {}, next retry {} (in {} s): {}",
        b.failures,
        if b.failures == 1 { "" } else { "s" },
        time_text(b.failing_since),
        time_text(b.next_retry_at),
        (b.next_retry_at - now).max(0),
        b.last_error
    )
}

async fn status(
    socket: &std::path::Path,
    output: &str,
    spiffe_id: Option<String>,
) -> anyhow::Result<()> {
    // An agent with 100,000 SVIDs answers with well over gRPC's default 4 MiB.
    let s = match sigil_agent::cli::admin_client(socket)
        .await?
        .max_decoding_message_size(256 * 1024 * 1024)
        .status(sigil::proto::agent_admin::StatusRequest {
            spiffe_id: spiffe_id.unwrap_or_default(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return Err(sigil_agent::cli::admin_error(socket, "agent status", e).await),
    };
    if output == "json" {
        let svids: Vec<serde_json::Value> = s
            .svids
            .iter()
            .map(|v| {
                serde_json::json!({
                    "entry_id": v.entry_id, "spiffe_id": v.spiffe_id, "serial": v.serial,
                    "not_after": v.not_after, "refresh_at": v.refresh_at,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "spiffe_id": s.spiffe_id, "agent_svid_expires_at": s.agent_svid_expires_at,
            "synced": s.synced, "revision": s.revision, "bundle_sequence": s.bundle_sequence,
            "sync_state": s.sync_state, "sync_state_since": s.sync_state_since,
            "last_sync_at": s.last_sync_at, "sync_error": s.sync_error, "server": s.server,
            "agent_svid_serial": s.agent_svid_serial,
            "entries": s.entries, "refused": s.refused, "svids": svids,
            "federated_trust_domains": s.federated_trust_domains,
            "sign_backoff": s.sign_backoff.iter().map(backoff_json).collect::<Vec<_>>(),
            "agent_svid_renewal_backoff": s.agent_svid_renewal_backoff.as_ref().map(backoff_json),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("Agent ID        : {}", s.spiffe_id);
    println!("Agent SVID until: {}", time_text(s.agent_svid_expires_at));
    if let Some(b) = &s.agent_svid_renewal_backoff {
        println!("Agent SVID renew: FAILING, {}", backoff_text(b));
    }
    println!("Sync            : {}", sync_text(&s));
    println!(
        "Entries synced  : {} (revision {}, bundle sequence {})",
        if s.synced { "yes" } else { "not yet" },
        s.revision,
        s.bundle_sequence
    );
    println!("Entries         : {}", s.entries);
    if !s.federated_trust_domains.is_empty() {
        println!("Federated with  : {}", s.federated_trust_domains.join(", "));
    }
    if !s.refused.is_empty() {
        println!("REFUSED         : {}", s.refused);
    }
    println!("SVIDs           : {}", s.svids.len());
    for v in &s.svids {
        println!(
            "  {}  expires {}  renews {}",
            v.spiffe_id,
            time_text(v.not_after),
            time_text(v.refresh_at)
        );
    }
    if !s.sign_backoff.is_empty() {
        println!("Signing failing : {}", s.sign_backoff.len());
        for b in &s.sign_backoff {
            println!(
                "  {}  entry {}  {}",
                b.spiffe_id,
                b.entry_id,
                backoff_text(b)
            );
        }
    }
    Ok(())
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
        let done = match cli.command {
            Command::Run(flags) => {
                let cfg = AgentConfig::load(&flags)?;
                sigil::logging::init(&cfg.log_level, cfg.log_format)?;
                sigil_agent::run::run(cfg).await
            }
            Command::Api(cmd) => sigil_agent::cli::api::run(cmd).await,
            Command::Explain(args) => sigil_agent::cli::explain::run(args).await,
            // The helper's exit code is its child's.
            Command::Helper(flags) => return Ok(sigil_agent::helper::main(*flags).await),
            Command::Healthcheck { health_address } => healthcheck(&health_address).await,
            Command::Status {
                admin_socket,
                output,
                spiffe_id,
            } => status(&admin_socket, &output, spiffe_id).await,
        };
        done.map(|()| std::process::ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the causes joined, each once.
            eprintln!("error: {}", sigil::text::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
