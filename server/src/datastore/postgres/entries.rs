//! Registration entries: writes under the revision lock, reads, selector filters in SQL, and
//! the changes since a revision.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Object};
use sigil::entry::RegistrationEntry;
use sigil::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use super::{col, effective_page_size, into_page, to_i64, Result};
use crate::datastore::descent::{alias_candidates, Descent, DISTINCT_PARENTS_SQL};
use crate::datastore::{
    AuthorizedRead, DatastoreError, EntryChanges, EntryFilter, EntryHistory, Page, Placement,
    SelectorMatch,
};

/// Columns of an entry row, as read by [`decode`]; the last one gathers the entry's selectors
/// as `type:value` strings.
const ENTRY_COLUMNS: &str = "e.seq, e.id, e.spiffe_id, e.parent_id, e.x509_ttl, e.jwt_ttl, \
     e.dns_names, e.admin, e.downstream, e.federates_with, e.hint, e.revision, e.created_at, \
     e.updated_at, e.selector_count, \
     ARRAY(SELECT s.type || ':' || s.value FROM entry_selectors s WHERE s.entry_seq = e.seq)";

/// Validates a row into `(seq, entry)`; anything that does not parse is `Corrupt`, naming the
/// entry and the field.
fn decode(row: &Row) -> Result<(i64, RegistrationEntry)> {
    let raw_id: Option<String> = row.try_get(1).ok();
    let what = || format!("entry {:?}", raw_id.as_deref().unwrap_or("?"));
    let id: String = col(row, 1, &what)?;
    let bad =
        |field: &str, why: String| DatastoreError::Corrupt(format!("entry {id:?}: {field}: {why}"));
    let seq: i64 = col(row, 0, &what)?;
    let spiffe_id = SpiffeId::parse(&col::<String>(row, 2, &what)?)
        .map_err(|e| bad("spiffe_id", e.to_string()))?;
    let parent_id = SpiffeId::parse(&col::<String>(row, 3, &what)?)
        .map_err(|e| bad("parent_id", e.to_string()))?;
    let ttl = |field: &str, v: Option<i64>| match v {
        None | Some(0) => Ok(None),
        Some(s) => u64::try_from(s)
            .map(|s| Some(Duration::from_secs(s)))
            .map_err(|_| bad(field, format!("negative TTL {s}"))),
    };
    let x509_svid_ttl = ttl("x509_ttl", col(row, 4, &what)?)?;
    let jwt_svid_ttl = ttl("jwt_ttl", col(row, 5, &what)?)?;
    let dns_names: Vec<String> = col(row, 6, &what)?;
    let federates_with = col::<Vec<String>>(row, 9, &what)?
        .iter()
        .map(|td| TrustDomain::new(td))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("federates_with", e.to_string()))?;
    let selector_count: i32 = col(row, 14, &what)?;
    let raw: Vec<String> = col(row, 15, &what)?;
    let selectors = raw
        .iter()
        .map(|s| Selector::parse(s))
        .collect::<Result<SelectorSet, _>>()
        .map_err(|e| bad("selectors", e.to_string()))?;
    if i32::try_from(selectors.len()).ok() != Some(selector_count) || raw.len() != selectors.len() {
        return Err(bad(
            "selectors",
            format!(
                "{} stored selectors but selector_count is {selector_count}",
                raw.len()
            ),
        ));
    }
    Ok((
        seq,
        RegistrationEntry {
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            dns_names,
            admin: col(row, 7, &what)?,
            downstream: col(row, 8, &what)?,
            federates_with,
            hint: col(row, 10, &what)?,
            revision: col(row, 11, &what)?,
            created_at: col(row, 12, &what)?,
            updated_at: col(row, 13, &what)?,
            id,
        },
    ))
}

/// The registration identity, unique per (SPIFFE ID, parent, selector set): the SHA-256 of
/// `spiffe_id\nparent_id` then `\ntype:value` per selector in sorted order. Selector types have
/// no ':' and neither IDs nor selectors contain '\n', so the encoding is unambiguous.
fn reg_key(e: &RegistrationEntry) -> Vec<u8> {
    let mut key = format!("{}\n{}", e.spiffe_id, e.parent_id);
    for s in &e.selectors {
        key.push('\n');
        key.push_str(s.kind());
        key.push(':');
        key.push_str(s.value());
    }
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .to_vec()
}

