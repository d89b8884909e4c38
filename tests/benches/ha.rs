//! HA and CA rotation benchmark: real release `sigil-server`s on one PostgreSQL database
//! (`sigil_testkit::postgres::TestDatabase`: the cluster named by `SIGIL_TEST_POSTGRES_URL`, else
//! a throwaway one this process starts) and real `sigil-agent`s, each configured with both
//! servers' addresses.
//!
//! Four measurements (BENCHMARKS.md, "HA and CA rotation"):
//! 1. *Propagation*: `CreateEntry` through server A's admin socket → the new SVID on an open
//!    Workload API stream of an agent connected to server B; then `DeleteEntry` through A → the
//!    SVID gone from that stream. The same through B as the one-server baseline.
//! 2. *Failover*: `kill -9` of the server agents are connected to → each of them connected to
//!    the other server (admin `Status`: `server`, `sync_state`), and → an entry created through
//!    the survivor right after the kill cached on a moved agent. The killed server is restarted
//!    and the next round kills the other one.
//! 3. *Signing throughput*: 2 agents × N/2 entries (env `SIGIL_BENCH_HA_ENTRIES`, default
//!    10,000 in all) created before the agents start; agent start → all SVIDs minted, from the
//!    agents' log timestamps; on one SQLite server, one PostgreSQL server, two PostgreSQL servers.
//! 4. *CA rotation*: open Workload API streams on every agent; `localauthority x509 prepare` on
//!    A → every stream's bundle holds the new root; `activate`; `taint` of the former authority →
//!    no stream holds an SVID it issued; `revoke` → its root gone from every stream's bundle.
//!
//! Stream times are those of the messages' arrival in the reader tasks (recorded per message),
//! not of the 2 ms polls that look at them.
//!
//! Run: `cargo build --release --workspace --bins --benches`, then `cargo bench --bench ha`.
//! Every wait is bounded; the bench stops by itself.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sigil::proto::admin as pb;
use sigil::proto::agent_admin::{agent_admin_client::AgentAdminClient, StatusRequest};
use sigil_testkit::postgres::TestDatabase;
use sigil_testkit::{binary, free_port, join_token, pct, subdir, tempdir, Agent, Server};
use spiffe::WorkloadApiClient;
use tokio_stream::StreamExt as _;

/// Creates (and as many deletes) per server in the propagation measurement.
const CREATES: usize = 100;
/// Kill rounds in the failover measurement.
const KILLS: usize = 5;
/// Agents in the propagation, failover and rotation setup.
const AGENTS: usize = 3;
/// Workload API streams per agent in the rotation measurement.
const STREAMS_PER_AGENT: usize = 4;
/// Entries each agent holds besides its workload's (re-minted on a taint).
const HELD: usize = 300;
/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- setup

/// Two servers on one PostgreSQL database at fixed ports (the killed one comes back on its own).
/// Fields drop in order: the servers before their database, the database before the dir.
struct Pair {
    servers: [Server; 2],
    addrs: [String; 2],
    /// `bundle show` once both roots are in it.
    bundle: String,
    _db: TestDatabase,
    _dir: tempfile::TempDir,
}

fn postgres_config(dir: &Path, db: &TestDatabase) -> String {
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[datastore]\ntype = \"postgres\"\nconnection_string = \"{}\"\n",
            db.url()
        ),
    )
    .expect("writing the server config");
    config.to_str().expect("UTF-8 temp path").to_string()
}

fn start_pair() -> Pair {
    let dir = tempdir();
    let db = TestDatabase::create();
    let config = postgres_config(dir.path(), &db);
    let addrs = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let servers = [0, 1].map(|k| {
        Server::start(
            &subdir(dir.path(), &format!("server-{k}")),
            &["--config", &config, "--bind-address", &addrs[k]],
        )
    });
    let bundle = servers[1].cli_ok(&["bundle", "show"]);
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    wait_until("server 0 follows the merged bundle", || {
        servers[0].cli_ok(&["bundle", "show"]) == bundle
    });
    Pair {
        _dir: dir,
        _db: db,
        servers,
        addrs,
        bundle,
    }
}

