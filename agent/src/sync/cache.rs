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
//! [`refresh_floor`] of its last signing ([`MIN_REFRESH_INTERVAL`], less for an SVID that would
//! expire before it). A signing that failed (the server refused it,
//! or the call failed) is asked for again with exponential back-off and jitter
//! ([`sign_backoff_delay`]: 8 s doubling to 5 min, ± 20 %), at once if the entry itself changes;
//! meanwhile the held SVID, if any, is served until it expires. [`Cache::next_refresh`] includes
//! these retry times, so the worker wakes for them and for nothing sooner.
//! SVIDs of removed entries are dropped with the entry. Expired SVIDs stay in the cache (status
//! shows them) but are never served. Federated bundles always arrive as a complete set
//! (`federated_bundles_set`) that replaces the held one.
//!
//! Entries wait in a refresh queue ordered by when they are due, so finding the due ones and the
//! next wake-up costs what is due, not what is held.
//!
//! The cache holds no locks and does no I/O; the agent's worker owns it and decides when to call.
//! After each change the worker publishes a [`Snapshot`]: an immutable copy that shares
//! structure with the cache (persistent maps: a change copies only the paths it touches), with
//! entries indexed by selector so that matching a caller reads only the entries that share a
//! selector with it. [`Cache::take_changes`] says what changed ([`Changes`]), so that only the
//! Workload API streams it concerns wake up.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand::Rng as _;
use sigil::entry::RegistrationEntry;
use sigil::proto::node as pb;
use sigil::selector::{Selector, SelectorSet};

use super::held_chain::{ChainPacker, HeldChain};
use super::held_key::HeldKey;

/// Fraction of an SVID's lifetime after which it is renewed (before jitter).
pub const REFRESH_FRACTION: f64 = 0.5;
/// Largest jitter, as a fraction of the lifetime, taken off the refresh time.
pub const MAX_JITTER_FRACTION: f64 = 0.1;
/// Shortest time (seconds) between two signings of one entry's SVID, and between two renewals
/// of the agent SVID, whatever the certificates say: a renewal that cannot outlive the current
/// SVID (CA about to expire) is not retried in a loop. Below the refresh time of the shortest
/// accepted TTL (1 min → 24-30 s), so it never delays a normal rotation. An SVID received with
/// less than twice this left (capped by an authority about to be replaced) is renewed at half
/// of what it has left, but not within [`MIN_SHORT_REFRESH_INTERVAL`]: the server's next
/// authority is active before the current one's last sixth, so a renewal then outlives it.
pub const MIN_REFRESH_INTERVAL: i64 = 20;
/// Shortest time (seconds) between two signings of an SVID received with little life left.
pub const MIN_SHORT_REFRESH_INTERVAL: i64 = 5;
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

/// A cached X509-SVID for one entry. Held compactly (the chain compressed against one of the
/// same authority, a P-256 key as its secret, the entry id only as the map's key): an agent
/// holds one per entry, 100,000 and more.
#[derive(Clone, PartialEq, Eq)]
pub struct CachedSvid {
    /// The entry revision it was minted for.
    pub entry_revision: i64,
    /// DER certificates, leaf first, concatenated (as the Workload API sends them).
    chain: HeldChain,
    /// Length of the leaf at the start of `chain`.
    leaf_len: u32,
    /// The key, generated on this node.
    key: HeldKey,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// When to renew, Unix seconds.
    pub refresh_at: i64,
    /// A number no other SVID stored in this cache has: a Workload API stream's view changed
    /// when the generation of an SVID in it did.
    pub generation: u64,
}

impl CachedSvid {
    /// The DER certificates, leaf first, concatenated.
    pub fn chain_der(&self) -> Cow<'_, [u8]> {
        self.chain.der()
    }

    /// The leaf certificate (DER).
    pub fn leaf_der(&self) -> Cow<'_, [u8]> {
        let leaf_len = self.leaf_len as usize;
        match self.chain.der() {
            Cow::Borrowed(chain) => Cow::Borrowed(chain.get(..leaf_len).unwrap_or(chain)),
            Cow::Owned(mut chain) => {
                chain.truncate(leaf_len);
                Cow::Owned(chain)
            }
        }
    }

    /// The DER certificates, leaf first, concatenated, and the private key, PKCS#8 DER: what
    /// serving the SVID needs, the chain decompressed once for both.
    pub fn chain_and_key_der(&self) -> (Vec<u8>, Vec<u8>) {
        let chain = self.chain.der().into_owned();
        let leaf = chain.get(..self.leaf_len as usize).unwrap_or(&chain);
        // Held with this leaf: it rebuilds.
        let key = self.key.pkcs8_der(leaf).unwrap_or_default();
        (chain, key)
    }

    /// The private key, PKCS#8 DER (rebuilt from what is held: a copy).
    pub fn key_pkcs8_der(&self) -> Vec<u8> {
        self.chain_and_key_der().1
    }

    /// The DER certificates, leaf first, one by one.
    pub fn certs_der(&self) -> Vec<Vec<u8>> {
        split_chain(&self.chain.der())
    }
}

