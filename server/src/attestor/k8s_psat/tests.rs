//! k8s_psat tests: real JWT crypto (tokens minted here with RS256 and ES256 test issuers) and a
//! fake Kubernetes API server over real HTTPS on loopback (`sigil_testkit::fake_k8s`).

use std::path::PathBuf;
use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::json;

use super::fake_k8s::{FakeK8s, PodClaims, Review, TestIssuer, API_TOKEN};
use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const NODE: &str = "node-1";
const NODE_UID: &str = "5c0b8f5e-1d7a-4a63-9f0e-0d8f1c2b3a41";
const POD: &str = "sigil-agent-x7k2p";
const POD_UID: &str = "9d1e7c3a-58b4-4f0c-a1d2-6e5f4b3c2a10";

/// One RSA-2048 key for every test (generating one is slow in debug builds).
fn rsa_pkcs8() -> &'static [u8] {
    static KEY: OnceLock<Vec<u8>> = OnceLock::new();
    KEY.get_or_init(|| {
        crate::ca::KeyType::Rsa2048
            .generate()
            .expect("RSA key")
            .serialize_der()
    })
}

struct NoChallenge;

#[async_trait]
impl Challenger for NoChallenge {
    async fn challenge(&mut self, _: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        panic!("k8s_psat sends no challenge")
    }
}

/// A fake cluster with node `node-1` running the agent pod `sigil/sigil-agent-x7k2p`.
struct Env {
    fake: FakeK8s,
    dir: tempfile::TempDir,
    ca_file: PathBuf,
    api_token_file: PathBuf,
    rsa: TestIssuer,
}

impl Env {
    fn new() -> Env {
        let fake = FakeK8s::start();
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, api_token_file) = fake.write_credentials(dir.path());
        fake.set_node(
            NODE,
            NODE_UID,
            &[
                ("kubernetes.io/hostname", NODE),
                ("topology.kubernetes.io/zone", "eu-west-1a"),
            ],
        );
        fake.set_pod("sigil", POD, POD_UID, NODE, &[("app", "sigil-agent")]);
        let rsa = TestIssuer::rs256("rsa-1", rsa_pkcs8());
        Env {
            fake,
            dir,
            ca_file,
            api_token_file,
            rsa,
        }
    }

    fn jwks_file(&self, issuers: &[&TestIssuer]) -> PathBuf {
        let path = self.dir.path().join("jwks.json");
        std::fs::write(&path, TestIssuer::jwks(issuers).to_string()).unwrap();
        path
    }

    fn cluster(&self, verification: Verification) -> ClusterConfig {
        ClusterConfig {
            name: "prod".into(),
            service_account_allow_list: vec![("sigil".into(), "sigil-agent".into())],
            audience: DEFAULT_AUDIENCE.into(),
            verification,
            api_server_url: self.fake.url.clone(),
            api_token_file: self.api_token_file.clone(),
            api_ca_file: self.ca_file.clone(),
        }
    }

    fn attestor_for(&self, cfg: ClusterConfig) -> K8sPsatAttestor {
        let mut m = BTreeMap::new();
        m.insert(cfg.name.clone(), cfg);
        K8sPsatAttestor::new(TrustDomain::new("example.org").unwrap(), &m).unwrap()
    }

    /// An attestor verifying with a JWKS file of the RSA issuer.
    fn jwks_attestor(&self) -> K8sPsatAttestor {
        self.attestor_for(self.cluster(Verification::JwksFile(self.jwks_file(&[&self.rsa]))))
    }

    /// An attestor fetching keys by OIDC discovery from the fake API server.
    fn oidc_attestor(&self) -> K8sPsatAttestor {
        self.attestor_for(self.cluster(Verification::OidcDiscovery {
            url: self.fake.url.clone(),
            ca_file: self.ca_file.clone(),
        }))
    }
}

/// The claims of a token of the agent's service account in pod `pod` (`pod_uid`) on `node`.
fn pod_claims(pod: &str, pod_uid: &str, node: Option<(&str, &str)>) -> PodClaims {
    PodClaims::new("sigil", "sigil-agent", pod, pod_uid, node)
}

