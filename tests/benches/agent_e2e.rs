//! End-to-end agent benchmark: real release `sigil-server` and `sigil-agent`
//! processes on 127.0.0.1 and temp dirs (the harness of `sigil_testkit`).
//!
//! For every size N (env `SIGIL_BENCH_E2E_SIZES`, default `1000,10000,100000`): a fresh server,
//! N entries created under the agent's node alias with `sigil-server entry create --data`
//! before the agent exists, then the agent started with a join token. Timed from the agent's
//! spawn to its log lines "entries synced ... entries=N" and "X509-SVIDs minted signed=…"
//! (cumulative ≥ N), using the log's own timestamps. Agent VmHWM/VmRSS from /proc after the
//! last SVID; bytes from `ss -ti` on the agent side of its TCP connections to the node API
//! (`bytes_received` / `bytes_acked`: TCP payload, i.e. TLS records including the handshake and
//! HTTP/2 framing, no TCP/IP headers; the attestation channel counts only if still open).
//!
//! On the first size (default 1,000) it also measures create → SVID on an open Workload API
//! stream: 100 single `CreateEntry` calls over the admin socket for the bench process's own
//! uid, each timed until the `FetchX509SVID` stream the bench holds brings the new SPIFFE ID
//! (each entry is deleted again, untimed, before the next).
//!
//! Run: `cargo build --release --workspace --bins --benches`, then `cargo bench --bench
//! agent_e2e`. Every wait is bounded; a size that does not finish in time is reported as such
//! instead of hanging.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sigil::proto::admin as pb;
use sigil::proto::workload as wl;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_testkit::{pct, proc_kib, tempdir, Agent, Server};

const ALIAS: &str = "spiffe://example.org/node-a";
const LATENCY_CREATES: usize = 100;

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

/// (time all N entries synced, time cumulative minted reached N, number of mint batches).
fn progress(log: &str, n: u64, t0: f64) -> (Option<f64>, Option<f64>, usize) {
    let (mut synced, mut minted, mut total, mut batches) = (None, None, 0u64, 0usize);
    for l in log.lines() {
        if synced.is_none() && l.contains("entries synced") {
            if field(l, "entries").is_some_and(|e| e >= n) {
                synced = log_time(l, t0);
            }
        } else if minted.is_none() && l.contains("X509-SVIDs minted") {
            total += field(l, "signed").unwrap_or(0);
            batches += 1;
            if total >= n {
                minted = log_time(l, t0);
            }
        }
    }
    (synced, minted, batches)
}

/// Sum of `bytes_received` / `bytes_acked` over established TCP connections to `port`
/// (the agent's side: the bench itself never connects to the node API).
fn ss_bytes(port: &str) -> Option<(u64, u64)> {
    let out = std::process::Command::new("ss")
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
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = |k: &str| -> u64 {
        text.split_whitespace()
            .filter_map(|w| w.strip_prefix(k)?.parse::<u64>().ok())
            .sum()
    };
    Some((sum("bytes_received:"), sum("bytes_acked:")))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1_048_576.0)
}

fn write_entries(path: &Path, n: usize) {
    let entries: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "spiffe_id": format!("spiffe://example.org/ns-{}/sa-{}/w-{i}", i % 100, i % 5000),
                "parent_id": ALIAS,
                "selectors": [
                    format!("k8s:ns:ns-{}", i % 100),
                    format!("k8s:sa:sa-{}", i % 5000),
                    format!("unix:uid:{i}"),
                ],
                "dns_names": [format!("w-{i}.example.org")],
            })
        })
        .collect();
    std::fs::write(
        path,
        serde_json::to_vec(&serde_json::json!({ "entries": entries })).expect("JSON"),
    )
    .expect("writing --data file");
}

struct SyncResult {
    n: usize,
    create: Duration,
    synced: Option<f64>,
    minted: Option<f64>,
    batches: usize,
    hwm_kib: u64,
    rss_kib: u64,
    ss: Option<(u64, u64)>,
    note: String,
}

