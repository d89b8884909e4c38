//! Talking to sigil-server's node API: attestation over server-authenticated TLS, then mTLS with
//! the agent's own SVID for everything else.

use std::sync::Arc;

use sigil::proto::node as pb;
use sigil::proto::node::node_client::NodeClient;
use sigil::tls::{IdentityStore, ServerVerification, TrustStore};
use sigil::{SpiffeId, TrustDomain};
use tonic::transport::Channel;

use crate::sync::cache::make_csr;
use crate::sync::storage::AgentIdentity;

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

    /// True when trying again later may succeed: the server is unreachable, restarting,
    /// overloaded or failed internally. A refusal (PermissionDenied, Unauthenticated,
    /// InvalidArgument, FailedPrecondition...), a local configuration error or an unusable
    /// answer is not: retrying would only repeat it.
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            ClientError::Rpc { status, .. } => matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Internal
                    | Code::Unknown
                    | Code::Cancelled
            ),
            ClientError::Connect { .. } | ClientError::Protocol(_) | ClientError::Key(_) => false,
        }
    }

    /// Why the server refused us for good, when it said ([`sigil::proto::AgentRefusal`]).
    pub fn refusal(&self) -> Option<sigil::proto::AgentRefusal> {
        match self {
            ClientError::Rpc { status, .. } => sigil::proto::AgentRefusal::of(status),
            _ => None,
        }
    }

    pub(crate) fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
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
    attest(client, td, "join_token", token.as_bytes().to_vec(), |_| {
        Err(ClientError::Protocol(
            "server sent a challenge to a join-token attestation".into(),
        ))
    })
    .await
}

/// The prefix of the message signed for an x509pop challenge (must match the server's).
pub const X509POP_SIGNATURE_CONTEXT: &[u8] = b"sigil-x509pop-v1";

/// Attests with x509pop: sends the node certificate chain (DER, leaf first) and answers the
/// server's nonce with a signature by the node key (`key_pkcs8_der`), which never leaves the node.
pub async fn attest_x509pop(
    client: &mut NodeClient<Channel>,
    td: &TrustDomain,
    cert_chain_der: Vec<Vec<u8>>,
    key_pkcs8_der: &[u8],
) -> Result<Attested, ClientError> {
    use rcgen::{PublicKeyData as _, SigningKey as _};
    let leaf = cert_chain_der
        .first()
        .ok_or_else(|| ClientError::Protocol("the x509pop certificate chain is empty".into()))?;
    let key = rcgen::KeyPair::try_from(key_pkcs8_der).map_err(|e| {
        ClientError::Protocol(format!(
            "the x509pop key is not a supported PKCS#8 key (ECDSA P-256/P-384, RSA, Ed25519): {e}"
        ))
    })?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| ClientError::Protocol(format!("the x509pop node certificate: {e}")))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(ClientError::Protocol(
            "the x509pop key does not belong to the node certificate (the first certificate of the chain)"
                .into(),
        ));
    }
    let payload = cert_chain_der.concat();
    attest(client, td, "x509pop", payload, |nonce| {
        let mut message = X509POP_SIGNATURE_CONTEXT.to_vec();
        message.extend_from_slice(&nonce);
        key.sign(&message)
            .map_err(|e| ClientError::Protocol(format!("signing the x509pop challenge: {e}")))
    })
    .await
}

/// Attests with k8s_psat: sends `{"cluster", "token"}` (the projected service-account token the
/// kubelet mounted); the server verifies it and asks the API server about the pod and node.
pub async fn attest_k8s_psat(
    client: &mut NodeClient<Channel>,
    td: &TrustDomain,
    cluster: &str,
    token: &str,
) -> Result<Attested, ClientError> {
    let payload = serde_json::to_vec(&serde_json::json!({"cluster": cluster, "token": token}))
        .map_err(|e| ClientError::Protocol(format!("encoding the k8s_psat payload: {e}")))?;
    attest(client, td, "k8s_psat", payload, |_| {
        Err(ClientError::Protocol(
            "server sent a challenge to a k8s_psat attestation".into(),
        ))
    })
    .await
}

/// One attestation stream: `AttestParams` with a fresh key's CSR, then `respond` answers each
/// server challenge, until the result arrives.
async fn attest(
    client: &mut NodeClient<Channel>,
    td: &TrustDomain,
    kind: &str,
    payload: Vec<u8>,
    mut respond: impl FnMut(Vec<u8>) -> Result<Vec<u8>, ClientError>,
) -> Result<Attested, ClientError> {
    let (key, csr) = make_csr(None)?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = pb::AttestRequest {
        step: Some(pb::attest_request::Step::Params(pb::AttestParams {
            r#type: kind.into(),
            payload,
            csr,
        })),
    };
    tx.send(first)
        .await
        .map_err(|_| ClientError::Protocol("attestation stream closed".into()))?;
    let mut responses = client
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
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
                step: Some(pb::attest_response::Step::Challenge(c)),
            }) => {
                let answer = respond(c)?;
                tx.send(pb::AttestRequest {
                    step: Some(pb::attest_request::Step::ChallengeResponse(answer)),
                })
                .await
                .map_err(|_| {
                    ClientError::Protocol("the server closed the attestation stream".into())
                })?;
            }
            Some(_) => continue,
            None => {
                return Err(ClientError::Protocol(
                    "attestation ended without a result".into(),
                ))
            }
        }
    };
    drop(tx);
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

/// Renews the agent SVID with a new key. The server accepts the old SVID too until the new one
/// is first used, so the caller may keep the old one until the new one is stored.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_permanent_and_outages_transient() {
        let rpc = |code| ClientError::Rpc {
            what: "attestation",
            status: tonic::Status::new(code, "x"),
        };
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Internal,
            tonic::Code::Unknown,
        ] {
            assert!(rpc(code).is_transient(), "{code:?}");
        }
        for code in [
            tonic::Code::PermissionDenied,
            tonic::Code::Unauthenticated,
            tonic::Code::InvalidArgument,
            tonic::Code::FailedPrecondition,
            tonic::Code::NotFound,
            tonic::Code::Unimplemented,
        ] {
            assert!(!rpc(code).is_transient(), "{code:?}");
        }
        assert!(!ClientError::Protocol("bad answer".into()).is_transient());
    }
}
