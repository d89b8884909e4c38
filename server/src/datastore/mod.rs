//! Registration datastore: entries, attested agents, join tokens, the server's own trust bundle,
//! the federated bundles of other trust domains and the federation relationships that keep them
//! fresh.
//!
//! The [`Datastore`] trait is what the rest of the server uses; [`sqlite::SqliteDatastore`] is the
//! embedded default, [`postgres::PostgresDatastore`] a shared database several servers can use at
//! once. Every write is durable when the call returns: the admin API acknowledges nothing that a
//! `kill -9` could lose.
//!
//! Revisions: every entry change takes the next value of one global, monotonically increasing
//! revision counter, and deletions leave a tombstone with their revision, so an agent can ask
//! "what changed since revision R" ([`Datastore::entry_changes_since`]). Tombstones also record
//! the deleted entry's SPIFFE ID and parent, updates that change either record the former ones,
//! and entries their creating revision: the entry history a reconnecting agent's sync stream
//! resumes from ([`Datastore::entry_history_since`]). The history is pruned after
//! [`ENTRY_HISTORY_RETENTION`] ([`Datastore::prune_entry_history`]).
//!
//! Layout: this module holds the trait and its types; `paging.rs` the page sizes and page tokens
//! every backend uses; `descent.rs` the breadth-first walk of [`Datastore::read_authorized`],
//! which each backend runs inside one read transaction; `sqlite/` the SQLite backend;
//! `postgres/` the PostgreSQL backend. `conformance.rs` (tests only) is the behaviour suite
//! every backend runs, instantiated per backend with `datastore_conformance!`.

#[cfg(test)]
pub(crate) mod conformance;
pub mod descent;
pub mod feed;
pub mod paging;
pub mod postgres;
pub mod sqlite;

use std::collections::HashSet;
use std::path::PathBuf;

use async_trait::async_trait;
use sigil::entry::RegistrationEntry;
use sigil::{SelectorSet, SpiffeId, TrustDomain};

use crate::federation::EndpointProfile;

pub use feed::{Change, ChangeFeed};

