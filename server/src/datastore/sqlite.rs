//! The embedded SQLite datastore (the default).
//!
//! One database file (WAL mode, `synchronous=FULL`: a call that returned `Ok` survives `kill -9`
//! and power loss). All SQLite work runs on tokio's blocking pool, never on the async workers.
//! Writes go through one connection behind a mutex (SQLite has a single writer anyway); reads use
//! a small pool of separate connections, which WAL lets run concurrently with the writer, each
//! read seeing one consistent snapshot.
//!
//! Schema: see `sqlite/migrations.rs`. Entry listing keeps insertion order through the `seq` column
//! (page tokens encode the last `seq`); selector filters run in SQL against the
//! `entry_selectors` table, so they do not load unrelated entries.

mod migrations;

use std::fmt;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, ErrorCode, OpenFlags, OptionalExtension};
use rusqlite::{Row, TransactionBehavior};
use sigil::entry::RegistrationEntry;
use sigil::{Selector, SelectorSet, SpiffeId, TrustDomain};

use super::{
    AttestedAgent, Datastore, DatastoreError, EntryChanges, EntryFilter, JoinToken, NewAgentSvid,
    Page, SelectorMatch, StoredBundle,
};

/// Page size used when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// Largest page returned, whatever the caller asks for.
pub const MAX_PAGE_SIZE: usize = 10_000;
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
// Helpers

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn effective_page_size(page_size: usize) -> usize {
    match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// Page tokens are `<prefix><seq>` with seq > 0; an absent or empty token is the first page.
fn parse_page_token(token: Option<&str>, prefix: char) -> Result<i64> {
    let Some(t) = token.filter(|t| !t.is_empty()) else {
        return Ok(0);
    };
    t.strip_prefix(prefix)
        .filter(|d| !d.is_empty() && d.len() <= 19 && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse::<i64>().ok())
        .filter(|seq| *seq > 0)
        .ok_or_else(|| DatastoreError::InvalidPageToken(t.chars().take(64).collect()))
}

fn page_token(prefix: char, seq: i64) -> String {
    format!("{prefix}{seq}")
}

/// Splits `limit + 1` fetched rows into a page and the next token.
fn into_page<T>(mut rows: Vec<(i64, T)>, limit: usize, prefix: char) -> Page<T> {
    let next_token = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(seq, _)| page_token(prefix, *seq))
    } else {
        None
    };
    Page {
        items: rows.into_iter().map(|(_, item)| item).collect(),
        next_token,
    }
}

fn ttl_to_sql(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(DatastoreError::Json)
}

/// The registration identity, unique per (SPIFFE ID, parent, selector set): the SHA-256 of
/// [`reg_key_text`].
fn reg_key(e: &RegistrationEntry) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, reg_key_text(e).as_bytes())
        .as_ref()
        .to_vec()
}

/// `spiffe_id\nparent_id` then `\ntype:value` per selector in sorted order. Selector types have
/// no ':' and neither IDs nor selectors contain '\n', so the encoding is unambiguous.
fn reg_key_text(e: &RegistrationEntry) -> String {
    let mut key = format!("{}\n{}", e.spiffe_id, e.parent_id);
    for s in &e.selectors {
        key.push('\n');
        key.push_str(s.kind());
        key.push(':');
        key.push_str(s.value());
    }
    key
}

fn token_hash(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

// ---------------------------------------------------------------------------------------------
// Entries: rows and decoding

/// Columns of an entry row, as read by [`EntryRow::read`]; the last one aggregates the entry's
/// selectors as a JSON array of "type:value".
const ENTRY_COLUMNS: &str = "e.seq, e.id, e.spiffe_id, e.parent_id, e.x509_ttl, e.jwt_ttl, \
     e.dns_names, e.admin, e.downstream, e.federates_with, e.hint, e.revision, e.created_at, \
     e.updated_at, e.selector_count, \
     (SELECT json_group_array(s.type || ':' || s.value) FROM entry_selectors s \
      WHERE s.entry_seq = e.seq)";

/// An entry row before validation.
struct EntryRow {
    seq: i64,
    id: String,
    spiffe_id: String,
    parent_id: String,
    x509_ttl: Option<i64>,
    jwt_ttl: Option<i64>,
    dns_names: String,
    admin: i64,
    downstream: i64,
    federates_with: String,
    hint: String,
    revision: i64,
    created_at: i64,
    updated_at: i64,
    selector_count: i64,
    selectors: String,
}

impl EntryRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: r.get(0)?,
            id: r.get(1)?,
            spiffe_id: r.get(2)?,
            parent_id: r.get(3)?,
            x509_ttl: r.get(4)?,
            jwt_ttl: r.get(5)?,
            dns_names: r.get(6)?,
            admin: r.get(7)?,
            downstream: r.get(8)?,
            federates_with: r.get(9)?,
            hint: r.get(10)?,
            revision: r.get(11)?,
            created_at: r.get(12)?,
            updated_at: r.get(13)?,
            selector_count: r.get(14)?,
            selectors: r.get(15)?,
        })
    }

    /// Validates the row into an entry; anything that does not parse is `Corrupt`, naming the
    /// entry and the field.
    fn decode(self) -> Result<(i64, RegistrationEntry)> {
        let id = self.id;
        let bad = |field: &str, why: String| {
            DatastoreError::Corrupt(format!("entry {id:?}: {field}: {why}"))
        };
        let spiffe_id =
            SpiffeId::parse(&self.spiffe_id).map_err(|e| bad("spiffe_id", e.to_string()))?;
        let parent_id =
            SpiffeId::parse(&self.parent_id).map_err(|e| bad("parent_id", e.to_string()))?;
        let raw: Vec<String> =
            serde_json::from_str(&self.selectors).map_err(|e| bad("selectors", e.to_string()))?;
        let selectors = raw
            .iter()
            .map(|s| Selector::parse(s))
            .collect::<Result<SelectorSet, _>>()
            .map_err(|e| bad("selectors", e.to_string()))?;
        if i64::try_from(selectors.len()).ok() != Some(self.selector_count)
            || raw.len() != selectors.len()
        {
            return Err(bad(
                "selectors",
                format!(
                    "{} stored selectors but selector_count is {}",
                    raw.len(),
                    self.selector_count
                ),
            ));
        }
        let ttl = |field: &str, v: Option<i64>| match v {
            None | Some(0) => Ok(None),
            Some(s) => u64::try_from(s)
                .map(|s| Some(Duration::from_secs(s)))
                .map_err(|_| bad(field, format!("negative TTL {s}"))),
        };
        let x509_svid_ttl = ttl("x509_ttl", self.x509_ttl)?;
        let jwt_svid_ttl = ttl("jwt_ttl", self.jwt_ttl)?;
        let dns_names: Vec<String> =
            serde_json::from_str(&self.dns_names).map_err(|e| bad("dns_names", e.to_string()))?;
        let federates_with: Vec<TrustDomain> = serde_json::from_str(&self.federates_with)
            .map_err(|e| bad("federates_with", e.to_string()))?;
        let entry = RegistrationEntry {
            id: String::new(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            dns_names,
            admin: self.admin != 0,
            downstream: self.downstream != 0,
            federates_with,
            hint: self.hint,
            revision: self.revision,
            created_at: self.created_at,
            updated_at: self.updated_at,
        };
        Ok((self.seq, RegistrationEntry { id, ..entry }))
    }
}

/// Content columns of an entry, in the order of [`content_params`].
const ENTRY_CONTENT: &str = "spiffe_id, parent_id, x509_ttl, jwt_ttl, dns_names, admin, \
     downstream, federates_with, hint, reg_key, selector_count";

/// Values for [`ENTRY_CONTENT`].
fn content_params(e: &RegistrationEntry, key: Vec<u8>) -> Result<Vec<Value>> {
    let federates: Vec<&str> = e.federates_with.iter().map(TrustDomain::name).collect();
    Ok(vec![
        Value::Text(e.spiffe_id.to_string()),
        Value::Text(e.parent_id.to_string()),
        ttl_to_sql(e.x509_svid_ttl).map_or(Value::Null, Value::Integer),
        ttl_to_sql(e.jwt_svid_ttl).map_or(Value::Null, Value::Integer),
        Value::Text(to_json(&e.dns_names)?),
        Value::Integer(i64::from(e.admin)),
        Value::Integer(i64::from(e.downstream)),
        Value::Text(to_json(&federates)?),
        Value::Text(e.hint.clone()),
        Value::Blob(key),
        Value::Integer(e.selectors.len() as i64),
    ])
}

fn insert_selectors(conn: &Connection, seq: i64, selectors: &SelectorSet) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO entry_selectors (entry_seq, type, value, entry_selector_count) \
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    let count = selectors.len() as i64;
    for s in selectors {
        stmt.execute(params![seq, s.kind(), s.value(), count])?;
    }
    Ok(())
}

fn current_revision(conn: &Connection) -> Result<i64> {
    conn.prepare_cached("SELECT value FROM revision WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?
        .ok_or_else(|| DatastoreError::Corrupt("the revision counter row is missing".into()))
}

fn set_revision(conn: &Connection, rev: i64) -> Result<()> {
    conn.prepare_cached("UPDATE revision SET value = ?1 WHERE id = 1")?
        .execute([rev])?;
    Ok(())
}

/// The id of the entry registered under `key`, other than `except`.
fn find_registration(
    conn: &Connection,
    key: &[u8],
    except: Option<&str>,
) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT id FROM entries WHERE reg_key = ?1 AND id IS NOT ?2")?
        .query_row(params![key, except], |r| r.get(0))
        .optional()?)
}

fn get_entry_conn(conn: &Connection, id: &str) -> Result<Option<(i64, RegistrationEntry)>> {
    let sql = format!("SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.id = ?1");
    let row = conn
        .prepare_cached(&sql)?
        .query_row([id], EntryRow::read)
        .optional()?;
    row.map(EntryRow::decode).transpose()
}

// ---------------------------------------------------------------------------------------------
// Entries: filters

/// A filter as SQL: an optional `WITH` prefix, conditions on `entries e`, and their parameters
/// in textual order.
#[derive(Default)]
struct FilterSql {
    with: String,
    conds: Vec<String>,
    params: Vec<Value>,
}

