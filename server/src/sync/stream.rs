//! The server side of `Node.Sync`: one stream per connected agent.
//!
//! 1. **Snapshot or resume.** A stream starts with the agent's complete authorised set,
//!    `full = true` on the first message and `snapshot_complete = true` on the last, in messages
//!    of at most [`MAX_ENTRIES_PER_MESSAGE`] entries and [`MAX_BYTES_PER_MESSAGE`] encoded
//!    bytes, so there is no message-size cliff. The set is one consistent read
//!    ([`Datastore::read_authorized`]) and carries its revision. The bundle is included when its
//!    sequence differs from the agent's `known_bundle_sequence`.
//!
//!    An agent reconnecting with a complete set (its `known_revision` and `known_roots`, the
//!    `revision` and `roots` of the last round it applied in full) is sent only what changed
//!    since instead, when the server can tell exactly what that is; the first message then says
//!    `resumed`. The server computes the set afresh from its own data and reads the entry
//!    history since the revision ([`Datastore::entry_history_since`]) at the same revision, and
//!    resumes only if (a) the history is complete (tombstones and moves are kept for
//!    [`crate::datastore::ENTRY_HISTORY_RETENTION`], 24 h: an older revision, or one the
//!    datastore has not reached, gets a snapshot), (b) the roots (the agent's ID and its node
//!    aliases, as a digest) are those the agent's set was computed for, and (c) no parent link
//!    created, moved or deleted since hangs above an entry unchanged since: such a change can
//!    authorise or unauthorise entries that did not change themselves (a moved subtree, a
//!    deleted parent, a new parent of old orphans), which the history does not name. Then every
//!    unchanged entry is as authorised as it was, and the round holds the upserts of authorised
//!    entries changed since and the removals of changed or deleted entries the agent may hold
//!    (ids only). Whatever the request says, upserts come from the set computed for this agent:
//!    a forged revision or digest can only cost the agent entries, never give it others'.
//!    Anything else is a snapshot, which is always correct. Every round's messages but the last
//!    carry `more_follows`, so an agent cut off mid-round knows its set is at no revision.
//! 2. **Incremental.** The stream sleeps until [`SyncEvents`] announces a change (or the
//!    reconcile timer fires), then reads `entry_changes_since(last revision)` and sends upserts
//!    of changed authorised entries and removals of deleted or no-longer-authorised entries the
//!    agent holds (the stream tracks the id and revision of everything it sent). The first change
//!    after a quiet period is sent at once; a burst is coalesced into at most one round per
//!    [`MIN_ROUND_INTERVAL`]. Nothing is sent when nothing relevant changed. A change that can
//!    move whole subtrees (a node alias for this agent, an entry whose SPIFFE ID has children
//!    gaining or losing authorisation) recomputes the set and sends the difference.
//! 3. **Reconcile.** Every `reconcile_every` the set is recomputed and diffed against what was
//!    sent, repairing anything an event could not have told (e.g. changes made by another
//!    process on the same database).
//!
//! **Federated bundles.** The agent is sent the bundles of the foreign trust domains named in the
//! `federates_with` of the entries it is authorised for (and only those: an agent learns nothing
//! about federations its workloads do not use), always as the complete set
//! (`federated_bundles_set`): on the first message of every snapshot, and whenever that set
//! changes — a federated bundle set or deleted (a [`SyncEvents`] signal), or entries gaining or
//! losing a `federates_with` trust domain. Reconciles re-check it too.
//!
//! The agent record is read on every wake: evicted or banned ends the stream with
//! `PermissionDenied`; changed node selectors trigger a recompute. Backpressure: nothing new is
//! computed until the previous round's messages were taken by the transport, and events
//! meanwhile coalesce in the watch channel.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use sigil::entry::RegistrationEntry;
use sigil::proto::admin as admin_pb;
use sigil::proto::node as pb;
use sigil::{SelectorSet, SpiffeId, TrustDomain};
use tokio::time::Instant;
use tonic::Status;

use super::authz::{alias_matches, compute, has_children, AuthorizedSet};
use super::events::{SyncEvents, SyncSubscriber};
use super::{
    MAX_BYTES_PER_MESSAGE, MAX_ENTRIES_PER_MESSAGE, MAX_REMOVED_PER_MESSAGE, MIN_RECONCILE_EVERY,
    MIN_ROUND_INTERVAL,
};
use crate::api::admin::ds_status;
use crate::datastore::{AttestedAgent, Datastore, EntryChanges, EntryHistory, StoredBundle};

