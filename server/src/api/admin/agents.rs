//! Attested agents: list, get, evict (the agent must attest again), ban (it may not).

use sigil::proto::admin as pb;
use tonic::Status;

use super::layer::Outcome;
use super::{ds_status, page_size, page_token, parse_id, AdminState};
use crate::datastore::AttestedAgent;

fn agent_to_proto(a: &AttestedAgent) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        x509_svid_serial: a.x509_svid_serial.clone(),
        x509_svid_expires_at: a.x509_svid_expires_at,
        banned: a.banned,
        selectors: a
            .selectors
            .iter()
            .map(sigil::entry::selector_to_proto)
            .collect(),
        created_at: a.created_at,
        updated_at: a.updated_at,
    }
}

/// ListAgents: one page.
pub(super) async fn list(
    state: &AdminState,
    req: pb::ListAgentsRequest,
) -> Result<pb::ListAgentsResponse, Status> {
    let page = state
        .datastore
        .list_agents(page_size(req.page_size), page_token(&req.page_token))
        .await
        .map_err(ds_status)?;
    Ok(pb::ListAgentsResponse {
        agents: page.items.iter().map(agent_to_proto).collect(),
        next_page_token: page.next_token.unwrap_or_default(),
    })
}

/// GetAgent.
pub(super) async fn get(
    state: &AdminState,
    req: pb::GetAgentRequest,
) -> Result<pb::GetAgentResponse, Status> {
    let id = parse_id("spiffe_id", &req.spiffe_id)?;
    let agent = state
        .datastore
        .get_agent(&id)
        .await
        .map_err(ds_status)?
        .ok_or_else(|| Status::not_found(format!("agent {id} not found")))?;
    Ok(pb::GetAgentResponse {
        agent: Some(agent_to_proto(&agent)),
    })
}

/// EvictAgent; audited as the SPIFFE ID given.
pub(super) async fn evict(
    state: &AdminState,
    req: pb::EvictAgentRequest,
) -> Outcome<pb::EvictAgentResponse> {
    let result = async {
        let id = parse_id("spiffe_id", &req.spiffe_id)?;
        state.datastore.delete_agent(&id).await.map_err(ds_status)?;
        // Open sync streams re-check their agent on every event: end this one now.
        state.events.entries_changed();
        Ok(pb::EvictAgentResponse {})
    }
    .await;
    Outcome::new(result, req.spiffe_id)
}

/// BanAgent; audited as the SPIFFE ID given.
pub(super) async fn ban(
    state: &AdminState,
    req: pb::BanAgentRequest,
) -> Outcome<pb::BanAgentResponse> {
    let result = async {
        let id = parse_id("spiffe_id", &req.spiffe_id)?;
        state
            .datastore
            .set_agent_banned(&id, true)
            .await
            .map_err(ds_status)?;
        state.events.entries_changed();
        Ok(pb::BanAgentResponse {})
    }
    .await;
    Outcome::new(result, req.spiffe_id)
}
