//! The agent's cache: the entries it is authorised for, their X509-SVIDs, the trust bundle, and
//! the federated bundles of the foreign trust domains its entries federate with.
//!
//! Fed by the server's sync stream ([`Cache::apply_sync`]): a snapshot (possibly in chunks)
//! replaces everything, later messages upsert and remove entries. For every entry the agent holds
//! a workload key it generated itself and an SVID signed by the server; [`Cache::due`] says which
//! entries need a (new) SVID: never signed, entry changed since signing, or past its refresh time
//! — half the SVID's lifetime minus up to 10 % jitter, so a fleet's rotations spread out instead of
//! hitting the server at once. The lifetime counts from when the agent received the SVID (not
//! from its NotBefore, which the server back-dates), and whatever the certificate says (a lifetime
//! capped by an expiring CA, a skewed clock) an entry is not renewed again within
//! [`MIN_REFRESH_INTERVAL`] of its last signing. A signing that failed (the server refused it,
//! or the call failed) is asked for again with exponential back-off and jitter
//! ([`sign_backoff_delay`]: 8 s doubling to 5 min, ± 20 %), at once if the entry itself changes;
//! meanwhile the held SVID, if any, is served until it expires. [`Cache::next_refresh`] includes
//! these retry times, so the worker wakes for them and for nothing sooner.
//! SVIDs of removed entries are dropped with the entry. Expired SVIDs stay in the cache (status
//! shows them) but are never served. Federated bundles always arrive as a complete set
//! (`federated_bundles_set`) that replaces the held one.
//!
//! The cache holds no locks and does no I/O; the agent's worker owns it and decides when to call.

use std::collections::{BTreeMap, HashMap};

use rand::Rng as _;
use sigil::entry::RegistrationEntry;
use sigil::proto::node as pb;

/// Fraction of an SVID's lifetime after which it is renewed (before jitter).
pub const REFRESH_FRACTION: f64 = 0.5;
/// Largest jitter, as a fraction of the lifetime, taken off the refresh time.
pub const MAX_JITTER_FRACTION: f64 = 0.1;
/// Shortest time (seconds) between two signings of one entry's SVID, and between two renewals
/// of the agent SVID, whatever the certificates say: a renewal that cannot outlive the current
/// SVID (CA about to expire) is not retried in a loop. Below the refresh time of the shortest
/// accepted TTL (1 min → 24-30 s), so it never delays a normal rotation.
pub const MIN_REFRESH_INTERVAL: i64 = 20;
/// Delay (seconds, before jitter) before asking again for an SVID whose signing failed once.
pub const SIGN_BACKOFF_START: i64 = 8;
/// Longest delay (seconds, before jitter) between two attempts of a signing that keeps failing.
pub const SIGN_BACKOFF_MAX: i64 = 300;
/// Each back-off delay is scaled by a random factor in `1 ± SIGN_BACKOFF_JITTER`, so entries
/// (and agents) refused together do not come back together.
pub const SIGN_BACKOFF_JITTER: f64 = 0.2;

/// The delay (seconds) before the next attempt after `failures` consecutive failed signings
/// (1 after the first): [`SIGN_BACKOFF_START`] doubling up to [`SIGN_BACKOFF_MAX`], scaled by
/// `1 + jitter` (`jitter` clamped to ±[`SIGN_BACKOFF_JITTER`]). Never below one second.
pub fn sign_backoff_delay(failures: u32, jitter: f64) -> i64 {
    let doublings = failures.saturating_sub(1).min(16);
    let nominal = (SIGN_BACKOFF_START << doublings).min(SIGN_BACKOFF_MAX);
    let factor = 1.0 + jitter.clamp(-SIGN_BACKOFF_JITTER, SIGN_BACKOFF_JITTER);
    ((nominal as f64 * factor).round() as i64).max(1)
}

/// A signing that keeps failing (an entry's X509-SVID, or the agent SVID's renewal): how often,
/// why, since when, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignRetry {
    /// Consecutive failures.
    pub failures: u32,
    /// When the first of them happened, Unix seconds.
    pub since: i64,
    /// Why the last one failed (the server's answer or the call's error; never key material).
    pub reason: String,
    /// When to try again, Unix seconds.
    pub retry_at: i64,
}