/// Children probes in flight at once when classifying a change.
const PROBE_CONCURRENCY: usize = 4;
/// Reads of the set and the history a resume tries before a snapshot is sent instead (entries
/// changing between the two reads).
const RESUME_ATTEMPTS: u32 = 3;

/// `d` from now; a year from now if that overflows (a configured `Duration::MAX`).
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// The `Sync` response stream for the agent `agent_id` (already authenticated by the caller).
///
/// `server_id` is the server's SPIFFE ID (parent of node aliases), `trust_domain` selects the
/// bundle, `reconcile_every` is the full-recompute interval (e.g.
/// [`super::DEFAULT_RECONCILE_EVERY`]; at least [`MIN_RECONCILE_EVERY`]). The stream subscribes
/// to `events` immediately, so changes published after this call are never missed. It ends with
/// `PermissionDenied` when the agent is evicted or banned, and with the mapped status on a
/// datastore failure (the agent reconnects, resuming or with a fresh snapshot); otherwise it runs
/// until the client goes away.
pub fn sync_stream(
    ds: Arc<dyn Datastore>,
    events: SyncEvents,
    agent_id: SpiffeId,
    server_id: SpiffeId,
    trust_domain: TrustDomain,
    req: pb::SyncRequest,
    reconcile_every: Duration,
) -> impl Stream<Item = Result<pb::SyncResponse, Status>> + Send + 'static {
    let reconcile_every = reconcile_every.max(MIN_RECONCILE_EVERY);
    // A stream starts knowing the agent has no taint unless some is published: the bundle
    // (with the taint) is then sent even when its sequence is the agent's.
    let taint_sent = if events.taint().x509.is_empty() && events.taint().jwt.is_empty() {
        events.current().taint_generation
    } else {
        events.current().taint_generation.wrapping_sub(1)
    };
    let syncer = Syncer {
        ds,
        sub: events.subscribe(),
        events: events.clone(),
        taint_sent,
        events_open: true,
        agent_id,
        server_id,
        trust_domain,
        reconcile_every,
        selectors: SelectorSet::new(),
        known_revision: req.known_revision,
        known_roots: req.known_roots,
        last_revision: 0,
        bundle_sequence: req.known_bundle_sequence,
        federated_seen: 0,
        federated_relevant: BTreeSet::new(),
        federated_sent: None,
        tracked: Tracked::default(),
        outbox: Outbox::default(),
        phase: Phase::Snapshot,
        next_reconcile: after(reconcile_every),
        last_round: None,
    };
    futures::stream::unfold(syncer, |mut s| async move {
        let item = s.next_item().await?;
        Some((item, s))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Snapshot,
    Live,
    Done,
}

/// What the agent was sent for one entry.
#[derive(Debug)]
struct Sent {
    spiffe_id: SpiffeId,
    revision: i64,
    /// The entry's `federates_with`, counted in [`Tracked::federates`].
    federates_with: Vec<TrustDomain>,
}

impl Sent {
    fn of(e: &RegistrationEntry) -> Self {
        Self {
            spiffe_id: e.spiffe_id.clone(),
            revision: e.revision,
            federates_with: e.federates_with.clone(),
        }
    }
}

/// What this stream has told the agent, and the roots it was computed from.
#[derive(Debug, Default)]
struct Tracked {
    /// Entry id → what was sent.
    sent: HashMap<String, Sent>,
    /// SPIFFE ID → number of sent entries with it (the IDs that authorise children).
    provided: HashMap<SpiffeId, u32>,
    /// Foreign trust domain → number of sent entries federating with it (whose bundles the
    /// agent needs).
    federates: HashMap<TrustDomain, u32>,
    /// The agent's ID and the SPIFFE IDs of its matching node aliases.
    roots: HashSet<SpiffeId>,
    /// Entry ids of the matching node aliases.
    alias_ids: HashSet<String>,
    /// [`roots_digest`] of `roots`.
    digest: Vec<u8>,
}

impl Tracked {
    /// True if entries whose parent is `parent` are authorised.
    fn grants(&self, parent: &SpiffeId, server_id: &SpiffeId) -> bool {
        parent != server_id && (self.roots.contains(parent) || self.provided.contains_key(parent))
    }

    fn insert(&mut self, e: &RegistrationEntry) {
        if let Some(old) = self.sent.insert(e.id.clone(), Sent::of(e)) {
            self.release(&old);
        }
        *self.provided.entry(e.spiffe_id.clone()).or_default() += 1;
        for td in &e.federates_with {
            *self.federates.entry(td.clone()).or_default() += 1;
        }
    }

    /// Forgets `id`; true if it had been sent.
    fn remove(&mut self, id: &str) -> bool {
        match self.sent.remove(id) {
            Some(old) => {
                self.release(&old);
                true
            }
            None => false,
        }
    }

    /// Drops the counts an entry that is no longer sent (as `old`) contributed.
    fn release(&mut self, old: &Sent) {
        decrement(&mut self.provided, &old.spiffe_id);
        for td in &old.federates_with {
            decrement(&mut self.federates, td);
        }
    }

    /// The foreign trust domains whose bundles the agent needs.
    fn federated_trust_domains(&self) -> BTreeSet<TrustDomain> {
        self.federates.keys().cloned().collect()
    }

    /// Replaces the state with a freshly computed set; returns what to send: entries new or
    /// changed since they were sent, and ids sent but no longer authorised.
    fn replace(&mut self, set: AuthorizedSet) -> (Vec<RegistrationEntry>, Vec<String>) {
        let mut sent = HashMap::with_capacity(set.entries.len());
        let mut provided: HashMap<SpiffeId, u32> = HashMap::with_capacity(set.entries.len());
        let mut federates: HashMap<TrustDomain, u32> = HashMap::new();
        let mut upserts = Vec::new();
        for e in set.entries {
            let unchanged = self
                .sent
                .get(&e.id)
                .is_some_and(|s| s.revision == e.revision);
            // `compute` lists each id once; a duplicate would be ignored here.
            if let MapEntry::Vacant(v) = sent.entry(e.id.clone()) {
                v.insert(Sent::of(&e));
                *provided.entry(e.spiffe_id.clone()).or_default() += 1;
                for td in &e.federates_with {
                    *federates.entry(td.clone()).or_default() += 1;
                }
                if !unchanged {
                    upserts.push(e);
                }
            }
        }
        let removed = self
            .sent
            .keys()
            .filter(|id| !sent.contains_key(*id))
            .cloned()
            .collect();
        *self = Tracked {
            sent,
            provided,
            federates,
            digest: roots_digest(&set.roots),
            roots: set.roots,
            alias_ids: set.alias_ids,
        };
        (upserts, removed)
    }
}

/// The `roots` value of a set computed from `roots`: SHA-256 of the sorted IDs, one per line.
/// Opaque to the agent, which sends it back as `known_roots`.
fn roots_digest(roots: &HashSet<SpiffeId>) -> Vec<u8> {
    let mut ids: Vec<String> = roots.iter().map(ToString::to_string).collect();
    ids.sort_unstable();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for id in &ids {
        ctx.update(id.as_bytes());
        ctx.update(b"\n");
    }
    ctx.finish().as_ref().to_vec()
}

/// Decrements a reference count, forgetting the key at zero.
fn decrement<K: std::hash::Hash + Eq + Clone>(counts: &mut HashMap<K, u32>, key: &K) {
    if let MapEntry::Occupied(mut o) = counts.entry(key.clone()) {
        *o.get_mut() -= 1;
        if *o.get() == 0 {
            o.remove();
        }
    }
}

/// Messages of the current round, built lazily (a 100,000-entry snapshot is converted to protobuf
/// one message at a time).
#[derive(Debug, Default)]
struct Outbox {
    entries: VecDeque<RegistrationEntry>,
    /// An entry already converted that did not fit into the previous message.
    carry: Option<admin_pb::Entry>,
    removed: VecDeque<String>,
    bundle: Option<pb::Bundle>,
    /// The complete federated set, when it is to be sent (on the round's first message).
    federated: Option<Vec<pb::Bundle>>,
    kind: RoundKind,
    /// The round's first message is still to be sent (a snapshot or a resumed stream sends
    /// one even when empty).
    first_pending: bool,
    revision: i64,
    /// [`roots_digest`] of the roots the round's set was computed for.
    roots: Vec<u8>,
}

/// What a round of messages is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum RoundKind {
    /// Changes since the previous round.
    #[default]
    Increment,
    /// The complete set (`full` ... `snapshot_complete`).
    Snapshot,
    /// The first round of a resumed stream: changes since the agent's `known_revision`.
    Resumed,
}

