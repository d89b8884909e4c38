//! A small HTTPS/1.1 client for JSON APIs: the Kubernetes API server (TokenReview, the bundle
//! publisher's ConfigMap), the kubelet (pod list) and OIDC discovery / JWKS documents.
//!
//! hyper does the HTTP, rustls the TLS (verified against the roots the caller gives — a cluster
//! CA, a kubelet CA — never the system store implicitly); every request has a deadline and a
//! response-size cap, so a stuck or hostile endpoint costs a bounded wait and bounded memory.

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
    /// The URL is not `https://host[:port]/path`.
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The trust roots are unusable.
    #[error("invalid TLS roots: {0}")]
    Roots(String),
    /// TCP connect, TLS handshake or HTTP exchange failed.
    #[error("{url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("{url}: no answer within {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The deadline.
        timeout: Duration,
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
    #[error("{url}: unexpected response: {reason}")]
    Json {
        /// The URL.
        url: String,
        /// The parse error.
        reason: String,
    },
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
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("tls", &self.tls.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpsClient {
    /// A client verifying servers against `roots_der` (DER CA certificates).
    pub fn new(roots_der: &[Vec<u8>], timeout: Duration) -> Result<Self, HttpsError> {
        let mut roots = rustls::RootCertStore::empty();
        for der in roots_der {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| HttpsError::Roots(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(HttpsError::Roots("no CA certificates given".into()));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Roots(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            tls: Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
            timeout,
        })
    }

    /// A client for plain `http://` URLs only: nothing is encrypted or authenticated. For
    /// endpoints an operator explicitly chose to reach without TLS (the kubelet's read-only
    /// port); it refuses `https://` URLs rather than skipping their verification.
    pub fn plain_http(timeout: Duration) -> Self {
        Self { tls: None, timeout }
    }

    /// A client verifying servers against the PEM CA certificates in `pem`.
    pub fn from_pem(pem: &str, timeout: Duration) -> Result<Self, HttpsError> {
        let roots =
            crate::x509::parse_pem_certs(pem).map_err(|e| HttpsError::Roots(e.to_string()))?;
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
        let bytes = serde_json::to_vec(body).map_err(|e| HttpsError::Json {
            url: url.to_string(),
            reason: e.to_string(),
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
    ) -> Result<Bytes, HttpsError> {
        let bad = |reason: &str| HttpsError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let transport = |reason: String| HttpsError::Transport {
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
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
                let server_name = ServerName::try_from(bare_host.to_string())
                    .map_err(|e| bad(&format!("host is not a DNS name or IP address: {e}")))?;
                let tcp = TcpStream::connect((bare_host, port))
                    .await
                    .map_err(|e| transport(format!("connect: {e}")))?;
                let tls = tls
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| transport(format!("TLS handshake: {e}")))?;
                Box::new(tls) as Box<dyn Io>
            }
            None => Box::new(
                TcpStream::connect((bare_host, port))
                    .await
                    .map_err(|e| transport(format!("connect: {e}")))?,
            ),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| transport(format!("HTTP handshake: {e}")))?;
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
            .map_err(|e| transport(format!("building the request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(format!("request: {e}")))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| transport(format!("reading the body: {e}")))?
            .to_bytes();
        conn_task.abort();
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
}

/// A connection: TLS over TCP, or plain TCP for [`HttpsClient::plain_http`].
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn parse_json<T: serde::de::DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, HttpsError> {
    serde_json::from_slice(body).map_err(|e| HttpsError::Json {
        url: url.to_string(),
        reason: e.to_string(),
    })
}
