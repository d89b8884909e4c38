//! Fetching another trust domain's bundle from its bundle endpoint: [`HttpsBundleFetcher`], the
//! [`FetchBundle`] the refresher uses.
//!
//! One fetch is one HTTPS/1.1 `GET` of the endpoint URL through [`sigil::https::HttpsClient`]
//! (connect, TLS handshake and the whole exchange within [`FETCH_TIMEOUT`], the body capped at
//! [`MAX_BUNDLE_SIZE`]), authenticated per profile:
//!
//! - `https_web`: Web PKI — the certificate chains to the system's roots (read once, when the
//!   fetcher is made, with `rustls-native-certs`: `SSL_CERT_FILE` / `SSL_CERT_DIR`, when set,
//!   replace the system store as they do for OpenSSL) and names the URL's host.
//! - `https_spiffe`: the certificate is an X509-SVID that chains to the X.509 authorities of
//!   `trust` (the bundle of the endpoint's own trust domain) and carries exactly the configured
//!   endpoint SPIFFE ID ([`sigil::tls::SpiffeServerVerifier`]); host names are not checked.
//!
//! No client certificate is sent either way. Redirects are not followed (a 3xx is refused like
//! any status but 200). The answer must be a SPIFFE bundle (`Bundle::from_spiffe_json`) with at
//! least one X.509 authority, none of which names a SPIFFE ID of another trust domain in a URI
//! SAN: a document for the wrong trust domain is refused rather than stored under the name asked
//! for. Every refusal is a [`FetchError`] variant whose message says what to check.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rustls::client::WebPkiServerVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::CertificateDer;
use sigil::bundle::{Bundle, BundleError};
use sigil::https::{HttpsClient, HttpsError, Step};
use sigil::spiffe_id::{SpiffeId, TrustDomain};
use sigil::tls::{
    ServerVerification, SpiffeServerVerifier, TlsError, TrustStore, UnexpectedServerId,
};
use x509_parser::extensions::GeneralName;

use super::{EndpointProfile, FetchBundle, FetchedBundle};

/// Deadline of one fetch: TCP connect, TLS handshake, request and the whole body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest bundle document accepted (a bundle of a few dozen keys is a few tens of KiB).
pub const MAX_BUNDLE_SIZE: usize = 1024 * 1024;
/// How much of an error body is shown in [`FetchError::Status`].
const STATUS_BODY_ECHO: usize = 200;

