//! A small HTTPS/1.1 client for JSON APIs: the Kubernetes API server (TokenReview, the bundle
//! publisher's ConfigMap), the kubelet (pod list), OIDC discovery / JWKS documents and SPIFFE
//! federation bundle endpoints.
//!
//! hyper does the HTTP, rustls the TLS (verified against the roots the caller gives — a cluster
//! CA, a kubelet CA — or by the verifier of a caller's own [`rustls::ClientConfig`]
//! ([`HttpsClient::with_tls_config`]), never the system store implicitly); every request has a
//! deadline and a response-size cap ([`MAX_BODY`], or [`HttpsClient::with_max_body`]), so a stuck
//! or hostile endpoint costs a bounded wait and bounded memory.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Largest response body read (a kubelet pod list on a busy node is a few MiB).
pub const MAX_BODY: usize = 32 * 1024 * 1024;
/// `Content-Type` of a JSON body.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `Content-Type` of a JSON merge patch (RFC 7386), as the Kubernetes API server takes it.
pub const CONTENT_TYPE_MERGE_PATCH: &str = "application/merge-patch+json";

/// Why an HTTPS request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// The URL breaks one of the client's rules (scheme, host).
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The URL does not parse.
    #[error("invalid URL {url:?}: {source}")]
    UrlSyntax {
        /// The URL.
        url: String,
        /// The parser's error.
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    /// The URL's host cannot name a TLS server.
    #[error("invalid URL {url:?}: host is not a DNS name or IP address: {source}")]
    BadHost {
        /// The URL.
        url: String,
        /// Why the host is not a server name.
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// The trust roots are unusable.
    #[error("invalid TLS roots: {0}")]
    Roots(#[source] RootsError),
    /// TCP connect, TLS handshake or HTTP exchange failed.
    #[error("{url}: {step}: {source}")]
    Transport {
        /// The URL.
        url: String,
        /// Which step failed.
        step: Step,
        /// The underlying error (`std::io::Error` for [`Step::Connect`] and
        /// [`Step::TlsHandshake`], `hyper::Error` for the HTTP steps).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No answer within the deadline.
    #[error("{url}: no answer within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The response body is larger than the client's cap.
    #[error("{url}: the response body is larger than {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The cap, in bytes.
        limit: usize,
    },
    /// A non-2xx status.
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The start of the body, for the message.
        body: String,
    },
    /// The body is not the expected JSON.
    #[error("{url}: unexpected response: {source}")]
    Json {
        /// The URL.
        url: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The request body could not be serialised as JSON.
    #[error("{url}: cannot encode the request body as JSON: {source}")]
    Encode {
        /// The URL.
        url: String,
        /// The serialiser's error.
        #[source]
        source: serde_json::Error,
    },
}

/// The step of an exchange that failed ([`HttpsError::Transport`]); callers pick their hint by
/// it (a TLS handshake failure points at the CA, a connect failure at the address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The TCP connection.
    Connect,
    /// The TLS handshake (server certificate not trusted, wrong host name, ...).
    TlsHandshake,
    /// The HTTP/1.1 connection setup.
    HttpHandshake,
    /// Building the request (a header value that HTTP cannot carry).
    BuildRequest,
    /// Sending the request and waiting for the response head.
    Request,
    /// Reading the response body (cut off; one larger than the cap is [`HttpsError::TooLarge`]).
    ReadBody,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::TlsHandshake => "TLS handshake",
            Self::HttpHandshake => "HTTP handshake",
            Self::BuildRequest => "building the request",
            Self::Request => "request",
            Self::ReadBody => "reading the body",
        })
    }
}

