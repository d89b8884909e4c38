//! Join tokens in SQLite: stored as their SHA-256 (a copy of the database yields no usable
//! token), taken exactly once by a single `DELETE ... RETURNING`.

use rusqlite::{params, OptionalExtension};
use sigil::SpiffeId;

use super::{unix_now, Result, SqliteDatastore};
use crate::datastore::{DatastoreError, JoinToken};

/// [`crate::datastore::Datastore::create_join_token`]: stores the token's SHA-256, never the
/// token itself.
pub(super) async fn create(ds: &SqliteDatastore, token: JoinToken) -> Result<()> {
    ds.write(move |conn| {
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

/// [`crate::datastore::Datastore::consume_join_token`]: a token is expired when
/// `now >= expires_at` (the same rule as [`prune`]).
pub(super) async fn consume(ds: &SqliteDatastore, token: &str, now: i64) -> Result<JoinToken> {
    let token = token.to_string();
    ds.write(move |conn| {
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

/// [`crate::datastore::Datastore::prune_join_tokens`].
pub(super) async fn prune(ds: &SqliteDatastore, now: i64) -> Result<u64> {
    ds.write(move |conn| {
        let n = conn
            .prepare_cached("DELETE FROM join_tokens WHERE expires_at <= ?1")?
            .execute([now])?;
        Ok(n as u64)
    })
    .await
}

/// The stored form of a token: its SHA-256, in hex.
fn token_hash(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}
