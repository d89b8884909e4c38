//! The agent's worker: one task that keeps the cache in step with the server.
//!
//! A *session* is one mTLS connection: open the sync stream (sending the revision and bundle
//! sequence already held: the server skips an unchanged bundle, and starts every stream with a
//! full entry snapshot), then `select!` over sync messages, the next SVID refresh time, the
//! agent SVID's renewal time and shutdown. Due SVIDs are signed in `BatchSign` calls of up to
//! [`SIGN_BATCH`], pipelined: the next batch's keys are made while up to [`SIGN_IN_FLIGHT`]
//! calls are being signed. When a session fails the cache keeps serving what it holds and the
//! worker reconnects with exponential back-off and jitter, logging at a sane rate. A renewed
//! agent SVID is saved to disk before it is used: the session then ends and the next one
//! connects with the new SVID at once (the server makes it current on that first use). If the
//! save fails (full disk, read-only directory), the agent goes on with the current SVID, which
//! the server keeps accepting until the new one is used, and retries the save with back-off;
//! only when the current SVID is about to expire does it switch to the unsaved one.
//!
//! A signing that fails — an entry's SVID the server refused, a BatchSign call that failed, or
//! the agent SVID's renewal — is retried on its own timer with exponential back-off and jitter
//! ([`crate::sync::cache::sign_backoff_delay`]), logged at warn when it starts failing (or fails for
//! another reason), at debug when it fails again the same way, and at info when it recovers.
//! Only a refusal of the agent itself (PermissionDenied, Unauthenticated) ends the session.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::StreamExt as _;
use rand::Rng as _;
use sigil::clock::Clock;
use sigil::proto::node as pb;
use sigil::proto::AgentRefusal;
use sigil::tls::{IdentityStore, TrustStore};
use sigil::TrustDomain;
use tokio::sync::{watch, RwLock};
use tokio::time::Instant;

use crate::node_attestor::NodeAttestation;
use crate::sync::cache::{
    make_csrs_for, Cache, Changes, PendingCsr, SignFailureKind, SignRetry, Snapshot,
};
use crate::sync::client::ClientError;
use crate::sync::node_api::{NodeApi, NodeSession};
use crate::sync::storage::{AgentIdentity, Storage, StorageError};
use crate::sync::watchers::Watchers;

/// First retry delay.
pub const BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Most SVIDs per BatchSign call.
pub const SIGN_BATCH: usize = 500;
/// Most BatchSign calls in flight at once: one being signed while the server reads the next
/// and the agent stores the previous one, so that neither side waits for the other.
pub const SIGN_IN_FLIGHT: usize = 2;

/// Shared agent state (read by the health endpoint, the admin API and the Workload API).
pub struct AgentState {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// The cache as the worker published it last (entries, SVIDs, bundles).
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The Workload API streams to wake when the cache changes.
    pub watchers: Watchers,
    /// The agent's current identity.
    pub identity: RwLock<AgentIdentity>,
    /// Set when the server refused the agent (evicted/banned): no new SVIDs are minted.
    pub refused: RwLock<Option<String>>,
    /// Metrics.
    pub metrics: crate::metrics::AgentMetrics,
    /// The state of the sync with the server (readiness and `status`).
    pub sync: std::sync::Mutex<crate::health::SyncStatus>,
    /// The Workload API socket file as bound (readiness checks it is still there and ours).
    pub workload_socket: std::sync::Mutex<Option<crate::health::SocketId>>,
    /// The agent SVID's renewal while it keeps failing (`status`).
    pub agent_svid_renewal: std::sync::Mutex<Option<SignRetry>>,
}

impl AgentState {
    /// Fresh state, with an empty cache.
    pub fn new(trust_domain: TrustDomain, identity: AgentIdentity) -> Self {
        Self {
            trust_domain,
            snapshot: watch::channel(Arc::new(Snapshot::default())).0,
            watchers: Watchers::new(),
            identity: RwLock::new(identity),
            refused: RwLock::new(None),
            metrics: crate::metrics::AgentMetrics::new(),
            sync: std::sync::Mutex::new(crate::health::SyncStatus::default()),
            workload_socket: std::sync::Mutex::new(None),
            agent_svid_renewal: std::sync::Mutex::new(None),
        }
    }

