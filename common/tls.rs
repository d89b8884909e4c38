//! SPIFFE mutual TLS for the node API (rustls 0.23, `ring` provider), shared by server and agent.
//!
//! SPIFFE authenticates peers by the SPIFFE ID in the URI SAN of an X509-SVID, not by DNS names:
//! both verifiers here validate the chain against a trust bundle with `rustls-webpki` and then
//! apply the X509-SVID leaf rules ([`crate::x509::check_x509_svid`]).
//!
//! - [`IdentityStore`]: this process's own SVID (chain + key). [`IdentityStore::set`] rotates it
//!   without restarting listeners or rebuilding configs: every new handshake reads the current
//!   one. It serves as the server's certificate resolver and the client's certificate resolver.
//! - [`TrustStore`]: the trust-bundle roots, also swappable with [`TrustStore::set`].
//! - [`server_config`]: client certificates are *optional* (agents attest before they hold an
//!   SVID); a presented one must chain to the [`TrustStore`] for client auth and be a valid
//!   X509-SVID, otherwise the handshake fails. Handlers read it with [`peer_svid`].
//! - [`client_config`]: the server's chain must verify against the [`TrustStore`] and carry the
//!   expected SPIFFE ID ([`ServerVerification::Spiffe`]); [`ServerVerification::InsecureBootstrap`]
//!   accepts any server certificate, for demos only.
//! - [`incoming`]: a TCP listener turned into a stream of finished TLS connections for
//!   `tonic::transport::Server::serve_with_incoming_shutdown`. Handshakes run in their own tasks
//!   with a timeout, so a slow or broken client never blocks others or the accept loop.
//! - [`connect`] / [`connect_lazy`]: a tonic [`Channel`] over TLS with a [`rustls::ClientConfig`].
//!
//! Only TLS 1.3 is offered: it encrypts the client certificate, so an agent's SPIFFE ID is not
//! visible on the wire. Session resumption is disabled on both sides, so every connection
//! presents and verifies a certificate against the *current* trust bundle.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::spiffe_id::SpiffeId;
use crate::x509::X509Error;

