//! End-to-end test of the CA lifecycle: a real `sigil-server` with one-minute authorities
//! (`--ca-ttl 1m`: a new one prepared every 30 s, activated 20 s later), a real `sigil-agent`,
//! 200 Workload API streams read with the `spiffe` crate (over a few connections), and an mTLS
//! client/server pair of workloads (each presenting its SVID and trusting the bundle of its own
//! latest Workload API message, with `sigil::tls`) shaking hands over and over, through three
//! rotations. Every X509-SVID update on every stream must chain to the bundle of the same
//! message, no handshake may fail, and the streams see SVIDs from more than one authority;
//! `localauthority x509 taint` makes the agent re-mint every affected SVID within 5 s, `revoke`
//! takes the root out of the workloads' bundles; and the agent still gets new SVIDs from the
//! server afterwards. The same for a JWT key: tainted, its tokens are not re-used.
//!
//! Each wait is bounded; the test stops by itself.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sigil::spiffe_id::SpiffeId;
use sigil::tls::{IdentityStore, ServerVerification, TrustStore};
use sigil_testkit::{agent_with_workload_entries, create_entry, tempdir, Server};
use spiffe::WorkloadApiClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_stream::StreamExt as _;

const WORKLOAD: &str = "spiffe://example.org/rotating";
/// The mTLS pair's identities.
const MTLS_SERVER: &str = "spiffe://example.org/mtls/server";
const MTLS_CLIENT: &str = "spiffe://example.org/mtls/client";
/// Workload API streams, spread over [`CONNECTIONS`] connections.
const STREAMS: usize = 200;
const CONNECTIONS: usize = 10;
/// Authority activations the workloads live through.
const ROTATIONS: usize = 3;

fn uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::getuid().as_raw())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The subject key ID (hex) of a certificate, or its authority key ID (`aki`).
fn key_id(der: &[u8], aki: bool) -> Option<String> {
    use x509_parser::extensions::ParsedExtension;
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    c.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) if !aki => Some(hex(k.0)),
            ParsedExtension::AuthorityKeyIdentifier(k) if aki => {
                k.key_identifier.as_ref().map(|k| hex(k.0))
            }
            _ => None,
        })
}

/// What one stream saw.
#[derive(Debug, Default)]
struct Seen {
    messages: usize,
    /// Issuers (AKI) of the SVIDs received.
    issuers: BTreeSet<String>,
    /// Issuers of the latest message's SVIDs.
    latest_issuers: BTreeSet<String>,
    /// Subject key IDs of the latest message's roots.
    latest_roots: BTreeSet<String>,
    /// Messages whose SVID did not chain to their own bundle.
    failures: Vec<String>,
}

