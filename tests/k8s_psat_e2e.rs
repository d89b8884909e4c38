//! End-to-end test of k8s_psat node attestation with real `sigil-server` / `sigil-agent`
//! processes. No cluster runs here, so the Kubernetes side is faked in this test process: a fake
//! API server over real HTTPS on loopback (`sigil_testkit::fake_k8s`: pods, nodes) and an RS256
//! service-account issuer whose JWKS the server reads from a file (its TOML config names both).
//! The agent reads its "projected" token from a file, as in a pod.

use std::path::{Path, PathBuf};

use sigil_testkit::fake_k8s::{FakeK8s, PodClaims, TestIssuer};
use sigil_testkit::{
    create_entry, evicted_agent_attests_again, only_agent, refused_agent_log, subdir,
};
use sigil_testkit::{tempdir, Agent, Server};

const CLUSTER: &str = "test-cluster";
const NODE: &str = "node-1";
const NODE_UID: &str = "3f6c1a2e-7b8d-4c9e-a0f1-2b3c4d5e6f70";
const POD: &str = "sigil-agent-abcde";
const POD_UID: &str = "8a7b6c5d-4e3f-4a1b-9c8d-7e6f5a4b3c2d";
const POD_UID_2: &str = "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e";

fn rsa_pkcs8() -> Vec<u8> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
    key.to_pkcs8_der().expect("PKCS#8").as_bytes().to_vec()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes the server's TOML config: one k8s_psat cluster verified with `jwks` and checked
/// against the fake API server.
fn server_config(dir: &Path, fake: &FakeK8s, jwks: &Path) -> PathBuf {
    let text = format!(
        "[node_attestor.k8s_psat.clusters.{CLUSTER}]\n\
         service_account_allow_list = [\"sigil:sigil-agent\"]\n\
         jwks_file = {jwks:?}\n\
         {api}",
        jwks = path_str(jwks),
        api = fake.api_settings_toml(dir),
    );
    let path = dir.join("server.toml");
    std::fs::write(&path, text).expect("writing server config");
    path
}

/// The claims of a token projected into the agent pod `POD` with `pod_uid`, on `node`.
fn pod_claims(pod_uid: &str, node: (&str, &str)) -> PodClaims {
    PodClaims::new("sigil", "sigil-agent", POD, pod_uid, Some(node))
}

/// Writes `claims` signed by `issuer` to `path`, as the kubelet projects a token.
fn project_token(path: &Path, issuer: &TestIssuer, claims: &PodClaims) {
    std::fs::write(path, issuer.sign(&claims.to_json())).expect("writing token");
}

fn k8s_flags(token: &Path) -> [&str; 4] {
    [
        "--k8s-psat-cluster",
        CLUSTER,
        "--k8s-psat-token-path",
        path_str(token),
    ]
}

