//! Talking to sigil-server's node API: attestation over server-authenticated TLS, then mTLS with
//! the agent's own SVID for everything else.

use std::sync::Arc;

use sigil::proto::node as pb;
use sigil::proto::node::node_client::NodeClient;
use sigil::tls::{IdentityStore, ServerVerification, TrustStore};
use sigil::{SpiffeId, TrustDomain};
use tonic::transport::Channel;

use crate::cache::make_csr;
use crate::storage::AgentIdentity;

/// Path of the server's SPIFFE ID.
pub const SERVER_PATH: &str = "/sigil/server";

/// Client-side failures, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS set-up or connection failure.
    #[error("connecting to sigil-server at {addr}: {source}")]
    Connect {
        /// Server address.
        addr: String,
        /// Cause.
        source: sigil::tls::TlsError,
    },
    /// The server refused or failed the call.
    #[error("{what}: {} ({:?})", .status.message(), .status.code())]
    Rpc {
        /// Which call.
        what: &'static str,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// The server's answer is unusable.
    #[error("{0}")]
    Protocol(String),
    /// Generating a key or CSR failed.
    #[error("generating the agent key: {0}")]
    Key(#[from] rcgen::Error),
}

impl ClientError {
    /// True when the server refused us (evicted, banned, bad token): retrying won't help.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, ClientError::Rpc { status, .. }
            if matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
    }

    fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
        move |status| ClientError::Rpc { what, status }
    }
}

/// The server's expected SPIFFE ID in `td`.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    td.id(SERVER_PATH)
        .unwrap_or_else(|_| unreachable!("constant server path is valid"))
}

/// An mTLS (or, with an empty identity, server-auth only) channel to the server.
pub fn channel(
    addr: &str,
    verification: ServerVerification,
    identity: Option<Arc<IdentityStore>>,
) -> Result<NodeClient<Channel>, ClientError> {
    let config = sigil::tls::client_config(verification, identity).map_err(|source| {
        ClientError::Connect {
            addr: addr.to_string(),
            source,
        }
    })?;
    let ch = sigil::tls::connect_lazy(addr, Arc::new(config)).map_err(|source| {
        ClientError::Connect {
            addr: addr.to_string(),
            source,
        }
    })?;
    // Sync snapshots are chunked by the server; allow generous messages for batch signing.
    Ok(NodeClient::new(ch)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024))
}

/// Verification against a trust bundle, expecting the server's SPIFFE ID.
pub fn verify_server(trust: Arc<TrustStore>, td: &TrustDomain) -> ServerVerification {
    ServerVerification::Spiffe {
        trust,
        expected_id: server_id(td),
    }
}

/// The result of attestation.
pub struct Attested {
    /// The agent's new identity (key generated here).
    pub identity: AgentIdentity,
    /// The trust bundle roots the server sent.
    pub bundle_roots: Vec<Vec<u8>>,
}

/// Attests with a join token: a fresh key and CSR, then the server's answer.
pub async fn attest_join_token(
    client: &mut NodeClient<Channel>,
    td: &TrustDomain,
    token: &str,
) -> Result<Attested, ClientError> {
    let (key, csr) = make_csr(None)?;
    let first = pb::AttestRequest {
        step: Some(pb::attest_request::Step::Params(pb::AttestParams {
            r#type: "join_token".into(),
            payload: token.as_bytes().to_vec(),
            csr,
        })),
    };
    let mut responses = client
        .attest(tokio_stream::iter(vec![first]))
        .await
        .map_err(ClientError::rpc("attestation"))?
        .into_inner();
    let result = loop {
        match responses
            .message()
            .await
            .map_err(ClientError::rpc("attestation"))?
        {
            Some(pb::AttestResponse {
                step: Some(pb::attest_response::Step::Result(r)),
            }) => break r,
            Some(pb::AttestResponse {
                step: Some(pb::attest_response::Step::Challenge(_)),
            }) => {
                return Err(ClientError::Protocol(
                    "server sent a challenge to a join-token attestation".into(),
                ))
            }
            Some(_) => continue,
            None => {
                return Err(ClientError::Protocol(
                    "attestation ended without a result".into(),
                ))
            }
        }
    };
    let chain = sigil::x509::split_der_concat(&result.svid_chain)
        .map_err(|e| ClientError::Protocol(format!("agent SVID chain: {e}")))?;
    let identity = AgentIdentity::new(td, chain, key)
        .map_err(|e| ClientError::Protocol(format!("agent SVID from the server: {e}")))?;
    let bundle_roots = sigil::x509::split_der_concat(&result.bundle)
        .map_err(|e| ClientError::Protocol(format!("trust bundle: {e}")))?;
    if bundle_roots.is_empty() {
        return Err(ClientError::Protocol(
            "server sent an empty trust bundle".into(),
        ));
    }
    Ok(Attested {
        identity,
        bundle_roots,
    })
}

/// Renews the agent SVID with a new key (the old SVID is superseded on the server).
pub async fn renew(
    client: &mut NodeClient<Channel>,
    td: &TrustDomain,
) -> Result<AgentIdentity, ClientError> {
    let (key, csr) = make_csr(None)?;
    let resp = client
        .renew_agent(pb::RenewAgentRequest { csr })
        .await
        .map_err(ClientError::rpc("agent SVID renewal"))?
        .into_inner();
    let chain = sigil::x509::split_der_concat(&resp.svid_chain)
        .map_err(|e| ClientError::Protocol(format!("renewed agent SVID chain: {e}")))?;
    AgentIdentity::new(td, chain, key)
        .map_err(|e| ClientError::Protocol(format!("renewed agent SVID: {e}")))
}
