//! Schema migrations of the PostgreSQL datastore.
//!
//! [`MIGRATIONS`] is append-only: migration `i` (0-based) brings the schema from version `i` to
//! `i + 1`. The version lives in the one-row table `sigil_schema`, written in the same
//! transaction as the migration's DDL (PostgreSQL's DDL is transactional), so a failure leaves
//! the old schema. Every migration transaction first takes a transaction-level advisory lock:
//! servers starting at once wait for each other, and each applies only what is still missing.
//! Never edit a migration that has shipped; add a new one.
//!
//! The tables live in the first schema of the connection's search path (`public` by default);
//! a role with its own schema first in its search path gets its own tables.

use tokio_postgres::Client;

use super::error::{PostgresError, Target};
use crate::datastore::DatastoreError;

/// The advisory lock key of the migrations ("SIGL" + "MIGR" in ASCII), the same for every
/// server sharing the database.
const MIGRATION_LOCK: i64 = 0x5349_474c_4d49_4752;

/// The migrations, in order; the schema version is the number applied.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4];

/// Version 1: entries (+ selectors, tombstones, revision counter), agents (with the pending
/// renewed SVID), join tokens, the server's own bundle and federated bundles. Identifiers that
/// are compared or ordered byte-wise use the "C" collation, as SQLite does.
const V1: &str = r#"
-- One row: the global entry revision. Every entry create/update/delete locks it first and takes
-- the next value, so revisions follow commit order and never go backwards, also not after
-- deletes.
CREATE TABLE revision (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT  NOT NULL
);
INSERT INTO revision (id, value) VALUES (1, 0);

-- seq is the stable listing order and the page-token key (taken under the revision lock, so in
-- commit order). reg_key = SHA-256 of "spiffe_id\nparent_id" + "\ntype:value" per sorted
-- selector: the registration identity, unique.
CREATE TABLE entries (
    seq            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             TEXT    COLLATE "C" NOT NULL UNIQUE,
    spiffe_id      TEXT    COLLATE "C" NOT NULL,
    parent_id      TEXT    COLLATE "C" NOT NULL,
    x509_ttl       BIGINT,
    jwt_ttl        BIGINT,
    dns_names      TEXT[]  NOT NULL DEFAULT '{}',
    admin          BOOLEAN NOT NULL DEFAULT FALSE,
    downstream     BOOLEAN NOT NULL DEFAULT FALSE,
    federates_with TEXT[]  NOT NULL DEFAULT '{}',
    hint           TEXT    NOT NULL DEFAULT '',
    revision       BIGINT  NOT NULL,
    created_at     BIGINT  NOT NULL,
    updated_at     BIGINT  NOT NULL,
    reg_key        BYTEA   NOT NULL UNIQUE,
    selector_count INTEGER NOT NULL
);
CREATE INDEX entries_spiffe_id ON entries (spiffe_id);
CREATE INDEX entries_parent_id ON entries (parent_id);
CREATE INDEX entries_revision ON entries (revision);
CREATE INDEX entries_without_selectors ON entries (seq) WHERE selector_count = 0;

-- One row per selector of an entry. entry_selector_count repeats entries.selector_count so the
-- Exact/Subset matches are answered from the (type, value, count) index alone.
CREATE TABLE entry_selectors (
    entry_seq            BIGINT  NOT NULL REFERENCES entries (seq) ON DELETE CASCADE,
    type                 TEXT    COLLATE "C" NOT NULL,
    value                TEXT    COLLATE "C" NOT NULL,
    entry_selector_count INTEGER NOT NULL,
    PRIMARY KEY (entry_seq, type, value)
);
CREATE INDEX entry_selectors_type_value ON entry_selectors (type, value, entry_selector_count);

CREATE TABLE entry_tombstones (
    id         TEXT   COLLATE "C" PRIMARY KEY,
    revision   BIGINT NOT NULL,
    deleted_at BIGINT NOT NULL
);
CREATE INDEX entry_tombstones_revision ON entry_tombstones (revision);

-- new_serial/new_expires_at: a renewed SVID the agent has not used yet (both set or neither).
CREATE TABLE agents (
    seq              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    spiffe_id        TEXT    COLLATE "C" NOT NULL UNIQUE,
    attestation_type TEXT    NOT NULL,
    serial           TEXT    COLLATE "C" NOT NULL,
    expires_at       BIGINT  NOT NULL,
    new_serial       TEXT    COLLATE "C",
    new_expires_at   BIGINT,
    banned           BOOLEAN NOT NULL DEFAULT FALSE,
    selectors        TEXT[]  NOT NULL DEFAULT '{}',
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL
);

