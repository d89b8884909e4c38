//! Sync stream tests: a real SQLite datastore in a temp dir, real tokio time.

use std::collections::BTreeSet;
use std::pin::Pin;

use sigil::Selector;

use super::*;
use crate::datastore::sqlite::SqliteDatastore;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;
type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncResponse, Status>> + Send>>;

/// How long a change may take to reach the stream (the issue's target).
const WITHIN: Duration = Duration::from_secs(1);
/// Reconcile interval for tests that do not exercise it.
const NEVER: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(path: &str) -> SpiffeId {
    td().id(path).unwrap()
}

fn server() -> SpiffeId {
    crate::api::server_id(&td())
}

fn sels(v: &[&str]) -> SelectorSet {
    v.iter().map(|s| Selector::parse(s).unwrap()).collect()
}

fn entry(path: &str, parent: &SpiffeId, selectors: &[&str]) -> RegistrationEntry {
    RegistrationEntry::new(id(path), parent.clone(), sels(selectors))
}

/// `e` federating with `trust_domains`.
fn federating(e: RegistrationEntry, trust_domains: &[&str]) -> RegistrationEntry {
    RegistrationEntry {
        federates_with: trust_domains
            .iter()
            .map(|t| TrustDomain::new(t).unwrap())
            .collect(),
        ..e
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    ds: Arc<dyn Datastore>,
    events: SyncEvents,
}

impl Fixture {
    async fn new() -> TestResult<Self> {
        let dir = tempfile::tempdir()?;
        let ds = SqliteDatastore::open(&dir.path().join("ds.sqlite3")).await?;
        Ok(Self {
            _dir: dir,
            ds: Arc::new(ds),
            events: SyncEvents::new(),
        })
    }

    async fn agent(&self, path: &str, selectors: &[&str]) -> TestResult<SpiffeId> {
        let a = AttestedAgent {
            spiffe_id: id(path),
            attestation_type: "join_token".into(),
            x509_svid_serial: "01".into(),
            new_x509_svid: None,
            x509_svid_expires_at: i64::MAX,
            banned: false,
            selectors: sels(selectors),
            created_at: 0,
            updated_at: 0,
        };
        self.ds.upsert_agent(a.clone()).await?;
        Ok(a.spiffe_id)
    }

    fn stream(&self, agent: &SpiffeId, known_bundle: u64, reconcile: Duration) -> SyncStream {
        Box::pin(sync_stream(
            self.ds.clone(),
            self.events.clone(),
            agent.clone(),
            server(),
            td(),
            pb::SyncRequest {
                known_revision: 0,
                known_bundle_sequence: known_bundle,
                known_roots: Vec::new(),
            },
            reconcile,
        ))
    }

    /// Creates entries as the admin API does: one transaction, then one event.
    async fn create(&self, entries: Vec<RegistrationEntry>) -> TestResult<Vec<RegistrationEntry>> {
        let mut out = Vec::new();
        for r in self.ds.create_entries(entries).await? {
            out.push(r?);
        }
        self.events.entries_changed();
        Ok(out)
    }

    async fn create_one(&self, e: RegistrationEntry) -> TestResult<RegistrationEntry> {
        Ok(self.create(vec![e]).await?.remove(0))
    }

    async fn update(&self, e: RegistrationEntry) -> TestResult<RegistrationEntry> {
        let e = self.ds.update_entry(e).await?;
        self.events.entries_changed();
        Ok(e)
    }

    /// [`Fixture::update`] of the hint alone.
    async fn update_hint(&self, e: RegistrationEntry, hint: &str) -> TestResult<RegistrationEntry> {
        self.update(RegistrationEntry {
            hint: hint.into(),
            ..e
        })
        .await
    }

    async fn delete(&self, id: &str) -> TestResult {
        self.ds.delete_entry(id).await?;
        self.events.entries_changed();
        Ok(())
    }

    /// Stores a federated bundle without telling the hub.
    async fn store_federated(&self, td: &str, root: &[u8]) -> TestResult<StoredBundle> {
        Ok(self
            .ds
            .set_federated_bundle(StoredBundle {
                trust_domain: TrustDomain::new(td)?,
                x509_roots: vec![root.to_vec()],
                jwt_keys_json: "[]".into(),
                sequence: 0,
            })
            .await?)
    }

    /// Sets a federated bundle as the admin API does: store, then one event.
    async fn set_federated(&self, td: &str, root: &[u8]) -> TestResult<StoredBundle> {
        let b = self.store_federated(td, root).await?;
        self.events.federated_bundles_changed();
        Ok(b)
    }

    async fn delete_federated(&self, td: &str) -> TestResult {
        self.ds
            .delete_federated_bundle(&TrustDomain::new(td)?)
            .await?;
        self.events.federated_bundles_changed();
        Ok(())
    }

    async fn set_bundle(&self, root: &[u8]) -> TestResult<StoredBundle> {
        let b = self
            .ds
            .set_bundle(StoredBundle {
                trust_domain: td(),
                x509_roots: vec![root.to_vec(), b"second".to_vec()],
                jwt_keys_json: r#"[{"kty":"EC","kid":"k1"}]"#.into(),
                sequence: 0,
            })
            .await?;
        self.events.bundle_changed(b.sequence);
        Ok(b)
    }
}

/// The next message within `within`; an error if the stream ended, failed or stayed silent.
async fn next(s: &mut SyncStream, within: Duration) -> TestResult<pb::SyncResponse> {
    match tokio::time::timeout(within, s.next()).await {
        Err(_) => Err(format!("no message within {within:?}").into()),
        Ok(None) => Err("stream ended".into()),
        Ok(Some(Err(status))) => Err(format!("stream failed: {status:?}").into()),
        Ok(Some(Ok(m))) => Ok(m),
    }
}

/// Asserts that nothing arrives for `d`.
async fn quiet(s: &mut SyncStream, d: Duration) -> TestResult {
    match tokio::time::timeout(d, s.next()).await {
        Err(_) => Ok(()),
        Ok(m) => Err(format!("expected silence, got {m:?}").into()),
    }
}

/// Reads a whole snapshot; checks the flags on every chunk.
async fn snapshot(s: &mut SyncStream) -> TestResult<Vec<pb::SyncResponse>> {
    let mut chunks: Vec<pb::SyncResponse> = Vec::new();
    loop {
        let m = next(s, Duration::from_secs(30)).await?;
        assert_eq!(m.full, chunks.is_empty(), "full only on the first chunk");
        assert!(m.removed.is_empty());
        let done = m.snapshot_complete;
        chunks.push(m);
        if done {
            return Ok(chunks);
        }
    }
}

fn paths(entries: &[admin_pb::Entry]) -> BTreeSet<String> {
    entries
        .iter()
        .map(|e| SpiffeId::parse(&e.spiffe_id).unwrap().path().to_string())
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn revision(ds: &Arc<dyn Datastore>) -> TestResult<i64> {
    Ok(ds.entry_changes_since(i64::MAX).await?.revision)
}

#[tokio::test]
async fn snapshot_is_chunked_and_carries_the_bundle() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let other = fx.agent("/sigil/agent/join_token/b", &[]).await?;
    let bundle = fx.set_bundle(b"root").await?;
    let mine: Vec<RegistrationEntry> = (0..2_500)
        .map(|i| entry(&format!("/w/{i}"), &agent, &["unix:uid:1"]))
        .collect();
    fx.create(mine).await?;
    fx.create_one(entry("/theirs", &other, &["unix:uid:1"]))
        .await?;
    let rev = revision(&fx.ds).await?;

    let mut s = fx.stream(&agent, 0, NEVER);
    let chunks = snapshot(&mut s).await?;
    let sizes: Vec<usize> = chunks.iter().map(|m| m.upserted.len()).collect();
    assert_eq!(sizes, vec![1_000, 1_000, 500]);
    assert_eq!(
        chunks
            .iter()
            .map(|m| m.snapshot_complete)
            .collect::<Vec<_>>(),
        vec![false, false, true]
    );
    assert!(chunks.iter().all(|m| m.revision == rev));
    let all: Vec<admin_pb::Entry> = chunks.iter().flat_map(|m| m.upserted.clone()).collect();
    assert_eq!(paths(&all).len(), 2_500);
    assert!(!paths(&all).contains("/theirs"));
    // The bundle rides on the first chunk only.
    let b = chunks[0].bundle.as_ref().ok_or("bundle missing")?;
    assert_eq!(b.sequence_number, bundle.sequence);
    assert_eq!(b.x509_roots, b"rootsecond".to_vec());
    assert_eq!(b.trust_domain, "example.org");
    let jwks: serde_json::Value = serde_json::from_str(&b.jwks_json)?;
    assert_eq!(jwks["keys"][0]["kid"], "k1");
    assert!(chunks[1..].iter().all(|m| m.bundle.is_none()));
    // Then silence: nothing changed.
    quiet(&mut s, Duration::from_millis(200)).await?;

    // An agent that already holds this bundle does not get it again.
    let mut s = fx.stream(&agent, bundle.sequence, NEVER);
    let chunks = snapshot(&mut s).await?;
    assert!(chunks.iter().all(|m| m.bundle.is_none()));
    Ok(())
}

#[tokio::test]
async fn empty_snapshot_is_one_complete_message() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let mut s = fx.stream(&agent, 0, NEVER);
    let m = next(&mut s, WITHIN).await?;
    assert!(m.full && m.snapshot_complete && m.upserted.is_empty() && m.bundle.is_none());
    quiet(&mut s, Duration::from_millis(100)).await
}

