//! The bundle endpoint on loopback with real TLS, fetched with [`HttpsBundleFetcher`] or raw
//! HTTP/1.1 over tokio-rustls. The helpers are shared with the fetcher's tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _, SanType,
};
use sigil::bundle::Bundle;
use sigil::spiffe_id::TrustDomain;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{watch, RwLock};

use super::*;
use crate::ca::{Ca, CaConfig};
use crate::federation::fetch::{FetchError, HttpsBundleFetcher};
use crate::federation::{EndpointProfile, FetchBundle as _};
use crate::identity::ServerIdentity;

/// Longest wait of any step of these tests (they never wait that long when things work).
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// One trust domain: its CA, its server SVID, and the bundle its endpoint serves.
pub(crate) struct Domain {
    _dir: tempfile::TempDir,
    pub td: TrustDomain,
    pub ca: Arc<Ca>,
    pub identity: ServerIdentity,
    pub source: Arc<RwLock<Bundle>>,
}

impl Domain {
    /// A fresh CA for `name`, its server SVID, and its bundle at sequence 1.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new(name).unwrap();
        let ca = Arc::new(
            Ca::load_or_create(&CaConfig::new(td.clone(), dir.path().join("ca"))).unwrap(),
        );
        let identity = ServerIdentity::issue(ca.clone(), Metrics::new()).unwrap();
        let mut bundle = ca.bundle();
        bundle.sequence_number = 1;
        Self {
            _dir: dir,
            td,
            ca,
            identity,
            source: Arc::new(RwLock::new(bundle)),
        }
    }

    /// The bundle as stored now.
    pub async fn bundle(&self) -> Bundle {
        self.source.read().await.clone()
    }

    /// The profile a client uses for this domain's `https_spiffe` endpoint.
    pub fn profile(&self) -> EndpointProfile {
        EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: crate::api::server_id(&self.td),
        }
    }

    /// An `https_spiffe` endpoint serving this domain's bundle.
    pub fn endpoint(&self, refresh_hint: Duration, metrics: Metrics) -> BundleEndpoint {
        BundleEndpoint::https_spiffe(
            self.identity.store(),
            self.source.clone(),
            refresh_hint,
            metrics,
        )
        .unwrap()
    }

    /// An X509-SVID chain and PKCS#8 key for `path` in this domain.
    pub fn svid(&self, path: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let id = self.td.id(path).unwrap();
        let svid = self
            .ca
            .sign_x509_svid(&key.subject_public_key_info(), &id, &[], None)
            .unwrap();
        (svid.chain_der, key.serialize_der())
    }
}

