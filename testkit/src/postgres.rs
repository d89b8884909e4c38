//! A throwaway PostgreSQL for tests: each test gets a database of its own
//! ([`TestDatabase::create`]), dropped when the test ends.
//!
//! The server is the one named by [`URL_ENV`] (`.ci/run` starts one cluster for the whole run
//! and exports its URL there), else a cluster this test binary starts once, lazily: `initdb` and
//! `postgres` from Debian's packages (`/usr/lib/postgresql/<version>/bin`) in a temp dir,
//! listening on a Unix socket in that dir only, run as a non-root user (initdb refuses root: as
//! root the dir is given to the `postgres` user, else `nobody`, and the programs run through
//! `runuser`). A watchdog shell beside the server stops it and removes the dir once the test
//! process is gone, so nothing outlives the test binary. Missing binaries fail the test with the
//! command that installs them: nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable naming a PostgreSQL server (a libpq URL or `key=value` string of a
/// superuser, or a role with CREATEDB) the tests may create databases on.
pub const URL_ENV: &str = "SIGIL_TEST_POSTGRES_URL";

/// The port number of the throwaway cluster: it only names the socket file in its own dir.
const PORT: u16 = 5432;
/// How long the throwaway cluster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A database of its own for one test, on the shared test server; dropped (with its
/// connections) when this value is.
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates a database with a random name (fails the test, saying why, when no server can be
    /// had).
    pub fn create() -> TestDatabase {
        TestDatabase::create_on(server_url())
    }

    /// Creates a database with a random name on the server at `admin_url`.
    fn create_on(admin_url: &str) -> TestDatabase {
        let name = format!("sigil_test_{}", random_hex());
        psql(admin_url, &format!("CREATE DATABASE {name}"));
        TestDatabase {
            url: with_dbname(admin_url, &name),
            name,
            admin_url: admin_url.to_string(),
        }
    }

    /// The connection string of this database (no password for the throwaway cluster).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs SQL in this database with `psql` (fails the test on error) and returns its output,
    /// unaligned and without headers: one row a line, columns separated by `|`.
    pub fn psql(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Best effort: the throwaway cluster goes away with its databases anyway.
        let _ = psql_command(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )
        .output();
    }
}

/// The server's connection string: [`URL_ENV`], else the throwaway cluster's (started on first
/// use).
pub fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var(URL_ENV) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => start_cluster(),
    })
}

/// `url` with its database replaced by `name`: the path of a `postgresql://` URL, or a
/// `dbname=` appended to a `key=value` string (a later key wins).
pub fn with_dbname(url: &str, name: &str) -> String {
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let (before_query, query) = match rest.find('?') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let authority = before_query.split('/').next().unwrap_or_default();
            return format!("{scheme}{authority}/{name}{query}");
        }
    }
    format!("{url} dbname={name}")
}

/// 16 random hex digits.
fn random_hex() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("system random numbers");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The directory of the newest installed PostgreSQL's server programs, or a failure naming the
/// command that installs them.
pub fn bin_dir() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    match dirs.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "the PostgreSQL tests need a PostgreSQL server: none is installed \
             (no /usr/lib/postgresql/<version>/bin/initdb). Install Debian's package with \
             `apt-get install postgresql` (.ci/run does), or set {URL_ENV} to a server where \
             the tests may create databases"
        ),
    }
}

fn psql_command(url: &str, sql: &str) -> Command {
    let mut cmd = Command::new(bin_dir().join("psql"));
    cmd.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        url,
        "-c",
        sql,
    ])
    .stdin(Stdio::null());
    cmd
}