#[tokio::test]
async fn creates_updates_deletes_and_reparenting_arrive() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let other = fx.agent("/sigil/agent/join_token/b", &[]).await?;
    let mut s = fx.stream(&agent, 0, NEVER);
    snapshot(&mut s).await?;

    // Create → upsert, within the target.
    let web = fx
        .create_one(entry("/web", &agent, &["unix:uid:1"]))
        .await?;
    let m = next(&mut s, WITHIN).await?;
    assert!(!m.full && !m.snapshot_complete);
    assert_eq!(m.upserted, vec![web.to_proto()]);
    assert!(m.removed.is_empty());
    assert_eq!(m.revision, web.revision);

    // Update → upsert with the new content.
    let web = fx.update_hint(web, "v2").await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(m.upserted, vec![web.to_proto()]);

    // Another agent's entry: nothing at all.
    let theirs = fx
        .create_one(entry("/theirs", &other, &["unix:uid:1"]))
        .await?;
    quiet(&mut s, Duration::from_millis(200)).await?;
    // ... nor when it is deleted (its id is not ours to hear about).
    fx.delete(&theirs.id).await?;
    quiet(&mut s, Duration::from_millis(200)).await?;

    // Re-parenting away from the agent → removed.
    fx.update(RegistrationEntry {
        parent_id: other.clone(),
        ..web.clone()
    })
    .await?;
    let m = next(&mut s, WITHIN).await?;
    assert!(m.upserted.is_empty());
    assert_eq!(m.removed, vec![web.id.clone()]);
    // ... and back → upsert.
    let back = fx
        .update(RegistrationEntry {
            parent_id: agent.clone(),
            ..web.clone()
        })
        .await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(m.upserted, vec![back.to_proto()]);

    // Delete → removed.
    fx.delete(&back.id).await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(m.removed, vec![back.id.clone()]);
    assert!(m.upserted.is_empty());
    quiet(&mut s, Duration::from_millis(100)).await
}