/// Datastore failures. The admin API maps them to gRPC status codes.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// Same SPIFFE ID, parent ID and selectors as an existing entry (its id attached).
    #[error("an entry with the same SPIFFE ID, parent ID and selectors already exists (id {0})")]
    AlreadyExists(String),
    /// A federation relationship with this trust domain exists already.
    #[error("a federation relationship with trust domain {0} already exists")]
    RelationshipExists(TrustDomain),
    /// No such entry / agent / token / relationship.
    #[error("{0} not found")]
    NotFound(String),
    /// A join token that existed but has expired (it is removed).
    #[error("join token has expired")]
    Expired,
    /// A page token this datastore did not produce.
    #[error("invalid page token {0:?}")]
    InvalidPageToken(String),
    /// Stored data that does not parse (manual edits, disk corruption).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// SQLite stayed busy past its busy timeout (another connection or process held the
    /// lock): trying again later may succeed.
    #[error("the database is busy: {0}; try again")]
    Busy(#[source] rusqlite::Error),
    /// SQLite failed otherwise (I/O error, full disk, read-only file, ...).
    #[error("database error: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// The database file cannot be opened.
    #[error("database error: opening {}: {source}", .path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// Creating, reading or syncing the database file or its directory failed.
    #[error("database error: {what} {}: {source}", .path.display())]
    Io {
        /// What was being done (`creating`, `syncing the directory of`, ...).
        what: &'static str,
        /// The database file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused write-ahead logging for the file.
    #[error("database error: {}: could not switch to WAL journal mode (got {mode})", .path.display())]
    NoWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// The file's schema is newer than this code knows.
    #[error(
        "database error: {} has schema version {found}, but this sigil-server only knows versions \
         up to {known}: it was written by a newer sigil-server; upgrade, or restore a backup made \
         by this version",
        .path.display()
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: usize,
        /// The newest version this code knows.
        known: usize,
    },
    /// A schema migration failed (it was rolled back).
    #[error("database error: {}: schema migration {version} failed: {source}", .path.display())]
    Migration {
        /// The database file.
        path: PathBuf,
        /// The version the migration leads to.
        version: usize,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The blocking task running the call panicked or was cancelled.
    #[error("database error: datastore task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// A value could not be encoded as JSON.
    #[error("database error: encoding JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A newly generated join token equals a stored one.
    #[error("database error: a join token with this value already exists")]
    JoinTokenCollision,
    /// The PostgreSQL datastore failed: connecting, a statement, a migration (the message names
    /// what to check).
    #[error(transparent)]
    Postgres(postgres::PostgresError),
}

impl DatastoreError {
    /// True when trying the same call again later may succeed (the database was busy or
    /// unreachable); false for refusals, corrupt data and other failures, which a retry would
    /// only repeat.
    pub fn is_transient(&self) -> bool {
        match self {
            DatastoreError::Busy(_) => true,
            DatastoreError::Postgres(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// How a filter's selectors must relate to an entry's selectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelectorMatch {
    /// Entry selectors equal the given set.
    #[default]
    Exact,
    /// Entry selectors are a subset of the given set (the entries a workload with these
    /// selectors would get).
    Subset,
    /// Entry selectors are a superset of the given set.
    Superset,
    /// Entry has at least one of the given selectors.
    Any,
}

/// Entry filter; `None` fields do not filter. All given fields must match.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Exact SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Exact parent ID.
    pub parent_id: Option<SpiffeId>,
    /// Selector set and how to match it.
    pub selectors: Option<(SelectorSet, SelectorMatch)>,
}

/// One page of results.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The items, in a stable order (creation order).
    pub items: Vec<T>,
    /// Token for the next page; `None` when this is the last page.
    pub next_token: Option<String>,
}

/// An attested node agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedAgent {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Node attestation method (`join_token`, `x509pop`, ...).
    pub attestation_type: String,
    /// Hex serial of the agent's current SVID.
    pub x509_svid_serial: String,
    /// Expiry of that SVID, Unix seconds.
    pub x509_svid_expires_at: i64,
    /// A renewed SVID the agent has not used yet. Until it does, the current SVID stays valid
    /// too, so an agent that fails to store its renewed SVID (full disk, a crash) goes on with
    /// the old one; the first call with the new one makes it current
    /// ([`Datastore::promote_agent_svid`]).
    pub new_x509_svid: Option<NewAgentSvid>,
    /// Banned agents are refused and may not re-attest.
    pub banned: bool,
    /// Node selectors from attestation.
    pub selectors: SelectorSet,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// A renewed agent SVID waiting for its first use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAgentSvid {
    /// Hex serial.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

/// A single-use join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The secret token value.
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Node-alias SPIFFE ID to create on use.
    pub spiffe_id: Option<SpiffeId>,
}

/// A trust bundle as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    /// Whose bundle.
    pub trust_domain: TrustDomain,
    /// DER root certificates.
    pub x509_roots: Vec<Vec<u8>>,
    /// JWT signing public keys as a JWKS `keys` JSON array.
    pub jwt_keys_json: String,
    /// Incremented by [`Datastore::set_bundle`] (or [`Datastore::set_federated_bundle`])
    /// whenever the content changes.
    pub sequence: u64,
}

/// The outcome of [`Datastore::compare_and_set_bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSwap {
    /// The stored sequence was the expected one: this is what is stored now.
    Stored(StoredBundle),
    /// Someone changed the bundle first: this is what is stored (`None`: no bundle), nothing
    /// was written.
    Changed(Option<StoredBundle>),
}

