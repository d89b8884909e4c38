//! `sigil-server agent list|show|evict|ban`.

use clap::{Args, Subcommand};
use sigil::proto::admin as pb;
use sigil::SpiffeId;

use super::output::{self, AgentJson, Output};
use super::{connect, status_error, Common};

/// Agent subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List(Common),
    /// Show one agent.
    Show(AgentId),
    /// Evict an agent: its next call is refused and it must attest again.
    Evict(AgentId),
    /// Ban an agent: it is refused and may not attest again.
    Ban(AgentId),
}

impl AgentCommand {
    /// The flags every admin command takes.
    pub fn common(&self) -> &Common {
        match self {
            Self::List(c) => c,
            Self::Show(a) | Self::Evict(a) | Self::Ban(a) => &a.common,
        }
    }
}

/// An agent selected by SPIFFE ID.
#[derive(Debug, Args)]
pub struct AgentId {
    /// The agent's SPIFFE ID (see `agent list`).
    #[arg(long, value_name = "ID")]
    spiffe_id: String,
    #[command(flatten)]
    common: Common,
}

impl AgentId {
    fn id(&self) -> anyhow::Result<String> {
        SpiffeId::parse(&self.spiffe_id)
            .map(|i| i.to_string())
            .map_err(|e| {
                anyhow::anyhow!(
                    "invalid --spiffe-id {}: {e}",
                    sigil::text::quote_for_display(&self.spiffe_id)
                )
            })
    }
}

fn agent_table(agents: &[pb::Agent]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.spiffe_id.clone(),
                a.attestation_type.clone(),
                output::time_text(a.x509_svid_expires_at),
                if a.banned { "yes".into() } else { "no".into() },
                output::selectors(&a.selectors).join(","),
            ]
        })
        .collect();
    output::table(
        &[
            "SPIFFE ID",
            "ATTESTATION",
            "SVID EXPIRES",
            "BANNED",
            "SELECTORS",
        ],
        &rows,
    )
}

/// Runs an agent subcommand.
pub async fn run(cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::List(common) => {
            let mut client = connect(&common.admin_socket).await?;
            let mut agents = Vec::new();
            let mut page_token = String::new();
            loop {
                let resp = client
                    .list_agents(pb::ListAgentsRequest {
                        page_size: 0,
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(|s| status_error("listing agents", s))?
                    .into_inner();
                agents.extend(resp.agents);
                if resp.next_page_token.is_empty() {
                    break;
                }
                page_token = resp.next_page_token;
            }
            match common.output {
                Output::Json => {
                    let list: Vec<AgentJson> = agents.iter().map(AgentJson::from).collect();
                    output::print_json(&serde_json::json!({ "agents": list }));
                }
                Output::Text => {
                    println!(
                        "Found {} attested {}",
                        agents.len(),
                        if agents.len() == 1 { "agent" } else { "agents" }
                    );
                    if !agents.is_empty() {
                        print!("{}", agent_table(&agents));
                    }
                }
            }
        }
        AgentCommand::Show(a) => {
            let mut client = connect(&a.common.admin_socket).await?;
            let agent = client
                .get_agent(pb::GetAgentRequest { spiffe_id: a.id()? })
                .await
                .map_err(|s| status_error("showing agent", s))?
                .into_inner()
                .agent
                .ok_or_else(|| anyhow::anyhow!("server returned no agent"))?;
            match a.common.output {
                Output::Json => {
                    output::print_json(&serde_json::json!({ "agent": AgentJson::from(&agent) }))
                }
                Output::Text => print!(
                    "{}",
                    output::key_values(&[
                        ("SPIFFE ID", agent.spiffe_id.clone()),
                        ("Attestation type", agent.attestation_type.clone()),
                        ("SVID serial", agent.x509_svid_serial.clone()),
                        (
                            "SVID expires",
                            output::time_text(agent.x509_svid_expires_at)
                        ),
                        ("Banned", agent.banned.to_string()),
                        ("Selectors", output::selectors(&agent.selectors).join(", ")),
                    ])
                ),
            }
        }
        AgentCommand::Evict(a) => {
            let id = a.id()?;
            let mut client = connect(&a.common.admin_socket).await?;
            client
                .evict_agent(pb::EvictAgentRequest {
                    spiffe_id: id.clone(),
                })
                .await
                .map_err(|s| status_error("evicting agent", s))?;
            match a.common.output {
                Output::Json => output::print_json(&serde_json::json!({ "evicted": id })),
                Output::Text => println!("Agent {id} evicted"),
            }
        }
        AgentCommand::Ban(a) => {
            let id = a.id()?;
            let mut client = connect(&a.common.admin_socket).await?;
            client
                .ban_agent(pb::BanAgentRequest {
                    spiffe_id: id.clone(),
                })
                .await
                .map_err(|s| status_error("banning agent", s))?;
            match a.common.output {
                Output::Json => output::print_json(&serde_json::json!({ "banned": id })),
                Output::Text => println!("Agent {id} banned"),
            }
        }
    }
    Ok(())
}
