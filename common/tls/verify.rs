//! SPIFFE peer verification: the chain against the [`TrustStore`] with `rustls-webpki`, then
//! the X509-SVID leaf rules; the server also checks the expected SPIFFE ID.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{provider, TrustStore};
use crate::spiffe_id::SpiffeId;

/// A certificate error rustls reports as `Other`, keeping `e` as the cause.
pub(super) fn other_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Maps a path-validation error to the closest rustls certificate error (so alerts are right).
pub(super) fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } | E::InvalidCertValidity => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => return other_error(other),
    };
    rustls::Error::InvalidCertificate(ce)
}

fn verify_tls12(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn verify_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// The server's verifier of client certificates: optional, but a presented certificate must be
/// an X509-SVID that chains to the [`TrustStore`] for client authentication.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    /// A verifier against `trust`.
    pub fn new(trust: Arc<TrustStore>) -> Self {
        Self {
            trust,
            provider: provider(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Attestation happens before the agent holds an SVID; handlers that need one check it.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Clients hold a single SVID; hints would only leak the bundle's subjects.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust.verify(
            &self.provider,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How a client authenticates the server.
#[derive(Debug, Clone)]
pub enum ServerVerification {
    /// The server's chain must verify against `trust` (server-auth usage; DNS names are ignored)
    /// and its X509-SVID must carry exactly `expected_id` (e.g. `spiffe://<td>/sigil/server`).
    Spiffe {
        /// The trust bundle.
        trust: Arc<TrustStore>,
        /// The SPIFFE ID the server must present.
        expected_id: SpiffeId,
    },
    /// Accepts any server certificate. For demos only: anyone on the network path can
    /// impersonate the server. Callers must warn loudly when they use it.
    InsecureBootstrap,
}

/// The client's verifier of the server certificate.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    verification: ServerVerification,
    provider: Arc<CryptoProvider>,
}

/// The server presented another SPIFFE ID than the one expected.
#[derive(Debug, thiserror::Error)]
#[error("server presented SPIFFE ID {found}, expected {expected}; check --trust-domain and that the address points at a sigil-server of that trust domain")]
pub struct UnexpectedServerId {
    /// What the server presented.
    pub found: String,
    /// What was expected.
    pub expected: String,
}

impl SpiffeServerVerifier {
    /// A verifier applying `verification`.
    pub fn new(verification: ServerVerification) -> Self {
        Self {
            verification,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.verification {
            ServerVerification::InsecureBootstrap => Ok(ServerCertVerified::assertion()),
            ServerVerification::Spiffe { trust, expected_id } => {
                let id = trust.verify(
                    &self.provider,
                    end_entity,
                    intermediates,
                    now,
                    webpki::KeyUsage::server_auth(),
                )?;
                if &id != expected_id {
                    return Err(other_error(UnexpectedServerId {
                        found: id.to_string(),
                        expected: expected_id.to_string(),
                    }));
                }
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
