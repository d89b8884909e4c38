//! The behaviour every [`Datastore`] backend must show: one suite that each backend runs
//! unchanged.
//!
//! Each behaviour is a `pub(crate) async fn name(store: &dyn TestStore) -> TestResult` that uses
//! the trait only (no backend types, no SQL), so a backend joins by implementing [`TestStore`]
//! (a new, empty store that can be opened again) and writing
//! `datastore_conformance!(new_store);` in its test module, where `new_store` is an
//! `async fn() -> TestResult<impl TestStore>`: the macro expands to one `#[tokio::test]` per
//! behaviour. A new behaviour goes here and into the macro's list. What only one backend can
//! show (file modes, SQL plans, rows corrupted behind its back, schema migrations) stays in that
//! backend's own tests.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sigil::entry::RegistrationEntry;
use sigil::{Selector, SelectorSet, SpiffeId, TrustDomain};

use super::paging::{effective_page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use super::{
    AttestedAgent, BundleSwap, Datastore, DatastoreError, EntryFilter, FederationRelationship,
    JoinToken, NewAgentSvid, SelectorMatch, StoredBundle,
};
use crate::federation::EndpointProfile;

/// What a behaviour returns: any error fails the test.
pub(crate) type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One store of the backend under test (a temporary file, a scratch database), removed when
/// dropped.
#[async_trait]
pub(crate) trait TestStore: Send + Sync {
    /// Opens the store. The first call finds it empty; a later one, once every handle of the
    /// previous one has been dropped, finds what was stored before, as a restarted server does.
    async fn open(&self) -> TestResult<Arc<dyn Datastore>>;
}

/// Expands to one `#[tokio::test]` per behaviour of this suite, each on its own store made by
/// `$new_store` (an `async fn() -> TestResult<impl TestStore>`). The behaviours that race
/// several tasks run on a multi-threaded runtime.
macro_rules! datastore_conformance {
    ($new_store:path) => {
        $crate::datastore::conformance::datastore_conformance!(@tests $new_store, [tokio::test];
            entry_round_trip,
            selector_match_modes,
            entries_without_selectors_match_every_subset,
            pagination_with_filter_has_no_gaps_or_duplicates,
            garbage_page_tokens_are_rejected,
            duplicates_are_refused_per_entry,
            empty_batches_write_nothing,
            update_collisions_and_not_found,
            revisions_and_changes_since,
            changes_since_report_each_entry_once_with_tombstones,
            data_survives_reopen,
            renewed_agent_svid_waits_beside_the_current_one_until_promoted,
            agents_upsert_list_ban_evict,
            agent_times_follow_the_upsert_rule,
            join_tokens_are_single_use_and_expire,
            bundle_sequence_bumps_only_on_change,
            bundle_compare_and_set_refuses_a_stale_sequence,
            federated_bundles_set_get_list_delete,
            federated_bundles_survive_reopen,
            federation_relationships_create_get_list_update_delete,
            federation_relationships_survive_reopen_apart_from_bundles,
            read_authorized_follows_the_rule_in_one_read,
            entry_history_records_former_placements,
            entry_history_pruning_ends_resumes_from_before_it,
            get_entries_answers_each_id_in_order,
        );
        $crate::datastore::conformance::datastore_conformance!(@tests $new_store,
            [tokio::test(flavor = "multi_thread", worker_threads = 2)];
            concurrent_consume_has_one_winner,
            concurrent_promotions_have_one_winner,
            renewal_racing_promotion_has_one_winner,
            concurrent_writes_take_distinct_revisions,
            concurrent_bundle_changes_take_distinct_sequences,
            concurrent_bundle_merges_keep_every_root,
        );
    };
    (@tests $new_store:path, [$attr:meta]; $($name:ident),* $(,)?) => {
        $(
            #[$attr]
            async fn $name() -> $crate::datastore::conformance::TestResult {
                let store = $new_store().await?;
                $crate::datastore::conformance::$name(&store).await
            }
        )*
    };
}
pub(crate) use datastore_conformance;

// ---------------------------------------------------------------------------------------------
// Helpers (also used by the backends' own tests)

/// The trust domain of the test IDs.
const TD: &str = "spiffe://example.org";

/// A SPIFFE ID in the test trust domain.
pub(crate) fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("{TD}{path}")).expect("test SPIFFE ID")
}

/// A selector set from `type:value` strings.
pub(crate) fn sels(v: &[&str]) -> SelectorSet {
    v.iter()
        .map(|s| Selector::parse(s).expect("test selector"))
        .collect()
}

/// A new entry (no id yet) with this SPIFFE ID path, parent path and selectors.
pub(crate) fn entry(path: &str, parent: &str, selectors: &[&str]) -> RegistrationEntry {
    RegistrationEntry::new(id(path), id(parent), sels(selectors))
}

/// Creates `entries`, failing the test if any one is refused.
pub(crate) async fn create_all(
    ds: &dyn Datastore,
    entries: Vec<RegistrationEntry>,
) -> TestResult<Vec<RegistrationEntry>> {
    Ok(ds
        .create_entries(entries)
        .await?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?)
}

/// The SPIFFE ID paths of `items`, in order.
pub(crate) fn spiffe_ids(items: &[RegistrationEntry]) -> Vec<String> {
    items
        .iter()
        .map(|e| e.spiffe_id.path().to_string())
        .collect()
}

/// Lists every page; checks page sizes along the way.
pub(crate) async fn list_all(
    ds: &dyn Datastore,
    filter: &EntryFilter,
    page_size: usize,
) -> TestResult<Vec<RegistrationEntry>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = ds.list_entries(filter, page_size, token.as_deref()).await?;
        assert!(page.items.len() <= page_size);
        if page.next_token.is_some() {
            assert_eq!(
                page.items.len(),
                page_size,
                "only the last page may be short"
            );
        }
        out.extend(page.items);
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

/// The ids of every entry from the page `token` points at to the end, 100 per page.
pub(crate) async fn list_all_from(
    ds: &dyn Datastore,
    token: Option<&str>,
) -> TestResult<Vec<String>> {
    let mut out = Vec::new();
    let mut token = token.map(str::to_string);
    while let Some(t) = token {
        let page = ds
            .list_entries(&EntryFilter::default(), 100, Some(&t))
            .await?;
        out.extend(page.items.into_iter().map(|e| e.id));
        token = page.next_token;
    }
    Ok(out)
}

/// An agent with this ID path, a current SVID `0a1b` and no pending one.
pub(crate) fn agent(path: &str) -> AttestedAgent {
    AttestedAgent {
        spiffe_id: id(path),
        attestation_type: "join_token".into(),
        x509_svid_serial: "0a1b".into(),
        x509_svid_expires_at: 1_900_000_000,
        new_x509_svid: None,
        banned: false,
        selectors: sels(&["join_token:abc"]),
        created_at: 0,
        updated_at: 0,
    }
}

/// A join token without an alias ID.
pub(crate) fn token(t: &str, expires_at: i64) -> JoinToken {
    JoinToken {
        token: t.into(),
        expires_at,
        spiffe_id: None,
    }
}

/// A bundle of `example.org` (its sequence is one the datastore must ignore).
pub(crate) fn bundle(roots: &[&[u8]], jwks: &str) -> StoredBundle {
    StoredBundle {
        trust_domain: TrustDomain::new("example.org").expect("td"),
        x509_roots: roots.iter().map(|r| r.to_vec()).collect(),
        jwt_keys_json: jwks.into(),
        sequence: 99,
    }
}

