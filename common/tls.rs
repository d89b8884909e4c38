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
//!   with a timeout, so a slow or broken client never blocks others or the accept loop, which
//!   never pauses: unfinished handshakes are bounded per source address and in total, and a
//!   flood drops the oldest handshakes of the source holding the most (see [`HandshakeLimits`]).
//! - [`connect`] / [`connect_lazy`]: a tonic [`Channel`] over TLS with a [`rustls::ClientConfig`].
//!
//! Only TLS 1.3 is offered: it encrypts the client certificate, so an agent's SPIFFE ID is not
//! visible on the wire. Session resumption is disabled on both sides, so every connection
//! presents and verifies a certificate against the *current* trust bundle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
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
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::spiffe_id::SpiffeId;
use crate::x509::X509Error;

/// The ALPN protocol both sides negotiate (gRPC runs over HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";
/// How long [`incoming`] waits for a client to finish its TLS handshake (an agent's takes
/// milliseconds; a connection that sends nothing holds a slot only this long).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many handshakes run at once in [`incoming`], from all sources together.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 1024;
/// At most this many handshakes from one source (an IPv4 address, an IPv6 /64) run at once in
/// [`incoming`]. Agents behind one NAT address share it.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// [`incoming`] logs a handshake flood at most once per this interval, with counts.
pub const FLOOD_LOG_INTERVAL: Duration = Duration::from_secs(10);
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
    InvalidKey(#[source] rustls::Error),
    /// A trust bundle without roots.
    #[error("the trust bundle is empty; pass at least one root certificate (e.g. from `sigil-server bundle show`)")]
    EmptyBundle,
    /// A root that cannot serve as a trust anchor.
    #[error("trust-bundle certificate #{index} cannot be used as a root: {source}")]
    InvalidRoot {
        /// Position of the root in the bundle (0-based).
        index: usize,
        /// What the parser reported.
        #[source]
        source: webpki::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(#[source] rustls::Error),
    /// The server address is not `host:port`.
    #[error("invalid server address {addr:?}: {reason}; use HOST:PORT, e.g. sigil.example.org:8081 or 10.0.0.1:8081")]
    InvalidAddress {
        /// The address as given (at most 256 characters of it).
        addr: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// The address passed the `host:port` rules but is not a usable endpoint URI.
    #[error("invalid server address {addr:?}: {source}; use HOST:PORT, e.g. sigil.example.org:8081 or 10.0.0.1:8081")]
    InvalidEndpoint {
        /// The address as given (at most 256 characters of it).
        addr: String,
        /// What tonic reported.
        #[source]
        source: tonic::transport::Error,
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
/// Uses the default [`HandshakeLimits`]; see [`incoming_with_limits`].
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    incoming_with_limits(listener, config, HandshakeLimits::default())
}

/// As [`incoming`], with a handshake timeout (and the default bounds).
pub fn incoming_with_timeout(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let limits = HandshakeLimits {
        timeout: handshake_timeout,
        ..HandshakeLimits::default()
    };
    incoming_with_limits(listener, config, limits)
}

/// Bounds on the unfinished TLS handshakes of [`incoming_with_limits`].
///
/// The TLS port is open to anyone (agents attest before they hold a certificate), so a client
/// can open connections and never finish a handshake. The accept loop never stops for that:
/// each connection starts its handshake at once, and when a bound is reached an *older*
/// unfinished handshake is dropped to make room:
/// - a source already at `per_source` loses its own oldest handshake;
/// - when `total` are running, the source with the most loses its oldest one.
///
/// So a flood costs its sources their own handshakes: a source with fewer handshakes than the
/// heaviest one never loses any, and a new connection, from anywhere, always starts its
/// handshake (one from a flooding source survives as long as that source opens fewer than
/// `per_source` connections meanwhile; a real handshake needs milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Longest time a handshake may take.
    pub timeout: Duration,
    /// Most handshakes of one source (an IPv4 address, an IPv6 /64) at once.
    pub per_source: usize,
    /// Most handshakes at once.
    pub total: usize,
}

impl Default for HandshakeLimits {
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`], [`MAX_HANDSHAKES_PER_SOURCE`], [`MAX_CONCURRENT_HANDSHAKES`].
    fn default() -> Self {
        Self {
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            per_source: MAX_HANDSHAKES_PER_SOURCE,
            total: MAX_CONCURRENT_HANDSHAKES,
        }
    }
}

/// As [`incoming`], with explicit [`HandshakeLimits`].
///
/// Each handshake runs in its own task; failed or timed-out handshakes are logged at debug level
/// and dropped; handshakes dropped to respect `limits` are counted and reported at warn level, at
/// most once per [`FLOOD_LOG_INTERVAL`]; accept errors (e.g. out of file descriptors) are logged
/// and retried after a short pause. The stream never ends on its own; dropping it (tonic does on
/// shutdown) stops the accept loop and closes the listener.
pub fn incoming_with_limits(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: HandshakeLimits,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(Mutex::new(Handshakes::new(limits)));
    let local = listener.local_addr().ok();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLOOD_LOG_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick() => {
                    report_flood(&handshakes, local);
                    continue;
                }
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
            let (slot, cancelled, dropped) = Handshakes::admit(&handshakes, peer.ip());
            if dropped {
                report_flood(&handshakes, local);
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = tokio::select! {
                    r = tokio::time::timeout(limits.timeout, acceptor.accept(tcp)) => r,
                    // Dropped to make room (the sender went away): the connection closes here.
                    _ = cancelled => return,
                };
                match result {
                    Ok(Ok(tls)) => {
                        drop(slot);
                        // The receiver is gone only when the server is shutting down.
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => log_handshake_failure(peer, &e.to_string()),
                    Err(_) => {
                        slot.timed_out();
                        log_handshake_failure(peer, "timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn log_handshake_failure(peer: SocketAddr, error: &str) {
    tracing::debug!(peer = %peer, error, "TLS handshake failed; connection dropped");
}

/// Logs the flood counts if a report is due.
fn report_flood(handshakes: &Mutex<Handshakes>, local: Option<SocketAddr>) {
    let Some(r) = lock(handshakes).flood_report(Instant::now()) else {
        return;
    };
    let (heaviest_source, heaviest_handshakes) = r.heaviest.unzip();
    tracing::warn!(
        listener = ?local,
        dropped_per_source = r.dropped_per_source,
        dropped_over_total = r.dropped_over_total,
        timed_out = r.timed_out,
        in_flight = r.in_flight,
        sources = r.sources,
        heaviest_source = ?heaviest_source,
        heaviest_handshakes = ?heaviest_handshakes,
        since_secs = r.since.as_secs(),
        "TLS handshake flood: unfinished handshakes were dropped to keep accepting connections \
         (agents retry); if these sources are not agents, block them in a firewall"
    );
}

/// A poisoned lock only means a handshake task panicked; the counts stay consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where a connection comes from, for [`HandshakeLimits::per_source`]: the IPv4 address, or the
/// /64 of an IPv6 address (a host is usually given a whole /64). IPv4-mapped IPv6 addresses
/// count as IPv4.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// The unfinished handshakes of [`incoming_with_limits`] and the flood counters.
struct Handshakes {
    limits: HandshakeLimits,
    next_id: u64,
    /// Every unfinished handshake by id, i.e. oldest first; dropping the sender cancels it.
    live: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    /// The ids of each source's unfinished handshakes.
    by_source: HashMap<IpAddr, BTreeSet<u64>>,
    dropped_per_source: u64,
    dropped_over_total: u64,
    timed_out: u64,
    /// Since when the counts run, and when the last report was made.
    counting_since: Option<Instant>,
    last_report: Option<Instant>,
}

/// Counts for one flood log line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FloodReport {
    dropped_per_source: u64,
    dropped_over_total: u64,
    timed_out: u64,
    in_flight: usize,
    sources: usize,
    /// The source with the most unfinished handshakes now, and how many.
    heaviest: Option<(IpAddr, usize)>,
    /// How long the counts ran.
    since: Duration,
}

/// A running handshake's place in [`Handshakes`]; freed on drop.
struct HandshakeSlot {
    id: u64,
    handshakes: Arc<Mutex<Handshakes>>,
}

impl HandshakeSlot {
    /// Counts a timeout (reported with a flood).
    fn timed_out(&self) {
        lock(&self.handshakes).timed_out += 1;
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.handshakes).remove(self.id);
    }
}

impl Handshakes {
    fn new(limits: HandshakeLimits) -> Self {
        Self {
            limits: HandshakeLimits {
                per_source: limits.per_source.max(1),
                total: limits.total.max(1),
                ..limits
            },
            next_id: 0,
            live: BTreeMap::new(),
            by_source: HashMap::new(),
            dropped_per_source: 0,
            dropped_over_total: 0,
            timed_out: 0,
            counting_since: None,
            last_report: None,
        }
    }

    /// Registers a new handshake from `peer`, first dropping an older one if a bound is reached:
    /// its slot, a receiver that resolves when it is dropped in turn, and whether one was dropped.
    fn admit(
        this: &Arc<Mutex<Self>>,
        peer: IpAddr,
    ) -> (HandshakeSlot, oneshot::Receiver<()>, bool) {
        let mut h = lock(this);
        let (id, rx, dropped) = h.insert(source_of(peer), Instant::now());
        drop(h);
        let slot = HandshakeSlot {
            id,
            handshakes: this.clone(),
        };
        (slot, rx, dropped)
    }

    /// [`Handshakes::admit`] without the slot: the new id, its cancel receiver, whether an older
    /// handshake was dropped.
    fn insert(&mut self, source: IpAddr, now: Instant) -> (u64, oneshot::Receiver<()>, bool) {
        let mut dropped = false;
        let own = self.by_source.get(&source).map_or(0, BTreeSet::len);
        if own >= self.limits.per_source {
            self.drop_oldest_of(source);
            self.dropped_per_source += 1;
            dropped = true;
        } else if self.live.len() >= self.limits.total {
            if let Some(heaviest) = self.heaviest().map(|(s, _)| s) {
                self.drop_oldest_of(heaviest);
                self.dropped_over_total += 1;
                dropped = true;
            }
        }
        if dropped && self.counting_since.is_none() {
            self.counting_since = Some(now);
        }
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.live.insert(id, (source, tx));
        self.by_source.entry(source).or_default().insert(id);
        (id, rx, dropped)
    }

    /// The source with the most unfinished handshakes (of equals, the one whose oldest is
    /// oldest), and how many.
    fn heaviest(&self) -> Option<(IpAddr, usize)> {
        self.by_source
            .iter()
            .max_by(|a, b| {
                a.1.len()
                    .cmp(&b.1.len())
                    .then_with(|| b.1.first().cmp(&a.1.first()))
            })
            .map(|(s, ids)| (*s, ids.len()))
    }

    fn drop_oldest_of(&mut self, source: IpAddr) {
        if let Some(id) = self
            .by_source
            .get(&source)
            .and_then(|ids| ids.first().copied())
        {
            // Dropping the sender wakes the handshake task, which closes its connection.
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) {
        let Some((source, _cancel)) = self.live.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }

    /// The counts since the last report, if handshakes were dropped since and the last report
    /// is at least [`FLOOD_LOG_INTERVAL`] old (or there was none); the counts then restart.
    fn flood_report(&mut self, now: Instant) -> Option<FloodReport> {
        let since = self.counting_since?;
        if self
            .last_report
            .is_some_and(|last| now.saturating_duration_since(last) < FLOOD_LOG_INTERVAL)
        {
            return None;
        }
        let report = FloodReport {
            dropped_per_source: self.dropped_per_source,
            dropped_over_total: self.dropped_over_total,
            timed_out: self.timed_out,
            in_flight: self.live.len(),
            sources: self.by_source.len(),
            heaviest: self.heaviest(),
            since: now.saturating_duration_since(since),
        };
        self.dropped_per_source = 0;
        self.dropped_over_total = 0;
        self.timed_out = 0;
        self.counting_since = None;
        self.last_report = Some(now);
        Some(report)
    }
}

/// Splits `host:port` (IPv6 as `[addr]:port`) and returns the TLS server name for the host.
fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = |reason: &'static str| TlsError::InvalidAddress {
        addr: addr.chars().take(256).collect(),
        reason,
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
        .map_err(|source| TlsError::InvalidEndpoint {
            addr: addr.chars().take(256).collect(),
            source,
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

    /// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8).
    async fn tcp_from(source: &str, addr: &str) -> io::Result<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{source}:0").parse().unwrap())?;
        socket.connect(addr.parse().unwrap()).await
    }

    /// `n` connections from `source` that never send a byte; stops early if the server stops
    /// taking connections (its accept backlog is full).
    async fn flood(source: &str, addr: &str, n: usize) -> Vec<TcpStream> {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            match tokio::time::timeout(Duration::from_secs(2), tcp_from(source, addr)).await {
                Ok(Ok(s)) => held.push(s),
                _ => break,
            }
        }
        held
    }

    /// A complete TLS handshake (the client's side, server verified) from `source`, which must
    /// finish within `within`.
    async fn handshake_from(
        ca: &TestCa,
        source: &str,
        addr: &str,
        within: Duration,
    ) -> Result<(), String> {
        let config = Arc::new(client_config(spiffe(ca, SERVER_ID), None).unwrap());
        let attempt = async {
            let tcp = tcp_from(source, addr).await?;
            tokio_rustls::TlsConnector::from(config)
                .connect(server_name(addr).unwrap(), tcp)
                .await
        };
        match tokio::time::timeout(within, attempt).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("handshake from {source} failed: {e}")),
            Err(_) => Err(format!("handshake from {source} took over {within:?}")),
        }
    }

    /// How many of `streams` the server has not closed (a read waits `wait` for EOF).
    async fn still_open(streams: Vec<TcpStream>, wait: Duration) -> (usize, Vec<TcpStream>) {
        let mut tasks = tokio::task::JoinSet::new();
        for mut s in streams {
            tasks.spawn(async move {
                let mut buf = [0u8; 1];
                match tokio::time::timeout(wait, s.read(&mut buf)).await {
                    Err(_) => Some(s),
                    Ok(_) => None,
                }
            });
        }
        let mut open = Vec::new();
        while let Some(r) = tasks.join_next().await {
            open.extend(r.unwrap());
        }
        (open.len(), open)
    }

    /// Room for `fds` more descriptors in this process (the flood needs thousands).
    fn room_for(fds: u64) -> bool {
        let _ = crate::limits::raise_open_files_limit();
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        soft >= fds
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_flood_starves_no_other_source() -> TestResult {
        // Thousands of connections that never send a ClientHello, from 127.0.0.1 and
        // 127.0.0.2: more than MAX_CONCURRENT_HANDSHAKES, with the default limits.
        let per_source = [("127.0.0.1", 1500), ("127.0.0.2", 300)];
        assert!(
            room_for(6000),
            "raise the open files limit to run this test"
        );
        let ca = TestCa::new();
        let server = serve(
            ca.identity(SERVER_ID),
            ca.trust(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .await;
        let mut held = Vec::new();
        for (source, n) in per_source {
            let conns = flood(source, &server.addr, n).await;
            assert_eq!(conns.len(), n, "the server stopped accepting from {source}");
            held.push((source, conns));
        }
        // Another address, and the flooding one itself, still get their handshakes done.
        handshake_from(&ca, "127.0.0.5", &server.addr, Duration::from_secs(2)).await?;
        handshake_from(&ca, "127.0.0.1", &server.addr, Duration::from_secs(2)).await?;
        // Each flooding source kept at most its share; the rest was closed by the server.
        for (source, conns) in held {
            let (open, _keep) = still_open(conns, Duration::from_millis(500)).await;
            assert!(
                open <= MAX_HANDSHAKES_PER_SOURCE,
                "{open} unfinished handshakes from {source}"
            );
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn total_bound_takes_from_the_heaviest_sources() -> TestResult {
        assert!(
            room_for(2000),
            "raise the open files limit to run this test"
        );
        let ca = TestCa::new();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let config = Arc::new(server_config(ca.identity(SERVER_ID), ca.trust())?);
        let limits = HandshakeLimits {
            // Long: nothing times out during the test, all closing is the bounds' doing.
            timeout: Duration::from_secs(120),
            per_source: 16,
            total: 40,
        };
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NodeServer::new(Echo))
                .serve_with_incoming_shutdown(
                    incoming_with_limits(listener, config, limits),
                    async {
                        let _ = rx.await;
                    },
                ),
        );
        let sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
        let mut held = Vec::new();
        for source in sources {
            held.push(flood(source, &addr, 100).await);
        }
        let (mut open_by_source, mut keep) = (Vec::new(), Vec::new());
        for conns in held {
            let (open, streams) = still_open(conns, Duration::from_millis(500)).await;
            open_by_source.push(open);
            keep.push(streams);
        }
        let total: usize = open_by_source.iter().sum();
        assert!(total <= limits.total, "{open_by_source:?}");
        // Taken from the heaviest: every source keeps a fair share.
        for open in &open_by_source {
            assert!(
                (12..=limits.per_source).contains(open),
                "{open_by_source:?}"
            );
        }
        // A new source and a flooding one get through.
        handshake_from(&ca, "127.0.0.5", &addr, Duration::from_secs(2)).await?;
        handshake_from(&ca, "127.0.0.3", &addr, Duration::from_secs(2)).await?;
        drop(tx);
        Ok(())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// `n` handshakes from `source` at `now`: their ids and cancel receivers.
    fn admit_n(
        h: &mut Handshakes,
        source: &str,
        n: usize,
        now: Instant,
    ) -> Vec<(u64, oneshot::Receiver<()>)> {
        (0..n)
            .map(|_| {
                let (id, rx, _) = h.insert(source_of(ip(source)), now);
                (id, rx)
            })
            .collect()
    }

    fn cancelled(rx: &mut oneshot::Receiver<()>) -> bool {
        matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed))
    }

    #[test]
    fn a_source_at_its_bound_loses_its_own_oldest_handshake() {
        let now = Instant::now();
        let mut h = Handshakes::new(HandshakeLimits {
            per_source: 3,
            total: 100,
            ..HandshakeLimits::default()
        });
        let mut other = admit_n(&mut h, "10.0.0.9", 2, now);
        let mut a = admit_n(&mut h, "10.0.0.1", 3, now);
        assert!(a.iter_mut().all(|(_, rx)| !cancelled(rx)));
        let (_, _rx, dropped) = h.insert(ip("10.0.0.1"), now);
        assert!(dropped);
        assert!(cancelled(&mut a[0].1), "the oldest of that source");
        assert!(!cancelled(&mut a[1].1) && !cancelled(&mut a[2].1));
        assert!(
            other.iter_mut().all(|(_, rx)| !cancelled(rx)),
            "others untouched"
        );
        assert_eq!(h.by_source[&ip("10.0.0.1")].len(), 3);
        assert_eq!(h.live.len(), 5);
        // A finished handshake frees its place.
        h.remove(a[1].0);
        let (_, _rx2, dropped) = h.insert(ip("10.0.0.1"), now);
        assert!(!dropped);
        assert_eq!(h.dropped_per_source, 1);
    }

    #[test]
    fn over_the_total_the_heaviest_source_loses_its_oldest() {
        let now = Instant::now();
        let mut h = Handshakes::new(HandshakeLimits {
            per_source: 100,
            total: 10,
            ..HandshakeLimits::default()
        });
        let mut light = admit_n(&mut h, "10.0.0.2", 2, now);
        let mut heavy = admit_n(&mut h, "10.0.0.1", 8, now);
        // A new source: the heaviest pays, not the light one.
        let (_, mut fresh, dropped) = h.insert(ip("10.0.0.3"), now);
        assert!(dropped);
        assert!(cancelled(&mut heavy[0].1));
        assert!(light.iter_mut().all(|(_, rx)| !cancelled(rx)));
        // The heavy source keeps flooding: it only ever displaces itself.
        let mut more = admit_n(&mut h, "10.0.0.1", 50, now);
        assert!(light.iter_mut().all(|(_, rx)| !cancelled(rx)));
        assert!(!cancelled(&mut fresh));
        assert_eq!(h.live.len(), 10);
        assert_eq!(h.by_source[&ip("10.0.0.1")].len(), 7);
        // Its newest handshakes are the ones alive.
        assert!(more.iter_mut().rev().take(7).all(|(_, rx)| !cancelled(rx)));
        assert_eq!(h.dropped_over_total, 51);
        // Of equal sources, the one whose oldest handshake is oldest pays.
        let mut h = Handshakes::new(HandshakeLimits {
            per_source: 100,
            total: 4,
            ..HandshakeLimits::default()
        });
        let mut first = admit_n(&mut h, "10.0.0.1", 2, now);
        let mut second = admit_n(&mut h, "10.0.0.2", 2, now);
        admit_n(&mut h, "10.0.0.3", 1, now);
        assert!(cancelled(&mut first[0].1));
        assert!(second.iter_mut().all(|(_, rx)| !cancelled(rx)));
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64() {
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(source_of(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
        let mut h = Handshakes::new(HandshakeLimits {
            per_source: 2,
            ..HandshakeLimits::default()
        });
        let now = Instant::now();
        let mut first = admit_n(&mut h, "2001:db8::1", 1, now);
        admit_n(&mut h, "2001:db8::2", 1, now);
        admit_n(&mut h, "2001:db8::3", 1, now);
        assert!(cancelled(&mut first[0].1), "one /64, one source");
    }

    #[test]
    fn flood_reports_come_at_most_once_per_interval_with_counts() {
        let t0 = Instant::now();
        let mut h = Handshakes::new(HandshakeLimits {
            per_source: 2,
            total: 100,
            ..HandshakeLimits::default()
        });
        admit_n(&mut h, "10.0.0.1", 2, t0);
        assert_eq!(
            h.flood_report(t0),
            None,
            "nothing dropped, nothing to report"
        );
        // The first drop is reported at once.
        admit_n(&mut h, "10.0.0.1", 3, t0);
        h.timed_out += 1;
        let first = h.flood_report(t0).expect("first report");
        assert_eq!(
            first,
            FloodReport {
                dropped_per_source: 3,
                dropped_over_total: 0,
                timed_out: 1,
                in_flight: 2,
                sources: 1,
                heaviest: Some((ip("10.0.0.1"), 2)),
                since: Duration::ZERO,
            }
        );
        // Further drops within the interval are counted, not reported.
        let t1 = t0 + Duration::from_secs(1);
        admit_n(&mut h, "10.0.0.1", 1000, t1);
        assert_eq!(h.flood_report(t1), None);
        assert_eq!(h.flood_report(t0 + FLOOD_LOG_INTERVAL / 2), None);
        // Once the interval has passed: one line with everything since.
        let t2 = t0 + FLOOD_LOG_INTERVAL;
        let second = h.flood_report(t2).expect("second report");
        assert_eq!(second.dropped_per_source, 1000);
        assert_eq!(second.timed_out, 0);
        assert_eq!(second.since, t2 - t1);
        // A quiet interval reports nothing.
        assert_eq!(h.flood_report(t2 + FLOOD_LOG_INTERVAL * 3), None);
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
        // The parsers' errors stay attached as causes.
        let root_err = TrustStore::new(&[vec![1, 2, 3]]).unwrap_err();
        let cause = std::error::Error::source(&root_err).expect("a cause");
        assert!(cause.downcast_ref::<webpki::Error>().is_some(), "{cause:?}");
        let key_err = IdentityStore::new(chain.clone(), vec![1, 2, 3]).unwrap_err();
        let cause = std::error::Error::source(&key_err).expect("a cause");
        assert!(cause.downcast_ref::<rustls::Error>().is_some(), "{cause:?}");
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
