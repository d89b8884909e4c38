//! `Attest`: the agent's first call, without a client certificate. The stream's first message
//! names the method; the registered attestor verifies the payload (sending challenges on the
//! same stream if it needs them); the agent gets its SVID and the bundle.

use std::sync::Arc;

use async_trait::async_trait;
use sigil::entry::RegistrationEntry;
use sigil::proto::node as pb;
use sigil::{Selector, SelectorSet, SpiffeId};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};
use x509_parser::prelude::FromDer as _;

use super::sync::BoxStream;
use super::{banned, ca_status, concat_der, NodeState, ATTEST_TIMEOUT, NODE_ALIAS_SELECTOR_TYPE};
use crate::api::admin::ds_status;
use crate::attestor::{AttestError, Challenger, AGENT_PATH_PREFIX};
use crate::datastore::{AttestedAgent, DatastoreError};

/// Runs the attestation of `req` in a task of its own, bounded by [`ATTEST_TIMEOUT`]; the
/// returned stream carries its challenges, then its result.
pub(super) fn serve(
    state: Arc<NodeState>,
    writes: Arc<Mutex<()>>,
    req: Request<Streaming<pb::AttestRequest>>,
) -> BoxStream<pb::AttestResponse> {
    let remote = req.remote_addr();
    let inbound = req.into_inner();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let result =
            tokio::time::timeout(ATTEST_TIMEOUT, attest_stream(&state, &writes, inbound, &tx))
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "attestation did not complete within {}s",
                        ATTEST_TIMEOUT.as_secs()
                    )))
                });
        if let Err(s) = &result {
            tracing::info!(remote = remote.map(tracing::field::display), code = ?s.code(), error = s.message(), "attestation refused");
        }
        let msg = result.map(|r| pb::AttestResponse {
            step: Some(pb::attest_response::Step::Result(r)),
        });
        // The agent may have gone away; nothing else to do then.
        let _ = tx.send(msg).await;
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Maps attestor errors to gRPC statuses.
fn attest_status(e: AttestError) -> Status {
    match e {
        AttestError::Denied(m) => Status::permission_denied(m),
        AttestError::InvalidPayload(_) => Status::invalid_argument(e.to_string()),
        AttestError::Challenge(_) => Status::aborted(e.to_string()),
        AttestError::Unavailable(_) => Status::unavailable(e.to_string()),
        AttestError::Datastore(d) => ds_status(d),
    }
}

/// Checks that a CSR parses and its self-signature verifies, before any attestation data (a
/// single-use join token) is spent on it.
fn check_csr(csr: &[u8]) -> Result<(), Status> {
    let bad = |m: String| {
        Status::invalid_argument(format!(
            "invalid CSR: {m}; send a DER PKCS#10 request signed with the agent's key"
        ))
    };
    if csr.is_empty() {
        return Err(bad("empty".into()));
    }
    let (rest, req) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        .map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the request".into()));
    }
    req.verify_signature()
        .map_err(|e| bad(format!("self-signature does not verify: {e}")))
}

/// Runs one attestation: `params` is the stream's first message, `challenger` carries any
/// further exchange. On success the agent is stored (replacing an earlier record of the same
/// ID), its node-alias entry exists, and the result holds its SVID and the bundle.
pub async fn attest_with(
    state: &NodeState,
    agent_writes: &Mutex<()>,
    params: pb::AttestParams,
    challenger: &mut dyn Challenger,
) -> Result<pb::AttestResult, Status> {
    let kind = params.r#type.as_str();
    let attestor = state.attestors.get(kind).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unsupported attestation type {:?}; this server accepts: {}",
            kind.chars().take(64).collect::<String>(),
            state.attestors.types().join(", ")
        ))
    })?;
    check_csr(&params.csr)?;
    let node = attestor
        .attest(&params.payload, challenger)
        .await
        .map_err(attest_status)?;
    let agent_id = node.agent_id;
    let expected_prefix = format!("{AGENT_PATH_PREFIX}{kind}/");
    if !agent_id.is_member_of(&state.trust_domain) || !agent_id.path().starts_with(&expected_prefix)
    {
        tracing::error!(agent = %agent_id, kind, "attestor produced an agent ID outside its namespace");
        return Err(Status::internal("attestor produced an invalid agent ID"));
    }

    let _guard = agent_writes.lock().await;
    let existing = state
        .datastore
        .get_agent(&agent_id)
        .await
        .map_err(ds_status)?;
    if existing.as_ref().is_some_and(|a| a.banned) {
        tracing::warn!(agent = %agent_id, kind, "attestation of a banned agent refused");
        return Err(banned());
    }
    let svid = state
        .ca
        .sign_x509_svid_csr(&params.csr, &agent_id, &[], None)
        .map_err(ca_status)?;
    state.metrics.x509_svids_signed.inc();

    if let Some(alias) = &node.node_alias {
        create_node_alias(state, alias, &agent_id).await?;
    }
    state
        .datastore
        .upsert_agent(AttestedAgent {
            spiffe_id: agent_id.clone(),
            attestation_type: kind.to_string(),
            x509_svid_serial: svid.serial_hex.clone(),
            x509_svid_expires_at: svid.not_after,
            new_x509_svid: None,
            banned: false,
            selectors: node.selectors,
            created_at: existing.map_or(0, |a| a.created_at),
            updated_at: 0,
        })
        .await
        .map_err(ds_status)?;
    tracing::info!(
        agent = %agent_id,
        attestation_type = kind,
        serial = %svid.serial_hex,
        expires_at = svid.not_after,
        node_alias = node.node_alias.as_ref().map(tracing::field::display),
        "agent attested"
    );
    Ok(pb::AttestResult {
        spiffe_id: agent_id.to_string(),
        svid_chain: concat_der(&svid.chain_der),
        bundle: concat_der(&state.ca.x509_authorities()),
    })
}