/// A bundle of trust domain `td`, as [`bundle`] otherwise.
pub(crate) fn federated(td: &str, roots: &[&[u8]], jwks: &str) -> StoredBundle {
    StoredBundle {
        trust_domain: TrustDomain::new(td).expect("td"),
        ..bundle(roots, jwks)
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviours

/// Every entry field is stored and read back; update keeps id and created_at; delete returns what
/// it removed.
pub(crate) async fn entry_round_trip(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let mut e = entry("/web", "/agent/1", &["unix:uid:1000", "unix:gid:1000"]);
    e.x509_svid_ttl = Some(Duration::from_secs(600));
    e.jwt_svid_ttl = Some(Duration::from_secs(300));
    e.dns_names = vec!["web.example.org".into(), "*.svc.local".into()];
    e.admin = true;
    e.downstream = true;
    e.federates_with = vec![
        TrustDomain::new("other.org")?,
        TrustDomain::new("third.org")?,
    ];
    e.hint = "external \"web\" ✓".into();
    e.id = "ignored-on-create".into();
    let before = sigil::clock::now_unix();
    let created = create_all(&*ds, vec![e.clone()]).await?.remove(0);
    assert_ne!(created.id, "ignored-on-create");
    assert!(uuid::Uuid::parse_str(&created.id).is_ok());
    assert_eq!(created.revision, 1);
    assert!(created.created_at >= before && created.created_at == created.updated_at);
    assert!(created.same_registration(&e));

    let got = ds.get_entry(&created.id).await?.ok_or("entry missing")?;
    assert_eq!(got, created);
    assert_eq!(ds.get_entry("no-such-id").await?, None);

    let page = ds.list_entries(&EntryFilter::default(), 0, None).await?;
    assert_eq!(page.items, vec![created.clone()]);
    assert_eq!(page.next_token, None);
    assert_eq!(ds.count_entries(&EntryFilter::default()).await?, 1);

    let mut changed = created.clone();
    changed.spiffe_id = id("/web2");
    changed.selectors = sels(&["unix:uid:1001"]);
    changed.dns_names.clear();
    changed.x509_svid_ttl = None;
    changed.created_at = 12345; // ignored
    let updated = ds.update_entry(changed.clone()).await?;
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.created_at, created.created_at);
    assert_eq!(updated.id, created.id);
    assert_eq!(ds.get_entry(&created.id).await?, Some(updated.clone()));
    assert!(updated.same_registration(&changed));
    assert_eq!(updated.x509_svid_ttl, None);
    // The old selectors are gone from the index, the new ones are there.
    let by = |s: &[&str]| EntryFilter {
        selectors: Some((sels(s), SelectorMatch::Any)),
        ..Default::default()
    };
    assert_eq!(ds.count_entries(&by(&["unix:gid:1000"])).await?, 0);
    assert_eq!(ds.count_entries(&by(&["unix:uid:1001"])).await?, 1);

    let deleted = ds.delete_entry(&created.id).await?;
    assert_eq!(deleted, updated);
    assert_eq!(ds.get_entry(&created.id).await?, None);
    assert_eq!(ds.count_entries(&EntryFilter::default()).await?, 0);
    assert_eq!(ds.count_entries(&by(&["unix:uid:1001"])).await?, 0);
    Ok(())
}

/// `get_entries` answers each id as `get_entry` would, in the order asked, duplicates and
/// unknown or deleted ids included; no ids, no answers.
pub(crate) async fn get_entries_answers_each_id_in_order(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let created = create_all(
        &*ds,
        (0..5)
            .map(|i| {
                let mut e = entry(&format!("/w/{i}"), "/agent/1", &["unix:uid:1000"]);
                e.dns_names = vec![format!("w{i}.example.org")];
                e
            })
            .collect(),
    )
    .await?;
    let deleted = ds.delete_entry(&created[3].id).await?;
    let ids: Vec<String> = [
        &created[4].id,
        "no-such-id",
        &created[0].id,
        &deleted.id,
        &created[4].id,
        &created[1].id,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let got = ds.get_entries(&ids).await?;
    let mut want = Vec::new();
    for id in &ids {
        want.push(ds.get_entry(id).await?);
    }
    assert_eq!(got, want);
    assert_eq!(
        got.iter()
            .map(|e| e.as_ref().map(|e| e.spiffe_id.path().to_string()))
            .collect::<Vec<_>>(),
        [
            Some("/w/4".to_string()),
            None,
            Some("/w/0".to_string()),
            None,
            Some("/w/4".to_string()),
            Some("/w/1".to_string()),
        ]
    );
    assert!(ds.get_entries(&[]).await?.is_empty());
    Ok(())
}

/// Each `SelectorMatch` mode returns exactly what its set definition says, alone and with the
/// other filters.
pub(crate) async fn selector_match_modes(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    create_all(
        &*ds,
        vec![
            entry("/a", "/p", &["t:a"]),
            entry("/ab", "/p", &["t:a", "t:b"]),
            entry("/abc", "/p", &["t:a", "t:b", "t:c"]),
            entry("/b", "/p", &["t:b"]),
            entry("/cd", "/p", &["t:c", "t:d"]),
            entry("/ab-q", "/q", &["t:a", "t:b"]),
            // A value containing the type separator and another type with the same value.
            entry("/colon", "/p", &["k8s:ns:a"]),
            entry("/other-type", "/p", &["u:a"]),
        ],
    )
    .await?;
    use SelectorMatch::*;
    type Case<'a> = (&'a [&'a str], SelectorMatch, Option<&'a str>, &'a [&'a str]);
    let cases: Vec<Case<'_>> = vec![
        (&["t:a"], Exact, None, &["/a"]),
        (&["t:a", "t:b"], Exact, None, &["/ab", "/ab-q"]),
        (&["t:b", "t:a"], Exact, Some("/q"), &["/ab-q"]),
        (&["t:a", "t:b", "t:c", "t:d"], Exact, None, &[]),
        (&["t:a", "t:b"], Subset, None, &["/a", "/ab", "/b", "/ab-q"]),
        (
            &["t:a", "t:b", "t:c"],
            Subset,
            None,
            &["/a", "/ab", "/abc", "/b", "/ab-q"],
        ),
        (&["t:c", "t:d", "t:x"], Subset, None, &["/cd"]),
        (&["t:c"], Subset, None, &[]),
        (&["t:b"], Subset, None, &["/b"]),
        (&["t:d"], Superset, None, &["/cd"]),
        (&["t:d"], Exact, None, &[]),
        (&["t:a", "t:b"], Subset, Some("/p"), &["/a", "/ab", "/b"]),
        (&["t:a"], Superset, None, &["/a", "/ab", "/abc", "/ab-q"]),
        (&["t:a", "t:b"], Superset, None, &["/ab", "/abc", "/ab-q"]),
        (&["t:a", "t:d"], Superset, None, &[]),
        (
            &["t:a", "t:d"],
            Any,
            None,
            &["/a", "/ab", "/abc", "/cd", "/ab-q"],
        ),
        (&["t:x"], Any, None, &[]),
        (&["k8s:ns:a"], Exact, None, &["/colon"]),
        (&["u:a"], Any, None, &["/other-type"]),
        (
            &["k8s:ns:a", "u:a", "t:a"],
            Subset,
            None,
            &["/a", "/colon", "/other-type"],
        ),
        // Empty sets.
        (&[], Any, None, &[]),
        (&[], Exact, None, &[]),
        (&[], Subset, None, &[]),
        (&[], Superset, Some("/q"), &["/ab-q"]),
    ];
    for (given, mode, parent, want) in cases {
        let filter = EntryFilter {
            parent_id: parent.map(id),
            selectors: Some((sels(given), mode)),
            ..Default::default()
        };
        let got = list_all(&*ds, &filter, 2).await?;
        assert_eq!(
            spiffe_ids(&got),
            want,
            "{mode:?} {given:?} parent {parent:?}"
        );
        // Cross-check with the in-memory definition.
        for e in &got {
            let g = sels(given);
            let ok = match mode {
                Exact => e.selectors == g,
                Subset => e.selectors.is_subset_of(&g),
                Superset => e.selectors.is_superset_of(&g),
                Any => e.selectors.intersects(&g),
            };
            assert!(ok, "{mode:?} {given:?}: {}", e.spiffe_id);
        }
        assert_eq!(ds.count_entries(&filter).await?, want.len() as u64);
    }
    // spiffe_id filter, alone and combined.
    let f = EntryFilter {
        spiffe_id: Some(id("/ab")),
        ..Default::default()
    };
    assert_eq!(spiffe_ids(&list_all(&*ds, &f, 10).await?), vec!["/ab"]);
    let f = EntryFilter {
        spiffe_id: Some(id("/ab")),
        parent_id: Some(id("/q")),
        ..Default::default()
    };
    assert_eq!(ds.count_entries(&f).await?, 0);
    Ok(())
}

/// An entry without selectors is a subset of every set and equals the empty set.
pub(crate) async fn entries_without_selectors_match_every_subset(
    store: &dyn TestStore,
) -> TestResult {
    // The API never creates them, but the datastore must not get the set algebra wrong.
    let ds = store.open().await?;
    create_all(
        &*ds,
        vec![entry("/none", "/p", &[]), entry("/a", "/p", &["t:a"])],
    )
    .await?;
    let f = |s: &[&str], m| EntryFilter {
        selectors: Some((sels(s), m)),
        ..Default::default()
    };
    let got = list_all(&*ds, &f(&["t:a"], SelectorMatch::Subset), 10).await?;
    assert_eq!(spiffe_ids(&got), vec!["/none", "/a"]);
    let got = list_all(&*ds, &f(&[], SelectorMatch::Exact), 10).await?;
    assert_eq!(spiffe_ids(&got), vec!["/none"]);
    assert_eq!(ds.count_entries(&f(&[], SelectorMatch::Subset)).await?, 1);
    Ok(())
}

