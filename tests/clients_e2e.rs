//! Real SPIFFE clients in other languages against a real `sigil-agent` (attested to a real
//! `sigil-server`), over its Workload API socket found through `SPIFFE_ENDPOINT_SOCKET`:
//!
//! - Python: py-spiffe (`WorkloadApiClient`), including a rotation seen on an open X.509 watch;
//! - Go: go-spiffe v2 (`X509Source`, JWT-SVIDs, `spiffetls` mutual TLS between two workloads
//!   attested by uid, and a client expecting another server ID refused);
//! - Java: grpc-java over Netty's epoll Unix socket, stubs generated from proto/spiffe/workload.proto;
//! - Node.js: @grpc/grpc-js with proto/spiffe/workload.proto loaded at run time.
//!
//! Each program (tests/clients/<language>/) fetches the first X509-SVID of the stream, the X.509
//! and JWT bundles and a JWT-SVID, validates it through the agent and locally against the JWT
//! bundle, and prints one line per result, which the tests here check against the agent's own
//! view. gRPC C-core (py-spiffe) and grpc-java send the socket path as the HTTP/2 `:authority`,
//! which a plain hyper server refuses; they work because of the adapter in
//! `common/h2_authority.rs`.
//!
//! The programs are built, and their packages installed, by `.ci/run` (pinned versions; the Rust
//! tests only run them): py-spiffe into `target/ci-venv`, `npm ci` in tests/clients/node,
//! `go build` into `target/clients/go/`, `mvn package` into tests/clients/java/target/. A test
//! whose client is missing fails, saying so.

use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sigil_testkit::{agent_with_workload_entries, tempdir, Server, WorkloadAgent};

/// Audience the clients ask their JWT-SVIDs for (their default).
const AUDIENCE: &str = "sigil-e2e";
/// Generous bound for one client run: a JVM or a Python interpreter starting on 2 loaded cores.
const CLIENT_SECS: u64 = 180;
/// The unprivileged uid (and gid) the second Go workload runs as.
const NOBODY: u32 = 65534;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Fails the test: `what` is missing; `.ci/run` installs it.
fn missing(what: &str, path: &Path) -> ! {
    panic!(
        "{what} is missing ({} not found): run .ci/run, which installs and builds the clients \
         in tests/clients/ before `cargo test`",
        path.display()
    )
}

fn require(what: &str, path: PathBuf) -> PathBuf {
    if !path.exists() {
        missing(what, &path);
    }
    path
}

/// A server and an agent in a fresh temp dir holding an SVID for each `(id, selectors)`
/// (`extra` flags go to every `entry create`). Bound as `(dir, server, w)`, they drop in the
/// right order.
fn server_and_agent(
    entries: &[(&str, &[&str])],
    extra: &[&str],
) -> (tempfile::TempDir, Server, WorkloadAgent) {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let w = agent_with_workload_entries(&server, dir.path(), entries, extra);
    (dir, server, w)
}

/// `SPIFFE_ENDPOINT_SOCKET` for an agent: `unix:///abs/path`.
fn endpoint(w: &WorkloadAgent) -> String {
    format!("unix://{}", w.agent.socket_path().display())
}

