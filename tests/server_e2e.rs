//! End-to-end tests of `sigil-server`: the real binary on temp dirs, driven by its CLI and its
//! admin API over the Unix socket.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil::proto::admin as pb;
use sigil_testkit::{free_port, tempdir, Server};

const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/node-1";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_entry_lifecycle_survives_restart() {
    let dir = tempdir();
    let mut server = Server::start(dir.path(), &[]);

    // Admin socket directory is private to the server's user.
    let mode = std::fs::metadata(server.admin_socket.parent().expect("socket dir"))
        .expect("socket dir metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "admin socket dir mode");

    // create
    let created = server.cli_json(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:1000",
        "--x509-ttl",
        "10m",
        "--dns",
        "web.example.org",
        "--hint",
        "internal",
    ]);
    let result = &created["results"][0];
    assert_eq!(result["status"], "Ok", "{created}");
    let id = result["entry"]["id"]
        .as_str()
        .expect("entry id")
        .to_string();
    assert_eq!(result["entry"]["x509_svid_ttl"], 600);
    assert_eq!(
        result["entry"]["selectors"],
        serde_json::json!(["unix:gid:1000", "unix:uid:1000"])
    );

    // a second entry as a node alias
    let alias = server.cli_json(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        "spiffe://example.org/cluster/a",
        "--selector",
        "join_token:any",
    ]);
    assert_eq!(
        alias["results"][0]["entry"]["parent_id"],
        "spiffe://example.org/sigil/server"
    );

    // duplicate → AlreadyExists, non-zero exit, one clear line
    let dup = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:gid:1000",
        "--selector",
        "unix:uid:1000",
    ]);
    assert!(!dup.status.success());
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));

    // invalid input names the field and the rule
    for (args, expect) in [
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/web/",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "must not end with '/'",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                AGENT,
                "--selector",
                "unix",
            ],
            "--selector",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
                "--x509-ttl",
                "1y",
            ],
            "--x509-ttl",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://other.org/web",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "trust domain",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://example.org/sigil/x",
                "--parent-id",
                AGENT,
                "--selector",
                "unix:uid:1",
            ],
            "reserved",
        ),
    ] {
        let mut full = vec!["entry", "create"];
        full.extend(args);
        let out = server.cli(&full);
        assert!(!out.status.success(), "{full:?} should fail");
        let err = stderr(&out);
        assert!(err.contains(expect), "{full:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line on stderr: {err}");
    }

    // show (json) by id and by filters
    let shown = server.cli_json(&["entry", "show", "--entry-id", &id]);
    assert_eq!(shown["entries"][0]["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(
        shown["entries"][0]["dns_names"],
        serde_json::json!(["web.example.org"])
    );
    let by_sel = server.cli_json(&["entry", "show", "--selector", "unix:uid:1000"]);
    assert_eq!(by_sel["entries"].as_array().map(Vec::len), Some(1));
    let by_subset = server.cli_json(&[
        "entry",
        "show",
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:1000",
        "--selector",
        "unix:path:/bin/x",
        "--match",
        "subset",
    ]);
    assert_eq!(by_subset["entries"].as_array().map(Vec::len), Some(1));
    let exact_miss = server.cli_json(&[
        "entry",
        "show",
        "--selector",
        "unix:uid:1000",
        "--match",
        "exact",
    ]);
    assert_eq!(exact_miss["entries"].as_array().map(Vec::len), Some(0));
    let text = server.cli_ok(&["entry", "show", "--parent-id", AGENT]);
    assert!(text.starts_with("Found 1 entry"), "{text}");
    assert!(text.contains("ENTRY ID") && text.contains(&id), "{text}");
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 2);

    // update changes only the given fields
    let updated = server.cli_json(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--x509-ttl",
        "1h",
        "--hint",
        "external",
    ]);
    assert_eq!(updated["entry"]["x509_svid_ttl"], 3600);
    assert_eq!(updated["entry"]["hint"], "external");
    assert_eq!(
        updated["entry"]["dns_names"],
        serde_json::json!(["web.example.org"])
    );
    assert!(updated["entry"]["revision"].as_i64() > result["entry"]["revision"].as_i64());
    let missing = server.cli(&["entry", "update", "--entry-id", "no-such-id", "--hint", "x"]);
    assert!(
        !missing.status.success() && stderr(&missing).contains("NotFound"),
        "{}",
        stderr(&missing)
    );

    // token and bundle
    let token = server.cli_json(&["token", "generate", "--ttl", "5m"]);
    assert_eq!(token["token"].as_str().map(str::len), Some(36), "{token}");
    let pem = server.cli_ok(&["bundle", "show"]);
    let roots = sigil::x509::parse_pem_certs(&pem).expect("bundle show prints PEM certificates");
    assert_eq!(roots.len(), 1);
    let spiffe: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "spiffe"]))
            .expect("SPIFFE bundle JSON");
    let keys = spiffe["keys"].as_array().expect("keys");
    assert!(keys.iter().any(|k| k["use"] == "x509-svid"));
    assert!(keys
        .iter()
        .any(|k| k["use"] == "jwt-svid" && k["kid"].is_string()));
    assert_eq!(
        server.cli_json(&["agent", "list"])["agents"],
        serde_json::json!([])
    );
    let no_agent = server.cli(&["agent", "evict", "--spiffe-id", AGENT]);
    assert!(!no_agent.status.success() && stderr(&no_agent).contains("not found"));

    // restart: entries, CA root and bundle survive
    server.restart();
    let after = server.cli_json(&["entry", "show", "--entry-id", &id]);
    assert_eq!(after["entries"][0]["hint"], "external");
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 2);
    assert_eq!(
        server.cli_ok(&["bundle", "show"]),
        pem,
        "CA root reused after restart"
    );

    // delete
    server.cli_ok(&["entry", "delete", "--entry-id", &id]);
    let gone = server.cli(&["entry", "show", "--entry-id", &id]);
    assert!(!gone.status.success());
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 1);

    // audit log: every mutation with the caller's uid
    let log = server.log_text();
    let uid = nix::unistd::getuid().as_raw();
    for action in [
        "entry.create",
        "entry.update",
        "entry.delete",
        "token.generate",
        "agent.evict",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(action) && l.contains(&format!("caller_uid={uid}"))),
            "audit line for {action} missing:\n{log}"
        );
    }
    assert!(
        !log.contains(token["token"].as_str().unwrap_or("-")),
        "join token must not be logged"
    );

    let status = server.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(!server.admin_socket.exists(), "socket removed on shutdown");
}