/// Why the trust roots of an [`HttpsClient`] are unusable.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    /// No CA certificate at all.
    #[error("no CA certificates given")]
    Empty,
    /// The PEM text holds no usable certificate.
    #[error("{0}")]
    Pem(#[source] crate::x509::X509Error),
    /// A certificate rustls cannot use as a trust anchor.
    #[error("CA certificate #{index}: {source}")]
    Certificate {
        /// Position of the certificate (0-based).
        index: usize,
        /// What rustls reported.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the TLS configuration.
    #[error("{0}")]
    Config(#[source] rustls::Error),
}

impl HttpsError {
    /// The HTTP status of a [`HttpsError::Status`]; `None` for the other errors.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An HTTPS client trusting a fixed set of roots (or, only when asked for with
/// [`HttpsClient::plain_http`], a plain-HTTP client).
#[derive(Clone)]
pub struct HttpsClient {
    /// `None`: the explicit plain-HTTP client, which refuses `https://` URLs (and the TLS client
    /// refuses `http://`: one never falls back to the other).
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("tls", &self.tls.is_some())
            .field("timeout", &self.timeout)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl HttpsClient {
    /// A client verifying servers against `roots_der` (DER CA certificates).
    pub fn new(roots_der: &[Vec<u8>], timeout: Duration) -> Result<Self, HttpsError> {
        let mut roots = rustls::RootCertStore::empty();
        for (index, der) in roots_der.iter().enumerate() {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|source| HttpsError::Roots(RootsError::Certificate { index, source }))?;
        }
        if roots.is_empty() {
            return Err(HttpsError::Roots(RootsError::Empty));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Roots(RootsError::Config(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self::with_tls_config(config, timeout))
    }

    /// A client using `config` as it is: its verifier decides which servers are trusted (e.g.
    /// a SPIFFE ID check, or Web PKI roots with host-name verification). The client speaks
    /// HTTP/1.1; `config` should offer no ALPN protocol or `http/1.1`.
    pub fn with_tls_config(config: rustls::ClientConfig, timeout: Duration) -> Self {
        Self {
            tls: Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
            timeout,
            max_body: MAX_BODY,
        }
    }

    /// The same client with another response-size cap (bytes; [`MAX_BODY`] by default).
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// A client for plain `http://` URLs only: nothing is encrypted or authenticated. For
    /// endpoints an operator explicitly chose to reach without TLS (the kubelet's read-only
    /// port); it refuses `https://` URLs rather than skipping their verification.
    pub fn plain_http(timeout: Duration) -> Self {
        Self {
            tls: None,
            timeout,
            max_body: MAX_BODY,
        }
    }

    /// A client verifying servers against the PEM CA certificates in `pem`.
    pub fn from_pem(pem: &str, timeout: Duration) -> Result<Self, HttpsError> {
        let roots =
            crate::x509::parse_pem_certs(pem).map_err(|e| HttpsError::Roots(RootsError::Pem(e)))?;
        Self::new(&roots, timeout)
    }

    /// Sends one request with an optional JSON body; returns the body of a 2xx answer (others
    /// are [`HttpsError::Status`]).
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        json_body: Option<Vec<u8>>,
    ) -> Result<Bytes, HttpsError> {
        let body = json_body.map(|b| (CONTENT_TYPE_JSON, b));
        self.request_with(method, url, bearer, body).await
    }

    /// Sends one request with an optional body of the given `Content-Type` (e.g.
    /// [`CONTENT_TYPE_MERGE_PATCH`]); returns the body of a 2xx answer (others are
    /// [`HttpsError::Status`]).
    pub async fn request_with(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Bytes, HttpsError> {
        let (status, body) = self.send(method, url, bearer, body).await?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
            return Err(HttpsError::Status {
                url: url.to_string(),
                status,
                body: text,
            });
        }
        Ok(body)
    }

    /// GETs `url` and returns the status and body, whatever the status (for callers with their
    /// own rules about it); transport failures, the deadline and the size cap are still errors.
    pub async fn get_with_status(&self, url: &str) -> Result<(StatusCode, Bytes), HttpsError> {
        self.send(Method::GET, url, None, None).await
    }

    /// One exchange within the deadline.
    async fn send(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Bytes), HttpsError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, url, bearer, body)).await {
            Ok(r) => r,
            Err(_) => Err(HttpsError::Timeout {
                url: url.to_string(),
                timeout: self.timeout,
            }),
        }
    }

    /// GETs `url` and parses the JSON body.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        bearer: Option<&str>,
    ) -> Result<T, HttpsError> {
        let body = self.request(Method::GET, url, bearer, None).await?;
        parse_json(url, &body)
    }

    /// POSTs `body` as JSON to `url` and parses the JSON answer.
    pub async fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: &B,
    ) -> Result<T, HttpsError> {
        self.send_json(Method::POST, url, bearer, CONTENT_TYPE_JSON, body)
            .await
    }

    /// Sends `body` serialised as JSON with `method` (`POST`, `PUT`, `PATCH`) and the given
    /// `Content-Type` ([`CONTENT_TYPE_JSON`], [`CONTENT_TYPE_MERGE_PATCH`]), and parses the JSON
    /// answer.
    pub async fn send_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        content_type: &str,
        body: &B,
    ) -> Result<T, HttpsError> {
        let bytes = serde_json::to_vec(body).map_err(|source| HttpsError::Encode {
            url: url.to_string(),
            source,
        })?;
        let answer = self
            .request_with(method, url, bearer, Some((content_type, bytes)))
            .await?;
        parse_json(url, &answer)
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Bytes), HttpsError> {
        let bad = |reason: &'static str| HttpsError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let transport = |step: Step| {
            move |e: Box<dyn std::error::Error + Send + Sync>| HttpsError::Transport {
                url: url.to_string(),
                step,
                source: e,
            }
        };
        let uri: Uri = url.parse().map_err(|source| HttpsError::UrlSyntax {
            url: url.to_string(),
            source,
        })?;
        let default_port = match (&self.tls, uri.scheme_str()) {
            (Some(_), Some("https")) => 443,
            (None, Some("http")) => 80,
            (Some(_), _) => return Err(bad("only https:// URLs are allowed")),
            (None, _) => return Err(bad("this plain-HTTP client only takes http:// URLs")),
        };
        let host = uri.host().ok_or_else(|| bad("missing host"))?;
        // IPv6 literals come bracketed in URLs but not in server names.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(default_port);
        let tcp = match &self.tls {
            Some(tls) => {
                let server_name =
                    ServerName::try_from(bare_host.to_string()).map_err(|source| {
                        HttpsError::BadHost {
                            url: url.to_string(),
                            source,
                        }
                    })?;
                let tcp = TcpStream::connect((bare_host, port))
                    .await
                    .map_err(|e| transport(Step::Connect)(e.into()))?;
                let tls = tls
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| transport(Step::TlsHandshake)(e.into()))?;
                Box::new(tls) as Box<dyn Io>
            }
            None => Box::new(
                TcpStream::connect((bare_host, port))
                    .await
                    .map_err(|e| transport(Step::Connect)(e.into()))?,
            ),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| transport(Step::HttpHandshake)(e.into()))?;
        let conn_task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = uri
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str);
        let authority = uri.authority().map_or(host, |a| a.as_str());
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(token) = bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some((content_type, b)) => {
                req = req.header(hyper::header::CONTENT_TYPE, content_type);
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| transport(Step::BuildRequest)(e.into()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(Step::Request)(e.into()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpsError::TooLarge {
                        url: url.to_string(),
                        limit: self.max_body,
                    }
                } else {
                    transport(Step::ReadBody)(e)
                }
            })?
            .to_bytes();
        conn_task.abort();
        Ok((status, body))
    }
}