/// What a failure changed, for logging: warn on news, debug on repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignFailureKind {
    /// The first failure (after a success, a new entry revision, or ever).
    First,
    /// Failing already, now for another reason.
    NewReason,
    /// Failing again for the same reason.
    Repeated,
}

impl SignRetry {
    /// The state after a failure at `now` for `reason`, following `prev` (the state while
    /// already failing, if it was), with `jitter` as in [`sign_backoff_delay`].
    pub fn after_failure(
        prev: Option<&SignRetry>,
        reason: &str,
        now: i64,
        jitter: f64,
    ) -> (SignRetry, SignFailureKind) {
        let (failures, since, kind) = match prev {
            None => (1, now, SignFailureKind::First),
            Some(p) if p.reason == reason => (
                p.failures.saturating_add(1),
                p.since,
                SignFailureKind::Repeated,
            ),
            Some(p) => (
                p.failures.saturating_add(1),
                p.since,
                SignFailureKind::NewReason,
            ),
        };
        let next = SignRetry {
            failures,
            since,
            reason: reason.to_string(),
            retry_at: now + sign_backoff_delay(failures, jitter),
        };
        (next, kind)
    }
}

/// A random jitter for [`sign_backoff_delay`].
pub fn sign_backoff_jitter() -> f64 {
    rand::rng().random_range(-SIGN_BACKOFF_JITTER..=SIGN_BACKOFF_JITTER)
}

/// A failed signing of an entry's SVID as [`Cache::note_sign_failure`] recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignFailureNote {
    /// The entry's SPIFFE ID.
    pub spiffe_id: String,
    /// The retry state after this failure.
    pub retry: SignRetry,
    /// News or a repeat.
    pub kind: SignFailureKind,
}

/// Why a sync message could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    /// An entry in the message does not validate.
    #[error("server sent an invalid entry {id:?}: {reason}")]
    InvalidEntry {
        /// Entry id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A delta arrived before any snapshot.
    #[error("incremental sync message before the first snapshot")]
    NoSnapshot,
    /// A federated bundle in the message names no valid trust domain.
    #[error(
        "server sent a federated bundle for an invalid trust domain {trust_domain:?}: {reason}"
    )]
    InvalidFederatedBundle {
        /// The trust domain as sent.
        trust_domain: String,
        /// What is wrong.
        reason: String,
    },
}

/// A cached X509-SVID for one entry.
#[derive(Clone, PartialEq, Eq)]
pub struct CachedSvid {
    /// The entry it was minted for.
    pub entry_id: String,
    /// The entry revision it was minted for.
    pub entry_revision: i64,
    /// DER chain, leaf first.
    pub chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER key, generated on this node.
    pub key_pkcs8_der: Vec<u8>,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// When to renew, Unix seconds.
    pub refresh_at: i64,
}

impl std::fmt::Debug for CachedSvid {
    // Keys stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSvid")
            .field("entry_id", &self.entry_id)
            .field("not_after", &self.not_after)
            .field("refresh_at", &self.refresh_at)
            .finish_non_exhaustive()
    }
}

/// A key and CSR waiting to be signed.
pub struct PendingCsr {
    /// Entry id.
    pub entry_id: String,
    /// Entry revision at request time.
    pub entry_revision: i64,
    /// The new private key (PKCS#8 DER), kept until the SVID arrives.
    pub key_pkcs8_der: Vec<u8>,
    /// DER PKCS#10 CSR to send.
    pub csr_der: Vec<u8>,
}

