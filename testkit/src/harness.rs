//! Real `sigil-server` and `sigil-agent` processes on temp dirs, and the steps end-to-end
//! tests share (join tokens, entries, waiting on an agent's log or status).
//!
//! Every process is killed on drop, so a failing test never leaves a server behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sigil::proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::process::{binary, free_port, http_get, subdir};

/// A running `sigil-server`.
pub struct Server {
    /// The child process.
    pub child: Option<Child>,
    /// Test directory (data dir and socket live below it).
    pub dir: PathBuf,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Extra `run` flags this server was started with.
    pub extra: Vec<String>,
    /// Where the server's stderr goes.
    pub log: PathBuf,
}

impl Server {
    /// Starts a server for trust domain `example.org` in `dir` and waits until it is ready.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        std::fs::create_dir_all(dir).expect("creating server dir");
        let mut s = Server {
            child: None,
            dir: dir.to_path_buf(),
            admin_socket: dir.join("admin").join("admin.sock"),
            data_dir: dir.join("data"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: dir.join("server.log"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening server log");
        let mut cmd = Command::new(binary("sigil-server"));
        cmd.arg("run")
            .args(["--trust-domain", "example.org"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--admin-socket")
            .arg(&self.admin_socket);
        if !self.extra.iter().any(|a| a == "--bind-address") {
            cmd.args(["--bind-address", "127.0.0.1:0"]);
        }
        if !self.extra.iter().any(|a| a == "--health-address") {
            cmd.args(["--health-address", ""]);
        }
        cmd.args(&self.extra).stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("spawning sigil-server");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls `healthcheck` until it succeeds (or fails the test after 30 s).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "sigil-server exited early with {status}; log:\n{}",
                        self.log_text()
                    );
                }
            }
            if self.admin_socket.exists() && self.cli(&["healthcheck"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not ready in 30 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sigil-server <args> --admin-socket <ours>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary("sigil-server"))
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .expect("running sigil-server CLI")
    }

    /// Runs the CLI, asserting success, and returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sigil-server {args:?} failed: {}\nstdout: {}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `--output json`, asserting success, and parses stdout.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut v = args.to_vec();
        v.extend(["--output", "json"]);
        let out = self.cli_ok(&v);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }

    /// An admin API client over the socket.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(
            sigil::uds::connect(&self.admin_socket)
                .await
                .expect("connecting to admin socket"),
        )
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(child) = self.child.as_ref() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, sig).expect("signalling server");
        }
    }

    /// SIGTERM, then waits for the exit status (fails the test after 20 s).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }

    /// SIGKILL (no chance to clean up) and reap.
    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(20));
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server is running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for server") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the same server again on the same directories.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.stop();
            assert!(status.success(), "server exit status {status}");
        }
        self.spawn();
    }

    /// The node API address (`host:port`) the running server logged in its ready line (the
    /// harness binds port 0, so this is how tests find it). The last ready line wins, so it is
    /// right after a restart too.
    pub fn node_address(&self) -> String {
        self.log_text()
            .lines()
            .rev()
            .filter(|l| l.contains("sigil-server ready"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("node_address="))
            })
            .next()
            .map(str::to_string)
            .unwrap_or_else(|| {
                panic!(
                    "no node_address in the ready line; log:\n{}",
                    self.log_text()
                )
            })
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `sigil-agent`, killed on drop.
pub struct Agent {
    /// The child process.
    pub child: Option<Child>,
    /// Its stderr log.
    pub log: PathBuf,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Its health address.
    pub health_address: String,
    /// Its admin socket.
    pub admin_socket: PathBuf,
}

impl Agent {
    /// Starts `sigil-agent run` against `server` with data under `dir` and extra flags.
    pub fn start(server: &Server, dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_as(server, dir, extra, None)
    }

