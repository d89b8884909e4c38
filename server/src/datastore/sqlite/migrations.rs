//! Schema migrations of the SQLite datastore.
//!
//! [`MIGRATIONS`] is append-only: migration `i` (0-based) brings the schema from version `i` to
//! `i + 1`. The version lives in `PRAGMA user_version` and is written in the same transaction as
//! the migration's DDL, so a crash leaves either the old or the new schema, never half of one.
//! Never edit a migration that has shipped; add a new one.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::{invalid_db, map_err};
use crate::datastore::DatastoreError;

/// `PRAGMA application_id` of a Sigil database ("SIGL"): tells our files from other SQLite files.
pub(super) const APPLICATION_ID: i32 = 0x5349_474c;

/// The migrations, in order; the schema version is the number applied.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

/// Version 1: entries (+ selectors, tombstones, revision counter), agents, join tokens, bundles.
const V1: &str = r#"
-- One row: the global entry revision. Every entry create/update/delete takes the next value,
-- so it never goes backwards, also not after deletes.
CREATE TABLE revision (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
) STRICT;
INSERT INTO revision (id, value) VALUES (1, 0);

-- seq is the stable listing order and the page-token key; AUTOINCREMENT never reuses a value.
-- reg_key = SHA-256 of "spiffe_id\nparent_id\n" + the sorted "type:value" selectors joined by
-- "\n": the registration identity, unique (hashed to keep rows and the index small).
CREATE TABLE entries (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    spiffe_id      TEXT    NOT NULL,
    parent_id      TEXT    NOT NULL,
    x509_ttl       INTEGER,
    jwt_ttl        INTEGER,
    dns_names      TEXT    NOT NULL DEFAULT '[]',
    admin          INTEGER NOT NULL DEFAULT 0,
    downstream     INTEGER NOT NULL DEFAULT 0,
    federates_with TEXT    NOT NULL DEFAULT '[]',
    hint           TEXT    NOT NULL DEFAULT '',
    revision       INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    reg_key        BLOB    NOT NULL UNIQUE,
    selector_count INTEGER NOT NULL
) STRICT;
CREATE INDEX entries_spiffe_id ON entries (spiffe_id);
CREATE INDEX entries_parent_id ON entries (parent_id);
CREATE INDEX entries_revision ON entries (revision);
CREATE INDEX entries_without_selectors ON entries (seq) WHERE selector_count = 0;

-- One row per selector of an entry. entry_selector_count repeats entries.selector_count so the
-- Exact/Subset matches are answered from the (type, value, count) index alone.
CREATE TABLE entry_selectors (
    entry_seq            INTEGER NOT NULL REFERENCES entries (seq) ON DELETE CASCADE,
    type                 TEXT    NOT NULL,
    value                TEXT    NOT NULL,
    entry_selector_count INTEGER NOT NULL,
    PRIMARY KEY (entry_seq, type, value)
) STRICT, WITHOUT ROWID;
CREATE INDEX entry_selectors_type_value ON entry_selectors (type, value, entry_selector_count);

CREATE TABLE entry_tombstones (
    id         TEXT    PRIMARY KEY,
    revision   INTEGER NOT NULL,
    deleted_at INTEGER NOT NULL
) STRICT;
CREATE INDEX entry_tombstones_revision ON entry_tombstones (revision);

-- selectors: JSON array of "type:value" strings.
CREATE TABLE agents (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    spiffe_id        TEXT    NOT NULL UNIQUE,
    attestation_type TEXT    NOT NULL,
    serial           TEXT    NOT NULL,
    expires_at       INTEGER NOT NULL,
    banned           INTEGER NOT NULL DEFAULT 0,
    selectors        TEXT    NOT NULL DEFAULT '[]',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
) STRICT;

-- Only the SHA-256 (hex) of a token is stored: a copy of the database does not hold usable
-- tokens.
CREATE TABLE join_tokens (
    token_sha256 TEXT    PRIMARY KEY,
    expires_at   INTEGER NOT NULL,
    spiffe_id    TEXT,
    created_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at);

-- x509_roots: JSON array of base64 (standard, padded) DER certificates.
CREATE TABLE bundles (
    trust_domain  TEXT    PRIMARY KEY,
    x509_roots    TEXT    NOT NULL,
    jwt_keys_json TEXT    NOT NULL,
    sequence      INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) STRICT;
"#;