/// Filtered and unfiltered paging returns every match once, in creation order, at any page size,
/// also while entries are deleted; page size 0 is the default.
pub(crate) async fn pagination_with_filter_has_no_gaps_or_duplicates(
    store: &dyn TestStore,
) -> TestResult {
    let ds = store.open().await?;
    let mut batch = Vec::new();
    for i in 0..250 {
        let parent = if i % 3 == 0 { "/node/a" } else { "/node/b" };
        batch.push(entry(
            &format!("/w/{i}"),
            parent,
            &[&format!("u:{}", i % 7), "k:x"],
        ));
    }
    let created = create_all(&*ds, batch).await?;
    let filter = EntryFilter {
        parent_id: Some(id("/node/a")),
        selectors: Some((sels(&["u:0", "u:1", "k:x"]), SelectorMatch::Subset)),
        ..Default::default()
    };
    let want: Vec<String> = created
        .iter()
        .filter(|e| {
            e.parent_id == id("/node/a") && e.selectors.is_subset_of(&sels(&["u:0", "u:1", "k:x"]))
        })
        .map(|e| e.id.clone())
        .collect();
    assert!(want.len() > 10);
    for page_size in [1, 3, 7, want.len(), want.len() + 1] {
        let got: Vec<String> = list_all(&*ds, &filter, page_size)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(got, want, "page size {page_size}");
    }
    // Unfiltered: insertion order, all of them, also while entries are deleted mid-way.
    let first = ds.list_entries(&EntryFilter::default(), 100, None).await?;
    ds.delete_entry(&created[100].id).await?; // the first row of the next page
    ds.delete_entry(&created[99].id).await?; // the row the token points at
    let rest = list_all_from(&*ds, first.next_token.as_deref()).await?;
    let mut all: Vec<String> = first.items.iter().map(|e| e.id.clone()).collect();
    all.extend(rest);
    let want: Vec<String> = created
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 100)
        .map(|(_, e)| e.id.clone())
        .collect();
    assert_eq!(all, want);
    // Sizes: 0 means the default, huge values are capped.
    let page = ds.list_entries(&EntryFilter::default(), 0, None).await?;
    assert_eq!(page.items.len(), 248);
    assert_eq!(effective_page_size(0), DEFAULT_PAGE_SIZE);
    assert_eq!(effective_page_size(usize::MAX), MAX_PAGE_SIZE);
    Ok(())
}

/// Page tokens the datastore did not produce are `InvalidPageToken`; the empty token is the first
/// page.
pub(crate) async fn garbage_page_tokens_are_rejected(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    create_all(&*ds, vec![entry("/a", "/p", &["t:a"])]).await?;
    let f = EntryFilter::default();
    for t in [
        "x",
        "e",
        "e-1",
        "e0",
        "e1x",
        "a1",
        "e99999999999999999999",
        "💥",
        "e 1",
    ] {
        match ds.list_entries(&f, 10, Some(t)).await {
            Err(DatastoreError::InvalidPageToken(_)) => {}
            other => panic!("token {t:?}: {other:?}"),
        }
    }
    match ds.list_agents(10, Some("e5")).await {
        Err(DatastoreError::InvalidPageToken(_)) => {}
        other => panic!("entry token for agents: {other:?}"),
    }
    // The proto default (empty string) is the first page; a token past the end is empty.
    assert_eq!(ds.list_entries(&f, 10, Some("")).await?.items.len(), 1);
    assert!(ds
        .list_entries(&f, 10, Some("e999"))
        .await?
        .items
        .is_empty());
    Ok(())
}

/// A batch refuses each duplicate (of a stored entry or of an earlier one in the batch) alone and
/// stores the rest with increasing revisions.
pub(crate) async fn duplicates_are_refused_per_entry(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let stored = create_all(&*ds, vec![entry("/a", "/p", &["t:1", "t:2"])])
        .await?
        .remove(0);
    let results = ds
        .create_entries(vec![
            entry("/b", "/p", &["t:1"]),
            entry("/a", "/p", &["t:2", "t:1"]), // same as stored (selector order irrelevant)
            entry("/c", "/p", &["t:1"]),
            entry("/b", "/p", &["t:1"]), // same as the first of this batch
            entry("/a", "/p", &["t:1"]), // different selectors: fine
            entry("/a", "/q", &["t:1", "t:2"]), // different parent: fine
        ])
        .await?;
    assert_eq!(results.len(), 6);
    let first_b = match &results[0] {
        Ok(e) => e.id.clone(),
        Err(e) => return Err(format!("first /b: {e}").into()),
    };
    match &results[1] {
        Err(DatastoreError::AlreadyExists(existing)) => assert_eq!(existing, &stored.id),
        other => panic!("stored duplicate: {other:?}"),
    }
    match &results[3] {
        Err(DatastoreError::AlreadyExists(existing)) => assert_eq!(existing, &first_b),
        other => panic!("in-batch duplicate: {other:?}"),
    }
    for i in [0, 2, 4, 5] {
        assert!(results[i].is_ok(), "entry {i}: {:?}", results[i]);
    }
    assert_eq!(ds.count_entries(&EntryFilter::default()).await?, 5);
    // Revisions are distinct and increasing in batch order.
    let revs: Vec<i64> = results.iter().flatten().map(|e| e.revision).collect();
    assert_eq!(revs, vec![2, 3, 4, 5]);
    Ok(())
}

/// An update onto another entry's registration is `AlreadyExists`; updates and deletes of missing
/// ids are `NotFound`.
pub(crate) async fn update_collisions_and_not_found(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let created = create_all(
        &*ds,
        vec![entry("/a", "/p", &["t:1"]), entry("/b", "/p", &["t:1"])],
    )
    .await?;
    let (a, b) = (&created[0], &created[1]);
    let mut clash = b.clone();
    clash.spiffe_id = a.spiffe_id.clone();
    match ds.update_entry(clash).await {
        Err(DatastoreError::AlreadyExists(other)) => assert_eq!(other, a.id),
        other => panic!("collision: {other:?}"),
    }
    // Updating an entry to its own registration (e.g. only the hint) is fine.
    let mut same = b.clone();
    same.hint = "new hint".into();
    let updated = ds.update_entry(same).await?;
    assert_eq!(updated.hint, "new hint");
    assert_eq!(updated.revision, 3);

    let mut ghost = a.clone();
    ghost.id = "00000000-0000-4000-8000-000000000000".into();
    assert!(matches!(
        ds.update_entry(ghost).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        ds.delete_entry("nope").await,
        Err(DatastoreError::NotFound(_))
    ));
    ds.delete_entry(&a.id).await?;
    assert!(matches!(
        ds.delete_entry(&a.id).await,
        Err(DatastoreError::NotFound(_))
    ));
    // The freed registration can be created again, under a new id.
    let again = create_all(&*ds, vec![entry("/a", "/p", &["t:1"])])
        .await?
        .remove(0);
    assert_ne!(again.id, a.id);
    // The failed update left nothing behind.
    assert_eq!(ds.get_entry(&b.id).await?, Some(updated));
    Ok(())
}

/// Every write takes the next revision, which never goes back; `entry_changes_since` returns what
/// changed after a revision.
pub(crate) async fn revisions_and_changes_since(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let empty = ds.entry_changes_since(0).await?;
    assert_eq!(
        (empty.upserted.len(), empty.removed.len(), empty.revision),
        (0, 0, 0)
    );

    let c = create_all(
        &*ds,
        vec![
            entry("/1", "/p", &["t:1"]),
            entry("/2", "/p", &["t:2"]),
            entry("/3", "/p", &["t:3"]),
        ],
    )
    .await?; // revisions 1, 2, 3
    let all = ds.entry_changes_since(0).await?;
    assert_eq!(all.revision, 3);
    assert_eq!(all.upserted, c);

    let mut u = c[0].clone();
    u.hint = "changed".into();
    let u = ds.update_entry(u).await?; // 4
    ds.delete_entry(&c[1].id).await?; // 5
    let since3 = ds.entry_changes_since(3).await?;
    assert_eq!(since3.revision, 5);
    assert_eq!(since3.upserted, vec![u.clone()]);
    assert_eq!(since3.removed, vec![c[1].id.clone()]);

    // Deleting the newest entry does not let the counter go back.
    ds.delete_entry(&u.id).await?; // 6
    let n = create_all(&*ds, vec![entry("/4", "/p", &["t:4"])])
        .await?
        .remove(0);
    assert_eq!(n.revision, 7);
    let since5 = ds.entry_changes_since(5).await?;
    assert_eq!(since5.upserted, vec![n.clone()]);
    assert_eq!(since5.removed, vec![u.id.clone()]);
    assert_eq!(since5.revision, 7);
    let latest = ds.entry_changes_since(7).await?;
    assert!(latest.upserted.is_empty() && latest.removed.is_empty());
    assert_eq!(latest.revision, 7);
    // A batch with only duplicates consumes no revision.
    let dup = ds.create_entries(vec![entry("/4", "/p", &["t:4"])]).await?;
    assert!(matches!(dup[0], Err(DatastoreError::AlreadyExists(_))));
    assert_eq!(ds.entry_changes_since(7).await?.revision, 7);
    Ok(())
}

