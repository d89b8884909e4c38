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
mod tests {
    use super::*;
    use sigil::proto::admin as apb;
    use std::collections::HashSet;

    fn held_ids(cache: &Cache) -> HashSet<String> {
        cache.entries.keys().cloned().collect()
    }

    fn entry(id: &str, rev: i64) -> apb::Entry {
        apb::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/w/{id}"),
            parent_id: "spiffe://example.org/sigil/agent/join_token/t".into(),
            selectors: vec![apb::Selector {
                r#type: "unix".into(),
                value: "uid:1".into(),
            }],
            revision_number: rev,
            ..Default::default()
        }
    }

    fn snapshot(entries: Vec<apb::Entry>, rev: i64) -> pb::SyncResponse {
        pb::SyncResponse {
            upserted: entries,
            full: true,
            snapshot_complete: true,
            revision: rev,
            ..Default::default()
        }
    }

    #[test]
    fn chunked_snapshot_replaces_only_when_complete() {
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("old", 1)], 1)).unwrap();
        let out = c
            .apply_sync(pb::SyncResponse {
                upserted: vec![entry("a", 2)],
                full: true,
                revision: 3,
                ..Default::default()
            })
            .unwrap();
        assert!(!out.complete);
        assert_eq!(
            held_ids(&c),
            ["old".to_string()].into(),
            "old state kept mid-snapshot"
        );
        let out = c
            .apply_sync(pb::SyncResponse {
                upserted: vec![entry("b", 3)],
                snapshot_complete: true,
                revision: 3,
                ..Default::default()
            })
            .unwrap();
        assert!(out.complete);
        assert_eq!(out.removed, 1);
        assert_eq!(held_ids(&c), ["a".to_string(), "b".to_string()].into());
        assert_eq!(c.revision(), 3);
    }

    #[test]
    fn deltas_need_a_snapshot_and_removal_drops_svids() {
        let mut c = Cache::new();
        let delta = pb::SyncResponse {
            upserted: vec![entry("a", 1)],
            revision: 1,
            ..Default::default()
        };
        assert_eq!(c.apply_sync(delta.clone()), Err(CacheError::NoSnapshot));
        c.apply_sync(snapshot(vec![], 0)).unwrap();
        c.apply_sync(delta).unwrap();
        assert_eq!(c.due(0), vec!["a".to_string()]);
        let pending = c.make_csrs(&c.due(0)).unwrap().pop().unwrap();
        assert!(c.store_svid(pending, vec![vec![1]], 3600, 0));
        assert!(c.due(0).is_empty());
        c.apply_sync(pb::SyncResponse {
            removed: vec!["a".into()],
            revision: 2,
            ..Default::default()
        })
        .unwrap();
        assert!(c.svid("a").is_none(), "SVID of a deleted entry is dropped");
        assert_eq!(c.revision(), 2);
    }

    #[test]
    fn entry_change_or_refresh_time_makes_an_svid_due() {
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
        let pending = c.make_csrs(&["a".into()]).unwrap().pop().unwrap();
        c.store_svid(pending, vec![vec![1]], 3600, 0);
        let s = c.svid("a").unwrap().clone();
        // Half-life minus up to 10 % jitter: between 1440 s and 1800 s for a 1 h SVID.
        assert!((1440..=1800).contains(&s.refresh_at), "{}", s.refresh_at);
        assert!(c.due(s.refresh_at - 1).is_empty());
        assert_eq!(c.due(s.refresh_at), vec!["a".to_string()]);
        assert_eq!(c.next_refresh(), Some(s.refresh_at));
        // An updated entry (new revision) needs a new SVID right away.
        c.apply_sync(pb::SyncResponse {
            upserted: vec![entry("a", 5)],
            revision: 5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.due(0), vec!["a".to_string()]);
    }

    #[test]
    fn jitter_spreads_refresh_times() {
        assert_eq!(refresh_time(0, 3600, 0.0), 1800);
        assert_eq!(refresh_time(0, 3600, 0.1), 1440);
        assert_eq!(refresh_time(0, 3600, 5.0), 1440, "jitter is clamped");
        assert_eq!(
            refresh_time(100, 50, 0.0),
            100,
            "expired input never schedules in the past of issue"
        );
        let mut c = Cache::new();
        c.apply_sync(snapshot(
            (0..50).map(|i| entry(&i.to_string(), 1)).collect(),
            1,
        ))
        .unwrap();
        for p in c.make_csrs(&c.due(0)).unwrap() {
            c.store_svid(p, vec![vec![1]], 3600, 0);
        }
        let distinct: HashSet<i64> = c.svids.values().map(|s| s.refresh_at).collect();
        assert!(
            distinct.len() > 10,
            "50 SVIDs should not all refresh in the same second"
        );
    }

    /// Runs an agent's signing decisions for `secs` seconds from `start`, one look per second
    /// (far more often than the worker wakes): each due entry is signed at once with an SVID
    /// valid until `not_after(now)`. Returns how many signings happened.
    fn signings_over(
        c: &mut Cache,
        start: i64,
        secs: i64,
        not_after: impl Fn(i64) -> i64,
    ) -> usize {
        let mut n = 0;
        for now in start..start + secs {
            for p in c.make_csrs(&c.due(now)).unwrap() {
                assert!(c.store_svid(p, vec![vec![1]], not_after(now), now));
                n += 1;
            }
        }
        n
    }

    #[test]
    fn short_lifetimes_do_not_cause_signing_storms() {
        // A 2 s TTL (an entry stored before the TTL floor, or any server answer): renewed every
        // MIN_REFRESH_INTERVAL, not every second.
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
        let n = signings_over(&mut c, 1000, 100, |now| now + 2);
        assert_eq!(
            n as i64,
            100 / MIN_REFRESH_INTERVAL,
            "{n} signings in 100 s"
        );
        let s = c.svid("a").unwrap();
        assert_eq!(s.refresh_at, s.issued_at + MIN_REFRESH_INTERVAL);

        // A lifetime capped by a CA that expires at 1100: every renewal returns the same
        // NotAfter, so the refresh time would be "now" forever without the floor.
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
        let n = signings_over(&mut c, 1000, 200, |_| 1100);
        assert!(
            n <= (200 / MIN_REFRESH_INTERVAL + 1) as usize,
            "{n} signings in 200 s"
        );

        // An SVID that arrives already expired (skewed clocks) is not asked for again at once.
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
        let n = signings_over(&mut c, 1000, 60, |now| now - 5);
        assert_eq!(n, 3, "{n} signings in 60 s");
    }

    #[test]
    fn normal_refresh_is_not_delayed_by_the_floor() {
        // The shortest accepted TTL (60 s) refreshes at 24-30 s: above the floor.
        let mut c = Cache::new();
        c.apply_sync(snapshot(
            (0..50).map(|i| entry(&i.to_string(), 1)).collect(),
            1,
        ))
        .unwrap();
        for p in c.make_csrs(&c.due(1000)).unwrap() {
            c.store_svid(p, vec![vec![1]], 1060, 1000);
        }
        for s in c.svids.values() {
            assert!((1024..=1030).contains(&s.refresh_at), "{}", s.refresh_at);
        }
        assert!(c.svids.values().any(|s| s.refresh_at < 1030), "jitter kept");
    }

    #[test]
    fn refused_signings_wait_before_asking_again_unless_the_entry_changes() {
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("a", 1), entry("b", 1)], 1))
            .unwrap();
        assert_eq!(c.next_refresh(), Some(0), "unsigned entries are due now");
        let b = c.make_csrs(&["b".into()]).unwrap().pop().unwrap();
        c.store_svid(b, vec![vec![1]], 4600, 1000);
        let note = c
            .note_sign_failure_with_jitter("a", 1, "InvalidArgument: bad DNS name", 1000, 0.0)
            .unwrap();
        assert_eq!(note.kind, SignFailureKind::First);
        assert_eq!(note.spiffe_id, "spiffe://example.org/w/a");
        assert_eq!(note.retry.retry_at, 1000 + SIGN_BACKOFF_START);
        assert!(c.due(1000).is_empty());
        assert!(c.due(1000 + SIGN_BACKOFF_START - 1).is_empty());
        // The worker wakes at the retry time: it is part of the next refresh.
        assert_eq!(c.next_refresh(), Some(1000 + SIGN_BACKOFF_START));
        assert_eq!(c.due(1000 + SIGN_BACKOFF_START), vec!["a".to_string()]);
        // A renewal refused: the held SVID is not asked for again before the retry time.
        c.note_sign_failure_with_jitter("b", 1, "Unavailable: CA", 2800, 0.0);
        assert!(!c.due(2800).contains(&"b".to_string()));
        assert!(c.due(2800 + SIGN_BACKOFF_START).contains(&"b".to_string()));
        assert_eq!(
            c.svid("b").unwrap().not_after,
            4600,
            "the held SVID is kept"
        );
        // The entry changed (the operator fixed it): due at once, no longer backing off.
        c.apply_sync(pb::SyncResponse {
            upserted: vec![entry("a", 2)],
            revision: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.due(1001), vec!["a".to_string()]);
        assert_eq!(c.next_refresh(), Some(0));
        let backing_off: Vec<&str> = c.sign_backoff().map(|(e, _)| e.id.as_str()).collect();
        assert_eq!(backing_off, ["b"]);
        assert!(
            c.sign_failure("a").is_some(),
            "history kept until an outcome"
        );
        // A successful signing clears the failure; a removed entry takes it along.
        let a = c.make_csrs(&["a".into()]).unwrap().pop().unwrap();
        c.note_sign_failure("a", 2, "x", 1001);
        c.store_svid(a, vec![vec![1]], 4601, 1001);
        assert!(!c.sign_failures.contains_key("a"));
        c.apply_sync(pb::SyncResponse {
            removed: vec!["b".into()],
            revision: 3,
            ..Default::default()
        })
        .unwrap();
        assert!(c.sign_failures.is_empty());
        assert!(c.note_sign_failure("gone", 1, "x", 1001).is_none());
        assert!(
            c.sign_failures.is_empty(),
            "unknown entries are not recorded"
        );
    }

    #[test]
    fn sign_backoff_grows_is_capped_and_jittered() {
        // Without jitter: 8, 16, 32 ... doubling up to the 5 min cap, and staying there.
        let delays: Vec<i64> = (1..=10).map(|n| sign_backoff_delay(n, 0.0)).collect();
        assert_eq!(delays, [8, 16, 32, 64, 128, 256, 300, 300, 300, 300]);
        assert_eq!(sign_backoff_delay(u32::MAX, 0.0), SIGN_BACKOFF_MAX);
        assert_eq!(sign_backoff_delay(0, 0.0), SIGN_BACKOFF_START);
        // Jitter stays within ±20 % (clamped beyond).
        assert_eq!(sign_backoff_delay(1, 0.2), 10);
        assert_eq!(sign_backoff_delay(1, -0.2), 6);
        assert_eq!(sign_backoff_delay(1, 5.0), 10);
        assert_eq!(sign_backoff_delay(1, -5.0), 6);
        assert_eq!(sign_backoff_delay(20, 0.2), 360);
        assert_eq!(sign_backoff_delay(20, -0.2), 240);
        // With random jitter, through the cache: each delay within the bounds, and spread.
        let mut c = Cache::new();
        c.apply_sync(snapshot(
            (0..50).map(|i| entry(&i.to_string(), 1)).collect(),
            1,
        ))
        .unwrap();
        for n in 1..=12u32 {
            let nominal = (SIGN_BACKOFF_START << (n - 1).min(16)).min(SIGN_BACKOFF_MAX) as f64;
            let mut retry_ats = HashSet::new();
            for i in 0..50 {
                let note = c
                    .note_sign_failure(&i.to_string(), 1, "refused", 10_000)
                    .unwrap();
                assert_eq!(note.retry.failures, n);
                let delay = (note.retry.retry_at - 10_000) as f64;
                assert!(
                    (nominal * 0.8 - 0.5..=nominal * 1.2 + 0.5).contains(&delay),
                    "failure {n}: {delay} s"
                );
                retry_ats.insert(note.retry.retry_at);
            }
            assert!(retry_ats.len() > 1, "failure {n}: no jitter");
        }
    }

    #[test]
    fn sign_backoff_resets_on_success_and_on_a_new_revision() {
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("a", 1)], 1)).unwrap();
        let fail = |c: &mut Cache, rev, reason: &str, now| {
            c.note_sign_failure_with_jitter("a", rev, reason, now, 0.0)
                .unwrap()
        };
        let n1 = fail(&mut c, 1, "refused", 1000);
        let n2 = fail(&mut c, 1, "refused", n1.retry.retry_at);
        let n3 = fail(&mut c, 1, "other", n2.retry.retry_at);
        assert_eq!(
            [n1.kind, n2.kind, n3.kind],
            [
                SignFailureKind::First,
                SignFailureKind::Repeated,
                SignFailureKind::NewReason
            ]
        );
        assert_eq!(n3.retry.failures, 3);
        assert_eq!(n3.retry.since, 1000);
        assert_eq!(n3.retry.retry_at, n2.retry.retry_at + 32);
        assert_eq!(c.next_refresh(), Some(n3.retry.retry_at));
        // A new revision: due now, and its first failure starts over.
        c.apply_sync(pb::SyncResponse {
            upserted: vec![entry("a", 2)],
            revision: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.due(1100), vec!["a".to_string()]);
        assert_eq!(c.sign_backoff().count(), 0);
        let n4 = fail(&mut c, 2, "other", 1100);
        assert_eq!(n4.kind, SignFailureKind::First);
        assert_eq!((n4.retry.failures, n4.retry.since), (1, 1100));
        assert_eq!(n4.retry.retry_at, 1100 + SIGN_BACKOFF_START);
        assert_eq!(c.sign_backoff().count(), 1);
        // A late answer for the old revision does not make the new one wait longer.
        let stale = fail(&mut c, 1, "refused", 1101);
        assert_eq!(stale.kind, SignFailureKind::First);
        assert_eq!(c.due(1101), vec!["a".to_string()], "stale failure ignored");
        // Success: the record goes, and the next failure is a first one again.
        let n5 = fail(&mut c, 2, "other", 1102);
        let p = c.make_csrs(&["a".into()]).unwrap().pop().unwrap();
        assert!(c.store_svid(p, vec![vec![1]], 4700, n5.retry.retry_at));
        assert!(c.sign_failure("a").is_none());
        assert_eq!(c.sign_backoff().count(), 0);
        let n6 = fail(&mut c, 2, "other", 5000);
        assert_eq!((n6.kind, n6.retry.failures), (SignFailureKind::First, 1));
    }

    #[test]
    fn a_refused_entry_is_asked_for_a_bounded_number_of_times() {
        // Refused at every attempt, looked at every second for 10 min: 8+16+32+64+128+256 s
        // (± 20 %) → at most 7 attempts, while the other entry renews normally.
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("bad", 1), entry("good", 1)], 1))
            .unwrap();
        let (mut attempts, mut good) = (0, 0);
        for now in 1000..1600 {
            for p in c.make_csrs(&c.due(now)).unwrap() {
                if p.entry_id == "bad" {
                    attempts += 1;
                    c.note_sign_failure(&p.entry_id, p.entry_revision, "refused", now);
                } else {
                    good += 1;
                    assert!(c.store_svid(p, vec![vec![1]], now + 60, now));
                }
            }
            let next = c.next_refresh().unwrap();
            assert!(next > now, "nothing due right after a pass at {now}");
        }
        assert!((5..=7).contains(&attempts), "{attempts} attempts in 10 min");
        assert!(good >= 600 / 30, "{good} signings of the good entry");
    }

    #[test]
    fn agent_svid_renewal_counts_from_receipt_with_a_floor() {
        // A 1 h SVID received at 1000: renewed at half of it.
        assert_eq!(agent_svid_renew_at(1000, 4600), 2800);
        // A 20 s SVID whose NotBefore is back-dated 30 s: counted from NotBefore its renewal
        // time (995) would be in the past at once; from receipt, with the floor, it is 1020.
        assert!(refresh_time(970, 1020, 0.0) < 1000);
        assert_eq!(agent_svid_renew_at(1000, 1020), 1020);
        // Capped or already expired: still not before the floor.
        assert_eq!(agent_svid_renew_at(1000, 1005), 1000 + MIN_REFRESH_INTERVAL);
        assert_eq!(agent_svid_renew_at(1000, 900), 1000 + MIN_REFRESH_INTERVAL);
    }

    #[test]
    fn expired_svids_and_the_next_expiry() {
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![entry("a", 1), entry("b", 1)], 1))
            .unwrap();
        let mut ps = c.make_csrs(&["a".into(), "b".into()]).unwrap();
        let b = ps.pop().unwrap();
        let a = ps.pop().unwrap();
        c.store_svid(a, vec![vec![1]], 1100, 1000);
        c.store_svid(b, vec![vec![2]], 1200, 1000);
        assert_eq!(c.next_expiry_after(1000), Some(1100));
        assert_eq!(c.next_expiry_after(1100), Some(1200));
        assert_eq!(c.next_expiry_after(1200), None);
        assert_eq!(c.expired_svids(1099).count(), 0);
        let expired: Vec<&str> = c.expired_svids(1100).map(|(e, _)| e.id.as_str()).collect();
        assert_eq!(expired, ["a"]);
        assert_eq!(c.expired_svids(1200).count(), 2);
    }

    #[test]
    fn csr_carries_the_spiffe_id_and_a_fresh_key() {
        let (key1, csr1) = make_csr(Some("spiffe://example.org/w/a")).unwrap();
        let (key2, _) = make_csr(Some("spiffe://example.org/w/a")).unwrap();
        assert_ne!(key1, key2, "a new key per CSR");
        let params = rcgen::CertificateSigningRequestParams::from_der(&csr1.into()).unwrap();
        let sans = &params.params.subject_alt_names;
        assert!(
            matches!(&sans[0], rcgen::SanType::URI(u) if u.as_str() == "spiffe://example.org/w/a")
        );
    }

    #[test]
    fn exe_hash_flag_follows_the_entries_needing_a_hash() {
        let sha = format!("sha256:{}", "a".repeat(64));
        let sel = |t: &str, v: &str| sigil::proto::admin::Selector {
            r#type: t.into(),
            value: v.into(),
        };
        let with = |id: &str, selectors: Vec<sigil::proto::admin::Selector>| apb::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            parent_id: "spiffe://example.org/agent".into(),
            selectors,
            revision_number: 1,
            ..Default::default()
        };
        let mut c = Cache::new();
        let flag = c.exe_hash_flag();
        let load = || flag.load(std::sync::atomic::Ordering::SeqCst);
        c.apply_sync(snapshot(vec![with("a", vec![sel("unix", "uid:1")])], 1))
            .unwrap();
        assert!(!load());
        // An incremental upsert with unix:sha256 sets it...
        c.apply_sync(pb::SyncResponse {
            upserted: vec![with("b", vec![sel("unix", "uid:1"), sel("unix", &sha)])],
            revision: 2,
            ..Default::default()
        })
        .unwrap();
        assert!(load());
        // ...a half-received snapshot does not change it...
        c.apply_sync(pb::SyncResponse {
            upserted: vec![with("a", vec![sel("unix", "uid:1")])],
            full: true,
            revision: 3,
            ..Default::default()
        })
        .unwrap();
        assert!(load());
        // ...and the completed snapshot without such an entry clears it.
        c.apply_sync(pb::SyncResponse {
            snapshot_complete: true,
            revision: 3,
            ..Default::default()
        })
        .unwrap();
        assert!(!load());
        // A sha256-like value of another type does not count.
        c.apply_sync(pb::SyncResponse {
            upserted: vec![with("c", vec![sel("other", &sha)])],
            revision: 4,
            ..Default::default()
        })
        .unwrap();
        assert!(!load());
    }

    #[test]
    fn invalid_entries_from_the_server_are_refused_whole() {
        let mut c = Cache::new();
        let mut bad = entry("x", 1);
        bad.spiffe_id = "not an id".into();
        let err = c
            .apply_sync(snapshot(vec![entry("ok", 1), bad], 1))
            .unwrap_err();
        assert!(matches!(err, CacheError::InvalidEntry { ref id, .. } if id == "x"));
        assert_eq!(c.entry_count(), 0, "nothing applied from a bad message");
    }

    fn federated_msg(bundles: &[(&str, u8)]) -> pb::SyncResponse {
        pb::SyncResponse {
            federated_bundles: bundles
                .iter()
                .map(|(td, root)| pb::Bundle {
                    trust_domain: (*td).into(),
                    x509_roots: vec![*root],
                    sequence_number: 1,
                    ..Default::default()
                })
                .collect(),
            federated_bundles_set: true,
            ..Default::default()
        }
    }

    fn federated_tds(c: &Cache) -> Vec<&str> {
        c.federated_bundles().keys().map(String::as_str).collect()
    }

    #[test]
    fn federated_set_is_replaced_whole_and_changes_reported() {
        let mut c = Cache::new();
        // On a snapshot.
        let mut m = snapshot(vec![entry("a", 1)], 1);
        m.federated_bundles = federated_msg(&[("other.org", 1)]).federated_bundles;
        m.federated_bundles_set = true;
        let out = c.apply_sync(m).unwrap();
        assert!(out.federated_changed && !out.bundle_changed);
        assert_eq!(federated_tds(&c), ["other.org"]);
        assert_eq!(c.federated_bundles()["other.org"].x509_roots, vec![1]);

        // A message without the flag leaves the set alone, even with an empty list.
        let out = c
            .apply_sync(pb::SyncResponse {
                revision: 2,
                ..Default::default()
            })
            .unwrap();
        assert!(!out.federated_changed);
        assert_eq!(federated_tds(&c), ["other.org"]);

        // The same set again: no change reported.
        let out = c.apply_sync(federated_msg(&[("other.org", 1)])).unwrap();
        assert!(!out.federated_changed);

        // Replaced whole: one added, one content change.
        let out = c
            .apply_sync(federated_msg(&[("third.org", 3), ("other.org", 2)]))
            .unwrap();
        assert!(out.federated_changed);
        assert_eq!(federated_tds(&c), ["other.org", "third.org"]);
        assert_eq!(c.federated_bundles()["other.org"].x509_roots, vec![2]);

        // Removed by omission; an empty set clears everything.
        c.apply_sync(federated_msg(&[("third.org", 3)])).unwrap();
        assert_eq!(federated_tds(&c), ["third.org"]);
        assert!(c.apply_sync(federated_msg(&[])).unwrap().federated_changed);
        assert!(c.federated_bundles().is_empty());
        assert_eq!(c.entry_count(), 1, "entries untouched");
    }

    #[test]
    fn invalid_federated_bundles_are_refused_whole() {
        let mut c = Cache::new();
        c.apply_sync(snapshot(vec![], 1)).unwrap();
        c.apply_sync(federated_msg(&[("other.org", 1)])).unwrap();
        let mut bad = federated_msg(&[("third.org", 3), ("NOT A DOMAIN", 4)]);
        bad.upserted = vec![entry("a", 2)];
        let err = c.apply_sync(bad).unwrap_err();
        assert!(
            matches!(err, CacheError::InvalidFederatedBundle { ref trust_domain, .. } if trust_domain == "NOT A DOMAIN")
        );
        assert_eq!(federated_tds(&c), ["other.org"], "nothing applied");
        assert_eq!(c.entry_count(), 0, "nothing applied");
        // A trust domain sent as its ID is held under its bare name.
        c.apply_sync(federated_msg(&[("spiffe://other.org", 9)]))
            .unwrap();
        assert_eq!(federated_tds(&c), ["other.org"]);
    }

    #[test]
    fn bundle_changes_are_reported_once() {
        let mut c = Cache::new();
        let b = pb::Bundle {
            trust_domain: "example.org".into(),
            sequence_number: 2,
            ..Default::default()
        };
        let mut m = snapshot(vec![], 1);
        m.bundle = Some(b.clone());
        assert!(c.apply_sync(m).unwrap().bundle_changed);
        assert_eq!(c.bundle_sequence(), 2);
        let out = c
            .apply_sync(pb::SyncResponse {
                bundle: Some(b),
                revision: 1,
                ..Default::default()
            })
            .unwrap();
        assert!(!out.bundle_changed);
    }
}