-- Only the SHA-256 (hex) of a token is stored: a copy of the database holds no usable token.
CREATE TABLE join_tokens (
    token_sha256 TEXT   COLLATE "C" PRIMARY KEY,
    expires_at   BIGINT NOT NULL,
    spiffe_id    TEXT,
    created_at   BIGINT NOT NULL
);
CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at);

-- The server's own bundle (written by the CA at start-up) and, apart from it, the federated
-- bundles of other trust domains, so listing and deleting those never touches the own one.
-- x509_roots: DER certificates; sequence: bumped whenever the content changes.
CREATE TABLE bundles (
    trust_domain  TEXT    COLLATE "C" PRIMARY KEY,
    x509_roots    BYTEA[] NOT NULL,
    jwt_keys_json TEXT    NOT NULL,
    sequence      BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL
);
CREATE TABLE federated_bundles (
    trust_domain  TEXT    COLLATE "C" PRIMARY KEY,
    x509_roots    BYTEA[] NOT NULL,
    jwt_keys_json TEXT    NOT NULL,
    sequence      BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL
);
"#;

/// The channel every change is announced on (`NOTIFY`); see [`crate::datastore::feed`].
pub(super) const CHANGES_CHANNEL: &str = "sigil_changes";

/// Version 2: change notifications. Triggers announce each write on channel `sigil_changes`
/// from inside the writing transaction, so the notification is delivered when, and only if, it
/// commits, whichever server (or manual SQL) wrote. Payloads as `datastore::feed::Change`:
/// entries per statement; agents per row, only when what a sync stream checks changed (ban,
/// node selectors, eviction), not on every renewal; the own bundle per row with its trust domain.
const V2: &str = r#"
CREATE FUNCTION sigil_notify_entries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sigil_changes', 'entries');
    RETURN NULL;
END $$;
CREATE TRIGGER entries_notify AFTER INSERT OR UPDATE OR DELETE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION sigil_notify_entries();

