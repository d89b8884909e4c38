//! The agent's own state on disk: its SVID and key, and the last trust bundle it received.
//!
//! A restart re-uses the stored SVID instead of attesting again (a join token is single-use).
//! The chain and the key live in ONE file (`agent_svid.pem`, mode 0600) written atomically, so a
//! crash can never leave a key that does not match its certificate. Anything unreadable is an
//! error naming the file and the way out (delete it to attest again), never a panic.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil::{SpiffeId, TrustDomain};

/// File holding the agent SVID chain and its private key.
pub const SVID_FILE: &str = "agent_svid.pem";
/// File holding the last trust bundle received from the server.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// Path prefix of agent SPIFFE IDs.
pub const AGENT_PATH_PREFIX: &str = "/sigil/agent/";

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Reading, writing or creating a file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A stored file is not usable.
    #[error("{path} is not a usable agent SVID file: {source}; delete it to attest again")]
    Invalid {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: SvidFileError,
    },
    /// The stored trust bundle is not usable.
    #[error("{path} is not a usable trust bundle (the last one the server sent): {source}; delete it, and the agent authenticates the server with --trust-bundle and receives the current bundle again")]
    InvalidBundle {
        /// Which file.
        path: PathBuf,
        /// What the parser reported.
        #[source]
        source: sigil::x509::X509Error,
    },
}

