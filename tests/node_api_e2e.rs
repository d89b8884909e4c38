//! End-to-end tests of the node API: a real `sigil-server` process, and the client side the agent
//! uses — `sigil::tls` (SPIFFE mTLS) with the generated `NodeClient` — with keys generated here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sigil::proto::node as pb;
use sigil::proto::node::node_client::NodeClient;
use sigil::tls::{IdentityStore, ServerVerification, TrustStore};
use sigil::SpiffeId;
use sigil_testkit::{tempdir, Server};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

const SERVER_ID: &str = "spiffe://example.org/sigil/server";
const ALIAS: &str = "spiffe://example.org/node/n1";

fn key_and_csr() -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().expect("generating a key");
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .expect("making a CSR")
        .der()
        .to_vec();
    (key, csr)
}

/// The trust bundle as an operator hands it to an agent (`bundle show`, PEM).
fn bundle(server: &Server) -> Vec<Vec<u8>> {
    sigil::x509::parse_pem_certs(&server.cli_ok(&["bundle", "show"])).expect("PEM bundle")
}

fn verification(server: &Server) -> ServerVerification {
    ServerVerification::Spiffe {
        trust: Arc::new(TrustStore::new(&bundle(server)).expect("trust store")),
        expected_id: SpiffeId::parse(SERVER_ID).expect("server ID"),
    }
}

async fn client(
    server: &Server,
    identity: Option<Arc<IdentityStore>>,
) -> Result<NodeClient<Channel>, sigil::tls::TlsError> {
    let config = sigil::tls::client_config(verification(server), identity)?;
    let channel = sigil::tls::connect(&server.node_address(), Arc::new(config)).await?;
    Ok(NodeClient::new(channel))
}

fn identity(svid_chain: &[u8], key: &KeyPair) -> Arc<IdentityStore> {
    let chain = sigil::x509::split_der_concat(svid_chain).expect("SVID chain");
    Arc::new(IdentityStore::new(chain, key.serialize_der()).expect("identity"))
}

fn token(server: &Server, alias: Option<&str>) -> String {
    let mut args = vec!["token", "generate"];
    if let Some(a) = alias {
        args.extend(["--spiffe-id", a]);
    }
    server.cli_json(&args)["token"]
        .as_str()
        .expect("token in JSON")
        .to_string()
}

async fn attest(
    client: &mut NodeClient<Channel>,
    token: &str,
    csr: Vec<u8>,
) -> Result<pb::AttestResult, Status> {
    let params = pb::AttestRequest {
        step: Some(pb::attest_request::Step::Params(pb::AttestParams {
            r#type: "join_token".into(),
            payload: token.as_bytes().to_vec(),
            csr,
        })),
    };
    let mut stream = client
        .attest(tokio_stream::iter(vec![params]))
        .await?
        .into_inner();
    match stream.message().await? {
        Some(pb::AttestResponse {
            step: Some(pb::attest_response::Step::Result(r)),
        }) => Ok(r),
        other => Err(Status::internal(format!("unexpected reply {other:?}"))),
    }
}

fn create_entry(server: &Server, spiffe_id: &str, parent: &str) -> String {
    let out = server.cli_json(&[
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        parent,
        "--selector",
        "unix:uid:1000",
        "--dns",
        "svc.example.org",
    ]);
    out["results"][0]["entry"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("entry id in {out}"))
        .to_string()
}

async fn batch_sign(
    client: &mut NodeClient<Channel>,
    entry_ids: &[&str],
) -> Result<Vec<pb::SignResult>, Status> {
    let requests = entry_ids
        .iter()
        .map(|id| pb::SignRequest {
            entry_id: id.to_string(),
            csr: key_and_csr().1,
        })
        .collect();
    Ok(client
        .batch_sign(pb::BatchSignRequest { requests })
        .await?
        .into_inner()
        .results)
}

fn assert_denied<T: std::fmt::Debug>(r: Result<T, Status>, text: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
            assert!(
                s.message().contains(text),
                "{:?} lacks {text:?}",
                s.message()
            );
        }
        Ok(v) => panic!("expected PermissionDenied ({text}), got {v:?}"),
    }
}