#[tokio::test]
async fn two_agents_each_receive_only_their_own() -> TestResult {
    let fx = Fixture::new().await?;
    let a = fx
        .agent("/sigil/agent/join_token/a", &["k8s:node:a"])
        .await?;
    let b = fx
        .agent("/sigil/agent/join_token/b", &["k8s:node:b"])
        .await?;
    fx.create(vec![
        entry("/a/1", &a, &["unix:uid:1"]),
        entry("/b/1", &b, &["unix:uid:1"]),
        entry("/node/a", &server(), &["k8s:node:a"]),
        entry("/node/b", &server(), &["k8s:node:b"]),
        entry("/a/2", &id("/node/a"), &["unix:uid:2"]),
        entry("/b/2", &id("/node/b"), &["unix:uid:2"]),
    ])
    .await?;
    let mut sa = fx.stream(&a, 0, NEVER);
    let mut sb = fx.stream(&b, 0, NEVER);
    let snap_a: Vec<_> = snapshot(&mut sa)
        .await?
        .into_iter()
        .flat_map(|m| m.upserted)
        .collect();
    let snap_b: Vec<_> = snapshot(&mut sb)
        .await?
        .into_iter()
        .flat_map(|m| m.upserted)
        .collect();
    assert_eq!(paths(&snap_a), set(&["/a/1", "/a/2"]));
    assert_eq!(paths(&snap_b), set(&["/b/1", "/b/2"]));

    fx.create(vec![
        entry("/a/3", &id("/node/a"), &["unix:uid:3"]),
        entry("/b/3", &b, &["unix:uid:3"]),
    ])
    .await?;
    let ma = next(&mut sa, WITHIN).await?;
    let mb = next(&mut sb, WITHIN).await?;
    assert_eq!(paths(&ma.upserted), set(&["/a/3"]));
    assert_eq!(paths(&mb.upserted), set(&["/b/3"]));
    quiet(&mut sa, Duration::from_millis(100)).await?;
    quiet(&mut sb, Duration::from_millis(100)).await
}

#[tokio::test]
async fn node_alias_and_subtree_changes() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx
        .agent(
            "/sigil/agent/x509pop/n1",
            &["k8s:cluster:c1", "k8s:node:n1"],
        )
        .await?;
    let mut s = fx.stream(&agent, 0, NEVER);
    snapshot(&mut s).await?;

    // An alias for this node with a child, created in one batch: the child arrives.
    let created = fx
        .create(vec![
            entry("/app", &id("/cluster/c1"), &["k8s:ns:app"]),
            entry("/cluster/c1", &server(), &["k8s:cluster:c1"]),
        ])
        .await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(paths(&m.upserted), set(&["/app"]));
    let (app, alias) = (&created[0], &created[1]);
    // An alias for another cluster changes nothing.
    fx.create(vec![
        entry("/cluster/c2", &server(), &["k8s:cluster:c2"]),
        entry("/app2", &id("/cluster/c2"), &["k8s:ns:app"]),
    ])
    .await?;
    quiet(&mut s, Duration::from_millis(200)).await?;

    // A parent entry under the agent with a grandchild: both arrive; moving the parent away
    // removes both (the grandchild did not change itself).
    let mid = fx
        .create_one(entry("/mid", &agent, &["unix:uid:1"]))
        .await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(paths(&m.upserted), set(&["/mid"]));
    let leaf = fx
        .create_one(entry("/mid/leaf", &id("/mid"), &["unix:uid:2"]))
        .await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(paths(&m.upserted), set(&["/mid/leaf"]));
    fx.update(RegistrationEntry {
        parent_id: id("/nowhere"),
        ..mid.clone()
    })
    .await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(
        m.removed.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([mid.id.clone(), leaf.id.clone()])
    );
    assert!(m.upserted.is_empty());
    // Moving it back brings the unchanged grandchild back too.
    fx.update(RegistrationEntry {
        parent_id: agent.clone(),
        ..mid.clone()
    })
    .await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(paths(&m.upserted), set(&["/mid", "/mid/leaf"]));
    assert!(m.removed.is_empty());

    // Deleting the alias removes its subtree.
    fx.delete(&alias.id).await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(m.removed, vec![app.id.clone()]);
    quiet(&mut s, Duration::from_millis(100)).await
}

#[tokio::test]
async fn changed_node_selectors_recompute_the_set() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx
        .agent("/sigil/agent/x509pop/n1", &["k8s:node:n1"])
        .await?;
    fx.create(vec![
        entry("/cluster/c1", &server(), &["k8s:cluster:c1"]),
        entry("/app", &id("/cluster/c1"), &["k8s:ns:app"]),
    ])
    .await?;
    let mut s = fx.stream(&agent, 0, NEVER);
    let snap = snapshot(&mut s).await?;
    assert!(snap.iter().all(|m| m.upserted.is_empty()));
    // Re-attestation with more selectors; the next wake notices.
    fx.agent(
        "/sigil/agent/x509pop/n1",
        &["k8s:node:n1", "k8s:cluster:c1"],
    )
    .await?;
    fx.events.entries_changed();
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(paths(&m.upserted), set(&["/app"]));
    Ok(())
}

