//! Sync benchmarks at the server layer (no gRPC, no agent): the initial snapshot of 10,000 and
//! 100,000 entries to one agent through `sync_stream`, a reconnect of that agent holding them
//! (resumed from its revision: nothing changed, then 100 creates since), and the latency from an
//! entry create (as the admin API does it: durable datastore write, then an event) to the upsert
//! leaving the stream. Real SQLite files under `target/tmp` (`CARGO_TARGET_TMPDIR`), `synchronous=FULL`.
//!
//! Run: `cargo bench -p sigil-server --bench sync` (about a minute on 2 cores).
//! `SIGIL_BENCH_SYNC_SIZES=10000,100000` changes the snapshot sizes, `SIGIL_BENCH_RUNS=3` the
//! number of runs per size.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use sigil::entry::RegistrationEntry;
use sigil::proto::node as pb;
use sigil::{Selector, SelectorSet, SpiffeId, TrustDomain};
use sigil_server::datastore::sqlite::SqliteDatastore;
use sigil_server::datastore::{AttestedAgent, Datastore};
use sigil_server::sync::{authorized_entries, sync_stream, SyncEvents};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Entries of other agents in every database (they must cost nothing).
const NOISE: usize = 10_000;
/// Creates measured for the create-to-stream latency.
const LATENCY_CREATES: usize = 200;
/// Back-to-back single creates for the coalescing figure.
const BURST: usize = 1_000;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(path: &str) -> SpiffeId {
    td().id(path).unwrap()
}

fn sels(v: &[String]) -> SelectorSet {
    v.iter().map(|s| Selector::parse(s).unwrap()).collect()
}

fn agent_id() -> SpiffeId {
    id("/sigil/agent/x509pop/node-0")
}

fn server_id() -> SpiffeId {
    sigil_server::api::server_id(&td())
}

/// Entry `i` for the agent under test: like the datastore bench's Kubernetes-shaped entries
/// (3 selectors, one DNS name, an X.509 TTL); even ones directly under the agent, odd ones under
/// the cluster's node alias (reached through the agent's node selectors).
fn entry(i: usize, tag: &str) -> RegistrationEntry {
    let parent = if i % 2 == 0 {
        agent_id()
    } else {
        id("/cluster/c1")
    };
    RegistrationEntry {
        x509_svid_ttl: Some(Duration::from_secs(3600)),
        dns_names: vec![format!("sa-{i}.example.org")],
        ..RegistrationEntry::new(
            id(&format!("/ns/ns-{}/sa/{tag}sa-{i}", i % 100)),
            parent,
            sels(&[
                format!("k8s:ns:ns-{}", i % 100),
                format!("k8s:sa:{tag}sa-{}", i % 5000),
                format!("unix:uid:{}", i % 2000),
            ]),
        )
    }
}

/// An entry of another node (noise).
fn noise(i: usize) -> RegistrationEntry {
    RegistrationEntry {
        parent_id: id(&format!("/sigil/agent/x509pop/node-{}", 1 + i % 99)),
        spiffe_id: id(&format!("/other/sa-{i}")),
        ..entry(i, "other-")
    }
}

async fn setup(n: usize) -> (tempfile::TempDir, Arc<dyn Datastore>) {
    let dir = tempfile::Builder::new()
        .prefix("sigil-sync-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let ds = SqliteDatastore::open(&dir.path().join("ds.sqlite3"))
        .await
        .unwrap();
    ds.upsert_agent(AttestedAgent {
        spiffe_id: agent_id(),
        attestation_type: "x509pop".into(),
        x509_svid_serial: "01".into(),
        new_x509_svid: None,
        x509_svid_expires_at: i64::MAX,
        banned: false,
        selectors: sels(&["k8s:cluster:c1".into(), "k8s:node:node-0".into()]),
        created_at: 0,
        updated_at: 0,
    })
    .await
    .unwrap();
    let mut all = vec![RegistrationEntry {
        spiffe_id: id("/cluster/c1"),
        parent_id: server_id(),
        selectors: sels(&["k8s:cluster:c1".into()]),
        ..entry(0, "alias-")
    }];
    all.extend((0..n).map(|i| entry(i, "")));
    all.extend((0..NOISE).map(noise));
    for chunk in all.chunks(5_000) {
        let r = ds.create_entries(chunk.to_vec()).await.unwrap();
        assert!(r.iter().all(Result::is_ok));
    }
    (dir, Arc::new(ds))
}

fn stream(
    ds: &Arc<dyn Datastore>,
    events: &SyncEvents,
) -> impl futures::Stream<Item = Result<pb::SyncResponse, tonic::Status>> + Send + 'static {
    sync_stream(
        ds.clone(),
        events.clone(),
        agent_id(),
        server_id(),
        td(),
        pb::SyncRequest::default(),
        Duration::from_secs(3600),
    )
}