/// An agent started on `servers[first]` with the other address as its second, with `bundle`.
fn start_agent(
    servers: &[&Server],
    addrs: &[&str],
    first: usize,
    dir: &Path,
    bundle: &str,
    token: &str,
) -> Agent {
    std::fs::write(dir.join("bundle.pem"), bundle).expect("writing the bundle");
    let mut flags = vec!["--join-token", token];
    for (k, a) in addrs.iter().enumerate() {
        if k != first {
            flags.extend(["--server-address", a]);
        }
    }
    Agent::start(servers[first], dir, &flags)
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn uid_selector() -> pb::Selector {
    pb::Selector {
        r#type: "unix".into(),
        value: format!("uid:{}", uid()),
    }
}

/// `entry create --data` of `entries` through `server`, asserting all were created.
fn create_data(server: &Server, file: &Path, entries: Vec<serde_json::Value>) {
    let n = entries.len();
    std::fs::write(
        file,
        serde_json::to_vec(&serde_json::json!({ "entries": entries })).expect("JSON"),
    )
    .expect("writing --data file");
    let out = server.cli_json(&["entry", "create", "--data", file.to_str().expect("UTF-8")]);
    let ok = out["results"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["status"] == "Ok").count());
    assert_eq!(ok, n, "entry create --data");
}

/// `n` entries under `parent` that no local process matches (3 selectors, a DNS name).
fn held_entries(parent: &str, tag: &str, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "spiffe_id": format!("spiffe://example.org/{tag}/ns-{}/w-{i}", i % 100),
                "parent_id": parent,
                "selectors": [
                    format!("k8s:ns:{tag}-ns-{}", i % 100),
                    format!("k8s:sa:sa-{}", i % 500),
                    format!("unix:uid:{}", 1_000_000 + i),
                ],
                "dns_names": [format!("w-{i}.example.org")],
            })
        })
        .collect()
}

/// Polls `f` every 20 ms until it holds (panics after [`WAIT`]).
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- Workload API streams

/// What one message on a stream held.
#[derive(Clone, Debug, Default)]
struct Snap {
    /// SPIFFE IDs of its SVIDs.
    ids: BTreeSet<String>,
    /// Authority key IDs (hex) of its SVIDs' issuers.
    issuers: BTreeSet<String>,
    /// Subject key IDs (hex) of our trust domain's roots.
    roots: BTreeSet<String>,
}

/// Every message of one stream, with its arrival time.
type Log = Arc<Mutex<Vec<(Instant, Snap)>>>;

fn messages(log: &Log) -> std::sync::MutexGuard<'_, Vec<(Instant, Snap)>> {
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The subject key ID (hex) of a certificate, or its authority key ID (`aki`).
fn key_id(der: &[u8], aki: bool) -> Option<String> {
    use x509_parser::extensions::ParsedExtension;
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    c.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) if !aki => Some(hex(k.0)),
            ParsedExtension::AuthorityKeyIdentifier(k) if aki => {
                k.key_identifier.as_ref().map(|k| hex(k.0))
            }
            _ => None,
        })
}

/// Opens an X509-SVID stream on `socket` and records its messages into `log` until it ends.
async fn watch(socket: PathBuf, log: Log) {
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .expect("connecting to the Workload API");
    let mut stream = client
        .stream_x509_contexts()
        .await
        .expect("stream_x509_contexts");
    let td = spiffe::TrustDomain::new("example.org").expect("trust domain");
    while let Some(Ok(ctx)) = stream.next().await {
        let at = Instant::now();
        let roots = ctx
            .bundle_set()
            .get(&td)
            .map(|b| {
                b.authorities()
                    .iter()
                    .filter_map(|c| key_id(c.as_bytes(), false))
                    .collect()
            })
            .unwrap_or_default();
        let mut snap = Snap {
            roots,
            ..Snap::default()
        };
        for svid in ctx.svids() {
            snap.ids.insert(svid.spiffe_id().to_string());
            if let Some(leaf) = svid.cert_chain().first() {
                snap.issuers
                    .insert(key_id(leaf.as_bytes(), true).unwrap_or_default());
            }
        }
        messages(&log).push((at, snap));
    }
}

