//! The node API service (`sigil.node.v1.Node`): what agents call, over TLS on `bind_address`.
//!
//! - `Attest` runs without a client certificate: the agent sends `AttestParams` (method,
//!   payload, CSR), the [`Attestors`] registered for the method verify it (with challenges on
//!   the same stream if the method needs them), and the agent receives its SVID
//!   `spiffe://<td>/sigil/agent/<method>/<id>` and the trust bundle.
//! - Every other RPC requires the agent's X509-SVID as TLS client certificate, checked by
//!   [`authenticate_agent`]: a known (not evicted), not banned agent presenting its current
//!   serial or the one of its pending renewed SVID. A renewal records the new serial beside the
//!   current one; the agent's first call with the new SVID makes it current, and from then on the
//!   old one is refused as superseded. So an agent that could not store its renewed SVID (full
//!   disk, a crash in between) goes on with the old one and renews again.
//! - `RenewAgent` re-issues the agent SVID; `BatchSign` signs workload CSRs for entries the agent
//!   is authorised for ([`crate::sync::is_authorized`]), one result per request; `MintJwtSvid`
//!   mints a JWT-SVID for such an entry; `Sync` streams the authorised entries
//!   ([`crate::sync::sync_stream`]).
//!
//! Status codes: no client SVID → Unauthenticated; unknown/evicted, banned or superseded agent,
//! bad or used join token, entry not authorised → PermissionDenied (the first three marked with
//! an [`AgentRefusal`] in the metadata, so agents can tell them apart); malformed input (CSR,
//! unsupported attestation type, empty audience) → InvalidArgument.
//!
//! Layout: this file holds the service, its state, the refusals, the caller authentication every
//! mTLS RPC starts with ([`authenticate_agent`]) and the trait implementation, which delegates:
//! `attest.rs` (`Attest`: attestors, challenges, the node-alias entry), `renew.rs`
//! (`RenewAgent`), `sign.rs` (`BatchSign` and `MintJwtSvid`, with the per-entry authorisation
//! they share) and `sync.rs` (`Sync`, ended by server shutdown).

use std::sync::Arc;
use std::time::Duration;

use sigil::clock::now_unix;
use sigil::proto::node as pb;
use sigil::proto::node::node_server::Node;
use sigil::proto::AgentRefusal;
use sigil::tls::PeerSvid;
use sigil::{SpiffeId, TrustDomain};
use tokio::sync::{watch, Mutex};
use tonic::{Request, Response, Status, Streaming};

use crate::api::admin::ds_status;
use crate::attestor::{Attestors, AGENT_PATH_PREFIX};
use crate::ca::{Ca, CaError};
use crate::datastore::{AttestedAgent, Datastore};
use crate::metrics::Metrics;
use crate::sync::SyncEvents;

mod attest;
mod renew;
mod sign;
mod sync;
#[cfg(test)]
mod tests;

pub use attest::attest_with;
pub use renew::renew;
pub use sign::{batch_sign, mint_jwt_svid};

/// An attestation (all its messages and challenges) must finish within this time.
pub const ATTEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Most CSRs in one `BatchSign` call; agents split larger sets.
pub const MAX_BATCH_SIGN: usize = 1_000;
/// Most audiences in one `MintJwtSvid` call.
pub const MAX_AUDIENCES: usize = sigil::jwt::MAX_AUDIENCES;
/// Selector type of the entry created for a join token's node alias (SPIRE's convention); its
/// value is the agent's SPIFFE ID. No workload attestor produces it, so no workload matches it.
pub const NODE_ALIAS_SELECTOR_TYPE: &str = "spiffe_id";

/// Message for an agent that is not (or no longer) in the datastore.
pub const NOT_ATTESTED: &str =
    "agent is not attested (evicted?); attest again (e.g. with a new join token)";
/// Message for a banned agent.
pub const BANNED: &str =
    "agent is banned; an operator must remove the ban (evict the agent) before it may attest again";

/// The refusal of an agent the datastore does not know.
pub fn not_attested() -> Status {
    AgentRefusal::Evicted.status(NOT_ATTESTED)
}

/// The refusal of a banned agent.
pub fn banned() -> Status {
    AgentRefusal::Banned.status(BANNED)
}

/// The refusal of an agent SVID (`serial`) that is neither the agent's current one nor its
/// pending renewed one.
pub fn superseded(serial: &str) -> Status {
    AgentRefusal::Superseded.status(format!(
        "agent SVID serial {} is not this agent's current one: it has been superseded by a later \
         renewal or attestation; connect with the most recently issued agent SVID, or attest again",
        sigil::text::echo(serial)
    ))
}

/// What the node API needs from the rest of the server.
pub struct NodeState {
    /// The server's trust domain.
    pub trust_domain: TrustDomain,
    /// Agents, join tokens, entries.
    pub datastore: Arc<dyn Datastore>,
    /// Signs agent and workload SVIDs.
    pub ca: Arc<Ca>,
    /// Node attestation methods accepted.
    pub attestors: Attestors,
    /// Metrics (`x509_svids_signed`).
    pub metrics: Metrics,
    /// Entry-change notifications (node-alias entries created at attestation are published).
    pub events: SyncEvents,
    /// Full-recompute interval of sync streams.
    pub reconcile_every: Duration,
    /// Turns true when the server stops: open sync streams then end with Unavailable, so a
    /// graceful shutdown does not wait for agents to hang up.
    pub shutdown: watch::Receiver<bool>,
}

impl NodeState {
    fn server_id(&self) -> SpiffeId {
        crate::api::server_id(&self.trust_domain)
    }
}

