//! Node attestors: how an agent proves which node it runs on, before it holds an SVID.
//!
//! The node API's `Attest` stream hands the first message's `type` and `payload` to the
//! [`NodeAttestor`] registered for that type in [`Attestors`]; an unregistered type is refused
//! with InvalidArgument "unsupported attestation type". An attestor returns the agent's SPIFFE
//! ID (`spiffe://<td>/sigil/agent/<type>/<id>`), the node selectors it observed, and optionally
//! a node-alias ID. Everything after that — refusing banned agents, signing the agent SVID from
//! the CSR, storing the agent, creating the node-alias entry — is the node API's job
//! (`crate::api::node`), identical for every method.
//!
//! Methods that need a proof of possession (x509pop: "sign this nonce with the key of your node
//! certificate") talk to the agent through the [`Challenger`] the node API passes in: each
//! challenge is sent as `AttestResponse.challenge` and answered by the next
//! `AttestRequest.challenge_response`. Adding such a method is one new module implementing
//! [`NodeAttestor`] and one `Attestors::with` line where the server builds its attestors.
//!
//! - [`join_token`]: single-use, expiring tokens from `sigil-server token generate`.
//! - [`x509pop`]: proof of possession of a node certificate's key, the certificate issued by a
//!   CA in the configured x509pop bundle.
//! - [`k8s_psat`]: a Kubernetes projected service-account token, checked against the cluster's
//!   issuer keys or TokenReview, and the agent's pod and node confirmed by the API server.

pub mod join_token;
pub mod k8s_psat;
pub mod x509pop;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use sigil::{SelectorSet, SpiffeId};

use crate::datastore::DatastoreError;

/// Path prefix of every agent SPIFFE ID: `spiffe://<td>/sigil/agent/<type>/<id>`.
pub const AGENT_PATH_PREFIX: &str = "/sigil/agent/";

/// What a successful node attestation establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// The agent's SPIFFE ID, under [`AGENT_PATH_PREFIX`].
    pub agent_id: SpiffeId,
    /// Node selectors observed by the attestor (used to match node-alias entries).
    pub selectors: SelectorSet,
    /// A node-alias SPIFFE ID to register with the agent as parent, if the attestation data
    /// asks for one (a join token generated with `--spiffe-id`).
    pub node_alias: Option<SpiffeId>,
}

/// Why attestation failed. The node API maps each variant to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The attestation data was understood and is not acceptable (PermissionDenied).
    #[error("{0}")]
    Denied(String),
    /// The attestation data is malformed (InvalidArgument).
    #[error("invalid attestation payload: {0}")]
    InvalidPayload(String),
    /// The agent went away or broke the challenge protocol (Aborted).
    #[error("attestation challenge failed: {0}")]
    Challenge(String),
    /// Something the attestor depends on (a Kubernetes API server, an OIDC issuer) could not
    /// be reached or answered wrongly; trying again later may succeed (Unavailable).
    #[error("attestation could not be completed: {0}")]
    Unavailable(String),
    /// The datastore failed (Internal / Unavailable).
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

/// The agent side of a challenge–response exchange on the `Attest` stream.
#[async_trait]
pub trait Challenger: Send {
    /// Sends `challenge` to the agent and returns its answer.
    async fn challenge(&mut self, challenge: Vec<u8>) -> Result<Vec<u8>, AttestError>;
}

/// One node attestation method.
#[async_trait]
pub trait NodeAttestor: Send + Sync + 'static {
    /// The `AttestParams.type` this attestor handles, e.g. `join_token`; also the agent ID's
    /// path segment after [`AGENT_PATH_PREFIX`] and the stored `attestation_type`.
    fn attestation_type(&self) -> &'static str;

    /// Verifies `payload` (and any challenges) and says which agent this is.
    async fn attest(
        &self,
        payload: &[u8],
        challenger: &mut dyn Challenger,
    ) -> Result<AttestedNode, AttestError>;
}

/// The attestors a server accepts, by type.
#[derive(Clone, Default)]
pub struct Attestors {
    by_type: BTreeMap<&'static str, Arc<dyn NodeAttestor>>,
}

impl std::fmt::Debug for Attestors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_type.keys()).finish()
    }
}

impl Attestors {
    /// No attestors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the attestor for its type.
    pub fn with(mut self, attestor: Arc<dyn NodeAttestor>) -> Self {
        self.by_type.insert(attestor.attestation_type(), attestor);
        self
    }

    /// The attestor for `attestation_type`, if registered.
    pub fn get(&self, attestation_type: &str) -> Option<Arc<dyn NodeAttestor>> {
        self.by_type.get(attestation_type).cloned()
    }

    /// Registered types, sorted (for error messages).
    pub fn types(&self) -> Vec<&'static str> {
        self.by_type.keys().copied().collect()
    }
}