/// A client process, stdout read line by line, killed on drop.
struct ClientProc {
    what: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl ClientProc {
    /// Starts `cmd` with `SPIFFE_ENDPOINT_SOCKET` set to the agent's socket.
    fn spawn(what: &str, mut cmd: Command, w: &WorkloadAgent) -> ClientProc {
        cmd.env("SPIFFE_ENDPOINT_SOCKET", endpoint(w))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A binary this test has just copied can be "busy" for a moment: another test thread
        // may have forked (to spawn its own process) while the copy's file was open for
        // writing, and that child holds the descriptor until it execs. Retry briefly.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(26) && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("starting the {what} ({cmd:?}): {e}"),
            }
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        ClientProc {
            what: what.to_string(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Everything printed so far, for failure messages.
    fn transcript(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        format!("{} stdout so far:\n{}", self.what, self.seen.join("\n"))
    }

    /// Waits (`secs`) for a stdout line starting with `prefix` and returns it.
    fn wait_line(&mut self, prefix: &str, secs: u64) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("waiting for the client");
                    let (stdout, stderr) = (self.transcript(), self.take_stderr());
                    panic!(
                        "the {} exited ({status}) without printing {prefix:?}; {stdout}\nstderr:\n{stderr}",
                        self.what
                    );
                }
            }
            if Instant::now() >= deadline {
                let stdout = self.transcript();
                panic!(
                    "the {} did not print {prefix:?} within {secs} s; {stdout}",
                    self.what
                );
            }
        }
    }

    fn take_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let handle = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        handle.join().unwrap_or_default()
    }

    /// Closes stdin and waits (`secs`) for the exit; returns the status, every stdout line and
    /// stderr.
    fn finish(mut self, secs: u64) -> (ExitStatus, Vec<String>, String) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waiting for the client") {
                break s;
            }
            if Instant::now() > deadline {
                let stdout = self.transcript();
                panic!("the {} did not finish within {secs} s; {stdout}", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The pipe closes with the process; the reader sends what was left, then hangs up.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(l);
        }
        let stderr = self.take_stderr();
        (status, std::mem::take(&mut self.seen), stderr)
    }

    /// [`ClientProc::finish`], asserting a successful exit; returns the stdout lines.
    fn finish_ok(self, secs: u64) -> Vec<String> {
        let what = self.what.clone();
        let (status, lines, stderr) = self.finish(secs);
        // Shown with the test's output when it fails.
        eprintln!("{what} stdout:\n{}", lines.join("\n"));
        assert!(
            status.success(),
            "the {what} failed ({status}); stdout:\n{}\nstderr:\n{stderr}",
            lines.join("\n")
        );
        lines
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one line starting with `prefix` (fails if none or several).
fn line<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    let found: Vec<&String> = lines.iter().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one line starting with {prefix:?} in:\n{}",
        lines.join("\n")
    );
    found[0]
}

/// A certificate serial as a number in hex, without leading zeros (the agent's status prints the
/// DER bytes, the clients the integer).
fn serial_number(hex: &str) -> String {
    let s = hex.trim_start_matches('0').to_lowercase();
    if s.is_empty() {
        "0".to_string()
    } else {
        s
    }
}

/// The serial of the agent's current SVID for `id`.
fn agent_serial(w: &WorkloadAgent, id: &str) -> String {
    let status = w.agent.status();
    let svid = status["svids"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["spiffe_id"] == id))
        .unwrap_or_else(|| panic!("no SVID for {id} in the agent's status: {status}"));
    serial_number(svid["serial"].as_str().expect("serial"))
}

/// The serial a client printed in its `x509_svid <id> <serial>` line.
fn printed_serial(lines: &[String], id: &str) -> String {
    let l = line(lines, "x509_svid ");
    let rest = l
        .strip_prefix(&format!("x509_svid {id} "))
        .unwrap_or_else(|| panic!("{l:?} is not `x509_svid {id} <serial>`"));
    serial_number(rest)
}