/// The state of one stream (a panicked reader leaves it readable).
fn lock(s: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One workload of the mTLS pair: its SVID and the bundle of its latest message.
struct Side {
    id: &'static str,
    identity: Arc<IdentityStore>,
    trust: Arc<TrustStore>,
}

/// Reads one X.509 context stream of `client` until it ends, checking each message; `side`, if
/// any, takes its SVID and bundle from every message.
async fn watch(client: WorkloadApiClient, seen: Arc<Mutex<Seen>>, side: Option<Arc<Side>>) {
    let mut stream = match client.stream_x509_contexts().await {
        Ok(s) => s,
        Err(e) => {
            lock(&seen)
                .failures
                .push(format!("stream_x509_contexts: {e}"));
            return;
        }
    };
    let td = spiffe::TrustDomain::new("example.org").expect("trust domain");
    while let Some(msg) = stream.next().await {
        let ctx = match msg {
            Ok(c) => c,
            Err(e) => {
                lock(&seen).failures.push(format!("stream error: {e}"));
                return;
            }
        };
        let roots: Vec<Vec<u8>> = ctx
            .bundle_set()
            .get(&td)
            .map(|b| {
                b.authorities()
                    .iter()
                    .map(|c| c.as_bytes().to_vec())
                    .collect()
            })
            .unwrap_or_default();
        let mut s = lock(&seen);
        s.messages += 1;
        let n = s.messages;
        s.latest_roots = roots.iter().filter_map(|r| key_id(r, false)).collect();
        s.latest_issuers.clear();
        for svid in ctx.svids() {
            let chain: Vec<Vec<u8>> = svid
                .cert_chain()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect();
            if let Err(e) = sigil::x509::verify_x509_svid(&chain, &roots, SystemTime::now()) {
                s.failures.push(format!(
                    "message {n}: SVID does not chain to its bundle: {e}"
                ));
            }
            let issuer = key_id(&chain[0], true).unwrap_or_default();
            s.issuers.insert(issuer.clone());
            s.latest_issuers.insert(issuer);
            if let Some(side) = side
                .as_ref()
                .filter(|d| svid.spiffe_id().to_string() == d.id)
            {
                let key = svid.private_key().as_bytes().to_vec();
                if let Err(e) = side.identity.set(chain, key) {
                    s.failures.push(format!("message {n}: the mTLS SVID: {e}"));
                }
            }
        }
        if let Some(side) = &side {
            if let Err(e) = side.trust.set(&roots) {
                s.failures
                    .push(format!("message {n}: the mTLS bundle: {e}"));
            }
        }
    }
}

/// Handshakes of the mTLS pair: how many succeeded, and what each failure said.
#[derive(Default)]
struct Handshakes {
    ok: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Handshakes {
    fn fail(&self, what: String) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(what);
    }
}

/// The mTLS server workload: answers each connection's byte with the same byte.
async fn mtls_server(
    listener: tokio::net::TcpListener,
    side: Arc<Side>,
    handshakes: Arc<Handshakes>,
) {
    let config = sigil::tls::server_config(side.identity.clone(), side.trust.clone())
        .expect("the mTLS server's TLS config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let handshakes = handshakes.clone();
        tokio::spawn(async move {
            let result = async {
                let mut tls = acceptor.accept(tcp).await?;
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await?;
                tls.write_all(&byte).await?;
                tls.shutdown().await
            }
            .await;
            if let Err(e) = result {
                handshakes.fail(format!("server side: {e}"));
            }
        });
    }
}

/// The mTLS client workload: a new connection (full handshake, no resumption) every 50 ms,
/// sending a byte and reading it back, which fails if either side refused the other.
async fn mtls_client(address: std::net::SocketAddr, side: Arc<Side>, handshakes: Arc<Handshakes>) {
    let expected = SpiffeId::parse(MTLS_SERVER).expect("SPIFFE ID");
    let config = sigil::tls::client_config(
        ServerVerification::Spiffe {
            trust: side.trust.clone(),
            expected_id: expected,
        },
        Some(side.identity.clone()),
    )
    .expect("the mTLS client's TLS config");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("mtls-server").expect("server name");
    loop {
        let result = async {
            let tcp = tokio::net::TcpStream::connect(address).await?;
            let mut tls = connector.connect(name.clone(), tcp).await?;
            tls.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            std::io::Result::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(10), result).await {
            Ok(Ok(())) => {
                handshakes.ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Err(e)) => handshakes.fail(format!("client side: {e}")),
            Err(_) => handshakes.fail("client side: no answer in 10 s".into()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `localauthority x509 show` as JSON.
fn x509_state(server: &Server) -> serde_json::Value {
    server.cli_json(&["localauthority", "x509", "show"])
}

fn active_id(state: &serde_json::Value) -> String {
    state["active"]["authority_id"]
        .as_str()
        .expect("an active authority")
        .to_string()
}

/// Polls `pred` every 200 ms until it holds; fails with `what` after `secs`.
fn wait_until(secs: u64, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn workloads_and_an_mtls_pair_follow_three_rotations_a_taint_and_a_revoke() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &["--ca-ttl", "1m"]);
    let sel = uid_selector();
    let w = agent_with_workload_entries(
        &server,
        dir.path(),
        &[
            (WORKLOAD, &[sel.as_str()]),
            (MTLS_SERVER, &[sel.as_str()]),
            (MTLS_CLIENT, &[sel.as_str()]),
        ],
        &[],
    );
    w.agent
        .wait_svids_for(&[WORKLOAD, MTLS_SERVER, MTLS_CLIENT], 60);
    let socket = w.agent.socket_path();
    let endpoint = format!("unix://{}", socket.display());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let clients: Vec<WorkloadApiClient> = (0..CONNECTIONS)
        .map(|_| {
            rt.block_on(WorkloadApiClient::connect_to(&endpoint))
                .expect("connecting to the Workload API")
        })
        .collect();
    let seen: Vec<Arc<Mutex<Seen>>> = (0..STREAMS + 2).map(|_| Arc::default()).collect();
    let mut tasks: Vec<_> = seen[..STREAMS]
        .iter()
        .enumerate()
        .map(|(i, s)| rt.spawn(watch(clients[i % CONNECTIONS].clone(), s.clone(), None)))
        .collect();

    // The mTLS pair: each workload on a connection of its own, starting from the server's
    // bundle until its first message.
    let initial_roots =
        sigil::x509::parse_pem_certs(&server.cli_ok(&["bundle", "show"])).expect("PEM bundle");
    let side = |id: &'static str| {
        Arc::new(Side {
            id,
            identity: Arc::new(IdentityStore::empty()),
            trust: Arc::new(TrustStore::new(&initial_roots).expect("the server's bundle")),
        })
    };
    let (server_side, client_side) = (side(MTLS_SERVER), side(MTLS_CLIENT));
    for (s, d) in [
        (&seen[STREAMS], &server_side),
        (&seen[STREAMS + 1], &client_side),
    ] {
        let client = rt
            .block_on(WorkloadApiClient::connect_to(&endpoint))
            .expect("connecting to the Workload API");
        tasks.push(rt.spawn(watch(client, s.clone(), Some(d.clone()))));
    }
    wait_until(30, "both mTLS workloads holding their SVIDs", || {
        server_side.identity.current().is_some() && client_side.identity.current().is_some()
    });
    let handshakes = Arc::new(Handshakes::default());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binding the mTLS server");
    let address = listener.local_addr().expect("the mTLS server's address");
    tasks.push(rt.spawn(mtls_server(listener, server_side, handshakes.clone())));
    tasks.push(rt.spawn(mtls_client(address, client_side, handshakes.clone())));

    // JWT keys: a token's key made old by hand and tainted is not re-used for the next token.
    let jwt_kid = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let svid = clients[0]
                .fetch_jwt_svid(["rotation"], None)
                .await
                .expect("fetch_jwt_svid");
            let token = svid.token().to_string();
            sigil::jose::Jws::parse(&token, token.len())
                .expect("a JWS")
                .kid()
                .expect("a kid")
                .to_string()
        })
    };
    let first_kid = jwt_kid(&rt);
    let jwt_state = server.cli_json(&["localauthority", "jwt", "show"]);
    if jwt_state["active"]["authority_id"] == first_kid.as_str() {
        server.cli_ok(&["localauthority", "jwt", "prepare"]);
        server.cli_ok(&["localauthority", "jwt", "activate"]);
    }
    server.cli_ok(&[
        "localauthority",
        "jwt",
        "taint",
        "--authority-id",
        &first_kid,
    ]);
    wait_until(10, "a JWT-SVID from another key after the taint", || {
        jwt_kid(&rt) != first_kid
    });
    server.cli_ok(&[
        "localauthority",
        "jwt",
        "revoke",
        "--authority-id",
        &first_kid,
    ]);
    let bundle = server.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    assert!(!bundle.contains(&first_kid), "{bundle}");

    // Three rotations: four authorities active in turn.
    let mut actives = vec![active_id(&x509_state(&server))];
    wait_until(200, "three X.509 authority activations", || {
        let id = active_id(&x509_state(&server));
        if actives.last() != Some(&id) {
            actives.push(id);
        }
        actives.len() > ROTATIONS
    });
    let state = x509_state(&server);
    let active = active_id(&state);
    let old = state["old"][0]["authority_id"]
        .as_str()
        .unwrap_or_else(|| panic!("an old authority right after an activation: {state}"))
        .to_string();
    assert_eq!(old, actives[actives.len() - 2]);

    // Taint the old one: the agent re-mints everything it signed at once (not at half-life).
    let out = server.cli_ok(&["localauthority", "x509", "taint", "--authority-id", &old]);
    assert!(out.contains("tainted"), "{out}");
    let tainted_at = Instant::now();
    wait_until(5, "every stream's SVIDs from the active authority", || {
        seen.iter()
            .all(|s| lock(s).latest_issuers == BTreeSet::from([active.clone()]))
    });
    eprintln!("taint: every SVID re-minted in {:?}", tainted_at.elapsed());
    assert_eq!(x509_state(&server)["old"][0]["tainted"], true);
    // Refusals change nothing: the active one cannot be tainted or revoked.
    for verb in ["taint", "revoke"] {
        let out = server.cli(&["localauthority", "x509", verb, "--authority-id", &active]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("active authority"), "{verb}: {err}");
    }
    let out = server.cli_ok(&["localauthority", "x509", "revoke", "--authority-id", &old]);
    assert!(out.contains("revoked"), "{out}");
    wait_until(10, "the revoked root out of every stream's bundle", || {
        seen.iter().all(|s| {
            let s = lock(s);
            !s.latest_roots.contains(&old) && s.latest_roots.contains(&active)
        })
    });
    // Handshakes go on after the revocation.
    let before = handshakes.ok.load(Ordering::SeqCst);
    wait_until(10, "mTLS handshakes after the revocation", || {
        handshakes.ok.load(Ordering::SeqCst) > before + 10
    });

    // The agent still talks to the server: a new entry gets its SVID.
    create_entry(
        &server,
        &w.agent_id,
        "spiffe://example.org/after",
        &[sel.as_str()],
        &[],
    );
    w.agent.wait_svids_for(&["spiffe://example.org/after"], 30);

    for t in tasks {
        t.abort();
    }
    let failures = handshakes
        .failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let ok = handshakes.ok.load(Ordering::SeqCst);
    assert!(
        failures.is_empty(),
        "{} of {ok} handshakes failed: {failures:?}",
        failures.len()
    );
    assert!(ok > 100, "only {ok} mTLS handshakes");
    eprintln!("{ok} mTLS handshakes, none failed");
    for (i, s) in seen.iter().enumerate() {
        let s = lock(s);
        assert!(s.failures.is_empty(), "stream {i}: {:?}", s.failures);
        assert!(
            s.issuers.len() >= ROTATIONS,
            "stream {i} saw SVIDs of {:?} only ({} messages)",
            s.issuers,
            s.messages
        );
    }
    let log = w.agent.log_text();
    assert!(!log.contains("giving up"), "{log}");
}

