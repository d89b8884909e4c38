//! `x509pop` node attestation: the agent proves possession of the private key of a node
//! certificate issued by a CA the server trusts (`[node_attestor.x509pop] ca_bundle`).
//!
//! Protocol (SPIRE-like), on the `Attest` stream:
//! 1. `AttestParams.payload` is the node certificate chain, concatenated DER, leaf first.
//! 2. The server verifies the chain against its x509pop CA bundle with `rustls-webpki`
//!    (client-auth usage, validity period). Node certificates need no SPIFFE ID.
//! 3. The server sends a challenge: [`NONCE_LEN`] random bytes.
//! 4. The agent signs [`SIGNATURE_CONTEXT`] `||` nonce with the node key (ECDSA P-256/P-384 in
//!    ASN.1 form, RSA PKCS#1 v1.5, or Ed25519) and answers with the signature, which the server
//!    verifies with the leaf's public key.
//!
//! The agent ID is `spiffe://<td>/sigil/agent/x509pop/<sha256 hex of the leaf DER>`, so
//! attesting again with the same certificate names the same agent (allowed, unlike join tokens;
//! a banned agent is still refused by the node API). Node selectors:
//! `x509pop:subject:cn:<CN>`, `x509pop:ca:fingerprint:<sha256 hex of the issuing CA cert>` and
//! `x509pop:san:dns:<name>` per DNS SAN.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use ring::rand::SecureRandom;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use sigil::{Selector, SelectorSet, TrustDomain};

use super::{AttestError, AttestedNode, Challenger, NodeAttestor, AGENT_PATH_PREFIX};

/// The attestation type (and agent ID path segment, and selector type).
pub const TYPE: &str = "x509pop";
/// Prefix of the signed message, so a node key's signature cannot be replayed elsewhere.
pub const SIGNATURE_CONTEXT: &[u8] = b"sigil-x509pop-v1";
/// Length of the server's nonce.
pub const NONCE_LEN: usize = 32;
/// Most certificates accepted in the payload chain.
pub const MAX_CHAIN_LEN: usize = 8;
/// Largest payload accepted.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// The message for a chain that does not verify against the configured CAs.
pub const UNTRUSTED: &str = "node certificate does not chain to a trusted x509pop CA";
/// The message for a challenge answer that does not verify.
pub const BAD_SIGNATURE: &str =
    "x509pop proof of possession failed: the challenge signature does not verify with the node certificate's public key";

/// Signature algorithms accepted for the challenge answer (all via ring).
static CHALLENGE_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::ED25519,
];

/// The message an agent signs for `nonce`.
pub fn signed_message(nonce: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_CONTEXT.len() + nonce.len());
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(nonce);
    m
}

/// Lowercase hex SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// One trusted CA: its webpki anchor and its DER (for the fingerprint selector).
struct Root {
    anchor: TrustAnchor<'static>,
    der: Vec<u8>,
}

/// Attests agents by proof of possession of a CA-issued node certificate key.
pub struct X509PopAttestor {
    trust_domain: TrustDomain,
    roots: Vec<Root>,
    now: fn() -> SystemTime,
}