/// Entries, SVIDs and bundle.
#[derive(Debug, Default)]
pub struct Cache {
    entries: HashMap<String, RegistrationEntry>,
    svids: HashMap<String, CachedSvid>,
    /// Chunks of a snapshot in progress.
    incoming_snapshot: Option<HashMap<String, RegistrationEntry>>,
    has_snapshot: bool,
    revision: i64,
    bundle: Option<pb::Bundle>,
    /// Trust domain name → its federated bundle.
    federated: BTreeMap<String, pb::Bundle>,
    /// Entry id → (entry revision, retry state) for entries whose signing failed since their
    /// last successful one. Kept when the entry changes (it is then due at once, the record is
    /// only history until the next outcome), dropped with the entry or on success.
    sign_failures: HashMap<String, (i64, SignRetry)>,
    /// True while some entry has a `unix:sha256` selector: the workload attestor reads it to
    /// hash executables only when an entry needs it.
    exe_hash_flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What a sync message changed, for logging and for waking Workload API streams.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Entries added or changed.
    pub upserted: usize,
    /// Entries removed (and their SVIDs dropped).
    pub removed: usize,
    /// The bundle changed.
    pub bundle_changed: bool,
    /// The set of federated bundles changed (one added, removed or replaced).
    pub federated_changed: bool,
    /// A snapshot finished (or none was pending).
    pub complete: bool,
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest entry revision applied (sent as `known_revision` on reconnect; informational).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// True once a complete snapshot has been applied.
    pub fn has_snapshot(&self) -> bool {
        self.has_snapshot
    }

    /// The bundle sequence held (0 when none).
    pub fn bundle_sequence(&self) -> u64 {
        self.bundle.as_ref().map_or(0, |b| b.sequence_number)
    }

    /// The current bundle, if any.
    pub fn bundle(&self) -> Option<&pb::Bundle> {
        self.bundle.as_ref()
    }

    /// The federated bundles held, by trust domain name (e.g. `other.org`).
    pub fn federated_bundles(&self) -> &BTreeMap<String, pb::Bundle> {
        &self.federated
    }

