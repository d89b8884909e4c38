//! The embedded SQLite datastore (the default).
//!
//! One database file (WAL mode, `synchronous=FULL`: a call that returned `Ok` survives `kill -9`
//! and power loss). All SQLite work runs on tokio's blocking pool, never on the async workers.
//! Writes go through one connection behind a mutex (SQLite has a single writer anyway); reads use
//! a small pool of separate connections, which WAL lets run concurrently with the writer, each
//! read seeing one consistent snapshot.
//!
//! Schema: see [`migrations`]. Entry listing keeps insertion order through the `seq` column
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
    AttestedAgent, Datastore, DatastoreError, EntryChanges, EntryFilter, JoinToken, Page,
    SelectorMatch, StoredBundle,
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
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path))
            .await
            .map_err(|e| DatastoreError::Backend(format!("opening the datastore: {e}")))?
    }

    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    ///
    /// A missing parent directory is created with mode 0700 and a new database file with mode
    /// 0600. A file that is not a Sigil database (another format, truncated, another
    /// application's SQLite file) or whose schema is newer than this code is refused with an
    /// error naming the path. Blocks: from async code use [`SqliteDatastore::open`].
    pub fn open_blocking(path: &Path) -> Result<Self> {
        prepare_file(path)?;
        let mut writer = open_connection(path)?;
        // Persistent, but must be set from a write connection; the returned mode confirms it.
        let mode: String = writer
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| corrupt_at_open(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DatastoreError::Backend(format!(
                "{}: could not switch to WAL journal mode (got {mode})",
                path.display()
            )));
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
        .map_err(|e| DatastoreError::Backend(format!("datastore task failed: {e}")))?
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
        .map_err(|e| DatastoreError::Backend(format!("datastore task failed: {e}")))?
    }
}

/// A poisoned lock only means another call panicked; SQLite rolled its transaction back.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Opening

/// Creates the parent directory (0700) and an empty database file (0600) when missing.
fn prepare_file(path: &Path) -> Result<()> {
    let io_err = |what: &str, e: std::io::Error| {
        DatastoreError::Backend(format!("{what} {}: {e}", path.display()))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| io_err("creating the directory of", e))?;
        }
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
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
        }
        Err(e) => return Err(io_err("creating", e)),
    }
    Ok(())
}

/// Opens a connection with the per-connection settings (durability, foreign keys, locks).
fn open_connection(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        DatastoreError::Backend(format!("opening {}: {e}", path.display()))
    })?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA trusted_schema = OFF;",
    )
    .map_err(|e| corrupt_at_open(path, e))?;
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = open_connection(path)?;
    conn.execute_batch("PRAGMA query_only = ON;").map_err(map_err)?;
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
    match map_err(e) {
        DatastoreError::Corrupt(msg) => invalid_db(path, msg),
        other => other,
    }
}

/// Classifies SQLite errors: damaged files and undecodable values are `Corrupt`, the rest
/// `Backend`.
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
        _ => DatastoreError::Backend(e.to_string()),
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
    serde_json::to_string(v).map_err(|e| DatastoreError::Backend(format!("encoding JSON: {e}")))
}

/// The registration identity: unique per (SPIFFE ID, parent, selector set). Selector types have
/// no ':' and neither IDs nor selectors contain '\n', so the encoding is unambiguous.
fn reg_key(e: &RegistrationEntry) -> String {
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
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()))
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
fn content_params(e: &RegistrationEntry, key: String) -> Result<Vec<Value>> {
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
        Value::Text(key),
        Value::Integer(e.selectors.len() as i64),
    ])
}

fn insert_selectors(conn: &Connection, seq: i64, selectors: &SelectorSet) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO entry_selectors (entry_seq, type, value) VALUES (?1, ?2, ?3)",
    )?;
    for s in selectors {
        stmt.execute(params![seq, s.kind(), s.value()])?;
    }
    Ok(())
}

fn current_revision(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT value FROM revision WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?
        .ok_or_else(|| DatastoreError::Corrupt("the revision counter row is missing".into()))?)
}

fn set_revision(conn: &Connection, rev: i64) -> Result<()> {
    conn.prepare_cached("UPDATE revision SET value = ?1 WHERE id = 1")?
        .execute([rev])?;
    Ok(())
}

