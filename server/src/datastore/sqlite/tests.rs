//! Tests of the SQLite backend: the conformance suite of `datastore/conformance.rs` on a
//! temporary file (`mod conformance`), then what only SQLite has: file creation and modes, WAL
//! and durability settings, opening foreign, truncated, damaged or emptied files, schema
//! migrations, rows corrupted behind the datastore's back, query plans, lock behaviour, and
//! acknowledged writes surviving `kill -9`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, TransactionBehavior};
use sigil::TrustDomain;

use super::entries::{reg_key, reg_key_text, FilterSql};
use super::{lock, map_err, migrations, open_connection, prepare_file, Expect, SqliteDatastore};
use crate::datastore::conformance::{
    agent, bundle, create_all, entry, federated, id, sels, token, TestResult, TestStore,
};
use crate::datastore::{Datastore, DatastoreError, EntryFilter, SelectorMatch};

/// A SQLite file in a temporary directory (removed on drop), created by the first open.
struct TmpStore {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

#[async_trait]
impl TestStore for TmpStore {
    async fn open(&self) -> TestResult<Arc<dyn Datastore>> {
        Ok(Arc::new(SqliteDatastore::open(&self.path).await?))
    }
}

/// A store whose file does not exist yet, in a directory that does not either.
async fn tmp_store() -> TestResult<TmpStore> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("data/datastore.sqlite3");
    Ok(TmpStore { _dir: dir, path })
}

mod conformance {
    crate::datastore::conformance::datastore_conformance!(super::tmp_store);
}

/// An open datastore on a new file in a temporary directory.
async fn open_tmp() -> TestResult<(tempfile::TempDir, SqliteDatastore)> {
    let dir = tempfile::tempdir()?;
    let ds = SqliteDatastore::open(&dir.path().join("data/datastore.sqlite3")).await?;
    Ok((dir, ds))
}

#[tokio::test]
async fn file_modes_and_settings() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("new/sub/ds.sqlite3");
    let ds = SqliteDatastore::open(&path).await?;
    let mode = |p: &Path| -> TestResult<u32> { Ok(fs::metadata(p)?.permissions().mode() & 0o777) };
    assert_eq!(mode(&path)?, 0o600);
    assert_eq!(mode(&dir.path().join("new/sub"))?, 0o700);
    assert_eq!(mode(&dir.path().join("new"))?, 0o700);
    assert_eq!(ds.path(), path);
    create_all(&ds, vec![entry("/a", "/p", &["t:1"])]).await?;
    assert_eq!(mode(&dir.path().join("new/sub/ds.sqlite3-wal"))?, 0o600);
    // An empty path is an error value, not a panic.
    assert!(prepare_file(Path::new("")).is_err());
    let conn = lock(&ds.inner.writer);
    let get = |p: &str| -> TestResult<String> {
        Ok(conn
            .query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, Value>(0))
            .map(|v| format!("{v:?}"))?)
    };
    assert_eq!(get("journal_mode")?, "Text(\"wal\")");
    assert_eq!(get("synchronous")?, "Integer(2)"); // FULL
    assert_eq!(get("foreign_keys")?, "Integer(1)");
    assert_eq!(
        get("user_version")?,
        format!("Integer({})", migrations::MIGRATIONS.len())
    );
    Ok(())
}

#[test]
fn migrations_are_versioned_and_idempotent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ds.sqlite3");
    let version = |p: &Path| -> TestResult<i64> {
        Ok(Connection::open(p)?.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    };
    drop(SqliteDatastore::open_blocking(&path)?);
    assert_eq!(version(&path)?, migrations::MIGRATIONS.len() as i64);
    drop(SqliteDatastore::open_blocking(&path)?);
    assert_eq!(version(&path)?, migrations::MIGRATIONS.len() as i64);

    // A later migration applies on top; a failing one rolls back completely.
    let known = migrations::MIGRATIONS.len();
    let mut conn = open_connection(&path)?;
    let mut extra = migrations::MIGRATIONS.to_vec();
    extra.push("CREATE TABLE extra (x INTEGER) STRICT;");
    migrations::migrate(&mut conn, &path, &extra)?;
    assert_eq!(version(&path)?, known as i64 + 1);
    let mut broken = extra.clone();
    broken.push("CREATE TABLE half (x INTEGER); THIS IS NOT SQL;");
    let err = migrations::migrate(&mut conn, &path, &broken).expect_err("broken migration");
    assert!(
        err.to_string()
            .contains(&format!("migration {}", known + 2)),
        "{err}"
    );
    assert_eq!(version(&path)?, known as i64 + 1);
    let half: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'half'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(half, 0, "the failed migration's DDL was rolled back");
    drop(conn);

    // This code knows only `known` versions: the file is now "newer" and refused.
    let err = SqliteDatastore::open_blocking(&path).expect_err("newer schema");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("schema version {}", known + 1)) && msg.contains("newer"),
        "{msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    Ok(())
}