/// A concatenated chain as held in a [`CachedSvid`], certificate by certificate.
pub fn split_chain(chain: &[u8]) -> Vec<Vec<u8>> {
    // Stored from a chain that split, so it splits again.
    sigil::x509::split_der_concat(chain).unwrap_or_else(|_| vec![chain.to_vec()])
}

impl std::fmt::Debug for CachedSvid {
    // Keys stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSvid")
            .field("entry_revision", &self.entry_revision)
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

/// An entry that needs a key and CSR ([`make_csrs_for`]).
#[derive(Debug, Clone)]
pub struct CsrTarget {
    /// Entry id.
    pub entry_id: String,
    /// Entry revision at request time.
    pub entry_revision: i64,
    /// The SPIFFE ID the CSR carries.
    pub spiffe_id: String,
}

/// Generates a key and CSR for each target: CPU work (one P-256 key each) that the worker runs
/// on the blocking pool.
pub fn make_csrs_for(targets: Vec<CsrTarget>) -> Result<Vec<PendingCsr>, rcgen::Error> {
    targets
        .into_iter()
        .map(|t| {
            let (key, csr) = make_csr(Some(&t.spiffe_id))?;
            Ok(PendingCsr {
                entry_id: t.entry_id,
                entry_revision: t.entry_revision,
                key_pkcs8_der: key,
                csr_der: csr,
            })
        })
        .collect()
}

/// An entry id, shared by the maps and indexes that name the entry.
pub type EntryId = Arc<str>;

/// True for a `unix:sha256:…` selector: the executable's hash, read only while an entry needs it.
pub fn is_exe_hash(s: &Selector) -> bool {
    s.kind() == "unix" && s.value().starts_with("sha256:")
}

/// What changed between two published snapshots, for waking only the Workload API streams it
/// concerns.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Every stream may be concerned: the first snapshot arrived, the bundle or the federated
    /// bundles changed.
    pub all: bool,
    /// Entries whose part of a caller's view changed: added, changed (old and new versions),
    /// removed, or given a new SVID.
    pub entries: Vec<Arc<RegistrationEntry>>,
}

impl Changes {
    /// A change that concerns every stream.
    pub fn everything() -> Self {
        Self {
            all: true,
            entries: Vec::new(),
        }
    }

    /// Nothing a stream sees changed.
    pub fn is_empty(&self) -> bool {
        !self.all && self.entries.is_empty()
    }
}

/// The entry ids under one selector of the index. Most selectors index a single entry (a
/// workload's own uid or service account), and a persistent set costs a whole node (hundreds of
/// bytes) even for one element, so one id is held inline.
#[derive(Clone, Debug)]
enum IdSet {
    One(EntryId),
    Many(imbl::OrdSet<EntryId>),
}

impl IdSet {
    fn insert(&mut self, id: EntryId) {
        match self {
            IdSet::One(one) if *one == id => {}
            IdSet::One(one) => {
                let mut set = imbl::OrdSet::new();
                set.insert(one.clone());
                set.insert(id);
                *self = IdSet::Many(set);
            }
            IdSet::Many(set) => {
                set.insert(id);
            }
        }
    }

