//! End-to-end tests of the agent's SPIFFE Workload API with an independent client: the `spiffe`
//! crate from crates.io talks to a real `sigil-agent` (attested to a real `sigil-server`) over
//! its Unix socket. Covered: X509-SVIDs that pass the crate's X509-SVID rules and verify to the
//! bundle, rotation on an open stream, "no identity issued", the security header, JWT-SVIDs
//! validated by the agent and locally, mutual TLS between two attested processes (and a foreign
//! trust domain refused), a caller whose PID died before its call, entry changes reaching an
//! open stream, another user holding connections (capped per uid) while a registered workload is
//! served, and a stream that ends when the process that connected exits.
//!
//! Every test starts its own server and agent and bounds each wait; nothing sleeps and hopes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil::clock::{now_unix, now_unix_f64};
use sigil::proto::workload as wl;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_testkit::{agent_with_workload_entries, create_entry, tempdir};
use sigil_testkit::{Agent, Server, WorkloadAgent};
use spiffe::transport::GrpcStatusCode;
use spiffe::transport::TransportError;
use spiffe::{JwtSvid, TrustDomain, WorkloadApiClient, WorkloadApiError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_stream::{Stream, StreamExt as _};

/// The ignored helper test that runs as workload B (see [`workload_b_helper_writes_its_svid`]).
const WORKLOAD_B_HELPER: &str = "workload_b_helper_writes_its_svid";
/// Set for the workload-B child: the agent's Workload API socket.
const WORKLOAD_B_SOCKET_ENV: &str = "SIGIL_TEST_WORKLOAD_B_SOCKET";
/// Set for the workload-B child: where it writes `svid.pem`, `key.pem`, `bundle.pem`.
const WORKLOAD_B_OUT_ENV: &str = "SIGIL_TEST_WORKLOAD_B_OUT";

const WORKLOAD: &str = "spiffe://example.org/workload";

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn uid_selector() -> String {
    format!("unix:uid:{}", uid())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Awaits `fut`, failing the test with `what` if it takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

fn endpoint(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// A `spiffe` crate client on `socket`.
async fn spiffe_client(socket: &Path) -> WorkloadApiClient {
    within(
        30,
        "connecting to the Workload API",
        WorkloadApiClient::connect_to(endpoint(socket)),
    )
    .await
    .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()))
}

/// Sigil's own generated client on `socket` (no header added unless the test adds it).
async fn raw_client(socket: &Path) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    SpiffeWorkloadApiClient::new(
        within(30, "connecting (raw)", sigil::uds::connect(socket))
            .await
            .expect("connecting to the Workload API socket"),
    )
}

/// `req` with the `workload.spiffe.io: true` header.
fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        "true".parse().expect("ascii header value"),
    );
    req
}

/// The gRPC status code inside a `spiffe` crate error, if it carries one.
/// `NoIdentityIssued` is by the crate's definition PermissionDenied + "no identity issued".
fn grpc_code(e: &WorkloadApiError) -> Option<GrpcStatusCode> {
    match e {
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_) => {
            Some(GrpcStatusCode::PermissionDenied)
        }
        WorkloadApiError::Transport(TransportError::Status(s)) => Some(s.code()),
        _ => None,
    }
}

/// The error status of a unary call (an OK status if it unexpectedly succeeded).
fn unary_status<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    r.err()
        .unwrap_or_else(|| tonic::Status::ok("unexpected success"))
}

/// Asserts that the unary call `what` fails with InvalidArgument.
async fn assert_invalid_argument<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) {
    let status = unary_status(within(30, what, call).await);
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{what}: {status:?}"
    );
}

/// The error status of the FetchX509SVID call `what`: the call's own, else its first message's.
async fn x509_stream_status(
    secs: u64,
    what: &str,
    call: impl Future<
        Output = Result<tonic::Response<tonic::Streaming<wl::X509svidResponse>>, tonic::Status>,
    >,
) -> tonic::Status {
    match within(secs, what, call).await {
        Err(s) => s,
        Ok(resp) => match within(secs, "first message", resp.into_inner().message()).await {
            Err(s) => s,
            Ok(m) => panic!("{what}: expected an error, got {m:?}"),
        },
    }
}

/// Asserts that the agent refuses (InvalidArgument) to validate `token` for `audience`.
async fn assert_validation_refused(
    client: &WorkloadApiClient,
    what: &str,
    audience: &str,
    token: &str,
) {
    let err = within(60, what, client.validate_jwt_token(audience, token))
        .await
        .expect_err(what);
    assert_eq!(
        grpc_code(&err),
        Some(GrpcStatusCode::InvalidArgument),
        "{what}: {err:?}"
    );
}

/// Asserts that the `spiffe` crate call `what` was refused with "no identity issued" (the
/// crate's NoIdentityIssued: PermissionDenied whose message says so).
fn assert_no_identity<T>(what: &str, r: Result<T, WorkloadApiError>) {
    match r {
        Ok(_) => panic!("{what}: a caller matching no entry was answered"),
        Err(e) => assert!(
            matches!(e, WorkloadApiError::NoIdentityIssued),
            "{what}: expected NoIdentityIssued, got {e:?}"
        ),
    }
}

/// A server and an agent in a fresh temp dir, the agent holding SVIDs for `entries` (`extra`
/// flags go to every `entry create`). Bound as `(dir, server, w)`, they drop in the right order:
/// the agent, the server, then the dir.
fn server_and_agent(
    entries: &[(&str, &[&str])],
    extra: &[&str],
) -> (tempfile::TempDir, Server, WorkloadAgent) {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let w = agent_with_workload_entries(&server, dir.path(), entries, extra);
    (dir, server, w)
}

/// [`server_and_agent`] with one entry: [`WORKLOAD`] for this process's uid.
fn workload_for_this_uid(extra: &[&str]) -> (tempfile::TempDir, Server, WorkloadAgent) {
    server_and_agent(&[(WORKLOAD, &[uid_selector().as_str()])], extra)
}

/// Opens a `spiffe` crate X509 context stream; returns it and its first context.
async fn open_x509_stream(
    client: &WorkloadApiClient,
) -> (
    impl Stream<Item = Result<spiffe::X509Context, WorkloadApiError>> + Unpin,
    spiffe::X509Context,
) {
    let mut stream = within(30, "opening the stream", client.stream_x509_contexts())
        .await
        .expect("stream_x509_contexts");
    let first = within(60, "first X509 context", stream.next())
        .await
        .expect("the stream ends before its first message")
        .expect("first context");
    (stream, first)
}

/// The next context on `stream` before `deadline`; fails the test with `what` (and the agent's
/// log) if none comes by then or the stream ends.
async fn next_context_before(
    stream: &mut (impl Stream<Item = Result<spiffe::X509Context, WorkloadApiError>> + Unpin),
    deadline: Instant,
    what: &str,
    agent: &Agent,
) -> spiffe::X509Context {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}; agent log:\n{}", agent.log_text()))
        .unwrap_or_else(|| panic!("the stream ended ({what})"))
        .expect("stream message")
}

/// The SPIFFE IDs in an X509 context, default first.
fn ids_of(ctx: &spiffe::X509Context) -> Vec<String> {
    ctx.svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect()
}

/// The example.org roots (DER) in a bundle set.
fn example_org_roots(bundles: &spiffe::X509BundleSet) -> Vec<Vec<u8>> {
    bundles
        .get(&example_org())
        .expect("an example.org bundle")
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect()
}

