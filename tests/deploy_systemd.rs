//! `deploy/systemd/`: the units are hardened (`systemd-analyze security` scores them offline) and
//! the example configs work together: the agent's `agent.toml` attests with x509pop, so the
//! server's `server.toml` must offer it, and a real server and agent started with those files
//! (paths under `/etc/sigil/` and the state directories pointed at a temp dir) must attest.

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sigil_testkit::{tempdir, Agent, Server};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The overall exposure `systemd-analyze security --offline=true` gives `unit` (0.0 best, 10.0
/// worst).
fn exposure(unit: &str) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(repo().join(unit))
        .output()
        .expect("running systemd-analyze (from the systemd package; .ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split_once("Overall exposure level for "))
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(_, score)| score.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level for {unit}:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// The server holds the CA key: its unit must be locked down at least as well as the agent's,
/// which needs root and /proc of every process.
#[test]
fn units_are_hardened() {
    let server = exposure("deploy/systemd/sigil-server.service");
    assert!(
        server <= 3.0,
        "sigil-server.service exposure {server} > 3.0: see `systemd-analyze security --offline=true deploy/systemd/sigil-server.service`"
    );
    let agent = exposure("deploy/systemd/sigil-agent.service");
    assert!(
        agent <= 4.5,
        "sigil-agent.service exposure {agent} > 4.5: see `systemd-analyze security --offline=true deploy/systemd/sigil-agent.service`"
    );
}

/// A CA for node certificates and a node certificate from it, written where the example configs
/// expect them (`/etc/sigil/…` mapped to `etc`).
fn node_pki(etc: &Path) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "example node CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    std::fs::write(etc.join("node-ca.pem"), ca_cert.pem()).expect("writing node-ca.pem");
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().expect("node key");
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "node-1");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).expect("node cert");
    std::fs::write(etc.join("node.pem"), cert.pem()).expect("writing node.pem");
    std::fs::write(etc.join("node.key"), key.serialize_pem()).expect("writing node.key");
}

/// `deploy/systemd/<name>` with `/etc/sigil/` pointed at `etc`, written into `dir`.
fn example_config(name: &str, etc: &Path, dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(repo().join("deploy/systemd").join(name)).expect("example config");
    let text = text.replace("/etc/sigil/", &format!("{}/", etc.display()));
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing config");
    path
}

/// The example server.toml offers the node attestation the example agent.toml uses: started
/// with them (and the files they name), the agent attests and gets its SVID.
#[test]
fn example_configs_attest_an_agent() {
    let dir = tempdir();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir etc");
    node_pki(&etc);

    let server_toml = example_config("server.toml", &etc, dir.path());
    let server_dir = dir.path().join("server");
    let server = Server::start(
        &server_dir,
        &[
            "--config",
            server_toml.to_str().expect("utf-8 path"),
            "--health-address",
            "",
            // The harness reads the node address from the text ready line.
            "--log-format",
            "text",
        ],
    );

    let agent_toml = example_config("agent.toml", &etc, dir.path());
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("mkdir agent");
    let mut agent = Agent::start(
        &server,
        &agent_dir,
        &[
            "--config",
            agent_toml.to_str().expect("utf-8 path"),
            "--log-format",
            "text",
        ],
    );
    agent.wait_log(
        60,
        "the example agent.toml (x509pop) attesting to the example server.toml",
        |l| l.contains("attested to sigil-server"),
    );
}