fn ttl_to_sql(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The content columns of an entry as statement parameters, in the order of
/// [`ENTRY_CONTENT`].
struct Content {
    spiffe_id: String,
    parent_id: String,
    x509_ttl: Option<i64>,
    jwt_ttl: Option<i64>,
    dns_names: Vec<String>,
    admin: bool,
    downstream: bool,
    federates_with: Vec<String>,
    hint: String,
    reg_key: Vec<u8>,
    selector_count: i32,
}

/// Content columns of an entry, in the order of [`Content::params`].
const ENTRY_CONTENT: &str = "spiffe_id, parent_id, x509_ttl, jwt_ttl, dns_names, admin, \
     downstream, federates_with, hint, reg_key, selector_count";

impl Content {
    fn of(e: &RegistrationEntry, reg_key: Vec<u8>) -> Self {
        Self {
            spiffe_id: e.spiffe_id.to_string(),
            parent_id: e.parent_id.to_string(),
            x509_ttl: ttl_to_sql(e.x509_svid_ttl),
            jwt_ttl: ttl_to_sql(e.jwt_svid_ttl),
            dns_names: e.dns_names.clone(),
            admin: e.admin,
            downstream: e.downstream,
            federates_with: e
                .federates_with
                .iter()
                .map(|td| td.name().to_string())
                .collect(),
            hint: e.hint.clone(),
            reg_key,
            selector_count: i32::try_from(e.selectors.len()).unwrap_or(i32::MAX),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.spiffe_id,
            &self.parent_id,
            &self.x509_ttl,
            &self.jwt_ttl,
            &self.dns_names,
            &self.admin,
            &self.downstream,
            &self.federates_with,
            &self.hint,
            &self.reg_key,
            &self.selector_count,
        ]
    }
}

async fn insert_selectors(c: &impl GenericClient, seq: i64, selectors: &SelectorSet) -> Result<()> {
    if selectors.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = selectors.iter().map(Selector::kind).collect();
    let values: Vec<&str> = selectors.iter().map(Selector::value).collect();
    let count = i32::try_from(selectors.len()).unwrap_or(i32::MAX);
    let stmt = c
        .prepare_cached(
            "INSERT INTO entry_selectors (entry_seq, type, value, entry_selector_count) \
             SELECT $1, t, v, $4 FROM unnest($2::text[], $3::text[]) AS s(t, v)",
        )
        .await?;
    c.execute(&stmt, &[&seq, &kinds, &values, &count]).await?;
    Ok(())
}

/// Locks the revision row (the entry writers' mutex across servers) and returns its value.
async fn lock_revision(c: &impl GenericClient) -> Result<i64> {
    let stmt = c
        .prepare_cached("SELECT value FROM revision WHERE id = 1 FOR UPDATE")
        .await?;
    current_revision_with(c, &stmt).await
}

async fn current_revision(c: &impl GenericClient) -> Result<i64> {
    let stmt = c
        .prepare_cached("SELECT value FROM revision WHERE id = 1")
        .await?;
    current_revision_with(c, &stmt).await
}

async fn current_revision_with(
    c: &impl GenericClient,
    stmt: &tokio_postgres::Statement,
) -> Result<i64> {
    let row = c
        .query_opt(stmt, &[])
        .await?
        .ok_or_else(|| DatastoreError::Corrupt("the revision counter row is missing".into()))?;
    col(&row, 0, &|| "the revision counter".to_string())
}

async fn set_revision(c: &impl GenericClient, rev: i64) -> Result<()> {
    let stmt = c
        .prepare_cached("UPDATE revision SET value = $1 WHERE id = 1")
        .await?;
    c.execute(&stmt, &[&rev]).await?;
    Ok(())
}

/// The id of the entry registered under `key`, other than `except`.
async fn find_registration(
    c: &impl GenericClient,
    key: &[u8],
    except: Option<&str>,
) -> Result<Option<String>> {
    let stmt = c
        .prepare_cached("SELECT id FROM entries WHERE reg_key = $1 AND id IS DISTINCT FROM $2")
        .await?;
    match c.query_opt(&stmt, &[&key, &except]).await? {
        Some(row) => Ok(Some(col(&row, 0, &|| "entry".to_string())?)),
        None => Ok(None),
    }
}

/// The entry with this id and its `seq`.
pub(super) async fn get(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<(i64, RegistrationEntry)>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.id = $1"
        ))
        .await?;
    c.query_opt(&stmt, &[&id])
        .await?
        .as_ref()
        .map(decode)
        .transpose()
}

