//! Which registration entries an agent may have, and the push-based `Sync` stream that keeps the
//! agent's copy of them (and of the trust bundle) up to date.
//!
//! - [`authz`]: SPIRE's authorisation rule. An agent's *roots* are its own SPIFFE ID plus the
//!   SPIFFE IDs of the node-alias entries (entries whose parent is the server,
//!   `spiffe://<td>/sigil/server`) whose selectors are a non-empty subset of the agent's node
//!   selectors; the agent is authorised for every entry whose parent is a root and, recursively,
//!   every entry whose parent is the SPIFFE ID of an authorised entry.
//! - [`events`]: the in-process change notification hub ([`SyncEvents`]). The admin API
//!   publishes after every entry and federated-bundle mutation, whoever stores a new bundle
//!   publishes its sequence;
//!   every open sync stream subscribes. Latest value wins: publishing never blocks and never
//!   queues.
//! - [`stream`]: [`sync_stream`], the server side of `Node.Sync`: a chunked snapshot first (or,
//!   for an agent reconnecting with a set the server can bring up to date, only the changes
//!   since its revision), then incremental upserts/removals as changes happen, with a periodic
//!   full reconcile.

pub mod authz;
pub mod events;
pub mod stream;

use std::time::Duration;

pub use authz::{authorized_entries, is_authorized};
pub use events::{SyncEvents, SyncSignal, SyncSubscriber, Taint};
pub use stream::sync_stream;

/// Most entries in one `SyncResponse`.
pub const MAX_ENTRIES_PER_MESSAGE: usize = 1_000;
/// Most encoded entry bytes in one `SyncResponse` (a message holds at least one entry). Well
/// under gRPC's default 4 MiB receive limit, whatever the entries' size.
pub const MAX_BYTES_PER_MESSAGE: usize = 1024 * 1024;
/// Most removed ids in one `SyncResponse` (~40 bytes each).
pub const MAX_REMOVED_PER_MESSAGE: usize = 10_000;
/// Minimum time between two incremental rounds of one stream: the first change after a quiet
/// period is sent at once, a burst is coalesced into one message per interval.
pub const MIN_ROUND_INTERVAL: Duration = Duration::from_millis(10);
/// Shortest reconcile interval [`sync_stream`] uses, whatever it is given (0 would recompute in
/// a loop).
pub const MIN_RECONCILE_EVERY: Duration = Duration::from_millis(100);
/// A sensible `reconcile_every` for [`sync_stream`]: the full recompute is a safety net (events
/// are in-process and reliable), and costs one consistent read of the authorised set (one
/// indexed query per level of the entry tree).
pub const DEFAULT_RECONCILE_EVERY: Duration = Duration::from_secs(300);
