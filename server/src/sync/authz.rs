//! Which registration entries an agent is authorised for (SPIRE's rule).
//!
//! Roots: the agent's SPIFFE ID, plus the SPIFFE ID of every node-alias entry (parent = the
//! server's ID) whose selectors are a non-empty subset of the agent's node selectors. Authorised:
//! every entry whose parent is a root, and recursively every entry whose parent is the SPIFFE ID
//! of an authorised entry. Node-alias entries themselves are not authorised entries, and the
//! server's ID is never expanded as a parent (only the selector rule reaches entries under it).
//!
//! The set is read by [`Datastore::read_authorized`] in one consistent snapshot: one selector
//! query for the aliases, then one `parent_id IN (...)` query per level of the descent, all on
//! one connection (see `datastore/descent.rs`); never a scan of all entries. [`is_authorized`]
//! walks up from one entry instead, one `spiffe_id` query per ancestor level.

use std::collections::{HashSet, VecDeque};

use sigil::entry::RegistrationEntry;
use sigil::{SelectorSet, SpiffeId};

pub(crate) use crate::datastore::descent::alias_matches;
use crate::datastore::{AttestedAgent, Datastore, DatastoreError, EntryFilter};

/// Page size for the listing queries (the datastore's maximum).
const PAGE: usize = 10_000;

/// The full result of an authorisation computation, as the sync stream needs it.
#[derive(Debug, Default)]
pub(crate) struct AuthorizedSet {
    /// The agent's ID and the SPIFFE IDs of the matching node aliases.
    pub roots: HashSet<SpiffeId>,
    /// Entry ids of the matching node-alias entries.
    pub alias_ids: HashSet<String>,
    /// The authorised entries, breadth-first from the roots.
    pub entries: Vec<RegistrationEntry>,
    /// The entry revision the set is current at (one consistent read).
    pub revision: i64,
}

/// All entries matching `filter`, every page.
async fn list_all(
    ds: &dyn Datastore,
    filter: &EntryFilter,
) -> Result<Vec<RegistrationEntry>, DatastoreError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = ds.list_entries(filter, PAGE, token.as_deref()).await?;
        out.extend(page.items);
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

/// True if any entry has `parent` as its parent.
pub(crate) async fn has_children(
    ds: &dyn Datastore,
    parent: &SpiffeId,
) -> Result<bool, DatastoreError> {
    let filter = EntryFilter {
        parent_id: Some(parent.clone()),
        ..Default::default()
    };
    Ok(ds.count_entries(&filter).await? > 0)
}

/// Computes the roots, matching aliases and authorised entries of the agent `agent_id` with node
/// selectors `selectors`, and the revision they are current at.
pub(crate) async fn compute(
    ds: &dyn Datastore,
    agent_id: &SpiffeId,
    selectors: &SelectorSet,
    server_id: &SpiffeId,
) -> Result<AuthorizedSet, DatastoreError> {
    let read = ds.read_authorized(agent_id, selectors, server_id).await?;
    let mut set = AuthorizedSet {
        revision: read.revision,
        entries: read.entries,
        ..Default::default()
    };
    set.roots.insert(agent_id.clone());
    for alias in read.aliases {
        set.roots.insert(alias.spiffe_id);
        set.alias_ids.insert(alias.id);
    }
    tracing::debug!(
        agent = %agent_id,
        roots = set.roots.len(),
        entries = set.entries.len(),
        revision = set.revision,
        "authorised entries computed"
    );
    Ok(set)
}

/// All entries `agent` is authorised for, breadth-first from its roots (see the module docs).
/// `server_id` is the server's SPIFFE ID ([`crate::api::server_id`]), the parent of node aliases.
pub async fn authorized_entries(
    ds: &dyn Datastore,
    agent: &AttestedAgent,
    server_id: &SpiffeId,
) -> Result<Vec<RegistrationEntry>, DatastoreError> {
    Ok(compute(ds, &agent.spiffe_id, &agent.selectors, server_id)
        .await?
        .entries)
}

