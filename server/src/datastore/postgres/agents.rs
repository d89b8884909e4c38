//! Attested agents: upsert by SPIFFE ID, the renewed-SVID compare-and-swap, bans, eviction.

use deadpool_postgres::GenericClient;
use sigil::{Selector, SelectorSet, SpiffeId};
use tokio_postgres::Row;

use super::{col, effective_page_size, into_page, to_i64, Result};
use crate::datastore::{AttestedAgent, DatastoreError, NewAgentSvid, Page};

const AGENT_COLUMNS: &str = "seq, spiffe_id, attestation_type, serial, expires_at, banned, \
     selectors, created_at, updated_at, new_serial, new_expires_at";

/// Validates a row into `(seq, agent)`; what does not parse is `Corrupt`, naming the agent.
fn decode(row: &Row) -> Result<(i64, AttestedAgent)> {
    let raw_id: Option<String> = row.try_get(1).ok();
    let what = || format!("agent {:?}", raw_id.as_deref().unwrap_or("?"));
    let bad =
        |field: &str, why: String| DatastoreError::Corrupt(format!("{}: {field}: {why}", what()));
    let spiffe_id = SpiffeId::parse(&col::<String>(row, 1, &what)?)
        .map_err(|e| bad("spiffe_id", e.to_string()))?;
    let selectors = col::<Vec<String>>(row, 6, &what)?
        .iter()
        .map(|s| Selector::parse(s))
        .collect::<Result<SelectorSet, _>>()
        .map_err(|e| bad("selectors", e.to_string()))?;
    let new_x509_svid = match (
        col::<Option<String>>(row, 9, &what)?,
        col::<Option<i64>>(row, 10, &what)?,
    ) {
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
        col(row, 0, &what)?,
        AttestedAgent {
            spiffe_id,
            attestation_type: col(row, 2, &what)?,
            x509_svid_serial: col(row, 3, &what)?,
            x509_svid_expires_at: col(row, 4, &what)?,
            new_x509_svid,
            banned: col(row, 5, &what)?,
            selectors,
            created_at: col(row, 7, &what)?,
            updated_at: col(row, 8, &what)?,
        },
    ))
}

/// Inserts or replaces by SPIFFE ID in one statement. `created_at` is the stored one on
/// replace, else the given one (now if 0); `banned` only ever goes from false to true here, so
/// an attestation racing with a ban cannot undo it.
pub(super) async fn upsert(c: &impl GenericClient, agent: AttestedAgent, now: i64) -> Result<()> {
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
    let stmt = c
        .prepare_cached(
            "INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, banned, \
             selectors, created_at, updated_at, new_serial, new_expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (spiffe_id) DO UPDATE SET \
             attestation_type = excluded.attestation_type, serial = excluded.serial, \
             expires_at = excluded.expires_at, banned = (agents.banned OR excluded.banned), \
             selectors = excluded.selectors, updated_at = excluded.updated_at, \
             new_serial = excluded.new_serial, new_expires_at = excluded.new_expires_at",
        )
        .await?;
    c.execute(
        &stmt,
        &[
            &agent.spiffe_id.to_string(),
            &agent.attestation_type,
            &agent.x509_svid_serial,
            &agent.x509_svid_expires_at,
            &agent.banned,
            &selectors,
            &created_at,
            &now,
            &new_serial,
            &new_expires_at,
        ],
    )
    .await?;
    Ok(())
}

/// Compare-and-swap on the current serial: PostgreSQL re-evaluates the `WHERE` on the latest
/// row version after waiting for a concurrent writer (another server's eviction, ban or
/// renewal), so at most one of two racing renewals based on the same serial wins, and none
/// wins over an eviction.
pub(super) async fn set_new_svid(
    c: &impl GenericClient,
    id: &SpiffeId,
    current_serial: &str,
    new: NewAgentSvid,
    now: i64,
) -> Result<bool> {
    let stmt = c
        .prepare_cached(
            "UPDATE agents SET new_serial = $3, new_expires_at = $4, updated_at = $5 \
             WHERE spiffe_id = $1 AND serial = $2 AND NOT banned",
        )
        .await?;
    let n = c
        .execute(
            &stmt,
            &[
                &id.to_string(),
                &current_serial,
                &new.serial,
                &new.expires_at,
                &now,
            ],
        )
        .await?;
    Ok(n == 1)
}

pub(super) async fn promote_svid(
    c: &impl GenericClient,
    id: &SpiffeId,
    serial: &str,
    now: i64,
) -> Result<bool> {
    let stmt = c
        .prepare_cached(
            "UPDATE agents SET serial = new_serial, expires_at = new_expires_at, \
             new_serial = NULL, new_expires_at = NULL, updated_at = $3 \
             WHERE spiffe_id = $1 AND new_serial = $2 AND new_expires_at IS NOT NULL \
             AND NOT banned",
        )
        .await?;
    let n = c.execute(&stmt, &[&id.to_string(), &serial, &now]).await?;
    Ok(n == 1)
}

pub(super) async fn get(c: &impl GenericClient, id: &SpiffeId) -> Result<Option<AttestedAgent>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE spiffe_id = $1"
        ))
        .await?;
    c.query_opt(&stmt, &[&id.to_string()])
        .await?
        .as_ref()
        .map(|r| decode(r).map(|(_, a)| a))
        .transpose()
}

pub(super) async fn list(
    c: &impl GenericClient,
    page_size: usize,
    after: i64,
) -> Result<Page<AttestedAgent>> {
    let limit = effective_page_size(page_size);
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .await?;
    let rows = c
        .query(&stmt, &[&after, &(to_i64(limit) + 1)])
        .await?
        .iter()
        .map(decode)
        .collect::<Result<Vec<_>>>()?;
    Ok(into_page(rows, limit, 'a'))
}

pub(super) async fn count(c: &impl GenericClient) -> Result<u64> {
    let stmt = c.prepare_cached("SELECT COUNT(*) FROM agents").await?;
    let row = c.query_one(&stmt, &[]).await?;
    let n: i64 = col(&row, 0, &|| "agent count".to_string())?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(super) async fn delete(c: &impl GenericClient, id: &SpiffeId) -> Result<()> {
    let stmt = c
        .prepare_cached("DELETE FROM agents WHERE spiffe_id = $1")
        .await?;
    if c.execute(&stmt, &[&id.to_string()]).await? == 0 {
        return Err(DatastoreError::NotFound(format!("agent {id}")));
    }
    Ok(())
}

pub(super) async fn set_banned(
    c: &impl GenericClient,
    id: &SpiffeId,
    banned: bool,
    now: i64,
) -> Result<()> {
    let stmt = c
        .prepare_cached("UPDATE agents SET banned = $2, updated_at = $3 WHERE spiffe_id = $1")
        .await?;
    if c.execute(&stmt, &[&id.to_string(), &banned, &now]).await? == 0 {
        return Err(DatastoreError::NotFound(format!("agent {id}")));
    }
    Ok(())
}
