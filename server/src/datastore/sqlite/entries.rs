//! Registration entries in SQLite: rows and their decoding, the registration key that makes
//! (SPIFFE ID, parent, selectors) unique, selector filters as SQL, and the writes, each of which
//! takes the next global revision (deletes leave a tombstone with theirs).

use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, TransactionBehavior};
use sigil::entry::RegistrationEntry;
use sigil::{Selector, SelectorSet, SpiffeId, TrustDomain};

use super::{to_json, unix_now, Result, SqliteDatastore};
use crate::datastore::descent::{alias_candidates, Descent, DISTINCT_PARENTS_SQL};
use crate::datastore::paging::{effective_page_size, into_page, parse_page_token, ENTRY_TOKEN};
use crate::datastore::{
    AuthorizedRead, DatastoreError, EntryChanges, EntryFilter, EntryHistory, Page, Placement,
    SelectorMatch,
};

// ---------------------------------------------------------------------------------------------
// Calls (the `Datastore` methods)

/// [`crate::datastore::Datastore::create_entries`].
pub(super) async fn create(
    ds: &SqliteDatastore,
    entries: Vec<RegistrationEntry>,
) -> Result<Vec<Result<RegistrationEntry>>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    ds.write(move |conn| create_entries_conn(conn, entries, unix_now()))
        .await
}

/// [`crate::datastore::Datastore::get_entry`].
pub(super) async fn get(ds: &SqliteDatastore, id: &str) -> Result<Option<RegistrationEntry>> {
    let id = id.to_string();
    ds.read(move |conn| Ok(get_entry_conn(conn, &id)?.map(|(_, e)| e)))
        .await
}

/// [`crate::datastore::Datastore::get_entries`]: one read connection and one blocking-pool hop
/// for all of them.
pub(super) async fn get_many(
    ds: &SqliteDatastore,
    ids: &[String],
) -> Result<Vec<Option<RegistrationEntry>>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids = ids.to_vec();
    ds.read(move |conn| {
        ids.iter()
            .map(|id| Ok(get_entry_conn(conn, id)?.map(|(_, e)| e)))
            .collect()
    })
    .await
}

/// [`crate::datastore::Datastore::list_entries`].
pub(super) async fn list(
    ds: &SqliteDatastore,
    filter: &EntryFilter,
    page_size: usize,
    page_token: Option<&str>,
) -> Result<Page<RegistrationEntry>> {
    let after = parse_page_token(page_token, ENTRY_TOKEN)?;
    let filter = filter.clone();
    ds.read(move |conn| list_entries_conn(conn, &filter, page_size, after))
        .await
}

/// [`crate::datastore::Datastore::count_entries`].
pub(super) async fn count(ds: &SqliteDatastore, filter: &EntryFilter) -> Result<u64> {
    let filter = filter.clone();
    ds.read(move |conn| count_entries_conn(conn, &filter)).await
}

/// [`crate::datastore::Datastore::update_entry`].
pub(super) async fn update(
    ds: &SqliteDatastore,
    entry: RegistrationEntry,
) -> Result<RegistrationEntry> {
    ds.write(move |conn| update_entry_conn(conn, entry, unix_now()))
        .await
}

/// [`crate::datastore::Datastore::delete_entry`].
pub(super) async fn delete(ds: &SqliteDatastore, id: &str) -> Result<RegistrationEntry> {
    let id = id.to_string();
    ds.write(move |conn| delete_entry_conn(conn, &id, unix_now()))
        .await
}

/// [`crate::datastore::Datastore::entry_changes_since`].
pub(super) async fn changes_since(ds: &SqliteDatastore, revision: i64) -> Result<EntryChanges> {
    ds.read(move |conn| entry_changes_conn(conn, revision))
        .await
}

/// [`crate::datastore::Datastore::read_authorized`]: one blocking job, one read transaction.
pub(super) async fn read_authorized(
    ds: &SqliteDatastore,
    agent_id: &SpiffeId,
    selectors: &SelectorSet,
    server_id: &SpiffeId,
) -> Result<AuthorizedRead> {
    let (agent_id, selectors, server_id) = (agent_id.clone(), selectors.clone(), server_id.clone());
    ds.read(move |conn| read_authorized_conn(conn, &agent_id, &selectors, &server_id))
        .await
}

/// [`crate::datastore::Datastore::entry_history_since`].
pub(super) async fn history_since(
    ds: &SqliteDatastore,
    revision: i64,
) -> Result<Option<EntryHistory>> {
    ds.read(move |conn| entry_history_conn(conn, revision))
        .await
}

