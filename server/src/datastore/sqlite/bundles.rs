//! Trust bundles in SQLite: the server's own (`bundles`) and the federated bundles of other
//! trust domains (`federated_bundles`), two tables with the same columns. Roots are stored as a
//! JSON array of base64 DER; the sequence is bumped only when the content changes.

use base64::Engine as _;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sigil::TrustDomain;

use super::{to_json, unix_now, Result, SqliteDatastore};
use crate::datastore::{BundleSwap, DatastoreError, StoredBundle};

/// [`crate::datastore::Datastore::get_bundle`] and
/// [`crate::datastore::Datastore::get_federated_bundle`].
pub(super) async fn get(
    ds: &SqliteDatastore,
    table: BundleTable,
    td: &TrustDomain,
) -> Result<Option<StoredBundle>> {
    let td = td.clone();
    ds.read(move |conn| get_bundle_conn(conn, table, &td)).await
}

/// [`crate::datastore::Datastore::set_bundle`] and
/// [`crate::datastore::Datastore::set_federated_bundle`].
pub(super) async fn set(
    ds: &SqliteDatastore,
    table: BundleTable,
    bundle: StoredBundle,
) -> Result<StoredBundle> {
    ds.write(move |conn| set_bundle_conn(conn, table, bundle))
        .await
}

/// [`crate::datastore::Datastore::compare_and_set_bundle`]: the comparison and the write in one
/// immediate transaction (SQLite has one writer at a time).
pub(super) async fn compare_and_set(
    ds: &SqliteDatastore,
    bundle: StoredBundle,
    expected: u64,
) -> Result<BundleSwap> {
    ds.write(move |conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored = get_bundle_conn(&tx, BundleTable::Own, &bundle.trust_domain)?;
        if stored.as_ref().map_or(0, |s| s.sequence) != expected {
            return Ok(BundleSwap::Changed(stored));
        }
        let written = write_bundle(&tx, BundleTable::Own, stored.as_ref(), bundle)?;
        tx.commit()?;
        Ok(BundleSwap::Stored(written))
    })
    .await
}

/// [`crate::datastore::Datastore::list_federated_bundles`].
pub(super) async fn list_federated(ds: &SqliteDatastore) -> Result<Vec<StoredBundle>> {
    ds.read(|conn| {
        let rows = conn
            .prepare_cached(
                "SELECT trust_domain, x509_roots, jwt_keys_json, sequence \
                 FROM federated_bundles ORDER BY trust_domain",
            )?
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(name, roots, jwt, seq)| decode_federated_row(&name, &roots, jwt, seq))
            .collect()
    })
    .await
}

/// [`crate::datastore::Datastore::delete_federated_bundle`].
pub(super) async fn delete_federated(
    ds: &SqliteDatastore,
    td: &TrustDomain,
) -> Result<StoredBundle> {
    let td = td.clone();
    ds.write(move |conn| {
        // One statement: what is returned is exactly what was deleted.
        let row: Option<(String, String, i64)> = conn
            .prepare_cached(
                "DELETE FROM federated_bundles WHERE trust_domain = ?1 \
                 RETURNING x509_roots, jwt_keys_json, sequence",
            )?
            .query_row([td.name()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((roots, jwt, seq)) = row else {
            return Err(DatastoreError::NotFound(format!(
                "federated bundle of trust domain {td}"
            )));
        };
        decode_bundle(BundleTable::Federated, &td, &roots, jwt, seq)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Rows

/// The two bundle tables, which have the same columns: the server's own bundle and the
/// federated bundles of other trust domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BundleTable {
    /// `bundles`: the server's own trust domain.
    Own,
    /// `federated_bundles`: foreign trust domains.
    Federated,
}

impl BundleTable {
    fn name(self) -> &'static str {
        match self {
            BundleTable::Own => "bundles",
            BundleTable::Federated => "federated_bundles",
        }
    }

    /// How corruption messages name a row of this table.
    fn what(self) -> &'static str {
        match self {
            BundleTable::Own => "bundle",
            BundleTable::Federated => "federated bundle",
        }
    }
}

fn decode_bundle(
    table: BundleTable,
    td: &TrustDomain,
    roots: &str,
    jwt_keys_json: String,
    sequence: i64,
) -> Result<StoredBundle> {
    let bad = |why: String| DatastoreError::Corrupt(format!("{} of {td}: {why}", table.what()));
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

fn get_bundle_conn(
    conn: &Connection,
    table: BundleTable,
    td: &TrustDomain,
) -> Result<Option<StoredBundle>> {
    let row: Option<(String, String, i64)> = conn
        .prepare_cached(&format!(
            "SELECT x509_roots, jwt_keys_json, sequence FROM {} WHERE trust_domain = ?1",
            table.name()
        ))?
        .query_row([td.name()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    row.map(|(roots, jwt, seq)| decode_bundle(table, td, &roots, jwt, seq))
        .transpose()
}

/// Upserts a bundle into `table`; the sequence is bumped only when the content changes.
fn set_bundle_conn(
    conn: &mut Connection,
    table: BundleTable,
    bundle: StoredBundle,
) -> Result<StoredBundle> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stored = get_bundle_conn(&tx, table, &bundle.trust_domain)?;
    let written = write_bundle(&tx, table, stored.as_ref(), bundle)?;
    tx.commit()?;
    Ok(written)
}

/// Writes `bundle` over `stored` (read in the same transaction) unless the content is the
/// same; returns what is stored then.
fn write_bundle(
    conn: &Connection,
    table: BundleTable,
    stored: Option<&StoredBundle>,
    bundle: StoredBundle,
) -> Result<StoredBundle> {
    let sequence = match stored {
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
    conn.prepare_cached(&format!(
        "INSERT INTO {} (trust_domain, x509_roots, jwt_keys_json, sequence, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (trust_domain) DO UPDATE SET x509_roots = excluded.x509_roots, \
         jwt_keys_json = excluded.jwt_keys_json, sequence = excluded.sequence, \
         updated_at = excluded.updated_at",
        table.name()
    ))?
    .execute(params![
        bundle.trust_domain.name(),
        to_json(&roots)?,
        bundle.jwt_keys_json,
        i64::try_from(sequence).unwrap_or(i64::MAX),
        unix_now(),
    ])?;
    Ok(StoredBundle { sequence, ..bundle })
}

/// A federated bundle row whose trust domain column is read too.
fn decode_federated_row(name: &str, roots: &str, jwt: String, seq: i64) -> Result<StoredBundle> {
    let td = TrustDomain::new(name).map_err(|e| {
        DatastoreError::Corrupt(format!("federated bundle trust domain {name:?}: {e}"))
    })?;
    decode_bundle(BundleTable::Federated, &td, roots, jwt, seq)
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
