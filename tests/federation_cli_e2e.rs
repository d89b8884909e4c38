//! End-to-end test of `sigil-server federation create|update|show|list|delete|refresh` against
//! a real server process: relationships from the CLI and from the config file, their refresh
//! status, and bad input refused with the field named. (Fetching between two real trust
//! domains is tested with the bundle endpoint.)

use sigil_testkit::{foreign_ca_pem, tempdir, Server};

/// Runs the CLI expecting failure; returns stderr.
fn cli_err(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(
        !out.status.success(),
        "sigil-server {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn relationships_are_managed_with_the_cli_and_config_ones_are_read_only() {
    let dir = tempdir();
    let pem_file = dir.path().join("configured.pem");
    std::fs::write(&pem_file, foreign_ca_pem("configured.org root")).expect("writing pem");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\n\
             [federation.federates_with.\"configured.org\"]\n\
             bundle_endpoint_url = \"https://127.0.0.1:1/bundle\"\n\
             bundle_endpoint_profile = \"https_spiffe\"\n\
             endpoint_spiffe_id = \"spiffe://configured.org/spire/server\"\n\
             trust_domain_bundle_path = \"{}\"\n",
            pem_file.display()
        ),
    )
    .expect("writing config");
    let config_path = config.to_str().expect("utf-8 path");
    let server = Server::start(&dir.path().join("server"), &["--config", config_path]);

    // The config file's relationship: listed, its initial bundle stored, not changeable.
    let shown = server.cli_json(&["federation", "show", "--id", "configured.org"]);
    assert_eq!(shown["source"], "config", "{shown}");
    assert_eq!(shown["bundle"]["x509_roots"], 1, "{shown}");
    let err = cli_err(&server, &["federation", "delete", "--id", "configured.org"]);
    assert!(
        err.contains("config file") && err.contains("FailedPrecondition"),
        "{err}"
    );

    // https_web, no bundle.
    let out = server.cli_ok(&[
        "federation",
        "create",
        "--trust-domain",
        "spiffe://web.org",
        "--bundle-endpoint-url",
        "https://127.0.0.1:1/",
        "--bundle-endpoint-profile",
        "https_web",
    ]);
    assert!(
        out.contains("Federation relationship with web.org created"),
        "{out}"
    );
    assert!(out.contains("Bundle endpoint profile : https_web"), "{out}");

    // https_spiffe with its initial bundle from a file.
    let other_pem = dir.path().join("other.pem");
    std::fs::write(&other_pem, foreign_ca_pem("other.org root")).expect("writing pem");
    let created = server.cli_json(&[
        "federation",
        "create",
        "--trust-domain",
        "other.org",
        "--bundle-endpoint-url",
        "https://127.0.0.1:1/bundle",
        "--bundle-endpoint-profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://other.org/spire/server",
        "--trust-domain-bundle-path",
        other_pem.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(
        created["endpoint_spiffe_id"],
        "spiffe://other.org/spire/server"
    );
    assert_eq!(created["source"], "datastore");
    assert_eq!(created["bundle"]["sequence_number"], 1, "{created}");
    // The bundle is a federated bundle like one from `bundle set`.
    let bundles = server.cli_json(&["bundle", "list"]);
    let names: Vec<&str> = bundles["bundles"]
        .as_array()
        .expect("bundles")
        .iter()
        .filter_map(|b| b["trust_domain"].as_str())
        .collect();
    assert_eq!(names, ["configured.org", "other.org"]);

    let list = server.cli_json(&["federation", "list"]);
    let rows: Vec<(&str, &str)> = list["relationships"]
        .as_array()
        .expect("relationships")
        .iter()
        .map(|r| {
            (
                r["trust_domain"].as_str().unwrap_or(""),
                r["source"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("configured.org", "config"),
            ("other.org", "datastore"),
            ("web.org", "datastore")
        ]
    );
    let text = server.cli_ok(&["federation", "list"]);
    assert!(
        text.starts_with("Found 3 federation relationships"),
        "{text}"
    );

    // Refresh: this server has no fetcher yet, so it fails saying so; the status shows it and
    // the stored bundle is unchanged.
    let err = cli_err(&server, &["federation", "refresh", "--id", "other.org"]);
    assert!(err.contains("refreshing the bundle of other.org"), "{err}");
    let shown = server.cli_json(&["federation", "show", "--id", "other.org"]);
    assert!(
        shown["status"]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{shown}"
    );
    assert!(
        shown["status"]["consecutive_failures"].as_u64() >= Some(1),
        "{shown}"
    );
    assert_eq!(shown["bundle"]["sequence_number"], 1, "{shown}");
    let text = server.cli_ok(&["federation", "show", "--id", "other.org"]);
    assert!(
        text.contains("Last error") && text.contains("Next attempt"),
        "{text}"
    );

    // Update to https_web.
    let updated = server.cli_json(&[
        "federation",
        "update",
        "--trust-domain",
        "other.org",
        "--bundle-endpoint-url",
        "https://other.example/bundle",
        "--bundle-endpoint-profile",
        "https_web",
    ]);
    assert_eq!(updated["bundle_endpoint_profile"], "https_web");
    assert_eq!(updated["endpoint_spiffe_id"], "");
    assert_eq!(updated["created_at"], created["created_at"]);

    // Bad input: refused, naming what is wrong.
    let base = |td: &'static str, url: &'static str, profile: &'static str| {
        vec![
            "federation",
            "create",
            "--trust-domain",
            td,
            "--bundle-endpoint-url",
            url,
            "--bundle-endpoint-profile",
            profile,
        ]
    };
    let mut duplicate = base("web.org", "https://127.0.0.1:1/", "https_web");
    duplicate.push("--output");
    duplicate.push("json");
    for (args, says) in [
        (
            base("example.org", "https://o.org", "https_web"),
            "own trust domain",
        ),
        (
            base("new.org", "http://o.org", "https_web"),
            "bundle_endpoint_url",
        ),
        (
            base("new.org", "https://o.org", "https_spiffe"),
            "--endpoint-spiffe-id",
        ),
        (base("new.org", "https://o.org", "https"), "https_web"),
        (
            base("spiffe://new.org/x", "https://o.org", "https_web"),
            "has no path",
        ),
        (duplicate, "AlreadyExists"),
    ] {
        let err = cli_err(&server, &args);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let mut spiffe_without_bundle = base("new.org", "https://o.org", "https_spiffe");
    spiffe_without_bundle.extend(["--endpoint-spiffe-id", "spiffe://new.org/s"]);
    let err = cli_err(&server, &spiffe_without_bundle);
    assert!(err.contains("bundle set --id new.org"), "{err}");
    let err = cli_err(&server, &["federation", "show", "--id", "none.org"]);
    assert!(err.contains("NotFound"), "{err}");

    // Delete: gone from the list, its bundle stays.
    let out = server.cli_ok(&["federation", "delete", "--id", "other.org"]);
    assert!(out.contains("deleted"), "{out}");
    let err = cli_err(&server, &["federation", "delete", "--id", "other.org"]);
    assert!(err.contains("NotFound"), "{err}");
    let list = server.cli_json(&["federation", "list"]);
    assert_eq!(list["relationships"].as_array().map(Vec::len), Some(2));
    let bundles = server.cli_json(&["bundle", "list"]);
    assert_eq!(bundles["bundles"].as_array().map(Vec::len), Some(2));
}
