//! End-to-end test of the federation bundle endpoint: a real `sigil-server` with
//! `--federation-bundle-endpoint-address`, fetched over `https_spiffe` as another trust domain's
//! server would (its SVID verified against `bundle show`'s roots, its SPIFFE ID checked), before
//! and after CA preparations, then stopped gracefully.

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use sigil::bundle::Bundle;
use sigil::https::{HttpsClient, HttpsError};
use sigil::tls::{ServerVerification, SpiffeServerVerifier, TrustStore};
use sigil::{SpiffeId, TrustDomain};
use sigil_testkit::{tempdir, Server};

/// The bundle endpoint's address, from the server's log.
fn endpoint_address(server: &Server) -> String {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains("federation bundle endpoint listening"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("address="))
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "no bundle endpoint address in the log:\n{}",
                server.log_text()
            )
        })
}

/// A client authenticating the endpoint as `spiffe://example.org/sigil/server` with `roots`.
fn spiffe_client(roots: &[Vec<u8>]) -> HttpsClient {
    let verifier = SpiffeServerVerifier::new(ServerVerification::Spiffe {
        trust: Arc::new(TrustStore::new(roots).expect("usable roots")),
        expected_id: SpiffeId::parse("spiffe://example.org/sigil/server").expect("an ID"),
    });
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(verifier))
    .with_no_client_auth();
    HttpsClient::with_tls_config(config, Duration::from_secs(10))
}

/// The roots `bundle show` prints.
fn shown_roots(server: &Server) -> Vec<Vec<u8>> {
    sigil::x509::parse_pem_certs(&server.cli_ok(&["bundle", "show"])).expect("PEM roots")
}

/// GETs the endpoint: the bundle and the document.
async fn fetch(server: &Server, url: &str) -> (Bundle, serde_json::Value) {
    let (status, body) = spiffe_client(&shown_roots(server))
        .get_with_status(url)
        .await
        .expect("the endpoint answers");
    assert_eq!(status, StatusCode::OK);
    let text = std::str::from_utf8(&body).expect("UTF-8");
    let td = TrustDomain::new("example.org").expect("a trust domain");
    let bundle = Bundle::from_spiffe_json(td, text).expect("a SPIFFE bundle");
    (bundle, serde_json::from_str(text).expect("JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_endpoint_serves_the_current_bundle_over_the_server_svid() {
    let dir = tempdir();
    let mut server = Server::start(
        &dir.path().join("server"),
        &[
            "--federation-bundle-endpoint-address",
            "127.0.0.1:0",
            "--federation-bundle-endpoint-refresh-hint",
            "90s",
        ],
    );
    let url = format!("https://{}/", endpoint_address(&server));

    let (bundle, doc) = fetch(&server, &url).await;
    assert_eq!(bundle.x509_authorities, shown_roots(&server));
    assert_eq!(bundle.jwt_authorities.len(), 1);
    assert_eq!(bundle.refresh_hint, Some(90));
    // The same document `bundle show --format spiffe` prints, plus the refresh hint.
    let shown: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "spiffe"]))
            .expect("bundle show --format spiffe is JSON");
    assert_eq!(doc["keys"], shown["keys"]);
    assert_eq!(doc["spiffe_sequence"], shown["spiffe_sequence"]);
    let first_sequence = bundle.sequence_number;

    // A prepared X.509 authority and JWT key are in the bundle at once, and so on the endpoint.
    server.cli_ok(&["localauthority", "x509", "prepare"]);
    server.cli_ok(&["localauthority", "jwt", "prepare"]);
    let (bundle, _) = fetch(&server, &url).await;
    assert_eq!(bundle.x509_authorities.len(), 2);
    assert_eq!(bundle.x509_authorities, shown_roots(&server));
    assert_eq!(bundle.jwt_authorities.len(), 2);
    assert!(bundle.sequence_number > first_sequence);

    // Only GET / is served.
    let client = spiffe_client(&shown_roots(&server));
    let e = client
        .request(Method::POST, &url, None, Some(b"{}".to_vec()))
        .await
        .expect_err("POST is refused");
    assert_eq!(e.status(), Some(StatusCode::METHOD_NOT_ALLOWED), "{e}");
    let e = client
        .request(Method::GET, &format!("{url}bundle"), None, None)
        .await
        .expect_err("another path is refused");
    assert!(
        matches!(e, HttpsError::Status { status, .. } if status == StatusCode::NOT_FOUND),
        "{e}"
    );

    assert!(
        server.stop().success(),
        "a graceful stop with the endpoint running"
    );
}
