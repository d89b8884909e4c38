//! Keeping the agent in step with sigil-server, after node attestation.
//!
//! - [`worker`]: the one task that owns the [`cache`]: sync sessions, batch signing, agent SVID
//!   renewal, re-attestation, back-off; it publishes immutable snapshots of the cache.
//! - [`cache`]: authorised entries, their SVIDs (keys made here), rotation times, bundles.
//! - [`client`]: node API calls: attestation (join token, x509pop, k8s_psat), agent SVID renewal,
//!   mTLS channels.
//! - [`storage`]: the agent's own SVID and key on disk (reused across restarts, key 0600).

pub mod cache;
pub mod client;
pub mod storage;
pub mod worker;
