//! `sigil-server token generate`.

use clap::{Args, Subcommand};
use sigil::proto::admin as pb;
use sigil::SpiffeId;

use super::output::{self, Output};
use super::{connect, status_error, Common};

/// Join-token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Generate a single-use join token for node attestation.
    Generate(GenerateArgs),
}

impl TokenCommand {
    /// The flags every admin command takes.
    pub fn common(&self) -> &Common {
        match self {
            Self::Generate(a) => &a.common,
        }
    }
}

/// `token generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Also create a node-alias entry with this SPIFFE ID when the token is used.
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// How long the token is valid, e.g. 10m [default: 10m].
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// Runs a token subcommand.
pub async fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Generate(a) = cmd;
    let ttl = match &a.ttl {
        Some(t) => sigil::ttl::parse(t)
            .map_err(|e| anyhow::anyhow!("invalid --ttl: {e}"))?
            .as_secs() as i64,
        None => 0,
    };
    let spiffe_id = match &a.spiffe_id {
        Some(s) => SpiffeId::parse(s)
            .map_err(|e| {
                anyhow::anyhow!(
                    "invalid --spiffe-id {}: {e}",
                    sigil::text::quote_for_display(s)
                )
            })?
            .to_string(),
        None => String::new(),
    };
    let mut client = connect(&a.common.admin_socket).await?;
    let t = client
        .create_join_token(pb::CreateJoinTokenRequest { ttl, spiffe_id })
        .await
        .map_err(|s| status_error("generating join token", s))?
        .into_inner();
    match a.common.output {
        Output::Json => output::print_json(&serde_json::json!({
            "token": t.token,
            "expires_at": t.expires_at,
            "spiffe_id": t.spiffe_id,
        })),
        Output::Text => {
            println!("Token: {}", t.token);
            println!("Expires: {}", output::time_text(t.expires_at));
            if !t.spiffe_id.is_empty() {
                println!("Node alias: {}", t.spiffe_id);
            }
        }
    }
    Ok(())
}
