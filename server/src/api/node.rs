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

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sigil::entry::RegistrationEntry;
use sigil::proto::node as pb;
use sigil::proto::node::node_server::Node;
use sigil::proto::AgentRefusal;
use sigil::tls::PeerSvid;
use sigil::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tokio::sync::{mpsc, watch, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use x509_parser::prelude::FromDer as _;

use crate::api::admin::ds_status;
use crate::attestor::{AttestError, Attestors, Challenger, AGENT_PATH_PREFIX};
use crate::ca::{Ca, CaError};
use crate::datastore::{AttestedAgent, Datastore, DatastoreError, NewAgentSvid};
use crate::metrics::Metrics;
use crate::sync::SyncEvents;

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

use sigil::clock::now_unix;

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
        bundle: concat_der(state.ca.x509_authorities()),
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

/// Looks up entries and whether `agent` may have them, caching per parent ID (authorisation
/// depends only on the entry's parent).
struct EntryAuthz<'a> {
    state: &'a NodeState,
    agent: &'a AttestedAgent,
    server_id: SpiffeId,
    by_parent: HashMap<SpiffeId, bool>,
}

impl<'a> EntryAuthz<'a> {
    fn new(state: &'a NodeState, agent: &'a AttestedAgent) -> Self {
        Self {
            state,
            agent,
            server_id: state.server_id(),
            by_parent: HashMap::new(),
        }
    }

    /// The entry `entry_id` if the agent is authorised for it. The outer error is a datastore
    /// failure; the inner one is this entry's refusal.
    async fn entry(&mut self, entry_id: &str) -> Result<Result<RegistrationEntry, Status>, Status> {
        if entry_id.is_empty() {
            return Ok(Err(Status::invalid_argument("entry_id is required")));
        }
        let Some(entry) = self
            .state
            .datastore
            .get_entry(entry_id)
            .await
            .map_err(ds_status)?
        else {
            return Ok(Err(Status::not_found(format!(
                "entry {:?} not found (deleted?)",
                entry_id.chars().take(64).collect::<String>()
            ))));
        };
        let allowed = match self.by_parent.get(&entry.parent_id) {
            Some(a) => *a,
            None => {
                let a = crate::sync::is_authorized(
                    self.state.datastore.as_ref(),
                    self.agent,
                    &self.server_id,
                    &entry,
                )
                .await
                .map_err(ds_status)?;
                self.by_parent.insert(entry.parent_id.clone(), a);
                a
            }
        };
        if !allowed {
            tracing::info!(agent = %self.agent.spiffe_id, entry_id, "entry not authorised for agent");
            return Ok(Err(Status::permission_denied(format!(
                "entry {entry_id} is not authorised for agent {}",
                self.agent.spiffe_id
            ))));
        }
        Ok(Ok(entry))
    }
}

