//! The fetcher against real HTTPS servers on loopback: the bundle endpoint itself, and a canned
//! server answering whatever each refusal case needs.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::PrivateKeyDer;
use tokio::net::TcpListener;

use super::*;
use crate::federation::endpoint::tests::{Domain, Running, WebCa};
use crate::federation::endpoint::DEFAULT_REFRESH_HINT;
use crate::metrics::Metrics;

/// An HTTPS server (certificate of `ca` for 127.0.0.1) answering every request with `status`
/// and `body`; stopped on drop.
struct Canned {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Canned {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Canned {
    async fn start(ca: &WebCa, status: u16, body: Vec<u8>) -> Self {
        let (cert_pem, key_pem) = ca.server_cert();
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/bundle", listener.local_addr().unwrap());
        let body = Bytes::from(body);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, body) = (acceptor.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        let body = body.clone();
                        async move {
                            let mut r = hyper::Response::new(Full::new(body));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            if status == 302 {
                                r.headers_mut().insert(
                                    hyper::header::LOCATION,
                                    hyper::header::HeaderValue::from_static("https://elsewhere/"),
                                );
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { url, task }
    }
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// A bundle document for `trust_domain` with the given X.509 roots and no JWT key.
fn document(trust_domain: &str, roots: Vec<Vec<u8>>) -> Vec<u8> {
    let mut b = Bundle::new(td(trust_domain));
    b.x509_authorities = roots;
    b.sequence_number = 9;
    b.to_spiffe_json().unwrap().into_bytes()
}

/// Fetches `url` over https_web trusting `ca` only.
async fn fetch_web(ca: &WebCa, url: &str, trust_domain: &str) -> Result<FetchedBundle, FetchError> {
    HttpsBundleFetcher::with_web_roots(std::slice::from_ref(&ca.der))
        .unwrap()
        .fetch(url, &td(trust_domain), &EndpointProfile::HttpsWeb, None)
        .await
}

#[tokio::test]
async fn https_web_accepts_a_bundle_and_tells_whether_it_had_a_sequence() {
    let ca = WebCa::new("web CA", None);
    // A root without a URI SAN (an upstream CA's) is fine.
    let root = WebCa::new("upstream root", None).der;
    let server = Canned::start(&ca, 200, document("a.example", vec![root.clone()])).await;
    let fetched = fetch_web(&ca, &server.url, "a.example").await.unwrap();
    assert_eq!(fetched.bundle.x509_authorities, vec![root.clone()]);
    assert_eq!(fetched.bundle.trust_domain, td("a.example"));
    assert_eq!(fetched.sequence, Some(9));
    assert_eq!(fetched.refresh_hint, None);

    // Neither member: no sequence, no hint.
    let minimal = serde_json::json!({"keys": [{
        "use": "x509-svid", "kty": "EC",
        "x5c": [base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &root)],
    }]});
    let server = Canned::start(&ca, 200, minimal.to_string().into_bytes()).await;
    let fetched = fetch_web(&ca, &server.url, "a.example").await.unwrap();
    assert_eq!(fetched.sequence, None);
    assert_eq!(fetched.refresh_hint, None);
}

#[tokio::test]
async fn answers_that_are_not_a_usable_bundle_are_refused_by_kind() {
    let ca = WebCa::new("web CA", None);
    let own_root = WebCa::new("a root", Some("spiffe://a.example")).der;
    let foreign_root = WebCa::new("b root", Some("spiffe://b.example")).der;
    let jwt_only = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut b = Bundle::new(td("a.example"));
        b.jwt_authorities = vec![sigil::bundle::JwtAuthority::from_spki_der(
            "k1",
            &rcgen::PublicKeyData::subject_public_key_info(&key),
        )
        .unwrap()];
        b.to_spiffe_json().unwrap().into_bytes()
    };
    let cases: Vec<(u16, Vec<u8>, &str)> = vec![
        (200, b"<html>hello</html>".to_vec(), "not json"),
        (200, vec![0xff, 0xfe, b'{'], "not json"),
        (200, br#"{"a": 1}"#.to_vec(), "not a bundle"),
        (
            200,
            br#"{"keys": [{"use": "x509-svid", "x5c": ["!!"]}]}"#.to_vec(),
            "not a bundle",
        ),
        (500, b"boom".to_vec(), "status"),
        (404, b"no such page".to_vec(), "status"),
        (204, Vec::new(), "status"),
        (302, Vec::new(), "redirect"),
        (200, vec![b' '; MAX_BUNDLE_SIZE + 1], "too large"),
        (200, jwt_only, "no x509"),
        (200, br#"{"keys": []}"#.to_vec(), "no x509"),
        (
            200,
            document("b.example", vec![own_root.clone(), foreign_root]),
            "wrong trust domain",
        ),
    ];
    for (status, body, expected) in cases {
        let server = Canned::start(&ca, status, body).await;
        let err = fetch_web(&ca, &server.url, "a.example")
            .await
            .expect_err(expected);
        let msg = err.to_string();
        let fits = match expected {
            "not json" => matches!(err, FetchError::NotJson { .. }),
            "not a bundle" => matches!(err, FetchError::NotABundle { .. }),
            "status" => {
                matches!(&err, FetchError::Status { status: s, redirect: "", .. } if *s == status)
            }
            "redirect" => {
                matches!(err, FetchError::Status { status: 302, .. })
                    && msg.contains("redirects are not followed")
            }
            "too large" => matches!(
                err,
                FetchError::TooLarge {
                    limit: MAX_BUNDLE_SIZE,
                    ..
                }
            ),
            "no x509" => matches!(err, FetchError::NoX509Authorities { .. }),
            "wrong trust domain" => matches!(
                &err,
                FetchError::WrongTrustDomain { found, index: 1, .. } if found == "spiffe://b.example"
            ),
            _ => unreachable!(),
        };
        assert!(fits, "HTTP {status}, expected {expected}: {err:?}");
        assert!(
            msg.contains(&server.url),
            "the message names the URL: {msg}"
        );
    }
    // The body of an error status is shown, cut.
    let server = Canned::start(&ca, 500, vec![b'x'; 10_000]).await;
    let err = fetch_web(&ca, &server.url, "a.example").await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Status { body, .. } if body.len() == 200),
        "{err:?}"
    );
}

#[tokio::test]
async fn bad_urls_are_refused_before_connecting() {
    let fetcher = HttpsBundleFetcher::with_web_roots(&[WebCa::new("ca", None).der]).unwrap();
    for (url, reason) in [
        ("http://127.0.0.1:1/", "only https://"),
        ("https://user:pw@127.0.0.1:1/", "user info"),
        ("https:///path", ""),
        ("not a url at all", ""),
        ("", ""),
    ] {
        let err = fetcher
            .fetch(url, &td("a.example"), &EndpointProfile::HttpsWeb, None)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::BadUrl { .. }), "{url}: {err:?}");
        assert!(err.to_string().contains(reason), "{url}: {err}");
    }
}

#[tokio::test]
async fn https_spiffe_needs_the_endpoint_trust_domain_bundle() {
    let domain = Domain::new("a.example");
    let running = Running::start(domain.endpoint(DEFAULT_REFRESH_HINT, Metrics::new())).await;
    let fetcher = HttpsBundleFetcher::new();

    let err = fetcher
        .fetch(&running.url, &domain.td, &domain.profile(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::NoEndpointTrust { .. }), "{err:?}");
    assert!(err.to_string().contains("initial bundle"), "{err}");

    let elsewhere = Domain::new("b.example");
    let err = fetcher
        .fetch(
            &running.url,
            &domain.td,
            &domain.profile(),
            Some(&elsewhere.bundle().await),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::TrustForOtherDomain { .. }),
        "{err:?}"
    );

