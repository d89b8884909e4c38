//! End-to-end test of the bundle publisher (`[bundle_publisher.k8s_configmap]`) with a real
//! `sigil-server` process. No cluster runs here: the fake Kubernetes API server
//! (`sigil_testkit::fake_k8s`, real HTTPS on loopback, ConfigMaps in memory) stands in for it, named
//! by the server's TOML config with its CA and bearer token.

use std::path::{Path, PathBuf};

use sigil_testkit::fake_k8s::FakeK8s;
use sigil_testkit::{tempdir, wait_for, Server};

const NS: &str = "sigil";
const NAME: &str = "sigil-bundle";
const KEY: &str = "bundle.pem";

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The server's TOML config: publish the bundle into the fake API server's ConfigMap
/// `sigil/sigil-bundle`, key `bundle.pem` (namespace given: the test is not in a pod).
fn server_config(dir: &Path, fake: &FakeK8s) -> PathBuf {
    std::fs::create_dir_all(dir).expect("config dir");
    let text = format!(
        "[bundle_publisher.k8s_configmap]\nnamespace = {NS:?}\n{}",
        fake.api_settings_toml(dir)
    );
    let path = dir.join("server.toml");
    std::fs::write(&path, text).expect("writing server config");
    path
}

fn published_lines(server: &Server) -> usize {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains("trust bundle published to the ConfigMap"))
        .count()
}

#[test]
fn server_publishes_its_bundle_into_the_configmap() {
    let dir = tempdir();
    let fake = FakeK8s::start();
    // Not reachable at first (as at pod start, or before the Role is applied): the server still
    // gets ready, and publishes once the API server answers.
    fake.fail_api_with(Some(503));
    let config = server_config(&dir.path().join("k8s"), &fake);
    let mut server = Server::start(&dir.path().join("server"), &["--config", path_str(&config)]);
    wait_for(30, "a failed attempt logged", || {
        server
            .log_text()
            .contains("publishing the trust bundle to the ConfigMap failed")
            .then_some(())
    });
    assert!(fake.configmap(NS, NAME).is_none());
    fake.fail_api_with(None);

    let shown = server.cli_ok(&["bundle", "show"]);
    assert!(shown.starts_with("-----BEGIN CERTIFICATE-----"), "{shown}");
    let published = wait_for(30, "the ConfigMap", || fake.configmap_data(NS, NAME, KEY));
    assert_eq!(
        published, shown,
        "the ConfigMap holds exactly `bundle show`"
    );
    let cm = fake.configmap(NS, NAME).expect("ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], NS);
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "sigil-server"
    );
    wait_for(10, "the info line", || {
        (published_lines(&server) == 1).then_some(())
    });
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("trust bundle published to the ConfigMap"))
        .expect("published line");
    for field in [
        "namespace=sigil",
        "configmap=sigil-bundle",
        "key=bundle.pem",
        "roots=1",
        "outcome=created",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }

    // A restart finds it up to date (no write), another key someone added stays; a stale value
    // (edited by hand while the server was down) is put right on start.
    let writes = fake.count("POST ") + fake.count("PATCH ");
    server.restart();
    wait_for(30, "the second publication", || {
        (published_lines(&server) == 2).then_some(())
    });
    assert_eq!(fake.count("POST ") + fake.count("PATCH "), writes);
    assert!(server.log_text().contains("outcome=unchanged"));

    server.stop();
    fake.set_configmap(NS, NAME, &[(KEY, "stale"), ("README", "keep")]);
    server.restart();
    wait_for(30, "the bundle restored", || {
        (fake.configmap_data(NS, NAME, KEY).as_deref() == Some(shown.as_str())).then_some(())
    });
    assert_eq!(
        fake.configmap_data(NS, NAME, "README").as_deref(),
        Some("keep")
    );
    assert_eq!(server.cli_ok(&["bundle", "show"]), shown, "same CA");
}
