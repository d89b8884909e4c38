//! Operator commands of the `sigil-agent` binary beyond `run`.
//!
//! - [`api`]: a Workload API client (`api fetch x509|jwt`, `api validate jwt`, `api watch`).
//! - [`explain`]: `explain --pid N`: selectors, matching entries and near misses of a process.

pub mod api;
pub mod explain;

/// Unix seconds as RFC 3339 (the number itself if out of range).
pub fn time_text(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// An admin API client on the agent's admin socket, with a clear error when the agent is not
/// running there.
pub async fn admin_client(
    socket: &std::path::Path,
) -> anyhow::Result<
    sigil::proto::agent_admin::agent_admin_client::AgentAdminClient<tonic::transport::Channel>,
> {
    if !socket.exists() {
        anyhow::bail!(
            "admin socket {} does not exist: is sigil-agent running? (use --admin-socket)",
            socket.display()
        );
    }
    sigil::uds::check_client_path(socket)?;
    let channel = sigil::uds::connect(socket)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", socket.display()))?;
    Ok(sigil::proto::agent_admin::agent_admin_client::AgentAdminClient::new(channel))
}