/// What every client prints for the fetches and validations, checked against the agent: the
/// SVID it holds for `id` (unless `serial_check` is off because a rotation may intervene), the
/// bundle's single root, the JWT-SVID validated both ways and refused for another audience.
fn assert_fetched(lines: &[String], w: &WorkloadAgent, id: &str, serial_check: bool) {
    let printed = printed_serial(lines, id);
    if serial_check {
        assert_eq!(
            printed,
            agent_serial(w, id),
            "the client's X509-SVID is the agent's current one"
        );
    }
    for expected in [
        format!("x509_verified {id}"),
        "x509_bundle example.org 1".to_string(),
        format!("jwt_svid {id}"),
        format!("jwt_validated {id} local"),
        format!("jwt_validated {id} agent"),
        "jwt_refused another-audience".to_string(),
    ] {
        assert_eq!(line(lines, &expected), expected);
    }
    // The trust domain's JWT bundle holds at least the key that signed the token.
    let keys: usize = line(lines, "jwt_bundle example.org ")
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("jwt_bundle key count");
    assert!(keys >= 1, "{lines:?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("x509_bundle "))
            .count(),
        1,
        "one trust domain, no federation: {lines:?}"
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn python_py_spiffe_fetches_validates_and_sees_a_rotation() {
    const ID: &str = "spiffe://example.org/python";
    let python = require(
        "the CI virtualenv's Python",
        repo().join("target/ci-venv/bin/python"),
    );
    let check = Command::new(&python)
        .args(["-c", "import spiffe"])
        .output()
        .expect("running the venv's python");
    if !check.status.success() {
        missing(
            "py-spiffe (tests/clients/python/requirements.txt)",
            &repo().join("target/ci-venv"),
        );
    }
    let selector = format!("unix:uid:{}", uid());
    // 1 min: the agent rotates at about half of it, while the watch is open.
    let (_dir, _server, w) = server_and_agent(&[(ID, &[selector.as_str()])], &["--x509-ttl", "1m"]);

    let mut cmd = Command::new(&python);
    cmd.arg(repo().join("tests/clients/python/spiffe_client.py"))
        .args(["--audience", AUDIENCE, "--rotation", "150"]);
    let mut client = ClientProc::spawn("py-spiffe client", cmd, &w);
    client.wait_line("jwt_refused", CLIENT_SECS);
    let lines = client.finish_ok(CLIENT_SECS);
    assert_fetched(&lines, &w, ID, false);

    let first = printed_serial(&lines, ID);
    let rotated = line(&lines, "x509_rotated ")
        .strip_prefix(&format!("x509_rotated {ID} "))
        .map(serial_number)
        .unwrap_or_else(|| panic!("x509_rotated line for {ID}: {lines:?}"));
    assert_ne!(rotated, first, "the watch delivered a new SVID");
    let minted = sigil_testkit::minted(&w.agent.log_text());
    assert!(minted >= 2, "the agent rotated (minted {minted})");
}

#[test]
fn node_grpc_js_fetches_and_validates() {
    const ID: &str = "spiffe://example.org/node";
    let dir = repo().join("tests/clients/node");
    require(
        "@grpc/grpc-js (npm ci in tests/clients/node)",
        dir.join("node_modules/@grpc/grpc-js/package.json"),
    );
    let selector = format!("unix:uid:{}", uid());
    let (_dir, _server, w) = server_and_agent(&[(ID, &[selector.as_str()])], &[]);

    let mut cmd = Command::new("node");
    cmd.arg(dir.join("client.js")).arg(AUDIENCE);
    let lines = ClientProc::spawn("grpc-js client", cmd, &w).finish_ok(CLIENT_SECS);
    assert_fetched(&lines, &w, ID, true);
    assert_eq!(line(&lines, "no_header_refused"), "no_header_refused");
}

#[test]
fn java_grpc_java_fetches_and_validates() {
    const ID: &str = "spiffe://example.org/java";
    let jar = require(
        "the grpc-java client (mvn package in tests/clients/java)",
        repo().join("tests/clients/java/target/sigil-java-client.jar"),
    );
    let selector = format!("unix:uid:{}", uid());
    let (_dir, _server, w) = server_and_agent(&[(ID, &[selector.as_str()])], &[]);

    let mut cmd = Command::new("java");
    // A short-lived client: the quick JIT tier and the serial collector start fastest.
    cmd.args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-jar"])
        .arg(&jar)
        .arg(AUDIENCE);
    let lines = ClientProc::spawn("grpc-java client", cmd, &w).finish_ok(CLIENT_SECS);
    assert_fetched(&lines, &w, ID, true);
}

fn go_client() -> PathBuf {
    require(
        "the go-spiffe client (go build in tests/clients/go)",
        repo().join("target/clients/go/sigil-go-client"),
    )
}

#[test]
fn go_spiffe_fetches_and_validates() {
    const ID: &str = "spiffe://example.org/go";
    let go = go_client();
    let selector = format!("unix:uid:{}", uid());
    let (_dir, _server, w) = server_and_agent(&[(ID, &[selector.as_str()])], &[]);

    let mut cmd = Command::new(go);
    cmd.args(["fetch", "-audience", AUDIENCE]);
    let lines = ClientProc::spawn("go-spiffe client", cmd, &w).finish_ok(CLIENT_SECS);
    assert_fetched(&lines, &w, ID, true);
}

#[test]
fn go_spiffe_mtls_between_two_workloads_and_a_wrong_server_id_refused() {
    const SERVER: &str = "spiffe://example.org/go-server";
    const CLIENT: &str = "spiffe://example.org/go-client";
    let go = go_client();
    // Two workloads told apart by uid: the server runs as nobody, the client as this test.
    let server_sel = format!("unix:uid:{NOBODY}");
    let client_sel = format!("unix:uid:{}", uid());
    let (dir, _server, w) = server_and_agent(
        &[
            (SERVER, &[server_sel.as_str()]),
            (CLIENT, &[client_sel.as_str()]),
        ],
        &[],
    );
    // nobody must reach the socket (the temp dir is 0700) and run the binary (wherever the
    // checkout is): a copy in the temp dir.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("opening the temp dir to nobody");
    let go_copy = dir.path().join("sigil-go-client");
    std::fs::copy(&go, &go_copy).expect("copying the Go client");
    std::fs::set_permissions(&go_copy, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the copy");

    let mut cmd = Command::new(&go_copy);
    cmd.args(["serve", "-authorize", CLIENT])
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir(dir.path());
    let mut server = ClientProc::spawn("go-spiffe mTLS server (uid nobody)", cmd, &w);
    let first = server.wait_line("x509_svid ", CLIENT_SECS);
    assert!(
        first.starts_with(&format!("x509_svid {SERVER} ")),
        "the server (uid {NOBODY}) is {SERVER}: {first}"
    );
    let address = server
        .wait_line("listening ", CLIENT_SECS)
        .trim_start_matches("listening ")
        .to_string();

    // The client, expecting the server's ID: one exchange, each side seeing the other's ID.
    let mut cmd = Command::new(&go);
    cmd.args(["dial", "-address", &address, "-expect", SERVER]);
    let lines = ClientProc::spawn("go-spiffe mTLS client", cmd, &w).finish_ok(CLIENT_SECS);
    assert!(
        line(&lines, "x509_svid ").starts_with(&format!("x509_svid {CLIENT} ")),
        "{lines:?}"
    );
    assert_eq!(line(&lines, "mtls_peer "), format!("mtls_peer {SERVER}"));
    assert_eq!(
        line(&lines, "mtls_reply "),
        format!("mtls_reply hello {CLIENT}, you said ping")
    );
    assert_eq!(
        server.wait_line("served ", CLIENT_SECS),
        format!("served {CLIENT}")
    );

    // The same client expecting another server ID refuses the handshake (exit 2).
    let other = "spiffe://example.org/someone-else";
    let mut cmd = Command::new(&go);
    cmd.args(["dial", "-address", &address, "-expect", other]);
    let (status, lines, stderr) =
        ClientProc::spawn("go-spiffe mTLS client (wrong ID)", cmd, &w).finish(CLIENT_SECS);
    assert_eq!(
        status.code(),
        Some(2),
        "a refused handshake; stdout {lines:?}, stderr {stderr}"
    );
    let refused = line(&lines, "mtls_refused ");
    assert!(
        refused.contains(SERVER) && refused.contains("unexpected ID"),
        "refused because the server is {SERVER}, not {other}: {refused}"
    );
    // The server saw that handshake fail, and stops when its stdin closes.
    server.wait_line("handshake_failed ", CLIENT_SECS);
    let (status, _, stderr) = server.finish(CLIENT_SECS);
    assert!(status.success(), "server exit {status}; stderr {stderr}");
}
