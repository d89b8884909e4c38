//! Health: readiness (start-up complete, the CA's validity), counts, version.

use sigil::clock::now_unix;
use sigil::proto::admin as pb;
use tonic::Status;

use super::{ds_status, AdminState};
use crate::datastore::EntryFilter;

/// Why the server is not ready before start-up completes and once shutdown began.
pub(super) const NOT_STARTED: &str =
    "still starting (or shutting down): not every API is serving; its log says \"sigil-server ready\" once they are";

/// Health; also refreshes the `entries` gauge.
pub(super) async fn health(
    state: &AdminState,
    _req: pb::HealthRequest,
) -> Result<pb::HealthResponse, Status> {
    let ds = &state.datastore;
    let entries = ds
        .count_entries(&EntryFilter::default())
        .await
        .map_err(ds_status)?;
    let agents = ds.count_agents().await.map_err(ds_status)?;
    state.metrics.entries.set(entries as i64);
    let not_ready = if state.started.load(std::sync::atomic::Ordering::SeqCst) {
        crate::ca::expiry::not_ready_reason(
            state.ca_not_after.load(std::sync::atomic::Ordering::SeqCst),
            now_unix(),
        )
    } else {
        Some(NOT_STARTED.to_string())
    };
    Ok(pb::HealthResponse {
        ready: not_ready.is_none(),
        not_ready_reason: not_ready.unwrap_or_default(),
        ca_not_after: state.ca_not_after.load(std::sync::atomic::Ordering::SeqCst),
        trust_domain: state.trust_domain.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        entries,
        agents,
    })
}