impl FilterSql {
    /// `None` when the filter can match nothing (`Any` of no selectors).
    fn build(filter: &EntryFilter) -> Option<Self> {
        let mut f = Self::default();
        if let Some((set, mode)) = &filter.selectors {
            let n = set.len();
            if n == 0 {
                match mode {
                    SelectorMatch::Any => return None,
                    SelectorMatch::Superset => {}
                    SelectorMatch::Exact | SelectorMatch::Subset => {
                        f.conds.push("e.selector_count = 0".into());
                    }
                }
            } else {
                f.with = format!(
                    "WITH want(t, v) AS (VALUES {}) ",
                    vec!["(?, ?)"; n].join(", ")
                );
                for s in set {
                    f.params.push(Value::Text(s.kind().to_string()));
                    f.params.push(Value::Text(s.value().to_string()));
                }
                // CROSS JOIN keeps `want` as the outer loop: one index probe per wanted selector.
                let hits = "FROM want CROSS JOIN entry_selectors es \
                            ON es.type = want.t AND es.value = want.v";
                // With one wanted selector every group has one row: no GROUP BY needed.
                let group = |having: &str| {
                    if n == 1 {
                        String::new()
                    } else {
                        format!(" GROUP BY es.entry_seq HAVING {having}")
                    }
                };
                f.conds.push(match mode {
                    // At least one shared selector.
                    SelectorMatch::Any => format!("e.seq IN (SELECT es.entry_seq {hits})"),
                    // Has all n wanted selectors.
                    SelectorMatch::Superset => format!(
                        "e.seq IN (SELECT es.entry_seq {hits}{})",
                        group(&format!("COUNT(*) = {n}"))
                    ),
                    // Has all n and nothing else.
                    SelectorMatch::Exact => format!(
                        "e.seq IN (SELECT es.entry_seq {hits} \
                         AND es.entry_selector_count = {n}{})",
                        group(&format!("COUNT(*) = {n}"))
                    ),
                    // Every selector of the entry is wanted: entries with at most n selectors
                    // that have all of theirs among the hits (entries with none match
                    // trivially).
                    SelectorMatch::Subset => format!(
                        "e.seq IN (SELECT es.entry_seq {hits} \
                         AND es.entry_selector_count <= {n}{} \
                         UNION ALL SELECT seq FROM entries WHERE selector_count = 0)",
                        group("COUNT(*) = MAX(es.entry_selector_count)")
                    ),
                });
            }
        }
        if let Some(id) = &filter.spiffe_id {
            f.conds.push("e.spiffe_id = ?".into());
            f.params.push(Value::Text(id.to_string()));
        }
        if let Some(id) = &filter.parent_id {
            f.conds.push("e.parent_id = ?".into());
            f.params.push(Value::Text(id.to_string()));
        }
        Some(f)
    }
}

fn list_entries_conn(
    conn: &mut Connection,
    filter: &EntryFilter,
    page_size: usize,
    after: i64,
) -> Result<Page<RegistrationEntry>> {
    let Some(mut f) = FilterSql::build(filter) else {
        return Ok(Page {
            items: Vec::new(),
            next_token: None,
        });
    };
    let limit = effective_page_size(page_size);
    f.conds.push("e.seq > ?".into());
    f.params.push(Value::Integer(after));
    f.params.push(Value::Integer(limit as i64 + 1));
    let sql = format!(
        "{}SELECT {ENTRY_COLUMNS} FROM entries e WHERE {} ORDER BY e.seq LIMIT ?",
        f.with,
        f.conds.join(" AND ")
    );
    let tx = conn.transaction()?;
    let rows = {
        let mut stmt = tx.prepare_cached(&sql)?;
        let raw = stmt
            .query_map(params_from_iter(f.params), EntryRow::read)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter()
            .map(EntryRow::decode)
            .collect::<Result<Vec<_>>>()?
    };
    tx.finish()?;
    Ok(into_page(rows, limit, 'e'))
}

fn count_entries_conn(conn: &Connection, filter: &EntryFilter) -> Result<u64> {
    let Some(f) = FilterSql::build(filter) else {
        return Ok(0);
    };
    let sql = if f.conds.is_empty() {
        "SELECT COUNT(*) FROM entries".to_string()
    } else {
        format!(
            "{}SELECT COUNT(*) FROM entries e WHERE {}",
            f.with,
            f.conds.join(" AND ")
        )
    };
    let n: i64 = conn
        .prepare_cached(&sql)?
        .query_row(params_from_iter(f.params), |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Entries: writes

fn create_entries_conn(
    conn: &mut Connection,
    entries: Vec<RegistrationEntry>,
    now: i64,
) -> Result<Vec<Result<RegistrationEntry>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut rev = current_revision(&tx)?;
    let mut out = Vec::with_capacity(entries.len());
    {
        let mut insert = tx.prepare_cached(&format!(
            "INSERT INTO entries (id, revision, created_at, updated_at, {ENTRY_CONTENT}) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))?;
        for entry in entries {
            let key = reg_key(&entry);
            // Also sees entries inserted earlier in this batch: duplicates within the batch
            // get the id of the first one.
            if let Some(existing) = find_registration(&tx, &key, None)? {
                out.push(Err(DatastoreError::AlreadyExists(existing)));
                continue;
            }
            rev += 1;
            let entry = RegistrationEntry {
                id: uuid::Uuid::new_v4().to_string(),
                revision: rev,
                created_at: now,
                updated_at: now,
                ..entry
            };
            let mut values = vec![
                Value::Text(entry.id.clone()),
                Value::Integer(rev),
                Value::Integer(now),
                Value::Integer(now),
            ];
            values.extend(content_params(&entry, key)?);
            insert.execute(params_from_iter(values))?;
            insert_selectors(&tx, tx.last_insert_rowid(), &entry.selectors)?;
            out.push(Ok(entry));
        }
    }
    set_revision(&tx, rev)?;
    tx.commit()?;
    Ok(out)
}

fn update_entry_conn(
    conn: &mut Connection,
    entry: RegistrationEntry,
    now: i64,
) -> Result<RegistrationEntry> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stored: Option<(i64, i64)> = tx
        .prepare_cached("SELECT seq, created_at FROM entries WHERE id = ?1")?
        .query_row([&entry.id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((seq, created_at)) = stored else {
        return Err(DatastoreError::NotFound(format!(
            "entry {}",
            sigil::text::quote_for_display(&entry.id)
        )));
    };
    let key = reg_key(&entry);
    if let Some(other) = find_registration(&tx, &key, Some(&entry.id))? {
        return Err(DatastoreError::AlreadyExists(other));
    }
    let rev = current_revision(&tx)? + 1;
    let entry = RegistrationEntry {
        revision: rev,
        created_at,
        updated_at: now,
        ..entry
    };
    let mut values = content_params(&entry, key)?;
    values.extend([
        Value::Integer(rev),
        Value::Integer(now),
        Value::Integer(seq),
    ]);
    let assignments = ENTRY_CONTENT
        .split(", ")
        .map(|c| format!("{c} = ?"))
        .collect::<Vec<_>>()
        .join(", ");
    tx.prepare_cached(&format!(
        "UPDATE entries SET {assignments}, revision = ?, updated_at = ? WHERE seq = ?"
    ))?
    .execute(params_from_iter(values))?;
    tx.prepare_cached("DELETE FROM entry_selectors WHERE entry_seq = ?1")?
        .execute([seq])?;
    insert_selectors(&tx, seq, &entry.selectors)?;
    set_revision(&tx, rev)?;
    tx.commit()?;
    Ok(entry)
}

fn delete_entry_conn(conn: &mut Connection, id: &str, now: i64) -> Result<RegistrationEntry> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some((seq, entry)) = get_entry_conn(&tx, id)? else {
        return Err(DatastoreError::NotFound(format!(
            "entry {}",
            sigil::text::quote_for_display(id)
        )));
    };
    let rev = current_revision(&tx)? + 1;
    // entry_selectors rows go with it (ON DELETE CASCADE).
    tx.prepare_cached("DELETE FROM entries WHERE seq = ?1")?
        .execute([seq])?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO entry_tombstones (id, revision, deleted_at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![id, rev, now])?;
    set_revision(&tx, rev)?;
    tx.commit()?;
    Ok(entry)
}

fn entry_changes_conn(conn: &mut Connection, since: i64) -> Result<EntryChanges> {
    // One read transaction: the three queries see the same snapshot.
    let tx = conn.transaction()?;
    let revision = current_revision(&tx)?;
    let upserted = {
        let sql = format!(
            "SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.revision > ?1 ORDER BY e.revision"
        );
        let mut stmt = tx.prepare_cached(&sql)?;
        let raw = stmt
            .query_map([since], EntryRow::read)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter()
            .map(|r| r.decode().map(|(_, e)| e))
            .collect::<Result<Vec<_>>>()?
    };
    let removed = tx
        .prepare_cached("SELECT id FROM entry_tombstones WHERE revision > ?1 ORDER BY revision")?
        .query_map([since], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    tx.finish()?;
    Ok(EntryChanges {
        upserted,
        removed,
        revision,
    })
}

// ---------------------------------------------------------------------------------------------
// Agents

const AGENT_COLUMNS: &str = "seq, spiffe_id, attestation_type, serial, expires_at, banned, \
     selectors, created_at, updated_at, new_serial, new_expires_at";

struct AgentRow {
    seq: i64,
    spiffe_id: String,
    attestation_type: String,
    serial: String,
    expires_at: i64,
    banned: i64,
    selectors: String,
    created_at: i64,
    updated_at: i64,
    new_serial: Option<String>,
    new_expires_at: Option<i64>,
}

impl AgentRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: r.get(0)?,
            spiffe_id: r.get(1)?,
            attestation_type: r.get(2)?,
            serial: r.get(3)?,
            expires_at: r.get(4)?,
            banned: r.get(5)?,
            selectors: r.get(6)?,
            created_at: r.get(7)?,
            updated_at: r.get(8)?,
            new_serial: r.get(9)?,
            new_expires_at: r.get(10)?,
        })
    }

    fn decode(self) -> Result<(i64, AttestedAgent)> {
        let bad = |field: &str, why: String| {
            DatastoreError::Corrupt(format!("agent {:?}: {field}: {why}", self.spiffe_id))
        };
        let spiffe_id =
            SpiffeId::parse(&self.spiffe_id).map_err(|e| bad("spiffe_id", e.to_string()))?;
        let raw: Vec<String> =
            serde_json::from_str(&self.selectors).map_err(|e| bad("selectors", e.to_string()))?;
        let selectors = raw
            .iter()
            .map(|s| Selector::parse(s))
            .collect::<Result<SelectorSet, _>>()
            .map_err(|e| bad("selectors", e.to_string()))?;
        let new_x509_svid = match (self.new_serial, self.new_expires_at) {
            (None, None) => None,
            (Some(serial), Some(expires_at)) => Some(NewAgentSvid { serial, expires_at }),
            _ => {
                return Err(bad(
                    "new_serial",
                    "set without new_expires_at or the other way round".into(),
                ))
            }
        };
        Ok((
            self.seq,
            AttestedAgent {
                spiffe_id,
                attestation_type: self.attestation_type,
                x509_svid_serial: self.serial,
                x509_svid_expires_at: self.expires_at,
                new_x509_svid,
                banned: self.banned != 0,
                selectors,
                created_at: self.created_at,
                updated_at: self.updated_at,
            },
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Bundles

/// The two bundle tables, which have the same columns: the server's own bundle and the
/// federated bundles of other trust domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BundleTable {
    Own,
    Federated,
}

impl BundleTable {
    fn name(self) -> &'static str {
        match self {
            BundleTable::Own => "bundles",
            BundleTable::Federated => "federated_bundles",
        }
    }

    /// How corruption messages name a row of this table.
    fn what(self) -> &'static str {
        match self {
            BundleTable::Own => "bundle",
            BundleTable::Federated => "federated bundle",
        }
    }
}

fn decode_bundle(
    table: BundleTable,
    td: &TrustDomain,
    roots: &str,
    jwt_keys_json: String,
    sequence: i64,
) -> Result<StoredBundle> {
    let bad = |why: String| DatastoreError::Corrupt(format!("{} of {td}: {why}", table.what()));
    let encoded: Vec<String> =
        serde_json::from_str(roots).map_err(|e| bad(format!("x509_roots: {e}")))?;
    let x509_roots = encoded
        .iter()
        .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("x509_roots: {e}")))?;
    let sequence =
        u64::try_from(sequence).map_err(|_| bad(format!("negative sequence {sequence}")))?;
    Ok(StoredBundle {
        trust_domain: td.clone(),
        x509_roots,
        jwt_keys_json,
        sequence,
    })
}