    /// A copy of the agent SVID's renewal back-off, while renewing keeps failing.
    pub fn agent_svid_renewal(&self) -> Option<SignRetry> {
        self.agent_svid_renewal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_agent_svid_renewal(&self, retry: Option<SignRetry>) {
        *self
            .agent_svid_renewal
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = retry;
    }

    /// A copy of the sync state.
    pub fn sync_status(&self) -> crate::health::SyncStatus {
        self.sync.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update_sync(&self, f: impl FnOnce(&mut crate::health::SyncStatus)) {
        f(&mut self.sync.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The cache as last published.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that sees every snapshot published from now on.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// Publishes `snapshot` and wakes the Workload API streams `changes` concern; returns how
    /// many were woken.
    pub fn publish(&self, snapshot: Snapshot, changes: &Changes) -> usize {
        self.snapshot.send_replace(Arc::new(snapshot));
        self.watchers.wake(changes)
    }
}

/// The worker: owns the cache, talks to the server, publishes snapshots.
pub struct Worker {
    /// Shared state.
    pub state: Arc<AgentState>,
    /// The server's node API.
    pub node: Arc<dyn NodeApi>,
    /// The cache (only the worker changes it; readers see the snapshots it publishes).
    pub cache: Cache,
    /// Where Unix time is read.
    pub clock: Clock,
    /// TLS identity presented to the server (rotated on renewal).
    pub tls_identity: Arc<IdentityStore>,
    /// Roots the server is verified with (updated from sync).
    pub trust: Arc<TrustStore>,
    /// On-disk state.
    pub storage: Storage,
    /// The node attestation method, if configured: x509pop and k8s_psat let the agent attest
    /// again after an eviction, with the material read afresh (a join token is single-use, so a
    /// join-token agent cannot).
    pub attestation: Option<NodeAttestation>,
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

    /// A short random delay (at most [`BACKOFF_START`]) before trying another server: spreads
    /// the agents of a failed server over time without making them wait.
    pub fn quick() -> Duration {
        BACKOFF_START.mul_f64(rand::rng().random_range(0.0..=1.0))
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

/// The agent SVID the worker last saw and when it first saw it: its renewal counts from then
/// (receipt), not from its back-dated NotBefore. Failed renewals of it back off (kept across
/// sessions: a reconnect does not make a refused renewal due again).
#[derive(Debug, Default)]
struct AgentSvidSeen {
    serial_hex: String,
    received_at: i64,
    retry: Option<SignRetry>,
}

impl AgentSvidSeen {
    /// When to renew `id` (noting it as received `now` if it is new to the worker): at half its
    /// life, not before the retry time of a failed renewal of it.
    fn renew_at(&mut self, id: &AgentIdentity, now: i64) -> i64 {
        if id.serial_hex != self.serial_hex {
            self.serial_hex = id.serial_hex.clone();
            self.received_at = now;
            self.retry = None;
        }
        let at = crate::sync::cache::agent_svid_renew_at(self.received_at, id.not_after);
        self.retry.as_ref().map_or(at, |r| at.max(r.retry_at))
    }

    /// Records a failed renewal at `now`.
    fn note_failure(&mut self, reason: &str, now: i64) -> (SignRetry, SignFailureKind) {
        let (retry, kind) = SignRetry::after_failure(
            self.retry.as_ref(),
            reason,
            now,
            crate::sync::cache::sign_backoff_jitter(),
        );
        self.retry = Some(retry.clone());
        (retry, kind)
    }
}

/// A renewed agent SVID that could not be saved yet, retried with back-off.
struct PendingRenewal {
    identity: AgentIdentity,
    /// In use already: the current SVID was about to expire before the save succeeded.
    in_use: bool,
    backoff: Backoff,
    retry_at: Instant,
}

/// True when an agent SVID valid from `not_before` to `not_after` has less than a tenth of its
/// lifetime left at `now`: time to use a renewed SVID even if it could not be saved.
fn nearly_expired(now: i64, not_before: i64, not_after: i64) -> bool {
    now >= not_after - (not_after - not_before).max(0) / 10
}

/// What the log and the status say when the server refused this agent for good; `serial` is
/// the agent SVID we presented.
fn refusal_message(e: &ClientError, serial: &str) -> String {
    let what = match e.refusal() {
        Some(AgentRefusal::Evicted) => {
            "sigil-server does not know this agent (it was evicted)".to_string()
        }
        Some(AgentRefusal::Banned) => "sigil-server has banned this agent".to_string(),
        Some(AgentRefusal::Superseded) => format!(
            "sigil-server refused our agent SVID serial {serial}: it is not the current one (a \
             later renewal or attestation of this agent replaced it)"
        ),
        None => "sigil-server refused this agent".to_string(),
    };
    format!("{what}: {e}")
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
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::default();
        let mut agent_svid = AgentSvidSeen::default();
        let mut pending = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let server = self.node.server();
            let result = self
                .session(&mut shutdown, &mut backoff, &mut agent_svid, &mut pending)
                .await;
            if let Err(e) = &result {
                self.state
                    .update_sync(|s| s.disconnected(self.clock.now_unix(), &e.to_string()));
            }
            // An expired agent SVID cannot open a session (the server refuses it): attest
            // again if the method allows, else stop minting — not a retry loop, and not
            // reported as an eviction.
            let expired_at = {
                let id = self.state.identity.read().await;
                (id.not_after <= self.clock.now_unix()).then_some(id.not_after)
            };
            match result {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Renewed) => continue,
                Err(e)
                    if (e.is_permission_denied() || expired_at.is_some())
                        && self
                            .attestation
                            .as_ref()
                            .is_some_and(NodeAttestation::can_attest_again) =>
                {
                    self.state.metrics.sync_failures.inc();
                    let delay = backoff.delay();
                    let method = self.attestation.as_ref().map_or("", NodeAttestation::name);
                    if expired_at.is_some() {
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "the agent SVID has expired; attesting again with {method}");
                    } else {
                        let serial = self.state.identity.read().await.serial_hex.clone();
                        tracing::warn!(reason = %refusal_message(&e, &serial), retry_in_ms = delay.as_millis() as u64, "attesting again with {method}");
                    }
                    // A new attestation replaces any renewal still waiting to be saved.
                    pending = None;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
                    }
                    let again = self.attest_again().await;
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
                    // Another server may be fine (they share the datastore, so the agent SVID
                    // and the cache stay valid): the next session goes there, soon; only a
                    // failed round of every server backs off.
                    let was_connected = backoff.failures == 0;
                    let failover = self.node.server_failed(&server).await;
                    if failover.next != server {
                        if was_connected {
                            tracing::warn!(error = %e, failed = %server, next = %failover.next, "sigil-server connection lost; switching to the next server");
                        } else {
                            tracing::debug!(error = %e, failed = %server, next = %failover.next, "trying the next sigil-server");
                        }
                        if !failover.wrapped {
                            let delay = Backoff::quick();
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
                            }
                            continue;
                        }
                    }
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
                let serial = self.state.identity.read().await.serial_hex.clone();
                let why = refusal_message(e, &serial);
                tracing::error!(reason = %why, refusal = ?e.refusal().map(AgentRefusal::as_str), "sigil-server refused this agent for good; no new SVIDs will be minted — cached SVIDs are served until they expire; attest again (a new join token, or x509pop / k8s_psat)");
                why
            }
        };
        *self.state.refused.write().await = Some(why);
        if let Err(e) = self.on_disk(|s| s.remove_identity()).await {
            tracing::warn!(error = %e, "removing the refused agent SVID");
        }
        let _ = shutdown.wait_for(|s| *s).await;
    }

    /// Attests again with the configured method, its material read afresh (an x509pop
    /// certificate may have been renewed; the kubelet rotates projected tokens).
    async fn attest_again(&self) -> Result<(), ClientError> {
        let Some(method) = &self.attestation else {
            return Err(ClientError::NotConfigured("node attestation"));
        };
        let attested = self.node.attest(method).await?;
        tracing::info!(spiffe_id = %attested.identity.spiffe_id, "attested again with {}", method.name());
        self.install_identity(attested.identity).await
    }

    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
        agent_svid: &mut AgentSvidSeen,
        pending: &mut Option<PendingRenewal>,
    ) -> Result<SessionEnd, ClientError> {
        let server = self.node.server();
        self.state.update_sync(|s| s.set_server(&server));
        let mut node = self.node.session()?;
        let (known_revision, known_roots) = self.cache.resume_point();
        let mut stream = node
            .sync(pb::SyncRequest {
                known_revision,
                known_bundle_sequence: self.cache.bundle_sequence(),
                known_roots,
            })
            .await?;
        if backoff.failures > 0 {
            tracing::info!(failures = backoff.failures, server = %server, "reconnected to sigil-server");
        } else {
            tracing::info!(server = %server, "sync session with sigil-server open");
        }
        backoff.reset();
        loop {
            let (next_refresh, renew_at) = {
                let id = self.state.identity.read().await;
                let now = self.clock.now_unix();
                let mut renew_at = agent_svid.renew_at(&id, now);
                // Issued by a tainted authority: renewed now (after any failure's back-off).
                if id
                    .chain_der
                    .first()
                    .is_some_and(|l| self.cache.issued_by_tainted(l))
                {
                    let not_before = agent_svid.retry.as_ref().map_or(now, |r| r.retry_at);
                    renew_at = renew_at.min(now.max(not_before));
                }
                // While a snapshot's chunks arrive, signing waits for the last one: it would
                // hold up reading them.
                let next_refresh = if self.cache.snapshot_in_progress() {
                    None
                } else {
                    self.cache.next_refresh()
                };
                (next_refresh, renew_at)
            };
            if agent_svid.retry.is_none() {
                // A new agent SVID (attested again) ends a renewal back-off.
                self.state.set_agent_svid_renewal(None);
            }
            // While a renewed SVID waits to be saved, the next renewal waits for it.
            let may_renew = pending.as_ref().is_none_or(|p| p.in_use);
            let wake_at = match (next_refresh, may_renew) {
                (Some(r), true) => r.min(renew_at),
                (None, true) => renew_at,
                (Some(r), false) => r,
                (None, false) => self.clock.now_unix() + 3600,
            };
            let mut sleep = Duration::from_secs((wake_at - self.clock.now_unix()).max(0) as u64);
            if let Some(p) = pending.as_ref() {
                sleep = sleep.min(p.retry_at.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                msg = stream.message() => {
                    let Some(msg) = msg? else {
                        return Err(ClientError::SyncClosed);
                    };
                    self.apply(msg).await?;
                    self.state.update_sync(|s| s.synced(self.clock.now_unix()));
                    if !self.cache.snapshot_in_progress() {
                        self.sign_due(node.as_mut()).await?;
                    }
                }
                _ = tokio::time::sleep(sleep) => {
                    if pending.as_ref().is_some_and(|p| Instant::now() >= p.retry_at)
                        && self.retry_save(pending).await?
                    {
                        return Ok(SessionEnd::Renewed);
                    }
                    if may_renew && self.clock.now_unix() >= renew_at {
                        match node.renew().await {
                            Ok(id) => {
                                match agent_svid.retry.take() {
                                    Some(r) => tracing::info!(serial = %id.serial_hex, failures = r.failures, failing_since = r.since, "agent SVID renewed after failed attempts"),
                                    None => tracing::info!(serial = %id.serial_hex, "agent SVID renewed at half its lifetime"),
                                }
                                self.state.set_agent_svid_renewal(None);
                                if self.save_renewed(id, pending).await? {
                                    return Ok(SessionEnd::Renewed);
                                }
                            }
                            // Refused for good: the session ends (re-attestation or give up).
                            Err(e) if e.is_permission_denied() => return Err(e),
                            Err(e) => self.renewal_failed(agent_svid, &e),
                        }
                    }
                    if !self.cache.snapshot_in_progress() {
                        self.sign_due(node.as_mut()).await?;
                    }
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return Ok(SessionEnd::Shutdown),
            }
        }
    }

    async fn apply(&mut self, msg: pb::SyncResponse) -> Result<(), ClientError> {
        let out = self.cache.apply_sync(msg).map_err(ClientError::Sync)?;
        if out.bundle_changed {
            if let Some(b) = self.cache.bundle() {
                match sigil::x509::split_der_concat(&b.x509_roots) {
                    Ok(roots) if !roots.is_empty() => {
                        let sequence = b.sequence_number;
                        if let Some(t) = crate::health::earliest_not_after(&roots) {
                            self.state.metrics.bundle_expiry.set(t);
                        }
                        let count = roots.len();
                        if let Err(e) = self.trust.set(&roots) {
                            tracing::warn!(error = %e, "new trust bundle not usable; keeping the old one");
                        } else if let Err(e) = self.on_disk(move |s| s.save_bundle(&roots)).await {
                            tracing::warn!(error = %e, "saving the trust bundle");
                        }
                        tracing::info!(
                            sequence,
                            roots = count,
                            tainted_authorities = b.tainted_x509_authorities.len(),
                            svids_reminted = out.tainted_svids,
                            "trust bundle updated"
                        );
                    }
                    _ => tracing::warn!(
                        "server sent an empty or malformed bundle; keeping the old one"
                    ),
                }
            }
        }
        self.publish();
        let cache = &self.cache;
        let m = &self.state.metrics;
        m.sync_messages.inc();
        m.entries.set(cache.entry_count() as i64);
        m.svids.set(cache.svid_count() as i64);
        // A changed or removed entry is no longer backing off.
        m.svid_sign_backoff_entries
            .set(cache.sign_backoff().count() as i64);
        if out.resumed {
            tracing::info!(
                upserted = out.upserted,
                removed = out.removed,
                revision = cache.revision(),
                "sync resumed from the entries held"
            );
        } else if out.complete
            && (out.upserted + out.removed > 0 || out.bundle_changed || out.federated_changed)
        {
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

    /// Publishes the cache as it is now, waking the streams its changes concern.
    fn publish(&mut self) {
        let changes = self.cache.take_changes();
        self.state.publish(self.cache.snapshot(), &changes);
    }

    /// Runs `f` on the data directory on the blocking pool (writes fsync).
    async fn on_disk<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Storage) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || f(&storage))
            .await
            .unwrap_or_else(|e| {
                Err(StorageError::Io {
                    op: "writing in",
                    path: self.storage.dir().to_path_buf(),
                    source: std::io::Error::other(format!("the task failed: {e}")),
                })
            })
    }

    /// A renewal of the agent SVID failed (not a refusal of the agent): retried with back-off,
    /// the current SVID used meanwhile.
    fn renewal_failed(&self, agent_svid: &mut AgentSvidSeen, e: &ClientError) {
        let now = self.clock.now_unix();
        let (retry, kind) = agent_svid.note_failure(&e.to_string(), now);
        self.state.metrics.agent_svid_renewal_failures.inc();
        self.state.set_agent_svid_renewal(Some(retry.clone()));
        let retry_in_secs = retry.retry_at - now;
        if kind == SignFailureKind::Repeated {
            tracing::debug!(error = %e, failures = retry.failures, retry_in_secs, "agent SVID renewal failed again");
        } else {
            tracing::warn!(error = %e, failures = retry.failures, retry_in_secs, "agent SVID renewal failed; going on with the current SVID and retrying with back-off");
        }
    }

    /// Signs every due SVID, in batches. A failed signing (refused, or the call failed) puts
    /// the entry in back-off; only a refusal of the agent itself is returned as an error.
    ///
    /// A pipeline, so that the agent's key generation and the server's signing overlap: keys
    /// and CSRs are made on the blocking pool one batch ahead, up to [`SIGN_IN_FLIGHT`]
    /// `BatchSign` calls are in flight, and each batch's outcome is stored and published as it
    /// arrives (in batch order). At most `SIGN_IN_FLIGHT + 1` batches of keys are held at once.
    async fn sign_due(&mut self, node: &mut dyn NodeSession) -> Result<(), ClientError> {
        let node: &dyn NodeSession = node;
        let due = self.cache.due(self.clock.now_unix());
        let mut batches = due.chunks(SIGN_BATCH);
        let mut making = self.make_next_csrs(&mut batches);
        let mut in_flight = FuturesOrdered::new();
        loop {
            tokio::select! {
                // Results first: storing them frees a place for the next call.
                biased;
                Some((pending, results)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.batch_signed(pending, results)?;
                }
                made = async {
                    match making.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                }, if making.is_some() && in_flight.len() < SIGN_IN_FLIGHT => {
                    let pending = made.map_err(ClientError::KeyTask)??;
                    making = self.make_next_csrs(&mut batches);
                    let requests = pending
                        .iter()
                        .map(|p| pb::SignRequest {
                            entry_id: p.entry_id.clone(),
                            csr: p.csr_der.clone(),
                        })
                        .collect();
                    in_flight.push_back(async move { (pending, node.batch_sign(requests).await) });
                }
                else => return Ok(()),
            }
        }
    }

    /// Starts making keys and CSRs for the next batch of `batches` whose entries are still
    /// held, on the blocking pool; `None` when no batch is left.
    fn make_next_csrs(
        &self,
        batches: &mut std::slice::Chunks<'_, crate::sync::cache::EntryId>,
    ) -> Option<tokio::task::JoinHandle<Result<Vec<PendingCsr>, rcgen::Error>>> {
        batches.find_map(|ids| {
            let targets = self.cache.csr_targets(ids);
            (!targets.is_empty())
                .then(|| tokio::task::spawn_blocking(move || make_csrs_for(targets)))
        })
    }

    /// Takes one batch's answer: stores its SVIDs, or puts every entry of a failed call in
    /// back-off, and publishes. Errors: a refusal of the agent, results out of order.
    fn batch_signed(
        &mut self,
        pending: Vec<PendingCsr>,
        results: Result<Vec<pb::SignResult>, ClientError>,
    ) -> Result<(), ClientError> {
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                if e.is_permission_denied() {
                    return Err(e);
                }
                // Every entry of the batch backs off: a call that keeps failing (a server
                // that cannot sign, an answer too large) is not repeated on every wake-up.
                let reason = e.to_string();
                let now = self.clock.now_unix();
                for p in &pending {
                    self.sign_failed(&p.entry_id, p.entry_revision, &reason, now);
                }
                self.update_backoff_gauge();
                self.publish();
                return Ok(());
            }
        };
        let outcome = self.store_signed(pending, results);
        self.update_backoff_gauge();
        // Published even when the results were out of order: what was stored is served.
        self.publish();
        let signed = outcome?;
        self.state.metrics.svids_minted.inc_by(signed);
        self.state.metrics.svids.set(self.cache.svid_count() as i64);
        if signed > 0 {
            tracing::info!(signed, "X509-SVIDs minted");
        }
        Ok(())
    }

    /// Stores the SVIDs of one batch (`results` answer `pending` in order); the number stored.
    fn store_signed(
        &mut self,
        pending: Vec<PendingCsr>,
        results: Vec<pb::SignResult>,
    ) -> Result<u64, ClientError> {
        let now = self.clock.now_unix();
        let mut signed: u64 = 0;
        // Renewals that do not outlive the SVID they replace (a CA about to expire caps
        // every lifetime): the refresh floor keeps them from looping; say why once.
        let mut not_longer: Option<i64> = None;
        let mut results = results.into_iter();
        for p in pending {
            let (id, revision) = (p.entry_id.clone(), p.entry_revision);
            let Some(r) = results.next() else {
                self.sign_failed(
                    &id,
                    revision,
                    "sigil-server sent no signing result for it",
                    now,
                );
                continue;
            };
            if r.entry_id != id {
                return Err(ClientError::SigningOutOfOrder);
            }
            if r.code != 0 {
                let reason = format!(
                    "sigil-server refused to sign it: {} ({:?})",
                    r.message,
                    tonic::Code::from_i32(r.code)
                );
                self.sign_failed(&id, revision, &reason, now);
                continue;
            }
            match sigil::x509::split_der_concat(&r.svid_chain) {
                Ok(chain) if !chain.is_empty() => {
                    let previous = self.cache.svid(&id).map(|s| s.not_after);
                    if previous.is_some_and(|t| r.expires_at <= t) {
                        not_longer = Some(r.expires_at);
                    }
                    // Only an entry that was failing is logged (with its SPIFFE ID).
                    let failed = self.cache.sign_failure(&id).cloned().map(|f| {
                        let spiffe_id = self.cache.entry(&id).map(|e| e.spiffe_id.to_string());
                        (f, spiffe_id)
                    });
                    if self.cache.store_svid(p, chain, r.expires_at, now) {
                        signed += 1;
                        if let Some((f, spiffe_id)) = failed {
                            let spiffe_id = spiffe_id.unwrap_or_default();
                            tracing::info!(entry_id = %id, spiffe_id = %spiffe_id, failures = f.failures, failing_since = f.since, "X509-SVID signed after failed attempts");
                        }
                    }
                }
                _ => self.sign_failed(
                    &id,
                    revision,
                    "sigil-server sent a malformed SVID chain",
                    now,
                ),
            }
        }
        if let Some(t) = not_longer {
            tracing::warn!(
                not_after = t,
                min_refresh_interval_secs = crate::sync::cache::MIN_REFRESH_INTERVAL,
                "renewed X509-SVIDs do not outlive the ones they replace (is sigil-server's CA about to expire?); not renewing them again sooner than the minimum interval"
            );
        }
        Ok(signed)
    }

    /// Records a failed signing of `entry_id` at `revision` and logs it: warn when it is news
    /// (first failure, or another reason), debug when it repeats.
    fn sign_failed(&mut self, entry_id: &str, revision: i64, reason: &str, now: i64) {
        let Some(note) = self
            .cache
            .note_sign_failure(entry_id, revision, reason, now)
        else {
            return;
        };
        self.state.metrics.svid_sign_failures.inc();
        let (failures, retry_in_secs) = (note.retry.failures, note.retry.retry_at - now);
        let held = self.cache.svid(entry_id).map(|s| s.not_after);
        if note.kind == SignFailureKind::Repeated {
            tracing::debug!(entry_id, spiffe_id = %note.spiffe_id, reason, failures, retry_in_secs, "X509-SVID signing failed again");
        } else {
            tracing::warn!(entry_id, spiffe_id = %note.spiffe_id, reason, failures, retry_in_secs, held_svid_not_after = held, "X509-SVID signing failed; retrying with back-off (a held SVID is served until it expires)");
        }
    }

    fn update_backoff_gauge(&self) {
        self.state
            .metrics
            .svid_sign_backoff_entries
            .set(self.cache.sign_backoff().count() as i64);
    }

    /// Saves a renewed SVID and switches to it (true: reconnect), or, if the save fails, keeps
    /// it pending and goes on with the current SVID (false).
    async fn save_renewed(
        &self,
        id: AgentIdentity,
        pending: &mut Option<PendingRenewal>,
    ) -> Result<bool, ClientError> {
        let to_save = id.clone();
        match self.on_disk(move |s| s.save_identity(&to_save)).await {
            Ok(()) => {
                *pending = None;
                self.use_identity(id).await?;
                Ok(true)
            }
            Err(e) => {
                let mut backoff = Backoff::default();
                let delay = backoff.delay();
                let current = self.state.identity.read().await.serial_hex.clone();
                tracing::warn!(error = %e, serial = %id.serial_hex, current_serial = %current, retry_in_ms = delay.as_millis() as u64, "saving the renewed agent SVID failed; going on with the current one (the server accepts it until the renewed one is used) and retrying the save");
                *pending = Some(PendingRenewal {
                    identity: id,
                    in_use: false,
                    backoff,
                    retry_at: Instant::now() + delay,
                });
                Ok(false)
            }
        }
    }

    /// Tries again to save the pending renewed SVID. True when the session must reconnect
    /// with another SVID: the saved one, or the unsaved one because the current SVID is about
    /// to expire.
    async fn retry_save(&self, pending: &mut Option<PendingRenewal>) -> Result<bool, ClientError> {
        let Some(p) = pending.as_mut() else {
            return Ok(false);
        };
        let to_save = p.identity.clone();
        match self.on_disk(move |s| s.save_identity(&to_save)).await {
            Ok(()) => {
                tracing::info!(serial = %p.identity.serial_hex, failed_attempts = p.backoff.failures, "renewed agent SVID saved");
                let in_use = p.in_use;
                let id = p.identity.clone();
                *pending = None;
                if in_use {
                    return Ok(false);
                }
                self.use_identity(id).await?;
                Ok(true)
            }
            Err(e) => {
                let delay = p.backoff.delay();
                p.retry_at = Instant::now() + delay;
                if p.backoff.should_warn() {
                    tracing::warn!(error = %e, failed_attempts = p.backoff.failures, retry_in_ms = delay.as_millis() as u64, "saving the renewed agent SVID failed again; retrying");
                } else {
                    tracing::debug!(error = %e, failed_attempts = p.backoff.failures, "saving the renewed agent SVID failed again");
                }
                if p.in_use {
                    return Ok(false);
                }
                let (not_before, not_after) = {
                    let current = self.state.identity.read().await;
                    (current.not_before, current.not_after)
                };
                if !nearly_expired(self.clock.now_unix(), not_before, not_after) {
                    return Ok(false);
                }
                tracing::warn!(serial = %p.identity.serial_hex, current_not_after = not_after, "the current agent SVID is about to expire and the renewed one is still not saved: using the renewed one from memory; until it is saved, a restart must attest again");
                p.in_use = true;
                let id = p.identity.clone();
                self.use_identity(id).await?;
                Ok(true)
            }
        }
    }

    /// Saves `id` and switches to it (after an attestation).
    async fn install_identity(&self, id: AgentIdentity) -> Result<(), ClientError> {
        let to_save = id.clone();
        self.on_disk(move |s| s.save_identity(&to_save))
            .await
            .map_err(ClientError::Save)?;
        self.use_identity(id).await
    }

    /// Presents `id` on connections from now on.
    async fn use_identity(&self, id: AgentIdentity) -> Result<(), ClientError> {
        self.tls_identity
            .set(id.chain_der.clone(), id.key_pkcs8_der.clone())
            .map_err(ClientError::Install)?;
        tracing::info!(spiffe_id = %id.spiffe_id, serial = %id.serial_hex, not_after = id.not_after, "agent SVID installed");
        self.state.metrics.agent_svid_expiry.set(id.not_after);
        *self.state.identity.write().await = id;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// Test support: the agent's state around a cache that the test changes and publishes itself,
/// as the worker does.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// [`AgentState`] (deref) with the cache behind it.
    pub(crate) struct TestState {
        state: Arc<AgentState>,
        /// The cache; [`TestState::publish`] or [`TestState::notify_changed`] publish it.
        pub(crate) cache: RwLock<Cache>,
    }

    impl std::ops::Deref for TestState {
        type Target = Arc<AgentState>;

        fn deref(&self) -> &Arc<AgentState> {
            &self.state
        }
    }

    impl TestState {
        /// The state of an agent (its own SVID a throwaway) holding `cache`, published.
        pub(crate) fn new(cache: Cache) -> Self {
            let td: TrustDomain = "example.org".parse().unwrap();
            let (identity, _) = crate::sync::storage::tests::identity(&td, "/sigil/agent/test");
            let s = Self {
                state: Arc::new(AgentState::new(td, identity)),
                cache: RwLock::new(cache),
            };
            s.notify_changed();
            s
        }

        /// Publishes the cache and wakes every stream (whatever changed).
        pub(crate) fn notify_changed(&self) {
            let mut cache = self.cache.try_write().expect("the cache is not held");
            cache.take_changes();
            self.state.publish(cache.snapshot(), &Changes::everything());
        }

        /// Publishes the cache and wakes the streams its changes concern, as the worker does;
        /// returns how many were woken.
        pub(crate) fn publish(&self) -> usize {
            let mut cache = self.cache.try_write().expect("the cache is not held");
            let changes = cache.take_changes();
            self.state.publish(cache.snapshot(), &changes)
        }
    }
}