impl std::fmt::Debug for X509PopAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509PopAttestor")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl X509PopAttestor {
    /// An attestor trusting the CA certificates `roots_der`, naming agents in `trust_domain`.
    pub fn new(trust_domain: TrustDomain, roots_der: Vec<Vec<u8>>) -> anyhow::Result<Self> {
        if roots_der.is_empty() {
            anyhow::bail!("the x509pop CA bundle holds no certificate");
        }
        let roots = roots_der
            .into_iter()
            .enumerate()
            .map(|(i, der)| {
                let anchor =
                    webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                        .map(|a| a.to_owned())
                        .map_err(|e| anyhow::anyhow!("x509pop CA certificate #{}: {e}", i + 1))?;
                Ok(Root { anchor, der })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            trust_domain,
            roots,
            now: SystemTime::now,
        })
    }

    /// An attestor trusting the CAs in the PEM file `path`.
    pub fn from_pem_file(trust_domain: TrustDomain, path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading x509pop CA bundle {}", path.display()))?;
        let roots = sigil::x509::parse_pem_certs(&text)
            .with_context(|| format!("x509pop CA bundle {}", path.display()))?;
        Self::new(trust_domain, roots)
            .with_context(|| format!("x509pop CA bundle {}", path.display()))
    }

    /// Verifies the chain and returns the DER of the CA that issued the leaf.
    fn verify_chain(&self, chain: &[Vec<u8>]) -> Result<Vec<u8>, AttestError> {
        let (leaf, intermediates) = chain.split_first().ok_or_else(|| {
            AttestError::InvalidPayload("the node certificate chain is empty".into())
        })?;
        let leaf_der = CertificateDer::from(leaf.as_slice());
        let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| {
            AttestError::InvalidPayload(format!("the node certificate is not usable: {e}"))
        })?;
        let inter: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let anchors: Vec<TrustAnchor<'_>> = self.roots.iter().map(|r| r.anchor.clone()).collect();
        let secs = (self.now)()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let path = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &inter,
                UnixTime::since_unix_epoch(secs),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| {
                use webpki::Error as E;
                let msg = match &e {
                    E::CertExpired { .. } => {
                        format!("{UNTRUSTED}: the node certificate has expired")
                    }
                    E::CertNotValidYet { .. } => {
                        format!("{UNTRUSTED}: the node certificate is not valid yet")
                    }
                    E::UnknownIssuer => UNTRUSTED.to_string(),
                    other => format!("{UNTRUSTED}: {other}"),
                };
                tracing::info!(error = %e, "x509pop node certificate refused");
                AttestError::Denied(msg)
            })?;
        if let Some(issuer) = path.intermediate_certificates().next() {
            return Ok(issuer.der().to_vec());
        }
        let anchor = path.anchor();
        self.roots
            .iter()
            .find(|r| {
                r.anchor.subject == anchor.subject
                    && r.anchor.subject_public_key_info == anchor.subject_public_key_info
            })
            .map(|r| r.der.clone())
            .ok_or_else(|| AttestError::Denied(UNTRUSTED.into()))
    }
}

/// Verifies `signature` over [`signed_message`]`(nonce)` with the leaf's public key.
fn verify_possession(leaf: &[u8], nonce: &[u8], signature: &[u8]) -> Result<(), AttestError> {
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| {
        AttestError::InvalidPayload(format!("the node certificate is not usable: {e}"))
    })?;
    let message = signed_message(nonce);
    if CHALLENGE_ALGS
        .iter()
        .any(|alg| ee.verify_signature(*alg, &message, signature).is_ok())
    {
        Ok(())
    } else {
        Err(AttestError::Denied(BAD_SIGNATURE.into()))
    }
}

/// Node selectors of a verified leaf issued by `issuer_der`.
fn selectors(leaf: &[u8], issuer_der: &[u8]) -> Result<SelectorSet, AttestError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        AttestError::InvalidPayload(format!("the node certificate does not parse: {e}"))
    })?;
    let mut values = Vec::new();
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            values.push(format!("subject:cn:{cn}"));
        }
    }
    values.push(format!("ca:fingerprint:{}", fingerprint(issuer_der)));
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                values.push(format!("san:dns:{dns}"));
            }
        }
    }
    let mut set = SelectorSet::new();
    for v in values {
        match Selector::new(TYPE, &v) {
            Ok(s) => {
                set.insert(s);
            }
            Err(e) => tracing::info!(error = %e, "x509pop: skipping an unusable selector value"),
        }
    }
    Ok(set)
}

