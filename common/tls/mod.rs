//! SPIFFE mutual TLS for the node API (rustls 0.23, `ring` provider), shared by server and agent.
//!
//! SPIFFE authenticates peers by the SPIFFE ID in the URI SAN of an X509-SVID, not by DNS names:
//! both verifiers here validate the chain against a trust bundle with `rustls-webpki` and then
//! apply the X509-SVID leaf rules ([`crate::x509::check_x509_svid`]).
//!
//! - [`IdentityStore`]: this process's own SVID (chain + key). [`IdentityStore::set`] rotates it
//!   without restarting listeners or rebuilding configs: every new handshake reads the current
//!   one. It serves as the server's certificate resolver and the client's certificate resolver.
//! - [`TrustStore`]: the trust-bundle roots, also swappable with [`TrustStore::set`].
//! - [`server_config`]: client certificates are *optional* (agents attest before they hold an
//!   SVID); a presented one must chain to the [`TrustStore`] for client auth and be a valid
//!   X509-SVID, otherwise the handshake fails. Handlers read it with [`peer_svid`].
//! - [`client_config`]: the server's chain must verify against the [`TrustStore`] and carry the
//!   expected SPIFFE ID ([`ServerVerification::Spiffe`]); [`ServerVerification::InsecureBootstrap`]
//!   accepts any server certificate, for demos only.
//! - [`incoming`]: a TCP listener turned into a stream of finished TLS connections for
//!   `tonic::transport::Server::serve_with_incoming_shutdown`. Handshakes run in their own tasks
//!   with a timeout, so a slow or broken client never blocks others or the accept loop, which
//!   never pauses: unfinished handshakes are bounded per source address and in total, and a
//!   flood drops the oldest handshakes of the source holding the most (see [`HandshakeLimits`]).
//! - [`connect`] / [`connect_lazy`]: a tonic [`Channel`](tonic::transport::Channel) over TLS
//!   with a [`rustls::ClientConfig`].
//!
//! Only TLS 1.3 is offered: it encrypts the client certificate, so an agent's SPIFFE ID is not
//! visible on the wire. Session resumption is disabled on both sides, so every connection
//! presents and verifies a certificate against the *current* trust bundle.
//!
//! Layout: this file holds the constants, [`TlsError`] and the crypto provider; `store.rs` the
//! swappable [`IdentityStore`] and [`TrustStore`]; `verify.rs` the SPIFFE peer verifiers;
//! `config.rs` [`server_config`] and [`client_config`]; `incoming.rs` the server's accept loop
//! and its handshake bounds; `connect.rs` the client channels; `peer.rs` [`PeerSvid`] and
//! [`peer_svid`].

use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;

use crate::x509::X509Error;

mod config;
mod connect;
mod incoming;
mod peer;
mod store;
#[cfg(test)]
mod tests;
mod verify;

pub use config::{client_config, server_config};
pub use connect::{connect, connect_lazy};
pub use incoming::{
    incoming, incoming_with_limits, incoming_with_timeout, HandshakeLimits, TlsConnection,
};
pub use peer::{peer_svid, PeerSvid};
pub use store::{IdentityStore, TrustStore};
pub use verify::{
    ServerVerification, SpiffeClientVerifier, SpiffeServerVerifier, UnexpectedServerId,
};

/// The ALPN protocol both sides negotiate (gRPC runs over HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";
/// How long [`incoming`] waits for a client to finish its TLS handshake (an agent's takes
/// milliseconds; a connection that sends nothing holds a slot only this long).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many handshakes run at once in [`incoming`], from all sources together.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 1024;
/// At most this many handshakes from one source (an IPv4 address, an IPv6 /64) run at once in
/// [`incoming`]. Agents behind one NAT address share it.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// [`incoming`] logs a handshake flood at most once per this interval, with counts.
pub const FLOOD_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// TCP + TLS connect timeout of [`connect`] / [`connect_lazy`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Client HTTP/2 ping interval on node API channels.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a client waits for a ping's answer before it closes the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why TLS material or a connection is unusable; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An identity without any certificate.
    #[error("the certificate chain is empty; pass the X509-SVID leaf first, then intermediates")]
    EmptyChain,
    /// The leaf is not a valid X509-SVID.
    #[error("the leaf certificate is not a usable X509-SVID: {0}")]
    InvalidSvid(#[source] X509Error),
    /// The private key cannot be loaded or does not belong to the leaf.
    #[error("the private key is unusable: {0}; pass the unencrypted PKCS#8 DER key of the leaf certificate")]
    InvalidKey(#[source] rustls::Error),
    /// A trust bundle without roots.
    #[error("the trust bundle is empty; pass at least one root certificate (e.g. from `sigil-server bundle show`)")]
    EmptyBundle,
    /// A root that cannot serve as a trust anchor.
    #[error("trust-bundle certificate #{index} cannot be used as a root: {source}")]
    InvalidRoot {
        /// Position of the root in the bundle (0-based).
        index: usize,
        /// What the parser reported.
        #[source]
        source: webpki::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(#[source] rustls::Error),
    /// The server address is not `host:port`.
    #[error("invalid server address {addr:?}: {reason}; use HOST:PORT, e.g. sigil.example.org:8081 or 10.0.0.1:8081")]
    InvalidAddress {
        /// The address as given (at most 256 characters of it).
        addr: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// The address passed the `host:port` rules but is not a usable endpoint URI.
    #[error("invalid server address {addr:?}: {source}; use HOST:PORT, e.g. sigil.example.org:8081 or 10.0.0.1:8081")]
    InvalidEndpoint {
        /// The address as given (at most 256 characters of it).
        addr: String,
        /// What tonic reported.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting (TCP, TLS handshake or HTTP/2) failed.
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The crypto provider used everywhere in Sigil (`ring`).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