/// The id of the entry registered under `key`, other than `except`.
fn find_registration(conn: &Connection, key: &str, except: Option<&str>) -> Result<Option<String>> {
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
                f.conds.push(match mode {
                    // At least one shared selector.
                    SelectorMatch::Any => format!("e.seq IN (SELECT es.entry_seq {hits})"),
                    // Has all n wanted selectors.
                    SelectorMatch::Superset => format!(
                        "e.seq IN (SELECT es.entry_seq {hits} GROUP BY es.entry_seq \
                         HAVING COUNT(*) = {n})"
                    ),
                    // Has all n and nothing else.
                    SelectorMatch::Exact => format!(
                        "e.selector_count = {n} AND e.seq IN (SELECT es.entry_seq {hits} \
                         GROUP BY es.entry_seq HAVING COUNT(*) = {n})"
                    ),
                    // Every selector of the entry is wanted (entries with none match trivially).
                    SelectorMatch::Subset => format!(
                        "e.seq IN (SELECT es.entry_seq {hits} \
                         CROSS JOIN entries x ON x.seq = es.entry_seq \
                         GROUP BY es.entry_seq HAVING COUNT(*) = MAX(x.selector_count) \
                         UNION ALL SELECT seq FROM entries WHERE selector_count = 0)"
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
        return Err(DatastoreError::NotFound(format!("entry {:?}", entry.id)));
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
    values.extend([Value::Integer(rev), Value::Integer(now), Value::Integer(seq)]);
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
        return Err(DatastoreError::NotFound(format!("entry {id:?}")));
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
        .prepare_cached(
            "SELECT id FROM entry_tombstones WHERE revision > ?1 ORDER BY revision",
        )?
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
     selectors, created_at, updated_at";

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
        Ok((
            self.seq,
            AttestedAgent {
                spiffe_id,
                attestation_type: self.attestation_type,
                x509_svid_serial: self.serial,
                x509_svid_expires_at: self.expires_at,
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

fn decode_bundle(
    td: &TrustDomain,
    roots: &str,
    jwt_keys_json: String,
    sequence: i64,
) -> Result<StoredBundle> {
    let bad = |why: String| DatastoreError::Corrupt(format!("bundle of {td}: {why}"));
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

fn get_bundle_conn(conn: &Connection, td: &TrustDomain) -> Result<Option<StoredBundle>> {
    let row: Option<(String, String, i64)> = conn
        .prepare_cached(
            "SELECT x509_roots, jwt_keys_json, sequence FROM bundles WHERE trust_domain = ?1",
        )?
        .query_row([td.name()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    row.map(|(roots, jwt, seq)| decode_bundle(td, &roots, jwt, seq))
        .transpose()
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
        self.read(move |conn| count_entries_conn(conn, &filter)).await
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
            conn.prepare_cached(
                "INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, banned, \
                 selectors, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (spiffe_id) DO UPDATE SET \
                 attestation_type = excluded.attestation_type, serial = excluded.serial, \
                 expires_at = excluded.expires_at, banned = (banned OR excluded.banned), \
                 selectors = excluded.selectors, updated_at = excluded.updated_at",
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
            ])?;
            Ok(())
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
                return Err(DatastoreError::Backend(
                    "a join token with this value already exists".into(),
                ));
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
        self.read(move |conn| get_bundle_conn(conn, &td)).await
    }

    async fn set_bundle(&self, bundle: StoredBundle) -> Result<StoredBundle> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let stored = get_bundle_conn(&tx, &bundle.trust_domain)?;
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
            tx.prepare_cached(
                "INSERT INTO bundles (trust_domain, x509_roots, jwt_keys_json, sequence, \
                 updated_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (trust_domain) DO UPDATE SET x509_roots = excluded.x509_roots, \
                 jwt_keys_json = excluded.jwt_keys_json, sequence = excluded.sequence, \
                 updated_at = excluded.updated_at",
            )?
            .execute(params![
                bundle.trust_domain.name(),
                to_json(&roots)?,
                bundle.jwt_keys_json,
                i64::try_from(sequence).unwrap_or(i64::MAX),
                unix_now(),
            ])?;
            tx.commit()?;
            Ok(StoredBundle {
                sequence,
                ..bundle
            })
        })
        .await
    }
}
