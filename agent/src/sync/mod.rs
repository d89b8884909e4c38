//! Keeping the agent in step with sigil-server, after node attestation.
//!
//! - [`worker`]: the one task that owns the [`cache`]: sync sessions, batch signing, agent SVID
//!   renewal, re-attestation, back-off; it publishes immutable snapshots of the cache.
//! - [`cache`]: authorised entries, their SVIDs (keys made here), rotation times, bundles.
//! - [`client`]: node API calls: attestation (join token, x509pop, k8s_psat), agent SVID renewal,
//!   mTLS channels.
//! - [`held_chain`], [`held_key`]: an SVID's chain and private key as the cache holds them
//!   (compressed against a chain of the same authority; a P-256 key as its secret).
//! - [`node_api`]: the node API as the worker sees it ([`node_api::NodeApi`]), in front of the
//!   gRPC client.
//! - [`servers`]: the configured sigil-servers (several share one datastore) and which one the
//!   agent talks to now; a failed session moves it to the next.
//! - [`storage`]: the agent's own SVID and key on disk (reused across restarts, key 0600).
//! - [`watchers`]: the Workload API streams to wake, indexed by selector: a change wakes only
//!   the streams it concerns.

pub mod cache;
pub mod client;
pub mod held_chain;
pub mod held_key;
pub mod node_api;
pub mod servers;
pub mod storage;
pub mod watchers;
pub mod worker;
