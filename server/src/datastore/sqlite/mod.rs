//! The embedded SQLite datastore (the default).
//!
//! One database file (WAL mode, `synchronous=FULL`: a call that returned `Ok` survives `kill -9`
//! and power loss). All SQLite work runs on tokio's blocking pool, never on the async workers.
//! Writes go through one connection behind a mutex (SQLite has a single writer anyway); reads use
//! a small pool of separate connections, which WAL lets run concurrently with the writer, each
//! read seeing one consistent snapshot.
//!
//! Layout: this module holds [`SqliteDatastore`] (opening and checking the file, the connection
//! plumbing `read` / `write`, error mapping) and the `impl Datastore`, whose methods each call
//! one function of a resource module: `entries.rs` (entry rows, selector filters as SQL,
//! revisions and tombstones), `agents.rs`, `join_tokens.rs`, `bundles.rs` (the server's own and
//! the federated bundles), `federation.rs` (federation relationships). Schema: `migrations.rs`. Entry listing keeps insertion order through
//! the `seq` column (page tokens encode the last `seq`, see [`crate::datastore::paging`]);
//! selector filters run in SQL against the `entry_selectors` table, so they do not load
//! unrelated entries. Tests: the backend-generic suite of `datastore/conformance.rs` and the
//! SQLite-specific ones in `tests.rs`.

mod agents;
mod bundles;
mod entries;
mod federation;
mod join_tokens;
mod migrations;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use sigil::entry::RegistrationEntry;
use sigil::{SelectorSet, SpiffeId, TrustDomain};

use super::{
    AttestedAgent, AuthorizedRead, BundleSwap, Datastore, DatastoreError, EntryChanges,
    EntryFilter, EntryHistory, FederationRelationship, JoinToken, NewAgentSvid, Page, StoredBundle,
};
use bundles::BundleTable;

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 4;

type Result<T, E = DatastoreError> = std::result::Result<T, E>;

/// What the caller knows about the database file before opening it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: a missing file, or an empty one (left by a first start that stopped right after
    /// creating it), becomes a new, empty database.
    #[default]
    Any,
    /// The server has run here before (its CA keys exist), so the database holds its data: an
    /// existing empty file means that data was lost and is refused. A missing file is still
    /// created (moving a damaged file aside is how an operator starts over).
    Data,
}

/// The SQLite implementation of [`Datastore`]. Cheap to share behind an `Arc`.
pub struct SqliteDatastore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl fmt::Debug for SqliteDatastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteDatastore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl SqliteDatastore {
    /// Opens (creating if needed) the database at `path` and migrates it to the current schema,
    /// on the blocking pool. See [`SqliteDatastore::open_blocking`].
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, Expect::Any).await
    }

    /// [`SqliteDatastore::open`] with what the caller knows about the file (see [`Expect`]).
    pub async fn open_with(path: &Path, expect: Expect) -> Result<Self> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking_with(&path, expect))
            .await
            .map_err(DatastoreError::Task)?
    }

    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    ///
    /// A missing parent directory is created with mode 0700 and a new database file with mode
    /// 0600. A file that is not a Sigil database (another format, truncated, another
    /// application's SQLite file), that SQLite's `quick_check` finds damaged, or whose schema is
    /// newer than this code is refused with an error naming the path. Blocks: from async code
    /// use [`SqliteDatastore::open`].
    pub fn open_blocking(path: &Path) -> Result<Self> {
        Self::open_blocking_with(path, Expect::Any)
    }

    /// [`SqliteDatastore::open_blocking`] with what the caller knows about the file (see
    /// [`Expect`]).
    pub fn open_blocking_with(path: &Path, expect: Expect) -> Result<Self> {
        match prepare_file(path)? {
            FileState::Created => {}
            FileState::Existed { len: 0 } if expect == Expect::Data => {
                return Err(DatastoreError::Corrupt(format!(
                    "{} is empty (0 bytes), but this server has run before (its CA keys exist): \
                     its entries, agents and join tokens were lost (a disk or filesystem failure, \
                     or a copy or restore that did not finish); restore the file from a backup, \
                     or, to start over without them (every agent must then attest again), \
                     delete it together with its -wal and -shm files",
                    path.display()
                )));
            }
            FileState::Existed { len: 0 } => {
                tracing::info!(path = %path.display(), "datastore file is empty; creating the schema");
            }
            FileState::Existed { .. } => {}
        }
        let mut writer = open_connection(path)?;
        quick_check(&writer, path)?;
        // Persistent, but must be set from a write connection; the returned mode confirms it.
        let mode: String = writer
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| corrupt_at_open(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DatastoreError::NoWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        migrations::migrate(&mut writer, path, migrations::MIGRATIONS)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with the write connection on the blocking pool.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = lock(&inner.writer);
            f(&mut conn)
        })
        .await
        .map_err(DatastoreError::Task)?
    }

    /// Runs `f` with a pooled read connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let pooled = lock(&inner.readers).pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => open_reader(&inner.path)?,
            };
            let result = f(&mut conn);
            // A connection is only reused when it is back to autocommit (no transaction left
            // open by an early return).
            if conn.is_autocommit() {
                let mut pool = lock(&inner.readers);
                if pool.len() < MAX_IDLE_READERS {
                    pool.push(conn);
                }
            }
            result
        })
        .await
        .map_err(DatastoreError::Task)?
    }
}

