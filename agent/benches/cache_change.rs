//! What one cache change costs the agent with many entries and many open Workload API streams:
//! the worker's part (apply the change, build and publish the snapshot, find the streams it
//! concerns) and the streams' part (each woken stream reads the snapshot, computes its view key
//! and, when its view changed, builds and encodes its X509-SVID message). The streams are the
//! real stream logic without the gRPC transport: one task each, registered with the agent's
//! watchers. A baseline shows the cost of the previous design for comparison: every stream woken
//! by every change, each scanning every entry.
//!
//! `cargo bench -p sigil-agent --bench cache_change` (BENCHMARKS.md, "Cache change"). Variables:
//! `SIGIL_BENCH_CHANGE_ENTRIES` (100000), `SIGIL_BENCH_CHANGE_STREAMS` (1000),
//! `SIGIL_BENCH_CHANGE_ROUNDS` (200), `SIGIL_BENCH_CHANGE_BASELINE_ROUNDS` (1; 0 skips it).

// A benchmark measures real elapsed time.
#![allow(clippy::disallowed_types, clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use sigil::proto::admin as apb;
use sigil::proto::node as pb;
use sigil::selector::SelectorSet;
use sigil_agent::sync::cache::{Cache, Changes, PendingCsr};
use sigil_agent::sync::storage::AgentIdentity;
use sigil_agent::sync::worker::AgentState;
use sigil_agent::workload_api::identities::{self, X509State};

mod support;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Entry `i`: `k8s:ns:ns-<s % 100>`, `k8s:sa:sa-<s>` with `s = i % 5000` (20 entries per
/// service account at 100,000).
fn entry(i: usize, revision: i64) -> apb::Entry {
    let sa = i % 5000;
    let sel = |t: &str, v: String| apb::Selector {
        r#type: t.into(),
        value: v,
    };
    apb::Entry {
        id: format!("{i:08}-0000-4000-8000-000000000000"),
        spiffe_id: format!("spiffe://example.org/ns/ns-{}/sa/sa-{sa}/w-{i}", sa % 100),
        parent_id: "spiffe://example.org/sigil/agent/join_token/node".into(),
        selectors: vec![
            sel("k8s", format!("ns:ns-{}", sa % 100)),
            sel("k8s", format!("sa:sa-{sa}")),
        ],
        revision_number: revision,
        created_at: i as i64,
        ..Default::default()
    }
}

/// Caller `j`: the selectors of service account `j` plus its uid.
fn caller(j: usize) -> SelectorSet {
    [
        format!("k8s:ns:ns-{}", j % 100),
        format!("k8s:sa:sa-{j}"),
        format!("unix:uid:{}", 1000 + j),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

fn agent_identity() -> AgentIdentity {
    let td: sigil::TrustDomain = "example.org".parse().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/sigil/agent/join_token/node"
            .try_into()
            .unwrap(),
    )];
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let cert = leaf.self_signed(&key).unwrap();
    AgentIdentity::new(&td, vec![cert.der().to_vec()], key.serialize_der()).unwrap()
}

/// Real keys and leaves (1,000, the `n`-th SVID stored is number `n % 1,000`): the cache holds
/// them compressed and streams rebuild them, as they would real ones.
static SVIDS: std::sync::LazyLock<Vec<(Vec<u8>, Vec<u8>)>> =
    std::sync::LazyLock::new(|| support::keys_and_leaves(1000));

fn store(cache: &mut Cache, id: &str, revision: i64, n: u64, now: i64) {
    let (key, leaf) = &SVIDS[n as usize % SVIDS.len()];
    let p = PendingCsr {
        entry_id: id.to_string(),
        entry_revision: revision,
        key_pkcs8_der: key.clone(),
        csr_der: Vec::new(),
    };
    assert!(cache.store_svid(p, vec![leaf.clone()], now + 3600, now));
}

#[derive(Default)]
struct Counters {
    looks: AtomicU64,
    encodes: AtomicU64,
    bytes: AtomicU64,
    /// Signalled after every look (the driver waits on it without spinning).
    looked: tokio::sync::Notify,
}

/// How the simulated streams look at the cache.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// As the agent does now: view key first, message only when it changed.
    Keyed,
    /// The previous design: a scan of every entry, then the message, every time.
    Scan,
}

