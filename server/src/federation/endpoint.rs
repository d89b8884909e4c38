//! The bundle endpoint: this server's trust bundle as a SPIFFE bundle over HTTPS, for the servers
//! of other trust domains that federate with this one.
//!
//! Configured by `[federation.bundle_endpoint]` (off unless present; [`FileBundleEndpoint`],
//! resolved by [`resolve`] into a [`BundleEndpointConfig`]): `address`, `profile`
//! (`https_spiffe`, the default, or `https_web` with `cert_file` and `key_file`) and
//! `refresh_hint`.
//!
//! [`BundleEndpoint::serve`] answers `GET /` with the bundle read from its
//! [`BundleSource`] at each request — the admin state's bundle, which the CA's rotation and the
//! change-feed follower keep current — so every CA or JWT-key change shows at once, with
//! `spiffe_sequence` the stored bundle's sequence and `spiffe_refresh_hint` the configured hint.
//! Any other path is 404, any other method 405.
//!
//! TLS (rustls, TLS 1.2 and 1.3, no client authentication as the spec requires):
//! - `https_spiffe`: the server's own X509-SVID (`spiffe://<td>/sigil/server`) from its
//!   [`IdentityStore`], read at each handshake, so the endpoint presents the current SVID
//!   through every rotation.
//! - `https_web`: a certificate chain and key from PEM files ([`FileCertResolver`]); the files
//!   are checked at most every [`CERT_CHECK_INTERVAL`] (modification time, size, inode) and read
//!   again when they changed, so a renewed certificate is served without a restart. A new pair
//!   that does not load (half written, key not matching) is logged and the last good one kept.
//!
//! The port is open to anyone, so every cost is bounded: handshakes run with a timeout and
//! per-source bounds ([`sigil::tls::incoming_with_limits`]), at most
//! [`Limits::max_connections`] connections are served at once (more are closed at once), each
//! connection carries one request (no keep-alive) with a small header buffer and must be done
//! within [`Limits::request_timeout`]; answers are the bundle or a one-line error. Requests are
//! counted by outcome (`sigil_server_federation_bundle_endpoint_requests_total`) and logged at
//! debug with the peer; failures to build the document at error.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use sigil::config::ConfigError;
use sigil::tls::{HandshakeLimits, IdentityStore};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_stream::StreamExt as _;

use crate::bundle_publisher::BundleSource;
use crate::metrics::Metrics;

/// The config section, for messages.
pub const SECTION: &str = "federation.bundle_endpoint";
/// Address when the section gives none.
pub const DEFAULT_ADDRESS: &str = "0.0.0.0:8443";
/// `spiffe_refresh_hint` when none is configured (SPIRE's default).
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);
/// How often, at most, the `https_web` certificate files are checked for a change.
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Longest time a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time a connection may take from the end of its handshake to the end of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Most unfinished handshakes from one source (an IPv4 address, an IPv6 /64).
const HANDSHAKES_PER_SOURCE: usize = 16;
/// Most unfinished handshakes in total.
const HANDSHAKES_TOTAL: usize = 256;
/// hyper's read buffer, which bounds the request head (its minimum is 8 KiB).
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// `[federation.bundle_endpoint]` as written (or given by `--federation-bundle-endpoint-*`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBundleEndpoint {
    /// Listen address, `IP:PORT` [default: `0.0.0.0:8443`].
    pub address: Option<String>,
    /// `https_spiffe` (default) or `https_web`.
    pub profile: Option<String>,
    /// `https_web`: PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// `https_web`: PEM private key of the leaf (PKCS#8, SEC1 or PKCS#1).
    pub key_file: Option<PathBuf>,
    /// `spiffe_refresh_hint` served, e.g. `5m` [default: 5m].
    pub refresh_hint: Option<String>,
}

impl FileBundleEndpoint {
    /// `self` with every key `over` sets replaced (flag > file).
    pub fn overridden_by(self, over: FileBundleEndpoint) -> FileBundleEndpoint {
        FileBundleEndpoint {
            address: over.address.or(self.address),
            profile: over.profile.or(self.profile),
            cert_file: over.cert_file.or(self.cert_file),
            key_file: over.key_file.or(self.key_file),
            refresh_hint: over.refresh_hint.or(self.refresh_hint),
        }
    }
}

