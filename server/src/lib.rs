//! sigil-server: the identity server of one trust domain.
//!
//! - [`ca`]: the certificate authority (self-signed or upstream), X509-SVID and JWT-SVID issuing.
//! - [`datastore`]: registration entries, agents, join tokens, bundles (SQLite by default).
//! - [`api`]: the gRPC APIs (admin API on a local Unix socket, node API over mTLS).
//! - [`attestor`]: node attestors (how agents prove their node: join tokens, x509pop, k8s_psat).
//! - [`bundle_publisher`]: writes the trust bundle into a Kubernetes ConfigMap for the agents.
//! - [`kube`]: reaching the Kubernetes API server (in-cluster defaults), for k8s_psat and the
//!   bundle publisher.
//! - [`identity`]: the server's own X509-SVID for the node API, rotated at half its lifetime.
//! - [`cli`]: the `sigil-server` command line (run, entry, token, agent, bundle, healthcheck).
//! - [`config`]: TOML configuration and `run` flags.
//! - [`run`]: start-up, serving and graceful shutdown.
//! - [`metrics`]: Prometheus metrics.
//! - [`sync`]: which entries an agent is authorised for, and the push-based `Sync` stream.

// Tests may unwrap: a panic there is a test failure, which is the point.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod attestor;
pub mod bundle_publisher;
pub mod ca;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod datastore;
pub mod federation;
pub mod identity;
pub mod kube;
pub mod metrics;
pub mod run;
pub mod sync;