/// An SVID's certificate chain (DER), leaf first.
fn chain_der(svid: &spiffe::X509Svid) -> Vec<Vec<u8>> {
    svid.cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect()
}

fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v
}

/// Leaf serial (lowercase hex) and validity (Unix seconds) of a DER certificate.
fn serial_and_validity(der: &[u8]) -> (String, i64, i64) {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("parsing certificate");
    (
        hex_of(c.raw_serial()),
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    )
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The roots the server itself publishes (`bundle show`), DER.
fn server_roots(server: &Server) -> Vec<Vec<u8>> {
    sigil::x509::parse_pem_certs(&server.cli_ok(&["bundle", "show"])).expect("bundle PEM")
}

fn example_org() -> TrustDomain {
    TrustDomain::new("example.org").expect("trust domain")
}

/// Verifies every signature along `chain` (leaf first) up to one of `roots` with x509-parser,
/// independently of webpki.
fn verify_signatures_to_roots(chain: &[Vec<u8>], roots: &[Vec<u8>]) {
    fn parse(d: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
        x509_parser::parse_x509_certificate(d)
            .expect("certificate")
            .1
    }
    let chain_certs: Vec<_> = chain.iter().map(|d| parse(d)).collect();
    let root_certs: Vec<_> = roots.iter().map(|d| parse(d)).collect();
    for (i, cert) in chain_certs.iter().enumerate() {
        // Its issuer: the next certificate in the chain, else a root.
        let candidates = chain_certs[i + 1..].iter().chain(root_certs.iter());
        let issuer = candidates
            .filter(|c| c.subject() == cert.issuer())
            .find(|c| cert.verify_signature(Some(c.public_key())).is_ok());
        let Some(issuer) = issuer else {
            panic!(
                "certificate {i} of the chain ({}) is not signed by the next one or a bundle root",
                cert.subject()
            );
        };
        if root_certs.iter().any(|r| r.subject() == issuer.subject()) {
            return;
        }
    }
    panic!("the chain does not end at a bundle root");
}

// ---------------------------------------------------------------------------------------------
// 1. X509-SVID by uid
// ---------------------------------------------------------------------------------------------

#[test]
fn x509_svid_by_uid_passes_spec_checks_and_verifies() {
    let (_dir, server, w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();
    let roots_from_server = server_roots(&server);

    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        // The crate's parser enforces the X509-SVID leaf rules (CA=false, digitalSignature,
        // neither keyCertSign nor cRLSign) and a single SPIFFE URI SAN with a path.
        let svid = within(60, "FetchX509SVID", client.fetch_x509_svid())
            .await
            .unwrap_or_else(|e| panic!("fetch_x509_svid: {e}\n{}", w.agent.log_text()));
        assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);

        let ctx = within(60, "FetchX509SVID (context)", client.fetch_x509_context())
            .await
            .expect("fetch_x509_context");
        assert_eq!(ctx.svids().len(), 1, "one entry matches, one SVID");
        let roots = example_org_roots(ctx.bundle_set());
        let roots_from_server = sorted(roots_from_server);
        assert_eq!(
            sorted(roots.clone()),
            roots_from_server,
            "Workload API bundle == the server's `bundle show`"
        );

        // FetchX509Bundles agrees.
        let bundles = within(60, "FetchX509Bundles", client.fetch_x509_bundles())
            .await
            .expect("fetch_x509_bundles");
        assert_eq!(sorted(example_org_roots(&bundles)), roots_from_server);

        // The chain verifies to the bundle: with webpki (sigil's verifier, both usages) and
        // signature by signature with x509-parser.
        let chain = chain_der(&svid);
        let id = sigil::x509::verify_x509_svid(&chain, &roots, SystemTime::now())
            .expect("the SVID chains to the bundle");
        assert_eq!(id.to_string(), WORKLOAD);
        verify_signatures_to_roots(&chain, &roots);
        // Another CA does not verify it.
        let foreign = ForeignCa::new("other.org");
        assert!(sigil::x509::verify_x509_svid(
            &chain,
            std::slice::from_ref(&foreign.cert_der),
            SystemTime::now()
        )
        .is_err());

        // Leaf extensions, explicitly.
        let (_, leaf) =
            x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).expect("leaf parses");
        let bc = leaf
            .basic_constraints()
            .expect("basicConstraints parses")
            .expect("basicConstraints is present");
        assert!(!bc.value.ca, "leaf is not a CA");
        let ku = leaf
            .key_usage()
            .expect("keyUsage parses")
            .expect("keyUsage is present");
        assert!(ku.critical, "keyUsage is critical");
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let now = now_unix();
        assert!(leaf.validity().not_before.timestamp() <= now);
        assert!(leaf.validity().not_after.timestamp() > now);

        // The private key is the leaf's.
        let provider = rustls::crypto::ring::default_provider();
        let key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                svid.private_key().as_bytes().to_vec(),
            )))
            .expect("the PKCS#8 key loads");
        let certs = chain.iter().cloned().map(CertificateDer::from).collect();
        rustls::sign::CertifiedKey::new(certs, key)
            .keys_match()
            .expect("the private key matches the leaf");
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Rotation on an open stream
// ---------------------------------------------------------------------------------------------

#[test]
fn rotation_reaches_the_stream_before_expiry() {
    // The shortest TTL the server accepts: the rotation comes after 24-30 s.
    const TTL: i64 = 60;
    let (_dir, _server, w) = workload_for_this_uid(&["--x509-svid-ttl", "1m"]);
    let socket = w.agent.socket_path();

    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        let (mut stream, first) = open_x509_stream(&client).await;
        let svid = first.default_svid().expect("a default SVID");
        assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);
        let (serial1, _, not_after1) = serial_and_validity(svid.leaf().as_bytes());
        // The entry's TTL was applied (not_before is backdated, so compare to now).
        assert!(
            not_after1 <= now_unix() + TTL + 1,
            "not_after {not_after1} is later than now + {TTL} s"
        );
        let issued1 = not_after1 - TTL;

        let deadline = Instant::now() + Duration::from_secs((TTL + 20) as u64);
        let what = format!("no rotated SVID on the stream within {} s", TTL + 20);
        loop {
            let msg = next_context_before(&mut stream, deadline, &what, &w.agent).await;
            let arrived = now_unix_f64();
            let svid = msg.default_svid().expect("a default SVID");
            assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);
            let (serial2, _, not_after2) = serial_and_validity(svid.leaf().as_bytes());
            if serial2 == serial1 {
                continue;
            }
            let since_issue = arrived - issued1 as f64;
            println!(
                "rotated SVID arrived {since_issue:.1} s after the first was issued, \
                 {:.1} s before it expired",
                not_after1 as f64 - arrived
            );
            assert!(
                arrived < not_after1 as f64,
                "the new SVID arrived after the old one expired"
            );
            // Refresh is at 40-50 % of the lifetime (24-30 s of 60), timestamps are whole
            // seconds: 22 s leaves room for truncation.
            assert!(
                since_issue >= 22.0,
                "rotated too early: {since_issue:.1} s into a {TTL} s lifetime"
            );
            assert!(not_after2 > not_after1, "the new SVID lives longer");
            break;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 3. No identity
// ---------------------------------------------------------------------------------------------

