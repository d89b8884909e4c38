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
    // Whatever answers on it is believed: not in a directory anyone can write.
    if socket.exists() {
        sigil::uds::check_client_path(socket)?;
    }
    let channel = sigil::socket_api::connect(socket, sigil::socket_api::Api::AgentAdmin).await?;
    Ok(sigil::proto::agent_admin::agent_admin_client::AgentAdminClient::new(channel))
}

/// One line for a failed admin API call on `socket`: `Unimplemented` means the socket serves
/// another API, and the line says which.
pub async fn admin_error(socket: &std::path::Path, what: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unimplemented => {
            sigil::socket_api::wrong_api(socket, sigil::socket_api::Api::AgentAdmin, what)
                .await
                .into()
        }
        code if s.message().is_empty() => {
            anyhow::anyhow!("{what}: {code:?} ({})", code.description())
        }
        code => anyhow::anyhow!("{what}: {} ({code:?})", s.message()),
    }
}