#[async_trait]
impl NodeAttestor for X509PopAttestor {
    fn attestation_type(&self) -> &'static str {
        TYPE
    }

    async fn attest(
        &self,
        payload: &[u8],
        challenger: &mut dyn Challenger,
    ) -> Result<AttestedNode, AttestError> {
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(AttestError::InvalidPayload(format!(
                "the node certificate chain is larger than {MAX_PAYLOAD_LEN} bytes"
            )));
        }
        let chain = sigil::x509::split_der_concat(payload).map_err(|e| {
            AttestError::InvalidPayload(format!(
                "the node certificate chain is not concatenated DER: {e}"
            ))
        })?;
        if chain.len() > MAX_CHAIN_LEN {
            return Err(AttestError::InvalidPayload(format!(
                "the node certificate chain has more than {MAX_CHAIN_LEN} certificates"
            )));
        }
        let issuer = self.verify_chain(&chain)?;
        let leaf = chain.first().ok_or_else(|| {
            AttestError::InvalidPayload("the node certificate chain is empty".into())
        })?;

        let mut nonce = vec![0u8; NONCE_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| AttestError::Challenge("no randomness for the x509pop nonce".into()))?;
        let signature = challenger.challenge(nonce.clone()).await?;
        let fp = fingerprint(leaf);
        if let Err(e) = verify_possession(leaf, &nonce, &signature) {
            tracing::info!(leaf_fingerprint = %fp, "x509pop challenge signature refused");
            return Err(e);
        }
        let selectors = selectors(leaf, &issuer)?;
        let agent_id = self
            .trust_domain
            .id(&format!("{AGENT_PATH_PREFIX}{TYPE}/{fp}"))
            .map_err(|e| AttestError::InvalidPayload(format!("agent ID: {e}")))?;
        Ok(AttestedNode {
            agent_id,
            selectors,
            node_alias: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType, SigningKey,
    };

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    struct TestCa {
        der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Result<TestCa, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key)?;
        Ok(TestCa {
            der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        })
    }

    fn node_params(cn: &str) -> Result<CertificateParams, rcgen::Error> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = vec![SanType::DnsName(format!("{cn}.example.org").try_into()?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(p)
    }

    fn node(p: &CertificateParams, ca: &TestCa, key: &KeyPair) -> Result<Vec<u8>, rcgen::Error> {
        Ok(p.signed_by(key, &ca.issuer)?.der().to_vec())
    }

    /// Answers challenges by signing with `key` (as the agent does).
    struct Signer<'a>(&'a KeyPair, usize);

    #[async_trait]
    impl Challenger for Signer<'_> {
        async fn challenge(&mut self, c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
            assert_eq!(c.len(), NONCE_LEN);
            self.1 += 1;
            self.0
                .sign(&signed_message(&c))
                .map_err(|e| AttestError::Challenge(e.to_string()))
        }
    }

    fn attestor(roots: Vec<Vec<u8>>) -> X509PopAttestor {
        X509PopAttestor::new(TrustDomain::new("example.org").unwrap(), roots).unwrap()
    }

    fn denied(r: Result<AttestedNode, AttestError>) -> String {
        match r {
            Err(AttestError::Denied(m)) => m,
            other => panic!("expected Denied, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn trusted_chain_attests_with_selectors() -> TestResult {
        let ca = ca("node CA")?;
        let key = KeyPair::generate()?;
        let leaf = node(&node_params("node-1")?, &ca, &key)?;
        let a = attestor(vec![ca.der.clone()]);
        let mut signer = Signer(&key, 0);
        let n = a.attest(&leaf, &mut signer).await?;
        assert_eq!(signer.1, 1, "exactly one challenge");
        assert_eq!(
            n.agent_id.to_string(),
            format!(
                "spiffe://example.org/sigil/agent/x509pop/{}",
                fingerprint(&leaf)
            )
        );
        assert_eq!(fingerprint(&leaf).len(), 64);
        let got: Vec<String> = n.selectors.iter().map(|s| s.to_string()).collect();
        let want = [
            format!("x509pop:ca:fingerprint:{}", fingerprint(&ca.der)),
            "x509pop:san:dns:node-1.example.org".to_string(),
            "x509pop:subject:cn:node-1".to_string(),
        ];
        for w in &want {
            assert!(got.contains(w), "{w} missing from {got:?}");
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(n.node_alias.is_none());
        // Re-attestation with the same certificate names the same agent.
        let again = a.attest(&leaf, &mut Signer(&key, 0)).await?;
        assert_eq!(again.agent_id, n.agent_id);
        Ok(())
    }

    #[tokio::test]
    async fn intermediate_is_the_issuing_ca() -> TestResult {
        let root = ca("root")?;
        let ikey = KeyPair::generate()?;
        let mut ip = CertificateParams::default();
        ip.distinguished_name
            .push(DnType::CommonName, "intermediate");
        ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ip.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let inter_der = ip.signed_by(&ikey, &root.issuer)?.der().to_vec();
        let inter = TestCa {
            der: inter_der.clone(),
            issuer: Issuer::new(ip, ikey),
        };
        let key = KeyPair::generate()?;
        let leaf = node(&node_params("node-2")?, &inter, &key)?;
        let payload = [leaf.clone(), inter_der.clone()].concat();
        let n = attestor(vec![root.der.clone()])
            .attest(&payload, &mut Signer(&key, 0))
            .await?;
        let fp = format!("x509pop:ca:fingerprint:{}", fingerprint(&inter_der));
        assert!(
            n.selectors.iter().any(|s| s.to_string() == fp),
            "{:?}",
            n.selectors
        );
        // Without the intermediate the chain does not verify.
        let m = denied(
            attestor(vec![root.der.clone()])
                .attest(&leaf, &mut Signer(&key, 0))
                .await,
        );
        assert!(m.starts_with(UNTRUSTED), "{m}");
        Ok(())
    }

    #[tokio::test]
    async fn untrusted_ca_is_refused_before_any_challenge() -> TestResult {
        let ca1 = ca("trusted")?;
        let ca2 = ca("other")?;
        let key = KeyPair::generate()?;
        let leaf = node(&node_params("node-1")?, &ca2, &key)?;
        let mut signer = Signer(&key, 0);
        let m = denied(attestor(vec![ca1.der]).attest(&leaf, &mut signer).await);
        assert_eq!(m, UNTRUSTED);
        assert_eq!(signer.1, 0, "no challenge for an untrusted chain");
        Ok(())
    }

    #[tokio::test]
    async fn wrong_key_signature_is_refused() -> TestResult {
        let ca = ca("node CA")?;
        let key = KeyPair::generate()?;
        let other = KeyPair::generate()?;
        let leaf = node(&node_params("node-1")?, &ca, &key)?;
        let a = attestor(vec![ca.der]);
        let m = denied(a.attest(&leaf, &mut Signer(&other, 0)).await);
        assert_eq!(m, BAD_SIGNATURE);

        // A signature over the bare nonce (no context prefix) is refused too.
        struct Bare<'a>(&'a KeyPair);
        #[async_trait]
        impl Challenger for Bare<'_> {
            async fn challenge(&mut self, c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
                self.0
                    .sign(&c)
                    .map_err(|e| AttestError::Challenge(e.to_string()))
            }
        }
        let m = denied(a.attest(&leaf, &mut Bare(&key)).await);
        assert_eq!(m, BAD_SIGNATURE);
        Ok(())
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_certs_are_refused() -> TestResult {
        let ca = ca("node CA")?;
        let key = KeyPair::generate()?;
        let mut p = node_params("node-1")?;
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let leaf = node(&p, &ca, &key)?;
        let a = attestor(vec![ca.der.clone()]);
        let m = denied(a.attest(&leaf, &mut Signer(&key, 0)).await);
        assert!(m.starts_with(UNTRUSTED) && m.contains("expired"), "{m}");

        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
        let leaf = node(&p, &ca, &key)?;
        let m = denied(a.attest(&leaf, &mut Signer(&key, 0)).await);
        assert!(m.contains("not valid yet"), "{m}");
        Ok(())
    }

    #[tokio::test]
    async fn server_auth_only_cert_is_refused() -> TestResult {
        let ca = ca("node CA")?;
        let key = KeyPair::generate()?;
        let mut p = node_params("node-1")?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = node(&p, &ca, &key)?;
        let m = denied(
            attestor(vec![ca.der])
                .attest(&leaf, &mut Signer(&key, 0))
                .await,
        );
        assert!(m.starts_with(UNTRUSTED), "{m}");
        Ok(())
    }

    #[tokio::test]
    async fn rsa_and_p384_node_keys_work() -> TestResult {
        let ca = ca("node CA")?;
        for key in [
            crate::ca::KeyType::Rsa2048.generate()?,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?,
        ] {
            let leaf = node(&node_params("node-x")?, &ca, &key)?;
            let n = attestor(vec![ca.der.clone()])
                .attest(&leaf, &mut Signer(&key, 0))
                .await?;
            assert!(n.agent_id.path().ends_with(&fingerprint(&leaf)));
        }
        Ok(())
    }

    #[tokio::test]
    async fn malformed_payloads_are_invalid() -> TestResult {
        let ca = ca("node CA")?;
        let key = KeyPair::generate()?;
        let a = attestor(vec![ca.der]);
        for bad in [&b""[..], b"not der at all", &[0x30, 0x82, 0xff, 0xff, 0x00]] {
            assert!(
                matches!(
                    a.attest(bad, &mut Signer(&key, 0)).await,
                    Err(AttestError::InvalidPayload(_))
                ),
                "{bad:?}"
            );
        }
        assert!(X509PopAttestor::new(TrustDomain::new("example.org")?, vec![]).is_err());
        assert!(
            X509PopAttestor::new(TrustDomain::new("example.org")?, vec![b"junk".to_vec()]).is_err()
        );
        Ok(())
    }
}