/// The arrival time of the first message at or after `since` on `log` for which `pred` holds,
/// waiting for it (panics after [`WAIT`]).
fn first_after(log: &Log, since: Instant, what: &str, pred: impl Fn(&Snap) -> bool) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((at, _)) = messages(log).iter().find(|(at, s)| *at >= since && pred(s)) {
            return *at;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The latest message of `log` (waits for a first one).
fn latest(log: &Log) -> Snap {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((_, s)) = messages(log).last() {
            return s.clone();
        }
        assert!(Instant::now() < deadline, "no first stream message");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------- 1. propagation

/// Create → stream and delete → stream latencies (ms) through `admin`'s server to `log`.
fn create_delete_latencies(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    parent: &str,
    tag: &str,
    log: &Log,
) -> (Vec<f64>, Vec<f64>) {
    let (mut created, mut deleted) = (Vec::new(), Vec::new());
    let mut admin = rt.block_on(server.admin());
    for i in 0..CREATES {
        let id = format!("spiffe://example.org/ha/{tag}/{i}");
        let t = Instant::now();
        let entry = rt
            .block_on(admin.create_entry(pb::CreateEntryRequest {
                entry: Some(pb::Entry {
                    spiffe_id: id.clone(),
                    parent_id: parent.into(),
                    selectors: vec![uid_selector()],
                    ..Default::default()
                }),
            }))
            .expect("CreateEntry")
            .into_inner()
            .entry
            .expect("the created entry");
        let at = first_after(log, t, &format!("{id} on the stream"), |s| {
            s.ids.contains(&id)
        });
        created.push(ms(at - t));
        let t = Instant::now();
        rt.block_on(admin.delete_entry(pb::DeleteEntryRequest { id: entry.id }))
            .expect("DeleteEntry");
        let at = first_after(log, t, &format!("{id} gone from the stream"), |s| {
            !s.ids.contains(&id)
        });
        deleted.push(ms(at - t));
        std::thread::sleep(Duration::from_millis(10));
    }
    (created, deleted)
}

// ---------------------------------------------------------------- 2. failover

/// `Status` of the agent behind `socket` (filtered to an ID it does not hold: cheap).
async fn status(socket: &Path) -> Option<sigil::proto::agent_admin::StatusResponse> {
    let channel = sigil::uds::connect(socket).await.ok()?;
    AgentAdminClient::new(channel)
        .status(StatusRequest {
            spiffe_id: "spiffe://example.org/none".into(),
        })
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// Per round: (kill → connected to the survivor, per moved agent; kill → an entry created
/// through the survivor cached on the first moved agent), in ms.
fn failover(
    rt: &tokio::runtime::Runtime,
    pair: &mut Pair,
    agents: &[Agent],
    agent_ids: &[String],
) -> (Vec<f64>, Vec<f64>) {
    let (mut moved, mut synced) = (Vec::new(), Vec::new());
    for round in 0..KILLS {
        let on = |a: &Agent| rt.block_on(status(&a.admin_socket)).map(|s| s.server);
        let victim = usize::from(on(&agents[0]).as_deref() == Some(pair.addrs[1].as_str()));
        let survivor = 1 - victim;
        let leaving: Vec<usize> = (0..agents.len())
            .filter(|&k| on(&agents[k]).as_deref() == Some(pair.addrs[victim].as_str()))
            .collect();
        let mut admin = rt.block_on(pair.servers[survivor].admin());
        pair.servers[victim].signal(nix::sys::signal::Signal::SIGKILL);
        let killed = Instant::now();
        let id = format!("spiffe://example.org/ha/failover/{round}");
        rt.block_on(admin.create_entry(pb::CreateEntryRequest {
            entry: Some(pb::Entry {
                spiffe_id: id.clone(),
                parent_id: agent_ids[leaving[0]].clone(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{}", 2_000_000 + round),
                }],
                ..Default::default()
            }),
        }))
        .expect("CreateEntry through the survivor");
        // One admin connection per agent, opened before the kill: a poll is one call on it.
        let mut clients = rt.block_on(async {
            let mut v = Vec::new();
            for &k in &leaving {
                let channel = sigil::uds::connect(&agents[k].admin_socket)
                    .await
                    .expect("agent admin socket");
                v.push(AgentAdminClient::new(channel));
            }
            v
        });
        let mut cached = None;
        // Until every agent moved and the first one cached the new entry.
        let mut gone = vec![false; clients.len()];
        while gone.iter().any(|g| !g) || cached.is_none() {
            assert!(killed.elapsed() < WAIT, "agents did not move");
            // Index 0 is the agent the new entry is for.
            for (i, client) in clients.iter_mut().enumerate() {
                if gone[i] && (i > 0 || cached.is_some()) {
                    continue;
                }
                let s = rt
                    .block_on(client.status(StatusRequest {
                        spiffe_id: id.clone(),
                    }))
                    .expect("agent Status")
                    .into_inner();
                let at = ms(killed.elapsed());
                if i == 0 && cached.is_none() && s.svids.iter().any(|v| v.spiffe_id == id) {
                    cached = Some(at);
                }
                if !gone[i] && s.server == pair.addrs[survivor] && s.sync_state == "connected" {
                    gone[i] = true;
                    moved.push(at);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        synced.extend(cached);
        eprintln!(
            "  round {round}: killed server {victim}, {} agents moved",
            leaving.len()
        );
        // Reap the killed process, then bring it back on its port for the next round.
        if let Some(mut c) = pair.servers[victim].child.take() {
            let _ = c.wait();
        }
        pair.servers[victim].restart();
    }
    (moved, synced)
}

// ---------------------------------------------------------------- 3. signing throughput

/// Wall-clock seconds since UTC midnight (the log's timestamps are UTC).
fn now_of_day() -> f64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// Seconds since UTC midnight of a log line starting `2026-11-23T12:58:00.123456Z`.
fn log_time(line: &str, reference: f64) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let t = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut p = t.split(':');
    let h: f64 = p.next()?.parse().ok()?;
    let m: f64 = p.next()?.parse().ok()?;
    let s: f64 = p.next()?.parse().ok()?;
    let mut v = h * 3600.0 + m * 60.0 + s;
    if v < reference - 43_200.0 {
        v += 86_400.0; // crossed midnight
    }
    Some(v)
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// (time all `n` entries synced, time the cumulative minted count reached `n`).
fn progress(log: &str, n: u64, t0: f64) -> (Option<f64>, Option<f64>) {
    let (mut synced, mut minted, mut total) = (None, None, 0u64);
    for l in log.lines() {
        if synced.is_none() && l.contains("entries synced") {
            if field(l, "entries").is_some_and(|e| e >= n) {
                synced = log_time(l, t0);
            }
        } else if minted.is_none() && l.contains("X509-SVIDs minted") {
            total += field(l, "signed").unwrap_or(0);
            if total >= n {
                minted = log_time(l, t0);
            }
        }
    }
    (synced, minted)
}

/// One throughput configuration's result.
struct Minted {
    label: &'static str,
    /// Agent spawn → last agent's last SVID, s.
    total: f64,
    /// First agent's snapshot applied → last agent's last SVID, s.
    phase: f64,
    entries: usize,
}

/// 2 agents × `per_agent` entries on `servers` (agent k on server k mod len), all created
/// through `servers[0]` before the agents start.
fn mint(label: &'static str, servers: &[&Server], bundle: &str, per_agent: usize) -> Minted {
    let dir = tempdir();
    let addrs: Vec<String> = servers.iter().map(|s| s.node_address()).collect();
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut tokens = Vec::new();
    for k in 0..2 {
        let (token, id) = join_token(servers[k % servers.len()]);
        create_data(
            servers[0],
            &dir.path().join(format!("entries-{k}.json")),
            held_entries(&id, &format!("mint-{k}"), per_agent),
        );
        tokens.push(token);
    }
    let t0 = now_of_day();
    let started = Instant::now();
    let agents: Vec<Agent> = (0..2)
        .map(|k| {
            start_agent(
                servers,
                &addr_refs,
                k % servers.len(),
                &subdir(dir.path(), &format!("agent-{k}")),
                bundle,
                &tokens[k],
            )
        })
        .collect();
    let limit = Duration::from_secs(30 + per_agent as u64 / 100);
    let done = loop {
        let p: Vec<_> = agents
            .iter()
            .map(|a| progress(&a.log_text(), per_agent as u64, t0))
            .collect();
        if p.iter().all(|(_, m)| m.is_some()) {
            break p;
        }
        assert!(
            started.elapsed() < limit,
            "{label}: not all SVIDs minted within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let first_synced = done
        .iter()
        .filter_map(|(s, _)| *s)
        .fold(f64::INFINITY, f64::min);
    let last_minted = done
        .iter()
        .filter_map(|(_, m)| *m)
        .fold(f64::NEG_INFINITY, f64::max);
    Minted {
        label,
        total: last_minted - t0,
        phase: last_minted - first_synced,
        entries: 2 * per_agent,
    }
}

// ---------------------------------------------------------------- 4. CA rotation

/// `localauthority x509 show` as JSON.
fn authorities(server: &Server) -> serde_json::Value {
    server.cli_json(&["localauthority", "x509", "show"])
}

/// Whether the latest message of `log` before `t` satisfies `pred`.
fn held_before(log: &Log, t: Instant, pred: impl Fn(&Snap) -> bool) -> bool {
    messages(log)
        .iter()
        .rev()
        .find(|(at, _)| *at < t)
        .is_some_and(|(_, s)| pred(s))
}

/// Over the streams whose state at `t` did not yet satisfy `pred`: how many, and the time from
/// `t` to their first message that does, in ms, for the median and the slowest one.
fn all_streams(
    logs: &[Log],
    t: Instant,
    what: &str,
    pred: impl Fn(&Snap) -> bool,
) -> (usize, f64, f64) {
    let v: Vec<f64> = logs
        .iter()
        .filter(|l| !held_before(l, t, &pred))
        .map(|l| ms(first_after(l, t, what, &pred) - t))
        .collect();
    if v.is_empty() {
        return (0, 0.0, 0.0);
    }
    (v.len(), pct(&v, 50.0), pct(&v, 100.0))
}

/// The steps of one rotation on `server`: (step, streams that changed, median stream ms,
/// slowest stream ms).
fn rotate(server: &Server, logs: &[Log]) -> Vec<(&'static str, usize, f64, f64)> {
    let before = authorities(server);
    let old = before["active"]["authority_id"]
        .as_str()
        .expect("an active authority")
        .to_string();
    let mut steps = Vec::new();

    let t = Instant::now();
    server.cli_ok(&["localauthority", "x509", "prepare"]);
    let prepared = authorities(server)["prepared"]["authority_id"]
        .as_str()
        .expect("a prepared authority")
        .to_string();
    let (n, p50, max) = all_streams(logs, t, "the new root on every stream", |s| {
        s.roots.contains(&prepared)
    });
    steps.push(("`prepare` → new root in every stream's bundle", n, p50, max));

    let t = Instant::now();
    server.cli_ok(&["localauthority", "x509", "activate"]);
    let took = ms(t.elapsed());
    steps.push((
        "`activate` (CLI round trip; streams unchanged)",
        0,
        took,
        took,
    ));

    let t = Instant::now();
    server.cli_ok(&["localauthority", "x509", "taint", "--authority-id", &old]);
    let (n, p50, max) = all_streams(logs, t, "no SVID of the tainted authority", |s| {
        !s.issuers.contains(&old)
    });
    steps.push((
        "`taint` former → no stream serves an SVID it issued",
        n,
        p50,
        max,
    ));

    let t = Instant::now();
    server.cli_ok(&["localauthority", "x509", "revoke", "--authority-id", &old]);
    let (n, p50, max) = all_streams(logs, t, "the revoked root out of every bundle", |s| {
        !s.roots.contains(&old)
    });
    steps.push((
        "`revoke` former → its root out of every stream's bundle",
        n,
        p50,
        max,
    ));
    steps
}

// ---------------------------------------------------------------- main

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let total: usize = std::env::var("SIGIL_BENCH_HA_ENTRIES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(10_000);
    binary("sigil-server"); // checks the release binaries before any timing
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load before: {}", load().trim());
    let bench_start = Instant::now();

    // Two servers, 3 agents (0 and 2 on server 0, 1 on server 1), each with its workload's
    // entry (this process's uid) and HELD others.
    eprintln!("HA setup ...");
    let mut pair = start_pair();
    let dir = tempdir();
    let mut agents = Vec::new();
    let mut agent_ids = Vec::new();
    for k in 0..AGENTS {
        let first = k % 2;
        let (token, id) = join_token(&pair.servers[first]);
        let mut entries = held_entries(&id, &format!("held-{k}"), HELD);
        entries.push(serde_json::json!({
            "spiffe_id": format!("spiffe://example.org/ha/workload/{k}"),
            "parent_id": id,
            "selectors": [format!("unix:uid:{}", uid())],
        }));
        create_data(
            &pair.servers[1 - first],
            &dir.path().join(format!("entries-{k}.json")),
            entries,
        );
        let servers = [&pair.servers[0], &pair.servers[1]];
        let addrs = [pair.addrs[0].as_str(), pair.addrs[1].as_str()];
        agents.push(start_agent(
            &servers,
            &addrs,
            first,
            &subdir(dir.path(), &format!("agent-{k}")),
            &pair.bundle,
            &token,
        ));
        agent_ids.push(id);
    }
    for (k, agent) in agents.iter().enumerate() {
        agent.wait_svids_for(&[&format!("spiffe://example.org/ha/workload/{k}")], 60);
    }
    let logs: Vec<Log> = agents
        .iter()
        .flat_map(|a| (0..STREAMS_PER_AGENT).map(move |_| a.socket_path()))
        .map(|socket| {
            let log = Log::default();
            rt.spawn(watch(socket, log.clone()));
            log
        })
        .collect();
    for (i, log) in logs.iter().enumerate() {
        let k = i / STREAMS_PER_AGENT;
        let id = format!("spiffe://example.org/ha/workload/{k}");
        first_after(log, Instant::now() - WAIT, "the workload SVID", |s| {
            s.ids.contains(&id)
        });
    }

    // 1. Propagation to agent 1 (on server 1): through server 0, then through server 1.
    eprintln!("propagation ...");
    let stream = &logs[STREAMS_PER_AGENT];
    let (cross_create, cross_delete) =
        create_delete_latencies(&rt, &pair.servers[0], &agent_ids[1], "cross", stream);
    let (same_create, same_delete) =
        create_delete_latencies(&rt, &pair.servers[1], &agent_ids[1], "same", stream);

    // 4. CA rotation on server 0 (its former authority issued agents 0 and 2's SVIDs).
    eprintln!("CA rotation ...");
    let rotation = rotate(&pair.servers[0], &logs);
    let bundle_roots = latest(&logs[0]).roots.len();

    // 2. Failover.
    eprintln!("failover ...");
    let (moved, synced) = failover(&rt, &mut pair, &agents, &agent_ids);
    drop(agents);
    drop(pair);
    let ha_secs = bench_start.elapsed().as_secs_f64();

    // 3. Signing throughput: one SQLite server; one, then two servers on PostgreSQL.
    eprintln!("signing throughput, {total} SVIDs per configuration ...");
    let per_agent = total / 2;
    let mut minted = Vec::new();
    {
        let dir = tempdir();
        let server = Server::start(&subdir(dir.path(), "server"), &[]);
        let bundle = server.cli_ok(&["bundle", "show"]);
        minted.push(mint("1 server, SQLite", &[&server], &bundle, per_agent));
    }
    {
        let dir = tempdir();
        let db = TestDatabase::create();
        let config = postgres_config(dir.path(), &db);
        let server = Server::start(&subdir(dir.path(), "server"), &["--config", &config]);
        let bundle = server.cli_ok(&["bundle", "show"]);
        minted.push(mint("1 server, PostgreSQL", &[&server], &bundle, per_agent));
    }
    {
        let pair = start_pair();
        let servers = [&pair.servers[0], &pair.servers[1]];
        minted.push(mint(
            "2 servers, one PostgreSQL (1 agent each)",
            &servers,
            &pair.bundle,
            per_agent,
        ));
    }
    eprintln!("load after: {}", load().trim());
    eprintln!(
        "HA part {ha_secs:.0} s, total {:.0} s",
        bench_start.elapsed().as_secs_f64()
    );

    let row = |name: &str, v: &[f64]| {
        println!(
            "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            v.len(),
            pct(v, 50.0),
            pct(v, 99.0),
            pct(v, 100.0)
        );
    };
    println!("\n| propagation to a Workload API stream on an agent connected to server B | n | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    row(
        "`CreateEntry` through A → SVID on the stream",
        &cross_create,
    );
    row(
        "`DeleteEntry` through A → SVID gone from the stream",
        &cross_delete,
    );
    row(
        "`CreateEntry` through B (same server) → SVID on the stream",
        &same_create,
    );
    row(
        "`DeleteEntry` through B (same server) → SVID gone",
        &same_delete,
    );

    println!("\n| failover after `kill -9` ({KILLS} rounds, alternating servers) | n | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    row(
        "kill → agent's sync stream connected to the survivor",
        &moved,
    );
    row(
        "kill → entry created through the survivor cached on a moved agent",
        &synced,
    );

    println!(
        "\n| CA rotation on server A, {} streams on {AGENTS} agents ({} roots in the bundle after) | streams that changed | median stream | slowest stream |",
        logs.len(),
        bundle_roots
    );
    println!("|---|---|---|---|");
    for (step, n, p50, max) in &rotation {
        println!("| {step} | {n} | {p50:.1} ms | {max:.1} ms |");
    }

    println!("\n| signing throughput: 2 agents × {per_agent} entries | agent start → all SVIDs | mint phase | SVIDs/s (mint phase) |");
    println!("|---|---|---|---|");
    for m in &minted {
        println!(
            "| {} | {:.2} s | {:.2} s | {:.0} |",
            m.label,
            m.total,
            m.phase,
            m.entries as f64 / m.phase
        );
    }
}