/// A federation relationship as stored: with which foreign trust domain this one federates and
/// where its bundle is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRelationship {
    /// The foreign trust domain (the key).
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint, an `https://` URL.
    pub bundle_endpoint_url: String,
    /// How the endpoint is authenticated.
    pub profile: EndpointProfile,
    /// Unix seconds; set by the datastore.
    pub created_at: i64,
    /// Unix seconds; set by the datastore.
    pub updated_at: i64,
}

/// Entry changes after a revision.
#[derive(Debug, Clone, Default)]
pub struct EntryChanges {
    /// Entries created or updated after the revision (current content).
    pub upserted: Vec<RegistrationEntry>,
    /// Ids of entries deleted after the revision.
    pub removed: Vec<String>,
    /// The current (highest) revision.
    pub revision: i64,
}

/// One consistent read of what an agent is authorised for ([`Datastore::read_authorized`]).
#[derive(Debug, Clone, Default)]
pub struct AuthorizedRead {
    /// The entry revision the read is current at: every change up to it is in, none after it.
    pub revision: i64,
    /// The node-alias entries that apply to the agent (see [`descent::alias_matches`]).
    pub aliases: Vec<RegistrationEntry>,
    /// The authorised entries, breadth-first from the roots, each level in creation order.
    pub entries: Vec<RegistrationEntry>,
}

/// Where an entry sits in the parent → child graph: its SPIFFE ID under its parent, as of a
/// revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The entry's id.
    pub id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its parent ID.
    pub parent_id: SpiffeId,
    /// For a current placement, the entry's revision; for an ended one, the revision of the
    /// write that ended it (a move or the deletion).
    pub revision: i64,
}

/// What changed in the entry graph after a revision ([`Datastore::entry_history_since`]), read
/// in one consistent snapshot.
#[derive(Debug, Clone, Default)]
pub struct EntryHistory {
    /// The current revision.
    pub revision: i64,
    /// The current placement of every entry changed after the revision, in revision order.
    pub changed: Vec<Placement>,
    /// Ids among `changed` of the entries created after the revision.
    pub created: HashSet<String>,
    /// Placements ended after the revision, in revision order: the former SPIFFE ID and parent
    /// of each entry moved (either changed) or deleted. An id here that is not in `changed`
    /// was deleted.
    pub ended: Vec<Placement>,
    /// The SPIFFE IDs named by `changed` and `ended` that are the parent of some entry created
    /// by the revision (whatever changed in it since: an entry updated in place keeps its link
    /// to its parent).
    pub anchored: HashSet<SpiffeId>,
}