#[tokio::test]
async fn eviction_and_ban_end_the_stream() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let mut s = fx.stream(&agent, 0, NEVER);
    snapshot(&mut s).await?;
    fx.ds.delete_agent(&agent).await?;
    fx.events.entries_changed();
    let end = tokio::time::timeout(WITHIN, s.next()).await?;
    match end {
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::PermissionDenied),
        other => return Err(format!("expected PermissionDenied, got {other:?}").into()),
    }
    assert!(tokio::time::timeout(WITHIN, s.next()).await?.is_none());

    // Banned, noticed by the reconcile timer alone (no event).
    let agent = fx.agent("/sigil/agent/join_token/b", &[]).await?;
    let mut s = fx.stream(&agent, 0, Duration::from_millis(200));
    snapshot(&mut s).await?;
    fx.ds.set_agent_banned(&agent, true).await?;
    match tokio::time::timeout(WITHIN, s.next()).await? {
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::PermissionDenied),
        other => return Err(format!("expected PermissionDenied, got {other:?}").into()),
    }
    // A stream for an unknown agent fails at once.
    let mut s = fx.stream(&id("/sigil/agent/join_token/ghost"), 0, NEVER);
    match tokio::time::timeout(WITHIN, s.next()).await? {
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::PermissionDenied),
        other => return Err(format!("expected PermissionDenied, got {other:?}").into()),
    }
    Ok(())
}

#[tokio::test]
async fn bundle_change_arrives() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let first = fx.set_bundle(b"root1").await?;
    let mut s = fx.stream(&agent, 0, NEVER);
    let snap = snapshot(&mut s).await?;
    assert_eq!(
        snap[0].bundle.as_ref().map(|b| b.sequence_number),
        Some(first.sequence)
    );
    let second = fx.set_bundle(b"root2").await?;
    assert_eq!(second.sequence, first.sequence + 1);
    let m = next(&mut s, WITHIN).await?;
    let b = m.bundle.ok_or("bundle missing")?;
    assert_eq!(b.sequence_number, second.sequence);
    assert_eq!(b.x509_roots, b"root2second".to_vec());
    assert!(m.upserted.is_empty() && m.removed.is_empty() && !m.full);
    quiet(&mut s, Duration::from_millis(100)).await
}

/// Trust domain → DER roots of a message's federated set; `None` when it carries no set.
fn federated(m: &pb::SyncResponse) -> Option<Vec<(String, Vec<u8>)>> {
    m.federated_bundles_set.then(|| {
        m.federated_bundles
            .iter()
            .map(|b| (b.trust_domain.clone(), b.x509_roots.clone()))
            .collect()
    })
}

fn fed(v: &[(&str, &[u8])]) -> Option<Vec<(String, Vec<u8>)>> {
    Some(
        v.iter()
            .map(|(td, r)| (td.to_string(), r.to_vec()))
            .collect(),
    )
}

#[tokio::test]
async fn federated_bundles_follow_entries_and_bundle_changes() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let other = fx.agent("/sigil/agent/join_token/b", &[]).await?;
    fx.set_federated("other.org", b"o1").await?;
    fx.set_federated("third.org", b"t1").await?;
    let web = fx
        .create_one(federating(
            entry("/web", &agent, &["unix:uid:1"]),
            &["other.org"],
        ))
        .await?;
    // Another agent's entry federating with third.org does not make it relevant here.
    fx.create_one(federating(
        entry("/theirs", &other, &["unix:uid:1"]),
        &["third.org"],
    ))
    .await?;

    // The snapshot carries exactly the relevant set, on its first message.
    let mut s = fx.stream(&agent, 0, NEVER);
    let snap = snapshot(&mut s).await?;
    assert_eq!(federated(&snap[0]), fed(&[("other.org", b"o1")]));
    // An agent federating with nothing is told so (it may hold a stale set).
    let mut so = fx.stream(&fx.agent("/sigil/agent/join_token/c", &[]).await?, 0, NEVER);
    assert_eq!(federated(&snapshot(&mut so).await?[0]), fed(&[]));

    // A relevant bundle changes: the new complete set, nothing else.
    fx.set_federated("other.org", b"o2").await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(federated(&m), fed(&[("other.org", b"o2")]));
    assert!(m.upserted.is_empty() && m.removed.is_empty() && m.bundle.is_none());
    // An irrelevant one changes: nothing.
    fx.set_federated("third.org", b"t2").await?;
    quiet(&mut s, Duration::from_millis(200)).await?;

    // The entry starts federating with third.org too: the upsert and the grown set together.
    let web = fx
        .update(federating(web, &["other.org", "third.org"]))
        .await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(m.upserted, vec![web.to_proto()]);
    assert_eq!(
        federated(&m),
        fed(&[("other.org", b"o2"), ("third.org", b"t2")])
    );
    // A hint change leaves the set alone.
    let web = fx.update_hint(web, "v2").await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(federated(&m), None);

    // Deleted, then set again with other content before the stream looks (sequence 1 both
    // times): the content still differs, so it is sent.
    fx.delete_federated("other.org").await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(federated(&m), fed(&[("third.org", b"t2")]));
    fx.set_federated("other.org", b"o9").await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(
        federated(&m),
        fed(&[("other.org", b"o9"), ("third.org", b"t2")])
    );

    // The entry goes away: the set empties with it.
    fx.delete(&web.id).await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(m.removed, vec![web.id.clone()]);
    assert_eq!(federated(&m), fed(&[]));
    quiet(&mut s, Duration::from_millis(100)).await?;
    quiet(&mut so, Duration::from_millis(10)).await
}