#[test]
fn batch_create_from_json_file() {
    let dir = tempdir();
    let server = Server::start(dir.path(), &[]);
    let data = dir.path().join("entries.json");
    let entries: Vec<serde_json::Value> = (0..1200)
        .map(|i| {
            serde_json::json!({
                "spiffe_id": format!("spiffe://example.org/batch/{i}"),
                "parent_id": AGENT,
                "selectors": [{"type": "unix", "value": format!("uid:{i}")}, "unix:gid:0"],
                "x509_svid_ttl": "30m",
            })
        })
        .collect();
    std::fs::write(&data, serde_json::json!({ "entries": entries }).to_string())
        .expect("writing data file");
    let out = server.cli_json(&[
        "entry",
        "create",
        "--data",
        data.to_str().expect("utf-8 path"),
    ]);
    let results = out["results"].as_array().expect("results");
    assert_eq!(results.len(), 1200);
    assert!(results.iter().all(|r| r["status"] == "Ok"));
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 1200);
    assert_eq!(
        server.cli_json(&["entry", "count", "--selector", "unix:gid:0"])["count"],
        1200
    );

    // Same file again: every entry is a duplicate, the command fails and says how many.
    let again = server.cli(&[
        "entry",
        "create",
        "--data",
        data.to_str().expect("utf-8 path"),
    ]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("1200 of 1200 entries could not be created"),
        "{}",
        stderr(&again)
    );

    // A malformed file is refused before anything is sent.
    std::fs::write(&data, "{\"entries\": [{\"spiffe_id\": ").expect("writing data file");
    let bad = server.cli(&[
        "entry",
        "create",
        "--data",
        data.to_str().expect("utf-8 path"),
    ]);
    assert!(
        !bad.status.success() && stderr(&bad).contains("is not valid"),
        "{}",
        stderr(&bad)
    );
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 1200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_batch_create_loses_no_acknowledged_entry() {
    let dir = tempdir();
    let mut server = Server::start(dir.path(), &[]);
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();

    // 1,000 entries in batches of 10; the server is killed part-way through.
    let writer = {
        let acked = acked.clone();
        let mut client = server.admin().await;
        tokio::spawn(async move {
            for batch in 0..100 {
                let entries = (0..10)
                    .map(|i| pb::Entry {
                        spiffe_id: format!("spiffe://example.org/kill/{batch}/{i}"),
                        parent_id: AGENT.into(),
                        selectors: vec![pb::Selector {
                            r#type: "unix".into(),
                            value: format!("uid:{}", batch * 10 + i),
                        }],
                        ..Default::default()
                    })
                    .collect();
                match client
                    .batch_create_entries(pb::BatchCreateEntriesRequest { entries })
                    .await
                {
                    Ok(resp) => {
                        let mut set = acked.lock().expect("lock");
                        for r in resp.into_inner().results {
                            assert_eq!(r.code, 0, "{}", r.message);
                            set.insert(r.entry.expect("entry").id);
                        }
                    }
                    Err(_) => return batch,
                }
            }
            100
        })
    };
    // Let some batches land, then kill without warning.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().expect("lock").len() < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress creating entries"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    let batches_done = writer.await.expect("writer task");
    assert!(
        batches_done < 100,
        "server was killed before the batch create finished"
    );

    let acked = acked.lock().expect("lock").clone();
    server.restart();
    let mut client = server.admin().await;
    let mut stored = HashSet::new();
    let mut page_token = String::new();
    loop {
        let resp = client
            .list_entries(pb::ListEntriesRequest {
                filter: None,
                page_size: 300,
                page_token: page_token.clone(),
            })
            .await
            .expect("listing after restart")
            .into_inner();
        stored.extend(resp.entries.into_iter().map(|e| e.id));
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged entries lost after kill -9: {lost:?}",
        lost.len()
    );
    // Batches are atomic: whatever is stored is whole batches of 10.
    assert_eq!(stored.len() % 10, 0, "a partial batch was stored");
}

