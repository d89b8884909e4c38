//! Workload API benchmark: real release `sigil-server` and `sigil-agent` processes (the harness
//! of `sigil_testkit`), the bench process as the workload (`unix:uid:<getuid>`).
//!
//! 1. **FetchX509SVID first-message latency** for a cached SVID: open the stream (header
//!    `workload.spiffe.io: true`), time until the first message, drop the stream. Measured on
//!    one persistent channel and with a new connection per call (connect included), against
//!    the agent and against a **baseline**: a plain tonic `SpiffeWorkloadApi` server whose
//!    FetchX509SVID immediately returns the precomputed message the agent returned (same
//!    bytes, no attestation), run as a process of its own like the agent (this executable
//!    again), and the same server in this process (own runtime), once plain and once behind
//!    the agent's `:authority` adapter (`sigil::h2_authority`): those two differ by the adapter
//!    alone, so their ratio is its cost. The four alternate in rounds so load drifts on the
//!    shared machine hit all alike.
//! 2. **Many open streams**: K concurrent FetchX509SVID streams (one connection each when the
//!    fd limit allows), every first message received, then ONE federated bundle change
//!    (`sigil-server bundle set --id spiffe://other.org`; the entry federates with other.org)
//!    and the time until every stream has received the message carrying the new bundle. Agent
//!    VmRSS / VmHWM from /proc idle, with all streams open, and after they close; the same
//!    streams against the baseline server run as a child process (this executable again),
//!    for its VmRSS. If the bundle change does not reach every stream, a stream opened
//!    afterwards shows whether the agent's cache has it, and an `entry update` (new hint)
//!    wakes the streams as a second, separately timed trigger.
//!
//! Run: `cargo build --release --workspace --bins --benches`, then `cargo bench --bench
//! workload_api`. Env: `SIGIL_BENCH_WL_N` (calls per latency
//! series, default 2000), `SIGIL_BENCH_WL_WARMUP` (default 200), `SIGIL_BENCH_WL_ROUNDS`
//! (default 4), `SIGIL_BENCH_WL_STREAMS` (default `1000,10000`; `K/C` = K streams over C
//! connections; empty = skip part 2), `SIGIL_BENCH_WL_BUNDLE_WAIT_SECS` (default 5),
//! `SIGIL_BENCH_WL_NO_BASELINE_MEM` (skip the baseline memory run), `SIGIL_BENCH_WL_HOLD_SECS`
//! (after part 1, that many seconds of untimed calls for `perf record -p <agent>`; default 0),
//! `SIGIL_BENCH_WL_DEBUG` (log tails when a trigger misses streams),
//! `SIGIL_BENCH_WL_BASELINE_WRAPPER` / `SIGIL_TEST_AGENT_WRAPPER` (a profiler command the
//! baseline server / the agent run under, e.g. `heaptrack -o /tmp/agent`). Every wait is bounded.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use sigil::proto::workload as wl;
use sigil::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil::proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_testkit::{
    agent_with_workload_entries_and_flags, foreign_ca_pem, pct, proc_kib, tempdir, Agent, Server,
};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const WORKLOAD: &str = "spiffe://example.org/bench/workload";
const FOREIGN_TD: &str = "spiffe://other.org";

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn with_header<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("ascii"));
    req
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

// ---------------------------------------------------------------------------------------------
// Baseline: the same service, answering a precomputed message, no attestation.
// ---------------------------------------------------------------------------------------------

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// FetchX509SVID answers `x509` at once and keeps the stream open (as the agent does).
#[derive(Clone)]
struct Echo {
    x509: Arc<wl::X509svidResponse>,
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Echo {
    type FetchX509SVIDStream = BoxStream<wl::X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<wl::X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<wl::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<wl::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        if req
            .metadata()
            .get("workload.spiffe.io")
            .map(|v| v.as_bytes())
            != Some(b"true")
        {
            return Err(Status::invalid_argument("security header missing"));
        }
        let msg = (*self.x509).clone();
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(msg)).chain(tokio_stream::pending()),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<wl::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<wl::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<wl::JwtsvidRequest>,
    ) -> Result<Response<wl::JwtsvidResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<wl::ValidateJwtsvidRequest>,
    ) -> Result<Response<wl::ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

