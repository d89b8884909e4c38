//! Tests of the node API's handlers on a real datastore and CA: attestation, authentication,
//! renewal, signing, shutdown.

use super::sync::until_shutdown;
use super::*;
use crate::attestor::join_token::JoinTokenAttestor;
use crate::attestor::{AttestError, Challenger};
use crate::ca::CaConfig;
use crate::datastore::sqlite::SqliteDatastore;
use crate::datastore::JoinToken;
use async_trait::async_trait;
use rcgen::{CertificateParams, KeyPair};
use sigil::entry::RegistrationEntry;
use sigil::{Selector, SelectorSet};
use tonic::Code;

const TOKEN: &str = "0f8e2d4c-1b3a-4c5d-8e7f-a0b1c2d3e4f5";
const AGENT: &str =
    "spiffe://example.org/sigil/agent/join_token/0f8e2d4c-1b3a-4c5d-8e7f-a0b1c2d3e4f5";

struct Fixture {
    _dir: tempfile::TempDir,
    state: NodeState,
    writes: Mutex<()>,
    shutdown: watch::Sender<bool>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let datastore: Arc<dyn Datastore> = Arc::new(
        SqliteDatastore::open(&dir.path().join("ds.sqlite3"))
            .await
            .unwrap(),
    );
    let ca =
        Arc::new(Ca::load_or_create(&CaConfig::new(td.clone(), dir.path().join("ca"))).unwrap());
    let (shutdown, rx) = watch::channel(false);
    let state = NodeState {
        trust_domain: td.clone(),
        datastore: datastore.clone(),
        ca,
        attestors: Attestors::new().with(Arc::new(JoinTokenAttestor::new(datastore, td))),
        metrics: Metrics::new(),
        events: SyncEvents::new(),
        reconcile_every: Duration::from_secs(300),
        shutdown: rx,
    };
    Fixture {
        _dir: dir,
        state,
        writes: Mutex::new(()),
        shutdown,
    }
}

struct NoChallenges;

#[async_trait]
impl Challenger for NoChallenges {
    async fn challenge(&mut self, _c: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        Err(AttestError::Challenge("none expected".into()))
    }
}

fn csr() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

impl Fixture {
    async fn token(&self, token: &str, alias: Option<&str>) {
        self.state
            .datastore
            .create_join_token(JoinToken {
                token: token.into(),
                expires_at: now_unix() + 600,
                spiffe_id: alias.map(id),
            })
            .await
            .unwrap();
    }

    async fn attest(&self, token: &str, csr: Vec<u8>) -> Result<pb::AttestResult, Status> {
        let params = pb::AttestParams {
            r#type: "join_token".into(),
            payload: token.as_bytes().to_vec(),
            csr,
        };
        attest_with(&self.state, &self.writes, params, &mut NoChallenges).await
    }

    /// Attests with TOKEN and returns the agent's peer view of its SVID.
    async fn attested(&self, alias: Option<&str>) -> PeerSvid {
        self.token(TOKEN, alias).await;
        let r = self.attest(TOKEN, csr()).await.unwrap();
        peer(&r.svid_chain)
    }

    async fn entry(&self, spiffe_id: &str, parent: &str, dns: &[&str]) -> String {
        let e = RegistrationEntry {
            x509_svid_ttl: Some(Duration::from_secs(600)),
            jwt_svid_ttl: Some(Duration::from_secs(120)),
            dns_names: dns.iter().map(|d| d.to_string()).collect(),
            ..RegistrationEntry::new(
                id(spiffe_id),
                id(parent),
                SelectorSet::from_iter([Selector::parse("unix:uid:1000").unwrap()]),
            )
        };
        let mut r = self.state.datastore.create_entries(vec![e]).await.unwrap();
        r.pop().unwrap().unwrap().id
    }

    async fn agent(&self, p: &PeerSvid) -> Result<AttestedAgent, Status> {
        authenticate_agent(&self.state, Some(p)).await
    }
}

fn peer(chain: &[u8]) -> PeerSvid {
    let certs = sigil::x509::split_der_concat(chain).unwrap();
    PeerSvid::from_leaf_der(&certs[0]).unwrap()
}

