//! Keeps every federation relationship's bundle fresh.
//!
//! One task per server ([`Refresher::run`]) follows every relationship (the config file's and
//! the datastore's, see `relationship.rs`). For each it fetches the foreign bundle from the
//! bundle endpoint ([`FetchBundle`]), then again after the endpoint's `spiffe_refresh_hint`,
//! clamped to [[`MIN_REFRESH`], [`MAX_REFRESH`]] ([`DEFAULT_REFRESH`] when there is none: SPIRE's
//! default). The floor keeps a misconfigured endpoint from being polled in a loop; the ceiling
//! bounds how late a CA rotation of the other side is noticed.
//!
//! A failed fetch is retried with exponential back-off from [`FIRST_RETRY`] up to
//! [`MAX_RETRY`], each delay shortened by up to a fifth at random so that servers sharing a
//! datastore do not fetch in step. The stored bundle is never touched by a failure: agents keep
//! the last good one. One warning is logged when a relationship starts failing or fails
//! differently (what failed, the URL, the trust domain, when the next attempt is), one info line
//! when it recovers; the repeats are debug.
//!
//! A fetched bundle is written (`set_federated_bundle`) only when its content differs from the
//! stored one, then announced with [`SyncEvents::federated_bundles_changed`], so it reaches
//! agents exactly like one set with `bundle set`. An `https_spiffe` endpoint is authenticated
//! with the stored bundle of its SPIFFE ID's trust domain (usually the foreign trust domain
//! itself): each fetched bundle authenticates the next fetch, so the other side can rotate its
//! CA, as long as the new root is in its bundle before it signs the endpoint's certificate,
//! without anyone copying bundles by hand.
//!
//! [`Federation`] is the handle the rest of the server holds: the config-file relationships,
//! each relationship's [`RefreshStatus`] (shown by `federation show`), and the two ways in:
//! [`Federation::relationships_changed`] (after an admin RPC, or a `federation` change from the
//! PostgreSQL change feed: the list is read again at once, a new or changed relationship is
//! fetched at once) and [`Federation::refresh`] (an immediate fetch, `federation refresh`).
//!
//! Fetches run one after the other inside the task, each bounded by [`FETCH_TIMEOUT`]. Time is
//! tokio's and Unix times come from a [`Clock`], so the tests run on paused time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng as _;
use sigil::bundle::{Bundle, BundleError};
use sigil::clock::Clock;
use sigil::TrustDomain;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use super::relationship::{ConfiguredRelationship, Source};
use super::{fetch::FetchError, EndpointProfile, FetchBundle};
use crate::datastore::{Datastore, DatastoreError, FederationRelationship, StoredBundle};
use crate::metrics::Metrics;
use crate::sync::SyncEvents;

/// Refresh interval when the endpoint gives no `spiffe_refresh_hint` (SPIRE's default).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Shortest refresh interval, whatever the hint says.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Longest refresh interval, whatever the hint says.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// First retry after a failed fetch; doubled on each further failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Longest retry delay after failures.
pub const MAX_RETRY: Duration = Duration::from_secs(300);
/// How long one fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delay after the relationships could not be read from the datastore.
const RELOAD_RETRY: Duration = Duration::from_secs(5);

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The endpoint could not be reached, authenticated or understood.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The endpoint did not answer in time.
    #[error("the bundle endpoint did not answer within {}s", FETCH_TIMEOUT.as_secs())]
    TimedOut,
    /// `https_spiffe` needs a bundle to authenticate the endpoint with, and none is stored.
    #[error(
        "no bundle of trust domain {0} is stored to authenticate the https_spiffe endpoint with; \
         set one with `sigil-server bundle set --id {0}` or give --trust-domain-bundle-path"
    )]
    NoTrustBundle(TrustDomain),
    /// The endpoint served another trust domain's bundle.
    #[error("the endpoint served a bundle of trust domain {got}, not {expected}")]
    WrongTrustDomain {
        /// The relationship's trust domain.
        expected: TrustDomain,
        /// What the bundle said.
        got: TrustDomain,
    },
    /// The endpoint served a bundle with no X.509 root and no JWT key; it is not stored (it
    /// would drop every trust in the foreign trust domain).
    #[error(
        "the endpoint served an empty bundle (no X.509 roots, no JWT keys); keeping the last one"
    )]
    EmptyBundle,
    /// A stored bundle does not parse.
    #[error("the stored bundle of {trust_domain} is unusable: {source}")]
    StoredBundle {
        /// Whose bundle.
        trust_domain: TrustDomain,
        /// Why.
        #[source]
        source: BundleError,
    },
    /// Reading or writing the datastore failed.
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    /// No relationship with this trust domain.
    #[error("no federation relationship with trust domain {0}")]
    NoRelationship(TrustDomain),
    /// This server has no bundle fetcher (see `run::bundle_fetcher`).
    #[error(
        "this sigil-server has no bundle fetcher; set the bundle by hand \
         with `sigil-server bundle set`"
    )]
    NoFetcher,
    /// The refresher task is not running (starting up, or stopped).
    #[error("the federation refresher is not running")]
    NotRunning,
}