/// Runs `sql` against `url` with psql; fails the test on error.
fn psql(url: &str, sql: &str) -> String {
    let out = psql_command(url, sql)
        .output()
        .unwrap_or_else(|e| panic!("running psql: {e}"));
    assert!(
        out.status.success(),
        "psql {sql:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Who runs the throwaway cluster: ourselves, or as root a user initdb accepts.
struct RunAs {
    /// `runuser -u <name> --` prefix, when root.
    user: Option<nix::unistd::User>,
}

impl RunAs {
    fn detect() -> RunAs {
        if !nix::unistd::geteuid().is_root() {
            return RunAs { user: None };
        }
        let user = ["postgres", "nobody"]
            .iter()
            .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
            .unwrap_or_else(|| {
                panic!(
                    "the throwaway PostgreSQL cannot run as root and neither the postgres nor \
                     the nobody user exists: install Debian's postgresql package (it creates \
                     postgres) or set {URL_ENV}"
                )
            });
        RunAs { user: Some(user) }
    }

    fn command(&self, program: &Path) -> Command {
        match &self.user {
            None => Command::new(program),
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", &user.name, "--"]).arg(program);
                cmd
            }
        }
    }

    fn give(&self, dir: &Path) {
        if let Some(user) = &self.user {
            nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
                .unwrap_or_else(|e| panic!("chown {} to {}: {e}", dir.display(), user.name));
        }
    }
}

/// The watchdog: starts the server in the background, waits while both the test process
/// (`$4`) and the server live, then stops the server (fast shutdown) and removes the dir.
const WATCHDOG: &str = r#"
"$0" -D "$1" -k "$2" -p "$3" -c listen_addresses= -c fsync=off -c full_page_writes=off \
    -c max_connections=300 >"$2/postgres.log" 2>&1 &
pg=$!
while [ -d "/proc/$4" ] && kill -0 "$pg" 2>/dev/null; do sleep 1; done
kill -INT "$pg" 2>/dev/null
wait "$pg"
rm -rf "$2"
"#;

/// Starts the shared throwaway cluster and returns its URL.
fn start_cluster() -> String {
    let (dir, bin, run_as) = init_cluster();
    let data = dir.join("data");
    let mut child = spawn_watchdog(WATCHDOG, &bin, &run_as, &data, &dir);
    wait_accepting(&bin, &dir, &mut child);
    cluster_url(&dir)
}

/// `initdb` in a new temp dir (given to the user the cluster runs as): the dir, the programs'
/// dir, and who runs them.
fn init_cluster() -> (PathBuf, PathBuf, RunAs) {
    let bin = bin_dir();
    let run_as = RunAs::detect();
    // The watchdog removes the dir when the test process is gone.
    let dir = tempfile::Builder::new()
        .prefix("sigil-pg-")
        .tempdir()
        .expect("creating the PostgreSQL temp dir")
        .keep();
    run_as.give(&dir);
    let data = dir.join("data");
    let init = run_as
        .command(&bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running initdb: {e}"));
    assert!(
        init.status.success(),
        "initdb failed ({}): {}{}",
        init.status,
        String::from_utf8_lossy(&init.stdout),
        String::from_utf8_lossy(&init.stderr)
    );
    (dir, bin, run_as)
}

/// Starts `script` (a watchdog) with the server's arguments.
fn spawn_watchdog(
    script: &str,
    bin: &Path,
    run_as: &RunAs,
    data: &Path,
    dir: &Path,
) -> std::process::Child {
    let mut watchdog = run_as.command(Path::new("/bin/sh"));
    watchdog
        .args(["-c", script])
        .arg(bin.join("postgres"))
        .arg(data)
        .arg(dir)
        .arg(PORT.to_string())
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Not waited for by the shared cluster: it lives as long as the test process and reaps the
    // server itself.
    watchdog
        .spawn()
        .unwrap_or_else(|e| panic!("starting the PostgreSQL watchdog: {e}"))
}

/// Whether the cluster in `dir` accepts connections now.
fn accepting(bin: &Path, dir: &Path) -> bool {
    Command::new(bin.join("pg_isready"))
        .arg("-h")
        .arg(dir)
        .args(["-p", &PORT.to_string(), "-q"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until the cluster in `dir` accepts connections (fails the test, with its log, when its
/// watchdog `child` exits first or after [`START_TIMEOUT`]).
fn wait_accepting(bin: &Path, dir: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + START_TIMEOUT;
    while !accepting(bin, dir) {
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the throwaway PostgreSQL exited ({status}) before accepting connections:\n{log}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "the throwaway PostgreSQL did not accept connections in {START_TIMEOUT:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The superuser URL of the cluster whose socket is in `dir`.
fn cluster_url(dir: &Path) -> String {
    format!(
        "postgresql:///postgres?host={}&port={PORT}&user=postgres",
        dir.display()
    )
}

/// The watchdog of a dedicated cluster: like [`WATCHDOG`], but the dir stays when the server
/// stops while the test process lives (the test starts it again); it goes with the test process.
const CLUSTER_WATCHDOG: &str = r#"
"$0" -D "$1" -k "$2" -p "$3" -c listen_addresses= -c fsync=off -c full_page_writes=off \
    -c max_connections=300 >>"$2/postgres.log" 2>&1 &
pg=$!
while [ -d "/proc/$4" ] && kill -0 "$pg" 2>/dev/null; do sleep 1; done
kill -INT "$pg" 2>/dev/null
wait "$pg"
[ -d "/proc/$4" ] || rm -rf "$2"
"#;

/// A PostgreSQL cluster for one test alone, which the test can stop and start again (an
/// outage); stopped and removed when dropped.
pub struct TestCluster {
    dir: PathBuf,
    bin: PathBuf,
    run_as: RunAs,
    /// The running server's watchdog, while it runs.
    watchdog: Option<std::process::Child>,
}

impl TestCluster {
    /// Creates and starts a cluster (fails the test, saying why, when it cannot).
    pub fn start() -> TestCluster {
        let (dir, bin, run_as) = init_cluster();
        let mut cluster = TestCluster {
            dir,
            bin,
            run_as,
            watchdog: None,
        };
        cluster.start_again();
        cluster
    }

    /// The superuser URL of the `postgres` database.
    pub fn url(&self) -> String {
        cluster_url(&self.dir)
    }

    /// A new database of its own on this cluster.
    pub fn create_database(&self) -> TestDatabase {
        TestDatabase::create_on(&self.url())
    }

    /// Whether the server accepts connections now.
    pub fn accepting(&self) -> bool {
        accepting(&self.bin, &self.dir)
    }

    /// Starts the server again after [`TestCluster::stop`] and waits until it accepts
    /// connections.
    pub fn start_again(&mut self) {
        assert!(self.watchdog.is_none(), "the cluster is running already");
        let data = self.dir.join("data");
        let mut child = spawn_watchdog(CLUSTER_WATCHDOG, &self.bin, &self.run_as, &data, &self.dir);
        wait_accepting(&self.bin, &self.dir, &mut child);
        self.watchdog = Some(child);
    }

    /// Stops the server (fast shutdown: open connections are cut) and waits until it is gone.
    pub fn stop(&mut self) {
        let Some(mut watchdog) = self.watchdog.take() else {
            return;
        };
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        let deadline = Instant::now() + START_TIMEOUT;
        // The watchdog exits once the server has.
        while watchdog.try_wait().ok().flatten().is_none() {
            assert!(
                Instant::now() < deadline,
                "the throwaway PostgreSQL did not stop in {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_replaces_the_url_path_or_is_appended() {
        assert_eq!(
            with_dbname("postgresql:///postgres?host=/tmp/x&port=5432", "t1"),
            "postgresql:///t1?host=/tmp/x&port=5432"
        );
        assert_eq!(
            with_dbname("postgres://u:p@db:5432/main", "t1"),
            "postgres://u:p@db:5432/t1"
        );
        assert_eq!(
            with_dbname("postgresql://u@db", "t1"),
            "postgresql://u@db/t1"
        );
        assert_eq!(
            with_dbname("host=/tmp/x user=postgres", "t1"),
            "host=/tmp/x user=postgres dbname=t1"
        );
    }

    #[test]
    fn each_test_database_is_fresh_and_dropped_afterwards() {
        let db = TestDatabase::create();
        assert_eq!(db.psql("SELECT current_database()").trim(), db.name());
        db.psql("CREATE TABLE t (x INT)");
        let other = TestDatabase::create();
        assert_ne!(other.name(), db.name());
        assert_eq!(
            other
                .psql("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'")
                .trim(),
            "0"
        );
        let name = db.name().to_string();
        drop(db);
        let left = other.psql(&format!(
            "SELECT COUNT(*) FROM pg_database WHERE datname = '{name}'"
        ));
        assert_eq!(left.trim(), "0", "dropped at the end of the test");
    }

    #[test]
    fn a_dedicated_cluster_stops_and_starts_again_with_its_data() {
        let mut cluster = TestCluster::start();
        let db = cluster.create_database();
        db.psql("CREATE TABLE t (x INT); INSERT INTO t VALUES (7)");
        cluster.stop();
        assert!(!cluster.accepting());
        let out = psql_command(db.url(), "SELECT 1").output().expect("psql");
        assert!(!out.status.success(), "a query while stopped");
        cluster.start_again();
        assert_eq!(db.psql("SELECT x FROM t").trim(), "7");
    }
}
