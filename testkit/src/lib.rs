//! Test support shared by Sigil's tests and benchmarks.
//!
//! - Processes: [`Server`] and [`Agent`] run the real `sigil-server` and `sigil-agent` binaries
//!   on temp dirs (killed on drop, so a failing test leaves nothing behind), with helpers for
//!   entries, join tokens and waiting on logs and status; [`binary`] finds the binaries cargo
//!   built, [`terminate`] stops other programs the tests start.
//! - [`fake_k8s`]: a fake Kubernetes API server (pods, nodes, TokenReview, ConfigMaps, OIDC
//!   discovery) over real HTTPS, and a service-account token issuer.
//! - [`fake_kubelet`]: a fake kubelet serving pod lists over real HTTPS.
//! - [`spire`]: real SPIRE servers and agents (built by `tests/spire/build.sh`) for
//!   interoperability and migration tests.
//! - [`postgres`]: a database of its own per test on a throwaway PostgreSQL cluster (or the
//!   server named by `SIGIL_TEST_POSTGRES_URL`).

pub mod fake_k8s;
pub mod fake_kubelet;
mod harness;
pub mod postgres;
mod process;
pub mod spire;

pub use harness::*;
pub use process::*;