/// Creates the node-alias entry `alias` ← `agent_id` with selector `spiffe_id:<agent_id>`
/// (an existing identical entry is fine).
async fn create_node_alias(
    state: &NodeState,
    alias: &SpiffeId,
    agent_id: &SpiffeId,
) -> Result<(), Status> {
    let selector = Selector::new(NODE_ALIAS_SELECTOR_TYPE, &agent_id.to_string())
        .map_err(|e| Status::internal(format!("node-alias selector: {e}")))?;
    let entry = RegistrationEntry::new(
        alias.clone(),
        agent_id.clone(),
        SelectorSet::from_iter([selector]),
    );
    let result = state
        .datastore
        .create_entries(vec![entry])
        .await
        .map_err(ds_status)?
        .pop()
        .ok_or_else(|| Status::internal("datastore returned no result"))?;
    match result {
        Ok(e) => {
            tracing::info!(entry_id = %e.id, spiffe_id = %alias, parent_id = %agent_id, "node-alias entry created");
            state.events.entries_changed();
            Ok(())
        }
        Err(DatastoreError::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(ds_status(e)),
    }
}

/// [`Challenger`] over the `Attest` stream.
struct StreamChallenger<'a> {
    inbound: &'a mut Streaming<pb::AttestRequest>,
    tx: &'a mpsc::Sender<Result<pb::AttestResponse, Status>>,
}

#[async_trait]
impl Challenger for StreamChallenger<'_> {
    async fn challenge(&mut self, challenge: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        let closed = || AttestError::Challenge("the agent closed the attestation stream".into());
        self.tx
            .send(Ok(pb::AttestResponse {
                step: Some(pb::attest_response::Step::Challenge(challenge)),
            }))
            .await
            .map_err(|_| closed())?;
        match self.inbound.message().await {
            Ok(Some(pb::AttestRequest {
                step: Some(pb::attest_request::Step::ChallengeResponse(r)),
            })) => Ok(r),
            Ok(Some(_)) => Err(AttestError::Challenge(
                "expected a challenge_response after a challenge".into(),
            )),
            Ok(None) => Err(closed()),
            Err(s) => Err(AttestError::Challenge(s.message().to_string())),
        }
    }
}

/// Reads the first message and runs the attestation.
async fn attest_stream(
    state: &NodeState,
    agent_writes: &Mutex<()>,
    mut inbound: Streaming<pb::AttestRequest>,
    tx: &mpsc::Sender<Result<pb::AttestResponse, Status>>,
) -> Result<pb::AttestResult, Status> {
    let first = inbound.message().await?.ok_or_else(|| {
        Status::invalid_argument("the attestation stream closed before AttestParams was sent")
    })?;
    let Some(pb::attest_request::Step::Params(params)) = first.step else {
        return Err(Status::invalid_argument(
            "the first attestation message must be AttestParams",
        ));
    };
    let mut challenger = StreamChallenger {
        inbound: &mut inbound,
        tx,
    };
    attest_with(state, agent_writes, params, &mut challenger).await
}