#[tokio::test]
async fn reconcile_repairs_a_missed_federated_change() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    fx.create_one(federating(
        entry("/web", &agent, &["unix:uid:1"]),
        &["other.org"],
    ))
    .await?;
    let mut s = fx.stream(&agent, 0, Duration::from_millis(300));
    assert_eq!(federated(&snapshot(&mut s).await?[0]), fed(&[]));
    // Written behind the hub's back.
    fx.store_federated("other.org", b"o1").await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(federated(&m), fed(&[("other.org", b"o1")]));
    quiet(&mut s, Duration::from_millis(700)).await
}

#[tokio::test]
async fn reconcile_repairs_a_missed_event() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let mut s = fx.stream(&agent, 0, Duration::from_millis(300));
    snapshot(&mut s).await?;
    // Written behind the hub's back (e.g. another process on the same database).
    let e = fx
        .ds
        .create_entries(vec![entry("/silent", &agent, &["unix:uid:1"])])
        .await?
        .remove(0)?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(m.upserted, vec![e.to_proto()]);
    // Later reconciles find nothing new and send nothing.
    quiet(&mut s, Duration::from_millis(700)).await
}

#[tokio::test]
async fn bursts_are_coalesced() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let mut s = fx.stream(&agent, 0, NEVER);
    snapshot(&mut s).await?;
    const N: usize = 300;
    // Single creates, one event each, as CreateEntry calls in a loop would do.
    let writer = {
        let ds = fx.ds.clone();
        let events = fx.events.clone();
        tokio::spawn(async move {
            for i in 0..N {
                let e = entry(
                    &format!("/burst/{i}"),
                    &id("/sigil/agent/join_token/a"),
                    &["unix:uid:1"],
                );
                if ds.create_entries(vec![e]).await.is_err() {
                    return;
                }
                events.entries_changed();
            }
        })
    };
    let mut seen = BTreeSet::new();
    let mut messages = 0;
    while seen.len() < N {
        let m = next(&mut s, Duration::from_secs(10)).await?;
        messages += 1;
        seen.extend(m.upserted.into_iter().map(|e| e.id));
    }
    writer.await?;
    // Without coalescing: one message per create. How many creates share a message depends on
    // how fast the writer runs against the stream (on a loaded machine, fewer).
    assert!(messages <= N / 2, "{messages} messages for {N} creates");
    Ok(())
}

#[tokio::test]
async fn large_entries_are_split_by_size() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    // ~16 KiB per entry: 64 DNS names of ~250 characters.
    let long = "x".repeat(60);
    let batch: Vec<RegistrationEntry> = (0..200)
        .map(|i| RegistrationEntry {
            dns_names: (0..64)
                .map(|j| format!("{long}.{long}.{long}.{long}-{i}-{j}.example"))
                .collect(),
            ..entry(&format!("/big/{i}"), &agent, &["unix:uid:1"])
        })
        .collect();
    fx.create(batch).await?;
    let mut s = fx.stream(&agent, 0, NEVER);
    let chunks = snapshot(&mut s).await?;
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    for m in &chunks {
        assert!(
            m.encoded_len() <= MAX_BYTES_PER_MESSAGE + 1024,
            "{} bytes",
            m.encoded_len()
        );
    }
    assert_eq!(chunks.iter().map(|m| m.upserted.len()).sum::<usize>(), 200);
    Ok(())
}

#[test]
fn outbox_splits_removals_and_sends_nothing_when_empty() {
    let mut o = Outbox::default();
    assert!(o.next_message().is_none());
    o.load(
        (Vec::new(), Vec::new(), 7),
        Bundles::default(),
        RoundKind::Increment,
        Vec::new(),
    );
    assert!(o.next_message().is_none());
    let ids: Vec<String> = (0..MAX_REMOVED_PER_MESSAGE + 1)
        .map(|i| i.to_string())
        .collect();
    o.load(
        (Vec::new(), ids, 8),
        Bundles::default(),
        RoundKind::Increment,
        Vec::new(),
    );
    let first = o.next_message().map(|m| m.removed.len());
    let second = o
        .next_message()
        .map(|m| (m.removed.len(), m.revision, m.full));
    assert_eq!(first, Some(MAX_REMOVED_PER_MESSAGE));
    assert_eq!(second, Some((1, 8, false)));
    assert!(o.next_message().is_none());
}