/// The ALPN protocol both sides negotiate (gRPC runs over HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";
/// How long [`incoming`] waits for a client to finish its TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes run at once in [`incoming`]; further connections wait in the
/// kernel's accept backlog.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 1024;
/// TCP + TLS connect timeout of [`connect`] / [`connect_lazy`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Client HTTP/2 ping interval on node API channels.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a client waits for a ping's answer before it closes the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why TLS material or a connection is unusable; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// An identity without any certificate.
    #[error("the certificate chain is empty; pass the X509-SVID leaf first, then intermediates")]
    EmptyChain,
    /// The leaf is not a valid X509-SVID.
    #[error("the leaf certificate is not a usable X509-SVID: {0}")]
    InvalidSvid(#[source] X509Error),
    /// The private key cannot be loaded or does not belong to the leaf.
    #[error("the private key is unusable: {0}; pass the unencrypted PKCS#8 DER key of the leaf certificate")]
    InvalidKey(String),
    /// A trust bundle without roots.
    #[error("the trust bundle is empty; pass at least one root certificate (e.g. from `sigil-server bundle show`)")]
    EmptyBundle,
    /// A root that cannot serve as a trust anchor.
    #[error("trust-bundle certificate #{index} cannot be used as a root: {reason}")]
    InvalidRoot {
        /// Position of the root in the bundle (0-based).
        index: usize,
        /// What the parser reported.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(#[source] rustls::Error),
    /// The server address is not `host:port`.
    #[error("invalid server address {addr:?}: {reason}; use HOST:PORT, e.g. sigil.example.org:8081 or 10.0.0.1:8081")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Which rule it broke.
        reason: String,
    },
    /// Connecting (TCP, TLS handshake or HTTP/2) failed.
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The crypto provider used everywhere in Sigil (`ring`).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

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
        let certified = CertifiedKey::from_der(chain, key, &self.provider)
            .map_err(|e| TlsError::InvalidKey(e.to_string()))?;
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
                    .map_err(|e| TlsError::InvalidRoot {
                        index,
                        reason: e.to_string(),
                    })
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
    fn verify(
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

fn other_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Maps a path-validation error to the closest rustls certificate error (so alerts are right).
fn webpki_error(e: webpki::Error) -> rustls::Error {
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

/// A TLS connection accepted by [`incoming`]. tonic's `Connected` implementation for it puts a
/// `TlsConnectInfo<TcpConnectInfo>` (with the peer certificates) into each request, which
/// [`peer_svid`] and `Request::peer_certs` read.
pub type TlsConnection = TlsStream<TcpStream>;

/// Accepts TCP connections on `listener` and yields those whose TLS handshake (with `config`)
/// completed, for `tonic::transport::Server::serve_with_incoming_shutdown`.
///
/// Uses [`DEFAULT_HANDSHAKE_TIMEOUT`]; see [`incoming_with_timeout`].
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    incoming_with_timeout(listener, config, DEFAULT_HANDSHAKE_TIMEOUT)
}

/// As [`incoming`], with a handshake timeout.
///
/// Each handshake runs in its own task, at most [`MAX_CONCURRENT_HANDSHAKES`] at once; failed
/// or timed-out handshakes are logged at debug level and dropped; accept errors (e.g. out of
/// file descriptors) are logged and retried after a short pause. The stream never ends on its
/// own; dropping it (tonic does on shutdown) stops the accept loop and closes the listener.
pub fn incoming_with_timeout(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP connection failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = tokio::select! {
                _ = tx.closed() => return,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(permit);
                match result {
                    Ok(Ok(tls)) => {
                        // The receiver is gone only when the server is shutting down.
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => log_handshake_failure(peer, &e.to_string()),
                    Err(_) => log_handshake_failure(peer, "timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn log_handshake_failure(peer: SocketAddr, error: &str) {
    tracing::debug!(peer = %peer, error, "TLS handshake failed; connection dropped");
}

/// Splits `host:port` (IPv6 as `[addr]:port`) and returns the TLS server name for the host.
fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = |reason: &str| TlsError::InvalidAddress {
        addr: addr.chars().take(256).collect(),
        reason: reason.to_string(),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
    port.parse::<u16>()
        .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("missing HOST"));
    }
    ServerName::try_from(host.to_string())
        .map_err(|_| bad("the host is not a DNS name or IP address"))
}

fn endpoint(addr: &str) -> Result<Endpoint, TlsError> {
    server_name(addr)?;
    // The scheme is `http` because TLS is done by our connector, not by tonic.
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| {
            // Pings keep a quiet connection (an agent's sync stream) honest: a server that died
            // without closing it, or a silent network, is noticed within about a minute.
            e.connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
        })
        .map_err(|e| TlsError::InvalidAddress {
            addr: addr.chars().take(256).collect(),
            reason: e.to_string(),
        })
}

/// tower connector for tonic: TCP to the address, then a TLS handshake with the client config.
#[derive(Clone)]
struct TlsConnector {
    addr: Arc<str>,
    name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

type ConnectFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
            > + Send,
    >,
>;

impl tower::Service<tonic::codegen::http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&*this.addr).await?;
            let _ = tcp.set_nodelay(true);
            let tls = this.tls.connect(this.name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

fn tls_connector(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<TlsConnector, TlsError> {
    Ok(TlsConnector {
        name: server_name(addr)?,
        addr: addr.into(),
        tls: tokio_rustls::TlsConnector::from(config),
    })
}

/// Connects a gRPC channel to `addr` (`host:port`) over TLS with `config` (from
/// [`client_config`]); fails if the first connection fails.
pub async fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, TlsError> {
    endpoint(addr)?
        .connect_with_connector(tls_connector(addr, config)?)
        .await
        .map_err(|source| TlsError::Connect {
            addr: addr.chars().take(256).collect(),
            source,
        })
}

/// A gRPC channel to `addr` that connects (and reconnects) on demand.
pub fn connect_lazy(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, TlsError> {
    Ok(endpoint(addr)?.connect_with_connector_lazy(tls_connector(addr, config)?))
}

/// The verified X509-SVID a peer presented on this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSvid {
    /// The SPIFFE ID of the leaf.
    pub spiffe_id: SpiffeId,
    /// The leaf's serial number, lowercase hex (as the server's CA records it).
    pub serial_hex: String,
    /// The leaf's NotAfter, Unix seconds.
    pub not_after: i64,
}

impl PeerSvid {
    /// Reads the SPIFFE ID, serial and expiry of a leaf X509-SVID.
    pub fn from_leaf_der(leaf_der: &[u8]) -> Result<PeerSvid, X509Error> {
        let spiffe_id = crate::x509::check_x509_svid(leaf_der)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf_der).map_err(|e| X509Error::Der {
                index: 0,
                reason: e.to_string(),
            })?;
        let serial_hex = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(PeerSvid {
            spiffe_id,
            serial_hex,
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// The client SVID of the connection `req` arrived on: `None` without a client certificate
/// (or outside a TLS connection from [`incoming`]). The chain was verified in the handshake.
pub fn peer_svid<T>(req: &tonic::Request<T>) -> Option<PeerSvid> {
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    PeerSvid::from_leaf_der(leaf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::node as pb;
    use crate::proto::node::node_client::NodeClient;
    use crate::proto::node::node_server::{Node, NodeServer};
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use tokio::io::AsyncReadExt as _;
    use tokio::sync::oneshot;
    use tonic::{Request, Response, Status};

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    const SERVER_ID: &str = "spiffe://example.org/sigil/server";
    const AGENT_ID: &str = "spiffe://example.org/sigil/agent/join_token/t1";

    struct TestCa {
        cert_der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        fn new() -> TestCa {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
            let cert = p.self_signed(&key).unwrap();
            TestCa {
                cert_der: cert.der().to_vec(),
                issuer: Issuer::new(p, key),
            }
        }

        /// An X509-SVID for `id`: (chain, PKCS#8 key).
        fn svid(&self, id: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            (vec![cert.der().to_vec()], key.serialize_der())
        }

        fn identity(&self, id: &str) -> Arc<IdentityStore> {
            let (chain, key) = self.svid(id);
            Arc::new(IdentityStore::new(chain, key).unwrap())
        }

        fn trust(&self) -> Arc<TrustStore> {
            Arc::new(TrustStore::new(std::slice::from_ref(&self.cert_der)).unwrap())
        }
    }

    /// Answers RenewAgent with the caller's SVID as `id|serial`, or `none`.
    struct Echo;

    type BoxStream<T> =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

    #[tonic::async_trait]
    impl Node for Echo {
        type AttestStream = BoxStream<pb::AttestResponse>;
        type SyncStream = BoxStream<pb::SyncResponse>;

        async fn attest(
            &self,
            _r: Request<tonic::Streaming<pb::AttestRequest>>,
        ) -> Result<Response<Self::AttestStream>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn renew_agent(
            &self,
            r: Request<pb::RenewAgentRequest>,
        ) -> Result<Response<pb::RenewAgentResponse>, Status> {
            let text = match peer_svid(&r) {
                Some(p) => format!("{}|{}", p.spiffe_id, p.serial_hex),
                None => "none".into(),
            };
            Ok(Response::new(pb::RenewAgentResponse {
                svid_chain: text.into_bytes(),
            }))
        }
        async fn sync(
            &self,
            _r: Request<pb::SyncRequest>,
        ) -> Result<Response<Self::SyncStream>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn batch_sign(
            &self,
            _r: Request<pb::BatchSignRequest>,
        ) -> Result<Response<pb::BatchSignResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn mint_jwt_svid(
            &self,
            _r: Request<pb::JwtSvidRequest>,
        ) -> Result<Response<pb::JwtSvidResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
    }

    struct TestServer {
        addr: String,
        _stop: oneshot::Sender<()>,
    }

    async fn serve(
        identity: Arc<IdentityStore>,
        trust: Arc<TrustStore>,
        timeout: Duration,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = Arc::new(server_config(identity, trust).unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NodeServer::new(Echo))
                .serve_with_incoming_shutdown(
                    incoming_with_timeout(listener, config, timeout),
                    async {
                        let _ = rx.await;
                    },
                ),
        );
        TestServer { addr, _stop: tx }
    }

    fn spiffe(ca: &TestCa, expected: &str) -> ServerVerification {
        ServerVerification::Spiffe {
            trust: ca.trust(),
            expected_id: SpiffeId::parse(expected).unwrap(),
        }
    }

    /// Calls RenewAgent (the echo) over a fresh channel.
    async fn echo(
        addr: &str,
        verification: ServerVerification,
        identity: Option<Arc<IdentityStore>>,
    ) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let config = Arc::new(client_config(verification, identity)?);
        let mut client = NodeClient::new(connect(addr, config).await?);
        let resp = client
            .renew_agent(pb::RenewAgentRequest { csr: vec![] })
            .await?;
        Ok(String::from_utf8(resp.into_inner().svid_chain)?)
    }

    fn serial_of(identity: &IdentityStore) -> String {
        let key = identity.current().unwrap();
        PeerSvid::from_leaf_der(key.end_entity_cert().unwrap())
            .unwrap()
            .serial_hex
    }

    #[tokio::test]
    async fn mtls_round_trip_passes_the_client_svid_to_handlers() -> TestResult {
        let ca = TestCa::new();
        let server = serve(
            ca.identity(SERVER_ID),
            ca.trust(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .await;
        let agent = ca.identity(AGENT_ID);
        let got = echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent.clone())).await?;
        assert_eq!(got, format!("{AGENT_ID}|{}", serial_of(&agent)));
        Ok(())
    }

    #[tokio::test]
    async fn no_client_certificate_is_accepted_without_peer_svid() -> TestResult {
        let ca = TestCa::new();
        let server = serve(
            ca.identity(SERVER_ID),
            ca.trust(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .await;
        assert_eq!(
            echo(&server.addr, spiffe(&ca, SERVER_ID), None).await?,
            "none"
        );
        // An empty store presents nothing either.
        let empty = Arc::new(IdentityStore::empty());
        assert_eq!(
            echo(&server.addr, spiffe(&ca, SERVER_ID), Some(empty)).await?,
            "none"
        );
        Ok(())
    }

    #[tokio::test]
    async fn wrong_server_id_or_untrusted_server_is_refused() -> TestResult {
        let ca = TestCa::new();
        let server = serve(
            ca.identity(SERVER_ID),
            ca.trust(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .await;
        let err = echo(
            &server.addr,
            spiffe(&ca, "spiffe://example.org/not-the-server"),
            None,
        )
        .await
        .err()
        .ok_or("a server with another SPIFFE ID was accepted")?;
        let chain = format!("{err:?}");
        assert!(chain.contains("expected"), "{chain}");
        // A server whose SVID comes from another CA.
        let other = TestCa::new();
        assert!(echo(&server.addr, spiffe(&other, SERVER_ID), None)
            .await
            .is_err());
        // Insecure bootstrap accepts it (demo mode).
        assert_eq!(
            echo(&server.addr, ServerVerification::InsecureBootstrap, None).await?,
            "none"
        );
        Ok(())
    }

    #[tokio::test]
    async fn client_certificate_from_another_ca_is_refused() -> TestResult {
        let ca = TestCa::new();
        let server = serve(
            ca.identity(SERVER_ID),
            ca.trust(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .await;
        let other = TestCa::new();
        let result = echo(
            &server.addr,
            spiffe(&ca, SERVER_ID),
            Some(other.identity(AGENT_ID)),
        )
        .await;
        assert!(
            result.is_err(),
            "foreign client certificate accepted: {result:?}"
        );
        // The server keeps serving others.
        let agent = ca.identity(AGENT_ID);
        assert!(echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent))
            .await?
            .starts_with(AGENT_ID));
        Ok(())
    }

    #[tokio::test]
    async fn identity_rotation_applies_to_new_connections() -> TestResult {
        let ca = TestCa::new();
        let server_identity = ca.identity(SERVER_ID);
        let server = serve(
            server_identity.clone(),
            ca.trust(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .await;

        // Server side: a raw TLS connection sees the serial of the current server SVID.
        let server_serial = |config: Arc<rustls::ClientConfig>, addr: String| async move {
            let tcp = TcpStream::connect(&addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name(&addr).unwrap(), tcp)
                .await
                .unwrap();
            let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
            PeerSvid::from_leaf_der(&leaf).unwrap().serial_hex
        };
        let config = Arc::new(client_config(spiffe(&ca, SERVER_ID), None)?);
        let before = server_serial(config.clone(), server.addr.clone()).await;
        assert_eq!(before, serial_of(&server_identity));
        let (chain, key) = ca.svid(SERVER_ID);
        server_identity.set(chain, key)?;
        let after = server_serial(config, server.addr.clone()).await;
        assert_ne!(before, after);
        assert_eq!(after, serial_of(&server_identity));

        // Client side: the same store, rotated, is what the server sees next.
        let agent = ca.identity(AGENT_ID);
        let first = echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent.clone())).await?;
        let (chain, key) = ca.svid(AGENT_ID);
        agent.set(chain, key)?;
        let second = echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent.clone())).await?;
        assert_ne!(first, second);
        assert_eq!(second, format!("{AGENT_ID}|{}", serial_of(&agent)));
        Ok(())
    }

    #[tokio::test]
    async fn trust_bundle_swap_applies_to_new_handshakes() -> TestResult {
        let ca = TestCa::new();
        let trust = ca.trust();
        let server = serve(
            ca.identity(SERVER_ID),
            trust.clone(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .await;
        let agent = ca.identity(AGENT_ID);
        assert!(
            echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent.clone()))
                .await
                .is_ok()
        );
        let other = TestCa::new();
        trust.set(std::slice::from_ref(&other.cert_der))?;
        assert!(echo(&server.addr, spiffe(&ca, SERVER_ID), Some(agent))
            .await
            .is_err());
        Ok(())
    }

    #[tokio::test]
    async fn stalled_handshake_blocks_nobody_and_times_out() -> TestResult {
        let ca = TestCa::new();
        let server = serve(
            ca.identity(SERVER_ID),
            ca.trust(),
            Duration::from_millis(300),
        )
        .await;
        // Connects and says nothing.
        let mut stalled = TcpStream::connect(&server.addr).await?;
        // Garbage instead of a ClientHello.
        let mut garbage = TcpStream::connect(&server.addr).await?;
        tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n").await?;
        assert_eq!(
            echo(&server.addr, spiffe(&ca, SERVER_ID), None).await?,
            "none"
        );
        // The stalled connection is closed by the server after the timeout.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await?;
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "stalled connection still open: {n:?}"
        );
        assert_eq!(
            echo(&server.addr, spiffe(&ca, SERVER_ID), None).await?,
            "none"
        );
        Ok(())
    }

    #[test]
    fn identity_and_trust_material_is_validated() {
        let ca = TestCa::new();
        let (chain, key) = ca.svid(AGENT_ID);
        let (_, other_key) = ca.svid(AGENT_ID);
        assert!(matches!(
            IdentityStore::new(vec![], key.clone()),
            Err(TlsError::EmptyChain)
        ));
        assert!(matches!(
            IdentityStore::new(chain.clone(), other_key),
            Err(TlsError::InvalidKey(_))
        ));
        assert!(matches!(
            IdentityStore::new(chain.clone(), vec![1, 2, 3]),
            Err(TlsError::InvalidKey(_))
        ));
        // A CA certificate is not an SVID.
        assert!(matches!(
            IdentityStore::new(vec![ca.cert_der.clone()], key.clone()),
            Err(TlsError::InvalidSvid(_))
        ));
        let store = IdentityStore::new(chain.clone(), key.clone()).unwrap();
        assert_eq!(store.spiffe_id().unwrap().to_string(), AGENT_ID);
        // A failed set keeps the old identity.
        assert!(store.set(vec![vec![0x30]], key).is_err());
        assert_eq!(store.spiffe_id().unwrap().to_string(), AGENT_ID);
        store.clear();
        assert!(store.current().is_none());
        assert!(!format!("{store:?}").contains("key:"));

        assert!(matches!(TrustStore::new(&[]), Err(TlsError::EmptyBundle)));
        assert!(matches!(
            TrustStore::new(&[vec![1, 2, 3]]),
            Err(TlsError::InvalidRoot { index: 0, .. })
        ));
        let trust = ca.trust();
        assert!(trust.set(&[]).is_err());
        assert_eq!(trust.roots_der(), vec![ca.cert_der.clone()]);
    }

    #[test]
    fn server_addresses_parse() {
        for ok in [
            "127.0.0.1:8081",
            "[::1]:8081",
            "sigil.example.org:443",
            "localhost:0",
        ] {
            assert!(server_name(ok).is_ok(), "{ok}");
            assert!(endpoint(ok).is_ok(), "{ok}");
        }
        for bad in ["", "host", ":8081", "host:port", "host:99999", "bad host:1"] {
            assert!(
                matches!(server_name(bad), Err(TlsError::InvalidAddress { .. })),
                "{bad}"
            );
        }
    }
}
