//! End-to-end tests of `sigil-agent helper` with a real server, agent and nginx (Debian's
//! `nginx` package, installed by `.ci/run`): nginx serves mutual TLS from the helper's files
//! across three rotations of a 1-minute SVID with no failed handshake (openssl s_client and curl,
//! verifying the server's certificate and host name), whether the helper starts nginx (`cmd`) or
//! signals a separately started one (`pid_file_name`). Also: one-shot mode waiting for an agent
//! that is not there yet, the child's exit status and signals passed on, and bad configurations
//! refused with a message naming the key.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sigil_testkit::{create_entry, join_token, subdir, tempdir, Agent, Server};

/// The unprivileged uid (`nobody`) of the client process.
const NOBODY: u32 = 65534;
const NGINX: &str = "/usr/sbin/nginx";

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// A temp dir others may traverse (the client runs as `nobody` and needs the socket).
fn shared_tempdir() -> tempfile::TempDir {
    let d = tempdir();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// A server, and an agent (in `<dir>/agent`) holding SVIDs for `entries`: `(spiffe_id,
/// selector, extra entry flags)`.
fn server_and_agent(dir: &Path, entries: &[(&str, &str, &[&str])]) -> (Server, Agent) {
    let server = Server::start(&dir.join("server"), &[]);
    let (token, agent_id) = join_token(&server);
    for (id, selector, extra) in entries {
        create_entry(&server, &agent_id, id, &[selector], extra);
    }
    let agent = Agent::start(&server, &subdir(dir, "agent"), &["--join-token", &token]);
    let ids: Vec<&str> = entries.iter().map(|e| e.0).collect();
    agent.wait_svids_for(&ids, 60);
    (server, agent)
}

/// A process killed (after SIGTERM, then SIGKILL) when dropped.
struct Proc {
    child: Option<Child>,
    what: &'static str,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().map_or(0, |c| c.id() as i32))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).expect("signalling");
    }

    /// Waits for the exit (fails the test after `secs`).
    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit in {secs} s; log:\n{}",
                    self.what,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log holds `needle` (fails the test after `secs` or if the process exits).
    fn wait_log(&mut self, secs: u64, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.log_text().contains(needle) {
            if let Some(s) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                panic!(
                    "{} exited ({s}) before logging {needle:?}; log:\n{}",
                    self.what,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} in {secs} s; log:\n{}",
                self.what,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first: a helper passes it on to its nginx, which then stops its workers.
            sigil_testkit::terminate(&mut c, Duration::from_secs(10));
        }
    }
}

/// Starts `sigil-agent helper --config <config>` with its stderr in `log`.
fn start_helper(config: &Path, log: &Path, what: &'static str) -> Proc {
    let out = std::fs::File::create(log).expect("helper log");
    let child = Command::new(sigil_testkit::binary("sigil-agent"))
        .args(["helper", "--config"])
        .arg(config)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("spawning sigil-agent helper");
    Proc {
        child: Some(child),
        what,
        log: log.to_path_buf(),
    }
}

/// Writes a helper config for the X509-SVID in `cert_dir` (spiffe-helper's file names) plus
/// `extra` TOML lines.
fn helper_config(path: &Path, socket: &Path, cert_dir: &Path, extra: &str) {
    let text = format!(
        "agent_address = \"unix://{}\"\ncert_dir = \"{}\"\nsvid_file_name = \"svid.pem\"\nsvid_key_file_name = \"svid_key.pem\"\nsvid_bundle_file_name = \"svid_bundle.pem\"\n{extra}\n",
        socket.display(),
        cert_dir.display()
    );
    std::fs::write(path, text).expect("writing helper config");
}

/// nginx serving mutual TLS on 127.0.0.1:`port` from `certs`, prefix `prefix`, in the
/// foreground, with its pid file and logs in `prefix`.
fn nginx_config(prefix: &Path, certs: &Path, port: u16) {
    std::fs::create_dir_all(prefix.join("tmp")).expect("nginx tmp");
    let p = prefix.display();
    let c = certs.display();
    let conf = format!(
        r#"daemon off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {c}/svid.pem;
        ssl_certificate_key {c}/svid_key.pem;
        ssl_client_certificate {c}/svid_bundle.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        location / {{ return 200 "verify=$ssl_client_verify\n"; }}
    }}
}}
"#
    );
    std::fs::write(prefix.join("nginx.conf"), conf).expect("nginx.conf");
}

