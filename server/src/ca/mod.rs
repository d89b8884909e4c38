//! The certificate authority of a trust domain: its keys, X509-SVID and JWT-SVID issuing.
//!
//! - `keys`: key types, generation, crash-safe 0600 key files.
//! - `self_signed`: the self-signed root (`root.key` / `root.crt` in [`CaConfig::dir`]).
//! - `upstream`: an intermediate CA signed by an upstream PKI, loaded from files.
//! - `x509_svid`: X509-SVID issuance from a SubjectPublicKeyInfo or a PKCS#10 CSR.
//! - `jwt`: the ES256 JWT-SVID signing key (`jwt.key`) and minting.
//! - [`expiry`]: the CA's remaining life: warnings from ⅙ of it left, readiness after it.
//!
//! [`Ca::load_or_create`] ends with a self-test: it issues a probe X509-SVID and verifies it
//! against the trust bundle with `rustls-webpki`, and mints and validates a probe JWT-SVID, so a
//! CA that starts is a CA whose output verifies.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{DistinguishedName, DnType, DnValue, Issuer, KeyPair};
use sigil::bundle::Bundle;
use sigil::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

pub mod expiry;
mod jwt;
mod keys;
mod self_signed;
mod upstream;
mod x509_svid;

pub use jwt::MintedJwtSvid;
pub use keys::KeyType;
pub use x509_svid::IssuedSvid;

/// File name of the self-signed root key inside [`CaConfig::dir`].
pub const ROOT_KEY_FILE: &str = "root.key";
/// File name of the self-signed root certificate inside [`CaConfig::dir`].
pub const ROOT_CERT_FILE: &str = "root.crt";
/// File name of the JWT-SVID signing key inside [`CaConfig::dir`].
pub const JWT_KEY_FILE: &str = "jwt.key";

/// How far NotBefore is back-dated to tolerate clock skew between machines.
pub const BACKDATE: Duration = Duration::from_secs(30);

/// Where an upstream (intermediate) CA's material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// PEM: the intermediate CA certificate this server signs with, then any further
    /// intermediates up to (not necessarily including) the upstream root.
    pub cert_chain_path: PathBuf,
    /// PEM PKCS#8: the private key of the first certificate in `cert_chain_path`.
    pub key_path: PathBuf,
    /// PEM: the upstream root(s); they become the trust bundle.
    pub bundle_path: PathBuf,
}

/// CA settings, filled in by the server's configuration code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// The trust domain the CA issues for.
    pub trust_domain: TrustDomain,
    /// Where the CA's files live (created 0700), e.g. `<data_dir>/ca`.
    pub dir: PathBuf,
    /// Key type of a newly generated self-signed root.
    pub key_type: KeyType,
    /// Lifetime of a newly generated self-signed root.
    pub ca_ttl: Duration,
    /// X509-SVID lifetime when the caller gives none.
    pub default_x509_svid_ttl: Duration,
    /// JWT-SVID lifetime when the caller gives none.
    pub default_jwt_svid_ttl: Duration,
    /// Sign with an upstream-issued intermediate instead of a self-signed root.
    pub upstream: Option<UpstreamConfig>,
    /// Subject country (`C`, two letters) of the root and of SVIDs, if any.
    pub country: Option<String>,
    /// Subject organization (`O`) of the root and of SVIDs.
    pub organization: String,
}

impl CaConfig {
    /// Defaults: P-256, root 1 year, X509-SVIDs 1 h, JWT-SVIDs 5 min, self-signed, O=Sigil.
    pub fn new(trust_domain: TrustDomain, dir: impl Into<PathBuf>) -> Self {
        Self {
            trust_domain,
            dir: dir.into(),
            key_type: KeyType::default(),
            ca_ttl: Duration::from_secs(365 * 24 * 3600),
            default_x509_svid_ttl: Duration::from_secs(3600),
            default_jwt_svid_ttl: Duration::from_secs(300),
            upstream: None,
            country: None,
            organization: "Sigil".to_string(),
        }
    }