fn claims() -> PodClaims {
    pod_claims(POD, POD_UID, Some((NODE, NODE_UID)))
}

/// A TokenReview answer authenticating the agent pod `POD` on `node` for `audiences`.
fn review(node: Option<(&str, &str)>, audiences: &[&str]) -> Review {
    Review::pod("sigil", "sigil-agent", POD, POD_UID, node, audiences)
}

fn payload(cluster: &str, token: &str) -> Vec<u8> {
    json!({"cluster": cluster, "token": token})
        .to_string()
        .into_bytes()
}

async fn attest(a: &K8sPsatAttestor, token: &str) -> Result<AttestedNode, AttestError> {
    a.attest(&payload("prod", token), &mut NoChallenge).await
}

fn denied(r: Result<AttestedNode, AttestError>) -> String {
    match r {
        Err(AttestError::Denied(m)) => m,
        other => panic!("expected Denied, got {other:?}"),
    }
}

fn unavailable(r: Result<AttestedNode, AttestError>) -> String {
    match r {
        Err(AttestError::Unavailable(m)) => m,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

fn selector_strings(n: &AttestedNode) -> Vec<String> {
    n.selectors.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn rs256_token_from_jwks_file_attests_with_agent_id_and_selectors() -> TestResult {
    let env = Env::new();
    let a = env.jwks_attestor();
    let token = env.rsa.sign(&claims().to_json());
    let n = attest(&a, &token).await?;
    assert_eq!(
        n.agent_id.to_string(),
        format!("spiffe://example.org/sigil/agent/k8s_psat/prod/{NODE_UID}")
    );
    assert!(n.node_alias.is_none());
    let got = selector_strings(&n);
    let want = [
        "k8s_psat:cluster:prod".to_string(),
        "k8s_psat:agent_ns:sigil".into(),
        "k8s_psat:agent_sa:sigil-agent".into(),
        format!("k8s_psat:agent_pod_name:{POD}"),
        format!("k8s_psat:agent_pod_uid:{POD_UID}"),
        "k8s_psat:agent_pod_label:app:sigil-agent".into(),
        format!("k8s_psat:agent_node_name:{NODE}"),
        format!("k8s_psat:agent_node_uid:{NODE_UID}"),
        format!("k8s_psat:agent_node_label:kubernetes.io/hostname:{NODE}"),
        "k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-west-1a".into(),
    ];
    for w in &want {
        assert!(got.contains(w), "{w} missing from {got:?}");
    }
    assert_eq!(got.len(), want.len(), "{got:?}");
    // The API server was asked with the server's bearer token (the fake refuses others).
    assert_eq!(
        env.fake
            .count(&format!("GET /api/v1/namespaces/sigil/pods/{POD}")),
        1
    );
    assert_eq!(env.fake.count(&format!("GET /api/v1/nodes/{NODE}")), 1);

    // A new agent pod on the same node (restart, roll-out) is the same agent.
    env.fake.set_pod(
        "sigil",
        "sigil-agent-q9w8e",
        "pod-uid-2",
        NODE,
        &[("app", "sigil-agent")],
    );
    let mut c = pod_claims("sigil-agent-q9w8e", "pod-uid-2", Some((NODE, NODE_UID)));
    c.audience = vec!["other".into(), DEFAULT_AUDIENCE.into()];
    let again = attest(&a, &env.rsa.sign(&c.to_json())).await?;
    assert_eq!(again.agent_id, n.agent_id);
    Ok(())
}

#[tokio::test]
async fn token_without_node_claims_uses_the_pods_node() -> TestResult {
    let env = Env::new();
    let a = env.jwks_attestor();
    let c = pod_claims(POD, POD_UID, None);
    let n = attest(&a, &env.rsa.sign(&c.to_json())).await?;
    assert!(n.agent_id.path().ends_with(NODE_UID));
    assert!(selector_strings(&n).contains(&format!("k8s_psat:agent_node_name:{NODE}")));
    Ok(())
}

#[tokio::test]
async fn es256_token_via_oidc_discovery_attests_and_checks_the_issuer() -> TestResult {
    let env = Env::new();
    let ec = TestIssuer::es256("ec-1");
    env.fake.set_jwks(TestIssuer::jwks(&[&ec]));
    let a = env.oidc_attestor();
    let mut c = claims();
    c.issuer = env.fake.url.clone();
    let n = attest(&a, &ec.sign(&c.to_json())).await?;
    assert!(n.agent_id.path().ends_with(NODE_UID));
    assert_eq!(env.fake.count("GET /.well-known/openid-configuration"), 1);
    assert_eq!(env.fake.count("GET /openid/v1/jwks"), 1);
    // Keys are cached.
    attest(&a, &ec.sign(&c.to_json())).await?;
    assert_eq!(env.fake.count("GET /openid/v1/jwks"), 1);

    // A token of another issuer, even signed by a trusted key, is refused.
    let mut other = claims();
    other.issuer = "https://evil.example".into();
    let m = denied(attest(&a, &ec.sign(&other.to_json())).await);
    assert!(m.contains("issuer"), "{m}");

    // A discovery document naming another issuer is refused (no keys at all).
    let env2 = Env::new();
    env2.fake.set_jwks(TestIssuer::jwks(&[&ec]));
    env2.fake.set_issuer("https://somewhere.else");
    let a2 = env2.oidc_attestor();
    let m = unavailable(attest(&a2, &ec.sign(&c.to_json())).await);
    assert!(m.contains("somewhere.else"), "{m}");
    Ok(())
}

#[tokio::test]
async fn unknown_kid_refetches_oidc_keys_at_most_every_min_refetch() -> TestResult {
    let env = Env::new();
    let old = TestIssuer::es256("old");
    let new = TestIssuer::es256("new");
    env.fake.set_jwks(TestIssuer::jwks(&[&old]));
    let mut a = env.oidc_attestor();
    for c in a.clusters.values_mut() {
        if let Some(k) = c.keys.as_mut() {
            // Long enough that the first refusal below cannot race it on a loaded machine;
            // the window itself is tested on paused time beside KeySource.
            k.min_refetch = Duration::from_secs(3600);
        }
    }
    let mut c = claims();
    c.issuer = env.fake.url.clone();
    attest(&a, &old.sign(&c.to_json())).await?;
    assert_eq!(env.fake.count("GET /openid/v1/jwks"), 1);

    // The issuer rotates its key. Right after the last fetch, an unknown kid is refused
    // without fetching again.
    env.fake.set_jwks(TestIssuer::jwks(&[&old, &new]));
    let m = denied(attest(&a, &new.sign(&c.to_json())).await);
    assert!(m.contains("key ID \"new\""), "{m}");
    assert_eq!(env.fake.count("GET /openid/v1/jwks"), 1);
    // Later, the unknown kid triggers one fetch and the token is accepted.
    for c in a.clusters.values() {
        if let Some(k) = c.keys.as_ref() {
            k.forget_last_attempt().await;
        }
    }
    attest(&a, &new.sign(&c.to_json())).await?;
    assert_eq!(env.fake.count("GET /openid/v1/jwks"), 2);
    // A bogus kid right after that does not cause another fetch.
    let bogus = TestIssuer::es256("bogus");
    let m = denied(attest(&a, &bogus.sign(&c.to_json())).await);
    assert!(m.contains("\"bogus\""), "{m}");
    assert_eq!(env.fake.count("GET /openid/v1/jwks"), 2);
    Ok(())
}

#[tokio::test]
async fn token_review_attests_and_refuses_what_the_api_server_refuses() -> TestResult {
    let env = Env::new();
    let a = env.attestor_for(env.cluster(Verification::TokenReview));
    // The API server alone vouches for the token: the signing key is unknown here.
    let token = TestIssuer::es256("cluster-key").sign(&claims().to_json());
    env.fake
        .set_review(&token, review(Some((NODE, NODE_UID)), &["sigil-server"]));
    let n = attest(&a, &token).await?;
    assert_eq!(
        n.agent_id.to_string(),
        format!("spiffe://example.org/sigil/agent/k8s_psat/prod/{NODE_UID}")
    );
    assert!(selector_strings(&n).contains(&"k8s_psat:agent_sa:sigil-agent".to_string()));
    assert_eq!(
        env.fake
            .count("POST /apis/authentication.k8s.io/v1/tokenreviews"),
        1
    );

    // Unknown to the API server.
    let m = denied(attest(&a, &TestIssuer::es256("k").sign(&claims().to_json())).await);
    assert!(m.contains("TokenReview did not authenticate"), "{m}");

    // Issued for another audience: the API server refuses it for ours.
    let api_token = TestIssuer::es256("k").sign(&claims().to_json());
    env.fake.set_review(&api_token, review(None, &["api"]));
    let m = denied(attest(&a, &api_token).await);
    assert!(m.contains("audiences"), "{m}");

    // Not a pod-bound token.
    let legacy = TestIssuer::es256("k").sign(&json!({"sub": "x"}));
    let mut r = review(None, &["sigil-server"]);
    r.extra.clear();
    env.fake.set_review(&legacy, r);
    let m = denied(attest(&a, &legacy).await);
    assert!(m.contains("not bound to a pod"), "{m}");

    // A user, not a service account.
    let user = TestIssuer::es256("k").sign(&json!({"sub": "y"}));
    let mut r = review(None, &["sigil-server"]);
    r.username = "alice".into();
    env.fake.set_review(&user, r);
    let m = denied(attest(&a, &user).await);
    assert!(m.contains("not to a service account"), "{m}");

    // The review says the pod is on node-1 but it claims another node.
    let moved = TestIssuer::es256("k").sign(&json!({"sub": "z"}));
    env.fake
        .set_review(&moved, review(Some(("node-2", "n2")), &["sigil-server"]));
    let m = denied(attest(&a, &moved).await);
    assert!(m.contains("runs on node \"node-1\""), "{m}");
    Ok(())
}

#[tokio::test]
async fn bad_tokens_are_denied_with_the_reason() -> TestResult {
    let env = Env::new();
    let a = env.jwks_attestor();
    let sign = |c: &PodClaims| env.rsa.sign(&c.to_json());

    let mut expired = claims();
    expired.issued = -7200;
    expired.expires = -3600;
    let m = denied(attest(&a, &sign(&expired)).await);
    assert!(m.contains("expired"), "{m}");

    // Within the clock-skew leeway an expired token still passes.
    let mut just = claims();
    just.expires = -(CLOCK_SKEW / 2);
    attest(&a, &sign(&just)).await?;

    let mut future = claims();
    future.issued = 600;
    let m = denied(attest(&a, &sign(&future)).await);
    assert!(m.contains("not valid before"), "{m}");

    let mut wrong_aud = claims();
    wrong_aud.audience = vec!["https://kubernetes.default.svc".into()];
    let m = denied(attest(&a, &sign(&wrong_aud)).await);
    assert!(m.contains("audience") && m.contains("sigil-server"), "{m}");

    // Signed by another key that claims the trusted kid.
    let impostor = TestIssuer::es256("rsa-1");
    let m = denied(attest(&a, &impostor.sign(&claims().to_json())).await);
    assert!(m.contains("signature does not verify"), "{m}");
    // Its ES256 header names an RSA key: the message says so.
    assert!(
        m.contains("ES256 does not match the type of key \"rsa-1\" (RSA)"),
        "{m}"
    );
    // Same with an RSA-style header over an EC signature.
    let forged = impostor.sign_with_header(
        &json!({"alg": "RS256", "kid": "rsa-1"}),
        &claims().to_json(),
    );
    let m = denied(attest(&a, &forged).await);
    assert!(m.contains("signature does not verify"), "{m}");
    // A valid token with one claim changed after signing.
    let good = sign(&claims());
    let parts: Vec<&str> = good.split('.').collect();
    let mut tampered_claims = claims().to_json();
    tampered_claims["kubernetes.io"]["namespace"] = json!("kube-system");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tampered_claims.to_string()),
        parts[2]
    );
    let m = denied(attest(&a, &tampered).await);
    assert!(m.contains("signature does not verify"), "{m}");

    let stranger = TestIssuer::es256("unknown-kid");
    let m = denied(attest(&a, &stranger.sign(&claims().to_json())).await);
    assert!(m.contains("key ID \"unknown-kid\""), "{m}");

    for alg in ["none", "HS256"] {
        let t = env
            .rsa
            .sign_with_header(&json!({"alg": alg, "kid": "rsa-1"}), &claims().to_json());
        let m = denied(attest(&a, &t).await);
        assert!(m.contains("algorithm"), "{alg}: {m}");
    }

    let api_calls = env.fake.count("GET /api");
    let other_sa = PodClaims::new("default", "default", POD, POD_UID, Some((NODE, NODE_UID)));
    let m = denied(attest(&a, &sign(&other_sa)).await);
    assert!(
        m.contains("service account default:default is not allowed"),
        "{m}"
    );
    // The allow list is checked before the API server is asked anything.
    assert_eq!(env.fake.count("GET /api"), api_calls);

    let mut no_pod = claims().to_json();
    no_pod["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("pod");
    let m = denied(attest(&a, &env.rsa.sign(&no_pod)).await);
    assert!(m.contains("not bound to a pod"), "{m}");
    Ok(())
}

#[tokio::test]
async fn pod_and_node_must_match_the_api_server() -> TestResult {
    let env = Env::new();
    let a = env.jwks_attestor();
    env.fake.set_node("node-2", "node-uid-2", &[]);

    // The token claims node-2, but the pod runs on node-1.
    let wrong_node = pod_claims(POD, POD_UID, Some(("node-2", "node-uid-2")));
    let m = denied(attest(&a, &env.rsa.sign(&wrong_node.to_json())).await);
    assert!(
        m.contains("claims node \"node-2\"") && m.contains("runs on node \"node-1\""),
        "{m}"
    );

    // Same pod name, another UID: a stale token of a re-created pod.
    let stale = pod_claims(POD, "old-pod-uid", Some((NODE, NODE_UID)));
    let m = denied(attest(&a, &env.rsa.sign(&stale.to_json())).await);
    assert!(
        m.contains(&format!("has UID \"{POD_UID}\"")) && m.contains("old-pod-uid"),
        "{m}"
    );

    // The node was re-created under the same name.
    let old_node = pod_claims(POD, POD_UID, Some((NODE, "old-node-uid")));
    let m = denied(attest(&a, &env.rsa.sign(&old_node.to_json())).await);
    assert!(m.contains("claims node UID \"old-node-uid\""), "{m}");

    // The pod is gone.
    let token = env.rsa.sign(&claims().to_json());
    env.fake.remove_pod("sigil", POD);
    let m = denied(attest(&a, &token).await);
    assert!(m.contains("does not exist"), "{m}");

    // The pod's node is gone.
    env.fake.set_pod("sigil", POD, POD_UID, "node-9", &[]);
    let c = pod_claims(POD, POD_UID, None);
    let m = denied(attest(&a, &env.rsa.sign(&c.to_json())).await);
    assert!(
        m.contains("node \"node-9\"") && m.contains("does not exist"),
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn api_server_trouble_is_unavailable_not_denied() -> TestResult {
    let env = Env::new();
    let a = env.jwks_attestor();
    let token = env.rsa.sign(&claims().to_json());
    env.fake.fail_api_with(Some(500));
    let m = unavailable(attest(&a, &token).await);
    assert!(m.contains("HTTP 500"), "{m}");
    env.fake.fail_api_with(Some(403));
    let m = unavailable(attest(&a, &token).await);
    assert!(m.contains("RBAC"), "{m}");
    env.fake.fail_api_with(None);
    // A wrong API bearer token: the fake answers 401.
    std::fs::write(&env.api_token_file, "not-the-token")?;
    let m = unavailable(attest(&a, &token).await);
    assert!(m.contains("api_token_file"), "{m}");
    // The token file is read for every call (it rotates).
    std::fs::write(&env.api_token_file, format!("{API_TOKEN}\n"))?;
    attest(&a, &token).await?;

    // An API server the CA does not vouch for.
    let other = FakeK8s::start();
    let mut cfg = env.cluster(Verification::JwksFile(env.jwks_file(&[&env.rsa])));
    cfg.api_server_url = other.url.clone();
    let a = env.attestor_for(cfg);
    let m = unavailable(attest(&a, &token).await);
    assert!(m.contains("TLS"), "{m}");
    Ok(())
}

#[tokio::test]
async fn malformed_payloads_are_invalid_and_unknown_clusters_denied() -> TestResult {
    let env = Env::new();
    let a = env.jwks_attestor();
    for bad in [
        &b""[..],
        b"not json",
        b"[]",
        br#"{"cluster": "prod"}"#,
        br#"{"cluster": "prod", "token": ""}"#,
        br#"{"cluster": "", "token": "a.b.c"}"#,
        br#"{"cluster": "prod", "token": "not-a-jwt"}"#,
        br#"{"cluster": "prod", "token": "a.b.c"}"#,
        br#"{"cluster": 7, "token": "a.b.c"}"#,
    ] {
        let r = a.attest(bad, &mut NoChallenge).await;
        assert!(
            matches!(r, Err(AttestError::InvalidPayload(_))),
            "{}: {r:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let huge = vec![b' '; MAX_PAYLOAD_LEN + 1];
    assert!(matches!(
        a.attest(&huge, &mut NoChallenge).await,
        Err(AttestError::InvalidPayload(_))
    ));
    let token = env.rsa.sign(&claims().to_json());
    let m = denied(
        a.attest(&payload("staging", &token), &mut NoChallenge)
            .await,
    );
    assert!(m.contains("cluster \"staging\" is not configured"), "{m}");
    Ok(())
}

#[test]
fn construction_fails_fast_on_bad_files() {
    let env = Env::new();
    let td = TrustDomain::new("example.org").unwrap();
    let build = |cfg: ClusterConfig| {
        let mut m = BTreeMap::new();
        m.insert(cfg.name.clone(), cfg);
        K8sPsatAttestor::new(td.clone(), &m).map(|_| ())
    };
    let jwks = env.jwks_file(&[&env.rsa]);
    assert!(build(env.cluster(Verification::JwksFile(jwks.clone()))).is_ok());
    let missing = env.dir.path().join("missing");
    for (cfg, key) in [
        (
            env.cluster(Verification::JwksFile(missing.clone())),
            "jwks_file",
        ),
        (
            ClusterConfig {
                api_ca_file: missing.clone(),
                ..env.cluster(Verification::JwksFile(jwks.clone()))
            },
            "api_ca_file",
        ),
        (
            ClusterConfig {
                api_token_file: missing.clone(),
                ..env.cluster(Verification::JwksFile(jwks.clone()))
            },
            "api_token_file",
        ),
        (
            env.cluster(Verification::OidcDiscovery {
                url: "https://issuer".into(),
                ca_file: missing.clone(),
            }),
            "ca_file",
        ),
    ] {
        let err = build(cfg).expect_err(key);
        assert!(format!("{err:#}").contains(key), "{key}: {err:#}");
    }
    let bad_jwks = env.dir.path().join("bad.json");
    std::fs::write(&bad_jwks, r#"{"keys": []}"#).unwrap();
    let err = build(env.cluster(Verification::JwksFile(bad_jwks))).expect_err("empty JWKS");
    assert!(format!("{err:#}").contains("no RSA or EC"), "{err:#}");
    assert!(K8sPsatAttestor::new(td, &BTreeMap::new()).is_err());
}

fn file_cluster(extra: &str) -> BTreeMap<String, FileCluster> {
    let text =
        format!("[clusters.prod]\nservice_account_allow_list = [\"sigil:sigil-agent\"]\n{extra}");
    toml::from_str::<FileK8sPsat>(&text).unwrap().clusters
}

#[test]
fn cluster_config_defaults_and_in_cluster_api_server() -> anyhow::Result<()> {
    let c = resolve_clusters(
        file_cluster("jwks_file = \"/etc/jwks.json\"\n"),
        Some("https://10.96.0.1:443"),
    )?;
    let prod = &c["prod"];
    assert_eq!(prod.audience, "sigil-server");
    assert_eq!(
        prod.service_account_allow_list,
        vec![("sigil".to_string(), "sigil-agent".to_string())]
    );
    assert_eq!(prod.api_server_url, "https://10.96.0.1:443");
    assert_eq!(prod.api_token_file, PathBuf::from(IN_CLUSTER_TOKEN_FILE));
    assert_eq!(prod.api_ca_file, PathBuf::from(IN_CLUSTER_CA_FILE));
    assert_eq!(
        prod.verification,
        Verification::JwksFile("/etc/jwks.json".into())
    );

    let c = resolve_clusters(
        file_cluster(
            "oidc_discovery_url = \"https://issuer.example/\"\naudience = \"spire\"\napi_server_url = \"https://api:6443\"\napi_ca_file = \"/ca.pem\"\n",
        ),
        None,
    )?;
    assert_eq!(
        c["prod"].verification,
        Verification::OidcDiscovery {
            url: "https://issuer.example".into(),
            ca_file: "/ca.pem".into()
        },
        "ca_file defaults to api_ca_file"
    );
    assert_eq!(c["prod"].audience, "spire");
    let c = resolve_clusters(
        file_cluster("use_token_review = true\napi_server_url = \"https://api:6443\"\n"),
        None,
    )?;
    assert_eq!(c["prod"].verification, Verification::TokenReview);
    Ok(())
}

#[test]
fn cluster_config_errors_name_the_key() {
    let api = "api_server_url = \"https://api:6443\"\n";
    for (text, want) in [
        (api.to_string(), "exactly one of"),
        (
            format!("{api}jwks_file = \"/j\"\nuse_token_review = true\n"),
            "exactly one of",
        ),
        (
            "jwks_file = \"/j\"\n".to_string(),
            "api_server_url is required",
        ),
        (
            "jwks_file = \"/j\"\napi_server_url = \"http://api\"\n".to_string(),
            "api_server_url",
        ),
        (
            format!("{api}oidc_discovery_url = \"issuer.example\"\n"),
            "oidc_discovery_url",
        ),
        (
            format!("{api}jwks_file = \"/j\"\nca_file = \"/c\"\n"),
            "ca_file",
        ),
        (
            format!("{api}jwks_file = \"/j\"\naudience = \"\"\n"),
            "audience",
        ),
    ] {
        let err = resolve_clusters(file_cluster(&text), None).expect_err(&text);
        assert!(format!("{err:#}").contains(want), "{text}: {err:#}");
    }
    for allow in ["[]", "[\"sigil\"]", "[\":x\"]", "[\"a:b:c\"]"] {
        let text = format!(
            "[clusters.prod]\nservice_account_allow_list = {allow}\njwks_file = \"/j\"\n{api}"
        );
        let clusters = toml::from_str::<FileK8sPsat>(&text).unwrap().clusters;
        let err = resolve_clusters(clusters, None).expect_err(allow);
        assert!(
            format!("{err:#}").contains("service_account_allow_list"),
            "{allow}: {err:#}"
        );
    }
    let text = format!(
        "[clusters.\"a/b\"]\nservice_account_allow_list = [\"a:b\"]\njwks_file = \"/j\"\n{api}"
    );
    let err = resolve_clusters(toml::from_str::<FileK8sPsat>(&text).unwrap().clusters, None)
        .expect_err("bad name");
    assert!(format!("{err:#}").contains("cluster name"), "{err:#}");
    assert!(toml::from_str::<FileK8sPsat>("[clusters.prod]\njwks = \"/j\"").is_err());
}

#[test]
fn flags_override_the_file_cluster() {
    let file = FileCluster {
        service_account_allow_list: Some(vec!["sigil:sigil-agent".into()]),
        jwks_file: Some("/file.json".into()),
        audience: Some("file".into()),
        ..Default::default()
    };
    let merged = file.clone().overridden_by(FileCluster {
        use_token_review: Some(true),
        ..Default::default()
    });
    assert_eq!(
        merged.jwks_file, None,
        "a flag's method replaces the file's"
    );
    assert_eq!(merged.use_token_review, Some(true));
    assert_eq!(merged.audience.as_deref(), Some("file"));
    let merged = file.overridden_by(FileCluster {
        audience: Some("flag".into()),
        ..Default::default()
    });
    assert_eq!(merged.audience.as_deref(), Some("flag"));
    assert_eq!(merged.jwks_file, Some("/file.json".into()));
}