/// The entries with these ids, one per id in order (`None` where none is stored): one query.
pub(super) async fn get_many(
    c: &impl GenericClient,
    ids: &[String],
) -> Result<Vec<Option<RegistrationEntry>>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.id = ANY($1)"
        ))
        .await?;
    let mut found: HashMap<String, RegistrationEntry> = HashMap::with_capacity(ids.len());
    for row in c.query(&stmt, &[&ids]).await? {
        let (_, e) = decode(&row)?;
        found.insert(e.id.clone(), e);
    }
    Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
}

fn not_found(id: &str) -> DatastoreError {
    DatastoreError::NotFound(format!("entry {}", sigil::text::quote_for_display(id)))
}

// ---------------------------------------------------------------------------------------------
// Filters

/// A filter as SQL conditions on `entries e` with numbered parameters.
#[derive(Default)]
struct FilterSql {
    conds: Vec<String>,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl FilterSql {
    /// Adds a parameter, returning its placeholder.
    fn param(&mut self, v: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(v));
        format!("${}", self.params.len())
    }

    fn param_refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }

    /// `None` when the filter can match nothing (`Any` of no selectors).
    fn build(filter: &EntryFilter) -> Option<Self> {
        let mut f = Self::default();
        if let Some((set, mode)) = &filter.selectors {
            let n = to_i64(set.len());
            if n == 0 {
                match mode {
                    SelectorMatch::Any => return None,
                    SelectorMatch::Superset => {}
                    SelectorMatch::Exact | SelectorMatch::Subset => {
                        f.conds.push("e.selector_count = 0".into());
                    }
                }
            } else {
                let kinds = f.param(set.iter().map(|s| s.kind().to_string()).collect::<Vec<_>>());
                let values = f.param(
                    set.iter()
                        .map(|s| s.value().to_string())
                        .collect::<Vec<_>>(),
                );
                // Compared with INTEGER columns and bigint COUNT(*): typed once, here. Only
                // where used: an unused parameter has no type PostgreSQL could infer.
                let count = if *mode == SelectorMatch::Any {
                    String::new()
                } else {
                    format!("{}::bigint", f.param(n))
                };
                // One index probe per wanted selector.
                let hits = format!(
                    "FROM unnest({kinds}::text[], {values}::text[]) AS want(t, v) \
                     JOIN entry_selectors es ON es.type = want.t AND es.value = want.v"
                );
                f.conds.push(match mode {
                    // At least one shared selector.
                    SelectorMatch::Any => format!("e.seq IN (SELECT es.entry_seq {hits})"),
                    // Has all n wanted selectors.
                    SelectorMatch::Superset => format!(
                        "e.seq IN (SELECT es.entry_seq {hits} \
                         GROUP BY es.entry_seq HAVING COUNT(*) = {count})"
                    ),
                    // Has all n and nothing else.
                    SelectorMatch::Exact => format!(
                        "e.seq IN (SELECT es.entry_seq {hits} \
                         AND es.entry_selector_count = {count} \
                         GROUP BY es.entry_seq HAVING COUNT(*) = {count})"
                    ),
                    // Every selector of the entry is wanted: entries with at most n selectors
                    // that have all of theirs among the hits (entries with none match
                    // trivially).
                    SelectorMatch::Subset => format!(
                        "e.seq IN (SELECT es.entry_seq {hits} \
                         AND es.entry_selector_count <= {count} \
                         GROUP BY es.entry_seq HAVING COUNT(*) = MAX(es.entry_selector_count) \
                         UNION ALL SELECT seq FROM entries WHERE selector_count = 0)"
                    ),
                });
            }
        }
        if let Some(id) = &filter.spiffe_id {
            let p = f.param(id.to_string());
            f.conds.push(format!("e.spiffe_id = {p}"));
        }
        if let Some(id) = &filter.parent_id {
            let p = f.param(id.to_string());
            f.conds.push(format!("e.parent_id = {p}"));
        }
        Some(f)
    }
}

pub(super) async fn list(
    c: &impl GenericClient,
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
    let after = f.param(after);
    f.conds.push(format!("e.seq > {after}"));
    let limit_param = f.param(to_i64(limit) + 1);
    let sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM entries e WHERE {} ORDER BY e.seq LIMIT {limit_param}",
        f.conds.join(" AND ")
    );
    // One statement: one snapshot.
    let stmt = c.prepare_cached(&sql).await?;
    let rows = c
        .query(&stmt, &f.param_refs())
        .await?
        .iter()
        .map(decode)
        .collect::<Result<Vec<_>>>()?;
    Ok(into_page(rows, limit, 'e'))
}