/// An X509-SVID for `id` from a CA the server does not know.
fn foreign_identity(id: &str) -> Arc<IdentityStore> {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org".try_into().expect("uri"),
    )];
    ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &issuer).expect("leaf");
    Arc::new(IdentityStore::new(vec![cert.der().to_vec()], key.serialize_der()).expect("identity"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_mtls_signing_and_eviction() {
    let dir = tempdir();
    let server = Server::start(dir.path(), &[]);

    // Attest over server-authenticated TLS, without a client certificate.
    let t = token(&server, Some(ALIAS));
    let mut anonymous = client(&server, None).await.expect("TLS to the node API");
    let (agent_key, csr) = key_and_csr();
    let result = attest(&mut anonymous, &t, csr).await.expect("attestation");
    let agent_id = format!("spiffe://example.org/sigil/agent/join_token/{t}");
    assert_eq!(result.spiffe_id, agent_id);
    let chain = sigil::x509::split_der_concat(&result.svid_chain).expect("chain");
    let roots = sigil::x509::split_der_concat(&result.bundle).expect("bundle");
    assert_eq!(roots, bundle(&server));
    sigil::x509::verify_x509_svid(&chain, &roots, SystemTime::now()).expect("agent SVID verifies");
    let agents = server.cli_json(&["agent", "list"]);
    assert_eq!(
        agents["agents"][0]["spiffe_id"],
        agent_id.as_str(),
        "{agents}"
    );
    assert_eq!(agents["agents"][0]["attestation_type"], "join_token");

    // Token reuse is refused.
    let reuse = attest(&mut anonymous, &t, key_and_csr().1).await;
    assert_denied(reuse, "join token is invalid or already used");
    // mTLS-only calls without a client certificate are refused.
    let no_cert = batch_sign(&mut anonymous, &["x"]).await;
    assert_eq!(
        no_cert.expect_err("no client cert").code(),
        Code::Unauthenticated
    );

    // Entries: one parented to the agent, one under its node alias, one of another agent.
    let mine = create_entry(&server, "spiffe://example.org/web", &agent_id);
    let aliased = create_entry(&server, "spiffe://example.org/db", ALIAS);
    let theirs = create_entry(
        &server,
        "spiffe://example.org/other",
        "spiffe://example.org/sigil/agent/join_token/someone-else",
    );
    let me = identity(&result.svid_chain, &agent_key);
    let mut agent = client(&server, Some(me.clone())).await.expect("mTLS");
    let results = batch_sign(&mut agent, &[&mine, &aliased, &theirs])
        .await
        .expect("batch sign");
    assert_eq!(results.len(), 3);
    for (r, want) in results[..2]
        .iter()
        .zip(["spiffe://example.org/web", "spiffe://example.org/db"])
    {
        assert_eq!(r.code, Code::Ok as i32, "{}", r.message);
        let chain = sigil::x509::split_der_concat(&r.svid_chain).expect("chain");
        let id = sigil::x509::verify_x509_svid(&chain, &roots, SystemTime::now())
            .expect("workload SVID verifies to the bundle");
        assert_eq!(id.to_string(), want);
    }
    assert_eq!(
        results[2].code,
        Code::PermissionDenied as i32,
        "{:?}",
        results[2]
    );

    // JWT-SVID for an authorised entry.
    let jwt = agent
        .mint_jwt_svid(pb::JwtSvidRequest {
            entry_id: mine.clone(),
            audience: vec!["db".into()],
        })
        .await
        .expect("JWT-SVID")
        .into_inner();
    assert!(jwt.expires_at > 0 && jwt.token.split('.').count() == 3);

    // A client certificate from another CA is refused by the TLS layer (never reaches a handler).
    let foreign = foreign_identity(&agent_id);
    let refused = match client(&server, Some(foreign)).await {
        Err(e) => format!("connect: {e}"),
        Ok(mut c) => {
            let s = batch_sign(&mut c, &[&mine])
                .await
                .expect_err("foreign client certificate accepted");
            assert!(
                !matches!(
                    s.code(),
                    Code::PermissionDenied | Code::Unauthenticated | Code::Ok
                ),
                "refused by a handler, not by TLS: {s:?}"
            );
            format!("call: {s:?}")
        }
    };
    eprintln!("foreign certificate refused: {refused}");

    // Evict: the next call is refused.
    server.cli_ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    assert_denied(
        batch_sign(&mut agent, &[&mine]).await,
        "agent is not attested (evicted?)",
    );

    // A refused token is not logged (a short prefix at most).
    let guess = "6c1f0b7a-9d2e-4f3a-8b5c-7e6d5c4b3a29";
    assert_denied(
        attest(&mut anonymous, guess, key_and_csr().1).await,
        "join token is invalid or already used",
    );
    assert!(
        !server.log_text().contains(&guess[8..]),
        "a refused join token leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_supersedes_the_old_svid_on_first_use_and_shutdown_ends_sync_streams() {
    let dir = tempdir();
    let mut server = Server::start(dir.path(), &[]);
    let t = token(&server, None);
    let (old_key, csr) = key_and_csr();
    let attested = attest(&mut client(&server, None).await.expect("TLS"), &t, csr)
        .await
        .expect("attestation");
    let old = identity(&attested.svid_chain, &old_key);
    let mut old_client = client(&server, Some(old.clone())).await.expect("mTLS");
    batch_sign(&mut old_client, &[])
        .await
        .expect("current SVID works");

    let (new_key, csr) = key_and_csr();
    let renewed = old_client
        .renew_agent(pb::RenewAgentRequest { csr })
        .await
        .expect("renewal")
        .into_inner();
    let new = identity(&renewed.svid_chain, &new_key);
    assert_eq!(new.spiffe_id(), old.spiffe_id());
    let chain = sigil::x509::split_der_concat(&renewed.svid_chain).expect("chain");
    let new_serial = sigil::tls::PeerSvid::from_leaf_der(&chain[0])
        .expect("leaf")
        .serial_hex;
    let stored_serial = |server: &Server| {
        server.cli_json(&["agent", "list"])["agents"][0]["x509_svid_serial"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let old_serial = stored_serial(&server);
    assert_ne!(old_serial, new_serial);

    // Until the agent uses the new SVID, the old one still works (it may not have been able to
    // store the new one).
    batch_sign(&mut old_client, &[])
        .await
        .expect("the old SVID works until the new one is used");
    assert_eq!(stored_serial(&server), old_serial);
    // The first call with the new SVID makes it current; the old one is refused from then on,
    // on the old connection and on a new one, marked as superseded.
    let mut new_client = client(&server, Some(new)).await.expect("mTLS");
    batch_sign(&mut new_client, &[])
        .await
        .expect("renewed SVID works");
    assert_eq!(stored_serial(&server), new_serial);
    let refused = batch_sign(&mut old_client, &[]).await;
    assert_eq!(
        refused
            .as_ref()
            .err()
            .and_then(sigil::proto::AgentRefusal::of),
        Some(sigil::proto::AgentRefusal::Superseded),
        "{refused:?}"
    );
    assert_denied(refused, "superseded");
    let mut reconnect_old = client(&server, Some(old)).await.expect("TLS still works");
    assert_denied(batch_sign(&mut reconnect_old, &[]).await, "superseded");

    // An open Sync stream does not hold up a graceful shutdown.
    let mut sync = new_client
        .sync(pb::SyncRequest {
            known_revision: 0,
            known_bundle_sequence: 0,
            known_roots: Vec::new(),
        })
        .await
        .expect("sync stream")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), sync.message())
        .await
        .expect("first sync message in time")
        .expect("sync message");
    assert!(first.is_some());
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| server.stop());
    assert!(status.success(), "server exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "shutdown took {:?}",
        started.elapsed()
    );
}

/// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8).
async fn tcp_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source address"))?;
    socket.connect(addr).await
}

/// tonic connector: TCP from a chosen source address, then TLS.
#[derive(Clone)]
struct FromSource {
    source: &'static str,
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<tonic::codegen::http::Uri> for FromSource {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TlsIo>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tcp_from(this.source, this.addr).await?;
            let name = rustls_pki_types::ServerName::IpAddress(this.addr.ip().into());
            Ok(hyper_util::rt::TokioIo::new(
                this.tls.connect(name, tcp).await?,
            ))
        })
    }
}

