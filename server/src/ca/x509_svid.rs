//! X509-SVID issuance (SPIFFE X509-SVID spec).
//!
//! A leaf has exactly one URI SAN (the SPIFFE ID) plus any DNS SANs; basicConstraints CA=false
//! (critical); keyUsage digitalSignature only (critical); extendedKeyUsage serverAuth +
//! clientAuth; a random positive 126-bit serial; NotBefore back-dated by [`BACKDATE`]; NotAfter
//! = now + TTL (at least [`sigil::ttl::MIN_X509_SVID_TTL`]), capped at the CA's own NotAfter;
//! SKI and AKI. Subject: the configured C/O, plus
//! CN = the first DNS name when there is one (SPIRE's convention).
//!
//! Only the public key of a CSR is used: its subject, SANs and extensions are ignored, since the
//! registration entry, not the requester, decides what an SVID says.

use std::time::Duration;

use rand::RngCore as _;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::DnsName;
use sigil::bundle::{EcCurve, JwkPublicKey};
use sigil::SpiffeId;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{CaError, Signer, BACKDATE};

/// Largest TTL accepted (beyond it the CA's NotAfter caps anyway; this guards arithmetic).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Longest CN (X.520 ub-common-name); longer first DNS names are left out of the subject.
const MAX_CN_LEN: usize = 64;

/// An issued X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    /// DER certificates: the leaf first, then intermediates (upstream mode); never the root.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's serial number, lowercase hex.
    pub serial_hex: String,
    /// The leaf's NotAfter, unix seconds.
    pub not_after: i64,
    /// The SPIFFE ID in the leaf's URI SAN.
    pub spiffe_id: SpiffeId,
}

/// The public key to certify (the SubjectPublicKeyInfo's BIT STRING) and its algorithm.
struct LeafKey {
    alg: &'static SignatureAlgorithm,
    key: Vec<u8>,
}

impl PublicKeyData for LeafKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

impl LeafKey {
    /// Accepts EC P-256/P-384 (uncompressed points), RSA 2048-8192 bits and Ed25519.
    fn from_spki_der(spki_der: &[u8]) -> Result<Self, CaError> {
        let bad = |s: String| CaError::InvalidPublicKey(s);
        let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| bad(format!("not a DER SubjectPublicKeyInfo: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the SubjectPublicKeyInfo".into()));
        }
        // One classification of key types for the whole project: the JWK model validates
        // curves, point sizes and RSA structure.
        let alg: &'static SignatureAlgorithm = match JwkPublicKey::from_spki(&spki)
            .map_err(|e| bad(format!("{e} (use EC P-256/P-384, RSA or Ed25519)")))?
        {
            JwkPublicKey::Ec {
                curve: EcCurve::P256,
                ..
            } => &rcgen::PKCS_ECDSA_P256_SHA256,
            JwkPublicKey::Ec {
                curve: EcCurve::P384,
                ..
            } => &rcgen::PKCS_ECDSA_P384_SHA384,
            JwkPublicKey::Rsa { n, .. } => {
                let bits = n.len() * 8;
                if !(2048..=8192).contains(&bits) {
                    return Err(bad(format!("RSA key of {bits} bits (need 2048 to 8192)")));
                }
                &rcgen::PKCS_RSA_SHA256
            }
            JwkPublicKey::Ed25519 { .. } => &rcgen::PKCS_ED25519,
        };
        let key = spki.subject_public_key.data.as_ref();
        Ok(LeafKey {
            alg,
            key: key.to_vec(),
        })
    }
}

/// 16 random bytes as a positive serial number with a fixed length (bit 127 clear, bit 126 set).
pub(crate) fn random_serial() -> Vec<u8> {
    let mut b = vec![0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[0] = (b[0] & 0x7f) | 0x40;
    b
}

fn dns_san(name: &str) -> Result<SanType, CaError> {
    let bad = || CaError::InvalidDnsName(name.chars().take(256).collect());
    let rest = name.strip_prefix("*.").unwrap_or(name);
    DnsName::try_from(rest).map_err(|_| bad())?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| bad())?))
}

impl Signer {
    /// Issues an X509-SVID for the public key of a PKCS#10 CSR, after verifying the CSR's
    /// self-signature. The CSR's subject, SANs and extensions are ignored.
    pub fn sign_x509_svid_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, CaError> {
        self.check_id(id)?;
        let (rest, csr) = X509CertificationRequest::from_der(csr_der)
            .map_err(|e| CaError::InvalidCsr(format!("not a DER PKCS#10 request: {e}")))?;
        if !rest.is_empty() {
            return Err(CaError::InvalidCsr(format!(
                "{} trailing bytes after the request",
                rest.len()
            )));
        }
        csr.verify_signature()
            .map_err(|e| CaError::InvalidCsr(format!("self-signature does not verify: {e}")))?;
        self.sign_x509_svid(
            csr.certification_request_info.subject_pki.raw,
            id,
            dns_names,
            ttl,
        )
    }

    /// Issues an X509-SVID for a public key given as DER SubjectPublicKeyInfo.
    pub fn sign_x509_svid(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, CaError> {
        self.check_id(id)?;
        let key = LeafKey::from_spki_der(spki_der)?;
        let ttl = ttl.unwrap_or(self.default_x509_svid_ttl);
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(CaError::InvalidTtl(format!(
                "X509-SVID TTL must be between 1 second and 100 years, got {}s",
                ttl.as_secs()
            )));
        }
        // Entries stored before the TTL floor existed keep their value; they get the floor.
        let ttl = ttl.max(sigil::ttl::MIN_X509_SVID_TTL);
        let now = OffsetDateTime::now_utc();
        let not_after = (now + ttl).min(self.ca_not_after);
        if not_after <= now {
            return Err(CaError::CaExpired(self.ca_not_after.to_string()));
        }

        let mut sans = Vec::with_capacity(1 + dns_names.len());
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e| CaError::Signing(format!("SPIFFE ID as URI SAN: {e}")))?;
        sans.push(SanType::URI(uri));
        let mut seen: Vec<&str> = Vec::with_capacity(dns_names.len());
        for name in dns_names {
            if !seen.contains(&name.as_str()) {
                seen.push(name);
                sans.push(dns_san(name)?);
            }
        }
        let mut dn = self.svid_dn.clone();
        if let Some(first) = dns_names.first().filter(|n| n.len() <= MAX_CN_LEN) {
            dn.push(DnType::CommonName, first.as_str());
        }
        let serial = random_serial();

        let mut p = CertificateParams::default();
        p.not_before = now - BACKDATE;
        p.not_after = not_after;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.subject_alt_names = sans;
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;

        let mut chain_der = Vec::with_capacity(1 + self.chain_tail.len());
        chain_der.push(cert.der().to_vec());
        chain_der.extend(self.chain_tail.iter().cloned());
        let serial_hex = hex::encode(&serial);
        tracing::debug!(spiffe_id = %id, serial = %serial_hex, not_after = %not_after, "issued X509-SVID");
        Ok(IssuedSvid {
            chain_der,
            serial_hex,
            not_after: not_after.unix_timestamp(),
            spiffe_id: id.clone(),
        })
    }
}
