//! Sigil against SPIRE, side by side: both systems started the same way as real processes on
//! loopback (SQLite datastore, join-token agents, the same registration entries, X.509 TTL 1h),
//! driven by one client (this executable: a tonic Workload API client over the agents' Unix
//! sockets, header `workload.spiffe.io: true`) and by each system's own CLI for administration.
//!
//! Rows (BENCHMARKS.md, "Sigil vs SPIRE"):
//! 1. Workload API: cached FetchX509SVID first message on a persistent channel and with a new
//!    connection per call; FetchJWTSVID on a persistent channel. The two systems alternate in
//!    rounds.
//! 2. Agent RSS with K open FetchX509SVID streams (one connection each) and the time for one
//!    federated bundle change (`bundle set`) to reach all of them.
//! 3. Entry created (CLI) → message carrying its SVID on an open FetchX509SVID stream.
//! 4. Agent initial sync of N entries: time to entries and to every SVID (the agents' own
//!    Prometheus gauges, polled), agent RSS, TCP bytes (`ss`).
//! 5. Server signing: K agents started at once, each with M entries: SVIDs/s, server CPU
//!    seconds per 1,000 SVIDs, server RSS.
//! 6. Server with N entries (each row-4 size, before its agent starts): RSS, batched create
//!    rate (CLI, 1,000 per call), list/filter latency (CLI).
//! 7. Cold start: server start → ready (`/ready` 200); agent start → first SVID served.
//!
//! Every row runs `VS_SPIRE_RUNS` times (default 3); the table gives the median and the range
//! of the runs for each system, their ratio, and calls a ratio whose ranges overlap a tie.
//! Every wait is bounded; a wait that runs out is recorded as "did not finish in X s".
//!
//! Run through `bench/vs-spire.sh` (builds SPIRE and the release binaries first). Env:
//! `VS_SPIRE_BIN` (dir with spire-server / spire-agent), `VS_SPIRE_OUT` (CSV dir, default
//! target/vs-spire), `VS_SPIRE_QUICK=1` (small sizes), `VS_SPIRE_RUNS`, `VS_SPIRE_ROWS`
//! (e.g. `1,3`), `VS_SPIRE_SYSTEMS=sigil` (one system only, e.g. without a SPIRE build), and
//! per-row sizes (see [`Config::from_env`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use sigil::proto::workload as wl;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::Channel;
use tonic::Request;

const TD: &str = "example.org";
const ALIAS: &str = "spiffe://example.org/node-a";
const WORKLOAD: &str = "spiffe://example.org/bench/workload";
const FOREIGN: &str = "spiffe://other.org";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

struct Config {
    runs: usize,
    rows: Vec<u8>,
    out: PathBuf,
    lat_calls: usize,
    lat_rounds: usize,
    streams: Vec<usize>,
    prop_wait: u64,
    creates: usize,
    sync_sizes: Vec<usize>,
    sign_agents: usize,
    sign_entries: usize,
    list_calls: usize,
    cold_reps: usize,
    fill_secs: u64,
    big_runs: usize,
    /// The systems run (`VS_SPIRE_SYSTEMS`, default both).
    systems: Vec<Sys>,
}

/// Sync sizes from this many entries up run only in the first `VS_SPIRE_BIG_RUNS` runs.
const BIG: usize = 50_000;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_list(key: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(key) {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => default.to_vec(),
    }
}

impl Config {
    /// Full mode by default; `VS_SPIRE_QUICK=1` shrinks every size. Each size has its own
    /// variable (`VS_SPIRE_LAT_CALLS`, `VS_SPIRE_LAT_ROUNDS`, `VS_SPIRE_STREAMS`,
    /// `VS_SPIRE_PROP_WAIT`, `VS_SPIRE_CREATES`, `VS_SPIRE_SYNC_SIZES`, `VS_SPIRE_SIGN_AGENTS`,
    /// `VS_SPIRE_SIGN_ENTRIES`, `VS_SPIRE_LIST_CALLS`, `VS_SPIRE_COLD_REPS`, `VS_SPIRE_FILL_SECS`:
    /// no further `entry create` call starts after that long, `VS_SPIRE_BIG_RUNS`: runs that
    /// include sync sizes of 50,000 and more).
    fn from_env() -> Self {
        let quick = std::env::var_os("VS_SPIRE_QUICK").is_some_and(|v| v != "0");
        let q = |full: usize, small: usize| if quick { small } else { full };
        let out = std::env::var_os("VS_SPIRE_OUT")
            .map_or_else(|| target_dir().join("vs-spire"), PathBuf::from);
        Config {
            runs: env_or("VS_SPIRE_RUNS", q(3, 1)),
            rows: env_list("VS_SPIRE_ROWS", &[1, 2, 3, 4, 5, 6, 7])
                .into_iter()
                .map(|r| r as u8)
                .collect(),
            out,
            lat_calls: env_or("VS_SPIRE_LAT_CALLS", q(2000, 200)),
            lat_rounds: env_or("VS_SPIRE_LAT_ROUNDS", q(4, 2)).max(1),
            streams: env_list(
                "VS_SPIRE_STREAMS",
                if quick { &[200] } else { &[1000, 10000] },
            ),
            prop_wait: env_or("VS_SPIRE_PROP_WAIT", 60),
            creates: env_or("VS_SPIRE_CREATES", q(20, 3)),
            sync_sizes: env_list(
                "VS_SPIRE_SYNC_SIZES",
                if quick { &[2000] } else { &[10000, 100000] },
            ),
            sign_agents: env_or("VS_SPIRE_SIGN_AGENTS", q(10, 3)),
            sign_entries: env_or("VS_SPIRE_SIGN_ENTRIES", q(1000, 200)),
            list_calls: env_or("VS_SPIRE_LIST_CALLS", q(10, 3)),
            cold_reps: env_or("VS_SPIRE_COLD_REPS", q(5, 2)),
            fill_secs: env_or("VS_SPIRE_FILL_SECS", 600),
            big_runs: env_or("VS_SPIRE_BIG_RUNS", 1),
            systems: match std::env::var("VS_SPIRE_SYSTEMS") {
                Ok(v) => {
                    let v = v.to_lowercase();
                    [Sys::Spire, Sys::Sigil]
                        .into_iter()
                        .filter(|s| v.split(',').any(|x| x.trim() == s.name().to_lowercase()))
                        .collect()
                }
                Err(_) => vec![Sys::Spire, Sys::Sigil],
            },
        }
    }
}

/// `target/` (this executable is `target/release/deps/vs_spire-…`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn proc_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of `pid` in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // rest[0] is field 3 (state): utime is field 14, stime 15.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / hz
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[idx.saturating_sub(1).min(s.len() - 1)]
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Status code and body of `GET path` on `127.0.0.1:port` (HTTP/1.1, connection close).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Some((code, body))
}

/// The first sample of metric `name` (no labels, or any labels) in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = if let Some(r) = rest.strip_prefix('{') {
            r.split_once('}')?.1
        } else {
            rest
        };
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Sum of `bytes_received` / `bytes_acked` over established TCP connections to `port`.
fn ss_bytes(port: u16) -> Option<(u64, u64)> {
    let out = Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = |k: &str| -> u64 {
        text.split_whitespace()
            .filter_map(|w| w.strip_prefix(k)?.parse::<u64>().ok())
            .sum()
    };
    Some((sum("bytes_received:"), sum("bytes_acked:")))
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn with_header<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("ascii"));
    req
}

/// A self-signed CA certificate (PEM) standing in for another trust domain's root.
fn foreign_ca_pem(cn: &str) -> Result<String> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    Ok(params.self_signed(&key)?.pem())
}

