//! sigil-agent: the node agent.
//!
//! - [`config`]: TOML configuration and `run` flags.
//! - [`admin`]: the agent's admin API (`sigil-agent status`, `explain`) on a private Unix socket.
//! - [`cache`]: authorised entries, their SVIDs (keys made here), rotation times, the bundle.
//! - [`cli`]: operator commands: the `api` Workload API client and `explain`.
//! - [`client`]: node API calls: attestation (join token, x509pop, k8s_psat), agent SVID renewal,
//!   mTLS channels.
//! - [`worker`]: the sync loop: sessions, batch signing, renewal, back-off.
//! - [`explain`]: why a process gets (or does not get) an SVID: matches and near misses.
//! - [`health`]: readiness (recent sync, no expired SVID, the socket still ours) and sync state.
//! - [`helper`]: `sigil-agent helper`: a Workload API client that keeps SVIDs in files for
//!   programs that only read PEM files (nginx, PostgreSQL, …) and signals them on rotation.
//! - [`metrics`]: Prometheus metrics on `/metrics`.
//! - [`run`]: start-up (re-use the stored SVID or attest), health endpoint, shutdown.
//! - [`storage`]: the agent's own SVID and key on disk (reused across restarts, key 0600).
//! - [`attestor`]: workload attestation: who is calling, from the kernel's peer credentials and
//!   /proc (unix, systemd, container and pod selectors), pinned against PID reuse.
//! - [`workload_api`]: the SPIFFE Workload API on a public Unix socket: SVID and bundle streams
//!   that push every rotation, JWT-SVIDs, validation.

// Tests may unwrap: a panic there is a test failure, which is the point.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod attestor;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod explain;
pub mod health;
pub mod helper;
pub mod metrics;
pub mod run;
pub mod storage;
pub mod worker;
pub mod workload_api;
