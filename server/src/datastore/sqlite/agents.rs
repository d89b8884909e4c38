//! Attested agents in SQLite: one row per agent SPIFFE ID, with its current SVID serial and,
//! after a renewal, the pending one beside it.

use rusqlite::{params, OptionalExtension, Row};
use sigil::{Selector, SelectorSet, SpiffeId};

use super::{to_json, unix_now, Result, SqliteDatastore};
use crate::datastore::paging::{effective_page_size, into_page, parse_page_token, AGENT_TOKEN};
use crate::datastore::{AttestedAgent, DatastoreError, NewAgentSvid, Page};

/// [`crate::datastore::Datastore::upsert_agent`]. The datastore sets `updated_at` to now;
/// `created_at` is the stored one on replace, else the given one (now if 0). The banned flag is
/// OR-ed with the stored one, so an attestation racing with a ban cannot undo it.
pub(super) async fn upsert(ds: &SqliteDatastore, agent: AttestedAgent) -> Result<()> {
    ds.write(move |conn| {
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

/// [`crate::datastore::Datastore::set_agent_new_svid`].
pub(super) async fn set_new_svid(
    ds: &SqliteDatastore,
    id: &SpiffeId,
    current_serial: &str,
    new: NewAgentSvid,
) -> Result<bool> {
    let (id, current) = (id.to_string(), current_serial.to_string());
    ds.write(move |conn| {
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

/// [`crate::datastore::Datastore::promote_agent_svid`].
pub(super) async fn promote_svid(
    ds: &SqliteDatastore,
    id: &SpiffeId,
    serial: &str,
) -> Result<bool> {
    let (id, serial) = (id.to_string(), serial.to_string());
    ds.write(move |conn| {
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

/// [`crate::datastore::Datastore::get_agent`].
pub(super) async fn get(ds: &SqliteDatastore, id: &SpiffeId) -> Result<Option<AttestedAgent>> {
    let id = id.to_string();
    ds.read(move |conn| {
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

/// [`crate::datastore::Datastore::list_agents`].
pub(super) async fn list(
    ds: &SqliteDatastore,
    page_size: usize,
    page_token: Option<&str>,
) -> Result<Page<AttestedAgent>> {
    let after = parse_page_token(page_token, AGENT_TOKEN)?;
    let limit = effective_page_size(page_size);
    ds.read(move |conn| {
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
        Ok(into_page(rows, limit, AGENT_TOKEN))
    })
    .await
}

/// [`crate::datastore::Datastore::count_agents`].
pub(super) async fn count(ds: &SqliteDatastore) -> Result<u64> {
    ds.read(|conn| {
        let n: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM agents")?
            .query_row([], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    })
    .await
}

/// [`crate::datastore::Datastore::delete_agent`].
pub(super) async fn delete(ds: &SqliteDatastore, id: &SpiffeId) -> Result<()> {
    let id = id.to_string();
    ds.write(move |conn| {
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

/// [`crate::datastore::Datastore::set_agent_banned`].
pub(super) async fn set_banned(ds: &SqliteDatastore, id: &SpiffeId, banned: bool) -> Result<()> {
    let id = id.to_string();
    ds.write(move |conn| {
        let n = conn
            .prepare_cached("UPDATE agents SET banned = ?2, updated_at = ?3 WHERE spiffe_id = ?1")?
            .execute(params![id, banned, unix_now()])?;
        if n == 0 {
            return Err(DatastoreError::NotFound(format!("agent {id}")));
        }
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Rows

/// Columns of an agent row, as read by [`AgentRow::read`].
const AGENT_COLUMNS: &str = "seq, spiffe_id, attestation_type, serial, expires_at, banned, \
     selectors, created_at, updated_at, new_serial, new_expires_at";

/// An agent row before validation.
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

    /// Validates the row into an agent; anything that does not parse is `Corrupt`, naming the
    /// agent and the field.
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