/// The node gRPC service.
pub struct NodeService {
    state: Arc<NodeState>,
    /// Serialises agent-record writes (attestation, renewal), so two renewals presenting the
    /// same SVID cannot both succeed: the second sees the first's serial and is superseded.
    agent_writes: Arc<Mutex<()>>,
}

impl NodeService {
    /// Wraps shared state.
    pub fn new(state: Arc<NodeState>) -> Self {
        Self {
            state,
            agent_writes: Arc::new(Mutex::new(())),
        }
    }
}

fn concat_der(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.concat()
}

/// Maps CA errors: the caller's input → InvalidArgument, the CA's state → Unavailable,
/// anything else → Internal.
fn ca_status(e: CaError) -> Status {
    match e {
        CaError::InvalidCsr(_)
        | CaError::InvalidPublicKey(_)
        | CaError::InvalidDnsName(_)
        | CaError::InvalidTtl(_)
        | CaError::InvalidAudience(_)
        | CaError::WrongTrustDomain { .. }
        | CaError::IdWithoutPath(_) => Status::invalid_argument(e.to_string()),
        CaError::CaExpired(_) => Status::unavailable(e.to_string()),
        other => {
            tracing::error!(error = %other, "signing failed");
            Status::internal(format!("signing failed: {other}"))
        }
    }
}

/// Authenticates the caller of an mTLS RPC: `peer` must be an agent SVID of this trust domain,
/// unexpired, of an agent the datastore knows, not banned, with its current serial or the one
/// of its pending renewed SVID, which this first use makes current. Returns the stored agent.
pub async fn authenticate_agent(
    state: &NodeState,
    peer: Option<&PeerSvid>,
) -> Result<AttestedAgent, Status> {
    let peer = peer.ok_or_else(|| {
        Status::unauthenticated(
            "this call needs the agent's X509-SVID as TLS client certificate; attest first",
        )
    })?;
    let id = &peer.spiffe_id;
    if !id.is_member_of(&state.trust_domain) || !id.path().starts_with(AGENT_PATH_PREFIX) {
        return Err(Status::permission_denied(format!(
            "caller {id} is not an agent of trust domain {}",
            state.trust_domain
        )));
    }
    if peer.not_after <= now_unix() {
        return Err(Status::unauthenticated(
            "agent SVID has expired; reconnect with a current SVID or attest again",
        ));
    }
    let agent = known_agent(state, id).await?;
    if agent.x509_svid_serial == peer.serial_hex {
        return Ok(agent);
    }
    let renewed = agent
        .new_x509_svid
        .as_ref()
        .is_some_and(|n| n.serial == peer.serial_hex);
    if renewed {
        if state
            .datastore
            .promote_agent_svid(id, &peer.serial_hex)
            .await
            .map_err(ds_status)?
        {
            tracing::info!(
                agent = %id,
                serial = %peer.serial_hex,
                previous_serial = %agent.x509_svid_serial,
                "agent uses its renewed SVID; the previous one is refused from now on"
            );
        }
        // Promoted by this call or a concurrent one, or banned or evicted meanwhile.
        let agent = known_agent(state, id).await?;
        if agent.x509_svid_serial == peer.serial_hex {
            return Ok(agent);
        }
    }
    tracing::info!(
        agent = %id,
        presented = %peer.serial_hex,
        current = %agent.x509_svid_serial,
        pending = ?agent.new_x509_svid.as_ref().map(|n| &n.serial),
        "call with a superseded agent SVID refused"
    );
    Err(superseded(&peer.serial_hex))
}

/// The stored agent `id`: refused if unknown (evicted) or banned.
async fn known_agent(state: &NodeState, id: &SpiffeId) -> Result<AttestedAgent, Status> {
    let agent = state
        .datastore
        .get_agent(id)
        .await
        .map_err(ds_status)?
        .ok_or_else(|| {
            tracing::info!(agent = %id, "call from an unknown or evicted agent refused");
            not_attested()
        })?;
    if agent.banned {
        tracing::info!(agent = %id, "call from a banned agent refused");
        return Err(banned());
    }
    Ok(agent)
}

#[tonic::async_trait]
impl Node for NodeService {
    type AttestStream = sync::BoxStream<pb::AttestResponse>;
    type SyncStream = sync::BoxStream<pb::SyncResponse>;

    async fn attest(
        &self,
        req: Request<Streaming<pb::AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        Ok(Response::new(attest::serve(
            self.state.clone(),
            self.agent_writes.clone(),
            req,
        )))
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let peer = sigil::tls::peer_svid(&req);
        renew(
            &self.state,
            &self.agent_writes,
            peer.as_ref(),
            &req.into_inner().csr,
        )
        .await
        .map(Response::new)
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let peer = sigil::tls::peer_svid(&req);
        let agent = authenticate_agent(&self.state, peer.as_ref()).await?;
        Ok(Response::new(sync::open(
            &self.state,
            agent,
            req.into_inner(),
        )))
    }

    async fn batch_sign(
        &self,
        req: Request<pb::BatchSignRequest>,
    ) -> Result<Response<pb::BatchSignResponse>, Status> {
        let peer = sigil::tls::peer_svid(&req);
        let agent = authenticate_agent(&self.state, peer.as_ref()).await?;
        batch_sign(&self.state, &agent, req.into_inner().requests)
            .await
            .map(Response::new)
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::JwtSvidRequest>,
    ) -> Result<Response<pb::JwtSvidResponse>, Status> {
        let peer = sigil::tls::peer_svid(&req);
        let agent = authenticate_agent(&self.state, peer.as_ref()).await?;
        mint_jwt_svid(&self.state, &agent, req.into_inner())
            .await
            .map(Response::new)
    }
}
