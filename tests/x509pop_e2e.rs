//! End-to-end tests of x509pop node attestation with real `sigil-server` / `sigil-agent`
//! processes: a test CA and node certificate made with rcgen, the server trusting the CA with
//! `--x509pop-ca-bundle`, the agent proving possession of the node key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use sigil_testkit::{create_entry, evicted_agent_attests_again, only_agent, refused_agent_log};
use sigil_testkit::{subdir, tempdir, Agent, Server};

/// A CA whose certificate is written to `<dir>/<name>.pem`.
fn make_ca(dir: &Path, name: &str) -> (PathBuf, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).expect("CA cert");
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).expect("writing CA");
    (path, Issuer::new(p, key))
}

/// A node certificate for `cn` issued by `ca`: (cert PEM path, key PEM path, leaf DER).
fn make_node(dir: &Path, cn: &str, ca: &Issuer<'static, KeyPair>) -> (PathBuf, PathBuf, Vec<u8>) {
    let key = KeyPair::generate().expect("node key");
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = vec![SanType::DnsName(
        format!("{cn}.example.org").try_into().expect("dns name"),
    )];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, ca).expect("node cert");
    let cert_path = dir.join(format!("{cn}.crt.pem"));
    let key_path = dir.join(format!("{cn}.key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("writing node cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("writing node key");
    (cert_path, key_path, cert.der().to_vec())
}

/// The node-alias entry the node certificate's CN selects.
const NODE_ALIAS: &str = "spiffe://example.org/node/node-1";

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn x509pop_flags<'a>(cert: &'a Path, key: &'a Path) -> [&'a str; 4] {
    [
        "--x509pop-cert",
        cert.to_str().expect("utf-8 path"),
        "--x509pop-key",
        key.to_str().expect("utf-8 path"),
    ]
}

#[test]
fn x509pop_attests_gets_node_alias_entries_and_refuses_untrusted_certs() {
    let dir = tempdir();
    let pki = subdir(dir.path(), "pki");
    let (ca_path, ca) = make_ca(&pki, "node-ca");
    let (_, other_ca) = make_ca(&pki, "other-ca");
    let (cert, key, leaf_der) = make_node(&pki, "node-1", &ca);
    let fingerprint = sha256_hex(&leaf_der);

    let server = Server::start(
        &dir.path().join("server"),
        &["--x509pop-ca-bundle", ca_path.to_str().expect("utf-8 path")],
    );
    // A node-alias entry matching the node certificate's CN, and a workload under it.
    server.cli_ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        NODE_ALIAS,
        "--selector",
        "x509pop:subject:cn:node-1",
    ]);
    create_entry(
        &server,
        NODE_ALIAS,
        "spiffe://example.org/web",
        &["unix:uid:1000"],
        &[],
    );

    let a_dir = subdir(dir.path(), "agent");
    let mut agent = Agent::start(&server, &a_dir, &x509pop_flags(&cert, &key));
    agent.wait_attested("SVID under the node alias");

    let (agents, agent_id) = only_agent(&server, "x509pop");
    assert_eq!(
        agent_id,
        format!("spiffe://example.org/sigil/agent/x509pop/{fingerprint}")
    );
    let text = agents.to_string();
    for sel in [
        "subject:cn:node-1",
        "san:dns:node-1.example.org",
        "ca:fingerprint:",
    ] {
        assert!(text.contains(sel), "selector {sel} missing: {agents}");
    }

    // Re-attestation with the same certificate (fresh data dir) is allowed: same agent ID.
    assert!(agent.stop().success(), "clean exit on SIGTERM");
    let b_dir = subdir(dir.path(), "agent-again");
    let mut again = Agent::start(&server, &b_dir, &x509pop_flags(&cert, &key));
    again.wait_attested("SVID after re-attestation");
    let (_, again_id) = only_agent(&server, "x509pop");
    assert_eq!(again_id, agent_id);
    // Evicted while running: an x509pop agent can still prove itself, so it attests again on
    // its own and keeps minting (a join-token agent cannot: its token is spent).
    evicted_agent_attests_again(&server, &mut again, &agent_id, "x509pop", NODE_ALIAS);
    assert!(again.stop().success());

    // A banned agent may not attest again, even with a valid certificate.
    server.cli_ok(&["agent", "ban", "--spiffe-id", &agent_id]);
    let c_dir = subdir(dir.path(), "agent-banned");
    let log = refused_agent_log(&server, &c_dir, &x509pop_flags(&cert, &key));
    assert!(log.contains("banned"), "{log}");

    // A node certificate from a CA the server does not trust is refused.
    let (bad_cert, bad_key, _) = make_node(&pki, "node-2", &other_ca);
    let d_dir = subdir(dir.path(), "agent-untrusted");
    let log = refused_agent_log(&server, &d_dir, &x509pop_flags(&bad_cert, &bad_key));
    assert!(
        log.contains("node certificate does not chain to a trusted x509pop CA"),
        "{log}"
    );
    assert!(log.contains("PermissionDenied"), "{log}");
}

#[test]
fn x509pop_is_not_offered_without_a_ca_bundle() {
    let dir = tempdir();
    let pki = subdir(dir.path(), "pki");
    let (_, ca) = make_ca(&pki, "node-ca");
    let (cert, key, _) = make_node(&pki, "node-1", &ca);
    let server = Server::start(&dir.path().join("server"), &[]);
    let a_dir = subdir(dir.path(), "agent");
    let log = refused_agent_log(&server, &a_dir, &x509pop_flags(&cert, &key));
    assert!(log.contains("unsupported attestation type"), "{log}");
    assert!(log.contains("InvalidArgument"), "{log}");
}
