//! Two `sigil-server`s on one PostgreSQL database (each with its own data directory and CA),
//! three agents split between them, each configured with both addresses: entries created
//! alternately through both servers reach every agent, an entry created on one server reaches
//! a workload on an agent of the other at once (the change feed), a `kill -9` of one server
//! moves its agents to the other without attesting again while their workloads keep their
//! SVIDs and get rotations, no acknowledged entry is lost, and the killed server rejoins.

use std::process::Command;
use std::time::{Duration, Instant};

use sigil_testkit::postgres::TestDatabase;
use sigil_testkit::{
    binary, create_entry, free_port, join_token, subdir, tempdir, wait_status, Agent, Server,
};

/// Entries created through the two servers, besides the workloads'.
const ENTRIES: usize = 500;
/// Entries per `entry create --data` call, alternating between the servers.
const BATCH: usize = 10;

/// `sigil-agent api fetch x509 --output json` on `agent`'s socket: the SVIDs' (SPIFFE ID,
/// serial), or the error.
fn fetch(agent: &Agent) -> Result<Vec<(String, String)>, String> {
    let out = Command::new(binary("sigil-agent"))
        .args(["api", "fetch", "x509", "--output", "json", "--socket-path"])
        .arg(agent.socket_path())
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .expect("running sigil-agent api fetch");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fetch JSON");
    Ok(doc["svids"]
        .as_array()
        .expect("svids")
        .iter()
        .map(|s| {
            (
                s["spiffe_id"].as_str().unwrap_or_default().to_string(),
                s["serial"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// The serial of `id` among the SVIDs `agent` serves the test process, once it serves one
/// (fails after `secs`).
fn wait_workload_svid(agent: &Agent, id: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let last = fetch(agent);
        if let Ok(svids) = &last {
            if let Some((_, serial)) = svids.iter().find(|(s, _)| s == id) {
                return serial.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no SVID for {id} within {secs} s: {last:?}\nlog:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn svid_count(status: &serde_json::Value) -> usize {
    status["svids"].as_array().map_or(0, Vec::len)
}

/// Number of entries the server at `server` lists.
fn entry_count(server: &Server) -> usize {
    server.cli_json(&["entry", "show"])["entries"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn two_servers_on_one_database_share_entries_agents_and_fail_over() {
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
    // Fixed ports: the agents know both addresses, and the killed server comes back on its own.
    let (addr_a, addr_b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut server_a = Server::start(
        &subdir(dir.path(), "server-a"),
        &["--config", config, "--bind-address", &addr_a],
    );
    let server_b = Server::start(
        &subdir(dir.path(), "server-b"),
        &["--config", config, "--bind-address", &addr_b],
    );
    // Each server has its own CA; the stored bundle holds both roots, and both show it.
    let bundle = server_b.cli_ok(&["bundle", "show"]);
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    wait_until(10, "server A follows the merged bundle", || {
        server_a.cli_ok(&["bundle", "show"]) == bundle
    });

    // Agents 0 and 2 start on A, agent 1 on B; each knows both servers.
    let uid = nix::unistd::getuid().as_raw().to_string();
    let mut agents = Vec::new();
    let mut agent_ids = Vec::new();
    for k in 0..3 {
        let (first, other) = if k % 2 == 0 {
            (&server_a, &addr_b)
        } else {
            (&server_b, &addr_a)
        };
        let adir = subdir(dir.path(), &format!("agent-{k}"));
        std::fs::write(adir.join("bundle.pem"), &bundle).expect("writing the bundle");
        let (token, agent_id) = join_token(first);
        let workload = format!("spiffe://example.org/ha/workload/{k}");
        // The workload entry of agent k, through the server it does not start on.
        let through = if k % 2 == 0 { &server_b } else { &server_a };
        create_entry(
            through,
            &agent_id,
            &workload,
            &[&format!("unix:uid:{uid}")],
            &["--x509-svid-ttl", "1m"],
        );
        agents.push(Agent::start(
            first,
            &adir,
            &["--join-token", &token, "--server-address", other],
        ));
        agent_ids.push(agent_id);
    }
    for (k, agent) in agents.iter().enumerate() {
        wait_workload_svid(agent, &format!("spiffe://example.org/ha/workload/{k}"), 60);
    }

    // 500 entries, in batches alternating between the servers, split between the agents.
    let data_dir = subdir(dir.path(), "data");
    for batch in 0..ENTRIES / BATCH {
        let entries: Vec<serde_json::Value> = (batch * BATCH..(batch + 1) * BATCH)
            .map(|i| {
                serde_json::json!({
                    "spiffe_id": format!("spiffe://example.org/ha/e/{i}"),
                    "parent_id": agent_ids[i % 3],
                    "selectors": [format!("unix:uid:{}", 100_000 + i)],
                })
            })
            .collect();
        let file = data_dir.join(format!("batch-{batch}.json"));
        std::fs::write(&file, serde_json::json!({ "entries": entries }).to_string())
            .expect("writing a batch");
        let server = if batch % 2 == 0 { &server_a } else { &server_b };
        let out = server.cli_json(&["entry", "create", "--data", file.to_str().expect("UTF-8")]);
        let created = out["results"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["status"] == "Ok").count());
        assert_eq!(created, BATCH, "{out}");
    }
    for (k, agent) in agents.iter().enumerate() {
        let want = (0..ENTRIES).filter(|i| i % 3 == k).count() + 1;
        wait_status(agent, 90, &format!("{want} SVIDs on agent {k}"), |s| {
            svid_count(s) >= want
        });
    }

    // An entry created on A reaches the workload of agent 1, which is connected to B.
    assert_eq!(agents[1].status()["server"], addr_b.as_str());
    let cross = "spiffe://example.org/ha/cross";
    let started = Instant::now();
    create_entry(
        &server_a,
        &agent_ids[1],
        cross,
        &[&format!("unix:uid:{uid}")],
        &[],
    );
    wait_workload_svid(&agents[1], cross, 10);
    let took = started.elapsed();
    eprintln!("an entry created on A reached a workload on B's agent in {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "an entry made on A took {took:?} to reach a workload on B's agent"
    );

    // Before the kill: who is where, with which agent SVID, holding which workload SVIDs.
    let before: Vec<serde_json::Value> = agents.iter().map(Agent::status).collect();
    assert_eq!(before[0]["server"], addr_a.as_str());
    assert_eq!(before[2]["server"], addr_a.as_str());
    let workload_0 = "spiffe://example.org/ha/workload/0";
    let serial_0 = wait_workload_svid(&agents[0], workload_0, 5);

    // kill -9 A while entries are being written through B.
    let load = {
        let (admin, agent_id) = (server_b.admin_socket.clone(), agent_ids[0].clone());
        std::thread::spawn(move || {
            for i in 0..20 {
                let out = Command::new(binary("sigil-server"))
                    .args(["entry", "create", "--parent-id", &agent_id, "--spiffe-id"])
                    .arg(format!("spiffe://example.org/ha/under-load/{i}"))
                    .args(["--selector", &format!("unix:uid:{}", 200_000 + i)])
                    .arg("--admin-socket")
                    .arg(&admin)
                    .output()
                    .expect("running sigil-server entry create");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    server_a.kill9();
    let killed_at = Instant::now();
    for k in [0, 2] {
        wait_status(&agents[k], 20, &format!("agent {k} on B"), |s| {
            s["server"] == addr_b.as_str() && s["sync_state"] == "connected"
        });
    }
    let moved = killed_at.elapsed();
    eprintln!("the agents of the killed server were on the other one after {moved:?}");
    assert!(
        moved < Duration::from_secs(15),
        "the agents took {moved:?} to move"
    );
    load.join().expect("the writes through B");
    for (k, agent) in agents.iter().enumerate() {
        let now = agent.status();
        // The same agent SVID: no attestation.
        assert_eq!(
            now["agent_svid_serial"], before[k]["agent_svid_serial"],
            "agent {k}"
        );
        let log = agent.log_text();
        assert!(
            !log.contains("attesting again")
                && log.matches("attested to sigil-server").count() == 1,
            "agent {k} attested again:\n{log}"
        );
        // Its workload kept its SVID.
        let svids = fetch(agent).expect("the workload still gets its SVIDs");
        assert!(
            svids
                .iter()
                .any(|(id, _)| *id == format!("spiffe://example.org/ha/workload/{k}")),
            "agent {k}: {svids:?}"
        );
    }
    // Entries written through B while A was dying reach the agent that moved.
    wait_status(&agents[0], 30, "the entries written under load", |s| {
        s["svids"].as_array().is_some_and(|v| {
            v.iter()
                .filter(|x| {
                    x["spiffe_id"]
                        .as_str()
                        .is_some_and(|id| id.contains("/ha/under-load/"))
                })
                .count()
                == 20
        })
    });
    // Nothing acknowledged is lost: 500 + 3 workloads + the cross entry + 20 under load.
    let total = ENTRIES + 3 + 1 + 20;
    assert_eq!(entry_count(&server_b), total);
    // The workload of a moved agent gets its rotation from B (a 1 min SVID: within ~40 s).
    wait_until(60, "the workload SVID of agent 0 rotated", || {
        fetch(&agents[0]).is_ok_and(|v| v.iter().any(|(id, s)| id == workload_0 && *s != serial_0))
    });

    // A comes back on its port and rejoins: it sees everything, and what is written through it
    // reaches agents on B.
    server_a.restart();
    assert_eq!(entry_count(&server_a), total);
    let rejoined = "spiffe://example.org/ha/rejoined";
    create_entry(
        &server_a,
        &agent_ids[0],
        rejoined,
        &[&format!("unix:uid:{uid}")],
        &[],
    );
    wait_workload_svid(&agents[0], rejoined, 10);
}

/// Polls `f` every 100 ms until it holds (fails the test after `secs`).
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