#[test]
fn foreign_sqlite_database_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("other.db");
    Connection::open(&path)?
        .execute_batch("CREATE TABLE entries (x); INSERT INTO entries VALUES (1);")?;
    let err = SqliteDatastore::open_blocking(&path).expect_err("foreign database");
    assert!(
        err.to_string().contains("not a valid Sigil database"),
        "{err}"
    );
    // And it was not modified.
    let n: i64 = Connection::open(&path)?.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!(n, 0);
    Ok(())
}

#[test]
fn non_sqlite_and_truncated_files_are_errors_not_panics() -> TestResult {
    let dir = tempfile::tempdir()?;
    let text = dir.path().join("text.sqlite3");
    fs::write(
        &text,
        "this is not a database, it is a text file\n".repeat(200),
    )?;
    let err = SqliteDatastore::open_blocking(&text).expect_err("text file");
    let msg = err.to_string();
    assert!(matches!(err, DatastoreError::Corrupt(_)), "{err:?}");
    assert!(
        msg.contains(&text.display().to_string()) && msg.contains("not a valid Sigil database"),
        "{msg}"
    );
    assert!(msg.contains("backup"), "{msg}");

    // A real database, cut short at several points.
    let good = dir.path().join("good.sqlite3");
    {
        let ds = SqliteDatastore::open_blocking(&good)?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        rt.block_on(async {
            let batch = (0..300)
                .map(|i| entry(&format!("/w/{i}"), "/p", &[&format!("t:{i}")]))
                .collect();
            create_all(&ds, batch).await
        })?;
    }
    let bytes = fs::read(&good)?;
    assert!(bytes.len() > 8192);
    for cut in [10, 100, 4096 + 10, bytes.len() / 2] {
        let p = dir.path().join(format!("cut{cut}.sqlite3"));
        fs::write(&p, &bytes[..cut])?;
        // Opening may fail or succeed (SQLite reads lazily); using it must not panic, and any
        // error is an error value.
        match SqliteDatastore::open_blocking(&p) {
            Err(e) => assert!(matches!(e, DatastoreError::Corrupt(_)), "cut {cut}: {e:?}"),
            Ok(ds) => {
                let rt = tokio::runtime::Builder::new_current_thread().build()?;
                let r = rt.block_on(async {
                    ds.list_entries(&EntryFilter::default(), 10_000, None).await
                });
                if let Ok(page) = r {
                    assert!(page.items.len() <= 300);
                }
            }
        }
    }
    // A directory where the file should be.
    let d = dir.path().join("adir");
    fs::create_dir(&d)?;
    assert!(SqliteDatastore::open_blocking(&d).is_err());
    Ok(())
}

/// A database with 300 entries (several pages), closed (checkpointed: no WAL left).
fn filled_database(path: &Path) -> TestResult {
    let ds = SqliteDatastore::open_blocking(path)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async {
        let batch = (0..300)
            .map(|i| entry(&format!("/w/{i}"), "/p", &[&format!("t:{i}")]))
            .collect();
        create_all(&ds, batch).await
    })?;
    drop(ds);
    assert!(
        !path.with_extension("sqlite3-wal").exists(),
        "WAL checkpointed"
    );
    Ok(())
}