    let mut empty = domain.bundle().await;
    empty.x509_authorities.clear();
    let err = fetcher
        .fetch(&running.url, &domain.td, &domain.profile(), Some(&empty))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::UnusableTrust { .. }), "{err:?}");

    // Another CA under the same name: the endpoint's SVID does not chain to it.
    let impostor_ca = Domain::new("a.example");
    let err = fetcher
        .fetch(
            &running.url,
            &domain.td,
            &domain.profile(),
            Some(&impostor_ca.bundle().await),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::UntrustedCertificate {
                profile: "https_spiffe",
                ..
            }
        ),
        "{err:?}"
    );

    // The right CA, but another SPIFFE ID configured.
    let expected = domain.td.id("/federation/endpoint").unwrap();
    let err = fetcher
        .fetch(
            &running.url,
            &domain.td,
            &EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: expected,
            },
            Some(&domain.bundle().await),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            FetchError::WrongSpiffeId { expected, found, .. }
                if expected == "spiffe://a.example/federation/endpoint"
                    && found == "spiffe://a.example/sigil/server"
        ),
        "{err:?}"
    );

    // And a Web PKI client does not trust an SVID.
    let web = HttpsBundleFetcher::with_web_roots(&domain.bundle().await.x509_authorities).unwrap();
    let err = web
        .fetch(&running.url, &domain.td, &EndpointProfile::HttpsWeb, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::UntrustedCertificate {
                profile: "https_web",
                ..
            }
        ),
        "{err:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn https_spiffe_refuses_a_web_pki_certificate() {
    let domain = Domain::new("a.example");
    let ca = WebCa::new("web CA", None);
    let server = Canned::start(
        &ca,
        200,
        document("a.example", domain.bundle().await.x509_authorities),
    )
    .await;
    let err = HttpsBundleFetcher::new()
        .fetch(
            &server.url,
            &domain.td,
            &domain.profile(),
            Some(&domain.bundle().await),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::UntrustedCertificate {
                profile: "https_spiffe",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn unreachable_and_silent_endpoints_fail_in_bounded_time() {
    let ca = WebCa::new("web CA", None);
    let fetcher = HttpsBundleFetcher::with_web_roots(std::slice::from_ref(&ca.der))
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    // Nobody listens on a port just freed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = fetcher
        .fetch(
            &format!("https://127.0.0.1:{port}/"),
            &td("a.example"),
            &EndpointProfile::HttpsWeb,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Connect { .. }), "{err:?}");

    // A server that accepts and then says nothing.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let err = fetcher
        .fetch(&url, &td("a.example"), &EndpointProfile::HttpsWeb, None)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Timeout { .. }), "{err:?}");
    hold.abort();

    // A server that is not TLS.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/", listener.local_addr().unwrap());
    let plain = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let err = fetcher
        .fetch(&url, &td("a.example"), &EndpointProfile::HttpsWeb, None)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Tls { .. }), "{err:?}");
    plain.abort();
}

#[test]
fn without_web_roots_https_web_says_what_to_install() {
    let fetcher = HttpsBundleFetcher::with_web_roots(&[]).unwrap();
    let err = fetcher
        .tls_config("https://x/", &EndpointProfile::HttpsWeb, None)
        .unwrap_err();
    assert!(matches!(err, FetchError::NoWebRoots { .. }), "{err:?}");
    assert!(err.to_string().contains("SSL_CERT_FILE"), "{err}");
}
