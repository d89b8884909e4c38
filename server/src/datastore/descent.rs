//! The breadth-first walk behind [`super::Datastore::read_authorized`], shared by the backends:
//! each runs it inside one read transaction, with one query for the matching node aliases and
//! then one query per level for the children of every SPIFFE ID found on the level before
//! (`parent_id IN (...)`), so the whole read costs a handful of queries on one connection
//! whatever the number of entries.
//!
//! The rule is SPIRE's, as `sync::authz` states it: roots are the agent's ID and the SPIFFE IDs
//! of the node aliases that apply; authorised are the entries whose parent is a root or the
//! SPIFFE ID of an authorised entry. The server's ID is never expanded as a parent.

use std::collections::HashSet;

use sigil::entry::RegistrationEntry;
use sigil::{SelectorSet, SpiffeId};

use super::{AuthorizedRead, EntryFilter, SelectorMatch};

/// True if `entry` is a node alias (parent = `server_id`) that applies to a node with
/// `selectors`. An alias without selectors applies to nobody: it would otherwise apply to every
/// node.
pub fn alias_matches(
    entry: &RegistrationEntry,
    server_id: &SpiffeId,
    selectors: &SelectorSet,
) -> bool {
    entry.parent_id == *server_id
        && !entry.selectors.is_empty()
        && entry.selectors.is_subset_of(selectors)
}

/// The filter of the node-alias entries an agent with `selectors` may match (parent the
/// server, selectors a subset of the agent's); `None` when the agent has no selectors.
pub(crate) fn alias_candidates(
    server_id: &SpiffeId,
    selectors: &SelectorSet,
) -> Option<EntryFilter> {
    (!selectors.is_empty()).then(|| EntryFilter {
        parent_id: Some(server_id.clone()),
        selectors: Some((selectors.clone(), SelectorMatch::Subset)),
        ..Default::default()
    })
}

/// The walk's state: what was expanded, the next level's parents, what was found.
#[derive(Debug)]
pub(crate) struct Descent {
    /// SPIFFE IDs already expanded (or never to expand: the server's ID). Each entry has one
    /// parent, so within one consistent read it is found once; cycles end because no ID is
    /// expanded twice.
    expanded: HashSet<SpiffeId>,
    frontier: Vec<SpiffeId>,
    /// Every SPIFFE ID that is some entry's parent (as stored text), when the backend read
    /// them: only these are asked for children. An agent's entries are mostly leaves, and
    /// probing each of their IDs in the parent index costs more than the whole rest of the read.
    parents: Option<HashSet<String>>,
    read: AuthorizedRead,
}

/// Every distinct `parent_id` of table `entries`, one index seek each (a loose scan of the
/// `parent_id` index, valid in SQLite and PostgreSQL): its cost follows the number of parents,
/// not of entries.
pub(crate) const DISTINCT_PARENTS_SQL: &str = "WITH RECURSIVE p(id) AS (\
     SELECT MIN(parent_id) FROM entries \
     UNION ALL \
     SELECT (SELECT MIN(parent_id) FROM entries WHERE parent_id > p.id) FROM p \
     WHERE p.id IS NOT NULL) \
     SELECT id FROM p WHERE id IS NOT NULL";

impl Descent {
    /// Starts from `agent_id` and the aliases among `candidates` (the datastore's subset match
    /// of the agent's selectors under `server_id`) that apply; the others are dropped.
    pub(crate) fn new(
        agent_id: &SpiffeId,
        server_id: &SpiffeId,
        selectors: &SelectorSet,
        candidates: Vec<RegistrationEntry>,
        revision: i64,
    ) -> Self {
        let aliases: Vec<RegistrationEntry> = candidates
            .into_iter()
            .filter(|e| alias_matches(e, server_id, selectors))
            .collect();
        let mut expanded = HashSet::from([server_id.clone()]);
        let mut frontier = Vec::new();
        for root in std::iter::once(agent_id).chain(aliases.iter().map(|a| &a.spiffe_id)) {
            if expanded.insert(root.clone()) {
                frontier.push(root.clone());
            }
        }
        Self {
            expanded,
            frontier,
            parents: None,
            read: AuthorizedRead {
                revision,
                aliases,
                entries: Vec::new(),
            },
        }
    }

    /// The parents whose children the next query must list, as stored text; `None` when the
    /// walk is over.
    pub(crate) fn next_level(&mut self) -> Option<Vec<String>> {
        let level: Vec<String> = std::mem::take(&mut self.frontier)
            .iter()
            .map(ToString::to_string)
            .filter(|id| self.parents.as_ref().is_none_or(|p| p.contains(id)))
            .collect();
        (!level.is_empty()).then_some(level)
    }

    /// Asks only for the children of IDs in `parents` ([`DISTINCT_PARENTS_SQL`], read in the
    /// walk's transaction): the other IDs have none.
    pub(crate) fn only_parents(&mut self, parents: HashSet<String>) {
        self.parents = Some(parents);
    }

    /// Adds the children found for the level's parents, `(seq, entry)` in any order: they are
    /// kept in listing order, so the result is deterministic.
    pub(crate) fn add(&mut self, mut children: Vec<(i64, RegistrationEntry)>) {
        children.sort_unstable_by_key(|(seq, _)| *seq);
        for (_, entry) in children {
            if self.expanded.insert(entry.spiffe_id.clone()) {
                self.frontier.push(entry.spiffe_id.clone());
            }
            self.read.entries.push(entry);
        }
    }

    /// The result.
    pub(crate) fn finish(self) -> AuthorizedRead {
        self.read
    }
}