#[test]
fn unregistered_caller_gets_permission_denied() {
    let other = format!("unix:uid:{}", uid() + 12345);
    let (_dir, _server, w) = server_and_agent(&[(WORKLOAD, &[other.as_str()])], &[]);
    let socket = w.agent.socket_path();

    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        // No SVID, no bundles, no JWT-SVID for a caller without identity.
        let what = "FetchX509SVID";
        assert_no_identity(what, within(60, what, client.fetch_x509_svid()).await);
        let what = "FetchX509Bundles";
        assert_no_identity(what, within(60, what, client.fetch_x509_bundles()).await);
        let what = "FetchJWTBundles";
        assert_no_identity(what, within(60, what, client.fetch_jwt_bundles()).await);
        let what = "FetchJWTSVID";
        let jwt = client.fetch_jwt_svid(["my-service"], None);
        assert_no_identity(what, within(60, what, jwt).await);

        // The raw status, as any SPIFFE client sees it.
        let mut raw = raw_client(&socket).await;
        let status = x509_stream_status(
            60,
            "raw FetchX509SVID",
            raw.fetch_x509svid(with_header(wl::X509svidRequest {})),
        )
        .await;
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("no identity issued"),
            "{status:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Security header and argument checks
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_security_header_is_invalid_argument() {
    let (_dir, _server, w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();

    runtime().block_on(async {
        let mut raw = raw_client(&socket).await;
        // FetchX509SVID without the header, or with another value (which is no header).
        let mut wrong_value = tonic::Request::new(wl::X509svidRequest {});
        wrong_value
            .metadata_mut()
            .insert("workload.spiffe.io", "yes".parse().expect("ascii"));
        for (what, req) in [
            (
                "FetchX509SVID without header",
                tonic::Request::new(wl::X509svidRequest {}),
            ),
            ("FetchX509SVID header=yes", wrong_value),
        ] {
            let status = x509_stream_status(30, what, raw.fetch_x509svid(req)).await;
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{what}: {status:?}"
            );
            assert!(
                status.message().contains("security header"),
                "{what}: {status:?}"
            );
        }

        // FetchJWTSVID without the header; with the header but no audience, or only an empty
        // one.
        let jwt = |audience: &[&str]| wl::JwtsvidRequest {
            audience: audience.iter().map(|a| a.to_string()).collect(),
            spiffe_id: String::new(),
        };
        for (what, req) in [
            (
                "FetchJWTSVID without header",
                tonic::Request::new(jwt(&["my-service"])),
            ),
            ("FetchJWTSVID without audience", with_header(jwt(&[]))),
            (
                "FetchJWTSVID with an empty audience",
                with_header(jwt(&[""])),
            ),
        ] {
            assert_invalid_argument(what, raw.fetch_jwtsvid(req)).await;
        }

        // ValidateJWTSVID with an empty token, and without the header.
        let validate = |svid: &str| wl::ValidateJwtsvidRequest {
            audience: "my-service".into(),
            svid: svid.into(),
        };
        for (what, req) in [
            (
                "ValidateJWTSVID with an empty token",
                with_header(validate("")),
            ),
            (
                "ValidateJWTSVID without header",
                tonic::Request::new(validate("a.b.c")),
            ),
        ] {
            assert_invalid_argument(what, raw.validate_jwtsvid(req)).await;
        }

        // Control: with the header the same caller gets its SVID on the same connection.
        let resp = within(
            60,
            "FetchX509SVID with header",
            raw.fetch_x509svid(with_header(wl::X509svidRequest {})),
        )
        .await
        .expect("FetchX509SVID with the header");
        let first = within(60, "first message", resp.into_inner().message())
            .await
            .expect("first message")
            .expect("a message before the end of the stream");
        assert_eq!(first.svids.len(), 1);
        assert_eq!(first.svids[0].spiffe_id, WORKLOAD);
    });
}

// ---------------------------------------------------------------------------------------------
// 5. JWT-SVIDs
// ---------------------------------------------------------------------------------------------

#[test]
fn jwt_svid_fetch_then_validate() {
    use base64::Engine as _;
    let (_dir, _server, w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();

    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        let svid = within(
            60,
            "FetchJWTSVID",
            client.fetch_jwt_svid(["my-service"], None),
        )
        .await
        .unwrap_or_else(|e| panic!("fetch_jwt_svid: {e}\n{}", w.agent.log_text()));
        assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);
        assert_eq!(svid.audience(), ["my-service".to_string()]);
        assert!(svid.expiry().unix_timestamp() > now_unix());
        let token = svid.token().to_string();

        // The JOSE header: ES256 with a key id.
        let header_b64 = token.split('.').next().expect("a JWT has a header");
        let header: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header_b64)
                .expect("base64url header"),
        )
        .expect("JSON header");
        assert_eq!(header["alg"], "ES256", "{header}");
        let kid = header["kid"].as_str().expect("kid in the header");
        assert!(!kid.is_empty());
        assert_eq!(kid, svid.key_id());

        // The agent validates it for its audience...
        let validated = within(
            60,
            "ValidateJWTSVID",
            client.validate_jwt_token("my-service", &token),
        )
        .await
        .expect("the agent validates the token");
        assert_eq!(validated.spiffe_id().to_string(), WORKLOAD);
        // ...and not for another one.
        let what = "another audience is refused by the agent";
        assert_validation_refused(&client, what, "other-service", &token).await;
        // A tampered token is refused too.
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&parts[2])
            .expect("signature");
        sig[0] ^= 1;
        parts[2] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig);
        let tampered = parts.join(".");
        let what = "a bad signature is refused by the agent";
        assert_validation_refused(&client, what, "my-service", &tampered).await;

        // Locally, with the JWT bundles from the Workload API.
        let bundles = within(60, "FetchJWTBundles", client.fetch_jwt_bundles())
            .await
            .expect("fetch_jwt_bundles");
        let bundle = bundles
            .get(&example_org())
            .expect("an example.org JWT bundle");
        assert!(
            bundle.find_jwt_authority(kid).is_some(),
            "the bundle holds the token's key"
        );
        let local = JwtSvid::parse_and_validate(&token, &bundles, &["my-service"])
            .expect("the token verifies with the published JWT bundle");
        assert_eq!(local.spiffe_id().to_string(), WORKLOAD);
        assert!(
            JwtSvid::parse_and_validate(&token, &bundles, &["other-service"]).is_err(),
            "another audience fails locally"
        );
        assert!(
            JwtSvid::parse_and_validate(&tampered, &bundles, &["my-service"]).is_err(),
            "a tampered token fails locally"
        );

        // As many audiences as a token may carry; 10,000 is a clear InvalidArgument, asked of
        // the agent without the server.
        let mut raw = raw_client(&socket).await;
        let audiences = |n: usize| wl::JwtsvidRequest {
            audience: (0..n).map(|i| format!("service-{i}")).collect(),
            spiffe_id: String::new(),
        };
        let resp = within(
            60,
            "FetchJWTSVID, 32 audiences",
            raw.fetch_jwtsvid(with_header(audiences(32))),
        )
        .await
        .expect("32 audiences are served")
        .into_inner();
        assert_eq!(resp.svids.len(), 1);
        let status = unary_status(
            within(
                60,
                "FetchJWTSVID, 10,000 audiences",
                raw.fetch_jwtsvid(with_header(audiences(10_000))),
            )
            .await,
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("too many audiences")
                && status.message().contains("at most 32"),
            "{status:?}"
        );

        // A second fetch for the same audience is a valid token too (cached or fresh).
        let again = within(
            60,
            "FetchJWTSVID again",
            client.fetch_jwt_svid(["my-service"], None),
        )
        .await
        .expect("second fetch");
        JwtSvid::parse_and_validate(again.token(), &bundles, &["my-service"])
            .expect("second token verifies");
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Two workloads, mutual TLS
// ---------------------------------------------------------------------------------------------

