//! Migrating from SPIRE: entries registered in a real SPIRE server through its CLI, exported
//! with `spire-server entry show -output json`, imported into a real `sigil-server` with
//! `entry create --data` (a dry run first, then for real); the same workload (this test
//! process, by its uid) then gets the same SPIFFE ID from a SPIRE agent and from a Sigil agent.
//! Also: a file SPIRE's `entry create -data` accepts is read by Sigil as that format.
//!
//! Needs the SPIRE binaries (`tests/spire/build.sh`; sigil-testkit's `spire` module).

use std::path::Path;
use std::time::Duration;

use sigil_testkit::spire::{SpireAgent, SpireServer};
use sigil_testkit::{alias_token, subdir, tempdir, Agent, Server};

const NODE: &str = "spiffe://example.org/node-a";
const WORKLOAD: &str = "spiffe://example.org/web";

/// The default X509-SVID's SPIFFE ID a Workload API on `socket` gives this process, retried
/// (up to 60 s) while the agent has none for it yet.
fn svid_id(socket: &Path, log: impl Fn() -> String) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            let endpoint = format!("unix://{}", socket.display());
            let attempt = async {
                let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
                    .await
                    .map_err(|e| e.to_string())?;
                client.fetch_x509_svid().await.map_err(|e| e.to_string())
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(svid)) => return svid.spiffe_id().to_string(),
                Ok(Err(e)) => last = e,
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "no X509-SVID from {} in 60 s (last: {last}); log:\n{}",
            socket.display(),
            log()
        )
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn spire_entries_imported_into_sigil_give_the_same_identity() {
    let dir = tempdir();
    let uid = nix::unistd::getuid().as_raw();
    let spire = SpireServer::start(&subdir(dir.path(), "spire-server"), "example.org");

    // Registered as SPIRE users do: a join token with a node alias, entries under it.
    let token = spire.token_generate(Some(NODE));
    let unix_uid = format!("unix:uid:{uid}");
    spire.entry_create(&[
        "-parentID",
        NODE,
        "-spiffeID",
        WORKLOAD,
        "-selector",
        &unix_uid,
        "-x509SVIDTTL",
        "3600",
        "-dns",
        "web.example.org",
        "-hint",
        "web",
    ]);
    spire.entry_create(&[
        "-node",
        "-spiffeID",
        "spiffe://example.org/cluster/demo",
        "-selector",
        "k8s_psat:cluster:demo",
    ]);
    spire.entry_create(&[
        "-parentID",
        NODE,
        "-spiffeID",
        "spiffe://example.org/k8s/web",
        "-selector",
        "k8s:ns:prod",
        "-selector",
        "k8s:sa:web",
    ]);
    spire.entry_create(&[
        "-parentID",
        NODE,
        "-spiffeID",
        "spiffe://example.org/systemd/web",
        "-selector",
        "systemd:id:web.service",
    ]);
    // What Sigil cannot honour: a Docker label (Sigil's docker selectors are docker:id), an
    // SVIDStore entry; and the join-token alias itself (its parent is SPIRE's token agent).
    spire.entry_create(&[
        "-parentID",
        NODE,
        "-spiffeID",
        "spiffe://example.org/docker/web",
        "-selector",
        "docker:label:app:web",
    ]);
    spire.entry_create(&[
        "-parentID",
        NODE,
        "-spiffeID",
        "spiffe://example.org/stored",
        "-selector",
        "unix:uid:4242",
        "-storeSVID",
    ]);
    let export = spire.entry_show_json(&[]);
    assert_eq!(
        export["entries"].as_array().map(Vec::len),
        Some(7),
        "{export}"
    );
    let file = dir.path().join("spire-entries.json");
    std::fs::write(&file, export.to_string()).expect("writing the export");
    let file = file.to_str().expect("utf-8 path");

    let sigil = Server::start(&subdir(dir.path(), "sigil-server"), &[]);

    // Dry run: the plan, nothing created.
    let out = sigil.cli(&["entry", "create", "--data", file, "--dry-run"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}\n{stdout}");
    assert!(
        stdout.contains("Read 7 entries of SPIRE's `entry show -output json`"),
        "{stdout}"
    );
    assert!(stdout.contains("Would create 4 entries:"), "{stdout}");
    assert!(stdout.contains("Would refuse 3:"), "{stdout}");
    for (id, reason) in [
        (
            "spiffe://example.org/docker/web",
            "Sigil's docker attestor has no key \"label\"",
        ),
        ("spiffe://example.org/stored", "store_svid is set"),
        (
            NODE,
            "sigil-server token generate --spiffe-id spiffe://example.org/node-a",
        ),
    ] {
        assert!(
            stdout.lines().any(|l| l.contains(id) && l.contains(reason)),
            "{id}: {reason}\n{stdout}"
        );
    }
    assert_eq!(
        sigil.cli_json(&["entry", "count"])["count"],
        0,
        "a dry run creates nothing"
    );
    let plan = sigil.cli_json(&["entry", "create", "--data", file, "--dry-run"]);
    assert_eq!(
        plan["would_create"].as_array().map(Vec::len),
        Some(4),
        "{plan}"
    );
    assert_eq!(plan["refused"].as_array().map(Vec::len), Some(3), "{plan}");

    // --strict: one refusal, nothing created.
    let out = sigil.cli(&["entry", "create", "--data", file, "--strict"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--strict: nothing created"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(sigil.cli_json(&["entry", "count"])["count"], 0);

    // For real: the four created, the three refused named, a failing exit for the refusals.
    let out = sigil.cli(&["entry", "create", "--data", file]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "refusals make the exit status fail");
    assert!(
        stderr.contains("4 created, 3 refused, 0 failed"),
        "{stderr}"
    );
    assert!(stderr.contains("refused entry"), "{stderr}");
    let shown = sigil.cli_json(&["entry", "show"]);
    let entries = shown["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 4, "{shown}");
    let by_id = |id: &str| {
        entries
            .iter()
            .find(|e| e["spiffe_id"] == id)
            .unwrap_or_else(|| panic!("{id} not created: {shown}"))
    };
    let web = by_id(WORKLOAD);
    assert_eq!(web["parent_id"], NODE);
    assert_eq!(web["selectors"], serde_json::json!([unix_uid]));
    assert_eq!(web["x509_svid_ttl"], 3600);
    assert_eq!(web["dns_names"], serde_json::json!(["web.example.org"]));
    assert_eq!(web["hint"], "web");
    let alias = by_id("spiffe://example.org/cluster/demo");
    assert_eq!(alias["parent_id"], "spiffe://example.org/sigil/server");
    assert_eq!(
        alias["selectors"],
        serde_json::json!(["k8s_psat:cluster:demo"])
    );
    by_id("spiffe://example.org/k8s/web");
    by_id("spiffe://example.org/systemd/web");

    // The same workload, the same SPIFFE ID, from each system's agent.
    let spire_agent = SpireAgent::start(&spire, &subdir(dir.path(), "spire-agent"), &token);
    let sigil_token = alias_token(&sigil, NODE);
    let sigil_agent = Agent::start(
        &sigil,
        &subdir(dir.path(), "sigil-agent"),
        &["--join-token", &sigil_token],
    );
    let agents = spire.cli_ok(&["agent", "list"], &[]);
    assert!(agents.contains(&spire_agent.agent_id), "{agents}");
    let from_spire = svid_id(spire_agent.socket_path(), || spire_agent.log_text());
    let from_sigil = svid_id(&sigil_agent.socket_path(), || sigil_agent.log_text());
    assert_eq!(from_spire, WORKLOAD);
    assert_eq!(from_sigil, WORKLOAD);
}

#[test]
fn spire_create_data_files_are_read_as_spire_reads_them() {
    let dir = tempdir();
    let spire = SpireServer::start(&subdir(dir.path(), "spire-server"), "example.org");
    let sigil = Server::start(&subdir(dir.path(), "sigil-server"), &[]);
    // SPIRE's `entry create -data` input: string IDs, Go's case-insensitive names, entryExpiry.
    let data = serde_json::json!({"entries": [
        {"spiffe_id": "spiffe://example.org/nodes/demo", "parent_id": "spiffe://example.org/spire/server",
         "selectors": [{"type": "k8s_psat", "value": "cluster:demo"}], "x509_svid_ttl": 7200},
        {"SPIFFE_ID": "spiffe://example.org/db", "parent_id": "spiffe://example.org/nodes/demo",
         "selectors": [{"type": "unix", "value": "user:postgres"}], "entryExpiry": 0},
        {"spiffe_id": "spiffe://example.org/later", "parent_id": "spiffe://example.org/nodes/demo",
         "selectors": [{"type": "unix", "value": "uid:7"}], "entryExpiry": 4_102_444_800_i64}
    ]});
    let file = dir.path().join("spire-data.json");
    std::fs::write(&file, data.to_string()).expect("writing data file");
    let file = file.to_str().expect("utf-8 path");

    // SPIRE takes it.
    let created = spire.cli_ok(&["entry", "create"], &["-data", file, "-output", "json"]);
    let created: serde_json::Value = serde_json::from_str(&created).expect("JSON");
    let codes: Vec<i64> = created["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["status"]["code"].as_i64())
        .collect();
    assert_eq!(codes, [0, 0, 0], "{created}");

    // So does Sigil, as that format, mapping the node alias and refusing the expiring entry.
    let plan = sigil.cli_json(&["entry", "create", "--data", file, "--dry-run"]);
    assert_eq!(
        plan["format"], "SPIRE's `entry create -data` JSON",
        "{plan}"
    );
    let would: Vec<(&str, &str)> = plan["would_create"]
        .as_array()
        .expect("would_create")
        .iter()
        .filter_map(|e| Some((e["spiffe_id"].as_str()?, e["parent_id"].as_str()?)))
        .collect();
    assert_eq!(
        would,
        [
            (
                "spiffe://example.org/nodes/demo",
                "spiffe://example.org/sigil/server"
            ),
            ("spiffe://example.org/db", "spiffe://example.org/nodes/demo"),
        ]
    );
    assert_eq!(
        plan["refused"][0]["spiffe_id"],
        "spiffe://example.org/later"
    );
    assert!(
        plan["refused"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Sigil entries do not expire")),
        "{plan}"
    );
}
