//! Two or more datastores on one PostgreSQL database stand for servers sharing it.

use std::time::Duration;

use rcgen::PublicKeyData as _;
use sigil::bundle::JwtAuthority;
use sigil::TrustDomain;
use sigil_testkit::postgres::TestDatabase;
use tokio::sync::RwLock;

use super::*;
use crate::datastore::postgres::PostgresDatastore;
use crate::metrics::Metrics;
use crate::sync::SyncEvents;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").expect("td")
}

/// The bundle of a server's own CA: one self-signed root and one JWT key, named `name`.
fn server_bundle(name: &str) -> TestResult<Bundle> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let root = params.self_signed(&key)?.der().to_vec();
    let jwt_key = rcgen::KeyPair::generate()?;
    Ok(Bundle {
        x509_authorities: vec![root],
        jwt_authorities: vec![JwtAuthority::from_spki_der(
            format!("kid-{name}"),
            &jwt_key.subject_public_key_info(),
        )?],
        ..Bundle::new(td())
    })
}

async fn open(db: &TestDatabase) -> TestResult<Arc<dyn Datastore>> {
    Ok(Arc::new(PostgresDatastore::open(db.url()).await?))
}

#[tokio::test]
async fn a_second_server_adds_its_roots_and_keeps_the_first_ones() -> TestResult {
    let db = TestDatabase::create();
    let (a, b) = (open(&db).await?, open(&db).await?);
    let (own_a, own_b) = (server_bundle("a")?, server_bundle("b")?);
    let first = publish_own_bundle(a.as_ref(), &own_a, None, true).await?;
    assert_eq!(first.x509_authorities, own_a.x509_authorities);
    assert_eq!(first.sequence_number, 1);
    let both = publish_own_bundle(b.as_ref(), &own_b, None, true).await?;
    assert_eq!(
        both.x509_authorities,
        [
            own_a.x509_authorities.clone(),
            own_b.x509_authorities.clone()
        ]
        .concat()
    );
    let kids: Vec<&str> = both
        .jwt_authorities
        .iter()
        .map(|k| k.kid.as_str())
        .collect();
    assert_eq!(kids, ["kid-a", "kid-b"]);
    assert_eq!(both.sequence_number, 2);
    // A restart of a server whose roots are in already changes nothing.
    let again = publish_own_bundle(a.as_ref(), &own_a, None, true).await?;
    assert_eq!(again, both);
    // What is stored is what both servers now show.
    let stored = b.get_bundle(&td()).await?.ok_or("stored")?;
    assert_eq!(stored_to_bundle(&stored)?, both);
    // Server a rotates: its new authorities come in, its former ones (expired or revoked)
    // leave; server b's stay.
    let rotated = server_bundle("a2")?;
    let after = publish_own_bundle(a.as_ref(), &rotated, Some(&own_a), true).await?;
    assert_eq!(
        after.x509_authorities,
        [
            own_b.x509_authorities.clone(),
            rotated.x509_authorities.clone()
        ]
        .concat()
    );
    let kids: Vec<&str> = after
        .jwt_authorities
        .iter()
        .map(|k| k.kid.as_str())
        .collect();
    assert_eq!(kids, ["kid-b", "kid-a2"]);
    Ok(())
}