/// Starts the baseline server on its own 2-thread runtime (like a separate process would have
/// its own threads); returns the runtime (dropping it stops the server). `authority_fix`: each
/// connection goes through the agent's `:authority` adapter ([`sigil::h2_authority`]), so the
/// two baselines differ by the adapter alone.
fn start_baseline(
    socket: &Path,
    msg: wl::X509svidResponse,
    authority_fix: bool,
) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("baseline")
        .enable_all()
        .build()
        .expect("baseline runtime");
    let (listener, socket_file) = rt
        .block_on(sigil::uds::bind(socket, 0o700, 0o600))
        .expect("binding the baseline socket");
    let echo = Echo {
        x509: Arc::new(msg),
    };
    rt.spawn(async move {
        // The socket file lives as long as the server.
        let _socket_file = socket_file;
        let server =
            tonic::transport::Server::builder().add_service(SpiffeWorkloadApiServer::new(echo));
        if authority_fix {
            server
                .serve_with_incoming(sigil::h2_authority::incoming(listener))
                .await
        } else {
            server
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
        }
        .expect("baseline server");
    });
    rt
}

// ---------------------------------------------------------------------------------------------
// Part 1: first-message latency
// ---------------------------------------------------------------------------------------------

async fn client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(
        sigil::uds::connect(socket)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display())),
    )
}

/// Opens FetchX509SVID on `c` and returns its first message.
async fn first_message(c: &mut SpiffeWorkloadApiClient<Channel>) -> wl::X509svidResponse {
    let mut s = c
        .fetch_x509svid(with_header(wl::X509svidRequest {}))
        .await
        .expect("FetchX509SVID")
        .into_inner();
    s.message()
        .await
        .expect("first message")
        .expect("stream ended before its first message")
}

/// `n` timed calls (ms) after `warmup` untimed ones; `fresh`: a new connection per call
/// (connect included in the time), else one channel for all.
async fn latencies(socket: &Path, n: usize, warmup: usize, fresh: bool, size: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    let mut shared = client(socket).await;
    for i in 0..warmup + n {
        let t = Instant::now();
        let msg = if fresh {
            let mut c = client(socket).await;
            first_message(&mut c).await
        } else {
            first_message(&mut shared).await
        };
        let d = t.elapsed();
        assert_eq!(msg.encoded_len(), size, "a different message than expected");
        if i >= warmup {
            out.push(d.as_secs_f64() * 1e3);
        }
    }
    out
}

struct Series {
    persistent: Vec<f64>,
    fresh: Vec<f64>,
}

