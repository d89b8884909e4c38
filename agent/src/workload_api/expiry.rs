//! Wakes the Workload API streams whose cached X509-SVIDs expire.
//!
//! Rotation replaces an SVID at half its lifetime, so this only matters when renewal failed
//! (server unreachable for long, CA expired): the streams then look at the cache again, which
//! never serves an expired SVID, and a caller left without a valid one gets Unavailable instead
//! of keeping an expired SVID as if it were valid. Only the streams the expired SVIDs' entries
//! concern are woken.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::sync::cache::Changes;
use crate::sync::worker::AgentState;

use sigil::clock::now_unix;

/// Runs until `shutdown` turns true: sleeps until the next cached SVID expires, then wakes the
/// streams of the entries whose SVIDs expired; every published snapshot re-computes the next
/// expiry.
pub async fn wake_streams_at_expiry(state: Arc<AgentState>, mut shutdown: watch::Receiver<bool>) {
    let mut snapshots = state.snapshots();
    loop {
        // Marked seen before it is read: a snapshot published after the read wakes the loop.
        let snapshot = snapshots.borrow_and_update().clone();
        let now = now_unix();
        let next = snapshot.next_expiry_after(now);
        // Whole seconds from a floored `now`: the wake-up is at or after the expiry.
        let sleep = next.map(|t| Duration::from_secs((t - now).max(0) as u64));
        tokio::select! {
            _ = async {
                match sleep {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!(not_after = next, "a cached X509-SVID expired without being renewed; Workload API streams stop serving it");
                let upto = now_unix().max(next.unwrap_or(now));
                let entries = state.snapshot().expiring(now, upto);
                state.watchers.wake(&Changes { all: false, entries });
            }
            r = snapshots.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
