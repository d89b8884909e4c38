//! `Sync`: the stream of the entries and bundles an agent is authorised for
//! ([`crate::sync::sync_stream`]), ended with Unavailable when the server shuts down.

use std::pin::Pin;

use sigil::proto::node as pb;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::Status;

use super::NodeState;
use crate::datastore::AttestedAgent;

/// A response stream of the node API.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Opens the sync stream of the authenticated `agent`.
pub(super) fn open(
    state: &NodeState,
    agent: AttestedAgent,
    req: pb::SyncRequest,
) -> BoxStream<pb::SyncResponse> {
    tracing::debug!(agent = %agent.spiffe_id, "sync stream opened");
    let stream = crate::sync::sync_stream(
        state.datastore.clone(),
        state.events.clone(),
        agent.spiffe_id,
        state.server_id(),
        state.trust_domain.clone(),
        req,
        state.reconcile_every,
    );
    until_shutdown(stream, state.shutdown.clone())
}

/// Ends `stream` with Unavailable once `shutdown` turns true.
pub(super) fn until_shutdown<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> BoxStream<T> {
    let stop: Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(async move {
        if shutdown.wait_for(|stop| *stop).await.is_err() {
            // No sender: the server never signals shutdown.
            std::future::pending::<()>().await;
        }
    });
    let inner: BoxStream<T> = Box::pin(stream);
    Box::pin(futures::stream::unfold(
        Some((inner, stop)),
        |state| async move {
            let (mut inner, mut stop) = state?;
            tokio::select! {
                item = futures::StreamExt::next(&mut inner) => item.map(|i| (i, Some((inner, stop)))),
                _ = &mut stop => Some((
                    Err(Status::unavailable("the server is shutting down; reconnect")),
                    None,
                )),
            }
        },
    ))
}
