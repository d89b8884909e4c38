//! Which identities a workload gets, and the Workload API messages that carry them.
//!
//! Pure functions over a cache [`Snapshot`]: an entry matches a process when every one of the entry's
//! selectors is among the process's selectors. Identities are ordered by entry creation time
//! (then entry id) so the default SVID — the first one, which most clients use — is stable
//! across messages and restarts; of several SVIDs sharing a hint only the first is sent, as
//! SPIRE does, so a hint names one SVID.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use sigil::entry::RegistrationEntry;
use sigil::proto::workload as wl;
use sigil::selector::SelectorSet;

use crate::sync::cache::{CachedSvid, Snapshot};

/// The entries whose selectors are all among `selectors`, default first (found through the
/// snapshot's selector index).
pub fn matching_entries<'a>(
    cache: &'a Snapshot,
    selectors: &SelectorSet,
) -> Vec<&'a RegistrationEntry> {
    let mut out = cache.matching(selectors);
    out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    out
}

/// What every Workload API and SDS message for a caller with `selectors` is made of at `now`,
/// as a number: the matching entries (id and revision), which of their SVIDs are current and
/// unexpired (by generation), the bundles' generations, and whether entries have arrived at all.
/// Equal keys make equal messages, so a woken stream builds and encodes a message only when its
/// key changed.
pub fn view_key(cache: &Snapshot, selectors: &SelectorSet, now: i64) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cache.has_snapshot().hash(&mut h);
    cache.bundle_generation().hash(&mut h);
    cache.federated_generation().hash(&mut h);
    for e in matching_entries(cache, selectors) {
        e.id.hash(&mut h);
        e.revision.hash(&mut h);
        match current_svid(cache, e) {
            Some(s) => (s.generation, s.not_after <= now).hash(&mut h),
            None => 0u8.hash(&mut h),
        }
    }
    h.finish()
}

/// What the cache can give a caller right now.
#[derive(Debug, PartialEq)]
pub enum X509State {
    /// No entry matches the caller: "no identity issued".
    NoIdentity,
    /// Entries match but none has a current SVID yet (just created or changed): wait.
    Pending,
    /// Entries match, but every SVID the agent holds for them has expired (it could not renew
    /// them): nothing valid to give.
    Expired,
    /// The message to send. `pending` counts matching entries still waiting for an SVID.
    Ready {
        /// The response.
        response: wl::X509svidResponse,
        /// Matching entries without a current SVID (they will come in a later message).
        pending: usize,
    },
}

/// An SVID is current for an entry when it was minted for the entry's present revision: an
/// older one may carry a SPIFFE ID the entry no longer has.
fn current_svid<'a>(cache: &'a Snapshot, e: &RegistrationEntry) -> Option<&'a CachedSvid> {
    cache.svid(&e.id).filter(|s| s.entry_revision == e.revision)
}

/// `spiffe://<td>` → concatenated DER roots: our own bundle, for every SVID.
fn own_x509_bundle(cache: &Snapshot) -> Vec<u8> {
    cache
        .bundle()
        .map(|b| b.x509_roots.clone())
        .unwrap_or_default()
}

/// The federated trust domains the given entries name (`spiffe://<td>`), with the bundles held
/// for them.
pub fn federated_for<'a>(
    cache: &'a Snapshot,
    entries: &[&RegistrationEntry],
) -> BTreeMap<String, &'a sigil::proto::node::Bundle> {
    let wanted: BTreeSet<&str> = entries
        .iter()
        .flat_map(|e| e.federates_with.iter().map(|td| td.name()))
        .collect();
    let held = cache.federated_bundles();
    wanted
        .into_iter()
        .filter_map(|td| held.get(td).map(|b| (format!("spiffe://{td}"), b)))
        .collect()
}

