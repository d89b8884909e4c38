//! Join tokens: stored as their SHA-256, taken exactly once.

use deadpool_postgres::GenericClient;
use sigil::SpiffeId;

use super::{col, Result};
use crate::datastore::{DatastoreError, JoinToken};

fn token_hash(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

/// Stores the token's SHA-256, never the token itself.
pub(super) async fn create(c: &impl GenericClient, token: JoinToken, now: i64) -> Result<()> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO join_tokens (token_sha256, expires_at, spiffe_id, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (token_sha256) DO NOTHING",
        )
        .await?;
    let inserted = c
        .execute(
            &stmt,
            &[
                &token_hash(&token.token),
                &token.expires_at,
                &token.spiffe_id.as_ref().map(ToString::to_string),
                &now,
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(DatastoreError::JoinTokenCollision);
    }
    Ok(())
}

/// One `DELETE ... RETURNING`, committed on return: of callers racing on any servers, the
/// first takes the row and the others wait for its commit, then find nothing. A token is
/// expired when `now >= expires_at`.
pub(super) async fn consume(c: &impl GenericClient, token: &str, now: i64) -> Result<JoinToken> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM join_tokens WHERE token_sha256 = $1 RETURNING expires_at, spiffe_id",
        )
        .await?;
    let Some(row) = c.query_opt(&stmt, &[&token_hash(token)]).await? else {
        return Err(DatastoreError::NotFound("join token".into()));
    };
    let what = || "join token".to_string();
    let expires_at: i64 = col(&row, 0, &what)?;
    if now >= expires_at {
        return Err(DatastoreError::Expired);
    }
    let spiffe_id = col::<Option<String>>(&row, 1, &what)?
        .map(|s| SpiffeId::parse(&s))
        .transpose()
        .map_err(|e| DatastoreError::Corrupt(format!("join token spiffe_id: {e}")))?;
    Ok(JoinToken {
        token: token.to_string(),
        expires_at,
        spiffe_id,
    })
}

pub(super) async fn prune(c: &impl GenericClient, now: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached("DELETE FROM join_tokens WHERE expires_at <= $1")
        .await?;
    Ok(c.execute(&stmt, &[&now]).await?)
}
