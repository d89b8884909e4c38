//! Sigil's shared library: what both `sigil-server` and `sigil-agent` need.
//!
//! Layout, one concept a module:
//! - [`spiffe_id`]: `SpiffeId` and `TrustDomain`, enforcing the SPIFFE-ID spec.
//! - [`selector`]: `type:value` selectors and selector sets.
//! - [`clock`]: wall-clock Unix seconds, the one reader of the system clock for them.
//! - [`ttl`]: human durations (`90s`, `15m`, `1h`).
//! - [`entry`]: the registration-entry model, validated, with proto conversions.
//! - [`bundle`]: trust bundles in PEM and SPIFFE bundle (JWKS) formats.
//! - [`x509`]: PEM/DER helpers and X509-SVID inspection shared by tests and tools.
//! - [`jose`]: JWS compact serialization, JWKs, signatures (ring), the time and audience
//!   claims: what the JWT-SVID and service-account token checks build on, and JWT-SVID signing.
//! - [`jwt`]: JWT-SVID validation against a bundle's JWT authorities.
//! - [`fs`]: crash-safe file writes (keys are never left truncated or world-readable).
//! - [`h2_authority`]: accepts any HTTP/2 `:authority` on our Unix sockets (gRPC C-core and
//!   grpc-java send the socket path), re-encoding client header blocks in front of hyper.
//! - [`health`]: the `/live`, `/ready` and `/metrics` HTTP endpoint.
//! - [`https`]: a small HTTPS/1.1 JSON client (Kubernetes API server, kubelet, OIDC), CA-pinned.
//! - [`limits`]: process resource limits (open files raised to the hard limit at start).
//! - [`logging`]: `tracing` set-up (text or JSON).
//! - [`proto`]: generated code for the Workload, node and admin APIs.
//! - [`signals`]: SIGHUP is logged, never fatal.
//! - [`socket_api`]: the command lines' side of the local sockets: clear connect errors, and
//!   which API a socket serves when it is not the one expected.
//! - [`text`]: bounding untrusted values echoed into logs and error messages.
//! - [`uds`]: gRPC over Unix sockets: binding only in directories nobody else controls, the
//!   clients' check of a socket's directory, the client connector.
//! - [`tls`]: SPIFFE mutual TLS (rustls): swappable identity and trust bundle, SPIFFE-ID
//!   verifiers, a TLS accept stream for tonic, a TLS client channel, the peer's SVID.

// Tests may unwrap: a panic there is a test failure, which is the point.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod bundle;
pub mod clock;
pub mod config;
pub mod entry;
pub mod fs;
pub mod h2_authority;
pub mod health;
pub mod https;
pub mod jose;
pub mod jwt;
pub mod limits;
pub mod logging;
pub mod proto;
pub mod selector;
pub mod signals;
pub mod socket_api;
pub mod spiffe_id;
pub mod text;
pub mod tls;
pub mod ttl;
pub mod uds;
pub mod x509;

#[cfg(test)]
mod parse_props;

pub use selector::{Selector, SelectorSet};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