impl Outbox {
    fn load(&mut self, round: Round, bundles: Bundles, kind: RoundKind, roots: Vec<u8>) {
        let (entries, removed, revision) = round;
        let Bundles { bundle, federated } = bundles;
        let first_pending = kind != RoundKind::Increment
            || !entries.is_empty()
            || !removed.is_empty()
            || bundle.is_some()
            || federated.is_some();
        *self = Outbox {
            entries: entries.into(),
            carry: None,
            removed: removed.into(),
            bundle,
            federated,
            kind,
            first_pending,
            revision,
            roots,
        };
    }

    fn drained(&self) -> bool {
        self.carry.is_none() && self.entries.is_empty() && self.removed.is_empty()
    }

    fn next_message(&mut self) -> Option<pb::SyncResponse> {
        if !self.first_pending
            && self.drained()
            && self.bundle.is_none()
            && self.federated.is_none()
        {
            return None;
        }
        let first = std::mem::take(&mut self.first_pending);
        let mut upserted = Vec::new();
        let mut bytes = 0usize;
        while upserted.len() < MAX_ENTRIES_PER_MESSAGE {
            let next = match self.carry.take() {
                Some(p) => p,
                None => match self.entries.pop_front() {
                    Some(e) => e.to_proto(),
                    None => break,
                },
            };
            let len = next.encoded_len();
            if !upserted.is_empty() && bytes + len > MAX_BYTES_PER_MESSAGE {
                self.carry = Some(next);
                break;
            }
            bytes += len;
            upserted.push(next);
        }
        let n = self.removed.len().min(MAX_REMOVED_PER_MESSAGE);
        let removed = self.removed.drain(..n).collect();
        let federated = self.federated.take();
        let snapshot = self.kind == RoundKind::Snapshot;
        Some(pb::SyncResponse {
            upserted,
            removed,
            bundle: self.bundle.take(),
            full: snapshot && first,
            snapshot_complete: snapshot && self.drained(),
            revision: self.revision,
            federated_bundles_set: federated.is_some(),
            federated_bundles: federated.unwrap_or_default(),
            resumed: self.kind == RoundKind::Resumed && first,
            more_follows: !self.drained(),
            roots: self.roots.clone(),
        })
    }
}

