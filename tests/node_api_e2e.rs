//! End-to-end tests of the node API: a real `sigil-server` process, and the client side the agent
//! uses — `sigil::tls` (SPIFFE mTLS) with the generated `NodeClient` — with keys generated here.

mod support;

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
use support::{tempdir, Server};
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
async fn renewal_supersedes_the_old_svid_and_shutdown_ends_sync_streams() {
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

    // The old SVID is refused, on the old connection and on a new one.
    assert_denied(
        batch_sign(&mut old_client, &[]).await,
        "agent SVID has been superseded",
    );
    let mut reconnect_old = client(&server, Some(old)).await.expect("TLS still works");
    assert_denied(
        batch_sign(&mut reconnect_old, &[]).await,
        "agent SVID has been superseded",
    );
    let mut new_client = client(&server, Some(new)).await.expect("mTLS");
    batch_sign(&mut new_client, &[])
        .await
        .expect("renewed SVID works");
    let agents = server.cli_json(&["agent", "list"]);
    let stored_serial = agents["agents"][0]["x509_svid_serial"]
        .as_str()
        .unwrap_or_default();
    let chain = sigil::x509::split_der_concat(&renewed.svid_chain).expect("chain");
    let leaf = sigil::tls::PeerSvid::from_leaf_der(&chain[0]).expect("leaf");
    assert_eq!(stored_serial, leaf.serial_hex);

    // An open Sync stream does not hold up a graceful shutdown.
    let mut sync = new_client
        .sync(pb::SyncRequest {
            known_revision: 0,
            known_bundle_sequence: 0,
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
