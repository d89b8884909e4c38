//! What operators read when something is wrong, with the real binaries: a mistyped log level
//! refused by both, a command pointed at another service's socket told which API answers
//! there, a socket they may not open not called missing, long inputs not echoed whole, no
//! `Some(…)` or repeated OS errors, selectors checked on `entry create` (refused, or a
//! warning for a type no Sigil attestor produces).

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sigil_testkit::{alias_token, binary, tempdir, Agent, Server};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The single `error: …` line of a failed command.
fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure: {}", stderr(out));
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

/// Runs `cmd` to completion; a process still running after 60 s (e.g. a server that accepted
/// a bad flag and started) is killed and fails the test.
fn output_within(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("waiting").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "still running after 60 s (the flag was accepted?): {}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// `sigil-server run` in `dir` with `extra` flags.
fn server_run(dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(binary("sigil-server"));
    c.args([
        "run",
        "--trust-domain",
        "example.org",
        "--health-address",
        "",
    ])
    .args(["--bind-address", "127.0.0.1:0"])
    .arg("--data-dir")
    .arg(dir.join("data"))
    .arg("--admin-socket")
    .arg(dir.join("admin.sock"))
    .args(extra)
    .env_remove("RUST_LOG");
    c
}

/// `sigil-agent run` in `dir` with `extra` flags (its server is not needed to get this far).
fn agent_run(dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(binary("sigil-agent"));
    c.args(["run", "--trust-domain", "example.org"])
        .args(["--server-address", "127.0.0.1:1", "--insecure-bootstrap"])
        .args(["--join-token", "t", "--health-address", ""])
        .arg("--data-dir")
        .arg(dir.join("agent-data"))
        .arg("--socket-path")
        .arg(dir.join("api.sock"))
        .arg("--admin-socket")
        .arg(dir.join("agent-admin.sock"))
        .args(extra)
        .env_remove("RUST_LOG");
    c
}

#[test]
fn log_levels_that_are_not_levels_are_refused_by_both_binaries() {
    let dir = tempdir();
    for level in ["verbose", "warning", "sigil_server=warning,info"] {
        for mut cmd in [
            server_run(dir.path(), &["--log-level", level]),
            agent_run(dir.path(), &["--log-level", level]),
        ] {
            let line = error_line(&output_within(&mut cmd));
            assert!(line.contains("is not a log level"), "{level}: {line}");
            assert!(
                line.contains("off, error, warn, info, debug, trace"),
                "{level}: {line}"
            );
        }
    }
    // RUST_LOG, which wins over --log-level, is held to the same rule.
    let line = error_line(&output_within(
        server_run(dir.path(), &[]).env("RUST_LOG", "verbose"),
    ));
    assert!(line.contains("invalid RUST_LOG"), "{line}");
}

#[test]
fn commands_pointed_at_another_services_socket_say_which_api_is_there() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("agent dir");
    let token = alias_token(&server, "spiffe://example.org/node");
    let mut agent = Agent::start(&server, &agent_dir, &["--join-token", &token]);
    agent.wait_log(60, "the agent ready", |l| l.contains("sigil-agent ready"));
    let workload_socket = agent_dir.join("api.sock");

    let run = |bin: &str, args: &[&str], socket_flag: &str, socket: &std::path::Path| {
        Command::new(binary(bin))
            .args(args)
            .arg(socket_flag)
            .arg(socket)
            .output()
            .expect("running the CLI")
    };
    let cases = [
        (
            run(
                "sigil-server",
                &["entry", "show"],
                "--admin-socket",
                &agent.admin_socket,
            ),
            "serves sigil-agent's admin API, not sigil-server's admin API",
        ),
        (
            run(
                "sigil-server",
                &["agent", "list"],
                "--admin-socket",
                &workload_socket,
            ),
            "serves the SPIFFE Workload API, not sigil-server's admin API",
        ),
        (
            run(
                "sigil-agent",
                &["api", "fetch", "x509"],
                "--socket-path",
                &server.admin_socket,
            ),
            "serves sigil-server's admin API, not the SPIFFE Workload API",
        ),
        (
            run(
                "sigil-agent",
                &["status"],
                "--admin-socket",
                &workload_socket,
            ),
            "serves the SPIFFE Workload API, not sigil-agent's admin API",
        ),
        (
            run(
                "sigil-agent",
                &["explain", "--pid", "1"],
                "--admin-socket",
                &server.admin_socket,
            ),
            "serves sigil-server's admin API, not sigil-agent's admin API",
        ),
    ];
    for (out, want) in cases {
        let line = error_line(&out);
        assert!(line.contains(want), "{line}");
        assert!(!line.contains("(Unimplemented)"), "{line}");
    }

    // The node alias was logged as a SPIFFE ID, not as `Some("…")`; the disabled health
    // endpoint as "disabled", not `None`.
    let log = server.log_text();
    assert!(
        log.contains("node_alias=spiffe://example.org/node"),
        "{log}"
    );
    assert!(log.contains("health_address=disabled"), "{log}");
    assert!(!log.contains("Some("), "{log}");
    assert!(!log.contains("=None"), "{log}");
}