/// Why a bundle could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The endpoint URL is not usable (not `https://`, user info, no host, does not parse).
    #[error(
        "bundle endpoint URL {url:?}: {reason}; a bundle endpoint URL is https://HOST[:PORT]/PATH"
    )]
    BadUrl {
        /// The URL (cut for display).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `https_spiffe` needs the bundle of the endpoint's trust domain to authenticate it.
    #[error(
        "no trust bundle for {endpoint_spiffe_id} to authenticate the https_spiffe bundle \
         endpoint {url}: set the relationship's initial bundle for trust domain \
         {endpoint_trust_domain} (or fetch that trust domain's bundle first)"
    )]
    NoEndpointTrust {
        /// The URL.
        url: String,
        /// The SPIFFE ID the endpoint must present.
        endpoint_spiffe_id: String,
        /// Its trust domain, whose bundle is missing.
        endpoint_trust_domain: String,
    },
    /// The `trust` bundle given is for another trust domain than the endpoint SPIFFE ID's.
    #[error(
        "the bundle given to authenticate {endpoint_spiffe_id} is the bundle of trust domain \
         {trust_domain}; the https_spiffe endpoint is authenticated with the bundle of its own \
         trust domain"
    )]
    TrustForOtherDomain {
        /// The SPIFFE ID the endpoint must present.
        endpoint_spiffe_id: String,
        /// The trust domain of the bundle given.
        trust_domain: String,
    },
    /// The trust bundle for `https_spiffe` has no usable X.509 authority.
    #[error(
        "the trust bundle of {trust_domain} cannot authenticate the https_spiffe bundle endpoint: \
         {source}"
    )]
    UnusableTrust {
        /// The trust domain of the bundle.
        trust_domain: String,
        /// What is wrong with its roots.
        #[source]
        source: TlsError,
    },
    /// No Web PKI roots could be loaded for `https_web`.
    #[error(
        "no trusted CA certificates to authenticate the https_web bundle endpoint {url}: \
         {reason}; install the system's CA certificates (e.g. the ca-certificates package) or \
         point SSL_CERT_FILE at a PEM file of CA certificates"
    )]
    NoWebRoots {
        /// The URL.
        url: String,
        /// Why none were loaded.
        reason: String,
    },
    /// TCP connect or the HTTP exchange failed (not TLS).
    // `source` names the URL and the failed step.
    #[error("bundle endpoint {source}; check that the URL's host and port are right and the endpoint is running")]
    Connect {
        /// The URL.
        url: String,
        /// What failed, with the failed step.
        #[source]
        source: HttpsError,
    },
    /// No complete answer within the deadline.
    #[error("bundle endpoint {url}: no complete answer within {timeout:?}; check that the endpoint is reachable and serving")]
    Timeout {
        /// The URL.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The endpoint presented an X509-SVID of another SPIFFE ID than the configured one.
    #[error(
        "bundle endpoint {url} presented SPIFFE ID {found}, but {expected} was configured as its \
         endpoint SPIFFE ID; check the relationship's endpoint SPIFFE ID and that the URL points \
         at that trust domain's endpoint"
    )]
    WrongSpiffeId {
        /// The URL.
        url: String,
        /// The configured endpoint SPIFFE ID.
        expected: String,
        /// What the endpoint presented.
        found: String,
    },
    /// The endpoint's certificate did not verify for the profile.
    #[error(
        "bundle endpoint {url}: its certificate is not trusted for {profile}: {reason}; {hint}"
    )]
    UntrustedCertificate {
        /// The URL.
        url: String,
        /// `https_web` or `https_spiffe`.
        profile: &'static str,
        /// What the verifier said.
        reason: String,
        /// What to check for this profile.
        hint: &'static str,
    },
    /// The TLS handshake failed for another reason than the certificate.
    #[error("bundle endpoint {source}; check that the URL's port serves HTTPS")]
    Tls {
        /// The URL.
        url: String,
        /// The transport error.
        #[source]
        source: HttpsError,
    },
    /// Any status but 200.
    #[error("bundle endpoint {url} answered HTTP {status} (expected 200): {body:?}; check the URL's path{redirect}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
        /// A note for redirects, which are not followed.
        redirect: &'static str,
    },
    /// The body is larger than [`MAX_BUNDLE_SIZE`].
    #[error("bundle endpoint {url}: the answer is larger than {limit} bytes, which no trust bundle needs; check the URL")]
    TooLarge {
        /// The URL.
        url: String,
        /// The cap.
        limit: usize,
    },
    /// The body is not JSON.
    #[error("bundle endpoint {url}: the answer is not JSON ({reason}); check that the URL is a SPIFFE bundle endpoint")]
    NotJson {
        /// The URL.
        url: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The body is JSON but not a SPIFFE bundle.
    #[error("bundle endpoint {url}: the answer is not a SPIFFE bundle: {source}")]
    NotABundle {
        /// The URL.
        url: String,
        /// What is wrong with it.
        #[source]
        source: BundleError,
    },
    /// The bundle has no X.509 authority: nothing to verify X509-SVIDs with (and nothing to
    /// authenticate an `https_spiffe` endpoint with next time).
    #[error("bundle endpoint {url}: the bundle for {trust_domain} has no X.509 authority; it was not accepted")]
    NoX509Authorities {
        /// The URL.
        url: String,
        /// The trust domain asked for.
        trust_domain: String,
    },
    /// An X.509 authority of the bundle names another trust domain: the document is some other
    /// trust domain's bundle.
    #[error(
        "bundle endpoint {url}: X.509 authority #{index} of the bundle names {found}, not trust \
         domain {expected}; the endpoint serves another trust domain's bundle: check the \
         relationship's trust domain and endpoint URL"
    )]
    WrongTrustDomain {
        /// The URL.
        url: String,
        /// The trust domain asked for.
        expected: String,
        /// The SPIFFE ID in the authority's URI SAN.
        found: String,
        /// Position of the authority in the bundle (0-based).
        index: usize,
    },
}