/// A poisoned lock only means another call panicked; SQLite rolled its transaction back.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Opening

/// Whether [`prepare_file`] created the database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    /// Created just now (empty).
    Created,
    /// It was there, with this many bytes.
    Existed { len: u64 },
}

/// Creates the parent directory (0700) and an empty database file (0600) when missing, and makes
/// their directory entries durable (SQLite syncs the WAL's directory entry, not the main file's).
fn prepare_file(path: &Path) -> Result<FileState> {
    let io_err = |what: &'static str, source: std::io::Error| DatastoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Directories to create, innermost first, and the existing one they hang from.
    let mut missing = Vec::new();
    let mut existing = parent;
    while !existing.exists() {
        missing.push(existing);
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !missing.is_empty() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| io_err("creating the directory of", e))?;
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => {
            file.sync_all().map_err(|e| io_err("syncing", e))?;
            // Each new directory entry is durable once its parent directory is synced.
            let mut dirs = vec![parent];
            if !missing.is_empty() {
                dirs.extend(missing.iter().skip(1));
                dirs.push(existing);
            }
            for dir in dirs {
                sync_dir(dir).map_err(|e| io_err("syncing the directory of", e))?;
            }
            Ok(FileState::Created)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = fs::metadata(path).map_err(|e| io_err("reading", e))?;
            if !meta.is_file() {
                return Err(invalid_db(path, "it is not a regular file"));
            }
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "datastore file is accessible to group/others; consider chmod 600"
                );
            }
            Ok(FileState::Existed { len: meta.len() })
        }
        Err(e) => Err(io_err("creating", e)),
    }
}

/// Most problems `quick_check` reports that are quoted in the error.
const MAX_CHECK_PROBLEMS: usize = 3;

/// Runs SQLite's `PRAGMA quick_check` (the structure of every table and index, without
/// comparing index contents to their tables), so a damaged file is refused at start rather than
/// failing on whichever request reaches the damaged page first.
fn quick_check(conn: &Connection, path: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let problems = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(|e| corrupt_at_open(path, e))?;
    if problems.len() == 1 && problems[0] == "ok" {
        tracing::debug!(path = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "datastore quick_check passed");
        return Ok(());
    }
    let shown: Vec<String> = problems
        .iter()
        .take(MAX_CHECK_PROBLEMS)
        .map(|p| sigil::text::echo(p).into_owned())
        .collect();
    let more = problems.len().saturating_sub(MAX_CHECK_PROBLEMS);
    Err(invalid_db(
        path,
        format!(
            "it is damaged: SQLite's quick_check found {}{}",
            shown.join("; "),
            if more > 0 {
                format!(" (and {more} more problems)")
            } else {
                String::new()
            }
        ),
    ))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Opens a connection with the per-connection settings (durability, foreign keys, locks).
fn open_connection(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|source| DatastoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA trusted_schema = OFF;
         PRAGMA cache_size = -8192;",
    )
    .map_err(|e| corrupt_at_open(path, e))?;
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = open_connection(path)?;
    conn.execute_batch("PRAGMA query_only = ON;")
        .map_err(map_err)?;
    Ok(conn)
}

/// The error for a file that cannot be our database, naming it and what to do.
fn invalid_db(path: &Path, why: impl fmt::Display) -> DatastoreError {
    DatastoreError::Corrupt(format!(
        "{} is not a valid Sigil database: {why}; restore it from a backup or move it aside \
         (a new empty database is created on the next start)",
        path.display()
    ))
}

fn corrupt_at_open(path: &Path, e: rusqlite::Error) -> DatastoreError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        if f.code == ErrorCode::DatabaseCorrupt {
            return invalid_db(path, format!("it is damaged: {e}"));
        }
    }
    match map_err(e) {
        DatastoreError::Corrupt(msg) => invalid_db(path, msg),
        other => other,
    }
}

