//! Tests of the PostgreSQL datastore against a real server (`sigil_testkit::postgres`: a
//! database of its own per test). What several servers sharing one database must get right is
//! tested with two datastores (two pools, as two servers have) on the same database: concurrent
//! migrations, a join token raced through both, eviction racing renewal, reopening.

use std::sync::Arc;

use sigil::entry::RegistrationEntry;
use sigil::{Selector, SelectorSet, SpiffeId, TrustDomain};
use sigil_testkit::postgres::TestDatabase;

use super::*;
use crate::datastore::{Change, SelectorMatch};

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://example.org{path}")).expect("test SPIFFE ID")
}

fn sels(v: &[&str]) -> SelectorSet {
    v.iter()
        .map(|s| Selector::parse(s).expect("test selector"))
        .collect()
}

fn entry(path: &str, parent: &str, selectors: &[&str]) -> RegistrationEntry {
    RegistrationEntry::new(id(path), id(parent), sels(selectors))
}

fn agent(path: &str, serial: &str) -> AttestedAgent {
    AttestedAgent {
        spiffe_id: id(path),
        attestation_type: "join_token".into(),
        x509_svid_serial: serial.into(),
        x509_svid_expires_at: unix_now() + 3600,
        new_x509_svid: None,
        banned: false,
        selectors: sels(&["join_token:x"]),
        created_at: 0,
        updated_at: 0,
    }
}

/// A database of its own for one conformance test; every open is a new pool on it.
struct PgStore {
    db: TestDatabase,
}

#[async_trait::async_trait]
impl crate::datastore::conformance::TestStore for PgStore {
    async fn open(&self) -> TestResult<Arc<dyn Datastore>> {
        Ok(Arc::new(PostgresDatastore::open(self.db.url()).await?))
    }
}

async fn pg_store() -> TestResult<PgStore> {
    Ok(PgStore {
        db: TestDatabase::create(),
    })
}

mod conformance {
    crate::datastore::conformance::datastore_conformance!(super::pg_store);
}

async fn open(db: &TestDatabase) -> TestResult<PostgresDatastore> {
    Ok(PostgresDatastore::open(db.url()).await?)
}

async fn create_all(
    ds: &PostgresDatastore,
    entries: Vec<RegistrationEntry>,
) -> TestResult<Vec<RegistrationEntry>> {
    Ok(ds
        .create_entries(entries)
        .await?
        .into_iter()
        .collect::<Result<Vec<_>>>()?)
}

fn paths(items: &[RegistrationEntry]) -> Vec<String> {
    items
        .iter()
        .map(|e| e.spiffe_id.path().to_string())
        .collect()
}

