//! End-to-end tests of `sigil-agent` against a real `sigil-server`: node attestation with a join
//! token, entry sync by push, SVID minting, restart without re-attestation, eviction.

use std::os::unix::fs::PermissionsExt as _;

use sigil::clock::now_unix;
use sigil_testkit::{alias_token, create_entry, join_token, only_agent, refused_agent_log};
use sigil_testkit::{subdir, tempdir, wait_for, wait_minted_for_new_entry, Agent, Server};

#[test]
fn agent_attests_syncs_restarts_and_is_evicted() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let token = alias_token(&server, "spiffe://example.org/node-a");
    // An entry registered under the node alias before the agent exists.
    create_entry(
        &server,
        "spiffe://example.org/node-a",
        "spiffe://example.org/web",
        &["unix:uid:1000"],
        &[],
    );

    let agent_dir = subdir(dir.path(), "agent");
    let mut agent = Agent::start(&server, &agent_dir, &["--join-token", &token]);
    agent.wait_attested("first SVID");
    let (_, agent_id) = only_agent(&server, "join_token");
    assert!(agent_id.starts_with("spiffe://example.org/sigil/agent/join_token/"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agent.healthy() {
        assert!(std::time::Instant::now() < deadline, "agent never ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Metrics reflect what the agent holds.
    let metrics = agent.metrics();
    assert!(
        metrics.contains("sigil_agent_registration_entries 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sigil_agent_x509_svids_cached 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sigil_agent_x509_svids_minted_total 2"),
        "{metrics}"
    );
    // The agent's key file is private.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(agent.data_dir.join("agent_svid.pem"))
            .expect("svid file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A new entry reaches the agent by push (no polling interval to wait out).
    let t = std::time::Instant::now();
    wait_minted_for_new_entry(
        &server,
        &mut agent,
        "spiffe://example.org/node-a",
        "spiffe://example.org/api",
        "unix:uid:1001",
        10,
        "second SVID",
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "push took {:?}",
        t.elapsed()
    );

    // The same token cannot attest a second agent.
    let other_dir = subdir(dir.path(), "other");
    let log = refused_agent_log(&server, &other_dir, &["--join-token", &token]);
    assert!(log.contains("join token"), "{log}");

    // Restart: the stored SVID is re-used, no second attestation, no token needed.
    assert!(agent.stop().success(), "clean exit on SIGTERM");
    let mut agent = Agent::start(&server, &agent_dir, &[]);
    agent.wait_log(30, "re-use", |l| {
        l.contains("re-using the stored agent SVID")
    });
    agent.wait_log(30, "sync after restart", |l| {
        l.matches("entries synced").count() >= 3
    });
    assert_eq!(only_agent(&server, "join_token").1, agent_id);

    // Eviction: the agent is refused, says so, and stops being ready.
    server.cli_ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    agent.wait_log(30, "refusal", |l| l.contains("refused this agent"));
    assert!(!agent.healthy(), "an evicted agent is not ready");
    assert!(agent.stop().success());
}

fn svid_ids(status: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = status["svids"]
        .as_array()
        .expect("svids")
        .iter()
        .filter_map(|s| s["spiffe_id"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Waits until the agent's status lists exactly `want` SVIDs.
fn wait_svids(agent: &Agent, want: &[&str], secs: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if agent.admin_socket.exists() {
            let s = agent.status();
            if svid_ids(&s) == want {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "wanted {want:?}, status {s}\nlog:\n{}",
                agent.log_text()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent admin socket never appeared:\n{}",
            agent.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn two_agents_receive_only_their_own_entries() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    for (node, svc) in [("node-a", "a-svc"), ("node-b", "b-svc")] {
        server.cli_ok(&[
            "entry",
            "create",
            "--parent-id",
            &format!("spiffe://example.org/{node}"),
            "--spiffe-id",
            &format!("spiffe://example.org/{svc}"),
            "--selector",
            "unix:uid:1",
        ]);
    }
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        let d = subdir(dir.path(), node);
        let t = alias_token(&server, &format!("spiffe://example.org/{node}"));
        agents.push(Agent::start(&server, &d, &["--join-token", &t]));
    }
    wait_svids(
        &agents[0],
        &["spiffe://example.org/a-svc", "spiffe://example.org/node-a"],
        30,
    );
    wait_svids(
        &agents[1],
        &["spiffe://example.org/b-svc", "spiffe://example.org/node-b"],
        30,
    );
    // A later entry for node-b never reaches node-a.
    server.cli_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/node-b",
        "--spiffe-id",
        "spiffe://example.org/b-two",
        "--selector",
        "unix:uid:2",
    ]);
    wait_svids(
        &agents[1],
        &[
            "spiffe://example.org/b-svc",
            "spiffe://example.org/b-two",
            "spiffe://example.org/node-b",
        ],
        10,
    );
    let a = agents[0].status();
    // node-a holds its own alias and its workload, never node-b's.
    assert_eq!(
        svid_ids(&a),
        vec!["spiffe://example.org/a-svc", "spiffe://example.org/node-a"]
    );
    assert_eq!(a["entries"], 2);
}

/// Registers `web` under node alias `node`, starts an agent attesting with a token for that
/// alias, and waits until it holds both SVIDs. Returns the agent and its status, whose `svids`
/// sort by SPIFFE ID: `[node (the alias), web]`.
fn agent_with_web(server: &Server, dir: &std::path::Path) -> (Agent, serde_json::Value) {
    server.cli_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/node",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--selector",
        "unix:uid:1",
    ]);
    let d = subdir(dir, "agent");
    let t = alias_token(server, "spiffe://example.org/node");
    let agent = Agent::start(server, &d, &["--join-token", &t]);
    let status = wait_svids(
        &agent,
        &["spiffe://example.org/node", "spiffe://example.org/web"],
        30,
    );
    (agent, status)
}

#[test]
fn agent_serves_cache_through_a_server_outage_and_resumes() {
    let dir = tempdir();
    let port = sigil_testkit::free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut server = Server::start(&dir.path().join("server"), &["--bind-address", &bind]);
    let (mut agent, before) = agent_with_web(&server, dir.path());
    let serial = before["svids"][1]["serial"].clone();
    // Status for one SPIFFE ID lists only its SVID; a malformed ID is refused.
    let out = agent.status_output(&[
        "--output",
        "json",
        "--spiffe-id",
        "spiffe://example.org/web",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let one: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(svid_ids(&one), ["spiffe://example.org/web"]);
    assert_eq!(one["svids"][0]["serial"], serial);
    let out = agent.status_output(&["--spiffe-id", "not-an-id"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spiffe_id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Server down: the agent keeps running and keeps its SVID, and stays ready. Waited for
    // until its fourth failed reconnect (back-off 0.25 s doubling); the retry and warning rates
    // over a long outage are checked in paused time by the worker's unit tests
    // (agent/src/sync/worker/tests.rs).
    assert!(server.stop().success());
    wait_for(60, "the agent's fourth failed reconnect", || {
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("sync with sigil-server failed") && l.contains("failures=4"))
            .then_some(())
    });
    let during = agent.status();
    assert_eq!(
        svid_ids(&during),
        vec!["spiffe://example.org/node", "spiffe://example.org/web"]
    );
    assert_eq!(
        during["svids"][1]["serial"], serial,
        "the cached SVID is still held"
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        during["svids"][1]["not_after"].as_i64() > Some(now),
        "and still valid"
    );
    assert!(agent.healthy(), "ready while serving from cache");
    let warnings = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("sync with sigil-server failed"))
        .count();
    assert!(
        warnings <= 8,
        "retry warnings are rate-limited, got {warnings}"
    );

    // Server back on the same address: sync resumes without operator action.
    server.restart();
    server.cli_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/node",
        "--spiffe-id",
        "spiffe://example.org/api",
        "--selector",
        "unix:uid:2",
    ]);
    let after = wait_svids(
        &agent,
        &[
            "spiffe://example.org/api",
            "spiffe://example.org/node",
            "spiffe://example.org/web",
        ],
        60,
    );
    let log = agent.log_text();
    assert!(log.contains("reconnected to sigil-server"));
    // The stream resumed from the entries held (no snapshot), and what was held stays held:
    // the web SVID is the one minted before the outage.
    assert!(
        log.contains("sync resumed from the entries held"),
        "no resumed sync in the agent's log:\n{log}"
    );
    let web = |status: &serde_json::Value| {
        status["svids"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|s| s["spiffe_id"] == "spiffe://example.org/web")
                    .map(|s| s["serial"].clone())
            })
            .unwrap_or_default()
    };
    assert_eq!(web(&after), serial, "not minted again");
    assert!(agent.stop().success());
}

#[test]
fn svids_and_the_agent_svid_rotate_at_half_their_ttl() {
    let dir = tempdir();
    // 1 min SVIDs (agent and workload; the shortest TTL the server accepts): rotation is due
    // after 24-30 s.
    let server = Server::start(
        &dir.path().join("server"),
        &["--default-x509-svid-ttl", "1m"],
    );
    let (mut agent, first) = agent_with_web(&server, dir.path());
    let web = &first["svids"][1];
    let (serial, not_after, refresh_at) = (
        web["serial"].as_str().expect("serial").to_string(),
        web["not_after"].as_i64().expect("not_after"),
        web["refresh_at"].as_i64().expect("refresh_at"),
    );
    // Counted from receipt (about not_after - 60): at 40-50 % of the lifetime.
    assert!(
        (not_after - 37..=not_after - 29).contains(&refresh_at),
        "refresh at about half the 1 min lifetime: {first}"
    );
    agent.wait_log(60, "agent SVID renewal", |l| {
        l.contains("agent SVID renewed at half its lifetime")
    });
    // The workload SVID is replaced before the old one expires: never a gap.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = agent.status();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let cur = s["svids"].as_array().and_then(|v| {
            v.iter()
                .find(|x| x["spiffe_id"] == "spiffe://example.org/web")
                .cloned()
        });
        let cur = cur.expect("web SVID present throughout");
        assert!(
            cur["not_after"].as_i64() > Some(now),
            "held an expired SVID: {s}"
        );
        if cur["serial"].as_str() != Some(serial.as_str()) {
            assert!(now < not_after, "rotated only after the old one expired");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rotation: {s}\n{}",
            agent.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(agent.stop().success());
}

/// The value of the unlabelled metric `name` in a Prometheus text answer.
fn metric_in(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

/// `GET /ready` on `address` until it answers 503; returns the answer (fails after `secs`).
fn wait_not_ready(address: &str, secs: u64, what: &str) -> String {
    sigil_testkit::wait_for(secs, what, || {
        let r = sigil_testkit::http_get(address, "/ready");
        r.starts_with("HTTP/1.1 503").then_some(r)
    })
}

/// `sigil-agent api fetch x509` on `socket`: (success, stdout, stderr).
fn fetch_x509(socket: &std::path::Path) -> (bool, String, String) {
    let out = std::process::Command::new(sigil_testkit::binary("sigil-agent"))
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
fn an_agent_started_before_its_server_attests_once_the_server_is_up() {
    let dir = tempdir();
    let bind = format!("127.0.0.1:{}", sigil_testkit::free_port());
    let mut server = Server::start(&dir.path().join("server"), &["--bind-address", &bind]);
    let token = alias_token(&server, "spiffe://example.org/node-a");
    let (other_token, _) = sigil_testkit::join_token(&server);
    let (a_dir, b_dir) = (subdir(dir.path(), "agent"), subdir(dir.path(), "stopped"));
    let bundle = server.cli_ok(&["bundle", "show"]);
    for d in [&a_dir, &b_dir] {
        std::fs::write(d.join("bundle.pem"), &bundle).expect("writing the bundle");
    }
    assert!(server.stop().success());
    let retrying = "sigil-server is unreachable or not ready; retrying";

    // Waiting for the server, the agent retries; SIGTERM still stops it cleanly.
    let mut b = Agent::start(&server, &b_dir, &["--join-token", &other_token]);
    b.wait_log(30, "a retried attestation", |l| l.contains(retrying));
    assert!(b.stop().success(), "{}", b.log_text());
    assert!(
        b.log_text().contains("stopped before attesting"),
        "{}",
        b.log_text()
    );

    let mut agent = Agent::start(&server, &a_dir, &["--join-token", &token]);
    agent.wait_log(30, "two failed attempts", |l| {
        l.matches(retrying).count() >= 2
    });
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(retrying))
        .unwrap_or_default();
    assert!(
        line.contains("error=") && line.contains("retry_in_ms="),
        "{line}"
    );
    server.restart();
    agent.wait_attested("the first SVID once the server is up");
    only_agent(&server, "join_token");
    assert!(agent.stop().success());
}

#[test]
fn readiness_follows_the_sync_and_the_workload_api_socket() {
    let dir = tempdir();
    let bind = format!("127.0.0.1:{}", sigil_testkit::free_port());
    let mut server = Server::start(&dir.path().join("server"), &["--bind-address", &bind]);
    let token = alias_token(&server, "spiffe://example.org/node");
    let mut agent = Agent::start(
        &server,
        &subdir(dir.path(), "agent"),
        &["--join-token", &token, "--ready-max-sync-age", "5s"],
    );
    agent.wait_attested("first SVID");
    sigil_testkit::wait_for(30, "the agent to be ready", || {
        agent.healthy().then_some(())
    });
    let s = agent.status();
    assert_eq!(s["sync_state"], "connected", "{s}");
    let last = s["last_sync_at"].as_i64().unwrap_or_default();
    assert!((now_unix() - 5..=now_unix()).contains(&last), "{s}");

    // The server goes away: ready until the last sync is older than 5 s, then 503 with why.
    let before_stop = now_unix();
    assert!(server.stop().success());
    let body = wait_not_ready(&agent.health_address, 60, "/ready to fail without a server");
    assert!(
        now_unix() - before_stop >= 5,
        "not ready before the 5 s threshold: {body}"
    );
    assert!(
        body.contains("no successful sync with sigil-server for")
            && body.contains("ready_max_sync_age 5 s"),
        "{body}"
    );
    assert!(!agent.healthy(), "healthcheck agrees");
    let s = agent.status();
    assert_eq!(s["sync_state"], "disconnected", "{s}");
    let last = s["last_sync_at"].as_i64().unwrap_or_default();
    assert!(
        (before_stop - 1..=before_stop + 20).contains(&last),
        "last sync is when the stream went down: {s}"
    );
    assert!(
        !s["sync_error"].as_str().unwrap_or_default().is_empty(),
        "{s}"
    );
    let text = agent.status_output(&[]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Sync            : disconnected since") && text.contains("last sync"),
        "{text}"
    );

    // Back: ready again once the stream is up.
    server.restart();
    sigil_testkit::wait_for(90, "the agent to be ready again", || {
        agent.healthy().then_some(())
    });
    assert_eq!(agent.status()["sync_state"], "connected");

    // The socket file is deleted: workloads cannot reach the agent any more.
    std::fs::remove_file(agent.socket_path()).expect("removing the socket");
    let r = sigil_testkit::http_get(&agent.health_address, "/ready");
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("is gone"),
        "{r}"
    );
    assert!(agent.stop().success());
}

/// An upstream root and intermediate for `example.org`, both valid from 30 s ago for `secs`
/// more, written to `dir`; the server flags that use them.
fn short_upstream_ca(dir: &std::path::Path, secs: u64) -> Vec<String> {
    let now = time::OffsetDateTime::now_utc();
    let params = |cn: &str, uri: bool| {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        if uri {
            p.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://example.org".try_into().expect("URI"),
            )];
        }
        p.not_before = now - std::time::Duration::from_secs(30);
        p.not_after = now + std::time::Duration::from_secs(secs);
        p
    };
    let root_key = rcgen::KeyPair::generate().expect("root key");
    let root_params = params("Upstream Root", false);
    let root = root_params.self_signed(&root_key).expect("root");
    let issuer = rcgen::Issuer::new(root_params, root_key);
    let key = rcgen::KeyPair::generate().expect("intermediate key");
    let inter = params("Upstream Intermediate", true)
        .signed_by(&key, &issuer)
        .expect("intermediate");
    let files = [
        ("chain.pem", inter.pem()),
        ("inter.key", key.serialize_pem()),
        ("bundle.pem", root.pem()),
    ];
    for (name, pem) in &files {
        std::fs::write(dir.join(name), pem).expect("writing upstream CA files");
    }
    let path = |n: &str| dir.join(n).display().to_string();
    vec![
        "--upstream-cert-chain".into(),
        path("chain.pem"),
        "--upstream-key".into(),
        path("inter.key"),
        "--upstream-bundle".into(),
        path("bundle.pem"),
    ]
}

