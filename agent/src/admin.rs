//! The agent's admin API on its local Unix socket (directory 0700): what the agent holds, for
//! `sigil-agent status`. Never returns key material.

use std::sync::Arc;

use sigil::proto::agent_admin as pb;
use tonic::{Request, Response, Status};

use crate::worker::AgentState;

/// The `sigil.agent.v1.AgentAdmin` service.
pub struct AgentAdminService {
    state: Arc<AgentState>,
}

impl AgentAdminService {
    /// Wraps the shared agent state.
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

fn leaf_serial(chain: &[Vec<u8>]) -> String {
    chain
        .first()
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
        .map(|(_, c)| c.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl pb::agent_admin_server::AgentAdmin for AgentAdminService {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let identity = self.state.identity.read().await.clone();
        let refused = self.state.refused.read().await.clone().unwrap_or_default();
        let cache = self.state.cache.read().await;
        let mut svids: Vec<pb::CachedSvid> = cache
            .svids()
            .map(|(e, s)| pb::CachedSvid {
                entry_id: e.id.clone(),
                spiffe_id: e.spiffe_id.to_string(),
                serial: leaf_serial(&s.chain_der),
                not_after: s.not_after,
                refresh_at: s.refresh_at,
            })
            .collect();
        svids.sort_by(|a, b| {
            a.spiffe_id
                .cmp(&b.spiffe_id)
                .then(a.entry_id.cmp(&b.entry_id))
        });
        Ok(Response::new(pb::StatusResponse {
            spiffe_id: identity.spiffe_id.to_string(),
            agent_svid_expires_at: identity.not_after,
            synced: cache.has_snapshot(),
            revision: cache.revision(),
            bundle_sequence: cache.bundle_sequence(),
            entries: cache.entry_count() as u64,
            refused,
            svids,
        }))
    }
}
