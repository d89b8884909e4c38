//! Trust bundles: the server's own (`bundles`) and the federated ones (`federated_bundles`),
//! with a sequence bumped only when the content changes.

use deadpool_postgres::{GenericClient, Object};
use sigil::TrustDomain;
use tokio_postgres::Row;

use super::{col, Result};
use crate::datastore::{BundleSwap, DatastoreError, StoredBundle};

/// The two bundle tables, which have the same columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Own,
    Federated,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Own => "bundles",
            Table::Federated => "federated_bundles",
        }
    }

    /// How corruption messages name a row of this table.
    fn what(self) -> &'static str {
        match self {
            Table::Own => "bundle",
            Table::Federated => "federated bundle",
        }
    }
}

/// A row of `x509_roots, jwt_keys_json, sequence` (from column `first` on) for `td`.
fn decode(table: Table, td: &TrustDomain, row: &Row, first: usize) -> Result<StoredBundle> {
    let what = || format!("{} of {td}", table.what());
    let sequence: i64 = col(row, first + 2, &what)?;
    let sequence = u64::try_from(sequence).map_err(|_| {
        DatastoreError::Corrupt(format!("{}: negative sequence {sequence}", what()))
    })?;
    Ok(StoredBundle {
        trust_domain: td.clone(),
        x509_roots: col(row, first, &what)?,
        jwt_keys_json: col(row, first + 1, &what)?,
        sequence,
    })
}

/// A federated bundle row whose first column is the trust domain.
fn decode_federated(row: &Row) -> Result<StoredBundle> {
    let name: String = col(row, 0, &|| "federated bundle".to_string())?;
    let td = TrustDomain::new(&name).map_err(|e| {
        DatastoreError::Corrupt(format!("federated bundle trust domain {name:?}: {e}"))
    })?;
    decode(Table::Federated, &td, row, 1)
}

pub(super) async fn get(
    c: &impl GenericClient,
    table: Table,
    td: &TrustDomain,
) -> Result<Option<StoredBundle>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT x509_roots, jwt_keys_json, sequence FROM {} WHERE trust_domain = $1",
            table.name()
        ))
        .await?;
    c.query_opt(&stmt, &[&td.name()])
        .await?
        .as_ref()
        .map(|r| decode(table, td, r, 0))
        .transpose()
}