pub(super) async fn count(c: &impl GenericClient, filter: &EntryFilter) -> Result<u64> {
    let Some(f) = FilterSql::build(filter) else {
        return Ok(0);
    };
    let sql = if f.conds.is_empty() {
        "SELECT COUNT(*) FROM entries".to_string()
    } else {
        format!(
            "SELECT COUNT(*) FROM entries e WHERE {}",
            f.conds.join(" AND ")
        )
    };
    let stmt = c.prepare_cached(&sql).await?;
    let row = c.query_one(&stmt, &f.param_refs()).await?;
    let n: i64 = col(&row, 0, &|| "entry count".to_string())?;
    Ok(u64::try_from(n).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Writes

pub(super) async fn create(
    conn: &mut Object,
    entries: Vec<RegistrationEntry>,
    now: i64,
) -> Result<Vec<Result<RegistrationEntry>>> {
    let tx = conn.transaction().await?;
    let mut rev = lock_revision(&tx).await?;
    let insert = tx
        .prepare_cached(&format!(
            "INSERT INTO entries (id, revision, created_at, updated_at, {ENTRY_CONTENT}, \
             created_revision) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $2) \
             RETURNING seq"
        ))
        .await?;
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let key = reg_key(&entry);
        // Sees the entries inserted earlier in this batch too: duplicates within the batch get
        // the id of the first one. Other servers' writes are committed (we hold the lock).
        if let Some(existing) = find_registration(&tx, &key, None).await? {
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
        let content = Content::of(&entry, key);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&entry.id, &rev, &now, &now];
        params.extend(content.params());
        let row = tx.query_one(&insert, &params).await?;
        let seq: i64 = col(&row, 0, &|| format!("entry {}", entry.id))?;
        insert_selectors(&tx, seq, &entry.selectors).await?;
        out.push(Ok(entry));
    }
    set_revision(&tx, rev).await?;
    tx.commit().await?;
    Ok(out)
}

pub(super) async fn update(
    conn: &mut Object,
    entry: RegistrationEntry,
    now: i64,
) -> Result<RegistrationEntry> {
    let tx = conn.transaction().await?;
    let rev = lock_revision(&tx).await? + 1;
    let stmt = tx
        .prepare_cached("SELECT seq, created_at, spiffe_id, parent_id FROM entries WHERE id = $1")
        .await?;
    let Some(row) = tx.query_opt(&stmt, &[&entry.id]).await? else {
        return Err(not_found(&entry.id));
    };
    let what = || format!("entry {:?}", entry.id);
    let seq: i64 = col(&row, 0, &what)?;
    let created_at: i64 = col(&row, 1, &what)?;
    let old_spiffe_id: String = col(&row, 2, &what)?;
    let old_parent_id: String = col(&row, 3, &what)?;
    let key = reg_key(&entry);
    if let Some(other) = find_registration(&tx, &key, Some(&entry.id)).await? {
        return Err(DatastoreError::AlreadyExists(other));
    }
    let entry = RegistrationEntry {
        revision: rev,
        created_at,
        updated_at: now,
        ..entry
    };
    let content = Content::of(&entry, key);
    let assignments = ENTRY_CONTENT
        .split(", ")
        .enumerate()
        .map(|(i, c)| format!("{c} = ${}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE entries SET {assignments}, revision = $12, updated_at = $13 WHERE seq = $14"
        ))
        .await?;
    let mut params: Vec<&(dyn ToSql + Sync)> = content.params().to_vec();
    params.extend([&rev as &(dyn ToSql + Sync), &now, &seq]);
    tx.execute(&stmt, &params).await?;
    let stmt = tx
        .prepare_cached("DELETE FROM entry_selectors WHERE entry_seq = $1")
        .await?;
    tx.execute(&stmt, &[&seq]).await?;
    insert_selectors(&tx, seq, &entry.selectors).await?;
    if old_spiffe_id != entry.spiffe_id.to_string() || old_parent_id != entry.parent_id.to_string()
    {
        // The former placement, for agents resuming from before this revision.
        let stmt = tx
            .prepare_cached(
                "INSERT INTO entry_moves (revision, id, spiffe_id, parent_id, moved_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await?;
        tx.execute(
            &stmt,
            &[&rev, &entry.id, &old_spiffe_id, &old_parent_id, &now],
        )
        .await?;
    }
    set_revision(&tx, rev).await?;
    tx.commit().await?;
    Ok(entry)
}

pub(super) async fn delete(conn: &mut Object, id: &str, now: i64) -> Result<RegistrationEntry> {
    let tx = conn.transaction().await?;
    let rev = lock_revision(&tx).await? + 1;
    let Some((seq, entry)) = get(&tx, id).await? else {
        return Err(not_found(id));
    };
    // entry_selectors rows go with it (ON DELETE CASCADE).
    let stmt = tx
        .prepare_cached("DELETE FROM entries WHERE seq = $1")
        .await?;
    tx.execute(&stmt, &[&seq]).await?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO entry_tombstones (id, revision, deleted_at, spiffe_id, parent_id) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, \
             deleted_at = excluded.deleted_at, spiffe_id = excluded.spiffe_id, \
             parent_id = excluded.parent_id",
        )
        .await?;
    let (spiffe_id, parent_id) = (entry.spiffe_id.to_string(), entry.parent_id.to_string());
    tx.execute(&stmt, &[&id, &rev, &now, &spiffe_id, &parent_id])
        .await?;
    set_revision(&tx, rev).await?;
    tx.commit().await?;
    Ok(entry)
}

pub(super) async fn changes_since(conn: &mut Object, since: i64) -> Result<EntryChanges> {
    // One snapshot for the three queries: the revision returned covers exactly what is read.
    let tx = conn
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let revision = current_revision(&tx).await?;
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.revision > $1 ORDER BY e.revision"
        ))
        .await?;
    let upserted = tx
        .query(&stmt, &[&since])
        .await?
        .iter()
        .map(|r| decode(r).map(|(_, e)| e))
        .collect::<Result<Vec<_>>>()?;
    let stmt = tx
        .prepare_cached("SELECT id FROM entry_tombstones WHERE revision > $1 ORDER BY revision")
        .await?;
    let removed = tx
        .query(&stmt, &[&since])
        .await?
        .iter()
        .map(|r| col(r, 0, &|| "entry tombstone".to_string()))
        .collect::<Result<Vec<String>>>()?;
    tx.commit().await?;
    Ok(EntryChanges {
        upserted,
        removed,
        revision,
    })
}