/// nginx's arguments for `prefix` (foreground, its own error log from the start).
fn nginx_args(prefix: &Path) -> Vec<String> {
    vec![
        "-p".into(),
        format!("{}/", prefix.display()),
        "-c".into(),
        "nginx.conf".into(),
        "-e".into(),
        "error.log".into(),
    ]
}

/// Runs `cmd`, killing it after `secs`.
fn output_within(cmd: &mut Command, secs: u64, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait_with_output().expect("output")
}

/// The client's identity files (`api fetch x509 --write`).
struct ClientFiles {
    dir: PathBuf,
}

/// One handshake with `openssl s_client` (server verified against the bundle, host name
/// `localhost` checked, client certificate presented) and an HTTP request: the served
/// certificate's serial on success, else what went wrong.
fn openssl_handshake(port: u16, client: &ClientFiles) -> Result<String, String> {
    let d = &client.dir;
    let out = output_within(
        Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", "-verify_hostname", "localhost"])
            .arg("-verify_return_error")
            .arg("-CAfile")
            .arg(d.join("bundle.pem"))
            .arg("-cert")
            .arg(d.join("svid.pem"))
            .arg("-key")
            .arg(d.join("svid.key"))
            .arg("-ign_eof"),
        20,
        b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success()
        || !stdout.contains("verify=SUCCESS")
        || !stdout.contains("Verify return code: 0 (ok)")
    {
        return Err(format!(
            "openssl s_client: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let leaf = sigil::x509::parse_pem_certs(&stdout)
        .map_err(|e| format!("no server certificate in the s_client output ({e}): {stdout}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf[0]).map_err(|e| e.to_string())?;
    Ok(cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// One request with curl (server certificate and host name verified, client certificate).
fn curl_request(port: u16, client: &ClientFiles) -> Result<(), String> {
    let d = &client.dir;
    let out = output_within(
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "15"])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .arg("--cacert")
            .arg(d.join("bundle.pem"))
            .arg("--cert")
            .arg(d.join("svid.pem"))
            .arg("--key")
            .arg(d.join("svid.key"))
            .arg(format!("https://localhost:{port}/")),
        20,
        b"",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains("verify=SUCCESS") {
        Ok(())
    } else {
        Err(format!(
            "curl: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// An nginx answering handshakes, and the serials it has served (in order of first sight).
struct Served {
    port: u16,
    serials: Vec<String>,
}

impl Served {
    /// Records one handshake's serial. The certificate just replaced may still be served for a
    /// moment: on a reload nginx starts the new workers before it tells the old ones to stop
    /// accepting, so for a while both answer. Anything older than that is a stale file.
    fn record(&mut self, serial: String) {
        if self.serials.last() == Some(&serial) {
            return;
        }
        match self.serials.iter().position(|s| *s == serial) {
            None => self.serials.push(serial),
            Some(i) => assert!(
                i + 2 == self.serials.len(),
                "nginx on {} went back to a certificate older than the previous one {serial}: {:?}",
                self.port,
                self.serials
            ),
        }
    }
}

/// Waits until nginx on `port` completes a handshake.
fn wait_nginx(port: u16, client: &ClientFiles, prefix: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match openssl_handshake(port, client) {
            Ok(_) => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "nginx on {port} not serving after 60 s: {e}\nerror.log:\n{}",
                std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// nginx serves mutual TLS from the helper's files through three rotations of a 1-minute
/// X509-SVID, reloading on SIGHUP, with every handshake succeeding: nginx A is the helper's
/// child (`cmd`), nginx B runs on its own and is signalled through its pid file. The client is
/// another workload (uid nobody) with its own SVID; both sides verify each other against the
/// trust bundle, and curl and openssl check the server's host name (the entry's DNS SAN).
#[test]
fn nginx_serves_mtls_across_three_rotations() {
    let started = Instant::now();
    assert!(
        Path::new(NGINX).exists(),
        "{NGINX} is missing: install Debian's nginx package (.ci/run does)"
    );
    let dir = shared_tempdir();
    let root = dir.path();
    let me = format!("unix:uid:{}", uid());
    let nobody = format!("unix:uid:{NOBODY}");
    let (_server, agent) = server_and_agent(
        root,
        &[
            (
                "spiffe://example.org/nginx",
                me.as_str(),
                &["--x509-ttl", "1m", "--dns", "localhost"],
            ),
            ("spiffe://example.org/client", nobody.as_str(), &[]),
        ],
    );
    let socket = agent.socket_path();

    // The client's SVID, fetched by a process of uid nobody into a directory it owns.
    let client = ClientFiles {
        dir: subdir(root, "client"),
    };
    nix::unistd::chown(&client.dir, Some(NOBODY.into()), Some(NOBODY.into())).expect("chown");
    let out = Command::new(sigil_testkit::binary("sigil-agent"))
        .args(["api", "fetch", "x509", "--socket-path"])
        .arg(&socket)
        .arg("--write")
        .arg(&client.dir)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("running api fetch as nobody");
    assert!(
        out.status.success(),
        "api fetch as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // nginx A: started by helper A once the files are there, sent SIGHUP on each rotation.
    let (a_prefix, a_certs, a_port) = (
        subdir(root, "nginx-a"),
        root.join("certs-a"),
        sigil_testkit::free_port(),
    );
    nginx_config(&a_prefix, &a_certs, a_port);
    let args: Vec<String> = nginx_args(&a_prefix)
        .iter()
        .map(|a| format!("{a:?}"))
        .collect();
    helper_config(
        &root.join("helper-a.toml"),
        &socket,
        &a_certs,
        &format!(
            "cmd = \"{NGINX}\"\ncmd_args = [{}]\nrenew_signal = \"SIGHUP\"",
            args.join(", ")
        ),
    );
    let mut helper_a = start_helper(
        &root.join("helper-a.toml"),
        &root.join("helper-a.log"),
        "helper A",
    );

    // nginx B: started here after helper B wrote the files; helper B signals it by pid file.
    let (b_prefix, b_certs, b_port) = (
        subdir(root, "nginx-b"),
        root.join("certs-b"),
        sigil_testkit::free_port(),
    );
    nginx_config(&b_prefix, &b_certs, b_port);
    helper_config(
        &root.join("helper-b.toml"),
        &socket,
        &b_certs,
        &format!(
            "pid_file_name = \"{}\"\nrenew_signal = \"SIGHUP\"",
            b_prefix.join("nginx.pid").display()
        ),
    );
    let mut helper_b = start_helper(
        &root.join("helper-b.toml"),
        &root.join("helper-b.log"),
        "helper B",
    );
    // Generous: the agent hashes the (debug, 100+ MB) helper binary for its first attestation.
    helper_b.wait_log(180, "X509-SVID written");
    let nginx_b_log = b_prefix.join("stderr.log");
    let nginx_b = Proc {
        child: Some(
            Command::new(NGINX)
                .args(nginx_args(&b_prefix))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&nginx_b_log).expect("log"))
                .spawn()
                .expect("starting nginx B"),
        ),
        what: "nginx B",
        log: b_prefix.join("error.log"),
    };
    helper_a.wait_log(180, "child started");
    wait_nginx(a_port, &client, &a_prefix);
    wait_nginx(b_port, &client, &b_prefix);

    // Handshakes back to back until both have served three rotations.
    let rotations_started = Instant::now();
    let mut servers = [
        Served {
            port: a_port,
            serials: Vec::new(),
        },
        Served {
            port: b_port,
            serials: Vec::new(),
        },
    ];
    let mut handshakes = 0usize;
    let mut failures: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while servers.iter().any(|s| s.serials.len() < 4) {
        assert!(
            Instant::now() < deadline,
            "no three rotations in 240 s: serials {:?} / {:?}\nhelper A:\n{}\nhelper B:\n{}",
            servers[0].serials,
            servers[1].serials,
            helper_a.log_text(),
            helper_b.log_text()
        );
        for s in &mut servers {
            match openssl_handshake(s.port, &client) {
                Ok(serial) => s.record(serial),
                Err(e) => failures.push(e),
            }
            if let Err(e) = curl_request(s.port, &client) {
                failures.push(e);
            }
            handshakes += 2;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {handshakes} handshakes failed; first: {}\nnginx A error.log:\n{}",
        failures.len(),
        failures[0],
        std::fs::read_to_string(a_prefix.join("error.log")).unwrap_or_default()
    );
    let a_log = helper_a.log_text();
    let b_log = helper_b.log_text();
    assert!(a_log.matches("child signalled").count() >= 3, "{a_log}");
    assert!(
        b_log.matches("pid_file_name process signalled").count() >= 3,
        "{b_log}"
    );

    // SIGTERM to helper A reaches nginx A, which stops; the helper exits with its status (0).
    let nginx_a_pid: i32 = std::fs::read_to_string(a_prefix.join("nginx.pid"))
        .expect("nginx A pid file")
        .trim()
        .parse()
        .expect("pid");
    helper_a.signal(nix::sys::signal::Signal::SIGTERM);
    let status = helper_a.wait(30);
    assert!(
        status.success(),
        "helper A: {status}\n{}",
        helper_a.log_text()
    );
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(nginx_a_pid), None).is_err(),
        "nginx A still runs after the helper stopped"
    );
    drop(helper_b);
    drop(nginx_b);
    eprintln!(
        "{handshakes} handshakes, serials A {:?}, B {:?}; rotations {:.0} s, test {:.0} s",
        servers[0].serials,
        servers[1].serials,
        rotations_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// With `daemon_mode = false`, a helper started before the agent waits for its socket (retrying
/// with back-off, logged), then writes the X509-SVID, a JWT-SVID and the JWT bundle once and
/// exits 0: files whole, key matching the certificate, modes as configured, links into one
/// version directory.
#[test]
fn one_shot_helper_waits_for_the_agent_and_writes_everything() {
    let dir = shared_tempdir();
    let root = dir.path();
    let server = Server::start(&root.join("server"), &[]);
    let (token, agent_id) = join_token(&server);
    let me = format!("unix:uid:{}", uid());
    create_entry(
        &server,
        &agent_id,
        "spiffe://example.org/files",
        &[&me],
        &[],
    );
    let agent_dir = subdir(root, "agent");
    let socket = agent_dir.join("api.sock");
    let certs = root.join("certs");
    helper_config(
        &root.join("helper.toml"),
        &socket,
        &certs,
        "daemon_mode = false\nkey_file_mode = \"0640\"\njwt_svids = [{jwt_audience = \"db\", jwt_svid_file_name = \"db.jwt\"}]\njwt_bundle_file_name = \"jwt_bundle.json\"",
    );
    let mut helper = start_helper(
        &root.join("helper.toml"),
        &root.join("helper.log"),
        "helper",
    );
    helper.wait_log(30, "retry_in_secs=2");
    let log = helper.log_text();
    assert!(
        log.contains("cannot reach the Workload API; retrying"),
        "{log}"
    );
    assert!(
        log.contains("does not exist: is sigil-agent running?"),
        "{log}"
    );

    let agent = Agent::start(&server, &agent_dir, &["--join-token", &token]);
    agent.wait_svids_for(&["spiffe://example.org/files"], 60);
    // Generous: the agent hashes the (debug, 100+ MB) helper binary for its first attestation.
    let status = helper.wait(180);
    let log = helper.log_text();
    assert!(status.success(), "helper: {status}\n{log}");
    assert!(log.contains("X509-SVID written"), "{log}");

    let chain = sigil::x509::parse_pem_certs(
        &std::fs::read_to_string(certs.join("svid.pem")).expect("svid.pem"),
    )
    .expect("PEM chain");
    assert_eq!(
        sigil::x509::spiffe_id_of(&chain[0])
            .expect("SPIFFE ID")
            .to_string(),
        "spiffe://example.org/files"
    );
    let key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(certs.join("svid_key.pem")).expect("key"),
    )
    .expect("PKCS#8 key");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("leaf");
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert_eq!(
        std::fs::read_to_string(certs.join("svid_bundle.pem")).expect("bundle"),
        server.cli_ok(&["bundle", "show"])
    );
    let mode = |name: &str| {
        std::fs::metadata(certs.join(name))
            .expect(name)
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("svid.pem"), 0o644);
    assert_eq!(mode("svid_key.pem"), 0o640);
    assert_eq!(mode("db.jwt"), 0o600);
    for name in ["svid.pem", "svid_key.pem", "svid_bundle.pem"] {
        assert_eq!(
            std::fs::read_link(certs.join(name)).expect("a link"),
            Path::new(".sigil.current").join(name)
        );
    }
    let token = std::fs::read_to_string(certs.join("db.jwt")).expect("db.jwt");
    let out = Command::new(sigil_testkit::binary("sigil-agent"))
        .args([
            "api",
            "validate",
            "jwt",
            "--audience",
            "db",
            "--output",
            "json",
            "--socket-path",
        ])
        .arg(&socket)
        .args(["--svid", token.trim()])
        .output()
        .expect("api validate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["spiffe_id"], "spiffe://example.org/files");
    let bundles: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(certs.join("jwt_bundle.json")).expect("jwt bundle"),
    )
    .expect("JSON");
    let jwks = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(bundles["example.org"].as_str().expect("example.org's JWKS"))
            .expect("base64")
    };
    let jwks: serde_json::Value = serde_json::from_slice(&jwks).expect("JWKS JSON");
    assert!(!jwks["keys"].as_array().expect("keys").is_empty(), "{jwks}");
}

/// The helper starts `cmd` after the files are written and exits with its status: a code, 128 +
/// the signal that killed it, and SIGTERM to the helper passed on to the child.
#[test]
fn helper_exits_with_its_childs_status() {
    let dir = shared_tempdir();
    let root = dir.path();
    let me = format!("unix:uid:{}", uid());
    let (_server, agent) =
        server_and_agent(root, &[("spiffe://example.org/child", me.as_str(), &[])]);
    let socket = agent.socket_path();
    let certs = root.join("certs");
    let run = |name: &'static str, script: &str| {
        let config = root.join(format!("{name}.toml"));
        helper_config(
            &config,
            &socket,
            &certs,
            &format!(
                "cmd = \"/bin/sh\"\ncmd_args = [\"-c\", {script:?}, \"{}\"]",
                certs.join("svid.pem").display()
            ),
        );
        start_helper(&config, &root.join(format!("{name}.log")), name)
    };
    // The child sees the files (it exits 3 if they are not there yet). Generous: the agent
    // hashes the (debug, 100+ MB) helper binary for its first attestation.
    let mut h = run("exit-7", "test -s \"$0\" || exit 3; exit 7");
    let status = h.wait(180);
    assert_eq!(status.code(), Some(7), "{}", h.log_text());
    let mut h = run("killed", "kill -KILL $$");
    let status = h.wait(60);
    assert_eq!(status.code(), Some(128 + 9), "{}", h.log_text());
    let mut h = run("trap", "trap 'exit 5' TERM; while :; do sleep 0.1; done");
    h.wait_log(60, "child started");
    h.signal(nix::sys::signal::Signal::SIGTERM);
    let status = h.wait(30);
    assert_eq!(status.code(), Some(5), "{}", h.log_text());
    assert!(h.log_text().contains("passing the signal on to the child"));
}

/// Bad configurations are refused at once with a message naming the key: a missing required
/// key, an unknown key, a renew_signal that is not a signal, a cert_dir the helper cannot write.
#[test]
fn bad_configurations_are_refused_with_the_key_named() {
    let dir = shared_tempdir();
    let root = dir.path();
    let socket = root.join("no-agent.sock");
    let certs = root.join("certs");
    let run = |name: &str, text: &str, as_nobody: bool| -> (Option<i32>, String) {
        let config = root.join(format!("{name}.toml"));
        std::fs::write(&config, text).expect("config");
        let mut cmd = Command::new(sigil_testkit::binary("sigil-agent"));
        cmd.args(["helper", "--config"])
            .arg(&config)
            .env_remove("SPIFFE_ENDPOINT_SOCKET");
        if as_nobody {
            cmd.uid(NOBODY).gid(NOBODY);
        }
        let out = output_within(&mut cmd, 30, b"");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = format!(
        "agent_address = \"{}\"\ncert_dir = \"{}\"\nsvid_file_name = \"a.pem\"\nsvid_key_file_name = \"a.key\"\nsvid_bundle_file_name = \"b.pem\"\n",
        socket.display(),
        certs.display()
    );
    let cases = [
        (
            "missing",
            "svid_file_name = \"a.pem\"".to_string(),
            "error: cert_dir is required",
        ),
        (
            "unknown",
            format!("{good}svid_file = \"x\""),
            "unknown field `svid_file`",
        ),
        (
            "signal",
            format!("{good}cmd = \"/bin/true\"\nrenew_signal = \"SIGNOPE\""),
            "invalid renew_signal \"SIGNOPE\": not a signal name",
        ),
        (
            "mode",
            format!("{good}key_file_mode = 600"),
            "invalid key_file_mode \"600\"",
        ),
    ];
    for (name, text, want) in cases {
        let (code, stderr) = run(name, &text, false);
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: {stderr}");
    }
    // cert_dir owned by root, 0755: not writable for nobody.
    std::fs::create_dir_all(&certs).expect("certs");
    let (code, stderr) = run("unwritable", &good, true);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cert_dir {} is not writable by uid {NOBODY}",
            certs.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("Permission denied"), "{stderr}");
    // Checked before anything is written or started.
    assert_eq!(std::fs::read_dir(&certs).expect("certs").count(), 0);
}