/// Fetches bundles over HTTPS (both profiles of the spec).
#[derive(Clone)]
pub struct HttpsBundleFetcher {
    /// Web PKI roots for `https_web`; `Err`: why there are none.
    web_roots: Result<Arc<RootCertStore>, String>,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for HttpsBundleFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsBundleFetcher")
            .field("web_roots", &self.web_roots.as_ref().map(|r| r.len()))
            .field("timeout", &self.timeout)
            .field("max_body", &self.max_body)
            .finish()
    }
}

impl HttpsBundleFetcher {
    /// A fetcher trusting the system's CA certificates for `https_web` (`SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` when set), read now. Finding none is not an error here: `https_spiffe`
    /// does not need them, and an `https_web` fetch then fails with [`FetchError::NoWebRoots`].
    pub fn new() -> Self {
        let loaded = rustls_native_certs::load_native_certs();
        let errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
        if !errors.is_empty() || ignored > 0 {
            tracing::warn!(
                added,
                ignored,
                errors = %errors.join("; "),
                "some system CA certificates could not be loaded for https_web bundle endpoints"
            );
        }
        let web_roots = if roots.is_empty() {
            Err(if errors.is_empty() {
                "none were found".to_string()
            } else {
                errors.join("; ")
            })
        } else {
            Ok(Arc::new(roots))
        };
        Self {
            web_roots,
            timeout: FETCH_TIMEOUT,
            max_body: MAX_BUNDLE_SIZE,
        }
    }

    /// A fetcher trusting exactly `roots_der` (DER CA certificates) for `https_web`.
    pub fn with_web_roots(roots_der: &[Vec<u8>]) -> Result<Self, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for der in roots_der {
            roots.add(CertificateDer::from(der.clone()))?;
        }
        Ok(Self {
            web_roots: if roots.is_empty() {
                Err("no CA certificates were given".to_string())
            } else {
                Ok(Arc::new(roots))
            },
            timeout: FETCH_TIMEOUT,
            max_body: MAX_BUNDLE_SIZE,
        })
    }

    /// The same fetcher with another deadline per fetch ([`FETCH_TIMEOUT`] by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same fetcher with another size cap ([`MAX_BUNDLE_SIZE`] by default).
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// The TLS client configuration for one fetch: TLS 1.2 and 1.3 (the spec asks servers for
    /// Mozilla's intermediate compatibility), no ALPN (HTTP/1.1), no client certificate.
    fn tls_config(
        &self,
        url: &str,
        profile: &EndpointProfile,
        trust: Option<&Bundle>,
    ) -> Result<rustls::ClientConfig, FetchError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_setup_error(url, e))?;
        let mut config = match profile {
            EndpointProfile::HttpsWeb => {
                let roots = self
                    .web_roots
                    .clone()
                    .map_err(|reason| FetchError::NoWebRoots {
                        url: url.to_string(),
                        reason,
                    })?;
                let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| tls_setup_error(url, rustls::Error::General(e.to_string())))?;
                builder.with_webpki_verifier(verifier).with_no_client_auth()
            }
            EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                let trust = spiffe_trust(url, endpoint_spiffe_id, trust)?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                        ServerVerification::Spiffe {
                            trust: Arc::new(trust),
                            expected_id: endpoint_spiffe_id.clone(),
                        },
                    )))
                    .with_no_client_auth()
            }
        };
        // Each fetch authenticates the endpoint against the current trust afresh.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }
}