/// [`crate::datastore::Datastore::read_authorized`]: one read-only repeatable-read transaction,
/// one query for the aliases and one per level.
pub(super) async fn read_authorized(
    conn: &mut Object,
    agent_id: &SpiffeId,
    selectors: &SelectorSet,
    server_id: &SpiffeId,
) -> Result<AuthorizedRead> {
    let tx = conn
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let revision = current_revision(&tx).await?;
    let filter = alias_candidates(server_id, selectors);
    let candidates = match filter.as_ref().and_then(FilterSql::build) {
        Some(f) => {
            let sql = format!(
                "SELECT {ENTRY_COLUMNS} FROM entries e WHERE {} ORDER BY e.seq",
                f.conds.join(" AND ")
            );
            let stmt = tx.prepare_cached(&sql).await?;
            tx.query(&stmt, &f.param_refs())
                .await?
                .iter()
                .map(|r| decode(r).map(|(_, e)| e))
                .collect::<Result<Vec<_>>>()?
        }
        None => Vec::new(),
    };
    let mut descent = Descent::new(agent_id, server_id, selectors, candidates, revision);
    let parents = tx
        .query(DISTINCT_PARENTS_SQL, &[])
        .await?
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<std::result::Result<_, _>>()?;
    descent.only_parents(parents);
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries e WHERE e.parent_id = ANY($1::text[])"
        ))
        .await?;
    while let Some(parents) = descent.next_level() {
        let rows = tx
            .query(&stmt, &[&parents])
            .await?
            .iter()
            .map(decode)
            .collect::<Result<Vec<_>>>()?;
        descent.add(rows);
    }
    tx.commit().await?;
    Ok(descent.finish())
}

/// A stored placement.
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