struct Syncer {
    ds: Arc<dyn Datastore>,
    sub: SyncSubscriber,
    /// For the tainted authorities sent with the bundle.
    events: SyncEvents,
    /// The taint generation last sent with the bundle.
    taint_sent: u64,
    /// False once the hub is gone: only the reconcile timer wakes the stream then.
    events_open: bool,
    agent_id: SpiffeId,
    server_id: SpiffeId,
    trust_domain: TrustDomain,
    reconcile_every: Duration,
    /// The agent's node selectors the current state was computed with.
    selectors: SelectorSet,
    /// From the request: where the agent's set stands, if it can be resumed from.
    known_revision: i64,
    /// From the request: the roots digest of the agent's set.
    known_roots: Vec<u8>,
    /// Every change up to this revision has been accounted for.
    last_revision: i64,
    /// The bundle sequence the agent holds.
    bundle_sequence: u64,
    /// The `federated_changes` counter of the last signal taken.
    federated_seen: u64,
    /// The trust domains the federated set was last computed for.
    federated_relevant: BTreeSet<TrustDomain>,
    /// The federated set last sent (`None` before the first snapshot).
    federated_sent: Option<Vec<pb::Bundle>>,
    tracked: Tracked,
    outbox: Outbox,
    phase: Phase,
    next_reconcile: Instant,
    last_round: Option<Instant>,
}

/// How a stream's first round goes.
enum Resume {
    /// Resumed: the round is loaded.
    Resumed,
    /// A snapshot is needed; the set read meanwhile, current and for the agent's selectors.
    Snapshot(AuthorizedSet),
}

/// One round's output: upserts, removed ids, revision.
type Round = (Vec<RegistrationEntry>, Vec<String>, i64);

/// One round's bundle updates; `None` fields are unchanged.
#[derive(Debug, Default)]
struct Bundles {
    bundle: Option<pb::Bundle>,
    federated: Option<Vec<pb::Bundle>>,
}

impl Syncer {
    async fn next_item(&mut self) -> Option<Result<pb::SyncResponse, Status>> {
        loop {
            if let Some(msg) = self.outbox.next_message() {
                return Some(Ok(msg));
            }
            let step = match self.phase {
                Phase::Done => return None,
                Phase::Snapshot => self.start().await,
                Phase::Live => self.live_round().await,
            };
            if let Err(status) = step {
                self.phase = Phase::Done;
                self.tracked = Tracked::default();
                tracing::info!(
                    agent = %self.agent_id,
                    code = ?status.code(),
                    reason = status.message(),
                    "sync stream ended"
                );
                return Some(Err(status));
            }
        }
    }

