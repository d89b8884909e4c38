//! sigil-agent: the node agent.
//!
//! - [`config`]: TOML configuration and `run` flags.
//! - [`admin`]: the agent's admin API (`sigil-agent status`) on a private Unix socket.
//! - [`cache`]: authorised entries, their SVIDs (keys made here), rotation times, the bundle.
//! - [`client`]: node API calls: join-token attestation, agent SVID renewal, mTLS channels.
//! - [`worker`]: the sync loop: sessions, batch signing, renewal, back-off.
//! - [`metrics`]: Prometheus metrics on `/metrics`.
//! - [`run`]: start-up (re-use the stored SVID or attest), health endpoint, shutdown.
//! - [`storage`]: the agent's own SVID and key on disk (reused across restarts, key 0600).
//!
//! The SPIFFE Workload API, which serves the cached SVIDs to local processes, is issue 4.

// Tests may unwrap: a panic there is a test failure, which is the point.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod cache;
pub mod client;
pub mod config;
pub mod metrics;
pub mod run;
pub mod storage;
pub mod worker;
