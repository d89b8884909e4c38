//! Real SPIRE (`spire-server`, `spire-agent`) next to Sigil in tests: interoperability and
//! migration.
//!
//! The binaries come from `tests/spire/build.sh` (SPIRE pinned there; `.ci/run` runs it):
//! `$SIGIL_TEST_SPIRE_BIN` if set, else `<target>/spire/bin` ([`spire_bin_dir`]); a missing
//! binary fails the test naming the build command.
//!
//! [`SpireServer`]: one trust domain on a temp dir — SQLite datastore, `join_token` node
//! attestor, `disk` key manager, the node API and health endpoint on free loopback ports, the
//! admin socket in the dir — with extra HCL for the `server` block and for `plugins`
//! ([`SpireServerConfig`]; e.g. a `federation { bundle_endpoint {...} federates_with ... }`
//! block), and the CLI wrapped ([`SpireServer::entry_create`], [`SpireServer::entry_show_json`],
//! [`SpireServer::token_generate`], [`SpireServer::bundle_pem`], ...). [`SpireAgent`]: a join-token
//! agent of a server with the `unix` workload attestor and its Workload API socket. Both wait
//! until ready and are killed on drop; their logs stay in the dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::process::{free_port, http_get, terminate};

/// The variable naming the directory holding `spire-server` and `spire-agent`.
pub const SPIRE_BIN_ENV: &str = "SIGIL_TEST_SPIRE_BIN";
/// The command that builds them into `<target>/spire/bin`.
pub const SPIRE_BUILD_COMMAND: &str = "tests/spire/build.sh";

/// The directory of the SPIRE binaries: `$SIGIL_TEST_SPIRE_BIN`, else `<target>/spire/bin`
/// (the test executable is `<target>/<profile>/deps/<test>`).
pub fn spire_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(SPIRE_BIN_ENV) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test executable is under <target>/<profile>/deps");
    target.join("spire").join("bin")
}

/// Path of a SPIRE binary (`spire-server`, `spire-agent`); fails the test naming the build
/// command when it is missing.
pub fn spire_binary(name: &str) -> PathBuf {
    binary_in(&spire_bin_dir(), name)
}

fn binary_in(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} is missing: the SPIRE interoperability tests run real SPIRE; build it with \
             `{SPIRE_BUILD_COMMAND}` (Go >= 1.24; .ci/run does), or point {SPIRE_BIN_ENV} at a \
             directory holding spire-server and spire-agent",
            path.display()
        );
    }
    path
}

/// Spawns `cmd` with stdout and stderr appended to `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("opening log");
    let err = out.try_clone().expect("cloning log handle");
    cmd.stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

/// Extra configuration for a [`SpireServer`].
#[derive(Debug, Clone, Default)]
pub struct SpireServerConfig {
    /// HCL added inside the `server { ... }` block (e.g. `federation { ... }`).
    pub server_hcl: String,
    /// HCL added inside the `plugins { ... }` block.
    pub plugins_hcl: String,
    /// `default_x509_svid_ttl` (default `1h`).
    pub x509_svid_ttl: Option<String>,
}

/// What a SPIRE server's configuration file is made from.
pub struct ServerConfigArgs<'a> {
    /// The trust domain.
    pub trust_domain: &'a str,
    /// Node API port on 127.0.0.1.
    pub port: u16,
    /// Health check port on 127.0.0.1 (`/live`, `/ready`).
    pub health_port: u16,
    /// Admin API socket.
    pub socket: &'a Path,
    /// Data dir (SQLite datastore and disk key manager inside).
    pub data: &'a Path,
    /// `log_level`.
    pub log_level: &'a str,
    /// Extra HCL and the X509-SVID TTL.
    pub extra: &'a SpireServerConfig,
}