/// Classifies SQLite errors: damaged files and undecodable values are `Corrupt`, a lock held
/// past the busy timeout `Busy`, the rest `Sqlite`.
fn map_err(e: rusqlite::Error) -> DatastoreError {
    use rusqlite::Error as E;
    match &e {
        E::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            DatastoreError::Corrupt(e.to_string())
        }
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::InvalidColumnType(..)
        | E::Utf8Error(..) => DatastoreError::Corrupt(e.to_string()),
        E::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            DatastoreError::Busy(e)
        }
        _ => DatastoreError::Sqlite(e),
    }
}

impl From<rusqlite::Error> for DatastoreError {
    fn from(e: rusqlite::Error) -> Self {
        map_err(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers of the resource modules

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(DatastoreError::Json)
}

// ---------------------------------------------------------------------------------------------
// The trait: each method is one call into a resource module.

#[async_trait]
impl Datastore for SqliteDatastore {
    async fn create_entries(
        &self,
        entries: Vec<RegistrationEntry>,
    ) -> Result<Vec<Result<RegistrationEntry>>> {
        entries::create(self, entries).await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        entries::get(self, id).await
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<RegistrationEntry>> {
        entries::list(self, filter, page_size, page_token).await
    }

    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64> {
        entries::count(self, filter).await
    }

    async fn update_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry> {
        entries::update(self, entry).await
    }

    async fn delete_entry(&self, id: &str) -> Result<RegistrationEntry> {
        entries::delete(self, id).await
    }

    async fn entry_changes_since(&self, revision: i64) -> Result<EntryChanges> {
        entries::changes_since(self, revision).await
    }

    async fn upsert_agent(&self, agent: AttestedAgent) -> Result<()> {
        agents::upsert(self, agent).await
    }

    async fn set_agent_new_svid(
        &self,
        id: &SpiffeId,
        current_serial: &str,
        new: NewAgentSvid,
    ) -> Result<bool> {
        agents::set_new_svid(self, id, current_serial, new).await
    }

    async fn promote_agent_svid(&self, id: &SpiffeId, serial: &str) -> Result<bool> {
        agents::promote_svid(self, id, serial).await
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>> {
        agents::get(self, id).await
    }

    async fn list_agents(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<AttestedAgent>> {
        agents::list(self, page_size, page_token).await
    }

    async fn count_agents(&self) -> Result<u64> {
        agents::count(self).await
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<()> {
        agents::delete(self, id).await
    }

    async fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<()> {
        agents::set_banned(self, id, banned).await
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<()> {
        join_tokens::create(self, token).await
    }

    async fn consume_join_token(&self, token: &str, now: i64) -> Result<JoinToken> {
        join_tokens::consume(self, token, now).await
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64> {
        join_tokens::prune(self, now).await
    }

    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>> {
        bundles::get(self, BundleTable::Own, td).await
    }

    async fn set_bundle(&self, bundle: StoredBundle) -> Result<StoredBundle> {
        bundles::set(self, BundleTable::Own, bundle).await
    }

    async fn set_federated_bundle(&self, bundle: StoredBundle) -> Result<StoredBundle> {
        bundles::set(self, BundleTable::Federated, bundle).await
    }

    async fn compare_and_set_bundle(
        &self,
        bundle: StoredBundle,
        expected_sequence: u64,
    ) -> Result<BundleSwap> {
        bundles::compare_and_set(self, bundle, expected_sequence).await
    }

    async fn get_federated_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>> {
        bundles::get(self, BundleTable::Federated, td).await
    }

    async fn list_federated_bundles(&self) -> Result<Vec<StoredBundle>> {
        bundles::list_federated(self).await
    }

    async fn delete_federated_bundle(&self, td: &TrustDomain) -> Result<StoredBundle> {
        bundles::delete_federated(self, td).await
    }

    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship> {
        federation::create(self, relationship).await
    }

    async fn update_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship> {
        federation::update(self, relationship).await
    }

    async fn get_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        federation::get(self, td).await
    }

    async fn list_federation_relationships(&self) -> Result<Vec<FederationRelationship>> {
        federation::list(self).await
    }

    async fn delete_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<FederationRelationship> {
        federation::delete(self, td).await
    }

    async fn read_authorized(
        &self,
        agent_id: &SpiffeId,
        selectors: &SelectorSet,
        server_id: &SpiffeId,
    ) -> Result<AuthorizedRead> {
        entries::read_authorized(self, agent_id, selectors, server_id).await
    }

    async fn entry_history_since(&self, revision: i64) -> Result<Option<EntryHistory>> {
        entries::history_since(self, revision).await
    }

    async fn prune_entry_history(&self, before: i64) -> Result<u64> {
        entries::prune_history(self, before).await
    }

    async fn get_entries(&self, ids: &[String]) -> Result<Vec<Option<RegistrationEntry>>> {
        entries::get_many(self, ids).await
    }
}