/// How the endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServedProfile {
    /// The server's own X509-SVID.
    HttpsSpiffe,
    /// A Web PKI certificate and key from files, re-read when they change.
    HttpsWeb {
        /// PEM certificate chain, leaf first.
        cert_file: PathBuf,
        /// PEM private key.
        key_file: PathBuf,
    },
}

impl ServedProfile {
    /// The spec's name of the profile.
    pub fn name(&self) -> &'static str {
        match self {
            Self::HttpsSpiffe => "https_spiffe",
            Self::HttpsWeb { .. } => "https_web",
        }
    }
}

/// The bundle endpoint, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpointConfig {
    /// Listen address.
    pub address: SocketAddr,
    /// How the endpoint authenticates itself.
    pub profile: ServedProfile,
    /// `spiffe_refresh_hint` served (whole seconds).
    pub refresh_hint: Duration,
}

/// Resolves `[federation.bundle_endpoint]` (`None`: the endpoint is off). Errors name the key.
pub fn resolve(
    file: Option<FileBundleEndpoint>,
) -> Result<Option<BundleEndpointConfig>, ConfigError> {
    let Some(f) = file else {
        return Ok(None);
    };
    let address_text = f.address.unwrap_or_else(|| DEFAULT_ADDRESS.to_string());
    let address: SocketAddr = address_text.parse().map_err(|_| {
        ConfigError::invalid(
            format!("{SECTION}.address"),
            address_text.as_str(),
            "expected IP:PORT, e.g. 0.0.0.0:8443",
        )
    })?;
    let profile = match f.profile.as_deref() {
        None | Some("https_spiffe") => {
            for (key, set) in [
                ("cert_file", f.cert_file.is_some()),
                ("key_file", f.key_file.is_some()),
            ] {
                if set {
                    return Err(ConfigError::conflict(format!(
                        "{SECTION}.{key} is for profile = \"https_web\"; the https_spiffe \
                         profile presents the server's own SVID"
                    )));
                }
            }
            ServedProfile::HttpsSpiffe
        }
        Some("https_web") => {
            let file_key = |key: &'static str, value: Option<PathBuf>| match value {
                None => Err(ConfigError::missing(
                    format!("{SECTION}.{key}"),
                    "profile = \"https_web\" needs the PEM certificate chain (cert_file) and \
                     its private key (key_file)",
                )),
                Some(p) if p.as_os_str().is_empty() => Err(ConfigError::rule(
                    format!("{SECTION}.{key}"),
                    "the path is empty",
                )),
                Some(p) => Ok(p),
            };
            ServedProfile::HttpsWeb {
                cert_file: file_key("cert_file", f.cert_file)?,
                key_file: file_key("key_file", f.key_file)?,
            }
        }
        Some(other) => {
            return Err(ConfigError::invalid(
                format!("{SECTION}.profile"),
                other,
                "expected \"https_spiffe\" or \"https_web\"",
            ))
        }
    };
    let refresh_hint = match f.refresh_hint {
        None => DEFAULT_REFRESH_HINT,
        // Whole seconds, never zero (which would have clients poll without pause).
        Some(text) => sigil::ttl::parse(&text)
            .map_err(|e| ConfigError::value(format!("{SECTION}.refresh_hint"), e))?,
    };
    Ok(Some(BundleEndpointConfig {
        address,
        profile,
        refresh_hint,
    }))
}

