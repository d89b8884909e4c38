//! sigil-agent: the node agent.
//!
//! - [`config`]: TOML configuration and `run` flags.
//! - [`admin`]: the agent's admin API (`sigil-agent status`, `explain`) on a private Unix socket.
//! - [`cli`]: operator commands: the `api` Workload API client and `explain`.
//! - [`node_attestor`]: the node attestation method (join token, x509pop, k8s_psat) and the
//!   first attestation at start-up.
//! - [`sync`]: after attestation: the worker that owns the cache and keeps it in step with the
//!   server (sessions, batch signing, renewal, back-off), the node API client, the agent's own
//!   SVID on disk.
//! - [`explain`]: why a process gets (or does not get) an SVID: matches and near misses.
//! - [`health`]: readiness (recent sync, no expired SVID, the socket still ours) and sync state.
//! - [`helper`]: `sigil-agent helper`: a Workload API client that keeps SVIDs in files for
//!   programs that only read PEM files (nginx, PostgreSQL, …) and signals them on rotation.
//! - [`metrics`]: Prometheus metrics on `/metrics`.
//! - [`run`]: start-up (re-use the stored SVID or attest), health endpoint, shutdown.
//! - [`workload_attestor`]: workload attestation: who is calling, from the kernel's peer credentials and
//!   /proc (unix, systemd, container and pod selectors), pinned against PID reuse.
//! - [`workload_api`]: the SPIFFE Workload API on a public Unix socket: SVID and bundle streams
//!   that push every rotation, JWT-SVIDs, validation.

// Tests may unwrap: a panic there is a test failure, which is the point.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod cli;
pub mod config;
pub mod explain;
pub mod health;
pub mod helper;
pub mod metrics;
pub mod node_attestor;
pub mod run;
pub mod sync;
pub mod workload_api;
pub mod workload_attestor;
