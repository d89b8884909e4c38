//! The certificate authority of a trust domain: its authorities, their rotation, X509-SVID and
//! JWT-SVID issuing.
//!
//! - [`authority`]: the active / prepared / old X.509 authorities and JWT keys, their journal
//!   (`authorities.json`) and transitions (prepare, activate, taint, revoke, expiry).
//! - [`rotation`]: the task that drives the schedule and publishes each change.
//! - `keys`: key types, generation, crash-safe 0600 key files.
//! - `self_signed`: self-signed roots (the first in `root.key` / `root.crt`).
//! - `upstream`: an intermediate CA signed by an upstream PKI, loaded from files.
//! - `x509_svid`: X509-SVID issuance from a SubjectPublicKeyInfo or a PKCS#10 CSR.
//! - `jwt`: ES256 JWT-SVID signing keys and minting.
//! - [`expiry`]: the active authority's remaining life: warnings, readiness.
//!
//! [`Ca`] is the handle the server shares: each signing call reads the current [`Signer`] (the
//! active authorities and the bundle) once, and every transition swaps in a new one.
//! [`Ca::load_or_create`] ends with a self-test: it issues a probe X509-SVID and verifies it
//! against the trust bundle with `rustls-webpki`, and mints and validates a probe JWT-SVID, so a
//! CA that starts is a CA whose output verifies.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{DistinguishedName, DnType, DnValue, Issuer, KeyPair};
use sigil::bundle::Bundle;
use sigil::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

pub mod authority;
pub mod expiry;
mod jwt;
mod keys;
pub mod rotation;
mod self_signed;
mod upstream;
mod x509_svid;

use authority::Authorities;
pub use authority::{AuthorityInfo, Changes, Kind, Slot};

pub use jwt::MintedJwtSvid;
pub use keys::KeyType;
pub use x509_svid::IssuedSvid;

/// File name of the self-signed root key inside [`CaConfig::dir`].
pub const ROOT_KEY_FILE: &str = "root.key";
/// File name of the self-signed root certificate inside [`CaConfig::dir`].
pub const ROOT_CERT_FILE: &str = "root.crt";
/// File name of the JWT-SVID signing key inside [`CaConfig::dir`].
pub const JWT_KEY_FILE: &str = "jwt.key";

/// Default lifetime of an authority (SPIRE's default `ca_ttl`).
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);

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
    /// Program and arguments run at ½ of the intermediate's life to replace the files with a
    /// new intermediate (they are read again from ⅚ of its life). None: an operator does it.
    pub command: Option<Vec<String>>,
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
    /// Lifetime of each self-signed X.509 authority and JWT key; a new one is prepared at ½
    /// of it and activated at ⅚.
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
    /// Defaults: P-256, authorities 24 h (SPIRE's default), X509-SVIDs 1 h, JWT-SVIDs 5 min,
    /// self-signed, O=Sigil.
    pub fn new(trust_domain: TrustDomain, dir: impl Into<PathBuf>) -> Self {
        Self {
            trust_domain,
            dir: dir.into(),
            key_type: KeyType::default(),
            ca_ttl: DEFAULT_CA_TTL,
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
    /// The authorities journal is unreadable or inconsistent.
    #[error("CA authorities journal {} is unusable: {reason}", path.display())]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// No authority of that kind has that ID.
    #[error("no {kind} authority has ID {id:?}; `localauthority {} show` lists them", if *kind == "JWT" { "jwt" } else { "x509" })]
    UnknownAuthority {
        /// `X.509` or `JWT`.
        kind: &'static str,
        /// The ID given.
        id: String,
    },
    /// The operation does not apply to that authority in its current slot.
    #[error("{kind} authority {id}: {reason}")]
    AuthorityNotAllowed {
        /// `X.509` or `JWT`.
        kind: &'static str,
        /// The ID given.
        id: String,
        /// Why, and what to do.
        reason: String,
    },
    /// Activation asked for without a prepared authority.
    #[error(
        "there is no prepared {0} authority to activate; run `localauthority ... prepare` first"
    )]
    NoPreparedAuthority(&'static str),
    /// An X.509 operation that upstream mode leaves to the upstream files.
    #[error("the X.509 authority comes from the upstream CA files in upstream mode: replace them (or configure ca.upstream.command) and the server activates the new intermediate from ⅚ of the current one's life")]
    UpstreamManaged,
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

/// What one signing operation sees: the active X.509 authority and JWT key, and the bundle of
/// every published authority. Immutable; [`Ca`] swaps in a new one at each transition, and a
/// signing call reads the current one once.
pub struct Signer {
    trust_domain: TrustDomain,
    /// Issuer DN, AKI and signing key of the CA certificate that signs SVIDs.
    issuer: Arc<Issuer<'static, KeyPair>>,
    /// Subject key ID (hex) of the signing certificate.
    x509_id: String,
    /// DER of the CA certificate that signs SVIDs.
    signing_cert_der: Vec<u8>,
    /// Certificates following the leaf in an issued chain (empty for a self-signed root).
    chain_tail: Vec<Vec<u8>>,
    /// The trust bundle roots (every published authority, or the upstream roots).
    authorities: Vec<Vec<u8>>,
    /// No X509-SVID outlives this (the earliest NotAfter in the active authority's chain).
    ca_not_after: OffsetDateTime,
    /// NotBefore of the signing certificate: with `ca_not_after`, the CA's lifetime.
    ca_not_before: OffsetDateTime,
    /// Subject base for SVIDs.
    svid_dn: DistinguishedName,
    default_x509_svid_ttl: Duration,
    default_jwt_svid_ttl: Duration,
    jwt: Arc<jwt::JwtKey>,
    /// No JWT-SVID outlives this (the active JWT key's NotAfter), Unix seconds.
    jwt_not_after: i64,
    /// Every published JWT key.
    jwt_authorities: Vec<sigil::bundle::JwtAuthority>,
    /// Tainted X.509 authorities (subject key IDs) and JWT keys (kids) still published.
    tainted: (Vec<String>, Vec<String>),
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are deliberately left out.
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain)
            .field("x509_id", &self.x509_id)
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
}