#[test]
fn health_metrics_and_config_file() {
    let dir = tempdir();
    let port = free_port();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"file.example\"\nhealth_address = \"127.0.0.1:{port}\"\n[ca]\nkey_type = \"ec-p384\"\n"
        ),
    )
    .expect("writing config");
    // Flags override the file: the trust domain comes from --trust-domain (example.org).
    let mut server = Server::start(
        dir.path(),
        &[
            "--config",
            config.to_str().expect("utf-8"),
            "--health-address",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let health = server.cli_json(&["healthcheck"]);
    assert_eq!(health["trust_domain"], "example.org");
    assert_eq!(health["ready"], true);

    let get = |path: &str| sigil_testkit::http_get(&format!("127.0.0.1:{port}"), path);
    assert!(get("/live").starts_with("HTTP/1.1 200"));
    assert!(get("/ready").starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics");
    assert!(
        metrics.contains("sigil_server_admin_requests_total{method=\"Health\",code=\"Ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sigil_server_registration_entries 0"),
        "{metrics}"
    );

    // The P-384 key type from the file is in effect.
    let pem = server.cli_ok(&["bundle", "show"]);
    let der = sigil::x509::parse_pem_certs(&pem).expect("PEM bundle");
    let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).expect("root parses");
    let alg = cert
        .public_key()
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    assert_eq!(
        alg.map(|o| o.to_id_string()),
        Some("1.3.132.0.34".to_string()),
        "P-384 curve"
    );
    assert!(server.stop().success());
}

#[test]
fn bad_configuration_fails_with_one_clear_line() {
    let dir = tempdir();
    let bin = sigil_testkit::binary("sigil-server");
    let run = |args: &[&str]| {
        std::process::Command::new(&bin)
            .arg("run")
            .args(args)
            .arg("--admin-socket")
            .arg(dir.path().join("a.sock"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("running sigil-server")
    };
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("trust_domain is required"),
        "{}",
        stderr(&out)
    );

    let out = run(&["--trust-domain", "Not_Valid.ORG"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid trust_domain"),
        "{}",
        stderr(&out)
    );

    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "trust_domain = \"example.org\"\nbind_adress = \"127.0.0.1:1\"\n",
    )
    .expect("write");
    let out = run(&["--config", cfg.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bind_adress"),
        "unknown key named: {}",
        stderr(&out)
    );

    // A truncated CA key is refused with a clear error, and the file is left as it was.
    let server_dir = tempdir();
    let mut server = Server::start(server_dir.path(), &[]);
    assert!(server.stop().success());
    let key = server.data_dir.join("ca").join("root.key");
    let mode = std::fs::metadata(&key)
        .expect("root key exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "CA key file mode");
    let text = std::fs::read(&key).expect("reading key");
    std::fs::write(&key, &text[..text.len() / 2]).expect("truncating key");
    let out = std::process::Command::new(&bin)
        .args([
            "run",
            "--trust-domain",
            "example.org",
            "--health-address",
            "",
        ])
        .arg("--data-dir")
        .arg(&server.data_dir)
        .arg("--admin-socket")
        .arg(&server.admin_socket)
        .output()
        .expect("running sigil-server");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("root.key"), "error names the key file: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// SVID TTLs below the floors (1 min X.509, 30 s JWT) are refused everywhere they can be set:
/// entry create and update (flags and `--data`), and the server's defaults.
#[test]
fn svid_ttls_below_the_floors_are_refused() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let base = [
        "entry",
        "create",
        "--parent-id",
        AGENT,
        "--spiffe-id",
        "spiffe://example.org/short",
        "--selector",
        "unix:uid:1",
    ];
    for (flag, ttl, want) in [
        (
            "--x509-ttl",
            "20s",
            "X509-SVID TTL 20s is shorter than the minimum of 1m",
        ),
        (
            "--jwt-ttl",
            "5s",
            "JWT-SVID TTL 5s is shorter than the minimum of 30s",
        ),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, ttl]);
        let out = server.cli(&args);
        assert!(!out.status.success(), "{flag} {ttl} was accepted");
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
    }
    let data = dir.path().join("entries.json");
    std::fs::write(
        &data,
        r#"{"entries": [{"spiffe_id": "spiffe://example.org/short", "parent_id": "spiffe://example.org/node", "selectors": ["unix:uid:1"], "x509_svid_ttl": 2}]}"#,
    )
    .expect("writing entries");
    let out = server.cli(&["entry", "create", "--data", data.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("x509_svid_ttl"), "{}", stderr(&out));
    let mut args = base.to_vec();
    args.extend(["--x509-ttl", "1m", "--jwt-ttl", "30s"]);
    let created = server.cli_json(&args);
    let id = created["results"][0]["entry"]["id"].as_str().expect("id");
    let out = server.cli(&["entry", "update", "--entry-id", id, "--x509-ttl", "59s"]);
    assert!(!out.status.success());
    assert_eq!(server.cli_json(&["entry", "count"])["count"], 1);

    // The server's defaults: it refuses to start, naming the key.
    let out = std::process::Command::new(sigil_testkit::binary("sigil-server"))
        .args(["run", "--trust-domain", "example.org", "--data-dir"])
        .arg(dir.path().join("other"))
        .args(["--default-x509-svid-ttl", "20s", "--health-address", ""])
        .output()
        .expect("running sigil-server");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid ca.default_x509_svid_ttl"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_audit_lines_name_the_object_and_truncate_long_values() {
    let dir = tempdir();
    let mut server = Server::start(dir.path(), &["--log-format", "json"]);
    let created = server.cli_json(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/audited",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1000",
    ]);
    let id = created["results"][0]["entry"]["id"]
        .as_str()
        .expect("entry id")
        .to_string();
    // A 1 MB SPIFFE ID is refused; the audit line and the error keep only its start.
    let huge = format!("spiffe://example.org/{}", "x".repeat(1 << 20));
    let err = server
        .admin()
        .await
        .create_entry(pb::CreateEntryRequest {
            entry: Some(pb::Entry {
                spiffe_id: huge.clone(),
                parent_id: AGENT.into(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: "uid:1".into(),
                }],
                ..Default::default()
            }),
        })
        .await
        .expect_err("1 MB SPIFFE ID refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().len() < 1024, "{}", err.message().len());
    // An error echoing a 3,000-character value.
    let long_td = "t".repeat(3000);
    let err = server
        .admin()
        .await
        .delete_federated_bundle(pb::DeleteFederatedBundleRequest {
            trust_domain: long_td.clone(),
        })
        .await
        .expect_err("invalid trust domain");
    assert!(
        err.message().contains("… (3000 bytes)") && !err.message().contains(&"t".repeat(257)),
        "{}",
        err.message()
    );
    assert!(server.stop().success());

    let log = server.log_text();
    let audit: Vec<(String, serde_json::Value)> = log
        .lines()
        .filter(|l| l.contains("sigil::audit"))
        .map(|l| {
            let v = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            (l.to_string(), v)
        })
        .collect();
    assert_eq!(audit.len(), 3, "{log}");
    for (line, v) in &audit {
        assert_eq!(line.matches("\"target\":").count(), 1, "{line}");
        assert_eq!(v["target"], "sigil::audit", "{line}");
        assert!(line.len() < 2048, "audit line of {} bytes", line.len());
    }
    let (_, create) = &audit[0];
    assert_eq!(create["action"], "entry.create");
    assert_eq!(
        create["object"],
        format!("{id} (spiffe://example.org/audited)")
    );
    assert_eq!(create["result"], "ok");
    let (_, refused) = &audit[1];
    let object = refused["object"].as_str().expect("object");
    assert_eq!(object, format!("{}… ({} bytes)", &huge[..256], huge.len()));
    assert!(refused["result"]
        .as_str()
        .is_some_and(|r| r.starts_with("InvalidArgument")));
    let (_, deleted) = &audit[2];
    assert_eq!(deleted["action"], "bundle.delete");
    assert!(deleted["object"]
        .as_str()
        .is_some_and(|o| o.ends_with("… (3000 bytes)")));
    assert!(
        log.len() < 64 * 1024,
        "the refused megabyte reached the log"
    );
}

#[test]
fn empty_or_damaged_database_is_refused_at_start() {
    let dir = tempdir();
    let mut server = Server::start(dir.path(), &[]);
    assert!(server.stop().success());
    let db = server.data_dir.join("datastore.sqlite3");
    let good = std::fs::read(&db).expect("reading the database");
    let start = || {
        std::process::Command::new(sigil_testkit::binary("sigil-server"))
            .args([
                "run",
                "--trust-domain",
                "example.org",
                "--health-address",
                "",
            ])
            .args(["--bind-address", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&server.data_dir)
            .arg("--admin-socket")
            .arg(&server.admin_socket)
            .output()
            .expect("running sigil-server")
    };
    let without_wal = || {
        for ext in ["sqlite3-wal", "sqlite3-shm"] {
            let _ = std::fs::remove_file(db.with_extension(ext));
        }
    };

    // 0 bytes while the CA keys exist: the data was lost; refused, naming the file.
    std::fs::write(&db, b"").expect("emptying the database");
    without_wal();
    let out = start();
    let err = stderr(&out);
    assert!(!out.status.success(), "an empty database was used: {err}");
    assert!(
        err.contains(&db.display().to_string()) && err.contains("empty (0 bytes)"),
        "{err}"
    );
    assert!(err.contains("backup"), "says what to do: {err}");
    assert_eq!(std::fs::metadata(&db).map(|m| m.len()).ok(), Some(0));

    // Every page after the header page overwritten: damaged, refused, naming the file.
    let mut damaged = good.clone();
    for (i, b) in damaged.iter_mut().enumerate().skip(4096) {
        *b = (i * 31 + 7) as u8;
    }
    std::fs::write(&db, &damaged).expect("damaging the database");
    let out = start();
    let err = stderr(&out);
    assert!(!out.status.success(), "a damaged database was used: {err}");
    assert!(
        err.contains(&db.display().to_string()) && err.contains("damaged"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // The good file is used again.
    std::fs::write(&db, &good).expect("restoring the database");
    server.restart();
    assert!(server.stop().success());
}