/// [`crate::datastore::Datastore::prune_entry_history`].
pub(super) async fn prune_history(ds: &SqliteDatastore, before: i64) -> Result<u64> {
    ds.write(move |conn| prune_history_conn(conn, before)).await
}

// ---------------------------------------------------------------------------------------------
// Registration key

/// The registration identity, unique per (SPIFFE ID, parent, selector set): the SHA-256 of
/// [`reg_key_text`].
pub(super) fn reg_key(e: &RegistrationEntry) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, reg_key_text(e).as_bytes())
        .as_ref()
        .to_vec()
}

/// `spiffe_id\nparent_id` then `\ntype:value` per selector in sorted order. Selector types have
/// no ':' and neither IDs nor selectors contain '\n', so the encoding is unambiguous.
pub(super) fn reg_key_text(e: &RegistrationEntry) -> String {
    let mut key = format!("{}\n{}", e.spiffe_id, e.parent_id);
    for s in &e.selectors {
        key.push('\n');
        key.push_str(s.kind());
        key.push(':');
        key.push_str(s.value());
    }
    key
}

// ---------------------------------------------------------------------------------------------
// Rows and decoding

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

fn ttl_to_sql(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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
// Filters

/// A filter as SQL: an optional `WITH` prefix, conditions on `entries e`, and their parameters
/// in textual order.
#[derive(Default)]
pub(super) struct FilterSql {
    pub(super) with: String,
    pub(super) conds: Vec<String>,
    pub(super) params: Vec<Value>,
}

impl FilterSql {
    /// `None` when the filter can match nothing (`Any` of no selectors).
    pub(super) fn build(filter: &EntryFilter) -> Option<Self> {
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
    Ok(into_page(rows, limit, ENTRY_TOKEN))
}

/// Decoded `(seq, entry)` rows of `sql` with `params`.
fn query_entries(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<(i64, RegistrationEntry)>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let raw = stmt
        .query_map(params, EntryRow::read)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    raw.into_iter().map(EntryRow::decode).collect()
}

fn read_authorized_conn(
    conn: &mut Connection,
    agent_id: &SpiffeId,
    selectors: &SelectorSet,
    server_id: &SpiffeId,
) -> Result<AuthorizedRead> {
    let tx = conn.transaction()?;
    let revision = current_revision(&tx)?;
    let filter = alias_candidates(server_id, selectors);
    let candidates = match filter.as_ref().and_then(FilterSql::build) {
        Some(f) => {
            let sql = format!(
                "{}SELECT {ENTRY_COLUMNS} FROM entries e WHERE {} ORDER BY e.seq",
                f.with,
                f.conds.join(" AND ")
            );
            query_entries(&tx, &sql, params_from_iter(f.params))?
                .into_iter()
                .map(|(_, e)| e)
                .collect()
        }
        None => Vec::new(),
    };
    let mut descent = Descent::new(agent_id, server_id, selectors, candidates, revision);
    let parents = tx
        .prepare_cached(DISTINCT_PARENTS_SQL)?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    descent.only_parents(parents);
    // One statement for every level: the parents travel as one JSON array, each probed in the
    // parent_id index.
    let level_sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM entries e \
         WHERE e.parent_id IN (SELECT value FROM json_each(?1))"
    );
    while let Some(parents) = descent.next_level() {
        let parents = to_json(&parents)?;
        descent.add(query_entries(&tx, &level_sql, [parents])?);
    }
    tx.finish()?;
    Ok(descent.finish())
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
// Writes and changes

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
            "INSERT INTO entries (id, revision, created_revision, created_at, updated_at, \
             {ENTRY_CONTENT}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
    let stored: Option<(i64, i64, String, String)> = tx
        .prepare_cached("SELECT seq, created_at, spiffe_id, parent_id FROM entries WHERE id = ?1")?
        .query_row([&entry.id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((seq, created_at, old_spiffe_id, old_parent_id)) = stored else {
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
    if old_spiffe_id != entry.spiffe_id.to_string() || old_parent_id != entry.parent_id.to_string()
    {
        // The former placement, for agents resuming from before this revision.
        tx.prepare_cached(
            "INSERT INTO entry_moves (revision, id, spiffe_id, parent_id, moved_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![rev, entry.id, old_spiffe_id, old_parent_id, now])?;
    }
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
        "INSERT OR REPLACE INTO entry_tombstones (id, revision, deleted_at, spiffe_id, parent_id) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        id,
        rev,
        now,
        entry.spiffe_id.to_string(),
        entry.parent_id.to_string()
    ])?;
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

/// A stored placement (`what` names the row in errors).
fn placement(id: String, spiffe_id: &str, parent_id: &str, revision: i64) -> Result<Placement> {
    let bad = |field: &str, why: String| {
        DatastoreError::Corrupt(format!("entry history of {id:?}: {field}: {why}"))
    };
    let spiffe_id = SpiffeId::parse(spiffe_id).map_err(|e| bad("spiffe_id", e.to_string()))?;
    let parent_id = SpiffeId::parse(parent_id).map_err(|e| bad("parent_id", e.to_string()))?;
    Ok(Placement {
        id,
        spiffe_id,
        parent_id,
        revision,
    })
}

fn entry_history_conn(conn: &mut Connection, since: i64) -> Result<Option<EntryHistory>> {
    // One read transaction: everything below describes the same revision.
    let tx = conn.transaction()?;
    let revision = current_revision(&tx)?;
    let history_from: i64 = tx
        .prepare_cached("SELECT history_from FROM revision WHERE id = 1")?
        .query_row([], |r| r.get(0))?;
    if since < history_from {
        return Ok(None);
    }
    let mut history = EntryHistory {
        revision,
        ..Default::default()
    };
    {
        let mut stmt = tx.prepare_cached(
            "SELECT id, spiffe_id, parent_id, revision, created_revision FROM entries \
             WHERE revision > ?1 ORDER BY revision",
        )?;
        let rows = stmt
            .query_map([since], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (id, spiffe_id, parent_id, rev, created) in rows {
            if created > since {
                history.created.insert(id.clone());
            }
            history
                .changed
                .push(placement(id, &spiffe_id, &parent_id, rev)?);
        }
    }
    {
        let mut stmt = tx.prepare_cached(
            "SELECT id, spiffe_id, parent_id, revision FROM entry_tombstones WHERE revision > ?1 \
             UNION ALL \
             SELECT id, spiffe_id, parent_id, revision FROM entry_moves WHERE revision > ?1 \
             ORDER BY 4",
        )?;
        let rows = stmt
            .query_map([since], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (id, spiffe_id, parent_id, rev) in rows {
            // A tombstone without its placement predates the recording: history incomplete.
            let (Some(spiffe_id), Some(parent_id)) = (spiffe_id, parent_id) else {
                return Ok(None);
            };
            history
                .ended
                .push(placement(id, &spiffe_id, &parent_id, rev)?);
        }
    }
    let named: std::collections::BTreeSet<String> = history
        .changed
        .iter()
        .chain(&history.ended)
        .map(|p| p.spiffe_id.to_string())
        .collect();
    if !named.is_empty() {
        let named: Vec<String> = named.into_iter().collect();
        let mut stmt = tx.prepare_cached(
            "SELECT DISTINCT parent_id FROM entries \
             WHERE parent_id IN (SELECT value FROM json_each(?1)) AND created_revision <= ?2",
        )?;
        let rows = stmt
            .query_map(params![to_json(&named)?, since], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for parent in rows {
            let id = SpiffeId::parse(&parent)
                .map_err(|e| DatastoreError::Corrupt(format!("entry parent_id {parent:?}: {e}")))?;
            history.anchored.insert(id);
        }
    }
    tx.finish()?;
    Ok(Some(history))
}

fn prune_history_conn(conn: &mut Connection, before: i64) -> Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let newest: Option<i64> = tx
        .prepare_cached(
            "SELECT MAX(r) FROM (\
             SELECT MAX(revision) AS r FROM entry_tombstones WHERE deleted_at < ?1 \
             UNION ALL SELECT MAX(revision) FROM entry_moves WHERE moved_at < ?1)",
        )?
        .query_row([before], |r| r.get(0))?;
    let Some(newest) = newest else {
        return Ok(0);
    };
    let mut n = tx
        .prepare_cached("DELETE FROM entry_tombstones WHERE revision <= ?1")?
        .execute([newest])?;
    n += tx
        .prepare_cached("DELETE FROM entry_moves WHERE revision <= ?1")?
        .execute([newest])?;
    tx.prepare_cached("UPDATE revision SET history_from = MAX(history_from, ?1) WHERE id = 1")?
        .execute([newest])?;
    tx.commit()?;
    Ok(n as u64)
}