fn get_bundle_conn(
    conn: &Connection,
    table: BundleTable,
    td: &TrustDomain,
) -> Result<Option<StoredBundle>> {
    let row: Option<(String, String, i64)> = conn
        .prepare_cached(&format!(
            "SELECT x509_roots, jwt_keys_json, sequence FROM {} WHERE trust_domain = ?1",
            table.name()
        ))?
        .query_row([td.name()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    row.map(|(roots, jwt, seq)| decode_bundle(table, td, &roots, jwt, seq))
        .transpose()
}

/// Upserts a bundle into `table`; the sequence is bumped only when the content changes.
fn set_bundle_conn(
    conn: &mut Connection,
    table: BundleTable,
    bundle: StoredBundle,
) -> Result<StoredBundle> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stored = get_bundle_conn(&tx, table, &bundle.trust_domain)?;
    let sequence = match &stored {
        Some(s)
            if s.x509_roots == bundle.x509_roots
                && same_jwks(&s.jwt_keys_json, &bundle.jwt_keys_json) =>
        {
            return Ok(s.clone());
        }
        Some(s) => s.sequence.saturating_add(1),
        None => 1,
    };
    let roots: Vec<String> = bundle
        .x509_roots
        .iter()
        .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
        .collect();
    tx.prepare_cached(&format!(
        "INSERT INTO {} (trust_domain, x509_roots, jwt_keys_json, sequence, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (trust_domain) DO UPDATE SET x509_roots = excluded.x509_roots, \
         jwt_keys_json = excluded.jwt_keys_json, sequence = excluded.sequence, \
         updated_at = excluded.updated_at",
        table.name()
    ))?
    .execute(params![
        bundle.trust_domain.name(),
        to_json(&roots)?,
        bundle.jwt_keys_json,
        i64::try_from(sequence).unwrap_or(i64::MAX),
        unix_now(),
    ])?;
    tx.commit()?;
    Ok(StoredBundle { sequence, ..bundle })
}

/// A federated bundle row whose trust domain column is read too.
fn decode_federated_row(name: &str, roots: &str, jwt: String, seq: i64) -> Result<StoredBundle> {
    let td = TrustDomain::new(name).map_err(|e| {
        DatastoreError::Corrupt(format!("federated bundle trust domain {name:?}: {e}"))
    })?;
    decode_bundle(BundleTable::Federated, &td, roots, jwt, seq)
}

/// Same JWKS: byte-identical, or the same JSON value (key order and whitespace aside).
fn same_jwks(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (
                serde_json::from_str::<serde_json::Value>(a),
                serde_json::from_str::<serde_json::Value>(b),
            ),
            (Ok(x), Ok(y)) if x == y
        )
}

// ---------------------------------------------------------------------------------------------
// The trait

