//! The agent's admin API on its local Unix socket (directory 0700): what the agent holds, for
//! `sigil-agent status`, and why a process gets an SVID or not, for `sigil-agent explain`.
//! Never returns key material.

use std::sync::Arc;

use sigil::proto::agent_admin as pb;
use tonic::{Request, Response, Status};

use crate::sync::worker::AgentState;
use crate::workload_attestor::{AttestError, ExeHash, ProcessPin, WorkloadAttestor};

/// The `sigil.agent.v1.AgentAdmin` service.
pub struct AgentAdminService {
    state: Arc<AgentState>,
    attestor: Arc<WorkloadAttestor>,
}

impl AgentAdminService {
    /// Wraps the shared agent state; `attestor` is the one the Workload API uses.
    pub fn new(state: Arc<AgentState>, attestor: Arc<WorkloadAttestor>) -> Self {
        Self { state, attestor }
    }
}

fn leaf_serial(leaf: &[u8]) -> String {
    x509_parser::parse_x509_certificate(leaf)
        .ok()
        .map(|(_, c)| c.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl pb::agent_admin_server::AgentAdmin for AgentAdminService {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let only = match req.into_inner().spiffe_id.as_str() {
            "" => None,
            s => Some(
                sigil::SpiffeId::parse(s)
                    .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?,
            ),
        };
        let wanted =
            |e: &sigil::entry::RegistrationEntry| only.as_ref().is_none_or(|id| e.spiffe_id == *id);
        let identity = self.state.identity.read().await.clone();
        let refused = self.state.refused.read().await.clone().unwrap_or_default();
        let sync = self.state.sync_status();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let cache = self.state.snapshot();
        // For one SPIFFE ID, walk the entries (a compare each) rather than join every SVID
        // with its entry: polling one identity stays cheap at 100,000 entries.
        let selected: Box<dyn Iterator<Item = _>> = match &only {
            Some(_) => Box::new(
                cache
                    .entries()
                    .filter(|e| wanted(e))
                    .filter_map(|e| cache.svid(&e.id).map(|s| (e, s))),
            ),
            None => Box::new(cache.svids()),
        };
        let mut svids: Vec<pb::CachedSvid> = selected
            .map(|(e, s)| pb::CachedSvid {
                entry_id: e.id.clone(),
                spiffe_id: e.spiffe_id.to_string(),
                serial: leaf_serial(&s.leaf_der()),
                not_after: s.not_after,
                refresh_at: s.refresh_at,
            })
            .collect();
        svids.sort_by(|a, b| {
            a.spiffe_id
                .cmp(&b.spiffe_id)
                .then(a.entry_id.cmp(&b.entry_id))
        });
        let backoff = |entry_id: String, spiffe_id: String, r: &crate::sync::cache::SignRetry| {
            pb::SignBackoff {
                entry_id,
                spiffe_id,
                failures: r.failures,
                last_error: r.reason.clone(),
                next_retry_at: r.retry_at,
                failing_since: r.since,
            }
        };
        let mut sign_backoff: Vec<pb::SignBackoff> = cache
            .sign_backoff()
            .filter(|(e, _)| wanted(e))
            .map(|(e, r)| backoff(e.id.clone(), e.spiffe_id.to_string(), r))
            .collect();
        sign_backoff.sort_by(|a, b| {
            a.spiffe_id
                .cmp(&b.spiffe_id)
                .then(a.entry_id.cmp(&b.entry_id))
        });
        let agent_svid_renewal_backoff = self
            .state
            .agent_svid_renewal()
            .map(|r| backoff(String::new(), identity.spiffe_id.to_string(), &r));
        Ok(Response::new(pb::StatusResponse {
            spiffe_id: identity.spiffe_id.to_string(),
            agent_svid_expires_at: identity.not_after,
            synced: cache.has_snapshot(),
            revision: cache.revision(),
            bundle_sequence: cache.bundle_sequence(),
            entries: cache.entry_count() as u64,
            refused,
            svids,
            // BTreeMap keys: already sorted.
            federated_trust_domains: cache.federated_bundles().keys().cloned().collect(),
            last_sync_at: sync.last_sync_at(now).unwrap_or(0),
            sync_state: sync.state_name().to_string(),
            sync_state_since: sync.since().unwrap_or(0),
            sync_error: sync.last_error().unwrap_or_default().to_string(),
            server: sync.server().unwrap_or_default().to_string(),
            agent_svid_serial: identity.serial_hex.clone(),
            sign_backoff,
            agent_svid_renewal_backoff,
        }))
    }

    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let pid = req.into_inner().pid;
        if pid <= 0 {
            return Err(Status::invalid_argument(format!(
                "--pid must be a positive process id, got {pid}"
            )));
        }
        let pinned = tokio::task::spawn_blocking(move || {
            let pin = ProcessPin::pin(pid)?;
            let (uid, gid) = crate::workload_attestor::process::effective_ids_in(
                std::path::Path::new(crate::workload_attestor::process::DEFAULT_PROC_ROOT),
                pid,
            )?;
            Ok((std::sync::Arc::new(pin), uid, gid))
        })
        .await
        .map_err(|e| Status::internal(format!("attestation task failed: {e}")))?;
        // Same path as the Workload API: /proc, then the kubelet (k8s attestor), pin re-checked.
        let attested = match pinned {
            // Every selector, `unix:sha256` included even when no entry needs it.
            Ok((pin, uid, gid)) => {
                self.attestor
                    .attest_async_with(pin, uid, gid, ExeHash::Always)
                    .await
            }
            Err(e) => Err(e),
        }
        .map_err(|e| match e {
            AttestError::Gone { .. } => Status::not_found(format!(
                "no process with pid {pid} (or it exited meanwhile)"
            )),
            AttestError::Task(_) | AttestError::HashNotComputed => Status::internal(e.to_string()),
            other => Status::failed_precondition(format!(
                "cannot attest pid {pid}: {other} (is the agent allowed to read /proc/{pid}?)"
            )),
        })?;
        let cache = self.state.snapshot();
        let x = crate::explain::explain(&cache, &attested.selectors);
        Ok(Response::new(pb::ExplainResponse {
            pid,
            selectors: attested.selectors.iter().map(ToString::to_string).collect(),
            matches: x
                .matches
                .into_iter()
                .map(|m| pb::ExplainMatch {
                    entry_id: m.entry_id,
                    spiffe_id: m.spiffe_id,
                    svid_ready: m.svid_ready,
                })
                .collect(),
            near_misses: x
                .near_misses
                .into_iter()
                .map(|n| pb::ExplainNearMiss {
                    entry_id: n.entry_id,
                    spiffe_id: n.spiffe_id,
                    missing: n
                        .missing
                        .into_iter()
                        .map(|m| pb::ExplainMissing {
                            selector: m.selector,
                            process_has: m.process_has,
                        })
                        .collect(),
                })
                .collect(),
            entries_held: x.entries_held as u64,
            synced: cache.has_snapshot(),
        }))
    }
}
