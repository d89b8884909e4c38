//! The server's gRPC APIs.
//!
//! - [`admin`]: the admin API on the local Unix socket (entries, agents, bundle, federated
//!   bundles, join tokens, health), used by the `sigil-server` CLI. Every mutation is audited.
//! - [`node`]: the node API for agents over SPIFFE mTLS on `bind_address` (attestation, agent
//!   SVID renewal, entry sync, batch X509-SVID signing, JWT-SVID minting).

pub mod admin;
pub mod node;

use sigil::{SpiffeId, TrustDomain};

/// Path of the server's own SPIFFE ID, `spiffe://<td>/sigil/server`; node-alias entries use it
/// as their parent.
pub const SERVER_PATH: &str = "/sigil/server";
/// Paths under this prefix are reserved for the server and agents.
pub const RESERVED_PREFIX: &str = "/sigil/";

/// The server's SPIFFE ID in `td`.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    // SERVER_PATH is a valid path constant, so this cannot fail for a valid trust domain.
    td.id(SERVER_PATH)
        .unwrap_or_else(|_| unreachable!("constant server path is valid"))
}

/// True if `id` is in the namespace reserved for Sigil's own components.
pub fn is_reserved(id: &SpiffeId) -> bool {
    id.path().starts_with(RESERVED_PREFIX)
}