    fn validate(&self) -> Result<(), CaError> {
        let bad = |s: &str| Err(CaError::InvalidConfig(s.to_string()));
        if self.ca_ttl.is_zero()
            || self.default_x509_svid_ttl.is_zero()
            || self.default_jwt_svid_ttl.is_zero()
        {
            return bad("ca_ttl, default_x509_svid_ttl and default_jwt_svid_ttl must be positive");
        }
        sigil::ttl::check_x509_svid_ttl(self.default_x509_svid_ttl)
            .map_err(|e| CaError::InvalidConfig(format!("default_x509_svid_ttl: {e}")))?;
        sigil::ttl::check_jwt_svid_ttl(self.default_jwt_svid_ttl)
            .map_err(|e| CaError::InvalidConfig(format!("default_jwt_svid_ttl: {e}")))?;
        if self.ca_ttl < sigil::ttl::MIN_X509_SVID_TTL {
            return bad("ca_ttl must be at least 1m (the shortest X509-SVID TTL)");
        }
        if self.ca_ttl > Duration::from_secs(100 * 365 * 24 * 3600) {
            return bad("ca_ttl must be at most 100 years");
        }
        if let Some(c) = &self.country {
            if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return bad("country must be a two-letter upper-case ISO 3166 code such as \"US\"");
            }
        }
        if self.organization.is_empty() || self.organization.len() > 64 {
            return bad("organization must be 1 to 64 characters");
        }
        Ok(())
    }

    /// The subject DN shared by the root and the SVIDs (C if set, then O).
    pub(crate) fn base_dn(&self) -> Result<DistinguishedName, CaError> {
        let mut dn = DistinguishedName::new();
        if let Some(c) = &self.country {
            let c = rcgen::string::PrintableString::try_from(c.as_str())
                .map_err(|e| CaError::InvalidConfig(format!("country: {e}")))?;
            dn.push(DnType::CountryName, DnValue::PrintableString(c));
        }
        dn.push(DnType::OrganizationName, self.organization.as_str());
        Ok(dn)
    }
}

/// Everything that can go wrong in the CA; each message says what and, where it helps, how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A configuration value is out of range.
    #[error("invalid CA configuration: {0}")]
    InvalidConfig(String),
    /// Unknown key type string.
    #[error("unknown CA key type {0:?}; allowed values: ec-p256, ec-p384, rsa-2048")]
    InvalidKeyType(String),
    /// A file operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but is unusable.
    #[error("CA key file {} is unusable: {reason}", path.display())]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A certificate file exists but is unusable.
    #[error("CA certificate file {} is unusable: {reason}", path.display())]
    BadCertFile {
        /// The certificate (or bundle) file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("CA key {} does not match certificate {}; restore the matching pair (or, for the self-signed root, delete both to create a new CA)", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The root certificate exists without its key.
    #[error("{} exists but its key {} is missing; restore the key from backup, or delete {} to create a new CA (workloads will need the new bundle)", cert.display(), key.display(), cert.display())]
    MissingKey {
        /// The certificate file.
        cert: PathBuf,
        /// The missing key file.
        key: PathBuf,
    },
    /// The certificate cannot sign SVIDs.
    #[error("certificate {} cannot be used as a CA: {reason}", path.display())]
    NotACa {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The CA certificate was made for another trust domain.
    #[error("CA certificate {} is for {found}, but the server is configured for trust domain {expected}", path.display())]
    TrustDomainMismatch {
        /// The certificate file.
        path: PathBuf,
        /// The URI SAN found.
        found: String,
        /// The configured trust domain ID.
        expected: String,
    },
    /// The CA certificate is outside its validity period.
    #[error("CA certificate {} is not valid now (valid {not_before} to {not_after}); replace it (for the self-signed root: delete root.crt and root.key to create a new CA)", path.display())]
    CertNotValidNow {
        /// The certificate file.
        path: PathBuf,
        /// Its NotBefore.
        not_before: String,
        /// Its NotAfter.
        not_after: String,
    },
    /// The upstream intermediate does not chain to the configured bundle.
    #[error("upstream CA certificate {} does not chain to a root in {}: {reason}", cert.display(), bundle.display())]
    UpstreamChain {
        /// The intermediate chain file.
        cert: PathBuf,
        /// The bundle file.
        bundle: PathBuf,
        /// What path validation reported.
        reason: String,
    },
    /// Generating a key failed.
    #[error("key generation failed: {0}")]
    KeyGeneration(String),
    /// The CA certificate has expired while the server was running.
    #[error("the CA certificate expired at {0}; no SVIDs can be issued until the CA is renewed")]
    CaExpired(String),
    /// The CSR could not be parsed or its signature does not verify.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    /// The public key to certify is malformed or of an unsupported type.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(String),
    /// The SPIFFE ID is outside the CA's trust domain.
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}; this CA only issues for its own trust domain")]
    WrongTrustDomain {
        /// The requested ID.
        id: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// An SVID was requested for the trust domain ID itself.
    #[error("SPIFFE ID {0} has no path; SVIDs are issued only for IDs with a path")]
    IdWithoutPath(String),
    /// A DNS SAN is not a valid DNS name.
    #[error(
        "invalid DNS name {0:?}: use letters, digits, '-' and '.', optionally a leading \"*.\""
    )]
    InvalidDnsName(String),
    /// A TTL of zero or beyond what a certificate can express.
    #[error("invalid TTL: {0}")]
    InvalidTtl(String),
    /// Empty audience list or an empty audience.
    #[error("invalid JWT-SVID audience: {0}")]
    InvalidAudience(String),
    /// The signing library failed.
    #[error("signing failed: {0}")]
    Signing(String),
    /// The start-up self-test failed (the CA's output would not verify).
    #[error("CA self-test failed: {0}")]
    SelfTest(String),
}