fn spawn_streams(
    state: &Arc<AgentState>,
    n: usize,
    mode: Mode,
    counters: &Arc<Counters>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|j| {
            let state = state.clone();
            let counters = counters.clone();
            let mut stop = stop.clone();
            let mut sel = Arc::new(caller(j));
            let sub = state.watchers.subscribe(&mut sel, false);
            tokio::spawn(async move {
                let mut last = None;
                loop {
                    tokio::select! {
                        _ = sub.changed() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    let snap = state.snapshot();
                    let now = sigil::clock::now_unix();
                    let build = match mode {
                        Mode::Keyed => {
                            let key = identities::view_key(&snap, &sel, now);
                            let changed = last != Some(key);
                            last = Some(key);
                            changed
                        }
                        Mode::Scan => {
                            let matched = snap
                                .entries()
                                .filter(|e| {
                                    !e.selectors.is_empty() && e.selectors.is_subset_of(&sel)
                                })
                                .count();
                            std::hint::black_box(matched);
                            true
                        }
                    };
                    if build {
                        if let X509State::Ready { response, .. } =
                            identities::x509_svid_state(&snap, &sel, now)
                        {
                            let bytes = response.encode_to_vec();
                            counters.encodes.fetch_add(1, Ordering::Relaxed);
                            counters
                                .bytes
                                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        }
                    }
                    counters.looks.fetch_add(1, Ordering::Release);
                    counters.looked.notify_one();
                }
            })
        })
        .collect()
}

/// Waits until the streams have looked `target` times in all.
async fn settle(counters: &Counters, target: u64) {
    while counters.looks.load(Ordering::Acquire) < target {
        counters.looked.notified().await;
    }
}

struct Sample {
    worker: Duration,
    total: Duration,
    woken: usize,
    encodes: u64,
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, samples: &[Sample]) {
    let mut worker: Vec<Duration> = samples.iter().map(|s| s.worker).collect();
    let mut total: Vec<Duration> = samples.iter().map(|s| s.total).collect();
    let woken = samples.iter().map(|s| s.woken).sum::<usize>() as f64 / samples.len() as f64;
    let encodes = samples.iter().map(|s| s.encodes).sum::<u64>() as f64 / samples.len() as f64;
    println!(
        "{name:<44} worker p50 {:>9.1?} p99 {:>9.1?} | until streams done p50 {:>9.1?} p99 {:>9.1?} | woken {woken:>6.1} | messages encoded {encodes:>6.1}",
        pct(&mut worker, 0.5),
        pct(&mut worker, 0.99),
        pct(&mut total, 0.5),
        pct(&mut total, 0.99),
    );
}

/// One change made by `change`, published as the worker does, timed until every woken stream
/// has looked.
async fn measure(
    state: &AgentState,
    cache: &mut Cache,
    counters: &Counters,
    wake_all: bool,
    change: impl FnOnce(&mut Cache),
) -> Sample {
    let looks = counters.looks.load(Ordering::Acquire);
    let encodes = counters.encodes.load(Ordering::Relaxed);
    let started = Instant::now();
    change(cache);
    let mut changes = cache.take_changes();
    if wake_all {
        changes = Changes::everything();
    }
    let woken = state.publish(cache.snapshot(), &changes);
    let worker = started.elapsed();
    settle(counters, looks + woken as u64).await;
    Sample {
        worker,
        total: started.elapsed(),
        woken,
        encodes: counters.encodes.load(Ordering::Relaxed) - encodes,
    }
}