    /// The stream's first round: resumed from the agent's revision when possible, else a
    /// snapshot.
    async fn start(&mut self) -> Result<(), Status> {
        if self.known_revision <= 0 || self.known_roots.is_empty() {
            return self.snapshot(None).await;
        }
        match self.resume().await? {
            Resume::Resumed => Ok(()),
            Resume::Snapshot(set) => self.snapshot(Some(set)).await,
        }
    }

    /// Tries to resume from `known_revision` (see the module docs); the set it read when a
    /// snapshot is needed instead.
    async fn resume(&mut self) -> Result<Resume, Status> {
        let started = std::time::Instant::now();
        let agent = self.check_agent().await?;
        self.selectors = agent.selectors;
        self.federated_seen = self.sub.take().federated_changes;
        let since = self.known_revision;
        // The set and the history are two reads; a write between them shows as two revisions.
        let mut attempt = 0;
        let (set, history) = loop {
            attempt += 1;
            let set = compute(&*self.ds, &self.agent_id, &self.selectors, &self.server_id)
                .await
                .map_err(ds_status)?;
            let why = if since > set.revision {
                "the revision is newer than the datastore's"
            } else if roots_digest(&set.roots) != self.known_roots {
                "the agent's roots changed"
            } else {
                match self
                    .ds
                    .entry_history_since(since)
                    .await
                    .map_err(ds_status)?
                {
                    None => "the entry history since the revision was pruned",
                    Some(h) if h.revision == set.revision => break (set, h),
                    Some(_) if attempt < RESUME_ATTEMPTS => continue,
                    Some(_) => "entries kept changing while it was read",
                }
            };
            tracing::info!(agent = %self.agent_id, known_revision = since, reason = why, "sync cannot resume; sending a snapshot");
            return Ok(Resume::Snapshot(set));
        };
        let Some((upserts, removed)) = resume_diff(&set, &history, since, &self.server_id) else {
            tracing::info!(
                agent = %self.agent_id,
                known_revision = since,
                reason = "a change since the revision may have moved entries it did not change",
                "sync cannot resume; sending a snapshot"
            );
            return Ok(Resume::Snapshot(set));
        };
        let revision = set.revision;
        // What the agent holds now is exactly the set: track it as sent.
        self.tracked.replace(set);
        let bundle = self.bundle_if_changed().await?;
        // Always sent: the agent may hold a stale set from an earlier connection.
        let federated = self.federated_if_changed(true, true).await?;
        tracing::info!(
            agent = %self.agent_id,
            entries = self.tracked.sent.len(),
            upserted = upserts.len(),
            removed = removed.len(),
            revision,
            known_revision = since,
            bundle_sent = bundle.is_some(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sync resumed"
        );
        self.last_revision = revision;
        self.outbox.load(
            (upserts, removed, revision),
            Bundles { bundle, federated },
            RoundKind::Resumed,
            self.tracked.digest.clone(),
        );
        self.phase = Phase::Live;
        self.next_reconcile = after(self.reconcile_every);
        Ok(Resume::Resumed)
    }

    /// Sends the set as a snapshot: `read`, when a failed resume read it already (with the
    /// agent checked and the signals taken), else a fresh one.
    async fn snapshot(&mut self, read: Option<AuthorizedSet>) -> Result<(), Status> {
        let started = std::time::Instant::now();
        let set = match read {
            Some(set) => set,
            None => {
                let agent = self.check_agent().await?;
                self.selectors = agent.selectors;
                // Everything published so far is covered by what is read below.
                self.federated_seen = self.sub.take().federated_changes;
                compute(&*self.ds, &self.agent_id, &self.selectors, &self.server_id)
                    .await
                    .map_err(ds_status)?
            }
        };
        let revision = set.revision;
        let (entries, _) = self.tracked.replace(set);
        let bundle = self.bundle_if_changed().await?;
        // Always sent: the agent may hold a stale set from an earlier connection.
        let federated = self.federated_if_changed(true, true).await?;
        tracing::info!(
            agent = %self.agent_id,
            entries = entries.len(),
            revision,
            known_revision = self.known_revision,
            bundle_sequence = self.bundle_sequence,
            bundle_sent = bundle.is_some(),
            federated_bundles = federated.as_ref().map_or(0, Vec::len),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sync snapshot"
        );
        self.last_revision = revision;
        self.outbox.load(
            (entries, Vec::new(), revision),
            Bundles { bundle, federated },
            RoundKind::Snapshot,
            self.tracked.digest.clone(),
        );
        self.phase = Phase::Live;
        self.next_reconcile = after(self.reconcile_every);
        Ok(())
    }

    /// Waits for a reason to look, then computes the next round (possibly empty).
    async fn live_round(&mut self) -> Result<(), Status> {
        let by_event = self.wait().await;
        let signal = self.sub.take();
        self.last_round = Some(Instant::now());
        let agent = self.check_agent().await?;
        let mut reconcile = !by_event || Instant::now() >= self.next_reconcile;
        if agent.selectors != self.selectors {
            tracing::info!(agent = %self.agent_id, "agent node selectors changed; recomputing");
            self.selectors = agent.selectors;
            reconcile = true;
        }
        let bundle = if reconcile
            || (signal.bundle_sequence != 0 && signal.bundle_sequence != self.bundle_sequence)
            || signal.taint_generation != self.taint_sent
        {
            self.bundle_if_changed().await?
        } else {
            None
        };
        let (upserts, removed, revision) = if reconcile {
            self.reconcile("periodic").await?
        } else {
            self.incremental().await?
        };
        // After the entries: they decide which trust domains are relevant.
        let federated_event = signal.federated_changes != self.federated_seen;
        self.federated_seen = signal.federated_changes;
        let federated = self
            .federated_if_changed(federated_event || reconcile, false)
            .await?;
        if !upserts.is_empty() || !removed.is_empty() || bundle.is_some() || federated.is_some() {
            tracing::debug!(
                agent = %self.agent_id,
                upserted = upserts.len(),
                removed = removed.len(),
                bundle = bundle.is_some(),
                federated_bundles = federated.as_ref().map(Vec::len),
                revision,
                "sync update"
            );
        }
        self.outbox.load(
            (upserts, removed, revision),
            Bundles { bundle, federated },
            RoundKind::Increment,
            self.tracked.digest.clone(),
        );
        Ok(())
    }

    /// Sleeps until an event (true) or the reconcile deadline (false). After an event, waits
    /// out the rest of [`MIN_ROUND_INTERVAL`] since the previous round, so bursts coalesce.
    async fn wait(&mut self) -> bool {
        let deadline = self.next_reconcile;
        loop {
            if !self.events_open {
                tokio::time::sleep_until(deadline).await;
                return false;
            }
            tokio::select! {
                open = self.sub.changed() => {
                    if open {
                        break;
                    }
                    tracing::debug!(agent = %self.agent_id, "event hub closed; reconcile timer only");
                    self.events_open = false;
                }
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
        if let Some(last) = self.last_round {
            tokio::time::sleep_until(last + MIN_ROUND_INTERVAL).await;
        }
        true
    }

    /// Recomputes the authorised set and diffs it against what was sent.
    async fn reconcile(&mut self, why: &'static str) -> Result<Round, Status> {
        let started = std::time::Instant::now();
        let set = compute(&*self.ds, &self.agent_id, &self.selectors, &self.server_id)
            .await
            .map_err(ds_status)?;
        let revision = set.revision;
        let (upserts, removed) = self.tracked.replace(set);
        self.last_revision = self.last_revision.max(revision);
        self.next_reconcile = after(self.reconcile_every);
        tracing::debug!(
            agent = %self.agent_id,
            why,
            entries = self.tracked.sent.len(),
            upserted = upserts.len(),
            removed = removed.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sync reconcile"
        );
        Ok((upserts, removed, self.last_revision))
    }

    /// Applies the changes since the last revision.
    async fn incremental(&mut self) -> Result<Round, Status> {
        let changes = self
            .ds
            .entry_changes_since(self.last_revision)
            .await
            .map_err(ds_status)?;
        if changes.upserted.is_empty() && changes.removed.is_empty() {
            self.last_revision = self.last_revision.max(changes.revision);
            return Ok((Vec::new(), Vec::new(), self.last_revision));
        }
        if self.is_structural(&changes).await? {
            return self.reconcile("structural change").await;
        }
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for id in changes.removed {
            if self.tracked.remove(&id) {
                removed.push(id);
            }
        }
        for e in changes.upserted {
            if self.tracked.grants(&e.parent_id, &self.server_id) {
                let unchanged = self
                    .tracked
                    .sent
                    .get(&e.id)
                    .is_some_and(|s| s.revision == e.revision);
                if !unchanged {
                    self.tracked.insert(&e);
                    upserts.push(e);
                }
            } else if self.tracked.remove(&e.id) {
                removed.push(e.id);
            }
        }
        self.last_revision = self.last_revision.max(changes.revision);
        Ok((upserts, removed, self.last_revision))
    }

    /// True if `changes` may change the authorisation of entries that did not change themselves:
    /// a node alias of this agent changed, or a SPIFFE ID that has children gained or lost an
    /// authorised entry granting it. Otherwise each change can be judged on its own.
    async fn is_structural(&self, changes: &EntryChanges) -> Result<bool, Status> {
        let t = &self.tracked;
        let server = &self.server_id;
        let mut probe: HashSet<&SpiffeId> = HashSet::new();
        for id in &changes.removed {
            if t.alias_ids.contains(id) {
                return Ok(true);
            }
            if let Some(s) = t.sent.get(id) {
                probe.insert(&s.spiffe_id);
            }
        }
        for e in &changes.upserted {
            if t.alias_ids.contains(&e.id) || alias_matches(e, server, &self.selectors) {
                return Ok(true);
            }
            let granted = t.grants(&e.parent_id, server);
            let gains = granted && !t.grants(&e.spiffe_id, server);
            match t.sent.get(&e.id) {
                Some(prev) if !granted || prev.spiffe_id != e.spiffe_id => {
                    // Lost (or moved away from) an ID it granted. Probed even if other entries
                    // still grant that ID: they may depend on this one through a cycle.
                    probe.insert(&prev.spiffe_id);
                    if gains {
                        probe.insert(&e.spiffe_id);
                    }
                }
                None if gains => {
                    probe.insert(&e.spiffe_id);
                }
                _ => {}
            }
        }
        // Roots stay granted whatever happens to entries; the server's ID is never a parent.
        let probe: Vec<SpiffeId> = probe
            .into_iter()
            .filter(|id| *id != server && !t.roots.contains(*id))
            .cloned()
            .collect();
        let ds = &*self.ds;
        let any = futures::stream::iter(probe)
            .map(|id| async move { has_children(ds, &id).await })
            .buffer_unordered(PROBE_CONCURRENCY)
            .try_any(|has| async move { has })
            .await
            .map_err(ds_status)?;
        Ok(any)
    }

    /// The agent's current record; `PermissionDenied` if it was evicted or banned.
    async fn check_agent(&self) -> Result<AttestedAgent, Status> {
        match self.ds.get_agent(&self.agent_id).await.map_err(ds_status)? {
            None => Err(sigil::proto::AgentRefusal::Evicted.status(format!(
                "agent {} is not attested (evicted?): attest again",
                self.agent_id
            ))),
            Some(a) if a.banned => Err(sigil::proto::AgentRefusal::Banned
                .status(format!("agent {} is banned", self.agent_id))),
            Some(a) => Ok(a),
        }
    }

    /// The complete federated set for this agent if it must be sent: `always` (a snapshot), or
    /// when it differs from what was last sent. The datastore is read only when `look` (a
    /// federated bundle changed, or a reconcile) or when the relevant trust domains changed.
    async fn federated_if_changed(
        &mut self,
        look: bool,
        always: bool,
    ) -> Result<Option<Vec<pb::Bundle>>, Status> {
        let relevant = self.tracked.federated_trust_domains();
        if !look && !always && relevant == self.federated_relevant {
            return Ok(None);
        }
        // Most agents federate with nothing: no query for them.
        let bundles: Vec<pb::Bundle> = if relevant.is_empty() {
            Vec::new()
        } else {
            self.ds
                .list_federated_bundles()
                .await
                .map_err(ds_status)?
                .iter()
                .filter(|b| relevant.contains(&b.trust_domain))
                .map(bundle_to_proto)
                .collect()
        };
        self.federated_relevant = relevant;
        // Compared by content, not sequence: a bundle deleted and set again restarts at 1.
        if !always && self.federated_sent.as_ref() == Some(&bundles) {
            return Ok(None);
        }
        self.federated_sent = Some(bundles.clone());
        Ok(Some(bundles))
    }

    /// The stored bundle with the tainted authorities, if its sequence or the taint differs
    /// from what the agent holds.
    async fn bundle_if_changed(&mut self) -> Result<Option<pb::Bundle>, Status> {
        // Read before the bundle: a taint published meanwhile is sent again next round.
        let generation = self.events.current().taint_generation;
        let taint = self.events.taint();
        let stored = self
            .ds
            .get_bundle(&self.trust_domain)
            .await
            .map_err(ds_status)?;
        match stored {
            Some(b) if b.sequence != self.bundle_sequence || generation != self.taint_sent => {
                self.bundle_sequence = b.sequence;
                self.taint_sent = generation;
                let mut proto = bundle_to_proto(&b);
                proto.tainted_x509_authorities = taint.x509.clone();
                proto.tainted_jwt_kids = taint.jwt.clone();
                Ok(Some(proto))
            }
            _ => Ok(None),
        }
    }
}

/// What a stream resuming from `since` sends, given the set now and the history since (read at
/// the same revision, with roots equal to those of the agent's set): upserts of the authorised
/// entries changed since, and removals of entries changed or deleted since that the agent may
/// hold. `None` when a change may have altered the authorisation of entries it did not change
/// (a snapshot is needed).
///
/// The entries form a graph of parent → SPIFFE ID links, grown from the roots; an entry is
/// authorised when its parent is reachable. A link can only change the reach of what hangs
/// below its SPIFFE ID, so the IDs to watch (`moved`) are those of links created, moved or
/// deleted since (node aliases aside: with the roots unchanged, no alias changed what is
/// reachable). If none of them (other than a root, reachable either way) is the parent of an
/// entry that existed then (`anchored`; an entry updated in place since still links its parent
/// to its SPIFFE ID, and whatever hangs below it may depend on that), every unchanged entry is
/// as authorised now as it was then: the agent holds exactly the unchanged part of the set, and
/// only changed entries are sent.
fn resume_diff(
    set: &AuthorizedSet,
    history: &EntryHistory,
    since: i64,
    server_id: &SpiffeId,
) -> Option<(Vec<RegistrationEntry>, Vec<String>)> {
    let ended_ids: HashSet<&str> = history.ended.iter().map(|p| p.id.as_str()).collect();
    let mut moved: HashSet<&SpiffeId> = HashSet::new();
    for p in &history.changed {
        let new_link = history.created.contains(&p.id) || ended_ids.contains(p.id.as_str());
        if new_link && p.parent_id != *server_id {
            moved.insert(&p.spiffe_id);
        }
    }
    for p in history.ended.iter().filter(|p| p.parent_id != *server_id) {
        moved.insert(&p.spiffe_id);
    }
    if moved
        .iter()
        .any(|id| !set.roots.contains(*id) && history.anchored.contains(*id))
    {
        return None;
    }
    let upserts: Vec<RegistrationEntry> = set
        .entries
        .iter()
        .filter(|e| e.revision > since)
        .cloned()
        .collect();
    // Removals: an entry changed since and not authorised now, if the agent may have held it:
    // its parent at `since` (its first ended placement since, else its current one; none if
    // created since) is authorised now, or one of the watched IDs (whose reach then is not
    // known). Only ids are sent, never content.
    let held_now: HashSet<&str> = set.entries.iter().map(|e| e.id.as_str()).collect();
    let granted: HashSet<&SpiffeId> = set
        .roots
        .iter()
        .chain(set.entries.iter().map(|e| &e.spiffe_id))
        .collect();
    let mut parent_then: HashMap<&str, &SpiffeId> = HashMap::new();
    for p in &history.ended {
        parent_then.entry(p.id.as_str()).or_insert(&p.parent_id);
    }
    for p in &history.changed {
        if !history.created.contains(&p.id) {
            parent_then.entry(p.id.as_str()).or_insert(&p.parent_id);
        }
    }
    let mut removed = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for p in history.changed.iter().chain(&history.ended) {
        let id = p.id.as_str();
        if held_now.contains(id) || !seen.insert(id) {
            continue;
        }
        if let Some(parent) = parent_then.get(id) {
            if *parent != server_id && (granted.contains(parent) || moved.contains(parent)) {
                removed.push(id.to_string());
            }
        }
    }
    Some((upserts, removed))
}

/// The node API's bundle message: concatenated DER roots and a JWKS document.
pub fn bundle_to_proto(b: &StoredBundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_roots: b.x509_roots.concat(),
        jwks_json: jwks_document(&b.jwt_keys_json),
        sequence_number: b.sequence,
        tainted_x509_authorities: Vec::new(),
        tainted_jwt_kids: Vec::new(),
    }
}

/// `{"keys":[...]}` from the stored JWK array (a stored document is passed through).
fn jwks_document(stored: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(stored) {
        Ok(keys @ serde_json::Value::Array(_)) => serde_json::json!({ "keys": keys }).to_string(),
        Ok(doc @ serde_json::Value::Object(_)) if doc.get("keys").is_some() => doc.to_string(),
        _ => {
            tracing::error!("stored JWT keys are not a JSON array; sending an empty JWKS");
            r#"{"keys":[]}"#.to_string()
        }
    }
}

#[cfg(test)]
mod tests;