/// Runs only as workload B, a copy of this test binary started by
/// `two_workloads_complete_mtls_and_foreign_peer_is_refused`: fetches B's SVID with the `spiffe`
/// crate and writes it as PEM files. Does nothing in a normal `--ignored` run.
#[test]
#[ignore = "helper: runs only as workload B, started by the mTLS test"]
fn workload_b_helper_writes_its_svid() {
    let (Some(socket), Some(out)) = (
        std::env::var_os(WORKLOAD_B_SOCKET_ENV),
        std::env::var_os(WORKLOAD_B_OUT_ENV),
    ) else {
        return;
    };
    let (socket, out) = (PathBuf::from(socket), PathBuf::from(out));
    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        let ctx = within(60, "workload B: FetchX509SVID", client.fetch_x509_context())
            .await
            .expect("workload B gets its X509 context");
        let svid = ctx.default_svid().expect("workload B has an SVID");
        let chain = chain_der(svid);
        let roots = example_org_roots(ctx.bundle_set());
        std::fs::write(out.join("svid.pem"), sigil::x509::to_pem_certs(&chain)).expect("svid");
        std::fs::write(
            out.join("key.pem"),
            sigil::x509::to_pem("PRIVATE KEY", svid.private_key().as_bytes()),
        )
        .expect("key");
        std::fs::write(out.join("bundle.pem"), sigil::x509::to_pem_certs(&roots)).expect("bundle");
        println!("workload B is {}", svid.spiffe_id());
    });
}

/// A certificate chain and its key.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    fn from_svid(svid: &spiffe::X509Svid) -> Identity {
        Identity {
            chain: chain_der(svid)
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            key: PrivateKeyDer::Pkcs8(svid.private_key().as_bytes().to_vec().into()),
        }
    }

    fn from_pem_files(dir: &Path) -> Identity {
        let chain = CertificateDer::pem_file_iter(dir.join("svid.pem"))
            .expect("svid.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("svid.pem certificates");
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).expect("key.pem");
        Identity { chain, key }
    }
}

/// A CA of another trust domain, made here, and SVIDs it signs.
struct ForeignCa {
    cert_der: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl ForeignCa {
    fn new(td: &str) -> ForeignCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{td}").try_into().expect("URI"),
        )];
        let cert = p.self_signed(&key).expect("self-signed CA");
        ForeignCa {
            cert_der: cert.der().to_vec(),
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    /// A well-formed X509-SVID for `id`, signed by this CA.
    fn svid(&self, id: &str) -> Identity {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("URI"))];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = p.signed_by(&key, &self.issuer).expect("signing the leaf");
        Identity {
            chain: vec![
                CertificateDer::from(leaf.der().to_vec()),
                CertificateDer::from(self.cert_der.clone()),
            ],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Workload A's TLS server: presents A's SVID and requires a client certificate chaining to the
/// bundle (rustls's own WebPKI client verifier, independent of sigil's); the SPIFFE ID is checked
/// after the handshake.
fn mtls_server_config(me: Identity, roots: &[Vec<u8>]) -> Arc<rustls::ServerConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(CertificateDer::from(r.clone()))
            .expect("bundle root");
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .expect("client verifier");
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(me.chain, me.key)
            .expect("server certificate"),
    )
}

/// A TLS client presenting `me` that accepts only a server whose SVID chains to `roots` and
/// carries `server_id` (sigil's SPIFFE server verifier: SVIDs have no DNS names).
fn mtls_client_config(
    me: Identity,
    roots: &[Vec<u8>],
    server_id: &str,
) -> Arc<rustls::ClientConfig> {
    let verifier = sigil::tls::SpiffeServerVerifier::new(sigil::tls::ServerVerification::Spiffe {
        trust: Arc::new(sigil::tls::TrustStore::new(roots).expect("trust store")),
        expected_id: sigil::SpiffeId::parse(server_id).expect("server SPIFFE ID"),
    });
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(me.chain, me.key)
            .expect("client certificate"),
    )
}

/// The SPIFFE ID in a peer's leaf certificate, which must belong to example.org.
fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> String {
    let leaf = certs
        .and_then(|c| c.first())
        .expect("the peer presented a certificate");
    let id = sigil::x509::check_x509_svid(leaf).expect("the peer's leaf is an X509-SVID");
    assert_eq!(id.trust_domain().name(), "example.org", "peer {id}");
    id.to_string()
}