/// Why the endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A certificate or key file cannot be read.
    #[error("{SECTION}.{key} {}: {source}", path.display())]
    Read {
        /// `cert_file` or `key_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file's PEM content is unusable.
    #[error("{SECTION}.{key} {}: {reason}", path.display())]
    Pem {
        /// `cert_file` or `key_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, and what is expected.
        reason: String,
    },
    /// The key does not fit the certificate, or rustls cannot use it.
    #[error(
        "{SECTION}.key_file {} cannot be used with {SECTION}.cert_file {}: {source}; give the \
         private key of the chain's first certificate",
        key_file.display(),
        cert_file.display()
    )]
    Key {
        /// The certificate file.
        cert_file: PathBuf,
        /// The key file.
        key_file: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration.
    #[error("bundle endpoint TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The `https_web` certificate: a chain and key read from PEM files, read again when the files
/// change (checked at most every `check_every`, when a handshake asks for the certificate).
pub struct FileCertResolver {
    cert_file: PathBuf,
    key_file: PathBuf,
    check_every: Duration,
    provider: Arc<CryptoProvider>,
    state: Mutex<CertState>,
}

struct CertState {
    current: Arc<CertifiedKey>,
    /// The files as they were at the last check.
    stamp: Option<FilesStamp>,
    checked: Instant,
}

/// What tells a file changed: modification time, size, and inode (a file renamed into place).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

type FilesStamp = (FileStamp, FileStamp);

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        dev: m.dev(),
        ino: m.ino(),
    })
}

fn files_stamp(cert: &Path, key: &Path) -> Option<FilesStamp> {
    Some((stamp(cert)?, stamp(key)?))
}

impl std::fmt::Debug for FileCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("FileCertResolver")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("check_every", &self.check_every)
            .finish_non_exhaustive()
    }
}