    /// Removes `id`; `true` when the set is then empty.
    fn remove(&mut self, id: &str) -> bool {
        match self {
            IdSet::One(one) => &**one == id,
            IdSet::Many(set) => {
                set.remove(id);
                match set.len() {
                    0 => true,
                    1 => {
                        if let Some(last) = set.get_min().cloned() {
                            *self = IdSet::One(last);
                        }
                        false
                    }
                    _ => false,
                }
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        match self {
            IdSet::One(one) => &**one == id,
            IdSet::Many(set) => set.contains(id),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &EntryId> + '_> {
        match self {
            IdSet::One(one) => Box::new(std::iter::once(one)),
            IdSet::Many(set) => Box::new(set.iter()),
        }
    }
}

/// One held entry with its SVID (once minted), under the entry's id in the cache's map: one map
/// for both, as an agent holds one of each per entry.
#[derive(Clone)]
struct Slot {
    entry: Arc<RegistrationEntry>,
    svid: Option<Arc<CachedSvid>>,
    /// The entry's key in the worker's refresh queue (when it is due, Unix seconds).
    queued_at: i64,
}

/// An immutable view of the cache, as the worker published it last. Cloning is cheap (the maps
/// share structure with the worker's, and a change copies only the paths it touches), so the
/// worker publishes one after every change and readers (Workload API streams, the admin API,
/// readiness) hold one without a lock.
#[derive(Clone, Default)]
pub struct Snapshot {
    has_snapshot: bool,
    revision: i64,
    entries: imbl::OrdMap<EntryId, Slot>,
    /// Entries with an SVID.
    svid_count: usize,
    /// Every entry with selectors, under one of them: the one fewest entries had when it was
    /// indexed (a service account's selector rather than its namespace's). An entry matches a
    /// caller only when all its selectors are the caller's, its index key included, so looking
    /// up each of the caller's selectors finds every match exactly once, among few others.
    by_selector: imbl::OrdMap<Selector, IdSet>,
    /// How many cached SVIDs expire at each NotAfter (Unix seconds): when the next one does,
    /// and whether any has, without an index entry per SVID (rotation replaces SVIDs long
    /// before they expire, so finding which ones did is rare work).
    expiries: imbl::OrdMap<i64, u32>,
    bundle: Option<Arc<pb::Bundle>>,
    /// Bumped whenever the bundle changes.
    bundle_generation: u64,
    /// Trust domain name → its federated bundle.
    federated: Arc<BTreeMap<String, pb::Bundle>>,
    /// Bumped whenever the federated bundles change.
    federated_generation: u64,
    /// Entry id → (entry revision, retry state) for entries whose signing failed since their
    /// last successful one. Kept when the entry changes (it is then due at once, the record is
    /// only history until the next outcome), dropped with the entry or on success.
    sign_failures: imbl::OrdMap<EntryId, Arc<(i64, SignRetry)>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("has_snapshot", &self.has_snapshot)
            .field("revision", &self.revision)
            .field("entries", &self.entries.len())
            .field("svids", &self.svid_count)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// The highest entry revision applied.
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
        self.bundle.as_deref()
    }

    /// A number that changes whenever the bundle does.
    pub fn bundle_generation(&self) -> u64 {
        self.bundle_generation
    }

    /// The federated bundles held, by trust domain name (e.g. `other.org`).
    pub fn federated_bundles(&self) -> &BTreeMap<String, pb::Bundle> {
        &self.federated
    }

    /// A number that changes whenever the federated bundles do.
    pub fn federated_generation(&self) -> u64 {
        self.federated_generation
    }

    /// Entries held.
    pub fn entries(&self) -> impl Iterator<Item = &RegistrationEntry> {
        self.entries.values().map(|s| &*s.entry)
    }

    /// The entry `id`, if held.
    pub fn entry(&self, id: &str) -> Option<&RegistrationEntry> {
        self.entries.get(id).map(|s| &*s.entry)
    }

    /// Number of entries held.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// The entries whose selectors (one or more) are all among `selectors`, in no order: each
    /// of the caller's selectors is looked up in the index, so the cost follows the entries
    /// that share a selector with the caller, not the entries held.
    pub fn matching(&self, selectors: &SelectorSet) -> Vec<&RegistrationEntry> {
        let mut out = Vec::new();
        for s in selectors {
            let Some(ids) = self.by_selector.get(s) else {
                continue;
            };
            for id in ids.iter() {
                if let Some(Slot { entry: e, .. }) = self.entries.get(id) {
                    if e.selectors.is_subset_of(selectors) {
                        out.push(&**e);
                    }
                }
            }
        }
        out
    }

    /// Every cached SVID with its entry.
    pub fn svids(&self) -> impl Iterator<Item = (&RegistrationEntry, &CachedSvid)> {
        self.entries
            .values()
            .filter_map(|s| Some((&*s.entry, s.svid.as_deref()?)))
    }

    /// Number of cached SVIDs.
    pub fn svid_count(&self) -> usize {
        self.svid_count
    }

    /// The SVID of an entry, if minted.
    pub fn svid(&self, entry_id: &str) -> Option<&CachedSvid> {
        self.entries.get(entry_id).and_then(|s| s.svid.as_deref())
    }

    /// The failures recorded for `entry_id` since its last successful signing, if any (of its
    /// current revision or an earlier one).
    pub fn sign_failure(&self, entry_id: &str) -> Option<&SignRetry> {
        self.sign_failures.get(entry_id).map(|f| &f.1)
    }

    /// Entries backing off after failed signings of their current revision, with their state.
    pub fn sign_backoff(&self) -> impl Iterator<Item = (&RegistrationEntry, &SignRetry)> {
        self.sign_failures.iter().filter_map(|(id, f)| {
            self.entries
                .get(id)
                .filter(|s| s.entry.revision == f.0)
                .map(|s| (&*s.entry, &f.1))
        })
    }

    /// The cached SVIDs that have expired at `now` (they are never served), with their entries,
    /// by entry id. Reads every SVID, but only when one has expired.
    pub fn expired_svids(
        &self,
        now: i64,
    ) -> impl Iterator<Item = (&RegistrationEntry, &CachedSvid)> {
        let any = self.expiries.range(..=now).next().is_some();
        self.entries
            .values()
            .take_while(move |_| any)
            .filter_map(move |s| {
                let svid = s.svid.as_deref()?;
                (svid.not_after <= now).then_some((&*s.entry, svid))
            })
    }

    /// The earliest NotAfter after `now` of any cached SVID: when the next one expires.
    pub fn next_expiry_after(&self, now: i64) -> Option<i64> {
        self.expiries
            .range(now.saturating_add(1)..)
            .next()
            .map(|(t, _)| *t)
    }

    /// The entries whose SVIDs expire after `after` and at or before `upto`. Reads every SVID,
    /// but only when one expires in that time.
    pub fn expiring(&self, after: i64, upto: i64) -> Vec<Arc<RegistrationEntry>> {
        let after = after.saturating_add(1);
        if after > upto || self.expiries.range(after..=upto).next().is_none() {
            return Vec::new();
        }
        self.entries
            .values()
            .filter(|s| {
                s.svid
                    .as_ref()
                    .is_some_and(|v| (after..=upto).contains(&v.not_after))
            })
            .map(|s| s.entry.clone())
            .collect()
    }
}

/// The agent's cache: entries, SVIDs and bundles, owned by the worker (no lock). Reads go to
/// the current [`Snapshot`] (`Deref`); [`Cache::snapshot`] is the copy the worker publishes.
#[derive(Default)]
pub struct Cache {
    view: Snapshot,
    /// Chunks of a snapshot in progress, when it replaces entries held.
    incoming_snapshot: Option<HashMap<String, RegistrationEntry>>,
    /// A snapshot into an empty cache (the agent's first) is in progress: its chunks are
    /// applied as they arrive (no workload sees them before `has_snapshot`), so the last
    /// chunk leaves little to do.
    direct_snapshot: bool,
    /// Entries added or changed so far by the direct snapshot in progress (reported with its
    /// last chunk).
    direct_upserted: usize,
    /// Where a reconnect may resume: the server's roots digest of the set held at
    /// `view.revision` (empty: never sent, e.g. by an older server).
    sync_roots: Vec<u8>,
    /// A round of changes was applied in part (`more_follows`): the set held is at no single
    /// revision until one completes or a snapshot replaces it.
    round_open: bool,
    /// Entries with a `unix:sha256` selector (keeps `exe_hash_flag` without a scan).
    exe_hash_entries: usize,
    /// The parent ID of the last entry stored, whose copy the next entries with that parent
    /// share.
    shared_parent: Option<sigil::SpiffeId>,
    /// How many entries have each selector (picks index keys); its keys are the shared copies
    /// the entries' selectors are made.
    selector_counts: HashMap<Selector, usize>,
    /// True while some entry has a `unix:sha256` selector: the workload attestor reads it to
    /// hash executables only when an entry needs it.
    exe_hash_flag: Arc<AtomicBool>,
    /// (when due, entry id) for every entry: the refresh queue.
    /// An entry's key in it is kept in its slot (`queued_at`).
    refresh_queue: BTreeSet<(i64, EntryId)>,
    /// Compresses the SVIDs' chains against one of the same authority.
    chains: ChainPacker,
    /// The last SVID generation handed out.
    svid_generation: u64,
    /// What changed since the last [`Cache::take_changes`].
    changes: Changes,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view.fmt(f)
    }
}

impl std::ops::Deref for Cache {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.view
    }
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
    /// SVIDs made due now because the bundle marks their issuer tainted.
    pub tainted_svids: usize,
    /// The set of federated bundles changed (one added, removed or replaced).
    pub federated_changed: bool,
    /// A snapshot finished (or none was pending).
    pub complete: bool,
    /// The message opened a resumed stream.
    pub resumed: bool,
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state, to publish: cheap, it shares structure with the cache.
    pub fn snapshot(&self) -> Snapshot {
        self.view.clone()
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The flag that is true while some cached entry has a `unix:sha256` selector (shared: the
    /// workload attestor holds it, see `WorkloadAttestor::with_exe_hash_flag`).
    pub fn exe_hash_flag(&self) -> Arc<AtomicBool> {
        self.exe_hash_flag.clone()
    }

    /// Indexes entry `id` under one of its selectors: the one fewest held entries have. Its
    /// selectors are made the cache's shared copies first (`selector_counts` holds one of each
    /// selector held), so the entries of a namespace or service account share its text.
    fn index(&mut self, id: &EntryId, e: &mut RegistrationEntry) {
        e.selectors.map_equal(|s| {
            self.selector_counts
                .get_key_value(s)
                .map_or_else(|| s.clone(), |(shared, _)| shared.clone())
        });
        let key = e
            .selectors
            .iter()
            .min_by_key(|s| self.selector_counts.get(*s).copied().unwrap_or(0))
            .cloned();
        for sel in &e.selectors {
            *self.selector_counts.entry(sel.clone()).or_default() += 1;
        }
        if let Some(key) = key {
            match self.view.by_selector.get_mut(&key) {
                Some(ids) => ids.insert(id.clone()),
                None => {
                    self.view.by_selector.insert(key, IdSet::One(id.clone()));
                }
            }
        }
        if e.selectors.iter().any(is_exe_hash) {
            self.exe_hash_entries += 1;
        }
    }

    fn unindex(&mut self, id: &str, e: &RegistrationEntry) {
        for sel in &e.selectors {
            if let Some(n) = self.selector_counts.get_mut(sel) {
                *n -= 1;
                if *n == 0 {
                    self.selector_counts.remove(sel);
                }
            }
        }
        // Indexed under exactly one of its selectors (no map of which: it would cost more
        // than looking in the few sets the entry's selectors name).
        for sel in &e.selectors {
            let Some(ids) = self.view.by_selector.get_mut(sel) else {
                continue;
            };
            if ids.contains(id) {
                if ids.remove(id) {
                    self.view.by_selector.remove(sel);
                }
                break;
            }
        }
        if e.selectors.iter().any(is_exe_hash) {
            self.exe_hash_entries -= 1;
        }
    }

    /// Makes `e` hold shared copies of its parent ID and its trust domain name when they are
    /// those of the entry before it (entries under one node alias all have the same).
    fn share_ids(&mut self, e: &mut RegistrationEntry) {
        match &self.shared_parent {
            Some(p) if *p == e.parent_id => e.parent_id = p.clone(),
            _ => self.shared_parent = Some(e.parent_id.clone()),
        }
        if let Some(p) = &self.shared_parent {
            e.spiffe_id.share_trust_domain(p.trust_domain());
        }
    }

    /// Adds or replaces an entry; false when it is held unchanged.
    fn upsert_entry(&mut self, mut e: RegistrationEntry) -> bool {
        let (id, old) = match self.view.entries.get_key_value(e.id.as_str()) {
            Some((_, old)) if *old.entry == e => return false,
            Some((k, old)) => (k.clone(), Some(old.clone())),
            None => (Arc::from(e.id.as_str()), None),
        };
        if let Some(old) = &old {
            self.unindex(&id, &old.entry);
            self.changes.entries.push(old.entry.clone());
        }
        self.index(&id, &mut e);
        self.share_ids(&mut e);
        let new = Arc::new(e);
        self.changes.entries.push(new.clone());
        // The SVID minted for the former revision stays (served until the new one arrives).
        let queued = old.is_some();
        let (svid, queued_at) = old.map_or((None, 0), |o| (o.svid, o.queued_at));
        self.place(
            &id,
            Slot {
                entry: new,
                svid,
                queued_at,
            },
            queued,
        );
        true
    }

    /// One SVID expiring at `not_after` less.
    fn forget_expiry(&mut self, not_after: i64) {
        if let Some(n) = self.view.expiries.get_mut(&not_after) {
            *n -= 1;
            if *n == 0 {
                self.view.expiries.remove(&not_after);
            }
        }
    }

    /// Stores `slot` under `id`, queued for when it is due (when `queued`, its former place in
    /// the refresh queue, `slot.queued_at`, left first).
    fn place(&mut self, id: &EntryId, mut slot: Slot, queued: bool) {
        if queued {
            self.refresh_queue.remove(&(slot.queued_at, id.clone()));
        }
        slot.queued_at = self.due_at(id, &slot);
        self.refresh_queue.insert((slot.queued_at, id.clone()));
        self.view.entries.insert(id.clone(), slot);
    }

    /// Removes an entry with its SVID and failure record; false when it is not held.
    fn remove_entry(&mut self, id: &str) -> bool {
        let Some((key, old)) = self.view.entries.remove_with_key(id) else {
            return false;
        };
        self.unindex(id, &old.entry);
        if let Some(s) = &old.svid {
            self.forget_expiry(s.not_after);
            self.view.svid_count -= 1;
        }
        self.view.sign_failures.remove(id);
        self.refresh_queue.remove(&(old.queued_at, key));
        self.changes.entries.push(old.entry);
        true
    }

    /// What a new sync stream may resume from: `(known_revision, known_roots)`, `(0, [])` when
    /// nothing can (no complete set held, or a round of changes was cut off).
    pub fn resume_point(&self) -> (i64, Vec<u8>) {
        if self.view.has_snapshot && !self.round_open && !self.sync_roots.is_empty() {
            (self.view.revision, self.sync_roots.clone())
        } else {
            (0, Vec::new())
        }
    }

    /// Applies one sync message. A snapshot arrives in chunks (`full` on the first,
    /// `snapshot_complete` on the last) and replaces everything only once complete, so a
    /// connection lost mid-snapshot leaves the previous state intact. A resumed stream
    /// (`resumed` on its first message) is applied as changes to what is held.
    pub fn apply_sync(&mut self, msg: pb::SyncResponse) -> Result<SyncOutcome, CacheError> {
        let mut out = SyncOutcome::default();
        if msg.resumed {
            if !self.view.has_snapshot {
                return Err(CacheError::NoSnapshot);
            }
            // A snapshot cut off on an earlier stream is not continued by this one.
            self.incoming_snapshot = None;
            self.direct_snapshot = false;
            out.resumed = true;
        }
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
            // Nothing held: nothing to keep if the snapshot is cut off (a later one replaces
            // what it applied, as the difference below).
            self.direct_snapshot = !self.view.has_snapshot && self.view.entries.is_empty();
            self.direct_upserted = 0;
            self.incoming_snapshot = (!self.direct_snapshot).then(HashMap::new);
        }
        if self.direct_snapshot {
            for e in upserted {
                if self.upsert_entry(e) {
                    self.direct_upserted += 1;
                }
            }
            for id in &msg.removed {
                if self.remove_entry(id) {
                    out.removed += 1;
                }
            }
            // Counted for the whole snapshot, like a replacing one.
            out.upserted = self.direct_upserted;
            if msg.snapshot_complete {
                self.direct_snapshot = false;
                self.complete_snapshot(msg.revision, msg.roots);
                out.complete = true;
            }
        } else if let Some(snapshot) = self.incoming_snapshot.as_mut() {
            for e in upserted {
                snapshot.insert(e.id.clone(), e);
            }
            for id in &msg.removed {
                snapshot.remove(id);
            }
            if msg.snapshot_complete {
                let snapshot = self.incoming_snapshot.take().unwrap_or_default();
                // Applied as the difference from what is held: unchanged entries keep their
                // place (and their SVIDs) at no cost.
                let gone: Vec<EntryId> = self
                    .view
                    .entries
                    .keys()
                    .filter(|id| !snapshot.contains_key(&***id))
                    .cloned()
                    .collect();
                for id in &gone {
                    self.remove_entry(id);
                }
                out.removed = gone.len();
                for (_, e) in snapshot {
                    if self.upsert_entry(e) {
                        out.upserted += 1;
                    }
                }
                self.complete_snapshot(msg.revision, msg.roots);
                out.complete = true;
            }
        } else {
            if !self.view.has_snapshot {
                return Err(CacheError::NoSnapshot);
            }
            out.upserted = upserted.len();
            for e in upserted {
                self.upsert_entry(e);
            }
            for id in &msg.removed {
                if self.remove_entry(id) {
                    out.removed += 1;
                }
            }
            self.view.revision = self.view.revision.max(msg.revision);
            self.round_open = msg.more_follows;
            if !msg.more_follows {
                self.sync_roots = msg.roots;
            }
            out.complete = true;
        }
        self.exe_hash_flag
            .store(self.exe_hash_entries > 0, Ordering::SeqCst);
        if let Some(b) = msg.bundle {
            if self.view.bundle.as_deref() != Some(&b) {
                self.view.bundle = Some(Arc::new(b));
                self.view.bundle_generation += 1;
                self.changes.all = true;
                out.bundle_changed = true;
                out.tainted_svids = self.remint_tainted();
            }
        }
        if let Some(set) = federated {
            if *self.view.federated != set {
                self.view.federated = Arc::new(set);
                self.view.federated_generation += 1;
                self.changes.all = true;
                out.federated_changed = true;
            }
        }
        Ok(out)
    }

    /// A snapshot's last chunk was applied: the set held is the server's at `revision`.
    fn complete_snapshot(&mut self, revision: i64, roots: Vec<u8>) {
        if !self.view.has_snapshot {
            // Streams waiting for the first entries look again.
            self.changes.all = true;
        }
        self.view.has_snapshot = true;
        self.view.revision = revision;
        self.sync_roots = roots;
        self.round_open = false;
    }

    /// True while a snapshot's chunks are arriving (the set held is not yet complete).
    pub fn snapshot_in_progress(&self) -> bool {
        self.direct_snapshot || self.incoming_snapshot.is_some()
    }

    /// When `e` needs a (new) SVID, Unix seconds (0: now): none yet or minted for an older
    /// revision of the entry → now, else its refresh time; in both cases not before the retry
    /// time of a refused signing of this revision.
    fn due_at(&self, id: &str, slot: &Slot) -> i64 {
        let revision = slot.entry.revision;
        let wanted = match &slot.svid {
            Some(s) if s.entry_revision == revision => s.refresh_at,
            _ => 0,
        };
        match self.view.sign_failures.get(id) {
            Some(f) if f.0 == revision => wanted.max(f.1.retry_at),
            _ => wanted,
        }
    }

    /// Whether `leaf_der` was issued by an X.509 authority the bundle marks tainted.
    pub fn issued_by_tainted(&self, leaf_der: &[u8]) -> bool {
        let Some(b) = self.view.bundle.as_deref() else {
            return false;
        };
        !b.tainted_x509_authorities.is_empty()
            && authority_key_id(leaf_der).is_some_and(|k| b.tainted_x509_authorities.contains(&k))
    }

    /// Makes every SVID issued by a tainted authority due now (not at its half-life); returns
    /// how many.
    fn remint_tainted(&mut self) -> usize {
        // Most bundle changes taint nothing: no scan of every SVID for them.
        if self
            .view
            .bundle
            .as_ref()
            .is_none_or(|b| b.tainted_x509_authorities.is_empty())
        {
            return 0;
        }
        let tainted: Vec<(EntryId, Slot)> = self
            .view
            .entries
            .iter()
            .filter(|(_, s)| {
                s.svid
                    .as_ref()
                    .is_some_and(|s| s.refresh_at > 0 && self.issued_by_tainted(&s.leaf_der()))
            })
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let count = tainted.len();
        for (id, mut slot) in tainted {
            if let Some(svid) = &mut slot.svid {
                Arc::make_mut(svid).refresh_at = 0;
            }
            self.place(&id, slot, true);
        }
        count
    }

    /// Puts entry `id` at its place in the refresh queue (after its entry, SVID or failure
    /// record changed).
    fn requeue(&mut self, id: &EntryId) {
        let Some(slot) = self.view.entries.get(id).cloned() else {
            return;
        };
        self.place(id, slot, true);
    }

    /// Entry ids that need an SVID now: none yet, minted for an older revision of the entry, or
    /// at/after their refresh time (see `due_at`). Sorted for deterministic batches.
    /// Read from the refresh queue: the cost follows the entries due, not the entries held.
    pub fn due(&self, now: i64) -> Vec<EntryId> {
        let mut due: Vec<EntryId> = self
            .refresh_queue
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| id.clone())
            .collect();
        due.sort();
        due
    }

