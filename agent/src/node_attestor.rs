//! Node attestation: how the agent proves its node to sigil-server and gets its agent SVID.
//!
//! One method is configured ([`NodeAttestation`]): a join token (single-use), an x509pop node
//! certificate, or a k8s_psat projected service-account token. The first attestation runs at
//! start-up (`run::attest_first`) when no usable agent SVID is stored; x509pop and k8s_psat can
//! attest again later, when the server evicted the agent or its SVID expired (the worker calls
//! [`NodeAttestation::attest`] through [`crate::sync::node_api::NodeApi`]). The material is read
//! from disk for every attestation: an x509pop certificate may have been renewed, and the kubelet
//! rotates projected tokens.

use sigil::proto::node::node_client::NodeClient;
use sigil::TrustDomain;
use tonic::transport::Channel;

use crate::config::{K8sPsatConfig, X509PopConfig};
use crate::sync::client::{self, Attested, ClientError};

/// The configured node attestation method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAttestation {
    /// A join token from `sigil-server token generate` (single-use).
    JoinToken(String),
    /// A node certificate and its key (files on the node).
    X509Pop(X509PopConfig),
    /// A projected Kubernetes service-account token.
    K8sPsat(K8sPsatConfig),
}

/// What one attestation sends, read from disk.
pub enum Material {
    /// The join token.
    JoinToken(String),
    /// The x509pop chain (DER, leaf first) and key (PKCS#8 DER).
    X509Pop(Vec<Vec<u8>>, Vec<u8>),
    /// The k8s_psat cluster name and token.
    K8sPsat(String, String),
}

impl NodeAttestation {
    /// The method's name, as the server's node attestor types are named.
    pub fn name(&self) -> &'static str {
        match self {
            NodeAttestation::JoinToken(_) => "join_token",
            NodeAttestation::X509Pop(_) => "x509pop",
            NodeAttestation::K8sPsat(_) => "k8s_psat",
        }
    }

    /// True when the agent can attest again with this method after an eviction or an expired
    /// SVID (a join token is single-use).
    pub fn can_attest_again(&self) -> bool {
        !matches!(self, NodeAttestation::JoinToken(_))
    }

    /// What the error of a failed attestation is prefixed with.
    pub fn failed(&self) -> &'static str {
        match self {
            NodeAttestation::JoinToken(_) => "node attestation with the join token failed",
            NodeAttestation::X509Pop(_) => "x509pop node attestation failed",
            NodeAttestation::K8sPsat(_) => "k8s_psat node attestation failed",
        }
    }

    /// Reads the material (files named in the error when they are unusable).
    pub fn load(&self) -> Result<Material, crate::config::MaterialError> {
        Ok(match self {
            NodeAttestation::JoinToken(t) => Material::JoinToken(t.clone()),
            NodeAttestation::X509Pop(x) => {
                let (chain, key) = x.load()?;
                Material::X509Pop(chain, key)
            }
            NodeAttestation::K8sPsat(k) => Material::K8sPsat(k.cluster.clone(), k.load_token()?),
        })
    }

    /// Reads the material afresh and attests over `node` (a channel without client identity).
    /// An unreadable file is a [`ClientError::Material`]: the caller retries later.
    pub async fn attest(
        &self,
        node: &mut NodeClient<Channel>,
        td: &TrustDomain,
    ) -> Result<Attested, ClientError> {
        let material = self.load().map_err(ClientError::Material)?;
        material.attest(node, td).await
    }
}

impl Material {
    /// Attests with this material over `node`.
    pub async fn attest(
        &self,
        node: &mut NodeClient<Channel>,
        td: &TrustDomain,
    ) -> Result<Attested, ClientError> {
        match self {
            Material::JoinToken(token) => client::attest_join_token(node, td, token).await,
            Material::X509Pop(chain, key) => {
                client::attest_x509pop(node, td, chain.clone(), key).await
            }
            Material::K8sPsat(cluster, token) => {
                client::attest_k8s_psat(node, td, cluster, token).await
            }
        }
    }
}
