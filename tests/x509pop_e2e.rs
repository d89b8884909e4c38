//! End-to-end tests of x509pop node attestation with real `sigil-server` / `sigil-agent`
//! processes: a test CA and node certificate made with rcgen, the server trusting the CA with
//! `--x509pop-ca-bundle`, the agent proving possession of the node key.

mod support;

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use support::{tempdir, Agent, Server};

fn minted(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("X509-SVIDs minted"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("signed=")))
        .filter_map(|n| n.parse::<usize>().ok())
        .sum()
}

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

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn agent_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("agent dir");
    d
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
    let pki = agent_dir(dir.path(), "pki");
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
        "spiffe://example.org/node/node-1",
        "--selector",
        "x509pop:subject:cn:node-1",
    ]);
    server.cli_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/node/node-1",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--selector",
        "unix:uid:1000",
    ]);

    let a_dir = agent_dir(dir.path(), "agent");
    let mut agent = Agent::start(&server, &a_dir, &x509pop_flags(&cert, &key));
    agent.wait_log(30, "attestation", |l| {
        l.contains("attested to sigil-server")
    });
    agent.wait_log(30, "SVID under the node alias", |l| minted(l) >= 1);

    let agents = server.cli_json(&["agent", "list"]);
    let list = agents["agents"].as_array().expect("agents");
    assert_eq!(list.len(), 1, "{agents}");
    assert_eq!(list[0]["attestation_type"], "x509pop", "{agents}");
    let agent_id = list[0]["spiffe_id"].as_str().expect("id").to_string();
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
    let b_dir = agent_dir(dir.path(), "agent-again");
    let mut again = Agent::start(&server, &b_dir, &x509pop_flags(&cert, &key));
    again.wait_log(30, "re-attestation", |l| {
        l.contains("attested to sigil-server")
    });
    again.wait_log(30, "SVID after re-attestation", |l| minted(l) >= 1);
    let agents = server.cli_json(&["agent", "list"]);
    assert_eq!(
        agents["agents"].as_array().map(Vec::len),
        Some(1),
        "{agents}"
    );
    // Evicted while running: an x509pop agent can still prove itself, so it attests again on
    // its own and keeps minting (a join-token agent cannot: its token is spent).
    server.cli_ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    again.wait_log(60, "re-attestation after eviction", |l| {
        l.contains("attested again with x509pop")
    });
    let agents = server.cli_json(&["agent", "list"]);
    assert_eq!(
        agents["agents"][0]["spiffe_id"],
        agent_id.as_str(),
        "{agents}"
    );
    let minted_before = minted(&again.log_text());
    server.cli_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/node/node-1",
        "--spiffe-id",
        "spiffe://example.org/after-evict",
        "--selector",
        "unix:uid:1001",
    ]);
    again.wait_log(30, "minting after re-attestation", |l| {
        minted(l) > minted_before
    });
    assert!(again.stop().success());

    // A banned agent may not attest again, even with a valid certificate.
    server.cli_ok(&["agent", "ban", "--spiffe-id", &agent_id]);
    let c_dir = agent_dir(dir.path(), "agent-banned");
    let mut banned = Agent::start(&server, &c_dir, &x509pop_flags(&cert, &key));
    let status = banned.wait_exit(30);
    assert!(!status.success());
    assert!(
        banned.log_text().contains("banned"),
        "{}",
        banned.log_text()
    );

    // A node certificate from a CA the server does not trust is refused.
    let (bad_cert, bad_key, _) = make_node(&pki, "node-2", &other_ca);
    let d_dir = agent_dir(dir.path(), "agent-untrusted");
    let mut untrusted = Agent::start(&server, &d_dir, &x509pop_flags(&bad_cert, &bad_key));
    let status = untrusted.wait_exit(30);
    assert!(!status.success());
    let log = untrusted.log_text();
    assert!(
        log.contains("node certificate does not chain to a trusted x509pop CA"),
        "{log}"
    );
    assert!(log.contains("PermissionDenied"), "{log}");
}

#[test]
fn x509pop_is_not_offered_without_a_ca_bundle() {
    let dir = tempdir();
    let pki = agent_dir(dir.path(), "pki");
    let (_, ca) = make_ca(&pki, "node-ca");
    let (cert, key, _) = make_node(&pki, "node-1", &ca);
    let server = Server::start(&dir.path().join("server"), &[]);
    let a_dir = agent_dir(dir.path(), "agent");
    let mut agent = Agent::start(&server, &a_dir, &x509pop_flags(&cert, &key));
    let status = agent.wait_exit(30);
    assert!(!status.success());
    let log = agent.log_text();
    assert!(log.contains("unsupported attestation type"), "{log}");
    assert!(log.contains("InvalidArgument"), "{log}");
}