#[tokio::test]
async fn entries_round_trip_with_filters_pages_and_changes() -> TestResult {
    let db = TestDatabase::create();
    let ds = open(&db).await?;
    let mut web = entry("/web", "/agent", &["unix:uid:1000", "unix:gid:1000"]);
    web.x509_svid_ttl = Some(std::time::Duration::from_secs(600));
    web.dns_names = vec!["web.example.org".into()];
    web.federates_with = vec![TrustDomain::new("other.org")?];
    web.admin = true;
    web.hint = "external \"web\" ✓".into();
    let created = create_all(
        &ds,
        vec![
            web.clone(),
            entry("/a", "/agent", &["t:a"]),
            entry("/ab", "/agent", &["t:a", "t:b"]),
            entry("/none", "/agent", &[]),
        ],
    )
    .await?;
    assert_eq!(
        created.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(created[0].same_registration(&web));
    assert_eq!(
        ds.get_entry(&created[0].id).await?.as_ref(),
        Some(&created[0])
    );

    // The same registration again, within a batch and against the stored one.
    let again = ds
        .create_entries(vec![entry("/a", "/agent", &["t:a"]), web.clone()])
        .await?;
    assert!(
        matches!(&again[0], Err(DatastoreError::AlreadyExists(id)) if *id == created[1].id),
        "{again:?}"
    );
    assert!(matches!(&again[1], Err(DatastoreError::AlreadyExists(_))));

    let filter = |s: &[&str], mode| EntryFilter {
        selectors: Some((sels(s), mode)),
        ..Default::default()
    };
    let list = |f: EntryFilter| {
        let ds = ds.clone();
        async move { ds.list_entries(&f, 0, None).await.map(|p| paths(&p.items)) }
    };
    assert_eq!(list(filter(&["t:a"], SelectorMatch::Exact)).await?, ["/a"]);
    assert_eq!(
        list(filter(&["t:a", "t:b"], SelectorMatch::Subset)).await?,
        ["/a", "/ab", "/none"]
    );
    assert_eq!(
        list(filter(&["t:a"], SelectorMatch::Superset)).await?,
        ["/a", "/ab"]
    );
    assert_eq!(
        list(filter(&["t:b", "unix:uid:1000"], SelectorMatch::Any)).await?,
        ["/web", "/ab"]
    );
    assert_eq!(
        list(filter(&[], SelectorMatch::Any)).await?,
        Vec::<String>::new()
    );
    assert_eq!(
        ds.count_entries(&EntryFilter {
            parent_id: Some(id("/agent")),
            ..Default::default()
        })
        .await?,
        4
    );

    // Pages of 3: no gaps, no duplicates; tokens of another kind are refused.
    let first = ds.list_entries(&EntryFilter::default(), 3, None).await?;
    let token = first.next_token.ok_or("a second page")?;
    let second = ds
        .list_entries(&EntryFilter::default(), 3, Some(&token))
        .await?;
    assert_eq!(paths(&first.items), ["/web", "/a", "/ab"]);
    assert_eq!(paths(&second.items), ["/none"]);
    assert_eq!(second.next_token, None);
    assert!(matches!(
        ds.list_entries(&EntryFilter::default(), 3, Some("a1"))
            .await,
        Err(DatastoreError::InvalidPageToken(_))
    ));

    // Update and delete take the next revisions; the delete leaves a tombstone.
    let mut changed = created[1].clone();
    changed.selectors = sels(&["t:z"]);
    let updated = ds.update_entry(changed).await?;
    assert_eq!(updated.revision, 5);
    assert_eq!(updated.created_at, created[1].created_at);
    assert_eq!(
        list(filter(&["t:a"], SelectorMatch::Exact)).await?,
        Vec::<String>::new()
    );
    let mut clash = created[2].clone();
    clash.selectors = sels(&["t:z"]);
    clash.spiffe_id = id("/a");
    assert!(matches!(
        ds.update_entry(clash).await,
        Err(DatastoreError::AlreadyExists(other)) if other == created[1].id
    ));
    let deleted = ds.delete_entry(&created[3].id).await?;
    assert_eq!(deleted, created[3]);
    assert!(matches!(
        ds.delete_entry(&created[3].id).await,
        Err(DatastoreError::NotFound(_))
    ));
    let changes = ds.entry_changes_since(4).await?;
    assert_eq!(changes.revision, 6);
    assert_eq!(paths(&changes.upserted), ["/a"]);
    assert_eq!(changes.removed, [created[3].id.clone()]);
    assert!(ds.entry_changes_since(6).await?.upserted.is_empty());
    Ok(())
}

#[tokio::test]
async fn agents_join_tokens_and_bundles() -> TestResult {
    let db = TestDatabase::create();
    let ds = open(&db).await?;
    ds.upsert_agent(agent("/sigil/agent/1", "01")).await?;
    ds.upsert_agent(agent("/sigil/agent/2", "02")).await?;
    assert_eq!(ds.count_agents().await?, 2);
    let stored = ds
        .get_agent(&id("/sigil/agent/1"))
        .await?
        .ok_or("agent 1")?;
    assert_eq!(stored.selectors, sels(&["join_token:x"]));
    let page = ds.list_agents(1, None).await?;
    assert_eq!(page.items.len(), 1);
    let rest = ds.list_agents(1, page.next_token.as_deref()).await?;
    assert_eq!(rest.items[0].spiffe_id, id("/sigil/agent/2"));

    // Renewal beside the current SVID, then promotion; a ban survives a re-attestation.
    let new = NewAgentSvid {
        serial: "11".into(),
        expires_at: unix_now() + 7200,
    };
    assert!(
        !ds.set_agent_new_svid(&id("/sigil/agent/1"), "99", new.clone())
            .await?
    );
    assert!(
        ds.set_agent_new_svid(&id("/sigil/agent/1"), "01", new.clone())
            .await?
    );
    assert!(ds.promote_agent_svid(&id("/sigil/agent/1"), "11").await?);
    assert!(!ds.promote_agent_svid(&id("/sigil/agent/1"), "11").await?);
    let promoted = ds
        .get_agent(&id("/sigil/agent/1"))
        .await?
        .ok_or("agent 1")?;
    assert_eq!(promoted.x509_svid_serial, "11");
    assert_eq!(promoted.new_x509_svid, None);
    ds.set_agent_banned(&id("/sigil/agent/2"), true).await?;
    ds.upsert_agent(agent("/sigil/agent/2", "03")).await?;
    assert!(
        ds.get_agent(&id("/sigil/agent/2"))
            .await?
            .ok_or("agent 2")?
            .banned
    );
    ds.delete_agent(&id("/sigil/agent/2")).await?;
    assert!(matches!(
        ds.delete_agent(&id("/sigil/agent/2")).await,
        Err(DatastoreError::NotFound(_))
    ));

    let now = unix_now();
    let token = |t: &str, expires_at| JoinToken {
        token: t.into(),
        expires_at,
        spiffe_id: Some(id("/node")),
    };
    ds.create_join_token(token("live", now + 60)).await?;
    ds.create_join_token(token("stale", now - 1)).await?;
    assert!(matches!(
        ds.create_join_token(token("live", now + 60)).await,
        Err(DatastoreError::JoinTokenCollision)
    ));
    assert_eq!(
        ds.consume_join_token("live", now).await?,
        token("live", now + 60)
    );
    assert!(matches!(
        ds.consume_join_token("live", now).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        ds.consume_join_token("stale", now).await,
        Err(DatastoreError::Expired)
    ));
    assert_eq!(db.psql("SELECT COUNT(*) FROM join_tokens").trim(), "0");

    let td = TrustDomain::new("example.org")?;
    let bundle = |roots: &[&[u8]], jwks: &str| StoredBundle {
        trust_domain: td.clone(),
        x509_roots: roots.iter().map(|r| r.to_vec()).collect(),
        jwt_keys_json: jwks.into(),
        sequence: 0,
    };
    assert_eq!(ds.set_bundle(bundle(&[b"r1"], "[]")).await?.sequence, 1);
    assert_eq!(ds.set_bundle(bundle(&[b"r1"], "[ ]")).await?.sequence, 1);
    assert_eq!(
        ds.set_bundle(bundle(&[b"r1", b"r2"], "[]")).await?.sequence,
        2
    );
    assert_eq!(
        ds.get_bundle(&td).await?.ok_or("bundle")?.x509_roots,
        [b"r1".to_vec(), b"r2".to_vec()]
    );
    let fed = |name: &str| StoredBundle {
        trust_domain: TrustDomain::new(name).expect("test trust domain"),
        ..bundle(&[b"f"], "[]")
    };
    ds.set_federated_bundle(fed("b.org")).await?;
    ds.set_federated_bundle(fed("b-a.org")).await?;
    let listed: Vec<String> = ds
        .list_federated_bundles()
        .await?
        .iter()
        .map(|b| b.trust_domain.name().to_string())
        .collect();
    assert_eq!(listed, ["b-a.org", "b.org"]);
    assert_eq!(
        ds.delete_federated_bundle(&fed("b.org").trust_domain)
            .await?
            .sequence,
        1
    );
    assert!(ds
        .get_federated_bundle(&fed("b.org").trust_domain)
        .await?
        .is_none());
    assert!(ds.get_bundle(&td).await?.is_some(), "own bundle kept apart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_starting_at_once_migrate_once() -> TestResult {
    let db = TestDatabase::create();
    let opens = (0..6).map(|_| {
        let url = db.url().to_string();
        tokio::spawn(async move { PostgresDatastore::open(&url).await })
    });
    let stores = futures::future::try_join_all(opens).await?;
    let stores = stores.into_iter().collect::<Result<Vec<_>>>()?;
    assert_eq!(
        db.psql("SELECT version FROM sigil_schema").trim(),
        migrations::MIGRATIONS.len().to_string()
    );
    assert_eq!(db.psql("SELECT COUNT(*) FROM revision").trim(), "1");
    // And each works on the same data.
    create_all(&stores[0], vec![entry("/x", "/p", &[])]).await?;
    assert_eq!(stores[5].count_entries(&EntryFilter::default()).await?, 1);
    Ok(())
}

#[tokio::test]
async fn data_survives_a_reopen_and_a_newer_or_foreign_schema_is_refused() -> TestResult {
    let db = TestDatabase::create();
    let ds = open(&db).await?;
    let created = create_all(&ds, vec![entry("/kept", "/p", &["t:a"])]).await?;
    ds.upsert_agent(agent("/sigil/agent/kept", "01")).await?;
    drop(ds);
    let ds = open(&db).await?;
    assert_eq!(
        ds.get_entry(&created[0].id).await?.as_ref(),
        Some(&created[0])
    );
    assert!(ds.get_agent(&id("/sigil/agent/kept")).await?.is_some());
    // The revision goes on from where it was.
    let next = create_all(&ds, vec![entry("/next", "/p", &[])]).await?;
    assert_eq!(next[0].revision, created[0].revision + 1);
    drop(ds);

    db.psql("UPDATE sigil_schema SET version = 99");
    let err = open(&db).await.expect_err("newer schema");
    let msg = err.to_string();
    assert!(
        msg.contains("has schema version 99") && msg.contains("upgrade"),
        "{msg}"
    );

    let foreign = TestDatabase::create();
    foreign.psql("CREATE TABLE customers (id INT)");
    let err = open(&foreign).await.expect_err("foreign database");
    assert!(err.to_string().contains("is not a Sigil database"), "{err}");
    assert_eq!(
        foreign
            .psql("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'")
            .trim(),
        "1",
        "nothing added to another application's schema"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_raced_through_two_servers_attests_once() -> TestResult {
    let db = TestDatabase::create();
    let a = Arc::new(open(&db).await?);
    let b = Arc::new(open(&db).await?);
    let now = unix_now();
    for round in 0..20 {
        let token = format!("token-{round}");
        a.create_join_token(JoinToken {
            token: token.clone(),
            expires_at: now + 600,
            spiffe_id: None,
        })
        .await?;
        let tasks = [a.clone(), b.clone(), a.clone(), b.clone()].map(|ds| {
            let token = token.clone();
            tokio::spawn(async move { ds.consume_join_token(&token, now).await })
        });
        let mut winners = 0;
        for t in tasks {
            match t.await? {
                Ok(_) => winners += 1,
                Err(DatastoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_racing_renewal_across_two_servers() -> TestResult {
    let db = TestDatabase::create();
    let a = Arc::new(open(&db).await?);
    let b = Arc::new(open(&db).await?);
    for round in 0..20 {
        let path = format!("/sigil/agent/race/{round}");
        a.upsert_agent(agent(&path, "01")).await?;
        let agent_id = id(&path);
        // Server A renews while server B evicts.
        let renew = {
            let (a, agent_id) = (a.clone(), agent_id.clone());
            tokio::spawn(async move {
                a.set_agent_new_svid(
                    &agent_id,
                    "01",
                    NewAgentSvid {
                        serial: "02".into(),
                        expires_at: unix_now() + 3600,
                    },
                )
                .await
            })
        };
        let evict = {
            let (b, agent_id) = (b.clone(), agent_id.clone());
            tokio::spawn(async move { b.delete_agent(&agent_id).await })
        };
        renew.await??;
        evict.await??;
        // Whatever the order, the agent is gone and the renewed SVID cannot be promoted.
        assert!(a.get_agent(&agent_id).await?.is_none(), "round {round}");
        assert!(
            !b.promote_agent_svid(&agent_id, "02").await?,
            "round {round}"
        );

        // Two renewals from the same serial on two servers: one wins, and only its SVID can
        // be promoted.
        a.upsert_agent(agent(&path, "01")).await?;
        let renewals = [(a.clone(), "0a"), (b.clone(), "0b")].map(|(ds, serial)| {
            let agent_id = agent_id.clone();
            tokio::spawn(async move {
                let new = NewAgentSvid {
                    serial: serial.into(),
                    expires_at: unix_now() + 3600,
                };
                ds.set_agent_new_svid(&agent_id, "01", new).await
            })
        });
        let mut ok = Vec::new();
        for r in renewals {
            ok.push(r.await??);
        }
        // Both may record (the later replaces the pending one: the serial is unchanged until
        // a promotion), but exactly one pending SVID is stored and only it promotes.
        assert!(ok.iter().any(|r| *r), "round {round}");
        let pending = a
            .get_agent(&agent_id)
            .await?
            .and_then(|ag| ag.new_x509_svid)
            .ok_or("a pending SVID")?;
        let other = if pending.serial == "0a" { "0b" } else { "0a" };
        assert!(!b.promote_agent_svid(&agent_id, other).await?);
        assert!(a.promote_agent_svid(&agent_id, &pending.serial).await?);
        // After the promotion a renewal from the old serial is refused on either server.
        let stale = NewAgentSvid {
            serial: "0c".into(),
            expires_at: unix_now() + 3600,
        };
        assert!(!b.set_agent_new_svid(&agent_id, "01", stale).await?);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_writes_on_two_servers_take_distinct_revisions_in_commit_order() -> TestResult {
    let db = TestDatabase::create();
    let a = Arc::new(open(&db).await?);
    let b = Arc::new(open(&db).await?);
    let writers = [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(w, ds)| {
            tokio::spawn(async move {
                for i in 0..10 {
                    let e = entry(&format!("/w{w}/{i}"), "/p", &[]);
                    ds.create_entries(vec![e]).await?.remove(0)?;
                }
                Ok::<_, DatastoreError>(())
            })
        });
    // Meanwhile a reader follows the changes: it must never skip a revision.
    let reader = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let mut rev = 0;
            while rev < 40 {
                let changes = b.entry_changes_since(rev).await?;
                for e in &changes.upserted {
                    assert!(e.revision > rev && e.revision <= changes.revision);
                    seen.insert(e.revision);
                }
                rev = changes.revision;
                assert_eq!(
                    seen.len() as i64,
                    rev,
                    "every revision up to the current one was reported"
                );
                tokio::task::yield_now().await;
            }
            Ok::<_, DatastoreError>(seen)
        })
    };
    for w in writers {
        w.await??;
    }
    let seen = reader.await??;
    assert_eq!(seen, (1..=40).collect());
    let page = a.list_entries(&EntryFilter::default(), 0, None).await?;
    let mut revisions: Vec<i64> = page.items.iter().map(|e| e.revision).collect();
    assert_eq!(revisions.len(), 40);
    let in_listing_order = revisions.clone();
    revisions.sort_unstable();
    assert_eq!(in_listing_order, revisions, "listing order is commit order");
    Ok(())
}

#[tokio::test]
async fn connection_errors_name_what_to_check_and_never_the_password() -> TestResult {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir()?;
    // Nothing listens there.
    let err = PostgresDatastore::open(&format!(
        "host={} port=5999 user=sigil password=s3cret-pw dbname=x",
        dir.path().display()
    ))
    .await
    .expect_err("no server");
    let msg = sigil::text::error_chain(&err);
    assert!(
        msg.contains("cannot connect to PostgreSQL")
            && msg.contains("check that the PostgreSQL server is running")
            && msg.contains(&format!("host={}", dir.path().display())),
        "{msg}"
    );
    assert!(!msg.contains("s3cret-pw"), "{msg}");

    // A database that does not exist, a role that does not exist.
    let missing_db = sigil_testkit::postgres::with_dbname(db.url(), "no_such_database");
    let err = PostgresDatastore::open(&missing_db)
        .await
        .expect_err("no such database");
    let msg = sigil::text::error_chain(&err);
    assert!(
        msg.contains("3D000") && msg.contains("the database does not exist"),
        "{msg}"
    );
    let wrong_role = if db.url().starts_with("postgres") {
        // A URL: the role goes into its query (a later key wins).
        let sep = if db.url().contains('?') { '&' } else { '?' };
        format!("{}{sep}user=no_such_role&password=s3cret-pw", db.url())
    } else {
        format!("{} user=no_such_role password=s3cret-pw", db.url())
    };
    let err = PostgresDatastore::open(&wrong_role)
        .await
        .expect_err("no such role");
    let msg = sigil::text::error_chain(&err);
    assert!(
        msg.contains("check the user and password") && !msg.contains("s3cret-pw"),
        "{msg}"
    );

    // A string that does not parse is not echoed.
    let err = PostgresDatastore::open("postgresql://u:s3cret-pw@db:notaport/x")
        .await
        .expect_err("bad port");
    let msg = sigil::text::error_chain(&err);
    assert!(
        msg.contains("does not parse") && !msg.contains("s3cret-pw"),
        "{msg}"
    );
    Ok(())
}

#[tokio::test]
async fn a_lost_server_is_a_transient_error_and_a_corrupt_row_is_corrupt() -> TestResult {
    let db = TestDatabase::create();
    let ds = open(&db).await?;
    ds.upsert_agent(agent("/sigil/agent/1", "01")).await?;
    db.psql("UPDATE agents SET spiffe_id = 'not an id'");
    let err = ds.list_agents(0, None).await.expect_err("corrupt row");
    assert!(matches!(err, DatastoreError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("not an id"), "{err}");

    // The database's connections are cut (as when a server restarts or fails over): a call on
    // a pooled connection that is gone fails as unavailable, and that connection is dropped,
    // so calls work again once the pool has new ones.
    db.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name()
    ));
    let mut failures = 0;
    loop {
        match ds.count_agents().await {
            Ok(n) => {
                assert_eq!(n, 1);
                break;
            }
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                failures += 1;
                assert!(
                    failures <= DEFAULT_MAX_CONNECTIONS,
                    "still failing after every pooled connection was tried: {e}"
                );
            }
        }
    }
    Ok(())
}

/// The next change of `feed` within 10 s.
async fn next_change(feed: &mut ChangeFeed) -> TestResult<Change> {
    tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .map_err(|_| "no change announced within 10 s")?
        .ok_or_else(|| "the change feed stopped".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_server_reach_the_change_feed_of_another() -> TestResult {
    use crate::datastore::conformance::{bundle, federated};
    let db = TestDatabase::create();
    let (a, b) = (open(&db).await?, open(&db).await?);
    let mut feed = b.change_feed().ok_or("PostgreSQL has a change feed")?;
    assert_eq!(next_change(&mut feed).await?, Change::Resync, "listening");

    create_all(&a, vec![entry("/w", "/p", &["t:a"])]).await?;
    assert_eq!(next_change(&mut feed).await?, Change::Entries);
    // Attestation and renewal are no news for sync streams; the entry write after them is the
    // next change.
    let agent_id = id("/sigil/agent/fed");
    a.upsert_agent(agent("/sigil/agent/fed", "01")).await?;
    let renewed = NewAgentSvid {
        serial: "02".into(),
        expires_at: unix_now() + 3600,
    };
    assert!(a.set_agent_new_svid(&agent_id, "01", renewed).await?);
    assert!(a.promote_agent_svid(&agent_id, "02").await?);
    let created = create_all(&a, vec![entry("/w2", "/p", &["t:b"])]).await?;
    assert_eq!(next_change(&mut feed).await?, Change::Entries);
    let mut updated = created[0].clone();
    updated.dns_names = vec!["w2.example.org".into()];
    a.update_entry(updated).await?;
    assert_eq!(next_change(&mut feed).await?, Change::Entries);
    a.delete_entry(&created[0].id).await?;
    assert_eq!(next_change(&mut feed).await?, Change::Entries);

    let agent_change = Change::Agent(agent_id.to_string());
    a.set_agent_banned(&agent_id, true).await?;
    assert_eq!(next_change(&mut feed).await?, agent_change);
    a.set_agent_banned(&agent_id, false).await?;
    assert_eq!(next_change(&mut feed).await?, agent_change);
    a.delete_agent(&agent_id).await?;
    assert_eq!(next_change(&mut feed).await?, agent_change);

    a.create_join_token(JoinToken {
        token: "feed-token".into(),
        expires_at: unix_now() + 600,
        spiffe_id: None,
    })
    .await?;
    assert_eq!(next_change(&mut feed).await?, Change::JoinTokens);
    a.consume_join_token("feed-token", unix_now()).await?;
    assert_eq!(next_change(&mut feed).await?, Change::JoinTokens);

    a.set_bundle(bundle(&[b"root a"], "[]")).await?;
    assert_eq!(
        next_change(&mut feed).await?,
        Change::Bundle("example.org".into())
    );
    // Unchanged content writes nothing, so announces nothing.
    a.set_bundle(bundle(&[b"root a"], "[]")).await?;
    let BundleSwap::Stored(_) = a
        .compare_and_set_bundle(bundle(&[b"root a", b"root b"], "[]"), 1)
        .await?
    else {
        return Err("the swap from the current sequence stores".into());
    };
    assert_eq!(
        next_change(&mut feed).await?,
        Change::Bundle("example.org".into())
    );
    a.set_federated_bundle(federated("other.org", &[b"r"], "[]"))
        .await?;
    assert_eq!(next_change(&mut feed).await?, Change::Federated);
    a.delete_federated_bundle(&TrustDomain::new("other.org")?)
        .await?;
    assert_eq!(next_change(&mut feed).await?, Change::Federated);

    // Federation relationships: every write, so each server's refresher follows at once.
    use crate::datastore::conformance::relationship;
    use crate::federation::EndpointProfile;
    let rel = relationship("other.org", "https://other.org/", EndpointProfile::HttpsWeb);
    a.create_federation_relationship(rel.clone()).await?;
    assert_eq!(next_change(&mut feed).await?, Change::Federation);
    a.update_federation_relationship(rel).await?;
    assert_eq!(next_change(&mut feed).await?, Change::Federation);
    a.delete_federation_relationship(&TrustDomain::new("other.org")?)
        .await?;
    assert_eq!(next_change(&mut feed).await?, Change::Federation);

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_reconnects_after_losing_its_connection_and_asks_for_a_resync() -> TestResult
{
    let db = TestDatabase::create();
    let ds = open(&db).await?;
    let mut feed = ds.change_feed().ok_or("PostgreSQL has a change feed")?;
    assert_eq!(next_change(&mut feed).await?, Change::Resync);
    let terminate = format!(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = '{}' AND datname = current_database()",
        feed::APPLICATION_NAME
    );
    for round in 0..2 {
        assert_eq!(db.psql(&terminate).trim(), "1", "one listener connection");
        // Whatever was written while it was down is covered by the resync.
        create_all(&ds, vec![entry(&format!("/down{round}"), "/p", &[])]).await?;
        loop {
            match next_change(&mut feed).await? {
                Change::Resync => break,
                // Announced before the backend went away.
                Change::Entries => continue,
                other => return Err(format!("unexpected change {other:?}").into()),
            }
        }
        // And it listens again.
        create_all(&ds, vec![entry(&format!("/up{round}"), "/p", &[])]).await?;
        assert_eq!(next_change(&mut feed).await?, Change::Entries);
    }
    Ok(())
}