/// What one successful refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshOutcome {
    /// The stored bundle changed (and was announced to the agents).
    pub changed: bool,
    /// The stored bundle's sequence number after the refresh.
    pub sequence: u64,
    /// When the next refresh is due.
    pub next_in: Duration,
}

/// A relationship's refresh state as `federation show` reports it. Times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshStatus {
    /// The last fetch attempt.
    pub last_attempt_at: Option<i64>,
    /// The last successful fetch.
    pub last_success_at: Option<i64>,
    /// Why the last attempt failed; `None` when it succeeded.
    pub last_error: Option<String>,
    /// When the next attempt is due.
    pub next_attempt_at: Option<i64>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
}

/// An immediate refresh asked for through [`Federation::refresh`].
struct RefreshRequest {
    trust_domain: TrustDomain,
    reply: oneshot::Sender<Result<RefreshOutcome, RefreshError>>,
}

/// What the server shares about federation: the relationships of the config file, the refresh
/// status of each relationship, and the refresher's inbox.
pub struct Federation {
    own_trust_domain: TrustDomain,
    configured: BTreeMap<TrustDomain, FederationRelationship>,
    status: Mutex<BTreeMap<TrustDomain, RefreshStatus>>,
    changed: Notify,
    requests: mpsc::Sender<RefreshRequest>,
    inbox: Mutex<Option<mpsc::Receiver<RefreshRequest>>>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("own_trust_domain", &self.own_trust_domain)
            .field("configured", &self.configured.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// The federation state of a server of `own_trust_domain` with the config file's
    /// relationships (already validated: see `config.rs`).
    pub fn new(own_trust_domain: TrustDomain, configured: &[ConfiguredRelationship]) -> Self {
        let (requests, inbox) = mpsc::channel(16);
        Self {
            own_trust_domain,
            configured: configured
                .iter()
                .map(|c| (c.relationship.trust_domain.clone(), c.relationship.clone()))
                .collect(),
            status: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            requests,
            inbox: Mutex::new(Some(inbox)),
        }
    }

    /// The config file's relationship with `td`, if there is one.
    pub fn configured(&self, td: &TrustDomain) -> Option<&FederationRelationship> {
        self.configured.get(td)
    }

    /// Every relationship the server follows, ordered by trust domain, with where each is
    /// defined: the config file's, and the datastore's whose trust domain the config file does
    /// not name.
    pub async fn relationships(
        &self,
        datastore: &dyn Datastore,
    ) -> Result<Vec<(FederationRelationship, Source)>, DatastoreError> {
        let mut all: BTreeMap<TrustDomain, (FederationRelationship, Source)> = datastore
            .list_federation_relationships()
            .await?
            .into_iter()
            .filter(|r| r.trust_domain != self.own_trust_domain)
            .map(|r| (r.trust_domain.clone(), (r, Source::Datastore)))
            .collect();
        for (td, r) in &self.configured {
            all.insert(td.clone(), (r.clone(), Source::Config));
        }
        Ok(all.into_values().collect())
    }

    /// Tells the refresher that relationships were created, updated or deleted: it reads them
    /// again at once (a notification while it is busy is kept, not lost).
    pub fn relationships_changed(&self) {
        self.changed.notify_one();
    }

    /// The refresh status of the relationship with `td` (`None` before its first attempt).
    pub fn status(&self, td: &TrustDomain) -> Option<RefreshStatus> {
        lock(&self.status).get(td).cloned()
    }

    /// Fetches the bundle of `td` now and returns the outcome (the relationships are read
    /// again first, so one just created is known).
    pub async fn refresh(&self, td: &TrustDomain) -> Result<RefreshOutcome, RefreshError> {
        // The inbox is still here until `Refresher::run` takes it: nobody would answer.
        if lock(&self.inbox).is_some() {
            return Err(RefreshError::NotRunning);
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(RefreshRequest {
                trust_domain: td.clone(),
                reply,
            })
            .await
            .map_err(|_| RefreshError::NotRunning)?;
        answer.await.map_err(|_| RefreshError::NotRunning)?
    }

    fn set_status(&self, td: &TrustDomain, f: impl FnOnce(&mut RefreshStatus)) {
        f(lock(&self.status).entry(td.clone()).or_default());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent whatever panicked while holding them.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One relationship as the refresher follows it.
struct Tracked {
    relationship: FederationRelationship,
    /// When the next fetch is due.
    due: Instant,
    /// Failed attempts since the last success.
    failures: u32,
    /// The error last warned about: the same error again is not warned about again.
    warned: Option<String>,
}

impl Tracked {
    fn new(relationship: FederationRelationship) -> Self {
        Self {
            relationship,
            due: Instant::now(),
            failures: 0,
            warned: None,
        }
    }
}

/// The refresh task: see the module documentation.
pub struct Refresher {
    /// The shared state: relationships of the config file, statuses, inbox.
    pub federation: Arc<Federation>,
    /// Where relationships and federated bundles are stored.
    pub datastore: Arc<dyn Datastore>,
    /// Fetches bundles from their endpoints (`None`: none built in; every refresh fails with
    /// [`RefreshError::NoFetcher`]).
    pub fetcher: Option<Arc<dyn FetchBundle>>,
    /// Where a changed federated bundle is announced to the agents' sync streams.
    pub events: SyncEvents,
    /// Refresh outcomes and last success time per trust domain.
    pub metrics: Metrics,
    /// Unix time of statuses and metrics.
    pub clock: Clock,
}

impl Refresher {
    /// Stores the initial bundles of the config file's relationships whose trust domain has
    /// no federated bundle stored yet (one that is stored was set by hand or fetched: newer).
    pub async fn store_initial_bundles(
        &self,
        configured: &[ConfiguredRelationship],
    ) -> Result<(), DatastoreError> {
        let mut stored_any = false;
        for c in configured {
            let Some(bundle) = &c.initial_bundle else {
                continue;
            };
            let td = &c.relationship.trust_domain;
            if self.datastore.get_federated_bundle(td).await?.is_some() {
                continue;
            }
            let stored = self
                .datastore
                .set_federated_bundle(to_stored(bundle))
                .await?;
            tracing::info!(trust_domain = %td, sequence = stored.sequence, "initial federated bundle stored from trust_domain_bundle_path");
            stored_any = true;
        }
        if stored_any {
            self.events.federated_bundles_changed();
        }
        Ok(())
    }

    /// Follows the relationships until `shutdown` turns true. The inbox of
    /// [`Federation::refresh`] is taken when this is called (before the future is spawned), so
    /// a refresh asked for right after is answered; a second call returns a future that ends
    /// at once.
    pub fn run(
        self,
        shutdown: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inbox = lock(&self.federation.inbox).take();
        async move {
            match inbox {
                Some(inbox) => self.follow(inbox, shutdown).await,
                None => tracing::error!(
                    "the federation refresher was started twice; the second one stops"
                ),
            }
        }
    }

    async fn follow(
        self,
        mut inbox: mpsc::Receiver<RefreshRequest>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tracked: BTreeMap<TrustDomain, Tracked> = BTreeMap::new();
        let mut reload_at = Some(Instant::now());
        loop {
            if reload_at.is_some_and(|t| t <= Instant::now()) {
                reload_at = match self.reload(&mut tracked).await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_secs = RELOAD_RETRY.as_secs(), "reading the federation relationships failed; following the ones read before");
                        Some(Instant::now() + RELOAD_RETRY)
                    }
                };
            }
            let next_fetch = tracked.values().map(|t| t.due).min();
            let wake = match (next_fetch, reload_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let req = tokio::select! {
                _ = sleep_until(wake) => None,
                _ = self.federation.changed.notified() => {
                    reload_at = Some(Instant::now());
                    continue;
                }
                Some(req) = inbox.recv() => Some(req),
                _ = shutdown.wait_for(|s| *s) => return,
            };
            if let Some(req) = req {
                let outcome = match self.reload(&mut tracked).await {
                    Err(e) => Err(RefreshError::Datastore(e)),
                    Ok(()) => match tracked.get_mut(&req.trust_domain) {
                        None => Err(RefreshError::NoRelationship(req.trust_domain)),
                        Some(t) => tokio::select! {
                            r = self.attempt(t) => r,
                            _ = shutdown.wait_for(|s| *s) => return,
                        },
                    },
                };
                let _ = req.reply.send(outcome);
                continue;
            }
            let now = Instant::now();
            for t in tracked.values_mut().filter(|t| t.due <= now) {
                tokio::select! {
                    _ = self.attempt(t) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        }
    }

    /// Reads the relationships again: new ones are fetched at once, changed ones (URL or
    /// profile) too, with their failure count reset; removed ones are forgotten.
    async fn reload(
        &self,
        tracked: &mut BTreeMap<TrustDomain, Tracked>,
    ) -> Result<(), DatastoreError> {
        let stored = self.datastore.list_federation_relationships().await?;
        let mut current: BTreeMap<TrustDomain, FederationRelationship> = BTreeMap::new();
        for r in stored {
            if r.trust_domain == self.federation.own_trust_domain {
                continue;
            }
            if self.federation.configured(&r.trust_domain).is_some() {
                if !tracked.contains_key(&r.trust_domain) {
                    tracing::warn!(trust_domain = %r.trust_domain, "a federation relationship with this trust domain is stored in the datastore and also in the config file; following the config file's");
                }
                continue;
            }
            current.insert(r.trust_domain.clone(), r);
        }
        for (td, r) in &self.federation.configured {
            current.insert(td.clone(), r.clone());
        }
        tracked.retain(|td, _| {
            let keep = current.contains_key(td);
            if !keep {
                tracing::info!(trust_domain = %td, "federation relationship removed; its bundle is no longer refreshed (it stays stored until `bundle delete`)");
                lock(&self.federation.status).remove(td);
                self.metrics.forget_federation(td.name());
            }
            keep
        });
        for (td, r) in current {
            match tracked.get_mut(&td) {
                Some(t)
                    if t.relationship.bundle_endpoint_url == r.bundle_endpoint_url
                        && t.relationship.profile == r.profile =>
                {
                    t.relationship = r;
                }
                Some(t) => {
                    tracing::info!(trust_domain = %td, url = %r.bundle_endpoint_url, "federation relationship changed; fetching its bundle now");
                    *t = Tracked::new(r);
                    self.federation.set_status(&td, |s| {
                        s.consecutive_failures = 0;
                        s.last_error = None;
                    });
                }
                None => {
                    tracing::info!(trust_domain = %td, url = %r.bundle_endpoint_url, "following federation relationship");
                    tracked.insert(td, Tracked::new(r));
                }
            }
        }
        Ok(())
    }

    /// One fetch of `t`'s bundle: its outcome recorded (status, metrics, log) and the next
    /// one scheduled.
    async fn attempt(&self, t: &mut Tracked) -> Result<RefreshOutcome, RefreshError> {
        let td = t.relationship.trust_domain.clone();
        let url = t.relationship.bundle_endpoint_url.clone();
        let attempted_at = self.clock.now_unix();
        let result = self.fetch_and_store(&t.relationship).await;
        let now = self.clock.now_unix();
        match result {
            Ok((changed, sequence, hint)) => {
                let next_in = refresh_interval(hint);
                t.failures = 0;
                t.due = Instant::now() + next_in;
                if t.warned.take().is_some() {
                    tracing::info!(trust_domain = %td, url = %url, sequence, "federated bundle refresh recovered");
                }
                self.metrics.observe_federation_refresh(
                    td.name(),
                    if changed { "changed" } else { "unchanged" },
                    Some(now),
                );
                self.federation.set_status(&td, |s| {
                    s.last_attempt_at = Some(attempted_at);
                    s.last_success_at = Some(now);
                    s.last_error = None;
                    s.next_attempt_at = Some(now + next_in.as_secs() as i64);
                    s.consecutive_failures = 0;
                });
                Ok(RefreshOutcome {
                    changed,
                    sequence,
                    next_in,
                })
            }
            Err(e) => {
                t.failures = t.failures.saturating_add(1);
                let retry_in = jittered(retry_delay(t.failures));
                t.due = Instant::now() + retry_in;
                let message = sigil::text::error_chain(&e);
                if t.warned.as_deref() != Some(message.as_str()) {
                    tracing::warn!(trust_domain = %td, url = %url, error = %message, retry_in_secs = retry_in.as_secs(), "fetching the federated bundle failed; the stored one, if any, is kept until a fetch succeeds");
                    t.warned = Some(message.clone());
                } else {
                    tracing::debug!(trust_domain = %td, url = %url, error = %message, failures = t.failures, retry_in_secs = retry_in.as_secs(), "fetching the federated bundle failed again");
                }
                self.metrics
                    .observe_federation_refresh(td.name(), "error", None);
                let failures = t.failures;
                self.federation.set_status(&td, |s| {
                    s.last_attempt_at = Some(attempted_at);
                    s.last_error = Some(message);
                    s.next_attempt_at = Some(now + retry_in.as_secs() as i64);
                    s.consecutive_failures = failures;
                });
                Err(e)
            }
        }
    }

    /// Fetches the bundle of `r` and stores it if it changed: (changed, stored sequence,
    /// refresh hint).
    async fn fetch_and_store(
        &self,
        r: &FederationRelationship,
    ) -> Result<(bool, u64, Option<Duration>), RefreshError> {
        let trust = match &r.profile {
            EndpointProfile::HttpsWeb => None,
            EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                let td = endpoint_spiffe_id.trust_domain();
                let stored = if td == &self.federation.own_trust_domain {
                    self.datastore.get_bundle(td).await?
                } else {
                    self.datastore.get_federated_bundle(td).await?
                };
                let stored = stored.ok_or_else(|| RefreshError::NoTrustBundle(td.clone()))?;
                Some(from_stored(&stored)?)
            }
        };
        let fetcher = self.fetcher.as_ref().ok_or(RefreshError::NoFetcher)?;
        let fetched = tokio::time::timeout(
            FETCH_TIMEOUT,
            fetcher.fetch(
                &r.bundle_endpoint_url,
                &r.trust_domain,
                &r.profile,
                trust.as_ref(),
            ),
        )
        .await
        .map_err(|_| RefreshError::TimedOut)??;
        if fetched.bundle.trust_domain != r.trust_domain {
            return Err(RefreshError::WrongTrustDomain {
                expected: r.trust_domain.clone(),
                got: fetched.bundle.trust_domain,
            });
        }
        if fetched.bundle.x509_authorities.is_empty() && fetched.bundle.jwt_authorities.is_empty() {
            return Err(RefreshError::EmptyBundle);
        }
        let new = to_stored(&fetched.bundle);
        let current = self.datastore.get_federated_bundle(&r.trust_domain).await?;
        if let Some(c) = current.filter(|c| same_content(c, &new)) {
            return Ok((false, c.sequence, fetched.refresh_hint));
        }
        let stored = self.datastore.set_federated_bundle(new).await?;
        self.events.federated_bundles_changed();
        tracing::info!(
            trust_domain = %r.trust_domain,
            sequence = stored.sequence,
            x509_roots = stored.x509_roots.len(),
            endpoint_sequence = ?fetched.sequence,
            "federated bundle updated from its bundle endpoint"
        );
        Ok((true, stored.sequence, fetched.refresh_hint))
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The interval until the next refresh for an endpoint's hint.
pub fn refresh_interval(hint: Option<Duration>) -> Duration {
    hint.map_or(DEFAULT_REFRESH, |h| h.clamp(MIN_REFRESH, MAX_REFRESH))
}

/// The retry delay after `failures` consecutive failures (1 or more), before jitter.
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// `d` shortened by up to a fifth at random (never lengthened: the bounds stay the bounds).
fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 - rand::rng().random_range(0.0..0.2))
}

/// A bundle as the datastore stores it (the sequence is the datastore's to assign).
fn to_stored(b: &Bundle) -> StoredBundle {
    StoredBundle {
        trust_domain: b.trust_domain.clone(),
        x509_roots: b.x509_authorities.clone(),
        jwt_keys_json: b.jwt_keys_json(),
        sequence: 0,
    }
}

/// A stored bundle as a [`Bundle`] (to authenticate an endpoint with).
fn from_stored(s: &StoredBundle) -> Result<Bundle, RefreshError> {
    let jwt_authorities =
        Bundle::jwt_authorities_from_json(&s.jwt_keys_json).map_err(|source| {
            RefreshError::StoredBundle {
                trust_domain: s.trust_domain.clone(),
                source,
            }
        })?;
    Ok(Bundle {
        x509_authorities: s.x509_roots.clone(),
        jwt_authorities,
        sequence_number: s.sequence,
        ..Bundle::new(s.trust_domain.clone())
    })
}

/// Same roots and the same JWT keys (as JSON values: key order and whitespace aside).
fn same_content(a: &StoredBundle, b: &StoredBundle) -> bool {
    a.x509_roots == b.x509_roots
        && (a.jwt_keys_json == b.jwt_keys_json
            || matches!(
                (
                    serde_json::from_str::<serde_json::Value>(&a.jwt_keys_json),
                    serde_json::from_str::<serde_json::Value>(&b.jwt_keys_json),
                ),
                (Ok(x), Ok(y)) if x == y
            ))
}

#[cfg(test)]
mod tests;