/// Signs each CSR of `requests` for its entry, if `agent` is authorised for it: one result per
/// request, in order; a bad request never fails the others.
pub async fn batch_sign(
    state: &NodeState,
    agent: &AttestedAgent,
    requests: Vec<pb::SignRequest>,
) -> Result<pb::BatchSignResponse, Status> {
    if requests.len() > MAX_BATCH_SIGN {
        return Err(Status::invalid_argument(format!(
            "{} sign requests in one call; send at most {MAX_BATCH_SIGN} per BatchSign",
            requests.len()
        )));
    }
    let mut authz = EntryAuthz::new(state, agent);
    let mut jobs = Vec::with_capacity(requests.len());
    let mut entries: HashMap<String, Result<RegistrationEntry, Status>> = HashMap::new();
    for r in requests {
        if !entries.contains_key(&r.entry_id) {
            let e = authz.entry(&r.entry_id).await?;
            entries.insert(r.entry_id.clone(), e);
        }
        let target = match entries.get(&r.entry_id) {
            Some(Ok(e)) => Ok((e.spiffe_id.clone(), e.dns_names.clone(), e.x509_svid_ttl)),
            Some(Err(s)) => Err(s.clone()),
            None => Err(Status::internal("entry lookup lost")),
        };
        jobs.push((r, target));
    }
    // Signing is CPU work: keep it off the async workers.
    let ca = state.ca.clone();
    let results = tokio::task::spawn_blocking(move || {
        jobs.into_iter()
            .map(|(r, target)| {
                let signed = target.and_then(|(id, dns, ttl)| {
                    ca.sign_x509_svid_csr(&r.csr, &id, &dns, ttl)
                        .map_err(ca_status)
                });
                match signed {
                    Ok(svid) => pb::SignResult {
                        entry_id: r.entry_id,
                        code: Code::Ok as i32,
                        message: String::new(),
                        svid_chain: concat_der(&svid.chain_der),
                        expires_at: svid.not_after,
                    },
                    Err(s) => pb::SignResult {
                        entry_id: r.entry_id,
                        code: s.code() as i32,
                        message: s.message().to_string(),
                        svid_chain: vec![],
                        expires_at: 0,
                    },
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Status::internal(format!("signing task failed: {e}")))?;
    let signed = results.iter().filter(|r| r.code == Code::Ok as i32).count();
    state.metrics.x509_svids_signed.inc_by(signed as u64);
    tracing::debug!(
        agent = %agent.spiffe_id,
        requested = results.len(),
        signed,
        "batch signed"
    );
    Ok(pb::BatchSignResponse { results })
}

/// Mints a JWT-SVID for entry `req.entry_id` if `agent` is authorised for it.
pub async fn mint_jwt_svid(
    state: &NodeState,
    agent: &AttestedAgent,
    req: pb::JwtSvidRequest,
) -> Result<pb::JwtSvidResponse, Status> {
    if req.audience.is_empty() {
        return Err(Status::invalid_argument(
            "audience is required: pass at least one audience",
        ));
    }
    if req.audience.len() > MAX_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_AUDIENCES} audiences"
        )));
    }
    let entry = EntryAuthz::new(state, agent).entry(&req.entry_id).await??;
    let minted = state
        .ca
        .mint_jwt_svid(&entry.spiffe_id, &req.audience, entry.jwt_svid_ttl)
        .map_err(ca_status)?;
    tracing::debug!(agent = %agent.spiffe_id, entry_id = %entry.id, "JWT-SVID minted");
    Ok(pb::JwtSvidResponse {
        token: minted.token,
        expires_at: minted.expires_at,
    })
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

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Ends `stream` with Unavailable once `shutdown` turns true.
fn until_shutdown<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> BoxStream<T> {
    let stop: Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(async move {
        if shutdown.wait_for(|stop| *stop).await.is_err() {
            // No sender: the server never signals shutdown.
            std::future::pending::<()>().await;
        }
    });
    let inner: BoxStream<T> = Box::pin(stream);
    Box::pin(futures::stream::unfold(
        Some((inner, stop)),
        |state| async move {
            let (mut inner, mut stop) = state?;
            tokio::select! {
                item = futures::StreamExt::next(&mut inner) => item.map(|i| (i, Some((inner, stop)))),
                _ = &mut stop => Some((
                    Err(Status::unavailable("the server is shutting down; reconnect")),
                    None,
                )),
            }
        },
    ))
}

#[tonic::async_trait]
impl Node for NodeService {
    type AttestStream = BoxStream<pb::AttestResponse>;
    type SyncStream = BoxStream<pb::SyncResponse>;