#[test]
fn damaged_files_are_refused_at_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.sqlite3");
    filled_database(&good)?;
    let bytes = fs::read(&good)?;
    let page = 4096;
    assert!(bytes.len() >= 8 * page, "{} bytes", bytes.len());
    // The good file passes (and keeps passing after a reopen).
    drop(SqliteDatastore::open_blocking(&good)?);

    let mut damaged = Vec::new();
    // Cut short: the header promises pages that are gone.
    let cut = dir.path().join("cut.sqlite3");
    fs::write(&cut, &bytes[..bytes.len() / 2])?;
    damaged.push(cut);
    // A b-tree page in the middle overwritten with garbage.
    let mut garbled = bytes.clone();
    let middle = (bytes.len() / page / 2) * page;
    for (i, b) in garbled[middle..middle + page].iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    let garbage = dir.path().join("garbage.sqlite3");
    fs::write(&garbage, &garbled)?;
    damaged.push(garbage);
    for path in damaged {
        let before = fs::read(&path)?;
        let err = SqliteDatastore::open_blocking(&path).expect_err("damaged file opened");
        let msg = err.to_string();
        assert!(matches!(err, DatastoreError::Corrupt(_)), "{err:?}");
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains("damaged")
                && msg.contains("backup"),
            "{msg}"
        );
        assert!(msg.len() < 2048, "{msg}");
        assert_eq!(fs::read(&path)?, before, "a refused file is left as it was");
    }
    Ok(())
}

#[test]
fn empty_file_is_refused_when_the_server_has_run_before() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Missing: created, whatever is expected.
    let fresh = dir.path().join("fresh.sqlite3");
    drop(SqliteDatastore::open_blocking_with(&fresh, Expect::Data)?);
    assert!(fs::metadata(&fresh)?.len() > 0);

    // A store that held data, now 0 bytes (the WAL and SHM gone with it).
    let lost = dir.path().join("lost.sqlite3");
    filled_database(&lost)?;
    fs::write(&lost, b"")?;
    let _ = fs::remove_file(lost.with_extension("sqlite3-shm"));
    let err = SqliteDatastore::open_blocking_with(&lost, Expect::Data).expect_err("empty");
    let msg = err.to_string();
    assert!(matches!(err, DatastoreError::Corrupt(_)), "{err:?}");
    assert!(
        msg.contains(&lost.display().to_string())
            && msg.contains("empty (0 bytes)")
            && msg.contains("backup")
            && msg.contains("-wal"),
        "{msg}"
    );
    assert_eq!(fs::metadata(&lost)?.len(), 0, "left as it was");
    // Nothing says data should be there (a first start that stopped after creating the
    // file): it becomes a new database.
    let ds = SqliteDatastore::open_blocking_with(&lost, Expect::Any)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    assert_eq!(rt.block_on(ds.count_entries(&EntryFilter::default()))?, 0);
    drop(ds);
    // Now a valid (empty) database: opened when data is expected too.
    drop(SqliteDatastore::open_blocking_with(&lost, Expect::Data)?);
    Ok(())
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() -> TestResult {
    let (_dir, ds) = open_tmp().await?;
    let created = create_all(
        &ds,
        vec![entry("/a", "/p", &["t:1"]), entry("/b", "/p", &["t:2"])],
    )
    .await?;
    ds.upsert_agent(agent("/agent/1")).await?;
    ds.set_bundle(bundle(&[b"root"], "[]")).await?;
    let raw = Connection::open(ds.path())?;
    let corruptions = [
        "UPDATE entries SET spiffe_id = 'not an id' WHERE seq = 1",
        "UPDATE entries SET dns_names = '{' WHERE seq = 1",
        "UPDATE entries SET federates_with = '[\"BAD\"]' WHERE seq = 1",
        "UPDATE entries SET x509_ttl = -5 WHERE seq = 1",
        "UPDATE entries SET selector_count = 7 WHERE seq = 1",
        "UPDATE entry_selectors SET value = ' padded' WHERE entry_seq = 1",
    ];
    for sql in corruptions {
        let tx = raw.unchecked_transaction()?;
        tx.execute(sql, [])?;
        tx.commit()?;
        assert!(
            matches!(
                ds.get_entry(&created[0].id).await,
                Err(DatastoreError::Corrupt(_))
            ),
            "{sql}"
        );
        assert!(
            matches!(
                ds.list_entries(&EntryFilter::default(), 10, None).await,
                Err(DatastoreError::Corrupt(_))
            ),
            "{sql}"
        );
        // The other entry is still readable.
        assert!(ds.get_entry(&created[1].id).await?.is_some());
        // Restore by rewriting the entry.
        let tx = raw.unchecked_transaction()?;
        tx.execute_batch(
            "UPDATE entries SET spiffe_id = 'spiffe://example.org/a', dns_names = '[]', \
             federates_with = '[]', x509_ttl = NULL, selector_count = 1 WHERE seq = 1; \
             UPDATE entry_selectors SET value = '1' WHERE entry_seq = 1;",
        )?;
        tx.commit()?;
        assert_eq!(
            ds.get_entry(&created[0].id).await?,
            Some(created[0].clone())
        );
    }
    raw.execute("UPDATE agents SET selectors = 'nope'", [])?;
    assert!(matches!(
        ds.get_agent(&id("/agent/1")).await,
        Err(DatastoreError::Corrupt(_))
    ));
    assert!(matches!(
        ds.list_agents(10, None).await,
        Err(DatastoreError::Corrupt(_))
    ));
    raw.execute("UPDATE bundles SET x509_roots = '[\"!!\"]'", [])?;
    let td = TrustDomain::new("example.org")?;
    assert!(matches!(
        ds.get_bundle(&td).await,
        Err(DatastoreError::Corrupt(_))
    ));
    assert!(matches!(
        ds.set_bundle(bundle(&[b"root"], "[]")).await,
        Err(DatastoreError::Corrupt(_))
    ));
    raw.execute("DELETE FROM revision", [])?;
    assert!(matches!(
        ds.create_entries(vec![entry("/c", "/p", &["t:3"])]).await,
        Err(DatastoreError::Corrupt(_))
    ));
    Ok(())
}

