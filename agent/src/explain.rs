//! `sigil-agent explain --pid N`: why a process gets (or does not get) an SVID.
//!
//! The agent attests the process exactly as the Workload API would, then compares its selectors
//! with every entry this agent holds: entries whose selectors are all present match; entries
//! that share at least one selector, or name a selector of a kind the process has with another
//! value (`unix:uid:1001` when the process has `unix:uid:1000`), are near misses, reported with
//! the selectors the process lacks and what it has instead.

use sigil::entry::RegistrationEntry;
use sigil::selector::{Selector, SelectorSet};

use crate::sync::cache::Snapshot;

/// Most near misses reported (closest first).
pub const MAX_NEAR_MISSES: usize = 10;

/// A selector an entry requires that the process lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// The entry's selector.
    pub selector: String,
    /// The process's selectors of the same kind (e.g. its `unix:uid:…`), if any.
    pub process_has: Vec<String>,
}

/// An entry that almost matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NearMiss {
    /// Entry id.
    pub entry_id: String,
    /// Entry SPIFFE ID.
    pub spiffe_id: String,
    /// What is missing.
    pub missing: Vec<Missing>,
}

/// A matching entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Entry id.
    pub entry_id: String,
    /// Entry SPIFFE ID.
    pub spiffe_id: String,
    /// Whether the agent holds a current X509-SVID for it.
    pub svid_ready: bool,
}

/// The comparison of a process with the cached entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Explanation {
    /// Matching entries, default first.
    pub matches: Vec<Match>,
    /// Closest non-matching entries.
    pub near_misses: Vec<NearMiss>,
    /// Entries held by the agent.
    pub entries_held: usize,
}

/// `unix:uid:1000` → `("unix", "uid")`: selectors with the same kind and first value part
/// describe the same property.
fn property(s: &Selector) -> (&str, &str) {
    let key = s.value().split_once(':').map_or(s.value(), |(k, _)| k);
    (s.kind(), key)
}

/// Compares `selectors` with every entry in `cache`.
pub fn explain(cache: &Snapshot, selectors: &SelectorSet) -> Explanation {
    let matches = crate::workload_api::identities::matching_entries(cache, selectors)
        .into_iter()
        .map(|e| Match {
            entry_id: e.id.clone(),
            spiffe_id: e.spiffe_id.to_string(),
            svid_ready: cache
                .svid(&e.id)
                .is_some_and(|s| s.entry_revision == e.revision),
        })
        .collect();
    let mut near: Vec<(usize, &RegistrationEntry, Vec<Missing>)> = cache
        .entries()
        .filter(|e| !e.selectors.is_subset_of(selectors))
        .filter_map(|e| {
            let missing: Vec<Missing> = e
                .selectors
                .iter()
                .filter(|s| !selectors.contains(s))
                .map(|s| Missing {
                    selector: s.to_string(),
                    process_has: selectors
                        .iter()
                        .filter(|p| property(p) == property(s))
                        .map(ToString::to_string)
                        .collect(),
                })
                .collect();
            let related = e.selectors.intersects(selectors)
                || missing.iter().any(|m| !m.process_has.is_empty());
            related.then_some((missing.len(), e, missing))
        })
        .collect();
    near.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
    Explanation {
        matches,
        near_misses: near
            .into_iter()
            .take(MAX_NEAR_MISSES)
            .map(|(_, e, missing)| NearMiss {
                entry_id: e.id.clone(),
                spiffe_id: e.spiffe_id.to_string(),
                missing,
            })
            .collect(),
        entries_held: cache.entry_count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload_api::identities::tests::{cache_with, entry, selectors};

    #[test]
    fn matches_and_near_misses_name_the_missing_selector() {
        let c = cache_with(
            vec![
                entry("hit", 1, &["unix:uid:1000"], ""),
                entry("wrong-uid", 2, &["unix:uid:1001"], ""),
                entry(
                    "needs-path",
                    3,
                    &["unix:uid:1000", "unix:path:/bin/app"],
                    "",
                ),
                entry("unrelated", 4, &["k8s:ns:prod"], ""),
            ],
            &["hit"],
        );
        let x = explain(
            &c,
            &selectors(&["unix:uid:1000", "unix:path:/usr/bin/other"]),
        );
        assert_eq!(x.entries_held, 4);
        assert_eq!(x.matches.len(), 1);
        assert_eq!(x.matches[0].entry_id, "hit");
        assert!(x.matches[0].svid_ready);
        let near: Vec<&str> = x.near_misses.iter().map(|n| n.entry_id.as_str()).collect();
        assert_eq!(
            near,
            ["needs-path", "wrong-uid"],
            "closest first, unrelated left out"
        );
        let wrong = &x.near_misses[1].missing[0];
        assert_eq!(wrong.selector, "unix:uid:1001");
        assert_eq!(wrong.process_has, ["unix:uid:1000"]);
        let path = &x.near_misses[0].missing[0];
        assert_eq!(path.selector, "unix:path:/bin/app");
        assert_eq!(path.process_has, ["unix:path:/usr/bin/other"]);
    }
}