CREATE FUNCTION sigil_notify_agent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('sigil_changes', 'agent:' || OLD.spiffe_id);
    ELSE
        PERFORM pg_notify('sigil_changes', 'agent:' || NEW.spiffe_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER agents_notify_update AFTER UPDATE ON agents FOR EACH ROW
    WHEN (OLD.banned IS DISTINCT FROM NEW.banned OR OLD.selectors IS DISTINCT FROM NEW.selectors)
    EXECUTE FUNCTION sigil_notify_agent();
CREATE TRIGGER agents_notify_delete AFTER DELETE ON agents FOR EACH ROW
    EXECUTE FUNCTION sigil_notify_agent();

CREATE FUNCTION sigil_notify_join_tokens() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sigil_changes', 'join_tokens');
    RETURN NULL;
END $$;
CREATE TRIGGER join_tokens_notify AFTER INSERT OR DELETE ON join_tokens FOR EACH ROW
    EXECUTE FUNCTION sigil_notify_join_tokens();

CREATE FUNCTION sigil_notify_bundle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sigil_changes', 'bundle:' || NEW.trust_domain);
    RETURN NULL;
END $$;
CREATE TRIGGER bundles_notify AFTER INSERT OR UPDATE ON bundles FOR EACH ROW
    EXECUTE FUNCTION sigil_notify_bundle();

CREATE FUNCTION sigil_notify_federated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sigil_changes', 'federated');
    RETURN NULL;
END $$;
CREATE TRIGGER federated_bundles_notify AFTER INSERT OR UPDATE OR DELETE ON federated_bundles
    FOR EACH STATEMENT EXECUTE FUNCTION sigil_notify_federated();
"#;

/// Version 3: federation relationships, announced per statement (`federation`) as the federated
/// bundles are, so every server's refresher picks up a change made through another.
const V3: &str = r#"
-- profile: 'https_web' or 'https_spiffe'; endpoint_spiffe_id is set exactly for https_spiffe.
CREATE TABLE federation_relationships (
    trust_domain        TEXT   COLLATE "C" PRIMARY KEY,
    bundle_endpoint_url TEXT   NOT NULL,
    profile             TEXT   NOT NULL CHECK (profile IN ('https_web', 'https_spiffe')),
    endpoint_spiffe_id  TEXT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    CHECK ((profile = 'https_spiffe') = (endpoint_spiffe_id IS NOT NULL))
);

CREATE FUNCTION sigil_notify_federation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sigil_changes', 'federation');
    RETURN NULL;
END $$;
CREATE TRIGGER federation_relationships_notify
    AFTER INSERT OR UPDATE OR DELETE ON federation_relationships
    FOR EACH STATEMENT EXECUTE FUNCTION sigil_notify_federation();
"#;

/// Version 4: the entry history a reconnecting agent's sync stream resumes from.
const V4: &str = r#"
-- A deleted entry's former SPIFFE ID and parent (NULL in tombstones written before).
ALTER TABLE entry_tombstones ADD COLUMN spiffe_id TEXT COLLATE "C";
ALTER TABLE entry_tombstones ADD COLUMN parent_id TEXT COLLATE "C";
CREATE INDEX entry_tombstones_deleted_at ON entry_tombstones (deleted_at);

-- The former SPIFFE ID and parent of an entry whose update changed either, one row per such
-- update (revision: the update's).
CREATE TABLE entry_moves (
    revision  BIGINT PRIMARY KEY,
    id        TEXT   COLLATE "C" NOT NULL,
    spiffe_id TEXT   COLLATE "C" NOT NULL,
    parent_id TEXT   COLLATE "C" NOT NULL,
    moved_at  BIGINT NOT NULL
);
CREATE INDEX entry_moves_moved_at ON entry_moves (moved_at);

-- The revision that created the entry. Existing entries get their current revision, which is
-- at most `history_from` below: no history read can take them for new.
ALTER TABLE entries ADD COLUMN created_revision BIGINT NOT NULL DEFAULT 0;
UPDATE entries SET created_revision = revision;

-- The history (tombstones with their placement, moves) is complete after this revision.
ALTER TABLE revision ADD COLUMN history_from BIGINT NOT NULL DEFAULT 0;
UPDATE revision SET history_from = value;
"#;

/// Brings the database to the newest schema in `migrations`, one transaction per migration,
/// each under the advisory lock. Refuses a database whose schema has other tables but no
/// Sigil schema version, and one newer than `migrations`.
pub(super) async fn migrate(
    client: &mut Client,
    target: &Target,
    migrations: &[&str],
) -> Result<(), DatastoreError> {
    let known = migrations.len();
    loop {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let has_version_table: bool = tx
            .query_one("SELECT to_regclass('sigil_schema') IS NOT NULL", &[])
            .await?
            .try_get(0)?;
        let version: i32 = if has_version_table {
            tx.query_opt("SELECT version FROM sigil_schema WHERE id = 1", &[])
                .await?
                .map(|r| r.try_get(0))
                .transpose()?
                .ok_or_else(|| {
                    DatastoreError::Corrupt(format!(
                        "PostgreSQL database ({target}): the sigil_schema table has no row"
                    ))
                })?
        } else {
            // Fresh: the schema must hold no tables. Otherwise it is another application's;
            // do not add ours to it.
            let row = tx
                .query_one(
                    "SELECT current_schema(), (SELECT COUNT(*) FROM pg_catalog.pg_tables \
                     WHERE schemaname = current_schema())",
                    &[],
                )
                .await?;
            let schema: Option<String> = row.try_get(0)?;
            let tables: i64 = row.try_get(1)?;
            let Some(schema) = schema else {
                return Err(PostgresError::NoSchema {
                    target: target.clone(),
                }
                .into());
            };
            if tables > 0 {
                return Err(PostgresError::ForeignDatabase {
                    target: target.clone(),
                    schema,
                    tables,
                }
                .into());
            }
            0
        };
        let applied = usize::try_from(version).map_err(|_| {
            DatastoreError::Corrupt(format!(
                "PostgreSQL database ({target}): negative schema version {version}"
            ))
        })?;
        if applied > known {
            return Err(PostgresError::NewerSchema {
                target: target.clone(),
                found: version,
                known,
            }
            .into());
        }
        let Some(sql) = migrations.get(applied) else {
            tx.commit().await?;
            return Ok(());
        };
        let next = version + 1;
        let record = if applied == 0 {
            "CREATE TABLE sigil_schema (\
                 id INTEGER PRIMARY KEY CHECK (id = 1), \
                 version INTEGER NOT NULL); \
             INSERT INTO sigil_schema (id, version) VALUES (1, 1);"
                .to_string()
        } else {
            format!("UPDATE sigil_schema SET version = {next} WHERE id = 1;")
        };
        let migration_err = |source| PostgresError::Migration {
            target: target.clone(),
            version: applied + 1,
            source,
        };
        tx.batch_execute(sql).await.map_err(migration_err)?;
        tx.batch_execute(&record).await.map_err(migration_err)?;
        tx.commit().await?;
        tracing::info!(target = %target, version = next, "applied datastore schema migration");
    }
}
