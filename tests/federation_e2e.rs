//! End-to-end test of federated trust bundles: `sigil-server bundle set|list|delete` against a
//! real server, and a real agent receiving exactly the bundles its entries federate with.

use sigil_testkit::{alias_token, create_entry, foreign_ca_pem, subdir, tempdir, wait_status};
use sigil_testkit::{Agent, Server};

/// The federated trust domains an agent's status reports.
fn federated(status: &serde_json::Value) -> Vec<String> {
    status["federated_trust_domains"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

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
fn federated_bundles_are_set_listed_deleted_and_reach_the_agent() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let token = alias_token(&server, "spiffe://example.org/node-a");
    let entry_id = create_entry(
        &server,
        "spiffe://example.org/node-a",
        "spiffe://example.org/web",
        &["unix:uid:1000"],
        &["--federates-with", "spiffe://other.org"],
    );

    // other.org as PEM roots, named by its trust domain ID.
    let other_pem = foreign_ca_pem("other.org root");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, &other_pem).expect("writing other.pem");
    let other_path = other_file.to_str().expect("utf-8 path");
    let out = server.cli_ok(&[
        "bundle",
        "set",
        "--id",
        "spiffe://other.org",
        "--path",
        other_path,
    ]);
    assert!(
        out.contains("Federated bundle of other.org set (sequence 1, 1 X.509 root, 0 JWT keys)"),
        "{out}"
    );
    // third.org as a SPIFFE bundle document (this server's own, standing in), by bare name.
    let third_file = dir.path().join("third.json");
    std::fs::write(
        &third_file,
        server.cli_ok(&["bundle", "show", "--format", "spiffe"]),
    )
    .expect("writing third.json");
    let third_path = third_file.to_str().expect("utf-8 path");
    let set = server.cli_json(&[
        "bundle",
        "set",
        "--id",
        "third.org",
        "--path",
        third_path,
        "--format",
        "spiffe",
    ]);
    assert_eq!(set["trust_domain"], "third.org", "{set}");
    assert!(
        set["spiffe_bundle"]["keys"]
            .as_array()
            .is_some_and(|k| k.len() >= 2),
        "X.509 root and JWT key: {set}"
    );

    // Listed, ordered by name; the server's own bundle is not among them.
    let list = server.cli_json(&["bundle", "list"]);
    let bundles = list["bundles"].as_array().expect("bundles");
    let names: Vec<&str> = bundles
        .iter()
        .filter_map(|b| b["trust_domain"].as_str())
        .collect();
    assert_eq!(names, ["other.org", "third.org"], "{list}");
    assert_eq!(
        sigil::x509::parse_pem_certs(bundles[0]["x509_pem"].as_str().expect("pem"))
            .expect("PEM in list"),
        sigil::x509::parse_pem_certs(&other_pem).expect("our PEM")
    );
    let text = server.cli_ok(&["bundle", "list"]);
    assert!(text.starts_with("Found 2 federated bundles"), "{text}");
    assert!(
        text.contains("TRUST DOMAIN") && text.contains("other.org"),
        "{text}"
    );

    // Refused: the server's own trust domain, bad input, a workload ID as --id.
    let err = cli_err(
        &server,
        &["bundle", "set", "--id", "example.org", "--path", other_path],
    );
    assert!(err.contains("own trust domain"), "{err}");
    let err = cli_err(
        &server,
        &["bundle", "set", "--id", "other.org", "--path", third_path],
    );
    assert!(
        err.contains("invalid x509_pem") && err.contains("InvalidArgument"),
        "{err}"
    );
    let err = cli_err(
        &server,
        &["bundle", "delete", "--id", "spiffe://other.org/workload"],
    );
    assert!(err.contains("has no path"), "{err}");

    // The agent gets other.org only: its entry does not federate with third.org.
    let agent_dir = subdir(dir.path(), "agent");
    let mut agent = Agent::start(&server, &agent_dir, &["--join-token", &token]);
    wait_status(&agent, 30, "other.org at the agent", |s| {
        s["synced"] == true && federated(s) == ["other.org"]
    });

    // The entry starts federating with third.org too: pushed without a reconnect.
    server.cli_ok(&[
        "entry",
        "update",
        "--entry-id",
        &entry_id,
        "--federates-with",
        "other.org",
        "--federates-with",
        "third.org",
    ]);
    wait_status(&agent, 10, "third.org at the agent", |s| {
        federated(s) == ["other.org", "third.org"]
    });

    // Deleted on the server: gone from the list and from the agent.
    let out = server.cli_json(&["bundle", "delete", "--id", "other.org"]);
    assert_eq!(out["deleted"], "other.org");
    let list = server.cli_json(&["bundle", "list"]);
    assert_eq!(list["bundles"].as_array().map(Vec::len), Some(1), "{list}");
    wait_status(&agent, 10, "other.org removed at the agent", |s| {
        federated(s) == ["third.org"]
    });
    let err = cli_err(&server, &["bundle", "delete", "--id", "other.org"]);
    assert!(err.contains("NotFound"), "{err}");

    // After a restart the agent gets the set again with its first snapshot.
    assert!(agent.stop().success(), "clean exit on SIGTERM");
    let agent = Agent::start(&server, &agent_dir, &[]);
    wait_status(&agent, 30, "third.org after restart", |s| {
        s["synced"] == true && federated(s) == ["third.org"]
    });
    let text = String::from_utf8_lossy(&agent.status_output(&[]).stdout).into_owned();
    assert!(text.contains("Federated with  : third.org"), "{text}");
}
