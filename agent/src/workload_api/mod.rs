//! The SPIFFE Workload API, served on a Unix socket any local process may connect to.
//!
//! - [`peer`]: accepted connections carry the caller's kernel credentials and a pin on its
//!   process, taken at accept time (PID reuse cannot lend an identity); open connections are
//!   capped per uid and in all, so no local user can starve the others.
//! - [`identities`]: which cached entries match a caller's selectors, and the messages built
//!   from them (full state, default SVID first, federated bundles where entries federate).
//! - [`service`]: the five `SpiffeWorkloadAPI` RPCs; streams are woken only by the cache
//!   changes that concern their caller and resend only when their message changed.
//! - [`jwt`]: JWT-SVIDs minted by the server on demand and cached for half their lifetime.
//! - [`expiry`]: wakes the streams when a cached SVID expires unrenewed (never served expired).
//! - [`sds`]: Envoy's Secret Discovery Service on the same socket, for the same callers.
//!
//! The wire contract is the SPIFFE standard's: service `SpiffeWorkloadAPI` (no package), the
//! `workload.spiffe.io: true` header, "no identity issued" as PermissionDenied. SDS is
//! `envoy.service.secret.v3.SecretDiscoveryService`, as SPIRE's agent serves it.

pub mod expiry;
pub mod identities;
pub mod jwt;
pub mod peer;
pub mod sds;
pub mod service;

use std::future::Future;
use std::path::Path;

use sigil::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::net::UnixListener;
use tokio_stream::StreamExt as _;

pub use peer::ConnectionLimits;
pub use sds::SdsConfig;
pub use service::WorkloadApi;

/// Directory mode of the public socket: others may enter and connect, not create files.
pub const SOCKET_DIR_MODE: u32 = 0o755;
/// Socket mode: any local process may connect (attestation decides what it gets).
pub const SOCKET_MODE: u32 = 0o777;

/// Binds the public Workload API socket (directory rules: [`sigil::uds`]).
pub async fn bind(
    path: &Path,
) -> Result<(UnixListener, sigil::uds::SocketFile), sigil::uds::SocketError> {
    let bound = sigil::uds::bind(path, SOCKET_DIR_MODE, SOCKET_MODE).await?;
    // An existing directory keeps its mode: say so if workloads of other users cannot enter it.
    if let Some(dir) = bound.1.path().parent() {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(dir) {
            if meta.permissions().mode() & 0o001 == 0 {
                tracing::warn!(
                    directory = %dir.display(),
                    mode = format!("{:04o}", meta.permissions().mode() & 0o7777),
                    "the Workload API socket's directory is not searchable by others: only its owner and group can reach the socket (sigil leaves the mode of a directory it did not create alone)"
                );
            }
        }
    }
    Ok(bound)
}

/// Serves `api`, and SDS over it with `sds`, on `listener`, with at most `limits` connections
/// open, until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    api: WorkloadApi,
    sds: SdsConfig,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = peer::incoming(listener, limits, api.metrics().clone());
    let secrets = sds::SecretDiscovery::new(api.clone(), sds).into_server();
    tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(api))
        .add_service(secrets)
        .serve_with_incoming_shutdown(
            // Any client's `:authority` (gRPC C-core and grpc-java send the socket path).
            incoming.map(|c| c.map(sigil::h2_authority::AuthorityFix::new)),
            shutdown,
        )
        .await
}