    /// When the next entry becomes due (when to wake next; a time in the past means now), if
    /// any entry is held.
    pub fn next_refresh(&self) -> Option<i64> {
        self.refresh_queue.first().map(|(t, _)| *t)
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
        let (id, slot) = self.view.entries.get_key_value(entry_id)?;
        let (id, spiffe_id) = (id.clone(), slot.entry.spiffe_id.to_string());
        // A failure of an earlier revision says nothing about this one: start over.
        let prev = self
            .view
            .sign_failures
            .get(entry_id)
            .filter(|f| f.0 == revision)
            .map(|f| &f.1);
        let (retry, kind) = SignRetry::after_failure(prev, reason, now, jitter);
        self.view
            .sign_failures
            .insert(id.clone(), Arc::new((revision, retry.clone())));
        self.requeue(&id);
        Some(SignFailureNote {
            spiffe_id,
            retry,
            kind,
        })
    }

    /// The entries `ids` (those still held) as key and CSR targets.
    pub fn csr_targets<S: AsRef<str>>(&self, ids: &[S]) -> Vec<CsrTarget> {
        ids.iter()
            .filter_map(|id| self.view.entries.get(id.as_ref()))
            .map(|Slot { entry: e, .. }| CsrTarget {
                entry_id: e.id.clone(),
                entry_revision: e.revision,
                spiffe_id: e.spiffe_id.to_string(),
            })
            .collect()
    }