/// A Web PKI CA of the tests.
pub(crate) struct WebCa {
    pub der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl WebCa {
    /// A CA named `name`; `uri` is put in its URI SAN when given (as SPIFFE roots carry theirs).
    pub fn new(name: &str, uri: Option<&str>) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        if let Some(uri) = uri {
            p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        }
        let cert = p.self_signed(&key).unwrap();
        Self {
            der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A server certificate for 127.0.0.1 and `localhost`: (PEM chain, PEM PKCS#8 key).
    pub fn server_cert(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name
            .push(DnType::CommonName, "bundle endpoint");
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes `text` to `path` as a replacing writer does (new file renamed over the old one).
pub(crate) fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// An endpoint serving on loopback until [`Running::stop`].
pub(crate) struct Running {
    pub addr: SocketAddr,
    pub url: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Serves `endpoint` on a free loopback port.
    pub async fn start(endpoint: BundleEndpoint) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(endpoint.serve(listener, rx));
        Self {
            addr,
            url: format!("https://{addr}/"),
            stop,
            task,
        }
    }

    /// Shuts the endpoint down and waits for it.
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the endpoint stops on shutdown")
            .expect("the endpoint task does not panic");
    }
}

/// One raw HTTP/1.1 exchange over TLS trusting `ca_der`; the whole answer as text.
async fn raw_request(addr: SocketAddr, ca_der: &[u8], request: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, tls.read_to_end(&mut out))
        .await
        .expect("the endpoint answers and closes")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// The metric text of `metrics`.
fn metric_text(metrics: &Metrics) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
    text
}

fn requests(metrics: &Metrics, outcome: &str) -> u64 {
    let needle =
        format!("sigil_server_federation_bundle_endpoint_requests_total{{outcome=\"{outcome}\"}} ");
    metric_text(metrics)
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn https_spiffe_serves_the_current_bundle_and_follows_every_change() {
    let domain = Domain::new("a.example");
    let metrics = Metrics::new();
    let running = Running::start(domain.endpoint(Duration::from_secs(42), metrics.clone())).await;
    let fetcher = HttpsBundleFetcher::new();
    let trust = domain.bundle().await;

    let fetched = fetcher
        .fetch(&running.url, &domain.td, &domain.profile(), Some(&trust))
        .await
        .unwrap();
    let stored = domain.bundle().await;
    assert_eq!(fetched.bundle.x509_authorities, stored.x509_authorities);
    assert_eq!(fetched.bundle.jwt_authorities, stored.jwt_authorities);
    assert!(
        !fetched.bundle.jwt_authorities.is_empty(),
        "JWT keys are served too"
    );
    assert_eq!(fetched.sequence, Some(1));
    assert_eq!(fetched.refresh_hint, Some(Duration::from_secs(42)));

    // A bundle change (a new root, as a CA rotation prepares one) is served at once.
    let other = Domain::new("a.example");
    {
        let mut b = domain.source.write().await;
        b.x509_authorities
            .extend(other.ca.bundle().x509_authorities);
        b.jwt_authorities.extend(other.ca.bundle().jwt_authorities);
        b.sequence_number = 2;
    }
    let fetched = fetcher
        .fetch(&running.url, &domain.td, &domain.profile(), Some(&trust))
        .await
        .unwrap();
    assert_eq!(fetched.sequence, Some(2));
    assert_eq!(fetched.bundle.x509_authorities.len(), 2);
    assert_eq!(
        fetched.bundle.jwt_authorities,
        domain.bundle().await.jwt_authorities
    );
    assert_eq!(requests(&metrics, "ok"), 2);
    running.stop().await;
}

#[tokio::test]
async fn https_spiffe_presents_the_server_svid_current_at_each_handshake() {
    let domain = Domain::new("b.example");
    let running = Running::start(domain.endpoint(DEFAULT_REFRESH_HINT, Metrics::new())).await;
    let fetcher = HttpsBundleFetcher::new();
    let trust = domain.bundle().await;
    let fetched = fetcher
        .fetch(&running.url, &domain.td, &domain.profile(), Some(&trust))
        .await
        .unwrap();
    assert_eq!(fetched.refresh_hint, Some(DEFAULT_REFRESH_HINT));

    // Another identity in the store is what the next handshake presents.
    let (chain, key) = domain.svid("/not-the-server");
    domain.identity.store().set(chain, key).unwrap();
    let err = fetcher
        .fetch(&running.url, &domain.td, &domain.profile(), Some(&trust))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::WrongSpiffeId { found, .. } if found == "spiffe://b.example/not-the-server"),
        "{err}"
    );
    // The server SVID's rotation puts the server's ID back.
    domain.identity.rotate().unwrap();
    fetcher
        .fetch(&running.url, &domain.td, &domain.profile(), Some(&trust))
        .await
        .unwrap();
    running.stop().await;
}

/// Writes a server certificate of `ca` into `cert`/`key` in `dir`.
fn write_web_cert(ca: &WebCa, dir: &Path) -> (PathBuf, PathBuf) {
    let (cert_pem, key_pem) = ca.server_cert();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    replace_file(&cert, &cert_pem);
    replace_file(&key, &key_pem);
    (cert, key)
}

#[tokio::test]
async fn https_web_serves_the_files_and_follows_their_replacement() {
    let domain = Domain::new("c.example");
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (WebCa::new("web CA 1", None), WebCa::new("web CA 2", None));
    let (cert, key) = write_web_cert(&ca1, dir.path());
    let resolver = Arc::new(
        FileCertResolver::load(cert.clone(), key.clone(), Duration::from_millis(50)).unwrap(),
    );
    let endpoint = BundleEndpoint::https_web(
        resolver,
        domain.source.clone(),
        DEFAULT_REFRESH_HINT,
        Metrics::new(),
    )
    .unwrap();
    let running = Running::start(endpoint).await;
    let trusts_1 = HttpsBundleFetcher::with_web_roots(std::slice::from_ref(&ca1.der)).unwrap();
    let trusts_2 = HttpsBundleFetcher::with_web_roots(std::slice::from_ref(&ca2.der)).unwrap();
    let web = EndpointProfile::HttpsWeb;

    let fetched = trusts_1
        .fetch(&running.url, &domain.td, &web, None)
        .await
        .unwrap();
    assert_eq!(
        fetched.bundle.x509_authorities,
        domain.bundle().await.x509_authorities
    );
    let err = trusts_2
        .fetch(&running.url, &domain.td, &web, None)
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
        "{err}"
    );