/// Create → cached-SVID latencies and create-RPC latencies, in ms.
type Latencies = (Vec<f64>, Vec<f64>);

/// Measures [`Latencies`] over [`LATENCY_CREATES`] single creates.
/// An entry for the bench process itself (`unix:uid:<uid>`), under the node alias.
fn own_entry(spiffe_id: &str) -> pb::Entry {
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: ALIAS.into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: format!("uid:{}", nix::unistd::getuid().as_raw()),
        }],
        ..Default::default()
    }
}

/// Waits (10 s at most) for the next message on `stream` whose SVIDs include `id` (`present`)
/// or no longer do.
async fn wait_for(
    stream: &mut tonic::Streaming<wl::X509svidResponse>,
    id: &str,
    present: bool,
) -> Instant {
    let deadline = Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{id}: no stream message within 10 s"))
            .expect("Workload API stream")
            .expect("stream open");
        let at = Instant::now();
        if msg.svids.iter().any(|s| s.spiffe_id == id) == present {
            return at;
        }
    }
}

fn latency(rt: &tokio::runtime::Runtime, server: &Server, agent: &Agent) -> Latencies {
    rt.block_on(async {
        let mut admin = server.admin().await;
        // One stream open for the whole series, as a workload holds it; a base entry gives
        // it its first message.
        let base = "spiffe://example.org/latency/base";
        admin
            .create_entry(pb::CreateEntryRequest {
                entry: Some(own_entry(base)),
            })
            .await
            .expect("CreateEntry");
        let mut client = SpiffeWorkloadApiClient::new(
            sigil::uds::connect(&agent.socket_path())
                .await
                .expect("agent Workload API socket"),
        );
        // PermissionDenied until the base entry's SVID is cached.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            let mut req = tonic::Request::new(wl::X509svidRequest {});
            req.metadata_mut()
                .insert("workload.spiffe.io", "true".parse().expect("ascii"));
            match client.fetch_x509svid(req).await {
                Ok(s) => break s.into_inner(),
                Err(e)
                    if e.code() == tonic::Code::PermissionDenied && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("FetchX509SVID: {e}"),
            }
        };
        wait_for(&mut stream, base, true).await;
        let (mut total, mut rpc) = (Vec::new(), Vec::new());
        for i in 0..LATENCY_CREATES {
            let id = format!("spiffe://example.org/latency/{i}");
            let t = Instant::now();
            let created = admin
                .create_entry(pb::CreateEntryRequest {
                    entry: Some(own_entry(&id)),
                })
                .await
                .expect("CreateEntry")
                .into_inner();
            rpc.push(t.elapsed().as_secs_f64() * 1e3);
            let at = wait_for(&mut stream, &id, true).await;
            total.push((at - t).as_secs_f64() * 1e3);
            // Untimed: the entry goes again, so every message carries two SVIDs.
            let entry_id = created.entry.map(|e| e.id).expect("created entry");
            admin
                .delete_entry(pb::DeleteEntryRequest { id: entry_id })
                .await
                .expect("DeleteEntry");
            wait_for(&mut stream, &id, false).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (total, rpc)
    })
}