impl Signer {
    /// The signing view of `auth`: its active authorities and its bundle.
    fn from_authorities(config: &CaConfig, auth: &Authorities) -> Result<Signer, CaError> {
        let x = auth.active_x509();
        let j = auth.active_jwt();
        let time = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map_err(|e| CaError::Signing(format!("time out of range: {e}")))
        };
        Ok(Signer {
            trust_domain: config.trust_domain.clone(),
            issuer: x.issuer.clone(),
            x509_id: x.id.clone(),
            signing_cert_der: x.cert_der.clone(),
            chain_tail: x.chain_tail.clone(),
            authorities: auth.bundle_roots(),
            ca_not_after: time(x.not_after)?,
            ca_not_before: time(x.not_before)?,
            svid_dn: config.base_dn()?,
            default_x509_svid_ttl: config.default_x509_svid_ttl,
            default_jwt_svid_ttl: config.default_jwt_svid_ttl,
            jwt: j.key.clone(),
            jwt_not_after: j.not_after,
            jwt_authorities: auth.bundle_jwt(),
            tainted: auth.tainted(),
        })
    }

    /// Checks that a new upstream intermediate's SVIDs verify against `roots` before it is used.
    pub(crate) fn verify_material(
        config: &CaConfig,
        x: &authority::X509Authority,
        roots: &[Vec<u8>],
        up: Option<&UpstreamConfig>,
    ) -> Result<(), CaError> {
        let signer = Signer {
            trust_domain: config.trust_domain.clone(),
            issuer: x.issuer.clone(),
            x509_id: x.id.clone(),
            signing_cert_der: x.cert_der.clone(),
            chain_tail: x.chain_tail.clone(),
            authorities: roots.to_vec(),
            ca_not_after: OffsetDateTime::from_unix_timestamp(x.not_after)
                .map_err(|e| CaError::Signing(format!("time out of range: {e}")))?,
            ca_not_before: OffsetDateTime::from_unix_timestamp(x.not_before)
                .map_err(|e| CaError::Signing(format!("time out of range: {e}")))?,
            svid_dn: config.base_dn()?,
            default_x509_svid_ttl: config.default_x509_svid_ttl,
            default_jwt_svid_ttl: config.default_jwt_svid_ttl,
            jwt: Arc::new(jwt::JwtKey::from_key_pair(
                &KeyPair::generate().map_err(|e| CaError::KeyGeneration(e.to_string()))?,
                Path::new("self-test key"),
            )?),
            jwt_not_after: i64::MAX,
            jwt_authorities: Vec::new(),
            tainted: (Vec::new(), Vec::new()),
        };
        let paths = up.map(|u| (u.cert_chain_path.clone(), u.bundle_path.clone()));
        signer.self_test_x509(paths.as_ref())
    }

    /// Issues and verifies a probe X509-SVID and JWT-SVID.
    fn self_test(&self, upstream_paths: Option<&(PathBuf, PathBuf)>) -> Result<(), CaError> {
        self.self_test_x509(upstream_paths)?;
        let id = self
            .trust_domain
            .id("/sigil/ca-self-test")
            .map_err(|e| CaError::SelfTest(e.to_string()))?;
        let minted = self.mint_jwt_svid(&id, &["sigil-self-test".to_string()], None)?;
        sigil::jwt::validate_jwt_svid(&minted.token, "sigil-self-test", &self.bundle())
            .map_err(|e| CaError::SelfTest(format!("probe JWT-SVID does not validate: {e}")))?;
        Ok(())
    }

    fn self_test_x509(&self, upstream_paths: Option<&(PathBuf, PathBuf)>) -> Result<(), CaError> {
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
        Ok(())
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust bundle roots (DER): every published self-signed authority, or the upstream
    /// bundle.
    pub fn x509_authorities(&self) -> &[Vec<u8>] {
        &self.authorities
    }

    /// The DER of the CA certificate that signs SVIDs (the active root, or the intermediate).
    pub fn signing_cert_der(&self) -> &[u8] {
        &self.signing_cert_der
    }

    /// Subject key ID (hex) of the active X.509 authority.
    pub fn x509_authority_id(&self) -> &str {
        &self.x509_id
    }

    /// The bundle: X.509 roots and JWT keys (sequence 0: the datastore numbers it).
    pub fn bundle(&self) -> Bundle {
        Bundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities: self.authorities.clone(),
            jwt_authorities: self.jwt_authorities.clone(),
            sequence_number: 0,
            refresh_hint: None,
        }
    }

    /// Tainted X.509 authorities (subject key IDs, hex) and JWT keys (kids) still published.
    pub fn tainted(&self) -> (&[String], &[String]) {
        (&self.tainted.0, &self.tainted.1)
    }

    /// NotAfter of the active X.509 authority (unix seconds); no X509-SVID outlives it.
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

    /// The `kid` of the active JWT-SVID signing key.
    pub fn jwt_kid(&self) -> &str {
        self.jwt.kid()
    }

    /// NotAfter of the active JWT key (unix seconds); no JWT-SVID outlives it.
    pub fn jwt_not_after(&self) -> i64 {
        self.jwt_not_after
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

/// The CA of this server: its authorities (see [`authority`]) and the current [`Signer`],
/// swapped at every transition. Signing calls read the current signer once; transitions are
/// serialised by a mutex and written to the journal before the swap.
pub struct Ca {
    config: CaConfig,
    current: RwLock<Arc<Signer>>,
    authorities: Mutex<Authorities>,
    /// Woken after an operator's transition, so the rotation task publishes it.
    changed: tokio::sync::Notify,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("current", &*self.current())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA from `config.dir` (and the upstream files), creating the self-signed root
    /// and the JWT key on first start, makes every transition already due, and self-tests.
    /// Every unusable file yields an error naming it.
    pub fn load_or_create(config: &CaConfig) -> Result<Ca, CaError> {
        Self::load_or_create_at(config, sigil::clock::now_unix())
    }

    /// [`Ca::load_or_create`] with the transitions due at `now` (Unix seconds).
    pub fn load_or_create_at(config: &CaConfig, now: i64) -> Result<Ca, CaError> {
        config.validate()?;
        keys::ensure_private_dir(&config.dir)?;
        let mut auth = Authorities::load_or_create(config, now)?;
        // A server down across a transition catches up before it signs anything.
        auth.tick(config, now)?;
        let signer = Signer::from_authorities(config, &auth)?;
        let paths = config
            .upstream
            .as_ref()
            .map(|u| (u.cert_chain_path.clone(), u.bundle_path.clone()));
        signer.self_test(paths.as_ref())?;
        tracing::info!(
            trust_domain = %signer.trust_domain,
            mode = if config.upstream.is_some() { "upstream" } else { "self-signed" },
            x509_authority = %signer.x509_id,
            ca_not_after = signer.ca_not_after(),
            jwt_kid = signer.jwt.kid(),
            "CA ready"
        );
        Ok(Ca {
            config: config.clone(),
            current: RwLock::new(Arc::new(signer)),
            authorities: Mutex::new(auth),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// The signer to use now.
    pub fn current(&self) -> Arc<Signer> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Authorities> {
        self.authorities
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the authorities and swaps in the new signer if it changed anything.
    fn transition(
        &self,
        f: impl FnOnce(&CaConfig, &mut Authorities) -> Result<Changes, CaError>,
    ) -> Result<Changes, CaError> {
        let mut auth = self.lock();
        let result = f(&self.config, &mut auth);
        // Even a failed multi-step tick may have committed a first step.
        let signer = Signer::from_authorities(&self.config, &auth)?;
        let changed = {
            let cur = self.current();
            cur.x509_id != signer.x509_id
                || cur.authorities != signer.authorities
                || cur.jwt_authorities != signer.jwt_authorities
                || cur.jwt.kid() != signer.jwt.kid()
                || cur.tainted != signer.tainted
        };
        if changed {
            match self.current.write() {
                Ok(mut g) => *g = Arc::new(signer),
                Err(poisoned) => *poisoned.into_inner() = Arc::new(signer),
            }
        }
        result
    }

    /// Makes every transition due at `now` (Unix seconds).
    pub fn tick(&self, now: i64) -> Result<Changes, CaError> {
        self.transition(|c, a| a.tick(c, now))
    }

    /// The next time (Unix seconds) a transition is due.
    pub fn next_due(&self, now: i64) -> Option<i64> {
        self.lock().next_due(now)
    }

    /// Whether the upstream hook should run now.
    pub fn upstream_hook_due(&self, now: i64) -> bool {
        self.lock().upstream_hook_due(now)
    }

    /// Records that the upstream hook ran for the active intermediate.
    pub fn upstream_hook_ran(&self) {
        let mut a = self.lock();
        a.upstream_hook_ran_for = Some(a.active_x509().id.clone());
    }

    /// The authorities of `kind`, active first.
    pub fn list(&self, kind: Kind) -> Vec<AuthorityInfo> {
        self.lock().list(kind)
    }

    /// Operator: a new prepared authority now (replacing a prepared one).
    pub fn prepare(&self, kind: Kind, now: i64) -> Result<Changes, CaError> {
        let r = self.transition(|c, a| a.prepare(c, kind, now));
        self.changed.notify_one();
        r
    }

    /// Operator: activates the prepared authority (`id`, if given, must be it).
    pub fn activate(&self, kind: Kind, id: Option<&str>) -> Result<Changes, CaError> {
        let r = self.transition(|_, a| a.activate(kind, id));
        self.changed.notify_one();
        r
    }

    /// Operator: marks old authority `id` tainted.
    pub fn taint(&self, kind: Kind, id: &str) -> Result<Changes, CaError> {
        let r = self.transition(|_, a| a.taint(kind, id));
        self.changed.notify_one();
        r
    }

    /// Operator: removes tainted, non-active authority `id` from the bundle.
    pub fn revoke(&self, kind: Kind, id: &str) -> Result<Changes, CaError> {
        let r = self.transition(|_, a| a.revoke(kind, id));
        self.changed.notify_one();
        r
    }

    /// Completes after an operator's transition (for the rotation task).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The configuration the CA was loaded with.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// The trust bundle roots (DER), as of now.
    pub fn x509_authorities(&self) -> Vec<Vec<u8>> {
        self.current().authorities.clone()
    }

    /// The bundle, as of now.
    pub fn bundle(&self) -> Bundle {
        self.current().bundle()
    }

    /// NotAfter of the active X.509 authority (unix seconds).
    pub fn ca_not_after(&self) -> i64 {
        self.current().ca_not_after()
    }

    /// NotBefore of the active X.509 authority (unix seconds).
    pub fn ca_not_before(&self) -> i64 {
        self.current().ca_not_before()
    }

    /// The `kid` of the active JWT key.
    pub fn jwt_kid(&self) -> String {
        self.current().jwt_kid().to_string()
    }

    /// Issues an X509-SVID from the active authority for a CSR's public key.
    pub fn sign_x509_svid_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, CaError> {
        self.current()
            .sign_x509_svid_csr(csr_der, id, dns_names, ttl)
    }

    /// Issues an X509-SVID from the active authority for a DER SubjectPublicKeyInfo.
    pub fn sign_x509_svid(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, CaError> {
        self.current().sign_x509_svid(spki_der, id, dns_names, ttl)
    }

    /// Mints a JWT-SVID with the active JWT key.
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<MintedJwtSvid, CaError> {
        self.current().mint_jwt_svid(id, audience, ttl)
    }
}

/// Checks that a self-signed root carries exactly this trust domain's ID as URI SAN.
pub(crate) fn check_trust_domain_uri(
    config: &CaConfig,
    der: &[u8],
    path: &Path,
) -> Result<(), CaError> {
    let expected = config.trust_domain.id_string();
    match sigil::x509::spiffe_id_of(der) {
        Ok(id) if id.to_string() == expected => Ok(()),
        Ok(id) => Err(CaError::TrustDomainMismatch {
            path: path.to_path_buf(),
            found: id.to_string(),
            expected,
        }),
        Err(e) => Err(CaError::BadCertFile {
            path: path.to_path_buf(),
            reason: format!("no trust domain URI SAN: {e}"),
        }),
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
    check_ca_cert_at(cert, key, cert_path, key_path, true)
}

/// [`check_ca_cert`], checking validity now only when `valid_now` is set (a journaled old
/// authority may have expired: it is then removed, not refused).
pub(crate) fn check_ca_cert_at(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    key: &KeyPair,
    cert_path: &Path,
    key_path: &Path,
    valid_now: bool,
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
    if valid_now && !v.is_valid() {
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