#[tokio::test]
async fn a_taint_resends_the_bundle_with_the_tainted_authorities() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let bundle = fx.set_bundle(b"root").await?;
    let mut s = fx.stream(&agent, bundle.sequence, NEVER);
    let chunks = snapshot(&mut s).await?;
    assert!(chunks.iter().all(|m| m.bundle.is_none()), "held already");

    // Tainted: the same stored bundle (same sequence) is sent again, with the taint.
    fx.events.set_taint(crate::sync::Taint {
        x509: vec!["ab12".into()],
        jwt: vec!["k1".into()],
    });
    let m = next(&mut s, WITHIN).await?;
    let b = m.bundle.ok_or("bundle missing")?;
    assert_eq!(b.sequence_number, bundle.sequence);
    assert_eq!(b.tainted_x509_authorities, ["ab12"]);
    assert_eq!(b.tainted_jwt_kids, ["k1"]);
    // The same taint again is no change.
    fx.events.set_taint(crate::sync::Taint {
        x509: vec!["ab12".into()],
        jwt: vec!["k1".into()],
    });
    quiet(&mut s, Duration::from_millis(200)).await?;

    // A new stream of an agent holding that sequence still gets the taint.
    let mut s = fx.stream(&agent, bundle.sequence, NEVER);
    let chunks = snapshot(&mut s).await?;
    let b = chunks[0].bundle.as_ref().ok_or("bundle missing")?;
    assert_eq!(b.tainted_x509_authorities, ["ab12"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resuming from the agent's revision

/// What an agent holds, built from the messages it was sent as `Cache::apply_sync` does.
#[derive(Debug, Default, Clone)]
struct Held {
    /// Entry id → (SPIFFE ID path, revision).
    entries: HashMap<String, (String, i64)>,
    revision: i64,
    roots: Vec<u8>,
    /// Entries sent in the last round read.
    sent: usize,
}

impl Held {
    fn apply(&mut self, m: &pb::SyncResponse) {
        if m.full {
            self.entries.clear();
        }
        for e in &m.upserted {
            let path = SpiffeId::parse(&e.spiffe_id).unwrap().path().to_string();
            self.entries.insert(e.id.clone(), (path, e.revision_number));
        }
        for id in &m.removed {
            self.entries.remove(id);
        }
        self.sent += m.upserted.len();
        self.revision = m.revision;
        self.roots = m.roots.clone();
    }

    /// The request of a reconnect holding this.
    fn request(&self) -> pb::SyncRequest {
        pb::SyncRequest {
            known_revision: self.revision,
            known_bundle_sequence: 0,
            known_roots: self.roots.clone(),
        }
    }
}

/// Reads the stream's first round (a snapshot or a resumed round) into `held`; returns its
/// messages.
async fn first_round(s: &mut SyncStream, held: &mut Held) -> TestResult<Vec<pb::SyncResponse>> {
    held.sent = 0;
    let mut out = Vec::new();
    loop {
        let m = next(s, Duration::from_secs(30)).await?;
        held.apply(&m);
        let done = !m.more_follows;
        assert_eq!(
            m.snapshot_complete,
            out.first().map_or(m.full, |f: &pb::SyncResponse| f.full) && done,
            "snapshot_complete on the last chunk of a snapshot only"
        );
        out.push(m);
        if done {
            return Ok(out);
        }
    }
}

impl Fixture {
    fn stream_with(&self, agent: &SpiffeId, req: pb::SyncRequest) -> SyncStream {
        Box::pin(sync_stream(
            self.ds.clone(),
            self.events.clone(),
            agent.clone(),
            server(),
            td(),
            req,
            NEVER,
        ))
    }

    /// Connects as an agent holding `held`; returns the first round and whether it resumed.
    async fn reconnect(&self, agent: &SpiffeId, held: &mut Held) -> TestResult<bool> {
        let mut s = self.stream_with(agent, held.request());
        let round = first_round(&mut s, held).await?;
        let resumed = round[0].resumed;
        assert_eq!(
            resumed, !round[0].full,
            "a first round is resumed or a snapshot"
        );
        assert!(round[1..].iter().all(|m| !m.resumed && !m.full));
        Ok(resumed)
    }

    /// The ids and revisions `agent` is authorised for now, as the agent should hold them.
    async fn authorised(&self, agent: &SpiffeId) -> TestResult<HashMap<String, (String, i64)>> {
        let record = self.ds.get_agent(agent).await?.ok_or("agent record")?;
        Ok(authorized_entries(&*self.ds, &record, &server())
            .await?
            .into_iter()
            .map(|e| (e.id, (e.spiffe_id.path().to_string(), e.revision)))
            .collect())
    }

    /// A first connection: the snapshot, held.
    async fn connect(&self, agent: &SpiffeId) -> TestResult<Held> {
        let mut held = Held::default();
        assert!(
            !self.reconnect(agent, &mut held).await?,
            "no revision: a snapshot"
        );
        assert_eq!(held.entries, self.authorised(agent).await?);
        Ok(held)
    }
}

use crate::sync::authorized_entries;

#[tokio::test]
async fn resume_with_nothing_changed_sends_one_small_message() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx
        .agent("/sigil/agent/join_token/a", &["k8s:cluster:c1"])
        .await?;
    fx.create_one(entry("/cluster/c1", &server(), &["k8s:cluster:c1"]))
        .await?;
    let mine: Vec<RegistrationEntry> = (0..10_000)
        .map(|i| {
            let parent = if i % 2 == 0 {
                agent.clone()
            } else {
                id("/cluster/c1")
            };
            entry(&format!("/w/{i}"), &parent, &["unix:uid:1"])
        })
        .collect();
    fx.create(mine).await?;
    let mut held = fx.connect(&agent).await?;
    assert_eq!((held.entries.len(), held.sent), (10_000, 10_000));

    let mut s = fx.stream_with(&agent, held.request());
    let round = first_round(&mut s, &mut held).await?;
    assert_eq!(round.len(), 1);
    let m = &round[0];
    assert!(m.resumed && !m.full && !m.more_follows);
    assert!(m.upserted.is_empty() && m.removed.is_empty());
    assert_eq!(held.entries.len(), 10_000);
    // The whole reconnect: the revision, the roots digest, an empty federated set.
    assert!(m.encoded_len() < 64, "{} bytes", m.encoded_len());
    // The stream is live afterwards.
    let e = fx
        .create_one(entry("/late", &agent, &["unix:uid:1"]))
        .await?;
    let m = next(&mut s, WITHIN).await?;
    assert_eq!(m.upserted, vec![e.to_proto()]);
    Ok(())
}

#[tokio::test]
async fn resume_sends_only_the_creates_updates_and_deletes_since() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let other = fx.agent("/sigil/agent/join_token/b", &[]).await?;
    let mine = fx
        .create(
            (0..50)
                .map(|i| entry(&format!("/w/{i}"), &agent, &["unix:uid:1"]))
                .collect(),
        )
        .await?;
    let theirs = fx
        .create_one(entry("/theirs", &other, &["unix:uid:1"]))
        .await?;
    let mut held = fx.connect(&agent).await?;

    let new = fx
        .create_one(entry("/new", &agent, &["unix:uid:2"]))
        .await?;
    fx.update_hint(mine[1].clone(), "changed").await?;
    fx.delete(&mine[2].id).await?;
    // Other agents' changes are none of this agent's business.
    fx.create_one(entry("/theirs-too", &other, &["unix:uid:2"]))
        .await?;
    fx.delete(&theirs.id).await?;
    // Created and deleted while away: never held, nothing to say.
    let brief = fx
        .create_one(entry("/brief", &other, &["unix:uid:3"]))
        .await?;
    fx.delete(&brief.id).await?;

    assert!(fx.reconnect(&agent, &mut held).await?);
    assert_eq!(held.sent, 2, "the create and the update");
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert!(held.entries.contains_key(&new.id));
    assert!(!held.entries.contains_key(&mine[2].id));
    // Reconnecting again at once: nothing.
    assert!(fx.reconnect(&agent, &mut held).await?);
    assert_eq!(held.sent, 0);
    Ok(())
}