/// A SPIRE server configuration (HCL) on loopback: SQLite datastore, `join_token` node
/// attestor, disk key manager, P-256 CA, health checks; shared by the tests and the SPIRE
/// head-to-head bench.
pub fn server_config(a: &ServerConfigArgs<'_>) -> String {
    format!(
        r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "{trust_domain}"
    data_dir = "{data}"
    log_level = "{log_level}"
    ca_key_type = "ec-p256"
    default_x509_svid_ttl = "{ttl}"
{server_hcl}
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{data}/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{data}/keys.json"
        }}
    }}
{plugins_hcl}
}}
health_checks {{
    listener_enabled = true
    bind_address = "127.0.0.1"
    bind_port = "{health_port}"
    live_path = "/live"
    ready_path = "/ready"
}}
"#,
        trust_domain = a.trust_domain,
        port = a.port,
        health_port = a.health_port,
        log_level = a.log_level,
        socket = a.socket.display(),
        data = a.data.display(),
        ttl = a.extra.x509_svid_ttl.as_deref().unwrap_or("1h"),
        server_hcl = a.extra.server_hcl,
        plugins_hcl = a.extra.plugins_hcl,
    )
}

/// A running `spire-server`, killed on drop.
pub struct SpireServer {
    child: Option<Child>,
    /// The test directory (config, data, socket and log below it).
    pub dir: PathBuf,
    /// Its trust domain.
    pub trust_domain: String,
    /// The node API port on 127.0.0.1.
    pub port: u16,
    /// The health endpoint port on 127.0.0.1 (`/live`, `/ready`).
    pub health_port: u16,
    /// Its admin socket.
    pub socket: PathBuf,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

impl SpireServer {
    /// Starts a server for `trust_domain` in `dir` and waits until it is ready.
    pub fn start(dir: &Path, trust_domain: &str) -> SpireServer {
        SpireServer::start_with(dir, trust_domain, &SpireServerConfig::default())
    }

    /// [`SpireServer::start`] with extra configuration.
    pub fn start_with(dir: &Path, trust_domain: &str, extra: &SpireServerConfig) -> SpireServer {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("creating SPIRE server data dir");
        std::fs::create_dir_all(dir.join("admin")).expect("creating SPIRE admin dir");
        let port = free_port();
        let health_port = free_port();
        let socket = dir.join("admin").join("api.sock");
        let conf = dir.join("server.conf");
        std::fs::write(
            &conf,
            server_config(&ServerConfigArgs {
                trust_domain,
                port,
                health_port,
                socket: &socket,
                data: &data,
                log_level: "DEBUG",
                extra,
            }),
        )
        .expect("writing SPIRE server config");
        let log = dir.join("spire-server.log");
        let child = spawn_logged(
            Command::new(spire_binary("spire-server"))
                .arg("run")
                .arg("-config")
                .arg(&conf),
            &log,
        );
        let mut s = SpireServer {
            child: Some(child),
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            port,
            health_port,
            socket,
            log,
        };
        s.wait_ready();
        s
    }

    /// Waits for `spire-server healthcheck` to pass (fails the test after 60 s or if the server
    /// exits).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "spire-server exited with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if self.socket.exists() && self.cli(&["healthcheck"], &[]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "spire-server not ready in 60 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `spire-server <subcommand...> -socketPath <ours> <args...>` (SPIRE takes its flags after
    /// the subcommand words).
    pub fn cli(&self, subcommand: &[&str], args: &[&str]) -> Output {
        Command::new(spire_binary("spire-server"))
            .args(subcommand)
            .arg("-socketPath")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running the spire-server CLI")
    }

    /// [`SpireServer::cli`], asserting success; returns stdout.
    pub fn cli_ok(&self, subcommand: &[&str], args: &[&str]) -> String {
        let out = self.cli(subcommand, args);
        assert!(
            out.status.success(),
            "spire-server {subcommand:?} {args:?} failed ({}): {}\nstdout: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `entry create <args> -output json`; returns the created entry's id.
    pub fn entry_create(&self, args: &[&str]) -> String {
        let mut v = args.to_vec();
        v.extend(["-output", "json"]);
        let out = self.cli_ok(&["entry", "create"], &v);
        let doc: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("entry create output is not JSON ({e}): {out}"));
        let result = &doc["results"][0];
        assert_eq!(
            result["status"]["code"], 0,
            "spire-server entry create {args:?}: {result}"
        );
        result["entry"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no entry id in {result}"))
            .to_string()
    }

    /// `entry show <args> -output json`, parsed.
    pub fn entry_show_json(&self, args: &[&str]) -> serde_json::Value {
        let mut v = args.to_vec();
        v.extend(["-output", "json"]);
        let out = self.cli_ok(&["entry", "show"], &v);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("entry show output is not JSON ({e}): {out}"))
    }

    /// `token generate` (with `-spiffeID`, which also creates that node-alias entry, when
    /// given); returns the token.
    pub fn token_generate(&self, alias: Option<&str>) -> String {
        let mut args = vec!["-output", "json"];
        if let Some(a) = alias {
            args.extend(["-spiffeID", a]);
        }
        let out = self.cli_ok(&["token", "generate"], &args);
        let doc: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("token generate output is not JSON ({e}): {out}"));
        doc["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {doc}"))
            .to_string()
    }

