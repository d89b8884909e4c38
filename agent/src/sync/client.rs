//! Talking to sigil-server's node API: attestation over server-authenticated TLS, then mTLS with
//! the agent's own SVID for everything else.

use std::sync::Arc;

use sigil::proto::node as pb;
use sigil::proto::node::node_client::NodeClient;
use sigil::tls::{IdentityStore, ServerVerification, TrustStore};
use sigil::{SpiffeId, TrustDomain};
use tonic::transport::Channel;

use crate::sync::cache::make_csr;
use crate::sync::storage::{AgentIdentity, IdentityError};

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
    /// The server sent a challenge to an attestation that has none.
    #[error("server sent a challenge to a {0} attestation")]
    UnexpectedChallenge(&'static str),
    /// The attestation stream closed before the exchange was complete.
    #[error("the server closed the attestation stream")]
    AttestationClosed,
    /// The attestation stream ended without a result.
    #[error("attestation ended without a result")]
    NoAttestationResult,
    /// A certificate list in the server's answer does not parse.
    #[error("{what} from the server: {source}")]
    BadCertificates {
        /// `agent SVID chain`, `trust bundle`, ...
        what: &'static str,
        /// Why.
        #[source]
        source: sigil::x509::X509Error,
    },
    /// The SVID the server issued is not a usable agent identity.
    #[error("{what} from the server: {source}")]
    BadIdentity {
        /// `agent SVID` or `renewed agent SVID`.
        what: &'static str,
        /// Why.
        #[source]
        source: IdentityError,
    },
    /// The server sent no trust bundle roots.
    #[error("server sent an empty trust bundle")]
    EmptyBundle,
    /// A sync message could not be applied.
    #[error("{0}")]
    Sync(#[source] crate::sync::cache::CacheError),
    /// The sync stream ended.
    #[error("sync stream closed by the server")]
    SyncClosed,
    /// Batch signing results do not answer the requests in order.
    #[error("batch signing results out of order")]
    SigningOutOfOrder,
    /// Re-attestation with a method that is not configured.
    #[error("no {0} settings configured")]
    NotConfigured(&'static str),
    /// The node's attestation material (files) cannot be read or used.
    #[error("{0}")]
    Material(#[source] crate::config::MaterialError),
    /// The x509pop certificate chain is empty.
    #[error("the x509pop certificate chain is empty")]
    X509popEmptyChain,
    /// The x509pop key is not a usable PKCS#8 key.
    #[error(
        "the x509pop key is not a supported PKCS#8 key (ECDSA P-256/P-384, RSA, Ed25519): {0}"
    )]
    X509popKey(#[source] rcgen::Error),
    /// The x509pop node certificate does not parse.
    #[error("the x509pop node certificate: {0}")]
    X509popCertificate(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The x509pop key is not the node certificate's.
    #[error("the x509pop key does not belong to the node certificate (the first certificate of the chain)")]
    X509popKeyMismatch,
    /// Signing the x509pop challenge failed.
    #[error("signing the x509pop challenge: {0}")]
    X509popSign(#[source] rcgen::Error),
    /// Encoding the k8s_psat payload failed.
    #[error("encoding the k8s_psat payload: {0}")]
    Encode(#[source] serde_json::Error),
    /// Saving the new agent SVID failed.
    #[error("saving the agent SVID: {0}")]
    Save(#[source] crate::sync::storage::StorageError),
    /// The TLS identity refused the new agent SVID.
    #[error("installing the agent SVID: {0}")]
    Install(#[source] sigil::tls::TlsError),
    /// The blocking task that generates keys and CSRs did not finish.
    #[error("the key generation task failed: {0}")]
    KeyTask(#[source] tokio::task::JoinError),
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
            // Local set-up problems and unusable answers: the same again on a retry.
            ClientError::Connect { .. }
            | ClientError::UnexpectedChallenge(_)
            | ClientError::AttestationClosed
            | ClientError::NoAttestationResult
            | ClientError::BadCertificates { .. }
            | ClientError::BadIdentity { .. }
            | ClientError::EmptyBundle
            | ClientError::Sync(_)
            | ClientError::SyncClosed
            | ClientError::SigningOutOfOrder
            | ClientError::NotConfigured(_)
            | ClientError::Material(_)
            | ClientError::X509popEmptyChain
            | ClientError::X509popKey(_)
            | ClientError::X509popCertificate(_)
            | ClientError::X509popKeyMismatch
            | ClientError::X509popSign(_)
            | ClientError::Encode(_)
            | ClientError::Save(_)
            | ClientError::Install(_)
            | ClientError::KeyTask(_)
            | ClientError::Key(_) => false,
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
        Err(ClientError::UnexpectedChallenge("join-token"))
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
        .ok_or(ClientError::X509popEmptyChain)?;
    let key = rcgen::KeyPair::try_from(key_pkcs8_der).map_err(ClientError::X509popKey)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(ClientError::X509popCertificate)?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(ClientError::X509popKeyMismatch);
    }
    let payload = cert_chain_der.concat();
    attest(client, td, "x509pop", payload, |nonce| {
        let mut message = X509POP_SIGNATURE_CONTEXT.to_vec();
        message.extend_from_slice(&nonce);
        key.sign(&message).map_err(ClientError::X509popSign)
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
        .map_err(ClientError::Encode)?;
    attest(client, td, "k8s_psat", payload, |_| {
        Err(ClientError::UnexpectedChallenge("k8s_psat"))
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
        .map_err(|_| ClientError::AttestationClosed)?;
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
                .map_err(|_| ClientError::AttestationClosed)?;
            }
            Some(_) => continue,
            None => return Err(ClientError::NoAttestationResult),
        }
    };
    drop(tx);
    let chain = sigil::x509::split_der_concat(&result.svid_chain).map_err(|source| {
        ClientError::BadCertificates {
            what: "agent SVID chain",
            source,
        }
    })?;
    let identity =
        AgentIdentity::new(td, chain, key).map_err(|source| ClientError::BadIdentity {
            what: "agent SVID",
            source,
        })?;
    let bundle_roots = sigil::x509::split_der_concat(&result.bundle).map_err(|source| {
        ClientError::BadCertificates {
            what: "trust bundle",
            source,
        }
    })?;
    if bundle_roots.is_empty() {
        return Err(ClientError::EmptyBundle);
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
    let chain = sigil::x509::split_der_concat(&resp.svid_chain).map_err(|source| {
        ClientError::BadCertificates {
            what: "renewed agent SVID chain",
            source,
        }
    })?;
    AgentIdentity::new(td, chain, key).map_err(|source| ClientError::BadIdentity {
        what: "renewed agent SVID",
        source,
    })
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
        assert!(!ClientError::EmptyBundle.is_transient());
    }

    /// Local problems and unusable answers are neither transient nor a refusal: the worker
    /// neither retries them as an outage nor drops its identity for them.
    #[test]
    fn local_and_answer_errors_are_permanent_but_no_refusal() {
        let bad_chain = sigil::x509::split_der_concat(&[0x30, 0x03, 0x02])
            .err()
            .map(|source| ClientError::BadCertificates {
                what: "agent SVID chain",
                source,
            });
        let errors = [
            ClientError::UnexpectedChallenge("join-token"),
            ClientError::AttestationClosed,
            ClientError::NoAttestationResult,
            ClientError::EmptyBundle,
            ClientError::SyncClosed,
            ClientError::SigningOutOfOrder,
            ClientError::NotConfigured("x509pop"),
            ClientError::Material(crate::config::MaterialError::NoCertificate("/x".into())),
            ClientError::X509popEmptyChain,
            ClientError::X509popKeyMismatch,
            ClientError::Sync(crate::sync::cache::CacheError::NoSnapshot),
        ];
        for e in errors.iter().chain(bad_chain.as_ref()) {
            assert!(!e.is_transient(), "{e}");
            assert!(!e.is_permission_denied(), "{e}");
            assert!(e.refusal().is_none(), "{e}");
        }
        let bad = bad_chain.expect("a truncated certificate does not parse");
        assert!(
            std::error::Error::source(&bad).is_some(),
            "the parser's error is kept as the cause"
        );
        assert!(
            bad.to_string()
                .starts_with("agent SVID chain from the server: "),
            "{bad}"
        );
        for code in [tonic::Code::PermissionDenied, tonic::Code::Unauthenticated] {
            let refused = ClientError::Rpc {
                what: "sync",
                status: tonic::Status::new(code, "x"),
            };
            assert!(refused.is_permission_denied() && !refused.is_transient());
        }
    }
}