/// The SVIDs a caller is served now, before they are encoded for an API.
#[derive(Debug)]
pub enum ServedSvids<'a> {
    /// No entry matches the caller: "no identity issued".
    NoIdentity,
    /// Entries match but none has a current SVID yet: wait.
    Pending,
    /// Entries match, but every SVID the agent holds for them has expired.
    Expired,
    /// The SVIDs to serve (default first, one per hint, none expired) with their entries.
    Ready {
        /// Entry and SVID, in serving order.
        svids: Vec<(&'a RegistrationEntry, &'a CachedSvid)>,
        /// Matching entries without a current SVID (they will come in a later message).
        pending: usize,
    },
}

/// The SVIDs served at `now` (Unix seconds) to a caller with `selectors`: the Workload API's
/// and SDS's common rule. Expired SVIDs are never served.
pub fn served_svids<'a>(cache: &'a Snapshot, selectors: &SelectorSet, now: i64) -> ServedSvids<'a> {
    let entries = matching_entries(cache, selectors);
    if entries.is_empty() {
        return ServedSvids::NoIdentity;
    }
    let mut hints_seen: HashSet<&str> = HashSet::new();
    let mut svids = Vec::with_capacity(entries.len());
    let mut pending = 0;
    let mut expired = 0;
    for e in entries {
        let Some(svid) = current_svid(cache, e) else {
            pending += 1;
            continue;
        };
        if svid.not_after <= now {
            expired += 1;
            continue;
        }
        if !e.hint.is_empty() && !hints_seen.insert(e.hint.as_str()) {
            continue;
        }
        svids.push((e, svid));
    }
    if svids.is_empty() {
        return if expired > 0 && pending == 0 {
            ServedSvids::Expired
        } else {
            ServedSvids::Pending
        };
    }
    ServedSvids::Ready { svids, pending }
}

/// The FetchX509SVID state at `now` (Unix seconds) for a caller with `selectors`. Expired SVIDs
/// are never sent.
pub fn x509_svid_state(cache: &Snapshot, selectors: &SelectorSet, now: i64) -> X509State {
    let (served, pending) = match served_svids(cache, selectors, now) {
        ServedSvids::NoIdentity => return X509State::NoIdentity,
        ServedSvids::Pending => return X509State::Pending,
        ServedSvids::Expired => return X509State::Expired,
        ServedSvids::Ready { svids, pending } => (svids, pending),
    };
    let bundle = own_x509_bundle(cache);
    let svids = served
        .iter()
        .map(|(e, svid)| {
            let (x509_svid, x509_svid_key) = svid.chain_and_key_der();
            wl::X509svid {
                spiffe_id: e.spiffe_id.to_string(),
                x509_svid,
                x509_svid_key,
                bundle: bundle.clone(),
                hint: e.hint.clone(),
            }
        })
        .collect();
    let entries: Vec<&RegistrationEntry> = served.iter().map(|(e, _)| *e).collect();
    let federated_bundles = federated_for(cache, &entries)
        .into_iter()
        .map(|(k, b)| (k, b.x509_roots.clone()))
        .collect();
    X509State::Ready {
        response: wl::X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles,
        },
        pending,
    }
}

/// `spiffe://<td>` → `part(bundle)` for our trust domain and the domains the caller's entries
/// federate with; `None` when no entry matches (the caller has no identity).
fn bundles_for(
    cache: &Snapshot,
    selectors: &SelectorSet,
    part: fn(&sigil::proto::node::Bundle) -> Vec<u8>,
) -> Option<BTreeMap<String, Vec<u8>>> {
    let entries = matching_entries(cache, selectors);
    if entries.is_empty() {
        return None;
    }
    let mut bundles: BTreeMap<String, Vec<u8>> = federated_for(cache, &entries)
        .into_iter()
        .map(|(k, b)| (k, part(b)))
        .collect();
    if let Some(b) = cache.bundle() {
        bundles.insert(format!("spiffe://{}", b.trust_domain), part(b));
    }
    Some(bundles)
}