/// True if `agent` is authorised for `entry`, found by walking up from the entry's parent: one
/// `spiffe_id` query per ancestor level, cheaper than computing the whole set. Uses the given
/// entry's `parent_id` as is (callers pass the stored entry). Agrees with
/// [`authorized_entries`].
pub async fn is_authorized(
    ds: &dyn Datastore,
    agent: &AttestedAgent,
    server_id: &SpiffeId,
    entry: &RegistrationEntry,
) -> Result<bool, DatastoreError> {
    if entry.parent_id == *server_id {
        // A node alias is a root's source, not an authorised entry.
        return Ok(false);
    }
    let mut queue = VecDeque::from([entry.parent_id.clone()]);
    let mut seen: HashSet<SpiffeId> = HashSet::from([entry.parent_id.clone()]);
    while let Some(id) = queue.pop_front() {
        if id == agent.spiffe_id {
            return Ok(true);
        }
        // Every entry that grants `id`: a matching alias makes it a root; any other entry
        // grants it if that entry is itself authorised, i.e. if its parent is.
        let filter = EntryFilter {
            spiffe_id: Some(id),
            ..Default::default()
        };
        for granting in list_all(ds, &filter).await? {
            if granting.parent_id == *server_id {
                if alias_matches(&granting, server_id, &agent.selectors) {
                    return Ok(true);
                }
            } else if seen.insert(granting.parent_id.clone()) {
                queue.push_back(granting.parent_id);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::sqlite::SqliteDatastore;
    use sigil::{Selector, TrustDomain};
    use std::collections::BTreeSet;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id(path: &str) -> SpiffeId {
        td().id(path).unwrap()
    }

    fn sels(v: &[&str]) -> SelectorSet {
        v.iter().map(|s| Selector::parse(s).unwrap()).collect()
    }

    fn server() -> SpiffeId {
        crate::api::server_id(&td())
    }

    fn entry(path: &str, parent: &SpiffeId, selectors: &[&str]) -> RegistrationEntry {
        RegistrationEntry::new(id(path), parent.clone(), sels(selectors))
    }

    fn agent(path: &str, selectors: &[&str]) -> AttestedAgent {
        AttestedAgent {
            spiffe_id: id(path),
            attestation_type: "join_token".into(),
            x509_svid_serial: "01".into(),
            new_x509_svid: None,
            x509_svid_expires_at: i64::MAX,
            banned: false,
            selectors: sels(selectors),
            created_at: 0,
            updated_at: 0,
        }
    }

    async fn open() -> TestResult<(tempfile::TempDir, SqliteDatastore)> {
        let dir = tempfile::tempdir()?;
        let ds = SqliteDatastore::open(&dir.path().join("ds.sqlite3")).await?;
        Ok((dir, ds))
    }

    async fn create(ds: &SqliteDatastore, e: RegistrationEntry) -> TestResult<RegistrationEntry> {
        Ok(ds.create_entries(vec![e]).await?.remove(0)?)
    }

    fn paths(entries: &[RegistrationEntry]) -> BTreeSet<String> {
        entries
            .iter()
            .map(|e| e.spiffe_id.path().to_string())
            .collect()
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A fixture covering every rule; returns the two agents.
    async fn fixture(ds: &SqliteDatastore) -> TestResult<(AttestedAgent, AttestedAgent)> {
        let a = agent(
            "/sigil/agent/join_token/a",
            &["k8s:cluster:c1", "k8s:node:n1", "x:y:1"],
        );
        let b = agent(
            "/sigil/agent/join_token/b",
            &["k8s:cluster:c2", "k8s:node:n2"],
        );
        let s = server();
        // Direct children of each agent.
        create(ds, entry("/a/web", &a.spiffe_id, &["unix:uid:1"])).await?;
        create(ds, entry("/b/web", &b.spiffe_id, &["unix:uid:1"])).await?;
        // Multi-level under agent a: /a/web → /a/web/db → /a/web/db/replica.
        create(ds, entry("/a/web/db", &id("/a/web"), &["unix:uid:2"])).await?;
        create(
            ds,
            entry("/a/web/db/replica", &id("/a/web/db"), &["unix:uid:3"]),
        )
        .await?;
        // Node alias matching a (subset of its selectors), and one matching b.
        create(ds, entry("/cluster/c1", &s, &["k8s:cluster:c1"])).await?;
        create(ds, entry("/cluster/c2", &s, &["k8s:cluster:c2"])).await?;
        // An alias whose selectors are not a subset of a's (one selector a lacks).
        create(
            ds,
            entry("/cluster/c1-gpu", &s, &["k8s:cluster:c1", "k8s:pool:gpu"]),
        )
        .await?;
        create(ds, entry("/c1/app", &id("/cluster/c1"), &["k8s:ns:app"])).await?;
        create(
            ds,
            entry(
                "/c1/app/sidecar",
                &id("/c1/app"),
                &["k8s:ns:app", "k8s:c:side"],
            ),
        )
        .await?;
        create(ds, entry("/c2/app", &id("/cluster/c2"), &["k8s:ns:app"])).await?;
        create(
            ds,
            entry("/gpu/train", &id("/cluster/c1-gpu"), &["k8s:ns:ml"]),
        )
        .await?;
        // A cycle reachable from a: /a/loop1 (parent a) ← /a/loop2 (parent /a/loop1) and
        // /a/loop1 again registered under /a/loop2.
        create(ds, entry("/a/loop1", &a.spiffe_id, &["unix:uid:10"])).await?;
        create(ds, entry("/a/loop2", &id("/a/loop1"), &["unix:uid:11"])).await?;
        create(ds, entry("/a/loop1", &id("/a/loop2"), &["unix:uid:12"])).await?;
        // A cycle reachable from nobody.
        create(ds, entry("/orphan/x", &id("/orphan/y"), &["unix:uid:20"])).await?;
        create(ds, entry("/orphan/y", &id("/orphan/x"), &["unix:uid:21"])).await?;
        // A self-parented entry, unreachable.
        create(ds, entry("/self", &id("/self"), &["unix:uid:30"])).await?;
        // Entries under an unknown agent.
        create(
            ds,
            entry("/z/web", &id("/sigil/agent/join_token/z"), &["unix:uid:1"]),
        )
        .await?;
        Ok((a, b))
    }

    #[tokio::test]
    async fn authorisation_table() -> TestResult {
        let (_dir, ds) = open().await?;
        let (a, b) = fixture(&ds).await?;
        let got_a = authorized_entries(&ds, &a, &server()).await?;
        assert_eq!(
            paths(&got_a),
            set(&[
                "/a/web",
                "/a/web/db",
                "/a/web/db/replica",
                "/c1/app",
                "/c1/app/sidecar",
                "/a/loop1",
                "/a/loop2",
            ])
        );
        // /a/loop1 is registered twice (under a and under /a/loop2): both are authorised.
        assert_eq!(got_a.len(), 8);
        let got_b = authorized_entries(&ds, &b, &server()).await?;
        assert_eq!(paths(&got_b), set(&["/b/web", "/c2/app"]));
        // Never the other agent's entries.
        let ids_a: HashSet<&str> = got_a.iter().map(|e| e.id.as_str()).collect();
        assert!(got_b.iter().all(|e| !ids_a.contains(e.id.as_str())));

        // Selectors matter: without the cluster selector, a loses the c1 alias subtree.
        let a_plain = agent("/sigil/agent/join_token/a", &["k8s:node:n1"]);
        let got = authorized_entries(&ds, &a_plain, &server()).await?;
        assert!(!paths(&got).contains("/c1/app"));
        // With the gpu pool selector too, a gains the c1-gpu alias subtree.
        let a_gpu = agent(
            "/sigil/agent/join_token/a",
            &["k8s:cluster:c1", "k8s:pool:gpu"],
        );
        let got = authorized_entries(&ds, &a_gpu, &server()).await?;
        assert!(paths(&got).contains("/gpu/train"));
        assert!(paths(&got).contains("/c1/app"));
        // An agent with no entries and no selectors gets nothing.
        let nobody = agent("/sigil/agent/join_token/nobody", &[]);
        assert!(authorized_entries(&ds, &nobody, &server())
            .await?
            .is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn aliases_without_selectors_apply_to_nobody() -> TestResult {
        let (_dir, ds) = open().await?;
        // The admin API refuses entries without selectors, but the datastore stores them.
        let a = agent("/sigil/agent/join_token/a", &["k8s:cluster:c1"]);
        create(&ds, entry("/everyone", &server(), &[])).await?;
        create(
            &ds,
            entry("/everyone/app", &id("/everyone"), &["unix:uid:1"]),
        )
        .await?;
        assert!(authorized_entries(&ds, &a, &server()).await?.is_empty());
        let e = ds
            .list_entries(&EntryFilter::default(), 10, None)
            .await?
            .items
            .remove(1);
        assert!(!is_authorized(&ds, &a, &server(), &e).await?);
        Ok(())
    }

    #[tokio::test]
    async fn pages_beyond_the_datastore_maximum() -> TestResult {
        let (_dir, ds) = open().await?;
        let a = agent("/sigil/agent/join_token/a", &[]);
        let n = PAGE + 5;
        let batch: Vec<RegistrationEntry> = (0..n)
            .map(|i| entry(&format!("/w/{i}"), &a.spiffe_id, &["unix:uid:1"]))
            .collect();
        ds.create_entries(batch).await?;
        assert_eq!(authorized_entries(&ds, &a, &server()).await?.len(), n);
        Ok(())
    }

    /// A small deterministic generator (no external randomness needed).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n
        }
    }

    #[tokio::test]
    async fn is_authorized_agrees_with_authorized_entries() -> TestResult {
        let (_dir, ds) = open().await?;
        let s = server();
        let agents = [
            agent(
                "/sigil/agent/x509pop/n0",
                &["k8s:cluster:c0", "k8s:zone:z0"],
            ),
            agent(
                "/sigil/agent/x509pop/n1",
                &["k8s:cluster:c1", "k8s:zone:z0"],
            ),
            agent(
                "/sigil/agent/x509pop/n2",
                &["k8s:cluster:c0", "k8s:zone:z1"],
            ),
            agent("/sigil/agent/x509pop/n3", &[]),
        ];
        let alias_sels: [&[&str]; 5] = [
            &["k8s:cluster:c0"],
            &["k8s:cluster:c1"],
            &["k8s:zone:z0"],
            &["k8s:cluster:c0", "k8s:zone:z1"],
            &["k8s:cluster:c9"],
        ];
        for (i, sel) in alias_sels.iter().enumerate() {
            create(&ds, entry(&format!("/alias/{i}"), &s, sel)).await?;
        }
        // 300 entries whose parents are agents, aliases, earlier or later entries (cycles),
        // or unknown IDs; SPIFFE IDs repeat so some IDs have several granting entries.
        let mut rng = Lcg(42);
        for i in 0..300 {
            let parent = match rng.next(6) {
                0 => agents[rng.next(agents.len())].spiffe_id.clone(),
                1 => id(&format!("/alias/{}", rng.next(alias_sels.len()))),
                2 => id("/unknown/parent"),
                _ => id(&format!("/e/{}", rng.next(120))),
            };
            let path = format!("/e/{}", rng.next(150));
            create(&ds, entry(&path, &parent, &[&format!("unix:uid:{i}")])).await?;
        }
        let all = list_all(&ds, &EntryFilter::default()).await?;
        for a in &agents {
            let authorised: HashSet<String> = authorized_entries(&ds, a, &s)
                .await?
                .into_iter()
                .map(|e| e.id)
                .collect();
            for e in &all {
                assert_eq!(
                    is_authorized(&ds, a, &s, e).await?,
                    authorised.contains(&e.id),
                    "agent {} entry {} ({} under {})",
                    a.spiffe_id,
                    e.id,
                    e.spiffe_id,
                    e.parent_id
                );
            }
        }
        // The fixture is not degenerate: someone gets something, nobody gets everything.
        let n0 = authorized_entries(&ds, &agents[0], &s).await?.len();
        assert!(n0 > 10 && n0 < all.len(), "{n0} of {}", all.len());
        Ok(())
    }

    #[tokio::test]
    async fn is_authorized_table() -> TestResult {
        let (_dir, ds) = open().await?;
        let (a, b) = fixture(&ds).await?;
        let all = list_all(&ds, &EntryFilter::default()).await?;
        let find = |p: &'static str| all.iter().filter(move |e| e.spiffe_id.path() == p);
        for e in find("/a/web/db/replica")
            .chain(find("/c1/app/sidecar"))
            .chain(find("/a/loop2"))
        {
            assert!(is_authorized(&ds, &a, &server(), e).await?);
            assert!(!is_authorized(&ds, &b, &server(), e).await?);
        }
        for e in find("/orphan/x")
            .chain(find("/self"))
            .chain(find("/gpu/train"))
            .chain(find("/cluster/c1"))
        {
            assert!(!is_authorized(&ds, &a, &server(), e).await?);
        }
        Ok(())
    }
}