/// Checks the server's CA state after a restart: one active authority, the bundle holds exactly
/// the listed X.509 authorities, and every file in the CA directory is one the journal names.
fn check_consistent(server: &Server, ca_dir: &std::path::Path) -> (String, usize) {
    let state = x509_state(server);
    let active = active_id(&state);
    let mut listed: BTreeSet<String> = BTreeSet::from([active.clone()]);
    if let Some(p) = state["prepared"]["authority_id"].as_str() {
        listed.insert(p.to_string());
    }
    for o in state["old"].as_array().into_iter().flatten() {
        listed.insert(o["authority_id"].as_str().unwrap_or_default().to_string());
    }
    let pem = server.cli_ok(&["bundle", "show"]);
    let roots: BTreeSet<String> = sigil::x509::parse_pem_certs(&pem)
        .expect("PEM bundle")
        .iter()
        .filter_map(|r| key_id(r, false))
        .collect();
    assert_eq!(roots, listed, "bundle vs authorities: {state}");
    let journal = std::fs::read_to_string(ca_dir.join("authorities.json")).expect("journal");
    for entry in std::fs::read_dir(ca_dir).expect("CA dir") {
        let name = entry.expect("dir entry").file_name();
        let name = name.to_string_lossy();
        if name.starts_with("x509-") || name.starts_with("jwt-") {
            assert!(journal.contains(name.as_ref()), "{name} not in the journal");
        }
    }
    (active, listed.len())
}

#[test]
fn kill_9_during_prepare_and_activate_restarts_consistent() {
    let dir = tempdir();
    let mut server = Server::start(&dir.path().join("server"), &["--ca-ttl", "1m"]);
    let ca_dir = dir.path().join("server/data/ca");
    let (first, _) = check_consistent(&server, &ca_dir);
    // Across the first preparation (30 s) and activation (50 s): kill -9 every 1.5-2.5 s,
    // landing at every step of both (key files, journal, bundle, server SVID) over the runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut kills = 0;
    let mut seen_prepared = false;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1500 + 250 * (kills % 5)));
        server.kill9();
        kills += 1;
        server.restart();
        let (active, count) = check_consistent(&server, &ca_dir);
        seen_prepared |= count >= 2;
        if active != first {
            break;
        }
    }
    assert!(
        seen_prepared,
        "no prepared authority seen in {kills} restarts"
    );
    let (active, _) = check_consistent(&server, &ca_dir);
    assert_ne!(
        active, first,
        "no activation within a minute ({kills} kills)"
    );
}