    /// Generates a key and CSR for each entry id (skipping ids no longer held), on the calling
    /// thread (the worker uses [`Cache::csr_targets`] and [`make_csrs_for`] on the blocking
    /// pool).
    pub fn make_csrs<S: AsRef<str>>(&self, ids: &[S]) -> Result<Vec<PendingCsr>, rcgen::Error> {
        make_csrs_for(self.csr_targets(ids))
    }

    /// Stores a signed SVID for a pending CSR. Ignored (returns false) when the entry is gone.
    pub fn store_svid(
        &mut self,
        pending: PendingCsr,
        chain_der: Vec<Vec<u8>>,
        not_after: i64,
        now: i64,
    ) -> bool {
        let Some((id, slot)) = self.view.entries.get_key_value(pending.entry_id.as_str()) else {
            return false;
        };
        let (id, mut slot) = (id.clone(), slot.clone());
        let refresh_at = refresh_time(
            now,
            not_after,
            rand::rng().random_range(0.0..=MAX_JITTER_FRACTION),
        )
        .max(now + refresh_floor(now, not_after));
        self.view.sign_failures.remove(&id);
        self.svid_generation += 1;
        let leaf = chain_der.first().map_or(&[][..], Vec::as_slice);
        let leaf_len = leaf.len() as u32;
        let key = HeldKey::new(pending.key_pkcs8_der, leaf);
        let svid = CachedSvid {
            entry_revision: pending.entry_revision,
            chain: self.chains.hold(chain_der.concat()),
            leaf_len,
            key,
            issued_at: now,
            not_after,
            refresh_at,
            generation: self.svid_generation,
        };
        match slot.svid.replace(Arc::new(svid)) {
            Some(old) => self.forget_expiry(old.not_after),
            None => self.view.svid_count += 1,
        }
        *self.view.expiries.entry(not_after).or_insert(0) += 1;
        self.changes.entries.push(slot.entry.clone());
        self.place(&id, slot, true);
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

/// The least time (seconds) before an SVID received at `received_at`, valid until `not_after`,
/// is renewed: [`MIN_REFRESH_INTERVAL`], or for one with less than twice that left, half of
/// what it has left, at least [`MIN_SHORT_REFRESH_INTERVAL`] (so it is renewed before it
/// expires, once the server has a new authority). Already expired: [`MIN_REFRESH_INTERVAL`].
pub fn refresh_floor(received_at: i64, not_after: i64) -> i64 {
    let left = not_after - received_at;
    if left <= 0 {
        MIN_REFRESH_INTERVAL
    } else {
        (left / 2).clamp(MIN_SHORT_REFRESH_INTERVAL, MIN_REFRESH_INTERVAL)
    }
}

/// The authority key identifier of a certificate (its issuer's subject key ID), lowercase hex.
pub fn authority_key_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| hex::encode(k.0))
            }
            _ => None,
        })
}

/// When to renew the agent SVID received at `received_at` and valid until `not_after`: at half
/// its lifetime, but never within [`refresh_floor`] of receiving it.
pub fn agent_svid_renew_at(received_at: i64, not_after: i64) -> i64 {
    refresh_time(received_at, not_after, 0.0)
        .max(received_at + refresh_floor(received_at, not_after))
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