#[test]
fn version_2_agents_are_migrated_without_a_pending_svid() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ds.sqlite3");
    {
        prepare_file(&path)?;
        let mut conn = open_connection(&path)?;
        migrations::migrate(&mut conn, &path, &migrations::MIGRATIONS[..2])?;
        conn.execute(
            "INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, \
             created_at, updated_at) VALUES ('spiffe://example.org/agent/1', 'join_token', \
             '0a1b', 1900000000, 1, 1)",
            [],
        )?;
    }
    let ds = SqliteDatastore::open_blocking(&path)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let got = rt.block_on(ds.get_agent(&id("/agent/1")))?.ok_or("agent")?;
    assert_eq!(got.x509_svid_serial, "0a1b");
    assert_eq!(got.new_x509_svid, None);
    Ok(())
}

#[test]
fn version_1_database_is_migrated_and_keeps_its_data() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ds.sqlite3");
    // A database as the previous release left it: schema version 1, with data.
    {
        prepare_file(&path)?;
        let mut conn = open_connection(&path)?;
        migrations::migrate(&mut conn, &path, &migrations::MIGRATIONS[..1])?;
        conn.execute(
            "INSERT INTO bundles (trust_domain, x509_roots, jwt_keys_json, sequence, \
             updated_at) VALUES ('example.org', '[]', '[]', 4, 0)",
            [],
        )?;
    }
    let ds = SqliteDatastore::open_blocking(&path)?;
    let version: i64 =
        Connection::open(&path)?.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!(version, migrations::MIGRATIONS.len() as i64);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async {
        let own = ds.get_bundle(&TrustDomain::new("example.org")?).await?;
        assert_eq!(own.map(|b| b.sequence), Some(4));
        assert!(ds.list_federated_bundles().await?.is_empty());
        ds.set_federated_bundle(federated("other.org", &[b"r"], "[]"))
            .await?;
        assert_eq!(ds.list_federated_bundles().await?.len(), 1);
        TestResult::Ok(())
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_wait_for_a_held_write_lock() -> TestResult {
    let (_dir, ds) = open_tmp().await?;
    create_all(&ds, vec![entry("/a", "/p", &["t:1"])]).await?;
    // Another connection holds the write lock with uncommitted changes.
    let mut other = Connection::open(ds.path())?;
    let tx = other.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("UPDATE entries SET hint = 'uncommitted'", [])?;
    let start = std::time::Instant::now();
    let page = ds.list_entries(&EntryFilter::default(), 10, None).await?;
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(page.items[0].hint, "", "readers see committed data only");
    drop(tx);
    Ok(())
}

#[test]
fn selector_queries_use_the_indexes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ds = SqliteDatastore::open_blocking(&dir.path().join("ds.sqlite3"))?;
    let conn = lock(&ds.inner.writer);
    let modes = [
        SelectorMatch::Exact,
        SelectorMatch::Subset,
        SelectorMatch::Superset,
        SelectorMatch::Any,
    ];
    let sets: [&[&str]; 2] = [&["t:1"], &["t:1", "t:2"]];
    for (mode, given) in modes
        .iter()
        .flat_map(|m| sets.iter().map(move |g| (*m, *g)))
    {
        let filter = EntryFilter {
            selectors: Some((sels(given), mode)),
            ..Default::default()
        };
        let f = FilterSql::build(&filter).ok_or("filter")?;
        let sql = format!(
            "EXPLAIN QUERY PLAN {}SELECT e.seq FROM entries e WHERE {} AND e.seq > 0 ORDER BY e.seq LIMIT 10",
            f.with,
            f.conds.join(" AND ")
        );
        let mut plan = Vec::new();
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(params_from_iter(f.params))?;
        while let Some(r) = rows.next()? {
            plan.push(r.get::<_, String>(3)?);
        }
        let plan = plan.join("\n");
        assert!(
            plan.contains("entry_selectors_type_value"),
            "{mode:?} does not use the selector index:\n{plan}"
        );
        assert!(
            !plan
                .lines()
                .any(|l| l.starts_with("SCAN es") || l.starts_with("SCAN entry_selectors")),
            "{mode:?} scans all selectors:\n{plan}"
        );
    }
    Ok(())
}