    /// [`Agent::start`] as user and group `uid` (e.g. 65534, `nobody`) when given: `dir` must be
    /// reachable and writable by it.
    pub fn start_as(server: &Server, dir: &Path, extra: &[&str], uid: Option<u32>) -> Agent {
        let bundle = dir.join("bundle.pem");
        if !bundle.exists() {
            std::fs::write(&bundle, server.cli_ok(&["bundle", "show"])).expect("writing bundle");
        }
        let health_address = format!("127.0.0.1:{}", free_port());
        let log = dir.join("agent.log");
        let data_dir = dir.join("agent-data");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("opening agent log");
        // A profiler to run the agent under (e.g. `heaptrack -o /tmp/agent`); its pid is then
        // the wrapper's.
        let mut wrap: Vec<String> = std::env::var("SIGIL_TEST_AGENT_WRAPPER")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut child = if wrap.is_empty() {
            Command::new(binary("sigil-agent"))
        } else {
            let mut c = Command::new(wrap.remove(0));
            c.args(&wrap).arg(binary("sigil-agent"));
            c
        };
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut child, uid);
            std::os::unix::process::CommandExt::gid(&mut child, uid);
        }
        let child = child
            .arg("run")
            .args(["--trust-domain", "example.org"])
            .args(["--server-address", &server.node_address()])
            .arg("--trust-bundle")
            .arg(&bundle)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--socket-path")
            .arg(dir.join("api.sock"))
            .arg("--admin-socket")
            .arg(dir.join("admin").join("agent-admin.sock"))
            .args(["--health-address", &health_address])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawning sigil-agent");
        Agent {
            child: Some(child),
            log,
            data_dir,
            health_address,
            admin_socket: dir.join("admin").join("agent-admin.sock"),
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `pred(log)` holds (fails the test after `secs`).
    pub fn wait_log(&mut self, secs: u64, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let log = self.log_text();
            if pred(&log) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("sigil-agent exited ({status}) while waiting for {what}; log:\n{log}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sigil-agent status <args>` against this agent.
    pub fn status_output(&self, args: &[&str]) -> Output {
        Command::new(binary("sigil-agent"))
            .arg("status")
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .args(args)
            .output()
            .expect("running sigil-agent status")
    }

    /// `sigil-agent status --output json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.status_output(&["--output", "json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The agent's Prometheus text from `GET /metrics` on its health address.
    pub fn metrics(&self) -> String {
        http_get(&self.health_address, "/metrics")
    }

    /// The value of the metric line `name <value>` (no labels), if the agent reports it.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let prefix = format!("{name} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }

    /// `sigil-agent healthcheck` against this agent.
    pub fn healthy(&self) -> bool {
        Command::new(binary("sigil-agent"))
            .args(["healthcheck", "--health-address", &self.health_address])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Waits for the process to exit on its own (fails after `secs`).
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent is running");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = child.try_wait().expect("waiting for agent") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent did not exit; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        if let Some(c) = self.child.as_ref() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        self.wait_exit(20)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Agent {
    /// The Workload API socket: [`Agent::start`] passes `--socket-path <dir>/api.sock`, and the
    /// log lives in the same `<dir>`.
    pub fn socket_path(&self) -> PathBuf {
        self.log.with_file_name("api.sock")
    }

    /// Waits until the agent's status lists an SVID for each of `ids` (it may hold others too)
    /// and returns that status (fails the test after `secs`).
    pub fn wait_svids_for(&self, ids: &[&str], secs: u64) -> serde_json::Value {
        wait_status(self, secs, &format!("SVIDs for {ids:?}"), |s| {
            let held: Vec<&str> = s["svids"]
                .as_array()
                .map(|v| v.iter().filter_map(|x| x["spiffe_id"].as_str()).collect())
                .unwrap_or_default();
            ids.iter().all(|id| held.contains(id))
        })
    }
}

/// A fresh join token (no node alias) and the SPIFFE ID the agent attesting with it gets
/// (`spiffe://example.org/sigil/agent/join_token/<token>`).
pub fn join_token(server: &Server) -> (String, String) {
    let token = server.cli_json(&["token", "generate"])["token"]
        .as_str()
        .expect("token in `token generate` output")
        .to_string();
    let id = format!("spiffe://example.org/sigil/agent/join_token/{token}");
    (token, id)
}

/// `entry create` under `parent` for `spiffe_id` with `selectors` (`type:value`) and extra
/// flags; returns the new entry's id.
pub fn create_entry(
    server: &Server,
    parent: &str,
    spiffe_id: &str,
    selectors: &[&str],
    extra: &[&str],
) -> String {
    let mut args = vec![
        "entry",
        "create",
        "--parent-id",
        parent,
        "--spiffe-id",
        spiffe_id,
    ];
    for s in selectors {
        args.extend(["--selector", s]);
    }
    args.extend(extra);
    let out = server.cli_json(&args);
    out["results"][0]["entry"]["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("no entry id in {out}"))
        .to_string()
}

/// An agent started by [`agent_with_workload_entries`].
pub struct WorkloadAgent {
    /// The running agent.
    pub agent: Agent,
    /// Its SPIFFE ID (the parent of the entries).
    pub agent_id: String,
    /// The ids of the entries created, in the order given.
    pub entry_ids: Vec<String>,
}

/// Registers workload entries under a fresh join-token agent, starts that agent in
/// `<dir>/agent` and waits (up to 60 s) until it holds an SVID for each entry.
///
/// `entries` are `(spiffe_id, selectors)`; `extra` flags (e.g. `--x509-svid-ttl 20s`) go to
/// every `entry create`.
pub fn agent_with_workload_entries(
    server: &Server,
    dir: &Path,
    entries: &[(&str, &[&str])],
    extra: &[&str],
) -> WorkloadAgent {
    agent_with_workload_entries_and_flags(server, dir, entries, extra, &[])
}

/// [`agent_with_workload_entries`], the agent started with `agent_flags` too.
pub fn agent_with_workload_entries_and_flags(
    server: &Server,
    dir: &Path,
    entries: &[(&str, &[&str])],
    extra: &[&str],
    agent_flags: &[&str],
) -> WorkloadAgent {
    let (token, agent_id) = join_token(server);
    let entry_ids = entries
        .iter()
        .map(|(id, selectors)| create_entry(server, &agent_id, id, selectors, extra))
        .collect();
    let mut flags = vec!["--join-token", token.as_str()];
    flags.extend_from_slice(agent_flags);
    let agent = Agent::start(server, &subdir(dir, "agent"), &flags);
    let ids: Vec<&str> = entries.iter().map(|(id, _)| *id).collect();
    agent.wait_svids_for(&ids, 60);
    WorkloadAgent {
        agent,
        agent_id,
        entry_ids,
    }
}

/// [`agent_with_workload_entries`] with one entry.
pub fn agent_with_workload_entry(
    server: &Server,
    dir: &Path,
    spiffe_id: &str,
    selectors: &[&str],
    extra: &[&str],
) -> WorkloadAgent {
    agent_with_workload_entries(server, dir, &[(spiffe_id, selectors)], extra)
}

/// Polls `sigil-agent status --output json` until `pred(status)` holds and returns that status
/// (fails the test after `secs`). Unlike [`Agent::status`], an agent not answering yet (admin
/// socket missing, still starting) is waited for, not a failure.
pub fn wait_status(
    agent: &Agent,
    secs: u64,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = serde_json::Value::Null;
    loop {
        if agent.admin_socket.exists() {
            let out = agent.status_output(&["--output", "json"]);
            if out.status.success() {
                last = serde_json::from_slice(&out.stdout).expect("status JSON");
                if pred(&last) {
                    return last;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status {last}\nlog:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A self-signed CA certificate (PEM) standing in for another trust domain's root.
pub fn foreign_ca_pem(common_name: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("generating a CA key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.self_signed(&key).expect("self-signing a CA").pem()
}

/// How many X509-SVIDs an agent's log says it has minted (the sum of its `signed=` counts).
pub fn minted(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("X509-SVIDs minted"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("signed=")))
        .filter_map(|n| n.parse::<usize>().ok())
        .sum()
}

/// A fresh join token for node alias `alias`: the agent attesting with it gets the entries
/// registered under that alias.
pub fn alias_token(server: &Server, alias: &str) -> String {
    server.cli_json(&["token", "generate", "--spiffe-id", alias])["token"]
        .as_str()
        .expect("token")
        .to_string()
}

impl Agent {
    /// Waits (30 s each) until the agent has attested to the server and then minted an SVID
    /// (`what`).
    pub fn wait_attested(&mut self, what: &str) {
        self.wait_log(30, "attestation", |l| {
            l.contains("attested to sigil-server")
        });
        self.wait_log(30, what, |l| minted(l) >= 1);
    }
}

/// Starts an agent in `dir` that the server must refuse: waits (30 s) for it to exit with a
/// failure and returns its log.
pub fn refused_agent_log(server: &Server, dir: &Path, extra: &[&str]) -> String {
    let mut agent = Agent::start(server, dir, extra);
    let status = agent.wait_exit(30);
    let log = agent.log_text();
    assert!(!status.success(), "the agent was not refused; log:\n{log}");
    log
}

/// `agent list`, which must hold exactly one agent, attested with `attestation_type`: the list
/// and that agent's SPIFFE ID.
pub fn only_agent(server: &Server, attestation_type: &str) -> (serde_json::Value, String) {
    let agents = server.cli_json(&["agent", "list"]);
    let list = agents["agents"].as_array().expect("agents");
    assert_eq!(list.len(), 1, "{agents}");
    assert_eq!(list[0]["attestation_type"], attestation_type, "{agents}");
    let id = list[0]["spiffe_id"].as_str().expect("id").to_string();
    (agents, id)
}

/// Creates an entry for `spiffe_id` (`selector`) under `parent` and waits (`secs`) until `agent`
/// has minted one more SVID (`what`).
pub fn wait_minted_for_new_entry(
    server: &Server,
    agent: &mut Agent,
    parent: &str,
    spiffe_id: &str,
    selector: &str,
    secs: u64,
    what: &str,
) {
    let before = minted(&agent.log_text());
    create_entry(server, parent, spiffe_id, &[selector], &[]);
    agent.wait_log(secs, what, |l| minted(l) > before);
}

/// Evicts the running `agent` (`agent_id`), whose node attestor (`method`) can prove itself
/// again: it attests again on its own as the same agent and keeps minting (a new entry under
/// `parent` reaches it). Returns `agent list` as it is after the re-attestation.
pub fn evicted_agent_attests_again(
    server: &Server,
    agent: &mut Agent,
    agent_id: &str,
    method: &str,
    parent: &str,
) -> serde_json::Value {
    server.cli_ok(&["agent", "evict", "--spiffe-id", agent_id]);
    let again = format!("attested again with {method}");
    agent.wait_log(60, "re-attestation after eviction", |l| l.contains(&again));
    let agents = server.cli_json(&["agent", "list"]);
    assert_eq!(agents["agents"][0]["spiffe_id"], agent_id, "{agents}");
    wait_minted_for_new_entry(
        server,
        agent,
        parent,
        "spiffe://example.org/after-evict",
        "unix:uid:1001",
        30,
        "minting after re-attestation",
    );
    agents
}