/// A connection: TLS over TCP, or plain TCP for [`HttpsClient::plain_http`].
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn parse_json<T: serde::de::DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, HttpsError> {
    serde_json::from_slice(body).map_err(|source| HttpsError::Json {
        url: url.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn ca_der() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn unusable_roots_say_why_and_keep_the_cause() {
        let e = HttpsClient::new(&[], TIMEOUT).unwrap_err();
        assert!(matches!(e, HttpsError::Roots(RootsError::Empty)), "{e}");
        assert!(e.to_string().contains("no CA certificates given"), "{e}");
        let e = HttpsClient::from_pem("not pem", TIMEOUT).unwrap_err();
        assert!(matches!(e, HttpsError::Roots(RootsError::Pem(_))), "{e}");
        let cause = e
            .source()
            .and_then(|c| c.source())
            .expect("the X.509 error");
        assert!(cause.downcast_ref::<crate::x509::X509Error>().is_some());
        assert!(HttpsClient::new(&[ca_der()], TIMEOUT).is_ok());
    }

    #[tokio::test]
    async fn transport_failures_name_their_step_and_keep_the_io_error() {
        let client = HttpsClient::new(&[ca_der()], TIMEOUT).unwrap();
        // Nobody listens on a port just freed: connect fails.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = client
            .request(
                Method::GET,
                &format!("https://127.0.0.1:{port}/"),
                None,
                None,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                HttpsError::Transport {
                    step: Step::Connect,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(": connect: "), "{e}");
        let io = e.source().and_then(|c| c.downcast_ref::<std::io::Error>());
        assert_eq!(
            io.map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused)
        );

        // A server that answers the ClientHello with plain HTTP: the handshake fails.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let e = client
            .request(Method::GET, &format!("https://{addr}/"), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                HttpsError::Transport {
                    step: Step::TlsHandshake,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(": TLS handshake: "), "{e}");
        assert!(e
            .source()
            .is_some_and(|c| c.downcast_ref::<std::io::Error>().is_some()));
    }

    #[tokio::test]
    async fn url_errors_are_told_apart() {
        let client = HttpsClient::new(&[ca_der()], TIMEOUT).unwrap();
        let e = client
            .request(Method::GET, "http://127.0.0.1/", None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, HttpsError::BadUrl { reason, .. } if reason.contains("https://")),
            "{e}"
        );
        let e = client
            .request(Method::GET, "https://exa mple/", None, None)
            .await
            .unwrap_err();
        assert!(matches!(e, HttpsError::UrlSyntax { .. }), "{e}");
        assert!(e.source().is_some());
    }

    #[test]
    fn a_body_that_is_not_the_expected_json_keeps_the_parser_error() {
        let e = parse_json::<Vec<u8>>("https://x/", b"{").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("https://x/: unexpected response: "),
            "{e}"
        );
        assert!(e
            .source()
            .is_some_and(|c| c.downcast_ref::<serde_json::Error>().is_some()));
    }
}
