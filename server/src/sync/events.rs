//! The change notification hub between writers (admin API, bundle updates, and the writes of
//! other servers sharing the datastore, forwarded by `crate::cluster::follow`) and sync streams.
//!
//! A [`tokio::sync::watch`] channel of one small [`SyncSignal`]: a counter bumped on every entry
//! change, the latest bundle sequence number and a counter bumped on every federated-bundle
//! change. Publishing overwrites the value and wakes the
//! subscribers; it never blocks and never queues, whatever the number or speed of subscribers.
//! A subscriber that was busy sees only the latest value, which is all it needs: it then reads
//! what changed from the datastore (`entry_changes_since`), so nothing is lost by coalescing.

use std::sync::Arc;

use tokio::sync::watch;

/// The value carried by [`SyncEvents`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncSignal {
    /// Incremented (wrapping) on every published entry change.
    pub entry_changes: u64,
    /// The latest published trust-bundle sequence number (0: none published yet).
    pub bundle_sequence: u64,
    /// Incremented (wrapping) on every published federated-bundle change (set or delete).
    pub federated_changes: u64,
    /// Incremented (wrapping) whenever the tainted authorities change ([`SyncEvents::taint`]).
    pub taint_generation: u64,
}

/// The tainted authorities of the server's bundle, sent with it to agents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taint {
    /// X.509 authorities: subject key IDs, lowercase hex.
    pub x509: Vec<String>,
    /// JWT keys: kids.
    pub jwt: Vec<String>,
}

/// Publisher side; clones share one channel. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SyncEvents {
    tx: Arc<watch::Sender<SyncSignal>>,
    taint: Arc<std::sync::RwLock<Arc<Taint>>>,
}

impl Default for SyncEvents {
    fn default() -> Self {
        Self::new()
    }
}

impl SyncEvents {
    /// A new hub with no subscribers.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(SyncSignal::default())),
            taint: Arc::default(),
        }
    }

    /// Announces the tainted authorities (before the bundle that carries them is announced).
    pub fn set_taint(&self, taint: Taint) {
        {
            let mut cur = self
                .taint
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if **cur == taint {
                return;
            }
            *cur = Arc::new(taint);
        }
        self.tx
            .send_modify(|s| s.taint_generation = s.taint_generation.wrapping_add(1));
    }

    /// The tainted authorities now.
    pub fn taint(&self) -> Arc<Taint> {
        self.taint
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Announces that registration entries changed (after the change is durable).
    pub fn entries_changed(&self) {
        self.tx
            .send_modify(|s| s.entry_changes = s.entry_changes.wrapping_add(1));
    }

    /// Announces that the stored trust bundle now has `sequence` (after `set_bundle`, and after
    /// the server's current bundle, `AdminState::bundle`, holds it: the bundle publisher reads
    /// it from there when woken).
    pub fn bundle_changed(&self, sequence: u64) {
        self.tx.send_if_modified(|s| {
            let changed = s.bundle_sequence != sequence;
            s.bundle_sequence = sequence;
            changed
        });
    }

    /// Announces that a federated bundle was set or deleted (after the change is durable).
    pub fn federated_bundles_changed(&self) {
        self.tx
            .send_modify(|s| s.federated_changes = s.federated_changes.wrapping_add(1));
    }

    /// The current value.
    pub fn current(&self) -> SyncSignal {
        *self.tx.borrow()
    }

    /// A new subscriber; it is woken by changes published from now on.
    pub fn subscribe(&self) -> SyncSubscriber {
        SyncSubscriber {
            rx: self.tx.subscribe(),
        }
    }

    /// Number of live subscribers (open sync streams).
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// Subscriber side, one per sync stream.
#[derive(Debug)]
pub struct SyncSubscriber {
    rx: watch::Receiver<SyncSignal>,
}

impl SyncSubscriber {
    /// Waits until something was published after the last [`SyncSubscriber::take`] (or since
    /// subscribing). Returns `false` if the hub is gone and nothing more will ever be published.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// The latest value, marking it seen.
    pub fn take(&mut self) -> SyncSignal {
        *self.rx.borrow_and_update()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn latest_value_wins_and_publishing_never_blocks() {
        let hub = SyncEvents::new();
        let mut slow = hub.subscribe();
        let mut fast = hub.subscribe();
        assert_eq!(hub.subscribers(), 2);
        // A million publications with nobody reading: constant memory, no blocking.
        for _ in 0..1_000_000 {
            hub.entries_changed();
        }
        hub.bundle_changed(7);
        hub.federated_bundles_changed();
        assert!(fast.changed().await);
        assert_eq!(
            fast.take(),
            SyncSignal {
                entry_changes: 1_000_000,
                bundle_sequence: 7,
                federated_changes: 1,
                taint_generation: 0,
            }
        );
        // Nothing new since take: changed() waits.
        let waited = tokio::time::timeout(Duration::from_millis(20), fast.changed()).await;
        assert!(waited.is_err());
        // The same bundle sequence again is not a change.
        hub.bundle_changed(7);
        let waited = tokio::time::timeout(Duration::from_millis(20), fast.changed()).await;
        assert!(waited.is_err());
        assert!(slow.changed().await);
        assert_eq!(slow.take().entry_changes, 1_000_000);
        drop(slow);
        assert_eq!(hub.subscribers(), 1);
        drop(hub);
        assert!(!fast.changed().await);
    }
}
