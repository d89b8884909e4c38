//! `sigil-server` on PostgreSQL end to end: a real server with `[datastore] type = "postgres"`
//! on a database of its own (`sigil_testkit::postgres`), entries made with the CLI, a real agent
//! attesting with a join token, and a workload fetching its SVID from the agent; the data is in
//! PostgreSQL and survives a server restart. A server given a database it cannot reach refuses
//! to start, saying what to check and never printing the password. A server whose database goes
//! away for a while (a cluster of the test's own, stopped and started) keeps running unready,
//! refuses writes with a clear error while agents keep serving SVIDs, and recovers by itself.

use std::process::Command;
use std::time::{Duration, Instant};

use sigil_testkit::postgres::{TestCluster, TestDatabase};
use sigil_testkit::{
    binary, create_entry, free_port, http_get, join_token, subdir, tempdir, wait_for, Agent, Server,
};

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

/// Runs `sigil-server <args>` against `server`'s admin socket, failing the test if it has not
/// answered within `secs` (a CLI that hangs on a datastore outage is a failure too).
fn cli_within(server: &Server, args: &[&str], secs: u64) -> std::process::Output {
    let mut child = Command::new(binary("sigil-server"))
        .args(args)
        .arg("--admin-socket")
        .arg(&server.admin_socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running sigil-server CLI");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("waiting for the CLI").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sigil-server {args:?} did not answer within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("the CLI's output")
}

/// `GET /ready` on `address`: (HTTP status code, body).
fn ready(address: &str) -> (u16, String) {
    let answer = http_get(address, "/ready");
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// How long the database stays down.
const OUTAGE: Duration = Duration::from_secs(30);

#[test]
fn the_server_rides_out_a_postgres_outage_and_recovers_without_restart() {
    let mut cluster = TestCluster::start();
    let db = cluster.create_database();
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
    let health = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start(
        &subdir(dir.path(), "server"),
        &[
            "--config",
            config.to_str().expect("UTF-8 temp path"),
            "--health-address",
            &health,
        ],
    );
    assert_eq!(ready(&health).0, 200, "{:?}", ready(&health));
    let (token, agent_id) = join_token(&server);
    let sel = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    let workload = "spiffe://example.org/pg/outage/before";
    create_entry(&server, &agent_id, workload, &[&sel], &[]);
    let agent = Agent::start(
        &server,
        &subdir(dir.path(), "agent"),
        &["--join-token", &token],
    );
    agent.wait_svids_for(&[workload], 60);

    // The outage.
    cluster.stop();
    let down = Instant::now();
    let reason = wait_for(30, "/ready answering 503 during the outage", || {
        let (code, body) = ready(&health);
        (code == 503).then_some(body)
    });
    assert!(reason.contains("datastore"), "{reason}");
    // A write is refused, saying why, and not stored (checked after recovery).
    let lost = "spiffe://example.org/pg/outage/refused";
    let out = cli_within(
        &server,
        &[
            "entry",
            "create",
            "--parent-id",
            &agent_id,
            "--spiffe-id",
            lost,
            "--selector",
            &sel,
        ],
        30,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a write acknowledged during the outage: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("datastore unavailable") && stderr.contains("PostgreSQL"),
        "the CLI's error does not name the datastore: {stderr}"
    );
    eprintln!("during the outage: /ready: {reason}; entry create: {stderr}");
    // The workload keeps its SVID from the agent, all through the outage.
    while down.elapsed() < OUTAGE {
        let (ok, stdout, stderr) = fetch_x509(&agent.socket_path());
        assert!(ok && stdout.contains(workload), "{stdout}{stderr}");
        assert!(
            server
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_none()),
            "the server exited during the outage; log:\n{}",
            server.log_text()
        );
        assert_eq!(ready(&health).0, 503);
        std::thread::sleep(Duration::from_secs(2));
    }

    // Recovery, without a restart.
    let pid = server.child.as_ref().map(|c| c.id());
    cluster.start_again();
    wait_for(30, "/ready answering 200 after the outage", || {
        (ready(&health).0 == 200).then_some(())
    });
    assert_eq!(server.child.as_ref().map(|c| c.id()), pid);
    let after = "spiffe://example.org/pg/outage/after";
    create_entry(&server, &agent_id, after, &[&sel], &[]);
    agent.wait_svids_for(&[workload, after], 60);
    let (ok, stdout, stderr) = fetch_x509(&agent.socket_path());
    assert!(ok && stdout.contains(after), "{stdout}{stderr}");
    let listed = server.cli_json(&["entry", "show"]).to_string();
    assert!(
        !listed.contains(lost),
        "a refused write was stored: {listed}"
    );
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
