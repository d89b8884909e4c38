//! The server's own X509-SVID, `spiffe://<td>/sigil/server`, presented on the node API.
//!
//! At start-up the server generates an ECDSA P-256 key in memory (it is never written to disk
//! or logged) and has its own CA sign an X509-SVID for it with the default X509-SVID TTL. At
//! half of the remaining lifetime a fresh key and SVID replace it in the [`IdentityStore`]:
//! new connections get the new one, established connections keep theirs (the CA's rotation task
//! also rotates it when a new X.509 authority becomes active) — but never sooner than
//! [`MIN_ROTATION_INTERVAL`] after the last one: near the CA's expiry every SVID is capped at
//! it, and rotating would not gain anything. A failed rotation is retried (every
//! [`MIN_ROTATION_INTERVAL`] to [`RETRY_MAX`]) and logged at error level on the 1st, 2nd, 4th,
//! 8th... consecutive failure (an expired CA fails every time).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use sigil::tls::{IdentityStore, TlsError};
use sigil::SpiffeId;
use tokio::sync::watch;

use crate::ca::{Ca, CaError};
use crate::metrics::Metrics;

/// Longest wait before retrying a failed rotation.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Shortest time between two rotations (or attempts).
pub const MIN_ROTATION_INTERVAL: Duration = Duration::from_secs(20);

/// Why the server SVID could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Key generation failed.
    #[error("generating the server's node-API key failed: {0}")]
    Key(String),
    /// The CA refused.
    #[error("issuing the server's node-API SVID failed: {0}")]
    Ca(#[from] CaError),
    /// rustls refused the key or certificate.
    #[error("installing the server's node-API SVID failed: {0}")]
    Tls(#[from] TlsError),
}

/// The server SVID and its rotation.
pub struct ServerIdentity {
    ca: Arc<Ca>,
    id: SpiffeId,
    store: Arc<IdentityStore>,
    not_after: AtomicI64,
    metrics: Metrics,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

/// A freshly issued server SVID and its key.
struct Issued {
    chain_der: Vec<Vec<u8>>,
    key_pkcs8_der: Vec<u8>,
    serial_hex: String,
    not_after: i64,
}

/// Generates a fresh key and has the CA certify it as `id`.
fn issue(ca: &Ca, id: &SpiffeId) -> Result<Issued, IdentityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let svid = ca.sign_x509_svid(&spki, id, &[], None)?;
    Ok(Issued {
        chain_der: svid.chain_der,
        key_pkcs8_der: key.serialize_der(),
        serial_hex: svid.serial_hex,
        not_after: svid.not_after,
    })
}

/// Half of the time left until `not_after`, at least [`MIN_ROTATION_INTERVAL`].
pub fn rotation_delay(now: i64, not_after: i64) -> Duration {
    Duration::from_secs(((not_after - now) / 2).max(0) as u64).max(MIN_ROTATION_INTERVAL)
}

use sigil::clock::now_unix;

impl ServerIdentity {
    /// Issues the first server SVID.
    pub fn issue(ca: Arc<Ca>, metrics: Metrics) -> Result<Self, IdentityError> {
        let id = crate::api::server_id(ca.trust_domain());
        let svid = issue(&ca, &id)?;
        metrics.x509_svids_signed.inc();
        let store = Arc::new(IdentityStore::new(svid.chain_der, svid.key_pkcs8_der)?);
        tracing::info!(
            spiffe_id = %id,
            serial = %svid.serial_hex,
            not_after = svid.not_after,
            "server SVID issued"
        );
        Ok(Self {
            ca,
            id,
            store,
            not_after: AtomicI64::new(svid.not_after),
            metrics,
        })
    }

    /// The store the node API's TLS configuration resolves the certificate from.
    pub fn store(&self) -> Arc<IdentityStore> {
        self.store.clone()
    }

    /// The server's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// NotAfter of the current SVID, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::SeqCst)
    }

    /// Replaces the SVID (and key) now.
    pub fn rotate(&self) -> Result<(), IdentityError> {
        let svid = issue(&self.ca, &self.id)?;
        self.metrics.x509_svids_signed.inc();
        self.store.set(svid.chain_der, svid.key_pkcs8_der)?;
        self.not_after.store(svid.not_after, Ordering::SeqCst);
        tracing::info!(
            spiffe_id = %self.id,
            serial = %svid.serial_hex,
            not_after = svid.not_after,
            "server SVID rotated"
        );
        Ok(())
    }

    /// Rotates at half of each SVID's remaining lifetime until `shutdown` turns true.
    pub async fn run_rotation(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut delay = rotation_delay(now_unix(), self.not_after());
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            delay = match self.rotate() {
                Ok(()) => {
                    failures = 0;
                    rotation_delay(now_unix(), self.not_after())
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let retry = rotation_delay(now_unix(), self.not_after()).min(RETRY_MAX);
                    if failures.is_power_of_two() {
                        tracing::error!(
                            error = %e,
                            not_after = self.not_after(),
                            failures,
                            retry_in_secs = retry.as_secs(),
                            "server SVID rotation failed; agents cannot connect once it expires"
                        );
                    } else {
                        tracing::debug!(error = %e, failures, "server SVID rotation retry failed");
                    }
                    retry
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaConfig;
    use sigil::TrustDomain;

    #[test]
    fn delay_is_half_the_remaining_lifetime() {
        assert_eq!(rotation_delay(1000, 4600), Duration::from_secs(1800));
        // Capped by an expiring CA, or already expired: not again within the floor.
        assert_eq!(rotation_delay(1000, 1001), MIN_ROTATION_INTERVAL);
        assert_eq!(rotation_delay(1000, 1030), MIN_ROTATION_INTERVAL);
        assert_eq!(rotation_delay(1000, 900), MIN_ROTATION_INTERVAL);
        // The shortest default TTL (1 min) still rotates at half of it.
        assert_eq!(rotation_delay(1000, 1060), Duration::from_secs(30));
    }

    #[test]
    fn issues_and_rotates_a_verifiable_server_svid() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let ca = Arc::new(Ca::load_or_create(&CaConfig::new(td, dir.path().join("ca"))).unwrap());
        let identity = ServerIdentity::issue(ca.clone(), Metrics::new()).unwrap();
        let leaf = |i: &ServerIdentity| {
            let k = i.store().current().unwrap();
            k.cert.iter().map(|c| c.to_vec()).collect::<Vec<_>>()
        };
        let first = leaf(&identity);
        let id = sigil::x509::verify_x509_svid(
            &first,
            &ca.x509_authorities(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/sigil/server");
        assert!(identity.not_after() > now_unix() + 3000);
        identity.rotate().unwrap();
        let second = leaf(&identity);
        assert_ne!(first, second);
        assert_eq!(identity.store().spiffe_id(), Some(id));
        // The key changed too.
        let spki = |der: &[u8]| {
            let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
            c.public_key().raw.to_vec()
        };
        assert_ne!(spki(&first[0]), spki(&second[0]));
    }
}
