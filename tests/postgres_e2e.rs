//! `sigil-server` on PostgreSQL end to end: a real server with `[datastore] type = "postgres"`
//! on a database of its own (`sigil_testkit::postgres`), entries made with the CLI, a real agent
//! attesting with a join token, and a workload fetching its SVID from the agent; the data is in
//! PostgreSQL and survives a server restart. A server given a database it cannot reach refuses
//! to start, saying what to check and never printing the password.

use std::process::Command;

use sigil_testkit::postgres::TestDatabase;
use sigil_testkit::{binary, create_entry, join_token, subdir, tempdir, Agent, Server};

/// `sigil-agent api fetch x509` on `socket`: (success, stdout, stderr).
fn fetch_x509(socket: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(binary("sigil-agent"))
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(socket)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .expect("running sigil-agent api fetch");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_workload_gets_its_svid_from_a_server_on_postgres() {
    let db = TestDatabase::create();
    let dir = tempdir();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[datastore]\ntype = \"postgres\"\nconnection_string = \"{}\"\n",
            db.url()
        ),
    )
    .expect("writing the server config");
    let config = config.to_str().expect("UTF-8 temp path");
    let mut server = Server::start(&subdir(dir.path(), "server"), &["--config", config]);
    assert!(
        server.log_text().contains("PostgreSQL datastore ready"),
        "{}",
        server.log_text()
    );
    // No SQLite file: everything lives in PostgreSQL.
    assert!(!server.data_dir.join("datastore.sqlite3").exists());

    let (token, agent_id) = join_token(&server);
    let uid = nix::unistd::getuid().as_raw().to_string();
    let workload = "spiffe://example.org/pg/workload";
    let entry_id = create_entry(
        &server,
        &agent_id,
        workload,
        &[&format!("unix:uid:{uid}")],
        &[],
    );
    assert_eq!(
        db.psql(&format!(
            "SELECT spiffe_id FROM entries WHERE id = '{entry_id}'"
        ))
        .trim(),
        workload
    );

    let agent = Agent::start(
        &server,
        &subdir(dir.path(), "agent"),
        &["--join-token", &token],
    );
    agent.wait_svids_for(&[workload], 60);
    let (ok, stdout, stderr) = fetch_x509(&agent.socket_path());
    assert!(ok, "fetch failed: {stderr}");
    assert!(stdout.contains(workload), "{stdout}");
    // The token was consumed in PostgreSQL and the agent is recorded there.
    assert_eq!(db.psql("SELECT COUNT(*) FROM join_tokens").trim(), "0");
    assert_eq!(
        db.psql("SELECT spiffe_id FROM agents").trim(),
        agent_id,
        "the attested agent"
    );

    // A restarted server finds its entries and agents in the database.
    server.restart();
    let listed = server.cli_json(&["entry", "show"]);
    assert!(listed.to_string().contains(&entry_id), "{listed}");
    let agents = server.cli_json(&["agent", "list"]);
    assert!(agents.to_string().contains(&agent_id), "{agents}");
}

#[test]
fn a_server_that_cannot_reach_its_database_says_what_to_check() {
    let dir = tempdir();
    // A socket directory nobody listens in.
    let nowhere = subdir(dir.path(), "no-postgres-here");
    let out = Command::new(binary("sigil-server"))
        .args([
            "run",
            "--trust-domain",
            "example.org",
            "--datastore-type",
            "postgres",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin").join("admin.sock"))
        .args(["--bind-address", "127.0.0.1:0", "--health-address", ""])
        .env(
            "SIGIL_DATASTORE_CONNECTION_STRING",
            format!(
                "host={} port=5432 user=sigil password=s3cret-pw dbname=sigil",
                nowhere.display()
            ),
        )
        .output()
        .expect("running sigil-server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot connect to PostgreSQL")
            && stderr.contains(&format!("host={}", nowhere.display()))
            && stderr.contains("check that the PostgreSQL server is running"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cret-pw"),
        "the password leaked: {stderr}"
    );
}