#[test]
fn reg_key_is_canonical() {
    let a = entry("/a", "/p", &["b:2", "a:1"]);
    let b = entry("/a", "/p", &["a:1", "b:2", "a:1"]);
    assert_eq!(reg_key(&a), reg_key(&b));
    assert_eq!(
        reg_key_text(&a),
        "spiffe://example.org/a\nspiffe://example.org/p\na:1\nb:2"
    );
    assert_eq!(reg_key(&a).len(), 32);
    // "a:b:c" (type a) differs from a type "a:b"… which is not a valid type anyway.
    assert_ne!(
        reg_key(&entry("/a", "/p", &["a:b:c"])),
        reg_key(&entry("/a", "/p", &["a:b"]))
    );
}

/// Half a pending agent SVID (a serial without its expiry) is corruption, not a panic.
#[tokio::test]
async fn half_a_pending_agent_svid_is_corrupt() -> TestResult {
    let (_dir, ds) = open_tmp().await?;
    ds.upsert_agent(agent("/agent/1")).await?;
    Connection::open(ds.path())?.execute("UPDATE agents SET new_serial = '01'", [])?;
    assert!(matches!(
        ds.get_agent(&id("/agent/1")).await,
        Err(DatastoreError::Corrupt(_))
    ));
    Ok(())
}

/// The stored form of a join token is its SHA-256, not the token.
#[tokio::test]
async fn join_tokens_are_stored_as_hashes() -> TestResult {
    let (_dir, ds) = open_tmp().await?;
    let raw = Connection::open(ds.path())?;
    ds.create_join_token(token("secret-token", 10)).await?;
    let stored: String = raw.query_row("SELECT token_sha256 FROM join_tokens", [], |r| r.get(0))?;
    assert_ne!(stored, "secret-token");
    assert_eq!(stored.len(), 64);
    assert_eq!(
        stored,
        hex::encode(ring::digest::digest(&ring::digest::SHA256, b"secret-token"))
    );
    Ok(())
}

