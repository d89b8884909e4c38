//! This process's identity and the trust bundle, each swappable while listeners and configs
//! stay: every new handshake reads the current value.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor, UnixTime};

use super::verify::{other_error, webpki_error};
use super::{provider, TlsError};
use crate::spiffe_id::SpiffeId;

/// Reads a lock even if a panicking writer poisoned it (the data is a plain `Arc` swap, so it is
/// always consistent).
fn read<T: Clone>(lock: &RwLock<T>) -> T {
    match lock.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn write<T>(lock: &RwLock<T>, value: T) {
    match lock.write() {
        Ok(mut g) => *g = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

/// This process's own X509-SVID and key, swappable at run time.
///
/// Used as [`ResolvesServerCert`] (the server's SVID) and [`ResolvesClientCert`] (an agent's
/// SVID). An empty store presents no certificate: a client can attest first and install its SVID
/// later with [`IdentityStore::set`]; a server with an empty store fails every handshake.
pub struct IdentityStore {
    current: RwLock<Option<Arc<Identity>>>,
    provider: Arc<CryptoProvider>,
}

/// One installed identity.
struct Identity {
    key: Arc<CertifiedKey>,
    spiffe_id: SpiffeId,
}

impl fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("IdentityStore")
            .field("spiffe_id", &self.spiffe_id().map(|id| id.to_string()))
            .finish_non_exhaustive()
    }
}

impl IdentityStore {
    /// A store without an identity (a client before attestation).
    pub fn empty() -> Self {
        Self {
            current: RwLock::new(None),
            provider: provider(),
        }
    }

    /// A store holding `chain_der` (leaf X509-SVID first, then intermediates) and the leaf's
    /// PKCS#8 DER private key.
    pub fn new(chain_der: Vec<Vec<u8>>, key_pkcs8_der: Vec<u8>) -> Result<Self, TlsError> {
        let store = Self::empty();
        store.set(chain_der, key_pkcs8_der)?;
        Ok(store)
    }

    /// Replaces the identity; connections made from now on present it, established ones keep
    /// the certificate they were made with. Nothing changes if the new material is invalid.
    pub fn set(&self, chain_der: Vec<Vec<u8>>, key_pkcs8_der: Vec<u8>) -> Result<(), TlsError> {
        let leaf = chain_der.first().ok_or(TlsError::EmptyChain)?;
        let spiffe_id = crate::x509::check_x509_svid(leaf).map_err(TlsError::InvalidSvid)?;
        let chain: Vec<CertificateDer<'static>> =
            chain_der.into_iter().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8_der));
        let certified =
            CertifiedKey::from_der(chain, key, &self.provider).map_err(TlsError::InvalidKey)?;
        write(
            &self.current,
            Some(Arc::new(Identity {
                key: Arc::new(certified),
                spiffe_id,
            })),
        );
        Ok(())
    }

    /// Removes the identity (e.g. after the agent was evicted).
    pub fn clear(&self) {
        write(&self.current, None);
    }

    /// The current certificate chain and key, if any.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        read(&self.current).map(|i| i.key.clone())
    }

    /// The SPIFFE ID of the current identity, if any.
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        read(&self.current).map(|i| i.spiffe_id.clone())
    }
}

impl ResolvesServerCert for IdentityStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for IdentityStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        read(&self.current).is_some()
    }
}

/// Trust-bundle roots, swappable at run time.
pub struct TrustStore {
    roots: RwLock<Arc<Roots>>,
}

struct Roots {
    der: Vec<Vec<u8>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustStore")
            .field("roots", &read(&self.roots).der.len())
            .finish()
    }
}

impl TrustStore {
    /// A store trusting `roots_der` (DER root certificates, at least one).
    pub fn new(roots_der: &[Vec<u8>]) -> Result<Self, TlsError> {
        Ok(Self {
            roots: RwLock::new(Arc::new(Self::parse(roots_der)?)),
        })
    }

    fn parse(roots_der: &[Vec<u8>]) -> Result<Roots, TlsError> {
        if roots_der.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let anchors = roots_der
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                    .map(|a| a.to_owned())
                    .map_err(|source| TlsError::InvalidRoot { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Roots {
            der: roots_der.to_vec(),
            anchors,
        })
    }

    /// Replaces the roots; handshakes from now on verify against them. Nothing changes if the
    /// new bundle is invalid.
    pub fn set(&self, roots_der: &[Vec<u8>]) -> Result<(), TlsError> {
        let roots = Self::parse(roots_der)?;
        write(&self.roots, Arc::new(roots));
        Ok(())
    }

    /// The current roots (DER).
    pub fn roots_der(&self) -> Vec<Vec<u8>> {
        read(&self.roots).der.clone()
    }

    /// Verifies `end_entity` + `intermediates` against the roots for `usage` at `now`, then the
    /// X509-SVID leaf rules; returns the SPIFFE ID.
    pub(super) fn verify(
        &self,
        provider: &CryptoProvider,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let roots = read(&self.roots);
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        ee.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &roots.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(webpki_error)?;
        crate::x509::check_x509_svid(end_entity).map_err(other_error)
    }
}