/// Version 2: federated trust bundles (the bundles of other trust domains, `bundle set`).
const V2: &str = r#"
-- Kept apart from `bundles` (the server's own, written by the CA at start-up) so listing and
-- deleting federated bundles can never touch the server's own bundle.
-- x509_roots: JSON array of base64 (standard, padded) DER certificates; jwt_keys_json: JSON
-- array of JWKs; sequence: bumped whenever the content changes.
CREATE TABLE federated_bundles (
    trust_domain  TEXT    PRIMARY KEY,
    x509_roots    TEXT    NOT NULL,
    jwt_keys_json TEXT    NOT NULL,
    sequence      INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) STRICT;
"#;

/// Version 3: an agent's renewed SVID that it has not used yet.
const V3: &str = r#"
-- Set by a renewal, beside the current serial: both are accepted until the agent first calls
-- with the new one, which then moves into serial/expires_at (SPIRE's NewCertSerialNumber).
-- An agent that could not store its renewed SVID thus goes on with the old one.
ALTER TABLE agents ADD COLUMN new_serial TEXT;
ALTER TABLE agents ADD COLUMN new_expires_at INTEGER;
"#;

/// Version 4: federation relationships (whose bundles the server fetches from their endpoints).
const V4: &str = r#"
-- profile: 'https_web' or 'https_spiffe'; endpoint_spiffe_id is set exactly for https_spiffe.
CREATE TABLE federation_relationships (
    trust_domain        TEXT    PRIMARY KEY,
    bundle_endpoint_url TEXT    NOT NULL,
    profile             TEXT    NOT NULL CHECK (profile IN ('https_web', 'https_spiffe')),
    endpoint_spiffe_id  TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    CHECK ((profile = 'https_spiffe') = (endpoint_spiffe_id IS NOT NULL))
) STRICT;
"#;

/// Version 5: the entry history a reconnecting agent's sync stream resumes from.
const V5: &str = r#"
-- A deleted entry's former SPIFFE ID and parent (NULL in tombstones written before).
ALTER TABLE entry_tombstones ADD COLUMN spiffe_id TEXT;
ALTER TABLE entry_tombstones ADD COLUMN parent_id TEXT;
CREATE INDEX entry_tombstones_deleted_at ON entry_tombstones (deleted_at);

-- The former SPIFFE ID and parent of an entry whose update changed either, one row per such
-- update (revision: the update's).
CREATE TABLE entry_moves (
    revision  INTEGER PRIMARY KEY,
    id        TEXT    NOT NULL,
    spiffe_id TEXT    NOT NULL,
    parent_id TEXT    NOT NULL,
    moved_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX entry_moves_moved_at ON entry_moves (moved_at);

-- The revision that created the entry. Existing entries get their current revision, which is
-- at most `history_from` below: no history read can take them for new.
ALTER TABLE entries ADD COLUMN created_revision INTEGER NOT NULL DEFAULT 0;
UPDATE entries SET created_revision = revision;

-- The history (tombstones with their placement, moves) is complete after this revision.
ALTER TABLE revision ADD COLUMN history_from INTEGER NOT NULL DEFAULT 0;
UPDATE revision SET history_from = value;
"#;

/// Brings the database at `path` to the newest schema in `migrations`, one transaction per
/// migration. Refuses databases that are not Sigil's or that are newer than `migrations`.
pub(super) fn migrate(
    conn: &mut Connection,
    path: &Path,
    migrations: &[&str],
) -> Result<(), DatastoreError> {
    let known = migrations.len();
    loop {
        // IMMEDIATE: take the write lock before reading the version, so two processes opening
        // the same file cannot both apply the same migration.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| open_err(path, e))?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| open_err(path, e))?;
        let app_id: i32 = tx
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| open_err(path, e))?;
        let version = usize::try_from(version)
            .map_err(|_| invalid_db(path, format!("negative schema version {version}")))?;
        if version == 0 {
            // Fresh: must be empty (an empty file, or one we created). Anything else is another
            // application's database; do not add our tables to it.
            let objects: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'",
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| open_err(path, e))?;
            if objects > 0 || (app_id != 0 && app_id != APPLICATION_ID) {
                return Err(invalid_db(
                    path,
                    "it is an SQLite database of another application (it has tables but no Sigil schema version)",
                ));
            }
        } else if app_id != APPLICATION_ID {
            return Err(invalid_db(
                path,
                format!(
                    "it is an SQLite database of another application (application_id {app_id:#x})"
                ),
            ));
        }
        if version > known {
            return Err(DatastoreError::NewerSchema {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        let Some(sql) = migrations.get(version) else {
            return Ok(());
        };
        tx.execute_batch(sql)
            .map_err(|source| DatastoreError::Migration {
                path: path.to_path_buf(),
                version: version + 1,
                source,
            })?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(map_err)?;
        tx.pragma_update(None, "user_version", (version + 1) as i64)
            .map_err(map_err)?;
        tx.commit().map_err(map_err)?;
        tracing::info!(path = %path.display(), version = version + 1, "applied datastore schema migration");
    }
}

/// Errors while reading the header/schema: corruption names the file and what to do.
fn open_err(path: &Path, e: rusqlite::Error) -> DatastoreError {
    match map_err(e) {
        DatastoreError::Corrupt(msg) => invalid_db(path, msg),
        other => other,
    }
}
