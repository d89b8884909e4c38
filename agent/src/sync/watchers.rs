//! Who to wake when the cache changes: the Workload API and SDS streams, each registered with
//! its caller's selectors, indexed by selector.
//!
//! A change names the entries it touched ([`Changes`]); an entry concerns a stream only when all
//! its selectors are among the stream's, so each touched entry is looked up under its first
//! selector and only the streams holding that selector are checked. A change to the bundle or
//! the federated bundles, or the first snapshot, wakes every stream. A stream whose caller was
//! attested without its executable's hash (no entry needed it then) is also woken by an entry
//! that needs the hash and would otherwise match: it attests the caller again.
//!
//! The registry keeps one copy of each distinct selector set and hands it to every stream whose
//! caller has that set ([`Watchers::subscribe`]), so a stream's selectors are held once, shared
//! with the registry, and the many connections of one workload share one set.
//!
//! Waking is a [`Notify`] permit: a stream that is busy when woken finds the permit when it next
//! waits, and several changes before it looks again cost it one look. The registry's lock is
//! held only to index and to hand out permits, never across I/O or an await.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sigil::selector::{Selector, SelectorSet};
use tokio::sync::Notify;

use super::cache::{is_exe_hash, Changes};

/// The registry of streams to wake.
#[derive(Default)]
pub struct Watchers {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    subscribers: HashMap<u64, Subscriber>,
    /// Selector → the subscribers whose callers have it.
    by_selector: HashMap<Selector, HashSet<u64>>,
    /// Subscribers attested without the executable's hash.
    exe_hash_skipped: HashSet<u64>,
    /// Each distinct selector set of the subscribers, once, with how many hold it.
    sets: HashMap<Arc<SelectorSet>, usize>,
}

struct Subscriber {
    selectors: Arc<SelectorSet>,
    notify: Arc<Notify>,
}

impl Registry {
    /// The registry's copy of `selectors` (now counted once more): an equal set already held,
    /// else `selectors` itself.
    fn share(&mut self, selectors: &Arc<SelectorSet>) -> Arc<SelectorSet> {
        let shared = match self.sets.get_key_value(&**selectors) {
            Some((held, _)) => held.clone(),
            None => selectors.clone(),
        };
        *self.sets.entry(shared.clone()).or_insert(0) += 1;
        shared
    }

    /// Counts `selectors` once less; forgets it when no subscriber holds it.
    fn unshare(&mut self, selectors: &SelectorSet) {
        if let Some(n) = self.sets.get_mut(selectors) {
            *n -= 1;
            if *n == 0 {
                self.sets.remove(selectors);
            }
        }
    }

    fn index(&mut self, id: u64, selectors: &SelectorSet, exe_hash_skipped: bool) {
        for s in selectors {
            self.by_selector.entry(s.clone()).or_default().insert(id);
        }
        if exe_hash_skipped {
            self.exe_hash_skipped.insert(id);
        }
    }

    fn unindex(&mut self, id: u64, selectors: &SelectorSet) {
        for s in selectors {
            if let Some(ids) = self.by_selector.get_mut(s) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_selector.remove(s);
                }
            }
        }
        self.exe_hash_skipped.remove(&id);
    }
}

/// One stream's registration; dropping it unregisters the stream.
pub struct Subscription {
    id: u64,
    notify: Arc<Notify>,
    registry: Arc<Mutex<Registry>>,
}