#[tokio::test]
async fn a_server_alone_on_its_datastore_replaces_the_stored_bundle() -> TestResult {
    let db = TestDatabase::create();
    let ds = open(&db).await?;
    publish_own_bundle(ds.as_ref(), &server_bundle("old")?, None, false).await?;
    let new = server_bundle("new")?;
    let stored = publish_own_bundle(ds.as_ref(), &new, None, false).await?;
    assert_eq!(stored.x509_authorities, new.x509_authorities);
    assert_eq!(stored.jwt_authorities, new.jwt_authorities);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_starting_together_keep_each_others_roots() -> TestResult {
    let db = TestDatabase::create();
    let mut own = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let ds = open(&db).await?;
        let bundle = server_bundle(&format!("s{i}"))?;
        own.push(bundle.clone());
        tasks.push(tokio::spawn(async move {
            publish_own_bundle(ds.as_ref(), &bundle, None, true).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let stored = open(&db).await?.get_bundle(&td()).await?.ok_or("stored")?;
    let stored = stored_to_bundle(&stored)?;
    for b in &own {
        assert!(stored.x509_authorities.contains(&b.x509_authorities[0]));
        assert!(stored.jwt_authority(&b.jwt_authorities[0].kid).is_some());
    }
    assert_eq!(stored.x509_authorities.len(), own.len());
    assert_eq!(stored.jwt_authorities.len(), own.len());
    Ok(())
}

/// Waits up to 10 s for `f` to hold.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) -> TestResult {
    for _ in 0..200 {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("not within 10 s: {what}").into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_another_server_are_announced_and_its_roots_trusted() -> TestResult {
    let db = TestDatabase::create();
    let (a, b) = (open(&db).await?, open(&db).await?);
    let own_b = server_bundle("b")?;
    let bundle_b = publish_own_bundle(b.as_ref(), &own_b, None, true).await?;
    let trust = Arc::new(TrustStore::new(&trusted_roots(
        &bundle_b,
        &own_b.x509_authorities,
    ))?);
    let state = Arc::new(AdminState {
        trust_domain: td(),
        datastore: b.clone(),
        bundle: RwLock::new(bundle_b.clone()),
        metrics: Metrics::new(),
        events: SyncEvents::new(),
        ca_not_after: i64::MAX.into(),
        ca: None,
        federation: std::sync::Arc::new(crate::federation::refresher::Federation::new(td(), &[])),
        started: std::sync::atomic::AtomicBool::new(true),
    });
    let (stop, shutdown) = watch::channel(false);
    let feed = b.change_feed().ok_or("PostgreSQL has a change feed")?;
    let task = tokio::spawn(follow(
        feed,
        state.clone(),
        trust.clone(),
        own_b.x509_authorities.clone(),
        shutdown,
    ));
    // The feed's first resync announces everything.
    eventually("the first resync", async || {
        let s = state.events.current();
        s.entry_changes > 0 && s.federated_changes > 0
    })
    .await?;

    // Server A starts: its roots reach B's bundle, trust store and sync streams.
    let own_a = server_bundle("a")?;
    let merged = publish_own_bundle(a.as_ref(), &own_a, None, true).await?;
    eventually("A's bundle installed on B", async || {
        state.events.current().bundle_sequence == merged.sequence_number
    })
    .await?;
    assert_eq!(*state.bundle.read().await, merged);
    assert!(trust.roots_der().contains(&own_a.x509_authorities[0]));
    assert!(trust.roots_der().contains(&own_b.x509_authorities[0]));

    // An entry written through A wakes B's sync streams.
    let before = state.events.current().entry_changes;
    let entry = sigil::entry::RegistrationEntry::new(
        "spiffe://example.org/w".parse()?,
        "spiffe://example.org/p".parse()?,
        ["unix:uid:1".parse()?].into_iter().collect(),
    );
    a.create_entries(vec![entry]).await?;
    eventually("the entry announced on B", async || {
        state.events.current().entry_changes != before
    })
    .await?;
    let before = state.events.current().federated_changes;
    a.set_federated_bundle(StoredBundle {
        trust_domain: TrustDomain::new("other.org")?,
        x509_roots: vec![b"r".to_vec()],
        jwt_keys_json: "[]".into(),
        sequence: 0,
    })
    .await?;
    eventually("the federated bundle announced on B", async || {
        state.events.current().federated_changes != before
    })
    .await?;

    stop.send(true)?;
    tokio::time::timeout(Duration::from_secs(5), task).await??;
    Ok(())
}