fn tempdir(sys: Sys) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("vs-spire-{}-", sys.name().to_lowercase()))
        .tempdir()?)
}

// ---------------------------------------------------------------------------------------------
// The two systems
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Sys {
    Spire,
    Sigil,
}

impl Sys {
    fn name(self) -> &'static str {
        match self {
            Sys::Spire => "SPIRE",
            Sys::Sigil => "Sigil",
        }
    }
}

struct Bins {
    sigil_server: PathBuf,
    sigil_agent: PathBuf,
    spire_server: PathBuf,
    spire_agent: PathBuf,
}

impl Bins {
    /// The binaries of `systems`; the others' paths need not exist.
    fn find(systems: &[Sys]) -> Result<Bins> {
        let release = target_dir().join("release");
        let spire = std::env::var_os("VS_SPIRE_BIN")
            .map_or_else(|| target_dir().join("spire").join("bin"), PathBuf::from);
        let b = Bins {
            sigil_server: release.join("sigil-server"),
            sigil_agent: release.join("sigil-agent"),
            spire_server: spire.join("spire-server"),
            spire_agent: spire.join("spire-agent"),
        };
        for (sys, p) in [
            (Sys::Sigil, &b.sigil_server),
            (Sys::Sigil, &b.sigil_agent),
            (Sys::Spire, &b.spire_server),
            (Sys::Spire, &b.spire_agent),
        ] {
            if systems.contains(&sys) && !p.exists() {
                bail!(
                    "{} is missing: run bench/vs-spire.sh, which builds both systems",
                    p.display()
                );
            }
        }
        Ok(b)
    }
}

/// A child process, SIGTERM (then SIGKILL) on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
        let f = std::fs::File::create(log)?;
        let child = cmd
            .stdout(f.try_clone()?)
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Proc {
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One registration entry, written to each system's `entry create` data file.
struct EntrySpec {
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<(String, String)>,
    dns: Option<String>,
    federates: bool,
}

impl EntrySpec {
    /// Both CLIs read `{"entries": [...]}` with SPIRE's selector objects.
    fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "spiffe_id": self.spiffe_id,
            "parent_id": self.parent_id,
            "selectors": self.selectors.iter()
                .map(|(t, v)| serde_json::json!({"type": t, "value": v}))
                .collect::<Vec<_>>(),
            "x509_svid_ttl": 3600,
        });
        if let Some(d) = &self.dns {
            v["dns_names"] = serde_json::json!([d]);
        }
        if self.federates {
            v["federates_with"] = serde_json::json!([FOREIGN]);
        }
        v
    }
}

/// A running server of either system.
struct Server {
    sys: Sys,
    proc: Proc,
    dir: PathBuf,
    socket: PathBuf,
    port: u16,
    health_port: u16,
    bin: PathBuf,
}

impl Server {
    /// Spawns the server (does not wait for it).
    fn spawn(sys: Sys, bins: &Bins, dir: &Path) -> Result<Server> {
        let port = free_port()?;
        let health_port = free_port()?;
        std::fs::create_dir_all(dir.join("admin"))?;
        let socket = dir.join("admin").join("admin.sock");
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let (bin, mut cmd) = match sys {
            Sys::Sigil => {
                let mut c = Command::new(&bins.sigil_server);
                c.arg("run")
                    .args(["--trust-domain", TD])
                    .arg("--data-dir")
                    .arg(&data)
                    .arg("--admin-socket")
                    .arg(&socket)
                    .args(["--bind-address", &format!("127.0.0.1:{port}")])
                    .args(["--health-address", &format!("127.0.0.1:{health_port}")])
                    .args(["--default-x509-svid-ttl", "1h"]);
                (bins.sigil_server.clone(), c)
            }
            Sys::Spire => {
                let conf = dir.join("server.conf");
                std::fs::write(
                    &conf,
                    sigil_testkit::spire::server_config(&sigil_testkit::spire::ServerConfigArgs {
                        trust_domain: TD,
                        port,
                        health_port,
                        socket: &socket,
                        data: &data,
                        log_level: "INFO",
                        extra: &sigil_testkit::spire::SpireServerConfig::default(),
                    }),
                )?;
                let mut c = Command::new(&bins.spire_server);
                c.arg("run").arg("-config").arg(&conf);
                (bins.spire_server.clone(), c)
            }
        };
        let proc = Proc::spawn(&mut cmd, &dir.join("server.log"))?;
        Ok(Server {
            sys,
            proc,
            dir: dir.to_path_buf(),
            socket,
            port,
            health_port,
            bin,
        })
    }

    /// Polls `/ready` every 5 ms until 200; returns the time since `since`.
    fn wait_ready(&mut self, since: Instant, secs: u64) -> Result<Duration> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some((200, _)) = http_get(self.health_port, "/ready") {
                return Ok(since.elapsed());
            }
            if let Some(st) = self.proc.exited() {
                bail!(
                    "{} server exited ({st}):\n{}",
                    self.sys.name(),
                    self.proc.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("{} server not ready in {secs} s", self.sys.name());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn start(sys: Sys, bins: &Bins, dir: &Path) -> Result<Server> {
        let mut s = Server::spawn(sys, bins, dir)?;
        s.wait_ready(Instant::now(), 60)?;
        Ok(s)
    }

    /// Runs the CLI: `args` are Sigil's spelling; SPIRE's is derived.
    fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.bin);
        match self.sys {
            Sys::Sigil => {
                cmd.args(args).arg("--admin-socket").arg(&self.socket);
            }
            Sys::Spire => {
                // Subcommand words first, then the socket, then SPIRE's flag names.
                let split = args
                    .iter()
                    .position(|a| a.starts_with("--"))
                    .unwrap_or(args.len());
                cmd.args(&args[..split])
                    .arg("-socketPath")
                    .arg(&self.socket);
                for a in &args[split..] {
                    let spire = match *a {
                        "--spiffe-id" => "-spiffeID",
                        "--parent-id" => "-parentID",
                        "--selector" => "-selector",
                        "--data" => "-data",
                        "--id" => "-id",
                        "--path" => "-path",
                        "--output" => "-output",
                        "--ttl" => "-ttl",
                        other => other,
                    };
                    cmd.arg(spire);
                }
            }
        }
        cmd.stdin(Stdio::null());
        output_within(&mut cmd, CLI_TIMEOUT)
            .with_context(|| format!("running {} {args:?}", self.bin.display()))
    }

    fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "{} CLI {args:?} failed: {}{}",
                self.sys.name(),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A join token whose agent gets the node alias `alias`.
    fn token(&self, alias: &str) -> Result<String> {
        match self.sys {
            Sys::Sigil => {
                let out = self.cli_ok(&[
                    "token",
                    "generate",
                    "--spiffe-id",
                    alias,
                    "--output",
                    "json",
                ])?;
                let v: serde_json::Value = serde_json::from_str(&out)?;
                v["token"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("no token in {out}"))
            }
            Sys::Spire => {
                let out =
                    self.cli_ok(&["token", "generate", "--spiffe-id", alias, "--ttl", "3600"])?;
                out.lines()
                    .find_map(|l| l.strip_prefix("Token: "))
                    .map(|t| t.trim().to_string())
                    .ok_or_else(|| anyhow!("no token in {out}"))
            }
        }
    }

    /// Creates `entries` through the CLI, `batch` per call; returns the total time.
    fn create_entries(&self, entries: &[EntrySpec], batch: usize) -> Result<Duration> {
        let f = self.fill(entries, batch, Duration::MAX)?;
        Ok(f.elapsed)
    }

