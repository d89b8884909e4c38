//! End-to-end tests of the daemons' sockets and signals with real processes: one server (agent)
//! per data directory, a live socket is never taken over by a second process, a socket directory
//! created by another user is refused, and SIGHUP does not stop either daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sigil_testkit::{binary, join_token, subdir, tempdir, wait_status, Agent, Server};

/// uid/gid of `nobody`: a user other than the one running the daemons (root in CI).
const NOBODY: u32 = 65534;

/// Runs `cmd` (stderr into `log`) until it exits on its own; fails the test after `secs`.
fn run_to_exit(mut cmd: Command, log: &Path, secs: u64) -> (ExitStatus, String) {
    let out = std::fs::File::create(log).expect("creating the log");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("spawning");
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            return (status, std::fs::read_to_string(log).unwrap_or_default());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the process did not exit within {secs} s (it should have refused to start); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sigil-server run` on `data_dir` and `admin_socket`, as the harness starts one.
fn server_cmd(data_dir: &Path, admin_socket: &Path) -> Command {
    let mut cmd = Command::new(binary("sigil-server"));
    cmd.arg("run")
        .args(["--trust-domain", "example.org"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--admin-socket")
        .arg(admin_socket)
        .args(["--bind-address", "127.0.0.1:0", "--health-address", ""]);
    cmd
}

/// `sigil-agent run` against `server` with the given data dir and sockets.
fn agent_cmd(server: &Server, dir: &Path, data_dir: &Path, socket: &Path, admin: &Path) -> Command {
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, server.cli_ok(&["bundle", "show"])).expect("writing bundle");
    let mut cmd = Command::new(binary("sigil-agent"));
    cmd.arg("run")
        .args(["--trust-domain", "example.org"])
        .args(["--server-address", &server.node_address()])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--socket-path")
        .arg(socket)
        .arg("--admin-socket")
        .arg(admin)
        .args(["--health-address", ""]);
    cmd
}

/// The server still answers on its admin socket, as itself.
fn server_answers(server: &Server) {
    let out = server.cli_ok(&["healthcheck"]);
    assert!(!out.is_empty());
    assert!(server
        .cli_ok(&["bundle", "show"])
        .contains("BEGIN CERTIFICATE"));
}

/// An agent started with a join token, synced (its admin socket answers).
fn synced_agent(server: &Server, dir: &Path) -> Agent {
    let (token, _) = join_token(server);
    let agent = Agent::start(server, dir, &["--join-token", &token]);
    wait_status(&agent, 60, "the first sync", |s| s["synced"] == true);
    agent
}

#[test]
fn a_second_server_neither_starts_on_the_same_data_dir_nor_takes_the_admin_socket() {
    let dir = tempdir();
    let mut server = Server::start(&dir.path().join("server"), &[]);

    // Same data directory (and socket): refused by the lock, before touching the socket.
    let (status, log) = run_to_exit(
        server_cmd(&server.data_dir, &server.admin_socket),
        &dir.path().join("second.log"),
        60,
    );
    assert!(!status.success(), "a second server started; log:\n{log}");
    assert!(log.contains("is in use by another sigil-server"), "{log}");
    assert!(log.contains("sigil-server.lock"), "{log}");
    let pid = server.child.as_ref().expect("running").id();
    assert!(log.contains(&format!("pid {pid}")), "{log}");
    server_answers(&server);

    // Another data directory but the same admin socket: the live socket is not replaced.
    let (status, log) = run_to_exit(
        server_cmd(&dir.path().join("other-data"), &server.admin_socket),
        &dir.path().join("third.log"),
        60,
    );
    assert!(
        !status.success(),
        "a second server took the socket; log:\n{log}"
    );
    assert!(log.contains("another process is serving on"), "{log}");
    assert!(
        log.contains(&server.admin_socket.display().to_string()),
        "{log}"
    );
    server_answers(&server);

    // The first one still stops cleanly and removes its own socket.
    assert!(server.stop().success());
    assert!(!server.admin_socket.exists());
}

#[test]
fn a_second_agent_neither_starts_on_the_same_data_dir_nor_takes_its_sockets() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let agent_dir = subdir(dir.path(), "agent");
    let agent = synced_agent(&server, &agent_dir);
    let socket = agent.socket_path();

    let (status, log) = run_to_exit(
        agent_cmd(
            &server,
            dir.path(),
            &agent.data_dir,
            &socket,
            &agent.admin_socket,
        ),
        &dir.path().join("second.log"),
        60,
    );
    assert!(!status.success(), "a second agent started; log:\n{log}");
    assert!(log.contains("is in use by another sigil-agent"), "{log}");
    assert!(log.contains("sigil-agent.lock"), "{log}");
    assert_eq!(
        agent.status()["synced"],
        true,
        "the first agent still answers"
    );
    assert!(socket.exists(), "the Workload API socket is still there");

    // Its own data directory (a fresh join token to attest with), the first one's sockets.
    let (token, _) = join_token(&server);
    let mut cmd = agent_cmd(
        &server,
        dir.path(),
        &dir.path().join("other-data"),
        &socket,
        &agent.admin_socket,
    );
    cmd.args(["--join-token", &token]);
    let (status, log) = run_to_exit(cmd, &dir.path().join("third.log"), 60);
    assert!(
        !status.success(),
        "a second agent took a socket; log:\n{log}"
    );
    assert!(log.contains("another process is serving on"), "{log}");
    assert_eq!(
        agent.status()["synced"],
        true,
        "the first agent still answers"
    );
    // The first agent's Workload API still answers (this test process has no entry, hence
    // "no identity issued").
    let out = Command::new(binary("sigil-agent"))
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(&socket)
        .output()
        .expect("running api fetch");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("no identity issued"), "{text}");
}

#[test]
fn an_agent_refuses_a_socket_directory_another_user_created() {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let agent_dir = subdir(dir.path(), "agent");
    // Pre-created by another user, as anyone could under /tmp.
    let public = subdir(&agent_dir, "public");
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::chown(&public, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");

    let (token, _) = join_token(&server);
    let mut cmd = agent_cmd(
        &server,
        &agent_dir,
        &agent_dir.join("data"),
        &public.join("api.sock"),
        &agent_dir.join("private").join("admin.sock"),
    );
    cmd.args(["--join-token", &token]);
    let (status, log) = run_to_exit(cmd, &agent_dir.join("agent.log"), 60);
    assert!(
        !status.success(),
        "the agent served from nobody's directory; log:\n{log}"
    );
    assert!(log.contains(&public.display().to_string()), "{log}");
    assert!(log.contains("owner uid 65534, mode 0755"), "{log}");
    assert!(!public.join("api.sock").exists());
    // Refused as it was: not taken over, not chmod-ed.
    let meta = std::fs::metadata(&public).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    // The admin socket it had bound meanwhile is gone again.
    assert!(!agent_dir.join("private").join("admin.sock").exists());
}

/// Waits until `log()` mentions SIGHUP, failing if the process exits meanwhile.
fn wait_sighup_logged(child: &mut std::process::Child, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            panic!("SIGHUP stopped the process ({status}); log:\n{}", log());
        }
        if log().contains("SIGHUP received") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP not logged; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_keeps_the_server_and_the_agent_running() {
    let dir = tempdir();
    let mut server = Server::start(&dir.path().join("server"), &[]);
    let agent_dir = subdir(dir.path(), "agent");
    let mut agent = synced_agent(&server, &agent_dir);

    server.signal(Signal::SIGHUP);
    let log_path = server.log.clone();
    wait_sighup_logged(server.child.as_mut().expect("running"), || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    });
    server_answers(&server);

    let pid = nix::unistd::Pid::from_raw(agent.child.as_ref().expect("running").id() as i32);
    nix::sys::signal::kill(pid, Signal::SIGHUP).expect("signalling the agent");
    let log_path = agent.log.clone();
    wait_sighup_logged(agent.child.as_mut().expect("running"), || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    });
    assert_eq!(agent.status()["synced"], true);
    assert!(agent.socket_path().exists());

    // Both still stop cleanly afterwards.
    assert!(agent.stop().success());
    assert!(server.stop().success());
}