/// Upserts a bundle; the sequence is bumped only when the content changes. Two servers storing
/// at once are ordered by the row: a missing row is inserted with `ON CONFLICT DO NOTHING`
/// (which waits for a concurrent insert), an existing one is locked before it is compared.
pub(super) async fn set(
    conn: &mut Object,
    table: Table,
    bundle: StoredBundle,
    now: i64,
) -> Result<StoredBundle> {
    let name = table.name();
    let tx = conn.transaction().await?;
    let stmt = tx
        .prepare_cached(&format!(
            "INSERT INTO {name} (trust_domain, x509_roots, jwt_keys_json, sequence, updated_at) \
             VALUES ($1, $2, $3, 1, $4) ON CONFLICT (trust_domain) DO NOTHING"
        ))
        .await?;
    let td = bundle.trust_domain.name();
    if tx
        .execute(
            &stmt,
            &[&td, &bundle.x509_roots, &bundle.jwt_keys_json, &now],
        )
        .await?
        == 1
    {
        tx.commit().await?;
        return Ok(StoredBundle {
            sequence: 1,
            ..bundle
        });
    }
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT x509_roots, jwt_keys_json, sequence FROM {name} WHERE trust_domain = $1 \
             FOR UPDATE"
        ))
        .await?;
    let row = tx.query_one(&stmt, &[&td]).await?;
    let stored = decode(table, &bundle.trust_domain, &row, 0)?;
    if stored.x509_roots == bundle.x509_roots
        && same_jwks(&stored.jwt_keys_json, &bundle.jwt_keys_json)
    {
        tx.commit().await?;
        return Ok(stored);
    }
    let sequence = stored.sequence.saturating_add(1);
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE {name} SET x509_roots = $2, jwt_keys_json = $3, sequence = $4, \
             updated_at = $5 WHERE trust_domain = $1"
        ))
        .await?;
    tx.execute(
        &stmt,
        &[
            &td,
            &bundle.x509_roots,
            &bundle.jwt_keys_json,
            &i64::try_from(sequence).unwrap_or(i64::MAX),
            &now,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(StoredBundle { sequence, ..bundle })
}

/// Stores the own bundle if its stored sequence is `expected` (0: none stored). The row is
/// locked before it is compared, and a missing row is inserted with `ON CONFLICT DO NOTHING`,
/// so of two servers swapping from the same sequence one wins and the other sees its result.
pub(super) async fn compare_and_set(
    conn: &mut Object,
    bundle: StoredBundle,
    expected: u64,
    now: i64,
) -> Result<BundleSwap> {
    let td = bundle.trust_domain.name().to_string();
    let tx = conn.transaction().await?;
    let stmt = tx
        .prepare_cached(
            "SELECT x509_roots, jwt_keys_json, sequence FROM bundles WHERE trust_domain = $1 \
             FOR UPDATE",
        )
        .await?;
    let stored = tx
        .query_opt(&stmt, &[&td])
        .await?
        .as_ref()
        .map(|r| decode(Table::Own, &bundle.trust_domain, r, 0))
        .transpose()?;
    let Some(stored) = stored else {
        if expected != 0 {
            return Ok(BundleSwap::Changed(None));
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO bundles (trust_domain, x509_roots, jwt_keys_json, sequence, \
                 updated_at) VALUES ($1, $2, $3, 1, $4) ON CONFLICT (trust_domain) DO NOTHING",
            )
            .await?;
        let inserted = tx
            .execute(
                &stmt,
                &[&td, &bundle.x509_roots, &bundle.jwt_keys_json, &now],
            )
            .await?;
        if inserted == 1 {
            tx.commit().await?;
            return Ok(BundleSwap::Stored(StoredBundle {
                sequence: 1,
                ..bundle
            }));
        }
        // Another server inserted it meanwhile (after our SELECT, before our INSERT); this
        // statement sees its committed row.
        let current = get(&tx, Table::Own, &bundle.trust_domain).await?;
        return Ok(BundleSwap::Changed(current));
    };
    if stored.sequence != expected {
        return Ok(BundleSwap::Changed(Some(stored)));
    }
    if stored.x509_roots == bundle.x509_roots
        && same_jwks(&stored.jwt_keys_json, &bundle.jwt_keys_json)
    {
        return Ok(BundleSwap::Stored(stored));
    }
    let sequence = stored.sequence.saturating_add(1);
    let stmt = tx
        .prepare_cached(
            "UPDATE bundles SET x509_roots = $2, jwt_keys_json = $3, sequence = $4, \
             updated_at = $5 WHERE trust_domain = $1",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &td,
            &bundle.x509_roots,
            &bundle.jwt_keys_json,
            &i64::try_from(sequence).unwrap_or(i64::MAX),
            &now,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(BundleSwap::Stored(StoredBundle { sequence, ..bundle }))
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

pub(super) async fn list_federated(c: &impl GenericClient) -> Result<Vec<StoredBundle>> {
    let stmt = c
        .prepare_cached(
            "SELECT trust_domain, x509_roots, jwt_keys_json, sequence \
             FROM federated_bundles ORDER BY trust_domain",
        )
        .await?;
    c.query(&stmt, &[])
        .await?
        .iter()
        .map(decode_federated)
        .collect()
}

/// One statement: what is returned is exactly what was deleted.
pub(super) async fn delete_federated(
    c: &impl GenericClient,
    td: &TrustDomain,
) -> Result<StoredBundle> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM federated_bundles WHERE trust_domain = $1 \
             RETURNING x509_roots, jwt_keys_json, sequence",
        )
        .await?;
    let Some(row) = c.query_opt(&stmt, &[&td.name()]).await? else {
        return Err(DatastoreError::NotFound(format!(
            "federated bundle of trust domain {td}"
        )));
    };
    decode(Table::Federated, td, &row, 0)
}