#[test]
fn an_expiring_ca_is_reported_and_causes_no_signing_storm() {
    let dir = tempdir();
    let health = format!("127.0.0.1:{}", sigil_testkit::free_port());
    // An upstream intermediate that lives 75 s and that nobody replaces (self-signed
    // authorities rotate): near its end every SVID (1 min TTL) is capped at it, and renewing
    // cannot give a longer one.
    let mut flags = short_upstream_ca(dir.path(), 75);
    flags.extend(["--default-x509-svid-ttl", "1m", "--health-address", &health].map(String::from));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start(&dir.path().join("server"), &flags);
    let started = now_unix();
    let ca_expiry = metric_in(
        &sigil_testkit::http_get(&health, "/metrics"),
        "sigil_server_ca_expiry_seconds",
    )
    .expect("the CA expiry metric") as i64;
    assert!(
        (started + 60..=started + 76).contains(&ca_expiry),
        "{ca_expiry} vs {started}"
    );
    let me = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    create_entry(
        &server,
        "spiffe://example.org/node",
        "spiffe://example.org/me",
        &[&me],
        &[],
    );
    let token = alias_token(&server, "spiffe://example.org/node");
    let mut agent = Agent::start(
        &server,
        &subdir(dir.path(), "agent"),
        &["--join-token", &token],
    );
    agent.wait_svids_for(
        &["spiffe://example.org/me", "spiffe://example.org/node"],
        30,
    );
    let (ok, _, stderr) = fetch_x509(&agent.socket_path());
    assert!(ok, "{stderr}");
    assert_eq!(
        agent.metric("sigil_agent_bundle_expiry_seconds"),
        Some(ca_expiry as f64),
        "the agent reports its bundle's expiry"
    );

    // The last sixth of the intermediate's life (105 s from its NotBefore): a warning, not
    // before.
    let warned = sigil_testkit::wait_for(90, "the CA expiry warning", || {
        let log = server.log_text();
        log.contains("the active CA authority expires at")
            .then_some(log)
    });
    assert!(now_unix() >= ca_expiry - 20, "warned too early:\n{warned}");

    // Expired: the server is not ready and says why.
    let body = wait_not_ready(&health, 60, "the server's /ready after the CA expired");
    assert!(
        now_unix() >= ca_expiry,
        "not ready before the CA expired: {body}"
    );
    assert!(
        body.contains("the active CA authority expired at"),
        "{body}"
    );
    let out = server.cli(&["healthcheck"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CA authority expired"),
        "{out:?}"
    );

    // The agent holds nothing valid: not ready, and no expired SVID is served.
    let body = wait_not_ready(
        &agent.health_address,
        60,
        "the agent's /ready after the CA expired",
    );
    assert!(body.contains("expired"), "{body}");
    assert!(!agent.healthy());
    let (ok, stdout, stderr) = fetch_x509(&agent.socket_path());
    assert!(!ok, "an expired SVID was served: {stdout}");
    assert!(stderr.contains("Unavailable"), "{stderr}");

    // Bounded work over the CA's whole life: 2 entries and the agent SVID, renewed at half of
    // what they have left and at least 5 s apart (a renewal loop would mint thousands), and no
    // misleading refusal.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let log = agent.log_text();
    let minted = sigil_testkit::minted(&log);
    assert!(minted <= 24, "{minted} X509-SVIDs minted:\n{log}");
    let renewals = log.matches("agent SVID renewed").count();
    assert!(renewals <= 9, "{renewals} agent SVID renewals:\n{log}");
    let signed = metric_in(
        &sigil_testkit::http_get(&health, "/metrics"),
        "sigil_server_x509_svids_signed_total",
    )
    .unwrap_or_default();
    println!("over the CA's life: {minted} workload SVIDs minted, {renewals} agent SVID renewals, {signed} SVIDs signed by the server");
    assert!(signed <= 60.0, "the server signed {signed} X509-SVIDs");
    assert!(!log.contains("evicted or banned"), "{log}");
    let server_log = server.log_text();
    let rotation_errors = server_log.matches("server SVID rotation failed").count();
    assert!(rotation_errors <= 2, "{server_log}");
    assert!(agent.stop().success());
}

/// The agent SVID's serial as the server has it (`agent show`).
fn server_serial(server: &Server, agent_id: &str) -> String {
    server.cli_json(&["agent", "show", "--spiffe-id", agent_id])["agent"]["x509_svid_serial"]
        .as_str()
        .expect("serial")
        .to_string()
}

/// The serial of the agent SVID stored in `data_dir`.
fn stored_serial(data_dir: &std::path::Path) -> String {
    let pem = std::fs::read_to_string(data_dir.join("agent_svid.pem")).expect("agent SVID file");
    let chain = sigil::x509::parse_pem_certs(&pem).expect("certificates");
    sigil::tls::PeerSvid::from_leaf_der(&chain[0])
        .expect("agent SVID")
        .serial_hex
}

fn set_mode(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn failed_saves(log: &str) -> usize {
    log.matches("saving the renewed agent SVID failed").count()
}

/// Waits until the server has made a renewed SVID of `agent_id` current (its serial is no
/// longer `old`) and checks that it is the one the agent stored.
fn wait_renewed_and_stored(server: &Server, agent: &Agent, agent_id: &str, old: &str) {
    let renewed = wait_for(60, "the server to make the renewed SVID current", || {
        let s = server_serial(server, agent_id);
        (s != old).then_some(s)
    });
    assert_eq!(stored_serial(&agent.data_dir), renewed);
}

#[test]
fn renewed_agent_svid_that_cannot_be_saved_does_not_lock_the_agent_out() {
    // The agents run as nobody: root would write into a read-only directory anyway.
    const NOBODY: u32 = 65534;
    let dir = tempdir();
    set_mode(dir.path(), 0o755);
    // 180 s agent SVIDs: renewed after ~90 s; a restart re-uses a stored SVID with over 60 s
    // left, which leaves time for the steps in between.
    let server = Server::start(
        &dir.path().join("server"),
        &["--default-x509-svid-ttl", "180s"],
    );
    // Two agents, side by side: one recovers while running, one is killed and restarted.
    let mut agents = Vec::new();
    for name in ["recovers", "restarts"] {
        let (token, agent_id) = join_token(&server);
        create_entry(
            &server,
            &agent_id,
            &format!("spiffe://example.org/{name}/web"),
            &["unix:uid:1000"],
            &[],
        );
        let agent_dir = subdir(dir.path(), name);
        std::os::unix::fs::chown(&agent_dir, Some(NOBODY), Some(NOBODY)).expect("chown");
        let mut agent =
            Agent::start_as(&server, &agent_dir, &["--join-token", &token], Some(NOBODY));
        agent.wait_attested("first SVID");
        let first = server_serial(&server, &agent_id);
        assert_eq!(stored_serial(&agent.data_dir), first);
        // From now on the agent cannot write its data directory (as with a full disk).
        set_mode(&agent.data_dir, 0o500);
        agents.push((name, agent_dir, agent, agent_id, first));
    }
    for (name, _, agent, agent_id, first) in &mut agents {
        agent.wait_log(150, "a renewal whose save fails", |l| failed_saves(l) >= 1);
        // It goes on with the old SVID, which the server still accepts.
        wait_minted_for_new_entry(
            &server,
            agent,
            agent_id,
            &format!("spiffe://example.org/{name}/api"),
            "unix:uid:1001",
            30,
            "minting with the old SVID after the failed save",
        );
        assert_eq!(
            &server_serial(&server, agent_id),
            first,
            "the old SVID is still current"
        );
        assert_eq!(&stored_serial(&agent.data_dir), first);
    }
    let (mut restarts, mut recovers) = (agents.pop().expect("agent"), agents.pop().expect("agent"));

    // Disk space again, the agent still running: its retried save succeeds, it switches to the
    // renewed SVID, and the server makes that one current.
    set_mode(&recovers.2.data_dir, 0o700);
    recovers.2.wait_log(60, "the retried save", |l| {
        l.contains("renewed agent SVID saved")
    });
    wait_renewed_and_stored(&server, &recovers.2, &recovers.3, &recovers.4);
    wait_minted_for_new_entry(
        &server,
        &mut recovers.2,
        &recovers.3,
        "spiffe://example.org/recovers/after-save",
        "unix:uid:1002",
        30,
        "minting with the renewed SVID",
    );

    // Killed (SIGKILL) before its save ever succeeded: on restart the stored, old SVID is still
    // accepted (the agent makes its directory writable again itself), and it renews.
    let (name, agent_dir, agent, agent_id, first) = restarts;
    drop(agent);
    let mut agent = Agent::start_as(&server, &agent_dir, &[], Some(NOBODY));
    agent.wait_log(30, "re-use after the restart", |l| {
        l.contains("re-using the stored agent SVID")
    });
    wait_minted_for_new_entry(
        &server,
        &mut agent,
        &agent_id,
        &format!("spiffe://example.org/{name}/after-restart"),
        "unix:uid:1002",
        30,
        "minting after the restart",
    );
    wait_renewed_and_stored(&server, &agent, &agent_id, &first);
    restarts = (name, agent_dir, agent, agent_id, first);

    for (_, _, agent, _, _) in [&mut recovers, &mut restarts] {
        let log = agent.log_text();
        assert!(!log.contains("refused this agent"), "{log}");
        assert!(agent.stop().success());
    }
}

/// The value of the agent's metric `name`, 0 while it has not reported it.
fn agent_metric(agent: &Agent, name: &str) -> f64 {
    agent.metric(name).unwrap_or(0.0)
}

#[test]
fn a_refused_entry_backs_off_on_its_own_timer_while_the_others_are_served() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let me = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    create_entry(
        &server,
        "spiffe://example.org/node",
        "spiffe://example.org/me",
        &[&me],
        &[],
    );
    // `10.0.0.1` passes the entry checks, but the CA puts no name ending in a number (an IPv4
    // address) in a certificate: the server refuses to sign this entry, at every attempt.
    let bad = create_entry(
        &server,
        "spiffe://example.org/node",
        "spiffe://example.org/bad",
        &["unix:uid:4242"],
        &["--dns", "10.0.0.1"],
    );
    let token = alias_token(&server, "spiffe://example.org/node");
    let mut agent = Agent::start(
        &server,
        &subdir(dir.path(), "agent"),
        &[
            "--join-token",
            &token,
            "--log-level",
            "sigil_agent=debug,info",
        ],
    );
    agent.wait_svids_for(
        &["spiffe://example.org/me", "spiffe://example.org/node"],
        30,
    );
    const FAILURES: &str = "sigil_agent_x509_svid_sign_failures_total";
    wait_for(30, "the first refused signing", || {
        (agent_metric(&agent, FAILURES) >= 1.0).then_some(())
    });
    let first = std::time::Instant::now();
    assert_eq!(
        agent.metric("sigil_agent_x509_svid_sign_backoff_entries"),
        Some(1.0)
    );

    // `status` says what is backing off, why, and when it is tried again.
    let s = agent.status();
    let backoff = s["sign_backoff"].as_array().expect("sign_backoff list");
    assert_eq!(backoff.len(), 1, "{s}");
    let b = &backoff[0];
    assert_eq!(b["entry_id"], bad.as_str(), "{b}");
    assert_eq!(b["spiffe_id"], "spiffe://example.org/bad", "{b}");
    assert!(b["failures"].as_u64().unwrap_or(0) >= 1, "{b}");
    let reason = b["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("10.0.0.1") && reason.contains("InvalidArgument"),
        "{b}"
    );
    let since = b["failing_since"].as_i64().unwrap_or(0);
    let next = b["next_retry_at"].as_i64().unwrap_or(0);
    assert!(since > 0 && next > since, "{b}");
    assert!(s["agent_svid_renewal_backoff"].is_null(), "{s}");
    let out = agent.status_output(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("Signing failing : 1"), "{text}");
    assert!(
        text.contains(&format!("spiffe://example.org/bad  entry {bad}"))
            && text.contains("next retry"),
        "{text}"
    );

    // Retried on its own timer (nothing else happens meanwhile), within seconds — not at once,
    // not in a loop, and bounded: attempts at about 0, 8, 24 and 56 s.
    wait_for(25, "the second attempt", || {
        (agent_metric(&agent, FAILURES) >= 2.0).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(60).saturating_sub(first.elapsed()));
    let attempts = agent_metric(&agent, FAILURES);
    assert!(
        (3.0..=6.0).contains(&attempts),
        "{attempts} signing attempts for the refused entry in 60 s:\n{}",
        agent.log_text()
    );
    // Logged at warn once; the repeats at debug.
    let log = agent.log_text();
    assert_eq!(log.matches("X509-SVID signing failed;").count(), 1, "{log}");
    assert!(
        log.matches("X509-SVID signing failed again").count() >= 2,
        "{log}"
    );
    // The other entries are served meanwhile.
    let (ok, stdout, stderr) = fetch_x509(&agent.socket_path());
    assert!(ok && stdout.contains("spiffe://example.org/me"), "{stderr}");
    assert!(agent.healthy());

    // The operator fixes the entry: signed at once (not at the next back-off time, which is
    // about a minute away now), the back-off cleared, the recovery logged.
    let fixed = std::time::Instant::now();
    server.cli_ok(&[
        "entry",
        "update",
        "--entry-id",
        &bad,
        "--dns",
        "bad.example.org",
    ]);
    agent.wait_svids_for(&["spiffe://example.org/bad"], 30);
    assert!(
        fixed.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        fixed.elapsed()
    );
    assert_eq!(
        agent.metric("sigil_agent_x509_svid_sign_backoff_entries"),
        Some(0.0)
    );
    let s = agent.status();
    assert_eq!(s["sign_backoff"].as_array().map(Vec::len), Some(0), "{s}");
    agent.wait_log(10, "the recovery", |l| {
        l.contains("X509-SVID signed after failed attempts")
    });
    assert!(agent.stop().success());
}