fn assert_status(r: Result<impl std::fmt::Debug, Status>, code: Code, text: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(
                s.message().contains(text),
                "{:?} lacks {text:?}",
                s.message()
            );
        }
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
    }
}

#[tokio::test]
async fn join_token_attestation_stores_agent_alias_and_returns_a_verifying_svid() {
    let f = fixture().await;
    f.token(TOKEN, Some("spiffe://example.org/node/n1")).await;
    let r = f.attest(TOKEN, csr()).await.unwrap();
    assert_eq!(r.spiffe_id, AGENT);
    let chain = sigil::x509::split_der_concat(&r.svid_chain).unwrap();
    let roots = sigil::x509::split_der_concat(&r.bundle).unwrap();
    let verified =
        sigil::x509::verify_x509_svid(&chain, &roots, std::time::SystemTime::now()).unwrap();
    assert_eq!(verified.to_string(), AGENT);

    let agent = f
        .state
        .datastore
        .get_agent(&id(AGENT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(agent.attestation_type, "join_token");
    assert_eq!(agent.x509_svid_serial, peer(&r.svid_chain).serial_hex);
    assert!(!agent.banned);
    assert_eq!(f.state.metrics.x509_svids_signed.get(), 1);

    let filter = crate::datastore::EntryFilter {
        parent_id: Some(id(AGENT)),
        ..Default::default()
    };
    let aliases = f
        .state
        .datastore
        .list_entries(&filter, 10, None)
        .await
        .unwrap();
    assert_eq!(aliases.items.len(), 1);
    assert_eq!(
        aliases.items[0].spiffe_id.to_string(),
        "spiffe://example.org/node/n1"
    );
    assert_eq!(
        aliases.items[0].selectors.to_string(),
        format!("spiffe_id:{AGENT}")
    );
    assert_eq!(f.state.events.current().entry_changes, 1);

    assert_status(
        f.attest(TOKEN, csr()).await,
        Code::PermissionDenied,
        "join token is invalid or already used",
    );
}

#[tokio::test]
async fn bad_input_is_refused_before_the_token_is_spent() {
    let f = fixture().await;
    f.token(TOKEN, None).await;
    assert_status(
        f.attest(TOKEN, vec![]).await,
        Code::InvalidArgument,
        "invalid CSR",
    );
    assert_status(
        f.attest(TOKEN, vec![0x30, 0x00]).await,
        Code::InvalidArgument,
        "invalid CSR",
    );
    let params = pb::AttestParams {
        r#type: "x509pop".into(),
        payload: vec![],
        csr: csr(),
    };
    assert_status(
        attest_with(&f.state, &f.writes, params, &mut NoChallenges).await,
        Code::InvalidArgument,
        "unsupported attestation type \"x509pop\"; this server accepts: join_token",
    );
    // The token is still good.
    assert_eq!(f.attest(TOKEN, csr()).await.unwrap().spiffe_id, AGENT);
}

#[tokio::test]
async fn banned_agent_cannot_attest_again() {
    let f = fixture().await;
    f.attested(None).await;
    f.state
        .datastore
        .set_agent_banned(&id(AGENT), true)
        .await
        .unwrap();
    // Same ID again (as x509pop would produce): a fresh token with the same value.
    f.token(TOKEN, None).await;
    assert_status(
        f.attest(TOKEN, csr()).await,
        Code::PermissionDenied,
        "agent is banned",
    );
}

#[tokio::test]
async fn authentication_requires_a_current_known_unbanned_agent() {
    let f = fixture().await;
    assert_status(
        authenticate_agent(&f.state, None).await,
        Code::Unauthenticated,
        "client certificate",
    );
    let p = f.attested(None).await;
    assert_eq!(f.agent(&p).await.unwrap().spiffe_id.to_string(), AGENT);

    let mut other = p.clone();
    other.serial_hex = "40".repeat(16);
    let refused = f.agent(&other).await;
    assert_refusal(&refused, AgentRefusal::Superseded);
    assert_status(
        refused,
        Code::PermissionDenied,
        &format!(
            "agent SVID serial {} is not this agent's current one",
            other.serial_hex
        ),
    );

    let mut expired = p.clone();
    expired.not_after = now_unix() - 1;
    assert_status(f.agent(&expired).await, Code::Unauthenticated, "expired");

    let mut workload = p.clone();
    workload.spiffe_id = id("spiffe://example.org/web");
    assert_status(
        f.agent(&workload).await,
        Code::PermissionDenied,
        "is not an agent",
    );
    let mut foreign = p.clone();
    foreign.spiffe_id = id("spiffe://other.org/sigil/agent/join_token/x");
    assert_status(
        f.agent(&foreign).await,
        Code::PermissionDenied,
        "is not an agent",
    );

    f.state
        .datastore
        .set_agent_banned(&id(AGENT), true)
        .await
        .unwrap();
    let refused = f.agent(&p).await;
    assert_refusal(&refused, AgentRefusal::Banned);
    assert_status(refused, Code::PermissionDenied, "agent is banned");
    f.state.datastore.delete_agent(&id(AGENT)).await.unwrap();
    let refused = f.agent(&p).await;
    assert_refusal(&refused, AgentRefusal::Evicted);
    assert_status(
        refused,
        Code::PermissionDenied,
        "agent is not attested (evicted?)",
    );
}

fn assert_refusal<T: std::fmt::Debug>(r: &Result<T, Status>, want: AgentRefusal) {
    match r {
        Err(s) => assert_eq!(AgentRefusal::of(s), Some(want), "{s:?}"),
        Ok(v) => panic!("expected {want:?}, got {v:?}"),
    }
}

async fn stored(f: &Fixture) -> AttestedAgent {
    f.state
        .datastore
        .get_agent(&id(AGENT))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn renewal_keeps_the_old_svid_until_the_new_one_is_used() {
    let f = fixture().await;
    let old = f.attested(None).await;
    assert_status(
        renew(&f.state, &f.writes, Some(&old), b"junk").await,
        Code::InvalidArgument,
        "certificate signing request",
    );
    // A failed renewal changes nothing.
    f.agent(&old).await.unwrap();
    assert_eq!(stored(&f).await.new_x509_svid, None);

    let r = renew(&f.state, &f.writes, Some(&old), &csr())
        .await
        .unwrap();
    let lost = peer(&r.svid_chain);
    assert_eq!(lost.spiffe_id, old.spiffe_id);
    assert_ne!(lost.serial_hex, old.serial_hex);
    let agent = stored(&f).await;
    assert_eq!(agent.x509_svid_serial, old.serial_hex);
    assert_eq!(
        agent.new_x509_svid.map(|n| n.serial),
        Some(lost.serial_hex.clone())
    );
    // The agent never stored that SVID (full disk, a crash): the old one still works, and
    // renews again; the unused SVID is replaced.
    f.agent(&old).await.unwrap();
    let r = renew(&f.state, &f.writes, Some(&old), &csr())
        .await
        .unwrap();
    let new = peer(&r.svid_chain);
    assert_refusal(&f.agent(&lost).await, AgentRefusal::Superseded);
    f.agent(&old).await.unwrap();
    // The first call with the new SVID makes it current; the old one is refused from then.
    let agent = f.agent(&new).await.unwrap();
    assert_eq!(agent.x509_svid_serial, new.serial_hex);
    let agent = stored(&f).await;
    assert_eq!(agent.x509_svid_serial, new.serial_hex);
    assert_eq!(agent.x509_svid_expires_at, new.not_after);
    assert_eq!(agent.new_x509_svid, None);
    f.agent(&new).await.unwrap();
    assert_refusal(&f.agent(&old).await, AgentRefusal::Superseded);
    let refused = renew(&f.state, &f.writes, Some(&old), &csr()).await;
    assert_refusal(&refused, AgentRefusal::Superseded);
    assert_status(refused, Code::PermissionDenied, "superseded");
    // Renewing with the new one works as before.
    let r = renew(&f.state, &f.writes, Some(&new), &csr())
        .await
        .unwrap();
    f.agent(&peer(&r.svid_chain)).await.unwrap();
    assert_refusal(&f.agent(&new).await, AgentRefusal::Superseded);
}

#[tokio::test]
async fn eviction_and_ban_refuse_the_current_and_the_renewed_svid() {
    let f = fixture().await;
    let old = f.attested(None).await;
    let r = renew(&f.state, &f.writes, Some(&old), &csr())
        .await
        .unwrap();
    let new = peer(&r.svid_chain);
    f.state
        .datastore
        .set_agent_banned(&id(AGENT), true)
        .await
        .unwrap();
    for p in [&old, &new] {
        assert_refusal(&f.agent(p).await, AgentRefusal::Banned);
        assert_refusal(
            &renew(&f.state, &f.writes, Some(p), &csr()).await,
            AgentRefusal::Banned,
        );
    }
    // Refusing the renewed SVID did not make it current.
    assert_eq!(stored(&f).await.x509_svid_serial, old.serial_hex);
    f.state.datastore.delete_agent(&id(AGENT)).await.unwrap();
    for p in [&old, &new] {
        assert_refusal(&f.agent(p).await, AgentRefusal::Evicted);
    }
    // Attesting again supersedes both, and any pending renewal.
    let again = f.attested(None).await;
    f.agent(&again).await.unwrap();
    for p in [&old, &new] {
        assert_refusal(&f.agent(p).await, AgentRefusal::Superseded);
    }
    let r = renew(&f.state, &f.writes, Some(&again), &csr())
        .await
        .unwrap();
    let pending = peer(&r.svid_chain);
    let reattested = f.attested(None).await;
    assert_eq!(stored(&f).await.new_x509_svid, None);
    assert_refusal(&f.agent(&pending).await, AgentRefusal::Superseded);
    f.agent(&reattested).await.unwrap();
}

#[tokio::test]
async fn batch_sign_signs_only_authorised_entries_one_result_each() {
    let f = fixture().await;
    let p = f.attested(Some("spiffe://example.org/node/n1")).await;
    let agent = f.agent(&p).await.unwrap();
    let direct = f
        .entry("spiffe://example.org/web", AGENT, &["web.example.org"])
        .await;
    let via_alias = f
        .entry(
            "spiffe://example.org/db",
            "spiffe://example.org/node/n1",
            &[],
        )
        .await;
    let other = f
        .entry(
            "spiffe://example.org/x",
            "spiffe://example.org/sigil/agent/join_token/other",
            &[],
        )
        .await;
    let req = |entry_id: &str, csr: Vec<u8>| pb::SignRequest {
        entry_id: entry_id.into(),
        csr,
    };
    let before = f.state.metrics.x509_svids_signed.get();
    let resp = batch_sign(
        &f.state,
        &agent,
        vec![
            req(&direct, csr()),
            req(&via_alias, csr()),
            req(&other, csr()),
            req("no-such-entry", csr()),
            req(&direct, b"junk".to_vec()),
            req("", csr()),
        ],
    )
    .await
    .unwrap();
    let codes: Vec<i32> = resp.results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        vec![
            Code::Ok as i32,
            Code::Ok as i32,
            Code::PermissionDenied as i32,
            Code::NotFound as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
        ],
        "{:?}",
        resp.results.iter().map(|r| &r.message).collect::<Vec<_>>()
    );
    assert_eq!(resp.results[2].entry_id, other);
    assert!(resp.results[2].message.contains("not authorised"));
    assert_eq!(f.state.metrics.x509_svids_signed.get(), before + 2);

    let web = &resp.results[0];
    let chain = sigil::x509::split_der_concat(&web.svid_chain).unwrap();
    let svid_id = sigil::x509::verify_x509_svid(
        &chain,
        &f.state.ca.x509_authorities(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert_eq!(svid_id.to_string(), "spiffe://example.org/web");
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let ttl = web.expires_at - now_unix();
    assert!((590..=601).contains(&ttl), "entry TTL used: {ttl}");
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(format!("{:?}", san.value).contains("web.example.org"));

    let too_many = (0..=MAX_BATCH_SIGN).map(|_| req(&direct, vec![])).collect();
    assert_status(
        batch_sign(&f.state, &agent, too_many).await,
        Code::InvalidArgument,
        "at most",
    );
}

/// A batch large enough to be signed in several parallel chunks: every result answers its
/// request, in order, and each SVID carries its own entry's ID and its own CSR's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_is_answered_in_order_across_signing_chunks() {
    let f = fixture().await;
    let p = f.attested(None).await;
    let agent = f.agent(&p).await.unwrap();
    let mut entries = Vec::new();
    for i in 0..5 {
        let path = format!("spiffe://example.org/w/{i}");
        entries.push((f.entry(&path, AGENT, &[]).await, path));
    }
    let other = f
        .entry(
            "spiffe://example.org/x",
            "spiffe://example.org/sigil/agent/join_token/other",
            &[],
        )
        .await;
    // Requests: the entries in turn, every 7th for an unauthorised one, every 11th for none.
    let mut want = Vec::new();
    let mut requests = Vec::new();
    for i in 0..3 * sign::MIN_SIGN_CHUNK + 5 {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec();
        let (entry_id, expect) = if i % 11 == 10 {
            ("no-such-entry".to_string(), Err(Code::NotFound))
        } else if i % 7 == 6 {
            (other.clone(), Err(Code::PermissionDenied))
        } else {
            let (id, path) = &entries[i % entries.len()];
            (
                id.clone(),
                Ok((
                    path.clone(),
                    rcgen::PublicKeyData::subject_public_key_info(&key),
                )),
            )
        };
        want.push((entry_id.clone(), expect));
        requests.push(pb::SignRequest { entry_id, csr });
    }
    let resp = batch_sign(&f.state, &agent, requests).await.unwrap();
    assert_eq!(resp.results.len(), want.len());
    for (i, (r, (entry_id, expect))) in resp.results.iter().zip(&want).enumerate() {
        assert_eq!(&r.entry_id, entry_id, "result {i}");
        match expect {
            Err(code) => assert_eq!(r.code, *code as i32, "result {i}: {}", r.message),
            Ok((path, spki)) => {
                assert_eq!(r.code, Code::Ok as i32, "result {i}: {}", r.message);
                let chain = sigil::x509::split_der_concat(&r.svid_chain).unwrap();
                let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
                assert_eq!(
                    cert.public_key().raw,
                    &spki[..],
                    "result {i}: its CSR's key"
                );
                let san = cert.subject_alternative_name().unwrap().unwrap();
                assert!(
                    format!("{:?}", san.value).contains(&format!("\"{path}\"")),
                    "result {i}: {path} in {:?}",
                    san.value
                );
            }
        }
    }
}

#[tokio::test]
async fn jwt_svids_for_authorised_entries_only() {
    let f = fixture().await;
    let p = f.attested(None).await;
    let agent = f.agent(&p).await.unwrap();
    let web = f.entry("spiffe://example.org/web", AGENT, &[]).await;
    let other = f
        .entry(
            "spiffe://example.org/x",
            "spiffe://example.org/elsewhere",
            &[],
        )
        .await;
    let req = |entry_id: &str, aud: &[&str]| pb::JwtSvidRequest {
        entry_id: entry_id.into(),
        audience: aud.iter().map(|a| a.to_string()).collect(),
    };
    let r = mint_jwt_svid(&f.state, &agent, req(&web, &["db"]))
        .await
        .unwrap();
    let claims = sigil::jwt::validate_jwt_svid(&r.token, "db", &f.state.ca.bundle()).unwrap();
    assert_eq!(claims.subject.to_string(), "spiffe://example.org/web");
    assert_eq!(claims.expiry, r.expires_at);
    let ttl = r.expires_at - now_unix();
    assert!((110..=121).contains(&ttl), "entry JWT TTL used: {ttl}");
    assert_status(
        mint_jwt_svid(&f.state, &agent, req(&web, &[])).await,
        Code::InvalidArgument,
        "audience is required",
    );
    assert_status(
        mint_jwt_svid(&f.state, &agent, req(&other, &["db"])).await,
        Code::PermissionDenied,
        "not authorised",
    );
    assert_status(
        mint_jwt_svid(&f.state, &agent, req("nope", &["db"])).await,
        Code::NotFound,
        "not found",
    );
}

#[tokio::test]
async fn streams_end_with_unavailable_on_shutdown() {
    let f = fixture().await;
    let mut s = until_shutdown(
        futures::stream::pending::<Result<(), Status>>(),
        f.state.shutdown.clone(),
    );
    f.shutdown.send(true).unwrap();
    let first = futures::StreamExt::next(&mut s).await.unwrap();
    assert_eq!(first.unwrap_err().code(), Code::Unavailable);
    assert!(futures::StreamExt::next(&mut s).await.is_none());
}