    /// The flag that is true while some cached entry has a `unix:sha256` selector (shared: the
    /// workload attestor holds it, see `WorkloadAttestor::with_exe_hash_flag`).
    pub fn exe_hash_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.exe_hash_flag.clone()
    }

    /// Entries held.
    pub fn entries(&self) -> impl Iterator<Item = &RegistrationEntry> {
        self.entries.values()
    }

    /// The entry `id`, if held.
    pub fn entry(&self, id: &str) -> Option<&RegistrationEntry> {
        self.entries.get(id)
    }

    /// Number of entries held.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Every cached SVID with its entry.
    pub fn svids(&self) -> impl Iterator<Item = (&RegistrationEntry, &CachedSvid)> {
        self.svids
            .iter()
            .filter_map(|(id, s)| self.entries.get(id).map(|e| (e, s)))
    }

    /// The SVID of an entry, if minted.
    pub fn svid(&self, entry_id: &str) -> Option<&CachedSvid> {
        self.svids.get(entry_id)
    }

    /// Applies one sync message. A snapshot arrives in chunks (`full` on the first,
    /// `snapshot_complete` on the last) and replaces everything only once complete, so a
    /// connection lost mid-snapshot leaves the previous state intact.
    pub fn apply_sync(&mut self, msg: pb::SyncResponse) -> Result<SyncOutcome, CacheError> {
        let mut out = SyncOutcome::default();
        let upserted = msg
            .upserted
            .iter()
            .map(|e| {
                RegistrationEntry::from_proto(e).map_err(|err| CacheError::InvalidEntry {
                    id: e.id.clone(),
                    reason: err.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Validated before anything changes, like the entries: a bad message applies nothing.
        let federated = if msg.federated_bundles_set {
            let mut set = BTreeMap::new();
            for b in msg.federated_bundles {
                let td = sigil::TrustDomain::new(&b.trust_domain).map_err(|e| {
                    CacheError::InvalidFederatedBundle {
                        trust_domain: b.trust_domain.clone(),
                        reason: e.to_string(),
                    }
                })?;
                set.insert(td.name().to_string(), b);
            }
            Some(set)
        } else {
            None
        };
        if msg.full {
            self.incoming_snapshot = Some(HashMap::new());
        }
        if let Some(snapshot) = self.incoming_snapshot.as_mut() {
            for e in upserted {
                snapshot.insert(e.id.clone(), e);
            }
            for id in &msg.removed {
                snapshot.remove(id);
            }
            if msg.snapshot_complete {
                let snapshot = self.incoming_snapshot.take().unwrap_or_default();
                out.removed = self
                    .entries
                    .keys()
                    .filter(|id| !snapshot.contains_key(*id))
                    .count();
                out.upserted = snapshot
                    .iter()
                    .filter(|(id, e)| self.entries.get(*id) != Some(e))
                    .count();
                self.entries = snapshot;
                self.has_snapshot = true;
                self.revision = msg.revision;
                out.complete = true;
            }
        } else {
            if !self.has_snapshot {
                return Err(CacheError::NoSnapshot);
            }
            out.upserted = upserted.len();
            for e in upserted {
                self.entries.insert(e.id.clone(), e);
            }
            for id in &msg.removed {
                if self.entries.remove(id).is_some() {
                    out.removed += 1;
                }
            }
            self.revision = self.revision.max(msg.revision);
            out.complete = true;
        }
        // SVIDs of entries that are gone go with them.
        let entries = &self.entries;
        self.svids.retain(|id, _| entries.contains_key(id));
        self.sign_failures.retain(|id, _| entries.contains_key(id));
        let wanted = entries.values().any(|e| {
            e.selectors
                .iter()
                .any(|s| s.kind() == "unix" && s.value().starts_with("sha256:"))
        });
        self.exe_hash_flag
            .store(wanted, std::sync::atomic::Ordering::SeqCst);
        if let Some(b) = msg.bundle {
            if self.bundle.as_ref() != Some(&b) {
                self.bundle = Some(b);
                out.bundle_changed = true;
            }
        }
        if let Some(set) = federated {
            if self.federated != set {
                self.federated = set;
                out.federated_changed = true;
            }
        }
        Ok(out)
    }

    /// When `e` needs a (new) SVID, Unix seconds (0: now): none yet or minted for an older
    /// revision of the entry → now, else its refresh time; in both cases not before the retry
    /// time of a refused signing of this revision.
    fn due_at(&self, e: &RegistrationEntry) -> i64 {
        let wanted = match self.svids.get(&e.id) {
            Some(s) if s.entry_revision == e.revision => s.refresh_at,
            _ => 0,
        };
        match self.sign_failures.get(&e.id) {
            Some((revision, r)) if *revision == e.revision => wanted.max(r.retry_at),
            _ => wanted,
        }
    }

    /// Entry ids that need an SVID now: none yet, minted for an older revision of the entry, or
    /// at/after their refresh time (see [`Self::due_at`]). Sorted for deterministic batches.
    pub fn due(&self, now: i64) -> Vec<String> {
        let mut due: Vec<String> = self
            .entries
            .values()
            .filter(|e| self.due_at(e) <= now)
            .map(|e| e.id.clone())
            .collect();
        due.sort();
        due
    }

    /// When the next entry becomes due (when to wake next; a time in the past means now), if
    /// any entry is held.
    pub fn next_refresh(&self) -> Option<i64> {
        self.entries.values().map(|e| self.due_at(e)).min()
    }

    /// Records that signing an SVID for `entry_id` at `revision` failed at `now` for `reason`:
    /// it is not asked for again before the back-off delay ([`sign_backoff_delay`], growing with
    /// each consecutive failure of this revision) unless the entry changes. `None` when the
    /// entry is not held (nothing recorded).
    pub fn note_sign_failure(
        &mut self,
        entry_id: &str,
        revision: i64,
        reason: &str,
        now: i64,
    ) -> Option<SignFailureNote> {
        self.note_sign_failure_with_jitter(entry_id, revision, reason, now, sign_backoff_jitter())
    }

    fn note_sign_failure_with_jitter(
        &mut self,
        entry_id: &str,
        revision: i64,
        reason: &str,
        now: i64,
        jitter: f64,
    ) -> Option<SignFailureNote> {
        let spiffe_id = self.entries.get(entry_id)?.spiffe_id.to_string();
        // A failure of an earlier revision says nothing about this one: start over.
        let prev = self
            .sign_failures
            .get(entry_id)
            .filter(|(r, _)| *r == revision)
            .map(|(_, f)| f);
        let (retry, kind) = SignRetry::after_failure(prev, reason, now, jitter);
        self.sign_failures
            .insert(entry_id.to_string(), (revision, retry.clone()));
        Some(SignFailureNote {
            spiffe_id,
            retry,
            kind,
        })
    }

    /// The failures recorded for `entry_id` since its last successful signing, if any (of its
    /// current revision or an earlier one).
    pub fn sign_failure(&self, entry_id: &str) -> Option<&SignRetry> {
        self.sign_failures.get(entry_id).map(|(_, f)| f)
    }

    /// Entries backing off after failed signings of their current revision, with their state.
    pub fn sign_backoff(&self) -> impl Iterator<Item = (&RegistrationEntry, &SignRetry)> {
        self.sign_failures.iter().filter_map(|(id, (revision, f))| {
            self.entries
                .get(id)
                .filter(|e| e.revision == *revision)
                .map(|e| (e, f))
        })
    }

    /// The cached SVIDs that have expired at `now` (they are never served), with their entries.
    pub fn expired_svids(
        &self,
        now: i64,
    ) -> impl Iterator<Item = (&RegistrationEntry, &CachedSvid)> {
        self.svids().filter(move |(_, s)| s.not_after <= now)
    }

    /// The earliest NotAfter after `now` of any cached SVID: when the next one expires.
    pub fn next_expiry_after(&self, now: i64) -> Option<i64> {
        self.svids
            .values()
            .map(|s| s.not_after)
            .filter(|&t| t > now)
            .min()
    }

    /// Generates a key and CSR for each entry id (skipping ids no longer held).
    pub fn make_csrs(&self, ids: &[String]) -> Result<Vec<PendingCsr>, rcgen::Error> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(entry) = self.entries.get(id) else {
                continue;
            };
            let (key, csr) = make_csr(Some(&entry.spiffe_id.to_string()))?;
            out.push(PendingCsr {
                entry_id: id.clone(),
                entry_revision: entry.revision,
                key_pkcs8_der: key,
                csr_der: csr,
            });
        }
        Ok(out)
    }

    /// Stores a signed SVID for a pending CSR. Ignored (returns false) when the entry is gone.
    pub fn store_svid(
        &mut self,
        pending: PendingCsr,
        chain_der: Vec<Vec<u8>>,
        not_after: i64,
        now: i64,
    ) -> bool {
        if !self.entries.contains_key(&pending.entry_id) {
            return false;
        }
        let refresh_at = refresh_time(
            now,
            not_after,
            rand::rng().random_range(0.0..=MAX_JITTER_FRACTION),
        )
        .max(now + MIN_REFRESH_INTERVAL);
        self.sign_failures.remove(&pending.entry_id);
        self.svids.insert(
            pending.entry_id.clone(),
            CachedSvid {
                entry_id: pending.entry_id,
                entry_revision: pending.entry_revision,
                chain_der,
                key_pkcs8_der: pending.key_pkcs8_der,
                issued_at: now,
                not_after,
                refresh_at,
            },
        );
        true
    }
}

/// Refresh time for an SVID received at `issued_at` and valid until `not_after`: at
/// `REFRESH_FRACTION - jitter` of its lifetime (`jitter` in `0..=MAX_JITTER_FRACTION`).
/// `issued_at` is when the agent received it, not its NotBefore, which the server back-dates
/// for clock skew (from NotBefore, a TTL shorter than twice the back-dating would be due at
/// once, again and again).
pub fn refresh_time(issued_at: i64, not_after: i64, jitter: f64) -> i64 {
    let life = (not_after - issued_at).max(0) as f64;
    issued_at + (life * (REFRESH_FRACTION - jitter.clamp(0.0, MAX_JITTER_FRACTION))) as i64
}

/// When to renew the agent SVID received at `received_at` and valid until `not_after`: at half
/// its lifetime, but never within [`MIN_REFRESH_INTERVAL`] of receiving it.
pub fn agent_svid_renew_at(received_at: i64, not_after: i64) -> i64 {
    refresh_time(received_at, not_after, 0.0).max(received_at + MIN_REFRESH_INTERVAL)
}

/// A new ECDSA P-256 key (PKCS#8 DER) and a CSR (DER) carrying `spiffe_id` as URI SAN, or no
/// SAN when the server assigns the ID (agent attestation). The key never leaves the node.
pub fn make_csr(spiffe_id: Option<&str>) -> Result<(Vec<u8>, Vec<u8>), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    if let Some(id) = spiffe_id {
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into()?)];
    }
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

#[cfg(test)]
mod tests;