/// Copies this test executable to `dest` and runs its workload-B helper there; returns when the
/// child exited successfully.
fn run_workload_b(dest: &Path, socket: &Path, out: &Path) {
    let mut tries = 0;
    let mut child = loop {
        let r = Command::new(dest)
            .args(["--exact", WORKLOAD_B_HELPER, "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(WORKLOAD_B_SOCKET_ENV, socket)
            .env(WORKLOAD_B_OUT_ENV, out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match r {
            Ok(c) => break c,
            // ETXTBSY: another thread of this process forked while the copy was open for
            // writing; the child's exec closes it, retry.
            Err(e) if e.raw_os_error() == Some(26) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("starting workload B: {e}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("waiting for workload B").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("workload B did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("workload B output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "workload B failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "workload B did not run its helper:\n{stdout}"
    );
}

#[test]
fn two_workloads_complete_mtls_and_foreign_peer_is_refused() {
    const A: &str = "spiffe://example.org/workload-a";
    const B: &str = "spiffe://example.org/workload-b";
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let exe_a = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .expect("this test's executable");
    let exe_b = std::fs::canonicalize(dir.path())
        .expect("temp dir")
        .join("workload-b");
    std::fs::copy(&exe_a, &exe_b).expect("copying the test executable");
    let path_a = format!("unix:path:{}", exe_a.display());
    let path_b = format!("unix:path:{}", exe_b.display());
    let sel = uid_selector();
    let w: WorkloadAgent = agent_with_workload_entries(
        &server,
        dir.path(),
        &[
            (A, &[path_a.as_str(), sel.as_str()]),
            (B, &[path_b.as_str()]),
        ],
        &[],
    );
    let socket = w.agent.socket_path();

    let out_b = dir.path().join("workload-b-out");
    std::fs::create_dir_all(&out_b).expect("out dir");
    run_workload_b(&exe_b, &socket, &out_b);
    let id_b = Identity::from_pem_files(&out_b);
    let bundle_b = sigil::x509::parse_pem_certs(
        &std::fs::read_to_string(out_b.join("bundle.pem")).expect("bundle.pem"),
    )
    .expect("bundle PEM");
    assert_eq!(
        sigil::x509::spiffe_id_of(&id_b.chain[0])
            .expect("B's leaf")
            .to_string(),
        B,
        "workload B (another executable) got B's identity"
    );

    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        let ctx = within(60, "workload A: FetchX509SVID", client.fetch_x509_context())
            .await
            .expect("workload A's context");
        assert_eq!(ids_of(&ctx), vec![A], "this process is A and only A");
        let svid_a = ctx.default_svid().expect("A's SVID").clone();
        let roots_a = example_org_roots(ctx.bundle_set());
        assert_eq!(roots_a, bundle_b, "both workloads got the same bundle");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback listener");
        let addr = listener.local_addr().expect("address");
        let acceptor = tokio_rustls::TlsAcceptor::from(mtls_server_config(
            Identity::from_svid(&svid_a),
            &roots_a,
        ));
        // A serves two connections: B's (answers with what it saw), then the foreign one.
        let server_task = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let seen = peer_id(tls.get_ref().1.peer_certificates());
                        let mut buf = [0u8; 64];
                        let n = tls.read(&mut buf).await.expect("read from client");
                        assert_eq!(&buf[..n], b"hello from B");
                        tls.write_all(format!("A sees {seen}").as_bytes())
                            .await
                            .expect("reply");
                        tls.shutdown().await.expect("close");
                        results.push(Ok(seen));
                    }
                    Err(e) => results.push(Err(e.to_string())),
                }
            }
            results
        });

        // B connects to A.
        let connector = tokio_rustls::TlsConnector::from(mtls_client_config(id_b, &bundle_b, A));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut tls = within(
            30,
            "B's handshake",
            connector.connect(ServerName::try_from("workload-a").expect("name"), tcp),
        )
        .await
        .expect("B completes the handshake with A");
        assert_eq!(peer_id(tls.get_ref().1.peer_certificates()), A, "B sees A");
        tls.write_all(b"hello from B").await.expect("write");
        let mut reply = String::new();
        within(30, "A's reply", tls.read_to_string(&mut reply))
            .await
            .expect("read reply");
        assert_eq!(reply, format!("A sees {B}"));

        // A client from another trust domain is refused by A.
        let foreign = ForeignCa::new("other.org").svid("spiffe://other.org/x");
        let connector = tokio_rustls::TlsConnector::from(mtls_client_config(foreign, &bundle_b, A));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // With TLS 1.3 the client finishes first; A's refusal arrives as an alert on read.
        let client_side = within(30, "foreign handshake", async {
            let mut tls = connector
                .connect(ServerName::try_from("workload-a").expect("name"), tcp)
                .await?;
            tls.write_all(b"hello from B").await?;
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.map(|_| buf)
        })
        .await;
        let results = within(30, "A's server task", server_task)
            .await
            .expect("server task");
        assert_eq!(results[0].as_deref(), Ok(B), "A sees B");
        let refusal = results[1]
            .as_ref()
            .expect_err("A refuses a client certificate from another trust domain");
        println!("A refused the foreign client: {refusal}");
        assert!(
            refusal.contains("UnknownIssuer") || refusal.to_lowercase().contains("issuer"),
            "{refusal}"
        );
        match client_side {
            Ok(buf) => assert!(
                buf.is_empty(),
                "the foreign client got data: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Err(e) => println!("the foreign client saw: {e}"),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 7. A caller whose process exited before its call
// ---------------------------------------------------------------------------------------------

/// Connects to the agent socket, forks, and the parent (the PID the kernel recorded) exits at
/// once; the child waits for that, then relays `proxy.sock` <-> the agent connection. Bounded:
/// it gives up after two minutes on its own.
const PROXY_PY: &str = r#"
import os, select, socket, sys, time
agent_path, proxy_path, pid_path = sys.argv[1], sys.argv[2], sys.argv[3]
up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
up.connect(agent_path)
parent = os.getpid()
if os.fork() != 0:
    os._exit(0)
deadline = time.time() + 120
while os.getppid() == parent and time.time() < deadline:
    time.sleep(0.01)
while os.path.exists("/proc/%d" % parent) and time.time() < deadline:
    time.sleep(0.01)
with open(pid_path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(pid_path + ".tmp", pid_path)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(proxy_path + ".tmp")
srv.listen(1)
os.rename(proxy_path + ".tmp", proxy_path)
srv.settimeout(max(1.0, deadline - time.time()))
try:
    conn, _ = srv.accept()
except socket.timeout:
    sys.exit(1)
peer = {conn: up, up: conn}
live = {conn, up}
while live and time.time() < deadline:
    r, _, _ = select.select(list(live), [], [], 1.0)
    for s in r:
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            live.discard(s)
            try:
                peer[s].shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            peer[s].sendall(data)
"#;

/// Kills a process (by pid) on drop.
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn exited_process_pid_cannot_be_attested() {
    let (dir, _server, w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();
    let proxy = dir.path().join("proxy.sock");
    let pid_file = dir.path().join("relay.pid");
    let script = dir.path().join("relay.py");
    std::fs::write(&script, PROXY_PY).expect("writing the relay script");

    let rt = runtime();
    // Control: this process (same uid) is entitled to the SVID.
    rt.block_on(async {
        let client = spiffe_client(&socket).await;
        let svid = within(60, "control fetch", client.fetch_x509_svid())
            .await
            .expect("the entry matches this uid");
        assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);
    });

    let mut parent = Command::new("python3")
        .arg(&script)
        .arg(&socket)
        .arg(&proxy)
        .arg(&pid_file)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 is needed for this test");
    let parent_pid = parent.id();
    let mut relay = KillOnDrop(None);
    // Reap the parent: once reaped its PID names no process at all.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = parent.try_wait().expect("waiting for python") {
            break s;
        }
        assert!(Instant::now() < deadline, "python parent did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "python parent: {status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.exists() {
        if relay.0.is_none() {
            relay.0 = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
        }
        assert!(
            Instant::now() < deadline,
            "the relay never listened on {}",
            proxy.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.0 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    assert!(relay.0.is_some(), "relay pid file");

    rt.block_on(async {
        let client = spiffe_client(&proxy).await;
        let res = within(
            60,
            "FetchX509SVID through the relay",
            client.fetch_x509_svid(),
        )
        .await;
        let err = match res {
            Ok(svid) => panic!(
                "the agent issued {} to a dead PID ({parent_pid}) through the relay",
                svid.spiffe_id()
            ),
            Err(e) => e,
        };
        let code = grpc_code(&err);
        println!("FetchX509SVID for dead pid {parent_pid}: {code:?}: {err}");
        assert!(
            matches!(
                code,
                Some(GrpcStatusCode::Unauthenticated | GrpcStatusCode::PermissionDenied)
            ),
            "expected Unauthenticated (or PermissionDenied), got {err:?}"
        );
        // A JWT-SVID is refused the same way, on the same connection.
        let res = within(
            60,
            "FetchJWTSVID through the relay",
            client.fetch_jwt_svid(["my-service"], None),
        )
        .await;
        let err = match res {
            Ok(s) => panic!("JWT-SVID {} issued to a dead PID", s.spiffe_id()),
            Err(e) => e,
        };
        println!("FetchJWTSVID for dead pid {parent_pid}: {err}");
        assert!(
            matches!(
                grpc_code(&err),
                Some(GrpcStatusCode::Unauthenticated | GrpcStatusCode::PermissionDenied)
            ),
            "{err:?}"
        );
    });
    drop(relay);
}

// ---------------------------------------------------------------------------------------------
// 8. Entry changes on an open stream
// ---------------------------------------------------------------------------------------------

#[test]
fn new_entry_reaches_an_open_stream() {
    const SECOND: &str = "spiffe://example.org/second";
    let sel = uid_selector();
    let (_dir, server, w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();

    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        let (mut stream, first) = open_x509_stream(&client).await;
        assert_eq!(ids_of(&first), vec![WORKLOAD]);
        let serial = serial_and_validity(first.svids()[0].leaf().as_bytes()).0;

        // Entry creation times are whole seconds, and equal ones are ordered by entry id: the
        // second entry must be created in a later second to be the younger one.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let t = Instant::now();
        create_entry(&server, &w.agent_id, SECOND, &[&sel], &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let ctx = loop {
            let what = "the new entry never reached the stream";
            let ctx = next_context_before(&mut stream, deadline, what, &w.agent).await;
            if ctx.svids().len() == 2 {
                break ctx;
            }
            assert_eq!(ids_of(&ctx), vec![WORKLOAD], "unexpected message");
        };
        println!("second SVID reached the open stream in {:?}", t.elapsed());
        // Default first (older entry), and the first SVID was not reissued for it.
        assert_eq!(ids_of(&ctx), vec![WORKLOAD, SECOND]);
        assert_eq!(
            serial_and_validity(ctx.svids()[0].leaf().as_bytes()).0,
            serial
        );
        // Each SVID has its own key.
        assert_ne!(
            ctx.svids()[0].private_key().as_bytes(),
            ctx.svids()[1].private_key().as_bytes()
        );
    });
}

/// The agent hashes callers' executables only while an entry has a `unix:sha256` selector: a
/// stream opened before such an entry exists is attested again when one arrives, so an entry
/// on this test binary's hash reaches it.
#[test]
fn entry_on_the_executable_hash_reaches_a_stream_attested_without_it() {
    const BY_HASH: &str = "spiffe://example.org/by-hash";
    let exe = std::env::current_exe().expect("test executable");
    let bytes = std::fs::read(&exe).expect("reading the test executable");
    let hash = hex_of(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    let (_dir, server, w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();

    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        let (mut stream, first) = open_x509_stream(&client).await;
        assert_eq!(ids_of(&first), vec![WORKLOAD]);

        let sha = format!("unix:sha256:{hash}");
        create_entry(&server, &w.agent_id, BY_HASH, &[&uid_selector(), &sha], &[]);
        // Hashing a debug test binary takes a while on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let what = "the entry on the executable's hash never reached the stream";
            let ctx = next_context_before(&mut stream, deadline, what, &w.agent).await;
            if ctx.svids().len() == 2 {
                // Both created within the same second: either may be the default.
                let mut ids = ids_of(&ctx);
                ids.sort();
                assert_eq!(ids, vec![BY_HASH, WORKLOAD]);
                break;
            }
            assert_eq!(ids_of(&ctx), vec![WORKLOAD], "unexpected message");
        }
    });
}

/// Streams hold no task of their own in the agent: their state must go when the client
/// cancels a stream (RST_STREAM on a live connection) or closes its connection.
#[test]
fn stream_state_goes_when_the_client_goes() {
    const STREAMS: &str = "sigil_agent_workload_api_streams";
    let (_dir, _server, w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();
    let wait_streams = |n: f64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = w.agent.metric(STREAMS);
            if now == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{STREAMS} is {now:?}, expected {n}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    runtime().block_on(async {
        // Two streams on one connection, one on another.
        let shared = raw_client(&socket).await;
        let other = raw_client(&socket).await;
        let mut open = Vec::new();
        for mut c in [shared.clone(), shared.clone(), other.clone()] {
            let mut s = c
                .fetch_x509svid(with_header(wl::X509svidRequest {}))
                .await
                .expect("FetchX509SVID")
                .into_inner();
            within(30, "first message", s.message())
                .await
                .expect("first message")
                .expect("a message");
            open.push(s);
        }
        tokio::task::block_in_place(|| wait_streams(3.0));
        // Cancel one stream; its connection stays open for the other.
        drop(open.remove(0));
        tokio::task::block_in_place(|| wait_streams(2.0));
        // Close the other connection.
        drop(open.pop());
        drop(other);
        tokio::task::block_in_place(|| wait_streams(1.0));
        drop(open);
        drop(shared);
        tokio::task::block_in_place(|| wait_streams(0.0));
    });
}

#[test]
fn entry_removal_ends_the_stream_with_permission_denied() {
    const SECOND: &str = "spiffe://example.org/second";
    let sel = uid_selector();
    let (_dir, server, w) = server_and_agent(
        &[(WORKLOAD, &[sel.as_str()]), (SECOND, &[sel.as_str()])],
        &[],
    );
    let socket = w.agent.socket_path();

    runtime().block_on(async {
        let client = spiffe_client(&socket).await;
        let (mut stream, first) = open_x509_stream(&client).await;
        // Both entries were created within a second or so: the agent orders them by creation
        // second, then entry id, so either may be the default.
        let order = ids_of(&first);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, vec![SECOND, WORKLOAD]);
        let entry_of = |id: &str| {
            if id == WORKLOAD {
                w.entry_ids[0].clone()
            } else {
                w.entry_ids[1].clone()
            }
        };

        // Removing the default entry: the other SVID becomes the default.
        server.cli_ok(&["entry", "delete", "--entry-id", &entry_of(&order[0])]);
        let next = within(60, "context after the first removal", stream.next())
            .await
            .expect("the stream ended after the first removal")
            .expect("a message after the first removal");
        assert_eq!(ids_of(&next), vec![order[1].clone()]);

        // Removing the last one ends the stream with "no identity issued" (PermissionDenied).
        server.cli_ok(&["entry", "delete", "--entry-id", &entry_of(&order[1])]);
        let end = within(60, "end of the stream", stream.next())
            .await
            .expect("an error before the end of the stream");
        let err = end.expect_err("no identity is left");
        assert!(
            matches!(err, WorkloadApiError::NoIdentityIssued),
            "expected PermissionDenied \"no identity issued\", got {err:?}"
        );
        assert!(
            within(30, "stream close", stream.next()).await.is_none(),
            "the stream ends after PermissionDenied"
        );
    });
}

/// Runs `sigil-agent <args>`; returns (success, stdout, stderr).
fn agent_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(sigil_testkit::binary("sigil-agent"))
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .expect("running sigil-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `sigil-agent <args> --output json`, asserting success, and parses stdout.
fn agent_cli_json(args: &[&str]) -> serde_json::Value {
    let mut v = args.to_vec();
    v.extend(["--output", "json"]);
    let (ok, stdout, stderr) = agent_cli(&v);
    assert!(ok, "sigil-agent {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
}

/// The operator tools: `api fetch x509 --write`, `api fetch jwt` + `api validate jwt`,
/// `api watch`, and `explain --pid` naming a near miss's missing selector.
#[test]
fn operator_commands_fetch_validate_watch_and_explain() {
    use std::os::unix::fs::PermissionsExt as _;
    let near_miss = format!("unix:uid:{}", uid() + 1);
    let uid_sel = uid_selector();
    let (dir, server, w) = workload_for_this_uid(&[]);
    // Created after the agent synced: a near miss the agent holds (no SVID needed for explain).
    create_entry(
        &server,
        &w.agent_id,
        "spiffe://example.org/near",
        &[&near_miss],
        &[],
    );
    let socket = w.agent.socket_path();
    let socket = socket.to_str().expect("utf-8 path");
    let out_dir = dir.path().join("svid");

    let doc = agent_cli_json(&[
        "api",
        "fetch",
        "x509",
        "--socket-path",
        socket,
        "--write",
        out_dir.to_str().expect("utf-8"),
    ]);
    assert_eq!(doc["svids"][0]["spiffe_id"], WORKLOAD, "{doc}");
    let key_mode = std::fs::metadata(out_dir.join("svid.key"))
        .expect("svid.key written")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the key file is private");
    let chain = sigil::x509::parse_pem_certs(
        &std::fs::read_to_string(out_dir.join("svid.pem")).expect("svid.pem"),
    )
    .expect("svid.pem is PEM certificates");
    let leaf = chain.first().expect("a leaf");
    assert_eq!(
        sigil::x509::spiffe_id_of(leaf)
            .expect("leaf SPIFFE ID")
            .to_string(),
        WORKLOAD
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("bundle.pem")).expect("bundle.pem"),
        server.cli_ok(&["bundle", "show"]),
        "bundle.pem is the server's bundle"
    );

    let doc = agent_cli_json(&[
        "api",
        "fetch",
        "jwt",
        "--socket-path",
        socket,
        "--audience",
        "svc-a",
    ]);
    let token = doc["svids"][0]["token"]
        .as_str()
        .expect("a token")
        .to_string();
    let validate = |audience: &'static str| {
        [
            "api",
            "validate",
            "jwt",
            "--socket-path",
            socket,
            "--audience",
            audience,
            "--svid",
            token.as_str(),
        ]
    };
    let doc = agent_cli_json(&validate("svc-a"));
    assert_eq!(doc["spiffe_id"], WORKLOAD);
    // One audience may be a bare string (as SPIRE writes it) or a one-element list.
    let aud = &doc["claims"]["aud"];
    assert!(aud == "svc-a" || aud[0] == "svc-a", "{doc}");
    let (ok, _, stderr) = agent_cli(&validate("svc-b"));
    assert!(!ok, "a token for svc-a is not valid for svc-b");
    assert!(stderr.contains("InvalidArgument"), "{stderr}");

    let (ok, stdout, stderr) =
        agent_cli(&["api", "watch", "--socket-path", socket, "--count", "1"]);
    assert!(ok, "api watch failed: {stderr}");
    assert!(
        stdout.contains(&format!("received: {WORKLOAD}")),
        "{stdout}"
    );

    // explain: this test process matches WORKLOAD and nearly matches the other entry.
    let admin = w.agent.admin_socket.to_str().expect("utf-8").to_string();
    let pid = std::process::id().to_string();
    let x = sigil_testkit::wait_for(30, "explain to see the near-miss entry", || {
        let x = agent_cli_json(&["explain", "--pid", &pid, "--admin-socket", &admin]);
        (x["near_misses"].as_array().is_some_and(|a| !a.is_empty())).then_some(x)
    });
    assert!(
        x["selectors"]
            .as_array()
            .expect("selectors")
            .iter()
            .any(|s| s == uid_sel.as_str()),
        "{x}"
    );
    assert_eq!(x["matches"][0]["spiffe_id"], WORKLOAD, "{x}");
    assert_eq!(
        x["near_misses"][0]["spiffe_id"], "spiffe://example.org/near",
        "{x}"
    );
    assert_eq!(
        x["near_misses"][0]["missing"][0]["selector"],
        near_miss.as_str(),
        "{x}"
    );
    assert_eq!(
        x["near_misses"][0]["missing"][0]["process_has"][0],
        uid_sel.as_str(),
        "{x}"
    );
    let (ok, stdout, _) = agent_cli(&["explain", "--pid", &pid, "--admin-socket", &admin]);
    assert!(ok);
    assert!(
        stdout.contains(&format!("missing {near_miss}  (process has {uid_sel})")),
        "{stdout}"
    );
    let (ok, _, stderr) = agent_cli(&["explain", "--pid", "999999999", "--admin-socket", &admin]);
    assert!(!ok, "an unknown pid is an error");
    assert!(stderr.contains("no process with pid"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 9. Connection limits: one local user cannot starve the others
// ---------------------------------------------------------------------------------------------

/// The uid (and gid) of `nobody`, for a process of another local user.
const NOBODY: u32 = 65534;

/// Opens `argv[2]` connections to the socket `argv[1]` and holds them; once all but `argv[3]`
/// of them were closed by the agent (or after 60 s) it prints how many it opened and how many
/// were closed, then holds the rest until its stdin closes (at most two minutes).
const HOG_PY: &str = r#"
import select, socket, sys, time
path, n, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        conns.append(s)
    except OSError:
        s.close()
closed = set()
deadline = time.time() + 60
while time.time() < deadline and len(closed) < len(conns) - cap:
    live = [c for c in conns if c not in closed]
    r, _, _ = select.select(live, [], [], 0.5)
    for c in r:
        try:
            if c.recv(65536, socket.MSG_DONTWAIT) == b"":
                closed.add(c)
        except BlockingIOError:
            pass
        except OSError:
            closed.add(c)
print("connected=%d closed=%d" % (len(conns), len(closed)), flush=True)
select.select([sys.stdin], [], [], 120)
"#;

/// Sets the open-files limit of process `pid` (python3's `resource.prlimit`).
fn set_open_files_limit(pid: u32, limit: u64) {
    let status = Command::new("python3")
        .args([
            "-c",
            "import resource, sys; n = int(sys.argv[2]); resource.prlimit(int(sys.argv[1]), resource.RLIMIT_NOFILE, (n, n))",
            &pid.to_string(),
            &limit.to_string(),
        ])
        .status()
        .expect("python3 is needed for this test");
    assert!(status.success(), "prlimit {pid}: {status}");
}

/// A spawned child, killed and reaped on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `api watch` outlives an agent restart: it says it lost the stream, reconnects (a line on
/// stdout) and prints the SVID the restarted agent minted.
#[test]
fn api_watch_reconnects_across_an_agent_restart() {
    let (dir, server, mut w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();
    let (out_path, err_path) = (dir.path().join("watch.out"), dir.path().join("watch.err"));
    let mut watch = ChildGuard(
        Command::new(sigil_testkit::binary("sigil-agent"))
            .args(["api", "watch", "--socket-path"])
            .arg(&socket)
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .stdout(std::fs::File::create(&out_path).expect("watch stdout"))
            .stderr(std::fs::File::create(&err_path).expect("watch stderr"))
            .spawn()
            .expect("spawning api watch"),
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let serial_of = |line: &str| {
        line.split_whitespace()
            .skip_while(|w| *w != "serial")
            .nth(1)
            .map(str::to_string)
    };
    // Generous: the agent hashes the caller's (debug, ~130 MB) executable on its first call.
    let first = sigil_testkit::wait_for(120, "the first SVID from api watch", || {
        read(&out_path)
            .lines()
            .find(|l| l.contains(&format!("received: {WORKLOAD}")))
            .and_then(serial_of)
    });

    // The agent restarts (same data dir: it re-uses its own SVID; workload SVIDs are new).
    let agent_dir = w.agent.log.parent().expect("agent dir").to_path_buf();
    assert!(w.agent.stop().success());
    w.agent = Agent::start(&server, &agent_dir, &[]);
    let out = sigil_testkit::wait_for(180, "api watch to print the SVID after the restart", || {
        let out = read(&out_path);
        let (_, after) = out.split_once("reconnected to the Workload API")?;
        after
            .lines()
            .filter(|l| l.contains(WORKLOAD))
            .filter_map(serial_of)
            .any(|s| s != first)
            .then_some(out)
    });
    assert!(
        matches!(watch.0.try_wait(), Ok(None)),
        "api watch exited: {out}\n{}",
        read(&err_path)
    );
    assert!(out.contains(&format!("rotated: {WORKLOAD}")), "{out}");
    let err = read(&err_path);
    assert!(err.contains("Workload API stream lost"), "{err}");
}

#[test]
fn another_user_holding_connections_does_not_starve_a_registered_workload() {
    use std::io::BufRead as _;
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    const CAP: usize = 20;
    const HOG: usize = 300;
    let dir = tempdir();
    // nobody must reach the socket in <dir>/agent (which the agent makes 0755).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the test dir");
    let server = Server::start(&dir.path().join("server"), &[]);
    let (token, agent_id) = sigil_testkit::join_token(&server);
    create_entry(&server, &agent_id, WORKLOAD, &[&uid_selector()], &[]);
    let agent = Agent::start(
        &server,
        &sigil_testkit::subdir(dir.path(), "agent"),
        &[
            "--join-token",
            &token,
            "--workload-api-max-connections-per-uid",
            &CAP.to_string(),
        ],
    );
    agent.wait_svids_for(&[WORKLOAD], 60);
    let socket = agent.socket_path();
    let rt = runtime();
    // Control, which also caches the hash of this test binary (the exe of the caller).
    rt.block_on(async {
        let client = spiffe_client(&socket).await;
        let svid = within(60, "control fetch", client.fetch_x509_svid())
            .await
            .expect("the entry matches this uid");
        assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);
    });

    // The agent started with this machine's open-files limit (its total connection limit is
    // derived from it); lowered now, `HOG` connections would exhaust it but for the per-uid
    // limit.
    let agent_pid = agent.child.as_ref().expect("agent running").id();
    set_open_files_limit(agent_pid, 256);

    let mut hog = ChildGuard(
        Command::new("python3")
            .args(["-c", HOG_PY])
            .arg(&socket)
            .args([HOG.to_string(), CAP.to_string()])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is needed for this test"),
    );
    let mut report = String::new();
    std::io::BufReader::new(hog.0.stdout.take().expect("hog stdout"))
        .read_line(&mut report)
        .expect("reading the hog's report");
    println!("uid {NOBODY}: {}", report.trim());

    // Another uid, with a registered entry, is served at once (a new connection).
    rt.block_on(async {
        let started = Instant::now();
        let client = spiffe_client(&socket).await;
        let svid = within(
            5,
            "fetch while uid 65534 holds connections",
            client.fetch_x509_svid(),
        )
        .await
        .unwrap_or_else(|e| panic!("fetch failed: {e}; agent log:\n{}", agent.log_text()));
        assert_eq!(svid.spiffe_id().to_string(), WORKLOAD);
        println!(
            "served in {:?} while uid {NOBODY} held its connections",
            started.elapsed()
        );
    });

    // nobody kept at most CAP; the rest were closed at accept, counted and logged sparingly.
    let connected: usize = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("connected=")?.parse().ok())
        .unwrap_or_else(|| panic!("hog report: {report:?}"));
    let closed: usize = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("closed=")?.parse().ok())
        .unwrap_or_else(|| panic!("hog report: {report:?}"));
    assert_eq!(connected, HOG, "{report}");
    assert_eq!(closed, HOG - CAP, "{report}");
    let refused = agent
        .metric("sigil_agent_workload_api_connections_refused_total")
        .expect("refused connections metric");
    assert_eq!(refused, (HOG - CAP) as f64);
    let open = agent
        .metric("sigil_agent_workload_api_connections")
        .expect("open connections metric");
    assert!(
        open >= CAP as f64 && open <= (CAP + 2) as f64,
        "open: {open}"
    );
    let log = agent.log_text();
    let lines = log.matches("too many open connections").count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} log lines for {} refusals:\n{log}",
        HOG - CAP
    );
    assert!(log.contains("uid=65534"), "{log}");
    drop(hog.0.stdin.take());
}

// ---------------------------------------------------------------------------------------------
// 10. A stream whose connecting process exits
// ---------------------------------------------------------------------------------------------

/// Connects to the agent socket (`argv[1]`) and forks. The parent, the process the kernel
/// recorded as the peer, prints the child's pid and lives until its stdin closes. The child
/// inherits the connection and relays `argv[2]` (a new socket) <-> it, as a process the fd was
/// passed to would use it. Bounded: both give up after a few minutes.
const INHERIT_PY: &str = r#"
import os, select, socket, sys, time
agent_path, proxy_path = sys.argv[1], sys.argv[2]
up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
up.connect(agent_path)
child = os.fork()
if child != 0:
    up.close()
    print(child, flush=True)
    select.select([sys.stdin], [], [], 300)
    os._exit(0)
sys.stdin.close()
deadline = time.time() + 300
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(proxy_path + ".tmp")
srv.listen(1)
os.rename(proxy_path + ".tmp", proxy_path)
srv.settimeout(120)
try:
    conn, _ = srv.accept()
except socket.timeout:
    os._exit(1)
peer = {conn: up, up: conn}
live = {conn, up}
while live and time.time() < deadline:
    r, _, _ = select.select(list(live), [], [], 1.0)
    for s in r:
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            live.discard(s)
            try:
                peer[s].shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            peer[s].sendall(data)
os._exit(0)
"#;

#[test]
fn a_stream_ends_when_the_process_that_connected_exits() {
    use std::io::BufRead as _;
    let (dir, server, w) = workload_for_this_uid(&[]);
    let socket = w.agent.socket_path();
    let proxy = dir.path().join("inherited.sock");
    let mut parent = ChildGuard(
        Command::new("python3")
            .args(["-c", INHERIT_PY])
            .arg(&socket)
            .arg(&proxy)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is needed for this test"),
    );
    let mut line = String::new();
    std::io::BufReader::new(parent.0.stdout.take().expect("parent stdout"))
        .read_line(&mut line)
        .expect("reading the child's pid");
    let _relay = KillOnDrop(Some(line.trim().parse().expect("the child's pid")));
    sigil_testkit::wait_for(30, "the relay's socket", || proxy.exists().then_some(()));

    runtime().block_on(async {
        let mut client = raw_client(&proxy).await;
        let mut stream = within(
            60,
            "FetchX509SVID over the inherited connection",
            client.fetch_x509svid(with_header(wl::X509svidRequest {})),
        )
        .await
        .expect("the connecting process is alive: served")
        .into_inner();
        let first = within(60, "first message", stream.message())
            .await
            .expect("first message")
            .expect("a message");
        assert_eq!(first.svids[0].spiffe_id, WORKLOAD);

        // The process that connected exits; its child keeps the connection and the stream.
        drop(parent.0.stdin.take());
        let status = tokio::task::block_in_place(|| parent.0.wait()).expect("waiting");
        assert!(status.success(), "parent: {status}");

        // A change that would push a new message to the stream.
        server.cli_ok(&[
            "entry",
            "update",
            "--entry-id",
            &w.entry_ids[0],
            "--hint",
            "moved",
        ]);
        let next = within(60, "the stream's next message or end", stream.message()).await;
        match next {
            Ok(Some(m)) => panic!(
                "the agent kept serving a stream whose connecting process exited: {:?}",
                m.svids
                    .iter()
                    .map(|s| (&s.spiffe_id, &s.hint))
                    .collect::<Vec<_>>()
            ),
            Ok(None) => panic!("the stream ended without a status"),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
                assert!(s.message().contains("has exited"), "{s:?}");
            }
        }
        assert!(
            within(30, "end of the stream", stream.message())
                .await
                .map_or(true, |m| m.is_none()),
            "the stream ends after Unauthenticated"
        );
    });
}