impl FileCertResolver {
    /// Reads the pair now (an error if it is unusable) and re-checks the files at most every
    /// `check_every`.
    pub fn load(
        cert_file: PathBuf,
        key_file: PathBuf,
        check_every: Duration,
    ) -> Result<Self, EndpointError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = files_stamp(&cert_file, &key_file);
        let current = Arc::new(load_certified_key(&cert_file, &key_file, &provider)?);
        Ok(Self {
            cert_file,
            key_file,
            check_every,
            provider,
            state: Mutex::new(CertState {
                current,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate to present, re-read first if the check is due and the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut state = lock(&self.state);
        if state.checked.elapsed() >= self.check_every {
            state.checked = Instant::now();
            let now = files_stamp(&self.cert_file, &self.key_file);
            if now != state.stamp {
                // Remembered even when the load fails: a bad pair is reported once, and read
                // again only when the files change again.
                state.stamp = now;
                match load_certified_key(&self.cert_file, &self.key_file, &self.provider) {
                    Ok(key) => {
                        state.current = Arc::new(key);
                        tracing::info!(
                            cert_file = %self.cert_file.display(),
                            key_file = %self.key_file.display(),
                            "bundle endpoint: new https_web certificate loaded"
                        );
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "bundle endpoint: the changed https_web certificate files do not load; \
                         still serving the previous certificate"
                    ),
                }
            }
        }
        state.current.clone()
    }
}

impl ResolvesServerCert for FileCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A poisoned lock only means a handshake panicked; the state is a plain swap.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads a PEM chain and key and checks that they belong together.
fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, EndpointError> {
    let read = |key: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| EndpointError::Read {
            key,
            path: path.to_path_buf(),
            source,
        })
    };
    let pem_error = |key: &'static str, path: &Path, reason: String| EndpointError::Pem {
        key,
        path: path.to_path_buf(),
        reason,
    };
    let cert_pem = read("cert_file", cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("cert_file", cert_file, sigil::x509::pem_error_text(&e)))?;
    if chain.is_empty() {
        return Err(pem_error(
            "cert_file",
            cert_file,
            "no CERTIFICATE block; give the PEM certificate chain, leaf first".into(),
        ));
    }
    let key_pem = read("key_file", key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        pem_error(
            "key_file",
            key_file,
            format!(
                "{}; give an unencrypted PEM private key (PRIVATE KEY, EC PRIVATE KEY or RSA \
                 PRIVATE KEY)",
                sigil::x509::pem_error_text(&e)
            ),
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| EndpointError::Key {
        cert_file: cert_file.to_path_buf(),
        key_file: key_file.to_path_buf(),
        source,
    })
}

/// Bounds of the endpoint (tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once ([`MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// TLS handshake deadline ([`HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// Deadline from handshake to answer ([`REQUEST_TIMEOUT`]).
    pub request_timeout: Duration,
    /// Wait for requests in flight at shutdown ([`SHUTDOWN_GRACE`]).
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// The bundle endpoint, ready to serve.
pub struct BundleEndpoint {
    tls: Arc<rustls::ServerConfig>,
    profile: &'static str,
    source: Arc<dyn BundleSource>,
    refresh_hint: Duration,
    metrics: Metrics,
    limits: Limits,
}

impl std::fmt::Debug for BundleEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleEndpoint")
            .field("profile", &self.profile)
            .field("refresh_hint", &self.refresh_hint)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// TLS 1.2 and 1.3 (the spec's Mozilla intermediate compatibility), no client authentication,
/// HTTP/1.1, no session resumption (every client verifies the current certificate).
fn server_tls(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, EndpointError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(EndpointError::Config)?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

impl BundleEndpoint {
    /// An `https_spiffe` endpoint presenting the current identity of `identity` (the server
    /// SVID's store) at each handshake.
    pub fn https_spiffe(
        identity: Arc<IdentityStore>,
        source: Arc<dyn BundleSource>,
        refresh_hint: Duration,
        metrics: Metrics,
    ) -> Result<Self, EndpointError> {
        Ok(Self {
            tls: server_tls(identity)?,
            profile: "https_spiffe",
            source,
            refresh_hint,
            metrics,
            limits: Limits::default(),
        })
    }

    /// An `https_web` endpoint presenting the certificate of `resolver`.
    pub fn https_web(
        resolver: Arc<FileCertResolver>,
        source: Arc<dyn BundleSource>,
        refresh_hint: Duration,
        metrics: Metrics,
    ) -> Result<Self, EndpointError> {
        Ok(Self {
            tls: server_tls(resolver)?,
            profile: "https_web",
            source,
            refresh_hint,
            metrics,
            limits: Limits::default(),
        })
    }

    /// The endpoint `cfg` describes: the server's SVID from `identity` for `https_spiffe`, the
    /// files (read now) for `https_web`.
    pub fn from_config(
        cfg: &BundleEndpointConfig,
        identity: Arc<IdentityStore>,
        source: Arc<dyn BundleSource>,
        metrics: Metrics,
    ) -> Result<Self, EndpointError> {
        match &cfg.profile {
            ServedProfile::HttpsSpiffe => {
                Self::https_spiffe(identity, source, cfg.refresh_hint, metrics)
            }
            ServedProfile::HttpsWeb {
                cert_file,
                key_file,
            } => {
                let resolver = FileCertResolver::load(
                    cert_file.clone(),
                    key_file.clone(),
                    CERT_CHECK_INTERVAL,
                )?;
                Self::https_web(Arc::new(resolver), source, cfg.refresh_hint, metrics)
            }
        }
    }

    /// The same endpoint with other bounds.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves on `listener` until `shutdown` turns true; then stops accepting and waits up to
    /// [`Limits::shutdown_grace`] for requests in flight.
    pub async fn serve(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let local = listener.local_addr().ok();
        let limits = self.limits;
        let mut incoming = sigil::tls::incoming_with_limits(
            listener,
            self.tls.clone(),
            HandshakeLimits {
                timeout: limits.handshake_timeout,
                per_source: HANDSHAKES_PER_SOURCE,
                total: HANDSHAKES_TOTAL,
            },
        );
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        let shared = Arc::new(Handler {
            profile: self.profile,
            source: self.source,
            refresh_hint: self.refresh_hint,
            metrics: self.metrics,
        });
        loop {
            let next = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                next = incoming.next() => next,
            };
            let tls = match next {
                Some(Ok(tls)) => tls,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "bundle endpoint: accepting a connection failed");
                    continue;
                }
                None => break,
            };
            let peer = tls.get_ref().0.peer_addr().ok();
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                shared
                    .metrics
                    .observe_bundle_endpoint(Outcome::Busy.as_str());
                tracing::debug!(
                    peer = ?peer,
                    max_connections = limits.max_connections,
                    "bundle endpoint: too many connections; connection closed"
                );
                continue;
            };
            let handler = shared.clone();
            tokio::spawn(async move {
                handler.connection(tls, peer, limits).await;
                drop(permit);
            });
        }
        // Stops the accept loop and closes the listener.
        drop(incoming);
        let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(limits.shutdown_grace, connections.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                grace_secs = limits.shutdown_grace.as_secs(),
                "bundle endpoint: requests still running after the grace period; closing them"
            );
        }
        tracing::debug!(address = ?local, "bundle endpoint stopped");
    }
}