impl CaError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        CaError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A ready-to-sign CA: the signing key and issuer name are parsed once, at load.
pub struct Ca {
    trust_domain: TrustDomain,
    /// Issuer DN, AKI and signing key of the CA certificate that signs SVIDs.
    issuer: Issuer<'static, KeyPair>,
    /// DER of the CA certificate that signs SVIDs.
    signing_cert_der: Vec<u8>,
    /// Certificates following the leaf in an issued chain (empty for a self-signed root).
    chain_tail: Vec<Vec<u8>>,
    /// The trust bundle roots.
    authorities: Vec<Vec<u8>>,
    /// No SVID outlives this (the earliest NotAfter in the CA's own chain).
    ca_not_after: OffsetDateTime,
    /// NotBefore of the signing certificate: with `ca_not_after`, the CA's lifetime.
    ca_not_before: OffsetDateTime,
    /// Subject base for SVIDs.
    svid_dn: DistinguishedName,
    default_x509_svid_ttl: Duration,
    default_jwt_svid_ttl: Duration,
    jwt: jwt::JwtKey,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are deliberately left out.
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("ca_not_after", &self.ca_not_after)
            .field("authorities", &self.authorities.len())
            .field("chain_tail", &self.chain_tail.len())
            .field("jwt_kid", &self.jwt.kid())
            .finish_non_exhaustive()
    }
}

/// What the self-signed or upstream loader hands over.
pub(crate) struct SigningMaterial {
    pub key: KeyPair,
    pub cert_der: Vec<u8>,
    pub chain_tail: Vec<Vec<u8>>,
    pub authorities: Vec<Vec<u8>>,
    pub not_after: OffsetDateTime,
    /// The file whose chain the self-test checks (for error messages).
    pub upstream_paths: Option<(PathBuf, PathBuf)>,
}