/// The X.509 bundles (concatenated DER roots) for a caller; `None` when it has no identity.
pub fn x509_bundles(cache: &Snapshot, selectors: &SelectorSet) -> Option<wl::X509BundlesResponse> {
    bundles_for(cache, selectors, |b| b.x509_roots.clone()).map(|bundles| wl::X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    })
}

/// The JWT bundles (JWKS documents) for a caller; `None` when it has no identity.
pub fn jwt_bundles(cache: &Snapshot, selectors: &SelectorSet) -> Option<wl::JwtBundlesResponse> {
    bundles_for(cache, selectors, |b| b.jwks_json.clone().into_bytes())
        .map(|bundles| wl::JwtBundlesResponse { bundles })
}

/// The bundle (own or federated) for trust domain `td`, if held.
pub fn bundle_for<'a>(cache: &'a Snapshot, td: &str) -> Option<&'a sigil::proto::node::Bundle> {
    match cache.bundle() {
        Some(b) if b.trust_domain == td => Some(b),
        _ => cache.federated_bundles().get(td),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sync::cache::Cache;
    use sigil::proto::admin as apb;
    use sigil::proto::node as pb;

    /// An entry proto with `selectors` ("type:value" strings).
    pub(crate) fn entry(id: &str, created_at: i64, selectors: &[&str], hint: &str) -> apb::Entry {
        apb::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/w/{id}"),
            parent_id: "spiffe://example.org/sigil/agent/join_token/t".into(),
            selectors: selectors
                .iter()
                .map(|s| {
                    let (t, v) = s.split_once(':').unwrap();
                    apb::Selector {
                        r#type: t.into(),
                        value: v.into(),
                    }
                })
                .collect(),
            revision_number: 1,
            created_at,
            hint: hint.into(),
            ..Default::default()
        }
    }

    /// A synced cache holding `entries`, with (fake-chain) SVIDs minted for `minted`.
    pub(crate) fn cache_with(entries: Vec<apb::Entry>, minted: &[&str]) -> Cache {
        let mut c = Cache::new();
        c.apply_sync(pb::SyncResponse {
            upserted: entries,
            full: true,
            snapshot_complete: true,
            revision: 1,
            bundle: Some(pb::Bundle {
                trust_domain: "example.org".into(),
                x509_roots: vec![0xAA],
                jwks_json: r#"{"keys":[]}"#.into(),
                sequence_number: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        let ids: Vec<String> = minted.iter().map(|s| s.to_string()).collect();
        let now = now_unix();
        for p in c.make_csrs(&ids).unwrap() {
            let leaf = p.entry_id.as_bytes().to_vec();
            assert!(c.store_svid(p, vec![leaf], now + 3600, now));
        }
        c
    }

    pub(crate) use sigil::clock::now_unix;

    pub(crate) fn selectors(s: &[&str]) -> SelectorSet {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    #[test]
    fn all_selectors_of_an_entry_must_be_present() {
        let c = cache_with(
            vec![
                entry("uid", 1, &["unix:uid:1000"], ""),
                entry(
                    "uid-and-path",
                    2,
                    &["unix:uid:1000", "unix:path:/bin/app"],
                    "",
                ),
                entry("other", 3, &["unix:uid:1001"], ""),
            ],
            &["uid", "uid-and-path", "other"],
        );
        let ids = |sel: &[&str]| -> Vec<String> {
            matching_entries(&c, &selectors(sel))
                .iter()
                .map(|e| e.id.clone())
                .collect()
        };
        assert_eq!(ids(&["unix:uid:1000", "unix:gid:5"]), ["uid"]);
        assert_eq!(
            ids(&["unix:uid:1000", "unix:path:/bin/app"]),
            ["uid", "uid-and-path"]
        );
        assert!(ids(&["unix:uid:7"]).is_empty());
    }

    #[test]
    fn default_svid_is_the_oldest_entry_and_hints_are_unique() {
        let c = cache_with(
            vec![
                entry("newer", 20, &["unix:uid:1"], "db"),
                entry("older", 10, &["unix:uid:1"], "web"),
                entry("dup-hint", 30, &["unix:uid:1"], "db"),
            ],
            &["newer", "older", "dup-hint"],
        );
        let X509State::Ready { response, pending } =
            x509_svid_state(&c, &selectors(&["unix:uid:1"]), now_unix())
        else {
            panic!("expected SVIDs");
        };
        assert_eq!(pending, 0);
        let ids: Vec<&str> = response
            .svids
            .iter()
            .map(|s| s.spiffe_id.as_str())
            .collect();
        assert_eq!(
            ids,
            [
                "spiffe://example.org/w/older",
                "spiffe://example.org/w/newer"
            ]
        );
        assert_eq!(response.svids[0].hint, "web");
        assert_eq!(
            response.svids[0].bundle,
            vec![0xAA],
            "own bundle, concatenated DER"
        );
        assert_eq!(response.svids[0].x509_svid, b"older".to_vec());
    }

    #[test]
    fn unminted_entries_are_pending_and_unknown_callers_have_no_identity() {
        let c = cache_with(
            vec![
                entry("a", 1, &["unix:uid:1"], ""),
                entry("b", 2, &["unix:uid:1"], ""),
            ],
            &["b"],
        );
        match x509_svid_state(&c, &selectors(&["unix:uid:1"]), now_unix()) {
            X509State::Ready { response, pending } => {
                assert_eq!(pending, 1);
                assert_eq!(response.svids.len(), 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        let c = cache_with(vec![entry("a", 1, &["unix:uid:1"], "")], &[]);
        assert_eq!(
            x509_svid_state(&c, &selectors(&["unix:uid:1"]), now_unix()),
            X509State::Pending
        );
        assert_eq!(
            x509_svid_state(&c, &selectors(&["unix:uid:2"]), now_unix()),
            X509State::NoIdentity
        );
        assert!(x509_bundles(&c, &selectors(&["unix:uid:2"])).is_none());
        let b = x509_bundles(&c, &selectors(&["unix:uid:1"])).unwrap();
        assert_eq!(
            b.bundles.keys().collect::<Vec<_>>(),
            ["spiffe://example.org"]
        );
        let j = jwt_bundles(&c, &selectors(&["unix:uid:1"])).unwrap();
        assert_eq!(
            j.bundles["spiffe://example.org"],
            br#"{"keys":[]}"#.to_vec()
        );
    }

    #[test]
    fn expired_svids_are_never_served() {
        let now = now_unix();
        let c = cache_with(
            vec![
                entry("a", 1, &["unix:uid:1"], ""),
                entry("b", 2, &["unix:uid:1"], ""),
            ],
            &["a", "b"],
        );
        let sel = selectors(&["unix:uid:1"]);
        // Both valid now; an hour later both have expired: nothing is sent.
        assert!(matches!(
            x509_svid_state(&c, &sel, now),
            X509State::Ready { ref response, .. } if response.svids.len() == 2
        ));
        assert_eq!(x509_svid_state(&c, &sel, now + 3600), X509State::Expired);
        // One expired, one still valid: only the valid one.
        let mut c = c;
        let p = c.make_csrs(&["b"]).unwrap().pop().unwrap();
        c.store_svid(p, vec![b"b2".to_vec()], now + 7200, now);
        match x509_svid_state(&c, &sel, now + 3600) {
            X509State::Ready { response, .. } => {
                assert_eq!(response.svids.len(), 1);
                assert_eq!(response.svids[0].x509_svid, b"b2".to_vec());
            }
            other => panic!("unexpected {other:?}"),
        }
        // Expired, with another entry still waiting for its first SVID: wait, not Expired.
        let c = cache_with(
            vec![
                entry("a", 1, &["unix:uid:1"], ""),
                entry("b", 2, &["unix:uid:1"], ""),
            ],
            &["a"],
        );
        assert_eq!(x509_svid_state(&c, &sel, now + 3600), X509State::Pending);
    }
}
