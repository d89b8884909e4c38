//! Federation relationships in SQLite (`federation_relationships`): one row per foreign trust
//! domain, the profile as its name and the endpoint SPIFFE ID only for `https_spiffe`.

use rusqlite::{params, OptionalExtension, Row};
use sigil::{SpiffeId, TrustDomain};

use super::{unix_now, Result, SqliteDatastore};
use crate::datastore::{DatastoreError, FederationRelationship};
use crate::federation::EndpointProfile;

const COLUMNS: &str =
    "trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, created_at, updated_at";

/// [`crate::datastore::Datastore::create_federation_relationship`].
pub(super) async fn create(
    ds: &SqliteDatastore,
    rel: FederationRelationship,
) -> Result<FederationRelationship> {
    ds.write(move |conn| {
        let now = unix_now();
        let (profile, endpoint_id) = profile_columns(&rel.profile);
        let inserted = conn
            .prepare_cached(
                "INSERT INTO federation_relationships (trust_domain, bundle_endpoint_url, \
                 profile, endpoint_spiffe_id, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (trust_domain) DO NOTHING",
            )?
            .execute(params![
                rel.trust_domain.name(),
                rel.bundle_endpoint_url,
                profile,
                endpoint_id,
                now
            ])?;
        if inserted == 0 {
            return Err(DatastoreError::RelationshipExists(rel.trust_domain));
        }
        Ok(FederationRelationship {
            created_at: now,
            updated_at: now,
            ..rel
        })
    })
    .await
}

/// [`crate::datastore::Datastore::update_federation_relationship`]: one statement, which
/// returns the row as stored.
pub(super) async fn update(
    ds: &SqliteDatastore,
    rel: FederationRelationship,
) -> Result<FederationRelationship> {
    ds.write(move |conn| {
        let (profile, endpoint_id) = profile_columns(&rel.profile);
        let row = conn
            .prepare_cached(&format!(
                "UPDATE federation_relationships SET bundle_endpoint_url = ?2, profile = ?3, \
                 endpoint_spiffe_id = ?4, updated_at = ?5 WHERE trust_domain = ?1 \
                 RETURNING {COLUMNS}"
            ))?
            .query_row(
                params![
                    rel.trust_domain.name(),
                    rel.bundle_endpoint_url,
                    profile,
                    endpoint_id,
                    unix_now()
                ],
                raw,
            )
            .optional()?;
        match row {
            Some(r) => decode(r),
            None => Err(not_found(&rel.trust_domain)),
        }
    })
    .await
}

/// [`crate::datastore::Datastore::get_federation_relationship`].
pub(super) async fn get(
    ds: &SqliteDatastore,
    td: &TrustDomain,
) -> Result<Option<FederationRelationship>> {
    let td = td.clone();
    ds.read(move |conn| {
        conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM federation_relationships WHERE trust_domain = ?1"
        ))?
        .query_row([td.name()], raw)
        .optional()?
        .map(decode)
        .transpose()
    })
    .await
}

/// [`crate::datastore::Datastore::list_federation_relationships`].
pub(super) async fn list(ds: &SqliteDatastore) -> Result<Vec<FederationRelationship>> {
    ds.read(|conn| {
        let rows = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM federation_relationships ORDER BY trust_domain"
            ))?
            .query_map([], raw)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(decode).collect()
    })
    .await
}

/// [`crate::datastore::Datastore::delete_federation_relationship`]: one statement, so what is
/// returned is exactly what was deleted.
pub(super) async fn delete(
    ds: &SqliteDatastore,
    td: &TrustDomain,
) -> Result<FederationRelationship> {
    let td = td.clone();
    ds.write(move |conn| {
        let row = conn
            .prepare_cached(&format!(
                "DELETE FROM federation_relationships WHERE trust_domain = ?1 RETURNING {COLUMNS}"
            ))?
            .query_row([td.name()], raw)
            .optional()?;
        match row {
            Some(r) => decode(r),
            None => Err(not_found(&td)),
        }
    })
    .await
}

fn not_found(td: &TrustDomain) -> DatastoreError {
    DatastoreError::NotFound(format!("federation relationship with trust domain {td}"))
}

/// The `profile` and `endpoint_spiffe_id` columns of a profile.
fn profile_columns(p: &EndpointProfile) -> (&'static str, Option<String>) {
    match p {
        EndpointProfile::HttpsWeb => ("https_web", None),
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
            ("https_spiffe", Some(endpoint_spiffe_id.to_string()))
        }
    }
}

/// A row's columns, undecoded.
type RawRow = (String, String, String, Option<String>, i64, i64);

fn raw(r: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn decode(
    (td, url, profile, endpoint_id, created_at, updated_at): RawRow,
) -> Result<FederationRelationship> {
    let bad = |why: String| {
        DatastoreError::Corrupt(format!("federation relationship with {td:?}: {why}"))
    };
    let trust_domain = TrustDomain::new(&td).map_err(|e| bad(format!("trust_domain: {e}")))?;
    let profile = match (profile.as_str(), endpoint_id) {
        ("https_web", None) => EndpointProfile::HttpsWeb,
        ("https_spiffe", Some(id)) => EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: SpiffeId::parse(&id)
                .map_err(|e| bad(format!("endpoint_spiffe_id: {e}")))?,
        },
        (other, id) => {
            return Err(bad(format!(
                "profile {other:?} with endpoint_spiffe_id {id:?}"
            )))
        }
    };
    Ok(FederationRelationship {
        trust_domain,
        bundle_endpoint_url: url,
        profile,
        created_at,
        updated_at,
    })
}