impl Default for HttpsBundleFetcher {
    fn default() -> Self {
        Self::new()
    }
}

/// The trust store for an `https_spiffe` endpoint from `trust`.
fn spiffe_trust(
    url: &str,
    endpoint_spiffe_id: &SpiffeId,
    trust: Option<&Bundle>,
) -> Result<TrustStore, FetchError> {
    let endpoint_td = endpoint_spiffe_id.trust_domain();
    let trust = trust.ok_or_else(|| FetchError::NoEndpointTrust {
        url: url.to_string(),
        endpoint_spiffe_id: endpoint_spiffe_id.to_string(),
        endpoint_trust_domain: endpoint_td.to_string(),
    })?;
    if &trust.trust_domain != endpoint_td {
        return Err(FetchError::TrustForOtherDomain {
            endpoint_spiffe_id: endpoint_spiffe_id.to_string(),
            trust_domain: trust.trust_domain.to_string(),
        });
    }
    TrustStore::new(&trust.x509_authorities).map_err(|source| FetchError::UnusableTrust {
        trust_domain: trust.trust_domain.to_string(),
        source,
    })
}

fn tls_setup_error(url: &str, e: rustls::Error) -> FetchError {
    FetchError::Tls {
        url: url.to_string(),
        source: HttpsError::Transport {
            url: url.to_string(),
            step: Step::TlsHandshake,
            source: Box::new(e),
        },
    }
}

/// The URL rules of the spec (both profiles): `https`, a host, no user info.
fn check_url(url: &str) -> Result<(), FetchError> {
    let bad = |reason: &str| FetchError::BadUrl {
        url: sigil::text::echo(url).into_owned(),
        reason: reason.to_string(),
    };
    let uri: hyper::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("only https:// URLs are allowed"));
    }
    let authority = uri.authority().ok_or_else(|| bad("the host is missing"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info (user@ or user:password@) is not allowed"));
    }
    if authority.host().is_empty() {
        return Err(bad("the host is missing"));
    }
    Ok(())
}

/// What a failed exchange means for a bundle fetch.
fn exchange_error(url: &str, profile: &EndpointProfile, e: HttpsError) -> FetchError {
    match e {
        HttpsError::BadUrl { .. } | HttpsError::UrlSyntax { .. } | HttpsError::BadHost { .. } => {
            FetchError::BadUrl {
                url: sigil::text::echo(url).into_owned(),
                reason: e.to_string(),
            }
        }
        HttpsError::Timeout { timeout, .. } => FetchError::Timeout {
            url: url.to_string(),
            timeout,
        },
        HttpsError::TooLarge { limit, .. } => FetchError::TooLarge {
            url: url.to_string(),
            limit,
        },
        HttpsError::Transport {
            step: Step::TlsHandshake,
            ref source,
            ..
        } => match handshake_rustls_error(source.as_ref()) {
            Some(rustls::Error::InvalidCertificate(ce)) => certificate_error(url, profile, ce),
            _ => FetchError::Tls {
                url: url.to_string(),
                source: e,
            },
        },
        other => FetchError::Connect {
            url: url.to_string(),
            source: other,
        },
    }
}