fn run_size(
    n: usize,
    with_latency: bool,
    rt: &tokio::runtime::Runtime,
) -> (SyncResult, Option<Latencies>) {
    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let token = server.cli_json(&["token", "generate", "--spiffe-id", ALIAS])["token"]
        .as_str()
        .expect("token")
        .to_string();
    let data = dir.path().join("entries.json");
    write_entries(&data, n);
    let t = Instant::now();
    server.cli_ok(&[
        "entry",
        "create",
        "--data",
        data.to_str().expect("utf-8 path"),
    ]);
    let create = t.elapsed();

    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("agent dir");
    std::fs::write(
        agent_dir.join("bundle.pem"),
        server.cli_ok(&["bundle", "show"]),
    )
    .expect("bundle");
    let port = server
        .node_address()
        .rsplit(':')
        .next()
        .expect("port")
        .to_string();
    let timeout = Duration::from_secs(30 + (n as u64) / 500); // 230 s at 100,000
    let t0 = now_of_day();
    let start = Instant::now();
    let mut agent = Agent::start(&server, &agent_dir, &["--join-token", &token]);
    let pid = agent.child.as_ref().expect("agent child").id();
    let mut note = String::new();
    let (synced, minted, batches) = loop {
        let (s, m, b) = progress(&agent.log_text(), n as u64, t0);
        if m.is_some() {
            break (s, m, b);
        }
        if let Some(Ok(Some(st))) = agent.child.as_mut().map(|c| c.try_wait()) {
            note = format!("agent exited ({st})");
            break (s, m, b);
        }
        if start.elapsed() > timeout {
            note = format!("timed out after {} s", timeout.as_secs());
            break (s, m, b);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = SyncResult {
        n,
        create,
        synced: synced.map(|s| s - t0),
        minted: minted.map(|m| m - t0),
        batches,
        hwm_kib: proc_kib(pid, "VmHWM:"),
        rss_kib: proc_kib(pid, "VmRSS:"),
        ss: ss_bytes(&port),
        note,
    };
    let lat = (with_latency && r.minted.is_some()).then(|| latency(rt, &server, &agent));
    let _ = agent.stop();
    (r, lat)
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let sizes: Vec<usize> = std::env::var("SIGIL_BENCH_E2E_SIZES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    sigil_testkit::binary("sigil-server"); // build the release binaries before any timing
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load before: {}", load().trim());
    let mut results = Vec::new();
    let mut lat = None;
    for (i, &n) in sizes.iter().enumerate() {
        eprintln!("size {n} ...");
        let (r, l) = run_size(n, i == 0, &rt);
        if l.is_some() {
            lat = l.map(|l| (n, l));
        }
        results.push(r);
    }
    eprintln!("load after: {}", load().trim());

    let secs = |v: Option<f64>| v.map_or("—".to_string(), |s| format!("{s:.2} s"));
    println!("\n| entries | create (CLI --data) | agent start → entries synced | → all SVIDs minted | mint phase | SVIDs/s (mint phase) | agent VmHWM | agent VmRSS | TCP bytes in / out (ss) | note |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let phase = match (r.synced, r.minted) {
            (Some(s), Some(m)) => Some(m - s),
            _ => None,
        };
        let rate = phase.map_or("—".into(), |p| format!("{:.0}", r.n as f64 / p));
        let ss =
            r.ss.map_or("n/a".into(), |(i, o)| format!("{} / {}", mib(i), mib(o)));
        println!(
            "| {} | {:.2} s | {} | {} | {} ({} batches) | {} | {} | {} | {} | {} |",
            r.n,
            r.create.as_secs_f64(),
            secs(r.synced),
            secs(r.minted),
            secs(phase),
            r.batches,
            rate,
            mib(r.hwm_kib * 1024),
            mib(r.rss_kib * 1024),
            ss,
            r.note
        );
    }
    if let Some((n, (total, rpc))) = lat {
        println!(
            "\n| create → SVID on an open Workload API stream ({} single creates, {n} entries held) | p50 | p99 | max |",
            total.len()
        );
        println!("|---|---|---|---|");
        println!(
            "| CreateEntry RPC (durable write) | {:.2} ms | {:.2} ms | {:.2} ms |",
            pct(&rpc, 50.0),
            pct(&rpc, 99.0),
            pct(&rpc, 100.0)
        );
        println!(
            "| create → push → agent CSR → BatchSign → cached → on the open stream | {:.2} ms | {:.2} ms | {:.2} ms |",
            pct(&total, 50.0),
            pct(&total, 99.0),
            pct(&total, 100.0)
        );
    }
}
