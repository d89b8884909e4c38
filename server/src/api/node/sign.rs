//! `BatchSign` (workload X509-SVIDs) and `MintJwtSvid` (JWT-SVIDs): both only for entries the
//! calling agent is authorised for ([`crate::sync::is_authorized`]), checked per entry. A
//! batch's entries are read in one datastore call ([`crate::datastore::Datastore::get_entries`])
//! and its CSRs signed on the blocking pool in one chunk per core.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::Duration;

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
            return Ok(Err(empty_entry_id()));
        }
        let entry = self
            .state
            .datastore
            .get_entry(entry_id)
            .await
            .map_err(ds_status)?;
        self.check(entry_id, entry).await
    }

    /// `entry` (what the datastore holds for `entry_id`) if the agent is authorised for it; as
    /// [`EntryAuthz::entry`].
    async fn check(
        &mut self,
        entry_id: &str,
        entry: Option<RegistrationEntry>,
    ) -> Result<Result<RegistrationEntry, Status>, Status> {
        let Some(entry) = entry else {
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

/// The refusal of a request without an entry id.
fn empty_entry_id() -> Status {
    Status::invalid_argument("entry_id is required")
}

/// What one CSR is signed for: the entry's SPIFFE ID, DNS names and X509-SVID TTL, or why not.
type Target = Result<(SpiffeId, Vec<String>, Option<Duration>), Status>;

/// Fewest CSRs worth a blocking-pool task of their own (below this the hand-off costs more
/// than the parallelism gains).
pub(super) const MIN_SIGN_CHUNK: usize = 32;

/// How many blocking-pool tasks a batch's signing is spread over: the cores this process may
/// use (read once).
fn sign_parallelism() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Signs each CSR of `jobs` for its target, one result per job in order.
fn sign_all(ca: &crate::ca::Ca, jobs: Vec<(pb::SignRequest, Target)>) -> Vec<pb::SignResult> {
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
        .collect()
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
    let n = requests.len();
    // Every entry of the batch in one datastore read, then each authorisation re-checked.
    let mut ids: Vec<String> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for r in &requests {
        if !r.entry_id.is_empty() && seen.insert(&r.entry_id) {
            ids.push(r.entry_id.clone());
        }
    }
    drop(seen);
    let found = state.datastore.get_entries(&ids).await.map_err(ds_status)?;
    if found.len() != ids.len() {
        return Err(Status::internal(format!(
            "the datastore answered {} of {} entries",
            found.len(),
            ids.len()
        )));
    }
    let mut authz = EntryAuthz::new(state, agent);
    let mut targets: HashMap<String, Target> = HashMap::with_capacity(ids.len());
    for (id, entry) in ids.into_iter().zip(found) {
        let target = authz
            .check(&id, entry)
            .await?
            .map(|e| (e.spiffe_id, e.dns_names, e.x509_svid_ttl));
        targets.insert(id, target);
    }
    let jobs: Vec<(pb::SignRequest, Target)> = requests
        .into_iter()
        .map(|r| {
            let target = if r.entry_id.is_empty() {
                Err(empty_entry_id())
            } else {
                targets
                    .get(&r.entry_id)
                    .cloned()
                    .unwrap_or_else(|| Err(Status::internal("entry lookup lost")))
            };
            (r, target)
        })
        .collect();
    // Signing is CPU work: off the async workers, spread over the cores in consecutive chunks
    // whose results are joined back in order.
    let chunk = jobs.len().div_ceil(sign_parallelism()).max(MIN_SIGN_CHUNK);
    let mut tasks = Vec::new();
    let mut jobs = jobs.into_iter();
    loop {
        let part: Vec<_> = jobs.by_ref().take(chunk).collect();
        if part.is_empty() {
            break;
        }
        let ca = state.ca.clone();
        tasks.push(tokio::task::spawn_blocking(move || sign_all(&ca, part)));
    }
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.extend(
            t.await
                .map_err(|e| Status::internal(format!("signing task failed: {e}")))?,
        );
    }
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
