//! The agent's worker: one task that keeps the cache in step with the server.
//!
//! A *session* is one mTLS connection: open the sync stream (sending the revision and bundle
//! sequence already held, so a reconnect is incremental), then `select!` over sync messages,
//! the next SVID refresh time, the agent SVID's renewal time and shutdown. Due SVIDs are signed
//! in one `BatchSign` call. When a session fails the cache keeps serving what it holds and the
//! worker reconnects with exponential back-off and jitter, logging at a sane rate. Renewing the
//! agent SVID supersedes the certificate of the current connection, so it ends the session and
//! the next one connects with the new SVID at once.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use sigil::proto::node as pb;
use sigil::proto::node::node_client::NodeClient;
use sigil::tls::{IdentityStore, TrustStore};
use sigil::TrustDomain;
use tokio::sync::{watch, RwLock};
use tonic::transport::Channel;

use crate::cache::Cache;
use crate::client::{self, ClientError};
use crate::storage::{AgentIdentity, Storage};

/// First retry delay.
pub const BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Most SVIDs per BatchSign call.
pub const SIGN_BATCH: usize = 500;

/// Shared agent state (read by the health endpoint, the admin API and the Workload API).
pub struct AgentState {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Entries, SVIDs, bundle.
    pub cache: RwLock<Cache>,
    /// The agent's current identity.
    pub identity: RwLock<AgentIdentity>,
    /// Set when the server refused the agent (evicted/banned): no new SVIDs are minted.
    pub refused: RwLock<Option<String>>,
    /// Metrics.
    pub metrics: crate::metrics::AgentMetrics,
    /// Bumped after every cache change, so Workload API streams wake and resend.
    pub changes: watch::Sender<u64>,
    /// The state of the sync with the server (readiness and `status`).
    pub sync: std::sync::Mutex<crate::health::SyncStatus>,
    /// The Workload API socket file as bound (readiness checks it is still there and ours).
    pub workload_socket: std::sync::Mutex<Option<crate::health::SocketId>>,
}

impl AgentState {
    /// Fresh state around a cache.
    pub fn new(trust_domain: TrustDomain, identity: AgentIdentity, cache: Cache) -> Self {
        Self {
            trust_domain,
            cache: RwLock::new(cache),
            identity: RwLock::new(identity),
            refused: RwLock::new(None),
            metrics: crate::metrics::AgentMetrics::new(),
            changes: watch::channel(0).0,
            sync: std::sync::Mutex::new(crate::health::SyncStatus::default()),
            workload_socket: std::sync::Mutex::new(None),
        }
    }