/// How long deleted entries' tombstones and moved entries' former placements are kept: an agent
/// reconnecting with an older revision gets a full snapshot.
pub const ENTRY_HISTORY_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Storage for everything the server must not lose.
#[async_trait]
pub trait Datastore: Send + Sync + 'static {
    /// Creates entries in one durable transaction. The outer error is a backend failure (nothing
    /// was written); otherwise one result per input, in order: the stored entry (id, revision and
    /// times assigned) or why that one was refused (e.g. [`DatastoreError::AlreadyExists`],
    /// including duplicates within the batch).
    async fn create_entries(
        &self,
        entries: Vec<RegistrationEntry>,
    ) -> Result<Vec<Result<RegistrationEntry, DatastoreError>>, DatastoreError>;

    /// The entry with this id, if any.
    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, DatastoreError>;

    /// Entries matching `filter` in creation order, at most `page_size` of them (0 means
    /// [`paging::DEFAULT_PAGE_SIZE`], more than [`paging::MAX_PAGE_SIZE`] is capped), after
    /// `page_token` (see [`paging`]; an empty one is the first page).
    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<RegistrationEntry>, DatastoreError>;

    /// Number of entries matching `filter`.
    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64, DatastoreError>;

    /// Replaces the entry with `entry.id` (content fields only; created_at is kept), assigning a
    /// new revision and updated_at. NotFound / AlreadyExists as for create.
    async fn update_entry(
        &self,
        entry: RegistrationEntry,
    ) -> Result<RegistrationEntry, DatastoreError>;

    /// Deletes an entry, returning what was deleted; leaves a tombstone for sync.
    async fn delete_entry(&self, id: &str) -> Result<RegistrationEntry, DatastoreError>;

    /// Entries created/updated and ids deleted after `revision`, each once and in revision
    /// order (an entry created and deleted after `revision` is only a removal), and the current
    /// revision.
    async fn entry_changes_since(&self, revision: i64) -> Result<EntryChanges, DatastoreError>;

    /// Creates or replaces an agent record (keyed by SPIFFE ID), including its pending renewed
    /// SVID (an attestation passes `None`: a new attestation supersedes any renewal).
    /// `updated_at` becomes now; `created_at` is the stored one on replace, else the given one
    /// (now if 0). A banned agent stays banned: only [`Datastore::set_agent_banned`] clears the
    /// flag, so an attestation racing with a ban cannot undo it.
    async fn upsert_agent(&self, agent: AttestedAgent) -> Result<(), DatastoreError>;

    /// Records a renewed SVID of agent `id` beside its current one (replacing an earlier pending
    /// one), if the agent exists, is not banned and its current serial is still
    /// `current_serial`; returns whether it was recorded.
    async fn set_agent_new_svid(
        &self,
        id: &SpiffeId,
        current_serial: &str,
        new: NewAgentSvid,
    ) -> Result<bool, DatastoreError>;

    /// Makes the pending renewed SVID with `serial` agent `id`'s current one (the previous one
    /// is refused from then on), if the agent is not banned; returns whether it did. Atomic with
    /// [`Datastore::set_agent_new_svid`]: of concurrent calls for one pending SVID one succeeds.
    async fn promote_agent_svid(&self, id: &SpiffeId, serial: &str)
        -> Result<bool, DatastoreError>;

    /// The agent with this ID, if any.
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>, DatastoreError>;

    /// Agents in creation order (a replaced agent keeps its place), paged as
    /// [`Datastore::list_entries`].
    async fn list_agents(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<AttestedAgent>, DatastoreError>;

    /// Number of agents.
    async fn count_agents(&self) -> Result<u64, DatastoreError>;

    /// Removes an agent (eviction: it must attest again). NotFound if absent.
    async fn delete_agent(&self, id: &SpiffeId) -> Result<(), DatastoreError>;

    /// Sets or clears the banned flag. NotFound if absent.
    async fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<(), DatastoreError>;

    /// Stores a new join token (as a hash: the stored data yields no usable token).
    /// [`DatastoreError::JoinTokenCollision`] if the same value is stored already.
    async fn create_join_token(&self, token: JoinToken) -> Result<(), DatastoreError>;

    /// Atomically takes a token so it can be used once: NotFound if unknown or already used,
    /// Expired if `now >= expires_at` (Unix seconds; it is deleted either way).
    async fn consume_join_token(&self, token: &str, now: i64) -> Result<JoinToken, DatastoreError>;

    /// Deletes tokens expired at `now`; returns how many.
    async fn prune_join_tokens(&self, now: i64) -> Result<u64, DatastoreError>;

    /// The bundle of `td`, if stored.
    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>, DatastoreError>;

    /// Stores a bundle. If the content differs from what is stored, the sequence becomes the
    /// stored sequence + 1 (1 for a new bundle); the input's sequence is ignored. Returns what
    /// is now stored.
    async fn set_bundle(&self, bundle: StoredBundle) -> Result<StoredBundle, DatastoreError>;

    /// Stores `bundle` as [`Datastore::set_bundle`] does, but only if the stored bundle's
    /// sequence is still `expected_sequence` (0: no bundle stored): a read-modify-write that
    /// cannot lose a concurrent writer's change (several servers merging their roots).
    async fn compare_and_set_bundle(
        &self,
        bundle: StoredBundle,
        expected_sequence: u64,
    ) -> Result<BundleSwap, DatastoreError>;

    /// Stores the federated bundle of a foreign trust domain (`bundle.trust_domain`), creating
    /// or replacing it, with the same sequence rule as [`Datastore::set_bundle`]. Federated
    /// bundles live apart from the server's own bundle; refusing the server's own trust domain
    /// is the caller's job (the datastore does not know it). Returns what is now stored.
    async fn set_federated_bundle(
        &self,
        bundle: StoredBundle,
    ) -> Result<StoredBundle, DatastoreError>;

    /// The federated bundle of `td`, if stored.
    async fn get_federated_bundle(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<StoredBundle>, DatastoreError>;

    /// Every federated bundle, ordered by trust domain name (there are few: one per foreign
    /// trust domain, so no paging).
    async fn list_federated_bundles(&self) -> Result<Vec<StoredBundle>, DatastoreError>;

    /// Deletes the federated bundle of `td`, returning what was deleted; NotFound if absent.
    async fn delete_federated_bundle(
        &self,
        td: &TrustDomain,
    ) -> Result<StoredBundle, DatastoreError>;

    /// Stores a new federation relationship (`created_at` and `updated_at` become now);
    /// [`DatastoreError::RelationshipExists`] if one with its trust domain is stored. The
    /// caller validates it (URL, profile, not the own trust domain).
    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship, DatastoreError>;

    /// Replaces the endpoint URL and profile of the relationship with
    /// `relationship.trust_domain` (`created_at` is kept, `updated_at` becomes now); NotFound
    /// if there is none.
    async fn update_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship, DatastoreError>;

    /// The relationship with `td`, if any.
    async fn get_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, DatastoreError>;

    /// Every relationship, ordered by trust domain name (one per foreign trust domain: few, so
    /// no paging).
    async fn list_federation_relationships(
        &self,
    ) -> Result<Vec<FederationRelationship>, DatastoreError>;

    /// Deletes the relationship with `td`, returning what was deleted; NotFound if absent.
    /// The federated bundle of `td` stays (entries federating with it keep working until
    /// `bundle delete`).
    async fn delete_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<FederationRelationship, DatastoreError>;

    /// The changes written by every server sharing this datastore, as they commit (see
    /// [`feed`]); `None` when no other server can write to it (SQLite: one server per file).
    /// Each call starts a feed of its own.
    fn change_feed(&self) -> Option<ChangeFeed> {
        None
    }

    /// What the agent `agent_id` with node selectors `selectors` is authorised for, read in one
    /// consistent snapshot (see [`descent`]): the node aliases (parent `server_id`) that apply,
    /// and every entry reachable from the agent's ID and those aliases' SPIFFE IDs through
    /// parent links, with the revision the read is current at.
    async fn read_authorized(
        &self,
        agent_id: &SpiffeId,
        selectors: &SelectorSet,
        server_id: &SpiffeId,
    ) -> Result<AuthorizedRead, DatastoreError>;

    /// What changed in the entry graph after `revision` (see [`EntryHistory`]); `None` when the
    /// history after it is no longer complete: tombstones or former placements after it were
    /// pruned ([`Datastore::prune_entry_history`]), or it predates their recording.
    async fn entry_history_since(
        &self,
        revision: i64,
    ) -> Result<Option<EntryHistory>, DatastoreError>;

    /// Deletes the tombstones and former placements written before `before` (Unix seconds)
    /// and every one with a revision up to theirs, so the history stays complete after a
    /// revision; returns how many were deleted. [`Datastore::entry_history_since`] answers
    /// `None` for revisions before the newest one deleted.
    async fn prune_entry_history(&self, before: i64) -> Result<u64, DatastoreError>;
    /// The entries with these ids, one per id and in the same order (`None` for an id with no
    /// entry; an id given twice is answered twice): what [`Datastore::get_entry`] would return
    /// for each, read at once (one round trip) for callers that need many.
    async fn get_entries(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<RegistrationEntry>>, DatastoreError>;
}
