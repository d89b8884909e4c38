//! Federation relationships (`federation_relationships`): one row per foreign trust domain, the
//! profile as its name and the endpoint SPIFFE ID only for `https_spiffe`. Each write is one
//! statement, so two servers writing at once are ordered by the row.

use deadpool_postgres::GenericClient;
use sigil::{SpiffeId, TrustDomain};
use tokio_postgres::Row;

use super::{col, Result};
use crate::datastore::{DatastoreError, FederationRelationship};
use crate::federation::EndpointProfile;

const COLUMNS: &str =
    "trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, created_at, updated_at";

pub(super) async fn create(
    c: &impl GenericClient,
    rel: FederationRelationship,
    now: i64,
) -> Result<FederationRelationship> {
    let (profile, endpoint_id) = profile_columns(&rel.profile);
    let stmt = c
        .prepare_cached(
            "INSERT INTO federation_relationships (trust_domain, bundle_endpoint_url, profile, \
             endpoint_spiffe_id, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5) \
             ON CONFLICT (trust_domain) DO NOTHING",
        )
        .await?;
    let inserted = c
        .execute(
            &stmt,
            &[
                &rel.trust_domain.name(),
                &rel.bundle_endpoint_url,
                &profile,
                &endpoint_id,
                &now,
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(DatastoreError::RelationshipExists(rel.trust_domain));
    }
    Ok(FederationRelationship {
        created_at: now,
        updated_at: now,
        ..rel
    })
}

pub(super) async fn update(
    c: &impl GenericClient,
    rel: FederationRelationship,
    now: i64,
) -> Result<FederationRelationship> {
    let (profile, endpoint_id) = profile_columns(&rel.profile);
    let stmt = c
        .prepare_cached(&format!(
            "UPDATE federation_relationships SET bundle_endpoint_url = $2, profile = $3, \
             endpoint_spiffe_id = $4, updated_at = $5 WHERE trust_domain = $1 RETURNING {COLUMNS}"
        ))
        .await?;
    let row = c
        .query_opt(
            &stmt,
            &[
                &rel.trust_domain.name(),
                &rel.bundle_endpoint_url,
                &profile,
                &endpoint_id,
                &now,
            ],
        )
        .await?;
    match row {
        Some(r) => decode(&r),
        None => Err(not_found(&rel.trust_domain)),
    }
}

pub(super) async fn get(
    c: &impl GenericClient,
    td: &TrustDomain,
) -> Result<Option<FederationRelationship>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM federation_relationships WHERE trust_domain = $1"
        ))
        .await?;
    c.query_opt(&stmt, &[&td.name()])
        .await?
        .as_ref()
        .map(decode)
        .transpose()
}

pub(super) async fn list(c: &impl GenericClient) -> Result<Vec<FederationRelationship>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM federation_relationships ORDER BY trust_domain"
        ))
        .await?;
    c.query(&stmt, &[]).await?.iter().map(decode).collect()
}

/// One statement: what is returned is exactly what was deleted.
pub(super) async fn delete(
    c: &impl GenericClient,
    td: &TrustDomain,
) -> Result<FederationRelationship> {
    let stmt = c
        .prepare_cached(&format!(
            "DELETE FROM federation_relationships WHERE trust_domain = $1 RETURNING {COLUMNS}"
        ))
        .await?;
    match c.query_opt(&stmt, &[&td.name()]).await? {
        Some(r) => decode(&r),
        None => Err(not_found(td)),
    }
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

fn decode(row: &Row) -> Result<FederationRelationship> {
    let what = || "federation relationship".to_string();
    let td: String = col(row, 0, &what)?;
    let bad = |why: String| {
        DatastoreError::Corrupt(format!("federation relationship with {td:?}: {why}"))
    };
    let trust_domain = TrustDomain::new(&td).map_err(|e| bad(format!("trust_domain: {e}")))?;
    let profile: String = col(row, 2, &what)?;
    let endpoint_id: Option<String> = col(row, 3, &what)?;
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
        bundle_endpoint_url: col(row, 1, &what)?,
        profile,
        created_at: col(row, 4, &what)?,
        updated_at: col(row, 5, &what)?,
    })
}
