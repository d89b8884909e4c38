//! `BatchSign` (workload X509-SVIDs) and `MintJwtSvid` (JWT-SVIDs): both only for entries the
//! calling agent is authorised for ([`crate::sync::is_authorized`]), checked per entry.

use std::collections::HashMap;

use sigil::entry::RegistrationEntry;
use sigil::proto::node as pb;
use sigil::SpiffeId;
use tonic::{Code, Status};

use super::{ca_status, concat_der, NodeState, MAX_AUDIENCES, MAX_BATCH_SIGN};
use crate::api::admin::ds_status;
use crate::datastore::AttestedAgent;

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