#[async_trait]
impl Datastore for SqliteDatastore {
    async fn create_entries(
        &self,
        entries: Vec<RegistrationEntry>,
    ) -> Result<Vec<Result<RegistrationEntry>>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |conn| create_entries_conn(conn, entries, unix_now()))
            .await
    }

    async fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        let id = id.to_string();
        self.read(move |conn| Ok(get_entry_conn(conn, &id)?.map(|(_, e)| e)))
            .await
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<RegistrationEntry>> {
        let after = parse_page_token(page_token, 'e')?;
        let filter = filter.clone();
        self.read(move |conn| list_entries_conn(conn, &filter, page_size, after))
            .await
    }

    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64> {
        let filter = filter.clone();
        self.read(move |conn| count_entries_conn(conn, &filter))
            .await
    }

    async fn update_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry> {
        self.write(move |conn| update_entry_conn(conn, entry, unix_now()))
            .await
    }

    async fn delete_entry(&self, id: &str) -> Result<RegistrationEntry> {
        let id = id.to_string();
        self.write(move |conn| delete_entry_conn(conn, &id, unix_now()))
            .await
    }

    async fn entry_changes_since(&self, revision: i64) -> Result<EntryChanges> {
        self.read(move |conn| entry_changes_conn(conn, revision))
            .await
    }

    /// Inserts or replaces by SPIFFE ID. The datastore sets `updated_at` to now; `created_at`
    /// is the stored one on replace, else the given one (now if 0). A banned agent stays
    /// banned: only [`Datastore::set_agent_banned`] clears the flag, so an attestation racing
    /// with a ban cannot undo it.
    async fn upsert_agent(&self, agent: AttestedAgent) -> Result<()> {
        self.write(move |conn| {
            let now = unix_now();
            let selectors: Vec<String> = agent.selectors.iter().map(ToString::to_string).collect();
            let created_at = if agent.created_at > 0 {
                agent.created_at
            } else {
                now
            };
            let (new_serial, new_expires_at) = agent
                .new_x509_svid
                .map(|n| (n.serial, n.expires_at))
                .unzip();
            conn.prepare_cached(
                "INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, banned, \
                 selectors, created_at, updated_at, new_serial, new_expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (spiffe_id) DO UPDATE SET \
                 attestation_type = excluded.attestation_type, serial = excluded.serial, \
                 expires_at = excluded.expires_at, banned = (banned OR excluded.banned), \
                 selectors = excluded.selectors, updated_at = excluded.updated_at, \
                 new_serial = excluded.new_serial, new_expires_at = excluded.new_expires_at",
            )?
            .execute(params![
                agent.spiffe_id.to_string(),
                agent.attestation_type,
                agent.x509_svid_serial,
                agent.x509_svid_expires_at,
                agent.banned,
                to_json(&selectors)?,
                created_at,
                now,
                new_serial,
                new_expires_at,
            ])?;
            Ok(())
        })
        .await
    }

    async fn set_agent_new_svid(
        &self,
        id: &SpiffeId,
        current_serial: &str,
        new: NewAgentSvid,
    ) -> Result<bool> {
        let (id, current) = (id.to_string(), current_serial.to_string());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE agents SET new_serial = ?3, new_expires_at = ?4, updated_at = ?5 \
                     WHERE spiffe_id = ?1 AND serial = ?2 AND banned = 0",
                )?
                .execute(params![id, current, new.serial, new.expires_at, unix_now()])?;
            Ok(n == 1)
        })
        .await
    }

    async fn promote_agent_svid(&self, id: &SpiffeId, serial: &str) -> Result<bool> {
        let (id, serial) = (id.to_string(), serial.to_string());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE agents SET serial = new_serial, expires_at = new_expires_at, \
                     new_serial = NULL, new_expires_at = NULL, updated_at = ?3 \
                     WHERE spiffe_id = ?1 AND new_serial = ?2 AND new_expires_at IS NOT NULL \
                     AND banned = 0",
                )?
                .execute(params![id, serial, unix_now()])?;
            Ok(n == 1)
        })
        .await
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>> {
        let id = id.to_string();
        self.read(move |conn| {
            let row = conn
                .prepare_cached(&format!(
                    "SELECT {AGENT_COLUMNS} FROM agents WHERE spiffe_id = ?1"
                ))?
                .query_row([&id], AgentRow::read)
                .optional()?;
            Ok(row.map(AgentRow::decode).transpose()?.map(|(_, a)| a))
        })
        .await
    }

    async fn list_agents(
        &self,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page<AttestedAgent>> {
        let after = parse_page_token(page_token, 'a')?;
        let limit = effective_page_size(page_size);
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(&format!(
                    "SELECT {AGENT_COLUMNS} FROM agents WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ))?
                .query_map(params![after, limit as i64 + 1], AgentRow::read)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let rows = rows
                .into_iter()
                .map(AgentRow::decode)
                .collect::<Result<Vec<_>>>()?;
            Ok(into_page(rows, limit, 'a'))
        })
        .await
    }

    async fn count_agents(&self) -> Result<u64> {
        self.read(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM agents")?
                .query_row([], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM agents WHERE spiffe_id = ?1")?
                .execute([&id])?;
            if n == 0 {
                return Err(DatastoreError::NotFound(format!("agent {id}")));
            }
            Ok(())
        })
        .await
    }

    async fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE agents SET banned = ?2, updated_at = ?3 WHERE spiffe_id = ?1",
                )?
                .execute(params![id, banned, unix_now()])?;
            if n == 0 {
                return Err(DatastoreError::NotFound(format!("agent {id}")));
            }
            Ok(())
        })
        .await
    }

    /// Stores the token's SHA-256, never the token itself.
    async fn create_join_token(&self, token: JoinToken) -> Result<()> {
        self.write(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO join_tokens (token_sha256, expires_at, spiffe_id, created_at) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (token_sha256) DO NOTHING",
                )?
                .execute(params![
                    token_hash(&token.token),
                    token.expires_at,
                    token.spiffe_id.as_ref().map(ToString::to_string),
                    unix_now(),
                ])?;
            if inserted == 0 {
                return Err(DatastoreError::JoinTokenCollision);
            }
            Ok(())
        })
        .await
    }

    /// A token is expired when `now >= expires_at` (the same rule as
    /// [`Datastore::prune_join_tokens`]).
    async fn consume_join_token(&self, token: &str, now: i64) -> Result<JoinToken> {
        let token = token.to_string();
        self.write(move |conn| {
            // One statement, committed before returning: exactly one caller gets the row.
            let row: Option<(i64, Option<String>)> = conn
                .prepare_cached(
                    "DELETE FROM join_tokens WHERE token_sha256 = ?1 \
                     RETURNING expires_at, spiffe_id",
                )?
                .query_row([token_hash(&token)], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((expires_at, spiffe_id)) = row else {
                return Err(DatastoreError::NotFound("join token".into()));
            };
            if now >= expires_at {
                return Err(DatastoreError::Expired);
            }
            let spiffe_id = spiffe_id
                .map(|s| SpiffeId::parse(&s))
                .transpose()
                .map_err(|e| DatastoreError::Corrupt(format!("join token spiffe_id: {e}")))?;
            Ok(JoinToken {
                token,
                expires_at,
                spiffe_id,
            })
        })
        .await
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64> {
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM join_tokens WHERE expires_at <= ?1")?
                .execute([now])?;
            Ok(n as u64)
        })
        .await
    }

    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>> {
        let td = td.clone();
        self.read(move |conn| get_bundle_conn(conn, BundleTable::Own, &td))
            .await
    }

    async fn set_bundle(&self, bundle: StoredBundle) -> Result<StoredBundle> {
        self.write(move |conn| set_bundle_conn(conn, BundleTable::Own, bundle))
            .await
    }

    async fn set_federated_bundle(&self, bundle: StoredBundle) -> Result<StoredBundle> {
        self.write(move |conn| set_bundle_conn(conn, BundleTable::Federated, bundle))
            .await
    }

    async fn get_federated_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>> {
        let td = td.clone();
        self.read(move |conn| get_bundle_conn(conn, BundleTable::Federated, &td))
            .await
    }

    async fn list_federated_bundles(&self) -> Result<Vec<StoredBundle>> {
        self.read(|conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT trust_domain, x509_roots, jwt_keys_json, sequence \
                     FROM federated_bundles ORDER BY trust_domain",
                )?
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(name, roots, jwt, seq)| decode_federated_row(&name, &roots, jwt, seq))
                .collect()
        })
        .await
    }

    async fn delete_federated_bundle(&self, td: &TrustDomain) -> Result<StoredBundle> {
        let td = td.clone();
        self.write(move |conn| {
            // One statement: what is returned is exactly what was deleted.
            let row: Option<(String, String, i64)> = conn
                .prepare_cached(
                    "DELETE FROM federated_bundles WHERE trust_domain = ?1 \
                     RETURNING x509_roots, jwt_keys_json, sequence",
                )?
                .query_row([td.name()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let Some((roots, jwt, seq)) = row else {
                return Err(DatastoreError::NotFound(format!(
                    "federated bundle of trust domain {td}"
                )));
            };
            decode_bundle(BundleTable::Federated, &td, &roots, jwt, seq)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

    const TD: &str = "spiffe://example.org";

    fn id(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("{TD}{path}")).expect("test SPIFFE ID")
    }

    fn sels(v: &[&str]) -> SelectorSet {
        v.iter()
            .map(|s| Selector::parse(s).expect("test selector"))
            .collect()
    }

    fn entry(path: &str, parent: &str, selectors: &[&str]) -> RegistrationEntry {
        RegistrationEntry::new(id(path), id(parent), sels(selectors))
    }

    async fn open_tmp() -> TestResult<(tempfile::TempDir, SqliteDatastore)> {
        let dir = tempfile::tempdir()?;
        let ds = SqliteDatastore::open(&dir.path().join("data/datastore.sqlite3")).await?;
        Ok((dir, ds))
    }

    async fn create_all(
        ds: &SqliteDatastore,
        entries: Vec<RegistrationEntry>,
    ) -> TestResult<Vec<RegistrationEntry>> {
        Ok(ds
            .create_entries(entries)
            .await?
            .into_iter()
            .collect::<Result<Vec<_>>>()?)
    }

    fn spiffe_ids(items: &[RegistrationEntry]) -> Vec<String> {
        items
            .iter()
            .map(|e| e.spiffe_id.path().to_string())
            .collect()
    }

    /// Lists every page; checks page sizes along the way.
    async fn list_all(
        ds: &SqliteDatastore,
        filter: &EntryFilter,
        page_size: usize,
    ) -> TestResult<Vec<RegistrationEntry>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = ds.list_entries(filter, page_size, token.as_deref()).await?;
            assert!(page.items.len() <= page_size);
            if page.next_token.is_some() {
                assert_eq!(
                    page.items.len(),
                    page_size,
                    "only the last page may be short"
                );
            }
            out.extend(page.items);
            match page.next_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    #[tokio::test]
    async fn entry_round_trip() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let mut e = entry("/web", "/agent/1", &["unix:uid:1000", "unix:gid:1000"]);
        e.x509_svid_ttl = Some(Duration::from_secs(600));
        e.jwt_svid_ttl = Some(Duration::from_secs(300));
        e.dns_names = vec!["web.example.org".into(), "*.svc.local".into()];
        e.admin = true;
        e.downstream = true;
        e.federates_with = vec![
            TrustDomain::new("other.org")?,
            TrustDomain::new("third.org")?,
        ];
        e.hint = "external \"web\" ✓".into();
        e.id = "ignored-on-create".into();
        let before = unix_now();
        let created = create_all(&ds, vec![e.clone()]).await?.remove(0);
        assert_ne!(created.id, "ignored-on-create");
        assert!(uuid::Uuid::parse_str(&created.id).is_ok());
        assert_eq!(created.revision, 1);
        assert!(created.created_at >= before && created.created_at == created.updated_at);
        assert!(created.same_registration(&e));

        let got = ds.get_entry(&created.id).await?.ok_or("entry missing")?;
        assert_eq!(got, created);
        assert_eq!(ds.get_entry("no-such-id").await?, None);

        let page = ds.list_entries(&EntryFilter::default(), 0, None).await?;
        assert_eq!(page.items, vec![created.clone()]);
        assert_eq!(page.next_token, None);
        assert_eq!(ds.count_entries(&EntryFilter::default()).await?, 1);

        let mut changed = created.clone();
        changed.spiffe_id = id("/web2");
        changed.selectors = sels(&["unix:uid:1001"]);
        changed.dns_names.clear();
        changed.x509_svid_ttl = None;
        changed.created_at = 12345; // ignored
        let updated = ds.update_entry(changed.clone()).await?;
        assert_eq!(updated.revision, 2);
        assert_eq!(updated.created_at, created.created_at);
        assert_eq!(updated.id, created.id);
        assert_eq!(ds.get_entry(&created.id).await?, Some(updated.clone()));
        assert!(updated.same_registration(&changed));
        assert_eq!(updated.x509_svid_ttl, None);
        // The old selectors are gone from the index, the new ones are there.
        let by = |s: &[&str]| EntryFilter {
            selectors: Some((sels(s), SelectorMatch::Any)),
            ..Default::default()
        };
        assert_eq!(ds.count_entries(&by(&["unix:gid:1000"])).await?, 0);
        assert_eq!(ds.count_entries(&by(&["unix:uid:1001"])).await?, 1);

        let deleted = ds.delete_entry(&created.id).await?;
        assert_eq!(deleted, updated);
        assert_eq!(ds.get_entry(&created.id).await?, None);
        assert_eq!(ds.count_entries(&EntryFilter::default()).await?, 0);
        assert_eq!(ds.count_entries(&by(&["unix:uid:1001"])).await?, 0);
        Ok(())
    }

    #[tokio::test]
    async fn selector_match_modes() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        create_all(
            &ds,
            vec![
                entry("/a", "/p", &["t:a"]),
                entry("/ab", "/p", &["t:a", "t:b"]),
                entry("/abc", "/p", &["t:a", "t:b", "t:c"]),
                entry("/b", "/p", &["t:b"]),
                entry("/cd", "/p", &["t:c", "t:d"]),
                entry("/ab-q", "/q", &["t:a", "t:b"]),
                // A value containing the type separator and another type with the same value.
                entry("/colon", "/p", &["k8s:ns:a"]),
                entry("/other-type", "/p", &["u:a"]),
            ],
        )
        .await?;
        use SelectorMatch::*;
        type Case<'a> = (&'a [&'a str], SelectorMatch, Option<&'a str>, &'a [&'a str]);
        let cases: Vec<Case<'_>> = vec![
            (&["t:a"], Exact, None, &["/a"]),
            (&["t:a", "t:b"], Exact, None, &["/ab", "/ab-q"]),
            (&["t:b", "t:a"], Exact, Some("/q"), &["/ab-q"]),
            (&["t:a", "t:b", "t:c", "t:d"], Exact, None, &[]),
            (&["t:a", "t:b"], Subset, None, &["/a", "/ab", "/b", "/ab-q"]),
            (
                &["t:a", "t:b", "t:c"],
                Subset,
                None,
                &["/a", "/ab", "/abc", "/b", "/ab-q"],
            ),
            (&["t:c", "t:d", "t:x"], Subset, None, &["/cd"]),
            (&["t:c"], Subset, None, &[]),
            (&["t:b"], Subset, None, &["/b"]),
            (&["t:d"], Superset, None, &["/cd"]),
            (&["t:d"], Exact, None, &[]),
            (&["t:a", "t:b"], Subset, Some("/p"), &["/a", "/ab", "/b"]),
            (&["t:a"], Superset, None, &["/a", "/ab", "/abc", "/ab-q"]),
            (&["t:a", "t:b"], Superset, None, &["/ab", "/abc", "/ab-q"]),
            (&["t:a", "t:d"], Superset, None, &[]),
            (
                &["t:a", "t:d"],
                Any,
                None,
                &["/a", "/ab", "/abc", "/cd", "/ab-q"],
            ),
            (&["t:x"], Any, None, &[]),
            (&["k8s:ns:a"], Exact, None, &["/colon"]),
            (&["u:a"], Any, None, &["/other-type"]),
            (
                &["k8s:ns:a", "u:a", "t:a"],
                Subset,
                None,
                &["/a", "/colon", "/other-type"],
            ),
            // Empty sets.
            (&[], Any, None, &[]),
            (&[], Exact, None, &[]),
            (&[], Subset, None, &[]),
            (&[], Superset, Some("/q"), &["/ab-q"]),
        ];
        for (given, mode, parent, want) in cases {
            let filter = EntryFilter {
                parent_id: parent.map(id),
                selectors: Some((sels(given), mode)),
                ..Default::default()
            };
            let got = list_all(&ds, &filter, 2).await?;
            assert_eq!(
                spiffe_ids(&got),
                want,
                "{mode:?} {given:?} parent {parent:?}"
            );
            // Cross-check with the in-memory definition.
            for e in &got {
                let g = sels(given);
                let ok = match mode {
                    Exact => e.selectors == g,
                    Subset => e.selectors.is_subset_of(&g),
                    Superset => e.selectors.is_superset_of(&g),
                    Any => e.selectors.intersects(&g),
                };
                assert!(ok, "{mode:?} {given:?}: {}", e.spiffe_id);
            }
            assert_eq!(ds.count_entries(&filter).await?, want.len() as u64);
        }
        // spiffe_id filter, alone and combined.
        let f = EntryFilter {
            spiffe_id: Some(id("/ab")),
            ..Default::default()
        };
        assert_eq!(spiffe_ids(&list_all(&ds, &f, 10).await?), vec!["/ab"]);
        let f = EntryFilter {
            spiffe_id: Some(id("/ab")),
            parent_id: Some(id("/q")),
            ..Default::default()
        };
        assert_eq!(ds.count_entries(&f).await?, 0);
        Ok(())
    }

    #[tokio::test]
    async fn entries_without_selectors_match_every_subset() -> TestResult {
        // The API never creates them, but the datastore must not get the set algebra wrong.
        let (_dir, ds) = open_tmp().await?;
        create_all(
            &ds,
            vec![entry("/none", "/p", &[]), entry("/a", "/p", &["t:a"])],
        )
        .await?;
        let f = |s: &[&str], m| EntryFilter {
            selectors: Some((sels(s), m)),
            ..Default::default()
        };
        let got = list_all(&ds, &f(&["t:a"], SelectorMatch::Subset), 10).await?;
        assert_eq!(spiffe_ids(&got), vec!["/none", "/a"]);
        let got = list_all(&ds, &f(&[], SelectorMatch::Exact), 10).await?;
        assert_eq!(spiffe_ids(&got), vec!["/none"]);
        assert_eq!(ds.count_entries(&f(&[], SelectorMatch::Subset)).await?, 1);
        Ok(())
    }

    #[tokio::test]
    async fn pagination_with_filter_has_no_gaps_or_duplicates() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let mut batch = Vec::new();
        for i in 0..250 {
            let parent = if i % 3 == 0 { "/node/a" } else { "/node/b" };
            batch.push(entry(
                &format!("/w/{i}"),
                parent,
                &[&format!("u:{}", i % 7), "k:x"],
            ));
        }
        let created = create_all(&ds, batch).await?;
        let filter = EntryFilter {
            parent_id: Some(id("/node/a")),
            selectors: Some((sels(&["u:0", "u:1", "k:x"]), SelectorMatch::Subset)),
            ..Default::default()
        };
        let want: Vec<String> = created
            .iter()
            .filter(|e| {
                e.parent_id == id("/node/a")
                    && e.selectors.is_subset_of(&sels(&["u:0", "u:1", "k:x"]))
            })
            .map(|e| e.id.clone())
            .collect();
        assert!(want.len() > 10);
        for page_size in [1, 3, 7, want.len(), want.len() + 1] {
            let got: Vec<String> = list_all(&ds, &filter, page_size)
                .await?
                .into_iter()
                .map(|e| e.id)
                .collect();
            assert_eq!(got, want, "page size {page_size}");
        }
        // Unfiltered: insertion order, all of them, also while entries are deleted mid-way.
        let first = ds.list_entries(&EntryFilter::default(), 100, None).await?;
        ds.delete_entry(&created[100].id).await?; // the first row of the next page
        ds.delete_entry(&created[99].id).await?; // the row the token points at
        let rest = list_all_from(&ds, first.next_token.as_deref()).await?;
        let mut all: Vec<String> = first.items.iter().map(|e| e.id.clone()).collect();
        all.extend(rest);
        let want: Vec<String> = created
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 100)
            .map(|(_, e)| e.id.clone())
            .collect();
        assert_eq!(all, want);
        // Sizes: 0 means the default, huge values are capped.
        let page = ds.list_entries(&EntryFilter::default(), 0, None).await?;
        assert_eq!(page.items.len(), 248);
        assert_eq!(effective_page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(effective_page_size(usize::MAX), MAX_PAGE_SIZE);
        Ok(())
    }

    async fn list_all_from(ds: &SqliteDatastore, token: Option<&str>) -> TestResult<Vec<String>> {
        let mut out = Vec::new();
        let mut token = token.map(str::to_string);
        while let Some(t) = token {
            let page = ds
                .list_entries(&EntryFilter::default(), 100, Some(&t))
                .await?;
            out.extend(page.items.into_iter().map(|e| e.id));
            token = page.next_token;
        }
        Ok(out)
    }

    #[tokio::test]
    async fn garbage_page_tokens_are_rejected() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        create_all(&ds, vec![entry("/a", "/p", &["t:a"])]).await?;
        let f = EntryFilter::default();
        for t in [
            "x",
            "e",
            "e-1",
            "e0",
            "e1x",
            "a1",
            "e99999999999999999999",
            "💥",
            "e 1",
        ] {
            match ds.list_entries(&f, 10, Some(t)).await {
                Err(DatastoreError::InvalidPageToken(_)) => {}
                other => panic!("token {t:?}: {other:?}"),
            }
        }
        match ds.list_agents(10, Some("e5")).await {
            Err(DatastoreError::InvalidPageToken(_)) => {}
            other => panic!("entry token for agents: {other:?}"),
        }
        // The proto default (empty string) is the first page; a token past the end is empty.
        assert_eq!(ds.list_entries(&f, 10, Some("")).await?.items.len(), 1);
        assert!(ds
            .list_entries(&f, 10, Some("e999"))
            .await?
            .items
            .is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn duplicates_are_refused_per_entry() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let stored = create_all(&ds, vec![entry("/a", "/p", &["t:1", "t:2"])])
            .await?
            .remove(0);
        let results = ds
            .create_entries(vec![
                entry("/b", "/p", &["t:1"]),
                entry("/a", "/p", &["t:2", "t:1"]), // same as stored (selector order irrelevant)
                entry("/c", "/p", &["t:1"]),
                entry("/b", "/p", &["t:1"]), // same as the first of this batch
                entry("/a", "/p", &["t:1"]), // different selectors: fine
                entry("/a", "/q", &["t:1", "t:2"]), // different parent: fine
            ])
            .await?;
        assert_eq!(results.len(), 6);
        let first_b = match &results[0] {
            Ok(e) => e.id.clone(),
            Err(e) => return Err(format!("first /b: {e}").into()),
        };
        match &results[1] {
            Err(DatastoreError::AlreadyExists(existing)) => assert_eq!(existing, &stored.id),
            other => panic!("stored duplicate: {other:?}"),
        }
        match &results[3] {
            Err(DatastoreError::AlreadyExists(existing)) => assert_eq!(existing, &first_b),
            other => panic!("in-batch duplicate: {other:?}"),
        }
        for i in [0, 2, 4, 5] {
            assert!(results[i].is_ok(), "entry {i}: {:?}", results[i]);
        }
        assert_eq!(ds.count_entries(&EntryFilter::default()).await?, 5);
        // Revisions are distinct and increasing in batch order.
        let revs: Vec<i64> = results.iter().flatten().map(|e| e.revision).collect();
        assert_eq!(revs, vec![2, 3, 4, 5]);
        Ok(())
    }

    #[tokio::test]
    async fn update_collisions_and_not_found() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let created = create_all(
            &ds,
            vec![entry("/a", "/p", &["t:1"]), entry("/b", "/p", &["t:1"])],
        )
        .await?;
        let (a, b) = (&created[0], &created[1]);
        let mut clash = b.clone();
        clash.spiffe_id = a.spiffe_id.clone();
        match ds.update_entry(clash).await {
            Err(DatastoreError::AlreadyExists(other)) => assert_eq!(other, a.id),
            other => panic!("collision: {other:?}"),
        }
        // Updating an entry to its own registration (e.g. only the hint) is fine.
        let mut same = b.clone();
        same.hint = "new hint".into();
        let updated = ds.update_entry(same).await?;
        assert_eq!(updated.hint, "new hint");
        assert_eq!(updated.revision, 3);

        let mut ghost = a.clone();
        ghost.id = "00000000-0000-4000-8000-000000000000".into();
        assert!(matches!(
            ds.update_entry(ghost).await,
            Err(DatastoreError::NotFound(_))
        ));
        assert!(matches!(
            ds.delete_entry("nope").await,
            Err(DatastoreError::NotFound(_))
        ));
        ds.delete_entry(&a.id).await?;
        assert!(matches!(
            ds.delete_entry(&a.id).await,
            Err(DatastoreError::NotFound(_))
        ));
        // The freed registration can be created again, under a new id.
        let again = create_all(&ds, vec![entry("/a", "/p", &["t:1"])])
            .await?
            .remove(0);
        assert_ne!(again.id, a.id);
        // The failed update left nothing behind.
        assert_eq!(ds.get_entry(&b.id).await?, Some(updated));
        Ok(())
    }

    #[tokio::test]
    async fn revisions_and_changes_since() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let empty = ds.entry_changes_since(0).await?;
        assert_eq!(
            (empty.upserted.len(), empty.removed.len(), empty.revision),
            (0, 0, 0)
        );

        let c = create_all(
            &ds,
            vec![
                entry("/1", "/p", &["t:1"]),
                entry("/2", "/p", &["t:2"]),
                entry("/3", "/p", &["t:3"]),
            ],
        )
        .await?; // revisions 1, 2, 3
        let all = ds.entry_changes_since(0).await?;
        assert_eq!(all.revision, 3);
        assert_eq!(all.upserted, c);

        let mut u = c[0].clone();
        u.hint = "changed".into();
        let u = ds.update_entry(u).await?; // 4
        ds.delete_entry(&c[1].id).await?; // 5
        let since3 = ds.entry_changes_since(3).await?;
        assert_eq!(since3.revision, 5);
        assert_eq!(since3.upserted, vec![u.clone()]);
        assert_eq!(since3.removed, vec![c[1].id.clone()]);

        // Deleting the newest entry does not let the counter go back.
        ds.delete_entry(&u.id).await?; // 6
        let n = create_all(&ds, vec![entry("/4", "/p", &["t:4"])])
            .await?
            .remove(0);
        assert_eq!(n.revision, 7);
        let since5 = ds.entry_changes_since(5).await?;
        assert_eq!(since5.upserted, vec![n.clone()]);
        assert_eq!(since5.removed, vec![u.id.clone()]);
        assert_eq!(since5.revision, 7);
        let latest = ds.entry_changes_since(7).await?;
        assert!(latest.upserted.is_empty() && latest.removed.is_empty());
        assert_eq!(latest.revision, 7);
        // A batch with only duplicates consumes no revision.
        let dup = ds.create_entries(vec![entry("/4", "/p", &["t:4"])]).await?;
        assert!(matches!(dup[0], Err(DatastoreError::AlreadyExists(_))));
        assert_eq!(ds.entry_changes_since(7).await?.revision, 7);
        Ok(())
    }

    #[tokio::test]
    async fn data_survives_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ds.sqlite3");
        let (created, token_exp) = {
            let ds = SqliteDatastore::open(&path).await?;
            let created = create_all(&ds, vec![entry("/a", "/p", &["t:1"])]).await?;
            ds.delete_entry(&create_all(&ds, vec![entry("/gone", "/p", &["t:1"])]).await?[0].id)
                .await?;
            ds.upsert_agent(agent("/agent/1")).await?;
            ds.create_join_token(JoinToken {
                token: "tok".into(),
                expires_at: 4_000_000_000,
                spiffe_id: Some(id("/alias")),
            })
            .await?;
            ds.set_bundle(bundle(&[b"root"], "[]")).await?;
            (created, 4_000_000_000)
        }; // dropped: connections closed
        let ds = SqliteDatastore::open(&path).await?;
        assert_eq!(
            ds.get_entry(&created[0].id).await?,
            Some(created[0].clone())
        );
        let changes = ds.entry_changes_since(0).await?;
        assert_eq!(changes.revision, 3);
        assert_eq!(changes.removed.len(), 1);
        assert!(ds.get_agent(&id("/agent/1")).await?.is_some());
        let t = ds.consume_join_token("tok", 0).await?;
        assert_eq!((t.expires_at, t.spiffe_id), (token_exp, Some(id("/alias"))));
        assert_eq!(
            ds.get_bundle(&TrustDomain::new("example.org")?)
                .await?
                .map(|b| b.sequence),
            Some(1)
        );
        // New revisions continue after the stored ones.
        let next = create_all(&ds, vec![entry("/b", "/p", &["t:1"])])
            .await?
            .remove(0);
        assert_eq!(next.revision, 4);
        Ok(())
    }

    #[tokio::test]
    async fn file_modes_and_settings() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("new/sub/ds.sqlite3");
        let ds = SqliteDatastore::open(&path).await?;
        let mode =
            |p: &Path| -> TestResult<u32> { Ok(fs::metadata(p)?.permissions().mode() & 0o777) };
        assert_eq!(mode(&path)?, 0o600);
        assert_eq!(mode(&dir.path().join("new/sub"))?, 0o700);
        assert_eq!(mode(&dir.path().join("new"))?, 0o700);
        assert_eq!(ds.path(), path);
        create_all(&ds, vec![entry("/a", "/p", &["t:1"])]).await?;
        assert_eq!(mode(&dir.path().join("new/sub/ds.sqlite3-wal"))?, 0o600);
        // An empty path is an error value, not a panic.
        assert!(prepare_file(Path::new("")).is_err());
        let conn = lock(&ds.inner.writer);
        let get = |p: &str| -> TestResult<String> {
            Ok(conn
                .query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, Value>(0))
                .map(|v| format!("{v:?}"))?)
        };
        assert_eq!(get("journal_mode")?, "Text(\"wal\")");
        assert_eq!(get("synchronous")?, "Integer(2)"); // FULL
        assert_eq!(get("foreign_keys")?, "Integer(1)");
        assert_eq!(
            get("user_version")?,
            format!("Integer({})", migrations::MIGRATIONS.len())
        );
        Ok(())
    }

    #[test]
    fn migrations_are_versioned_and_idempotent() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ds.sqlite3");
        let version = |p: &Path| -> TestResult<i64> {
            Ok(Connection::open(p)?.query_row("PRAGMA user_version", [], |r| r.get(0))?)
        };
        drop(SqliteDatastore::open_blocking(&path)?);
        assert_eq!(version(&path)?, migrations::MIGRATIONS.len() as i64);
        drop(SqliteDatastore::open_blocking(&path)?);
        assert_eq!(version(&path)?, migrations::MIGRATIONS.len() as i64);

        // A later migration applies on top; a failing one rolls back completely.
        let known = migrations::MIGRATIONS.len();
        let mut conn = open_connection(&path)?;
        let mut extra = migrations::MIGRATIONS.to_vec();
        extra.push("CREATE TABLE extra (x INTEGER) STRICT;");
        migrations::migrate(&mut conn, &path, &extra)?;
        assert_eq!(version(&path)?, known as i64 + 1);
        let mut broken = extra.clone();
        broken.push("CREATE TABLE half (x INTEGER); THIS IS NOT SQL;");
        let err = migrations::migrate(&mut conn, &path, &broken).expect_err("broken migration");
        assert!(
            err.to_string()
                .contains(&format!("migration {}", known + 2)),
            "{err}"
        );
        assert_eq!(version(&path)?, known as i64 + 1);
        let half: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'half'",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(half, 0, "the failed migration's DDL was rolled back");
        drop(conn);

        // This code knows only `known` versions: the file is now "newer" and refused.
        let err = SqliteDatastore::open_blocking(&path).expect_err("newer schema");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("schema version {}", known + 1)) && msg.contains("newer"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        Ok(())
    }

    #[test]
    fn foreign_sqlite_database_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("other.db");
        Connection::open(&path)?
            .execute_batch("CREATE TABLE entries (x); INSERT INTO entries VALUES (1);")?;
        let err = SqliteDatastore::open_blocking(&path).expect_err("foreign database");
        assert!(
            err.to_string().contains("not a valid Sigil database"),
            "{err}"
        );
        // And it was not modified.
        let n: i64 = Connection::open(&path)?.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        assert_eq!(n, 0);
        Ok(())
    }

    #[test]
    fn non_sqlite_and_truncated_files_are_errors_not_panics() -> TestResult {
        let dir = tempfile::tempdir()?;
        let text = dir.path().join("text.sqlite3");
        fs::write(
            &text,
            "this is not a database, it is a text file\n".repeat(200),
        )?;
        let err = SqliteDatastore::open_blocking(&text).expect_err("text file");
        let msg = err.to_string();
        assert!(matches!(err, DatastoreError::Corrupt(_)), "{err:?}");
        assert!(
            msg.contains(&text.display().to_string()) && msg.contains("not a valid Sigil database"),
            "{msg}"
        );
        assert!(msg.contains("backup"), "{msg}");

        // A real database, cut short at several points.
        let good = dir.path().join("good.sqlite3");
        {
            let ds = SqliteDatastore::open_blocking(&good)?;
            let rt = tokio::runtime::Builder::new_current_thread().build()?;
            rt.block_on(async {
                let batch = (0..300)
                    .map(|i| entry(&format!("/w/{i}"), "/p", &[&format!("t:{i}")]))
                    .collect();
                create_all(&ds, batch).await
            })?;
        }
        let bytes = fs::read(&good)?;
        assert!(bytes.len() > 8192);
        for cut in [10, 100, 4096 + 10, bytes.len() / 2] {
            let p = dir.path().join(format!("cut{cut}.sqlite3"));
            fs::write(&p, &bytes[..cut])?;
            // Opening may fail or succeed (SQLite reads lazily); using it must not panic, and any
            // error is an error value.
            match SqliteDatastore::open_blocking(&p) {
                Err(e) => assert!(matches!(e, DatastoreError::Corrupt(_)), "cut {cut}: {e:?}"),
                Ok(ds) => {
                    let rt = tokio::runtime::Builder::new_current_thread().build()?;
                    let r = rt.block_on(async {
                        ds.list_entries(&EntryFilter::default(), 10_000, None).await
                    });
                    if let Ok(page) = r {
                        assert!(page.items.len() <= 300);
                    }
                }
            }
        }
        // A directory where the file should be.
        let d = dir.path().join("adir");
        fs::create_dir(&d)?;
        assert!(SqliteDatastore::open_blocking(&d).is_err());
        Ok(())
    }

    /// A database with 300 entries (several pages), closed (checkpointed: no WAL left).
    fn filled_database(path: &Path) -> TestResult {
        let ds = SqliteDatastore::open_blocking(path)?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        rt.block_on(async {
            let batch = (0..300)
                .map(|i| entry(&format!("/w/{i}"), "/p", &[&format!("t:{i}")]))
                .collect();
            create_all(&ds, batch).await
        })?;
        drop(ds);
        assert!(
            !path.with_extension("sqlite3-wal").exists(),
            "WAL checkpointed"
        );
        Ok(())
    }

    #[test]
    fn damaged_files_are_refused_at_open() -> TestResult {
        let dir = tempfile::tempdir()?;
        let good = dir.path().join("good.sqlite3");
        filled_database(&good)?;
        let bytes = fs::read(&good)?;
        let page = 4096;
        assert!(bytes.len() >= 8 * page, "{} bytes", bytes.len());
        // The good file passes (and keeps passing after a reopen).
        drop(SqliteDatastore::open_blocking(&good)?);

        let mut damaged = Vec::new();
        // Cut short: the header promises pages that are gone.
        let cut = dir.path().join("cut.sqlite3");
        fs::write(&cut, &bytes[..bytes.len() / 2])?;
        damaged.push(cut);
        // A b-tree page in the middle overwritten with garbage.
        let mut garbled = bytes.clone();
        let middle = (bytes.len() / page / 2) * page;
        for (i, b) in garbled[middle..middle + page].iter_mut().enumerate() {
            *b = (i * 7 + 13) as u8;
        }
        let garbage = dir.path().join("garbage.sqlite3");
        fs::write(&garbage, &garbled)?;
        damaged.push(garbage);
        for path in damaged {
            let before = fs::read(&path)?;
            let err = SqliteDatastore::open_blocking(&path).expect_err("damaged file opened");
            let msg = err.to_string();
            assert!(matches!(err, DatastoreError::Corrupt(_)), "{err:?}");
            assert!(
                msg.contains(&path.display().to_string())
                    && msg.contains("damaged")
                    && msg.contains("backup"),
                "{msg}"
            );
            assert!(msg.len() < 2048, "{msg}");
            assert_eq!(fs::read(&path)?, before, "a refused file is left as it was");
        }
        Ok(())
    }

    #[test]
    fn empty_file_is_refused_when_the_server_has_run_before() -> TestResult {
        let dir = tempfile::tempdir()?;
        // Missing: created, whatever is expected.
        let fresh = dir.path().join("fresh.sqlite3");
        drop(SqliteDatastore::open_blocking_with(&fresh, Expect::Data)?);
        assert!(fs::metadata(&fresh)?.len() > 0);

        // A store that held data, now 0 bytes (the WAL and SHM gone with it).
        let lost = dir.path().join("lost.sqlite3");
        filled_database(&lost)?;
        fs::write(&lost, b"")?;
        let _ = fs::remove_file(lost.with_extension("sqlite3-shm"));
        let err = SqliteDatastore::open_blocking_with(&lost, Expect::Data).expect_err("empty");
        let msg = err.to_string();
        assert!(matches!(err, DatastoreError::Corrupt(_)), "{err:?}");
        assert!(
            msg.contains(&lost.display().to_string())
                && msg.contains("empty (0 bytes)")
                && msg.contains("backup")
                && msg.contains("-wal"),
            "{msg}"
        );
        assert_eq!(fs::metadata(&lost)?.len(), 0, "left as it was");
        // Nothing says data should be there (a first start that stopped after creating the
        // file): it becomes a new database.
        let ds = SqliteDatastore::open_blocking_with(&lost, Expect::Any)?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        assert_eq!(rt.block_on(ds.count_entries(&EntryFilter::default()))?, 0);
        drop(ds);
        // Now a valid (empty) database: opened when data is expected too.
        drop(SqliteDatastore::open_blocking_with(&lost, Expect::Data)?);
        Ok(())
    }

    #[tokio::test]
    async fn corrupt_rows_are_errors_not_panics() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let created = create_all(
            &ds,
            vec![entry("/a", "/p", &["t:1"]), entry("/b", "/p", &["t:2"])],
        )
        .await?;
        ds.upsert_agent(agent("/agent/1")).await?;
        ds.set_bundle(bundle(&[b"root"], "[]")).await?;
        let raw = Connection::open(ds.path())?;
        let corruptions = [
            "UPDATE entries SET spiffe_id = 'not an id' WHERE seq = 1",
            "UPDATE entries SET dns_names = '{' WHERE seq = 1",
            "UPDATE entries SET federates_with = '[\"BAD\"]' WHERE seq = 1",
            "UPDATE entries SET x509_ttl = -5 WHERE seq = 1",
            "UPDATE entries SET selector_count = 7 WHERE seq = 1",
            "UPDATE entry_selectors SET value = ' padded' WHERE entry_seq = 1",
        ];
        for sql in corruptions {
            let tx = raw.unchecked_transaction()?;
            tx.execute(sql, [])?;
            tx.commit()?;
            assert!(
                matches!(
                    ds.get_entry(&created[0].id).await,
                    Err(DatastoreError::Corrupt(_))
                ),
                "{sql}"
            );
            assert!(
                matches!(
                    ds.list_entries(&EntryFilter::default(), 10, None).await,
                    Err(DatastoreError::Corrupt(_))
                ),
                "{sql}"
            );
            // The other entry is still readable.
            assert!(ds.get_entry(&created[1].id).await?.is_some());
            // Restore by rewriting the entry.
            let tx = raw.unchecked_transaction()?;
            tx.execute_batch(
                "UPDATE entries SET spiffe_id = 'spiffe://example.org/a', dns_names = '[]', \
                 federates_with = '[]', x509_ttl = NULL, selector_count = 1 WHERE seq = 1; \
                 UPDATE entry_selectors SET value = '1' WHERE entry_seq = 1;",
            )?;
            tx.commit()?;
            assert_eq!(
                ds.get_entry(&created[0].id).await?,
                Some(created[0].clone())
            );
        }
        raw.execute("UPDATE agents SET selectors = 'nope'", [])?;
        assert!(matches!(
            ds.get_agent(&id("/agent/1")).await,
            Err(DatastoreError::Corrupt(_))
        ));
        assert!(matches!(
            ds.list_agents(10, None).await,
            Err(DatastoreError::Corrupt(_))
        ));
        raw.execute("UPDATE bundles SET x509_roots = '[\"!!\"]'", [])?;
        let td = TrustDomain::new("example.org")?;
        assert!(matches!(
            ds.get_bundle(&td).await,
            Err(DatastoreError::Corrupt(_))
        ));
        assert!(matches!(
            ds.set_bundle(bundle(&[b"root"], "[]")).await,
            Err(DatastoreError::Corrupt(_))
        ));
        raw.execute("DELETE FROM revision", [])?;
        assert!(matches!(
            ds.create_entries(vec![entry("/c", "/p", &["t:3"])]).await,
            Err(DatastoreError::Corrupt(_))
        ));
        Ok(())
    }

    fn agent(path: &str) -> AttestedAgent {
        AttestedAgent {
            spiffe_id: id(path),
            attestation_type: "join_token".into(),
            x509_svid_serial: "0a1b".into(),
            x509_svid_expires_at: 1_900_000_000,
            new_x509_svid: None,
            banned: false,
            selectors: sels(&["join_token:abc"]),
            created_at: 0,
            updated_at: 0,
        }
    }

    #[tokio::test]
    async fn renewed_agent_svid_waits_beside_the_current_one_until_promoted() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let a = id("/agent/1");
        let new = |serial: &str| NewAgentSvid {
            serial: serial.into(),
            expires_at: 1_950_000_000,
        };
        assert!(
            !ds.set_agent_new_svid(&a, "0a1b", new("0c")).await?,
            "no agent"
        );
        ds.upsert_agent(agent("/agent/1")).await?;
        assert_eq!(ds.get_agent(&a).await?.ok_or("agent")?.new_x509_svid, None);
        // Only on top of the serial the caller authenticated with.
        assert!(!ds.set_agent_new_svid(&a, "ffff", new("0c")).await?);
        assert!(ds.set_agent_new_svid(&a, "0a1b", new("0c")).await?);
        let got = ds.get_agent(&a).await?.ok_or("agent")?;
        assert_eq!(got.x509_svid_serial, "0a1b", "the current one stays");
        assert_eq!(got.new_x509_svid, Some(new("0c")));
        // A second renewal from the current SVID replaces the unused one; it survives a reopen.
        assert!(ds.set_agent_new_svid(&a, "0a1b", new("0d")).await?);
        let path = ds.path().to_path_buf();
        drop(ds);
        let ds = SqliteDatastore::open(&path).await?;
        assert_eq!(
            ds.get_agent(&a).await?.ok_or("agent")?.new_x509_svid,
            Some(new("0d"))
        );
        // Promotion: only the pending serial, once.
        assert!(!ds.promote_agent_svid(&a, "0c").await?);
        assert!(!ds.promote_agent_svid(&a, "0a1b").await?);
        assert!(ds.promote_agent_svid(&a, "0d").await?);
        let got = ds.get_agent(&a).await?.ok_or("agent")?;
        assert_eq!(got.x509_svid_serial, "0d");
        assert_eq!(got.x509_svid_expires_at, 1_950_000_000);
        assert_eq!(got.new_x509_svid, None);
        assert!(!ds.promote_agent_svid(&a, "0d").await?);
        // An attestation (upsert) replaces a pending renewal.
        assert!(ds.set_agent_new_svid(&a, "0d", new("0e")).await?);
        ds.upsert_agent(agent("/agent/1")).await?;
        assert_eq!(ds.get_agent(&a).await?.ok_or("agent")?.new_x509_svid, None);
        // Banned: neither recorded nor promoted.
        assert!(ds.set_agent_new_svid(&a, "0a1b", new("0f")).await?);
        ds.set_agent_banned(&a, true).await?;
        assert!(!ds.promote_agent_svid(&a, "0f").await?);
        assert!(!ds.set_agent_new_svid(&a, "0a1b", new("10")).await?);
        assert_eq!(
            ds.get_agent(&a).await?.ok_or("agent")?.x509_svid_serial,
            "0a1b"
        );
        // Evicted: both gone.
        ds.delete_agent(&a).await?;
        assert!(!ds.promote_agent_svid(&a, "0f").await?);
        assert_eq!(ds.get_agent(&a).await?, None);
        // Half a pending SVID is corruption, not a panic.
        ds.upsert_agent(agent("/agent/1")).await?;
        Connection::open(ds.path())?.execute("UPDATE agents SET new_serial = '01'", [])?;
        assert!(matches!(
            ds.get_agent(&a).await,
            Err(DatastoreError::Corrupt(_))
        ));
        Ok(())
    }

    #[test]
    fn version_2_agents_are_migrated_without_a_pending_svid() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ds.sqlite3");
        {
            prepare_file(&path)?;
            let mut conn = open_connection(&path)?;
            migrations::migrate(&mut conn, &path, &migrations::MIGRATIONS[..2])?;
            conn.execute(
                "INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, \
                 created_at, updated_at) VALUES ('spiffe://example.org/agent/1', 'join_token', \
                 '0a1b', 1900000000, 1, 1)",
                [],
            )?;
        }
        let ds = SqliteDatastore::open_blocking(&path)?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let got = rt.block_on(ds.get_agent(&id("/agent/1")))?.ok_or("agent")?;
        assert_eq!(got.x509_svid_serial, "0a1b");
        assert_eq!(got.new_x509_svid, None);
        Ok(())
    }

    #[tokio::test]
    async fn agents_upsert_list_ban_evict() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        assert_eq!(ds.count_agents().await?, 0);
        assert_eq!(ds.get_agent(&id("/agent/x")).await?, None);
        for i in 0..5 {
            ds.upsert_agent(agent(&format!("/agent/{i}"))).await?;
        }
        assert_eq!(ds.count_agents().await?, 5);
        let a2 = ds.get_agent(&id("/agent/2")).await?.ok_or("agent 2")?;
        assert!(a2.created_at > 0 && a2.updated_at >= a2.created_at);
        assert_eq!(a2.selectors, sels(&["join_token:abc"]));
        assert!(!a2.banned);

        // Replace: new serial and selectors, same position, created_at kept.
        let mut renewed = agent("/agent/2");
        renewed.x509_svid_serial = "ff".into();
        renewed.selectors = sels(&["x509pop:subject:cn:n2", "x509pop:ca:abc"]);
        renewed.created_at = 1;
        ds.upsert_agent(renewed.clone()).await?;
        let got = ds.get_agent(&id("/agent/2")).await?.ok_or("agent 2")?;
        assert_eq!(got.x509_svid_serial, "ff");
        assert_eq!(got.selectors, renewed.selectors);
        assert_eq!(got.created_at, a2.created_at);
        assert_eq!(ds.count_agents().await?, 5);

        // Paging in insertion order.
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let page = ds.list_agents(2, token.as_deref()).await?;
            seen.extend(page.items.iter().map(|a| a.spiffe_id.path().to_string()));
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        assert_eq!(
            seen,
            ["/agent/0", "/agent/1", "/agent/2", "/agent/3", "/agent/4"]
        );

        // Ban; an upsert (re-attestation racing with the ban) does not clear it.
        ds.set_agent_banned(&id("/agent/1"), true).await?;
        ds.upsert_agent(agent("/agent/1")).await?;
        assert!(
            ds.get_agent(&id("/agent/1"))
                .await?
                .ok_or("agent 1")?
                .banned
        );
        ds.set_agent_banned(&id("/agent/1"), false).await?;
        assert!(
            !ds.get_agent(&id("/agent/1"))
                .await?
                .ok_or("agent 1")?
                .banned
        );

        // Evict.
        ds.delete_agent(&id("/agent/3")).await?;
        assert_eq!(ds.get_agent(&id("/agent/3")).await?, None);
        assert_eq!(ds.count_agents().await?, 4);
        assert!(matches!(
            ds.delete_agent(&id("/agent/3")).await,
            Err(DatastoreError::NotFound(_))
        ));
        assert!(matches!(
            ds.set_agent_banned(&id("/agent/3"), true).await,
            Err(DatastoreError::NotFound(_))
        ));
        Ok(())
    }

    fn token(t: &str, expires_at: i64) -> JoinToken {
        JoinToken {
            token: t.into(),
            expires_at,
            spiffe_id: None,
        }
    }

    #[tokio::test]
    async fn join_tokens_are_single_use_and_expire() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        ds.create_join_token(JoinToken {
            spiffe_id: Some(id("/node/alias")),
            ..token("t1", 1000)
        })
        .await?;
        ds.create_join_token(token("t2", 1000)).await?;
        assert!(
            ds.create_join_token(token("t2", 5)).await.is_err(),
            "duplicate token"
        );

        let t = ds.consume_join_token("t1", 999).await?;
        assert_eq!(t.token, "t1");
        assert_eq!(t.spiffe_id, Some(id("/node/alias")));
        assert!(matches!(
            ds.consume_join_token("t1", 999).await,
            Err(DatastoreError::NotFound(_))
        ));
        assert!(matches!(
            ds.consume_join_token("never", 0).await,
            Err(DatastoreError::NotFound(_))
        ));
        // Expired at expires_at, and deleted by the attempt.
        assert!(matches!(
            ds.consume_join_token("t2", 1000).await,
            Err(DatastoreError::Expired)
        ));
        assert!(matches!(
            ds.consume_join_token("t2", 0).await,
            Err(DatastoreError::NotFound(_))
        ));

        // The stored form is a hash, not the token.
        let raw = Connection::open(ds.path())?;
        ds.create_join_token(token("secret-token", 10)).await?;
        let stored: String =
            raw.query_row("SELECT token_sha256 FROM join_tokens", [], |r| r.get(0))?;
        assert_ne!(stored, "secret-token");
        assert_eq!(stored.len(), 64);

        // Prune.
        ds.create_join_token(token("later", 100)).await?;
        ds.create_join_token(token("soon", 50)).await?;
        assert_eq!(ds.prune_join_tokens(50).await?, 2); // secret-token (10) and soon (50)
        assert_eq!(ds.prune_join_tokens(50).await?, 0);
        assert_eq!(ds.consume_join_token("later", 99).await?.expires_at, 100);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_consume_has_one_winner() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let ds = Arc::new(ds);
        for round in 0..20 {
            let t = format!("tok-{round}");
            ds.create_join_token(token(&t, i64::MAX)).await?;
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let ds = Arc::clone(&ds);
                    let t = t.clone();
                    tokio::spawn(async move { ds.consume_join_token(&t, 0).await })
                })
                .collect();
            let mut wins = 0;
            for task in tasks {
                match task.await? {
                    Ok(_) => wins += 1,
                    Err(DatastoreError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            assert_eq!(wins, 1, "round {round}");
        }
        Ok(())
    }

    fn bundle(roots: &[&[u8]], jwks: &str) -> StoredBundle {
        StoredBundle {
            trust_domain: TrustDomain::new("example.org").expect("td"),
            x509_roots: roots.iter().map(|r| r.to_vec()).collect(),
            jwt_keys_json: jwks.into(),
            sequence: 99,
        }
    }

    #[tokio::test]
    async fn bundle_sequence_bumps_only_on_change() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let td = TrustDomain::new("example.org")?;
        assert_eq!(ds.get_bundle(&td).await?, None);
        let s = ds
            .set_bundle(bundle(&[b"r1"], r#"[{"kid":"a","kty":"EC"}]"#))
            .await?;
        assert_eq!(s.sequence, 1, "input sequence ignored");
        assert_eq!(ds.get_bundle(&td).await?, Some(s.clone()));
        // Same content (JWKS re-serialised with another key order): unchanged.
        let same = ds
            .set_bundle(bundle(&[b"r1"], r#"[{"kty":"EC", "kid":"a"}]"#))
            .await?;
        assert_eq!(same, s);
        let s2 = ds
            .set_bundle(bundle(&[b"r1", b"r2"], r#"[{"kid":"a","kty":"EC"}]"#))
            .await?;
        assert_eq!(s2.sequence, 2);
        let s3 = ds.set_bundle(bundle(&[b"r1", b"r2"], "[]")).await?;
        assert_eq!(s3.sequence, 3);
        let s4 = ds.set_bundle(bundle(&[b"r2", b"r1"], "[]")).await?; // order is content
        assert_eq!(s4.sequence, 4);
        assert_eq!(ds.get_bundle(&td).await?, Some(s4));
        // Binary roots round-trip exactly; other trust domains are independent.
        let other = StoredBundle {
            trust_domain: TrustDomain::new("other.org")?,
            x509_roots: vec![vec![0, 255, 10, 13], Vec::new()],
            ..bundle(&[], "")
        };
        let o = ds.set_bundle(other.clone()).await?;
        assert_eq!(o.sequence, 1);
        assert_eq!(
            ds.get_bundle(&other.trust_domain)
                .await?
                .map(|b| b.x509_roots),
            Some(other.x509_roots)
        );
        Ok(())
    }

    fn federated(td: &str, roots: &[&[u8]], jwks: &str) -> StoredBundle {
        StoredBundle {
            trust_domain: TrustDomain::new(td).expect("td"),
            ..bundle(roots, jwks)
        }
    }

    #[tokio::test]
    async fn federated_bundles_set_get_list_delete() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        let other = TrustDomain::new("other.org")?;
        assert!(ds.list_federated_bundles().await?.is_empty());
        assert_eq!(ds.get_federated_bundle(&other).await?, None);

        let o1 = ds
            .set_federated_bundle(federated("other.org", &[b"o1"], "[]"))
            .await?;
        assert_eq!(o1.sequence, 1, "input sequence ignored");
        let a1 = ds
            .set_federated_bundle(federated("aaa.org", &[], r#"[{"kid":"k"}]"#))
            .await?;
        assert_eq!(a1.sequence, 1);
        // Same content again: unchanged; new content: next sequence.
        assert_eq!(
            ds.set_federated_bundle(federated("other.org", &[b"o1"], "[]"))
                .await?,
            o1
        );
        let o2 = ds
            .set_federated_bundle(federated("other.org", &[b"o1", b"o2"], "[]"))
            .await?;
        assert_eq!(o2.sequence, 2);
        assert_eq!(ds.get_federated_bundle(&other).await?, Some(o2.clone()));
        // Ordered by trust domain name.
        assert_eq!(
            ds.list_federated_bundles().await?,
            vec![a1.clone(), o2.clone()]
        );

        // Federated bundles and the server's own bundle are separate.
        ds.set_bundle(bundle(&[b"own"], "[]")).await?;
        let own_td = TrustDomain::new("example.org")?;
        assert_eq!(ds.get_federated_bundle(&own_td).await?, None);
        assert_eq!(ds.list_federated_bundles().await?.len(), 2);
        assert_eq!(ds.get_bundle(&other).await?, None);

        assert_eq!(ds.delete_federated_bundle(&other).await?, o2);
        assert_eq!(ds.get_federated_bundle(&other).await?, None);
        assert!(matches!(
            ds.delete_federated_bundle(&other).await,
            Err(DatastoreError::NotFound(_))
        ));
        assert_eq!(ds.list_federated_bundles().await?, vec![a1]);
        assert!(
            ds.get_bundle(&own_td).await?.is_some(),
            "own bundle untouched"
        );
        // Set again after delete: a new bundle.
        let again = ds
            .set_federated_bundle(federated("other.org", &[b"o3"], "[]"))
            .await?;
        assert_eq!(again.sequence, 1);

        // A corrupt row is an error value, not a panic.
        let raw = Connection::open(ds.path())?;
        raw.execute(
            "UPDATE federated_bundles SET trust_domain = 'BAD NAME' WHERE trust_domain = 'aaa.org'",
            [],
        )?;
        assert!(matches!(
            ds.list_federated_bundles().await,
            Err(DatastoreError::Corrupt(_))
        ));
        raw.execute("UPDATE federated_bundles SET x509_roots = '[\"!!\"]'", [])?;
        assert!(matches!(
            ds.get_federated_bundle(&other).await,
            Err(DatastoreError::Corrupt(_))
        ));
        Ok(())
    }

    #[tokio::test]
    async fn federated_bundles_survive_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ds.sqlite3");
        let stored = {
            let ds = SqliteDatastore::open(&path).await?;
            ds.set_federated_bundle(federated("other.org", &[b"r1"], "[]"))
                .await?;
            ds.set_federated_bundle(federated("other.org", &[b"r2"], r#"[{"kid":"a"}]"#))
                .await?
        };
        let ds = SqliteDatastore::open(&path).await?;
        assert_eq!(stored.sequence, 2);
        assert_eq!(ds.list_federated_bundles().await?, vec![stored.clone()]);
        // The sequence continues from the stored one.
        let next = ds
            .set_federated_bundle(federated("other.org", &[b"r3"], "[]"))
            .await?;
        assert_eq!(next.sequence, 3);
        Ok(())
    }

    #[test]
    fn version_1_database_is_migrated_and_keeps_its_data() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ds.sqlite3");
        // A database as the previous release left it: schema version 1, with data.
        {
            prepare_file(&path)?;
            let mut conn = open_connection(&path)?;
            migrations::migrate(&mut conn, &path, &migrations::MIGRATIONS[..1])?;
            conn.execute(
                "INSERT INTO bundles (trust_domain, x509_roots, jwt_keys_json, sequence, \
                 updated_at) VALUES ('example.org', '[]', '[]', 4, 0)",
                [],
            )?;
        }
        let ds = SqliteDatastore::open_blocking(&path)?;
        let version: i64 =
            Connection::open(&path)?.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        assert_eq!(version, migrations::MIGRATIONS.len() as i64);
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        rt.block_on(async {
            let own = ds.get_bundle(&TrustDomain::new("example.org")?).await?;
            assert_eq!(own.map(|b| b.sequence), Some(4));
            assert!(ds.list_federated_bundles().await?.is_empty());
            ds.set_federated_bundle(federated("other.org", &[b"r"], "[]"))
                .await?;
            assert_eq!(ds.list_federated_bundles().await?.len(), 1);
            TestResult::Ok(())
        })?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_do_not_wait_for_a_held_write_lock() -> TestResult {
        let (_dir, ds) = open_tmp().await?;
        create_all(&ds, vec![entry("/a", "/p", &["t:1"])]).await?;
        // Another connection holds the write lock with uncommitted changes.
        let mut other = Connection::open(ds.path())?;
        let tx = other.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("UPDATE entries SET hint = 'uncommitted'", [])?;
        let start = std::time::Instant::now();
        let page = ds.list_entries(&EntryFilter::default(), 10, None).await?;
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(page.items[0].hint, "", "readers see committed data only");
        drop(tx);
        Ok(())
    }

    #[test]
    fn selector_queries_use_the_indexes() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ds = SqliteDatastore::open_blocking(&dir.path().join("ds.sqlite3"))?;
        let conn = lock(&ds.inner.writer);
        let modes = [
            SelectorMatch::Exact,
            SelectorMatch::Subset,
            SelectorMatch::Superset,
            SelectorMatch::Any,
        ];
        let sets: [&[&str]; 2] = [&["t:1"], &["t:1", "t:2"]];
        for (mode, given) in modes
            .iter()
            .flat_map(|m| sets.iter().map(move |g| (*m, *g)))
        {
            let filter = EntryFilter {
                selectors: Some((sels(given), mode)),
                ..Default::default()
            };
            let f = FilterSql::build(&filter).ok_or("filter")?;
            let sql = format!(
                "EXPLAIN QUERY PLAN {}SELECT e.seq FROM entries e WHERE {} AND e.seq > 0 ORDER BY e.seq LIMIT 10",
                f.with,
                f.conds.join(" AND ")
            );
            let mut plan = Vec::new();
            let mut stmt = conn.prepare(&sql)?;
            let mut rows = stmt.query(params_from_iter(f.params))?;
            while let Some(r) = rows.next()? {
                plan.push(r.get::<_, String>(3)?);
            }
            let plan = plan.join("\n");
            assert!(
                plan.contains("entry_selectors_type_value"),
                "{mode:?} does not use the selector index:\n{plan}"
            );
            assert!(
                !plan
                    .lines()
                    .any(|l| l.starts_with("SCAN es") || l.starts_with("SCAN entry_selectors")),
                "{mode:?} scans all selectors:\n{plan}"
            );
        }
        Ok(())
    }

    #[test]
    fn reg_key_is_canonical() {
        let a = entry("/a", "/p", &["b:2", "a:1"]);
        let b = entry("/a", "/p", &["a:1", "b:2", "a:1"]);
        assert_eq!(reg_key(&a), reg_key(&b));
        assert_eq!(
            reg_key_text(&a),
            "spiffe://example.org/a\nspiffe://example.org/p\na:1\nb:2"
        );
        assert_eq!(reg_key(&a).len(), 32);
        // "a:b:c" (type a) differs from a type "a:b"… which is not a valid type anyway.
        assert_ne!(
            reg_key(&entry("/a", "/p", &["a:b:c"])),
            reg_key(&entry("/a", "/p", &["a:b"]))
        );
    }
}

/// Durability across `kill -9`: a child process (this test binary, re-executed) creates entries
/// and prints each acknowledged id; the parent kills it mid-stream and checks that every
/// acknowledged entry is in the database.
#[cfg(test)]
mod error_kinds {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// A lock another connection holds past the busy timeout is `Busy`: transient, and the
    /// admin API answers Unavailable (clients retry); any other SQLite failure is neither.
    #[test]
    fn a_held_lock_is_busy_and_transient_other_failures_are_not() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("locks.db");
        let holder = Connection::open(&path)?;
        holder.execute_batch("CREATE TABLE t (x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")?;
        let other = Connection::open(&path)?;
        other.busy_timeout(Duration::ZERO)?;
        let busy = map_err(
            other
                .execute("INSERT INTO t VALUES (2)", [])
                .err()
                .ok_or("the write succeeded despite the lock")?,
        );
        assert!(matches!(busy, DatastoreError::Busy(_)), "{busy:?}");
        assert!(busy.is_transient());
        assert!(busy.to_string().contains("try again"), "{busy}");
        assert_eq!(
            crate::api::admin::ds_status(busy).code(),
            tonic::Code::Unavailable
        );

        let missing = map_err(
            other
                .execute("INSERT INTO no_such_table VALUES (1)", [])
                .err()
                .ok_or("insert into a missing table succeeded")?,
        );
        assert!(matches!(missing, DatastoreError::Sqlite(_)), "{missing:?}");
        assert!(!missing.is_transient());
        assert!(std::error::Error::source(&missing).is_some());
        assert_eq!(
            crate::api::admin::ds_status(missing).code(),
            tonic::Code::Internal
        );
        assert!(!DatastoreError::Corrupt("x".into()).is_transient());
        assert!(!DatastoreError::NotFound("entry".into()).is_transient());
        Ok(())
    }
}

#[cfg(test)]
mod kill9 {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    const ENV: &str = "SIGIL_DS_KILL9_PATH";
    const CHILD: &str = "datastore::sqlite::kill9::child_writer";

    /// The child: runs only when re-executed by `acknowledged_writes_survive_kill_9`.
    #[test]
    #[ignore = "helper process for acknowledged_writes_survive_kill_9"]
    fn child_writer() -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(path) = std::env::var_os(ENV) else {
            return Ok(());
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async {
            let ds = SqliteDatastore::open(Path::new(&path)).await?;
            let mut out = std::io::stdout().lock();
            for i in 0..100_000 {
                let e = RegistrationEntry::new(
                    SpiffeId::parse(&format!("spiffe://example.org/w/{i}"))?,
                    SpiffeId::parse("spiffe://example.org/p")?,
                    [Selector::parse("t:1")?].into_iter().collect(),
                );
                for r in ds.create_entries(vec![e]).await? {
                    writeln!(out, "ACK {}", r?.id)?;
                }
                out.flush()?;
            }
            Ok(())
        })
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_kill_9(
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ds.sqlite3");
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                CHILD,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child stdout")?;
        let acked = tokio::task::spawn_blocking(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("ACK ") {
                    acked.push(id.to_string());
                    if acked.len() == 50 {
                        break;
                    }
                }
            }
            acked
        })
        .await?;
        child.kill()?; // SIGKILL, most likely in the middle of the next create
        child.wait()?;
        assert_eq!(acked.len(), 50, "the child stopped early");
        let ds = SqliteDatastore::open(&path).await?;
        for id in &acked {
            assert!(
                ds.get_entry(id).await?.is_some(),
                "acknowledged entry {id} lost"
            );
        }
        assert!(ds.count_entries(&EntryFilter::default()).await? >= 50);
        Ok(())
    }
}