#[test]
fn k8s_psat_agent_attests_gets_node_alias_entries_and_wrong_audience_is_refused() {
    let dir = tempdir();
    let k8s_dir = subdir(dir.path(), "k8s");
    let fake = FakeK8s::start();
    fake.set_node(
        NODE,
        NODE_UID,
        &[
            ("kubernetes.io/hostname", NODE),
            ("sigil.example/pool", "blue"),
        ],
    );
    fake.set_pod("sigil", POD, POD_UID, NODE, &[("app", "sigil-agent")]);
    let issuer = TestIssuer::rs256("sa-key-1", &rsa_pkcs8());
    let jwks = k8s_dir.join("jwks.json");
    std::fs::write(&jwks, TestIssuer::jwks(&[&issuer]).to_string()).expect("writing JWKS");
    let config = server_config(&k8s_dir, &fake, &jwks);

    let server = Server::start(&dir.path().join("server"), &["--config", path_str(&config)]);
    assert!(
        server
            .log_text()
            .contains("k8s_psat node attestation enabled"),
        "{}",
        server.log_text()
    );
    // A node-alias entry for every agent of this cluster in the blue pool, and a workload.
    let alias = "spiffe://example.org/k8s/test-cluster/blue-nodes";
    server.cli_ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        alias,
        "--selector",
        "k8s_psat:cluster:test-cluster",
        "--selector",
        "k8s_psat:agent_node_label:sigil.example/pool:blue",
    ]);
    create_entry(
        &server,
        alias,
        "spiffe://example.org/web",
        &["unix:uid:1000"],
        &[],
    );

    // The kubelet's projected token, as mounted in the agent pod.
    let a_dir = subdir(dir.path(), "agent");
    let token_path = a_dir.join("sigil-agent-token");
    project_token(&token_path, &issuer, &pod_claims(POD_UID, (NODE, NODE_UID)));
    let mut agent = Agent::start(&server, &a_dir, &k8s_flags(&token_path));
    agent.wait_attested("SVID under the node alias");

    let (agents, agent_id) = only_agent(&server, "k8s_psat");
    assert_eq!(
        agent_id,
        format!("spiffe://example.org/sigil/agent/k8s_psat/{CLUSTER}/{NODE_UID}")
    );
    let text = agents.to_string();
    for sel in [
        "cluster:test-cluster".to_string(),
        "agent_ns:sigil".into(),
        "agent_sa:sigil-agent".into(),
        format!("agent_pod_name:{POD}"),
        format!("agent_pod_uid:{POD_UID}"),
        format!("agent_node_name:{NODE}"),
        format!("agent_node_uid:{NODE_UID}"),
        "agent_node_label:sigil.example/pool:blue".into(),
    ] {
        assert!(text.contains(&sel), "selector {sel} missing: {agents}");
    }

    // The agent pod is re-created (new UID) and the kubelet writes its new token; the old
    // token is now stale. Evicted, the agent attests again — with the token read afresh —
    // as the same agent (same node) and keeps minting.
    fake.set_pod("sigil", POD, POD_UID_2, NODE, &[("app", "sigil-agent")]);
    project_token(
        &token_path,
        &issuer,
        &pod_claims(POD_UID_2, (NODE, NODE_UID)),
    );
    let agents = evicted_agent_attests_again(&server, &mut agent, &agent_id, "k8s_psat", alias);
    assert!(
        agents
            .to_string()
            .contains(&format!("agent_pod_uid:{POD_UID_2}")),
        "{agents}"
    );
    assert!(agent.stop().success(), "clean exit on SIGTERM");

    // A token projected for another audience is refused; the agent says why and exits.
    let b_dir = subdir(dir.path(), "agent-wrong-audience");
    let bad_token = b_dir.join("token");
    let mut claims = pod_claims(POD_UID_2, (NODE, NODE_UID));
    claims.audience = vec!["https://kubernetes.default.svc".into()];
    project_token(&bad_token, &issuer, &claims);
    let log = refused_agent_log(&server, &b_dir, &k8s_flags(&bad_token));
    assert!(log.contains("k8s_psat node attestation failed"), "{log}");
    assert!(
        log.contains(
            "audience [\"https://kubernetes.default.svc\"] does not include \"sigil-server\""
        ),
        "{log}"
    );
    assert!(log.contains("PermissionDenied"), "{log}");

    // A token of a pod that is not on the node it claims is refused too.
    let c_dir = subdir(dir.path(), "agent-wrong-node");
    let moved = c_dir.join("token");
    fake.set_node("node-2", "node-2-uid", &[]);
    project_token(
        &moved,
        &issuer,
        &pod_claims(POD_UID_2, ("node-2", "node-2-uid")),
    );
    let log = refused_agent_log(&server, &c_dir, &k8s_flags(&moved));
    assert!(log.contains("runs on node"), "{log}");

    let (_, still) = only_agent(&server, "k8s_psat");
    assert_eq!(still, agent_id, "the refused agents were not registered");
}
