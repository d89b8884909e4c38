//! `RenewAgent`: a new agent SVID, pending beside the current one until the agent uses it.

use sigil::proto::node as pb;
use sigil::tls::PeerSvid;
use tokio::sync::Mutex;
use tonic::Status;

use super::{authenticate_agent, ca_status, concat_der, known_agent, superseded, NodeState};
use crate::api::admin::ds_status;
use crate::datastore::NewAgentSvid;

/// Re-issues the agent SVID of `peer` for the public key of `csr`. The new SVID is recorded as
/// pending beside the current one (replacing an earlier pending one the agent never used); the
/// agent's first call with it supersedes the old one.
pub async fn renew(
    state: &NodeState,
    agent_writes: &Mutex<()>,
    peer: Option<&PeerSvid>,
    csr: &[u8],
) -> Result<pb::RenewAgentResponse, Status> {
    let _guard = agent_writes.lock().await;
    let agent = authenticate_agent(state, peer).await?;
    let svid = state
        .ca
        .sign_x509_svid_csr(csr, &agent.spiffe_id, &[], None)
        .map_err(ca_status)?;
    state.metrics.x509_svids_signed.inc();
    // Recorded only if nothing changed since the check: an eviction, a ban or another
    // attestation must not be undone.
    let recorded = state
        .datastore
        .set_agent_new_svid(
            &agent.spiffe_id,
            &agent.x509_svid_serial,
            NewAgentSvid {
                serial: svid.serial_hex.clone(),
                expires_at: svid.not_after,
            },
        )
        .await
        .map_err(ds_status)?;
    if !recorded {
        known_agent(state, &agent.spiffe_id).await?;
        return Err(superseded(&agent.x509_svid_serial));
    }
    tracing::info!(
        agent = %agent.spiffe_id,
        serial = %svid.serial_hex,
        current_serial = %agent.x509_svid_serial,
        expires_at = svid.not_after,
        "agent SVID renewed; the current one stays valid until the agent uses the new one"
    );
    Ok(pb::RenewAgentResponse {
        svid_chain: concat_der(&svid.chain_der),
    })
}