/// What became of a request (the metric's `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The bundle was served.
    Ok,
    /// Another path than `/`.
    NotFound,
    /// Another method than GET.
    MethodNotAllowed,
    /// The document could not be built.
    Error,
    /// The connection did not finish within the deadline.
    Timeout,
    /// Closed at once: too many connections.
    Busy,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Busy => "busy",
        }
    }
}

/// What every connection shares.
struct Handler {
    profile: &'static str,
    source: Arc<dyn BundleSource>,
    refresh_hint: Duration,
    metrics: Metrics,
}

impl Handler {
    /// Serves one request on `tls` within the deadline.
    async fn connection(
        self: Arc<Self>,
        tls: sigil::tls::TlsConnection,
        peer: Option<SocketAddr>,
        limits: Limits,
    ) {
        let handler = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.respond(req, peer).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.request_timeout)
            .max_buf_size(MAX_REQUEST_HEAD)
            .keep_alive(false)
            .serve_connection(TokioIo::new(tls), svc);
        match tokio::time::timeout(limits.request_timeout, conn).await {
            // Errors here are clients that hang up or send something that is not HTTP/1.1.
            Ok(Ok(())) => {}
            Ok(Err(e)) if !e.is_timeout() => {
                tracing::debug!(peer = ?peer, error = %e, "bundle endpoint: connection error")
            }
            // hyper's own deadline on the request head, or ours on the whole exchange.
            Ok(Err(_)) | Err(_) => {
                self.metrics
                    .observe_bundle_endpoint(Outcome::Timeout.as_str());
                tracing::debug!(
                    peer = ?peer,
                    timeout_secs = limits.request_timeout.as_secs(),
                    "bundle endpoint: connection closed: no complete request and answer in time"
                );
            }
        }
    }

    async fn respond(
        &self,
        req: Request<Incoming>,
        peer: Option<SocketAddr>,
    ) -> Response<Full<Bytes>> {
        let (outcome, response) = if req.uri().path() != "/" {
            (
                Outcome::NotFound,
                text(
                    StatusCode::NOT_FOUND,
                    "not found: the bundle is served at /\n",
                ),
            )
        } else if req.method() != Method::GET {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: use GET\n",
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET"),
            );
            (Outcome::MethodNotAllowed, r)
        } else {
            self.bundle_document().await
        };
        self.metrics.observe_bundle_endpoint(outcome.as_str());
        tracing::debug!(
            peer = ?peer,
            method = %sigil::text::echo(req.method().as_str()),
            path = %sigil::text::echo(req.uri().path()),
            status = response.status().as_u16(),
            outcome = outcome.as_str(),
            profile = self.profile,
            "bundle endpoint request"
        );
        response
    }

    /// The current bundle as a SPIFFE bundle document.
    async fn bundle_document(&self) -> (Outcome, Response<Full<Bytes>>) {
        let mut bundle = self.source.bundle().await;
        bundle.refresh_hint = Some(self.refresh_hint.as_secs());
        match bundle.to_spiffe_json() {
            Ok(json) => {
                let mut r = Response::new(Full::new(Bytes::from(json)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                (Outcome::Ok, r)
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    sequence = bundle.sequence_number,
                    "bundle endpoint: the trust bundle cannot be written as a SPIFFE bundle"
                );
                (
                    Outcome::Error,
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal error: the trust bundle cannot be served\n",
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