/// Entries, tombstones, agents, join tokens, bundles and the revision counter survive closing and
/// opening the store.
pub(crate) async fn data_survives_reopen(store: &dyn TestStore) -> TestResult {
    let (created, token_exp) = {
        let ds = store.open().await?;
        let created = create_all(&*ds, vec![entry("/a", "/p", &["t:1"])]).await?;
        ds.delete_entry(&create_all(&*ds, vec![entry("/gone", "/p", &["t:1"])]).await?[0].id)
            .await?;
        ds.upsert_agent(agent("/agent/1")).await?;
        ds.create_join_token(JoinToken {
            token: "tok".into(),
            expires_at: 4_000_000_000,
            spiffe_id: Some(id("/alias")),
        })
        .await?;
        ds.set_bundle(bundle(&[b"root"], "[]")).await?;
        (created, 4_000_000_000)
    }; // dropped: connections closed
    let ds = store.open().await?;
    assert_eq!(
        ds.get_entry(&created[0].id).await?,
        Some(created[0].clone())
    );
    let changes = ds.entry_changes_since(0).await?;
    assert_eq!(changes.revision, 3);
    assert_eq!(changes.removed.len(), 1);
    assert!(ds.get_agent(&id("/agent/1")).await?.is_some());
    let t = ds.consume_join_token("tok", 0).await?;
    assert_eq!((t.expires_at, t.spiffe_id), (token_exp, Some(id("/alias"))));
    assert_eq!(
        ds.get_bundle(&TrustDomain::new("example.org")?)
            .await?
            .map(|b| b.sequence),
        Some(1)
    );
    // New revisions continue after the stored ones.
    let next = create_all(&*ds, vec![entry("/b", "/p", &["t:1"])])
        .await?
        .remove(0);
    assert_eq!(next.revision, 4);
    Ok(())
}

/// A renewed agent SVID is recorded beside the current one only on top of the current serial,
/// promoted once, and never for a banned or evicted agent.
pub(crate) async fn renewed_agent_svid_waits_beside_the_current_one_until_promoted(
    store: &dyn TestStore,
) -> TestResult {
    let ds = store.open().await?;
    let a = id("/agent/1");
    let new = |serial: &str| NewAgentSvid {
        serial: serial.into(),
        expires_at: 1_950_000_000,
    };
    assert!(
        !ds.set_agent_new_svid(&a, "0a1b", new("0c")).await?,
        "no agent"
    );
    ds.upsert_agent(agent("/agent/1")).await?;
    assert_eq!(ds.get_agent(&a).await?.ok_or("agent")?.new_x509_svid, None);
    // Only on top of the serial the caller authenticated with.
    assert!(!ds.set_agent_new_svid(&a, "ffff", new("0c")).await?);
    assert!(ds.set_agent_new_svid(&a, "0a1b", new("0c")).await?);
    let got = ds.get_agent(&a).await?.ok_or("agent")?;
    assert_eq!(got.x509_svid_serial, "0a1b", "the current one stays");
    assert_eq!(got.new_x509_svid, Some(new("0c")));
    // A second renewal from the current SVID replaces the unused one; it survives a reopen.
    assert!(ds.set_agent_new_svid(&a, "0a1b", new("0d")).await?);
    drop(ds);
    let ds = store.open().await?;
    assert_eq!(
        ds.get_agent(&a).await?.ok_or("agent")?.new_x509_svid,
        Some(new("0d"))
    );
    // Promotion: only the pending serial, once.
    assert!(!ds.promote_agent_svid(&a, "0c").await?);
    assert!(!ds.promote_agent_svid(&a, "0a1b").await?);
    assert!(ds.promote_agent_svid(&a, "0d").await?);
    let got = ds.get_agent(&a).await?.ok_or("agent")?;
    assert_eq!(got.x509_svid_serial, "0d");
    assert_eq!(got.x509_svid_expires_at, 1_950_000_000);
    assert_eq!(got.new_x509_svid, None);
    assert!(!ds.promote_agent_svid(&a, "0d").await?);
    // An attestation (upsert) replaces a pending renewal.
    assert!(ds.set_agent_new_svid(&a, "0d", new("0e")).await?);
    ds.upsert_agent(agent("/agent/1")).await?;
    assert_eq!(ds.get_agent(&a).await?.ok_or("agent")?.new_x509_svid, None);
    // Banned: neither recorded nor promoted.
    assert!(ds.set_agent_new_svid(&a, "0a1b", new("0f")).await?);
    ds.set_agent_banned(&a, true).await?;
    assert!(!ds.promote_agent_svid(&a, "0f").await?);
    assert!(!ds.set_agent_new_svid(&a, "0a1b", new("10")).await?);
    assert_eq!(
        ds.get_agent(&a).await?.ok_or("agent")?.x509_svid_serial,
        "0a1b"
    );
    // Evicted: both gone.
    ds.delete_agent(&a).await?;
    assert!(!ds.promote_agent_svid(&a, "0f").await?);
    assert_eq!(ds.get_agent(&a).await?, None);
    Ok(())
}

/// Agents are replaced by SPIFFE ID (keeping created_at and their place), paged in insertion
/// order, banned (an upsert does not unban) and evicted.
pub(crate) async fn agents_upsert_list_ban_evict(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    assert_eq!(ds.count_agents().await?, 0);
    assert_eq!(ds.get_agent(&id("/agent/x")).await?, None);
    for i in 0..5 {
        ds.upsert_agent(agent(&format!("/agent/{i}"))).await?;
    }
    assert_eq!(ds.count_agents().await?, 5);
    let a2 = ds.get_agent(&id("/agent/2")).await?.ok_or("agent 2")?;
    assert!(a2.created_at > 0 && a2.updated_at >= a2.created_at);
    assert_eq!(a2.selectors, sels(&["join_token:abc"]));
    assert!(!a2.banned);

    // Replace: new serial and selectors, same position, created_at kept.
    let mut renewed = agent("/agent/2");
    renewed.x509_svid_serial = "ff".into();
    renewed.selectors = sels(&["x509pop:subject:cn:n2", "x509pop:ca:abc"]);
    renewed.created_at = 1;
    ds.upsert_agent(renewed.clone()).await?;
    let got = ds.get_agent(&id("/agent/2")).await?.ok_or("agent 2")?;
    assert_eq!(got.x509_svid_serial, "ff");
    assert_eq!(got.selectors, renewed.selectors);
    assert_eq!(got.created_at, a2.created_at);
    assert_eq!(ds.count_agents().await?, 5);

    // Paging in insertion order.
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let page = ds.list_agents(2, token.as_deref()).await?;
        seen.extend(page.items.iter().map(|a| a.spiffe_id.path().to_string()));
        token = page.next_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(
        seen,
        ["/agent/0", "/agent/1", "/agent/2", "/agent/3", "/agent/4"]
    );

    // Ban; an upsert (re-attestation racing with the ban) does not clear it.
    ds.set_agent_banned(&id("/agent/1"), true).await?;
    ds.upsert_agent(agent("/agent/1")).await?;
    assert!(
        ds.get_agent(&id("/agent/1"))
            .await?
            .ok_or("agent 1")?
            .banned
    );
    ds.set_agent_banned(&id("/agent/1"), false).await?;
    assert!(
        !ds.get_agent(&id("/agent/1"))
            .await?
            .ok_or("agent 1")?
            .banned
    );

    // Evict.
    ds.delete_agent(&id("/agent/3")).await?;
    assert_eq!(ds.get_agent(&id("/agent/3")).await?, None);
    assert_eq!(ds.count_agents().await?, 4);
    assert!(matches!(
        ds.delete_agent(&id("/agent/3")).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        ds.set_agent_banned(&id("/agent/3"), true).await,
        Err(DatastoreError::NotFound(_))
    ));
    Ok(())
}