/// What is wrong with the stored agent SVID file.
#[derive(Debug, thiserror::Error)]
pub enum SvidFileError {
    /// A certificate block is not valid PEM.
    #[error("bad certificate PEM: {0}")]
    CertificatePem(#[source] sigil::x509::PemError),
    /// No private key block could be read.
    #[error("no private key: {0}")]
    NoKey(#[source] sigil::x509::PemError),
    /// The private key is not PKCS#8.
    #[error("the key is not PKCS#8")]
    KeyNotPkcs8,
    /// Chain and key are not a usable agent identity.
    #[error("{0}")]
    Identity(#[source] IdentityError),
}

/// Why a chain and key are not a usable agent identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No certificate at all.
    #[error("the chain is empty")]
    EmptyChain,
    /// The leaf is not an X509-SVID.
    #[error("{0}")]
    NotSvid(#[source] sigil::x509::X509Error),
    /// The leaf's ID is not an agent ID of the trust domain.
    #[error("{id} is not an agent ID of trust domain {td}")]
    NotAgentId {
        /// The leaf's SPIFFE ID.
        id: SpiffeId,
        /// The agent's trust domain.
        td: TrustDomain,
    },
    /// The leaf does not parse as a certificate.
    #[error("leaf certificate: {0}")]
    Leaf(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The key is not a usable PKCS#8 key.
    #[error("private key: {0}")]
    Key(#[source] rcgen::Error),
    /// The key is not the leaf's.
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
}

/// The agent's identity: its SVID chain and private key.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The agent's SPIFFE ID (from the leaf).
    pub spiffe_id: SpiffeId,
    /// DER chain, leaf first.
    pub chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER private key.
    pub key_pkcs8_der: Vec<u8>,
    /// Leaf serial, lowercase hex.
    pub serial_hex: String,
    /// Leaf NotBefore, Unix seconds.
    pub not_before: i64,
    /// Leaf NotAfter, Unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for AgentIdentity {
    // The key is deliberately absent: identities end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl AgentIdentity {
    /// Builds an identity from a DER chain and key, checking that the leaf is an agent X509-SVID
    /// of `td` and that the key is the leaf's.
    pub fn new(
        td: &TrustDomain,
        chain_der: Vec<Vec<u8>>,
        key_pkcs8_der: Vec<u8>,
    ) -> Result<Self, IdentityError> {
        let leaf = chain_der.first().ok_or(IdentityError::EmptyChain)?;
        let spiffe_id = sigil::x509::check_x509_svid(leaf).map_err(IdentityError::NotSvid)?;
        if !spiffe_id.is_member_of(td) || !spiffe_id.path().starts_with(AGENT_PATH_PREFIX) {
            return Err(IdentityError::NotAgentId {
                id: spiffe_id,
                td: td.clone(),
            });
        }
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(IdentityError::Leaf)?;
        let key = rcgen::KeyPair::try_from(key_pkcs8_der.as_slice()).map_err(IdentityError::Key)?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != cert.public_key().raw {
            return Err(IdentityError::KeyMismatch);
        }
        Ok(Self {
            spiffe_id,
            serial_hex: hex_lower(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            chain_der,
            key_pkcs8_der,
        })
    }
}

/// The agent's data directory.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

impl Storage {
    /// Opens (creating with mode 0700) the data directory.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let io = |op, source| StorageError::Io {
            op,
            path: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("creating data directory", e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("restricting data directory", e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the SVID file.
    pub fn svid_path(&self) -> PathBuf {
        self.dir.join(SVID_FILE)
    }

    /// Stores the identity (atomically, 0600).
    pub fn save_identity(&self, id: &AgentIdentity) -> Result<(), StorageError> {
        let mut pem = sigil::x509::to_pem_certs(&id.chain_der);
        pem.push_str(&pem_block("PRIVATE KEY", &id.key_pkcs8_der));
        let path = self.svid_path();
        sigil::fs::write_secret(&path, pem.as_bytes()).map_err(|source| StorageError::Io {
            op: "writing",
            path,
            source,
        })
    }

    /// The stored identity, `None` if there is none. Expiry is the caller's decision.
    pub fn load_identity(&self, td: &TrustDomain) -> Result<Option<AgentIdentity>, StorageError> {
        let path = self.svid_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StorageError::Io {
                    op: "reading",
                    path,
                    source,
                })
            }
        };
        let invalid = |source: SvidFileError| StorageError::Invalid {
            path: path.clone(),
            source,
        };
        let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&bytes)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(SvidFileError::CertificatePem(e.into())))?;
        let key = match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
            Ok(_) => return Err(invalid(SvidFileError::KeyNotPkcs8)),
            Err(e) => return Err(invalid(SvidFileError::NoKey(e.into()))),
        };
        AgentIdentity::new(td, chain, key)
            .map(Some)
            .map_err(|e| invalid(SvidFileError::Identity(e)))
    }

    /// Removes the stored identity (after eviction, before attesting again).
    pub fn remove_identity(&self) -> Result<(), StorageError> {
        let path = self.svid_path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StorageError::Io {
                op: "removing",
                path,
                source,
            }),
        }
    }

    /// Stores the trust bundle roots as PEM (atomically).
    pub fn save_bundle(&self, roots_der: &[Vec<u8>]) -> Result<(), StorageError> {
        let path = self.dir.join(BUNDLE_FILE);
        sigil::fs::write_atomic(
            &path,
            sigil::x509::to_pem_certs(roots_der).as_bytes(),
            0o644,
        )
        .map_err(|source| StorageError::Io {
            op: "writing",
            path,
            source,
        })
    }

    /// The stored trust bundle roots, `None` if absent.
    pub fn load_bundle(&self) -> Result<Option<Vec<Vec<u8>>>, StorageError> {
        let path = self.dir.join(BUNDLE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => sigil::x509::parse_pem_certs(&text)
                .map(Some)
                .map_err(|source| StorageError::InvalidBundle { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StorageError::Io {
                op: "reading",
                path,
                source,
            }),
        }
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A CA and an agent SVID made with rcgen (the server's CA lives in another crate).
    pub(crate) fn identity(td: &TrustDomain, path: &str) -> (AgentIdentity, rcgen::KeyPair) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{td}{path}").as_str().try_into().unwrap(),
        )];
        leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
        leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let chain = vec![cert.der().to_vec()];
        let _ = ca_cert;
        (
            AgentIdentity::new(td, chain, key.serialize_der()).unwrap(),
            key,
        )
    }

    #[test]
    fn identity_round_trips_with_0600_key() {
        let td = TrustDomain::new("example.org").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(&dir.path().join("agent")).unwrap();
        assert!(store.load_identity(&td).unwrap().is_none());
        let (id, _) = identity(&td, "/sigil/agent/join_token/abc");
        store.save_identity(&id).unwrap();
        let mode = std::fs::metadata(store.svid_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = store.load_identity(&td).unwrap().unwrap();
        assert_eq!(loaded, id);
        assert_eq!(
            loaded.spiffe_id.to_string(),
            "spiffe://example.org/sigil/agent/join_token/abc"
        );
        assert!(
            !format!("{loaded:?}").contains("key_pkcs8"),
            "Debug hides the key"
        );
        store.remove_identity().unwrap();
        assert!(store.load_identity(&td).unwrap().is_none());
    }

    #[test]
    fn rejects_bad_identities() {
        let td = TrustDomain::new("example.org").unwrap();
        let (id, _) = identity(&td, "/sigil/agent/join_token/abc");
        let (_, other_key) = identity(&td, "/sigil/agent/join_token/xyz");
        let err =
            AgentIdentity::new(&td, id.chain_der.clone(), other_key.serialize_der()).unwrap_err();
        assert!(matches!(err, IdentityError::KeyMismatch), "{err}");
        assert!(err.to_string().contains("does not belong"), "{err}");
        let (workload, _) = {
            let td2 = TrustDomain::new("example.org").unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://example.org/web".try_into().unwrap(),
            )];
            p.is_ca = rcgen::IsCa::ExplicitNoCa;
            p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            let c = p.self_signed(&key).unwrap();
            (
                AgentIdentity::new(&td2, vec![c.der().to_vec()], key.serialize_der()),
                (),
            )
        };
        assert!(workload
            .unwrap_err()
            .to_string()
            .contains("not an agent ID"));
        let other_td = TrustDomain::new("other.org").unwrap();
        assert!(
            AgentIdentity::new(&other_td, id.chain_der.clone(), id.key_pkcs8_der.clone()).is_err()
        );
        assert!(AgentIdentity::new(&td, vec![], id.key_pkcs8_der.clone()).is_err());
    }

    #[test]
    fn truncated_or_garbage_files_are_errors_naming_the_file() {
        let td = TrustDomain::new("example.org").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(dir.path()).unwrap();
        let (id, _) = identity(&td, "/sigil/agent/join_token/abc");
        store.save_identity(&id).unwrap();
        let full = std::fs::read(store.svid_path()).unwrap();
        for cut in [0, 10, full.len() / 3, full.len() - 40] {
            std::fs::write(store.svid_path(), &full[..cut]).unwrap();
            let err = store.load_identity(&td).unwrap_err().to_string();
            assert!(
                err.contains(SVID_FILE) && err.contains("delete it"),
                "cut {cut}: {err}"
            );
        }
        std::fs::write(store.svid_path(), b"\x00\xff garbage").unwrap();
        assert!(store.load_identity(&td).is_err());
        // Cut inside the certificate: a readable PEM message, not rustls' byte arrays.
        std::fs::write(store.svid_path(), &full[..full.len() / 3]).unwrap();
        let err = store.load_identity(&td).unwrap_err().to_string();
        assert!(
            err.contains("no \"-----END CERTIFICATE-----\" line"),
            "{err}"
        );
        assert!(!err.contains("[67, 69"), "{err}");
        // The cause is kept, and a chain printed for users stays readable.
        let err = store.load_identity(&td).unwrap_err();
        assert!(matches!(
            err,
            StorageError::Invalid {
                source: SvidFileError::CertificatePem(_),
                ..
            }
        ));
        assert!(!sigil::text::error_chain(&err).contains("[67, 69"));
        // A key that is not the leaf's: the identity error is the cause.
        let (other, _) = identity(&td, "/sigil/agent/join_token/other");
        let mut pem = sigil::x509::to_pem_certs(&id.chain_der);
        pem.push_str(&pem_block("PRIVATE KEY", &other.key_pkcs8_der));
        std::fs::write(store.svid_path(), pem).unwrap();
        let err = store.load_identity(&td).unwrap_err();
        let cause = std::error::Error::source(&err)
            .and_then(std::error::Error::source)
            .and_then(|c| c.downcast_ref::<IdentityError>());
        assert!(matches!(cause, Some(IdentityError::KeyMismatch)), "{err}");
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn a_truncated_bundle_is_called_a_trust_bundle() {
        let td = TrustDomain::new("example.org").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(dir.path()).unwrap();
        let (id, _) = identity(&td, "/sigil/agent/x");
        store.save_bundle(&id.chain_der).unwrap();
        let path = dir.path().join(BUNDLE_FILE);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() / 2]).unwrap();
        let err = store.load_bundle().unwrap_err().to_string();
        assert!(err.contains(BUNDLE_FILE), "{err}");
        assert!(err.contains("is not a usable trust bundle"), "{err}");
        assert!(!err.contains("SVID file"), "{err}");
        assert!(err.contains("--trust-bundle"), "{err}");
        assert!(!err.contains("[67, 69"), "{err}");
        let err = store.load_bundle().unwrap_err();
        assert!(std::error::Error::source(&err)
            .is_some_and(|c| c.downcast_ref::<sigil::x509::X509Error>().is_some()));
    }

    #[test]
    fn bundle_round_trip() {
        let td = TrustDomain::new("example.org").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(dir.path()).unwrap();
        assert!(store.load_bundle().unwrap().is_none());
        let (id, _) = identity(&td, "/sigil/agent/x");
        store.save_bundle(&id.chain_der).unwrap();
        assert_eq!(store.load_bundle().unwrap().unwrap(), id.chain_der);
    }
}