    async fn attest(
        &self,
        req: Request<Streaming<pb::AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let remote = req.remote_addr();
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let state = self.state.clone();
        let writes = self.agent_writes.clone();
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
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
        let s = &self.state;
        tracing::debug!(agent = %agent.spiffe_id, "sync stream opened");
        let stream = crate::sync::sync_stream(
            s.datastore.clone(),
            s.events.clone(),
            agent.spiffe_id,
            s.server_id(),
            s.trust_domain.clone(),
            req.into_inner(),
            s.reconcile_every,
        );
        Ok(Response::new(until_shutdown(stream, s.shutdown.clone())))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attestor::join_token::JoinTokenAttestor;
    use crate::ca::CaConfig;
    use crate::datastore::sqlite::SqliteDatastore;
    use crate::datastore::JoinToken;
    use rcgen::{CertificateParams, KeyPair};

    const TOKEN: &str = "0f8e2d4c-1b3a-4c5d-8e7f-a0b1c2d3e4f5";
    const AGENT: &str =
        "spiffe://example.org/sigil/agent/join_token/0f8e2d4c-1b3a-4c5d-8e7f-a0b1c2d3e4f5";

    struct Fixture {
        _dir: tempfile::TempDir,
        state: NodeState,
        writes: Mutex<()>,
        shutdown: watch::Sender<bool>,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let datastore: Arc<dyn Datastore> = Arc::new(
            SqliteDatastore::open(&dir.path().join("ds.sqlite3"))
                .await
                .unwrap(),
        );
        let ca = Arc::new(
            Ca::load_or_create(&CaConfig::new(td.clone(), dir.path().join("ca"))).unwrap(),
        );
        let (shutdown, rx) = watch::channel(false);
        let state = NodeState {
            trust_domain: td.clone(),
            datastore: datastore.clone(),
            ca,
            attestors: Attestors::new().with(Arc::new(JoinTokenAttestor::new(datastore, td))),
            metrics: Metrics::new(),
            events: SyncEvents::new(),
            reconcile_every: Duration::from_secs(300),
            shutdown: rx,
        };
        Fixture {
            _dir: dir,
            state,
            writes: Mutex::new(()),
            shutdown,
        }
    }

    struct NoChallenges;

    #[async_trait]
    impl Challenger for NoChallenges {
        async fn challenge(&mut self, _c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
            Err(AttestError::Challenge("none expected".into()))
        }
    }

    fn csr() -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    impl Fixture {
        async fn token(&self, token: &str, alias: Option<&str>) {
            self.state
                .datastore
                .create_join_token(JoinToken {
                    token: token.into(),
                    expires_at: now_unix() + 600,
                    spiffe_id: alias.map(id),
                })
                .await
                .unwrap();
        }

        async fn attest(&self, token: &str, csr: Vec<u8>) -> Result<pb::AttestResult, Status> {
            let params = pb::AttestParams {
                r#type: "join_token".into(),
                payload: token.as_bytes().to_vec(),
                csr,
            };
            attest_with(&self.state, &self.writes, params, &mut NoChallenges).await
        }

        /// Attests with TOKEN and returns the agent's peer view of its SVID.
        async fn attested(&self, alias: Option<&str>) -> PeerSvid {
            self.token(TOKEN, alias).await;
            let r = self.attest(TOKEN, csr()).await.unwrap();
            peer(&r.svid_chain)
        }

        async fn entry(&self, spiffe_id: &str, parent: &str, dns: &[&str]) -> String {
            let e = RegistrationEntry {
                x509_svid_ttl: Some(Duration::from_secs(600)),
                jwt_svid_ttl: Some(Duration::from_secs(120)),
                dns_names: dns.iter().map(|d| d.to_string()).collect(),
                ..RegistrationEntry::new(
                    id(spiffe_id),
                    id(parent),
                    SelectorSet::from_iter([Selector::parse("unix:uid:1000").unwrap()]),
                )
            };
            let mut r = self.state.datastore.create_entries(vec![e]).await.unwrap();
            r.pop().unwrap().unwrap().id
        }

        async fn agent(&self, p: &PeerSvid) -> Result<AttestedAgent, Status> {
            authenticate_agent(&self.state, Some(p)).await
        }
    }

    fn peer(chain: &[u8]) -> PeerSvid {
        let certs = sigil::x509::split_der_concat(chain).unwrap();
        PeerSvid::from_leaf_der(&certs[0]).unwrap()
    }

    fn assert_status(r: Result<impl std::fmt::Debug, Status>, code: Code, text: &str) {
        match r {
            Err(s) => {
                assert_eq!(s.code(), code, "{s:?}");
                assert!(
                    s.message().contains(text),
                    "{:?} lacks {text:?}",
                    s.message()
                );
            }
            Ok(v) => panic!("expected {code:?}, got {v:?}"),
        }
    }

    #[tokio::test]
    async fn join_token_attestation_stores_agent_alias_and_returns_a_verifying_svid() {
        let f = fixture().await;
        f.token(TOKEN, Some("spiffe://example.org/node/n1")).await;
        let r = f.attest(TOKEN, csr()).await.unwrap();
        assert_eq!(r.spiffe_id, AGENT);
        let chain = sigil::x509::split_der_concat(&r.svid_chain).unwrap();
        let roots = sigil::x509::split_der_concat(&r.bundle).unwrap();
        let verified =
            sigil::x509::verify_x509_svid(&chain, &roots, std::time::SystemTime::now()).unwrap();
        assert_eq!(verified.to_string(), AGENT);

        let agent = f
            .state
            .datastore
            .get_agent(&id(AGENT))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(agent.attestation_type, "join_token");
        assert_eq!(agent.x509_svid_serial, peer(&r.svid_chain).serial_hex);
        assert!(!agent.banned);
        assert_eq!(f.state.metrics.x509_svids_signed.get(), 1);

        let filter = crate::datastore::EntryFilter {
            parent_id: Some(id(AGENT)),
            ..Default::default()
        };
        let aliases = f
            .state
            .datastore
            .list_entries(&filter, 10, None)
            .await
            .unwrap();
        assert_eq!(aliases.items.len(), 1);
        assert_eq!(
            aliases.items[0].spiffe_id.to_string(),
            "spiffe://example.org/node/n1"
        );
        assert_eq!(
            aliases.items[0].selectors.to_string(),
            format!("spiffe_id:{AGENT}")
        );
        assert_eq!(f.state.events.current().entry_changes, 1);

        assert_status(
            f.attest(TOKEN, csr()).await,
            Code::PermissionDenied,
            "join token is invalid or already used",
        );
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_the_token_is_spent() {
        let f = fixture().await;
        f.token(TOKEN, None).await;
        assert_status(
            f.attest(TOKEN, vec![]).await,
            Code::InvalidArgument,
            "invalid CSR",
        );
        assert_status(
            f.attest(TOKEN, vec![0x30, 0x00]).await,
            Code::InvalidArgument,
            "invalid CSR",
        );
        let params = pb::AttestParams {
            r#type: "x509pop".into(),
            payload: vec![],
            csr: csr(),
        };
        assert_status(
            attest_with(&f.state, &f.writes, params, &mut NoChallenges).await,
            Code::InvalidArgument,
            "unsupported attestation type \"x509pop\"; this server accepts: join_token",
        );
        // The token is still good.
        assert_eq!(f.attest(TOKEN, csr()).await.unwrap().spiffe_id, AGENT);
    }

    #[tokio::test]
    async fn banned_agent_cannot_attest_again() {
        let f = fixture().await;
        f.attested(None).await;
        f.state
            .datastore
            .set_agent_banned(&id(AGENT), true)
            .await
            .unwrap();
        // Same ID again (as x509pop would produce): a fresh token with the same value.
        f.token(TOKEN, None).await;
        assert_status(
            f.attest(TOKEN, csr()).await,
            Code::PermissionDenied,
            "agent is banned",
        );
    }

    #[tokio::test]
    async fn authentication_requires_a_current_known_unbanned_agent() {
        let f = fixture().await;
        assert_status(
            authenticate_agent(&f.state, None).await,
            Code::Unauthenticated,
            "client certificate",
        );
        let p = f.attested(None).await;
        assert_eq!(f.agent(&p).await.unwrap().spiffe_id.to_string(), AGENT);

        let mut other = p.clone();
        other.serial_hex = "40".repeat(16);
        let refused = f.agent(&other).await;
        assert_refusal(&refused, AgentRefusal::Superseded);
        assert_status(
            refused,
            Code::PermissionDenied,
            &format!(
                "agent SVID serial {} is not this agent's current one",
                other.serial_hex
            ),
        );

        let mut expired = p.clone();
        expired.not_after = now_unix() - 1;
        assert_status(f.agent(&expired).await, Code::Unauthenticated, "expired");

        let mut workload = p.clone();
        workload.spiffe_id = id("spiffe://example.org/web");
        assert_status(
            f.agent(&workload).await,
            Code::PermissionDenied,
            "is not an agent",
        );
        let mut foreign = p.clone();
        foreign.spiffe_id = id("spiffe://other.org/sigil/agent/join_token/x");
        assert_status(
            f.agent(&foreign).await,
            Code::PermissionDenied,
            "is not an agent",
        );

        f.state
            .datastore
            .set_agent_banned(&id(AGENT), true)
            .await
            .unwrap();
        let refused = f.agent(&p).await;
        assert_refusal(&refused, AgentRefusal::Banned);
        assert_status(refused, Code::PermissionDenied, "agent is banned");
        f.state.datastore.delete_agent(&id(AGENT)).await.unwrap();
        let refused = f.agent(&p).await;
        assert_refusal(&refused, AgentRefusal::Evicted);
        assert_status(
            refused,
            Code::PermissionDenied,
            "agent is not attested (evicted?)",
        );
    }

    fn assert_refusal<T: std::fmt::Debug>(r: &Result<T, Status>, want: AgentRefusal) {
        match r {
            Err(s) => assert_eq!(AgentRefusal::of(s), Some(want), "{s:?}"),
            Ok(v) => panic!("expected {want:?}, got {v:?}"),
        }
    }

    async fn stored(f: &Fixture) -> AttestedAgent {
        f.state
            .datastore
            .get_agent(&id(AGENT))
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn renewal_keeps_the_old_svid_until_the_new_one_is_used() {
        let f = fixture().await;
        let old = f.attested(None).await;
        assert_status(
            renew(&f.state, &f.writes, Some(&old), b"junk").await,
            Code::InvalidArgument,
            "certificate signing request",
        );
        // A failed renewal changes nothing.
        f.agent(&old).await.unwrap();
        assert_eq!(stored(&f).await.new_x509_svid, None);

        let r = renew(&f.state, &f.writes, Some(&old), &csr())
            .await
            .unwrap();
        let lost = peer(&r.svid_chain);
        assert_eq!(lost.spiffe_id, old.spiffe_id);
        assert_ne!(lost.serial_hex, old.serial_hex);
        let agent = stored(&f).await;
        assert_eq!(agent.x509_svid_serial, old.serial_hex);
        assert_eq!(
            agent.new_x509_svid.map(|n| n.serial),
            Some(lost.serial_hex.clone())
        );
        // The agent never stored that SVID (full disk, a crash): the old one still works, and
        // renews again; the unused SVID is replaced.
        f.agent(&old).await.unwrap();
        let r = renew(&f.state, &f.writes, Some(&old), &csr())
            .await
            .unwrap();
        let new = peer(&r.svid_chain);
        assert_refusal(&f.agent(&lost).await, AgentRefusal::Superseded);
        f.agent(&old).await.unwrap();
        // The first call with the new SVID makes it current; the old one is refused from then.
        let agent = f.agent(&new).await.unwrap();
        assert_eq!(agent.x509_svid_serial, new.serial_hex);
        let agent = stored(&f).await;
        assert_eq!(agent.x509_svid_serial, new.serial_hex);
        assert_eq!(agent.x509_svid_expires_at, new.not_after);
        assert_eq!(agent.new_x509_svid, None);
        f.agent(&new).await.unwrap();
        assert_refusal(&f.agent(&old).await, AgentRefusal::Superseded);
        let refused = renew(&f.state, &f.writes, Some(&old), &csr()).await;
        assert_refusal(&refused, AgentRefusal::Superseded);
        assert_status(refused, Code::PermissionDenied, "superseded");
        // Renewing with the new one works as before.
        let r = renew(&f.state, &f.writes, Some(&new), &csr())
            .await
            .unwrap();
        f.agent(&peer(&r.svid_chain)).await.unwrap();
        assert_refusal(&f.agent(&new).await, AgentRefusal::Superseded);
    }

    #[tokio::test]
    async fn eviction_and_ban_refuse_the_current_and_the_renewed_svid() {
        let f = fixture().await;
        let old = f.attested(None).await;
        let r = renew(&f.state, &f.writes, Some(&old), &csr())
            .await
            .unwrap();
        let new = peer(&r.svid_chain);
        f.state
            .datastore
            .set_agent_banned(&id(AGENT), true)
            .await
            .unwrap();
        for p in [&old, &new] {
            assert_refusal(&f.agent(p).await, AgentRefusal::Banned);
            assert_refusal(
                &renew(&f.state, &f.writes, Some(p), &csr()).await,
                AgentRefusal::Banned,
            );
        }
        // Refusing the renewed SVID did not make it current.
        assert_eq!(stored(&f).await.x509_svid_serial, old.serial_hex);
        f.state.datastore.delete_agent(&id(AGENT)).await.unwrap();
        for p in [&old, &new] {
            assert_refusal(&f.agent(p).await, AgentRefusal::Evicted);
        }
        // Attesting again supersedes both, and any pending renewal.
        let again = f.attested(None).await;
        f.agent(&again).await.unwrap();
        for p in [&old, &new] {
            assert_refusal(&f.agent(p).await, AgentRefusal::Superseded);
        }
        let r = renew(&f.state, &f.writes, Some(&again), &csr())
            .await
            .unwrap();
        let pending = peer(&r.svid_chain);
        let reattested = f.attested(None).await;
        assert_eq!(stored(&f).await.new_x509_svid, None);
        assert_refusal(&f.agent(&pending).await, AgentRefusal::Superseded);
        f.agent(&reattested).await.unwrap();
    }

    #[tokio::test]
    async fn batch_sign_signs_only_authorised_entries_one_result_each() {
        let f = fixture().await;
        let p = f.attested(Some("spiffe://example.org/node/n1")).await;
        let agent = f.agent(&p).await.unwrap();
        let direct = f
            .entry("spiffe://example.org/web", AGENT, &["web.example.org"])
            .await;
        let via_alias = f
            .entry(
                "spiffe://example.org/db",
                "spiffe://example.org/node/n1",
                &[],
            )
            .await;
        let other = f
            .entry(
                "spiffe://example.org/x",
                "spiffe://example.org/sigil/agent/join_token/other",
                &[],
            )
            .await;
        let req = |entry_id: &str, csr: Vec<u8>| pb::SignRequest {
            entry_id: entry_id.into(),
            csr,
        };
        let before = f.state.metrics.x509_svids_signed.get();
        let resp = batch_sign(
            &f.state,
            &agent,
            vec![
                req(&direct, csr()),
                req(&via_alias, csr()),
                req(&other, csr()),
                req("no-such-entry", csr()),
                req(&direct, b"junk".to_vec()),
                req("", csr()),
            ],
        )
        .await
        .unwrap();
        let codes: Vec<i32> = resp.results.iter().map(|r| r.code).collect();
        assert_eq!(
            codes,
            vec![
                Code::Ok as i32,
                Code::Ok as i32,
                Code::PermissionDenied as i32,
                Code::NotFound as i32,
                Code::InvalidArgument as i32,
                Code::InvalidArgument as i32,
            ],
            "{:?}",
            resp.results.iter().map(|r| &r.message).collect::<Vec<_>>()
        );
        assert_eq!(resp.results[2].entry_id, other);
        assert!(resp.results[2].message.contains("not authorised"));
        assert_eq!(f.state.metrics.x509_svids_signed.get(), before + 2);

        let web = &resp.results[0];
        let chain = sigil::x509::split_der_concat(&web.svid_chain).unwrap();
        let svid_id = sigil::x509::verify_x509_svid(
            &chain,
            f.state.ca.x509_authorities(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        assert_eq!(svid_id.to_string(), "spiffe://example.org/web");
        let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let ttl = web.expires_at - now_unix();
        assert!((590..=601).contains(&ttl), "entry TTL used: {ttl}");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(format!("{:?}", san.value).contains("web.example.org"));

        let too_many = (0..=MAX_BATCH_SIGN).map(|_| req(&direct, vec![])).collect();
        assert_status(
            batch_sign(&f.state, &agent, too_many).await,
            Code::InvalidArgument,
            "at most",
        );
    }

    #[tokio::test]
    async fn jwt_svids_for_authorised_entries_only() {
        let f = fixture().await;
        let p = f.attested(None).await;
        let agent = f.agent(&p).await.unwrap();
        let web = f.entry("spiffe://example.org/web", AGENT, &[]).await;
        let other = f
            .entry(
                "spiffe://example.org/x",
                "spiffe://example.org/elsewhere",
                &[],
            )
            .await;
        let req = |entry_id: &str, aud: &[&str]| pb::JwtSvidRequest {
            entry_id: entry_id.into(),
            audience: aud.iter().map(|a| a.to_string()).collect(),
        };
        let r = mint_jwt_svid(&f.state, &agent, req(&web, &["db"]))
            .await
            .unwrap();
        let claims = sigil::jwt::validate_jwt_svid(&r.token, "db", &f.state.ca.bundle()).unwrap();
        assert_eq!(claims.subject.to_string(), "spiffe://example.org/web");
        assert_eq!(claims.expiry, r.expires_at);
        let ttl = r.expires_at - now_unix();
        assert!((110..=121).contains(&ttl), "entry JWT TTL used: {ttl}");
        assert_status(
            mint_jwt_svid(&f.state, &agent, req(&web, &[])).await,
            Code::InvalidArgument,
            "audience is required",
        );
        assert_status(
            mint_jwt_svid(&f.state, &agent, req(&other, &["db"])).await,
            Code::PermissionDenied,
            "not authorised",
        );
        assert_status(
            mint_jwt_svid(&f.state, &agent, req("nope", &["db"])).await,
            Code::NotFound,
            "not found",
        );
    }

    #[tokio::test]
    async fn streams_end_with_unavailable_on_shutdown() {
        let f = fixture().await;
        let mut s = until_shutdown(
            futures::stream::pending::<Result<(), Status>>(),
            f.state.shutdown.clone(),
        );
        f.shutdown.send(true).unwrap();
        let first = futures::StreamExt::next(&mut s).await.unwrap();
        assert_eq!(first.unwrap_err().code(), Code::Unavailable);
        assert!(futures::StreamExt::next(&mut s).await.is_none());
    }
}
