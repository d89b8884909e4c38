//! Wakes the Workload API streams when a cached X509-SVID expires.
//!
//! Rotation replaces an SVID at half its lifetime, so this only matters when renewal failed
//! (server unreachable for long, CA expired): the streams then re-read the cache, which never
//! serves an expired SVID, and a caller left without a valid one gets Unavailable instead of
//! keeping an expired SVID as if it were valid.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::sync::worker::AgentState;

use sigil::clock::now_unix;

/// Runs until `shutdown` turns true: sleeps until the next cached SVID expires, then bumps the
/// agent's change counter; any cache change re-computes the next expiry.
pub async fn wake_streams_at_expiry(state: Arc<AgentState>, mut shutdown: watch::Receiver<bool>) {
    let mut changes = state.changes.subscribe();
    loop {
        // Marked seen before the cache is read: a change after the read wakes the loop.
        changes.borrow_and_update();
        let now = now_unix();
        let next = state.cache.read().await.next_expiry_after(now);
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
                state.notify_changed();
            }
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
