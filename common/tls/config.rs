//! The rustls configurations: TLS 1.3 only, ALPN `h2`, no session resumption.

use std::sync::Arc;

use super::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use super::{provider, IdentityStore, ServerVerification, TlsError, TrustStore, ALPN_H2};

/// The server side: presents `identity`, accepts (optional) client SVIDs that chain to `trust`.
/// TLS 1.3 only, ALPN `h2`, no session resumption.
pub fn server_config(
    identity: Arc<IdentityStore>,
    trust: Arc<TrustStore>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(trust)))
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Every connection presents and verifies a certificate against the current bundle.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client side: authenticates the server per `verification` and presents `identity` when it
/// holds one (`None`, or an empty store: no client certificate, e.g. for attestation).
/// TLS 1.3 only, ALPN `h2`, no session resumption.
pub fn client_config(
    verification: ServerVerification,
    identity: Option<Arc<IdentityStore>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(verification)));
    let mut config = match identity {
        Some(identity) => builder.with_client_cert_resolver(identity),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