    // Renewed files (another CA here, to tell them apart) are served without a restart.
    write_web_cert(&ca2, dir.path());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while trusts_2
        .fetch(&running.url, &domain.td, &web, None)
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken replacement (a key of another certificate) is refused and the last good kept.
    let (_, other_key) = ca1.server_cert();
    replace_file(&key, &other_key);
    tokio::time::sleep(Duration::from_millis(200)).await;
    trusts_2
        .fetch(&running.url, &domain.td, &web, None)
        .await
        .expect("still the last good certificate");
    running.stop().await;
}

#[tokio::test]
async fn only_get_slash_is_answered() {
    let domain = Domain::new("d.example");
    let dir = tempfile::tempdir().unwrap();
    let ca = WebCa::new("web CA", None);
    let (cert, key) = write_web_cert(&ca, dir.path());
    let metrics = Metrics::new();
    let endpoint = BundleEndpoint::from_config(
        &BundleEndpointConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            profile: ServedProfile::HttpsWeb {
                cert_file: cert,
                key_file: key,
            },
            refresh_hint: Duration::from_secs(7),
        },
        domain.identity.store(),
        domain.source.clone(),
        metrics.clone(),
    )
    .unwrap();
    let running = Running::start(endpoint).await;

    let ok = raw_request(running.addr, &ca.der, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{ok}"
    );
    let body = ok.split("\r\n\r\n").nth(1).unwrap();
    let doc: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(doc["spiffe_refresh_hint"], 7);
    assert_eq!(doc["spiffe_sequence"], 1);
    let keys = doc["keys"].as_array().unwrap();
    assert!(keys
        .iter()
        .any(|k| k["use"] == "x509-svid" && k["x5c"].is_array()));
    assert!(keys
        .iter()
        .any(|k| k["use"] == "jwt-svid" && k["kid"].is_string()));
    // One request per connection.
    assert!(
        ok.to_ascii_lowercase().contains("connection: close"),
        "{ok}"
    );

    for method in ["POST", "PUT", "DELETE", "HEAD"] {
        let r = raw_request(
            running.addr,
            &ca.der,
            &format!("{method} / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{method}: {r}");
        assert!(
            r.to_ascii_lowercase().contains("allow: get"),
            "{method}: {r}"
        );
    }
    for path in ["/bundle", "/metrics", "//", "/%2e%2e/"] {
        let r = raw_request(
            running.addr,
            &ca.der,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
    }
    // A request head larger than the buffer is refused, not buffered.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw_request(running.addr, &ca.der, &huge).await;
    assert!(!r.starts_with("HTTP/1.1 200"), "{r}");
    // Not HTTP at all.
    let r = raw_request(running.addr, &ca.der, "\x16\x03garbage\r\n\r\n").await;
    assert!(!r.starts_with("HTTP/1.1 200"), "{r}");

    assert_eq!(requests(&metrics, "ok"), 1);
    assert_eq!(requests(&metrics, "method_not_allowed"), 4);
    assert_eq!(requests(&metrics, "not_found"), 4);
    running.stop().await;
}

#[tokio::test]
async fn idle_and_excess_connections_are_closed() {
    let domain = Domain::new("e.example");
    let dir = tempfile::tempdir().unwrap();
    let ca = WebCa::new("web CA", None);
    let (cert, key) = write_web_cert(&ca, dir.path());
    let metrics = Metrics::new();
    let resolver = Arc::new(FileCertResolver::load(cert, key, CERT_CHECK_INTERVAL).unwrap());
    let endpoint = BundleEndpoint::https_web(
        resolver,
        domain.source.clone(),
        DEFAULT_REFRESH_HINT,
        metrics.clone(),
    )
    .unwrap()
    .with_limits(Limits {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(1),
    });
    let running = Running::start(endpoint).await;

    // A TCP connection that never starts TLS is closed after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, silent.read(&mut buf))
        .await
        .expect("closed by the endpoint")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // A TLS connection that sends no request holds the only slot, until its deadline...
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der.clone())).unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let mut idle = connector.connect(name.clone(), tcp).await.unwrap();
    // ...so another connection meanwhile is closed without an answer.
    let busy = raw_request(running.addr, &ca.der, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(busy.is_empty(), "{busy}");
    assert_eq!(requests(&metrics, "busy"), 1);
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, idle.read_to_end(&mut out))
        .await
        .expect("the idle connection is closed at its deadline")
        .ok();
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    assert_eq!(requests(&metrics, "timeout"), 1);

    // The slot is free again.
    let ok = raw_request(running.addr, &ca.der, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    running.stop().await;
}