#[test]
fn a_socket_this_user_may_not_open_is_not_called_missing() {
    let dir = tempdir();
    let server = Server::start(dir.path(), &[]);
    // The admin socket's directory is 0700 (root's), the socket 0600.
    let out = Command::new(binary("sigil-server"))
        .args(["entry", "show", "--admin-socket"])
        .arg(&server.admin_socket)
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running sigil-server as nobody");
    let line = error_line(&out);
    assert!(line.contains("permission denied"), "{line}");
    assert!(line.contains("run the command as that user"), "{line}");
    assert!(!line.contains("does not exist"), "{line}");
    assert!(!line.contains("os error"), "{line}");
}

#[test]
fn errors_are_one_line_without_repeats_or_whole_long_inputs() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);

    // A 3,000-byte argument is cut, with its length.
    let long_id = format!("spiffe://example.org/{}", "a".repeat(3000));
    let out = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        &long_id,
        "--parent-id",
        "spiffe://example.org/node",
        "--selector",
        "unix:uid:1000",
    ]);
    let line = error_line(&out);
    assert!(line.len() < 400, "{line}");
    assert!(line.contains("(3021 bytes)"), "{line}");
    // Answers of the server echo what they were given, cut too.
    let long = "c".repeat(3000);
    for args in [
        vec!["entry", "show", "--entry-id", &long],
        vec!["entry", "delete", "--entry-id", &long],
        vec!["entry", "update", "--entry-id", &long, "--hint", "h"],
        vec![
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            "spiffe://example.org/node",
            "--selector",
            "unix:uid:1",
            "--dns",
            &long,
        ],
    ] {
        let line = error_line(&server.cli(&args));
        assert!(line.len() < 400, "{args:?}: {line}");
        assert!(line.contains("(3000 bytes)"), "{args:?}: {line}");
    }
    let long_selector = format!("unix:path:/{}", "b".repeat(3000));
    let out = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--parent-id",
        "spiffe://example.org/node",
        "--selector",
        &long_selector,
    ]);
    let line = error_line(&out);
    assert!(line.len() < 400, "{line}");

    // An OS error shown once, not once per layer of the error chain.
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(agent_dir.join("agent-data").join("agent_svid.pem"))
        .expect("a directory where the SVID file goes");
    let mut agent = Agent::start(&server, &agent_dir, &["--join-token", "t"]);
    assert!(!agent.wait_exit(30).success());
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("an error line: {log}"));
    assert!(line.contains("agent_svid.pem"), "{line}");
    assert_eq!(line.matches("os error").count(), 1, "{line}");
}

#[test]
fn entry_create_checks_selectors_and_warns_about_unknown_types() {
    let dir = tempdir();
    let server = Server::start(dir.path(), &[]);
    let create = |selector: &str| {
        server.cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--parent-id",
            "spiffe://example.org/node",
            "--selector",
            selector,
        ])
    };
    for (bad, why) in [
        ("unix:uid:abc", "uid must be a decimal number"),
        ("unix:uid:-1", "uid must be a decimal number"),
        ("unix:uid:", "uid must be a decimal number"),
        ("unix:path:relative", "path must be an absolute path"),
        ("unix:nosuchkey:1", "unix has no key \"nosuchkey\""),
    ] {
        let line = error_line(&create(bad));
        assert!(line.contains(why), "{bad}: {line}");
    }
    // The same through a --data file (batch create).
    let data = dir.path().join("entries.json");
    std::fs::write(
        &data,
        r#"{"entries": [{"spiffe_id": "spiffe://example.org/d", "parent_id": "spiffe://example.org/node", "selectors": [{"type": "unix", "value": "uid:x"}]}]}"#,
    )
    .expect("writing --data");
    let out = server.cli(&["entry", "create", "--data", data.to_str().expect("utf-8")]);
    let line = error_line(&out);
    assert!(line.contains("uid must be a decimal number"), "{line}");

    // An unknown type is created, with a warning on stderr and in the server's log.
    let out = create("nosuchtype:x");
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("warning: selector \"nosuchtype:x\" has type \"nosuchtype\", which no Sigil attestor produces"),
        "{err}"
    );
    assert!(
        server
            .log_text()
            .contains("which no Sigil attestor produces"),
        "{}",
        server.log_text()
    );
}