#[tokio::test]
async fn resume_removes_entries_moved_away_and_sends_entries_moved_in() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let other = fx.agent("/sigil/agent/join_token/b", &[]).await?;
    let leaf = fx
        .create_one(entry("/leaf", &agent, &["unix:uid:1"]))
        .await?;
    let theirs = fx
        .create_one(entry("/their-leaf", &other, &["unix:uid:1"]))
        .await?;
    let mut held = fx.connect(&agent).await?;

    // Leaves (nothing below them) moving between agents: resumable.
    fx.update(RegistrationEntry {
        parent_id: other.clone(),
        ..leaf.clone()
    })
    .await?;
    fx.update(RegistrationEntry {
        parent_id: agent.clone(),
        ..theirs.clone()
    })
    .await?;
    assert!(fx.reconnect(&agent, &mut held).await?);
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert!(held.entries.contains_key(&theirs.id) && !held.entries.contains_key(&leaf.id));
    Ok(())
}

#[tokio::test]
async fn resume_falls_back_to_a_snapshot_when_a_subtree_moved() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let other = fx.agent("/sigil/agent/join_token/b", &[]).await?;
    let app = fx
        .create_one(entry("/app", &agent, &["unix:uid:1"]))
        .await?;
    let db = fx
        .create_one(entry("/app/db", &id("/app"), &["unix:uid:2"]))
        .await?;
    fx.create_one(entry("/orphan/child", &id("/orphan"), &["unix:uid:3"]))
        .await?;
    let mut held = fx.connect(&agent).await?;
    assert!(held.entries.contains_key(&db.id));

    // /app moves to the other agent: /app/db, unchanged, goes with it.
    fx.update(RegistrationEntry {
        parent_id: other.clone(),
        ..app.clone()
    })
    .await?;
    assert!(!fx.reconnect(&agent, &mut held).await?, "a snapshot");
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert!(!held.entries.contains_key(&db.id));

    // /orphan is created under the agent: /orphan/child, unchanged, becomes authorised.
    fx.create_one(entry("/orphan", &agent, &["unix:uid:4"]))
        .await?;
    assert!(!fx.reconnect(&agent, &mut held).await?, "a snapshot");
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert!(held.entries.values().any(|(p, _)| p == "/orphan/child"));

    // A parent deleted while the entry below it was updated in place: what hangs below that
    // entry is lost too.
    let p = fx.create_one(entry("/p", &agent, &["unix:uid:5"])).await?;
    let x = fx
        .create_one(entry("/p/x", &id("/p"), &["unix:uid:6"]))
        .await?;
    let c = fx
        .create_one(entry("/p/x/c", &id("/p/x"), &["unix:uid:7"]))
        .await?;
    assert!(fx.reconnect(&agent, &mut held).await?);
    assert!(held.entries.contains_key(&c.id));
    fx.delete(&p.id).await?;
    fx.update_hint(x, "in place").await?;
    assert!(!fx.reconnect(&agent, &mut held).await?, "a snapshot");
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert!(!held.entries.contains_key(&c.id));

    // Deleting a parent whose children stay: its subtree is lost.
    let orphan = held
        .entries
        .iter()
        .find(|(_, (p, _))| p == "/orphan")
        .map(|(id, _)| id.clone())
        .ok_or("/orphan held")?;
    fx.delete(&orphan).await?;
    assert!(!fx.reconnect(&agent, &mut held).await?, "a snapshot");
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert!(held.entries.is_empty());
    Ok(())
}