impl Series {
    fn new() -> Self {
        Self {
            persistent: Vec::new(),
            fresh: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Part 2: many streams
// ---------------------------------------------------------------------------------------------

/// One trigger's outcome: arrivals (ms) of the next message on every stream it reached.
struct Trigger {
    what: &'static str,
    cli_ms: f64,
    t_start: Instant,
    t_return: Instant,
    /// Arrival after the CLI started / returned (ms), one per stream updated by this trigger
    /// (arrivals between its start and the next trigger's).
    from_start: Vec<f64>,
    from_return: Vec<f64>,
}

struct StreamsResult {
    k: usize,
    connections: usize,
    opened: usize,
    failed: usize,
    open_secs: f64,
    rss_idle: u64,
    rss_open: u64,
    fds_open: usize,
    rss_updated: u64,
    hwm_updated: u64,
    rss_closed: u64,
    fds_closed: usize,
    triggers: Vec<Trigger>,
    /// Updated streams whose message carried the new other.org bundle.
    with_new_bundle: usize,
    /// A stream opened after the bundle change got the new bundle (the agent's cache has it).
    fresh_sees_new_bundle: Option<bool>,
    other_msgs: usize,
    note: String,
}

/// The other.org roots (concatenated DER) of a PEM file.
fn pem_der(pem: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(pem).expect("reading pem");
    sigil::x509::parse_pem_certs(&text).expect("pem").concat()
}

/// Opens `k` streams over `connections` connections and waits for every first message; sets
/// the other.org bundle to `pem` and waits (`bundle_wait`) for every stream's next message.
/// Streams it did not reach are then woken by a second trigger, an entry update (new hint:
/// new revision, the agent re-mints, the streams get the new SVID and whatever the cache
/// holds), and timed the same way.
#[allow(clippy::too_many_arguments)]
fn many_streams(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    agent: &Agent,
    entry_id: &str,
    k: usize,
    connections: usize,
    pem: &Path,
    bundle_wait: Duration,
) -> StreamsResult {
    let agent_pid = agent.child.as_ref().expect("agent child").id();
    let socket = &agent.socket_path();
    let rss_idle = proc_kib(agent_pid, "VmRSS:");
    let new_bundle = Arc::new(pem_der(pem));
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let other_msgs = Arc::new(AtomicUsize::new(0));
    let with_new = Arc::new(AtomicUsize::new(0));
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(k)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let opening = Arc::new(tokio::sync::Semaphore::new(64));
    let t_open = Instant::now();

    let mut tasks = tokio::task::JoinSet::new();
    let guard = rt.enter();
    // Channels: one per connection; stream i uses channel i % connections.
    let channels: Arc<Mutex<Vec<Option<Channel>>>> = Arc::new(Mutex::new(vec![None; connections]));
    for i in 0..k {
        let (opened, failed, other_msgs, with_new, arrivals, new_bundle) = (
            opened.clone(),
            failed.clone(),
            other_msgs.clone(),
            with_new.clone(),
            arrivals.clone(),
            new_bundle.clone(),
        );
        let mut stop = stop_rx.clone();
        let opening = opening.clone();
        let channels = channels.clone();
        let socket = socket.to_path_buf();
        tasks.spawn(async move {
            let permit = opening.acquire_owned().await.expect("semaphore");
            let mut s = match open_stream(&socket, &channels, i % connections).await {
                Ok(s) => s,
                Err(e) => {
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("stream {i}: {e}");
                    }
                    return;
                }
            };
            let first = match s.message().await {
                Ok(Some(m)) => m,
                other => {
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("stream {i}: first message: {other:?}");
                    }
                    return;
                }
            };
            drop(permit);
            opened.fetch_add(1, Ordering::Relaxed);
            // The next message that differs from the first (nothing else changes meanwhile).
            loop {
                tokio::select! {
                    m = s.message() => match m {
                        Ok(Some(m)) => {
                            let at = Instant::now();
                            if m != first {
                                arrivals.lock().expect("lock").push(at);
                                if m.federated_bundles.get(FOREIGN_TD) == Some(&*new_bundle) {
                                    with_new.fetch_add(1, Ordering::Relaxed);
                                }
                                break;
                            }
                            other_msgs.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return,
                    },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            // Keep the stream open until told to stop.
            let _ = stop.wait_for(|s| *s).await;
            drop(s);
        });
    }
    drop(guard);

    let mut note = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while opened.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < k {
        if Instant::now() > deadline {
            note = "not every stream opened within 120 s; ".into();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let open_secs = t_open.elapsed().as_secs_f64();
    let n_open = opened.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500)); // let allocations settle
    let rss_open = proc_kib(agent_pid, "VmRSS:");
    let fds_open = fd_count(agent_pid);
    eprintln!(
        "  {n_open}/{k} streams open in {open_secs:.2} s ({} failed); agent RSS {} (idle {}), fds {fds_open}",
        failed.load(Ordering::Relaxed),
        mib(rss_open),
        mib(rss_idle)
    );

    // Runs the CLI, waits until every open stream got its update or `wait` passed; returns
    // the arrivals recorded after the CLI started.
    let fire = |what: &'static str, args: &[&str], wait: Duration| -> Trigger {
        let t_start = Instant::now();
        server.cli_ok(args);
        let t_return = Instant::now();
        let deadline = t_return + wait;
        while arrivals.lock().expect("lock").len() < n_open && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "  {what}: {}/{n_open} streams updated",
            arrivals.lock().expect("lock").len()
        );
        Trigger {
            what,
            cli_ms: (t_return - t_start).as_secs_f64() * 1e3,
            t_start,
            t_return,
            from_start: Vec::new(),
            from_return: Vec::new(),
        }
    };

    let pem_s = pem.to_str().expect("utf-8 path");
    let mut triggers = vec![fire(
        "bundle set",
        &["bundle", "set", "--id", FOREIGN_TD, "--path", pem_s],
        bundle_wait,
    )];
    let mut fresh_sees_new_bundle = None;
    if arrivals.lock().expect("lock").len() < n_open {
        note.push_str("bundle set did not reach every open stream; ");
        // Does the agent hold the new bundle? A stream opened now reads the cache.
        let m = rt.block_on(async { first_message(&mut client(socket).await).await });
        fresh_sees_new_bundle = Some(m.federated_bundles.get(FOREIGN_TD) == Some(&*new_bundle));
        if std::env::var_os("SIGIL_BENCH_WL_DEBUG").is_some() {
            let tail = |t: String| {
                let l: Vec<&str> = t.lines().collect();
                l[l.len().saturating_sub(20)..].join("\n")
            };
            eprintln!("server log tail:\n{}", tail(server.log_text()));
            eprintln!("agent log tail:\n{}", tail(agent.log_text()));
        }
        let hint = format!("bench-{k}");
        triggers.push(fire(
            "entry update (fallback)",
            &["entry", "update", "--entry-id", entry_id, "--hint", &hint],
            Duration::from_secs(30),
        ));
        if arrivals.lock().expect("lock").len() < n_open {
            note.push_str("not every stream updated within 30 s of the fallback; ");
        }
    }
    let got: Vec<Instant> = arrivals.lock().expect("lock").clone();
    let ms = |a: &Instant, b: Instant| a.saturating_duration_since(b).as_secs_f64() * 1e3;
    let starts: Vec<Instant> = triggers.iter().map(|t| t.t_start).collect();
    for (i, t) in triggers.iter_mut().enumerate() {
        let ends = starts.get(i + 1).copied();
        let mine = got
            .iter()
            .filter(|a| **a >= t.t_start && ends.is_none_or(|e| **a < e));
        t.from_start = mine.clone().map(|a| ms(a, t.t_start)).collect();
        t.from_return = mine.map(|a| ms(a, t.t_return)).collect();
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_updated = proc_kib(agent_pid, "VmRSS:");
    let hwm_updated = proc_kib(agent_pid, "VmHWM:");

    let _ = stop_tx.send(true);
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(60), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    });
    channels.lock().expect("lock").clear();
    std::thread::sleep(Duration::from_secs(1));
    let rss_closed = proc_kib(agent_pid, "VmRSS:");
    let fds_closed = fd_count(agent_pid);

    StreamsResult {
        k,
        connections,
        opened: n_open,
        failed: failed.load(Ordering::Relaxed),
        open_secs,
        rss_idle,
        rss_open,
        fds_open,
        rss_updated,
        hwm_updated,
        rss_closed,
        fds_closed,
        triggers,
        with_new_bundle: with_new.load(Ordering::Relaxed),
        fresh_sees_new_bundle,
        other_msgs: other_msgs.load(Ordering::Relaxed),
        note,
    }
}

// ---------------------------------------------------------------------------------------------
// Baseline memory: the echo server as a child process (this executable, re-run), so its RSS
// can be read like the agent's.
// ---------------------------------------------------------------------------------------------

/// Env: run as the baseline server on this socket (child mode).
const SERVE_ENV: &str = "SIGIL_BENCH_WL_SERVE";
/// Env: file with the encoded X509svidResponse the child answers.
const SERVE_MSG_ENV: &str = "SIGIL_BENCH_WL_SERVE_MSG";

/// Child mode: serve the echo until killed, on a default runtime (as the agent's).
fn serve_baseline_child(socket: &Path, msg_file: &Path) {
    let bytes = std::fs::read(msg_file).expect("reading the message file");
    let msg = wl::X509svidResponse::decode(bytes.as_slice()).expect("decoding the message");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (listener, _socket_file) = sigil::uds::bind(socket, 0o700, 0o600)
            .await
            .expect("binding");
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(Echo {
                x509: Arc::new(msg),
            }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .expect("baseline server");
    });
}