/// The rustls error inside a failed handshake's `io::Error`, if any.
fn handshake_rustls_error<'a>(
    e: &'a (dyn std::error::Error + Send + Sync + 'static),
) -> Option<&'a rustls::Error> {
    e.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn certificate_error(url: &str, profile: &EndpointProfile, ce: &CertificateError) -> FetchError {
    if let CertificateError::Other(other) = ce {
        if let Some(unexpected) = other.0.downcast_ref::<UnexpectedServerId>() {
            return FetchError::WrongSpiffeId {
                url: url.to_string(),
                expected: unexpected.expected.clone(),
                found: unexpected.found.clone(),
            };
        }
    }
    let (profile, hint) = match profile {
        EndpointProfile::HttpsWeb => (
            "https_web",
            "an https_web endpoint needs a certificate from a CA in the system's store (or \
             SSL_CERT_FILE) that names the URL's host",
        ),
        EndpointProfile::HttpsSpiffe { .. } => (
            "https_spiffe",
            "an https_spiffe endpoint must present an X509-SVID that chains to the trust bundle \
             held for its trust domain; if that trust domain rotated its roots while no fetch \
             succeeded, set its bundle again by hand",
        ),
    };
    FetchError::UntrustedCertificate {
        url: url.to_string(),
        profile,
        reason: rustls::Error::InvalidCertificate(ce.clone()).to_string(),
        hint,
    }
}

/// The bundle in a 200 answer's `body`, checked for `trust_domain`.
fn parse_bundle(
    url: &str,
    trust_domain: &TrustDomain,
    body: &[u8],
) -> Result<FetchedBundle, FetchError> {
    let not_json = |reason: String| FetchError::NotJson {
        url: url.to_string(),
        reason,
    };
    let text = std::str::from_utf8(body).map_err(|e| not_json(format!("not UTF-8: {e}")))?;
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| not_json(e.to_string()))?;
    let bundle = Bundle::from_spiffe_json(trust_domain.clone(), text).map_err(|source| {
        FetchError::NotABundle {
            url: url.to_string(),
            source,
        }
    })?;
    if bundle.x509_authorities.is_empty() {
        return Err(FetchError::NoX509Authorities {
            url: url.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    for (index, der) in bundle.x509_authorities.iter().enumerate() {
        if let Some(found) = foreign_spiffe_id(der, trust_domain) {
            return Err(FetchError::WrongTrustDomain {
                url: url.to_string(),
                expected: trust_domain.to_string(),
                found,
                index,
            });
        }
    }
    // The parsed bundle reads an absent member as 0 / none; the document says which it was.
    let sequence = doc
        .get("spiffe_sequence")
        .filter(|v| !v.is_null())
        .map(|_| bundle.sequence_number);
    let refresh_hint = bundle.refresh_hint.map(Duration::from_secs);
    Ok(FetchedBundle {
        bundle,
        sequence,
        refresh_hint,
    })
}

/// A SPIFFE ID of another trust domain than `td` among the certificate's URI SANs. Roots
/// without one (an upstream CA's) pass; `Bundle::from_spiffe_json` already parsed `der`.
fn foreign_spiffe_id(der: &[u8], td: &TrustDomain) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => match SpiffeId::parse(uri) {
            Ok(id) if id.trust_domain() != td => Some(id.to_string()),
            _ => None,
        },
        _ => None,
    })
}

#[async_trait]
impl FetchBundle for HttpsBundleFetcher {
    async fn fetch(
        &self,
        url: &str,
        trust_domain: &TrustDomain,
        profile: &EndpointProfile,
        trust: Option<&Bundle>,
    ) -> Result<FetchedBundle, FetchError> {
        check_url(url)?;
        let config = self.tls_config(url, profile, trust)?;
        let client =
            HttpsClient::with_tls_config(config, self.timeout).with_max_body(self.max_body);
        let (status, body) = client
            .get_with_status(url)
            .await
            .map_err(|e| exchange_error(url, profile, e))?;
        if status != hyper::StatusCode::OK {
            let shown = &body[..body.len().min(STATUS_BODY_ECHO)];
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(shown).into_owned(),
                redirect: if status.is_redirection() {
                    " (redirects are not followed: configure the URL it points to)"
                } else {
                    ""
                },
            });
        }
        parse_bundle(url, trust_domain, &body)
    }
}

#[cfg(test)]
mod tests;