#[tokio::test]
async fn resume_falls_back_to_a_snapshot_when_the_roots_changed() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx
        .agent("/sigil/agent/join_token/a", &["k8s:cluster:c1"])
        .await?;
    fx.create_one(entry("/w", &agent, &["unix:uid:1"])).await?;
    fx.create_one(entry("/c2/app", &id("/cluster/c2"), &["unix:uid:1"]))
        .await?;
    fx.create_one(entry("/cluster/c2", &server(), &["k8s:cluster:c2"]))
        .await?;
    let mut held = fx.connect(&agent).await?;
    assert_eq!(held.entries.len(), 1);

    // New node selectors make the c2 alias apply: /c2/app, unchanged, becomes authorised.
    fx.agent(
        "/sigil/agent/join_token/a",
        &["k8s:cluster:c1", "k8s:cluster:c2"],
    )
    .await?;
    assert!(!fx.reconnect(&agent, &mut held).await?, "a snapshot");
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert_eq!(held.entries.len(), 2);

    // A new alias for the agent: the roots change again.
    fx.create_one(entry("/cluster/c1", &server(), &["k8s:cluster:c1"]))
        .await?;
    fx.create_one(entry("/c1/app", &id("/cluster/c1"), &["unix:uid:1"]))
        .await?;
    assert!(!fx.reconnect(&agent, &mut held).await?, "a snapshot");
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert_eq!(held.entries.len(), 3);

    // An alias of another node changing is no reason for a snapshot.
    fx.create_one(entry("/cluster/c9", &server(), &["k8s:cluster:c9"]))
        .await?;
    assert!(fx.reconnect(&agent, &mut held).await?);
    assert_eq!(held.sent, 0);
    Ok(())
}

#[tokio::test]
async fn resume_from_a_pruned_or_unknown_revision_is_a_snapshot() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let gone = fx
        .create_one(entry("/gone", &agent, &["unix:uid:1"]))
        .await?;
    fx.create_one(entry("/w", &agent, &["unix:uid:2"])).await?;
    let mut held = fx.connect(&agent).await?;
    fx.delete(&gone.id).await?;
    // The tombstone is past the retention (a time in the future is after every write).
    fx.ds
        .prune_entry_history(sigil::clock::now_unix() + 60)
        .await?;
    assert!(
        !fx.reconnect(&agent, &mut held).await?,
        "too old: a snapshot"
    );
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    assert_eq!(held.entries.len(), 1);

    // A revision the datastore has not reached (a restored backup): a snapshot.
    held.revision += 100;
    assert!(!fx.reconnect(&agent, &mut held).await?, "ahead: a snapshot");
    // Without roots (an older agent) or without a revision: a snapshot.
    held.roots.clear();
    assert!(!fx.reconnect(&agent, &mut held).await?);
    assert!(!fx.reconnect(&agent, &mut Held::default()).await?);
    Ok(())
}

#[tokio::test]
async fn a_forged_revision_gets_nothing_beyond_the_agents_own_entries() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    let attacker = fx.agent("/sigil/agent/join_token/evil", &[]).await?;
    let a_entries = fx
        .create(
            (0..20)
                .map(|i| entry(&format!("/a/{i}"), &agent, &["unix:uid:1"]))
                .collect(),
        )
        .await?;
    fx.create_one(entry("/evil/own", &attacker, &["unix:uid:1"]))
        .await?;
    for e in &a_entries[..5] {
        fx.delete(&e.id).await?;
    }
    fx.update_hint(a_entries[6].clone(), "changed").await?;
    // Any revision, with the digest of its own roots (the agent's ID: easy to compute).
    let roots = roots_digest(&HashSet::from([attacker.clone()]));
    let a_ids: HashSet<String> = a_entries.iter().map(|e| e.id.clone()).collect();
    for known_revision in [1, 2, 10, 20] {
        let mut s = fx.stream_with(
            &attacker,
            pb::SyncRequest {
                known_revision,
                known_bundle_sequence: 0,
                known_roots: roots.clone(),
            },
        );
        let mut held = Held::default();
        let round = first_round(&mut s, &mut held).await?;
        assert!(round[0].resumed);
        for m in &round {
            assert!(m
                .upserted
                .iter()
                .all(|e| paths(std::slice::from_ref(e)) == set(&["/evil/own"])));
            assert!(
                m.removed.iter().all(|id| !a_ids.contains(id)),
                "another agent's entry named: {:?}",
                m.removed
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_resumed_round_of_many_changes_is_chunked() -> TestResult {
    let fx = Fixture::new().await?;
    let agent = fx.agent("/sigil/agent/join_token/a", &[]).await?;
    fx.create_one(entry("/first", &agent, &["unix:uid:1"]))
        .await?;
    let mut held = fx.connect(&agent).await?;
    fx.create(
        (0..2_500)
            .map(|i| entry(&format!("/w/{i}"), &agent, &["unix:uid:1"]))
            .collect(),
    )
    .await?;
    let mut s = fx.stream_with(&agent, held.request());
    let round = first_round(&mut s, &mut held).await?;
    assert_eq!(
        round
            .iter()
            .map(|m| (m.upserted.len(), m.more_follows))
            .collect::<Vec<_>>(),
        [(1_000, true), (1_000, true), (500, false)]
    );
    assert!(round[0].resumed && round[1..].iter().all(|m| !m.resumed));
    assert_eq!(held.entries, fx.authorised(&agent).await?);
    Ok(())
}