/// A node API client (server verified, no client certificate) connecting from `source`.
async fn client_from(server: &Server, source: &'static str) -> NodeClient<Channel> {
    let config = sigil::tls::client_config(verification(server), None).expect("TLS config");
    let connector = FromSource {
        source,
        addr: server.node_address().parse().expect("node address"),
        tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
    };
    let channel = tonic::transport::Endpoint::from_static("http://node-api")
        .connect_with_connector(connector)
        .await
        .unwrap_or_else(|e| panic!("connecting from {source}: {e}"));
    NodeClient::new(channel)
}

/// `n` connections from `source` that never send a ClientHello; stops early if the server
/// stops taking connections (its accept backlog is full).
async fn flood(source: &str, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(2), tcp_from(source, addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    held
}

/// How many of `streams` the server has not closed (each read waits `wait` for EOF).
async fn still_open(streams: Vec<TcpStream>, wait: Duration) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in streams {
        tasks.spawn(async move {
            let mut buf = [0u8; 1];
            tokio::time::timeout(wait, s.read(&mut buf)).await.is_err()
        });
    }
    let mut open = 0;
    while let Some(r) = tasks.join_next().await {
        open += usize::from(r.expect("read task"));
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_does_not_stop_attestation() {
    // 2,400 connections that never send a ClientHello (more than the server's 1,024 handshakes
    // at once), from four loopback addresses.
    let sources = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let per_source = 600;
    let _ = sigil::limits::raise_open_files_limit();
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("open files limit");
    assert!(
        soft >= 4 * per_source as u64 + 1000,
        "raise the open files limit (now {soft})"
    );
    let dir = tempdir();
    let server = Server::start(dir.path(), &[]);
    let addr: SocketAddr = server.node_address().parse().expect("node address");
    let tokens = [token(&server, None), token(&server, None)];

    let mut held = Vec::new();
    for source in sources {
        let conns = flood(source, addr, per_source).await;
        assert_eq!(
            conns.len(),
            per_source,
            "the server stopped accepting connections from {source}"
        );
        held.push((source, conns));
    }
    // A new agent on another address attests at once; so does one on a flooding address.
    for (source, t) in ["127.0.0.5", "127.0.0.1"].into_iter().zip(&tokens) {
        let started = Instant::now();
        let attested = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = client_from(&server, source).await;
            attest(&mut c, t, key_and_csr().1).await
        })
        .await
        .unwrap_or_else(|_| panic!("attestation from {source} took over 2 s"))
        .unwrap_or_else(|s| panic!("attestation from {source}: {s:?}"));
        assert_eq!(
            attested.spiffe_id,
            format!("spiffe://example.org/sigil/agent/join_token/{t}")
        );
        eprintln!(
            "attested from {source} in {:?} during the flood",
            started.elapsed()
        );
    }
    // Each source kept at most its share of unfinished handshakes; the server closed the rest.
    for (source, conns) in held {
        let open = still_open(conns, Duration::from_millis(500)).await;
        assert!(
            open <= sigil::tls::MAX_HANDSHAKES_PER_SOURCE,
            "{open} unfinished handshakes from {source}"
        );
    }
    // Logged at warn level, rate-limited: a line or two, not one per dropped connection.
    let log = server.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS handshake flood"))
        .collect();
    assert!(
        (1..=3).contains(&lines.len()),
        "{} flood lines:\n{log}",
        lines.len()
    );
    assert!(
        lines[0].contains("WARN") && lines[0].contains("dropped_per_source="),
        "{}",
        lines[0]
    );
}