impl Watchers {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream whose caller has `selectors` (`exe_hash_skipped`: attested without
    /// its executable's hash). `selectors` becomes the registry's copy of an equal set when it
    /// holds one, so that equal sets are held once.
    pub fn subscribe(
        &self,
        selectors: &mut Arc<SelectorSet>,
        exe_hash_skipped: bool,
    ) -> Subscription {
        let notify = Arc::new(Notify::new());
        let mut r = self.lock();
        r.next_id += 1;
        let id = r.next_id;
        *selectors = r.share(selectors);
        r.index(id, selectors, exe_hash_skipped);
        r.subscribers.insert(
            id,
            Subscriber {
                selectors: selectors.clone(),
                notify: notify.clone(),
            },
        );
        Subscription {
            id,
            notify,
            registry: self.inner.clone(),
        }
    }

    /// Number of registered streams.
    pub fn len(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// True when no stream is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes the streams `changes` concern; returns how many were woken.
    pub fn wake(&self, changes: &Changes) -> usize {
        if changes.is_empty() {
            return 0;
        }
        let r = self.lock();
        if changes.all {
            for s in r.subscribers.values() {
                s.notify.notify_one();
            }
            return r.subscribers.len();
        }
        let mut woken = HashSet::new();
        for e in &changes.entries {
            // An entry without selectors matches nobody.
            let Some(first) = e.selectors.iter().next() else {
                continue;
            };
            for id in r.by_selector.get(first).into_iter().flatten() {
                if woken.contains(id) {
                    continue;
                }
                if let Some(s) = r.subscribers.get(id) {
                    if e.selectors.is_subset_of(&s.selectors) {
                        s.notify.notify_one();
                        woken.insert(*id);
                    }
                }
            }
            if r.exe_hash_skipped.is_empty() || !e.selectors.iter().any(is_exe_hash) {
                continue;
            }
            // The caller's hash was not read: the entry concerns it if all its other selectors
            // are the caller's.
            for id in &r.exe_hash_skipped {
                if woken.contains(id) {
                    continue;
                }
                if let Some(s) = r.subscribers.get(id) {
                    if e.selectors
                        .iter()
                        .filter(|sel| !is_exe_hash(sel))
                        .all(|sel| s.selectors.contains(sel))
                    {
                        s.notify.notify_one();
                        woken.insert(*id);
                    }
                }
            }
        }
        woken.len()
    }
}

impl Subscription {
    /// Completes when a change concerns this stream (at once if one did since the last wait).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// The caller was attested again: register its new selectors (`selectors` becomes the
    /// registry's copy, as in [`Watchers::subscribe`]).
    pub fn update(&self, selectors: &mut Arc<SelectorSet>, exe_hash_skipped: bool) {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let Some(old) = r.subscribers.get(&self.id).map(|s| s.selectors.clone()) else {
            return;
        };
        r.unindex(self.id, &old);
        r.unshare(&old);
        *selectors = r.share(selectors);
        r.index(self.id, selectors, exe_hash_skipped);
        if let Some(s) = r.subscribers.get_mut(&self.id) {
            s.selectors = selectors.clone();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = r.subscribers.remove(&self.id) {
            r.unindex(self.id, &s.selectors);
            r.unshare(&s.selectors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil::entry::RegistrationEntry;

    fn selectors(s: &[&str]) -> SelectorSet {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    fn shared(s: &[&str]) -> Arc<SelectorSet> {
        Arc::new(selectors(s))
    }

    fn entry(sel: &[&str]) -> Arc<RegistrationEntry> {
        Arc::new(RegistrationEntry::new(
            "spiffe://example.org/w".parse().unwrap(),
            "spiffe://example.org/agent".parse().unwrap(),
            selectors(sel),
        ))
    }

    fn changed(entries: Vec<Arc<RegistrationEntry>>) -> Changes {
        Changes {
            all: false,
            entries,
        }
    }

    /// True when `s` has a permit (was woken), consuming it.
    fn woken(s: &Subscription) -> bool {
        use futures::FutureExt as _;
        s.changed().now_or_never().is_some()
    }

    #[test]
    fn only_streams_whose_selectors_cover_the_entry_wake() {
        let w = Watchers::new();
        let uid7 = w.subscribe(&mut shared(&["unix:uid:7", "unix:gid:1"]), false);
        let uid8 = w.subscribe(&mut shared(&["unix:uid:8", "unix:gid:1"]), false);
        let both = w.subscribe(&mut shared(&["unix:uid:7", "unix:uid:8"]), false);
        assert_eq!(w.len(), 3);

        assert_eq!(w.wake(&changed(vec![entry(&["unix:uid:7"])])), 2);
        assert!(woken(&uid7) && woken(&both) && !woken(&uid8));

        // All of an entry's selectors must be the stream's.
        assert_eq!(
            w.wake(&changed(vec![entry(&["unix:gid:1", "unix:uid:8"])])),
            1
        );
        assert!(woken(&uid8) && !woken(&uid7) && !woken(&both));
        assert_eq!(w.wake(&changed(vec![entry(&["unix:uid:9"])])), 0);
        assert_eq!(w.wake(&changed(vec![entry(&[])])), 0, "matches nobody");
        assert_eq!(w.wake(&Changes::default()), 0);

        // Everything: the bundle changed.
        assert_eq!(w.wake(&Changes::everything()), 3);
        assert!(woken(&uid7) && woken(&uid8) && woken(&both));

        // Several changes before a look: one permit.
        w.wake(&changed(vec![entry(&["unix:uid:7"])]));
        w.wake(&changed(vec![entry(&["unix:uid:7"])]));
        assert!(woken(&uid7) && !woken(&uid7));

        drop(both);
        assert_eq!(w.len(), 2);
        assert_eq!(w.wake(&changed(vec![entry(&["unix:uid:7"])])), 1);
        drop(uid7);
        drop(uid8);
        assert!(w.is_empty());
        let r = w.lock();
        assert!(r.by_selector.is_empty(), "index emptied with the streams");
    }

    #[test]
    fn a_caller_attested_again_is_woken_by_its_new_selectors_and_the_hash() {
        let hash = format!("unix:sha256:{}", "a".repeat(64));
        let w = Watchers::new();
        let s = w.subscribe(&mut shared(&["unix:uid:7"]), true);
        // An entry on the hash and the uid: the hash was not read, so the caller is woken to be
        // attested again; one on another uid is not its concern.
        assert_eq!(w.wake(&changed(vec![entry(&["unix:uid:7", &hash])])), 1);
        assert!(woken(&s));
        assert_eq!(w.wake(&changed(vec![entry(&["unix:uid:8", &hash])])), 0);
        // Attested again with the hash: its selectors are indexed anew.
        s.update(&mut shared(&["unix:uid:7", "unix:gid:3", &hash]), false);
        assert_eq!(w.wake(&changed(vec![entry(&["unix:gid:3"])])), 1);
        assert!(woken(&s));
        let other = format!("unix:sha256:{}", "b".repeat(64));
        assert_eq!(w.wake(&changed(vec![entry(&["unix:uid:7", &other])])), 0);
        assert_eq!(w.wake(&changed(vec![entry(&["unix:uid:7", &hash])])), 1);
    }

    #[test]
    fn equal_selector_sets_are_held_once() {
        let w = Watchers::new();
        let mut a = shared(&["unix:uid:7", "unix:gid:1"]);
        let mut b = shared(&["unix:uid:7", "unix:gid:1"]);
        let mut c = shared(&["unix:uid:8"]);
        let sa = w.subscribe(&mut a, false);
        let sb = w.subscribe(&mut b, false);
        let sc = w.subscribe(&mut c, false);
        assert!(
            Arc::ptr_eq(&a, &b),
            "the second caller got the registry's copy"
        );
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(w.lock().sets.len(), 2);
        // Both streams still wake as before.
        assert_eq!(w.wake(&changed(vec![entry(&["unix:gid:1"])])), 2);
        assert!(woken(&sa) && woken(&sb) && !woken(&sc));
        // Attested again with another set: the shared one stays for the other stream.
        let mut again = shared(&["unix:uid:8"]);
        sb.update(&mut again, false);
        assert!(Arc::ptr_eq(&again, &c));
        assert_eq!(w.lock().sets.get(&*c), Some(&2));
        assert_eq!(w.lock().sets.get(&*a), Some(&1));
        drop(sa);
        assert_eq!(w.lock().sets.len(), 1, "a set nobody holds is forgotten");
        drop(sb);
        drop(sc);
        assert!(w.lock().sets.is_empty());
    }
}