/// A corrupt federated bundle row is an error value, not a panic.
#[tokio::test]
async fn corrupt_federated_bundle_rows_are_errors() -> TestResult {
    let (_dir, ds) = open_tmp().await?;
    ds.set_federated_bundle(federated("aaa.org", &[], r#"[{"kid":"k"}]"#))
        .await?;
    ds.set_federated_bundle(federated("other.org", &[b"o3"], "[]"))
        .await?;
    let raw = Connection::open(ds.path())?;
    raw.execute(
        "UPDATE federated_bundles SET trust_domain = 'BAD NAME' WHERE trust_domain = 'aaa.org'",
        [],
    )?;
    assert!(matches!(
        ds.list_federated_bundles().await,
        Err(DatastoreError::Corrupt(_))
    ));
    raw.execute("UPDATE federated_bundles SET x509_roots = '[\"!!\"]'", [])?;
    assert!(matches!(
        ds.get_federated_bundle(&TrustDomain::new("other.org")?)
            .await,
        Err(DatastoreError::Corrupt(_))
    ));
    Ok(())
}

/// How SQLite failures are classified.
mod error_kinds {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// A lock another connection holds past the busy timeout is `Busy`: transient, and the
    /// admin API answers Unavailable (clients retry); any other SQLite failure is neither.
    #[test]
    fn a_held_lock_is_busy_and_transient_other_failures_are_not() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("locks.db");
        let holder = Connection::open(&path)?;
        holder.execute_batch("CREATE TABLE t (x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")?;
        let other = Connection::open(&path)?;
        other.busy_timeout(Duration::ZERO)?;
        let busy = map_err(
            other
                .execute("INSERT INTO t VALUES (2)", [])
                .err()
                .ok_or("the write succeeded despite the lock")?,
        );
        assert!(matches!(busy, DatastoreError::Busy(_)), "{busy:?}");
        assert!(busy.is_transient());
        assert!(busy.to_string().contains("try again"), "{busy}");
        assert_eq!(
            crate::api::admin::ds_status(busy).code(),
            tonic::Code::Unavailable
        );

        let missing = map_err(
            other
                .execute("INSERT INTO no_such_table VALUES (1)", [])
                .err()
                .ok_or("insert into a missing table succeeded")?,
        );
        assert!(matches!(missing, DatastoreError::Sqlite(_)), "{missing:?}");
        assert!(!missing.is_transient());
        assert!(std::error::Error::source(&missing).is_some());
        assert_eq!(
            crate::api::admin::ds_status(missing).code(),
            tonic::Code::Internal
        );
        assert!(!DatastoreError::Corrupt("x".into()).is_transient());
        assert!(!DatastoreError::NotFound("entry".into()).is_transient());
        Ok(())
    }
}

/// Durability across `kill -9`: a child process (this test binary, re-executed) creates entries
/// and prints each acknowledged id; the parent kills it mid-stream and checks that every
/// acknowledged entry is in the database.
mod kill9 {
    use super::*;
    use sigil::entry::RegistrationEntry;
    use sigil::{Selector, SpiffeId};
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    const ENV: &str = "SIGIL_DS_KILL9_PATH";
    const CHILD: &str = "datastore::sqlite::tests::kill9::child_writer";

    /// The child: runs only when re-executed by `acknowledged_writes_survive_kill_9`.
    #[test]
    #[ignore = "helper process for acknowledged_writes_survive_kill_9"]
    fn child_writer() -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(path) = std::env::var_os(ENV) else {
            return Ok(());
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async {
            let ds = SqliteDatastore::open(Path::new(&path)).await?;
            let mut out = std::io::stdout().lock();
            for i in 0..100_000 {
                let e = RegistrationEntry::new(
                    SpiffeId::parse(&format!("spiffe://example.org/w/{i}"))?,
                    SpiffeId::parse("spiffe://example.org/p")?,
                    [Selector::parse("t:1")?].into_iter().collect(),
                );
                for r in ds.create_entries(vec![e]).await? {
                    writeln!(out, "ACK {}", r?.id)?;
                }
                out.flush()?;
            }
            Ok(())
        })
    }

    #[tokio::test]
    async fn acknowledged_writes_survive_kill_9(
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ds.sqlite3");
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                CHILD,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("child stdout")?;
        let acked = tokio::task::spawn_blocking(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("ACK ") {
                    acked.push(id.to_string());
                    if acked.len() == 50 {
                        break;
                    }
                }
            }
            acked
        })
        .await?;
        child.kill()?; // SIGKILL, most likely in the middle of the next create
        child.wait()?;
        assert_eq!(acked.len(), 50, "the child stopped early");
        let ds = SqliteDatastore::open(&path).await?;
        for id in &acked {
            assert!(
                ds.get_entry(id).await?.is_some(),
                "acknowledged entry {id} lost"
            );
        }
        assert!(ds.count_entries(&EntryFilter::default()).await? >= 50);
        Ok(())
    }
}