struct SnapshotRun {
    time: Duration,
    messages: usize,
    entries: usize,
    bytes: usize,
    largest: usize,
    /// What a reconnect would send back: the last message's revision and roots.
    resume: pb::SyncRequest,
}

async fn snapshot_once(ds: &Arc<dyn Datastore>) -> SnapshotRun {
    let events = SyncEvents::new();
    let start = Instant::now();
    let mut s = Box::pin(stream(ds, &events));
    first_round(&mut s, start).await
}

/// Reads a stream's first round (snapshot or resumed) to its last message.
async fn first_round(
    s: &mut (impl futures::Stream<Item = Result<pb::SyncResponse, tonic::Status>> + Unpin),
    start: Instant,
) -> SnapshotRun {
    let (mut messages, mut entries, mut bytes, mut largest) = (0, 0, 0, 0);
    let mut resume = pb::SyncRequest::default();
    while let Some(m) = s.next().await {
        let m = m.unwrap();
        messages += 1;
        entries += m.upserted.len() + m.removed.len();
        bytes += m.encoded_len();
        largest = largest.max(m.encoded_len());
        if !m.more_follows {
            resume = pb::SyncRequest {
                known_revision: m.revision,
                known_bundle_sequence: 0,
                known_roots: m.roots,
            };
            break;
        }
    }
    SnapshotRun {
        time: start.elapsed(),
        messages,
        entries,
        bytes,
        largest,
        resume,
    }
}