async fn run() {
    let n_entries = env("SIGIL_BENCH_CHANGE_ENTRIES", 100_000);
    let n_streams = env("SIGIL_BENCH_CHANGE_STREAMS", 1_000);
    let rounds = env("SIGIL_BENCH_CHANGE_ROUNDS", 200);
    let baseline_rounds = env("SIGIL_BENCH_CHANGE_BASELINE_ROUNDS", 1);
    let now = sigil::clock::now_unix();

    let t = Instant::now();
    let mut cache = Cache::new();
    for chunk in (0..n_entries).collect::<Vec<_>>().chunks(1000) {
        cache
            .apply_sync(pb::SyncResponse {
                upserted: chunk.iter().map(|&i| entry(i, 1)).collect(),
                full: chunk[0] == 0,
                snapshot_complete: chunk[chunk.len() - 1] == n_entries - 1,
                revision: 1,
                bundle: (chunk[0] == 0).then(|| pb::Bundle {
                    trust_domain: "example.org".into(),
                    x509_roots: vec![0xAA; 500],
                    sequence_number: 1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap();
    }
    let snapshot_applied = t.elapsed();
    let t = Instant::now();
    for i in 0..n_entries {
        store(&mut cache, &entry(i, 1).id, 1, i as u64, now);
    }
    let minted = t.elapsed();
    cache.take_changes();
    println!(
        "{n_entries} entries: full snapshot applied in {snapshot_applied:.2?}, {n_entries} SVIDs stored in {minted:.2?}; {n_streams} streams, each matching {} entries",
        n_entries / 5000
    );

    let state = Arc::new(AgentState::new(
        "example.org".parse().unwrap(),
        agent_identity(),
    ));
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    state.publish(cache.snapshot(), &Changes::default());
    let tasks = spawn_streams(&state, n_streams, Mode::Keyed, &counters, &stop);
    // First look of every stream (its first message).
    let first = measure(&state, &mut cache, &counters, true, |_| {}).await;
    println!(
        "first look of all {n_streams} streams: {:.1?} ({} messages, {} bytes each)",
        first.total,
        first.encodes,
        counters.bytes.load(Ordering::Relaxed) / first.encodes.max(1)
    );

    let mut rotate = Vec::new();
    let mut other = Vec::new();
    let mut upsert = Vec::new();
    let mut noop = Vec::new();
    for r in 0..rounds {
        // The SVID of an entry a stream sees rotates (entry `j` for stream `j`).
        let id = entry(r % n_streams, 1).id;
        rotate.push(
            measure(&state, &mut cache, &counters, false, |c| {
                store(c, &id, 1, r as u64 + 1, now)
            })
            .await,
        );
        // An entry no stream sees (service account ≥ 1,000) rotates.
        let id = entry(n_streams + r % (5000 - n_streams), 1).id;
        other.push(
            measure(&state, &mut cache, &counters, false, |c| {
                store(c, &id, 1, r as u64 + 1, now)
            })
            .await,
        );
        // An entry a stream sees changes (new revision; its SVID waits for the next mint).
        let e = entry(r % n_streams + 5000, 2 + r as i64);
        upsert.push(
            measure(&state, &mut cache, &counters, false, |c| {
                c.apply_sync(pb::SyncResponse {
                    upserted: vec![e],
                    revision: 2 + r as i64,
                    ..Default::default()
                })
                .unwrap();
            })
            .await,
        );
        // Every stream woken, nothing it sees changed (the view key stops it).
        noop.push(measure(&state, &mut cache, &counters, true, |_| {}).await);
    }
    println!("per change, {rounds} changes each:");
    report("SVID rotation, entry seen by one stream", &rotate);
    report("SVID rotation, entry seen by no stream", &other);
    report("entry update, seen by one stream", &upsert);
    report("every stream woken, no view changed", &noop);
    let mut bundle = Vec::new();
    for r in 0..rounds.min(20) {
        bundle.push(
            measure(&state, &mut cache, &counters, false, |c| {
                c.apply_sync(pb::SyncResponse {
                    bundle: Some(pb::Bundle {
                        trust_domain: "example.org".into(),
                        x509_roots: vec![r as u8; 500],
                        sequence_number: 2 + r as u64,
                        ..Default::default()
                    }),
                    revision: 1,
                    ..Default::default()
                })
                .unwrap();
            })
            .await,
        );
    }
    report("bundle change (every stream's view)", &bundle);
    stop_tx.send(true).unwrap();
    for t in tasks {
        t.await.unwrap();
    }

    if baseline_rounds > 0 {
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let tasks = spawn_streams(&state, n_streams, Mode::Scan, &counters, &stop);
        let mut scan = Vec::new();
        for r in 0..baseline_rounds {
            let id = entry(r % n_streams, 1).id;
            scan.push(
                measure(&state, &mut cache, &counters, true, |c| {
                    store(c, &id, 1, 10_000 + r as u64, now)
                })
                .await,
            );
        }
        println!("baseline (previous design), {baseline_rounds} changes:");
        report("SVID rotation, every stream woken, full scan", &scan);
        stop_tx.send(true).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}