/// [`crate::datastore::Datastore::entry_history_since`]: one read-only repeatable-read
/// transaction.
pub(super) async fn history_since(conn: &mut Object, since: i64) -> Result<Option<EntryHistory>> {
    let tx = conn
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let stmt = tx
        .prepare_cached("SELECT value, history_from FROM revision WHERE id = 1")
        .await?;
    let row = tx
        .query_opt(&stmt, &[])
        .await?
        .ok_or_else(|| DatastoreError::Corrupt("the revision counter row is missing".into()))?;
    let what = || "the revision counter".to_string();
    let revision: i64 = col(&row, 0, &what)?;
    let history_from: i64 = col(&row, 1, &what)?;
    if since < history_from {
        tx.commit().await?;
        return Ok(None);
    }
    let mut history = EntryHistory {
        revision,
        ..Default::default()
    };
    let stmt = tx
        .prepare_cached(
            "SELECT id, spiffe_id, parent_id, revision, created_revision FROM entries \
             WHERE revision > $1 ORDER BY revision",
        )
        .await?;
    for row in tx.query(&stmt, &[&since]).await? {
        let what = || "changed entry".to_string();
        let id: String = col(&row, 0, &what)?;
        if col::<i64>(&row, 4, &what)? > since {
            history.created.insert(id.clone());
        }
        history.changed.push(placement(
            id,
            &col::<String>(&row, 1, &what)?,
            &col::<String>(&row, 2, &what)?,
            col(&row, 3, &what)?,
        )?);
    }
    let stmt = tx
        .prepare_cached(
            "SELECT id, spiffe_id, parent_id, revision FROM entry_tombstones WHERE revision > $1 \
             UNION ALL \
             SELECT id, spiffe_id, parent_id, revision FROM entry_moves WHERE revision > $1 \
             ORDER BY 4",
        )
        .await?;
    for row in tx.query(&stmt, &[&since]).await? {
        let what = || "entry history".to_string();
        let spiffe_id: Option<String> = col(&row, 1, &what)?;
        let parent_id: Option<String> = col(&row, 2, &what)?;
        // A tombstone without its placement predates the recording: history incomplete.
        let (Some(spiffe_id), Some(parent_id)) = (spiffe_id, parent_id) else {
            tx.commit().await?;
            return Ok(None);
        };
        history.ended.push(placement(
            col(&row, 0, &what)?,
            &spiffe_id,
            &parent_id,
            col(&row, 3, &what)?,
        )?);
    }
    let named: std::collections::BTreeSet<String> = history
        .changed
        .iter()
        .chain(&history.ended)
        .map(|p| p.spiffe_id.to_string())
        .collect();
    if !named.is_empty() {
        let named: Vec<String> = named.into_iter().collect();
        let stmt = tx
            .prepare_cached(
                "SELECT DISTINCT parent_id FROM entries \
                 WHERE parent_id = ANY($1::text[]) AND created_revision <= $2",
            )
            .await?;
        for row in tx.query(&stmt, &[&named, &since]).await? {
            let parent: String = col(&row, 0, &|| "entry parent".to_string())?;
            let id = SpiffeId::parse(&parent)
                .map_err(|e| DatastoreError::Corrupt(format!("entry parent_id {parent:?}: {e}")))?;
            history.anchored.insert(id);
        }
    }
    tx.commit().await?;
    Ok(Some(history))
}

/// [`crate::datastore::Datastore::prune_entry_history`]: under the revision lock, like every
/// entry write.
pub(super) async fn prune_history(conn: &mut Object, before: i64) -> Result<u64> {
    let tx = conn.transaction().await?;
    lock_revision(&tx).await?;
    let stmt = tx
        .prepare_cached(
            "SELECT MAX(r) FROM (\
             SELECT MAX(revision) AS r FROM entry_tombstones WHERE deleted_at < $1 \
             UNION ALL SELECT MAX(revision) FROM entry_moves WHERE moved_at < $1) AS newest",
        )
        .await?;
    let newest: Option<i64> = col(&tx.query_one(&stmt, &[&before]).await?, 0, &|| {
        "entry history".to_string()
    })?;
    let Some(newest) = newest else {
        tx.commit().await?;
        return Ok(0);
    };
    let mut n = 0;
    for sql in [
        "DELETE FROM entry_tombstones WHERE revision <= $1",
        "DELETE FROM entry_moves WHERE revision <= $1",
    ] {
        let stmt = tx.prepare_cached(sql).await?;
        n += tx.execute(&stmt, &[&newest]).await?;
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE revision SET history_from = GREATEST(history_from, $1) WHERE id = 1",
        )
        .await?;
    tx.execute(&stmt, &[&newest]).await?;
    tx.commit().await?;
    Ok(n)
}
