//! The node API as the worker sees it: a trait in front of the gRPC client, so that the
//! worker's session logic (renewal, refusals, back-off, re-attestation) can be tested against a
//! scripted server in paused time.
//!
//! [`TonicNodeApi`] is the real one: [`super::client`]'s calls over TLS to sigil-server, to
//! one of the configured servers at a time ([`Servers`]).

use std::sync::Arc;

use async_trait::async_trait;
use sigil::proto::node as pb;
use sigil::proto::node::node_client::NodeClient;
use sigil::tls::{IdentityStore, TrustStore};
use sigil::TrustDomain;
use tonic::transport::Channel;

use super::client::{self, Attested, ClientError};
pub use super::servers::Failover;
use super::servers::Servers;
use super::storage::AgentIdentity;
use crate::node_attestor::NodeAttestation;

/// sigil-server's node API.
#[async_trait]
pub trait NodeApi: Send + Sync {
    /// A session: one connection presenting the agent's current SVID.
    fn session(&self) -> Result<Box<dyn NodeSession>, ClientError>;

    /// Attests again with `method` (material read afresh), over a connection without client
    /// identity.
    async fn attest(&self, method: &NodeAttestation) -> Result<Attested, ClientError>;

    /// The server address sessions go to now.
    fn server(&self) -> String;

    /// The session with the server at `address` failed, not by a refusal (unreachable, stream
    /// broken, keepalive timeout): sessions go to the next server from now on (the same one if
    /// there is only one).
    async fn server_failed(&self, address: &str) -> Failover;
}

/// The calls of one session.
#[async_trait]
pub trait NodeSession: Send + Sync {
    /// Opens the sync stream.
    async fn sync(&mut self, request: pb::SyncRequest) -> Result<Box<dyn SyncStream>, ClientError>;

    /// Signs CSRs: one result per request, in order. Several calls may be in flight at once.
    async fn batch_sign(
        &self,
        requests: Vec<pb::SignRequest>,
    ) -> Result<Vec<pb::SignResult>, ClientError>;

    /// Renews the agent SVID with a new key.
    async fn renew(&mut self) -> Result<AgentIdentity, ClientError>;
}

/// A sync stream's messages.
#[async_trait]
pub trait SyncStream: Send {
    /// The next message; `None` when the server closed the stream. Cancel-safe.
    async fn message(&mut self) -> Result<Option<pb::SyncResponse>, ClientError>;
}

/// The node API over TLS (mTLS with the agent SVID after attestation).
pub struct TonicNodeApi {
    servers: Arc<Servers>,
    trust_domain: TrustDomain,
    /// The agent SVID presented (the worker rotates it).
    tls_identity: Arc<IdentityStore>,
    /// Roots the server is verified with (the worker updates them from sync).
    trust: Arc<TrustStore>,
}

impl TonicNodeApi {
    /// The node API of `servers` (one at a time), verified against `trust` as the server of
    /// `trust_domain`, presenting `tls_identity`.
    pub fn new(
        servers: Arc<Servers>,
        trust_domain: TrustDomain,
        tls_identity: Arc<IdentityStore>,
        trust: Arc<TrustStore>,
    ) -> Self {
        Self {
            servers,
            trust_domain,
            tls_identity,
            trust,
        }
    }

    /// A channel to the server, verified against the current bundle; presenting `identity`
    /// (the agent SVID) or none (attestation).
    fn channel(
        &self,
        identity: Option<Arc<IdentityStore>>,
    ) -> Result<NodeClient<Channel>, ClientError> {
        client::channel(
            &self.servers.current(),
            client::verify_server(self.trust.clone(), &self.trust_domain),
            identity,
        )
    }
}

#[async_trait]
impl NodeApi for TonicNodeApi {
    fn session(&self) -> Result<Box<dyn NodeSession>, ClientError> {
        Ok(Box::new(TonicSession {
            node: self.channel(Some(self.tls_identity.clone()))?,
            trust_domain: self.trust_domain.clone(),
        }))
    }

    async fn attest(&self, method: &NodeAttestation) -> Result<Attested, ClientError> {
        let mut node = self.channel(None)?;
        method.attest(&mut node, &self.trust_domain).await
    }

    fn server(&self) -> String {
        self.servers.current()
    }

    async fn server_failed(&self, address: &str) -> Failover {
        self.servers.failed(address).await
    }
}

struct TonicSession {
    node: NodeClient<Channel>,
    trust_domain: TrustDomain,
}

#[async_trait]
impl NodeSession for TonicSession {
    async fn sync(&mut self, request: pb::SyncRequest) -> Result<Box<dyn SyncStream>, ClientError> {
        let stream = self
            .node
            .sync(request)
            .await
            .map_err(ClientError::rpc("sync"))?
            .into_inner();
        Ok(Box::new(stream))
    }

    async fn batch_sign(
        &self,
        requests: Vec<pb::SignRequest>,
    ) -> Result<Vec<pb::SignResult>, ClientError> {
        // A clone shares the connection: concurrent calls are streams of one HTTP/2 connection.
        self.node
            .clone()
            .batch_sign(pb::BatchSignRequest { requests })
            .await
            .map(|r| r.into_inner().results)
            .map_err(ClientError::rpc("batch signing"))
    }

    async fn renew(&mut self) -> Result<AgentIdentity, ClientError> {
        client::renew(&mut self.node, &self.trust_domain).await
    }
}

#[async_trait]
impl SyncStream for tonic::Streaming<pb::SyncResponse> {
    async fn message(&mut self) -> Result<Option<pb::SyncResponse>, ClientError> {
        tonic::Streaming::message(self)
            .await
            .map_err(ClientError::rpc("sync"))
    }
}