/// A join token is taken once, expires at `expires_at` (and is deleted by the attempt), and is
/// pruned once expired.
pub(crate) async fn join_tokens_are_single_use_and_expire(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    ds.create_join_token(JoinToken {
        spiffe_id: Some(id("/node/alias")),
        ..token("t1", 1000)
    })
    .await?;
    ds.create_join_token(token("t2", 1000)).await?;
    assert!(
        ds.create_join_token(token("t2", 5)).await.is_err(),
        "duplicate token"
    );

    let t = ds.consume_join_token("t1", 999).await?;
    assert_eq!(t.token, "t1");
    assert_eq!(t.spiffe_id, Some(id("/node/alias")));
    assert!(matches!(
        ds.consume_join_token("t1", 999).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert!(matches!(
        ds.consume_join_token("never", 0).await,
        Err(DatastoreError::NotFound(_))
    ));
    // Expired at expires_at, and deleted by the attempt.
    assert!(matches!(
        ds.consume_join_token("t2", 1000).await,
        Err(DatastoreError::Expired)
    ));
    assert!(matches!(
        ds.consume_join_token("t2", 0).await,
        Err(DatastoreError::NotFound(_))
    ));

    // Prune.
    ds.create_join_token(token("secret-token", 10)).await?;
    ds.create_join_token(token("later", 100)).await?;
    ds.create_join_token(token("soon", 50)).await?;
    assert_eq!(ds.prune_join_tokens(50).await?, 2); // secret-token (10) and soon (50)
    assert_eq!(ds.prune_join_tokens(50).await?, 0);
    assert_eq!(ds.consume_join_token("later", 99).await?.expires_at, 100);
    Ok(())
}

/// Of several concurrent consumers of one join token exactly one gets it.
pub(crate) async fn concurrent_consume_has_one_winner(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    for round in 0..20 {
        let t = format!("tok-{round}");
        ds.create_join_token(token(&t, i64::MAX)).await?;
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let ds = Arc::clone(&ds);
                let t = t.clone();
                tokio::spawn(async move { ds.consume_join_token(&t, 0).await })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            match task.await? {
                Ok(_) => wins += 1,
                Err(DatastoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        assert_eq!(wins, 1, "round {round}");
    }
    Ok(())
}

/// The bundle sequence starts at 1 and grows only when roots or JWKS (as JSON values) change;
/// trust domains are independent.
pub(crate) async fn bundle_sequence_bumps_only_on_change(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let td = TrustDomain::new("example.org")?;
    assert_eq!(ds.get_bundle(&td).await?, None);
    let s = ds
        .set_bundle(bundle(&[b"r1"], r#"[{"kid":"a","kty":"EC"}]"#))
        .await?;
    assert_eq!(s.sequence, 1, "input sequence ignored");
    assert_eq!(ds.get_bundle(&td).await?, Some(s.clone()));
    // Same content (JWKS re-serialised with another key order): unchanged.
    let same = ds
        .set_bundle(bundle(&[b"r1"], r#"[{"kty":"EC", "kid":"a"}]"#))
        .await?;
    assert_eq!(same, s);
    let s2 = ds
        .set_bundle(bundle(&[b"r1", b"r2"], r#"[{"kid":"a","kty":"EC"}]"#))
        .await?;
    assert_eq!(s2.sequence, 2);
    let s3 = ds.set_bundle(bundle(&[b"r1", b"r2"], "[]")).await?;
    assert_eq!(s3.sequence, 3);
    let s4 = ds.set_bundle(bundle(&[b"r2", b"r1"], "[]")).await?; // order is content
    assert_eq!(s4.sequence, 4);
    assert_eq!(ds.get_bundle(&td).await?, Some(s4));
    // Binary roots round-trip exactly; other trust domains are independent.
    let other = StoredBundle {
        trust_domain: TrustDomain::new("other.org")?,
        x509_roots: vec![vec![0, 255, 10, 13], Vec::new()],
        ..bundle(&[], "")
    };
    let o = ds.set_bundle(other.clone()).await?;
    assert_eq!(o.sequence, 1);
    assert_eq!(
        ds.get_bundle(&other.trust_domain)
            .await?
            .map(|b| b.x509_roots),
        Some(other.x509_roots)
    );
    Ok(())
}

/// Federated bundles follow the same sequence rule, list by trust domain name, delete once, and
/// live apart from the own bundle.
pub(crate) async fn federated_bundles_set_get_list_delete(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let other = TrustDomain::new("other.org")?;
    assert!(ds.list_federated_bundles().await?.is_empty());
    assert_eq!(ds.get_federated_bundle(&other).await?, None);

    let o1 = ds
        .set_federated_bundle(federated("other.org", &[b"o1"], "[]"))
        .await?;
    assert_eq!(o1.sequence, 1, "input sequence ignored");
    let a1 = ds
        .set_federated_bundle(federated("aaa.org", &[], r#"[{"kid":"k"}]"#))
        .await?;
    assert_eq!(a1.sequence, 1);
    // Same content again: unchanged; new content: next sequence.
    assert_eq!(
        ds.set_federated_bundle(federated("other.org", &[b"o1"], "[]"))
            .await?,
        o1
    );
    let o2 = ds
        .set_federated_bundle(federated("other.org", &[b"o1", b"o2"], "[]"))
        .await?;
    assert_eq!(o2.sequence, 2);
    assert_eq!(ds.get_federated_bundle(&other).await?, Some(o2.clone()));
    // Ordered by trust domain name.
    assert_eq!(
        ds.list_federated_bundles().await?,
        vec![a1.clone(), o2.clone()]
    );

    // Federated bundles and the server's own bundle are separate.
    ds.set_bundle(bundle(&[b"own"], "[]")).await?;
    let own_td = TrustDomain::new("example.org")?;
    assert_eq!(ds.get_federated_bundle(&own_td).await?, None);
    assert_eq!(ds.list_federated_bundles().await?.len(), 2);
    assert_eq!(ds.get_bundle(&other).await?, None);

    assert_eq!(ds.delete_federated_bundle(&other).await?, o2);
    assert_eq!(ds.get_federated_bundle(&other).await?, None);
    assert!(matches!(
        ds.delete_federated_bundle(&other).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert_eq!(ds.list_federated_bundles().await?, vec![a1]);
    assert!(
        ds.get_bundle(&own_td).await?.is_some(),
        "own bundle untouched"
    );
    // Set again after delete: a new bundle.
    let again = ds
        .set_federated_bundle(federated("other.org", &[b"o3"], "[]"))
        .await?;
    assert_eq!(again.sequence, 1);
    Ok(())
}

/// Federated bundles and their sequence survive closing and opening the store.
pub(crate) async fn federated_bundles_survive_reopen(store: &dyn TestStore) -> TestResult {
    let stored = {
        let ds = store.open().await?;
        ds.set_federated_bundle(federated("other.org", &[b"r1"], "[]"))
            .await?;
        ds.set_federated_bundle(federated("other.org", &[b"r2"], r#"[{"kid":"a"}]"#))
            .await?
    };
    let ds = store.open().await?;
    assert_eq!(stored.sequence, 2);
    assert_eq!(ds.list_federated_bundles().await?, vec![stored.clone()]);
    // The sequence continues from the stored one.
    let next = ds
        .set_federated_bundle(federated("other.org", &[b"r3"], "[]"))
        .await?;
    assert_eq!(next.sequence, 3);
    Ok(())
}

/// A relationship with `td` (times are the datastore's to set: these are ignored).
pub(crate) fn relationship(
    td: &str,
    url: &str,
    profile: EndpointProfile,
) -> FederationRelationship {
    FederationRelationship {
        trust_domain: TrustDomain::new(td).expect("td"),
        bundle_endpoint_url: url.into(),
        profile,
        created_at: 7,
        updated_at: 7,
    }
}

/// Relationships: create refuses a second one for a trust domain, get/list read what was
/// stored (ordered by trust domain), update keeps created_at and needs an existing one, delete
/// returns what it removed once.
pub(crate) async fn federation_relationships_create_get_list_update_delete(
    store: &dyn TestStore,
) -> TestResult {
    let ds = store.open().await?;
    let other = TrustDomain::new("other.org")?;
    assert!(ds.list_federation_relationships().await?.is_empty());
    assert_eq!(ds.get_federation_relationship(&other).await?, None);

    let spiffe = EndpointProfile::HttpsSpiffe {
        endpoint_spiffe_id: SpiffeId::parse("spiffe://other.org/sigil/server")?,
    };
    let before = sigil::clock::now_unix();
    let o = ds
        .create_federation_relationship(relationship(
            "other.org",
            "https://other.org:8443/bundle",
            spiffe.clone(),
        ))
        .await?;
    assert!(o.created_at >= before && o.created_at != 7, "{o:?}");
    assert_eq!(o.updated_at, o.created_at);
    assert_eq!(o.profile, spiffe);
    let a = ds
        .create_federation_relationship(relationship(
            "aaa.org",
            "https://aaa.org/",
            EndpointProfile::HttpsWeb,
        ))
        .await?;
    match ds
        .create_federation_relationship(relationship(
            "other.org",
            "https://elsewhere.org/",
            EndpointProfile::HttpsWeb,
        ))
        .await
    {
        Err(DatastoreError::RelationshipExists(td)) => assert_eq!(td, other),
        x => panic!("second relationship with other.org: {x:?}"),
    }
    assert_eq!(
        ds.get_federation_relationship(&other).await?,
        Some(o.clone())
    );
    assert_eq!(
        ds.list_federation_relationships().await?,
        vec![a.clone(), o.clone()]
    );

    // Update: URL and profile replaced (the endpoint ID goes with https_spiffe).
    let mut changed = relationship(
        "other.org",
        "https://other.org/v2",
        EndpointProfile::HttpsWeb,
    );
    changed.created_at = 1;
    let u = ds.update_federation_relationship(changed).await?;
    assert_eq!(u.created_at, o.created_at, "created_at kept");
    assert!(u.updated_at >= o.updated_at);
    assert_eq!(u.bundle_endpoint_url, "https://other.org/v2");
    assert_eq!(u.profile, EndpointProfile::HttpsWeb);
    assert_eq!(
        ds.get_federation_relationship(&other).await?,
        Some(u.clone())
    );
    assert!(matches!(
        ds.update_federation_relationship(relationship(
            "none.org",
            "https://none.org/",
            EndpointProfile::HttpsWeb
        ))
        .await,
        Err(DatastoreError::NotFound(_))
    ));

    assert_eq!(ds.delete_federation_relationship(&other).await?, u);
    assert!(matches!(
        ds.delete_federation_relationship(&other).await,
        Err(DatastoreError::NotFound(_))
    ));
    assert_eq!(ds.list_federation_relationships().await?, vec![a]);
    // Created again after delete.
    ds.create_federation_relationship(relationship(
        "other.org",
        "https://other.org/",
        EndpointProfile::HttpsWeb,
    ))
    .await?;
    Ok(())
}

/// Relationships survive closing and opening the store, and deleting one leaves the federated
/// bundle of its trust domain (and deleting the bundle leaves the relationship).
pub(crate) async fn federation_relationships_survive_reopen_apart_from_bundles(
    store: &dyn TestStore,
) -> TestResult {
    let other = TrustDomain::new("other.org")?;
    let stored = {
        let ds = store.open().await?;
        ds.set_federated_bundle(federated("other.org", &[b"r1"], "[]"))
            .await?;
        ds.create_federation_relationship(relationship(
            "other.org",
            "https://other.org/bundle",
            EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: SpiffeId::parse("spiffe://other.org/spire/server")?,
            },
        ))
        .await?
    };
    let ds = store.open().await?;
    assert_eq!(
        ds.list_federation_relationships().await?,
        vec![stored.clone()]
    );
    ds.delete_federated_bundle(&other).await?;
    assert_eq!(ds.get_federation_relationship(&other).await?, Some(stored));
    ds.set_federated_bundle(federated("other.org", &[b"r2"], "[]"))
        .await?;
    ds.delete_federation_relationship(&other).await?;
    assert!(ds.get_federated_bundle(&other).await?.is_some());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Documented semantics beyond the single-call cases

/// An empty batch creates nothing and takes no revision.
pub(crate) async fn empty_batches_write_nothing(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    assert!(ds.create_entries(Vec::new()).await?.is_empty());
    assert_eq!(ds.entry_changes_since(0).await?.revision, 0);
    create_all(&*ds, vec![entry("/a", "/p", &["t:1"])]).await?;
    assert!(ds.create_entries(Vec::new()).await?.is_empty());
    assert_eq!(ds.entry_changes_since(0).await?.revision, 1);
    assert_eq!(ds.count_entries(&EntryFilter::default()).await?, 1);
    Ok(())
}

/// `entry_changes_since` names each changed entry once, in revision order: an entry updated
/// twice is one upsert with its latest content, one created and deleted after the revision is
/// only a removal (its tombstone), and a registration deleted and created again is the old id
/// removed and the new entry upserted.
pub(crate) async fn changes_since_report_each_entry_once_with_tombstones(
    store: &dyn TestStore,
) -> TestResult {
    let ds = store.open().await?;
    let c = create_all(
        &*ds,
        vec![entry("/x", "/p", &["t:x"]), entry("/y", "/p", &["t:y"])],
    )
    .await?; // 1, 2
    let mut x = c[0].clone();
    x.hint = "first".into();
    ds.update_entry(x.clone()).await?; // 3
    x.hint = "second".into();
    let x = ds.update_entry(x).await?; // 4
    assert_eq!(x.revision, 4);
    let z = create_all(&*ds, vec![entry("/z", "/p", &["t:z"])])
        .await?
        .remove(0); // 5
    ds.delete_entry(&z.id).await?; // 6
    ds.delete_entry(&c[1].id).await?; // 7
    let y2 = create_all(&*ds, vec![entry("/y", "/p", &["t:y"])])
        .await?
        .remove(0); // 8
    assert_ne!(y2.id, c[1].id);

    let since2 = ds.entry_changes_since(2).await?;
    assert_eq!(since2.revision, 8);
    assert_eq!(since2.upserted, vec![x.clone(), y2.clone()]);
    assert_eq!(since2.removed, vec![z.id.clone(), c[1].id.clone()]);
    let since6 = ds.entry_changes_since(6).await?;
    assert_eq!(since6.upserted, vec![y2.clone()]);
    assert_eq!(since6.removed, vec![c[1].id.clone()]);
    // From the start: what exists now, and the tombstones of what does not.
    let all = ds.entry_changes_since(0).await?;
    assert_eq!(all.upserted, vec![x, y2]);
    assert_eq!(all.removed, vec![z.id, c[1].id.clone()]);
    // A revision from the future reports nothing, and the current revision.
    let ahead = ds.entry_changes_since(100).await?;
    assert!(ahead.upserted.is_empty() && ahead.removed.is_empty());
    assert_eq!(ahead.revision, 8);
    Ok(())
}

/// `upsert_agent` sets `updated_at` to now; `created_at` is the stored one when replacing, else
/// the given one, or now when 0 is given.
pub(crate) async fn agent_times_follow_the_upsert_rule(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let before = sigil::clock::now_unix();
    let given = AttestedAgent {
        created_at: 1234,
        updated_at: 5,
        ..agent("/agent/given")
    };
    ds.upsert_agent(given).await?;
    let got = ds.get_agent(&id("/agent/given")).await?.ok_or("agent")?;
    assert_eq!(got.created_at, 1234);
    assert!(got.updated_at >= before, "{} < {before}", got.updated_at);
    ds.upsert_agent(agent("/agent/now")).await?;
    let got = ds.get_agent(&id("/agent/now")).await?.ok_or("agent")?;
    assert!(got.created_at >= before && got.updated_at >= got.created_at);
    // Replacing keeps the stored creation time, whatever is given.
    ds.upsert_agent(AttestedAgent {
        created_at: 99,
        ..agent("/agent/given")
    })
    .await?;
    let got = ds.get_agent(&id("/agent/given")).await?.ok_or("agent")?;
    assert_eq!(got.created_at, 1234);
    Ok(())
}

/// `promote_agent_svid` is a compare-and-swap: of several concurrent promotions of the same
/// pending SVID exactly one succeeds, and the agent ends with that SVID current and none pending.
pub(crate) async fn concurrent_promotions_have_one_winner(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let a = id("/agent/1");
    ds.upsert_agent(agent("/agent/1")).await?;
    let mut current = "0a1b".to_string();
    for round in 0..20 {
        let serial = format!("{:04x}", 0x1000 + round);
        let new = NewAgentSvid {
            serial: serial.clone(),
            expires_at: 1_950_000_000 + round,
        };
        assert!(ds.set_agent_new_svid(&a, &current, new).await?);
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (ds, a, serial) = (Arc::clone(&ds), a.clone(), serial.clone());
                tokio::spawn(async move { ds.promote_agent_svid(&a, &serial).await })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            if task.await?? {
                wins += 1;
            }
        }
        assert_eq!(wins, 1, "round {round}");
        let got = ds.get_agent(&a).await?.ok_or("agent")?;
        assert_eq!(got.x509_svid_serial, serial, "round {round}");
        assert_eq!(got.x509_svid_expires_at, 1_950_000_000 + round);
        assert_eq!(got.new_x509_svid, None, "round {round}");
        current = serial;
    }
    Ok(())
}

/// A renewal recorded on top of the old serial and the promotion of the pending SVID exclude
/// each other: when they race exactly one succeeds, and the stored agent is what that one made.
pub(crate) async fn renewal_racing_promotion_has_one_winner(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let a = id("/agent/1");
    let svid = |serial: &str| NewAgentSvid {
        serial: serial.into(),
        expires_at: 1_950_000_000,
    };
    for round in 0..20 {
        ds.upsert_agent(agent("/agent/1")).await?; // current 0a1b, nothing pending
        assert!(ds.set_agent_new_svid(&a, "0a1b", svid("0p")).await?);
        let promote = {
            let (ds, a) = (Arc::clone(&ds), a.clone());
            tokio::spawn(async move { ds.promote_agent_svid(&a, "0p").await })
        };
        let renew = {
            let (ds, a) = (Arc::clone(&ds), a.clone());
            tokio::spawn(async move { ds.set_agent_new_svid(&a, "0a1b", svid("0r")).await })
        };
        let (promoted, renewed) = (promote.await??, renew.await??);
        assert!(
            promoted != renewed,
            "round {round}: promoted {promoted}, renewed {renewed}"
        );
        let got = ds.get_agent(&a).await?.ok_or("agent")?;
        if promoted {
            assert_eq!(got.x509_svid_serial, "0p", "round {round}");
            assert_eq!(got.new_x509_svid, None, "round {round}");
        } else {
            assert_eq!(got.x509_svid_serial, "0a1b", "round {round}");
            assert_eq!(got.new_x509_svid, Some(svid("0r")), "round {round}");
        }
    }
    Ok(())
}

/// Concurrent entry writes each take their own revision: no revision is handed out twice or
/// skipped, none is lost, and `entry_changes_since` sees every write.
pub(crate) async fn concurrent_writes_take_distinct_revisions(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let (tasks, per_task) = (8, 5);
    let creators: Vec<_> = (0..tasks)
        .map(|t| {
            let ds = Arc::clone(&ds);
            tokio::spawn(async move {
                let mut created = Vec::new();
                for i in 0..per_task {
                    let e = entry(&format!("/w/{t}/{i}"), "/p", &[&format!("t:{t}")]);
                    created.extend(create_all(&*ds, vec![e]).await?);
                }
                TestResult::Ok(created)
            })
        })
        .collect();
    let mut created = Vec::new();
    for task in creators {
        let mine = task.await??;
        // One task's writes are ordered.
        assert!(mine.windows(2).all(|w| w[0].revision < w[1].revision));
        created.extend(mine);
    }
    let n = (tasks * per_task) as i64;
    let revisions: BTreeSet<i64> = created.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, (1..=n).collect::<BTreeSet<_>>());
    // Updates and deletes race too.
    let writers: Vec<_> = created
        .iter()
        .take(8)
        .cloned()
        .enumerate()
        .map(|(i, mut e)| {
            let ds = Arc::clone(&ds);
            tokio::spawn(async move {
                if i % 2 == 0 {
                    e.hint = format!("updated {i}");
                    Ok(Some(ds.update_entry(e).await?.revision))
                } else {
                    ds.delete_entry(&e.id).await?;
                    TestResult::Ok(None)
                }
            })
        })
        .collect();
    let mut update_revisions = BTreeSet::new();
    for task in writers {
        if let Some(rev) = task.await?? {
            assert!(update_revisions.insert(rev), "revision {rev} twice");
        }
    }
    assert!(update_revisions.iter().all(|r| *r > n && *r <= n + 8));
    let changes = ds.entry_changes_since(n).await?;
    assert_eq!(changes.revision, n + 8);
    assert_eq!(changes.upserted.len(), 4);
    assert_eq!(changes.removed.len(), 4);
    let all = ds.entry_changes_since(0).await?;
    assert_eq!(all.upserted.len() as i64, n - 4);
    assert_eq!(
        ds.count_entries(&EntryFilter::default()).await?,
        (n - 4) as u64
    );
    Ok(())
}

/// Concurrent changes of one bundle each bump the sequence once: the sequences returned are
/// 1..=n with none twice, and the stored bundle carries the last. Own and federated alike.
pub(crate) async fn concurrent_bundle_changes_take_distinct_sequences(
    store: &dyn TestStore,
) -> TestResult {
    let ds = store.open().await?;
    let n = 8u64;
    for federated_table in [false, true] {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let ds = Arc::clone(&ds);
                tokio::spawn(async move {
                    let root = format!("root {i}").into_bytes();
                    let b = federated("other.org", &[&root], "[]");
                    if federated_table {
                        ds.set_federated_bundle(b).await
                    } else {
                        ds.set_bundle(b).await
                    }
                })
            })
            .collect();
        let mut sequences = BTreeSet::new();
        for task in tasks {
            let stored = task.await??;
            assert!(
                sequences.insert(stored.sequence),
                "sequence {} twice (federated: {federated_table})",
                stored.sequence
            );
        }
        assert_eq!(sequences, (1..=n).collect::<BTreeSet<_>>());
        let td = TrustDomain::new("other.org")?;
        let stored = if federated_table {
            ds.get_federated_bundle(&td).await?
        } else {
            ds.get_bundle(&td).await?
        };
        assert_eq!(stored.map(|b| b.sequence), Some(n));
    }
    Ok(())
}

/// A swap from a sequence that is no longer current writes nothing and returns what is stored.
pub(crate) async fn bundle_compare_and_set_refuses_a_stale_sequence(
    store: &dyn TestStore,
) -> TestResult {
    let ds = store.open().await?;
    let td = TrustDomain::new("example.org")?;
    assert_eq!(
        ds.compare_and_set_bundle(bundle(&[b"a"], "[]"), 1).await?,
        BundleSwap::Changed(None),
        "nothing stored: only 0 is current"
    );
    assert_eq!(ds.get_bundle(&td).await?, None);
    let BundleSwap::Stored(first) = ds.compare_and_set_bundle(bundle(&[b"a"], "[]"), 0).await?
    else {
        return Err("the first swap from 0 must store".into());
    };
    assert_eq!(first.sequence, 1);
    assert_eq!(
        ds.compare_and_set_bundle(bundle(&[b"b"], "[]"), 0).await?,
        BundleSwap::Changed(Some(first.clone()))
    );
    let BundleSwap::Stored(second) = ds
        .compare_and_set_bundle(bundle(&[b"a", b"b"], "[]"), 1)
        .await?
    else {
        return Err("a swap from the current sequence must store".into());
    };
    assert_eq!(second.sequence, 2);
    assert_eq!(second.x509_roots, vec![b"a".to_vec(), b"b".to_vec()]);
    // The same content again: stored as it is, no new sequence.
    assert_eq!(
        ds.compare_and_set_bundle(bundle(&[b"a", b"b"], "[]"), 2)
            .await?,
        BundleSwap::Stored(second.clone())
    );
    assert_eq!(
        ds.compare_and_set_bundle(bundle(&[b"c"], "[]"), 1).await?,
        BundleSwap::Changed(Some(second.clone()))
    );
    assert_eq!(ds.get_bundle(&td).await?, Some(second));
    Ok(())
}

/// Servers adding their roots at once by read, union, compare-and-set lose none.
pub(crate) async fn concurrent_bundle_merges_keep_every_root(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let td = TrustDomain::new("example.org")?;
    let n = 6;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ds = Arc::clone(&ds);
            let td = td.clone();
            tokio::spawn(async move {
                let root = format!("root {i}").into_bytes();
                loop {
                    let stored = ds.get_bundle(&td).await?;
                    let expected = stored.as_ref().map_or(0, |b| b.sequence);
                    let mut roots = stored.map(|b| b.x509_roots).unwrap_or_default();
                    roots.push(root.clone());
                    let refs: Vec<&[u8]> = roots.iter().map(Vec::as_slice).collect();
                    match ds
                        .compare_and_set_bundle(bundle(&refs, "[]"), expected)
                        .await?
                    {
                        BundleSwap::Stored(_) => return Ok::<_, DatastoreError>(()),
                        BundleSwap::Changed(_) => tokio::task::yield_now().await,
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let stored = ds.get_bundle(&td).await?.ok_or("no bundle stored")?;
    let roots: BTreeSet<Vec<u8>> = stored.x509_roots.iter().cloned().collect();
    let want: BTreeSet<Vec<u8>> = (0..n).map(|i| format!("root {i}").into_bytes()).collect();
    assert_eq!(roots, want);
    assert_eq!(stored.x509_roots.len(), n, "each root once");
    assert_eq!(stored.sequence, n as u64);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Authorised reads and the entry history

/// `read_authorized`: the matching aliases (non-empty selectors, a subset of the agent's), the
/// descent from the agent and the aliases through parent links (cycles end, the server's ID is
/// never expanded), breadth-first, at the current revision.
pub(crate) async fn read_authorized_follows_the_rule_in_one_read(
    store: &dyn TestStore,
) -> TestResult {
    let ds = store.open().await?;
    let server = id("/sigil/server");
    let agent = id("/sigil/agent/a");
    create_all(
        &*ds,
        vec![
            entry("/w1", "/sigil/agent/a", &["u:1"]),
            entry("/w1/child", "/w1", &["u:2"]),
            entry("/w1/child/leaf", "/w1/child", &["u:3"]),
            entry("/alias", "/sigil/server", &["node:a"]),
            entry("/alias-other", "/sigil/server", &["node:a", "node:gpu"]),
            entry("/alias-empty", "/sigil/server", &[]),
            entry("/under-alias", "/alias", &["u:4"]),
            entry("/under-other", "/alias-other", &["u:5"]),
            entry("/under-empty", "/alias-empty", &["u:6"]),
            // A cycle below the agent, and one nobody reaches.
            entry("/loop", "/w1", &["u:7"]),
            entry("/w1", "/loop", &["u:8"]),
            entry("/x", "/y", &["u:9"]),
            entry("/y", "/x", &["u:10"]),
            // Under the server's ID but not a node alias of this agent: never expanded.
            entry("/under-server", "/sigil/server", &["node:b"]),
        ],
    )
    .await?;
    let read = ds
        .read_authorized(&agent, &sels(&["node:a", "node:n1"]), &server)
        .await?;
    assert_eq!(read.revision, 14);
    assert_eq!(spiffe_ids(&read.aliases), ["/alias"]);
    let got: BTreeSet<String> = spiffe_ids(&read.entries).into_iter().collect();
    let want: BTreeSet<String> = [
        "/w1",
        "/w1/child",
        "/w1/child/leaf",
        "/under-alias",
        "/loop",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
    // /w1 is registered twice (under the agent and under /loop): both entries.
    assert_eq!(read.entries.len(), 6);
    // Breadth-first: the first level (children of the roots) comes first.
    let first_level: BTreeSet<&str> = read.entries[..2]
        .iter()
        .map(|e| e.spiffe_id.path())
        .collect();
    assert_eq!(first_level, BTreeSet::from(["/w1", "/under-alias"]));
    // No selectors: no aliases, only the agent's own subtree.
    let plain = ds.read_authorized(&agent, &sels(&[]), &server).await?;
    assert!(plain.aliases.is_empty());
    assert_eq!(plain.entries.len(), 5);
    Ok(())
}

/// The ids and SPIFFE ID paths of placements.
fn placements(p: &[super::Placement]) -> Vec<(String, String, String)> {
    p.iter()
        .map(|p| {
            (
                p.id.clone(),
                p.spiffe_id.path().to_string(),
                p.parent_id.path().to_string(),
            )
        })
        .collect()
}

/// Deletes record the deleted entry's SPIFFE ID and parent, updates that change either record
/// the former ones; `entry_history_since` returns them with the entries changed (and which were
/// created) since a revision, and which named SPIFFE IDs parent entries created by then.
pub(crate) async fn entry_history_records_former_placements(store: &dyn TestStore) -> TestResult {
    let ds = store.open().await?;
    let c = create_all(
        &*ds,
        vec![
            entry("/a", "/p", &["t:1"]),
            entry("/b", "/a", &["t:2"]),
            entry("/c", "/p", &["t:3"]),
            entry("/d", "/b", &["t:4"]),
        ],
    )
    .await?; // revisions 1-4
    let (a, b, cc, d) = (&c[0], &c[1], &c[2], &c[3]);
    let b5 = ds
        .update_entry(RegistrationEntry {
            hint: "in place".into(),
            ..b.clone()
        })
        .await?; // 5: not a move
    let c6 = ds
        .update_entry(RegistrationEntry {
            parent_id: id("/a"),
            ..cc.clone()
        })
        .await?; // 6: moved from /p to /a
    ds.delete_entry(&a.id).await?; // 7

    let h = ds
        .entry_history_since(4)
        .await?
        .ok_or("history since 4 is complete")?;
    assert_eq!(h.revision, 7);
    assert_eq!(
        placements(&h.changed),
        [
            (b.id.clone(), "/b".into(), "/a".into()),
            (cc.id.clone(), "/c".into(), "/a".into())
        ]
    );
    assert_eq!(
        h.changed.iter().map(|p| p.revision).collect::<Vec<_>>(),
        [b5.revision, c6.revision]
    );
    assert!(h.created.is_empty());
    assert_eq!(
        placements(&h.ended),
        [
            (cc.id.clone(), "/c".into(), "/p".into()),
            (a.id.clone(), "/a".into(), "/p".into())
        ]
    );
    assert_eq!(
        h.ended.iter().map(|p| p.revision).collect::<Vec<_>>(),
        [6, 7]
    );
    // Entries created by revision 4 hang below /b (/d) and /a (/b, updated in place since, and
    // /c, moved there since); none below /c.
    assert_eq!(h.anchored, HashSet::from([id("/a"), id("/b")]));

    let h0 = ds.entry_history_since(0).await?.ok_or("complete")?;
    assert_eq!(
        h0.created,
        HashSet::from([b.id.clone(), cc.id.clone(), d.id.clone()])
    );
    assert!(h0.anchored.is_empty());
    let h7 = ds.entry_history_since(7).await?.ok_or("complete")?;
    assert!(h7.changed.is_empty() && h7.ended.is_empty() && h7.anchored.is_empty());
    assert_eq!(h7.revision, 7);
    Ok(())
}

/// Pruning removes tombstones and former placements written before a time, and every one up to
/// the newest of those revisions: the history since an earlier revision is then `None` (a full
/// snapshot), since a later one still complete. The live changes lose the pruned removals.
pub(crate) async fn entry_history_pruning_ends_resumes_from_before_it(
    store: &dyn TestStore,
) -> TestResult {
    let ds = store.open().await?;
    let c = create_all(
        &*ds,
        vec![entry("/a", "/p", &["t:1"]), entry("/b", "/p", &["t:2"])],
    )
    .await?; // 1, 2
    ds.update_entry(RegistrationEntry {
        parent_id: id("/q"),
        ..c[1].clone()
    })
    .await?; // 3: a move
    ds.delete_entry(&c[0].id).await?; // 4
                                      // Nothing is older than the epoch: nothing pruned, the history stays complete.
    assert_eq!(ds.prune_entry_history(0).await?, 0);
    assert!(ds.entry_history_since(0).await?.is_some());
    // Everything is older than a time in the future.
    let later = sigil::clock::now_unix() + 3600;
    assert_eq!(ds.prune_entry_history(later).await?, 2);
    for since in [0, 2, 3] {
        assert!(
            ds.entry_history_since(since).await?.is_none(),
            "history since {since} was pruned"
        );
    }
    let h = ds.entry_history_since(4).await?.ok_or("history since 4")?;
    assert!(h.changed.is_empty() && h.ended.is_empty());
    assert!(ds.entry_changes_since(0).await?.removed.is_empty());
    // Recorded again from there; a second prune of nothing new changes nothing.
    ds.delete_entry(&c[1].id).await?; // 5
    assert_eq!(ds.prune_entry_history(0).await?, 0);
    let h = ds.entry_history_since(4).await?.ok_or("history since 4")?;
    assert_eq!(
        placements(&h.ended),
        [(c[1].id.clone(), "/b".into(), "/q".into())]
    );
    Ok(())
}