/// Starts the baseline echo server as a child process on `socket`, answering the message in
/// `msg_file`; returns once it listens.
fn spawn_baseline_child(socket: &Path, msg_file: &Path) -> std::process::Child {
    // A profiler to run the baseline under (VmRSS is then the wrapper's, not meaningful).
    let mut wrap: Vec<String> = std::env::var("SIGIL_BENCH_WL_BASELINE_WRAPPER")
        .map(|w| w.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut cmd = if wrap.is_empty() {
        std::process::Command::new(std::env::current_exe().expect("current exe"))
    } else {
        let mut c = std::process::Command::new(wrap.remove(0));
        c.args(&wrap)
            .arg(std::env::current_exe().expect("current exe"));
        c
    };
    let child = cmd
        .env(SERVE_ENV, socket)
        .env(SERVE_MSG_ENV, msg_file)
        .spawn()
        .expect("spawning the baseline server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "baseline server did not bind");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Baseline server process: VmRSS idle, with `k` FetchX509SVID streams open over
/// `connections` connections, and after they closed (KiB); and how many opened.
fn baseline_memory(
    rt: &tokio::runtime::Runtime,
    msg: &wl::X509svidResponse,
    k: usize,
    connections: usize,
) -> (u64, u64, u64, usize) {
    let dir = tempdir();
    let socket = dir.path().join("b").join("api.sock");
    let msg_file = dir.path().join("msg.bin");
    std::fs::write(&msg_file, msg.encode_to_vec()).expect("writing the message file");
    let mut child = spawn_baseline_child(&socket, &msg_file);
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(200));
    let idle = proc_kib(pid, "VmRSS:");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let opened = Arc::new(AtomicUsize::new(0));
    let opening = Arc::new(tokio::sync::Semaphore::new(64));
    let channels: Arc<Mutex<Vec<Option<Channel>>>> = Arc::new(Mutex::new(vec![None; connections]));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..k {
        let (opened, opening, channels, socket) = (
            opened.clone(),
            opening.clone(),
            channels.clone(),
            socket.clone(),
        );
        let mut stop = stop_rx.clone();
        tasks.spawn_on(
            async move {
                let permit = opening.acquire_owned().await.expect("semaphore");
                let Ok(mut s) = open_stream(&socket, &channels, i % connections).await else {
                    return;
                };
                if let Ok(Some(_)) = s.message().await {
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
                let _ = stop.wait_for(|s| *s).await;
            },
            rt.handle(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while opened.load(Ordering::Relaxed) < k && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let open = proc_kib(pid, "VmRSS:");
    let n = opened.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    rt.block_on(async { while tasks.join_next().await.is_some() {} });
    channels.lock().expect("lock").clear();
    std::thread::sleep(Duration::from_secs(1));
    let closed = proc_kib(pid, "VmRSS:");
    let _ = child.kill();
    let _ = child.wait();
    (idle, open, closed, n)
}

/// A FetchX509SVID stream on connection `slot` of `channels` (connecting it if new).
async fn open_stream(
    socket: &Path,
    channels: &Mutex<Vec<Option<Channel>>>,
    slot: usize,
) -> Result<tonic::Streaming<wl::X509svidResponse>, String> {
    let existing = channels.lock().expect("lock")[slot].clone();
    let ch = match existing {
        Some(c) => c,
        None => {
            let c = sigil::uds::connect(socket)
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            channels.lock().expect("lock")[slot] = Some(c.clone());
            c
        }
    };
    SpiffeWorkloadApiClient::new(ch)
        .fetch_x509svid(with_header(wl::X509svidRequest {}))
        .await
        .map(Response::into_inner)
        .map_err(|e| format!("FetchX509SVID: {e}"))
}

fn main() {
    if let (Some(sock), Some(msg)) = (std::env::var_os(SERVE_ENV), std::env::var_os(SERVE_MSG_ENV))
    {
        serve_baseline_child(Path::new(&sock), Path::new(&msg));
        return;
    }
    let n = env_usize("SIGIL_BENCH_WL_N", 2000);
    let warmup = env_usize("SIGIL_BENCH_WL_WARMUP", 200);
    let rounds = env_usize("SIGIL_BENCH_WL_ROUNDS", 4).max(1);
    let hold = env_usize("SIGIL_BENCH_WL_HOLD_SECS", 0);
    let bundle_wait = Duration::from_secs(env_usize("SIGIL_BENCH_WL_BUNDLE_WAIT_SECS", 5) as u64);
    // `K` (one connection per stream, as far as fds allow) or `K/C` (K streams over C).
    let sizes: Vec<(usize, Option<usize>)> = std::env::var("SIGIL_BENCH_WL_STREAMS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| {
            let (k, c) = s
                .trim()
                .split_once('/')
                .map_or((s.trim(), None), |(k, c)| (k, Some(c)));
            Some((k.parse().ok()?, c.and_then(|c| c.parse().ok())))
        })
        .collect();

    // The bench holds one descriptor per stream too; the agent, its child, inherits the limit.
    if let Err(e) = sigil::limits::raise_open_files_limit() {
        eprintln!("raising RLIMIT_NOFILE failed: {e}");
    }
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit")
        .0;
    eprintln!("RLIMIT_NOFILE: {nofile}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    sigil_testkit::binary("sigil-server"); // build the release binaries before any timing
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load before: {}", load().trim());

    let dir = tempdir();
    let server = Server::start(&dir.path().join("server"), &[]);
    let pem_dir = dir.path().join("pems");
    std::fs::create_dir_all(&pem_dir).expect("pem dir");
    let pem = |i: usize| -> PathBuf {
        let p = pem_dir.join(format!("other-{i}.pem"));
        std::fs::write(&p, foreign_ca_pem(&format!("other.org CA {i}"))).expect("pem");
        p
    };
    let p0 = pem(0);
    server.cli_ok(&[
        "bundle",
        "set",
        "--id",
        FOREIGN_TD,
        "--path",
        p0.to_str().expect("utf-8"),
    ]);
    let uid_sel = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    // Every stream comes from this process's uid: no per-uid limit below the fd limit.
    let per_uid = nofile.to_string();
    let w = agent_with_workload_entries_and_flags(
        &server,
        dir.path(),
        &[(WORKLOAD, &[&uid_sel])],
        &["--federates-with", "other.org"],
        &["--workload-api-max-connections-per-uid", &per_uid],
    );
    let agent_pid = w.agent.child.as_ref().expect("agent child").id();
    let socket = w.agent.socket_path();

    // The agent's message, once it carries the other.org bundle.
    let msg = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = client(&socket).await;
            let m = first_message(&mut c).await;
            if m.federated_bundles.contains_key(FOREIGN_TD) {
                break m;
            }
            assert!(
                Instant::now() < deadline,
                "no other.org bundle in the agent's message within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let size = msg.encoded_len();
    eprintln!(
        "agent message: {size} bytes ({} SVID(s), federated: {:?})",
        msg.svids.len(),
        msg.federated_bundles.keys().collect::<Vec<_>>()
    );

    // Part 1.
    let base_dir = tempdir();
    let base_socket = base_dir.path().join("baseline").join("api.sock");
    let base_rt = start_baseline(&base_socket, msg.clone(), false);
    let fix_socket = base_dir.path().join("baseline-adapter").join("api.sock");
    let fix_rt = start_baseline(&fix_socket, msg.clone(), true);
    // The same echo as a process of its own, like the agent: a call then crosses processes on
    // both sides (a context switch between processes costs more than one between threads).
    let proc_socket = base_dir.path().join("baseline-process").join("api.sock");
    let msg_file = base_dir.path().join("msg.bin");
    std::fs::write(&msg_file, msg.encode_to_vec()).expect("writing the message file");
    let mut base_child = spawn_baseline_child(&proc_socket, &msg_file);
    let (mut agent_s, mut base_s, mut proc_s, mut fix_s) =
        (Series::new(), Series::new(), Series::new(), Series::new());
    let per = n.div_ceil(rounds);
    let hwm_before = proc_kib(agent_pid, "VmHWM:");
    rt.block_on(async {
        for r in 0..rounds {
            let wu = if r == 0 { warmup } else { warmup / 10 };
            for (sock, s) in [
                (&socket, &mut agent_s),
                (&proc_socket, &mut proc_s),
                (&base_socket, &mut base_s),
                (&fix_socket, &mut fix_s),
            ] {
                s.persistent
                    .extend(latencies(sock, per, wu, false, size).await);
                s.fresh.extend(latencies(sock, per, wu, true, size).await);
            }
            eprintln!("  latency round {}/{rounds} done", r + 1);
        }
    });
    eprintln!(
        "agent VmRSS after part 1: {} (VmHWM {} before, {} after)",
        mib(proc_kib(agent_pid, "VmRSS:")),
        mib(hwm_before),
        mib(proc_kib(agent_pid, "VmHWM:"))
    );
    drop(base_rt);
    drop(fix_rt);
    let _ = base_child.kill();
    let _ = base_child.wait();
    if hold > 0 {
        // For `perf record -p <pid>`: persistent-channel calls against the agent, untimed.
        eprintln!("agent pid {agent_pid}: {hold} s of FetchX509SVID calls on one channel");
        let calls = rt.block_on(async {
            let mut c = client(&socket).await;
            let until = Instant::now() + Duration::from_secs(hold as u64);
            let mut calls = 0u64;
            while Instant::now() < until {
                first_message(&mut c).await;
                calls += 1;
            }
            calls
        });
        eprintln!("  {calls} calls");
    }

    // Part 2.
    let mut streams = Vec::new();
    let mut baseline_mem = Vec::new();
    for (i, &(k, conns)) in sizes.iter().enumerate() {
        // The bench holds one fd per connection, the agent too; keep room for everything else
        // (the agent accepts at most its fd limit less 1,024 connections).
        let connections = conns
            .unwrap_or(k)
            .min(k)
            .min(nofile.saturating_sub(1_100) as usize)
            .max(1);
        eprintln!("{k} streams over {connections} connections ...");
        let p = pem(i + 1);
        streams.push(many_streams(
            &rt,
            &server,
            &w.agent,
            &w.entry_ids[0],
            k,
            connections,
            &p,
            bundle_wait,
        ));
        if std::env::var_os("SIGIL_BENCH_WL_NO_BASELINE_MEM").is_none() {
            let (idle, open, closed, n) = baseline_memory(&rt, &msg, k, connections);
            eprintln!(
                "  baseline server: {n} streams, RSS {} → {} → {} (closed)",
                mib(idle),
                mib(open),
                mib(closed)
            );
            baseline_mem.push((k, connections, idle, open, closed, n));
        }
    }
    eprintln!("load after: {}", load().trim());

    // Report.
    let hdr = |what: &str| {
        println!("\n| {what} | calls | p50 | p99 | mean | min | max |");
        println!("|---|---|---|---|---|---|---|");
    };
    let row = |name: &str, v: &[f64]| {
        println!(
            "| {name} | {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms |",
            v.len(),
            pct(v, 50.0),
            pct(v, 99.0),
            mean(v),
            pct(v, 0.0),
            pct(v, 100.0)
        );
    };
    hdr(&format!(
        "FetchX509SVID → first message ({size}-byte message)"
    ));
    row("agent, persistent channel", &agent_s.persistent);
    row("baseline process, persistent channel", &proc_s.persistent);
    row(
        "baseline in the bench process, persistent channel",
        &base_s.persistent,
    );
    row(
        "baseline in the bench process behind the :authority adapter, persistent channel",
        &fix_s.persistent,
    );
    row("agent, new connection per call", &agent_s.fresh);
    row("baseline process, new connection per call", &proc_s.fresh);
    row(
        "baseline in the bench process, new connection per call",
        &base_s.fresh,
    );
    row(
        "baseline in the bench process behind the :authority adapter, new connection per call",
        &fix_s.fresh,
    );
    let ratio = |a: &[f64], b: &[f64]| {
        format!(
            "p50 {:.2}×, p99 {:.2}×, mean {:.2}×",
            pct(a, 50.0) / pct(b, 50.0),
            pct(a, 99.0) / pct(b, 99.0),
            mean(a) / mean(b)
        )
    };
    println!(
        "\nagent / baseline process, persistent: {}",
        ratio(&agent_s.persistent, &proc_s.persistent)
    );
    println!(
        "agent / baseline process, new connection: {}",
        ratio(&agent_s.fresh, &proc_s.fresh)
    );
    println!(
        "agent / in-process baseline, persistent: {}",
        ratio(&agent_s.persistent, &base_s.persistent)
    );
    println!(
        "agent / in-process baseline, new connection: {}",
        ratio(&agent_s.fresh, &base_s.fresh)
    );
    println!(
        ":authority adapter (in-process baseline with / without), persistent: {}",
        ratio(&fix_s.persistent, &base_s.persistent)
    );
    println!(
        ":authority adapter (in-process baseline with / without), new connection: {}",
        ratio(&fix_s.fresh, &base_s.fresh)
    );

    if !streams.is_empty() {
        let three = |v: &[f64]| {
            if v.is_empty() {
                "—".to_string()
            } else {
                format!(
                    "{:.0} / {:.0} / {:.0} ms",
                    pct(v, 50.0),
                    pct(v, 99.0),
                    pct(v, 100.0)
                )
            }
        };
        println!("\n| streams | connections | opened (failed) | open time | agent VmRSS idle → all open → after update → closed | VmHWM | agent fds open / closed | note |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in &streams {
            println!(
                "| {} | {} | {} ({}) | {:.2} s | {} → {} → {} → {} | {} | {} / {} | {} |",
                r.k,
                r.connections,
                r.opened,
                r.failed,
                r.open_secs,
                mib(r.rss_idle),
                mib(r.rss_open),
                mib(r.rss_updated),
                mib(r.rss_closed),
                mib(r.hwm_updated),
                r.fds_open,
                r.fds_closed,
                r.note
            );
        }
        if !baseline_mem.is_empty() {
            println!("\n| streams | connections | agent VmRSS with streams open − idle | baseline server (child process) VmRSS open − idle | per stream: agent / baseline | VmRSS after close: agent / baseline |");
            println!("|---|---|---|---|---|---|");
            for ((k, c, b_idle, b_open, b_closed, n), r) in baseline_mem.iter().zip(&streams) {
                let a = r.rss_open.saturating_sub(r.rss_idle);
                let b = b_open.saturating_sub(*b_idle);
                println!(
                    "| {k} | {c} | {} − {} = {} | {} − {} = {} ({n} open) | {:.1} / {:.1} KiB | {} / {} |",
                    mib(r.rss_open),
                    mib(r.rss_idle),
                    mib(a),
                    mib(*b_open),
                    mib(*b_idle),
                    mib(b),
                    a as f64 / r.opened.max(1) as f64,
                    b as f64 / (*n).max(1) as f64,
                    mib(r.rss_closed),
                    mib(*b_closed)
                );
            }
        }
        println!("\n| streams | trigger | CLI time | streams updated | next message after CLI start p50 / p99 / max | after CLI return p50 / p99 / max |");
        println!("|---|---|---|---|---|---|");
        for r in &streams {
            for t in &r.triggers {
                println!(
                    "| {} | {} | {:.0} ms | {} of {} | {} | {} |",
                    r.k,
                    t.what,
                    t.cli_ms,
                    t.from_start.len(),
                    r.opened,
                    three(&t.from_start),
                    three(&t.from_return)
                );
            }
        }
        for r in &streams {
            println!(
                "\n{} streams: updates carrying the new other.org bundle: {}; a stream opened after `bundle set` saw the new bundle: {}; unchanged re-sends: {}",
                r.k,
                r.with_new_bundle,
                r.fresh_sees_new_bundle
                    .map_or("(not checked: every stream updated)".to_string(), |b| b.to_string()),
                r.other_msgs
            );
        }
    }
    drop(w);
}