    /// Creates `entries` through the CLI, `batch` per call, starting no call after `limit`.
    fn fill(&self, entries: &[EntrySpec], batch: usize, limit: Duration) -> Result<Fill> {
        let dir = self.dir.join("entry-data");
        std::fs::create_dir_all(&dir)?;
        let mut files = Vec::new();
        for (i, chunk) in entries.chunks(batch.max(1)).enumerate() {
            let p = dir.join(format!("entries-{i}.json"));
            let v = serde_json::json!({
                "entries": chunk.iter().map(EntrySpec::json).collect::<Vec<_>>()
            });
            std::fs::write(&p, serde_json::to_vec(&v)?)?;
            files.push(p);
        }
        let t = Instant::now();
        let mut created = 0;
        for (i, p) in files.iter().enumerate() {
            if t.elapsed() > limit {
                return Ok(Fill {
                    created,
                    elapsed: t.elapsed(),
                    complete: false,
                });
            }
            let path = p.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
            let out = self.cli_ok(&["entry", "create", "--data", path, "--output", "json"])?;
            check_batch(self.sys, &out)?;
            created = ((i + 1) * batch).min(entries.len());
            if files.len() >= 20 && (i + 1) % 10 == 0 {
                eprintln!(
                    "    [{}] {} of {} entries created ({:.0} s)",
                    self.sys.name(),
                    ((i + 1) * batch).min(entries.len()),
                    entries.len(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
        Ok(Fill {
            created,
            elapsed: t.elapsed(),
            complete: true,
        })
    }

    fn bundle_pem(&self) -> Result<String> {
        self.cli_ok(&["bundle", "show"])
    }

    fn bundle_set(&self, pem: &Path) -> Result<()> {
        let path = pem.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
        self.cli_ok(&["bundle", "set", "--id", FOREIGN, "--path", path])
            .map(drop)
    }
}

/// How far a bounded [`Server::fill`] got.
struct Fill {
    created: usize,
    elapsed: Duration,
    complete: bool,
}

/// The longest any one CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(600);

/// `cmd.output()`, killed and failed after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdout(std::fs::File::create(&o)?)
        .stderr(std::fs::File::create(&e)?)
        .spawn()?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish in {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    Ok(Output {
        status,
        stdout: std::fs::read(&o)?,
        stderr: std::fs::read(&e)?,
    })
}

/// A batch create exits 0 even when single entries failed (both CLIs): check every result.
fn check_batch(sys: Sys, out: &str) -> Result<()> {
    let v: serde_json::Value =
        serde_json::from_str(out).with_context(|| format!("{} entry create output", sys.name()))?;
    let results = v["results"].as_array().cloned().unwrap_or_default();
    for r in &results {
        let code = r["status"]["code"].as_i64().unwrap_or(0);
        // SPIRE: {"status": {"code": 0}}; Sigil: {"status": "Ok"}.
        let text_failed = r["status"].as_str().is_some_and(|s| s != "Ok");
        if code != 0 || text_failed {
            bail!("{} entry create: an entry failed: {r}", sys.name());
        }
    }
    Ok(())
}

/// A running agent of either system.
struct Agent {
    sys: Sys,
    proc: Proc,
    socket: PathBuf,
    metrics_port: u16,
}

impl Agent {
    /// Spawns an agent attesting with `token` (does not wait). `cache`: SPIRE's
    /// `x509_svid_cache_max_size` (SPIRE mints SVIDs for at most that many entries ahead of a
    /// workload asking; Sigil for all).
    fn spawn(
        sys: Sys,
        bins: &Bins,
        server: &Server,
        dir: &Path,
        token: &str,
        cache: usize,
    ) -> Result<Agent> {
        std::fs::create_dir_all(dir.join("data"))?;
        let bundle = dir.join("bundle.pem");
        if !bundle.exists() {
            std::fs::write(&bundle, server.bundle_pem()?)?;
        }
        // SPIRE refuses an admin socket in the Workload API socket's directory or below it.
        std::fs::create_dir_all(dir.join("public"))?;
        let socket = dir.join("public").join("api.sock");
        let metrics_port = free_port()?;
        let mut cmd = match sys {
            Sys::Sigil => {
                let mut c = Command::new(&bins.sigil_agent);
                c.arg("run")
                    .args(["--trust-domain", TD])
                    .args(["--server-address", &format!("127.0.0.1:{}", server.port)])
                    .arg("--trust-bundle")
                    .arg(&bundle)
                    .arg("--data-dir")
                    .arg(dir.join("data"))
                    .arg("--socket-path")
                    .arg(&socket)
                    .arg("--admin-socket")
                    .arg(dir.join("admin").join("admin.sock"))
                    .args(["--health-address", &format!("127.0.0.1:{metrics_port}")])
                    .args(["--join-token", token])
                    // Every stream of the bench comes from one uid.
                    .args(["--workload-api-max-connections-per-uid", "100000"]);
                c
            }
            Sys::Spire => {
                let health = free_port()?;
                let conf = dir.join("agent.conf");
                std::fs::write(
                    &conf,
                    format!(
                        r#"agent {{
    data_dir = "{data}"
    log_level = "INFO"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    admin_socket_path = "{admin}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{TD}"
    x509_svid_cache_max_size = {cache}
}}
plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{data}"
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
health_checks {{
    listener_enabled = true
    bind_address = "127.0.0.1"
    bind_port = "{health}"
}}
telemetry {{
    Prometheus {{
        host = "127.0.0.1"
        port = {metrics_port}
    }}
}}
"#,
                        data = dir.join("data").display(),
                        port = server.port,
                        socket = socket.display(),
                        admin = dir.join("admin").join("admin.sock").display(),
                        bundle = bundle.display(),
                        cache = cache.max(1000),
                    ),
                )?;
                let mut c = Command::new(&bins.spire_agent);
                c.arg("run")
                    .arg("-config")
                    .arg(&conf)
                    .args(["-joinToken", token]);
                c
            }
        };
        std::fs::create_dir_all(dir.join("admin"))?;
        let proc = Proc::spawn(&mut cmd, &dir.join("agent.log"))?;
        Ok(Agent {
            sys,
            proc,
            socket,
            metrics_port,
        })
    }

    /// (entries held, X509-SVIDs cached) from the agent's Prometheus metrics.
    fn counts(&self) -> Option<(f64, f64)> {
        let (code, text) = http_get(self.metrics_port, "/metrics")?;
        if code != 200 {
            return None;
        }
        match self.sys {
            Sys::Sigil => Some((
                metric(&text, "sigil_agent_registration_entries")?,
                metric(&text, "sigil_agent_x509_svids_cached")?,
            )),
            Sys::Spire => Some((
                metric(&text, "spire_agent_lru_cache_record_map_size").unwrap_or(0.0),
                metric(&text, "spire_agent_lru_cache_svid_map_size").unwrap_or(0.0),
            )),
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// A server, one agent (alias [`ALIAS`]) and the workload entry for this process's uid
/// (federating with other.org, whose bundle is set), the agent serving it.
struct Setup {
    _dir: tempfile::TempDir,
    server: Server,
    agent: Agent,
    pem_dir: PathBuf,
}

fn uid_selector() -> (String, String) {
    (
        "unix".into(),
        format!("uid:{}", nix::unistd::getuid().as_raw()),
    )
}

fn setup_workload(sys: Sys, bins: &Bins) -> Result<Setup> {
    let dir = tempdir(sys)?;
    let server = Server::start(sys, bins, &dir.path().join("server"))?;
    let pem_dir = dir.path().join("pems");
    std::fs::create_dir_all(&pem_dir)?;
    let p0 = pem_dir.join("other-0.pem");
    std::fs::write(&p0, foreign_ca_pem("other.org CA 0")?)?;
    server.bundle_set(&p0)?;
    let token = server.token(ALIAS)?;
    server.create_entries(
        &[EntrySpec {
            spiffe_id: WORKLOAD.into(),
            parent_id: ALIAS.into(),
            selectors: vec![uid_selector()],
            dns: None,
            federates: true,
        }],
        1,
    )?;
    let agent = Agent::spawn(sys, bins, &server, &dir.path().join("agent"), &token, 1000)?;
    let s = Setup {
        _dir: dir,
        server,
        agent,
        pem_dir,
    };
    // Served, with the other.org bundle (SPIRE's agent may need a sync round for it).
    let rt = rt();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(m) = first_message_fresh(&s.agent.socket).await {
                if m.svids.iter().any(|v| v.spiffe_id == WORKLOAD)
                    && m.federated_bundles.contains_key(FOREIGN)
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} agent did not serve {WORKLOAD} with the other.org bundle in 60 s",
                    sys.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })?;
    Ok(s)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// Workload API client (one for both systems)
// ---------------------------------------------------------------------------------------------

async fn client(socket: &Path) -> Result<SpiffeWorkloadApiClient<Channel>> {
    Ok(SpiffeWorkloadApiClient::new(
        sigil::uds::connect(socket).await?,
    ))
}

async fn first_message(c: &mut SpiffeWorkloadApiClient<Channel>) -> Result<wl::X509svidResponse> {
    let mut s = c
        .fetch_x509svid(with_header(wl::X509svidRequest {}))
        .await?
        .into_inner();
    s.message()
        .await?
        .ok_or_else(|| anyhow!("stream ended before its first message"))
}

async fn first_message_fresh(socket: &Path) -> Result<wl::X509svidResponse> {
    let mut c = client(socket).await?;
    first_message(&mut c).await
}

async fn jwt(c: &mut SpiffeWorkloadApiClient<Channel>) -> Result<wl::JwtsvidResponse> {
    Ok(c.fetch_jwtsvid(with_header(wl::JwtsvidRequest {
        audience: vec!["bench".into()],
        spiffe_id: String::new(),
    }))
    .await?
    .into_inner())
}

#[derive(Clone, Copy, PartialEq)]
enum Call {
    X509Persistent,
    X509Fresh,
    JwtPersistent,
}

/// `n` timed calls (ms) after `warmup` untimed ones.
async fn latencies(socket: &Path, kind: Call, n: usize, warmup: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    let mut shared = client(socket).await?;
    for i in 0..warmup + n {
        let t = Instant::now();
        match kind {
            Call::X509Persistent => {
                first_message(&mut shared).await?;
            }
            Call::X509Fresh => {
                first_message_fresh(socket).await?;
            }
            Call::JwtPersistent => {
                let r = jwt(&mut shared).await?;
                if r.svids.is_empty() {
                    bail!("FetchJWTSVID returned no SVID");
                }
            }
        }
        let d = t.elapsed();
        if i >= warmup {
            out.push(d.as_secs_f64() * 1e3);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct MetricDef {
    row: u8,
    key: String,
    label: String,
    unit: &'static str,
    lower_better: bool,
}

/// One run's value of a figure: (run, value, note).
type RunValue = (usize, Option<f64>, String);

#[derive(Default)]
struct Results {
    defs: Vec<MetricDef>,
    /// key → system → per-run value (None: did not finish / failed, with a note).
    values: BTreeMap<String, BTreeMap<Sys, Vec<RunValue>>>,
    /// Raw samples for the plots: (file stem, system, run, series, value).
    samples: Vec<(&'static str, Sys, usize, String, f64)>,
}

impl Results {
    fn def(&mut self, row: u8, key: &str, label: &str, unit: &'static str, lower_better: bool) {
        if !self.defs.iter().any(|d| d.key == key) {
            self.defs.push(MetricDef {
                row,
                key: key.into(),
                label: label.into(),
                unit,
                lower_better,
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        row: u8,
        key: &str,
        label: &str,
        unit: &'static str,
        lower_better: bool,
        sys: Sys,
        run: usize,
        v: Option<f64>,
        note: &str,
    ) {
        self.def(row, key, label, unit, lower_better);
        self.values
            .entry(key.into())
            .or_default()
            .entry(sys)
            .or_default()
            .push((run, v, note.into()));
        eprintln!(
            "    [{}] {label}: {} {unit} {note}",
            sys.name(),
            v.map_or("—".into(), |v| format!("{v:.3}"))
        );
    }

    fn sample(&mut self, file: &'static str, sys: Sys, run: usize, series: &str, v: f64) {
        self.samples.push((file, sys, run, series.into(), v));
    }

    fn write_csv(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out)?;
        let mut f = std::fs::File::create(out.join("summary.csv"))?;
        writeln!(f, "row,key,label,unit,lower_better,system,run,value,note")?;
        for d in &self.defs {
            for (sys, vals) in self.values.get(&d.key).into_iter().flatten() {
                for (run, v, note) in vals {
                    writeln!(
                        f,
                        "{},{},\"{}\",{},{},{},{},{},\"{}\"",
                        d.row,
                        d.key,
                        d.label.replace('"', "'"),
                        d.unit,
                        d.lower_better,
                        sys.name(),
                        run,
                        v.map_or(String::new(), |v| format!("{v}")),
                        note.replace('"', "'")
                    )?;
                }
            }
        }
        let mut files: BTreeMap<&str, std::fs::File> = BTreeMap::new();
        for (file, sys, run, series, v) in &self.samples {
            if !files.contains_key(file) {
                let mut f = std::fs::File::create(out.join(format!("{file}.csv")))?;
                writeln!(f, "system,run,series,value")?;
                files.insert(file, f);
            }
            let f = files.get_mut(file).expect("just inserted");
            writeln!(f, "{},{run},{series},{v}", sys.name())?;
        }
        Ok(())
    }

    fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| row | measure | unit | SPIRE 1.13.3 median (range) | Sigil median (range) | SPIRE ÷ Sigil | verdict |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for d in &self.defs {
            let get = |sys: Sys| -> (Vec<f64>, Vec<String>) {
                let vals = self.values.get(&d.key).and_then(|m| m.get(&sys));
                let nums = vals
                    .map(|v| v.iter().filter_map(|(_, x, _)| *x).collect())
                    .unwrap_or_default();
                let notes = vals
                    .map(|v| {
                        v.iter()
                            .filter(|(_, _, n)| !n.is_empty())
                            .map(|(_, _, n)| n.chars().take(120).collect())
                            .collect()
                    })
                    .unwrap_or_default();
                (nums, notes)
            };
            let (a, an) = get(Sys::Spire);
            let (b, bn) = get(Sys::Sigil);
            let cell = |v: &[f64], notes: &[String]| -> String {
                let mut c = if v.is_empty() {
                    "—".to_string()
                } else if v.len() == 1 {
                    fmt_num(v[0])
                } else {
                    format!(
                        "{} ({}–{})",
                        fmt_num(pct(v, 50.0)),
                        fmt_num(pct(v, 0.0)),
                        fmt_num(pct(v, 100.0))
                    )
                };
                if let Some(n) = notes.first() {
                    let _ = write!(c, " [{} of the runs: {n}]", notes.len());
                }
                c
            };
            let (ratio, verdict) = if a.is_empty() || b.is_empty() {
                let v = match (a.is_empty(), b.is_empty()) {
                    (true, false) => "SPIRE did not finish",
                    (false, true) => "Sigil did not finish",
                    _ => "neither finished",
                };
                ("—".to_string(), v.to_string())
            } else {
                let (ma, mb) = (pct(&a, 50.0), pct(&b, 50.0));
                let r = ma / mb;
                let overlap = pct(&a, 0.0) <= pct(&b, 100.0) && pct(&b, 0.0) <= pct(&a, 100.0);
                let verdict = if overlap || (0.95..=1.05).contains(&r) || !r.is_finite() {
                    "tie (within the spread)".to_string()
                } else {
                    let sigil_better = (r > 1.0) == d.lower_better;
                    let by = if r > 1.0 { r } else { 1.0 / r };
                    format!(
                        "{} by {by:.2}×",
                        if sigil_better { "**Sigil**" } else { "SPIRE" }
                    )
                };
                (format!("{r:.2}"), verdict)
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                d.row,
                d.label,
                d.unit,
                cell(&a, &an),
                cell(&b, &bn),
                ratio,
                verdict
            );
        }
        s
    }
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

/// Before an agent whose timing counts starts: SPIRE's server answers agents from an entry
/// cache it reloads every 5 s, so entries (and the join token's alias entry) younger than that
/// would add up to 5 s that belong to the registration, not to the agent.
const SETTLE: Duration = Duration::from_secs(6);

/// Rows 1 and 3 on one setup per system.
fn rows_1_and_3(
    cfg: &Config,
    bins: &Bins,
    res: &mut Results,
    run: usize,
    order: &[Sys],
) -> Result<()> {
    let mut setups = BTreeMap::new();
    for &sys in order {
        setups.insert(sys, setup_workload(sys, bins)?);
    }
    let rt = rt();
    if cfg.rows.contains(&1) {
        eprintln!(
            "  row 1: Workload API latency ({} calls per series)",
            cfg.lat_calls
        );
        let per = cfg.lat_calls.div_ceil(cfg.lat_rounds);
        let mut got: BTreeMap<(Sys, &str), Vec<f64>> = BTreeMap::new();
        let kinds = [
            (Call::X509Persistent, "x509_persistent"),
            (Call::X509Fresh, "x509_new_connection"),
            (Call::JwtPersistent, "jwt_persistent"),
        ];
        for r in 0..cfg.lat_rounds {
            let warm = if r == 0 { 100 } else { 10 };
            for &sys in order {
                let socket = setups[&sys].agent.socket.clone();
                for (kind, name) in kinds {
                    let v = rt.block_on(latencies(&socket, kind, per, warm))?;
                    got.entry((sys, name)).or_default().extend(v);
                }
            }
        }
        for ((sys, name), v) in kinds
            .iter()
            .flat_map(|(_, name)| order.iter().map(move |s| (*s, *name)))
            .filter_map(|k| got.get(&k).map(|v| (k, v)))
        {
            let (sys, name) = (&sys, &name);
            let label = match *name {
                "x509_persistent" => "FetchX509SVID first message, persistent connection",
                "x509_new_connection" => "FetchX509SVID first message, new connection per call",
                _ => "FetchJWTSVID, persistent connection",
            };
            for (p, tag) in [(50.0, "p50"), (99.0, "p99")] {
                res.put(
                    1,
                    &format!("{name}_{tag}"),
                    &format!("{label}, {tag}"),
                    "ms",
                    true,
                    *sys,
                    run,
                    Some(pct(v, p)),
                    "",
                );
            }
            for x in v {
                res.sample("latency", *sys, run, name, *x);
            }
        }
        for &sys in order {
            let m = rt.block_on(first_message_fresh(&setups[&sys].agent.socket))?;
            eprintln!(
                "    [{}] first message: {} bytes",
                sys.name(),
                prost::Message::encoded_len(&m)
            );
        }
    }
    if cfg.rows.contains(&3) {
        eprintln!(
            "  row 3: entry create → open stream ({} creates)",
            cfg.creates
        );
        for &sys in order {
            let s = &setups[&sys];
            let (v, cli, note) = rt.block_on(create_to_stream(s, sys, cfg.creates, run))?;
            for x in &v {
                res.sample("create_to_stream", sys, run, "create_to_stream", *x);
            }
            let ok = v.len() == cfg.creates;
            for (p, tag) in [(50.0, "p50"), (99.0, "p99")] {
                res.put(
                    3,
                    &format!("create_to_stream_{tag}"),
                    &format!("entry create (CLI start) → update on an open stream, {tag}"),
                    "ms",
                    true,
                    sys,
                    run,
                    ok.then(|| pct(&v, p)),
                    &note,
                );
            }
            res.put(
                3,
                "create_cli_p50",
                "entry create CLI alone (one entry), p50",
                "ms",
                true,
                sys,
                run,
                Some(pct(&cli, 50.0)),
                "",
            );
        }
    }
    Ok(())
}

/// Opens one FetchX509SVID stream, then `n` times creates an entry for this uid and times until
/// a message on the stream carries its SVID. Returns (latencies ms, CLI durations ms, note).
async fn create_to_stream(
    s: &Setup,
    sys: Sys,
    n: usize,
    run: usize,
) -> Result<(Vec<f64>, Vec<f64>, String)> {
    let mut c = client(&s.agent.socket).await?;
    let mut stream = c
        .fetch_x509svid(with_header(wl::X509svidRequest {}))
        .await?
        .into_inner();
    stream.message().await?;
    let (mut out, mut cli) = (Vec::new(), Vec::new());
    let wait = Duration::from_secs(60);
    for i in 0..n {
        let id = format!("spiffe://example.org/bench/created-{run}-{i}");
        let spec = EntrySpec {
            spiffe_id: id.clone(),
            parent_id: ALIAS.into(),
            selectors: vec![uid_selector()],
            dns: None,
            federates: false,
        };
        let p = s.pem_dir.join(format!("create-{i}.json"));
        std::fs::write(
            &p,
            serde_json::to_vec(&serde_json::json!({"entries": [spec.json()]}))?,
        )?;
        let path = p
            .to_str()
            .ok_or_else(|| anyhow!("non-UTF-8 path"))?
            .to_string();
        // The CLI runs on a thread while the stream is read here.
        let t0 = Instant::now();
        let server_bin = s.server.bin.clone();
        let socket = s.server.socket.clone();
        let cli_task = tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(server_bin);
            cmd.args(["entry", "create"]);
            match sys {
                Sys::Sigil => cmd
                    .args(["--data", &path])
                    .arg("--admin-socket")
                    .arg(&socket),
                Sys::Spire => cmd.arg("-socketPath").arg(&socket).args(["-data", &path]),
            };
            let out = cmd.output();
            (out, t0.elapsed())
        });
        let found = tokio::time::timeout(wait, async {
            loop {
                match stream.message().await {
                    Ok(Some(m)) if m.svids.iter().any(|v| v.spiffe_id == id) => {
                        return Ok(t0.elapsed())
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => bail!("stream ended"),
                    Err(e) => bail!("stream error: {e}"),
                }
            }
        })
        .await;
        let (output, cli_d) = cli_task.await?;
        let output = output?;
        if !output.status.success() {
            bail!(
                "{} entry create failed: {}",
                sys.name(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        cli.push(cli_d.as_secs_f64() * 1e3);
        match found {
            Ok(Ok(d)) => out.push(d.as_secs_f64() * 1e3),
            Ok(Err(e)) => return Ok((out, cli, format!("stream: {e}"))),
            Err(_) => return Ok((out, cli, format!("did not arrive in {} s", wait.as_secs()))),
        }
        // Spread the creates over the agents' sync periods.
        tokio::time::sleep(Duration::from_millis(137)).await;
    }
    Ok((out, cli, String::new()))
}

/// Row 2: RSS with `k` streams open and one bundle change fanned out.
fn row_2(cfg: &Config, bins: &Bins, res: &mut Results, run: usize, order: &[Sys]) -> Result<()> {
    for &k in &cfg.streams {
        for &sys in order {
            eprintln!("  row 2: {k} streams, {}", sys.name());
            let s = setup_workload(sys, bins)?;
            let r = many_streams(&s, k, run, Duration::from_secs(cfg.prop_wait))?;
            let ks = format!("{k}");
            // Streams the agent refused are noted; the figures are for the ones it opened.
            let got = (r.opened > 0).then_some(());
            let all = !r.arrivals.is_empty() && r.arrivals.len() == r.opened;
            let note = if all {
                r.note.clone()
            } else {
                format!(
                    "{} of {} streams updated in {} s; {}",
                    r.arrivals.len(),
                    r.opened,
                    cfg.prop_wait,
                    r.note
                )
            };
            res.put(
                2,
                &format!("rss_streams_{k}"),
                &format!("agent RSS with {ks} streams open (one connection each)"),
                "MiB",
                true,
                sys,
                run,
                got.map(|()| r.rss_open as f64 / 1024.0),
                &r.note,
            );
            res.put(
                2,
                &format!("open_streams_{k}"),
                &format!("time to open {ks} streams (first message on each)"),
                "s",
                true,
                sys,
                run,
                got.map(|()| r.open_secs),
                &r.note,
            );
            res.put(
                2,
                &format!("bundle_all_{k}"),
                &format!("bundle change → all {ks} streams updated (last)"),
                "ms",
                true,
                sys,
                run,
                all.then(|| pct(&r.arrivals, 100.0)),
                &note,
            );
            res.put(
                2,
                &format!("bundle_p50_{k}"),
                &format!("bundle change → stream updated, p50 of {ks}"),
                "ms",
                true,
                sys,
                run,
                (!r.arrivals.is_empty()).then(|| pct(&r.arrivals, 50.0)),
                "",
            );
            // The idle point of the RSS plot; the points with streams open are in summary.csv.
            res.sample("streams_rss", sys, run, "0", r.rss_idle as f64 / 1024.0);
            for a in &r.arrivals {
                res.sample("bundle_propagation", sys, run, &ks, *a);
            }
        }
    }
    Ok(())
}

struct StreamsResult {
    opened: usize,
    open_secs: f64,
    rss_idle: u64,
    rss_open: u64,
    arrivals: Vec<f64>,
    note: String,
}

fn many_streams(s: &Setup, k: usize, run: usize, wait: Duration) -> Result<StreamsResult> {
    let rt = rt();
    let pid = s.agent.pid();
    let socket = s.agent.socket.clone();
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = proc_kib(pid, "VmRSS:");
    let pem = s.pem_dir.join(format!("other-new-{run}-{k}.pem"));
    let pem_text = foreign_ca_pem(&format!("other.org CA {run} {k}"))?;
    std::fs::write(&pem, &pem_text)?;
    let new_der: Vec<u8> = sigil::x509::parse_pem_certs(&pem_text)
        .map_err(|e| anyhow!("{e}"))?
        .concat();
    let new_der = Arc::new(new_der);
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let t_open = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let first_err: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    for _ in 0..k {
        let (opened, failed, arrivals, new_der, gate, socket, first_err) = (
            opened.clone(),
            failed.clone(),
            arrivals.clone(),
            new_der.clone(),
            gate.clone(),
            socket.clone(),
            first_err.clone(),
        );
        let mut stop = stop_rx.clone();
        tasks.spawn_on(
            async move {
                let permit = gate.acquire_owned().await.expect("semaphore");
                let opening = async {
                    let mut c = client(&socket).await?;
                    let mut st = c
                        .fetch_x509svid(with_header(wl::X509svidRequest {}))
                        .await?
                        .into_inner();
                    let first = st
                        .message()
                        .await?
                        .ok_or_else(|| anyhow!("no first message"))?;
                    anyhow::Ok((c, st, first))
                };
                let (_c, mut st, _first) =
                    match tokio::time::timeout(Duration::from_secs(60), opening).await {
                        Ok(Ok(x)) => x,
                        Ok(Err(e)) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_err
                                .lock()
                                .expect("lock")
                                .get_or_insert(format!("{e:#}"));
                            return;
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_err
                                .lock()
                                .expect("lock")
                                .get_or_insert("open timed out (60 s)".into());
                            return;
                        }
                    };
                drop(permit);
                opened.fetch_add(1, Ordering::Relaxed);
                loop {
                    tokio::select! {
                        m = st.message() => match m {
                            Ok(Some(m)) => {
                                if m.federated_bundles.get(FOREIGN) == Some(&*new_der) {
                                    arrivals.lock().expect("lock").push(Instant::now());
                                    break;
                                }
                            }
                            _ => return,
                        },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                let _ = stop.wait_for(|s| *s).await;
            },
            rt.handle(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while opened.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < k
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let open_secs = t_open.elapsed().as_secs_f64();
    let n_open = opened.load(Ordering::Relaxed);
    let mut note = String::new();
    if n_open < k {
        note = format!(
            "{n_open} of {k} opened ({} failed: {})",
            failed.load(Ordering::Relaxed),
            first_err.lock().expect("lock").clone().unwrap_or_default()
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_open = proc_kib(pid, "VmRSS:");
    // One bundle change.
    let t0 = Instant::now();
    s.server.bundle_set(&pem)?;
    let deadline = t0 + wait;
    while arrivals.lock().expect("lock").len() < n_open && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let arr: Vec<f64> = arrivals
        .lock()
        .expect("lock")
        .iter()
        .map(|a| a.duration_since(t0).as_secs_f64() * 1e3)
        .collect();
    let _ = stop_tx.send(true);
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    });
    Ok(StreamsResult {
        opened: n_open,
        open_secs,
        rss_idle,
        rss_open,
        arrivals: arr,
        note,
    })
}

fn sync_entries(n: usize, parent: &str, tag: &str) -> Vec<EntrySpec> {
    (0..n)
        .map(|i| EntrySpec {
            spiffe_id: format!(
                "spiffe://example.org/{tag}/ns-{}/sa-{}/w-{i}",
                i % 100,
                i % 5000
            ),
            parent_id: parent.into(),
            selectors: vec![
                ("k8s".into(), format!("ns:ns-{}", i % 100)),
                ("k8s".into(), format!("sa:sa-{}", i % 5000)),
                ("unix".into(), format!("uid:{}", 100_000 + i)),
            ],
            dns: Some(format!("w-{i}.example.org")),
            federates: false,
        })
        .collect()
}

/// Waits until every agent holds `n` entries and `n` SVIDs (its metrics, polled every 10 ms:
/// the resolution of the row-4 times).
/// Returns per agent (time to entries, time to SVIDs) from `t0`; `None` where it ran out.
fn wait_synced(
    agents: &mut [Agent],
    n: usize,
    t0: Instant,
    secs: u64,
) -> Vec<(Option<f64>, Option<f64>)> {
    let mut out = vec![(None, None); agents.len()];
    let mut gone = vec![false; agents.len()];
    let deadline = t0 + Duration::from_secs(secs);
    loop {
        let mut done = true;
        for ((a, o), gone) in agents.iter_mut().zip(out.iter_mut()).zip(gone.iter_mut()) {
            if o.1.is_some() || *gone {
                continue;
            }
            done = false;
            if let Some((e, v)) = a.counts() {
                let t = t0.elapsed().as_secs_f64();
                if o.0.is_none() && e >= n as f64 {
                    o.0 = Some(t);
                }
                if v >= n as f64 {
                    o.0.get_or_insert(t);
                    o.1 = Some(t);
                }
            }
            if o.1.is_none() && a.proc.exited().is_some() {
                *gone = true;
            }
        }
        if done || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Rows 4 and 6: one server per size with N entries for one agent.
fn rows_4_and_6(
    cfg: &Config,
    bins: &Bins,
    res: &mut Results,
    run: usize,
    order: &[Sys],
) -> Result<()> {
    for &n in &cfg.sync_sizes {
        if n >= BIG && run > cfg.big_runs {
            continue;
        }
        for &sys in order {
            eprintln!("  rows 4/6: {n} entries, {}", sys.name());
            let dir = tempdir(sys)?;
            let server = Server::start(sys, bins, &dir.path().join("server"))?;
            let token = server.token(ALIAS)?;
            let entries = sync_entries(n, ALIAS, "sync");
            let limit = Duration::from_secs(cfg.fill_secs);
            let fill = server.fill(&entries, 1000, limit)?;
            let nk = fmt_k(n);
            let short = (!fill.complete).then(|| {
                format!(
                    "fill stopped at {} of {nk} entries after {:.0} s (limit {} s)",
                    fill.created,
                    fill.elapsed.as_secs_f64(),
                    cfg.fill_secs
                )
            });
            let dnf = short.clone().unwrap_or_default();
            if cfg.rows.contains(&6) {
                let rate = fill.created as f64 / fill.elapsed.as_secs_f64();
                res.put(
                    6,
                    &format!("create_rate_{n}"),
                    &format!("entry create, batches of 1,000 (CLI), {nk} entries under one parent"),
                    "entries/s",
                    false,
                    sys,
                    run,
                    fill.complete.then_some(rate),
                    &short
                        .as_ref()
                        .map_or(String::new(), |s| format!("{s}: {rate:.0} entries/s")),
                );
                std::thread::sleep(Duration::from_secs(1));
                res.put(
                    6,
                    &format!("server_rss_{n}"),
                    &format!("server RSS holding {nk} entries"),
                    "MiB",
                    true,
                    sys,
                    run,
                    fill.complete
                        .then(|| proc_kib(server.proc.pid(), "VmRSS:") as f64 / 1024.0),
                    &dnf,
                );
                let spiffe = entries[n / 2].spiffe_id.clone();
                let queries: [(&str, &str, Vec<&str>); 3] = [
                    (
                        "show_spiffe_id",
                        "entry show by SPIFFE ID (1 hit)",
                        vec!["entry", "show", "--spiffe-id", &spiffe],
                    ),
                    (
                        "show_selector",
                        "entry show by selector k8s:sa:sa-7 (20 hits)",
                        vec!["entry", "show", "--selector", "k8s:sa:sa-7"],
                    ),
                    ("show_all", "entry show, all entries", vec!["entry", "show"]),
                ];
                for (key, label, args) in queries {
                    let calls = if key == "show_all" {
                        cfg.list_calls.min(3)
                    } else {
                        cfg.list_calls
                    };
                    let mut v = Vec::new();
                    let mut note = dnf.clone();
                    for _ in 0..calls {
                        if !fill.complete {
                            break;
                        }
                        let mut a = args.clone();
                        a.extend(["--output", "json"]);
                        let t = Instant::now();
                        match server.cli_ok(&a) {
                            Ok(_) => v.push(t.elapsed().as_secs_f64() * 1e3),
                            Err(e) => {
                                note = format!("{e:#}").chars().take(200).collect();
                                break;
                            }
                        }
                    }
                    res.put(
                        6,
                        &format!("{key}_{n}"),
                        &format!("{label}, {nk} entries, CLI, p50"),
                        "ms",
                        true,
                        sys,
                        run,
                        (!v.is_empty()).then(|| pct(&v, 50.0)),
                        &note,
                    );
                }
            }
            if !fill.complete && cfg.rows.contains(&4) {
                for (key, label) in [
                    ("sync_entries", "all {} entries synced"),
                    ("sync_svids", "all {} SVIDs cached"),
                ] {
                    let label = format!("agent start → {}", label.replace("{}", &nk));
                    res.put(
                        4,
                        &format!("{key}_{n}"),
                        &label,
                        "s",
                        true,
                        sys,
                        run,
                        None,
                        &dnf,
                    );
                }
                continue;
            }
            if !cfg.rows.contains(&4) {
                continue;
            }
            let timeout = 60 + n as u64 / 200; // 560 s at 100,000
            std::fs::create_dir_all(dir.path().join("agent"))?;
            std::fs::write(
                dir.path().join("agent").join("bundle.pem"),
                server.bundle_pem()?,
            )?;
            std::thread::sleep(SETTLE);
            let t0 = Instant::now();
            let agent = Agent::spawn(
                sys,
                bins,
                &server,
                &dir.path().join("agent"),
                &token,
                n + 10,
            )?;
            let pid = agent.pid();
            let mut agents = [agent];
            let r = wait_synced(&mut agents, n, t0, timeout)[0];
            let dnf = format!("did not finish in {timeout} s");
            let exited = agents[0]
                .proc
                .exited()
                .map(|s| format!("agent exited ({s})"));
            let note = exited.clone().unwrap_or_else(|| dnf.clone());
            res.put(
                4,
                &format!("sync_entries_{n}"),
                &format!("agent start → all {nk} entries synced"),
                "s",
                true,
                sys,
                run,
                r.0,
                if r.0.is_none() { &note } else { "" },
            );
            res.put(
                4,
                &format!("sync_svids_{n}"),
                &format!("agent start → all {nk} SVIDs cached"),
                "s",
                true,
                sys,
                run,
                r.1,
                if r.1.is_none() { &note } else { "" },
            );
            res.put(
                4,
                &format!("sync_rss_{n}"),
                &format!("agent RSS after syncing {nk} entries"),
                "MiB",
                true,
                sys,
                run,
                Some(proc_kib(pid, "VmRSS:") as f64 / 1024.0),
                if r.1.is_none() { "at the timeout" } else { "" },
            );
            if let Some((inb, outb)) = ss_bytes(server.port) {
                res.put(
                    4,
                    &format!("sync_bytes_{n}"),
                    &format!("TCP bytes agent ↔ server for {nk} entries (in + out)"),
                    "MiB",
                    true,
                    sys,
                    run,
                    Some((inb + outb) as f64 / 1_048_576.0),
                    if r.1.is_none() { "at the timeout" } else { "" },
                );
            }
            if r.1.is_none() {
                eprintln!("    agent log tail:\n{}", agents[0].proc.log_tail());
            }
        }
    }
    Ok(())
}

fn fmt_k(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 {
        format!("{},000", n / 1000)
    } else {
        n.to_string()
    }
}

/// Row 5: K agents with M entries each, started at once.
fn row_5(cfg: &Config, bins: &Bins, res: &mut Results, run: usize, order: &[Sys]) -> Result<()> {
    let (k, m) = (cfg.sign_agents, cfg.sign_entries);
    for &sys in order {
        eprintln!("  row 5: {k} agents × {m} SVIDs, {}", sys.name());
        let dir = tempdir(sys)?;
        let server = Server::start(sys, bins, &dir.path().join("server"))?;
        let mut tokens = Vec::new();
        let mut entries = Vec::new();
        for a in 0..k {
            let alias = format!("spiffe://example.org/node-{a}");
            tokens.push(server.token(&alias)?);
            entries.extend(sync_entries(m, &alias, &format!("n{a}")));
        }
        server.create_entries(&entries, 1000)?;
        for a in 0..k {
            let adir = dir.path().join(format!("agent-{a}"));
            std::fs::create_dir_all(&adir)?;
            std::fs::write(adir.join("bundle.pem"), server.bundle_pem()?)?;
        }
        std::thread::sleep(SETTLE);
        let spid = server.proc.pid();
        let cpu0 = cpu_secs(spid);
        let t0 = Instant::now();
        let mut agents = Vec::new();
        for (a, t) in tokens.iter().enumerate() {
            agents.push(Agent::spawn(
                sys,
                bins,
                &server,
                &dir.path().join(format!("agent-{a}")),
                t,
                m + 10,
            )?);
        }
        let timeout = 120 + (k * m) as u64 / 100;
        let r = wait_synced(&mut agents, m, t0, timeout);
        let cpu = cpu_secs(spid) - cpu0;
        let all = r.iter().all(|x| x.1.is_some());
        let done = r.iter().filter(|x| x.1.is_some()).count();
        let last = r.iter().filter_map(|x| x.1).fold(0.0, f64::max);
        let note = if all {
            String::new()
        } else {
            format!("{done} of {k} agents done in {timeout} s")
        };
        let total = (k * m) as f64;
        res.put(
            5,
            "sign_rate",
            &format!(
                "{k} agents × {} SVIDs at once: SVIDs/s (start → last agent done)",
                fmt_k(m)
            ),
            "SVIDs/s",
            false,
            sys,
            run,
            all.then(|| total / last),
            &note,
        );
        res.put(
            5,
            "sign_cpu",
            "server CPU seconds per 1,000 SVIDs",
            "s",
            true,
            sys,
            run,
            all.then(|| cpu / total * 1000.0),
            &note,
        );
        res.put(
            5,
            "sign_server_rss",
            "server RSS after signing",
            "MiB",
            true,
            sys,
            run,
            Some(proc_kib(spid, "VmRSS:") as f64 / 1024.0),
            "",
        );
    }
    Ok(())
}

/// Row 7: cold start.
fn row_7(cfg: &Config, bins: &Bins, res: &mut Results, run: usize, order: &[Sys]) -> Result<()> {
    let rt = rt();
    for &sys in order {
        let (mut srv, mut agt) = (Vec::new(), Vec::new());
        for _ in 0..cfg.cold_reps {
            let dir = tempdir(sys)?;
            let t = Instant::now();
            let mut server = Server::spawn(sys, bins, &dir.path().join("server"))?;
            srv.push(server.wait_ready(t, 60)?.as_secs_f64() * 1e3);
            let token = server.token(ALIAS)?;
            server.create_entries(
                &[EntrySpec {
                    spiffe_id: WORKLOAD.into(),
                    parent_id: ALIAS.into(),
                    selectors: vec![uid_selector()],
                    dns: None,
                    federates: false,
                }],
                1,
            )?;
            // The bundle file is written before the clock starts.
            let adir = dir.path().join("agent");
            std::fs::create_dir_all(&adir)?;
            std::fs::write(adir.join("bundle.pem"), server.bundle_pem()?)?;
            std::thread::sleep(SETTLE);
            let t = Instant::now();
            let agent = Agent::spawn(sys, bins, &server, &adir, &token, 1000)?;
            let got = rt.block_on(async {
                let deadline = t + Duration::from_secs(60);
                loop {
                    if let Ok(Ok(m)) = tokio::time::timeout(
                        Duration::from_secs(5),
                        first_message_fresh(&agent.socket),
                    )
                    .await
                    {
                        if m.svids.iter().any(|v| v.spiffe_id == WORKLOAD) {
                            return Some(t.elapsed());
                        }
                    }
                    if Instant::now() > deadline {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            match got {
                Some(d) => agt.push(d.as_secs_f64() * 1e3),
                None => eprintln!("    agent log tail:\n{}", agent.proc.log_tail()),
            }
            drop(agent);
            drop(server);
        }
        res.put(
            7,
            "cold_server",
            &format!("server start → ready (median of {})", cfg.cold_reps),
            "ms",
            true,
            sys,
            run,
            Some(pct(&srv, 50.0)),
            "",
        );
        let ok = agt.len() == cfg.cold_reps;
        res.put(
            7,
            "cold_agent",
            &format!(
                "agent start → first X509-SVID served (median of {})",
                cfg.cold_reps
            ),
            "ms",
            true,
            sys,
            run,
            ok.then(|| pct(&agt, 50.0)),
            if ok { "" } else { "no SVID in 60 s" },
        );
    }
    Ok(())
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("vs_spire: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cfg = Config::from_env();
    let bins = Bins::find(&cfg.systems)?;
    if let Err(e) = sigil::limits::raise_open_files_limit() {
        eprintln!("raising RLIMIT_NOFILE failed: {e}");
    }
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?.0;
    let max_streams = cfg.streams.iter().copied().max().unwrap_or(0) as u64;
    if max_streams + 200 > nofile {
        eprintln!("warning: RLIMIT_NOFILE {nofile} is below {max_streams} streams + 200: opening will fail");
    }
    let loads_before = load();
    eprintln!(
        "vs_spire: {} run(s), rows {:?}, load {loads_before}",
        cfg.runs, cfg.rows
    );
    let mut res = Results::default();
    let mut failures = Vec::new();
    let mut loads = vec![loads_before.clone()];
    for run in 1..=cfg.runs {
        // Alternate who goes first, so drifts in load do not always favour one.
        let order: Vec<Sys> = if run % 2 == 1 {
            [Sys::Spire, Sys::Sigil]
        } else {
            [Sys::Sigil, Sys::Spire]
        }
        .into_iter()
        .filter(|s| cfg.systems.contains(s))
        .collect();
        eprintln!("run {run}/{} (load {})", cfg.runs, load());
        let steps: [(&[u8], &str, RowFn); 5] = [
            (&[1, 3], "rows 1/3", rows_1_and_3),
            (&[2], "row 2", row_2),
            (&[4, 6], "rows 4/6", rows_4_and_6),
            (&[5], "row 5", row_5),
            (&[7], "row 7", row_7),
        ];
        for (rows, name, f) in steps {
            if !rows.iter().any(|r| cfg.rows.contains(r)) {
                continue;
            }
            if let Err(e) = f(&cfg, &bins, &mut res, run, &order) {
                eprintln!("  {name} failed: {e:#}");
                failures.push(format!("run {run}, {name}: {e:#}"));
            }
            loads.push(load());
            res.write_csv(&cfg.out)?;
        }
    }
    res.write_csv(&cfg.out)?;
    println!("\n## Sigil vs SPIRE 1.13.3, same machine, same run\n");
    println!(
        "{} run(s); load average (1/5/15 min) between steps: {}; nproc {}.\n",
        cfg.runs,
        loads.join(" → "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    print!("{}", res.table());
    if !failures.is_empty() {
        println!("\nFailures:");
        for f in &failures {
            println!("- {f}");
        }
    }
    std::fs::write(cfg.out.join("table.md"), res.table())?;
    eprintln!("CSV: {}", cfg.out.display());
    Ok(())
}

type RowFn = fn(&Config, &Bins, &mut Results, usize, &[Sys]) -> Result<()>;