impl Ca {
    /// Loads the CA from `config.dir` (and the upstream files), creating the self-signed root
    /// and the JWT key on first start. Every unusable file yields an error naming it.
    pub fn load_or_create(config: &CaConfig) -> Result<Ca, CaError> {
        config.validate()?;
        keys::ensure_private_dir(&config.dir)?;
        let material = match &config.upstream {
            None => self_signed::load_or_create(config)?,
            Some(up) => upstream::load(config, up)?,
        };
        let jwt = jwt::JwtKey::load_or_create(&config.dir.join(JWT_KEY_FILE))?;
        let SigningMaterial {
            key,
            cert_der,
            chain_tail,
            authorities,
            not_after,
            upstream_paths,
        } = material;
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key).map_err(|e| {
            CaError::NotACa {
                path: upstream_paths
                    .as_ref()
                    .map_or_else(|| config.dir.join(ROOT_CERT_FILE), |p| p.0.clone()),
                reason: format!("its subject name cannot be used as an issuer name: {e}"),
            }
        })?;
        let ca_not_before = x509_parser::parse_x509_certificate(&cert_der)
            .map(|(_, c)| c.validity().not_before.to_datetime())
            .map_err(|e| CaError::NotACa {
                path: upstream_paths
                    .as_ref()
                    .map_or_else(|| config.dir.join(ROOT_CERT_FILE), |p| p.0.clone()),
                reason: format!("unparsable certificate: {e}"),
            })?;
        let ca = Ca {
            trust_domain: config.trust_domain.clone(),
            issuer,
            signing_cert_der: cert_der,
            chain_tail,
            authorities,
            ca_not_after: not_after,
            ca_not_before,
            svid_dn: config.base_dn()?,
            default_x509_svid_ttl: config.default_x509_svid_ttl,
            default_jwt_svid_ttl: config.default_jwt_svid_ttl,
            jwt,
        };
        ca.self_test(upstream_paths.as_ref())?;
        tracing::info!(
            trust_domain = %ca.trust_domain,
            mode = if config.upstream.is_some() { "upstream" } else { "self-signed" },
            ca_not_after = ca.ca_not_after(),
            jwt_kid = ca.jwt.kid(),
            "CA ready"
        );
        Ok(ca)
    }

    /// Issues and verifies a probe X509-SVID and JWT-SVID.
    fn self_test(&self, upstream_paths: Option<&(PathBuf, PathBuf)>) -> Result<(), CaError> {
        let probe_key = KeyPair::generate().map_err(|e| CaError::KeyGeneration(e.to_string()))?;
        let id = self
            .trust_domain
            .id("/sigil/ca-self-test")
            .map_err(|e| CaError::SelfTest(e.to_string()))?;
        let svid = self.sign_x509_svid(&probe_key.subject_public_key_info_der(), &id, &[], None)?;
        if let Err(e) =
            sigil::x509::verify_x509_svid(&svid.chain_der, &self.authorities, SystemTime::now())
        {
            return Err(match upstream_paths {
                Some((cert, bundle)) => CaError::UpstreamChain {
                    cert: cert.clone(),
                    bundle: bundle.clone(),
                    reason: e.to_string(),
                },
                None => CaError::SelfTest(format!("probe X509-SVID does not verify: {e}")),
            });
        }
        let minted = self.mint_jwt_svid(&id, &["sigil-self-test".to_string()], None)?;
        sigil::jwt::validate_jwt_svid(&minted.token, "sigil-self-test", &self.bundle())
            .map_err(|e| CaError::SelfTest(format!("probe JWT-SVID does not validate: {e}")))?;
        Ok(())
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust bundle roots (DER): the self-signed root, or the upstream bundle.
    pub fn x509_authorities(&self) -> &[Vec<u8>] {
        &self.authorities
    }

    /// The DER of the CA certificate that signs SVIDs (the root, or the intermediate).
    pub fn signing_cert_der(&self) -> &[u8] {
        &self.signing_cert_der
    }

    /// The bundle of this CA: X.509 roots and the JWT key (sequence 0: the datastore numbers it).
    pub fn bundle(&self) -> Bundle {
        Bundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities: self.authorities.clone(),
            jwt_authorities: vec![self.jwt.authority()],
            sequence_number: 0,
            refresh_hint: None,
        }
    }

    /// NotAfter of the CA (unix seconds); no SVID outlives it.
    pub fn ca_not_after(&self) -> i64 {
        self.ca_not_after.unix_timestamp()
    }

    /// NotBefore of the signing certificate (unix seconds).
    pub fn ca_not_before(&self) -> i64 {
        self.ca_not_before.unix_timestamp()
    }

    /// X509-SVID lifetime used when none is requested.
    pub fn default_x509_svid_ttl(&self) -> Duration {
        self.default_x509_svid_ttl
    }

    /// JWT-SVID lifetime used when none is requested.
    pub fn default_jwt_svid_ttl(&self) -> Duration {
        self.default_jwt_svid_ttl
    }

    /// The `kid` of the JWT-SVID signing key (stable across restarts).
    pub fn jwt_kid(&self) -> &str {
        self.jwt.kid()
    }

    /// Checks that `id` may receive an SVID from this CA.
    pub(crate) fn check_id(&self, id: &SpiffeId) -> Result<(), CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::WrongTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        if id.path().is_empty() {
            return Err(CaError::IdWithoutPath(id.to_string()));
        }
        Ok(())
    }
}

/// SubjectPublicKeyInfo DER of a key pair (rcgen encodes it).
pub(crate) trait SpkiDer {
    fn subject_public_key_info_der(&self) -> Vec<u8>;
}

impl SpkiDer for KeyPair {
    fn subject_public_key_info_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(self)
    }
}

/// Parses one certificate, with `path` in the error.
pub(crate) fn parse_cert<'a>(
    der: &'a [u8],
    path: &Path,
) -> Result<x509_parser::certificate::X509Certificate<'a>, CaError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CaError::BadCertFile {
            path: path.to_path_buf(),
            reason: "trailing bytes after the certificate".into(),
        }),
        Err(e) => Err(CaError::BadCertFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Checks a CA certificate: CA=true, may sign certificates, valid now, and `key` is its key.
pub(crate) fn check_ca_cert(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    key: &KeyPair,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CaError> {
    let not_ca = |reason: &str| CaError::NotACa {
        path: cert_path.to_path_buf(),
        reason: reason.to_string(),
    };
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(not_ca("basicConstraints cA is not true")),
        Err(e) => return Err(not_ca(&format!("bad basicConstraints: {e}"))),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err(not_ca("keyUsage does not include keyCertSign"))
        }
        Ok(_) => {}
        Err(e) => return Err(not_ca(&format!("bad keyUsage: {e}"))),
    }
    let spki = cert.public_key();
    // Compare the key itself (EC point / RSAPublicKey), not the AlgorithmIdentifier encoding.
    if spki.subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(key) {
        return Err(CaError::KeyMismatch {
            key: key_path.to_path_buf(),
            cert: cert_path.to_path_buf(),
        });
    }
    let v = cert.validity();
    if !v.is_valid() {
        return Err(CaError::CertNotValidNow {
            path: cert_path.to_path_buf(),
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