/// A reconnect holding the set of `req`: its first (resumed) round.
async fn resume_once(ds: &Arc<dyn Datastore>, req: pb::SyncRequest) -> SnapshotRun {
    let events = SyncEvents::new();
    let start = Instant::now();
    let mut s = Box::pin(sync_stream(
        ds.clone(),
        events,
        agent_id(),
        server_id(),
        td(),
        req,
        Duration::from_secs(3600),
    ));
    first_round(&mut s, start).await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Create-to-stream latency: a consumer task timestamps every upsert; the producer creates one
/// entry at a time (datastore write + event, as the admin API does) and waits for it.
async fn latency(ds: &Arc<dyn Datastore>, base: usize) {
    let events = SyncEvents::new();
    let mut s = Box::pin(stream(ds, &events));
    while let Some(m) = s.next().await {
        if m.unwrap().snapshot_complete {
            break;
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Instant, usize)>();
    let consumer = tokio::spawn(async move {
        while let Some(Ok(m)) = s.next().await {
            let now = Instant::now();
            let n = m.upserted.len();
            for e in m.upserted {
                if tx.send((e.id, now, n)).is_err() {
                    return;
                }
            }
        }
    });
    let mut lat = Vec::with_capacity(LATENCY_CREATES);
    for i in 0..LATENCY_CREATES {
        let e = entry(base + i, "lat-");
        let start = Instant::now();
        let created = ds.create_entries(vec![e]).await.unwrap().remove(0).unwrap();
        events.entries_changed();
        loop {
            let (got, at, _) = rx.recv().await.unwrap();
            if got == created.id {
                lat.push(at - start);
                break;
            }
        }
        // Quiet gap, so every create is measured on its own (no coalescing).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lat.sort();
    println!(
        "  create→stream latency over {LATENCY_CREATES} single creates: p50 {}  p99 {}  max {}",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(lat[lat.len() - 1]),
    );

    // A burst of back-to-back single creates: how many messages carry them.
    let start = Instant::now();
    let mut created_ids = HashMap::new();
    let producer = {
        let ds = ds.clone();
        let events = events.clone();
        tokio::spawn(async move {
            for i in 0..BURST {
                let e = entry(base + LATENCY_CREATES + i, "burst-");
                ds.create_entries(vec![e]).await.unwrap().remove(0).unwrap();
                events.entries_changed();
            }
            Instant::now()
        })
    };
    let mut message_sizes: HashMap<Instant, usize> = HashMap::new();
    while created_ids.len() < BURST {
        let (id, at, n) = rx.recv().await.unwrap();
        message_sizes.insert(at, n);
        created_ids.insert(id, at);
    }
    let writes_done = producer.await.unwrap();
    let last = created_ids.values().max().copied().unwrap();
    println!(
        "  burst of {BURST} back-to-back single creates: writes took {}, last upsert {} after the first write; {} messages (largest {} entries)",
        ms(writes_done - start),
        ms(last - start),
        message_sizes.len(),
        message_sizes.values().max().copied().unwrap_or(0),
    );
    consumer.abort();
}

fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    // `cargo bench` passes `--bench`; a `cargo test --benches` run passes nothing: keep it quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = std::env::var("SIGIL_BENCH_SYNC_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| {
            if quick {
                vec![1_000]
            } else {
                vec![10_000, 100_000]
            }
        });
    let runs: usize = std::env::var("SIGIL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let rt = Runtime::new().unwrap();
    for n in sizes {
        rt.block_on(async {
            let t = Instant::now();
            let (_dir, ds) = setup(n).await;
            println!(
                "sync, {n} entries for the agent (+{NOISE} of other agents; half under a node alias), filled in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            let agent = ds.get_agent(&agent_id()).await.unwrap().unwrap();
            let t = Instant::now();
            let authorised = authorized_entries(&*ds, &agent, &server_id()).await.unwrap();
            let elapsed = t.elapsed();
            assert_eq!(authorised.len(), n);
            drop(authorised);
            println!("  authorized_entries alone: {}", ms(elapsed));
            let rss_before = rss_mib("VmRSS:");
            let mut times = Vec::new();
            let mut resume = pb::SyncRequest::default();
            for run in 1..=runs {
                let r = snapshot_once(&ds).await;
                resume = r.resume.clone();
                assert_eq!(r.entries, n);
                println!(
                    "  run {run}: snapshot_complete after {}  ({} messages, {} entries, {:.2} MiB encoded, {:.0} bytes/entry, largest message {} KiB)",
                    ms(r.time),
                    r.messages,
                    r.entries,
                    r.bytes as f64 / (1024.0 * 1024.0),
                    r.bytes as f64 / r.entries.max(1) as f64,
                    r.largest / 1024,
                );
                times.push(r.time);
            }
            times.sort();
            println!(
                "  median snapshot: {}  ({:.0} entries/s); bench process RSS {:.0} MiB before, peak {:.0} MiB",
                ms(times[times.len() / 2]),
                n as f64 / times[times.len() / 2].as_secs_f64(),
                rss_before,
                rss_mib("VmHWM:"),
            );
            // Reconnects of an agent holding the whole set: nothing changed, then 100 creates.
            for (label, creates) in [("nothing changed", 0), ("100 entries created since", 100)] {
                let batch: Vec<RegistrationEntry> =
                    (0..creates).map(|i| entry(n + i, "resume-")).collect();
                if !batch.is_empty() {
                    ds.create_entries(batch).await.unwrap();
                }
                let mut times = Vec::new();
                let mut last = None;
                for _ in 0..runs {
                    let r = resume_once(&ds, resume.clone()).await;
                    times.push(r.time);
                    last = Some(r);
                }
                times.sort();
                let r = last.unwrap();
                println!(
                    "  reconnect, {label}: first round after {} (median of {runs}); {} messages, {} entries, {} bytes encoded",
                    ms(times[times.len() / 2]),
                    r.messages,
                    r.entries,
                    r.bytes,
                );
            }
            latency(&ds, n + 100).await;
        });
    }
}