    /// The trust bundle's X.509 roots in PEM (`bundle show`).
    pub fn bundle_pem(&self) -> String {
        self.cli_ok(&["bundle", "show"], &[])
    }

    /// `host:port` of the node API.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// True when the health endpoint answers `/ready` with 200.
    pub fn ready(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.health_port)).is_ok()
            && http_get(&format!("127.0.0.1:{}", self.health_port), "/ready")
                .starts_with("HTTP/1.1 200")
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SpireServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(5));
        }
    }
}

/// A running `spire-agent` (join-token attestation, `unix` workload attestor with
/// `discover_workload_path`, so `unix:path` selectors work too), killed on drop.
pub struct SpireAgent {
    child: Option<Child>,
    /// The test directory.
    pub dir: PathBuf,
    /// Its SPIFFE ID: `spiffe://<td>/spire/agent/join_token/<token>`.
    pub agent_id: String,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

impl SpireAgent {
    /// Starts an agent of `server` in `dir` attesting with `join_token`, and waits until its
    /// Workload API answers.
    pub fn start(server: &SpireServer, dir: &Path, join_token: &str) -> SpireAgent {
        SpireAgent::start_with(server, dir, join_token, "")
    }

    /// [`SpireAgent::start`] with HCL added inside the `agent { ... }` block.
    pub fn start_with(
        server: &SpireServer,
        dir: &Path,
        join_token: &str,
        agent_hcl: &str,
    ) -> SpireAgent {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("creating SPIRE agent data dir");
        // SPIRE wants the Workload API socket's directory apart from anything else it writes.
        let public = dir.join("public");
        std::fs::create_dir_all(&public).expect("creating SPIRE agent socket dir");
        let socket = public.join("api.sock");
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, server.bundle_pem()).expect("writing SPIRE bundle");
        let conf = dir.join("agent.conf");
        std::fs::write(
            &conf,
            format!(
                r#"agent {{
    data_dir = "{data}"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{td}"
{agent_hcl}
}}
plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{
            discover_workload_path = true
        }}
    }}
}}
"#,
                data = data.display(),
                port = server.port,
                socket = socket.display(),
                bundle = bundle.display(),
                td = server.trust_domain,
            ),
        )
        .expect("writing SPIRE agent config");
        let log = dir.join("spire-agent.log");
        let child = spawn_logged(
            Command::new(spire_binary("spire-agent"))
                .arg("run")
                .arg("-config")
                .arg(&conf)
                .args(["-joinToken", join_token])
                .stdin(Stdio::null()),
            &log,
        );
        let mut a = SpireAgent {
            child: Some(child),
            dir: dir.to_path_buf(),
            agent_id: format!(
                "spiffe://{}/spire/agent/join_token/{join_token}",
                server.trust_domain
            ),
            socket,
            log,
        };
        a.wait_ready();
        a
    }

    /// Waits for `spire-agent healthcheck` to pass (fails the test after 60 s or if the agent
    /// exits).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "spire-agent exited with {status}; log:\n{}",
                    self.log_text()
                );
            }
            let healthy = self.socket.exists()
                && Command::new(spire_binary("spire-agent"))
                    .arg("healthcheck")
                    .arg("-socketPath")
                    .arg(&self.socket)
                    .output()
                    .is_ok_and(|o| o.status.success());
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "spire-agent not ready in 60 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SpireAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_spire_binary_names_the_build_command() {
        let dir = crate::tempdir();
        let panic = std::panic::catch_unwind(|| binary_in(dir.path(), "spire-server"))
            .expect_err("missing binary");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            message.contains("spire-server is missing") && message.contains("tests/spire/build.sh"),
            "{message}"
        );
        std::fs::write(dir.path().join("spire-agent"), "").expect("writing");
        assert_eq!(
            binary_in(dir.path(), "spire-agent"),
            dir.path().join("spire-agent")
        );
    }
}