    /// A copy of the sync state.
    pub fn sync_status(&self) -> crate::health::SyncStatus {
        self.sync.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update_sync(&self, f: impl FnOnce(&mut crate::health::SyncStatus)) {
        f(&mut self.sync.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Tells every watcher that the cache changed.
    pub fn notify_changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// Where the worker connects and what it presents.
pub struct Worker {
    /// Shared state.
    pub state: Arc<AgentState>,
    /// Server address.
    pub server_address: String,
    /// TLS identity presented to the server (rotated on renewal).
    pub tls_identity: Arc<IdentityStore>,
    /// Roots the server is verified with (updated from sync).
    pub trust: Arc<TrustStore>,
    /// On-disk state.
    pub storage: Storage,
    /// x509pop material, if configured: lets the agent attest again after an eviction (a join
    /// token is single-use, so a join-token agent cannot).
    pub x509pop: Option<crate::config::X509PopConfig>,
    /// k8s_psat settings, if configured: like x509pop, the agent attests again after an
    /// eviction, with the token file read afresh (the kubelet rotates projected tokens).
    pub k8s_psat: Option<crate::config::K8sPsatConfig>,
}

/// Exponential back-off with full jitter.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    /// Failures since the last success.
    pub failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: BACKOFF_START,
            failures: 0,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt (random in `[next/2, next]`), doubling `next`.
    pub fn delay(&mut self) -> Duration {
        self.failures += 1;
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let half = d / 2;
        half + half.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    /// After a success.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Log the 1st, 2nd, 4th, 8th... failure at warn level, the rest at debug: an outage of
    /// hours costs a handful of lines, not thousands.
    pub fn should_warn(&self) -> bool {
        self.failures.is_power_of_two()
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The agent SVID the worker last saw and when it first saw it: its renewal counts from then
/// (receipt), not from its back-dated NotBefore.
#[derive(Debug, Default)]
struct AgentSvidSeen {
    serial_hex: String,
    received_at: i64,
}

impl AgentSvidSeen {
    /// When to renew `id` (noting it as received `now` if it is new to the worker).
    fn renew_at(&mut self, id: &AgentIdentity, now: i64) -> i64 {
        if id.serial_hex != self.serial_hex {
            self.serial_hex = id.serial_hex.clone();
            self.received_at = now;
        }
        crate::cache::agent_svid_renew_at(self.received_at, id.not_after)
    }
}

/// How a session ended.
enum SessionEnd {
    /// The agent SVID was renewed: reconnect now.
    Renewed,
    /// Shutdown requested.
    Shutdown,
}

impl Worker {
    /// Runs until `shutdown` becomes true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::default();
        let mut agent_svid = AgentSvidSeen::default();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let result = self
                .session(&mut shutdown, &mut backoff, &mut agent_svid)
                .await;
            if let Err(e) = &result {
                self.state
                    .update_sync(|s| s.disconnected(now_unix(), &e.to_string()));
            }
            // An expired agent SVID cannot open a session (the server refuses it): attest
            // again if the method allows, else stop minting — not a retry loop, and not
            // reported as an eviction.
            let expired_at = {
                let id = self.state.identity.read().await;
                (id.not_after <= now_unix()).then_some(id.not_after)
            };
            match result {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Renewed) => continue,
                Err(e)
                    if (e.is_permission_denied() || expired_at.is_some())
                        && (self.x509pop.is_some() || self.k8s_psat.is_some()) =>
                {
                    self.state.metrics.sync_failures.inc();
                    let delay = backoff.delay();
                    let method = if self.k8s_psat.is_some() {
                        "k8s_psat"
                    } else {
                        "x509pop"
                    };
                    if expired_at.is_some() {
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "the agent SVID has expired; attesting again with {method}");
                    } else {
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "sigil-server refused this agent; attesting again with {method}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
                    }
                    let again = if self.k8s_psat.is_some() {
                        self.reattest_k8s_psat().await
                    } else {
                        self.reattest_x509pop().await
                    };
                    match again {
                        Ok(()) => continue,
                        Err(e2) if e2.is_permission_denied() => {
                            self.give_up(&e2, None, &mut shutdown).await;
                            return;
                        }
                        // Unreachable server, API server trouble, an unreadable file: the
                        // next round (with a longer back-off) tries again.
                        Err(e2) => {
                            tracing::warn!(error = %e2, "attesting again with {method} failed; retrying");
                            continue;
                        }
                    }
                }
                Err(e) if e.is_permission_denied() || expired_at.is_some() => {
                    self.give_up(&e, expired_at, &mut shutdown).await;
                    return;
                }
                Err(e) => {
                    self.state.metrics.sync_failures.inc();
                    let delay = backoff.delay();
                    if backoff.should_warn() {
                        tracing::warn!(error = %e, failures = backoff.failures, retry_in_ms = delay.as_millis() as u64, "sync with sigil-server failed; serving cached SVIDs and retrying");
                    } else {
                        tracing::debug!(error = %e, failures = backoff.failures, "sync retry");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
                    }
                }
            }
        }
    }

    /// The server refused us for good (`expired_at`: because our SVID expired at that time):
    /// stop minting, keep serving the cache until it expires.
    async fn give_up(
        &self,
        e: &ClientError,
        expired_at: Option<i64>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let why = match expired_at {
            Some(t) => {
                tracing::error!(error = %e, expired_at = t, "the agent SVID has expired and could not be renewed (sigil-server unreachable, or its CA expired); no new SVIDs will be minted — cached SVIDs are served until they expire; a join token is single-use: restart the agent with a new join token");
                format!(
                    "the agent SVID expired at {}; attest again with a new join token",
                    crate::cli::time_text(t)
                )
            }
            None => {
                tracing::error!(error = %e, "sigil-server refused this agent (evicted or banned); no new SVIDs will be minted — cached SVIDs are served until they expire; re-attest with a new join token or x509pop");
                e.to_string()
            }
        };
        *self.state.refused.write().await = Some(why);
        if let Err(e) = self.storage.remove_identity() {
            tracing::warn!(error = %e, "removing the refused agent SVID");
        }
        let _ = shutdown.wait_for(|s| *s).await;
    }

    /// A channel to the server's node API, the server verified against the current bundle;
    /// presenting `identity` (the agent SVID) or none (attestation).
    fn node_channel(
        &self,
        identity: Option<Arc<IdentityStore>>,
    ) -> Result<NodeClient<Channel>, ClientError> {
        client::channel(
            &self.server_address,
            client::verify_server(self.trust.clone(), &self.state.trust_domain),
            identity,
        )
    }

    /// Attests again with the x509pop certificate (re-read from disk: it may have been renewed).
    async fn reattest_x509pop(&self) -> Result<(), ClientError> {
        let Some(cfg) = &self.x509pop else {
            return Err(ClientError::Protocol(
                "no x509pop material configured".into(),
            ));
        };
        let (chain, key) = cfg
            .load()
            .map_err(|e| ClientError::Protocol(format!("{e:#}")))?;
        let mut node = self.node_channel(None)?;
        let td = &self.state.trust_domain;
        let attested = client::attest_x509pop(&mut node, td, chain, &key).await?;
        tracing::info!(spiffe_id = %attested.identity.spiffe_id, "attested again with x509pop");
        self.install_identity(attested.identity).await
    }

    /// Attests again with k8s_psat, reading the token file afresh (it rotates).
    async fn reattest_k8s_psat(&self) -> Result<(), ClientError> {
        let Some(cfg) = &self.k8s_psat else {
            return Err(ClientError::Protocol(
                "no k8s_psat settings configured".into(),
            ));
        };
        let token = cfg
            .load_token()
            .map_err(|e| ClientError::Protocol(format!("{e:#}")))?;
        let mut node = self.node_channel(None)?;
        let td = &self.state.trust_domain;
        let attested = client::attest_k8s_psat(&mut node, td, &cfg.cluster, &token).await?;
        tracing::info!(spiffe_id = %attested.identity.spiffe_id, "attested again with k8s_psat");
        self.install_identity(attested.identity).await
    }

    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
        agent_svid: &mut AgentSvidSeen,
    ) -> Result<SessionEnd, ClientError> {
        let td = &self.state.trust_domain;
        let mut node = self.node_channel(Some(self.tls_identity.clone()))?;
        let (revision, bundle_seq) = {
            let c = self.state.cache.read().await;
            (c.revision(), c.bundle_sequence())
        };
        let mut stream = node
            .sync(pb::SyncRequest {
                known_revision: revision,
                known_bundle_sequence: bundle_seq,
            })
            .await
            .map_err(|status| ClientError::Rpc {
                what: "sync",
                status,
            })?
            .into_inner();
        if backoff.failures > 0 {
            tracing::info!(failures = backoff.failures, "reconnected to sigil-server");
        }
        backoff.reset();
        loop {
            let (next_refresh, renew_at) = {
                let c = self.state.cache.read().await;
                let id = self.state.identity.read().await;
                (c.next_refresh(), agent_svid.renew_at(&id, now_unix()))
            };
            let wake_at = next_refresh.map_or(renew_at, |r| r.min(renew_at));
            let sleep = Duration::from_secs((wake_at - now_unix()).max(0) as u64);
            tokio::select! {
                msg = stream.message() => {
                    let msg = msg.map_err(|status| ClientError::Rpc { what: "sync", status })?;
                    let Some(msg) = msg else {
                        return Err(ClientError::Protocol("sync stream closed by the server".into()));
                    };
                    self.apply(msg).await?;
                    self.state.update_sync(|s| s.synced(now_unix()));
                    self.sign_due(&mut node).await?;
                }
                _ = tokio::time::sleep(sleep) => {
                    if now_unix() >= renew_at {
                        let id = client::renew(&mut node, td).await?;
                        tracing::info!("agent SVID renewed at half its lifetime");
                        self.install_identity(id).await?;
                        return Ok(SessionEnd::Renewed);
                    }
                    self.sign_due(&mut node).await?;
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return Ok(SessionEnd::Shutdown),
            }
        }
    }

    async fn apply(&self, msg: pb::SyncResponse) -> Result<(), ClientError> {
        let mut cache = self.state.cache.write().await;
        let out = cache
            .apply_sync(msg)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if out.bundle_changed {
            if let Some(b) = cache.bundle() {
                match sigil::x509::split_der_concat(&b.x509_roots) {
                    Ok(roots) if !roots.is_empty() => {
                        if let Some(t) = crate::health::earliest_not_after(&roots) {
                            self.state.metrics.bundle_expiry.set(t);
                        }
                        if let Err(e) = self.trust.set(&roots) {
                            tracing::warn!(error = %e, "new trust bundle not usable; keeping the old one");
                        } else if let Err(e) = self.storage.save_bundle(&roots) {
                            tracing::warn!(error = %e, "saving the trust bundle");
                        }
                        tracing::info!(
                            sequence = b.sequence_number,
                            roots = roots.len(),
                            "trust bundle updated"
                        );
                    }
                    _ => tracing::warn!(
                        "server sent an empty or malformed bundle; keeping the old one"
                    ),
                }
            }
        }
        if out.upserted + out.removed > 0 || out.bundle_changed || out.federated_changed {
            self.state.notify_changed();
        }
        let m = &self.state.metrics;
        m.sync_messages.inc();
        m.entries.set(cache.entry_count() as i64);
        m.svids.set(cache.svids().count() as i64);
        if out.upserted + out.removed > 0 || out.bundle_changed || out.federated_changed {
            tracing::info!(
                upserted = out.upserted,
                removed = out.removed,
                federated_trust_domains = cache.federated_bundles().len(),
                entries = cache.entry_count(),
                revision = cache.revision(),
                "entries synced"
            );
        }
        Ok(())
    }

    /// Signs every due SVID, in batches.
    async fn sign_due(
        &self,
        node: &mut sigil::proto::node::node_client::NodeClient<tonic::transport::Channel>,
    ) -> Result<(), ClientError> {
        let due = self.state.cache.read().await.due(now_unix());
        for ids in due.chunks(SIGN_BATCH) {
            let pending = self.state.cache.read().await.make_csrs(ids)?;
            if pending.is_empty() {
                continue;
            }
            let requests = pending
                .iter()
                .map(|p| pb::SignRequest {
                    entry_id: p.entry_id.clone(),
                    csr: p.csr_der.clone(),
                })
                .collect();
            let results = node
                .batch_sign(pb::BatchSignRequest { requests })
                .await
                .map_err(|status| ClientError::Rpc {
                    what: "batch signing",
                    status,
                })?
                .into_inner()
                .results;
            let now = now_unix();
            let mut cache = self.state.cache.write().await;
            let mut signed: u64 = 0;
            // Renewals that do not outlive the SVID they replace (a CA about to expire caps
            // every lifetime): the refresh floor keeps them from looping; say why once.
            let mut not_longer: Option<i64> = None;
            let mut results = results.into_iter();
            for p in pending {
                let (id, revision) = (p.entry_id.clone(), p.entry_revision);
                let Some(r) = results.next() else {
                    cache.note_sign_failure(&id, revision, now);
                    tracing::warn!(entry_id = %id, "server sent no signing result for an SVID");
                    continue;
                };
                if r.entry_id != id {
                    return Err(ClientError::Protocol(
                        "batch signing results out of order".into(),
                    ));
                }
                if r.code != 0 {
                    cache.note_sign_failure(&id, revision, now);
                    tracing::warn!(entry_id = %r.entry_id, code = r.code, message = %r.message, retry_in_secs = crate::cache::SIGN_RETRY_INTERVAL, "server refused to sign an SVID");
                    continue;
                }
                match sigil::x509::split_der_concat(&r.svid_chain) {
                    Ok(chain) if !chain.is_empty() => {
                        let previous = cache.svid(&id).map(|s| s.not_after);
                        if previous.is_some_and(|t| r.expires_at <= t) {
                            not_longer = Some(r.expires_at);
                        }
                        if cache.store_svid(p, chain, r.expires_at, now) {
                            signed += 1;
                        }
                    }
                    _ => {
                        cache.note_sign_failure(&id, revision, now);
                        tracing::warn!(entry_id = %r.entry_id, "server sent a malformed SVID chain")
                    }
                }
            }
            drop(cache);
            if let Some(t) = not_longer {
                tracing::warn!(
                    not_after = t,
                    min_refresh_interval_secs = crate::cache::MIN_REFRESH_INTERVAL,
                    "renewed X509-SVIDs do not outlive the ones they replace (is sigil-server's CA about to expire?); not renewing them again sooner than the minimum interval"
                );
            }
            if signed > 0 {
                self.state.notify_changed();
            }
            self.state.metrics.svids_minted.inc_by(signed);
            self.state
                .metrics
                .svids
                .set(self.state.cache.read().await.svids().count() as i64);
            tracing::info!(signed, "X509-SVIDs minted");
        }
        Ok(())
    }

    async fn install_identity(&self, id: AgentIdentity) -> Result<(), ClientError> {
        self.storage
            .save_identity(&id)
            .map_err(|e| ClientError::Protocol(format!("saving the renewed agent SVID: {e}")))?;
        self.tls_identity
            .set(id.chain_der.clone(), id.key_pkcs8_der.clone())
            .map_err(|e| {
                ClientError::Protocol(format!("installing the renewed agent SVID: {e}"))
            })?;
        tracing::info!(spiffe_id = %id.spiffe_id, not_after = id.not_after, "agent SVID installed");
        self.state.metrics.agent_svid_expiry.set(id.not_after);
        *self.state.identity.write().await = id;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::default();
        let mut prev_cap = Duration::ZERO;
        for i in 0..20 {
            let d = b.delay();
            let cap = (BACKOFF_START * 2u32.saturating_pow(i)).min(BACKOFF_MAX);
            assert!(
                d <= cap && d >= cap / 2,
                "attempt {i}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
            assert!(cap >= prev_cap);
            prev_cap = cap;
        }
        assert_eq!(b.failures, 20);
        assert!(b.should_warn() == 20u32.is_power_of_two());
        b.reset();
        assert_eq!(b.failures, 0);
        assert!(b.delay() <= BACKOFF_START);
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut b = Backoff::default();
        let warned: Vec<u32> = (0..100)
            .filter_map(|_| {
                b.delay();
                b.should_warn().then_some(b.failures)
            })
            .collect();
        assert_eq!(warned, vec![1, 2, 4, 8, 16, 32, 64]);
    }
}