#[test]
fn config_is_resolved_with_defaults_and_errors_name_the_key() {
    assert_eq!(resolve(None).unwrap(), None);
    let c = resolve(Some(FileBundleEndpoint::default()))
        .unwrap()
        .unwrap();
    assert_eq!(c.address, DEFAULT_ADDRESS.parse().unwrap());
    assert_eq!(c.profile, ServedProfile::HttpsSpiffe);
    assert_eq!(c.refresh_hint, DEFAULT_REFRESH_HINT);

    let c = resolve(Some(FileBundleEndpoint {
        address: Some("127.0.0.1:9443".into()),
        profile: Some("https_web".into()),
        cert_file: Some("/etc/tls/crt.pem".into()),
        key_file: Some("/etc/tls/key.pem".into()),
        refresh_hint: Some("1h30m".into()),
    }))
    .unwrap()
    .unwrap();
    assert_eq!(c.address.to_string(), "127.0.0.1:9443");
    assert_eq!(
        c.profile,
        ServedProfile::HttpsWeb {
            cert_file: "/etc/tls/crt.pem".into(),
            key_file: "/etc/tls/key.pem".into()
        }
    );
    assert_eq!(c.refresh_hint, Duration::from_secs(5400));

    for (f, expected) in [
        (
            FileBundleEndpoint {
                address: Some("localhost:8443".into()),
                ..Default::default()
            },
            "invalid federation.bundle_endpoint.address \"localhost:8443\"",
        ),
        (
            FileBundleEndpoint {
                profile: Some("https".into()),
                ..Default::default()
            },
            "invalid federation.bundle_endpoint.profile \"https\": expected \"https_spiffe\" or \"https_web\"",
        ),
        (
            FileBundleEndpoint {
                profile: Some("https_web".into()),
                key_file: Some("/k".into()),
                ..Default::default()
            },
            "federation.bundle_endpoint.cert_file is required",
        ),
        (
            FileBundleEndpoint {
                profile: Some("https_web".into()),
                cert_file: Some("/c".into()),
                ..Default::default()
            },
            "federation.bundle_endpoint.key_file is required",
        ),
        (
            FileBundleEndpoint {
                cert_file: Some("/c".into()),
                ..Default::default()
            },
            "federation.bundle_endpoint.cert_file is for profile = \"https_web\"",
        ),
        (
            FileBundleEndpoint {
                refresh_hint: Some("soon".into()),
                ..Default::default()
            },
            "invalid federation.bundle_endpoint.refresh_hint",
        ),
        (
            FileBundleEndpoint {
                refresh_hint: Some("0s".into()),
                ..Default::default()
            },
            "invalid federation.bundle_endpoint.refresh_hint: duration \"0s\" must be greater than zero",
        ),
    ] {
        let err = resolve(Some(f.clone())).expect_err(&format!("{f:?}"));
        assert!(err.to_string().contains(expected), "{f:?}: {err}");
    }
}

#[test]
fn unusable_certificate_files_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = WebCa::new("web CA", None);
    let (cert, key) = write_web_cert(&ca, dir.path());
    let missing = dir.path().join("missing.pem");
    let err =
        FileCertResolver::load(missing.clone(), key.clone(), CERT_CHECK_INTERVAL).unwrap_err();
    assert!(
        matches!(
            err,
            EndpointError::Read {
                key: "cert_file",
                ..
            }
        ),
        "{err}"
    );
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not pem").unwrap();
    let err =
        FileCertResolver::load(garbage.clone(), key.clone(), CERT_CHECK_INTERVAL).unwrap_err();
    assert!(
        matches!(
            err,
            EndpointError::Pem {
                key: "cert_file",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("federation.bundle_endpoint.cert_file"),
        "{err}"
    );
    let err = FileCertResolver::load(cert.clone(), garbage, CERT_CHECK_INTERVAL).unwrap_err();
    assert!(
        matches!(
            err,
            EndpointError::Pem {
                key: "key_file",
                ..
            }
        ),
        "{err}"
    );
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, ca.server_cert().1).unwrap();
    let err = FileCertResolver::load(cert, other_key, CERT_CHECK_INTERVAL).unwrap_err();
    assert!(matches!(err, EndpointError::Key { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("private key of the chain's first certificate"),
        "{err}"
    );
}
